//! Hand-built frames over a blocking `std` socket, for saying what the client library never would.
//!
//! A [`RawConn`] sends whatever bytes a test gives it, and reads replies by the wire format: a
//! 64-byte header, then `body_len` bytes padded to 8. Every read and write has a timeout, so a
//! server that stops answering fails the test instead of hanging it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tessera_replication::codec::{self, PushHeader};
use tessera_replication::protocol::{Msg, RangeId, WorkerId};
use tessera_transport::wire::{padded, Header, Op, Status, HEADER_BYTES, REPLY_BIT};
use zerocopy::IntoBytes;

/// How long a raw connection waits for the server on any one read or write.
pub const RAW_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One reply as it came off the wire.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub header: Header,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn status(&self) -> Status {
        self.header.status()
    }

    /// The body as text (error replies carry a message).
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The vector-clock stamp at the front of a data reply's body.
    pub fn stamp(&self) -> Vec<u64> {
        let n = self.header.count as usize;
        assert!(self.body.len() >= n * 8, "reply body of {} bytes is shorter than its {n}-entry stamp", self.body.len());
        self.body[..n * 8].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
    }

    /// The values after the stamp in a pull reply.
    pub fn values(&self) -> Vec<f32> {
        let rest = &self.body[self.header.count as usize * 8..];
        assert_eq!(rest.len() % 4, 0, "values are whole f32s");
        rest.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
    }

    /// Panics unless this is an error reply with `status` whose message contains `needle`; or,
    /// answering a worker's pushes, a head's answer that refuses a push by name
    /// ([`Msg::Refused`]) with `status` and such a message.
    #[track_caller]
    pub fn expect_error(&self, status: Status, needle: &str) {
        assert!(self.header.is_reply(), "the reply's op {:#x} lacks the reply bit", self.header.op);
        let (got, message) = match self.refusal() {
            Some((_, status, reason)) => (status, reason),
            None => (self.status(), self.message()),
        };
        assert_eq!(got, status, "expected {status:?}, got {got:?}: {message:?}");
        assert!(message.to_lowercase().contains(&needle.to_lowercase()), "{status:?} message {message:?} does not mention {needle:?}");
    }

    /// The first push a head's answer to a worker refuses by name: its number, status and
    /// reason.
    pub fn refusal(&self) -> Option<(u32, Status, String)> {
        let worker_push = self.header.op & !REPLY_BIT == Op::WorkerPush as u8;
        if !worker_push || self.status() != Status::Ok {
            return None;
        }
        let news = codec::decode_batch(&self.body[self.header.count as usize * 8..]).ok()?;
        news.into_iter().find_map(|m| match m {
            Msg::Refused { seq, status, reason, .. } => Some((seq, Status::from_u16(status), reason)),
            _ => None,
        })
    }
}

/// A blocking TCP connection that speaks frames only as far as the test tells it to.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    next_id: u64,
}

impl RawConn {
    /// Connects without saying anything.
    pub fn connect(addr: &str) -> RawConn {
        let sock: SocketAddr = addr.parse().expect("a numeric address");
        let stream = TcpStream::connect_timeout(&sock, RAW_IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(RAW_IO_TIMEOUT)).expect("set a read timeout");
        stream.set_write_timeout(Some(RAW_IO_TIMEOUT)).expect("set a write timeout");
        stream.set_nodelay(true).expect("set nodelay");
        RawConn { stream, next_id: 1 }
    }

    /// Connects and says hello to `shard` (or `CONTROL_SHARD`) as `worker`; panics unless the
    /// server accepts. Returns the connection and the server's self-description.
    pub fn hello(addr: &str, shard: u64, worker: u32) -> (RawConn, serde_json::Value) {
        let mut conn = RawConn::connect(addr);
        let reply = conn.send_hello(shard, worker).unwrap_or_else(|e| panic!("hello to {addr}: {e}"));
        assert_eq!(reply.status(), Status::Ok, "hello refused: {}", reply.message());
        let info = serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("hello reply is not JSON ({e}): {}", reply.message()));
        (conn, info)
    }

    /// Sends a hello naming `shard` and returns whatever comes back.
    pub fn send_hello(&mut self, shard: u64, worker: u32) -> io::Result<RawReply> {
        let mut header = Header::request(Op::Hello, 0);
        header.start = shard;
        header.worker = worker;
        self.send_frame(header, &[])?;
        self.recv()
    }

    /// Sends bytes exactly as given.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends `header` with `body`: fills in the lengths, seals, and pads the body.
    pub fn send_frame(&mut self, mut header: Header, body: &[u8]) -> io::Result<()> {
        header.body_len = u32::try_from(body.len()).expect("a body under 4 GiB");
        header.raw_len = header.body_len;
        header.seal();
        self.send_bytes(&frame_bytes(&header, body))
    }

    /// Gives `header` the next request id, sends it with `body`, and reads the reply, which must
    /// echo the id.
    #[track_caller]
    pub fn request(&mut self, mut header: Header, body: &[u8]) -> RawReply {
        header.request_id = self.next_id;
        self.next_id += 1;
        self.send_frame(header, body).unwrap_or_else(|e| panic!("sending {:?}: {e}", header.op()));
        let reply = self.recv().unwrap_or_else(|e| panic!("no reply to {:?}: {e}", header.op()));
        assert_eq!(reply.header.request_id, header.request_id, "the reply does not echo the request id");
        assert_eq!(reply.header.op, header.op | REPLY_BIT, "the reply does not echo the op");
        reply
    }

    /// [`RawConn::request`] of a frame built by [`push`], [`pull`] and friends.
    #[track_caller]
    pub fn call(&mut self, frame: (Header, Vec<u8>)) -> RawReply {
        self.request(frame.0, &frame.1)
    }

    /// Reads one reply frame; its header must be well-formed and sealed.
    pub fn recv(&mut self) -> io::Result<RawReply> {
        let mut head = [0u8; HEADER_BYTES];
        self.stream.read_exact(&mut head)?;
        let header = Header::decode(&head, usize::MAX).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("the server sent a bad header: {e}")))?;
        let mut body = vec![0u8; padded(header.body_len as usize)];
        self.stream.read_exact(&mut body)?;
        body.truncate(header.body_len as usize);
        Ok(RawReply { header, body })
    }

    /// Panics unless the server closes the connection (EOF or reset) within [`RAW_IO_TIMEOUT`]
    /// without sending anything more.
    #[track_caller]
    pub fn expect_closed(&mut self) {
        let started = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => panic!("expected the server to close; it sent {n} more bytes: {:?}", &buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => return,
                Err(e) => panic!("expected the server to close within {RAW_IO_TIMEOUT:?}; after {:?}: {e}", started.elapsed()),
            }
        }
    }

    /// Waits up to `timeout` for the server to close; returns how long that took, or `None` if
    /// the connection is still open (or sent data).
    pub fn closed_within(&mut self, timeout: Duration) -> Option<Duration> {
        let started = Instant::now();
        self.stream.set_read_timeout(Some(timeout)).expect("set a read timeout");
        let mut buf = [0u8; 256];
        let result = loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break Some(started.elapsed()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted) => break Some(started.elapsed()),
                Ok(_) | Err(_) => break None,
            }
        };
        self.stream.set_read_timeout(Some(RAW_IO_TIMEOUT)).expect("set a read timeout");
        result
    }

    /// The socket, for a test that reads it its own way.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Closes our sending side: the server sees end-of-stream but can still answer.
    pub fn shutdown_write(&mut self) {
        self.stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
    }
}

/// A header followed by its body and padding, as on the wire. The header is taken as is.
pub fn frame_bytes(header: &Header, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES + padded(body.len()));
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(body);
    bytes.resize(HEADER_BYTES + padded(body.len()), 0);
    bytes
}

pub fn u64_bytes(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A `Push` of `keys` with `values` to table `table`, claiming `dim` (body: keys, then values).
pub fn push(table: u32, dim: u32, keys: &[u64], values: &[f32]) -> (Header, Vec<u8>) {
    let mut header = Header::request(Op::Push, 0);
    header.table = table;
    header.dim = dim;
    header.count = keys.len() as u32;
    let mut body = u64_bytes(keys);
    body.extend(f32_bytes(values));
    (header, body)
}

/// A `PushRange` of `count` keys from `start` with `values`.
pub fn push_range(table: u32, dim: u32, start: u64, count: u32, values: &[f32]) -> (Header, Vec<u8>) {
    let mut header = Header::request(Op::PushRange, 0);
    header.table = table;
    header.dim = dim;
    header.start = start;
    header.count = count;
    (header, f32_bytes(values))
}

/// A `Pull` of `keys`.
pub fn pull(table: u32, dim: u32, keys: &[u64]) -> (Header, Vec<u8>) {
    let mut header = Header::request(Op::Pull, 0);
    header.table = table;
    header.dim = dim;
    header.count = keys.len() as u32;
    (header, u64_bytes(keys))
}

/// A `PullRange` of `count` keys from `start`.
pub fn pull_range(table: u32, dim: u32, start: u64, count: u32) -> (Header, Vec<u8>) {
    let mut header = Header::request(Op::PullRange, 0);
    header.table = table;
    header.dim = dim;
    header.start = start;
    header.count = count;
    (header, Vec::new())
}

/// The worker [`worker_push`] and [`worker_push_range`] sign as: the last of a server's
/// default 16, which no test's client is. A head checks only the push it applies next, and
/// takes one numbered as a push it applied for that push sent again: a raw push must not
/// share a worker id with pushes applied before it.
pub const RAW_PUSH_WORKER: u32 = 15;

/// A worker's `WorkerPush` frame carrying one push of `keys` (listed) with `values` to table
/// `table` in replication range `range`, claiming `dim`: what a client sends a range's head.
/// The push is signed by [`RAW_PUSH_WORKER`] and numbered 1 (set `header.worker` to claim
/// another).
pub fn worker_push(range: u32, table: u32, dim: u32, keys: &[u64], values: &[f32]) -> (Header, Vec<u8>) {
    worker_push_as(RAW_PUSH_WORKER, 1, range, table, dim, keys, values)
}

/// [`worker_push`] by worker `worker` (in the frame's header, the message and the payload), as
/// its push number `seq` to the range: a head applies a worker's pushes to a range in their
/// numbers' order, each once.
pub fn worker_push_as(worker: u32, seq: u32, range: u32, table: u32, dim: u32, keys: &[u64], values: &[f32]) -> (Header, Vec<u8>) {
    let h = PushHeader { table, dim, start: 0, count: keys.len() as u32, worker, clock: 0, listed: true, range_done: false };
    let (mut header, body) = worker_push_frame(worker, seq, range, h.keyed_payload(keys, values));
    header.worker = worker;
    (header, body)
}

/// A worker's `WorkerPush` frame carrying one push of the dense keys `[start, start + count)`
/// with `values`, as [`worker_push`].
pub fn worker_push_range(range: u32, table: u32, dim: u32, start: u64, count: u32, values: &[f32]) -> (Header, Vec<u8>) {
    worker_push_range_as(RAW_PUSH_WORKER, 1, range, table, dim, start, count, values)
}

/// [`worker_push_range`] by worker `worker`, as its push number `seq` to the range (see
/// [`worker_push_as`]).
#[allow(clippy::too_many_arguments)]
pub fn worker_push_range_as(worker: u32, seq: u32, range: u32, table: u32, dim: u32, start: u64, count: u32, values: &[f32]) -> (Header, Vec<u8>) {
    let h = PushHeader { table, dim, start, count, worker, clock: 0, listed: false, range_done: false };
    let (mut header, body) = worker_push_frame(worker, seq, range, h.payload(values));
    header.worker = worker;
    (header, body)
}

fn worker_push_frame(worker: u32, seq: u32, range: u32, payload: Vec<u8>) -> (Header, Vec<u8>) {
    let msg = Msg::Push { range: RangeId(range), worker: WorkerId(worker), seq, payload: payload.into() };
    let mut body = Vec::new();
    codec::encode_batch([&msg], &mut body);
    (Header::request(Op::WorkerPush, 0), body)
}
