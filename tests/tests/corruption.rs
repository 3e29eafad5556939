//! Damaged data directories: bit flips and torn writes injected into checkpoints and logs.
//! `tessera checkpoint verify` must catch each one and say where; a server started on the
//! damaged directory must recover exactly what the undamaged part allows, and say what it
//! passed over.
//!
//! The history every case starts from, with one worker pushing 1.0 to every key of a dense `sum`
//! table, its clock counting its pushes: 20 pushes, checkpoint 1, 20 pushes, checkpoint 2,
//! 20 pushes, then `kill -9`. So checkpoint 2 holds 40, `wal-00000001.log` pushes 21 to 40 and
//! `wal-00000002.log` pushes 41 to 60, one commit (one page) per push.

use std::path::Path;
use std::time::Duration;

use tessera_client::{Client, ClientConfig};
use tessera_replication::{TableKind, TableSpec};
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
    assert!(inspect.status.success() && inspect.stdout.contains("exact at log record 40"), "{}{}", inspect.stdout, inspect.stderr);
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

    // The newest log damaged: recovery replays it up to the damage and no further.
    let wal = |d: &Path| d.join("shard-000").join("wal-00000002.log");
    let log_damage: [(&str, Damage, u64); 2] = [
        // Push 50 is the tenth commit: a flipped bit in its values fails its checksum.
        ("a bit flip in a record", |d| flip(&d.join("shard-000").join("wal-00000002.log"), 9 * PAGE + 100), 49),
        // The last commit cut in the middle of its record, as a crash mid-write leaves it.
        ("a torn last commit", |d| truncate(&d.join("shard-000").join("wal-00000002.log"), 19 * PAGE + 100), 59),
    ];
    for (what, damage, want) in log_damage {
        let copy = ScratchDir::new("corrupt-case");
        copy_dir(pristine.path(), copy.path());
        assert_eq!(std::fs::metadata(wal(copy.path())).unwrap().len(), PUSHES_PER_STEP * PAGE, "one page per commit");
        damage(copy.path());
        verify_catches(copy.path(), "STOPS EARLY");
        let (n, log) = recovered(copy.path());
        assert!(log.contains("torn at byte"), "{what}: the server did not say where the log stopped:\n{log}");
        assert_eq!(n, want, "{what}: recovery replays exactly the records before the damage");
    }
}
