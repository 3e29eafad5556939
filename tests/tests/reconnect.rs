//! A client outlives its server's restart: a `tessera server --durability wal` is killed with
//! SIGKILL in the middle of pipelined pushes and started again on the same port, and the same
//! client, with the same table handle, goes on pushing. Every push is accounted for: answered,
//! refused before anything was sent, or reported with an unknown outcome and never resent;
//! the range clocks read back after the restart say which of the unknown ones were applied, so
//! the sums are checked exactly.

use std::collections::VecDeque;
use std::time::Duration;

use tessera_client::{Client, ClientConfig, ClientError, Ticket};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::{ScratchDir, ServerProc};
use tessera_transport::TransportKind;

const KEYS: u64 = 8;
const PUSHES: u64 = 300;
const IN_FLIGHT_MAX: usize = 4;
/// Pushes answered before the server is killed.
const KILL_AFTER: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Applied,
    NotSent,
    Unknown,
}

/// Waits for the oldest push in flight and records how it ended.
fn settle(in_flight: &mut VecDeque<(usize, Ticket<'_>)>, outcomes: &mut [Option<Outcome>]) {
    let (i, ticket) = in_flight.pop_front().expect("a push in flight");
    outcomes[i] = Some(match ticket.wait() {
        Ok(_) => Outcome::Applied,
        Err(ClientError::OutcomeUnknown { .. }) => Outcome::Unknown,
        Err(e) => panic!("push {i} failed with neither an answer nor an unknown outcome: {e}"),
    });
}

/// Each key's value and this worker's clock on it, pulled one key at a time (the stamp of a
/// one-key pull is that key's range clock). Retries while the server is still down.
fn read_back(client: &Client, table: &tessera_client::Table) -> Vec<(f32, u64)> {
    (0..KEYS)
        .map(|k| {
            for _ in 0..100 {
                let mut v = [0f32];
                match client.pull(table, &[k], &mut v).and_then(Ticket::wait) {
                    Ok(stamp) => return (v[0], stamp.get(0)),
                    Err(ClientError::Reconnect { .. } | ClientError::OutcomeUnknown { .. }) => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => panic!("pull of key {k}: {e}"),
                }
            }
            panic!("the client did not reconnect");
        })
        .collect()
}

#[test]
fn a_client_goes_on_pushing_across_a_server_restart_and_every_push_is_accounted_for() {
    let dir = ScratchDir::new("reconnect");
    let data = dir.path().join("data");
    let args = ["--shards", "2", "--durability", "wal", "--data-dir", data.to_str().unwrap()];
    let mut server = ServerProc::start(&args);
    let addr = server.addr().to_string();
    let cfg = ClientConfig { kind: TransportKind::Tcp, ..ClientConfig::worker(0) };
    let client = Client::connect(&[&addr], cfg).expect("connect");
    let table = client.create_table(&TableSpec::new("restarts", TableKind::Dense, 0, KEYS, 1)).expect("create the table");
    let ones = [1f32; KEYS as usize];

    let mut outcomes: Vec<Option<Outcome>> = vec![None; PUSHES as usize];
    let mut in_flight = VecDeque::new();
    let mut recovered: Option<Vec<(f32, u64)>> = None;
    let mut killed = false;
    for i in 0..PUSHES as usize {
        let answered = outcomes.iter().filter(|o| **o == Some(Outcome::Applied)).count();
        if !killed && answered >= KILL_AFTER {
            server.kill();
            killed = true;
        }
        // Each push has a clock of its own: after the restart, a key's clock says which pushes
        // made it into the log.
        client.set_clock(i as u64 + 1);
        match client.push_range(&table, 0, &ones) {
            Ok(ticket) => in_flight.push_back((i, ticket)),
            Err(ClientError::OutcomeUnknown { .. }) => outcomes[i] = Some(Outcome::Unknown),
            Err(ClientError::Transport(_) | ClientError::Reconnect { .. }) => outcomes[i] = Some(Outcome::NotSent),
            Err(e) => panic!("push {i}: {e}"),
        }
        if in_flight.len() >= IN_FLIGHT_MAX || outcomes.contains(&Some(Outcome::Unknown)) {
            settle(&mut in_flight, &mut outcomes);
        }
        if recovered.is_none() && outcomes.iter().any(|o| matches!(o, Some(Outcome::Unknown | Outcome::NotSent))) {
            // The server is gone: let every push in flight end, bring the server back on its
            // port, and read each key's clock before anything new is pushed.
            while !in_flight.is_empty() {
                settle(&mut in_flight, &mut outcomes);
            }
            server = ServerProc::start_at(&addr, &args);
            recovered = Some(read_back(&client, &table));
        }
    }
    while !in_flight.is_empty() {
        settle(&mut in_flight, &mut outcomes);
    }
    let recovered = recovered.expect("the server was killed and the client saw it");
    let count = |want| outcomes.iter().filter(|o| **o == Some(want)).count();
    let (applied, not_sent, unknown) = (count(Outcome::Applied), count(Outcome::NotSent), count(Outcome::Unknown));
    eprintln!("{applied} pushes answered, {not_sent} refused before sending, {unknown} with an unknown outcome");
    assert_eq!(applied + not_sent + unknown, PUSHES as usize);
    assert!(applied > KILL_AFTER + 100, "the client did not go on pushing after the restart");
    let after = read_back(&client, &table);
    for k in 0..KEYS as usize {
        let clock = recovered[k].1;
        // Push i ran at clock i + 1: it is in the log when that is at most the key's clock.
        let unknown_applied = (0..PUSHES as usize).filter(|&i| outcomes[i] == Some(Outcome::Unknown) && (i as u64) < clock).count();
        let want = applied + unknown_applied;
        assert_eq!(after[k].0, want as f32, "key {k}: {applied} answered + {unknown_applied} unknown ones at or below clock {clock}");
    }
    drop(server);
}

/// A server restarted without its data numbers tables afresh, in the order they are created
/// again. A handle read before the restart follows its table by name: its pushes land in the
/// table of that name, not in whichever now has its old number.
#[test]
fn a_table_handle_follows_its_table_by_name_across_a_restart() {
    let mut server = ServerProc::start(&["--shards", "2"]);
    let addr = server.addr().to_string();
    let cfg = || ClientConfig { kind: TransportKind::Tcp, ..ClientConfig::worker(0) };
    let client = Client::connect(&[&addr], cfg()).expect("connect");
    let spec = |name: &str| TableSpec::new(name, TableKind::Dense, 0, KEYS, 1);
    let table = client.create_table(&spec("mine")).expect("create mine");
    let ones = [1f32; KEYS as usize];
    client.push_range(&table, 0, &ones).and_then(Ticket::wait).expect("push before the restart");

    server.kill();
    let _server = ServerProc::start_at(&addr, &["--shards", "2"]);
    let other = Client::connect(&[&addr], cfg()).expect("another client");
    let theirs = other.create_table(&spec("theirs")).expect("create theirs, which takes the first number");
    other.create_table(&spec("mine")).expect("create mine again");

    // The first call finds the connection gone (its outcome unknown, or refused before it was
    // sent); one of the next ones reconnects and lands in "mine".
    let pushed = (0..20).find_map(|_| match client.push_range(&table, 0, &ones).and_then(Ticket::wait) {
        Ok(_) => Some(()),
        Err(ClientError::OutcomeUnknown { .. } | ClientError::Transport(_)) => None,
        Err(e) => panic!("push after the restart: {e}"),
    });
    assert!(pushed.is_some(), "the client did not reconnect");
    let (mut mine, mut their) = ([0f32; KEYS as usize], [0f32; KEYS as usize]);
    let mine_now = other.table("mine").unwrap();
    other.pull_range(&mine_now, 0, &mut mine).and_then(Ticket::wait).unwrap();
    other.pull_range(&theirs, 0, &mut their).and_then(Ticket::wait).unwrap();
    assert_eq!(their, [0.0; KEYS as usize], "nothing landed in the table that took the old number");
    assert!(mine.iter().all(|v| *v >= 1.0), "the push landed in the table of its name: {mine:?}");
}
