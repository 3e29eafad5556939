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
//! Run: `cargo bench -p tessera-benches --bench sparse_push` (`-- table_only` prints just the
//! table).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use tessera_engine::arena::Arena;
use tessera_engine::table::{SparseRoom, TablePart};
use tessera_engine::{EngineConfig, UpdaterRegistry};
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

fn part() -> TablePart {
    let mut spec = TableSpec::new("bench", TableKind::Sparse, 0, u64::MAX, 1);
    spec.capacity = FEATURES + FEATURES / 4 + 1024;
    spec.updater = "adagrad".into();
    let cfg = EngineConfig { shards: 1, ..EngineConfig::default() };
    let updater = UpdaterRegistry::new().build(&spec.updater).expect("adagrad exists");
    let mut part = TablePart::new(0, 0, spec, 0..u64::MAX, updater, SparseRoom::ShardShare, &cfg, &mut Arena::default()).expect("the bench table maps");
    // Every feature is in the table, as after the demo's first epoch.
    let all: Vec<u64> = (0..FEATURES).map(hashed).collect();
    for (i, chunk) in all.chunks(1 << 16).enumerate() {
        part.push(chunk, &vec![1e-3; chunk.len()], 0, i as u64 + 1).expect("fill");
    }
    part
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
    let (mut flat, mut table, mut clock) = (Flat::new(), part(), FEATURES);
    let mut best = (Duration::MAX, Duration::MAX);
    for _ in 0..5 {
        best.0 = best.0.min(time(|| (0..10).for_each(|_| round_flat(&mut flat, &batches, &grads, &mut out))));
        best.1 = best.1.min(time(|| (0..10).for_each(|_| round_table(&mut table, &batches, &grads, &mut out, &mut clock))));
    }
    let per_key = |d: Duration| d.as_secs_f64() * 1e9 / (10 * keys) as f64;
    println!(
        "\nsparse push (adagrad) and pull of {} minibatches ({keys} keys): flat array {:.1} ns/key, table {:.1} ns/key, table/flat {:.2}",
        batches.len(),
        per_key(best.0),
        per_key(best.1),
        best.1.as_secs_f64() / best.0.as_secs_f64()
    );
}

fn main() {
    tessera_benches::run(Criterion::default(), bench, print_ratio_table);
}
