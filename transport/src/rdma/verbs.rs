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

use std::error::Error as StdError;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};

use crate::expose::StableMemory;
use rdma_mummy_sys::{
    ibv_recv_wr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_opcode, ibv_wc_status, ibv_wr_opcode, rdma_t, wr_t,
};
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    CompletionChannel, CompletionQueue, CreateCompletionChannelError, CreateCompletionQueueError,
    ExtendedCompletionQueue, GenericCompletionQueue,
};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{AllocateProtectionDomainError, DeviceContext, Mtu, PortState};
use sideway::ibverbs::memory_region::{MemoryRegion, RegisterMemoryRegionError, RegisterMemoryRegionErrorKind};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    CreateQueuePairError, ExtendedQueuePair, ModifyQueuePairError, QueuePair, QueuePairAttribute,
    QueuePairAttributeMask, QueuePairState,
};
use sideway::ibverbs::AccessFlags;

/// Registration chunks and region starts are multiples of this.
/// Largest write posted inline (copied into the work request): small request and reply frames.
pub const INLINE_BYTES_MAX: usize = 256;

/// Spans one work request gathers ([`Qp::post_write_imm_gather`]): a frame's header, its body
/// in the caller's registered buffer, and the padding after it.
pub const SEND_SGES_MAX: usize = 3;
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

/// Which device, port and GID to use. Port numbers start at 1.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Device name (`rxe0`, `mlx5_0`); `None` takes the first device. Default: env `RDMA_DEV`.
    pub device: Option<String>,
    /// GID table index; on RoCE it picks the address and RoCE version (`ibv_devinfo -v` lists the
    /// table; rxe puts the RoCEv2 GID of the IPv4 address at 1). Default: env `RDMA_GID_INDEX`, else 1.
    pub gid_index: u8,
    pub port: u8,
    /// Largest memory region to register; larger regions are split into several. `None`: the
    /// device's `max_mr_size`. Rounded down to a multiple of [`PAGE_BYTES`].
    pub mr_bytes_max: Option<u64>,
}

impl DeviceConfig {
    /// The defaults, with `RDMA_DEV` and `RDMA_GID_INDEX` from the environment. A malformed
    /// `RDMA_GID_INDEX` is `Unavailable`, so the caller prints it and falls back to TCP.
    pub fn from_env() -> Result<Self, Unavailable> {
        let device = std::env::var("RDMA_DEV").ok().filter(|name| !name.is_empty());
        let gid_index = match std::env::var("RDMA_GID_INDEX") {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|_| Unavailable::new(format!("RDMA_GID_INDEX={text:?} is not a GID index (0..=255)")))?,
            Err(_) => 1,
        };
        Ok(Self { device, gid_index, port: 1, mr_bytes_max: None })
    }
}

impl Default for DeviceConfig {
    /// [`DeviceConfig::from_env`]; a malformed `RDMA_GID_INDEX` panics here, with its value.
    fn default() -> Self {
        Self::from_env().unwrap_or_else(|unavailable| panic!("{unavailable}"))
    }
}

/// An opened device with its default protection domain, in which [`Region::new`] and
/// [`Qp::new`] create what they make. Send + Sync, shared via Arc.
#[derive(Debug)]
pub struct Device {
    // Dropped in field order: the PD before the context (sideway's Arcs enforce it as well).
    pd: Pd,
    context: Arc<DeviceContext>,
    name: String,
    port: PortParams,
    cqe_max: u32,
}

/// What every queue pair and region takes from the device and its port, whichever protection
/// domain it is in.
#[derive(Debug, Clone, Copy)]
struct PortParams {
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    mtu: Mtu,
    /// Effective, a multiple of PAGE_BYTES.
    mr_bytes_max: u64,
    qp_wr_max: u32,
    /// Reads this side may have outstanding (initiator) and may serve at once (responder).
    read_depth: u8,
    dest_read_depth: u8,
}

/// A protection domain: memory regions and queue pairs created in it ([`Region::new_in`],
/// [`Qp::new_in`]) are usable only together. A queue pair accepts a remote key only of a region
/// in its own domain (anything else completes with a remote access error at the writer), and
/// posts local buffers only of regions in its own domain (a local error completion). So a peer
/// given a queue pair and a region in a domain of their own can reach nothing else, whatever
/// keys it learns or guesses.
///
/// Send + Sync. Regions and queue pairs keep the domain's verbs object alive (sideway holds it
/// by Arc), so dropping a `Pd` before them is safe; dropping it after them frees it at once.
#[derive(Debug)]
pub struct Pd {
    pd: Arc<ProtectionDomain>,
    port: PortParams,
}

impl Device {
    /// Opens the device. Every "no RDMA here" case (ENOSYS/EOPNOTSUPP from the device list, empty
    /// list, named device missing, open failure, port down, empty GID entry) is `Err(Unavailable)`.
    pub fn open(cfg: &DeviceConfig) -> Result<Arc<Device>, Unavailable> {
        let list = DeviceList::new()
            .map_err(|err| Unavailable::new(format!("RDMA device list unavailable: {}", report(&err))))?;
        let names: Vec<String> = list.iter().map(|device| device.name()).collect();
        let index = match &cfg.device {
            _ if names.is_empty() => return Err(Unavailable::new("no RDMA devices present")),
            None => 0,
            Some(wanted) => names
                .iter()
                .position(|name| name == wanted)
                .ok_or_else(|| Unavailable::new(format!("RDMA device {wanted:?} not found (present: {names:?})")))?,
        };
        let name = names[index].clone();
        let device = list.get(index).expect("index came from the same list");
        // The context does not borrow the list: opened contexts outlive ibv_free_device_list.
        let context = device
            .open()
            .map_err(|err| Unavailable::new(format!("opening RDMA device {name:?} failed: {}", report(&err))))?;
        drop(list);
        Self::query(context, name, cfg).map(Arc::new)
    }

    fn query(context: Arc<DeviceContext>, name: String, cfg: &DeviceConfig) -> Result<Device, Unavailable> {
        let failed = |what: &str, err: &dyn StdError| {
            Unavailable::new(format!("RDMA device {name:?}: {what} failed: {}", report(err)))
        };
        let attr = context.query_device().map_err(|err| failed("query device", &err))?;
        let port = context.query_port(cfg.port).map_err(|err| failed("query port", &err))?;
        if port.port_state() != PortState::Active {
            return Err(Unavailable::new(format!(
                "RDMA device {name:?} port {} is {:?}, not Active (is its network link up? `rdma link show`)",
                cfg.port,
                port.port_state()
            )));
        }
        let gid = context
            .query_gid(cfg.port, cfg.gid_index.into())
            .map_err(|err| failed("query GID (is RDMA_GID_INDEX right? `ibv_devinfo -v` lists the table)", &err))?;
        if gid.is_zero() {
            return Err(Unavailable::new(format!(
                "RDMA device {name:?} port {} has no GID at index {} (`ibv_devinfo -v` lists the table; set RDMA_GID_INDEX)",
                cfg.port, cfg.gid_index
            )));
        }
        let mr_bytes_max = effective_mr_bytes_max(attr.max_mr_size(), cfg.mr_bytes_max).ok_or_else(|| {
            Unavailable::new(format!("mr_bytes_max {:?} is below one page ({PAGE_BYTES} bytes)", cfg.mr_bytes_max))
        })?;
        let clamp_depth = |limit: i32| limit.clamp(1, i32::from(READ_DEPTH_MAX)) as u8;
        let params = PortParams {
            port: cfg.port,
            gid_index: cfg.gid_index,
            gid: gid.raw,
            mtu: port.active_mtu(),
            mr_bytes_max,
            qp_wr_max: attr.max_qp_wr().max(1) as u32,
            read_depth: clamp_depth(attr.max_qp_init_rd_atom()),
            dest_read_depth: clamp_depth(attr.max_qp_rd_atom()),
        };
        let pd = context.alloc_pd().map_err(|err| failed("allocate protection domain", &err))?;
        Ok(Device { pd: Pd { pd, port: params }, context, name, port: params, cqe_max: attr.max_cqe().max(1) as u32 })
    }

    /// A new protection domain of its own, for regions and queue pairs that must be usable only
    /// with each other (one per peer that must reach nothing else).
    pub fn alloc_pd(&self) -> Result<Pd, VerbsError> {
        let pd = self.context.alloc_pd().map_err(VerbsError::AllocPd)?;
        Ok(Pd { pd, port: self.port })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GID at the configured index: this side's address on the fabric.
    pub fn gid(&self) -> [u8; 16] {
        self.port.gid
    }

    /// The port's active MTU, used as every queue pair's path MTU.
    pub fn mtu_bytes(&self) -> usize {
        match self.port.mtu {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    /// The largest memory region registered in one piece: min(device, `mr_bytes_max`), rounded
    /// down to a multiple of [`PAGE_BYTES`].
    pub fn max_mr_size(&self) -> u64 {
        self.port.mr_bytes_max
    }
}

/// min(device limit, configured limit) rounded down to whole pages; None if below one page.
fn effective_mr_bytes_max(device_bytes: u64, configured: Option<u64>) -> Option<u64> {
    let bytes = device_bytes.min(configured.unwrap_or(u64::MAX));
    let bytes = bytes - bytes % PAGE_BYTES as u64;
    (bytes > 0).then_some(bytes)
}

/// What peers may do to a [`Region`]. Local writes (needed as an RDMA READ target) are always on.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub remote_write: bool,
    pub remote_read: bool,
}

impl Access {
    fn flags(self) -> AccessFlags {
        let mut flags = AccessFlags::LocalWrite;
        if self.remote_write {
            flags |= AccessFlags::RemoteWrite;
        }
        if self.remote_read {
            flags |= AccessFlags::RemoteRead;
        }
        flags
    }
}

/// What a peer needs to address one memory-region chunk of a [`Region`]. Nothing here is
/// trusted: a wrong key or address makes the device fail the work request with an error
/// completion; it cannot reach memory outside what was registered for remote access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteChunk {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

/// Registered memory: one anonymous mapping (populated, so registration does not fault pages in)
/// registered as one or more memory regions of at most [`Device::max_mr_size`] bytes each, so a
/// region larger than the device's limit works. A work request's local or remote span must lie
/// within one chunk: [`Region::lkey`] and [`Region::remote_span`] check it.
///
/// The device writes into the mapping asynchronously (an incoming RDMA WRITE, a READ's data), so
/// the bytes behind [`Region::as_slice`] may change under it in ranges the caller's protocol has
/// handed to the device; read such a range only after the completion that ends the hand-over.
#[derive(Debug)]
pub struct Region {
    // Declared before `map` so it drops first: ibv_dereg_mr runs while the pages are still
    // mapped. The Arcs are never handed out, so no registration outlives the mapping.
    mrs: Vec<Arc<MemoryRegion>>,
    map: MmapMut,
    chunk_bytes: usize,
}

impl Region {
    /// Maps `len` zeroed bytes and registers them in the device's default protection domain.
    /// Fails with [`VerbsError::MemlockTooLow`] (naming RLIMIT_MEMLOCK and the fix) when
    /// registration runs out of locked memory. Panics if `len` is 0.
    pub fn new(dev: &Device, len: usize, access: Access) -> Result<Region, VerbsError> {
        Self::new_in(&dev.pd, len, access)
    }

    /// As [`Region::new`], registered in `pd`: only queue pairs of `pd` can post it locally or
    /// reach it by its remote keys.
    pub fn new_in(pd: &Pd, len: usize, access: Access) -> Result<Region, VerbsError> {
        assert!(len > 0, "an RDMA region needs at least one byte");
        let mut map =
            MmapOptions::new().len(len).populate().map_anon().map_err(|source| VerbsError::Map { len, source })?;
        let base = map.as_mut_ptr() as usize;
        assert_eq!(base % PAGE_BYTES, 0, "anonymous mappings start on a page");
        let chunk_bytes = usize::try_from(pd.port.mr_bytes_max).unwrap_or(usize::MAX);
        // Why this is sound: `base .. base + len` is `map`, a live, writable, private anonymous mapping this
        // function owns. `map` and `mrs` move into the returned Region together, and its field
        // order (or, on an early return, the reverse declaration order of these locals) drops
        // every MR (ibv_dereg_mr) before `map` (munmap), so the device never holds a registration
        // of unmapped memory. Device writes become visible to the CPU only through completions,
        // which the callers of the posting functions wait for.
        // SAFETY: every MR is deregistered before the mapping it covers is unmapped.
        let mrs = unsafe { register_chunks(pd, base, len, chunk_bytes, access) }?;
        Ok(Region { mrs, map, chunk_bytes })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: a region has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes per registration chunk (the last may be shorter): a multiple of [`PAGE_BYTES`].
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// The whole region; it starts on a 4096-byte boundary.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// The 8-byte word at `offset` (a multiple of 8 inside the region), loaded with acquire
    /// ordering: for polling a word the device may be writing at this moment (a frame's arrival
    /// tag). Once the loaded value shows that a write has landed, the bytes the protocol says
    /// landed before it may be read through [`Region::as_slice`]. Panics if `offset` is
    /// misaligned or out of range.
    pub fn load_u64(&self, offset: usize) -> u64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.len(), "word {offset} of a {}-byte region", self.len());
        // Why this is sound: the word lies inside `map` (checked above), which stays mapped as long
        // as `self`, and is 8-byte aligned (the mapping starts on a page). An atomic load of memory
        // that another agent (the device, through DMA) writes is not a data race; Acquire keeps
        // the caller's later reads of the frame after this load.
        // SAFETY: an aligned, in-bounds word of a live mapping, read atomically.
        let word = unsafe { &*(self.map.as_ptr().add(offset) as *const std::sync::atomic::AtomicU64) };
        word.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The virtual address of byte 0 (what work requests and peers address it by).
    pub fn addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// The chunks, for the peer.
    pub fn remote_chunks(&self) -> Vec<RemoteChunk> {
        self.mrs
            .iter()
            .map(|mr| RemoteChunk { addr: mr.get_ptr() as u64, len: mr.region_len() as u64, rkey: mr.rkey() })
            .collect()
    }

    /// The address, length and rkey a peer uses for `[offset, offset + len)`; panics (broken
    /// invariant) like [`Region::lkey`].
    pub fn remote_span(&self, offset: usize, len: usize) -> RemoteChunk {
        let chunk = self.chunk_of(offset, len);
        RemoteChunk { addr: self.addr() + offset as u64, len: len as u64, rkey: self.mrs[chunk].rkey() }
    }

    /// lkey covering `[offset, offset + len)`: panics (broken invariant) if the span crosses a
    /// chunk boundary or the region's end.
    pub fn lkey(&self, offset: usize, len: usize) -> u32 {
        self.mrs[self.chunk_of(offset, len)].lkey()
    }

    /// Where `bytes` lies in this region, if it lies inside one registration chunk of it: the
    /// offset a work request can name it by.
    pub fn offset_of(&self, bytes: &[u8]) -> Option<usize> {
        let offset = (bytes.as_ptr() as u64).checked_sub(self.addr())? as usize;
        self.span_chunk(offset, bytes.len()).ok().map(|_| offset)
    }

    fn chunk_of(&self, offset: usize, len: usize) -> usize {
        self.span_chunk(offset, len).unwrap_or_else(|broken| panic!("{broken}"))
    }

    /// The chunk holding `[offset, offset + len)`, or why there is none.
    fn span_chunk(&self, offset: usize, len: usize) -> Result<usize, String> {
        let end = offset.checked_add(len).ok_or("span end overflows")?;
        if end > self.len() {
            return Err(format!("span {offset}..{end} outside a region of {} bytes", self.len()));
        }
        let chunk = offset.min(self.len() - 1) / self.chunk_bytes;
        if len > 0 && (end - 1) / self.chunk_bytes != chunk {
            return Err(format!(
                "span {offset}..{end} crosses a registration chunk boundary (chunks of {} bytes)",
                self.chunk_bytes
            ));
        }
        Ok(chunk)
    }
}

/// Registers `base .. base + len` as MRs of at most `chunk_bytes` each.
///
/// # Safety
/// The span must be mapped (writable if `access` lets a peer write) and stay mapped until every
/// returned MR is dropped.
unsafe fn register_chunks(
    pd: &Pd,
    base: usize,
    len: usize,
    chunk_bytes: usize,
    access: Access,
) -> Result<Vec<Arc<MemoryRegion>>, VerbsError> {
    let mut mrs = Vec::with_capacity(len.div_ceil(chunk_bytes));
    for offset in (0..len).step_by(chunk_bytes) {
        let end = len.min(offset + chunk_bytes);
        // SAFETY: `base + offset .. base + end` lies inside the span the caller vouches for.
        let mr = match unsafe { pd.pd.reg_mr(base + offset, end - offset, access.flags()) } {
            Ok(mr) => mr,
            Err(source) => {
                forget_mrs(&mrs); // deregistered as `mrs` drops
                return Err(registration_error(len, offset, end, source, memlock_limit_bytes()));
            }
        };
        mrs.push(mr);
        LIVE_MRS.fetch_add(1, Ordering::Relaxed);
    }
    Ok(mrs)
}

/// Counts `mrs` out of [`LIVE_MRS`] as they are dropped (each owner's field order deregisters
/// them before its memory goes).
fn forget_mrs(mrs: &[Arc<MemoryRegion>]) {
    LIVE_MRS.fetch_sub(mrs.len(), Ordering::Relaxed);
}

impl Drop for Region {
    fn drop(&mut self) {
        forget_mrs(&self.mrs);
    }
}

impl Drop for Exposed {
    fn drop(&mut self) {
        forget_mrs(&self.mrs);
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        LIVE_QPS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Memory someone else owns (an engine's dense blocks), registered for peers to read. Holds the
/// memory alive for as long as the registration lives.
#[derive(Debug)]
pub struct Exposed {
    // Declared before `_memory` so the MRs are deregistered while the memory is surely mapped.
    mrs: Vec<Arc<MemoryRegion>>,
    _memory: Arc<dyn StableMemory>,
}

impl Exposed {
    /// Registers `memory` in `pd`, read-only for peers, in MRs of at most the device's limit.
    pub fn register(pd: &Pd, memory: Arc<dyn StableMemory>) -> Result<Exposed, VerbsError> {
        let (base, len) = memory.span();
        assert!(len > 0 && base % PAGE_BYTES as u64 == 0, "stable memory is page-aligned and non-empty");
        let chunk_bytes = usize::try_from(pd.port.mr_bytes_max).unwrap_or(usize::MAX);
        let access = Access { remote_write: false, remote_read: true };
        // Why this is sound: StableMemory's contract keeps `base .. base + len` mapped for as long as
        // `memory` lives, and the returned value holds `memory` until after its MRs are dropped
        // (field order). Peers may only read it (no remote write, and the local side never posts
        // it as a target), so the device never writes memory its owner is using.
        // SAFETY: the memory outlives every MR over it, and no device write targets it.
        let mrs = unsafe { register_chunks(pd, base as usize, len, chunk_bytes, access) }?;
        Ok(Exposed { mrs, _memory: memory })
    }

    /// The chunks, for the peer.
    pub fn remote_chunks(&self) -> Vec<RemoteChunk> {
        self.mrs
            .iter()
            .map(|mr| RemoteChunk { addr: mr.get_ptr() as u64, len: mr.region_len() as u64, rkey: mr.rkey() })
            .collect()
    }
}

/// Turns a failed `ibv_reg_mr` into MemlockTooLow when the locked-memory limit is the likely
/// cause: the kernel answers ENOMEM (or EPERM) when pinning would exceed a finite
/// RLIMIT_MEMLOCK (`memlock_limit_bytes`, None = unlimited).
fn registration_error(
    len: usize,
    offset: usize,
    end: usize,
    source: RegisterMemoryRegionError,
    memlock_limit_bytes: Option<u64>,
) -> VerbsError {
    let errno = match &source.0 {
        RegisterMemoryRegionErrorKind::Ibverbs(err) => err.raw_os_error(),
        _ => None,
    };
    if matches!(errno, Some(libc::ENOMEM | libc::EPERM)) {
        if let Some(have_bytes) = memlock_limit_bytes {
            return VerbsError::MemlockTooLow { have_kib: have_bytes / 1024, need_kib: (len as u64).div_ceil(1024) };
        }
    }
    VerbsError::RegisterMr { offset, end, len, source }
}

/// The soft RLIMIT_MEMLOCK in bytes, or None if unlimited (or unreadable).
fn memlock_limit_bytes() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a local rlimit the kernel fills before returning; nothing else is shared.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// What a work completion reports, copied out of the CQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Send,
    RdmaWrite,
    RdmaRead,
    Recv,
    RecvRdmaWithImm,
    Other(u32),
}

impl Opcode {
    /// Reported for error completions, whose opcode verbs leave undefined.
    pub const UNDEFINED: Opcode = Opcode::Other(u32::MAX);

    fn from_raw(raw: u32) -> Self {
        match raw {
            ibv_wc_opcode::IBV_WC_SEND => Opcode::Send,
            ibv_wc_opcode::IBV_WC_RDMA_WRITE => Opcode::RdmaWrite,
            ibv_wc_opcode::IBV_WC_RDMA_READ => Opcode::RdmaRead,
            ibv_wc_opcode::IBV_WC_RECV => Opcode::Recv,
            ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => Opcode::RecvRdmaWithImm,
            other => Opcode::Other(other),
        }
    }
}

/// One work completion, copied before the poller moves on (the extended CQ reads its fields
/// lazily from the current entry).
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub wr_id: u64,
    pub ok: bool,
    /// `ibv_wc_status`, raw.
    pub status: u32,
    /// What `ibv_wc_status_str` says for `status`.
    pub status_text: &'static str,
    /// [`Opcode::UNDEFINED`] when `!ok`.
    pub opcode: Opcode,
    /// Bytes placed by a receive (the write's length for RecvRdmaWithImm, the read's for
    /// RdmaRead); 0 when `!ok`.
    pub byte_len: u32,
    /// The immediate data in host order, for RecvRdmaWithImm only.
    pub imm: Option<u32>,
}

impl Completion {
    fn from_wc(wc: &ibv_wc) -> Self {
        let ok = wc.status == ibv_wc_status::IBV_WC_SUCCESS;
        let opcode = if ok { Opcode::from_raw(wc.opcode) } else { Opcode::UNDEFINED };
        // SAFETY: both members of the union are a plain u32, so either reading is defined.
        let imm = unsafe { wc.imm_data_invalidated_rkey_union.imm_data };
        Completion {
            wr_id: wc.wr_id,
            ok,
            status: wc.status,
            status_text: status_text(wc.status),
            opcode,
            byte_len: if ok { wc.byte_len } else { 0 },
            imm: (opcode == Opcode::RecvRdmaWithImm).then(|| u32::from_be(imm)),
        }
    }
}

/// The texts of rdma-core's `ibv_wc_status_str`, without a call into the C library.
fn status_text(status: u32) -> &'static str {
    use ibv_wc_status::*;
    match status {
        IBV_WC_SUCCESS => "success",
        IBV_WC_LOC_LEN_ERR => "local length error",
        IBV_WC_LOC_QP_OP_ERR => "local QP operation error",
        IBV_WC_LOC_EEC_OP_ERR => "local EE context operation error",
        IBV_WC_LOC_PROT_ERR => "local protection error",
        IBV_WC_WR_FLUSH_ERR => "Work Request Flushed Error",
        IBV_WC_MW_BIND_ERR => "memory management operation error",
        IBV_WC_BAD_RESP_ERR => "bad response error",
        IBV_WC_LOC_ACCESS_ERR => "local access error",
        IBV_WC_REM_INV_REQ_ERR => "remote invalid request error",
        IBV_WC_REM_ACCESS_ERR => "remote access error",
        IBV_WC_REM_OP_ERR => "remote operation error",
        IBV_WC_RETRY_EXC_ERR => "transport retry counter exceeded",
        IBV_WC_RNR_RETRY_EXC_ERR => "RNR retry counter exceeded",
        IBV_WC_LOC_RDD_VIOL_ERR => "local RDD violation error",
        IBV_WC_REM_INV_RD_REQ_ERR => "remote invalid RD request",
        IBV_WC_REM_ABORT_ERR => "aborted error",
        IBV_WC_INV_EECN_ERR => "invalid EE context number",
        IBV_WC_INV_EEC_STATE_ERR => "invalid EE context state",
        IBV_WC_FATAL_ERR => "fatal error",
        IBV_WC_RESP_TIMEOUT_ERR => "response timeout error",
        IBV_WC_GENERAL_ERR => "general error",
        IBV_WC_TM_ERR => "TM error",
        IBV_WC_TM_RNDV_INCOMPLETE => "TM software rendezvous",
        _ => "unknown",
    }
}

/// A completion queue with its own completion channel, so a shard's event loop can sleep on the
/// channel's fd. The loop is: poll; [`Cq::arm`]; poll again (a completion that landed before
/// arming raises no event); sleep until [`Cq::fd`] is readable; [`Cq::ack_events`]; repeat.
#[derive(Debug)]
pub struct Cq {
    cq: Arc<ExtendedCompletionQueue>,
    // The CQ holds the channel too; kept here for the fd and ibv_get_cq_event.
    channel: Arc<CompletionChannel>,
}

impl Cq {
    /// A CQ of `entries` completions (at least the send and receive depths of every QP using it,
    /// or it overruns).
    pub fn new(dev: &Device, entries: u32) -> Result<Cq, VerbsError> {
        check_depth("cq entries", entries, dev.cqe_max)?;
        let channel = dev.context.create_comp_channel().map_err(VerbsError::CreateChannel)?;
        // Non-blocking, so draining events never stalls the loop; epoll/mio does the waiting.
        channel.set_nonblocking(true).map_err(VerbsError::ChannelNonblocking)?;
        let cq = dev
            .context
            .create_cq_builder()
            .setup_cqe(entries)
            .setup_comp_channel(&channel, 0)
            .build_ex()
            .map_err(|source| VerbsError::CreateCq { entries, source })?;
        Ok(Cq { cq, channel })
    }

    /// Non-blocking: appends up to min(`max`, `out.capacity() - out.len()`) completions to `out`
    /// and returns how many. Does not allocate.
    ///
    /// Uses the classic `ibv_poll_cq`, one call into the provider for a batch, on the extended
    /// CQ: both rxe and mlx5 serve it from the same queue as `ibv_start_poll`, which the data path
    /// no longer calls (rxe's `ibv_next_poll` corrupted the CQ, so the extended reader took one
    /// completion per six calls).
    ///
    /// Panics if the device reports a polling error: that means the CQ overran (it is smaller than
    /// the queues feeding it) or the device died.
    pub fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> usize {
        const BATCH: usize = 32;
        let mut room = max.min(out.capacity() - out.len());
        let mut taken = 0;
        while room > 0 {
            let want = room.min(BATCH);
            let mut wcs = [std::mem::MaybeUninit::<ibv_wc>::uninit(); BATCH];
            // Why this is sound: the CQ is live (owned through `self.cq`); the extended CQ begins with the basic
            // `ibv_cq`, which is what sideway's `cq()` points at and what the provider's poll_cq
            // takes. The provider writes at most `want` entries into `wcs` and returns how many
            // (or a negative errno), keeping no pointer.
            // SAFETY: a live CQ and a buffer of `want` entries for the provider to fill.
            let n = unsafe { rdma_mummy_sys::ibv_poll_cq(self.cq.cq().as_ptr(), want as i32, wcs.as_mut_ptr().cast()) };
            let n = usize::try_from(n).unwrap_or_else(|_| {
                panic!("polling the completion queue failed: {}", io::Error::from_raw_os_error(-n))
            });
            for wc in &wcs[..n] {
                // SAFETY: the provider initialised the first `n` entries.
                out.push(Completion::from_wc(unsafe { wc.assume_init_ref() }));
            }
            taken += n;
            if n < want {
                break;
            }
            room -= n;
        }
        taken
    }

    /// The completion channel's fd (non-blocking), to register with epoll/mio for readability.
    pub fn fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    /// Requests an event for the next completion of any kind (`ibv_req_notify_cq`). After
    /// arming, poll once more before sleeping: a completion may have raced in.
    pub fn arm(&mut self) -> Result<(), VerbsError> {
        // Why this is sound: `self.cq` is a live CQ owned (through its Arc) by `self` for the whole call; the
        // extended CQ begins with the basic `ibv_cq` fields, which is what sideway's `cq()` casts
        // to and what rdma-core's ibv_cq_ex_to_cq does. ibv_req_notify_cq reads the CQ and rings
        // the device, keeping no pointer.
        // SAFETY: the CQ is live for the whole call, and the call keeps no pointer.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        match rc {
            0 => Ok(()),
            errno => Err(VerbsError::Arm(io::Error::from_raw_os_error(errno))),
        }
    }

    /// Reads and acks every pending channel event (after the fd turned readable). Never leaves
    /// events unacked: `ibv_destroy_cq` would wait for those acks forever.
    pub fn ack_events(&mut self) {
        let mut events = 0u32;
        while self.take_event() {
            events += 1;
        }
        if events > 0 {
            // SAFETY: the CQ is live (owned through `self.cq`) and received exactly `events`
            // events from its channel in the loop above, none of them acked yet.
            unsafe { rdma_mummy_sys::ibv_ack_cq_events(self.cq.cq().as_ptr(), events) };
        }
    }

    /// Reads one event off the channel; false when there is none (the fd is non-blocking).
    fn take_event(&mut self) -> bool {
        loop {
            let mut event_cq = ptr::null_mut();
            let mut event_context = ptr::null_mut();
            // SAFETY: the channel is live (owned through `self.channel`), the out-pointers point
            // to locals, and the fd is non-blocking, so the call returns EAGAIN, not sleep.
            let rc = unsafe {
                rdma_mummy_sys::ibv_get_cq_event(
                    self.channel.comp_channel().as_ptr(),
                    &mut event_cq,
                    &mut event_context,
                )
            };
            if rc == 0 {
                // SAFETY: only reads the CQ's handle for a comparison; `self.cq` keeps it alive.
                let ours = unsafe { self.cq.cq().as_ptr() };
                assert_eq!(event_cq, ours, "event for a CQ this channel was not created for");
                return true;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => return false,
                io::ErrorKind::Interrupted => continue,
                _ => panic!("reading the completion channel failed: {err}"),
            }
        }
    }
}

/// What a peer needs to connect its queue pair to this one, sent out of band (TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// Queue pair number, 24-bit.
    pub qpn: u32,
    /// The first packet sequence number this side sends, 24-bit.
    pub psn: u32,
    pub gid: [u8; 16],
}

impl QpInfo {
    /// Little-endian `qpn`, `psn`, then the GID as is.
    pub fn to_bytes(&self) -> [u8; QP_INFO_BYTES] {
        let mut bytes = [0; QP_INFO_BYTES];
        bytes[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.psn.to_le_bytes());
        bytes[8..24].copy_from_slice(&self.gid);
        bytes
    }

    /// The inverse of [`QpInfo::to_bytes`]; [`Qp::connect`] checks the values.
    pub fn from_bytes(bytes: [u8; QP_INFO_BYTES]) -> Self {
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let mut gid = [0; 16];
        gid.copy_from_slice(&bytes[8..24]);
        QpInfo { qpn: word(0), psn: word(4), gid }
    }
}

/// A reliable-connected queue pair; send and receive completions go to the CQs it was made with.
#[derive(Debug)]
pub struct Qp {
    qp: ExtendedQueuePair,
    psn: u32,
    gid: [u8; 16],
    port: u8,
    gid_index: u8,
    mtu: Mtu,
    read_depth: u8,
    dest_read_depth: u8,
}

impl Qp {
    /// Creates the QP in the device's default protection domain and moves it to INIT with a
    /// random PSN. One scatter/gather entry per work request, no inline data. `send_cq` and
    /// `recv_cq` may be the same CQ.
    pub fn new(dev: &Device, send_cq: &Cq, recv_cq: &Cq, send_depth: u32, recv_depth: u32) -> Result<Qp, VerbsError> {
        Self::new_in(&dev.pd, send_cq, recv_cq, send_depth, recv_depth)
    }

    /// As [`Qp::new`], in `pd`: the QP posts only regions of `pd` and its peer reaches only
    /// regions of `pd`. The CQs may be shared with QPs of other domains of the same device.
    pub fn new_in(pd: &Pd, send_cq: &Cq, recv_cq: &Cq, send_depth: u32, recv_depth: u32) -> Result<Qp, VerbsError> {
        let port = pd.port;
        check_depth("send depth", send_depth, port.qp_wr_max)?;
        check_depth("receive depth", recv_depth, port.qp_wr_max)?;
        let qp = pd
            .pd
            .create_qp_builder()
            .setup_max_send_wr(send_depth)
            .setup_max_recv_wr(recv_depth)
            .setup_max_send_sge(SEND_SGES_MAX as u32)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(INLINE_BYTES_MAX as u32)
            .setup_send_cq(GenericCompletionQueue::from(Arc::clone(&send_cq.cq)))
            .setup_recv_cq(GenericCompletionQueue::from(Arc::clone(&recv_cq.cq)))
            .build_ex()
            .map_err(|source| VerbsError::CreateQp { send_depth, recv_depth, source })?;
        LIVE_QPS.fetch_add(1, Ordering::Relaxed);
        let mut qp = Qp {
            qp,
            psn: random_psn(),
            gid: port.gid,
            port: port.port,
            gid_index: port.gid_index,
            mtu: port.mtu,
            read_depth: port.read_depth,
            dest_read_depth: port.dest_read_depth,
        };
        qp.enter_init()?;
        Ok(qp)
    }

    pub fn info(&self) -> QpInfo {
        QpInfo { qpn: self.qpn(), psn: self.psn, gid: self.gid }
    }

    fn qpn(&self) -> u32 {
        self.qp.qp_number()
    }

    /// RTR then RTS towards `remote`: RoCE GRH from the device's GID index, path MTU = the
    /// device's active MTU (both sides must agree on it), read depth as the device allows (up to
    /// 16), retry 7, RNR retry 7 (forever). The QP must be in INIT (new, or after [`Qp::reset`]);
    /// if a step fails it is put back in INIT with the same PSN, so the call can be retried.
    pub fn connect(&mut self, remote: &QpInfo) -> Result<(), VerbsError> {
        check_peer(remote)?;
        let result = self.enter_rtr(remote).and_then(|()| self.enter_rts());
        if result.is_err() {
            // Best effort: the first error is the one worth reporting.
            let _ = self.reset_to_init();
        }
        result
    }

    /// Back to RESET and INIT with a fresh PSN, after an error: outstanding work requests are
    /// discarded (poll their flushed completions first if they matter). Exchange [`Qp::info`]
    /// again, then [`Qp::connect`].
    pub fn reset(&mut self) -> Result<(), VerbsError> {
        self.psn = random_psn();
        self.reset_to_init()
    }

    /// True when the QP is in the error state, or cannot be queried. Queries the device: the
    /// state sideway caches still says RTS after an error completion.
    pub fn is_broken(&mut self) -> bool {
        match self.qp.query(QueuePairAttributeMask::State) {
            Ok((attr, _)) => matches!(attr.state(), QueuePairState::Error | QueuePairState::SendQueueError),
            Err(_) => true,
        }
    }

    /// Posts a zero-length receive, consumed by an incoming write-with-immediate (whose data
    /// lands by rkey). Safe: there is no buffer. Does not allocate.
    pub fn post_recv(&mut self, wr_id: u64) -> Result<(), VerbsError> {
        let mut wr = ibv_recv_wr { wr_id, next: ptr::null_mut(), sg_list: ptr::null_mut(), num_sge: 0 };
        let mut bad_wr = ptr::null_mut();
        // Why this is sound: the QP is live (owned by `self.qp`); `wr` is a single, terminated work request
        // on the stack with no scatter/gather entries, so the device is handed no memory at all;
        // ibv_post_recv copies the request into the receive queue before returning. sideway's
        // own receive guard would do the same call but allocate two Vecs per post.
        // SAFETY: the QP is live, and the request hands the device no memory.
        let rc = unsafe { rdma_mummy_sys::ibv_post_recv(self.qp.qp().as_ptr(), &mut wr, &mut bad_wr) };
        match rc {
            0 => Ok(()),
            errno => Err(VerbsError::PostRecv { qpn: self.qpn(), wr_id, source: io::Error::from_raw_os_error(errno) }),
        }
    }

    /// RDMA WRITE WITH IMMEDIATE of `local[offset..offset + len]` to `remote_addr` (which, with
    /// the length, must lie in the peer's chunk `rkey` names). Consumes one receive at the peer,
    /// whose completion carries `imm` (host order) and `byte_len == len`. Unsignaled requests
    /// free their send-queue slot only when a later signaled one completes, so signal at least
    /// once per send depth. Panics if the local span crosses a chunk or `len` exceeds u32.
    ///
    /// # Safety
    /// `local[offset..offset + len]` must stay valid (the Region alive) and unmodified until this
    /// work request's completion is polled (or, unsignaled, that of a later signaled request on
    /// this QP): the device reads it asynchronously.
    #[allow(clippy::too_many_arguments)] // each is one field of the work request
    pub unsafe fn post_write_imm(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote_addr: u64,
        rkey: u32,
        imm: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let sge = local_sge(local, offset, len);
        let op = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        // lkey/addr/len describe a span of `local` inside one registered chunk (checked by
        // local_sge). The Region owns the mapping and its registrations; the caller keeps it
        // alive and the span unmodified until the completion, as this function's contract says,
        // and the provider's doorbell orders our earlier stores to it before the device reads.
        // SAFETY: the span is registered and, by the caller's contract, outlives the completion.
        unsafe { self.post_one(wr_id, op, signal_flags(signaled), sge, remote_addr, rkey, imm.to_be()) }
    }

    /// As [`Qp::post_write_imm`], writing the concatenation of `parts`, each `(region, offset,
    /// len)` a span of a region in this queue pair's protection domain, at most
    /// [`SEND_SGES_MAX`] of them: the device gathers them, so a frame whose body lies in another
    /// region goes without being copied next to its header. Empty spans are left out. Panics if
    /// there are more parts, a span crosses a chunk, or the total exceeds u32.
    ///
    /// # Safety
    /// Every span must stay valid (its Region alive) and unmodified until this work request's
    /// completion is polled (or, unsignaled, that of a later signaled request on this QP).
    #[allow(clippy::too_many_arguments)] // each is one field of the work request
    pub unsafe fn post_write_imm_gather(
        &mut self,
        wr_id: u64,
        parts: &[(&Region, usize, usize)],
        remote_addr: u64,
        rkey: u32,
        imm: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        assert!(parts.len() <= SEND_SGES_MAX, "a work request gathers at most {SEND_SGES_MAX} spans");
        let mut sges = [ibv_sge { addr: 0, length: 0, lkey: 0 }; SEND_SGES_MAX];
        let mut n = 0;
        for &(region, offset, len) in parts.iter().filter(|p| p.2 > 0) {
            sges[n] = local_sge(region, offset, len);
            n += 1;
        }
        u32::try_from(sges[..n].iter().map(|s| s.length as u64).sum::<u64>())
            .expect("a work request carries at most u32::MAX bytes");
        let op = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        // Each SGE describes a span of a live region inside one registered chunk (local_sge); the
        // caller keeps every span alive and unmodified until the completion, as this function's
        // contract says, and the doorbell orders our earlier stores to them before the device reads.
        // SAFETY: the spans are registered and, by the caller's contract, outlive the completion.
        unsafe { self.post_sges(wr_id, op, signal_flags(signaled), &mut sges[..n], remote_addr, rkey, imm.to_be()) }
    }

    /// As [`Qp::post_write_imm`] for at most [`INLINE_BYTES_MAX`] bytes, which are copied into the
    /// work request when it is posted: the caller may reuse `data` at once, so this is safe. Small
    /// frames skip the device's read of local memory, as perftest's latency tests do.
    #[allow(clippy::too_many_arguments)] // each is one field of the work request
    pub fn post_write_imm_inline(
        &mut self,
        wr_id: u64,
        data: &[u8],
        remote_addr: u64,
        rkey: u32,
        imm: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let op = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        self.post_inline(wr_id, op, data, remote_addr, rkey, imm.to_be(), signaled)
    }

    /// A plain inline RDMA WRITE: it consumes no receive at the peer and completes nowhere
    /// there, so the peer can only notice it by reading memory. Tessera's data path writes with
    /// immediate data; this is for the `write_floor` example, which measures what perftest's
    /// `ib_write_lat` does beside it.
    pub fn post_write_inline(
        &mut self,
        wr_id: u64,
        data: &[u8],
        remote_addr: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        self.post_inline(wr_id, ibv_wr_opcode::IBV_WR_RDMA_WRITE, data, remote_addr, rkey, 0, signaled)
    }

    /// Posts `data` inline as one work request of `opcode`.
    #[allow(clippy::too_many_arguments)] // each is one field of the work request
    fn post_inline(
        &mut self,
        wr_id: u64,
        opcode: ibv_wr_opcode::Type,
        data: &[u8],
        remote_addr: u64,
        rkey: u32,
        imm_be: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        assert!(data.len() <= INLINE_BYTES_MAX, "inline writes carry at most {INLINE_BYTES_MAX} bytes");
        // An inline request's SGE names the bytes to copy; it needs no key.
        let sge = ibv_sge { addr: data.as_ptr() as u64, length: data.len() as u32, lkey: 0 };
        let flags = signal_flags(signaled) | ibv_send_flags::IBV_SEND_INLINE.0;
        // SAFETY: with IBV_SEND_INLINE the provider copies `data` into the send queue before
        // ibv_post_send returns, so the borrow of `data` outlives every use of it.
        unsafe { self.post_one(wr_id, opcode, flags, sge, remote_addr, rkey, imm_be) }
    }

    /// RDMA READ of `len` bytes at the peer's `remote_addr` (in the chunk `rkey` names) into
    /// `local[offset..offset + len]`. The data is there once the completion (opcode RdmaRead) of
    /// this request, or of a later signaled one on this queue pair, is polled: an RC send queue
    /// completes in order, so unsignaled reads followed by a signaled one cost one completion.
    /// Panics if the local span crosses a chunk or `len` exceeds u32.
    ///
    /// # Safety
    /// `local[offset..offset + len]` must stay valid (the Region alive) and must be neither read
    /// nor written by the CPU until that completion is polled: the device writes it
    /// asynchronously.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_read(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote_addr: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let sge = local_sge(local, offset, len);
        let op = ibv_wr_opcode::IBV_WR_RDMA_READ;
        // As in post_write_imm, but the device writes the span: the caller neither reads nor
        // writes it until the completion, whose poll orders the device's writes before the CPU's
        // later loads (the provider's poll_cq reads the CQE with the barrier it needs).
        // SAFETY: the span is registered and, by the caller's contract, untouched until the completion.
        unsafe { self.post_one(wr_id, op, signal_flags(signaled), sge, remote_addr, rkey, 0) }
    }

    /// Posts one work request with one SGE (none when `sge.length` is 0: a zero SGE length means
    /// 2 GiB on some providers) through the provider's `post_send`: one call, no allocation.
    ///
    /// # Safety
    /// Unless `flags` has IBV_SEND_INLINE, the SGE's span must be registered under its lkey and
    /// stay valid (and, for a write, unmodified) until the request completes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn post_one(
        &mut self,
        wr_id: u64,
        opcode: ibv_wr_opcode::Type,
        flags: u32,
        mut sge: ibv_sge,
        remote_addr: u64,
        rkey: u32,
        imm_be: u32,
    ) -> Result<(), VerbsError> {
        let sges = if sge.length > 0 { std::slice::from_mut(&mut sge) } else { &mut [] };
        // SAFETY: the caller's contract for the SGE's span is this function's.
        unsafe { self.post_sges(wr_id, opcode, flags, sges, remote_addr, rkey, imm_be) }
    }

    /// Posts one work request gathering `sges` (none for a zero-length request) through the
    /// provider's `post_send`: one call, no allocation.
    ///
    /// # Safety
    /// Unless `flags` has IBV_SEND_INLINE, every SGE's span must be registered under its lkey
    /// and stay valid (and, for a write, unmodified) until the request completes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn post_sges(
        &mut self,
        wr_id: u64,
        opcode: ibv_wr_opcode::Type,
        flags: u32,
        sges: &mut [ibv_sge],
        remote_addr: u64,
        rkey: u32,
        imm_be: u32,
    ) -> Result<(), VerbsError> {
        // SAFETY: ibv_send_wr is a plain C struct (integers, pointers and unions of them), for
        // which all-zero bytes are its documented empty value.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = opcode;
        wr.send_flags = flags;
        wr.imm_data_invalidated_rkey_union.imm_data = imm_be;
        wr.wr = wr_t { rdma: rdma_t { remote_addr, rkey } };
        if !sges.is_empty() {
            wr.sg_list = sges.as_mut_ptr();
            wr.num_sge = sges.len() as i32;
        }
        let mut bad_wr = ptr::null_mut();
        // Why this is sound: the QP is live (owned by `self.qp`); `wr` is a single, terminated request on the
        // stack, and `sges` (no more than the queue pair was created for, else the provider
        // refuses the request) outlive the call. The provider copies them into its send queue
        // (and, inline, the bytes they name) before returning; what the device later reads is the
        // caller's to keep valid, per this function's contract.
        // SAFETY: a live QP, a well-formed request, and the caller's contract for its memory.
        let rc = unsafe { rdma_mummy_sys::ibv_post_send(self.qp.qp().as_ptr(), &mut wr, &mut bad_wr) };
        match rc {
            0 => Ok(()),
            errno => Err(VerbsError::PostSend { qpn: self.qpn(), wr_id, source: io::Error::from_raw_os_error(errno) }),
        }
    }

    fn enter_init(&mut self) -> Result<(), VerbsError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead);
        self.modify(&attr, "INIT")
    }

    fn enter_rtr(&mut self, remote: &QpInfo) -> Result<(), VerbsError> {
        // RoCE has no LIDs: the path is the GRH (source GID index, destination GID, hop limit).
        let mut address = AddressHandleAttribute::new();
        address.setup_port(self.port).setup_grh(&Gid { raw: remote.gid }, 0, self.gid_index, HOP_LIMIT, 0);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(self.mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(self.dest_read_depth)
            .setup_min_rnr_timer(MIN_RNR_TIMER)
            .setup_address_vector(&address);
        self.modify(&attr, "RTR")
    }

    fn enter_rts(&mut self) -> Result<(), VerbsError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(ACK_TIMEOUT)
            .setup_retry_cnt(RETRY_COUNT)
            .setup_rnr_retry(RNR_RETRY)
            .setup_max_read_atomic(self.read_depth);
        self.modify(&attr, "RTS")
    }

    fn reset_to_init(&mut self) -> Result<(), VerbsError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Reset);
        self.modify(&attr, "RESET")?;
        self.enter_init()
    }

    fn modify(&mut self, attr: &QueuePairAttribute, target: &'static str) -> Result<(), VerbsError> {
        let qpn = self.qpn();
        self.qp.modify(attr).map_err(|source| VerbsError::ModifyQp { qpn, target, source })
    }
}

fn check_depth(what: &'static str, asked: u32, max: u32) -> Result<(), VerbsError> {
    if asked == 0 || asked > max {
        return Err(VerbsError::Depth { what, asked, max });
    }
    Ok(())
}

fn check_peer(remote: &QpInfo) -> Result<(), VerbsError> {
    let reason = if remote.qpn & !QPN_PSN_MASK != 0 {
        format!("queue pair number {:#x} is wider than 24 bits", remote.qpn)
    } else if remote.psn & !QPN_PSN_MASK != 0 {
        format!("PSN {:#x} is wider than 24 bits", remote.psn)
    } else if remote.gid == [0; 16] {
        "its GID is all zeros".to_string()
    } else {
        return Ok(());
    };
    Err(VerbsError::BadPeer { reason })
}

/// A 24-bit PSN from the standard library's per-process random hash keys: unpredictable enough
/// that a reconnected QP does not accept a stale packet of its previous life.
fn random_psn() -> u32 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher
        .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish() as u32 & QPN_PSN_MASK
}

/// A send work request's flags: signaled, or not.
fn signal_flags(signaled: bool) -> u32 {
    if signaled { ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 }
}

/// The scatter/gather entry for `region[offset..offset + len]`; panics if it is not inside one
/// registration chunk or longer than a work request can carry.
fn local_sge(region: &Region, offset: usize, len: usize) -> ibv_sge {
    let lkey = region.lkey(offset, len);
    let length = u32::try_from(len).expect("a work request carries at most u32::MAX bytes");
    ibv_sge { addr: region.addr() + offset as u64, length, lkey }
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
