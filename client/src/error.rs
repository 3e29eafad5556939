//! The client's one error enum.

use tessera_transport::{Status, TransportError};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{server}: {message}")]
    Server { server: String, status: Status, message: String },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Placement(#[from] tessera_layout::LayoutError),
    #[error("key {key} is outside table {table:?}'s range [{start}, {end})")]
    KeyOutOfRange { table: String, key: u64, start: u64, end: u64 },
    #[error("{what} has {got} values; table {table:?} needs {want} ({keys} keys x dim {dim})")]
    Length { what: &'static str, table: String, keys: usize, dim: usize, got: usize, want: usize },
    #[error("gradient component {index} for table {table:?} is {value}; the table rejects NaN and Inf (its non_finite policy)")]
    NonFinite { table: String, index: usize, value: f32 },
    #[error("the replicated cluster did not answer in time: {reason}")]
    Unavailable { reason: String },
    #[error("table {table:?}: a bounded-delay pull needs every worker at clock {need}, but worker {worker} is still at {clock} after {waited_ms} ms (ClientConfig::stale_timeout)")]
    Stale { table: String, need: u64, worker: u32, clock: u64, waited_ms: u64 },
    #[error("client configuration: {reason}")]
    Config { reason: String },
    #[error("protocol error from {server}: {reason}")]
    Protocol { server: String, reason: String },
    #[error("{server} was lost with this call in flight ({reason}): a push may or may not have been applied, a pull's output is not complete; the call is not sent again, and the next call reconnects")]
    OutcomeUnknown { server: String, reason: String },
    #[error("cannot reconnect to {server} after {attempts} attempts ({reason}); the next call tries again (ClientConfig::reconnect_attempts)")]
    Reconnect { server: String, attempts: u32, reason: String },
}

impl ClientError {
    /// The server's status, when the server refused the request.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Short alias used across the crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
