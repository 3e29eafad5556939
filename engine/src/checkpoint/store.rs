//! Writing a checkpoint of table parts through a [`Disk`], and loading the newest valid one.
//!
//! A checkpoint writes the chunks pushes changed since the previous one (all of them the first
//! time) to its own data file, fsyncs it, then commits its manifest: written under a temporary
//! name, fsynced, renamed, and the directory fsynced. Loading walks the manifests newest first
//! and takes the first whose every chunk reads back with the right checksum; one that does not
//! is reported, and the one before it is tried.
//!
//! This version writes synchronously from the calling (shard) thread, so the checkpoint is the
//! state at one instant; pushes wait meanwhile.

use std::path::Path;

use crate::checkpoint::{ChunkHeader, ChunkRef, Manifest, PartManifest, CHUNK_HEADER_BYTES, MANIFEST_VERSION};
use crate::config::IO_ALIGN_BYTES;
use crate::disk::{BufId, Disk, FileId, Op};
use crate::error::{EngineError, Result};
use crate::table::TablePart;

/// What one checkpoint wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Written {
    pub seq: u64,
    pub chunks_written: u64,
    pub chunks_kept: u64,
    pub bytes: u64,
}

/// Writes checkpoint `seq` of `parts` into `dir`, exact at log position `lsn`, with `wal` the log
/// that follows it. `prev` is the previous checkpoint's manifest: chunks no push changed since
/// are referred to where it put them. `bufs` are two disk buffers of at least one chunk each:
/// chunks are copied into one while the other is written.
#[allow(clippy::too_many_arguments)] // each is one input of the checkpoint
pub fn write(
    disk: &mut Disk,
    bufs: [BufId; 2],
    dir: &Path,
    seq: u64,
    lsn: u64,
    wal: &str,
    shard: u16,
    parts: &mut [&mut TablePart],
    prev: Option<&Manifest>,
) -> Result<(Manifest, Written)> {
    let data = disk.open_file(&dir.join(Manifest::data_file_name(seq)), true)?;
    let mut gather = Gather { bufs, cur: 0, filled: 0, offset: 0, in_flight: false, file: data };
    let result = write_chunks(disk, &mut gather, seq, lsn, shard, parts, prev);
    // On an early error a write may still be in flight: let it end before the file closes.
    let drained = gather.wait(disk);
    disk.close_file(data)?;
    let (tables, written) = result?;
    drained?;
    let manifest = Manifest { version: MANIFEST_VERSION, seq, shard, lsn, wal: wal.to_string(), tables };
    commit_manifest(disk, bufs[0], dir, &manifest)?;
    parts.iter_mut().for_each(|p| p.clear_dirty());
    Ok((manifest, written))
}

#[allow(clippy::too_many_arguments)]
fn write_chunks(
    disk: &mut Disk,
    g: &mut Gather,
    seq: u64,
    lsn: u64,
    shard: u16,
    parts: &mut [&mut TablePart],
    prev: Option<&Manifest>,
) -> Result<(Vec<PartManifest>, Written)> {
    let mut written = Written { seq, chunks_written: 0, chunks_kept: 0, bytes: 0 };
    let mut tables = Vec::with_capacity(parts.len());
    for part in parts.iter_mut() {
        let earlier = prev.and_then(|m| m.tables.iter().find(|t| t.table == part.id && t.spec == part.spec));
        let earlier = earlier.filter(|t| t.chunks.len() as u64 == part.chunks() && t.chunk_slots == part.chunk_slots());
        if earlier.is_none() {
            part.mark_all_dirty();
        }
        let mut chunks: Vec<ChunkRef> = earlier.map(|t| t.chunks.clone()).unwrap_or_default();
        chunks.resize(part.chunks() as usize, ChunkRef { file: 0, offset: 0, len: 0, crc: 0 });
        written.chunks_kept += part.chunks();
        let dirty: Vec<u64> = part.dirty_chunks().collect();
        for c in dirty {
            let header = ChunkHeader {
                checkpoint: seq,
                table: part.id,
                shard,
                chunk: c,
                first_slot: part.chunk_range(c).start,
                slots: part.chunk_range(c).count() as u32,
                payload_len: part.chunk_payload_len(c) as u32,
                lsn,
                ..ChunkHeader::default()
            };
            let need = ChunkHeader::disk_len(header.payload_len as usize);
            let room = disk.buf(g.bufs[0]).len();
            if need > room {
                return Err(EngineError::BadConfig {
                    field: "checkpoint buffer",
                    value: room.to_string(),
                    reason: format!("a chunk of table {} takes {need} bytes", part.id),
                });
            }
            // Chunks gather in a buffer and go out in one write when the next would not fit.
            if g.filled + need > room {
                g.flush(disk)?;
            }
            let filled = g.filled;
            let out = &mut disk.buf_mut(g.bufs[g.cur]).expect("the gathering buffer is not in flight")[filled..];
            part.save_chunk(c, &mut out[CHUNK_HEADER_BYTES..]);
            let len = header.seal(out);
            let crc = u32::from_le_bytes(out[4..8].try_into().expect("4 bytes"));
            chunks[c as usize] = ChunkRef { file: seq, offset: g.offset + filled as u64, len: len as u32, crc };
            g.filled += len;
            written.chunks_written += 1;
            written.chunks_kept -= 1;
            written.bytes += len as u64;
        }
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
    g.flush(disk)?;
    g.wait(disk)?;
    run(disk, &[Op::Sync { file: g.file }])?;
    Ok((tables, written))
}

/// Chunks gathered into one of two buffers while the other one's write is in flight: the device
/// sees one write at a time (queue depth 1), and copying the next chunks overlaps it.
struct Gather {
    bufs: [BufId; 2],
    /// The buffer chunks are copied into, and how full it is.
    cur: usize,
    filled: usize,
    /// Where the gathered bytes go in `file`.
    offset: u64,
    in_flight: bool,
    file: FileId,
}

impl Gather {
    /// Sends the gathered bytes (after the write before them ended) and gathers into the other
    /// buffer.
    fn flush(&mut self, disk: &mut Disk) -> Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        self.wait(disk)?;
        let op = Op::Write { file: self.file, buf: self.bufs[self.cur], span: 0..self.filled, offset: self.offset };
        disk.submit(&[op], 0)?;
        self.in_flight = true;
        self.offset += self.filled as u64;
        self.filled = 0;
        self.cur ^= 1;
        Ok(())
    }

    /// Waits for the write in flight, if any.
    fn wait(&mut self, disk: &mut Disk) -> Result<()> {
        if !std::mem::take(&mut self.in_flight) {
            return Ok(());
        }
        let mut done = Vec::with_capacity(1);
        disk.wait(&mut done)?;
        done.pop().expect("wait returns the chain it waited for").result
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
    let path = dir.join(Manifest::file_name(manifest.seq));
    let io = |op, e: std::io::Error| EngineError::Disk { op, path: dir.display().to_string(), reason: e.to_string() };
    std::fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
    crate::durable::sync_dir(dir)
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
/// passed over is reported through `skipped` with the reason.
pub fn load_newest(
    disk: &mut Disk,
    buf: BufId,
    dir: &Path,
    build: &mut dyn FnMut(&PartManifest) -> Result<TablePart>,
    skipped: &mut dyn FnMut(u64, &EngineError),
) -> Result<Option<(Manifest, Vec<TablePart>)>> {
    let io = |e: std::io::Error| EngineError::Disk { op: "list", path: dir.display().to_string(), reason: e.to_string() };
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().and_then(Manifest::seq_of)))
        .collect();
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    for seq in seqs {
        match load(disk, buf, dir, seq, build) {
            Ok(found) => return Ok(Some(found)),
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
    let bytes = read_whole(disk, buf, &dir.join(&name))?;
    let manifest = Manifest::decode(&bytes, &name)?;
    let mut parts = Vec::with_capacity(manifest.tables.len());
    for t in &manifest.tables {
        let mut part = build(t)?;
        if part.chunks() != t.chunks.len() as u64 || part.chunk_slots() != t.chunk_slots {
            return Err(EngineError::Corrupt {
                what: name.clone(),
                reason: format!("table {} has {} chunks of {} slots here, not {}", t.table, part.chunks(), part.chunk_slots(), t.chunks.len()),
            });
        }
        load_part(disk, buf, dir, &mut part, t)?;
        part.finish_load(t.step, &t.clocks)?;
        parts.push(part);
    }
    Ok((manifest, parts))
}

fn load_part(disk: &mut Disk, buf: BufId, dir: &Path, part: &mut TablePart, t: &PartManifest) -> Result<()> {
    let mut open: Option<(u64, FileId)> = None;
    let result = t.chunks.iter().enumerate().try_for_each(|(c, r)| {
        let what = format!("{} at {} (table {} chunk {c})", Manifest::data_file_name(r.file), r.offset, t.table);
        let corrupt = |reason: String| EngineError::Corrupt { what: what.clone(), reason };
        if open.is_none_or(|(seq, _)| seq != r.file) {
            if let Some((_, f)) = open.take() {
                disk.close_file(f)?;
            }
            open = Some((r.file, disk.open_file(&dir.join(Manifest::data_file_name(r.file)), false)?));
        }
        let file = open.expect("opened above").1;
        if r.len as usize > disk.buf(buf).len() || !(r.len as usize).is_multiple_of(IO_ALIGN_BYTES) {
            return Err(corrupt(format!("a chunk of {} bytes", r.len)));
        }
        read(disk, buf, file, r.offset, r.len as usize).map_err(|e| corrupt(e.to_string()))?;
        let (h, payload) = ChunkHeader::open(&disk.buf(buf)[..r.len as usize], &what)?;
        if h.crc != r.crc || h.table != t.table || h.chunk != c as u64 {
            return Err(corrupt(format!("holds table {} chunk {} (crc {:#010x}), not the one named", h.table, h.chunk, h.crc)));
        }
        part.load_chunk(c as u64, payload)
    });
    if let Some((_, f)) = open {
        disk.close_file(f)?;
    }
    result
}

/// A whole file's contents, read through the disk in buffer-sized pieces.
fn read_whole(disk: &mut Disk, buf: BufId, path: &Path) -> Result<Vec<u8>> {
    let file = disk.open_file(path, false)?;
    let result = (|| {
        let len = disk.file_len(file)? as usize;
        let mut out = Vec::with_capacity(len);
        let piece = disk.buf(buf).len();
        while out.len() < len {
            let n = piece.min(len - out.len()).next_multiple_of(IO_ALIGN_BYTES);
            read(disk, buf, file, out.len() as u64, n)?;
            let take = n.min(len - out.len());
            out.extend_from_slice(&disk.buf(buf)[..take]);
        }
        Ok(out)
    })();
    disk.close_file(file)?;
    result
}

#[cfg(test)]
mod tests;
