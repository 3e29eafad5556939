//! Chain replication with real processes: three servers holding every range on a chain of all
//! three, and four workers training a dense `sum` table. Servers are killed with `kill -9` at
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tessera_client::ChainClient;
use tessera_tests::{free_port, run_tool, EtcdProc, ScratchDir, ServerProc};
use tessera_transport::{Op, TransportConfig};

const SERVERS: usize = 3;
const WORKERS: u32 = 4;
const KEYS: u64 = 2048;

fn grad(worker: u32, key: u64) -> f32 {
    (worker + 1) as f32 * ((key % 5) + 1) as f32
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

/// Waits until every chain is whole again (all servers, no learner), with node `node` (if
/// given) in it under another incarnation than `old`: the restart was noticed, and healed.
fn wait_healed(coordinator: &[String], restarted: Option<(usize, Option<u64>)>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = status(coordinator) {
            let chains = s["config"]["chains"].as_array().cloned().unwrap_or_default();
            let whole = !chains.is_empty()
                && chains.iter().all(|c| c["nodes"].as_array().map_or(0, Vec::len) == SERVERS && c["learner"].is_null());
            let noticed = restarted.is_none_or(|(node, old)| incarnation(&s, node).is_some_and(|i| Some(i) != old));
            if whole && noticed {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the cluster did not heal within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
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
    let tables = dir.write("tables.toml", &format!("[[table]]\nname = \"w\"\nkind = \"dense\"\nstart = 0\nend = {KEYS}\ndim = 1\nupdater = \"sum\"\n"));
    let tables = tables.to_str().unwrap().to_string();
    let etcd = with_etcd.then(EtcdProc::start);
    // Where servers find the coordinator: etcd, or the one coordinator's address.
    let coordinators: Vec<String> = (0..if with_etcd { 2 } else { 1 }).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let find: Vec<String> = match &etcd {
        Some(etcd) => vec!["--etcd".into(), etcd.endpoint().into()],
        None => vec!["--coordinator".into(), coordinators[0].clone()],
    };
    let start_coordinator = |i: usize| {
        let mut args = ["--servers", "3", "--replicas", "3", "--ranges", "16", "--workers", "8", "--failure-timeout-ms", "500"].map(String::from).to_vec();
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
    let epoch = Instant::now();
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let (stop, addrs) = (stop.clone(), addrs[..SERVERS].to_vec());
        handles.push(std::thread::spawn(move || {
            let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            let mut client = ChainClient::connect(&refs, w, TransportConfig::default()).expect("connect");
            let table = client.table("w").expect("table w");
            let grads: Vec<f32> = (0..KEYS).map(|k| grad(w, k)).collect();
            let mut done_at = Vec::new();
            while !stop.load(Ordering::Acquire) {
                client.set_clock(done_at.len() as u64 + 1);
                client.push_range(&table, 0, &grads).expect("a push is eventually acknowledged");
                done_at.push(epoch.elapsed());
            }
            (done_at, client.stats)
        }));
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e55e7a);
    let mut kill_times = Vec::new();
    let mut failover = None;
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..600)));
        let victim = rng.gen_range(0..SERVERS);
        let old = status(&coordinators).and_then(|s| incarnation(&s, victim + 1));
        kill_times.push(epoch.elapsed());
        servers[victim].kill();
        eprintln!("kill {k}: server {} at {:?}", victim + 1, epoch.elapsed());
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..800)));
        servers[victim] = start(victim);
        wait_healed(&coordinators, Some((victim + 1, old)), Duration::from_secs(60));
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
    // Then one server leaves for good, gracefully, while the workers push: `tessera drain`
    // waits until it is out of every chain and the configuration, and the server stops itself.
    // A drain of no member is refused, naming the members, and changes nothing.
    let mut wrong = vec!["drain", "127.0.0.1:1"];
    wrong.extend(find.iter().map(String::as_str));
    let refused = run_tool(&wrong, Duration::from_secs(30));
    assert!(!refused.status.success() && refused.stderr.contains("no member"), "{}", refused.stderr);
    let mut drain_args = vec!["drain", addrs[SERVERS - 1].as_str()];
    drain_args.extend(find.iter().map(String::as_str));
    let drained = run_tool(&drain_args, Duration::from_secs(60));
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
    wait_healed(&coordinators, None, Duration::from_secs(60));
    eprintln!("node {} joined every chain", SERVERS + 1);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("worker")).collect();

    // Exactly every acknowledged push, once.
    let live = [0, 1, SERVERS].map(|i| addrs[i].as_str());
    let refs: Vec<&str> = live.to_vec();
    let mut checker = ChainClient::connect(&refs, 7, TransportConfig::default()).unwrap();
    let table = checker.table("w").unwrap();
    let mut values = vec![0f32; KEYS as usize];
    checker.pull_range(&table, 0, &mut values).unwrap();
    for k in 0..KEYS {
        let want: f32 = (0..WORKERS).map(|w| results[w as usize].0.len() as f32 * grad(w, k)).sum();
        assert_eq!(values[k as usize], want, "key {k}");
    }

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
    pauses.sort();
    let pushes: usize = results.iter().map(|r| r.0.len()).sum();
    let resends: u64 = results.iter().map(|r| r.1.resends).sum();
    let coordination = if with_etcd { "etcd, 2 coordinators" } else { "embedded coordinator" };
    eprintln!(
        "replication kill test ({coordination}): {kills} kills, {pushes} pushes acknowledged ({resends} resend rounds); pause after a kill p50 {:?}, max {:?}; coordinator failover {failover:?}",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
    let _ = std::io::Write::flush(&mut std::io::stderr());
    drop(servers);
    drop(coordinator_procs);
}
