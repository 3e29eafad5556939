//! Pinned memory for table values and updater state.
//!
//! Every table part lives in anonymous memory mapped on its shard's own thread (so the pages are
//! local to the shard's core), populated up front so the data path never faults, backed by
//! transparent huge pages where the kernel allows, and locked (mlock) while `RLIMIT_MEMLOCK`
//! allows. When the limit is too low, the server says so in one line, once, and runs unpinned.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use memmap2::{Advice, MmapMut, MmapOptions, MmapRaw};
use tessera_transport::expose::StableMemory;

use crate::error::{EngineError, Result};

static MEMLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// Bytes an arena's arrays hold now: counted when mapped, and no longer once dropped.
#[derive(Debug, Default)]
struct Held {
    mapped: AtomicUsize,
    locked: AtomicUsize,
}

/// One array's share of its arena's [`Held`] bytes, given back when the array is dropped.
#[derive(Debug)]
struct Account {
    held: Arc<Held>,
    bytes: usize,
    locked: bool,
}

impl Account {
    fn new(held: &Arc<Held>, bytes: usize, locked: bool) -> Self {
        held.mapped.fetch_add(bytes, Ordering::Relaxed);
        if locked {
            held.locked.fetch_add(bytes, Ordering::Relaxed);
        }
        Self { held: held.clone(), bytes, locked }
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.held.mapped.fetch_sub(self.bytes, Ordering::Relaxed);
        if self.locked {
            self.held.locked.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// A pinned array of `T`.
#[derive(Debug)]
pub struct Pinned<T: bytemuck::Pod> {
    map: Option<(MmapMut, Account)>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: bytemuck::Pod> Pinned<T> {
    /// An empty array that maps nothing.
    pub fn empty() -> Self {
        Self { map: None, len: 0, _t: PhantomData }
    }

    /// True when the pages are locked in memory.
    pub fn is_locked(&self) -> bool {
        self.map.as_ref().is_some_and(|(_, a)| a.locked)
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        match &self.map {
            Some((m, _)) => &bytemuck::cast_slice(&m[..])[..self.len],
            None => &[],
        }
    }

    /// Asks the CPU to bring element `at` into the cache (nothing past the end). Only a hint:
    /// the program reads nothing through it, and it never faults.
    #[allow(unsafe_code)]
    pub fn prefetch(&self, at: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Some(element) = self.as_slice().get(at) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: `_mm_prefetch` is unsafe only for its `sse` target feature, which is in the
            // x86_64 baseline. The address is that of an element of this live mapping, and a
            // prefetch neither reads into the program nor faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(element).cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = at;
    }

    /// The elements, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        match &mut self.map {
            Some((m, _)) => &mut bytemuck::cast_slice_mut(&mut m[..])[..self.len],
            None => &mut [],
        }
    }
}

/// A pinned mapping that a transport may keep registered (and so mapped) after its owner is gone.
#[derive(Debug)]
struct Shared(MmapRaw);

// SAFETY: an MmapRaw never moves or resizes and is unmapped only when dropped, which the Arc
// delays until the last holder (the owning `Exposed` and any transport registration) is gone.
#[allow(unsafe_code)]
unsafe impl StableMemory for Shared {
    fn span(&self) -> (u64, usize) {
        (self.0.as_ptr() as u64, self.0.len())
    }
}

/// Pinned u64 words that a transport may also let remote peers read (dense table blocks). The
/// owner alone reads and writes them from the CPU; other holders of [`Exposed::memory`] only
/// keep the mapping alive and hand its address to a device.
#[derive(Debug)]
pub struct Exposed {
    map: Arc<Shared>,
    len: usize,
    account: Account,
}

impl Exposed {
    /// True when the pages are locked in memory.
    pub fn is_locked(&self) -> bool {
        self.account.locked
    }

    /// The words.
    pub fn words(&self) -> &[u64] {
        &bytemuck::cast_slice(self.bytes())[..self.len]
    }

    /// The words, mutably.
    pub fn words_mut(&mut self) -> &mut [u64] {
        let len = self.len;
        &mut bytemuck::cast_slice_mut(self.bytes_mut())[..len]
    }

    /// A handle that keeps the mapping alive, for the transport.
    pub fn memory(&self) -> Arc<dyn StableMemory> {
        self.map.clone()
    }

    #[allow(unsafe_code)]
    fn bytes(&self) -> &[u8] {
        // Why this is sound: the mapping lives as long as `self.map`; it was made from a writable, populated
        // anonymous MmapMut, so all `len()` bytes are readable. Rust code reaches these bytes only
        // through this owner (`Exposed` is not Clone and `Shared` gives out no access), so the
        // shared borrow cannot overlap a `bytes_mut` borrow. Remote reads by a device do not
        // write.
        // SAFETY: mapped for as long as `self.map` lives, and borrowed only through this owner.
        unsafe { std::slice::from_raw_parts(self.map.0.as_ptr(), self.map.0.len()) }
    }

    #[allow(unsafe_code)]
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only live Rust borrow of the bytes.
        unsafe { std::slice::from_raw_parts_mut(self.map.0.as_mut_ptr(), self.map.0.len()) }
    }
}

/// Maps pinned arrays and accounts for them, per shard.
#[derive(Debug, Default)]
pub struct Arena {
    held: Arc<Held>,
}

impl Arena {
    /// Bytes the arrays mapped here and not yet dropped hold, and how many of them are locked.
    pub fn bytes(&self) -> (usize, usize) {
        (self.held.mapped.load(Ordering::Relaxed), self.held.locked.load(Ordering::Relaxed))
    }

    /// Maps `len` zeroed elements.
    pub fn alloc<T: bytemuck::Pod>(&mut self, len: usize) -> Result<Pinned<T>> {
        if len == 0 {
            return Ok(Pinned::empty());
        }
        let (map, account) = self.map(len, std::mem::size_of::<T>())?;
        Ok(Pinned { map: Some((map, account)), len, _t: PhantomData })
    }

    /// Maps, populates and (when the limit allows) locks `len` elements of `size` bytes.
    fn map(&mut self, len: usize, size: usize) -> Result<(MmapMut, Account)> {
        let bytes = len.checked_mul(size).ok_or_else(|| EngineError::ArenaMap { bytes: usize::MAX, reason: "size overflows".into() })?;
        let mut map = MmapOptions::new().len(huge_page_len(bytes)).map_anon().map_err(|e| EngineError::ArenaMap { bytes, reason: e.to_string() })?;
        // Huge pages are an optimisation; a kernel without THP simply says no. Asked for before
        // the first touch, since pages populated small stay small.
        let _ = map.advise(Advice::HugePage);
        if map.advise(Advice::PopulateWrite).is_err() {
            // Kernels before 5.14 cannot populate on advice: touch every page instead.
            map.iter_mut().step_by(SMALL_PAGE_BYTES).for_each(|b| *b = 0);
        }
        let locked = self.try_lock(&map, map.len());
        let account = Account::new(&self.held, map.len(), locked);
        Ok((map, account))
    }

    /// Maps `len` zeroed words that a transport may expose (see [`Exposed`]). Panics if `len` is 0.
    pub fn alloc_exposed(&mut self, len: usize) -> Result<Exposed> {
        assert!(len > 0, "an exposed array has at least one word");
        let (map, account) = self.map(len, 8)?;
        Ok(Exposed { map: Arc::new(Shared(MmapRaw::from(map))), len, account })
    }

    fn try_lock(&self, map: &MmapMut, bytes: usize) -> bool {
        match map.lock() {
            Ok(()) => true,
            Err(e) => {
                if !MEMLOCK_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cannot pin {} KiB of table memory ({e}); RLIMIT_MEMLOCK is {}; running unpinned. \
                         Raise it: `ulimit -l unlimited` (systemd: LimitMEMLOCK=infinity)",
                        bytes >> 10,
                        memlock_limit_text()
                    );
                }
                false
            }
        }
    }
}

/// The smallest page any kernel this runs on maps.
const SMALL_PAGE_BYTES: usize = 4096;
/// A transparent huge page (x86-64 and most arm64 kernels).
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// How long to map an array of `bytes`: one of at least a huge page is rounded up to whole huge
/// pages, so that the kernel places it on a huge-page boundary and backs all of it with huge
/// pages (a probe of a table larger than the TLB's reach then rarely walks the page tables);
/// a smaller one is left as it is.
fn huge_page_len(bytes: usize) -> usize {
    if bytes >= HUGE_PAGE_BYTES {
        bytes.next_multiple_of(HUGE_PAGE_BYTES)
    } else {
        bytes
    }
}

/// The soft `RLIMIT_MEMLOCK`, as a person reads it.
pub fn memlock_limit_text() -> String {
    match rustix::process::getrlimit(rustix::process::Resource::Memlock).current {
        Some(bytes) => format!("{} KiB", bytes >> 10),
        None => "unlimited".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_is_zeroed_and_writable() {
        let mut arena = Arena::default();
        let mut a: Pinned<f32> = arena.alloc(10_000).unwrap();
        assert!(a.as_slice().iter().all(|v| *v == 0.0));
        a.as_mut_slice()[9_999] = 1.5;
        assert_eq!(a.as_slice()[9_999], 1.5);
        assert_eq!(arena.bytes().0, 40_000);
        let e: Pinned<u64> = arena.alloc(0).unwrap();
        assert!(e.as_slice().is_empty());
        let b = arena.alloc_exposed(10).unwrap();
        assert_eq!(arena.bytes().0, 40_080);
        drop(a);
        drop(b);
        assert_eq!(arena.bytes().0, 0, "dropped arrays hold nothing");
    }

    #[test]
    fn arrays_of_a_huge_page_or_more_map_whole_huge_pages_and_stay_zeroed() {
        assert_eq!(huge_page_len(4096), 4096, "small arrays map what they need");
        assert_eq!(huge_page_len(HUGE_PAGE_BYTES), HUGE_PAGE_BYTES);
        assert_eq!(huge_page_len(HUGE_PAGE_BYTES + 1), 2 * HUGE_PAGE_BYTES);
        let mut arena = Arena::default();
        let words = (HUGE_PAGE_BYTES + 3 * SMALL_PAGE_BYTES) / 8;
        let mut a: Pinned<u64> = arena.alloc(words).unwrap();
        assert_eq!(a.as_slice().len(), words, "the array is as long as asked, whatever was mapped");
        assert!(a.as_slice().iter().all(|w| *w == 0));
        a.as_mut_slice()[words - 1] = 9;
        assert_eq!(arena.bytes().0, 2 * HUGE_PAGE_BYTES, "what is mapped is what is counted");
    }

    #[test]
    fn exposed_words_outlive_their_owner_for_the_transport() {
        let mut arena = Arena::default();
        let mut a = arena.alloc_exposed(1000).unwrap();
        assert!(a.words().iter().all(|w| *w == 0));
        a.words_mut()[999] = 7;
        let keep = a.memory();
        let (addr, len) = keep.span();
        assert_eq!((addr % 4096, len), (0, 8000));
        assert_eq!(a.words()[999], 7);
        drop(a);
        // The mapping is still there for the holder of `keep`.
        assert_eq!(keep.span(), (addr, len));
    }
}
