//! Every knob of chain replication, with its default, its unit and its check, in one place.

use serde::{Deserialize, Serialize};

use crate::error::ReplicationError;

/// Most workers a range's vector clock tracks: the clock is one u32 per worker.
pub const WORKERS_MAX: u32 = 4096;
/// Most payloads (and clocks) one [`PayloadPool`](crate::codec::PayloadPool) keeps for reuse:
/// a client's pushes in flight (a piece per range each), and a shard's pushes and the updates
/// its replicas' histories hold. Twice [`HISTORY_ENTRIES_MAX`], so a follower whose history is
/// full (it forgets its oldest updates in groups) still finds a free one to refill.
pub const REUSED_PAYLOADS_MAX: usize = 2 * HISTORY_ENTRIES_MAX;
/// Most bytes of capacity the payloads one [`PayloadPool`](crate::codec::PayloadPool) keeps for
/// reuse may hold together.
pub const REUSED_PAYLOAD_BYTES_MAX: usize = 16 << 20;
/// Fewest bulk bytes a payload decoded from a shared frame is viewed in place rather than copied
/// ([`PayloadPool::take`](crate::codec::PayloadPool::take)): a view keeps the frame's whole read
/// buffer from reuse while it lives, which pays only for a large payload.
pub const SHARED_BULK_BYTES_MIN: usize = 64 << 10;
/// Most replicas in one chain.
pub const REPLICAS_MAX: u32 = 7;
/// Most ranges a cluster is divided into.
pub const RANGES_MAX: u32 = 1 << 16;
/// Most virtual nodes one server puts on the hash ring.
pub const VNODES_MAX: u32 = 1024;
/// Most forwarded-but-unacknowledged entries one replica keeps per range. A head whose log is
/// this long stops taking pushes for the range until its successor catches up: the bound on
/// memory a slow or dead successor can cost.
pub const LOG_ENTRIES_MAX: usize = 4096;
/// Most log entries resent to a successor in one go.
pub const RESEND_BATCH_MAX: usize = 64;
/// Longest a replica waits, without progress, before it resends its log downstream. The wait
/// starts at `resend_interval_ms`, follows the round trips measured to the successor, and
/// doubles with each resend that brought no progress, up to this.
pub const RESEND_WAIT_MS_MAX: u64 = 1000;
/// Longest a tail waits for its learner to acknowledge a snapshot before it sends another. The
/// wait starts as a resend's does, is at least twice the last snapshot's round trip, and doubles
/// with each snapshot that brought no acknowledgement, up to this.
pub const SNAPSHOT_WAIT_MS_MAX: u64 = 8000;
/// Most pushes the head folds into one forwarded update.
pub const BATCH_PUSHES_MAX: usize = 256;
/// Most updates of one range a head has forwarded and its successor not yet acknowledged
/// before it stops closing batches at each turn: the pushes that come meanwhile wait in the
/// open batch, and leave as one update when the successor acknowledges (or the batch holds
/// [`BATCH_PUSHES_MAX`]). Idle, a push leaves at once; under load, the chain's cost per push
/// falls as batches grow, since each hop sends, receives and writes one copy of the keys a
/// batch touched, however many pushes it holds.
pub const UPDATES_IN_FLIGHT_MAX: usize = 1;
/// Most pushes a head holds for acknowledgement (applied, not yet held by the tail). Pushes past
/// it are dropped unacknowledged, and their workers resend them.
pub const WAITING_MAX: usize = 65_536;
/// Longest a head holds the reply to a worker's pushes while it waits for the tail to hold
/// them. The reply then leaves anyway, without those acknowledgements, and the worker asks for
/// them again; it stays under a worker's retry timer so a failed chain member delays nothing.
pub const PUSH_REPLY_HOLD_MS_MAX: u64 = 250;
/// Drained servers a configuration remembers after they left (see `ClusterConfig::drained`).
pub const DRAINED_KEPT_MAX: usize = 64;
/// How long a tail waits, at least, for a new learner to ask to resume from what it holds
/// ([`Msg::Resume`](crate::protocol::Msg::Resume)) before it sends a snapshot; and at least two
/// heartbeat intervals, the longest a learner can take to hear that it is one.
pub const LEARNER_RESUME_WAIT_MS: u64 = 100;
/// Updates every replica keeps of each range after applying them, newest first, at most this
/// many and its share of [`HISTORY_BYTES_PER_REPLICA`]: a server restarted from its disk that
/// missed no more than that takes just those from its chain's tail instead of a whole snapshot.
pub const HISTORY_ENTRIES_MAX: usize = 1024;
/// Bytes of updates one replica (a server's shard) keeps for restarted learners, shared evenly
/// by the ranges it serves (see [`HISTORY_ENTRIES_MAX`]). The entries are shared with the log,
/// so this is memory held only once the successor acknowledged them.
pub const HISTORY_BYTES_PER_REPLICA: usize = 64 << 20;

const _: () = assert!(BATCH_PUSHES_MAX <= LOG_ENTRIES_MAX, "a batch is one log entry; the log holds many");
const _: () = assert!(RESEND_BATCH_MAX <= LOG_ENTRIES_MAX);

/// How a cluster replicates: the same on every server and coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationConfig {
    /// Servers in each range's chain (fewer while the cluster has fewer live servers).
    pub replicas: u32,
    /// Ranges the key space is cut into; each has its own chain.
    pub ranges: u32,
    /// Points each server puts on the consistent-hash ring.
    pub vnodes: u32,
    /// Workers each range's vector clock tracks.
    pub workers: u32,
    /// How often a server tells the coordinator it is alive.
    pub heartbeat_interval_ms: u64,
    /// A server not heard from for this long leaves its chains.
    pub failure_timeout_ms: u64,
    /// A replica resends unacknowledged updates to its successor after this long without progress.
    pub resend_interval_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self { replicas: 2, ranges: 256, vnodes: 64, workers: 16, heartbeat_interval_ms: 100, failure_timeout_ms: 500, resend_interval_ms: 20 }
    }
}

impl ReplicationConfig {
    /// How long a tail waits for a new learner to ask to resume before it sends a snapshot:
    /// [`LEARNER_RESUME_WAIT_MS`], or two heartbeat intervals if longer.
    pub fn learner_resume_wait_ms(&self) -> u64 {
        LEARNER_RESUME_WAIT_MS.max(self.heartbeat_interval_ms.saturating_mul(2))
    }

    /// Checks every knob against its bound.
    pub fn validate(&self) -> Result<(), ReplicationError> {
        let bad = |what: &str| Err(ReplicationError::BadConfig { reason: what.to_string() });
        if self.replicas == 0 || self.replicas > REPLICAS_MAX {
            return bad(&format!("replicas must be 1 to {REPLICAS_MAX}, not {}", self.replicas));
        }
        if self.ranges == 0 || self.ranges > RANGES_MAX {
            return bad(&format!("ranges must be 1 to {RANGES_MAX}, not {}", self.ranges));
        }
        if self.vnodes == 0 || self.vnodes > VNODES_MAX {
            return bad(&format!("vnodes must be 1 to {VNODES_MAX}, not {}", self.vnodes));
        }
        if self.workers == 0 || self.workers > WORKERS_MAX {
            return bad(&format!("workers must be 1 to {WORKERS_MAX}, not {}", self.workers));
        }
        if self.heartbeat_interval_ms == 0 || self.failure_timeout_ms < 2 * self.heartbeat_interval_ms {
            return bad("failure_timeout_ms must be at least two heartbeat intervals (and heartbeats more than 0 ms apart)");
        }
        if self.resend_interval_ms == 0 {
            return bad("resend_interval_ms must be more than 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bounds_are_checked() {
        ReplicationConfig::default().validate().unwrap();
        let c = ReplicationConfig { replicas: 0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("replicas"));
        let c = ReplicationConfig { failure_timeout_ms: 100, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("failure_timeout_ms"));
    }
}
