//! A shard's part in chain replication: the replica state machine of the shard's ranges, driven
//! by the shard's thread over the transport seam.
//!
//! Every server runs the same shards, and replication range `r` lives on shard
//! [`shard_of_range`](tessera_layout::placement::shard_of_range) of every server, so each
//! shard runs one [`Replica`] for its ranges and talks to the same shard of its peers. Messages
//! from peers arrive as `Replicate` requests; workers' pushes as `WorkerPush` requests, whose
//! replies carry the worker's acknowledgements (a worker polls with an empty `WorkerPush` while
//! it waits). Messages out leave through the server's [`outbox::Outbox`].

mod clients;
pub mod outbox;
pub mod store;

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use tessera_layout::placement::shard_of_range;
use tessera_replication::codec::{self, KeyList, PayloadPool, PushHeader};
use tessera_replication::config::PUSH_REPLY_HOLD_MS_MAX;
use tessera_replication::protocol::{Addr, ClusterConfig, Msg, NodeId, Payload, RangeId, WorkerId};
use tessera_replication::replica::Replica;
use tessera_replication::ReplicationConfig;
use tessera_transport::keycache::{key_list_hash_le, KeyLists};
use tessera_transport::wire::{flags, HEADER_BYTES};
use tessera_transport::{Reply, Request};

use crate::error::{EngineError, Result};
use crate::persist::checkpoint::RangeHeld;
use crate::persist::durable::ShardDisk;
use crate::tables::Tables;
use outbox::Outbox;
use store::{ChainStore, Replayed};

/// Who this server is in the cluster.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node: NodeId,
    /// Changes at every start: a restarted server holds nothing, and must not be taken for the
    /// one that stopped.
    pub incarnation: u64,
    /// Where peers and workers reach it.
    pub addr: String,
    /// The cluster its data directory belongs to, named in its heartbeats; 0 when it has none
    /// yet (or no data directory).
    pub cluster: u64,
}

/// Where a replicated server finds its coordinator.
#[derive(Debug, Clone)]
pub enum Locator {
    /// The embedded coordinator, at this address (`tessera coordinator --listen`).
    At(String),
    /// Whichever coordinator holds the cluster's election in etcd; the configuration is also
    /// watched there.
    #[cfg(feature = "etcd")]
    Etcd(Arc<tessera_coordinator::etcd::Etcd>),
}

impl Locator {
    /// The coordinator's address now.
    pub fn resolve(&self) -> Result<String> {
        match self {
            Locator::At(addr) => Ok(addr.clone()),
            #[cfg(feature = "etcd")]
            Locator::Etcd(etcd) => etcd.leader_addr()?.ok_or_else(|| EngineError::Io(format!("no coordinator holds the election in {etcd:?} yet"))),
        }
    }
}

impl std::fmt::Display for Locator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Locator::At(addr) => write!(f, "{addr}"),
            #[cfg(feature = "etcd")]
            Locator::Etcd(etcd) => write!(f, "{etcd:?}"),
        }
    }
}

/// What a worker is told about one range when it next asks.
#[derive(Debug, Clone, Copy, Default)]
struct Notice {
    acked: u32,
    not_head: Option<u64>,
}

/// The reply to a worker's pushes, held until the tail holds them.
#[derive(Debug)]
struct HeldReply {
    /// Its place in the shard's order of held replies ([`Reply::hold_until`]).
    position: u64,
    worker: WorkerId,
    /// The pushes (range, seq) whose acknowledgement it waits for.
    pushes: Vec<(RangeId, u32)>,
    /// Whether the worker awaits them here as their ranges' tail (see [`flags::TAIL_ACKS`]; the
    /// head of a chain of one is its tail), not only as their head.
    at_tail: bool,
    held_at: Instant,
}

/// One shard's replica and the traffic around it.
#[derive(Debug)]
pub struct ChainShard {
    shard: u16,
    shards: u16,
    me: Identity,
    rcfg: ReplicationConfig,
    replica: Replica<ChainStore>,
    /// Until the shard has replayed its log (`--durability wal`), the replica takes no part:
    /// it neither heartbeats nor takes configurations (the newest waits here), so the
    /// coordinator never hears of this incarnation before it knows what its disk holds.
    recovering: bool,
    config_waiting: Option<Arc<ClusterConfig>>,
    outbox: Outbox,
    /// Per (worker, range): news for the worker, handed over in its next reply.
    mailbox: BTreeMap<(u32, u32), Notice>,
    started: Instant,
    /// The table of the last worker push served, for the shard's metrics.
    pub last_push_table: Option<u32>,
    /// Replies to pushes that wait for their tails, in the order they were held; and the
    /// position of the last one held, and of the last one let go.
    held: std::collections::VecDeque<HeldReply>,
    /// The push lists of replies let go, kept for the next ones held.
    held_spare: Vec<Vec<(RangeId, u32)>>,
    held_last: u64,
    released_last: u64,
    /// Per (worker, range): the highest push seq acknowledged to the worker.
    acked: FxHashMap<(u32, u32), u32>,
    /// Raised when a peer's update named a table this server lacks: the control plane then
    /// brings the catalog up to the cluster's.
    catalog_behind: Arc<std::sync::atomic::AtomicBool>,
    /// Set when a held reply could not be honoured: every reply held up to this position is
    /// sent as an error by the transport's next poll, and the turn after, the shard moves
    /// [`released`](Self::released) past them and clears it.
    failing: Option<u64>,
    /// The replica's counts of ranges resumed, snapshots installed and learners resumed, as
    /// last logged.
    logged: (u64, u64, u64),
    /// While a peer's `Replicate` request is served: that peer. The acknowledgements for it
    /// the request's messages produce gather in `answer_acks` and go back in the reply, encoded
    /// in `answer_body` (see [`serve_peer`](Self::serve_peer)); both buffers are kept for the
    /// next request.
    answering: Option<NodeId>,
    answer_acks: Vec<Msg>,
    answer_body: Vec<u8>,
    /// The messages of the `Replicate` request being served: a buffer kept.
    peer_msgs: Vec<Msg>,
    /// The acknowledgements taken from peers' replies in a turn, each with its peer: a list
    /// kept.
    own_acks: Vec<(NodeId, Msg)>,
    /// Payloads of the pushes and updates this shard decodes, reused once applied and let go of.
    payloads: PayloadPool,
    /// What the replica produced in a step, being routed: a list kept.
    ready: Vec<(Addr, Msg)>,
    /// Buffers a worker's push request is served with, kept for the next one.
    worker_scratch: WorkerScratch,
    /// The clients pushing as each worker id, as this shard has seen them.
    clients: clients::WorkerClients,
}

/// What [`ChainShard::serve_worker`] fills per request, kept so that serving allocates nothing
/// once warm: the pushes it names, the worker's news, and the reply's messages and bytes.
#[derive(Debug, Default)]
struct WorkerScratch {
    /// The request's messages, decoded; and the (range, seq) of its pushes.
    decoded: Vec<Msg>,
    pushed: Vec<(RangeId, u32)>,
    /// The pushes (range, seq) the worker awaits from this shard as their ranges' tail.
    awaited: Vec<(RangeId, u32)>,
    news: Vec<((u32, u32), Notice)>,
    reply: Vec<Msg>,
    body: Vec<u8>,
    /// The stamp of the pushes applied, and one part's, being met into it.
    stamp: Vec<u64>,
    part_stamp: Vec<u64>,
    /// Per range, the highest push seq the reply claims acknowledged (sorted by range).
    claimed: Vec<(RangeId, u32)>,
    /// The pushes the shard refuses, as messages for the reply; and per range the request
    /// pushes to, the seq of the worker's push the head applies next (none where it is not
    /// the head).
    refused: Vec<Msg>,
    next_seqs: Vec<(RangeId, Option<u32>)>,
    /// The pushes (range, seq) the head applies from the request.
    applying: Vec<(RangeId, u32)>,
}

/// Most bytes of acknowledgements a `Replicate` reply carries back; more go as requests of
/// their own. Far below the smallest RDMA slot.
const REPLY_ACKS_BYTES_MAX: usize = 4 << 10;

impl ChainShard {
    /// Shard `shard` of `shards`: its replica serves the ranges placed on it. A shard that
    /// recovers from its disk first (`recovering`) takes part once it has
    /// ([`recovered`](Self::recovered)).
    /// `catalog_behind` is raised when a peer's update names a table this server lacks.
    pub fn new(
        shard: u16,
        shards: u16,
        me: &Identity,
        rcfg: ReplicationConfig,
        outbox: Outbox,
        recovering: bool,
        catalog_behind: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        let replica = Self::replica(shard, shards, me, &rcfg, &outbox, ChainStore::new(rcfg.ranges));
        Self {
            shard,
            shards,
            me: me.clone(),
            rcfg,
            replica,
            recovering,
            config_waiting: None,
            outbox,
            mailbox: BTreeMap::new(),
            started: Instant::now(),
            last_push_table: None,
            held: Default::default(),
            held_spare: Vec::new(),
            held_last: 0,
            released_last: 0,
            acked: FxHashMap::default(),
            catalog_behind,
            failing: None,
            logged: (0, 0, 0),
            answering: None,
            answer_acks: Vec::new(),
            answer_body: Vec::new(),
            peer_msgs: Vec::new(),
            own_acks: Vec::new(),
            payloads: PayloadPool::default(),
            ready: Vec::new(),
            worker_scratch: WorkerScratch::default(),
            clients: clients::WorkerClients::default(),
        }
    }

    fn replica(shard: u16, shards: u16, me: &Identity, rcfg: &ReplicationConfig, outbox: &Outbox, store: ChainStore) -> Replica<ChainStore> {
        let ranges = rcfg.ranges;
        let mut replica = Replica::new(me.node, me.incarnation, me.addr.clone(), rcfg.clone(), store)
            .of_cluster(me.cluster)
            .serving(|r| shard_of_range(r.0, ranges, shards) == shard);
        // Workers that hear from tails (`flags::TAIL_ACKS`) await their pushes there.
        replica.ack_from_tail(true);
        replica.send_heartbeats(outbox.coordinated());
        replica
    }

    /// The ranges the shard's log held ([`store::replay`]): the replica holds them again, and
    /// from now on takes part in the cluster.
    pub fn recovered(&mut self, tables: &mut Tables, disk: &mut Option<Box<ShardDisk>>, replayed: Replayed) {
        let held: Vec<String> = replayed.ranges.iter().map(|(r, (v, _, _))| format!("{r}@{v}")).collect();
        tracing::info!(shard = self.shard, ranges = ?held, "the replica holds again what its log held (range@version)");
        self.replica = Self::replica(self.shard, self.shards, &self.me, &self.rcfg, &self.outbox, ChainStore::recovered(self.rcfg.ranges, replayed));
        self.recovering = false;
        self.route();
        self.hold_placed(tables, disk);
        if let Some(config) = self.config_waiting.take() {
            self.config(tables, disk, config);
        }
    }

    /// For a checkpoint about to begin: closes the open batches (so the tables hold nothing the
    /// ranges' versions do not count), and returns the ranges held, each with its version and
    /// clock. `None` while the shard has not recovered yet: it takes no checkpoint then.
    pub fn checkpoint_ranges(&mut self, tables: &mut Tables, disk: &mut Option<Box<ShardDisk>>) -> Option<Vec<RangeHeld>> {
        if self.recovering {
            return None;
        }
        self.with_replica(tables, disk, |r, _| r.flush_all());
        let held = (0..self.rcfg.ranges).filter_map(|r| {
            let st = self.replica.range_state(RangeId(r)).filter(|s| s.installed)?;
            Some(RangeHeld { range: r, version: st.version, clock: st.clock.to_vec(), digest: st.digest })
        });
        Some(held.collect())
    }

    /// How far behind its chain's tail this replica's ranges are: the most updates applied here
    /// that the tail has not acknowledged, over the ranges it holds. Each update is one push,
    /// one tick of its worker's clock. 0 on a tail.
    pub fn lag_ticks(&self) -> u64 {
        self.replica.reports().iter().map(|r| r.version.saturating_sub(r.committed)).max().unwrap_or(0)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs `f` on the replica with the shard's tables and disk lent to its store.
    fn with_replica(&mut self, tables: &mut Tables, disk: &mut Option<Box<ShardDisk>>, f: impl FnOnce(&mut Replica<ChainStore>, u64)) {
        let now = self.now_ms();
        std::mem::swap(tables, &mut self.replica.store_mut().tables);
        std::mem::swap(disk, &mut self.replica.store_mut().disk);
        f(&mut self.replica, now);
        std::mem::swap(tables, &mut self.replica.store_mut().tables);
        std::mem::swap(disk, &mut self.replica.store_mut().disk);
        self.route();
    }

    /// Sends what the replica produced: to peers, the coordinator, or workers' mailboxes.
    fn route(&mut self) {
        if std::mem::take(&mut self.replica.store_mut().missing_table) {
            self.catalog_behind.store(true, std::sync::atomic::Ordering::Release);
        }
        for (range, reason) in self.replica.take_refusals() {
            tracing::warn!(shard = self.shard, %range, reason, "refused a replicated update; nothing of it was applied");
        }
        let stats = self.replica.stats();
        let counts = (stats.resumed, stats.snapshots_installed, stats.resumes);
        if counts != self.logged {
            let (resumed, installed, granted) = counts;
            if resumed > self.logged.0 {
                tracing::info!(
                    shard = self.shard,
                    resumed,
                    "a range resumed from what this server held (its disk): only the updates it missed came from its chain"
                );
            }
            if installed > self.logged.1 {
                tracing::info!(shard = self.shard, installed, "a range's snapshot installed from its chain");
            }
            if granted > self.logged.2 {
                tracing::info!(shard = self.shard, granted, "a learner resumed from what it held, sent only the updates it missed");
            }
            self.logged = counts;
        }
        let mut ready = std::mem::take(&mut self.ready);
        self.replica.take_ready_into(&mut ready);
        for (to, msg) in ready.drain(..) {
            match (to, msg) {
                (Addr::Node(node), msg @ Msg::Ack { .. }) if self.answering == Some(node) => self.answer_acks.push(msg),
                (Addr::Node(node), msg) => self.outbox.to_node(node, self.shard, msg),
                (Addr::Coordinator, msg) => self.outbox.to_coordinator(msg),
                (Addr::Worker(w), Msg::PushAck { range, seq }) => {
                    let acked = self.acked.entry((w.0, range.0)).or_default();
                    *acked = (*acked).max(seq);
                    let n = self.mailbox.entry((w.0, range.0)).or_default();
                    n.acked = n.acked.max(seq);
                    n.not_head = None;
                }
                (Addr::Worker(w), Msg::NotHead { range, config_id }) => {
                    self.mailbox.entry((w.0, range.0)).or_default().not_head = Some(config_id);
                }
                (Addr::Worker(_), other) => tracing::warn!(kind = other.kind(), "a replica sent a worker something unexpected"),
            }
        }
        self.ready = ready;
    }

    /// Takes up what the shard's log made durable since the last call: the updates it holds
    /// commit, and the acknowledgements they allow are noted for the replies held for them
    /// (sent at the next poll's start, see [`released`](Self::released)). Unlike
    /// [`pump`](Self::pump) it leaves the held replies' failure handling alone, which relies on
    /// a poll between two pumps.
    pub fn settle(&mut self, tables: &mut Tables, disk: &mut Option<Box<ShardDisk>>) {
        if self.recovering {
            return;
        }
        self.with_replica(tables, disk, |r, _| r.flush());
    }

    /// Closes the open batches, and lets time pass: heartbeats, resends. The shard calls it on
    /// every turn of its loop.
    pub fn pump(&mut self, tables: &mut Tables, disk: &mut Option<Box<ShardDisk>>) {
        if self.recovering {
            return;
        }
        self.with_replica(tables, disk, |r, now| {
            r.flush();
            r.tick(now);
        });
        let log_failed = disk.as_deref().is_some_and(|d| d.failure().is_some());
        if log_failed && self.outbox.fail_stop() {
            // Failing stop: a member that can make nothing durable again is taken for failed
            // by the coordinator once its heartbeats stop, and its chains go on without it.
            tracing::error!(
                node = self.me.node.0,
                reason = disk.as_deref().and_then(ShardDisk::failure).unwrap_or_default(),
                "the write-ahead log failed: this server stops heartbeating, so that the coordinator takes it for failed and its chains go on without it \
                 (a range whose only member it is waits for it); free the disk and restart it, and it comes back as a new member"
            );
        }
        // The transport's poll since the failure was raised has sent its replies as errors.
        if let Some(upto) = self.failing.take() {
            self.released_last = self.released_last.max(upto);
            while let Some(held) = self.held.pop_front_if(|h| h.position <= upto) {
                self.held_spare.push(held.pushes);
            }
        }
        while let Some(held) = self.held.front() {
            if self.all_acked(held) {
                self.released_last = held.position;
                let held = self.held.pop_front().expect("the front one");
                self.held_spare.push(held.pushes);
                continue;
            }
            // A log that failed never makes the held pushes durable: their replies fail at once
            // (with the log's reason, see `Shard::held_failure`).
            let late = log_failed || held.held_at.elapsed().as_millis() as u64 >= PUSH_REPLY_HOLD_MS_MAX;
            let answers = |range: RangeId, seq: u32| match held.at_tail {
                true => self.replica.acks_as_tail(range) || self.replica.awaits(range, held.worker, seq),
                false => self.replica.awaits(range, held.worker, seq),
            };
            if late || held.pushes.iter().any(|(range, seq)| !answers(*range, *seq) && !self.acked_to(held.worker, *range, *seq)) {
                // Dropped, no longer this head's or tail's to acknowledge, or slow (a chain
                // member failed): its worker will ask again, or resend. Replies leave in order,
                // so the ones held after it fail with it.
                self.failing = Some(self.held_last);
            }
            break;
        }
    }

    fn acked_to(&self, worker: WorkerId, range: RangeId, seq: u32) -> bool {
        self.acked.get(&(worker.0, range.0)).is_some_and(|a| *a >= seq)
    }

    /// Whether every push a held reply waits for was acknowledged: the tail holds them.
    fn all_acked(&self, held: &HeldReply) -> bool {
        held.pushes.iter().all(|(range, seq)| self.acked_to(held.worker, *range, *seq))
    }

    /// How far replies held for the tails may leave: the transport sends each reply held at a
    /// position up to this one ([`Reply::hold_until`]).
    pub fn released(&self) -> u64 {
        if self.failing.is_some() {
            return self.released_last;
        }
        let mut released = self.released_last;
        for held in self.held.iter().take_while(|h| self.all_acked(h)) {
            released = held.position;
        }
        released
    }

    /// Why the replies held past [`released`](Self::released) are being sent as errors, while
    /// they are.
    pub fn failure(&self) -> Option<&str> {
        self.failing.map(|_| {
            "the push is not acknowledged: its chain did not carry it to the tail in time (a member may have failed); the worker resends it to the range's head"
        })
    }

    /// A new configuration from the coordinator.
    pub fn config(&mut self, tables: &mut Tables, disk: &mut Option<Box<ShardDisk>>, config: Arc<ClusterConfig>) {
        if config.chains.len() != self.rcfg.ranges as usize {
            tracing::error!(ranges = config.chains.len(), ours = self.rcfg.ranges, "a configuration with another number of ranges; ignored");
            return;
        }
        if self.recovering {
            self.config_waiting = Some(config);
            return;
        }
        let _span = tracing::info_span!("reconfigure", shard = self.shard, config = config.id).entered();
        tracing::debug!("a new cluster configuration");
        self.with_replica(tables, disk, |r, now| r.step(now, Addr::Coordinator, Msg::Config(config)));
        self.hold_placed(tables, disk);
    }

    /// Makes memory for the ranges whose chains this server joined (a learner's snapshot, or a
    /// new chain's first pushes, land in it) and those its disk held, and frees what it has of
    /// any other range of the shard's (a checkpoint's part of a range the log then dropped).
    fn hold_placed(&mut self, tables: &mut Tables, disk: &Option<Box<ShardDisk>>) {
        let checkpointing = disk.as_deref().is_some_and(ShardDisk::checkpointing);
        for range in (0..self.rcfg.ranges).filter(|r| shard_of_range(*r, self.rcfg.ranges, self.shards) == self.shard) {
            if !self.in_chain(range) {
                tables.release(range, checkpointing);
            } else if let Err(e) = tables.hold(range) {
                tracing::error!(shard = self.shard, range, error = %e, "cannot hold a range this server's chain placement gives it");
            }
        }
    }

    /// Whether this shard's server is in `range`'s chain (a member or a learner), or still
    /// holds what it had of it: the shard keeps memory for the range.
    pub fn in_chain(&self, range: u32) -> bool {
        if shard_of_range(range, self.rcfg.ranges, self.shards) != self.shard {
            return false;
        }
        let placed = self.replica.config().and_then(|c| c.chains.get(range as usize)).is_some_and(|c| c.holds(self.me.node));
        placed || self.replica.range_state(RangeId(range)).is_some()
    }

    /// A `Replicate` request: a batch of messages ([`codec::encode_batch`]) from peer
    /// `header.worker`, taken in order. A batch that does not decode, is empty, or holds a
    /// message a peer may not send, is refused whole.
    ///
    /// The acknowledgements for that peer that the messages produce (a tail that took updates
    /// acknowledges them at once) go back in the reply, as a batch the peer's outbox hands to
    /// its shard ([`replied`](Self::replied)): one request and one thread hand-off per hop
    /// fewer than sending them as requests of their own. Acknowledgements are cumulative, so
    /// one that overtakes another this way is harmless.
    pub fn serve_peer(&mut self, tables: &mut Tables, disk: &mut Option<Box<ShardDisk>>, request: &Request<'_>, reply: &mut Reply<'_>) -> Result<()> {
        let mut msgs = std::mem::take(&mut self.peer_msgs);
        let served = self.serve_peer_msgs(tables, disk, request, reply, &mut msgs);
        msgs.clear();
        self.peer_msgs = msgs;
        served
    }

    /// [`serve_peer`](Self::serve_peer), decoding into `msgs`.
    fn serve_peer_msgs(
        &mut self,
        tables: &mut Tables,
        disk: &mut Option<Box<ShardDisk>>,
        request: &Request<'_>,
        reply: &mut Reply<'_>,
        msgs: &mut Vec<Msg>,
    ) -> Result<()> {
        // A large update is kept as a view of the request's frame, not copied.
        codec::decode_batch_into(request.body, lent_frame(request).as_ref(), &mut self.payloads, msgs)
            .map_err(|e| EngineError::BadRequest { reason: e.to_string() })?;
        if msgs.is_empty() {
            return Err(EngineError::BadRequest { reason: "a Replicate request with no message".into() });
        }
        let from_peer =
            |m: &Msg| matches!(m, Msg::Forward { .. } | Msg::Durable { .. } | Msg::Ack { .. } | Msg::Need { .. } | Msg::Snapshot { .. } | Msg::Resume { .. });
        if let Some(msg) = msgs.iter().find(|m| !from_peer(m)) {
            return Err(EngineError::BadRequest { reason: format!("a peer may not send a {} message", msg.kind()) });
        }
        let peer = NodeId(request.header.worker);
        // What the peer is owed goes in the reply, unless it wants none (its acknowledgements
        // come one way): then through the outbox, as to any peer.
        self.answering = (request.header.flags & flags::NO_REPLY == 0).then_some(peer);
        self.with_replica(tables, disk, |r, now| msgs.drain(..).for_each(|msg| r.step(now, Addr::Node(peer), msg)));
        self.answering = None;
        self.answer_body.clear();
        codec::encode_batch(&self.answer_acks, &mut self.answer_body);
        if self.answer_body.len() > REPLY_ACKS_BYTES_MAX.min(reply.frame_bytes_max().saturating_sub(HEADER_BYTES)) {
            self.answer_body.clear();
            self.answer_acks.drain(..).for_each(|ack| self.outbox.to_node(peer, self.shard, ack));
        }
        self.answer_acks.clear();
        reply.ok_bytes(&self.answer_body);
        Ok(())
    }

    /// A message a peer's reply to this shard's `Replicate` request carried (see
    /// [`serve_peer`](Self::serve_peer)), handed over by the outbox: an acknowledgement, taken
    /// as from the peer. Anything else is dropped: a peer of this build sends nothing else
    /// that way.
    pub fn replied(&mut self, tables: &mut Tables, disk: &mut Option<Box<ShardDisk>>, peer: NodeId, msg: Msg) {
        if self.recovering || !matches!(msg, Msg::Ack { .. }) {
            return;
        }
        self.with_replica(tables, disk, |r, now| r.step(now, Addr::Node(peer), msg));
    }

    /// Takes the replies that came to the requests this shard started on peers' links itself
    /// (see [`Outbox::take_own_replies`]): their acknowledgements go in as from the peer.
    pub fn take_own_replies(&mut self, tables: &mut Tables, disk: &mut Option<Box<ShardDisk>>) {
        let mut acks = std::mem::take(&mut self.own_acks);
        self.outbox.take_own_replies(&mut |node, msgs| acks.extend(msgs.drain(..).filter(|m| matches!(m, Msg::Ack { .. })).map(|m| (node, m))));
        if !acks.is_empty() && !self.recovering {
            self.with_replica(tables, disk, |r, now| acks.drain(..).for_each(|(peer, msg)| r.step(now, Addr::Node(peer), msg)));
        }
        acks.clear();
        self.own_acks = acks;
    }

    /// Sockets this shard's poll is to watch from now on: replies to its own requests come
    /// there ([`Outbox::sockets_to_watch`]).
    pub fn sockets_to_watch(&mut self) -> impl Iterator<Item = std::os::fd::RawFd> + '_ {
        self.outbox.sockets_to_watch()
    }

    /// A `WorkerPush` request: a batch of pushes ([`codec::encode_batch`]) to ranges this shard
    /// heads, each range's in order; or, with an empty body, a poll. A listed push's keys may
    /// come as a list to remember or as the hash of one remembered before (`lists`: this
    /// connection's); each push is made plain first (a hash not held refuses the batch with
    /// `KeysUnknown`, and the worker sends it again with its keys). Every push the head
    /// applies is checked before any enters the protocol: one that can never apply is named
    /// in the reply ([`Msg::Refused`]) and nothing of its batch is applied. The pushes are
    /// applied at once, and their batches close at once too, unless an update of the range is
    /// still in flight down the chain ([`Replica::flush`]): then they wait for its
    /// acknowledgement and leave as one update. A chain of one acknowledges them in this reply.
    /// The reply carries every acknowledgement and refusal waiting for the worker.
    #[allow(clippy::too_many_arguments)]
    pub fn serve_worker(
        &mut self,
        tables: &mut Tables,
        disk: &mut Option<Box<ShardDisk>>,
        lists: &mut KeyLists<Vec<u64>>,
        request: &Request<'_>,
        reply: &mut Reply<'_>,
    ) -> Result<()> {
        let (header, body) = (&request.header, request.body);
        let worker = header.worker;
        let bad = |reason: String| EngineError::BadRequest { reason };
        if worker >= self.rcfg.workers {
            // The ranges' clocks count this many workers: a push of another would be dropped.
            let reason = format!(
                "worker id {worker} is over this cluster's {} workers (ids 0 to {}; the coordinator's --workers, or a standalone server's --workers-max)",
                self.rcfg.workers,
                self.rcfg.workers - 1
            );
            return Err(bad(reason));
        }
        let mut scratch = std::mem::take(&mut self.worker_scratch);
        let mut decoded = std::mem::take(&mut scratch.decoded);
        codec::decode_batch_into(body, lent_frame(request).as_ref(), &mut self.payloads, &mut decoded)
            .map_err(|e| bad(format!("a WorkerPush body that is no batch of messages: {e}")))?;
        for msg in &mut decoded {
            if let Msg::Push { payload, .. } = msg {
                if let Some(plain) = resolve_key_list(lists, payload, &mut self.payloads)? {
                    *payload = plain;
                }
            }
        }
        // Pushes the worker awaits here as their ranges' tail (only from a worker that hears
        // from tails): taken out, the rest must be pushes.
        let tail_acks = header.flags & flags::TAIL_ACKS != 0;
        scratch.awaited.clear();
        for msg in &decoded {
            if let (true, Msg::PushAck { range, seq }) = (tail_acks, msg) {
                if range.0 >= self.rcfg.ranges {
                    return Err(bad(format!("a worker awaits a push to range {} of this cluster's {}", range.0, self.rcfg.ranges)));
                }
                scratch.awaited.push((*range, *seq));
            }
        }
        if !scratch.awaited.is_empty() {
            decoded.retain(|m| !matches!(m, Msg::PushAck { .. }));
        }
        // A replica whose log failed would apply pushes it can never make durable, and never
        // acknowledges the ones it applied and did not log: a worker's pushes are refused, not
        // applied, and its polls for acknowledgements are
        // told why none will come. The server leaves its chains (see `pump`): where each of
        // this shard's ranges has another member, the worker sends its pushes again to the
        // next head; where this shard is a range's only member, it keeps them until the server
        // is restarted with room.
        if let Some(reason) = disk.as_deref().and_then(ShardDisk::failure) {
            return Err(match self.replaceable() {
                true => EngineError::LeavingChains { reason: reason.to_string() },
                false => EngineError::LogFailed { reason: reason.to_string() },
            });
        }
        // Only a push the head applies now is checked against its table: the worker's next
        // push to a range this shard heads, counting the batch's earlier ones. One it holds
        // already is acknowledged again and one after a gap is dropped, whatever the table has
        // become since it was first sent (other workers may have filled it meanwhile); a
        // replica that is not the range's head answers `NotHead`. So a push refused here was
        // never applied: it is named in the reply ([`Msg::Refused`]) and nothing of the batch
        // is applied, and the worker takes it back and sends the rest again.
        // Pushes from a client another one with the same worker id has succeeded, and pushes
        // numbered as one this head applied from another such client, are refused by name too
        // (see `clients`): taken for resends, they would be acknowledged and never applied.
        let incarnation = header.start;
        let current = self.clients.admit(worker, incarnation);
        let (refused, next, applying) = (&mut scratch.refused, &mut scratch.next_seqs, &mut scratch.applying);
        refused.clear();
        next.clear();
        applying.clear();
        let in_use = |range: RangeId, seq: u32, why| {
            let e = EngineError::WorkerIdInUse { worker, why };
            Msg::Refused { range, seq, status: e.status() as u16, reason: e.to_string() }
        };
        for msg in &decoded {
            let Msg::Push { range, worker: w, seq, payload } = msg else {
                return Err(bad(format!("a worker may only push (or, hearing from tails, await pushes), not send a {} message", msg.kind())));
            };
            if w.0 != worker {
                return Err(bad(format!("worker {worker} sent a push signed by worker {}", w.0)));
            }
            if range.0 >= self.rcfg.ranges {
                return Err(bad(format!("a push to range {} of this cluster's {}", range.0, self.rcfg.ranges)));
            }
            let at = match next.iter().position(|(r, _)| r == range) {
                Some(at) => at,
                None => {
                    next.push((*range, self.replica.worker_seq(*range, WorkerId(worker)).map(|applied| applied + 1)));
                    next.len() - 1
                }
            };
            // Not the head (`None`), or the range's pushes wait behind a refused one (`Some(0)`).
            let Some(expected) = next[at].1.filter(|expected| *expected > 0) else { continue };
            let collides = *seq < expected && !self.clients.may_resend(worker, range.0, incarnation, *seq);
            if !current || collides {
                refused.push(in_use(*range, *seq, if current { clients::COLLIDED } else { clients::SUCCEEDED }));
                next[at].1 = Some(0);
                continue;
            }
            // Applied before (acknowledged again), or after a gap (dropped).
            if *seq != expected {
                continue;
            }
            next[at].1 = Some(expected + 1);
            applying.push((*range, *seq));
            match ChainStore::check_push(tables, self.rcfg.ranges, *range, payload) {
                Ok(h) => {
                    if tables.at(h.table, range.0).is_none() {
                        // A head without memory for its range (making it failed): refused, not applied.
                        return Err(EngineError::RangeNotHeld { range: range.0 });
                    }
                    if h.worker != worker {
                        return Err(bad(format!("worker {worker} sent a push signed by worker {} in its payload", h.worker)));
                    }
                    self.last_push_table = Some(h.table);
                }
                Err(e) if e.status().never_applies() => {
                    refused.push(Msg::Refused { range: *range, seq: *seq, status: e.status() as u16, reason: e.to_string() });
                    // No push is numbered 0: the range's later pushes wait behind this one.
                    next[at].1 = Some(0);
                }
                Err(e) => return Err(e),
            }
        }
        if !refused.is_empty() {
            decoded.clear();
            scratch.applying.clear();
        }
        for &(range, seq) in &scratch.applying {
            self.clients.applied(worker, range.0, incarnation, seq);
        }
        scratch.pushed.clear();
        scratch.pushed.extend(decoded.iter().filter_map(|m| if let Msg::Push { range, seq, .. } = m { Some((*range, *seq)) } else { None }));
        let stepped = !decoded.is_empty();
        self.replica.store_mut().applied.clear();
        if stepped {
            let from = Addr::Worker(WorkerId(worker));
            // Batches close now unless an update of their range is still in flight (then the
            // pushes wait in it for the acknowledgement): a push to an idle chain leaves for the
            // successor before this reply leaves for the worker.
            self.with_replica(tables, disk, |r, now| {
                decoded.drain(..).for_each(|msg| r.step(now, from, msg));
                r.flush();
            });
        }
        // Pushes not yet acknowledged (a longer chain has yet to carry them to its tail, or the
        // log to make them durable): the reply waits for them, so the worker hears of their
        // acknowledgement as soon as there is one, without asking again and again. A worker
        // that hears from tails awaits them at the tail instead: there the reply waits for the
        // pushes it names to ranges this shard is the tail of, and for the pushes it carries to
        // chains of one (a push to a range it is not the tail of, the worker learns of from
        // the head when it asks).
        // The reply claims their acknowledgements now and leaves once they are true; if one
        // cannot be, the reply becomes an error instead (see `pump`).
        let mut waits = self.held_spare.pop().unwrap_or_default();
        waits.clear();
        match tail_acks {
            false => waits.extend(scratch.pushed.iter().copied().filter(|(range, seq)| self.replica.awaits(*range, WorkerId(worker), *seq))),
            true => {
                let awaited = scratch.awaited.iter().copied();
                let awaited = awaited.filter(|(range, seq)| !self.acked_to(WorkerId(worker), *range, *seq) && self.replica.acks_as_tail(*range));
                // A push to a chain of one is awaited where it was sent: its head is its tail.
                let alone = scratch.pushed.iter().copied();
                let alone = alone.filter(|(range, seq)| self.replica.heads_alone(*range) && self.replica.awaits(*range, WorkerId(worker), *seq));
                waits.extend(awaited.chain(alone));
            }
        }
        let claimed = &mut scratch.claimed;
        claimed.clear();
        claimed.extend_from_slice(&waits);
        claimed.sort_unstable_by_key(|&(range, seq)| (range.0, std::cmp::Reverse(seq)));
        claimed.dedup_by_key(|(range, _)| *range);
        if waits.is_empty() {
            self.held_spare.push(waits);
        } else {
            self.held_last += 1;
            reply.hold_until(self.held_last);
            self.held.push_back(HeldReply { position: self.held_last, worker: WorkerId(worker), pushes: waits, at_tail: tail_acks, held_at: Instant::now() });
        }
        scratch.news.clear();
        scratch.news.extend(self.mailbox.range((worker, 0)..(worker + 1, 0)).map(|(k, n)| (*k, *n)));
        let msgs = &mut scratch.reply;
        msgs.clear();
        for &((_, range), n) in &scratch.news {
            self.mailbox.remove(&(worker, range));
            let range = RangeId(range);
            // A claim the news carries is taken from the claims (its seq set to 0).
            let claim = match claimed.binary_search_by_key(&range, |c| c.0) {
                Ok(i) => std::mem::take(&mut claimed[i].1),
                Err(_) => 0,
            };
            let acked = n.acked.max(claim);
            if acked > 0 {
                msgs.push(Msg::PushAck { range, seq: acked });
            }
            if let Some(config_id) = n.not_head {
                msgs.push(Msg::NotHead { range, config_id });
            }
        }
        msgs.extend(claimed.iter().filter(|c| c.1 > 0).map(|&(range, seq)| Msg::PushAck { range, seq }));
        msgs.append(&mut scratch.refused);
        if header.flags & flags::PUSH_SEQS != 0 {
            // Per range this shard heads: the worker's pushes committed (acknowledged again, in
            // case an acknowledgement was lost), and those applied (not to be sent again).
            for range in (0..self.rcfg.ranges).map(RangeId) {
                let worker = WorkerId(worker);
                if let Some(seq) = self.replica.worker_committed(range, worker).filter(|s| *s > 0) {
                    msgs.push(Msg::PushAck { range, seq });
                }
                if let Some(seq) = self.replica.worker_seq(range, worker) {
                    msgs.push(Msg::SeqCount { range, seq });
                }
            }
        }
        scratch.body.clear();
        codec::encode_batch(msgs.iter(), &mut scratch.body);
        // The stamp of what this frame's pushes touched: only when every push in it was applied here now (a push seen before, or not
        // this shard's to apply, leaves the worker to the stamp it can vouch for itself).
        scratch.stamp.clear();
        if !scratch.pushed.is_empty() && self.replica.store().applied.len() == scratch.pushed.len() {
            applied_stamp(tables, &self.replica.store().applied, &mut scratch.stamp, &mut scratch.part_stamp);
        }
        reply.ok_stamped(&scratch.stamp, &scratch.body);
        scratch.decoded = decoded;
        self.worker_scratch = scratch;
        Ok(())
    }

    /// Whether this shard holds `range`'s data now, so it may serve pulls of it.
    pub fn holds(&self, range: u32) -> bool {
        self.replica.range_state(RangeId(range)).is_some_and(|s| s.installed)
    }

    /// Whether every range of this shard whose chain this server is in has another member:
    /// the cluster can do without this server's shard (its log failed, say).
    pub fn replaceable(&self) -> bool {
        let Some(config) = self.replica.config() else { return false };
        let mine = |(range, _): &(usize, &tessera_replication::protocol::Chain)| shard_of_range(*range as u32, self.rcfg.ranges, self.shards) == self.shard;
        config.chains.iter().enumerate().filter(mine).filter(|(_, c)| c.nodes.contains(&self.me.node)).all(|(_, c)| c.nodes.len() > 1)
    }

    pub fn ranges(&self) -> u32 {
        self.rcfg.ranges
    }

    /// The replica's counters, for `tessera status`.
    pub fn replica_stats(&self) -> &tessera_replication::replica::ReplicaStats {
        self.replica.stats()
    }
}

/// Into `stamp`, the meet of the stamps of `applied`'s keys (trailing zero clocks dropped): for
/// each worker, a clock every key the pushes touched has reached. `part` is a buffer.
fn applied_stamp(tables: &Tables, applied: &[(u32, RangeId, Range<u64>)], stamp: &mut Vec<u64>, part: &mut Vec<u64>) {
    stamp.clear();
    let mut first = true;
    for (table, range, keys) in applied {
        let Some(at) = tables.at(*table, range.0).filter(|_| !keys.is_empty()) else { continue };
        part.clear();
        part.resize(at.stamp_len(), 0);
        at.stamp_into(keys.clone(), part);
        if first {
            stamp.extend_from_slice(part);
            first = false;
        } else {
            stamp.truncate(part.len());
            stamp.iter_mut().zip(part.iter()).for_each(|(s, p)| *s = (*s).min(*p));
        }
    }
    while stamp.last() == Some(&0) {
        stamp.pop();
    }
}

/// The read buffer a request's body lies in, when the transport lends it, as a payload the
/// decoder takes views of.
fn lent_frame(request: &Request<'_>) -> Option<Payload> {
    request.shared.map(|buf| Payload::whole(buf.clone()))
}

/// The plain payload a push sent with key-list caching stands for (`None` when it is plain
/// already), remembering or looking up its keys in `lists`.
fn resolve_key_list(lists: &mut KeyLists<Vec<u64>>, payload: &[u8], payloads: &mut PayloadPool) -> Result<Option<Payload>> {
    let bad = |e: tessera_replication::ReplicationError| EngineError::BadRequest { reason: e.to_string() };
    match PushHeader::key_list(payload).map_err(bad)? {
        KeyList::Plain => Ok(None),
        KeyList::Remember => {
            let plain = PushHeader::plain(payload, None).map_err(bad)?;
            let (h, keys, _) = PushHeader::parse(&plain).map_err(bad)?;
            // Once the lists are full, a new one reuses an evicted list's storage.
            lists.insert_with(key_list_hash_le(keys), h.count, |old| {
                let mut list = old.unwrap_or_default();
                list.clear();
                list.extend(keys.chunks_exact(8).map(|k| u64::from_le_bytes(k.try_into().expect("8 bytes"))));
                list
            });
            Ok(Some(plain.into()))
        }
        KeyList::Cached { hash } => {
            let count = u32::from_le_bytes(payload[16..20].try_into().expect("a header checked by key_list"));
            let keys = lists.touch(hash, count).ok_or(EngineError::KeysUnknown { hash, count })?;
            // Into a kept payload: a list sent by its hash is the steady state of a caching
            // worker, and allocates nothing.
            let mut failed = None;
            let plain = payloads.make_with(|out| failed = PushHeader::write_plain(payload, Some(keys), out).err());
            match failed {
                Some(e) => Err(bad(e)),
                None => Ok(Some(plain)),
            }
        }
    }
}
