//! `tessera demo`: sparse logistic regression trained by asynchronous SGD through Tessera.
//!
//! Workers share nothing but the server: each walks its slice of the training set in minibatches,
//! pulls the weights of the batch's keys, computes the logistic-loss gradient, and pushes it; the
//! server applies Adagrad. A worker keeps one push in flight while it pulls the next batch, and
//! never waits for the others: that is asynchronous SGD.
//!
//! With `--servers N` (N >= 2), the demo runs a replicated cluster in the process instead: the
//! embedded coordinator and N servers, every range on a chain of `--replicas` of them, and the
//! workers push through each range's head (acknowledged once its tail holds the push) with
//! [`ChainClient`].

pub mod data;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tessera_client::{ChainClient, ChainTable, Client, ClientConfig, Table, Ticket};
use tessera_engine::chain::coordinator::{CoordinatorHandle, Embedded};
use tessera_engine::chain::Locator;
use tessera_engine::server::Join;
use tessera_engine::{Server, UpdaterRegistry};
use tessera_replication::{ReplicationConfig, TableKind, TableSpec};

use crate::common::{addresses, EngineArgs, TransportArgs};
use data::{DataConfig, Dataset};

/// Keys pulled per request when evaluating.
const EVAL_CHUNK_KEYS: usize = 1 << 18;

/// Train sparse logistic regression by asynchronous SGD through a parameter server.
///
/// By default everything runs in this process: a server with one shard per core, and worker
/// threads that connect to it over loopback TCP exactly as remote workers would. With
/// `--connect`, the workers train against running servers (`tessera server`) instead.
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
    /// Train against these running servers (comma-separated, the whole cluster).
    #[arg(long)]
    connect: Option<String>,
    /// Run a replicated cluster of this many servers in the process (with the embedded
    /// coordinator) instead of one unreplicated server.
    #[arg(long, default_value_t = 1, conflicts_with = "connect")]
    servers: u32,
    /// Servers in each range's chain, with --servers (default 2).
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Ranges the key space is cut into, with --servers; each has its own chain.
    #[arg(long, default_value_t = 16)]
    ranges: u32,
    /// Compress values on the wire (Snappy) when that pays.
    #[arg(long)]
    compress: bool,
    /// Print a JSON summary on stdout (progress and per-epoch lines go to stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    net: TransportArgs,
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

pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    if args.workers == 0 || args.batch == 0 || args.epochs == 0 {
        bail!("--workers, --batch and --epochs must be at least 1");
    }
    let say = |line: String| if args.json { eprintln!("{line}") } else { println!("{line}") };
    let cfg = DataConfig { features: args.features, examples: args.examples, active: args.active, seed: args.seed, ..DataConfig::default() };
    cfg.validate().map_err(|e| anyhow!("bad data set options: {e}"))?;
    say(format!("generating {} examples over {} hashed features ({} active each)...", cfg.examples, cfg.features, cfg.active));
    let data = data::generate(&cfg);
    let (true_loss, true_acc) = data.true_model_metrics();
    say(format!("true model on the held-out split: log-loss {true_loss:.4}, accuracy {true_acc:.4}"));

    let mut _servers = Vec::new();
    let mut _coordinator = None;
    let mut spec = TableSpec::new("demo.lr", TableKind::Sparse, 0, u64::MAX, 1);
    spec.updater = format!("adagrad{{lr={},eps=1e-8}}", args.lr);
    spec.capacity = cfg.features + cfg.features / 4 + 1024;
    let addrs = match &args.connect {
        Some(list) => addresses(list),
        None if args.servers >= 2 => {
            let (coordinator, servers) = start_cluster(&args, &spec)?;
            let addrs = servers.iter().map(|s| s.local_addr().to_string()).collect();
            say(format!(
                "replicated cluster in this process: {} servers, every range on a chain of {}, coordinator (embedded) on {}; {} workers",
                args.servers,
                args.replicas.min(args.servers),
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
            say(format!("embedded server on {} with {} shards, {} workers", server.local_addr(), args.engine.shards.unwrap_or_else(|| tessera_engine::config::available_cores() as u16), args.workers));
            let addr = server.local_addr().to_string();
            _servers.push(server);
            vec![addr]
        }
    };
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let (clients, tables): (Vec<Client>, Vec<Table>);
    let mut trainers: Vec<Box<dyn Trainer + '_>> = Vec::new();
    if _coordinator.is_some() {
        for w in 0..args.workers {
            let client = ChainClient::connect(&refs, args.net.client(w)).context("connecting a worker to the cluster")?;
            let table = client.table(&spec.name).context("the demo table")?;
            trainers.push(Box::new(Chained { client, table }));
        }
    } else {
        clients = (0..args.workers)
            .map(|w| Client::connect(&refs, ClientConfig { compress: args.compress, ..args.net.client(w) }))
            .collect::<Result<Vec<_>, _>>()
            .context("connecting the workers")?;
        // A fresh table per run, so that a second run against the same servers trains from scratch.
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        spec.name = format!("demo.lr-{stamp}");
        let table = clients[0].create_table(&spec).context("creating the demo table")?;
        tables = vec![table; clients.len()];
        trainers.extend(clients.iter().zip(&tables).map(|(client, table)| Box::new(Plain { client, table, in_flight: None }) as Box<dyn Trainer>));
    }
    let test_keys = data::unique_keys(&data.test);

    let counters = Counters::default();
    let mut epochs = Vec::new();
    let mut train_seconds = 0.0;
    for epoch in 0..args.epochs {
        let t = Instant::now();
        train_epoch(&args, &data, &mut trainers, epoch, &counters)?;
        let seconds = t.elapsed().as_secs_f64();
        train_seconds += seconds;
        let (logloss, accuracy) = evaluate(trainers[0].as_mut(), &data, &test_keys)?;
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
    let last = epochs.last().expect("at least one epoch");
    let summary = Summary {
        accuracy: last.accuracy,
        true_model_accuracy: true_acc,
        heldout_logloss: last.heldout_logloss,
        true_model_logloss: true_loss,
        examples_per_s: counters.examples.load(Ordering::Relaxed) as f64 / train_seconds,
        pushes_per_s: counters.pushes.load(Ordering::Relaxed) as f64 / train_seconds,
        pulls_per_s: counters.pulls.load(Ordering::Relaxed) as f64 / train_seconds,
        bytes_sent,
        bytes_received,
        workers: args.workers,
        epochs,
        train_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    say(format!(
        "done in {:.1} s: {:.0} examples/s, {:.0} pushes/s, {:.0} pulls/s, {:.1} MB sent, {:.1} MB received; accuracy {:.4} vs true model {:.4}",
        summary.total_seconds,
        summary.examples_per_s,
        summary.pushes_per_s,
        summary.pulls_per_s,
        bytes_sent as f64 / 1e6,
        bytes_received as f64 / 1e6,
        summary.accuracy,
        summary.true_model_accuracy
    ));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

fn progress(len: u64, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} examples, {per_sec}, eta {eta}")
        .expect("a valid template")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("epoch {}/{}", epoch + 1, epochs));
    bar
}

/// Starts the embedded coordinator and `--servers` replicated servers holding `spec`, and waits
/// until every range has its chain.
fn start_cluster(args: &DemoArgs, spec: &TableSpec) -> Result<(CoordinatorHandle, Vec<Server>)> {
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let rcfg = ReplicationConfig { replicas: args.replicas, ranges: args.ranges, workers: args.workers.max(1), ..ReplicationConfig::default() };
    rcfg.validate().map_err(|e| anyhow!("bad replication options: {e}"))?;
    let net = tessera_transport::TransportConfig::default();
    let coordinator = CoordinatorHandle::start("127.0.0.1:0", rcfg, args.servers, &net, Box::new(Embedded)).context("starting the embedded coordinator")?;
    let mut servers = Vec::new();
    for node in 1..=args.servers {
        let mut cfg = args.engine.server_config("127.0.0.1:0", vec![spec.clone()], false, &args.net);
        if args.engine.shards.is_none() {
            // Several servers share this machine's cores.
            cfg.engine.shards = 1;
        }
        cfg.engine.workers_max = cfg.engine.workers_max.max(args.workers);
        cfg.replication = Some(Join { node, coordinator: Locator::At(coordinator.local_addr().to_string()), advertise: None });
        servers.push(Server::start(cfg, UpdaterRegistry::new()).with_context(|| format!("starting replicated server {node}"))?);
    }
    Ok((coordinator, servers))
}

/// A worker's side of training, over either client.
trait Trainer: Send {
    /// Pulls the weights of `keys` into `out`.
    fn pull(&mut self, keys: &[u64], out: &mut [f32]) -> Result<()>;
    /// Pushes `grad` for `keys` at clock `clock`; it may still be in flight when this returns
    /// (one at most: each push first waits for the one before).
    fn push(&mut self, clock: u64, keys: &[u64], grad: &[f32]) -> Result<()>;
    /// Waits for the push in flight.
    fn flush(&mut self) -> Result<()>;
    /// Bytes sent and received.
    fn bytes(&self) -> (u64, u64);
}

/// An unreplicated server's client: one push in flight while the next batch is pulled.
struct Plain<'a> {
    client: &'a Client,
    table: &'a Table,
    in_flight: Option<Ticket<'a>>,
}

impl Trainer for Plain<'_> {
    fn pull(&mut self, keys: &[u64], out: &mut [f32]) -> Result<()> {
        self.client.pull(self.table, keys, out)?.wait()?;
        Ok(())
    }
    fn push(&mut self, clock: u64, keys: &[u64], grad: &[f32]) -> Result<()> {
        self.flush()?;
        self.client.set_clock(clock);
        self.in_flight = Some(self.client.push(self.table, keys, grad)?);
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        if let Some(push) = self.in_flight.take() {
            push.wait()?;
        }
        Ok(())
    }
    fn bytes(&self) -> (u64, u64) {
        self.client.bytes()
    }
}

/// A replicated cluster's client: each push returns once every range's tail holds it.
struct Chained {
    client: ChainClient,
    table: ChainTable,
}

impl Trainer for Chained {
    fn pull(&mut self, keys: &[u64], out: &mut [f32]) -> Result<()> {
        Ok(self.client.pull(&self.table, keys, out)?)
    }
    fn push(&mut self, clock: u64, keys: &[u64], grad: &[f32]) -> Result<()> {
        self.client.set_clock(clock);
        Ok(self.client.push(&self.table, keys, grad)?)
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    fn bytes(&self) -> (u64, u64) {
        (self.client.stats.bytes_sent, self.client.stats.bytes_received)
    }
}

/// One pass over the training set, each worker on its own slice, all at once.
fn train_epoch(args: &DemoArgs, data: &Dataset, trainers: &mut [Box<dyn Trainer + '_>], epoch: usize, counters: &Counters) -> Result<()> {
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
                scope.spawn(move || work(args, data, trainer.as_mut(), slice, first_clock, counters, bar))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a worker panicked")))).collect::<Result<Vec<()>>>()
    });
    bar.finish_and_clear();
    result.map(|_| ())
}

/// One worker's pass over `slice`: pull, compute, push (with one push in flight, where the
/// client allows).
fn work(
    args: &DemoArgs,
    data: &Dataset,
    trainer: &mut dyn Trainer,
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

/// Pulls the held-out keys' weights and scores the held-out split.
fn evaluate(trainer: &mut dyn Trainer, data: &Dataset, keys: &[u64]) -> Result<(f64, f64)> {
    let mut weights = vec![0.0f32; keys.len()];
    for (k, w) in keys.chunks(EVAL_CHUNK_KEYS).zip(weights.chunks_mut(EVAL_CHUNK_KEYS)) {
        trainer.pull(k, w)?;
    }
    let lookup = |key: u64| keys.binary_search(&key).map_or(0.0, |i| weights[i]);
    Ok(data::evaluate(&data.test, lookup))
}
