//! The io_uring backend: one ring per shard, owned by the shard thread, with the shard's I/O
//! buffers and files registered once.
//!
//! This is the engine's only `unsafe` besides the arena's mapping: an SQE hands the kernel a raw
//! pointer into one of [`super::Disk`]'s buffers, which the kernel reads or writes after `push`
//! returns. `Disk` owns the buffers for its whole life, never moves or frees them while the ring
//! lives, and refuses to lend a buffer to the CPU while an SQE that names it is in flight.

#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::IoBuf;

/// Operations the ring must support, by name for the notice when one is missing.
const NEEDED: [(u8, &str); 3] = [(opcode::WriteFixed::CODE, "WRITE_FIXED"), (opcode::ReadFixed::CODE, "READ_FIXED"), (opcode::Fsync::CODE, "FSYNC")];

/// One request as the ring sees it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Sqe {
    Write { file: u32, buf: u16, addr: *const u8, len: u32, offset: u64 },
    Read { file: u32, buf: u16, addr: *mut u8, len: u32, offset: u64 },
    Sync { file: u32 },
}

pub(super) struct Uring {
    ring: IoUring,
    /// Readable when completions arrived: the shard sleeps on it beside its sockets.
    event: File,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").field("entries", &self.ring.params().sq_entries()).finish()
    }
}

impl Uring {
    /// A ring of `entries` with room for `files_max` registered files and `bufs` registered.
    /// An error means "use the blocking backend"; its text says why.
    pub(super) fn new(entries: u32, files_max: u32, bufs: &[IoBuf]) -> Result<Self, String> {
        let ring = IoUring::new(entries).map_err(|e| format!("io_uring_setup failed: {e}"))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(|e| format!("io_uring probe failed: {e}"))?;
        if let Some((_, name)) = NEEDED.iter().find(|(code, _)| !probe.is_supported(*code)) {
            return Err(format!("this kernel's io_uring lacks {name}"));
        }
        ring.submitter().register_files_sparse(files_max).map_err(|e| format!("registering files failed: {e}"))?;
        let iovecs: Vec<libc::iovec> = bufs.iter().map(|b| libc::iovec { iov_base: b.ptr().cast(), iov_len: b.len() }).collect();
        // Why this is sound: every iovec spans one of `Disk`'s buffers, which live (mapped, never
        // moved) for as long as this ring does: `Disk` declares the ring before the buffers, so it
        // is dropped first, and buffers are never added or removed after this call.
        // SAFETY: the buffers outlive the ring, which is all register_buffers asks.
        unsafe { ring.submitter().register_buffers(&iovecs) }
            .map_err(|e| format!("registering buffers failed: {e} (raise RLIMIT_MEMLOCK: ulimit -l unlimited)"))?;
        // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("eventfd failed: {}", io::Error::last_os_error()));
        }
        // Why this is sound: `fd` was just returned by eventfd, is open, and nothing else owns it.
        // SAFETY: a fresh descriptor owned by no one else.
        let event = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        ring.submitter().register_eventfd(event.as_raw_fd()).map_err(|e| format!("registering an eventfd failed: {e}"))?;
        Ok(Self { ring, event })
    }

    /// The eventfd the kernel signals on every completion.
    pub(super) fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Resets the eventfd's count, so that the next completion makes it readable again.
    pub(super) fn clear_event(&mut self) {
        let mut count = [0u8; 8];
        // Nonblocking: WouldBlock just means nothing was signalled since the last clear.
        let _ = self.event.read(&mut count);
    }

    /// Puts `fd` in registered-file slot `slot`.
    pub(super) fn register_file(&mut self, slot: u32, fd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_files_update(slot, &[fd]).map(|_| ())
    }

    /// Free submission-queue entries.
    pub(super) fn room(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Queues `sqes` as one linked chain (each starts after the one before succeeded) and
    /// submits it. `user_data(i)` tags the i-th. The caller checked [`room`](Self::room).
    ///
    /// # Safety
    /// Every buffer span an `Sqe` names must stay valid, and untouched by the CPU, until the
    /// completion carrying its tag has been taken by [`complete`](Self::complete).
    pub(super) unsafe fn submit_chain(&mut self, sqes: &[Sqe], user_data: impl Fn(usize) -> u64) -> io::Result<()> {
        {
            let mut sq = self.ring.submission();
            for (i, sqe) in sqes.iter().enumerate() {
                let link = if i + 1 < sqes.len() { squeue::Flags::IO_LINK } else { squeue::Flags::empty() };
                let entry = match *sqe {
                    Sqe::Write { file, buf, addr, len, offset } => opcode::WriteFixed::new(types::Fixed(file), addr, len, buf).offset(offset).build(),
                    Sqe::Read { file, buf, addr, len, offset } => opcode::ReadFixed::new(types::Fixed(file), addr, len, buf).offset(offset).build(),
                    Sqe::Sync { file } => opcode::Fsync::new(types::Fixed(file)).build(),
                };
                let entry = entry.flags(link).user_data(user_data(i));
                // SAFETY: the caller keeps every buffer this SQE names valid until its completion.
                unsafe { sq.push(&entry) }.map_err(|_| io::Error::other("submission queue full"))?;
            }
        }
        self.ring.submit()?;
        Ok(())
    }

    /// Hands every completion there is to `f` as (tag, result); with `wait`, first blocks until
    /// there is at least one.
    pub(super) fn complete(&mut self, wait: bool, mut f: impl FnMut(u64, i32)) -> io::Result<usize> {
        if wait {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        let cq: cqueue::CompletionQueue<'_> = self.ring.completion();
        let mut n = 0;
        for cqe in cq {
            f(cqe.user_data(), cqe.result());
            n += 1;
        }
        Ok(n)
    }
}
