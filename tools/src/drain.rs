//! `tessera drain`: removes a server from a replicated cluster gracefully.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_replication::protocol::NodeId;
use tessera_transport::Op;

use crate::common::{EtcdArgs, SecretArgs};
use crate::status::cluster_status;

/// Remove a server from a replicated cluster without losing anything, while training goes on.
///
/// The coordinator stops placing ranges on the server: every range whose chain it is in gets a
/// replacement (copied from the range's tail while pushes continue) where the cluster has a
/// server to spare, then the server leaves each chain. This command waits for that, showing
/// the ranges still on the server. The drained server then stops by itself, and leaves the
/// configuration once its heartbeats have stopped.
/// A range whose chain has no other live server keeps it: drain needs somewhere to go.
///
///   tessera drain 127.0.0.1:7073 --coordinator 127.0.0.1:7000
///   tessera drain 3 --etcd 127.0.0.1:2379      # by node id
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct DrainArgs {
    /// The server to drain: its address as the cluster knows it (see `tessera status`), or its
    /// node id.
    server: String,
    /// The cluster's coordinator.
    #[arg(long)]
    coordinator: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    secret: SecretArgs,
    /// Stop waiting after this many seconds (the drain itself goes on).
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

pub fn run(args: DrainArgs) -> Result<()> {
    let Some(locator) = args.etcd.locator(args.coordinator.as_deref())? else {
        bail!("say where the cluster is: --coordinator ADDR, or --etcd ENDPOINTS");
    };
    let addr = locator.resolve()?;
    let transport = args.secret.transport();
    let body = tessera_transport::ask(&addr, Op::Drain, args.server.as_bytes(), &transport)
        .with_context(|| format!("asking the coordinator at {addr} to drain {}", args.server))?;
    let node = NodeId(String::from_utf8_lossy(&body).parse().context("the coordinator's answer")?);
    eprintln!("draining node {node} ({})", args.server);
    let started = Instant::now();
    let mut shown = None;
    loop {
        // Ask whoever leads now: with etcd, the coordinator may change meanwhile.
        let status = locator.resolve().ok().and_then(|a| cluster_status(&a, &transport).ok());
        if let Some(config) = status.as_ref().and_then(|s| s.config.as_ref()) {
            if config.member(node).is_none() || config.drained(node) {
                eprintln!("node {node} is drained after {:.1} s: it holds no range, and the server stops by itself", started.elapsed().as_secs_f64());
                return Ok(());
            }
            let left = config.chains.iter().filter(|c| c.holds(node)).count();
            if shown != Some(left) {
                eprintln!("  {left} of {} ranges still on node {node}", config.chains.len());
                shown = Some(left);
            }
        }
        if started.elapsed() > Duration::from_secs(args.timeout_s) {
            bail!(
                "node {node} is still in the cluster after {} s ({} ranges on it); the drain goes on: follow it with `tessera status`. \
                 A range whose chain has no other live server keeps its last copy here.",
                args.timeout_s,
                shown.map_or_else(|| "?".to_string(), |n| n.to_string())
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
