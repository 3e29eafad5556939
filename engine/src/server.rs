//! A whole server: shard threads pinned to cores, and the control plane.
//!
//! The control thread owns the listener and the catalog. It answers hellos, catalog, table
//! creation and status requests, and hands each data connection to the shard it names. Table
//! creation reaches the shards through bounded channels; each shard maps its part on its own
//! thread, so the pages are local to its core.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender};
use tessera_layout::catalog::{Catalog, Part, ServerInfo, TableEntry, TableSpec};
use tessera_layout::placement;
use tessera_replication::protocol::{ClusterView, NodeId};
use tessera_replication::ReplicationConfig;
use tessera_transport::{
    select, Dialer, Op, RdmaConfig, Reply, Request, Service, ShardTransport, Status, TransportConfig, TransportError, TransportKind, Waker,
};

use crate::chain::outbox::Outbox;
use crate::chain::{ChainShard, Identity, Locator};
use crate::config::{Durability, EngineConfig};
use crate::error::{EngineError, Result};
use crate::persist::checkpoint::store::Written;
use crate::persist::durable::RecoveryReport;
use crate::shard::{Shard, ShardControl, ShardStats};
use crate::updater::UpdaterRegistry;

/// Control messages waiting for one shard before the control plane blocks (and before a peer's
/// acknowledgements handed over from its replies are dropped, to be resent).
const SHARD_CONTROL_QUEUE_MAX: usize = 1024;
/// How long the control plane waits for a shard to map a table or report.
const SHARD_REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a shard may take to load its checkpoint and replay its log.
const SHARD_RECOVERY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Everything a server is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on, e.g. `0.0.0.0:7070`; port 0 picks a free one.
    pub listen: String,
    pub engine: EngineConfig,
    pub transport: TransportConfig,
    /// TCP, RDMA, or RDMA where a device exists.
    pub transport_kind: TransportKind,
    pub rdma: RdmaConfig,
    /// Tables created at start-up.
    pub tables: Vec<TableSpec>,
    /// Join a cluster kept by a coordinator; `None` runs a standalone server: a cluster of its
    /// own whose every range is on a chain of one, this server, under a fixed configuration
    /// ([`alone_replication`]).
    pub replication: Option<Join>,
}

/// How a server joins a replicated cluster.
#[derive(Debug, Clone)]
pub struct Join {
    /// This server's node id: stable across its restarts, distinct from every other server's.
    pub node: u32,
    /// Where its coordinator is.
    pub coordinator: Locator,
    /// Where peers and workers reach this server, when not the address it listens on.
    pub advertise: Option<String>,
}

impl ServerConfig {
    /// A single-server configuration listening on `listen`.
    pub fn single(listen: &str) -> Self {
        Self {
            listen: listen.into(),
            engine: EngineConfig::default(),
            transport: TransportConfig::default(),
            transport_kind: TransportKind::Auto,
            rdma: RdmaConfig::default(),
            tables: Vec::new(),
            replication: None,
        }
    }
}

#[derive(Debug, Clone)]
struct ShardHandle {
    tx: Sender<ShardControl>,
    waker: Waker,
}

/// A running server. Dropping it stops it.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    shards: Vec<ShardHandle>,
    control_waker: Waker,
    threads: Vec<JoinHandle<()>>,
    recovery: Vec<RecoveryReport>,
}

impl Server {
    /// Binds, starts one pinned thread per shard, creates the configured tables, and serves.
    pub fn start(cfg: ServerConfig, registry: UpdaterRegistry) -> Result<Server> {
        cfg.engine.validate()?;
        let io = |e: tessera_transport::TransportError| EngineError::Io(e.to_string());
        let view = match &cfg.replication {
            Some(join) => fetch_cluster(join, &cfg)?,
            None => ClusterView { replication: alone_replication(&cfg.engine), config: None },
        };
        let rcfg = view.replication.clone();
        let cluster_file = cfg.engine.data_dir.as_ref().filter(|_| cfg.engine.durability != Durability::None).map(|d| d.join(CLUSTER_NAME_FILE));
        let named = cluster_file.as_deref().map(read_cluster_name).transpose()?.flatten();
        // The cluster served: a standalone server's is its data directory's, or drawn now.
        let cluster = match (&cfg.replication, &view.config) {
            (None, _) => named.unwrap_or_else(tessera_coordinator::new_cluster_name),
            (Some(_), Some(config)) if config.cluster != 0 => config.cluster,
            (Some(_), _) => named.unwrap_or(0),
        };
        let chosen = select::choose(cfg.transport_kind, &cfg.rdma).map_err(io)?;
        let info = ServerInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            shards: cfg.engine.shards,
            frame_bytes_max: cfg.transport.frame_bytes_max as u64,
            workers_max: cfg.engine.workers_max,
            rdma: chosen.name() == "rdma",
            cluster,
            alone: cfg.replication.is_none(),
        };
        let info_bytes: Arc<[u8]> = serde_json::to_vec(&info).expect("plain data serialises").into();
        let bound = select::bind_server(&cfg.listen, cfg.engine.shards, &cfg.transport, info_bytes, &chosen, &cfg.rdma);
        let select::BoundServer { control: mut control_ep, shards: shard_eps, addr } = bound.map_err(io)?;
        let engine = Arc::new(cfg.engine.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let cores = allowed_cores();
        let mut threads = Vec::new();
        let mut shards = Vec::new();
        let mut inboxes = Vec::new();
        for ep in &shard_eps {
            let (tx, rx) = channel::bounded(SHARD_CONTROL_QUEUE_MAX);
            shards.push(ShardHandle { tx, waker: ep.waker() });
            inboxes.push(rx);
        }
        let dialer = Dialer { cfg: cfg.transport.clone(), chosen: chosen.clone(), rdma: cfg.rdma.clone(), required: cfg.transport_kind == TransportKind::Rdma };
        let joined = match &cfg.replication {
            Some(join) => Membership::Joined(join),
            None => Membership::Alone { cluster },
        };
        let (me, outbox) = start_chain(joined, view.config.as_ref(), rcfg.clone(), addr, dialer, &shards, stop.clone(), cluster_file.as_deref(), named)?;
        let shard_count = shard_eps.len() as u16;
        let catalog_behind = Arc::new(AtomicBool::new(false));
        for ((id, mut ep), rx) in shard_eps.into_iter().enumerate().zip(inboxes) {
            let recovering = cfg.engine.durability != Durability::None && cfg.engine.data_dir.is_some();
            let chain = ChainShard::new(id as u16, shard_count, &me, rcfg.clone(), outbox.clone(), recovering, catalog_behind.clone());
            let shard = Shard::new(id as u16, engine.clone(), rx, chain);
            let core = (cfg.engine.pin_cores && !cores.is_empty()).then(|| cores[(cfg.engine.first_core + id) % cores.len()]);
            let spawned = std::thread::Builder::new().name(format!("tessera-shard-{id}")).spawn(move || {
                if let Some(core) = core {
                    pin_to(core);
                }
                shard.run(ep.as_mut());
            });
            threads.push(spawned.map_err(|e| EngineError::Io(format!("cannot start a shard thread: {e}")))?);
        }
        let catalog_file = cfg.engine.data_dir.clone().filter(|_| cfg.engine.durability != Durability::None).map(|d| d.join(CATALOG_FILE));
        let mut control = ControlPlane {
            info,
            catalog: Catalog { tables: Vec::new() },
            registry,
            shards: shards.clone(),
            catalog_file,
            recovery: Vec::new(),
            chain: (rcfg.clone(), outbox),
        };
        let mut server = Server { addr, stop: stop.clone(), shards, control_waker: control_ep.waker(), threads, recovery: Vec::new() };
        crate::crash::point("startup.bound");
        control.recover()?;
        crate::crash::point("startup.recovered");
        server.recovery.clone_from(&control.recovery);
        for spec in cfg.tables {
            control.create_table(spec)?;
        }
        if let Some(join) = &cfg.replication {
            control.sync_catalog(join, &rcfg, &cfg.transport)?;
        }
        let flag = stop.clone();
        let joined = cfg.replication.clone().map(|join| (join, rcfg.clone()));
        let transport = cfg.transport.clone();
        let thread = std::thread::Builder::new().name("tessera-control".into()).spawn(move || {
            let mut synced_at: Option<std::time::Instant> = None;
            while !flag.load(Ordering::Acquire) {
                if let Err(e) = control_ep.poll(&mut control, Some(Duration::from_millis(100))) {
                    tracing::error!(error = %e, "control poll failed");
                }
                // A peer's update named a table this server lacks (it missed its creation):
                // make the cluster's tables, at most once a second. The peer sends it again.
                let Some((join, rcfg)) = joined.as_ref() else { continue };
                if synced_at.is_none_or(|at| at.elapsed() >= CATALOG_SYNC_GAP) && catalog_behind.swap(false, Ordering::AcqRel) {
                    synced_at = Some(std::time::Instant::now());
                    tracing::warn!("a peer's update names a table this server lacks: making the cluster's tables");
                    if let Err(e) = control.sync_catalog(join, rcfg, &transport) {
                        tracing::error!(error = %e, "cannot make the cluster's tables");
                    }
                }
            }
        });
        server.threads.push(thread.map_err(|e| EngineError::Io(format!("cannot start the control thread: {e}")))?);
        tracing::info!(%addr, shards = server.shards.len(), transport = chosen.name(), "serving");
        Ok(server)
    }

    /// What each shard recovered from the data directory at start-up (empty without durability).
    pub fn recovery(&self) -> &[RecoveryReport] {
        &self.recovery
    }

    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server stops (it stops when dropped from another thread or on shutdown).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops every thread and waits for them.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.control_waker.wake();
        for s in &self.shards {
            // A full queue means the shard is busy with control work; it will still see the flag
            // once it drains, so block briefly rather than skip.
            let _ = s.tx.send_timeout(ShardControl::Shutdown, Duration::from_secs(5));
            s.waker.wake();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_threads();
        }
    }
}

/// The catalog's file in the data directory: the tables, so that a restarted server makes the
/// same ones (same ids, same parts) before its shards load their checkpoints.
pub const CATALOG_FILE: &str = "catalog.json";

/// A replicated server's file in its data directory naming the cluster the data belongs to
/// ([`ClusterConfig::cluster`](tessera_replication::protocol::ClusterConfig::cluster)), as 16
/// hex digits: written when the server first hears its cluster's configuration, and checked at
/// every start after.
pub const CLUSTER_NAME_FILE: &str = "cluster-name";

/// The cluster named in `path` ([`CLUSTER_NAME_FILE`]), if the file exists.
fn read_cluster_name(path: &std::path::Path) -> Result<Option<u64>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EngineError::Disk { op: "read", path: path.display().to_string(), reason: e.to_string() }),
    };
    let name = u64::from_str_radix(text.trim(), 16).ok().filter(|n| *n != 0);
    let bad = || EngineError::Corrupt { what: path.display().to_string(), reason: format!("{text:?} is not a cluster's name (16 hex digits)") };
    name.map(Some).ok_or_else(bad)
}

/// Refuses a data directory that belongs to another cluster than `config`'s: its parameters,
/// versions and clocks are that cluster's, and must not mix into this one.
fn check_cluster_name(path: &std::path::Path, mine: Option<u64>, config: &tessera_replication::protocol::ClusterConfig, coordinator: &Locator) -> Result<()> {
    match mine {
        Some(mine) if config.cluster != 0 && mine != config.cluster => Err(EngineError::BadConfig {
            field: "data_dir",
            value: path.parent().unwrap_or(path).display().to_string(),
            reason: format!(
                "it holds the data of cluster {mine:016x} (its {CLUSTER_NAME_FILE} file), and the coordinator at {coordinator} leads cluster {:016x}: \
                 start this server against its own cluster's coordinator, or with an empty data directory to join this cluster as a new server",
                config.cluster
            ),
        }),
        _ => Ok(()),
    }
}

/// What the catalog file holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct CatalogFile {
    /// Set only in files of servers that split tables by a fixed list of servers, which servers
    /// no longer do: such a file is refused, not read as a whole table's.
    #[serde(default, skip_serializing)]
    pub servers: Option<u32>,
    pub shards: u16,
    /// Every table, its id its place in the list.
    pub tables: Vec<TableSpec>,
}

impl CatalogFile {
    /// Why no server can recover from this file, if none can: it was written by one of several
    /// servers of a fixed list, each holding part of every table. Recovery refuses it, and
    /// `tessera checkpoint verify` says so.
    pub fn foreign_layout(&self) -> Option<String> {
        self.servers.filter(|n| *n != 1).map(|servers| {
            format!("it was written by one of {servers} servers of a fixed list, each holding part of every table, which servers no longer form; its tables cannot be recovered as a standalone server's")
        })
    }
}

/// The control plane's state, owned by the control thread.
struct ControlPlane {
    info: ServerInfo,
    catalog: Catalog,
    registry: UpdaterRegistry,
    shards: Vec<ShardHandle>,
    /// Where the catalog is kept, when the server keeps anything on disk.
    catalog_file: Option<std::path::PathBuf>,
    /// What each shard recovered at start-up.
    recovery: Vec<RecoveryReport>,
    /// The cluster's replication settings, and the server's outbox (its link to the
    /// coordinator, if it has one, and to its peers).
    chain: (ReplicationConfig, Outbox),
}

impl ControlPlane {
    /// Remakes the tables the catalog file names, then has every shard load its newest
    /// checkpoint and replay its log. Says what was recovered. The catalog file is read, never
    /// written: the tables it names are made in memory only, so a crash at any point of
    /// recovery leaves the files as they were.
    fn recover(&mut self) -> Result<()> {
        let Some(path) = self.catalog_file.clone() else { return Ok(()) };
        let disk_err = |op, e: std::io::Error| EngineError::Disk { op, path: path.display().to_string(), reason: e.to_string() };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let file: CatalogFile =
                    serde_json::from_slice(&bytes).map_err(|e| EngineError::Corrupt { what: path.display().to_string(), reason: e.to_string() })?;
                let shards = self.info.shards;
                let refuse = |reason| EngineError::BadConfig { field: "data_dir", value: path.display().to_string(), reason };
                if let Some(reason) = file.foreign_layout() {
                    return Err(refuse(reason));
                }
                if file.shards != shards {
                    return Err(refuse(format!(
                        "it was written by a server with {} shards; this one has {shards} (start with --shards {})",
                        file.shards, file.shards
                    )));
                }
                crate::crash::point("recovery.catalog_read");
                for spec in file.tables {
                    self.place_table(spec)?;
                    crate::crash::point("recovery.table_made");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(disk_err("read", e)),
        }
        let mut waiting = Vec::new();
        for shard in 0..self.shards.len() {
            let (done, rx) = channel::bounded(1);
            self.send(shard as u16, ShardControl::Recover { done })?;
            waiting.push(rx);
        }
        for (shard, rx) in waiting.into_iter().enumerate() {
            let report = rx.recv_timeout(SHARD_RECOVERY_TIMEOUT).map_err(|_| EngineError::Io(format!("shard {shard} did not finish recovery")))??;
            if let Some(r) = report {
                tracing::info!(
                    shard,
                    checkpoint = ?r.checkpoint,
                    checkpoint_lsn = r.checkpoint_lsn,
                    records_replayed = r.records_replayed,
                    next_lsn = r.next_lsn,
                    log = %r.log_end,
                    tables = ?r.tables,
                    "recovered"
                );
                for f in &r.fallbacks {
                    tracing::warn!(shard, "passed over {f}");
                }
                self.recovery.push(r);
            }
        }
        Ok(())
    }

    /// Writes the catalog file: to a temporary name, fsynced, renamed, and the directory fsynced.
    fn save_catalog(&self) -> Result<()> {
        let Some(path) = &self.catalog_file else { return Ok(()) };
        let file = CatalogFile { servers: None, shards: self.info.shards, tables: self.catalog.tables.iter().map(|t| t.spec.clone()).collect() };
        let bytes = serde_json::to_vec_pretty(&file).expect("plain data");
        crate::persist::disk::replace_file(path, &bytes, Some(["catalog.written", "catalog.renamed"]))
    }

    /// Has every shard take a checkpoint now, all at once; what each wrote.
    fn checkpoint(&self) -> Result<Vec<Option<Written>>> {
        let mut waiting = Vec::new();
        for shard in 0..self.shards.len() {
            let (done, rx) = channel::bounded(1);
            self.send(shard as u16, ShardControl::Checkpoint { done })?;
            waiting.push(rx);
        }
        let answer =
            |(shard, rx): (usize, Receiver<_>)| rx.recv_timeout(SHARD_REPLY_TIMEOUT).map_err(|_| EngineError::Io(format!("shard {shard} did not answer")))?;
        waiting.into_iter().enumerate().map(answer).collect()
    }

    /// Creates `spec` on every shard, or on none, and records it in the catalog file: a failure
    /// drops the parts already made.
    fn create_table(&mut self, spec: TableSpec) -> Result<TableEntry> {
        spec.validate().map_err(|e| EngineError::BadTable { name: spec.name.clone(), reason: e.to_string() })?;
        if let Some(existing) = self.catalog.tables.iter().find(|t| t.spec.name == spec.name) {
            return if existing.spec == spec { Ok(existing.clone()) } else { Err(EngineError::TableConflict { name: spec.name }) };
        }
        let entry = self.place_table(spec)?;
        crate::crash::point("table.parts_made");
        if let Err(e) = self.save_catalog() {
            // The table exists in memory; a restart would not know it. Say so, and undo.
            self.catalog.tables.pop();
            for part in &entry.parts {
                let _ = self.send(part.shard, ShardControl::DropTable { id: entry.id });
            }
            return Err(e);
        }
        Ok(entry)
    }

    /// Makes `spec`'s parts on the shards (all, or none) and adds it to the catalog in memory,
    /// under the next id.
    fn place_table(&mut self, spec: TableSpec) -> Result<TableEntry> {
        spec.validate().map_err(|e| EngineError::BadTable { name: spec.name.clone(), reason: e.to_string() })?;
        let updater = self.registry.build(&spec.updater)?;
        let id = self.catalog.tables.len() as u32;
        let ranges = self.chain.0.ranges;
        let parts: Vec<Part> = (0..self.info.shards)
            .map(|shard| (shard, placement::replicated_part(&spec, ranges, self.info.shards, shard)))
            .filter(|(_, keys)| !keys.is_empty())
            .map(|(shard, keys)| Part { start: keys.start, end: keys.end, shard })
            .collect();
        let mut waiting = Vec::new();
        for part in &parts {
            let (done, rx) = channel::bounded(1);
            let msg = ShardControl::AddTable { id, spec: spec.clone(), part: *part, updater: updater.clone(), done };
            self.send(part.shard, msg)?;
            waiting.push((part.shard, rx));
        }
        let mut failure = None;
        let mut made = Vec::new();
        for (shard, rx) in waiting {
            match rx.recv_timeout(SHARD_REPLY_TIMEOUT) {
                Ok(Ok(())) => made.push(shard),
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some(EngineError::Io(format!("shard {shard} did not answer"))),
            }
        }
        if let Some(e) = failure {
            for shard in made {
                let _ = self.send(shard, ShardControl::DropTable { id });
            }
            return Err(e);
        }
        let entry = TableEntry { id, spec, parts };
        tracing::info!(table = %entry.spec.name, id, parts = entry.parts.len(), "table created");
        self.catalog.tables.push(entry.clone());
        Ok(entry)
    }

    fn send(&self, shard: u16, msg: ShardControl) -> Result<()> {
        let handle = &self.shards[shard as usize];
        handle.tx.send_timeout(msg, SHARD_REPLY_TIMEOUT).map_err(|_| EngineError::ShuttingDown)?;
        handle.waker.wake();
        Ok(())
    }

    fn status(&self) -> Result<Vec<ShardStats>> {
        let mut out = Vec::new();
        for shard in 0..self.shards.len() {
            let (done, rx) = channel::bounded(1);
            self.send(shard as u16, ShardControl::Stats { done })?;
            out.push(rx.recv_timeout(SHARD_REPLY_TIMEOUT).map_err(|_| EngineError::Io(format!("shard {shard} did not answer")))?);
        }
        Ok(out)
    }

    fn serve_control(&mut self, req: &Request<'_>, reply: &mut Reply<'_>) -> Result<()> {
        match req.header.op() {
            Some(Op::Catalog) => reply.ok_bytes(&json(&self.catalog)),
            Some(Op::CreateTable) => {
                let spec: TableSpec =
                    serde_json::from_slice(req.body).map_err(|e| EngineError::BadTable { name: "?".into(), reason: format!("bad table definition: {e}") })?;
                let entry = self.create_table(spec)?;
                reply.ok_bytes(&json(&entry));
            }
            Some(Op::ClusterConfig) => {
                let (rcfg, outbox) = &self.chain;
                let view = ClusterView { replication: rcfg.clone(), config: outbox.latest().map(|c| (*c).clone()) };
                reply.ok_bytes(&json(&view));
            }
            Some(Op::Status) => {
                let status = StatusReport { info: self.info.clone(), catalog: self.catalog.clone(), shards: self.status()?, recovery: self.recovery.clone() };
                reply.ok_bytes(&json(&status));
            }
            Some(Op::Checkpoint) => {
                if self.catalog_file.is_none() {
                    return Err(EngineError::BadRequest {
                        reason: "this server keeps nothing on disk; start it with --durability checkpoint or wal and --data-dir".into(),
                    });
                }
                reply.ok_bytes(&json(&self.checkpoint()?));
            }
            _ => return Err(EngineError::BadRequest { reason: "data requests go to a shard connection: say hello with a shard index".into() }),
        }
        Ok(())
    }
}

/// What `tessera status` receives.
#[derive(Debug, serde::Serialize)]
pub struct StatusReport {
    pub info: ServerInfo,
    pub catalog: Catalog,
    pub shards: Vec<ShardStats>,
    /// What each shard recovered at start-up (empty without durability).
    pub recovery: Vec<RecoveryReport>,
}

/// A control reply body.
fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("control replies are plain data")
}

impl Service for ControlPlane {
    fn serve(&mut self, request: Request<'_>, reply: &mut Reply<'_>) {
        if let Err(e) = self.serve_control(&request, reply) {
            let status = if e.status() == Status::Ok { Status::Internal } else { e.status() };
            reply.error(status, &e.to_string());
        }
    }
}

impl ControlPlane {
    /// Makes a replicated server's tables the cluster's, id for id: tables are numbered in the
    /// order they are made, and replicated updates and snapshots name them by number. Asks the
    /// members (the first that answers) for their catalog, makes the tables this server lacks
    /// (made at run time while it was away, or before it first joined), in order, and refuses
    /// to start when a table of the same number differs (a data directory or `--tables` of
    /// another cluster). With no member answering (the cluster's first server, or a whole
    /// cluster starting again), the server keeps what it has.
    fn sync_catalog(&mut self, join: &Join, rcfg: &ReplicationConfig, transport: &TransportConfig) -> Result<()> {
        // A member that is down costs a failure-detection time at most.
        let mut quick = transport.clone();
        quick.io_timeout_ms = rcfg.failure_timeout_ms.max(100);
        quick.hello_timeout_ms = rcfg.failure_timeout_ms.max(100);
        let Some(config) = join.coordinator.resolve().and_then(|addr| ask_cluster(&addr, &quick)).ok().and_then(|view| view.config) else {
            return Ok(());
        };
        for member in config.members.iter().filter(|m| m.node.0 != join.node) {
            let Ok(body) = tessera_transport::ask(&member.addr, Op::Catalog, &[], &quick) else { continue };
            let Ok(theirs) = serde_json::from_slice::<Catalog>(&body) else { continue };
            for entry in theirs.tables {
                match self.catalog.tables.get(entry.id as usize) {
                    Some(mine) if mine.spec == entry.spec => {}
                    Some(mine) => {
                        let reason = format!(
                            "table {} is {:?} here but {:?} on member {} ({}): tables are numbered in the order they are made, so this server's --tables or data directory is not this cluster's",
                            entry.id, mine.spec.name, entry.spec.name, member.node.0, member.addr
                        );
                        return Err(EngineError::BadConfig { field: "tables", value: mine.spec.name.clone(), reason });
                    }
                    None => {
                        tracing::info!(table = %entry.spec.name, id = entry.id, from = %member.addr, "making a table the cluster has");
                        let made = self.create_table(entry.spec)?;
                        debug_assert_eq!(made.id, entry.id, "ids are dense and taken in order");
                    }
                }
            }
            return Ok(());
        }
        Ok(())
    }
}

/// Shortest time between two catalog syncs a peer's update naming an unknown table asks for.
const CATALOG_SYNC_GAP: Duration = Duration::from_secs(1);

/// How long a replicated server waits for its coordinator at start-up.
const COORDINATOR_WAIT: Duration = Duration::from_secs(30);

/// Asks the coordinator for the cluster (its replication settings, and its configuration once it
/// is born), waiting for it to come up.
fn fetch_cluster(join: &Join, cfg: &ServerConfig) -> Result<ClusterView> {
    let deadline = std::time::Instant::now() + COORDINATOR_WAIT;
    loop {
        let asked = join.coordinator.resolve().and_then(|addr| ask_cluster(&addr, &cfg.transport));
        match asked {
            Ok(view) => return Ok(view),
            // Waiting does not mend a wrong secret: say so now.
            Err(EngineError::Unauthenticated { reason }) => {
                return Err(EngineError::Unauthenticated { reason: format!("the coordinator at {}: {reason}", join.coordinator) })
            }
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(EngineError::Io(format!("the coordinator at {} did not answer within {COORDINATOR_WAIT:?}: {e}", join.coordinator)))
            }
            Err(e) => {
                tracing::info!(coordinator = %join.coordinator, error = %e, "waiting for the coordinator");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The cluster as the server or coordinator at `addr` sees it.
pub fn ask_cluster(addr: &str, transport: &TransportConfig) -> Result<ClusterView> {
    let body = tessera_transport::ask(addr, Op::ClusterConfig, &[], transport).map_err(|e| match e {
        TransportError::AuthFailed { .. } => EngineError::Unauthenticated { reason: e.to_string() },
        e => EngineError::Io(e.to_string()),
    })?;
    serde_json::from_slice(&body).map_err(|e| EngineError::Io(format!("a malformed cluster view: {e}")))
}

/// The replication settings of a standalone server: one copy of every range, one range per
/// shard, and room for the workers its engine allows. (A cluster cuts its tables into many
/// ranges so that servers can take them over a few at a time; a standalone server never hands
/// a range over, and every range a push reaches costs a piece of its own on the wire.)
pub fn alone_replication(engine: &EngineConfig) -> ReplicationConfig {
    let workers = engine.workers_max.min(tessera_replication::config::WORKERS_MAX);
    ReplicationConfig { replicas: 1, ranges: u32::from(engine.shards), workers, ..ReplicationConfig::default() }
}

/// Node id of a standalone server: the only member of its cluster.
const ALONE_NODE: u32 = 1;

/// Starts the server's replication traffic: who it is, and its outbox, which hands each newer
/// configuration to every shard. Joined to a coordinator (`join`), once a configuration shows
/// the server drained (`tessera drain`: draining, and in no chain) or drained and gone, it
/// stops (sets `stop`). Without one, the server is its own cluster: a configuration that puts
/// it alone on every range's chain, numbered by the time it starts so that a restarted
/// server's is the newer, is handed to the shards at once and never changes.
/// Peers are reached as `dialer` says: over RDMA when this server and the peer both serve it.
/// `cluster_file` ([`CLUSTER_NAME_FILE`], with a data directory) names the cluster the data
/// directory belongs to: a server of another cluster is refused, and one with none yet writes
/// its cluster's name there once it hears it.
#[allow(clippy::too_many_arguments)]
fn start_chain(
    membership: Membership<'_>,
    config: Option<&tessera_replication::protocol::ClusterConfig>,
    rcfg: ReplicationConfig,
    addr: SocketAddr,
    dialer: Dialer,
    shards: &[ShardHandle],
    stop: Arc<AtomicBool>,
    cluster_file: Option<&std::path::Path>,
    named: Option<u64>,
) -> Result<(Identity, Outbox)> {
    let join = match membership {
        Membership::Joined(join) => Some(join),
        Membership::Alone { .. } => None,
    };
    if let (Some(path), Some(config), Some(join)) = (cluster_file, config, join) {
        check_cluster_name(path, named, config, &join.coordinator)?;
    }
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let incarnation = (since_epoch.as_nanos() as u64).max(1);
    let advertised = join.and_then(|j| j.advertise.clone()).unwrap_or_else(|| addr.to_string());
    let node = NodeId(join.map_or(ALONE_NODE, |j| j.node));
    let me = Identity { node, incarnation, addr: advertised, cluster: named.unwrap_or(0) };
    // Peers that stop answering cost a replication link no more than a failure-detection time.
    let mut dialer = dialer;
    dialer.cfg.io_timeout_ms = rcfg.failure_timeout_ms.max(100);
    dialer.cfg.hello_timeout_ms = rcfg.failure_timeout_ms.max(100);
    let handles = shards.to_vec();
    // The newest configuration seen, and whether the data directory names its cluster.
    let newest = std::sync::Mutex::new((0u64, named.is_some() || cluster_file.is_none()));
    let cluster_file = cluster_file.map(std::path::Path::to_path_buf);
    let on_config = Arc::new(move |config: Arc<tessera_replication::protocol::ClusterConfig>| {
        let mut seen = newest.lock().expect("no panics under this lock");
        if !seen.1 && config.cluster != 0 {
            let path = cluster_file.as_deref().expect("set when there is a file to write");
            match crate::persist::disk::replace_file(path, format!("{:016x}\n", config.cluster).as_bytes(), None) {
                Ok(()) => {
                    tracing::info!(cluster = format!("{:016x}", config.cluster), path = %path.display(), "the data directory now belongs to this cluster");
                    seen.1 = true;
                }
                Err(e) => tracing::error!(error = %e, "cannot record the cluster's name in the data directory; trying again at the next configuration"),
            }
        }
        if config.id > seen.0 {
            seen.0 = config.id;
            if config.left(node, incarnation) && !stop.swap(true, Ordering::AcqRel) {
                tracing::warn!(node = node.0, config = config.id, "drained: this server holds no range any more, and stops");
                for h in &handles {
                    let _ = h.tx.try_send(ShardControl::Shutdown);
                    h.waker.wake();
                }
            }
        }
        drop(seen);
        for h in &handles {
            // A shard too busy to take it gets the next one: configurations are whole.
            let _ = h.tx.try_send(ShardControl::Config(config.clone()));
            h.waker.wake();
        }
    });
    let handles = shards.to_vec();
    let on_replied = Arc::new(move |shard: u16, peer: NodeId, msg: tessera_replication::protocol::Msg| {
        if let Some(h) = handles.get(shard as usize) {
            // A shard too busy to take it has it resent: acknowledgements are cumulative.
            let _ = h.tx.try_send(ShardControl::Replied { peer, msg });
            h.waker.wake();
        }
    });
    let (Membership::Alone { cluster }, None) = (membership, join) else {
        let join = join.expect("joined");
        tracing::info!(node = join.node, incarnation, addr = %me.addr, coordinator = %join.coordinator, "joining a replicated cluster");
        return Ok((me.clone(), Outbox::start(me.node, join.coordinator.clone(), dialer, on_config, on_replied)));
    };
    {
        let member = tessera_replication::protocol::Member { node, incarnation, addr: me.addr.clone(), draining: false };
        let born = tessera_replication::coordinator::Coordinator::new(rcfg, cluster, vec![member], 0);
        let fixed = tessera_replication::protocol::ClusterConfig { id: (since_epoch.as_millis() as u64).max(1), ..(**born.config()).clone() };
        tracing::info!(cluster = format!("{cluster:016x}"), addr = %me.addr, "standalone: every range on a chain of one, this server");
        let outbox = Outbox::alone(me.node, dialer, Arc::new(fixed.clone()), on_replied);
        on_config(Arc::new(fixed));
        Ok((me, outbox))
    }
}

/// How a server takes part in a cluster.
#[derive(Debug, Clone, Copy)]
enum Membership<'j> {
    /// Joined to a coordinator's cluster.
    Joined(&'j Join),
    /// A cluster of its own, named `cluster`, under a fixed configuration.
    Alone { cluster: u64 },
}

/// The cores this process may run on.
fn allowed_cores() -> Vec<usize> {
    match rustix::process::sched_getaffinity(None) {
        Ok(set) => (0..rustix::process::CpuSet::MAX_CPU).filter(|c| set.is_set(*c)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins the calling thread to the core after those a pinned server's `shards` shards take (they
/// take the allowed cores in order), so a client thread in the same process (`tessera bench`)
/// spins on a core of its own, as perftest's pinned pair does. Returns the core, or `None` when
/// the process may use no core beyond the shards'.
pub fn pin_beside_shards(shards: usize) -> Option<usize> {
    let cores = allowed_cores();
    let core = *cores.get(shards)?;
    pin_to(core);
    Some(core)
}

/// Pins the calling thread to `core`; a refusal (containers, cgroups) is logged and ignored.
fn pin_to(core: usize) {
    let mut set = rustix::process::CpuSet::new();
    set.set(core);
    if let Err(e) = rustix::process::sched_setaffinity(None, &set) {
        tracing::warn!(core, error = %e, "cannot pin shard thread; running unpinned");
    }
}
