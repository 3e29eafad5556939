//! Named crash points, for tests that kill a server at an exact step of its start-up, recovery,
//! table creation or checkpointing (as FoundationDB's BUGGIFY names its points).
//!
//! A build with the `crash-points` feature reads `TESSERA_CRASH_POINT` once: `NAME` kills the
//! process with SIGKILL (what `kill -9` does: no destructor runs, nothing is flushed) the first
//! time the server reaches point `NAME`, and `NAME:N` the N-th time. Without the feature every
//! point compiles to nothing. [`CRASH_POINTS`] lists every point the code names, so a test can
//! walk them all and a point the code no longer reaches fails that test.

/// Every crash point, in the order a server meets them.
pub const CRASH_POINTS: &[&str] = &[
    // Start-up, before anything is read.
    "startup.bound",
    // Recovery: the catalog read, each of its tables remade (in memory: nothing is written).
    "recovery.catalog_read",
    "recovery.table_made",
    // Recovery on each shard: its checkpoint loaded, each log replayed, the log reopened.
    "recovery.checkpoint_loaded",
    "recovery.log_replayed",
    "recovery.log_opened",
    // Every shard recovered; the tables the command line names are made next.
    "startup.recovered",
    // Table creation: the parts made on the shards, the new catalog written and then renamed.
    "table.parts_made",
    "catalog.written",
    "catalog.renamed",
    // A checkpoint: its new log started, each chunk buffer on disk, its manifest written and then
    // renamed into place, the checkpoint committed, the older files deleted.
    "checkpoint.log_started",
    "checkpoint.chunks_written",
    "checkpoint.manifest_written",
    "checkpoint.manifest_renamed",
    "checkpoint.committed",
    "checkpoint.pruned",
];

/// The environment variable that arms a crash point.
pub const CRASH_POINT_ENV: &str = "TESSERA_CRASH_POINT";

/// Reaching crash point `name`: kills the process here if `TESSERA_CRASH_POINT` names it (and
/// this is the time it counts to). Does nothing in a build without the `crash-points` feature.
#[inline(always)]
pub fn point(name: &'static str) {
    debug_assert!(CRASH_POINTS.contains(&name), "crash point {name} is not listed in CRASH_POINTS");
    #[cfg(feature = "crash-points")]
    armed::reach(name);
}

#[cfg(feature = "crash-points")]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    /// The armed point and the hit it fires on, read once.
    fn armed() -> Option<&'static (String, u64)> {
        static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
        ARMED
            .get_or_init(|| {
                let spec = std::env::var(super::CRASH_POINT_ENV).ok()?;
                let (name, nth) = match spec.split_once(':') {
                    Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                    None => (spec, 1),
                };
                assert!(super::CRASH_POINTS.contains(&name.as_str()), "{}={name} names no crash point", super::CRASH_POINT_ENV);
                Some((name, nth.max(1)))
            })
            .as_ref()
    }

    pub(super) fn reach(name: &'static str) {
        static HITS: AtomicU64 = AtomicU64::new(0);
        let Some((armed, nth)) = armed() else { return };
        if armed != name || HITS.fetch_add(1, Ordering::SeqCst) + 1 != *nth {
            return;
        }
        eprintln!("crash point {name} (hit {nth}): killing this process with SIGKILL");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::Kill);
        // SIGKILL cannot be caught; nothing runs after it.
        std::process::abort();
    }
}
