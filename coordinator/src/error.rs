use thiserror::Error;

/// Why the coordinator, or its etcd store, could not do what was asked.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoordinatorError {
    #[error("invalid {field} {value:?}: {reason}")]
    BadConfig { field: &'static str, value: String, reason: String },
    #[error("I/O error: {0}")]
    Io(String),
    #[error("etcd at {endpoints}: cannot {op}: {reason}")]
    Etcd { op: &'static str, endpoints: String, reason: String },
    #[error("{what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("this coordinator no longer leads the cluster: {reason}")]
    LostLeadership { reason: String },
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
