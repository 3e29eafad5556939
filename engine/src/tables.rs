//! A shard's tables: per table, its definition and the parts of it the shard holds.
//!
//! A shard holds one part of each table per replication range whose chain its server is in (as
//! a member or a learner; a standalone server is in all of its ranges' chains of one): made when the server joins the chain, or when the table is
//! made while it is in it, and freed when it leaves. A server's memory for a table is then its
//! share of the ranges, so servers that join a cluster add room, not copies.
//!
//! A part freed while a checkpoint is being written stays, retired, until the checkpoint no
//! longer reads it ([`Tables::free_retired`]).
//!
//! Every dense part made, replaced or freed is noted for the shard's transport
//! ([`Tables::exposures`]): workers read dense parts one-sidedly over RDMA, each part by its
//! table and first key.

use std::ops::Range;
use std::sync::Arc;

use tessera_layout::catalog::TableSpec;
use tessera_layout::placement::range_keys;
use tessera_transport::expose::Exposure;

use crate::arena::Arena;
use crate::config::EngineConfig;
use crate::error::{EngineError, Result};
use crate::persist::checkpoint::store::Parts;
use crate::persist::checkpoint::PartManifest;
use crate::table::{SparseRoom, TablePart};
use crate::updater::Updater;

/// One table on a shard.
#[derive(Debug)]
pub struct Table {
    pub spec: TableSpec,
    pub updater: Arc<dyn Updater>,
    /// The keys the catalog places on the shard: the span of the replication ranges it serves.
    pub span: Range<u64>,
    /// The shard's parts, by range (`None` where its server is not in the range's chain).
    parts: Vec<Option<TablePart>>,
}

/// A shard's tables, by table id, and the memory their parts take.
#[derive(Debug)]
pub struct Tables {
    shard: u16,
    cfg: Arc<EngineConfig>,
    arena: Arena,
    /// The cluster's replication ranges.
    ranges: u32,
    tables: Vec<Option<Table>>,
    /// Parts freed while a checkpoint was being written.
    retired: Vec<TablePart>,
    /// Dense parts made, replaced or freed since the transport was last told.
    exposures: Vec<Exposure>,
}

impl Default for Tables {
    fn default() -> Self {
        Self::new(0, Arc::new(EngineConfig::default()), 1)
    }
}

impl Tables {
    /// No tables yet; `ranges` is the cluster's replication ranges.
    pub fn new(shard: u16, cfg: Arc<EngineConfig>, ranges: u32) -> Self {
        Self { shard, cfg, arena: Arena::default(), ranges, tables: Vec::new(), retired: Vec::new(), exposures: Vec::new() }
    }

    /// Changes to the dense parts workers may read, since the last call, for the shard's
    /// transport: a part made or replaced is added, a part freed removed.
    pub fn exposures(&mut self) -> std::vec::Drain<'_, Exposure> {
        self.exposures.drain(..)
    }

    /// Whether there are [`exposures`](Self::exposures) to hand over.
    pub fn exposures_pending(&self) -> bool {
        !self.exposures.is_empty()
    }

    /// Notes a part made, or put in place of another of the same keys.
    fn placed(exposures: &mut Vec<Exposure>, part: &TablePart) {
        if let Some(view) = part.dense_view() {
            exposures.push(Exposure::Add(view));
        }
    }

    /// Notes a part freed.
    fn freed(exposures: &mut Vec<Exposure>, part: &TablePart) {
        if part.spec.kind == tessera_layout::TableKind::Dense {
            exposures.push(Exposure::Remove { table: part.id, start: part.owned().start });
        }
    }

    /// The cluster's replication ranges.
    pub fn ranges(&self) -> u32 {
        self.ranges
    }

    /// Bytes mapped for the parts held, and how many of them are locked.
    pub fn bytes(&self) -> (usize, usize) {
        self.arena.bytes()
    }

    /// Table `id`.
    pub fn get(&self, id: u32) -> Option<&Table> {
        self.tables.get(id as usize)?.as_ref()
    }

    /// Adds table `id`, placed on `span` of this shard, with the parts of the ranges `held`
    /// says its server is in.
    pub fn add(&mut self, id: u32, spec: TableSpec, span: Range<u64>, updater: Arc<dyn Updater>, held: impl Fn(u32) -> bool) -> Result<()> {
        let ranges = self.ranges;
        let mut table = Table { spec, updater, span, parts: Vec::new() };
        table.parts.resize_with(ranges as usize, || None);
        let (shard, cfg, arena) = (self.shard, &self.cfg, &mut self.arena);
        for r in (0..ranges).filter(|r| held(*r)) {
            if let Some(keys) = range_of_span(&table, ranges, r) {
                table.parts[r as usize] = Some(make(arena, cfg, shard, id, &table, keys, SparseRoom::RangeShare { ranges })?);
            }
        }
        table.parts.iter().flatten().for_each(|p| Self::placed(&mut self.exposures, p));
        if self.tables.len() <= id as usize {
            self.tables.resize_with(id as usize + 1, || None);
        }
        self.tables[id as usize] = Some(table);
        Ok(())
    }

    /// Removes table `id` and its parts.
    pub fn remove(&mut self, id: u32) -> Option<Table> {
        let table = self.tables.get_mut(id as usize)?.take()?;
        table.parts.iter().flatten().for_each(|p| Self::freed(&mut self.exposures, p));
        Some(table)
    }

    /// The shard's part of table `id` for `range`.
    pub fn at(&self, id: u32, range: u32) -> Option<&TablePart> {
        self.get(id)?.parts.get(range as usize)?.as_ref()
    }

    /// [`at`](Self::at), mutably.
    pub fn at_mut(&mut self, id: u32, range: u32) -> Option<&mut TablePart> {
        self.tables.get_mut(id as usize)?.as_mut()?.parts.get_mut(range as usize)?.as_mut()
    }

    /// Makes the parts of `range` this shard lacks, at their initial values: its
    /// server is now in the range's chain. Every table's or none.
    pub fn hold(&mut self, range: u32) -> Result<()> {
        let ranges = self.ranges;
        let mut made = Vec::new();
        let (shard, cfg, arena) = (self.shard, &self.cfg, &mut self.arena);
        for (id, table) in self.tables.iter().enumerate() {
            let Some(table) = table.as_ref().filter(|t| t.parts[range as usize].is_none()) else { continue };
            let Some(keys) = range_of_span(table, ranges, range) else { continue };
            made.push(make(arena, cfg, shard, id as u32, table, keys, SparseRoom::RangeShare { ranges })?);
        }
        for part in made {
            Self::placed(&mut self.exposures, &part);
            let table = self.tables[part.id as usize].as_mut().expect("a table just read");
            table.parts[range as usize] = Some(part);
        }
        Ok(())
    }

    /// Frees the parts of `range`: this shard's server left its chain. While a
    /// checkpoint is being written (`checkpointing`), they are kept aside until it ends.
    pub fn release(&mut self, range: u32, checkpointing: bool) {
        for table in self.tables.iter_mut().flatten() {
            if let Some(part) = table.parts.get_mut(range as usize).and_then(Option::take) {
                Self::freed(&mut self.exposures, &part);
                if checkpointing {
                    self.retired.push(part);
                }
            }
        }
    }

    /// Frees the parts retired while a checkpoint was written; call when none is.
    pub fn free_retired(&mut self) {
        self.retired.clear();
    }

    /// The shard's parts of `range`, by table.
    pub fn range_parts(&self, range: u32) -> impl Iterator<Item = &TablePart> {
        self.tables.iter().flatten().filter_map(move |t| t.parts.get(range as usize)?.as_ref())
    }

    /// [`range_parts`](Self::range_parts), mutably.
    pub fn range_parts_mut(&mut self, range: u32) -> impl Iterator<Item = &mut TablePart> {
        self.tables.iter_mut().flatten().filter_map(move |t| t.parts.get_mut(range as usize)?.as_mut())
    }

    /// Every part held, by table and key.
    pub fn parts(&self) -> impl Iterator<Item = &TablePart> {
        self.tables.iter().flatten().flat_map(|t| t.parts.iter().flatten())
    }

    /// Every part held, mutably.
    pub fn parts_mut(&mut self) -> impl Iterator<Item = &mut TablePart> {
        self.tables.iter_mut().flatten().flat_map(|t| t.parts.iter_mut().flatten())
    }

    /// A fresh part for checkpoint entry `m`, for recovery to load into. Refuses one the
    /// catalog does not place here, with the same definition and keys (one range's keys), since loading it would put data where none belongs.
    pub fn part_for_checkpoint(&mut self, m: &PartManifest) -> Result<TablePart> {
        let mismatch = |reason: String| EngineError::Unrecoverable { what: format!("the checkpoint's table {} ({:?})", m.table, m.spec.name), reason };
        let shard = self.shard;
        let Some(table) = self.get(m.table) else {
            return Err(mismatch(format!(
                "the catalog (catalog.json) places no table {} on shard {shard}, so the catalog and the checkpoint disagree (was catalog.json replaced, or lost?)",
                m.table
            )));
        };
        let owned = m.owned.0..m.owned.1;
        if table.spec != m.spec || self.slot_of(table, &owned).is_none() {
            return Err(mismatch(format!("it is {:?} over {owned:?}, the catalog places {:?} over {:?} here", m.spec, table.spec, table.span)));
        }
        let room = SparseRoom::RangeShare { ranges: self.ranges };
        let table = self.tables[m.table as usize].as_ref().expect("just found");
        make(&mut self.arena, &self.cfg, shard, m.table, table, owned, room)
    }

    /// Puts a part loaded from a checkpoint in place of the one it was made for.
    pub fn put(&mut self, part: TablePart) -> Result<()> {
        let slot = self.get(part.id).and_then(|t| self.slot_of(t, &part.owned()));
        let table = self.tables.get_mut(part.id as usize).and_then(Option::as_mut);
        match (table, slot) {
            (Some(table), Some(slot)) => {
                Self::placed(&mut self.exposures, &part);
                table.parts[slot] = Some(part);
                Ok(())
            }
            _ => Err(EngineError::Unrecoverable {
                what: format!("table {}", part.id),
                reason: format!("the checkpoint holds keys {:?}, which shard {} does not place", part.owned(), self.shard),
            }),
        }
    }

    /// Where a part of `keys` goes in `table`: its slot, if the keys are a whole part here.
    fn slot_of(&self, table: &Table, keys: &Range<u64>) -> Option<usize> {
        let ranges = self.ranges;
        if keys.is_empty() || keys.start < table.span.start || keys.end > table.span.end {
            return None;
        }
        let r = tessera_layout::placement::range_of(&table.spec, ranges, keys.start);
        (range_keys(&table.spec, ranges, r) == *keys).then_some(r as usize)
    }
}

/// A fresh part of `table` over `keys`.
fn make(arena: &mut Arena, cfg: &EngineConfig, shard: u16, id: u32, table: &Table, keys: Range<u64>, room: SparseRoom) -> Result<TablePart> {
    TablePart::new(id, shard, table.spec.clone(), keys, table.updater.clone(), room, cfg, arena)
}

/// The keys of `range` when this shard serves it and they are not empty.
fn range_of_span(table: &Table, ranges: u32, range: u32) -> Option<Range<u64>> {
    let keys = range_keys(&table.spec, ranges, range);
    (!keys.is_empty() && table.span.start <= keys.start && keys.end <= table.span.end).then_some(keys)
}

impl Parts for Tables {
    fn part(&mut self, table: u32, start: u64) -> Option<&mut TablePart> {
        // A part retired during the checkpoint is the one it began with.
        if let Some(i) = self.retired.iter().position(|p| p.id == table && p.owned().start == start) {
            return Some(&mut self.retired[i]);
        }
        self.parts_mut().find(|p| p.id == table && p.owned().start == start)
    }

    fn each(&mut self) -> Vec<&mut TablePart> {
        self.parts_mut().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::updater::UpdaterRegistry;
    use tessera_layout::TableKind;

    fn tables(ranges: u32) -> Tables {
        Tables::new(0, Arc::new(EngineConfig { shards: 1, ..EngineConfig::default() }), ranges)
    }

    fn add(t: &mut Tables, id: u32, spec: &TableSpec, held: impl Fn(u32) -> bool) {
        let updater = UpdaterRegistry::new().build(&spec.updater).unwrap();
        t.add(id, spec.clone(), spec.start..spec.end, updater, held).unwrap();
    }

    #[test]
    fn a_replicated_shard_holds_memory_for_its_ranges_only() {
        let dense = TableSpec::new("d", TableKind::Dense, 0, 1 << 16, 4);
        let mut t = tables(8);
        add(&mut t, 0, &dense, |r| r < 2);
        let two = t.bytes().0;
        assert!(two > 0 && t.at(0, 1).is_some() && t.at(0, 2).is_none());
        assert_eq!(t.at(0, 1).unwrap().owned(), range_keys(&dense, 8, 1), "a part holds its range's keys");
        for r in 2..8 {
            t.hold(r).unwrap();
        }
        assert_eq!(t.bytes().0, two * 4, "eight ranges take four times the memory of two");
        for r in 0..6 {
            t.release(r, false);
        }
        assert_eq!(t.bytes().0, two, "freed ranges hold nothing");
        // A part released while a checkpoint is written stays until it is over.
        t.release(6, true);
        assert_eq!(t.bytes().0, two);
        assert!(t.part(0, range_keys(&dense, 8, 6).start).is_some(), "the checkpoint still finds it");
        t.free_retired();
        assert_eq!(t.bytes().0, two / 2);
        // A table made later has parts in the ranges held when it is made.
        let sparse = TableSpec::new("s", TableKind::Sparse, 0, u64::MAX, 2);
        add(&mut t, 1, &sparse, |r| r == 7);
        assert!(t.at(1, 7).is_some() && t.at(1, 6).is_none());
        assert_eq!(t.range_parts(7).count(), 2);
    }

    #[test]
    fn a_checkpoint_part_must_be_one_the_shard_places() {
        let dense = TableSpec::new("d", TableKind::Dense, 0, 1000, 1);
        let mut t = tables(4);
        add(&mut t, 0, &dense, |_| false);
        let manifest =
            |owned: (u64, u64)| PartManifest { table: 0, spec: dense.clone(), owned, step: 0, chunk_slots: 1, clocks: Vec::new(), chunks: Vec::new() };
        let range = range_keys(&dense, 4, 2);
        let part = t.part_for_checkpoint(&manifest((range.start, range.end))).expect("one range's keys");
        t.put(part).unwrap();
        assert!(t.at(0, 2).is_some());
        for bad in [(0, 1000), (range.start, range.end + 1), (range.start + 1, range.end)] {
            assert!(t.part_for_checkpoint(&manifest(bad)).is_err(), "{bad:?} is no range's keys");
        }
    }
}
