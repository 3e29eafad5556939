//! Chain replication with real processes: three servers holding every range on a chain of all
//! three, and four workers training a dense `sum` table and a sparse `sum` table of hashed keys. Servers are killed with `kill -9` at
//! random times, one at a time, and restarted; each kill takes out a head of some ranges, a
//! middle of others and a tail of the rest.
//!
//! The configuration is kept in a real etcd, by two coordinators that hold an election there;
//! halfway through, the leading coordinator is killed with `kill -9` too, and the other takes
//! over. A shorter run uses the embedded coordinator instead.
//!
//! Each worker pushes small integers, so sums are exact in any order. At the end, every key
//! must hold exactly the sum of every acknowledged push of every worker, as in a run without
//! failures: nothing acknowledged lost, nothing applied twice. The test prints the pause each
//! kill caused (the longest wait, over workers, for the push in flight at the kill).
//!
//! At the end, while the workers still push, one server is drained (`tessera drain`) and must
//! stop by itself, then a new server joins and must end up in every chain; the sums are
//! checked on the servers left.
//!
//! `REPLICATION_KILLS` sets the number of server kills with etcd (default 20);
//! `REPLICATION_KILLS_EMBEDDED` with the embedded coordinator (default 5).
//!
//! `REPLICATION_DRAIN=0` skips the drain and the join at the end.
//! `REPLICATION_FAILURE_TIMEOUT_MS` sets the coordinators' failure timeout (default 500).
//!
//! `REPLICATION_TRANSPORT=rdma` runs servers and workers over RDMA: peers' messages and
//! workers' pushes go through RDMA slots (small ones, [`SLOT_BYTES`], so that snapshots and
//! large batches take the links' TCP path too). The test suite runs the embedded kill test so
//! inside the SoftRoCE guest; everything else runs over TCP.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tessera_client::{Client, ClientConfig};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::{free_port, run_tool, EtcdProc, ScratchDir, ServerProc};
use tessera_transport::{Op, TransportConfig, TransportKind};

const SERVERS: usize = 3;
/// RDMA slot size in the RDMA runs: the smallest allowed, so that some frames do not fit.
const SLOT_BYTES: usize = 8 << 10;
const WORKERS: u32 = 4;
const KEYS: u64 = 2048;

/// The transport of this run: `REPLICATION_TRANSPORT` (tcp or rdma), TCP by default.
fn transport() -> TransportKind {
    std::env::var("REPLICATION_TRANSPORT").map_or(TransportKind::Tcp, |t| t.parse().expect("REPLICATION_TRANSPORT is tcp or rdma"))
}

/// The coordinator's `--failure-timeout-ms`: `REPLICATION_FAILURE_TIMEOUT_MS`, 500 (the
/// default) unless set. The RDMA run in the emulated guest sets 2000: there, with every CPU
/// instruction emulated, a server's heartbeat is at times answered more than 500 ms late, and
/// servers that are alive get taken for failed (see the README).
fn failure_timeout_ms() -> String {
    std::env::var("REPLICATION_FAILURE_TIMEOUT_MS").unwrap_or_else(|_| "500".into())
}

/// How worker `w` connects in this run: odd workers cache key lists.
fn worker_cfg(w: u32) -> ClientConfig {
    let mut cfg = ClientConfig::worker(w);
    cfg.key_cache_keys = if w % 2 == 1 { 1 << 20 } else { 0 };
    cfg.kind = transport();
    cfg.rdma.slots = 4;
    cfg.rdma.slot_bytes = SLOT_BYTES;
    cfg
}

/// The server flags that choose this run's transport.
fn transport_args() -> Vec<String> {
    let kind = transport().to_string();
    let slot_bytes = SLOT_BYTES.to_string();
    ["--transport", kind.as_str(), "--rdma-slots", "4", "--rdma-slot-bytes", slot_bytes.as_str()].map(String::from).to_vec()
}

fn grad(worker: u32, key: u64) -> f32 {
    (worker + 1) as f32 * ((key % 5) + 1) as f32
}

/// Writes the tests' tables into `dir` and returns the file's path: dense `w` of `KEYS` keys
/// and sparse `emb` (hashed keys, 2 components), both summed.
fn sum_table(dir: &ScratchDir) -> String {
    let dense = format!("[[table]]\nname = \"w\"\nkind = \"dense\"\nstart = 0\nend = {KEYS}\ndim = 1\nupdater = \"sum\"\n");
    let sparse = "[[table]]\nname = \"emb\"\nkind = \"sparse\"\ndim = 2\ncapacity = 20000\nupdater = \"sum\"\n";
    dir.write("tables.toml", &format!("{dense}{sparse}")).to_str().unwrap().to_string()
}

/// The sparse keys worker `worker` pushes each iteration: 48 every worker shares, 16 its own,
/// hashed over the whole key space (so over every range).
fn sparse_keys(worker: u32) -> Vec<u64> {
    let hash = |x: u64| x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ 0x5bd1_e995;
    (0..48).chain((0..16).map(|i| 1000 * (worker as u64 + 1) + i)).map(hash).collect()
}

/// Worker `worker`'s sparse gradient for `keys`: small integers, so sums are exact in any order.
fn sparse_grads(worker: u32, keys: &[u64]) -> Vec<f32> {
    keys.iter().flat_map(|k| [grad(worker, *k), 1.0]).collect()
}

/// Checks, on the cluster at `addrs`, that `w` and `emb` hold exactly `pushes[w]` pushes of each
/// worker `w`.
fn check_sums(addrs: &[&str], pushes: &[usize]) {
    let checker = Client::connect(addrs, worker_cfg(7)).unwrap();
    let table = checker.table("w").unwrap();
    let mut values = vec![0f32; KEYS as usize];
    checker.pull_range(&table, 0, &mut values).and_then(|t| t.wait()).unwrap();
    let want = |k: u64| -> f32 { (0..WORKERS).map(|w| pushes[w as usize] as f32 * grad(w, k)).sum() };
    let wrong: Vec<String> = (0..KEYS).filter(|&k| values[k as usize] != want(k)).map(|k| format!("{k}: {} not {}", values[k as usize], want(k))).collect();
    let shown = if wrong.len() <= 10 { wrong.join(", ") } else { format!("{}, ..., {}", wrong[..8].join(", "), wrong[wrong.len() - 2..].join(", ")) };
    assert!(wrong.is_empty(), "{} of {KEYS} dense sums are wrong (pushes {pushes:?}): {shown}", wrong.len());
    let emb = checker.table("emb").unwrap();
    let mut want = std::collections::BTreeMap::<u64, [f32; 2]>::new();
    for w in 0..WORKERS {
        let keys = sparse_keys(w);
        for (k, g) in keys.iter().zip(sparse_grads(w, &keys).chunks_exact(2)) {
            let sum = want.entry(*k).or_default();
            sum[0] += pushes[w as usize] as f32 * g[0];
            sum[1] += pushes[w as usize] as f32 * g[1];
        }
    }
    let keys: Vec<u64> = want.keys().copied().collect();
    let mut got = vec![0f32; keys.len() * 2];
    checker.pull(&emb, &keys, &mut got).and_then(|t| t.wait()).unwrap();
    for (i, (k, sum)) in want.iter().enumerate() {
        assert_eq!(&got[i * 2..i * 2 + 2], sum, "sparse key {k}");
    }
}

/// Makes the sparse `sum` table "runtime" through `client` (a table made at run time), and
/// pushes worker 0's sparse gradient to it three times.
fn make_runtime_table(client: &Client) {
    let mut spec = TableSpec::new("runtime", TableKind::Sparse, 0, u64::MAX, 2);
    spec.updater = "sum".into();
    spec.capacity = 10_000;
    let runtime = client.create_table(&spec).expect("a table made at run time");
    let keys = sparse_keys(0);
    for _ in 0..3 {
        client.push(&runtime, &keys, &sparse_grads(0, &keys)).and_then(|t| t.wait()).expect("push");
    }
}

/// Checks that the servers at `addrs` serve the catalog `w, emb, runtime` (from `addrs[0]`) and
/// "runtime"'s sums of [`make_runtime_table`]'s pushes.
fn check_runtime_table(addrs: &[&str]) {
    let catalog = tessera_transport::ask(addrs[0], Op::Catalog, &[], &TransportConfig::default()).expect("a catalog");
    let catalog: serde_json::Value = serde_json::from_slice(&catalog).unwrap();
    let names: Vec<&str> = catalog["tables"].as_array().unwrap().iter().map(|t| t["spec"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["w", "emb", "runtime"], "the tables, in the cluster's order");
    let reader = Client::connect(addrs, worker_cfg(7)).expect("connect");
    let table = reader.table("runtime").expect("the run-time table");
    let keys = sparse_keys(0);
    let mut got = vec![0f32; keys.len() * 2];
    reader.pull(&table, &keys, &mut got).and_then(|t| t.wait()).expect("pull");
    let want: Vec<f32> = sparse_grads(0, &keys).iter().map(|g| g * 3.0).collect();
    assert_eq!(got, want);
}

/// A coordinator for three servers keeping three replicas of four ranges, with the failure
/// timeout given, for tests that start their servers themselves: its address (as a list, as the
/// status helpers take it), its process, and `servers` addresses for servers.
fn three_replica_coordinator(failure_timeout_ms: &str, servers: usize) -> (Vec<String>, ServerProc, Vec<String>) {
    let coordinator = vec![format!("127.0.0.1:{}", free_port())];
    let args = ["--servers", "3", "--replicas", "3", "--ranges", "4", "--workers", "8", "--failure-timeout-ms", failure_timeout_ms];
    let process = ServerProc::coordinator_at(&coordinator[0], &args);
    let addrs = (0..servers).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    (coordinator, process, addrs)
}

/// One kill test at a time: they measure pauses.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The status of the coordinator at `addr`.
fn status_of(addr: &str) -> Option<serde_json::Value> {
    let body = tessera_transport::ask(addr, Op::Status, &[], &TransportConfig::default()).ok()?;
    Some(serde_json::from_slice(&body).expect("status is JSON"))
}

/// Which of `coordinators` leads, and its status.
fn leader(coordinators: &[String]) -> Option<(usize, serde_json::Value)> {
    coordinators.iter().enumerate().find_map(|(i, addr)| status_of(addr).filter(|s| s["leading"] == true).map(|s| (i, s)))
}

/// The leading coordinator's status.
fn status(coordinators: &[String]) -> Option<serde_json::Value> {
    leader(coordinators).map(|(_, s)| s)
}

/// Node `node`'s incarnation in the configuration.
fn incarnation(status: &serde_json::Value, node: usize) -> Option<u64> {
    let members = status["config"]["members"].as_array()?;
    members.iter().find(|m| m["node"] == node as u64)?["incarnation"].as_u64()
}

/// How long a cluster may take to heal after a kill: `REPLICATION_HEAL_S` seconds (default 60).
/// In the SoftRoCE guest, under emulation, a rejoined server's learners take several times as
/// long to catch up as on the host.
fn heal_within() -> Duration {
    Duration::from_secs(std::env::var("REPLICATION_HEAL_S").ok().and_then(|v| v.parse().ok()).unwrap_or(60))
}

/// Waits until every chain is whole again (all servers, no learner), with node `node` (if
/// given) in it under another incarnation than `old`: the restart was noticed, and healed.
fn wait_healed(coordinator: &[String], restarted: Option<(usize, Option<u64>)>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = status(coordinator) {
            let chains = s["config"]["chains"].as_array().cloned().unwrap_or_default();
            let whole = !chains.is_empty() && chains.iter().all(|c| c["nodes"].as_array().map_or(0, Vec::len) == SERVERS && c["learner"].is_null());
            let noticed = restarted.is_none_or(|(node, old)| incarnation(&s, node).is_some_and(|i| Some(i) != old));
            if whole && noticed {
                return;
            }
        }
        if Instant::now() >= deadline {
            let now = status(coordinator).map(|s| serde_json::to_string(&s).unwrap()).unwrap_or_default();
            panic!("the cluster did not heal within {within:?}; the coordinator's status: {now}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls the leading coordinator until node `node` (last seen as incarnation `old`) is out of
/// every chain, or a member under another incarnation: its kill was noticed. Returns when that
/// was, or `None` if it was not within `within`.
fn detected(coordinators: &[String], node: usize, old: Option<u64>, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(s) = status(coordinators) {
            let chains = s["config"]["chains"].as_array().cloned().unwrap_or_default();
            let out = chains.iter().all(|c| c["nodes"].as_array().is_some_and(|n| !n.contains(&serde_json::json!(node))));
            if out || incarnation(&s, node) != old {
                return Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// [`wait_healed`], and, if the cluster does not heal, the end of each process's log before
/// the panic goes on.
fn wait_healed_or_dump(coordinator: &[String], restarted: Option<(usize, Option<u64>)>, within: Duration, procs: &[&ServerProc]) {
    let healed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wait_healed(coordinator, restarted, within)));
    if let Err(panic) = healed {
        for p in procs {
            let log = p.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- the last lines of {}'s log:", p.addr());
            tail.iter().rev().for_each(|l| eprintln!("{l}"));
        }
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn training_survives_kill_9_of_servers_and_a_coordinator_with_etcd() {
    let kills = std::env::var("REPLICATION_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    kill_test(true, kills);
}

#[test]
fn training_survives_kill_9_of_servers_with_the_embedded_coordinator() {
    let kills = std::env::var("REPLICATION_KILLS_EMBEDDED").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    kill_test(false, kills);
}

fn kill_test(with_etcd: bool, kills: usize) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication");
    let tables = sum_table(&dir);
    let etcd = with_etcd.then(EtcdProc::start);
    // Where servers find the coordinator: etcd, or the one coordinator's address.
    let coordinators: Vec<String> = (0..if with_etcd { 2 } else { 1 }).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let find: Vec<String> = match &etcd {
        Some(etcd) => vec!["--etcd".into(), etcd.endpoint().into()],
        None => vec!["--coordinator".into(), coordinators[0].clone()],
    };
    let start_coordinator = |i: usize| {
        let timeout = failure_timeout_ms();
        let mut args =
            ["--servers", "3", "--replicas", "3", "--ranges", "16", "--workers", "8", "--failure-timeout-ms", timeout.as_str()].map(String::from).to_vec();
        if let Some(etcd) = &etcd {
            args.extend(["--etcd".to_string(), etcd.endpoint().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProc::coordinator_at(&coordinators[i], &args)
    };
    let mut coordinator_procs: Vec<ServerProc> = (0..coordinators.len()).map(start_coordinator).collect();
    // The last address is for a server that joins at the end.
    let addrs: Vec<String> = (0..=SERVERS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let server_args = |node: usize| -> Vec<String> {
        let node = (node + 1).to_string();
        let mut args = ["--node-id", &node, "--tables", &tables, "--shards", "2", "--no-pin"].map(String::from).to_vec();
        args.extend(find.iter().cloned());
        args.extend(transport_args());
        args
    };
    let start = |i: usize| {
        let args = server_args(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProc::start_at(&addrs[i], &args)
    };
    let mut servers: Vec<ServerProc> = (0..SERVERS).map(start).collect();
    wait_healed(&coordinators, None, Duration::from_secs(30));

    let stop = Arc::new(AtomicBool::new(false));
    // Iterations each worker has finished, for the kill loop to see training go on.
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..WORKERS).map(|_| AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let handles = start_workers(&addrs[..SERVERS], &stop, &progress, epoch);

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e55e7a);
    let mut kill_times = Vec::new();
    // How long after each kill the coordinator had taken the server out of its chains.
    let mut detections = Vec::new();
    let mut failover = None;
    for k in 0..kills {
        // One failure at a time: every worker finishes an iteration on the healed cluster before
        // the next kill, so that each pause belongs to one kill (two kills inside one stall
        // would both be charged with all of it).
        wait_progress(&progress, Duration::from_secs(60), "on a healed cluster");
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..600)));
        let victim = rng.gen_range(0..SERVERS);
        let old = status(&coordinators).and_then(|s| incarnation(&s, victim + 1));
        kill_times.push(epoch.elapsed());
        servers[victim].kill();
        let killed_at = Instant::now();
        eprintln!("kill {k}: server {} at {:?}", victim + 1, epoch.elapsed());
        // Watched from a thread of its own, so the restart below keeps its random delay.
        let watcher = {
            let coordinators = coordinators.clone();
            std::thread::spawn(move || detected(&coordinators, victim + 1, old, Duration::from_secs(60)))
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..800)));
        servers[victim] = start(victim);
        let restarted_at = Instant::now();
        let procs: Vec<&ServerProc> = servers.iter().chain(&coordinator_procs).collect();
        wait_healed_or_dump(&coordinators, Some((victim + 1, old)), heal_within(), &procs);
        eprintln!("kill {k}: healed {:?} after the restart", restarted_at.elapsed());
        detections.push(watcher.join().expect("watcher").map_or(Duration::MAX, |at| at - killed_at));
        if with_etcd && k == kills / 2 {
            // The leading coordinator dies too; the other, standing by in etcd's election, takes
            // over from the configuration stored there once the dead one's lease lapses.
            let (dead, _) = leader(&coordinators).expect("a coordinator leads");
            let killed_at = Instant::now();
            coordinator_procs[dead].kill();
            while leader(&coordinators).is_none() {
                assert!(killed_at.elapsed() < Duration::from_secs(30), "no coordinator took over within 30 s");
                std::thread::sleep(Duration::from_millis(20));
            }
            failover = Some(killed_at.elapsed());
            eprintln!("coordinator {} killed; coordinator {} leads after {:?}", dead, 1 - dead, killed_at.elapsed());
            coordinator_procs[dead] = start_coordinator(dead);
        }
    }
    // `REPLICATION_DRAIN=0` skips the drain and the join.
    let drain_and_join = std::env::var("REPLICATION_DRAIN").map_or(true, |v| v != "0");
    if drain_and_join {
        // Then one server leaves for good, gracefully, while the workers push: `tessera drain`
        // waits until it is out of every chain and the configuration, and the server stops itself.
        // A drain of no member is refused, naming the members, and changes nothing.
        let mut wrong = vec!["drain", "127.0.0.1:1"];
        wrong.extend(find.iter().map(String::as_str));
        let refused = run_tool(&wrong, Duration::from_secs(30));
        assert!(!refused.status.success() && refused.stderr.contains("no member"), "{}", refused.stderr);
        let mut drain_args = vec!["drain", addrs[SERVERS - 1].as_str()];
        drain_args.extend(find.iter().map(String::as_str));
        // A drain moves every range the server holds through a learner: as slow as a heal.
        let drained = run_tool(&drain_args, heal_within().max(Duration::from_secs(60)));
        assert!(drained.status.success(), "tessera drain failed:\n{}", drained.stderr);
        eprint!("{}", drained.stderr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while servers[SERVERS - 1].is_running() {
            assert!(Instant::now() < deadline, "the drained server did not stop:\n{}", servers[SERVERS - 1].log());
            std::thread::sleep(Duration::from_millis(20));
        }
        // And a new server (node 4) joins while they push: it copies each range from its tail,
        // then joins every chain at its tail.
        servers.push(start(SERVERS));
        wait_healed(&coordinators, None, heal_within().max(Duration::from_secs(60)));
        eprintln!("node {} joined every chain", SERVERS + 1);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("worker")).collect();

    // Exactly every acknowledged push, once, in both tables.
    let live = if drain_and_join { [0, 1, SERVERS] } else { [0, 1, 2] }.map(|i| addrs[i].as_str());
    let pushes: Vec<usize> = results.iter().map(|r| r.0.len()).collect();
    check_none_lost(&results);
    check_sums(&live, &pushes);

    // The pause each kill caused: the longest any worker waited across it.
    let mut pauses: Vec<Duration> = kill_times
        .iter()
        .map(|t| {
            let gap = |done: &Vec<Duration>| {
                let after = done.partition_point(|d| d <= t);
                let before = if after == 0 { Duration::ZERO } else { done[after - 1] };
                done.get(after).map_or(Duration::ZERO, |a| *a - before)
            };
            results.iter().map(|(done, _)| gap(done)).max().unwrap()
        })
        .collect();
    eprintln!("pause after each kill (and when the coordinator had taken the server out of its chains):");
    for (pause, detection) in pauses.iter().zip(&detections) {
        eprintln!("  {pause:?} ({detection:?})");
    }
    pauses.sort();
    detections.sort();
    let total: usize = pushes.iter().sum();
    let resends: u64 = results.iter().map(|r| r.1.resends).sum();
    let rerouted: u64 = results.iter().map(|r| r.1.rerouted).sum();
    let (rdma_calls, tcp_calls): (u64, u64) = (results.iter().map(|r| r.1.rdma_calls).sum(), results.iter().map(|r| r.1.tcp_calls).sum());
    eprintln!("workers' requests: {rdma_calls} over RDMA slots, {tcp_calls} over TCP");
    match transport() {
        TransportKind::Rdma => assert!(rdma_calls > tcp_calls, "an RDMA run whose workers mostly used TCP"),
        _ => assert_eq!(rdma_calls, 0),
    }
    let coordination = if with_etcd { "etcd, 2 coordinators" } else { "embedded coordinator" };
    eprintln!(
        "replication kill test ({coordination}): {kills} kills, {total} pushes acknowledged (resend rounds: {resends} on the retry timer, {rerouted} to a new head); pause after a kill p50 {:?}, max {:?}; server out of its chains after p50 {:?}, max {:?}; coordinator failover {failover:?}",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1],
        detections[detections.len() / 2],
        detections[detections.len() - 1]
    );
    let _ = std::io::Write::flush(&mut std::io::stderr());
    drop(servers);
    drop(coordinator_procs);
}

/// What a worker of [`start_workers`] ends with: when each of its iterations was acknowledged
/// (since the run's start), and its client's counters.
type WorkerRun = (Vec<Duration>, tessera_client::ChainStats);

/// Starts [`WORKERS`] workers on the cluster at `addrs`, each pushing `w` and `emb` until `stop`,
/// counting its acknowledged iterations in `progress`. Odd workers keep iterations in flight
/// (tickets not yet waited on) and cache key lists, so failures and moves land on pipelined
/// pushes and on lists the heads and tails remember too; even ones wait for each iteration and
/// send every key.
fn start_workers(addrs: &[String], stop: &Arc<AtomicBool>, progress: &Arc<Vec<AtomicU64>>, epoch: Instant) -> Vec<std::thread::JoinHandle<WorkerRun>> {
    (0..WORKERS)
        .map(|w| {
            let (stop, addrs, progress) = (stop.clone(), addrs.to_vec(), progress.clone());
            std::thread::spawn(move || {
                let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
                let client = Client::connect(&refs, worker_cfg(w)).expect("connect");
                let table = client.table("w").expect("table w");
                let emb = client.table("emb").expect("table emb");
                let grads: Vec<f32> = (0..KEYS).map(|k| grad(w, k)).collect();
                let keys = sparse_keys(w);
                let sparse = sparse_grads(w, &keys);
                let depth = if w % 2 == 1 { 4 } else { 0 };
                let mut flight = std::collections::VecDeque::new();
                let mut sent = 0u64;
                let mut done_at = Vec::new();
                let mut acknowledged = |(dense, sparse): (tessera_client::Ticket<'_>, tessera_client::Ticket<'_>)| {
                    dense.wait().expect("a push is eventually acknowledged");
                    sparse.wait().expect("a sparse push is eventually acknowledged");
                    done_at.push(epoch.elapsed());
                    progress[w as usize].fetch_add(1, Ordering::Release);
                };
                while !stop.load(Ordering::Acquire) {
                    sent += 1;
                    client.set_clock(sent);
                    let dense = client.push_range(&table, 0, &grads).expect("a push is sent");
                    let sparse = client.push(&emb, &keys, &sparse).expect("a sparse push is sent");
                    flight.push_back((dense, sparse));
                    while flight.len() > depth {
                        acknowledged(flight.pop_front().expect("not empty"));
                    }
                }
                flight.into_iter().for_each(&mut acknowledged);
                (done_at, client.chain_stats())
            })
        })
        .collect()
}

/// No worker of [`start_workers`] took acknowledged pushes for lost by their ranges (and
/// numbered the rest anew): nothing here loses what it acknowledged.
fn check_none_lost(results: &[WorkerRun]) {
    let lost: Vec<u64> = results.iter().map(|r| r.1.push_pieces_lost).collect();
    assert!(lost.iter().all(|l| *l == 0), "workers took acknowledged push pieces for lost by their ranges: {lost:?} (per worker)");
}

/// Waits until every worker has finished an iteration since `progress` was `seen` (or panics
/// after `within`): training goes on.
fn wait_progress(progress: &[AtomicU64], within: Duration, what: &str) {
    let seen: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Acquire)).collect();
    let waiting = Instant::now();
    while progress.iter().zip(&seen).any(|(p, s)| p.load(Ordering::Acquire) == *s) {
        assert!(waiting.elapsed() < within, "a worker made no progress for {within:?} {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `body` as one `op` request on shard 0 of `addr`, claiming to be node or worker `from`;
/// returns the server's error message, or `None` if it answered Ok.
fn forged(addr: &str, op: Op, from: u32, body: &[u8]) -> Option<String> {
    let (mut link, _) = tessera_transport::tcp::TcpLink::connect(addr, 0, from, &TransportConfig::default()).expect("connect");
    let mut header = tessera_transport::Header::request(op, 1);
    header.worker = from;
    match tessera_transport::call(&mut link, &mut header, body, Some(Duration::from_secs(10))) {
        // A head names the pushes it refuses in its answer.
        Ok((header, body)) => tessera_tests::raw::RawReply { header, body }.refusal().map(|(seq, _, reason)| format!("push {seq}: {reason}")),
        Err(tessera_transport::TransportError::Refused { reason, .. }) => Some(reason),
        Err(e) => panic!("the server did not answer a forged {op:?}: {e}"),
    }
}

/// A push message's payload.
fn msg_payload(msg: &tessera_replication::protocol::Msg) -> tessera_replication::protocol::Payload {
    match msg {
        tessera_replication::protocol::Msg::Push { payload, .. } => payload.clone(),
        other => panic!("not a push: {other:?}"),
    }
}

/// A peer message, encoded.
fn peer_msg(msg: &tessera_replication::protocol::Msg) -> Vec<u8> {
    let mut out = Vec::new();
    tessera_replication::codec::encode_batch([msg], &mut out);
    out
}

/// Node `node`'s report of `range` in a coordinator status: (version, ticks).
fn report(status: &serde_json::Value, node: u64, range: u64) -> (u64, u64) {
    let r = status["reports"][node.to_string()].as_array().and_then(|rs| rs.iter().find(|r| r["range"] == range)).expect("a report");
    (r["version"].as_u64().unwrap(), r["ticks"].as_u64().unwrap())
}

/// Forged and malformed replication frames (`Replicate` from a "peer", `WorkerPush` from a
/// "worker") sent to the middle of a real chain: each is refused or ignored, no server
/// crashes, and nothing of them is applied. Then the head and the tail are killed, so the
/// middle serves alone, and every key must hold exactly the sum of the real pushes.
#[test]
fn forged_and_malformed_replication_frames_change_nothing() {
    use tessera_replication::codec::{KeyList, PushHeader};
    use tessera_replication::protocol::{Epoch, Msg, RangeId, WorkerId};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-hostile");
    let tables = sum_table(&dir);
    let (coordinator, _coord, addrs) = three_replica_coordinator("500", SERVERS);
    let mut servers: Vec<ServerProc> = (0..SERVERS)
        .map(|i| {
            let node = (i + 1).to_string();
            ServerProc::start_at(&addrs[i], &["--node-id", &node, "--tables", &tables, "--shards", "1", "--no-pin", "--coordinator", &coordinator[0]])
        })
        .collect();
    wait_healed(&coordinator, None, Duration::from_secs(30));
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let client = Client::connect(&refs, worker_cfg(0)).expect("connect");
    let table = client.table("w").expect("table w");
    let grads: Vec<f32> = (0..KEYS).map(|k| grad(0, k)).collect();
    let rounds = 5;
    for clock in 1..=rounds {
        client.set_clock(clock);
        client.push_range(&table, 0, &grads).and_then(|t| t.wait()).unwrap();
    }

    // Range 0's chain, and what its middle holds once the reports are in.
    let quiet = || {
        std::thread::sleep(Duration::from_millis(600));
        status(&coordinator).expect("a status")
    };
    let s = quiet();
    let chain = &s["config"]["chains"][0];
    let nodes: Vec<u64> = chain["nodes"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    let (head, middle, tail) = (nodes[0], nodes[1], nodes[2]);
    let epoch = Epoch(chain["epoch"].as_u64().unwrap());
    let before = report(&s, middle, 0);
    let at = addrs[middle as usize - 1].as_str();
    let range = RangeId(0);

    // Updates in the right epoch, "from" the right predecessor, each wrong in one way.
    let record = |table: u32, keys: (u64, u64), advances: &[(u32, u64)], state: &[f32]| {
        let mut out = Vec::new();
        out.extend_from_slice(&table.to_le_bytes());
        out.extend_from_slice(&(advances.len() as u32).to_le_bytes());
        out.extend_from_slice(&keys.0.to_le_bytes());
        out.extend_from_slice(&keys.1.to_le_bytes());
        for (w, c) in advances {
            out.extend_from_slice(&w.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&c.to_le_bytes());
        }
        state.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        out
    };
    let high: Arc<[u32]> = vec![u32::MAX; 8].into();
    type Bad = (&'static str, Arc<[u32]>, Vec<u8>);
    let bad_updates: Vec<Bad> = vec![
        ("a clock of another width", vec![u32::MAX; 7].into(), record(0, (0, 1), &[], &[1.0])),
        ("a truncated record", high.clone(), vec![1, 2, 3, 4, 5]),
        ("an unknown table", high.clone(), record(99, (0, 1), &[], &[1.0])),
        ("keys outside the part", high.clone(), record(0, (0, 1 << 40), &[], &[1.0])),
        ("a worker past the clocks", high.clone(), record(0, (0, 1), &[(99, 1)], &[1.0])),
        ("a NaN value", high.clone(), record(0, (0, 1), &[], &[f32::NAN])),
        ("the wrong state length", high.clone(), record(0, (0, 2), &[], &[1.0])),
    ];
    let version = before.0 + 1;
    for (what, clock, delta) in bad_updates {
        let forward = Msg::Forward { range, epoch, version, digest: 0, clock: clock.clone(), delta: delta.clone().into(), durable: 0 };
        assert_eq!(forged(at, Op::Replicate, head as u32, &peer_msg(&forward)), None, "{what}: the frame itself is well formed");
        let snapshot = Msg::Snapshot { range, epoch, version: version + 10, digest: 0, clock, data: delta.into() };
        assert_eq!(forged(at, Op::Replicate, head as u32, &peer_msg(&snapshot)), None, "{what}");
    }
    // An acknowledgement "from" the tail of a version never sent, a request for updates the
    // middle never had, and messages a peer may not send.
    assert_eq!(forged(at, Op::Replicate, tail as u32, &peer_msg(&Msg::Ack { range, epoch, version: 1 << 40 })), None);
    assert_eq!(forged(at, Op::Replicate, tail as u32, &peer_msg(&Msg::Need { range, epoch, version: 0 })), None);
    // A claim that the chain holds far more on disk than it has, from the tail (not upstream)
    // and from the head: taken as told only from upstream, and only where tails acknowledge.
    for from in [tail, head] {
        assert_eq!(forged(at, Op::Replicate, from as u32, &peer_msg(&Msg::Durable { range, epoch, version: 1 << 40 })), None);
    }
    let push = Msg::Push { range, worker: WorkerId(0), seq: 1, payload: vec![0u8; 4].into() };
    assert!(forged(at, Op::Replicate, head as u32, &peer_msg(&push)).is_some_and(|e| e.contains("may not send")));
    // Bytes that are no message at all.
    for junk in [&[][..], &[200][..], &[2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..], &[7u8; 300][..]] {
        assert!(forged(at, Op::Replicate, head as u32, junk).is_some(), "{junk:?} is refused");
        // An empty WorkerPush is a worker polling for acknowledgements: answered, not refused.
        assert_eq!(forged(at, Op::WorkerPush, 3, junk).is_some(), !junk.is_empty(), "{junk:?}");
    }
    // Worker pushes, to the head, each wrong in one way.
    let head_at = addrs[head as usize - 1].as_str();
    let header = PushHeader { table: 0, dim: 1, start: 0, count: 1, worker: 3, clock: 1, listed: false, range_done: false };
    let listed = PushHeader { listed: true, ..header };
    let bad_pushes: Vec<(&str, u32, RangeId, Vec<u8>)> = vec![
        ("an unknown table", 3, range, PushHeader { table: 9, ..header }.payload(&[1.0])),
        ("the wrong dim", 3, range, PushHeader { dim: 2, ..header }.payload(&[1.0, 1.0])),
        ("values of the wrong length", 3, range, {
            let mut p = header.payload(&[1.0]);
            p.extend_from_slice(&[0; 4]);
            p
        }),
        ("keys outside the range", 3, range, PushHeader { start: KEYS - 1, ..header }.payload(&[1.0])),
        ("a range that does not exist", 3, RangeId(77), header.payload(&[1.0])),
        ("another worker's name", 4, range, header.payload(&[1.0])),
        ("a NaN gradient", 3, range, header.payload(&[f32::NAN])),
        ("a worker past the clocks", 99, range, PushHeader { worker: 99, ..header }.payload(&[1.0])),
        ("a key list's hash the head never saw", 3, range, PushHeader::with_key_list(&listed.keyed_payload(&[0], &[1.0]), KeyList::Cached { hash: 0xdead })),
        ("a range flagged as a key list to remember", 3, range, PushHeader::with_key_list(&header.payload(&[1.0]), KeyList::Remember)),
        ("a key list to remember outside the range", 3, range, PushHeader::with_key_list(&listed.keyed_payload(&[KEYS - 1], &[1.0]), KeyList::Remember)),
    ];
    let good = Msg::Push { range, worker: WorkerId(3), seq: 1, payload: header.payload(&[1.0]).into() };
    for (what, sender, range, payload) in bad_pushes {
        let msg = Msg::Push { range, worker: WorkerId(3), seq: 1, payload: payload.into() };
        let refused = forged(head_at, Op::WorkerPush, sender, &peer_msg(&msg));
        let reason = refused.unwrap_or_else(|| panic!("a push with {what} is refused"));
        assert!(!reason.contains("no batch of messages"), "a push with {what} is refused for what it holds, not its framing: {reason}");
        // Beside a good push in one batch, the bad one has the whole batch refused.
        let mut batch = Vec::new();
        tessera_replication::codec::encode_batch([&good, &Msg::Push { range, worker: WorkerId(3), seq: 2, payload: msg_payload(&msg) }], &mut batch);
        let refused = forged(head_at, Op::WorkerPush, sender, &batch);
        assert!(refused.is_some(), "a batch holding a push with {what} is refused whole");
        if sender == 3 && reason.starts_with("push 1:") {
            assert!(refused.unwrap().starts_with("push 2:"), "the head names the push it refused");
        }
        // After a gap the head applies nothing and checks nothing: the push waits for the
        // ones before it, and is checked when they have come.
        let gapped = Msg::Push { range, worker: WorkerId(3), seq: 7, payload: msg_payload(&msg) };
        if sender == 3 && reason.starts_with("push 1:") {
            assert_eq!(forged(head_at, Op::WorkerPush, 3, &peer_msg(&gapped)), None, "a push with {what} after a gap is dropped, not refused");
        }
    }
    // A bad push under the number of one the head applied (the client pushed as worker 0) is
    // taken for that push sent again: acknowledged, not checked, not applied.
    let held = Msg::Push { range, worker: WorkerId(0), seq: 1, payload: PushHeader { table: 9, worker: 0, ..header }.payload(&[1.0]).into() };
    assert_eq!(forged(head_at, Op::WorkerPush, 0, &peer_msg(&held)), None, "a push the head holds is acknowledged again");
    assert!(forged(head_at, Op::WorkerPush, 3, &[9, 0, 0, 0, 1]).is_some_and(|e| e.contains("no batch of messages")), "a body that is no batch");

    // Nothing changed on the middle, every server still runs, and the refusals were logged.
    let s = quiet();
    assert_eq!(report(&s, middle, 0), before, "the middle's version and clock ticks are unchanged");
    for (i, server) in servers.iter_mut().enumerate() {
        assert!(server.is_running(), "server {} died:\n{}", i + 1, server.log());
    }
    assert!(servers[middle as usize - 1].wait_for_log("refused a replicated update", Duration::from_secs(5)));

    // The chain goes on, and its middle alone holds exactly the real pushes.
    for clock in rounds + 1..=2 * rounds {
        client.set_clock(clock);
        client.push_range(&table, 0, &grads).and_then(|t| t.wait()).unwrap();
    }
    servers[head as usize - 1].kill();
    servers[tail as usize - 1].kill();
    let alone = Client::connect(&[at], worker_cfg(1)).expect("connect to the middle");
    let table = alone.table("w").unwrap();
    let mut values = vec![0f32; KEYS as usize];
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = alone.pull_range(&table, 0, &mut values).and_then(|t| t.wait()) {
        assert!(Instant::now() < deadline, "the middle did not serve alone within 30 s: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for k in 0..KEYS {
        assert_eq!(values[k as usize], 2.0 * rounds as f32 * grad(0, k), "key {k}");
    }
}

/// etcd hangs for longer than the coordinators' lease while a worker trains: pushes go on
/// being acknowledged (the data path does not touch etcd). Once etcd answers again, the
/// coordinator leads again by itself (stepping down and campaigning again if its lease
/// lapsed; it never exits), and a server killed after that is replaced in its chains as usual.
#[test]
fn training_goes_on_while_etcd_hangs_and_the_cluster_heals_after() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-etcd-outage");
    let tables = sum_table(&dir);
    let etcd = EtcdProc::start();
    let coordinators = vec![format!("127.0.0.1:{}", free_port())];
    let start_coordinator = || {
        ServerProc::coordinator_at(
            &coordinators[0],
            &["--servers", "3", "--replicas", "3", "--ranges", "4", "--workers", "8", "--failure-timeout-ms", "500", "--etcd", etcd.endpoint()],
        )
    };
    let mut coordinator = start_coordinator();
    let addrs: Vec<String> = (0..SERVERS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let start = |i: usize| {
        let node = (i + 1).to_string();
        ServerProc::start_at(&addrs[i], &["--node-id", &node, "--tables", &tables, "--shards", "1", "--no-pin", "--etcd", etcd.endpoint()])
    };
    let mut servers: Vec<ServerProc> = (0..SERVERS).map(start).collect();
    wait_healed(&coordinators, None, Duration::from_secs(30));

    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let worker = {
        let (stop, addrs) = (stop.clone(), addrs.clone());
        std::thread::spawn(move || {
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let client = Client::connect(&refs, worker_cfg(0)).expect("connect");
            let table = client.table("w").expect("table w");
            let grads: Vec<f32> = (0..KEYS).map(|k| grad(0, k)).collect();
            let mut done_at = Vec::new();
            while !stop.load(Ordering::Acquire) {
                client.set_clock(done_at.len() as u64 + 1);
                client.push_range(&table, 0, &grads).and_then(|t| t.wait()).expect("a push is eventually acknowledged");
                done_at.push(epoch.elapsed());
            }
            done_at
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let frozen_at = epoch.elapsed();
    etcd.freeze();
    std::thread::sleep(Duration::from_secs(4));
    let resumed_at = epoch.elapsed();
    etcd.resume();
    // A coordinator whose lease lapsed steps down and campaigns again by itself: it never
    // exits. The lease is 2 s, so a coordinator that leads 3 s after etcd is back kept its
    // lease or won the election again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while epoch.elapsed() < resumed_at + Duration::from_secs(3) || leader(&coordinators).is_none() {
        assert!(coordinator.is_running(), "the coordinator exited:\n{}", coordinator.log());
        assert!(Instant::now() < deadline, "no coordinator leads 30 s after etcd came back:\n{}", coordinator.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let stepped_down = coordinator.log().contains("steps down");
    eprintln!("a coordinator leads {:?} after etcd came back (it stepped down and won again: {stepped_down})", epoch.elapsed() - resumed_at);
    let old = status(&coordinators).and_then(|s| incarnation(&s, 1));
    servers[0].kill();
    std::thread::sleep(Duration::from_millis(300));
    servers[0] = start(0);
    wait_healed(&coordinators, Some((1, old)), Duration::from_secs(60));
    stop.store(true, Ordering::Release);
    let done_at = worker.join().expect("worker");
    let during = done_at.iter().filter(|t| **t > frozen_at && **t < resumed_at).count();
    eprintln!("etcd outage: {during} pushes acknowledged during the 4 s etcd was frozen, {} in all", done_at.len());
    assert!(during > 10, "only {during} pushes acknowledged while etcd was frozen");

    let checker = Client::connect(&addrs.iter().map(String::as_str).collect::<Vec<_>>(), worker_cfg(7)).unwrap();
    let table = checker.table("w").unwrap();
    let mut values = vec![0f32; KEYS as usize];
    checker.pull_range(&table, 0, &mut values).and_then(|t| t.wait()).unwrap();
    for k in 0..KEYS {
        assert_eq!(values[k as usize], done_at.len() as f32 * grad(0, k), "key {k}");
    }
    drop(servers);
    drop(coordinator);
}

/// A head holds the reply to a worker's pushes until the tail holds them. With the tail frozen
/// (SIGSTOP, and a failure timeout too long to replace it), the reply is not held for ever: it
/// comes back as an error saying the push is not acknowledged. Once the tail resumes, the push
/// (applied at the head, never lost) is acknowledged to a poll, and the next push's reply
/// carries its acknowledgement. The same for a worker that hears from tails: the tail holds the
/// reply to a push awaited there, which becomes an error while the middle is frozen; bad
/// awaits are refused, and one at a member that is not the tail is answered at once.
#[test]
fn push_replies_held_for_a_frozen_member_become_errors_and_nothing_is_lost() {
    use tessera_replication::codec::{self, PushHeader};
    use tessera_replication::protocol::{Msg, RangeId, WorkerId};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-frozen-tail");
    let tables = sum_table(&dir);
    let coordinator = vec![format!("127.0.0.1:{}", free_port())];
    let _coord = ServerProc::coordinator_at(
        &coordinator[0],
        &["--servers", "3", "--replicas", "3", "--ranges", "1", "--workers", "8", "--failure-timeout-ms", "600000"],
    );
    let addrs: Vec<String> = (0..SERVERS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let servers: Vec<ServerProc> = (0..SERVERS)
        .map(|i| {
            let node = (i + 1).to_string();
            ServerProc::start_at(&addrs[i], &["--node-id", &node, "--tables", &tables, "--shards", "1", "--no-pin", "--coordinator", &coordinator[0]])
        })
        .collect();
    wait_healed(&coordinator, None, Duration::from_secs(30));
    let s = status(&coordinator).expect("a status");
    let nodes: Vec<usize> = s["config"]["chains"][0]["nodes"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as usize).collect();
    let (head, tail) = (nodes[0], nodes[2]);
    // A push through the whole chain first: every member has the configuration.
    let client = Client::connect(&addrs.iter().map(String::as_str).collect::<Vec<_>>(), worker_cfg(0)).expect("connect");
    let table = client.table("w").expect("table w");
    client.push_range(&table, 0, &[1.0]).and_then(|t| t.wait()).expect("a push through the chain");
    let header = PushHeader { table: 0, dim: 1, start: 7, count: 1, worker: 3, clock: 1, listed: false, range_done: false };
    let push = |seq: u32| {
        let mut body = Vec::new();
        let msg = Msg::Push { range: RangeId(0), worker: WorkerId(3), seq, payload: PushHeader { clock: seq as u64, ..header }.payload(&[1.0]).into() };
        codec::encode_batch([&msg], &mut body);
        body
    };
    let (mut link, _) = tessera_transport::tcp::TcpLink::connect(&addrs[head - 1], 0, 3, &TransportConfig::default()).expect("connect to the head");
    // A head's answer to pushes starts with the stamp of what it applied (`count` clocks),
    // then the acknowledgements: the last stamp read is kept here.
    let last_stamp = std::cell::RefCell::new(Vec::<u64>::new());
    let stamped = |h: tessera_transport::Header, b: Vec<u8>| {
        let (stamp, batch) = b.split_at(h.count as usize * 8);
        *last_stamp.borrow_mut() = stamp.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        codec::decode_batch(batch).expect("acknowledgements")
    };
    let mut ask_head = |body: &[u8]| {
        let mut h = tessera_transport::Header::request(Op::WorkerPush, 1);
        h.worker = 3;
        let began = Instant::now();
        let replied = tessera_transport::call(&mut link, &mut h, body, Some(Duration::from_secs(30)));
        (replied.map(|(h, b)| stamped(h, b)), began.elapsed())
    };
    let acked = |news: &[Msg]| news.iter().filter_map(|m| if let Msg::PushAck { seq, .. } = m { Some(*seq) } else { None }).max().unwrap_or(0);

    servers[tail - 1].freeze();
    let (replied, took) = ask_head(&push(1));
    servers[tail - 1].resume();
    match replied {
        Err(tessera_transport::TransportError::Refused { status, reason }) => {
            // Not `NotDurable`: a worker takes that as final, and this push is to be resent.
            assert_eq!(status, tessera_transport::Status::Unacknowledged, "{reason}");
            assert!(reason.contains("not acknowledged") && reason.contains("tail in time"), "{reason}")
        }
        other => panic!("a push whose tail is frozen was answered with {other:?}"),
    }
    assert!(took < Duration::from_secs(5), "the held reply came back after {took:?}");

    // The push was applied at the head: once the tail runs again it is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (replied, _) = ask_head(&[]);
        if acked(&replied.expect("a poll is answered")) >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the push held back by the frozen tail was never acknowledged");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (replied, _) = ask_head(&push(2));
    assert_eq!(acked(&replied.expect("the next push is answered")), 2, "its reply carries its acknowledgement");
    assert_eq!(*last_stamp.borrow(), [0, 0, 0, 2], "and the stamp of its key: worker 3 at clock 2");

    // A worker that hears from tails (`TAIL_ACKS`): the head answers its push at once, and the
    // tail holds the reply to the push it awaits there until it holds the push; with the
    // middle frozen, that reply becomes an error instead, and the push is acknowledged once the
    // middle runs again.
    let middle = nodes[1];
    let link_to = |node: usize| tessera_transport::tcp::TcpLink::connect(&addrs[node - 1], 0, 3, &TransportConfig::default()).expect("connect").0;
    let (mut at_head, mut at_tail, mut at_middle) = (link_to(head), link_to(tail), link_to(middle));
    let hearing_from_tails = |link: &mut tessera_transport::tcp::TcpLink, body: &[u8]| {
        let mut h = tessera_transport::Header::request(Op::WorkerPush, 1);
        h.worker = 3;
        h.flags |= tessera_transport::wire::flags::TAIL_ACKS;
        let began = Instant::now();
        let replied = tessera_transport::call(link, &mut h, body, Some(Duration::from_secs(30)));
        (replied.map(|(h, b)| stamped(h, b)), began.elapsed())
    };
    let awaits = |seq: u32| peer_msg(&Msg::PushAck { range: RangeId(0), seq });
    let (replied, _) = hearing_from_tails(&mut at_head, &push(3));
    assert!(replied.is_ok(), "the head answers a push at once: {replied:?}");
    assert_eq!(*last_stamp.borrow(), [0, 0, 0, 3], "with the stamp of the key it applied the push to");
    let (replied, _) = hearing_from_tails(&mut at_head, &[]);
    assert!(replied.is_ok() && last_stamp.borrow().is_empty(), "a poll applies nothing, and its answer has no stamp");
    let (replied, _) = hearing_from_tails(&mut at_tail, &awaits(3));
    assert_eq!(acked(&replied.expect("the tail answers")), 3, "the tail's reply acknowledges the push it held");
    servers[middle - 1].freeze();
    let (replied, took) = hearing_from_tails(&mut at_head, &push(4));
    assert!(replied.is_ok_and(|news| acked(&news) < 4), "the head answers at once, without acknowledging what the tail lacks");
    assert!(took < Duration::from_secs(5), "the head's answer took {took:?}");
    let (replied, took) = hearing_from_tails(&mut at_tail, &awaits(4));
    match replied {
        Err(tessera_transport::TransportError::Refused { status, reason }) => {
            assert_eq!(status, tessera_transport::Status::Unacknowledged, "{reason}");
            assert!(reason.contains("tail in time"), "{reason}")
        }
        other => panic!("a push awaited at a tail cut off by a frozen middle was answered with {other:?}"),
    }
    assert!(took < Duration::from_secs(5), "the held reply came back after {took:?}");
    servers[middle - 1].resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let (Ok(news), _) = hearing_from_tails(&mut at_tail, &awaits(4)) {
            assert_eq!(acked(&news), 4, "answered once the tail holds it");
            break;
        }
        assert!(Instant::now() < deadline, "the push held back by the frozen middle never reached the tail");
    }
    // Awaited at a member that is not the tail: answered at once (the worker then asks the head).
    let (replied, took) = hearing_from_tails(&mut at_middle, &awaits(5));
    assert!(replied.is_ok() && took < Duration::from_secs(5), "{replied:?} after {took:?}");
    // Bad input: an await without the flag, or of a range that does not exist.
    assert!(forged(&addrs[tail - 1], Op::WorkerPush, 3, &awaits(1)).is_some_and(|e| e.contains("may only push")));
    let (replied, _) = hearing_from_tails(&mut at_tail, &peer_msg(&Msg::PushAck { range: RangeId(77), seq: 1 }));
    assert!(matches!(&replied, Err(tessera_transport::TransportError::Refused { reason, .. }) if reason.contains("range 77")), "{replied:?}");
    let tail_acks = |node: usize| {
        let body = tessera_transport::ask(&addrs[node - 1], Op::Status, &[], &TransportConfig::default()).expect("a server status");
        let s: serde_json::Value = serde_json::from_slice(&body).expect("status is JSON");
        s["shards"].as_array().unwrap().iter().map(|sh| sh["replication"]["tail_acks"].as_u64().unwrap()).sum::<u64>()
    };
    assert!(tail_acks(tail) >= 2, "the tail counts the acknowledgements it sent");
    assert_eq!(tail_acks(head), 0, "the head sends none as a tail");

    // Each push was applied once.
    let mut value = [0f32; 1];
    client.pull_range(&table, 7, &mut value).and_then(|t| t.wait()).expect("pull");
    assert_eq!(value[0], 4.0, "four pushes of 1.0");
}

/// The whole cluster loses power: every server and the coordinator are killed with `kill -9`
/// at once while four workers push, twice, and restarted from their disks (servers with
/// `--durability wal`; the embedded coordinator with `--data-dir`, or one keeping the
/// configuration in etcd). The workers' pushes in flight complete once the cluster is back, and
/// every key holds exactly the sum of every acknowledged push: nothing acknowledged lost,
/// nothing applied twice.
#[test]
fn a_whole_cluster_killed_at_once_comes_back_from_its_disks() {
    power_loss_test(false);
}

#[test]
fn a_whole_cluster_killed_at_once_comes_back_from_its_disks_with_etcd() {
    power_loss_test(true);
}

fn power_loss_test(with_etcd: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("power-loss");
    let tables = sum_table(&dir);
    let etcd = with_etcd.then(EtcdProc::start);
    let coordinator = format!("127.0.0.1:{}", free_port());
    let coordinator_dir = dir.path().join("coordinator").display().to_string();
    let timeout = failure_timeout_ms();
    let (keep, find) = match &etcd {
        Some(etcd) => (["--etcd", etcd.endpoint()], ["--etcd", etcd.endpoint()]),
        None => (["--data-dir", coordinator_dir.as_str()], ["--coordinator", coordinator.as_str()]),
    };
    let start_coordinator = || {
        let args = ["--servers", "3", "--replicas", "3", "--ranges", "8", "--workers", "8", "--failure-timeout-ms", &timeout, keep[0], keep[1]];
        ServerProc::coordinator_at(&coordinator, &args)
    };
    let addrs: Vec<String> = (0..SERVERS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let start = |i: usize| {
        let (node, data) = ((i + 1).to_string(), dir.path().join(format!("server-{}", i + 1)).display().to_string());
        let mut args = ["--node-id", &node, "--tables", &tables, "--shards", "2", "--no-pin", find[0], find[1], "--durability", "wal", "--data-dir", &data]
            .map(String::from)
            .to_vec();
        args.extend(transport_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProc::start_at(&addrs[i], &args)
    };
    let mut coordinator_proc = start_coordinator();
    let mut servers: Vec<ServerProc> = (0..SERVERS).map(start).collect();
    let coordinators = [coordinator.clone()];
    wait_healed(&coordinators, None, Duration::from_secs(30));

    let stop = Arc::new(AtomicBool::new(false));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..WORKERS).map(|_| AtomicU64::new(0)).collect());
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let (stop, addrs, progress) = (stop.clone(), addrs.clone(), progress.clone());
        handles.push(std::thread::spawn(move || {
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let client = Client::connect(&refs, worker_cfg(w)).expect("connect");
            let (table, emb) = (client.table("w").expect("table w"), client.table("emb").expect("table emb"));
            let grads: Vec<f32> = (0..KEYS).map(|k| grad(w, k)).collect();
            let keys = sparse_keys(w);
            let sparse = sparse_grads(w, &keys);
            let mut done = 0usize;
            while !stop.load(Ordering::Acquire) {
                client.set_clock(done as u64 + 1);
                client.push_range(&table, 0, &grads).and_then(|t| t.wait()).expect("a push is acknowledged once the cluster is back");
                client.push(&emb, &keys, &sparse).and_then(|t| t.wait()).expect("a sparse push is acknowledged once the cluster is back");
                done += 1;
                progress[w as usize].fetch_add(1, Ordering::Release);
            }
            done
        }));
    }
    let wait_progress = |what: &str| {
        let seen: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Acquire)).collect();
        let waiting = Instant::now();
        while progress.iter().zip(&seen).any(|(p, s)| p.load(Ordering::Acquire) < s + 3) {
            assert!(waiting.elapsed() < heal_within(), "a worker made no progress for {:?} {what}", heal_within());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_progress("before the power loss");
    for round in 0..2 {
        if round == 1 {
            // Every server takes a checkpoint, and the workers push on: the second restart loads
            // it and replays the log after it.
            for addr in &addrs {
                let done = run_tool(&["checkpoint", "now", "--connect", addr], Duration::from_secs(60));
                assert!(done.status.success(), "tessera checkpoint now --connect {addr}:\n{}", done.stderr);
            }
            wait_progress("after the checkpoints");
        }
        // Power loss: everything at once.
        coordinator_proc.kill();
        servers.iter_mut().for_each(ServerProc::kill);
        let acked: u64 = progress.iter().map(|p| p.load(Ordering::Acquire)).sum();
        eprintln!("power loss {round}: every server and the coordinator killed, {acked} iterations acknowledged");
        std::thread::sleep(Duration::from_millis(300));
        coordinator_proc = start_coordinator();
        for i in [2, 0, 1] {
            servers[i] = start(i);
            std::thread::sleep(Duration::from_millis(100));
        }
        let procs: Vec<&ServerProc> = servers.iter().chain([&coordinator_proc]).collect();
        wait_healed_or_dump(&coordinators, None, heal_within(), &procs);
        wait_progress("after the cluster came back");
        if round == 1 {
            for s in &servers {
                assert!(s.log().contains("recovered: checkpoint"), "a server did not recover from its checkpoint:\n{}", s.log());
            }
        }
        // Each range came back from a disk: the coordinator revived it from one member.
        let status = status(&coordinators).expect("the coordinator answers");
        let changes: Vec<&str> = status["changes"].as_array().expect("changes").iter().filter_map(|c| c.as_str()).collect();
        let revived = changes.iter().filter(|c| c.contains("Recovered")).count();
        eprintln!("after power loss {round}: {revived} ranges revived from a disk");
        assert!(revived >= 8, "every range is revived from a disk; the coordinator's changes:\n{}", changes.join("\n"));
        assert!(!changes.iter().any(|c| c.contains("Lost")), "a range was lost:\n{}", changes.join("\n"));
    }
    stop.store(true, Ordering::Release);
    let pushes: Vec<usize> = handles.into_iter().map(|h| h.join().expect("worker")).collect();
    let live: Vec<&str> = addrs.iter().map(String::as_str).collect();
    check_sums(&live, &pushes);
    let coordination = if with_etcd { "etcd" } else { "embedded coordinator on disk" };
    eprintln!("whole-cluster power loss, twice ({coordination}): {} iterations acknowledged, every one there once", pushes.iter().sum::<usize>());
}

/// Tables made at run time reach a server that joins later, and a server whose tables are not
/// the cluster's is refused. Tables are numbered in the order they are made, and replicated
/// updates and snapshots name them by number: a new server (started with no `--tables`) asks a
/// member for its catalog and makes the same tables in the same order before it joins, so it
/// can take every range's snapshot and the cluster heals with it. A server whose `--tables`
/// gives table 0 another definition stops at start-up with an error that says so.
#[test]
fn a_server_that_joins_later_makes_the_tables_made_at_run_time() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-late-tables");
    let tables = sum_table(&dir);
    let (coordinator, _coord, addrs) = three_replica_coordinator("1000", SERVERS + 1);
    let start = |i: usize, tables: Option<&str>| {
        let node = (i + 1).to_string();
        let mut args = vec!["--node-id", &node, "--shards", "2", "--no-pin", "--coordinator", &coordinator[0]];
        if let Some(tables) = tables {
            args.extend(["--tables", tables]);
        }
        ServerProc::start_at(&addrs[i], &args)
    };
    let mut servers: Vec<ServerProc> = (0..SERVERS).map(|i| start(i, Some(&tables))).collect();
    wait_healed(&coordinator, None, Duration::from_secs(30));

    // A table made at run time, with pushes in it.
    let client = Client::connect(&addrs[..SERVERS].iter().map(String::as_str).collect::<Vec<_>>(), worker_cfg(0)).expect("connect");
    make_runtime_table(&client);

    // Server 3 dies for good; server 4, started with no --tables, takes its place.
    servers[SERVERS - 1].kill();
    let newcomer = start(SERVERS, None);
    let procs: Vec<&ServerProc> = servers.iter().chain([&newcomer]).collect();
    wait_healed_or_dump(&coordinator, Some((SERVERS + 1, None)), heal_within().max(Duration::from_secs(60)), &procs);

    // With server 1 gone too, the newcomer serves the run-time table's sums.
    servers[0].kill();
    check_runtime_table(&[addrs[SERVERS].as_str(), addrs[1].as_str()]);

    // A server whose table 0 is another table is refused at start-up, saying why.
    let other = dir.write("other.toml", "[[table]]\nname = \"other\"\nkind = \"dense\"\nstart = 0\nend = 10\ndim = 1\nupdater = \"sum\"\n");
    let refused = ServerProc::start_env(&["--node-id", "5", "--tables", other.to_str().unwrap(), "--no-pin", "--coordinator", &coordinator[0]], &[])
        .expect_err("a server with another cluster's tables");
    assert!(refused.contains("not this cluster's"), "{refused}");
}

/// Starts a server (one shard, this run's transport) at each of `addrs` with `tables`, under
/// `coordinator`, and waits for the chains to form: the servers, and range 0's head (a node
/// id, counted from 1 as the servers' `--node-id`).
fn start_chain(addrs: &[String], tables: &str, coordinator: &[String]) -> (Vec<ServerProc>, usize) {
    let servers = (0..addrs.len())
        .map(|i| {
            let node = (i + 1).to_string();
            let mut args = vec!["--node-id", &node, "--tables", tables, "--shards", "1", "--no-pin", "--coordinator", &coordinator[0]];
            let transport = transport_args();
            args.extend(transport.iter().map(String::as_str));
            ServerProc::start_at(&addrs[i], &args)
        })
        .collect();
    wait_healed(coordinator, None, Duration::from_secs(30));
    let head = status(coordinator).expect("a status")["config"]["chains"][0]["nodes"][0].as_u64().unwrap() as usize;
    (servers, head)
}

/// A push whose first sending never reached a head that checked it (its head, stopped, was
/// killed with the push unread), and whose table another worker filled meanwhile, is refused
/// when it is sent again to the new head: the head names it, and it fails on its ticket with
/// the head's error, long before the client's minute; nothing of it is applied, and the
/// worker goes on.
#[test]
fn a_push_refused_only_when_sent_again_fails_on_its_own_ticket() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-refused-resend");
    let tables = dir.write("tables.toml", "[[table]]\nname = \"tiny\"\nkind = \"sparse\"\ndim = 1\ncapacity = 16\nupdater = \"sum\"\n");
    let coordinator = vec![format!("127.0.0.1:{}", free_port())];
    let timeout = failure_timeout_ms();
    let args = ["--servers", "3", "--replicas", "3", "--ranges", "1", "--workers", "8", "--failure-timeout-ms", &timeout];
    let _coord = ServerProc::coordinator_at(&coordinator[0], &args);
    let addrs: Vec<String> = (0..SERVERS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let (mut servers, head) = start_chain(&addrs, tables.to_str().unwrap(), &coordinator);
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let (a, b) = (Client::connect(&refs, worker_cfg(0)).expect("connect"), Client::connect(&refs, worker_cfg(2)).expect("connect"));
    let (tiny_a, tiny_b) = (a.table("tiny").expect("table"), b.table("tiny").expect("table"));
    a.push(&tiny_a, &[1], &[1.0]).and_then(|t| t.wait()).expect("a push through the chain");
    b.push(&tiny_b, &[2], &[1.0]).and_then(|t| t.wait()).expect("a push through the chain");

    servers[head - 1].freeze();
    let on_its_way = a.push(&tiny_a, &[100, 101, 102], &[1.0; 3]).expect("sent");
    std::thread::sleep(Duration::from_millis(100));
    servers[head - 1].kill();
    // Worker b fills the table through the new head: chunks of keys until one does not fit,
    // then single keys until none does.
    let mut next_key = 1000u64;
    for chunk in [8u64, 1] {
        loop {
            let keys: Vec<u64> = (next_key..next_key + chunk).collect();
            match b.push(&tiny_b, &keys, &vec![1.0; keys.len()]).and_then(|t| t.wait()) {
                Ok(_) => next_key += chunk,
                Err(e) if e.status() == Some(tessera_transport::Status::Full) => break,
                Err(e) => panic!("worker b's push failed: {e}"),
            }
        }
    }
    let began = Instant::now();
    let err = on_its_way.wait().expect_err("a push to a table filled while it was on its way");
    assert_eq!(err.status(), Some(tessera_transport::Status::Full), "{err}");
    assert!(began.elapsed() < Duration::from_secs(30), "the refusal took {:?}", began.elapsed());

    // Worker a goes on, and each key holds exactly what was applied.
    a.push(&tiny_a, &[1], &[1.0]).and_then(|t| t.wait()).expect("a push after the refused one");
    let reader = Client::connect(&refs, worker_cfg(4)).expect("connect");
    let tiny = reader.table("tiny").unwrap();
    let mut held = vec![0f32; 2 + (next_key - 1000) as usize];
    let keys: Vec<u64> = [1, 2].into_iter().chain(1000..next_key).collect();
    reader.pull(&tiny, &keys, &mut held).and_then(|t| t.wait()).expect("pull");
    assert_eq!(held[..2], [2.0, 1.0]);
    assert!(held[2..].iter().all(|v| *v == 1.0), "{held:?}");
}

/// Two live clients with one worker id on a cluster of chains of three: the newer one's pushes
/// go through every range's head, the older one's are refused by name from then on, and the
/// sums hold exactly the acknowledged pushes, none of either client's acknowledged and dropped.
#[test]
fn two_clients_with_one_worker_id_on_a_cluster_are_told_and_lose_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-worker-id");
    let tables = sum_table(&dir);
    let (coordinator, _coord, addrs) = three_replica_coordinator(&failure_timeout_ms(), SERVERS);
    let (_servers, _) = start_chain(&addrs, &tables, &coordinator);
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let ones = vec![1f32; KEYS as usize];
    let push = |client: &Client| {
        let w = client.table("w").expect("table");
        client.push_range(&w, 0, &ones).and_then(|t| t.wait())
    };
    let older = Client::connect(&refs, worker_cfg(0)).expect("connect");
    for _ in 0..3 {
        push(&older).expect("the only client of worker 0");
    }
    let newer = Client::connect(&refs, worker_cfg(0)).expect("connect");
    for _ in 0..2 {
        push(&newer).expect("the newer client of worker 0 is taken at every head");
    }
    let err = push(&older).expect_err("the older client's push is refused");
    assert_eq!(err.status(), Some(tessera_transport::Status::WorkerIdInUse), "{err}");
    assert!(err.to_string().contains("worker id 0 is in use by another client"), "{err}");
    push(&newer).expect("the newer client goes on");
    let reader = Client::connect(&refs, worker_cfg(4)).expect("connect");
    let w = reader.table("w").expect("table");
    let mut values = vec![0f32; KEYS as usize];
    reader.pull_range(&w, 0, &mut values).and_then(|t| t.wait()).expect("pull");
    assert!(values.iter().all(|v| *v == 6.0), "every key holds the six acknowledged pushes: {:?}", &values[..8]);
}

/// A head that stops answering with its connections open (stopped with SIGSTOP, as a hung
/// process or a cut-off host would be) is taken out of its chains by the coordinator within the
/// failure timeout, and a worker waiting on it stops waiting then, not after the transport's
/// 30 s I/O timeout: its push and its pull go to the new chain within seconds, and once the
/// stopped server runs again it heals back in with every sum exact. A tail frozen under a pull
/// is passed over the same way.
#[test]
fn a_worker_waiting_on_a_frozen_head_moves_on_when_the_head_is_replaced() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-frozen-head");
    let tables = sum_table(&dir);
    let (coordinator, _coord, addrs) = three_replica_coordinator(&failure_timeout_ms(), SERVERS);
    let (servers, head) = start_chain(&addrs, &tables, &coordinator);
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let client = Client::connect(&refs, worker_cfg(0)).expect("connect");
    let table = client.table("w").expect("table w");
    let grads: Vec<f32> = (0..KEYS).map(|k| grad(0, k)).collect();
    client.push_range(&table, 0, &grads).and_then(|t| t.wait()).expect("a push through the chain");

    servers[head - 1].freeze();
    let began = Instant::now();
    client.push_range(&table, 0, &grads).and_then(|t| t.wait()).expect("a push while the head is frozen");
    let pushed = began.elapsed();
    let mut values = vec![0f32; KEYS as usize];
    client.pull_range(&table, 0, &mut values).and_then(|t| t.wait()).expect("a pull while the head is frozen");
    let took = began.elapsed();
    eprintln!("with the head frozen: the push took {pushed:?}, the pull after it {:?}", took - pushed);
    let timeout = Duration::from_millis(failure_timeout_ms().parse().unwrap());
    assert!(took < timeout + Duration::from_secs(10), "the push took {pushed:?} and the pull {:?}", took - pushed);
    for k in 0..KEYS {
        assert_eq!(values[k as usize], 2.0 * grad(0, k), "key {k}");
    }
    servers[head - 1].resume();
    wait_healed(&coordinator, None, heal_within());
    client.push_range(&table, 0, &grads).and_then(|t| t.wait()).expect("a push after the head came back");
    let reader = Client::connect(&refs, worker_cfg(7)).expect("connect");
    let w = reader.table("w").unwrap();
    reader.pull_range(&w, 0, &mut values).and_then(|t| t.wait()).expect("a pull after the head came back");
    for k in 0..KEYS {
        assert_eq!(values[k as usize], 3.0 * grad(0, k), "key {k}");
    }

    // A tail frozen under a pull: the pull is made again on the new chains.
    let chain = &status(&coordinator).expect("a status")["config"]["chains"][0]["nodes"];
    let tail = chain.as_array().and_then(|n| n.last()).and_then(|n| n.as_u64()).expect("a tail") as usize;
    servers[tail - 1].freeze();
    let began = Instant::now();
    values.fill(0.0);
    reader.pull_range(&w, 0, &mut values).and_then(|t| t.wait()).expect("a pull while a tail is frozen");
    let pulled = began.elapsed();
    eprintln!("with a tail frozen: the pull took {pulled:?}");
    assert!(pulled < timeout + Duration::from_secs(10), "the pull took {pulled:?}");
    for k in 0..KEYS {
        assert_eq!(values[k as usize], 3.0 * grad(0, k), "key {k}");
    }
    servers[tail - 1].resume();
}

/// A data directory names the cluster its data belongs to. A server started on another
/// cluster's disk is refused: by the server itself when that cluster is born, by the coordinator
/// while it is not. A coordinator that keeps no configuration, restarted, takes its servers'
/// cluster back from their disks, and their data with it.
#[test]
fn a_data_directory_of_another_cluster_is_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-cluster-name");
    let tables = sum_table(&dir);
    let data = |name: &str| dir.path().join(name).display().to_string();
    let coordinator = |servers: &str| {
        let addr = format!("127.0.0.1:{}", free_port());
        let args = ["--servers", servers, "--replicas", "1", "--ranges", "4", "--workers", "8", "--failure-timeout-ms", "1000"];
        let proc = ServerProc::coordinator_at(&addr, &args);
        (vec![addr], proc)
    };
    let server = |node: &str, coordinator: &str, data: &str| {
        let args =
            ["--node-id", node, "--tables", &tables, "--shards", "2", "--no-pin", "--coordinator", coordinator, "--durability", "wal", "--data-dir", data];
        ServerProc::start_env(&args, &[])
    };
    let name_of = |data: &str| std::fs::read_to_string(std::path::Path::new(data).join("cluster-name")).map(|n| n.trim().to_string());
    let pushed = |addr: &str, times: usize| {
        let client = Client::connect(&[addr], worker_cfg(0)).expect("connect");
        let table = client.table("w").expect("table w");
        let grads: Vec<f32> = (0..KEYS).map(|k| grad(0, k)).collect();
        for _ in 0..times {
            client.push_range(&table, 0, &grads).and_then(|t| t.wait()).expect("push");
        }
    };
    let sums = |addr: &str| {
        let client = Client::connect(&[addr], worker_cfg(7)).expect("connect");
        let mut values = vec![0f32; KEYS as usize];
        client.pull_range(&client.table("w").unwrap(), 0, &mut values).and_then(|t| t.wait()).expect("pull");
        values
    };
    // Every range on a member, none learning, with `members` members.
    let settled = |coordinator: &[String], members: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = status(coordinator).unwrap_or_default();
            let chains = s["config"]["chains"].as_array().cloned().unwrap_or_default();
            let whole = !chains.is_empty() && chains.iter().all(|c| c["nodes"].as_array().is_some_and(|n| !n.is_empty()) && c["learner"].is_null());
            if whole && s["config"]["members"].as_array().map_or(0, Vec::len) == members {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not settle with {members} members: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let want = |times: usize| (0..KEYS).map(|k| times as f32 * grad(0, k)).collect::<Vec<f32>>();

    // Cluster A: one server, three pushes; its data directory names A.
    let (coord_a, mut coord_a_proc) = coordinator("1");
    let mut a = server("1", &coord_a[0], &data("a")).expect("server of A");
    settled(&coord_a, 1);
    pushed(a.addr(), 3);
    let name_a = name_of(&data("a")).expect("the data directory names its cluster");
    assert_eq!(name_a.len(), 16, "{name_a:?}");

    // Cluster B, born on its own server.
    let (coord_b, _coord_b_proc) = coordinator("1");
    let b = server("1", &coord_b[0], &data("b")).expect("server of B");
    settled(&coord_b, 1);
    let name_b = name_of(&data("b")).expect("B's data directory names B");
    assert_ne!(name_a, name_b, "every cluster draws its own name");

    // A's disk, started against B: the server refuses, naming both clusters.
    a.kill();
    let refused = server("2", &coord_b[0], &data("a")).expect_err("a server on another cluster's disk");
    assert!(refused.contains(&format!("holds the data of cluster {name_a}")) && refused.contains(&name_b), "{refused}");

    // A's coordinator kept nothing. Restarted for a cluster of two, it takes A's name from the
    // first server's disk while it waits for the second, and refuses B's.
    coord_a_proc.kill();
    let (coord_a2, mut coord_a2_proc) = coordinator("2");
    let mut a = server("1", &coord_a2[0], &data("a")).expect("A's server again");
    let stranger = server("2", &coord_a2[0], &data("b")).expect("B's server starts, and waits for a configuration");
    assert!(stranger.wait_for_log("the coordinator refuses this server's heartbeats", Duration::from_secs(30)), "{}", stranger.log());
    assert!(stranger.log().contains(&format!("keeps the data of cluster {name_b}")), "{}", stranger.log());
    assert_eq!(status(&coord_a2).expect("the coordinator answers")["waiting_for"], 1, "B's server is not counted");
    drop(stranger);
    a.kill();
    coord_a2_proc.kill();

    // Restarted for a cluster of one, it is born with A's name, and the server's ranges come
    // back from its log; a server with an empty disk joins, and its disk names A too.
    let (coord_a3, _coord_a3_proc) = coordinator("1");
    let a = server("1", &coord_a3[0], &data("a")).expect("A's server again");
    settled(&coord_a3, 1);
    let named = status(&coord_a3).unwrap()["config"]["cluster"].as_u64().map(|c| format!("{c:016x}"));
    assert_eq!(named, Some(name_a.clone()));
    assert_eq!(sums(a.addr()), want(3), "A's pushes came back from its server's disk");
    let newcomer = server("3", &coord_a3[0], &data("fresh")).expect("a server with an empty disk");
    settled(&coord_a3, 2);
    assert_eq!(name_of(&data("fresh")).expect("the newcomer's disk names the cluster it joined"), name_a);
    assert_eq!(sums(newcomer.addr()), want(3));
    drop(b);
}

/// A server that stays up but is out of the configuration when a table is made at run time
/// (frozen past the failure timeout here) misses the creation. When it comes back, the first
/// snapshot naming the table it lacks has it make the cluster's tables, and it heals into every
/// chain without a restart, holding the table's sums.
#[test]
fn a_server_out_of_the_configuration_when_a_table_is_made_makes_it_when_it_returns() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-missed-table");
    let tables = sum_table(&dir);
    let (coordinator, _coord, addrs) = three_replica_coordinator("1000", SERVERS);
    let start = |i: usize| {
        let node = (i + 1).to_string();
        ServerProc::start_at(&addrs[i], &["--node-id", &node, "--shards", "2", "--no-pin", "--coordinator", &coordinator[0], "--tables", &tables])
    };
    let mut servers: Vec<ServerProc> = (0..SERVERS).map(start).collect();
    wait_healed(&coordinator, None, Duration::from_secs(30));

    // Server 3 freezes, and is taken out of every chain.
    let old = incarnation(&status(&coordinator).expect("status"), 3);
    servers[2].freeze();
    assert!(detected(&coordinator, 3, old, Duration::from_secs(30)).is_some(), "the frozen server was not taken out");
    // Servers 1 and 2 have heard of it too, so a client routes by a configuration without it.
    let deadline = Instant::now() + Duration::from_secs(30);
    for addr in &addrs[..2] {
        while tessera_transport::ask(addr, Op::ClusterConfig, &[], &TransportConfig::default())
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_none_or(|v| v["config"]["members"].as_array().is_none_or(|m| m.iter().any(|m| m["node"] == 3)))
        {
            assert!(Instant::now() < deadline, "server {addr} did not hear of the configuration without server 3");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A client that knows servers 1 and 2 makes a table, and pushes to it.
    let client = Client::connect(&[addrs[0].as_str(), addrs[1].as_str()], worker_cfg(0)).expect("connect");
    make_runtime_table(&client);
    drop(client);

    // It comes back, lacking the table; it makes it and heals into every chain.
    servers[2].resume();
    let procs: Vec<&ServerProc> = servers.iter().collect();
    wait_healed_or_dump(&coordinator, None, heal_within().max(Duration::from_secs(60)), &procs);
    assert!(servers[2].log().contains("names a table this server lacks"), "{}", servers[2].log());

    // With servers 1 and 2 gone, server 3 alone serves the table's sums.
    servers[0].kill();
    servers[1].kill();
    check_runtime_table(&[addrs[2].as_str()]);
}

/// The memory the servers at `addrs` hold for table parts, each the sum over its shards.
/// A coordinator at a free port for a cluster born of two servers keeping `replicas` replicas of
/// `ranges` ranges, for tests that grow it: its address, its process, and `servers` addresses
/// for servers ([`start_member`]).
fn growing_cluster(replicas: &str, ranges: &str, servers: usize) -> (String, ServerProc, Vec<String>) {
    let coordinator = format!("127.0.0.1:{}", free_port());
    let args = ["--servers", "2", "--replicas", replicas, "--ranges", ranges, "--workers", "8", "--failure-timeout-ms", "1000"];
    let process = ServerProc::coordinator_at(&coordinator, &args);
    let addrs = (0..servers).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    (coordinator, process, addrs)
}

/// Starts server `i` (node `i + 1`, two shards) at `addrs[i]`, joining `coordinator`'s cluster
/// with the tables file `tables`.
fn start_member(addrs: &[String], i: usize, coordinator: &str, tables: &str) -> ServerProc {
    let node = (i + 1).to_string();
    ServerProc::start_at(&addrs[i], &["--node-id", &node, "--shards", "2", "--no-pin", "--coordinator", coordinator, "--tables", tables])
}

/// Waits until `done`, polling; after `within`, fails saying `what` did not happen, with the
/// configuration of the coordinator at `coordinator`.
fn wait_for(coordinator: &str, within: Duration, what: &str, done: &dyn Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        let now = status_of(coordinator).map(|s| s["config"].to_string()).unwrap_or_default();
        assert!(Instant::now() < deadline, "{what} within {within:?}; the configuration: {now}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the coordinator at `coordinator` has every chain at `replicas` members with no
/// learner, and exactly `nodes` servers in chains.
fn settled_on(coordinator: &str, replicas: usize, nodes: usize) -> bool {
    let Some(s) = status_of(coordinator) else { return false };
    let chains = s["config"]["chains"].as_array().cloned().unwrap_or_default();
    let mut placed: Vec<u64> = chains.iter().flat_map(|c| c["nodes"].as_array().cloned().unwrap_or_default()).filter_map(|n| n.as_u64()).collect();
    placed.sort_unstable();
    placed.dedup();
    !chains.is_empty() && chains.iter().all(|c| c["nodes"].as_array().map_or(0, Vec::len) == replicas && c["learner"].is_null()) && placed.len() == nodes
}

fn memory_of(addrs: &[String]) -> Vec<u64> {
    let of = |addr: &String| {
        let body = tessera_transport::ask(addr, Op::Status, &[], &TransportConfig::default()).expect("a server's status");
        let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
        status["shards"].as_array().unwrap().iter().map(|s| s["bytes_mapped"].as_u64().unwrap()).sum()
    };
    addrs.iter().map(of).collect()
}

/// Servers add room, not copies: a replicated server holds memory only for the ranges whose
/// chains it is in. Two servers keeping two replicas each hold every range of a dense table;
/// once two more join, the ring gives each about half the chains, the memory each server holds
/// for the table falls to about half, and every value pushed before is still there.
#[test]
fn memory_per_server_falls_as_servers_join() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const KEYS: u64 = 1 << 20;
    const DIM: usize = 4;
    let dir = ScratchDir::new("replication-capacity");
    let tables = dir.write("tables.toml", &format!("[[table]]\nname = \"big\"\nkind = \"dense\"\nstart = 0\nend = {KEYS}\ndim = {DIM}\nupdater = \"sum\"\n"));
    let tables = tables.to_str().unwrap();
    let (coordinator, _coord, addrs) = growing_cluster("2", "32", 4);
    let start = |i: usize| start_member(&addrs, i, &coordinator, tables);
    let settled = |nodes: usize| settled_on(&coordinator, 2, nodes);
    let wait = |what: &str, done: &dyn Fn() -> bool| wait_for(&coordinator, heal_within().max(Duration::from_secs(60)), what, done);
    let mut servers: Vec<ServerProc> = (0..2).map(start).collect();
    wait("two servers did not make a cluster", &|| settled(2));
    let table_bytes = KEYS * DIM as u64 * 4;
    // The servers make their parts as they hear of the chains they are in.
    wait("the servers did not make their parts", &|| memory_of(&addrs[..2]).iter().all(|m| *m >= table_bytes));
    let before = memory_of(&addrs[..2]);
    for m in &before {
        assert!(*m >= table_bytes, "a server of two, with two replicas, holds the whole table: {m} bytes of {table_bytes}");
    }

    // Values to find again after the servers join.
    let client = Client::connect(&[addrs[0].as_str(), addrs[1].as_str()], worker_cfg(0)).expect("connect");
    let big = client.table("big").unwrap();
    let values: Vec<f32> = (0..KEYS as usize * DIM).map(|i| (i % 1000) as f32).collect();
    client.push_range(&big, 0, &values).and_then(|t| t.wait()).expect("push");
    drop(client);

    servers.extend((2..4).map(start));
    wait("four servers did not settle on two replicas each", &|| settled(4));
    // Each server drops the ranges the ring moved away once it hears of their new chains.
    let full = before.iter().copied().max().unwrap();
    let settled_memory = |after: &[u64]| after.iter().all(|m| *m * 4 <= full * 3) && after.iter().sum::<u64>() <= full * 2 + full / 100;
    let mut after = memory_of(&addrs);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !settled_memory(&after) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = memory_of(&addrs);
    }
    println!("memory per server: two servers {before:?}, four servers {after:?} (bytes; the table is {table_bytes} bytes)");
    for (i, m) in after.iter().enumerate() {
        assert!(*m * 4 <= full * 3, "server {} holds {m} bytes, of {full} with two servers: joining servers added no room", i + 1);
        assert!(*m > 0, "server {} holds nothing: {after:?}", i + 1);
    }
    let total: u64 = after.iter().sum();
    assert!(total <= full * 2 + full / 100, "four servers hold {total} bytes for two replicas of {full}: more than two copies");

    let reader = Client::connect(&addrs.iter().map(String::as_str).collect::<Vec<_>>(), worker_cfg(1)).expect("connect");
    let big = reader.table("big").unwrap();
    let mut got = vec![0f32; values.len()];
    reader.pull_range(&big, 0, &mut got).and_then(|t| t.wait()).expect("pull");
    assert!(got == values, "the values pushed before the servers joined are not all there");
}

/// An unreplicated cluster (every range on a chain of one) is placed on the ring like a
/// replicated one, and grows and shrinks while training runs: two servers start, four workers
/// push, a third server joins and takes its share of the ranges (each copied from the server
/// that held it while pushes go on), then the first is drained and stops by itself. Every
/// acknowledged push is on the two servers left, exactly once.
#[test]
fn an_unreplicated_cluster_grows_and_shrinks_while_workers_push() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-unreplicated");
    let tables = sum_table(&dir);
    let (coordinator, _coord, addrs) = growing_cluster("1", "16", 3);
    let start = |i: usize| start_member(&addrs, i, &coordinator, &tables);
    let wait = |what: &str, done: &dyn Fn() -> bool| wait_for(&coordinator, heal_within(), what, done);
    let mut servers: Vec<ServerProc> = (0..2).map(start).collect();
    wait("two servers did not make a cluster", &|| settled_on(&coordinator, 1, 2));

    let stop = Arc::new(AtomicBool::new(false));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..WORKERS).map(|_| AtomicU64::new(0)).collect());
    let handles = start_workers(&addrs[..2], &stop, &progress, Instant::now());
    wait_progress(&progress, Duration::from_secs(60), "on two servers");

    servers.push(start(2));
    wait("the third server did not take its share of the ranges", &|| settled_on(&coordinator, 1, 3));
    let chains = status_of(&coordinator).expect("the coordinator answers")["config"]["chains"].as_array().cloned().unwrap_or_default();
    let on_third = chains.iter().filter(|c| c["nodes"][0] == 3).count();
    eprintln!("node 3 joined: it holds {on_third} of {} ranges", chains.len());
    assert!(on_third > 0, "the joining server holds no range");
    wait_progress(&progress, Duration::from_secs(60), "after a server joined");

    let drained = run_tool(&["drain", addrs[0].as_str(), "--coordinator", &coordinator], heal_within());
    assert!(drained.status.success(), "tessera drain failed:\n{}", drained.stderr);
    eprint!("{}", drained.stderr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while servers[0].is_running() {
        assert!(Instant::now() < deadline, "the drained server did not stop:\n{}", servers[0].log());
        std::thread::sleep(Duration::from_millis(20));
    }
    wait("the two servers left did not hold every range", &|| settled_on(&coordinator, 1, 2));
    wait_progress(&progress, Duration::from_secs(60), "after a server was drained");

    stop.store(true, Ordering::Release);
    let results: Vec<WorkerRun> = handles.into_iter().map(|h| h.join().expect("worker")).collect();
    let pushes: Vec<usize> = results.iter().map(|r| r.0.len()).collect();
    check_none_lost(&results);
    check_sums(&[addrs[1].as_str(), addrs[2].as_str()], &pushes);
    let refreshes: u64 = results.iter().map(|r| r.1.refreshes).sum();
    eprintln!(
        "unreplicated cluster, 2 -> 3 -> 2 servers under training: {} iterations acknowledged, every one there once ({refreshes} configuration fetches)",
        pushes.iter().sum::<usize>()
    );
}

/// Three servers on `wal`, each with its data directory, for a coordinator keeping every range
/// on a chain of three ([`three_replica_coordinator`]), started by the test as it needs them.
struct WalCluster {
    dir: ScratchDir,
    tables: String,
    coordinator: Vec<String>,
    _coordinator: ServerProc,
    addrs: Vec<String>,
    /// Flags every server gets beyond the cluster's.
    extra: Vec<String>,
}

impl WalCluster {
    fn new(label: &str, extra: &[&str]) -> WalCluster {
        let dir = ScratchDir::new(label);
        let tables = sum_table(&dir);
        let (coordinator, process, addrs) = three_replica_coordinator("1000", SERVERS);
        WalCluster { dir, tables, coordinator, _coordinator: process, addrs, extra: extra.iter().map(|s| s.to_string()).collect() }
    }

    /// Server `i`'s data directory.
    fn data(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("server-{}", i + 1))
    }

    /// Starts server `i` (node `i + 1`) on its data directory, with `extra` flags too.
    fn start(&self, i: usize, extra: &[&str]) -> Result<ServerProc, String> {
        let (node, data) = ((i + 1).to_string(), self.data(i).display().to_string());
        let mut args = vec!["--node-id", &node, "--shards", "2", "--no-pin", "--coordinator", &self.coordinator[0], "--tables", &self.tables];
        args.extend(["--durability", "wal", "--data-dir", &data, "--checkpoint-interval-s", "0"]);
        args.extend(self.extra.iter().map(String::as_str));
        args.extend(extra);
        ServerProc::spawn(&self.addrs[i], &args)
    }

    fn refs(&self) -> Vec<&str> {
        self.addrs.iter().map(String::as_str).collect()
    }
}

/// Pushes `rounds` rounds of worker 0's gradients to `w` and `emb` through `client`, each
/// waited for (acknowledged), counting them in `pushes[0]`.
fn push_rounds(client: &Client, pushes: &mut [usize], rounds: usize) {
    let (w, emb) = (client.table("w").unwrap(), client.table("emb").unwrap());
    let (grads, keys) = ((0..KEYS).map(|k| grad(0, k)).collect::<Vec<f32>>(), sparse_keys(0));
    for _ in 0..rounds {
        pushes[0] += 1;
        client.set_clock(pushes[0] as u64);
        client.push_range(&w, 0, &grads).and_then(|t| t.wait()).expect("push");
        client.push(&emb, &keys, &sparse_grads(0, &keys)).and_then(|t| t.wait()).expect("push");
    }
}

/// A replicated server whose log is damaged (bytes flipped in records that later commits
/// follow, so acknowledged updates are behind the damage) refuses to start and says why. Started
/// to accept the loss, it replays what precedes the damage, rejoins its chains and takes what it
/// lacks from them: with the other two servers gone, it alone serves every sum exactly.
#[test]
fn a_replica_whose_log_is_damaged_is_refused_then_catches_up_from_its_chain() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = WalCluster::new("replication-damaged-log", &[]);
    let (coordinator, addrs, data) = (&cluster.coordinator, &cluster.addrs, |i: usize| cluster.data(i));
    let start = |i: usize, extra: &[&str]| cluster.start(i, extra);
    let mut servers: Vec<ServerProc> = (0..SERVERS).map(|i| start(i, &[]).expect("a server starts")).collect();
    wait_healed(coordinator, None, Duration::from_secs(30));

    // Pushes, each acknowledged once every member's log holds it.
    let client = Client::connect(&cluster.refs(), worker_cfg(0)).expect("connect");
    let mut pushes = vec![0usize; WORKERS as usize];
    push_rounds(&client, &mut pushes, 40);
    drop(client);

    // Server 3 dies, and its logs take damage in their first half, before later commits.
    let old = incarnation(&status(coordinator).expect("status"), 3);
    servers[2].kill();
    let mut damaged = 0;
    for shard in std::fs::read_dir(data(2)).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for log in std::fs::read_dir(shard.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("wal-")) {
            let mut bytes = std::fs::read(log.path()).unwrap();
            let pages = bytes.len() / 4096;
            for page in 1..pages / 2 {
                bytes[page * 4096 + 40] ^= 0x04;
                damaged += 1;
            }
            std::fs::write(log.path(), bytes).unwrap();
        }
    }
    assert!(damaged > 0, "server 3's logs hold too little to damage");
    match start(2, &[]) {
        Ok(server) => panic!("a server with a damaged log started:\n{}", server.log()),
        Err(log) => assert!(log.contains("cannot recover") && log.contains("--accept-data-loss"), "the refusal does not say why and what to do:\n{log}"),
    }

    // Accepting the loss, it comes back and heals into every chain from its peers.
    servers[2] = start(2, &["--accept-data-loss"]).expect("a server accepting the loss starts");
    assert!(servers[2].log().contains("recovering past lost data"), "{}", servers[2].log());
    let procs: Vec<&ServerProc> = servers.iter().collect();
    wait_healed_or_dump(coordinator, Some((3, old)), heal_within(), &procs);
    servers[0].kill();
    servers[1].kill();
    check_sums(&[addrs[2].as_str()], &pushes);
}

/// A server killed with `kill -9` and restarted on its disk resumes every range from its log:
/// its chains' tails send only the updates it missed while it was down, no snapshot, and it
/// alone then serves every sum exactly.
#[test]
fn a_server_restarted_after_kill_9_takes_only_what_it_missed_from_its_chain() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = WalCluster::new("replication-resume", &["--log", "info"]);
    let (coordinator, addrs) = (&cluster.coordinator, &cluster.addrs);
    let mut servers: Vec<ServerProc> = (0..SERVERS).map(|i| cluster.start(i, &[]).expect("a server starts")).collect();
    wait_healed(coordinator, None, Duration::from_secs(30));
    let client = Client::connect(&cluster.refs(), worker_cfg(0)).expect("connect");
    let mut pushes = vec![0usize; WORKERS as usize];
    push_rounds(&client, &mut pushes, 30);

    // Server 3 dies; the others go on without it, and it misses ten rounds.
    let old = incarnation(&status(coordinator).expect("status"), 3);
    servers[2].kill();
    detected(coordinator, 3, old, Duration::from_secs(30)).expect("the kill is noticed");
    push_rounds(&client, &mut pushes, 10);
    drop(client);

    // Restarted on its disk, it rejoins every chain from what its log holds.
    servers[2] = cluster.start(2, &[]).expect("the server restarts on its disk");
    let procs: Vec<&ServerProc> = servers.iter().collect();
    wait_healed_or_dump(coordinator, Some((3, old)), heal_within(), &procs);
    let log = servers[2].log();
    let resumed = log.matches("a range resumed from what this server held").count();
    let snapshots = log.matches("snapshot installed").count();
    eprintln!("the restarted server logged {resumed} resumes and {snapshots} snapshots installed");
    assert!(resumed > 0, "no range resumed from the restarted server's log:\n{log}");
    assert_eq!(snapshots, 0, "a range took a snapshot though the log covered what it missed:\n{log}");
    servers[0].kill();
    servers[1].kill();
    check_sums(&[addrs[2].as_str()], &pushes);
}

/// Replicas with `--durability checkpoint`: no log, a checkpoint every so often. A member killed
/// with `kill -9` comes back from its last checkpoint and catches up from its chain, so nothing
/// acknowledged is lost while one member of each chain lives; after a whole-cluster crash, what
/// the last checkpoint holds is back (and the pushes acknowledged after it may be gone, as on an
/// unreplicated server in this mode).
#[test]
fn checkpoint_replicas_catch_up_after_kill_9_and_come_back_from_their_checkpoints() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = ScratchDir::new("replication-checkpoint");
    let tables = sum_table(&dir);
    let (coordinator, _coord, addrs) = three_replica_coordinator("1000", SERVERS);
    let data: Vec<String> = (0..SERVERS).map(|i| dir.path().join(format!("s{i}")).to_str().unwrap().to_string()).collect();
    let start = |i: usize| {
        let node = (i + 1).to_string();
        let args = [
            "--node-id",
            &node,
            "--tables",
            &tables,
            "--shards",
            "1",
            "--no-pin",
            "--coordinator",
            &coordinator[0],
            "--durability",
            "checkpoint",
            "--data-dir",
            &data[i],
        ];
        ServerProc::start_at(&addrs[i], &args)
    };
    let mut servers: Vec<ServerProc> = (0..SERVERS).map(start).collect();
    wait_healed(&coordinator, None, heal_within());
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let value = |refs: &[&str]| {
        let client = Client::connect(refs, worker_cfg(1)).expect("connect");
        let mut out = vec![0f32; KEYS as usize];
        client.pull_range(&client.table("w").unwrap(), 0, &mut out).expect("pull").wait().expect("pulled");
        assert!(out.iter().all(|v| *v == out[0]), "a push was half applied");
        out[0]
    };
    let client = Client::connect(&refs, worker_cfg(0)).expect("connect");
    let table = client.table("w").expect("table w");
    let push = |n: usize| (0..n).for_each(|_| client.push_range(&table, 0, &vec![1.0; KEYS as usize]).and_then(|t| t.wait()).map(drop).expect("push"));
    push(5);
    client.checkpoint().expect("every server checkpoints");
    push(3);

    // One member killed and restarted: back from its checkpoint, caught up from its chain.
    let old = status(&coordinator).and_then(|s| incarnation(&s, 2));
    servers[1].kill();
    servers[1] = start(1);
    wait_healed(&coordinator, Some((2, old)), heal_within());
    assert_eq!(value(&refs), 8.0, "acknowledged pushes lost with one member");
    // The restarted member alone holds every acknowledged push.
    servers[0].kill();
    servers[2].kill();
    let deadline = Instant::now() + heal_within();
    loop {
        let alone = status(&coordinator)
            .and_then(|s| s["config"]["chains"].as_array().cloned())
            .is_some_and(|chains| chains.iter().all(|c| c["nodes"].as_array().is_some_and(|n| n.len() == 1 && n[0] == 2)));
        if alone {
            break;
        }
        assert!(Instant::now() < deadline, "the chains never came down to the restarted member");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(value(&refs[1..2]), 8.0, "the restarted member did not catch up");

    // Every server killed at once and restarted: the checkpoint's pushes are back.
    servers[1].kill();
    let _servers: Vec<ServerProc> = (0..SERVERS).map(start).collect();
    wait_healed(&coordinator, None, heal_within());
    let back = value(&refs);
    assert!((5.0..=8.0).contains(&back), "after a whole-cluster crash the table holds {back}, not the checkpoint's 5 or more");
    println!("after a whole-cluster crash: {back} of 8 acknowledged pushes (5 checkpointed)");

    // The worker that pushed them goes on: its next push is applied, not taken for one after a
    // gap and dropped, and what the cluster lost of its pushes is counted.
    let began = Instant::now();
    push(1);
    println!("the worker's next push took {:?}", began.elapsed());
    assert_eq!(value(&refs), back + 1.0);
    // Each push reached the table's 4 ranges: a piece lost on each.
    assert_eq!(client.chain_stats().push_pieces_lost, 4 * (8 - back as u64));
}
