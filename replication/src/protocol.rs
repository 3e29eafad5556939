//! What chain replication talks about: identifiers, the cluster configuration the coordinator
//! publishes, and the messages between workers, replicas and the coordinator.
//!
//! Payloads (a worker's push, a forwarded update, a range's snapshot) are opaque bytes here: the
//! [`crate::replica::Store`] that holds the parameters gives them meaning.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        pub struct $name(pub $inner);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// A server taking part in replication.
    NodeId(u32)
);
id!(
    /// A range of the key space: the unit of replication, with its own chain.
    RangeId(u32)
);
id!(
    /// A training worker: its index in every range's vector clock.
    WorkerId(u32)
);
id!(
    /// A range's chain generation: it changes whenever the chain's members change.
    Epoch(u64)
);

/// Who sends or receives a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Addr {
    Node(NodeId),
    Worker(WorkerId),
    Coordinator,
}

/// One range's chain in one epoch: `nodes[0]` is the head, the last is the tail. A learner is a
/// server being filled from the tail before it joins as the new tail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub epoch: Epoch,
    pub nodes: Vec<NodeId>,
    pub learner: Option<NodeId>,
}

impl Chain {
    /// Whether `node` is in this chain or learning it.
    pub fn holds(&self, node: NodeId) -> bool {
        self.nodes.contains(&node) || self.learner == Some(node)
    }

    pub fn head(&self) -> Option<NodeId> {
        self.nodes.first().copied()
    }

    pub fn tail(&self) -> Option<NodeId> {
        self.nodes.last().copied()
    }

    /// `node`'s place in the chain.
    pub fn position(&self, node: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| *n == node)
    }
}

/// A server in the cluster. `incarnation` changes each time the server starts, so a server that
/// restarted (and lost what it held in memory) is never mistaken for the one that stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    pub incarnation: u64,
    /// Where its clients and peers reach it (host:port); empty in the simulator.
    pub addr: String,
    /// Leaving on request (`tessera drain`): its ranges move elsewhere, then it is removed.
    pub draining: bool,
}

/// The whole cluster's configuration, as the coordinator publishes it. `id` grows with every
/// change; a replica ignores a configuration older than the one it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub id: u64,
    pub members: Vec<Member>,
    /// One chain per range, indexed by [`RangeId`].
    pub chains: Vec<Chain>,
    /// Servers that were drained and then left (the newest [`DRAINED_KEPT_MAX`](crate::config::DRAINED_KEPT_MAX)). One the
    /// coordinator took for failed while it drained (its heartbeats late) left before it saw
    /// itself drained; this list is how it learns it is done, and keeps it from being taken back
    /// as a new member meanwhile. A restart (another incarnation) may join again.
    #[serde(default)]
    pub drained: Vec<Member>,
    /// The cluster's name: a random number the coordinator draws when the cluster is born, kept
    /// with every configuration after. A server's data directory records it, so a server
    /// started on another cluster's disk is refused instead of mixing that cluster's parameters
    /// into this one's. 0 in a configuration stored before clusters were named.
    #[serde(default)]
    pub cluster: u64,
}

impl ClusterConfig {
    /// Whether `node` is in any range's chain, or learning one.
    pub fn holds_any(&self, node: NodeId) -> bool {
        self.chains.iter().any(|c| c.holds(node))
    }

    /// Whether `node` has been drained: marked draining, and in no chain any more.
    pub fn drained(&self, node: NodeId) -> bool {
        self.member(node).is_some_and(|m| m.draining) && !self.holds_any(node)
    }

    /// Whether the server `node`, started as `incarnation`, is done with this cluster and should
    /// stop: a member that is drained, or one that was drained and has left.
    pub fn left(&self, node: NodeId, incarnation: u64) -> bool {
        let me = |m: &Member| m.node == node && m.incarnation == incarnation;
        self.members.iter().any(me) && self.drained(node) || self.drained.iter().any(me)
    }

    pub fn member(&self, node: NodeId) -> Option<&Member> {
        self.members.iter().find(|m| m.node == node)
    }

    pub fn chain(&self, range: RangeId) -> Option<&Chain> {
        self.chains.get(range.0 as usize)
    }
}

/// What a coordinator (and every server of its cluster) answers when asked for the cluster:
/// the replication settings, and the configuration once the cluster has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub replication: crate::config::ReplicationConfig,
    pub config: Option<ClusterConfig>,
}

/// What one replica holds of one range, as it reports it to the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeReport {
    pub range: RangeId,
    pub epoch: Epoch,
    /// Whether it holds the range's data (a learner does not until its snapshot arrives).
    pub installed: bool,
    /// Updates applied: the position in the range's history.
    pub version: u64,
    /// Updates the tail is known to hold.
    pub committed: u64,
    /// Sum of the range's vector clock: pushes applied, for `tessera status`' lag in ticks.
    pub ticks: u64,
    /// On a tail: its learner holds every committed update, and the tail now commits only what
    /// the learner holds too. The coordinator promotes a learner only then.
    pub learner_synced: bool,
}

pub use crate::payload::Payload;

/// A message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    /// Worker to head: the worker's `seq`-th push to `range` (counted from 1).
    Push { range: RangeId, worker: WorkerId, seq: u32, payload: Payload },
    /// Head (or tail, see [`Msg::Durable`]) to worker: every push of the worker to `range` up to
    /// `seq` is held by the tail.
    PushAck { range: RangeId, seq: u32 },
    /// Head to worker, asked: `seq` of the worker's pushes to `range` are applied. A worker's new
    /// client numbers its pushes from there.
    SeqCount { range: RangeId, seq: u32 },
    /// Head (or not) to worker: this server is not the range's head in its configuration `config_id`.
    NotHead { range: RangeId, config_id: u64 },
    /// Head to worker: the worker's `seq`-th push to `range` can never be applied (a full
    /// table, a key outside the table, ...), and nothing of the batch that carried it was. The
    /// worker takes it back, numbers its later pushes to the range one lower, and sends the
    /// rest of the batch again. `status` is the transport's status code for `reason`.
    Refused { range: RangeId, seq: u32, status: u16, reason: String },
    /// Down the chain (and from the tail to its learner): update `version` of the range, with
    /// the vector clock after it, and the range's history digest after it
    /// ([`digest_after`](crate::replica::digest_after)). `durable`: the lowest version the
    /// sender and every replica before it hold on disk, as far as the sender knows.
    Forward { range: RangeId, epoch: Epoch, version: u64, digest: u32, clock: Arc<[u32]>, delta: Payload, durable: u64 },
    /// Down the chain: the sender and every replica before it hold the range up to `version`
    /// on disk (sent when that grows with no update to carry it; only by replicas whose tails
    /// acknowledge workers, see [`Replica::ack_from_tail`](crate::replica::Replica::ack_from_tail)).
    Durable { range: RangeId, epoch: Epoch, version: u64 },
    /// Up the chain: the tail holds every update up to `version`. From a learner to its tail:
    /// the learner holds them.
    Ack { range: RangeId, epoch: Epoch, version: u64 },
    /// To the upstream replica: updates arrive past a gap this replica cannot fill; send the ones
    /// after `version`, or a snapshot if they are no longer kept.
    Need { range: RangeId, epoch: Epoch, version: u64 },
    /// To a learner, or to a successor that fell too far behind: the whole range at `version`,
    /// whose history has digest `digest`.
    Snapshot { range: RangeId, epoch: Epoch, version: u64, digest: u32, clock: Arc<[u32]>, data: Payload },
    /// From a learner that already holds the range up to `version` (a restarted server, from
    /// its disk), with history digest `digest`, to its tail: send the updates after `version`
    /// rather than a snapshot, if your history at `version` has the same digest. Back from the
    /// tail to the learner, the same message says it does: the learner holds the range again.
    Resume { range: RangeId, epoch: Epoch, version: u64, digest: u32 },
    /// Server to coordinator, every heartbeat interval. `cluster` is the cluster the server's
    /// data directory belongs to ([`ClusterConfig::cluster`]), 0 when it has none yet.
    Heartbeat { node: NodeId, incarnation: u64, addr: String, cluster: u64, config_id: u64, ranges: Vec<RangeReport> },
    /// Coordinator to server.
    Config(Arc<ClusterConfig>),
}

impl Msg {
    /// The message's kind, for traces and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Push { .. } => "push",
            Msg::PushAck { .. } => "push-ack",
            Msg::SeqCount { .. } => "seq-count",
            Msg::NotHead { .. } => "not-head",
            Msg::Refused { .. } => "refused",
            Msg::Forward { .. } => "forward",
            Msg::Durable { .. } => "durable",
            Msg::Ack { .. } => "ack",
            Msg::Need { .. } => "need",
            Msg::Snapshot { .. } => "snapshot",
            Msg::Resume { .. } => "resume",
            Msg::Heartbeat { .. } => "heartbeat",
            Msg::Config(_) => "config",
        }
    }
}
