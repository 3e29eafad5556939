//! `tessera checkpoint`: take one now, or check and show a data directory.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use tessera_engine::persist::examine::{self, ShardDir};

use crate::common::{addresses, ask_each, SecretArgs};

/// Take a checkpoint on running servers, or verify and inspect a data directory offline.
///
///   tessera checkpoint now --connect 127.0.0.1:7070
///   tessera checkpoint verify /var/lib/tessera      # exit status 1 if anything is corrupt
///   tessera checkpoint inspect /var/lib/tessera
///
/// DIR is a server's --data-dir (with its shard-NNN directories) or one shard's directory.
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Have running servers checkpoint every shard now (they must run with --durability
    /// checkpoint or wal).
    Now {
        /// Servers, comma-separated.
        #[arg(long, default_value = "127.0.0.1:7070")]
        connect: String,
        #[command(flatten)]
        secret: SecretArgs,
    },
    /// Check every checkpoint (manifest and chunk checksums) and every log record; print each
    /// problem, and exit with status 1 if there is any.
    Verify {
        dir: PathBuf,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show each shard's checkpoints (tables, ranges, clocks, sizes) and logs.
    Inspect {
        dir: PathBuf,
        /// Print everything as JSON, manifests included.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: CheckpointArgs) -> Result<()> {
    match args.what {
        What::Now { connect, secret } => now(&connect, &secret),
        What::Verify { dir, json } => {
            let shards = examine_all(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&shards)?);
            } else {
                shards.iter().for_each(print_verify);
            }
            let bad = shards.iter().filter(|s| !s.ok()).count();
            if bad > 0 {
                bail!("{bad} of {} shard directories have problems (see above)", shards.len());
            }
            if !json {
                println!("ok: {} shard directories, every checkpoint and log record checks out", shards.len());
            }
            Ok(())
        }
        What::Inspect { dir, json } => {
            let shards = examine_all(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&shards)?);
            } else {
                shards.iter().for_each(print_inspect);
            }
            Ok(())
        }
    }
}

fn now(connect: &str, secret: &SecretArgs) -> Result<()> {
    for (addr, shards) in ask_each(&addresses(connect), secret, "a checkpoint", |client| client.checkpoint())? {
        for (shard, w) in shards.as_array().into_iter().flatten().enumerate() {
            println!(
                "{addr} shard {shard}: checkpoint {} written: {} chunks ({} bytes) rewritten, {} unchanged",
                w["seq"], w["chunks_written"], w["bytes"], w["chunks_kept"]
            );
        }
    }
    Ok(())
}

fn examine_all(dir: &std::path::Path) -> Result<Vec<ShardDir>> {
    Ok(examine::examine_data_dir(dir)?)
}

fn print_verify(s: &ShardDir) {
    println!("{}:", s.dir.display());
    for c in &s.checkpoints {
        if c.problems.is_empty() {
            println!("  checkpoint {}: ok ({} chunks, {} bytes)", c.seq, c.chunks, c.chunk_bytes);
        } else {
            println!("  checkpoint {}: CORRUPT; recovery falls back to the one before", c.seq);
            c.problems.iter().for_each(|p| println!("    {p}"));
        }
    }
    for l in &s.logs {
        let state = if l.clean { "ok" } else { "STOPS EARLY" };
        println!("  log {}: {state}: {} records from LSN {}, {}", l.file, l.records, l.first_lsn.map_or("-".into(), |n| n.to_string()), l.end);
        if !l.clean && l.later_commit.is_none() {
            println!("    recovery replays the {} records before that point and no further (a commit the crash cut short)", l.records);
        }
    }
    s.orphans.iter().for_each(|o| println!("  {o}: named by no checkpoint (an interrupted one); unused"));
    for p in &s.problems {
        println!("  INCONSISTENT: {p}");
    }
    if !s.problems.is_empty() {
        println!("    a server refuses to start on this directory (unless started with --accept-data-loss)");
    }
}

fn print_inspect(s: &ShardDir) {
    println!("{}:", s.dir.display());
    for c in &s.checkpoints {
        let Some(m) = &c.manifest else {
            println!("  checkpoint {}: unreadable: {}", c.seq, c.problems.join("; "));
            continue;
        };
        println!("  checkpoint {} (shard {}), exact at log record {}, followed by {}:", m.seq, m.shard, m.lsn, m.wal);
        for t in &m.tables {
            let (low, high) = examine::clock_bounds(t);
            let bytes: u64 = t.chunks.iter().map(|c| u64::from(c.len)).sum();
            println!(
                "    table {} {:?} ({:?}, dim {}, {}): keys [{}, {}), {} chunks, {bytes} bytes, step {}, {} clock segments, clocks low {low:?} high {high:?}",
                t.table,
                t.spec.name,
                t.spec.kind,
                t.spec.dim,
                t.spec.updater,
                t.owned.0,
                t.owned.1,
                t.chunks.len(),
                t.step,
                t.clocks.len()
            );
        }
    }
    for l in &s.logs {
        println!("  log {}: {} bytes, {} records from LSN {}, {}", l.file, l.bytes, l.records, l.first_lsn.map_or("-".into(), |n| n.to_string()), l.end);
    }
}
