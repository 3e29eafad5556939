//! One server's side of chain replication, as a state machine with no I/O.
//!
//! Messages and time go in ([`Replica::step`], [`Replica::tick`], [`Replica::flush`]); messages to
//! send come out ([`Replica::take_ready`]). The server drives it over the transport seam with real
//! clocks; the simulator ([`crate::sim`]) drives the same code with seeded fake ones.
//!
//! Per range, the protocol is van Renesse and Schneider's chain replication, with the range's
//! vector clock (section 4.3 of the OSDI'14 parameter-server paper) making retries harmless:
//! - The head applies a worker's `seq`-th push only if the range's clock shows `seq - 1` pushes
//!   of that worker; a push it already applied is acknowledged again, never applied twice.
//! - Pushes applied between two [`Replica::flush`] calls become one update (aggregate, then
//!   replicate), numbered by the range's `version` and carrying the clock after it. While the
//!   range's last update is unacknowledged by the successor, a flush leaves the batch open, so a
//!   busy chain carries fewer, larger updates ([`UPDATES_IN_FLIGHT_MAX`]).
//! - Each replica applies updates in version order only, keeps those its successor has not
//!   acknowledged, and resends them after `resend_interval_ms` without progress.
//! - The tail acknowledges up the chain; the head acknowledges a push once the tail holds it.
//! - A replica acts only on the chain of its configuration's epoch for the range; messages of
//!   another epoch are dropped, and their senders retry once they have caught up.
//! - A server joins a chain as a learner: the tail sends it a snapshot, then streams updates;
//!   the coordinator appends it as the new tail once it has caught up. A learner that holds
//!   the range already (a server restarted from its disk) first asks to resume: every update
//!   carries a digest of the range's history up to it, every replica keeps its last updates,
//!   and a tail whose history holds the learner's version with the same digest sends only the
//!   updates after it. A learner whose disk holds a branch nobody else has (an old head's
//!   updates that never reached its successor) has another digest, and gets a snapshot.
//! - Over a store with a disk ([`Store::persist`]), each replica commits an update (and passes
//!   its acknowledgement up the chain) only once its own disk holds it too, and a learner
//!   vouches only for what its disk holds. So an acknowledged push is on the disk of every
//!   chain member, and a cluster that loses power at once restarts from its disks: a replica
//!   holds again what its store recovered, and acts on it when the coordinator makes it the
//!   range's chain alone. Writes to the disks are pipelined along the chain, not one after the
//!   other.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::config::{
    ReplicationConfig, BATCH_PUSHES_MAX, HISTORY_BYTES_PER_REPLICA, HISTORY_ENTRIES_MAX, LOG_ENTRIES_MAX, RESEND_BATCH_MAX, RESEND_WAIT_MS_MAX,
    SNAPSHOT_WAIT_MS_MAX, UPDATES_IN_FLIGHT_MAX, WAITING_MAX,
};
use crate::protocol::{Addr, Chain, ClusterConfig, Epoch, Msg, NodeId, Payload, RangeId, RangeReport, WorkerId};

/// Where a range's parameters live: the engine's shard in a server, a few integers in the
/// simulator. Payloads are opaque to the protocol.
pub trait Store {
    /// Applies a worker's push to `range` (on the head) and folds its effect into `delta`, the
    /// update the head forwards; `delta` is empty at the start of each batch. `forwarded` is
    /// [`seal`](Store::seal)'s: whether the update goes on to another replica.
    fn apply_push(&mut self, range: RangeId, payload: &[u8], delta: &mut Vec<u8>, forwarded: bool);
    /// Applies an update the predecessor forwarded, or none of it: an update that does not fit
    /// what the store holds (corrupt, or from a hostile sender) is refused with the reason.
    fn apply_delta(&mut self, range: RangeId, delta: &[u8]) -> Result<(), String>;
    /// The range's data, whole.
    fn snapshot(&self, range: RangeId) -> Vec<u8>;
    /// Replaces the range's data with a snapshot, or refuses it whole, as `apply_delta` does.
    fn install(&mut self, range: RangeId, data: &[u8]) -> Result<(), String>;
    /// Forgets the range: this server no longer holds it.
    fn drop_range(&mut self, range: RangeId);
    /// The head's batch for `range` closes: finish `delta` (a store that records what pushes
    /// touched, and sends the state they left, writes it here). `forwarded` says whether the
    /// update goes on to another replica: when it does not (a chain of one), only the store's
    /// own log could read `delta`, and a store that keeps none may leave it as it is.
    fn seal(&mut self, _range: RangeId, _delta: &mut Vec<u8>, _forwarded: bool) {}
    /// Starts writing what `range` holds at `version` (after an update `bytes`, or a snapshot
    /// when `whole`), with its history digest, to the store's disk, and returns the write's log
    /// sequence number: the version is durable once [`durable_lsn`](Store::durable_lsn)
    /// reaches it. A store without a disk keeps the default, under which every version is
    /// durable at once.
    fn persist(&mut self, _range: RangeId, _version: u64, _digest: u32, _clock: &[u32], _bytes: &[u8], _whole: bool) -> u64 {
        0
    }
    /// Every write up to this log sequence number is on disk.
    fn durable_lsn(&self) -> u64 {
        0
    }
    /// The ranges the store found on its disk when it started, each with the version and clock
    /// it holds, and the history digest at that version if the disk recorded it: a replica
    /// restarted from its disk holds them again.
    fn recovered(&self) -> Vec<Recovered> {
        Vec::new()
    }
}

/// A range a store found on its disk ([`Store::recovered`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub range: RangeId,
    pub version: u64,
    pub clock: Vec<u32>,
    /// `None` from a disk written before digests were recorded: such a range is not resumed.
    pub digest: Option<u32>,
}

/// The digest of a range's history after update `version` (with clock `clock` and bytes
/// `delta`), given the digest before it: a CRC-32C chained over every update since the range
/// was born. Two replicas whose histories differ anywhere hold the same digest with a chance
/// of one in 2^32. A range is born with digest 0.
pub fn digest_after(before: u32, version: u64, clock: &[u32], delta: &[u8]) -> u32 {
    let mut crc = crc32c::crc32c_append(before, &version.to_le_bytes());
    crc = crc32c::crc32c_append(crc, bytemuck::cast_slice(clock));
    crc32c::crc32c_append(crc, delta)
}

/// Deliberate bugs, for the simulator's canary tests only: each one must be caught by a checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Canary {
    #[default]
    None,
    /// The head acknowledges a push as soon as it applies it, before the tail holds it.
    AckAtHead,
    /// Replicas commit updates as soon as they hold them in memory, before their disks do.
    AckBeforeDurable,
    /// A tail lets a learner resume from what it holds without comparing history digests.
    ResumeUnchecked,
    /// A tail that acknowledges workers ([`Replica::ack_from_tail`]) does so once it holds an
    /// update, without waiting for the replicas upstream to hold it on disk.
    TailAckUndurable,
}

/// An update kept until the successor acknowledges it.
#[derive(Debug, Clone)]
struct Entry {
    version: u64,
    /// The range's history digest after this update.
    digest: u32,
    clock: Arc<[u32]>,
    delta: Payload,
}

/// A push the head applied (or saw again), acknowledged once the tail holds `version`.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    version: u64,
    worker: WorkerId,
    seq: u32,
}

/// The head's batch of pushes not yet forwarded. Its delta is held by nothing else until the
/// batch closes.
#[derive(Debug)]
struct Open {
    delta: Payload,
    pushes: usize,
}

impl Open {
    fn delta_mut(&mut self) -> &mut Vec<u8> {
        self.delta.vec_mut().expect("an open batch's delta is a vector held by nothing else")
    }
}

/// Updates a full history forgets at once: the oldest ones are cold in the cache, and letting
/// go of them together overlaps their misses (one at a time, with every update, it was most of
/// the time a chain of one spent on an update beyond the table's own work).
const HISTORY_FORGOTTEN_AT_ONCE: usize = 32;

/// Most buffers of each kind [`Spares`] keeps.
const SPARES_MAX: usize = 64;

/// The deltas and clocks of updates the history let go of that nothing else held, kept for the
/// next updates: a warm replica, whose history is full, allocates none.
#[derive(Debug, Default)]
struct Spares {
    deltas: Vec<Payload>,
    clocks: Vec<Arc<[u32]>>,
}

impl Spares {
    /// Keeps `entry`'s buffers if nothing else holds them and there is room. A delta this
    /// replica received is a view of a frame, or a pool's: only one it built is kept.
    fn keep(&mut self, entry: Entry) {
        let Entry { mut delta, mut clock, .. } = entry;
        if self.deltas.len() < SPARES_MAX && delta.vec_mut().is_some() {
            self.deltas.push(delta);
        }
        if Arc::get_mut(&mut clock).is_some() && self.clocks.len() < SPARES_MAX {
            self.clocks.push(clock);
        }
    }

    /// An empty delta for a new batch.
    fn delta(&mut self) -> Payload {
        match self.deltas.pop() {
            Some(mut delta) => {
                delta.vec_mut().expect("kept only when a vector held by nothing else").clear();
                delta
            }
            None => Payload::from(Vec::new()),
        }
    }

    /// A clock holding `clock`.
    fn clock(&mut self, clock: &[u32]) -> Arc<[u32]> {
        match self.clocks.iter().rposition(|c| c.len() == clock.len()) {
            Some(at) => {
                let mut kept = self.clocks.swap_remove(at);
                Arc::get_mut(&mut kept).expect("kept only when held by nothing else").copy_from_slice(clock);
                kept
            }
            None => Arc::from(clock),
        }
    }
}

/// A tail's learner, and how far it has come.
///
/// Until it is `synced`, the tail commits updates without it. It becomes synced once it holds
/// every update the tail committed that way (`acked >= ungated`); from then on the tail commits
/// only what the learner holds too. So when the coordinator appends a synced learner to the
/// chain, the new tail holds every committed update, as every chain member must: a learner
/// that merely lagged a little could otherwise become the only copy after the old tail fails,
/// without updates that were already acknowledged.
#[derive(Debug, Clone, Copy)]
struct Learner {
    node: NodeId,
    /// A learner that restarted is a new learner, with nothing.
    incarnation: u64,
    acked: u64,
    needs_snapshot: bool,
    synced: bool,
    /// The last version committed without the learner.
    ungated: u64,
    /// A snapshot went to it: it no longer resumes from what it held.
    snapshot_sent: bool,
    /// It resumes from what it held: the version and digest it was granted, said again until
    /// it is synced (the grant, or its acknowledgement, may be lost).
    resumed: Option<(u64, u32)>,
    /// The oldest snapshot sent that it has not acknowledged (nor anything since): its version,
    /// and when it went. Until then the tail's log reaches back to it, so that the
    /// acknowledgement of any snapshot sent since can be followed by the updates after it.
    unacked_snapshot: Option<(u64, u64)>,
    /// How long its last acknowledged snapshot took, from sending to acknowledgement, in ms.
    snapshot_round_trip_ms: Option<u64>,
}

impl Learner {
    fn new(node: NodeId, incarnation: u64) -> Self {
        Self {
            node,
            incarnation,
            acked: 0,
            needs_snapshot: true,
            synced: false,
            ungated: 0,
            snapshot_sent: false,
            resumed: None,
            unacked_snapshot: None,
            snapshot_round_trip_ms: None,
        }
    }
}

/// What this replica holds of one range.
#[derive(Debug)]
struct RangeState {
    epoch: Epoch,
    /// Holds the range's data: false for a learner until its snapshot arrives, and for a server
    /// put in a chain it holds nothing of (it must not act; the coordinator removes it).
    installed: bool,
    version: u64,
    /// Updates the tail is known to hold.
    committed: u64,
    clock: Vec<u32>,
    /// Updates the downstream replica (successor, or the tail's learner) has not acknowledged.
    log: VecDeque<Entry>,
    open: Option<Open>,
    waiting: VecDeque<Waiting>,
    learner: Option<Learner>,
    /// When the downstream replica last made progress, or we last resent to it.
    progress_ms: u64,
    /// How long resends wait: the round trips to the successor, measured as TCP measures its
    /// own (one update timed at a time, never a resent one), and the resends since the last
    /// progress.
    round_trip: RoundTrip,
    /// When this replica last asked its upstream to fill a gap.
    need_ms: Option<u64>,
    /// Held as a learner (not yet a chain member).
    learning: bool,
    /// Which holding of the range this is: a range dropped and taken again starts over.
    generation: u64,
    /// The highest version of this holding the store's disk holds (`None` until it holds one:
    /// a snapshot installed starts it over), and the versions written since, each with the log
    /// sequence number that makes it durable.
    durable: Option<u64>,
    unsynced: VecDeque<(u64, u64)>,
    /// The version this replica would commit if its disk were instant: it commits
    /// `min(goal, durable)`, so every chain member holds each committed update on disk.
    goal: u64,
    /// The digest of the range's history up to `version` ([`digest_after`]), and whether it is
    /// known (not for a range recovered from a disk that did not record it).
    digest: u32,
    digest_known: bool,
    /// The last updates applied, oldest first, ending at `version` (see [`HISTORY_ENTRIES_MAX`]),
    /// and their bytes.
    history: VecDeque<Entry>,
    history_bytes: usize,
    /// A learner that asked its tail to resume from what it holds (not yet `installed`).
    resuming: bool,
    /// The lowest version every replica upstream of this one holds on disk, as the upstream
    /// replica last said (in a `Forward` or a `Durable`); 0 until one says.
    upstream_durable: u64,
    /// What this replica last told its downstream replica of the chain's durable prefix, and
    /// which replica that was.
    told_durable: Option<(NodeId, u64)>,
    /// On a tail that acknowledges workers: the version up to which it did, and the seq it last
    /// acknowledged to each worker.
    tail_acked: u64,
    worker_acked: Vec<u32>,
}

/// A range's measured round trip to its successor (forward to acknowledgement), in ms, and the
/// wait before a resend that follows from it: a smoothed mean plus four mean deviations
/// (Jacobson's estimator), never under the configured interval, doubled per resend that
/// brought no progress, at most [`RESEND_WAIT_MS_MAX`]. Under load a chain's round trips grow
/// past a fixed interval; resending then only adds to its queue (1 MiB pushes at three replicas
/// collapsed so), and the wait grows with them instead.
#[derive(Debug, Default, Clone, Copy)]
struct RoundTrip {
    /// The update being timed: its version and when it was forwarded.
    timing: Option<(u64, u64)>,
    /// Smoothed round trip and mean deviation, once measured.
    mean_ms: Option<u64>,
    deviation_ms: u64,
    /// Resends since the downstream replica last made progress.
    resends: u32,
}

impl RoundTrip {
    /// Update `version` was forwarded for the first time at `now`: timed if none is.
    fn forwarded(&mut self, version: u64, now: u64) {
        self.timing.get_or_insert((version, now));
    }

    /// The downstream replica acknowledged `version` at `now`: progress.
    fn acked(&mut self, version: u64, now: u64) {
        self.resends = 0;
        let Some((_, at)) = self.timing.filter(|(timed, _)| *timed <= version) else { return };
        self.timing = None;
        let sample = now.saturating_sub(at);
        match self.mean_ms {
            None => {
                self.mean_ms = Some(sample);
                self.deviation_ms = sample / 2;
            }
            Some(mean) => {
                self.deviation_ms = (3 * self.deviation_ms + mean.abs_diff(sample)) / 4;
                self.mean_ms = Some((7 * mean + sample) / 8);
            }
        }
    }

    /// The log was resent: what is in flight is not timed (its acknowledgement may answer
    /// either sending), and the next wait is twice as long.
    fn resent(&mut self) {
        self.timing = None;
        self.resends = self.resends.saturating_add(1);
    }

    /// The longest round trip the measurements expect (mean plus four deviations); 0 before the
    /// first measurement.
    fn measured_ms(&self) -> u64 {
        self.mean_ms.map_or(0, |m| m + 4 * self.deviation_ms)
    }

    /// How long to wait for progress before resending, `interval` at least.
    fn wait_ms(&self, interval: u64) -> u64 {
        let base = self.measured_ms().max(interval).min(RESEND_WAIT_MS_MAX);
        base.saturating_mul(1 << self.resends.min(16)).min(RESEND_WAIT_MS_MAX.max(interval))
    }

    /// How long to wait for a learner's acknowledgement of its snapshot before sending another:
    /// as [`RoundTrip::wait_ms`], but at least twice the last snapshot's round trip, and doubled
    /// per resend up to [`SNAPSHOT_WAIT_MS_MAX`] rather than [`RESEND_WAIT_MS_MAX`]. A snapshot is
    /// a whole range: behind a slow link each one sent too soon only lengthens the queue that
    /// delays the first.
    fn snapshot_wait_ms(&self, interval: u64, snapshot_round_trip_ms: Option<u64>) -> u64 {
        let base = self.measured_ms().max(interval).max(snapshot_round_trip_ms.map_or(0, |rt| 2 * rt));
        base.saturating_mul(1 << self.resends.min(16)).min(SNAPSHOT_WAIT_MS_MAX.max(interval))
    }
}

/// The lowest version this replica and every one upstream of it hold on disk, as far as it
/// knows: its own durable version on a head, else the lower of that and what upstream said.
fn durable_prefix(st: &RangeState, place: Place, canary: Canary) -> u64 {
    let own = if canary == Canary::AckBeforeDurable { st.version } else { st.durable.unwrap_or(0) };
    if place.head {
        own
    } else {
        own.min(st.upstream_durable)
    }
}

/// Forgets logged updates up to `version`: the downstream replica holds them.
fn trim(log: &mut VecDeque<Entry>, version: u64) {
    while log.front().is_some_and(|e| e.version <= version) {
        log.pop_front();
    }
}

impl RangeState {
    fn new(epoch: Epoch, installed: bool, workers: u32) -> Self {
        Self {
            epoch,
            installed,
            version: 0,
            committed: 0,
            clock: vec![0; workers as usize],
            upstream_durable: 0,
            told_durable: None,
            tail_acked: 0,
            worker_acked: vec![0; workers as usize],
            log: VecDeque::new(),
            open: None,
            waiting: VecDeque::new(),
            learner: None,
            progress_ms: 0,
            round_trip: RoundTrip::default(),
            need_ms: None,
            learning: false,
            generation: 0,
            durable: None,
            unsynced: VecDeque::new(),
            goal: 0,
            digest: 0,
            digest_known: true,
            history: VecDeque::new(),
            history_bytes: 0,
            resuming: false,
        }
    }

    /// Keeps `entry`, just applied, in the history. Past [`HISTORY_ENTRIES_MAX`] entries or
    /// `bytes_max` bytes it forgets the oldest, [`HISTORY_FORGOTTEN_AT_ONCE`] more than it must
    /// (their buffers go to `spares`).
    fn remember(&mut self, entry: &Entry, bytes_max: usize, spares: &mut Spares) {
        self.history_bytes += entry.delta.len();
        self.history.push_back(entry.clone());
        if self.history.len() <= HISTORY_ENTRIES_MAX && self.history_bytes <= bytes_max {
            return;
        }
        let keep = self.history.len().min(HISTORY_ENTRIES_MAX).saturating_sub(HISTORY_FORGOTTEN_AT_ONCE);
        while self.history.len() > keep || self.history_bytes > bytes_max {
            let Some(old) = self.history.pop_front() else { break };
            self.history_bytes -= old.delta.len();
            spares.keep(old);
        }
    }

    /// Forgets the history: what comes next does not follow it (a snapshot was installed).
    fn forget_history(&mut self) {
        self.history.clear();
        self.history_bytes = 0;
    }

    /// This replica's history digest at `version`, if it holds the updates after it: the
    /// current version, or one its history reaches back to.
    fn digest_at(&self, version: u64) -> Option<u32> {
        if !self.digest_known || version > self.version {
            return None;
        }
        if version == self.version {
            return Some(self.digest);
        }
        let first = self.history.front()?.version;
        let at = version.checked_sub(first)? as usize;
        // `first` is the oldest update kept, so its predecessor's digest is not: the learner
        // must hold at least `first`, whose digest names everything before it.
        self.history.get(at).filter(|e| e.version == version).map(|e| e.digest)
    }

    /// What a learner can vouch for: what its disk holds, once it holds its snapshot.
    fn vouched(&self) -> Option<u64> {
        self.durable.filter(|_| self.installed)
    }
}

/// This replica's neighbours in one range's chain.
#[derive(Debug, Clone, Copy)]
struct Place {
    epoch: Epoch,
    head: bool,
    /// Where updates come from: the predecessor, or for a learner the tail.
    upstream: Option<NodeId>,
    /// The successor in the chain.
    succ: Option<NodeId>,
    /// This replica is the tail and the chain has a learner: the learner, and its incarnation.
    learner: Option<(NodeId, u64)>,
    is_learner: bool,
}

impl Place {
    fn of(config: &ClusterConfig, chain: &Chain, me: NodeId) -> Option<Self> {
        if let Some(i) = chain.position(me) {
            let tail = i + 1 == chain.nodes.len();
            let incarnation = |n: NodeId| config.member(n).map_or(0, |m| m.incarnation);
            return Some(Self {
                epoch: chain.epoch,
                head: i == 0,
                upstream: i.checked_sub(1).map(|p| chain.nodes[p]),
                succ: chain.nodes.get(i + 1).copied(),
                learner: chain.learner.filter(|_| tail).map(|l| (l, incarnation(l))),
                is_learner: false,
            });
        }
        (chain.learner == Some(me)).then(|| Self { epoch: chain.epoch, head: false, upstream: chain.tail(), succ: None, learner: None, is_learner: true })
    }

    fn is_tail(&self) -> bool {
        !self.is_learner && self.succ.is_none()
    }

    fn downstream(&self) -> Option<NodeId> {
        self.succ.or(self.learner.map(|(l, _)| l))
    }
}

/// What a replica holds of one range, for status and the simulator's checkers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeView<'a> {
    pub installed: bool,
    pub version: u64,
    pub committed: u64,
    pub clock: &'a [u32],
    /// Changes when the replica drops the range and takes it again (it then starts over).
    pub generation: u64,
    /// The range's history digest at `version`, when known ([`digest_after`]).
    pub digest: Option<u32>,
}

/// Counters a server exports (`tessera status`, per replicated shard) and the simulator prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaStats {
    pub pushes_applied: u64,
    pub pushes_duplicate: u64,
    /// Pushes dropped: out of order (an earlier one is missing), or the log is full.
    pub pushes_dropped: u64,
    pub updates_forwarded: u64,
    pub updates_resent: u64,
    pub snapshots_sent: u64,
    /// Learners that resumed from what they held, sent only the updates they lacked (on their
    /// tail).
    pub resumes: u64,
    /// Ranges this replica resumed from what it held (as a learner), and snapshots it installed.
    pub resumed: u64,
    pub snapshots_installed: u64,
    /// Messages dropped because they belong to another epoch or come from a stranger.
    pub stale_dropped: u64,
    /// Acknowledgements sent to workers by this replica as a tail ([`Replica::ack_from_tail`]).
    pub tail_acks: u64,
    /// Messages from a peer refused, nothing of them applied: updates and snapshots whose clock
    /// has another width than the range's or goes backwards, or that the store could not apply;
    /// acknowledgements of versions this replica never had; requests for updates it no longer
    /// keeps. Replicas of one build never send such a thing; a corrupt or hostile message does
    /// (see [`Replica::take_refusals`]). The simulator's checker fails on any.
    pub refused: u64,
}

/// Refusals kept for [`Replica::take_refusals`] between two calls; more are only counted.
const REFUSALS_KEPT: usize = 16;

/// Why an update or snapshot's clock `new` cannot follow the range's clock `old`.
fn clock_misfit(old: &[u32], new: &[u32], installed: bool) -> Option<String> {
    if old.len() != new.len() {
        Some(format!("its clock has {} entries, the range's {}", new.len(), old.len()))
    } else if installed && old.iter().zip(new).any(|(o, n)| n < o) {
        Some("its clock goes backwards".into())
    } else {
        None
    }
}

/// One server's replication state machine.
#[derive(Debug)]
pub struct Replica<S> {
    id: NodeId,
    incarnation: u64,
    addr: String,
    /// The cluster this server's disk belongs to, named in its heartbeats (0: none yet).
    cluster: u64,
    rcfg: ReplicationConfig,
    config: Option<Arc<ClusterConfig>>,
    ranges: Vec<Option<RangeState>>,
    /// The ranges this replica takes part in (all, unless [`Replica::serving`] narrowed them).
    serves: Vec<bool>,
    store: S,
    out: Vec<(Addr, Msg)>,
    now_ms: u64,
    heartbeat_due_ms: u64,
    /// Whether a coordinator hears this replica's heartbeats (not a standalone server's).
    heartbeats: bool,
    canary: Canary,
    /// Tails acknowledge workers' pushes themselves ([`Replica::ack_from_tail`]).
    tail_acks: bool,
    stats: ReplicaStats,
    /// Peer messages refused since the driver last asked, with the reason.
    refusals: Vec<(RangeId, String)>,
    /// Range holdings created so far (see `RangeState::generation`).
    generations: u64,
    /// Bytes of history each range served keeps: its share of [`HISTORY_BYTES_PER_REPLICA`].
    history_bytes_max: usize,
    spares: Spares,
}

impl<S: Store> Replica<S> {
    /// A server that has just started: it holds nothing until the coordinator's configuration
    /// names it (as a learner, or in the first epoch of a new range).
    /// `addr` is where peers and workers reach it (empty in the simulator).
    pub fn new(id: NodeId, incarnation: u64, addr: String, rcfg: ReplicationConfig, store: S) -> Self {
        let ranges = (0..rcfg.ranges).map(|_| None).collect();
        let rcfg_ranges = rcfg.ranges;
        let serves = vec![true; rcfg.ranges as usize];
        let mut replica = Self {
            id,
            incarnation,
            addr,
            cluster: 0,
            rcfg,
            config: None,
            ranges,
            serves,
            store,
            out: Vec::new(),
            now_ms: 0,
            heartbeat_due_ms: 0,
            heartbeats: true,
            canary: Canary::None,
            tail_acks: false,
            stats: ReplicaStats::default(),
            refusals: Vec::new(),
            generations: 0,
            history_bytes_max: HISTORY_BYTES_PER_REPLICA / (rcfg_ranges.max(1) as usize),
            spares: Spares::default(),
        };
        replica.recover();
        replica
    }

    /// Holds again what the store found on its disk. A recovered range acts only once a
    /// configuration names this incarnation in its chain: as the sole member of a chain whose
    /// members all went down (the coordinator revives it from the best copy it hears of), or,
    /// placed as a learner, not at all (it starts over from the tail's snapshot).
    fn recover(&mut self) {
        let workers = self.rcfg.workers as usize;
        for Recovered { range, version, clock, digest } in self.store.recovered() {
            let Some(slot) = self.ranges.get_mut(range.0 as usize) else { continue };
            if clock.len() != workers {
                self.refuse(range, format!("its clock on disk has {} entries, the cluster's {workers}: not recovered", clock.len()));
                continue;
            }
            let mut st = RangeState::new(Epoch(0), true, self.rcfg.workers);
            st.version = version;
            st.clock = clock;
            (st.digest, st.digest_known) = (digest.unwrap_or(0), digest.is_some());
            (st.durable, st.generation) = (Some(version), self.generations);
            self.generations += 1;
            *slot = Some(st);
        }
    }

    /// Narrows this replica to the ranges `serves` picks: it takes no place in the others'
    /// chains, and its heartbeats report only these. A server runs one replica per shard, each
    /// for the shard's own ranges.
    pub fn serving(mut self, serves: impl Fn(RangeId) -> bool) -> Self {
        self.serves = (0..self.rcfg.ranges).map(|r| serves(RangeId(r))).collect();
        self.history_bytes_max = HISTORY_BYTES_PER_REPLICA / self.serves.iter().filter(|s| **s).count().max(1);
        for (slot, serves) in self.ranges.iter_mut().zip(&self.serves) {
            if !serves {
                *slot = None;
            }
        }
        self
    }

    /// Names in its heartbeats the cluster its disk belongs to: a coordinator of another
    /// cluster refuses it (see [`ClusterConfig::cluster`]).
    pub fn of_cluster(mut self, cluster: u64) -> Self {
        self.cluster = cluster;
        self
    }

    /// Plants a deliberate bug (simulator canaries only).
    #[doc(hidden)]
    pub fn plant(&mut self, canary: Canary) {
        self.canary = canary;
    }

    /// Whether a chain's tail acknowledges workers' pushes itself, besides the head: a worker
    /// then hears of a push as soon as the tail holds it and every replica holds it on disk,
    /// without the acknowledgement's way back up the chain. Each `Forward` carries the lowest
    /// version the replicas upstream hold on disk, and a `Durable` says when that grows with no
    /// update to carry it. Off by default: the worker must be able to hear from the tail.
    pub fn ack_from_tail(&mut self, on: bool) {
        self.tail_acks = on;
    }

    /// Whether [`tick`](Self::tick) sends the coordinator heartbeats (on by default). A server
    /// with no coordinator, under a configuration that never changes, sends none.
    pub fn send_heartbeats(&mut self, on: bool) {
        self.heartbeats = on;
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, for a driver that lends it what it holds between calls.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    pub fn stats(&self) -> &ReplicaStats {
        &self.stats
    }

    /// Peer messages refused since the last call, with the reason (at most a few; `stats`
    /// counts all), for the driver to log.
    pub fn take_refusals(&mut self) -> Vec<(RangeId, String)> {
        std::mem::take(&mut self.refusals)
    }

    /// Refuses a peer's message about `range`, having applied none of it.
    fn refuse(&mut self, range: RangeId, reason: String) {
        self.stats.refused += 1;
        if self.refusals.len() < REFUSALS_KEPT {
            self.refusals.push((range, reason));
        }
    }

    pub fn config(&self) -> Option<&Arc<ClusterConfig>> {
        self.config.as_ref()
    }

    /// Messages to send, in the order they were produced.
    pub fn take_ready(&mut self) -> Vec<(Addr, Msg)> {
        std::mem::take(&mut self.out)
    }

    /// [`take_ready`](Self::take_ready) into `ready`, which must be empty: the two lists trade
    /// places, so a driver that keeps `ready` and empties it allocates no list per step.
    pub fn take_ready_into(&mut self, ready: &mut Vec<(Addr, Msg)>) {
        debug_assert!(ready.is_empty(), "messages left in the list given");
        std::mem::swap(&mut self.out, ready);
    }

    /// What this replica holds of `range`.
    pub fn range_state(&self, range: RangeId) -> Option<RangeView<'_>> {
        let st = self.ranges.get(range.0 as usize)?.as_ref()?;
        let (installed, version, committed, generation) = (st.installed, st.version, st.committed, st.generation);
        let digest = st.digest_known.then_some(st.digest);
        Some(RangeView { installed, version, committed, clock: &st.clock, generation, digest })
    }

    /// Whether this replica, as `range`'s head, has `worker`'s push `seq` waiting for the tail
    /// to hold it: its acknowledgement is still to come. False once it was acknowledged, and
    /// for a push this replica dropped or no longer answers for.
    pub fn awaits(&self, range: RangeId, worker: WorkerId, seq: u32) -> bool {
        let Some(st) = self.ranges.get(range.0 as usize).and_then(Option::as_ref) else { return false };
        st.waiting.iter().any(|w| w.worker == worker && w.seq == seq)
    }

    /// Whether this replica, as `range`'s tail, acknowledges workers' pushes to it
    /// ([`Replica::ack_from_tail`]): a worker that awaits them here hears of them.
    pub fn acks_as_tail(&self, range: RangeId) -> bool {
        let Some(st) = self.ranges.get(range.0 as usize).and_then(Option::as_ref).filter(|s| s.installed) else { return false };
        self.tail_acks && self.place(range).is_some_and(|p| p.is_tail() && !p.head && p.epoch == st.epoch)
    }

    /// Whether this replica is both `range`'s head and its tail (a chain of one): a worker that
    /// hears from tails awaits its pushes to the range here, in the pushes' own reply.
    pub fn heads_alone(&self, range: RangeId) -> bool {
        let Some(st) = self.ranges.get(range.0 as usize).and_then(Option::as_ref).filter(|s| s.installed) else { return false };
        self.place(range).is_some_and(|p| p.head && p.is_tail() && p.epoch == st.epoch)
    }

    /// The number of `worker`'s last push applied to `range`, when this replica is the range's
    /// head: a client that starts (or restarts) as that worker numbers its pushes from there.
    pub fn worker_seq(&self, range: RangeId, worker: WorkerId) -> Option<u32> {
        let st = self.ranges.get(range.0 as usize)?.as_ref().filter(|s| s.installed)?;
        self.place(range).filter(|p| p.head && p.epoch == st.epoch)?;
        st.clock.get(worker.0 as usize).copied()
    }

    /// How many of `worker`'s pushes to `range` are committed, when this replica is the
    /// range's head and its history still shows it: the worker's entry in the range's clock at
    /// the committed version. A worker that polls hears this as an acknowledgement, so that
    /// one whose acknowledgement was lost need not resend pushes the head holds
    /// ([`Pusher::resend`](crate::worker::Pusher::resend)).
    pub fn worker_committed(&self, range: RangeId, worker: WorkerId) -> Option<u32> {
        let st = self.ranges.get(range.0 as usize)?.as_ref().filter(|s| s.installed)?;
        self.place(range).filter(|p| p.head && p.epoch == st.epoch)?;
        let w = worker.0 as usize;
        if st.committed == st.version && st.open.is_none() {
            return st.clock.get(w).copied();
        }
        let first = st.history.front()?.version;
        let entry = st.history.get(st.committed.checked_sub(first)? as usize).filter(|e| e.version == st.committed)?;
        entry.clock.get(w).copied()
    }

    /// The (range, epoch) pairs this replica acts as head for.
    pub fn heads(&self) -> impl Iterator<Item = (RangeId, Epoch)> + '_ {
        self.ranges.iter().enumerate().filter_map(move |(r, st)| {
            let st = st.as_ref().filter(|s| s.installed)?;
            let place = self.place(RangeId(r as u32))?;
            (place.head && place.epoch == st.epoch).then_some((RangeId(r as u32), st.epoch))
        })
    }

    /// One report per range held, as the heartbeat carries them.
    pub fn reports(&self) -> Vec<RangeReport> {
        let held = self.ranges.iter().enumerate().filter_map(|(r, st)| st.as_ref().map(|st| (r, st)));
        held.map(|(r, st)| RangeReport {
            range: RangeId(r as u32),
            epoch: st.epoch,
            installed: st.installed,
            version: st.version,
            committed: st.committed,
            ticks: st.clock.iter().map(|c| *c as u64).sum(),
            learner_synced: st.learner.is_some_and(|l| l.synced),
        })
        .collect()
    }

    fn send(&mut self, to: NodeId, msg: Msg) {
        self.out.push((Addr::Node(to), msg));
    }

    fn place(&self, range: RangeId) -> Option<Place> {
        let config = self.config.as_ref()?;
        if config.member(self.id).is_none_or(|m| m.incarnation != self.incarnation) {
            return None;
        }
        Place::of(config, config.chain(range)?, self.id)
    }

    /// Takes one message.
    pub fn step(&mut self, now_ms: u64, from: Addr, msg: Msg) {
        self.now_ms = now_ms;
        match (from, msg) {
            (_, Msg::Push { range, worker, seq, payload }) => self.on_push(range, worker, seq, &payload),
            (Addr::Node(from), Msg::Forward { range, epoch, version, digest, clock, delta, durable }) => {
                self.on_forward(from, range, epoch, Entry { version, digest, clock, delta }, durable)
            }
            (Addr::Node(from), Msg::Durable { range, epoch, version }) => self.on_durable(from, range, epoch, version),
            (Addr::Node(from), Msg::Ack { range, epoch, version }) => self.on_ack(from, range, epoch, version),
            (Addr::Node(from), Msg::Need { range, epoch, version }) => self.on_need(from, range, epoch, version),
            (Addr::Node(from), Msg::Snapshot { range, epoch, version, digest, clock, data }) => {
                self.on_snapshot(from, range, epoch, version, digest, &clock, &data)
            }
            (Addr::Node(from), Msg::Resume { range, epoch, version, digest }) => self.on_resume(from, range, epoch, version, digest),
            (Addr::Coordinator, Msg::Config(config)) => self.on_config(config),
            _ => self.stats.stale_dropped += 1,
        }
    }

    /// Advances time: heartbeats, and resends to successors that have not made progress.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        if self.heartbeats && now_ms >= self.heartbeat_due_ms {
            self.heartbeat_due_ms = now_ms + self.rcfg.heartbeat_interval_ms;
            let config_id = self.config.as_ref().map_or(0, |c| c.id);
            let (node, incarnation, addr, cluster) = (self.id, self.incarnation, self.addr.clone(), self.cluster);
            let msg = Msg::Heartbeat { node, incarnation, addr, cluster, config_id, ranges: self.reports() };
            self.out.push((Addr::Coordinator, msg));
        }
        for r in 0..self.ranges.len() {
            self.resend(RangeId(r as u32));
            self.ask_resume(RangeId(r as u32));
        }
    }

    /// Closes the heads' batches that may leave now: the pushes applied since the last flush
    /// leave as one update per range, unless the range already has
    /// [`UPDATES_IN_FLIGHT_MAX`] updates its successor has not acknowledged (the batch then
    /// grows until it does). The driver calls it after each burst of messages it delivered (a
    /// server: after each request of pushes, and once per turn), so a push to an idle chain
    /// leaves at once, and under load the pushes that come while an update is in flight leave
    /// together when it is acknowledged: one message per hop, and one apply on each successor,
    /// for all of them.
    pub fn flush(&mut self) {
        self.close_batches(false);
    }

    /// Closes every head's batch, whatever is in flight: before a checkpoint, which must find
    /// every applied push counted in its range's version, and before a new configuration, under
    /// which a batch applied in the old one must not leave.
    pub fn flush_all(&mut self) {
        self.close_batches(true);
    }

    fn close_batches(&mut self, all: bool) {
        for r in 0..self.ranges.len() {
            let range = RangeId(r as u32);
            if all || !self.forwards_in_flight_full(range) {
                self.close_batch(range);
            }
        }
        self.settle_durable();
    }

    /// Whether the range's open batch waits for its successor's acknowledgement
    /// ([`UPDATES_IN_FLIGHT_MAX`]). Only a successor's acknowledgements trim the log on their
    /// own: a tail's log for its learner is not waited for.
    fn forwards_in_flight_full(&self, range: RangeId) -> bool {
        self.ranges[range.0 as usize].as_ref().is_some_and(|st| st.open.is_some() && st.log.len() >= UPDATES_IN_FLIGHT_MAX)
            && self.place(range).is_some_and(|p| p.succ.is_some())
    }

    /// Takes up what the store's disk now holds: commits (and acknowledges upstream) what
    /// waited for it, and a learner vouches for it.
    fn settle_durable(&mut self) {
        let lsn = self.store.durable_lsn();
        for r in 0..self.ranges.len() {
            let range = RangeId(r as u32);
            let Some(st) = self.ranges[r].as_mut() else { continue };
            let before = st.durable;
            while let Some(&(version, _)) = st.unsynced.front().filter(|(_, at)| *at <= lsn) {
                st.durable = st.durable.max(Some(version));
                st.unsynced.pop_front();
            }
            if st.durable == before {
                continue;
            }
            let (goal, epoch, vouched) = (st.goal, st.epoch, st.vouched());
            let Some(place) = self.place(range).filter(|p| p.epoch == epoch) else { continue };
            if place.is_learner {
                if let (Some(up), Some(version)) = (place.upstream, vouched) {
                    self.send(up, Msg::Ack { range, epoch, version });
                }
            } else {
                self.tell_durable(range, place);
                self.commit(range, place, goal);
            }
        }
    }

    /// `range` now holds `version`, being written to disk as `lsn` (see [`Store::persist`]).
    fn persisted(&mut self, range: RangeId, version: u64, lsn: u64) {
        let durable_lsn = self.store.durable_lsn();
        let st = self.ranges[range.0 as usize].as_mut().expect("persisted a held range");
        if lsn <= durable_lsn && st.unsynced.is_empty() {
            st.durable = st.durable.max(Some(version));
        } else {
            st.unsynced.push_back((version, lsn));
        }
    }

    fn on_push(&mut self, range: RangeId, worker: WorkerId, seq: u32, payload: &[u8]) {
        let place = self.place(range).filter(|p| p.head);
        let config_id = self.config.as_ref().map_or(0, |c| c.id);
        let Some(st) = self.ranges.get_mut(range.0 as usize).and_then(Option::as_mut).filter(|s| s.installed) else {
            self.out.push((Addr::Worker(worker), Msg::NotHead { range, config_id }));
            return;
        };
        let Some(place) = place.filter(|p| p.epoch == st.epoch) else {
            self.out.push((Addr::Worker(worker), Msg::NotHead { range, config_id }));
            return;
        };
        let w = worker.0 as usize;
        let full = place.succ.is_some() && st.log.len() >= LOG_ENTRIES_MAX;
        if w >= st.clock.len() || full || st.waiting.len() >= WAITING_MAX {
            self.stats.pushes_dropped += 1;
            return;
        }
        let pending = st.version + st.open.is_some() as u64;
        if seq <= st.clock[w] {
            // Applied before: acknowledge it again once the update that holds it is committed.
            st.waiting.push_back(Waiting { version: pending, worker, seq });
            self.stats.pushes_duplicate += 1;
        } else if seq == st.clock[w] + 1 {
            let spares = &mut self.spares;
            let open = st.open.get_or_insert_with(|| Open { delta: spares.delta(), pushes: 0 });
            self.store.apply_push(range, payload, open.delta_mut(), place.downstream().is_some());
            open.pushes += 1;
            st.clock[w] = seq;
            st.waiting.push_back(Waiting { version: st.version + 1, worker, seq });
            self.stats.pushes_applied += 1;
            if self.canary == Canary::AckAtHead {
                self.out.push((Addr::Worker(worker), Msg::PushAck { range, seq }));
            }
            if open.pushes >= BATCH_PUSHES_MAX {
                self.close_batch(range);
            }
        } else {
            // An earlier push is missing; the worker resends them all in order.
            self.stats.pushes_dropped += 1;
        }
        self.release_acks(range);
    }

    /// Turns the head's open batch into the next update and sends it down the chain.
    fn close_batch(&mut self, range: RangeId) {
        // Most ranges have no open batch at a flush: they are left before their place is looked up.
        if self.ranges[range.0 as usize].as_ref().is_none_or(|st| st.open.is_none()) {
            return;
        }
        let forwarded = self.place(range).is_some_and(|p| p.downstream().is_some());
        let Some(st) = self.ranges[range.0 as usize].as_mut() else { return };
        let Some(mut open) = st.open.take() else { return };
        self.store.seal(range, open.delta_mut(), forwarded);
        st.version += 1;
        st.digest = digest_after(st.digest, st.version, &st.clock, &open.delta);
        let entry = Entry { version: st.version, digest: st.digest, clock: self.spares.clock(&st.clock), delta: open.delta };
        let lsn = self.store.persist(range, entry.version, entry.digest, &entry.clock, &entry.delta, false);
        self.persisted(range, entry.version, lsn);
        self.after_apply(range, entry);
    }

    /// What follows applying update `entry`, on any replica: keep it for the downstream replica
    /// and send it there, or (on the tail) commit it.
    fn after_apply(&mut self, range: RangeId, entry: Entry) {
        let place = self.place(range);
        let history_bytes_max = self.history_bytes_max;
        let st = self.ranges[range.0 as usize].as_mut().expect("applied to a held range");
        st.remember(&entry, history_bytes_max, &mut self.spares);
        let Some(place) = place else { return };
        if let Some(down) = place.downstream() {
            if st.log.is_empty() {
                st.progress_ms = self.now_ms;
            }
            st.log.push_back(entry.clone());
            if place.succ.is_none() && st.log.len() > LOG_ENTRIES_MAX {
                // The tail's learner is far behind: a fresh snapshot replaces the log, and the
                // tail commits without it until it has caught up again.
                st.log.clear();
                if let Some(l) = st.learner.as_mut() {
                    l.needs_snapshot = true;
                    l.synced = false;
                    l.unacked_snapshot = None;
                }
            }
            let learner_waits = place.succ.is_none() && st.learner.is_some_and(|l| l.needs_snapshot);
            if !learner_waits {
                st.round_trip.forwarded(entry.version, self.now_ms);
                let durable = durable_prefix(st, place, self.canary);
                st.told_durable = Some((down, durable));
                let Entry { version, digest, clock, delta } = entry;
                let msg = Msg::Forward { range, epoch: st.epoch, version, digest, clock, delta, durable };
                self.stats.updates_forwarded += 1;
                self.out.push((Addr::Node(down), msg));
            }
        }
        if place.is_tail() {
            match st.learner.as_mut() {
                // Committed once the learner holds it too (`on_ack`).
                Some(l) if l.synced => return,
                // The learner holds a snapshot and is sent every update in order: from here on
                // the tail commits only what it holds too, so `ungated` stops moving and the
                // learner catches up with it. Committing without it would let every push move
                // the mark on, and under steady pushes whose forward and acknowledgement take
                // longer than the gap between two pushes the learner never synced and the chain
                // never healed (the kill test over RDMA in a slow SoftRoCE guest, 2026-11-23).
                Some(l) if !l.needs_snapshot => return,
                Some(l) => l.ungated = st.version,
                None => {}
            }
            let version = st.version;
            self.commit(range, place, version);
        } else if place.is_learner {
            let up = place.upstream.expect("a learner's chain has a tail");
            if let Some(version) = st.vouched() {
                self.out.push((Addr::Node(up), Msg::Ack { range, epoch: st.epoch, version }));
            }
        }
    }

    /// `version` is held by every replica after this one that must hold it (on the tail: by
    /// the tail and its synced learner). Once this replica's disk holds it too, it is
    /// committed here: tell the chain upstream, and (on the head) the workers.
    fn commit(&mut self, range: RangeId, place: Place, version: u64) {
        let canary = self.canary;
        let st = self.ranges[range.0 as usize].as_mut().expect("committing a held range");
        st.goal = st.goal.max(version);
        let version = if canary == Canary::AckBeforeDurable { version } else { version.min(st.durable.unwrap_or(0)) };
        if version <= st.committed {
            return;
        }
        st.committed = version;
        if let Some(up) = place.upstream {
            let msg = Msg::Ack { range, epoch: st.epoch, version };
            self.out.push((Addr::Node(up), msg));
        }
        self.release_acks(range);
        self.ack_at_tail(range, place);
    }

    /// On a tail that acknowledges workers ([`Replica::ack_from_tail`]): acknowledges each
    /// worker's pushes up to what the range's clock counts at the newest version that is both
    /// committed here and on disk at every replica upstream. The clock counts each worker's
    /// pushes applied, so the tail keeps nothing per push; a version the history no longer
    /// holds the clock of waits for the next (the head acknowledges it anyway).
    fn ack_at_tail(&mut self, range: RangeId, place: Place) {
        if !self.tail_acks || !place.is_tail() || place.head {
            return;
        }
        let canary = self.canary;
        let Some(st) = self.ranges[range.0 as usize].as_mut().filter(|st| st.installed && st.epoch == place.epoch) else { return };
        let ackable = if canary == Canary::TailAckUndurable { st.committed } else { st.committed.min(st.upstream_durable) };
        if ackable <= st.tail_acked {
            return;
        }
        let clock: &[u32] = if ackable == st.version {
            &st.clock
        } else {
            match st.history.iter().rev().find(|e| e.version == ackable) {
                Some(e) => &e.clock,
                None => return,
            }
        };
        for (w, (&seq, acked)) in clock.iter().zip(st.worker_acked.iter_mut()).enumerate() {
            if seq > *acked {
                *acked = seq;
                self.stats.tail_acks += 1;
                self.out.push((Addr::Worker(WorkerId(w as u32)), Msg::PushAck { range, seq }));
            }
        }
        st.tail_acked = ackable;
    }

    /// Tells the downstream replica how far the chain up to here holds the range on disk, if
    /// that grew since it was last told (only where tails acknowledge workers).
    fn tell_durable(&mut self, range: RangeId, place: Place) {
        if !self.tail_acks {
            return;
        }
        let Some(down) = place.downstream() else { return };
        let canary = self.canary;
        let Some(st) = self.ranges[range.0 as usize].as_mut().filter(|st| st.installed && st.epoch == place.epoch) else { return };
        let durable = durable_prefix(st, place, canary);
        if st.told_durable.is_some_and(|(to, told)| to == down && told >= durable) || durable == 0 {
            return;
        }
        st.told_durable = Some((down, durable));
        let epoch = st.epoch;
        self.send(down, Msg::Durable { range, epoch, version: durable });
    }

    /// The upstream replica says how far the chain up to it holds the range on disk.
    fn on_durable(&mut self, from: NodeId, range: RangeId, epoch: Epoch, version: u64) {
        let Some(place) = self.expect_from(range, epoch, from, true) else { return };
        let st = self.ranges[range.0 as usize].as_mut().expect("checked by expect_from");
        if version <= st.upstream_durable {
            return;
        }
        st.upstream_durable = version;
        self.tell_durable(range, place);
        self.ack_at_tail(range, place);
    }

    /// Acknowledges the pushes the tail now holds (on the head).
    fn release_acks(&mut self, range: RangeId) {
        let Some(st) = self.ranges[range.0 as usize].as_mut() else { return };
        while let Some(w) = st.waiting.front().filter(|w| w.version <= st.committed) {
            let (worker, seq) = (w.worker, w.seq);
            st.waiting.pop_front();
            if self.canary != Canary::AckAtHead {
                self.out.push((Addr::Worker(worker), Msg::PushAck { range, seq }));
            }
        }
    }

    /// Checks that `from` sent a message of `range`'s current epoch from where such messages
    /// come: returns this replica's place if so.
    fn expect_from(&mut self, range: RangeId, epoch: Epoch, from: NodeId, upstream: bool) -> Option<Place> {
        let place = self.place(range);
        let st = self.ranges.get(range.0 as usize).and_then(Option::as_ref);
        let ok = match (place, st) {
            (Some(p), Some(st)) if p.epoch == epoch && st.epoch == epoch => {
                if upstream {
                    p.upstream == Some(from)
                } else {
                    p.downstream() == Some(from)
                }
            }
            _ => false,
        };
        if !ok {
            self.stats.stale_dropped += 1;
        }
        place.filter(|_| ok)
    }

    fn on_forward(&mut self, from: NodeId, range: RangeId, epoch: Epoch, entry: Entry, durable: u64) {
        let Some(place) = self.expect_from(range, epoch, from, true) else { return };
        let st = self.ranges[range.0 as usize].as_mut().expect("checked by expect_from");
        st.upstream_durable = st.upstream_durable.max(durable);
        if !st.installed {
            return; // a learner waiting for its snapshot
        }
        if entry.version == st.version + 1 {
            let refused = clock_misfit(&st.clock, &entry.clock, true).map_or_else(|| self.store.apply_delta(range, &entry.delta), Err);
            if let Err(reason) = refused {
                self.refuse(range, format!("update {} from node {from}: {reason}", entry.version));
                return;
            }
            let st = self.ranges[range.0 as usize].as_mut().expect("checked by expect_from");
            st.clock.copy_from_slice(&entry.clock);
            st.version = entry.version;
            st.digest = entry.digest;
            let lsn = self.store.persist(range, entry.version, entry.digest, &entry.clock, &entry.delta, false);
            self.persisted(range, entry.version, lsn);
            self.after_apply(range, entry);
        } else if entry.version <= st.version {
            // Seen before: our acknowledgement may have been lost; say again what we can vouch for.
            let up = place.upstream.expect("checked by expect_from");
            let vouch = if place.is_learner { st.vouched().unwrap_or(0) } else { st.committed };
            if vouch > 0 {
                self.send(up, Msg::Ack { range, epoch, version: vouch });
            }
        } else if st.need_ms.is_none_or(|at| self.now_ms >= at + self.rcfg.resend_interval_ms) {
            // A gap: an earlier update was lost, and the predecessor resends it after its resend
            // interval anyway. Asking makes that sooner, and if the predecessor no longer keeps
            // what we lack (it should: every chain member holds the committed updates, and it
            // keeps the rest), it sends a snapshot rather than leave us stuck.
            st.need_ms = Some(self.now_ms);
            let version = st.version;
            let up = place.upstream.expect("checked by expect_from");
            self.send(up, Msg::Need { range, epoch, version });
        }
    }

    fn on_need(&mut self, from: NodeId, range: RangeId, epoch: Epoch, version: u64) {
        let Some(place) = self.expect_from(range, epoch, from, false) else { return };
        let st = self.ranges[range.0 as usize].as_mut().expect("checked by expect_from");
        if !st.installed {
            return;
        }
        // What the downstream replica is known to hold already: a successor every committed
        // update, a learner what it acknowledged. A Need older than that was overtaken.
        let learner = st.learner.filter(|l| place.succ.is_none() && l.node == from);
        let held = version.max(learner.map_or(st.committed, |l| l.acked));
        if held >= st.version {
            return;
        }
        if st.log.front().is_some_and(|e| e.version <= held + 1) {
            // Resend from there. The log itself stays: it is trimmed only by acknowledgements
            // (a successor that holds more than the committed prefix may still fail, and its
            // own successor then needs those updates from here).
            st.progress_ms = self.now_ms;
            self.resend_after(range, from, held);
            return;
        } else if let Some(l) = st.learner.as_mut().filter(|_| learner.is_some()) {
            // The learner fell behind what the log keeps: a snapshot, resent until acknowledged.
            // Until it holds one, the tail commits without it again, what it held back included.
            l.needs_snapshot = true;
            l.synced = false;
            l.ungated = st.version;
            st.progress_ms = 0;
            let version = st.version;
            self.commit(range, place, version);
        } else {
            let reason = format!(
                "a need from node {from}, which holds version {held}: this replica no longer keeps {} (its log starts at {:?})",
                held + 1,
                st.log.front().map(|e| e.version)
            );
            self.refuse(range, reason);
            return;
        }
        self.resend(range);
    }

    /// Sends `to` the whole range. The log restarts after it (everything in it is in the
    /// snapshot), unless an earlier snapshot to the same learner is still unacknowledged: the
    /// log then keeps reaching back to that one, whose acknowledgement may come first.
    fn send_snapshot(&mut self, range: RangeId, to: NodeId) {
        // A snapshot is exact at one version: pushes applied but not yet numbered go first.
        self.close_batch(range);
        let now = self.now_ms;
        let st = self.ranges[range.0 as usize].as_mut().expect("a snapshot of a held range");
        let version = st.version;
        let learner = st.learner.as_mut().filter(|l| l.node == to);
        if learner.as_ref().is_none_or(|l| l.unacked_snapshot.is_none()) {
            st.log.clear();
        }
        if let Some(l) = learner {
            l.snapshot_sent = true;
            l.unacked_snapshot.get_or_insert((version, now));
        }
        st.progress_ms = now;
        let (epoch, digest, clock) = (st.epoch, st.digest, st.clock.as_slice().into());
        let data = self.store.snapshot(range).into();
        self.stats.snapshots_sent += 1;
        self.send(to, Msg::Snapshot { range, epoch, version, digest, clock, data });
    }

    fn on_ack(&mut self, from: NodeId, range: RangeId, epoch: Epoch, version: u64) {
        let Some(place) = self.expect_from(range, epoch, from, false) else { return };
        let now = self.now_ms;
        let st = self.ranges[range.0 as usize].as_mut().expect("checked by expect_from");
        if version > st.version {
            let reason = format!("an acknowledgement from node {from} of version {version}, past ours ({})", st.version);
            self.refuse(range, reason);
            return;
        }
        if place.succ == Some(from) {
            // Every replica after this one holds `version`: committed here and upstream once
            // this one's disk holds it too.
            if version > st.goal {
                st.progress_ms = now;
                st.round_trip.acked(version, now);
                trim(&mut st.log, version);
                self.commit(range, place, version);
            }
        } else if let Some(l) = st.learner.as_mut().filter(|l| l.node == from) {
            // Our learner holds `version`.
            if let Some((_, sent_ms)) = l.unacked_snapshot.filter(|(snapshot, _)| version >= *snapshot) {
                // It holds a snapshot (this one, or one sent since: then the round trip is
                // overstated, which errs on the side of waiting).
                l.snapshot_round_trip_ms = Some(now.saturating_sub(sent_ms));
                l.unacked_snapshot = None;
            }
            if version > l.acked || l.needs_snapshot || !l.synced {
                l.acked = l.acked.max(version);
                l.needs_snapshot = false;
                l.synced |= l.acked >= l.ungated;
                st.progress_ms = now;
                st.round_trip.acked(version, now);
                trim(&mut st.log, version);
                if l.acked < st.version && st.log.front().is_none_or(|e| e.version > l.acked + 1) {
                    // It acknowledged an older snapshot than the last one sent (lost), whose
                    // sending restarted the log: only another snapshot can bring it up to date,
                    // and until then the tail commits without it, what it held back included.
                    l.needs_snapshot = true;
                    l.synced = false;
                    l.ungated = st.version;
                }
                let commit_to = if l.synced { Some(l.acked.min(st.version)) } else { l.needs_snapshot.then_some(st.version) };
                if let Some(version) = commit_to {
                    self.commit(range, place, version);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_snapshot(&mut self, from: NodeId, range: RangeId, epoch: Epoch, version: u64, digest: u32, clock: &[u32], data: &[u8]) {
        let Some(place) = self.expect_from(range, epoch, from, true) else { return };
        let st = self.ranges[range.0 as usize].as_ref().expect("checked by expect_from");
        if !st.installed || version > st.version {
            let refused = clock_misfit(&st.clock, clock, st.installed).map_or_else(|| self.store.install(range, data), Err);
            if let Err(reason) = refused {
                self.refuse(range, format!("snapshot at version {version} from node {from}: {reason}"));
                return;
            }
            let st = self.ranges[range.0 as usize].as_mut().expect("checked by expect_from");
            st.clock.copy_from_slice(clock);
            st.version = version;
            st.installed = true;
            st.resuming = false;
            self.stats.snapshots_installed += 1;
            (st.digest, st.digest_known) = (digest, true);
            st.forget_history();
            st.need_ms = None;
            // The disk holds this holding again once it holds the snapshot.
            st.durable = None;
            st.unsynced.clear();
            // Whatever was logged for downstream is older than this; a downstream replica that
            // lacks the difference asks (Need) and gets a snapshot in turn.
            st.log.clear();
            let lsn = self.store.persist(range, version, digest, clock, data, true);
            self.persisted(range, version, lsn);
        }
        let st = self.ranges[range.0 as usize].as_ref().expect("checked by expect_from");
        let (version, vouched) = (st.version, st.vouched());
        if place.is_learner {
            if let Some(version) = vouched {
                self.send(from, Msg::Ack { range, epoch, version });
            }
        } else if place.is_tail() {
            // The tail holds everything it has: committed.
            self.commit(range, place, version);
        }
    }

    /// Resends what the downstream replica has not acknowledged, if it has made no progress
    /// for `resend_interval_ms`; a learner that needs one gets a snapshot instead.
    fn resend(&mut self, range: RangeId) {
        let now = self.now_ms;
        let interval = self.rcfg.resend_interval_ms;
        // Nothing to resend, and no learner to send anything (checked at every tick, for every
        // range: before the place is looked up).
        if self.ranges[range.0 as usize].as_ref().is_none_or(|st| st.log.is_empty() && st.learner.is_none()) {
            return;
        }
        let Some(place) = self.place(range) else { return };
        let Some(st) = self.ranges[range.0 as usize].as_mut().filter(|s| s.installed && s.epoch == place.epoch) else {
            return;
        };
        let Some(down) = place.downstream() else { return };
        let snapshot = place.succ.is_none() && st.learner.is_some_and(|l| l.needs_snapshot);
        // A resumed learner not yet synced hears its grant again, and acknowledges again.
        let regrant = st.learner.filter(|l| place.succ.is_none() && !l.synced && !l.needs_snapshot).and_then(|l| l.resumed);
        let wait_ms = match st.learner.filter(|_| snapshot) {
            Some(l) => st.round_trip.snapshot_wait_ms(interval, l.snapshot_round_trip_ms),
            None => st.round_trip.wait_ms(interval),
        };
        if (st.log.is_empty() && !snapshot && regrant.is_none()) || now < st.progress_ms + wait_ms {
            return;
        }
        st.progress_ms = now;
        st.round_trip.resent();
        if let Some((version, digest)) = regrant {
            let epoch = st.epoch;
            self.send(down, Msg::Resume { range, epoch, version, digest });
            if self.ranges[range.0 as usize].as_ref().is_some_and(|s| s.log.is_empty()) {
                return;
            }
        }
        if snapshot {
            self.send_snapshot(range, down);
        } else {
            self.resend_after(range, down, 0);
        }
    }

    /// Sends `to` the logged updates after version `after`, at most [`RESEND_BATCH_MAX`].
    fn resend_after(&mut self, range: RangeId, to: NodeId, after: u64) {
        let place = self.place(range);
        let st = self.ranges[range.0 as usize].as_ref().expect("resending a held range");
        let epoch = st.epoch;
        let durable = place.map_or(0, |p| durable_prefix(st, p, self.canary));
        let again: Vec<Entry> = st.log.iter().filter(|e| e.version > after).take(RESEND_BATCH_MAX).cloned().collect();
        self.stats.updates_resent += again.len() as u64;
        for Entry { version, digest, clock, delta } in again {
            self.send(to, Msg::Forward { range, epoch, version, digest, clock, delta, durable });
        }
    }

    /// As a learner resuming from what it holds: asks the tail again, every resend interval,
    /// until it answers (or sends a snapshot).
    fn ask_resume(&mut self, range: RangeId) {
        let now = self.now_ms;
        if self.ranges[range.0 as usize].as_ref().is_none_or(|st| !st.resuming || st.installed) {
            return;
        }
        let Some(place) = self.place(range).filter(|p| p.is_learner) else { return };
        let Some(st) = self.ranges[range.0 as usize].as_mut().filter(|s| s.resuming && !s.installed && s.epoch == place.epoch) else { return };
        let (Some(up), true) = (place.upstream, st.need_ms.is_none_or(|at| now >= at + self.rcfg.resend_interval_ms)) else { return };
        st.need_ms = Some(now);
        let (epoch, version, digest) = (st.epoch, st.version, st.digest);
        self.send(up, Msg::Resume { range, epoch, version, digest });
    }

    /// A learner asks to resume at `version` (on the tail), or the tail says it may (on the
    /// learner). The tail agrees only if no snapshot went to the learner yet, its own history
    /// has the same digest at `version`, and it still keeps every update after it: it then
    /// sends them, as it sends a learner updates after a snapshot. Anything else leaves the
    /// learner to its snapshot.
    fn on_resume(&mut self, from: NodeId, range: RangeId, epoch: Epoch, version: u64, digest: u32) {
        let Some(place) = self.place(range).filter(|p| p.epoch == epoch) else {
            self.stats.stale_dropped += 1;
            return;
        };
        if place.is_learner {
            let Some(_) = self.expect_from(range, epoch, from, true) else { return };
            let st = self.ranges[range.0 as usize].as_mut().expect("checked by expect_from");
            if st.resuming && !st.installed && st.version == version && st.digest == digest {
                st.installed = true;
                st.resuming = false;
                st.need_ms = None;
                self.stats.resumed += 1;
            }
            // Said again when an acknowledgement was lost: say again what we vouch for. (An
            // answer to an older question, or one after a snapshot, changes nothing else.)
            if let Some(vouched) = st.vouched() {
                self.send(from, Msg::Ack { range, epoch, version: vouched });
            }
            return;
        }
        let Some(place) = self.expect_from(range, epoch, from, false) else { return };
        if place.succ.is_some() {
            return; // only a tail has a learner
        }
        // Pushes applied but not numbered go first, as for a snapshot.
        self.close_batch(range);
        let now = self.now_ms;
        let st = self.ranges[range.0 as usize].as_mut().expect("checked by expect_from");
        let Some(learner) = st.learner.filter(|l| l.node == from && !l.snapshot_sent) else { return };
        if learner.resumed == Some((version, digest)) {
            // Asked again: the grant was lost.
            self.send(from, Msg::Resume { range, epoch, version, digest });
            return;
        }
        let unchecked = self.canary == Canary::ResumeUnchecked && version <= st.version;
        if !learner.needs_snapshot || !st.installed || (st.digest_at(version) != Some(digest) && !unchecked) {
            return;
        }
        st.log = st.history.iter().filter(|e| e.version > version).cloned().collect();
        // It holds `version`, but vouches for what its disk holds in its acknowledgements.
        st.learner = Some(Learner { acked: 0, needs_snapshot: false, resumed: Some((version, digest)), ..learner });
        st.progress_ms = now;
        self.stats.resumes += 1;
        self.send(from, Msg::Resume { range, epoch, version, digest });
        self.resend_after(range, from, version);
    }

    fn on_config(&mut self, config: Arc<ClusterConfig>) {
        if self.config.as_ref().is_some_and(|c| c.id >= config.id) {
            return;
        }
        // Batches close under the configuration they were applied in.
        self.flush_all();
        let member = config.member(self.id).is_some_and(|m| m.incarnation == self.incarnation);
        self.config = Some(config.clone());
        if config.member(self.id).is_some_and(|m| m.incarnation != self.incarnation) {
            // A configuration from before this incarnation started: it says nothing of what
            // this one holds (what it recovered from disk stays until the coordinator decides).
            return;
        }
        for r in 0..self.ranges.len() {
            let range = RangeId(r as u32);
            let place = config.chain(range).filter(|_| member && self.serves[r]).and_then(|c| Place::of(&config, c, self.id));
            match place {
                None => {
                    // What a restarted server's disk holds stays while the coordinator may
                    // still make it the range's learner (it first takes the restarted server
                    // out of its chains): a learner resumes from it. Once the chain is whole
                    // without it, it is not wanted there.
                    let recovered = self.ranges[r].as_ref().is_some_and(|st| st.epoch == Epoch(0) && st.installed && st.digest_known);
                    let wanted = config.chain(range).is_some_and(|c| c.learner.is_some() || c.nodes.len() < self.rcfg.replicas as usize);
                    if (!recovered || !wanted || !self.serves[r]) && self.ranges[r].take().is_some() {
                        self.store.drop_range(range);
                    }
                }
                Some(place) => self.enter(range, place),
            }
        }
    }

    /// Takes up this replica's place in `range`'s chain of a new configuration.
    fn enter(&mut self, range: RangeId, place: Place) {
        let workers = self.rcfg.workers;
        let slot = &mut self.ranges[range.0 as usize];
        if let Some(st) = slot.as_mut().filter(|st| place.is_learner && !st.learning) {
            // What this server held of the range comes from before it was a learner: from its
            // disk (a restart), or from an epoch it was deposed from without hearing of it (cut
            // off, say). It may hold a branch nobody else has. It asks its tail to resume from
            // there ([`Msg::Resume`]), which the tail grants only if its history has the same
            // digest at that version; until then it holds nothing it may serve or vouch for.
            if st.installed && st.digest_known {
                st.installed = false;
                st.resuming = true;
                st.need_ms = None;
                st.log.clear();
                st.forget_history();
                st.learner = None;
            } else {
                *slot = None;
                self.store.drop_range(range);
            }
        }
        if self.ranges[range.0 as usize].is_none() && place.epoch == Epoch(1) && !place.is_learner {
            // A range born here: its empty state goes to disk like any other, so that a
            // restart finds the range even before its first update.
            let mut st = RangeState::new(place.epoch, true, workers);
            st.generation = self.generations;
            self.generations += 1;
            let clock = st.clock.clone();
            self.ranges[range.0 as usize] = Some(st);
            let lsn = self.store.persist(range, 0, 0, &clock, &[], true);
            self.persisted(range, 0, lsn);
        }
        let generations = &mut self.generations;
        let st = self.ranges[range.0 as usize].get_or_insert_with(|| {
            // Only a range's first epoch puts a server in its chain holding nothing (born
            // above): every later member came in as a learner and holds the data already.
            let mut st = RangeState::new(place.epoch, false, workers);
            st.learning = place.is_learner;
            st.generation = *generations;
            *generations += 1;
            st
        });
        if st.epoch == place.epoch && st.learner.map(|l| (l.node, l.incarnation)) == place.learner {
            return;
        }
        st.epoch = place.epoch;
        st.learning = place.is_learner;
        if !place.head {
            // Workers resend unacknowledged pushes to the new head.
            st.waiting.clear();
        }
        let old_learner = st.learner.take();
        let mut new_learner = false;
        st.learner = place.learner.map(|(node, incarnation)| match old_learner.filter(|l| l.node == node && l.incarnation == incarnation) {
            Some(kept) => kept,
            None => {
                new_learner = true;
                Learner::new(node, incarnation)
            }
        });
        if place.is_tail() && st.learner.is_none_or(|l| !l.synced) {
            // Everything here is held by the (new) tail: committed, as far as its disk holds it
            // (the rest once it does: `settle_durable`).
            st.goal = st.goal.max(st.version);
            let durable = if self.canary == Canary::AckBeforeDurable { st.version } else { st.durable.unwrap_or(0) };
            st.committed = st.committed.max(st.version.min(durable));
            if let Some(l) = st.learner.as_mut() {
                l.ungated = st.version;
            }
        }
        match (place.succ, st.learner) {
            // A successor that was our learner has what it acknowledged; any other has at least
            // what is committed (chain order: a later replica holds a prefix of an earlier one's
            // updates, and the tail holds the committed ones).
            (Some(succ), _) if old_learner.is_some_and(|l| l.node == succ && !l.needs_snapshot) => {}
            (Some(_), _) => {
                let committed = st.committed;
                st.log.retain(|e| e.version > committed);
            }
            (None, Some(_)) => {}
            (None, None) => st.log.clear(),
        }
        if place.is_learner {
            self.ask_resume(range);
        }
        let st = self.ranges[range.0 as usize].as_mut().expect("entered above");
        // Resend at once to a new downstream replica; but a new learner may ask to resume
        // from what it holds, and gets a while to ask before its snapshot goes: long enough for
        // it to hear of its place, which a server of an embedded coordinator does only in the
        // reply to its next heartbeat, up to an interval after this replica heard of it.
        let resume_wait_ms = self.rcfg.learner_resume_wait_ms();
        st.progress_ms = if new_learner { (self.now_ms + resume_wait_ms).saturating_sub(self.rcfg.resend_interval_ms) } else { 0 };
        st.round_trip = RoundTrip::default();
        if place.is_tail() {
            if let Some(up) = place.upstream {
                let (epoch, version) = (st.epoch, st.committed);
                self.send(up, Msg::Ack { range, epoch, version });
            }
            self.release_acks(range);
        }
        self.resend(range);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::Coordinator;
    use crate::protocol::Member;
    use crate::sim::store::{encode, SimStore};

    /// Three replicas of one range, chain 0 -> 1 -> 2, with messages delivered in order.
    fn cluster() -> Vec<Replica<SimStore>> {
        cluster_on(SimStore::default)
    }

    /// [`cluster`], each replica on a store `store` makes.
    fn cluster_on(store: impl Fn() -> SimStore) -> Vec<Replica<SimStore>> {
        let rcfg = ReplicationConfig { ranges: 1, workers: 2, ..Default::default() };
        let members = (0..3).map(|n| Member { node: NodeId(n), incarnation: 1, addr: String::new(), draining: false });
        let chain = Chain { epoch: Epoch(1), nodes: vec![NodeId(0), NodeId(1), NodeId(2)], learner: None };
        let config = Arc::new(ClusterConfig { id: 1, members: members.collect(), chains: vec![chain], drained: Vec::new(), cluster: 0 });
        (0..3)
            .map(|n| {
                let mut r = Replica::new(NodeId(n), 1, String::new(), rcfg.clone(), store());
                r.step(0, Addr::Coordinator, Msg::Config(config.clone()));
                r
            })
            .collect()
    }

    fn push(seq: u32, value: i64) -> Msg {
        Msg::Push { range: RangeId(0), worker: WorkerId(1), seq, payload: encode(&[value, 0]).into() }
    }

    /// Delivers everything until quiet; returns what reached workers.
    fn settle(nodes: &mut [Replica<SimStore>]) -> Vec<Msg> {
        let mut to_workers = Vec::new();
        loop {
            let mut moved = false;
            for i in 0..nodes.len() {
                nodes[i].flush();
                for (to, msg) in nodes[i].take_ready() {
                    moved = true;
                    match to {
                        Addr::Node(n) => nodes[n.0 as usize].step(1, Addr::Node(NodeId(i as u32)), msg),
                        Addr::Worker(_) => to_workers.push(msg),
                        Addr::Coordinator => {}
                    }
                }
            }
            if !moved {
                return to_workers;
            }
        }
    }

    fn value(r: &Replica<SimStore>) -> i64 {
        r.store().ranges.get(&RangeId(0)).map_or(0, |v| v[0])
    }

    #[test]
    fn a_push_is_acknowledged_once_the_tail_holds_it() {
        let mut nodes = cluster();
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(1, 5));
        nodes[0].flush();
        let forwarded = nodes[0].take_ready();
        assert!(matches!(forwarded.as_slice(), [(Addr::Node(NodeId(1)), Msg::Forward { version: 1, .. })]), "{forwarded:?}");
        // Nothing reaches the worker until the forward went down the chain and the ack came back.
        nodes[1].step(1, Addr::Node(NodeId(0)), forwarded[0].1.clone());
        let acks = settle(&mut nodes);
        assert_eq!(acks, vec![Msg::PushAck { range: RangeId(0), seq: 1 }]);
        assert!(nodes.iter().all(|n| value(n) == 5 && n.range_state(RangeId(0)).unwrap().clock == [0, 1]));
    }

    #[test]
    fn pushes_that_come_while_an_update_is_in_flight_leave_as_one_update() {
        let mut nodes = cluster();
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(1, 5));
        nodes[0].flush();
        let first = nodes[0].take_ready();
        assert!(matches!(first.as_slice(), [(Addr::Node(NodeId(1)), Msg::Forward { version: 1, .. })]), "{first:?}");
        // Update 1 is unacknowledged: the next pushes are applied and wait in the open batch.
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(2, 3));
        nodes[0].flush();
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(3, 2));
        nodes[0].flush();
        assert!(nodes[0].take_ready().is_empty(), "nothing leaves while update 1 is in flight");
        assert_eq!(value(&nodes[0]), 10);
        // Update 1 goes down the chain; its acknowledgement lets pushes 2 and 3 leave as update 2.
        nodes[1].step(1, Addr::Node(NodeId(0)), first[0].1.clone());
        let acks = settle(&mut nodes);
        assert_eq!(acks.len(), 3, "{acks:?}");
        assert!(nodes.iter().all(|n| value(n) == 10 && n.range_state(RangeId(0)).unwrap().version == 2));
        assert_eq!(nodes[0].stats().updates_forwarded, 2);
    }

    #[test]
    fn flush_all_closes_a_batch_whatever_is_in_flight() {
        let mut nodes = cluster();
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(1, 5));
        nodes[0].flush();
        nodes[0].take_ready();
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(2, 3));
        nodes[0].flush();
        assert_eq!(nodes[0].range_state(RangeId(0)).unwrap().version, 1);
        // A checkpoint must find every applied push counted in a version.
        nodes[0].flush_all();
        assert_eq!(nodes[0].range_state(RangeId(0)).unwrap().version, 2);
        let second = nodes[0].take_ready();
        assert!(matches!(second.as_slice(), [(Addr::Node(NodeId(1)), Msg::Forward { version: 2, .. })]), "{second:?}");
    }

    #[test]
    fn a_resent_push_is_acknowledged_again_and_not_applied_twice() {
        let mut nodes = cluster();
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(1, 5));
        settle(&mut nodes);
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(1, 5));
        assert_eq!(settle(&mut nodes), vec![Msg::PushAck { range: RangeId(0), seq: 1 }]);
        assert!(nodes.iter().all(|n| value(n) == 5));
        assert_eq!(nodes[0].stats().pushes_duplicate, 1);
    }

    /// The wait before a resend starts at the interval, follows measured round trips, doubles
    /// per resend without progress, and never passes its cap.
    #[test]
    fn resends_wait_for_the_measured_round_trip_and_back_off() {
        let mut rt = RoundTrip::default();
        assert_eq!(rt.wait_ms(20), 20, "nothing measured: the interval");
        rt.forwarded(1, 100);
        rt.forwarded(2, 105);
        rt.acked(1, 110);
        assert_eq!(rt.wait_ms(20), 30, "a 10 ms round trip: 10 + 4 x 5");
        assert_eq!(rt.wait_ms(50), 50, "never under the interval");
        rt.forwarded(3, 200);
        rt.acked(3, 400);
        // mean (7 x 10 + 200) / 8 = 33, deviation (3 x 5 + 190) / 4 = 51: 33 + 204.
        assert_eq!(rt.wait_ms(20), 237);
        rt.forwarded(4, 500);
        rt.resent();
        assert_eq!(rt.wait_ms(20), 474, "doubled after a resend");
        rt.acked(4, 900);
        assert_eq!(rt.wait_ms(20), 237, "progress: back to the measure, the resent update not timed");
        (0..20).for_each(|_| rt.resent());
        assert_eq!(rt.wait_ms(20), RESEND_WAIT_MS_MAX);
    }

    /// The head says what it applied at once, and what is committed only once the tail holds
    /// it; a replica that is not head says neither.
    #[test]
    fn a_head_tells_a_polling_worker_what_it_applied_and_what_is_committed() {
        let (range, worker) = (RangeId(0), WorkerId(1));
        let mut nodes = cluster();
        nodes[0].step(1, Addr::Worker(worker), push(1, 5));
        settle(&mut nodes);
        nodes[0].step(1, Addr::Worker(worker), push(2, 5));
        nodes[0].step(1, Addr::Worker(worker), push(3, 5));
        assert_eq!(nodes[0].worker_seq(range, worker), Some(3));
        assert_eq!(nodes[0].worker_committed(range, worker), Some(1), "2 and 3 are in the head's open batch");
        nodes[0].flush();
        assert_eq!(nodes[0].worker_committed(range, worker), Some(1), "forwarded, not yet held by the tail");
        settle(&mut nodes);
        assert_eq!(nodes[0].worker_committed(range, worker), Some(3));
        assert_eq!(nodes[0].worker_committed(range, WorkerId(0)), Some(0));
        assert_eq!((nodes[1].worker_seq(range, worker), nodes[1].worker_committed(range, worker)), (None, None));
    }

    #[test]
    fn pushes_out_of_order_wait_for_the_missing_one() {
        let mut nodes = cluster();
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(2, 7));
        assert!(settle(&mut nodes).is_empty(), "push 2 without push 1 is dropped");
        assert_eq!(nodes[0].stats().pushes_dropped, 1);
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(1, 5));
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(2, 7));
        let acks = settle(&mut nodes);
        assert_eq!(acks.last(), Some(&Msg::PushAck { range: RangeId(0), seq: 2 }));
        // Both pushes left the head as one aggregated update.
        assert!(nodes.iter().all(|n| value(n) == 12 && n.range_state(RangeId(0)).unwrap().version == 1));
    }

    #[test]
    fn a_stranger_or_another_epoch_changes_nothing() {
        let mut nodes = cluster();
        let forward = |epoch| Msg::Forward {
            range: RangeId(0),
            epoch: Epoch(epoch),
            version: 1,
            digest: 0,
            clock: vec![0u32, 1].into(),
            delta: encode(&[9, 0]).into(),
            durable: 0,
        };
        // Node 2's predecessor is 1, not 0; and epoch 2 is not the range's epoch.
        nodes[2].step(1, Addr::Node(NodeId(0)), forward(1));
        nodes[1].step(1, Addr::Node(NodeId(0)), forward(2));
        assert!(settle(&mut nodes).is_empty());
        assert!(nodes.iter().all(|n| value(n) == 0 && n.range_state(RangeId(0)).unwrap().version == 0));
        assert_eq!(nodes[2].stats().stale_dropped + nodes[1].stats().stale_dropped, 2);
        // A worker pushing to a non-head is told so.
        nodes[1].step(1, Addr::Worker(WorkerId(1)), push(1, 5));
        assert!(matches!(nodes[1].take_ready().as_slice(), [(Addr::Worker(_), Msg::NotHead { .. })]));
    }

    #[test]
    fn an_update_or_snapshot_whose_clock_does_not_fit_is_refused_whole() {
        let mut nodes = cluster();
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(1, 5));
        settle(&mut nodes);
        let (range, epoch) = (RangeId(0), Epoch(1));
        // From the right predecessor in the right epoch, so only the clocks give them away: one
        // of another width, one behind what node 1 holds.
        let forward = Msg::Forward { range, epoch, version: 2, digest: 0, clock: vec![0u32, 1, 7].into(), delta: encode(&[9, 0]).into(), durable: 0 };
        let snapshot = Msg::Snapshot { range, epoch, version: 5, digest: 0, clock: vec![0u32, 0].into(), data: encode(&[9, 0]).into() };
        nodes[1].step(1, Addr::Node(NodeId(0)), forward);
        nodes[1].step(1, Addr::Node(NodeId(0)), snapshot);
        assert!(nodes[1].take_ready().is_empty(), "nothing acknowledged");
        assert_eq!(nodes[1].stats().refused, 2);
        let refusals = nodes[1].take_refusals();
        assert!(refusals[0].1.contains("clock has 3 entries") && refusals[1].1.contains("goes backwards"), "{refusals:?}");
        let st = nodes[1].range_state(range).unwrap();
        assert_eq!((value(&nodes[1]), st.version, st.clock), (5, 1, &[0u32, 1][..]));
        // The chain goes on as before.
        nodes[0].step(1, Addr::Worker(WorkerId(1)), push(2, 2));
        assert_eq!(settle(&mut nodes), vec![Msg::PushAck { range, seq: 2 }]);
        assert!(nodes.iter().all(|n| value(n) == 7));
    }

    /// Chain 0 -> 1 -> 2 with node 3 joining as the tail's learner. Messages among the chain's
    /// nodes arrive at once; those to and from the learner a round late, and a push arrives every
    /// round, so each of the learner's acknowledgements is behind the tail's newest version. The
    /// learner must still sync (the tail stops committing without it once it holds a snapshot),
    /// and then hold every committed update. Before, the tail kept committing without it and its
    /// mark moved with every push: the learner never synced.
    #[test]
    fn a_learner_syncs_while_pushes_arrive_faster_than_its_round_trip() {
        let (synced, _, acked, nodes) = learner_behind_a_slow_link(50, 50, 40);
        let synced = synced.expect("the learner never synced while pushes kept coming");
        assert!(synced < 1000, "the learner synced only after {synced} ms");
        let tail = nodes[2].range_state(RangeId(0)).unwrap();
        let learner = nodes[3].range_state(RangeId(0)).unwrap();
        assert!(learner.version >= tail.committed, "the learner holds every committed update: {} of {}", learner.version, tail.committed);
        // Pushes that come while an update is in flight leave together: count pushes, not updates.
        assert!(acked > 30, "pushes were acknowledged all along: {acked} of 40");
    }

    /// Chain 0 -> 1 -> 2 with node 3 its tail's learner, a push every `round_ms` for `rounds`
    /// rounds, and everything to and from the learner taking `delay_ms` each way (a link slower
    /// than the longest resend wait: a snapshot over TCP in an emulated guest, behind the other
    /// ranges' snapshots). Returns when the tail reported the learner synced (ms), how many
    /// snapshots it sent, the last push acknowledged to the worker, and the replicas.
    fn learner_behind_a_slow_link(round_ms: u64, delay_ms: u64, rounds: u32) -> (Option<u64>, u64, u32, Vec<Replica<SimStore>>) {
        let rcfg = ReplicationConfig { ranges: 1, workers: 2, ..Default::default() };
        let members = (0..4).map(|n| Member { node: NodeId(n), incarnation: 1, addr: String::new(), draining: false });
        let chain = Chain { epoch: Epoch(1), nodes: vec![NodeId(0), NodeId(1), NodeId(2)], learner: Some(NodeId(3)) };
        let config = Arc::new(ClusterConfig { id: 1, members: members.collect(), chains: vec![chain], drained: Vec::new(), cluster: 0 });
        let mut nodes: Vec<_> = (0..4)
            .map(|n| {
                let mut r = Replica::new(NodeId(n), 1, String::new(), rcfg.clone(), SimStore::default());
                r.step(0, Addr::Coordinator, Msg::Config(config.clone()));
                r
            })
            .collect();
        // (when it arrives, from, to, what)
        let mut slow: VecDeque<(u64, usize, usize, Msg)> = VecDeque::new();
        let (mut synced, mut acked) = (None, 0);
        for round in 1..=rounds {
            let now = u64::from(round) * round_ms;
            while slow.front().is_some_and(|m| m.0 <= now) {
                let (_, from, to, msg) = slow.pop_front().expect("checked");
                nodes[to].step(now, Addr::Node(NodeId(from as u32)), msg);
            }
            nodes[0].step(now, Addr::Worker(WorkerId(1)), push(round, 1));
            nodes.iter_mut().for_each(|n| n.tick(now));
            loop {
                let mut moved = false;
                for i in 0..nodes.len() {
                    nodes[i].flush();
                    for (to, msg) in nodes[i].take_ready() {
                        let Addr::Node(n) = to else {
                            if let Msg::PushAck { seq, .. } = msg {
                                acked = acked.max(seq);
                            }
                            continue;
                        };
                        let j = n.0 as usize;
                        if i == 3 || j == 3 {
                            slow.push_back((now + delay_ms, i, j, msg));
                        } else {
                            moved = true;
                            nodes[j].step(now, Addr::Node(NodeId(i as u32)), msg);
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
            if synced.is_none() && nodes[2].reports().iter().any(|r| r.learner_synced) {
                synced = Some(now);
            }
        }
        let snapshots = nodes[2].stats().snapshots_sent;
        (synced, snapshots, acked, nodes)
    }

    /// Before, each acknowledgement behind such a link was of an older snapshot than the last
    /// one sent, which restarted the log: the tail sent another, and the learner never synced.
    #[test]
    fn a_learner_behind_a_link_slower_than_the_resend_wait_syncs() {
        for delay_ms in [100, 1_500, 4_000] {
            // A push every 25 ms for 60 s.
            let (synced, snapshots, _, _) = learner_behind_a_slow_link(25, delay_ms, 2400);
            let synced = synced.unwrap_or_else(|| panic!("with {delay_ms} ms each way the learner never synced ({snapshots} snapshots sent)"));
            // A snapshot, its acknowledgement, the forwards after it and theirs: a few round trips.
            assert!(synced < 8 * delay_ms + 2_000, "with {delay_ms} ms each way the learner synced only after {synced} ms");
            // One per doubling of the wait until the first acknowledgement, and no more after it.
            let doublings = ((2 * delay_ms) as f64 / 20.0).log2().ceil() as u64;
            assert!(snapshots <= 2 + doublings, "with {delay_ms} ms each way the tail sent {snapshots} snapshots");
        }
    }

    /// Chain 0 -> 1 -> 2 over disks: a push is acknowledged only once every member's disk
    /// holds it, whichever member syncs last; by the head, and where tails acknowledge workers
    /// by the tail too (which hears of the upstream disks through `Durable`).
    #[test]
    fn a_push_is_acknowledged_once_every_disk_in_the_chain_holds_it() {
        let rcfg = ReplicationConfig { ranges: 1, workers: 2, ..Default::default() };
        let members = (0..3).map(|n| Member { node: NodeId(n), incarnation: 1, addr: String::new(), draining: false });
        let chain = Chain { epoch: Epoch(1), nodes: vec![NodeId(0), NodeId(1), NodeId(2)], learner: None };
        let config = Arc::new(ClusterConfig { id: 1, members: members.collect(), chains: vec![chain], drained: Vec::new(), cluster: 0 });
        for (tail_acks, last) in [false, true].into_iter().flat_map(|t| (0..3).map(move |l| (t, l))) {
            let mut nodes: Vec<_> = (0..3)
                .map(|n| {
                    let mut r = Replica::new(NodeId(n), 1, String::new(), rcfg.clone(), SimStore::with_disk());
                    r.ack_from_tail(tail_acks);
                    r.step(0, Addr::Coordinator, Msg::Config(config.clone()));
                    r
                })
                .collect();
            nodes[0].step(1, Addr::Worker(WorkerId(1)), push(1, 5));
            assert!(settle(&mut nodes).is_empty(), "acknowledged before any disk held it");
            assert!(nodes.iter().all(|n| value(n) == 5), "every member applied it in memory");
            for (i, node) in nodes.iter_mut().enumerate() {
                if i != last {
                    node.store_mut().sync();
                }
            }
            assert!(settle(&mut nodes).is_empty(), "acknowledged before node {last}'s disk held it");
            nodes[last].store_mut().sync();
            let acks = vec![Msg::PushAck { range: RangeId(0), seq: 1 }; 1 + tail_acks as usize];
            assert_eq!(settle(&mut nodes), acks, "node {last} synced last, tail acks {tail_acks}");
            assert_eq!(nodes[2].stats().tail_acks, tail_acks as u64);
        }
    }

    /// A server restarted from its disk holds what the disk held, and acts on it once a
    /// configuration makes it its range's chain alone; until then it only reports it.
    #[test]
    fn a_server_restarted_from_its_disk_serves_what_it_held_once_the_chain_is_its_own() {
        let rcfg = ReplicationConfig { ranges: 1, workers: 2, ..Default::default() };
        let members = |inc: u64| (0..1).map(move |n| Member { node: NodeId(n), incarnation: inc, addr: String::new(), draining: false }).collect();
        let chain = |epoch| vec![Chain { epoch: Epoch(epoch), nodes: vec![NodeId(0)], learner: None }];
        let first = Arc::new(ClusterConfig { id: 1, members: members(1), chains: chain(1), drained: Vec::new(), cluster: 0 });
        let mut node = Replica::new(NodeId(0), 1, String::new(), rcfg.clone(), SimStore::with_disk());
        node.step(0, Addr::Coordinator, Msg::Config(first.clone()));
        node.step(1, Addr::Worker(WorkerId(1)), push(1, 5));
        node.flush();
        node.store_mut().sync();
        node.flush();
        node.step(2, Addr::Worker(WorkerId(1)), push(2, 7));
        node.flush();
        let acked: Vec<Msg> = node.take_ready().into_iter().filter(|(to, _)| matches!(to, Addr::Worker(_))).map(|(_, m)| m).collect();
        assert_eq!(acked, vec![Msg::PushAck { range: RangeId(0), seq: 1 }], "push 2 is not on disk yet");

        // Power loss: push 2 was never synced.
        let disk = node.store().crashed(0);
        let mut node = Replica::new(NodeId(0), 2, String::new(), rcfg, disk);
        let st = node.range_state(RangeId(0)).expect("recovered");
        assert_eq!((st.installed, st.version, st.clock, value(&node)), (true, 1, &[0u32, 1][..], 5));
        // The old configuration names the old incarnation: nothing happens to what it holds.
        node.step(3, Addr::Coordinator, Msg::Config(first));
        node.step(3, Addr::Worker(WorkerId(1)), push(2, 7));
        assert!(matches!(node.take_ready().as_slice(), [(Addr::Worker(_), Msg::NotHead { .. })]));
        assert_eq!(value(&node), 5);
        // Revived: the range's chain is this incarnation alone. The resent push applies once.
        let revived = Arc::new(ClusterConfig { id: 2, members: members(2), chains: chain(2), drained: Vec::new(), cluster: 0 });
        node.step(4, Addr::Coordinator, Msg::Config(revived));
        for _ in 0..2 {
            node.step(5, Addr::Worker(WorkerId(1)), push(2, 7));
            node.flush();
        }
        node.store_mut().sync();
        node.flush();
        let acked: Vec<Msg> = node.take_ready().into_iter().filter(|(to, _)| matches!(to, Addr::Worker(_))).map(|(_, m)| m).collect();
        assert_eq!(acked, vec![Msg::PushAck { range: RangeId(0), seq: 2 }; 2]);
        assert_eq!((value(&node), node.range_state(RangeId(0)).unwrap().clock), (12, &[0u32, 2][..]));
    }

    #[test]
    fn a_replica_serving_some_ranges_holds_and_reports_only_those() {
        let rcfg = ReplicationConfig { ranges: 8, replicas: 1, ..Default::default() };
        let me = Member { node: NodeId(1), incarnation: 7, addr: String::new(), draining: false };
        let config = Coordinator::new(rcfg.clone(), 1, vec![me], 0).config().clone();
        let mut replica = Replica::new(NodeId(1), 7, String::new(), rcfg, SimStore::default()).serving(|r| r.0 % 2 == 0);
        replica.step(0, Addr::Coordinator, Msg::Config(config));
        replica.tick(1_000);
        let reported: Vec<u32> = replica.reports().iter().map(|r| r.range.0).collect();
        assert_eq!(reported, vec![0, 2, 4, 6]);
        assert!((0..8).all(|r| replica.range_state(RangeId(r)).is_some() == (r % 2 == 0)));
    }

    /// Node 2 of [`cluster_on`] disks is killed after `before` pushes, the chain goes on without
    /// it for `missed` more, and it restarts from its disk as the chain's learner. Returns the
    /// nodes once everything settled (a snapshot, if any, sent after the wait for a resume).
    fn restart_behind(before: i64, missed: i64) -> Vec<Replica<SimStore>> {
        let mut nodes = cluster_on(SimStore::with_disk);
        let mut seq = 0;
        let push_settled = |nodes: &mut [Replica<SimStore>], seq: &mut u32| {
            *seq += 1;
            nodes[0].step(1, Addr::Worker(WorkerId(1)), push(*seq, 1));
            nodes.iter_mut().for_each(|n| n.store_mut().sync());
            settle(nodes);
        };
        for _ in 0..before {
            push_settled(&mut nodes, &mut seq);
        }
        let disk = nodes[2].store().crashed(0);
        let config = |id: u64, learner: Option<NodeId>| {
            let members = (0..3).map(|n| Member { node: NodeId(n), incarnation: if n == 2 { 2 } else { 1 }, addr: String::new(), draining: false });
            let chain = Chain { epoch: Epoch(id), nodes: vec![NodeId(0), NodeId(1)], learner };
            Arc::new(ClusterConfig { id, members: members.collect(), chains: vec![chain], drained: Vec::new(), cluster: 0 })
        };
        for n in &mut nodes[..2] {
            n.step(1, Addr::Coordinator, Msg::Config(config(2, None)));
        }
        for _ in 0..missed {
            push_settled(&mut nodes[..2], &mut seq);
        }
        let rcfg = ReplicationConfig { ranges: 1, workers: 2, ..Default::default() };
        let resume_wait_ms = rcfg.learner_resume_wait_ms();
        nodes[2] = Replica::new(NodeId(2), 2, String::new(), rcfg, disk);
        for n in &mut nodes {
            n.step(1, Addr::Coordinator, Msg::Config(config(3, Some(NodeId(2)))));
        }
        settle(&mut nodes);
        nodes[1].tick(1 + resume_wait_ms);
        nodes.iter_mut().for_each(|n| n.store_mut().sync());
        settle(&mut nodes);
        nodes
    }

    #[test]
    fn a_restarted_learner_resumes_from_its_disk_when_the_tail_keeps_what_it_missed() {
        let nodes = restart_behind(5, 3);
        let (learner, tail) = (nodes[2].stats(), nodes[1].stats());
        assert_eq!((learner.resumed, learner.snapshots_installed, tail.resumes, tail.snapshots_sent), (1, 0, 1, 0));
        assert_eq!(value(&nodes[2]), 8, "its disk's 5 pushes and the 3 it missed");
        assert_eq!(nodes[2].range_state(RangeId(0)).unwrap().digest, nodes[1].range_state(RangeId(0)).unwrap().digest);
    }

    #[test]
    fn a_restarted_learner_too_far_behind_takes_a_snapshot() {
        // The tail keeps the last HISTORY_ENTRIES_MAX updates: the learner missed more.
        let missed = HISTORY_ENTRIES_MAX as i64 + 10;
        let nodes = restart_behind(5, missed);
        let (learner, tail) = (nodes[2].stats(), nodes[1].stats());
        assert_eq!((learner.resumed, learner.snapshots_installed, tail.resumes), (0, 1, 0));
        assert_eq!(value(&nodes[2]), 5 + missed);
    }
}
