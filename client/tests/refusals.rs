//! What the client refuses before sending, what the server refuses, and table creation: every
//! refusal names the problem and leaves the tables as they were.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{client, client_with, dense, pull_range, server, sparse};
use tessera_client::{ClientConfig, ClientError};
use tessera_layout::LayoutError;
use tessera_transport::Status;

fn is_out_of_range(e: &ClientError, key: u64) -> bool {
    matches!(e, ClientError::KeyOutOfRange { key: k, start: 100, end: 400, .. } if *k == key)
}

#[test]
fn client_side_refusals_send_nothing_and_change_nothing() {
    let server = server(3);
    let client = client(&server, 0);
    let table = client.create_table(&dense("r", 100, 400, 2)).unwrap();
    client.push_range(&table, 100, &[1.0; 600]).unwrap().wait().unwrap();
    let before = client.bytes();

    // Keys outside [100, 400), alone or among valid ones, in every call.
    let err = client.push(&table, &[150, 400], &[1.0; 4]).unwrap_err();
    assert!(is_out_of_range(&err, 400), "{err:?}");
    let err = client.push(&table, &[99], &[1.0; 2]).unwrap_err();
    assert!(is_out_of_range(&err, 99), "{err:?}");
    let err = client.pull(&table, &[150, 250, u64::MAX], &mut [0.0; 6]).unwrap_err();
    assert!(is_out_of_range(&err, u64::MAX), "{err:?}");
    assert!(matches!(client.push_range(&table, 99, &[1.0; 4]), Err(ClientError::KeyOutOfRange { .. })));
    assert!(matches!(client.push_range(&table, 399, &[1.0; 4]), Err(ClientError::KeyOutOfRange { .. })));
    assert!(matches!(client.pull_range(&table, 300, &mut [0.0; 202]), Err(ClientError::KeyOutOfRange { .. })));
    assert!(matches!(client.pull_range(&table, u64::MAX, &mut [0.0; 4]), Err(ClientError::KeyOutOfRange { .. })));
    assert!(err.to_string().contains("outside table \"r\"'s range [100, 400)"), "{err}");

    // Lengths that are not keys x dim.
    let length = |e: ClientError, want_got: (usize, usize)| match e {
        ClientError::Length { want, got, dim: 2, .. } => assert_eq!((want, got), want_got),
        other => panic!("expected a Length error, got {other:?}"),
    };
    length(client.push(&table, &[150, 151], &[1.0; 3]).unwrap_err(), (4, 3));
    length(client.push(&table, &[150], &[1.0; 3]).unwrap_err(), (2, 3));
    length(client.pull(&table, &[150, 151], &mut [0.0; 5]).unwrap_err(), (4, 5));
    length(client.push_range(&table, 150, &[1.0; 3]).unwrap_err(), (2, 3));
    length(client.pull_range(&table, 150, &mut [0.0; 7]).unwrap_err(), (6, 7));

    // Unknown tables.
    match client.table("nope") {
        Err(ClientError::Placement(LayoutError::UnknownTable { name })) => assert_eq!(name, "nope"),
        other => panic!("expected an unknown table, got {other:?}"),
    }

    assert_eq!(client.bytes(), before, "no refused call sent or received anything");
    assert_eq!(pull_range(&client, &table, 100, 300), vec![1.0; 600], "no refused call changed a value");
}

#[test]
fn server_side_refusals_report_their_status_and_change_nothing() {
    let server = server(3);
    let client = client(&server, 0);
    let table = client.create_table(&dense("nf", 0, 300, 1)).unwrap();
    client.push_range(&table, 0, &[1.0; 300]).unwrap().wait().unwrap();

    // NaN or Inf for a table that rejects them is refused before anything is sent, so a push
    // spanning shards cannot be half applied. (The server's own refusal is tested with raw frames
    // in the process tests.)
    let before = client.bytes();
    let err = client.push(&table, &[10, 220], &[2.0, f32::NAN]).unwrap_err();
    assert!(matches!(err, tessera_client::ClientError::NonFinite { index: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("rejects NaN"), "{err}");
    let err = client.push_range(&table, 250, &[f32::INFINITY; 50]).unwrap_err();
    assert!(matches!(err, tessera_client::ClientError::NonFinite { index: 0, .. }), "{err:?}");
    assert_eq!(client.bytes(), before, "nothing was sent");
    assert_eq!(pull_range(&client, &table, 0, 300), vec![1.0; 300]);

    // A worker id over the server's workers_max (16 by default) is refused by every shard.
    let stranger = client_with(&server, ClientConfig::worker(64));
    let t = stranger.table("nf").unwrap();
    let err = stranger.push_range(&t, 0, &[1.0; 300]).and_then(tessera_client::Ticket::wait).unwrap_err();
    assert_eq!(err.status(), Some(Status::BadRequest), "{err:?}");
    assert!(err.to_string().contains("workers"), "{err}");
    assert_eq!(pull_range(&client, &table, 0, 300), vec![1.0; 300]);

    // The client is still usable after refusals.
    client.push_range(&table, 0, &[1.0; 300]).unwrap().wait().unwrap();
    assert_eq!(pull_range(&client, &table, 0, 300), vec![2.0; 300]);
}

#[test]
fn create_table_is_idempotent_and_refuses_conflicts_and_bad_updaters() {
    let server = server(2);
    let client = client(&server, 0);
    let mut spec = sparse("t", 3);
    spec.updater = "sgd{lr=0.5}".into();
    let table = client.create_table(&spec).unwrap();
    client.push(&table, &[7], &[1.0, 2.0, 4.0]).unwrap().wait().unwrap();
    let again = client.create_table(&spec).unwrap();
    assert_eq!(again.spec(), &spec);
    assert_eq!(common::pull(&client, &again, &[7]), [-0.5, -1.0, -2.0], "re-creating kept the values");
    assert_eq!(client.catalogs().unwrap()[0].len(), 1, "one table, not two");

    let mut other = spec.clone();
    other.dim = 4;
    let err = client.create_table(&other).unwrap_err();
    assert_eq!(err.status(), Some(Status::BadRequest), "{err:?}");
    assert!(err.to_string().contains("already exists with a different definition"), "{err}");
    let mut other = spec.clone();
    other.updater = "sgd{lr=0.25}".into();
    assert_eq!(client.create_table(&other).unwrap_err().status(), Some(Status::BadRequest));
    assert_eq!(client.table("t").unwrap().spec(), &spec, "the conflict did not replace the table");

    let mut bad = dense("u", 0, 10, 1);
    bad.updater = "nosuch{lr=1}".into();
    let err = client.create_table(&bad).unwrap_err();
    assert_eq!(err.status(), Some(Status::BadRequest), "{err:?}");
    let message = err.to_string();
    for known in ["sum", "assign", "sgd", "adagrad", "adam", "ftrl"] {
        assert!(message.contains(known), "the error lists {known}: {message}");
    }
    bad.updater = "sgd{lr=-1}".into();
    let err = client.create_table(&bad).unwrap_err();
    assert!(err.to_string().contains("lr=-1 is out of range"), "{err}");
    assert!(matches!(client.table("u"), Err(ClientError::Placement(_))), "a refused table does not exist");
    let bad = dense("empty", 5, 5, 1);
    assert_eq!(client.create_table(&bad).unwrap_err().status(), Some(Status::BadRequest));
    assert_eq!(client.catalogs().unwrap()[0].len(), 1);
}

/// A push over the client's frame limit that spans two shards is split into frames that fit, on
/// both shards. (It used to be refused in its second part, and the half-built ticket re-locked the
/// client and hung it: the time limit guards that.)
#[test]
fn a_call_over_the_frame_limit_is_split_across_frames_and_shards() {
    let server = server(2);
    let (done, finished) = mpsc::channel();
    let addr = server.local_addr().to_string();
    std::thread::spawn(move || {
        let mut cfg = ClientConfig::worker(0);
        cfg.transport.frame_bytes_max = 4 << 10;
        let client = tessera_client::Client::connect(&[addr.as_str()], cfg).unwrap();
        // Shards own [0, 2000) and [2000, 4000): 10 values go to shard 0, 1 090 (4 360 bytes) to shard 1.
        let table = client.create_table(&dense("frames", 0, 4_000, 1)).unwrap();
        let result = client.push_range(&table, 1_990, &[1.0; 1_100]).and_then(|t| t.wait()).map(|_| ());
        let mut out = vec![0.0; 1_100];
        let pulled = client.pull_range(&table, 1_990, &mut out).and_then(|t| t.wait()).map(|_| ());
        let _ = done.send(format!("{result:?} {pulled:?} {}", out.iter().all(|v| *v == 1.0)));
    });
    match finished.recv_timeout(Duration::from_secs(5)) {
        Ok(result) => assert_eq!(result, "Ok(()) Ok(()) true"),
        Err(_) => panic!("push_range hung: the dropped ticket re-locked the client"),
    }
}
