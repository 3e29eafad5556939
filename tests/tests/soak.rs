//! A bounded soak: minutes of training under failure, watching for what only time shows —
//! memory that creeps, descriptors, memory regions or queue pairs that leak, and acknowledged
//! pushes that go missing.
//!
//! What runs, as real processes on loopback:
//! - a replicated cluster: `tessera coordinator` (the embedded configuration store) and three
//!   `tessera server`s, every range on a chain of `SOAK_REPLICAS` (default 2) of them;
//! - beside it, one standalone `tessera server` with `--durability wal` and a checkpoint every
//!   `SOAK_CHECKPOINT_S` seconds (default 10). Replicated servers refuse durability options for
//!   now (they keep their ranges on their chains' other servers), so this server is where
//!   checkpoints run under the same load;
//! - `SOAK_WORKERS` worker threads (default 8). Each iteration, each pushes a dense table (every
//!   key) and a sparse one (64 hashed keys) to the cluster and to the durable server, waits for
//!   the acknowledgements, and pulls both back from both. They run flat out, for `SOAK_SECONDS`
//!   (default 600).
//!
//! Halfway through, server 2 is killed with `kill -9`. The test waits until the coordinator has
//! taken it out of every chain and the survivors have made every chain whole again without it
//! (with 2 replicas, they copy its ranges between them), lets the cluster run degraded a little,
//! restarts it, and waits until it is back in exactly the chains it was in.
//!
//! Every `SOAK_SAMPLE_S` seconds (default: a sixtieth of the run, 1 to 10 s) each process's
//! `--metrics` is scraped, and the test process reads its own figures: resident memory, open
//! descriptors, RDMA memory regions and queue pairs, and requests served. The samples are
//! printed as one table (run with `--nocapture`), then checked:
//! - Nothing acknowledged is lost, nothing applied twice: every key of both tables, on the
//!   cluster and on the durable server, holds exactly the sum of every acknowledged push. The
//!   durable server is then killed with `kill -9`, its data directory checked with `tessera
//!   checkpoint verify`, and it is restarted on it: it must recover exactly the same sums.
//! - Memory is flat after warm-up. The first quarter of the run is warm-up; the failover
//!   changes every server's chains, connections and copies, so the survivors warm up again for
//!   a tenth of the run once it has healed. Over each steady window, the median RSS of its last
//!   third may exceed that of its first third by at most [`RSS_DRIFT_RATIO`] or
//!   [`RSS_DRIFT_FLOOR_BYTES`], whichever is more. Medians ignore one-off peaks (a snapshot
//!   copied, a checkpoint written); a leak moves the median of the end of the window. The
//!   summary prints, per process, the smallest leak per request served that would fail.
//! - Descriptors, memory regions and queue pairs do not grow: over each steady window the
//!   lowest count of its last third is at most the lowest of its first third (a count taken while
//!   a checkpoint has a file open, or a scrape is being answered, only adds). On the surviving
//!   servers and the coordinator, the lowest count after the failover equals the lowest before:
//!   the same workers, the same peers. The test process (the workers) may hold fewer after, never
//!   more. (Workers used to fetch the configuration only when a call failed or was slow, and so
//!   went on routing by the one they fetched during the failover, never opening a link to the
//!   restarted server; the first soak runs found that. A call now fetches it again when it is
//!   over a second old, and the soak checks that every worker ends on the coordinator's.) A
//!   restarted server is a new process; its counts are printed beside its predecessor's, and
//!   checked for growth within its own window.
//! - The durable server checkpointed all along: no shard's checkpoint was ever older than
//!   three intervals after warm-up.
//!
//! The pure checks are tested on synthetic series below (those tests run by default), and
//! `SOAK_PLANT_LEAK=1` plants a leak in the test process (each worker keeps 4 KiB per iteration
//! and a descriptor per 100), which the soak must then report.
//!
//! Run it (release builds: a debug build spends the soak in its own bookkeeping):
//!
//! ```text
//! cargo build --release -p tessera-tools --features rdma
//! cargo test --release -p tessera-tests --all-features --test soak -- --ignored --nocapture
//! ```
//!
//! Over RDMA, in the SoftRoCE guest (`SOAK_FAILURE_TIMEOUT_MS=2000`: under emulation a live
//! server's heartbeat is at times answered more than 500 ms late):
//!
//! ```text
//! SOAK_TRANSPORT=rdma SOAK_FAILURE_TIMEOUT_MS=2000 SOFTROCE_TIMEOUT=2400 \
//!   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/tests/softroce/run.sh \
//!   cargo test --release -p tessera-tests --all-features --test soak -- --ignored --nocapture
//! ```
//!
//! Knobs: `SOAK_SECONDS` (600, at least 60), `SOAK_WORKERS` (8), `SOAK_TRANSPORT` (tcp or rdma),
//! `SOAK_REPLICAS` (2), `SOAK_CHECKPOINT_S` (10), `SOAK_FAILURE_TIMEOUT_MS` (500),
//! `SOAK_SAMPLE_S`, `SOAK_PLANT_LEAK`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_client::{ChainStats, Client, ClientConfig};
use tessera_tests::{free_port, metric, run_tool, samples, try_scrape, ScratchDir, ServerProc};
use tessera_transport::{Op, TransportConfig, TransportKind};

const SERVERS: usize = 3;
/// The server killed halfway (node 2).
const VICTIM: usize = 1;
const RANGES: u32 = 16;
const KEYS: u64 = 2048;
/// Sparse keys each worker pushes: 48 every worker shares, 16 its own.
const SPARSE_SHARED: u64 = 48;
const SPARSE_OWN: u64 = 16;
/// RDMA slots as the replication tests size them: every per-range piece fits one.
const SLOT_BYTES: usize = 8 << 10;
/// Sums stay exact integers in `f32` below this.
const F32_EXACT_MAX: f64 = 16_777_216.0;

/// How far the median RSS of a steady window's last third may rise over its first third, as a
/// fraction of the first: a leak of this size over a few minutes is what a soak must catch. Noise
/// is far smaller: in the 600 s runs no server's median moved by more than 0.3 MiB within a
/// window, and the test process's by 1 MiB.
const RSS_DRIFT_RATIO: f64 = 0.10;
/// ... or this many bytes, whichever is more: small processes (the coordinator, a few MiB) move
/// by hundreds of KiB when a scrape or a snapshot passes through.
const RSS_DRIFT_FLOOR_BYTES: f64 = 4.0 * MIB;
/// A steady window needs this many samples for its thirds to mean anything.
const WINDOW_SAMPLES_MIN: usize = 6;
/// An iteration longer than this is a stall, kept for the report.
const STALL: Duration = Duration::from_millis(250);
const STALLS_KEPT_MAX: usize = 256;
/// Bounds on the waits around the failover (generous: the RDMA run is emulated).
const DETECT_WITHIN: Duration = Duration::from_secs(120);
const HEAL_WITHIN: Duration = Duration::from_secs(300);
const MIB: f64 = 1024.0 * 1024.0;
/// With `SOAK_PLANT_LEAK=1`, what each worker keeps per iteration, and how many iterations per
/// descriptor it keeps open.
const PLANTED_BYTES: usize = 4 << 10;
const PLANTED_FD_EVERY: u64 = 100;

/// The run's settings, from `SOAK_*` variables.
#[derive(Debug, Clone)]
struct Knobs {
    run: Duration,
    workers: u32,
    transport: TransportKind,
    replicas: usize,
    checkpoint_s: u64,
    failure_timeout_ms: u64,
    sample: Duration,
    plant_leak: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T
where
    T::Err: std::fmt::Debug,
{
    std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e:?}")))
}

impl Knobs {
    fn from_env() -> Knobs {
        let seconds: u64 = env_or("SOAK_SECONDS", 600);
        assert!(seconds >= 60, "SOAK_SECONDS={seconds}: the windows need at least 60 s");
        let sample_s: f64 = env_or("SOAK_SAMPLE_S", (seconds as f64 / 60.0).clamp(1.0, 10.0));
        let replicas = env_or("SOAK_REPLICAS", 2);
        assert!((2..=SERVERS).contains(&replicas), "SOAK_REPLICAS is 2 or 3: one must survive the kill");
        Knobs {
            run: Duration::from_secs(seconds),
            workers: env_or("SOAK_WORKERS", 8),
            transport: env_or("SOAK_TRANSPORT", TransportKind::Tcp),
            replicas,
            checkpoint_s: env_or("SOAK_CHECKPOINT_S", 10),
            failure_timeout_ms: env_or("SOAK_FAILURE_TIMEOUT_MS", 500),
            sample: Duration::from_secs_f64(sample_s),
            plant_leak: env_or("SOAK_PLANT_LEAK", 0u8) == 1,
        }
    }

    /// Warm-up: the first quarter of the run.
    fn warm_up_s(&self) -> f64 {
        self.run.as_secs_f64() / 4.0
    }

    /// Warm-up again after the failover has healed: a tenth of the run.
    fn rewarm_s(&self) -> f64 {
        (self.run.as_secs_f64() / 10.0).max(3.0 * self.sample.as_secs_f64())
    }

    /// How long the cluster runs without the victim once its chains are whole without it.
    fn degraded(&self) -> Duration {
        (self.run / 30).max(self.sample)
    }

    /// How worker `w` connects, to the cluster and to the durable server alike.
    fn client(&self, w: u32) -> ClientConfig {
        let mut cfg = ClientConfig::worker(w);
        cfg.kind = self.transport;
        cfg.rdma.slots = 4;
        cfg.rdma.slot_bytes = SLOT_BYTES;
        cfg
    }

    /// The server flags that choose the transport.
    fn transport_args(&self) -> Vec<String> {
        let slot_bytes = SLOT_BYTES.to_string();
        let kind = self.transport.to_string();
        ["--transport", &kind, "--rdma-slots", "4", "--rdma-slot-bytes", &slot_bytes].map(String::from).to_vec()
    }
}

/// Worker `w`'s gradient for dense key `k` (or sparse key `k`'s first component): 1, 2 or 3,
/// so that every sum is an exact integer in any order.
fn grad(w: u32, k: u64) -> f32 {
    ((w as u64 + k) % 3 + 1) as f32
}

/// Worker `w`'s sparse keys: the shared ones, then its own, hashed over the whole key space.
fn sparse_keys(w: u32) -> Vec<u64> {
    let hash = |x: u64| x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ 0x5bd1_e995;
    (0..SPARSE_SHARED).chain((0..SPARSE_OWN).map(|i| 1000 * (w as u64 + 1) + i)).map(hash).collect()
}

fn sparse_grads(w: u32, keys: &[u64]) -> Vec<f32> {
    keys.iter().flat_map(|k| [grad(w, *k), 1.0]).collect()
}

/// Dense `w` of [`KEYS`] keys and sparse `emb` of 2 components, both summed.
fn tables_file(dir: &ScratchDir) -> String {
    let dense = format!("[[table]]\nname = \"w\"\nkind = \"dense\"\nstart = 0\nend = {KEYS}\ndim = 1\nupdater = \"sum\"\n");
    let sparse = "[[table]]\nname = \"emb\"\nkind = \"sparse\"\ndim = 2\ncapacity = 20000\nupdater = \"sum\"\n";
    dir.write("tables.toml", &format!("{dense}{sparse}")).to_str().expect("a UTF-8 path").to_string()
}

// --- the cluster's configuration, as the coordinator reports it ---------------------------------

fn status(coordinator: &str) -> Option<Value> {
    let body = tessera_transport::ask(coordinator, Op::Status, &[], &TransportConfig::default()).ok()?;
    serde_json::from_slice(&body).ok()
}

/// Each range's chain as a sorted node list, and whether any range has a learner.
fn chains(status: &Value) -> (Vec<Vec<u64>>, bool) {
    let chains = status["config"]["chains"].as_array().cloned().unwrap_or_default();
    let nodes = chains
        .iter()
        .map(|c| {
            let mut n: Vec<u64> = c["nodes"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
            n.sort_unstable();
            n
        })
        .collect();
    (nodes, chains.iter().any(|c| !c["learner"].is_null()))
}

fn incarnation(status: &Value, node: u64) -> Option<u64> {
    let members = status["config"]["members"].as_array()?;
    members.iter().find(|m| m["node"] == node)?["incarnation"].as_u64()
}

/// Polls the coordinator until `done` holds of its status; panics with the status after `within`.
fn wait_status(coordinator: &str, what: &str, within: Duration, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if status(coordinator).is_some_and(|s| done(&s)) {
            return;
        }
        if Instant::now() > deadline {
            let now = status(coordinator).map(|s| s.to_string()).unwrap_or_default();
            panic!("{what}: not within {within:?}; the coordinator's status: {now}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// --- the processes --------------------------------------------------------------------------------

/// A process the sampler reads: by its `--metrics` address, or (`None`) the test process itself.
#[derive(Debug, Clone)]
struct Watched {
    name: &'static str,
    incarnation: u32,
    metrics: Option<String>,
    data_dir: Option<PathBuf>,
}

/// Where the soak's processes go and how they are started.
#[derive(Debug)]
struct Plan {
    knobs: Knobs,
    tables: String,
    coordinator: String,
    addrs: Vec<String>,
    data: ScratchDir,
    _dir: ScratchDir,
}

/// The soak's processes.
#[derive(Debug)]
struct Rig {
    plan: Plan,
    servers: Vec<ServerProc>,
    durable: ServerProc,
    _coordinator: ServerProc,
    /// What the sampler reads; changed under its lock, so a round never reads a dead process.
    watch: Arc<Mutex<Vec<Watched>>>,
}

fn metrics_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

impl Plan {
    fn new(knobs: &Knobs) -> Plan {
        let dir = ScratchDir::new("soak");
        let tables = tables_file(&dir);
        let coordinator = format!("127.0.0.1:{}", free_port());
        let addrs = (0..SERVERS).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        Plan { knobs: knobs.clone(), tables, coordinator, addrs, data: ScratchDir::new("soak-data"), _dir: dir }
    }

    fn start_coordinator(&self) -> (ServerProc, Watched) {
        let knobs = &self.knobs;
        let metrics = metrics_addr();
        let (replicas, workers, timeout) = (knobs.replicas.to_string(), (knobs.workers + 1).to_string(), knobs.failure_timeout_ms.to_string());
        let ranges = RANGES.to_string();
        let proc = ServerProc::coordinator_at(
            &self.coordinator,
            &["--servers", "3", "--replicas", &replicas, "--ranges", &ranges, "--workers", &workers, "--failure-timeout-ms", &timeout, "--metrics", &metrics],
        );
        (proc, Watched { name: "coord", incarnation: 1, metrics: Some(metrics), data_dir: None })
    }

    /// Starts replicated server `i` (node `i + 1`) at its address, with new metrics.
    fn start_server(&self, i: usize, incarnation: u32) -> (ServerProc, Watched) {
        let (node, metrics) = ((i + 1).to_string(), metrics_addr());
        let mut args = ["--node-id", &node, "--tables", &self.tables, "--shards", "2", "--no-pin", "--coordinator", &self.coordinator, "--metrics", &metrics]
            .map(String::from)
            .to_vec();
        args.extend(self.knobs.transport_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let name = ["s1", "s2", "s3"][i];
        (ServerProc::start_at(&self.addrs[i], &args), Watched { name, incarnation, metrics: Some(metrics), data_dir: None })
    }

    /// Starts the durable server on its data directory (recovering what is there).
    fn start_durable(&self) -> (ServerProc, Watched) {
        let metrics = metrics_addr();
        let (data, checkpoint_s, workers) = (self.data_path(), self.knobs.checkpoint_s.to_string(), (self.knobs.workers + 1).to_string());
        let mut args = ["--tables", &self.tables, "--shards", "2", "--no-pin", "--durability", "wal", "--data-dir", &data]
            .into_iter()
            .chain(["--checkpoint-interval-s", &checkpoint_s, "--workers-max", &workers, "--metrics", &metrics])
            .map(String::from)
            .collect::<Vec<_>>();
        args.extend(self.knobs.transport_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let data_dir = Some(self.data.path().to_path_buf());
        (ServerProc::start(&args), Watched { name: "D", incarnation: 1, metrics: Some(metrics), data_dir })
    }

    fn data_path(&self) -> String {
        self.data.path().to_str().expect("a UTF-8 path").to_string()
    }
}

impl Rig {
    /// Starts every process and waits until every range has its chain.
    fn start(knobs: &Knobs) -> Rig {
        let plan = Plan::new(knobs);
        let (coordinator, watch) = plan.start_coordinator();
        let mut watched = vec![watch];
        let mut servers = Vec::new();
        for i in 0..SERVERS {
            let (server, w) = plan.start_server(i, 1);
            servers.push(server);
            watched.push(w);
        }
        let (durable, watch) = plan.start_durable();
        watched.push(watch);
        watched.push(Watched { name: "client", incarnation: 1, metrics: None, data_dir: None });
        let want = knobs.replicas;
        wait_status(&plan.coordinator, "every chain placed", Duration::from_secs(60), |s| {
            let (chains, learning) = chains(s);
            !chains.is_empty() && !learning && chains.iter().all(|c| c.len() == want)
        });
        Rig { plan, servers, durable, _coordinator: coordinator, watch: Arc::new(Mutex::new(watched)) }
    }
}

// --- the workers ------------------------------------------------------------------------------------

/// What one worker did.
#[derive(Debug, Default)]
struct Done {
    /// Acknowledged pushes: the cluster's dense and sparse tables, then the durable server's.
    acked: [u64; 4],
    /// Pulls (cluster, durable server) that read less than this worker's own acknowledged pushes.
    short_reads: [u64; 2],
    /// Iterations longer than [`STALL`]: when each began (s into the run) and how long it took.
    stalls: Vec<(f64, f64)>,
    stats: ChainStats,
    /// The configuration the worker routed by at the end.
    view_id: u64,
    durable_transport: &'static str,
}

/// Whether pulled values read less than worker `w` alone put there with `dense` and `sparse`
/// acknowledged pushes (others only add, so a short read lost something, or read a stale copy).
fn short_read(w: u32, dense: &[f32], sparse: &[f32], acked_dense: u64, acked_sparse: u64) -> bool {
    let dense_short = [0, 1, KEYS - 1].iter().any(|&k| dense[k as usize] < acked_dense as f32 * grad(w, k));
    let own = SPARSE_SHARED as usize;
    dense_short || sparse[own * 2 + 1] < acked_sparse as f32
}

/// Worker `w`: pushes and pulls on the cluster and on the durable server until `stop`.
fn work(w: u32, knobs: &Knobs, cluster: &[String], durable: &str, stop: &AtomicBool, epoch: Instant, progress: &AtomicU64) -> Result<Done, String> {
    let refs: Vec<&str> = cluster.iter().map(String::as_str).collect();
    let fail = |what: &'static str| move |e: tessera_client::ClientError| format!("worker {w}: {what}: {e}");
    let chain = Client::connect(&refs, knobs.client(w)).map_err(fail("connect to the cluster"))?;
    let (cw, ce) = (chain.table("w").map_err(fail("table w"))?, chain.table("emb").map_err(fail("table emb"))?);
    let plain = Client::connect(&[durable], knobs.client(w)).map_err(fail("connect to the durable server"))?;
    let (dw, de) = (plain.table("w").map_err(fail("table w"))?, plain.table("emb").map_err(fail("table emb"))?);
    let grads: Vec<f32> = (0..KEYS).map(|k| grad(w, k)).collect();
    let keys = sparse_keys(w);
    let sparse = sparse_grads(w, &keys);
    let (mut dense_out, mut sparse_out) = (vec![0f32; KEYS as usize], vec![0f32; keys.len() * 2]);
    let mut done = Done::default();
    let (mut planted, mut planted_fds) = (Vec::new(), Vec::new());
    let mut began = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let clock = done.acked[0] + 1;
        chain.set_clock(clock);
        chain.push_range(&cw, 0, &grads).and_then(|t| t.wait()).map_err(fail("dense push to the cluster"))?;
        done.acked[0] += 1;
        chain.push(&ce, &keys, &sparse).and_then(|t| t.wait()).map_err(fail("sparse push to the cluster"))?;
        done.acked[1] += 1;
        chain.pull_range(&cw, 0, &mut dense_out).and_then(|t| t.wait()).map_err(fail("dense pull from the cluster"))?;
        chain.pull(&ce, &keys, &mut sparse_out).and_then(|t| t.wait()).map_err(fail("sparse pull from the cluster"))?;
        done.short_reads[0] += u64::from(short_read(w, &dense_out, &sparse_out, done.acked[0], done.acked[1]));
        plain.set_clock(clock);
        plain.push_range(&dw, 0, &grads).and_then(|t| t.wait()).map_err(fail("dense push to the durable server"))?;
        done.acked[2] += 1;
        plain.push(&de, &keys, &sparse).and_then(|t| t.wait()).map_err(fail("sparse push to the durable server"))?;
        done.acked[3] += 1;
        plain.pull_range(&dw, 0, &mut dense_out).and_then(|t| t.wait()).map_err(fail("dense pull from the durable server"))?;
        plain.pull(&de, &keys, &mut sparse_out).and_then(|t| t.wait()).map_err(fail("sparse pull from the durable server"))?;
        done.short_reads[1] += u64::from(short_read(w, &dense_out, &sparse_out, done.acked[2], done.acked[3]));
        if knobs.plant_leak {
            planted.push(vec![1u8; PLANTED_BYTES]);
            if done.acked[0] % PLANTED_FD_EVERY == 0 {
                planted_fds.push(std::fs::File::open("/dev/null").map_err(|e| e.to_string())?);
            }
        }
        progress.fetch_add(1, Ordering::Release);
        let took = began.elapsed();
        if took > STALL && done.stalls.len() < STALLS_KEPT_MAX {
            done.stalls.push(((began - epoch).as_secs_f64(), took.as_secs_f64()));
        }
        began = Instant::now();
    }
    done.stats = chain.chain_stats();
    done.view_id = chain.config_id();
    done.durable_transport = plain.transport();
    Ok(done)
}

type Workers = Vec<JoinHandle<Result<Done, String>>>;

/// Sleeps until `at`, failing the test at once if a worker stopped (it stops only on an error).
fn run_until(at: Instant, workers: &mut Workers) {
    while Instant::now() < at {
        if let Some(i) = workers.iter().position(JoinHandle::is_finished) {
            match workers.swap_remove(i).join() {
                Ok(Err(e)) => panic!("{e}"),
                Ok(Ok(_)) => panic!("a worker stopped early without an error"),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        std::thread::sleep((at - Instant::now().min(at)).min(Duration::from_millis(200)));
    }
}

// --- sampling ---------------------------------------------------------------------------------------

/// One process's figures at one sampling round.
#[derive(Debug, Clone, Default)]
struct Reading {
    name: &'static str,
    incarnation: u32,
    round: usize,
    t_s: f64,
    rss_bytes: f64,
    fds: f64,
    mrs: Option<f64>,
    qps: Option<f64>,
    /// Pushes and pulls served so far (for the test process: workers' iterations).
    requests: f64,
    /// The oldest shard checkpoint's age, and the data directory's bytes (durable server).
    checkpoint_age_s: Option<f64>,
    disk_bytes: Option<f64>,
}

/// The largest sample of `name` in Prometheus text, over all label sets.
fn metric_max(text: &str, name: &str) -> Option<f64> {
    samples(text, name, &[]).fold(None, |max: Option<f64>, v| Some(max.map_or(v, |m| m.max(v))))
}

fn dir_bytes(dir: &Path) -> f64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0.0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len() as f64,
            Err(_) => 0.0,
        })
        .sum()
}

/// The test process's own figures: its RSS, descriptors, RDMA objects and workers' iterations.
fn read_self(progress: &[AtomicU64]) -> Reading {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    #[cfg(feature = "rdma")]
    let (mrs, qps) = {
        let (mrs, qps) = tessera_transport::rdma::verbs::live_counts();
        (Some(mrs as f64), Some(qps as f64))
    };
    #[cfg(not(feature = "rdma"))]
    let (mrs, qps) = (None, None);
    let requests = progress.iter().map(|p| p.load(Ordering::Acquire) as f64).sum();
    Reading { rss_bytes: rss_kib.unwrap_or(0.0) * 1024.0, fds: fds as f64, mrs, qps, requests, ..Reading::default() }
}

fn read(w: &Watched, progress: &[AtomicU64]) -> Result<Reading, String> {
    let Some(addr) = &w.metrics else { return Ok(read_self(progress)) };
    let text = try_scrape(addr).map_err(|e| format!("{} (incarnation {}): {e}", w.name, w.incarnation))?;
    let need = |name: &str| metric(&text, name, &[]).ok_or_else(|| format!("{}: no {name} at {addr}", w.name));
    let requests = metric(&text, "tessera_pushes_total", &[]).unwrap_or(0.0) + metric(&text, "tessera_pulls_total", &[]).unwrap_or(0.0);
    Ok(Reading {
        rss_bytes: need("tessera_process_resident_bytes")?,
        fds: need("tessera_process_open_fds")?,
        mrs: metric(&text, "tessera_rdma_memory_regions", &[]),
        qps: metric(&text, "tessera_rdma_queue_pairs", &[]),
        requests,
        checkpoint_age_s: w.data_dir.as_ref().and_then(|_| metric_max(&text, "tessera_checkpoint_age_seconds")),
        disk_bytes: w.data_dir.as_deref().map(dir_bytes),
        ..Reading::default()
    })
}

/// Reads every watched process each `period` from `epoch` until `stop`; returns the readings
/// and any read that failed.
fn sample(watch: &Mutex<Vec<Watched>>, progress: &[AtomicU64], epoch: Instant, period: Duration, stop: &AtomicBool) -> (Vec<Reading>, Vec<String>) {
    let (mut readings, mut failures) = (Vec::new(), Vec::new());
    let mut round = 0;
    while !stop.load(Ordering::Acquire) {
        let at = epoch + period * round as u32;
        while Instant::now() < at && !stop.load(Ordering::Acquire) {
            std::thread::sleep((at - Instant::now().min(at)).min(Duration::from_millis(100)));
        }
        let watched = watch.lock().unwrap();
        let t_s = epoch.elapsed().as_secs_f64();
        for w in watched.iter() {
            match read(w, progress) {
                Ok(r) => readings.push(Reading { name: w.name, incarnation: w.incarnation, round, t_s, ..r }),
                Err(e) => failures.push(format!("at {t_s:.0} s: {e}")),
            }
        }
        round += 1;
    }
    (readings, failures)
}

// --- the checks (pure; tested below) ----------------------------------------------------------------

/// A stretch of the run over which a process should hold steady: the same workers, the same
/// chains, warm.
#[derive(Debug, Clone, Copy)]
struct Window {
    name: &'static str,
    from_s: f64,
    to_s: f64,
}

/// What one process did over one window, and what in it looks like a leak.
#[derive(Debug, Clone, Default)]
struct Verdict {
    who: String,
    window: &'static str,
    samples: usize,
    /// Median RSS of the window's first third and of its last third, and the rise allowed.
    rss_first: f64,
    rss_last: f64,
    rss_allowed: f64,
    /// fds, then MRs and QPs where present: (name, lowest of the first third, of the last third).
    counts: Vec<(&'static str, f64, f64)>,
    /// Requests served over the window.
    requests: f64,
    failures: Vec<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn lowest(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(f64::INFINITY, f64::min)
}

/// The counts a reading carries: fds, and MRs and QPs where the process reports them.
fn counts_of(r: &Reading) -> Vec<(&'static str, f64)> {
    let mut out = vec![("fds", r.fds)];
    out.extend(r.mrs.map(|v| ("MRs", v)));
    out.extend(r.qps.map(|v| ("QPs", v)));
    out
}

/// Checks one process's readings (in time order) over `window`: RSS drift and count growth.
fn check_window(who: &str, readings: &[Reading], window: Window) -> Verdict {
    let inside: Vec<&Reading> = readings.iter().filter(|r| r.t_s >= window.from_s && r.t_s <= window.to_s).collect();
    let mut v = Verdict { who: who.to_string(), window: window.name, samples: inside.len(), ..Verdict::default() };
    if inside.len() < WINDOW_SAMPLES_MIN {
        v.failures.push(format!(
            "{who}, {}: {} samples in [{:.0}, {:.0}] s, fewer than {WINDOW_SAMPLES_MIN}: run longer",
            window.name,
            inside.len(),
            window.from_s,
            window.to_s
        ));
        return v;
    }
    let third = inside.len() / 3;
    let (first, last) = (&inside[..third], &inside[inside.len() - third..]);
    v.rss_first = median(first.iter().map(|r| r.rss_bytes).collect());
    v.rss_last = median(last.iter().map(|r| r.rss_bytes).collect());
    v.rss_allowed = (RSS_DRIFT_RATIO * v.rss_first).max(RSS_DRIFT_FLOOR_BYTES);
    if v.rss_last - v.rss_first > v.rss_allowed {
        v.failures.push(format!(
            "{who}, {}: RSS rose from {:.1} MiB to {:.1} MiB (median of the first and last thirds), more than the {:.1} MiB allowed",
            window.name,
            v.rss_first / MIB,
            v.rss_last / MIB,
            v.rss_allowed / MIB
        ));
    }
    for (i, (name, _)) in counts_of(inside[0]).into_iter().enumerate() {
        let pick = |rs: &[&Reading]| lowest(rs.iter().filter_map(|r| counts_of(r).get(i).map(|c| c.1)));
        let (a, b) = (pick(first), pick(last));
        if b > a {
            v.failures.push(format!("{who}, {}: {name} grew from {a} to {b} (lowest of the first and last thirds)", window.name));
        }
        v.counts.push((name, a, b));
    }
    v.requests = inside[inside.len() - 1].requests - inside[0].requests;
    v
}

/// How a process's counts after the failover must compare with those before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Across {
    /// The same: a server's or the coordinator's connections are to the same workers and peers.
    Equal,
    /// No more: the workers keep routing by the configuration they learned during the failover
    /// (nothing tells them of the rejoin), so they may hold fewer links than before, never more.
    NoMore,
}

/// Checks that a process that lived through the failover holds as many of each count after it
/// as before, or (`Across::NoMore`) no more (the lowest over each window).
fn check_counts_across(who: &str, readings: &[Reading], before: Window, after: Window, rule: Across) -> Vec<String> {
    let within = |w: Window| readings.iter().filter(move |r| r.t_s >= w.from_s && r.t_s <= w.to_s);
    let Some(first) = within(before).next() else { return vec![format!("{who}: no samples {}", before.name)] };
    let mut failures = Vec::new();
    for (i, (name, _)) in counts_of(first).into_iter().enumerate() {
        let pick = |w: Window| lowest(within(w).filter_map(|r| counts_of(r).get(i).map(|c| c.1)));
        let (a, b) = (pick(before), pick(after));
        if b > a || (rule == Across::Equal && b != a) {
            failures.push(format!("{who}: {name}: {a} {} and {b} {}; the workers and chains are the same", before.name, after.name));
        }
    }
    failures
}

/// The smallest leak per request served that would fail the RSS check over a window: the
/// medians of its thirds are two thirds of the window apart.
fn leak_limit_bytes(v: &Verdict) -> Option<f64> {
    (v.requests > 0.0).then(|| v.rss_allowed / (v.requests * 2.0 / 3.0))
}

// --- the report ---------------------------------------------------------------------------------------

/// The table's columns, in order.
const COLUMNS: [&str; 6] = ["coord", "s1", "s2", "s3", "D", "client"];

/// Prints the readings as one table: a row per round, for each process RSS (MiB), fds, MRs and
/// QPs (when any process reports them) and requests per second (the client: iterations per
/// second); `events` are noted on the row after them.
fn print_table(readings: &[Reading], events: &[(f64, String)]) {
    let rdma = readings.iter().any(|r| r.qps.is_some());
    let mut head = format!("{:>6}", "t s");
    for c in COLUMNS {
        let rate = if c == "client" { "it/s" } else { "req/s" };
        head += &if rdma { format!(" | {c:>6} {:>4} {:>4} {:>4} {rate:>6}", "fds", "MR", "QP") } else { format!(" | {c:>6} {:>4} {rate:>6}", "fds") };
    }
    println!("{head}   (RSS in MiB; D is the durable server: then its oldest checkpoint's age, s, and data directory, KiB)");
    let rounds = readings.iter().map(|r| r.round).max().map_or(0, |m| m + 1);
    let mut previous: BTreeMap<(&str, u32), &Reading> = BTreeMap::new();
    let mut last_t = f64::NEG_INFINITY;
    for round in 0..rounds {
        let row: Vec<&Reading> = readings.iter().filter(|r| r.round == round).collect();
        let Some(t) = row.first().map(|r| r.t_s) else { continue };
        let mut line = format!("{t:>6.0}");
        for c in COLUMNS {
            let Some(r) = row.iter().find(|r| r.name == c) else {
                line += &if rdma { format!(" | {:>6} {:>4} {:>4} {:>4} {:>6}", "-", "", "", "", "") } else { format!(" | {:>6} {:>4} {:>6}", "-", "", "") };
                continue;
            };
            let rate = previous.get(&(r.name, r.incarnation)).map_or("-".to_string(), |p| format!("{:.0}", (r.requests - p.requests) / (r.t_s - p.t_s)));
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
            line += &format!(" | {:>6.1} {:>4}", r.rss_bytes / MIB, r.fds);
            if rdma {
                line += &format!(" {:>4} {:>4}", opt(r.mrs), opt(r.qps));
            }
            line += &format!(" {rate:>6}");
            previous.insert((r.name, r.incarnation), r);
        }
        if let Some(d) = row.iter().find(|r| r.name == "D") {
            line += &format!("  ckpt {} disk {:.0}", d.checkpoint_age_s.map_or("-".into(), |a| format!("{a:.0}")), d.disk_bytes.unwrap_or(0.0) / 1024.0);
        }
        for (at, what) in events.iter().filter(|(at, _)| *at > last_t && *at <= t) {
            line += &format!("  <- {what} at {at:.1} s");
        }
        last_t = t;
        println!("{line}");
    }
}

fn print_verdict(v: &Verdict) {
    let counts: Vec<String> = v.counts.iter().map(|(n, a, b)| format!("{n} {a} -> {b}")).collect();
    let limit = leak_limit_bytes(v).map_or(String::new(), |b| format!("; a leak of {b:.0} B per request would fail"));
    println!(
        "  {:<10} {:<16} {:>3} samples: RSS {:.1} -> {:.1} MiB (allowed +{:.1}); {}; {:.0} requests{limit}",
        v.who,
        v.window,
        v.samples,
        v.rss_first / MIB,
        v.rss_last / MIB,
        v.rss_allowed / MIB,
        counts.join(", "),
        v.requests
    );
}

// --- the end: sums ----------------------------------------------------------------------------------

/// What every key must hold after `acked[w]` dense and `acked_sparse[w]` sparse pushes of each
/// worker `w`: the dense table's values, and each sparse key's two components.
fn expected(acked_dense: &[u64], acked_sparse: &[u64]) -> (Vec<f32>, BTreeMap<u64, [f64; 2]>) {
    let dense: Vec<f64> = (0..KEYS).map(|k| acked_dense.iter().enumerate().map(|(w, n)| *n as f64 * grad(w as u32, k) as f64).sum()).collect();
    let mut sparse = BTreeMap::<u64, [f64; 2]>::new();
    for (w, n) in acked_sparse.iter().enumerate() {
        let keys = sparse_keys(w as u32);
        for (k, g) in keys.iter().zip(sparse_grads(w as u32, &keys).chunks_exact(2)) {
            let sum = sparse.entry(*k).or_default();
            sum[0] += *n as f64 * g[0] as f64;
            sum[1] += *n as f64 * g[1] as f64;
        }
    }
    let top = dense.iter().chain(sparse.values().flatten()).fold(0.0f64, |m, v| m.max(*v));
    assert!(top < F32_EXACT_MAX, "sums reach {top}, past exact f32 integers: shorten the run or shrink the gradients");
    (dense.iter().map(|v| *v as f32).collect(), sparse)
}

/// Compares pulled values with [`expected`]; panics naming the first key that differs.
fn assert_sums(what: &str, dense: &[f32], sparse_keys: &[u64], sparse: &[f32], want: &(Vec<f32>, BTreeMap<u64, [f64; 2]>)) {
    for (k, (got, sum)) in dense.iter().zip(&want.0).enumerate() {
        assert_eq!(got, sum, "{what}: dense key {k}: an acknowledged push was lost or applied twice");
    }
    for (i, k) in sparse_keys.iter().enumerate() {
        let w = want.1[k];
        assert_eq!(&sparse[i * 2..i * 2 + 2], &[w[0] as f32, w[1] as f32], "{what}: sparse key {k}: an acknowledged push was lost or applied twice");
    }
}

fn check_cluster(rig: &Rig, knobs: &Knobs, want: &(Vec<f32>, BTreeMap<u64, [f64; 2]>)) {
    let refs: Vec<&str> = rig.plan.addrs.iter().map(String::as_str).collect();
    let checker = Client::connect(&refs, knobs.client(knobs.workers)).expect("connect the checker");
    let (w, emb) = (checker.table("w").unwrap(), checker.table("emb").unwrap());
    let mut dense = vec![0f32; KEYS as usize];
    checker.pull_range(&w, 0, &mut dense).and_then(|t| t.wait()).unwrap();
    let keys: Vec<u64> = want.1.keys().copied().collect();
    let mut sparse = vec![0f32; keys.len() * 2];
    checker.pull(&emb, &keys, &mut sparse).and_then(|t| t.wait()).unwrap();
    assert_sums("the cluster", &dense, &keys, &sparse, want);
}

fn check_durable(addr: &str, knobs: &Knobs, what: &str, want: &(Vec<f32>, BTreeMap<u64, [f64; 2]>)) {
    let checker = Client::connect(&[addr], knobs.client(knobs.workers)).expect("connect the checker");
    let (w, emb) = (checker.table("w").unwrap(), checker.table("emb").unwrap());
    let mut dense = vec![0f32; KEYS as usize];
    checker.pull_range(&w, 0, &mut dense).unwrap().wait().unwrap();
    let keys: Vec<u64> = want.1.keys().copied().collect();
    let mut sparse = vec![0f32; keys.len() * 2];
    checker.pull(&emb, &keys, &mut sparse).unwrap().wait().unwrap();
    assert_sums(what, &dense, &keys, &sparse, want);
}

// --- the soak -----------------------------------------------------------------------------------------

/// When each step of the failover happened, in seconds into the run.
#[derive(Debug, Clone, Copy, Default)]
struct Failover {
    killed_s: f64,
    out_s: f64,
    whole_s: f64,
    restarted_s: f64,
    healed_s: f64,
}

/// Kills the victim, waits for its chains to be whole without it, restarts it, and waits for it
/// to be back in exactly the chains it was in.
fn fail_over(rig: &mut Rig, epoch: Instant, events: &mut Vec<(f64, String)>, workers: &mut Workers) -> Failover {
    let node = VICTIM as u64 + 1;
    let before = status(&rig.plan.coordinator).expect("the coordinator's status");
    let (placed, _) = chains(&before);
    let old = incarnation(&before, node);
    let mut f = Failover::default();
    {
        let mut watch = rig.watch.lock().unwrap();
        watch.retain(|w| w.name != "s2");
        rig.servers[VICTIM].kill();
    }
    f.killed_s = epoch.elapsed().as_secs_f64();
    events.push((f.killed_s, "kill -9 s2".into()));
    wait_status(&rig.plan.coordinator, "s2 out of its chains", DETECT_WITHIN, |s| chains(s).0.iter().all(|c| !c.contains(&node)));
    f.out_s = epoch.elapsed().as_secs_f64();
    events.push((f.out_s, "s2 out of every chain".into()));
    let want = rig.plan.knobs.replicas.min(SERVERS - 1);
    wait_status(&rig.plan.coordinator, "every chain whole without s2", HEAL_WITHIN, |s| {
        let (chains, learning) = chains(s);
        !learning && chains.iter().all(|c| c.len() == want && !c.contains(&node))
    });
    f.whole_s = epoch.elapsed().as_secs_f64();
    events.push((f.whole_s, format!("every chain has {want} nodes again")));
    run_until(Instant::now() + rig.plan.knobs.degraded(), workers);
    let (server, watched) = rig.plan.start_server(VICTIM, 2);
    rig.servers[VICTIM] = server;
    rig.watch.lock().unwrap().push(watched);
    f.restarted_s = epoch.elapsed().as_secs_f64();
    events.push((f.restarted_s, "s2 restarted".into()));
    wait_status(&rig.plan.coordinator, "s2 back in its chains", HEAL_WITHIN, |s| {
        let (chains, learning) = chains(s);
        !learning && chains == placed && incarnation(s, node).is_some_and(|i| Some(i) != old)
    });
    f.healed_s = epoch.elapsed().as_secs_f64();
    events.push((f.healed_s, "s2 back in its chains".into()));
    f
}

/// The longest iteration of any worker that was under way at `t_s`.
fn pause_at(done: &[Done], t_s: f64) -> f64 {
    done.iter().flat_map(|d| &d.stalls).filter(|(at, took)| *at <= t_s && at + took >= t_s).map(|(_, took)| *took).fold(0.0, f64::max)
}

#[test]
#[ignore = "a soak of minutes: run it with --ignored (see the file's docs for the command)"]
fn soak_training_with_checkpoints_and_a_failover() {
    let knobs = Knobs::from_env();
    #[cfg(not(feature = "rdma"))]
    assert!(knobs.transport != TransportKind::Rdma, "SOAK_TRANSPORT=rdma needs a build with RDMA: cargo test --all-features");
    println!("soak: {knobs:?}");
    let mut rig = Rig::start(&knobs);
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = Arc::new(AtomicBool::new(false));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..knobs.workers).map(|_| AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let sampler = {
        let (watch, progress, sampling, period) = (rig.watch.clone(), progress.clone(), sampling.clone(), knobs.sample);
        std::thread::spawn(move || sample(&watch, &progress, epoch, period, &sampling))
    };
    let mut workers: Workers = (0..knobs.workers)
        .map(|w| {
            let (knobs, cluster, durable, stop, progress) =
                (knobs.clone(), rig.plan.addrs.clone(), rig.durable.addr().to_string(), stop.clone(), progress.clone());
            std::thread::spawn(move || work(w, &knobs, &cluster, &durable, &stop, epoch, &progress[w as usize]))
        })
        .collect();
    let mut events = Vec::new();
    run_until(epoch + knobs.run / 2, &mut workers);
    let failover = fail_over(&mut rig, epoch, &mut events, &mut workers);
    run_until(epoch + knobs.run, &mut workers);
    // Sampling ends first, so that every reading is of processes under load.
    sampling.store(true, Ordering::Release);
    let (readings, scrape_failures) = sampler.join().expect("the sampler");
    let end_s = epoch.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let done: Vec<Done> = workers.into_iter().map(|h| h.join().expect("a worker panicked").unwrap_or_else(|e| panic!("{e}"))).collect();

    print_table(&readings, &events);
    let acked = |i: usize| done.iter().map(|d| d.acked[i]).collect::<Vec<u64>>();
    let want_cluster = expected(&acked(0), &acked(1));
    check_cluster(&rig, &knobs, &want_cluster);
    let want_durable = expected(&acked(2), &acked(3));
    check_durable(rig.durable.addr(), &knobs, "the durable server", &want_durable);
    let checkpoints = crash_and_recover_durable(&mut rig, &knobs, &want_durable);

    let config_id = status(&rig.plan.coordinator).and_then(|s| s["config"]["id"].as_u64());
    report_run(&knobs, &done, failover, end_s, &checkpoints, config_id);
    let mut failures = scrape_failures;
    failures.extend(check_readings(&knobs, &readings, failover, end_s));
    failures.extend(check_workers(&knobs, &done));
    // Workers look at the configuration again at least once a second, so each ends on the
    // coordinator's, with the restarted server back in their routes.
    if let Some(id) = config_id {
        let stale: Vec<u64> = done.iter().map(|d| d.view_id).filter(|v| *v != id).collect();
        if !stale.is_empty() {
            failures.push(format!("workers ended routing by configurations {stale:?}, the coordinator's is {id}"));
        }
    }
    assert!(failures.is_empty(), "the soak found:\n  {}", failures.join("\n  "));
    println!("soak passed");
}

/// Kills the durable server, verifies its data directory, and restarts it on it: it must
/// recover the same sums. Returns `tessera checkpoint verify`'s report.
fn crash_and_recover_durable(rig: &mut Rig, knobs: &Knobs, want: &(Vec<f32>, BTreeMap<u64, [f64; 2]>)) -> String {
    rig.durable.kill();
    let data = rig.plan.data_path();
    let verified = run_tool(&["checkpoint", "verify", &data], Duration::from_secs(120));
    assert!(verified.status.success(), "tessera checkpoint verify failed after the soak:\n{}{}", verified.stdout, verified.stderr);
    let (durable, _) = rig.plan.start_durable();
    rig.durable = durable;
    let recovered: Vec<String> = rig.durable.log().lines().filter(|l| l.contains("recovered")).map(String::from).collect();
    println!("the durable server, killed with kill -9 and restarted:\n  {}", recovered.join("\n  "));
    check_durable(rig.durable.addr(), knobs, "the durable server after kill -9 and recovery", want);
    verified.stdout
}

/// Prints what the workers did and how the failover went.
fn report_run(knobs: &Knobs, done: &[Done], f: Failover, end_s: f64, checkpoints: &str, config_id: Option<u64>) {
    let total = |i: usize| done.iter().map(|d| d.acked[i]).sum::<u64>();
    println!(
        "soak over {} for {end_s:.0} s with {} workers: acknowledged and verified exactly: cluster {} dense + {} sparse pushes, durable server {} dense + {} sparse pushes",
        knobs.transport,
        knobs.workers,
        total(0),
        total(1),
        total(2),
        total(3)
    );
    println!(
        "failover: kill -9 s2 at {:.1} s; out of every chain after {:.2} s; every chain whole again after {:.2} s; restarted at {:.1} s, back in its chains {:.2} s later",
        f.killed_s,
        f.out_s - f.killed_s,
        f.whole_s - f.killed_s,
        f.restarted_s,
        f.healed_s - f.restarted_s
    );
    println!(
        "longest worker iteration under way at the kill: {:.2} s; at the restart: {:.2} s; at the rejoin: {:.2} s",
        pause_at(done, f.killed_s),
        pause_at(done, f.restarted_s),
        pause_at(done, f.healed_s)
    );
    let mut stalls: Vec<(f64, f64)> = done.iter().flat_map(|d| d.stalls.iter().copied()).collect();
    stalls.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = stalls.iter().take(8).map(|(at, took)| format!("{took:.2} s at {at:.0} s")).collect();
    println!("{} iterations over {STALL:?}; the longest: {}", stalls.len(), top.join(", "));
    let stat = |f: fn(&ChainStats) -> u64| done.iter().map(|d| f(&d.stats)).sum::<u64>();
    println!(
        "cluster requests: {} over RDMA slots, {} over TCP; {} refreshes, {} resends, {} reroutes, {} pull retries; durable server over {}",
        stat(|s| s.rdma_calls),
        stat(|s| s.tcp_calls),
        stat(|s| s.refreshes),
        stat(|s| s.resends),
        stat(|s| s.rerouted),
        stat(|s| s.pull_retries),
        done[0].durable_transport
    );
    let views: Vec<u64> = done.iter().map(|d| d.view_id).collect();
    println!("configuration the workers routed by at the end: {views:?}; the coordinator's: {}", config_id.map_or("unknown".into(), |i| i.to_string()));
    let short = |i: usize| done.iter().map(|d| d.short_reads[i]).sum::<u64>();
    println!("pulls that read less than the worker's own acknowledged pushes: cluster {}, durable server {}", short(0), short(1));
    let latest: Vec<&str> = checkpoints.lines().filter(|l| l.trim_start().starts_with("checkpoint")).collect();
    println!("the durable server's data directory after the soak (tessera checkpoint verify): {}", latest.join(";"));
}

/// Every leak check over the readings; prints each window's verdict.
fn check_readings(knobs: &Knobs, readings: &[Reading], f: Failover, end_s: f64) -> Vec<String> {
    let before = Window { name: "before failover", from_s: knobs.warm_up_s(), to_s: f.killed_s };
    let after = Window { name: "after failover", from_s: f.healed_s + knobs.rewarm_s(), to_s: end_s };
    let whole = Window { name: "whole run", from_s: knobs.warm_up_s(), to_s: end_s };
    let of = |name: &str, incarnation: u32| readings.iter().filter(|r| r.name == name && r.incarnation == incarnation).cloned().collect::<Vec<_>>();
    let mut failures = Vec::new();
    let mut verdicts = Vec::new();
    for name in ["coord", "s1", "s3", "client"] {
        let series = of(name, 1);
        verdicts.push(check_window(name, &series, before));
        verdicts.push(check_window(name, &series, after));
        let rule = if name == "client" { Across::NoMore } else { Across::Equal };
        failures.extend(check_counts_across(name, &series, before, after, rule));
    }
    verdicts.push(check_window("s2", &of("s2", 1), before));
    verdicts.push(check_window("s2 (new)", &of("s2", 2), after));
    let durable = of("D", 1);
    verdicts.push(check_window("D", &durable, whole));
    if knobs.transport == TransportKind::Rdma && readings.iter().any(|r| r.name != "client" && r.qps.is_none()) {
        failures.push("an RDMA run whose servers export no tessera_rdma_queue_pairs: build tessera with --features rdma".into());
    }
    println!("steady windows (warm-up {:.0} s; again {:.0} s after the failover healed):", knobs.warm_up_s(), knobs.rewarm_s());
    for v in &verdicts {
        print_verdict(v);
        failures.extend(v.failures.iter().cloned());
    }
    failures.extend(check_checkpoints(knobs, &durable, whole));
    // The restarted server may serve none: the workers do not learn of its rejoin (see Across).
    for v in verdicts.iter().filter(|v| ["s1", "s2", "s3"].contains(&v.who.as_str())) {
        if v.requests <= 0.0 {
            failures.push(format!("{} served no request {}", v.who, v.window));
        }
    }
    failures
}

/// The durable server checkpointed all along: no shard's checkpoint older than three intervals.
fn check_checkpoints(knobs: &Knobs, durable: &[Reading], window: Window) -> Vec<String> {
    let ages: Vec<f64> = durable.iter().filter(|r| r.t_s >= window.from_s && r.t_s <= window.to_s).filter_map(|r| r.checkpoint_age_s).collect();
    let oldest = ages.iter().copied().fold(0.0, f64::max);
    let disk: Vec<f64> = durable.iter().filter_map(|r| r.disk_bytes).collect();
    let (low, high) = (lowest(disk.iter().copied()), disk.iter().copied().fold(0.0, f64::max));
    println!(
        "durable server: oldest checkpoint seen after warm-up {oldest:.0} s (interval {} s); data directory {:.0} to {:.0} KiB",
        knobs.checkpoint_s,
        low / 1024.0,
        high / 1024.0
    );
    if ages.is_empty() {
        return vec!["the durable server reported no checkpoint age".into()];
    }
    let bound = 3.0 * knobs.checkpoint_s as f64;
    if oldest > bound {
        return vec![format!("the durable server went {oldest:.0} s without a checkpoint (interval {} s)", knobs.checkpoint_s)];
    }
    Vec::new()
}

/// The workers read what they had pushed, and over RDMA mostly used RDMA.
fn check_workers(knobs: &Knobs, done: &[Done]) -> Vec<String> {
    let mut failures = Vec::new();
    let short: u64 = done.iter().map(|d| d.short_reads[1]).sum();
    if short > 0 {
        failures.push(format!("{short} pulls from the durable server read less than the worker had pushed and seen acknowledged"));
    }
    if knobs.transport == TransportKind::Rdma {
        let (rdma, tcp) = (done.iter().map(|d| d.stats.rdma_calls).sum::<u64>(), done.iter().map(|d| d.stats.tcp_calls).sum::<u64>());
        if rdma <= tcp {
            failures.push(format!("an RDMA run whose workers used TCP for {tcp} cluster requests and RDMA for {rdma}"));
        }
        if done.iter().any(|d| d.durable_transport != "rdma") {
            failures.push("an RDMA run whose workers reached the durable server over TCP".into());
        }
    }
    failures
}

// --- the checks, on synthetic series ------------------------------------------------------------------

/// A series of `n` readings, one a second, with RSS and fds from `f(i)`.
fn synthetic(n: usize, f: impl Fn(usize) -> (f64, f64, Option<f64>)) -> Vec<Reading> {
    (0..n)
        .map(|i| {
            let (rss_bytes, fds, qps) = f(i);
            Reading { name: "s1", incarnation: 1, round: i, t_s: i as f64, rss_bytes, fds, qps, mrs: qps, requests: 1000.0 * i as f64, ..Reading::default() }
        })
        .collect()
}

const ALL: Window = Window { name: "test", from_s: 0.0, to_s: 1e9 };

#[test]
fn steady_series_with_noise_and_transients_pass() {
    // RSS jitters by ±2 % and has one peak of +30 % (a snapshot); fds go up by 3 now and then
    // (a checkpoint's files, a scrape), and QPs are constant.
    let series = synthetic(40, |i| {
        let jitter = [0.0, 0.02, -0.02, 0.01][i % 4];
        let peak = if i == 30 { 0.3 } else { 0.0 };
        (64.0 * MIB * (1.0 + jitter + peak), if i % 7 == 3 { 48.0 } else { 45.0 }, Some(12.0))
    });
    let v = check_window("s1", &series, ALL);
    assert!(v.failures.is_empty(), "{:?}", v.failures);
    assert_eq!(v.counts, vec![("fds", 45.0, 45.0), ("MRs", 12.0, 12.0), ("QPs", 12.0, 12.0)]);
    assert!(leak_limit_bytes(&v).is_some_and(|b| b > 0.0));
}

#[test]
fn a_growing_rss_fails() {
    // 64 MiB growing by 0.5 % a sample: +20 % over the window.
    let series = synthetic(40, |i| (64.0 * MIB * (1.0 + 0.005 * i as f64), 45.0, None));
    let v = check_window("s1", &series, ALL);
    assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
    assert!(v.failures[0].contains("RSS rose"), "{:?}", v.failures);
    // A small process is held to the floor instead: +3 MiB passes, +5 MiB fails.
    let small = |grow: f64| synthetic(30, move |i| (6.0 * MIB + grow * MIB * i as f64 / 29.0, 10.0, None));
    assert!(check_window("coord", &small(3.0), ALL).failures.is_empty());
    assert!(!check_window("coord", &small(8.0), ALL).failures.is_empty());
}

#[test]
fn leaking_descriptors_or_queue_pairs_fail() {
    // One fd more every fourth sample, under transients.
    let fds = synthetic(30, |i| (64.0 * MIB, 45.0 + (i / 4) as f64 + if i % 5 == 0 { 2.0 } else { 0.0 }, None));
    let v = check_window("s1", &fds, ALL);
    assert!(v.failures.iter().any(|f| f.contains("fds grew")), "{:?}", v.failures);
    // A QP that a failed peer's link left behind: steady within each window, one more after.
    let qps = synthetic(40, |i| (64.0 * MIB, 45.0, Some(if i < 20 { 12.0 } else { 13.0 })));
    let (before, after) = (Window { name: "before", from_s: 0.0, to_s: 19.0 }, Window { name: "after", from_s: 20.0, to_s: 40.0 });
    assert!(check_window("s1", &qps, before).failures.is_empty());
    assert!(check_window("s1", &qps, after).failures.is_empty());
    let failures = check_counts_across("s1", &qps, before, after, Across::Equal);
    assert_eq!(failures.len(), 2, "MRs and QPs: {failures:?}");
    assert!(failures[1].contains("QPs: 12 before and 13 after"), "{failures:?}");
    let same = synthetic(40, |_| (64.0 * MIB, 45.0, Some(12.0)));
    assert!(check_counts_across("s1", &same, before, after, Across::Equal).is_empty());
    // A client that holds fewer links after passes under `NoMore`, one that holds more fails.
    let fewer = synthetic(40, |i| (64.0 * MIB, if i < 20 { 150.0 } else { 124.0 }, None));
    assert!(check_counts_across("client", &fewer, before, after, Across::NoMore).is_empty());
    assert_eq!(check_counts_across("client", &fewer, before, after, Across::Equal).len(), 1);
    assert_eq!(check_counts_across("client", &qps, before, after, Across::NoMore).len(), 2);
}

#[test]
fn a_window_with_too_few_samples_fails() {
    let series = synthetic(40, |_| (64.0 * MIB, 45.0, None));
    let short = Window { name: "short", from_s: 10.0, to_s: 13.0 };
    let v = check_window("s1", &series, short);
    assert!(v.failures.iter().any(|f| f.contains("run longer")), "{:?}", v.failures);
}

#[test]
fn expected_sums_add_every_workers_pushes() {
    let (dense, sparse) = expected(&[2, 3], &[1, 0]);
    assert_eq!(dense[0], 2.0 * grad(0, 0) + 3.0 * grad(1, 0));
    assert_eq!(sparse.len(), (SPARSE_SHARED + 2 * SPARSE_OWN) as usize);
    let own = sparse_keys(1)[SPARSE_SHARED as usize];
    assert_eq!(sparse[&own], [0.0, 0.0], "worker 1 made no sparse push");
}
