//! How the copies of every key range stay the same: chain replication, as pure state machines.
//! (Where keys live, tables and placement, is the `tessera-layout` crate.)
//!
//! - Chain replication: [`ring`] maps ranges to chains of servers by consistent hashing;
//!   [`replica`] is one server's side of the protocol and [`coordinator`] the configuration's
//!   keeper, both pure state machines with no I/O; [`sim`] drives them in a seeded, single-threaded
//!   simulation with faults, and checks them.

#![forbid(unsafe_code)]

pub mod codec;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod payload;
pub mod protocol;
pub mod replica;
pub mod ring;
pub mod sim;
pub mod worker;

pub use config::ReplicationConfig;
pub use error::{ReplicationError, Result};
