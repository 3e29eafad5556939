//! The data set and model math of `tessera demo`: a seeded synthetic hashed-feature data set drawn
//! from a known logistic-regression model, and the per-minibatch gradient the demo's workers push.
//!
//! Why the data looks the way it does:
//! - Feature ids follow a power law over `features` ids, as hashed features in real logs do: a few
//!   ids occur in most examples and most ids are rare.
//! - Keys are the ids run through a seeded splitmix64 mixer, so they spread over the whole u64 key
//!   space as a hashed-feature pipeline's keys do. The mixer is a bijection, so ids never collide.
//! - The true weights are large for frequent ids and decay over the tail, so the labels' signal is
//!   carried by ids seen often enough to be learned in a few epochs. The many rare ids carry
//!   near-zero weight; that is realistic, and it is what lets a few epochs of training come close
//!   to the true model on held-out data.
//! - True weights are a hash of (seed, id) rather than a stored table, so the true model costs no
//!   memory however many features there are.

use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// Server-side adagrad learning rate the demo should configure; tuned with the constants below
/// by the simulation test at the end of this file.
pub const DEFAULT_LR: f32 = 0.1;
/// Examples per minibatch: one pull and one push per minibatch.
pub const DEFAULT_BATCH: usize = 100;
/// Passes over the training examples.
pub const DEFAULT_EPOCHS: usize = 3;

/// The largest feature count: ids are drawn through f64, which is exact up to 2^53; 2^40 keeps
/// the power-law sampler's rounding far from that.
pub const FEATURES_MAX: u64 = 1 << 40;

/// What to generate. Every field has a default; `validate` says what is wrong with a bad one.
#[derive(Debug, Clone, PartialEq)]
pub struct DataConfig {
    /// Distinct hashed feature ids (not counting the bias).
    pub features: u64,
    /// Examples in total, train and held-out together.
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
        if self.features < 4 * self.active as u64 || self.features > FEATURES_MAX {
            return Err(format!(
                "features must be between 4 x active ({}) and {FEATURES_MAX}; got {}",
                4 * self.active,
                self.features
            ));
        }
        if !(self.heldout_fraction > 0.0 && self.heldout_fraction < 1.0) {
            return Err(format!("heldout fraction must be strictly between 0 and 1; got {}", self.heldout_fraction));
        }
        let test = self.test_examples();
        if test == 0 || test == self.examples {
            return Err(format!(
                "{} examples with heldout fraction {} leave train or held-out empty; use more examples",
                self.examples, self.heldout_fraction
            ));
        }
        Ok(())
    }

    fn test_examples(&self) -> usize {
        (self.examples as f64 * self.heldout_fraction).round() as usize
    }
}

/// The shape of the generated task; fixed, because the tuned training constants depend on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shape {
    /// Power-law exponent of feature id frequency (1.0 is classic Zipf).
    pub zipf_exponent: f64,
    /// Standard deviation of the weights of the most frequent ids.
    pub weight_scale: f64,
    /// Ids ranked beyond this see their weight scale decay.
    pub signal_ranks: f64,
    /// How fast: scale = weight_scale * (1 + rank / signal_ranks)^-tail_decay.
    pub tail_decay: f64,
    /// The true model's median logit: the bias is chosen to put it here, so that the classes
    /// stay near balanced whatever weights the seed gives the features present in most examples.
    pub median_logit: f64,
}

pub(crate) const SHAPE: Shape =
    Shape { zipf_exponent: 1.0, weight_scale: 0.8, signal_ranks: 300.0, tail_decay: 1.0, median_logit: 0.2 };

/// The model that generated the labels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrueModel {
    key_salt: u64,
    weight_salt: u64,
    features: u64,
    shape: Shape,
    bias: f64,
}

impl TrueModel {
    fn new(cfg: &DataConfig, shape: Shape) -> Self {
        let (key_salt, weight_salt) = (splitmix64(cfg.seed), splitmix64(!cfg.seed));
        TrueModel { key_salt, weight_salt, features: cfg.features, shape, bias: 0.0 }
    }

    /// Sets the bias so that the median logit of a pilot sample lands on `shape.median_logit`.
    fn centre(&mut self, sampler: &PowerLaw, active: usize, rng: &mut impl Rng) {
        const PILOT_EXAMPLES: usize = 2001;
        let mut ids = Vec::with_capacity(active);
        let mut logits: Vec<f64> = (0..PILOT_EXAMPLES)
            .map(|_| {
                draw_distinct_ids(sampler, active, rng, &mut ids);
                ids.iter().map(|&id| self.weight(id)).sum()
            })
            .collect();
        let (_, median, _) = logits.select_nth_unstable_by(PILOT_EXAMPLES / 2, f64::total_cmp);
        self.bias = self.shape.median_logit - *median;
    }

    /// The hashed key of feature id `feature` (ids are ranks: 0 is the most frequent).
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
        let s = &self.shape;
        let scale = s.weight_scale * (1.0 + feature as f64 / s.signal_ranks).powf(-s.tail_decay);
        scale * gaussian(splitmix64(feature ^ self.weight_salt))
    }

    /// The true bias.
    pub fn bias(&self) -> f64 {
        self.bias
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

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The keys of example `i`, bias first; feature values are all 1.0.
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

    /// The keys of a run of examples, back to back (the CSR layout makes this a single slice).
    fn keys_of(&self, batch: Range<usize>) -> &[u64] {
        &self.keys[self.starts[batch.start]..self.starts[batch.end]]
    }
}

/// The generated data: a training split, a held-out split and the model that labelled both.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub train: Examples,
    pub test: Examples,
    pub true_model: TrueModel,
}

impl Dataset {
    /// The true model's accuracy on the held-out split: the best a learner can expect.
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
    generate_shaped(cfg, SHAPE)
}

pub(crate) fn generate_shaped(cfg: &DataConfig, shape: Shape) -> Dataset {
    if let Err(problem) = cfg.validate() {
        panic!("invalid demo data configuration: {problem}");
    }
    let sampler = PowerLaw::new(cfg.features, shape.zipf_exponent);
    // Independent streams per use, so the held-out split does not shift when the training
    // split's draws change.
    let split_rng = |split: u64| Xoshiro256PlusPlus::seed_from_u64(splitmix64(cfg.seed ^ split));
    let mut model = TrueModel::new(cfg, shape);
    model.centre(&sampler, cfg.active, &mut split_rng(3));
    let test_count = cfg.test_examples();
    let train = draw_examples(&model, &sampler, cfg.active, cfg.examples - test_count, &mut split_rng(1));
    let test = draw_examples(&model, &sampler, cfg.active, test_count, &mut split_rng(2));
    Dataset { train, test, true_model: model }
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
        let logit = model.bias() + ids.iter().map(|&id| model.weight(id)).sum::<f64>();
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

/// Gathers the sorted unique keys of the examples `batch` into `keys` (cleared first).
pub fn batch_keys(ex: &Examples, batch: Range<usize>, keys: &mut Vec<u64>) {
    keys.clear();
    keys.extend_from_slice(ex.keys_of(batch));
    keys.sort_unstable();
    keys.dedup();
}

/// The logistic-loss gradient of the examples `batch`, summed over the batch (adagrad divides
/// out the scale, and a sum keeps a rare feature's single occurrence from being shrunk by the
/// batch size), for the sorted unique `keys` with pulled `weights`, written to `grad`.
/// Returns the batch's mean log-loss. Panics if an example's key is missing from `keys`.
pub fn batch_gradient(ex: &Examples, batch: Range<usize>, keys: &[u64], weights: &[f32], grad: &mut [f32]) -> f64 {
    assert_eq!(keys.len(), weights.len(), "one pulled weight per key");
    assert_eq!(keys.len(), grad.len(), "one gradient slot per key");
    grad.fill(0.0);
    let slot = |key: &u64| match keys.binary_search(key) {
        Ok(slot) => slot,
        Err(_) => panic!("key {key:#x} of the batch is missing from the batch's keys"),
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

/// -log p(label | logit), computed without overflow for large |logit|.
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

/// A power law over ids 0..n, drawn in O(1) by inverting the continuous power law's CDF on
/// [1, n + 1) and flooring: id r - 1 has probability close to r^-s / H(n, s), without a table.
#[derive(Debug, Clone, Copy)]
struct PowerLaw {
    n: u64,
    /// 1 - s, or 0 for s = 1 (the logarithmic case).
    one_minus_s: f64,
    /// The CDF's range: ln(n + 1) for s = 1, (n + 1)^(1 - s) - 1 otherwise.
    span: f64,
}

impl PowerLaw {
    fn new(n: u64, exponent: f64) -> Self {
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
        let x = if self.one_minus_s == 0.0 {
            (u * self.span).exp()
        } else {
            (1.0 + u * self.span).powf(1.0 / self.one_minus_s)
        };
        // Rounding can land exactly on n + 1; fold it into the last id.
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

/// A standard normal value from 64 random bits (Box-Muller on two 32-bit halves).
fn gaussian(bits: u64) -> f64 {
    let half = |b: u64| ((b & 0xFFFF_FFFF) as f64 + 0.5) / 4_294_967_296.0;
    let (u1, u2) = (half(bits), half(bits >> 32));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests;
