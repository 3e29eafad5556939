//! The wire format: a fixed 64-byte header, then a body padded to 8 bytes.
//!
//! ```text
//!  0 magic u32 "TSRA"   4 version u8   5 op u8   6 flags u16
//!  8 body_len u32 (bytes on the wire, unpadded)  12 raw_len u32 (body bytes after decompression)
//! 16 request_id u64     24 clock u64   32 start u64
//! 40 table u32          44 worker u32  48 count u32   52 dim u32
//! 56 status u16         58 reserved u16               60 header_crc u32 (crc32c of bytes 0..60)
//! ```
//! Bodies by op (all little-endian, keys before values so both stay aligned):
//! - `Push`: `count` keys (u64), then `count * dim` values (f32). `clock`/`worker` stamp it.
//! - `PushRange`: `count * dim` values for keys `start .. start + count`.
//! - `Pull`: `count` keys. `PullRange`: empty, covers `start .. start + count`.
//! - A `Push` or `Pull` flagged `KEYS_CACHED` leaves its keys out: `start` names a key list the
//!   connection sent before with `KEYS_REMEMBER` (see [`crate::keycache`]).
//! - Replies echo `request_id`, `table` and `dim`; `count` is the stamp length. A push reply's body is
//!   the stamp (u64 per worker); a pull reply's is the stamp then the values. An error reply has a
//!   non-zero `status` and a UTF-8 message as its body.
//! - `Hello` and `Auth` carry the handshake's nonces and proofs when the server has a cluster
//!   secret ([`crate::auth`]).
//! - Control ops (`Hello`, `Catalog`, `CreateTable`, `Status`, `Checkpoint`) carry JSON bodies.
//!
//! Small frames on RDMA use a 32-byte [`ShortHeader`] instead: the same fields, narrower, without
//! magic, version, checksum and request id. An 8-byte push with its reply carried 128 bytes of
//! headers, 64 with short ones. (On SoftRoCE in the test guest that bought no measurable latency;
//! the README has the runs.)

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{Result, TransportError};

#[cfg(not(target_endian = "little"))]
compile_error!("the wire format is little-endian and read in place; big-endian hosts need a swap layer");

/// Bytes in every frame header.
pub const HEADER_BYTES: usize = 64;
/// Frame bodies are padded so that the next header, keys and stamps stay 8-byte aligned.
pub const FRAME_ALIGN: usize = 8;
/// "TSRA" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"TSRA");
/// Bumped on any incompatible change of the header or a body layout. Version 2 added the short
/// RDMA frames; version 3 aligns the bulk bytes of replication messages.
pub const VERSION: u8 = 3;
/// Set on `op` in every reply.
pub const REPLY_BIT: u8 = 0x80;
/// The `shard` a hello names to stay on the control plane.
pub const CONTROL_SHARD: u64 = u64::MAX;

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES);
const _: () = assert!(HEADER_BYTES.is_multiple_of(FRAME_ALIGN));

/// Header flags.
pub mod flags {
    /// This frame's body is Snappy-compressed; `raw_len` is its decompressed size.
    pub const COMPRESSED: u16 = 1;
    /// The sender would like the reply compressed when that pays.
    pub const COMPRESS_REPLY: u16 = 2;
    /// A `Push` or `Pull` whose keys both ends should remember (see [`crate::keycache`]).
    pub const KEYS_REMEMBER: u16 = 4;
    /// A `Push` or `Pull` that carries no keys: `start` is the hash of a remembered key list
    /// and `count` its length (see [`crate::keycache`]).
    pub const KEYS_CACHED: u16 = 8;
    /// A sparse `Push` that completes its worker's update to this table part for its clock: the
    /// worker's clock is raised over the whole part, not only over its keys' span, so that
    /// bounded-delay pulls of any key there see it. It may carry no keys at all.
    pub const PART_DONE: u16 = 16;
    /// A `WorkerPush` that asks for the worker's push count on every range the shard heads
    /// (one `PushAck` each in the reply), so that a worker's new client numbers its pushes on.
    pub const PUSH_SEQS: u16 = 32;
    /// A `WorkerPush` from a worker that hears of its pushes from their chains' tails: the
    /// heads answer its pushes at once instead of holding the reply until the tails hold them,
    /// and the body may name, as `PushAck` messages, pushes to ranges the shard is the tail of:
    /// the reply waits until the tail holds them (one hop instead of the way back up the chain).
    pub const TAIL_ACKS: u16 = 64;
    /// A `Replicate` request over TCP whose sender wants no reply: the server serves it and
    /// sends nothing back, not even an error (which it logs instead). A peer's acknowledgements
    /// go so, one message each way instead of two. Refused on any other op, and over RDMA.
    pub const NO_REPLY: u16 = 128;
    /// Every flag this version understands.
    pub const KNOWN: u16 = COMPRESSED | COMPRESS_REPLY | KEYS_REMEMBER | KEYS_CACHED | PART_DONE | PUSH_SEQS | TAIL_ACKS | NO_REPLY;
}

/// The fixed-size frame header, read and written in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Header {
    pub magic: u32,
    pub version: u8,
    pub op: u8,
    pub flags: u16,
    pub body_len: u32,
    pub raw_len: u32,
    pub request_id: u64,
    pub clock: u64,
    pub start: u64,
    pub table: u32,
    pub worker: u32,
    pub count: u32,
    pub dim: u32,
    pub status: u16,
    pub reserved: u16,
    pub header_crc: u32,
}

/// Request operations. Replies carry the same value with [`REPLY_BIT`] set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Hello = 1,
    Catalog = 2,
    CreateTable = 3,
    Status = 4,
    /// Has every shard take a checkpoint now (`tessera checkpoint`).
    Checkpoint = 5,
    /// Answered at once with an empty reply, touching no table: the transport's round trip
    /// alone, on the data path (RDMA slots included). `tessera bench` measures it beside pushes.
    Ping = 6,
    /// The client's half of the handshake with a server that has a cluster secret: the body
    /// is its proof (see [`crate::auth`]).
    Auth = 7,
    Push = 10,
    PushRange = 11,
    Pull = 12,
    PullRange = 13,
    /// Sets up an RDMA queue pair for a TCP data connection (see the `rdma` module).
    RdmaConnect = 20,
    /// Asks, on the TCP connection of an RDMA link, where a dense table part lives so the worker
    /// can read it directly; registers it for that worker (see the `rdma` module).
    RdmaExpose = 21,
    /// Chain replication between servers, and heartbeats to the coordinator: the body is one
    /// protocol message (`tessera_replication::codec`), `worker` the sending server's node id.
    Replicate = 30,
    /// A worker's pushes to ranges a replicated server's shard heads (the body is a batch of
    /// `Push` messages), or with an empty body a poll; the reply carries the worker's
    /// acknowledgements. `worker` is the worker id, and `start` the sending client's
    /// incarnation (random, fixed for the client's life; 0 for none): a shard refuses pushes
    /// from a client that another one with the same worker id has succeeded
    /// ([`Status::WorkerIdInUse`]).
    WorkerPush = 31,
    /// The cluster's replication settings and configuration, as JSON.
    ClusterConfig = 32,
    /// To a coordinator: drain the server whose address (or decimal node id) is the body; its
    /// ranges move to other servers, then it leaves the configuration.
    Drain = 33,
}

impl Op {
    /// Every op, so that decoding cannot drift from the enum.
    pub const ALL: [Op; 17] = [
        Op::Hello,
        Op::Catalog,
        Op::CreateTable,
        Op::Status,
        Op::Checkpoint,
        Op::Ping,
        Op::Auth,
        Op::Push,
        Op::PushRange,
        Op::Pull,
        Op::PullRange,
        Op::RdmaConnect,
        Op::RdmaExpose,
        Op::Replicate,
        Op::WorkerPush,
        Op::ClusterConfig,
        Op::Drain,
    ];

    /// Decodes the low seven bits of `op`.
    pub fn from_u8(op: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|o| *o as u8 == op & !REPLY_BIT)
    }

    /// True for the ops a shard serves over its data path (RDMA slots included): pushes, pulls
    /// and pings, and, on replicated servers, peers' messages and workers' chain pushes.
    pub fn is_data(self) -> bool {
        matches!(self, Op::Ping | Op::Push | Op::PushRange | Op::Pull | Op::PullRange | Op::Replicate | Op::WorkerPush)
    }
}

/// Why a request failed, as carried in a reply's `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    Malformed = 1,
    FrameTooLarge = 2,
    UnknownTable = 3,
    KeyOutOfRange = 4,
    ValuesLength = 5,
    NonFinite = 6,
    WrongDim = 7,
    NotOwned = 8,
    Full = 9,
    BadRequest = 10,
    Internal = 11,
    ShuttingDown = 12,
    Unsupported = 13,
    /// The server's log failed: a held push acknowledgement turned into this error (the push
    /// was applied in memory, but is not on disk), or a push refused outright.
    NotDurable = 14,
    /// A request named a cached key list (`flags::KEYS_CACHED`) that the shard does not hold;
    /// nothing was applied, and the worker sends it again with its keys.
    KeysUnknown = 15,
    /// A hello to a server with a cluster secret: the body is the server's challenge (see
    /// [`crate::auth`]). Not an error; the client answers with [`Op::Auth`].
    AuthChallenge = 16,
    /// The peer did not prove it holds the cluster's secret; the connection is closed.
    Unauthenticated = 17,
    /// A replicated push whose acknowledgement the head held and let go: its chain did not
    /// carry it to the tail in time (a member may have failed). Nothing is lost; the worker
    /// sends it again, and a push applied already is acknowledged, not applied twice.
    Unacknowledged = 18,
    /// A push from a client whose worker id another client has taken since (two live clients
    /// with one worker id, whose pushes would be numbered over each other): refused, never
    /// applied. Every worker needs an id of its own.
    WorkerIdInUse = 19,
}

impl Status {
    /// Whether a refusal with this status is for good: the request can never succeed as sent
    /// (a refused push is taken back, never applied; a refused pull fails at once). Other
    /// refusals (a held acknowledgement that timed out, a server shutting down) are retried.
    pub fn never_applies(self) -> bool {
        use Status::*;
        matches!(
            self,
            Malformed | FrameTooLarge | UnknownTable | KeyOutOfRange | ValuesLength | NonFinite | WrongDim | Full | BadRequest | Unsupported | WorkerIdInUse
        )
    }

    /// Decodes a status; unknown codes read as `Internal` so that newer servers stay intelligible.
    pub fn from_u16(code: u16) -> Status {
        use Status::*;
        [Ok, Malformed, FrameTooLarge, UnknownTable, KeyOutOfRange, ValuesLength, NonFinite, WrongDim, NotOwned, Full]
            .into_iter()
            .chain([BadRequest, Internal, ShuttingDown, Unsupported, NotDurable, KeysUnknown, AuthChallenge, Unauthenticated, Unacknowledged, WorkerIdInUse])
            .find(|s| *s as u16 == code)
            .unwrap_or(Internal)
    }
}

impl Header {
    /// A request header for `op`; the caller fills the op-specific fields.
    pub fn request(op: Op, request_id: u64) -> Header {
        Header { magic: MAGIC, version: VERSION, op: op as u8, request_id, ..Header::default() }
    }

    /// The reply header to `request`, echoing its id, table and dim.
    pub fn reply_to(request: &Header, status: Status) -> Header {
        Header {
            magic: MAGIC,
            version: VERSION,
            op: request.op | REPLY_BIT,
            request_id: request.request_id,
            table: request.table,
            dim: request.dim,
            status: status as u16,
            ..Header::default()
        }
    }

    /// The op, if known.
    pub fn op(&self) -> Option<Op> {
        Op::from_u8(self.op)
    }

    /// True when this header is a reply.
    pub fn is_reply(&self) -> bool {
        self.op & REPLY_BIT != 0
    }

    /// The reply status.
    pub fn status(&self) -> Status {
        Status::from_u16(self.status)
    }

    /// Bytes this frame occupies on the wire: header, body and padding.
    pub fn frame_len(&self) -> usize {
        HEADER_BYTES + padded(self.body_len as usize)
    }

    /// Fills in the checksum; call last, after every other field is set.
    pub fn seal(&mut self) {
        self.header_crc = crc32c::crc32c(&self.as_bytes()[..HEADER_BYTES - 4]);
    }

    /// Reads and checks a header from the start of `bytes` (which must hold [`HEADER_BYTES`]).
    /// The limit applies to the whole frame, so an oversized frame is refused before its body is read.
    pub fn decode(bytes: &[u8], frame_bytes_max: usize) -> Result<Header> {
        let (header, _) = Header::read_from_prefix(bytes).map_err(|_| malformed(format!("short header: {} of {HEADER_BYTES} bytes", bytes.len())))?;
        if header.magic != MAGIC {
            return Err(malformed(format!("bad magic {:#010x} (is this a Tessera peer?)", header.magic)));
        }
        let crc = crc32c::crc32c(&bytes[..HEADER_BYTES - 4]);
        if crc != header.header_crc {
            return Err(malformed(format!("header checksum {:#010x}, computed {crc:#010x}", header.header_crc)));
        }
        if header.version != VERSION {
            return Err(malformed(format!("protocol version {}, this build speaks {VERSION}", header.version)));
        }
        if header.op().is_none() {
            return Err(malformed(format!("unknown op {}", header.op)));
        }
        if header.flags & !flags::KNOWN != 0 {
            return Err(malformed(format!("unknown flags {:#x}", header.flags & !flags::KNOWN)));
        }
        if header.flags & flags::COMPRESSED == 0 && header.raw_len != header.body_len {
            return Err(malformed(format!("raw_len {} != body_len {} in an uncompressed frame", header.raw_len, header.body_len)));
        }
        let raw_max = frame_bytes_max.saturating_sub(HEADER_BYTES);
        if header.frame_len() > frame_bytes_max || header.raw_len as usize > raw_max {
            let bytes = header.frame_len().max(HEADER_BYTES + header.raw_len as usize);
            return Err(TransportError::FrameTooLarge { bytes, limit: frame_bytes_max });
        }
        Ok(header)
    }
}

/// Bytes in a [`ShortHeader`].
pub const SHORT_HEADER_BYTES: usize = 32;

const _: () = assert!(std::mem::size_of::<ShortHeader>() == SHORT_HEADER_BYTES);
const _: () = assert!(SHORT_HEADER_BYTES.is_multiple_of(FRAME_ALIGN));

/// The header of a small frame on RDMA, where the immediate data says which kind of header a
/// slot holds (see the `rdma` module):
///
/// ```text
///  0 op u8   1 flags u8   2 status u16   4 body_len u16   6 dim u16
///  8 table u32           12 count u32
/// 16 worker u32          20 clock u32   24 start u64
/// ```
///
/// It stands for exactly one [`Header`]: a header shortens only if every field fits, and it is
/// never compressed. What it leaves out is implied: magic and version were checked when the
/// connection was set up, the link remembers each slot's request id, and RDMA's own checksum
/// (the ICRC) covers the bytes that a header checksum covers on TCP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ShortHeader {
    pub op: u8,
    pub flags: u8,
    pub status: u16,
    pub body_len: u16,
    pub dim: u16,
    pub table: u32,
    pub count: u32,
    pub worker: u32,
    pub clock: u32,
    pub start: u64,
}

impl ShortHeader {
    /// The short form of `h` (all but its request id), or `None` when a field does not fit or
    /// the body is compressed.
    pub fn shorten(h: &Header) -> Option<ShortHeader> {
        let plain = h.flags & flags::COMPRESSED == 0 && h.raw_len == h.body_len && h.reserved == 0;
        let flags = u8::try_from(h.flags).ok().filter(|_| plain)?;
        Some(ShortHeader {
            op: h.op,
            flags,
            status: h.status,
            body_len: u16::try_from(h.body_len).ok()?,
            dim: u16::try_from(h.dim).ok()?,
            table: h.table,
            count: h.count,
            worker: h.worker,
            clock: u32::try_from(h.clock).ok()?,
            start: h.start,
        })
    }

    /// Bytes this frame occupies: header, body and padding.
    pub fn frame_len(&self) -> usize {
        SHORT_HEADER_BYTES + padded(self.body_len as usize)
    }

    /// Reads a short header from the start of `bytes` and checks it as [`Header::decode`] does;
    /// returns the full header it stands for, with `request_id`, unsealed.
    pub fn expand(bytes: &[u8], request_id: u64, frame_bytes_max: usize) -> Result<Header> {
        let (s, _) = ShortHeader::read_from_prefix(bytes).map_err(|_| malformed(format!("short header: {} of {SHORT_HEADER_BYTES} bytes", bytes.len())))?;
        if Op::from_u8(s.op).is_none() {
            return Err(malformed(format!("unknown op {}", s.op)));
        }
        // A short frame travels over RDMA, where every request is answered.
        let known = flags::KNOWN & !(flags::COMPRESSED | flags::NO_REPLY);
        if u16::from(s.flags) & !known != 0 {
            return Err(malformed(format!("flags {:#x} in a short frame", s.flags)));
        }
        if s.frame_len() > frame_bytes_max {
            return Err(TransportError::FrameTooLarge { bytes: s.frame_len(), limit: frame_bytes_max });
        }
        Ok(Header {
            magic: MAGIC,
            version: VERSION,
            op: s.op,
            flags: s.flags.into(),
            body_len: s.body_len.into(),
            raw_len: s.body_len.into(),
            request_id,
            clock: s.clock.into(),
            start: s.start,
            table: s.table,
            worker: s.worker,
            count: s.count,
            dim: s.dim.into(),
            status: s.status,
            reserved: 0,
            header_crc: 0,
        })
    }
}

impl Header {
    /// Reads a header this process wrote itself, without checks.
    pub(crate) fn decode_unchecked(bytes: &[u8]) -> Header {
        Header::read_from_bytes(bytes).expect("a whole header")
    }
}

/// Rounds a body length up to the frame alignment.
pub fn padded(len: usize) -> usize {
    len.next_multiple_of(FRAME_ALIGN)
}

/// Which 8-byte word of a header holds its body length: word 0 of a [`ShortHeader`], word 1 of
/// a [`Header`]. A reader that polls a slot while a frame may still be landing in it reads that
/// one word to learn where the frame would end (see [`declared_frame_len`]).
pub const fn body_len_word(short: bool) -> usize {
    if short {
        0
    } else {
        1
    }
}
const _: () = assert!(
    std::mem::offset_of!(ShortHeader, body_len) == 4 && std::mem::offset_of!(Header, body_len) == 8,
    "declared_frame_len reads body_len from these bytes of its word"
);

/// The frame length declared by `word`, the little-endian header word [`body_len_word`] names.
/// The word may be half written: the result is a guess that something else (an RDMA slot's
/// arrival tag) must confirm.
pub fn declared_frame_len(word: u64, short: bool) -> usize {
    if short {
        SHORT_HEADER_BYTES + padded((word >> 32) as u16 as usize)
    } else {
        HEADER_BYTES + padded(word as u32 as usize)
    }
}

fn malformed(reason: String) -> TransportError {
    TransportError::Malformed { reason }
}

/// Views `bytes` as `T`s, failing (not panicking) on a length or alignment mismatch.
pub fn cast_slice<'a, T: bytemuck::Pod>(bytes: &'a [u8], what: &str) -> Result<&'a [T]> {
    bytemuck::try_cast_slice(bytes).map_err(|e| malformed(format!("{what}: {e:?} ({} bytes)", bytes.len())))
}

/// Splits a body into `keys` u64 keys followed by f32 values, checked.
pub fn keys_and_values(body: &[u8], keys: usize) -> Result<(&[u64], &[f32])> {
    let (k, v) = keys_and_rest(body, keys)?;
    Ok((k, cast_slice(v, "values")?))
}

/// Splits a body into its `keys` leading keys and the bytes after them.
pub fn keys_and_rest(body: &[u8], keys: usize) -> Result<(&[u64], &[u8])> {
    let key_bytes = keys
        .checked_mul(8)
        .filter(|b| *b <= body.len())
        .ok_or_else(|| malformed(format!("{keys} keys need {} bytes, the body has {}", keys.saturating_mul(8), body.len())))?;
    let (k, rest) = body.split_at(key_bytes);
    Ok((cast_slice(k, "keys")?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(op: Op) -> Header {
        let mut h = Header::request(op, 7);
        h.body_len = 24;
        h.raw_len = 24;
        h.seal();
        h
    }

    #[test]
    fn round_trip() {
        let h = sealed(Op::Push);
        let back = Header::decode(h.as_bytes(), 1 << 20).unwrap();
        assert_eq!(h, back);
        assert_eq!(back.frame_len(), 64 + 24);
    }

    #[test]
    fn every_corruption_is_refused() {
        let h = sealed(Op::Pull);
        for byte in 0..HEADER_BYTES {
            let mut bytes = h.as_bytes().to_vec();
            bytes[byte] ^= 0x10;
            assert!(Header::decode(&bytes, 1 << 20).is_err(), "flip in byte {byte} went unnoticed");
        }
        assert!(Header::decode(&h.as_bytes()[..40], 1 << 20).is_err());
    }

    #[test]
    fn oversize_is_refused_before_the_body() {
        let mut h = sealed(Op::Push);
        h.body_len = 1 << 20;
        h.raw_len = 1 << 20;
        h.seal();
        match Header::decode(h.as_bytes(), 64 << 10) {
            Err(TransportError::FrameTooLarge { limit, .. }) => assert_eq!(limit, 64 << 10),
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        // A compressed frame whose decompressed size would exceed the limit is refused as well.
        h.body_len = 100;
        h.raw_len = 1 << 20;
        h.flags = flags::COMPRESSED;
        h.seal();
        assert!(matches!(Header::decode(h.as_bytes(), 64 << 10), Err(TransportError::FrameTooLarge { .. })));
    }

    #[test]
    fn unknown_op_flags_and_version_are_refused() {
        for edit in [|h: &mut Header| h.op = 99, |h: &mut Header| h.flags = 0x100, |h: &mut Header| h.version = 9] {
            let mut h = sealed(Op::Push);
            edit(&mut h);
            h.seal();
            assert!(matches!(Header::decode(h.as_bytes(), 1 << 20), Err(TransportError::Malformed { .. })));
        }
    }

    #[test]
    fn short_headers_stand_for_exactly_one_header() {
        let mut h = Header::request(Op::PushRange, 42);
        (h.flags, h.body_len, h.raw_len, h.dim, h.table, h.count) = (flags::COMPRESS_REPLY, 24, 24, 3, 7, 2);
        (h.worker, h.clock, h.start, h.status) = (5, u32::MAX as u64, u64::MAX - 1, 0);
        let s = ShortHeader::shorten(&h).expect("fits");
        let back = ShortHeader::expand(s.as_bytes(), 42, 1 << 20).unwrap();
        assert_eq!(back, h, "nothing but the checksum is lost");
        assert_eq!(s.frame_len(), 32 + 24);
        // Every field that does not fit, and compression, keep the long header.
        for edit in [
            |h: &mut Header| h.clock = 1 << 32,
            |h: &mut Header| h.dim = 1 << 16,
            |h: &mut Header| (h.body_len, h.raw_len) = (1 << 16, 1 << 16),
            |h: &mut Header| h.flags |= flags::COMPRESSED,
            |h: &mut Header| h.raw_len = 99,
        ] {
            let mut e = h;
            edit(&mut e);
            assert_eq!(ShortHeader::shorten(&e), None, "{e:?}");
        }
    }

    #[test]
    fn bad_short_headers_are_refused() {
        let h = Header { op: Op::Push as u8, body_len: 64, raw_len: 64, ..Header::request(Op::Push, 1) };
        let good = ShortHeader::shorten(&h).unwrap();
        for edit in [|s: &mut ShortHeader| s.op = 99, |s: &mut ShortHeader| s.flags = flags::COMPRESSED as u8, |s: &mut ShortHeader| s.flags = 0x80] {
            let mut s = good;
            edit(&mut s);
            assert!(matches!(ShortHeader::expand(s.as_bytes(), 1, 1 << 20), Err(TransportError::Malformed { .. })));
        }
        assert!(matches!(ShortHeader::expand(good.as_bytes(), 1, 64), Err(TransportError::FrameTooLarge { .. })));
        assert!(ShortHeader::expand(&good.as_bytes()[..31], 1, 1 << 20).is_err());
    }

    #[test]
    fn keys_and_values_checks_lengths() {
        let body: Vec<u64> = vec![1, 2, 0x3f80_0000_3f80_0000];
        let bytes: &[u8] = bytemuck::cast_slice(&body);
        let (k, v) = keys_and_values(bytes, 2).unwrap();
        assert_eq!(k, &[1, 2]);
        assert_eq!(v, &[1.0, 1.0]);
        assert!(keys_and_values(bytes, 4).is_err());
        assert!(keys_and_values(&bytes[..23], 2).is_err());
    }

    #[test]
    fn op_codes_round_trip() {
        for op in Op::ALL {
            assert_eq!(Op::from_u8(op as u8), Some(op));
            assert_eq!(Op::from_u8(op as u8 | REPLY_BIT), Some(op));
        }
        assert_eq!(Op::from_u8(0), None);
    }

    #[test]
    fn status_codes_round_trip() {
        for code in 0..=19 {
            assert_eq!(Status::from_u16(code) as u16, code);
        }
        assert_eq!(Status::from_u16(999), Status::Internal);
    }

    #[test]
    fn declared_frame_len_reads_the_body_length_from_one_header_word() {
        let mut long = Header::request(Op::Push, 7);
        (long.body_len, long.raw_len) = (100, 100);
        let word = |bytes: &[u8], w: usize| u64::from_le_bytes(bytes[8 * w..8 * w + 8].try_into().unwrap());
        let bytes = long.as_bytes();
        assert_eq!(declared_frame_len(word(bytes, body_len_word(false)), false), long.frame_len());
        let short = ShortHeader::shorten(&long).unwrap();
        let bytes = short.as_bytes();
        assert_eq!(declared_frame_len(word(bytes, body_len_word(true)), true), short.frame_len());
    }
}
