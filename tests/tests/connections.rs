//! Connections that try to hold a real `tessera server` hostage, each beside a normal client
//! that must stay served throughout: silent connections past the idle deadline, frames
//! trickled a byte at a time, too many connections from one address, a connect storm (the
//! listen backlog, the log, the memory it leaves behind).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tessera_client::{Client, ClientConfig};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::raw::{self, RawConn};
use tessera_tests::{free_port, metric, scrape, ServerProc};
use tessera_transport::wire::{Header, Op, Status, CONTROL_SHARD};

/// The idle and frame deadlines the tests give their servers.
const DEADLINE_MS: &str = "1000";
/// How long a test waits for the server to act on a deadline of [`DEADLINE_MS`].
const ACT_WITHIN: Duration = Duration::from_secs(8);
const STEADY_KEYS: usize = 64;

/// A normal worker pushing and pulling in a loop on its own thread while a test misbehaves.
struct Steady {
    stop: Arc<AtomicBool>,
    rounds: Arc<std::sync::atomic::AtomicU64>,
    handle: JoinHandle<Result<(), String>>,
}

impl Steady {
    /// Connects as worker 0, creates the table `steady`, and starts; returns once one round
    /// was served.
    fn start(addr: &str) -> Steady {
        let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let (addr, stop2, rounds2) = (addr.to_string(), stop.clone(), rounds.clone());
        let handle = std::thread::spawn(move || {
            let client = Client::connect(&[&addr], ClientConfig::worker(0)).map_err(|e| format!("connect: {e}"))?;
            let spec = TableSpec::new("steady", TableKind::Dense, 0, STEADY_KEYS as u64, 1);
            let table = client.create_table(&spec).map_err(|e| format!("create: {e}"))?;
            let mut out = vec![0.0; STEADY_KEYS];
            let mut round = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                round += 1;
                let push = client.push_range(&table, 0, &[1.0; STEADY_KEYS]).and_then(|t| t.wait().map(|_| ()));
                push.map_err(|e| format!("push {round}: {e}"))?;
                client.pull_range(&table, 0, &mut out).and_then(|t| t.wait().map(|_| ())).map_err(|e| format!("pull {round}: {e}"))?;
                if out.iter().any(|v| *v != round as f32) {
                    return Err(format!("pull {round} read {:?}", &out[..4]));
                }
                rounds2.store(round, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        });
        let steady = Steady { stop, rounds, handle };
        let deadline = Instant::now() + ACT_WITHIN;
        while steady.rounds() == 0 {
            assert!(!steady.handle.is_finished() && Instant::now() < deadline, "the normal client never got served");
            std::thread::sleep(Duration::from_millis(10));
        }
        steady
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Stops the worker; panics unless every round it ran was served, and more than `since` ran.
    #[track_caller]
    fn finish(self, since: u64) {
        let deadline = Instant::now() + ACT_WITHIN;
        while self.rounds() <= since && !self.handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop.store(true, Ordering::Relaxed);
        let rounds = self.rounds();
        match self.handle.join() {
            Ok(Ok(())) => assert!(rounds > since, "the normal client ran no round during the test ({rounds} in all)"),
            Ok(Err(e)) => panic!("the normal client was not served throughout: {e}"),
            Err(_) => panic!("the normal client panicked"),
        }
    }
}

/// Opens connections that say hello to the control plane and then nothing, until the server
/// refuses one or `max` are open.
fn silent_connections(addr: &str, max: usize) -> Vec<RawConn> {
    let mut held = Vec::new();
    while held.len() < max {
        let mut conn = RawConn::connect(addr);
        match conn.send_hello(CONTROL_SHARD, 9) {
            Ok(reply) if reply.status() == Status::Ok => held.push(conn),
            _ => break,
        }
    }
    held
}

#[test]
fn silent_connections_are_closed_after_the_idle_deadline_and_a_locked_out_client_gets_in() {
    let server = ServerProc::start(&["--shards", "1", "--connections-max", "12", "--client-idle-timeout-ms", DEADLINE_MS]);
    let steady = Steady::start(server.addr());
    let before = steady.rounds();
    // The silent ones take every slot the normal client left.
    let mut silent = silent_connections(server.addr(), 20);
    assert!(silent.len() >= 9, "only {} silent connections were admitted", silent.len());
    let mut refused = RawConn::connect(server.addr());
    refused.recv().expect("a refusal").expect_error(Status::Full, "--connections-max");

    // A newcomer is admitted once the idle deadline frees the slots, and is served.
    let started = Instant::now();
    let newcomer = loop {
        match Client::connect(&[server.addr()], ClientConfig::worker(1)) {
            Ok(client) => break client,
            Err(e) if started.elapsed() > ACT_WITHIN => panic!("locked out for {:?}: {e}", started.elapsed()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let table = newcomer.table("steady").expect("the table");
    newcomer.push_range(&table, 0, &[0.0; STEADY_KEYS]).expect("push").wait().expect("the newcomer is served");
    for conn in &mut silent {
        assert!(conn.closed_within(ACT_WITHIN).is_some(), "a silent connection is still open");
    }
    assert!(server.log().contains("--client-idle-timeout-ms"), "the log does not say why:\n{}", server.log());
    steady.finish(before);
}

#[test]
fn a_client_whose_idle_connections_were_closed_gets_a_clear_error_not_a_hang() {
    let server = ServerProc::start(&["--shards", "1", "--client-idle-timeout-ms", DEADLINE_MS]);
    let steady = Steady::start(server.addr());
    let before = steady.rounds();
    let idle = Client::connect(&[server.addr()], ClientConfig::worker(1)).expect("connect");
    let table = idle.table("steady").expect("the table");
    // Links are made by the first call that needs them.
    idle.push_range(&table, 0, &[0.0; STEADY_KEYS]).expect("push").wait().expect("the first push");
    assert!(server.wait_for_log("sent nothing for 1000 ms", ACT_WITHIN), "no idle close:\n{}", server.log());
    std::thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    let result = idle.push_range(&table, 0, &[0.0; STEADY_KEYS]).and_then(|t| t.wait().map(|_| ()));
    eprintln!("the idle client's next call, after {:?}: {result:?}", started.elapsed());
    assert!(started.elapsed() < ACT_WITHIN, "the call took {:?}", started.elapsed());
    // A client that reconnects by itself may succeed; one that does not must say what happened.
    if let Err(e) = result {
        assert!(e.to_string().contains("closed"), "unclear error: {e}");
    }
    steady.finish(before);
}

#[test]
fn a_frame_trickled_a_byte_at_a_time_after_hello_is_dropped() {
    let server = ServerProc::start(&["--shards", "1", "--frame-timeout-ms", DEADLINE_MS]);
    let steady = Steady::start(server.addr());
    let before = steady.rounds();
    let (conn, _) = RawConn::hello(server.addr(), 0, 5);
    let mut stream = conn.into_stream();
    let mut writer = stream.try_clone().expect("clone the socket");
    let (header, body) = raw::push_range(0, 1, 0, 512, &[1.0; 512]);
    let frame = raw::frame_bytes(&header, &body);
    let trickle = std::thread::spawn(move || {
        for byte in frame.iter().take(40) {
            if writer.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    let started = Instant::now();
    stream.set_read_timeout(Some(ACT_WITHIN)).expect("set a read timeout");
    let mut buf = [0u8; 64];
    let read = stream.read(&mut buf);
    let closed = match &read {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(closed, "the trickling connection is open after {:?}: {read:?}", started.elapsed());
    trickle.join().expect("the trickler");
    assert!(server.wait_for_log("--frame-timeout-ms", ACT_WITHIN), "the log does not say why:\n{}", server.log());
    steady.finish(before);
}

#[test]
fn connections_over_the_per_peer_limit_are_refused_with_the_flag_named() {
    let server = ServerProc::start(&["--shards", "1", "--connections-per-peer-max", "4"]);
    // The normal client holds one: its link to the shard (its pulls of a range on a chain of
    // one go on it too). Silent connections take the other three.
    let steady = Steady::start(server.addr());
    let before = steady.rounds();
    let held = silent_connections(server.addr(), 3);
    assert_eq!(held.len(), 3);
    let mut over = RawConn::connect(server.addr());
    over.recv().expect("a refusal").expect_error(Status::Full, "--connections-per-peer-max");
    over.expect_closed();
    drop(held);
    let deadline = Instant::now() + ACT_WITHIN;
    while silent_connections(server.addr(), 1).is_empty() {
        assert!(Instant::now() < deadline, "no connection admitted after three left");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.log().contains("--connections-per-peer-max"), "the log does not say why:\n{}", server.log());
    steady.finish(before);
}

/// The listening socket's backlog, as `ss` reports it (Send-Q of a listener).
fn listen_backlog(addr: &str) -> u32 {
    let port = addr.rsplit(':').next().expect("a port");
    let out = std::process::Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output().expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_else(|| panic!("no listener on {addr} in `ss -ltn`"));
    line.split_whitespace().nth(2).and_then(|q| q.parse().ok()).unwrap_or_else(|| panic!("unexpected ss line: {line}"))
}

#[test]
fn the_listen_backlog_is_what_the_flag_says_and_a_request_over_somaxconn_is_logged() {
    let server = ServerProc::start(&["--shards", "1", "--listen-backlog", "1000"]);
    let steady = Steady::start(server.addr());
    let before = steady.rounds();
    assert_eq!(listen_backlog(server.addr()), 1000);
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").expect("somaxconn").trim().parse().expect("a number");
    if somaxconn < 65_535 {
        let capped = ServerProc::start(&["--shards", "1", "--listen-backlog", "65535"]);
        assert!(capped.log().contains("somaxconn"), "asking past somaxconn is not logged:\n{}", capped.log());
        assert_eq!(listen_backlog(capped.addr()), somaxconn);
    }
    steady.finish(before);
}

/// The `suppressed=N` counts in the log's lines.
fn suppressed_counts(log: &str) -> Vec<u64> {
    log.lines().filter_map(|l| l.split("suppressed=").nth(1)).filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).collect()
}

#[test]
fn a_storm_of_closing_connections_logs_a_few_lines_and_a_count() {
    let server = ServerProc::start(&["--shards", "1", "--client-idle-timeout-ms", DEADLINE_MS]);
    let steady = Steady::start(server.addr());
    let before = steady.rounds();
    let mut storm = silent_connections(server.addr(), 60);
    assert_eq!(storm.len(), 60);
    for conn in &mut storm {
        assert!(conn.closed_within(ACT_WITHIN).is_some(), "a silent connection is still open");
    }
    // One more, a second later: its line says how many were held back.
    std::thread::sleep(Duration::from_millis(1100));
    silent_connections(server.addr(), 1)[0].closed_within(ACT_WITHIN).expect("closed");
    let log = server.log();
    let lines = log.lines().filter(|l| l.contains("closing connection")).count();
    assert!((1..=30).contains(&lines), "{lines} lines for 61 closed connections:\n{log}");
    assert!(suppressed_counts(&log).iter().sum::<u64>() >= 30, "no count of held-back lines:\n{log}");
    steady.finish(before);
}

/// Connections in the memory storm.
const STORM_CONNECTIONS: usize = 2000;

#[test]
fn memory_goes_back_near_its_baseline_after_a_connection_storm() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = ServerProc::start(&["--shards", "1", "--connections-per-peer-max", "4096", "--metrics", &metrics]);
    let steady = Steady::start(server.addr());
    let before = steady.rounds();
    let rss = || metric(&scrape(&metrics), "tessera_process_resident_bytes", &[]).expect("resident memory");
    let baseline = rss();
    // Every connection says hello to the shard and is served one request; all are open at
    // once. Twice: what the first storm gave back, the allocator may hand the second.
    let mut peak: f64 = 0.0;
    for _ in 0..2 {
        let storm: Vec<RawConn> = (0..STORM_CONNECTIONS)
            .map(|_| {
                let (mut conn, _) = RawConn::hello(server.addr(), 0, 3);
                assert_eq!(conn.request(Header::request(Op::Ping, 0), &[]).status(), Status::Ok);
                conn
            })
            .collect();
        peak = peak.max(rss());
        drop(storm);
        // Give the server a moment to see them all go.
        std::thread::sleep(Duration::from_millis(1000));
    }
    let after = rss();
    let mib = |b: f64| b / (1 << 20) as f64;
    eprintln!("resident memory: {:.1} MiB before, {:.1} MiB with {STORM_CONNECTIONS} connections, {:.1} MiB after", mib(baseline), mib(peak), mib(after));
    assert!(
        after < baseline + 24.0 * (1 << 20) as f64,
        "resident memory stayed at {:.1} MiB after the storm (baseline {:.1} MiB, peak {:.1} MiB)",
        mib(after),
        mib(baseline),
        mib(peak)
    );
    steady.finish(before);
}

/// A standalone server is a chain of one: it speaks the chain protocol, and a peer's request
/// that carries nothing is refused as such, not taken for a control request.
#[test]
fn an_empty_replication_request_to_a_standalone_server_says_what_is_wrong() {
    let server = ServerProc::start(&["--shards", "1"]);
    let (mut conn, _) = RawConn::hello(server.addr(), 0, 1);
    let reply = conn.request(Header::request(Op::Replicate, 0), &[]);
    reply.expect_error(Status::BadRequest, "no message");
    assert!(!reply.message().contains("control request"), "{}", reply.message());
    // A worker's push frame with no pushes asks for acknowledgements: answered.
    let reply = conn.request(Header::request(Op::WorkerPush, 0), &[]);
    assert_eq!(reply.status(), Status::Ok, "{}", reply.message());
}
