//! A counting global allocator for the tests that prove a data path allocates nothing. It is the
//! one place in the test crates with `unsafe`: implementing `GlobalAlloc` is unsafe by nature.

#![allow(unsafe_code)]

/// A global allocator that counts allocations and forwards everything to the system allocator.
/// A test binary installs it with `#[global_allocator] static A: Counting = Counting;` and reads
/// [`allocations`] around the code that must not allocate.
#[derive(Debug)]
pub struct Counting;

static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Allocations (and reallocations) so far, in every thread of the process.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

// SAFETY: every call is forwarded unchanged to the system allocator; this only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from `System` with this layout, as the caller promises.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` with `layout`, as the caller promises.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}
