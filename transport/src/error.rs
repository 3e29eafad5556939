//! The transport's one error enum.

/// What can go wrong moving frames between a worker and a server.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("bad frame: {reason}")]
    Malformed { reason: String },
    #[error("frame of {bytes} bytes is over the limit of {limit} bytes (raise --frame-bytes-max)")]
    FrameTooLarge { bytes: usize, limit: usize },
    #[error("connection closed by peer{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    Closed { mid_frame: bool },
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout { what: &'static str, ms: u64 },
    /// A reply with an error status to a handshake or to a request sent with [`crate::call`]
    /// or a [`crate::Caller`].
    #[error("the server refused: {reason}")]
    Refused { status: crate::Status, reason: String },
    #[error("authenticating {peer}: {reason}")]
    AuthFailed { peer: String, reason: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("bad configuration: {field} = {value}: {reason}")]
    BadConfig { field: &'static str, value: String, reason: String },
    #[error("RDMA: {reason}")]
    Rdma { reason: String },
    #[error("RDMA was asked for but is not available here: {reason}")]
    RdmaUnavailable { reason: String },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Short alias used across the crate.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
