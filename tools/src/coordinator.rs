//! `tessera coordinator`: keeps a replicated cluster's configuration, until interrupted.

use anyhow::{Context, Result};
use clap::Args;
use tessera_engine::chain::coordinator::CoordinatorHandle;
use tessera_replication::ReplicationConfig;
use tessera_transport::TransportConfig;

/// Keep a replicated cluster's configuration: members, each range's chain, and epochs.
///
/// Servers join with `tessera server --coordinator ADDR --node-id N` and heartbeat to it. Once
/// --servers of them have said hello, every range is placed on a chain of --replicas of them by
/// consistent hashing. A server that stops heartbeating for --failure-timeout-ms leaves its
/// chains; one that joins later (or restarts) is filled from each range's tail, then appended.
/// Every server takes the replication settings from here.
///
///   tessera coordinator --listen 127.0.0.1:7000 --servers 3 --replicas 2
///   tessera status --connect 127.0.0.1:7000     # members, chains, epochs, lag
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
    let handle = CoordinatorHandle::start(&args.listen, rcfg, args.servers, &TransportConfig::default()).context("starting the coordinator")?;
    eprintln!("tessera coordinator listening on {}, waiting for {} servers", handle.local_addr(), args.servers);
    handle.wait();
    Ok(())
}
