//! The engine's one error enum. Every operating error a caller can cause is a variant here with the
//! fields a person needs to fix it; broken invariants are panics instead.

use std::ops::Range;

/// Everything the engine can refuse, with enough structure for a client to act on it.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum EngineError {
    #[error("unknown table id {table}")]
    UnknownTable { table: u32 },
    #[error("unknown table {name:?}")]
    UnknownTableName { name: String },
    #[error("table {name:?} already exists with a different definition")]
    TableConflict { name: String },
    #[error("key {key} is outside table {table}'s range {range:?}")]
    KeyOutOfRange { table: u32, key: u64, range: Range<u64> },
    #[error("key {key} is not owned by shard {shard} (it owns {owned:?}); refresh the range map")]
    KeyNotOwned { key: u64, shard: u16, owned: Range<u64> },
    #[error("table {table} has dim {table_dim}, the request assumed dim {request_dim}")]
    WrongDim { table: u32, table_dim: u32, request_dim: u32 },
    #[error("values length {values} is not keys ({keys}) x dim ({dim})")]
    ValuesLength { keys: usize, dim: u32, values: usize },
    #[error("gradient component {index} is not finite ({value}); this table rejects NaN/Inf")]
    NonFinite { index: usize, value: f32 },
    #[error("worker id {worker} is over this table's limit of {workers_max} workers (worker ids 0 to {workers_max} minus 1; raise --workers-max)")]
    WorkerOutOfRange { worker: u32, workers_max: usize },
    #[error("clock {clock} is over the limit of {max}; clocks count iterations")]
    ClockTooLarge { clock: u64, max: u64 },
    #[error("range {range:?} has split into {segments_max} clock segments, the limit (raise the server's --clock-segments-max)")]
    ClockSegmentsFull { range: Range<u64>, segments_max: usize },
    #[error("sparse table {table} is full ({capacity} keys on this shard); raise its capacity")]
    SparseTableFull { table: u32, capacity: usize },
    #[error("bad updater {spec:?}: {reason}")]
    BadUpdater { spec: String, reason: String },
    #[error("bad table definition {name:?}: {reason}")]
    BadTable { name: String, reason: String },
    #[error("bad configuration: {field} = {value}: {reason}")]
    BadConfig { field: &'static str, value: String, reason: String },
    #[error("could not map {bytes} bytes for the shard arena: {reason}")]
    ArenaMap { bytes: usize, reason: String },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    #[error("the reply would be {bytes} bytes, over the frame limit of {limit}; ask for fewer keys")]
    ReplyTooLarge { bytes: usize, limit: usize },
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("disk {op} failed on {path}: {reason}")]
    Disk { op: &'static str, path: String, reason: String },
    #[error("disk full writing {path}: free space there (meanwhile the server serves what it holds in memory, but makes nothing more durable)")]
    DiskFull { path: String },
    #[error("the write-ahead log failed ({reason}), so pushes are refused and not applied; pulls are still served from memory. Free the disk and restart the server, which recovers every acknowledged push")]
    LogFailed { reason: String },
    #[error("this server's write-ahead log failed ({reason}): the server is leaving its chains, and the push goes to its range's next head once the coordinator names one (within its failure timeout)")]
    LeavingChains { reason: String },
    #[error("a log record of {bytes} bytes does not fit the {left} bytes left in this commit")]
    LogBufferFull { bytes: usize, left: usize },
    #[error("{what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("cannot recover: {what}: {reason}. The server will not serve without data it was given: restore the file, or start with --accept-data-loss to serve what can be read (the rest is set aside, not deleted); `tessera checkpoint verify DATA_DIR` shows every problem")]
    Unrecoverable { what: String, reason: String },
    #[error("replication range {range} is not held here now; ask its chain's tail (refresh the cluster configuration)")]
    RangeNotHeld { range: u32 },
    #[error("worker id {worker} is in use by another client: {why}. Every live client needs a worker id of its own (ClientConfig::worker)")]
    WorkerIdInUse { worker: u32, why: &'static str },
    #[error("this connection holds no key list with hash {hash:#x} and {count} keys: send the keys again (key-list caching)")]
    KeysUnknown { hash: u64, count: u32 },
    /// The coordinator, or the etcd a server finds it through.
    #[error(transparent)]
    Coordinator(#[from] tessera_coordinator::CoordinatorError),
    #[error("not authenticated: {reason}")]
    Unauthenticated { reason: String },
    #[error("I/O error: {0}")]
    Io(String),
}

/// Short alias used across the crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// The wire status a client sees for this error.
    pub fn status(&self) -> tessera_transport::Status {
        use tessera_transport::Status;
        match self {
            EngineError::UnknownTable { .. } | EngineError::UnknownTableName { .. } => Status::UnknownTable,
            EngineError::KeyOutOfRange { .. } => Status::KeyOutOfRange,
            EngineError::KeyNotOwned { .. } | EngineError::RangeNotHeld { .. } => Status::NotOwned,
            EngineError::WrongDim { .. } => Status::WrongDim,
            EngineError::KeysUnknown { .. } => Status::KeysUnknown,
            EngineError::WorkerIdInUse { .. } => Status::WorkerIdInUse,
            EngineError::ValuesLength { .. } => Status::ValuesLength,
            EngineError::NonFinite { .. } => Status::NonFinite,
            EngineError::SparseTableFull { .. } | EngineError::ClockSegmentsFull { .. } => Status::Full,
            EngineError::ReplyTooLarge { .. } => Status::FrameTooLarge,
            EngineError::ShuttingDown => Status::ShuttingDown,
            EngineError::LogFailed { .. } => Status::NotDurable,
            EngineError::LeavingChains { .. } => Status::Unacknowledged,
            EngineError::ArenaMap { .. } | EngineError::Io(_) | EngineError::Coordinator(_) | EngineError::Disk { .. } | EngineError::DiskFull { .. } => {
                Status::Internal
            }
            _ => Status::BadRequest,
        }
    }
}
