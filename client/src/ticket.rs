//! Tickets: the handle a call returns at once, and the stamp waiting on it yields.

use std::ops::Range;

use smallvec::SmallVec;
use tessera_transport::{Header, Status};

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

/// Where one sub-request's reply goes.
#[derive(Debug)]
pub(crate) struct Sub {
    pub shard: u16,
    pub id: u64,
    /// Pulls: values land at `out[range]` (contiguous), or, when `scatter` is set, key `i` of the
    /// reply lands at `out[order[range.start + i] * dim ..]`.
    pub range: Range<usize>,
    pub scatter: bool,
    /// Set when the request named a cached key list instead of carrying its keys: what it
    /// takes to send it again with them, should the shard not hold the list.
    pub resend: Option<Box<Resend>>,
}

/// A key-list request as sent, keys and all (see [`Sub::resend`]).
#[derive(Debug, Default)]
pub(crate) struct Resend {
    pub owner: Option<tessera_layout::placement::Owner>,
    pub push: bool,
    pub dim: usize,
    pub keys: Vec<u64>,
    pub grads: Vec<f32>,
    /// Flags other than the key cache's (`PART_DONE`).
    pub flags: u16,
}

/// An operation in flight. Wait on it to learn how it ended; dropping it abandons the result.
#[derive(Debug)]
#[must_use = "a ticket that is not waited on hides the call's errors"]
pub struct Ticket<'a> {
    pub(crate) client: &'a Client,
    pub(crate) subs: Vec<Sub>,
    pub(crate) out: Option<&'a mut [f32]>,
    pub(crate) order: Vec<u32>,
    pub(crate) dim: usize,
    /// The stamp of the parts already read one-sided, when the call made any such read.
    pub(crate) stamp: Option<Stamp>,
    /// Set when a detached ticket was resumed with an output of the wrong length: waiting on it
    /// fails, and its requests are let go as a dropped ticket's are.
    pub(crate) mismatched: bool,
    /// A call to a replicated cluster (see [`Chained`]).
    pub(crate) chained: Option<Chained>,
}

/// A call to a replicated cluster, as its ticket waits on it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Chained {
    /// A push: waiting on it waits for the acknowledgements of this push and every one before
    /// it (the tails hold them).
    Push(Pushed),
    /// Pull number `0` of the client's: waiting on it takes its replies and writes its values.
    Pull(u64),
}

/// A push sent to a replicated cluster, as its ticket waits on it: its number among the
/// client's pushes, and the clock it was sent at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pushed {
    pub push: u64,
    pub clock: u64,
}

/// A ticket cut loose from the client and the output buffer it borrows, for layers that cannot
/// hold a borrow across calls (the C ABI). Give it back to the same client with
/// [`Client::resume`], with the same output buffer, to wait on it. One that is never resumed
/// keeps its replies parked in the client until the client is dropped.
#[derive(Debug)]
pub struct Detached {
    subs: Vec<Sub>,
    order: Vec<u32>,
    dim: usize,
    stamp: Option<Stamp>,
    /// The length of the output the call was given (0 for pushes).
    out_len: usize,
    chained: Option<Chained>,
}

impl<'a> Ticket<'a> {
    /// Cuts the ticket loose from its borrows (see [`Detached`]).
    pub fn detach(mut self) -> Detached {
        let out_len = self.out.as_ref().map_or(0, |o| o.len());
        let chained = std::mem::take(&mut self.chained);
        Detached { subs: std::mem::take(&mut self.subs), order: std::mem::take(&mut self.order), dim: self.dim, stamp: self.stamp.take(), out_len, chained }
    }

    /// A detached ticket of `client` back, writing into `out` (which must have the length the
    /// call was given, or the ticket fails when waited on).
    pub(crate) fn resume(client: &'a Client, d: Detached, out: Option<&'a mut [f32]>) -> Ticket<'a> {
        let mut ticket = Ticket { client, subs: d.subs, out, order: d.order, dim: d.dim, stamp: d.stamp, mismatched: false, chained: d.chained };
        // Replies are not written to a buffer of another shape: waiting fails, and dropping the
        // ticket then lets its requests go as any dropped ticket's do.
        ticket.mismatched = ticket.out.as_ref().map_or(0, |o| o.len()) != d.out_len;
        ticket
    }
}

/// Whether every reply `subs` wait for is in (see [`Core::arrived`](crate::core::Core)),
/// receiving for up to `timeout` in all.
fn arrived(client: &Client, subs: &[Sub], chained: Option<Chained>, timeout: std::time::Duration) -> Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    let mut core = client.lock();
    match chained {
        Some(Chained::Push(pushed)) => return core.chain_settled(pushed.push, Some(deadline)),
        Some(Chained::Pull(pull)) => return Ok(core.chain_pull_arrived(pull, deadline)),
        None => {}
    }
    for sub in subs {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if !core.arrived(sub.shard, sub.id, left)? {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Detached {
    /// Whether waiting on this ticket (resumed on `client`, the client that made it) would
    /// return without blocking; receives for up to `timeout` first. Zero only looks.
    pub(crate) fn ready(&self, client: &Client, timeout: std::time::Duration) -> Result<bool> {
        arrived(client, &self.subs, self.chained, timeout)
    }
}

impl Ticket<'_> {
    /// Whether [`Ticket::wait`] would return without blocking: every shard answered, or a
    /// connection the call went over broke. Receives for up to `timeout` first (zero only
    /// looks); the ticket stays as it was either way.
    pub fn ready(&self, timeout: std::time::Duration) -> Result<bool> {
        arrived(self.client, &self.subs, self.chained, timeout)
    }

    /// Blocks until every shard answered. Pulls have written their values when this returns.
    /// Returns the stamp of the keys touched, or the first error any shard reported.
    ///
    /// On a replicated cluster a push's ticket waits until the tails of its ranges hold it (and
    /// every push of this client before it); its stamp is the one its heads gave as they
    /// applied it (the meet over its pieces), or, when a head's answer was lost (a failover)
    /// or the ticket waits more than [`PUSH_STAMPS_KEPT`](crate::PUSH_STAMPS_KEPT) pushes
    /// late, only this worker's clock. A pull there writes its values when waited on, as on one
    /// server; should a tail have failed, it is made again then, whole.
    pub fn wait(mut self) -> Result<Stamp> {
        if self.mismatched {
            return Err(ClientError::Config { reason: "a detached ticket was resumed with an output of another length".into() });
        }
        match self.chained.take() {
            Some(Chained::Push(pushed)) => {
                let mut core = self.client.lock();
                core.chain_settled(pushed.push, None)?;
                return Ok(core.chain_push_stamp(pushed));
            }
            Some(Chained::Pull(pull)) => {
                let out = self.out.as_deref_mut().expect("a pull has an output");
                let mut stamp = self.client.lock().chain_finish_pull(pull, out)?;
                stamp.drop_trailing_zeros();
                return Ok(stamp);
            }
            None => {}
        }
        let subs = std::mem::take(&mut self.subs);
        let mut core = self.client.lock();
        let read = self.stamp.take();
        let first_sub = read.is_none();
        let mut stamp = read.unwrap_or_default();
        let mut failure = None;
        let mut subs = subs;
        for (i, sub) in subs.iter_mut().enumerate() {
            let out = &mut self.out;
            let order = &self.order;
            let dim = self.dim;
            let got = core.await_sub(sub, |sub, header, body| absorb(sub, header, body, out.as_deref_mut(), order, dim, &mut stamp, first_sub && i == 0));
            if let Err(e) = got {
                failure.get_or_insert(e);
            }
        }
        core.recycle(std::mem::take(&mut self.order), subs);
        stamp.drop_trailing_zeros();
        failure.map_or(Ok(stamp), Err)
    }
}

/// Takes one reply: checks it, merges its stamp, and puts its values where they belong.
#[allow(clippy::too_many_arguments)]
fn absorb(
    sub: &Sub,
    header: &Header,
    body: &[u8],
    out: Option<&mut [f32]>,
    order: &[u32],
    dim: usize,
    stamp: &mut Stamp,
    first: bool,
) -> std::result::Result<(), String> {
    if header.status() != Status::Ok {
        return Err(String::from_utf8_lossy(body).into_owned());
    }
    let stamp_bytes = header.count as usize * 8;
    if body.len() < stamp_bytes || !(body.len() - stamp_bytes).is_multiple_of(4) {
        return Err(format!("reply body of {} bytes does not hold a {}-entry stamp and values", body.len(), header.count));
    }
    let (clocks, values) = body.split_at(stamp_bytes);
    stamp.meet(clocks.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))), first);
    let Some(out) = out else { return Ok(()) };
    let want = sub.range.len() * if sub.scatter { dim } else { 1 };
    if values.len() != want * 4 {
        return Err(format!("reply holds {} values, expected {want}", values.len() / 4));
    }
    if !sub.scatter {
        copy_le_f32(values, &mut out[sub.range.clone()]);
        return Ok(());
    }
    let floats = values.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")));
    {
        let mut floats = floats;
        for &k in &order[sub.range.clone()] {
            let at = k as usize * dim;
            out[at..at + dim].iter_mut().zip(floats.by_ref()).for_each(|(o, v)| *o = v);
        }
    }
    Ok(())
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(Chained::Pull(pull)) = self.chained {
            // Its replies are let go as they come: nothing is written into its output.
            if let Ok(mut core) = self.client.core.lock() {
                core.chain_abandon_pull(pull);
            }
            return;
        }
        if self.subs.is_empty() {
            return;
        }
        if let Ok(mut core) = self.client.core.lock() {
            for sub in &mut self.subs {
                if sub.resend.is_some() {
                    // A push by a cached key list that the shard did not hold was not applied:
                    // it is sent again (and a pull's values thrown away), so dropping the
                    // ticket abandons only the result, as it does for other requests.
                    let _ = core.await_sub(sub, |_, _, _| Ok(()));
                } else {
                    core.abandon(sub.shard, sub.id);
                }
            }
        }
    }
}

/// Turns a reply-level failure into the caller's error.
pub(crate) fn server_error(server: &str, header: &Header, message: String) -> ClientError {
    if header.status() == Status::Ok {
        ClientError::Protocol { server: server.into(), reason: message }
    } else {
        ClientError::Server { server: server.into(), status: header.status(), message }
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
