//! A `wal` server killed at every named step of its start-up, recovery, table creation and
//! checkpointing, then restarted: every acknowledged push is there, exactly, every time.
//!
//! Each step is a crash point of `engine/src/crash.rs`, armed through `TESSERA_CRASH_POINT`
//! (the binary is built with the `crash-points` feature, as `./tests/run.sh` builds it), so
//! the kill lands at a chosen moment, not at a random one. The points are walked in order on
//! one data directory, which grows as it goes: three tables, pushes between kills, and a
//! checkpoint after each restart, so recoveries load checkpoints and replay logs after them.
//! After every kill, `tessera checkpoint verify` must pass the directory, and the next server
//! must hold exactly what the model says. A crash point that the server does not reach fails
//! the test: the list in `CRASH_POINTS` is the code's own.

use std::path::Path;
use std::time::Duration;

use tessera_client::{Client, ClientConfig};
use tessera_engine::crash::{CRASH_POINTS, CRASH_POINT_ENV};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::{run_tool, ScratchDir, ServerProc};

const KEYS: u64 = 64;
const PUSHES_PER_ROUND: u64 = 5;
const DEATH_TIMEOUT: Duration = Duration::from_secs(60);
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// The tables: (name, dim). Dense `sum` tables over `[0, KEYS)`, split over both shards.
const TABLES: [(&str, u32); 3] = [("first", 1), ("second", 2), ("third", 4)];

fn spec(name: &str, dim: u32) -> TableSpec {
    TableSpec::new(name, TableKind::Dense, 0, KEYS, dim)
}

fn args(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().expect("a UTF-8 scratch path").to_string();
    ["--shards", "2", "--no-pin", "--durability", "wal", "--data-dir", &dir, "--checkpoint-interval-s", "0"].map(String::from).to_vec()
}

fn start(dir: &Path, env: &[(&str, &str)]) -> Result<ServerProc, String> {
    let args = args(dir);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProc::start_env(&refs, env)
}

/// What every acknowledged push adds up to: pushes per table (each adds 1.0 to every value).
#[derive(Debug, Default)]
struct Model {
    pushes: u64,
    clock: u64,
}

impl Model {
    /// Pushes `PUSHES_PER_ROUND` times to every table through `srv`, each acknowledged.
    fn push_round(&mut self, srv: &ServerProc) {
        let client = Client::connect(&[srv.addr()], ClientConfig::worker(0)).unwrap();
        for _ in 0..PUSHES_PER_ROUND {
            self.clock += 1;
            client.set_clock(self.clock);
            for (name, dim) in TABLES {
                let table = client.table(name).unwrap();
                client.push_range(&table, 0, &vec![1.0; (KEYS * u64::from(dim)) as usize]).unwrap().wait().unwrap();
            }
            self.pushes += 1;
        }
    }

    /// Every table on `srv` holds exactly the acknowledged pushes.
    #[track_caller]
    fn check(&self, srv: &ServerProc, after: &str) {
        let client = Client::connect(&[srv.addr()], ClientConfig::worker(1)).unwrap();
        for (name, dim) in TABLES {
            let table = client.table(name).unwrap_or_else(|e| panic!("after {after}: table {name}: {e}\n{}", srv.log()));
            let mut values = vec![0f32; (KEYS * u64::from(dim)) as usize];
            let stamp = client.pull_range(&table, 0, &mut values).unwrap().wait().unwrap();
            assert!(
                values.iter().all(|v| *v == self.pushes as f32),
                "after {after}: table {name} holds {:?}, not {} acknowledged pushes\n{}",
                &values[..4],
                self.pushes,
                srv.log()
            );
            assert_eq!(stamp.get(0), self.clock, "after {after}: table {name}'s clock stamp");
        }
    }
}

fn checkpoint(srv: &ServerProc) -> Result<(), String> {
    let out = run_tool(&["checkpoint", "now", "--connect", srv.addr()], TOOL_TIMEOUT);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", out.stdout, out.stderr))
    }
}

#[track_caller]
fn verify(dir: &Path, after: &str) {
    let out = run_tool(&["checkpoint", "verify", dir.to_str().unwrap()], TOOL_TIMEOUT);
    assert!(out.status.success(), "after {after}: verify fails the directory:\n{}{}", out.stdout, out.stderr);
}

/// The server died at `point`, killed by the crash point's SIGKILL.
#[track_caller]
fn died_at(srv: &mut ServerProc, point: &str) {
    let status = srv.wait_exit(DEATH_TIMEOUT);
    let log = srv.log();
    assert!(
        status.is_some_and(|s| s.to_string().contains("signal: 9")) && log.contains(&format!("crash point {}", point.split(':').next().unwrap())),
        "the server did not die at crash point {point} (status {status:?}; is the binary built with --features crash-points?):\n{log}"
    );
}

/// The points, each with the hit it fires on, and the action that reaches it.
fn schedule() -> Vec<(String, Reach)> {
    let mut steps = Vec::new();
    for point in CRASH_POINTS {
        let reach = match point.split('.').next().unwrap() {
            "startup" | "recovery" => Reach::Start,
            "table" | "catalog" => Reach::CreateTable,
            "checkpoint" => Reach::Checkpoint,
            other => panic!("crash point {point}: no action reaches points of kind {other}"),
        };
        match *point {
            // Recovery remakes each of the three tables in memory: crash after each, the case
            // that once left a catalog naming only the tables remade so far.
            "recovery.table_made" => (1..=3).for_each(|n| steps.push((format!("{point}:{n}"), reach))),
            // Each of the two shards loads its checkpoint, replays and opens its log.
            "recovery.checkpoint_loaded" | "recovery.log_replayed" | "recovery.log_opened" => (1..=2).for_each(|n| steps.push((format!("{point}:{n}"), reach))),
            _ => steps.push((point.to_string(), reach)),
        }
    }
    steps
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Reach {
    /// The server dies while it starts.
    Start,
    /// It dies when a client creates a table.
    CreateTable,
    /// It dies when asked for a checkpoint.
    Checkpoint,
}

#[test]
fn a_crash_at_every_named_step_loses_no_acknowledged_push() {
    let dir = ScratchDir::new("crash-points");
    let mut model = Model::default();
    let srv = start(dir.path(), &[]).unwrap();
    let client = Client::connect(&[srv.addr()], ClientConfig::worker(0)).unwrap();
    for (name, dim) in TABLES {
        client.create_table(&spec(name, dim)).unwrap();
    }
    drop(client);
    model.push_round(&srv);
    checkpoint(&srv).unwrap();
    model.push_round(&srv);
    drop(srv);

    let mut extra_tables = 0;
    for (step, reach) in schedule() {
        let env = [(CRASH_POINT_ENV, step.as_str())];
        match reach {
            Reach::Start => match start(dir.path(), &env) {
                Err(log) => assert!(log.contains("signal: 9") && log.contains("crash point"), "{step}: the server failed otherwise:\n{log}"),
                Ok(mut srv) => died_at(&mut srv, &step),
            },
            Reach::CreateTable => {
                let mut srv = start(dir.path(), &env).unwrap();
                model.push_round(&srv);
                let client = Client::connect(&[srv.addr()], ClientConfig::worker(0)).unwrap();
                extra_tables += 1;
                let made = client.create_table(&spec(&format!("extra-{extra_tables}"), 1));
                assert!(made.is_err(), "{step}: the table was created and acknowledged although the server died");
                died_at(&mut srv, &step);
            }
            Reach::Checkpoint => {
                let mut srv = start(dir.path(), &env).unwrap();
                model.push_round(&srv);
                assert!(checkpoint(&srv).is_err(), "{step}: the checkpoint was acknowledged although the server died");
                died_at(&mut srv, &step);
            }
        }
        verify(dir.path(), &step);
        let srv = start(dir.path(), &[]).unwrap_or_else(|log| panic!("after {step}: the server does not start again:\n{log}"));
        model.check(&srv, &step);
        // A table whose creation died unacknowledged may exist or not; asked again, it is made.
        if reach == Reach::CreateTable {
            let client = Client::connect(&[srv.addr()], ClientConfig::worker(0)).unwrap();
            client.create_table(&spec(&format!("extra-{extra_tables}"), 1)).unwrap();
        }
        model.push_round(&srv);
        checkpoint(&srv).unwrap_or_else(|e| panic!("after {step}: {e}"));
        model.push_round(&srv);
        drop(srv);
        println!("{step}: killed there, recovered {} pushes per table exactly", model.pushes);
    }
    let srv = start(dir.path(), &[]).unwrap();
    model.check(&srv, "the last restart");
}
