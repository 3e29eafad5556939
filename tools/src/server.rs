//! `tessera server`: one server of a cluster, until interrupted.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use tessera_engine::server::Join;
use tessera_engine::{Server, UpdaterRegistry};

use crate::common::{addresses, read_tables, EngineArgs, EtcdArgs, TransportArgs};
use crate::metrics::MetricsArgs;

/// Run a server until interrupted.
///
/// Tables come from `--tables FILE` (TOML, one `[[table]]` each) and from clients that create
/// them. In a cluster, start every server with the same `--cluster` list and `--tables`; each
/// owns an equal share of every table's key range, and clients connect to all of them:
///
///   tessera server --listen 127.0.0.1:7070 --cluster 127.0.0.1:7070,127.0.0.1:7071
///   tessera server --listen 127.0.0.1:7071 --cluster 127.0.0.1:7070,127.0.0.1:7071
///   tessera demo --connect 127.0.0.1:7070,127.0.0.1:7071
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
/// Replicated instead: start a coordinator, then each server with its own --node-id and the
/// coordinator's address; every range is then chain-replicated on --replicas servers (set on
/// the coordinator), and workers connect to any server:
///
///   tessera coordinator --listen 127.0.0.1:7000 --servers 3 --replicas 2
///   tessera server --listen 127.0.0.1:7071 --node-id 1 --coordinator 127.0.0.1:7000 --tables t.toml
///   (and likewise node ids 2 and 3; every server needs the same --tables and --shards)
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
    /// Every server of the cluster, this one included, in the same order on each server.
    #[arg(long, conflicts_with_all = ["coordinator", "etcd"])]
    cluster: Option<String>,
    /// Join the replicated cluster this coordinator keeps (see `tessera coordinator`).
    #[arg(long, requires = "node_id")]
    coordinator: Option<String>,
    /// Or join the replicated cluster kept in etcd (see `tessera coordinator --etcd`).
    #[command(flatten)]
    etcd: EtcdArgs,
    /// This server's id in a replicated cluster: distinct per server, the same across its
    /// restarts.
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
    if let Some(list) = &args.cluster {
        let cluster = addresses(list);
        let Some(index) = cluster.iter().position(|a| *a == args.listen) else {
            bail!("--listen {} is not in --cluster {list}; list every server, this one included", args.listen);
        };
        cfg.servers = cluster.len() as u32;
        cfg.server_index = index as u32;
    }
    if let Some(coordinator) = args.etcd.locator(args.coordinator.as_deref())? {
        let Some(node) = args.node_id else { bail!("a replicated server needs --node-id N (distinct per server, the same across its restarts)") };
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
