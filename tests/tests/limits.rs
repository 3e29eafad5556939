//! Limits and backpressure against real `tessera server` processes: connections over
//! `--connections-max` are refused, a client that stops reading its replies is throttled and then
//! disconnected (without the server's memory growing), and workers over `--workers-max` are
//! refused. Each error names the flag that raises the limit, and each shows in the metrics.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tessera_client::{Client, ClientConfig, Ticket};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::raw::{self, RawConn};
use tessera_tests::{free_port, metric, scrape, ServerProc};
use tessera_transport::wire::{Status, CONTROL_SHARD};

/// Keys of the slow client's table: each pull of all of them is a 400 KB reply.
const KEYS: u32 = 100_000;
/// How long the server waits for a stalled client in the test, and how long the test waits for
/// the server to act on it.
const STALL_TIMEOUT_MS: u64 = 1_500;
const ACT_WITHIN: Duration = Duration::from_secs(20);

fn metrics_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

#[test]
fn connections_over_the_limit_are_refused_with_the_flag_named_and_admitted_again_after() {
    let metrics = metrics_addr();
    let server = ServerProc::start(&["--shards", "1", "--connections-max", "3", "--metrics", &metrics]);
    let held: Vec<RawConn> = (0..3).map(|_| RawConn::hello(server.addr(), CONTROL_SHARD, 0).0).collect();
    let mut over = RawConn::connect(server.addr());
    let refusal = over.recv().expect("a refusal before any hello");
    refusal.expect_error(Status::Full, "--connections-max");
    over.expect_closed();
    assert!(server.log().contains("--connections-max"), "the refusal is not in the log:\n{}", server.log());
    assert_eq!(metric(&scrape(&metrics), "tessera_connections_refused_total", &[]), Some(1.0));

    // A client that cannot get in says why after its reconnection attempts, not a minute later.
    let mut cfg = ClientConfig::worker(0);
    (cfg.reconnect_attempts, cfg.reconnect_pause_ms) = (3, 100);
    let started = Instant::now();
    let refused = Client::connect(&[server.addr()], cfg).expect_err("no room for a client");
    assert!(refused.to_string().contains("--connections-max"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(5), "the refusal took {:?}", started.elapsed());

    // One leaves; a newcomer is admitted once the server has seen it go.
    drop(held);
    let deadline = Instant::now() + ACT_WITHIN;
    loop {
        let mut conn = RawConn::connect(server.addr());
        match conn.send_hello(CONTROL_SHARD, 0) {
            Ok(reply) if reply.status() == Status::Ok => break,
            other if Instant::now() > deadline => panic!("no connection admitted after the others left: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn a_client_that_stops_reading_is_throttled_then_disconnected_and_memory_stays_flat() {
    let metrics = metrics_addr();
    let stall = STALL_TIMEOUT_MS.to_string();
    let server = ServerProc::start(&["--shards", "1", "--client-backlog-bytes-max", "65536", "--client-stall-timeout-ms", &stall, "--metrics", &metrics]);
    let client = Client::connect(&[server.addr()], ClientConfig::worker(0)).expect("a well-behaved client");
    let table = client.create_table(&TableSpec::new("big", TableKind::Dense, 0, u64::from(KEYS), 1)).expect("create");
    let id = client.catalogs().expect("catalog").remove(0).into_iter().find(|e| e.spec.name == "big").expect("the table").id;
    let rss_before = metric(&scrape(&metrics), "tessera_process_resident_bytes", &[]).expect("resident memory");

    // The slow client asks for 200 replies of 400 KB (80 MB) and reads none of them.
    let (mut slow, _) = RawConn::hello(server.addr(), 0, 1);
    let requests = 200;
    for _ in 0..requests {
        let (header, body) = raw::pull_range(id, 1, 0, KEYS);
        slow.send_frame(header, &body).expect("a pull request");
    }
    // Meanwhile the server serves others at once.
    let started = Instant::now();
    client.push_range(&table, 0, &vec![1.0; KEYS as usize]).expect("push").wait().expect("acknowledged during the stall");
    let mut out = vec![0.0; KEYS as usize];
    client.pull_range(&table, 0, &mut out).expect("pull").wait().expect("pulled during the stall");
    assert!(out.iter().all(|v| *v == 1.0));
    assert!(started.elapsed() < Duration::from_secs(5), "others waited {:?} behind the slow client", started.elapsed());

    // It is disconnected after the stall timeout, with the reason in the log and the metrics.
    assert!(server.wait_for_log("read none of its replies", ACT_WITHIN), "the slow client was not disconnected within {ACT_WITHIN:?}:\n{}", server.log());
    let text = scrape(&metrics);
    assert_eq!(metric(&text, "tessera_slow_clients_closed_total", &[]), Some(1.0), "{text}");
    let rss_after = metric(&text, "tessera_process_resident_bytes", &[]).expect("resident memory");
    assert!(rss_after < rss_before + 32e6, "resident memory grew from {rss_before} to {rss_after} bytes for a client that read nothing");
    // What it gets when it finally reads: a fraction of what it asked for, then the end.
    let received = drain(slow.into_stream());
    assert!(received < requests as usize * KEYS as usize * 4 / 2, "the slow client got {received} bytes");
}

/// Reads until the server's close; returns the bytes read.
fn drain(mut stream: TcpStream) -> usize {
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("set a read timeout");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return total,
            Err(e) => panic!("reading what the server sent before closing: {e}"),
        }
    }
}

#[test]
fn workers_over_the_table_limit_are_refused_with_the_flag_named() {
    let server = ServerProc::start(&["--shards", "1", "--workers-max", "4"]);
    let ok = Client::connect(&[server.addr()], ClientConfig::worker(3)).expect("worker 3");
    let table = ok.create_table(&TableSpec::new("few", TableKind::Dense, 0, 8, 1)).expect("create");
    ok.push_range(&table, 0, &[1.0; 8]).expect("push").wait().expect("worker 3 of 4 is served");
    let over = Client::connect(&[server.addr()], ClientConfig::worker(4)).expect("worker 4 connects");
    let table = over.table("few").expect("the table");
    let err = over.push_range(&table, 0, &[1.0; 8]).and_then(Ticket::wait).expect_err("worker 4 of 4 must be refused").to_string();
    assert!(err.contains("--workers-max"), "{err}");
}
