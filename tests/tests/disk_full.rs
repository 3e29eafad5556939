//! A disk that fills up under a `wal`-mode server, with real processes and a real filesystem: the
//! data directory is a small tmpfs mounted for the test (it needs root, which the test command
//! has; elsewhere the test says it was skipped).
//!
//! One worker pushes until its log no longer fits. Then:
//! - the push whose record could not be made durable is answered with a `NotDurable` error, not
//!   acknowledged, and the message names the full disk;
//! - later pushes are refused the same way and change nothing;
//! - the server keeps running and serves pulls from memory;
//! - once the disk has room again, a restarted server recovers every acknowledged push (and at
//!   most the unacknowledged ones that reached the disk whole), and takes pushes again.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tessera_client::{Client, ClientConfig, ClientError};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::{ScratchDir, ServerProc};
use tessera_transport::Status;

/// Values per push: 64 KiB, so the log fills the small filesystem in a few dozen pushes.
const PUSH_KEYS: u64 = 16 << 10;

/// A tmpfs mounted on a directory for the test's lifetime.
struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(dir: &'a Path, size: &str) -> Tmpfs<'a> {
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).status().expect("run mount");
        assert!(status.success(), "mount -t tmpfs on {} failed ({status})", dir.display());
        Tmpfs(dir)
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(self.0).status().expect("run mount");
        assert!(status.success(), "remount of {} failed ({status})", self.0.display());
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

fn root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A server on `dir`; `blocking` writes with pwrite/fsync instead of io_uring.
fn server(dir: &Path, blocking: bool) -> ServerProc {
    let dir = dir.to_str().unwrap();
    let mut args = vec!["--shards", "1", "--no-pin", "--durability", "wal", "--data-dir", dir, "--checkpoint-interval-s", "0"];
    if blocking {
        args.push("--disk-blocking");
    }
    ServerProc::start(&args)
}

/// The value every key holds, checking that they agree.
fn value(client: &Client) -> f32 {
    let table = client.table("full").unwrap();
    let mut values = vec![0f32; PUSH_KEYS as usize];
    client.pull_range(&table, 0, &mut values).unwrap().wait().unwrap();
    assert!(values.iter().all(|v| *v == values[0]), "a push was half applied");
    values[0]
}

/// Pushes 1.0 to every key of table `full`, a clock a push, until a push fails; returns how
/// many were acknowledged, the failure, and how long its call took to fail. The failure is
/// `NotDurable` naming the full disk, after enough pushes to have proved something.
fn push_until_full(client: &Client) -> (u64, ClientError, Duration) {
    let table = client.table("full").unwrap();
    let ones = vec![1f32; PUSH_KEYS as usize];
    let mut acked = 0u64;
    loop {
        client.set_clock(acked + 1);
        let began = std::time::Instant::now();
        match client.push_range(&table, 0, &ones).and_then(|t| t.wait()) {
            Ok(_) => acked += 1,
            Err(failure) => {
                let message = failure.to_string();
                assert_eq!(failure.status(), Some(Status::NotDurable), "{failure}");
                assert!(message.contains("not acknowledged") && message.contains("disk full"), "{message}");
                assert!(acked > 10, "the disk filled after {acked} pushes: the test proved little");
                return (acked, failure, began.elapsed());
            }
        }
        assert!(acked < 1000, "a 4 MiB filesystem took {acked} pushes of 64 KiB");
    }
}

/// After a restart with room again: every acknowledged push of the `acked` is there (and at
/// most the one after, applied but not acknowledged), and a push is taken.
fn check_recovered(addr: &str, acked: u64) {
    let client = Client::connect(&[addr], ClientConfig::worker(0)).unwrap();
    let recovered = value(&client) as u64;
    assert!(recovered == acked || recovered == acked + 1, "acknowledged {acked}, recovered {recovered}");
    client.set_clock(recovered + 1);
    client.push_range(&client.table("full").unwrap(), 0, &vec![1f32; PUSH_KEYS as usize]).unwrap().wait().unwrap();
    assert_eq!(value(&client), (recovered + 1) as f32);
}

#[test]
fn a_full_disk_stops_acknowledgements_not_the_server() {
    disk_full(false);
}

#[test]
fn the_same_with_the_pwrite_fsync_fallback() {
    disk_full(true);
}

/// The same disk under a replica: a coordinator and one server (every range on a chain of one)
/// whose log fills up. The push that could not be made durable fails at once with the full
/// disk named, not after the client's minute of waiting for an acknowledgement; later pushes
/// are refused and change nothing; pulls are served; a restart with room recovers every
/// acknowledged push and takes pushes again.
#[test]
fn a_full_disk_under_a_replica_stops_acknowledgements_not_the_server() {
    if !root() {
        println!("skipped: mounting a tmpfs needs root (the test command runs as root)");
        return;
    }
    let scratch = ScratchDir::new("disk-full-replica");
    let fs = Tmpfs::mount(scratch.path(), "4m");
    let coordinator = format!("127.0.0.1:{}", tessera_tests::free_port());
    let _coordinator = ServerProc::coordinator_at(&coordinator, &["--servers", "1", "--replicas", "1", "--ranges", "2", "--workers", "2"]);
    let addr = format!("127.0.0.1:{}", tessera_tests::free_port());
    let dir = scratch.path().to_str().unwrap().to_string();
    let args = [
        "--node-id",
        "1",
        "--shards",
        "1",
        "--no-pin",
        "--coordinator",
        &coordinator,
        "--durability",
        "wal",
        "--data-dir",
        &dir,
        "--checkpoint-interval-s",
        "0",
    ];
    let mut srv = ServerProc::start_at(&addr, &args);
    let client = Client::connect(&[srv.addr()], ClientConfig::worker(0)).unwrap();
    client.create_table(&TableSpec::new("full", TableKind::Dense, 0, PUSH_KEYS, 1)).unwrap();
    let table = client.table("full").unwrap();
    let ones = vec![1f32; PUSH_KEYS as usize];
    let (acked, failure, took) = push_until_full(&client);
    assert!(took < Duration::from_secs(10), "the failure took {took:?} to report");
    println!("after {acked} acknowledged pushes, in {took:?}: {failure}");
    assert!(srv.wait_for_log("the write-ahead log failed", Duration::from_secs(5)), "{}", srv.log());

    // Pulls are served from memory; later pushes are refused and change nothing.
    let applied = value(&client);
    assert!(applied == acked as f32 || applied == (acked + 1) as f32, "acknowledged {acked}, the table holds {applied}");
    for _ in 0..3 {
        client.set_clock(acked + 2);
        let refused = client.push_range(&table, 0, &ones).and_then(|t| t.wait()).unwrap_err();
        assert_eq!(refused.status(), Some(Status::NotDurable), "{refused}");
        assert!(refused.to_string().contains("disk full"), "{refused}");
    }
    assert_eq!(value(&client), applied, "a refused push changed the table");
    assert!(srv.is_running());
    drop(client);
    srv.kill();

    // With room again, a restart brings back every acknowledged push, and serves pushes.
    fs.resize("64m");
    let srv = ServerProc::start_at(&addr, &args);
    check_recovered(srv.addr(), acked);
}

fn disk_full(blocking: bool) {
    if !root() {
        println!("skipped: mounting a tmpfs needs root (the test command runs as root)");
        return;
    }
    let scratch = ScratchDir::new("disk-full");
    let fs = Tmpfs::mount(scratch.path(), "4m");
    let mut srv = server(scratch.path(), blocking);
    let client = Client::connect(&[srv.addr()], ClientConfig::worker(0)).unwrap();
    client.create_table(&TableSpec::new("full", TableKind::Dense, 0, PUSH_KEYS, 1)).unwrap();
    let table = client.table("full").unwrap();
    let ones = vec![1f32; PUSH_KEYS as usize];

    // Push until the log no longer fits.
    let (acked, failure, _) = push_until_full(&client);
    println!("after {acked} acknowledged pushes: {failure}");
    assert!(srv.wait_for_log("the write-ahead log failed", Duration::from_secs(5)), "{}", srv.log());

    // The server serves pulls from memory: the acknowledged pushes, and the one that was applied
    // but not acknowledged.
    let applied = value(&client);
    assert_eq!(applied, (acked + 1) as f32);
    // Later pushes are refused whole.
    for _ in 0..3 {
        client.set_clock(acked + 2);
        let refused = client.push_range(&table, 0, &ones).and_then(|t| t.wait()).unwrap_err();
        assert_eq!(refused.status(), Some(Status::NotDurable), "{refused}");
        assert!(refused.to_string().contains("refused and not applied"), "{refused}");
        assert!(matches!(refused, ClientError::Server { .. }));
    }
    assert_eq!(value(&client), applied, "a refused push changed the table");
    assert!(srv.is_running());
    let status = tessera_tests::run_tool(&["status", "--connect", srv.addr()], Duration::from_secs(20));
    assert!(status.stdout.contains("THE WRITE-AHEAD LOG FAILED") && status.stdout.contains("disk full"), "{}", status.stdout);
    drop(client);
    srv.kill();

    // With room again, a restart brings back every acknowledged push, and serves pushes.
    fs.resize("64m");
    let srv = server(scratch.path(), blocking);
    assert!(srv.log().contains("recovered"), "{}", srv.log());
    check_recovered(srv.addr(), acked);
}

/// A full disk under one member of chains of two: three servers, the third's data directory on
/// the small filesystem. Once its log fails, it stops heartbeating; the coordinator takes it
/// for failed and its chains go on with their other members, so every push is acknowledged
/// (some after a failover's pause) and the sums are exact. Restarted with room, it recovers
/// from its disk, joins the chains again, and nothing is lost.
#[test]
fn a_full_disk_under_one_member_takes_it_out_of_its_chains_and_pushes_go_on() {
    if !root() {
        println!("skipped: mounting a tmpfs needs root (the test command runs as root)");
        return;
    }
    let scratch = ScratchDir::new("disk-full-member");
    let dirs: Vec<String> = (1..=3).map(|n| scratch.path().join(format!("node-{n}")).to_str().unwrap().to_string()).collect();
    dirs.iter().for_each(|d| std::fs::create_dir_all(d).unwrap());
    let fs = Tmpfs::mount(Path::new(&dirs[2]), "4m");
    let coordinator = format!("127.0.0.1:{}", tessera_tests::free_port());
    let args = ["--servers", "3", "--replicas", "2", "--ranges", "4", "--workers", "2", "--failure-timeout-ms", "1000"];
    let _coordinator = ServerProc::coordinator_at(&coordinator, &args);
    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", tessera_tests::free_port())).collect();
    let server_args = |n: usize| -> Vec<String> {
        let node = (n + 1).to_string();
        let args = ["--node-id", &node, "--shards", "1", "--no-pin", "--coordinator", &coordinator, "--durability", "wal"];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--data-dir", &dirs[n], "--checkpoint-interval-s", "0"].map(String::from));
        args
    };
    let start = |n: usize| ServerProc::start_at(&addrs[n], &server_args(n).iter().map(String::as_str).collect::<Vec<_>>());
    let mut servers: Vec<ServerProc> = (0..3).map(start).collect();
    let client = Client::connect(&[servers[0].addr()], ClientConfig::worker(0)).unwrap();
    client.create_table(&TableSpec::new("full", TableKind::Dense, 0, PUSH_KEYS, 1)).unwrap();
    let table = client.table("full").unwrap();
    let ones = vec![1f32; PUSH_KEYS as usize];
    let chains = || -> Vec<tessera_replication::protocol::Chain> {
        let body = tessera_transport::ask(&coordinator, tessera_transport::Op::ClusterConfig, &[], &Default::default()).unwrap();
        let view: tessera_replication::protocol::ClusterView = serde_json::from_slice(&body).unwrap();
        view.config.map(|c| c.chains).unwrap_or_default()
    };
    let in_chains = |node: u32| chains().iter().any(|chain| chain.nodes.contains(&tessera_replication::protocol::NodeId(node)));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !chains().iter().all(|c| c.nodes.len() == 2) {
        assert!(std::time::Instant::now() < deadline, "the chains did not reach two members: {:?}", chains());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(in_chains(3));

    // Every push is acknowledged, through the third server's full disk and its leaving.
    let pushes = 200u64;
    let mut slowest = Duration::ZERO;
    for n in 1..=pushes {
        client.set_clock(n);
        let began = std::time::Instant::now();
        client.push_range(&table, 0, &ones).and_then(|t| t.wait()).unwrap_or_else(|e| panic!("push {n}: {e}\n{}", servers[2].log()));
        slowest = slowest.max(began.elapsed());
    }
    println!("{pushes} pushes acknowledged, the slowest in {slowest:?}");
    assert!(servers[2].wait_for_log("this server stops heartbeating", Duration::from_secs(5)), "{}", servers[2].log());
    assert!(!in_chains(3), "the server whose log failed is still in a chain");
    assert!(servers[2].is_running(), "it keeps running (for an operator to look at), out of every chain");
    assert_eq!(value(&client), pushes as f32);

    // Restarted with room, it recovers from its disk and joins the chains again.
    servers[2].kill();
    fs.resize("64m");
    servers[2] = start(2);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !in_chains(3) {
        assert!(std::time::Instant::now() < deadline, "the restarted server did not rejoin its chains\n{}", servers[2].log());
        std::thread::sleep(Duration::from_millis(100));
    }
    client.set_clock(pushes + 1);
    client.push_range(&table, 0, &ones).unwrap().wait().unwrap();
    assert_eq!(value(&client), (pushes + 1) as f32);
}
