//! Over RDMA too, the data path allocates nothing once warm (and so registers nothing): a counting
//! allocator watches a server serve pushes and pulls from RDMA links in the same process, the
//! link send range pushes straight from a registered buffer, and read dense blocks one-sided. Runs in
//! the SoftRoCE guest (see tests/rdma.rs for how).

#![cfg(feature = "rdma")]

use std::sync::Arc;

use tessera_engine::{Server, ServerConfig, UpdaterRegistry};
use tessera_layout::catalog::Catalog;
use tessera_layout::{TableKind, TableSpec};
use tessera_transport::rdma::RdmaLink;
use tessera_transport::{Header, Link, OneSided, Op, RdmaConfig, Status, TransportConfig, TransportKind, CONTROL_SHARD};

#[global_allocator]
static GLOBAL: tessera_tests::Counting = tessera_tests::Counting;

/// The count is process-wide: the tests here take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn call(link: &mut dyn Link, header: &mut Header, parts: &[&[u8]]) {
    link.send(header, parts, false).unwrap();
    let reply = link.recv(None).unwrap();
    assert_eq!(reply.header.status(), Status::Ok, "{}", String::from_utf8_lossy(reply.body));
}

/// For test `test`, unless there is no RDMA device here: this test's turn, an in-process server
/// over RDMA with `shards` shards and the tables both tests use, "dense" (4,096 keys of dim 8)
/// and "sparse" (dim 4, Adagrad), and the slot configuration it serves.
fn rdma_server(test: &str, shards: u16) -> Option<(std::sync::MutexGuard<'static, ()>, Server, RdmaConfig)> {
    if !tessera_tests::rdma_here(test) {
        return None;
    }
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let rdma = RdmaConfig { slots: 8, slot_bytes: 64 << 10, spin_us: 20, ..RdmaConfig::default() };
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    (cfg.engine.shards, cfg.engine.pin_cores, cfg.transport_kind, cfg.rdma) = (shards, false, TransportKind::Rdma, rdma.clone());
    let mut sparse = TableSpec::new("sparse", TableKind::Sparse, 0, u64::MAX, 4);
    sparse.updater = "adagrad".into();
    sparse.capacity = 1 << 14;
    cfg.tables = vec![TableSpec::new("dense", TableKind::Dense, 0, 4096, 8), sparse];
    Some((turn, Server::start(cfg, UpdaterRegistry::new()).unwrap(), rdma))
}

#[test]
fn serving_over_rdma_allocates_nothing_once_warm() {
    let Some((_turn, server, rdma)) = rdma_server("serving_over_rdma_allocates_nothing_once_warm", 1) else { return };
    let addr = server.local_addr().to_string();
    let tcfg = TransportConfig::default();
    let dev = match tessera_transport::select::choose(TransportKind::Rdma, &rdma).unwrap() {
        tessera_transport::Chosen::Rdma(dev) => dev,
        other => panic!("expected RDMA, got {other:?}"),
    };
    let (mut control, _) = tessera_transport::tcp::TcpLink::connect(&addr, CONTROL_SHARD, 0, &tcfg).unwrap();
    let mut h = Header::request(Op::Catalog, 1);
    control.send(&mut h, &[], false).unwrap();
    let catalog: Catalog = serde_json::from_slice(control.recv(None).unwrap().body).unwrap();
    let (mut link, _) = RdmaLink::connect(&addr, 0, 0, &tcfg, &rdma, Arc::clone(&dev)).unwrap();
    let keys: Vec<u64> = (0..64).map(|i| i * 61).collect();
    let grads = vec![0.25f32; 256 * 8];
    let key_bytes: &[u8] = zerocopy::IntoBytes::as_bytes(&keys[..]);
    let mut out = vec![0f32; 256 * 8];
    let mut stamp = Vec::new();
    let mut registered = tessera_transport::PushBuffer::new(256 * 8, &tessera_transport::Chosen::Rdma(Arc::clone(&dev))).unwrap();
    registered.as_mut_slice().fill(0.5);
    let mut round = |link: &mut RdmaLink, clock: u64| {
        for t in &catalog.tables {
            let dim = t.spec.dim;
            let values = f32_bytes(&grads[..keys.len() * dim as usize]);
            for op in [Op::Push, Op::Pull] {
                let mut h = Header::request(op, clock);
                (h.table, h.dim, h.count, h.clock) = (t.id, dim, keys.len() as u32, clock);
                let parts = [key_bytes, values];
                call(link, &mut h, if op == Op::Push { &parts } else { &parts[..1] });
            }
        }
        let mut h = Header::request(Op::PullRange, clock);
        (h.table, h.dim, h.count, h.start) = (0, 8, 256, 0);
        call(link, &mut h, &[]);
        // A range push gathered straight from a registered buffer (8 KiB: no copy).
        let mut h = Header::request(Op::PushRange, clock);
        (h.table, h.dim, h.count, h.start) = (0, 8, 256, 0);
        link.send_from(&mut h, f32_bytes(registered.as_slice()), &registered).unwrap();
        link.settle().unwrap();
        assert_eq!(link.recv(None).unwrap().header.status(), Status::Ok);
        // The same range, one-sided: straight from the shard's registered blocks.
        assert!(link.read_dense(0, 0, 8, &mut out[..], &mut stamp).unwrap(), "dense tables are readable directly");
    };
    for clock in 1..=50 {
        round(&mut link, clock);
    }
    let before = tessera_tests::allocations();
    for clock in 51..551 {
        round(&mut link, clock);
    }
    let counted = tessera_tests::allocations() - before;
    assert_eq!(counted, 0, "{counted} allocations while serving 3,000 RDMA requests (500 gathered from a registered buffer) and 500 one-sided reads once warm");
    drop(link);
    drop(server);
}

/// A warm client over RDMA allocates nothing per call either: range pushes into the shard's
/// slots, one-sided range pulls, key-list pushes and pulls, at a clock that advances every round
/// (so every reply carries a stamp).
#[test]
fn a_warm_rdma_client_allocates_nothing_per_call() {
    let Some((_turn, server, rdma)) = rdma_server("a_warm_rdma_client_allocates_nothing_per_call", 2) else { return };
    let mut config = tessera_client::ClientConfig::worker(2);
    (config.kind, config.rdma) = (TransportKind::Rdma, rdma);
    let counted = tessera_tests::client_round_allocations(&server.local_addr().to_string(), config, "dense", "sparse", 300);
    assert_eq!(counted, 0, "{counted} allocations in 300 rounds of 4 client calls over RDMA once warm");
    drop(server);
}

fn f32_bytes(values: &[f32]) -> &[u8] {
    zerocopy::IntoBytes::as_bytes(values)
}
