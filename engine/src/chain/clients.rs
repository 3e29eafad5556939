//! Which client pushes as each worker id, as one shard has seen them.
//!
//! A worker's pushes are numbered per range, and a head takes a number it has applied for a
//! resend: it acknowledges it and applies nothing. Two live clients with one worker id number
//! their pushes over each other, so without a check one client's pushes would be acknowledged
//! as resends of the other's and silently dropped. Every client sends, with each `WorkerPush`,
//! an incarnation of its own (random, fixed for its life), and a shard refuses:
//! - every push from a client that another client with the same worker id has succeeded here
//!   (the newest client seen wins: a restarted trainer takes over from the dead one's id);
//! - a push numbered at or below the last push the range's head applied as that worker, when
//!   that push came from another client: it is not a resend, it is a collision.
//!
//! What a shard has seen is its own: a head new to a range (after a failover) knows nothing of
//! who pushed there before, and takes resends as it always did until a client pushes to it. A
//! number above the last one a head applied itself was applied, if at all, by another head
//! (its updates reached this replica down the chain), and is taken for a resend too.

use rustc_hash::FxHashMap;

/// Clients superseded per worker id that a shard remembers, besides the current one. A client
/// older than these that comes back is taken for a new one.
const SUPERSEDED_KEPT: usize = 16;

/// What one shard has seen of the clients pushing as each worker id.
#[derive(Debug, Default)]
pub(super) struct WorkerClients {
    /// Per worker id: the incarnations of the clients that sent it requests here, newest last.
    seen: FxHashMap<u32, Vec<u64>>,
    /// Per (worker id, range): the incarnation whose push this shard applied last as the
    /// range's head, and that push's number.
    applied_by: FxHashMap<(u32, u32), (u64, u32)>,
}

/// Why a push is refused: [`EngineError::WorkerIdInUse`](crate::EngineError::WorkerIdInUse)'s
/// `why`.
pub(super) const SUCCEEDED: &str = "a client that started later pushes as this worker, so this client's pushes are refused";
pub(super) const COLLIDED: &str =
    "this push is numbered as one the range's head applied from another client with the same worker id, so it cannot be told from a resend";

impl WorkerClients {
    /// Takes note of a request from client `incarnation` as `worker`; false when another
    /// client has succeeded it here (its pushes are refused). Incarnation 0 (a client that
    /// names none) is always admitted.
    pub(super) fn admit(&mut self, worker: u32, incarnation: u64) -> bool {
        if incarnation == 0 {
            return true;
        }
        let seen = self.seen.entry(worker).or_default();
        match seen.iter().position(|c| *c == incarnation) {
            Some(at) => at + 1 == seen.len(),
            None => {
                if seen.len() > SUPERSEDED_KEPT {
                    seen.remove(0);
                }
                seen.push(incarnation);
                true
            }
        }
    }

    /// Whether push `seq` from client `incarnation` as `worker` to `range`, numbered at or
    /// below what the range holds of the worker's, may be a resend of the client's own: the
    /// last push this shard applied as the worker's there came from the same client, or was
    /// numbered below `seq`.
    pub(super) fn may_resend(&self, worker: u32, range: u32, incarnation: u64, seq: u32) -> bool {
        incarnation == 0 || self.applied_by.get(&(worker, range)).is_none_or(|&(by, last)| by == incarnation || by == 0 || seq > last)
    }

    /// Notes that the head applied push `seq` from client `incarnation` as `worker` to `range`.
    pub(super) fn applied(&mut self, worker: u32, range: u32, incarnation: u64, seq: u32) {
        self.applied_by.insert((worker, range), (incarnation, seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_client_of_a_worker_id_wins_and_older_ones_stay_refused() {
        let mut c = WorkerClients::default();
        assert!(c.admit(3, 11));
        assert!(c.admit(3, 11));
        assert!(c.admit(3, 22), "a new client takes the id over (a restarted trainer)");
        assert!(!c.admit(3, 11), "the one it succeeded is refused");
        assert!(c.admit(3, 22));
        assert!(c.admit(4, 11), "worker ids are apart");
        assert!(c.admit(3, 0) && c.admit(3, 0), "a client naming no incarnation is not checked");
    }

    #[test]
    fn a_resend_is_taken_only_from_the_client_whose_push_was_applied_last() {
        let mut c = WorkerClients::default();
        assert!(c.may_resend(3, 7, 11, 5), "a head that applied nothing of the worker's knows no better");
        c.applied(3, 7, 11, 5);
        assert!(c.may_resend(3, 7, 11, 5));
        assert!(!c.may_resend(3, 7, 22, 5) && !c.may_resend(3, 7, 22, 4), "another client's push under a number applied here collides");
        assert!(c.may_resend(3, 7, 22, 6), "a number above the last applied here was applied by another head");
        assert!(c.may_resend(3, 8, 22, 5) && c.may_resend(4, 7, 22, 5), "per worker id and range");
        c.applied(3, 7, 22, 6);
        assert!(c.may_resend(3, 7, 22, 6) && !c.may_resend(3, 7, 11, 5));
    }

    #[test]
    fn superseded_clients_are_remembered_up_to_the_bound() {
        let mut c = WorkerClients::default();
        for incarnation in 1..=SUPERSEDED_KEPT as u64 + 1 {
            assert!(c.admit(0, incarnation));
        }
        assert!(!c.admit(0, 1), "the oldest still remembered is refused");
        assert!(c.admit(0, 100));
        assert!(c.admit(0, 1), "once forgotten it is taken for a new client");
    }
}
