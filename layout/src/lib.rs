//! Where every key lives, as servers, clients and replicas all see it.
//!
//! - [`catalog`]: a table's definition ([`TableSpec`]) and what a server holds of each
//!   ([`Catalog`], [`ServerInfo`]).
//! - [`placement`]: a table's key range `[start, end)` split across the servers of a cluster and
//!   each server's shards, the client's [`RangeMap`] merged from the servers' catalogs, and the
//!   replication ranges a replicated cluster cuts each table into.
//! - [`dense`]: how a dense table part lies in memory, in versioned blocks a worker may read
//!   one-sidedly ([`DenseLayout`]).

#![forbid(unsafe_code)]

pub mod catalog;
pub mod dense;
pub mod error;
pub mod placement;

pub use catalog::{Catalog, Init, NonFinite, Part, ServerInfo, TableEntry, TableKind, TableSpec};
pub use dense::DenseLayout;
pub use error::{LayoutError, Result};
pub use placement::RangeMap;
