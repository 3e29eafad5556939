//! Everything a shard keeps on disk, and how it comes back after a crash.
//!
//! From the bottom up:
//! - [`disk`]: O_DIRECT file I/O on the shard's own io_uring ring (pwrite/fsync where there is
//!   none), and the directory fsync every rename needs;
//! - [`wal`]: the write-ahead log's record format, its commit batches and its replaying reader;
//! - [`checkpoint`]: the checkpoint's chunk format, the manifest that names the chunks, and
//!   their writer and loader ([`checkpoint::store`]);
//! - [`durable`]: one shard's log with group commit, its checkpoints, and its recovery;
//! - [`examine`]: a data directory read offline, for `tessera checkpoint verify` and `inspect`.
//!
//! The catalog file (which tables exist) is the server's: see [`crate::server::CATALOG_FILE`].

pub mod checkpoint;
pub mod disk;
pub mod durable;
pub mod examine;
pub mod wal;
