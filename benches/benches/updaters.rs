//! Throughput of the server-side updaters against a `memcpy` baseline measured in the same run.
//!
//! Expectation: `sum` and `sgd` run at ≥ 0.6× memcpy bandwidth and `adam` at ≥ 0.3×, measured as bytes of the
//! value array per second. Memcpy moves two streams (read source, write destination) or three when its stores
//! read the destination line first; `sum` and `sgd` move three (read value and gradient, write value), so once
//! memory-bound they land between 2/3 and 1. Adam moves seven (value, m and v read and written, gradient read):
//! between 2/7 and 3/7. While the arrays fit in cache, Adam, Adagrad and FTRL are bound instead by the square root
//! and division per element (FTRL: two roots), which the baseline x86-64 target (SSE2, 4 lanes) runs at a few
//! cycles per element.
//!
//! Each buffer size (1, 4, 16, 64 MiB of f32 values) is one criterion group holding `memcpy` and every builtin.
//! After criterion, the bench prints each updater's ratio to memcpy per size, timed again here with `Instant`
//! (best of several repetitions, memcpy and kernel alternating on the same buffers) so the README can quote it.
//!
//! Run: `cargo bench -p tessera-benches --bench updaters`. Arguments after `--` filter criterion's benchmarks
//! (`-- adam`); the ratio table always covers every updater, so `-- table_only` prints just the table.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use tessera_engine::updater::{Updater, UpdaterRegistry};

/// Value-array sizes: from cache-resident to well past a 32 MiB L3.
const SIZES_MIB: [usize; 4] = [1, 4, 16, 64];
/// Every builtin, with its default parameters.
const SPECS: [&str; 6] = ["sum", "assign", "sgd", "adagrad", "adam", "ftrl"];
/// Bytes the ratio table moves per kernel, so small sizes get enough repetitions to beat timer noise.
const TABLE_BYTES_PER_KERNEL: usize = 512 << 20;

/// A value array with its state slots and gradient, plus a memcpy source and destination of the same size.
struct Buffers {
    value: Vec<f32>,
    s0: Vec<f32>,
    s1: Vec<f32>,
    grad: Vec<f32>,
    copy_to: Vec<f32>,
    step: u64,
}

impl Buffers {
    /// Fills every buffer with nonzero values, so pages are resident before timing and nothing runs on
    /// subnormals; gradients stay small so repeated updates stay finite.
    fn new(bytes: usize) -> Self {
        let len = bytes / size_of::<f32>();
        let grad = (0..len).map(|i| ((i % 17) as f32 - 8.5) * 1e-3).collect();
        Self { value: vec![1.0; len], s0: vec![0.0; len], s1: vec![0.0; len], grad, copy_to: vec![0.0; len], step: 0 }
    }

    /// Gives the updater fresh state, as a new table would have.
    fn reset(&mut self, updater: &dyn Updater) {
        self.s0.fill(updater.state_init(0));
        self.s1.fill(updater.state_init(1));
        self.value.fill(1.0);
        self.step = 0;
    }

    /// The baseline: copy as many bytes as the value array holds.
    fn memcpy(&mut self) {
        self.copy_to.copy_from_slice(black_box(&self.grad));
        black_box(&mut self.copy_to);
    }

    /// One push over the whole array, passing empty slices for unused state slots as the engine does.
    fn update(&mut self, updater: &dyn Updater) {
        self.step += 1;
        let slots = updater.state_slots();
        let s0: &mut [f32] = if slots >= 1 { &mut self.s0 } else { &mut [] };
        let s1: &mut [f32] = if slots >= 2 { &mut self.s1 } else { &mut [] };
        updater.update(black_box(&mut self.value), s0, s1, black_box(&self.grad), self.step);
    }
}

/// Every builtin with default parameters, built through the registry as a table definition would.
fn builtins() -> Vec<(&'static str, Arc<dyn Updater>)> {
    let registry = UpdaterRegistry::new();
    SPECS.iter().map(|spec| (*spec, registry.build(spec).expect("builtin specs are valid"))).collect()
}

/// One criterion group per size: memcpy first, then every builtin, throughput in value-array bytes.
fn bench_updaters(criterion: &mut Criterion, updaters: &[(&str, Arc<dyn Updater>)]) {
    for mib in SIZES_MIB {
        let bytes = mib << 20;
        let mut buffers = Buffers::new(bytes);
        let mut group = criterion.benchmark_group(format!("updaters_{mib}MiB"));
        // Flat sampling: a 64 MiB Adam pass takes tens of milliseconds, too long for linear sampling's ramp.
        group.sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes(bytes as u64));
        group.bench_function("memcpy", |b| b.iter(|| buffers.memcpy()));
        for (name, updater) in updaters {
            buffers.reset(&**updater);
            group.bench_function(*name, |b| b.iter(|| buffers.update(&**updater)));
        }
        group.finish();
    }
}

/// Time of one run of `work`.
fn time(work: impl FnOnce()) -> Duration {
    let start = Instant::now();
    work();
    start.elapsed()
}

/// Best-of-`repetitions` times of memcpy and of one updater, alternating the two so that both see the same load
/// on a shared machine. One untimed round first warms caches and TLB.
fn best_pair(buffers: &mut Buffers, updater: &dyn Updater, repetitions: usize) -> (Duration, Duration) {
    buffers.reset(updater);
    buffers.memcpy();
    buffers.update(updater);
    let (mut memcpy, mut kernel) = (Duration::MAX, Duration::MAX);
    for _ in 0..repetitions {
        memcpy = memcpy.min(time(|| buffers.memcpy()));
        kernel = kernel.min(time(|| buffers.update(updater)));
    }
    (memcpy, kernel)
}

/// Prints each updater's bandwidth as a fraction of memcpy's, per size (1.00 = memcpy speed).
fn print_ratio_table(updaters: &[(&str, Arc<dyn Updater>)]) {
    println!("\nratio to memcpy (value-array bytes/s over memcpy bytes/s, best of N each, higher is better)");
    print!("{:>6} {:>12}", "size", "memcpy GB/s");
    for (name, _) in updaters {
        print!(" {name:>8}");
    }
    println!();
    for mib in SIZES_MIB {
        let bytes = mib << 20;
        let repetitions = (TABLE_BYTES_PER_KERNEL / bytes).max(5);
        let mut buffers = Buffers::new(bytes);
        let mut memcpy_best = Duration::MAX;
        let mut ratios = Vec::with_capacity(updaters.len());
        for (_, updater) in updaters {
            let (memcpy, kernel) = best_pair(&mut buffers, &**updater, repetitions);
            memcpy_best = memcpy_best.min(memcpy);
            ratios.push(memcpy.as_secs_f64() / kernel.as_secs_f64());
        }
        print!("{:>6} {:>12.1}", format!("{mib}MiB"), bytes as f64 / memcpy_best.as_secs_f64() / 1e9);
        for ratio in ratios {
            print!(" {ratio:>8.2}");
        }
        println!();
    }
}

fn main() {
    let updaters = builtins();
    let criterion = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    tessera_benches::run(criterion, |c| bench_updaters(c, &updaters), || print_ratio_table(&updaters));
}
