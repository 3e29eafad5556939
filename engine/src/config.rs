//! Every engine knob, with its default, its unit in its name, and its validation. Limits derived
//! from others are constants with compile-time checks.

use crate::error::{EngineError, Result};

/// Most workers whose clocks a table tracks (`--workers-max` at most); a push from a higher
/// worker id is refused. One limit for the whole system: replication's vector clocks carry as
/// many.
pub use tessera_replication::config::WORKERS_MAX as WORKERS_MAX_CEILING;
/// Largest clock a push may carry: dense blocks keep clocks as u32 for one-sided reads.
pub const CLOCK_MAX: u64 = tessera_layout::dense::STAMP_CLOCK_MAX;
/// Most clock entries (segments x workers) one table part preallocates: 128 MiB of u64.
pub const CLOCK_ENTRIES_MAX: u64 = 16 << 20;
/// Smallest and largest values per dense block, in bytes.
pub const DENSE_BLOCK_BYTES_MIN: usize = 8;
pub const DENSE_BLOCK_BYTES_MAX: usize = 1 << 20;
/// Alignment of every disk transfer: offsets, lengths and buffers (what `O_DIRECT` needs).
pub const IO_ALIGN_BYTES: usize = 4096;
/// Most steps in one chain of disk requests (say, a log batch's writes and its fsync).
pub const IO_CHAIN_OPS_MAX: usize = 8;
const _: () = assert!(IO_CHAIN_OPS_MAX <= 256, "a completion tag keeps the step index in 8 bits");
/// Bytes of state per checkpoint chunk (about: chunks hold whole slots): the unit a checkpoint
/// rewrites when a push changed any of it.
pub const CHECKPOINT_CHUNK_BYTES: usize = 64 << 10;
/// Bytes of each of a shard's two log buffers by default: one fills while the other is written.
/// A push whose log record is larger is refused in `wal` mode (raise `--wal-buffer-bytes`).
pub const WAL_BUFFER_BYTES_DEFAULT: usize = 8 << 20;
/// The largest log buffer `--wal-buffer-bytes` accepts (one commit never holds more).
pub const WAL_BUFFER_BYTES_MAX: usize = 256 << 20;
/// Bytes of a shard's checkpoint buffer: chunks gather here and go out in one write.
pub const CHECKPOINT_BUFFER_BYTES: usize = 1 << 20;
const _: () = assert!(CHECKPOINT_BUFFER_BYTES >= 2 * CHECKPOINT_CHUNK_BYTES, "a chunk and its header fit");
/// Keys of remembered key lists a shard keeps per connection by default (8 bytes each), for
/// workers that send a repeated key list by its hash (`--key-cache-keys`).
pub use tessera_transport::keycache::KEY_CACHE_KEYS_DEFAULT;
/// Most shards one server runs.
pub const SHARDS_MAX: u16 = 256;
/// Sparse tables never fill past this share of their slots, so probes stay short.
pub const SPARSE_LOAD_PERCENT_MAX: u64 = 75;
/// How many keys ahead of the one it applies or reads a loop over a sparse request's keys asks
/// for a key's slot to be fetched into the cache: enough for the misses to overlap, few enough
/// that what is fetched is still there when its turn comes.
pub const PREFETCH_KEYS_AHEAD: usize = 8;
/// Sparse tables start with at least this many slots per shard.
pub const SPARSE_SLOTS_MIN: u64 = 1024;
const _: () = assert!(SPARSE_SLOTS_MIN.is_power_of_two(), "slot counts are powers of two: probing masks");
const _: () = assert!(SPARSE_LOAD_PERCENT_MAX < 100, "an open-addressing table needs an empty slot");

/// What survives a crash (`--durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Memory only.
    #[default]
    None,
    /// Checkpoints every `checkpoint_interval_s`: a crash loses at most one interval.
    Checkpoint,
    /// Checkpoints, and every applied push logged before it is acknowledged: a crash loses no
    /// acknowledged push.
    Wal,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Durability::None),
            "checkpoint" => Ok(Durability::Checkpoint),
            "wal" => Ok(Durability::Wal),
            _ => Err(format!("{s:?} is not a durability level: none, checkpoint or wal")),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::None => "none",
            Durability::Checkpoint => "checkpoint",
            Durability::Wal => "wal",
        })
    }
}

/// Knobs for one server's engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Shards (threads, one per core). Default: the cores this process may run on.
    pub shards: u16,
    /// Pin each shard thread to its own core.
    pub pin_cores: bool,
    /// Where pinned shards start among the cores this process may run on: shard `i` takes the
    /// allowed core `(first_core + i) mod cores`. Servers sharing one process (a `tessera demo
    /// --servers` cluster) each start where the last one's shards ended.
    pub first_core: usize,
    /// Workers each table's vector clocks track. Each dense block also carries one clock entry
    /// per worker (4 bytes each) for one-sided reads, so keep this near the job's worker count.
    pub workers_max: u32,
    /// Bytes of values per dense block, the unit a one-sided read checks for tearing (rounded to
    /// whole keys, at least one). Small blocks make small reads cheap; each costs 16 bytes of
    /// versions and `4 x workers_max` of stamp.
    pub dense_block_bytes: usize,
    /// Most clock segments one table part may split into.
    pub clock_segments_max: usize,
    /// Keys a sparse table holds across all shards when its spec does not say.
    pub sparse_capacity_keys_default: u64,
    /// What survives a crash; anything but `None` needs `data_dir`.
    pub durability: Durability,
    /// Where checkpoints, logs and the catalog live (one directory per shard inside).
    pub data_dir: Option<std::path::PathBuf>,
    /// Seconds between checkpoints; 0 takes none but on demand.
    pub checkpoint_interval_s: u64,
    /// Bytes of each of a shard's two log buffers (see [`WAL_BUFFER_BYTES_DEFAULT`]).
    pub wal_buffer_bytes: usize,
    /// Write with `pwrite`/`fsync` even where io_uring works (tests run both).
    pub disk_force_blocking: bool,
    /// Start even when recovery finds that acknowledged data cannot be read (damage to a log or
    /// a checkpoint that the logs do not cover): serve what precedes the damage and set the
    /// rest aside, never deleted. Off, such a server refuses to start and names the damage.
    pub recovery_accept_loss: bool,
    /// Keys of remembered key lists each shard keeps per connection; 0 remembers none, and
    /// workers that send key lists by hash get them refused and send the keys again.
    pub key_cache_keys: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            shards: available_cores().clamp(1, SHARDS_MAX as usize) as u16,
            pin_cores: true,
            first_core: 0,
            workers_max: 16,
            dense_block_bytes: 256,
            clock_segments_max: 1024,
            sparse_capacity_keys_default: 4 << 20,
            durability: Durability::None,
            data_dir: None,
            checkpoint_interval_s: 60,
            wal_buffer_bytes: WAL_BUFFER_BYTES_DEFAULT,
            disk_force_blocking: false,
            recovery_accept_loss: false,
            key_cache_keys: KEY_CACHE_KEYS_DEFAULT,
        }
    }
}

impl EngineConfig {
    /// Checks every field; an error names the field and what it accepts.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, value: String, reason: &str| Err(EngineError::BadConfig { field, value, reason: reason.into() });
        if self.shards == 0 || self.shards > SHARDS_MAX {
            return bad("shards", self.shards.to_string(), "must be between 1 and 256");
        }
        if self.workers_max == 0 || self.workers_max > WORKERS_MAX_CEILING {
            return bad("workers_max", self.workers_max.to_string(), &format!("must be between 1 and {WORKERS_MAX_CEILING}"));
        }
        if !(DENSE_BLOCK_BYTES_MIN..=DENSE_BLOCK_BYTES_MAX).contains(&self.dense_block_bytes) {
            return bad("dense_block_bytes", self.dense_block_bytes.to_string(), "must be between 8 and 1 MiB");
        }
        if self.clock_segments_max < 4 {
            return bad("clock_segments_max", self.clock_segments_max.to_string(), "must be at least 4");
        }
        // Each table part preallocates segments x workers clock entries; keep that under 128 MiB.
        if (self.clock_segments_max as u64) * (self.workers_max as u64) > CLOCK_ENTRIES_MAX {
            let value = format!("{} x workers_max {}", self.clock_segments_max, self.workers_max);
            return bad("clock_segments_max", value, "segments x workers must stay under 16 Mi entries");
        }
        if self.sparse_capacity_keys_default == 0 {
            return bad("sparse_capacity_keys_default", "0".into(), "must be at least 1");
        }
        if self.durability != Durability::None && self.data_dir.is_none() {
            return bad("durability", self.durability.to_string(), "needs a data directory (--data-dir)");
        }
        if self.wal_buffer_bytes < IO_ALIGN_BYTES || !self.wal_buffer_bytes.is_multiple_of(IO_ALIGN_BYTES) {
            return bad("wal_buffer_bytes", self.wal_buffer_bytes.to_string(), "must be a positive multiple of 4096");
        }
        if self.wal_buffer_bytes > WAL_BUFFER_BYTES_MAX {
            return bad("wal_buffer_bytes", self.wal_buffer_bytes.to_string(), "must be at most 256 MiB");
        }
        Ok(())
    }
}

/// Cores this process may run on.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
