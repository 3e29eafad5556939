//! Real files, real io_uring (where the kernel has it) and the blocking backend, through the same
//! tests.

use super::*;
use crate::test_support::TempDir;

const K4: usize = IO_ALIGN_BYTES;

fn disk(blocking: bool) -> Disk {
    let cfg = DiskConfig { ring_entries: 32, files_max: 4, buffer_bytes: vec![4 * K4, 4 * K4], force_blocking: blocking };
    let d = Disk::open(&cfg).unwrap();
    if !blocking && std::env::var_os("TESSERA_EXPECT_IO_URING").is_some() {
        assert_eq!(d.backend(), Backend::Uring, "io_uring was expected to work here");
    }
    d
}

fn both(test: impl Fn(Disk, &str)) {
    for blocking in [false, true] {
        let d = disk(blocking);
        let name = if blocking { "blocking" } else { "uring" };
        test(d, name);
    }
}

fn wait_one(d: &mut Disk) -> Done {
    let mut out = Vec::new();
    d.wait(&mut out).unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    out.pop().unwrap()
}

#[test]
fn a_write_and_sync_chain_lands_and_reads_back() {
    both(|mut d, name| {
        let dir = TempDir::new(&format!("disk-rw-{name}"));
        let f = d.open_file(&dir.0.join("data"), true).unwrap();
        let pattern: Vec<u8> = (0..2 * K4).map(|i| (i * 7 + 3) as u8).collect();
        d.buf_mut(BufId(0)).unwrap()[K4..3 * K4].copy_from_slice(&pattern);
        let write = Op::Write { file: f, buf: BufId(0), span: K4..3 * K4, offset: 8 * K4 as u64 };
        d.submit(&[write, Op::Sync { file: f }], 7).unwrap();
        let done = wait_one(&mut d);
        assert_eq!(done.token, 7);
        done.result.unwrap();
        assert_eq!(d.file_len(f).unwrap(), 10 * K4 as u64);
        assert_eq!(d.in_flight(), 0);

        d.submit(&[Op::Read { file: f, buf: BufId(1), span: 0..2 * K4, offset: 8 * K4 as u64 }], 8).unwrap();
        wait_one(&mut d).result.unwrap();
        assert!(d.buf(BufId(1))[..2 * K4] == pattern[..], "{name}: read back differs");
        // And the bytes are in the file, as any reader sees them.
        let on_disk = std::fs::read(dir.0.join("data")).unwrap();
        assert!(on_disk[8 * K4..10 * K4] == pattern[..]);
    });
}

#[test]
fn a_buffer_is_not_lent_while_a_request_names_it() {
    let mut d = disk(false);
    if d.backend() == Backend::Blocking {
        println!("io_uring unavailable here: nothing is ever in flight");
        return;
    }
    let dir = TempDir::new("disk-busy");
    let f = d.open_file(&dir.0.join("data"), true).unwrap();
    d.submit(&[Op::Write { file: f, buf: BufId(0), span: 0..K4, offset: 0 }, Op::Sync { file: f }], 1).unwrap();
    assert!(d.buf_mut(BufId(0)).is_none(), "lent while in flight");
    assert!(d.buf_mut(BufId(1)).is_some(), "the other buffer is free");
    assert!(d.close_file(f).is_err(), "closed under a request");
    wait_one(&mut d).result.unwrap();
    assert!(d.buf_mut(BufId(0)).is_some());
    d.close_file(f).unwrap();
}

#[test]
fn misaligned_or_out_of_bounds_requests_are_refused_and_nothing_is_submitted() {
    both(|mut d, name| {
        let dir = TempDir::new(&format!("disk-bad-{name}"));
        let f = d.open_file(&dir.0.join("data"), true).unwrap();
        let bad = [
            Op::Write { file: f, buf: BufId(0), span: 0..100, offset: 0 },
            Op::Write { file: f, buf: BufId(0), span: 0..K4, offset: 512 },
            Op::Write { file: f, buf: BufId(0), span: 0..5 * K4, offset: 0 },
            Op::Write { file: f, buf: BufId(0), span: K4..K4, offset: 0 },
            Op::Write { file: f, buf: BufId(9), span: 0..K4, offset: 0 },
            Op::Sync { file: FileId(3) },
        ];
        for op in bad {
            let err = d.submit(&[Op::Sync { file: f }, op.clone()], 1).unwrap_err();
            assert!(matches!(err, EngineError::Disk { op: "submit", .. }), "{name} {op:?}: {err}");
            assert_eq!(d.in_flight(), 0, "{name}: a refused chain submitted a step");
        }
        let too_long = vec![Op::Sync { file: f }; IO_CHAIN_OPS_MAX + 1];
        assert!(d.submit(&too_long, 1).is_err());
        assert!(d.submit(&[], 1).is_err());
        assert_eq!(d.file_len(f).unwrap(), 0, "{name}: nothing was written");
    });
}

#[test]
fn a_failed_step_fails_the_chain_and_the_steps_after_it_do_not_run() {
    both(|mut d, name| {
        let dir = TempDir::new(&format!("disk-chain-{name}"));
        let f = d.open_file(&dir.0.join("data"), true).unwrap();
        // Reading from past the end of an empty file is a short read (one that stops at the end
        // would be whole), so the write after it must not run.
        let read = Op::Read { file: f, buf: BufId(1), span: 0..K4, offset: K4 as u64 };
        let write = Op::Write { file: f, buf: BufId(0), span: 0..K4, offset: 0 };
        d.submit(&[read, write], 3).unwrap();
        let done = wait_one(&mut d);
        let err = done.result.unwrap_err();
        assert!(err.to_string().contains("short read: 0 of 4096 bytes"), "{name}: {err}");
        assert_eq!(d.file_len(f).unwrap(), 0, "{name}: the write after the failed read ran");
        assert!(d.buf_mut(BufId(0)).is_some() && d.buf_mut(BufId(1)).is_some());
    });
}

#[test]
fn opening_errors_name_the_file_and_the_reason() {
    both(|mut d, name| {
        let dir = TempDir::new(&format!("disk-open-{name}"));
        let missing = dir.0.join("missing");
        let err = d.open_file(&missing, false).unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("No such file"), "{name}: {err}");
        for i in 0..4 {
            d.open_file(&dir.0.join(format!("f{i}")), true).unwrap();
        }
        let err = d.open_file(&dir.0.join("one-too-many"), true).unwrap_err().to_string();
        assert!(err.contains("4 files already open"), "{name}: {err}");
    });
}

#[test]
fn bad_configurations_are_refused() {
    let base = DiskConfig { ring_entries: 32, files_max: 2, buffer_bytes: vec![K4], force_blocking: false };
    let odd = DiskConfig { buffer_bytes: vec![K4 + 1], ..base.clone() };
    assert!(matches!(Disk::open(&odd), Err(EngineError::BadConfig { field: "buffer_bytes", .. })));
    let tiny_ring = DiskConfig { ring_entries: 2, ..base };
    assert!(matches!(Disk::open(&tiny_ring), Err(EngineError::BadConfig { field: "ring_entries", .. })));
}

#[test]
fn many_chains_in_flight_all_complete_with_their_tokens() {
    both(|mut d, name| {
        let dir = TempDir::new(&format!("disk-many-{name}"));
        let f = d.open_file(&dir.0.join("data"), true).unwrap();
        for token in 0..10u64 {
            d.submit(&[Op::Sync { file: f }], token).unwrap();
        }
        let mut out = Vec::new();
        while out.len() < 10 {
            d.wait(&mut out).unwrap();
        }
        let mut tokens: Vec<u64> = out.iter().map(|d| d.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..10).collect::<Vec<_>>(), "{name}");
        assert!(out.iter().all(|d| d.result.is_ok()));
        assert_eq!(d.in_flight(), 0);
    });
}

#[test]
fn a_filesystem_without_o_direct_is_written_through_the_page_cache() {
    // tmpfs refuses O_DIRECT; /dev/shm is tmpfs on Linux hosts that have it.
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm here: not run");
        return;
    }
    both(|mut d, name| {
        let path = shm.join(format!("tessera-disk-test-{name}-{}", std::process::id()));
        let f = d.open_file(&path, true).unwrap();
        d.buf_mut(BufId(0)).unwrap()[..K4].fill(0x5a);
        d.submit(&[Op::Write { file: f, buf: BufId(0), span: 0..K4, offset: 0 }, Op::Sync { file: f }], 1).unwrap();
        let done = wait_one(&mut d);
        let on_disk = std::fs::read(&path);
        let _ = std::fs::remove_file(&path);
        done.result.unwrap();
        assert!(on_disk.unwrap() == vec![0x5a; K4], "{name}: the bytes did not land");
    });
}
