//! The write-ahead log's replaying reader ([`tessera_engine::persist::wal::Reader`]).
//!
//! Two kinds of input, by the first byte's low bit:
//! - **raw** (0): a u64 first LSN, then the log's bytes as they are. Whatever the reader returns
//!   must be a well-formed record in sequence, that encodes and reads back as itself.
//! - **written** (1): commits of records described by the input, written by the real writer
//!   ([`Batch`], [`Record::encode`]), then damaged the way crashes and disks do (bit flips,
//!   a cut, a lost page). What the reader returns must be exactly a prefix of what was written:
//!   never a damaged record, never one out of order.

use tessera_engine::config::IO_ALIGN_BYTES;
use tessera_engine::persist::wal::{Batch, Reader, Record, Stop, Target, RECORD_HEADER_BYTES};
use zerocopy::IntoBytes;

use crate::{Input, Output, Seed};

const WRITTEN: u8 = 1;
/// Bit flips per log at most. CRC-32C catches every pattern of up to three flipped bits in a
/// record of these sizes (its Hamming distance is at least 4 up to 2^31 bits), so a record
/// with at most three flips can never read back as valid with a wrong body.
const FLIPS_MAX: usize = 3;

/// Runs one input; returns how many records the reader returned.
pub fn run(data: &[u8]) -> usize {
    let mut input = Input::new(data);
    if input.u8() & 1 == WRITTEN {
        written(&mut input)
    } else {
        let first_lsn = input.u64();
        let (words, len) = crate::aligned(input.rest());
        walk(&words.as_bytes()[..len], first_lsn).len()
    }
}

/// Replays `log` from `first_lsn`, checking what the reader promises about each record and
/// where it stops; returns the records.
fn walk(log: &[u8], first_lsn: u64) -> Vec<Record<'_>> {
    let mut reader = Reader::new(log, first_lsn);
    let mut records = Vec::new();
    let mut expected = first_lsn;
    for r in reader.by_ref() {
        assert_eq!(r.lsn, expected, "records come in LSN order");
        expected = expected.wrapping_add(1);
        assert!(r.dim > 0);
        let inside = |p: *const u8, n: usize| p as usize >= log.as_ptr() as usize && p as usize + n <= log.as_ptr() as usize + log.len();
        match r.target {
            Target::Keys(keys) => assert_eq!(r.values.len(), keys.len() * r.dim as usize),
            Target::Range { .. } => assert_eq!(r.values.len() % r.dim as usize, 0),
            Target::Replica { range, version, flags, clock } => {
                assert_eq!((r.dim, r.table, r.clock, r.worker), (1, range, version, flags), "a replica record's header says what it is");
                assert_eq!(flags & !tessera_engine::persist::wal::replica_flags::ALL, 0, "only known flags");
                assert!(inside(clock.as_ptr().cast(), clock.len() * 4), "its clock is read in place");
            }
        }
        assert!(inside(r.values.as_ptr().cast(), r.values.len() * 4), "values are read in place");
        // Written again, the record reads back as itself.
        let mut out = vec![0u64; r.encoded_len().div_ceil(8)];
        assert_eq!(r.encode(out.as_mut_bytes()), r.encoded_len());
        let again: Vec<Record<'_>> = Reader::new(out.as_bytes(), r.lsn).take(1).collect();
        assert!(again.len() == 1 && same(&again[0], &r), "a record survives its own encoding: {r:?} read back as {again:?}");
        records.push(r);
    }
    assert_eq!(reader.next_lsn(), expected);
    let resume = reader.resume_offset();
    assert!(resume.is_multiple_of(IO_ALIGN_BYTES as u64), "appending resumes on a page boundary");
    assert!(resume as usize <= log.len().next_multiple_of(IO_ALIGN_BYTES));
    match reader.stop().expect("a finished walk says why") {
        Stop::End => {}
        Stop::Torn { offset, .. } | Stop::Gap { offset, .. } => {
            assert!(*offset as usize <= log.len());
            assert_eq!(resume, offset.next_multiple_of(IO_ALIGN_BYTES as u64), "appending resumes past the damage");
        }
    }
    records
}

/// Records equal field by field, values bit for bit (a gradient may be NaN: the log keeps
/// whatever the shard applied).
fn same(a: &Record<'_>, b: &Record<'_>) -> bool {
    let bits = |r: &Record<'_>| r.values.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    (a.lsn, a.table, a.worker, a.clock, a.dim, a.target) == (b.lsn, b.table, b.worker, b.clock, b.dim, b.target) && bits(a) == bits(b)
}

/// One record as the input describes it, owning its keys, clock and values.
struct Owned {
    lsn: u64,
    table: u32,
    worker: u32,
    clock: u64,
    dim: u32,
    shape: Shape,
    values: Vec<f32>,
}

/// What a described record is: a chain replica's (what servers write), or a raw push of
/// listed keys or of a range (what servers wrote before every server ran the chain protocol,
/// which the reader still reads so that recovery can refuse it by name).
enum Shape {
    Replica { flags: u32, clock: Vec<u32> },
    Keys(Vec<u64>),
    Range(u64),
}

impl Owned {
    fn record(&self) -> Record<'_> {
        let (target, table, worker, clock, dim) = match &self.shape {
            // A replica record's header carries the range, flags and version (see the module
            // doc of the log), and its dim is 1.
            Shape::Replica { flags, clock } => {
                (Target::Replica { range: self.table, version: self.clock, flags: *flags, clock }, self.table, *flags, self.clock, 1)
            }
            Shape::Keys(keys) => (Target::Keys(keys), self.table, self.worker, self.clock, self.dim),
            Shape::Range(start) => (Target::Range { start: *start }, self.table, self.worker, self.clock, self.dim),
        };
        Record { lsn: self.lsn, table, worker, clock, dim, target, values: &self.values }
    }
}

/// Bit of a described record's shape byte that makes it a replica record.
const REPLICA: u8 = 16;
/// Bit of a described raw push's shape byte that makes it a push of a range, not of keys.
const RANGE: u8 = 8;

fn describe(input: &mut Input<'_>, lsn: u64) -> Owned {
    let shape = input.u8();
    let dim = 1 + u32::from(shape & 7);
    let count = usize::from(input.u8() % 17);
    let (table, worker, clock) = (u32::from(input.u8()), u32::from(input.u8()), input.u64());
    let shape = if shape & REPLICA != 0 {
        // `count` clock words, then `count * dim` words of state.
        let flags = worker & tessera_engine::persist::wal::replica_flags::ALL;
        Shape::Replica { flags, clock: (0..count).map(|_| input.u32()).collect() }
    } else if shape & RANGE == 0 {
        Shape::Keys((0..count).map(|_| input.u64()).collect())
    } else {
        Shape::Range(input.u64())
    };
    let values = (0..count * dim as usize).map(|_| f32::from_bits(input.u32())).collect();
    Owned { lsn, table, worker, clock, dim, shape, values }
}

/// The commits the input describes, from its first LSN on.
fn describe_commits(input: &mut Input<'_>) -> (u64, Vec<Vec<Owned>>) {
    let first_lsn = input.u64();
    let mut commits: Vec<Vec<Owned>> = Vec::new();
    // LSNs the shard can assign: counting from 1, it never reaches the last one (which the
    // reader refuses, as there would be no LSN after it).
    let mut lsn = Some(first_lsn).filter(|l| *l < u64::MAX);
    for _ in 0..1 + input.u8() % 4 {
        let mut commit = Vec::new();
        for _ in 0..1 + input.u8() % 4 {
            let Some(l) = lsn else { break };
            commit.push(describe(input, l));
            lsn = Some(l + 1).filter(|l| *l < u64::MAX);
        }
        if !commit.is_empty() {
            commits.push(commit);
        }
    }
    (first_lsn, commits)
}

/// The log the shard writes for `commits`: each from a page boundary, padded to whole pages.
fn write_log(commits: &[Vec<Owned>]) -> Vec<u64> {
    let pages: usize = commits.iter().map(|c| c.iter().map(|r| r.record().encoded_len()).sum::<usize>().div_ceil(IO_ALIGN_BYTES)).sum();
    let mut log = vec![0u64; pages * IO_ALIGN_BYTES / 8];
    let mut at = 0;
    for commit in commits {
        let buf = &mut log.as_mut_bytes()[at..];
        let mut batch = Batch::default();
        for r in commit {
            batch.append(buf, &r.record()).expect("sized for it");
        }
        assert_eq!(batch.records(), commit.len() as u64);
        at += batch.seal(buf);
    }
    assert_eq!(at, log.len() * 8, "commits are whole pages");
    log
}

fn written(input: &mut Input<'_>) -> usize {
    let (first_lsn, commits) = describe_commits(input);
    let mut log = write_log(&commits);
    let wrote: Vec<Record<'_>> = commits.iter().flatten().map(Owned::record).collect();
    // Just past the last record: a cut before it loses a record even where the bytes cut off
    // are zeros.
    let last: usize = commits.last().map_or(0, |c| c.iter().map(|r| r.record().encoded_len()).sum());
    let records_end = log.len() * 8 - last.next_multiple_of(IO_ALIGN_BYTES) + last;
    let (damaged, len) = damage(input, log.as_mut_bytes(), records_end);
    let got = walk(&log.as_bytes()[..len], first_lsn);
    let prefix = got.len() <= wrote.len() && got.iter().zip(&wrote).all(|(g, w)| same(g, w));
    assert!(prefix, "a damaged log replays a prefix of what was written");
    assert!(damaged || got.len() == wrote.len(), "an undamaged log replays whole");
    got.len()
}

/// Damages `log` as the input says: bit flips, a lost (zeroed) page, a cut. Returns whether
/// anything changed (the log's records end at `records_end`), and the log's new length.
fn damage(input: &mut Input<'_>, log: &mut [u8], records_end: usize) -> (bool, usize) {
    let mut len = log.len();
    let mut changed = false;
    let mut flips = 0;
    while !input.is_empty() && len > 0 {
        match input.u8() % 3 {
            0 if flips < FLIPS_MAX => {
                let at = input.u32() as usize % len;
                log[at] ^= 1 << (input.u8() % 8);
                flips += 1;
                changed = true;
            }
            1 => {
                let page = input.u8() as usize % len.div_ceil(IO_ALIGN_BYTES);
                let span = page * IO_ALIGN_BYTES..((page + 1) * IO_ALIGN_BYTES).min(len);
                changed |= log[span.clone()].iter().any(|b| *b != 0);
                log[span].fill(0);
            }
            2 => {
                let cut = input.u32() as usize % (len + 1);
                changed |= cut < records_end || log[cut..len].iter().any(|b| *b != 0);
                len = cut;
            }
            _ => break,
        }
    }
    (changed, len)
}

/// Describes a record (dim, count, table, worker, clock, then its keys, start or clock words,
/// then its values) as [`describe`] reads it: a raw push of `keys`, or of three keys from
/// `start` when `keys` is `None`; a replica record of range `table` with `flags` and three
/// clock words when `replica` gives its flags.
fn describe_out(out: &mut Output, dim: u8, keys: Option<&[u64]>, start: u64, clock: u64, replica: Option<u8>) {
    let count = keys.map_or(3, |k| k.len());
    let shape = (dim - 1)
        | if replica.is_some() {
            REPLICA
        } else if keys.is_none() {
            RANGE
        } else {
            0
        };
    out.u8(shape).u8(count as u8).u8(2).u8(replica.unwrap_or(1)).u64(clock);
    match (replica, keys) {
        (Some(_), _) => (0..count).for_each(|i| {
            out.u32(7 + i as u32);
        }),
        (None, Some(keys)) => keys.iter().for_each(|k| {
            out.u64(*k);
        }),
        (None, None) => {
            out.u64(start);
        }
    }
    for i in 0..count * dim as usize {
        out.u32((i as f32 * 0.5 - 1.0).to_bits());
    }
}

/// A real log (commits, records across a page boundary) read raw, the same described for the
/// written mode with and without damage, and a log that starts at the wrong LSN.
pub fn seeds() -> Vec<Seed> {
    let mut described = Output::default();
    described.u8(WRITTEN).u64(1).u8(1); // first LSN 1, two commits
    described.u8(2); // three records
    describe_out(&mut described, 2, Some(&[5, 1, 9]), 0, 1, None);
    describe_out(&mut described, 1, None, 100, 1, None);
    describe_out(&mut described, 1, None, 0, 4, Some(8)); // an update with its digest
    described.u8(1); // two records
    describe_out(&mut described, 4, Some(&[u64::MAX, 0]), 0, 2, None);
    describe_out(&mut described, 3, None, 0, 5, Some(1)); // a snapshot, 3 x 3 words of state
    let clean = described.0.clone();
    let mut flipped = Output(clean.clone());
    flipped.u8(0).u32(4096 + 60).u8(3);
    let mut cut = Output(clean.clone());
    cut.u8(2).u32(4100);
    let mut lost = Output(clean.clone());
    lost.u8(1).u8(1);

    // The same records written by the real writer, as a log file holds them.
    let (_, commits) = describe_commits(&mut Input::new(&clean[1..]));
    let log = write_log(&commits);
    let log = log.as_bytes();
    // Just past the last record: a log whose last commit's padding never reached the disk.
    let last: usize = commits.last().expect("two commits").iter().map(|r| r.record().encoded_len()).sum();
    let end = log.len() - last.next_multiple_of(IO_ALIGN_BYTES) + last;
    let raw = |first: u64, bytes: &[u8]| {
        let mut out = Output::default();
        out.u8(0).u64(first).bytes(bytes);
        out.0
    };
    assert!(end > IO_ALIGN_BYTES + RECORD_HEADER_BYTES, "the seed log has two commits");
    vec![
        ("raw-log", raw(1, &log[..end])),
        ("raw-log-padded", raw(1, log)),
        ("raw-log-gap", raw(7, &log[..end])),
        ("raw-empty", raw(1, &[])),
        ("written", clean),
        ("written-flipped", flipped.0),
        ("written-cut", cut.0),
        ("written-lost-page", lost.0),
    ]
}
