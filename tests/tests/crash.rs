//! Crash recovery in `wal` mode, with real processes: a `tessera server` is killed with
//! `kill -9` at a random moment while several workers push, restarted on the same data
//! directory, and checked, many times over.
//!
//! The server has two shards. Each worker owns a range of keys of a dense `sum` table, inside
//! one shard's part, and pushes 1.0 to every key of it and to the one key its shard's workers
//! share, in one push (one request), its clock counting its pushes. So after a restart:
//! - a worker's keys hold how many of its pushes the server applied, and its clock stamp there
//!   says the same;
//! - that count is at least the pushes acknowledged (nothing acknowledged is lost) and at most
//!   one more (only the push in flight at the kill may have landed unacknowledged, and once);
//! - each shared key holds, exactly, the sum of the counts of the workers that push to it.
//!
//! Workers then go on from the recovered count, so a push that landed unacknowledged is never
//! pushed again. The server checkpoints every second, so recoveries load checkpoints and replay
//! the log after them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_client::{Client, ClientConfig, Table};
use tessera_replication::{TableKind, TableSpec};
use tessera_tests::{ScratchDir, ServerProc};

const SHARDS: u64 = 2;
const WORKERS: u64 = 4;
/// Workers per shard part; each part holds their keys, then their shared key.
const WORKERS_PER_PART: u64 = WORKERS / SHARDS;
const KEYS_PER_WORKER: u64 = 256;
const PART_KEYS: u64 = WORKERS_PER_PART * KEYS_PER_WORKER + 1;
const KILLS: usize = 8;
/// The server runs this long, at random, before it is killed.
const RUN_MS: std::ops::Range<u64> = 150..1200;

fn spec() -> TableSpec {
    TableSpec::new("crash", TableKind::Dense, 0, SHARDS * PART_KEYS, 1)
}

/// Where worker `w` pushes: its own keys, then its shard's shared key; all in one shard's part.
fn keys_of(parts: &[(u64, u64)], w: u64) -> (Vec<u64>, u64) {
    let (start, end) = parts[(w / WORKERS_PER_PART) as usize];
    assert_eq!(end - start, PART_KEYS, "the table splits evenly over the shards");
    let first = start + (w % WORKERS_PER_PART) * KEYS_PER_WORKER;
    ((first..first + KEYS_PER_WORKER).collect(), start + WORKERS_PER_PART * KEYS_PER_WORKER)
}

/// The table's parts, by shard.
fn parts(client: &Client) -> Vec<(u64, u64)> {
    let entry = client.catalogs().unwrap().remove(0).into_iter().find(|e| e.spec.name == "crash").expect("the table");
    let mut parts: Vec<_> = entry.parts.iter().map(|p| (p.start, p.end)).collect();
    parts.sort_unstable();
    parts
}

/// A small xorshift, seeded from the clock so that each run kills at other moments (the seed
/// is printed).
fn rng() -> impl FnMut() -> u64 {
    let mut x = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("seed {x}");
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// A server on `data`; `blocking` writes with pwrite/fsync instead of io_uring.
fn server(data: &ScratchDir, blocking: bool) -> ServerProc {
    let dir = data.path().to_str().unwrap();
    let mut args = vec!["--shards", "2", "--no-pin", "--durability", "wal", "--data-dir", dir, "--checkpoint-interval-s", "1"];
    if blocking {
        args.push("--disk-blocking");
    }
    ServerProc::start(&args)
}

/// Reads the table back and checks it against the acknowledged counts; returns each worker's
/// applied count.
fn check(addr: &str, acked: &[u64], round: usize) -> Vec<u64> {
    let client = Client::connect(&[addr], ClientConfig::worker(WORKERS as u32)).expect("connect after restart");
    let table = client.table("crash").expect("the table survives a restart (the catalog file)");
    let parts = parts(&client);
    let mut values = vec![0f32; (SHARDS * PART_KEYS) as usize];
    client.pull_range(&table, 0, &mut values).unwrap().wait().unwrap();
    let mut applied = Vec::new();
    for w in 0..WORKERS {
        let (keys, _) = keys_of(&parts, w);
        let mine: Vec<f32> = keys.iter().map(|k| values[*k as usize]).collect();
        let n = mine[0];
        assert!(mine.iter().all(|v| *v == n), "round {round}: worker {w}'s keys differ, a push half-applied: {mine:?}");
        let n = n as u64;
        let a = acked[w as usize];
        assert!(n >= a, "round {round}: worker {w} had {a} pushes acknowledged, only {n} survived");
        assert!(n <= a + 1, "round {round}: worker {w} had {a} pushes acknowledged, yet {n} were applied");
        let mut out = vec![0f32; KEYS_PER_WORKER as usize];
        let stamp = client.pull_range(&table, keys[0], &mut out).unwrap().wait().unwrap();
        assert_eq!(stamp.get(w as usize), n, "round {round}: worker {w}'s clock stamp against its applied count");
        applied.push(n);
    }
    for s in 0..SHARDS {
        let (_, shared) = keys_of(&parts, s * WORKERS_PER_PART);
        let want: u64 = (0..WORKERS_PER_PART).map(|i| applied[(s * WORKERS_PER_PART + i) as usize]).sum();
        assert_eq!(values[shared as usize], want as f32, "round {round}: shard {s}'s shared key against its workers' pushes");
    }
    applied
}

/// Pushes one at a time, from `applied` pushes on, until the server dies; returns the pushes
/// acknowledged in all.
fn push_until_killed(client: &Client, table: &Table, keys: &[u64], w: u64, applied: u64, stop: &AtomicBool) -> u64 {
    let ones = vec![1f32; keys.len()];
    let mut acked = applied;
    loop {
        client.set_clock(acked + 1);
        match client.push(table, keys, &ones).and_then(|t| t.wait()) {
            Ok(_) => acked += 1,
            Err(e) => {
                assert!(stop.load(Ordering::Acquire), "worker {w}: a push failed before the kill: {e}");
                return acked;
            }
        }
    }
}

#[test]
fn kill_9_during_pushes_loses_nothing_acknowledged_and_applies_nothing_twice() {
    crash_and_recover(false);
}

#[test]
fn the_same_with_the_pwrite_fsync_fallback() {
    crash_and_recover(true);
}

fn crash_and_recover(blocking: bool) {
    let data = ScratchDir::new("crash-data");
    let mut rand = rng();
    let mut acked = vec![0u64; WORKERS as usize];
    for round in 0..=KILLS {
        let mut srv = server(&data, blocking);
        let addr = srv.addr().to_string();
        let applied = if round == 0 {
            let client = Client::connect(&[&addr], ClientConfig::worker(WORKERS as u32)).unwrap();
            client.create_table(&spec()).unwrap();
            vec![0; WORKERS as usize]
        } else {
            assert!(srv.log().contains("recovered"), "round {round}: no recovery report:\n{}", srv.log());
            check(&addr, &acked, round)
        };
        if round == KILLS {
            println!("final: applied {applied:?}, acknowledged {acked:?}");
            assert!(acked.iter().all(|a| *a > 0), "some worker never had a push acknowledged: the test proved little");
            break;
        }
        // Connect every worker before the clock starts, so that the kill lands among pushes.
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let client = Client::connect(&[&addr], ClientConfig::worker(w as u32)).expect("worker connects");
                let table = client.table("crash").unwrap();
                let (mut keys, shared) = keys_of(&parts(&client), w);
                keys.push(shared);
                (client, table, keys)
            })
            .collect();
        let threads: Vec<_> = workers
            .into_iter()
            .enumerate()
            .map(|(w, (client, table, keys))| {
                let (stop, from) = (stop.clone(), applied[w]);
                std::thread::spawn(move || push_until_killed(&client, &table, &keys, w as u64, from, &stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(RUN_MS.start + rand() % (RUN_MS.end - RUN_MS.start)));
        stop.store(true, Ordering::Release);
        srv.kill();
        for (w, t) in threads.into_iter().enumerate() {
            acked[w] = t.join().expect("a worker thread panicked");
        }
        println!("round {round}: killed; acknowledged so far {acked:?} (applied at the start {applied:?})");
    }
}
