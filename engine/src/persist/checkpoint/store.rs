//! Writing a checkpoint of table parts through a [`Disk`], and loading the newest valid one.
//!
//! A checkpoint writes the chunks pushes changed since the previous one (all of them the first
//! time) to its own data file, fsyncs it, then commits its manifest: written under a temporary
//! name, fsynced, renamed, and the directory fsynced. Loading walks the manifests newest first
//! and takes the first whose every chunk reads back with the right checksum; one that does not
//! is reported, and the one before it is tried.
//!
//! A checkpoint is written a little at a time ([`Taking`]), between the shard's other work, so
//! pushes go on while it is written. It is still the state at one instant: each part's snapshot
//! ([`TablePart::begin_snapshot`]) copies aside a chunk a push is about to change before it was
//! written (copy on write).

use std::path::Path;
use std::time::Instant;

use crate::config::IO_ALIGN_BYTES;
use crate::error::{EngineError, Result};
use crate::persist::checkpoint::{ChunkHeader, ChunkRef, Manifest, PartManifest, RangeHeld, CHUNK_HEADER_BYTES, MANIFEST_VERSION};
use crate::persist::disk::{BufId, Disk, FileId, Op};
use crate::table::TablePart;

/// What one checkpoint wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Written {
    pub seq: u64,
    /// The log position it is exact at.
    pub lsn: u64,
    pub chunks_written: u64,
    pub chunks_kept: u64,
    pub bytes: u64,
    /// Chunks pushes changed while it was written, copied aside first.
    pub chunks_copied: u64,
    /// From its start to its manifest's commit.
    pub ms: u64,
}

/// Table parts by table id and first key, wherever their owner keeps them.
pub trait Parts {
    fn part(&mut self, table: u32, start: u64) -> Option<&mut TablePart>;
    /// Every part, in table order.
    fn each(&mut self) -> Vec<&mut TablePart>;
}

impl Parts for Vec<&mut TablePart> {
    fn part(&mut self, table: u32, start: u64) -> Option<&mut TablePart> {
        self.iter_mut().find(|p| p.id == table && p.owned().start == start).map(|p| &mut **p)
    }

    fn each(&mut self) -> Vec<&mut TablePart> {
        self.iter_mut().map(|p| &mut **p).collect()
    }
}

/// A checkpoint being written: chunks of the parts' snapshots are copied into one of two
/// buffers while the other one is written, so the device sees one write at a time (queue
/// depth one) and the copying overlaps it. The owner of the ring hands back the completions
/// of the writes this submits with `token` ([`complete`](Self::complete)) and calls
/// [`advance`](Self::advance) after each, and whenever it likes in between.
#[derive(Debug)]
pub struct Taking {
    /// A replicated shard's ranges at the checkpoint's LSN, for its manifest.
    pub replica: Vec<RangeHeld>,
    seq: u64,
    lsn: u64,
    wal: String,
    shard: u16,
    token: u64,
    file: FileId,
    bufs: [BufId; 2],
    /// The buffer chunks are copied into, and how full it is.
    cur: usize,
    filled: usize,
    /// Where the next write goes in `file`.
    offset: u64,
    /// A write (or, at the end, the fsync) is in flight.
    in_flight: bool,
    stage: Stage,
    tables: Vec<PartManifest>,
    /// The chunks to write (an index into `tables`, the chunk), and how many are copied already.
    queue: Vec<(usize, u64)>,
    next: usize,
    written: Written,
    started: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Chunks,
    Syncing,
    Synced,
}

impl Taking {
    /// Starts checkpoint `seq` of `parts` in `dir`, exact at log position `lsn` (the state they
    /// are in now), with `wal` the log that follows it. `prev` is the previous checkpoint's
    /// manifest: chunks no push changed since are referred to where it put them. `bufs` are two
    /// disk buffers of at least one chunk each. Nothing is submitted yet.
    #[allow(clippy::too_many_arguments)] // each is one input of the checkpoint
    pub fn begin(
        disk: &mut Disk,
        bufs: [BufId; 2],
        token: u64,
        dir: &Path,
        (seq, lsn, wal): (u64, u64, &str),
        shard: u16,
        parts: &mut dyn Parts,
        prev: Option<&Manifest>,
    ) -> Result<Taking> {
        let room = disk.buf(bufs[0]).len();
        let mut parts = parts.each();
        for part in parts.iter() {
            let need = ChunkHeader::disk_len(part.chunk_payload_len(0));
            if need > room {
                return Err(EngineError::BadConfig {
                    field: "checkpoint buffer",
                    value: room.to_string(),
                    reason: format!("a chunk of table {} takes {need} bytes", part.id),
                });
            }
        }
        let file = disk.open_file(&dir.join(Manifest::data_file_name(seq)), true)?;
        let mut written = Written { seq, lsn, chunks_written: 0, chunks_kept: 0, bytes: 0, chunks_copied: 0, ms: 0 };
        let mut tables = Vec::with_capacity(parts.len());
        let mut queue = Vec::new();
        for (i, part) in parts.iter_mut().enumerate() {
            let owned = (part.owned().start, part.owned().end);
            let earlier = prev.and_then(|m| m.tables.iter().find(|t| t.table == part.id && t.owned == owned && t.spec == part.spec));
            let earlier = earlier.filter(|t| t.chunks.len() as u64 == part.chunks() && t.chunk_slots == part.chunk_slots());
            if earlier.is_none() {
                part.mark_all_dirty();
            }
            let mut chunks: Vec<ChunkRef> = earlier.map(|t| t.chunks.clone()).unwrap_or_default();
            chunks.resize(part.chunks() as usize, ChunkRef { file: 0, offset: 0, len: 0, crc: 0 });
            let taken = part.begin_snapshot();
            written.chunks_kept += part.chunks() - taken.len() as u64;
            queue.extend(taken.into_iter().map(|c| (i, c)));
            let clocks = part.clocks().segments().map(|(r, c)| (r.start, c.to_vec())).collect();
            let owned = part.owned();
            tables.push(PartManifest {
                table: part.id,
                spec: part.spec.clone(),
                owned: (owned.start, owned.end),
                step: part.step(),
                chunk_slots: part.chunk_slots(),
                clocks,
                chunks,
            });
        }
        Ok(Taking {
            replica: Vec::new(),
            seq,
            lsn,
            wal: wal.to_string(),
            shard,
            token,
            file,
            bufs,
            cur: 0,
            filled: 0,
            offset: 0,
            in_flight: false,
            stage: Stage::Chunks,
            tables,
            queue,
            next: 0,
            written,
            started: Instant::now(),
        })
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// True while one of its writes is in flight.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Takes the completion of the write (or fsync) in flight.
    pub fn complete(&mut self, result: Result<()>) -> Result<()> {
        debug_assert!(self.in_flight);
        self.in_flight = false;
        result?;
        if self.stage == Stage::Syncing {
            self.stage = Stage::Synced;
        }
        Ok(())
    }

    /// Copies chunks into the free buffer and sends a full one when nothing is in flight; once
    /// every chunk is written, fsyncs the data file. True when that fsync is done and the
    /// checkpoint is ready to [`commit`](Self::commit). Never waits.
    pub fn advance(&mut self, disk: &mut Disk, parts: &mut dyn Parts) -> Result<bool> {
        loop {
            match self.stage {
                Stage::Synced => return Ok(true),
                Stage::Syncing => return Ok(false),
                Stage::Chunks => {}
            }
            self.gather(disk, parts)?;
            if self.in_flight {
                return Ok(false);
            }
            if self.filled > 0 {
                let op = Op::Write { file: self.file, buf: self.bufs[self.cur], span: 0..self.filled, offset: self.offset };
                disk.submit(&[op], self.token)?;
                self.in_flight = true;
                self.offset += self.filled as u64;
                self.filled = 0;
                self.cur ^= 1;
                // Fill the other buffer while this one is written.
                continue;
            }
            // Every chunk is written.
            disk.submit(&[Op::Sync { file: self.file }], self.token)?;
            self.in_flight = true;
            self.stage = Stage::Syncing;
        }
    }

    /// Copies the next chunks into the gathering buffer, as many as fit.
    fn gather(&mut self, disk: &mut Disk, parts: &mut dyn Parts) -> Result<()> {
        let room = disk.buf(self.bufs[0]).len();
        while let Some(&(t, c)) = self.queue.get(self.next) {
            let (table, start) = (self.tables[t].table, self.tables[t].owned.0);
            let part = parts
                .part(table, start)
                .filter(|p| p.snapshotting())
                .ok_or_else(|| EngineError::Io(format!("table {table} was dropped while checkpoint {} was written", self.seq)))?;
            let payload_len = part.chunk_payload_len(c);
            let need = ChunkHeader::disk_len(payload_len);
            if self.filled + need > room {
                break;
            }
            let header = ChunkHeader {
                checkpoint: self.seq,
                table,
                shard: self.shard,
                chunk: c,
                first_slot: part.chunk_range(c).start,
                slots: part.chunk_range(c).count() as u32,
                payload_len: payload_len as u32,
                lsn: self.lsn,
                ..ChunkHeader::default()
            };
            let filled = self.filled;
            let out = &mut disk.buf_mut(self.bufs[self.cur]).expect("the gathering buffer is not in flight")[filled..];
            part.take_chunk(c, &mut out[CHUNK_HEADER_BYTES..]);
            let len = header.seal(out);
            let crc = u32::from_le_bytes(out[4..8].try_into().expect("4 bytes"));
            self.tables[t].chunks[c as usize] = ChunkRef { file: self.seq, offset: self.offset + filled as u64, len: len as u32, crc };
            self.filled += len;
            self.next += 1;
            self.written.chunks_written += 1;
            self.written.bytes += len as u64;
        }
        Ok(())
    }

    /// Commits the manifest of a checkpoint [`advance`](Self::advance) finished, and ends the
    /// parts' snapshots. Blocks for the manifest's write, fsync and rename; nothing else may be
    /// in flight on `disk`.
    pub fn commit(self, disk: &mut Disk, dir: &Path, parts: &mut dyn Parts) -> Result<(Manifest, Written)> {
        assert_eq!(self.stage, Stage::Synced, "commit follows a finished advance");
        disk.close_file(self.file)?;
        let (seq, shard, lsn, wal, tables, replica) = (self.seq, self.shard, self.lsn, self.wal, self.tables, self.replica);
        let manifest = Manifest { version: MANIFEST_VERSION, seq, shard, lsn, wal, tables, replica };
        let committed = commit_manifest(disk, self.bufs[0], dir, &manifest);
        let mut written = self.written;
        for t in &manifest.tables {
            if let Some(part) = parts.part(t.table, t.owned.0) {
                written.chunks_copied += part.snapshot_copies();
                part.end_snapshot(committed.is_ok());
            }
        }
        committed?;
        written.ms = self.started.elapsed().as_millis() as u64;
        Ok((manifest, written))
    }

    /// Gives up a checkpoint whose writes are over (see [`in_flight`](Self::in_flight)): its
    /// chunks count as changed again. Its data file stays until a later checkpoint prunes it.
    pub fn abandon(self, disk: &mut Disk, parts: &mut dyn Parts) {
        debug_assert!(!self.in_flight);
        if let Err(e) = disk.close_file(self.file) {
            tracing::warn!(shard = self.shard, error = %e, "cannot close an abandoned checkpoint's data file");
        }
        for t in &self.tables {
            if let Some(part) = parts.part(t.table, t.owned.0) {
                part.end_snapshot(false);
            }
        }
    }
}

/// Writes `manifest` under a temporary name, fsyncs it, renames it into place and fsyncs `dir`.
fn commit_manifest(disk: &mut Disk, buf: BufId, dir: &Path, manifest: &Manifest) -> Result<()> {
    let bytes = manifest.encode();
    let tmp = dir.join(format!("{}.tmp", Manifest::file_name(manifest.seq)));
    let file = disk.open_file(&tmp, true)?;
    let mut offset = 0;
    let result = bytes.chunks(disk.buf(buf).len()).try_for_each(|piece| {
        disk.buf_mut(buf).expect("idle between chains")[..piece.len()].copy_from_slice(piece);
        let op = Op::Write { file, buf, span: 0..piece.len(), offset };
        offset += piece.len() as u64;
        run(disk, &[op])
    });
    let result = result.and_then(|()| run(disk, &[Op::Sync { file }]));
    disk.close_file(file)?;
    result?;
    crate::crash::point("checkpoint.manifest_written");
    let path = dir.join(Manifest::file_name(manifest.seq));
    let io = |op, e: std::io::Error| EngineError::Disk { op, path: dir.display().to_string(), reason: e.to_string() };
    std::fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
    crate::crash::point("checkpoint.manifest_renamed");
    crate::persist::disk::sync_dir(dir)
}

/// Submits `ops` as one chain and waits for it.
fn run(disk: &mut Disk, ops: &[Op]) -> Result<()> {
    disk.submit(ops, 0)?;
    let mut done = Vec::with_capacity(1);
    disk.wait(&mut done)?;
    done.pop().expect("wait returns the chain it waited for").result
}

/// Reads `len` bytes (a multiple of 4 KiB) at `offset` of `file` into the start of `buf`.
fn read(disk: &mut Disk, buf: BufId, file: FileId, offset: u64, len: usize) -> Result<()> {
    run(disk, &[Op::Read { file, buf, span: 0..len, offset }])
}

/// The newest checkpoint in `dir` whose manifest and chunks all check out, loaded into parts
/// `build` makes (fresh, for the manifest's table); `Ok(None)` if there is none. Every checkpoint
/// passed over is reported through `skipped` with the reason. A checkpoint that checks out but
/// disagrees with the catalog (`build` says [`EngineError::Unrecoverable`]) is not passed over
/// unless `accept_loss`: the catalog, not the checkpoint, is what is wrong.
pub fn load_newest(
    disk: &mut Disk,
    buf: BufId,
    dir: &Path,
    build: &mut dyn FnMut(&PartManifest) -> Result<TablePart>,
    skipped: &mut dyn FnMut(u64, &EngineError),
    accept_loss: bool,
) -> Result<Option<(Manifest, Vec<TablePart>)>> {
    let io = |e: std::io::Error| EngineError::Disk { op: "list", path: dir.display().to_string(), reason: e.to_string() };
    let mut seqs: Vec<u64> =
        std::fs::read_dir(dir).map_err(io)?.filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().and_then(Manifest::seq_of))).collect();
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    for seq in seqs {
        match load(disk, buf, dir, seq, build) {
            Ok(found) => return Ok(Some(found)),
            Err(e @ EngineError::Unrecoverable { .. }) if !accept_loss => return Err(e),
            Err(e) => skipped(seq, &e),
        }
    }
    Ok(None)
}

/// Loads checkpoint `seq` from `dir`, checking every chunk.
pub fn load(
    disk: &mut Disk,
    buf: BufId,
    dir: &Path,
    seq: u64,
    build: &mut dyn FnMut(&PartManifest) -> Result<TablePart>,
) -> Result<(Manifest, Vec<TablePart>)> {
    let name = Manifest::file_name(seq);
    let (words, len) = read_whole(disk, buf, &dir.join(&name))?;
    let bytes = &bytemuck::cast_slice::<u64, u8>(&words)[..len];
    decode(bytes, &name, build, &mut DataFiles { disk, buf, dir, open: None })
}

/// Where [`decode`] finds the chunks a manifest names: the data files, through the disk, when a
/// server loads; memory when the fuzzer (`tests/fuzz`) feeds it bytes.
pub trait ChunkSource {
    /// The `r.len` bytes at `r.offset` of data file `r.file` (`r.len` is a whole number of
    /// pages). `what` names the chunk in errors.
    fn chunk(&mut self, r: &ChunkRef, what: &str) -> Result<&[u8]>;
    /// One part's chunks are all read: let go of what reading them held (an open file).
    fn release(&mut self) -> Result<()>;
}

/// A checkpoint from its manifest file's contents (`name` names it in errors) and the chunks
/// `chunks` reads: the manifest checked and decoded, each part made by `build` and every chunk
/// checked against the manifest and loaded into it. All of the load that is not I/O.
pub fn decode(
    manifest: &[u8],
    name: &str,
    build: &mut dyn FnMut(&PartManifest) -> Result<TablePart>,
    chunks: &mut dyn ChunkSource,
) -> Result<(Manifest, Vec<TablePart>)> {
    let manifest = Manifest::decode(manifest, name)?;
    let mut parts = Vec::with_capacity(manifest.tables.len());
    for t in &manifest.tables {
        let mut part = build(t)?;
        if part.chunks() != t.chunks.len() as u64 || part.chunk_slots() != t.chunk_slots {
            return Err(EngineError::Corrupt {
                what: name.to_string(),
                reason: format!("table {} has {} chunks of {} slots here, not {}", t.table, part.chunks(), part.chunk_slots(), t.chunks.len()),
            });
        }
        load_part(chunks, &mut part, t)?;
        part.finish_load(t.step, &t.clocks)?;
        parts.push(part);
    }
    Ok((manifest, parts))
}

fn load_part(chunks: &mut dyn ChunkSource, part: &mut TablePart, t: &PartManifest) -> Result<()> {
    let result = t.chunks.iter().enumerate().try_for_each(|(c, r)| {
        let what = format!("{} at {} (table {} chunk {c})", Manifest::data_file_name(r.file), r.offset, t.table);
        let corrupt = |reason: String| EngineError::Corrupt { what: what.clone(), reason };
        if !(r.len as usize).is_multiple_of(IO_ALIGN_BYTES) {
            return Err(corrupt(format!("a chunk of {} bytes", r.len)));
        }
        let (h, payload) = ChunkHeader::open(chunks.chunk(r, &what)?, &what)?;
        if h.crc != r.crc || h.table != t.table || h.chunk != c as u64 {
            return Err(corrupt(format!("holds table {} chunk {} (crc {:#010x}), not the one named", h.table, h.chunk, h.crc)));
        }
        part.load_chunk(c as u64, payload)
    });
    chunks.release()?;
    result
}

/// A checkpoint's data files read through the disk, one open at a time, into one buffer.
struct DataFiles<'a> {
    disk: &'a mut Disk,
    buf: BufId,
    dir: &'a Path,
    /// The data file open now, by sequence number.
    open: Option<(u64, FileId)>,
}

impl ChunkSource for DataFiles<'_> {
    fn chunk(&mut self, r: &ChunkRef, what: &str) -> Result<&[u8]> {
        let corrupt = |reason: String| EngineError::Corrupt { what: what.to_string(), reason };
        if self.open.is_none_or(|(seq, _)| seq != r.file) {
            self.release()?;
            self.open = Some((r.file, self.disk.open_file(&self.dir.join(Manifest::data_file_name(r.file)), false)?));
        }
        let file = self.open.expect("opened above").1;
        if r.len as usize > self.disk.buf(self.buf).len() {
            return Err(corrupt(format!("a chunk of {} bytes", r.len)));
        }
        read(self.disk, self.buf, file, r.offset, r.len as usize).map_err(|e| corrupt(e.to_string()))?;
        Ok(&self.disk.buf(self.buf)[..r.len as usize])
    }

    fn release(&mut self) -> Result<()> {
        match self.open.take() {
            Some((_, f)) => self.disk.close_file(f),
            None => Ok(()),
        }
    }
}

/// A whole file's contents, read through the disk in buffer-sized pieces into 8-byte aligned
/// memory (log records are read in place), and its length in bytes.
pub fn read_whole(disk: &mut Disk, buf: BufId, path: &Path) -> Result<(Vec<u64>, usize)> {
    let file = disk.open_file(path, false)?;
    let result = (|| {
        let len = disk.file_len(file)? as usize;
        let mut words = vec![0u64; len.div_ceil(8)];
        let out = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len];
        let piece = disk.buf(buf).len();
        let mut at = 0;
        while at < len {
            // Whole pages: a read that ends at the end of the file may come back short.
            let n = piece.min(len - at).next_multiple_of(IO_ALIGN_BYTES);
            read(disk, buf, file, at as u64, n)?;
            let take = n.min(len - at);
            out[at..at + take].copy_from_slice(&disk.buf(buf)[..take]);
            at += take;
        }
        Ok((words, len))
    })();
    disk.close_file(file)?;
    result
}

#[cfg(test)]
mod tests;
