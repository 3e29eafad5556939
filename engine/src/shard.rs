//! One shard: the tables it owns and the request handler that serves them.
//!
//! The shard is a [`Service`]: the transport hands it requests and it answers in place. It does
//! not know which transport carries them. It runs on its own pinned thread and is the only one to
//! touch its tables, so the data path takes no locks; the control plane reaches it only through a
//! bounded channel and the transport's waker.

use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};
use tessera_replication::catalog::{Part, TableSpec};
use tessera_transport::expose::Exposure;
use tessera_transport::wire::{self, Header, Op, HEADER_BYTES};
use tessera_transport::{Reply, Request, Service, ShardTransport};

use crate::arena::Arena;
use crate::config::EngineConfig;
use crate::error::{EngineError, Result};
use crate::table::{PartStats, TablePart};
use crate::updater::Updater;

/// Messages from the control plane to a shard.
#[derive(Debug)]
pub enum ShardControl {
    /// Map and initialise this shard's part of a table.
    AddTable { id: u32, spec: TableSpec, part: Part, updater: Arc<dyn Updater>, done: Sender<Result<()>> },
    /// Drop a table part (undoes an `AddTable` whose siblings failed).
    DropTable { id: u32 },
    /// Report counters.
    Stats { done: Sender<ShardStats> },
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
    arena: Arena,
    tables: Vec<Option<TablePart>>,
    control: Receiver<ShardControl>,
    connections: usize,
    stop: bool,
}

impl Shard {
    /// A shard with no tables yet.
    pub fn new(id: u16, cfg: Arc<EngineConfig>, control: Receiver<ShardControl>) -> Self {
        Self { id, cfg, arena: Arena::default(), tables: Vec::new(), control, connections: 0, stop: false }
    }

    /// Serves until told to shut down.
    pub fn run(mut self, transport: &mut dyn ShardTransport) {
        while !self.stop {
            self.connections = transport.connections();
            if let Err(e) = transport.poll(&mut self, None) {
                tracing::error!(shard = self.id, error = %e, "poll failed");
            }
        }
        tracing::debug!(shard = self.id, "shard stopped");
    }

    fn part(&mut self, header: &Header) -> Result<&mut TablePart> {
        let part = self.tables.get_mut(header.table as usize).and_then(Option::as_mut);
        let part = part.ok_or(EngineError::UnknownTable { table: header.table })?;
        if header.dim != part.spec.dim {
            return Err(EngineError::WrongDim { table: header.table, table_dim: part.spec.dim, request_dim: header.dim });
        }
        Ok(part)
    }

    fn control(&mut self, msg: ShardControl, expose: &mut dyn FnMut(Exposure)) {
        match msg {
            ShardControl::AddTable { id, spec, part, updater, done } => {
                let made = TablePart::new(id, self.id, spec, part.start..part.end, updater, &self.cfg, &mut self.arena);
                let result = made.map(|t| {
                    if self.tables.len() <= id as usize {
                        self.tables.resize_with(id as usize + 1, || None);
                    }
                    if let Some(view) = t.dense_view() {
                        expose(Exposure::Add(view));
                    }
                    self.tables[id as usize] = Some(t);
                });
                let _ = done.send(result);
            }
            ShardControl::DropTable { id } => {
                if let Some(slot) = self.tables.get_mut(id as usize) {
                    if slot.take().is_some() {
                        expose(Exposure::Remove { table: id });
                    }
                }
            }
            ShardControl::Stats { done } => {
                let _ = done.send(self.stats());
            }
            ShardControl::Shutdown => self.stop = true,
        }
    }

    fn stats(&self) -> ShardStats {
        let (bytes_mapped, bytes_locked) = self.arena.bytes();
        let tables = self.tables.iter().flatten().map(|t| {
            let owned = t.owned();
            let mut stamp = vec![0; t.stamp_len()];
            t.stamp_into(owned.clone(), &mut stamp);
            let mut clocks_max = vec![0; t.stamp_len()];
            for (_, clocks) in t.clocks().segments() {
                clocks_max.iter_mut().zip(clocks).for_each(|(m, c)| *m = (*m).max(*c));
            }
            PartReport {
                table: t.id,
                start: owned.start,
                end: owned.end,
                clock_segments: t.clocks().segment_count(),
                stamp,
                clocks_max,
                stats: t.stats(),
            }
        });
        ShardStats { shard: self.id, connections: self.connections, bytes_mapped, bytes_locked, tables: tables.collect() }
    }

    fn serve_data(&mut self, req: &Request<'_>, reply: &mut Reply<'_>) -> Result<()> {
        let h = req.header;
        // The transport says how large a reply it can carry back (TCP frames, RDMA slots).
        let limit = reply.frame_bytes_max();
        let bad = |e: tessera_transport::TransportError| EngineError::BadRequest { reason: e.to_string() };
        match h.op() {
            Some(Op::Push) => {
                let (keys, grads) = wire::keys_and_values(req.body, h.count as usize).map_err(bad)?;
                let part = self.part(&h)?;
                let span = part.push(keys, grads, h.worker, h.clock)?;
                let (stamp, _) = reply.ok(part.stamp_len(), 0);
                part.stamp_into(span, stamp);
            }
            Some(Op::PushRange) => {
                let grads = wire::cast_slice::<f32>(req.body, "values").map_err(bad)?;
                let part = self.part(&h)?;
                let span = part.push_range(h.start, h.count as usize, grads, h.worker, h.clock)?;
                let (stamp, _) = reply.ok(part.stamp_len(), 0);
                part.stamp_into(span, stamp);
            }
            Some(Op::Pull) => {
                let keys = wire::cast_slice::<u64>(req.body, "keys").map_err(bad)?;
                if keys.len() != h.count as usize {
                    return Err(EngineError::BadRequest { reason: format!("count {} but {} keys", h.count, keys.len()) });
                }
                let part = self.part(&h)?;
                let span = part.check_pull(keys)?;
                let n = keys.len() * h.dim as usize;
                check_reply(part.stamp_len(), n, limit)?;
                let (stamp, values) = reply.ok(part.stamp_len(), n);
                part.pull(keys, values);
                part.stamp_into(span, stamp);
            }
            Some(Op::PullRange) => {
                let part = self.part(&h)?;
                let span = part.check_pull_range(h.start, h.count as usize)?;
                let n = h.count as usize * h.dim as usize;
                check_reply(part.stamp_len(), n, limit)?;
                let (stamp, values) = reply.ok(part.stamp_len(), n);
                part.pull_range(h.start, h.count as usize, values);
                part.stamp_into(span, stamp);
            }
            _ => {
                return Err(EngineError::BadRequest {
                    reason: format!("op {} is a control request; send it on a control connection", h.op),
                })
            }
        }
        Ok(())
    }
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
        if let Err(e) = self.serve_data(&request, reply) {
            reply.error(e.status(), &e.to_string());
        }
    }

    fn wake(&mut self, expose: &mut dyn FnMut(Exposure)) {
        while let Ok(msg) = self.control.try_recv() {
            self.control(msg, expose);
        }
    }
}
