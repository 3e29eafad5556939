//! The data set and model math of `tessera demo`: a seeded synthetic hashed-feature data set drawn
//! from a known logistic-regression model, and the per-minibatch gradient the demo's workers push.
//!
//! Why the data looks the way it does:
//! - Feature ids follow a power law, as hashed features in real logs do: a few ids occur in most
//!   examples and most ids are rare. With the defaults, about 2 of an example's 30 features are
//!   ids ranked beyond 1,000, and training touches about 85,000 distinct keys.
//! - Keys are the ids run through a seeded splitmix64 mixer, so they spread over the whole u64 key
//!   space as a hashed-feature pipeline's keys do. The mixer is a bijection, so ids never collide.
//! - True weights are large for frequent ids and decay over the tail, so the labels' signal is
//!   carried by ids seen often enough to be learned in a few epochs. The many rare ids carry
//!   near-zero weight; that is realistic, and it is what lets a few epochs of training come
//!   within about 0.01 of the true model's held-out accuracy (about 0.83).
//! - True weights are a hash of (seed, id) rather than a stored table, so the true model costs no
//!   memory however many features there are.
//!
//! The shape and the training constants were tuned with `tests::simulate`, which reproduces the
//! demo's server (zero-initialised adagrad) and two workers with one batch of staleness. Over
//! seeds 0..64 of the 20,000-example data set, the final held-out accuracy trails the true
//! model's by 0.014 on average and by 0.027 at worst (0.015 and 0.028 when each worker also
//! keeps one push in flight); on the default data set, by about 0.003. The demo keeps up to 8
//! pushes in flight per worker; on the default data set its final accuracy was the same as with
//! one (0.8238 against 0.8239 unreplicated, 0.8236 against 0.8240 on chains of three).

use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// Server-side adagrad learning rate the demo should configure. Adagrad moves a weight by `lr`
/// on its first update whatever the gradient, so this sets the noise that rarely seen ids add,
/// while a frequent id can move at most about `2 * lr * sqrt(updates)` towards its weight.
/// 0.05 balances the two; 0.1 already loses more to the tail than it gains on the head.
pub const DEFAULT_LR: f32 = 0.05;
/// Examples per minibatch, so one pull and one push per 50 examples: 3,600 round trips per epoch
/// for the default data set. Larger batches give frequent ids fewer updates and learn slower.
pub const DEFAULT_BATCH: usize = 50;
/// Passes over the training split. The default data set is learned in one; the 20,000-example
/// data set still gains in the second and third (mean gap to the true model over 64 seeds:
/// 0.017, 0.014, 0.014).
pub const DEFAULT_EPOCHS: usize = 3;

// Each epoch costs one pull and one push per batch; the demo's two-minute budget allows about
// 4,000 round trips per epoch on the default data set's 180,000 training examples.
const _: () = assert!(180_000 / DEFAULT_BATCH <= 4_000);

/// The largest feature count: ids are drawn through f64, exact to 2^53; 2^40 keeps the power-law
/// sampler's rounding far from that.
pub const FEATURES_MAX: u64 = 1 << 40;
/// The largest number of stored keys (examples x (active + 1)): 2 GiB of keys.
pub const KEYS_MAX: usize = 1 << 28;

/// What to generate. Every field has a default; `validate` says what is wrong with a bad one.
#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    /// Distinct hashed feature ids (not counting the bias).
    pub features: u64,
    /// Examples in total, training and held-out together.
    pub examples: usize,
    /// Active features per example (not counting the bias).
    pub active: usize,
    /// Fraction of the examples held out for evaluation.
    pub heldout_fraction: f64,
    /// Seeds the true model, the keys and the examples.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { features: 1_000_000, examples: 200_000, active: 30, heldout_fraction: 0.1, seed: 42 }
    }
}

impl DataConfig {
    /// Says what is wrong with the configuration, in words a person can act on.
    pub fn validate(&self) -> Result<(), String> {
        if self.active == 0 {
            return Err("active features per example must be at least 1".into());
        }
        // Drawing distinct ids by rejection stays cheap only while an example uses a small part
        // of the id space.
        let features_min = (self.active as u64).saturating_mul(4);
        if self.features < features_min || self.features > FEATURES_MAX {
            return Err(format!("features must be between 4 x active ({features_min}) and {FEATURES_MAX}; got {}", self.features));
        }
        if self.examples.saturating_mul(self.active + 1) > KEYS_MAX {
            return Err(format!("examples x (active + 1) must be at most {KEYS_MAX}; use fewer examples"));
        }
        if !(self.heldout_fraction > 0.0 && self.heldout_fraction < 1.0) {
            return Err(format!("heldout fraction must be strictly between 0 and 1; got {}", self.heldout_fraction));
        }
        let test = self.test_examples();
        if test == 0 || test == self.examples {
            return Err(format!(
                "{} examples with heldout fraction {} leave the training or held-out split empty; use more examples",
                self.examples, self.heldout_fraction
            ));
        }
        Ok(())
    }

    fn test_examples(&self) -> usize {
        (self.examples as f64 * self.heldout_fraction).round() as usize
    }
}

/// The shape of the generated task. Fixed rather than configurable, because the tuned training
/// constants hold only for this shape.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shape {
    /// Power-law exponent of id frequency. Well above 1, so the tail stays a small part of each
    /// example (1.0 would put 13 of 30 features beyond rank 1,000): adagrad gives every rarely
    /// seen id a weight of about +-lr, and that noise is what separates a learner from the true
    /// model on held-out data.
    zipf_exponent: f64,
    /// Standard deviation of the most frequent ids' weights.
    weight_scale: f64,
    /// Weight scale = weight_scale * (1 + rank / signal_ranks)^-tail_decay: flat over the top
    /// ~50 ids, down to 1/120 by rank 1,000, beyond which the 20,000-example data set sees an id
    /// fewer than 20 times.
    signal_ranks: f64,
    tail_decay: f64,
    /// The bias is chosen to put the median true logit here, so the classes stay near balanced
    /// whatever weights the seed gives the ids present in nearly every example.
    median_logit: f64,
}

const SHAPE: Shape = Shape { zipf_exponent: 1.5, weight_scale: 1.4, signal_ranks: 100.0, tail_decay: 2.0, median_logit: 0.2 };

/// The model that generated the labels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrueModel {
    key_salt: u64,
    weight_salt: u64,
    features: u64,
    bias: f64,
}

impl TrueModel {
    /// The hashed key of feature id `feature` (ids are frequency ranks: 0 is the most frequent).
    pub fn key(&self, feature: u64) -> u64 {
        splitmix64(feature.wrapping_add(self.key_salt))
    }

    /// The bias key, present in every example: the key of the first id past the feature range,
    /// so it cannot collide with a feature's key.
    pub fn bias_key(&self) -> u64 {
        self.key(self.features)
    }

    /// The true weight of feature id `feature`.
    pub fn weight(&self, feature: u64) -> f64 {
        let decay = (1.0 + feature as f64 / SHAPE.signal_ranks).powf(-SHAPE.tail_decay);
        SHAPE.weight_scale * decay * gaussian(splitmix64(feature ^ self.weight_salt))
    }

    /// The true bias.
    #[cfg_attr(not(test), allow(dead_code, reason = "for tests; the demo prints metrics"))]
    pub fn bias(&self) -> f64 {
        self.bias
    }

    fn logit(&self, ids: &[u64]) -> f64 {
        self.bias + ids.iter().map(|&id| self.weight(id)).sum::<f64>()
    }
}

/// Examples in CSR form: example `i` owns `keys[starts[i]..starts[i + 1]]`, bias key first.
#[derive(Debug, Clone, Default)]
pub struct Examples {
    starts: Vec<usize>,
    keys: Vec<u64>,
    labels: Vec<f32>,
    /// The true model's logit for each example, so its accuracy needs no key-to-weight table.
    true_logits: Vec<f32>,
}

impl Examples {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    #[cfg_attr(not(test), allow(dead_code, reason = "for tests; the demo prints metrics"))]
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The keys of example `i`, bias key first; every feature's value is 1.0.
    pub fn keys(&self, i: usize) -> &[u64] {
        &self.keys[self.starts[i]..self.starts[i + 1]]
    }

    /// The label of example `i`: 0.0 or 1.0.
    pub fn label(&self, i: usize) -> f32 {
        self.labels[i]
    }

    /// The true model's logit for example `i`.
    pub fn true_logit(&self, i: usize) -> f32 {
        self.true_logits[i]
    }

    /// The keys of a run of examples, back to back: one slice, thanks to the CSR layout.
    fn keys_of(&self, run: Range<usize>) -> &[u64] {
        &self.keys[self.starts[run.start]..self.starts[run.end]]
    }
}

/// The generated data: a training split, a held-out split and the model that labelled both.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub train: Examples,
    pub test: Examples,
    #[cfg_attr(not(test), allow(dead_code, reason = "for tests; the demo prints metrics"))]
    pub true_model: TrueModel,
}

impl Dataset {
    /// The true model's accuracy on the held-out split: what a learner should come close to.
    #[cfg_attr(not(test), allow(dead_code, reason = "for tests; the demo prints metrics"))]
    pub fn true_model_accuracy(&self) -> f64 {
        self.true_model_metrics().1
    }

    /// The true model's (mean log-loss, accuracy) on the held-out split.
    pub fn true_model_metrics(&self) -> (f64, f64) {
        let t = &self.test;
        metrics((0..t.len()).map(|i| (t.true_logit(i), t.label(i))))
    }
}

/// Generates the data set for `cfg`. Panics on a configuration `validate` rejects.
pub fn generate(cfg: &DataConfig) -> Dataset {
    if let Err(problem) = cfg.validate() {
        panic!("invalid demo data configuration: {problem}");
    }
    let sampler = PowerLaw::new(cfg.features, SHAPE.zipf_exponent);
    // One non-overlapping stream (2^128 draws apart) per use, so that, say, the held-out split
    // does not change with the number of training examples.
    let stream = |use_id: u64| {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(cfg.seed);
        (0..use_id).for_each(|_| rng.jump());
        rng
    };
    let mut model = TrueModel { key_salt: splitmix64(cfg.seed), weight_salt: splitmix64(!cfg.seed), features: cfg.features, bias: 0.0 };
    model.bias = centring_bias(&model, &sampler, cfg.active, &mut stream(3));
    let test_count = cfg.test_examples();
    let train = draw_examples(&model, &sampler, cfg.active, cfg.examples - test_count, &mut stream(1));
    let test = draw_examples(&model, &sampler, cfg.active, test_count, &mut stream(2));
    Dataset { train, test, true_model: model }
}

/// The bias that puts the median logit of a pilot sample on `SHAPE.median_logit`.
fn centring_bias(model: &TrueModel, sampler: &PowerLaw, active: usize, rng: &mut impl Rng) -> f64 {
    const PILOT_EXAMPLES: usize = 2001;
    let mut ids = Vec::with_capacity(active);
    let mut logits: Vec<f64> = (0..PILOT_EXAMPLES)
        .map(|_| {
            draw_distinct_ids(sampler, active, rng, &mut ids);
            ids.iter().map(|&id| model.weight(id)).sum()
        })
        .collect();
    let (_, median, _) = logits.select_nth_unstable_by(PILOT_EXAMPLES / 2, f64::total_cmp);
    SHAPE.median_logit - *median
}

fn draw_examples(model: &TrueModel, sampler: &PowerLaw, active: usize, count: usize, rng: &mut impl Rng) -> Examples {
    let mut ex = Examples {
        starts: Vec::with_capacity(count + 1),
        keys: Vec::with_capacity(count * (active + 1)),
        labels: Vec::with_capacity(count),
        true_logits: Vec::with_capacity(count),
    };
    ex.starts.push(0);
    let mut ids = Vec::with_capacity(active);
    for _ in 0..count {
        draw_distinct_ids(sampler, active, rng, &mut ids);
        let logit = model.logit(&ids);
        ex.keys.push(model.bias_key());
        ex.keys.extend(ids.iter().map(|&id| model.key(id)));
        ex.starts.push(ex.keys.len());
        ex.labels.push(if rng.gen::<f64>() < sigmoid_f64(logit) { 1.0 } else { 0.0 });
        ex.true_logits.push(logit as f32);
    }
    ex
}

/// Draws `active` distinct ids, rejecting repeats: a binary feature is either on or off.
fn draw_distinct_ids(sampler: &PowerLaw, active: usize, rng: &mut impl Rng, ids: &mut Vec<u64>) {
    ids.clear();
    while ids.len() < active {
        let id = sampler.sample(rng.gen());
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
}

/// Gathers the sorted unique keys of the examples `batch` into `keys` (cleared first). Allocates
/// only when `keys` must grow.
pub fn batch_keys(ex: &Examples, batch: Range<usize>, keys: &mut Vec<u64>) {
    keys.clear();
    keys.extend_from_slice(ex.keys_of(batch));
    keys.sort_unstable();
    keys.dedup();
}

/// The logistic-loss gradient of the examples `batch`, summed over the batch, for the sorted
/// unique `keys` with pulled `weights`, written to `grad`. Summed rather than averaged: adagrad
/// divides out each key's gradient scale, so both train alike, and the sum keeps gradients in
/// per-example units whatever the batch size. Returns the batch's mean log-loss. Panics if an
/// example's key is missing from `keys`.
pub fn batch_gradient(ex: &Examples, batch: Range<usize>, keys: &[u64], weights: &[f32], grad: &mut [f32]) -> f64 {
    assert_eq!(keys.len(), weights.len(), "one pulled weight per key");
    assert_eq!(keys.len(), grad.len(), "one gradient slot per key");
    grad.fill(0.0);
    let slot = |key: &u64| match keys.binary_search(key) {
        Ok(slot) => slot,
        Err(_) => panic!("key {key:#018x} of the batch is missing from the batch's keys"),
    };
    let count = batch.len();
    let mut loss_sum = 0.0;
    for i in batch {
        let logit: f32 = ex.keys(i).iter().map(|k| weights[slot(k)]).sum();
        let label = ex.label(i);
        loss_sum += log_loss(logit, label);
        let residual = sigmoid(logit) - label;
        for k in ex.keys(i) {
            grad[slot(k)] += residual;
        }
    }
    if count == 0 {
        0.0
    } else {
        loss_sum / count as f64
    }
}

/// Held-out (mean log-loss, accuracy) of the model whose weights `weight` looks up.
pub fn evaluate(ex: &Examples, weight: impl Fn(u64) -> f32) -> (f64, f64) {
    metrics((0..ex.len()).map(|i| (ex.keys(i).iter().map(|&k| weight(k)).sum(), ex.label(i))))
}

/// The sorted unique keys of all examples in `ex`: what the demo pulls to evaluate.
pub fn unique_keys(ex: &Examples) -> Vec<u64> {
    let mut keys = Vec::new();
    batch_keys(ex, 0..ex.len(), &mut keys);
    keys
}

/// (mean log-loss, accuracy) over (logit, label) pairs; a logit of 0 predicts 1.
fn metrics(pairs: impl Iterator<Item = (f32, f32)>) -> (f64, f64) {
    let (mut n, mut loss, mut correct) = (0usize, 0.0, 0usize);
    for (logit, label) in pairs {
        n += 1;
        loss += log_loss(logit, label);
        correct += usize::from((logit >= 0.0) == (label == 1.0));
    }
    if n == 0 {
        return (0.0, 0.0);
    }
    (loss / n as f64, correct as f64 / n as f64)
}

/// -ln p(label | logit), computed without overflow for any logit.
fn log_loss(logit: f32, label: f32) -> f64 {
    let z = f64::from(logit);
    let softplus = z.max(0.0) + (-z.abs()).exp().ln_1p();
    softplus - f64::from(label) * z
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

fn sigmoid_f64(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// A power law over ids 0..n, drawn in O(1) without a table by inverting the CDF of the
/// continuous power law on [1, n + 1) and flooring: id r - 1 gets probability close to
/// r^-s / H(n, s).
#[derive(Debug, Clone, Copy)]
struct PowerLaw {
    n: u64,
    /// 1 - s, or exactly 0 for s = 1 (the logarithmic case).
    one_minus_s: f64,
    /// The CDF's range: ln(n + 1) for s = 1, (n + 1)^(1 - s) - 1 otherwise.
    span: f64,
}

impl PowerLaw {
    fn new(n: u64, exponent: f64) -> Self {
        assert!(n >= 1, "a power law needs at least one id");
        let top = n as f64 + 1.0;
        let one_minus_s = 1.0 - exponent;
        if one_minus_s.abs() < 1e-9 {
            PowerLaw { n, one_minus_s: 0.0, span: top.ln() }
        } else {
            PowerLaw { n, one_minus_s, span: top.powf(one_minus_s) - 1.0 }
        }
    }

    /// Maps a uniform draw `u` in [0, 1) to an id.
    fn sample(&self, u: f64) -> u64 {
        let x = if self.one_minus_s == 0.0 { (u * self.span).exp() } else { (1.0 + u * self.span).powf(1.0 / self.one_minus_s) };
        // Rounding can land on n + 1 exactly; fold it into the last id.
        (x as u64).clamp(1, self.n) - 1
    }
}

/// The splitmix64 finalizer: a bijection on u64 that makes consecutive inputs look random.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A standard normal value from 64 random bits (Box-Muller on the two 32-bit halves).
fn gaussian(bits: u64) -> f64 {
    let uniform = |b: u64| ((b & 0xFFFF_FFFF) as f64 + 0.5) / 4_294_967_296.0;
    let (u1, u2) = (uniform(bits), uniform(bits >> 32));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::time::Instant;

    fn small() -> DataConfig {
        DataConfig { features: 100_000, examples: 20_000, active: 30, ..DataConfig::default() }
    }

    fn tiny() -> DataConfig {
        DataConfig { features: 2_000, examples: 500, active: 10, ..DataConfig::default() }
    }

    #[test]
    fn default_config_is_valid_and_bad_ones_say_why() {
        assert_eq!(DataConfig::default().validate(), Ok(()));
        assert_eq!(small().validate(), Ok(()));
        let bad = [
            DataConfig { active: 0, ..tiny() },
            DataConfig { features: 39, ..tiny() },
            DataConfig { features: FEATURES_MAX + 1, ..tiny() },
            DataConfig { examples: KEYS_MAX, ..tiny() },
            DataConfig { heldout_fraction: 0.0, ..tiny() },
            DataConfig { heldout_fraction: 1.0, ..tiny() },
            DataConfig { heldout_fraction: f64::NAN, ..tiny() },
            DataConfig { examples: 4, ..tiny() },
        ];
        for cfg in bad {
            let problem = cfg.validate().expect_err("invalid config accepted");
            assert!(!problem.is_empty(), "{cfg:?}");
        }
    }

    #[test]
    #[should_panic(expected = "invalid demo data configuration")]
    fn generate_rejects_an_invalid_config() {
        generate(&DataConfig { active: 0, ..tiny() });
    }

    #[test]
    fn examples_have_the_bias_first_then_distinct_features() {
        let cfg = tiny();
        let ds = generate(&cfg);
        assert_eq!(ds.train.len() + ds.test.len(), cfg.examples);
        assert!(!ds.test.is_empty() && Examples::default().is_empty());
        assert_eq!(ds.test.len(), 50);
        let bias = ds.true_model.bias_key();
        let feature_keys: HashSet<u64> = (0..cfg.features).map(|id| ds.true_model.key(id)).collect();
        assert_eq!(feature_keys.len() as u64, cfg.features, "keys collide");
        assert!(!feature_keys.contains(&bias));
        for ex in [&ds.train, &ds.test] {
            for i in 0..ex.len() {
                let keys = ex.keys(i);
                assert_eq!(keys.len(), cfg.active + 1);
                assert_eq!(keys[0], bias);
                assert!(keys[1..].iter().all(|k| feature_keys.contains(k)));
                assert_eq!(keys.iter().collect::<HashSet<_>>().len(), keys.len(), "repeated key");
                assert!(ex.label(i) == 0.0 || ex.label(i) == 1.0);
            }
        }
    }

    #[test]
    fn labels_follow_the_true_model() {
        let ds = generate(&small());
        let m = ds.true_model;
        let ids: HashMap<u64, u64> = (0..small().features).map(|id| (m.key(id), id)).collect();
        let t = &ds.test;
        for i in 0..t.len() {
            let logit = m.bias() + t.keys(i)[1..].iter().map(|k| m.weight(ids[k])).sum::<f64>();
            assert!((logit - f64::from(t.true_logit(i))).abs() < 1e-4);
        }
        // Evaluating the true weights through `evaluate` agrees with the stored logits.
        let weight = |k: u64| {
            if k == m.bias_key() {
                m.bias() as f32
            } else {
                m.weight(ids[&k]) as f32
            }
        };
        let (loss, accuracy) = evaluate(t, weight);
        let (true_loss, true_accuracy) = ds.true_model_metrics();
        assert!((loss - true_loss).abs() < 1e-4 && (accuracy - true_accuracy).abs() < 1e-3);
        // Clearly better than chance, yet far from certain; classes near balanced.
        assert!((0.75..0.9).contains(&true_accuracy), "true model accuracy {true_accuracy}");
        let positive = (0..t.len()).map(|i| f64::from(t.label(i))).sum::<f64>() / t.len() as f64;
        assert!((0.4..0.65).contains(&positive), "positive rate {positive}");
    }

    #[test]
    fn generation_is_seeded() {
        let a = generate(&tiny());
        let b = generate(&tiny());
        assert_eq!((a.train.keys, a.train.labels), (b.train.keys, b.train.labels));
        let c = generate(&DataConfig { seed: 7, ..tiny() });
        assert_ne!(a.test.keys, c.test.keys);
        // The held-out split depends on the seed, not on the training split's size.
        let d = generate(&DataConfig { examples: 1_000, heldout_fraction: 0.05, ..tiny() });
        assert_eq!((a.test.keys, a.test.labels), (d.test.keys, d.test.labels));
    }

    #[test]
    fn keys_spread_over_the_whole_key_space() {
        let ds = generate(&tiny());
        let keys = unique_keys(&ds.train);
        let high = keys.iter().filter(|&&k| k >> 63 == 1).count() as f64 / keys.len() as f64;
        let top_byte: HashSet<u64> = keys.iter().map(|k| k >> 56).collect();
        assert!((0.4..0.6).contains(&high), "fraction with the top bit set {high}");
        assert!(top_byte.len() > 200, "only {} distinct top bytes", top_byte.len());
    }

    #[test]
    fn power_law_stays_in_range_and_favours_low_ids() {
        for exponent in [1.0, 1.35, 2.0] {
            let law = PowerLaw::new(1_000, exponent);
            assert_eq!(law.sample(0.0), 0);
            assert_eq!(law.sample(1.0 - f64::EPSILON), 999);
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
            let mut counts = [0u32; 1_000];
            for _ in 0..200_000 {
                counts[law.sample(rng.gen()) as usize] += 1;
            }
            // Frequency falls with rank, in the ratio the floored continuous law predicts.
            assert!(counts.windows(2).take(5).all(|w| w[0] > w[1]), "{exponent}: {:?}", &counts[..6]);
            let cdf = |x: f64| {
                if exponent == 1.0 {
                    x.ln()
                } else {
                    (x.powf(1.0 - exponent) - 1.0) / (1.0 - exponent)
                }
            };
            let expected = (cdf(2.0) - cdf(1.0)) / (cdf(11.0) - cdf(10.0));
            let ratio = f64::from(counts[0]) / f64::from(counts[9]);
            assert!((ratio / expected - 1.0).abs() < 0.15, "{exponent}: ratio {ratio}, expected {expected}");
        }
        assert_eq!(PowerLaw::new(1, 1.35).sample(0.7), 0);
    }

    #[test]
    fn batch_keys_are_the_sorted_unique_keys_of_the_batch() {
        let ds = generate(&tiny());
        let mut keys = vec![1, 2, 3];
        batch_keys(&ds.train, 10..20, &mut keys);
        let expected: Vec<u64> = (10..20).flat_map(|i| ds.train.keys(i).to_vec()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        assert_eq!(keys, expected);
        batch_keys(&ds.train, 5..5, &mut keys);
        assert!(keys.is_empty());
        assert_eq!(unique_keys(&ds.test).len(), ds.test.keys.iter().collect::<HashSet<_>>().len());
    }

    /// The summed batch loss at `weights`, for the finite-difference check.
    fn batch_loss_sum(ex: &Examples, batch: Range<usize>, keys: &[u64], weights: &[f32]) -> f64 {
        let mut grad = vec![0.0; keys.len()];
        batch_gradient(ex, batch.clone(), keys, weights, &mut grad) * batch.len() as f64
    }

    #[test]
    fn batch_gradient_matches_finite_differences() {
        let ds = generate(&tiny());
        let batch = 0..8;
        let mut keys = Vec::new();
        batch_keys(&ds.train, batch.clone(), &mut keys);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let weights: Vec<f32> = keys.iter().map(|_| rng.gen_range(-0.5..0.5)).collect();
        let mut grad = vec![f32::NAN; keys.len()];
        let loss = batch_gradient(&ds.train, batch.clone(), &keys, &weights, &mut grad);
        assert!(loss > 0.0 && loss.is_finite());
        let h = 1e-2;
        for slot in [0, keys.len() / 2, keys.len() - 1] {
            let mut plus = weights.clone();
            plus[slot] += h;
            let mut minus = weights.clone();
            minus[slot] -= h;
            let numeric =
                (batch_loss_sum(&ds.train, batch.clone(), &keys, &plus) - batch_loss_sum(&ds.train, batch.clone(), &keys, &minus)) / (2.0 * f64::from(h));
            assert!((numeric - f64::from(grad[slot])).abs() < 1e-2, "slot {slot}: {numeric} vs {}", grad[slot]);
        }
        // The bias is in every example, so its gradient is the sum of all residuals.
        let residuals: f32 = batch
            .map(|i| {
                let logit: f32 = ds.train.keys(i).iter().map(|k| weights[keys.binary_search(k).unwrap()]).sum();
                sigmoid(logit) - ds.train.label(i)
            })
            .sum();
        let bias_slot = keys.binary_search(&ds.true_model.bias_key()).unwrap();
        assert!((grad[bias_slot] - residuals).abs() < 1e-5);
    }

    #[test]
    #[should_panic(expected = "missing from the batch's keys")]
    fn batch_gradient_rejects_keys_from_another_batch() {
        let ds = generate(&tiny());
        let mut keys = Vec::new();
        batch_keys(&ds.train, 0..2, &mut keys);
        let mut grad = vec![0.0; keys.len()];
        batch_gradient(&ds.train, 0..50, &keys, &vec![0.0; keys.len()], &mut grad);
    }

    #[test]
    fn log_loss_is_finite_at_extreme_logits() {
        assert!((log_loss(0.0, 1.0) - 2f64.ln()).abs() < 1e-12);
        assert!(log_loss(1e30, 1.0) < 1e-12 && log_loss(-1e30, 0.0) < 1e-12);
        assert!((log_loss(1e4, 0.0) - 1e4).abs() < 1e-6);
        assert_eq!(metrics(std::iter::empty()), (0.0, 0.0));
        assert_eq!(metrics([(0.0, 1.0), (0.5, 0.0)].into_iter()).1, 0.5);
    }

    /// The demo's server table, reproduced: zero-initialised weights updated by adagrad
    /// (s += g^2; w -= lr * g / (sqrt(s) + eps)).
    struct SimServer {
        table: HashMap<u64, (f32, f32)>,
        lr: f32,
    }

    impl SimServer {
        fn pull(&self, keys: &[u64], weights: &mut Vec<f32>) {
            weights.clear();
            weights.extend(keys.iter().map(|k| self.table.get(k).map_or(0.0, |e| e.0)));
        }

        fn push(&mut self, keys: &[u64], grad: &[f32]) {
            for (&k, &g) in keys.iter().zip(grad) {
                let (w, s) = self.table.entry(k).or_insert((0.0, 0.0));
                *s += g * g;
                *w -= self.lr * g / (s.sqrt() + 1e-8);
            }
        }
    }

    #[derive(Default)]
    struct SimWorker {
        slice: Range<usize>,
        batch: Range<usize>,
        keys: Vec<u64>,
        weights: Vec<f32>,
        grad: Vec<f32>,
    }

    /// Trains like the demo: two workers, each walking its half of the training split, whose
    /// steps interleave with one batch of staleness (both pull, then both push, so the second
    /// worker's gradient misses the first one's update). Returns held-out (log-loss, accuracy)
    /// after each epoch.
    fn simulate(ds: &Dataset, lr: f32, batch: usize, epochs: usize) -> Vec<(f64, f64)> {
        let mut server = SimServer { table: HashMap::new(), lr };
        let n = ds.train.len();
        let mut workers = [0..n / 2, n / 2..n].map(|slice| SimWorker { slice, ..SimWorker::default() });
        let mut history = Vec::new();
        for _ in 0..epochs {
            workers.iter_mut().for_each(|w| w.batch = w.slice.start..w.slice.start);
            while workers.iter().any(|w| w.batch.end < w.slice.end) {
                for w in &mut workers {
                    w.batch = w.batch.end..(w.batch.end + batch).min(w.slice.end);
                    batch_keys(&ds.train, w.batch.clone(), &mut w.keys);
                    server.pull(&w.keys, &mut w.weights);
                }
                for w in &mut workers {
                    w.grad.resize(w.keys.len(), 0.0);
                    batch_gradient(&ds.train, w.batch.clone(), &w.keys, &w.weights, &mut w.grad);
                    server.push(&w.keys, &w.grad);
                }
            }
            history.push(evaluate(&ds.test, |k| server.table.get(&k).map_or(0.0, |e| e.0)));
        }
        history
    }

    /// Generates `cfg`, trains with the default constants, prints the run and asserts the
    /// final held-out accuracy is within `margin` of the true model's.
    fn check_training_reaches_true_model(cfg: &DataConfig, margin: f64) {
        let started = Instant::now();
        let ds = generate(cfg);
        let generate_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let history = simulate(&ds, DEFAULT_LR, DEFAULT_BATCH, DEFAULT_EPOCHS);
        let epoch_s = started.elapsed().as_secs_f64() / DEFAULT_EPOCHS as f64;
        let true_accuracy = ds.true_model_accuracy();
        println!("{cfg:?}: generate {generate_s:.2} s, {epoch_s:.2} s per simulated epoch");
        println!("  true model accuracy {true_accuracy:.4}");
        for (epoch, (loss, accuracy)) in history.iter().enumerate() {
            println!("  epoch {}: held-out log-loss {loss:.4}, accuracy {accuracy:.4}", epoch + 1);
        }
        let (_, accuracy) = *history.last().expect("at least one epoch");
        assert!(accuracy >= true_accuracy - margin, "held-out accuracy {accuracy:.4} is more than {margin} below the true model's {true_accuracy:.4}");
    }

    /// Guards the tuned constants: the demo's bound is 0.03 under real asynchrony, so the
    /// simulation must keep 0.01 in hand.
    #[test]
    fn simulated_training_reaches_the_true_model_on_the_small_data_set() {
        check_training_reaches_true_model(&small(), 0.02);
    }

    /// The same on the demo's default data set; a few seconds in release:
    /// `cargo test --release -p tessera-tools demo::data -- --ignored --nocapture`.
    #[test]
    #[ignore = "slow in debug builds; run in release"]
    fn simulated_training_reaches_the_true_model_on_the_default_data_set() {
        check_training_reaches_true_model(&DataConfig::default(), 0.02);
    }
}
