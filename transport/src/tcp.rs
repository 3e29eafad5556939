//! TCP: length-prefixed frames over non-blocking sockets, one poller per thread.
//!
//! A server binds one port. Its control thread accepts every connection and reads the peer's
//! hello, which names a shard (or [`CONTROL_SHARD`]). A data connection is then handed, with
//! whatever it already sent, to that shard's endpoint through a bounded channel, and from then on
//! only that shard's thread touches it: no locks on the data path.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use zerocopy::IntoBytes;

use crate::auth::{self, Nonce, Side, Transcript, CHALLENGE_BYTES, NONCE_BYTES, PROOF_BYTES};
use crate::buf::{AlignedBuf, Deflater, Filled, FrameReader, Inflater};
use crate::config::{TransportConfig, DEFERRED_BYTES_MAX, LENT_BUFFER_PER_BODY_MAX, SHARED_BODY_BYTES_MIN, WARN_LINES_PER_S_MAX};
use crate::error::{Result, TransportError};
use crate::loglimit::LogLimiter;
use crate::reply::{Reply, ReplyArea, ERROR_MESSAGE_BYTES_MAX};
use crate::wire::{flags, padded, Header, Op, Status, CONTROL_SHARD, HEADER_BYTES};
use crate::SEND_PARTS_MAX;
use crate::{ConnId, Frame, Link, Request, Service, ShardTransport, Waker};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// A descriptor another layer sleeps on through this endpoint (an RDMA completion channel).
const WATCHED: Token = Token(usize::MAX);
/// A descriptor the service sleeps on through this endpoint (its disk ring's eventfd).
const SERVICE_WATCHED: Token = Token(usize::MAX - 1);
const FIRST_CONN: usize = 2;
/// Readiness events taken from one poll; more wait for the next.
const EVENTS_MAX: usize = 256;
/// How often an endpoint looks for late hellos, stalled peers, slow frames and idle connections.
const SWEEP_GAP: Duration = Duration::from_millis(100);
/// Connections waiting in a shard's hand-off channel before new ones are refused.
const HANDOFF_QUEUE_MAX: usize = 1024;
/// Largest frame a connection may send before its hello: a hello has no body, so a peer that
/// announces more is either confused or trying to make the server allocate for it.
pub const HELLO_FRAME_BYTES_MAX: usize = 4 << 10;
const PAD: [u8; 8] = [0; 8];

/// Who an endpoint serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Control,
    Shard(u16),
}

/// Replies waiting to be written: bytes `head..buf.len()`.
#[derive(Debug, Default)]
struct OutQueue {
    buf: AlignedBuf,
    head: usize,
    /// Replies held until the log is durable (see [`Reply::hold_until`]): where each one's frame
    /// starts in `buf`, and the log position it waits for, in order. Nothing from the first of
    /// them on is written.
    held: VecDeque<(usize, u64)>,
    /// Bytes the last flush wrote, and whether it stopped at a full socket (not at a reply held
    /// for the log): together, whether the peer is reading at all.
    wrote: usize,
    blocked: bool,
}

impl OutQueue {
    fn pending(&self) -> usize {
        self.buf.len() - self.head
    }

    /// Writes as much as the socket takes, up to the first reply still held for a log position
    /// past `durable`. Returns true when everything went.
    fn flush(&mut self, stream: &mut TcpStream, durable: u64) -> io::Result<bool> {
        while self.held.front().is_some_and(|(_, lsn)| *lsn <= durable) {
            self.held.pop_front();
        }
        let end = self.held.front().map_or(self.buf.len(), |(at, _)| *at);
        self.wrote = 0;
        self.blocked = false;
        while self.head < end {
            match stream.write(&self.buf.bytes()[self.head..end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.head += n;
                    self.wrote += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.blocked = true;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.pending() > 0 {
            return Ok(false);
        }
        // Everything went: start over at the front, so the buffer does not creep.
        self.buf.set_len(0);
        self.head = 0;
        Ok(true)
    }

    /// The log failed: every reply still held for a position past `durable` becomes an error
    /// saying why (the push it acknowledges is not on disk), and nothing is held any more.
    /// Nothing from the first held reply on was written, so the queue's tail is rebuilt.
    fn fail_held(&mut self, durable: u64, failure: crate::HeldFailure<'_>) {
        let Some(&(first, _)) = self.held.iter().find(|(_, lsn)| *lsn > durable) else {
            self.held.clear();
            return;
        };
        let tail = self.buf.bytes()[first..].to_vec();
        self.buf.set_len(first);
        let doomed: Vec<usize> = self.held.drain(..).filter(|(_, lsn)| *lsn > durable).map(|(at, _)| at - first).collect();
        let mut at = 0;
        while at < tail.len() {
            let header = Header::decode_unchecked(&tail[at..at + HEADER_BYTES]);
            let len = HEADER_BYTES + padded(header.body_len as usize);
            if doomed.contains(&at) {
                let mut frame = [0u8; HEADER_BYTES + ERROR_MESSAGE_BYTES_MAX];
                let n = crate::reply::held_error(&header, failure, &mut frame);
                let room = self.buf.append_unfilled(n);
                self.buf.all_mut()[room].copy_from_slice(&frame[..n]);
            } else {
                let room = self.buf.append_unfilled(len);
                self.buf.all_mut()[room].copy_from_slice(&tail[at..at + len]);
            }
            at += len;
        }
    }

    /// Makes room for `bytes` more without growing, when sent bytes at the front can be dropped.
    /// Only a queue that never drains fully (a peer that reads slowly, or replies held for the
    /// log) gets here; frames keep their alignment.
    fn make_room(&mut self, bytes: usize) {
        if self.head > 0 && self.buf.len() + bytes > self.buf.capacity() {
            let head = self.buf.compact(self.head);
            let moved = self.head - head;
            self.held.iter_mut().for_each(|(at, _)| *at -= moved);
            self.head = head;
        }
    }
}

/// One server-side connection and everything it owns. Moves between threads only at hand-off.
#[derive(Debug)]
pub struct Conn {
    id: ConnId,
    stream: TcpStream,
    peer: SocketAddr,
    reader: FrameReader,
    inflater: Inflater,
    deflater: Deflater,
    out: OutQueue,
    /// Said hello, and proved it holds the cluster secret if the server has one: served.
    greeted: bool,
    /// The handshake waiting for the peer's proof (servers with a cluster secret only).
    challenge: Option<Transcript>,
    accepted_at: Instant,
    /// Close once the outgoing buffer drains; no further requests are read.
    closing: Option<String>,
    /// Since when the peer has read nothing while the reply backlog is full.
    stalled_since: Option<Instant>,
    /// When the peer last sent bytes (or the connection was accepted): for the idle deadline.
    heard_at: Instant,
    /// Since when part of a frame has waited for the rest: for the frame-progress deadline.
    frame_since: Option<Instant>,
    /// An event said the peer closed its side (or the socket failed). A short read then does
    /// not show the socket empty: the end of the stream may wait behind the bytes read, and no
    /// new event will announce it, so the connection reads on until the end.
    peer_closed: bool,
    /// Set up an RDMA queue pair: its traffic goes over verbs, so silence here is not idleness.
    rdma: bool,
    /// Errors from requests that wanted no reply ([`flags::NO_REPLY`]), logged instead of
    /// sent: a few lines a second, then a count.
    unanswered_limit: LogLimiter,
    /// Counts this connection among the server's open ones until it drops.
    _open: OpenConn,
}

/// Connections open on a whole server, in total and per peer address (every endpoint of one
/// `bind` shares it). The map is touched only when a connection opens or closes.
#[derive(Debug, Default)]
struct Census {
    total: AtomicUsize,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a new connection was refused.
enum Refusal {
    Total,
    Peer,
}

impl Census {
    /// Counts a new connection from `ip`, unless a limit is reached.
    fn admit(self: &Arc<Self>, ip: IpAddr, cfg: &TransportConfig) -> std::result::Result<OpenConn, Refusal> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= cfg.connections_max {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Total);
        }
        let mut per_peer = self.per_peer.lock().expect("no thread panics holding the census");
        let held = per_peer.entry(ip).or_insert(0);
        if *held >= cfg.connections_per_peer_max {
            drop(per_peer);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Peer);
        }
        *held += 1;
        Ok(OpenConn { census: self.clone(), ip })
    }
}

/// One open connection in the server's counts ([`TransportConfig::connections_max`],
/// [`TransportConfig::connections_per_peer_max`]).
#[derive(Debug)]
struct OpenConn {
    census: Arc<Census>,
    ip: IpAddr,
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.census.total.fetch_sub(1, Ordering::Relaxed);
        let mut per_peer = self.census.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = per_peer.get_mut(&self.ip) {
            *held -= 1;
            // A peer with nothing open takes no room: a storm from many addresses leaves no map.
            if *held == 0 {
                per_peer.remove(&self.ip);
            }
        }
    }
}

/// What driving a connection left it as.
enum Next {
    Open,
    /// More frames are buffered; come back after the neighbours had a turn.
    Yielded,
    Close(String),
    HandOff(u16),
}

impl ReplyArea for OutQueue {
    fn used(&self) -> usize {
        self.buf.len()
    }
    fn truncate(&mut self, len: usize) {
        self.buf.set_len(len);
    }
    fn grow(&mut self, n: usize) -> Option<std::ops::Range<usize>> {
        self.make_room(n);
        Some(self.buf.append_unfilled(n))
    }
    fn bytes(&self) -> &[u8] {
        self.buf.bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buf.all_mut()
    }
}

/// A door into a shard's endpoint: where the control thread hands connections.
#[derive(Debug, Clone)]
struct Door {
    tx: Sender<Conn>,
    waker: Waker,
}

/// A poller over TCP connections: the control plane's (with the listener) or one shard's.
#[derive(Debug)]
pub struct TcpEndpoint {
    role: Role,
    poll: Poll,
    events: Option<Events>,
    waker: Waker,
    listener: Option<TcpListener>,
    doors: Vec<Door>,
    adopt: Option<Receiver<Conn>>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Connections that yielded with work left, to drive again after the next poll; `driving`
    /// holds the ones being driven now (two buffers, swapped, so neither is reallocated).
    ready: Vec<usize>,
    driving: Vec<usize>,
    cfg: TransportConfig,
    info: Arc<[u8]>,
    next_id: u64,
    last_sweep: Instant,
    /// The watched descriptor turned readable since [`TcpEndpoint::take_watched`] last looked.
    watched_fired: bool,
    /// A descriptor given to [`ShardTransport::watch`] turned readable in a poll since the
    /// service last asked ([`ShardTransport::take_service_watched`]).
    service_watched_fired: bool,
    /// The service's durable log position when replies were last released.
    durable: u64,
    /// Connections open on the whole server (every endpoint of one `bind` shares it).
    census: Arc<Census>,
    /// Some connection here may be stalled: sweep for it even without events.
    any_stalled: bool,
    /// Lines about single connections (closed, refused) that a storm of peers could multiply.
    warn_limit: LogLimiter,
}

/// Binds `addr` and builds the control endpoint (which owns the listener) and one endpoint per
/// shard. `info` is the body of every hello reply (the server's self-description).
pub fn bind(addr: &str, shards: u16, cfg: &TransportConfig, info: Arc<[u8]>) -> Result<(TcpEndpoint, Vec<TcpEndpoint>, SocketAddr)> {
    cfg.validate()?;
    let sock = resolve(addr)?;
    let listener = listen(sock, cfg.listen_backlog).map_err(|source| TransportError::Connect { addr: format!("{addr} (bind)"), source })?;
    let local = listener.local_addr()?;
    let mut shard_eps = Vec::with_capacity(shards as usize);
    let mut doors = Vec::with_capacity(shards as usize);
    let census = Arc::new(Census::default());
    for shard in 0..shards {
        let (tx, rx) = channel::bounded(HANDOFF_QUEUE_MAX);
        let ep = TcpEndpoint::new(Role::Shard(shard), cfg, info.clone(), None, Some(rx), census.clone())?;
        doors.push(Door { tx, waker: ep.waker.clone() });
        shard_eps.push(ep);
    }
    let mut control = TcpEndpoint::new(Role::Control, cfg, info, Some(TcpListener::from_std(listener)), None, census)?;
    control.doors = doors;
    Ok((control, shard_eps, local))
}

/// Binds a non-blocking listener with room for `backlog` connections not yet accepted (std's
/// `bind` always asks for 128, which a few thousand workers starting at once overflow).
fn listen(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does: a restarted server can bind its port while old connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok().and_then(|s| s.trim().parse::<u32>().ok());
    if let Some(cap) = somaxconn.filter(|cap| backlog > *cap) {
        tracing::warn!(
            listen_backlog = backlog,
            somaxconn = cap,
            "the kernel caps the listen backlog at net.core.somaxconn; raise it (sysctl -w net.core.somaxconn={backlog}) for the backlog asked for"
        );
    }
    // The kernel takes an int and clamps it; the configured value is at most 65535.
    socket.listen(backlog as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    let err = |source| TransportError::Connect { addr: addr.to_string(), source };
    addr.to_socket_addrs().map_err(err)?.next().ok_or_else(|| err(io::Error::new(io::ErrorKind::NotFound, "no address")))
}

impl TcpEndpoint {
    fn new(
        role: Role,
        cfg: &TransportConfig,
        info: Arc<[u8]>,
        mut listener: Option<TcpListener>,
        adopt: Option<Receiver<Conn>>,
        census: Arc<Census>,
    ) -> Result<Self> {
        let poll = Poll::new()?;
        let waker = Waker(Arc::new(mio::Waker::new(poll.registry(), WAKER)?));
        if let Some(l) = listener.as_mut() {
            poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        Ok(Self {
            role,
            poll,
            events: Some(Events::with_capacity(EVENTS_MAX)),
            waker,
            listener,
            doors: Vec::new(),
            adopt,
            conns: Vec::new(),
            free: Vec::new(),
            ready: Vec::new(),
            driving: Vec::new(),
            cfg: cfg.clone(),
            info,
            next_id: 0,
            last_sweep: Instant::now(),
            watched_fired: false,
            service_watched_fired: false,
            durable: u64::MAX,
            census,
            any_stalled: false,
            warn_limit: LogLimiter::new(WARN_LINES_PER_S_MAX),
        })
    }

    /// The shard this endpoint serves; `None` for the control plane's.
    pub fn shard(&self) -> Option<u16> {
        match self.role {
            Role::Shard(s) => Some(s),
            Role::Control => None,
        }
    }

    /// True once per readiness of the descriptor given to [`TcpEndpoint::watch_fd`].
    pub fn take_watched(&mut self) -> bool {
        std::mem::take(&mut self.watched_fired)
    }

    /// Makes [`ShardTransport::poll`] return when `fd` turns readable, so that a layer above (RDMA
    /// completions) can sleep in the same poll as the sockets.
    pub fn watch_fd(&mut self, fd: std::os::fd::RawFd) -> io::Result<()> {
        self.poll.registry().register(&mut mio::unix::SourceFd(&fd), WATCHED, Interest::READABLE)
    }

    fn insert(&mut self, mut conn: Conn) -> io::Result<usize> {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let interest = Interest::READABLE | Interest::WRITABLE;
        self.poll.registry().register(&mut conn.stream, Token(idx + FIRST_CONN), interest)?;
        self.conns[idx] = Some(conn);
        // Room for every connection to yield in one pass, made now rather than on the data path.
        let slots = self.conns.len();
        self.ready.reserve(slots.saturating_sub(self.ready.len()));
        self.driving.reserve(slots);
        Ok(idx)
    }

    fn remove(&mut self, idx: usize) -> Option<Conn> {
        let mut conn = self.conns.get_mut(idx)?.take()?;
        // Deregistering can only fail if the socket is already gone, which is what we want anyway.
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.free.push(idx);
        Some(conn)
    }

    fn accept_all(&mut self) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        let mut accepted = Vec::new();
        loop {
            match listener.accept() {
                Ok((stream, peer)) => accepted.push((stream, peer)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors and the like: keep serving, say so, try again on the next event.
                    tracing::warn!(error = %e, "accept failed");
                    break;
                }
            }
        }
        for (stream, peer) in accepted {
            let counted = match self.census.admit(peer.ip(), &self.cfg) {
                Ok(counted) => counted,
                Err(why) => {
                    self.refuse_over_limit(stream, peer, why);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            self.next_id += 1;
            let now = Instant::now();
            let conn = Conn {
                id: ConnId(self.next_id),
                stream,
                peer,
                reader: FrameReader::lending(HELLO_FRAME_BYTES_MAX, self.cfg.read_chunk_bytes),
                inflater: Inflater::default(),
                deflater: Deflater::default(),
                out: OutQueue::default(),
                greeted: false,
                challenge: None,
                accepted_at: now,
                closing: None,
                stalled_since: None,
                heard_at: now,
                frame_since: None,
                peer_closed: false,
                rdma: false,
                unanswered_limit: LogLimiter::new(1),
                _open: counted,
            };
            tracing::debug!(%peer, conn = conn.id.0, "accepted");
            if let Err(e) = self.insert(conn) {
                tracing::warn!(%peer, error = %e, "cannot register connection");
            }
        }
    }

    /// Refuses a connection over [`TransportConfig::connections_max`] or
    /// [`TransportConfig::connections_per_peer_max`]: one error frame, best effort (the socket
    /// is fresh, so it takes it), then the socket closes.
    fn refuse_over_limit(&mut self, mut stream: TcpStream, peer: SocketAddr, why: Refusal) {
        metrics::counter!(crate::metrics::CONNECTIONS_REFUSED).increment(1);
        let reason = match why {
            Refusal::Total => {
                let max = self.cfg.connections_max;
                format!("the server holds its most connections ({max}); retry later, or raise its --connections-max")
            }
            Refusal::Peer => {
                let max = self.cfg.connections_per_peer_max;
                format!("the server holds its most connections from {} ({max}); close some, or raise its --connections-per-peer-max", peer.ip())
            }
        };
        let mut frame = [0u8; HEADER_BYTES + ERROR_MESSAGE_BYTES_MAX];
        let n = crate::reply::error_frame(&Header::request(Op::Hello, 0), Status::Full, &reason, &mut frame);
        let _ = stream.write(&frame[..n]);
        if let Some(suppressed) = self.warn_limit.admit(Instant::now()) {
            tracing::warn!(%peer, %reason, suppressed, "refusing connection");
        }
    }

    fn adopt_all(&mut self, service: &mut dyn Service) {
        let Some(rx) = self.adopt.clone() else { return };
        while let Ok(conn) = rx.try_recv() {
            let peer = conn.peer;
            match self.insert(conn) {
                Ok(idx) => self.drive(idx, service),
                Err(e) => tracing::warn!(%peer, error = %e, "cannot adopt connection"),
            }
        }
    }

    /// Connections open on this endpoint.
    fn open_here(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    /// Drops connections that missed a deadline: no hello in time, replies left unread, a
    /// frame that stopped arriving, or silence past the idle timeout.
    fn sweep(&mut self, service: &mut dyn Service) {
        if self.open_here() == 0 || self.last_sweep.elapsed() < SWEEP_GAP {
            return;
        }
        let now = Instant::now();
        self.last_sweep = now;
        let mut stalled = false;
        for idx in 0..self.conns.len() {
            let Some(c) = self.conns[idx].as_ref() else { continue };
            match c.overdue(&self.cfg, now) {
                Some(reason) => self.close(idx, service, reason),
                None => stalled |= c.stalled_since.is_some(),
            }
        }
        self.any_stalled = stalled;
        self.shrink_slots();
    }

    /// Gives back the slot table's tail once a storm of connections has gone: slots are only
    /// reused, never moved (their index is the poll token), so only free ones at the end go.
    fn shrink_slots(&mut self) {
        if self.conns.last().is_none_or(Option::is_some) {
            return;
        }
        while self.conns.last().is_some_and(Option::is_none) {
            self.conns.pop();
        }
        let len = self.conns.len();
        self.free.retain(|idx| *idx < len);
        if self.conns.capacity() > 2 * len.max(64) {
            self.conns.shrink_to(len.max(64));
            self.free.shrink_to(len.max(64));
            self.ready.shrink_to(len.max(64));
            self.driving.shrink_to(len.max(64));
        }
    }

    fn close(&mut self, idx: usize, service: &mut dyn Service, reason: String) {
        let Some(conn) = self.remove(idx) else { return };
        service.closed(conn.id);
        if conn.challenge.is_some() {
            // Challenged, and gone without an answer: most likely a peer that found the
            // server's proof wrong, so one with another cluster's secret.
            crate::metrics::auth_refused();
        } else if reason.is_empty() {
            tracing::debug!(peer = %conn.peer, conn = conn.id.0, "closed by peer");
            return;
        }
        // A storm of misbehaving peers must not flood the log: a few lines a second, then a count.
        let Some(suppressed) = self.warn_limit.admit(Instant::now()) else { return };
        if conn.challenge.is_some() {
            tracing::warn!(peer = %conn.peer, conn = conn.id.0, suppressed, "peer left during the authentication handshake (does it hold another cluster secret?)");
        } else {
            tracing::warn!(peer = %conn.peer, conn = conn.id.0, %reason, suppressed, "closing connection");
        }
    }

    /// Runs one connection until it would block, yields, closes or moves to a shard.
    fn drive(&mut self, idx: usize, service: &mut dyn Service) {
        let Some(conn) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        let next = conn.drive(service, &self.cfg, self.role, &self.info, self.doors.len());
        self.any_stalled |= conn.stalled_since.is_some();
        match next {
            Next::Open => {}
            Next::Yielded => self.ready.push(idx),
            Next::Close(reason) => self.close(idx, service, reason),
            Next::HandOff(shard) => self.hand_off(idx, shard, service),
        }
    }

    /// Sends the replies the service's log has caught up with since the last poll; if the log
    /// failed, turns the ones it never will catch up with into errors and sends those.
    fn release_held(&mut self, service: &mut dyn Service) {
        let durable = service.durable();
        let failed = service.held_failure().is_some();
        if durable == self.durable && !failed {
            return;
        }
        self.durable = durable;
        for idx in 0..self.conns.len() {
            let Some(conn) = self.conns[idx].as_mut().filter(|c| !c.out.held.is_empty()) else { continue };
            if let Some(failure) = service.held_failure() {
                conn.out.fail_held(durable, failure);
            }
            self.drive(idx, service);
        }
    }

    fn hand_off(&mut self, idx: usize, shard: u16, service: &mut dyn Service) {
        let Some(conn) = self.remove(idx) else { return };
        let door = &self.doors[shard as usize];
        match door.tx.try_send(conn) {
            Ok(()) => door.waker.wake(),
            Err(TrySendError::Full(conn) | TrySendError::Disconnected(conn)) => {
                tracing::warn!(peer = %conn.peer, shard, "shard is not taking connections; dropped");
                service.closed(conn.id);
            }
        }
    }
}

impl ShardTransport for TcpEndpoint {
    fn poll(&mut self, service: &mut dyn Service, timeout: Option<Duration>) -> Result<()> {
        // The service's log may have caught up since the last poll: send those replies first.
        self.release_held(service);
        let timeout = if self.ready.is_empty() { timeout } else { Some(Duration::ZERO) };
        // An endpoint with connections sweeps for missed deadlines even when nothing happens.
        let timeout = match (self.open_here() > 0, timeout) {
            (true, t) => Some(t.map_or(SWEEP_GAP, |t| t.min(SWEEP_GAP))),
            (false, t) => t,
        };
        let mut events = self.events.take().expect("events are put back after every poll");
        let polled = self.poll.poll(&mut events, timeout);
        if let Err(e) = polled {
            self.events = Some(events);
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e.into()) };
        }
        // With every event slot used, some connection may have bytes waiting that this poll did
        // not read: the deadlines are checked after a poll that saw everything.
        let saw_all = events.iter().count() < EVENTS_MAX;
        for event in events.iter() {
            match event.token() {
                LISTENER => self.accept_all(),
                WAKER => {
                    self.adopt_all(service);
                    service.wake(&mut |_| {});
                }
                // The watcher checks its own source when told it fired.
                WATCHED => self.watched_fired = true,
                // The service looks at its own I/O when told one of its descriptors fired.
                SERVICE_WATCHED => self.service_watched_fired = true,
                Token(t) => {
                    if event.is_read_closed() || event.is_error() {
                        if let Some(conn) = self.conns.get_mut(t - FIRST_CONN).and_then(Option::as_mut) {
                            conn.peer_closed = true;
                        }
                    }
                    self.drive(t - FIRST_CONN, service)
                }
            }
        }
        self.events = Some(events);
        std::mem::swap(&mut self.ready, &mut self.driving);
        for i in 0..self.driving.len() {
            self.drive(self.driving[i], service);
        }
        self.driving.clear();
        self.release_held(service);
        if saw_all {
            self.sweep(service);
        }
        Ok(())
    }

    fn watch(&mut self, fd: std::os::fd::RawFd) -> Result<()> {
        Ok(self.poll.registry().register(&mut mio::unix::SourceFd(&fd), SERVICE_WATCHED, Interest::READABLE)?)
    }

    fn take_service_watched(&mut self) -> bool {
        std::mem::take(&mut self.service_watched_fired)
    }

    fn waker(&self) -> Waker {
        self.waker.clone()
    }

    fn connections(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }
}

impl Conn {
    /// Why this connection must close now, if it missed a deadline.
    fn overdue(&self, cfg: &TransportConfig, now: Instant) -> Option<String> {
        let since = |at: Instant| now.saturating_duration_since(at);
        if !self.greeted {
            let late = since(self.accepted_at) > Duration::from_millis(cfg.hello_timeout_ms);
            return late.then(|| format!("no hello within {} ms", cfg.hello_timeout_ms));
        }
        if self.stalled_since.is_some_and(|at| since(at) > Duration::from_millis(cfg.stall_timeout_ms)) {
            metrics::counter!(crate::metrics::SLOW_CLIENTS_CLOSED).increment(1);
            return Some(format!(
                "the peer read none of its replies for {} ms while {} bytes waited (--client-stall-timeout-ms, --client-backlog-bytes-max)",
                cfg.stall_timeout_ms,
                self.out.pending()
            ));
        }
        // A full reply backlog stops this side reading: a frame waiting then is not the peer's delay.
        if self.out.pending() >= cfg.reply_backlog_bytes_max || self.closing.is_some() {
            return None;
        }
        if let (Some(at), Some((header, got))) = (self.frame_since, self.reader.partial()) {
            let want = header.map_or(HEADER_BYTES, |h| h.frame_len());
            let allowed = cfg.frame_deadline(want);
            if since(at) > allowed {
                return Some(format!(
                    "{got} of a {want}-byte frame arrived in {} ms, the most a frame that size may take (--frame-timeout-ms, --frame-bytes-per-s-min)",
                    allowed.as_millis()
                ));
            }
            return None;
        }
        let quiet = self.out.pending() == 0 && self.out.held.is_empty() && !self.rdma;
        let idle_ms = cfg.idle_timeout_ms;
        if quiet && idle_ms > 0 && since(self.heard_at) > Duration::from_millis(idle_ms) {
            return Some(format!("idle: the peer sent nothing for {idle_ms} ms (--client-idle-timeout-ms)"));
        }
        None
    }

    fn drive(&mut self, service: &mut dyn Service, cfg: &TransportConfig, role: Role, info: &[u8], shards: usize) -> Next {
        let mut served = 0;
        // Set by a short read: the socket was empty then, and a byte that came since raises a
        // new event, which drives the connection again (unless the peer closed: `peer_closed`).
        let mut drained = false;
        loop {
            match self.out.flush(&mut self.stream, service.durable()) {
                Ok(_) => {}
                Err(e) => return Next::Close(format!("write failed: {e}")),
            }
            if let Some(reason) = &self.closing {
                return if self.out.pending() == 0 { Next::Close(reason.clone()) } else { Next::Open };
            }
            let mut idle = false;
            while self.out.pending() < cfg.reply_backlog_bytes_max && served < cfg.frames_per_turn_max {
                match self.serve_one(service, cfg, role, info, shards) {
                    Ok(Some(next)) => return next,
                    Ok(None) if self.closing.is_some() => break,
                    Ok(None) => {
                        served += 1;
                        self.frame_since = None;
                    }
                    Err(Idle) => {
                        idle = true;
                        break;
                    }
                }
            }
            if self.closing.is_some() {
                continue;
            }
            // Send what was just served before reading more: the socket is writable now, and
            // edge-triggered polling would not say so again.
            if let Err(e) = self.out.flush(&mut self.stream, service.durable()) {
                return Next::Close(format!("write failed: {e}"));
            }
            if served >= cfg.frames_per_turn_max {
                return Next::Yielded;
            }
            if self.out.pending() >= cfg.reply_backlog_bytes_max {
                // The peer is not reading its replies: stop reading its requests until it does.
                // The writable event that follows a drain brings us back; a peer that reads
                // nothing for the stall timeout is closed by the sweep.
                match self.out.flush(&mut self.stream, service.durable()) {
                    Ok(true) => {
                        self.stalled_since = None;
                        continue;
                    }
                    Ok(false) => {
                        if self.out.blocked && self.out.wrote == 0 {
                            self.stalled_since.get_or_insert_with(Instant::now);
                        } else {
                            self.stalled_since = None;
                        }
                        return Next::Open;
                    }
                    Err(e) => return Next::Close(format!("write failed: {e}")),
                }
            }
            self.stalled_since = None;
            if !idle {
                // Whole frames are still buffered (the backlog stopped us, and has drained since):
                // serve them before reading more, as no event may come for them.
                continue;
            }
            let filled = if drained { Ok(Filled::WouldBlock) } else { self.reader.fill(&mut self.stream) };
            match filled {
                Ok(Filled::Bytes(0)) => {}
                Ok(Filled::Bytes(_)) => self.heard_at = Instant::now(),
                Ok(Filled::Drained(_)) => {
                    self.heard_at = Instant::now();
                    drained = !self.peer_closed;
                }
                Ok(Filled::WouldBlock) => {
                    // Part of a frame is here and the rest is not: its deadline runs from now.
                    if self.reader.buffered() > 0 {
                        self.frame_since.get_or_insert(self.heard_at);
                    }
                    return Next::Open;
                }
                Ok(Filled::Eof) => return self.on_eof(service.durable()),
                Err(e) => return Next::Close(format!("read failed: {e}")),
            }
        }
    }

    fn on_eof(&mut self, durable: u64) -> Next {
        match self.reader.partial() {
            None => Next::Close(String::new()),
            Some((header, got)) => {
                let want = header.map_or(HEADER_BYTES, |h| h.frame_len());
                let reason = format!("truncated frame: the peer closed after {got} of {want} bytes");
                let request = header.unwrap_or_else(|| Header::request(Op::Hello, 0));
                self.fail(&request, Status::Malformed, reason);
                // The peer may have shut down only its sending side: try to deliver the error.
                let _ = self.out.flush(&mut self.stream, durable);
                Next::Close(self.closing.take().unwrap_or_default())
            }
        }
    }

    /// Queues an error reply and marks the connection for closing once it is sent.
    fn fail(&mut self, request: &Header, status: Status, reason: String) {
        let mut reply = Reply::new(&mut self.out, *request, usize::MAX);
        reply.error(status, &reason);
        reply.finish(&mut self.deflater, usize::MAX);
        self.closing = Some(reason);
    }

    /// Serves the next buffered frame. `Err(Idle)` when none is whole yet.
    fn serve_one(
        &mut self,
        service: &mut dyn Service,
        cfg: &TransportConfig,
        role: Role,
        info: &[u8],
        shards: usize,
    ) -> std::result::Result<Option<Next>, Idle> {
        let (header, body) = match self.reader.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(Idle),
            Err(e) => {
                let request = self.reader.partial().and_then(|(h, _)| h).unwrap_or_else(|| Header::request(Op::Hello, 0));
                let status = match e {
                    TransportError::FrameTooLarge { .. } => Status::FrameTooLarge,
                    _ => Status::Malformed,
                };
                self.fail(&request, status, e.to_string());
                return Ok(None);
            }
        };
        if header.is_reply() {
            self.fail(&header, Status::Malformed, "a client sent a reply frame".into());
            return Ok(None);
        }
        match header.op() {
            Some(Op::Hello) => {
                let nonce = Nonce::try_from(self.reader.body(body)).ok();
                return Ok(self.hello(&header, nonce, role, info, shards, cfg));
            }
            Some(Op::Auth) => {
                let proof = <[u8; PROOF_BYTES]>::try_from(self.reader.body(body)).ok();
                return Ok(self.auth(&header, proof, role, info, shards, cfg));
            }
            _ => {}
        }
        if !self.greeted {
            if cfg.cluster_secret.is_some() {
                self.refuse(&header, "authenticate first: say hello and answer the challenge with the cluster secret");
            } else {
                self.fail(&header, Status::BadRequest, "send a hello before any request".into());
            }
            return Ok(None);
        }
        let no_reply = header.flags & flags::NO_REPLY != 0;
        if no_reply && header.op() != Some(Op::Replicate) {
            // Answered, since the sender may wait for it: only peers' acknowledgements go one way.
            let mut reply = Reply::new(&mut self.out, header, cfg.frame_bytes_max);
            reply.error(Status::BadRequest, "only a Replicate request may ask for no reply");
            reply.finish(&mut self.deflater, usize::MAX);
            return Ok(None);
        }
        let compressed = header.flags & flags::COMPRESSED != 0;
        let lends = body.len() >= SHARED_BODY_BYTES_MIN && body.len() * LENT_BUFFER_PER_BODY_MAX >= self.reader.capacity();
        let shared = (!compressed && lends).then(|| self.reader.lend());
        let raw = self.reader.body(body);
        let mut reply = Reply::new(&mut self.out, header, cfg.frame_bytes_max);
        match self.inflater.inflate(&header, raw) {
            Ok(body) => service.serve(Request { conn: self.id, header, body, shared }, &mut reply),
            Err(e) => reply.error(Status::Malformed, &e.to_string()),
        }
        let (frame, hold) = reply.finish(&mut self.deflater, cfg.compress_bytes_min);
        if no_reply {
            self.unanswered(frame);
            return Ok(None);
        }
        if header.op() == Some(Op::RdmaConnect) {
            // The queue pair lives as long as this connection, which carries nothing from now on.
            self.rdma |= Header::decode_unchecked(&self.out.buf.bytes()[frame.start..frame.start + HEADER_BYTES]).status() == Status::Ok;
        }
        if let Some(lsn) = hold {
            self.out.held.push_back((frame.start, lsn));
        }
        Ok(None)
    }

    /// Takes back the reply just queued at `frame` to a request that wanted none
    /// ([`flags::NO_REPLY`]): nothing waits for it, so it is not sent (nor held for the log);
    /// an error it carried is logged instead.
    fn unanswered(&mut self, frame: std::ops::Range<usize>) {
        let bytes = &self.out.buf.bytes()[frame.clone()];
        let header = Header::decode_unchecked(&bytes[..HEADER_BYTES]);
        if header.status() != Status::Ok {
            if let Some(suppressed) = self.unanswered_limit.admit(Instant::now()) {
                let body = &bytes[HEADER_BYTES..HEADER_BYTES + (header.body_len as usize).min(bytes.len() - HEADER_BYTES)];
                let reason = String::from_utf8_lossy(body);
                tracing::warn!(peer = %self.peer, conn = self.id.0, status = ?header.status(), %reason, suppressed, "a request that wanted no reply failed");
            }
        }
        self.out.buf.set_len(frame.start);
    }

    /// The span of this connection's set-up (hello, authentication), on the server.
    fn setup_span(&self, header: &Header) -> tracing::span::EnteredSpan {
        tracing::info_span!("handshake", peer = %self.peer, conn = self.id.0, shard = header.start, worker = header.worker).entered()
    }

    /// Answers a hello: with the server's self-description, or, when the server has a cluster
    /// secret, with a challenge (see [`crate::auth`]). `nonce` is the hello's body when it is one.
    fn hello(&mut self, header: &Header, nonce: Option<Nonce>, role: Role, info: &[u8], shards: usize, cfg: &TransportConfig) -> Option<Next> {
        let _span = self.setup_span(header);
        tracing::debug!(authenticating = cfg.cluster_secret.is_some(), "hello");
        if self.greeted || self.challenge.is_some() {
            self.fail(header, Status::BadRequest, "a second hello on one connection".into());
            return None;
        }
        let shard = header.start;
        let Some(secret) = &cfg.cluster_secret else {
            return self.welcome(header, shard, role, info, shards, cfg.frame_bytes_max);
        };
        let Some(client_nonce) = nonce else {
            self.refuse(header, "this cluster requires its secret: give this peer the cluster's --cluster-secret-file");
            return None;
        };
        let t = Transcript { client_nonce, server_nonce: auth::random_nonce(), shard, worker: header.worker };
        let mut challenge = [0u8; CHALLENGE_BYTES];
        challenge[..NONCE_BYTES].copy_from_slice(&t.server_nonce);
        challenge[NONCE_BYTES..].copy_from_slice(&secret.proof(Side::Server, &t));
        let mut reply = Reply::new(&mut self.out, *header, usize::MAX);
        reply.status_bytes(Status::AuthChallenge, &challenge);
        reply.finish(&mut self.deflater, usize::MAX);
        self.challenge = Some(t);
        None
    }

    /// Checks the client's answer to the challenge; serves the connection if it holds.
    fn auth(&mut self, header: &Header, proof: Option<[u8; PROOF_BYTES]>, role: Role, info: &[u8], shards: usize, cfg: &TransportConfig) -> Option<Next> {
        let _span = self.setup_span(header);
        let (Some(t), Some(secret)) = (self.challenge.take(), &cfg.cluster_secret) else {
            self.fail(header, Status::BadRequest, "an auth request without a challenge: say hello first".into());
            return None;
        };
        if !proof.is_some_and(|p| secret.verify(Side::Client, &t, &p)) {
            self.refuse(header, "authentication failed: the peer does not hold this cluster's secret (--cluster-secret-file)");
            return None;
        }
        tracing::debug!(peer = %self.peer, conn = self.id.0, worker = t.worker, "authenticated");
        self.welcome(header, t.shard, role, info, shards, cfg.frame_bytes_max)
    }

    /// Refuses a peer that has not authenticated and closes the connection once that is sent.
    fn refuse(&mut self, header: &Header, reason: &str) {
        crate::metrics::auth_refused();
        self.fail(header, Status::Unauthenticated, reason.into());
    }

    /// Serves the connection from now on: answers `header` with the server's self-description.
    /// On the control plane, a hello that named a shard moves the connection there. (With a
    /// cluster secret, only an authenticated peer learns whether its shard exists.)
    fn welcome(&mut self, header: &Header, shard: u64, role: Role, info: &[u8], shards: usize, frame_bytes_max: usize) -> Option<Next> {
        if shard != CONTROL_SHARD && shard >= shards as u64 && role == Role::Control {
            self.fail(header, Status::BadRequest, format!("no shard {shard}: this server has {shards}"));
            return None;
        }
        self.greeted = true;
        self.frame_since = None;
        self.reader.set_frame_bytes_max(frame_bytes_max);
        let mut reply = Reply::new(&mut self.out, *header, usize::MAX);
        reply.ok_bytes(info);
        reply.finish(&mut self.deflater, usize::MAX);
        match role {
            Role::Control if shard != CONTROL_SHARD => Some(Next::HandOff(shard as u16)),
            _ => None,
        }
    }
}

/// No whole frame is buffered.
struct Idle;

/// The client end of one TCP connection to a server's control plane or one of its shards.
#[derive(Debug)]
pub struct TcpLink {
    stream: TcpStream,
    poll: Poll,
    events: Events,
    reader: FrameReader,
    inflater: Inflater,
    deflater: Deflater,
    peer: String,
    /// Largest frame this side accepts.
    frame_bytes_max: usize,
    /// Largest frame the server accepts (its hello says), never above our own.
    send_bytes_max: usize,
    io_timeout: Duration,
    /// The last read found the socket empty: a byte that comes after raises an event a poll
    /// sees (edge-triggered), so the next receive waits for one before it reads.
    empty: bool,
    /// Sealed frames [`defer`](Self::defer)red and not yet written: they go at the front of the
    /// link's next write (a send's, or a receive's before it reads).
    deferred: Vec<u8>,
}

impl TcpLink {
    /// The socket's descriptor, for a caller that sleeps on it beside other things.
    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }

    /// Whether the server closed the connection, or it broke. Peeks; never blocks.
    pub fn closed(&self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.peek(&mut byte) {
            Ok(n) => n == 0,
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted),
        }
    }

    /// Connects to `addr`, says hello to `shard` ([`CONTROL_SHARD`] for the control plane) as
    /// `worker`, and returns the link with the server's hello reply (its self-description).
    pub fn connect(addr: &str, shard: u64, worker: u32, cfg: &TransportConfig) -> Result<(Self, Vec<u8>)> {
        let _span = tracing::info_span!("connect", peer = addr, shard, worker).entered();
        cfg.validate()?;
        let sock = resolve(addr)?;
        let timeout = Duration::from_millis(cfg.hello_timeout_ms);
        let std_stream = std::net::TcpStream::connect_timeout(&sock, timeout).map_err(|source| TransportError::Connect { addr: addr.to_string(), source })?;
        std_stream.set_nodelay(true)?;
        std_stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std_stream);
        let poll = Poll::new()?;
        poll.registry().register(&mut stream, Token(0), Interest::READABLE | Interest::WRITABLE)?;
        let mut link = Self {
            stream,
            poll,
            events: Events::with_capacity(4),
            reader: FrameReader::new(cfg.frame_bytes_max, cfg.read_chunk_bytes),
            inflater: Inflater::default(),
            deflater: Deflater::default(),
            peer: addr.to_string(),
            frame_bytes_max: cfg.frame_bytes_max,
            send_bytes_max: cfg.frame_bytes_max,
            io_timeout: Duration::from_millis(cfg.io_timeout_ms),
            empty: false,
            deferred: Vec::new(),
        };
        let info = link.handshake(shard, worker, cfg.cluster_secret.as_ref(), timeout)?;
        Ok((link, info))
    }

    /// Says hello and, when either side has a cluster secret, runs the challenge (see
    /// [`crate::auth`]). Returns the server's self-description.
    fn handshake(&mut self, shard: u64, worker: u32, secret: Option<&auth::ClusterSecret>, timeout: Duration) -> Result<Vec<u8>> {
        let client_nonce = secret.map(|_| auth::random_nonce());
        let mut hello = Header::request(Op::Hello, 0);
        hello.start = shard;
        hello.worker = worker;
        self.send(&mut hello, &[client_nonce.as_ref().map_or(&[][..], |n| &n[..])], false)?;
        let peer = self.peer.clone();
        let reply = self.recv(Some(timeout))?;
        let failed = |reason: &str| Err(TransportError::AuthFailed { peer: peer.clone(), reason: reason.into() });
        let challenge = match (reply.header.status(), secret, client_nonce) {
            (Status::Ok, None, _) => return Ok(reply.body.to_vec()),
            (Status::Ok, Some(_), _) => {
                return failed("the server did not prove it holds the cluster secret: it runs without --cluster-secret-file");
            }
            (Status::AuthChallenge, Some(secret), Some(client_nonce)) if reply.body.len() == CHALLENGE_BYTES => {
                let server_nonce = Nonce::try_from(&reply.body[..NONCE_BYTES]).expect("the length was checked");
                let t = Transcript { client_nonce, server_nonce, shard, worker };
                if !secret.verify(Side::Server, &t, &reply.body[NONCE_BYTES..]) {
                    return failed("the server's proof is wrong: it holds a different cluster secret");
                }
                secret.proof(Side::Client, &t)
            }
            (Status::AuthChallenge, None, _) => {
                return failed("the server requires the cluster secret: pass --cluster-secret-file (the file the servers were started with)");
            }
            (Status::AuthChallenge, ..) => return failed("the server's challenge is malformed"),
            (Status::Unauthenticated, ..) => return failed(&String::from_utf8_lossy(reply.body)),
            _ => return Err(TransportError::Refused { status: reply.header.status(), reason: String::from_utf8_lossy(reply.body).into_owned() }),
        };
        let mut answer = Header::request(Op::Auth, 0);
        answer.start = shard;
        answer.worker = worker;
        self.send(&mut answer, &[&challenge], false)?;
        let reply = self.recv(Some(timeout))?;
        match reply.header.status() {
            Status::Ok => Ok(reply.body.to_vec()),
            Status::Unauthenticated => Err(TransportError::AuthFailed { peer, reason: String::from_utf8_lossy(reply.body).into_owned() }),
            status => Err(TransportError::Refused { status, reason: String::from_utf8_lossy(reply.body).into_owned() }),
        }
    }

    /// Sends one frame as [`Link::send`] does, except that a small one (at most
    /// [`DEFERRED_BYTES_MAX`] with what is deferred already) waits, sealed, for this link's next
    /// send or receive, and leaves in the same write: a push followed by the pull after it costs
    /// one write here and one wake-up of the server, not two. A frame deferred never waits
    /// longer than that; [`flush_deferred`](Self::flush_deferred) sends it now.
    pub fn defer(&mut self, header: &mut Header, parts: &[&[u8]], compress: bool) -> Result<()> {
        let raw_len = self.check_size(parts)?;
        if self.deferred.len() + HEADER_BYTES + padded(raw_len) > DEFERRED_BYTES_MAX {
            return self.send(header, parts, compress);
        }
        let packed = self.deflater.frame_body(header, parts, compress);
        header.seal();
        let pad = padded(header.body_len as usize) - header.body_len as usize;
        self.deferred.extend_from_slice(header.as_bytes());
        packed.parts().iter().for_each(|part| self.deferred.extend_from_slice(part));
        self.deferred.extend_from_slice(&PAD[..pad]);
        Ok(())
    }

    /// Writes what was [`defer`](Self::defer)red, if anything.
    pub fn flush_deferred(&mut self) -> Result<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let mut deferred = std::mem::take(&mut self.deferred);
        let written = self.sock().write_all(&mut [IoSlice::new(&deferred)]);
        // Written, or the link is broken and its frames lost with it; the room stays.
        deferred.clear();
        self.deferred = deferred;
        written
    }

    /// The body length of a frame of `parts`, or why it cannot be sent.
    fn check_size(&self, parts: &[&[u8]]) -> Result<usize> {
        assert!(parts.len() <= SEND_PARTS_MAX, "a frame is sent from at most {SEND_PARTS_MAX} parts");
        let raw_len: usize = parts.iter().map(|p| p.len()).sum();
        let limit = self.send_bytes_max;
        if HEADER_BYTES + padded(raw_len) > limit {
            return Err(TransportError::FrameTooLarge { bytes: HEADER_BYTES + padded(raw_len), limit });
        }
        Ok(raw_len)
    }

    fn sock(&mut self) -> Sock<'_> {
        Sock { stream: &mut self.stream, poll: &mut self.poll, events: &mut self.events, reader: &mut self.reader, io_timeout: self.io_timeout }
    }
}

/// Writes `slices` with one `sendmsg(MSG_NOSIGNAL)`: a write to a connection the peer has
/// closed then fails with `EPIPE` instead of raising SIGPIPE. `write_vectored` is a plain
/// `writev`, and a C program that loads the library keeps SIGPIPE's default action (Rust
/// ignores it only in Rust programs): a dead server would kill the trainer.
fn send_vectored(stream: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    let mut no_control = rustix::net::SendAncillaryBuffer::default();
    Ok(rustix::net::sendmsg(stream, slices, &mut no_control, rustix::net::SendFlags::NOSIGNAL)?)
}

/// The parts of a link that move bytes, borrowed apart from its compression buffers.
struct Sock<'a> {
    stream: &'a mut TcpStream,
    poll: &'a mut Poll,
    events: &'a mut Events,
    reader: &'a mut FrameReader,
    io_timeout: Duration,
}

impl Sock<'_> {
    /// Waits for the socket to become ready, reading whatever replies arrive meanwhile so that
    /// the server never stalls on us. True when the reads left the socket empty (not closed).
    fn wait(&mut self, deadline: Instant, what: &'static str) -> Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::Timeout { what, ms: self.io_timeout.as_millis() as u64 });
        }
        match self.poll.poll(self.events, Some(left)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        // A peer that closed its side may have sent its last bytes with the end: read on to it.
        let closed = self.events.iter().any(|e| e.is_read_closed() || e.is_error());
        self.drain(closed)
    }

    /// Reads everything the socket has now: until a read finds it empty (true), or closed. A
    /// short read shows it empty unless the peer `closed` its side.
    fn drain(&mut self, closed: bool) -> Result<bool> {
        loop {
            match self.reader.fill(self.stream)? {
                Filled::Bytes(_) => {}
                Filled::Drained(_) if closed => {}
                Filled::Drained(_) | Filled::WouldBlock => return Ok(true),
                Filled::Eof => return Ok(false),
            }
        }
    }

    fn write_all(&mut self, slices: &mut [IoSlice<'_>]) -> Result<()> {
        let deadline = Instant::now() + self.io_timeout;
        let mut slices = slices;
        while !slices.is_empty() {
            match send_vectored(self.stream, slices) {
                Ok(0) => return Err(TransportError::Closed { mid_frame: true }),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(deadline, "the socket to drain")?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe || e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(TransportError::Closed { mid_frame: true })
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl Link for TcpLink {
    fn send(&mut self, header: &mut Header, parts: &[&[u8]], compress: bool) -> Result<()> {
        self.check_size(parts)?;
        // Split the borrows: the compressed body lives in the deflater while the stream writes it.
        let Self { deflater, stream, poll, events, reader, io_timeout, deferred, .. } = self;
        let packed = deflater.frame_body(header, parts, compress);
        let body = packed.parts();
        header.seal();
        let pad = padded(header.body_len as usize) - header.body_len as usize;
        // What was deferred goes first, in the same write.
        let mut slices: [IoSlice<'_>; SEND_PARTS_MAX + 3] = [IoSlice::new(&[]); SEND_PARTS_MAX + 3];
        slices[0] = IoSlice::new(deferred);
        slices[1] = IoSlice::new(header.as_bytes());
        for (slot, part) in slices[2..].iter_mut().zip(body) {
            *slot = IoSlice::new(part);
        }
        slices[body.len() + 2] = IoSlice::new(&PAD[..pad]);
        let mut sock = Sock { stream, poll, events, reader, io_timeout: *io_timeout };
        let written = sock.write_all(&mut slices[..body.len() + 3]);
        // Written, or the link is broken and its frames lost with it.
        deferred.clear();
        written
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Frame<'_>> {
        // A reply may be waited for only once every request is on its way.
        self.flush_deferred()?;
        let deadline = Instant::now() + timeout.unwrap_or(self.io_timeout);
        let mut looked = false;
        loop {
            if let Some((header, body)) = self.reader.next_frame()? {
                let body = self.inflater.inflate(&header, self.reader.body(body))?;
                return Ok(Frame { header, body });
            }
            // A request's reply is seldom back before the first read (about one call in two on
            // replication links read nothing first, `strace` of a 3-replica demo): once a read
            // finds the socket empty, the link waits for an event before it reads again. A
            // receive with no time left still reads once, to take what is there.
            if self.empty {
                if Instant::now() < deadline {
                    self.empty = self.sock().wait(deadline, "a reply")?;
                    continue;
                }
                if looked {
                    return Err(TransportError::Timeout { what: "a reply", ms: self.io_timeout.as_millis() as u64 });
                }
            }
            looked = true;
            match self.reader.fill(&mut self.stream)? {
                Filled::Bytes(_) => {}
                Filled::Drained(_) | Filled::WouldBlock => self.empty = true,
                Filled::Eof => return Err(TransportError::Closed { mid_frame: self.reader.buffered() > 0 }),
            }
        }
    }

    fn peer(&self) -> &str {
        &self.peer
    }

    fn send_bytes_max(&self) -> usize {
        self.send_bytes_max
    }

    fn kind(&self) -> &'static str {
        "tcp"
    }

    fn limit_frames(&mut self, peer_frame_bytes_max: usize) {
        self.send_bytes_max = peer_frame_bytes_max.min(self.frame_bytes_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queues a reply to request `id`: an acknowledgement with a 2-entry stamp held for `hold`,
    /// or (`None`) a pull reply with 3 values.
    fn queue(out: &mut OutQueue, id: u64, hold: Option<u64>) {
        let op = if hold.is_some() { Op::Push } else { Op::Pull };
        let mut reply = Reply::new(out, Header::request(op, id), 1 << 20);
        match hold {
            Some(lsn) => {
                reply.ok(2, 0).0.copy_from_slice(&[id, id]);
                reply.hold_until(lsn);
            }
            None => reply.ok(0, 3).1.copy_from_slice(&[1.0, 2.0, 3.0]),
        }
        let (frame, held) = reply.finish(&mut Deflater::default(), usize::MAX);
        if let Some(lsn) = held {
            out.held.push_back((frame.start, lsn));
        }
    }

    /// The frames in the queue: (request id, status, body).
    fn frames(out: &OutQueue) -> Vec<(u64, Status, Vec<u8>)> {
        let (bytes, mut at, mut found) = (out.buf.bytes(), out.head, Vec::new());
        while at < bytes.len() {
            let h = Header::decode(&bytes[at..], 1 << 20).expect("a sealed frame");
            found.push((h.request_id, h.status(), bytes[at + HEADER_BYTES..at + HEADER_BYTES + h.body_len as usize].to_vec()));
            at += HEADER_BYTES + padded(h.body_len as usize);
        }
        found
    }

    /// A greeted server-side connection over loopback, last heard from `quiet_ms` ago.
    fn greeted_conn(census: &Arc<Census>, cfg: &TransportConfig, quiet_ms: u64) -> (Conn, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("an address")).expect("connect");
        let (stream, peer) = listener.accept().expect("accept");
        // A poller's connection never blocks: a read with nothing to read says so.
        stream.set_nonblocking(true).expect("non-blocking");
        let then = Instant::now() - Duration::from_millis(quiet_ms);
        let conn = Conn {
            id: ConnId(1),
            stream: TcpStream::from_std(stream),
            peer,
            reader: FrameReader::new(cfg.frame_bytes_max, cfg.read_chunk_bytes),
            inflater: Inflater::default(),
            deflater: Deflater::default(),
            out: OutQueue::default(),
            greeted: true,
            challenge: None,
            accepted_at: then,
            closing: None,
            stalled_since: None,
            heard_at: then,
            frame_since: None,
            peer_closed: false,
            rdma: false,
            unanswered_limit: LogLimiter::new(1),
            _open: census.admit(peer.ip(), cfg).ok().expect("under the limits"),
        };
        (conn, client)
    }

    #[test]
    fn a_quiet_connection_is_idle_unless_it_carries_rdma_waits_for_a_reply_or_the_deadline_is_off() {
        let census = Arc::new(Census::default());
        let cfg = TransportConfig { idle_timeout_ms: 1_000, ..TransportConfig::default() };
        let now = Instant::now();
        let (fresh, _c1) = greeted_conn(&census, &cfg, 10);
        assert_eq!(fresh.overdue(&cfg, now), None);
        let (mut quiet, _c2) = greeted_conn(&census, &cfg, 2_000);
        assert!(quiet.overdue(&cfg, now).is_some_and(|r| r.contains("--client-idle-timeout-ms")));
        quiet.rdma = true;
        assert_eq!(quiet.overdue(&cfg, now), None, "an RDMA worker's TCP connection carries nothing");
        quiet.rdma = false;
        queue(&mut quiet.out, 1, None);
        assert_eq!(quiet.overdue(&cfg, now), None, "a reply waits to be read");
        quiet.out = OutQueue::default();
        let off = TransportConfig { idle_timeout_ms: 0, ..cfg.clone() };
        assert_eq!(quiet.overdue(&off, now), None);
    }

    /// Answers every request OK with a body, as a shard answers an RDMA set-up with its queue
    /// pair's address.
    struct AcceptAll;

    impl Service for AcceptAll {
        fn serve(&mut self, _request: Request<'_>, reply: &mut Reply<'_>) {
            reply.ok_bytes(&[7; 24]);
        }
    }

    #[test]
    fn a_connection_whose_rdma_set_up_was_accepted_is_exempt_from_the_idle_deadline() {
        let census = Arc::new(Census::default());
        let cfg = TransportConfig { idle_timeout_ms: 1_000, ..TransportConfig::default() };
        let (mut conn, mut client) = greeted_conn(&census, &cfg, 0);
        let mut header = Header::request(Op::RdmaConnect, 7);
        header.seal();
        std::io::Write::write_all(&mut client, header.as_bytes()).expect("send the request");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !conn.rdma && Instant::now() < deadline {
            assert!(!matches!(conn.drive(&mut AcceptAll, &cfg, Role::Shard(0), &[], 1), Next::Close(_)));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(conn.rdma, "the accepted RdmaConnect marks the connection");
        let later = Instant::now() + Duration::from_secs(5);
        assert_eq!(conn.overdue(&cfg, later), None, "an RDMA worker's TCP connection carries nothing");
    }

    /// Answers each request after a pause with its id: the reply comes after the link's first
    /// read found nothing.
    struct Late(Duration);

    impl Service for Late {
        fn serve(&mut self, request: Request<'_>, reply: &mut Reply<'_>) {
            std::thread::sleep(self.0);
            reply.ok_bytes(&request.header.request_id.to_le_bytes());
        }
    }

    /// A one-shard server on loopback whose endpoints a thread of its own polls with
    /// `service`, until dropped.
    struct Serving {
        addr: SocketAddr,
        stop: Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Serving {
        fn start(cfg: &TransportConfig, mut service: impl Service + Send + 'static) -> Serving {
            let (mut control, mut shards, addr) = bind("127.0.0.1:0", 1, cfg, Arc::from(&b"{}"[..])).expect("bind");
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopped = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut shard = shards.pop().expect("one shard");
                while !stopped.load(Ordering::Acquire) {
                    control.poll(&mut AcceptAll, Some(Duration::from_millis(1))).expect("control poll");
                    shard.poll(&mut service, Some(Duration::from_millis(1))).expect("shard poll");
                }
            });
            Serving { addr, stop, thread: Some(thread) }
        }
    }

    impl Drop for Serving {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            if let Some(thread) = self.thread.take() {
                let served = thread.join();
                // A failed test already panics; the server thread's panic is then only noise.
                if !std::thread::panicking() {
                    served.expect("the server thread");
                }
            }
        }
    }

    #[test]
    fn a_link_that_found_its_socket_empty_waits_for_the_reply_and_a_look_with_no_time_left_still_reads() {
        let cfg = TransportConfig::default();
        let server = Serving::start(&cfg, Late(Duration::from_millis(2)));
        let (mut link, _) = TcpLink::connect(&server.addr.to_string(), 0, 1, &cfg).expect("connect");
        let id_of = |frame: Frame<'_>| u64::from_le_bytes(frame.body[..8].try_into().expect("an id"));
        for id in 1..=20u64 {
            link.send(&mut Header::request(Op::Ping, id), &[], false).expect("send");
            assert_eq!(id_of(link.recv(None).expect("the reply")), id);
            assert!(link.empty, "the read that took the reply found nothing after it");
        }
        // A reply that arrived while the link believed its socket empty is still taken by a
        // receive with no time to wait.
        link.send(&mut Header::request(Op::Ping, 21), &[], false).expect("send");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(id_of(link.recv(Some(Duration::ZERO)).expect("the reply that is there")), 21);
        assert!(matches!(link.recv(Some(Duration::ZERO)), Err(TransportError::Timeout { .. })), "nothing more is there");
        drop(server);
    }

    /// Answers each request with its id, and notes the ids in the order served.
    struct Record(Arc<Mutex<Vec<u64>>>);

    impl Service for Record {
        fn serve(&mut self, request: Request<'_>, reply: &mut Reply<'_>) {
            self.0.lock().expect("the record").push(request.header.request_id);
            reply.ok_bytes(&request.header.request_id.to_le_bytes());
        }
    }

    #[test]
    fn deferred_frames_leave_with_the_next_send_or_before_a_receive_and_large_ones_at_once() {
        let cfg = TransportConfig::default();
        let served = Arc::new(Mutex::new(Vec::new()));
        let server = Serving::start(&cfg, Record(served.clone()));
        let served_now = || served.lock().expect("the record").clone();
        let (mut link, _) = TcpLink::connect(&server.addr.to_string(), 0, 1, &cfg).expect("connect");
        let id_of = |frame: Frame<'_>| u64::from_le_bytes(frame.body[..8].try_into().expect("an id"));
        link.defer(&mut Header::request(Op::Ping, 1), &[&[1; 100]], false).expect("defer");
        link.defer(&mut Header::request(Op::Ping, 2), &[&[2; 100]], false).expect("defer");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(served_now(), Vec::<u64>::new(), "deferred frames wait for the link's next write");
        link.send(&mut Header::request(Op::Ping, 3), &[], false).expect("send");
        let replies: Vec<u64> = (0..3).map(|_| id_of(link.recv(None).expect("a reply"))).collect();
        assert_eq!(replies, [1, 2, 3], "answered in the order sent");
        link.defer(&mut Header::request(Op::Ping, 4), &[], false).expect("defer");
        assert_eq!(id_of(link.recv(None).expect("the deferred frame's reply")), 4, "a receive sends what was deferred first");
        let large = vec![0u8; DEFERRED_BYTES_MAX];
        link.defer(&mut Header::request(Op::Ping, 5), &[&large], false).expect("defer");
        let deadline = Instant::now() + Duration::from_secs(10);
        while served_now().len() < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(served_now(), [1, 2, 3, 4, 5], "a frame over the deferred limit goes at once");
        assert_eq!(id_of(link.recv(None).expect("its reply")), 5);
        drop(server);
    }

    /// Notes the ids it serves, and fails the `Replicate` requests whose id is even.
    struct FailEven(Arc<Mutex<Vec<u64>>>);

    impl Service for FailEven {
        fn serve(&mut self, request: Request<'_>, reply: &mut Reply<'_>) {
            let id = request.header.request_id;
            self.0.lock().expect("the record").push(id);
            match request.header.op() == Some(Op::Replicate) && id.is_multiple_of(2) {
                true => reply.error(Status::BadRequest, "an even id"),
                false => reply.ok_bytes(&id.to_le_bytes()),
            }
        }
    }

    /// A `Replicate` request that wants no reply is served and answered with nothing, not even
    /// when it fails (the server logs that), and the connection carries on; any other request
    /// asking for no reply is refused, with a reply.
    #[test]
    fn a_request_that_wants_no_reply_is_served_and_gets_none() {
        let cfg = TransportConfig::default();
        let served = Arc::new(Mutex::new(Vec::new()));
        let server = Serving::start(&cfg, FailEven(served.clone()));
        let (mut link, _) = TcpLink::connect(&server.addr.to_string(), 0, 1, &cfg).expect("connect");
        let one_way = |op: Op, id: u64| {
            let mut header = Header::request(op, id);
            header.flags |= flags::NO_REPLY;
            header
        };
        link.send(&mut one_way(Op::Replicate, 1), &[b"served"], false).expect("send");
        link.send(&mut one_way(Op::Replicate, 2), &[b"fails"], false).expect("send");
        link.send(&mut one_way(Op::Ping, 3), &[], false).expect("send");
        link.send(&mut Header::request(Op::Replicate, 5), &[b"answered"], false).expect("send");
        let refused = link.recv(None).expect("the refusal");
        assert_eq!((refused.header.request_id, refused.header.status()), (3, Status::BadRequest), "a Ping may not ask for no reply");
        let answered = link.recv(None).expect("the reply");
        assert_eq!((answered.header.request_id, answered.header.status()), (5, Status::Ok));
        assert!(matches!(link.recv(Some(Duration::from_millis(100))), Err(TransportError::Timeout { .. })), "nothing more comes");
        assert_eq!(*served.lock().expect("the record"), [1, 2, 5], "served in order, the refused one not at all");
        drop(server);
    }

    #[test]
    fn the_census_caps_each_peer_and_forgets_a_peer_with_nothing_open() {
        let census = Arc::new(Census::default());
        let cfg = TransportConfig { connections_per_peer_max: 2, connections_max: 3, ..TransportConfig::default() };
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let held = [census.admit(a, &cfg).ok(), census.admit(a, &cfg).ok()];
        assert!(held.iter().all(Option::is_some));
        assert!(matches!(census.admit(a, &cfg), Err(Refusal::Peer)));
        let other = census.admit(b, &cfg).ok().expect("another peer");
        assert!(matches!(census.admit(b, &cfg), Err(Refusal::Total)));
        assert_eq!(census.total.load(Ordering::Relaxed), 3, "a refusal leaves the counts as they were");
        drop(held);
        drop(other);
        assert_eq!(census.total.load(Ordering::Relaxed), 0);
        assert!(census.per_peer.lock().expect("the map").is_empty());
    }

    #[test]
    fn replies_held_for_a_failed_log_become_errors_and_the_rest_stay_as_they_were() {
        let mut out = OutQueue::default();
        queue(&mut out, 1, Some(4));
        queue(&mut out, 2, Some(5));
        queue(&mut out, 3, None);
        queue(&mut out, 4, Some(6));
        let pull = frames(&out)[2].clone();
        out.fail_held(4, crate::HeldFailure { status: Status::NotDurable, reason: "disk full writing wal-00000000.log" });
        assert!(out.held.is_empty());
        let after = frames(&out);
        assert_eq!(after.len(), 4);
        // Durable before the failure: acknowledged as it was.
        assert_eq!((after[0].0, after[0].1), (1, Status::Ok));
        assert_eq!(after[2], pull, "a reply behind a held one is untouched");
        for (id, status, body) in [&after[1], &after[3]] {
            assert_eq!(*status, Status::NotDurable, "request {id}");
            let message = String::from_utf8_lossy(body);
            assert!(message.contains("not acknowledged") && message.contains("disk full"), "{message}");
        }
    }
}
