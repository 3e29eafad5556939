//! Links for request–reply traffic: a replicated server's messages to its peers and a
//! replicated worker's pushes. Over RDMA, each frame that fits a slot goes through the queue
//! pair, and a larger one (a range's snapshot, a push of a wide range) through the link's own
//! TCP connection to the same shard. Several requests may be in flight on one path, answered in
//! the order sent; a request that would take the other path waits until nothing is in flight
//! ([`Caller::can_start`]), so the two paths never reorder what one caller sends.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::{RdmaConfig, TransportConfig};
use crate::error::{Result, TransportError};
use crate::select::{self, Chosen, TransportKind};
use crate::tcp::TcpLink;
#[cfg(feature = "rdma")]
use crate::wire::HEADER_BYTES;
use crate::wire::{Header, CONTROL_SHARD};
use crate::Link;

/// How to open links: the frame knobs, the transport chosen for this process, and the RDMA
/// knobs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dialer {
    pub cfg: TransportConfig,
    pub chosen: Chosen,
    pub rdma: RdmaConfig,
    /// The user asked for RDMA: a server that serves only TCP is then an error.
    pub required: bool,
}

impl Dialer {
    /// Chooses the transport for `kind` ([`select::choose`]): `Rdma` without a device fails.
    pub fn new(kind: TransportKind, cfg: TransportConfig, rdma: RdmaConfig) -> Result<Self> {
        let chosen = select::choose(kind, &rdma)?;
        Ok(Self { cfg, chosen, rdma, required: kind == TransportKind::Rdma })
    }

    /// Says hello to shard `shard` at `addr` as `worker`, and moves the link onto RDMA when this
    /// process has a device and `serves_rdma` says, from the hello reply, that the server has
    /// one too. The control shard is always reached over TCP.
    pub fn caller(&self, addr: &str, shard: u64, worker: u32, serves_rdma: fn(&[u8]) -> bool) -> Result<Caller> {
        let (tcp, info) = TcpLink::connect(addr, shard, worker, &self.cfg)?;
        let served = serves_rdma(&info);
        if self.required && shard != CONTROL_SHARD && !served {
            let reason = format!("server {addr} serves TCP only; start it with --transport rdma");
            return Err(TransportError::RdmaUnavailable { reason });
        }
        match &self.chosen {
            #[cfg(feature = "rdma")]
            Chosen::Rdma(dev) if served && shard != CONTROL_SHARD => {
                let link = crate::rdma::RdmaLink::upgrade(tcp, &self.cfg, &self.rdma, dev.clone())?;
                Ok(Caller { path: Path::Rdma(Box::new(link)), calls: Calls::default(), waiting: VecDeque::new(), compress: false, hello: info })
            }
            _ => Ok(Caller { path: Path::Tcp(Box::new(tcp)), calls: Calls::default(), waiting: VecDeque::new(), compress: false, hello: info }),
        }
    }
}

/// How a [`Caller`]'s calls went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// Over RDMA slots.
    pub rdma: u64,
    /// Over TCP: every call of a TCP link, and an RDMA link's frames too large for a slot.
    pub tcp: u64,
}

/// A link that sends requests and takes their replies in order; see the module's description.
#[derive(Debug)]
pub struct Caller {
    path: Path,
    calls: Calls,
    /// The path each request in flight took, oldest first (all the same path).
    waiting: VecDeque<Over>,
    /// Snappy-compress request bodies (and ask for compressed replies) when that pays.
    compress: bool,
    /// The server's hello reply (its self-description).
    hello: Vec<u8>,
}

/// Which of a caller's paths a request went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    /// The link's TCP connection (all of a TCP link's requests).
    Tcp,
    /// An RDMA link's queue pair.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    Fast,
}

#[derive(Debug)]
enum Path {
    Tcp(Box<TcpLink>),
    #[cfg(feature = "rdma")]
    Rdma(Box<crate::rdma::RdmaLink>),
}

impl Caller {
    /// The server's hello reply: how it describes itself.
    pub fn hello(&self) -> &[u8] {
        &self.hello
    }

    /// This caller, compressing its requests' bodies where that saves at least a tenth (as a
    /// `Link::send` with `compress` does) and asking for compressed replies.
    pub fn compressing(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// Sends one request and waits for its reply. A reply with an error status becomes
    /// [`TransportError::Refused`] carrying the server's message. Nothing may be in flight.
    pub fn call(&mut self, header: &mut Header, body: &[u8], timeout: Option<Duration>) -> Result<(Header, Vec<u8>)> {
        self.call_parts(header, &[body], timeout)
    }

    /// [`call`](Self::call) with a body in `parts`, sent one after the other as one body: a
    /// large part is sent from where it lies, not copied after the others first.
    pub fn call_parts(&mut self, header: &mut Header, parts: &[&[u8]], timeout: Option<Duration>) -> Result<(Header, Vec<u8>)> {
        if !self.waiting.is_empty() {
            return Err(TransportError::Rdma { reason: "a call while requests are in flight on the link".into() });
        }
        self.start_parts(header, parts)?;
        self.finish(timeout)
    }

    /// The path a request of a body of `body_len` bytes takes.
    #[cfg_attr(not(feature = "rdma"), allow(unused_variables))]
    fn path_for(&self, body_len: usize) -> Over {
        match &self.path {
            Path::Tcp(_) => Over::Tcp,
            #[cfg(feature = "rdma")]
            Path::Rdma(rdma) if frame_bytes(body_len) <= rdma.send_bytes_max() => Over::Fast,
            #[cfg(feature = "rdma")]
            Path::Rdma(_) => Over::Tcp,
        }
    }

    /// Whether a request of `body` may be [`start`](Self::start)ed now: nothing is in flight,
    /// or what is took the path this one would (so this one cannot overtake it).
    pub fn can_start(&self, body: &[u8]) -> bool {
        self.can_start_len(body.len())
    }

    /// [`can_start`](Self::can_start) for a body of `body_len` bytes (sent in parts).
    pub fn can_start_len(&self, body_len: usize) -> bool {
        self.waiting.back().is_none_or(|&over| over == self.path_for(body_len))
    }

    /// Requests started whose replies have not been taken.
    pub fn in_flight(&self) -> usize {
        self.waiting.len()
    }

    /// Sends one request without waiting for its reply: a caller starts several, to one server
    /// or to several, then [`finish`](Self::finish)es them in the order started, so the servers
    /// work at once and one server's replies overlap its requests. Starting a request that
    /// [`can_start`](Self::can_start) refuses is an error. Over RDMA a request beyond the
    /// link's slots waits for the oldest reply to land first.
    pub fn start(&mut self, header: &mut Header, body: &[u8]) -> Result<()> {
        self.start_parts(header, &[body])
    }

    /// [`start`](Self::start) with a body in `parts` (see [`call_parts`](Self::call_parts)).
    pub fn start_parts(&mut self, header: &mut Header, parts: &[&[u8]]) -> Result<()> {
        self.start_over(header, parts, false)
    }

    /// Sends one request that wants no reply ([`flags::NO_REPLY`](crate::wire::flags::NO_REPLY)):
    /// the server serves it and answers nothing, not even an error. It may go behind requests in
    /// flight, whose replies still come in order. Over TCP only (see
    /// [`sends_one_way`](Self::sends_one_way)); only a `Replicate` request may go so.
    pub fn start_one_way(&mut self, header: &mut Header, parts: &[&[u8]]) -> Result<()> {
        match &mut self.path {
            Path::Tcp(tcp) => {
                header.flags |= crate::wire::flags::NO_REPLY;
                tcp.send(header, parts, self.compress)?;
            }
            #[cfg(feature = "rdma")]
            Path::Rdma(_) => return Err(TransportError::Rdma { reason: "a request that wants no reply over RDMA, where every request is answered".into() }),
        }
        self.calls.tcp += 1;
        Ok(())
    }

    /// Whether [`start_one_way`](Self::start_one_way) may be used: a TCP link.
    pub fn sends_one_way(&self) -> bool {
        self.tcp_socket().is_some()
    }

    /// [`start`](Self::start), except that over TCP a small request waits for the link's next
    /// request or wait and leaves in the same write ([`TcpLink::defer`]); over RDMA it goes at
    /// once. [`flush_deferred`](Self::flush_deferred) sends it now.
    pub fn start_deferred(&mut self, header: &mut Header, body: &[u8]) -> Result<()> {
        self.start_over(header, &[body], true)
    }

    /// Writes the requests [`start_deferred`](Self::start_deferred) left waiting, if any.
    pub fn flush_deferred(&mut self) -> Result<()> {
        match &mut self.path {
            Path::Tcp(tcp) => tcp.flush_deferred(),
            #[cfg(feature = "rdma")]
            Path::Rdma(_) => Ok(()),
        }
    }

    fn start_over(&mut self, header: &mut Header, parts: &[&[u8]], defer: bool) -> Result<()> {
        let body_len = parts.iter().map(|p| p.len()).sum();
        if !self.can_start_len(body_len) {
            return Err(TransportError::Rdma { reason: "a request on one path while requests are in flight on the other".into() });
        }
        let over = self.path_for(body_len);
        if self.compress {
            header.flags |= crate::wire::flags::COMPRESS_REPLY;
        }
        match (&mut self.path, over) {
            (Path::Tcp(tcp), _) if defer => tcp.defer(header, parts, self.compress)?,
            (Path::Tcp(tcp), _) => tcp.send(header, parts, self.compress)?,
            #[cfg(feature = "rdma")]
            (Path::Rdma(rdma), Over::Fast) => rdma.send(header, parts, self.compress)?,
            #[cfg(feature = "rdma")]
            (Path::Rdma(rdma), Over::Tcp) => rdma.tcp().send(header, parts, self.compress)?,
        }
        match over {
            Over::Tcp => self.calls.tcp += 1,
            Over::Fast => self.calls.rdma += 1,
        }
        self.waiting.push_back(over);
        Ok(())
    }

    /// Waits for the reply to the oldest request [`start`](Self::start)ed and not finished. A
    /// reply with an error status becomes [`TransportError::Refused`] carrying the server's
    /// message.
    pub fn finish(&mut self, timeout: Option<Duration>) -> Result<(Header, Vec<u8>)> {
        let mut body = Vec::new();
        let header = self.finish_into(timeout, &mut body)?;
        Ok((header, body))
    }

    /// [`finish`](Self::finish), with the body copied into `body` (cleared first): a caller
    /// that keeps its buffers allocates nothing per reply. A reply that does not come within a
    /// `timeout` given leaves its request in flight ([`TransportError::Timeout`]): finish it
    /// later. (Without one, the link's I/O timeout is a failure, and the request is let go.)
    pub fn finish_into(&mut self, timeout: Option<Duration>, body: &mut Vec<u8>) -> Result<Header> {
        let Some(over) = self.waiting.pop_front() else {
            return Err(TransportError::Rdma { reason: "waiting for a reply with no request in flight".into() });
        };
        let link: &mut dyn Link = match (&mut self.path, over) {
            (Path::Tcp(tcp), _) => &mut **tcp,
            #[cfg(feature = "rdma")]
            (Path::Rdma(rdma), Over::Fast) => &mut **rdma,
            #[cfg(feature = "rdma")]
            (Path::Rdma(rdma), Over::Tcp) => rdma.tcp(),
        };
        let taken = crate::take_reply_into(link, timeout, body);
        if timeout.is_some() && matches!(taken, Err(TransportError::Timeout { .. })) {
            self.waiting.push_front(over);
        }
        taken
    }

    /// The socket a TCP link's replies come on, for a caller that sleeps in a poll of its own
    /// and then [`finish`](Self::finish)es with no wait; `None` over RDMA, whose replies land on
    /// its queue pair.
    pub fn tcp_socket(&self) -> Option<std::os::fd::RawFd> {
        match &self.path {
            Path::Tcp(tcp) => Some(tcp.fd()),
            #[cfg(feature = "rdma")]
            Path::Rdma(_) => None,
        }
    }

    /// The largest body that goes over the fast path (RDMA's slot, less the header), when there
    /// is one: a caller that batches keeps its batches this small.
    pub fn fast_body_max(&self) -> Option<usize> {
        match &self.path {
            Path::Tcp(_) => None,
            #[cfg(feature = "rdma")]
            Path::Rdma(rdma) => Some(rdma.send_bytes_max() - HEADER_BYTES),
        }
    }

    /// The link's one-sided reads, when its device has them (RDMA) and nothing is in flight on
    /// it: a read sees what every request before it did.
    pub fn one_sided(&mut self) -> Option<&mut dyn crate::OneSided> {
        if !self.waiting.is_empty() {
            return None;
        }
        match &mut self.path {
            Path::Tcp(_) => None,
            #[cfg(feature = "rdma")]
            Path::Rdma(rdma) => Some(&mut **rdma),
        }
    }

    /// Block copies this link's one-sided reads found torn and read again.
    pub fn torn_reads(&self) -> u64 {
        match &self.path {
            Path::Tcp(_) => 0,
            #[cfg(feature = "rdma")]
            Path::Rdma(rdma) => crate::OneSided::torn_reads(&**rdma),
        }
    }

    /// `"tcp"` or `"rdma"`.
    pub fn kind(&self) -> &'static str {
        match &self.path {
            Path::Tcp(_) => "tcp",
            #[cfg(feature = "rdma")]
            Path::Rdma(_) => "rdma",
        }
    }

    /// Calls made so far, by the path they took.
    pub fn calls(&self) -> Calls {
        self.calls
    }
}

/// A frame's length with a full header and `body` padded to 8 bytes.
#[cfg(feature = "rdma")]
fn frame_bytes(body_len: usize) -> usize {
    HEADER_BYTES + body_len.next_multiple_of(8)
}
