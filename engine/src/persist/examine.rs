//! Reading a data directory offline, for `tessera checkpoint verify` and `inspect`: every
//! checkpoint's manifest and chunks, and every log's records, checked byte for byte, without
//! building tables (so it needs neither the server's configuration nor its updaters).

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};
use crate::persist::checkpoint::{ChunkHeader, Manifest, PartManifest};
use crate::persist::durable::{data_seq_of, wal_file_name, wal_seq_of};
use crate::persist::wal::{acknowledged_after, Reader, RecordHeader, Stop, Target, RECORD_HEADER_BYTES, WAL_MAGIC};
use zerocopy::FromBytes;

/// One shard directory, examined.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardDir {
    pub dir: PathBuf,
    /// Newest first.
    pub checkpoints: Vec<CheckpointCheck>,
    /// In sequence order.
    pub logs: Vec<LogCheck>,
    /// Data files no manifest names (left by a checkpoint that never committed).
    pub orphans: Vec<String>,
    /// Where the files disagree with each other or with the catalog: each one a reason the
    /// server would refuse to start (or, with `--accept-data-loss`, would lose data).
    pub problems: Vec<String>,
}

/// One checkpoint: what its manifest says, and what was wrong with it, if anything.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointCheck {
    pub seq: u64,
    pub manifest: Option<Manifest>,
    /// Every problem found: the manifest, or chunks that do not read back as named.
    pub problems: Vec<String>,
    pub chunks: u64,
    pub chunk_bytes: u64,
}

/// One log file: its records and how it ends.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogCheck {
    pub file: String,
    pub bytes: u64,
    pub first_lsn: Option<u64>,
    pub records: u64,
    /// How the log ends: cleanly, or where and why the records stop.
    pub end: String,
    /// False when the records stop at a torn or corrupt one, or at a gap.
    pub clean: bool,
    /// The LSN of the last good record.
    pub last_lsn: Option<u64>,
    /// Good records that are raw pushes, as servers logged before every server ran the chain
    /// protocol: no server replays them.
    pub raw_pushes: u64,
    /// Where the records stop early, a good record of a later commit after the stop, as (byte
    /// offset, LSN): proof that the records between were acknowledged, so the stop is damage,
    /// not a commit the crash cut short.
    pub later_commit: Option<(u64, u64)>,
}

impl ShardDir {
    /// True when nothing is wrong: every checkpoint checks out, every log ends cleanly, and
    /// the files agree with each other and with the catalog.
    pub fn ok(&self) -> bool {
        self.checkpoints.iter().all(|c| c.problems.is_empty()) && self.logs.iter().all(|l| l.clean) && self.problems.is_empty()
    }
}

/// Examines every shard directory of a data directory (or the one shard directory `root`), and
/// checks them against each other and against the catalog (`root`'s, or its parent's for a
/// shard directory): what `tessera checkpoint verify` reports.
pub fn examine_data_dir(root: &Path) -> Result<Vec<ShardDir>> {
    let dirs = shard_dirs(root)?;
    let data_dir = if dirs.len() == 1 && dirs[0] == root { root.parent().unwrap_or(root) } else { root };
    let catalog_path = data_dir.join(crate::server::CATALOG_FILE);
    let catalog = match std::fs::read(&catalog_path) {
        Ok(bytes) => serde_json::from_slice::<crate::server::CatalogFile>(&bytes).map_err(|e| format!("{} is unreadable: {e}", catalog_path.display())),
        Err(e) => Err(format!("{} cannot be read ({e})", catalog_path.display())),
    };
    // Not damage to weigh, as the checks below do: no server of this build reads such a directory.
    if let Some(reason) = catalog.as_ref().ok().and_then(crate::server::CatalogFile::foreign_layout) {
        return Err(EngineError::BadConfig { field: "data_dir", value: catalog_path.display().to_string(), reason });
    }
    let mut shards = dirs.iter().map(|d| examine_shard(d)).collect::<Result<Vec<_>>>()?;
    for shard in &mut shards {
        check_log_chain(shard);
        check_against_catalog(shard, catalog.as_ref().map(|c| c.tables.as_slice()));
    }
    Ok(shards)
}

/// Logs follow one another with no gap, from the LSN their checkpoint is exact at, and only the
/// last may stop early, and only inside its last commit.
fn check_log_chain(shard: &mut ShardDir) {
    let manifests: Vec<&Manifest> = shard.checkpoints.iter().filter_map(|c| c.manifest.as_ref()).collect();
    let mut problems = Vec::new();
    let mut prev: Option<&LogCheck> = None;
    for (i, log) in shard.logs.iter().enumerate() {
        let seq = wal_seq_of(&log.file).expect("listed by its name");
        let due = match (prev.and_then(|p| p.last_lsn), manifests.iter().find(|m| m.seq == seq)) {
            (Some(last), _) => Some(last + 1),
            (None, Some(m)) => Some(m.lsn + 1),
            (None, None) => None,
        };
        if let (Some(due), Some(first)) = (due, log.first_lsn) {
            if first != due {
                problems.push(format!("{} starts at LSN {first} where {due} was due: records {due} to {} are missing", log.file, first.max(due + 1) - 1));
            }
        }
        if !log.clean && i + 1 < shard.logs.len() {
            problems.push(format!("{} stops early ({}) but later logs follow: the records after the stop were acknowledged", log.file, log.end));
        }
        if log.raw_pushes > 0 {
            problems.push(format!(
                "{} holds {} raw push record(s), as servers logged before every server ran the chain protocol: no server replays them",
                log.file, log.raw_pushes
            ));
        }
        if let Some((at, lsn)) = log.later_commit {
            problems.push(format!(
                "{} stops early ({}) but record {lsn} of a later commit follows at byte {at}: the records between were acknowledged",
                log.file, log.end
            ));
        }
        prev = Some(log).filter(|l| l.last_lsn.is_some()).or(prev);
    }
    shard.problems.extend(problems);
}

/// Every table a checkpoint holds is one the catalog names, as the same table.
fn check_against_catalog(shard: &mut ShardDir, catalog: std::result::Result<&[tessera_layout::TableSpec], &String>) {
    let mut problems = Vec::new();
    let named = |table: u32| catalog.ok().and_then(|c| c.get(table as usize));
    for m in shard.checkpoints.iter().filter_map(|c| c.manifest.as_ref()) {
        for t in &m.tables {
            match named(t.table) {
                Some(spec) if *spec == t.spec => {}
                Some(spec) => {
                    problems.push(format!("checkpoint {} holds table {} as {:?}, but the catalog names table {} {spec:?}", m.seq, t.table, t.spec, t.table))
                }
                None => problems.push(format!("checkpoint {} holds table {} ({:?}), which the catalog does not name", m.seq, t.table, t.spec.name)),
            }
        }
    }
    if let (Err(why), false) = (catalog, problems.is_empty()) {
        problems.insert(0, why.clone());
    }
    shard.problems.extend(problems);
}

/// The shard directories under `root`: `root` itself if it holds checkpoints or logs, else its
/// `shard-NNN` subdirectories.
pub fn shard_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let list = |dir: &Path| -> Result<Vec<PathBuf>> {
        let entries = std::fs::read_dir(dir).map_err(|e| EngineError::Disk { op: "list", path: dir.display().to_string(), reason: e.to_string() })?;
        Ok(entries.flatten().map(|e| e.path()).collect())
    };
    let named = |p: &PathBuf, f: &dyn Fn(&str) -> bool| p.file_name().and_then(|n| n.to_str()).is_some_and(f);
    let entries = list(root)?;
    if entries.iter().any(|p| named(p, &|n| Manifest::seq_of(n).is_some() || wal_seq_of(n).is_some())) {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut shards: Vec<PathBuf> = entries.into_iter().filter(|p| p.is_dir() && named(p, &|n| n.starts_with("shard-"))).collect();
    shards.sort();
    if shards.is_empty() {
        return Err(EngineError::Disk {
            op: "examine",
            path: root.display().to_string(),
            reason: "holds no checkpoint, no log and no shard-NNN directory; is this a --data-dir?".into(),
        });
    }
    Ok(shards)
}

/// Checks every checkpoint and log in one shard directory.
pub fn examine_shard(dir: &Path) -> Result<ShardDir> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::Disk { op: "list", path: dir.display().to_string(), reason: e.to_string() })?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut seqs: Vec<u64> = names.iter().filter_map(|n| Manifest::seq_of(n)).collect();
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    let checkpoints: Vec<CheckpointCheck> = seqs.iter().map(|seq| check_checkpoint(dir, *seq)).collect();
    let named: std::collections::BTreeSet<u64> =
        checkpoints.iter().filter_map(|c| c.manifest.as_ref()).flat_map(|m| m.tables.iter().flat_map(|t| t.chunks.iter().map(|c| c.file))).collect();
    let orphans = names.iter().filter(|n| data_seq_of(n).is_some_and(|s| !named.contains(&s))).cloned().collect();
    let mut logs: Vec<u64> = names.iter().filter_map(|n| wal_seq_of(n)).collect();
    logs.sort_unstable();
    let logs = logs.into_iter().map(|s| check_log(&dir.join(wal_file_name(s)))).collect::<Result<_>>()?;
    Ok(ShardDir { dir: dir.to_path_buf(), checkpoints, logs, orphans, problems: Vec::new() })
}

fn check_checkpoint(dir: &Path, seq: u64) -> CheckpointCheck {
    let mut check = CheckpointCheck { seq, manifest: None, problems: Vec::new(), chunks: 0, chunk_bytes: 0 };
    let name = Manifest::file_name(seq);
    let manifest = match std::fs::read(dir.join(&name)).map_err(|e| e.to_string()).and_then(|b| Manifest::decode(&b, &name).map_err(|e| e.to_string())) {
        Ok(m) => m,
        Err(e) => {
            check.problems.push(e);
            return check;
        }
    };
    let mut open: Option<(u64, Result<Vec<u8>, String>)> = None;
    for t in &manifest.tables {
        for (c, r) in t.chunks.iter().enumerate() {
            let file = Manifest::data_file_name(r.file);
            if open.as_ref().is_none_or(|(s, _)| *s != r.file) {
                open = Some((r.file, std::fs::read(dir.join(&file)).map_err(|e| format!("{file}: {e}"))));
            }
            let bytes = match &open.as_ref().expect("read above").1 {
                Ok(b) => b,
                Err(e) => {
                    check.problems.push(format!("table {} chunk {c}: {e}", t.table));
                    continue;
                }
            };
            let what = format!("{file} at {} (table {} chunk {c})", r.offset, t.table);
            let span = usize::try_from(r.offset).ok().and_then(|o| bytes.get(o..o.checked_add(r.len as usize)?));
            let Some(span) = span else {
                check.problems.push(format!("{what}: the file ends before the chunk does"));
                continue;
            };
            match ChunkHeader::open(span, &what) {
                Ok((h, _)) if h.crc != r.crc || h.table != t.table || h.chunk != c as u64 => {
                    check.problems.push(format!("{what}: holds table {} chunk {} (crc {:#010x}), not the one named", h.table, h.chunk, h.crc));
                }
                Ok(_) => {
                    check.chunks += 1;
                    check.chunk_bytes += u64::from(r.len);
                }
                Err(e) => check.problems.push(e.to_string()),
            }
        }
    }
    check.manifest = Some(manifest);
    check
}

fn check_log(path: &Path) -> Result<LogCheck> {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let (words, len) = read_aligned(path)?;
    let log: &[u8] = &bytemuck::cast_slice(&words)[..len];
    // The first record names the LSN the log starts at.
    let first_lsn = RecordHeader::read_from_prefix(log).ok().map(|(h, _)| h).filter(|h| h.magic == WAL_MAGIC).map(|h| h.lsn);
    let mut reader = Reader::new(log, first_lsn.unwrap_or(1));
    let (mut records, mut raw_pushes) = (0, 0);
    for record in reader.by_ref() {
        raw_pushes += u64::from(!matches!(record.target, Target::Replica { .. }));
        records += 1;
    }
    let last_lsn = (records > 0).then(|| reader.next_lsn() - 1);
    let stop = reader.stop().cloned().unwrap_or(Stop::End);
    let later_commit = match &stop {
        Stop::Torn { offset, .. } => acknowledged_after(log, *offset, reader.next_lsn()),
        _ => None,
    };
    let (end, clean) = match stop {
        Stop::End if first_lsn.is_none() && log.len() >= RECORD_HEADER_BYTES && log.iter().any(|b| *b != 0) => {
            ("the first record is unreadable".to_string(), false)
        }
        Stop::End => ("ends cleanly".to_string(), true),
        Stop::Torn { offset, reason } => (format!("record at byte {offset} is torn or corrupt: {reason}"), false),
        Stop::Gap { offset, expected, found } => (format!("record at byte {offset} has LSN {found} where {expected} was due"), false),
    };
    Ok(LogCheck { file, bytes: len as u64, first_lsn, records, end, clean, last_lsn, raw_pushes, later_commit })
}

/// A table part's clocks in short: the lowest and highest clock of each worker over its segments.
pub fn clock_bounds(t: &PartManifest) -> (Vec<u64>, Vec<u64>) {
    let workers = t.clocks.first().map_or(0, |(_, c)| c.len());
    let mut low = vec![u64::MAX; workers];
    let mut high = vec![0; workers];
    for (_, clocks) in &t.clocks {
        for (w, c) in clocks.iter().enumerate().take(workers) {
            low[w] = low[w].min(*c);
            high[w] = high[w].max(*c);
        }
    }
    low.iter_mut().filter(|c| **c == u64::MAX).for_each(|c| *c = 0);
    (low, high)
}

/// A whole file, read into 8-byte aligned memory (log records are read in place), and its
/// length in bytes, with plain reads: for tools that read a data directory offline.
fn read_aligned(path: &Path) -> Result<(Vec<u64>, usize)> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::Disk { op: "read", path: path.display().to_string(), reason: e.to_string() })?;
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
    Ok((words, bytes.len()))
}
