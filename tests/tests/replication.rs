//! Chain replication with real processes: a coordinator, three servers holding every range on
//! a chain of all three, and four workers training a dense `sum` table. Servers are killed with
//! `kill -9` at random times, one at a time, and restarted; each kill takes out a head of some
//! ranges, a middle of others and a tail of the rest.
//!
//! Each worker pushes small integers, so sums are exact in any order. At the end, every key
//! must hold exactly the sum of every acknowledged push of every worker, as in a run without
//! failures: nothing acknowledged lost, nothing applied twice. The test prints the pause each
//! kill caused (the longest wait, over workers, for the push in flight at the kill).
//!
//! `REPLICATION_KILLS` sets the number of kills (default 20).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tessera_client::ChainClient;
use tessera_tests::{free_port, ScratchDir, ServerProc};
use tessera_transport::{Op, TransportConfig};

const SERVERS: usize = 3;
const WORKERS: u32 = 4;
const KEYS: u64 = 2048;

fn grad(worker: u32, key: u64) -> f32 {
    (worker + 1) as f32 * ((key % 5) + 1) as f32
}

/// The coordinator's status.
fn status(coordinator: &str) -> Option<serde_json::Value> {
    let body = tessera_transport::ask(coordinator, Op::Status, &[], &TransportConfig::default()).ok()?;
    Some(serde_json::from_slice(&body).expect("status is JSON"))
}

/// Node `node`'s incarnation in the configuration.
fn incarnation(status: &serde_json::Value, node: usize) -> Option<u64> {
    let members = status["config"]["members"].as_array()?;
    members.iter().find(|m| m["node"] == node as u64)?["incarnation"].as_u64()
}

/// Waits until every chain is whole again (all servers, no learner), with node `node` (if
/// given) in it under another incarnation than `old`: the restart was noticed, and healed.
fn wait_healed(coordinator: &str, restarted: Option<(usize, Option<u64>)>, within: Duration) {
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
fn training_survives_kill_9_of_heads_middles_and_tails() {
    let kills: usize = std::env::var("REPLICATION_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let dir = ScratchDir::new("replication");
    let tables = dir.write("tables.toml", &format!("[[table]]\nname = \"w\"\nkind = \"dense\"\nstart = 0\nend = {KEYS}\ndim = 1\nupdater = \"sum\"\n"));
    let tables = tables.to_str().unwrap().to_string();
    let coordinator_addr = format!("127.0.0.1:{}", free_port());
    let _coordinator = ServerProc::coordinator_at(
        &coordinator_addr,
        &["--servers", "3", "--replicas", "3", "--ranges", "16", "--workers", "8", "--failure-timeout-ms", "500"],
    );
    let addrs: Vec<String> = (0..SERVERS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let server_args = |node: usize| -> Vec<String> {
        let node = (node + 1).to_string();
        ["--node-id", &node, "--coordinator", &coordinator_addr, "--tables", &tables, "--shards", "2", "--no-pin"].map(String::from).to_vec()
    };
    let start = |i: usize| {
        let args = server_args(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ServerProc::start_at(&addrs[i], &args)
    };
    let mut servers: Vec<ServerProc> = (0..SERVERS).map(start).collect();
    wait_healed(&coordinator_addr, None, Duration::from_secs(30));

    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let (stop, addrs) = (stop.clone(), addrs.clone());
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
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..600)));
        let victim = rng.gen_range(0..SERVERS);
        let old = status(&coordinator_addr).and_then(|s| incarnation(&s, victim + 1));
        kill_times.push(epoch.elapsed());
        servers[victim].kill();
        eprintln!("kill {k}: server {} at {:?}", victim + 1, epoch.elapsed());
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..800)));
        servers[victim] = start(victim);
        wait_healed(&coordinator_addr, Some((victim + 1, old)), Duration::from_secs(60));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("worker")).collect();

    // Exactly every acknowledged push, once.
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
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
    eprintln!(
        "replication kill test: {kills} kills, {pushes} pushes acknowledged ({resends} resend rounds); pause after a kill p50 {:?}, max {:?}",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
    let _ = std::io::Write::flush(&mut std::io::stderr());
    drop(servers);
}
