//! Whole `tessera` processes: a two-server cluster trained by `tessera demo`, the embedded demo,
//! start-up errors, and a server killed with `kill -9` under a pipelining client.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_client::{Client, ClientConfig, ClientError};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::{free_port, run_tool, ScratchDir, ServerProc};

/// The demo must come this close to the accuracy of the model that generated its data.
const ACCURACY_SLACK: f64 = 0.03;
/// A generous bound on one demo run (it takes seconds in a debug build on two cores).
const DEMO_TIMEOUT: Duration = Duration::from_secs(240);
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Parses the demo's `--json` summary and checks what every run must show.
#[track_caller]
fn check_demo_summary(stdout: &str, stderr: &str) -> Value {
    let summary: Value =
        serde_json::from_str(stdout).unwrap_or_else(|e| panic!("the demo's stdout is not one JSON summary ({e}):\n{stdout}\nstderr:\n{stderr}"));
    for field in ["accuracy", "true_model_accuracy", "examples_per_s", "bytes_sent", "bytes_received", "heldout_logloss"] {
        assert!(summary[field].is_number(), "summary field {field:?} missing or not a number: {summary}");
    }
    let accuracy = summary["accuracy"].as_f64().unwrap();
    let truth = summary["true_model_accuracy"].as_f64().unwrap();
    eprintln!("demo accuracy {accuracy:.4}, true model {truth:.4}, gap {:.4} (slack {ACCURACY_SLACK})", truth - accuracy);
    assert!((0.5..=1.0).contains(&truth), "true model accuracy {truth} is not plausible");
    assert!(accuracy >= truth - ACCURACY_SLACK, "the demo reached accuracy {accuracy}, more than {ACCURACY_SLACK} below the true model's {truth}\n{stderr}");
    assert!(summary["examples_per_s"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(summary["bytes_sent"].as_u64().unwrap() > 0, "{summary}");
    let epochs = summary["epochs"].as_array().expect("per-epoch results");
    assert!(!epochs.is_empty(), "{summary}");
    summary
}

/// Two servers and a coordinator keeping one copy of every range (chains of one): the demo
/// trains through either server's address, both servers apply pushes and hold keys of its
/// table, and each key is held once.
#[test]
fn a_two_server_cluster_of_chains_of_one_trains_the_demo_and_both_hold_keys() {
    let coordinator = format!("127.0.0.1:{}", free_port());
    let _coord = ServerProc::coordinator_at(&coordinator, &["--servers", "2", "--replicas", "1", "--ranges", "8"]);
    let addrs = [format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())];
    let servers: Vec<ServerProc> = (0..2)
        .map(|i| ServerProc::start_at(&addrs[i], &["--node-id", &(i + 1).to_string(), "--coordinator", &coordinator, "--shards", "2", "--no-pin"]))
        .collect();
    let features = 100_000u64;
    let demo = run_tool(&["demo", "--connect", &addrs[1], "--features", &features.to_string(), "--examples", "20000", "--key-cache", "--json"], DEMO_TIMEOUT);
    assert!(demo.status.success(), "demo failed ({}):\n{}", demo.status, demo.stderr);
    check_demo_summary(&demo.stdout, &demo.stderr);

    // Status through one server reports every member, each under its own address.
    let status = run_tool(&["status", "--connect", &addrs[0], "--json"], TOOL_TIMEOUT);
    assert!(status.status.success(), "status failed ({}):\n{}", status.status, status.stderr);
    let reports: Value = serde_json::from_str(&status.stdout).unwrap_or_else(|e| panic!("status --json ({e}):\n{}", status.stdout));
    let reports = reports.as_array().expect("one report per server");
    let mut named: Vec<&str> = reports.iter().map(|r| r["addr"].as_str().expect("a report names its server")).collect();
    named.sort_unstable();
    let mut want: Vec<&str> = addrs.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(named, want, "{reports:?}");
    // Given both members, it shows each once.
    let text = run_tool(&["status", "--connect", &format!("{},{}", addrs[0], addrs[1])], TOOL_TIMEOUT);
    for addr in &addrs {
        assert_eq!(text.stdout.matches(&format!("server {addr}:")).count(), 1, "status does not show {addr} once:\n{}", text.stdout);
    }
    let mut held = 0;
    for (index, report) in reports.iter().enumerate() {
        let tables = report["catalog"]["tables"].as_array().expect("tables");
        let entry = tables.iter().find(|t| t["spec"]["name"].as_str().is_some_and(|n| n.starts_with("demo.lr-")));
        let id = entry.unwrap_or_else(|| panic!("server {index} lacks demo.lr: {report}"))["id"].as_u64().expect("a table id");
        // The training reached this server: its shards applied pushes and hold keys of the table.
        let shard_parts: Vec<&Value> = report["shards"]
            .as_array()
            .expect("shards")
            .iter()
            .flat_map(|s| s["tables"].as_array().expect("tables").iter())
            .filter(|t| t["table"].as_u64() == Some(id))
            .collect();
        let pushes: u64 = shard_parts.iter().map(|t| t["pushes"].as_u64().unwrap()).sum();
        let keys: u64 = shard_parts.iter().map(|t| t["sparse_keys"].as_u64().unwrap()).sum();
        assert!(pushes > 0 && keys > 0, "server {index} saw {pushes} pushes and holds {keys} keys of demo.lr");
        held += keys;
    }
    // Features hash to keys; one copy of each is on one of the two servers.
    assert!(held <= features, "the two servers hold {held} keys of a {features}-feature model: some twice");
    drop(servers);
}

#[test]
fn the_embedded_demo_learns_the_true_model() {
    let demo = run_tool(&["demo", "--features", "100000", "--examples", "20000", "--json"], DEMO_TIMEOUT);
    assert!(demo.status.success(), "demo failed ({}):\n{}", demo.status, demo.stderr);
    let summary = check_demo_summary(&demo.stdout, &demo.stderr);
    assert_eq!(summary["workers"].as_u64(), Some(2), "{summary}");
}

#[test]
fn the_demo_saves_bytes_with_key_caching_and_a_filter_under_bounded_delay_and_still_learns() {
    let small = ["demo", "--features", "100000", "--examples", "20000", "--json"];
    let plain = run_tool(&small, DEMO_TIMEOUT);
    assert!(plain.status.success(), "demo failed ({}):\n{}", plain.status, plain.stderr);
    let plain = check_demo_summary(&plain.stdout, &plain.stderr);
    let saving = [&small[..], &["--key-cache", "--filter", "significant:0.5", "--consistency", "bounded:1"]].concat();
    let demo = run_tool(&saving, DEMO_TIMEOUT);
    assert!(demo.status.success(), "demo failed ({}):\n{}", demo.status, demo.stderr);
    let summary = check_demo_summary(&demo.stdout, &demo.stderr);
    let (offered, pushed) = (summary["keys_offered"].as_u64().unwrap(), summary["keys_pushed"].as_u64().unwrap());
    assert!(pushed < offered * 3 / 4, "the filter pushed {pushed} of {offered} keys");
    let (before, after) = (plain["bytes_sent"].as_u64().unwrap(), summary["bytes_sent"].as_u64().unwrap());
    assert!(after < before / 2, "key caching and the filter sent {after} bytes, against {before} without");
}

#[test]
fn the_demo_wire_table_compares_every_feature() {
    let args = ["demo", "--wire-table", "--features", "100000", "--examples", "20000", "--epochs", "1"];
    let out = run_tool(&args, DEMO_TIMEOUT);
    assert!(out.status.success(), "demo --wire-table failed ({}):\n{}", out.status, out.stderr);
    for row in ["| adagrad | none |", "| adagrad | key caching |", "| adagrad | compression |", "filter significant:", "filter skip:", "| ftrl | filter kkt:"] {
        assert!(out.stdout.contains(row), "no {row:?} row:\n{}", out.stdout);
    }
    let bad = run_tool(&["demo", "--filter", "sometimes"], TOOL_TIMEOUT);
    assert!(!bad.status.success() && bad.stderr.contains("is not a filter"), "{}", bad.stderr);
    // A server option the demo's servers refuse is reported before the data set is made.
    let bad = run_tool(&["demo", "--servers", "3", "--replicas", "2", "--durability", "wal"], TOOL_TIMEOUT);
    assert!(!bad.status.success() && bad.stderr.contains("--data-dir"), "{}", bad.stderr);
    assert!(!bad.stdout.contains("generating"), "the data set was made first:\n{}", bad.stdout);
}

#[test]
fn the_demo_trains_on_a_replicated_cluster_in_the_process() {
    // Three servers with chains of two; and one server whose every range is a chain of one.
    for (servers, replicas, says) in [("3", "2", ["3 servers, ", "every range on a chain of 2"]), ("1", "1", ["1 server, ", "every range on a chain of 1"])] {
        let args = ["demo", "--servers", servers, "--replicas", replicas, "--features", "100000", "--examples", "20000", "--key-cache", "--json"];
        let demo = run_tool(&args, DEMO_TIMEOUT);
        assert!(demo.status.success(), "demo {args:?} failed ({}):\n{}", demo.status, demo.stderr);
        assert!(says.iter().all(|s| demo.stderr.contains(s)), "{}", demo.stderr);
        check_demo_summary(&demo.stdout, &demo.stderr);
    }
}

#[test]
fn a_malformed_tables_file_stops_the_server_with_a_message_naming_it() {
    let dir = ScratchDir::new("bad-tables");
    let cases = [
        ("broken.toml", "[[table]\nname = \"x\"\n", "broken.toml"),
        ("unknown-field.toml", "[[table]]\nname = \"x\"\nkind = \"dense\"\nend = 10\ndimm = 3\n", "unknown-field.toml"),
        ("empty-range.toml", "[[table]]\nname = \"empty\"\nkind = \"dense\"\nstart = 5\nend = 5\n", "empty"),
        ("bad-updater.toml", "[[table]]\nname = \"w\"\nkind = \"dense\"\nend = 10\nupdater = \"adamw\"\n", "adamw"),
    ];
    for (name, text, needle) in cases {
        let path = dir.write(name, text);
        let port = free_port().to_string();
        let listen = format!("127.0.0.1:{port}");
        let out = run_tool(&["server", "--listen", &listen, "--tables", path.to_str().unwrap()], TOOL_TIMEOUT);
        assert!(!out.status.success(), "the server started with {name}:\n{}", out.stderr);
        assert!(out.stderr.contains(needle), "the error for {name} does not mention {needle:?}:\n{}", out.stderr);
    }
    let missing = dir.path().join("missing.toml");
    let out = run_tool(&["server", "--listen", "127.0.0.1:0", "--tables", missing.to_str().unwrap()], TOOL_TIMEOUT);
    assert!(!out.status.success() && out.stderr.contains("missing.toml"), "{}", out.stderr);
}

/// Standalone servers each hold every table whole, so a worker given two of them is refused
/// before it sends anything, and told how to make a cluster instead.
#[test]
fn two_standalone_servers_are_not_taken_for_a_cluster() {
    let servers = [ServerProc::start(&["--shards", "1", "--no-pin"]), ServerProc::start(&["--shards", "1", "--no-pin"])];
    let both = format!("{},{}", servers[0].addr(), servers[1].addr());
    let out = run_tool(&["demo", "--connect", &both, "--features", "1000", "--examples", "1000"], TOOL_TIMEOUT);
    assert!(!out.status.success(), "the demo ran on two standalone servers:\n{}", out.stderr);
    assert!(out.stderr.contains("standalone servers, not a cluster") && out.stderr.contains("tessera coordinator"), "unclear message:\n{}", out.stderr);
    // Status asks each on its own, and shows both, each under its own address.
    let out = run_tool(&["status", "--connect", &format!("{both},{}", servers[1].addr()), "--json"], TOOL_TIMEOUT);
    assert!(out.status.success(), "status of two standalone servers failed:\n{}", out.stderr);
    let reports: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).expect("status --json prints JSON");
    let addrs: Vec<&str> = reports.iter().filter_map(|r| r["addr"].as_str()).collect();
    assert_eq!(addrs, [servers[0].addr(), servers[1].addr()], "each server once, under its own address");
    let out = run_tool(&["server", "--listen", "127.0.0.1:0", "--cluster", &both], TOOL_TIMEOUT);
    assert!(!out.status.success() && out.stderr.contains("--cluster"), "a server took a fixed --cluster list:\n{}", out.stderr);
}

#[test]
fn a_server_killed_mid_pipeline_fails_the_client_quickly() {
    /// Requests kept in flight by the client.
    const IN_FLIGHT: usize = 16;
    /// The client must report the loss well within its 30 s I/O timeout; the socket closes at once.
    const ERROR_WITHIN: Duration = Duration::from_secs(10);
    /// Bounds the pushing loop if the kill somehow never shows.
    const PUSHES_MAX: usize = 200_000;

    let mut server = ServerProc::start(&["--shards", "2"]);
    let addr = server.addr().to_string();
    let (started_tx, started_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let client = Client::connect(&[addr.as_str()], ClientConfig::worker(0)).expect("connect");
        let table = client.create_table(&TableSpec::new("pipeline", TableKind::Dense, 0, 10_000, 8)).expect("create");
        let grads = vec![0.5f32; 10_000 * 8];
        let mut tickets = std::collections::VecDeque::new();
        let mut acked = 0usize;
        let mut failure: Option<ClientError> = None;
        for i in 0..PUSHES_MAX {
            if i == IN_FLIGHT {
                let _ = started_tx.send(());
            }
            // Each push spans both shards, so its sub-requests are in flight on two links.
            match client.push_range(&table, 0, &grads) {
                Ok(t) => tickets.push_back(t),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            if tickets.len() >= IN_FLIGHT {
                match tickets.pop_front().expect("a ticket").wait() {
                    Ok(_) => acked += 1,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        let failed_at = Instant::now();
        // Whatever was still in flight must fail too, not hang.
        let pending: Vec<_> = tickets.into_iter().map(|t| t.wait().map(|_| ()).map_err(|e| e.to_string())).collect();
        let _ = done_tx.send((failure.map(|e| e.to_string()), failed_at, acked, pending, failed_at.elapsed()));
    });
    started_rx.recv_timeout(Duration::from_secs(30)).expect("the client started pushing");
    std::thread::sleep(Duration::from_millis(200));
    let killed_at = Instant::now();
    server.kill();
    let (failure, failed_at, acked, pending, drained_in) = done_rx
        .recv_timeout(ERROR_WITHIN + Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("the client neither failed nor finished within {ERROR_WITHIN:?} of kill -9"));
    let failure = failure.expect("the client saw no error although its server died");
    let noticed = failed_at.saturating_duration_since(killed_at);
    let drained = pending.len();
    eprintln!("{acked} pushes acknowledged; kill -9 noticed after {noticed:?}: {failure}; {drained} pending drained in {drained_in:?}");
    assert!(acked >= 1, "the pipeline never got going");
    assert!(noticed < ERROR_WITHIN, "the client took {noticed:?} to notice the dead server");
    assert!(["closed", "reset", "Broken pipe", "refused"].iter().any(|w| failure.contains(w)), "the error should say the connection is gone: {failure}");
    // Requests in flight may have been answered before the kill (their replies were already in
    // our socket buffer); the rest must fail as the connection's loss, and none may hang (the
    // timeout above).
    for e in pending.iter().filter_map(|r| r.as_ref().err()) {
        assert!(["closed", "reset", "Broken pipe"].iter().any(|w| e.contains(w)), "a request in flight failed oddly: {e}");
    }
    // A new client cannot connect, and says so at once.
    let started = Instant::now();
    match Client::connect(&[server.addr()], ClientConfig::worker(1)) {
        Err(e) => assert!(e.to_string().contains(server.addr()), "{e}"),
        Ok(_) => panic!("connected to a killed server"),
    }
    assert!(started.elapsed() < ERROR_WITHIN);
}

/// `tessera bench --replicas` puts a replicated cluster's pushes and pulls beside perftest's
/// figures as it does an unreplicated server's, and writes the rows of both and, over TCP, of
/// the push's raw hops; the SoftRoCE benchmark reads them (tests/softroce/rdma-bench.sh,
/// ratios.py).
#[test]
fn bench_of_a_replicated_cluster_compares_both_with_perftest() {
    let dir = ScratchDir::new("bench-perftest");
    let (perftest, report) = (dir.path().join("perftest.jsonl"), dir.path().join("report.json"));
    let lines = [
        r#"{"test":"ib_write_lat","size":4096,"typical_us":10.0}"#,
        r#"{"test":"ib_read_lat","size":4096,"typical_us":20.0}"#,
        "perftest's other output, which is not a JSON line",
    ];
    std::fs::write(&perftest, lines.join("\n")).expect("write the perftest lines");
    let args = [
        "bench",
        "--replicas",
        "2",
        "--servers",
        "2",
        "--ranges",
        "4",
        "--sizes",
        "4K",
        "--seconds",
        "0.1",
        "--iters-max",
        "20",
        "--perftest",
        perftest.to_str().expect("a UTF-8 path"),
        "--json-out",
        report.to_str().expect("a UTF-8 path"),
    ];
    let out = run_tool(&args, TOOL_TIMEOUT);
    assert!(out.status.success(), "bench --replicas failed:\n{}", out.stderr);
    assert!(out.stdout.contains("replicated push p50 / 2 vs ib_write_lat"), "{}", out.stdout);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("the report")).expect("a JSON report");
    let ops: Vec<&str> = report["results"].as_array().expect("results").iter().map(|r| r["op"].as_str().expect("an op")).collect();
    // Over TCP the push's raw hops are measured beside it, the same size in the same run.
    assert_eq!(ops, ["push", "replicated push", "raw hops unreplicated", "raw hops replicated", "raw hops replicated answered", "pull", "replicated pull"]);
    assert!(out.stdout.contains("through 3 hops over 2"), "{}", out.stdout);
    let compared: Vec<(&str, f64)> = report["perftest"]
        .as_array()
        .expect("perftest")
        .iter()
        .map(|p| (p["what"].as_str().expect("what"), p["perftest"].as_f64().expect("a figure")))
        .collect();
    let whats: Vec<&str> = compared.iter().map(|(w, _)| *w).collect();
    assert_eq!(
        whats,
        [
            "push p50 / 2 vs ib_write_lat typical (one way)",
            "pull p50 vs ib_read_lat typical",
            "replicated push p50 / 2 vs ib_write_lat typical (one way)",
            "replicated pull p50 vs ib_read_lat typical"
        ]
    );
    assert_eq!(compared.iter().map(|(_, f)| *f).collect::<Vec<_>>(), [10.0, 20.0, 10.0, 20.0]);
}

/// `tessera bench --replicas --ops` measures only what it names, the rest shown as "-".
#[test]
fn bench_of_a_replicated_cluster_measures_the_ops_named() {
    let dir = ScratchDir::new("bench-ops");
    let report = dir.path().join("report.json");
    let args = ["bench", "--replicas", "2", "--servers", "2", "--ranges", "4", "--sizes", "4K", "--ops", "pull", "--seconds", "0.1", "--iters-max", "20"];
    let out = run_tool(&[&args[..], &["--json-out", report.to_str().expect("a UTF-8 path")]].concat(), TOOL_TIMEOUT);
    assert!(out.status.success(), "bench --replicas --ops pull failed:\n{}", out.stderr);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("the report")).expect("a JSON report");
    let ops: Vec<&str> = report["results"].as_array().expect("results").iter().map(|r| r["op"].as_str().expect("an op")).collect();
    assert_eq!(ops, ["pull", "replicated pull"]);
    let row = out.stdout.lines().find(|l| l.trim_start().starts_with("4 KiB")).unwrap_or_else(|| panic!("no 4 KiB row:\n{}", out.stdout));
    assert_eq!(row.split_whitespace().filter(|c| *c == "-").count(), 5, "push, its ratio and the raw hops left out: {row}");
}

#[test]
fn bench_pushes_as_the_worker_its_flag_names() {
    let server = ServerProc::start(&["--shards", "1", "--workers-max", "2"]);
    let bench = |worker: &str| {
        let args = ["bench", "--connect", server.addr(), "--worker", worker, "--sizes", "8", "--ops", "push", "--seconds", "0.1", "--iters-max", "20"];
        run_tool(&args, TOOL_TIMEOUT)
    };
    let second = bench("1");
    assert!(second.status.success(), "worker 1 of 2 must be served:\n{}", second.stderr);
    // Worker 2 is over the table's limit: the refusal proves the id went on the wire.
    let over = bench("2");
    assert!(!over.status.success(), "worker 2 of 2 was served:\n{}", over.stdout);
    assert!(over.stderr.contains("--workers-max"), "{}", over.stderr);
}
