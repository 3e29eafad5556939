//! The replication crate's one error enum.

/// Why a replication message or setting cannot be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ReplicationError {
    #[error("malformed replication message: {reason}")]
    BadMessage { reason: String },
    #[error("bad replication setting: {reason}")]
    BadConfig { reason: String },
}

/// Short alias used across the crate.
pub type Result<T, E = ReplicationError> = std::result::Result<T, E>;
