//! One shard's part of a table: its values, its updater's state, and its vector clocks.
//!
//! Dense parts keep values and each state slot as separate contiguous arrays (planar), so a range
//! push is one call of the updater's kernel over long slices, and a range pull is one copy (and,
//! with RDMA, one read). Sparse parts keep an open-addressing table: a key array and a record
//! array of `[value | state 0 | state 1]` per key, so one probe finds everything a push touches.
//!
//! Every operation checks all of its input before it changes anything: a refused push leaves the
//! part exactly as it was.

use std::ops::Range;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use tessera_layout::DenseLayout;
use tessera_transport::expose::DenseView;

use tessera_layout::catalog::{first_non_finite, Init, NonFinite, TableSpec};
use tessera_layout::TableKind;

use crate::arena::{Arena, Exposed, Pinned};
use crate::clock::RangeClocks;
use crate::config::{EngineConfig, PREFETCH_KEYS_AHEAD, SPARSE_LOAD_PERCENT_MAX, SPARSE_SLOTS_MIN};
use crate::error::{EngineError, Result};
use crate::updater::Updater;

/// Marks an empty sparse slot. No key equals it: keys are below a table's `end`, itself a u64.
const EMPTY: u64 = u64::MAX;

/// Counters a table part keeps for `tessera status`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PartStats {
    pub pushes: u64,
    pub pulls: u64,
    pub keys_pushed: u64,
    pub keys_pulled: u64,
    pub non_finite_skipped: u64,
    pub sparse_keys: u64,
}

/// One shard's part of one table.
#[derive(Debug)]
pub struct TablePart {
    pub id: u32,
    shard: u16,
    pub spec: TableSpec,
    owned: Range<u64>,
    updater: Arc<dyn Updater>,
    clocks: RangeClocks,
    /// Pushes applied to this part, the updater's step.
    step: u64,
    store: Store,
    stats: PartStats,
    /// Which checkpoint chunks pushes changed since the last checkpoint ([`chunks`]).
    dirty: chunks::Dirty,
    /// The checkpoint being written, if one is.
    snapshot: Option<chunks::Snapshot>,
}

/// Whether a push's values passed [`TablePart::check_push_values`] before it is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValuesChecked {
    /// Not yet: the push checks them (length, and finiteness as the table's spec says).
    Not,
    /// They did: a table that rejects non-finite values is not scanned again.
    Passed,
}

#[derive(Debug)]
enum Store {
    Dense(DenseStore),
    Sparse(SparseStore),
}

/// Dense values in blocks a transport may expose for one-sided reads (layout and protocol in
/// [`tessera_transport::expose`]); updater state stays planar, one array per slot.
#[derive(Debug)]
struct DenseStore {
    blocks: Exposed,
    layout: DenseLayout,
    s0: Pinned<f32>,
    s1: Pinned<f32>,
    /// One clock per worker: a block's stamp on its way into the block.
    stamp: Box<[u64]>,
    /// `stamp` packed as blocks hold it, exact for every block inside `packed_keys` (absolute
    /// keys of one clock segment) while the clocks are at generation `packed_generation`. Long
    /// pushes stamp many blocks of one segment; this computes their stamp once.
    packed: Box<[u64]>,
    packed_keys: Range<u64>,
    packed_generation: u64,
}

/// An open-addressing table of keys and their records.
///
/// Keys and records share one mapping: the slots' keys, then their records. A replicated
/// server's part of one range is small (16 ranges of a table of a million keys give 1 MiB of
/// keys and 1 MiB of records each), and the arena backs only mappings of 2 MiB or more with huge
/// pages: as two arrays such a part took a TLB miss on nearly every key, as one it does not.
#[derive(Debug)]
struct SparseStore {
    /// `slots` keys, then `slots * width` f32 record values (padded to whole u64s).
    memory: Pinned<u64>,
    slots: usize,
    shift: u32,
    /// f32s per record: the value and each state slot, `dim` each.
    width: usize,
    len: usize,
    limit: usize,
}

/// How many keys a sparse part makes room for, of its table's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseRoom {
    /// The table's whole capacity: a part that holds all of a table alone (tests, benchmarks).
    Whole,
    /// The capacity over the cluster's replication ranges, with slack for hashed keys falling
    /// unevenly into ranges: a server's part of one range.
    RangeShare { ranges: u32 },
}

impl SparseRoom {
    /// Keys of a table of capacity `wanted` this part makes room for.
    fn keys(self, wanted: u64) -> u64 {
        match self {
            SparseRoom::Whole => wanted.max(1),
            SparseRoom::RangeShare { ranges } => {
                // A range's count of uniformly hashed keys has a standard deviation of about
                // the square root of its share: four of them, and a little more for small ones.
                let share = wanted.div_ceil(ranges as u64).max(1);
                share.saturating_add(4 * share.isqrt() + 16)
            }
        }
    }
}

impl TablePart {
    /// Maps and initialises the part `owned` of `spec` (which the caller validated); a sparse
    /// part makes `room` for keys.
    #[allow(clippy::too_many_arguments)] // each is one fact about the part
    pub fn new(
        id: u32,
        shard: u16,
        spec: TableSpec,
        owned: Range<u64>,
        updater: Arc<dyn Updater>,
        room: SparseRoom,
        cfg: &EngineConfig,
        arena: &mut Arena,
    ) -> Result<Self> {
        assert!(spec.start <= owned.start && owned.end <= spec.end && !owned.is_empty());
        let clocks = RangeClocks::new(owned.clone(), cfg.workers_max as usize, cfg.clock_segments_max);
        let store = match spec.kind {
            TableKind::Dense => Self::dense_store(&spec, &owned, updater.as_ref(), cfg, arena)?,
            TableKind::Sparse => Store::Sparse(SparseStore::new(&spec, room, cfg, updater.as_ref(), arena)?),
        };
        let mut part =
            Self { id, shard, spec, owned, updater, clocks, step: 0, store, stats: PartStats::default(), dirty: chunks::Dirty::default(), snapshot: None };
        part.dirty = chunks::Dirty::new(part.chunks());
        Ok(part)
    }

    /// The updater this part applies pushes with.
    pub fn updater(&self) -> Arc<dyn Updater> {
        self.updater.clone()
    }

    /// Pushes applied so far: the step updaters see (Adam's bias correction counts it).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Takes the step of the part whose state a replica writes here: the head's, so that a
    /// replica that becomes head goes on counting from it.
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    fn dense_store(spec: &TableSpec, owned: &Range<u64>, updater: &dyn Updater, cfg: &EngineConfig, arena: &mut Arena) -> Result<Store> {
        let dim = spec.dim as usize;
        let keys = owned.end - owned.start;
        let too_many = || EngineError::BadTable { name: spec.name.clone(), reason: "too many keys for a dense table".into() };
        let n = usize::try_from(keys).ok().and_then(|n| n.checked_mul(dim)).ok_or_else(too_many)?;
        let layout = DenseLayout::new(owned.start, keys, spec.dim, cfg.dense_block_bytes, cfg.workers_max);
        let words = usize::try_from(layout.words()).ok().filter(|w| w.checked_mul(8).is_some()).ok_or_else(too_many)?;
        let blocks = arena.alloc_exposed(words)?;
        let slots = updater.state_slots();
        let mut state = [arena.alloc::<f32>(if slots > 0 { n } else { 0 })?, arena.alloc::<f32>(if slots > 1 { n } else { 0 })?];
        for (slot, s) in state.iter_mut().enumerate() {
            let init = updater.state_init(slot);
            if init != 0.0 {
                s.as_mut_slice().fill(init);
            }
        }
        let [s0, s1] = state;
        let mut store = DenseStore {
            blocks,
            layout,
            s0,
            s1,
            stamp: vec![0; cfg.workers_max as usize].into_boxed_slice(),
            packed: vec![0; layout.stamp_words()].into_boxed_slice(),
            packed_keys: 0..0,
            packed_generation: 0,
        };
        if let Init::Uniform { .. } = spec.init {
            for b in 0..layout.blocks() {
                let first = owned.start + layout.keys_of(b).start;
                for (i, v) in store.values_mut(b).iter_mut().enumerate() {
                    *v = init_value(&spec.init, first + (i / dim) as u64, (i % dim) as u32);
                }
            }
        }
        Ok(Store::Dense(store))
    }

    /// What a transport needs to let workers read this part directly; `None` for sparse parts.
    pub fn dense_view(&self) -> Option<DenseView> {
        match &self.store {
            Store::Dense(d) => Some(DenseView { table: self.id, layout: d.layout, memory: d.blocks.memory() }),
            Store::Sparse(_) => None,
        }
    }

    /// The keys this part owns.
    pub fn owned(&self) -> Range<u64> {
        self.owned.clone()
    }

    /// The counters.
    pub fn stats(&self) -> PartStats {
        let mut s = self.stats;
        if let Store::Sparse(sp) = &self.store {
            s.sparse_keys = sp.len as u64;
        }
        s
    }

    /// The vector clocks.
    pub fn clocks(&self) -> &RangeClocks {
        &self.clocks
    }

    /// Entries worth sending in a stamp.
    pub fn stamp_len(&self) -> usize {
        self.clocks.workers_seen()
    }

    /// Writes the stamp of `range` (which this part owns) into `out`.
    pub fn stamp_into(&self, range: Range<u64>, out: &mut [u64]) {
        if out.is_empty() {
            return;
        }
        // A push's acknowledgement asks for the stamp of what it just stamped into its blocks:
        // when that lies in the segment the blocks' stamp was computed for, it is that stamp.
        if let Store::Dense(d) = &self.store {
            if d.stamp_holds_for(&range, &self.clocks) {
                let n = out.len().min(d.stamp.len());
                out[..n].copy_from_slice(&d.stamp[..n]);
                return;
            }
        }
        self.clocks.stamp_into(range, out);
    }

    fn check_key(&self, key: u64) -> Result<()> {
        if key < self.spec.start || key >= self.spec.end {
            return Err(EngineError::KeyOutOfRange { table: self.id, key, range: self.spec.start..self.spec.end });
        }
        if !self.owned.contains(&key) {
            return Err(EngineError::KeyNotOwned { key, shard: self.shard, owned: self.owned.clone() });
        }
        Ok(())
    }

    /// Checks `keys` and returns the range they span.
    fn span_of(&self, keys: &[u64]) -> Result<Range<u64>> {
        let (mut lo, mut hi) = (u64::MAX, 0);
        for &k in keys {
            self.check_key(k)?;
            lo = lo.min(k);
            hi = hi.max(k);
        }
        Ok(lo..hi + 1)
    }

    /// Checks a range request `start .. start + count`.
    fn check_range(&self, start: u64, count: usize) -> Result<Range<u64>> {
        // Built only on failure, as in shard::part_of: an unused error still runs its drop glue.
        #[allow(clippy::unnecessary_lazy_evaluations)]
        let end = start.checked_add(count as u64).ok_or_else(|| EngineError::KeyOutOfRange {
            table: self.id,
            key: u64::MAX,
            range: self.spec.start..self.spec.end,
        })?;
        if count == 0 {
            return Err(EngineError::ValuesLength { keys: 0, dim: self.spec.dim, values: 0 });
        }
        self.check_key(start)?;
        self.check_key(end - 1)?;
        Ok(start..end)
    }

    /// Checks a dense push's values (length, finiteness) as [`push_range`](Self::push_range)
    /// would, without applying it.
    pub fn check_push_values(&self, keys: usize, values: &[f32]) -> Result<()> {
        self.check_values(keys, values).map(|_| ())
    }

    /// [`check_values`](Self::check_values), unless the values passed
    /// [`check_push_values`](Self::check_push_values) already: a table that rejects non-finite
    /// values then holds none, and they are not scanned again.
    fn recheck_values(&self, keys: usize, values: &[f32], checked: ValuesChecked) -> Result<bool> {
        if checked == ValuesChecked::Passed && self.spec.non_finite == NonFinite::Reject && keys.checked_mul(self.spec.dim as usize) == Some(values.len()) {
            debug_assert_eq!(first_non_finite(values), None, "values said to have passed the check");
            return Ok(false);
        }
        self.check_values(keys, values)
    }

    fn check_values(&self, keys: usize, values: &[f32]) -> Result<bool> {
        let dim = self.spec.dim;
        if keys.checked_mul(dim as usize) != Some(values.len()) {
            return Err(EngineError::ValuesLength { keys, dim, values: values.len() });
        }
        match first_non_finite(values) {
            None => Ok(false),
            Some(index) if self.spec.non_finite == NonFinite::Reject => Err(EngineError::NonFinite { index, value: values[index] }),
            Some(_) => Ok(true),
        }
    }

    /// Refuses sparse keys that could fill the part past its load limit (nothing for a dense part).
    pub fn check_sparse_room(&self, keys: &[u64]) -> Result<()> {
        match &self.store {
            Store::Sparse(sp) => sp.check_room(keys, self.id),
            Store::Dense(_) => Ok(()),
        }
    }

    /// Applies a sparse push from `worker` at `clock`.
    pub fn push(&mut self, keys: &[u64], grads: &[f32], worker: u32, clock: u64) -> Result<Range<u64>> {
        self.push_values(keys, grads, worker, clock, ValuesChecked::Not)
    }

    /// [`push`](Self::push) of values that passed [`check_push_values`](Self::check_push_values)
    /// (they are not scanned again).
    pub fn push_passed(&mut self, keys: &[u64], grads: &[f32], worker: u32, clock: u64) -> Result<Range<u64>> {
        self.push_values(keys, grads, worker, clock, ValuesChecked::Passed)
    }

    fn push_values(&mut self, keys: &[u64], grads: &[f32], worker: u32, clock: u64, checked: ValuesChecked) -> Result<Range<u64>> {
        let has_bad = self.recheck_values(keys.len(), grads, checked)?;
        if keys.is_empty() {
            return Err(EngineError::ValuesLength { keys: 0, dim: self.spec.dim, values: 0 });
        }
        let span = self.span_of(keys)?;
        if let Store::Sparse(sp) = &self.store {
            sp.check_room(keys, self.id)?;
        }
        self.clocks.advance(span.clone(), worker, clock)?;
        self.step += 1;
        let dim = self.spec.dim as usize;
        let mut skipped = 0;
        let per = self.chunk_slots();
        if self.snapshotting() && matches!(self.store, Store::Dense(_)) {
            self.preserve_keys(keys);
        }
        match &mut self.store {
            Store::Dense(d) => {
                let ctx = Apply { updater: self.updater.as_ref(), step: self.step, skip: has_bad };
                let blocks = d.blocks_of(span.start - self.owned.start..span.end - self.owned.start);
                blocks.clone().for_each(|b| d.open(b));
                fence(Ordering::Release);
                for (i, &k) in keys.iter().enumerate() {
                    let (v, s0, s1) = d.key_mut(k - self.owned.start);
                    skipped += ctx.run(v, s0, s1, &grads[i * dim..(i + 1) * dim]);
                    self.dirty.mark((k - self.owned.start) / per);
                }
                blocks.clone().for_each(|b| d.stamp(b, &self.clocks, self.owned.start));
                fence(Ordering::Release);
                blocks.for_each(|b| d.close(b));
            }
            Store::Sparse(sp) => {
                sp.prefetch_first(keys);
                for (i, &k) in keys.iter().enumerate() {
                    // Where a new key goes depends on the keys inserted before it.
                    if self.snapshot.is_some() {
                        self.preserve_keys(std::slice::from_ref(&k));
                    }
                    let Store::Sparse(sp) = &mut self.store else { unreachable!("matched above") };
                    sp.prefetch_ahead(keys, i);
                    let (slot, (v, s0, s1)) = sp.record_mut(k, &self.spec, self.updater.as_ref());
                    let ctx = Apply { updater: self.updater.as_ref(), step: self.step, skip: has_bad };
                    skipped += ctx.run(v, s0, s1, &grads[i * dim..(i + 1) * dim]);
                    self.dirty.mark(slot as u64 / per);
                }
            }
        }
        self.count_push(keys.len(), skipped);
        Ok(span)
    }

    /// Applies a dense push to keys `start .. start + count` from `worker` at `clock`.
    pub fn push_range(&mut self, start: u64, count: usize, grads: &[f32], worker: u32, clock: u64) -> Result<Range<u64>> {
        self.push_range_values(start, count, grads, worker, clock, ValuesChecked::Not)
    }

    /// [`push_range`](Self::push_range) of values that passed
    /// [`check_push_values`](Self::check_push_values) (they are not scanned again).
    pub fn push_range_passed(&mut self, start: u64, count: usize, grads: &[f32], worker: u32, clock: u64) -> Result<Range<u64>> {
        self.push_range_values(start, count, grads, worker, clock, ValuesChecked::Passed)
    }

    fn push_range_values(&mut self, start: u64, count: usize, grads: &[f32], worker: u32, clock: u64, checked: ValuesChecked) -> Result<Range<u64>> {
        if let Store::Sparse(_) = self.store {
            // Ranges of a sparse table are pushed key by key; they are rare and small. The
            // values are checked there, once.
            let keys: Vec<u64> = self.check_range(start, count)?.collect();
            return self.push_values(&keys, grads, worker, clock, checked);
        }
        let has_bad = self.recheck_values(count, grads, checked)?;
        let range = self.check_range(start, count)?;
        self.clocks.advance(range.clone(), worker, clock)?;
        self.step += 1;
        let dim = self.spec.dim as usize;
        let keys = start - self.owned.start..start - self.owned.start + count as u64;
        self.preserve(keys.clone());
        let ctx = Apply { updater: self.updater.as_ref(), step: self.step, skip: has_bad };
        let Store::Dense(d) = &mut self.store else { unreachable!("checked above") };
        let mut skipped = 0;
        // One block at a time, so a reader finds each block torn for as short a time as can be.
        for b in d.blocks_of(keys.clone()) {
            let held = d.layout.keys_of(b);
            let (lo, hi) = (held.start.max(keys.start), held.end.min(keys.end));
            d.open(b);
            fence(Ordering::Release);
            let (v, s0, s1) = d.span_mut(b, lo..hi);
            skipped += ctx.run(v, s0, s1, &grads[(lo - keys.start) as usize * dim..(hi - keys.start) as usize * dim]);
            d.stamp(b, &self.clocks, self.owned.start);
            fence(Ordering::Release);
            d.close(b);
        }
        self.mark_dirty(keys);
        self.count_push(count, skipped);
        Ok(range)
    }

    /// Before a push of `keys` changes them: has the running snapshot copy aside the chunks
    /// they sit in (a sparse key's slot is where it is, or where it will be inserted).
    fn preserve_keys(&mut self, keys: &[u64]) {
        for &k in keys {
            let slot = match &self.store {
                Store::Dense(_) => k - self.owned.start,
                Store::Sparse(sp) => sp.probe(k).unwrap_or_else(|empty| empty) as u64,
            };
            self.preserve(slot..slot + 1);
        }
    }

    fn count_push(&mut self, keys: usize, skipped: u64) {
        self.stats.pushes += 1;
        self.stats.keys_pushed += keys as u64;
        self.stats.non_finite_skipped += skipped;
    }

    /// Checks a sparse pull of `keys` and returns the range they span, before any reply is built.
    pub fn check_pull(&self, keys: &[u64]) -> Result<Range<u64>> {
        if keys.is_empty() {
            return Err(EngineError::ValuesLength { keys: 0, dim: self.spec.dim, values: 0 });
        }
        self.span_of(keys)
    }

    /// Gathers the values of `keys` (checked by [`TablePart::check_pull`]) into `out`.
    pub fn pull(&mut self, keys: &[u64], out: &mut [f32]) {
        let dim = self.spec.dim as usize;
        assert_eq!(out.len(), keys.len() * dim, "the reply was sized for these keys");
        match &self.store {
            Store::Dense(d) => {
                for (o, &k) in out.chunks_exact_mut(dim).zip(keys) {
                    o.copy_from_slice(d.key(k - self.owned.start));
                }
            }
            Store::Sparse(sp) => {
                sp.prefetch_first(keys);
                for (i, (o, &k)) in out.chunks_exact_mut(dim).zip(keys).enumerate() {
                    sp.prefetch_ahead(keys, i);
                    sp.read(k, &self.spec, o);
                }
            }
        }
        self.stats.pulls += 1;
        self.stats.keys_pulled += keys.len() as u64;
    }

    /// Checks a range pull before any reply is built.
    pub fn check_pull_range(&self, start: u64, count: usize) -> Result<Range<u64>> {
        self.check_range(start, count)
    }

    /// Copies keys `start .. start + count` (checked) into `out`.
    pub fn pull_range(&mut self, start: u64, count: usize, out: &mut [f32]) {
        let dim = self.spec.dim as usize;
        assert_eq!(out.len(), count * dim, "the reply was sized for this range");
        match &self.store {
            Store::Dense(d) => {
                let keys = start - self.owned.start..start - self.owned.start + count as u64;
                let mut at = 0;
                for b in d.blocks_of(keys.clone()) {
                    let held = d.layout.keys_of(b);
                    let (lo, hi) = (held.start.max(keys.start), held.end.min(keys.end));
                    let v = &d.values(b)[(lo - held.start) as usize * dim..(hi - held.start) as usize * dim];
                    out[at..at + v.len()].copy_from_slice(v);
                    at += v.len();
                }
            }
            Store::Sparse(sp) => {
                for (o, k) in out.chunks_exact_mut(dim).zip(start..) {
                    sp.read(k, &self.spec, o);
                }
            }
        }
        self.stats.pulls += 1;
        self.stats.keys_pulled += count as u64;
    }
}

impl DenseStore {
    /// The blocks holding key offsets `keys` (non-empty).
    fn blocks_of(&self, keys: Range<u64>) -> Range<u64> {
        self.layout.block_of(keys.start)..self.layout.block_of(keys.end - 1) + 1
    }

    fn value_words(&self, b: u64) -> Range<usize> {
        let at = self.layout.block_at(b) + self.layout.values_at();
        at..at + self.layout.block_words as usize - self.layout.values_at() - 1
    }

    /// The values of the keys block `b` holds.
    fn values(&self, b: u64) -> &[f32] {
        let n = self.layout.keys_of(b).count() * self.layout.dim as usize;
        &bytemuck::cast_slice(&self.blocks.words()[self.value_words(b)])[..n]
    }

    fn values_mut(&mut self, b: u64) -> &mut [f32] {
        let n = self.layout.keys_of(b).count() * self.layout.dim as usize;
        let words = self.value_words(b);
        &mut bytemuck::cast_slice_mut(&mut self.blocks.words_mut()[words])[..n]
    }

    /// Key offset `k`'s values.
    fn key(&self, k: u64) -> &[f32] {
        let b = self.layout.block_of(k);
        let dim = self.layout.dim as usize;
        let at = (k - self.layout.keys_of(b).start) as usize * dim;
        &self.values(b)[at..at + dim]
    }

    /// Key offset `k`'s values and state.
    fn key_mut(&mut self, k: u64) -> (&mut [f32], &mut [f32], &mut [f32]) {
        self.span_mut(self.layout.block_of(k), k..k + 1)
    }

    /// Values and state of key offsets `keys`, all inside block `b`.
    fn span_mut(&mut self, b: u64, keys: Range<u64>) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let dim = self.layout.dim as usize;
        let first = self.layout.keys_of(b).start;
        let local = (keys.start - first) as usize * dim..(keys.end - first) as usize * dim;
        let planar = keys.start as usize * dim..keys.end as usize * dim;
        let words = self.value_words(b);
        let v: &mut [f32] = bytemuck::cast_slice_mut(&mut self.blocks.words_mut()[words]);
        (&mut v[local], slot_slice(&mut self.s0, planar.clone()), slot_slice(&mut self.s1, planar))
    }

    /// Marks block `b` as changing: its back version moves ahead of its front. The caller fences
    /// (release) before it writes the block.
    fn open(&mut self, b: u64) {
        let at = self.layout.block_at(b);
        let back = at + self.layout.block_words as usize - 1;
        let w = self.blocks.words_mut();
        w[back] = w[at] + 1;
    }

    /// Whether `stamp` (and `packed`) is the stamp of `keys` (absolute) as `clocks` stand now:
    /// computed at their current generation, for a segment that holds all of `keys`.
    fn stamp_holds_for(&self, keys: &Range<u64>, clocks: &RangeClocks) -> bool {
        self.packed_generation == clocks.generation() && self.packed_keys.start <= keys.start && keys.end <= self.packed_keys.end
    }

    /// Writes block `b`'s stamp: the clocks every key it holds has reached.
    fn stamp(&mut self, b: u64, clocks: &RangeClocks, owned_start: u64) {
        let held = self.layout.keys_of(b);
        let held = owned_start + held.start..owned_start + held.end;
        if !self.stamp_holds_for(&held, clocks) {
            self.packed_keys = clocks.segment_stamp(held, &mut self.stamp);
            DenseLayout::put_stamp(&self.stamp, &mut self.packed);
            self.packed_generation = clocks.generation();
        }
        let at = self.layout.block_at(b) + 1;
        self.blocks.words_mut()[at..at + self.packed.len()].copy_from_slice(&self.packed);
    }

    /// Ends block `b`'s change: the front version catches up. The caller fences (release) after
    /// its writes to the block and before this.
    fn close(&mut self, b: u64) {
        let at = self.layout.block_at(b);
        let back = at + self.layout.block_words as usize - 1;
        let w = self.blocks.words_mut();
        w[at] = w[back];
    }
}

fn slot_slice(slot: &mut Pinned<f32>, at: Range<usize>) -> &mut [f32] {
    let s = slot.as_mut_slice();
    if s.is_empty() {
        s
    } else {
        &mut s[at]
    }
}

/// One key's value and updater state slots, as a push changes them.
type Record<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [f32]);

/// How one push applies its gradient.
struct Apply<'a> {
    updater: &'a dyn Updater,
    step: u64,
    /// The gradient has non-finite components and the table skips them.
    skip: bool,
}

impl Apply<'_> {
    /// Runs the updater over one contiguous stretch; returns the components skipped.
    fn run(&self, v: &mut [f32], s0: &mut [f32], s1: &mut [f32], g: &[f32]) -> u64 {
        if !self.skip {
            self.updater.update(v, s0, s1, g, self.step);
            return 0;
        }
        // Rare path: apply each run of finite components on its own, so the skipped ones keep
        // their value and state exactly.
        let mut skipped = 0;
        let mut i = 0;
        while i < g.len() {
            if !g[i].is_finite() {
                skipped += 1;
                i += 1;
                continue;
            }
            let end = g[i..].iter().position(|x| !x.is_finite()).map_or(g.len(), |p| i + p);
            let part = |s: &mut [f32]| if s.is_empty() { 0..0 } else { i..end };
            let (r0, r1) = (part(s0), part(s1));
            self.updater.update(&mut v[i..end], &mut s0[r0], &mut s1[r1], &g[i..end], self.step);
            i = end;
        }
        skipped
    }
}

impl SparseStore {
    fn new(spec: &TableSpec, room: SparseRoom, cfg: &EngineConfig, updater: &dyn Updater, arena: &mut Arena) -> Result<Self> {
        let wanted = if spec.capacity > 0 { spec.capacity } else { cfg.sparse_capacity_keys_default };
        let per_part = room.keys(wanted);
        let too_big = || EngineError::BadTable { name: spec.name.clone(), reason: format!("capacity {wanted} is too large") };
        let slots = per_part.checked_mul(100).and_then(|n| (n / SPARSE_LOAD_PERCENT_MAX + 1).checked_next_power_of_two()).ok_or_else(too_big)?;
        let slots = usize::try_from(slots.max(SPARSE_SLOTS_MIN)).map_err(|_| too_big())?;
        let rec = spec.dim as usize * (1 + updater.state_slots());
        let words = slots.checked_mul(rec).map(|n| n.div_ceil(2)).and_then(|r| r.checked_add(slots)).ok_or_else(too_big)?;
        let memory = arena.alloc::<u64>(words)?;
        let limit = slots * SPARSE_LOAD_PERCENT_MAX as usize / 100;
        let mut store = Self { memory, slots, shift: 64 - slots.trailing_zeros(), width: rec, len: 0, limit };
        store.keys_mut().fill(EMPTY);
        Ok(store)
    }

    /// The slots' keys ([`EMPTY`] where none is).
    fn keys(&self) -> &[u64] {
        &self.memory.as_slice()[..self.slots]
    }

    fn keys_mut(&mut self) -> &mut [u64] {
        &mut self.memory.as_mut_slice()[..self.slots]
    }

    /// The slots' records, `width` values each.
    fn records(&self) -> &[f32] {
        &bytemuck::cast_slice(&self.memory.as_slice()[self.slots..])[..self.slots * self.width]
    }

    fn records_mut(&mut self) -> &mut [f32] {
        let len = self.slots * self.width;
        &mut bytemuck::cast_slice_mut(&mut self.memory.as_mut_slice()[self.slots..])[..len]
    }

    fn home(&self, key: u64) -> usize {
        // Fibonacci hashing: spreads sequential keys as well as hashed ones.
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// Asks the CPU to bring `key`'s home slot, its key and its record, into the cache. Loops
    /// over a request's keys call it [`PREFETCH_KEYS_AHEAD`] keys ahead, so that the cache
    /// misses of a table larger than the cache overlap instead of coming one after another.
    fn prefetch(&self, key: u64) {
        let home = self.home(key);
        self.memory.prefetch(home);
        self.memory.prefetch(self.slots + home * self.width / 2);
    }

    /// Prefetches the first [`PREFETCH_KEYS_AHEAD`] of `keys`, which no key before them does:
    /// a replicated push or pull reaches a part in pieces of a few dozen keys, one per range,
    /// and without this each piece began with that many misses one after another.
    fn prefetch_first(&self, keys: &[u64]) {
        keys.iter().take(PREFETCH_KEYS_AHEAD).for_each(|k| self.prefetch(*k));
    }

    /// Prefetches ([`prefetch`](Self::prefetch)) the key [`PREFETCH_KEYS_AHEAD`] places after
    /// place `i` of `keys`, if there is one.
    fn prefetch_ahead(&self, keys: &[u64], i: usize) {
        if let Some(&ahead) = keys.get(i + PREFETCH_KEYS_AHEAD) {
            self.prefetch(ahead);
        }
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn probe(&self, key: u64) -> std::result::Result<usize, usize> {
        let keys = self.keys();
        let mask = keys.len() - 1;
        let mut i = self.home(key);
        loop {
            match keys[i] {
                k if k == key => return Ok(i),
                EMPTY => return Err(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Refuses a push that could fill the table past its load limit, before anything changes.
    fn check_room(&self, keys: &[u64], table: u32) -> Result<()> {
        if self.len + keys.len() <= self.limit {
            return Ok(());
        }
        // Near the limit only: count each new key once, however often the push repeats it.
        let new: std::collections::HashSet<u64> = keys.iter().copied().filter(|k| self.probe(*k).is_err()).collect();
        let new = new.len();
        if self.len + new > self.limit {
            return Err(EngineError::SparseTableFull { table, capacity: self.limit });
        }
        Ok(())
    }

    /// The record of `key`, inserted with its initial value if new.
    fn record_mut(&mut self, key: u64, spec: &TableSpec, updater: &dyn Updater) -> (usize, Record<'_>) {
        let dim = spec.dim as usize;
        let width = self.width;
        let slot = match self.probe(key) {
            Ok(slot) => slot,
            Err(slot) => {
                assert!(self.len < self.limit, "check_room ran before this insert");
                self.keys_mut()[slot] = key;
                self.len += 1;
                init_record(spec, updater, key, &mut self.records_mut()[slot * width..(slot + 1) * width]);
                slot
            }
        };
        let rec = &mut self.records_mut()[slot * width..(slot + 1) * width];
        let (v, state) = rec.split_at_mut(dim);
        let (s0, s1) = if state.len() >= 2 * dim { state.split_at_mut(dim) } else { (state, &mut [][..]) };
        (slot, (v, s0, s1))
    }

    /// Reads `key`'s value, or its initial value if it was never pushed.
    fn read(&self, key: u64, spec: &TableSpec, out: &mut [f32]) {
        match self.probe(key) {
            Ok(slot) => {
                let width = self.width;
                out.copy_from_slice(&self.records()[slot * width..slot * width + out.len()]);
            }
            Err(_) => {
                for (c, v) in out.iter_mut().enumerate() {
                    *v = init_value(&spec.init, key, c as u32);
                }
            }
        }
    }
}

/// Writes `key`'s record as it is before any push: its initial value, then each updater state
/// slot at the updater's initial state.
fn init_record(spec: &TableSpec, updater: &dyn Updater, key: u64, rec: &mut [f32]) {
    let dim = spec.dim as usize;
    for (c, v) in rec[..dim].iter_mut().enumerate() {
        *v = init_value(&spec.init, key, c as u32);
    }
    for (i, s) in rec[dim..].chunks_exact_mut(dim).enumerate() {
        s.fill(updater.state_init(i));
    }
}

/// The initial value of component `c` of `key`: a pure function, so pulls of untouched keys need
/// no storage and every server agrees.
pub fn init_value(init: &Init, key: u64, c: u32) -> f32 {
    match *init {
        Init::Zero => 0.0,
        Init::Uniform { scale, seed } => {
            let bits = splitmix64(seed ^ splitmix64(key) ^ (c as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            let unit = (bits >> 40) as f32 / (1u64 << 24) as f32;
            scale * (2.0 * unit - 1.0)
        }
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

mod chunks;

#[cfg(test)]
mod tests;
