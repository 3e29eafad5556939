//! Registered memory: regions this process maps, and memory others own exposed to peers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};

use crate::expose::StableMemory;
use sideway::ibverbs::memory_region::{MemoryRegion, RegisterMemoryRegionError, RegisterMemoryRegionErrorKind};
use sideway::ibverbs::AccessFlags;

use super::*;

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
        let mut map = MmapOptions::new().len(len).populate().map_anon().map_err(|source| VerbsError::Map { len, source })?;
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
        self.mrs.iter().map(|mr| RemoteChunk { addr: mr.get_ptr() as u64, len: mr.region_len() as u64, rkey: mr.rkey() }).collect()
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

    fn chunk_of(&self, offset: usize, len: usize) -> usize {
        self.span_chunk(offset, len).unwrap_or_else(|broken| panic!("{broken}"))
    }

    /// The chunk holding `[offset, offset + len)`, or why there is none.
    pub(super) fn span_chunk(&self, offset: usize, len: usize) -> Result<usize, String> {
        let end = offset.checked_add(len).ok_or("span end overflows")?;
        if end > self.len() {
            return Err(format!("span {offset}..{end} outside a region of {} bytes", self.len()));
        }
        let chunk = offset.min(self.len() - 1) / self.chunk_bytes;
        if len > 0 && (end - 1) / self.chunk_bytes != chunk {
            return Err(format!("span {offset}..{end} crosses a registration chunk boundary (chunks of {} bytes)", self.chunk_bytes));
        }
        Ok(chunk)
    }
}

/// Registers `base .. base + len` as MRs of at most `chunk_bytes` each.
///
/// # Safety
/// The span must be mapped (writable if `access` lets a peer write) and stay mapped until every
/// returned MR is dropped.
unsafe fn register_chunks(pd: &Pd, base: usize, len: usize, chunk_bytes: usize, access: Access) -> Result<Vec<Arc<MemoryRegion>>, VerbsError> {
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
        self.mrs.iter().map(|mr| RemoteChunk { addr: mr.get_ptr() as u64, len: mr.region_len() as u64, rkey: mr.rkey() }).collect()
    }
}

/// Turns a failed `ibv_reg_mr` into MemlockTooLow when the locked-memory limit is the likely
/// cause: the kernel answers ENOMEM (or EPERM) when pinning would exceed a finite
/// RLIMIT_MEMLOCK (`memlock_limit_bytes`, None = unlimited).
pub(super) fn registration_error(len: usize, offset: usize, end: usize, source: RegisterMemoryRegionError, memlock_limit_bytes: Option<u64>) -> VerbsError {
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
