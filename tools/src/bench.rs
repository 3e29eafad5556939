//! `tessera bench`: push and pull latency and throughput, beside a raw-socket echo of the same
//! bytes measured in the same run. Absolute times on a shared machine are noise; the ratio to the
//! baseline is the figure to read.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use tessera_client::{Client, Table, Ticket};
use tessera_engine::{Server, UpdaterRegistry};
use tessera_layout::{TableKind, TableSpec};

use crate::common::{addresses, Cluster, EngineArgs, TransportArgs};

/// Largest message the bench table holds: 4 MiB of f32.
const BENCH_KEYS: u64 = 1 << 20;

/// Measure push and pull latency (p50/p99/p999) and throughput per message size.
///
/// Each size runs four operations: a dense push, a dense pull, a push then a pull (a round trip
/// of the size's bytes each way), and, as the baseline, a length-prefixed echo of the same bytes
/// over a plain TCP socket on the same loopback. The ratio `echo p50 / round trip p50` says how
/// close Tessera gets to the raw socket (1.0 = as fast). Before the first size, a ping (a
/// request and an empty reply, no table touched) measures the transport's round trip alone.
/// Sizes of 64 KiB and more also measure pipelined pushes (--window in flight). --ops picks
/// which of these run.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A running server to measure; default: one started in this process.
    #[arg(long)]
    connect: Option<String>,
    /// The worker id this bench pushes as. Give each bench process against one cluster its own
    /// (below the servers' --workers-max), so their pushes count as different workers'.
    #[arg(long, default_value_t = 0)]
    worker: u32,
    /// Message sizes in bytes; K and M suffixes allowed.
    #[arg(long, value_delimiter = ',', default_value = "8,64,512,4K,32K,256K,1M,4M")]
    sizes: Vec<String>,
    /// Operations to measure: ping (before the first size), push, pull, roundtrip (a push then a
    /// pull), pipelined (pushes kept in flight, at 64 KiB and more) and
    /// echo (the raw-socket baseline; the echo ratio needs roundtrip and echo). With --replicas:
    /// push, pull and pipelined (pulls too are kept in flight when pull is also given).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ping,push,pull,roundtrip,pipelined,echo")]
    ops: Vec<BenchOp>,
    /// Time spent measuring each size and operation.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Most iterations for each size and operation.
    #[arg(long, default_value_t = 20_000)]
    iters_max: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the report as JSON to this file (the table still goes to stdout).
    #[arg(long, value_name = "FILE")]
    json_out: Option<std::path::PathBuf>,
    /// perftest results (JSON lines from tests/softroce/perftest.sh) measured on the same device
    /// in the same run: print Tessera's ratio to them.
    #[arg(long)]
    perftest: Option<std::path::PathBuf>,
    /// Pushes kept in flight when measuring pipelined push throughput (a replicated client
    /// keeps at most its PUSH_WINDOW of 32).
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// The bench table's updater, e.g. `sum`, `assign`, `sgd{lr=0.1}`, `adam{lr=0.001}`: what
    /// each push costs the shard beyond the transport.
    #[arg(long, default_value = "sum")]
    updater: String,
    /// Push every time at clock 0, as runs before 2026-11-23 did. By default each push goes at
    /// the next clock, as a training worker's push of each iteration does: it raises the
    /// worker's vector-clock entry over the range and its acknowledgement carries the stamp.
    #[arg(long)]
    fixed_clock: bool,
    /// Measure a replicated cluster instead, started in this process beside an unreplicated
    /// server: --servers servers, every range on a chain of this many. Size by size, in the
    /// same run, prints each one's push p50 (a push acknowledged once every range's tail holds
    /// it), its dense pull p50 (each range read from its tail: one-sidedly over RDMA) and, at 64
    /// KiB and more, its push bandwidth with pushes in flight, and the ratios. Over TCP, beside
    /// the push ratio, the same ratio of a push's raw hops: a ring of plain threads passing the
    /// push's bytes over loopback TCP through R + 1 hops (worker, each chain member, back to the
    /// worker) against 2 (worker, server, worker), and the same ring with each thread also
    /// answering its sender, as a chain's servers do. With --perftest, both are put beside
    /// perftest's figures; --json-out writes the rows of all.
    #[arg(long, value_name = "R", conflicts_with_all = ["connect", "disk"])]
    replicas: Option<u32>,
    /// Servers of the --replicas cluster.
    #[arg(long, default_value_t = 3)]
    servers: u32,
    /// Ranges the --replicas cluster cuts the key space into; each has its own chain (default:
    /// two per shard of the cluster).
    #[arg(long)]
    ranges: Option<u32>,
    /// Measure durability on the disk holding DIR instead: WAL group commit (acknowledged
    /// pushes per second and fsyncs per push) against a pwrite+fdatasync loop, and checkpoint
    /// throughput against fio, both in DIR. Uses --seconds per worker count.
    #[arg(long, value_name = "DIR")]
    disk: Option<std::path::PathBuf>,
    /// Concurrent workers for the group-commit runs of --disk.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    disk_workers: Vec<usize>,
    /// MiB of table state the --disk checkpoint run writes; 0 skips it.
    #[arg(long, default_value_t = 1024)]
    checkpoint_mib: u64,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    net: TransportArgs,
}

/// What `tessera bench` can measure at each size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchOp {
    Ping,
    Push,
    Pull,
    Roundtrip,
    Pipelined,
    Echo,
}

#[derive(Debug, Serialize)]
struct Row {
    size_bytes: usize,
    op: &'static str,
    iters: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    gb_per_s: f64,
}

impl Row {
    /// One operation's figures at one size, from its latencies and how many calls took how
    /// long, each moving `bytes_per_call`.
    fn measured(size_bytes: usize, op: &'static str, hist: &Histogram<u64>, iters: u64, elapsed: Duration, bytes_per_call: usize) -> Row {
        let us = |q| hist.value_at_quantile(q) as f64 / 1e3;
        Row {
            size_bytes,
            op,
            iters,
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            gb_per_s: (bytes_per_call as f64 * iters as f64) / elapsed.as_secs_f64() / 1e9,
        }
    }
}

#[derive(Debug, Serialize)]
struct Ratio {
    size_bytes: usize,
    /// Raw echo p50 over Tessera push+pull p50: 1.0 means as fast as the raw socket.
    echo_over_roundtrip_p50: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    transport: String,
    results: Vec<Row>,
    ratios: Vec<Ratio>,
    perftest: Vec<PerftestRatio>,
}

/// Tessera against perftest on the same device, same size.
#[derive(Debug, Serialize)]
struct PerftestRatio {
    size_bytes: usize,
    /// What is compared, e.g. "push p50 / 2 vs ib_write_lat typical".
    what: &'static str,
    tessera: f64,
    perftest: f64,
    /// tessera / perftest: for latency lower is better (target <= 1.5), for bandwidth higher
    /// (target >= 0.8).
    ratio: f64,
}

fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    let n: usize = digits.parse().with_context(|| format!("bad size {s:?}: use bytes, e.g. 512, 4K, 1M"))?;
    let bytes = n * mult;
    if bytes < 4 || bytes > (BENCH_KEYS as usize) * 4 {
        bail!("size {s} is outside 4 B ..= 4 MiB");
    }
    Ok(bytes)
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(dir) = &args.disk {
        let bench = crate::diskbench::DiskBench {
            dir,
            workers: &args.disk_workers,
            seconds: args.seconds,
            checkpoint_mib: args.checkpoint_mib,
            json: args.json,
            engine: &args.engine,
            net: &args.net,
        };
        return bench.run();
    }
    let sizes: Vec<usize> = args.sizes.iter().map(|s| parse_size(s)).collect::<Result<_>>()?;
    if let Some(replicas) = args.replicas {
        return replicated(&args, replicas, &sizes);
    }
    let _embedded;
    let addrs = match &args.connect {
        Some(list) => addresses(list),
        None => {
            let cfg = args.engine.server_config("127.0.0.1:0", Vec::new(), false, &args.net);
            let (pinned, shards) = (cfg.engine.pin_cores, cfg.engine.shards as usize);
            let server = Server::start(cfg, UpdaterRegistry::new())?;
            if pinned {
                // Shards and the bench's worker each spin on a core of their own, as perftest's
                // pinned server and client do.
                match tessera_engine::pin_beside_shards(shards) {
                    Some(core) => tracing::info!(core, "bench worker pinned beside the shards"),
                    None => tracing::warn!(shards, "no core left beside the shards; the bench worker is not pinned"),
                }
            }
            let addr = server.local_addr().to_string();
            _embedded = server;
            vec![addr]
        }
    };
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let client = Client::connect(&refs, args.net.client(args.worker))?;
    let mut spec = TableSpec::new("tessera.bench", TableKind::Dense, 0, BENCH_KEYS, 1);
    spec.updater.clone_from(&args.updater);
    let table = client.create_table(&spec)?;
    let mut stream = start_echo()?;
    let transport = client.transport().to_string();
    let mut report = Report { transport, results: Vec::new(), ratios: Vec::new(), perftest: Vec::new() };
    let budget = Duration::from_secs_f64(args.seconds);
    let wants = |op| args.ops.contains(&op);
    // Each push's clock: the next one, as a worker's next iteration (or always 0).
    let clock = std::cell::Cell::new(client.clock());
    let tick = || {
        if !args.fixed_clock {
            clock.set(clock.get() + 1);
            client.set_clock(clock.get());
        }
    };
    let mut first = true;
    for size in sizes {
        let n = size / 4;
        let grads = vec![1.0f32; n];
        let mut out = vec![0.0f32; n];
        let mut bytes = vec![7u8; 8 + size];
        bytes[..8].copy_from_slice(&(size as u64).to_le_bytes());
        let mut row = |op, per_iter: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            let (hist, iters, elapsed) = measure(budget, args.iters_max, f)?;
            let row = Row::measured(size, op, &hist, iters, elapsed, per_iter);
            let p50 = row.p50_us;
            report.results.push(row);
            Ok(p50)
        };
        if first && wants(BenchOp::Ping) {
            // The transport's round trip alone, no table touched: what a push costs beyond it is
            // the engine's work and the bytes.
            row("ping", 0, &mut || ping(&client))?;
        }
        first = false;
        if wants(BenchOp::Push) {
            row("push", size, &mut || {
                tick();
                push(&client, &table, &grads)
            })?;
        }
        if wants(BenchOp::Pull) {
            row("pull", size, &mut || pull(&client, &table, &mut out))?;
        }
        let mut rt = None;
        if wants(BenchOp::Roundtrip) {
            let f = &mut || {
                tick();
                push(&client, &table, &grads).and_then(|_| pull(&client, &table, &mut out))
            };
            rt = Some(row("push+pull", 2 * size, f)?);
        }
        if size >= 64 << 10 && wants(BenchOp::Pipelined) {
            let window = args.window.max(1);
            let mut flight = VecDeque::with_capacity(window);
            row("push pipelined", size, &mut || {
                keep_in_flight(&mut flight, window, || {
                    tick();
                    client.push_range(&table, 0, &grads)
                })
            })?;
            settle(&mut flight)?;
        }
        if wants(BenchOp::Echo) {
            let echo_p50 = row("raw echo", 2 * size, &mut || echo_once(&mut stream, &mut bytes))?;
            if let Some(rt) = rt {
                report.ratios.push(Ratio { size_bytes: size, echo_over_roundtrip_p50: echo_p50 / rt });
            }
        }
    }
    if let Some(path) = &args.perftest {
        report.perftest = compare_perftest(&report.results, path)?;
    }
    write_json_out(&args, &report)?;
    print_report(&report, args.json)
}

/// Writes `report` to `--json-out`'s file, if given.
fn write_json_out(args: &BenchArgs, report: &impl Serialize) -> Result<()> {
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `tessera bench --replicas R`: an unreplicated server and a replicated cluster, both in this
/// process, measured size by size in turn.
fn replicated(args: &BenchArgs, replicas: u32, sizes: &[usize]) -> Result<()> {
    let mut spec = TableSpec::new("tessera.bench", TableKind::Dense, 0, BENCH_KEYS, 1);
    spec.updater.clone_from(&args.updater);
    let mut plain_cfg = args.engine.server_config("127.0.0.1:0", vec![spec.clone()], false, &args.net);
    // With --data-dir, the unreplicated server and each of the cluster's keep their own disk.
    plain_cfg.engine.data_dir = args.engine.data_dir.as_ref().map(|dir| dir.join("unreplicated"));
    let plain_server = Server::start(plain_cfg, UpdaterRegistry::new())?;
    let plain = Client::connect(&[&plain_server.local_addr().to_string()], args.net.client(args.worker))?;
    let plain_table = plain.table(&spec.name)?;
    let cluster = Cluster { servers: args.servers, replicas, ranges: args.ranges, workers: args.worker + 1 };
    let (_coordinator, servers) = cluster.start(&args.engine, &args.net, &spec)?;
    let addrs: Vec<String> = servers.iter().map(|s| s.local_addr().to_string()).collect();
    let chain = Client::connect(&addrs.iter().map(String::as_str).collect::<Vec<_>>(), args.net.client(args.worker))?;
    let chain_table = chain.table(&spec.name)?;
    println!(
        "{} server{}, every range on a chain of {}, {} ranges, beside one unreplicated server; {} s per size and operation ({})",
        args.servers,
        if args.servers == 1 { "" } else { "s" },
        replicas.min(args.servers),
        cluster.ranges(&args.engine),
        args.seconds,
        plain.transport()
    );
    println!(
        "{:>8}  {:>14} {:>14} {:>6} {:>6} {:>9}   {:>14} {:>14} {:>6}   {:>16} {:>16} {:>6}   {:>16} {:>16} {:>6}",
        "size",
        "push p50 µs",
        "replicated",
        "ratio",
        "hops",
        "answered",
        "pull p50 µs",
        "replicated",
        "ratio",
        "in flight GB/s",
        "replicated",
        "ratio",
        "pulls GB/s",
        "replicated",
        "ratio"
    );
    let budget = Duration::from_secs_f64(args.seconds);
    let mut report = Report { transport: plain.transport().to_string(), results: Vec::new(), ratios: Vec::new(), perftest: Vec::new() };
    // --ops picks among push (with the raw hops beside it), pull and pipelined (pushes, and with
    // pull also pulls, kept in flight); what is left out shows as "-".
    let wants = |op| args.ops.contains(&op);
    // The raw hops are a TCP baseline: over RDMA, perftest's figures are.
    let hops = plain.transport() == "tcp" && wants(BenchOp::Push);
    let chained = replicas.min(args.servers).max(1) as usize;
    let mut rings = match hops {
        true => Some((HopRing::start(1, false)?, HopRing::start(chained, false)?, HopRing::start(chained, true)?)),
        false => None,
    };
    let mut clock = 0;
    for &size in sizes {
        let grads = vec![1.0f32; size / 4];
        let mut line = format!("{:>8}", human(size));
        if wants(BenchOp::Push) {
            let mut pushes = |client: &Client, table: &Table, op| -> Result<Row> {
                let (hist, iters, took) = measure(budget, args.iters_max, &mut || {
                    clock += 1;
                    client.set_clock(clock);
                    push(client, table, &grads)
                })?;
                Ok(Row::measured(size, op, &hist, iters, took, size))
            };
            let (p, c) = (pushes(&plain, &plain_table, "push")?, pushes(&chain, &chain_table, "replicated push")?);
            line += &format!("  {:>14.1} {:>14.1} {:>5.2}x", p.p50_us, c.p50_us, c.p50_us / p.p50_us);
            report.results.extend([p, c]);
            match &mut rings {
                Some((two, chain_hops, answered)) => {
                    let lap = |ring: &mut HopRing, op| -> Result<Row> {
                        let (hist, iters, took) = measure(budget, args.iters_max, &mut || ring.lap(size))?;
                        Ok(Row::measured(size, op, &hist, iters, took, size))
                    };
                    let (r2, rc, ra) =
                        (lap(two, "raw hops unreplicated")?, lap(chain_hops, "raw hops replicated")?, lap(answered, "raw hops replicated answered")?);
                    line += &format!(" {:>5.2}x {:>8.2}x", rc.p50_us / r2.p50_us, ra.p50_us / r2.p50_us);
                    report.results.extend([r2, rc, ra]);
                }
                None => line += &format!(" {:>6} {:>9}", "-", "-"),
            }
        } else {
            line += &format!("  {:>14} {:>14} {:>6} {:>6} {:>9}", "-", "-", "-", "-", "-");
        }
        if wants(BenchOp::Pull) {
            // Pulls read each range's tail (one-sidedly over RDMA, on both).
            let mut out = vec![0f32; size / 4];
            let mut pulls = |client: &Client, table: &Table, op| -> Result<Row> {
                let (hist, iters, took) = measure(budget, args.iters_max, &mut || pull(client, table, &mut out))?;
                Ok(Row::measured(size, op, &hist, iters, took, size))
            };
            let (pp, cp) = (pulls(&plain, &plain_table, "pull")?, pulls(&chain, &chain_table, "replicated pull")?);
            line += &format!("   {:>14.1} {:>14.1} {:>5.2}x", pp.p50_us, cp.p50_us, cp.p50_us / pp.p50_us);
            report.results.extend([pp, cp]);
        } else {
            line += &format!("   {:>14} {:>14} {:>6}", "-", "-", "-");
        }
        if size >= 64 << 10 && wants(BenchOp::Pipelined) {
            // Both streams keep --window tickets; a replicated client sends a push once at
            // most PUSH_WINDOW - 1 of its own are unacknowledged.
            let window = args.window.max(1);
            let stream = |client: &Client, table: &Table, clock: &mut u64, op| -> Result<Row> {
                let mut flight = VecDeque::with_capacity(window);
                let (hist, iters, took) = measure(budget, args.iters_max, &mut || {
                    keep_in_flight(&mut flight, window, || {
                        *clock += 1;
                        client.set_clock(*clock);
                        client.push_range(table, 0, &grads)
                    })
                })?;
                settle(&mut flight)?;
                Ok(Row::measured(size, op, &hist, iters, took, size))
            };
            let plain_bw = stream(&plain, &plain_table, &mut clock, "push pipelined")?;
            let chain_bw = stream(&chain, &chain_table, &mut clock, "replicated push pipelined")?;
            line += &format!("   {:>16.3} {:>16.3} {:>5.2}x", plain_bw.gb_per_s, chain_bw.gb_per_s, chain_bw.gb_per_s / plain_bw.gb_per_s);
            report.results.extend([plain_bw, chain_bw]);
            if wants(BenchOp::Pull) {
                // Pulls kept in flight the same way, each into a buffer of its own.
                let pulls = |client: &Client, table: &Table, op| -> Result<Row> {
                    let mut stream = PullStream::new(window, size / 4);
                    let (hist, iters, took) = measure(budget, args.iters_max, &mut || stream.step(client, table))?;
                    stream.settle(client)?;
                    Ok(Row::measured(size, op, &hist, iters, took, size))
                };
                let (plain_pulls, chain_pulls) = (pulls(&plain, &plain_table, "pull pipelined")?, pulls(&chain, &chain_table, "replicated pull pipelined")?);
                line += &format!("   {:>16.3} {:>16.3} {:>5.2}x", plain_pulls.gb_per_s, chain_pulls.gb_per_s, chain_pulls.gb_per_s / plain_pulls.gb_per_s);
                report.results.extend([plain_pulls, chain_pulls]);
            }
        }
        println!("{line}");
    }
    println!(
        "(ratios are replicated over unreplicated; each stream keeps {} tickets; a replicated client has at most {} pushes in flight)",
        args.window.max(1),
        tessera_client::PUSH_WINDOW
    );
    if hops {
        println!(
            "(hops: p50 of a ring of plain threads passing the push's bytes over loopback TCP through {} hops over 2, this host's floor for the push ratio; answered: each thread also answering its sender)",
            chained + 1
        );
    }
    // Resends cost bandwidth and say a timer fired early: a figure taken with them says so.
    let stats = chain.chain_stats();
    if stats.resends + stats.rerouted + stats.pull_retries > 0 {
        println!(
            "(the replicated client resent pushes {} times on its timer and {} times on a new configuration, and retried {} pull pieces)",
            stats.resends, stats.rerouted, stats.pull_retries
        );
    }
    if let Some(path) = &args.perftest {
        report.perftest = compare_perftest(&report.results, path)?;
        print_perftest(&report.perftest);
    }
    write_json_out(args, &report)?;
    Ok(())
}

/// One step of a stream of pushes with `window` in flight, as a training worker streams
/// gradients and as `ib_write_bw` keeps its send queue full: once `window` are in flight, waits
/// for the oldest, then sends one more (`send`). Measured call by call, after a warm-up that
/// fills the window, each call is one push of the steady stream.
fn keep_in_flight<'a>(flight: &mut VecDeque<Ticket<'a>>, window: usize, send: impl FnOnce() -> tessera_client::Result<Ticket<'a>>) -> Result<()> {
    if flight.len() >= window {
        if let Some(oldest) = flight.pop_front() {
            oldest.wait()?;
        }
    }
    flight.push_back(send()?);
    Ok(())
}

/// A stream of dense pulls from key 0, each of a buffer's length, kept as many in flight as
/// there are buffers. Tickets are detached, so a buffer is lent only while its ticket is
/// waited on.
struct PullStream {
    outs: Vec<Vec<f32>>,
    flight: VecDeque<(usize, tessera_client::Detached)>,
}

impl PullStream {
    fn new(window: usize, values: usize) -> Self {
        PullStream { outs: vec![vec![0f32; values]; window], flight: VecDeque::with_capacity(window) }
    }

    /// Waits for the oldest pull once the window is full, then sends the next into its buffer.
    fn step(&mut self, client: &Client, table: &Table) -> Result<()> {
        let mut next = self.flight.len();
        if self.flight.len() >= self.outs.len() {
            if let Some((at, oldest)) = self.flight.pop_front() {
                client.resume(oldest, Some(&mut self.outs[at])).wait()?;
                next = at;
            }
        }
        let ticket = client.pull_range(table, 0, &mut self.outs[next])?.detach();
        self.flight.push_back((next, ticket));
        Ok(())
    }

    /// Waits for the pulls left in flight.
    fn settle(&mut self, client: &Client) -> Result<()> {
        while let Some((at, ticket)) = self.flight.pop_front() {
            client.resume(ticket, Some(&mut self.outs[at])).wait()?;
        }
        Ok(())
    }
}

/// Waits for the pushes a stream left in flight.
fn settle(flight: &mut VecDeque<Ticket<'_>>) -> Result<()> {
    flight.drain(..).try_for_each(|t| t.wait().map(drop))?;
    Ok(())
}

#[derive(Debug, serde::Deserialize)]
struct PerftestLine {
    test: String,
    size: usize,
    typical_us: Option<f64>,
    /// perftest's "MB/s", which is MiB/s.
    #[serde(rename = "bw_avg_MBps")]
    bw_avg_mib_per_s: Option<f64>,
}

/// Reads perftest's JSON lines and puts Tessera's figures beside them.
fn compare_perftest(rows: &[Row], path: &std::path::Path) -> Result<Vec<PerftestRatio>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<PerftestLine> = text.lines().filter(|l| l.trim_start().starts_with('{')).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let find = |test: &str, size: usize| lines.iter().find(|l| l.test == test && l.size == size);
    let ours = |op: &str, size: usize| rows.iter().find(|r| r.op == op && r.size_bytes == size);
    let mut out = Vec::new();
    if let (Some(ping), Some(lat)) = (rows.iter().find(|r| r.op == "ping"), find("ib_write_lat", 8).and_then(|p| p.typical_us)) {
        // A ping is a request and its reply with no table touched: the transport's share of a
        // small push.
        let one_way = ping.p50_us / 2.0;
        out.push(PerftestRatio {
            size_bytes: 8,
            what: "ping p50 / 2 vs ib_write_lat typical (one way)",
            tessera: one_way,
            perftest: lat,
            ratio: one_way / lat,
        });
    }
    let mut sizes: Vec<usize> = rows.iter().map(|r| r.size_bytes).collect();
    sizes.dedup();
    for size in sizes {
        for &(op, test, what, figure) in AGAINST_PERFTEST {
            let Some(row) = ours(op, size) else { continue };
            let (tessera, theirs) = match figure {
                // ib_write_lat reports half a ping-pong; a push is a request and its reply.
                Figure::HalfRoundTrip => (row.p50_us / 2.0, find(test, size).and_then(|p| p.typical_us)),
                Figure::Latency => (row.p50_us, find(test, size).and_then(|p| p.typical_us)),
                Figure::Bandwidth => (row.gb_per_s * 1e9 / (1 << 20) as f64, find(test, size).and_then(|p| p.bw_avg_mib_per_s)),
            };
            if let Some(perftest) = theirs {
                out.push(PerftestRatio { size_bytes: size, what, tessera, perftest, ratio: tessera / perftest });
            }
        }
    }
    Ok(out)
}

/// Which of a row's figures is compared with perftest's.
#[derive(Debug, Clone, Copy)]
enum Figure {
    /// Half the p50: a push is a request and its reply, a whole ping-pong.
    HalfRoundTrip,
    Latency,
    /// MiB/s, as perftest reports.
    Bandwidth,
}

/// Each measured operation beside the perftest test it is compared with: (operation, test,
/// what the comparison says, the figure compared). A replicated cluster's push is compared with
/// the same baseline as an unreplicated one's, in the same run.
const AGAINST_PERFTEST: &[(&str, &str, &str, Figure)] = &[
    ("push", "ib_write_lat", "push p50 / 2 vs ib_write_lat typical (one way)", Figure::HalfRoundTrip),
    ("pull", "ib_read_lat", "pull p50 vs ib_read_lat typical", Figure::Latency),
    ("push pipelined", "ib_write_bw", "pipelined push MiB/s vs ib_write_bw average", Figure::Bandwidth),
    ("replicated push", "ib_write_lat", "replicated push p50 / 2 vs ib_write_lat typical (one way)", Figure::HalfRoundTrip),
    ("replicated pull", "ib_read_lat", "replicated pull p50 vs ib_read_lat typical", Figure::Latency),
    ("replicated push pipelined", "ib_write_bw", "replicated pipelined push MiB/s vs ib_write_bw average", Figure::Bandwidth),
];

// The operations measured, each a function of its own: tests/softroce/callgrind.sh counts the
// instructions inside them by name, so they must not be inlined into the loop that times them.
#[inline(never)]
fn ping(client: &Client) -> Result<()> {
    Ok(client.ping()?)
}

#[inline(never)]
fn push(client: &Client, table: &Table, grads: &[f32]) -> Result<()> {
    client.push_range(table, 0, grads)?.wait()?;
    Ok(())
}

#[inline(never)]
fn pull(client: &Client, table: &Table, out: &mut [f32]) -> Result<()> {
    client.pull_range(table, 0, out)?.wait()?;
    Ok(())
}

/// Runs `f` for a short warm-up, then until `budget` or `iters_max`, recording each latency.
fn measure(budget: Duration, iters_max: u64, f: &mut dyn FnMut() -> Result<()>) -> Result<(Histogram<u64>, u64, Duration)> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let warmup = Instant::now();
    while warmup.elapsed() < budget / 10 {
        f()?;
    }
    let start = Instant::now();
    let mut iters = 0;
    while iters < iters_max && (iters < 5 || start.elapsed() < budget) {
        let t = Instant::now();
        f()?;
        hist.record(t.elapsed().as_nanos().max(1) as u64)?;
        iters += 1;
    }
    Ok((hist, iters, start.elapsed()))
}

fn print_report(report: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!("{:>9} {:>10} {:>8} {:>10} {:>10} {:>10} {:>8}", "size", "op", "iters", "p50 us", "p99 us", "p999 us", "GB/s");
    for r in &report.results {
        println!("{:>9} {:>10} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>8.3}", human(r.size_bytes), r.op, r.iters, r.p50_us, r.p99_us, r.p999_us, r.gb_per_s);
    }
    println!("\ntransport: {}", report.transport);
    if !report.ratios.is_empty() {
        println!("ratio raw-echo p50 / tessera push+pull p50 (1.0 = as fast as a raw socket):");
        for r in &report.ratios {
            println!("{:>9}  {:.2}", human(r.size_bytes), r.echo_over_roundtrip_p50);
        }
    }
    print_perftest(&report.perftest);
    Ok(())
}

fn print_perftest(ratios: &[PerftestRatio]) {
    if ratios.is_empty() {
        return;
    }
    println!("\nagainst perftest on the same device, same run (latency: lower is better, target <= 1.5; bandwidth: higher, target >= 0.8; a replicated cluster's figures have no target here):");
    for p in ratios {
        println!("{:>9}  {:<58} {:>10.1} vs {:>10.1}  ratio {:.2}", human(p.size_bytes), p.what, p.tessera, p.perftest, p.ratio);
    }
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// The baseline: a thread on the far end of a loopback connection that reads each
/// length-prefixed message and writes its payload back. Returns the near end.
fn start_echo() -> Result<TcpStream> {
    let (near, mut far) = tcp_pair().context("connecting to the echo baseline")?;
    std::thread::Builder::new().name("bench-echo".into()).spawn(move || {
        let mut buf = Vec::new();
        while echo_serve_one(&mut far, &mut buf).is_ok() {}
    })?;
    Ok(near)
}

fn echo_serve_one(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    read_framed(s, buf)?;
    s.write_all(&buf[8..])
}

/// A push's hops without the system: a ring of plain threads over loopback TCP. The bench
/// writes a message (an 8-byte length and the payload, in one write) to the first thread; each
/// thread reads it whole and writes it on to the next, and the last answers the bench with an
/// empty message, as a tail acknowledges a push. With `answering`, each thread also writes an
/// empty message back to a reader thread of its own once it has passed the message on, as a
/// server answers whoever sent it the frame. So a ring of one thread is an unreplicated push's
/// two hops, and one of R threads a chain of R's R + 1.
struct HopRing {
    first: TcpStream,
    back: TcpStream,
    framed: Vec<u8>,
}

impl HopRing {
    fn start(threads: usize, answering: bool) -> Result<Self> {
        let (first, mut inbound) = tcp_pair()?;
        for i in 0..threads {
            let (outbound, next_inbound) = tcp_pair()?;
            let answer = match answering {
                true => {
                    let (answer, mut sink) = tcp_pair()?;
                    let mut buf = Vec::new();
                    std::thread::Builder::new().name(format!("bench-hop-sink-{i}")).spawn(move || while read_framed(&mut sink, &mut buf).is_ok() {})?;
                    Some(answer)
                }
                false => None,
            };
            let last = i + 1 == threads;
            let (mut from, mut to, mut answer) = (inbound, outbound, answer);
            std::thread::Builder::new().name(format!("bench-hop-{i}")).spawn(move || {
                let mut framed = Vec::new();
                let empty = 0u64.to_le_bytes();
                // Ends when the bench drops its end: each thread's read fails in turn.
                while read_framed(&mut from, &mut framed).is_ok() {
                    let passed = if last { to.write_all(&empty) } else { to.write_all(&framed) };
                    let answered = answer.as_mut().map_or(Ok(()), |a| a.write_all(&empty));
                    if passed.and(answered).is_err() {
                        break;
                    }
                }
            })?;
            inbound = next_inbound;
        }
        Ok(Self { first, back: inbound, framed: Vec::new() })
    }

    /// One lap with a payload of `size` bytes.
    fn lap(&mut self, size: usize) -> Result<()> {
        self.framed.resize(8 + size, 7);
        self.framed[..8].copy_from_slice(&(size as u64).to_le_bytes());
        self.first.write_all(&self.framed)?;
        let mut empty = [0u8; 8];
        self.back.read_exact(&mut empty)?;
        Ok(())
    }
}

/// Two ends of a loopback TCP connection, without Nagle's delay.
fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the hop ring's listener")?;
    let near = TcpStream::connect(listener.local_addr()?)?;
    let (far, _) = listener.accept()?;
    near.set_nodelay(true)?;
    far.set_nodelay(true)?;
    Ok((near, far))
}

/// Reads one message (an 8-byte length and the payload) whole into `framed`, length included.
fn read_framed(s: &mut TcpStream, framed: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    framed.clear();
    framed.extend_from_slice(&len);
    framed.resize(8 + u64::from_le_bytes(len) as usize, 0);
    s.read_exact(&mut framed[8..])
}

/// One echo: `framed` is the 8-byte length and the payload, sent in one write like a Tessera frame.
fn echo_once(s: &mut TcpStream, framed: &mut [u8]) -> Result<()> {
    s.write_all(framed)?;
    s.read_exact(&mut framed[8..])?;
    Ok(())
}
