//! The simulator's parameters: a few i64 values per range, summed, so that replicas can be
//! compared byte for byte and against the sum of every push.

use std::collections::BTreeMap;

use crate::protocol::RangeId;
use crate::replica::{Recovered, Store};

/// Values per range.
pub const VALUES: usize = 2;

pub fn encode(values: &[i64; VALUES]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn decode(bytes: &[u8]) -> [i64; VALUES] {
    assert_eq!(bytes.len(), VALUES * 8, "a simulated payload is {VALUES} i64s");
    let mut out = [0; VALUES];
    for (o, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *o = i64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    out
}

fn add(into: &mut [i64; VALUES], delta: &[i64; VALUES]) {
    for (a, d) in into.iter_mut().zip(delta) {
        *a = a.wrapping_add(*d);
    }
}

/// A `sum` table of [`VALUES`] values per range, in memory, and on a simulated disk if it
/// has one.
#[derive(Debug, Default, Clone)]
pub struct SimStore {
    pub ranges: BTreeMap<RangeId, [i64; VALUES]>,
    pub disk: Option<SimDisk>,
}

/// What a range's state on disk is: its version, clock and values, and its history digest.
type OnDisk = (u64, Vec<u32>, [i64; VALUES], u32);

/// A disk as a log: writes are numbered, and reach the disk only when it syncs, or at a crash
/// (a prefix of them, the next one torn).
#[derive(Debug, Default, Clone)]
pub struct SimDisk {
    /// Each range's state as the disk holds it.
    pub held: BTreeMap<RangeId, OnDisk>,
    /// Writes since the last sync, in order: a range's new state, or `None` when it was dropped.
    pending: Vec<(u64, RangeId, Option<OnDisk>)>,
    next_lsn: u64,
    synced_lsn: u64,
}

impl SimDisk {
    fn write(&mut self, range: RangeId, state: Option<OnDisk>) -> u64 {
        self.next_lsn += 1;
        self.pending.push((self.next_lsn, range, state));
        self.next_lsn
    }

    /// The first `count` pending writes reach the disk.
    fn land(&mut self, count: usize) {
        for (lsn, range, state) in self.pending.drain(..count.min(self.pending.len())) {
            match state {
                Some(state) => self.held.insert(range, state),
                None => self.held.remove(&range),
            };
            self.synced_lsn = self.synced_lsn.max(lsn);
        }
    }

    /// Writes not yet synced.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl SimStore {
    /// A store whose writes go to a simulated disk.
    pub fn with_disk() -> Self {
        Self { ranges: BTreeMap::new(), disk: Some(SimDisk::default()) }
    }

    /// Everything written so far reaches the disk (a group commit's fsync).
    pub fn sync(&mut self) {
        if let Some(disk) = self.disk.as_mut() {
            disk.land(usize::MAX);
        }
    }

    /// What a restart after a crash finds: the disk, with the first `landed` of the writes not
    /// yet synced on it too (written, but never reported durable) and the rest lost, the first
    /// of those torn. Memory is whatever the disk holds. Without a disk, nothing.
    pub fn crashed(&self, landed: usize) -> Self {
        let Some(disk) = &self.disk else { return Self::default() };
        let mut disk = disk.clone();
        disk.land(landed);
        disk.pending.clear();
        disk.synced_lsn = disk.next_lsn;
        let ranges = disk.held.iter().map(|(r, (_, _, values, _))| (*r, *values)).collect();
        Self { ranges, disk: Some(disk) }
    }
}

impl Store for SimStore {
    fn apply_push(&mut self, range: RangeId, payload: &[u8], delta: &mut Vec<u8>, _forwarded: bool) {
        let push = decode(payload);
        add(self.ranges.entry(range).or_default(), &push);
        let mut sum = if delta.is_empty() { [0; VALUES] } else { decode(delta) };
        add(&mut sum, &push);
        *delta = encode(&sum);
    }

    fn apply_delta(&mut self, range: RangeId, delta: &[u8]) -> Result<(), String> {
        add(self.ranges.entry(range).or_default(), &decode(delta));
        Ok(())
    }

    fn snapshot(&self, range: RangeId) -> Vec<u8> {
        encode(&self.ranges.get(&range).copied().unwrap_or_default())
    }

    fn install(&mut self, range: RangeId, data: &[u8]) -> Result<(), String> {
        self.ranges.insert(range, decode(data));
        Ok(())
    }

    fn drop_range(&mut self, range: RangeId) {
        self.ranges.remove(&range);
        if let Some(disk) = self.disk.as_mut() {
            disk.write(range, None);
        }
    }

    fn persist(&mut self, range: RangeId, version: u64, digest: u32, clock: &[u32], _bytes: &[u8], whole: bool) -> u64 {
        let values = self.ranges.get(&range).copied().unwrap_or_default();
        let Some(disk) = self.disk.as_mut() else { return 0 };
        let lsn = disk.write(range, Some((version, clock.to_vec(), values, digest)));
        if whole && version == 0 {
            // A range born empty: it exists once its table does, and a server syncs a new
            // table's definition before it serves it.
            disk.land(usize::MAX);
        }
        lsn
    }

    fn durable_lsn(&self) -> u64 {
        self.disk.as_ref().map_or(0, |disk| disk.synced_lsn)
    }

    fn recovered(&self) -> Vec<Recovered> {
        let Some(disk) = &self.disk else { return Vec::new() };
        let found = disk.held.iter().map(|(range, (version, clock, _, digest))| (*range, *version, clock.clone(), *digest));
        found.map(|(range, version, clock, digest)| Recovered { range, version, clock, digest: Some(digest) }).collect()
    }
}
