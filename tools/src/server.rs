//! `tessera server`: one server of a cluster, until interrupted.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_engine::server::Join;
use tessera_engine::{Server, UpdaterRegistry};

use crate::common::{read_tables, EngineArgs, EtcdArgs, TransportArgs};
use crate::metrics::MetricsArgs;

/// Run a server until interrupted.
///
/// Tables come from `--tables FILE` (TOML, one `[[table]]` each) and from clients that create
/// them. Alone (no --coordinator or --etcd), a server holds every table whole, one range per
/// shard, each range a chain of one (itself), and needs no coordinator:
///
///   tessera server --listen 127.0.0.1:7070 --tables t.toml
///   tessera demo --connect 127.0.0.1:7070
///
/// A tables file:
///
///   [[table]]
///   name = "embeddings"
///   kind = "sparse"            # or "dense" (then give start and end)
///   dim = 16
///   updater = "adagrad{lr=0.05,eps=1e-8}"
///   init = { uniform = { scale = 0.01, seed = 7 } }
///   non_finite = "skip"        # or "reject" (default)
///
/// Several servers make a cluster: start a coordinator, then each server with its own
/// --node-id and the coordinator's address. Every table is cut into ranges, each range kept on a
/// chain of --replicas servers (set on the coordinator; 1 keeps one copy, spreading the tables
/// over the servers for room), servers may join and leave while training runs, and workers
/// connect to any server:
///
///   tessera coordinator --listen 127.0.0.1:7000 --servers 3 --replicas 2
///   tessera server --listen 127.0.0.1:7071 --node-id 1 --coordinator 127.0.0.1:7000 --tables t.toml
///   (and likewise node ids 2 and 3; every server needs the same --tables and --shards)
///   tessera demo --connect 127.0.0.1:7071
///
/// With the configuration kept in etcd (any number of coordinators, one elected):
///
///   tessera coordinator --etcd 127.0.0.1:2379 --listen 127.0.0.1:7000 --servers 3
///   tessera server --listen 127.0.0.1:7071 --node-id 1 --etcd 127.0.0.1:2379 --tables t.toml
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Tables to create at start-up (TOML).
    #[arg(long)]
    tables: Option<PathBuf>,
    /// Join the cluster this coordinator keeps (see `tessera coordinator`).
    #[arg(long, requires = "node_id")]
    coordinator: Option<String>,
    /// Or join the cluster kept in etcd (see `tessera coordinator --etcd`).
    #[command(flatten)]
    etcd: EtcdArgs,
    /// This server's id in a cluster: distinct per server, the same across its restarts.
    #[arg(long)]
    node_id: Option<u32>,
    /// Where peers and workers reach this server, if not at --listen (e.g. when listening on
    /// 0.0.0.0).
    #[arg(long)]
    advertise: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    net: TransportArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

pub fn run(args: ServerArgs) -> Result<()> {
    let tables = match &args.tables {
        Some(path) => read_tables(path)?,
        None => Vec::new(),
    };
    let mut cfg = args.engine.server_config(&args.listen, tables, true, &args.net);
    if let Some(coordinator) = args.etcd.locator(args.coordinator.as_deref())? {
        let Some(node) = args.node_id else { bail!("a server in a cluster needs --node-id N (distinct per server, the same across its restarts)") };
        cfg.replication = Some(Join { node, coordinator, advertise: args.advertise.clone() });
    }
    let shards = cfg.engine.shards;
    if let Some(at) = args.metrics.start()? {
        eprintln!("metrics at http://{at}/metrics");
    }
    let server = Server::start(cfg, UpdaterRegistry::new()).context("starting the server")?;
    for r in server.recovery() {
        let from = match r.checkpoint {
            Some(seq) => format!("checkpoint {seq} (exact at log record {})", r.checkpoint_lsn),
            None => "no checkpoint".to_string(),
        };
        eprintln!("shard {} recovered: {from}, then {} log records replayed ({})", r.shard, r.records_replayed, r.log_end);
        for f in &r.fallbacks {
            eprintln!("shard {}: passed over {f}", r.shard);
        }
        for (table, (start, end), stamp) in &r.tables {
            eprintln!("shard {}: table {table} [{start}, {end}) at clocks {stamp:?}", r.shard);
        }
    }
    eprintln!("tessera server listening on {} with {shards} shards", server.local_addr());
    server.wait();
    Ok(())
}
