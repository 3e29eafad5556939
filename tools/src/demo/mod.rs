//! `tessera demo`: sparse logistic regression trained by asynchronous SGD through Tessera.
//!
//! Workers share nothing but the server: each walks its slice of the training set in minibatches,
//! pulls the weights of the batch's keys, computes the logistic-loss gradient, and pushes it; the
//! server applies Adagrad. A worker keeps up to [`PUSHES_IN_FLIGHT`] pushes in flight while it pulls
//! and computes the next batches, and never waits for the others: that is asynchronous SGD.
//!
//! With `--servers N` (N >= 2), the demo runs a replicated cluster in the process instead: the
//! embedded coordinator and N servers, every range on a chain of `--replicas` of them, and the
//! workers push through each range's head (acknowledged once its tail holds the push) with the
//! same [`Client`] and every client flag.

pub mod data;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tessera_client::filter::{Kkt, RandomSkip, SignificantlyModified};
use tessera_client::{Client, ClientConfig, Consistency, Filter, Table, Ticket, KEY_CACHE_KEYS_DEFAULT};
use tessera_engine::{Server, UpdaterRegistry};
use tessera_layout::{TableKind, TableSpec};
use tessera_replication::ReplicationConfig;

use crate::common::{addresses, Cluster, EngineArgs, TransportArgs};
use crate::metrics::MetricsArgs;
use data::{DataConfig, Dataset};

/// Keys pulled per request when evaluating.
const EVAL_CHUNK_KEYS: usize = 1 << 18;
/// Pushes a worker keeps in flight: it waits for the oldest before it sends one more. Under the
/// default eventual consistency nothing else waits for a push, so a push's acknowledgement
/// (which on a chain of three comes after two more hops) overlaps the next batches' pulls and
/// computation instead of holding up the next push. The client bounds it too (32 on a
/// replicated cluster).
const PUSHES_IN_FLIGHT: usize = 8;

/// Train sparse logistic regression by asynchronous SGD through a parameter server.
///
/// By default everything runs in this process: a server with one shard per core, and worker
/// threads that connect to it over loopback TCP exactly as remote workers would. With
/// `--connect`, the workers train against running servers (`tessera server`) instead: a cluster
/// through any of its servers, or one standalone server.
///
/// The data set is generated, seeded, from a known "true" model; after each epoch the demo prints
/// the held-out log-loss and accuracy beside the true model's accuracy on the same examples.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Distinct hashed features.
    #[arg(long, default_value_t = 1_000_000)]
    features: u64,
    /// Examples (train and held-out together; 10% are held out).
    #[arg(long, default_value_t = 200_000)]
    examples: usize,
    /// Active features per example.
    #[arg(long, default_value_t = 30)]
    active: usize,
    /// Passes over the training set.
    #[arg(long, default_value_t = data::DEFAULT_EPOCHS)]
    epochs: usize,
    /// Examples per minibatch (one pull and one push each).
    #[arg(long, default_value_t = data::DEFAULT_BATCH)]
    batch: usize,
    /// Server-side Adagrad learning rate.
    #[arg(long, default_value_t = data::DEFAULT_LR)]
    lr: f32,
    /// Seed of the data set.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train against running servers: any servers of a cluster (comma-separated), or one
    /// standalone server.
    #[arg(long)]
    connect: Option<String>,
    /// Run a replicated cluster of this many servers in the process (with the embedded
    /// coordinator) instead of one unreplicated server.
    #[arg(long, default_value_t = 1, conflicts_with = "connect")]
    servers: u32,
    /// Servers in each range's chain (default 2, at most --servers). Given with --servers 1,
    /// the one server runs every range as a chain of one.
    #[arg(long, conflicts_with = "connect")]
    replicas: Option<u32>,
    /// Ranges the key space is cut into, with --servers; each has its own chain (default: two
    /// per shard of the cluster: a batch sends a piece to every range its keys fall in, and each
    /// piece costs its own header and replica step).
    #[arg(long)]
    ranges: Option<u32>,
    /// Compress values on the wire (Snappy) when that pays (a body that shrinks by less than a
    /// tenth goes as it is).
    #[arg(long)]
    compress: bool,
    /// Send repeated key lists by their hash (key-list caching): a batch's push names the key
    /// list its pull sent, and a batch seen in an earlier epoch may too.
    #[arg(long)]
    key_cache: bool,
    /// Push filter: none; significant:T (hold a key back until its accumulated change exceeds T;
    /// what is held is sent at each epoch's end); skip:P (drop each key with probability P,
    /// scale the rest by 1/(1-P)); kkt:L (drop keys whose weight is zero and whose gradient is
    /// within L; meant for an L1-regularised updater such as ftrl{l1=L}).
    #[arg(long, default_value = "none")]
    filter: FilterSpec,
    /// The server-side updater of the demo's table; default adagrad with --lr.
    #[arg(long)]
    updater: Option<String>,
    /// Consistency of the workers' pulls: eventual, sequential, or bounded:N (a worker at batch t
    /// waits until every worker's pushes up to batch t-N-1 are in the weights it pulls).
    #[arg(long, default_value = "eventual")]
    consistency: Consistency,
    /// Train once per wire-saving feature (none, key caching, compression, each filter, all
    /// together) and print the bytes each put on the wire beside the accuracy it reached.
    #[arg(long, conflicts_with_all = ["connect", "json"])]
    wire_table: bool,
    /// Print a JSON summary on stdout (progress and per-epoch lines go to stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    net: TransportArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

#[derive(Debug, Serialize)]
struct Epoch {
    epoch: usize,
    train_loss: f64,
    heldout_logloss: f64,
    accuracy: f64,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct Summary {
    accuracy: f64,
    true_model_accuracy: f64,
    heldout_logloss: f64,
    true_model_logloss: f64,
    examples_per_s: f64,
    pushes_per_s: f64,
    pulls_per_s: f64,
    bytes_sent: u64,
    bytes_received: u64,
    /// Keys the workers had gradients for, and keys they pushed (a filter holds some back).
    keys_offered: u64,
    keys_pushed: u64,
    workers: u32,
    epochs: Vec<Epoch>,
    train_seconds: f64,
    total_seconds: f64,
}

/// Counters shared by the workers.
#[derive(Debug, Default)]
struct Counters {
    examples: AtomicU64,
    pushes: AtomicU64,
    pulls: AtomicU64,
    loss_milli_sum: AtomicU64,
    batches: AtomicU64,
}

pub fn run(mut args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    if args.connect.is_none() && args.net.secret.cluster_secret.is_none() {
        // The cluster lives in this process: it makes its own secret, so the demo is
        // authenticated end to end without asking for one.
        args.net.secret.cluster_secret = Some(tessera_transport::auth::ClusterSecret::generate());
    }
    if args.workers == 0 || args.batch == 0 || args.epochs == 0 {
        bail!("--workers, --batch and --epochs must be at least 1");
    }
    if args.connect.is_none() {
        // The servers' options are checked before the data set is made, not after.
        args.engine.server_config("127.0.0.1:0", Vec::new(), false, &args.net).engine.validate().map_err(|e| anyhow!("{e}"))?;
    }
    let say = |line: String| if args.json { eprintln!("{line}") } else { println!("{line}") };
    if let Some(at) = args.metrics.start()? {
        say(format!("metrics at http://{at}/metrics"));
    }
    let cfg = DataConfig { features: args.features, examples: args.examples, active: args.active, seed: args.seed, ..DataConfig::default() };
    cfg.validate().map_err(|e| anyhow!("bad data set options: {e}"))?;
    say(format!("generating {} examples over {} hashed features ({} active each)...", cfg.examples, cfg.features, cfg.active));
    let data = data::generate(&cfg);
    let (true_loss, true_acc) = data.true_model_metrics();
    say(format!("true model on the held-out split: log-loss {true_loss:.4}, accuracy {true_acc:.4}"));

    let mut _servers = Vec::new();
    let mut _coordinator = None;
    let mut spec = TableSpec::new("demo.lr", TableKind::Sparse, 0, u64::MAX, 1);
    spec.updater = args.updater.clone().unwrap_or_else(|| adagrad(args.lr));
    spec.capacity = cfg.features + cfg.features / 4 + 1024;
    let addrs = match &args.connect {
        Some(list) => addresses(list),
        None if args.servers >= 2 || args.replicas.is_some() => {
            let replicas = args.replicas.unwrap_or(ReplicationConfig::default().replicas);
            let cluster = Cluster { servers: args.servers, replicas, ranges: args.ranges, workers: args.workers };
            let (coordinator, servers) = cluster.start(&args.engine, &args.net, &spec)?;
            let addrs = servers.iter().map(|s| s.local_addr().to_string()).collect();
            say(format!(
                "replicated cluster in this process: {} server{}, {} ranges, every range on a chain of {}, coordinator (embedded) on {}; {} workers",
                args.servers,
                if args.servers == 1 { "" } else { "s" },
                cluster.ranges(&args.engine),
                replicas.min(args.servers),
                coordinator.local_addr(),
                args.workers
            ));
            _coordinator = Some(coordinator);
            _servers = servers;
            addrs
        }
        None => {
            let server = Server::start(args.engine.server_config("127.0.0.1:0", Vec::new(), false, &args.net), UpdaterRegistry::new())
                .context("starting the embedded server")?;
            say(format!(
                "embedded server on {} with {} shards, {} workers",
                server.local_addr(),
                args.engine.shards.unwrap_or_else(|| tessera_engine::config::available_cores() as u16),
                args.workers
            ));
            let addr = server.local_addr().to_string();
            _servers.push(server);
            vec![addr]
        }
    };
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let replicated = _coordinator.is_some();
    let wire = Wire::from_args(&args);
    if args.wire_table {
        return wire_table(&args, &data, &refs, &spec);
    }
    let summary = train(&args, &wire, &data, &refs, &spec, replicated, &say)?;
    let filtered = if wire.filter == FilterSpec::None {
        String::new()
    } else {
        format!(" ({:.0}% of keys pushed)", 100.0 * summary.keys_pushed as f64 / summary.keys_offered.max(1) as f64)
    };
    say(format!(
        "done in {:.1} s: {:.0} examples/s, {:.0} pushes/s, {:.0} pulls/s, {:.1} MB sent{filtered}, {:.1} MB received; accuracy {:.4} vs true model {:.4}",
        started.elapsed().as_secs_f64(),
        summary.examples_per_s,
        summary.pushes_per_s,
        summary.pulls_per_s,
        summary.bytes_sent as f64 / 1e6,
        summary.bytes_received as f64 / 1e6,
        summary.accuracy,
        summary.true_model_accuracy
    ));
    if args.json {
        let summary = Summary { total_seconds: started.elapsed().as_secs_f64(), ..summary };
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

/// What a training run puts on the wire, and how: the features `--wire-table` compares.
#[derive(Debug, Clone, PartialEq)]
struct Wire {
    compress: bool,
    key_cache: bool,
    filter: FilterSpec,
    /// The table's updater.
    updater: String,
}

impl Wire {
    fn from_args(args: &DemoArgs) -> Wire {
        let updater = args.updater.clone().unwrap_or_else(|| adagrad(args.lr));
        Wire { compress: args.compress, key_cache: args.key_cache, filter: args.filter, updater }
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.key_cache {
            parts.push("key caching".to_string());
        }
        if self.compress {
            parts.push("compression".to_string());
        }
        if self.filter != FilterSpec::None {
            parts.push(format!("filter {}", self.filter));
        }
        if parts.is_empty() {
            parts.push("none".into());
        }
        parts.join(" + ")
    }
}

fn adagrad(lr: f32) -> String {
    format!("adagrad{{lr={lr},eps=1e-8}}")
}

/// A push filter, as `--filter` names it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FilterSpec {
    None,
    Significant(f32),
    Skip(f64),
    Kkt(f32),
}

impl std::str::FromStr for FilterSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{s:?} is not a filter: use none, significant:T, skip:P (0 <= P < 1) or kkt:L");
        let (name, value) = s.split_once(':').unwrap_or((s, ""));
        match (name, value.parse::<f64>()) {
            ("none", _) if value.is_empty() => Ok(FilterSpec::None),
            ("significant", Ok(t)) if t >= 0.0 => Ok(FilterSpec::Significant(t as f32)),
            ("skip", Ok(p)) if (0.0..1.0).contains(&p) => Ok(FilterSpec::Skip(p)),
            ("kkt", Ok(l)) if l >= 0.0 => Ok(FilterSpec::Kkt(l as f32)),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for FilterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FilterSpec::None => write!(f, "none"),
            FilterSpec::Significant(t) => write!(f, "significant:{t}"),
            FilterSpec::Skip(p) => write!(f, "skip:{p}"),
            FilterSpec::Kkt(l) => write!(f, "kkt:{l}"),
        }
    }
}

/// One worker's filter, built from the spec (each worker holds its own state).
enum WorkerFilter {
    Significant(SignificantlyModified),
    Skip(RandomSkip),
    Kkt(Kkt),
}

impl WorkerFilter {
    fn new(spec: FilterSpec, worker: u32) -> Option<WorkerFilter> {
        match spec {
            FilterSpec::None => None,
            FilterSpec::Significant(t) => Some(WorkerFilter::Significant(SignificantlyModified::new(t))),
            FilterSpec::Skip(p) => Some(WorkerFilter::Skip(RandomSkip::new(p, 0x5EED ^ u64::from(worker)))),
            FilterSpec::Kkt(l) => Some(WorkerFilter::Kkt(Kkt::new(l))),
        }
    }

    fn as_filter(&mut self) -> &mut dyn Filter {
        match self {
            WorkerFilter::Significant(f) => f,
            WorkerFilter::Skip(f) => f,
            WorkerFilter::Kkt(f) => f,
        }
    }
}

/// Trains `--epochs` epochs on a fresh table with `wire`'s features, and evaluates after each.
fn train(args: &DemoArgs, wire: &Wire, data: &Dataset, refs: &[&str], spec: &TableSpec, replicated: bool, say: &dyn Fn(String)) -> Result<Summary> {
    let (true_loss, true_acc) = data.true_model_metrics();
    let mut spec = spec.clone();
    let key_cache_keys = if wire.key_cache { KEY_CACHE_KEYS_DEFAULT } else { 0 };
    let cfg = |w| ClientConfig { compress: wire.compress, key_cache_keys, workers: args.workers, ..args.net.client(w) };
    let clients = (0..args.workers).map(|w| Client::connect(refs, cfg(w))).collect::<Result<Vec<_>, _>>().context("connecting the workers")?;
    let table = if replicated {
        // The cluster was started holding the table.
        clients[0].table(&spec.name).context("the demo table")?
    } else {
        // A fresh table per run, so that a second run against the same servers trains from scratch.
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        spec.name = format!("demo.lr-{stamp}-{}", RUNS.fetch_add(1, Ordering::Relaxed));
        spec.updater.clone_from(&wire.updater);
        clients[0].create_table(&spec).context("creating the demo table")?
    };
    let tables = vec![table.with_consistency(args.consistency); clients.len()];
    let mut trainers: Vec<Worker<'_>> = clients
        .iter()
        .zip(&tables)
        .enumerate()
        .map(|(w, (client, table))| {
            let filter = WorkerFilter::new(wire.filter, w as u32);
            Worker { client, table, in_flight: VecDeque::new(), filter, kept_keys: Vec::new(), kept_grads: Vec::new(), keys_offered: 0, keys_pushed: 0 }
        })
        .collect();
    let test_keys = data::unique_keys(&data.test);

    let counters = Counters::default();
    let mut epochs = Vec::new();
    let mut train_seconds = 0.0;
    let mut eval_bytes = (0, 0);
    for epoch in 0..args.epochs {
        let t = Instant::now();
        train_epoch(args, data, &mut trainers, epoch, &counters)?;
        let seconds = t.elapsed().as_secs_f64();
        train_seconds += seconds;
        // Evaluation pulls are not training traffic: their bytes are left out of the summary.
        let before = trainers[0].bytes();
        let (logloss, accuracy) = evaluate(&mut trainers[0], data, &test_keys)?;
        let after = trainers[0].bytes();
        eval_bytes = (eval_bytes.0 + after.0 - before.0, eval_bytes.1 + after.1 - before.1);
        let batches = counters.batches.swap(0, Ordering::Relaxed).max(1);
        let train_loss = counters.loss_milli_sum.swap(0, Ordering::Relaxed) as f64 / 1e6 / batches as f64;
        say(format!(
            "epoch {}/{}: train loss {train_loss:.4} | held-out log-loss {logloss:.4}, accuracy {accuracy:.4} (true model {true_acc:.4}) | {seconds:.1} s",
            epoch + 1,
            args.epochs
        ));
        epochs.push(Epoch { epoch: epoch + 1, train_loss, heldout_logloss: logloss, accuracy, seconds });
    }
    let (bytes_sent, bytes_received) = trainers.iter().map(|t| t.bytes()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let (bytes_sent, bytes_received) = (bytes_sent - eval_bytes.0, bytes_received - eval_bytes.1);
    let (keys_offered, keys_pushed) = trainers.iter().map(|t| t.keys()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let last = epochs.last().expect("at least one epoch");
    Ok(Summary {
        accuracy: last.accuracy,
        true_model_accuracy: true_acc,
        heldout_logloss: last.heldout_logloss,
        true_model_logloss: true_loss,
        examples_per_s: counters.examples.load(Ordering::Relaxed) as f64 / train_seconds,
        pushes_per_s: counters.pushes.load(Ordering::Relaxed) as f64 / train_seconds,
        pulls_per_s: counters.pulls.load(Ordering::Relaxed) as f64 / train_seconds,
        bytes_sent,
        bytes_received,
        keys_offered,
        keys_pushed,
        workers: args.workers,
        epochs,
        train_seconds,
        total_seconds: 0.0,
    })
}

/// `--wire-table`: one training run per feature, then the bytes each sent and received (frames
/// included) beside the accuracy it reached.
fn wire_table(args: &DemoArgs, data: &Dataset, refs: &[&str], spec: &TableSpec) -> Result<()> {
    let base = Wire { compress: false, key_cache: false, filter: FilterSpec::None, updater: adagrad(args.lr) };
    let with = |f: &dyn Fn(&mut Wire)| {
        let mut w = base.clone();
        f(&mut w);
        w
    };
    let ftrl = format!("ftrl{{alpha={},beta=1,l1={},l2=0}}", WIRE_FTRL_ALPHA, WIRE_KKT_L1);
    let rows = [
        base.clone(),
        with(&|w| w.key_cache = true),
        with(&|w| w.compress = true),
        with(&|w| w.filter = FilterSpec::Significant(WIRE_SIGNIFICANT)),
        with(&|w| w.filter = FilterSpec::Skip(WIRE_SKIP)),
        with(&|w| {
            w.key_cache = true;
            w.compress = true;
            w.filter = FilterSpec::Significant(WIRE_SIGNIFICANT);
        }),
        with(&|w| w.updater.clone_from(&ftrl)),
        with(&|w| {
            w.updater.clone_from(&ftrl);
            w.filter = FilterSpec::Kkt(WIRE_KKT_L1);
        }),
        with(&|w| {
            w.updater.clone_from(&ftrl);
            w.filter = FilterSpec::Kkt(WIRE_KKT_L1);
            w.key_cache = true;
        }),
    ];
    let quiet = |_: String| {};
    let mut results = Vec::new();
    for (i, wire) in rows.iter().enumerate() {
        eprintln!("wire table: run {}/{}: {} ({})", i + 1, rows.len(), wire.describe(), wire.updater);
        let summary = train(args, wire, data, refs, spec, false, &quiet)?;
        results.push((wire, summary));
    }
    println!();
    println!("| updater | features | bytes sent | bytes received | total vs. none | keys pushed | accuracy |");
    println!("|---|---|---|---|---|---|---|");
    let mut baseline = 0u64;
    for (wire, s) in &results {
        let total = s.bytes_sent + s.bytes_received;
        let updater = wire.updater.split('{').next().unwrap_or_default();
        if wire.filter == FilterSpec::None && !wire.key_cache && !wire.compress {
            baseline = total;
        }
        println!(
            "| {updater} | {} | {:.1} MB | {:.1} MB | {:.2} | {:.0}% | {:.4} |",
            wire.describe(),
            s.bytes_sent as f64 / 1e6,
            s.bytes_received as f64 / 1e6,
            total as f64 / baseline.max(1) as f64,
            100.0 * s.keys_pushed as f64 / s.keys_offered.max(1) as f64,
            s.accuracy
        );
    }
    println!();
    println!(
        "true model accuracy {:.4}; {} workers, {} epochs; each ratio is against the run with no feature and the same updater",
        data.true_model_metrics().1,
        args.workers,
        args.epochs
    );
    Ok(())
}

/// `--wire-table`'s settings: the significantly-modified threshold, the random-skip share, and
/// the L1 strength (FTRL's, and the KKT filter's) with FTRL's learning rate.
const WIRE_SIGNIFICANT: f32 = 0.5;
const WIRE_SKIP: f64 = 0.5;
const WIRE_KKT_L1: f32 = 2.0;
const WIRE_FTRL_ALPHA: f32 = 0.1;

fn progress(len: u64, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} examples, {per_sec}, eta {eta}").expect("a valid template").progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("epoch {}/{}", epoch + 1, epochs));
    bar
}

/// A worker's side of training: its client, with up to [`PUSHES_IN_FLIGHT`] pushes in flight
/// while it pulls and computes the next batches.
struct Worker<'a> {
    client: &'a Client,
    table: &'a Table,
    /// The pushes not yet waited for, oldest first.
    in_flight: VecDeque<Ticket<'a>>,
    filter: Option<WorkerFilter>,
    /// What the filter kept of the batch in hand, reused from batch to batch.
    kept_keys: Vec<u64>,
    kept_grads: Vec<f32>,
    /// Keys offered to the filter, and keys pushed.
    keys_offered: u64,
    keys_pushed: u64,
}

impl Worker<'_> {
    /// Pulls the weights of `keys` into `out`.
    fn pull(&mut self, keys: &[u64], out: &mut [f32]) -> Result<()> {
        self.client.pull(self.table, keys, out)?.wait()?;
        if let Some(WorkerFilter::Kkt(kkt)) = &mut self.filter {
            kkt.observe(1, keys, out);
        }
        Ok(())
    }
    /// Pushes `grad` for `keys` at clock `clock`; it may still be in flight when this returns.
    fn push(&mut self, clock: u64, keys: &[u64], grad: &[f32]) -> Result<()> {
        while self.in_flight.len() >= PUSHES_IN_FLIGHT {
            self.in_flight.pop_front().expect("counted").wait()?;
        }
        self.client.set_clock(clock);
        self.keys_offered += keys.len() as u64;
        let Some(f) = &mut self.filter else {
            self.keys_pushed += keys.len() as u64;
            self.in_flight.push_back(self.client.push(self.table, keys, grad)?);
            return Ok(());
        };
        // The filter runs here rather than in Client::push_filtered, to count what it keeps.
        self.kept_keys.clear();
        self.kept_grads.clear();
        f.as_filter().filter(1, keys, grad, &mut self.kept_keys, &mut self.kept_grads);
        self.keys_pushed += self.kept_keys.len() as u64;
        self.in_flight.push_back(self.client.push(self.table, &self.kept_keys, &self.kept_grads)?);
        Ok(())
    }
    /// Waits for the pushes in flight, and sends what the filter held back.
    fn flush(&mut self) -> Result<()> {
        self.wait_in_flight()?;
        if let Some(WorkerFilter::Significant(f)) = &mut self.filter {
            // What the filter held back goes out at the end of each epoch: nothing is lost.
            let (mut keys, mut grads) = (Vec::new(), Vec::new());
            f.flush(&mut keys, &mut grads);
            self.keys_pushed += keys.len() as u64;
            self.client.push(self.table, &keys, &grads)?.wait()?;
        }
        Ok(())
    }
    /// Bytes sent and received.
    fn bytes(&self) -> (u64, u64) {
        self.client.bytes()
    }
    /// Keys the worker had gradients for, and keys it pushed (fewer when a filter holds some back).
    fn keys(&self) -> (u64, u64) {
        (self.keys_offered, self.keys_pushed)
    }
}

/// One pass over the training set, each worker on its own slice, all at once.
fn train_epoch(args: &DemoArgs, data: &Dataset, trainers: &mut [Worker<'_>], epoch: usize, counters: &Counters) -> Result<()> {
    let n = data.train.len();
    let bar = progress(n as u64, epoch, args.epochs);
    let workers = trainers.len();
    let batches_per_epoch = n.div_ceil(args.batch * workers) as u64;
    let result = std::thread::scope(|scope| {
        let handles: Vec<_> = trainers
            .iter_mut()
            .enumerate()
            .map(|(w, trainer)| {
                let slice = n * w / workers..n * (w + 1) / workers;
                let first_clock = epoch as u64 * batches_per_epoch;
                let bar = &bar;
                scope.spawn(move || work(args, data, trainer, slice, first_clock, counters, bar))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a worker panicked")))).collect::<Result<Vec<()>>>()
    });
    bar.finish_and_clear();
    result.map(|_| ())
}

/// One worker's pass over `slice`: pull, compute, push (with up to [`PUSHES_IN_FLIGHT`] pushes
/// in flight).
fn work(
    args: &DemoArgs,
    data: &Dataset,
    trainer: &mut Worker<'_>,
    slice: std::ops::Range<usize>,
    first_clock: u64,
    counters: &Counters,
    bar: &ProgressBar,
) -> Result<()> {
    let (mut keys, mut weights, mut grad) = (Vec::new(), Vec::new(), Vec::new());
    for (i, start) in slice.clone().step_by(args.batch).enumerate() {
        let batch = start..(start + args.batch).min(slice.end);
        data::batch_keys(&data.train, batch.clone(), &mut keys);
        weights.resize(keys.len(), 0.0);
        grad.resize(keys.len(), 0.0);
        trainer.pull(&keys, &mut weights)?;
        let loss = data::batch_gradient(&data.train, batch.clone(), &keys, &weights, &mut grad);
        trainer.push(first_clock + i as u64 + 1, &keys, &grad)?;
        counters.pulls.fetch_add(1, Ordering::Relaxed);
        counters.pushes.fetch_add(1, Ordering::Relaxed);
        counters.examples.fetch_add(batch.len() as u64, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.loss_milli_sum.fetch_add((loss * 1e6) as u64, Ordering::Relaxed);
        bar.inc(batch.len() as u64);
    }
    trainer.flush()
}

impl Worker<'_> {
    /// Waits for every push in flight.
    fn wait_in_flight(&mut self) -> Result<()> {
        while let Some(push) = self.in_flight.pop_front() {
            push.wait()?;
        }
        Ok(())
    }
}

/// Pulls the held-out keys' weights and scores the held-out split.
fn evaluate(trainer: &mut Worker<'_>, data: &Dataset, keys: &[u64]) -> Result<(f64, f64)> {
    let mut weights = vec![0.0f32; keys.len()];
    for (k, w) in keys.chunks(EVAL_CHUNK_KEYS).zip(weights.chunks_mut(EVAL_CHUNK_KEYS)) {
        trainer.pull(k, w)?;
    }
    let lookup = |key: u64| keys.binary_search(&key).map_or(0.0, |i| weights[i]);
    Ok(data::evaluate(&data.test, lookup))
}
