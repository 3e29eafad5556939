//! Damaged data directories: bit flips and torn writes injected into checkpoints and logs.
//! `tessera checkpoint verify` must catch each one and say where. A server started on the
//! damaged directory recovers exactly what the undamaged part allows when that is every
//! acknowledged push (a corrupt checkpoint the logs cover, a torn last commit), and says what it
//! passed over; when acknowledged pushes could not be read, it refuses to start, names the
//! damage, and changes nothing, unless started with `--accept-data-loss`.
//!
//! The history every case starts from, with one worker pushing 1.0 to every key of a dense `sum`
//! table, its clock counting its pushes: 20 pushes, checkpoint 1, 20 pushes, checkpoint 2,
//! 20 pushes, then `kill -9`. So checkpoint 2 holds 40, `wal-00000001.log` pushes 21 to 40 and
//! `wal-00000002.log` pushes 41 to 60, one commit (one page) per push. The log's first record
//! is the table's range, whole, as it was made (a standalone server logs as a chain of one
//! does), so push n is record n + 1.

use std::path::Path;
use std::time::Duration;

use tessera_client::{Client, ClientConfig};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::{run_tool, ScratchDir, ServerProc};

const KEYS: u64 = 64;
const PUSHES_PER_STEP: u64 = 20;
const PAGE: u64 = 4096;
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn server(dir: &Path) -> ServerProc {
    let dir = dir.to_str().unwrap();
    ServerProc::start(&["--shards", "1", "--no-pin", "--durability", "wal", "--data-dir", dir, "--checkpoint-interval-s", "0"])
}

fn push(client: &Client, table: &tessera_client::Table, clock: u64) {
    client.set_clock(clock);
    client.push_range(table, 0, &[1.0; KEYS as usize]).unwrap().wait().unwrap();
}

/// Runs the history above into `dir`.
fn history(dir: &Path) {
    let mut srv = server(dir);
    let client = Client::connect(&[srv.addr()], ClientConfig::worker(0)).unwrap();
    let table = client.create_table(&TableSpec::new("t", TableKind::Dense, 0, KEYS, 1)).unwrap();
    for step in 0..3 {
        for i in 1..=PUSHES_PER_STEP {
            push(&client, &table, step * PUSHES_PER_STEP + i);
        }
        if step < 2 {
            let out = run_tool(&["checkpoint", "now", "--connect", srv.addr()], TOOL_TIMEOUT);
            assert!(out.status.success(), "checkpoint now failed:\n{}{}", out.stdout, out.stderr);
            assert!(out.stdout.contains(&format!("checkpoint {} written", step + 1)), "{}", out.stdout);
        }
    }
    srv.kill();
}

/// The pushes a server started on `dir` holds: the value of every key, checked to agree with
/// each other and with the worker's clock stamp. Also returns the server's start-up output.
fn recovered(dir: &Path) -> (u64, String) {
    let srv = server(dir);
    let client = Client::connect(&[srv.addr()], ClientConfig::worker(1)).unwrap();
    let table = client.table("t").unwrap();
    let mut values = vec![0f32; KEYS as usize];
    let stamp = client.pull_range(&table, 0, &mut values).unwrap().wait().unwrap();
    assert!(values.iter().all(|v| *v == values[0]), "keys disagree: {values:?}");
    assert_eq!(stamp.get(0), values[0] as u64, "the clock stamp and the values disagree");
    (values[0] as u64, srv.log())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn flip(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x04;
    std::fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

/// `verify` on `dir`: must fail, and print `needle`.
#[track_caller]
fn verify_catches(dir: &Path, needle: &str) {
    let out = run_tool(&["checkpoint", "verify", dir.to_str().unwrap()], TOOL_TIMEOUT);
    assert!(!out.status.success(), "verify passed a damaged directory:\n{}", out.stdout);
    assert!(out.stdout.contains(needle), "verify did not say {needle:?}:\n{}{}", out.stdout, out.stderr);
    println!("verify caught it:\n{}", out.stdout);
}

#[test]
fn every_injected_corruption_is_caught_and_recovery_takes_the_right_path() {
    let pristine = ScratchDir::new("corrupt-pristine");
    history(pristine.path());
    let ok = run_tool(&["checkpoint", "verify", pristine.path().to_str().unwrap()], TOOL_TIMEOUT);
    assert!(ok.status.success(), "verify fails an undamaged directory:\n{}{}", ok.stdout, ok.stderr);
    let inspect = run_tool(&["checkpoint", "inspect", pristine.path().to_str().unwrap()], TOOL_TIMEOUT);
    assert!(inspect.status.success() && inspect.stdout.contains("exact at log record 41"), "{}{}", inspect.stdout, inspect.stderr);
    println!("{}", inspect.stdout);
    let all = 3 * PUSHES_PER_STEP;

    // Checkpoint 2 damaged three ways: recovery falls back to checkpoint 1 and replays both logs.
    type Damage = fn(&Path);
    let checkpoint_damage: [(&str, Damage, &str); 3] = [
        ("a bit flip in a chunk", |d| flip(&d.join("data-00000002.ckpt"), 100), "checksum"),
        ("a bit flip in the manifest", |d| flip(&d.join("MANIFEST-00000002"), 40), "checksum"),
        ("a torn data file", |d| truncate(&d.join("data-00000002.ckpt"), 10), "ends before the chunk"),
    ];
    for (what, damage, says) in checkpoint_damage {
        let copy = ScratchDir::new("corrupt-case");
        copy_dir(pristine.path(), copy.path());
        damage(&copy.path().join("shard-000"));
        verify_catches(copy.path(), "checkpoint 2: CORRUPT");
        verify_catches(copy.path(), says);
        let (n, log) = recovered(copy.path());
        assert!(log.contains("passed over checkpoint 2"), "{what}: the server did not say it fell back:\n{log}");
        assert!(log.contains("recovered: checkpoint 1"), "{what}: not recovered from checkpoint 1:\n{log}");
        assert_eq!(n, all, "{what}: checkpoint 1 and the logs after it hold every push");
    }

    // The last commit cut in the middle of its record, as a crash mid-write leaves it: nobody
    // was told push 60 is durable, so recovery replays up to it and goes on.
    let wal = |d: &Path| d.join("shard-000").join("wal-00000002.log");
    let copy = ScratchDir::new("corrupt-case");
    copy_dir(pristine.path(), copy.path());
    assert_eq!(std::fs::metadata(wal(copy.path())).unwrap().len(), PUSHES_PER_STEP * PAGE, "one page per commit");
    truncate(&wal(copy.path()), 19 * PAGE + 100);
    verify_catches(copy.path(), "STOPS EARLY");
    let (n, log) = recovered(copy.path());
    assert!(log.contains("torn at byte"), "a torn last commit: the server did not say where the log stopped:\n{log}");
    assert_eq!(n, all - 1, "a torn last commit: recovery replays exactly the records before it");

    // Push 50 is the tenth commit: a flipped bit in its values fails its checksum, and the ten
    // commits after it prove it was acknowledged. The server refuses to start and names the
    // damage, and changes no file; started to accept the loss, it serves the 49 pushes before
    // the damage and keeps the damaged log whole beside the one it goes on with.
    let copy = ScratchDir::new("corrupt-case");
    copy_dir(pristine.path(), copy.path());
    flip(&wal(copy.path()), 9 * PAGE + 100);
    verify_catches(copy.path(), "record 52 of a later commit follows");
    refused(copy.path(), "wal-00000002.log torn at byte 36864");
    let (n, log) = recovered_accepting_loss(copy.path());
    assert!(log.contains("recovering past lost data"), "the server did not say it lost data:\n{log}");
    assert_eq!(n, 49, "recovery replays exactly the records before the damage");
    let damaged = copy.path().join("shard-000").join("wal-00000002.log.damaged");
    assert_eq!(std::fs::metadata(&damaged).map(|m| m.len()).ok(), Some(PUSHES_PER_STEP * PAGE), "the damaged log is kept whole");

    // A log whose first record is a raw push, as servers logged before every server ran the
    // chain protocol (the record well formed, at the LSN the log's first record had): verify
    // names it, and the server refuses the directory and says why, rather than replay what it
    // cannot.
    let copy = ScratchDir::new("corrupt-case");
    copy_dir(pristine.path(), copy.path());
    let mut log = std::fs::read(wal(copy.path())).unwrap();
    let lsn = u64::from_le_bytes(log[8..16].try_into().unwrap());
    log[..PAGE as usize].copy_from_slice(&raw_push_commit(lsn));
    std::fs::write(wal(copy.path()), log).unwrap();
    verify_catches(copy.path(), "wal-00000002.log holds 1 raw push record(s)");
    let before = listing(copy.path());
    let d = copy.path().to_str().unwrap();
    match ServerProc::start_env(&["--shards", "1", "--no-pin", "--durability", "wal", "--data-dir", d, "--checkpoint-interval-s", "0"], &[]) {
        Ok(srv) => panic!("the server started on a log of raw pushes:\n{}", srv.log()),
        Err(log) => {
            assert!(log.contains(&format!("record {lsn} is a raw push, as servers logged before")), "the refusal does not say why:\n{log}");
            println!("refused as it should:\n{log}");
        }
    }
    assert_eq!(listing(copy.path()), before, "the refused start changed the data directory");

    // Files that disagree with each other: the server refuses, names the disagreement, and
    // neither rewrites nor deletes anything; verify says the same.
    let catalog = |d: &Path| d.join("catalog.json");
    type Inconsistency = fn(&Path);
    let inconsistencies: [(&str, Inconsistency, &str, &str); 4] = [
        // What a crash during recovery left before recovery stopped rewriting the catalog.
        (
            "a catalog that lost a table",
            |d| {
                let text = std::fs::read_to_string(d.join("catalog.json")).unwrap();
                let mut file: serde_json::Value = serde_json::from_str(&text).unwrap();
                file["tables"] = serde_json::json!([]);
                std::fs::write(d.join("catalog.json"), file.to_string()).unwrap();
            },
            "which the catalog does not name",
            "the catalog (catalog.json) places no table 0",
        ),
        ("a lost catalog", |d| std::fs::remove_file(d.join("catalog.json")).unwrap(), "catalog.json cannot be read", "places no table 0"),
        // Checkpoint 2 unreadable, and the log after checkpoint 1 gone: pushes 21 to 40 are
        // nowhere.
        (
            "a corrupt checkpoint that no log covers",
            |d| {
                flip(&d.join("shard-000").join("MANIFEST-00000002"), 40);
                std::fs::remove_file(d.join("shard-000").join("wal-00000001.log")).unwrap();
            },
            "checkpoint 2: CORRUPT",
            "records 22 to 41 are missing",
        ),
        // A log removed between two others.
        (
            "a gap between logs",
            |d| {
                flip(&d.join("shard-000").join("MANIFEST-00000002"), 40);
                truncate(&d.join("shard-000").join("wal-00000001.log"), 10 * PAGE);
            },
            "records 32 to 41 are missing",
            "records 32 to 41 are missing",
        ),
    ];
    for (what, damage, verify_says, server_says) in inconsistencies {
        let copy = ScratchDir::new("corrupt-case");
        copy_dir(pristine.path(), copy.path());
        damage(copy.path());
        verify_catches(copy.path(), verify_says);
        let before = listing(copy.path());
        refused(copy.path(), server_says);
        assert_eq!(listing(copy.path()), before, "{what}: the refused start changed the data directory");
        assert!(catalog(copy.path()).exists() || what == "a lost catalog");
    }

    // A directory a server of another shape wrote is refused before anything is read from it,
    // and left as it was: another number of shards, or one of several servers of a fixed list,
    // which held part of each table (which verify reports too; it cannot know the shard count
    // the next server starts with).
    type Shape = fn(&mut serde_json::Value);
    let shapes: [(&str, Shape, &str); 2] = [
        ("another shard count", |file| file["shards"] = 2.into(), "written by a server with 2 shards; this one has 1"),
        ("one of two servers of a fixed list", |file| file["servers"] = 2.into(), "one of 2 servers of a fixed list"),
    ];
    for (what, reshape, says) in shapes {
        let copy = ScratchDir::new("corrupt-case");
        copy_dir(pristine.path(), copy.path());
        let mut file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(catalog(copy.path())).unwrap()).unwrap();
        reshape(&mut file);
        std::fs::write(catalog(copy.path()), file.to_string()).unwrap();
        if file.get("servers").is_some() {
            let out = run_tool(&["checkpoint", "verify", copy.path().to_str().unwrap()], TOOL_TIMEOUT);
            assert!(!out.status.success() && out.stderr.contains(says), "{what}: verify does not say {says:?}:\n{}{}", out.stdout, out.stderr);
        }
        let before = listing(copy.path());
        let d = copy.path().to_str().unwrap();
        let args = ["--shards", "1", "--no-pin", "--durability", "wal", "--data-dir", d, "--checkpoint-interval-s", "0"];
        match ServerProc::start_env(&args, &[]) {
            Ok(srv) => panic!("{what}: the server started on it:\n{}", srv.log()),
            Err(log) => assert!(log.contains(says), "{what}: the refusal does not say {says:?}:\n{log}"),
        }
        assert_eq!(listing(copy.path()), before, "{what}: the refused start changed the data directory");
    }
}

/// One page holding a commit of one raw push record (table 0, keys 0 to 8 from 1.0) at `lsn`,
/// as the log writer lays it out.
fn raw_push_commit(lsn: u64) -> Vec<u8> {
    use tessera_engine::persist::wal::{Batch, Record, Target};
    use zerocopy::IntoBytes;
    let values = [1.0f32; 8];
    let record = Record { lsn, table: 0, worker: 0, clock: 1, dim: 1, target: Target::Range { start: 0 }, values: &values };
    let mut page = vec![0u64; PAGE as usize / 8];
    let mut batch = Batch::default();
    batch.append(page.as_mut_bytes(), &record).expect("a page holds one small record");
    assert_eq!(batch.seal(page.as_mut_bytes()), PAGE as usize, "one commit, one page");
    page.as_bytes().to_vec()
}

/// Every file under `dir` with its contents.
fn listing(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().is_dir() {
            out.extend(listing(&entry.path()));
        } else {
            out.push((entry.path(), std::fs::read(entry.path()).unwrap()));
        }
    }
    out.sort();
    out
}

/// A server started on `dir` refuses to start, and its error says `needle`.
#[track_caller]
fn refused(dir: &Path, needle: &str) {
    let d = dir.to_str().unwrap();
    let args = ["--shards", "1", "--no-pin", "--durability", "wal", "--data-dir", d, "--checkpoint-interval-s", "0"];
    match ServerProc::start_env(&args, &[]) {
        Ok(srv) => panic!("the server started on a damaged directory:\n{}", srv.log()),
        Err(log) => {
            assert!(log.contains("cannot recover") && log.contains(needle), "the refusal does not say {needle:?}:\n{log}");
            assert!(log.contains("--accept-data-loss"), "the refusal does not say what to do:\n{log}");
            println!("refused as it should:\n{log}");
        }
    }
}

/// As [`recovered`], on a server started with `--accept-data-loss`.
fn recovered_accepting_loss(dir: &Path) -> (u64, String) {
    let d = dir.to_str().unwrap();
    let srv = ServerProc::start(&["--shards", "1", "--no-pin", "--durability", "wal", "--data-dir", d, "--checkpoint-interval-s", "0", "--accept-data-loss"]);
    let client = Client::connect(&[srv.addr()], ClientConfig::worker(1)).unwrap();
    let table = client.table("t").unwrap();
    let mut values = vec![0f32; KEYS as usize];
    client.pull_range(&table, 0, &mut values).unwrap().wait().unwrap();
    assert!(values.iter().all(|v| *v == values[0]), "keys disagree: {values:?}");
    (values[0] as u64, srv.log())
}
