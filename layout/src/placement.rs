//! Key-range placement: which shard owns each key of a table.
//!
//! A cluster cuts each table into replication ranges, places each range on a chain of servers
//! (the coordinator's ring), and gives each range to one shard of every server in its chain (a
//! standalone server is a chain of one). Sparse tables hold hashed keys, which are spread evenly
//! over the key space, so equal ranges carry equal load.

use std::ops::Range;

use crate::catalog::TableSpec;

/// The keys of `spec` that replication range `range` (of `ranges`) holds: the table's key space
/// cut into `ranges` nearly equal slices, in order. A table with fewer keys than ranges leaves
/// some slices empty, so that every table cuts at the same range numbers.
pub fn range_keys(spec: &TableSpec, ranges: u32, range: u32) -> Range<u64> {
    assert!(range < ranges, "range {range} of {ranges}");
    let len = (spec.end - spec.start) as u128;
    let at = |r: u32| (spec.start as u128 + len * r as u128 / ranges as u128) as u64;
    at(range)..at(range + 1)
}

/// The replication range holding `key` of `spec` (a key inside the table).
pub fn range_of(spec: &TableSpec, ranges: u32, key: u64) -> u32 {
    assert!(spec.start <= key && key < spec.end, "key {key} outside table {:?}", spec.name);
    // Range r starts at start + floor(len * r / ranges), so floor(offset * ranges / len) is
    // the range, or short of it when later ranges start exactly at `key` (rounding down puts
    // them there): one step on when the table has at least as many keys as ranges, more only
    // past empty ranges. Every key of every replicated push and pull comes here.
    let len = (spec.end - spec.start) as u128;
    let mut r = ((key - spec.start) as u128 * ranges as u128 / len) as u32;
    while r + 1 < ranges && range_keys(spec, ranges, r + 1).start <= key {
        r += 1;
    }
    r
}

/// The runs of `keys` (every one inside the table) that fall in one replication range, in
/// order: each run's range and its positions in `keys`. Keys of one range that come together
/// (sorted keys, or keys grouped by range) are one run and cost one [`range_of`]; keys of one
/// range that come apart make more runs. Every replicated push and pull of listed keys is cut
/// here: the client's grouping, the shard's pull.
pub fn range_runs<'k>(spec: &'k TableSpec, ranges: u32, keys: &'k [u64]) -> impl Iterator<Item = (u32, Range<usize>)> + 'k {
    let mut at = 0;
    std::iter::from_fn(move || {
        let first = *keys.get(at)?;
        let range = range_of(spec, ranges, first);
        let held = range_keys(spec, ranges, range);
        let start = at;
        at += keys[at..].iter().position(|k| !held.contains(k)).unwrap_or(keys.len() - at);
        Some((range, start..at))
    })
}

/// The replication ranges that the keys `span` (inside the table) cross, in order: each range
/// and its part of the span. Dense pushes and pulls of a span of keys are cut here.
pub fn span_runs<'k>(spec: &'k TableSpec, ranges: u32, span: Range<u64>) -> impl Iterator<Item = (u32, Range<u64>)> + 'k {
    let mut key = span.start;
    std::iter::from_fn(move || {
        (key < span.end).then(|| {
            let range = range_of(spec, ranges, key);
            let stop = range_keys(spec, ranges, range).end.min(span.end);
            let run = key..stop;
            key = stop;
            (range, run)
        })
    })
}

/// The replication range of each of `keys` (every one inside the table), in order: the
/// [`range_runs`], key by key.
pub fn ranges_of<'k>(spec: &'k TableSpec, ranges: u32, keys: &'k [u64]) -> impl Iterator<Item = u32> + 'k {
    range_runs(spec, ranges, keys).flat_map(|(range, run)| std::iter::repeat_n(range, run.len()))
}

/// The shard (of `shards`) that holds replication range `range` on every server: ranges go to
/// shards in contiguous runs, so that each shard's part of a table is one span of keys.
pub fn shard_of_range(range: u32, ranges: u32, shards: u16) -> u16 {
    (range as u64 * shards as u64 / ranges as u64) as u16
}

/// The keys of `spec` a replicated server's `shard` serves: its ranges' slices, which touch. It
/// holds the parts of those ranges whose chains its server is in.
pub fn replicated_part(spec: &TableSpec, ranges: u32, shards: u16, shard: u16) -> Range<u64> {
    let mut mine = (0..ranges).filter(|r| shard_of_range(*r, ranges, shards) == shard);
    let (first, last) = (mine.clone().next(), mine.next_back());
    match (first, last) {
        (Some(f), Some(l)) => range_keys(spec, ranges, f).start..range_keys(spec, ranges, l).end,
        _ => spec.start..spec.start,
    }
}

/// A table as a client addresses it: its definition, and its id on every server. Its keys'
/// replication ranges, and their chains, say which servers hold them.
#[derive(Debug, Clone)]
pub struct Route {
    pub spec: TableSpec,
    pub id: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::TableKind;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn replication_ranges_cover_the_table_and_shards_hold_their_ranges(start in 0u64..1000, len in 1u64..100_000, ranges in 1u32..300, shards in 1u16..9, key in any::<u64>()) {
            let spec = TableSpec::new("t", TableKind::Dense, start, start + len, 1);
            let key = start + key % len;
            let r = range_of(&spec, ranges, key);
            prop_assert!(range_keys(&spec, ranges, r).contains(&key));
            let shard = shard_of_range(r, ranges, shards);
            prop_assert!(shard < shards);
            prop_assert!(replicated_part(&spec, ranges, shards, shard).contains(&key));
            prop_assert_eq!(range_keys(&spec, ranges, 0).start, start);
            prop_assert_eq!(range_keys(&spec, ranges, ranges - 1).end, start + len);
        }

        #[test]
        fn ranges_of_keys_are_each_keys_range(start in 0u64..1000, len in 1u64..100_000, ranges in 1u32..300, keys in proptest::collection::vec(any::<u64>(), 0..64), sort in any::<bool>()) {
            let spec = TableSpec::new("t", TableKind::Dense, start, start + len, 1);
            let mut keys: Vec<u64> = keys.into_iter().map(|k| start + k % len).collect();
            if sort {
                keys.sort_unstable();
            }
            let each: Vec<u32> = keys.iter().map(|k| range_of(&spec, ranges, *k)).collect();
            prop_assert_eq!(ranges_of(&spec, ranges, &keys).collect::<Vec<_>>(), each);
            // The runs cover the keys in order, and no two runs side by side share a range.
            let runs: Vec<(u32, Range<usize>)> = range_runs(&spec, ranges, &keys).collect();
            prop_assert_eq!(runs.iter().map(|(_, run)| run.len()).sum::<usize>(), keys.len());
            prop_assert!(runs.windows(2).all(|w| w[0].1.end == w[1].1.start && w[0].0 != w[1].0));
            if sort {
                prop_assert!(runs.windows(2).all(|w| w[0].0 < w[1].0));
            }
        }

        #[test]
        fn a_span_is_cut_at_range_edges(start in 0u64..1000, len in 1u64..100_000, ranges in 1u32..300, from in any::<u64>(), count in any::<u64>()) {
            let spec = TableSpec::new("t", TableKind::Dense, start, start + len, 1);
            let from = start + from % len;
            let span = from..from + 1 + count % (start + len - from);
            let runs: Vec<(u32, Range<u64>)> = span_runs(&spec, ranges, span.clone()).collect();
            prop_assert_eq!(runs.first().map(|r| r.1.start), Some(span.start));
            prop_assert_eq!(runs.last().map(|r| r.1.end), Some(span.end));
            for (range, run) in &runs {
                let held = range_keys(&spec, ranges, *range);
                prop_assert!(!run.is_empty() && held.start <= run.start && run.end <= held.end);
            }
            prop_assert!(runs.windows(2).all(|w| w[0].1.end == w[1].1.start && w[0].0 < w[1].0));
        }

        #[test]
        fn a_key_of_any_table_falls_in_its_range(start in any::<u64>(), len in any::<u64>(), short in any::<bool>(), ranges in 1u32..100_000, key in any::<u64>()) {
            // Short tables have more ranges than keys: some ranges are empty.
            let len = if short { len % 64 } else { len }.min(u64::MAX - start).max(1);
            let spec = TableSpec::new("t", TableKind::Sparse, start, start + len, 1);
            let key = start + key % len;
            let r = range_of(&spec, ranges, key);
            prop_assert!(r < ranges);
            prop_assert!(range_keys(&spec, ranges, r).contains(&key), "key {} in range {} = {:?}", key, r, range_keys(&spec, ranges, r));
        }
    }
}
