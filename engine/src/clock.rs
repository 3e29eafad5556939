//! Vector clocks over key ranges, as in Li et al., "Scaling Distributed Machine Learning with the
//! Parameter Server" (OSDI'14, section 4.1, "Vector Clock").
//!
//! Every key of a table partition carries a vector clock with one entry per worker: entry `w` is
//! the highest clock at which worker `w` has pushed that key. Keeping a clock per key would cost
//! `keys x workers` entries, but workers push ranges, not scattered keys, so long runs of keys
//! share one clock. [`RangeClocks`] stores one clock per run (a *segment*): a push that covers only
//! part of a segment splits it at the push's ends, and neighbours merge back as soon as their
//! clocks are equal — typically once every worker has pushed the whole partition for an iteration.
//!
//! The shard calls [`RangeClocks::advance`] on every push and [`RangeClocks::stamp_into`] on every
//! pull, so both run without allocating: storage for `segments_max` segments is sized once in
//! [`RangeClocks::new`], a split shifts the flat arrays in place, and the segment search is a
//! binary search over the sorted segment starts.

use std::fmt;
use std::ops::Range;

use crate::config::CLOCK_MAX;
use crate::error::{EngineError, Result};

/// Vector clocks over the key ranges of one table partition `[start, end)` on one shard.
///
/// Segments are contiguous, sorted, non-overlapping and cover `[start, end)` exactly; adjacent
/// segments always have different clocks (they are merged when equal), so the segment count is the
/// minimum that represents the per-key clocks.
#[derive(Clone)]
pub struct RangeClocks {
    owned: Range<u64>,
    workers_max: usize,
    segments_max: usize,
    /// Start key of each segment, strictly increasing; only `[..count]` is live. Segment `k` ends
    /// where segment `k + 1` starts, and the last one at `owned.end`, so ends need no storage of
    /// their own.
    starts: Box<[u64]>,
    /// Segment `k`'s clock is `clocks[k * workers_max..(k + 1) * workers_max]`; only the first
    /// `count` segments are live. A boxed slice rather than a `Vec` so that nothing can grow it by
    /// accident.
    clocks: Box<[u64]>,
    count: usize,
    workers_seen: usize,
    /// Bumped by every `advance` that raises an entry (and by `restore`), so a cache of stamps
    /// knows when it is stale. A push at a clock its worker already reached changes nothing, and
    /// leaves the generation, and so every cached stamp, as it was.
    generation: u64,
}

/// One validated `advance`, with everything needed both to predict its outcome and to apply it.
struct Push {
    range: Range<u64>,
    worker: usize,
    clock: u64,
    /// Segments containing `range.start` and `range.end - 1`.
    first: usize,
    last: usize,
    /// Whether `first` (`last`) must be cut at `range.start` (`range.end`): it extends past the
    /// range and the push raises it. A segment the push does not raise stays whole.
    split_left: bool,
    split_right: bool,
}

impl Push {
    fn splits(&self) -> usize {
        usize::from(self.split_left) + usize::from(self.split_right)
    }

    /// The segments whose adjacent pairs may become equal: the raised ones, plus each neighbour
    /// that touches a raised one directly. A split-off remainder keeps its old clock, which already
    /// differs from its outer neighbour and from the raised part, so it is left out.
    fn window(&self, count: usize) -> (usize, usize) {
        let lo = if self.split_left || self.first == 0 { self.first } else { self.first - 1 };
        let hi = if self.split_right || self.last + 1 == count { self.last } else { self.last + 1 };
        (lo, hi)
    }

    /// Whether segment `k`'s entry for the pushing worker is raised by this push.
    fn raises(&self, k: usize) -> bool {
        (self.first..=self.last).contains(&k)
    }
}

impl RangeClocks {
    /// Clocks for the partition `owned`, all starting at 0, with `workers_max` entries per clock
    /// and at most `segments_max` segments. All storage is allocated here.
    ///
    /// # Panics
    /// If `owned` is empty, `segments_max` is 0, or `segments_max * workers_max` overflows: these
    /// come from validated configuration, so any of them is a bug in the caller.
    pub fn new(owned: Range<u64>, workers_max: usize, segments_max: usize) -> Self {
        assert!(owned.start < owned.end, "RangeClocks::new: the owned range {owned:?} is empty");
        assert!(segments_max >= 1, "RangeClocks::new: segments_max must be at least 1");
        let entries = segments_max.checked_mul(workers_max).expect("RangeClocks::new: segments_max * workers_max overflows usize");
        let mut starts = vec![0; segments_max].into_boxed_slice();
        starts[0] = owned.start;
        Self { owned, workers_max, segments_max, starts, clocks: vec![0; entries].into_boxed_slice(), count: 1, workers_seen: 0, generation: 0 }
    }

    /// Changes with every [`advance`](Self::advance) that raises a clock entry: a stamp computed
    /// at one generation holds until the generation changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Replaces every clock with `segments`: each segment's first key and clock, in key order,
    /// as [`segments`](Self::segments) listed them when a checkpoint was taken. Checks them first:
    /// a refused call changes nothing.
    ///
    /// # Errors
    /// [`EngineError::Corrupt`] if the segments do not tile [`owned`](Self::owned) from its start in
    /// increasing order, exceed `segments_max`, have clocks of the wrong width or over
    /// [`CLOCK_MAX`], or repeat a neighbour's clock.
    pub fn restore(&mut self, segments: &[(u64, Vec<u64>)]) -> Result<()> {
        let bad = |reason: String| Err(EngineError::Corrupt { what: format!("clocks of {:?}", self.owned), reason });
        if segments.is_empty() || segments.len() > self.segments_max {
            return bad(format!("{} segments, where 1 to {} fit", segments.len(), self.segments_max));
        }
        if segments[0].0 != self.owned.start {
            return bad(format!("the first segment starts at {}, not {}", segments[0].0, self.owned.start));
        }
        for (i, (start, clock)) in segments.iter().enumerate() {
            if clock.len() != self.workers_max || clock.iter().any(|c| *c > CLOCK_MAX) {
                return bad(format!("segment {i} has {} clocks, or one over the limit", clock.len()));
            }
            if let Some((prev, prev_clock)) = i.checked_sub(1).map(|p| &segments[p]) {
                if *start <= *prev || *start >= self.owned.end || clock == prev_clock {
                    return bad(format!("segment {i} at {start} is out of order, outside, or equal to its neighbour"));
                }
            }
        }
        for (k, (start, clock)) in segments.iter().enumerate() {
            self.starts[k] = *start;
            self.clocks[k * self.workers_max..(k + 1) * self.workers_max].copy_from_slice(clock);
        }
        self.count = segments.len();
        let seen = |w: usize| segments.iter().any(|(_, c)| c[w] > 0);
        self.workers_seen = (0..self.workers_max).rev().find(|w| seen(*w)).map_or(0, |w| w + 1);
        self.generation += 1;
        self.check_invariants();
        Ok(())
    }

    /// The key range these clocks cover.
    pub fn owned(&self) -> Range<u64> {
        self.owned.clone()
    }

    /// Entries per clock: worker ids must be below this.
    pub fn workers_max(&self) -> usize {
        self.workers_max
    }

    /// Worker `worker` has pushed with clock `clock` over `range`: raises entry `worker` to at
    /// least `clock` on every key of `range`, splitting segments at the range's ends and merging
    /// equal neighbours afterwards. A stale clock (lower than the current entry) changes nothing,
    /// so clocks only ever grow.
    ///
    /// The segment limit applies to the outcome, after merging: a push that splits a segment but
    /// lets others merge succeeds if the result fits. A failed call leaves the clocks exactly as
    /// they were.
    ///
    /// # Errors
    /// [`EngineError::WorkerOutOfRange`] if `worker >= workers_max`;
    /// [`EngineError::ClockTooLarge`] if `clock` is over [`CLOCK_MAX`];
    /// [`EngineError::ClockSegmentsFull`] (carrying the owned range) if the outcome would need more
    /// than `segments_max` segments.
    ///
    /// # Panics
    /// If `range` is empty or not inside [`owned`](Self::owned): the shard routes only keys it
    /// owns, so such a range is a broken invariant, not an operating error.
    pub fn advance(&mut self, range: Range<u64>, worker: u32, clock: u64) -> Result<()> {
        self.assert_inside(&range, "advance");
        let worker_index = usize::try_from(worker).unwrap_or(usize::MAX);
        if worker_index >= self.workers_max {
            return Err(EngineError::WorkerOutOfRange { worker, workers_max: self.workers_max });
        }
        if clock > CLOCK_MAX {
            return Err(EngineError::ClockTooLarge { clock, max: CLOCK_MAX });
        }
        let first = self.segment_of(range.start);
        // Most pushes end inside the segment they start in: no second search for it.
        let last = if range.end <= self.end_of(first) { first } else { self.segment_of(range.end - 1) };
        let split_left = self.starts[first] < range.start && self.clock(first)[worker_index] < clock;
        let split_right = self.end_of(last) > range.end && self.clock(last)[worker_index] < clock;
        let push = Push { range, worker: worker_index, clock, first, last, split_left, split_right };

        if self.raise_whole_segment(&push) {
            return Ok(());
        }

        // Merging only ever removes segments, so the exact outcome is worth computing only when the
        // cheap upper bound does not fit; this keeps the common case to a single pass.
        let predicted = if self.count + push.splits() > self.segments_max {
            let count_after = self.count_after(&push);
            if count_after > self.segments_max {
                return Err(EngineError::ClockSegmentsFull { range: self.owned.clone(), segments_max: self.segments_max });
            }
            Some(count_after)
        } else {
            None
        };

        if self.apply(&push) {
            self.generation += 1;
        }
        if clock > 0 {
            self.workers_seen = self.workers_seen.max(worker_index + 1);
        }
        if let Some(count_after) = predicted {
            debug_assert_eq!(self.count, count_after, "advance: prediction and outcome disagree");
        }
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
        Ok(())
    }

    /// Writes the element-wise minimum of the clocks of all segments that intersect `range` to
    /// `out[..n]`, where `n = out.len().min(workers_max)`: a stamp every key of `range` has
    /// reached. Entries of `out` past `n` are left untouched.
    ///
    /// # Panics
    /// If `range` is empty or not inside [`owned`](Self::owned), as for [`advance`](Self::advance).
    pub fn stamp_into(&self, range: Range<u64>, out: &mut [u64]) {
        self.assert_inside(&range, "stamp_into");
        let first = self.segment_of(range.start);
        self.meet_from(first, range.end, out);
    }

    /// Writes the element-wise minimum of the clocks of segment `first` and of every later one
    /// that starts before `end` into `out[..n]` (`n` as in [`stamp_into`](Self::stamp_into));
    /// returns the last segment it met. Walks on from `first` rather than searching for the last
    /// one: a stamp's range crosses few segments, and the minimum visits each of them anyway.
    fn meet_from(&self, first: usize, end: u64, out: &mut [u64]) -> usize {
        let n = out.len().min(self.workers_max);
        let out = &mut out[..n];
        for (stamp, &entry) in out.iter_mut().zip(self.clock(first)) {
            *stamp = entry;
        }
        let mut k = first;
        while k + 1 < self.count && self.starts[k + 1] < end {
            k += 1;
            for (stamp, &entry) in out.iter_mut().zip(self.clock(k)) {
                *stamp = (*stamp).min(entry);
            }
        }
        k
    }

    /// [`stamp_into`](Self::stamp_into) for a range that usually lies inside one segment (a
    /// dense block's keys), with one segment search instead of two; also returns the keys of that
    /// segment, which all share this stamp, or an empty range when `range` spans several.
    ///
    /// # Panics
    /// If `range` is empty or not inside [`owned`](Self::owned), as for [`advance`](Self::advance).
    pub fn segment_stamp(&self, range: Range<u64>, out: &mut [u64]) -> Range<u64> {
        self.assert_inside(&range, "segment_stamp");
        let k = self.segment_of(range.start);
        if self.meet_from(k, range.end, out) == k {
            self.starts[k]..self.end_of(k)
        } else {
            0..0
        }
    }

    /// Applies `push` at once when it lies in one segment and changes no segment's bounds: it
    /// splits nothing (it covers the segment, as a worker's push of the same range each iteration
    /// does, or raises nothing) and the raised segment becomes equal to neither neighbour. Returns
    /// false, having changed nothing, for any other push: the general path applies it.
    fn raise_whole_segment(&mut self, push: &Push) -> bool {
        let (k, w) = (push.first, push.worker);
        if push.last != k || push.splits() > 0 {
            return false;
        }
        let at = k * self.workers_max + w;
        if self.clocks[at] < push.clock {
            if (k > 0 && self.equal_after(push, k - 1, k)) || (k + 1 < self.count && self.equal_after(push, k, k + 1)) {
                return false;
            }
            self.clocks[at] = push.clock;
            self.generation += 1;
        }
        if push.clock > 0 {
            self.workers_seen = self.workers_seen.max(w + 1);
        }
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
        true
    }

    /// Highest worker index that has ever raised a clock entry, plus one (0 if none). Entries at
    /// this index and beyond are 0 in every segment, so this is the stamp length worth sending.
    pub fn workers_seen(&self) -> usize {
        self.workers_seen
    }

    /// Live segments, between 1 and `segments_max`.
    pub fn segment_count(&self) -> usize {
        self.count
    }

    /// The segments in key order, each with its clock (`workers_max` entries).
    pub fn segments(&self) -> impl Iterator<Item = (Range<u64>, &[u64])> + '_ {
        (0..self.count).map(move |k| (self.starts[k]..self.end_of(k), self.clock(k)))
    }

    /// Panics unless the segments are sorted, cover `owned` exactly, fit the limit, have no equal
    /// neighbours, and agree with `workers_seen`. Run after every `advance` in debug builds.
    pub(crate) fn check_invariants(&self) {
        assert!((1..=self.segments_max).contains(&self.count), "clock segment count {} is outside 1..={}", self.count, self.segments_max);
        assert_eq!(self.starts[0], self.owned.start, "the first clock segment must start the owned range");
        assert!(self.starts[self.count - 1] < self.owned.end, "the last clock segment is empty");
        for k in 1..self.count {
            assert!(self.starts[k - 1] < self.starts[k], "clock segment {k} is empty or out of order");
            assert_ne!(self.clock(k - 1), self.clock(k), "clock segments {} and {k} are equal", k - 1);
        }
        let seen = self.workers_seen;
        assert!(seen <= self.workers_max, "workers_seen {seen} exceeds workers_max");
        for k in 0..self.count {
            assert!(self.clock(k)[seen..].iter().all(|&e| e == 0), "segment {k} has entries past workers_seen");
        }
        if seen > 0 {
            let raised = (0..self.count).any(|k| self.clock(k)[seen - 1] > 0);
            assert!(raised, "workers_seen is {seen} but worker {} never raised a clock", seen - 1);
        }
    }

    fn assert_inside(&self, range: &Range<u64>, caller: &str) {
        let owned = &self.owned;
        let inside = owned.start <= range.start && range.end <= owned.end;
        assert!(
            range.start < range.end && inside,
            "RangeClocks::{caller}: range {range:?} must be non-empty and inside the owned range \
             {owned:?}"
        );
    }

    fn clock(&self, k: usize) -> &[u64] {
        &self.clocks[k * self.workers_max..(k + 1) * self.workers_max]
    }

    fn end_of(&self, k: usize) -> u64 {
        if k + 1 < self.count {
            self.starts[k + 1]
        } else {
            self.owned.end
        }
    }

    /// The segment containing `key`, which must be inside `owned`. The first segment starts at
    /// `owned.start`, so some start is `<= key` and the subtraction cannot underflow.
    fn segment_of(&self, key: u64) -> usize {
        self.starts[..self.count].partition_point(|&start| start <= key) - 1
    }

    /// Whether segments `a` and `b` (`a < b`) would have equal clocks after `push`, without
    /// applying it.
    fn equal_after(&self, push: &Push, a: usize, b: usize) -> bool {
        let (w, clock_a, clock_b) = (push.worker, self.clock(a), self.clock(b));
        let after = |k: usize, entry: u64| {
            if push.raises(k) {
                entry.max(push.clock)
            } else {
                entry
            }
        };
        // The pushing worker's entry first: it is the one the push changes, and so the one that
        // usually differs, which spares comparing the rest.
        after(a, clock_a[w]) == after(b, clock_b[w]) && clock_a[..w] == clock_b[..w] && clock_a[w + 1..] == clock_b[w + 1..]
    }

    /// The segment count `push` would leave: each split adds one, and each adjacent pair in the
    /// window that becomes equal removes one (equality is transitive, so a run of `r` equal pairs
    /// is one merge of `r + 1` segments).
    fn count_after(&self, push: &Push) -> usize {
        let (lo, hi) = push.window(self.count);
        let merges = (lo..hi).filter(|&k| self.equal_after(push, k, k + 1)).count();
        self.count + push.splits() - merges
    }

    /// Applies a push already known to fit. The raised segments are updated whole, merged, and only
    /// then split, so the segment count never exceeds the outcome: the split-off remainders are
    /// rebuilt from the raised run by restoring the one entry the push changed. Returns whether
    /// it raised any entry: if not, nothing changed (no neighbours become equal, nothing splits).
    fn apply(&mut self, push: &Push) -> bool {
        let (w, workers_max) = (push.worker, self.workers_max);
        let left_before = self.clock(push.first)[w];
        let right_before = self.clock(push.last)[w];
        let mut raised = false;
        for k in push.first..=push.last {
            let entry = &mut self.clocks[k * workers_max + w];
            raised |= *entry < push.clock;
            *entry = (*entry).max(push.clock);
        }
        let mut last_run = self.merge_window(push);
        if push.split_left {
            // merge_window kept the raised run headed at `first` (its window starts there).
            self.duplicate(push.first);
            self.starts[push.first + 1] = push.range.start;
            self.clocks[push.first * workers_max + w] = left_before;
            last_run += 1;
        }
        if push.split_right {
            self.duplicate(last_run);
            self.starts[last_run + 1] = push.range.end;
            self.clocks[(last_run + 1) * workers_max + w] = right_before;
        }
        raised
    }

    /// Merges equal adjacent segments in `push`'s window in place and closes the gap; returns the
    /// index of the run that now holds segment `last`'s keys.
    fn merge_window(&mut self, push: &Push) -> usize {
        let (lo, hi) = push.window(self.count);
        let mut head = lo;
        for k in lo + 1..=hi {
            // A segment equal to the current run just drops its start: the run now reaches over it.
            if self.clock(k) != self.clock(head) {
                head += 1;
                if head != k {
                    self.move_segment(k, head); // close the gap the merged ones left
                }
            }
        }
        self.close_gap(head + 1, hi + 1);
        head
    }

    /// Copies segment `from` over segment `to` (`to <= from`).
    fn move_segment(&mut self, from: usize, to: usize) {
        let workers_max = self.workers_max;
        self.starts[to] = self.starts[from];
        self.clocks.copy_within(from * workers_max..(from + 1) * workers_max, to * workers_max);
    }

    /// Shifts segments `from..count` down to start at `to` (`to <= from`), dropping `to..from`.
    fn close_gap(&mut self, to: usize, from: usize) {
        if to == from {
            return; // nothing merged: no segment moves
        }
        let (count, workers_max) = (self.count, self.workers_max);
        self.starts.copy_within(from..count, to);
        self.clocks.copy_within(from * workers_max..count * workers_max, to * workers_max);
        self.count -= from - to;
    }

    /// Shifts segments `k..count` up by one, leaving segments `k` and `k + 1` identical for the
    /// caller to tell apart. The caller guarantees room (`count < segments_max`).
    fn duplicate(&mut self, k: usize) {
        let (count, workers_max) = (self.count, self.workers_max);
        self.starts.copy_within(k..count, k + 1);
        self.clocks.copy_within(k * workers_max..count * workers_max, (k + 1) * workers_max);
        self.count += 1;
    }
}

/// Shows only the live segments and the entries that can be non-zero: the buffers are sized for the
/// worst case and would bury the state in zeros.
impl fmt::Debug for RangeClocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RangeClocks")
            .field("owned", &self.owned)
            .field("workers_max", &self.workers_max)
            .field("segments_max", &self.segments_max)
            .field("workers_seen", &self.workers_seen)
            .field("segments", &LiveSegments(self))
            .finish()
    }
}

struct LiveSegments<'a>(&'a RangeClocks);

impl fmt::Debug for LiveSegments<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seen = self.0.workers_seen;
        f.debug_map().entries(self.0.segments().map(|(keys, clock)| (keys, &clock[..seen]))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The live segments as owned values, for comparing against expectations.
    fn segs(clocks: &RangeClocks) -> Vec<(Range<u64>, Vec<u64>)> {
        clocks.segments().map(|(keys, clock)| (keys, clock.to_vec())).collect()
    }

    /// Whether two instances are identical down to the dead tail of their buffers: a failed call
    /// must not have touched anything at all.
    fn same_state(a: &RangeClocks, b: &RangeClocks) -> bool {
        a.owned == b.owned
            && a.workers_max == b.workers_max
            && a.segments_max == b.segments_max
            && a.starts == b.starts
            && a.clocks == b.clocks
            && a.count == b.count
            && a.workers_seen == b.workers_seen
    }

    fn stamp(clocks: &RangeClocks, range: Range<u64>) -> Vec<u64> {
        let mut out = vec![u64::MAX; clocks.workers_max()];
        clocks.stamp_into(range, &mut out);
        out
    }

    #[test]
    fn new_is_one_segment_at_zero() {
        let clocks = RangeClocks::new(10..20, 3, 4);
        clocks.check_invariants();
        assert_eq!(clocks.owned(), 10..20);
        assert_eq!(clocks.workers_max(), 3);
        assert_eq!(clocks.workers_seen(), 0);
        assert_eq!(segs(&clocks), vec![(10..20, vec![0, 0, 0])]);
    }

    #[test]
    fn full_range_push_keeps_one_segment() {
        let mut clocks = RangeClocks::new(0..100, 4, 8);
        clocks.advance(0..100, 2, 5).unwrap();
        assert_eq!(segs(&clocks), vec![(0..100, vec![0, 0, 5, 0])]);
        assert_eq!(clocks.workers_seen(), 3);
    }

    #[test]
    fn generation_changes_only_when_a_push_raises_an_entry() {
        // One segment (the short path), then several (the general one).
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        let g0 = clocks.generation();
        clocks.advance(0..100, 0, 0).unwrap();
        clocks.advance(10..20, 1, 0).unwrap();
        assert_eq!(clocks.generation(), g0, "clock 0 raises nothing");
        clocks.advance(0..100, 0, 3).unwrap();
        let g1 = clocks.generation();
        assert_ne!(g1, g0);
        clocks.advance(0..100, 0, 3).unwrap();
        clocks.advance(40..60, 0, 2).unwrap();
        assert_eq!(clocks.generation(), g1, "a stale or repeated clock raises nothing, and splits nothing");
        assert_eq!(segs(&clocks), vec![(0..100, vec![3, 0])]);
        clocks.advance(40..60, 1, 1).unwrap();
        let g2 = clocks.generation();
        assert_ne!(g2, g1);
        clocks.advance(40..60, 1, 1).unwrap();
        clocks.advance(0..100, 0, 2).unwrap();
        assert_eq!(clocks.generation(), g2, "nothing raised over several segments");
        clocks.advance(0..100, 0, 4).unwrap();
        assert_ne!(clocks.generation(), g2);
        assert_eq!(segs(&clocks), vec![(0..40, vec![4, 0]), (40..60, vec![4, 1]), (60..100, vec![4, 0])]);
    }

    #[test]
    fn a_push_of_exactly_one_segment_raises_it_and_merges_only_with_an_equal_neighbour() {
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(0..100, 0, 4).unwrap();
        clocks.advance(40..60, 1, 1).unwrap();
        // The same range again at the next clock, as a worker pushes each iteration.
        for clock in 2..5 {
            clocks.advance(40..60, 1, clock).unwrap();
            assert_eq!(segs(&clocks), vec![(0..40, vec![4, 0]), (40..60, vec![4, clock]), (60..100, vec![4, 0])]);
        }
        // Raised to equal its right neighbour, then its left one: each pair merges.
        clocks.advance(60..100, 1, 4).unwrap();
        assert_eq!(segs(&clocks), vec![(0..40, vec![4, 0]), (40..100, vec![4, 4])]);
        clocks.advance(0..40, 1, 4).unwrap();
        assert_eq!(segs(&clocks), vec![(0..100, vec![4, 4])]);
        assert_eq!(clocks.workers_seen(), 2);
    }

    #[test]
    fn segment_stamp_finds_the_segment_or_falls_back_to_the_minimum() {
        let mut clocks = RangeClocks::new(0..100, 3, 8);
        clocks.advance(0..100, 0, 5).unwrap();
        clocks.advance(30..60, 1, 2).unwrap();
        let mut out = [9; 3];
        assert_eq!(clocks.segment_stamp(35..40, &mut out), 30..60);
        assert_eq!(out, [5, 2, 0]);
        assert_eq!(clocks.segment_stamp(0..30, &mut out), 0..30);
        assert_eq!(out, [5, 0, 0]);
        // Across a segment boundary: no one segment, and the element-wise minimum.
        assert_eq!(clocks.segment_stamp(50..70, &mut out), 0..0);
        assert_eq!(out, [5, 0, 0]);
        assert_eq!(out.to_vec(), stamp(&clocks, 50..70));
        // A shorter buffer gets the first entries only, as with stamp_into.
        let mut short = [9; 2];
        assert_eq!(clocks.segment_stamp(40..41, &mut short), 30..60);
        assert_eq!(short, [5, 2]);
    }

    #[test]
    fn partial_push_at_either_end_splits_in_two() {
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(0..40, 0, 1).unwrap();
        assert_eq!(segs(&clocks), vec![(0..40, vec![1, 0]), (40..100, vec![0, 0])]);

        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(60..100, 1, 1).unwrap();
        assert_eq!(segs(&clocks), vec![(0..60, vec![0, 0]), (60..100, vec![0, 1])]);
    }

    #[test]
    fn partial_push_in_the_middle_splits_in_three() {
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(30..60, 1, 2).unwrap();
        assert_eq!(segs(&clocks), vec![(0..30, vec![0, 0]), (30..60, vec![0, 2]), (60..100, vec![0, 0])]);
        assert_eq!(clocks.segment_count(), 3);
    }

    #[test]
    fn pushes_from_two_workers_overlap() {
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(0..50, 0, 1).unwrap();
        clocks.advance(25..100, 1, 1).unwrap();
        assert_eq!(segs(&clocks), vec![(0..25, vec![1, 0]), (25..50, vec![1, 1]), (50..100, vec![0, 1])]);
        // Both workers finishing the iteration everywhere collapses it back to one clock.
        clocks.advance(50..100, 0, 1).unwrap();
        clocks.advance(0..25, 1, 1).unwrap();
        assert_eq!(segs(&clocks), vec![(0..100, vec![1, 1])]);
    }

    #[test]
    fn second_push_merges_neighbours_back() {
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(0..50, 0, 1).unwrap();
        clocks.advance(50..100, 0, 1).unwrap();
        assert_eq!(segs(&clocks), vec![(0..100, vec![1, 0])]);

        // The middle piece of a three-way split, filled in from both sides.
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(30..60, 0, 3).unwrap();
        clocks.advance(0..30, 0, 3).unwrap();
        assert_eq!(segs(&clocks), vec![(0..60, vec![3, 0]), (60..100, vec![0, 0])]);
        clocks.advance(60..100, 0, 3).unwrap();
        assert_eq!(segs(&clocks), vec![(0..100, vec![3, 0])]);
    }

    #[test]
    fn push_over_several_segments_merges_them_all() {
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(0..30, 0, 1).unwrap();
        clocks.advance(30..60, 0, 2).unwrap();
        assert_eq!(clocks.segment_count(), 3);
        clocks.advance(0..100, 0, 3).unwrap();
        assert_eq!(segs(&clocks), vec![(0..100, vec![3, 0])]);
    }

    #[test]
    fn stale_push_changes_nothing_and_does_not_split() {
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(0..100, 0, 5).unwrap();
        let before = clocks.clone();
        clocks.advance(20..40, 0, 3).unwrap();
        clocks.advance(20..40, 0, 5).unwrap();
        assert!(same_state(&before, &clocks));
    }

    #[test]
    fn stamp_spanning_segments_is_the_elementwise_min() {
        let mut clocks = RangeClocks::new(0..100, 3, 8);
        clocks.advance(0..100, 0, 4).unwrap();
        clocks.advance(0..50, 1, 7).unwrap();
        clocks.advance(40..100, 2, 2).unwrap();
        clocks.advance(70..80, 0, 9).unwrap();
        // 0..40 [4,7,0], 40..50 [4,7,2], 50..70 [4,0,2], 70..80 [9,0,2], 80..100 [4,0,2]
        assert_eq!(clocks.segment_count(), 5);
        assert_eq!(stamp(&clocks, 45..75), vec![4, 0, 2]);
        assert_eq!(stamp(&clocks, 40..50), vec![4, 7, 2]);
        assert_eq!(stamp(&clocks, 72..73), vec![9, 0, 2]);
        assert_eq!(stamp(&clocks, 39..41), vec![4, 7, 0]);
        assert_eq!(stamp(&clocks, 0..100), vec![4, 0, 0]);

        // A short buffer gets a prefix; a long one keeps its tail.
        let mut short = [u64::MAX; 2];
        clocks.stamp_into(40..50, &mut short);
        assert_eq!(short, [4, 7]);
        let mut long = [u64::MAX; 5];
        clocks.stamp_into(40..50, &mut long);
        assert_eq!(long, [4, 7, 2, u64::MAX, u64::MAX]);
        clocks.stamp_into(40..50, &mut []);
    }

    #[test]
    fn worker_out_of_range_leaves_state_identical() {
        let mut clocks = RangeClocks::new(0..100, 4, 8);
        clocks.advance(10..20, 1, 3).unwrap();
        let before = clocks.clone();
        for worker in [4, 5, u32::MAX] {
            let err = clocks.advance(30..40, worker, 9).unwrap_err();
            assert_eq!(err, EngineError::WorkerOutOfRange { worker, workers_max: 4 });
            assert!(same_state(&before, &clocks));
        }
    }

    #[test]
    fn clock_over_the_limit_is_refused_and_changes_nothing() {
        let mut clocks = RangeClocks::new(0..100, 2, 8);
        clocks.advance(0..10, 0, CLOCK_MAX).unwrap();
        let before = clocks.clone();
        for clock in [CLOCK_MAX + 1, u64::MAX] {
            let err = clocks.advance(0..10, 1, clock).unwrap_err();
            assert_eq!(err, EngineError::ClockTooLarge { clock, max: CLOCK_MAX });
            assert!(same_state(&before, &clocks));
        }
    }

    #[test]
    fn segments_max_leaves_state_identical() {
        let mut clocks = RangeClocks::new(0..100, 2, 2);
        clocks.advance(0..50, 0, 1).unwrap();
        let before = clocks.clone();
        let err = clocks.advance(20..30, 1, 1).unwrap_err();
        assert_eq!(err, EngineError::ClockSegmentsFull { range: 0..100, segments_max: 2 });
        assert!(same_state(&before, &clocks));
        // Splitting the far end would also make three.
        assert!(clocks.advance(70..100, 1, 1).is_err());
        assert!(same_state(&before, &clocks));
        // A push that splits nothing is always fine at the limit.
        clocks.advance(50..100, 1, 1).unwrap();
        assert_eq!(segs(&clocks), vec![(0..50, vec![1, 0]), (50..100, vec![0, 1])]);

        let mut single = RangeClocks::new(0..100, 1, 1);
        assert!(single.advance(0..99, 0, 1).is_err());
        single.advance(0..100, 0, 1).unwrap();
        assert_eq!(segs(&single), vec![(0..100, vec![1])]);
    }

    #[test]
    fn segments_max_applies_to_the_outcome_after_merging() {
        let mut clocks = RangeClocks::new(0..100, 2, 3);
        clocks.advance(0..30, 0, 1).unwrap();
        clocks.advance(30..60, 0, 2).unwrap();
        assert_eq!(clocks.segment_count(), 3);
        // Splits 0..30 at 10 (four segments for a moment) but merges 10..100 into one run.
        clocks.advance(10..100, 0, 2).unwrap();
        assert_eq!(segs(&clocks), vec![(0..10, vec![1, 0]), (10..100, vec![2, 0])]);
    }

    #[test]
    fn single_key_ranges_at_both_ends() {
        let mut clocks = RangeClocks::new(10..20, 1, 4);
        clocks.advance(10..11, 0, 1).unwrap();
        clocks.advance(19..20, 0, 1).unwrap();
        assert_eq!(segs(&clocks), vec![(10..11, vec![1]), (11..19, vec![0]), (19..20, vec![1])]);
        assert_eq!(stamp(&clocks, 10..11), vec![1]);
        assert_eq!(stamp(&clocks, 19..20), vec![1]);
        assert_eq!(stamp(&clocks, 18..20), vec![0]);
        assert_eq!(stamp(&clocks, 10..20), vec![0]);
        clocks.advance(11..19, 0, 1).unwrap();
        assert_eq!(segs(&clocks), vec![(10..20, vec![1])]);
    }

    #[test]
    fn owned_range_ending_at_u64_max() {
        let top = u64::MAX;
        let mut clocks = RangeClocks::new(top - 10..top, 2, 4);
        clocks.advance(top - 1..top, 1, 7).unwrap();
        assert_eq!(segs(&clocks), vec![(top - 10..top - 1, vec![0, 0]), (top - 1..top, vec![0, 7])]);
        assert_eq!(stamp(&clocks, top - 1..top), vec![0, 7]);
        assert_eq!(stamp(&clocks, top - 10..top), vec![0, 0]);
        clocks.advance(top - 10..top - 1, 1, 7).unwrap();
        assert_eq!(segs(&clocks), vec![(top - 10..top, vec![0, 7])]);

        let mut whole = RangeClocks::new(0..top, 1, 4);
        whole.advance(top - 1..top, 0, 1).unwrap();
        whole.advance(0..1, 0, 1).unwrap();
        assert_eq!(segs(&whole), vec![(0..1, vec![1]), (1..top - 1, vec![0]), (top - 1..top, vec![1])]);
    }

    #[test]
    fn workers_seen_counts_only_raising_pushes() {
        let mut clocks = RangeClocks::new(0..10, 8, 4);
        clocks.advance(0..10, 5, 0).unwrap();
        assert_eq!(clocks.workers_seen(), 0);
        clocks.advance(0..5, 2, 1).unwrap();
        assert_eq!(clocks.workers_seen(), 3);
        clocks.advance(0..5, 0, 1).unwrap();
        assert_eq!(clocks.workers_seen(), 3);
    }

    #[test]
    fn debug_shows_live_segments_only() {
        let mut clocks = RangeClocks::new(0..10, 1000, 1000);
        clocks.advance(0..5, 1, 3).unwrap();
        let text = format!("{clocks:?}");
        assert!(text.contains("segments: {0..5: [0, 3], 5..10: [0, 0]}"), "{text}");
        assert!(text.len() < 200, "{text}");
    }

    #[test]
    #[should_panic(expected = "inside the owned range")]
    fn advance_outside_owned_panics() {
        RangeClocks::new(10..20, 1, 4).advance(15..21, 0, 1).unwrap();
    }

    #[test]
    #[should_panic(expected = "non-empty")]
    fn empty_stamp_range_panics() {
        RangeClocks::new(10..20, 1, 4).stamp_into(15..15, &mut [0]);
    }

    #[test]
    #[should_panic(expected = "is empty")]
    fn empty_owned_range_panics() {
        RangeClocks::new(5..5, 1, 4);
    }

    mod model {
        //! Property tests against a naive model that keeps one clock per key.

        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        const KEYS: Range<u64> = 10..74;
        const WORKERS_MAX: usize = 4;

        #[derive(Debug, Clone)]
        struct Op {
            range: Range<u64>,
            worker: u32,
            clock: u64,
        }

        /// Any non-empty range inside `KEYS`.
        fn key_range() -> impl Strategy<Value = Range<u64>> {
            (KEYS, KEYS).prop_map(|(a, b)| a.min(b)..a.max(b) + 1)
        }

        /// Workers past the limit and small clocks, so that rejections, stale pushes and merges are
        /// all common.
        fn op() -> impl Strategy<Value = Op> {
            (key_range(), 0u32..(WORKERS_MAX as u32 + 2), 0u64..6).prop_map(|(range, worker, clock)| Op { range, worker, clock })
        }

        #[derive(Debug, Clone, Default)]
        struct Model {
            keys: Vec<[u64; WORKERS_MAX]>,
            workers_seen: usize,
        }

        impl Model {
            fn new() -> Self {
                Self { keys: vec![[0; WORKERS_MAX]; (KEYS.end - KEYS.start) as usize], workers_seen: 0 }
            }

            fn at(&self, key: u64) -> &[u64; WORKERS_MAX] {
                &self.keys[(key - KEYS.start) as usize]
            }

            /// The per-key clocks as runs of equal neighbours: what a minimal segmentation must be.
            fn runs(&self) -> Vec<(Range<u64>, Vec<u64>)> {
                let mut runs: Vec<(Range<u64>, Vec<u64>)> = Vec::new();
                for key in KEYS {
                    match runs.last_mut() {
                        Some((keys, clock)) if clock[..] == self.at(key)[..] => keys.end = key + 1,
                        _ => runs.push((key..key + 1, self.at(key).to_vec())),
                    }
                }
                runs
            }

            fn stamp(&self, range: Range<u64>) -> Vec<u64> {
                (0..WORKERS_MAX).map(|w| range.clone().map(|key| self.at(key)[w]).min().unwrap()).collect()
            }

            /// Applies `op` if the real structure should accept it, and says whether it should.
            fn advance(&mut self, op: &Op, segments_max: usize) -> bool {
                let w = op.worker as usize;
                if w >= WORKERS_MAX {
                    return false;
                }
                let mut next = self.clone();
                for key in op.range.clone() {
                    let entry = &mut next.keys[(key - KEYS.start) as usize][w];
                    *entry = (*entry).max(op.clock);
                }
                if next.runs().len() > segments_max {
                    return false;
                }
                if op.clock > 0 {
                    next.workers_seen = next.workers_seen.max(w + 1);
                }
                *self = next;
                true
            }
        }

        /// Applies `op` to both and checks they agree on acceptance, and that a rejection changed
        /// nothing.
        fn step(clocks: &mut RangeClocks, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
            let before = clocks.clone();
            let accepted = model.advance(op, clocks.segments_max);
            let result = clocks.advance(op.range.clone(), op.worker, op.clock);
            prop_assert_eq!(result.is_ok(), accepted, "{:?} gave {:?}", op, result);
            if !accepted {
                prop_assert!(same_state(&before, clocks), "rejected {:?} changed the state", op);
            }
            Ok(())
        }

        /// (1) After every op the segments are exactly the runs of the per-key clocks: right
        /// values, and no two neighbours equal, so the count is minimal.
        fn check_runs(segments_max: usize, ops: &[Op]) -> Result<(), TestCaseError> {
            let mut clocks = RangeClocks::new(KEYS, WORKERS_MAX, segments_max);
            let mut model = Model::new();
            for op in ops {
                step(&mut clocks, &mut model, op)?;
                clocks.check_invariants();
                prop_assert_eq!(segs(&clocks), model.runs(), "after {:?}", op);
                prop_assert_eq!(clocks.segment_count(), model.runs().len());
                prop_assert_eq!(clocks.workers_seen(), model.workers_seen);
            }
            Ok(())
        }

        /// (2) and (3): every stamp equals the model's element-wise minimum over the range (for any
        /// buffer length), and never decreases entry-wise from one op to the next.
        fn check_stamps(segments_max: usize, ops: &[Op], queries: &[Range<u64>], out_len: usize) -> Result<(), TestCaseError> {
            let mut clocks = RangeClocks::new(KEYS, WORKERS_MAX, segments_max);
            let mut model = Model::new();
            let mut previous = vec![vec![0; WORKERS_MAX]; queries.len()];
            let n = out_len.min(WORKERS_MAX);
            for op in ops {
                step(&mut clocks, &mut model, op)?;
                for (query, previous) in queries.iter().zip(&mut previous) {
                    let now = stamp(&clocks, query.clone());
                    prop_assert_eq!(&now, &model.stamp(query.clone()), "stamp of {:?}", query);
                    let grew = now.iter().zip(previous.iter()).all(|(now, was)| now >= was);
                    prop_assert!(grew, "stamp of {:?} fell from {:?} to {:?}", query, previous, now);
                    *previous = now;

                    let mut out = vec![u64::MAX; out_len];
                    clocks.stamp_into(query.clone(), &mut out);
                    prop_assert_eq!(&out[..n], &previous[..n]);
                    let untouched = out[n..].iter().all(|&e| e == u64::MAX);
                    prop_assert!(untouched, "stamp_into wrote past workers_max");
                }
            }
            Ok(())
        }

        /// (4) A rejected op changes nothing, down to the unused storage, and says why it was
        /// rejected.
        fn check_rejections(segments_max: usize, ops: &[Op]) -> Result<(), TestCaseError> {
            let mut clocks = RangeClocks::new(KEYS, WORKERS_MAX, segments_max);
            let mut model = Model::new();
            for op in ops {
                let before = clocks.clone();
                let accepted = model.advance(op, segments_max);
                let Err(err) = clocks.advance(op.range.clone(), op.worker, op.clock) else {
                    prop_assert!(accepted, "{:?} should have been rejected", op);
                    continue;
                };
                prop_assert!(!accepted, "{:?} should have been accepted", op);
                prop_assert!(same_state(&before, &clocks), "rejected {:?} changed the state", op);
                let expected = if op.worker as usize >= WORKERS_MAX {
                    EngineError::WorkerOutOfRange { worker: op.worker, workers_max: WORKERS_MAX }
                } else {
                    EngineError::ClockSegmentsFull { range: KEYS, segments_max }
                };
                prop_assert_eq!(err, expected);
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn segments_are_the_minimal_runs_of_the_model(
                segments_max in 1usize..=24,
                ops in vec(op(), 1..64),
            ) {
                check_runs(segments_max, &ops)?;
            }

            #[test]
            fn stamps_match_the_model_and_never_decrease(
                segments_max in 1usize..=24,
                ops in vec(op(), 1..64),
                queries in vec(key_range(), 1..16),
                out_len in 0usize..=WORKERS_MAX + 2,
            ) {
                check_stamps(segments_max, &ops, &queries, out_len)?;
            }

            /// The small limit keeps the structure full, where a push may merge some segments while
            /// splitting others.
            #[test]
            fn rejected_ops_change_nothing(segments_max in 1usize..=6, ops in vec(op(), 1..64)) {
                check_rejections(segments_max, &ops)?;
            }
        }
    }
}
