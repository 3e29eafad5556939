//! A worker's side of chain replication, as a state machine with no I/O: it numbers its pushes to
//! each range, sends them to the range's head, keeps what is not yet acknowledged, and resends
//! it, in order, to whoever is head by then. The client drives it over the transport; the
//! simulator drives the same code.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::protocol::{Addr, ClusterConfig, Msg, RangeId, WorkerId};

/// One worker's pushes, per range.
#[derive(Debug)]
pub struct Pusher {
    pub id: WorkerId,
    /// Per range: the last seq started, and the unacknowledged pushes (seq, payload).
    next_seq: Vec<u32>,
    pending: Vec<VecDeque<(u32, Arc<[u8]>)>>,
    sent_ms: Vec<u64>,
    /// Per range: the highest seq acknowledged.
    pub acked: Vec<u32>,
    /// The configuration the worker routes by; refreshed from the coordinator when a push is
    /// refused or times out, as a watch would deliver it.
    pub view: Arc<ClusterConfig>,
    pub out: Vec<(Addr, Msg)>,
}

impl Pusher {
    pub fn new(id: WorkerId, ranges: u32, view: Arc<ClusterConfig>) -> Self {
        let n = ranges as usize;
        Self { id, next_seq: vec![0; n], pending: vec![VecDeque::new(); n], sent_ms: vec![0; n], acked: vec![0; n], view, out: Vec::new() }
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

    /// Starts the next push to `range`; returns its seq.
    pub fn push(&mut self, now_ms: u64, range: RangeId, payload: Arc<[u8]>) -> u32 {
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

    fn send(&mut self, range: RangeId, seq: u32, payload: Arc<[u8]>) {
        if let Some(head) = self.view.chain(range).and_then(|c| c.head()) {
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

    /// Takes back push `seq` to `range`, which a head refused outright (a push that can never
    /// be applied: an unknown table, no room...), so that the next push to the range reuses
    /// its number. Only the last push started can be taken back, and only when it was never
    /// applied anywhere (the caller knows: it was refused on its first sending); returns
    /// whether it was.
    pub fn withdraw(&mut self, range: RangeId, seq: u32) -> bool {
        let r = range.0 as usize;
        if self.next_seq[r] != seq || self.pending[r].back().is_none_or(|(s, _)| *s != seq) {
            return false;
        }
        self.pending[r].pop_back();
        self.next_seq[r] -= 1;
        true
    }

    /// Takes a reply. Returns true when the worker should refresh its view of the configuration.
    pub fn on_msg(&mut self, now_ms: u64, msg: Msg) -> bool {
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
            Msg::SeqCount { range, seq } => {
                self.start_after(range, seq);
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

    /// Resends, in order, every push of each range that is due.
    pub fn resend(&mut self, now_ms: u64, retry_ms: u64) {
        for r in 0..self.pending.len() {
            if !self.due(r, now_ms, retry_ms) {
                continue;
            }
            self.sent_ms[r] = now_ms;
            let again: Vec<_> = self.pending[r].iter().cloned().collect();
            for (seq, payload) in again {
                self.send(RangeId(r as u32), seq, payload);
            }
        }
    }
}
