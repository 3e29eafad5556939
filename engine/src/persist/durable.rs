//! One shard's durability, driven from the shard's own loop: its write-ahead log with group
//! commit, its checkpoints, and its recovery at start-up.
//!
//! A shard's directory (`DATA_DIR/shard-NNN/`) holds:
//! - `MANIFEST-NNNNNNNN` and `data-NNNNNNNN.ckpt`: checkpoints ([`checkpoint`](crate::persist::checkpoint));
//! - `wal-NNNNNNNN.log`: the log that follows checkpoint NNNNNNNN (`wal-00000000.log` follows the
//!   empty start). Its first record's LSN is that checkpoint's `lsn + 1`.
//!
//! **Group commit.** A push is applied, then its record is appended to the filling one of two
//! log buffers, and its reply is held ([`Reply::hold_until`](tessera_transport::Reply)). While
//! the other buffer's commit (a linked write and fsync on the shard's ring) is in flight, every
//! push that arrives joins the filling buffer; when the commit completes, the shard releases the
//! replies it covered and sends the filled buffer as the next commit. So there is at most one
//! fsync in flight per shard, and as many pushes per fsync as arrived during the previous one.
//!
//! **Checkpoints** are written a little at a time from the shard's loop, and pushes go on
//! meanwhile. Each is exact at one log position: when it starts, the log is made durable up to
//! the last record (the shard waits for at most two log commits), a new log file starts after
//! that record, and each part's changed chunks are snapshotted (copy on write,
//! [`store::Taking`]). Then the chunks are written, one buffer at a time, and when they are on
//! disk the manifest is committed (the shard waits for that: a write, two fsyncs and a rename).
//! The previous checkpoint and its log stay (a fallback if the newest turns out corrupt);
//! anything older is deleted. A checkpoint that fails leaves its log in place (recovery replays
//! it after the previous checkpoint's) and the next one takes a new number.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::{Durability, EngineConfig, CHECKPOINT_BUFFER_BYTES, IO_ALIGN_BYTES};
use crate::error::{EngineError, Result};
use crate::persist::checkpoint::store::{self, Parts, Taking, Written};
use crate::persist::checkpoint::{Manifest, PartManifest, RangeHeld};
use crate::persist::disk::{sync_dir, BufId, Disk, DiskConfig, Done, FileId, Op};
use crate::persist::wal::{acknowledged_after, Batch, Reader, Record, Stop, Target};
use crate::tables::Tables;

/// Submission-queue entries of a shard's ring: a log commit and a checkpoint's chains.
const RING_ENTRIES: u32 = 64;
/// Files a shard keeps open at once: the log, a checkpoint's data file, and one being read.
const FILES_MAX: u32 = 8;
/// The completion tokens of log commits and of checkpoint writes.
const WAL_TOKEN: u64 = 1;
const CHECKPOINT_TOKEN: u64 = 2;

/// What recovery found and did, for the log and `tessera status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RecoveryReport {
    pub shard: u16,
    /// The checkpoint loaded, and the log position it is exact at.
    pub checkpoint: Option<u64>,
    pub checkpoint_lsn: u64,
    /// Checkpoints passed over, newest first, with the reason.
    pub fallbacks: Vec<String>,
    pub records_replayed: u64,
    /// Where and why the log replay stopped.
    pub log_end: String,
    /// The LSN the next record gets.
    pub next_lsn: u64,
    /// Per table part: (table, owned range, the part's stamp: minimum clock per worker).
    pub tables: Vec<(u32, (u64, u64), Vec<u64>)>,
}

/// Counters of a shard's disk.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DiskStats {
    pub wal_commits: u64,
    pub wal_records: u64,
    pub wal_bytes: u64,
    pub checkpoints: u64,
    pub checkpoint_bytes: u64,
}

/// A shard's log: where it appends, what is in flight, what is durable.
#[derive(Debug)]
struct Wal {
    file: FileId,
    bufs: [BufId; 2],
    /// The buffer records are appended to; the other one may be in flight.
    filling: usize,
    batch: Batch,
    /// Where the next commit is written.
    offset: u64,
    next_lsn: u64,
    /// The commit in flight: its last LSN and its length.
    in_flight: Option<(u64, u64)>,
    /// When the commit in flight was submitted.
    commit_started: Instant,
    durable: u64,
}

/// One shard's disk: the ring, the log, the checkpoint state.
#[derive(Debug)]
pub struct ShardDisk {
    disk: Disk,
    dir: PathBuf,
    shard: u16,
    level: Durability,
    wal: Option<Wal>,
    /// Two buffers: a checkpoint copies chunks into one while the other is written.
    checkpoint_bufs: [BufId; 2],
    /// The number the next checkpoint takes: past every file in the directory.
    next_seq: u64,
    /// The checkpoint being written.
    taking: Option<Taking>,
    /// The newest checkpoint, loaded or written, and its manifest.
    prev: Option<Manifest>,
    last_checkpoint: Instant,
    interval: Option<Duration>,
    done: Vec<Done>,
    /// Why the log cannot be written any more; pushes are refused from then on, and replies
    /// held for records past `durable` go out as errors ([`failure`](Self::failure)).
    failure: Option<String>,
    /// Why a write of the running checkpoint failed.
    checkpoint_failed: Option<EngineError>,
    pub stats: DiskStats,
    /// Log commit latency (write and fsync), for the metrics.
    fsync_seconds: metrics::Histogram,
    /// Recover past damage to acknowledged data instead of refusing to start.
    accept_loss: bool,
}

impl ShardDisk {
    /// The disk of shard `shard`, or `None` when the engine keeps nothing on disk. Creates the
    /// shard's directory; the log opens in [`recover`](Self::recover).
    pub fn open(shard: u16, cfg: &EngineConfig) -> Result<Option<Box<ShardDisk>>> {
        let Some(root) = cfg.data_dir.as_ref().filter(|_| cfg.durability != Durability::None) else {
            return Ok(None);
        };
        let dir = root.join(format!("shard-{shard:03}"));
        std::fs::create_dir_all(&dir).map_err(|e| EngineError::Disk { op: "mkdir", path: dir.display().to_string(), reason: e.to_string() })?;
        let mut buffer_bytes = vec![CHECKPOINT_BUFFER_BYTES; 2];
        if cfg.durability == Durability::Wal {
            buffer_bytes.extend([cfg.wal_buffer_bytes; 2]);
        }
        let disk = Disk::open(&DiskConfig { ring_entries: RING_ENTRIES, files_max: FILES_MAX, buffer_bytes, force_blocking: cfg.disk_force_blocking })?;
        let interval = (cfg.checkpoint_interval_s > 0).then(|| Duration::from_secs(cfg.checkpoint_interval_s));
        Ok(Some(Box::new(ShardDisk {
            disk,
            dir,
            shard,
            level: cfg.durability,
            wal: None,
            checkpoint_bufs: [BufId(0), BufId(1)],
            next_seq: 1,
            taking: None,
            prev: None,
            last_checkpoint: Instant::now(),
            interval,
            done: Vec::with_capacity(4),
            failure: None,
            checkpoint_failed: None,
            stats: DiskStats::default(),
            fsync_seconds: crate::metrics::wal_fsync(shard),
            accept_loss: cfg.recovery_accept_loss,
        })))
    }

    /// The descriptor to sleep on for log commits (`None`: commits complete at submission).
    pub fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.disk.event_fd()
    }

    /// True when pushes are logged and their replies held until durable (also once the log has
    /// failed: pushes are then refused, never served unlogged).
    pub fn logs(&self) -> bool {
        self.level == Durability::Wal
    }

    /// True when the shard's loop should not sleep: a checkpoint is being written and its next
    /// step does not wait for a completion the loop could sleep on.
    pub fn busy(&self) -> bool {
        self.taking.is_some() && self.disk.event_fd().is_none()
    }

    /// Bytes of each log buffer: no record may be larger.
    pub fn log_buffer_bytes(&self) -> usize {
        self.wal.as_ref().map_or(0, |w| self.disk.buf(w.bufs[0]).len())
    }

    /// Every record up to this LSN is on disk.
    pub fn durable(&self) -> u64 {
        self.wal.as_ref().map_or(u64::MAX, |w| w.durable)
    }

    /// Why the log failed, if it did: records past [`durable`](Self::durable) never will be.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Makes room in the log for a record of `bytes`, before the push is applied: a push that
    /// cannot be logged is refused, not applied. Waits for the commit in flight when the
    /// filling buffer is full.
    pub fn reserve(&mut self, bytes: usize) -> Result<()> {
        if let Some(reason) = &self.failure {
            return Err(EngineError::LogFailed { reason: reason.clone() });
        }
        let Some(wal) = self.wal.as_mut() else {
            return match self.level {
                Durability::Wal => Err(EngineError::Io("the write-ahead log is not open".into())),
                _ => Ok(()),
            };
        };
        let room = self.disk.buf(wal.bufs[0]).len();
        if bytes > room {
            return Err(EngineError::BadRequest {
                reason: format!("this push's log record takes {bytes} bytes, over the log buffer of {room} (raise --wal-buffer-bytes, or push less at once)"),
            });
        }
        if wal.batch.len() + bytes > room {
            self.wait_commit()?;
            self.start_commit()?;
        }
        Ok(())
    }

    /// Appends `record` (room was reserved) and returns its LSN.
    pub fn append(&mut self, mut record: Record<'_>) -> u64 {
        let wal = self.wal.as_mut().expect("append only when logging");
        record.lsn = wal.next_lsn;
        let buf = self.disk.buf_mut(wal.bufs[wal.filling]).expect("the filling buffer is never in flight");
        wal.batch.append(buf, &record).expect("room was reserved");
        wal.next_lsn += 1;
        record.lsn
    }

    /// Takes finished commits and starts the next one. Never blocks.
    pub fn pump(&mut self) {
        self.disk.clear_event();
        self.done.clear();
        if let Err(e) = self.disk.poll(&mut self.done) {
            self.fail(e);
            return;
        }
        self.take_done();
        // After a failed commit nothing more is written: a later commit would make records
        // durable past the ones lost, and acknowledge pushes behind a hole in the log.
        if self.failure.is_none() && self.wal.as_ref().is_some_and(|w| w.in_flight.is_none() && !w.batch.is_empty()) {
            if let Err(e) = self.start_commit() {
                self.fail(e);
            }
        }
    }

    /// Hands the log commits in `done` to [`commit_done`](Self::commit_done), and a
    /// checkpoint's writes to it.
    fn take_done(&mut self) {
        for i in 0..self.done.len() {
            let result = std::mem::replace(&mut self.done[i].result, Ok(()));
            match self.done[i].token {
                WAL_TOKEN => self.commit_done(result),
                CHECKPOINT_TOKEN => {
                    let taking = self.taking.as_mut().expect("a checkpoint write completed");
                    match taking.complete(result) {
                        Ok(()) => crate::crash::point("checkpoint.chunks_written"),
                        Err(e) => self.checkpoint_failed = Some(e),
                    }
                }
                _ => unreachable!("only the log and checkpoints use the ring"),
            }
        }
    }

    /// True when a checkpoint is due.
    pub fn checkpoint_due(&self) -> bool {
        self.interval.is_some_and(|i| self.last_checkpoint.elapsed() >= i)
    }

    fn fail(&mut self, e: EngineError) {
        if self.failure.is_some() {
            return;
        }
        let durable = self.durable();
        tracing::error!(
            shard = self.shard,
            error = %e,
            durable,
            "the write-ahead log failed: pushes are refused from now on and pulls are served from memory; \
             pushes applied after log record {durable} are answered with an error. Free the disk and restart the server"
        );
        self.failure = Some(format!("the server's write-ahead log failed before its record was on disk: {e}"));
    }

    fn commit_done(&mut self, result: Result<()>) {
        let wal = self.wal.as_mut().expect("a log commit completed");
        let (last, len) = wal.in_flight.take().expect("a commit was in flight");
        match result {
            Ok(()) => {
                self.fsync_seconds.record(wal.commit_started.elapsed());
                wal.durable = last;
                wal.offset += len;
                self.stats.wal_commits += 1;
                self.stats.wal_bytes += len;
            }
            Err(e) => self.fail(e),
        }
    }

    /// Seals the filling buffer and sends it: its write, then an fsync, linked.
    fn start_commit(&mut self) -> Result<()> {
        let wal = self.wal.as_mut().expect("logging");
        debug_assert!(wal.in_flight.is_none());
        let buf = wal.bufs[wal.filling];
        let len = wal.batch.seal(self.disk.buf_mut(buf).expect("the filling buffer is never in flight"));
        let ops = [Op::Write { file: wal.file, buf, span: 0..len, offset: wal.offset }, Op::Sync { file: wal.file }];
        self.disk.submit(&ops, WAL_TOKEN)?;
        self.stats.wal_records += wal.batch.records();
        wal.in_flight = Some((wal.next_lsn - 1, len as u64));
        wal.commit_started = Instant::now();
        wal.filling ^= 1;
        wal.batch.clear();
        Ok(())
    }

    /// Blocks until no commit is in flight.
    fn wait_commit(&mut self) -> Result<()> {
        while self.wal.as_ref().is_some_and(|w| w.in_flight.is_some()) {
            self.done.clear();
            self.disk.wait(&mut self.done)?;
            self.take_done();
        }
        match &self.failure {
            Some(reason) => Err(EngineError::LogFailed { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// Makes every appended record durable, blocking.
    fn flush_log(&mut self) -> Result<()> {
        self.wait_commit()?;
        if self.wal.as_ref().is_some_and(|w| !w.batch.is_empty()) {
            self.start_commit()?;
            self.wait_commit()?;
        }
        Ok(())
    }

    /// True while a checkpoint is being written.
    pub fn checkpointing(&self) -> bool {
        self.taking.is_some()
    }

    /// Starts a checkpoint of `parts`, exact at the last appended record, and a new log after
    /// it; [`advance_checkpoint`](Self::advance_checkpoint) writes it. Waits for at most two
    /// log commits. Returns the checkpoint's number.
    /// A replicated shard passes its replica's ranges as they are now (`replica`; its open
    /// batches closed first): the manifest records them, exact at the same LSN as the chunks.
    pub fn begin_checkpoint(&mut self, parts: &mut dyn Parts, replica: Vec<RangeHeld>) -> Result<u64> {
        assert!(self.taking.is_none(), "one checkpoint at a time");
        // A failed checkpoint is tried again an interval later, not at once.
        self.last_checkpoint = Instant::now();
        self.flush_log()?;
        let lsn = self.wal.as_ref().map_or(0, |w| w.next_lsn - 1);
        // The number is used up even if this checkpoint fails: its log may hold records.
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(wal) = self.wal.take() {
            self.disk.close_file(wal.file)?;
            if let Err(e) = self.open_log(seq, lsn + 1, 0, true) {
                self.fail(e.clone());
                return Err(e);
            }
            crate::crash::point("checkpoint.log_started");
        }
        let (bufs, token) = (self.checkpoint_bufs, CHECKPOINT_TOKEN);
        let mut taking = Taking::begin(&mut self.disk, bufs, token, &self.dir, (seq, lsn, &wal_file_name(seq)), self.shard, parts, self.prev.as_ref())?;
        taking.replica = replica;
        self.taking = Some(taking);
        Ok(seq)
    }

    /// Writes more of the running checkpoint, without waiting for the disk, and commits it when
    /// its chunks are on disk (waiting for that). `Some` once it has ended, written or failed.
    pub fn advance_checkpoint(&mut self, parts: &mut dyn Parts) -> Option<Result<Written>> {
        let taking = self.taking.as_mut()?;
        let step = match self.checkpoint_failed.take() {
            Some(e) => Err(e),
            None => taking.advance(&mut self.disk, parts),
        };
        match step {
            Ok(false) => None,
            Ok(true) => Some(self.commit_checkpoint(parts)),
            Err(e) => {
                self.abandon_checkpoint(parts);
                Some(Err(e))
            }
        }
    }

    fn commit_checkpoint(&mut self, parts: &mut dyn Parts) -> Result<Written> {
        // The manifest's chain waits alone on the ring.
        if let Err(e) = self.wait_commit() {
            self.abandon_checkpoint(parts);
            return Err(e);
        }
        let taking = self.taking.take().expect("a checkpoint is running");
        let (manifest, written) = taking.commit(&mut self.disk, &self.dir, parts)?;
        let older = self.prev.replace(manifest);
        self.stats.checkpoints += 1;
        self.stats.checkpoint_bytes += written.bytes;
        crate::crash::point("checkpoint.committed");
        self.prune(older.as_ref());
        crate::crash::point("checkpoint.pruned");
        Ok(written)
    }

    /// Gives up the running checkpoint, once its write in flight is over.
    pub fn abandon_checkpoint(&mut self, parts: &mut dyn Parts) {
        while self.taking.as_ref().is_some_and(Taking::in_flight) {
            self.done.clear();
            if let Err(e) = self.disk.wait(&mut self.done) {
                self.fail(e);
                break;
            }
            self.take_done();
        }
        self.checkpoint_failed = None;
        if let Some(taking) = self.taking.take() {
            taking.abandon(&mut self.disk, parts);
        }
    }

    /// Deletes checkpoints and logs older than the previous checkpoint, and data files that
    /// neither kept manifest names. `older` is the manifest before the newest.
    fn prune(&self, older: Option<&Manifest>) {
        // With no older checkpoint, the fallback is the empty start and the first log.
        let keep_from = older.map_or(0, |m| m.seq);
        let mut referenced = BTreeSet::new();
        for m in older.into_iter().chain(self.prev.as_ref()) {
            referenced.extend(m.tables.iter().flat_map(|t| t.chunks.iter().map(|c| c.file)));
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = if let Some(seq) = Manifest::seq_of(name) {
                seq < keep_from
            } else if let Some(seq) = wal_seq_of(name) {
                seq < keep_from
            } else if let Some(seq) = data_seq_of(name) {
                seq < keep_from && !referenced.contains(&seq)
            } else {
                false
            };
            if stale {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(shard = self.shard, file = name, error = %e, "cannot delete an old checkpoint file");
                }
            }
        }
    }

    /// Opens log `seq` for appending at `offset`, its next record `next_lsn`; `fresh` truncates it.
    fn open_log(&mut self, seq: u64, next_lsn: u64, offset: u64, fresh: bool) -> Result<()> {
        if self.level != Durability::Wal {
            return Ok(());
        }
        let path = self.dir.join(wal_file_name(seq));
        // Anything past `offset` is a torn or unacknowledged tail: cut it off, so a later record
        // can never be read after records written over its start.
        let cut = std::fs::OpenOptions::new().create(true).truncate(fresh).write(true).open(&path).and_then(|f| {
            f.set_len(offset)?;
            f.sync_all()
        });
        cut.map_err(|e| EngineError::Disk { op: "truncate", path: path.display().to_string(), reason: e.to_string() })?;
        sync_dir(&self.dir)?;
        let file = self.disk.open_file(&path, false)?;
        self.wal = Some(Wal {
            file,
            bufs: [BufId(2), BufId(3)],
            filling: 0,
            batch: Batch::default(),
            offset,
            next_lsn,
            in_flight: None,
            commit_started: Instant::now(),
            durable: next_lsn - 1,
        });
        Ok(())
    }

    /// Loads the newest valid checkpoint and replays the logs after it into `tables` (the
    /// catalog's parts, freshly made), then opens the log for appending. `build` makes a fresh
    /// part for a manifest's table, and checks it against the catalog.
    ///
    /// Recovery reads and never rewrites: the one change it makes is to cut a torn tail off the
    /// last log, a commit the crash interrupted, which nobody was told is durable. Anything that
    /// would drop acknowledged data instead (a checkpoint that disagrees with the catalog, a
    /// corrupt checkpoint the logs do not cover, a gap between logs, damage followed by later
    /// commits) is an [`EngineError::Unrecoverable`], unless the server was started to accept
    /// the loss; then what cannot be replayed is set aside under another name, never deleted.
    /// The log holds the shard's replica's records, which `replica` replays.
    pub fn recover(&mut self, tables: &mut Tables, replica: &mut ReplicaReplay<'_>) -> Result<RecoveryReport> {
        let mut report = RecoveryReport { shard: self.shard, ..RecoveryReport::default() };
        let (shard, accept_loss) = (self.shard, self.accept_loss);
        let mut skipped = |seq: u64, e: &EngineError| {
            tracing::warn!(shard, checkpoint = seq, error = %e, "checkpoint cannot be loaded; falling back to the one before");
            report.fallbacks.push(format!("checkpoint {seq}: {e}"));
        };
        let mut build = |m: &PartManifest| tables.part_for_checkpoint(m);
        let found = store::load_newest(&mut self.disk, self.checkpoint_bufs[0], &self.dir, &mut build, &mut skipped, accept_loss)?;
        let (mut seq, mut next_lsn) = (0, 1);
        if let Some((manifest, parts)) = found {
            for part in parts {
                tables.put(part)?;
            }
            (seq, next_lsn) = (manifest.seq, manifest.lsn + 1);
            let what = || Manifest::file_name(manifest.seq);
            replica(tables, ReplicaReplayed::Checkpoint(&manifest.replica))
                .map_err(|e| EngineError::Unrecoverable { what: what(), reason: format!("its replica's ranges do not fit this server ({e})") })?;
            report.checkpoint = Some(manifest.seq);
            report.checkpoint_lsn = manifest.lsn;
            self.prev = Some(manifest);
        }
        if !report.fallbacks.is_empty() && self.level != Durability::Wal {
            // Without a log, nothing else holds what a skipped checkpoint held.
            self.refuse_or_accept(&report.fallbacks[0], "it cannot be read, and without a log (--durability checkpoint) nothing else holds what it held")?;
        }
        crate::crash::point("recovery.checkpoint_loaded");
        let (log_seq, offset) = self.replay_logs(tables, seq, &mut next_lsn, &mut report, replica)?;
        // A checkpoint that failed or was cut short by a crash left a log and a data file:
        // the next checkpoint's number is past every one of them.
        let seqs = [Manifest::seq_of as fn(&str) -> Option<u64>, wal_seq_of, data_seq_of];
        self.next_seq = seqs.iter().flat_map(|f| self.list(*f)).max().unwrap_or(0) + 1;
        report.next_lsn = next_lsn;
        for t in tables.parts() {
            let owned = t.owned();
            let mut stamp = vec![0; t.stamp_len()];
            t.stamp_into(owned.clone(), &mut stamp);
            report.tables.push((t.id, (owned.start, owned.end), stamp));
        }
        self.open_log(log_seq, next_lsn, offset, false)?;
        crate::crash::point("recovery.log_opened");
        self.last_checkpoint = Instant::now();
        Ok(report)
    }

    /// Replays the logs from the one that follows checkpoint `seq`, in order, from LSN
    /// `next_lsn` on; returns the log to append to and the offset to append at, and leaves
    /// `next_lsn` at the LSN the next record takes.
    fn replay_logs(
        &mut self,
        tables: &mut Tables,
        seq: u64,
        next_lsn: &mut u64,
        report: &mut RecoveryReport,
        replica: &mut ReplicaReplay<'_>,
    ) -> Result<(u64, u64)> {
        let mut logs: Vec<u64> = self.list(wal_seq_of).into_iter().filter(|s| *s >= seq).collect();
        logs.sort_unstable();
        if logs.first() != Some(&seq) {
            logs.insert(0, seq);
        }
        let (mut log_seq, mut offset) = (seq, 0);
        report.log_end = "no log".into();
        for (i, s) in logs.iter().enumerate() {
            let path = self.dir.join(wal_file_name(*s));
            if !path.exists() {
                continue;
            }
            let (words, len) = store::read_whole(&mut self.disk, self.checkpoint_bufs[0], &path)?;
            let log = &bytemuck::cast_slice(&words)[..len];
            let mut reader = Reader::new(log, *next_lsn);
            for record in reader.by_ref() {
                let what = || format!("{} record {}", path.display(), record.lsn);
                match record.target {
                    Target::Replica { .. } => replica(tables, ReplicaReplayed::Record(&record)).map_err(|e| EngineError::Unrecoverable {
                        what: what(),
                        reason: format!("it does not apply to the tables the catalog and the checkpoint make ({e}), so they disagree with the log"),
                    })?,
                    Target::Keys(_) | Target::Range { .. } => {
                        return Err(EngineError::BadConfig {
                            field: "data_dir",
                            value: self.dir.display().to_string(),
                            reason: format!(
                                "{} is a raw push, as servers logged before every server ran the chain protocol; this server replays only its chain replicas' records, so it cannot take over this data directory",
                                what()
                            ),
                        })
                    }
                }
                report.records_replayed += 1;
            }
            (*next_lsn, offset, log_seq) = (reader.next_lsn(), reader.resume_offset(), *s);
            let stop = reader.stop().cloned().unwrap_or(Stop::End);
            report.log_end = describe_stop(&wal_file_name(*s), &stop);
            crate::crash::point("recovery.log_replayed");
            if stop == Stop::End {
                continue;
            }
            let later = &logs[i + 1..];
            if let Some(why) = acknowledged_lost(log, &stop, *next_lsn, later.len()) {
                self.refuse_or_accept(&format!("{} ({})", report.log_end, self.dir.display()), &why)?;
                // Accepted: keep the damaged log whole beside the one whose tail is cut.
                let aside = path.with_extension("log.damaged");
                std::fs::copy(&path, &aside).map_err(|e| EngineError::Disk { op: "copy", path: aside.display().to_string(), reason: e.to_string() })?;
            }
            // Records from the stop on are not replayed. Later logs are set aside, so that
            // records appended from here on can never be followed by their stale ones.
            for later in later {
                let path = self.dir.join(wal_file_name(*later));
                let aside = path.with_extension("log.unreplayed");
                tracing::warn!(shard = self.shard, "{}; {} is not replayed and is renamed {}", report.log_end, path.display(), aside.display());
                std::fs::rename(&path, &aside).map_err(|e| EngineError::Disk { op: "rename", path: path.display().to_string(), reason: e.to_string() })?;
            }
            break;
        }
        Ok((log_seq, offset))
    }

    /// Refuses to recover past `what`, for `why`; or, on a server started to accept the loss,
    /// says loudly what is lost and goes on.
    fn refuse_or_accept(&self, what: &str, why: &str) -> Result<()> {
        if !self.accept_loss {
            return Err(EngineError::Unrecoverable { what: what.to_string(), reason: why.to_string() });
        }
        tracing::error!(shard = self.shard, what, why, "recovering past lost data, as --accept-data-loss allows");
        Ok(())
    }

    /// Sequence numbers of the files in the shard's directory that `seq_of` recognises.
    fn list(&self, seq_of: fn(&str) -> Option<u64>) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        entries.flatten().filter_map(|e| e.file_name().to_str().and_then(seq_of)).collect()
    }
}

/// How a log's replay ended, in words.
fn describe_stop(file: &str, stop: &Stop) -> String {
    match stop {
        Stop::End => format!("{file} ended cleanly"),
        Stop::Torn { offset, reason } => format!("{file} torn at byte {offset}: {reason}"),
        Stop::Gap { offset, expected, found } => format!("{file} has LSN {found} at byte {offset} where {expected} was due"),
    }
}

/// Why stopping a log's replay at `stop` (before LSN `due_lsn`, with `later_logs` logs after
/// this one) would drop records that were acknowledged; `None` when the stop is a torn last
/// commit, which nobody was told is durable.
fn acknowledged_lost(log: &[u8], stop: &Stop, due_lsn: u64, later_logs: usize) -> Option<String> {
    match stop {
        Stop::End => None,
        Stop::Gap { expected, found, .. } => {
            Some(format!("records {expected} to {} are missing, and later ones are there", found.saturating_sub(1).max(*expected)))
        }
        Stop::Torn { .. } if later_logs > 0 => {
            Some(format!("{later_logs} later log(s) follow it, and a log is started only once every record before it is durable"))
        }
        Stop::Torn { offset, .. } => acknowledged_after(log, *offset, due_lsn).map(|(at, lsn)| {
            let lost = if lsn - 1 == due_lsn { format!("record {due_lsn} was") } else { format!("records {due_lsn} to {} were", lsn - 1) };
            format!(
                "record {lsn} at byte {at} belongs to a later commit, and a commit is written only once the one before it is durable, so {lost} acknowledged"
            )
        }),
    }
}

/// What a replicated shard's recovery hands its replica: the ranges the checkpoint loaded holds,
/// then each log record after it.
#[derive(Debug)]
pub enum ReplicaReplayed<'a> {
    Checkpoint(&'a [RangeHeld]),
    Record(&'a Record<'a>),
}

/// Replays a replicated shard's checkpoint and records into its tables (see [`ShardDisk::recover`]).
pub type ReplicaReplay<'a> = dyn FnMut(&mut Tables, ReplicaReplayed<'_>) -> Result<()> + 'a;

/// The log that follows checkpoint `seq`.
pub fn wal_file_name(seq: u64) -> String {
    format!("wal-{seq:08}.log")
}

pub fn wal_seq_of(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?.strip_suffix(".log")?.parse().ok()
}

pub fn data_seq_of(name: &str) -> Option<u64> {
    name.strip_prefix("data-")?.strip_suffix(".ckpt")?.parse().ok()
}

const _: () = assert!(IO_ALIGN_BYTES.is_multiple_of(8));
