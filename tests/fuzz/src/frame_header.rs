//! Frames off the wire: [`Header::decode`], [`ShortHeader::expand`], the streaming
//! [`FrameReader`] fed the bytes in arbitrary pieces, the [`Inflater`], and the body helpers
//! (`keys_and_rest`, `keys_and_values`, `cast_slice`).
//!
//! Input: a mode byte (bits 0-2 pick the frame limit, bit 3 re-seals every header in the
//! stream so that mutations get past the header checksum), a byte picking the reader's chunk
//! size, a u64 seeding the read schedule (piece sizes, `WouldBlock`, `Interrupted`), then the
//! stream.

use std::io::{self, Read};

use tessera_transport::buf::{Deflater, Filled, FrameReader, Inflater};
use tessera_transport::config::FRAME_BYTES_MAX_DEFAULT;
use tessera_transport::wire::{self, flags, Header, Op, ShortHeader, Status, HEADER_BYTES, MAGIC, SHORT_HEADER_BYTES, VERSION};
use tessera_transport::TransportError;
use zerocopy::{FromBytes, IntoBytes};

use crate::{Input, Output, Seed};

/// Frame limits to decode against: degenerate ones, the hello limit (4 KiB), and the default.
/// The 4 GiB ceiling is left out: a frame that big is legal there, and would only measure
/// how fast the fuzzer runs out of memory.
const LIMITS: [usize; 8] = [0, HEADER_BYTES, 100, 4 << 10, (4 << 10) + 8, 64 << 10, 1 << 20, FRAME_BYTES_MAX_DEFAULT];
const READ_CHUNKS: [usize; 4] = [1, 64, 4096, 256 << 10];
const RESEAL: u8 = 8;

/// Runs one input; returns how many frames the reader returned, plus one if the stream starts
/// with a good short header.
pub fn run(data: &[u8]) -> usize {
    let mut input = Input::new(data);
    let mode = input.u8();
    let limit = LIMITS[(mode & 7) as usize];
    let read_chunk = READ_CHUNKS[(input.u8() % 4) as usize];
    let schedule = input.u64();
    let mut stream = input.rest().to_vec();
    if mode & RESEAL != 0 {
        reseal(&mut stream);
    }
    check_decode(&stream, limit);
    let short = check_expand(&stream, schedule, limit);
    read_stream(&stream, limit, read_chunk, schedule) + usize::from(short)
}

/// Seals every header the stream's own lengths lead to, as a sender would have.
fn reseal(stream: &mut [u8]) {
    let mut at = 0usize;
    while let Some(bytes) = stream.get_mut(at..at + HEADER_BYTES) {
        let mut h = Header::read_from_bytes(bytes).expect("a whole header");
        h.seal();
        bytes.copy_from_slice(h.as_bytes());
        at += h.frame_len();
    }
}

fn check_decode(bytes: &[u8], limit: usize) {
    match Header::decode(bytes, limit) {
        Ok(h) => {
            assert_eq!(h.as_bytes(), &bytes[..HEADER_BYTES], "a header is read in place");
            assert_eq!((h.magic, h.version), (MAGIC, VERSION));
            assert!(h.op().is_some() && h.flags & !flags::KNOWN == 0, "{h:?}");
            assert!(h.frame_len() <= limit, "frame of {} over the limit {limit}", h.frame_len());
            assert!(HEADER_BYTES + h.raw_len as usize <= limit, "inflates to {} over the limit {limit}", h.raw_len);
            if h.flags & flags::COMPRESSED == 0 {
                assert_eq!(h.raw_len, h.body_len);
            }
            let mut resealed = h;
            resealed.seal();
            assert_eq!(resealed, h, "only a sealed header decodes");
        }
        Err(TransportError::FrameTooLarge { bytes, limit: l }) => assert!(l == limit && bytes > limit, "{bytes} {l} {limit}"),
        Err(TransportError::Malformed { .. }) => {}
        Err(e) => panic!("Header::decode failed with {e:?}"),
    }
}

fn check_expand(bytes: &[u8], request_id: u64, limit: usize) -> bool {
    let Ok(h) = ShortHeader::expand(bytes, request_id, limit) else { return false };
    let s = ShortHeader::read_from_prefix(bytes).expect("expand read one").0;
    assert_eq!(ShortHeader::shorten(&h), Some(s), "a short header stands for exactly one header");
    assert_eq!((h.magic, h.version, h.request_id), (MAGIC, VERSION, request_id));
    assert!(h.flags & flags::COMPRESSED == 0 && h.raw_len == h.body_len, "{h:?}");
    assert!(s.frame_len() <= limit);
    // Sealed, its long form decodes as itself wherever the longer header fits.
    let mut sealed = h;
    sealed.seal();
    let room = limit.saturating_add(HEADER_BYTES - SHORT_HEADER_BYTES);
    assert_eq!(Header::decode(sealed.as_bytes(), room).expect("the long form of a short header"), sealed);
    true
}

/// Hands out the stream in pieces a seeded schedule picks, with `WouldBlock` and `Interrupted`
/// between them, as a non-blocking socket does.
struct Trickle<'a> {
    data: &'a [u8],
    rng: u64,
}

impl Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let r = self.rng;
        match r % 16 {
            0 => return Err(io::ErrorKind::WouldBlock.into()),
            1 => return Err(io::ErrorKind::Interrupted.into()),
            _ => {}
        }
        let piece = match (r >> 4) % 4 {
            0 => 1 + (r >> 8) as usize % 8,
            1 => 1 + (r >> 8) as usize % 100,
            2 => 1 + (r >> 8) as usize % 5000,
            _ => usize::MAX,
        };
        let n = piece.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Reads the stream through a [`FrameReader`]: every frame it returns is the next one of the
/// stream, whole, aligned and within the limit; it stops only at a header that does not decode.
fn read_stream(stream: &[u8], limit: usize, read_chunk: usize, schedule: u64) -> usize {
    let mut src = Trickle { data: stream, rng: schedule | 1 };
    let mut reader = FrameReader::new(limit, read_chunk);
    let (mut inflater, mut deflater) = (Inflater::default(), Deflater::default());
    let (mut at, mut frames) = (0usize, 0);
    // A pathological schedule is still bounded: each read moves a byte or is one of two misses.
    for _ in 0..stream.len() * 8 + 64 {
        match reader.fill(&mut src).expect("the schedule injects no real errors") {
            Filled::Eof => break,
            Filled::Bytes(_) | Filled::Drained(_) | Filled::WouldBlock => {}
        }
        loop {
            match reader.next_frame() {
                Ok(Some((h, range))) => {
                    let body = reader.body(range);
                    assert_eq!(h.as_bytes(), &stream[at..at + HEADER_BYTES], "frames come in order, none skipped");
                    assert_eq!(body, &stream[at + HEADER_BYTES..][..h.body_len as usize]);
                    assert!(body.as_ptr().align_offset(8) == 0, "bodies are read in place, aligned");
                    assert!(h.frame_len() <= limit);
                    at += h.frame_len();
                    frames += 1;
                    check_body(&h, body, &mut inflater, &mut deflater);
                }
                Ok(None) => break,
                Err(_) => {
                    // The stream cannot be parsed any further, and the reader says so only for
                    // a header that is bad in itself.
                    assert!(Header::decode(&stream[at..], limit).is_err(), "refused a good header at {at}");
                    return frames;
                }
            }
        }
    }
    if !src.data.is_empty() {
        return frames; // the schedule ran out of turns; nothing more to check
    }
    assert_eq!(reader.buffered(), stream.len() - at, "every byte is a frame or still buffered");
    let partial = reader.partial();
    assert_eq!(partial.as_ref().map(|p| p.1), (at < stream.len()).then_some(stream.len() - at));
    if let Some((Some(h), n)) = partial {
        if Header::decode(&stream[at..], limit).is_ok() {
            assert!(n < h.frame_len(), "a whole frame was left unread");
        }
    }
    frames
}

fn check_body(h: &Header, body: &[u8], inflater: &mut Inflater, deflater: &mut Deflater) {
    let raw = match inflater.inflate(h, body) {
        Ok(raw) => raw.to_vec(),
        Err(e) => {
            assert!(h.flags & flags::COMPRESSED != 0, "an uncompressed body cannot fail to inflate: {e}");
            return;
        }
    };
    assert_eq!(raw.len(), h.raw_len as usize, "inflates to what the header says");
    if h.flags & flags::COMPRESSED == 0 {
        assert_eq!(raw, body);
    } else {
        // What came out goes back in and out again unchanged.
        let mut again = *h;
        let parts = [&raw[..]];
        let packed = deflater.frame_body(&mut again, &parts, true).parts().concat();
        assert_eq!(inflater.inflate(&again, &packed).expect("our own compression"), &raw[..]);
    }
    let (words, len) = crate::aligned(&raw);
    check_layout(h.count as usize, &bytemuck::cast_slice::<u64, u8>(&words)[..len]);
}

/// The body helpers split exactly when the lengths allow, and never panic.
fn check_layout(count: usize, body: &[u8]) {
    let key_bytes = count.checked_mul(8).filter(|b| *b <= body.len());
    match wire::keys_and_rest(body, count) {
        Ok((keys, rest)) => {
            assert_eq!(keys.len(), count);
            assert_eq!(keys.as_bytes(), &body[..count * 8]);
            assert_eq!(rest, &body[count * 8..]);
        }
        Err(_) => assert!(key_bytes.is_none(), "{count} keys fit in {} bytes", body.len()),
    }
    match wire::keys_and_values(body, count) {
        Ok((keys, values)) => assert_eq!(keys.len() * 8 + values.len() * 4, body.len()),
        Err(_) => assert!(key_bytes.is_none_or(|k| !(body.len() - k).is_multiple_of(4))),
    }
    assert_eq!(wire::cast_slice::<f32>(body, "values").is_ok(), body.len().is_multiple_of(4));
    if body.len() > 1 {
        assert!(wire::cast_slice::<u64>(&body[1..], "keys").is_err(), "a misaligned view is refused");
    }
}

/// A sealed request or reply, its body compressed when `compress` and that pays.
fn frame(mut h: Header, body: &[u8], compress: bool) -> Vec<u8> {
    let mut deflater = Deflater::default();
    let parts = [body];
    let packed = deflater.frame_body(&mut h, &parts, compress).parts().concat();
    h.seal();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&packed);
    out.resize(HEADER_BYTES + wire::padded(packed.len()), 0);
    out
}

fn push(id: u64, keys: &[u64], values: &[f32], compress: bool) -> Vec<u8> {
    let mut h = Header::request(Op::Push, id);
    (h.table, h.worker, h.clock, h.count, h.dim) = (1, 3, 7, keys.len() as u32, (values.len() / keys.len().max(1)) as u32);
    let mut body = keys.as_bytes().to_vec();
    body.extend_from_slice(values.as_bytes());
    frame(h, &body, compress)
}

fn seed(limit: u8, reseal: bool, read_chunk: u8, schedule: u64, stream: &[u8]) -> Vec<u8> {
    let mut out = Output::default();
    out.u8(limit | if reseal { RESEAL } else { 0 }).u8(read_chunk).u64(schedule).bytes(stream);
    out.0
}

/// A hello, pushes plain and compressed, a pull, a dense range, replies (one an error), a
/// stream of several in a row, and a short header.
pub fn seeds() -> Vec<Seed> {
    let hello = {
        let mut h = Header::request(Op::Hello, 1);
        h.start = wire::CONTROL_SHARD;
        frame(h, br#"{"worker":0}"#, false)
    };
    let plain = push(2, &[1, 5, 9], &[0.5, -1.0, 2.0, 0.0, 1e-3, 7.0], false);
    let packed = push(3, &[0; 64], &[0.0; 128], true);
    let pull = {
        let mut h = Header::request(Op::Pull, 4);
        (h.table, h.count, h.dim) = (1, 2, 2);
        frame(h, [4u64, 8].as_bytes(), false)
    };
    let range = {
        let mut h = Header::request(Op::PushRange, 5);
        (h.table, h.start, h.count, h.dim, h.flags) = (0, 100, 4, 1, flags::COMPRESS_REPLY);
        frame(h, [1.0f32; 4].as_bytes(), false)
    };
    let reply = {
        let request = Header::request(Op::Pull, 4);
        let mut h = Header::reply_to(&request, Status::Ok);
        h.count = 2;
        let mut body = [3u64, 4].as_bytes().to_vec();
        body.extend_from_slice([0.25f32; 4].as_bytes());
        frame(h, &body, false)
    };
    let refused = frame(Header::reply_to(&Header::request(Op::Push, 9), Status::KeyOutOfRange), b"key 99 is outside table 1", false);
    let short = {
        let mut h = Header::request(Op::Push, 6);
        (h.body_len, h.raw_len, h.count, h.dim, h.table) = (24, 24, 1, 4, 2);
        let s = ShortHeader::shorten(&h).expect("fits");
        let mut out = s.as_bytes().to_vec();
        out.extend_from_slice(&[0u8; 24]);
        out
    };
    let stream: Vec<u8> = [&hello[..], &plain, &packed, &pull, &range, &reply, &refused].concat();
    vec![
        ("hello", seed(3, false, 2, 1, &hello)),
        ("push", seed(7, false, 1, 2, &plain)),
        ("push-compressed", seed(7, false, 2, 3, &packed)),
        ("pull", seed(5, false, 0, 4, &pull)),
        ("push-range", seed(6, true, 3, 5, &range)),
        ("reply", seed(7, false, 2, 6, &reply)),
        ("reply-error", seed(4, false, 2, 7, &refused)),
        ("stream", seed(7, false, 0, 0x9e37_79b9_7f4a_7c15, &stream)),
        ("stream-resealed", seed(5, true, 1, 42, &stream)),
        ("short-header", seed(6, false, 2, 6, &short)),
    ]
}
