//! What the Rust client can be told, the C ABI can be told too: the client's options
//! (consistency, compression, key caching, timeouts), a table's full definition (sparse
//! capacity, initial values, the non-finite policy) and push filters.

use std::ffi::{CStr, CString};

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

fn options() -> TesseraOptions {
    let mut o = std::mem::MaybeUninit::<TesseraOptions>::uninit();
    // SAFETY: a writable struct, filled by the call.
    assert_eq!(unsafe { tessera_options_init(o.as_mut_ptr()) }, TESSERA_OK);
    // SAFETY: initialised by tessera_options_init.
    unsafe { o.assume_init() }
}

fn table_options() -> TesseraTableOptions {
    let mut o = std::mem::MaybeUninit::<TesseraTableOptions>::uninit();
    // SAFETY: a writable struct, filled by the call.
    assert_eq!(unsafe { tessera_table_options_init(o.as_mut_ptr()) }, TESSERA_OK);
    // SAFETY: initialised by tessera_table_options_init.
    unsafe { o.assume_init() }
}

#[test]
fn a_client_connects_with_every_option_and_refuses_bad_ones() {
    let server = server();
    let addr = CString::new(server.local_addr().to_string()).unwrap();
    let mut o = options();
    assert_eq!((o.io_timeout_ms, o.reconnect_attempts, o.compress), (30_000, 8, 0), "the Rust client's defaults");
    (o.worker, o.transport, o.consistency, o.compress, o.key_cache_keys, o.io_timeout_ms) = (3, c"tcp".as_ptr(), c"sequential".as_ptr(), 1, 1024, 5_000);
    let mut client = 0;
    // SAFETY: NUL-terminated strings, an initialised options struct, a writable handle.
    assert_eq!(unsafe { tessera_connect_with(addr.as_ptr(), &o, &mut client) }, TESSERA_OK, "{}", last_error());
    let mut table = 0;
    // SAFETY: as above.
    assert_eq!(unsafe { tessera_create_table(client, c"opts".as_ptr(), TESSERA_DENSE, 0, 64, 1, std::ptr::null(), &mut table) }, TESSERA_OK);
    let keys: Vec<u64> = (0..64).collect();
    let (ones, mut out) = ([1f32; 64], [0f32; 64]);
    for _ in 0..3 {
        // SAFETY: 64 keys and values; the calls wait.
        unsafe {
            assert_eq!(tessera_push(client, table, keys.as_ptr(), 64, ones.as_ptr(), 64, std::ptr::null_mut()), TESSERA_OK);
            assert_eq!(tessera_pull(client, table, keys.as_ptr(), 64, out.as_mut_ptr(), 64, std::ptr::null_mut()), TESSERA_OK);
        }
    }
    assert_eq!(out, [3.0; 64], "sent by key-list hash, compressed, in order");
    assert_eq!(tessera_close(client), TESSERA_OK);

    for (what, change) in [
        ("consistency", (|o: &mut TesseraOptions| o.consistency = c"strict".as_ptr()) as fn(&mut TesseraOptions)),
        ("compress", |o| o.compress = 2),
        ("defer_pushes", |o| o.defer_pushes = 2),
        ("transport", |o| o.transport = c"carrier pigeon".as_ptr()),
        ("a size from a newer header", |o| o.size += 8),
        ("io timeout", |o| o.io_timeout_ms = 0),
    ] {
        let mut bad = options();
        change(&mut bad);
        // SAFETY: as above.
        let rc = unsafe { tessera_connect_with(addr.as_ptr(), &bad, &mut client) };
        assert_eq!(rc, TESSERA_ERR_ARGUMENT, "{what}: {}", last_error());
    }
    // An older header's smaller struct: the fields it lacks keep their defaults.
    let mut old = options();
    (old.size, old.worker, old.transport) = (8, 1, c"bogus".as_ptr());
    // SAFETY: as above; only the first 8 bytes are read.
    assert_eq!(unsafe { tessera_connect_with(addr.as_ptr(), &old, &mut client) }, TESSERA_OK, "{}", last_error());
    assert_eq!(tessera_close(client), TESSERA_OK);
}

#[test]
fn a_table_is_created_with_its_full_definition_and_filters_apply() {
    let server = server();
    let addr = CString::new(server.local_addr().to_string()).unwrap();
    let mut client = 0;
    // SAFETY: a NUL-terminated address and a writable handle.
    assert_eq!(unsafe { tessera_connect(addr.as_ptr(), 0, c"tcp".as_ptr(), &mut client) }, TESSERA_OK);
    let mut t = table_options();
    (t.kind, t.end, t.dim, t.non_finite, t.init_scale, t.init_seed, t.capacity) = (TESSERA_SPARSE, 1 << 40, 2, TESSERA_NON_FINITE_SKIP, 0.5, 7, 4096);
    let mut table = 0;
    // SAFETY: a NUL-terminated name, an initialised definition, a writable handle.
    assert_eq!(unsafe { tessera_create_table_with(client, c"full".as_ptr(), &t, &mut table) }, TESSERA_OK, "{}", last_error());
    let keys = [5u64, 1 << 39];
    let mut fresh = [0f32; 4];
    // SAFETY: two keys and four values; the call waits.
    assert_eq!(unsafe { tessera_pull(client, table, keys.as_ptr(), 2, fresh.as_mut_ptr(), 4, std::ptr::null_mut()) }, TESSERA_OK);
    assert!(fresh.iter().all(|v| v.abs() < 0.5) && fresh.iter().any(|v| *v != 0.0), "uniform initial values: {fresh:?}");
    let grads = [1.0, f32::NAN, 1.0, 1.0];
    let mut after = [0f32; 4];
    // SAFETY: as above.
    unsafe {
        assert_eq!(tessera_push(client, table, keys.as_ptr(), 2, grads.as_ptr(), 4, std::ptr::null_mut()), TESSERA_OK, "{}", last_error());
        assert_eq!(tessera_pull(client, table, keys.as_ptr(), 2, after.as_mut_ptr(), 4, std::ptr::null_mut()), TESSERA_OK);
    }
    assert_eq!(after[1], fresh[1], "the NaN component was skipped");
    assert_eq!(after[0], fresh[0] + 1.0);

    let mut bad = table_options();
    bad.end = 10;
    bad.non_finite = 9;
    // SAFETY: as above.
    assert_eq!(unsafe { tessera_create_table_with(client, c"bad".as_ptr(), &bad, &mut table) }, TESSERA_ERR_ARGUMENT);

    // A significance filter holds small changes back; a KKT filter drops zero weights' small gradients.
    let mut dense = table_options();
    dense.end = 4;
    let (mut d, mut significant, mut kkt) = (0, 0, 0);
    // SAFETY: as above; writable handles.
    unsafe {
        assert_eq!(tessera_create_table_with(client, c"filtered".as_ptr(), &dense, &mut d), TESSERA_OK);
        assert_eq!(tessera_filter_new(client, TESSERA_FILTER_SIGNIFICANT, 0.4, 0, &mut significant), TESSERA_OK);
        assert_eq!(tessera_filter_new(client, TESSERA_FILTER_KKT, 1.0, 0, &mut kkt), TESSERA_OK);
        assert_eq!(tessera_filter_new(client, TESSERA_FILTER_RANDOM_SKIP, 1.5, 0, &mut kkt), TESSERA_ERR_ARGUMENT);
    }
    let (k, small, big, mut out) = ([0u64, 1], [0.25f32, 0.25], [2.0f32, 2.0], [0f32; 2]);
    // SAFETY: two keys and two values each; the calls wait.
    unsafe {
        assert_eq!(tessera_push_filtered(client, d, significant, k.as_ptr(), 2, small.as_ptr(), 2, std::ptr::null_mut()), TESSERA_OK);
        assert_eq!(tessera_push_filtered(client, d, kkt, k.as_ptr(), 2, small.as_ptr(), 2, std::ptr::null_mut()), TESSERA_OK);
        assert_eq!(tessera_filter_observe(client, d, kkt, k.as_ptr(), 2, out.as_ptr(), 2), TESSERA_OK);
        assert_eq!(tessera_push_filtered(client, d, significant, k.as_ptr(), 2, small.as_ptr(), 2, std::ptr::null_mut()), TESSERA_OK);
        assert_eq!(tessera_push_filtered(client, d, kkt, k.as_ptr(), 2, big.as_ptr(), 2, std::ptr::null_mut()), TESSERA_OK);
        assert_eq!(tessera_pull(client, d, k.as_ptr(), 2, out.as_mut_ptr(), 2, std::ptr::null_mut()), TESSERA_OK);
        assert_eq!(tessera_filter_observe(client, d, significant, k.as_ptr(), 2, out.as_ptr(), 2), TESSERA_ERR_ARGUMENT);
    }
    assert_eq!(out, [2.5, 2.5], "0.25 + 0.25 went once they added up; the KKT filter sent only the 2.0");
    assert_eq!(tessera_filter_free(client, significant), TESSERA_OK);
    assert_eq!(tessera_filter_free(client, significant), TESSERA_ERR_CLOSED);
    assert_eq!(tessera_close(client), TESSERA_OK);
}
