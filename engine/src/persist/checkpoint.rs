//! The checkpoint format: data chunks with their own checksums, and the manifest that names them.
//!
//! A table part's state is cut into **chunks** by key slot (dense: key offsets from the part's
//! start; sparse: slots of its open-addressing table). A chunk holds every array of its slots
//! one after the other (dense: values, then each optimiser state slot; sparse: the keys, then the
//! records), so a push dirties whole chunks and a checkpoint writes only dirty ones.
//!
//! On disk, each chunk is a 64-byte header and its payload, padded to 4 KiB:
//!
//! ```text
//!  0 magic u32 "TCKC"   4 crc32c u32 (of header bytes 8..64 and the payload)
//!  8 checkpoint u64 (the sequence number of the checkpoint that wrote it)
//! 16 table u32  20 shard u16  22 reserved u16  24 chunk u64  32 first_slot u64
//! 40 slots u32  44 payload_len u32  48 lsn u64 (log position the contents are exact at)
//! 56 reserved u64
//! ```
//!
//! Chunks live in append-only data files, one per checkpoint (`data-NNNNNNNN.ckpt`). A
//! checkpoint's **manifest** (`MANIFEST-NNNNNNNN`, JSON) names, for every table part, its spec,
//! range, vector clocks and where the newest copy of each chunk is (file, offset, length and
//! checksum), and the log position it is exact at. Its last line is the crc32c of everything
//! before it. It is committed atomically: written to a temporary name, fsynced, renamed, and the
//! directory fsynced. A chunk not rewritten since an earlier checkpoint is still named in that
//! earlier data file, which therefore stays until no kept manifest refers to it.

pub mod store;

use serde::{Deserialize, Serialize};
use tessera_layout::TableSpec;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::config::IO_ALIGN_BYTES;
use crate::error::{EngineError, Result};

/// "TCKC" read as a little-endian u32.
pub const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"TCKC");
pub const CHUNK_HEADER_BYTES: usize = 64;
const _: () = assert!(std::mem::size_of::<ChunkHeader>() == CHUNK_HEADER_BYTES);
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// A chunk's header, read and written in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ChunkHeader {
    pub magic: u32,
    pub crc: u32,
    pub checkpoint: u64,
    pub table: u32,
    pub shard: u16,
    pub reserved: u16,
    pub chunk: u64,
    pub first_slot: u64,
    pub slots: u32,
    pub payload_len: u32,
    pub lsn: u64,
    pub reserved2: u64,
}

impl ChunkHeader {
    /// Bytes the chunk takes on disk: header and payload, padded to whole pages.
    pub fn disk_len(payload_len: usize) -> usize {
        (CHUNK_HEADER_BYTES + payload_len).next_multiple_of(IO_ALIGN_BYTES)
    }

    /// Seals the chunk at the start of `out`: its payload is already at
    /// `out[CHUNK_HEADER_BYTES..][..payload_len]`. Writes the header and the padding, and returns
    /// the bytes to write.
    pub fn seal(mut self, out: &mut [u8]) -> usize {
        let end = CHUNK_HEADER_BYTES + self.payload_len as usize;
        let len = Self::disk_len(self.payload_len as usize);
        out[end..len].fill(0);
        self.magic = CHUNK_MAGIC;
        self.crc = 0;
        out[..CHUNK_HEADER_BYTES].copy_from_slice(self.as_bytes());
        self.crc = checksum(&out[..end]);
        out[..CHUNK_HEADER_BYTES].copy_from_slice(self.as_bytes());
        len
    }

    /// Checks the chunk at the start of `bytes` and returns its header and payload. `what` names
    /// it in the error (file and offset).
    pub fn open<'a>(bytes: &'a [u8], what: &str) -> Result<(ChunkHeader, &'a [u8])> {
        let corrupt = |reason: String| EngineError::Corrupt { what: what.to_string(), reason };
        let h = ChunkHeader::read_from_prefix(bytes).map_err(|_| corrupt("shorter than a chunk header".into()))?.0;
        if h.magic != CHUNK_MAGIC {
            return Err(corrupt(format!("bad magic {:#010x}", h.magic)));
        }
        let end = CHUNK_HEADER_BYTES
            .checked_add(h.payload_len as usize)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| corrupt(format!("payload of {} bytes runs past the chunk", h.payload_len)))?;
        let crc = checksum(&bytes[..end]);
        if crc != h.crc {
            return Err(corrupt(format!("checksum {:#010x}, computed {crc:#010x}", h.crc)));
        }
        Ok((h, &bytes[CHUNK_HEADER_BYTES..end]))
    }
}

/// crc32c of a sealed chunk: header bytes 8.. and the payload (the magic and the crc itself are
/// left out).
fn checksum(chunk: &[u8]) -> u32 {
    crc32c::crc32c(&chunk[8..])
}

/// Everything a checkpoint holds, as its manifest says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    /// This checkpoint's sequence number; data file `data-{seq}.ckpt` holds what it wrote.
    pub seq: u64,
    pub shard: u16,
    /// Every logged push up to and including this LSN is in the chunks; replay starts after it.
    pub lsn: u64,
    /// The log file appended after this checkpoint, whose first record is `lsn + 1`.
    pub wal: String,
    pub tables: Vec<PartManifest>,
    /// A replicated shard's ranges at `lsn`, each with its version and vector clock (none for
    /// an unreplicated shard): where replaying its log starts from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica: Vec<RangeHeld>,
}

/// A range a chain replica holds, as a checkpoint records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeHeld {
    pub range: u32,
    pub version: u64,
    pub clock: Vec<u32>,
    /// The range's history digest at `version`; absent from checkpoints written before digests
    /// were recorded (such a range is recovered, but not resumed from).
    #[serde(default)]
    pub digest: Option<u32>,
}

/// One table part in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartManifest {
    pub table: u32,
    pub spec: TableSpec,
    pub owned: (u64, u64),
    /// Pushes the part had applied: the step its updater continues from.
    pub step: u64,
    /// Slots per chunk (the last chunk may hold fewer).
    pub chunk_slots: u64,
    /// The vector clocks: `(first key, one clock per worker)` per segment, in key order.
    pub clocks: Vec<(u64, Vec<u64>)>,
    /// Where each chunk's newest copy is, by chunk index; every chunk is named.
    pub chunks: Vec<ChunkRef>,
}

/// Where one chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    /// Sequence number of the checkpoint whose data file holds it.
    pub file: u64,
    pub offset: u64,
    /// Bytes on disk (a multiple of 4 KiB).
    pub len: u32,
    /// The chunk header's crc, checked again against the chunk read back.
    pub crc: u32,
}

impl Manifest {
    /// The manifest's file contents: JSON, a newline, the crc32c of the JSON as 8 hex digits and a
    /// newline, then zeros to a whole number of pages (it is written with direct I/O).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(format!("\n{crc:08x}\n").as_bytes());
        out.resize(out.len().next_multiple_of(IO_ALIGN_BYTES), 0);
        out
    }

    /// Reads and checks a manifest file's contents; `what` names it in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Manifest> {
        let corrupt = |reason: String| EngineError::Corrupt { what: what.to_string(), reason };
        let text = &bytes[..bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len())];
        let text = text.strip_suffix(b"\n").ok_or_else(|| corrupt("does not end in a checksum line".into()))?;
        let cut = text.iter().rposition(|b| *b == b'\n').ok_or_else(|| corrupt("no checksum line".into()))?;
        let (json, crc_line) = (&text[..cut], &text[cut + 1..]);
        let want = std::str::from_utf8(crc_line)
            .ok()
            .and_then(|s| u32::from_str_radix(s, 16).ok())
            .filter(|_| crc_line.len() == 8)
            .ok_or_else(|| corrupt("the checksum line is not 8 hex digits".into()))?;
        let crc = crc32c::crc32c(json);
        if crc != want {
            return Err(corrupt(format!("checksum {want:08x}, computed {crc:08x}")));
        }
        let m: Manifest = serde_json::from_slice(json).map_err(|e| corrupt(format!("bad JSON: {e}")))?;
        if m.version != MANIFEST_VERSION {
            return Err(corrupt(format!("version {}, this build reads {MANIFEST_VERSION}", m.version)));
        }
        // The log after the checkpoint starts at `lsn + 1`; no log counts that far.
        if m.lsn == u64::MAX {
            return Err(corrupt(format!("log position {} leaves no room for the log after it", m.lsn)));
        }
        Ok(m)
    }

    /// File name of checkpoint `seq`'s manifest.
    pub fn file_name(seq: u64) -> String {
        format!("MANIFEST-{seq:08}")
    }

    /// File name of checkpoint `seq`'s data file.
    pub fn data_file_name(seq: u64) -> String {
        format!("data-{seq:08}.ckpt")
    }

    /// The sequence number in a manifest's file name, if `name` is one.
    pub fn seq_of(name: &str) -> Option<u64> {
        let digits = name.strip_prefix("MANIFEST-")?;
        (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
    }
}

#[cfg(test)]
mod tests;
