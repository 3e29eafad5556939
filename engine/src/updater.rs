//! Server-side updaters: how a shard folds a pushed gradient into the values it stores.
//!
//! An updater is named by a spec string, `name` or `name{k=v,...}`, which a table definition carries and
//! [`UpdaterRegistry::build`] turns into an [`Updater`]. The builtins are `sum`, `assign`, `sgd`, `adagrad`,
//! `adam` and `ftrl`; applications add their own with [`UpdaterRegistry::register`].
//!
//! The engine calls [`Updater::update`] through `dyn Updater` once per contiguous range (dense tables) or once
//! per key (sparse tables), so each call must be cheap to enter and its inner loop must run near memory
//! bandwidth. The kernels therefore assert slice lengths once up front, walk the slices with `zip`, keep
//! per-element code free of branches (selects and `max` only) and hoist every per-call constant (Adam's bias
//! correction, FTRL's `1/alpha`) out of the loop, so that the compiler vectorises them.
//!
//! Hyper-parameters are parsed as `f64` (which is what [`Updater::spec`] reports back, exactly) and converted
//! to `f32` per call. Validation is done on the converted value, because that is the one the kernel uses:
//! `b1 = 0.99999999` is below 1 as an `f64` but rounds to 1.0 as an `f32`, which would divide by zero.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::error::{EngineError, Result};

/// Most f32 state slots any updater keeps per value component.
pub const STATE_SLOTS_MAX: usize = 2;

/// A server-side update rule. Implementations are plain data shared by all shards, hence `Send + Sync`.
pub trait Updater: Send + Sync + fmt::Debug + 'static {
    /// The spec string this updater was built from, e.g. "adam{lr=0.001,b1=0.9,b2=0.999,eps=1e-8}" (canonical: all
    /// params, fixed order).
    fn spec(&self) -> String;
    /// f32 state slots kept per value component, 0..=STATE_SLOTS_MAX.
    fn state_slots(&self) -> usize;
    /// Apply gradient `grad` to `value` in place. `s0`/`s1` are this component range's state slots (same length as
    /// `value`); slots the updater does not use are empty slices. `step` is the 1-based count of pushes applied to
    /// this table on this shard, including this one (Adam's bias correction uses it). All slices other than unused
    /// slots have equal length.
    fn update(&self, value: &mut [f32], s0: &mut [f32], s1: &mut [f32], grad: &[f32], step: u64);
    /// Initial value of state slot `slot` (default 0.0; e.g. Adagrad may start its accumulator at 0).
    fn state_init(&self, _slot: usize) -> f32 {
        0.0
    }
}

/// Names the registry builds without registration, in the order error messages list them.
const BUILTIN_NAMES: [&str; 6] = ["sum", "assign", "sgd", "adagrad", "adam", "ftrl"];

// The widest builtin (Adam, FTRL) must fit the engine's per-component state layout.
const _: () = assert!(STATE_SLOTS_MAX >= 2, "adam and ftrl keep two state slots per component");

// ---------------------------------------------------------------------------------------------------------------
// Spec parsing
// ---------------------------------------------------------------------------------------------------------------

/// Parsed parameters of a spec: name and ordered key=value f64 params.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    spec: String,
    name: String,
    params: Vec<(String, f64)>,
}

impl Params {
    /// The updater name, the part before `{`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value given for `key`, if the spec named it.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.params.iter().find(|(k, _)| k == key).map(|&(_, v)| v)
    }

    /// The value given for `key`, or `default` when the spec left it out.
    pub fn get_or(&self, key: &str, default: f64) -> f64 {
        self.get(key).unwrap_or(default)
    }

    /// The parameters in the order the spec gave them, so a user-defined maker can reject keys it does not know.
    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> + '_ {
        self.params.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// The spec text these parameters were parsed from, for the `spec` field of a maker's `BadUpdater` error.
    pub fn spec(&self) -> &str {
        &self.spec
    }
}

/// The one error shape of this module; `spec` is what the user wrote, so they can find it in their config.
fn bad(spec: &str, reason: impl Into<String>) -> EngineError {
    EngineError::BadUpdater { spec: spec.to_string(), reason: reason.into() }
}

/// Parses `name` or `name{k=v,k=v}` (whitespace tolerated around every token). Values are finite f64 literals;
/// keys may appear once each. Unknown names and keys are not checked here, that is the registry's job.
pub fn parse_spec(spec: &str) -> Result<Params> {
    let text = spec.trim();
    let (name, body) = match text.find('{') {
        None if text.contains('}') => return Err(bad(spec, "found '}' without an opening '{'")),
        None => (text, None),
        Some(open) => {
            let rest = &text[open + 1..];
            if rest.contains('{') {
                return Err(bad(spec, "more than one '{'; write name{k=v,k=v}"));
            }
            let Some(close) = rest.find('}') else {
                return Err(bad(spec, "missing closing '}' after the parameters"));
            };
            if close + 1 != rest.len() {
                let trailing = &rest[close + 1..];
                return Err(bad(spec, format!("unexpected {trailing:?} after the closing '}}'")));
            }
            (text[..open].trim_end(), Some(&rest[..close]))
        }
    };
    check_identifier(spec, name, "updater name")?;
    let params = match body {
        Some(body) => parse_params(spec, body)?,
        None => Vec::new(),
    };
    Ok(Params { spec: spec.to_string(), name: name.to_string(), params })
}

/// Parses the `k=v,k=v` between the braces. An empty body (`sgd{}`) means "all defaults".
fn parse_params(spec: &str, body: &str) -> Result<Vec<(String, f64)>> {
    if body.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut params: Vec<(String, f64)> = Vec::new();
    for item in body.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(bad(spec, "empty parameter between commas; write name{k=v,k=v}"));
        }
        let Some((key, literal)) = item.split_once('=') else {
            return Err(bad(spec, format!("parameter {item:?} has no '='; write it as key=value")));
        };
        let (key, literal) = (key.trim(), literal.trim());
        check_identifier(spec, key, "parameter name")?;
        let value: f64 = literal.parse().map_err(|_| bad(spec, format!("cannot parse {literal:?} as a number for {key}; use e.g. 0.01 or 1e-8")))?;
        if !value.is_finite() {
            return Err(bad(spec, format!("{key}={literal} is not finite; give a finite number")));
        }
        if params.iter().any(|(k, _)| k == key) {
            return Err(bad(spec, format!("parameter {key} is given twice; keep one")));
        }
        params.push((key.to_string(), value));
    }
    Ok(params)
}

/// Names and keys are ASCII letters, digits and '_', so a spec never needs quoting in a config file.
fn check_identifier(spec: &str, ident: &str, what: &str) -> Result<()> {
    if ident.is_empty() {
        return Err(bad(spec, format!("{what} is empty; a spec looks like sgd or sgd{{lr=0.1}}")));
    }
    if let Some(c) = ident.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        let hint = "use letters, digits and '_', with parameters in braces: name{k=v,k=v}";
        return Err(bad(spec, format!("{what} {ident:?} contains {c:?}; {hint}")));
    }
    Ok(())
}

/// Formats a parameter so that parsing it back gives the same f64 bits (Rust prints the shortest round-tripping
/// digits), in plain notation for ordinary magnitudes and exponent notation for tiny or huge ones ("1e-8").
fn format_number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude != 0.0 && !(1e-4..1e15).contains(&magnitude) {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}

/// The canonical spec: the name, then every parameter in the builtin's fixed order.
fn canonical_spec(name: &str, params: &[(&str, f64)]) -> String {
    if params.is_empty() {
        return name.to_string();
    }
    let body: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", format_number(*v))).collect();
    format!("{name}{{{}}}", body.join(","))
}

// ---------------------------------------------------------------------------------------------------------------
// Builtin parameter tables and validation
// ---------------------------------------------------------------------------------------------------------------

/// The admissible range of a builtin parameter, checked on its f32 value.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// > 0 and a normal f32, so that dividing by it or by `sqrt(0) + it` stays finite.
    Positive,
    /// >= 0.
    NonNegative,
    /// A moment decay: 0 <= b < 1 after rounding to f32, so Adam's `1 - b^t` is never 0.
    Decay,
}

/// One parameter of a builtin: its key, its default and its range.
#[derive(Debug, Clone, Copy)]
struct ParamDef {
    key: &'static str,
    default: f64,
    bound: Bound,
}

const fn def(key: &'static str, default: f64, bound: Bound) -> ParamDef {
    ParamDef { key, default, bound }
}

const NO_PARAMS: [ParamDef; 0] = [];
const SGD_PARAMS: [ParamDef; 1] = [def("lr", 0.01, Bound::Positive)];
const ADAGRAD_PARAMS: [ParamDef; 2] = [def("lr", 0.01, Bound::Positive), def("eps", 1e-8, Bound::Positive)];
const ADAM_PARAMS: [ParamDef; 4] =
    [def("lr", 0.001, Bound::Positive), def("b1", 0.9, Bound::Decay), def("b2", 0.999, Bound::Decay), def("eps", 1e-8, Bound::Positive)];
const FTRL_PARAMS: [ParamDef; 4] =
    [def("alpha", 0.05, Bound::Positive), def("beta", 1.0, Bound::NonNegative), def("l1", 1.0, Bound::NonNegative), def("l2", 1.0, Bound::NonNegative)];

/// Checks one value against its bound, saying what range is allowed when it is not.
fn check_bound(spec: &str, def: &ParamDef, value: f64) -> Result<()> {
    // The kernels compute in f32, so a value is judged by what it becomes there.
    let narrow = value as f32;
    let (ok, allowed) = match def.bound {
        Bound::Positive => (value > 0.0 && narrow.is_normal(), "> 0 (and within f32 range, 1.2e-38 to 3.4e38)"),
        Bound::NonNegative => (value >= 0.0 && narrow.is_finite(), ">= 0 (and at most 3.4e38, the f32 range)"),
        Bound::Decay => ((0.0..1.0).contains(&value) && narrow < 1.0, ">= 0 and < 1 (and still < 1 when rounded to f32)"),
    };
    if ok {
        Ok(())
    } else {
        Err(bad(spec, format!("{}={} is out of range; it must be {allowed}", def.key, format_number(value))))
    }
}

/// Resolves a builtin's parameters: rejects keys it does not have, fills defaults, checks ranges.
fn resolve<const N: usize>(spec: &str, params: &Params, defs: &[ParamDef; N]) -> Result<[f64; N]> {
    if let Some((key, _)) = params.iter().find(|(key, _)| !defs.iter().any(|d| d.key == *key)) {
        let valid = if defs.is_empty() {
            format!("{} takes no parameters", params.name())
        } else {
            let keys: Vec<&str> = defs.iter().map(|d| d.key).collect();
            format!("valid parameters of {} are {}", params.name(), keys.join(", "))
        };
        return Err(bad(spec, format!("unknown parameter {key:?}; {valid}")));
    }
    let mut values = [0.0; N];
    for (slot, def) in values.iter_mut().zip(defs) {
        *slot = params.get_or(def.key, def.default);
        check_bound(spec, def, *slot)?;
    }
    Ok(values)
}

/// Builds a builtin, or `None` when `params` names something else (a user-registered updater, perhaps).
fn build_builtin(params: &Params) -> Option<Result<Arc<dyn Updater>>> {
    let spec = params.spec();
    let built: Result<Arc<dyn Updater>> = match params.name() {
        "sum" => resolve(spec, params, &NO_PARAMS).map(|[]| Arc::new(Sum) as _),
        "assign" => resolve(spec, params, &NO_PARAMS).map(|[]| Arc::new(Assign) as _),
        "sgd" => resolve(spec, params, &SGD_PARAMS).map(|[lr]| Arc::new(Sgd { lr }) as _),
        "adagrad" => resolve(spec, params, &ADAGRAD_PARAMS).map(|[lr, eps]| Arc::new(Adagrad { lr, eps }) as _),
        "adam" => resolve(spec, params, &ADAM_PARAMS).map(|[lr, b1, b2, eps]| Arc::new(Adam { lr, b1, b2, eps }) as _),
        "ftrl" => resolve(spec, params, &FTRL_PARAMS).map(|[alpha, beta, l1, l2]| Arc::new(Ftrl { alpha, beta, l1, l2 }) as _),
        _ => return None,
    };
    Some(built)
}

// ---------------------------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------------------------

/// A user-supplied constructor: parsed params in, updater out.
type Maker = dyn Fn(&Params) -> Result<Arc<dyn Updater>> + Send + Sync;

/// Builds updaters from spec strings: builtins plus user-registered ones.
#[derive(Clone, Default)]
pub struct UpdaterRegistry {
    /// Ordered so that "known updaters" in error messages reads the same every time.
    user: BTreeMap<String, Arc<Maker>>,
}

impl fmt::Debug for UpdaterRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdaterRegistry").field("builtin", &BUILTIN_NAMES).field("user", &self.user.keys().collect::<Vec<_>>()).finish()
    }
}

impl UpdaterRegistry {
    /// A registry that knows the builtins only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a user-defined updater under `name`; `make` receives the parsed `{k=v,...}` params.
    /// Fails, leaving the registry unchanged, when `name` is not a valid spec name or is already taken.
    pub fn register(&mut self, name: &str, make: impl Fn(&Params) -> Result<Arc<dyn Updater>> + Send + Sync + 'static) -> Result<()> {
        check_identifier(name, name, "updater name")?;
        if BUILTIN_NAMES.contains(&name) {
            return Err(bad(name, format!("{name} is a builtin updater; register yours under another name")));
        }
        if self.user.contains_key(name) {
            return Err(bad(name, format!("an updater named {name} is already registered; pick another name")));
        }
        self.user.insert(name.to_string(), Arc::new(make));
        Ok(())
    }

    /// Parses `spec` and builds the updater it names, validating every parameter.
    pub fn build(&self, spec: &str) -> Result<Arc<dyn Updater>> {
        let params = parse_spec(spec)?;
        if let Some(built) = build_builtin(&params) {
            return built;
        }
        let Some(make) = self.user.get(params.name()) else {
            return Err(bad(spec, format!("unknown updater {:?}; known: {}", params.name(), self.known_names())));
        };
        let updater = make(&params)?;
        // A user updater that asks for more slots than the engine lays out would index past its state.
        let slots = updater.state_slots();
        if slots > STATE_SLOTS_MAX {
            let reason = format!("it keeps {slots} state slots per component; the engine supports at most {STATE_SLOTS_MAX}");
            return Err(bad(spec, reason));
        }
        Ok(updater)
    }

    /// Every name `build` accepts, builtins first, for error messages.
    fn known_names(&self) -> String {
        let names: Vec<&str> = BUILTIN_NAMES.iter().copied().chain(self.user.keys().map(String::as_str)).collect();
        names.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------------------

/// Asserts the slice contract of [`Updater::update`] once per call, in release builds too: a length mismatch is
/// an engine bug, and `zip` would otherwise hide it by silently stopping at the shorter slice.
fn check_slices(name: &str, value: &[f32], s0: &[f32], s1: &[f32], grad: &[f32], slots: usize) {
    let len = value.len();
    assert_eq!(grad.len(), len, "{name}: gradient length differs from value length");
    for (slot, state) in [s0, s1].into_iter().enumerate() {
        let expected = if slot < slots { len } else { 0 };
        assert_eq!(state.len(), expected, "{name}: state slot {slot} has the wrong length");
    }
}

/// `value += grad`: plain aggregation of pushes from many workers.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sum;

impl Updater for Sum {
    fn spec(&self) -> String {
        canonical_spec("sum", &[])
    }
    fn state_slots(&self) -> usize {
        0
    }
    fn update(&self, value: &mut [f32], s0: &mut [f32], s1: &mut [f32], grad: &[f32], _step: u64) {
        check_slices("sum", value, s0, s1, grad, 0);
        for (w, &g) in value.iter_mut().zip(grad) {
            *w += g;
        }
    }
}

/// `value = grad`: last writer wins, for tables that hold state rather than parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Assign;

impl Updater for Assign {
    fn spec(&self) -> String {
        canonical_spec("assign", &[])
    }
    fn state_slots(&self) -> usize {
        0
    }
    fn update(&self, value: &mut [f32], s0: &mut [f32], s1: &mut [f32], grad: &[f32], _step: u64) {
        check_slices("assign", value, s0, s1, grad, 0);
        value.copy_from_slice(grad);
    }
}

/// `value -= lr * grad`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sgd {
    lr: f64,
}

impl Updater for Sgd {
    fn spec(&self) -> String {
        canonical_spec("sgd", &[("lr", self.lr)])
    }
    fn state_slots(&self) -> usize {
        0
    }
    fn update(&self, value: &mut [f32], s0: &mut [f32], s1: &mut [f32], grad: &[f32], _step: u64) {
        check_slices("sgd", value, s0, s1, grad, 0);
        let lr = self.lr as f32;
        for (w, &g) in value.iter_mut().zip(grad) {
            *w -= lr * g;
        }
    }
}

/// Adagrad: `s0 += g²; value -= lr * g / (sqrt(s0) + eps)`. Slot 0 is the squared-gradient accumulator.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Adagrad {
    lr: f64,
    eps: f64,
}

impl Updater for Adagrad {
    fn spec(&self) -> String {
        canonical_spec("adagrad", &[("lr", self.lr), ("eps", self.eps)])
    }
    fn state_slots(&self) -> usize {
        1
    }
    fn update(&self, value: &mut [f32], s0: &mut [f32], s1: &mut [f32], grad: &[f32], _step: u64) {
        check_slices("adagrad", value, s0, s1, grad, 1);
        kernels::adagrad(value, s0, grad, self.lr as f32, self.eps as f32);
    }
}

/// Adam (Kingma & Ba 2015) with bias correction. Slot 0 is the first moment `m`, slot 1 the second moment `v`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Adam {
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
}

impl Adam {
    /// The per-call constants `(step_size, eps_hat)` such that `value -= step_size * m / (sqrt(v) + eps_hat)`
    /// equals the textbook `value -= lr * m̂ / (sqrt(v̂) + eps)` with `m̂ = m / (1 - b1^t)`, `v̂ = v / (1 - b2^t)`.
    /// Folding the corrections into two scalars keeps the loop free of per-element powers and divisions by them.
    fn corrected(&self, step: u64) -> (f32, f32) {
        assert!(step >= 1, "adam: step is 1-based, got 0");
        // The kernel decays with the f32 betas, so the correction uses the same rounded values.
        let b1 = f64::from(self.b1 as f32);
        let b2 = f64::from(self.b2 as f32);
        // Sparse tables call this once per key, so the power is `powi` (a few multiplies) rather than `powf`
        // (which tripled the per-key cost at dim 16). Past 2^31 steps any b < 1 has decayed to 0 in f64, so
        // clamping the exponent changes nothing.
        let t = i32::try_from(step).unwrap_or(i32::MAX);
        let correction1 = 1.0 - b1.powi(t);
        let root_correction2 = (1.0 - b2.powi(t)).sqrt();
        let step_size = self.lr * root_correction2 / correction1;
        // Never 0, so m = v = 0 gives 0 / eps_hat = 0: validation keeps eps >= 1.2e-38 and b2 <= 1 - 6e-8 in f32,
        // so root_correction2 >= 2.4e-4 and eps_hat >= 2.9e-42, still above the smallest f32 subnormal.
        let eps_hat = self.eps * root_correction2;
        (step_size as f32, eps_hat as f32)
    }
}

impl Updater for Adam {
    fn spec(&self) -> String {
        canonical_spec("adam", &[("lr", self.lr), ("b1", self.b1), ("b2", self.b2), ("eps", self.eps)])
    }
    fn state_slots(&self) -> usize {
        2
    }
    fn update(&self, value: &mut [f32], s0: &mut [f32], s1: &mut [f32], grad: &[f32], step: u64) {
        check_slices("adam", value, s0, s1, grad, 2);
        let (step_size, eps_hat) = self.corrected(step);
        kernels::adam(value, s0, s1, grad, [self.b1 as f32, self.b2 as f32, step_size, eps_hat]);
    }
}

/// FTRL-proximal (McMahan et al. 2013, "Ad Click Prediction", algorithm 1), per coordinate. Slot 0 is `z`,
/// slot 1 is `n`, the sum of squared gradients; the weight is recomputed from them on every push.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ftrl {
    alpha: f64,
    beta: f64,
    l1: f64,
    l2: f64,
}

impl Updater for Ftrl {
    fn spec(&self) -> String {
        let params = [("alpha", self.alpha), ("beta", self.beta), ("l1", self.l1), ("l2", self.l2)];
        canonical_spec("ftrl", &params)
    }
    fn state_slots(&self) -> usize {
        2
    }
    fn update(&self, value: &mut [f32], s0: &mut [f32], s1: &mut [f32], grad: &[f32], _step: u64) {
        check_slices("ftrl", value, s0, s1, grad, 2);
        let inv_alpha = (1.0 / self.alpha) as f32;
        kernels::ftrl(value, s0, s1, grad, [inv_alpha, self.beta as f32, self.l1 as f32, self.l2 as f32]);
    }
}

/// The kernels whose square roots and divisions make them compute-bound. Each is compiled for
/// several instruction sets and the widest the CPU has is picked at run time (the `multiversion`
/// crate does the detection and the dispatch), so one binary runs everywhere and uses AVX2 where
/// it exists. Results are bit-identical on every path: Rust never fuses a multiply and an add on
/// its own, and sqrt and division are exactly rounded everywhere.
mod kernels {
    use multiversion::multiversion;

    #[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "x86_64+avx", "aarch64+neon"))]
    pub fn adagrad(value: &mut [f32], acc: &mut [f32], grad: &[f32], lr: f32, eps: f32) {
        for ((w, a), &g) in value.iter_mut().zip(acc.iter_mut()).zip(grad) {
            *a += g * g;
            *w -= lr * g / (a.sqrt() + eps);
        }
    }

    /// `k` is `[b1, b2, step_size, eps_hat]`.
    #[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "x86_64+avx", "aarch64+neon"))]
    pub fn adam(value: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32], k: [f32; 4]) {
        let [b1, b2, step_size, eps_hat] = k;
        let (one_minus_b1, one_minus_b2) = (1.0 - b1, 1.0 - b2);
        for (((w, m), v), &g) in value.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(grad) {
            *m = b1 * *m + one_minus_b1 * g;
            *v = b2 * *v + one_minus_b2 * (g * g);
            *w -= step_size * *m / (v.sqrt() + eps_hat);
        }
    }

    /// `k` is `[1 / alpha, beta, l1, l2]`.
    #[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "x86_64+avx", "aarch64+neon"))]
    pub fn ftrl(value: &mut [f32], z: &mut [f32], n: &mut [f32], grad: &[f32], k: [f32; 4]) {
        let [inv_alpha, beta, l1, l2] = k;
        for (((w, z), n), &g) in value.iter_mut().zip(z.iter_mut()).zip(n.iter_mut()).zip(grad) {
            let n_new = *n + g * g;
            let root_new = n_new.sqrt();
            let sigma = (root_new - n.sqrt()) * inv_alpha;
            let z_new = *z + g - sigma * *w;
            // `w = 0 if |z| <= l1 else -(z - sign(z) l1) / denom`, written as a shrink so that it is one `max`
            // and a `copysign` instead of a branch. The denominator is 0 when beta = l2 = 0 and n = 0; its floor
            // turns that 0 / 0 into 0, and keeps w finite when gradients too small to square have moved z.
            let shrunk = (z_new.abs() - l1).max(0.0);
            let denom = ((beta + root_new) * inv_alpha + l2).max(f32::MIN_POSITIVE);
            *w = -shrunk.copysign(z_new) / denom;
            *z = z_new;
            *n = n_new;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn registry() -> UpdaterRegistry {
        UpdaterRegistry::new()
    }

    /// Runs one update, handing empty slices for the slots the updater does not use, as the engine does.
    fn apply(u: &dyn Updater, w: &mut [f32], s0: &mut [f32], s1: &mut [f32], g: &[f32], step: u64) {
        let slots = u.state_slots();
        let s0 = if slots >= 1 { s0 } else { &mut [][..] };
        let s1 = if slots >= 2 { s1 } else { &mut [][..] };
        u.update(w, s0, s1, g, step);
    }

    /// Builds `spec`, starts from `w` with fresh state and applies `grads` as steps 1, 2, ...
    fn run(spec: &str, w: &[f32], grads: &[Vec<f32>]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let u = registry().build(spec).unwrap();
        let (mut w, mut s0, mut s1) = (w.to_vec(), vec![u.state_init(0); w.len()], vec![u.state_init(1); w.len()]);
        for (i, g) in grads.iter().enumerate() {
            apply(&*u, &mut w, &mut s0, &mut s1, g, i as u64 + 1);
        }
        (w, s0, s1)
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
            let tolerance = 1e-5 * b.abs().max(1.0);
            assert!((f64::from(a) - b).abs() <= tolerance, "{what}[{i}]: got {a}, want {b}");
        }
    }

    /// The bad-updater reason for `spec`, checking the error also carries the spec as written.
    fn reason(result: Result<Arc<dyn Updater>>, spec: &str) -> String {
        match result {
            Err(EngineError::BadUpdater { spec: got, reason }) => {
                assert_eq!(got, spec);
                reason
            }
            other => panic!("{spec:?}: expected BadUpdater, got {other:?}"),
        }
    }

    // --- Hand-checked values -------------------------------------------------------------------------------

    #[test]
    fn sum_assign_sgd_by_hand() {
        let grads = [vec![0.5, -2.0, 0.0]];
        assert_eq!(run("sum", &[1.0, 1.0, 1.0], &grads).0, [1.5, -1.0, 1.0]);
        assert_eq!(run("assign", &[1.0, 1.0, 1.0], &grads).0, [0.5, -2.0, 0.0]);
        assert_eq!(run("sgd{lr=0.5}", &[1.0, 1.0, 1.0], &grads).0, [0.75, 2.0, 1.0]);
    }

    #[test]
    fn adagrad_by_hand() {
        // g=3: acc=9, w -= 0.1*3/3; then g=4: acc=25, w -= 0.1*4/5.
        let (w, acc, _) = run("adagrad{lr=0.1,eps=1e-30}", &[1.0], &[vec![3.0], vec![4.0]]);
        assert_close(&w, &[1.0 - 0.1 - 0.08], "w");
        assert_eq!(acc, [25.0]);
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        // With bias correction m̂ = g and v̂ = g² on step 1, so every component moves by lr against its sign.
        let (w, m, v) = run("adam{lr=0.1,b1=0.9,b2=0.999,eps=1e-12}", &[1.0, 1.0, 1.0], &[vec![1.0, -2.0, 0.0]]);
        assert_close(&w, &[0.9, 1.1, 1.0], "w");
        assert_close(&m, &[0.1, -0.2, 0.0], "m");
        assert_close(&v, &[0.001, 0.004, 0.0], "v");
    }

    #[test]
    fn ftrl_by_hand() {
        // alpha=1, beta=1, l1=0.5, l2=0, w=0, g=1: sigma=1, z=1, n=1, w=-(1-0.5)/((1+1)/1) = -0.25.
        // A second g=-0.1 with w=-0.25: n=1.01, sigma=sqrt(1.01)-1, z=1-0.1+sigma*0.25 = 0.90124..., |z|>l1,
        // w = -(z-0.5)/(1+sqrt(1.01)).
        let (w, z, n) = run("ftrl{alpha=1,beta=1,l1=0.5,l2=0}", &[0.0], &[vec![1.0]]);
        assert_eq!((w[0], z[0], n[0]), (-0.25, 1.0, 1.0));
        let (w, ..) = run("ftrl{alpha=1,beta=1,l1=0.5,l2=0}", &[0.0], &[vec![1.0], vec![-0.1]]);
        let sigma = 1.01f64.sqrt() - 1.0;
        let z = 0.9 + sigma * 0.25;
        assert_close(&w, &[-(z - 0.5) / (1.0 + 1.01f64.sqrt())], "w");
        // Inside the l1 ball the weight is exactly zero.
        assert_eq!(run("ftrl{alpha=1,beta=1,l1=2,l2=0}", &[0.0], &[vec![1.0]]).0, [0.0]);
    }

    // --- State carried across steps, against straightforward f64 references ----------------------------------

    /// Deterministic gradients with zeros, both signs and a length that is not a multiple of the vector width.
    fn grads(steps: usize, len: usize) -> Vec<Vec<f32>> {
        (0..steps).map(|t| (0..len).map(|i| ((i * 7 + t * 13) % 17) as f32 / 4.0 - 2.0).collect()).collect()
    }

    fn start(len: usize) -> Vec<f32> {
        (0..len).map(|i| (i as f32 - 10.0) / 8.0).collect()
    }

    #[test]
    fn adagrad_matches_reference_over_steps() {
        let (lr, eps, gs) = (0.05, 1e-8, grads(9, 37));
        let mut w: Vec<f64> = start(37).iter().map(|&x| f64::from(x)).collect();
        let mut acc = vec![0.0f64; 37];
        for g in &gs {
            for i in 0..37 {
                let g = f64::from(g[i]);
                acc[i] += g * g;
                w[i] -= lr * g / (acc[i].sqrt() + eps);
            }
        }
        let (got_w, got_acc, _) = run("adagrad{lr=0.05,eps=1e-8}", &start(37), &gs);
        assert_close(&got_w, &w, "w");
        assert_close(&got_acc, &acc, "acc");
    }

    #[test]
    fn adam_matches_reference_over_steps() {
        let (lr, b1, b2, eps, gs) = (0.01, 0.8, 0.99, 1e-8, grads(12, 37));
        let mut w: Vec<f64> = start(37).iter().map(|&x| f64::from(x)).collect();
        let (mut m, mut v) = (vec![0.0f64; 37], vec![0.0f64; 37]);
        for (t, g) in gs.iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..37 {
                let g = f64::from(g[i]);
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let (m_hat, v_hat) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
                w[i] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
        let (got_w, got_m, got_v) = run("adam{lr=0.01,b1=0.8,b2=0.99,eps=1e-8}", &start(37), &gs);
        assert_close(&got_w, &w, "w");
        assert_close(&got_m, &m, "m");
        assert_close(&got_v, &v, "v");
    }

    /// McMahan et al. 2013, algorithm 1, written as in the paper.
    fn ftrl_reference(p: [f64; 4], w0: &[f32], gs: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let [alpha, beta, l1, l2] = p;
        let mut w: Vec<f64> = w0.iter().map(|&x| f64::from(x)).collect();
        let (mut z, mut n) = (vec![0.0f64; w.len()], vec![0.0f64; w.len()]);
        for g in gs {
            for i in 0..w.len() {
                let g = f64::from(g[i]);
                let sigma = ((n[i] + g * g).sqrt() - n[i].sqrt()) / alpha;
                z[i] += g - sigma * w[i];
                n[i] += g * g;
                w[i] = if z[i].abs() <= l1 { 0.0 } else { -(z[i] - z[i].signum() * l1) / ((beta + n[i].sqrt()) / alpha + l2) };
            }
        }
        (w, z, n)
    }

    #[test]
    fn ftrl_matches_reference_over_steps() {
        let gs = grads(10, 37);
        for (spec, p) in [
            ("ftrl{alpha=0.1,beta=1,l1=0.5,l2=0.1}", [0.1, 1.0, 0.5, 0.1]),
            ("ftrl{alpha=0.05,beta=0,l1=0,l2=0}", [0.05, 0.0, 0.0, 0.0]),
            ("ftrl", [0.05, 1.0, 1.0, 1.0]),
        ] {
            let (w, z, n) = ftrl_reference(p, &start(37), &gs);
            let (got_w, got_z, got_n) = run(spec, &start(37), &gs);
            assert_close(&got_w, &w, spec);
            assert_close(&got_z, &z, spec);
            assert_close(&got_n, &n, spec);
        }
    }

    #[test]
    fn ftrl_without_regularisation_stays_finite() {
        // beta = l2 = 0 and gradients whose square underflows leave n = 0 while z moves: the denominator is 0 and
        // only its floor keeps w finite (and the next step's sigma * w from being 0 * inf = NaN).
        let gs = [vec![1e-23, -1e-23], vec![1e-23, -1e-23], vec![0.5, 0.0], vec![-1e-23, 2.0]];
        let (w, z, n) = run("ftrl{alpha=0.5,beta=0,l1=0,l2=0}", &[0.0, 0.0], &gs);
        assert!(w.iter().chain(&z).chain(&n).all(|x| x.is_finite()), "{w:?} {z:?} {n:?}");
    }

    #[test]
    fn adam_extreme_valid_params_stay_finite() {
        let gs = [vec![0.0, 1e-30, 100.0], vec![0.0, -1e-30, -100.0]];
        let (w, m, v) = run("adam{lr=1,b1=0.9999999,b2=0.9999999,eps=1.2e-38}", &[0.0; 3], &gs);
        assert!(w.iter().chain(&m).chain(&v).all(|x| x.is_finite()), "{w:?} {m:?} {v:?}");
        assert_eq!(w[0], 0.0);
        // A step count past i32::MAX (the bias corrections are then exactly 1) is fine too.
        let u = registry().build("adam{lr=0.1}").unwrap();
        let (mut w, mut m, mut v) = ([1.0f32], [0.0f32], [0.0f32]);
        u.update(&mut w, &mut m, &mut v, &[1.0], u64::MAX);
        let expected = 1.0 - 0.1 * 0.1 / (0.001f64.sqrt() + 1e-8);
        assert_close(&w, &[expected], "w");
    }

    #[test]
    fn state_starts_at_zero() {
        for name in BUILTIN_NAMES {
            let u = registry().build(name).unwrap();
            assert!(u.state_slots() <= STATE_SLOTS_MAX);
            assert_eq!((u.state_init(0), u.state_init(1)), (0.0, 0.0), "{name}");
        }
    }

    // --- Slice contract ----------------------------------------------------------------------------------------

    #[test]
    #[should_panic(expected = "gradient length differs")]
    fn short_gradient_panics() {
        registry().build("sum").unwrap().update(&mut [0.0; 4], &mut [], &mut [], &[0.0; 3], 1);
    }

    #[test]
    #[should_panic(expected = "state slot 1 has the wrong length")]
    fn short_state_panics() {
        registry().build("adam").unwrap().update(&mut [0.0; 4], &mut [0.0; 4], &mut [0.0; 3], &[0.0; 4], 1);
    }

    #[test]
    #[should_panic(expected = "state slot 0 has the wrong length")]
    fn unused_slot_must_be_empty() {
        registry().build("sgd").unwrap().update(&mut [0.0; 4], &mut [0.0; 4], &mut [], &[0.0; 4], 1);
    }

    #[test]
    #[should_panic(expected = "step is 1-based")]
    fn adam_step_zero_panics() {
        registry().build("adam").unwrap().update(&mut [0.0; 4], &mut [0.0; 4], &mut [0.0; 4], &[0.0; 4], 0);
    }

    #[test]
    fn empty_slices_are_fine() {
        for name in BUILTIN_NAMES {
            registry().build(name).unwrap().update(&mut [], &mut [], &mut [], &[], 1);
        }
    }

    // --- Parsing and canonical specs ---------------------------------------------------------------------------

    #[test]
    fn defaults_are_canonical() {
        let expected = [
            ("sum", "sum"),
            ("assign", "assign"),
            ("sgd", "sgd{lr=0.01}"),
            ("adagrad", "adagrad{lr=0.01,eps=1e-8}"),
            ("adam", "adam{lr=0.001,b1=0.9,b2=0.999,eps=1e-8}"),
            ("ftrl", "ftrl{alpha=0.05,beta=1,l1=1,l2=1}"),
        ];
        for (spec, canonical) in expected {
            assert_eq!(registry().build(spec).unwrap().spec(), canonical);
        }
    }

    #[test]
    fn spec_round_trips_through_build() {
        let specs = [
            " adam { eps = 1e-7 , lr=0.5 }",
            "adagrad{}",
            "sgd{lr=0.30000000000000004}",
            "ftrl{l2=0,l1=0,beta=0,alpha=1e20}",
            "sgd{lr=1e-30}",
            "adam{b1=0,b2=0.5}",
        ];
        for spec in specs {
            let first = registry().build(spec).unwrap();
            let second = registry().build(&first.spec()).unwrap();
            assert_eq!(first.spec(), second.spec(), "{spec}");
            assert_eq!(format!("{first:?}"), format!("{second:?}"), "{spec}");
        }
        assert_eq!(registry().build(" adam { eps = 1e-7 , lr=0.5 }").unwrap().spec(), "adam{lr=0.5,b1=0.9,b2=0.999,eps=1e-7}");
    }

    #[test]
    fn parse_spec_keeps_order_and_values() {
        let p = parse_spec(" my_rule { b = 2 , a=-1.5e3 } ").unwrap();
        assert_eq!(p.name(), "my_rule");
        assert_eq!(p.iter().collect::<Vec<_>>(), [("b", 2.0), ("a", -1500.0)]);
        assert_eq!((p.get("a"), p.get("c"), p.get_or("c", 7.0)), (Some(-1500.0), None, 7.0));
        assert_eq!(p.spec(), " my_rule { b = 2 , a=-1.5e3 } ");
        assert_eq!(parse_spec("sum").unwrap().iter().count(), 0);
    }

    // --- Every error case --------------------------------------------------------------------------------------

    #[test]
    fn syntax_errors_say_what_is_wrong() {
        let cases = [
            ("sgd{lr=0.1", "missing closing '}'"),
            ("sgd lr=0.1}", "without an opening '{'"),
            ("sgd{lr=0.1}x", "after the closing"),
            ("sgd{lr={0.1}}", "more than one '{'"),
            ("sgd{lr=abc}", "cannot parse \"abc\" as a number for lr"),
            ("sgd{lr=}", "cannot parse \"\" as a number"),
            ("sgd{lr}", "has no '='"),
            ("sgd{lr=0.1,}", "empty parameter"),
            ("sgd{lr=0.1,lr=0.2}", "given twice"),
            ("", "updater name is empty"),
            ("{lr=0.1}", "updater name is empty"),
            ("sgd lr", "contains ' '"),
            ("sgd{l-r=1}", "parameter name \"l-r\" contains '-'"),
            ("sgd{lr=inf}", "lr=inf is not finite"),
            ("sgd{lr=NaN}", "lr=NaN is not finite"),
            ("sgd{lr=1e999}", "not finite"),
        ];
        for (spec, expected) in cases {
            let reason = reason(registry().build(spec), spec);
            assert!(reason.contains(expected), "{spec:?}: {reason:?} lacks {expected:?}");
        }
    }

    #[test]
    fn unknown_names_list_what_is_known() {
        let r = reason(registry().build("adamw{lr=0.1}"), "adamw{lr=0.1}");
        assert!(r.contains("unknown updater \"adamw\"") && r.contains("sum, assign, sgd, adagrad, adam, ftrl"), "{r}");
        let r = reason(registry().build("adam{learning_rate=0.1}"), "adam{learning_rate=0.1}");
        assert!(r.contains("unknown parameter \"learning_rate\"") && r.contains("lr, b1, b2, eps"), "{r}");
        let r = reason(registry().build("sum{lr=1}"), "sum{lr=1}");
        assert!(r.contains("sum takes no parameters"), "{r}");
        let r = reason(registry().build("ftrl{lambda=1}"), "ftrl{lambda=1}");
        assert!(r.contains("alpha, beta, l1, l2"), "{r}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let cases = [
            ("sgd{lr=0}", "lr=0 is out of range; it must be > 0"),
            ("sgd{lr=-0.1}", "lr=-0.1 is out of range"),
            ("sgd{lr=1e300}", "f32 range"),
            ("sgd{lr=1e-50}", "f32 range"),
            ("adagrad{lr=-1}", "lr=-1"),
            ("adagrad{eps=0}", "eps=0 is out of range"),
            ("adam{eps=-1e-8}", "eps=-1e-8 is out of range"),
            ("adam{b1=1}", "b1=1 is out of range; it must be >= 0 and < 1"),
            ("adam{b1=-0.1}", "b1=-0.1"),
            ("adam{b2=1.5}", "b2=1.5"),
            ("adam{b2=0.99999999}", "still < 1 when rounded to f32"),
            ("ftrl{alpha=0}", "alpha=0 is out of range; it must be > 0"),
            ("ftrl{beta=-1}", "beta=-1 is out of range; it must be >= 0"),
            ("ftrl{l1=-0.5}", "l1=-0.5"),
            ("ftrl{l2=-2}", "l2=-2"),
            ("ftrl{l2=1e39}", "f32 range"),
        ];
        for (spec, expected) in cases {
            let reason = reason(registry().build(spec), spec);
            assert!(reason.contains(expected), "{spec:?}: {reason:?} lacks {expected:?}");
        }
        // The edges that are allowed.
        for spec in ["adam{b1=0,b2=0}", "ftrl{beta=0,l1=0,l2=0}", "adam{b2=0.9999999}"] {
            registry().build(spec).unwrap();
        }
    }

    // --- User-defined updaters ---------------------------------------------------------------------------------

    /// `value += k * grad`, with a configurable number of (unused) state slots to test the registry's check.
    #[derive(Debug)]
    struct Scaled {
        k: f32,
        slots: usize,
    }

    impl Updater for Scaled {
        fn spec(&self) -> String {
            format!("scaled{{k={}}}", self.k)
        }
        fn state_slots(&self) -> usize {
            self.slots
        }
        fn update(&self, value: &mut [f32], _s0: &mut [f32], _s1: &mut [f32], grad: &[f32], _step: u64) {
            for (w, &g) in value.iter_mut().zip(grad) {
                *w += self.k * g;
            }
        }
    }

    fn make_scaled(params: &Params) -> Result<Arc<dyn Updater>> {
        if let Some((key, _)) = params.iter().find(|(key, _)| !["k", "slots"].contains(key)) {
            return Err(bad(params.spec(), format!("unknown parameter {key}; scaled takes k")));
        }
        Ok(Arc::new(Scaled { k: params.get_or("k", 1.0) as f32, slots: params.get_or("slots", 0.0) as usize }))
    }

    #[test]
    fn user_updater_is_registered_and_built() {
        let mut registry = UpdaterRegistry::new();
        registry.register("scaled", make_scaled).unwrap();
        let u = registry.build("scaled{k=2}").unwrap();
        let mut w = [1.0, 2.0];
        u.update(&mut w, &mut [], &mut [], &[0.5, -1.0], 1);
        assert_eq!(w, [2.0, 0.0]);
        assert_eq!(registry.build(&u.spec()).unwrap().spec(), "scaled{k=2}");
        assert!(format!("{registry:?}").contains("scaled"));
        // The maker's own error reaches the caller, and unknown names now list the user updater too.
        assert!(reason(registry.build("scaled{q=1}"), "scaled{q=1}").contains("scaled takes k"));
        assert!(reason(registry.build("nope"), "nope").contains("ftrl, scaled"));
        // More slots than the engine lays out is refused.
        let r = reason(registry.build("scaled{slots=3}"), "scaled{slots=3}");
        assert!(r.contains("keeps 3 state slots") && r.contains("at most 2"), "{r}");
    }

    #[test]
    fn failed_registration_leaves_registry_unchanged() {
        let mut registry = UpdaterRegistry::new();
        registry.register("scaled", make_scaled).unwrap();
        let r = registry.register("scaled", |_: &Params| Ok(Arc::new(Sum) as Arc<dyn Updater>));
        assert!(matches!(r, Err(EngineError::BadUpdater { reason, .. }) if reason.contains("already registered")));
        assert_eq!(registry.build("scaled{k=3}").unwrap().spec(), "scaled{k=3}");
        let r = registry.register("adam", make_scaled);
        assert!(matches!(r, Err(EngineError::BadUpdater { reason, .. }) if reason.contains("is a builtin")));
        assert!(registry.build("adam").unwrap().spec().starts_with("adam{"));
        assert!(registry.register("my rule", make_scaled).is_err());
        assert!(registry.register("", make_scaled).is_err());
        assert_eq!(format!("{registry:?}").matches("scaled").count(), 1);
    }

    // --- Properties --------------------------------------------------------------------------------------------

    fn finite_f32() -> impl Strategy<Value = f32> {
        prop_oneof![-1e30f32..1e30f32, -1.0f32..1.0f32, Just(0.0f32)]
    }

    fn vectors(len: usize) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(finite_f32(), len)
    }

    /// Gradients within ±100, with exact zeros and values whose square underflows f32 (FTRL's `n` stays 0).
    fn gradient() -> impl Strategy<Value = f32> {
        prop_oneof![-100.0f32..100.0, Just(0.0), -1e-20f32..1e-20]
    }

    proptest! {
        #[test]
        fn sum_and_sgd_match_scalar_formula_exactly(
            (w, g) in (0usize..70).prop_flat_map(|len| (vectors(len), vectors(len))),
            lr in 1e-6f64..10.0,
        ) {
            let (sum, ..) = run("sum", &w, std::slice::from_ref(&g));
            let (sgd, ..) = run(&format!("sgd{{lr={lr}}}"), &w, std::slice::from_ref(&g));
            let lr = lr as f32;
            for i in 0..w.len() {
                prop_assert_eq!(sum[i].to_bits(), (w[i] + g[i]).to_bits());
                prop_assert_eq!(sgd[i].to_bits(), (w[i] - lr * g[i]).to_bits());
            }
        }

        #[test]
        fn spec_round_trips_for_random_params(
            lr in 1e-9f64..100.0, b1 in 0.0f64..0.999, b2 in 0.0f64..0.9999, eps in 1e-12f64..1.0,
            beta in 0.0f64..1e6, l1 in 0.0f64..1e3,
        ) {
            let adam = format!("adam{{lr={lr},b1={b1},b2={b2},eps={eps}}}");
            let ftrl = format!("ftrl{{alpha={lr},beta={beta},l1={l1},l2={eps}}}");
            for spec in [adam, ftrl] {
                let built = registry().build(&spec).unwrap();
                prop_assert_eq!(registry().build(&built.spec()).unwrap().spec(), built.spec());
                // The canonical spec carries the given values bit for bit.
                let (canonical, given) = (parse_spec(&built.spec()).unwrap(), parse_spec(&spec).unwrap());
                prop_assert_eq!(canonical.iter().collect::<Vec<_>>(), given.iter().collect::<Vec<_>>());
            }
        }

        /// Inputs stay within ±100 so that g² cannot overflow f32; within that, nothing may turn into NaN or Inf.
        #[test]
        fn builtins_stay_finite(
            (w, gs) in (0usize..40).prop_flat_map(|len| (
                prop::collection::vec(-100.0f32..100.0, len),
                prop::collection::vec(prop::collection::vec(gradient(), len), 1..6),
            )),
            lr in 1e-4f64..1.0, eps in 1e-10f64..1e-3, b1 in 0.0f64..0.9999, b2 in 0.0f64..0.9999,
            beta in 0.0f64..2.0, l1 in 0.0f64..2.0, l2 in 0.0f64..2.0,
        ) {
            let specs = [
                "sum".to_string(), "assign".to_string(), format!("sgd{{lr={lr}}}"),
                format!("adagrad{{lr={lr},eps={eps}}}"), format!("adam{{lr={lr},b1={b1},b2={b2},eps={eps}}}"),
                format!("ftrl{{alpha={lr},beta={beta},l1={l1},l2={l2}}}"),
            ];
            for spec in &specs {
                let (w, s0, s1) = run(spec, &w, &gs);
                let all = w.iter().chain(&s0).chain(&s1);
                prop_assert!(all.clone().all(|x| x.is_finite()), "{} produced {:?} {:?} {:?}", spec, w, s0, s1);
            }
        }
    }
}
