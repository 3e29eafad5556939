//! Pinned memory for table values and updater state.
//!
//! Every table part lives in anonymous memory mapped on its shard's own thread (so the pages are
//! local to the shard's core), populated up front so the data path never faults, backed by
//! transparent huge pages where the kernel allows, and locked (mlock) while `RLIMIT_MEMLOCK`
//! allows. When the limit is too low, the server says so in one line, once, and runs unpinned.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{Advice, MmapMut, MmapOptions};

use crate::error::{EngineError, Result};

static MEMLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// A pinned array of `T`.
#[derive(Debug)]
pub struct Pinned<T: bytemuck::Pod> {
    map: Option<MmapMut>,
    len: usize,
    locked: bool,
    _t: PhantomData<T>,
}

impl<T: bytemuck::Pod> Pinned<T> {
    /// An empty array that maps nothing.
    pub fn empty() -> Self {
        Self { map: None, len: 0, locked: false, _t: PhantomData }
    }

    /// True when the pages are locked in memory.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        match &self.map {
            Some(m) => &bytemuck::cast_slice(&m[..])[..self.len],
            None => &[],
        }
    }

    /// The elements, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        match &mut self.map {
            Some(m) => &mut bytemuck::cast_slice_mut(&mut m[..])[..self.len],
            None => &mut [],
        }
    }
}

/// Maps pinned arrays and accounts for them, per shard.
#[derive(Debug, Default)]
pub struct Arena {
    bytes_mapped: usize,
    bytes_locked: usize,
}

impl Arena {
    /// Bytes mapped so far, and how many of them are locked.
    pub fn bytes(&self) -> (usize, usize) {
        (self.bytes_mapped, self.bytes_locked)
    }

    /// Maps `len` zeroed elements.
    pub fn alloc<T: bytemuck::Pod>(&mut self, len: usize) -> Result<Pinned<T>> {
        if len == 0 {
            return Ok(Pinned::empty());
        }
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or(EngineError::ArenaMap {
            bytes: usize::MAX,
            reason: "size overflows".into(),
        })?;
        let map = MmapOptions::new()
            .len(bytes)
            .populate()
            .map_anon()
            .map_err(|e| EngineError::ArenaMap { bytes, reason: e.to_string() })?;
        // Huge pages are an optimisation; a kernel without THP simply says no.
        let _ = map.advise(Advice::HugePage);
        let locked = self.try_lock(&map, bytes);
        self.bytes_mapped += bytes;
        if locked {
            self.bytes_locked += bytes;
        }
        Ok(Pinned { map: Some(map), len, locked, _t: PhantomData })
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
    }
}
