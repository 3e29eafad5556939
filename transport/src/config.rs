//! Every transport knob, with its default, its unit in its name, and its validation.

use crate::auth::ClusterSecret;
use crate::error::{Result, TransportError};
use crate::wire::HEADER_BYTES;

/// Default largest frame a peer may send: a 4 MiB dense push plus headroom, times 16.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 64 << 20;
/// The smallest frame limit that still carries a useful request.
pub const FRAME_BYTES_MAX_MIN: usize = 4 << 10;
/// Hard ceiling on any configured frame limit: the header's length fields are u32.
pub const FRAME_BYTES_MAX_CEILING: usize = (u32::MAX as usize) & !7;
const _: () = assert!(FRAME_BYTES_MAX_DEFAULT.is_multiple_of(8), "frames are padded to 8 bytes");
const _: () = assert!(FRAME_BYTES_MAX_MIN > HEADER_BYTES * 4);
/// Largest listen backlog: Linux keeps it in 16 bits.
pub const LISTEN_BACKLOG_MAX: u32 = 65_535;
/// Largest frame a TCP link defers ([`TcpLink::defer`](crate::tcp::TcpLink::defer)), and the
/// most it holds deferred: a larger frame goes at once, since copying it costs more than the
/// write it would save.
pub const DEFERRED_BYTES_MAX: usize = 64 << 10;
/// Fewest body bytes a server's connection lends a request's frame buffer to its service
/// ([`Request::shared`](crate::Request::shared)) rather than have it copy what it keeps; reads of
/// a frame this large end where the frame does, so that lending it moves no later frame's bytes.
pub const SHARED_BODY_BYTES_MIN: usize = 64 << 10;
/// A body is lent only while its read buffer is at most this many times its size: a lent body
/// keeps the whole buffer from reuse, so this bounds the memory a held body costs per byte.
pub const LENT_BUFFER_PER_BODY_MAX: usize = 4;
/// Most lent read buffers a connection watches for their return, to read into again.
pub const LENT_BUFFERS_MAX: usize = 64;
/// Most "closing connection" and refusal lines an endpoint logs in one second; the rest are
/// counted, and the count is logged when lines resume, so a storm of bad peers cannot flood
/// the log.
pub const WARN_LINES_PER_S_MAX: u32 = 10;

/// Knobs for one endpoint (server side) or link (client side).
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Largest frame (header plus body, after compression) either side accepts.
    pub frame_bytes_max: usize,
    /// A connection stops reading new requests while this many reply bytes wait to be sent:
    /// what one client connection may have in flight at the server.
    pub reply_backlog_bytes_max: usize,
    /// A connection whose peer has read none of its waiting replies for this long (while its
    /// backlog is full) is closed.
    pub stall_timeout_ms: u64,
    /// Most connections a server holds open, over its control plane and all its shards; more
    /// are refused with a message that names the limit.
    pub connections_max: usize,
    /// Bytes read from a socket per call; the read buffer starts at this size.
    pub read_chunk_bytes: usize,
    /// Most frames a server connection serves before yielding to its neighbours (fairness).
    pub frames_per_turn_max: usize,
    /// How long a new connection may take to say hello before it is dropped.
    pub hello_timeout_ms: u64,
    /// Bodies smaller than this are never compressed (the header alone would dominate).
    pub compress_bytes_min: usize,
    /// How long a client waits for a socket or a reply before giving up.
    pub io_timeout_ms: u64,
    /// A served connection that sends nothing and has no reply waiting for this long is closed;
    /// 0 never closes one. The default is minutes, not seconds: a worker may compute for a long
    /// time between pushes, and a client holds its control connection for its whole run (a
    /// closed one fails its next call with a clear error, and reconnecting is the client's
    /// business). A connection that set up an RDMA queue pair is never closed for idleness:
    /// its traffic goes over verbs, and the TCP connection's lifetime holds the queue pair.
    pub idle_timeout_ms: u64,
    /// Once the first byte of a frame arrived, the rest must follow within this many
    /// milliseconds, plus one second per [`TransportConfig::frame_bytes_per_s_min`] bytes of
    /// the frame; else the connection is closed. Bounds what a peer trickling bytes can hold.
    pub frame_timeout_ms: u64,
    /// The slowest rate a large frame may arrive at (see [`TransportConfig::frame_timeout_ms`]).
    pub frame_bytes_per_s_min: usize,
    /// Most connections open at once from one peer address; more are refused with a message
    /// that names the limit. A worker holds one connection per shard of each server plus one
    /// to its control plane, so at the default a host can run about 60 workers against a
    /// 16-shard server; a test or a demo that runs every worker on loopback counts them all
    /// against 127.0.0.1.
    pub connections_per_peer_max: usize,
    /// Connections the kernel queues for a server before it accepts them (the `listen`
    /// backlog). Linux caps it at `net.core.somaxconn` without saying so; the server logs when
    /// it asks for more.
    pub listen_backlog: u32,
    /// The cluster's shared secret. A server with one serves only peers that prove they hold
    /// it; a client with one talks only to servers that prove the same (see [`crate::auth`]).
    pub cluster_secret: Option<ClusterSecret>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            reply_backlog_bytes_max: 8 << 20,
            stall_timeout_ms: 30_000,
            connections_max: 4096,
            read_chunk_bytes: 256 << 10,
            frames_per_turn_max: 64,
            hello_timeout_ms: 5_000,
            compress_bytes_min: 512,
            io_timeout_ms: 30_000,
            idle_timeout_ms: 600_000,
            frame_timeout_ms: 5_000,
            frame_bytes_per_s_min: 1 << 20,
            connections_per_peer_max: 1024,
            listen_backlog: 4096,
            cluster_secret: None,
        }
    }
}

impl TransportConfig {
    /// Checks every field; an error names the field and the accepted range.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, value: usize, reason: &str| Err(TransportError::BadConfig { field, value: value.to_string(), reason: reason.to_string() });
        if !(FRAME_BYTES_MAX_MIN..=FRAME_BYTES_MAX_CEILING).contains(&self.frame_bytes_max) {
            return bad("frame_bytes_max", self.frame_bytes_max, "must be between 4 KiB and 4 GiB");
        }
        if self.reply_backlog_bytes_max < HEADER_BYTES {
            return bad("reply_backlog_bytes_max", self.reply_backlog_bytes_max, "must hold a header");
        }
        if !(4096..=64 << 20).contains(&self.read_chunk_bytes) {
            return bad("read_chunk_bytes", self.read_chunk_bytes, "must be between 4 KiB and 64 MiB");
        }
        if self.connections_max == 0 {
            return bad("connections_max", 0, "must be at least 1");
        }
        if self.stall_timeout_ms == 0 {
            return bad("stall_timeout_ms", 0, "must be at least 1");
        }
        if self.frames_per_turn_max == 0 {
            return bad("frames_per_turn_max", 0, "must be at least 1");
        }
        if self.frame_timeout_ms == 0 {
            return bad("frame_timeout_ms", 0, "must be at least 1");
        }
        if self.frame_bytes_per_s_min < 1024 {
            return bad("frame_bytes_per_s_min", self.frame_bytes_per_s_min, "must be at least 1024");
        }
        if self.connections_per_peer_max == 0 {
            return bad("connections_per_peer_max", 0, "must be at least 1");
        }
        if !(1..=LISTEN_BACKLOG_MAX).contains(&self.listen_backlog) {
            return bad("listen_backlog", self.listen_backlog as usize, "must be between 1 and 65535");
        }
        Ok(())
    }

    /// How long a frame of `frame_bytes` may take to arrive once its first byte came.
    pub fn frame_deadline(&self, frame_bytes: usize) -> std::time::Duration {
        let slow_ms = (frame_bytes as u64).saturating_mul(1000) / self.frame_bytes_per_s_min as u64;
        std::time::Duration::from_millis(self.frame_timeout_ms.saturating_add(slow_ms))
    }
}

/// Most slots an RDMA ring may have.
pub const SLOTS_MAX: u32 = 256;
/// Smallest RDMA slot: it must hold an error reply and a useful request.
pub const SLOT_BYTES_MIN: usize = 8 << 10;
const _: () = assert!(SLOT_BYTES_MIN.is_multiple_of(4096), "slots are page multiples, so registration splits stay page-aligned");

/// RDMA knobs. They exist in every build; only a build with the `rdma` feature can use them.
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// Device name (e.g. `mlx5_0`, `rxe0`); default: `$RDMA_DEV`, else the first device.
    pub device: Option<String>,
    /// GID index (RoCEv2 over IPv4 is usually 1 on rxe, 3 on ConnectX); default: `$RDMA_GID_INDEX`, else 1.
    pub gid_index: Option<u8>,
    /// Register memory in regions of at most this many bytes (default: the device's `max_mr_size`).
    pub mr_bytes_max: Option<u64>,
    /// Request (and reply) slots per worker and shard: the most requests a worker has in flight
    /// to one shard.
    pub slots: u32,
    /// Bytes per slot: the largest frame over RDMA. Larger calls are split by the client.
    pub slot_bytes: usize,
    /// How long a poller spins (on its slots and its completion queue) before it sleeps on the
    /// completion channel.
    pub spin_us: u64,
    /// How this side learns that a frame landed in one of its slots.
    pub arrival: Arrival,
}

/// How a receiver (a shard for requests, a worker for replies) learns that a frame landed in one
/// of its RDMA slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arrival {
    /// By the arrival tag after the frame, read from memory; completions are taken after the
    /// frame was served (the default). Relies on a write landing in address order, as
    /// perftest's latency tests do.
    #[default]
    Memory,
    /// By each write's completion, taken before the frame is served: for a device that may
    /// place a write's bytes out of order.
    Completion,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self { device: None, gid_index: None, mr_bytes_max: None, slots: 16, slot_bytes: 256 << 10, spin_us: 50, arrival: Arrival::default() }
    }
}

impl RdmaConfig {
    /// Checks every field; an error names the field and what it accepts.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, value: String, reason: &str| Err(TransportError::BadConfig { field, value, reason: reason.into() });
        if self.slots == 0 || self.slots > SLOTS_MAX {
            return bad("rdma_slots", self.slots.to_string(), "must be between 1 and 256");
        }
        if self.slot_bytes < SLOT_BYTES_MIN || !self.slot_bytes.is_multiple_of(4096) || self.slot_bytes > 64 << 20 {
            return bad("rdma_slot_bytes", self.slot_bytes.to_string(), "must be a multiple of 4096 from 8 KiB to 64 MiB");
        }
        if self.mr_bytes_max.is_some_and(|m| m < 4096) {
            return bad("rdma_mr_bytes_max", format!("{:?}", self.mr_bytes_max), "must be at least 4096");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_each_connection_limit_is_checked() {
        TransportConfig::default().validate().expect("the defaults");
        type Break = fn(&mut TransportConfig);
        let cases: [(&str, Break); 5] = [
            ("frame_timeout_ms", |c| c.frame_timeout_ms = 0),
            ("frame_bytes_per_s_min", |c| c.frame_bytes_per_s_min = 10),
            ("connections_per_peer_max", |c| c.connections_per_peer_max = 0),
            ("listen_backlog", |c| c.listen_backlog = 0),
            ("listen_backlog", |c| c.listen_backlog = LISTEN_BACKLOG_MAX + 1),
        ];
        for (field, break_it) in cases {
            let mut cfg = TransportConfig::default();
            break_it(&mut cfg);
            let err = cfg.validate().expect_err(field).to_string();
            assert!(err.contains(field), "{err}");
        }
        let off = TransportConfig { idle_timeout_ms: 0, ..TransportConfig::default() };
        off.validate().expect("an idle timeout of 0 turns it off");
    }

    #[test]
    fn a_large_frame_gets_longer_to_arrive() {
        let cfg = TransportConfig { frame_timeout_ms: 2_000, frame_bytes_per_s_min: 1 << 20, ..TransportConfig::default() };
        assert_eq!(cfg.frame_deadline(64).as_millis(), 2_000);
        assert_eq!(cfg.frame_deadline(64 << 20).as_millis(), 2_000 + 64_000);
    }
}
