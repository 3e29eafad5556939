//! A simulated training worker: the production [`Pusher`] with a number of pushes to make and a
//! window of pushes in flight per range.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::protocol::{ClusterConfig, Payload, RangeId, WorkerId};
use crate::worker::Pusher;

/// Pushes a worker keeps in flight per range.
pub const WINDOW: usize = 3;

#[derive(Debug)]
pub struct SimWorker {
    pusher: Pusher,
    /// Pushes still to start.
    pub to_push: u32,
}

impl SimWorker {
    pub fn new(id: WorkerId, ranges: u32, to_push: u32, view: Arc<ClusterConfig>) -> Self {
        Self { pusher: Pusher::new(id, ranges, view), to_push }
    }

    /// Everything it had to push was pushed and acknowledged.
    pub fn done(&self) -> bool {
        self.to_push == 0 && self.pusher.idle()
    }

    /// Whether range `r` has room for another push.
    pub fn can_push(&self, r: RangeId) -> bool {
        self.to_push > 0 && self.pusher.in_flight(r) < WINDOW
    }

    /// Starts the next push to `range`; returns its seq.
    pub fn push(&mut self, now_ms: u64, range: RangeId, payload: Payload) -> u32 {
        self.to_push -= 1;
        self.pusher.push(now_ms, range, payload)
    }
}

impl Deref for SimWorker {
    type Target = Pusher;
    fn deref(&self) -> &Pusher {
        &self.pusher
    }
}

impl DerefMut for SimWorker {
    fn deref_mut(&mut self) -> &mut Pusher {
        &mut self.pusher
    }
}
