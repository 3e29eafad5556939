//! Tests of table parts: round trips through every updater path, initial values, refusals that
//! must leave the part exactly as it was, non-finite skipping, and vector-clock stamps.

use super::*;
use crate::updater::UpdaterRegistry;

/// Builds one part of `spec` owning `owned`, with its updater built from the spec.
fn part_with(spec: &TableSpec, owned: Range<u64>, cfg: &EngineConfig) -> TablePart {
    let updater = UpdaterRegistry::new().build(&spec.updater).expect("the test's updater spec is valid");
    let mut arena = Arena::default();
    TablePart::new(7, 3, spec.clone(), owned, updater, SparseRoom::Whole, cfg, &mut arena).expect("the test's table maps")
}

fn part(spec: &TableSpec, owned: Range<u64>) -> TablePart {
    part_with(spec, owned, &EngineConfig::default())
}

fn dense(start: u64, end: u64, dim: u32, updater: &str) -> TableSpec {
    let mut spec = TableSpec::new("t", TableKind::Dense, start, end, dim);
    spec.updater = updater.into();
    spec
}

/// A sparse table over the whole key space with a small capacity, so the part maps little memory.
fn sparse(dim: u32, updater: &str) -> TableSpec {
    let mut spec = TableSpec::new("s", TableKind::Sparse, 0, u64::MAX, dim);
    spec.updater = updater.into();
    spec.capacity = 1000;
    spec
}

fn pull_keys(p: &mut TablePart, keys: &[u64]) -> Vec<f32> {
    p.check_pull(keys).expect("the test pulls keys the part owns");
    let mut out = vec![f32::NAN; keys.len() * p.spec.dim as usize];
    p.pull(keys, &mut out);
    out
}

fn pull_range(p: &mut TablePart, start: u64, count: usize) -> Vec<f32> {
    p.check_pull_range(start, count).expect("the test pulls a range the part owns");
    let mut out = vec![f32::NAN; count * p.spec.dim as usize];
    p.pull_range(start, count, &mut out);
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Everything a part holds, read straight from its private state, so "a refusal changes nothing"
/// is checked on the memory itself and not only through pulls.
#[derive(Debug, PartialEq)]
struct Snapshot {
    arrays: Vec<Vec<u32>>,
    sparse_keys: Vec<u64>,
    sparse_len: usize,
    step: u64,
    stats: String,
    segments: Vec<(Range<u64>, Vec<u64>)>,
    workers_seen: usize,
}

fn snapshot(p: &TablePart) -> Snapshot {
    let (arrays, sparse_keys, sparse_len) = match &p.store {
        Store::Dense(d) => {
            let blocks = bits(bytemuck::cast_slice(d.blocks.words()));
            (vec![blocks, bits(d.s0.as_slice()), bits(d.s1.as_slice())], Vec::new(), 0)
        }
        Store::Sparse(sp) => (vec![bits(sp.records())], sp.keys().to_vec(), sp.len),
    };
    Snapshot {
        arrays,
        sparse_keys,
        sparse_len,
        step: p.step,
        stats: format!("{:?}", p.stats()),
        segments: p.clocks().segments().map(|(r, c)| (r, c.to_vec())).collect(),
        workers_seen: p.clocks().workers_seen(),
    }
}

/// Runs `refused`, checks it fails with an error `expect` accepts, and that the part is unchanged.
fn assert_refused(p: &mut TablePart, what: &str, expect: impl Fn(&EngineError) -> bool, refused: impl FnOnce(&mut TablePart) -> Result<Range<u64>>) {
    let before = snapshot(p);
    match refused(p) {
        Ok(r) => panic!("{what}: accepted (span {r:?}), expected a refusal"),
        Err(e) => assert!(expect(&e), "{what}: wrong error {e:?}"),
    }
    assert_eq!(snapshot(p), before, "{what}: the refusal changed the part");
    p.clocks().check_invariants();
}

// -------------------------------------------------------------------------------------------------
// Dense round trips
// -------------------------------------------------------------------------------------------------

#[test]
fn dense_push_range_and_pull_range_sum_exactly() {
    let spec = dense(100, 300, 3, "sum");
    let mut p = part(&spec, 150..250);
    assert_eq!(pull_range(&mut p, 150, 100), vec![0.0; 300], "a fresh dense part is zero");
    let g1: Vec<f32> = (0..30).map(|i| 0.1 * i as f32 + 1e-3).collect();
    let g2: Vec<f32> = (0..60).map(|i| -0.37 * i as f32 + 7.25).collect();
    assert_eq!(p.push_range(160, 10, &g1, 0, 1).unwrap(), 160..170);
    assert_eq!(p.push_range(165, 20, &g2, 0, 2).unwrap(), 165..185);

    let mut want = vec![0f32; 300];
    for (i, g) in g1.iter().enumerate() {
        want[(160 - 150) * 3 + i] += g;
    }
    for (i, g) in g2.iter().enumerate() {
        want[(165 - 150) * 3 + i] += g;
    }
    assert_eq!(bits(&pull_range(&mut p, 150, 100)), bits(&want), "whole part");
    assert_eq!(bits(&pull_range(&mut p, 168, 5)), bits(&want[18 * 3..23 * 3]), "a middle slice");
    // The same keys through the key-list pull, in a shuffled order with a duplicate.
    let keys = [249, 150, 166, 166, 184];
    let got = pull_keys(&mut p, &keys);
    for (i, k) in keys.iter().enumerate() {
        let at = (*k - 150) as usize * 3;
        assert_eq!(bits(&got[i * 3..i * 3 + 3]), bits(&want[at..at + 3]), "key {k}");
    }
    let s = p.stats();
    assert_eq!((s.pushes, s.keys_pushed), (2, 30));
    assert_eq!((s.pulls, s.keys_pulled), (4, 100 + 100 + 5 + 5));
}

#[test]
fn dense_push_of_a_key_list_applies_each_key_and_duplicates_twice() {
    let spec = dense(0, 64, 2, "sum");
    let mut p = part(&spec, 0..64);
    let keys = [9, 3, 63, 3, 0];
    let grads = [1.5, -2.0, 0.25, 8.0, 100.0, 200.0, 0.5, 0.125, -7.0, 3.0];
    assert_eq!(p.push(&keys, &grads, 1, 4).unwrap(), 0..64, "the span covers the lowest and highest key");
    let got = pull_range(&mut p, 0, 64);
    let mut want = vec![0f32; 128];
    for (i, k) in keys.iter().enumerate() {
        for c in 0..2 {
            want[*k as usize * 2 + c] += grads[i * 2 + c];
        }
    }
    assert_eq!(want[6..8], [0.25 + 0.5, 8.0 + 0.125], "the duplicate key 3 got both gradients");
    assert_eq!(bits(&got), bits(&want));
    assert_eq!(bits(&pull_keys(&mut p, &[3, 63])), bits(&[0.75, 8.125, 100.0, 200.0]));
}

#[test]
fn dense_sgd_applies_minus_lr_times_gradient() {
    let spec = dense(0, 10, 4, "sgd{lr=0.1}");
    let mut p = part(&spec, 0..10);
    let lr = 0.1f64 as f32;
    let g: Vec<f32> = (0..8).map(|i| i as f32 * 0.75 - 2.0).collect();
    p.push_range(4, 2, &g, 0, 1).unwrap();
    p.push(&[5], &g[4..], 0, 2).unwrap();
    let got = pull_range(&mut p, 0, 10);
    let mut want = vec![0f32; 40];
    for (i, gi) in g.iter().enumerate() {
        want[16 + i] -= lr * gi;
    }
    for (i, gi) in g[4..].iter().enumerate() {
        want[20 + i] -= lr * gi;
    }
    assert!(want[16] != 0.0 && want[20] != 0.0);
    assert_eq!(bits(&got), bits(&want));
}

#[test]
fn dense_uniform_init_matches_the_pure_function_and_sparse_parts() {
    let mut spec = dense(1000, 2000, 3, "sum");
    spec.init = Init::Uniform { scale: 0.5, seed: 42 };
    let mut p = part(&spec, 1500..1600);
    let got = pull_range(&mut p, 1500, 100);
    for k in 0..100u64 {
        for c in 0..3 {
            let want = init_value(&spec.init, 1500 + k, c as u32);
            assert_eq!(got[k as usize * 3 + c].to_bits(), want.to_bits(), "key {} component {c}", 1500 + k);
            assert!((-0.5..0.5).contains(&want));
        }
    }
    assert!(got.windows(2).any(|w| w[0] != w[1]), "uniform init is not constant");
    // A sparse table with the same init agrees on every untouched key.
    let mut s = sparse(3, "sum");
    s.init = spec.init;
    let mut sp = part(&s, 0..u64::MAX);
    assert_eq!(bits(&pull_keys(&mut sp, &[1500, 1599])), bits(&[&got[..3], &got[297..]].concat()));
}

// -------------------------------------------------------------------------------------------------
// Sparse
// -------------------------------------------------------------------------------------------------

#[test]
fn sparse_untouched_keys_read_zero_and_are_not_stored() {
    let mut p = part(&sparse(2, "sum"), 0..u64::MAX);
    let keys = [0, 17, u64::MAX - 1, 1 << 40];
    assert_eq!(pull_keys(&mut p, &keys), vec![0.0; 8]);
    assert_eq!(pull_range(&mut p, 5, 3), vec![0.0; 6]);
    assert_eq!(p.stats().sparse_keys, 0, "pulls do not insert");
}

#[test]
fn sparse_uniform_init_is_a_pure_function_of_seed_key_and_component() {
    let mut spec = sparse(4, "sum");
    spec.init = Init::Uniform { scale: 0.25, seed: 7 };
    let keys = [3, 99_999_999_999, u64::MAX - 1, 12];
    let mut a = part(&spec, 0..u64::MAX);
    let first = pull_keys(&mut a, &keys);
    let second = pull_keys(&mut a, &keys);
    assert_eq!(bits(&first), bits(&second), "two pulls of an untouched key agree");
    let mut b = part(&spec, 0..u64::MAX);
    assert_eq!(bits(&pull_keys(&mut b, &keys)), bits(&first), "a second part with the same spec agrees");
    for (i, k) in keys.iter().enumerate() {
        for c in 0..4 {
            assert_eq!(first[i * 4 + c].to_bits(), init_value(&spec.init, *k, c as u32).to_bits());
        }
    }
    assert!(first.iter().all(|v| (-0.25..0.25).contains(v)));
    let distinct: std::collections::BTreeSet<u32> = first.iter().map(|v| v.to_bits()).collect();
    assert!(distinct.len() > 12, "values differ across keys and components: {first:?}");

    let mut other = spec.clone();
    other.init = Init::Uniform { scale: 0.25, seed: 8 };
    let mut c = part(&other, 0..u64::MAX);
    assert_ne!(bits(&pull_keys(&mut c, &keys)), bits(&first), "the seed matters");

    // A push inserts the key at its initial value and applies the gradient on top.
    let g = [1.0, 2.0, 3.0, 4.0];
    a.push(&[keys[1]], &g, 0, 1).unwrap();
    let want: Vec<f32> = (0..4).map(|c| first[4 + c] + g[c]).collect();
    assert_eq!(bits(&pull_keys(&mut a, &[keys[1]])), bits(&want));
    assert_eq!(bits(&pull_keys(&mut a, &[keys[0]])), bits(&first[..4]), "neighbours untouched");
    assert_eq!(a.stats().sparse_keys, 1);
}

#[test]
fn sparse_pushes_insert_and_duplicates_apply_twice() {
    let mut p = part(&sparse(2, "sum"), 0..u64::MAX);
    let keys = [u64::MAX - 1, 5, 1 << 63, 5, 0];
    let grads = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5, 0.25, 9.0, 10.0];
    assert_eq!(p.push(&keys, &grads, 0, 1).unwrap(), 0..u64::MAX);
    assert_eq!(p.stats().sparse_keys, 4);
    assert_eq!(p.stats().keys_pushed, 5);
    let got = pull_keys(&mut p, &[5, 0, u64::MAX - 1, 1 << 63, 6]);
    assert_eq!(got, vec![3.5, 4.25, 9.0, 10.0, 1.0, 2.0, 5.0, 6.0, 0.0, 0.0]);
    // A second push to existing keys does not insert.
    p.push(&[0, 5], &[1.0, 1.0, 1.0, 1.0], 0, 2).unwrap();
    assert_eq!(p.stats().sparse_keys, 4);
    assert_eq!(pull_keys(&mut p, &[0, 5]), vec![10.0, 11.0, 4.5, 5.25]);
    // A range push into a sparse table goes key by key.
    p.push_range(4, 3, &[1.0; 6], 0, 3).unwrap();
    assert_eq!(pull_range(&mut p, 4, 3), vec![1.0, 1.0, 5.5, 6.25, 1.0, 1.0]);
    assert_eq!(p.stats().sparse_keys, 6);
}

#[test]
fn sparse_sgd_applies_minus_lr_times_gradient() {
    let mut p = part(&sparse(3, "sgd{lr=0.3}"), 0..u64::MAX);
    let g = [0.5, -1.25, 4.0];
    p.push(&[1234], &g, 0, 1).unwrap();
    p.push(&[1234], &g, 0, 2).unwrap();
    let lr = 0.3f64 as f32;
    let want: Vec<f32> = g.iter().map(|x| 0.0 - lr * x - lr * x).collect();
    assert_eq!(bits(&pull_keys(&mut p, &[1234])), bits(&want));
}

// -------------------------------------------------------------------------------------------------
// Refusals leave the part exactly as it was
// -------------------------------------------------------------------------------------------------

#[test]
fn dense_refusals_change_nothing() {
    let cfg = EngineConfig { workers_max: 4, ..EngineConfig::default() };
    let spec = dense(100, 300, 2, "adagrad{lr=0.1}");
    let mut p = part_with(&spec, 150..250, &cfg);
    p.push_range(150, 100, &vec![0.5; 200], 0, 1).unwrap();
    p.push(&[170, 180], &[1.0, 2.0, 3.0, 4.0], 1, 2).unwrap();

    let out_of_range = |e: &EngineError| matches!(e, EngineError::KeyOutOfRange { .. });
    let not_owned = |e: &EngineError| matches!(e, EngineError::KeyNotOwned { shard: 3, .. });
    let length = |e: &EngineError| matches!(e, EngineError::ValuesLength { .. });
    assert_refused(&mut p, "key below the table", out_of_range, |p| p.push(&[160, 99], &[1.0; 4], 0, 3));
    assert_refused(&mut p, "key at the table's end", out_of_range, |p| p.push(&[300], &[1.0; 2], 0, 3));
    assert_refused(&mut p, "range past the table", out_of_range, |p| p.push_range(300, 2, &[1.0; 4], 0, 3));
    assert_refused(&mut p, "range past u64::MAX", out_of_range, |p| p.push_range(u64::MAX - 1, 2, &[1.0; 4], 0, 3));
    assert_refused(&mut p, "key in the table, not owned", not_owned, |p| p.push(&[150, 120], &[1.0; 4], 0, 3));
    assert_refused(&mut p, "key owned by the next shard", not_owned, |p| p.push(&[250], &[1.0; 2], 0, 3));
    assert_refused(&mut p, "range crossing the owned end", not_owned, |p| p.push_range(240, 20, &[1.0; 40], 0, 3));
    assert_refused(&mut p, "range starting before owned", not_owned, |p| p.push_range(140, 20, &[1.0; 40], 0, 3));
    assert_refused(&mut p, "too few values", length, |p| p.push(&[160, 161], &[1.0; 3], 0, 3));
    assert_refused(&mut p, "too many values", length, |p| p.push(&[160], &[1.0; 3], 0, 3));
    assert_refused(&mut p, "range values short", length, |p| p.push_range(160, 2, &[1.0; 3], 0, 3));
    assert_refused(&mut p, "empty key list", length, |p| p.push(&[], &[], 0, 3));
    assert_refused(&mut p, "empty range", length, |p| p.push_range(160, 0, &[], 0, 3));
    let nan = |e: &EngineError| matches!(e, EngineError::NonFinite { index: 3, .. });
    assert_refused(&mut p, "NaN", nan, |p| p.push(&[160, 161], &[1.0, 1.0, 1.0, f32::NAN], 0, 3));
    assert_refused(&mut p, "infinity in a range", nan, |p| p.push_range(160, 2, &[1.0, 1.0, 1.0, f32::INFINITY], 0, 3));
    let worker = |e: &EngineError| matches!(e, EngineError::WorkerOutOfRange { worker: 4, workers_max: 4 });
    assert_refused(&mut p, "worker over workers_max", worker, |p| p.push(&[160], &[1.0; 2], 4, 3));
    assert_refused(&mut p, "worker over workers_max (range)", worker, |p| p.push_range(160, 1, &[1.0; 2], 4, 3));

    // Pull checks refuse the same way, before any reply is built.
    assert!(matches!(p.check_pull(&[]), Err(EngineError::ValuesLength { keys: 0, .. })));
    assert!(matches!(p.check_pull(&[160, 99]), Err(EngineError::KeyOutOfRange { key: 99, .. })));
    assert!(matches!(p.check_pull(&[160, 250]), Err(EngineError::KeyNotOwned { key: 250, .. })));
    assert!(matches!(p.check_pull_range(249, 2), Err(EngineError::KeyNotOwned { key: 250, .. })));
    assert!(matches!(p.check_pull_range(u64::MAX - 1, 5), Err(EngineError::KeyOutOfRange { .. })));
    assert!(matches!(p.check_pull_range(160, 0), Err(EngineError::ValuesLength { .. })));
    assert_eq!(p.check_pull_range(150, 100).unwrap(), 150..250);
    assert_eq!(p.check_pull(&[200, 151]).unwrap(), 151..201);
}

#[test]
fn clock_segment_limit_refusal_changes_nothing() {
    let cfg = EngineConfig { clock_segments_max: 4, ..EngineConfig::default() };
    let mut p = part_with(&dense(0, 100, 1, "sum"), 0..100, &cfg);
    p.push_range(10, 1, &[1.0], 0, 1).unwrap();
    assert_eq!(p.clocks().segment_count(), 3);
    let full = |e: &EngineError| matches!(e, EngineError::ClockSegmentsFull { segments_max: 4, .. });
    assert_refused(&mut p, "a fifth clock segment", full, |p| p.push_range(20, 1, &[1.0], 0, 1));
    assert_refused(&mut p, "a fifth clock segment (keys)", full, |p| p.push(&[20], &[1.0], 0, 1));
    assert_eq!(pull_range(&mut p, 9, 3), vec![0.0, 1.0, 0.0]);
}

#[test]
fn sparse_refusals_change_nothing() {
    let mut p = part(&sparse(2, "adam"), 1000..u64::MAX);
    p.push(&[5000, 1 << 50], &[1.0, 2.0, 3.0, 4.0], 0, 1).unwrap();
    assert_refused(&mut p, "key not owned", |e| matches!(e, EngineError::KeyNotOwned { key: 999, .. }), |p| p.push(&[5000, 999], &[1.0; 4], 0, 2));
    assert_refused(&mut p, "values length", |e| matches!(e, EngineError::ValuesLength { .. }), |p| p.push(&[5000, 6000], &[1.0; 5], 0, 2));
    assert_refused(
        &mut p,
        "NaN in the second key",
        |e| matches!(e, EngineError::NonFinite { index: 2, .. }),
        |p| p.push(&[7000, 6000], &[1.0, 1.0, f32::NAN, 1.0], 0, 2),
    );
    assert_refused(&mut p, "empty", |e| matches!(e, EngineError::ValuesLength { keys: 0, .. }), |p| p.push(&[], &[], 0, 2));
    assert_refused(&mut p, "worker", |e| matches!(e, EngineError::WorkerOutOfRange { worker: 64, .. }), |p| p.push(&[8000], &[1.0; 2], 64, 2));
    assert_eq!(p.stats().sparse_keys, 2, "no refused push inserted a key");
}

#[test]
fn sparse_table_full_refuses_the_whole_push() {
    let cfg = EngineConfig { shards: 1, ..EngineConfig::default() };
    let mut spec = sparse(1, "sum");
    spec.capacity = 10; // rounds up to SPARSE_SLOTS_MIN slots, 75% of which may fill.
    let limit = (SPARSE_SLOTS_MIN * SPARSE_LOAD_PERCENT_MAX / 100) as usize;
    assert_eq!(limit, 768);
    let mut p = part_with(&spec, 0..u64::MAX, &cfg);
    let key = |i: u64| i.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 1;
    let first: Vec<u64> = (0..700).map(key).collect();
    p.push(&first, &vec![1.0; 700], 0, 1).unwrap();
    assert_eq!(p.stats().sparse_keys, 700);

    // 100 new keys do not fit (only 68 would): none of them goes in.
    let over: Vec<u64> = (700..800).map(key).collect();
    let full = |e: &EngineError| matches!(e, EngineError::SparseTableFull { capacity: 768, .. });
    assert_refused(&mut p, "100 new keys into 68 free", full, |p| p.push(&over, &vec![1.0; 100], 0, 2));
    assert_eq!(pull_keys(&mut p, &over[..3]), vec![0.0; 3]);

    // Existing keys plus exactly the free room fit.
    let mut fits: Vec<u64> = (700..768).map(key).collect();
    fits.extend_from_slice(&first[..50]);
    p.push(&fits, &vec![2.0; 118], 0, 3).unwrap();
    assert_eq!(p.stats().sparse_keys, 768);
    assert_eq!(pull_keys(&mut p, &[first[0], first[699], key(767)]), vec![3.0, 1.0, 2.0]);

    // Full: one more new key is refused, pushes to existing keys still work.
    assert_refused(&mut p, "one new key into a full table", full, |p| p.push(&[key(768)], &[1.0], 0, 4));
    assert_refused(&mut p, "a new key among existing ones", full, |p| p.push(&[first[1], key(769), first[2]], &[1.0; 3], 0, 4));
    p.push(&first[..700], &vec![1.0; 700], 0, 5).unwrap();
    assert_eq!(pull_keys(&mut p, &[first[0], first[699]]), vec![4.0, 2.0]);
    assert_eq!(p.stats().sparse_keys, 768);
}

// -------------------------------------------------------------------------------------------------
// Non-finite gradients with NonFinite::Skip
// -------------------------------------------------------------------------------------------------

/// Adagrad by hand: `(value, accumulator)` after one update from `(w, acc)` with gradient `g`.
fn adagrad(w: f32, acc: f32, g: f32) -> (f32, f32) {
    let (lr, eps) = (0.5f64 as f32, 1e-8f64 as f32);
    let acc = acc + g * g;
    (w - lr * g / (acc.sqrt() + eps), acc)
}

#[test]
fn dense_skip_applies_finite_components_and_leaves_the_rest_untouched() {
    let mut spec = dense(0, 8, 4, "adagrad{lr=0.5}");
    spec.non_finite = NonFinite::Skip;
    spec.init = Init::Uniform { scale: 1.0, seed: 5 };
    let mut p = part(&spec, 0..8);
    let init = pull_range(&mut p, 0, 8);
    let g = [2.0, f32::NAN, -3.0, f32::INFINITY, f32::NEG_INFINITY, 0.5, f32::NAN, 1.0];
    p.push_range(2, 2, &g, 0, 1).unwrap();
    assert_eq!(p.stats().non_finite_skipped, 4);
    let Store::Dense(d) = &p.store else { unreachable!() };
    let acc = d.s0.as_slice().to_vec();
    let got = pull_range(&mut p, 0, 8);
    for i in 0..32 {
        let gi = if (8..16).contains(&i) { g[i - 8] } else { f32::NAN };
        if gi.is_finite() {
            let (w, a) = adagrad(init[i], 0.0, gi);
            assert_eq!((got[i].to_bits(), acc[i].to_bits()), (w.to_bits(), a.to_bits()), "component {i} applied");
        } else {
            assert_eq!((got[i].to_bits(), acc[i]), (init[i].to_bits(), 0.0), "component {i} untouched");
        }
    }
    // The key-list path skips the same way, and a later finite push sees the untouched state.
    p.push(&[3, 2], &[f32::NAN, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 0, 2).unwrap();
    assert_eq!(p.stats().non_finite_skipped, 5);
    let after = pull_range(&mut p, 2, 2);
    let (w1, _) = adagrad(init[9], 0.0, 1.0);
    assert_eq!(after[1].to_bits(), w1.to_bits(), "the first finite push to a skipped component");
    let (w0, a0) = adagrad(init[8], 0.0, 2.0);
    assert_eq!(after[0].to_bits(), adagrad(w0, a0, 1.0).0.to_bits(), "a component pushed twice");
    assert_eq!(after[4].to_bits(), init[12].to_bits(), "key 3 component 0 skipped again");
}

#[test]
fn sparse_skip_applies_finite_components_and_leaves_the_rest_untouched() {
    let mut spec = sparse(3, "adagrad{lr=0.5}");
    spec.non_finite = NonFinite::Skip;
    spec.init = Init::Uniform { scale: 1.0, seed: 9 };
    let mut p = part(&spec, 0..u64::MAX);
    let init = pull_keys(&mut p, &[42, 43]);
    p.push(&[42, 43], &[f32::NAN, 4.0, f32::INFINITY, 1.0, 1.0, 1.0], 0, 1).unwrap();
    assert_eq!(p.stats().non_finite_skipped, 2);
    let got = pull_keys(&mut p, &[42]);
    assert_eq!(got[0].to_bits(), init[0].to_bits());
    assert_eq!(got[1].to_bits(), adagrad(init[1], 0.0, 4.0).0.to_bits());
    assert_eq!(got[2].to_bits(), init[2].to_bits());
    // The skipped components' accumulators are still zero: a finite push now acts as a first one.
    p.push(&[42], &[1.0, 1.0, 1.0], 0, 2).unwrap();
    let got = pull_keys(&mut p, &[42]);
    let (w1, a1) = adagrad(init[1], 0.0, 4.0);
    let want = [adagrad(init[0], 0.0, 1.0).0, adagrad(w1, a1, 1.0).0, adagrad(init[2], 0.0, 1.0).0];
    assert_eq!(bits(&got), bits(&want));
}

#[test]
fn reject_refuses_what_skip_accepts() {
    let spec = dense(0, 4, 2, "sum");
    let mut p = part(&spec, 0..4);
    assert_refused(&mut p, "inf under Reject", |e| matches!(e, EngineError::NonFinite { index: 1, .. }), |p| p.push_range(0, 1, &[1.0, f32::INFINITY], 0, 1));
    assert_eq!(p.stats().non_finite_skipped, 0);
}

// -------------------------------------------------------------------------------------------------
// Stamps
// -------------------------------------------------------------------------------------------------

fn stamp(p: &TablePart, range: Range<u64>) -> Vec<u64> {
    let mut out = vec![u64::MAX; p.stamp_len()];
    p.stamp_into(range, &mut out);
    out
}

#[test]
fn stamps_are_the_elementwise_min_over_the_range() {
    let mut p = part(&dense(0, 200, 1, "sum"), 100..200);
    assert_eq!(p.stamp_len(), 0, "no worker has pushed yet");
    assert_eq!(stamp(&p, 100..200), Vec::<u64>::new());

    p.push_range(100, 50, &[1.0; 50], 0, 3).unwrap();
    p.push_range(150, 50, &[1.0; 50], 0, 5).unwrap();
    assert_eq!(p.stamp_len(), 1);
    assert_eq!(stamp(&p, 100..200), [3]);
    assert_eq!(stamp(&p, 150..200), [5]);

    p.push(&[100, 199], &[1.0; 2], 1, 2).unwrap(); // the span covers the whole part
    p.push_range(120, 10, &[1.0; 10], 1, 7).unwrap();
    assert_eq!(p.stamp_len(), 2);
    assert_eq!(stamp(&p, 100..200), [3, 2]);
    assert_eq!(stamp(&p, 120..130), [3, 7]);
    assert_eq!(stamp(&p, 125..160), [3, 2]);
    assert_eq!(stamp(&p, 150..160), [5, 2]);

    // A stale clock changes nothing; clock 0 does not count as having been seen.
    p.push_range(120, 10, &[1.0; 10], 1, 4).unwrap();
    assert_eq!(stamp(&p, 120..130), [3, 7]);
    p.push_range(100, 100, &vec![1.0; 100], 3, 0).unwrap();
    assert_eq!(p.stamp_len(), 2);
    p.push_range(190, 10, &[1.0; 10], 3, 1).unwrap();
    assert_eq!(p.stamp_len(), 4);
    assert_eq!(stamp(&p, 100..200), [3, 2, 0, 0]);
    assert_eq!(stamp(&p, 190..200), [5, 2, 0, 1]);
    p.clocks().check_invariants();

    // A shorter output buffer gets the first entries only.
    let mut short = [u64::MAX; 1];
    p.stamp_into(120..130, &mut short);
    assert_eq!(short, [3]);
    assert_eq!(pull_range(&mut p, 120, 1), [4.0], "every push above was applied, stale clocks too");
}

/// A push's acknowledgement takes its stamp from the one its blocks were just stamped with when
/// it can; whatever the pushes, that must be the clocks' own minimum over the range.
#[test]
fn reply_stamps_match_the_clocks_after_any_pushes() {
    let cfg = EngineConfig { dense_block_bytes: 16, workers_max: 3, ..EngineConfig::default() };
    let mut p = part_with(&dense(0, 64, 1, "sum"), 0..64, &cfg);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |n: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    for round in 0..2_000 {
        // Whole-part pushes (one segment) half the time, partial ones otherwise; clocks go
        // forwards mostly, and sometimes repeat or go back (a stale push raises nothing).
        let (start, count) = if next(2) == 0 {
            (0, 64)
        } else {
            let start = next(64);
            (start, 1 + next(64 - start))
        };
        let (worker, clock) = (next(3) as u32, round / 8 + next(3));
        if next(4) == 0 {
            // Clocks that move without a push restamping the blocks: what was cached is stale.
            p.advance_clock(start..start + count, worker, clock).unwrap();
        } else {
            p.push_range(start, count as usize, &vec![1.0; count as usize], worker, clock).unwrap();
        }
        let span = start..start + count;
        let checks = [span.clone(), 0..64, start..start + 1, next(32)..32 + next(32) + 1];
        for range in checks {
            let mut want = vec![u64::MAX; 3];
            p.clocks().stamp_into(range.clone(), &mut want);
            let mut got = vec![u64::MAX; 3];
            p.stamp_into(range.clone(), &mut got);
            assert_eq!(got, want, "round {round}: stamp of {range:?} after {span:?} by {worker} at {clock}");
        }
    }
    p.clocks().check_invariants();
}

#[test]
fn sparse_stamps_cover_the_span_of_the_pushed_keys() {
    let mut p = part(&sparse(1, "sum"), 0..u64::MAX);
    p.push(&[1000, 10], &[1.0, 1.0], 0, 4).unwrap();
    p.push(&[500], &[1.0], 1, 6).unwrap();
    assert_eq!(p.stamp_len(), 2);
    assert_eq!(stamp(&p, 10..1001), [4, 0], "worker 1 only reached key 500");
    assert_eq!(stamp(&p, 500..501), [4, 6]);
    assert_eq!(stamp(&p, 0..11), [0, 0], "key 0 was never in a span");
}

/// A push naming the same new key twice needs one slot, not two.
#[test]

fn sparse_room_counts_a_repeated_new_key_once() {
    let cfg = EngineConfig { shards: 1, ..EngineConfig::default() };
    let mut spec = sparse(1, "sum");
    spec.capacity = 10;
    let mut p = part_with(&spec, 0..u64::MAX, &cfg);
    let first: Vec<u64> = (0..767).map(|i| i * 1_000).collect();
    p.push(&first, &vec![1.0; 767], 0, 1).unwrap();
    p.push(&[5, 5], &[1.0, 1.0], 0, 2).expect("one free slot holds one new key, named twice");
    assert_eq!(pull_keys(&mut p, &[5]), [2.0]);
    assert_eq!(p.stats().sparse_keys, 768);
}

/// The blocks a push touches get one version bump each, end whole (front == back), and carry the
/// stamp of exactly their keys; blocks it does not touch keep version 0.
#[test]
fn dense_blocks_carry_versions_and_stamps() {
    let cfg = EngineConfig { dense_block_bytes: 16, workers_max: 4, ..EngineConfig::default() };
    let mut p = part_with(&dense(0, 40, 2, "sum"), 0..40, &cfg);
    // 2 keys of 2 floats per block: keys 5..9 touch blocks 2, 3 and 4.
    p.push_range(5, 4, &[1.0; 8], 1, 7).unwrap();
    p.push(&[0], &[2.0, 2.0], 3, 9).unwrap();
    let Store::Dense(d) = &p.store else { unreachable!() };
    let l = d.layout;
    assert_eq!((l.keys_per_block, l.clocks, l.block_words), (2, 4, 2 + 2 + 2));
    for b in 0..l.blocks() {
        let at = l.block_at(b);
        let block = &d.blocks.words()[at..at + l.block_words as usize];
        assert!(tessera_layout::dense::block_is_whole(block), "block {b} whole");
        let want_version = u64::from((2..=4).contains(&b) || b == 0);
        assert_eq!(block[0], want_version, "block {b} version");
        let mut stamp = [0; 4];
        p.stamp_into(l.keys_of(b).start..l.keys_of(b).end, &mut stamp);
        let mut exposed = [u64::MAX; 4];
        l.meet_stamp(block, &mut exposed);
        assert_eq!(exposed, stamp, "block {b} stamp");
    }
    // Block 2 holds keys 4 and 5; only key 5 was pushed, so worker 1's entry there is 0.
    // Two u32 clocks to a word, low half first.
    assert_eq!(&d.blocks.words()[l.block_at(2) + 1..l.block_at(2) + 3], &[0, 0]);
    assert_eq!(&d.blocks.words()[l.block_at(3) + 1..l.block_at(3) + 3], &[7 << 32, 0]);
    assert_eq!(pull_range(&mut p, 4, 6), vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
}

/// A copy taken while a block is changing (between its two version writes) is seen as torn.
#[test]
fn a_block_copied_mid_change_is_torn() {
    let cfg = EngineConfig { dense_block_bytes: 16, workers_max: 2, ..EngineConfig::default() };
    let mut p = part_with(&dense(0, 8, 1, "sum"), 0..8, &cfg);
    let Store::Dense(d) = &mut p.store else { unreachable!() };
    let l = d.layout;
    let words = |d: &DenseStore| d.blocks.words()[l.block_at(1)..l.block_at(2)].to_vec();
    d.open(1);
    assert!(!tessera_layout::dense::block_is_whole(&words(d)));
    d.close(1);
    assert!(tessera_layout::dense::block_is_whole(&words(d)));
    assert_eq!(words(d)[0], 1);
}

/// Every block's exposed stamp equals the clocks of exactly its keys after any mix of range and
/// key pushes from several workers (the stamp cache must never go stale).
#[test]
fn block_stamps_track_the_clocks_through_random_pushes() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let push = (any::<bool>(), 0u64..60, 1usize..20, 0u32..3, 1u64..50);
    let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
    runner
        .run(&proptest::collection::vec(push, 1..30), |pushes| {
            let cfg = EngineConfig { dense_block_bytes: 12, workers_max: 3, ..EngineConfig::default() };
            let mut p = part_with(&dense(100, 160, 1, "sum"), 100..160, &cfg);
            for (by_range, start, len, worker, clock) in pushes {
                let len = len.min(60 - start as usize);
                if by_range {
                    p.push_range(100 + start, len, &vec![1.0; len], worker, clock).unwrap();
                } else {
                    let keys: Vec<u64> = (0..len as u64).map(|i| 100 + start + i * 7 % len as u64).collect();
                    let mut keys = keys;
                    keys.sort_unstable();
                    keys.dedup();
                    p.push(&keys, &vec![1.0; keys.len()], worker, clock).unwrap();
                }
                let Store::Dense(d) = &p.store else { unreachable!() };
                let l = d.layout;
                for b in 0..l.blocks() {
                    let held = l.keys_of(b);
                    let mut want = [0; 3];
                    p.stamp_into(100 + held.start..100 + held.end, &mut want);
                    let block = &d.blocks.words()[l.block_at(b)..l.block_at(b) + l.block_words as usize];
                    let mut got = [u64::MAX; 3];
                    l.meet_stamp(block, &mut got);
                    prop_assert_eq!(got, want, "block {}", b);
                }
            }
            Ok(())
        })
        .unwrap();
}

// -------------------------------------------------------------------------------------------------
// Checkpoint chunks
// -------------------------------------------------------------------------------------------------

/// Saves every chunk of `from` and loads them into `into` (a fresh part of the same table).
fn copy_through_chunks(from: &TablePart, into: &mut TablePart) {
    assert_eq!(from.chunks(), into.chunks());
    let mut buf = vec![0u8; from.chunk_payload_len(0)];
    for c in 0..from.chunks() {
        let n = from.save_chunk(c, &mut buf);
        into.load_chunk(c, &buf[..n]).unwrap();
    }
    let segments: Vec<(u64, Vec<u64>)> = from.clocks().segments().map(|(r, c)| (r.start, c.to_vec())).collect();
    into.finish_load(from.step(), &segments).unwrap();
}

/// Everything but the counters and the blocks' version words (which count changes, not state).
fn same_state(a: &TablePart, b: &TablePart) {
    let without_versions = |p: &TablePart| {
        let mut s = snapshot(p);
        s.stats.clear();
        if let Store::Dense(d) = &p.store {
            for blk in 0..d.layout.blocks() {
                let front = d.layout.block_at(blk);
                let back = front + d.layout.block_words as usize - 1;
                for w in [front, back] {
                    s.arrays[0][2 * w] = 0;
                    s.arrays[0][2 * w + 1] = 0;
                }
            }
        }
        s
    };
    let (sa, sb) = (without_versions(a), without_versions(b));
    assert!(sa == sb, "the parts differ (first differing array: {:?})", sa.arrays.iter().zip(&sb.arrays).position(|(x, y)| x != y));
}

#[test]
fn a_dense_part_with_optimiser_state_survives_its_chunks_bit_for_bit() {
    // Small blocks and several chunks (adam keeps 12 bytes a component).
    let cfg = EngineConfig { dense_block_bytes: 40, workers_max: 3, ..EngineConfig::default() };
    let spec = dense(1000, 31_000, 3, "adam{lr=0.01}");
    let mut a = part_with(&spec, 1000..31_000, &cfg);
    assert!(a.chunks() > 1, "the test wants several chunks");
    a.push_range(1000, 20_000, &vec![0.5; 60_000], 0, 3).unwrap();
    a.push(&[1001, 25_000, 30_999], &[1.0, -1.0, 2.0, 0.1, 0.2, 0.3, 7.0, 8.0, 9.0], 2, 8).unwrap();
    let mut b = part_with(&spec, 1000..31_000, &cfg);
    copy_through_chunks(&a, &mut b);
    same_state(&a, &b);
    // The next push lands identically: values, moments and Adam's step all came back.
    let g: Vec<f32> = (0..300).map(|i| i as f32 * 1e-3).collect();
    a.push_range(1500, 100, &g, 1, 9).unwrap();
    b.push_range(1500, 100, &g, 1, 9).unwrap();
    same_state(&a, &b);
    assert_eq!(bits(&pull_range(&mut a, 1000, 30_000)), bits(&pull_range(&mut b, 1000, 30_000)));
}

#[test]
fn a_sparse_part_survives_its_chunks_and_finds_every_key() {
    let spec = sparse(2, "adagrad{lr=0.1}");
    let mut a = part(&spec, 0..u64::MAX);
    let keys: Vec<u64> = (0..600).map(|i| i * 7_919 + 13).collect();
    let grads: Vec<f32> = (0..1200).map(|i| (i % 11) as f32 - 5.0).collect();
    a.push(&keys, &grads, 0, 1).unwrap();
    let mut b = part(&spec, 0..u64::MAX);
    copy_through_chunks(&a, &mut b);
    same_state(&a, &b);
    assert_eq!(bits(&pull_keys(&mut a, &keys)), bits(&pull_keys(&mut b, &keys)));
    // New keys still go where lookups find them.
    b.push(&[5, 6], &[1.0; 4], 0, 2).unwrap();
    assert_eq!(pull_keys(&mut b, &[5, 6]), vec![-0.1; 4]);
}

#[test]
fn pushes_mark_exactly_the_chunks_they_touch() {
    let spec = dense(0, 100_000, 1, "sum");
    let mut p = part(&spec, 0..100_000);
    let per = p.chunk_slots();
    assert_eq!(p.dirty_chunks().count(), 0);
    p.push_range(per * 3 + 5, (per * 2) as usize, &vec![1.0; (per * 2) as usize], 0, 1).unwrap();
    assert_eq!(p.dirty_chunks().collect::<Vec<_>>(), vec![3, 4, 5]);
    p.push(&[per * 6], &[1.0], 0, 2).unwrap();
    assert_eq!(p.dirty_chunks().collect::<Vec<_>>(), vec![3, 4, 5, 6]);
    p.clear_dirty();
    assert_eq!(p.dirty_chunks().count(), 0);
    // A key-list push marks its keys' chunks, not every chunk between them.
    p.push(&[1, per * 5 + 2], &[1.0, 1.0], 0, 3).unwrap();
    assert_eq!(p.dirty_chunks().collect::<Vec<_>>(), vec![0, 5]);
    p.clear_dirty();
    p.mark_all_dirty();
    assert_eq!(p.dirty_chunks().count() as u64, p.chunks());

    let mut s = part(&sparse(1, "sum"), 0..u64::MAX);
    s.push(&[42], &[1.0], 0, 1).unwrap();
    assert_eq!(s.dirty_chunks().count(), 1);
}

#[test]
fn a_chunk_of_the_wrong_length_or_index_is_refused_and_changes_nothing() {
    let spec = dense(0, 1000, 2, "sum");
    let mut p = part(&spec, 0..1000);
    p.push_range(0, 1000, &[1.0; 2000], 0, 1).unwrap();
    let before = snapshot(&p);
    let len = p.chunk_payload_len(0);
    for (c, bytes) in [(0, len - 4), (0, len + 4), (p.chunks(), len)] {
        let err = p.load_chunk(c, &vec![0u8; bytes]).unwrap_err();
        assert!(matches!(err, EngineError::Corrupt { .. }), "{err}");
    }
    assert_eq!(snapshot(&p), before);
}

#[test]
fn clocks_that_cannot_be_this_parts_are_refused() {
    let spec = dense(10, 20, 1, "sum");
    let mut p = part_with(&spec, 10..20, &EngineConfig { workers_max: 2, ..EngineConfig::default() });
    for bad in [
        vec![],
        vec![(11, vec![0, 0])],
        vec![(10, vec![0])],
        vec![(10, vec![1, 0]), (10, vec![2, 0])],
        vec![(10, vec![1, 0]), (20, vec![2, 0])],
        vec![(10, vec![1, 0]), (15, vec![1, 0])],
        vec![(10, vec![crate::config::CLOCK_MAX + 1, 0])],
    ] {
        let err = p.finish_load(0, &bad).unwrap_err();
        assert!(matches!(err, EngineError::Corrupt { .. }), "{bad:?}: {err}");
    }
    p.finish_load(4, &[(10, vec![1, 0]), (15, vec![1, 3])]).unwrap();
    assert_eq!(p.clocks().workers_seen(), 2);
    assert_eq!(p.step(), 4);
}

#[test]
fn a_sparse_key_in_a_slot_where_lookups_miss_it_is_refused() {
    let spec = sparse(1, "sum");
    let mut a = part(&spec, 0..u64::MAX);
    a.push(&[77], &[1.0], 0, 1).unwrap();
    let mut buf = vec![0u8; a.chunk_payload_len(0)];
    let mut b = part(&spec, 0..u64::MAX);
    for c in 0..a.chunks() {
        let n = a.save_chunk(c, &mut buf);
        // Move key 77 one slot over inside its chunk's key array (the payload starts with it).
        let slots = a.chunk_range(c).count();
        if let Some(i) = buf[..slots * 8].chunks_exact(8).position(|k| k == 77u64.to_le_bytes()) {
            let j = if i + 1 < slots { i + 1 } else { i - 1 };
            let moved: [u8; 8] = buf[j * 8..j * 8 + 8].try_into().unwrap();
            buf.copy_within(i * 8..i * 8 + 8, j * 8);
            buf[i * 8..i * 8 + 8].copy_from_slice(&moved);
        }
        b.load_chunk(c, &buf[..n]).unwrap();
    }
    let err = b.finish_load(1, &[(0, vec![1; 16])]).unwrap_err();
    assert!(err.to_string().contains("key 77 sits in slot"), "{err}");
}
