//! A dense `push_range` through the versioned, stamped blocks that one-sided reads need, against a
//! `memcpy` of the same bytes measured in the same run, at several `dense_block_bytes`.
//!
//! Expectation: `sum` over the blocks stays near the speed of the plain `sum` kernel on one
//! buffer (0.6x memcpy or better, as in the `updaters` bench) while blocks are large; every block
//! adds two version writes, two release fences, one updater call and one stamp, so small blocks
//! cost more per byte. The table printed after criterion gives each block size's ratio to memcpy.
//!
//! Run: `cargo bench -p tessera-benches --bench dense_push` (`-- table_only` prints just the table).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use tessera_engine::arena::Arena;
use tessera_engine::table::{SparseRoom, TablePart};
use tessera_engine::{EngineConfig, UpdaterRegistry};
use tessera_layout::{TableKind, TableSpec};

/// Push sizes in bytes of f32 values.
const PUSH_BYTES: [usize; 2] = [64 << 10, 1 << 20];
const BLOCK_BYTES: [usize; 4] = [256, 512, 4096, 65536];
/// Bytes each ratio-table measurement moves, so small pushes repeat enough to beat timer noise.
const TABLE_BYTES: usize = 256 << 20;

fn part(block_bytes: usize, keys: u64) -> TablePart {
    let cfg = EngineConfig { dense_block_bytes: block_bytes, ..EngineConfig::default() };
    let spec = TableSpec::new("bench", TableKind::Dense, 0, keys, 1);
    let updater = UpdaterRegistry::new().build("sum").expect("sum exists");
    TablePart::new(0, 0, spec, 0..keys, updater, SparseRoom::Whole, &cfg, &mut Arena::default()).expect("the bench table maps")
}

fn bench(criterion: &mut Criterion) {
    for bytes in PUSH_BYTES {
        let n = bytes / 4;
        let grads = vec![1e-3f32; n];
        let mut dst = vec![0f32; n];
        let mut group = criterion.benchmark_group(format!("dense_push_{}KiB", bytes >> 10));
        group.sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes(bytes as u64));
        group.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(black_box(&grads))));
        for block in BLOCK_BYTES {
            let mut p = part(block, n as u64);
            group.bench_function(format!("sum_blocks_{block}B"), |b| b.iter(|| p.push_range(0, n, black_box(&grads), 0, 1).expect("push")));
        }
        group.finish();
    }
}

fn time(reps: usize, mut work: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..reps {
        work();
    }
    t.elapsed()
}

/// Best of five rounds, memcpy and the push alternating on the same buffers.
fn print_ratio_table() {
    println!("\ndense push_range (sum) over blocks, ratio to memcpy of the same bytes (1.0 = as fast):");
    for bytes in PUSH_BYTES {
        let n = bytes / 4;
        let reps = TABLE_BYTES / bytes;
        let grads = vec![1e-3f32; n];
        let mut dst = vec![0f32; n];
        print!("{:>6} KiB push:", bytes >> 10);
        for block in BLOCK_BYTES {
            let mut p = part(block, n as u64);
            let mut best = (Duration::MAX, Duration::MAX);
            for _ in 0..5 {
                best.0 = best.0.min(time(reps, || dst.copy_from_slice(black_box(&grads))));
                best.1 = best.1.min(time(reps, || {
                    p.push_range(0, n, black_box(&grads), 0, 1).expect("push");
                }));
            }
            print!("  {block} B blocks {:.2}", best.0.as_secs_f64() / best.1.as_secs_f64());
        }
        println!();
    }
}

fn main() {
    tessera_benches::run(Criterion::default(), bench, print_ratio_table);
}
