//! The data path allocates nothing once warm: a counting allocator watches a server serve
//! thousands of pushes and pulls (dense and sparse, over every shard) through raw transport links.
//! The links themselves do not allocate per message either, so every allocation counted would be
//! the server's.

use tessera_engine::{Server, ServerConfig, UpdaterRegistry};
use tessera_layout::catalog::Catalog;
use tessera_layout::{TableKind, TableSpec};
use tessera_transport::tcp::TcpLink;
use tessera_transport::{Header, Link, Op, Status, TransportConfig, CONTROL_SHARD};

#[global_allocator]
static GLOBAL: tessera_tests::Counting = tessera_tests::Counting;

/// The count is process-wide: the tests here take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn call(link: &mut TcpLink, header: &mut Header, parts: &[&[u8]]) {
    link.send(header, parts, false).unwrap();
    let reply = link.recv(None).unwrap();
    assert_eq!(reply.header.status(), Status::Ok, "{}", String::from_utf8_lossy(reply.body));
}

#[test]
fn serving_pushes_and_pulls_allocates_nothing_once_warm() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    cfg.engine.shards = 2;
    cfg.engine.pin_cores = false;
    let mut dense = TableSpec::new("dense", TableKind::Dense, 0, 1 << 16, 8);
    dense.updater = "adam".into();
    let mut sparse = TableSpec::new("sparse", TableKind::Sparse, 0, u64::MAX, 4);
    sparse.updater = "adagrad".into();
    sparse.capacity = 1 << 14;
    cfg.tables = vec![dense, sparse];
    let server = Server::start(cfg, UpdaterRegistry::new()).unwrap();
    let addr = server.local_addr().to_string();
    let tcfg = TransportConfig::default();
    let (mut control, _) = TcpLink::connect(&addr, CONTROL_SHARD, 0, &tcfg).unwrap();
    let mut h = Header::request(Op::Catalog, 1);
    control.send(&mut h, &[], false).unwrap();
    let catalog: Catalog = serde_json::from_slice(control.recv(None).unwrap().body).unwrap();
    let mut links: Vec<TcpLink> = (0..2).map(|s| TcpLink::connect(&addr, s, 0, &tcfg).unwrap().0).collect();

    let grads = vec![0.5f32; 256 * 8];
    // Everything the rounds send is built here, so that the loop itself allocates nothing.
    let plans: Vec<(u32, usize, bool, u64, usize, Vec<u64>)> = catalog
        .tables
        .iter()
        .flat_map(|t| {
            t.parts.iter().map(move |p| {
                let keys = (0..64).map(|i| p.start + i * 97 % (p.end - p.start)).collect();
                (t.id, t.spec.dim as usize, t.spec.kind == TableKind::Dense, p.start, p.shard as usize, keys)
            })
        })
        .collect();
    let round = |links: &mut [TcpLink], clock: u64| {
        for (table, dim, dense, start, shard, keys) in &plans {
            let link = &mut links[*shard];
            let key_bytes: &[u8] = zerocopy::IntoBytes::as_bytes(&keys[..]);
            let values: &[u8] = zerocopy::IntoBytes::as_bytes(&grads[..keys.len() * dim]);
            for op in [Op::Push, Op::Pull] {
                let mut h = Header::request(op, clock);
                (h.table, h.dim, h.count, h.clock) = (*table, *dim as u32, keys.len() as u32, clock);
                let with_values = [key_bytes, values];
                call(link, &mut h, if op == Op::Push { &with_values } else { &with_values[..1] });
            }
            if *dense {
                for op in [Op::PushRange, Op::PullRange] {
                    let mut h = Header::request(op, clock);
                    (h.table, h.dim, h.count, h.start, h.clock) = (*table, *dim as u32, 256, *start, clock);
                    let body: &[u8] = if op == Op::PushRange { zerocopy::IntoBytes::as_bytes(&grads[..]) } else { &[] };
                    call(link, &mut h, &[body]);
                }
            }
        }
    };
    for clock in 1..=50 {
        round(&mut links, clock);
    }
    let before = tessera_tests::allocations();
    let rounds = 500;
    for clock in 51..51 + rounds {
        round(&mut links, clock);
    }
    let counted = tessera_tests::allocations() - before;
    let messages = rounds * 12 * 2;
    assert_eq!(counted, 0, "{counted} allocations while serving {messages} requests and replies once warm");
    drop(server);
}

/// The client allocates nothing per call either, once warm: range and key-list pushes and pulls
/// at a clock that advances every round, so every reply carries a stamp (in-process server, TCP).
#[test]
fn a_warm_client_allocates_nothing_per_call() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    (cfg.engine.shards, cfg.engine.pin_cores) = (2, false);
    let mut sparse = TableSpec::new("sparse", TableKind::Sparse, 0, u64::MAX, 4);
    sparse.capacity = 1 << 14;
    cfg.tables = vec![TableSpec::new("dense", TableKind::Dense, 0, 1 << 16, 8), sparse];
    let server = Server::start(cfg, UpdaterRegistry::new()).unwrap();
    let config = tessera_client::ClientConfig::worker(3);
    let rounds = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(300);
    let counted = tessera_tests::client_round_allocations(&server.local_addr().to_string(), config, "dense", "sparse", rounds);
    assert_eq!(counted, 0, "{counted} allocations in {rounds} rounds of 4 client calls once warm");
}

/// A coordinator (a process) for one server that runs every range as a chain of one, with
/// heartbeats far apart (see [`tessera_tests::cluster_round_allocations`]); and its address.
fn chain_of_one_coordinator() -> (tessera_tests::ServerProc, String) {
    let addr = format!("127.0.0.1:{}", tessera_tests::free_port());
    let args = ["--servers", "1", "--replicas", "1", "--ranges", "4", "--workers", "4", "--heartbeat-interval-ms", "1000", "--failure-timeout-ms", "10000"];
    (tessera_tests::ServerProc::coordinator_at(&addr, &args), addr)
}

/// Makes the two tables the client rounds use on the cluster `addr` belongs to.
fn make_round_tables(addr: &str, config: &tessera_client::ClientConfig) {
    let client = tessera_client::Client::connect(&[addr], config.clone()).expect("connect");
    let mut sparse = TableSpec::new("sparse", TableKind::Sparse, 0, u64::MAX, 4);
    sparse.capacity = 1 << 14;
    client.create_table(&TableSpec::new("dense", TableKind::Dense, 0, 1 << 16, 8)).expect("dense table");
    client.create_table(&sparse).expect("sparse table");
}

/// A warm client allocates nothing per call on a chain of one either: the same rounds against a
/// server (a process) that runs every range as a chain of one, so pushes go through the chain
/// client's pipeline and are acknowledged by the range's only member.
#[test]
fn a_warm_client_allocates_nothing_per_call_on_a_chain_of_one() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (_coordinator, coordinator) = chain_of_one_coordinator();
    let server = tessera_tests::ServerProc::start(&["--node-id", "1", "--shards", "2", "--no-pin", "--coordinator", &coordinator]);
    let mut config = tessera_client::ClientConfig::worker(3);
    config.kind = tessera_transport::TransportKind::Tcp;
    make_round_tables(server.addr(), &config);
    let counted = tessera_tests::cluster_round_allocations(server.addr(), config.clone(), 50, 10, 50);
    assert_eq!(counted, 0, "{counted} allocations in the quietest of 10 windows of 50 rounds of 4 client calls on a chain of one, once warm");
    // With key-list caching, listed pushes and pulls go by their lists' hashes (another worker,
    // whose clocks start over).
    (config.worker, config.key_cache_keys) = (2, 1 << 16);
    let counted = tessera_tests::cluster_round_allocations(server.addr(), config, 50, 10, 50);
    assert_eq!(counted, 0, "{counted} allocations in the quietest window with key-list caching");
}

/// A server that runs every range as a chain of one allocates nothing per push or pull once
/// warm either (its ranges' histories full, their buffers then reused), client and server in
/// this process.
#[test]
fn a_chain_of_one_serves_pushes_and_pulls_without_allocating_once_warm() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (_coordinator, coordinator) = chain_of_one_coordinator();
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    (cfg.engine.shards, cfg.engine.pin_cores) = (2, false);
    cfg.replication = Some(tessera_engine::server::Join { node: 1, coordinator: tessera_engine::chain::Locator::At(coordinator), advertise: None });
    let server = Server::start(cfg, UpdaterRegistry::new()).unwrap();
    let addr = server.local_addr().to_string();
    let mut config = tessera_client::ClientConfig::worker(3);
    config.kind = tessera_transport::TransportKind::Tcp;
    make_round_tables(&addr, &config);
    // Each round's two pushes are two updates of range 0: its history (1,024 updates) is full
    // after 512 rounds.
    let counted = tessera_tests::cluster_round_allocations(&addr, config, 600, 10, 50);
    assert_eq!(counted, 0, "{counted} allocations in the quietest of 10 windows of 50 rounds of 4 calls to a chain of one, once warm");
    drop(server);
}
