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
//!
//! One more worker pushes 1.0 to one checkpoint chunk after another of shard 0's part of a larger
//! table (the ballast), round and round, so checkpoints have many chunks to write and take long
//! enough for kills to land while one is being written. What it applied is checked the same way.
//! Half the kills aim at the first checkpoint after the restart; the test counts those that hit
//! one (a recovery that replays a log newer than its checkpoint).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_client::{Client, ClientConfig, Table};
use tessera_layout::{TableKind, TableSpec};
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
/// Or up to this long after shard 0 started a checkpoint.
const CHECKPOINT_AIM_MS: u64 = 20;

/// The ballast: 64 MiB of values. Its worker's push `i` adds 1.0 to window `i % WINDOWS` of
/// shard 0's part, one 64 KiB checkpoint chunk.
const BALLAST_KEYS: u64 = 16 << 20;
const WINDOW: u64 = 16 << 10;
const WINDOWS: u64 = BALLAST_KEYS / SHARDS / WINDOW;
/// The ballast worker's id, after the others and the checker's.
const BALLAST_WORKER: u64 = WORKERS + 1;

fn spec() -> TableSpec {
    TableSpec::new("crash", TableKind::Dense, 0, SHARDS * PART_KEYS, 1)
}

/// Of the ballast worker's first `n` pushes, how many went to window `j`.
fn window_count(n: u64, j: u64) -> u64 {
    (n + WINDOWS - 1 - j) / WINDOWS
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
    parts_of(client, "crash")
}

fn parts_of(client: &Client, name: &str) -> Vec<(u64, u64)> {
    let entry = client.catalogs().unwrap().remove(0).into_iter().find(|e| e.spec.name == name).expect("the table");
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
    let mut args = vec!["--log", "info", "--shards", "2", "--no-pin", "--durability", "wal", "--data-dir", dir, "--checkpoint-interval-s", "1"];
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
    let ballast = client.table("ballast").expect("the ballast table");
    let first = parts_of(&client, "ballast")[0].0;
    let keys: Vec<u64> = (0..WINDOWS).flat_map(|j| [first + j * WINDOW, first + (j + 1) * WINDOW - 1]).collect();
    let mut values = vec![0f32; keys.len()];
    client.pull(&ballast, &keys, &mut values).unwrap().wait().unwrap();
    let n: u64 = values.iter().step_by(2).map(|v| *v as u64).sum();
    for (j, pair) in values.chunks(2).enumerate() {
        let want = window_count(n, j as u64) as f32;
        assert_eq!(pair, [want, want], "round {round}: ballast window {j} after {n} pushes in all");
    }
    let a = acked[WORKERS as usize];
    assert!(n >= a && n <= a + 1, "round {round}: the ballast worker had {a} pushes acknowledged and {n} applied");
    if n > 0 {
        let mut window = vec![0f32; WINDOW as usize];
        let stamp = client.pull_range(&ballast, first + (n - 1) % WINDOWS * WINDOW, &mut window).unwrap().wait().unwrap();
        assert_eq!(stamp.get(BALLAST_WORKER as usize), n, "round {round}: the ballast worker's clock stamp on its last window");
    }
    applied.push(n);
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

/// [`push_until_killed`] for the ballast worker: push `i` goes to window `i % WINDOWS` of the
/// part starting at `first`.
fn push_ballast_until_killed(client: &Client, table: &Table, first: u64, applied: u64, stop: &AtomicBool) -> u64 {
    let ones = vec![1f32; WINDOW as usize];
    let mut acked = applied;
    loop {
        client.set_clock(acked + 1);
        match client.push_range(table, first + acked % WINDOWS * WINDOW, &ones).and_then(|t| t.wait()) {
            Ok(_) => acked += 1,
            Err(e) => {
                assert!(stop.load(Ordering::Acquire), "the ballast worker: a push failed before the kill: {e}");
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
    let mut acked = vec![0u64; WORKERS as usize + 1];
    let (mut mid_checkpoint, mut last_log) = (0, 0);
    for round in 0..=KILLS {
        let mut srv = server(&data, blocking);
        let addr = srv.addr().to_string();
        let applied = if round == 0 {
            let client = Client::connect(&[&addr], ClientConfig::worker(WORKERS as u32)).unwrap();
            client.create_table(&spec()).unwrap();
            client.create_table(&TableSpec::new("ballast", TableKind::Dense, 0, BALLAST_KEYS, 1)).unwrap();
            vec![0; WORKERS as usize + 1]
        } else {
            let log = srv.log();
            assert!(log.contains("recovered"), "round {round}: no recovery report:\n{log}");
            let (checkpoint, log_seq) = log.lines().find_map(shard_0_recovered).expect("shard 0's recovery line");
            // The server died after it started a log for a checkpoint it never committed.
            if log_seq > last_log && checkpoint < log_seq {
                mid_checkpoint += 1;
            }
            last_log = log_seq;
            check(&addr, &acked, round)
        };
        if round == KILLS {
            println!("final: applied {applied:?}, acknowledged {acked:?}; {mid_checkpoint} of {KILLS} kills landed while a checkpoint was written");
            assert!(mid_checkpoint > 0, "no kill landed while a checkpoint was written: the test proved less than it says");
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
        let ballast = Client::connect(&[&addr], ClientConfig::worker(BALLAST_WORKER as u32)).expect("the ballast worker connects");
        let ballast_table = ballast.table("ballast").unwrap();
        let first = parts_of(&ballast, "ballast")[0].0;
        let ballast_thread = {
            let (stop, from) = (stop.clone(), applied[WORKERS as usize]);
            std::thread::spawn(move || push_ballast_until_killed(&ballast, &ballast_table, first, from, &stop))
        };
        let threads: Vec<_> = workers
            .into_iter()
            .enumerate()
            .map(|(w, (client, table, keys))| {
                let (stop, from) = (stop.clone(), applied[w]);
                std::thread::spawn(move || push_until_killed(&client, &table, &keys, w as u64, from, &stop))
            })
            .collect();
        // Every other round, kill while shard 0 writes the checkpoint it starts a second after
        // its recovery (the ballast's part takes it tens of milliseconds).
        if round % 2 == 1 && srv.wait_for_log("checkpoint started shard=0", Duration::from_secs(5)) {
            std::thread::sleep(Duration::from_millis(rand() % CHECKPOINT_AIM_MS));
        } else {
            std::thread::sleep(Duration::from_millis(RUN_MS.start + rand() % (RUN_MS.end - RUN_MS.start)));
        }
        stop.store(true, Ordering::Release);
        srv.kill();
        for (w, t) in threads.into_iter().chain([ballast_thread]).enumerate() {
            acked[w] = t.join().expect("a worker thread panicked");
        }
        println!("round {round}: killed; acknowledged so far {acked:?} (applied at the start {applied:?})");
    }
}

/// From shard 0's recovery line: the checkpoint it loaded (0: none) and the last log it replayed.
fn shard_0_recovered(line: &str) -> Option<(u64, u64)> {
    let seq_after = |s: &str, key: &str| -> Option<u64> { s.split(key).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok() };
    let rest = line.strip_prefix("shard 0 recovered: ")?;
    let checkpoint = if rest.starts_with("no checkpoint") { 0 } else { seq_after(rest, "checkpoint ")? };
    Some((checkpoint, seq_after(rest, "(wal-").unwrap_or(0)))
}
