//! The shard's side of RDMA: one completion queue, polled from the shard's own loop, and per
//! connected worker a protection domain of its own holding that worker's queue pair and its two
//! slot rings, so the worker's writes can reach its own request ring and nothing else.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use crate::buf::{Deflater, Inflater};
use crate::config::TransportConfig;
use crate::error::{Result, TransportError};
use crate::expose::{DenseView, Exposure};
use crate::reply::{Reply, ReplyArea};
use crate::tcp::TcpEndpoint;
use crate::wire::{flags, Header, Op, ShortHeader, Status, HEADER_BYTES, SHORT_HEADER_BYTES};
use crate::{ConnId, Request, Service, ShardTransport, Waker};

use super::arrival::{Arrivals, Tags};
use super::verbs::{self, Access, Completion, Cq, Device, Opcode, Pd, Qp, Region, INLINE_BYTES_MAX};
use super::{rdma, ChunkKey, Endpoint, RdmaConfig, RemoteDense, SlotKey, SlotLayout, SHORT_FRAME, TAG_BYTES};
use crate::config::Arrival;

/// Completion-queue entries per shard; bounds the workers one shard can take over RDMA.
const CQ_ENTRIES: u32 = 8192;
/// Completions taken from the queue per poll call.
const POLL_BATCH: usize = 64;
/// While requests are found by their arrival tags and none is served, the shard takes
/// completions (to post receives again) once in this many turns of its loop.
const REAP_EVERY: u32 = 16;
/// While RDMA requests keep a shard busy, how long its TCP side (set-up, TCP workers, the
/// shard's waker) may go unpolled. Polling it is a system call; doing that after every served
/// request cost small pushes a measurable share of their round trip in the SoftRoCE guest.
const TCP_POLL_GAP: Duration = Duration::from_micros(50);

/// A [`ShardTransport`] that serves workers over RDMA and, beside them, over TCP (which also
/// carries every worker's set-up and tells the shard when a worker is gone).
pub struct RdmaShard {
    tcp: TcpEndpoint,
    state: State,
    /// When the TCP side was last polled.
    tcp_polled: Instant,
}

impl std::fmt::Debug for RdmaShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaShard").field("peers", &self.state.peers.iter().flatten().count()).finish()
    }
}

struct State {
    dev: Arc<Device>,
    cfg: RdmaConfig,
    compress_bytes_min: usize,
    cq: Cq,
    peers: Vec<Option<Peer>>,
    generation: u16,
    /// Whether requests are found by their arrival tags ([`Arrival::Memory`]).
    by_memory: bool,
    /// Some peer has landed requests that wait (for their reply slot's last write to finish, or
    /// for receives to be posted again): completions must be taken.
    waiting: bool,
    /// Turns of `drain`, to take completions every [`REAP_EVERY`] idle ones.
    turns: u32,
    completions: Vec<Completion>,
    /// Dense table parts workers may read directly, by table id and first key.
    exposed: BTreeMap<(u32, u64), DenseView>,
    /// The service's durable log position when held replies were last released.
    durable: u64,
    /// Arrivals that filled a worker's ring: the worker cannot send again until a reply.
    stalls: metrics::Counter,
}

/// One worker connected over RDMA. Field order is drop order: the queue pair goes first, so the
/// device stops touching the rings before they are deregistered, and the protection domain goes
/// after both (sideway's Arcs would keep it alive for them anyway; the order says it outright).
struct Peer {
    qp: Qp,
    /// The worker's request slots: it writes here, and only here. Registered in `_pd`, which
    /// holds only this ring, `staging` and `qp`: a key of another worker's ring, a released
    /// ring's key or a guessed one names no region of `_pd`, so the device refuses the write.
    /// The worker sees a remote access error; the receive it consumed here completes with the
    /// same error, and `complete` releases this peer.
    ring: Region,
    /// Replies are built here, then written to the worker's reply slot of the same index. Both
    /// rings are laid out as `layout`: short frames use the slots' compact areas.
    staging: Region,
    /// Dense parts this worker asked to read, registered read-only in `pd`, by table id and
    /// first key.
    tables: BTreeMap<(u32, u64), verbs::Exposed>,
    /// This worker's protection domain; see `ring`.
    pd: Pd,
    /// The worker's reply slots: full areas, and compact ones for short replies.
    remote: Vec<SlotKey>,
    remote_small: Vec<SlotKey>,
    tcp: ConnId,
    generation: u16,
    layout: SlotLayout,
    /// The worker's requests that landed in the ring (request `n` in slot `n % slots`), and how
    /// many of them were served, in order.
    arrivals: Arrivals,
    served: u64,
    /// The tags this side writes after its replies (salted by the worker).
    tags_out: Tags,
    /// Slots whose reply write the device has not yet completed: their staging is busy.
    writing: Vec<bool>,
    /// Replies staged but held until the service's log is durable (see
    /// [`Reply::hold_until`]), in order.
    held: VecDeque<Staged>,
    /// Replies posted (reply `n` answers request `n`), and how often an inline one asks for a
    /// completion.
    replies_posted: u64,
    signal_every: u64,
    inflater: Inflater,
    deflater: Deflater,
}

/// A reply staged for a slot and not yet posted.
#[derive(Debug, Clone, Copy)]
struct Staged {
    slot: u32,
    /// Where it starts in `staging`: the slot's compact area, or its full one.
    at: usize,
    len: usize,
    /// The log position it waits for (0: none of its own; it waits behind one that does).
    lsn: u64,
}

/// A reply slot as the place a [`Reply`] is written: the slot's compact area, moved to its full
/// area the first time the reply outgrows the compact one. Most replies are small, and so stay
/// in the one page all compact areas share (see [`SlotLayout`]).
struct SlotArea<'a> {
    small: &'a mut [u8],
    full: &'a mut [u8],
    in_full: bool,
    used: usize,
}

impl ReplyArea for SlotArea<'_> {
    fn used(&self) -> usize {
        self.used
    }
    fn truncate(&mut self, len: usize) {
        self.used = len;
    }
    fn grow(&mut self, n: usize) -> Option<std::ops::Range<usize>> {
        let end = self.used.checked_add(n)?;
        if !self.in_full && end > self.small.len() {
            if end > self.full.len() {
                return None;
            }
            // Offsets stay valid across the move: the reply keeps ranges, not pointers.
            self.full[..self.used].copy_from_slice(&self.small[..self.used]);
            self.in_full = true;
        }
        (end <= self.bytes().len()).then(|| {
            self.used = end;
            end - n..end
        })
    }
    fn bytes(&self) -> &[u8] {
        if self.in_full {
            self.full
        } else {
            self.small
        }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        if self.in_full {
            self.full
        } else {
            self.small
        }
    }
}

fn wr_id(peer: usize, generation: u16, slot: u32) -> u64 {
    ((peer as u64) << 48) | ((generation as u64) << 32) | slot as u64
}

/// Set on the slot of a reply write posted inline: its staging was free once posted, so its
/// completion (when signaled) must not mark the slot's staging free again, as the slot may hold a
/// newer reply by then.
const INLINE_WR: u32 = 1 << 31;

fn split_wr_id(id: u64) -> (usize, u16, u32) {
    ((id >> 48) as usize, (id >> 32) as u16, id as u32)
}

impl RdmaShard {
    /// Wraps a shard's TCP endpoint; the device is opened once per server and shared.
    pub fn new(mut tcp: TcpEndpoint, dev: Arc<Device>, cfg: &RdmaConfig, tcp_cfg: &TransportConfig) -> Result<Self> {
        cfg.validate()?;
        let cq = Cq::new(&dev, CQ_ENTRIES).map_err(rdma)?;
        tcp.watch_fd(cq.fd())?;
        let state = State {
            dev,
            cfg: cfg.clone(),
            compress_bytes_min: tcp_cfg.compress_bytes_min,
            cq,
            peers: Vec::new(),
            generation: 0,
            by_memory: cfg.arrival == Arrival::Memory,
            waiting: false,
            turns: 0,
            completions: Vec::with_capacity(POLL_BATCH),
            exposed: BTreeMap::new(),
            durable: u64::MAX,
            stalls: crate::metrics::slot_stalls(tcp.shard()),
        };
        Ok(Self { tcp, state, tcp_polled: Instant::now() })
    }
}

impl ShardTransport for RdmaShard {
    fn poll(&mut self, service: &mut dyn Service, timeout: Option<Duration>) -> Result<()> {
        let state = &mut self.state;
        let mut worked = state.drain(service) > 0;
        if !worked && state.has_peers() {
            // Spin briefly: a worker's next request usually follows within microseconds, and
            // sleeping on the channel costs a wake-up.
            let spin = Duration::from_micros(state.cfg.spin_us);
            worked = super::spin(spin, None, || Ok::<_, TransportError>(state.drain(service) > 0))?;
            if !worked {
                state.cq.arm().map_err(rdma)?;
                // A completion may have landed between the last poll and the arming.
                worked = state.drain(service) > 0;
            }
        }
        let timeout = if worked || state.waiting { Some(Duration::ZERO) } else { timeout };
        if timeout == Some(Duration::ZERO) {
            let now = Instant::now();
            if now - self.tcp_polled < TCP_POLL_GAP {
                return Ok(());
            }
            self.tcp_polled = now;
        }
        let mut intercept = Intercept { inner: service, state };
        self.tcp.poll(&mut intercept, timeout)?;
        // Reading the channel is a system call: only when it fired.
        if self.tcp.take_watched() {
            self.state.cq.ack_events();
        }
        Ok(())
    }

    fn waker(&self) -> Waker {
        self.tcp.waker()
    }

    fn connections(&self) -> usize {
        self.tcp.connections()
    }

    fn watch(&mut self, fd: std::os::fd::RawFd) -> Result<()> {
        self.tcp.watch(fd)
    }

    fn take_service_watched(&mut self) -> bool {
        self.tcp.take_service_watched()
    }
}

/// Sits between the TCP endpoint and the shard's service: takes RDMA set-up requests and
/// connection closes for itself, passes everything else on.
struct Intercept<'a> {
    inner: &'a mut dyn Service,
    state: &'a mut State,
}

impl Service for Intercept<'_> {
    fn serve(&mut self, request: Request<'_>, reply: &mut Reply<'_>) {
        match request.header.op() {
            Some(Op::RdmaConnect) => match self.state.accept(request.conn, request.body) {
                Ok(mine) => reply.ok_bytes(&mine.encode()),
                Err(e) => reply.error(Status::Unsupported, &e.to_string()),
            },
            Some(Op::RdmaExpose) => match self.state.expose_to(request.conn, request.header.table, request.header.start) {
                Ok(dense) => reply.ok_bytes(&dense.encode()),
                Err((status, e)) => reply.error(status, &e),
            },
            _ => self.inner.serve(request, reply),
        }
    }

    fn wake(&mut self, _: &mut dyn FnMut(Exposure)) {
        let state = &mut *self.state;
        self.inner.wake(&mut |e| state.apply(e));
    }

    fn closed(&mut self, conn: ConnId) {
        self.state.forget(conn);
        self.inner.closed(conn);
    }

    fn durable(&self) -> u64 {
        self.inner.durable()
    }

    fn held_failure(&self) -> Option<crate::HeldFailure<'_>> {
        self.inner.held_failure()
    }
}

impl State {
    /// Takes note of a dense part the shard created or is about to free.
    fn apply(&mut self, change: Exposure) {
        match change {
            Exposure::Add(view) => {
                let key = (view.table, view.layout.start);
                // A worker's registration of the memory it replaces goes with it.
                self.unregister(key);
                self.exposed.insert(key, view);
            }
            Exposure::Remove { table, start } => {
                self.exposed.remove(&(table, start));
                self.unregister((table, start));
            }
        }
    }

    /// Deregisters the part `key` names for every worker: a read with its keys then fails.
    fn unregister(&mut self, key: (u32, u64)) {
        for peer in self.peers.iter_mut().flatten() {
            peer.tables.remove(&key);
        }
    }

    /// Registers the dense part of table `table` that holds key `key` in the protection domain
    /// of the worker on `conn` (once) and says where it lies.
    fn expose_to(&mut self, conn: ConnId, table: u32, key: u64) -> std::result::Result<RemoteDense, (Status, String)> {
        let view = self
            .exposed
            .range(..=(table, key))
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.table == table && v.layout.holds(key))
            .ok_or_else(|| (Status::UnknownTable, format!("table {table} has no dense part holding key {key} on this shard to read directly")))?;
        let part = (table, view.layout.start);
        let peer = self
            .peers
            .iter_mut()
            .flatten()
            .find(|p| p.tcp == conn)
            .ok_or_else(|| (Status::BadRequest, "this connection has no RDMA queue pair; send RdmaConnect first".to_string()))?;
        if !peer.tables.contains_key(&part) {
            let registered = verbs::Exposed::register(&peer.pd, view.memory.clone());
            peer.tables.insert(part, registered.map_err(|e| (Status::Unsupported, rdma(e).to_string()))?);
            tracing::debug!(conn = conn.0, table, start = part.1, "dense part registered for a worker");
        }
        let chunks = peer.tables[&part].remote_chunks();
        let chunks = chunks.iter().map(|c| ChunkKey { addr: c.addr, len: c.len, rkey: c.rkey, reserved: 0 }).collect();
        Ok(RemoteDense { layout: view.layout, chunks })
    }

    fn has_peers(&self) -> bool {
        self.peers.iter().any(Option::is_some)
    }

    /// Sets up a queue pair and rings for the worker on TCP connection `conn`.
    fn accept(&mut self, conn: ConnId, body: &[u8]) -> Result<Endpoint> {
        let _span = tracing::info_span!("rdma_accept", conn = conn.0).entered();
        let theirs = Endpoint::decode(body)?;
        let slots = theirs.slots.len() as u32;
        // Twice `slots` receives, and `slots` reply writes.
        let per_peer = 3 * slots;
        let live = self.peers.iter().flatten().count() as u32;
        if (live + 1) * per_peer > CQ_ENTRIES {
            return Err(rdma(format!("this shard serves {live} RDMA workers, its most with {slots} slots each")));
        }
        if theirs.slot_bytes != self.cfg.slot_bytes {
            let want = self.cfg.slot_bytes;
            return Err(rdma(format!("slot size {} differs from the server's {want}; use --rdma-slot-bytes {want}", theirs.slot_bytes)));
        }
        self.forget(conn);
        let layout = SlotLayout::new(slots, theirs.slot_bytes);
        let bytes = layout.region_bytes();
        // Declared in reverse drop order: on an early return the queue pair goes first, the
        // domain last, as in `Peer`.
        let pd = self.dev.alloc_pd().map_err(rdma)?;
        let ring = Region::new_in(&pd, bytes, Access { remote_write: true, remote_read: false }).map_err(rdma)?;
        let staging = Region::new_in(&pd, bytes, Access { remote_write: false, remote_read: false }).map_err(rdma)?;
        // Inline replies are signaled once in `signal_every` (at most `slots`), so up to `slots`
        // of them may wait for a signaled one to retire them, beside `slots` in flight. Twice
        // `slots` receives: a request seen by its tag has its receive posted again only later.
        let mut qp = Qp::new_in(&pd, &self.cq, &self.cq, 2 * slots + 1, 2 * slots).map_err(rdma)?;
        let index = self.peers.iter().position(Option::is_none).unwrap_or(self.peers.len());
        self.generation = self.generation.wrapping_add(1);
        // A receive's id names its peer; the slot comes from the immediate data.
        for _ in 0..2 * slots {
            qp.post_recv(wr_id(index, self.generation, 0)).map_err(rdma)?;
        }
        qp.connect(&theirs.qp).map_err(rdma)?;
        let mine = Endpoint::new(qp.info(), layout, &ring)?;
        let peer = Peer {
            qp,
            ring,
            staging,
            tables: BTreeMap::new(),
            pd,
            remote: theirs.slots,
            remote_small: theirs.small,
            tcp: conn,
            generation: self.generation,
            layout,
            arrivals: Arrivals::new(slots as usize, mine.tag_salt, self.cfg.arrival),
            served: 0,
            tags_out: Tags::new(theirs.tag_salt),
            writing: vec![false; slots as usize],
            held: VecDeque::with_capacity(slots as usize),
            replies_posted: 0,
            signal_every: (u64::from(slots) / 2).max(1),
            inflater: Inflater::default(),
            deflater: Deflater::default(),
        };
        if index == self.peers.len() {
            self.peers.push(None);
        }
        self.peers[index] = Some(peer);
        tracing::debug!(conn = conn.0, slots, "rdma peer connected");
        Ok(mine)
    }

    /// Drops the worker on `conn`: its queue pair, then its rings, then its protection domain.
    fn forget(&mut self, conn: ConnId) {
        for slot in self.peers.iter_mut() {
            if slot.as_ref().is_some_and(|p| p.tcp == conn) {
                *slot = None;
                tracing::debug!(conn = conn.0, "rdma peer released");
            }
        }
    }

    /// Serves every request that can be served, and takes completions. With arrival tags, what
    /// landed is served and its reply posted first; completions (receives to post again, reply
    /// writes finished, errors, and requests whose tag never showed) are taken after, off the
    /// round trip, and on idle turns only once in [`REAP_EVERY`].
    fn drain(&mut self, service: &mut dyn Service) -> usize {
        let mut total = self.release_held(service);
        if !self.by_memory {
            total += self.reap();
            return total + self.serve_landed(service);
        }
        total += self.serve_landed(service);
        self.turns = self.turns.wrapping_add(1);
        if total > 0 || self.waiting || self.turns.is_multiple_of(REAP_EVERY) {
            let taken = self.reap();
            total += taken;
            if taken > 0 {
                total += self.serve_landed(service);
            }
        }
        total
    }

    /// Writes the replies held for the log, if it moved or failed since last time; returns how
    /// many.
    fn release_held(&mut self, service: &mut dyn Service) -> usize {
        let durable = service.durable();
        let failure = service.held_failure();
        if durable == self.durable && failure.is_none() {
            return 0;
        }
        self.durable = durable;
        let mut released = 0;
        for (index, peer) in self.peers.iter_mut().enumerate() {
            if let Some(peer) = peer.as_mut().filter(|p| !p.held.is_empty()) {
                released += peer.held.len();
                peer.release(index, durable, failure);
                released -= peer.held.len();
            }
        }
        released
    }

    /// Takes every completion there is; returns how many.
    fn reap(&mut self) -> usize {
        let mut total = 0;
        loop {
            self.completions.clear();
            let n = self.cq.poll(&mut self.completions, POLL_BATCH);
            for i in 0..n {
                let c = self.completions[i];
                self.complete(c);
            }
            total += n;
            if n < POLL_BATCH {
                return total;
            }
        }
    }

    fn complete(&mut self, c: Completion) {
        let (index, generation, slot) = split_wr_id(c.wr_id);
        let Some(peer) = self.peers.get_mut(index).and_then(Option::as_mut).filter(|p| p.generation == generation) else {
            return; // a late completion of a worker already released
        };
        if !c.ok {
            tracing::warn!(conn = peer.tcp.0, status = c.status_text, "rdma work request failed; releasing the worker");
            let conn = peer.tcp;
            self.forget(conn);
            return;
        }
        match c.opcode {
            Opcode::RecvRdmaWithImm => {
                // The worker fills its slots round-robin, so each arrival names the next slot;
                // anything else is a worker that skips or reuses slots, and cannot be trusted.
                let imm = c.imm.unwrap_or(u32::MAX);
                if !peer.took_request(imm, &self.stalls) {
                    tracing::warn!(conn = peer.tcp.0, imm, "rdma request names a bad slot; releasing the worker");
                    let conn = peer.tcp;
                    self.forget(conn);
                    return;
                }
                // Receives carry no buffer: post the next one at once.
                if let Err(e) = peer.qp.post_recv(c.wr_id) {
                    tracing::warn!(conn = peer.tcp.0, error = %e, "cannot post a receive");
                }
            }
            Opcode::RdmaWrite if slot & INLINE_WR == 0 => peer.writing[slot as usize] = false,
            _ => {}
        }
    }

    /// Serves, each peer in order, every request that has landed, unless its reply slot is
    /// still being written or too few receives are posted for what the reply lets the worker
    /// send next. Returns how many.
    fn serve_landed(&mut self, service: &mut dyn Service) -> usize {
        let mut served = 0;
        self.waiting = false;
        for (index, peer) in self.peers.iter_mut().enumerate() {
            let Some(peer) = peer.as_mut() else { continue };
            peer.look(&self.stalls);
            let slots = peer.writing.len() as u64;
            while peer.served < peer.arrivals.landed {
                let slot = (peer.served % slots) as usize;
                // The reply frees the slot, and the worker may then send request `served +
                // slots`: a receive must be posted for it (twice `slots` were posted at first).
                if peer.writing[slot] || peer.served >= peer.arrivals.recvs + slots {
                    self.waiting = true;
                    break;
                }
                peer.served += 1;
                peer.serve(index, slot as u32, self.compress_bytes_min, service);
                served += 1;
            }
        }
        served
    }
}

impl Peer {
    /// Counts every request whose tag shows in the ring as landed, at most a ring's worth
    /// beyond those served.
    fn look(&mut self, stalls: &metrics::Counter) {
        let (ring, limit) = (&self.ring, self.served + self.arrivals.slots());
        if self.arrivals.look(|o| ring.load_u64(o), self.layout, limit) > 0 {
            self.count_stall(stalls);
        }
    }

    /// A request's receive completion, with immediate data `imm`: counts the request as landed
    /// unless its tag was seen first. False when the immediate data names another slot than the
    /// next one.
    fn took_request(&mut self, imm: u32, stalls: &metrics::Counter) -> bool {
        match self.arrivals.took(imm) {
            Ok(landed) => {
                if landed {
                    self.count_stall(stalls);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Counts an arrival that left every slot of the worker's ring waiting to be served (or its
    /// reply held).
    fn count_stall(&self, stalls: &metrics::Counter) {
        if self.arrivals.landed - self.served + self.held.len() as u64 >= self.arrivals.slots() {
            stalls.increment(1);
        }
    }

    /// Serves the request in `slot` (a short frame in the slot's compact area, or a long one)
    /// and writes its reply to the worker's reply slot.
    fn serve(&mut self, index: usize, slot: u32, compress_bytes_min: usize, service: &mut dyn Service) {
        let short = self.arrivals.short(slot as usize);
        let durable = service.durable();
        let mut hold = None;
        let layout = self.layout;
        let (at, room) = layout.area(slot as usize, short);
        let frame = &self.ring.as_slice()[at..at + room];
        let mut area = slot_area(&mut self.staging, layout, slot as usize);
        let decoded = if short {
            // The worker's link puts the request id back into the reply.
            ShortHeader::expand(frame, 0, room).map(|h| (h, SHORT_HEADER_BYTES))
        } else {
            Header::decode(frame, room).map(|h| (h, HEADER_BYTES))
        };
        match decoded {
            Ok((header, head_len)) => {
                let mut reply = Reply::new(&mut area, header, layout.frame_room(false));
                let raw = &frame[head_len..head_len + header.body_len as usize];
                match self.inflater.inflate(&header, raw) {
                    Ok(_) if !header.op().is_some_and(|o| o.is_data()) => reply.error(Status::BadRequest, "only data requests travel over RDMA"),
                    Ok(_) if header.flags & flags::NO_REPLY != 0 => {
                        reply.error(Status::BadRequest, "every request over RDMA is answered: ask for no reply over TCP")
                    }
                    Ok(body) => service.serve(Request { conn: self.tcp, header, body, shared: None }, &mut reply),
                    Err(e) => reply.error(Status::Malformed, &e.to_string()),
                }
                hold = reply.finish_unsealed(&mut self.deflater, compress_bytes_min).1;
            }
            Err(e) => {
                let mut reply = Reply::new(&mut area, Header::request(Op::Push, 0), layout.frame_room(false));
                reply.error(Status::Malformed, &e.to_string());
                reply.finish_unsealed(&mut self.deflater, usize::MAX);
            }
        }
        let staged = Staged { slot, at: layout.area(slot as usize, !area.in_full).0, len: area.used, lsn: 0 };
        // The slot stays busy until its reply is written, held or not.
        self.writing[slot as usize] = true;
        match hold {
            // Replies leave in order: behind a held one, every later one waits too.
            Some(lsn) if lsn > durable || !self.held.is_empty() => self.held.push_back(Staged { lsn, ..staged }),
            _ if !self.held.is_empty() => self.held.push_back(staged),
            _ => self.post_reply(index, staged),
        }
    }

    /// Writes the replies held for the log that `durable` now covers. If the log failed
    /// (`failure`), the others are written too, each turned into an error saying why.
    fn release(&mut self, index: usize, durable: u64, failure: Option<crate::HeldFailure<'_>>) {
        while let Some(&staged) = self.held.front() {
            let mut staged = staged;
            if staged.lsn > durable {
                let Some(failure) = failure else { break };
                // The error is written to the slot's full area: its message may not fit the
                // compact one.
                let bytes = self.staging.as_mut_slice();
                let header = Header::decode_unchecked(&bytes[staged.at..staged.at + HEADER_BYTES]);
                let (at, _) = self.layout.area(staged.slot as usize, false);
                let room = self.layout.frame_room(false);
                staged.len = crate::reply::held_error(&header, failure, &mut bytes[at..at + room]);
                staged.at = at;
            }
            self.held.pop_front();
            self.post_reply(index, staged);
        }
    }

    /// Writes the reply `staged` into the worker's reply slot of the same index: a short one
    /// into the slot's compact area, inline; another into its full area.
    fn post_reply(&mut self, index: usize, staged: Staged) {
        let Staged { slot, at, len, .. } = staged;
        let id = wr_id(index, self.generation, slot);
        // Inline writes copy the reply as they are posted: the staging is free at once, and only
        // one in `signal_every` asks for a completion (it retires those before it).
        let inline_id = wr_id(index, self.generation, slot | INLINE_WR);
        let signaled = self.replies_posted % self.signal_every == self.signal_every - 1;
        // Reply `n` answers request `n`, and is followed by its arrival tag.
        let tag = self.tags_out.tag(self.replies_posted).to_le_bytes();
        self.replies_posted += 1;
        let header = Header::decode_unchecked(&self.staging.as_slice()[at..at + HEADER_BYTES]);
        let short = ShortHeader::shorten(&header).filter(|s| s.frame_len() + TAG_BYTES <= INLINE_BYTES_MAX);
        let staging = self.staging.as_mut_slice();
        if short.is_none() {
            // Replies are finished unsealed (a short header has no checksum): seal a long one.
            let mut header = header;
            header.seal();
            staging[at..at + HEADER_BYTES].copy_from_slice(header.as_bytes());
        }
        // The slot's areas keep room for the tag after the longest reply (`frame_room`).
        staging[at + len..at + len + TAG_BYTES].copy_from_slice(&tag);
        let len = len + TAG_BYTES;
        let reply = &self.staging.as_slice()[at..at + len];
        let (key, small) = (self.remote[slot as usize], self.remote_small[slot as usize]);
        let posted = if let Some(s) = short {
            // A small reply goes with a short header, into the worker's compact area. The short
            // header takes the place of the long one's last bytes, right before the body (its
            // padding and the tag follow as staged), so the frame goes from where it lies.
            let head = at + HEADER_BYTES - SHORT_HEADER_BYTES;
            debug_assert_eq!(head + s.frame_len(), at + len - TAG_BYTES, "a reply is a header and its padded body");
            self.staging.as_mut_slice()[head..at + HEADER_BYTES].copy_from_slice(s.as_bytes());
            let frame = &self.staging.as_slice()[head..at + len];
            self.writing[slot as usize] = false;
            self.qp.post_write_imm_inline(inline_id, frame, small.addr, small.rkey, slot | SHORT_FRAME, signaled)
        } else if len <= INLINE_BYTES_MAX {
            self.writing[slot as usize] = false;
            self.qp.post_write_imm_inline(inline_id, reply, key.addr, key.rkey, slot, signaled)
        } else {
            // Why this is sound: staging[at..at + len] belongs to this peer and to reply slot `slot` alone (a
            // reply longer than a compact area is in the slot's full area). The CPU writes it
            // only while serving a request in this slot, and `serve_landed` serves that slot
            // again only after this write's completion cleared `writing[slot]`, so the buffer stays
            // valid and unchanged until the device has read it. The region outlives the queue pair
            // (field order), so a release mid-write flushes the queue pair before deregistering.
            // SAFETY: this reply slot's staging stays mapped and unchanged until its write completes.
            unsafe { self.qp.post_write_imm(id, &self.staging, at, len, key.addr, key.rkey, slot, true) }
        };
        if let Err(e) = posted {
            self.writing[slot as usize] = false;
            tracing::warn!(conn = self.tcp.0, error = %e, "cannot post a reply");
        }
    }
}

/// Slot `slot`'s reply area in `staging`: its compact area, then its full one, each less the
/// room for the arrival tag that follows the reply.
fn slot_area(staging: &mut Region, layout: SlotLayout, slot: usize) -> SlotArea<'_> {
    let (small_at, full_at) = (layout.area(slot, true).0, layout.area(slot, false).0);
    let (small_room, full_room) = (layout.frame_room(true), layout.frame_room(false));
    // Every full area lies before every compact one.
    let (fulls, smalls) = staging.as_mut_slice().split_at_mut(small_at);
    SlotArea { small: &mut smalls[..small_room], full: &mut fulls[full_at..full_at + full_room], in_full: false, used: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_area_moves_to_the_full_slot_only_when_it_outgrows_the_compact_one() {
        let (mut small, mut full) = (vec![0u8; 256], vec![0u8; 8192]);
        let mut area = SlotArea { small: &mut small, full: &mut full, in_full: false, used: 0 };
        let head = area.grow(64).expect("room");
        area.bytes_mut()[head.clone()].fill(0xab);
        assert_eq!(area.grow(128), Some(64..192));
        assert!(!area.in_full, "192 bytes fit the compact area");
        let body = area.grow(1000).expect("the full slot has room");
        assert_eq!(body, 192..1192);
        assert!(area.in_full);
        assert!(area.bytes()[head].iter().all(|&b| b == 0xab), "what was written moved with it");
        assert_eq!(area.grow(8192), None, "past the full slot");
        assert_eq!(area.used(), 1192, "a refused grow changes nothing");
        area.truncate(64);
        assert_eq!(area.grow(8), Some(64..72), "stays in the full slot once moved");
    }
}
