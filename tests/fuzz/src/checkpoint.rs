//! Loading a checkpoint: the real loader's decoding half ([`store::decode`]), which checks the
//! manifest, makes each part, checks every chunk against the manifest and loads it, and
//! restores the clocks. The server runs the same function over its data files
//! ([`store::load`]); here the data files are memory.
//!
//! Input: a flags byte (bit 0 **fixes checksums**: the manifest's JSON is re-encoded with its
//! checksum line, and every chunk it names is re-sealed and its new crc written into the
//! manifest, so that mutations reach the parsing and loading behind the checksums), a u32
//! length and the manifest file's bytes, then data file extents, each a u64 file (checkpoint
//! sequence number), u64 offset, u32 length and the bytes. Bytes no extent covers read as
//! zeros.
//!
//! Parts are made as the server makes them: only for a table the catalog (fixed here: a small
//! dense table with Adam, a sparse one, and a dense one of two chunks) places with exactly that
//! spec and range; anything else is refused before memory is mapped.

use std::cell::RefCell;
use std::sync::Arc;

use tessera_engine::config::{CHECKPOINT_BUFFER_BYTES, IO_ALIGN_BYTES};
use tessera_engine::persist::checkpoint::store::{self, ChunkSource, Taking};
use tessera_engine::persist::checkpoint::{ChunkHeader, ChunkRef, Manifest, PartManifest, CHUNK_MAGIC};
use tessera_engine::persist::disk::{BufId, Disk, DiskConfig};
use tessera_engine::table::TablePart;
use tessera_engine::tables::Tables;
use tessera_engine::{EngineConfig, EngineError, Result, UpdaterRegistry};
use tessera_layout::{TableKind, TableSpec};
use zerocopy::FromBytes;

use crate::{Input, Output, Seed};

const FIX_CHECKSUMS: u8 = 1;
/// Data file offsets past this are folded back: the loader's behaviour does not depend on
/// where in a file a chunk is, only that reads are whole pages.
const OFFSET_MAX: u64 = 16 << 20;

/// The tables this shard holds: (id, spec, owned keys).
fn catalog() -> Vec<(u32, TableSpec, (u64, u64))> {
    let mut adam = TableSpec::new("d", TableKind::Dense, 0, 64, 2);
    adam.updater = "adam{lr=0.01}".into();
    let mut sparse = TableSpec::new("s", TableKind::Sparse, 0, u64::MAX, 1);
    sparse.capacity = 500;
    let wide = TableSpec::new("m", TableKind::Dense, 1000, 1020, 1024);
    vec![(0, adam, (0, 64)), (1, sparse, (0, u64::MAX)), (2, wide, (1000, 1020))]
}

fn engine_config() -> EngineConfig {
    EngineConfig { shards: 1, pin_cores: false, workers_max: 4, ..EngineConfig::default() }
}

thread_local! {
    /// The shard's tables as its catalog makes them (one range: each table whole), made once.
    static TABLES: RefCell<Tables> = RefCell::new({
        let mut tables = Tables::new(0, Arc::new(engine_config()), 1);
        for (id, spec, owned) in catalog() {
            let updater = UpdaterRegistry::new().build(&spec.updater).expect("the catalog's updaters");
            tables.add(id, spec, owned.0..owned.1, updater, |_| true).expect("the catalog's tables");
        }
        tables
    });
}

/// Makes a fresh part for a manifest's table with the shard's own recovery check
/// (`Tables::part_for_checkpoint`): it refuses a table the catalog does not place with the same
/// spec and range.
fn build(m: &PartManifest) -> Result<TablePart> {
    TABLES.with(|tables| tables.borrow_mut().part_for_checkpoint(m))
}

/// Data files as extents of bytes; what no extent covers is zeros.
struct Files {
    extents: Vec<(u64, u64, Vec<u8>)>,
    scratch: Vec<u8>,
}

impl Files {
    fn read(&self, file: u64, offset: u64, len: usize) -> Option<Vec<u8>> {
        if !self.extents.iter().any(|(f, ..)| *f == file) {
            return None;
        }
        let mut out = vec![0u8; len];
        let want = offset..offset + len as u64;
        for (_, at, bytes) in self.extents.iter().filter(|(f, ..)| *f == file) {
            let from = want.start.max(*at);
            let to = want.end.min(at + bytes.len() as u64);
            if from < to {
                out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
            }
        }
        Some(out)
    }
}

impl ChunkSource for Files {
    fn chunk(&mut self, r: &ChunkRef, what: &str) -> Result<&[u8]> {
        // The server reads into its checkpoint buffer, and refuses a chunk bigger than that.
        if r.len as usize > CHECKPOINT_BUFFER_BYTES {
            return Err(EngineError::Corrupt { what: what.to_string(), reason: format!("a chunk of {} bytes", r.len) });
        }
        let path = Manifest::data_file_name(r.file);
        self.scratch =
            self.read(r.file, r.offset, r.len as usize).ok_or_else(|| EngineError::Disk { op: "open", path, reason: "No such file or directory".into() })?;
        Ok(&self.scratch)
    }

    fn release(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Runs one input; returns how many table parts loaded (none if the checkpoint was refused).
pub fn run(data: &[u8]) -> usize {
    let mut input = Input::new(data);
    let fix = input.u8() & FIX_CHECKSUMS != 0;
    let manifest_len = input.u32() as usize;
    let mut manifest = input.bytes(manifest_len).to_vec();
    let mut files = Files { extents: Vec::new(), scratch: Vec::new() };
    while !input.is_empty() {
        let (file, offset) = (input.u64(), input.u64() % OFFSET_MAX);
        let len = input.u32() as usize;
        files.extents.push((file, offset, input.bytes(len).to_vec()));
    }
    if fix {
        fix_checksums(&mut manifest, &mut files);
    }
    let Ok((m, parts)) = store::decode(&manifest, "MANIFEST-fuzz", &mut build, &mut files) else { return 0 };
    check_loaded(&m, &parts, &files);
    parts.len()
}

/// What a load that succeeded promises: every part the manifest names, with its step and
/// clocks, holding exactly the chunks it was loaded from.
fn check_loaded(m: &Manifest, parts: &[TablePart], files: &Files) {
    assert_eq!(parts.len(), m.tables.len());
    for (part, t) in parts.iter().zip(&m.tables) {
        assert_eq!((part.id, part.step(), part.chunks()), (t.table, t.step, t.chunks.len() as u64));
        let clocks: Vec<(u64, Vec<u64>)> = part.clocks().segments().map(|(r, c)| (r.start, c.to_vec())).collect();
        assert_eq!(clocks, t.clocks, "the clocks are restored as the manifest has them");
        let mut saved = vec![0u8; CHECKPOINT_BUFFER_BYTES];
        for (c, r) in t.chunks.iter().enumerate() {
            let bytes = files.read(r.file, r.offset, r.len as usize).expect("it loaded");
            let (_, payload) = ChunkHeader::open(&bytes, "again").expect("it loaded");
            let n = part.save_chunk(c as u64, &mut saved);
            assert!(saved[..n] == *payload, "table {} chunk {c} saves back other bytes than it loaded", t.table);
        }
    }
    assert_eq!(&Manifest::decode(&m.encode(), "again").expect("a manifest that loaded re-encodes"), m);
}

/// Re-encodes the manifest's JSON with a right checksum line, after re-sealing every chunk it
/// names and writing their crcs into it. JSON that does not parse is left for the loader to
/// refuse.
fn fix_checksums(manifest: &mut Vec<u8>, files: &mut Files) {
    let text = &manifest[..manifest.iter().position(|b| *b == 0).unwrap_or(manifest.len())];
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    let json = &text[..text.iter().rposition(|b| *b == b'\n').unwrap_or(text.len())];
    let Ok(mut m) = serde_json::from_slice::<Manifest>(json) else { return };
    for r in m.tables.iter_mut().flat_map(|t| t.chunks.iter_mut()) {
        let len = (r.len as usize).min(CHECKPOINT_BUFFER_BYTES);
        let Some(mut bytes) = files.read(r.file, r.offset, len) else { continue };
        let Ok((h, _)) = ChunkHeader::read_from_prefix(&bytes) else { continue };
        if h.magic != CHUNK_MAGIC || ChunkHeader::disk_len(h.payload_len as usize) > bytes.len() {
            continue;
        }
        h.seal(&mut bytes);
        r.crc = ChunkHeader::read_from_prefix(&bytes).expect("sealed above").0.crc;
        files.extents.push((r.file, r.offset, bytes));
    }
    *manifest = m.encode();
}

/// Checkpoints written by the real writer ([`Taking`]) through the blocking disk backend in a
/// scratch directory: the first of all three tables, a second one that rewrote only what
/// pushes changed (the rest stays in the first one's data file), and one of a single table.
pub fn seeds() -> Vec<Seed> {
    let dir = std::env::temp_dir().join(format!("tessera-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let cfg = DiskConfig { ring_entries: 8, files_max: 4, buffer_bytes: vec![256 << 10; 2], force_blocking: true };
    let mut disk = Disk::open(&cfg).expect("a blocking disk");
    let mut parts: Vec<TablePart> = catalog()
        .into_iter()
        .map(|(id, spec, owned)| {
            let m = PartManifest { table: id, spec, owned, step: 0, chunk_slots: 0, clocks: Vec::new(), chunks: Vec::new() };
            build(&m).expect("the catalog's tables")
        })
        .collect();
    let push = |parts: &mut [TablePart], round: u64| {
        parts[0].push_range(8 * round, 4, &[0.5; 8], 1, round).unwrap();
        parts[1].push(&[7 + round, 1 << 40, u64::MAX - 1], &[1.0, -2.0, 0.25], 0, round).unwrap();
        if round == 1 {
            parts[2].push_range(1018, 1, &[3.0; 1024], 2, round).unwrap();
        }
    };
    push(&mut parts, 1);
    let mut write = |parts: &mut Vec<TablePart>, seq: u64, prev: Option<&Manifest>| {
        let mut parts: Vec<&mut TablePart> = parts.iter_mut().collect();
        let wal = format!("wal-{seq:08}.log");
        let mut taking = Taking::begin(&mut disk, [BufId(0), BufId(1)], 1, &dir, (seq, 10 * seq, &wal), 0, &mut parts, prev).unwrap();
        while !taking.advance(&mut disk, &mut parts).unwrap() {
            let mut done = Vec::new();
            disk.wait(&mut done).unwrap();
            taking.complete(done.pop().unwrap().result).unwrap();
        }
        taking.commit(&mut disk, &dir, &mut parts).unwrap().0
    };
    let first = write(&mut parts, 1, None);
    push(&mut parts, 2);
    let second = write(&mut parts, 2, Some(&first));
    let mut only = parts.split_off(2);
    let single = write(&mut only, 3, None);
    let packed = |m: &Manifest, flags: u8| pack(&dir, m, flags);
    let seeds = vec![
        ("first", packed(&first, 0)),
        ("incremental", packed(&second, 0)),
        ("incremental-fix", packed(&second, FIX_CHECKSUMS)),
        ("single-table", packed(&single, 0)),
        ("single-table-fix", packed(&single, FIX_CHECKSUMS)),
    ];
    std::fs::remove_dir_all(&dir).expect("the scratch directory");
    seeds
}

/// A fuzz input for checkpoint `m` in `dir`: its manifest file without the zeros that pad it to
/// a page, and each data file it names as the runs of bytes that are not zeros.
fn pack(dir: &std::path::Path, m: &Manifest, flags: u8) -> Vec<u8> {
    let manifest = std::fs::read(dir.join(Manifest::file_name(m.seq))).unwrap();
    let text = &manifest[..manifest.iter().position(|b| *b == 0).unwrap_or(manifest.len())];
    let mut out = Output::default();
    out.u8(flags).u32(text.len() as u32).bytes(text);
    let mut seqs: Vec<u64> = m.tables.iter().flat_map(|t| t.chunks.iter().map(|c| c.file)).collect();
    seqs.sort_unstable();
    seqs.dedup();
    for seq in seqs {
        let data = std::fs::read(dir.join(Manifest::data_file_name(seq))).unwrap();
        assert!(data.len().is_multiple_of(IO_ALIGN_BYTES));
        let mut at = 0;
        while at < data.len() {
            let Some(start) = data[at..].iter().position(|b| *b != 0).map(|p| at + p) else { break };
            // A run ends at 64 zeros in a row (or the end).
            let mut end = start;
            while end < data.len() && data[end..(end + 64).min(data.len())].iter().any(|b| *b != 0) {
                end += 1;
            }
            out.u64(seq).u64(start as u64).u32((end - start) as u32).bytes(&data[start..end]);
            at = end;
        }
    }
    out.0
}
