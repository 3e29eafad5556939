//! Checkpoints written to and loaded from real files, through both disk backends.

use std::sync::Arc;

use tessera_layout::{TableKind, TableSpec};

use super::*;
use crate::arena::Arena;
use crate::persist::disk::DiskConfig;
use crate::table::SparseRoom;
use crate::test_support::TempDir;
use crate::updater::UpdaterRegistry;
use crate::EngineConfig;

const BUF: BufId = BufId(0);
const BUFS: [BufId; 2] = [BufId(0), BufId(1)];
const TOKEN: u64 = 7;

/// Drives `taking` one step: advances it, then waits for its write in flight and hands the
/// completion back. True once it is ready to commit.
fn step(disk: &mut Disk, taking: &mut Taking, parts: &mut dyn Parts) -> bool {
    if taking.advance(disk, parts).unwrap() {
        return true;
    }
    let mut done = Vec::new();
    disk.wait(&mut done).unwrap();
    let d = done.pop().unwrap();
    assert_eq!(d.token, TOKEN);
    taking.complete(d.result).unwrap();
    false
}

/// Writes checkpoint `seq` of `parts` start to finish, with nothing else on the ring.
#[allow(clippy::too_many_arguments)]
fn write(
    disk: &mut Disk,
    bufs: [BufId; 2],
    dir: &Path,
    seq: u64,
    lsn: u64,
    wal: &str,
    shard: u16,
    parts: &mut [&mut TablePart],
    prev: Option<&Manifest>,
) -> Result<(Manifest, Written)> {
    let mut parts: Vec<&mut TablePart> = parts.iter_mut().map(|p| &mut **p).collect();
    let mut taking = Taking::begin(disk, bufs, TOKEN, dir, (seq, lsn, wal), shard, &mut parts, prev)?;
    while !step(disk, &mut taking, &mut parts) {}
    taking.commit(disk, dir, &mut parts)
}

fn disk(blocking: bool) -> Disk {
    let cfg = DiskConfig { ring_entries: 16, files_max: 8, buffer_bytes: vec![256 << 10; 2], force_blocking: blocking };
    Disk::open(&cfg).unwrap()
}

fn cfg() -> EngineConfig {
    EngineConfig { workers_max: 4, ..EngineConfig::default() }
}

fn build(t: &PartManifest) -> Result<TablePart> {
    let updater = UpdaterRegistry::new().build(&t.spec.updater)?;
    TablePart::new(t.table, 0, t.spec.clone(), t.owned.0..t.owned.1, updater, SparseRoom::Whole, &cfg(), &mut Arena::default())
}

fn parts() -> (TablePart, TablePart) {
    let mut dense = TableSpec::new("d", TableKind::Dense, 0, 200_000, 2);
    dense.updater = "adam{lr=0.01}".into();
    let mut sparse = TableSpec::new("s", TableKind::Sparse, 0, u64::MAX, 3);
    sparse.capacity = 5000;
    let make = |id, spec: TableSpec, owned: std::ops::Range<u64>| {
        let updater: Arc<dyn crate::Updater> = UpdaterRegistry::new().build(&spec.updater).unwrap();
        TablePart::new(id, 0, spec, owned, updater, SparseRoom::Whole, &cfg(), &mut Arena::default()).unwrap()
    };
    (make(0, dense, 0..200_000), make(1, sparse, 0..u64::MAX))
}

/// Values and stamps of everything the test pushed, as a worker would pull them.
fn observe(d: &mut TablePart, s: &mut TablePart) -> (Vec<u32>, Vec<u32>, Vec<u64>) {
    let mut dv = vec![0f32; 400_000];
    d.check_pull_range(0, 200_000).unwrap();
    d.pull_range(0, 200_000, &mut dv);
    let keys: Vec<u64> = (0..500).map(|i| i * 104_729 + 7).collect();
    let mut sv = vec![0f32; 1500];
    s.pull(&keys, &mut sv);
    let mut stamp = vec![0; 4];
    d.stamp_into(0..200_000, &mut stamp);
    (dv.iter().map(|v| v.to_bits()).collect(), sv.iter().map(|v| v.to_bits()).collect(), stamp)
}

fn push_some(d: &mut TablePart, s: &mut TablePart, round: u64) {
    let g: Vec<f32> = (0..20_000).map(|i| ((i % 13) as f32 - 6.0) * 1e-2 * round as f32).collect();
    d.push_range(1000 * round, 10_000, &g, (round % 4) as u32, round).unwrap();
    let keys: Vec<u64> = (0..500).map(|i| i * 104_729 + 7).collect();
    s.push(&keys, &vec![0.5; 1500], 1, round).unwrap();
}

#[test]
fn checkpoints_round_trip_and_later_ones_write_only_what_changed() {
    for blocking in [false, true] {
        let dir = TempDir::new(if blocking { "ckpt-rt-blocking" } else { "ckpt-rt-uring" });
        let mut disk = disk(blocking);
        let (mut d, mut s) = parts();
        push_some(&mut d, &mut s, 1);
        let (m1, w1) = write(&mut disk, BUFS, &dir.0, 1, 10, "wal-00000001.log", 0, &mut [&mut d, &mut s], None).unwrap();
        assert_eq!(w1.chunks_kept, 0, "the first checkpoint writes every chunk");
        push_some(&mut d, &mut s, 2);
        let (m2, w2) = write(&mut disk, BUFS, &dir.0, 2, 20, "wal-00000002.log", 0, &mut [&mut d, &mut s], Some(&m1)).unwrap();
        assert!(w2.chunks_kept > 0 && w2.chunks_written < w1.chunks_written, "{w1:?} then {w2:?}");
        assert!(m2.tables[0].chunks.iter().any(|c| c.file == 1), "unchanged chunks stay in checkpoint 1's file");

        let mut skipped = Vec::new();
        let (m, mut loaded) = load_newest(&mut disk, BUF, &dir.0, &mut build, &mut |seq, e| skipped.push((seq, e.to_string())), false).unwrap().unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!((m.seq, m.lsn), (2, 20));
        let (mut ld, mut ls) = (loaded.remove(0), loaded.remove(0));
        assert_eq!(observe(&mut ld, &mut ls), observe(&mut d, &mut s));
        // Optimiser state and step came back too: the next push lands identically.
        push_some(&mut d, &mut s, 3);
        push_some(&mut ld, &mut ls, 3);
        assert_eq!(observe(&mut ld, &mut ls), observe(&mut d, &mut s));
    }
}

#[test]
fn a_corrupt_chunk_or_manifest_falls_back_to_the_previous_checkpoint_and_says_why() {
    let dir = TempDir::new("ckpt-fallback");
    let mut disk = disk(false);
    let (mut d, mut s) = parts();
    push_some(&mut d, &mut s, 1);
    let (m1, _) = write(&mut disk, BUFS, &dir.0, 1, 10, "wal-00000001.log", 0, &mut [&mut d, &mut s], None).unwrap();
    let at_1 = observe(&mut d, &mut s);
    push_some(&mut d, &mut s, 2);
    let (m2, _) = write(&mut disk, BUFS, &dir.0, 2, 20, "wal-00000002.log", 0, &mut [&mut d, &mut s], Some(&m1)).unwrap();

    // One flipped bit in a chunk checkpoint 2 wrote.
    let r = m2.tables[0].chunks.iter().find(|c| c.file == 2).unwrap();
    let data = dir.0.join(Manifest::data_file_name(2));
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[r.offset as usize + CHUNK_HEADER_BYTES + 100] ^= 4;
    std::fs::write(&data, &bytes).unwrap();

    let mut skipped = Vec::new();
    let (m, mut loaded) = load_newest(&mut disk, BUF, &dir.0, &mut build, &mut |seq, e| skipped.push((seq, e.to_string())), false).unwrap().unwrap();
    assert_eq!(m.seq, 1);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].0, 2);
    assert!(skipped[0].1.contains("data-00000002.ckpt") && skipped[0].1.contains("checksum"), "{}", skipped[0].1);
    let (mut ld, mut ls) = (loaded.remove(0), loaded.remove(0));
    assert_eq!(observe(&mut ld, &mut ls), at_1);

    // A manifest cut short is passed over too; with both gone there is nothing to load.
    let m1_path = dir.0.join(Manifest::file_name(1));
    let m1_bytes = std::fs::read(&m1_path).unwrap();
    std::fs::write(&m1_path, &m1_bytes[..4096]).unwrap();
    let mut skipped = Vec::new();
    let none = load_newest(&mut disk, BUF, &dir.0, &mut build, &mut |seq, e| skipped.push((seq, e.to_string())), false).unwrap();
    assert!(none.is_none());
    assert_eq!(skipped.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 1], "{skipped:?}");
}

#[test]
fn an_empty_directory_has_no_checkpoint_and_a_leftover_temporary_is_ignored() {
    let dir = TempDir::new("ckpt-empty");
    let mut disk = disk(false);
    std::fs::write(dir.0.join("MANIFEST-00000009.tmp"), b"half written").unwrap();
    let found = load_newest(&mut disk, BUF, &dir.0, &mut build, &mut |seq, e| panic!("skipped {seq}: {e}"), false).unwrap();
    assert!(found.is_none());
}

#[test]
fn pushes_while_a_checkpoint_is_written_do_not_reach_it_and_the_next_one_takes_them() {
    for blocking in [false, true] {
        let dir = TempDir::new(if blocking { "ckpt-cow-blocking" } else { "ckpt-cow-uring" });
        let mut disk = disk(blocking);
        let (mut d, mut s) = parts();
        push_some(&mut d, &mut s, 1);
        let at_1 = observe(&mut d, &mut s);
        let mut parts: Vec<&mut TablePart> = vec![&mut d, &mut s];
        let mut taking = Taking::begin(&mut disk, BUFS, TOKEN, &dir.0, (1, 10, "wal-00000001.log"), 0, &mut parts, None).unwrap();
        // Push between the checkpoint's steps: to chunks it has written, to chunks it has yet to
        // write (they are copied aside first), and new sparse keys, some crossing chunk edges.
        let mut round = 2;
        let mut sparse_key = 1u64;
        loop {
            let [d, s] = &mut parts[..] else { unreachable!() };
            push_some(d, s, round);
            let g = vec![0.25f32; 2 * 300];
            let keys: Vec<u64> = (0..300).map(|i| (i * 997 + round * 31) % 200_000).collect();
            d.push(&keys, &g, 2, round).unwrap();
            let new: Vec<u64> = (0..40)
                .map(|_| {
                    sparse_key = sparse_key.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    sparse_key >> 20
                })
                .collect();
            s.push(&new, &vec![1.0; 120], 3, round).unwrap();
            round += 1;
            if step(&mut disk, &mut taking, &mut parts) {
                break;
            }
        }
        assert!(round > 3, "the checkpoint took several steps");
        let (m1, w1) = taking.commit(&mut disk, &dir.0, &mut parts).unwrap();
        assert!(w1.chunks_copied > 0, "{w1:?}");
        let now = observe(&mut d, &mut s);
        assert_ne!(now, at_1);

        // The checkpoint holds the state when it began.
        let (_, mut loaded) = load_newest(&mut disk, BUF, &dir.0, &mut build, &mut |seq, e| panic!("{seq}: {e}"), false).unwrap().unwrap();
        let (mut ld, mut ls) = (loaded.remove(0), loaded.remove(0));
        assert_eq!(observe(&mut ld, &mut ls), at_1);

        // The next checkpoint takes what was pushed meanwhile.
        let (_, w2) = write(&mut disk, BUFS, &dir.0, 2, 20, "wal-00000002.log", 0, &mut [&mut d, &mut s], Some(&m1)).unwrap();
        assert!(w2.chunks_written > 0 && w2.chunks_copied == 0, "{w2:?}");
        let (m, mut loaded) = load_newest(&mut disk, BUF, &dir.0, &mut build, &mut |seq, e| panic!("{seq}: {e}"), false).unwrap().unwrap();
        assert_eq!(m.seq, 2);
        let (mut ld, mut ls) = (loaded.remove(0), loaded.remove(0));
        assert_eq!(observe(&mut ld, &mut ls), now);
        // And the sparse keys inserted during checkpoint 1 came back with their values.
        let mut a = vec![0f32; 3];
        let mut b = vec![0f32; 3];
        ls.pull(&[sparse_key >> 20], &mut a);
        s.pull(&[sparse_key >> 20], &mut b);
        assert_eq!(a, b);
    }
}

#[test]
fn an_abandoned_checkpoint_leaves_its_chunks_for_the_next() {
    let dir = TempDir::new("ckpt-abandon");
    let mut disk = disk(false);
    let (mut d, mut s) = parts();
    push_some(&mut d, &mut s, 1);
    let (m1, _) = write(&mut disk, BUFS, &dir.0, 1, 10, "wal-00000001.log", 0, &mut [&mut d, &mut s], None).unwrap();
    push_some(&mut d, &mut s, 2);
    let mut parts: Vec<&mut TablePart> = vec![&mut d, &mut s];
    let mut taking = Taking::begin(&mut disk, BUFS, TOKEN, &dir.0, (2, 20, "wal-00000002.log"), 0, &mut parts, Some(&m1)).unwrap();
    step(&mut disk, &mut taking, &mut parts);
    if let [pd, ps] = &mut parts[..] {
        push_some(pd, ps, 3);
    }
    taking.abandon(&mut disk, &mut parts);
    assert!(parts.iter().all(|p| !p.snapshotting()));
    let (_, w3) = write(&mut disk, BUFS, &dir.0, 3, 30, "wal-00000003.log", 0, &mut [&mut d, &mut s], Some(&m1)).unwrap();
    let (m, mut loaded) = load_newest(&mut disk, BUF, &dir.0, &mut build, &mut |seq, e| panic!("{seq}: {e}"), false).unwrap().unwrap();
    assert_eq!(m.seq, 3);
    let (mut ld, mut ls) = (loaded.remove(0), loaded.remove(0));
    assert_eq!(observe(&mut ld, &mut ls), observe(&mut d, &mut s), "{w3:?}");
}
