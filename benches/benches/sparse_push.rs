//! A sparse push (Adagrad) and pull of a minibatch's keys on a table larger than the cache, as
//! the demo's server shards apply them, against a baseline measured in the same run: the same
//! keys' values added into, and read from, a flat array of the table's size at each key's home
//! slot. The baseline touches the same number of cache lines at random without any probing; the
//! ratio says what the hash table's probes, records and updater cost beyond those misses.
//!
//! Keys are 1,500 per push (50 examples of 30 features), drawn uniformly from 1,000,000 hashed
//! features (the demo draws them by a power law, so most of its keys are hot in the cache),
//! into a table with room for 1,251,024 keys (the demo's): 2^21 slots, 32 MiB of keys and
//! records, as large as this machine's L3 cache.
//!
//! A replicated server holds one part per replication range instead: the same keys in 16 parts
//! of a sixteenth each (`range_parts`), each 2 MiB of keys and records.
//!
//! Run: `cargo bench -p tessera-benches --bench sparse_push` (`-- table_only` prints just the
//! table).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use tessera_engine::arena::Arena;
use tessera_engine::table::{SparseRoom, TablePart};
use tessera_engine::{EngineConfig, UpdaterRegistry};
use tessera_layout::placement::range_keys;
use tessera_layout::{TableKind, TableSpec};

const FEATURES: u64 = 1_000_000;
const KEYS_PER_PUSH: usize = 1_500;
/// Minibatches in one measured round: each is pushed, then pulled.
const BATCHES: usize = 64;

/// A feature's key: hashed over the key space, as a feature pipeline's keys are.
fn hashed(feature: u64) -> u64 {
    feature.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31) ^ 0xD6E8_FEB8_6659_FD93
}

/// `BATCHES` sorted, distinct key lists of about `KEYS_PER_PUSH` keys each (seeded, so every
/// run draws the same).
fn batches() -> Vec<Vec<u64>> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..BATCHES)
        .map(|_| {
            let mut keys: Vec<u64> = (0..KEYS_PER_PUSH).map(|_| hashed(next() % FEATURES)).collect();
            keys.sort_unstable();
            keys.dedup();
            keys
        })
        .collect()
}

/// Replication ranges of [`RangeParts`].
const RANGES: u32 = 16;

fn spec() -> TableSpec {
    let mut spec = TableSpec::new("bench", TableKind::Sparse, 0, u64::MAX, 1);
    spec.capacity = FEATURES + FEATURES / 4 + 1024;
    spec.updater = "adagrad".into();
    spec
}

fn part_of(owned: std::ops::Range<u64>, room: SparseRoom) -> TablePart {
    let spec = spec();
    let cfg = EngineConfig { shards: 1, ..EngineConfig::default() };
    let updater = UpdaterRegistry::new().build(&spec.updater).expect("adagrad exists");
    TablePart::new(0, 0, spec, owned, updater, room, &cfg, &mut Arena::default()).expect("the bench table maps")
}

/// Every feature's key, sorted, as the table holds them after the demo's first epoch.
fn all_keys() -> Vec<u64> {
    let mut all: Vec<u64> = (0..FEATURES).map(hashed).collect();
    all.sort_unstable();
    all
}

fn part() -> TablePart {
    let mut part = part_of(0..u64::MAX, SparseRoom::Whole);
    for (i, chunk) in all_keys().chunks(1 << 16).enumerate() {
        part.push(chunk, &vec![1e-3; chunk.len()], 0, i as u64 + 1).expect("fill");
    }
    part
}

/// The table as a replicated server holds it: one part per range, each pushed and pulled the
/// run of a (sorted) minibatch's keys in its range.
struct RangeParts {
    parts: Vec<TablePart>,
    /// Each part's first key.
    starts: Vec<u64>,
}

impl RangeParts {
    fn new() -> Self {
        let spec = spec();
        let owned: Vec<_> = (0..RANGES).map(|r| range_keys(&spec, RANGES, r)).collect();
        let mut parts = RangeParts {
            parts: owned.iter().map(|o| part_of(o.clone(), SparseRoom::RangeShare { ranges: RANGES })).collect(),
            starts: owned.iter().map(|o| o.start).collect(),
        };
        for (i, chunk) in all_keys().chunks(1 << 16).enumerate() {
            parts.push(chunk, &vec![1e-3; chunk.len()], i as u64 + 1);
        }
        parts
    }

    /// Calls `each(part, keys)` for each part's run of the sorted `keys`, and where it starts.
    fn runs(&mut self, keys: &[u64], mut each: impl FnMut(&mut TablePart, &[u64], usize)) {
        let mut at = 0;
        while at < keys.len() {
            let r = self.starts.partition_point(|s| *s <= keys[at]) - 1;
            let end = self.starts.get(r + 1).map_or(keys.len(), |next| at + keys[at..].partition_point(|k| k < next));
            each(&mut self.parts[r], &keys[at..end], at);
            at = end;
        }
    }

    fn push(&mut self, keys: &[u64], grads: &[f32], clock: u64) {
        self.runs(keys, |part, run, at| {
            part.push(run, &grads[at..at + run.len()], 0, clock).expect("push");
        });
    }

    fn pull(&mut self, keys: &[u64], out: &mut [f32]) {
        self.runs(keys, |part, run, at| part.pull(run, &mut out[at..at + run.len()]));
    }
}

fn round_ranges(parts: &mut RangeParts, batches: &[Vec<u64>], grads: &[f32], out: &mut [f32], clock: &mut u64) {
    for keys in batches {
        *clock += 1;
        parts.push(keys, &grads[..keys.len()], *clock);
        parts.pull(keys, &mut out[..keys.len()]);
        black_box(&out);
    }
}

/// The baseline: each key's value added into, then read from, a flat array as large as the
/// table, at the key's home slot.
struct Flat {
    values: Vec<f32>,
    shift: u32,
}

impl Flat {
    fn new() -> Self {
        let slots = 1usize << 21;
        // Values and Adagrad's accumulator, as the table's records hold them.
        Flat { values: vec![0.0; slots * 2], shift: 64 - slots.trailing_zeros() }
    }

    fn push(&mut self, keys: &[u64], grads: &[f32]) {
        for (k, g) in keys.iter().zip(grads) {
            let at = (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize * 2;
            self.values[at] += g;
            self.values[at + 1] += g * g;
        }
    }

    fn pull(&self, keys: &[u64], out: &mut [f32]) {
        for (k, o) in keys.iter().zip(out) {
            *o = self.values[(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize * 2];
        }
    }
}

/// One round: every batch pushed, then pulled.
fn round_table(part: &mut TablePart, batches: &[Vec<u64>], grads: &[f32], out: &mut [f32], clock: &mut u64) {
    for keys in batches {
        *clock += 1;
        part.push(keys, &grads[..keys.len()], 0, *clock).expect("push");
        part.pull(keys, &mut out[..keys.len()]);
        black_box(&out);
    }
}

fn round_flat(flat: &mut Flat, batches: &[Vec<u64>], grads: &[f32], out: &mut [f32]) {
    for keys in batches {
        flat.push(keys, &grads[..keys.len()]);
        flat.pull(keys, &mut out[..keys.len()]);
        black_box(&out);
    }
}

fn bench(criterion: &mut Criterion) {
    let batches = batches();
    let keys: usize = batches.iter().map(Vec::len).sum();
    let grads = vec![1e-3f32; KEYS_PER_PUSH];
    let mut out = vec![0f32; KEYS_PER_PUSH];
    let mut group = criterion.benchmark_group("sparse_push_pull");
    group.sampling_mode(SamplingMode::Flat).throughput(Throughput::Elements(keys as u64));
    let mut flat = Flat::new();
    group.bench_function("flat_array", |b| b.iter(|| round_flat(&mut flat, &batches, &grads, &mut out)));
    let mut table = part();
    let mut clock = FEATURES;
    group.bench_function("adagrad_table", |b| b.iter(|| round_table(&mut table, &batches, &grads, &mut out, &mut clock)));
    drop(table);
    let mut parts = RangeParts::new();
    group.bench_function("range_parts", |b| b.iter(|| round_ranges(&mut parts, &batches, &grads, &mut out, &mut clock)));
    group.finish();
}

fn time(work: impl FnOnce()) -> Duration {
    let t = Instant::now();
    work();
    t.elapsed()
}

/// Best of five rounds of ten, the baseline and the table alternating.
fn print_ratio_table() {
    let batches = batches();
    let keys: usize = batches.iter().map(Vec::len).sum();
    let grads = vec![1e-3f32; KEYS_PER_PUSH];
    let mut out = vec![0f32; KEYS_PER_PUSH];
    let (mut flat, mut table, mut parts, mut clock) = (Flat::new(), part(), RangeParts::new(), FEATURES);
    let mut best = (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..5 {
        best.0 = best.0.min(time(|| (0..10).for_each(|_| round_flat(&mut flat, &batches, &grads, &mut out))));
        best.1 = best.1.min(time(|| (0..10).for_each(|_| round_table(&mut table, &batches, &grads, &mut out, &mut clock))));
        best.2 = best.2.min(time(|| (0..10).for_each(|_| round_ranges(&mut parts, &batches, &grads, &mut out, &mut clock))));
    }
    let per_key = |d: Duration| d.as_secs_f64() * 1e9 / (10 * keys) as f64;
    let ratio = |d: Duration| d.as_secs_f64() / best.0.as_secs_f64();
    println!(
        "\nsparse push (adagrad) and pull of {} minibatches ({keys} keys): flat array {:.1} ns/key, table {:.1} ns/key ({:.2}x flat), {RANGES} range parts {:.1} ns/key ({:.2}x flat)",
        batches.len(),
        per_key(best.0),
        per_key(best.1),
        ratio(best.1),
        per_key(best.2),
        ratio(best.2),
    );
}

fn main() {
    tessera_benches::run(Criterion::default(), bench, print_ratio_table);
}
