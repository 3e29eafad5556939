//! The log format on valid input, and on every way a crash or a bad disk can damage it.

use super::*;

const PAGE: usize = IO_ALIGN_BYTES;

/// An 8-byte aligned byte buffer of `pages` zeroed pages.
fn pages(n: usize) -> Vec<u64> {
    vec![0u64; n * PAGE / 8]
}

fn bytes(words: &mut [u64]) -> &mut [u8] {
    words.as_mut_bytes()
}

fn keys_record(lsn: u64, keys: &'static [u64], values: &'static [f32]) -> Record<'static> {
    Record { lsn, table: 3, worker: 2, clock: 9, dim: (values.len() / keys.len()) as u32, target: Target::Keys(keys), values }
}

fn range_record(lsn: u64, start: u64, values: &'static [f32]) -> Record<'static> {
    Record { lsn, table: 1, worker: 0, clock: lsn, dim: 1, target: Target::Range { start }, values }
}

/// Writes `commits` (lists of records) the way the shard does, each from a page boundary.
fn log_of(commits: &[Vec<Record<'static>>]) -> (Vec<u64>, Vec<usize>) {
    let mut log = pages(4 * commits.len().max(1));
    let mut at = 0;
    let mut starts = Vec::new();
    for commit in commits {
        let buf = &mut bytes(&mut log)[at..];
        let mut batch = Batch::default();
        for r in commit {
            starts.push(at + batch.len);
            batch.append(buf, r).unwrap();
        }
        at += batch.seal(buf);
    }
    log.truncate(at / 8);
    (log, starts)
}

fn replay(log: &[u64], first: u64) -> (Vec<u64>, Stop) {
    let mut reader = Reader::new(log.as_bytes(), first);
    let lsns = reader.by_ref().map(|r| r.lsn).collect();
    (lsns, reader.stop().cloned().expect("a finished walk says why"))
}

#[test]
fn records_round_trip_across_commits_and_pages() {
    let commits = vec![
        vec![keys_record(10, &[5, 1, 9], &[1.0, -2.0, 3.5]), range_record(11, 100, &[0.25; 1000])],
        vec![range_record(12, 7, &[4.0])],
        vec![keys_record(13, &[u64::MAX], &[f32::MIN_POSITIVE, 2.0])],
    ];
    let (log, _) = log_of(&commits);
    assert_eq!(log.len() * 8 % PAGE, 0, "commits are whole pages");
    let mut reader = Reader::new(log.as_bytes(), 10);
    let got: Vec<Record<'_>> = reader.by_ref().collect();
    let want: Vec<Record<'_>> = commits.into_iter().flatten().collect();
    assert_eq!(got, want);
    assert_eq!(reader.stop(), Some(&Stop::End));
    assert_eq!(reader.next_lsn(), 14);
    assert_eq!(reader.resume_offset(), log.len() as u64 * 8);
}

#[test]
fn an_empty_or_all_zero_log_is_a_clean_end() {
    assert_eq!(replay(&[], 1), (vec![], Stop::End));
    assert_eq!(replay(&pages(2), 1), (vec![], Stop::End));
}

#[test]
fn a_bit_flip_anywhere_in_a_record_stops_the_replay_there() {
    let (log, starts) = log_of(&[vec![range_record(1, 0, &[1.0; 8]), range_record(2, 8, &[2.0; 8])], vec![range_record(3, 0, &[3.0])]]);
    let second = starts[1];
    let second_len = range_record(2, 8, &[2.0; 8]).encoded_len();
    for byte in second..second + second_len {
        for bit in [0, 7] {
            let mut damaged = log.clone();
            bytes(&mut damaged)[byte] ^= 1 << bit;
            let (lsns, stop) = replay(&damaged, 1);
            assert_eq!(lsns, vec![1], "flip at byte {byte} bit {bit}");
            assert!(matches!(&stop, Stop::Torn { offset, .. } if *offset == second as u64), "flip at byte {byte} bit {bit}: {stop:?}");
        }
    }
}

#[test]
fn a_torn_commit_keeps_every_record_before_it() {
    let (log, starts) = log_of(&[vec![range_record(1, 0, &[1.0; 8])], vec![range_record(2, 0, &[2.0; 2000]), range_record(3, 0, &[3.0])]]);
    // The second commit spans three pages; a crash persisted only some of them.
    for lost_page in 1..log.len() * 8 / PAGE {
        let mut torn = log.clone();
        bytes(&mut torn)[lost_page * PAGE..(lost_page + 1) * PAGE].fill(0);
        let (lsns, stop) = replay(&torn, 1);
        assert_eq!(lsns, vec![1], "page {lost_page} lost: {stop:?}");
        assert!(matches!(stop, Stop::Torn { .. } | Stop::End), "{stop:?}");
    }
    // Cut short mid-record.
    let cut = &log[..(starts[1] + 100) / 8];
    let (lsns, stop) = replay(cut, 1);
    assert_eq!(lsns, vec![1]);
    assert!(matches!(stop, Stop::Torn { offset, .. } if offset == starts[1] as u64), "{stop:?}");
}

#[test]
fn an_lsn_out_of_sequence_is_a_gap() {
    let (log, starts) = log_of(&[vec![range_record(1, 0, &[1.0]), range_record(5, 0, &[1.0])]]);
    assert_eq!(replay(&log, 1), (vec![1], Stop::Gap { offset: starts[1] as u64, expected: 2, found: 5 }));
    // A log that starts elsewhere than the checkpoint expects replays nothing.
    assert!(matches!(replay(&log, 7).1, Stop::Gap { expected: 7, found: 1, .. }));
}

#[test]
fn garbage_in_a_commits_padding_is_caught() {
    let (mut log, _) = log_of(&[vec![range_record(1, 0, &[1.0])], vec![range_record(2, 0, &[1.0])]]);
    bytes(&mut log)[PAGE - 8] = 1;
    let (lsns, stop) = replay(&log, 1);
    assert_eq!(lsns, vec![1]);
    assert!(matches!(stop, Stop::Torn { ref reason, .. } if reason.contains("padding")), "{stop:?}");
}

#[test]
fn a_body_that_disagrees_with_its_header_is_refused_even_with_a_good_checksum() {
    let (mut log, _) = log_of(&[vec![keys_record(1, &[1, 2], &[1.0, 2.0])]]);
    let b = bytes(&mut log);
    b[40..44].copy_from_slice(&3u32.to_le_bytes()); // count 3 keys, body still holds 2
    let body_len = u32::from_le_bytes(b[44..48].try_into().unwrap()) as usize;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[8..48]), &b[48..48 + body_len.next_multiple_of(8)]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    let (lsns, stop) = replay(&log, 1);
    assert!(lsns.is_empty());
    assert!(matches!(stop, Stop::Torn { ref reason, .. } if reason.contains("does not match")), "{stop:?}");
}

#[test]
fn a_batch_refuses_a_record_it_cannot_hold_and_stays_usable() {
    let mut buf = pages(1);
    let mut batch = Batch::default();
    let big = range_record(1, 0, &[0.0; 1100]);
    let err = batch.append(bytes(&mut buf), &big).unwrap_err();
    assert!(matches!(err, EngineError::LogBufferFull { .. }), "{err}");
    assert!(batch.is_empty());
    batch.append(bytes(&mut buf), &range_record(1, 0, &[1.0])).unwrap();
    assert_eq!(batch.records(), 1);
    assert_eq!(batch.seal(bytes(&mut buf)), PAGE);
}

/// Found by fuzzing (`tests/fuzz`, target `wal_reader`): a record with LSN `u64::MAX`, its
/// checksum good, overflowed the reader's next LSN (a panic with overflow checks, a wrap to 0
/// without). It is refused as damage instead.
#[test]
fn a_record_with_the_last_lsn_is_refused_not_overflowed() {
    let (log, starts) = log_of(&[vec![range_record(u64::MAX - 1, 0, &[1.0]), range_record(u64::MAX, 0, &[2.0])]]);
    let mut reader = Reader::new(log.as_bytes(), u64::MAX - 1);
    let lsns: Vec<u64> = reader.by_ref().map(|r| r.lsn).collect();
    assert_eq!(lsns, vec![u64::MAX - 1]);
    assert_eq!(reader.next_lsn(), u64::MAX);
    let stop = reader.stop().cloned().unwrap();
    assert!(matches!(stop, Stop::Torn { offset, ref reason } if offset == starts[1] as u64 && reason.contains("no room")), "{stop:?}");
}

/// Where replay stops, and what [`acknowledged_after`] finds after that point.
fn stop_and_later(log: &[u64]) -> (Stop, Option<(u64, u64)>) {
    let mut reader = Reader::new(log.as_bytes(), 1);
    reader.by_ref().for_each(drop);
    let stop = reader.stop().cloned().expect("a finished walk says why");
    let later = match &stop {
        Stop::Torn { offset, .. } => acknowledged_after(log.as_bytes(), *offset, reader.next_lsn()),
        _ => None,
    };
    (stop, later)
}

#[test]
fn damage_before_a_later_commit_is_told_apart_from_a_torn_last_commit() {
    let commits = vec![
        vec![range_record(1, 0, &[1.0; 8]), range_record(2, 8, &[2.0; 8]), range_record(3, 0, &[3.0])],
        vec![range_record(4, 0, &[4.0; 2000]), range_record(5, 0, &[5.0]), range_record(6, 0, &[6.0])],
    ];
    let (log, starts) = log_of(&commits);
    // Each record knows its place in its commit.
    let first_of = |at: usize| RecordHeader::read_from_bytes(&log.as_bytes()[at..at + RECORD_HEADER_BYTES]).unwrap().commit_first_lsn();
    assert_eq!(starts.iter().map(|at| first_of(*at)).collect::<Vec<_>>(), vec![1, 1, 1, 4, 4, 4]);
    assert_eq!(stop_and_later(&log), (Stop::End, None));

    // A bit flip in record 2: commit 1 was durable before commit 2 was written, so record 4
    // proves records 2 and 3 were acknowledged.
    let mut damaged = log.clone();
    bytes(&mut damaged)[starts[1] + 60] ^= 1;
    let (stop, later) = stop_and_later(&damaged);
    assert!(matches!(stop, Stop::Torn { .. }), "{stop:?}");
    assert_eq!(later, Some((starts[3] as u64, 4)));

    // The last commit torn (any of its pages lost, or a record in it flipped): records after
    // the damage belong to the same commit, which was never durable, so nothing is proven lost.
    for lost_page in starts[3] / PAGE..log.len() * 8 / PAGE {
        let mut torn = log.clone();
        bytes(&mut torn)[lost_page * PAGE..(lost_page + 1) * PAGE].fill(0);
        let (stop, later) = stop_and_later(&torn);
        assert!(matches!(stop, Stop::Torn { .. } | Stop::End), "page {lost_page} lost: {stop:?}");
        assert_eq!(later, None, "page {lost_page} lost");
    }
    let mut flipped = log.clone();
    bytes(&mut flipped)[starts[3] + 100] ^= 1;
    assert_eq!(stop_and_later(&flipped).1, None, "records 5 and 6 share the torn commit");

    // A log written before records said their place (every commit_index 0) still proves loss
    // by any good record past the stop.
    let mut old = damaged.clone();
    for at in &starts[3..] {
        let b = bytes(&mut old);
        b[*at + 17..*at + 20].fill(0);
        let h = RecordHeader::read_from_bytes(&b[*at..*at + RECORD_HEADER_BYTES]).unwrap();
        let len = RECORD_HEADER_BYTES + (h.body_len as usize).next_multiple_of(8);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[*at + 8..*at + RECORD_HEADER_BYTES]), &b[*at + RECORD_HEADER_BYTES..*at + len]);
        b[*at + 4..*at + 8].copy_from_slice(&crc.to_le_bytes());
    }
    assert_eq!(stop_and_later(&old).1, Some((starts[3] as u64, 4)));
}

#[test]
fn replica_records_round_trip_and_a_bad_one_is_refused() {
    static CLOCK: [u32; 3] = [4, 0, 9];
    static STATE: [f32; 5] = [1.5, -2.0, 0.0, 3.25, f32::MIN_POSITIVE];
    let replica = |lsn, flags, values: &'static [f32]| Record {
        lsn,
        table: 6,
        worker: flags,
        clock: 41,
        dim: 1,
        target: Target::Replica { range: 6, version: 41, flags, clock: &CLOCK },
        values,
    };
    let written = [
        replica(1, replica_flags::WHOLE | replica_flags::MORE, &STATE[..2]),
        replica(2, replica_flags::WHOLE, &STATE[2..]),
        replica(3, replica_flags::DROPPED, &[]),
    ];
    let (log, starts) = log_of(&[written.to_vec()]);
    let read: Vec<Record<'_>> = Reader::new(log.as_bytes(), 1).collect();
    assert_eq!(read, written);
    assert_eq!(read[1].state_bytes(), STATE[2..].as_bytes());
    // A flag this build does not know, with a good checksum, is refused as malformed.
    let mut bad = log.clone();
    let at = starts[1];
    bytes(&mut bad)[at + 24..at + 28].copy_from_slice(&64u32.to_le_bytes());
    let crc_end = RECORD_HEADER_BYTES + (written[1].encoded_len() - RECORD_HEADER_BYTES);
    let b = bytes(&mut bad);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[at + 8..at + RECORD_HEADER_BYTES]), &b[at + RECORD_HEADER_BYTES..at + crc_end]);
    b[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    let mut reader = Reader::new(bad.as_bytes(), 1);
    assert_eq!(reader.by_ref().count(), 1);
    assert!(matches!(reader.stop(), Some(Stop::Torn { reason, .. }) if reason.contains("flags")), "{:?}", reader.stop());
}
