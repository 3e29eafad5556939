//! The RDMA transport on real verbs. These tests need an RDMA device: run them in the SoftRoCE
//! guest (`tests/softroce/run.sh`, which `tests/run.sh` does) or on a host with rxe or an HCA
//! (`RDMA_DEV=mlx5_0 RDMA_GID_INDEX=3 cargo test -p tessera-tests --features rdma --test rdma`).
//! Under the harness (`SOFTROCE_VM`) or with `RDMA_DEV` set, a missing device fails them; on a
//! plain host they say they did not run.

#![cfg(feature = "rdma")]

use std::time::Duration;

use tessera_client::{Client, ClientConfig, Table};
use tessera_engine::{Server, ServerConfig, UpdaterRegistry};
use tessera_layout::{TableKind, TableSpec};
use tessera_transport::{Arrival, RdmaConfig, TransportKind};

fn server(shards: u16, kind: TransportKind, rdma: RdmaConfig) -> Server {
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    cfg.engine.shards = shards;
    cfg.engine.pin_cores = false;
    cfg.transport_kind = kind;
    cfg.rdma = rdma;
    Server::start(cfg, UpdaterRegistry::new()).expect("server")
}

fn client(server: &Server, worker: u32, kind: TransportKind, rdma: RdmaConfig) -> Client {
    let cfg = ClientConfig { kind, rdma, ..ClientConfig::worker(worker) };
    Client::connect(&[&server.local_addr().to_string()], cfg).expect("client")
}

/// Dense pulls the shards served with their own CPU (one-sided reads do not count), summed.
fn served_pulls(c: &Client, table: &Table) -> u64 {
    let catalogs = c.catalogs().unwrap();
    let id = catalogs[0].iter().find(|t| t.spec.name == table.spec().name).unwrap().id;
    let mut pulls = 0;
    for server in c.status().unwrap() {
        for shard in server["shards"].as_array().unwrap() {
            for t in shard["tables"].as_array().unwrap() {
                if t["table"].as_u64() == Some(u64::from(id)) {
                    pulls += t["pulls"].as_u64().unwrap();
                }
            }
        }
    }
    pulls
}

fn fast() -> RdmaConfig {
    RdmaConfig { slots: 8, slot_bytes: 64 << 10, spin_us: 20, ..RdmaConfig::default() }
}

/// A deterministic workload: dense ranges across shard boundaries and sparse keys over the whole
/// key space, with integer-valued gradients so that sums are exact in any order.
fn workload(c: &Client, dense: &Table, sparse: &Table, round: u64) {
    let dim = dense.dim();
    let grads: Vec<f32> = (0..3000 * dim).map(|i| ((i as u64 * 7 + round) % 5) as f32).collect();
    c.push_range(dense, 500, &grads).unwrap().wait().unwrap();
    let keys: Vec<u64> = (0..500u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round).collect();
    let sg: Vec<f32> = (0..keys.len() * sparse.dim()).map(|i| (i % 3) as f32 + 1.0).collect();
    c.push(sparse, &keys, &sg).unwrap().wait().unwrap();
}

fn snapshot(c: &Client, dense: &Table, sparse: &Table, rounds: u64) -> (Vec<f32>, Vec<f32>) {
    let mut d = vec![0f32; 4096 * dense.dim()];
    c.pull_range(dense, 0, &mut d).unwrap().wait().unwrap();
    let keys: Vec<u64> = (0..rounds).flat_map(|r| (0..500u64).map(move |i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ r)).collect();
    let mut s = vec![0f32; keys.len() * sparse.dim()];
    c.pull(sparse, &keys, &mut s).unwrap().wait().unwrap();
    (d, s)
}

fn tables(c: &Client, tag: &str) -> (Table, Table) {
    let dense = c.create_table(&TableSpec::new(&format!("dense-{tag}"), TableKind::Dense, 0, 4096, 4)).unwrap();
    let sparse = c.create_table(&TableSpec::new(&format!("sparse-{tag}"), TableKind::Sparse, 0, u64::MAX, 2)).unwrap();
    (dense, sparse)
}

#[test]
fn rdma_and_tcp_give_bit_identical_sums() {
    if !tessera_tests::rdma_here("rdma_and_tcp_give_bit_identical_sums") {
        return;
    }
    let server = server(3, TransportKind::Rdma, fast());
    let over_rdma = client(&server, 0, TransportKind::Rdma, fast());
    let over_tcp = client(&server, 1, TransportKind::Tcp, fast());
    let (rd, rs) = tables(&over_rdma, "r");
    let (td, ts) = tables(&over_tcp, "t");
    for round in 0..20 {
        workload(&over_rdma, &rd, &rs, round);
        workload(&over_tcp, &td, &ts, round);
    }
    let a = snapshot(&over_rdma, &rd, &rs, 20);
    let b = snapshot(&over_tcp, &td, &ts, 20);
    assert!(a.0.iter().any(|v| *v != 0.0), "the workload pushed something");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.0), bits(&b.0), "dense values differ between RDMA and TCP");
    assert_eq!(bits(&a.1), bits(&b.1), "sparse values differ between RDMA and TCP");
    // Pipelined over RDMA: more tickets in flight than slots, waited in reverse order.
    let mut outs = vec![vec![0f32; 64 * 4]; 40];
    let tickets: Vec<_> = outs.iter_mut().enumerate().map(|(i, o)| over_rdma.pull_range(&rd, (i * 64) as u64, o).unwrap()).collect();
    for t in tickets.into_iter().rev() {
        t.wait().unwrap();
    }
    let flat: Vec<f32> = outs.concat();
    assert_eq!(bits(&flat), bits(&a.0[..flat.len()]), "pipelined pulls over RDMA see the same values");
}

/// Each side may find arriving frames by their tags or by their completions
/// (`RdmaConfig::arrival`), independently of the other: every pairing gives the sums TCP gives.
#[test]
fn every_pairing_of_arrival_modes_gives_the_sums_tcp_gives() {
    if !tessera_tests::rdma_here("every_pairing_of_arrival_modes_gives_the_sums_tcp_gives") {
        return;
    }
    let with = |arrival| RdmaConfig { arrival, ..fast() };
    let (memory, completion) = (Arrival::Memory, Arrival::Completion);
    let mut sums = Vec::new();
    for (shard_side, worker_side) in [(memory, memory), (memory, completion), (completion, memory), (completion, completion)] {
        let server = server(2, TransportKind::Rdma, with(shard_side));
        let over_rdma = client(&server, 0, TransportKind::Rdma, with(worker_side));
        let over_tcp = client(&server, 1, TransportKind::Tcp, fast());
        let (rd, rs) = tables(&over_rdma, "r");
        let (td, ts) = tables(&over_tcp, "t");
        for round in 0..5 {
            workload(&over_rdma, &rd, &rs, round);
            workload(&over_tcp, &td, &ts, round);
        }
        let (a, b) = (snapshot(&over_rdma, &rd, &rs, 5), snapshot(&over_tcp, &td, &ts, 5));
        assert_eq!(a, b, "shard {shard_side:?}, worker {worker_side:?}: RDMA and TCP differ");
        sums.push(a);
    }
    assert!(sums.windows(2).all(|w| w[0] == w[1]), "the pairings disagree");
}

/// A ping (`tessera bench`'s transport-only row) goes through RDMA slots as a push does, is
/// answered, and changes no table.
#[test]
fn a_ping_crosses_rdma_and_tcp_and_changes_nothing() {
    if !tessera_tests::rdma_here("a_ping_crosses_rdma_and_tcp_and_changes_nothing") {
        return;
    }
    let server = server(1, TransportKind::Rdma, fast());
    for (worker, kind) in [(0, TransportKind::Rdma), (1, TransportKind::Tcp)] {
        let c = client(&server, worker, kind, fast());
        assert_eq!(c.transport(), kind.to_string());
        let (dense, sparse) = tables(&c, &format!("ping{worker}"));
        workload(&c, &dense, &sparse, 0);
        let before = snapshot(&c, &dense, &sparse, 1);
        let received = c.bytes().1;
        for _ in 0..200 {
            c.ping().expect("a ping is answered");
        }
        assert!(c.bytes().1 > received, "the pings' replies came back");
        assert_eq!(snapshot(&c, &dense, &sparse, 1), before, "a ping changed a table");
    }
}

#[test]
fn key_lists_by_hash_and_bounded_delay_pushes_give_the_same_sums_over_rdma_and_tcp() {
    if !tessera_tests::rdma_here("key_lists_by_hash_and_bounded_delay_pushes_give_the_same_sums_over_rdma_and_tcp") {
        return;
    }
    // The wire-saving and consistency flags ride in short RDMA headers too: the same calls give
    // the same bits over both transports, and the repeated key lists went by hash on both.
    let server = server(2, TransportKind::Rdma, fast());
    let mut results = Vec::new();
    for (name, kind) in [("rdma", TransportKind::Rdma), ("tcp", TransportKind::Tcp)] {
        // Worker 0 on each, with a table of its own: a job of one worker, so bounded delay waits
        // for this worker's own pushes.
        let cfg = ClientConfig { kind, rdma: fast(), key_cache_keys: 4096, workers: 1, ..ClientConfig::worker(0) };
        let c = Client::connect(&[&server.local_addr().to_string()], cfg).expect("client");
        assert_eq!(c.transport(), kind.to_string());
        let table = c
            .create_table(&TableSpec::new(&format!("cached-{name}"), TableKind::Sparse, 0, u64::MAX, 2))
            .unwrap()
            .with_consistency(tessera_client::Consistency::BoundedDelay(0));
        let keys: Vec<u64> = (0..300u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let mut out = vec![0f32; keys.len() * 2];
        for t in 1..=5u64 {
            c.set_clock(t);
            let grads: Vec<f32> = (0..keys.len() * 2).map(|i| ((i as u64 + t) % 7) as f32).collect();
            c.push(&table, &keys, &grads).unwrap().wait().unwrap();
            let stamp = c.pull(&table, &keys, &mut out).unwrap().wait().unwrap();
            assert_eq!(stamp.get(0), t, "{kind}: the pull sees this worker's push at clock {t}: {stamp:?}");
        }
        let (by_hash, missed) = c.key_lists_by_hash();
        assert!(by_hash >= 9 && missed == 0, "{kind}: {by_hash} lists by hash, {missed} missed");
        results.push(out);
    }
    assert_eq!(results[0], results[1], "RDMA and TCP disagree");
}

#[test]
fn many_workers_on_many_shards_at_once() {
    if !tessera_tests::rdma_here("many_workers_on_many_shards_at_once") {
        return;
    }
    let server = server(3, TransportKind::Rdma, fast());
    let workers: Vec<Client> = (0..4).map(|w| client(&server, w, TransportKind::Rdma, fast())).collect();
    let table = workers[0].create_table(&TableSpec::new("shared", TableKind::Dense, 0, 3000, 8)).unwrap();
    std::thread::scope(|s| {
        for (w, c) in workers.iter().enumerate() {
            let table = c.table(table.spec().name.as_str()).unwrap();
            s.spawn(move || {
                for round in 0..30u64 {
                    c.set_clock(round + 1);
                    let g = vec![(w + 1) as f32; 3000 * 8];
                    // Keep a few pushes in flight, as a training worker does.
                    let t = c.push_range(&table, 0, &g).unwrap();
                    let u = c.push(&table, &[7, 1500, 2999], &[1.0; 24]).unwrap();
                    t.wait().unwrap();
                    u.wait().unwrap();
                }
            });
        }
    });
    let mut out = vec![0f32; 3000 * 8];
    let stamp = workers[0].pull_range(&table, 0, &mut out).unwrap().wait().unwrap();
    let per_round: f32 = (1..=4).map(|w| w as f32).sum();
    for (i, v) in out.iter().enumerate() {
        let key = i / 8;
        let extra = if [7, 1500, 2999].contains(&key) { 4.0 * 30.0 } else { 0.0 };
        assert_eq!(*v, per_round * 30.0 + extra, "key {key}");
    }
    assert_eq!(stamp.clocks(), &[30, 30, 30, 30], "every worker's last clock reached every key");
}

#[test]
fn a_worker_that_vanishes_mid_push_leaves_the_server_healthy() {
    if !tessera_tests::rdma_here("a_worker_that_vanishes_mid_push_leaves_the_server_healthy") {
        return;
    }
    let server = server(2, TransportKind::Rdma, fast());
    let steady = client(&server, 0, TransportKind::Rdma, fast());
    let table = steady.create_table(&TableSpec::new("v", TableKind::Dense, 0, 1000, 16)).unwrap();
    let connections = |c: &Client| -> u64 {
        let status = c.status().unwrap();
        status[0]["shards"].as_array().unwrap().iter().map(|s| s["connections"].as_u64().unwrap()).sum()
    };
    // The steady worker's own links are made by its first calls.
    steady.push_range(&table, 0, &vec![0.0; 1000 * 16]).unwrap().wait().unwrap();
    steady.pull_range(&table, 0, &mut vec![0f32; 1000 * 16]).unwrap().wait().unwrap();
    let baseline = connections(&steady);
    for round in 0..5 {
        let doomed = client(&server, 1, TransportKind::Rdma, fast());
        let t = doomed.table("v").unwrap();
        // Fill every slot with pushes and vanish without waiting for any of them.
        for _ in 0..20 {
            std::mem::forget(doomed.push_range(&t, 0, &vec![1.0; 1000 * 16]).unwrap());
        }
        drop(doomed);
        steady.push_range(&table, 0, &vec![1.0; 1000 * 16]).unwrap().wait().unwrap();
        let _ = round;
    }
    // The server released every vanished worker's queue pair and rings, and still serves.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while connections(&steady) > baseline && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(connections(&steady), baseline, "connections of vanished workers were reclaimed");
    let mut out = vec![0f32; 1000 * 16];
    steady.pull_range(&table, 0, &mut out).unwrap().wait().unwrap();
    // Each of the steady worker's 5 pushes landed; a vanished worker's pushes may or may not have.
    assert!(out.iter().all(|v| *v >= 5.0 && *v <= 5.0 + 100.0 && v.fract() == 0.0), "{:?}", &out[..4]);
}

/// Pushes from a push buffer (`push_range_from`) in frames of up to 1 MiB (3-value keys leave
/// bodies that need padding): the sums must equal the same pushes copied over TCP. The client
/// copies the buffer when the call is made, so the test overwrites it the moment each call
/// returns, with many tickets in flight.
#[test]
fn pushes_from_a_push_buffer_match_copied_ones_and_free_the_buffer_on_return() {
    if !tessera_tests::rdma_here("pushes_from_a_push_buffer_match_copied_ones_and_free_the_buffer_on_return") {
        return;
    }
    // Frames of up to 1 MiB: more packets than rxe sends before it waits for acknowledgements,
    // so the device is still reading a frame's body when the post returns.
    let big = RdmaConfig { slots: 4, slot_bytes: 1 << 20, ..fast() };
    let server = server(3, TransportKind::Rdma, big.clone());
    let over_rdma = client(&server, 0, TransportKind::Rdma, big);
    let over_tcp = client(&server, 1, TransportKind::Tcp, fast());
    let spec = |name: &str| TableSpec::new(name, TableKind::Dense, 0, 400_000, 3);
    let (r, t) = (over_rdma.create_table(&spec("zc-rdma")).unwrap(), over_tcp.create_table(&spec("zc-tcp")).unwrap());
    // 300,001 keys from key 123: about 3.6 MB, split into 1 MiB frames across the three shards.
    let len = 300_001 * 3;
    let mut buf = over_rdma.push_buffer(len);
    let values = |round: usize| (0..len).map(move |i| ((i * 13 + round) % 7) as f32);
    let mut tickets = Vec::new();
    for round in 0..12 {
        buf.as_mut_slice().iter_mut().zip(values(round)).for_each(|(b, v)| *b = v);
        tickets.push(over_rdma.push_range_from(&r, 123, &buf).unwrap());
        let copied: Vec<f32> = values(round).collect();
        over_tcp.push_range(&t, 123, &copied).unwrap().wait().unwrap();
    }
    buf.as_mut_slice().fill(1e9);
    for ticket in tickets {
        ticket.wait().unwrap();
    }
    // A small push: the buffer may be reused at once all the same.
    let mut small = over_rdma.push_buffer(9);
    small.as_mut_slice().fill(2.0);
    let ticket = over_rdma.push_range_from(&r, 5, &small).unwrap();
    small.as_mut_slice().fill(1e9);
    ticket.wait().unwrap();
    over_tcp.push_range(&t, 5, &[2.0; 9]).unwrap().wait().unwrap();
    let pull = |c: &Client, table: &Table| {
        let mut out = vec![0f32; 400_000 * 3];
        c.pull_range(table, 0, &mut out).unwrap().wait().unwrap();
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let (a, b) = (pull(&over_rdma, &r), pull(&over_tcp, &t));
    assert!(a.iter().any(|&v| v != 0), "the pushes landed");
    assert_eq!(a, b, "pushes from a push buffer and copied pushes give the same sums");
}

#[test]
fn memory_split_into_small_regions_still_gives_correct_results() {
    if !tessera_tests::rdma_here("memory_split_into_small_regions_still_gives_correct_results") {
        return;
    }
    // Every region is registered in 16 KiB memory regions: each slot is its own region.
    let small = RdmaConfig { mr_bytes_max: Some(16 << 10), slot_bytes: 16 << 10, slots: 8, ..fast() };
    let server = server(2, TransportKind::Rdma, small.clone());
    let c = client(&server, 0, TransportKind::Rdma, small);
    let table = c.create_table(&TableSpec::new("split", TableKind::Dense, 0, 20_000, 2)).unwrap();
    let grads: Vec<f32> = (0..20_000 * 2).map(|i| (i % 11) as f32).collect();
    // 160 KB of values: split by the client into 16 KiB frames, across both shards.
    c.push_range(&table, 0, &grads).unwrap().wait().unwrap();
    let mut out = vec![0f32; grads.len()];
    c.pull_range(&table, 0, &mut out).unwrap().wait().unwrap();
    assert_eq!(out, grads);
    assert_eq!(served_pulls(&c, &table), 0, "the pull was read one-sided, across 16 KiB regions");
    // The same from a push buffer: the sums double.
    let mut buf = c.push_buffer(grads.len());
    buf.as_mut_slice().copy_from_slice(&grads);
    c.push_range_from(&table, 0, &buf).unwrap().wait().unwrap();
    c.pull_range(&table, 0, &mut out).unwrap().wait().unwrap();
    assert_eq!(out, grads.iter().map(|g| 2.0 * g).collect::<Vec<_>>());
}

#[test]
fn torn_reads_are_caught_and_read_again_under_concurrent_pushes() {
    if !tessera_tests::rdma_here("torn_reads_are_caught_and_read_again_under_concurrent_pushes") {
        return;
    }
    // Large blocks keep each one changing for long enough that reads overlap the changes.
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    cfg.engine.shards = 1;
    cfg.engine.pin_cores = false;
    cfg.engine.dense_block_bytes = 64 << 10;
    cfg.transport_kind = TransportKind::Rdma;
    cfg.rdma = RdmaConfig { slot_bytes: 1 << 20, ..fast() };
    let server = Server::start(cfg, UpdaterRegistry::new()).expect("server");
    let rdma = RdmaConfig { slot_bytes: 1 << 20, ..fast() };
    let pusher = client(&server, 0, TransportKind::Rdma, rdma.clone());
    let reader = client(&server, 1, TransportKind::Rdma, rdma);
    // Each push must reach the shard as one frame: a push the client splits across slots is
    // applied as two, and a read between them sees a block half new, half old, whole and right.
    const KEYS: usize = 1 << 17;
    let table = pusher.create_table(&TableSpec::new("torn", TableKind::Dense, 0, KEYS as u64, 1)).unwrap();
    let rt = reader.table("torn").unwrap();
    let (reads, pushes) = push_and_read_until_torn(&pusher, &table, &reader, &rt, KEYS, (64 << 10) / 4);
    eprintln!("{reads} reads against {pushes} pushes; {} torn block copies read again", reader.torn_reads());
    assert_eq!(served_pulls(&reader, &rt), 0, "every pull was one-sided");
}

/// Pushes 1 to every one of `keys` dense keys from `pusher`, push after push, while `reader`
/// pulls them all one-sidedly until a copy was torn (and read again) and 20 pulls were
/// checked: every block of `block_values` values holds one push count throughout, values
/// never go back, and the stamp is a lower bound of them. Returns (pulls, pushes).
fn push_and_read_until_torn(pusher: &Client, table: &Table, reader: &Client, read: &Table, keys: usize, block_values: usize) -> (u64, u64) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        // However the reader ends (a failed assertion too), the pusher stops, so the scope ends.
        let _stop_on_exit = StopOnDrop(&stop);
        let pushing = s.spawn(|| {
            // Every push adds 1 to every key: a whole block holds one value throughout.
            let ones = vec![1f32; keys];
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                pusher.set_clock(round);
                pusher.push_range(table, 0, &ones).unwrap().wait().unwrap();
            }
            round
        });
        let mut out = vec![0f32; keys];
        let mut before = vec![0f32; keys];
        let mut reads = 0;
        while reader.torn_reads() == 0 || reads < 20 {
            assert!(started.elapsed() < Duration::from_secs(180), "no torn read in 3 minutes of overlapping pushes and reads ({reads} reads)");
            let stamp = reader.pull_range(read, 0, &mut out).unwrap().wait().unwrap();
            reads += 1;
            for (b, block) in out.chunks(block_values).enumerate() {
                assert!(block.iter().all(|v| *v == block[0]), "read {reads}: block {b} mixes two pushes: {:?}", (block[0], block.last()));
            }
            assert!(out.iter().zip(&before).all(|(now, then)| now >= then), "values never go back");
            let least = out.iter().copied().fold(f32::INFINITY, f32::min);
            assert!(least >= stamp.get(0) as f32, "the stamp {stamp:?} is a lower bound of the values (least {least})");
            std::mem::swap(&mut out, &mut before);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (reads, pushing.join().unwrap())
    })
}

#[test]
fn the_demo_trains_over_rdma_as_well_as_over_tcp() {
    if !tessera_tests::rdma_here("the_demo_trains_over_rdma_as_well_as_over_tcp") {
        return;
    }
    let args = ["demo", "--transport", "rdma", "--features", "100000", "--examples", "20000", "--json", "--rdma-spin-us", "200"];
    let out = tessera_tests::run_tool(&args, Duration::from_secs(300));
    assert!(out.status.success(), "demo over RDMA failed: {}", out.stderr);
    let summary: serde_json::Value = serde_json::from_str(&out.stdout).expect("a JSON summary");
    let (acc, truth) = (summary["accuracy"].as_f64().unwrap(), summary["true_model_accuracy"].as_f64().unwrap());
    assert!(acc >= truth - 0.03, "over RDMA: accuracy {acc} vs the true model's {truth}");
    assert!(!out.stderr.contains("using TCP"), "the demo fell back to TCP: {}", out.stderr);
}

/// A replicated cluster over RDMA, as processes: the embedded coordinator (two replicas of four
/// ranges, two workers) and `servers` servers of one shard each, holding one dense table.
struct ChainCluster {
    addrs: Vec<String>,
    servers: Vec<tessera_tests::ServerProc>,
    _coordinator: tessera_tests::ServerProc,
    _dir: tessera_tests::ScratchDir,
}

impl ChainCluster {
    /// `servers` servers (with `server_args` besides the usual) holding table `name` of `keys`
    /// dense keys of `dim` values, summed.
    fn start(tag: &str, name: &str, keys: u64, dim: usize, servers: usize, server_args: &[&str]) -> ChainCluster {
        use tessera_tests::{free_port, ScratchDir, ServerProc};
        let dir = ScratchDir::new(tag);
        let tables =
            dir.write("tables.toml", &format!("[[table]]\nname = \"{name}\"\nkind = \"dense\"\nstart = 0\nend = {keys}\ndim = {dim}\nupdater = \"sum\"\n"));
        let tables = tables.to_str().unwrap();
        let coordinator = format!("127.0.0.1:{}", free_port());
        // A failure timeout that an emulated guest's late heartbeats do not trip.
        let count = servers.to_string();
        let coordinator_args = ["--servers", &count, "--replicas", "2", "--ranges", "4", "--workers", "2", "--failure-timeout-ms", "2000"];
        let coordinator_proc = ServerProc::coordinator_at(&coordinator, &coordinator_args);
        let addrs: Vec<String> = (0..servers).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let servers = (0..servers)
            .map(|i| {
                let node = (i + 1).to_string();
                let mut args = vec!["--node-id", &node, "--tables", tables, "--shards", "1", "--no-pin", "--coordinator", &coordinator, "--transport", "rdma"];
                args.extend_from_slice(server_args);
                ServerProc::start_at(&addrs[i], &args)
            })
            .collect();
        ChainCluster { addrs, servers, _coordinator: coordinator_proc, _dir: dir }
    }
}

struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn wal_mode_over_rdma_acknowledges_pushes_once_logged_and_a_restart_replays_them() {
    if !tessera_tests::rdma_here("wal_mode_over_rdma_acknowledges_pushes_once_logged_and_a_restart_replays_them") {
        return;
    }
    let data = tessera_tests::ScratchDir::new("rdma-wal");
    let start = || {
        let mut cfg = ServerConfig::single("127.0.0.1:0");
        (cfg.engine.shards, cfg.engine.pin_cores, cfg.transport_kind, cfg.rdma) = (2, false, TransportKind::Rdma, fast());
        cfg.engine.durability = tessera_engine::config::Durability::Wal;
        cfg.engine.data_dir = Some(data.path().to_path_buf());
        cfg.engine.checkpoint_interval_s = 0;
        Server::start(cfg, UpdaterRegistry::new()).expect("server")
    };
    let first = start();
    let c = client(&first, 0, TransportKind::Rdma, fast());
    assert_eq!(c.transport(), "rdma");
    let (dense, sparse) = tables(&c, "wal");
    for round in 0..5 {
        workload(&c, &dense, &sparse, round);
    }
    // More pushes in flight than slots: each reply waits for its commit, and they come back in
    // order across the slots.
    let ones = vec![1f32; 64 * dense.dim()];
    let tickets: Vec<_> = (0..24).map(|i| c.push_range(&dense, (i * 64) as u64, &ones).unwrap()).collect();
    for t in tickets {
        t.wait().unwrap();
    }
    let before = snapshot(&c, &dense, &sparse, 5);
    let status = c.status().unwrap();
    let commits: u64 = status[0]["shards"].as_array().unwrap().iter().map(|s| s["disk"]["wal_commits"].as_u64().unwrap()).sum();
    assert!(commits > 0, "the log was committed: {status:?}");
    drop(c);
    first.shutdown();

    let second = start();
    let c = client(&second, 0, TransportKind::Rdma, fast());
    let (dense, sparse) = (c.table("dense-wal").unwrap(), c.table("sparse-wal").unwrap());
    let after = snapshot(&c, &dense, &sparse, 5);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&before.0), bits(&after.0), "dense values after the restart");
    assert_eq!(bits(&before.1), bits(&after.1), "sparse values after the restart");
    let replayed: u64 = second.recovery().iter().map(|r| r.records_replayed).sum();
    // Every logged push (workload pushes span both shards), and each shard's range of the dense
    // table as it was made, whole.
    assert_eq!(replayed, 5 * 2 * 2 + 24 + 2, "every logged push replayed");
}

/// A [`Caller`](tessera_transport::Caller) (the link replicated servers and workers use) sends
/// each frame that fits an RDMA slot through the queue pair, and a larger one through the
/// link's TCP connection to the same shard; the shard applies both, in the order sent, exactly
/// as a TCP link's. A TCP-only server is refused when RDMA is required.
#[test]
fn a_caller_sends_small_frames_over_rdma_and_large_ones_over_its_tcp_connection() {
    use tessera_transport::{Dialer, TransportConfig};
    if !tessera_tests::rdma_here("a_caller_sends_small_frames_over_rdma_and_large_ones_over_its_tcp_connection") {
        return;
    }
    let small = RdmaConfig { slots: 4, slot_bytes: 8 << 10, spin_us: 20, ..RdmaConfig::default() };
    let server = server(1, TransportKind::Rdma, small.clone());
    let checker = client(&server, 9, TransportKind::Tcp, small.clone());
    let table = checker.create_table(&TableSpec::new("caller", TableKind::Dense, 0, 8192, 1)).unwrap();
    let id = checker.catalogs().unwrap()[0].iter().find(|t| t.spec.name == "caller").unwrap().id;
    let addr = server.local_addr().to_string();
    let dialer = Dialer::new(TransportKind::Rdma, TransportConfig::default(), small.clone()).expect("a device");
    let mut caller = dialer.caller(&addr, 0, 1, tessera_layout::catalog::ServerInfo::serves_rdma).expect("an RDMA caller");
    assert_eq!(caller.kind(), "rdma");
    let fast_max = caller.fast_body_max().expect("an RDMA caller has a fast path");
    // Pushes of 1 000 keys (4 000 bytes: a slot) and of 8 000 keys (32 000 bytes: TCP), each
    // adding its round number, alternately.
    let mut want = vec![0f32; 8192];
    for round in 1..=10u64 {
        let count = if round % 2 == 1 { 1000 } else { 8000 };
        // Worker 1's push number `round` to the shard's one range, as to the range's head.
        let (mut header, body) = tessera_tests::raw::worker_push_range_as(1, round as u32, 0, id, 1, 0, count as u32, &vec![round as f32; count]);
        assert_eq!(body.len() <= fast_max, count == 1000);
        caller.call(&mut header, &body, None).expect("the push is served");
        want[..count].iter_mut().for_each(|v| *v += round as f32);
    }
    // Pipelined: three small pushes in flight on the queue pair; a large one may not start
    // behind them (it would take the TCP path and could overtake them) until they are answered.
    let push = |round: u64, count: usize| tessera_tests::raw::worker_push_range_as(1, round as u32, 0, id, 1, 0, count as u32, &vec![1f32; count]);
    for round in 11..=13u64 {
        let (mut header, small_body) = push(round, 1000);
        assert!(caller.can_start(&small_body));
        caller.start(&mut header, &small_body).expect("a pipelined push is sent");
        want[..1000].iter_mut().for_each(|v| *v += 1.0);
    }
    assert_eq!(caller.in_flight(), 3);
    let (mut header, large_body) = push(14, 8000);
    assert!(!caller.can_start(&large_body), "a large frame must wait for the queue pair's replies");
    assert!(caller.start(&mut header, &large_body).is_err());
    for _ in 0..3 {
        caller.finish(None).expect("each pipelined push is answered, in order");
    }
    assert!(caller.can_start(&large_body));
    let calls = caller.calls();
    assert_eq!((calls.rdma, calls.tcp), (8, 5), "small pushes over RDMA, large ones over TCP");
    let mut got = vec![0f32; 8192];
    checker.pull_range(&table, 0, &mut got).unwrap().wait().unwrap();
    assert_eq!(got, want);
    // A server that serves only TCP: a caller that requires RDMA says so, one that may fall
    // back talks TCP.
    let tcp_only = self::server(1, TransportKind::Tcp, small.clone());
    let tcp_addr = tcp_only.local_addr().to_string();
    let refused = dialer.caller(&tcp_addr, 0, 1, tessera_layout::catalog::ServerInfo::serves_rdma).unwrap_err();
    assert!(refused.to_string().contains("serves TCP only"), "{refused}");
    let auto = Dialer::new(TransportKind::Auto, TransportConfig::default(), small).unwrap();
    let fallback = auto.caller(&tcp_addr, 0, 1, tessera_layout::catalog::ServerInfo::serves_rdma).unwrap();
    assert_eq!(fallback.kind(), "tcp");
}

/// On a machine without an RDMA device (this project's CI host, whose kernel has none): a binary
/// built with `rdma` says so in one line and trains over TCP under `--transport auto`, and
/// refuses `--transport rdma` with a clear error instead of falling back. Where a device is
/// present (the SoftRoCE guest, a host with an HCA) there is nothing to fall back from.
#[test]
fn without_a_device_auto_says_so_once_and_uses_tcp_and_rdma_is_refused() {
    let test = "without_a_device_auto_says_so_once_and_uses_tcp_and_rdma_is_refused";
    if tessera_transport::select::choose(TransportKind::Rdma, &RdmaConfig::default()).is_ok() {
        eprintln!("{test}: NOT RUN here (an RDMA device is present; it checks a host without one)");
        return;
    }
    let refused = "RDMA was asked for but is not available here";
    let small = ["--features", "10000", "--examples", "2000", "--epochs", "1", "--json"];
    let demo = |transport: &str| {
        let args: Vec<&str> = ["demo", "--transport", transport].iter().chain(&small).copied().collect();
        tessera_tests::run_tool(&args, Duration::from_secs(120))
    };

    let out = demo("rdma");
    assert!(!out.status.success(), "demo --transport rdma without a device must fail: {}", out.stdout);
    assert!(out.stderr.contains(refused), "a clear error, not a fallback: {}", out.stderr);
    assert!(!out.stderr.contains("using TCP"), "no fallback when RDMA was asked for: {}", out.stderr);

    let out = tessera_tests::run_tool(&["server", "--transport", "rdma", "--listen", "127.0.0.1:0"], Duration::from_secs(60));
    assert!(!out.status.success(), "server --transport rdma without a device must fail");
    assert!(out.stderr.contains(refused), "a clear error: {}", out.stderr);

    let out = demo("auto");
    assert!(out.status.success(), "demo --transport auto falls back and trains: {}", out.stderr);
    let notices: Vec<&str> = out.stderr.lines().filter(|l| l.contains("no RDMA device")).collect();
    assert_eq!(notices.len(), 1, "one line says so: {}", out.stderr);
    assert!(notices[0].ends_with("using TCP"), "and says what it does instead: {}", notices[0]);
    let summary: serde_json::Value = serde_json::from_str(&out.stdout).expect("a JSON summary");
    assert!(summary["pushes_per_s"].as_f64().is_some_and(|p| p > 0.0), "it trained (over TCP): {summary}");
}

/// A replicated cluster over RDMA: dense pulls read each range's tail one-sidedly, with the
/// exact sums, and go on doing so when a server is killed and the chains heal without it.
#[test]
fn dense_pulls_of_a_replicated_cluster_read_the_tails_memory_and_survive_a_kill() {
    let test = "dense_pulls_of_a_replicated_cluster_read_the_tails_memory_and_survive_a_kill";
    if !tessera_tests::rdma_here(test) {
        return;
    }
    const KEYS: u64 = 4096;
    const DIM: usize = 2;
    let mut cluster = ChainCluster::start("rdma-chain", "w", KEYS, DIM, 3, &[]);
    let (addrs, servers) = (&cluster.addrs, &mut cluster.servers);
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    // The servers' default RDMA slots, which the client's must match.
    let cfg = ClientConfig { kind: TransportKind::Rdma, ..ClientConfig::worker(0) };
    let client = Client::connect(&refs, cfg).expect("a client of the replicated cluster over RDMA");
    let table = client.table("w").unwrap();
    let grads: Vec<f32> = (0..KEYS as usize * DIM).map(|i| (i % 7) as f32 + 1.0).collect();
    let mut out = vec![0f32; KEYS as usize * DIM];
    let calls = |c: &Client| {
        let s = c.chain_stats();
        (s.rdma_calls + s.tcp_calls, s.one_sided_reads)
    };
    let mut pushes = 0f32;
    let mut round = |client: &Client, out: &mut [f32]| {
        pushes += 1.0;
        client.set_clock(pushes as u64);
        client.push_range(&table, 0, &grads).unwrap().wait().unwrap();
        let (requests, reads) = calls(client);
        let stamp = client.pull_range(&table, 0, out).unwrap().wait().unwrap();
        let (requests_after, reads_after) = calls(client);
        for (i, (got, g)) in out.iter().zip(&grads).enumerate() {
            assert_eq!(*got, g * pushes, "value {i} after {pushes} acknowledged pushes");
        }
        assert!(stamp.get(0) >= pushes as u64 - 1, "the stamp {stamp:?} counts the worker's pushes");
        (requests_after - requests, reads_after - reads)
    };
    for _ in 0..5 {
        let (requests, reads) = round(&client, &mut out);
        assert_eq!(requests, 0, "a dense pull sent no request: every range was read from its tail's memory");
        assert_eq!(reads, 4, "one read per range");
    }
    // A server killed: its ranges' reads fail over to the new tails, and read them one-sidedly.
    servers[1].kill();
    let mut read_after_kill = 0;
    for _ in 0..20 {
        read_after_kill += round(&client, &mut out).1;
    }
    assert!(read_after_kill >= 4 * 10, "the new tails are read one-sidedly too ({read_after_kill} reads in 20 pulls)");
    eprintln!("{read_after_kill} one-sided range reads in 20 pulls after the kill; {} torn copies read again", client.torn_reads());
}

#[test]
fn torn_reads_of_a_replicated_tail_are_caught_and_read_again() {
    let test = "torn_reads_of_a_replicated_tail_are_caught_and_read_again";
    if !tessera_tests::rdma_here(test) {
        return;
    }
    // Four ranges of two 64 KiB blocks each. The tail changes a block when it applies the
    // head's update (a delta, not the push itself): reads of the tail's memory that overlap
    // it must be caught as torn and read again, as on an unreplicated server.
    const KEYS: usize = 1 << 17;
    let cluster = ChainCluster::start("rdma-chain-torn", "torn", KEYS as u64, 1, 2, &["--dense-block-bytes", "65536"]);
    let addrs = &cluster.addrs;
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let connect = |worker| {
        Client::connect(&refs, ClientConfig { kind: TransportKind::Rdma, ..ClientConfig::worker(worker) })
            .expect("a client of the replicated cluster over RDMA")
    };
    let (pusher, reader) = (connect(0), connect(1));
    let (table, read) = (pusher.table("torn").unwrap(), reader.table("torn").unwrap());
    let counts = || {
        let s = reader.chain_stats();
        (s.rdma_calls + s.tcp_calls, s.one_sided_reads)
    };
    let (calls_before, reads_before) = counts();
    // Only the first range's keys: pushes small enough to come often in the emulated guest.
    let (pulls, pushes) = push_and_read_until_torn(&pusher, &table, &reader, &read, KEYS / 4, (64 << 10) / 4);
    let (calls, reads) = counts();
    eprintln!("{pulls} pulls against {pushes} pushes; {} torn copies of the tails' blocks read again", reader.torn_reads());
    assert_eq!(calls, calls_before, "every pull read the tails' memory one-sidedly");
    assert!(reads - reads_before >= pulls, "a read per pull ({} reads)", reads - reads_before);
}
