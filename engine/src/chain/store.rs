//! The engine as chain replication's [`Store`]: a shard's dense table parts, cut into the
//! cluster's replication ranges.
//!
//! The head applies each push with the table's updater. When its batch closes, the update it
//! forwards is the *state* the batch left on the keys it touched (values and updater state),
//! with the clock advances of each push: several workers' pushes to the same keys leave as one
//! copy of those keys (aggregate, then replicate). A successor writes that state as it is, so
//! every replica holds the head's bits exactly, whatever the updater; and writing a state twice
//! changes nothing, so a resent update is harmless.
//!
//! An update or snapshot is a list of records: `table u32, advances u32, start u64, end u64,
//! step u64` (the pushes the head's part has applied: Adam's bias correction counts them, and a
//! replica that becomes head goes on from there), then `advances` times `worker u32, 0u32,
//! clock u64`. For a dense table, the keys' exported state follows
//! ([`TablePart::export_keys`]). For a sparse table, `keys u64`, that
//! many keys inside `[start, end)` in increasing order, then their records
//! ([`TablePart::export_listed`]). A snapshot of a sparse range lists every key the part holds
//! there, and the replica installing it forgets the keys it does not list.
//!
//! With `--durability wal`, every update and snapshot a replica applies, and each range it
//! drops, goes to the shard's write-ahead log as [`Target::Replica`] records (the same bytes,
//! with the range's version and clock), committed in groups on the shard's io_uring ring like
//! pushes. The replica commits an update only once its record is durable
//! ([`Store::durable_lsn`]). A checkpoint records the ranges held, with their versions and
//! clocks. At start-up the shard loads its newest checkpoint and replays the records after it
//! ([`replay`]), and the replica holds again what they leave ([`Store::recovered`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use tessera_layout::placement::range_keys;
use tessera_layout::TableKind;
use tessera_replication::codec::PushHeader;
use tessera_replication::protocol::RangeId;
use tessera_replication::replica::{Recovered, Store};

use crate::config::CLOCK_MAX;
use crate::error::{EngineError, Result};
use crate::persist::durable::{ReplicaReplayed, ShardDisk};
use crate::persist::wal::{replica_flags, Record, Target, RECORD_HEADER_BYTES};
use crate::table::TablePart;
use crate::tables::Tables;

/// Bytes of state one log record carries at most: larger updates and snapshots are cut into
/// pieces, so that a piece never waits for more than one log commit to make room.
const LOG_PIECE_BYTES_MAX: usize = 1 << 20;

/// One push the head applied in the open batch.
#[derive(Debug, Clone)]
struct Touch {
    table: u32,
    /// The keys whose clocks the push advanced.
    keys: Range<u64>,
    worker: u32,
    clock: u64,
    /// Where a sparse push's keys are in [`Batch::listed`] (empty for a dense push: it touched
    /// all of `keys`).
    listed: Range<usize>,
    /// Its place among the batch's pushes.
    order: u32,
}

/// The pushes the head applied in a range's open batch, kept for its seal. Their buffers are
/// reused from batch to batch.
#[derive(Debug, Clone, Default)]
struct Batch {
    touches: Vec<Touch>,
    /// The keys the batch's sparse pushes listed, one push after another.
    listed: Vec<u64>,
}

impl Batch {
    fn clear(&mut self) {
        self.touches.clear();
        self.listed.clear();
    }
}

/// One record of an update or snapshot, checked against the parts before anything is applied:
/// where its clock advances and listed keys lie in the [`UpdateScratch`] it was parsed into,
/// and where its state lies in the update's bytes.
#[derive(Debug)]
struct Rec {
    table: u32,
    keys: Range<u64>,
    step: u64,
    advances: Range<usize>,
    /// A sparse table's keys, whose records `state` holds; `None` for a dense table.
    listed: Option<Range<usize>>,
    state: Range<usize>,
}

/// What parsing an update or snapshot needs, kept from one to the next: a follower applies
/// the updates of its ranges without allocating once warm.
#[derive(Debug, Default)]
pub struct UpdateScratch {
    records: Vec<Rec>,
    advances: Vec<(u32, u64)>,
    listed: Vec<u64>,
    /// One table's new sparse keys, counted together.
    room: Vec<u64>,
}

/// A shard's tables, as the shard's replica sees them.
#[derive(Debug, Default)]
pub struct ChainStore {
    /// The shard's tables, lent by the shard for each call into the replica.
    pub tables: Tables,
    /// The shard's disk, lent the same way; it logs when the server runs `--durability wal`.
    pub disk: Option<Box<ShardDisk>>,
    touched: Vec<Batch>,
    /// A seal's scratch: one record's clock advances and listed keys.
    advances: Vec<(u32, u64)>,
    span_listed: Vec<u64>,
    /// Each push applied since the shard last cleared it, as (table, range, keys whose clocks it
    /// advanced): the stamp a head's answer to a worker carries
    /// ([`ChainShard::serve_worker`](super::ChainShard::serve_worker)).
    pub applied: Vec<(u32, RangeId, Range<u64>)>,
    /// What the shard's log held at start-up: each range's version and clock.
    recovered: BTreeMap<u32, Found>,
    /// A peer's update or snapshot named a table this server does not have: it missed the
    /// table's creation, and its catalog is to be brought up to the cluster's.
    pub missing_table: bool,
    /// A logged record's clock words, then its digest: kept from record to record.
    clock_words: Vec<u32>,
    /// Where a peer's update is parsed before it is applied.
    update_scratch: UpdateScratch,
}

/// A range a replicated shard's disk holds: its version, clock, and history digest (when the
/// disk recorded it).
pub type Found = (u64, Vec<u32>, Option<u32>);

/// What replaying a replicated shard's log has found so far.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Each range held.
    pub ranges: BTreeMap<u32, Found>,
    /// Pieces of a record whose last piece has not been read yet.
    pieces: HashMap<u32, Vec<u8>>,
}

/// Takes what a replicated shard's recovery found: the ranges its checkpoint holds, then each
/// log record after it, replayed into its tables (see the module doc).
pub fn replay(tables: &mut Tables, ranges: u32, replayed: &mut Replayed, found: ReplicaReplayed<'_>) -> Result<()> {
    let record = match found {
        ReplicaReplayed::Checkpoint(held) => {
            if let Some(bad) = held.iter().find(|h| h.range >= ranges) {
                return Err(EngineError::BadRequest { reason: format!("range {}, of a cluster of {ranges} ranges", bad.range) });
            }
            replayed.ranges = held.iter().map(|h| (h.range, (h.version, h.clock.clone(), h.digest))).collect();
            return Ok(());
        }
        ReplicaReplayed::Record(record) => record,
    };
    let Target::Replica { range, version, flags, clock } = record.target else {
        return Err(EngineError::BadRequest { reason: "not a replica's record".into() });
    };
    if range >= ranges {
        return Err(EngineError::BadRequest { reason: format!("range {range}, of a cluster of {ranges} ranges") });
    }
    if flags & replica_flags::DROPPED != 0 {
        tables.release(range, false);
        replayed.ranges.remove(&range);
        replayed.pieces.remove(&range);
        return Ok(());
    }
    let piece = replayed.pieces.entry(range).or_default();
    piece.extend_from_slice(record.state_bytes());
    if flags & replica_flags::MORE != 0 {
        return Ok(());
    }
    let bytes = replayed.pieces.remove(&range).unwrap_or_default();
    apply_to(tables, RangeId(range), &bytes, flags & replica_flags::WHOLE != 0, &mut UpdateScratch::default())
        .map_err(|e| EngineError::BadRequest { reason: e.to_string() })?;
    // A record's clock words end with the digest when it has one.
    let (clock, digest) = match (flags & replica_flags::DIGEST != 0, clock.split_last()) {
        (true, Some((digest, clock))) => (clock, Some(*digest)),
        _ => (clock, None),
    };
    replayed.ranges.insert(range, (version, clock.to_vec(), digest));
    Ok(())
}

impl ChainStore {
    pub fn new(ranges: u32) -> Self {
        Self {
            tables: Tables::default(),
            disk: None,
            touched: vec![Batch::default(); ranges as usize],
            advances: Vec::new(),
            span_listed: Vec::new(),
            applied: Vec::new(),
            recovered: BTreeMap::new(),
            missing_table: false,
            clock_words: Vec::new(),
            update_scratch: UpdateScratch::default(),
        }
    }

    /// A store holding what replaying the shard's log found.
    pub fn recovered(ranges: u32, replayed: Replayed) -> Self {
        Self { recovered: replayed.ranges, ..Self::new(ranges) }
    }

    /// Appends a replica record of `bytes` to the log, in pieces; the last piece's LSN, or
    /// `u64::MAX` (never durable) when the log has failed. The digest, when given, follows the
    /// clock's words ([`replica_flags::DIGEST`]).
    fn log(&mut self, range: RangeId, version: u64, flags: u32, clock: &[u32], digest: Option<u32>, bytes: &[u8]) -> u64 {
        let Some(disk) = self.disk.as_mut().filter(|d| d.logs()) else { return 0 };
        let (clock, flags) = match digest {
            Some(d) => {
                self.clock_words.clear();
                self.clock_words.extend_from_slice(clock);
                self.clock_words.push(d);
                (&self.clock_words[..], flags | replica_flags::DIGEST)
            }
            None => (clock, flags),
        };
        // State is f32s and 4-byte fields; copied only if the bytes are not 4-byte aligned.
        let words: std::borrow::Cow<'_, [f32]> = match bytemuck::try_cast_slice(bytes) {
            Ok(words) => words.into(),
            Err(_) if bytes.len().is_multiple_of(4) => {
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect::<Vec<f32>>().into()
            }
            Err(_) => {
                tracing::error!(%range, version, len = bytes.len(), "replicated state that is not whole 4-byte words cannot be logged");
                return u64::MAX;
            }
        };
        let room = disk.log_buffer_bytes().saturating_sub(RECORD_HEADER_BYTES + 8 + 4 * clock.len());
        let piece = (room.min(LOG_PIECE_BYTES_MAX) / 4).max(1);
        let pieces = words.chunks(piece).count().max(1);
        let mut lsn = 0;
        for i in 0..pieces {
            let values = words.chunks(piece).nth(i).unwrap_or(&[]);
            let flags = flags | if i + 1 < pieces { replica_flags::MORE } else { 0 };
            let target = Target::Replica { range: range.0, version, flags, clock };
            let record = Record { lsn: 0, table: range.0, worker: flags, clock: version, dim: 1, target, values };
            if let Err(e) = disk.reserve(record.encoded_len()) {
                tracing::error!(error = %e, %range, version, "a replicated update cannot be logged: it is never committed here");
                return u64::MAX;
            }
            lsn = disk.append(record);
        }
        lsn
    }

    /// Checks a worker's push before it enters the protocol: a push the head accepts must apply.
    /// Returns the header.
    pub fn check_push(tables: &Tables, ranges: u32, range: RangeId, payload: &[u8]) -> Result<PushHeader> {
        let bad = |reason: String| EngineError::BadRequest { reason };
        let (h, keys_bytes, values) = PushHeader::parse(payload).map_err(|e| bad(e.to_string()))?;
        let table = tables.get(h.table).ok_or(EngineError::UnknownTable { table: h.table })?;
        if h.dim != table.spec.dim {
            return Err(EngineError::WrongDim { table: h.table, table_dim: table.spec.dim, request_dim: h.dim });
        }
        if range.0 >= ranges {
            return Err(bad(format!("range {range} of {ranges}")));
        }
        if range_keys(&table.spec, ranges, range.0).is_empty() && h.range_done {
            return Err(bad(format!("range {range} holds no keys of table {}: nothing to complete a clock on", h.table)));
        }
        let Some(part) = tables.at(h.table, range.0) else {
            // Not a range this shard holds, so not one its replica heads (a head holds a part
            // of each table for each range it heads, `Tables::hold`): the replica answers
            // NotHead and applies nothing ([`ChainShard::serve_worker`] checks the head).
            return Ok(h);
        };
        let keys = part.owned();
        if h.count == 0 && !h.range_done {
            return Err(bad("a push of no keys".into()));
        }
        // A sparse table takes listed keys only; a dense one either (its update carries the
        // state of the span the keys fall in).
        if !h.listed && part.spec.kind == TableKind::Sparse {
            return Err(bad(format!("a range push to sparse table {}", h.table)));
        }
        let table_keys = part.spec.start..part.spec.end;
        let outside = |key: u64| EngineError::KeyOutOfRange { table: h.table, key, range: table_keys.clone() };
        if h.listed {
            let listed = listed_keys(keys_bytes)?;
            if let Some(k) = listed.iter().find(|k| !table_keys.contains(k)) {
                return Err(outside(*k));
            }
            if let Some(k) = listed.iter().find(|k| !keys.contains(k)) {
                return Err(bad(format!("key {k} is not in range {range}, which holds [{}, {})", keys.start, keys.end)));
            }
            if part.spec.kind == TableKind::Sparse {
                part.check_sparse_room(listed)?;
            }
        } else {
            let end = h.start.checked_add(h.count as u64).ok_or_else(|| bad("keys past 2^64".into()))?;
            if h.start < table_keys.start || end > table_keys.end {
                return Err(outside(if h.start < table_keys.start { h.start } else { end - 1 }));
            }
            if h.start < keys.start || end > keys.end {
                return Err(bad(format!("keys [{}, {end}) are not all in range {range}, which holds [{}, {})", h.start, keys.start, keys.end)));
            }
        }
        if h.clock > CLOCK_MAX {
            return Err(EngineError::ClockTooLarge { clock: h.clock, max: CLOCK_MAX });
        }
        let workers_max = part.clocks().workers_max();
        if h.worker as usize >= workers_max {
            return Err(EngineError::WorkerOutOfRange { worker: h.worker, workers_max });
        }
        let values: &[f32] = bytemuck::try_cast_slice(values).map_err(|_| bad("values are not aligned f32s".into()))?;
        part.check_push_values(h.count as usize, values)?;
        Ok(h)
    }

    /// Applies an update, or a snapshot (`whole`), to the lent tables: see [`apply_to`].
    fn apply(&mut self, range: RangeId, bytes: &[u8], whole: bool) -> std::result::Result<(), String> {
        apply_to(&mut self.tables, range, bytes, whole, &mut self.update_scratch).map_err(|e| match e {
            EngineError::UnknownTable { table } => {
                self.missing_table = true;
                format!("an update of range {range} names table {table}, which this server lacks (it missed the table's creation)")
            }
            e => e.to_string(),
        })
    }
}

/// Parses `bytes` into records in `scratch`, checking each against the parts: all or nothing.
fn records(tables: &Tables, range: RangeId, bytes: &[u8], scratch: &mut UpdateScratch) -> Result<()> {
    {
        let corrupt = |reason: String| EngineError::Corrupt { what: format!("a replicated update of range {range}"), reason };
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8]> {
            if rest.len() < n {
                return Err(corrupt(format!("truncated: {n} bytes wanted, {} left", rest.len())));
            }
            let (out, after) = rest.split_at(n);
            rest = after;
            Ok(out)
        };
        let le = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let UpdateScratch { records: out, advances, listed: all_listed, room } = scratch;
        out.clear();
        advances.clear();
        all_listed.clear();
        let mut left = bytes.len();
        while left > 0 {
            let at = bytes.len() - left;
            let head = take(32)?;
            let table = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
            let n = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
            let keys = le(&head[8..16])..le(&head[16..24]);
            let step = le(&head[24..32]);
            // A table this server lacks: it missed the table's creation (see `missing_table`).
            tables.get(table).ok_or(EngineError::UnknownTable { table })?;
            let part = tables.at(table, range.0).ok_or_else(|| corrupt(format!("keys {keys:?} of table {table}, which has none in the range")))?;
            let owned = part.owned();
            if keys.is_empty() || keys.start < owned.start || keys.end > owned.end {
                return Err(corrupt(format!("keys {keys:?} outside the range's keys {owned:?}")));
            }
            let workers_max = part.clocks().workers_max();
            let first_advance = advances.len();
            for _ in 0..n {
                let a = take(16)?;
                let (worker, clock) = (u32::from_le_bytes(a[0..4].try_into().expect("4 bytes")), le(&a[8..16]));
                if worker as usize >= workers_max || clock > CLOCK_MAX {
                    return Err(corrupt(format!("clock {clock} of worker {worker} (the table tracks {workers_max} workers, clocks to {CLOCK_MAX})")));
                }
                advances.push((worker, clock));
            }
            let listed = match part.spec.kind {
                TableKind::Dense => None,
                TableKind::Sparse => {
                    let n = le(take(8)?);
                    let bytes = take(usize::try_from(n).ok().and_then(|n| n.checked_mul(8)).ok_or_else(|| corrupt(format!("{n} keys")))?)?;
                    let first = all_listed.len();
                    all_listed.extend(bytes.chunks_exact(8).map(le));
                    let listed = &all_listed[first..];
                    if listed.windows(2).any(|w| w[0] >= w[1])
                        || listed.first().is_some_and(|k| *k < keys.start)
                        || listed.last().is_some_and(|k| *k >= keys.end)
                    {
                        return Err(corrupt(format!("keys of table {table} not increasing inside {keys:?}")));
                    }
                    Some(first..all_listed.len())
                }
            };
            let held = listed.as_ref().map_or(keys.end - keys.start, |l| l.len() as u64);
            let state_at = at + 32 + 16 * n + listed.as_ref().map_or(0, |l| 8 + 8 * l.len());
            let state = take(part.exported_len(held))?;
            // Values and updater state are f32s, and a push never leaves one that is not finite.
            if !all_finite(state) {
                return Err(corrupt(format!("a value of table {table} keys {keys:?} is not finite")));
            }
            left -= 32 + 16 * n + listed.as_ref().map_or(0, |l| 8 + 8 * l.len()) + state.len();
            out.push(Rec { table, keys, step, advances: first_advance..advances.len(), listed, state: state_at..state_at + state.len() });
        }
        // New sparse keys must all fit, counted together (each table's once), before any is
        // inserted.
        for (at, rec) in out.iter().enumerate() {
            if rec.listed.is_none() || out[..at].iter().any(|r| r.table == rec.table && r.listed.is_some()) {
                continue;
            }
            room.clear();
            for r in out[at..].iter().filter(|r| r.table == rec.table) {
                room.extend_from_slice(&all_listed[r.listed.clone().expect("a sparse table's records list keys")]);
            }
            let part = tables.at(rec.table, range.0).expect("checked above");
            part.check_sparse_room(room).map_err(|e| corrupt(e.to_string()))?;
        }
        Ok(())
    }
}

/// Whether the f32s `state` holds are all finite: as whole words (vectorised) when they are
/// aligned, as they are in a received update, else word by word.
fn all_finite(state: &[u8]) -> bool {
    match bytemuck::try_cast_slice::<u8, f32>(state) {
        Ok(values) => tessera_layout::catalog::first_non_finite(values).is_none(),
        Err(_) => state.chunks_exact(4).all(|f| f32::from_le_bytes(f.try_into().expect("4 bytes")).is_finite()),
    }
}

/// Applies an update, or a snapshot (`whole`): clocks first, then state (which restamps the
/// blocks). One whose records do not all fit the parts (a corrupt or hostile message, or a
/// server of another build) is refused before anything of it is applied: half of it would
/// make the replicas differ.
/// The range's parts are made first if this shard lacks them: it is in the range's chain.
fn apply_to(tables: &mut Tables, range: RangeId, bytes: &[u8], whole: bool, scratch: &mut UpdateScratch) -> Result<()> {
    tables.hold(range.0)?;
    records(tables, range, bytes, scratch)?;
    if whole {
        // A snapshot lists every key of the range a sparse table holds; forget the others.
        for part in tables.range_parts_mut(range.0) {
            part.reset_keys(part.owned());
        }
    }
    for rec in &scratch.records {
        let part = tables.at_mut(rec.table, range.0).expect("checked by records()");
        // A snapshot's step is the range's; an update resent after a newer one counts nothing.
        part.set_step(if whole { rec.step } else { rec.step.max(part.step()) });
        for &(worker, clock) in &scratch.advances[rec.advances.clone()] {
            if let Err(e) = part.advance_clock(rec.keys.clone(), worker, clock) {
                tracing::error!(error = %e, table = rec.table, "a replicated clock advance failed; stamps may lag");
            }
        }
        let state = &bytes[rec.state.clone()];
        match &rec.listed {
            None => part.import_keys(rec.keys.clone(), state),
            Some(listed) => part.import_listed(&scratch.listed[listed.clone()], state),
        }
        .expect("checked by records()");
    }
    Ok(())
}

/// A listed-key push's keys, as u64s.
fn listed_keys(bytes: &[u8]) -> Result<&[u64]> {
    bytemuck::try_cast_slice(bytes).map_err(|_| EngineError::BadRequest { reason: "keys are not aligned u64s".into() })
}

/// Appends one record: `listed` names a sparse table's keys (and is ignored for a dense table).
fn put_record(part: &TablePart, keys: Range<u64>, advances: &[(u32, u64)], listed: &[u64], out: &mut Vec<u8>) {
    out.extend_from_slice(&part.id.to_le_bytes());
    out.extend_from_slice(&(advances.len() as u32).to_le_bytes());
    out.extend_from_slice(&keys.start.to_le_bytes());
    out.extend_from_slice(&keys.end.to_le_bytes());
    out.extend_from_slice(&part.step().to_le_bytes());
    for (worker, clock) in advances {
        out.extend_from_slice(&worker.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&clock.to_le_bytes());
    }
    match part.spec.kind {
        TableKind::Dense => part.export_keys(keys, out).expect("a dense part"),
        TableKind::Sparse => {
            out.extend_from_slice(&(listed.len() as u64).to_le_bytes());
            listed.iter().for_each(|k| out.extend_from_slice(&k.to_le_bytes()));
            part.export_listed(listed, out).expect("a sparse part");
        }
    }
}

impl Store for ChainStore {
    fn apply_push(&mut self, range: RangeId, payload: &[u8], _delta: &mut Vec<u8>, forwarded: bool) {
        let (h, keys, values) = PushHeader::parse(payload).expect("checked by check_push");
        let values: &[f32] = bytemuck::cast_slice(values);
        // What the pushes touched is exported at the seal only if something reads it.
        let exported = forwarded || self.disk.as_deref().is_some_and(|d| d.logs());
        let part = self.tables.at_mut(h.table, range.0).expect("checked by check_push");
        let batch = &mut self.touched[range.0 as usize];
        let listed_at = batch.listed.len();
        let mut applied = if h.listed {
            let keys = listed_keys(keys).expect("checked by check_push");
            // `check_push` passed the values; a table that rejects non-finite ones is not
            // scanned again.
            let pushed = if keys.is_empty() { Ok(0..0) } else { part.push_passed(keys, values, h.worker, h.clock) };
            if exported && pushed.is_ok() {
                batch.listed.extend_from_slice(keys);
            }
            pushed
        } else {
            part.push_range_passed(h.start, h.count as usize, values, h.worker, h.clock)
        };
        if h.range_done && applied.is_ok() {
            // The worker's clock over the whole range (bounded delay: the worker's push
            // completes its clock on every range of the table).
            let whole = part.owned();
            applied = part.advance_clock(whole.clone(), h.worker, h.clock).map(|()| whole);
        }
        if let Ok(keys) = &applied {
            self.applied.push((h.table, range, keys.clone()));
        }
        match applied {
            Ok(_) if !exported => {}
            Ok(keys) => {
                let (listed, order) = (listed_at..batch.listed.len(), batch.touches.len() as u32);
                batch.touches.push(Touch { table: h.table, keys, worker: h.worker, clock: h.clock, listed, order });
            }
            // Only the clock's segment limit can refuse a checked push; nothing was applied.
            Err(e) => tracing::error!(error = %e, %range, "a replicated push was not applied"),
        }
    }

    fn seal(&mut self, range: RangeId, delta: &mut Vec<u8>, forwarded: bool) {
        let Self { tables, disk, touched, advances, span_listed, .. } = self;
        let batch = &mut touched[range.0 as usize];
        if !forwarded && !disk.as_deref().is_some_and(|d| d.logs()) {
            // Nothing reads the update: exporting the state the pushes left would cost a chain
            // of one a second pass over every key they touched.
            batch.clear();
            return;
        }
        // One record per table and keys, with the clock advances of every push that touched
        // them, in the order they were applied.
        batch.touches.sort_unstable_by_key(|t| (t.table, t.keys.start, t.keys.end, t.order));
        let mut rest = &batch.touches[..];
        while let Some(first) = rest.first() {
            let run = rest.iter().take_while(|t| t.table == first.table && t.keys == first.keys).count();
            advances.clear();
            span_listed.clear();
            for t in &rest[..run] {
                advances.push((t.worker, t.clock));
                span_listed.extend_from_slice(&batch.listed[t.listed.clone()]);
            }
            span_listed.sort_unstable();
            span_listed.dedup();
            let part = tables.at(first.table, range.0).expect("a part pushed to");
            put_record(part, first.keys.clone(), advances, span_listed, delta);
            rest = &rest[run..];
        }
        batch.clear();
    }

    fn apply_delta(&mut self, range: RangeId, delta: &[u8]) -> std::result::Result<(), String> {
        self.apply(range, delta, false)
    }

    fn snapshot(&self, range: RangeId) -> Vec<u8> {
        let mut out = Vec::new();
        for part in self.tables.range_parts(range.0) {
            let keys = part.owned();
            let held = part.held_keys(keys.clone());
            // One record per clock segment, so the receiver's clocks match ours.
            for (seg, clocks) in part.clocks().segments() {
                let span = seg.start.max(keys.start)..seg.end.min(keys.end);
                if span.is_empty() {
                    continue;
                }
                let advances: Vec<(u32, u64)> = clocks.iter().enumerate().filter(|(_, c)| **c > 0).map(|(w, c)| (w as u32, *c)).collect();
                let listed = &held[held.partition_point(|k| *k < span.start)..held.partition_point(|k| *k < span.end)];
                put_record(part, span, &advances, listed, &mut out);
            }
        }
        out
    }

    fn install(&mut self, range: RangeId, data: &[u8]) -> std::result::Result<(), String> {
        self.apply(range, data, true)
    }

    fn drop_range(&mut self, range: RangeId) {
        // The memory goes: a range taken again is made afresh and arrives whole in a snapshot.
        let checkpointing = self.disk.as_deref().is_some_and(ShardDisk::checkpointing);
        self.tables.release(range.0, checkpointing);
        self.touched[range.0 as usize].clear();
        self.log(range, 0, replica_flags::DROPPED, &[], None, &[]);
    }

    fn persist(&mut self, range: RangeId, version: u64, digest: u32, clock: &[u32], bytes: &[u8], whole: bool) -> u64 {
        self.log(range, version, if whole { replica_flags::WHOLE } else { 0 }, clock, Some(digest), bytes)
    }

    fn durable_lsn(&self) -> u64 {
        self.disk.as_deref().filter(|d| d.logs()).map_or(0, ShardDisk::durable)
    }

    fn recovered(&self) -> Vec<Recovered> {
        let found = self.recovered.iter();
        found.map(|(r, (version, clock, digest))| Recovered { range: RangeId(*r), version: *version, clock: clock.clone(), digest: *digest }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EngineConfig;
    use crate::persist::checkpoint::RangeHeld;
    use crate::updater::UpdaterRegistry;
    use std::sync::Arc;
    use tessera_layout::catalog::TableSpec;

    const RANGES: u32 = 4;

    /// A store holding table 0, `spec`, in every range, as a 1-shard replicated server's.
    fn store(spec: &TableSpec) -> ChainStore {
        let updater = UpdaterRegistry::new().build(&spec.updater).unwrap();
        let mut s = ChainStore::new(RANGES);
        s.tables = Tables::new(0, Arc::new(EngineConfig::default()), RANGES);
        s.tables.add(0, spec.clone(), spec.start..spec.end, updater, |_| true).unwrap();
        s
    }

    fn sparse() -> TableSpec {
        let mut spec = TableSpec::new("emb", TableKind::Sparse, 0, u64::MAX, 2);
        spec.updater = "adagrad{lr=0.1}".into();
        spec.capacity = 1000;
        spec
    }

    /// What a store holds of range `r`: its keys, their records, and the part's clocks.
    type Held = (Vec<u64>, Vec<u8>, Vec<(Range<u64>, Vec<u64>)>);

    /// Everything a reader of range `r` could tell apart: held keys, their records, and clocks.
    fn state(s: &ChainStore, r: u32) -> Held {
        let part = s.tables.at(0, r).unwrap();
        let held = part.held_keys(part.owned());
        let mut records = Vec::new();
        part.export_listed(&held, &mut records).unwrap();
        let clocks = part.clocks().segments().map(|(seg, c)| (seg, c.to_vec())).collect();
        (held, records, clocks)
    }

    fn push(s: &mut ChainStore, r: u32, keys: &[u64], worker: u32, clock: u64) {
        let h = PushHeader { table: 0, dim: 2, start: 0, count: keys.len() as u32, worker, clock, listed: true, range_done: false };
        let grads: Vec<f32> = keys.iter().flat_map(|k| [(*k % 7) as f32 * 0.25 + 0.5, -1.0]).collect();
        let payload = h.keyed_payload(keys, &grads);
        ChainStore::check_push(&s.tables, RANGES, RangeId(r), &payload).unwrap();
        s.apply_push(RangeId(r), &payload, &mut Vec::new(), true);
    }

    #[test]
    fn sparse_updates_and_snapshots_leave_replicas_identical() {
        let spec = sparse();
        let r = 1;
        let keys = range_keys(&spec, RANGES, r);
        let k = |i: u64| keys.start + i * 1_000_003;
        let (mut head, mut next) = (store(&spec), store(&spec));
        // Two workers share key k(1) in one batch: it leaves once, with both advances.
        push(&mut head, r, &[k(0), k(1)], 0, 1);
        push(&mut head, r, &[k(1), k(2), k(1)], 1, 1);
        let mut delta = Vec::new();
        head.seal(RangeId(r), &mut delta, true);
        next.apply_delta(RangeId(r), &delta).unwrap();
        assert_eq!(state(&next, r), state(&head, r));
        assert_eq!(state(&next, r).0, vec![k(0), k(1), k(2)]);
        // It counts the head's pushes, as Adam's bias correction does, should it become head.
        assert_eq!((next.tables.at(0, r).unwrap().step(), head.tables.at(0, r).unwrap().step()), (2, 2));
        // Applying the same update again changes nothing.
        next.apply_delta(RangeId(r), &delta).unwrap();
        assert_eq!(state(&next, r), state(&head, r));

        // A replica that held stale keys of the range takes a snapshot: it forgets them (they
        // read as never pushed) and holds the head's records exactly. Other ranges stay.
        let mut stale = store(&spec);
        push(&mut stale, r, &[k(1), k(5)], 3, 1);
        let other = range_keys(&spec, RANGES, 2).start + 17;
        push(&mut stale, 2, &[other], 3, 1);
        let kept = state(&stale, 2);
        stale.install(RangeId(r), &head.snapshot(RangeId(r))).unwrap();
        assert_eq!(stale.tables.at(0, r).unwrap().step(), 2, "a snapshot carries the head's step");
        // It keeps k(5) in its table, at its initial record: what the head exports for it too.
        let mut want = Vec::new();
        head.tables.at(0, r).unwrap().export_listed(&[k(0), k(1), k(2), k(5)], &mut want).unwrap();
        let (held, records, _) = state(&stale, r);
        assert_eq!((held, records), (vec![k(0), k(1), k(2), k(5)], want));
        assert_eq!(state(&stale, 2).1, kept.1, "another range's keys are untouched");
        let mut fresh = [0f32; 2];
        stale.tables.at_mut(0, r).unwrap().pull(&[k(5)], &mut fresh);
        assert_eq!(fresh, [0.0, 0.0], "a forgotten key reads as its initial value");
    }

    /// A replica record of `bytes`, as the log holds it.
    fn logged<'a>(range: u32, version: u64, flags: u32, clock: &'a [u32], bytes: &'a [f32]) -> Record<'a> {
        Record { lsn: 0, table: range, worker: flags, clock: version, dim: 1, target: Target::Replica { range, version, flags, clock }, values: bytes }
    }

    #[test]
    fn a_replayed_log_leaves_what_the_replica_held_and_a_torn_sequence_changes_nothing() {
        let spec = sparse();
        let (r, other) = (1, 2);
        let keys = range_keys(&spec, RANGES, r);
        let mut head = store(&spec);
        push(&mut head, r, &[keys.start + 3, keys.start + 8], 0, 1);
        let mut delta = Vec::new();
        head.seal(RangeId(r), &mut delta, true);
        let words: Vec<f32> = delta.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let snapshot: Vec<f32> = head.snapshot(RangeId(r)).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let clock = [1u32, 0, 0, 0];
        let mut replayed = Replayed::default();
        let mut tables = store(&spec).tables;
        let (born, more, last) = (replica_flags::WHOLE, replica_flags::MORE, 0);
        let split = words.len() / 2;
        for record in [
            logged(r, 0, born, &[0; 4], &[]),
            logged(other, 0, born, &[0; 4], &[]),
            logged(r, 1, more, &clock, &words[..split]),
            logged(r, 1, last, &clock, &words[split..]),
            logged(other, 0, replica_flags::DROPPED, &[], &[]),
            // A snapshot cut off by the crash: its first piece only.
            logged(r, 9, born | more, &[5; 4], &snapshot[..snapshot.len() / 2]),
        ] {
            replay(&mut tables, RANGES, &mut replayed, ReplicaReplayed::Record(&record)).unwrap();
        }
        assert_eq!(replayed.ranges, BTreeMap::from([(r, (1, clock.to_vec(), None))]), "range {other} was dropped; the torn snapshot is not applied");
        let recovered = ChainStore { tables, ..ChainStore::new(RANGES) };
        assert_eq!(state(&recovered, r), state(&head, r));
        let bad = logged(RANGES, 1, last, &clock, &words);
        assert!(replay(&mut store(&spec).tables, RANGES, &mut Replayed::default(), ReplicaReplayed::Record(&bad)).is_err(), "a range past the cluster's");
        // A checkpoint's ranges are where replay starts from; a range past the cluster's is refused.
        let held = [RangeHeld { range: other, version: 7, clock: vec![1, 2, 3, 4], digest: Some(9) }];
        replay(&mut store(&spec).tables, RANGES, &mut replayed, ReplicaReplayed::Checkpoint(&held)).unwrap();
        assert_eq!(replayed.ranges, BTreeMap::from([(other, (7, vec![1, 2, 3, 4], Some(9)))]));
        let past = [RangeHeld { range: RANGES, version: 7, clock: vec![0; 4], digest: None }];
        assert!(replay(&mut store(&spec).tables, RANGES, &mut replayed, ReplicaReplayed::Checkpoint(&past)).is_err());
    }

    #[test]
    fn a_value_that_is_not_finite_is_found_aligned_or_not() {
        let mut values = vec![1.5f32; 300];
        let check = |values: &[f32]| {
            let bytes: &[u8] = bytemuck::cast_slice(values);
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(bytes);
            (all_finite(bytes), all_finite(&shifted[1..]))
        };
        assert_eq!(check(&values), (true, true));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            values[299] = bad;
            assert_eq!(check(&values), (false, false), "{bad} last");
            values[299] = 1.5;
            values[70] = bad;
            assert_eq!(check(&values), (false, false), "{bad} inside");
            values[70] = 1.5;
        }
    }

    #[test]
    fn malformed_sparse_records_and_pushes_are_refused_whole() {
        let spec = sparse();
        let r = 0;
        let keys = range_keys(&spec, RANGES, r);
        let mut head = store(&spec);
        push(&mut head, r, &[keys.start + 5, keys.start + 9], 0, 1);
        let mut delta = Vec::new();
        head.seal(RangeId(r), &mut delta, true);
        let listed_at = 32 + 16; // header, one advance, then the key count
        let mut swapped = delta.clone();
        swapped.copy_within(listed_at + 8..listed_at + 16, listed_at + 16);
        let mut many = delta.clone();
        many[listed_at..listed_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut victim = store(&spec);
        let before = state(&victim, r);
        for (what, bytes) in [("keys not increasing", &swapped[..]), ("a huge key count", &many[..]), ("truncated", &delta[..delta.len() - 1])] {
            assert!(victim.apply_delta(RangeId(r), bytes).is_err(), "{what}");
            assert_eq!(state(&victim, r), before, "{what} changed something");
        }
        // Pushes: a key outside the range, a range push to a sparse table; listed keys to a
        // dense table are taken (the client's keyed pushes to dense tables).
        let h = PushHeader { table: 0, dim: 2, start: 0, count: 1, worker: 0, clock: 1, listed: true, range_done: false };
        let outside = h.keyed_payload(&[range_keys(&spec, RANGES, 3).start], &[1.0, 1.0]);
        assert!(ChainStore::check_push(&head.tables, RANGES, RangeId(r), &outside).unwrap_err().to_string().contains("not in range"));
        let ranged = PushHeader { listed: false, start: keys.start, ..h }.payload(&[1.0, 1.0]);
        assert!(ChainStore::check_push(&head.tables, RANGES, RangeId(r), &ranged).unwrap_err().to_string().contains("range push"));
        // A push to a range the shard holds no part of passes to the replica, which is not its
        // head and answers NotHead without applying it.
        let updater = UpdaterRegistry::new().build(&spec.updater).unwrap();
        let mut elsewhere = ChainStore::new(RANGES);
        elsewhere.tables = Tables::new(0, Arc::new(EngineConfig::default()), RANGES);
        elsewhere.tables.add(0, spec.clone(), spec.start..spec.end, updater, |r| r != 3).unwrap();
        let other = h.keyed_payload(&[range_keys(&spec, RANGES, 3).start], &[1.0, 1.0]);
        assert!(elsewhere.tables.at(0, 3).is_none());
        ChainStore::check_push(&elsewhere.tables, RANGES, RangeId(3), &other).expect("left to the replica");
        let dense_spec = TableSpec::new("d", TableKind::Dense, 0, 64, 2);
        let dense = store(&dense_spec);
        let listed = h.keyed_payload(&[3], &[1.0, 1.0]);
        ChainStore::check_push(&dense.tables, RANGES, RangeId(tessera_layout::placement::range_of(&dense_spec, RANGES, 3)), &listed)
            .expect("listed keys to a dense table");
    }
}
