//! One shard: the tables it owns and the request handler that serves them.
//!
//! The shard is a [`Service`]: the transport hands it requests and it answers in place. It does
//! not know which transport carries them. It runs on its own pinned thread and is the only one to
//! touch its tables, so the data path takes no locks; the control plane reaches it only through a
//! bounded channel and the transport's waker.

use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};
use rustc_hash::FxHashMap;
use tessera_layout::catalog::{Part, TableSpec};
use tessera_transport::expose::Exposure;
use tessera_transport::keycache::{key_list_hash, KeyLists};
use tessera_transport::wire::{self, flags, Header, Op, Status, HEADER_BYTES};
use tessera_transport::{ConnId, HeldFailure, Reply, Request, Service, ShardTransport};

use tessera_layout::placement::{range_runs, span_runs};
use tessera_replication::protocol::{ClusterConfig, Msg, NodeId};

use crate::chain::store::{self, Replayed};
use crate::chain::ChainShard;
use crate::config::EngineConfig;
use crate::error::{EngineError, Result};
use crate::metrics::ShardMetrics;
use crate::persist::checkpoint::store::Written;
use crate::persist::durable::{DiskStats, RecoveryReport, ReplicaReplayed, ShardDisk};
use crate::table::PartStats;
use crate::tables::Tables;
use crate::updater::Updater;

/// Longest a shard's loop sleeps: the replica's clock ticks at least this often.
const CHAIN_TURN: std::time::Duration = std::time::Duration::from_millis(2);

/// Messages from the control plane to a shard.
#[derive(Debug)]
pub enum ShardControl {
    /// Map and initialise this shard's part of a table.
    AddTable { id: u32, spec: TableSpec, part: Part, updater: Arc<dyn Updater>, done: Sender<Result<()>> },
    /// Drop a table part (undoes an `AddTable` whose siblings failed).
    DropTable { id: u32 },
    /// Report counters.
    Stats { done: Sender<ShardStats> },
    /// Load the newest checkpoint and replay the log into the parts just added (start-up, once
    /// the catalog's tables are made). `None` when the engine keeps nothing on disk.
    Recover { done: Sender<Result<Option<RecoveryReport>>> },
    /// Take a checkpoint now. `None` when the engine keeps nothing on disk.
    Checkpoint { done: Sender<Result<Option<Written>>> },
    /// A newer cluster configuration (replicated servers).
    Config(Arc<ClusterConfig>),
    /// An acknowledgement a peer's reply to this shard's replication carried back.
    Replied { peer: NodeId, msg: Msg },
    /// Leave the loop.
    Shutdown,
}

/// What `tessera status` shows of one shard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardStats {
    pub shard: u16,
    pub connections: usize,
    pub bytes_mapped: usize,
    pub bytes_locked: usize,
    /// Log and checkpoint counters, when the shard keeps anything on disk.
    pub disk: Option<DiskStats>,
    /// Why the shard's write-ahead log failed, if it did (pushes are refused since).
    pub log_failure: Option<String>,
    /// Its replica's counters: pushes applied, seen again and dropped,
    /// updates forwarded and resent, snapshots, stale and refused messages.
    pub replication: tessera_replication::replica::ReplicaStats,
    pub tables: Vec<PartReport>,
}

/// One table part's counters and clocks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartReport {
    pub table: u32,
    pub start: u64,
    pub end: u64,
    pub clock_segments: usize,
    /// The part's stamp: element-wise minimum clock over its keys (0 where a worker never
    /// pushed to some of its keys).
    pub stamp: Vec<u64>,
    /// Element-wise maximum clock over its keys: how far each worker has got anywhere in it.
    pub clocks_max: Vec<u64>,
    #[serde(flatten)]
    pub stats: PartStats,
}

/// A shard's state, owned by its thread.
#[derive(Debug)]
pub struct Shard {
    id: u16,
    cfg: Arc<EngineConfig>,
    tables: Tables,
    control: Receiver<ShardControl>,
    connections: usize,
    stop: bool,
    /// The shard's log and checkpoints (opened on the shard's thread), or why it could not open.
    disk: Option<Box<ShardDisk>>,
    disk_error: Option<EngineError>,
    /// Who asked for a checkpoint: those waiting for the one being written, and those waiting
    /// for the next (they asked after the running one started).
    checkpoint_waiting: Vec<Sender<Result<Option<Written>>>>,
    checkpoint_asked: Vec<Sender<Result<Option<Written>>>>,
    /// The shard's replica of its ranges (a standalone server is a chain of one).
    chain: ChainShard,
    /// Per connection, the key lists its worker asked the shard to remember.
    key_lists: FxHashMap<ConnId, KeyLists<Vec<u64>>>,
    /// A stamp's worth of clocks, and a pull's runs of keys by range, reused by replicated
    /// pulls (see [`pull_by_range`]).
    stamp_scratch: Vec<u64>,
    runs_scratch: Vec<(u32, usize)>,
    metrics: ShardMetrics,
    /// When the last checkpoint was written (or, before the first, when the shard started).
    last_checkpoint: std::time::Instant,
}

impl Shard {
    /// A shard with no tables yet, replica of its ranges through `chain`.
    pub fn new(id: u16, cfg: Arc<EngineConfig>, control: Receiver<ShardControl>, chain: ChainShard) -> Self {
        Self {
            id,
            tables: Tables::new(id, cfg.clone(), chain.ranges()),
            cfg,
            control,
            connections: 0,
            stop: false,
            disk: None,
            disk_error: None,
            checkpoint_waiting: Vec::new(),
            checkpoint_asked: Vec::new(),
            chain,
            key_lists: FxHashMap::default(),
            stamp_scratch: Vec::new(),
            runs_scratch: Vec::new(),
            metrics: ShardMetrics::new(id),
            last_checkpoint: std::time::Instant::now(),
        }
    }

    /// Serves until told to shut down. The shard's disk ring is made here, on its own thread,
    /// and the loop sleeps on its completions beside the network.
    pub fn run(mut self, transport: &mut dyn ShardTransport) {
        match ShardDisk::open(self.id, &self.cfg) {
            Ok(disk) => self.disk = disk,
            Err(e) => self.disk_error = Some(e),
        }
        if let Some(fd) = self.disk.as_deref().and_then(ShardDisk::event_fd) {
            if let Err(e) = transport.watch(fd) {
                self.disk_error = Some(EngineError::Io(format!("cannot watch the disk ring: {e}")));
            }
        }
        // A peer link's socket the poll could not watch: its replies are looked for every turn.
        let mut unwatched = false;
        while !self.stop {
            self.connections = transport.connections();
            if crate::metrics::enabled() {
                self.metrics.connections.set(self.connections as f64);
                if self.metrics.gauges_due() {
                    self.refresh_gauges();
                }
            }
            self.pump_disk_and_chain();
            if !self.disk.as_deref().is_some_and(ShardDisk::checkpointing) {
                self.tables.free_retired();
            }
            // A checkpoint on the blocking disk backend moves on each turn of the loop.
            // The replica keeps time: heartbeats, resends, and batches closed each turn.
            let timeout = Some(if self.disk.as_deref().is_some_and(ShardDisk::busy) { std::time::Duration::ZERO } else { CHAIN_TURN });
            for socket in self.chain.sockets_to_watch() {
                if let Err(e) = transport.watch(socket) {
                    // Its replies are then looked for at every turn.
                    tracing::debug!(shard = self.id, error = %e, "cannot watch a peer link's socket");
                    unwatched = true;
                }
            }
            if let Err(e) = transport.poll(&mut self, timeout) {
                tracing::error!(shard = self.id, error = %e, "poll failed");
            }
            // Replies to this shard's own requests are read only when a watched socket turned
            // readable: a look at every turn costs a read that finds nothing, most turns.
            if transport.take_service_watched() || unwatched {
                self.chain.take_own_replies(&mut self.tables, &mut self.disk);
            }
            self.chain.pump(&mut self.tables, &mut self.disk);
            if self.tables.exposures_pending() {
                // Parts made or freed while serving: the next poll's wake hands them over.
                transport.waker().wake();
            }
            // Start the commit of what was just served before sleeping again.
            self.pump_disk_and_chain();
        }
        if let Some(disk) = self.disk.as_mut().filter(|d| d.checkpointing()) {
            disk.abandon_checkpoint(&mut self.tables);
            self.checkpoint_ended(Err(EngineError::Io("the server stopped while the checkpoint was written".into())));
        }
        if let Some(disk) = self.disk.as_mut() {
            // Replies still held die with their connections; what is logged stays logged.
            disk.pump();
        }
        tracing::debug!(shard = self.id, "shard stopped");
    }

    /// [`pump_disk`](Self::pump_disk); if log commits finished, the updates they hold commit now ([`ChainShard::settle`]), so the replies waiting for them leave at the next poll's
    /// start, not after its timeout ([`CHAIN_TURN`]: a chain of one on `wal` took 2.7 ms a
    /// push, the unreplicated server 0.4 ms).
    fn pump_disk_and_chain(&mut self) {
        let durable = self.disk.as_deref().map(ShardDisk::durable);
        self.pump_disk();
        if self.disk.as_deref().map(ShardDisk::durable) != durable {
            self.chain.settle(&mut self.tables, &mut self.disk);
        }
    }

    /// Collects finished log commits and starts the next; starts a checkpoint when one is due
    /// or asked for, and writes more of the running one.
    fn pump_disk(&mut self) {
        let Some(disk) = self.disk.as_mut() else { return };
        disk.pump();
        if !disk.checkpointing() && (disk.checkpoint_due() || !self.checkpoint_asked.is_empty()) {
            // A checkpoint records the replica's ranges too, exact at its LSN.
            let Some(replica) = self.chain.checkpoint_ranges(&mut self.tables, &mut self.disk) else { return };
            let Some(disk) = self.disk.as_mut() else { return };
            self.checkpoint_waiting.append(&mut self.checkpoint_asked);
            match disk.begin_checkpoint(&mut self.tables, replica) {
                Ok(seq) => tracing::info!(shard = self.id, seq, "checkpoint started"),
                Err(e) => self.checkpoint_ended(Err(e)),
            }
        }
        let Some(disk) = self.disk.as_mut() else { return };
        if let Some(ended) = disk.advance_checkpoint(&mut self.tables) {
            self.checkpoint_ended(ended);
        }
    }

    /// Sets the gauges that change with time rather than with requests.
    fn refresh_gauges(&mut self) {
        if self.disk.is_some() {
            self.metrics.checkpoint_age(self.last_checkpoint.elapsed().as_secs_f64());
        }
        self.metrics.replication_lag(self.chain.lag_ticks());
    }

    /// Reports a checkpoint's end, to the log and to whoever asked for it.
    fn checkpoint_ended(&mut self, result: Result<Written>) {
        if result.is_ok() {
            self.last_checkpoint = std::time::Instant::now();
        }
        match &result {
            Ok(w) => tracing::info!(
                shard = self.id,
                seq = w.seq,
                lsn = w.lsn,
                chunks_written = w.chunks_written,
                chunks_kept = w.chunks_kept,
                chunks_copied = w.chunks_copied,
                bytes = w.bytes,
                ms = w.ms,
                "checkpoint written"
            ),
            Err(e) => tracing::error!(shard = self.id, error = %e, "checkpoint failed; the previous one stays, and the next is tried an interval later"),
        }
        for done in self.checkpoint_waiting.drain(..) {
            let _ = done.send(result.clone().map(Some));
        }
    }

    /// Loads what the disk holds into the parts the catalog just made (see [`ShardControl::Recover`]).
    fn recover(&mut self) -> Result<Option<RecoveryReport>> {
        let _span = tracing::info_span!("recovery", shard = self.id).entered();
        if let Some(e) = self.disk_error.take() {
            return Err(e);
        }
        let Some(disk) = self.disk.as_mut() else { return Ok(None) };
        // The log holds the replica's records: replayed into the tables, and what they leave
        // is what the replica holds again.
        let ranges = self.chain.ranges();
        let mut replayed = Replayed::default();
        let mut replay = |tables: &mut Tables, found: ReplicaReplayed<'_>| store::replay(tables, ranges, &mut replayed, found);
        let report = disk.recover(&mut self.tables, &mut replay)?;
        self.chain.recovered(&mut self.tables, &mut self.disk, replayed);
        Ok(Some(report))
    }

    fn control(&mut self, msg: ShardControl) {
        match msg {
            ShardControl::AddTable { id, spec, part, updater, done } => {
                self.metrics.add_table(id, &spec.name);
                let chain = &self.chain;
                let result = self.tables.add(id, spec, part.start..part.end, updater, |r| chain.in_chain(r));
                let _ = done.send(result);
            }
            ShardControl::DropTable { id } => {
                // A checkpoint of the part cannot finish without it.
                if let Some(disk) = self.disk.as_mut().filter(|d| d.checkpointing()) {
                    disk.abandon_checkpoint(&mut self.tables);
                    self.checkpoint_ended(Err(EngineError::Io(format!("table {id} was dropped while the checkpoint was written"))));
                }
                self.tables.remove(id);
            }
            ShardControl::Stats { done } => {
                let _ = done.send(self.stats());
            }
            ShardControl::Recover { done } => {
                let _ = done.send(self.recover());
            }
            ShardControl::Checkpoint { done } => match &self.disk {
                Some(_) => self.checkpoint_asked.push(done),
                None => {
                    let _ = done.send(Ok(None));
                }
            },
            ShardControl::Config(config) => self.chain.config(&mut self.tables, &mut self.disk, config),
            ShardControl::Replied { peer, msg } => self.chain.replied(&mut self.tables, &mut self.disk, peer, msg),
            ShardControl::Shutdown => self.stop = true,
        }
    }

    fn stats(&self) -> ShardStats {
        let (bytes_mapped, bytes_locked) = self.tables.bytes();
        let tables = self.tables.parts().map(|t| {
            let owned = t.owned();
            let mut stamp = vec![0; t.stamp_len()];
            t.stamp_into(owned.clone(), &mut stamp);
            let mut clocks_max = vec![0; t.stamp_len()];
            for (_, clocks) in t.clocks().segments() {
                clocks_max.iter_mut().zip(clocks).for_each(|(m, c)| *m = (*m).max(*c));
            }
            PartReport { table: t.id, start: owned.start, end: owned.end, clock_segments: t.clocks().segment_count(), stamp, clocks_max, stats: t.stats() }
        });
        let disk = self.disk.as_deref().map(|d| d.stats);
        let log_failure = self.disk.as_deref().and_then(|d| d.failure().map(str::to_string));
        let replication = self.chain.replica_stats().clone();
        ShardStats { shard: self.id, connections: self.connections, bytes_mapped, bytes_locked, disk, log_failure, replication, tables: tables.collect() }
    }

    fn serve_data(&mut self, req: &Request<'_>, reply: &mut Reply<'_>) -> Result<()> {
        let h = req.header;
        // The transport says how large a reply it can carry back (TCP frames, RDMA slots).
        let limit = reply.frame_bytes_max();
        let bad = |e: tessera_transport::TransportError| EngineError::BadRequest { reason: e.to_string() };
        if h.op() == Some(Op::Ping) {
            reply.ok_bytes(&[]);
            return Ok(());
        }
        if h.flags & (flags::PUSH_SEQS | flags::TAIL_ACKS) != 0 && h.op() != Some(Op::WorkerPush) {
            return Err(EngineError::BadRequest { reason: "only a WorkerPush asks for push counts or hears from tails".into() });
        }
        match h.op() {
            Some(Op::Replicate) => return self.chain.serve_peer(&mut self.tables, &mut self.disk, req, reply),
            Some(Op::WorkerPush) => {
                let lists = self.key_lists.entry(req.conn).or_insert_with(|| KeyLists::new(self.cfg.key_cache_keys));
                return self.chain.serve_worker(&mut self.tables, &mut self.disk, lists, req, reply);
            }
            Some(Op::Push | Op::PushRange) => {
                return Err(EngineError::BadRequest { reason: "pushes go through each range's head as WorkerPush (the client does)".into() })
            }
            _ => {}
        }
        let cache_flags = h.flags & (flags::KEYS_CACHED | flags::KEYS_REMEMBER);
        if cache_flags != 0 && h.op() != Some(Op::Pull) {
            return Err(EngineError::BadRequest { reason: "only Pull carries key lists to cache".into() });
        }
        if h.flags & flags::PART_DONE != 0 {
            return Err(EngineError::BadRequest { reason: "PART_DONE is no longer sent: a WorkerPush says when it completes a range".into() });
        }
        match h.op() {
            Some(Op::Pull) if h.flags & flags::KEYS_CACHED != 0 => {
                let held = self.key_lists.get_mut(&req.conn).and_then(|l| l.touch(h.start, h.count));
                let keys = held.map(std::mem::take).ok_or(EngineError::KeysUnknown { hash: h.start, count: h.count })?;
                let served = self.pull_by_range(&h, Pulled::Keys(&keys), limit, reply);
                if let Some(slot) = self.key_lists.get_mut(&req.conn).and_then(|l| l.touch(h.start, h.count)) {
                    *slot = keys;
                }
                served
            }
            Some(Op::Pull) => {
                if req.body.len() as u64 != u64::from(h.count) * 8 {
                    let reason = format!("count {} but the body holds {} bytes of keys, not {}", h.count, req.body.len(), u64::from(h.count) * 8);
                    return Err(EngineError::BadRequest { reason });
                }
                let (keys, _) = wire::keys_and_rest(req.body, h.count as usize).map_err(bad)?;
                if h.flags & flags::KEYS_REMEMBER != 0 {
                    let lists = self.key_lists.entry(req.conn).or_insert_with(|| KeyLists::new(self.cfg.key_cache_keys));
                    // Once the cache is full, a new list reuses an evicted list's storage.
                    lists.insert_with(key_list_hash(keys), h.count, |old| {
                        let mut list = old.unwrap_or_default();
                        list.clear();
                        list.extend_from_slice(keys);
                        list
                    });
                }
                self.pull_by_range(&h, Pulled::Keys(keys), limit, reply)
            }
            Some(Op::PullRange) => self.pull_by_range(&h, Pulled::Span { start: h.start, count: h.count as usize }, limit, reply),
            _ => Err(EngineError::BadRequest { reason: format!("op {} is a control request; send it on a control connection", h.op) }),
        }
    }
}

impl Shard {
    /// A pull from the shard, which holds one part per range: each run of keys of one
    /// range comes from that range's part, and the reply's stamp is the meet of the runs'
    /// stamps. Every run is checked before the reply is built: its keys are its range's, which
    /// are its part's, and the replica holds the range (or the pull is refused, `NotOwned`, and
    /// the client asks again after refreshing). Keys of one range that come apart only make
    /// more runs (a client sends them grouped by range).
    fn pull_by_range(&mut self, h: &Header, pulled: Pulled<'_>, limit: usize, reply: &mut Reply<'_>) -> Result<()> {
        let mut runs = std::mem::take(&mut self.runs_scratch);
        let served = self.pull_runs(h, pulled, limit, reply, &mut runs);
        self.runs_scratch = runs;
        served
    }

    /// [`pull_by_range`](Self::pull_by_range), with `runs` to fill: per run, its range and
    /// where it ends (an index into the keys, or an offset into the span).
    fn pull_runs(&mut self, h: &Header, pulled: Pulled<'_>, limit: usize, reply: &mut Reply<'_>, runs: &mut Vec<(u32, usize)>) -> Result<()> {
        let ranges = self.tables.ranges();
        let table = self.tables.get(h.table).ok_or(EngineError::UnknownTable { table: h.table })?;
        let spec = &table.spec;
        if h.dim != spec.dim {
            return Err(EngineError::WrongDim { table: h.table, table_dim: spec.dim, request_dim: h.dim });
        }
        let outside = |key: u64| EngineError::KeyOutOfRange { table: h.table, key, range: spec.start..spec.end };
        runs.clear();
        let values = match pulled {
            Pulled::Keys(keys) => {
                if keys.is_empty() {
                    return Err(EngineError::ValuesLength { keys: 0, dim: spec.dim, values: 0 });
                }
                if let Some(k) = keys.iter().find(|k| !(spec.start..spec.end).contains(*k)) {
                    return Err(outside(*k));
                }
                runs.extend(range_runs(spec, ranges, keys).map(|(range, run)| (range, run.end)));
                keys.len()
            }
            Pulled::Span { start, count } => {
                if count == 0 {
                    return Err(EngineError::ValuesLength { keys: 0, dim: spec.dim, values: 0 });
                }
                let end = start.checked_add(count as u64).filter(|e| start >= spec.start && *e <= spec.end);
                let Some(end) = end else { return Err(outside(if start < spec.start { start } else { start.saturating_add(count as u64) })) };
                runs.extend(span_runs(spec, ranges, start..end).map(|(range, run)| (range, (run.end - start) as usize)));
                count
            }
        };
        let chain = &self.chain;
        let mut stamp_len = 0;
        for &(range, _) in runs.iter() {
            // Only a range the replica holds now is served: a learner's part is not there yet.
            let part = self.tables.at(h.table, range).filter(|_| chain.holds(range)).ok_or_else(|| not_held(range))?;
            stamp_len = stamp_len.max(part.stamp_len());
        }
        let dim = h.dim as usize;
        check_reply(stamp_len, values * dim, limit)?;
        let (stamp, out) = reply.ok(stamp_len, values * dim);
        let scratch = &mut self.stamp_scratch;
        scratch.resize(stamp_len, 0);
        let mut from = 0;
        for &(range, to) in runs.iter() {
            let part = self.tables.at_mut(h.table, range).expect("checked above");
            let out = &mut out[from * dim..to * dim];
            let span = match pulled {
                Pulled::Keys(keys) => {
                    let run = &keys[from..to];
                    part.pull(run, out);
                    let (lo, hi) = run.iter().fold((u64::MAX, 0), |(lo, hi), k| (lo.min(*k), hi.max(*k)));
                    lo..hi + 1
                }
                Pulled::Span { start, .. } => {
                    part.pull_range(start + from as u64, to - from, out);
                    start + from as u64..start + to as u64
                }
            };
            if from == 0 {
                part.stamp_into(span, stamp);
            } else {
                part.stamp_into(span, scratch);
                stamp.iter_mut().zip(scratch.iter()).for_each(|(s, c)| *s = (*s).min(*c));
            }
            from = to;
        }
        Ok(())
    }
}

fn not_held(range: u32) -> EngineError {
    EngineError::RangeNotHeld { range }
}

/// What a replicated pull names: listed keys, or a span of keys.
#[derive(Debug, Clone, Copy)]
enum Pulled<'k> {
    Keys(&'k [u64]),
    Span { start: u64, count: usize },
}

/// Refuses a pull whose reply could not be sent.
fn check_reply(stamp_len: usize, values: usize, limit: usize) -> Result<()> {
    let bytes = HEADER_BYTES + stamp_len * 8 + values * 4;
    if bytes > limit {
        return Err(EngineError::ReplyTooLarge { bytes, limit });
    }
    Ok(())
}

impl Service for Shard {
    fn serve(&mut self, request: Request<'_>, reply: &mut Reply<'_>) {
        // Without an exporter, no clock is read for metrics on the data path.
        let started = crate::metrics::enabled().then(std::time::Instant::now);
        let (header, received) = (request.header, request.body.len());
        if let Err(e) = self.serve_data(&request, reply) {
            reply.error(e.status(), &e.to_string());
            self.metrics.errors.increment(1);
            return;
        }
        let Some(started) = started else { return };
        let table = match header.op() {
            Some(Op::WorkerPush) => self.chain.last_push_table.take(),
            _ => Some(header.table),
        };
        if let (Some(op), Some(table)) = (header.op(), table.and_then(|t| self.metrics.table(t))) {
            let sent = reply.frame_len().saturating_sub(HEADER_BYTES);
            table.served(op, received, sent, started.elapsed());
        }
    }

    fn closed(&mut self, conn: ConnId) {
        self.key_lists.remove(&conn);
    }

    fn wake(&mut self, expose: &mut dyn FnMut(Exposure)) {
        while let Ok(msg) = self.control.try_recv() {
            self.control(msg);
        }
        // Dense parts made or freed since (by control messages, or by the shard's
        // chains as ranges come and go): workers read what the transport is told of.
        self.tables.exposures().for_each(expose);
    }

    fn durable(&self) -> u64 {
        // Held replies wait for their chains' tails (which wait for their logs, in `wal` mode).
        self.chain.released()
    }

    fn held_failure(&self) -> Option<HeldFailure<'_>> {
        let log = self.disk.as_deref().and_then(ShardDisk::failure).map(|reason| HeldFailure { status: Status::NotDurable, reason });
        // A replica whose log failed never acknowledges again: that comes first. Where its
        // ranges have other members, the worker sends the pushes again to their next heads.
        let chain = &self.chain;
        let log = log.map(|l| if chain.replaceable() { HeldFailure { status: Status::Unacknowledged, ..l } } else { l });
        log.or_else(|| chain.failure().map(|reason| HeldFailure { status: Status::Unacknowledged, reason }))
    }
}
