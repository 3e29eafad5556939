//! Where keys live, and how their copies stay the same.
//!
//! - Placement: every table's key range `[start, end)` is split first across the servers of a
//!   cluster and then across each server's shards ([`placement`]). Servers publish the parts they
//!   own as a [`catalog`]; clients merge the catalogs of all servers into a
//!   [`placement::RangeMap`] and route each key to its owning (server, shard).
//! - Chain replication: [`ring`] maps ranges to chains of servers by consistent hashing;
//!   [`replica`] is one server's side of the protocol and [`coordinator`] the configuration's
//!   keeper, both pure state machines with no I/O; [`sim`] drives them in a seeded, single-threaded
//!   simulation with faults, and checks them.

#![forbid(unsafe_code)]

pub mod catalog;
pub mod codec;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod placement;
pub mod protocol;
pub mod replica;
pub mod ring;
pub mod sim;
pub mod worker;

pub use catalog::{Catalog, Init, NonFinite, Part, ServerInfo, TableEntry, TableKind, TableSpec};
pub use config::ReplicationConfig;
pub use error::{PlacementError, ReplicationError, Result};
pub use placement::RangeMap;
