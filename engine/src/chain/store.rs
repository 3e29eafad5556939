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
//! An update or snapshot is a list of records: `table u32, advances u32, start u64, end u64`,
//! then `advances` times `worker u32, 0u32, clock u64`, then the keys' exported state
//! ([`TablePart::export_keys`]).

use std::ops::Range;

use tessera_replication::codec::PushHeader;
use tessera_replication::placement::range_keys;
use tessera_replication::protocol::RangeId;
use tessera_replication::replica::Store;

use crate::config::CLOCK_MAX;
use crate::error::{EngineError, Result};
use crate::table::TablePart;

/// One push the head applied in the open batch.
#[derive(Debug, Clone)]
struct Touch {
    table: u32,
    keys: Range<u64>,
    worker: u32,
    clock: u64,
}

/// Keys of one table the batch touched, and the clock advances of the pushes that did.
type Span = (u32, Range<u64>, Vec<(u32, u64)>);

/// One record of an update or snapshot, checked against the parts before anything is applied.
struct Rec<'a> {
    table: u32,
    keys: Range<u64>,
    advances: Vec<(u32, u64)>,
    state: &'a [u8],
}

/// A shard's tables, as the shard's replica sees them.
#[derive(Debug, Default)]
pub struct ChainStore {
    /// The shard's table parts, lent by the shard for each call into the replica.
    pub tables: Vec<Option<TablePart>>,
    ranges: u32,
    touched: Vec<Vec<Touch>>,
}

impl ChainStore {
    pub fn new(ranges: u32) -> Self {
        Self { tables: Vec::new(), ranges, touched: vec![Vec::new(); ranges as usize] }
    }

    /// Checks a worker's push before it enters the protocol: a push the head accepts must apply.
    /// Returns the header.
    pub fn check_push(tables: &[Option<TablePart>], ranges: u32, range: RangeId, payload: &[u8]) -> Result<PushHeader> {
        let bad = |reason: String| EngineError::BadRequest { reason };
        let (h, values) = PushHeader::parse(payload).map_err(|e| bad(e.to_string()))?;
        let part = tables.get(h.table as usize).and_then(Option::as_ref).ok_or(EngineError::UnknownTable { table: h.table })?;
        if h.dim != part.spec.dim {
            return Err(EngineError::WrongDim { table: h.table, table_dim: part.spec.dim, request_dim: h.dim });
        }
        if range.0 >= ranges {
            return Err(bad(format!("range {range} of {ranges}")));
        }
        let keys = range_keys(&part.spec, ranges, range.0);
        let end = h.start.checked_add(h.count as u64).ok_or_else(|| bad("keys past 2^64".into()))?;
        if h.count == 0 || h.start < keys.start || end > keys.end {
            return Err(bad(format!("keys [{}, {end}) are not all in range {range}, which holds [{}, {})", h.start, keys.start, keys.end)));
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

    fn part(&mut self, table: u32) -> Option<&mut TablePart> {
        self.tables.get_mut(table as usize).and_then(Option::as_mut)
    }

    /// Parses `bytes` into records, checking each against the parts: all or nothing.
    fn records<'a>(&self, range: RangeId, bytes: &'a [u8]) -> Result<Vec<Rec<'a>>> {
        let corrupt = |reason: String| EngineError::Corrupt { what: format!("a replicated update of range {range}"), reason };
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&'a [u8]> {
            if rest.len() < n {
                return Err(corrupt(format!("truncated: {n} bytes wanted, {} left", rest.len())));
            }
            let (out, after) = rest.split_at(n);
            rest = after;
            Ok(out)
        };
        let le = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let mut out = Vec::new();
        let mut left = bytes.len();
        while left > 0 {
            let head = take(24)?;
            let table = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
            let n = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
            let keys = le(&head[8..16])..le(&head[16..24]);
            let part = self.tables.get(table as usize).and_then(Option::as_ref).ok_or_else(|| corrupt(format!("no table {table} here")))?;
            let owned = part.owned();
            if keys.is_empty() || keys.start < owned.start || keys.end > owned.end {
                return Err(corrupt(format!("keys {keys:?} outside the part {owned:?}")));
            }
            let workers_max = part.clocks().workers_max();
            let mut advances = Vec::with_capacity(n.min(workers_max));
            for _ in 0..n {
                let a = take(16)?;
                let (worker, clock) = (u32::from_le_bytes(a[0..4].try_into().expect("4 bytes")), le(&a[8..16]));
                if worker as usize >= workers_max || clock > CLOCK_MAX {
                    return Err(corrupt(format!("clock {clock} of worker {worker} (the table tracks {workers_max} workers, clocks to {CLOCK_MAX})")));
                }
                advances.push((worker, clock));
            }
            let state = take(part.exported_len(keys.end - keys.start))?;
            // Values and updater state are f32s, and a push never leaves one that is not finite.
            if state.chunks_exact(4).any(|f| !f32::from_le_bytes(f.try_into().expect("4 bytes")).is_finite()) {
                return Err(corrupt(format!("a value of table {table} keys {keys:?} is not finite")));
            }
            left -= 24 + 16 * n + state.len();
            out.push(Rec { table, keys, advances, state });
        }
        Ok(out)
    }

    /// Applies an update or a snapshot: clocks first, then state (which restamps the blocks).
    /// One whose records do not all fit the parts (a corrupt or hostile message, or a server of
    /// another build) is refused before anything of it is applied: half of it would make the
    /// replicas differ.
    fn apply(&mut self, range: RangeId, bytes: &[u8]) -> std::result::Result<(), String> {
        let records = self.records(range, bytes).map_err(|e| e.to_string())?;
        for rec in records {
            let part = self.part(rec.table).expect("checked by records()");
            for (worker, clock) in rec.advances {
                if let Err(e) = part.advance_clock(rec.keys.clone(), worker, clock) {
                    tracing::error!(error = %e, table = rec.table, "a replicated clock advance failed; stamps may lag");
                }
            }
            part.import_keys(rec.keys, rec.state).expect("checked by records()");
        }
        Ok(())
    }
}

fn put_record(part: &TablePart, keys: Range<u64>, advances: &[(u32, u64)], out: &mut Vec<u8>) {
    out.extend_from_slice(&part.id.to_le_bytes());
    out.extend_from_slice(&(advances.len() as u32).to_le_bytes());
    out.extend_from_slice(&keys.start.to_le_bytes());
    out.extend_from_slice(&keys.end.to_le_bytes());
    for (worker, clock) in advances {
        out.extend_from_slice(&worker.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&clock.to_le_bytes());
    }
    part.export_keys(keys, out).expect("replicated tables are dense");
}

impl Store for ChainStore {
    fn apply_push(&mut self, range: RangeId, payload: &[u8], _delta: &mut Vec<u8>) {
        let (h, values) = PushHeader::parse(payload).expect("checked by check_push");
        let values: &[f32] = bytemuck::cast_slice(values);
        let part = self.part(h.table).expect("checked by check_push");
        match part.push_range(h.start, h.count as usize, values, h.worker, h.clock) {
            Ok(keys) => self.touched[range.0 as usize].push(Touch { table: h.table, keys, worker: h.worker, clock: h.clock }),
            // Only the clock's segment limit can refuse a checked push; nothing was applied.
            Err(e) => tracing::error!(error = %e, %range, "a replicated push was not applied"),
        }
    }

    fn seal(&mut self, range: RangeId, delta: &mut Vec<u8>) {
        let touched = std::mem::take(&mut self.touched[range.0 as usize]);
        let mut spans: Vec<Span> = Vec::new();
        for t in touched {
            match spans.iter_mut().find(|(table, keys, _)| *table == t.table && *keys == t.keys) {
                Some((_, _, advances)) => advances.push((t.worker, t.clock)),
                None => spans.push((t.table, t.keys, vec![(t.worker, t.clock)])),
            }
        }
        for (table, keys, advances) in spans {
            let part = self.tables[table as usize].as_ref().expect("a part pushed to");
            put_record(part, keys, &advances, delta);
        }
    }

    fn apply_delta(&mut self, range: RangeId, delta: &[u8]) -> std::result::Result<(), String> {
        self.apply(range, delta)
    }

    fn snapshot(&self, range: RangeId) -> Vec<u8> {
        let mut out = Vec::new();
        for part in self.tables.iter().flatten() {
            let keys = range_keys(&part.spec, self.ranges, range.0);
            let owned = part.owned();
            let keys = keys.start.max(owned.start)..keys.end.min(owned.end);
            if keys.is_empty() {
                continue;
            }
            // One record per clock segment, so the receiver's clocks match ours.
            for (seg, clocks) in part.clocks().segments() {
                let span = seg.start.max(keys.start)..seg.end.min(keys.end);
                if span.is_empty() {
                    continue;
                }
                let advances: Vec<(u32, u64)> =
                    clocks.iter().enumerate().filter(|(_, c)| **c > 0).map(|(w, c)| (w as u32, *c)).collect();
                put_record(part, span, &advances, &mut out);
            }
        }
        out
    }

    fn install(&mut self, range: RangeId, data: &[u8]) -> std::result::Result<(), String> {
        self.apply(range, data)
    }

    fn drop_range(&mut self, range: RangeId) {
        // The keys stay in memory, unserved: the shard answers pulls only for ranges its replica
        // holds, and a range taken again arrives whole in a snapshot.
        self.touched[range.0 as usize].clear();
    }
}
