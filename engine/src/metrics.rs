//! What a server measures about itself, for `--metrics ADDR` (Prometheus text format).
//!
//! Recorded through the `metrics` facade. Each shard makes its handles once (per table when a
//! table part is added), so the data path only adds to atomics: no lookups, no locks. Without
//! an exporter installed every handle is a no-op.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `tessera_pushes_total`, `tessera_pulls_total` | counter | shard, table |
//! | `tessera_received_bytes_total`, `tessera_sent_bytes_total` | counter | shard, table |
//! | `tessera_request_seconds` | histogram (service time in the shard) | shard, table, op |
//! | `tessera_request_errors_total` | counter | shard |
//! | `tessera_connections` | gauge | shard |
//! | `tessera_wal_fsync_seconds` | histogram (a log commit: its write and fsync) | shard |
//! | `tessera_checkpoint_age_seconds` | gauge | shard |
//! | `tessera_replication_lag_ticks` | gauge (clock ticks a replica is behind its chain's head) | shard |
//! | `tessera_rdma_slot_stalls_total` | counter | shard |
//! | `tessera_auth_refusals_total` | counter | |

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use tessera_transport::Op;

pub const PUSHES: &str = "tessera_pushes_total";
pub const PULLS: &str = "tessera_pulls_total";
pub const RECEIVED_BYTES: &str = "tessera_received_bytes_total";
pub const SENT_BYTES: &str = "tessera_sent_bytes_total";
pub const REQUEST_SECONDS: &str = "tessera_request_seconds";
pub const REQUEST_ERRORS: &str = "tessera_request_errors_total";
pub const CONNECTIONS: &str = tessera_transport::metrics::CONNECTIONS;
pub const WAL_FSYNC_SECONDS: &str = "tessera_wal_fsync_seconds";
pub const CHECKPOINT_AGE_SECONDS: &str = "tessera_checkpoint_age_seconds";
pub const REPLICATION_LAG_TICKS: &str = "tessera_replication_lag_ticks";

/// Whether an exporter is installed; until then shards take no timestamps for metrics.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Tells shards an exporter is installed: from now on they time requests and refresh gauges.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether [`enable`] was called. One relaxed load: cheap enough for every request.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How often a shard refreshes its gauges (checkpoint age, replication lag).
pub const GAUGE_PERIOD: Duration = Duration::from_secs(1);

/// One table part's handles on one shard.
#[derive(Debug, Clone)]
pub struct TableMetrics {
    pushes: Counter,
    pulls: Counter,
    received_bytes: Counter,
    sent_bytes: Counter,
    push_seconds: Histogram,
    pull_seconds: Histogram,
}

impl TableMetrics {
    pub fn new(shard: u16, table: &str) -> Self {
        let labels = [("shard", shard.to_string()), ("table", table.to_string())];
        let with_op = |op: &'static str| {
            let mut l = labels.to_vec();
            l.push(("op", op.to_string()));
            histogram!(REQUEST_SECONDS, &l)
        };
        Self {
            pushes: counter!(PUSHES, &labels),
            pulls: counter!(PULLS, &labels),
            received_bytes: counter!(RECEIVED_BYTES, &labels),
            sent_bytes: counter!(SENT_BYTES, &labels),
            push_seconds: with_op("push"),
            pull_seconds: with_op("pull"),
        }
    }

    /// Counts one request served without error. Only pushes and pulls count; the bytes are the
    /// request's body and the reply's.
    pub fn served(&self, op: Op, received: usize, sent: usize, took: Duration) {
        let (count, seconds) = match op {
            Op::Push | Op::PushRange | Op::WorkerPush => (&self.pushes, &self.push_seconds),
            Op::Pull | Op::PullRange => (&self.pulls, &self.pull_seconds),
            _ => return,
        };
        count.increment(1);
        seconds.record(took);
        self.received_bytes.increment(received as u64);
        self.sent_bytes.increment(sent as u64);
    }
}

/// One shard's handles that no table owns.
#[derive(Debug)]
pub struct ShardMetrics {
    shard: u16,
    pub errors: Counter,
    pub connections: Gauge,
    /// Per table id: that table's handles, made when the part is added.
    pub tables: Vec<Option<TableMetrics>>,
    gauges_at: Instant,
}

impl ShardMetrics {
    pub fn new(shard: u16) -> Self {
        let labels = [("shard", shard.to_string())];
        Self { shard, errors: counter!(REQUEST_ERRORS, &labels), connections: gauge!(CONNECTIONS, &labels), tables: Vec::new(), gauges_at: Instant::now() }
    }

    /// Makes the handles of table `id`, named `name`.
    pub fn add_table(&mut self, id: u32, name: &str) {
        let id = id as usize;
        if self.tables.len() <= id {
            self.tables.resize_with(id + 1, || None);
        }
        self.tables[id] = Some(TableMetrics::new(self.shard, name));
    }

    /// The handles of table `id`, if the shard has it.
    pub fn table(&self, id: u32) -> Option<&TableMetrics> {
        self.tables.get(id as usize)?.as_ref()
    }

    /// Seconds since the shard's last checkpoint (only shards that keep any set it).
    pub fn checkpoint_age(&self, seconds: f64) {
        gauge!(CHECKPOINT_AGE_SECONDS, "shard" => self.shard.to_string()).set(seconds);
    }

    /// Clock ticks the shard's replica is behind (only replicated shards set it).
    pub fn replication_lag(&self, ticks: u64) {
        gauge!(REPLICATION_LAG_TICKS, "shard" => self.shard.to_string()).set(ticks as f64);
    }

    /// True at most once per [`GAUGE_PERIOD`]: time to refresh the gauges.
    pub fn gauges_due(&mut self) -> bool {
        if self.gauges_at.elapsed() < GAUGE_PERIOD {
            return false;
        }
        self.gauges_at = Instant::now();
        true
    }
}

/// A shard's log-commit latency histogram.
pub fn wal_fsync(shard: u16) -> Histogram {
    histogram!(WAL_FSYNC_SECONDS, "shard" => shard.to_string())
}
