//! Waits through the C ABI on a server frozen with SIGSTOP (a real process, so that its
//! sockets stay open and nothing answers): a wait with a timeout returns
//! `TESSERA_ERR_TIMEOUT` and keeps its ticket, a poll says not ready, the ticket completes once
//! the server runs again, and a `tessera_close` from another thread ends a blocked wait at once.

use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

use tessera::*;
use tessera_tests::ServerProc;

fn last_error() -> String {
    // SAFETY: a NUL-terminated string valid until this thread's next call into the library.
    unsafe { CStr::from_ptr(tessera_last_error()) }.to_string_lossy().into_owned()
}

#[test]
fn waits_time_out_poll_and_end_on_close_while_the_server_is_frozen() {
    let server = ServerProc::start(&["--shards", "2"]);
    let addr = CString::new(server.addr()).unwrap();
    let (mut client, mut table, mut ticket, mut ready) = (0, 0, 0, 7);
    // SAFETY: NUL-terminated strings and writable handles, here and below.
    unsafe {
        assert_eq!(tessera_connect(addr.as_ptr(), 0, c"tcp".as_ptr(), &mut client), TESSERA_OK);
        assert_eq!(tessera_create_table(client, c"frozen".as_ptr(), TESSERA_DENSE, 0, 4, 1, std::ptr::null(), &mut table), TESSERA_OK);
    }
    let ones = [1f32; 4];
    // A worker's first push to a range asks the range's head how many of its pushes it holds,
    // in the call: that one goes before the freeze.
    // SAFETY: four values; no ticket (the call waits).
    assert_eq!(unsafe { tessera_push_range(client, table, 0, ones.as_ptr(), 4, std::ptr::null_mut()) }, TESSERA_OK);
    // Frozen once every thread has stopped: a thread the stop had not reached yet could answer.
    server.freeze();
    // SAFETY: four values, a writable ticket.
    assert_eq!(unsafe { tessera_push_range(client, table, 0, ones.as_ptr(), 4, &mut ticket) }, TESSERA_OK);
    let started = Instant::now();
    assert_eq!(tessera_wait_timeout(client, ticket, 100), TESSERA_ERR_TIMEOUT, "{}", last_error());
    assert!(started.elapsed() < Duration::from_secs(2), "the wait took {:?}", started.elapsed());
    // SAFETY: a writable flag.
    assert_eq!(unsafe { tessera_poll(client, ticket, &mut ready) }, TESSERA_OK);
    assert_eq!(ready, 0);
    server.resume();
    assert_eq!(tessera_wait_timeout(client, ticket, 10_000), TESSERA_OK, "the ticket survived its timeout: {}", last_error());
    assert_eq!(tessera_wait(client, ticket), TESSERA_ERR_CLOSED, "a ticket is waited on once");

    // A wait blocked on the frozen server ends when another thread closes the client.
    server.freeze();
    // SAFETY: as above.
    assert_eq!(unsafe { tessera_push_range(client, table, 0, ones.as_ptr(), 4, &mut ticket) }, TESSERA_OK);
    // SAFETY: as above.
    assert_eq!(unsafe { tessera_poll(client, ticket, &mut ready) }, TESSERA_OK);
    assert_eq!(ready, 0);
    let waiter = std::thread::spawn(move || {
        let rc = tessera_wait(client, ticket);
        (rc, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    let closed_at = Instant::now();
    assert_eq!(tessera_close(client), TESSERA_OK);
    let (rc, returned_at) = waiter.join().expect("the waiting thread");
    server.resume();
    assert_eq!(rc, TESSERA_ERR_CLOSED);
    let late = returned_at.saturating_duration_since(closed_at);
    assert!(late < Duration::from_millis(500), "the wait returned {late:?} after the close");
}
