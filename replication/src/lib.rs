//! Where keys live: the table catalog and key-range placement.
//!
//! Every table's key range `[start, end)` is split first across the servers of a cluster and then
//! across each server's shards ([`placement`]). Servers publish the parts they own as a [`catalog`];
//! clients merge the catalogs of all servers into a [`placement::RangeMap`] and route each key to
//! its owning (server, shard). Chain replication builds on this crate later.

#![forbid(unsafe_code)]

pub mod catalog;
pub mod error;
pub mod placement;

pub use catalog::{Catalog, Init, NonFinite, Part, ServerInfo, TableEntry, TableKind, TableSpec};
pub use error::{PlacementError, Result};
pub use placement::RangeMap;
