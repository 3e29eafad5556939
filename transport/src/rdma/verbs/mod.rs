//! The verbs layer: the device, protection domains, registered memory, completion queues and RC
//! queue pairs, over sideway 0.4.3 (libibverbs, loaded at run time by rdma-mummy-sys 0.2.6).
//!
//! `unsafe` lives here because this is where the hardware contract is: registering memory hands
//! the device an address range it may read and write behind the compiler's back, posting a work
//! request hands it a buffer it touches asynchronously until the completion is polled, and the
//! completion-channel calls sideway does not wrap (`ibv_req_notify_cq`, `ibv_get_cq_event`,
//! `ibv_ack_cq_events`, and an allocation-free `ibv_post_recv`) go to rdma-mummy-sys directly, and
//! so do the two calls of the data path, `ibv_post_send` and `ibv_poll_cq`: each is one call into
//! the provider, where sideway's `ibv_wr_*` builder makes four per work request and the extended
//! CQ's reader six per completion (counted with callgrind in the SoftRoCE guest, below).
//! The only `unsafe` its callers need is for the two posting calls, whose `# Safety` says what
//! they owe: the buffer outlives the completion.
//!
//! Ported from a SoftRoCE probe of these exact versions, which found these quirks:
//! - rxe's extended CQ iterator (`ibv_next_poll`) corrupts the CQ; [`Cq::poll`] uses the classic
//!   `ibv_poll_cq` on the extended CQ instead (rxe and mlx5 serve both from the same queue).
//! - `imm_data` is big-endian on the wire and in the completion, so posting converts with `to_be`
//!   and polling with `from_be`.
//! - `QueuePair::state()` is the state cached by the last modify, not the device's: after an
//!   error completion it still says RTS. [`Qp::is_broken`] queries the device.
//! - `ibv_destroy_cq` (dropping the last handle of a CQ) blocks forever while a channel event that
//!   was read is unacknowledged, so [`Cq::ack_events`] acks every event it reads.
//! - sideway's basic poller and its receive guard allocate on every call; the direct calls here
//!   build their work requests and completions on the stack, so the data path does not.
//! - Inline sends need the `IBV_SEND_INLINE` flag set by hand on rxe ([`Qp::post_write_imm_inline`]
//!   sets it).
//! - Posting a region of another protection domain completes with `IBV_WC_LOC_QP_OP_ERR` on rxe
//!   (its lkey lookup fails with EINVAL), not the `IBV_WC_LOC_PROT_ERR` of the spec and of HCAs.
//!   A foreign rkey is `IBV_WC_REM_ACCESS_ERR` at the writer on both, and rxe also completes the
//!   responder's consumed receive with that error.

#![allow(unsafe_code)]

mod completion_queue;
mod device;
mod memory_region;
mod queue_pair;

use std::error::Error as StdError;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use sideway::ibverbs::completion::{CreateCompletionChannelError, CreateCompletionQueueError};
use sideway::ibverbs::device_context::AllocateProtectionDomainError;
use sideway::ibverbs::memory_region::RegisterMemoryRegionError;
use sideway::ibverbs::queue_pair::{CreateQueuePairError, ModifyQueuePairError};

pub use completion_queue::{Completion, Cq, Opcode};
pub use device::{Device, DeviceConfig, Pd};
pub use memory_region::{Access, Exposed, Region, RemoteChunk};
pub use queue_pair::{Qp, QpInfo};

/// Registration chunks and region starts are multiples of this.
/// Largest write posted inline (copied into the work request): small request and reply frames.
pub const INLINE_BYTES_MAX: usize = 256;

pub const PAGE_BYTES: usize = 4096;
/// RDMA READs in flight per QP, as initiator and as responder, clamped to the device's limits.
/// Zero would make every READ fail; 16 is what mlx5 allows and keeps a few large reads going.
const READ_DEPTH_MAX: u8 = 16;

/// Memory regions and queue pairs this process holds registered: what a leak would make grow
/// (the soak test and the `tessera_rdma_*` metrics watch them).
static LIVE_MRS: AtomicUsize = AtomicUsize::new(0);
static LIVE_QPS: AtomicUsize = AtomicUsize::new(0);

/// Memory regions and queue pairs alive in this process now.
pub fn live_counts() -> (usize, usize) {
    (LIVE_MRS.load(Ordering::Relaxed), LIVE_QPS.load(Ordering::Relaxed))
}
/// RNR NAK delay (12 = 0.64 ms), ack timeout (14 = 67 ms x 2^0), retries: as perftest uses them.
/// An RNR retry count of 7 retries forever, so a receiver that is slow to repost never errors.
const MIN_RNR_TIMER: u8 = 12;
const ACK_TIMEOUT: u8 = 14;
const RETRY_COUNT: u8 = 7;
const RNR_RETRY: u8 = 7;
const HOP_LIMIT: u8 = 64;
/// Queue pair numbers and packet sequence numbers are 24-bit.
const QPN_PSN_MASK: u32 = 0x00ff_ffff;
/// Bytes of [`QpInfo::to_bytes`].
pub const QP_INFO_BYTES: usize = 24;
const _: () = assert!(QP_INFO_BYTES == 4 + 4 + 16);

/// Why RDMA cannot be used here; the caller prints it in one line and falls back to TCP.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct Unavailable {
    pub reason: String,
}

impl Unavailable {
    fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }
}

/// Errors of verbs calls. Each keeps sideway's (or the OS's) error as its `source`;
/// [`report`] renders the whole chain on one line.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error(
        "registering {need_kib} KiB of memory for RDMA failed: the locked-memory limit \
         (RLIMIT_MEMLOCK) is {have_kib} KiB and counts all of this process's registered memory; \
         raise it with `ulimit -l unlimited` (systemd: LimitMEMLOCK=infinity)"
    )]
    MemlockTooLow { have_kib: u64, need_kib: u64 },
    #[error("mapping {len} bytes of anonymous memory for an RDMA region failed")]
    Map { len: usize, source: io::Error },
    #[error(
        "registering bytes {offset}..{end} of a {len}-byte region with the RDMA device failed \
         (if the device is out of memory-region entries, use fewer or larger regions)"
    )]
    RegisterMr { offset: usize, end: usize, len: usize, source: RegisterMemoryRegionError },
    #[error(
        "allocating a protection domain failed (if the device is out of them, serve fewer workers \
         over RDMA: each takes one per shard)"
    )]
    AllocPd(#[source] AllocateProtectionDomainError),
    #[error("{what} = {asked} is outside what the device allows (1..={max})")]
    Depth { what: &'static str, asked: u32, max: u32 },
    #[error("creating a completion channel failed")]
    CreateChannel(#[source] CreateCompletionChannelError),
    #[error("making the completion channel non-blocking failed")]
    ChannelNonblocking(#[source] io::Error),
    #[error("creating a completion queue of {entries} entries failed")]
    CreateCq { entries: u32, source: CreateCompletionQueueError },
    #[error("arming the completion queue (ibv_req_notify_cq) failed")]
    Arm(#[source] io::Error),
    #[error("creating an RC queue pair (send depth {send_depth}, receive depth {recv_depth}) failed")]
    CreateQp { send_depth: u32, recv_depth: u32, source: CreateQueuePairError },
    #[error("moving queue pair {qpn:#x} to {target} failed")]
    ModifyQp { qpn: u32, target: &'static str, source: ModifyQueuePairError },
    #[error("the peer's queue pair address is invalid: {reason}")]
    BadPeer { reason: String },
    #[error("posting work request {wr_id} on queue pair {qpn:#x} failed")]
    PostSend { qpn: u32, wr_id: u64, source: io::Error },
    #[error("posting receive {wr_id} on queue pair {qpn:#x} failed")]
    PostRecv { qpn: u32, wr_id: u64, source: io::Error },
}

/// Renders an error and all of its sources on one line: `outer: inner: os error`.
pub fn report(err: &dyn StdError) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        // sideway's `#[error(transparent)]` kinds repeat their source's text; print it once.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = inner.source();
    }
    line
}

/// A queue depth asked of the device, checked against its limit.
pub(super) fn check_depth(what: &'static str, asked: u32, max: u32) -> Result<(), VerbsError> {
    if asked == 0 || asked > max {
        return Err(VerbsError::Depth { what, asked, max });
    }
    Ok(())
}

// The transport shares one Device across shard threads and moves the rest into them.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Device>();
    send_sync::<Pd>();
    send_sync::<Region>();
    send::<Cq>();
    send::<Qp>();
};

#[cfg(test)]
mod tests;
