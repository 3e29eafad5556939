//! The C ABI called as C would call it, with what C gets wrong: misaligned and oversized
//! buffers, text that is not UTF-8, and threads that close a client while others use it.

use std::ffi::{c_char, CStr};

use tessera::*;
use tessera_engine::{Server, ServerConfig, UpdaterRegistry};

fn server() -> Server {
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    cfg.engine.shards = 2;
    cfg.engine.pin_cores = false;
    Server::start(cfg, UpdaterRegistry::new()).unwrap()
}

fn last_error() -> String {
    // SAFETY: tessera_last_error returns a NUL-terminated string valid until this thread's next call.
    unsafe { CStr::from_ptr(tessera_last_error()) }.to_string_lossy().into_owned()
}

fn connect(server: &Server, worker: u32) -> TesseraClient {
    let addr = std::ffi::CString::new(server.local_addr().to_string()).unwrap();
    let mut client = 0;
    // SAFETY: a NUL-terminated address and a writable handle.
    let rc = unsafe { tessera_connect(addr.as_ptr(), worker, c"tcp".as_ptr(), &mut client) };
    assert_eq!(rc, TESSERA_OK, "{}", last_error());
    client
}

fn dense_table(client: TesseraClient, name: &CStr, keys: u64) -> TesseraTable {
    let mut table = 0;
    // SAFETY: NUL-terminated strings and a writable handle.
    let rc = unsafe { tessera_create_table(client, name.as_ptr(), TESSERA_DENSE, 0, keys, 1, std::ptr::null(), &mut table) };
    assert_eq!(rc, TESSERA_OK, "{}", last_error());
    table
}

#[test]
fn bad_buffers_and_text_are_refused_with_a_message() {
    let server = server();
    let client = connect(&server, 0);
    let table = dense_table(client, c"t", 16);
    let values = [0f32; 17];
    // A float array starting one byte in: misaligned.
    let misaligned = (values.as_ptr() as usize + 1) as *const f32;
    // SAFETY: the library checks alignment before reading; nothing is read here.
    let rc = unsafe { tessera_push_range(client, table, 0, misaligned, 4, std::ptr::null_mut()) };
    assert_eq!(rc, TESSERA_ERR_ARGUMENT);
    assert!(last_error().contains("not aligned"), "{}", last_error());
    // A length whose byte size overflows.
    // SAFETY: the library checks the size before reading.
    let rc = unsafe { tessera_push_range(client, table, 0, values.as_ptr(), usize::MAX / 2, std::ptr::null_mut()) };
    assert_eq!(rc, TESSERA_ERR_ARGUMENT, "{}", last_error());
    // A length that does not match the table.
    // SAFETY: 17 readable values.
    let rc = unsafe { tessera_push_range(client, table, 0, values.as_ptr(), 17, std::ptr::null_mut()) };
    assert_eq!(rc, TESSERA_ERR_ARGUMENT, "{}", last_error());
    // A name that is not UTF-8.
    let bad = [0xffu8, 0xfe, 0];
    let mut other = 0;
    // SAFETY: a NUL-terminated byte string and a writable handle.
    let rc = unsafe { tessera_table(client, bad.as_ptr() as *const c_char, &mut other, std::ptr::null_mut()) };
    assert_eq!(rc, TESSERA_ERR_ARGUMENT);
    assert!(last_error().contains("UTF-8"), "{}", last_error());
    // Empty arrays may be NULL.
    // SAFETY: no values are read for a length of 0.
    let rc = unsafe { tessera_push(client, table, std::ptr::null(), 0, std::ptr::null(), 0, std::ptr::null_mut()) };
    assert_eq!(rc, TESSERA_OK, "{}", last_error());
    assert_eq!(last_error(), "", "a success clears the message");
    // Status names.
    // SAFETY: tessera_status_name returns a static NUL-terminated string.
    let name = |code| unsafe { CStr::from_ptr(tessera_status_name(code)) }.to_str().unwrap().to_string();
    assert_eq!(name(TESSERA_ERR_CLOSED), "TESSERA_ERR_CLOSED");
    assert_eq!(name(-7), "unknown status");
    assert_eq!(tessera_close(client), TESSERA_OK);
}

#[test]
fn threads_closing_a_client_under_other_threads_get_statuses_not_crashes() {
    let server = server();
    for round in 0..5 {
        let client = connect(&server, 0);
        let table = dense_table(client, c"shared", 64);
        std::thread::scope(|scope| {
            for t in 0..4 {
                scope.spawn(move || {
                    let mut out = [0f32; 64];
                    for i in 0..200 {
                        let ones = [1f32; 64];
                        let mut ticket = 0;
                        // SAFETY: 64 readable values and a writable ticket.
                        let pushed = unsafe { tessera_push_range(client, table, 0, ones.as_ptr(), 64, &mut ticket) };
                        let waited = if pushed == TESSERA_OK { tessera_wait(client, ticket) } else { pushed };
                        // SAFETY: `out` outlives the call, which waits (NULL ticket).
                        let pulled = unsafe { tessera_pull_range(client, table, 0, out.as_mut_ptr(), 64, std::ptr::null_mut()) };
                        for rc in [pushed, waited, pulled] {
                            assert!(rc == TESSERA_OK || rc == TESSERA_ERR_CLOSED, "round {round} thread {t} call {i}: {rc} {}", last_error());
                        }
                        if t == 0 && i == 50 + round * 20 {
                            assert_eq!(tessera_close(client), TESSERA_OK);
                        }
                        if pulled == TESSERA_ERR_CLOSED {
                            return;
                        }
                    }
                });
            }
        });
        assert_eq!(tessera_close(client), TESSERA_ERR_CLOSED, "closed by a thread");
    }
}

#[test]
fn a_pull_ticket_closed_before_its_wait_never_writes_the_buffer_afterwards() {
    let server = server();
    let client = connect(&server, 0);
    let table = dense_table(client, c"late", 8);
    let ones = [1f32; 8];
    // SAFETY: 8 readable values; the call waits.
    assert_eq!(unsafe { tessera_push_range(client, table, 0, ones.as_ptr(), 8, std::ptr::null_mut()) }, TESSERA_OK);
    let mut out = vec![-1f32; 8];
    let mut ticket = 0;
    // SAFETY: `out` stays valid until the close below, after which the library forgets it.
    assert_eq!(unsafe { tessera_pull_range(client, table, 0, out.as_mut_ptr(), 8, &mut ticket) }, TESSERA_OK);
    assert_eq!(tessera_close(client), TESSERA_OK);
    assert_eq!(tessera_wait(client, ticket), TESSERA_ERR_CLOSED);
    drop(out);
}

#[test]
fn a_push_buffer_is_filled_in_place_pushed_reused_and_freed_once() {
    let server = server();
    let client = connect(&server, 0);
    let table = dense_table(client, c"buffered", 10_000);
    let (mut buffer, mut data) = (0, std::ptr::null_mut());
    // SAFETY: writable out-pointers.
    assert_eq!(unsafe { tessera_push_buffer(client, 10_000, &mut buffer, &mut data) }, TESSERA_OK, "{}", last_error());
    // SAFETY: `data` holds 10,000 floats until the buffer is freed.
    let values = unsafe { std::slice::from_raw_parts_mut(data, 10_000) };
    assert!(values.iter().all(|v| *v == 0.0), "a new buffer is zeroed");
    values.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 9) as f32);
    let mut ticket = 0;
    // SAFETY: a writable ticket.
    assert_eq!(unsafe { tessera_push_range_from(client, table, 0, buffer, &mut ticket) }, TESSERA_OK, "{}", last_error());
    // The buffer is the caller's again as soon as the call returns.
    values.fill(1.0);
    assert_eq!(tessera_wait(client, ticket), TESSERA_OK, "{}", last_error());
    // SAFETY: no ticket: the call waits.
    assert_eq!(unsafe { tessera_push_range_from(client, table, 0, buffer, std::ptr::null_mut()) }, TESSERA_OK);
    let mut out = vec![0f32; 10_000];
    // SAFETY: 10,000 writable values; the call waits.
    assert_eq!(unsafe { tessera_pull_range(client, table, 0, out.as_mut_ptr(), 10_000, std::ptr::null_mut()) }, TESSERA_OK);
    assert!(out.iter().enumerate().all(|(i, v)| *v == (i % 9) as f32 + 1.0), "both pushes landed, each with the values it was called with");
    assert_eq!(tessera_push_buffer_free(client, buffer), TESSERA_OK);
    assert_eq!(tessera_push_buffer_free(client, buffer), TESSERA_ERR_CLOSED);
    assert!(last_error().contains("freed twice"), "{}", last_error());
    // SAFETY: no ticket.
    assert_eq!(unsafe { tessera_push_range_from(client, table, 0, buffer, std::ptr::null_mut()) }, TESSERA_ERR_CLOSED);
    // SAFETY: the library checks the out-pointers before writing.
    assert_eq!(unsafe { tessera_push_buffer(client, 4, std::ptr::null_mut(), &mut data) }, TESSERA_ERR_NULL);
    // A buffer whose length does not match the table's dense range is refused before sending.
    let mut small = 0;
    // SAFETY: writable out-pointers.
    assert_eq!(unsafe { tessera_push_buffer(client, 20_000, &mut small, &mut data) }, TESSERA_OK);
    // SAFETY: no ticket.
    assert_eq!(unsafe { tessera_push_range_from(client, table, 0, small, std::ptr::null_mut()) }, TESSERA_ERR_ARGUMENT);
    assert_eq!(tessera_close(client), TESSERA_OK);
}
