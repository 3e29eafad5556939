//! Key-range placement: which shard owns each key of a table.
//!
//! A cluster cuts each table into replication ranges, places each range on a chain of servers
//! (the coordinator's ring), and gives each range to one shard of every server in its chain. A
//! standalone server splits each table into equal contiguous parts, one per shard. Sparse tables
//! hold hashed keys, which are spread evenly over the key space, so equal ranges carry equal
//! load.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::catalog::{Catalog, Part, TableSpec};
use crate::error::{LayoutError, Result};

/// Splits `range` into `n` contiguous, nearly equal, non-empty parts (fewer if it has fewer keys).
pub fn split(range: Range<u64>, n: u64) -> Vec<Range<u64>> {
    assert!(n > 0, "split into at least one part");
    let len = (range.end - range.start) as u128;
    let n = (n as u128).min(len.max(1));
    (0..n)
        .map(|i| {
            let lo = range.start as u128 + len * i / n;
            let hi = range.start as u128 + len * (i + 1) / n;
            lo as u64..hi as u64
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// The parts of `spec` a standalone server's shards own: the table split into `shards` parts.
pub fn shard_parts(spec: &TableSpec, shards: u16) -> Vec<Part> {
    assert!(shards > 0);
    split(spec.start..spec.end, shards as u64).into_iter().enumerate().map(|(shard, r)| Part { start: r.start, end: r.end, shard: shard as u16 }).collect()
}

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

/// Who owns one part: its shard, and the table's id on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub shard: u16,
    pub table_id: u32,
}

/// One table's parts in key order.
#[derive(Debug, Clone)]
pub struct Route {
    pub spec: TableSpec,
    starts: Vec<u64>,
    ends: Vec<u64>,
    owners: Vec<Owner>,
}

impl Route {
    /// The part holding `key`, or `None` when the key is outside the table.
    pub fn locate(&self, key: u64) -> Option<usize> {
        if key < self.spec.start || key >= self.spec.end {
            return None;
        }
        Some(self.starts.partition_point(|s| *s <= key) - 1)
    }

    /// Who owns part `i`.
    pub fn owner(&self, i: usize) -> Owner {
        self.owners[i]
    }

    /// The keys of part `i`.
    pub fn range(&self, i: usize) -> Range<u64> {
        self.starts[i]..self.ends[i]
    }

    /// The route of a replicated cluster's table `id`: one part, the whole table. Its chains,
    /// not its parts, say where keys live (the client routes each replication range to its
    /// chain's head or tail), so the owner is a placeholder.
    pub fn replicated(spec: TableSpec, id: u32) -> Route {
        let owner = Owner { shard: 0, table_id: id };
        Route { starts: vec![spec.start], ends: vec![spec.end], owners: vec![owner], spec }
    }

    /// Number of parts.
    pub fn parts(&self) -> usize {
        self.starts.len()
    }
}

/// Every table's route on a standalone server, from its catalog.
#[derive(Debug, Clone, Default)]
pub struct RangeMap {
    tables: BTreeMap<String, Route>,
}

impl RangeMap {
    /// Reads `catalog` and checks that each table's parts cover its range exactly once.
    pub fn from_catalog(catalog: &Catalog) -> Result<Self> {
        let mut tables = BTreeMap::new();
        for entry in &catalog.tables {
            let mut parts = entry.parts.clone();
            parts.sort_by_key(|p| p.start);
            let route = Route {
                starts: parts.iter().map(|p| p.start).collect(),
                ends: parts.iter().map(|p| p.end).collect(),
                owners: parts.iter().map(|p| Owner { shard: p.shard, table_id: entry.id }).collect(),
                spec: entry.spec.clone(),
            };
            check_cover(&route)?;
            tables.insert(entry.spec.name.clone(), route);
        }
        Ok(Self { tables })
    }

    /// The route of table `name`.
    pub fn table(&self, name: &str) -> Result<&Route> {
        self.tables.get(name).ok_or_else(|| LayoutError::UnknownTable { name: name.into() })
    }

    /// All tables, by name.
    pub fn tables(&self) -> impl Iterator<Item = &Route> {
        self.tables.values()
    }
}

fn check_cover(route: &Route) -> Result<()> {
    let table = route.spec.name.clone();
    let mut next = route.spec.start;
    for i in 0..route.parts() {
        let r = route.range(i);
        if r.start > next {
            return Err(LayoutError::Gap { table, start: next, end: r.start });
        }
        if r.start < next {
            return Err(LayoutError::Overlap { table, key: r.start });
        }
        next = r.end;
    }
    if next != route.spec.end {
        return Err(LayoutError::Gap { table, start: next, end: route.spec.end });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{TableEntry, TableKind};
    use proptest::prelude::*;

    fn catalog(spec: &TableSpec, shards: u16) -> Catalog {
        Catalog { tables: vec![TableEntry { id: 7, spec: spec.clone(), parts: shard_parts(spec, shards) }] }
    }

    #[test]
    fn whole_key_space_splits_without_overflow() {
        let parts = split(0..u64::MAX, 3);
        assert_eq!(parts.first().unwrap().start, 0);
        assert_eq!(parts.last().unwrap().end, u64::MAX);
        assert_eq!(split(10..12, 5).len(), 2, "never more parts than keys");
    }

    #[test]
    fn a_missing_or_doubled_part_is_refused() {
        let spec = TableSpec::new("t", TableKind::Dense, 0, 1000, 1);
        let whole = catalog(&spec, 4);
        let map = RangeMap::from_catalog(&whole).unwrap();
        let route = map.table("t").unwrap();
        assert_eq!(route.parts(), 4);
        assert_eq!(route.owner(route.locate(999).unwrap()), Owner { shard: 3, table_id: 7 });
        assert_eq!(route.locate(1000), None);
        let mut gap = whole.clone();
        gap.tables[0].parts.remove(2);
        assert!(matches!(RangeMap::from_catalog(&gap), Err(LayoutError::Gap { .. })));
        let mut twice = whole.clone();
        let first = twice.tables[0].parts[0];
        twice.tables[0].parts.push(first);
        assert!(matches!(RangeMap::from_catalog(&twice), Err(LayoutError::Overlap { .. })));
    }

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

        #[test]
        fn every_key_has_exactly_one_owner(start in 0u64..1000, len in 1u64..100_000, shards in 1u16..9, key in any::<u64>()) {
            let spec = TableSpec::new("t", TableKind::Dense, start, start + len, 1);
            let map = RangeMap::from_catalog(&catalog(&spec, shards)).unwrap();
            let route = map.table("t").unwrap();
            let key = start + key % len;
            let i = route.locate(key).unwrap();
            prop_assert!(route.range(i).contains(&key));
        }
    }
}
