//! `tessera bench --disk DIR`: what durability costs, against baselines on the same disk in the
//! same run.
//!
//! - **WAL group commit.** An embedded server in `wal` mode; W workers (threads, each its own
//!   client) push 64 bytes at a time, each waiting for its acknowledgement. Reported: pushes
//!   acknowledged per second, and fsyncs per acknowledged push (the server's log commits over the
//!   pushes). The baseline is a loop of 4 KiB `pwrite` + `fdatasync` on a file in DIR: one fsync
//!   per push, as a log without group commit would do.
//! - **Checkpoint throughput.** A dense table of `--checkpoint-mib` whose every chunk is dirty,
//!   checkpointed once (`tessera checkpoint now`, timed by the client), against `fio` writing as
//!   many bytes sequentially with O_DIRECT, 1 MiB blocks (the checkpoint buffer), one job per
//!   shard at queue depth 1 (each shard's checkpoint has one write in flight, and the shards
//!   write theirs at once), and an fsync at the end, as a checkpoint has.
//! - **Pushes during the checkpoint.** One more worker pushes 64 bytes at random places in the
//!   same table, waiting for each acknowledgement, for a second before the checkpoint and then
//!   until it ends: the latency of its pushes in both phases, the second phase's pushes landing
//!   in chunks the checkpoint has yet to write.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use tessera_client::{Client, ClientConfig};
use tessera_engine::config::{Durability, CHECKPOINT_BUFFER_BYTES};
use tessera_engine::{Server, UpdaterRegistry};
use tessera_layout::{TableKind, TableSpec};

use crate::common::{EngineArgs, TransportArgs};

/// Values per push: 64 bytes.
const PUSH_VALUES: usize = 16;

/// What the disk benchmarks print with `--json`.
#[derive(Debug, serde::Serialize)]
struct DiskReport {
    fsync_loop_per_s: f64,
    group_commit: Vec<GroupCommit>,
    checkpoint: Option<CheckpointRun>,
}

#[derive(Debug, serde::Serialize)]
struct GroupCommit {
    workers: usize,
    pushes_per_s: f64,
    fsyncs_per_push: f64,
    /// Pushes per second over the fsync loop's fsyncs per second.
    over_fsync_loop: f64,
}

#[derive(Debug, serde::Serialize)]
struct CheckpointRun {
    bytes: u64,
    seconds: f64,
    mib_per_s: f64,
    /// fio's jobs: one per shard.
    fio_jobs: usize,
    fio_mib_per_s: Option<f64>,
    ratio: Option<f64>,
    /// Chunks pushes changed while it was written, copied aside first.
    chunks_copied: u64,
    pushes_before: PushLatency,
    pushes_during: PushLatency,
}

/// Acknowledged pushes of one worker in one phase: how many, and their latency in microseconds.
#[derive(Debug, Default, serde::Serialize)]
struct PushLatency {
    pushes: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

impl PushLatency {
    fn of(h: &Histogram<u64>) -> Self {
        let q = |q| h.value_at_quantile(q) / 1000;
        PushLatency { pushes: h.len(), p50_us: q(0.5), p99_us: q(0.99), max_us: h.max() / 1000 }
    }
}

impl std::fmt::Display for PushLatency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} pushes, p50 {} us, p99 {} us, max {} us", self.pushes, self.p50_us, self.p99_us, self.max_us)
    }
}

pub struct DiskBench<'a> {
    pub dir: &'a Path,
    pub workers: &'a [usize],
    pub seconds: f64,
    pub checkpoint_mib: u64,
    pub json: bool,
    pub engine: &'a EngineArgs,
    pub net: &'a TransportArgs,
}

impl DiskBench<'_> {
    pub fn run(&self) -> Result<()> {
        std::fs::create_dir_all(self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let budget = Duration::from_secs_f64(self.seconds);
        let fsyncs = fsync_loop(self.dir, budget)?;
        let mut report = DiskReport { fsync_loop_per_s: fsyncs, group_commit: Vec::new(), checkpoint: None };
        if !self.json {
            println!("disk under {}: 4 KiB pwrite + fdatasync loop: {fsyncs:.0} fsyncs/s", self.dir.display());
            println!("{:>8} {:>14} {:>16} {:>18}", "workers", "acked pushes/s", "fsyncs per push", "over fsync loop");
        }
        for &w in self.workers {
            let run = self.group_commit(w, budget, fsyncs)?;
            if !self.json {
                println!("{:>8} {:>14.0} {:>16.3} {:>18.2}", run.workers, run.pushes_per_s, run.fsyncs_per_push, run.over_fsync_loop);
            }
            report.group_commit.push(run);
        }
        if self.checkpoint_mib > 0 {
            let run = self.checkpoint()?;
            if !self.json {
                let fio = run.fio_mib_per_s.map_or("fio not found (apt install fio)".into(), |f| format!("fio {f:.1} MiB/s"));
                let ratio = run.ratio.map_or(String::new(), |r| format!(", ratio {r:.2} (target >= 0.8)"));
                println!(
                    "checkpoint of {} MiB: {:.2} s, {:.1} MiB/s; {fio} ({} job(s) at queue depth 1){ratio}",
                    run.bytes >> 20,
                    run.seconds,
                    run.mib_per_s,
                    run.fio_jobs,
                );
                println!("  a worker's pushes in the second before: {}", run.pushes_before);
                println!("  and while it was written:               {} ({} chunks copied aside)", run.pushes_during, run.chunks_copied);
            }
            report.checkpoint = Some(run);
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Ok(())
    }

    fn server(&self, sub: &str, durability: Durability, tables: Vec<TableSpec>) -> Result<Server> {
        let dir = self.dir.join(sub);
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = self.engine.server_config("127.0.0.1:0", tables, false, self.net);
        cfg.engine.durability = durability;
        cfg.engine.data_dir = Some(dir);
        cfg.engine.checkpoint_interval_s = 0;
        // Every worker of the largest run gets its own clock.
        cfg.engine.workers_max = cfg.engine.workers_max.max(self.workers.iter().copied().max().unwrap_or(1) as u32);
        Ok(Server::start(cfg, UpdaterRegistry::new())?)
    }

    fn group_commit(&self, workers: usize, budget: Duration, fsync_loop: f64) -> Result<GroupCommit> {
        // Each worker's keys lie in one shard's part: one push is one request, one log record.
        let shards = self.engine.shards.unwrap_or_else(|| tessera_engine::config::available_cores() as u16) as usize;
        let keys = (workers.next_multiple_of(shards) * PUSH_VALUES) as u64;
        let spec = TableSpec::new("wal", TableKind::Dense, 0, keys, 1);
        let server = self.server(&format!("wal-{workers}"), Durability::Wal, vec![spec])?;
        let addr = server.local_addr().to_string();
        let commits = |c: &Client| -> Result<u64> {
            let status = c.status()?;
            Ok(status[0]["shards"].as_array().into_iter().flatten().map(|s| s["disk"]["wal_commits"].as_u64().unwrap_or(0)).sum())
        };
        let clients: Vec<Client> = (0..workers)
            .map(|w| Client::connect(&[&addr], ClientConfig { kind: self.net.transport, ..self.net.client(w as u32) }))
            .collect::<Result<_, _>>()?;
        let before = commits(&clients[0])?;
        let (stop, pushes, failed) = (AtomicBool::new(false), AtomicU64::new(0), AtomicBool::new(false));
        let started = Instant::now();
        std::thread::scope(|s| {
            for (w, c) in clients.iter().enumerate() {
                let (stop, pushes, failed) = (&stop, &pushes, &failed);
                s.spawn(move || {
                    let table = c.table("wal").expect("the table");
                    let values = [1f32; PUSH_VALUES];
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(e) = c.push_range(&table, (w * PUSH_VALUES) as u64, &values).and_then(|t| t.wait()) {
                            eprintln!("worker {w}: {e}");
                            failed.store(true, Ordering::Relaxed);
                            return;
                        }
                        pushes.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            std::thread::sleep(budget);
            stop.store(true, Ordering::Relaxed);
        });
        let elapsed = started.elapsed().as_secs_f64();
        if failed.load(Ordering::Relaxed) {
            bail!("a push failed during the group-commit run at {workers} workers");
        }
        let n = pushes.load(Ordering::Relaxed);
        let fsyncs = commits(&clients[0])? - before;
        let pushes_per_s = n as f64 / elapsed;
        Ok(GroupCommit { workers, pushes_per_s, fsyncs_per_push: fsyncs as f64 / n.max(1) as f64, over_fsync_loop: pushes_per_s / fsync_loop })
    }

    fn checkpoint(&self) -> Result<CheckpointRun> {
        let keys = (self.checkpoint_mib << 20) / 4;
        let spec = TableSpec::new("ckpt", TableKind::Dense, 0, keys, 1);
        let server = self.server("ckpt", Durability::Checkpoint, vec![spec])?;
        let addr = server.local_addr().to_string();
        let client = Client::connect(&[&addr], self.net.client(0))?;
        let pusher = Client::connect(&[&addr], ClientConfig { kind: self.net.transport, ..self.net.client(1) })?;
        // 0: before the checkpoint, 1: during it, 2: stop.
        let phase = AtomicU64::new(0);
        let (written, seconds, hists) = std::thread::scope(|s| -> Result<_> {
            let phase = &phase;
            let pushing = s.spawn(move || -> Result<[Histogram<u64>; 2]> {
                let table = pusher.table("ckpt")?;
                let mut hists = [Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?];
                let mut rng = 0x9e37_79b9_7f4a_7c15u64;
                let values = [1f32; PUSH_VALUES];
                loop {
                    let p = phase.load(Ordering::Acquire);
                    if p >= 2 {
                        return Ok(hists);
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let at = rng % (keys - PUSH_VALUES as u64);
                    let started = Instant::now();
                    pusher.push_range(&table, at, &values)?.wait()?;
                    hists[p as usize].record(started.elapsed().as_nanos() as u64)?;
                }
            });
            std::thread::sleep(Duration::from_secs(1));
            phase.store(1, Ordering::Release);
            let started = Instant::now();
            let written = client.checkpoint();
            let seconds = started.elapsed().as_secs_f64();
            phase.store(2, Ordering::Release);
            let hists = pushing.join().expect("the pushing worker does not panic");
            Ok((written?, seconds, hists?))
        })?;
        let shards = written[0].1.as_array().into_iter().flatten();
        let (mut bytes, mut chunks_copied, mut fio_jobs) = (0, 0, 0);
        for w in shards {
            bytes += w["bytes"].as_u64().unwrap_or(0);
            chunks_copied += w["chunks_copied"].as_u64().unwrap_or(0);
            fio_jobs += 1;
        }
        drop(client);
        server.shutdown();
        let mib_per_s = bytes as f64 / seconds / (1 << 20) as f64;
        let fio_jobs = fio_jobs.max(1);
        let fio = fio_write(self.dir, bytes, fio_jobs)?;
        Ok(CheckpointRun {
            bytes,
            seconds,
            mib_per_s,
            fio_jobs,
            fio_mib_per_s: fio,
            ratio: fio.map(|f| mib_per_s / f),
            chunks_copied,
            pushes_before: PushLatency::of(&hists[0]),
            pushes_during: PushLatency::of(&hists[1]),
        })
    }
}

/// 4 KiB writes at successive offsets, each followed by fdatasync, for `budget`: fsyncs per second.
fn fsync_loop(dir: &Path, budget: Duration) -> Result<f64> {
    let path = dir.join("fsync-loop.dat");
    let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
    let page = [0x5au8; 4096];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < budget {
        file.write_all_at(&page, n * 4096)?;
        file.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}

/// fio writing `bytes` sequentially in `jobs` files in `dir` at once, as the shards' checkpoints
/// do; MiB/s over all jobs, or `None` without fio.
fn fio_write(dir: &Path, bytes: u64, jobs: usize) -> Result<Option<f64>> {
    let out = Command::new("fio")
        .args(["--name=checkpoint-baseline", "--rw=write", "--direct=1", "--ioengine=io_uring", "--iodepth=1", "--end_fsync=1"])
        .args(["--group_reporting", &format!("--numjobs={jobs}")])
        .arg(format!("--bs={CHECKPOINT_BUFFER_BYTES}"))
        .arg(format!("--size={}", (bytes / jobs as u64).next_multiple_of(CHECKPOINT_BUFFER_BYTES as u64)))
        .arg(format!("--directory={}", dir.display()))
        .arg("--output-format=json")
        .output();
    for job in 0..jobs {
        let _ = std::fs::remove_file(dir.join(format!("checkpoint-baseline.{job}.0")));
    }
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("running fio"),
    };
    if !out.status.success() {
        std::io::stderr().write_all(&out.stderr)?;
        bail!("fio failed ({})", out.status);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON output")?;
    let bw = v["jobs"][0]["write"]["bw_bytes"].as_f64().context("fio's JSON has no write bandwidth")?;
    Ok(Some(bw / (1 << 20) as f64))
}
