//! The checkpoint format on valid input and on damaged copies of it.

use tessera_layout::TableKind;

use super::*;

fn header(payload_len: usize) -> ChunkHeader {
    ChunkHeader {
        checkpoint: 4,
        table: 2,
        shard: 1,
        chunk: 9,
        first_slot: 9 * 16,
        slots: 16,
        payload_len: payload_len as u32,
        lsn: 77,
        ..ChunkHeader::default()
    }
}

/// A sealed chunk with a recognisable payload, in an 8-byte aligned buffer.
fn sealed(payload_len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; ChunkHeader::disk_len(payload_len)];
    for (i, b) in buf[CHUNK_HEADER_BYTES..CHUNK_HEADER_BYTES + payload_len].iter_mut().enumerate() {
        *b = (i * 13 + 1) as u8;
    }
    let len = header(payload_len).seal(&mut buf);
    assert_eq!(len, buf.len());
    buf
}

#[test]
fn a_chunk_round_trips_and_is_padded_to_pages() {
    for payload in [0, 1, 4032, 4033, 70_000] {
        let buf = sealed(payload);
        assert_eq!(buf.len() % IO_ALIGN_BYTES, 0);
        let (h, body) = ChunkHeader::open(&buf, "test chunk").unwrap();
        assert_eq!((h.magic, h.table, h.chunk, h.lsn, h.payload_len as usize), (CHUNK_MAGIC, 2, 9, 77, payload));
        assert_eq!(body.len(), payload);
        assert!(body.iter().enumerate().all(|(i, b)| *b == (i * 13 + 1) as u8));
    }
}

#[test]
fn every_bit_flip_in_a_chunk_is_caught() {
    let good = sealed(200);
    for byte in 0..CHUNK_HEADER_BYTES + 200 {
        let mut bad = good.clone();
        bad[byte] ^= 0x10;
        let err = ChunkHeader::open(&bad, "data-00000004.ckpt at 8192").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("data-00000004.ckpt at 8192 is corrupt"), "byte {byte}: {text}");
    }
}

#[test]
fn a_short_or_zeroed_chunk_is_caught() {
    let good = sealed(5000);
    assert!(ChunkHeader::open(&good[..30], "c").unwrap_err().to_string().contains("shorter"));
    assert!(ChunkHeader::open(&good[..4096], "c").unwrap_err().to_string().contains("runs past"));
    assert!(ChunkHeader::open(&vec![0; 8192], "c").unwrap_err().to_string().contains("bad magic"));
}

fn manifest() -> Manifest {
    let mut spec = TableSpec::new("w", TableKind::Dense, 0, 100, 2);
    spec.updater = "adam{lr=0.01}".into();
    Manifest {
        version: MANIFEST_VERSION,
        seq: 12,
        shard: 0,
        lsn: 4411,
        wal: "wal-00000012.log".into(),
        tables: vec![PartManifest {
            table: 0,
            spec,
            owned: (0, 50),
            step: 91,
            chunk_slots: 32,
            clocks: vec![(0, vec![3, 4]), (10, vec![3, 5])],
            chunks: vec![ChunkRef { file: 11, offset: 0, len: 4096, crc: 0xdead_beef }, ChunkRef { file: 12, offset: 4096, len: 8192, crc: 7 }],
        }],
        replica: vec![RangeHeld { range: 3, version: 19, clock: vec![4, 5], digest: Some(0xABCD) }],
    }
}

#[test]
fn a_manifest_round_trips() {
    let m = manifest();
    let bytes = m.encode();
    assert_eq!(bytes.len() % IO_ALIGN_BYTES, 0);
    assert_eq!(Manifest::decode(&bytes, "MANIFEST-00000012").unwrap(), m);
}

/// A manifest whose checksum holds but whose log position is the last one is refused, not
/// overflowed when recovery starts the log after it (the fuzz target `wal_reader` found the
/// same overflow in the log reader).
#[test]
fn a_manifest_at_the_last_log_position_is_refused() {
    let m = Manifest { lsn: u64::MAX, ..manifest() };
    let err = Manifest::decode(&m.encode(), "M").unwrap_err().to_string();
    assert!(err.contains("no room"), "{err}");
}

#[test]
fn a_damaged_manifest_is_refused_with_a_reason() {
    let bytes = manifest().encode();
    let text_len = bytes.iter().position(|b| *b == 0).unwrap();
    for byte in (0..text_len).step_by(7) {
        let mut bad = bytes.clone();
        bad[byte] = if bad[byte] == b'1' { b'2' } else { b'1' };
        let err = Manifest::decode(&bad, "MANIFEST-00000012").unwrap_err().to_string();
        assert!(err.starts_with("MANIFEST-00000012 is corrupt"), "byte {byte}: {err}");
    }
    // Cut short (a crash mid-write that somehow got renamed, or a truncated copy).
    let err = Manifest::decode(&bytes[..text_len / 2], "M").unwrap_err().to_string();
    assert!(err.contains("is corrupt"), "{err}");
    assert!(Manifest::decode(&[], "M").is_err());
}

#[test]
fn file_names_carry_the_sequence_number() {
    assert_eq!(Manifest::file_name(12), "MANIFEST-00000012");
    assert_eq!(Manifest::seq_of("MANIFEST-00000012"), Some(12));
    assert_eq!(Manifest::data_file_name(3), "data-00000003.ckpt");
    for not in ["MANIFEST-12", "MANIFEST-0000001x", "MANIFEST-00000012.tmp", "data-00000012.ckpt"] {
        assert_eq!(Manifest::seq_of(not), None, "{not}");
    }
}
