//! Tessera's storage engine.
//!
//! A server runs one shard per core. Each shard is a thread pinned to its core that exclusively owns
//! its key ranges, kept in the shard's pinned [`arena`]. Pushes are aggregated on the shard by an
//! [`updater`]; every key range carries a vector-clock stamp ([`clock`]).
//!
//! The modules, from the bottom up:
//! - [`config`]: every knob and limit, with defaults, units and validation;
//! - [`arena`]: pinned memory regions (memmap2, populated, huge pages and mlock where allowed);
//! - [`persist`]: everything on disk: O_DIRECT I/O on the shard's own io_uring ring, the
//!   write-ahead log, checkpoints, recovery, and the offline examination of a data directory;
//! - [`crash`]: named crash points, for tests that kill a server at an exact step;
//! - [`updater`]: the server-side update functions (`sum`, `assign`, `sgd`, `adagrad`, `adam`, `ftrl`,
//!   and user-defined ones through the [`updater::Updater`] trait);
//! - [`clock`]: vector-clock stamps over key ranges, which split and merge;
//! - [`table`]: dense and sparse table parts;
//! - [`tables`]: a shard's tables, and the parts of them it holds (one per table, or one per
//!   replication range its server is in);
//! - [`shard`]: the per-core state and the request handler, which knows nothing of the transport;
//! - [`server`]: threads, pinning, the listener and the control plane.

#![deny(unsafe_code)]

pub mod arena;
pub mod chain;
pub mod clock;
pub mod config;
pub mod crash;
pub mod error;
pub mod metrics;
pub mod persist;
pub mod server;
pub mod shard;
pub mod table;
pub mod tables;
#[cfg(test)]
mod test_support;
pub mod updater;

pub use config::EngineConfig;
pub use error::{EngineError, Result};
pub use server::{pin_beside_shards, Server, ServerConfig};
pub use updater::{Updater, UpdaterRegistry};
