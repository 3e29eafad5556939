//! Benchmarks live in benches/; this is what their `main`s share.

use criterion::Criterion;

/// A bench's `main`: runs the criterion benchmarks in `bench` (unless `table_only` is passed),
/// then, under `cargo bench` (which passes `--bench`), prints the ratio table. `cargo test
/// --benches` passes neither, and only wants a quick smoke run of the benchmarks.
pub fn run(criterion: Criterion, bench: impl FnOnce(&mut Criterion), print_ratio_table: impl FnOnce()) {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "table_only") {
        let mut criterion = criterion.configure_from_args();
        bench(&mut criterion);
        criterion.final_summary();
    }
    if args.iter().any(|a| a == "--bench") {
        print_ratio_table();
    }
}
