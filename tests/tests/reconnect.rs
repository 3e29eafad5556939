//! A client outlives its server's restart. A `tessera server --durability wal` is killed with
//! SIGKILL in the middle of pipelined pushes and started again on the same port; the same
//! client, with the same table handle, goes on pushing. The server is a chain of one: its
//! pushes are acknowledged once in its log, and the client sends the unacknowledged ones again
//! to the restarted server, which recovers from its log how many of each worker's pushes it
//! applied and takes a resend as an acknowledgement. Every push is answered, and applied once.
//! A server restarted without its data is another cluster: what was in flight is let go with
//! an unknown outcome, and table handles follow their tables by name.

use std::collections::VecDeque;

use tessera_client::{Client, ClientConfig, ClientError, Ticket};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::{ScratchDir, ServerProc};
use tessera_transport::TransportKind;

const KEYS: u64 = 8;
const PUSHES: u64 = 300;
const IN_FLIGHT_MAX: usize = 4;
/// Pushes answered before the server is killed.
const KILL_AFTER: usize = 100;

#[test]
fn a_client_goes_on_pushing_across_a_server_restart_and_every_push_is_applied_once() {
    let dir = ScratchDir::new("reconnect");
    let data = dir.path().join("data");
    let args = ["--shards", "2", "--durability", "wal", "--data-dir", data.to_str().unwrap()];
    let mut server = ServerProc::start(&args);
    let addr = server.addr().to_string();
    // Patient enough for the restart below (the default gives a standalone server ~5 s).
    let cfg = ClientConfig { kind: TransportKind::Tcp, reconnect_attempts: 40, ..ClientConfig::worker(0) };
    let client = Client::connect(&[&addr], cfg).expect("connect");
    let table = client.create_table(&TableSpec::new("restarts", TableKind::Dense, 0, KEYS, 1)).expect("create the table");
    let ones = [1f32; KEYS as usize];

    let mut in_flight: VecDeque<(usize, Ticket<'_>)> = VecDeque::new();
    let mut answered = 0;
    for i in 0..PUSHES as usize {
        if i == KILL_AFTER {
            server.kill();
            server = ServerProc::start_at(&addr, &args);
        }
        client.set_clock(i as u64 + 1);
        in_flight.push_back((i, client.push_range(&table, 0, &ones).unwrap_or_else(|e| panic!("push {i}: {e}"))));
        if in_flight.len() >= IN_FLIGHT_MAX {
            let (i, ticket) = in_flight.pop_front().expect("a push in flight");
            ticket.wait().unwrap_or_else(|e| panic!("push {i}: {e}"));
            answered += 1;
        }
    }
    for (i, ticket) in in_flight {
        ticket.wait().unwrap_or_else(|e| panic!("push {i}: {e}"));
        answered += 1;
    }
    assert_eq!(answered, PUSHES as usize);
    let mut values = [0f32; KEYS as usize];
    let stamp = client.pull_range(&table, 0, &mut values).and_then(Ticket::wait).expect("pull after the restart");
    assert_eq!(values, [PUSHES as f32; KEYS as usize], "every push applied once, none lost, none twice");
    assert_eq!(stamp.get(0), PUSHES, "the range clock is the last push's");
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
        Err(ClientError::OutcomeUnknown { .. }) => None,
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
