//! The replication crate's one error enum.

/// Why a catalog, range map, ring or replication setting cannot be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ReplicationError {
    #[error("table {table:?}: keys [{start}, {end}) have no server; is a server missing from the list you connected to?")]
    Gap { table: String, start: u64, end: u64 },
    #[error("table {table:?}: servers claim overlapping parts at key {key}; do the servers agree on --cluster?")]
    Overlap { table: String, key: u64 },
    #[error("table {table:?} is defined differently on different servers")]
    Disagree { table: String },
    #[error("unknown table {name:?}")]
    UnknownTable { name: String },
    #[error("bad table {name:?}: {reason}")]
    BadSpec { name: String, reason: String },
    #[error("malformed replication message: {reason}")]
    BadMessage { reason: String },
    #[error("bad replication setting: {reason}")]
    BadConfig { reason: String },
}

/// The name the placement code has used since before replication; the same enum.
pub type PlacementError = ReplicationError;

/// Short alias used across the crate.
pub type Result<T, E = ReplicationError> = std::result::Result<T, E>;
