//! Tessera's transport seam, and its TCP implementation.
//!
//! Nothing above this crate knows which transport carries it. A server shard hands its
//! [`ShardTransport`] a [`Service`] and polls; the transport turns arriving frames into
//! [`Request`]s and writes what the service puts in the [`Reply`]. A client talks through a
//! [`Link`], one per (server, shard). TCP implements both now ([`tcp`]); RDMA verbs implement the
//! same seam next.
//!
//! Frames are a fixed 64-byte header and a body padded to 8 bytes ([`wire`]). Bodies are read in
//! place from aligned buffers that are reused, so the steady state does not allocate; Snappy
//! compression is per frame and shown by a header flag.
//!
//! ```no_run
//! use tessera_transport::{tcp, wire::{Header, Op}, Link, TransportConfig, CONTROL_SHARD};
//! # fn main() -> Result<(), tessera_transport::TransportError> {
//! let cfg = TransportConfig::default();
//! // Say hello to a server's control plane and ask for its catalog (JSON).
//! let (mut link, _server_info) = tcp::TcpLink::connect("127.0.0.1:7070", CONTROL_SHARD, 0, &cfg)?;
//! let mut header = Header::request(Op::Catalog, 1);
//! link.send(&mut header, &[], false)?;
//! let reply = link.recv(None)?;
//! println!("{}", String::from_utf8_lossy(reply.body));
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]

pub mod auth;
pub mod buf;
pub mod caller;
pub mod config;
pub mod error;
pub mod expose;
pub mod keycache;
pub mod loglimit;
pub mod metrics;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod reply;
pub mod select;
pub mod tcp;
pub mod wire;

use std::time::Duration;

pub use caller::{Caller, Dialer};
pub use config::{Arrival, RdmaConfig, TransportConfig};
pub use error::{Result, TransportError};
pub use select::{Chosen, TransportKind};
pub use wire::{Header, Op, Status, CONTROL_SHARD};

/// Identifies one connection on one endpoint for as long as it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One request as a service sees it: the header and the (decompressed) body, read in place.
#[derive(Debug)]
pub struct Request<'a> {
    pub conn: ConnId,
    pub header: Header,
    pub body: &'a [u8],
    /// The buffer `body` lies in, for the service to keep (a clone) past the request instead
    /// of copying what it keeps: given for a large body (of
    /// [`SHARED_BODY_BYTES_MIN`](config::SHARED_BODY_BYTES_MIN) or more, filling enough of its
    /// read buffer: [`LENT_BUFFER_PER_BODY_MAX`](config::LENT_BUFFER_PER_BODY_MAX)) that arrived
    /// as it is over TCP. A clone kept keeps that buffer from the connection until it is dropped.
    pub shared: Option<&'a std::sync::Arc<buf::AlignedBuf>>,
}

/// What a server runs on each request. It must answer every request through the [`Reply`]
/// exactly once; a service that forgets gets an `Internal` error sent for it.
pub trait Service {
    /// Serves one request.
    fn serve(&mut self, request: Request<'_>, reply: &mut Reply<'_>);
    /// The endpoint was woken from another thread: control traffic may be waiting. The service
    /// reports through `expose` any change to the memory it lets workers read directly.
    fn wake(&mut self, _expose: &mut dyn FnMut(expose::Exposure)) {}
    /// A connection closed; forget anything kept for it.
    fn closed(&mut self, _conn: ConnId) {}
    /// How far the service's log is durable: a reply held with
    /// [`Reply::hold_until`] leaves once this reaches its position. A service without a log
    /// holds nothing and keeps the default.
    fn durable(&self) -> u64 {
        u64::MAX
    }
    /// Why replies held for positions past [`durable`](Self::durable) will not be honoured: the
    /// log failed, or (on a replicated server) the pushes they acknowledge did not reach their
    /// chains' tails in time. A transport then sends each reply still held for such a position
    /// as an error of the failure's status carrying its reason, instead of holding it for ever.
    /// A service may clear the failure once a poll has run since it was raised, having moved
    /// `durable` past every position it failed.
    fn held_failure(&self) -> Option<HeldFailure<'_>> {
        None
    }
}

/// Why the replies a [`Service`] held will not be honoured ([`Service::held_failure`]).
#[derive(Debug, Clone, Copy)]
pub struct HeldFailure<'a> {
    /// What each such reply becomes: [`Status::NotDurable`](wire::Status::NotDurable) when the
    /// log failed (the push is applied in memory, and never acknowledged),
    /// [`Status::Unacknowledged`](wire::Status::Unacknowledged) when a chain did not carry the
    /// push to its tail in time (its worker sends it again).
    pub status: wire::Status,
    pub reason: &'a str,
}

/// The server side of a transport, as one shard sees it.
pub trait ShardTransport: Send + std::fmt::Debug {
    /// Waits up to `timeout` (forever if `None`) for work, and serves all that arrived.
    fn poll(&mut self, service: &mut dyn Service, timeout: Option<Duration>) -> Result<()>;
    /// A handle that interrupts [`ShardTransport::poll`] from any thread.
    fn waker(&self) -> Waker;
    /// Connections now open.
    fn connections(&self) -> usize;
    /// Makes [`poll`](Self::poll) return when `fd` turns readable, so that the service can sleep
    /// on its own I/O (a disk ring's eventfd) in the same wait as the network.
    fn watch(&mut self, fd: std::os::fd::RawFd) -> Result<()>;
    /// Whether a descriptor given to [`watch`](Self::watch) turned readable in a poll since the
    /// last call (descriptors are watched edge-triggered: once per arrival, and once when added
    /// if already readable); true once, then false until the next.
    fn take_service_watched(&mut self) -> bool;
}

/// Most parts a frame's body may be sent from ([`Link::send`]).
pub const SEND_PARTS_MAX: usize = 6;

/// The client side of a transport: one ordered stream of frames to one server shard.
/// Replies come back in the order requests were sent.
pub trait Link: Send + std::fmt::Debug {
    /// Sends one frame, its body the `parts` (at most [`SEND_PARTS_MAX`]) one after the other;
    /// fills in the lengths, flags and checksum of `header`. Compresses the body
    /// when `compress` is set and that saves at least a tenth. May read replies while it waits for
    /// the socket, so that a pipelining peer never deadlocks.
    fn send(&mut self, header: &mut Header, parts: &[&[u8]], compress: bool) -> Result<()>;
    /// Receives the next frame, waiting up to `timeout` (the link's I/O timeout if `None`).
    fn recv(&mut self, timeout: Option<Duration>) -> Result<Frame<'_>>;
    /// The peer's address, for messages.
    fn peer(&self) -> &str;
    /// The largest frame this link sends: the smaller of its own limit and the peer's.
    fn send_bytes_max(&self) -> usize;
    /// Adopts the peer's frame limit (from its hello reply) for what this link sends.
    fn limit_frames(&mut self, peer_frame_bytes_max: usize);
    /// `"tcp"` or `"rdma"`.
    fn kind(&self) -> &'static str;
}

/// The capability of a link whose device reaches memory directly (RDMA): a link has it or not
/// ([`Caller::one_sided`]); TCP links do not.
pub trait OneSided {
    /// Reads `out.len() / dim` keys of dense table `table` from key `start` straight from the
    /// shard's memory (a one-sided RDMA READ), after every request sent before it was served.
    /// Writes the keys' stamp (a lower bound: the meet over the blocks read) into `stamp`.
    /// The keys must lie in one part of the table on the shard. Returns `Ok(false)`, touching
    /// nothing, when the shard exposes no part of the table holding them: send a `PullRange`
    /// instead.
    fn read_dense(&mut self, table: u32, start: u64, dim: u32, out: &mut [f32], stamp: &mut Vec<u64>) -> Result<bool>;
    /// Block copies found torn and read again since the link was made.
    fn torn_reads(&self) -> u64;
}

/// One received frame, borrowed from the link until the next call.
#[derive(Debug)]
pub struct Frame<'a> {
    pub header: Header,
    pub body: &'a [u8],
}

/// Interrupts a poll from another thread.
#[derive(Debug, Clone)]
pub struct Waker(std::sync::Arc<mio::Waker>);

impl Waker {
    /// Wakes the endpoint; its service's [`Service::wake`] runs on its own thread.
    pub fn wake(&self) {
        // A failed wake means the endpoint's poller is gone, and with it anyone to wake.
        let _ = self.0.wake();
    }
}

pub use reply::Reply;

/// One request to the control plane at `addr` on a fresh connection; returns the reply body.
pub fn ask(addr: &str, op: Op, body: &[u8], cfg: &TransportConfig) -> Result<Vec<u8>> {
    ControlLink::connect(addr, cfg)?.ask(op, body, None)
}

/// A connection to one server's control plane, kept for requests made again and again (a
/// cluster client's look at the configuration, once a second): [`ask`] without a connection
/// and a handshake each time. A server closes it after its idle timeout, or goes away: the
/// next request then fails, and the caller connects again.
#[derive(Debug)]
pub struct ControlLink {
    addr: String,
    link: tcp::TcpLink,
    asked: u64,
}

impl ControlLink {
    /// Connects to the control plane at `addr` (TCP, with the handshake `cfg` asks for).
    pub fn connect(addr: &str, cfg: &TransportConfig) -> Result<Self> {
        let (link, _) = tcp::TcpLink::connect(addr, CONTROL_SHARD, u32::MAX, cfg)?;
        Ok(Self { addr: addr.to_string(), link, asked: 0 })
    }

    /// Sends `op` with `body` and waits for the reply, at most `timeout` (else the transport's
    /// I/O timeout); returns the reply body. After an error the link is not to be used again.
    pub fn ask(&mut self, op: Op, body: &[u8], timeout: Option<Duration>) -> Result<Vec<u8>> {
        self.asked += 1;
        let mut header = Header::request(op, self.asked);
        Ok(call(&mut self.link, &mut header, body, timeout)?.1)
    }

    /// The address it was made to.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// Sends one request on a link with nothing else in flight and waits for its reply; a reply
/// with an error status becomes [`TransportError::Refused`] carrying the server's message.
pub fn call(link: &mut dyn Link, header: &mut Header, body: &[u8], timeout: Option<Duration>) -> Result<(Header, Vec<u8>)> {
    link.send(header, &[body], false)?;
    take_reply(link, timeout)
}

/// Receives the reply to the one request in flight on `link`; an error status becomes
/// [`TransportError::Refused`] carrying the server's message.
pub(crate) fn take_reply(link: &mut dyn Link, timeout: Option<Duration>) -> Result<(Header, Vec<u8>)> {
    let mut body = Vec::new();
    let header = take_reply_into(link, timeout, &mut body)?;
    Ok((header, body))
}

/// [`take_reply`], with the body copied into `body` (cleared first).
pub(crate) fn take_reply_into(link: &mut dyn Link, timeout: Option<Duration>, body: &mut Vec<u8>) -> Result<Header> {
    let reply = link.recv(timeout)?;
    if reply.header.status() != Status::Ok {
        return Err(TransportError::Refused { status: reply.header.status(), reason: String::from_utf8_lossy(reply.body).into_owned() });
    }
    body.clear();
    body.extend_from_slice(reply.body);
    Ok(reply.header)
}
