//! The worker's side of RDMA: a [`Link`] that writes request frames into the shard's slots and
//! finds replies written into its own.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use zerocopy::IntoBytes;

use crate::buf::{Deflater, Inflater};
use crate::config::TransportConfig;
use crate::error::{Result, TransportError};
use crate::tcp::TcpLink;
use crate::wire::{Header, Op, ShortHeader, Status, HEADER_BYTES, SHORT_HEADER_BYTES};
use crate::{Frame, Link, OneSided};

use super::arrival::{Arrivals, Tags};
use super::verbs::{Access, Completion, Cq, Device, Opcode, Qp, Region, INLINE_BYTES_MAX};
use super::{rdma, Endpoint, RdmaConfig, RemoteDense, SlotKey, SlotLayout, SHORT_FRAME, TAG_BYTES};
use tessera_layout::dense::block_is_whole;

/// A link to one shard over an RC queue pair. Field order is drop order: the queue pair goes
/// before the regions it reads and writes.
pub struct RdmaLink {
    qp: Qp,
    /// Request frames are built here, then written into the shard's slot of the same index.
    /// Laid out as `layout`, like `inbox`.
    out: Region,
    /// The shard writes replies here: short ones into the slots' compact areas.
    inbox: Region,
    /// One-sided reads of dense blocks land here.
    reads: Region,
    cq: Cq,
    sleeper: Poll,
    events: Events,
    _dev: Arc<Device>,
    /// Kept open: the shard releases this link's queue pair and rings when it closes.
    tcp: TcpLink,
    /// The shard's request slots: full areas, and compact ones for short frames.
    remote: Vec<SlotKey>,
    remote_small: Vec<SlotKey>,
    layout: SlotLayout,
    send_bytes_max: usize,
    slots: u64,
    /// Requests posted, replies handed out or parked, request writes completed.
    sent: u64,
    consumed: u64,
    writes_done: u64,
    /// The replies that landed in the inbox (reply `n` answers request `n`).
    arrivals: Arrivals,
    /// The tags this link writes after its requests (salted by the shard).
    tags_out: Tags,
    /// Small (inline) request writes ask for a completion once in this many.
    signal_every: u64,
    /// Per slot: the request id of the request last sent from it (a short reply leaves it out).
    ids: Vec<u64>,
    /// Replies copied out of their slot because a new request needed it before anyone asked.
    parked: VecDeque<Vec<u8>>,
    current: Vec<u8>,
    inflater: Inflater,
    deflater: Deflater,
    completions: Vec<Completion>,
    /// Where the shard's dense table parts lie, each once asked: by table id (a replicated
    /// shard holds one part of a table per replication range).
    dense: Vec<(u32, RemoteDense)>,
    /// Reads completed (only the last of a batch is signaled), and torn block copies read again.
    reads_done: u64,
    torn: u64,
    spin: Duration,
    io_timeout: Duration,
}

impl std::fmt::Debug for RdmaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaLink").field("peer", &self.tcp.peer()).field("sent", &self.sent).finish()
    }
}

impl RdmaLink {
    /// Connects over TCP as [`TcpLink::connect`] does, then sets up the queue pair and rings on
    /// that connection. Returns the link and the server's hello reply.
    pub fn connect(addr: &str, shard: u64, worker: u32, cfg: &TransportConfig, rcfg: &RdmaConfig, dev: Arc<Device>) -> Result<(Self, Vec<u8>)> {
        rcfg.validate()?;
        let (tcp, info) = TcpLink::connect(addr, shard, worker, cfg)?;
        Ok((Self::upgrade(tcp, cfg, rcfg, dev)?, info))
    }

    /// Sets up the queue pair and rings on `tcp`, a link that has said hello to a shard, which
    /// it keeps open beside them (see [`RdmaLink::tcp`]).
    pub fn upgrade(mut tcp: TcpLink, cfg: &TransportConfig, rcfg: &RdmaConfig, dev: Arc<Device>) -> Result<Self> {
        let _span = tracing::info_span!("rdma_connect", peer = tcp.peer()).entered();
        rcfg.validate()?;
        let (slots, sb) = (rcfg.slots, rcfg.slot_bytes);
        let layout = SlotLayout::new(slots, sb);
        // Room for `slots` request writes not yet retired (inline ones are signaled only every
        // `signal_every`) beside a batch of `slots` one-sided reads; and twice `slots` receives,
        // since a reply seen by its tag has its receive posted again only later (see `free_slot`).
        let cq = Cq::new(&dev, 4 * slots + 2).map_err(rdma)?;
        let mut qp = Qp::new(&dev, &cq, &cq, 2 * slots + 1, 2 * slots).map_err(rdma)?;
        let out = Region::new(&dev, layout.region_bytes(), Access { remote_write: false, remote_read: false }).map_err(rdma)?;
        let inbox = Region::new(&dev, layout.region_bytes(), Access { remote_write: true, remote_read: false }).map_err(rdma)?;
        let reads = Region::new(&dev, slots as usize * sb, Access { remote_write: false, remote_read: false }).map_err(rdma)?;
        for i in 0..2 * slots {
            qp.post_recv(u64::from(i)).map_err(rdma)?;
        }
        let mine = Endpoint::new(qp.info(), layout, &inbox)?;
        let mut header = Header::request(Op::RdmaConnect, 0);
        tcp.send(&mut header, &[&mine.encode()], false)?;
        let reply = tcp.recv(None)?;
        if reply.header.status() != Status::Ok {
            return Err(rdma(format!("the shard refused RDMA: {}", String::from_utf8_lossy(reply.body))));
        }
        let theirs = Endpoint::decode(reply.body)?;
        if theirs.slots.len() != slots as usize || theirs.slot_bytes != sb {
            return Err(rdma(format!(
                "the shard answered with {} slots of {} bytes, not the {slots} of {sb} asked for",
                theirs.slots.len(),
                theirs.slot_bytes
            )));
        }
        qp.connect(&theirs.qp).map_err(rdma)?;
        let sleeper = Poll::new()?;
        sleeper.registry().register(&mut mio::unix::SourceFd(&cq.fd()), Token(0), Interest::READABLE)?;
        // The TCP connection wakes a sleeper too: when the shard's process dies, it closes at
        // once, while the queue pair only fails after the device's retries run out.
        sleeper.registry().register(&mut mio::unix::SourceFd(&tcp.fd()), Token(1), Interest::READABLE)?;
        let link = Self {
            qp,
            out,
            inbox,
            reads,
            cq,
            sleeper,
            events: Events::with_capacity(4),
            _dev: dev,
            tcp,
            remote: theirs.slots,
            remote_small: theirs.small,
            layout,
            send_bytes_max: layout.frame_room(false).min(cfg.frame_bytes_max),
            slots: slots as u64,
            sent: 0,
            consumed: 0,
            writes_done: 0,
            arrivals: Arrivals::new(slots as usize, mine.tag_salt, rcfg.arrival),
            tags_out: Tags::new(theirs.tag_salt),
            signal_every: (slots as u64 / 2).max(1),
            ids: vec![0; slots as usize],
            parked: VecDeque::new(),
            current: Vec::new(),
            inflater: Inflater::default(),
            deflater: Deflater::default(),
            completions: Vec::with_capacity(16),
            dense: Vec::new(),
            reads_done: 0,
            torn: 0,
            spin: Duration::from_micros(rcfg.spin_us),
            io_timeout: Duration::from_millis(cfg.io_timeout_ms),
        };
        Ok(link)
    }

    /// The TCP connection the link was set up on, to the same shard. A caller with no request
    /// in flight on the queue pair may send a frame too large for a slot here: the shard
    /// serves it like any other, and with nothing outstanding the two paths cannot reorder.
    pub fn tcp(&mut self) -> &mut TcpLink {
        &mut self.tcp
    }

    /// Requests sent on the queue pair whose replies have not been received.
    pub fn in_flight(&self) -> u64 {
        self.sent - self.consumed + self.parked.len() as u64
    }

    /// Test hook only, for tests that play a misbehaving worker: the shard slots (address,
    /// rkey) this link writes its requests to: the full areas in slot order, then the compact
    /// ones (short frames) in slot order.
    #[doc(hidden)]
    pub fn remote_slot_keys(&self) -> Vec<(u64, u32)> {
        self.remote.iter().chain(&self.remote_small).map(|k| (k.addr, k.rkey)).collect()
    }

    /// Test hook only, for tests that play a misbehaving worker: from now on, write requests to
    /// these (address, rkey) slots instead of the ones the shard gave, in the order
    /// [`RdmaLink::remote_slot_keys`] lists them. Panics unless there are two per slot.
    #[doc(hidden)]
    pub fn override_remote_slot_keys(&mut self, keys: Vec<(u64, u32)>) {
        assert_eq!(keys.len(), 2 * self.remote.len(), "two (address, rkey) per slot: full areas, then compact ones");
        let mut keys = keys.into_iter().map(|(addr, rkey)| SlotKey { addr, rkey, reserved: 0 });
        self.remote = keys.by_ref().take(self.remote_small.len()).collect();
        self.remote_small = keys.collect();
    }

    /// Test hook only, for tests that play a misbehaving worker: the (address, rkey) of each
    /// chunk of the part of dense table `table` holding `key` that the shard lets this link
    /// read (asking it first); `None` when the shard has no such dense part.
    #[doc(hidden)]
    pub fn remote_dense_keys(&mut self, table: u32, key: u64) -> Result<Option<Vec<(u64, u32)>>> {
        Ok(self.remote_dense(table, key)?.map(|i| self.dense[i].1.chunks.iter().map(|c| (c.addr, c.rkey)).collect()))
    }

    /// Test hook only: from now on, read the part of dense table `table` holding `key` at these
    /// (address, rkey) pairs, one per chunk, instead of the ones the shard gave. Panics unless
    /// the part was looked up and the count matches.
    #[doc(hidden)]
    pub fn override_remote_dense_keys(&mut self, table: u32, key: u64, keys: &[(u64, u32)]) {
        let i = self.known_dense(table, key).expect("looked up with remote_dense_keys");
        let dense = &mut self.dense[i].1;
        assert_eq!(keys.len(), dense.chunks.len(), "one (address, rkey) per chunk");
        for (chunk, (addr, rkey)) in dense.chunks.iter_mut().zip(keys) {
            (chunk.addr, chunk.rkey) = (*addr, *rkey);
        }
    }

    /// Takes every completion there is; returns how many.
    fn reap(&mut self) -> Result<usize> {
        self.completions.clear();
        let n = self.cq.poll(&mut self.completions, 16);
        for i in 0..n {
            let c = self.completions[i];
            if !c.ok {
                return Err(rdma(format!("work request failed: {} (the shard may be gone)", c.status_text)));
            }
            match c.opcode {
                Opcode::RecvRdmaWithImm => self.took_reply(c)?,
                // Writes complete in order, and a signaled one retires the unsignaled ones
                // before it: its id is its sequence number.
                Opcode::RdmaWrite => self.writes_done = self.writes_done.max(c.wr_id + 1),
                Opcode::RdmaRead => self.reads_done += 1,
                _ => {}
            }
        }
        Ok(n)
    }

    /// A reply's receive completion: posts the receive again, and counts the reply as landed
    /// unless its tag was seen first.
    fn took_reply(&mut self, c: Completion) -> Result<()> {
        if let Err(slot) = self.arrivals.took(c.imm.unwrap_or(u32::MAX)) {
            return Err(rdma(format!("reply in slot {:?}, expected {slot}", c.imm)));
        }
        self.qp.post_recv(c.wr_id).map_err(rdma)
    }

    /// Counts every reply whose tag shows in the inbox as landed.
    fn look(&mut self) {
        let inbox = &self.inbox;
        self.arrivals.look(|o| inbox.load_u64(o), self.layout, self.sent);
    }

    /// Waits until `ready`: spins, looking for landed replies and taking completions, then
    /// sleeps on the completion channel. While replies are found by their tags, completions are
    /// taken only every [`REAP_EVERY`] turns (they are housekeeping then), unless `ready` waits
    /// for one (`completions`: a write or a read to finish). What is already so costs nothing:
    /// a request's slot is usually free when it is asked for, its completions having been
    /// taken while the worker waited for an earlier reply.
    fn wait(&mut self, deadline: Instant, what: &'static str, completions: bool, ready: impl Fn(&Self) -> bool) -> Result<()> {
        if ready(self) {
            return Ok(());
        }
        let every = if completions || !self.arrivals.by_memory() { 1 } else { REAP_EVERY };
        let mut turn = 0u32;
        let found = super::spin(self.spin, Some(deadline), || {
            self.look();
            turn = turn.wrapping_add(1);
            if turn.is_multiple_of(every) {
                self.reap()?;
            }
            Ok::<_, TransportError>(ready(self))
        })?;
        if found {
            return Ok(());
        }
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout { what, ms: self.io_timeout.as_millis() as u64 });
            }
            self.cq.arm().map_err(rdma)?;
            // Whatever landed before the arming raises no event.
            self.reap()?;
            self.look();
            if ready(self) {
                return Ok(());
            }
            match self.sleeper.poll(&mut self.events, Some(deadline - now)) {
                Ok(()) => self.cq.ack_events(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            self.reap()?;
            self.look();
            if ready(self) {
                return Ok(());
            }
            if self.events.iter().any(|e| e.token() == Token(1)) && self.tcp.closed() {
                return Err(TransportError::Closed { mid_frame: false });
            }
        }
    }

    /// The reply in slot `slot` (in its compact area if short): its (long) header, and where its
    /// body lies in `inbox`.
    fn reply_at(&self, slot: usize) -> Result<(Header, Range<usize>)> {
        let short = self.arrivals.short(slot);
        let (at, room) = self.layout.area(slot, short);
        let bytes = &self.inbox.as_slice()[at..at + room];
        let (header, head_len) = if short {
            (ShortHeader::expand(bytes, self.ids[slot], room)?, SHORT_HEADER_BYTES)
        } else {
            let mut header = Header::decode(bytes, room)?;
            // A request sent with a short header carries no id, so the shard answers it with id
            // 0 when the reply is too large for a short header (a pull of values by a cached key
            // list, say). The reply in a slot answers the request sent from it.
            if header.request_id == 0 {
                header.request_id = self.ids[slot];
            }
            (header, HEADER_BYTES)
        };
        Ok((header, at + head_len..at + head_len + header.body_len as usize))
    }

    /// Copies the oldest unread reply out of its slot, as a long frame, so that the slot can
    /// take a new request.
    fn park_oldest(&mut self, deadline: Instant) -> Result<()> {
        self.wait(deadline, "a reply to free a slot", false, |l| l.arrivals.landed > l.consumed)?;
        let (mut header, body) = self.reply_at((self.consumed % self.slots) as usize)?;
        header.seal();
        let mut copy = Vec::with_capacity(HEADER_BYTES + body.len());
        copy.extend_from_slice(header.as_bytes());
        copy.extend_from_slice(&self.inbox.as_slice()[body]);
        self.parked.push_back(copy);
        self.consumed += 1;
        Ok(())
    }

    /// Waits until the next request's slot is free: its reply slot holds no unread reply, the
    /// device no longer reads its staging, and a receive is posted for its reply. Returns its
    /// index.
    fn free_slot(&mut self) -> Result<usize> {
        let seq = self.sent;
        if self.slot_is_free() {
            // The usual case: no clock is read (in the SoftRoCE guest a read costs about 0.1 us).
            return Ok((seq % self.slots) as usize);
        }
        let deadline = Instant::now() + self.io_timeout;
        while self.consumed + self.slots <= seq {
            self.park_oldest(deadline)?;
        }
        // Twice `slots` receives are posted and at most `slots` requests are outstanding, so the
        // reply to this one finds a receive once those of all but the last `slots` replies
        // handed out were posted again. Those replies have landed: their completions are due.
        self.wait(deadline, "receive completions", true, |l| l.arrivals.recvs + l.slots > l.consumed)?;
        self.wait(deadline, "a slot to send from", true, |l| l.writes_done + l.slots > l.sent)?;
        Ok((seq % self.slots) as usize)
    }

    /// Whether the next request's slot is free already: what [`RdmaLink::free_slot`] waits for.
    fn slot_is_free(&self) -> bool {
        self.consumed + self.slots > self.sent && self.arrivals.recvs + self.slots > self.consumed && self.writes_done + self.slots > self.sent
    }

    /// Puts the next request's arrival tag after the `frame_len` bytes staged for `slot` (in
    /// its compact area if `short`), and writes both into the shard's slot of the same kind,
    /// naming the slot (and whether it holds a short frame) in the immediate data.
    fn post_staged(&mut self, slot: usize, frame_len: usize, short: bool) -> Result<()> {
        let seq = self.sent;
        let (at, _) = self.layout.area(slot, short);
        let tag = self.tags_out.tag(seq).to_le_bytes();
        self.out.as_mut_slice()[at + frame_len..at + frame_len + TAG_BYTES].copy_from_slice(&tag);
        let len = frame_len + TAG_BYTES;
        let key = if short { self.remote_small[slot] } else { self.remote[slot] };
        let imm = slot as u32 | if short { SHORT_FRAME } else { 0 };
        if len <= INLINE_BYTES_MAX {
            // Small frames are copied into the work request as it is posted, so the staging is
            // free at once: only every `signal_every`-th such write asks for a completion, which
            // retires the ones before it (one completion, not two, per small request).
            let frame = &self.out.as_slice()[at..at + len];
            let signaled = seq % self.signal_every == self.signal_every - 1;
            self.qp.post_write_imm_inline(seq, frame, key.addr, key.rkey, imm, signaled).map_err(rdma)?;
        } else {
            // Why this is sound: out[at..at + len] is this link's staging for slot `slot`. The CPU writes it
            // only in `send` (or `send_raw`), and only after `free_slot` saw the write that last used
            // this slot complete, so it stays unchanged until the device has read it. The region
            // outlives the queue pair (field order), so dropping the link flushes the queue pair first.
            // SAFETY: this slot's staging stays mapped and unchanged until its write completes.
            unsafe { self.qp.post_write_imm(seq, &self.out, at, len, key.addr, key.rkey, imm, true) }.map_err(rdma)?;
        }
        self.sent += 1;
        Ok(())
    }

    /// Test hook only, for tests that play a misbehaving worker: writes `frame` into the next
    /// slot as it is, flagged as a short frame or not; its reply comes back through `recv`.
    #[doc(hidden)]
    pub fn send_raw(&mut self, frame: &[u8], short: bool) -> Result<()> {
        let slot = self.free_slot()?;
        let (at, room) = self.layout.area(slot, short);
        assert!(frame.len() + TAG_BYTES <= room, "a raw frame and its tag fit its slot's area ({room} bytes)");
        self.ids[slot] = 0;
        self.out.as_mut_slice()[at..at + frame.len()].copy_from_slice(frame);
        self.post_staged(slot, frame.len(), short)
    }
}

/// Times one block is read again while it keeps changing, before the read gives up.
const TORN_RETRIES_MAX: u32 = 10_000;

/// While replies are found by their arrival tags, a waiter takes completions (to post receives
/// again) once in this many turns of its spin.
const REAP_EVERY: u32 = 16;

impl RdmaLink {
    /// Which of [`dense`](Self::dense) is the part of table `table` holding `key`, if known.
    fn known_dense(&self, table: u32, key: u64) -> Option<usize> {
        self.dense.iter().position(|(t, d)| *t == table && d.layout.holds(key))
    }

    /// Where the part of dense table `table` holding `key` lies on the shard (its index in
    /// [`dense`](Self::dense)), asked once over TCP; `None` when the shard exposes no such part.
    fn remote_dense(&mut self, table: u32, key: u64) -> Result<Option<usize>> {
        if let Some(i) = self.known_dense(table, key) {
            return Ok(Some(i));
        }
        let mut header = Header::request(Op::RdmaExpose, 0);
        header.table = table;
        header.start = key;
        self.tcp.send(&mut header, &[], false)?;
        let reply = self.tcp.recv(None)?;
        match reply.header.status() {
            Status::Ok => {}
            Status::UnknownTable => return Ok(None),
            _ => return Err(rdma(format!("the shard refused a direct read: {}", String::from_utf8_lossy(reply.body)))),
        }
        let dense = RemoteDense::decode(reply.body)?;
        let layout = dense.layout;
        if !layout.holds(key) {
            return Err(rdma(format!("the shard answered for key {key} with a part of keys {}..{}", layout.start, layout.start + layout.keys)));
        }
        // A part that starts where a known one did replaces it (new memory for the same keys).
        self.dense.retain(|(t, d)| !(*t == table && d.layout.start == layout.start));
        self.dense.push((table, dense));
        Ok(Some(self.dense.len() - 1))
    }

    /// Waits until every request sent so far was served (its reply arrived; the reply stays in
    /// its slot for `recv`), so a read sees what they did. (Their writes may still hold send
    /// queue entries, at most `slots`, until a signaled one retires them; the queue has room for
    /// a batch of reads beside them.)
    fn quiesce(&mut self, deadline: Instant) -> Result<()> {
        self.wait(deadline, "earlier requests before a read", false, |l| l.arrivals.landed >= l.sent)
    }

    /// Reads the part's bytes `[from, to)` into `reads[into..into + to - from]`, in as many READs
    /// as the chunks on either side need, and waits for them.
    fn read_span(&mut self, dense_table: usize, from: u64, to: u64, into: u64, deadline: Instant) -> Result<()> {
        let chunk_at = |link: &Self, pos: u64| {
            let chunks = &link.dense[dense_table].1.chunks;
            let base = chunks[0].addr;
            let c = *chunks.iter().find(|c| c.addr - base <= pos && pos < c.addr - base + c.len).expect("chunks tile the part");
            (base, c)
        };
        let local_chunk = self.reads.chunk_bytes() as u64;
        let batch_max = self.slots; // the send queue holds slots + 1 work requests
        let mut pos = from;
        let mut posted = 0;
        while pos < to {
            let (base, chunk) = chunk_at(self, pos);
            let local = into + pos - from;
            let local_room = (local / local_chunk + 1).saturating_mul(local_chunk) - local;
            let end = to.min(chunk.addr - base + chunk.len).min(pos.saturating_add(local_room));
            let last = end == to || posted + 1 == batch_max;
            let len = (end - pos) as usize;
            // Why this is sound: reads[local .. local + len] is this link's read buffer, which the CPU touches
            // only after the signaled read that ends this batch completed (below), and no other
            // work request targets it meanwhile. The region outlives the queue pair (field order).
            // SAFETY: the span stays mapped and untouched by the CPU until its read completes.
            unsafe { self.qp.post_read(u64::MAX, &self.reads, local as usize, len, base + pos, chunk.rkey, last) }.map_err(rdma)?;
            posted += 1;
            pos = end;
            if last {
                let want = self.reads_done + 1;
                self.wait(deadline, "a one-sided read", true, |l| l.reads_done >= want)?;
                posted = 0;
            }
        }
        Ok(())
    }

    /// Reads blocks `blocks` (which fit the read buffer) until each copy is whole; copies the
    /// values of key offsets `keys` into `out` (which starts at key offset `keys.start`) and meets
    /// the blocks' stamps into `stamp`.
    fn read_blocks(&mut self, t: usize, blocks: Range<u64>, keys: Range<u64>, out: &mut [f32], stamp: &mut [u64], deadline: Instant) -> Result<()> {
        let layout = self.dense[t].1.layout;
        let bw = layout.block_words as u64 * 8;
        let first = layout.block_at(blocks.start) as u64 * 8;
        self.read_span(t, first, layout.block_at(blocks.end) as u64 * 8, 0, deadline)?;
        let dim = layout.dim as usize;
        for b in blocks {
            let at = b * bw - first;
            let mut tries = 0;
            loop {
                let words: &[u64] = bytemuck::cast_slice(&self.reads.as_slice()[at as usize..(at + bw) as usize]);
                if block_is_whole(words) {
                    break;
                }
                tries += 1;
                self.torn += 1;
                if tries > TORN_RETRIES_MAX {
                    return Err(rdma(format!("dense block {b} kept changing through {TORN_RETRIES_MAX} reads")));
                }
                self.read_span(t, first + at, first + at + bw, at, deadline)?;
            }
            let words: &[u64] = bytemuck::cast_slice(&self.reads.as_slice()[at as usize..(at + bw) as usize]);
            let held = layout.keys_of(b);
            let (lo, hi) = (held.start.max(keys.start), held.end.min(keys.end));
            let values: &[f32] = bytemuck::cast_slice(&words[layout.values_at()..words.len() - 1]);
            let from = (lo - held.start) as usize * dim;
            let into = (lo - keys.start) as usize * dim;
            let n = (hi - lo) as usize * dim;
            out[into..into + n].copy_from_slice(&values[from..from + n]);
            layout.meet_stamp(words, stamp);
        }
        Ok(())
    }
}

impl Link for RdmaLink {
    fn send(&mut self, header: &mut Header, parts: &[&[u8]], compress: bool) -> Result<()> {
        let slot = self.free_slot()?;
        let packed = self.deflater.frame_body(header, parts, compress);
        let body = packed.parts();
        // A frame small enough to go inline (with its tag) goes with a short header when its
        // fields fit.
        let short = ShortHeader::shorten(header).filter(|s| s.frame_len() + TAG_BYTES <= INLINE_BYTES_MAX);
        let (head, frame_len) = match &short {
            Some(s) => (s.as_bytes(), s.frame_len()),
            None => {
                header.seal();
                (header.as_bytes(), header.frame_len())
            }
        };
        if frame_len > self.send_bytes_max {
            return Err(TransportError::FrameTooLarge { bytes: frame_len, limit: self.send_bytes_max });
        }
        self.ids[slot] = header.request_id;
        // A short frame is at most INLINE_BYTES_MAX, which is what a compact area holds.
        let (at, _) = self.layout.area(slot, short.is_some());
        let staging = &mut self.out.as_mut_slice()[at..at + frame_len];
        staging[..head.len()].copy_from_slice(head);
        let mut pos = head.len();
        for part in body {
            staging[pos..pos + part.len()].copy_from_slice(part);
            pos += part.len();
        }
        staging[pos..].fill(0);
        self.post_staged(slot, frame_len, short.is_some())
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Frame<'_>> {
        if let Some(parked) = self.parked.pop_front() {
            self.current = parked;
            let header = Header::decode(&self.current, usize::MAX)?;
            let raw = &self.current[HEADER_BYTES..HEADER_BYTES + header.body_len as usize];
            return Ok(Frame { header, body: self.inflater.inflate(&header, raw)? });
        }
        if self.sent <= self.consumed {
            return Err(rdma("waiting for a reply to no request"));
        }
        if self.arrivals.landed <= self.consumed {
            let deadline = Instant::now() + timeout.unwrap_or(self.io_timeout);
            self.wait(deadline, "a reply", false, |l| l.arrivals.landed > l.consumed)?;
        }
        let slot = (self.consumed % self.slots) as usize;
        self.consumed += 1;
        let (header, body) = self.reply_at(slot)?;
        Ok(Frame { header, body: self.inflater.inflate(&header, &self.inbox.as_slice()[body])? })
    }

    fn peer(&self) -> &str {
        self.tcp.peer()
    }

    fn send_bytes_max(&self) -> usize {
        self.send_bytes_max
    }

    fn kind(&self) -> &'static str {
        "rdma"
    }

    fn limit_frames(&mut self, peer_frame_bytes_max: usize) {
        self.send_bytes_max = self.send_bytes_max.min(peer_frame_bytes_max);
    }
}

impl OneSided for RdmaLink {
    fn read_dense(&mut self, table: u32, start: u64, dim: u32, out: &mut [f32], stamp: &mut Vec<u64>) -> Result<bool> {
        let deadline = Instant::now() + self.io_timeout;
        let Some(part) = self.remote_dense(table, start)? else {
            return Ok(false);
        };
        let layout = self.dense[part].1.layout;
        let count = (out.len() / dim.max(1) as usize) as u64;
        let fits = start >= layout.start && start - layout.start + count <= layout.keys;
        let block_bytes = layout.block_words as usize * 8;
        // Anything the read cannot answer goes the usual way, where the shard explains it.
        if layout.dim != dim || count == 0 || !fits || block_bytes > self.reads.len() {
            return Ok(false);
        }
        self.quiesce(deadline)?;
        let keys = start - layout.start..start - layout.start + count;
        stamp.clear();
        stamp.resize(layout.clocks as usize, u64::MAX);
        let per_read = (self.reads.len() / block_bytes) as u64;
        let all = layout.block_of(keys.start)..layout.block_of(keys.end - 1) + 1;
        let mut b = all.start;
        while b < all.end {
            let blocks = b..(b + per_read).min(all.end);
            let span = keys.start.max(layout.keys_of(blocks.start).start)..keys.end.min(layout.keys_of(blocks.end - 1).end);
            let into = (span.start - keys.start) as usize * dim as usize;
            let n = (span.end - span.start) as usize * dim as usize;
            self.read_blocks(part, blocks.clone(), span, &mut out[into..into + n], stamp, deadline)?;
            b = blocks.end;
        }
        Ok(true)
    }

    fn torn_reads(&self) -> u64 {
        self.torn
    }
}
