//! The simulator's parameters: a few i64 values per range, summed, so that replicas can be
//! compared byte for byte and against the sum of every push.

use std::collections::BTreeMap;

use crate::protocol::RangeId;
use crate::replica::Store;

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

/// A `sum` table of [`VALUES`] values per range.
#[derive(Debug, Default, Clone)]
pub struct SimStore {
    pub ranges: BTreeMap<RangeId, [i64; VALUES]>,
}

impl Store for SimStore {
    fn apply_push(&mut self, range: RangeId, payload: &[u8], delta: &mut Vec<u8>) {
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
    }
}
