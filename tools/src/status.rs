//! `tessera status`: what a running server holds.

use anyhow::Result;
use clap::Args;
use tessera_client::{Client, ClientConfig};

use crate::common::addresses;

/// Show each server's tables, the part each shard owns, its vector-clock stamp and its counters.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Servers to ask, comma-separated.
    #[arg(long, default_value = "127.0.0.1:7070")]
    connect: String,
    /// Print the raw JSON reports.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> Result<()> {
    let addrs = addresses(&args.connect);
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    // Status is read-only; the worker id only labels the connection.
    let client = Client::connect(&refs, ClientConfig::worker(u32::MAX))?;
    let reports = client.status()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    for (addr, r) in addrs.iter().zip(&reports) {
        let info = &r["info"];
        let text = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), String::from);
        let transport = if info["rdma"].as_bool() == Some(true) { "RDMA and TCP" } else { "TCP" };
        println!(
            "server {addr}: index {} of {}, {} shards, serves {transport}, version {}",
            info["server_index"], info["servers"], info["shards"], text(&info["version"])
        );
        for t in r["catalog"]["tables"].as_array().into_iter().flatten() {
            let s = &t["spec"];
            println!(
                "  table {} (id {}): {} [{}, {}) dim {}, updater {}",
                text(&s["name"]), t["id"], text(&s["kind"]), s["start"], s["end"], s["dim"], text(&s["updater"])
            );
        }
        for sh in r["shards"].as_array().into_iter().flatten() {
            println!("  shard {}: {} connections, {} MiB mapped ({} MiB locked)", sh["shard"], sh["connections"], sh["bytes_mapped"].as_u64().unwrap_or(0) >> 20, sh["bytes_locked"].as_u64().unwrap_or(0) >> 20);
            let disk = &sh["disk"];
            if disk.is_object() {
                println!(
                    "    disk: {} log commits of {} records, {} checkpoints ({} MiB written)",
                    disk["wal_commits"], disk["wal_records"], disk["checkpoints"], disk["checkpoint_bytes"].as_u64().unwrap_or(0) >> 20
                );
            }
            if let Some(failure) = sh["log_failure"].as_str() {
                println!("    THE WRITE-AHEAD LOG FAILED, pushes are refused: {failure}");
            }
            for p in sh["tables"].as_array().into_iter().flatten() {
                println!(
                    "    table {} [{}, {}): {} pushes, {} pulls, {} clock segments; clocks: all keys at least {}, newest {}",
                    p["table"], p["start"], p["end"], p["pushes"], p["pulls"], p["clock_segments"], p["stamp"], p["clocks_max"]
                );
            }
        }
    }
    Ok(())
}
