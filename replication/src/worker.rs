//! A worker's side of chain replication, as a state machine with no I/O: it numbers its pushes to
//! each range, sends them to the range's head, keeps what is not yet acknowledged, and resends
//! it, in order, to whoever is head by then. The client drives it over the transport; the
//! simulator drives the same code.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::protocol::{Addr, ClusterConfig, Msg, NodeId, Payload, RangeId, WorkerId};

/// One worker's pushes, per range.
#[derive(Debug)]
pub struct Pusher {
    pub id: WorkerId,
    /// Per range: the last seq started, and the unacknowledged pushes (seq, payload).
    next_seq: Vec<u32>,
    pending: Vec<VecDeque<(u32, Payload)>>,
    sent_ms: Vec<u64>,
    /// Per range: the highest seq acknowledged.
    pub acked: Vec<u32>,
    /// Per range: how many of this worker's pushes its head said it applied, and the
    /// configuration (by id) the worker routed by when it heard so. A push the head applied is
    /// acknowledged once its chain holds it, without being sent again, while that
    /// configuration stands.
    head_applied: Vec<(u64, u32)>,
    /// The configuration the worker routes by; refreshed from the coordinator when a push is
    /// refused or times out, as a watch would deliver it.
    pub view: Arc<ClusterConfig>,
    pub out: Vec<(Addr, Msg)>,
    /// Ranges whose pushes not yet acknowledged were numbered anew (see
    /// [`renumber_after`](Self::renumber_after)): the range, the first such push's seq before,
    /// and after. The caller maps the seqs it keeps (those below the first were acknowledged),
    /// and takes these.
    pub renumbered: Vec<(RangeId, u32, u32)>,
    /// Acknowledged pushes that their ranges said they no longer hold, counted per range when
    /// found.
    pub lost: u64,
}

impl Pusher {
    pub fn new(id: WorkerId, ranges: u32, view: Arc<ClusterConfig>) -> Self {
        let n = ranges as usize;
        Self {
            id,
            next_seq: vec![0; n],
            pending: vec![VecDeque::new(); n],
            sent_ms: vec![0; n],
            acked: vec![0; n],
            head_applied: vec![(0, 0); n],
            view,
            out: Vec::new(),
            renumbered: Vec::new(),
            lost: 0,
        }
    }

    /// Everything pushed was acknowledged.
    pub fn idle(&self) -> bool {
        self.pending.iter().all(VecDeque::is_empty)
    }

    /// Pushes to `range` not yet acknowledged.
    pub fn in_flight(&self, range: RangeId) -> usize {
        self.pending[range.0 as usize].len()
    }

    pub fn unacked(&self) -> usize {
        self.pending.iter().map(VecDeque::len).sum()
    }

    /// The head of `range` in the worker's view.
    pub fn head_of(&self, range: RangeId) -> Option<NodeId> {
        self.view.chain(range).and_then(|c| c.head())
    }

    /// Starts the next push to `range`; returns its seq.
    pub fn push(&mut self, now_ms: u64, range: RangeId, payload: Payload) -> u32 {
        let r = range.0 as usize;
        self.next_seq[r] += 1;
        let seq = self.next_seq[r];
        self.pending[r].push_back((seq, payload.clone()));
        if self.pending[r].len() == 1 {
            self.sent_ms[r] = now_ms;
        }
        self.send(range, seq, payload);
        seq
    }

    fn send(&mut self, range: RangeId, seq: u32, payload: Payload) {
        if let Some(head) = self.head_of(range) {
            self.out.push((Addr::Node(head), Msg::Push { range, worker: self.id, seq, payload }));
        }
    }

    /// Numbers the next push to `range` after `seq`, the head's count of this worker's pushes
    /// applied there, so that a client starting as a worker that pushed before is not taken
    /// for a resend of its old pushes. Only before the client's first push to the range.
    pub fn start_after(&mut self, range: RangeId, seq: u32) {
        let r = range.0 as usize;
        if self.pending[r].is_empty() && self.next_seq[r] < seq {
            self.next_seq[r] = seq;
            self.acked[r] = self.acked[r].max(seq);
        }
    }

    /// Numbers the pushes to `range` not yet acknowledged on from `seq`, a chain member's count
    /// of this worker's pushes it holds, when that is below what was acknowledged. Every
    /// member of a chain holds every acknowledged push, so the range has lost some: its only
    /// server restarted without its disk, or every member came back from a checkpoint older
    /// than them. Its members would take the pushes that follow for pushes after a gap, and
    /// drop them for ever; numbered on from what they hold, they are applied. The lost ones
    /// are counted in [`lost`](Self::lost). The caller resends at once ([`resend`](Self::resend)
    /// with no wait).
    fn renumber_after(&mut self, range: RangeId, seq: u32) {
        let r = range.0 as usize;
        if seq >= self.acked[r] {
            return;
        }
        self.lost += u64::from(self.acked[r] - seq);
        // Acknowledgements are cumulative: every push after the last acknowledged one waits.
        self.renumbered.push((range, self.acked[r] + 1, seq + 1));
        self.acked[r] = seq;
        for (i, (s, _)) in self.pending[r].iter_mut().enumerate() {
            *s = seq + 1 + i as u32;
        }
        self.next_seq[r] = seq + self.pending[r].len() as u32;
    }

    /// Takes back push `seq` to `range`, which a head refused outright on its first sending (a
    /// push that can never be applied: an unknown table, no room...), so that the pushes after
    /// it are not taken for pushes after a gap. A head applies a worker's pushes to a range in
    /// order, so none after it was applied either: those still pending are numbered one lower,
    /// and the next push to the range takes the number after them. The caller maps the seqs it
    /// keeps of pushes after `seq` the same way, and resends them: a head dropped any it
    /// already received under their old numbers. Returns whether the push was pending (a push
    /// taken back already, or acknowledged, is not).
    pub fn withdraw(&mut self, range: RangeId, seq: u32) -> bool {
        let r = range.0 as usize;
        let Some(at) = self.pending[r].iter().position(|(s, _)| *s == seq) else {
            return false;
        };
        self.pending[r].remove(at);
        self.pending[r].iter_mut().skip(at).for_each(|(s, _)| *s -= 1);
        self.next_seq[r] -= 1;
        true
    }

    /// Takes a message in a reply from server `from`. Returns true when the worker should
    /// refresh its view of the configuration.
    ///
    /// An acknowledgement holds whoever sends it (every server acknowledges only what its chain
    /// holds). A count of the pushes applied ([`Msg::SeqCount`]) is taken only from the range's
    /// head in the worker's view: a server answers for every range it heads by its own
    /// configuration, and one deposed without having heard so yet counts only what reached it.
    /// Taken from it, a count below what was acknowledged since (by the new head, or the new
    /// tail) would read as pushes the range lost, and the pushes still waiting would be
    /// numbered anew onto numbers the range has applied: dropped as resends, though acknowledged.
    pub fn on_msg(&mut self, now_ms: u64, from: NodeId, msg: Msg) -> bool {
        match msg {
            Msg::PushAck { range, seq } => {
                let r = range.0 as usize;
                self.acked[r] = self.acked[r].max(seq);
                let before = self.pending[r].len();
                while self.pending[r].front().is_some_and(|(s, _)| *s <= seq) {
                    self.pending[r].pop_front();
                }
                if self.pending[r].len() < before {
                    self.sent_ms[r] = now_ms;
                }
                false
            }
            Msg::NotHead { config_id, .. } => config_id > self.view.id || config_id == 0,
            Msg::SeqCount { range, .. } if self.head_of(range) != Some(from) => false,
            Msg::SeqCount { range, seq } => {
                self.start_after(range, seq);
                self.renumber_after(range, seq);
                if let Some(applied) = self.head_applied.get_mut(range.0 as usize) {
                    *applied = (self.view.id, seq);
                }
                false
            }
            _ => false,
        }
    }

    /// Whether range `r`'s oldest push has waited `retry_ms` for its acknowledgement.
    fn due(&self, r: usize, now_ms: u64, retry_ms: u64) -> bool {
        !self.pending[r].is_empty() && now_ms >= self.sent_ms[r] + retry_ms
    }

    /// Whether any range's pushes are due to be resent (the caller refreshes the view first).
    pub fn timed_out(&self, now_ms: u64, retry_ms: u64) -> bool {
        (0..self.pending.len()).any(|r| self.due(r, now_ms, retry_ms))
    }

    /// Resends, in order, every push of each range that is due, but those its head said it
    /// applied under the configuration routed by now: those wait for their acknowledgement.
    /// Under load a chain is slow, not broken, and resending what it is still carrying only
    /// adds to its queue (a window of 16 pushes of 1 MiB at three replicas collapsed so).
    pub fn resend(&mut self, now_ms: u64, retry_ms: u64) {
        for r in 0..self.pending.len() {
            if !self.due(r, now_ms, retry_ms) {
                continue;
            }
            self.sent_ms[r] = now_ms;
            let applied = match self.head_applied[r] {
                (view, seq) if view == self.view.id => seq,
                _ => 0,
            };
            let again: Vec<_> = self.pending[r].iter().filter(|(seq, _)| *seq > applied).cloned().collect();
            for (seq, payload) in again {
                self.send(RangeId(r as u32), seq, payload);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Chain, Epoch, Member};

    fn config(id: u64, head: u32) -> Arc<ClusterConfig> {
        let members = (1..=3).map(|n| Member { node: NodeId(n), addr: format!("s{n}"), incarnation: 1, draining: false }).collect();
        let chain = Chain { epoch: Epoch(id), nodes: vec![NodeId(head), NodeId(head % 3 + 1)], learner: None };
        Arc::new(ClusterConfig { id, members, chains: vec![chain], drained: Vec::new(), cluster: 7 })
    }

    /// A pusher to one range that started `pushes` pushes (payload: the seq) and heard
    /// `acked` of them acknowledged, with nothing left to send.
    fn pushed(pushes: u32, acked: u32) -> Pusher {
        let mut p = Pusher::new(WorkerId(0), 1, config(1, 1));
        for seq in 1..=pushes {
            p.push(0, RangeId(0), Payload::from(vec![seq as u8]));
        }
        p.on_msg(10, NodeId(1), Msg::PushAck { range: RangeId(0), seq: acked });
        p.out.clear();
        p
    }

    fn resent(p: &mut Pusher) -> Vec<(NodeId, u32)> {
        std::mem::take(&mut p.out)
            .into_iter()
            .filter_map(|(to, m)| match (to, m) {
                (Addr::Node(n), Msg::Push { seq, .. }) => Some((n, seq)),
                _ => None,
            })
            .collect()
    }

    /// A push the head applied is not sent again while the configuration stands; one it did
    /// not apply is, and every one is once the configuration changes.
    #[test]
    fn a_resend_skips_what_the_head_applied_under_the_same_configuration() {
        let range = RangeId(0);
        let mut p = Pusher::new(WorkerId(0), 1, config(1, 1));
        for seq in 1..=3 {
            assert_eq!(p.push(0, range, Payload::from(vec![seq as u8])), seq);
        }
        p.out.clear();
        // Nothing heard from the head: every push due is resent, in order.
        p.resend(300, 300);
        assert_eq!(resent(&mut p), vec![(NodeId(1), 1), (NodeId(1), 2), (NodeId(1), 3)]);
        // The head applied two of them (they wait for the chain): only the third goes again.
        assert!(!p.on_msg(310, NodeId(1), Msg::SeqCount { range, seq: 2 }));
        p.resend(600, 300);
        assert_eq!(resent(&mut p), vec![(NodeId(1), 3)]);
        // Acknowledged ones leave the queue as before.
        p.on_msg(620, NodeId(1), Msg::PushAck { range, seq: 1 });
        p.resend(920, 300);
        assert_eq!(resent(&mut p), vec![(NodeId(1), 3)]);
        // A new configuration (another head): what the old head said no longer counts.
        p.view = config(2, 2);
        p.resend(1220, 300);
        assert_eq!(resent(&mut p), vec![(NodeId(2), 2), (NodeId(2), 3)]);
    }

    /// A head that holds fewer of the worker's pushes than were acknowledged (its range lost
    /// them) gets the pushes still waiting numbered on from what it holds; the caller is told
    /// how the numbers moved, and later pushes follow on.
    #[test]
    fn a_range_that_lost_acknowledged_pushes_takes_the_rest_numbered_on_from_what_it_holds() {
        let range = RangeId(0);
        let mut p = pushed(5, 3);
        // The head holds 1 push of this worker's: 2 acknowledged ones are gone.
        p.on_msg(20, NodeId(1), Msg::SeqCount { range, seq: 1 });
        assert_eq!((p.lost, std::mem::take(&mut p.renumbered)), (2, vec![(range, 4, 2)]));
        p.resend(20, 0);
        assert_eq!(resent(&mut p), vec![(NodeId(1), 2), (NodeId(1), 3)]);
        assert_eq!(p.push(30, range, Payload::from(vec![6])), 4);
        // Counts at or above what was acknowledged since change nothing.
        p.on_msg(40, NodeId(1), Msg::PushAck { range, seq: 2 });
        p.on_msg(50, NodeId(1), Msg::SeqCount { range, seq: 2 });
        p.on_msg(60, NodeId(1), Msg::SeqCount { range, seq: 4 });
        assert_eq!((p.lost, p.renumbered.len(), p.in_flight(range)), (2, 0, 2));
    }

    /// A server that answers for a range it no longer heads (deposed, and not told yet) counts
    /// fewer pushes than the new head acknowledged: the count is not taken, nothing is numbered
    /// anew, and the pushes still waiting keep their numbers. The same count from the head is
    /// taken.
    #[test]
    fn a_count_from_a_server_that_is_not_the_head_is_not_taken() {
        let range = RangeId(0);
        let mut p = pushed(5, 3);
        // Node 2 answers for the range with an old count; the worker's view has node 1 its head.
        assert!(!p.on_msg(20, NodeId(2), Msg::SeqCount { range, seq: 1 }));
        assert_eq!((p.lost, p.renumbered.len(), p.in_flight(range)), (0, 0, 2));
        p.resend(20, 0);
        assert_eq!(resent(&mut p), vec![(NodeId(1), 4), (NodeId(1), 5)]);
        // From the head, the count says the range lost two acknowledged pushes.
        p.on_msg(30, NodeId(1), Msg::SeqCount { range, seq: 1 });
        assert_eq!(p.lost, 2);
    }

    /// A push refused outright is taken back wherever it stands among the pushes still
    /// waiting: those after it take the numbers one lower, with the payloads they had, so that
    /// the head sees no gap; the next push follows on.
    #[test]
    fn a_refused_push_before_others_is_taken_back_and_the_rest_close_the_gap() {
        let range = RangeId(0);
        let mut p = pushed(4, 1);
        // Push 2 was refused while 3 and 4 were on their way.
        assert!(p.withdraw(range, 2));
        assert!(!p.withdraw(range, 1), "acknowledged: not pending");
        p.resend(20, 0);
        let payloads: Vec<(u32, u8)> = std::mem::take(&mut p.out)
            .into_iter()
            .filter_map(|(_, m)| match m {
                Msg::Push { seq, payload, .. } => Some((seq, payload[0])),
                _ => None,
            })
            .collect();
        assert_eq!(payloads, vec![(2, 3), (3, 4)]);
        assert_eq!(p.push(30, range, Payload::from(vec![5])), 4);
        // The last one started, taken back, gives its number to the next.
        assert!(p.withdraw(range, 4));
        assert_eq!(p.push(40, range, Payload::from(vec![6])), 4);
        assert_eq!(p.in_flight(range), 3);
    }
}
