//! Tickets: the handle a call returns at once, and the stamp waiting on it yields.

use smallvec::SmallVec;

use crate::error::{ClientError, Result};
use crate::Client;

/// Clocks a [`Stamp`] holds in place. A job of up to this many workers (the servers' default
/// `--workers-max`) gets every call's stamp without a heap allocation; a larger job's stamps
/// allocate once per call.
pub const STAMP_INLINE_CLOCKS: usize = 16;

/// A vector-clock stamp: for each worker, a clock every key the call touched has reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    clocks: SmallVec<[u64; STAMP_INLINE_CLOCKS]>,
}

impl Stamp {
    /// One clock per worker id (missing trailing workers have clock 0).
    pub fn clocks(&self) -> &[u64] {
        &self.clocks
    }

    /// Worker `worker`'s clock.
    pub fn get(&self, worker: usize) -> u64 {
        self.clocks.get(worker).copied().unwrap_or(0)
    }

    /// The smallest clock of any of the first `workers` workers.
    pub fn min_over(&self, workers: usize) -> u64 {
        (0..workers).map(|w| self.get(w)).min().unwrap_or(0)
    }

    /// The stamp of `worker`'s own clock `clock` alone (empty at clock 0): what any of its
    /// acknowledged pushes vouches for by itself.
    pub(crate) fn own(worker: usize, clock: u64) -> Stamp {
        let mut clocks = SmallVec::new();
        if clock > 0 {
            clocks.resize(worker + 1, 0);
            clocks[worker] = clock;
        }
        Stamp { clocks }
    }

    /// Drops trailing zeros, which say nothing (an absent worker has clock 0), so that stamps
    /// from replies and from one-sided reads, which carry different lengths, compare equal.
    pub(crate) fn drop_trailing_zeros(&mut self) {
        while self.clocks.last() == Some(&0) {
            self.clocks.pop();
        }
    }

    /// Keeps, for each worker, the lower of the two clocks (a worker absent from one side has 0).
    pub(crate) fn meet(&mut self, other: impl ExactSizeIterator<Item = u64>, first: bool) {
        if first {
            self.clocks.extend(other);
            return;
        }
        let n = other.len();
        for (mine, theirs) in self.clocks.iter_mut().zip(other) {
            *mine = (*mine).min(theirs);
        }
        self.clocks.truncate(n);
    }
}

/// An operation in flight. Wait on it to learn how it ended; dropping it abandons the result.
#[derive(Debug)]
#[must_use = "a ticket that is not waited on hides the call's errors"]
pub struct Ticket<'a> {
    pub(crate) client: &'a Client,
    pub(crate) out: Option<&'a mut [f32]>,
    pub(crate) call: Called,
    /// Set when a detached ticket was resumed with an output of the wrong length: waiting on it
    /// fails, and its pull is let go as a dropped ticket's is.
    pub(crate) mismatched: bool,
}

/// The call a ticket waits on.
#[derive(Debug, Clone)]
pub(crate) enum Called {
    /// A push: waiting on it waits for the acknowledgements of this push and every one before
    /// it (the tails hold them).
    Push(Pushed),
    /// Pull number `0` of the client's: waiting on it takes its replies and writes its values.
    Pull(u64),
    /// A call already answered (a bounded-delay pull, a push a filter kept nothing of), with
    /// its stamp.
    Answered(Stamp),
}

/// A push as its ticket waits on it: its number among the client's pushes, and the clock it
/// was sent at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pushed {
    pub push: u64,
    pub clock: u64,
}

/// A ticket cut loose from the client and the output buffer it borrows, for layers that cannot
/// hold a borrow across calls (the C ABI). Give it back to the same client with
/// [`Client::resume`], with the same output buffer, to wait on it. A pull that is never
/// resumed keeps its replies in the client until the client is dropped.
#[derive(Debug)]
pub struct Detached {
    call: Called,
    /// The length of the output the call was given (0 for pushes).
    out_len: usize,
}

impl<'a> Ticket<'a> {
    /// Cuts the ticket loose from its borrows (see [`Detached`]).
    pub fn detach(mut self) -> Detached {
        let out_len = self.out.as_ref().map_or(0, |o| o.len());
        // (The ticket's drop then has no pull to let go.)
        let call = std::mem::replace(&mut self.call, Called::Answered(Stamp::default()));
        Detached { call, out_len }
    }

    /// A detached ticket of `client` back, writing into `out` (which must have the length the
    /// call was given, or the ticket fails when waited on).
    pub(crate) fn resume(client: &'a Client, d: Detached, out: Option<&'a mut [f32]>) -> Ticket<'a> {
        // Replies are not written to a buffer of another shape: waiting fails, and dropping the
        // ticket then lets its pull go as any dropped ticket's is.
        let mismatched = out.as_ref().map_or(0, |o| o.len()) != d.out_len;
        Ticket { client, out, call: d.call, mismatched }
    }
}

/// Whether waiting on `call` would return without blocking, receiving for up to `timeout`.
fn arrived(client: &Client, call: &Called, timeout: std::time::Duration) -> Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    match call {
        Called::Push(pushed) => client.lock().push_settled(pushed.push, Some(deadline)),
        Called::Pull(pull) => Ok(client.lock().pull_arrived(*pull, deadline)),
        Called::Answered(_) => Ok(true),
    }
}

impl Detached {
    /// Whether waiting on this ticket (resumed on `client`, the client that made it) would
    /// return without blocking; receives for up to `timeout` first. Zero only looks.
    pub(crate) fn ready(&self, client: &Client, timeout: std::time::Duration) -> Result<bool> {
        arrived(client, &self.call, timeout)
    }
}

impl Ticket<'_> {
    /// Whether [`Ticket::wait`] would return without blocking: every range answered, or a
    /// connection the call went over broke. Receives for up to `timeout` first (zero only
    /// looks); the ticket stays as it was either way.
    pub fn ready(&self, timeout: std::time::Duration) -> Result<bool> {
        arrived(self.client, &self.call, timeout)
    }

    /// Blocks until the call is answered. Pulls have written their values when this returns.
    /// Returns the stamp of the keys touched, or the first error any server reported.
    ///
    /// A push's ticket waits until the tails of its ranges hold it (and every push of this
    /// client before it); its stamp is the one its heads gave as they applied it (the meet
    /// over its pieces), or, when a head's answer was lost (a failover) or the ticket waits
    /// more than [`PUSH_STAMPS_KEPT`](crate::PUSH_STAMPS_KEPT) pushes late, only this
    /// worker's clock. A pull writes its values when waited on; should a tail have failed, it
    /// is made again then, whole.
    pub fn wait(mut self) -> Result<Stamp> {
        if self.mismatched {
            return Err(ClientError::Config { reason: "a detached ticket was resumed with an output of another length".into() });
        }
        match std::mem::replace(&mut self.call, Called::Answered(Stamp::default())) {
            Called::Push(pushed) => {
                let mut core = self.client.lock();
                core.push_settled(pushed.push, None)?;
                Ok(core.push_stamp(pushed))
            }
            Called::Pull(pull) => {
                let out = self.out.as_deref_mut().expect("a pull has an output");
                let mut stamp = self.client.lock().finish_pull(pull, out)?;
                stamp.drop_trailing_zeros();
                Ok(stamp)
            }
            Called::Answered(stamp) => Ok(stamp),
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Called::Pull(pull) = self.call {
            // Its replies are let go as they come: nothing is written into its output.
            if let Ok(mut core) = self.client.core.lock() {
                core.abandon_pull(pull);
            }
        }
    }
}

/// Copies little-endian f32 `bytes` (4 per value) into `out`, as long. Replies read in place
/// from a link are aligned: one copy. Parked replies may not be, and go value by value.
pub(crate) fn copy_le_f32(bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * 4);
    match bytemuck::try_cast_slice::<u8, f32>(bytes) {
        Ok(v) => out.copy_from_slice(v),
        Err(_) => out.iter_mut().zip(bytes.chunks_exact(4)).for_each(|(o, c)| *o = f32::from_le_bytes(c.try_into().expect("4 bytes"))),
    }
}
