//! Push filters (Li et al., OSDI'14, section 3.5 "User-defined Filters"): a worker decides, key
//! by key, which gradients are worth sending now.
//!
//! A filter sees one push (keys, `dim` gradient components per key) and writes the keys to send,
//! with the gradients to send for them, into two output vectors. What it holds back is its own
//! business: [`SignificantlyModified`] keeps accumulating it locally and sends it once it adds up
//! (nothing is dropped for good), [`RandomSkip`] drops it and scales up what it sends, [`Kkt`]
//! drops what an L1-regularised model would ignore anyway. Write your own by implementing
//! [`Filter`]; use any of them with [`Client::push_filtered`](crate::Client::push_filtered).

use std::collections::HashMap;

/// Picks what a push sends. `keep_keys` and `keep_grads` arrive empty; fill them with the keys to
/// send and `dim` values per key, in any order (a key may appear more than once).
pub trait Filter: Send {
    fn filter(&mut self, dim: usize, keys: &[u64], grads: &[f32], keep_keys: &mut Vec<u64>, keep_grads: &mut Vec<f32>);
}

/// Sends a key only once its change, accumulated over pushes, exceeds `threshold` in some
/// component (absolute value); until then the change stays here and keeps adding up. What is
/// held back is sent by [`SignificantlyModified::flush`], so the server ends with exactly what
/// the worker pushed (up to float rounding in the accumulation).
#[derive(Debug, Clone)]
pub struct SignificantlyModified {
    threshold: f32,
    /// Per key held back: its accumulated change (`dim` values).
    held: HashMap<u64, Box<[f32]>>,
}

impl SignificantlyModified {
    pub fn new(threshold: f32) -> Self {
        Self { threshold, held: HashMap::new() }
    }

    /// Keys whose change is held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Takes everything held back, to be pushed as is (for example at the end of an epoch).
    pub fn flush(&mut self, keys: &mut Vec<u64>, grads: &mut Vec<f32>) {
        let mut held: Vec<_> = self.held.drain().collect();
        held.sort_unstable_by_key(|(k, _)| *k);
        for (k, g) in held {
            keys.push(k);
            grads.extend_from_slice(&g);
        }
    }
}

impl Filter for SignificantlyModified {
    fn filter(&mut self, dim: usize, keys: &[u64], grads: &[f32], keep_keys: &mut Vec<u64>, keep_grads: &mut Vec<f32>) {
        for (&k, g) in keys.iter().zip(grads.chunks_exact(dim)) {
            let acc = self.held.entry(k).or_insert_with(|| vec![0.0; dim].into_boxed_slice());
            acc.iter_mut().zip(g).for_each(|(a, g)| *a += g);
            if acc.iter().any(|a| a.abs() > self.threshold) {
                keep_keys.push(k);
                keep_grads.extend_from_slice(acc);
                self.held.remove(&k);
            }
        }
    }
}

/// Drops each key with probability `skip`, and scales the gradients it sends by
/// `1 / (1 - skip)`, so the expected update is the same. Seeded, so runs repeat.
#[derive(Debug, Clone)]
pub struct RandomSkip {
    skip: f64,
    state: u64,
}

impl RandomSkip {
    /// `skip` in `[0, 1)`.
    pub fn new(skip: f64, seed: u64) -> Self {
        assert!((0.0..1.0).contains(&skip), "RandomSkip: skip must be in [0, 1), got {skip}");
        Self { skip, state: seed }
    }

    /// Uniform in [0, 1) (splitmix64).
    fn next(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.state;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (x ^ (x >> 31)) as f64 / (u64::MAX as f64 + 1.0)
    }
}

impl Filter for RandomSkip {
    fn filter(&mut self, dim: usize, keys: &[u64], grads: &[f32], keep_keys: &mut Vec<u64>, keep_grads: &mut Vec<f32>) {
        let scale = (1.0 / (1.0 - self.skip)) as f32;
        for (&k, g) in keys.iter().zip(grads.chunks_exact(dim)) {
            if self.next() >= self.skip {
                keep_keys.push(k);
                keep_grads.extend(g.iter().map(|g| g * scale));
            }
        }
    }
}

/// The KKT filter for L1-regularised models (the paper's section 5.1): a weight that is zero
/// stays zero after a proximal (soft-threshold) step when its gradient is within `lambda`, the L1
/// strength, in every component, so such keys need not be sent. The filter knows a key's weight
/// from what the worker last pulled: hand every pull's keys and values to
/// [`Kkt::observe`]. Keys it has not seen count as zero.
#[derive(Debug, Clone)]
pub struct Kkt {
    lambda: f32,
    /// Keys whose last pulled weight was not zero.
    nonzero: std::collections::HashSet<u64>,
}

impl Kkt {
    pub fn new(lambda: f32) -> Self {
        Self { lambda, nonzero: Default::default() }
    }

    /// Records the weights just pulled for `keys` (`dim` per key).
    pub fn observe(&mut self, dim: usize, keys: &[u64], values: &[f32]) {
        for (&k, v) in keys.iter().zip(values.chunks_exact(dim)) {
            if v.iter().any(|v| *v != 0.0) {
                self.nonzero.insert(k);
            } else {
                self.nonzero.remove(&k);
            }
        }
    }
}

impl Filter for Kkt {
    fn filter(&mut self, dim: usize, keys: &[u64], grads: &[f32], keep_keys: &mut Vec<u64>, keep_grads: &mut Vec<f32>) {
        for (&k, g) in keys.iter().zip(grads.chunks_exact(dim)) {
            if self.nonzero.contains(&k) || g.iter().any(|g| g.abs() > self.lambda) {
                keep_keys.push(k);
                keep_grads.extend_from_slice(g);
            }
        }
    }
}
