//! A table part's state as checkpoint chunks ([`crate::persist::checkpoint`] has the on-disk format), and
//! which chunks pushes changed since the last checkpoint.
//!
//! Chunks cut the part by slot: a dense part's keys (offsets from its start), a sparse part's
//! open-addressing slots. A dense chunk's payload is its keys' values, then each optimiser state
//! slot for the same keys; a sparse chunk's is its slots' keys (u64), then their records. Every
//! value is little-endian, as in memory.

use std::collections::HashMap;
use std::ops::Range;

use crate::config::CHECKPOINT_CHUNK_BYTES;
use crate::error::{EngineError, Result};

use super::{Store, TablePart, EMPTY};

impl TablePart {
    /// Bytes one slot takes in a chunk.
    fn slot_bytes(&self) -> usize {
        match &self.store {
            Store::Dense(_) => 4 * self.spec.dim as usize * (1 + self.updater.state_slots()),
            Store::Sparse(sp) => 8 + 4 * sp.width,
        }
    }

    /// Slots in the part: keys of a dense part, table slots of a sparse one.
    fn slots(&self) -> u64 {
        match &self.store {
            Store::Dense(_) => self.owned.end - self.owned.start,
            Store::Sparse(sp) => sp.keys().len() as u64,
        }
    }

    /// Slots per chunk (the last chunk may hold fewer).
    pub fn chunk_slots(&self) -> u64 {
        (CHECKPOINT_CHUNK_BYTES / self.slot_bytes()).max(1) as u64
    }

    /// Chunks in the part.
    pub fn chunks(&self) -> u64 {
        self.slots().div_ceil(self.chunk_slots())
    }

    /// The slots chunk `c` holds.
    pub fn chunk_range(&self, c: u64) -> Range<u64> {
        let per = self.chunk_slots();
        c * per..((c + 1) * per).min(self.slots())
    }

    /// Bytes of chunk `c`'s payload.
    pub fn chunk_payload_len(&self, c: u64) -> usize {
        self.chunk_range(c).count() * self.slot_bytes()
    }

    /// Copies chunk `c`'s state into the start of `out` (at least
    /// [`chunk_payload_len`](Self::chunk_payload_len) bytes); returns the bytes written.
    pub fn save_chunk(&self, c: u64, out: &mut [u8]) -> usize {
        let slots = self.chunk_range(c);
        let len = self.chunk_payload_len(c);
        let mut w = Writer { out: &mut out[..len], at: 0 };
        match &self.store {
            Store::Dense(_) => self.save_dense(slots, &mut w),
            Store::Sparse(sp) => {
                w.put(&sp.keys()[slots.start as usize..slots.end as usize]);
                w.put(&sp.records()[slots.start as usize * sp.width..slots.end as usize * sp.width]);
            }
        }
        assert_eq!(w.at, len, "a chunk's payload is exactly its slots' state");
        len
    }

    /// Puts chunk `c`'s state back from `payload`, as [`save_chunk`](Self::save_chunk) wrote it.
    /// Call [`finish_load`](Self::finish_load) once every chunk is in. A payload of the wrong
    /// length is refused before anything changes.
    pub fn load_chunk(&mut self, c: u64, payload: &[u8]) -> Result<()> {
        let want = self.chunk_payload_len(c);
        if c >= self.chunks() || payload.len() != want {
            return Err(EngineError::Corrupt {
                what: format!("table {} chunk {c}", self.id),
                reason: format!("{} payload bytes where this part's chunk holds {want}", payload.len()),
            });
        }
        let slots = self.chunk_range(c);
        let mut r = Reader { bytes: payload, at: 0 };
        match &mut self.store {
            Store::Dense(_) => self.load_dense(slots, &mut r, false),
            Store::Sparse(sp) => {
                r.take(&mut sp.keys_mut()[slots.start as usize..slots.end as usize]);
                let width = sp.width;
                r.take(&mut sp.records_mut()[slots.start as usize * width..slots.end as usize * width]);
            }
        }
        Ok(())
    }

    /// A dense part's state of absolute keys `keys` (inside the part), appended to `out`: the
    /// keys' values, then each updater state slot, as a checkpoint chunk lays them out.
    /// Replication sends it down a chain. `None` for a sparse part.
    pub fn export_keys(&self, keys: Range<u64>, out: &mut Vec<u8>) -> Option<()> {
        let Store::Dense(_) = self.store else { return None };
        assert!(self.owned.start <= keys.start && keys.end <= self.owned.end && !keys.is_empty(), "keys {keys:?} of part {:?}", self.owned);
        let slots = keys.start - self.owned.start..keys.end - self.owned.start;
        // Appended as read, not zeroed first: on a chain's head this runs over every key each
        // update carries, and a fill beforehand would be one more pass over them.
        out.reserve(slots.clone().count() * self.slot_bytes());
        self.save_dense(slots, out);
        Some(())
    }

    /// Bytes [`export_keys`](Self::export_keys) or [`export_listed`](Self::export_listed) write
    /// for `keys` keys: each key's value and updater state.
    pub fn exported_len(&self, keys: u64) -> usize {
        keys as usize * 4 * self.spec.dim as usize * (1 + self.updater.state_slots())
    }

    /// The keys a sparse part holds among absolute keys `keys`, in order (none for a dense part).
    pub fn held_keys(&self, keys: Range<u64>) -> Vec<u64> {
        let Store::Sparse(sp) = &self.store else { return Vec::new() };
        let mut held: Vec<u64> = sp.keys().iter().copied().filter(|k| *k != EMPTY && keys.contains(k)).collect();
        held.sort_unstable();
        held
    }

    /// A sparse part's state of `keys`, appended to `out`: each key's record (its value, then
    /// each updater state slot), as pushes left it, or as it starts for a key never pushed.
    /// Replication sends it down a chain. `None` for a dense part.
    pub fn export_listed(&self, keys: &[u64], out: &mut Vec<u8>) -> Option<()> {
        let Store::Sparse(sp) = &self.store else { return None };
        // A key the part never held is exported as it starts (made only when one is asked for).
        let mut fresh = Vec::new();
        for (i, &k) in keys.iter().enumerate() {
            sp.prefetch_ahead(keys, i);
            let rec = match sp.probe(k) {
                Ok(slot) => &sp.records()[slot * sp.width..(slot + 1) * sp.width],
                Err(_) => {
                    fresh.resize(sp.width, 0f32);
                    super::init_record(&self.spec, self.updater.as_ref(), k, &mut fresh);
                    &fresh[..]
                }
            };
            out.put(rec);
        }
        Some(())
    }

    /// Puts back what [`export_listed`](Self::export_listed) wrote for `keys`, inserting the
    /// keys the part does not hold yet. Refuses, changing nothing, a dense part, keys outside
    /// the part, the wrong length, or more new keys than the part has room for.
    pub fn import_listed(&mut self, keys: &[u64], bytes: &[u8]) -> Result<()> {
        let want = self.exported_len(keys.len() as u64);
        let outside = keys.iter().find(|k| !self.owned.contains(k));
        let corrupt = |reason: String| EngineError::Corrupt { what: format!("table {} ({} keys)", self.id, keys.len()), reason };
        let Store::Sparse(sp) = &self.store else { return Err(corrupt(format!("{} is dense", self.spec.name))) };
        if let Some(k) = outside {
            return Err(corrupt(format!("key {k} outside the part {:?}", self.owned)));
        }
        if bytes.len() != want {
            return Err(corrupt(format!("{} bytes of records (want {want})", bytes.len())));
        }
        sp.check_room(keys, self.id)?;
        let per = self.chunk_slots();
        for (i, (&k, rec)) in keys.iter().zip(bytes.chunks_exact(self.exported_len(1))).enumerate() {
            if self.snapshot.is_some() {
                self.preserve_keys(std::slice::from_ref(&k));
            }
            let Store::Sparse(sp) = &mut self.store else { unreachable!("checked above") };
            sp.prefetch_ahead(keys, i);
            let (slot, _) = sp.record_mut(k, &self.spec, self.updater.as_ref());
            let width = sp.width;
            let to = &mut sp.records_mut()[slot * width..(slot + 1) * width];
            to.iter_mut().zip(rec.chunks_exact(4)).for_each(|(v, b)| *v = f32::from_le_bytes(b.try_into().expect("4 bytes")));
            self.dirty.mark(slot as u64 / per);
        }
        Ok(())
    }

    /// Sets every key a sparse part holds among absolute keys `keys` back to its record before
    /// any push: a replica taking a range whole forgets what it held of it. The keys stay in the
    /// part (a pull reads the same either way). Does nothing to a dense part.
    pub fn reset_keys(&mut self, keys: Range<u64>) {
        let held = self.held_keys(keys);
        let per = self.chunk_slots();
        for k in held {
            if self.snapshot.is_some() {
                self.preserve_keys(std::slice::from_ref(&k));
            }
            let Store::Sparse(sp) = &mut self.store else { unreachable!("only a sparse part holds keys") };
            let slot = sp.probe(k).expect("a held key");
            let width = sp.width;
            super::init_record(&self.spec, self.updater.as_ref(), k, &mut sp.records_mut()[slot * width..(slot + 1) * width]);
            self.dirty.mark(slot as u64 / per);
        }
    }

    /// Puts back what [`export_keys`](Self::export_keys) wrote for `keys`, restamping each block
    /// from the part's clocks as it goes (a reader sees each block whole, old or new). Refuses,
    /// changing nothing, keys outside the part, a sparse part, or the wrong length.
    pub fn import_keys(&mut self, keys: Range<u64>, bytes: &[u8]) -> Result<()> {
        let inside = self.owned.start <= keys.start && keys.end <= self.owned.end && !keys.is_empty();
        let want = self.exported_len(keys.end.saturating_sub(keys.start));
        if !inside || !matches!(self.store, Store::Dense(_)) || bytes.len() != want {
            return Err(EngineError::Corrupt {
                what: format!("table {} keys {keys:?}", self.id),
                reason: format!("{} bytes for a {} part over {:?} (want {want})", bytes.len(), self.spec.name, self.owned),
            });
        }
        let slots = keys.start - self.owned.start..keys.end - self.owned.start;
        self.preserve(slots.clone());
        self.load_dense(slots.clone(), &mut Reader { bytes, at: 0 }, true);
        self.mark_dirty(slots);
        Ok(())
    }

    /// Raises worker `worker`'s clock to `clock` over absolute keys `keys` (as a push does),
    /// without touching values: a replica applying its predecessor's update.
    pub fn advance_clock(&mut self, keys: Range<u64>, worker: u32, clock: u64) -> Result<()> {
        self.clocks.advance(keys, worker, clock)
    }

    /// A dense part's values and state of slots (key offsets) `slots`.
    fn save_dense(&self, slots: Range<u64>, w: &mut impl Put) {
        let Store::Dense(d) = &self.store else { unreachable!("a dense part") };
        let dim = self.spec.dim as usize;
        for b in d.blocks_of(slots.clone()) {
            let held = d.layout.keys_of(b);
            let (lo, hi) = (held.start.max(slots.start), held.end.min(slots.end));
            w.put(&d.values(b)[(lo - held.start) as usize * dim..(hi - held.start) as usize * dim]);
        }
        let planar = slots.start as usize * dim..slots.end as usize * dim;
        for s in [&d.s0, &d.s1].into_iter().take(self.updater.state_slots()) {
            w.put(&s.as_slice()[planar.clone()]);
        }
    }

    /// Puts back what [`save_dense`](Self::save_dense) wrote for `slots`; with `stamp`, writes
    /// each block's stamp from the clocks too (a load stamps every block once, at its end).
    fn load_dense(&mut self, slots: Range<u64>, r: &mut Reader<'_>, stamp: bool) {
        let state_slots = self.updater.state_slots();
        let (clocks, owned_start) = (&self.clocks, self.owned.start);
        let Store::Dense(d) = &mut self.store else { unreachable!("a dense part") };
        let dim = self.spec.dim as usize;
        for b in d.blocks_of(slots.clone()) {
            let held = d.layout.keys_of(b);
            let (lo, hi) = (held.start.max(slots.start), held.end.min(slots.end));
            d.open(b);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            r.take(&mut d.values_mut(b)[(lo - held.start) as usize * dim..(hi - held.start) as usize * dim]);
            if stamp {
                d.stamp(b, clocks, owned_start);
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            d.close(b);
        }
        let planar = slots.start as usize * dim..slots.end as usize * dim;
        for s in [&mut d.s0, &mut d.s1].into_iter().take(state_slots) {
            r.take(&mut s.as_mut_slice()[planar.clone()]);
        }
    }

    /// Ends a load: sets the updater's step and the vector clocks to `segments` (as a manifest
    /// lists them), writes every dense block's stamp, and recounts a sparse part's keys. Refuses
    /// clocks or keys that cannot be this part's.
    pub fn finish_load(&mut self, step: u64, segments: &[(u64, Vec<u64>)]) -> Result<()> {
        self.clocks.restore(segments)?;
        self.step = step;
        let owned_start = self.owned.start;
        match &mut self.store {
            Store::Dense(d) => {
                for b in 0..d.layout.blocks() {
                    d.open(b);
                    d.stamp(b, &self.clocks, owned_start);
                    d.close(b);
                }
            }
            Store::Sparse(sp) => {
                let misplaced = sp.keys().iter().enumerate().find(|(i, k)| **k != EMPTY && sp.probe(**k) != Ok(*i));
                if let Some((slot, key)) = misplaced {
                    return Err(EngineError::Corrupt {
                        what: format!("table {}", self.id),
                        reason: format!("key {key} sits in slot {slot}, where a lookup would not find it"),
                    });
                }
                let len = sp.keys().iter().filter(|k| **k != EMPTY).count();
                if len > sp.limit {
                    return Err(EngineError::Corrupt {
                        what: format!("table {}", self.id),
                        reason: format!("{len} keys loaded, over the part's limit of {}", sp.limit),
                    });
                }
                sp.len = len;
            }
        }
        self.clear_dirty();
        Ok(())
    }

    /// Chunks changed since [`clear_dirty`](Self::clear_dirty), in order.
    pub fn dirty_chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.dirty.0.iter().enumerate().flat_map(|(i, word)| (0..64).filter(move |bit| word & (1 << bit) != 0).map(move |bit| i as u64 * 64 + bit))
    }

    /// Forgets which chunks changed (a checkpoint took them).
    pub fn clear_dirty(&mut self) {
        self.dirty.0.fill(0);
    }

    /// Counts every chunk as changed (the first checkpoint writes them all).
    pub fn mark_all_dirty(&mut self) {
        (0..self.chunks()).for_each(|c| self.dirty.mark(c));
    }

    /// Starts a snapshot of the chunks changed since the last checkpoint, as they are now, and
    /// returns them in order. Pushes go on meanwhile: the first push to change a chunk the
    /// snapshot has not taken yet copies it aside first ([`preserve`](Self::preserve)), so
    /// [`take_chunk`](Self::take_chunk) always gives the chunk as it was here. The changed set
    /// starts again from empty.
    pub fn begin_snapshot(&mut self) -> Vec<u64> {
        debug_assert!(self.snapshot.is_none(), "one snapshot at a time");
        let chunks: Vec<u64> = self.dirty_chunks().collect();
        let fresh = Dirty::new(self.chunks());
        let taken = std::mem::replace(&mut self.dirty, fresh);
        self.snapshot = Some(Snapshot { pending: Dirty(taken.0.clone()), taken, copies: HashMap::new(), copied: 0 });
        chunks
    }

    /// Copies chunk `c`, as the running snapshot sees it, into the start of `out` (see
    /// [`save_chunk`](Self::save_chunk)); returns the bytes written. Each chunk is taken once.
    pub fn take_chunk(&mut self, c: u64, out: &mut [u8]) -> usize {
        let snap = self.snapshot.as_mut().expect("a snapshot is running");
        if let Some(copy) = snap.copies.remove(&c) {
            out[..copy.len()].copy_from_slice(&copy);
            return copy.len();
        }
        assert!(snap.pending.clear(c), "chunk {c} is in the snapshot and not taken yet");
        self.save_chunk(c, out)
    }

    /// Ends the running snapshot. One that was not written (`written` false) counts its chunks
    /// as changed again, so the next checkpoint takes them.
    pub fn end_snapshot(&mut self, written: bool) {
        let Some(snap) = self.snapshot.take() else { return };
        if !written {
            self.dirty.0.iter_mut().zip(snap.taken.0.iter()).for_each(|(d, t)| *d |= t);
        }
    }

    /// True while a snapshot runs.
    pub fn snapshotting(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Chunks the running snapshot copied aside because a push was about to change them.
    pub fn snapshot_copies(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.copied)
    }

    /// Before slots `slots` change: copies aside each of their chunks that the running snapshot
    /// has yet to take. Cheap when no snapshot runs.
    pub(super) fn preserve(&mut self, slots: Range<u64>) {
        if self.snapshot.is_none() || slots.is_empty() {
            return;
        }
        let per = self.chunk_slots();
        for c in slots.start / per..=(slots.end - 1) / per {
            let snap = self.snapshot.as_mut().expect("checked above");
            if snap.pending.clear(c) {
                let mut copy = vec![0u8; self.chunk_payload_len(c)].into_boxed_slice();
                self.save_chunk(c, &mut copy);
                let snap = self.snapshot.as_mut().expect("checked above");
                snap.copies.insert(c, copy);
                snap.copied += 1;
            }
        }
    }

    /// Marks the chunks holding slots `slots` as changed.
    pub(super) fn mark_dirty(&mut self, slots: Range<u64>) {
        if slots.is_empty() {
            return;
        }
        let per = self.chunk_slots();
        (slots.start / per..=(slots.end - 1) / per).for_each(|c| self.dirty.mark(c));
    }
}

/// One bit per checkpoint chunk: set when a push changes the chunk. Sized when the part is made.
#[derive(Debug, Default)]
pub(super) struct Dirty(Box<[u64]>);

impl Dirty {
    pub(super) fn new(chunks: u64) -> Self {
        Self(vec![0; chunks.div_ceil(64) as usize].into_boxed_slice())
    }

    pub(super) fn mark(&mut self, chunk: u64) {
        self.0[(chunk / 64) as usize] |= 1 << (chunk % 64);
    }

    /// Clears `chunk`'s bit; true if it was set.
    fn clear(&mut self, chunk: u64) -> bool {
        let (word, bit) = (&mut self.0[(chunk / 64) as usize], 1 << (chunk % 64));
        let was = *word & bit != 0;
        *word &= !bit;
        was
    }
}

/// A checkpoint's snapshot of a part, while it is being written (copy on write).
#[derive(Debug)]
pub(super) struct Snapshot {
    /// The chunks it holds, and those of them not taken yet and not copied aside.
    taken: Dirty,
    pending: Dirty,
    /// Chunks a push was about to change before they were taken, as they were. Each is made by
    /// the first push to a chunk during a checkpoint, so a checkpoint copies each chunk at most
    /// once, whatever the pushes do.
    copies: HashMap<u64, Box<[u8]>>,
    copied: u64,
}

/// Writes plain values into a byte slice, in order.
struct Writer<'a> {
    out: &'a mut [u8],
    at: usize,
}

/// Where saved values go, in order: a [`Writer`]'s slice, or the end of a vector.
trait Put {
    fn put<T: bytemuck::Pod>(&mut self, values: &[T]);
}

impl Put for Writer<'_> {
    fn put<T: bytemuck::Pod>(&mut self, values: &[T]) {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        self.out[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
}

impl Put for Vec<u8> {
    fn put<T: bytemuck::Pod>(&mut self, values: &[T]) {
        self.extend_from_slice(bytemuck::cast_slice(values));
    }
}

/// Takes plain values from a byte buffer (of any alignment).
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<T: bytemuck::Pod>(&mut self, into: &mut [T]) {
        let dst: &mut [u8] = bytemuck::cast_slice_mut(into);
        dst.copy_from_slice(&self.bytes[self.at..self.at + dst.len()]);
        self.at += dst.len();
    }
}
