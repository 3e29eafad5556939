//! The cluster secret, against real `tessera server` processes: peers that do not prove they hold
//! it learn nothing and are refused, each refusal shows in the log and the metrics, and the
//! server keeps serving the peers that do. Clients and tools check the server's proof as well.

use std::time::Duration;

use tessera_client::{Client, ClientConfig};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::raw::RawConn;
use tessera_tests::{free_port, metric, run_tool, scrape, ScratchDir, ServerProc};
use tessera_transport::auth::{ClusterSecret, Side, Transcript, CHALLENGE_BYTES, NONCE_BYTES};
use tessera_transport::wire::{Header, Op, Status, CONTROL_SHARD};
use tessera_transport::TransportConfig;

const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
const SECRET: &str = "a shared secret of the test cluster\n";

fn client_config(secret: Option<&str>) -> ClientConfig {
    let cluster_secret = secret.map(|s| ClusterSecret::new(s.trim_end().as_bytes()).expect("a long enough secret"));
    ClientConfig { transport: TransportConfig { cluster_secret, ..TransportConfig::default() }, ..ClientConfig::worker(0) }
}

/// A server with `--cluster-secret-file` and `--metrics`; the scratch directory holds the file.
fn secured_server(dir: &ScratchDir) -> (ServerProc, String) {
    let secret = dir.write("secret", SECRET);
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = ServerProc::start(&["--shards", "2", "--cluster-secret-file", secret.to_str().unwrap(), "--metrics", &metrics, "--log", "info"]);
    (server, metrics)
}

/// Says hello with a nonce of our own and returns the server's challenge reply.
fn challenged(addr: &str, shard: u64, worker: u32, nonce: [u8; NONCE_BYTES]) -> (RawConn, Header, Vec<u8>) {
    let mut conn = RawConn::connect(addr);
    let mut hello = Header::request(Op::Hello, 0);
    hello.start = shard;
    hello.worker = worker;
    conn.send_frame(hello, &nonce).expect("send the hello");
    let reply = conn.recv().expect("the challenge");
    (conn, reply.header, reply.body)
}

#[test]
fn peers_without_the_cluster_secret_are_refused_and_learn_nothing() {
    let dir = ScratchDir::new("security");
    let (server, metrics) = secured_server(&dir);
    let addr = server.addr().to_string();

    // 1. The client library with the secret works end to end.
    let client = Client::connect(&[addr.as_str()], client_config(Some(SECRET))).expect("a client with the secret connects");
    let table = client.create_table(&TableSpec::new("secured", TableKind::Dense, 0, 64, 1)).expect("create");
    client.push_range(&table, 0, &[1.0; 64]).expect("push").wait().expect("acknowledged");

    // 2. Without the secret, or with another one: refused with a message that says what to do.
    let refused = Client::connect(&[addr.as_str()], client_config(None)).expect_err("no secret must be refused").to_string();
    assert!(refused.contains("--cluster-secret-file"), "{refused}");
    let wrong = Client::connect(&[addr.as_str()], client_config(Some("another cluster's secret"))).expect_err("a wrong secret must fail").to_string();
    assert!(wrong.contains("proof is wrong"), "{wrong}");

    // 3. Hostile peers at the wire level. A request before any hello:
    let mut early = RawConn::connect(&addr);
    early.request(Header::request(Op::Catalog, 0), &[]).expect_error(Status::Unauthenticated, "authenticate first");
    early.expect_closed();
    // A hello without a nonce learns no server description, only the refusal.
    let mut bare = RawConn::connect(&addr);
    let reply = bare.send_hello(CONTROL_SHARD, 0).expect("a reply to the hello");
    reply.expect_error(Status::Unauthenticated, "cluster-secret-file");
    bare.expect_closed();
    // A challenge is a nonce and a proof, nothing else; answering it with a data request or a
    // forged proof is refused, and so is replaying a proof made for another challenge.
    let (mut skipper, h, body) = challenged(&addr, 0, 7, [1; NONCE_BYTES]);
    assert_eq!(h.status(), Status::AuthChallenge);
    assert_eq!(body.len(), CHALLENGE_BYTES, "the challenge carries nothing but the nonce and the server's proof");
    let (keys, values) = (0u64.to_le_bytes(), 5.0f32.to_le_bytes());
    let mut push = Header::request(Op::Push, 0);
    (push.table, push.dim, push.count, push.worker) = (0, 1, 1, 7);
    skipper.request(push, &[keys.as_slice(), values.as_slice()].concat()).expect_error(Status::Unauthenticated, "authenticate first");
    skipper.expect_closed();
    let (mut forger, _, _) = challenged(&addr, 0, 7, [2; NONCE_BYTES]);
    forger.request(Header::request(Op::Auth, 0), &[0xAB; 32]).expect_error(Status::Unauthenticated, "authentication failed");
    forger.expect_closed();
    // A peer that knows a good proof for one challenge cannot reuse it: the server's nonce
    // differs each time.
    let secret = ClusterSecret::new(SECRET.trim_end().as_bytes()).unwrap();
    let (mut first, _, body) = challenged(&addr, 0, 7, [3; NONCE_BYTES]);
    let t = Transcript { client_nonce: [3; NONCE_BYTES], server_nonce: body[..NONCE_BYTES].try_into().unwrap(), shard: 0, worker: 7 };
    let proof = secret.proof(Side::Client, &t);
    let mut auth = Header::request(Op::Auth, 0);
    auth.start = 0;
    assert_eq!(first.request(auth, &proof).status(), Status::Ok, "the right proof is accepted");
    let (mut replayer, _, _) = challenged(&addr, 0, 7, [3; NONCE_BYTES]);
    replayer.request(auth, &proof).expect_error(Status::Unauthenticated, "authentication failed");
    replayer.expect_closed();

    // 4. Nothing changed for the client that holds the secret: its table and values are intact.
    let mut out = vec![0.0f32; 64];
    client.pull_range(&table, 0, &mut out).expect("pull").wait().expect("pulled");
    assert_eq!(out, vec![1.0; 64], "a refused peer must not have changed anything");

    // 5. Every refusal is in the metrics and in the log: no hello nonce (twice: the client and
    // the bare hello), the early request, the skipped answer, the forgery, the replay, and the
    // client with another secret that left after checking the server's proof.
    let text = scrape(&metrics);
    let refusals = metric(&text, "tessera_auth_refusals_total", &[]).expect("the refusal counter");
    assert!(refusals >= 7.0, "{refusals} refusals counted:\n{text}");
    let log = server.log();
    for needle in ["authentication failed", "authenticate first", "left during the authentication handshake"] {
        assert!(log.contains(needle), "the server log does not mention {needle:?}:\n{log}");
    }
}

#[test]
fn tools_take_the_secret_file_and_clients_refuse_servers_without_one() {
    let dir = ScratchDir::new("security-tools");
    let (server, _) = secured_server(&dir);
    let secret = dir.path().join("secret");
    let with = run_tool(&["status", "--connect", server.addr(), "--cluster-secret-file", secret.to_str().unwrap()], TOOL_TIMEOUT);
    assert!(with.status.success(), "status with the secret failed:\n{}", with.stderr);
    let without = run_tool(&["status", "--connect", server.addr()], TOOL_TIMEOUT);
    assert!(!without.status.success(), "status without the secret succeeded:\n{}", without.stdout);
    assert!(without.stderr.contains("--cluster-secret-file"), "{}", without.stderr);
    let short = dir.write("short", "hunter2\n");
    let bad = run_tool(&["status", "--connect", server.addr(), "--cluster-secret-file", short.to_str().unwrap()], TOOL_TIMEOUT);
    assert!(!bad.status.success() && bad.stderr.contains("at least 16 bytes"), "{}", bad.stderr);

    // A client holding a secret does not talk to a server that cannot prove it holds it.
    let open = ServerProc::start(&["--shards", "1"]);
    let err = Client::connect(&[open.addr()], client_config(Some(SECRET))).expect_err("an unauthenticated server must be refused").to_string();
    assert!(err.contains("did not prove"), "{err}");
}

#[test]
fn a_replicated_cluster_with_a_secret_serves_its_members_and_refuses_a_stranger() {
    let dir = ScratchDir::new("security-chain");
    let secret = dir.write("secret", SECRET);
    let secret = secret.to_str().unwrap();
    let tables = dir.write("tables.toml", "[[table]]\nname = \"w\"\nkind = \"dense\"\nstart = 0\nend = 64\ndim = 1\nupdater = \"sum\"\n");
    let tables = tables.to_str().unwrap();
    let coordinator = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let _c = ServerProc::coordinator_at(
        &coordinator,
        &["--servers", "2", "--replicas", "2", "--ranges", "4", "--cluster-secret-file", secret, "--metrics", &metrics],
    );
    let member = |node: &str| {
        ServerProc::start(&["--node-id", node, "--coordinator", &coordinator, "--tables", tables, "--shards", "1", "--no-pin", "--cluster-secret-file", secret])
    };
    let servers = [member("1"), member("2")];
    // A server without the secret cannot join: the coordinator refuses it, and it stops at once
    // saying why (waiting would not mend it).
    let listen = format!("127.0.0.1:{}", free_port());
    let stranger =
        run_tool(&["server", "--listen", &listen, "--node-id", "3", "--coordinator", &coordinator, "--tables", tables, "--shards", "1"], TOOL_TIMEOUT);
    assert!(!stranger.status.success(), "a server without the secret joined:\n{}", stranger.stderr);
    assert!(stranger.stderr.contains("--cluster-secret-file"), "the stranger was not told why:\n{}", stranger.stderr);

    // Workers with the secret train on the two members: chains form, pushes are acknowledged.
    let addrs: Vec<&str> = servers.iter().map(|s| s.addr()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let client = loop {
        match tessera_client::Client::connect(&addrs, client_config(Some(SECRET))) {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() > deadline => panic!("no replicated client within 30 s: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let table = client.table("w").expect("table w");
    client.set_clock(1);
    client.push_range(&table, 0, &[2.0; 64]).and_then(|t| t.wait()).expect("acknowledged by the chain");
    let mut out = vec![0.0; 64];
    client.pull_range(&table, 0, &mut out).and_then(|t| t.wait()).expect("pulled");
    assert_eq!(out, vec![2.0; 64]);
    let status = run_tool(&["status", "--coordinator", &coordinator, "--cluster-secret-file", secret], TOOL_TIMEOUT);
    assert!(status.status.success(), "{}", status.stderr);
    assert!(!status.stdout.contains(&listen), "the stranger joined the cluster:\n{}", status.stdout);
    // Each member's shards show their replicas' counters: the heads applied the push's pieces.
    let applied: u64 = addrs
        .iter()
        .map(|addr| {
            let status = run_tool(&["status", "--connect", addr, "--cluster-secret-file", secret], TOOL_TIMEOUT);
            assert!(status.status.success(), "{}", status.stderr);
            status.stdout.lines().filter_map(|l| l.trim().strip_prefix("replica: ")?.split(' ').next()?.parse::<u64>().ok()).sum::<u64>()
        })
        .sum();
    assert!(applied >= 1, "no replica counted the push as applied");
    let refusals = metric(&scrape(&metrics), "tessera_auth_refusals_total", &[]).unwrap_or(0.0);
    assert!(refusals >= 1.0, "the coordinator counted {refusals} refusals");
}
