//! Table definitions and the parts of them a server owns, as servers publish them (JSON on the
//! control plane, TOML in `--tables` files).

use serde::{Deserialize, Serialize};

use crate::error::{LayoutError, Result};

/// Dense tables hold every key of their range; sparse tables only the keys that were pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Dense,
    Sparse,
}

/// What a key holds before anything was pushed to it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// All zeros.
    #[default]
    Zero,
    /// Uniform in `[-scale, scale)`, a pure function of `(seed, key, component)`, so every replica
    /// and every pull agrees without storing anything.
    Uniform { scale: f32, seed: u64 },
}

/// What a push with NaN or Inf in its gradient does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Refuse the whole push; nothing is applied.
    #[default]
    Reject,
    /// Apply the finite components and skip the others.
    Skip,
}

/// Index of the first NaN or infinity in `values`. Scans in chunks with no early exit inside a
/// chunk, so the test vectorises: a push pays this on every component, the worker (for a table
/// that rejects them, before anything is sent) and the shard alike.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    const CHUNK: usize = 64;
    values.chunks(CHUNK).enumerate().find_map(|(c, chunk)| {
        let bad = chunk.iter().fold(false, |bad, v| bad | !v.is_finite());
        if bad {
            chunk.iter().position(|v| !v.is_finite()).map(|i| c * CHUNK + i)
        } else {
            None
        }
    })
}

/// A table as a user defines it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub name: String,
    pub kind: TableKind,
    /// First key.
    #[serde(default)]
    pub start: u64,
    /// One past the last key. Defaults to the whole u64 space (sparse tables of hashed features).
    #[serde(default = "end_default")]
    pub end: u64,
    /// f32 components per key.
    #[serde(default = "dim_default")]
    pub dim: u32,
    /// Updater spec, e.g. `sum`, `sgd{lr=0.1}`, `adam{lr=0.001}`.
    #[serde(default = "updater_default")]
    pub updater: String,
    #[serde(default)]
    pub init: Init,
    #[serde(default)]
    pub non_finite: NonFinite,
    /// Sparse tables: most keys the whole table holds (0: the server's default).
    #[serde(default)]
    pub capacity: u64,
}

fn end_default() -> u64 {
    u64::MAX
}
fn dim_default() -> u32 {
    1
}
fn updater_default() -> String {
    "sum".into()
}

/// Largest value width a table may have.
pub const DIM_MAX: u32 = 1 << 20;

impl TableSpec {
    /// A table over `[start, end)` with `dim` components and the `sum` updater.
    pub fn new(name: &str, kind: TableKind, start: u64, end: u64, dim: u32) -> Self {
        Self { name: name.into(), kind, start, end, dim, updater: updater_default(), init: Init::Zero, non_finite: NonFinite::Reject, capacity: 0 }
    }

    /// Checks what does not depend on the server (the updater is checked by the engine).
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(LayoutError::BadSpec { name: self.name.clone(), reason });
        if self.name.is_empty() || self.name.len() > 128 || self.name.chars().any(|c| c.is_control()) {
            return bad("a name is 1 to 128 printable characters".into());
        }
        if self.start >= self.end {
            return bad(format!("empty key range [{}, {})", self.start, self.end));
        }
        if self.dim == 0 || self.dim > DIM_MAX {
            return bad(format!("dim {} is outside 1..={DIM_MAX}", self.dim));
        }
        if let Init::Uniform { scale, .. } = self.init {
            if !scale.is_finite() || scale < 0.0 {
                return bad(format!("init scale {scale} must be finite and >= 0"));
            }
        }
        Ok(())
    }

    /// Keys in the table's range (saturating at u64::MAX for the whole space).
    pub fn key_count(&self) -> u64 {
        self.end - self.start
    }
}

/// One contiguous part of a table, owned by one shard of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub start: u64,
    pub end: u64,
    pub shard: u16,
}

/// A table as one server holds it: its id there, its definition, and the parts it owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableEntry {
    pub id: u32,
    pub spec: TableSpec,
    pub parts: Vec<Part>,
}

/// Everything one server publishes about its tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Catalog {
    pub tables: Vec<TableEntry>,
}

/// A server's description of itself, sent in reply to every hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub version: String,
    pub shards: u16,
    pub frame_bytes_max: u64,
    pub workers_max: u32,
    /// The server's shards serve RDMA (besides TCP, which every server serves).
    #[serde(default)]
    pub rdma: bool,
    /// The cluster the server serves (its configuration's name); 0 while it does not know yet.
    #[serde(default)]
    pub cluster: u64,
    /// The server is a cluster of its own, with no coordinator: every range is on a chain of
    /// one, this server, and nothing takes its ranges over while it is down.
    #[serde(default)]
    pub alone: bool,
}

impl ServerInfo {
    /// Whether a server's hello reply says it serves RDMA; one that does not parse says no.
    pub fn serves_rdma(hello: &[u8]) -> bool {
        serde_json::from_slice::<ServerInfo>(hello).is_ok_and(|info| info.rdma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_non_finite_finds_the_first_in_any_chunk() {
        assert_eq!(first_non_finite(&[]), None);
        let mut v = vec![1.5f32; 300];
        assert_eq!(first_non_finite(&v), None);
        for (at, bad) in [(0, f32::NAN), (63, f32::INFINITY), (64, f32::NEG_INFINITY), (299, -f32::NAN)] {
            v[at] = bad;
            assert_eq!(first_non_finite(&v), Some(at));
            v[at] = 1.5;
        }
        v[200] = f32::NAN;
        v[130] = f32::INFINITY;
        assert_eq!(first_non_finite(&v), Some(130));
    }

    #[test]
    fn toml_like_json_round_trip() {
        let mut t = TableSpec::new("w", TableKind::Sparse, 0, u64::MAX, 8);
        t.init = Init::Uniform { scale: 0.01, seed: 3 };
        let s = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<TableSpec>(&s).unwrap(), t);
        let minimal: TableSpec = serde_json::from_str(r#"{"name":"e","kind":"sparse"}"#).unwrap();
        assert_eq!((minimal.end, minimal.dim, minimal.updater.as_str()), (u64::MAX, 1, "sum"));
        assert!(serde_json::from_str::<TableSpec>(r#"{"name":"e","kind":"sparse","dimm":3}"#).is_err());
    }

    #[test]
    fn validation() {
        assert!(TableSpec::new("a", TableKind::Dense, 5, 5, 1).validate().is_err());
        assert!(TableSpec::new("a", TableKind::Dense, 0, 5, 0).validate().is_err());
        assert!(TableSpec::new("", TableKind::Dense, 0, 5, 1).validate().is_err());
        assert!(TableSpec::new("a", TableKind::Dense, 0, 5, 1).validate().is_ok());
    }
}
