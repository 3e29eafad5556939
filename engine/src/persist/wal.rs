//! The write-ahead log's format: what one shard appends as its chain replicas change their
//! ranges, and the reader that replays it after a crash.
//!
//! Every server runs its ranges as chain replicas (a standalone server's are chains of one), and
//! logs what a replica holds of a range ([`Target::Replica`]): each update it applies (the state
//! the update's pushes left on the keys they touched, values and updater state, with the range's
//! clock and version) and each snapshot it installs. Replay puts those states back in order, so a
//! recovered range is bit-identical to the one that crashed, optimiser state included.
//!
//! ```text
//! record = header (48 bytes) + body (body_len bytes, zero-padded to 8)
//!  0 magic u32 "TWAL"   4 crc32c u32 (of bytes 8.. of the header and the padded body)
//!  8 lsn u64 (the shard's record number; each record's is the previous one's + 1)
//! 16 kind u8  17 commit_index [u8; 3] (the record's place in its commit, little-endian)
//! 20 table u32  24 worker u32  28 dim u32
//! 32 clock u64  40 count u32 (keys)  44 body_len u32
//! body: Replica   count clock entries (u32), then the state's bytes (a multiple of 4)
//!       Push      count keys (u64) then count x dim values (f32)
//!       PushRange start key (u64) then count x dim values (f32)
//! ```
//!
//! In a `Replica` record `table` is the range, `clock` its version, `worker` the
//! [`replica_flags`], `dim` 1. An update's or snapshot's bytes are cut into pieces that each fit
//! a log buffer; every piece but the last has [`replica_flags::MORE`], and replay applies the
//! whole only at the last, so a torn sequence leaves the range as it was before it. The `Push`
//! and `PushRange` kinds (a raw push, [`Target::Keys`] and [`Target::Range`]) are what servers
//! logged before every server ran the chain protocol: none writes them now, and recovery refuses
//! a log that holds them with a clear error rather than replaying it.
//!
//! The log is written in **commits**: a commit's records are contiguous from a page boundary, and
//! the rest of its last page is zeros, so no write ever touches a page an earlier commit made
//! durable (a torn rewrite could otherwise lose records already acknowledged). The reader walks
//! records; at a zero magic it skips to the next page, and it stops at the first record that is
//! torn, fails its checksum, or breaks the LSN sequence. A push is acknowledged only after an
//! fsync that covers its record and every record before it, and a commit is written only once
//! the one before it is durable. So a stop inside the last commit is a write the crash
//! interrupted, and nothing after it was acknowledged; but a good record of a *later* commit
//! after the stop proves the stop is damage to records already acknowledged. Each record says
//! its place in its commit (`commit_index`), which tells the two apart
//! ([`acknowledged_after`]).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::config::IO_ALIGN_BYTES;
use crate::error::{EngineError, Result};

/// "TWAL" read as a little-endian u32.
pub const WAL_MAGIC: u32 = u32::from_le_bytes(*b"TWAL");
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 48;
const _: () = assert!(std::mem::size_of::<RecordHeader>() == RECORD_HEADER_BYTES);
const _: () = assert!(IO_ALIGN_BYTES.is_multiple_of(8), "records stay 8-byte aligned across pages");

/// What a record replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A push of `count` listed keys.
    Push = 1,
    /// A push of the `count` keys from `start`.
    PushRange = 2,
    /// What a chain replica holds of one range ([`Target::Replica`]).
    Replica = 3,
}

/// What a [`Target::Replica`] record is.
pub mod replica_flags {
    /// The bytes are the range's whole state (a snapshot, or with no bytes at version 0 a
    /// range born empty); without it, an update of some keys.
    pub const WHOLE: u32 = 1;
    /// More pieces of the same bytes follow.
    pub const MORE: u32 = 2;
    /// The server no longer holds the range.
    pub const DROPPED: u32 = 4;
    /// The record's clock words end with one more: the range's history digest at the version
    /// (`tessera_replication::replica::digest_after`), with which a restarted server resumes
    /// from its log. A record without it (an older log) recovers, but is not resumed from.
    pub const DIGEST: u32 = 8;
    pub const ALL: u32 = WHOLE | MORE | DROPPED | DIGEST;
}

/// A record header, read and written in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RecordHeader {
    pub magic: u32,
    pub crc: u32,
    pub lsn: u64,
    pub kind: u8,
    /// The record's place in its commit (0 for the commit's first), little-endian: the commit
    /// began at LSN `lsn - commit_index`.
    pub commit_index: [u8; 3],
    pub table: u32,
    pub worker: u32,
    pub dim: u32,
    pub clock: u64,
    pub count: u32,
    pub body_len: u32,
}

/// One record, as appended and as replayed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record<'a> {
    pub lsn: u64,
    pub table: u32,
    pub worker: u32,
    pub clock: u64,
    pub dim: u32,
    pub target: Target<'a>,
    pub values: &'a [f32],
}

/// Which keys a record's values belong to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target<'a> {
    Keys(&'a [u64]),
    Range {
        start: u64,
    },
    /// A chain replica's range at a version with its clock; the record's values are the
    /// state's bytes (see the module doc).
    Replica {
        range: u32,
        version: u64,
        flags: u32,
        clock: &'a [u32],
    },
}

impl Record<'_> {
    /// Keys the record covers.
    pub fn count(&self) -> usize {
        match self.target {
            Target::Keys(keys) => keys.len(),
            Target::Range { .. } => self.values.len() / (self.dim as usize).max(1),
            Target::Replica { clock, .. } => clock.len(),
        }
    }

    fn body_len(&self) -> usize {
        let head = match self.target {
            Target::Keys(keys) => keys.len() * 8,
            Target::Range { .. } => 8,
            Target::Replica { clock, .. } => clock.len() * 4,
        };
        head + self.values.len() * 4
    }

    /// A replica record's state bytes.
    pub fn state_bytes(&self) -> &[u8] {
        self.values.as_bytes()
    }

    /// Bytes the record takes in the log, padding included.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.body_len().next_multiple_of(8)
    }

    /// Writes the record at the start of `out` (which must hold [`encoded_len`](Self::encoded_len)
    /// bytes), as the first of its commit, and returns its length.
    pub fn encode(&self, out: &mut [u8]) -> usize {
        self.encode_in_commit(out, 0)
    }

    /// As [`encode`](Self::encode), for the record at place `commit_index` of its commit.
    pub fn encode_in_commit(&self, out: &mut [u8], commit_index: u32) -> usize {
        assert!(commit_index < COMMIT_RECORDS_MAX, "a commit holds at most {COMMIT_RECORDS_MAX} records");
        let [i0, i1, i2, _] = commit_index.to_le_bytes();
        let len = self.encoded_len();
        let body_len = self.body_len();
        let (kind, count) = match self.target {
            Target::Keys(keys) => (RecordKind::Push, keys.len()),
            Target::Range { .. } => (RecordKind::PushRange, self.count()),
            Target::Replica { clock, .. } => (RecordKind::Replica, clock.len()),
        };
        let (table, worker, dim, clock) = match self.target {
            Target::Replica { range, version, flags, .. } => (range, flags, 1, version),
            _ => (self.table, self.worker, self.dim, self.clock),
        };
        let header = RecordHeader {
            magic: WAL_MAGIC,
            crc: 0,
            lsn: self.lsn,
            kind: kind as u8,
            commit_index: [i0, i1, i2],
            table,
            worker,
            dim,
            clock,
            count: count as u32,
            body_len: body_len as u32,
        };
        let (head, rest) = out[..len].split_at_mut(RECORD_HEADER_BYTES);
        head.copy_from_slice(header.as_bytes());
        let start_bytes;
        let keys_bytes = match self.target {
            Target::Keys(keys) => keys.as_bytes(),
            Target::Range { start } => {
                start_bytes = start.to_le_bytes();
                &start_bytes[..]
            }
            Target::Replica { clock, .. } => clock.as_bytes(),
        };
        let (k, v) = rest.split_at_mut(keys_bytes.len());
        k.copy_from_slice(keys_bytes);
        v[..self.values.len() * 4].copy_from_slice(self.values.as_bytes());
        v[self.values.len() * 4..].fill(0);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[8..RECORD_HEADER_BYTES]), &out[RECORD_HEADER_BYTES..len]);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        len
    }
}

/// Records one commit may hold: its place in the commit must fit the header's 3 bytes.
pub const COMMIT_RECORDS_MAX: u32 = 1 << 24;
// The smallest record is a header and an 8-byte body, so no log buffer reaches the limit.
const _: () = assert!((crate::config::WAL_BUFFER_BYTES_MAX / (RECORD_HEADER_BYTES + 8)) < COMMIT_RECORDS_MAX as usize);

impl RecordHeader {
    /// The LSN of the first record of this record's commit.
    pub fn commit_first_lsn(&self) -> u64 {
        let [i0, i1, i2] = self.commit_index;
        self.lsn.saturating_sub(u64::from(u32::from_le_bytes([i0, i1, i2, 0])))
    }
}

/// Where replay stopped at byte `stop_offset`, before the record due at LSN `due_lsn`: the first
/// good record after that point that belongs to a later commit than the one the stop lies in,
/// as (byte offset, LSN). `Some` proves that the commit holding the stop was durable, so its
/// records were acknowledged and the stop is damage, not a write cut short by a crash. Scans
/// every 8-byte boundary; a log is read once, at recovery or by `tessera checkpoint verify`.
pub fn acknowledged_after(log: &[u8], stop_offset: u64, due_lsn: u64) -> Option<(u64, u64)> {
    let start = usize::try_from(stop_offset).ok()?.checked_add(8)?.next_multiple_of(8);
    (start..log.len().saturating_sub(RECORD_HEADER_BYTES - 1)).step_by(8).find_map(|at| {
        let header = RecordHeader::read_from_bytes(&log[at..at + RECORD_HEADER_BYTES]).ok()?;
        if header.magic != WAL_MAGIC || header.lsn <= due_lsn || header.commit_first_lsn() <= due_lsn {
            return None;
        }
        // A header that checks out and whose record decodes whole.
        Reader::new(&log[at..], header.lsn).next().map(|r| (at as u64, r.lsn))
    })
}

/// Why a replay stopped before the end of the log bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The log ended cleanly: only zeros (or nothing) after the last record.
    End,
    /// A record at `offset` is cut off, fails its checksum or is malformed: a write the crash
    /// interrupted (or damage). Nothing from there on is replayed.
    Torn { offset: u64, reason: String },
    /// The record at `offset` has LSN `found` where `expected` was due.
    Gap { offset: u64, expected: u64, found: u64 },
}

/// Walks the records in `log` (a whole log file's bytes), starting at LSN `first_lsn`.
#[derive(Debug)]
pub struct Reader<'a> {
    log: &'a [u8],
    at: usize,
    next_lsn: u64,
    stop: Option<Stop>,
}

impl<'a> Reader<'a> {
    /// # Panics
    /// If `log` is not 8-byte aligned (records are read in place).
    pub fn new(log: &'a [u8], first_lsn: u64) -> Self {
        assert!(log.as_ptr().align_offset(8) == 0, "a log is read in place from 8-byte aligned memory");
        Self { log, at: 0, next_lsn: first_lsn, stop: None }
    }

    /// Why the walk ended; `None` while records remain.
    pub fn stop(&self) -> Option<&Stop> {
        self.stop.as_ref()
    }

    /// LSN the next record would have.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Byte offset just past the last good record's commit page: where appending may resume.
    pub fn resume_offset(&self) -> u64 {
        self.at.next_multiple_of(IO_ALIGN_BYTES) as u64
    }

    fn torn(&mut self, reason: String) -> Option<Record<'a>> {
        self.stop = Some(Stop::Torn { offset: self.at as u64, reason });
        None
    }

    fn next_record(&mut self) -> Option<Record<'a>> {
        loop {
            let rest = &self.log[self.at.min(self.log.len())..];
            if rest.len() < RECORD_HEADER_BYTES {
                if rest.iter().any(|b| *b != 0) {
                    return self.torn(format!("{} stray bytes at the end", rest.len()));
                }
                self.stop = Some(Stop::End);
                return None;
            }
            let header = RecordHeader::read_from_bytes(&rest[..RECORD_HEADER_BYTES]).expect("sized above");
            if header.magic == 0 {
                // The end of a commit: the rest of its page is zeros. Go to the next page.
                let page_end = (self.at + 1).next_multiple_of(IO_ALIGN_BYTES);
                if rest[..(page_end - self.at).min(rest.len())].iter().any(|b| *b != 0) {
                    return self.torn("non-zero bytes in a commit's padding".into());
                }
                if page_end >= self.log.len() {
                    self.stop = Some(Stop::End);
                    return None;
                }
                self.at = page_end;
                continue;
            }
            return self.decode(rest, header);
        }
    }

    fn decode(&mut self, rest: &'a [u8], h: RecordHeader) -> Option<Record<'a>> {
        if h.magic != WAL_MAGIC {
            return self.torn(format!("bad magic {:#010x}", h.magic));
        }
        let len = RECORD_HEADER_BYTES + (h.body_len as usize).next_multiple_of(8);
        if rest.len() < len {
            return self.torn(format!("record of {len} bytes cut off at {}", rest.len()));
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&rest[8..RECORD_HEADER_BYTES]), &rest[RECORD_HEADER_BYTES..len]);
        if crc != h.crc {
            return self.torn(format!("checksum {:#010x}, computed {crc:#010x}", h.crc));
        }
        if h.lsn != self.next_lsn {
            self.stop = Some(Stop::Gap { offset: self.at as u64, expected: self.next_lsn, found: h.lsn });
            return None;
        }
        // LSNs count pushes from 1, so no log reaches the last one; a record that claims it
        // (damage, or a crafted file) would leave no LSN for the next record.
        let Some(next_lsn) = h.lsn.checked_add(1) else {
            return self.torn(format!("LSN {} leaves no room for a next one", h.lsn));
        };
        let body = &rest[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + h.body_len as usize];
        let count = h.count as usize;
        let n_values = count.checked_mul(h.dim as usize);
        if h.kind == RecordKind::Replica as u8 {
            return self.decode_replica(&h, body, len, next_lsn);
        }
        let (head_bytes, target_kind) = match h.kind {
            k if k == RecordKind::Push as u8 => (count.checked_mul(8), RecordKind::Push),
            k if k == RecordKind::PushRange as u8 => (Some(8), RecordKind::PushRange),
            k => return self.torn(format!("unknown record kind {k}")),
        };
        let body_bytes = |(hb, nv): (usize, usize)| nv.checked_mul(4).and_then(|vb| vb.checked_add(hb));
        let fits = head_bytes.zip(n_values).and_then(body_bytes) == Some(body.len());
        if !fits || h.dim == 0 {
            return self.torn(format!("body of {} bytes does not match {count} keys of dim {}", body.len(), h.dim));
        }
        let (head, values) = body.split_at(head_bytes.expect("checked"));
        let values = <[f32]>::ref_from_bytes(values).expect("aligned: the log is, and records are padded to 8");
        let target = match target_kind {
            RecordKind::Push => Target::Keys(<[u64]>::ref_from_bytes(head).expect("aligned and sized above")),
            RecordKind::PushRange => Target::Range { start: u64::from_le_bytes(head.try_into().expect("8 bytes")) },
            RecordKind::Replica => unreachable!("decoded by decode_replica"),
        };
        self.at += len;
        self.next_lsn = next_lsn;
        Some(Record { lsn: h.lsn, table: h.table, worker: h.worker, clock: h.clock, dim: h.dim, target, values })
    }

    fn decode_replica(&mut self, h: &RecordHeader, body: &'a [u8], len: usize, next_lsn: u64) -> Option<Record<'a>> {
        let clock_bytes = (h.count as usize).checked_mul(4).filter(|b| *b <= body.len());
        let Some(clock_bytes) = clock_bytes.filter(|_| h.dim == 1 && h.worker & !replica_flags::ALL == 0 && body.len().is_multiple_of(4)) else {
            return self.torn(format!("a replica record of {} bytes with {} clock entries, dim {} and flags {:#x}", body.len(), h.count, h.dim, h.worker));
        };
        let (clock, state) = body.split_at(clock_bytes);
        let clock = <[u32]>::ref_from_bytes(clock).expect("aligned: the log is, and the header is 48 bytes");
        let values = <[f32]>::ref_from_bytes(state).expect("aligned and a multiple of 4");
        self.at += len;
        self.next_lsn = next_lsn;
        let target = Target::Replica { range: h.table, version: h.clock, flags: h.worker, clock };
        Some(Record { lsn: h.lsn, table: h.table, worker: h.worker, clock: h.clock, dim: 1, target, values })
    }
}

impl<'a> Iterator for Reader<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        if self.stop.is_some() {
            return None;
        }
        self.next_record()
    }
}

/// Appends records into a page-aligned buffer; [`seal`](Self::seal) pads the commit to whole
/// pages. The buffer is the caller's (a [`Disk`](crate::persist::disk::Disk) buffer in the server).
#[derive(Debug, Default)]
pub struct Batch {
    /// Bytes used.
    len: usize,
    records: u64,
}

impl Batch {
    /// Appends `record` to `buf[len..]`; `Err` if it does not fit (the caller commits first).
    pub fn append(&mut self, buf: &mut [u8], record: &Record<'_>) -> Result<()> {
        let need = record.encoded_len();
        if self.len + need > buf.len() {
            return Err(EngineError::LogBufferFull { bytes: need, left: buf.len() - self.len });
        }
        let index = u32::try_from(self.records).expect("a commit's records fit the buffer");
        record.encode_in_commit(&mut buf[self.len..], index);
        self.len += need;
        self.records += 1;
        Ok(())
    }

    /// Zeroes the rest of the last page and returns the bytes to write (whole pages).
    pub fn seal(&mut self, buf: &mut [u8]) -> usize {
        let end = self.len.next_multiple_of(IO_ALIGN_BYTES);
        buf[self.len..end].fill(0);
        end
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Bytes appended so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// Starts the next commit in the same buffer.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests;
