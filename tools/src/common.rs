//! What several subcommands share: logging, server options, address lists.

use anyhow::{Context, Result};
use clap::Args;
use tessera_client::{Client, ClientConfig};
use tessera_coordinator::{ConfigStore, CoordinatorHandle, Embedded};
use tessera_engine::chain::Locator;
use tessera_engine::config::Durability;
use tessera_engine::server::Join;
use tessera_engine::{EngineConfig, Server, ServerConfig, UpdaterRegistry};
use tessera_layout::TableSpec;
use tessera_replication::ReplicationConfig;
use tessera_transport::auth::ClusterSecret;
use tessera_transport::{RdmaConfig, TransportConfig, TransportKind};

/// Sends logs to stderr, filtered by `filter`: as text, or as one JSON object per line (with
/// the spans each event happened in).
pub fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    if json {
        fmt.json().with_span_list(true).init();
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
}

/// The cluster's shared secret, for servers, workers and every tool that talks to them.
#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// File holding the cluster's shared secret (at least 16 bytes; make one with
    /// `head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`). A server given one serves
    /// only peers that prove they hold it (an HMAC challenge on every connection, before any
    /// table, address or rkey is sent); clients and tools given one talk only to servers that
    /// prove the same. Give every server, worker and tool of a cluster the same file.
    #[arg(long = "cluster-secret-file", env = "TESSERA_CLUSTER_SECRET_FILE", value_name = "FILE", value_parser = read_secret)]
    pub cluster_secret: Option<ClusterSecret>,
}

fn read_secret(path: &str) -> Result<ClusterSecret, String> {
    ClusterSecret::from_file(std::path::Path::new(path)).map_err(|e| e.to_string())
}

impl SecretArgs {
    /// Transport settings that carry the secret.
    pub fn transport(&self) -> TransportConfig {
        TransportConfig { cluster_secret: self.cluster_secret.clone(), ..TransportConfig::default() }
    }

    /// A tool's client configuration (it takes no worker id of its own).
    /// A tool sends a few control requests: over TCP always, so that it never depends on a
    /// server's RDMA settings (its slot size, say) nor sets up queue pairs for them.
    pub fn tool_client(&self) -> ClientConfig {
        ClientConfig { transport: self.transport(), kind: TransportKind::Tcp, ..ClientConfig::worker(u32::MAX) }
    }
}

/// Which transport carries the traffic, for servers and workers alike.
#[derive(Debug, Clone, Args)]
pub struct TransportArgs {
    #[command(flatten)]
    pub secret: SecretArgs,
    /// tcp, rdma, or auto: RDMA where this build and machine have a device (and the server serves
    /// it), TCP otherwise, said in one line. `rdma` fails instead of falling back.
    #[arg(long, default_value = "auto")]
    pub transport: TransportKind,
    /// RDMA device, e.g. mlx5_0 or rxe0 (default: $RDMA_DEV, else the first device).
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// RDMA GID index (RoCEv2 over IPv4: usually 1 on rxe, 3 on ConnectX; default: $RDMA_GID_INDEX, else 1).
    #[arg(long)]
    pub rdma_gid_index: Option<u8>,
    /// RDMA slots per worker and shard: the most requests in flight on one link.
    #[arg(long, default_value_t = RdmaConfig::default().slots)]
    pub rdma_slots: u32,
    /// Bytes per RDMA slot: the largest frame over RDMA (larger calls are split).
    #[arg(long, default_value_t = RdmaConfig::default().slot_bytes)]
    pub rdma_slot_bytes: usize,
    /// Register RDMA memory in regions of at most this many bytes (default: the device's limit).
    #[arg(long)]
    pub rdma_mr_bytes_max: Option<u64>,
    /// Microseconds a poller spins on its completion queue before it sleeps. Longer spins cut
    /// latency and burn a core; perftest spins forever.
    #[arg(long, default_value_t = RdmaConfig::default().spin_us)]
    pub rdma_spin_us: u64,
    /// How a side sees that an RDMA request or reply landed: `memory` polls the tag written
    /// after each frame and takes completions after serving it (lower latency); `completion`
    /// takes each write's completion first, for a device that may place a write's bytes out of
    /// address order.
    #[arg(long, value_enum, default_value_t = ArrivalArg::Memory)]
    pub rdma_arrival: ArrivalArg,
}

/// `--rdma-arrival`: see [`tessera_transport::Arrival`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArrivalArg {
    Memory,
    Completion,
}

impl From<ArrivalArg> for tessera_transport::Arrival {
    fn from(a: ArrivalArg) -> Self {
        match a {
            ArrivalArg::Memory => Self::Memory,
            ArrivalArg::Completion => Self::Completion,
        }
    }
}

impl TransportArgs {
    /// The RDMA knobs.
    pub fn rdma(&self) -> RdmaConfig {
        RdmaConfig {
            device: self.rdma_device.clone(),
            gid_index: self.rdma_gid_index,
            mr_bytes_max: self.rdma_mr_bytes_max,
            slots: self.rdma_slots,
            slot_bytes: self.rdma_slot_bytes,
            spin_us: self.rdma_spin_us,
            arrival: self.rdma_arrival.into(),
        }
    }

    /// A worker's client configuration.
    pub fn client(&self, worker: u32) -> ClientConfig {
        ClientConfig { kind: self.transport, rdma: self.rdma(), transport: self.secret.transport(), ..ClientConfig::worker(worker) }
    }
}

/// Options for a server, embedded or standalone.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Shards (threads pinned to cores). Default: one per core.
    #[arg(long)]
    pub shards: Option<u16>,
    /// Workers each table's vector clocks track; pushes from higher worker ids are refused. Every
    /// dense block carries this many clock entries for one-sided reads, so keep it near the job's
    /// worker count.
    #[arg(long, default_value_t = EngineConfig::default().workers_max)]
    pub workers_max: u32,
    /// Bytes of values per dense block: the unit one-sided RDMA reads check for tearing. Smaller
    /// blocks make small reads cheaper and large ones dearer (each block also carries 16 bytes of
    /// versions and 4 bytes of clock per worker).
    #[arg(long, default_value_t = EngineConfig::default().dense_block_bytes)]
    pub dense_block_bytes: usize,
    /// Largest frame accepted, in bytes (requests and replies).
    #[arg(long, default_value_t = tessera_transport::config::FRAME_BYTES_MAX_DEFAULT)]
    pub frame_bytes_max: usize,
    /// Most connections the server holds open (workers hold one per shard, plus one to the
    /// control plane); more are refused with a message naming this flag.
    #[arg(long, default_value_t = TransportConfig::default().connections_max)]
    pub connections_max: usize,
    /// Bytes of replies a client connection may leave unread before the server stops reading
    /// its requests (over TCP; over RDMA the slots bound it): what one client has in flight.
    #[arg(long, default_value_t = TransportConfig::default().reply_backlog_bytes_max)]
    pub client_backlog_bytes_max: usize,
    /// A client that reads none of its replies for this long, with its backlog full, is
    /// disconnected, and the log says why.
    #[arg(long, default_value_t = TransportConfig::default().stall_timeout_ms)]
    pub client_stall_timeout_ms: u64,
    /// A connection that sends nothing for this long (after its hello, with no reply waiting)
    /// is closed; 0 never closes one. Minutes by default, since a worker may compute for long
    /// between pushes; connections that set up RDMA are exempt (their traffic is over verbs).
    #[arg(long, default_value_t = TransportConfig::default().idle_timeout_ms)]
    pub client_idle_timeout_ms: u64,
    /// Once a frame's first byte arrived, the rest must follow within this many milliseconds
    /// (plus a second per --frame-bytes-per-s-min bytes of the frame), or the connection is closed.
    #[arg(long, default_value_t = TransportConfig::default().frame_timeout_ms)]
    pub frame_timeout_ms: u64,
    /// The slowest rate, in bytes a second, at which a large frame may arrive.
    #[arg(long, default_value_t = TransportConfig::default().frame_bytes_per_s_min)]
    pub frame_bytes_per_s_min: usize,
    /// Most connections open at once from one IP address; more are refused with a message
    /// naming this flag. A worker holds one per shard of each server, plus one to the control plane.
    #[arg(long, default_value_t = TransportConfig::default().connections_per_peer_max)]
    pub connections_per_peer_max: usize,
    /// Connections the kernel queues before the server accepts them (the listen backlog, at
    /// most 65535). Linux caps it at net.core.somaxconn (sysctl); the server warns when it asks
    /// for more.
    #[arg(long, default_value_t = TransportConfig::default().listen_backlog)]
    pub listen_backlog: u32,
    /// Pin each shard thread to its own core. The default for `tessera server`. In `tessera
    /// bench`, also pins the bench's worker to the next core, as perftest pins its pair.
    #[arg(long, conflicts_with = "no_pin")]
    pub pin: bool,
    /// Do not pin shard threads. The default for the server `demo` and `bench` embed, whose own
    /// worker threads share the same cores (pinning them measured slower there).
    #[arg(long)]
    pub no_pin: bool,
    /// What survives a crash: `none` (memory only), `checkpoint` (lose at most one
    /// --checkpoint-interval-s), or `wal` (every push is logged and fsynced before it is
    /// acknowledged; nothing acknowledged is lost). Anything but `none` needs --data-dir.
    #[arg(long, default_value_t = Durability::None)]
    pub durability: Durability,
    /// Directory for checkpoints, logs and the catalog (one subdirectory per shard). A server
    /// started on a directory that holds them recovers from it.
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Seconds between checkpoints; 0 takes them only on demand (`tessera checkpoint`).
    #[arg(long, default_value_t = EngineConfig::default().checkpoint_interval_s)]
    pub checkpoint_interval_s: u64,
    /// Bytes of each of a shard's two log buffers; a push whose log record is larger is refused
    /// in `wal` mode.
    #[arg(long, default_value_t = EngineConfig::default().wal_buffer_bytes)]
    pub wal_buffer_bytes: usize,
    /// Write logs and checkpoints with pwrite/fsync even where io_uring works (the fallback the
    /// server takes by itself where io_uring is missing or disabled).
    #[arg(long)]
    pub disk_blocking: bool,
    /// Start even when recovery finds acknowledged data it cannot read: a log damaged before
    /// later commits, a gap between logs, a corrupt checkpoint no log covers, or a checkpoint
    /// the catalog does not know. The server then serves what precedes the damage and keeps
    /// what it could not replay beside it (`*.log.damaged`, `*.log.unreplayed`), never deleted.
    /// Without it such a server refuses to start and names the damage; run `tessera checkpoint
    /// verify DATA_DIR` first.
    #[arg(long)]
    pub accept_data_loss: bool,
    /// Keys of repeated key lists each shard remembers per connection, so a worker can send a
    /// list again by its hash (8 bytes a key; least recently used lists go first); 0 turns the
    /// cache off, and workers then send their keys every time.
    #[arg(long, default_value_t = EngineConfig::default().key_cache_keys)]
    pub key_cache_keys: usize,
    /// Most clock segments one range of a table may split into (a segment is a run of keys
    /// whose workers' clocks agree); a push that would split a range further is refused.
    #[arg(long, default_value_t = EngineConfig::default().clock_segments_max)]
    pub clock_segments_max: usize,
}

impl EngineArgs {
    /// A server configuration for `listen` with these options; `pin_default` applies when neither
    /// `--pin` nor `--no-pin` was given.
    pub fn server_config(&self, listen: &str, tables: Vec<TableSpec>, pin_default: bool, net: &TransportArgs) -> ServerConfig {
        let mut engine = EngineConfig::default();
        if let Some(shards) = self.shards {
            engine.shards = shards;
        }
        engine.workers_max = self.workers_max;
        engine.dense_block_bytes = self.dense_block_bytes;
        engine.pin_cores = self.pin || (pin_default && !self.no_pin);
        engine.durability = self.durability;
        engine.data_dir.clone_from(&self.data_dir);
        engine.checkpoint_interval_s = self.checkpoint_interval_s;
        engine.wal_buffer_bytes = self.wal_buffer_bytes;
        engine.disk_force_blocking = self.disk_blocking;
        engine.recovery_accept_loss = self.accept_data_loss;
        engine.key_cache_keys = self.key_cache_keys;
        engine.clock_segments_max = self.clock_segments_max;
        let transport = TransportConfig {
            frame_bytes_max: self.frame_bytes_max,
            connections_max: self.connections_max,
            reply_backlog_bytes_max: self.client_backlog_bytes_max,
            stall_timeout_ms: self.client_stall_timeout_ms,
            idle_timeout_ms: self.client_idle_timeout_ms,
            frame_timeout_ms: self.frame_timeout_ms,
            frame_bytes_per_s_min: self.frame_bytes_per_s_min,
            connections_per_peer_max: self.connections_per_peer_max,
            listen_backlog: self.listen_backlog,
            ..net.secret.transport()
        };
        ServerConfig { listen: listen.into(), engine, transport, transport_kind: net.transport, rdma: net.rdma(), tables, replication: None }
    }
}

/// Splits `a,b,c` into addresses.
pub fn addresses(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// Reads a `--tables` file: TOML with one `[[table]]` per table.
pub fn read_tables(path: &std::path::Path) -> Result<Vec<TableSpec>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        table: Vec<TableSpec>,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: File = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(file.table)
}

/// Where a replicated cluster keeps its configuration when it is kept in etcd.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. 127.0.0.1:2379): the cluster's configuration is kept
    /// there, and its coordinator is whichever `tessera coordinator` holds etcd's election.
    /// Needs a build with `--features etcd`.
    #[arg(long)]
    pub etcd: Option<String>,
    /// The cluster's name in etcd: its keys are under /tessera/NAME/.
    #[arg(long, default_value = "tessera")]
    pub etcd_cluster: String,
}

impl EtcdArgs {
    /// Where a server or `tessera status` finds the coordinator: etcd's election winner, or
    /// `coordinator` (an address).
    pub fn locator(&self, coordinator: Option<&str>) -> Result<Option<Locator>> {
        match (&self.etcd, coordinator) {
            (Some(_), Some(_)) => anyhow::bail!("give --coordinator ADDR or --etcd ENDPOINTS, not both"),
            (None, coordinator) => Ok(coordinator.map(|a| Locator::At(a.to_string()))),
            (Some(endpoints), None) => self.etcd_locator(endpoints).map(Some),
        }
    }

    /// Where a coordinator keeps the configuration: etcd, or its own memory.
    pub fn store(&self) -> Result<Box<dyn ConfigStore>> {
        match &self.etcd {
            None => Ok(Box::new(Embedded)),
            Some(endpoints) => self.etcd_store(endpoints),
        }
    }

    #[cfg(feature = "etcd")]
    fn etcd_locator(&self, endpoints: &str) -> Result<Locator> {
        let etcd = tessera_coordinator::etcd::Etcd::connect(endpoints, &self.etcd_cluster)?;
        Ok(Locator::Etcd(etcd))
    }

    #[cfg(feature = "etcd")]
    fn etcd_store(&self, endpoints: &str) -> Result<Box<dyn ConfigStore>> {
        let etcd = tessera_coordinator::etcd::Etcd::connect(endpoints, &self.etcd_cluster)?;
        Ok(Box::new(tessera_coordinator::etcd::EtcdStore::new(etcd)))
    }

    #[cfg(not(feature = "etcd"))]
    fn etcd_locator(&self, _endpoints: &str) -> Result<Locator> {
        anyhow::bail!("{NO_ETCD}")
    }

    #[cfg(not(feature = "etcd"))]
    fn etcd_store(&self, _endpoints: &str) -> Result<Box<dyn ConfigStore>> {
        anyhow::bail!("{NO_ETCD}")
    }
}

#[cfg(not(feature = "etcd"))]
const NO_ETCD: &str =
    "this tessera was built without etcd support: rebuild it with `cargo build --release --features etcd` (which needs protoc: apt install protobuf-compiler)";

/// Asks the servers at `addrs` through `ask`, one address at a time, for answers it returns as
/// (server address, answer): a standalone server answers for itself, a member of a cluster for
/// every member, whose addresses are then not asked again. Each server's answer comes once, in
/// the order met. `what` names the request in errors.
pub fn ask_each<T>(
    addrs: &[String],
    secret: &SecretArgs,
    what: &str,
    ask: impl Fn(&Client) -> tessera_client::Result<Vec<(String, T)>>,
) -> Result<Vec<(String, T)>> {
    let mut answers: Vec<(String, T)> = Vec::new();
    for addr in addrs {
        if answers.iter().any(|(answered, _)| answered == addr) {
            continue;
        }
        let asked = Client::connect(&[addr.as_str()], secret.tool_client()).and_then(|client| ask(&client));
        for (server, answer) in asked.with_context(|| format!("asking {addr} for {what}"))? {
            if !answers.iter().any(|(answered, _)| *answered == server) {
                answers.push((server, answer));
            }
        }
    }
    Ok(answers)
}

/// A replicated cluster started in this process (`tessera demo --servers`, `tessera bench
/// --replicas`): an embedded coordinator and `servers` servers sharing this machine's cores.
#[derive(Debug, Clone, Copy)]
pub struct Cluster {
    pub servers: u32,
    /// Servers in each range's chain.
    pub replicas: u32,
    /// Ranges the key space is cut into; `None`: [`RANGES_PER_SHARD`] per shard of the cluster.
    pub ranges: Option<u32>,
    pub workers: u32,
}

/// Ranges per shard of a cluster started in this process, unless told otherwise. A push or pull
/// of listed keys sends one piece to every range its keys fall in, and each piece costs its
/// header and a step of its chain's replica: a sparse batch of the demo touches every range, so
/// ranges beyond a few per shard cost time and buy no balance (three servers of one shard: 16
/// ranges gave 0.72-0.84 of one server's examples/s, 6 gave 0.96).
pub const RANGES_PER_SHARD: u32 = 2;

impl Cluster {
    /// Starts the coordinator and the servers, each holding `spec`; the servers join as they
    /// start, and the coordinator gives every range its chain once all have.
    pub fn start(&self, engine: &EngineArgs, net: &TransportArgs, spec: &TableSpec) -> Result<(CoordinatorHandle, Vec<Server>)> {
        if self.replicas == 0 {
            anyhow::bail!("--replicas must be at least 1");
        }
        let shards = self.shards_per_server(engine);
        let rcfg = ReplicationConfig { replicas: self.replicas, ranges: self.ranges(engine), workers: self.workers.max(1), ..ReplicationConfig::default() };
        rcfg.validate().map_err(|e| anyhow::anyhow!("bad replication options: {e}"))?;
        let transport = net.secret.transport();
        let coordinator =
            CoordinatorHandle::start("127.0.0.1:0", rcfg, self.servers, &transport, Box::new(Embedded)).context("starting the embedded coordinator")?;
        let mut servers = Vec::new();
        for node in 1..=self.servers {
            let mut cfg = engine.server_config("127.0.0.1:0", vec![spec.clone()], false, net);
            cfg.engine.shards = shards;
            cfg.engine.workers_max = cfg.engine.workers_max.max(self.workers);
            // Pinned (--pin), each server's shards take the cores after the last one's.
            cfg.engine.first_core = (node - 1) as usize * cfg.engine.shards as usize;
            // Each server keeps its disk in its own directory under --data-dir.
            cfg.engine.data_dir = engine.data_dir.as_ref().map(|dir| dir.join(format!("node-{node}")));
            cfg.replication = Some(Join { node, coordinator: Locator::At(coordinator.local_addr().to_string()), advertise: None });
            servers.push(Server::start(cfg, UpdaterRegistry::new()).with_context(|| format!("starting replicated server {node}"))?);
        }
        Ok((coordinator, servers))
    }

    /// Shards of each server: `--shards`, or this machine's cores shared among the servers.
    pub fn shards_per_server(&self, engine: &EngineArgs) -> u16 {
        engine.shards.unwrap_or_else(|| (tessera_engine::config::available_cores() / self.servers.max(1) as usize).clamp(1, u16::MAX as usize) as u16)
    }

    /// The ranges the cluster is cut into: as given, or [`RANGES_PER_SHARD`] per shard.
    pub fn ranges(&self, engine: &EngineArgs) -> u32 {
        self.ranges.unwrap_or_else(|| self.servers.saturating_mul(u32::from(self.shards_per_server(engine))).saturating_mul(RANGES_PER_SHARD))
    }
}
