//! Where every key lives, as servers, clients and replicas all see it.
//!
//! - [`catalog`]: a table's definition ([`TableSpec`]) and what a server holds of each
//!   ([`Catalog`], [`ServerInfo`]).
//! - [`placement`]: the replication ranges a cluster cuts each table into and the shard each
//!   range goes to.
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
