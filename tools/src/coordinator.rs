//! `tessera coordinator`: keeps a replicated cluster's configuration, until interrupted (or,
//! with etcd, until it loses etcd's election).

use anyhow::{Context, Result};
use clap::Args;
use tessera_coordinator::{ConfigStore, CoordinatorHandle, FileStore};
use tessera_replication::ReplicationConfig;

use crate::common::{EtcdArgs, SecretArgs};
use crate::metrics::MetricsArgs;

/// Keep a replicated cluster's configuration: members, each range's chain, and epochs.
///
/// Servers join with `tessera server --coordinator ADDR --node-id N` and heartbeat to it. Once
/// --servers of them have said hello, every range is placed on a chain of --replicas of them by
/// consistent hashing. A server that stops heartbeating for --failure-timeout-ms leaves its
/// chains; one that joins later (or restarts) is filled from each range's tail, then appended.
/// Every server takes the replication settings from here.
///
///   tessera coordinator --listen 127.0.0.1:7000 --servers 3 --replicas 2
///   tessera status --coordinator 127.0.0.1:7000     # members, chains, epochs, lag
///
/// With --data-dir, the configuration is also kept in DIR/cluster.json, written and synced
/// before any server hears of it: restarted (after a crash, or after the whole cluster lost
/// power), this coordinator continues the cluster instead of waiting to make a new one. Servers
/// started with --durability wal then come back with their ranges from their own disks.
///
///   tessera coordinator --listen 127.0.0.1:7000 --servers 3 --data-dir /var/lib/tessera/coordinator
///
/// With --etcd, the configuration is kept in etcd instead of this process's memory, and any
/// number of coordinators may run: they campaign in etcd's election, the winner coordinates
/// (writing each new configuration in one etcd transaction), and the others wait to take over
/// from the stored configuration if it dies. Servers then find the coordinator through etcd
/// (`tessera server --etcd`), and watch the configuration there. A coordinator that loses the
/// election (its lease lapsed, or etcd could not be reached) steps down, stands by, and
/// campaigns again a second later; it does not exit.
///
///   tessera coordinator --etcd 127.0.0.1:2379 --listen 127.0.0.1:7000 --servers 3
///   tessera coordinator --etcd 127.0.0.1:2379 --listen 127.0.0.1:7001 --servers 3   # standby
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CoordinatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: String,
    /// Servers to wait for before placing ranges.
    #[arg(long, default_value_t = 1)]
    servers: u32,
    /// Servers in each range's chain.
    #[arg(long, default_value_t = ReplicationConfig::default().replicas)]
    replicas: u32,
    /// Ranges the key space of every table is cut into; each has its own chain.
    #[arg(long, default_value_t = ReplicationConfig::default().ranges)]
    ranges: u32,
    /// Most workers (worker ids 0 to this minus one).
    #[arg(long, default_value_t = ReplicationConfig::default().workers)]
    workers: u32,
    /// A server not heard from for this long leaves its chains.
    #[arg(long, default_value_t = ReplicationConfig::default().failure_timeout_ms)]
    failure_timeout_ms: u64,
    /// How often servers heartbeat.
    #[arg(long, default_value_t = ReplicationConfig::default().heartbeat_interval_ms)]
    heartbeat_interval_ms: u64,
    /// Keep the configuration in this directory too, so that a restarted coordinator continues
    /// the cluster (see above). Not with --etcd, which keeps it in etcd.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    secret: SecretArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let rcfg = ReplicationConfig {
        replicas: args.replicas,
        ranges: args.ranges,
        workers: args.workers,
        failure_timeout_ms: args.failure_timeout_ms,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        ..ReplicationConfig::default()
    };
    if let Some(at) = args.metrics.start()? {
        eprintln!("metrics at http://{at}/metrics");
    }
    let store: Box<dyn ConfigStore> = match (&args.data_dir, &args.etcd.etcd) {
        (Some(_), Some(_)) => anyhow::bail!("--data-dir and --etcd both say where the configuration is kept: give one"),
        (Some(dir), None) => Box::new(FileStore::new(dir)?),
        (None, _) => args.etcd.store()?,
    };
    let kept = store.describe();
    let handle = CoordinatorHandle::start(&args.listen, rcfg, args.servers, &args.secret.transport(), store).context("starting the coordinator")?;
    eprintln!("tessera coordinator listening on {}, configuration kept {kept}; a new cluster waits for {} servers", handle.local_addr(), args.servers);
    handle.wait().context("the coordinator stopped")
}
