//! RDMA verbs: the transport seam's second implementation.
//!
//! A worker's link to a shard keeps its TCP connection for set-up and liveness, and moves every
//! request and reply over an RC queue pair:
//!
//! - **Push slots.** The shard registers, for this worker alone, a ring of `slots` request slots
//!   of `slot_bytes` each, in a protection domain of the worker's own with its queue pair. The
//!   worker RDMA-WRITEs a request frame into its next slot, with immediate data naming the slot.
//!   A frame is the same 64-byte header and body as on TCP, or, when it is small enough to be
//!   posted inline and its fields fit, a 32-byte [`ShortHeader`](crate::wire::ShortHeader) and
//!   the body; [`SHORT_FRAME`] in the immediate data tells the two apart. A short frame goes
//!   to the slot's compact area rather than its start ([`SlotLayout`]), so that small requests
//!   and replies share one page instead of striding through the ring. It can write nowhere else: a key of another
//!   worker's ring, a stale key from an earlier connection, or a made-up one is refused by the
//!   device as a remote access error, and the shard releases that worker.
//! - **Arrival.** Every frame written into a slot is followed by an 8-byte arrival tag
//!   (`arrival::Tags`). The shard's loop, on its own core, polls each worker's next slot for its tag,
//!   serves what has landed, and takes the writes' completions afterwards (they post receives
//!   again, carry errors, and find frames whose tag never showed). With
//!   [`Arrival::Completion`](crate::config::Arrival) it takes each completion first instead.
//! - **Serving.** The shard hands the frame to the same [`Service`](crate::Service) as TCP: the
//!   updater aggregates it in place, the range's vector clock is stamped, and the reply is written
//!   into a registered staging slot.
//! - **Replies and credits.** The shard RDMA-WRITEs the reply, with its own arrival tag, into the
//!   worker's reply slot of the same index, with immediate data; the worker finds it the same
//!   way. A reply both acknowledges the request and returns its slot's credit: a worker never has
//!   more than `slots` requests outstanding, so it never overwrites a slot the shard has not
//!   consumed.
//! - **Lifetime.** When the TCP connection closes (a worker that exits or dies mid-push), the
//!   shard destroys the queue pair and frees both rings.
//!
//! - **Dense pulls.** A shard registers each dense table part's blocks
//!   ([`expose`](crate::expose)) read-only in a worker's protection domain the first time that
//!   worker asks ([`Op::RdmaExpose`](crate::Op) on its TCP connection). The worker then
//!   RDMA-READs the blocks straight from the shard's memory, with no shard CPU, checks each
//!   block's two version words, and reads a torn block again.
//!
//! Set-up: after its hello, the worker sends [`Op::RdmaConnect`](crate::Op) on its TCP data
//! connection with its queue pair's number, PSN and GID, its reply slots' addresses and keys, and
//! the salt of the tags it expects; the shard answers with the same for its request slots.
//!
//! `unsafe` is allowed here and in no other module of the crate: posting a work request hands
//! the device a buffer it reads or writes asynchronously, and every post says why that buffer
//! outlives the completion.

#![allow(unsafe_code)]

mod arrival;
mod link;
mod shard;
pub mod verbs;

pub use crate::config::RdmaConfig;
pub use link::RdmaLink;
pub use shard::RdmaShard;

use std::time::{Duration, Instant};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{Result, TransportError};
use verbs::QpInfo;

use crate::config::{SLOTS_MAX, SLOT_BYTES_MIN};

/// Empty polls between two clock reads while a poller spins. Polling a completion queue reads
/// memory; reading the clock is a system call where the kernel has no stable TSC (an emulated
/// guest falls back to HPET, about 1 us a read), so a spinner looks at the time only this often.
const POLLS_PER_CLOCK_READ: u32 = 64;

/// Set in a write's immediate data, beside the slot index, when the slot holds a short frame.
/// A short frame lies in the slot's compact area ([`SlotLayout`]), not at the slot's start.
pub const SHORT_FRAME: u32 = 1 << 31;
const _: () = assert!(SLOTS_MAX < SHORT_FRAME, "slot indexes leave the flag bit free");

/// Bytes of a slot's compact area: the most a short (inline) frame and its arrival tag take.
pub const SMALL_SLOT_BYTES: usize = verbs::INLINE_BYTES_MAX;

/// Bytes of the arrival tag that follows every frame written into a slot (see `arrival::Tags`).
pub const TAG_BYTES: usize = 8;

const _: () = assert!(
    verbs::PAGE_BYTES.is_multiple_of(SMALL_SLOT_BYTES) && SMALL_SLOT_BYTES.is_multiple_of(8),
    "compact areas tile pages (so none straddles a registration chunk) and keep frames 8-byte aligned"
);

/// Where slot `i`'s bytes lie in a per-link region (a shard's request ring and reply staging, a
/// worker's request staging and reply inbox): a full slot of `slot_bytes` at `i * slot_bytes`
/// for frames of any size, and, after all of those, a compact area of [`SMALL_SLOT_BYTES`] at
/// `slots * slot_bytes + i * SMALL_SLOT_BYTES` for short frames.
///
/// Why two: most requests and replies are small, and with full slots alone consecutive ones land
/// `slot_bytes` (256 KiB by default) apart, a power-of-two stride that maps every slot's first
/// page to the same few sets of a set-indexed TLB or cache. QEMU's software TLB is direct-mapped,
/// so in the SoftRoCE guest 16 slots 256 KiB apart shared 4 of its entries; in A/B runs there,
/// 8 KiB slots beat 256 KiB ones at 8 B in 8 of 9 paired rounds. The compact areas of all slots
/// share one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotLayout {
    pub slots: usize,
    pub slot_bytes: usize,
}

impl SlotLayout {
    pub fn new(slots: u32, slot_bytes: usize) -> Self {
        Self { slots: slots as usize, slot_bytes }
    }

    /// Bytes of the region: the full slots, then the compact areas rounded up to a page.
    pub fn region_bytes(&self) -> usize {
        self.slots * self.slot_bytes + (self.slots * SMALL_SLOT_BYTES).next_multiple_of(verbs::PAGE_BYTES)
    }

    /// The largest frame slot areas of one kind hold: the area less the arrival tag.
    pub fn frame_room(&self, short: bool) -> usize {
        self.area(0, short).1 - TAG_BYTES
    }

    /// Offset and capacity of slot `slot`'s full area (`short == false`) or compact area.
    pub fn area(&self, slot: usize, short: bool) -> (usize, usize) {
        debug_assert!(slot < self.slots);
        if short {
            (self.slots * self.slot_bytes + slot * SMALL_SLOT_BYTES, SMALL_SLOT_BYTES)
        } else {
            (slot * self.slot_bytes, self.slot_bytes)
        }
    }

    /// The keys a peer addresses `region`'s full (`short == false`) or compact areas by; an area
    /// must lie inside one memory region.
    pub fn keys(&self, region: &verbs::Region, short: bool) -> Result<Vec<SlotKey>> {
        let chunks = region.remote_chunks();
        (0..self.slots)
            .map(|i| {
                let (at, len) = self.area(i, short);
                let addr = region.addr() + at as u64;
                let end = addr + len as u64;
                let chunk = chunks
                    .iter()
                    .find(|c| c.addr <= addr && end <= c.addr + c.len)
                    .ok_or_else(|| rdma(format!("a {len}-byte slot straddles two memory regions; use a slot size that divides the device's MR limit")))?;
                Ok(SlotKey { addr, rkey: chunk.rkey, reserved: 0 })
            })
            .collect()
    }
}

/// Calls `poll` until it finds work (`Ok(true)`), for at most `spin` and never past `deadline`.
/// Returns `Ok(false)` when the time ran out first.
fn spin<E>(spin: Duration, deadline: Option<Instant>, mut poll: impl FnMut() -> std::result::Result<bool, E>) -> std::result::Result<bool, E> {
    // The clock is first read after the first round of polls, so a quick completion costs none.
    let mut until = None;
    loop {
        for _ in 0..POLLS_PER_CLOCK_READ {
            if poll()? {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        let now = Instant::now();
        let end = *until.get_or_insert_with(|| deadline.map_or(now + spin, |d| d.min(now + spin)));
        if now >= end {
            return Ok(false);
        }
    }
}

impl RdmaConfig {
    /// The device part, for the verbs layer: this config's choices over the environment's.
    pub fn device_config(&self) -> std::result::Result<verbs::DeviceConfig, verbs::Unavailable> {
        let mut d = verbs::DeviceConfig::from_env()?;
        if self.device.is_some() {
            d.device.clone_from(&self.device);
        }
        if let Some(gid) = self.gid_index {
            d.gid_index = gid;
        }
        d.mr_bytes_max = self.mr_bytes_max;
        Ok(d)
    }
}

/// One slot as the peer addresses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub(crate) struct SlotKey {
    pub addr: u64,
    pub rkey: u32,
    pub reserved: u32,
}

/// The fixed part of the set-up message each side sends; `slots` [`SlotKey`]s follow it.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub(crate) struct ConnectHead {
    pub qpn: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    pub slots: u32,
    pub slot_bytes: u32,
    /// The salt of the arrival tags the peer writes to this side ([`arrival::Tags`]).
    pub tag_salt: u64,
}

/// A side's half of the set-up: its queue pair and its slots' full and compact areas.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub qp: QpInfo,
    pub slot_bytes: usize,
    pub slots: Vec<SlotKey>,
    /// One per slot, as [`SlotLayout`] places them: where short frames go.
    pub small: Vec<SlotKey>,
    /// The salt of the arrival tags the peer must write to this side.
    pub tag_salt: u64,
}

impl Endpoint {
    pub fn encode(&self) -> Vec<u8> {
        let head = ConnectHead {
            qpn: self.qp.qpn,
            psn: self.qp.psn,
            gid: self.qp.gid,
            slots: self.slots.len() as u32,
            slot_bytes: self.slot_bytes as u32,
            tag_salt: self.tag_salt,
        };
        let mut out = head.as_bytes().to_vec();
        self.slots.iter().chain(&self.small).for_each(|k| out.extend_from_slice(k.as_bytes()));
        out
    }

    /// This side's half for the region `region`, laid out as `layout`, with a fresh tag salt.
    pub fn new(qp: QpInfo, layout: SlotLayout, region: &verbs::Region) -> Result<Endpoint> {
        Ok(Endpoint {
            qp,
            slot_bytes: layout.slot_bytes,
            slots: layout.keys(region, false)?,
            small: layout.keys(region, true)?,
            tag_salt: arrival::Tags::random_salt(),
        })
    }

    /// Parses and checks a peer's half.
    pub fn decode(body: &[u8]) -> Result<Endpoint> {
        let bad = |reason: String| TransportError::Malformed { reason: format!("rdma set-up: {reason}") };
        let (head, rest) = ConnectHead::read_from_prefix(body).map_err(|_| bad(format!("{} bytes", body.len())))?;
        if head.slots == 0 || head.slots > SLOTS_MAX || (head.slot_bytes as usize) < SLOT_BYTES_MIN {
            return Err(bad(format!("{} slots of {} bytes", head.slots, head.slot_bytes)));
        }
        let key_bytes = std::mem::size_of::<SlotKey>();
        // A full and a compact area per slot.
        if rest.len() != 2 * head.slots as usize * key_bytes {
            return Err(bad(format!("{} bytes of slot keys for {} slots", rest.len(), head.slots)));
        }
        let mut keys = rest.chunks_exact(key_bytes).map(|c| SlotKey::read_from_bytes(c).expect("sized above"));
        let slots = keys.by_ref().take(head.slots as usize).collect();
        let small = keys.collect();
        Ok(Endpoint { qp: QpInfo { qpn: head.qpn, psn: head.psn, gid: head.gid }, slot_bytes: head.slot_bytes as usize, slots, small, tag_salt: head.tag_salt })
    }
}

/// Where one memory-region chunk of an exposed part lies, as the peer addresses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub(crate) struct ChunkKey {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
    pub reserved: u32,
}

/// A dense part as a worker reads it: its layout and its chunks, in address order.
#[derive(Debug, Clone)]
pub(crate) struct RemoteDense {
    pub layout: tessera_layout::DenseLayout,
    pub chunks: Vec<ChunkKey>,
}

impl RemoteDense {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.layout.as_bytes().to_vec();
        self.chunks.iter().for_each(|c| out.extend_from_slice(c.as_bytes()));
        out
    }

    /// Parses and checks a shard's answer: the chunks must tile the part's words exactly.
    pub fn decode(body: &[u8]) -> Result<RemoteDense> {
        let bad = |reason: String| TransportError::Malformed { reason: format!("rdma expose: {reason}") };
        let (layout, rest) = tessera_layout::DenseLayout::read_from_prefix(body).map_err(|_| bad(format!("{} bytes", body.len())))?;
        layout.check().map_err(|e| bad(e.to_string()))?;
        let size = std::mem::size_of::<ChunkKey>();
        if rest.is_empty() || rest.len() % size != 0 {
            return Err(bad(format!("{} bytes of chunk keys", rest.len())));
        }
        let chunks: Vec<ChunkKey> = rest.chunks_exact(size).map(|c| ChunkKey::read_from_bytes(c).expect("sized above")).collect();
        let tiled = chunks.windows(2).all(|w| w[0].addr.checked_add(w[0].len) == Some(w[1].addr));
        let total: u64 = chunks.iter().map(|c| c.len).sum();
        if !tiled || total < layout.words() * 8 {
            return Err(bad(format!("{} chunks do not cover the part's {} bytes", chunks.len(), layout.words() * 8)));
        }
        Ok(RemoteDense { layout, chunks })
    }
}

/// An RDMA failure, as the transport's error.
pub(crate) fn rdma(e: impl std::fmt::Display) -> TransportError {
    TransportError::Rdma { reason: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_areas_follow_the_full_slots_and_share_a_page() {
        let layout = SlotLayout::new(16, 256 << 10);
        assert_eq!(layout.area(3, false), (3 * (256 << 10), 256 << 10));
        let first = layout.area(0, true).0;
        assert_eq!(first, 16 * (256 << 10), "compact areas start after the last full slot");
        assert_eq!(layout.area(15, true), (first + 15 * SMALL_SLOT_BYTES, SMALL_SLOT_BYTES));
        assert_eq!(layout.region_bytes(), first + verbs::PAGE_BYTES, "16 compact areas fill one page");
        // More slots than a page holds compact areas of: the region rounds up to whole pages.
        let many = SlotLayout::new(17, 8 << 10);
        assert_eq!(many.region_bytes(), 17 * (8 << 10) + 2 * verbs::PAGE_BYTES);
        let (last, room) = many.area(16, true);
        assert!(last + room <= many.region_bytes());
    }

    fn endpoint(slots: u32) -> Endpoint {
        let key = |i: u32, base: u64| SlotKey { addr: base + u64::from(i) * 64, rkey: 7 + i, reserved: 0 };
        Endpoint {
            qp: QpInfo { qpn: 5, psn: 9, gid: [1; 16] },
            slot_bytes: SLOT_BYTES_MIN,
            slots: (0..slots).map(|i| key(i, 1 << 20)).collect(),
            small: (0..slots).map(|i| key(i, 1 << 30)).collect(),
            tag_salt: 0x5eed_0000_0000_0042,
        }
    }

    #[test]
    fn endpoints_carry_full_and_compact_keys_and_refuse_a_wrong_count() {
        let sent = endpoint(4);
        let bytes = sent.encode();
        let got = Endpoint::decode(&bytes).expect("a well-formed endpoint");
        assert_eq!((got.slots.clone(), got.small.clone()), (sent.slots.clone(), sent.small.clone()));
        assert_eq!(got.qp, sent.qp);
        assert_eq!(got.tag_salt, sent.tag_salt);
        // Missing the compact keys (an endpoint of the old layout), or one key short: refused.
        let key_bytes = std::mem::size_of::<SlotKey>();
        for cut in [4 * key_bytes, 1] {
            let err = Endpoint::decode(&bytes[..bytes.len() - cut]).expect_err("a short key table");
            assert!(err.to_string().contains("slot keys"), "{err}");
        }
    }
}
