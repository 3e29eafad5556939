//! Over RDMA too, the data path allocates nothing once warm (and so registers nothing): a counting
//! allocator watches a client and a server in the same process push and pull over RDMA links,
//! dense blocks read one-sided. Runs in the SoftRoCE guest (see tests/rdma.rs for how).

#![cfg(feature = "rdma")]

use tessera_engine::{Server, ServerConfig, UpdaterRegistry};
use tessera_layout::{TableKind, TableSpec};
use tessera_transport::{RdmaConfig, TransportKind};

#[global_allocator]
static GLOBAL: tessera_tests::Counting = tessera_tests::Counting;

/// The count is process-wide: the tests here take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

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

/// A warm client over RDMA, and the standalone server it calls in this process, allocate
/// nothing per call: range pushes into the shard's slots, one-sided range pulls (straight from
/// the shard's registered blocks), key-list pushes and pulls, at a clock that advances every
/// round (so every reply carries a stamp). The server's ranges keep a history of their updates,
/// which allocates until it is full: the quietest of several windows is counted.
#[test]
fn a_warm_rdma_client_and_its_server_allocate_nothing_per_call() {
    let Some((_turn, server, rdma)) = rdma_server("a_warm_rdma_client_and_its_server_allocate_nothing_per_call", 2) else { return };
    let mut config = tessera_client::ClientConfig::worker(2);
    (config.kind, config.rdma) = (TransportKind::Rdma, rdma);
    let counted = tessera_tests::cluster_round_allocations(&server.local_addr().to_string(), config, 600, 10, 50);
    assert_eq!(counted, 0, "{counted} allocations in the quietest of 10 windows of 50 rounds of 4 client calls over RDMA once warm");
    drop(server);
}
