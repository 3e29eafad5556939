//! Local-disk I/O for one shard: files opened with `O_DIRECT`, 4 KiB-aligned buffers owned by
//! the [`Disk`], and requests submitted as linked chains (say, the writes of a log batch and then
//! the fsync that makes them durable) whose completions the shard's loop collects without
//! blocking.
//!
//! Two backends behind one API:
//! - **io_uring** ([`uring`]): one ring per shard, owned by the shard thread; buffers and files
//!   are registered once; a chain is SQEs joined with `IOSQE_IO_LINK`, so a failed write cancels
//!   the fsync after it.
//! - **blocking**: `pwrite`/`pread`/`fsync` at submission, where io_uring is missing, disabled
//!   (`kernel.io_uring_disabled`), filtered by seccomp or lacks an operation. [`Disk::open`] says
//!   so in one line. Completions are then ready on the next poll. Both pass the same tests.
//!
//! A buffer is either the CPU's or the kernel's: [`Disk::buf_mut`] refuses a buffer while a
//! request that names it is in flight, so no request can see a buffer change under it.

mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use crate::config::{IO_ALIGN_BYTES, IO_CHAIN_OPS_MAX};
use crate::error::{EngineError, Result};

/// Which backend a [`Disk`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Blocking,
}

/// What a [`Disk`] is made of. Sized once: the data path allocates nothing.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Submission-queue entries of the ring.
    pub ring_entries: u32,
    /// Most files open at once.
    pub files_max: u32,
    /// Bytes of each buffer, each a multiple of [`IO_ALIGN_BYTES`].
    pub buffer_bytes: Vec<usize>,
    /// Use the blocking backend even where io_uring works (tests run both).
    pub force_blocking: bool,
}

/// A file of a [`Disk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId(u32);

/// A buffer of a [`Disk`]: the index in [`DiskConfig::buffer_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufId(pub u16);

/// One step of a chain. Offsets, lengths and buffer spans are multiples of [`IO_ALIGN_BYTES`].
#[derive(Debug, Clone)]
pub enum Op {
    /// Writes `buf[span]` at `offset` of `file`.
    Write { file: FileId, buf: BufId, span: Range<usize>, offset: u64 },
    /// Reads `span.len()` bytes at `offset` of `file` into `buf[span]`.
    Read { file: FileId, buf: BufId, span: Range<usize>, offset: u64 },
    /// Makes everything written to `file` durable (`fsync`).
    Sync { file: FileId },
}

/// A chain that ended: `Ok` when every step did, else the first failure (the steps after it
/// were not run).
#[derive(Debug)]
pub struct Done {
    pub token: u64,
    pub result: Result<()>,
}

/// A page-aligned anonymous mapping: what `O_DIRECT` needs.
#[derive(Debug)]
pub struct IoBuf {
    map: MmapMut,
}

impl IoBuf {
    fn new(bytes: usize) -> Result<Self> {
        let map = MmapMut::map_anon(bytes).map_err(|e| EngineError::ArenaMap { bytes, reason: e.to_string() })?;
        Ok(Self { map })
    }

    fn ptr(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

#[derive(Debug)]
struct OpenFile {
    file: File,
    path: PathBuf,
}

/// A chain in flight: its token, steps not yet completed, and its first failure.
#[derive(Debug)]
struct Chain {
    token: u64,
    ops: [Option<Op>; IO_CHAIN_OPS_MAX],
    pending: usize,
    failed: Option<EngineError>,
}

/// One shard's disk. Field order matters: the ring is dropped before the buffers it registered.
#[derive(Debug)]
pub struct Disk {
    uring: Option<uring::Uring>,
    bufs: Vec<IoBuf>,
    /// Requests in flight per buffer.
    busy: Vec<u32>,
    files: Vec<Option<OpenFile>>,
    chains: Vec<Option<Chain>>,
    /// Blocking backend: chains already done, waiting to be polled.
    ready: Vec<Done>,
    /// The notice that a filesystem refused O_DIRECT was given.
    buffered_notice: bool,
}

impl Disk {
    /// Maps the buffers and sets up io_uring, or the blocking backend with a one-line notice
    /// saying why.
    pub fn open(cfg: &DiskConfig) -> Result<Disk> {
        let bad = |field, value: String, reason: &str| Err(EngineError::BadConfig { field, value, reason: reason.into() });
        if let Some(b) = cfg.buffer_bytes.iter().find(|b| **b == 0 || **b % IO_ALIGN_BYTES != 0) {
            return bad("buffer_bytes", b.to_string(), "each must be a non-zero multiple of 4096");
        }
        if cfg.buffer_bytes.len() > u16::MAX as usize || cfg.ring_entries < IO_CHAIN_OPS_MAX as u32 {
            return bad("ring_entries", cfg.ring_entries.to_string(), "must hold a whole chain; at most 65535 buffers");
        }
        let bufs = cfg.buffer_bytes.iter().map(|b| IoBuf::new(*b)).collect::<Result<Vec<_>>>()?;
        let uring = if cfg.force_blocking {
            None
        } else {
            match uring::Uring::new(cfg.ring_entries, cfg.files_max, &bufs) {
                Ok(u) => Some(u),
                Err(why) => {
                    tracing::warn!("io_uring unavailable ({why}); disk I/O falls back to pwrite/fsync");
                    None
                }
            }
        };
        let chains_max = cfg.ring_entries as usize;
        Ok(Disk {
            uring,
            busy: vec![0; bufs.len()],
            bufs,
            files: (0..cfg.files_max).map(|_| None).collect(),
            chains: (0..chains_max).map(|_| None).collect(),
            ready: Vec::with_capacity(chains_max),
            buffered_notice: false,
        })
    }

    pub fn backend(&self) -> Backend {
        if self.uring.is_some() {
            Backend::Uring
        } else {
            Backend::Blocking
        }
    }

    /// Opens `path` for direct I/O (creating it if `create`), or fails with the reason. On a
    /// filesystem that refuses `O_DIRECT` (tmpfs, 9p), the file is opened through the page cache
    /// with a one-line notice: commits stay durable, since each ends with an fsync, but every
    /// byte is copied once more.
    pub fn open_file(&mut self, path: &Path, create: bool) -> Result<FileId> {
        let slot = self.files.iter().position(Option::is_none).ok_or_else(|| EngineError::Disk {
            op: "open",
            path: path.display().to_string(),
            reason: format!("{} files already open, the most", self.files.len()),
        })?;
        let open = |flags| OpenOptions::new().read(true).write(true).create(create).custom_flags(flags).open(path);
        let file = match open(libc::O_DIRECT) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                if !self.buffered_notice {
                    self.buffered_notice = true;
                    tracing::warn!(path = %path.display(), "this filesystem refuses O_DIRECT; writing through the page cache (fsync still makes every commit durable)");
                }
                open(0).map_err(|e| disk_error("open", path, &e))?
            }
            opened => opened.map_err(|e| disk_error("open (O_DIRECT)", path, &e))?,
        };
        if let Some(u) = self.uring.as_mut() {
            u.register_file(slot as u32, file.as_raw_fd()).map_err(|e| disk_error("register", path, &e))?;
        }
        self.files[slot] = Some(OpenFile { file, path: path.to_path_buf() });
        Ok(FileId(slot as u32))
    }

    /// Closes `file`. Refused while a chain that names it is in flight.
    pub fn close_file(&mut self, file: FileId) -> Result<()> {
        let named = self.chains.iter().flatten().flat_map(|c| c.ops.iter().flatten()).any(|op| op.file() == file);
        if named {
            return Err(self.error_on(file, "close", "requests on it are in flight".into()));
        }
        self.files[file.0 as usize] = None;
        Ok(())
    }

    /// The file's length in bytes.
    pub fn file_len(&self, file: FileId) -> Result<u64> {
        let f = self.file(file);
        f.file.metadata().map(|m| m.len()).map_err(|e| disk_error("stat", &f.path, &e))
    }

    /// Buffer `buf`, to read. (Reading a buffer a request writes into shows whatever the kernel
    /// has put there so far; callers read after the chain's `Done`.)
    pub fn buf(&self, buf: BufId) -> &[u8] {
        &self.bufs[buf.0 as usize].map
    }

    /// Buffer `buf`, to fill; `None` while a request that names it is in flight.
    pub fn buf_mut(&mut self, buf: BufId) -> Option<&mut [u8]> {
        if self.busy[buf.0 as usize] > 0 {
            return None;
        }
        Some(&mut self.bufs[buf.0 as usize].map)
    }

    /// A descriptor that turns readable when chains complete, for the shard to sleep on beside
    /// its sockets; `None` on the blocking backend, where chains complete at submission. Call
    /// [`clear_event`](Self::clear_event) before polling.
    pub fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.uring.as_ref().map(uring::Uring::event_fd)
    }

    /// Re-arms [`event_fd`](Self::event_fd).
    pub fn clear_event(&mut self) {
        if let Some(u) = self.uring.as_mut() {
            u.clear_event();
        }
    }

    /// Chains submitted and not yet returned by [`poll`](Self::poll) or [`wait`](Self::wait).
    pub fn in_flight(&self) -> usize {
        self.chains.iter().flatten().count() + self.ready.len()
    }

    /// Submits `ops` to run one after the other; `token` comes back in one [`Done`] when the
    /// chain is over. Checks every step first: a refused chain submitted nothing.
    #[allow(unsafe_code)] // the io_uring layer: SQEs name this Disk's buffers, argued below
    pub fn submit(&mut self, ops: &[Op], token: u64) -> Result<()> {
        self.check(ops)?;
        let Some(slot) = self.chains.iter().position(Option::is_none) else {
            return Err(EngineError::Disk { op: "submit", path: String::new(), reason: "too many chains in flight".into() });
        };
        let Some(uring) = self.uring.as_mut() else {
            let result = ops.iter().try_for_each(|op| self.run_blocking(op));
            self.ready.push(Done { token, result });
            return Ok(());
        };
        if uring.room() < ops.len() {
            return Err(EngineError::Disk { op: "submit", path: String::new(), reason: "submission queue full".into() });
        }
        let mut chain = Chain { token, ops: Default::default(), pending: ops.len(), failed: None };
        let mut staged = [uring::Sqe::Sync { file: 0 }; IO_CHAIN_OPS_MAX];
        for (i, op) in ops.iter().enumerate() {
            staged[i] = match op {
                Op::Write { file, buf, span, offset } => uring::Sqe::Write {
                    file: file.0,
                    buf: buf.0,
                    addr: self.bufs[buf.0 as usize].ptr().wrapping_add(span.start).cast_const(),
                    len: span.len() as u32,
                    offset: *offset,
                },
                Op::Read { file, buf, span, offset } => uring::Sqe::Read {
                    file: file.0,
                    buf: buf.0,
                    addr: self.bufs[buf.0 as usize].ptr().wrapping_add(span.start),
                    len: span.len() as u32,
                    offset: *offset,
                },
                Op::Sync { file } => uring::Sqe::Sync { file: file.0 },
            };
            chain.ops[i] = Some(op.clone());
        }
        // Why this is sound: each SQE names a span of one of this Disk's buffers, checked in
        // bounds above. The buffers live as long as the ring (field order) and are never moved.
        // `busy` counts the SQEs naming each buffer until their completions are taken in `reap`,
        // and `buf_mut` lends no buffer whose count is not zero, so the CPU leaves them alone.
        // SAFETY: every named buffer span stays valid and untouched until its completion.
        let submitted = unsafe { uring.submit_chain(&staged[..ops.len()], |i| tag(slot, i)) };
        if let Err(e) = submitted {
            return Err(EngineError::Disk { op: "submit", path: String::new(), reason: e.to_string() });
        }
        for op in ops {
            if let Some(b) = op.buf() {
                self.busy[b.0 as usize] += 1;
            }
        }
        self.chains[slot] = Some(chain);
        Ok(())
    }

    /// Appends every chain that has ended to `out`, without blocking; returns how many.
    pub fn poll(&mut self, out: &mut Vec<Done>) -> Result<usize> {
        self.reap(false, out)
    }

    /// Like [`poll`](Self::poll), but first blocks until at least one chain has ended, if any
    /// is in flight.
    pub fn wait(&mut self, out: &mut Vec<Done>) -> Result<usize> {
        let before = out.len();
        while out.len() == before && self.in_flight() > 0 {
            self.reap(true, out)?;
        }
        Ok(out.len() - before)
    }

    fn reap(&mut self, block: bool, out: &mut Vec<Done>) -> Result<usize> {
        let before = out.len();
        out.append(&mut self.ready);
        if let Some(uring) = self.uring.as_mut() {
            let (chains, files, busy) = (&mut self.chains, &self.files, &mut self.busy);
            let reaped = uring.complete(block && out.len() == before, |user_data, res| {
                let (slot, i) = untag(user_data);
                let chain = chains[slot].as_mut().expect("a completion for a chain in flight");
                let op = chain.ops[i].take().expect("one completion per step");
                if let Some(b) = op.buf() {
                    busy[b.0 as usize] -= 1;
                }
                if chain.failed.is_none() {
                    chain.failed = outcome(&op, res, files).err();
                }
                chain.pending -= 1;
                if chain.pending == 0 {
                    let c = chains[slot].take().expect("checked above");
                    out.push(Done { token: c.token, result: c.failed.map_or(Ok(()), Err) });
                }
            });
            reaped.map_err(|e| EngineError::Disk { op: "wait", path: String::new(), reason: e.to_string() })?;
        }
        Ok(out.len() - before)
    }

    fn check(&self, ops: &[Op]) -> Result<()> {
        if ops.is_empty() || ops.len() > IO_CHAIN_OPS_MAX {
            let reason = format!("a chain has 1 to {IO_CHAIN_OPS_MAX} steps, not {}", ops.len());
            return Err(EngineError::Disk { op: "submit", path: String::new(), reason });
        }
        for op in ops {
            let file = op.file();
            if self.files.get(file.0 as usize).is_none_or(Option::is_none) {
                return Err(EngineError::Disk { op: "submit", path: String::new(), reason: format!("{file:?} is not open") });
            }
            if let Op::Write { buf, span, offset, .. } | Op::Read { buf, span, offset, .. } = op {
                let aligned = [span.start, span.end, *offset as usize].iter().all(|v| v % IO_ALIGN_BYTES == 0);
                let fits = self.bufs.get(buf.0 as usize).is_some_and(|b| span.start < span.end && span.end <= b.len());
                if !aligned || !fits || span.len() > u32::MAX as usize {
                    let reason = format!("{op:?}: spans and offsets must be 4 KiB-aligned, non-empty and inside the buffer");
                    return Err(self.error_on(file, "submit", reason));
                }
            }
        }
        Ok(())
    }

    fn run_blocking(&mut self, op: &Op) -> Result<()> {
        let file = &self.files[op.file().0 as usize].as_ref().expect("checked by the caller").file;
        let n = match op {
            Op::Write { buf, span, offset, .. } => file.write_at(&self.bufs[buf.0 as usize].map[span.clone()], *offset),
            Op::Read { buf, span, offset, .. } => file.read_at(&mut self.bufs[buf.0 as usize].map[span.clone()], *offset),
            Op::Sync { .. } => file.sync_all().map(|()| 0),
        };
        let res = match n {
            Ok(n) => i32::try_from(n).unwrap_or(i32::MAX),
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        };
        outcome(op, res, &self.files)
    }

    fn file(&self, file: FileId) -> &OpenFile {
        self.files[file.0 as usize].as_ref().expect("a file id of this disk, still open")
    }

    fn error_on(&self, file: FileId, op: &'static str, reason: String) -> EngineError {
        let path = self.files.get(file.0 as usize).and_then(Option::as_ref).map(|f| f.path.display().to_string());
        EngineError::Disk { op, path: path.unwrap_or_default(), reason }
    }
}

impl Drop for Disk {
    /// Lets every request finish before the buffers go away.
    fn drop(&mut self) {
        let mut done = Vec::new();
        while self.chains.iter().any(Option::is_some) {
            if self.reap(true, &mut done).is_err() {
                break;
            }
            done.clear();
        }
    }
}

impl Op {
    fn file(&self) -> FileId {
        match self {
            Op::Write { file, .. } | Op::Read { file, .. } | Op::Sync { file } => *file,
        }
    }

    fn buf(&self) -> Option<BufId> {
        match self {
            Op::Write { buf, .. } | Op::Read { buf, .. } => Some(*buf),
            Op::Sync { .. } => None,
        }
    }
}

/// A step's result code as the engine's error: a negative errno, or a short transfer.
fn outcome(op: &Op, res: i32, files: &[Option<OpenFile>]) -> Result<()> {
    let path = || files[op.file().0 as usize].as_ref().map(|f| f.path.display().to_string()).unwrap_or_default();
    let (name, want) = match op {
        Op::Write { span, .. } => ("write", span.len()),
        Op::Read { span, .. } => ("read", span.len()),
        Op::Sync { .. } => ("fsync", 0),
    };
    if res == -libc::ENOSPC {
        return Err(EngineError::DiskFull { path: path() });
    }
    if res < 0 {
        return Err(EngineError::Disk { op: name, path: path(), reason: io::Error::from_raw_os_error(-res).to_string() });
    }
    if let (Op::Read { offset, .. }, Some(f)) = (op, files[op.file().0 as usize].as_ref()) {
        // A read that stops at the end of the file is whole: the caller knows the file's length.
        // (Chain such reads last: the kernel still cancels linked steps after a short one.)
        if (res as usize) < want && f.file.metadata().is_ok_and(|m| m.len() == offset + res as u64) {
            return Ok(());
        }
    }
    if (res as usize) < want {
        // A write cut short is how a filesystem says it filled up; the errno would come with
        // the next write. Ask the filesystem rather than guess.
        let file = files[op.file().0 as usize].as_ref().map(|f| &f.file);
        if matches!(op, Op::Write { .. }) && file.is_some_and(|f| space_left(f).is_some_and(|left| left < (want - res as usize) as u64)) {
            return Err(EngineError::DiskFull { path: path() });
        }
        let reason = format!("short {name}: {res} of {want} bytes");
        return Err(EngineError::Disk { op: name, path: path(), reason });
    }
    Ok(())
}

/// Bytes the filesystem holding `file` still has for unprivileged writers, if it says.
#[allow(unsafe_code)] // the disk layer: one fstatvfs call, argued below
fn space_left(file: &File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // Why this is sound: fstatvfs writes one statvfs into the buffer, which we own and which is
    // large enough; the descriptor stays open for the call (`file` is borrowed).
    // SAFETY: a valid descriptor and a valid, writable statvfs-sized buffer.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatvfs returned 0, so it filled the struct (and it started zeroed).
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn disk_error(op: &'static str, path: &Path, e: &io::Error) -> EngineError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return EngineError::DiskFull { path: path.display().to_string() };
    }
    EngineError::Disk { op, path: path.display().to_string(), reason: e.to_string() }
}

/// A completion's tag: the chain's slot and the step's index in it.
fn tag(slot: usize, i: usize) -> u64 {
    (slot as u64) << 8 | i as u64
}

fn untag(user_data: u64) -> (usize, usize) {
    ((user_data >> 8) as usize, (user_data & 0xff) as usize)
}

#[cfg(test)]
mod tests;

/// Replaces the file at `path` with `bytes` so that a crash leaves the old file or the new one,
/// never a mix: written under a temporary name and fsynced, renamed over `path`, and the
/// directory fsynced. `crash_points`, if any, are reached after the write and after the rename.
pub fn replace_file(path: &Path, bytes: &[u8], crash_points: Option<[&'static str; 2]>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let dir = path.parent().unwrap_or(Path::new("."));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        crash_points.inspect(|[written, _]| crate::crash::point(written));
        std::fs::rename(&tmp, path)?;
        crash_points.inspect(|[_, renamed]| crate::crash::point(renamed));
        Ok(())
    };
    write().map_err(|e| EngineError::Disk { op: "write", path: path.display().to_string(), reason: e.to_string() })?;
    sync_dir(dir)
}

/// Makes a directory's entries (a rename, a new file) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| EngineError::Disk { op: "fsync", path: dir.display().to_string(), reason: e.to_string() })
}
