//! `tessera status`: what a running server holds, or how a replicated cluster stands.

use anyhow::{Context, Result};
use clap::Args;
use tessera_coordinator::ClusterStatus;
use tessera_replication::protocol::RangeReport;
use tessera_transport::{Op, TransportConfig};

use crate::common::{addresses, ask_each, EtcdArgs, SecretArgs};

/// Show each server's tables, parts, clocks and counters, or a replicated cluster's chains.
///
/// Each address is asked on its own: standalone servers, or members of clusters (one member
/// answers for every member of its cluster, and each server is shown once).
///
/// Per server: its tables, the part each shard owns, its vector-clock stamp and its counters.
///
/// With --coordinator (or --etcd), show a replicated cluster instead: its members, each range's
/// chain (head first) and epoch, each replica's lag behind the head in clock ticks (pushes not
/// yet applied there), and the latest configuration changes.
///
///   tessera status --connect 127.0.0.1:7071,127.0.0.1:7072
///   tessera status --coordinator 127.0.0.1:7000
///   tessera status --etcd 127.0.0.1:2379
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct StatusArgs {
    /// Servers to ask, comma-separated.
    #[arg(long, default_value = "127.0.0.1:7070")]
    connect: String,
    /// Show the replicated cluster this coordinator keeps.
    #[arg(long)]
    coordinator: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    secret: SecretArgs,
    /// Print the raw JSON reports.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> Result<()> {
    if let Some(coordinator) = args.etcd.locator(args.coordinator.as_deref())? {
        return cluster(&coordinator.resolve()?, &args.secret.transport(), args.json);
    }
    let reports: Vec<serde_json::Value> = ask_each(&addresses(&args.connect), &args.secret, "its status", |client| {
        Ok(client.status()?.into_iter().map(|r| (r["addr"].as_str().unwrap_or_default().to_string(), r)).collect())
    })?
    .into_iter()
    .map(|(_, report)| report)
    .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    // On a cluster the reports are every member's, not only the addresses given.
    for r in &reports {
        let info = &r["info"];
        let text = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), String::from);
        let addr = text(&r["addr"]);
        let transport = if info["rdma"].as_bool() == Some(true) { "RDMA and TCP" } else { "TCP" };
        println!("server {addr}: {} shards, serves {transport}, version {}", info["shards"], text(&info["version"]));
        for t in r["catalog"]["tables"].as_array().into_iter().flatten() {
            let s = &t["spec"];
            println!(
                "  table {} (id {}): {} [{}, {}) dim {}, updater {}",
                text(&s["name"]),
                t["id"],
                text(&s["kind"]),
                s["start"],
                s["end"],
                s["dim"],
                text(&s["updater"])
            );
        }
        for sh in r["shards"].as_array().into_iter().flatten() {
            println!(
                "  shard {}: {} connections, {} MiB mapped ({} MiB locked)",
                sh["shard"],
                sh["connections"],
                sh["bytes_mapped"].as_u64().unwrap_or(0) >> 20,
                sh["bytes_locked"].as_u64().unwrap_or(0) >> 20
            );
            let disk = &sh["disk"];
            if disk.is_object() {
                println!(
                    "    disk: {} log commits of {} records, {} checkpoints ({} MiB written)",
                    disk["wal_commits"],
                    disk["wal_records"],
                    disk["checkpoints"],
                    disk["checkpoint_bytes"].as_u64().unwrap_or(0) >> 20
                );
            }
            if let Some(failure) = sh["log_failure"].as_str() {
                println!("    THE WRITE-AHEAD LOG FAILED, pushes are refused: {failure}");
            }
            let chain = &sh["replication"];
            if chain.is_object() {
                println!(
                    "    replica: {} pushes applied ({} seen again, {} dropped), {} updates forwarded ({} resent), {} acknowledgements sent to workers as a tail, {} snapshots sent, {} stale and {} refused messages",
                    chain["pushes_applied"],
                    chain["pushes_duplicate"],
                    chain["pushes_dropped"],
                    chain["updates_forwarded"],
                    chain["updates_resent"],
                    chain["tail_acks"],
                    chain["snapshots_sent"],
                    chain["stale_dropped"],
                    chain["refused"]
                );
            }
            let parts: Vec<&serde_json::Value> = sh["tables"].as_array().into_iter().flatten().collect();
            for (i, p) in parts.iter().enumerate() {
                let table = &p["table"];
                let first = i == 0 || parts[i - 1]["table"] != *table;
                let of_table: Vec<&&serde_json::Value> = parts[i..].iter().take_while(|q| q["table"] == *table).collect();
                if of_table.len() == 1 {
                    println!(
                        "    table {} [{}, {}): {} pushes, {} pulls, {} clock segments; clocks: all keys at least {}, newest {}",
                        table, p["start"], p["end"], p["pushes"], p["pulls"], p["clock_segments"], p["stamp"], p["clocks_max"]
                    );
                } else if first {
                    // A replicated server holds one part per replication range it is in.
                    let sum = |field: &str| of_table.iter().map(|q| q[field].as_u64().unwrap_or(0)).sum::<u64>();
                    let keys = of_table.iter().map(|q| q["end"].as_u64().unwrap_or(0).saturating_sub(q["start"].as_u64().unwrap_or(0))).sum::<u64>();
                    println!("    table {}: {} range parts over {} keys, {} pushes, {} pulls", table, of_table.len(), keys, sum("pushes"), sum("pulls"));
                }
            }
        }
    }
    Ok(())
}

/// Prints a replicated cluster as its coordinator at `addr` sees it.
fn cluster(addr: &str, transport: &TransportConfig, json: bool) -> Result<()> {
    let status = cluster_status(addr, transport)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let r = &status.replication;
    if !status.leading {
        println!("coordinator {addr} is a standby: another coordinator leads the cluster");
        return Ok(());
    }
    let Some(config) = &status.config else {
        println!("coordinator {addr}: the cluster is not born yet; waiting for {} more servers", status.waiting_for);
        return Ok(());
    };
    println!(
        "cluster {:016x} at coordinator {addr}: configuration {}, {} members, {} ranges on chains of {} (failure timeout {} ms)",
        config.cluster,
        config.id,
        config.members.len(),
        r.ranges,
        r.replicas,
        r.failure_timeout_ms
    );
    for m in &config.members {
        let draining = if m.draining { ", draining" } else { "" };
        println!("  member {} at {} (incarnation {}){draining}", m.node, m.addr, m.incarnation);
    }
    let report = |node: u32, range: u32| -> Option<&RangeReport> { status.reports.get(&node)?.iter().find(|rep| rep.range.0 == range) };
    println!("  range  epoch  chain (head first)    learner  lag behind the head, in clock ticks");
    for (i, chain) in config.chains.iter().enumerate() {
        let range = i as u32;
        let head = chain.head().and_then(|h| report(h.0, range)).filter(|rep| rep.epoch == chain.epoch).map(|rep| rep.ticks);
        let lag = |node: u32| match (head, report(node, range).filter(|rep| rep.epoch == chain.epoch && rep.installed)) {
            (Some(h), Some(rep)) => format!("{node}:{}", h.saturating_sub(rep.ticks)),
            _ => format!("{node}:?"),
        };
        let nodes: Vec<String> = chain.nodes.iter().map(|n| n.0.to_string()).collect();
        let lags: Vec<String> = chain.nodes.iter().chain(chain.learner.iter()).map(|n| lag(n.0)).collect();
        let learner = chain.learner.map_or_else(|| "-".to_string(), |l| l.0.to_string());
        println!("  {range:<5}  {:<5}  {:<20}  {learner:<7}  {}", chain.epoch.0, nodes.join(" -> "), lags.join(" "));
    }
    if !status.changes.is_empty() {
        println!("  latest changes:");
        for change in status.changes.iter().rev().take(10).rev() {
            println!("    {change}");
        }
    }
    Ok(())
}

/// A replicated cluster's status, from its coordinator at `addr`.
pub fn cluster_status(addr: &str, transport: &TransportConfig) -> Result<ClusterStatus> {
    let body = tessera_transport::ask(addr, Op::Status, &[], transport).with_context(|| format!("asking the coordinator at {addr}"))?;
    serde_json::from_slice(&body).context("the coordinator's status")
}
