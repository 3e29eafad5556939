//! Aligned, reusable byte buffers and the frame reader built on them.
//!
//! Buffers are backed by `Vec<u64>`, so every frame that starts at a multiple of 8 can be viewed in
//! place as keys (u64) and values (f32). They grow to the largest frame seen and are then reused:
//! the steady state does not allocate.

use std::io::{self, Read};
use std::ops::Range;

use crate::error::{Result, TransportError};
use crate::wire::{flags, Header, FRAME_ALIGN, HEADER_BYTES};

/// A growable byte buffer whose start is 8-byte aligned.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBuf {
    /// A buffer with room for `bytes` bytes.
    pub fn with_capacity(bytes: usize) -> Self {
        Self { words: vec![0; bytes.div_ceil(8)], len: 0 }
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no byte is in use.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer holds without growing.
    pub fn capacity(&self) -> usize {
        self.words.len() * 8
    }

    /// The bytes in use.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    /// The whole backing store, in use or not.
    pub fn all_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.words)
    }

    /// Makes room for `bytes` bytes in total. Growth is the only allocation, and it is rare.
    pub fn reserve_total(&mut self, bytes: usize) {
        if bytes > self.capacity() {
            self.words.resize(bytes.div_ceil(8).next_power_of_two(), 0);
        }
    }

    /// Sets the length after the caller wrote into [`AlignedBuf::all_mut`].
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "set_len past capacity");
        self.len = len;
    }

    /// Appends `n` zeroed bytes, aligned to 8 at their start, and returns their range.
    pub fn append_zeroed(&mut self, n: usize) -> Range<usize> {
        let range = self.append_unfilled(n);
        self.all_mut()[range.clone()].fill(0);
        range
    }

    /// Appends `n` bytes whose contents are left from earlier use (initialised, but stale), for a
    /// caller that overwrites all of them; saves a pass over large replies.
    pub fn append_unfilled(&mut self, n: usize) -> Range<usize> {
        assert!(self.len.is_multiple_of(FRAME_ALIGN), "appends keep frames aligned");
        let start = self.len;
        self.reserve_total(start + n);
        self.len = start + n;
        start..start + n
    }

    /// Drops `front` bytes from the front, keeping the alignment of what remains modulo 8.
    /// Returns where the remaining bytes now start.
    pub fn compact(&mut self, front: usize) -> usize {
        let keep = front % FRAME_ALIGN;
        let len = self.len;
        self.all_mut().copy_within(front..len, keep);
        self.len = len - front + keep;
        keep
    }
}

/// What a read from a socket produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// This many new bytes, as many as the read had room for: the socket may hold more.
    Bytes(usize),
    /// This many new bytes (at least one), fewer than the read had room for: the socket held no
    /// more. A stream socket's short read shows it empty (epoll(7)), so under edge-triggered
    /// polling, where any later byte raises a new event, the caller waits for one instead of
    /// reading again only to be told `WouldBlock`.
    Drained(usize),
    /// The socket has nothing more for now.
    WouldBlock,
    /// The peer closed its sending side.
    Eof,
}

/// Splits a byte stream into frames, in place.
#[derive(Debug)]
pub struct FrameReader {
    buf: AlignedBuf,
    /// Start of the first unconsumed frame; always a multiple of 8.
    pos: usize,
    frame_bytes_max: usize,
    read_chunk_bytes: usize,
    /// Room each read is given past the buffered bytes: it starts at [`READ_ROOM_MIN_BYTES`]
    /// and doubles, up to `read_chunk_bytes`, each time a read fills all of it. A connection
    /// that only says hello, or sends small requests one at a time, costs a page or two; one
    /// that streams reaches full-size reads within a few calls.
    read_room: usize,
}

/// The room a new reader gives its first read: a hello, or a small request, in one page.
pub const READ_ROOM_MIN_BYTES: usize = 4 << 10;

impl FrameReader {
    /// A reader that refuses frames over `frame_bytes_max` and reads at most `read_chunk_bytes`
    /// beyond what it holds per call.
    pub fn new(frame_bytes_max: usize, read_chunk_bytes: usize) -> Self {
        let read_room = READ_ROOM_MIN_BYTES.min(read_chunk_bytes);
        Self { buf: AlignedBuf::with_capacity(read_room), pos: 0, frame_bytes_max, read_chunk_bytes, read_room }
    }

    /// Bytes this reader holds from the allocator.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes received but not yet consumed as whole frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads once from `src` into the buffer, making room first. The buffer grows only to hold
    /// the frame in progress, whose length the header announced.
    pub fn fill(&mut self, src: &mut impl Read) -> io::Result<Filled> {
        // What the frame in progress and the next read want from its start: grow towards the
        // announced frame as its bytes arrive, at most doubling per read, so a header that
        // announces a huge body costs nothing until the body really comes.
        let held = self.buf.len() - self.pos;
        let frame = self.pending_frame_len().unwrap_or(0);
        let wanted = frame.min(2 * held).max(held + self.read_room);
        // The frame in progress moves to the front (offset 0, aligned) only when the buffer has
        // no room for it where it is: a stream of large frames would otherwise move up to a
        // read's worth of each next frame's bytes, every frame.
        if self.pos > 0 && (held == 0 || self.pos + wanted > self.buf.capacity()) {
            self.pos = self.buf.compact(self.pos);
            debug_assert_eq!(self.pos, 0);
        }
        self.buf.reserve_total(self.pos + wanted);
        let len = self.buf.len();
        let room = self.buf.capacity() - len;
        match src.read(&mut self.buf.all_mut()[len..]) {
            Ok(0) => Ok(Filled::Eof),
            Ok(n) => {
                self.buf.set_len(len + n);
                if n < room {
                    return Ok(Filled::Drained(n));
                }
                self.read_room = (2 * self.read_room).min(self.read_chunk_bytes);
                Ok(Filled::Bytes(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Filled::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Filled::Bytes(0)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(Filled::Eof),
            Err(e) => Err(e),
        }
    }

    /// Changes the largest frame accepted from now on (a connection's limit rises after hello).
    pub fn set_frame_bytes_max(&mut self, bytes: usize) {
        self.frame_bytes_max = bytes;
    }

    /// Length of the frame whose header is buffered, if it is buffered and sane.
    fn pending_frame_len(&self) -> Option<usize> {
        let bytes = &self.buf.bytes()[self.pos..];
        // Checked first: decoding a short header builds an error message, which allocates.
        if bytes.len() < HEADER_BYTES {
            return None;
        }
        Header::decode(bytes, self.frame_bytes_max).ok().map(|h| h.frame_len())
    }

    /// The next whole frame: its header and the byte range of its body. The body stays valid until
    /// the next [`FrameReader::fill`]. An error means the stream cannot be parsed any further.
    pub fn next_frame(&mut self) -> Result<Option<(Header, Range<usize>)>> {
        let bytes = &self.buf.bytes()[self.pos..];
        if bytes.len() < HEADER_BYTES {
            return Ok(None);
        }
        let header = Header::decode(bytes, self.frame_bytes_max)?;
        if bytes.len() < header.frame_len() {
            return Ok(None);
        }
        let body = self.pos + HEADER_BYTES..self.pos + HEADER_BYTES + header.body_len as usize;
        self.pos += header.frame_len();
        Ok(Some((header, body)))
    }

    /// The header of a frame that has begun to arrive but is incomplete, with how much of it came.
    pub fn partial(&self) -> Option<(Option<Header>, usize)> {
        let bytes = &self.buf.bytes()[self.pos..];
        (!bytes.is_empty()).then(|| (Header::decode(bytes, usize::MAX).ok(), bytes.len()))
    }

    /// A body range returned by [`FrameReader::next_frame`].
    pub fn body(&self, range: Range<usize>) -> &[u8] {
        &self.buf.bytes()[range]
    }
}

/// Decompresses Snappy bodies into a reused, aligned scratch buffer.
#[derive(Debug, Default)]
pub struct Inflater {
    scratch: AlignedBuf,
    decoder: snap::raw::Decoder,
}

impl Inflater {
    /// The body as the sender meant it: `raw` itself, or its decompression.
    pub fn inflate<'a>(&'a mut self, header: &Header, raw: &'a [u8]) -> Result<&'a [u8]> {
        if header.flags & flags::COMPRESSED == 0 {
            return Ok(raw);
        }
        let want = header.raw_len as usize;
        let announced = snap::raw::decompress_len(raw).map_err(|e| malformed(format!("snappy header: {e}")))?;
        if announced != want {
            return Err(malformed(format!("snappy body inflates to {announced} bytes, header says {want}")));
        }
        self.scratch.reserve_total(want);
        let out = &mut self.scratch.all_mut()[..want];
        let n = self.decoder.decompress(raw, out).map_err(|e| malformed(format!("snappy body: {e}")))?;
        debug_assert_eq!(n, want);
        self.scratch.set_len(want);
        Ok(self.scratch.bytes())
    }
}

/// Compresses bodies with Snappy when that saves at least a tenth of the bytes.
#[derive(Debug)]
pub struct Deflater {
    scratch: Vec<u8>,
    /// A body sent from several parts, joined so that Snappy sees it whole.
    joined: Vec<u8>,
    encoder: snap::raw::Encoder,
}

impl Default for Deflater {
    fn default() -> Self {
        Self { scratch: Vec::new(), joined: Vec::new(), encoder: snap::raw::Encoder::new() }
    }
}

impl Deflater {
    /// Compresses the concatenation of `parts`; returns the compressed bytes only when they are
    /// under 90% of the raw size.
    pub fn deflate(&mut self, parts: &[&[u8]]) -> Option<&[u8]> {
        let raw: &[u8] = if parts.len() == 1 {
            parts[0]
        } else {
            self.joined.clear();
            parts.iter().for_each(|p| self.joined.extend_from_slice(p));
            &self.joined
        };
        self.scratch.resize(snap::raw::max_compress_len(raw.len()), 0);
        let n = self.encoder.compress(raw, &mut self.scratch).ok()?;
        (n * 10 < raw.len() * 9).then(|| &self.scratch[..n])
    }

    /// The body of a frame about to be sent from `parts`: compressed when `compress` is set and
    /// that pays, raw otherwise. Sets `header`'s lengths and compression flag to match; the
    /// caller seals the header. Every link sends its bodies through here.
    pub fn frame_body<'a>(&'a mut self, header: &mut Header, parts: &'a [&'a [u8]], compress: bool) -> Body<'a> {
        let raw_len: usize = parts.iter().map(|p| p.len()).sum();
        header.raw_len = raw_len as u32;
        header.body_len = raw_len as u32;
        header.flags &= !flags::COMPRESSED;
        match if compress && raw_len > 0 { self.deflate(parts) } else { None } {
            Some(z) => {
                header.flags |= flags::COMPRESSED;
                header.body_len = z.len() as u32;
                Body::Packed([z])
            }
            None => Body::Raw(parts),
        }
    }
}

/// A frame body as it goes on the wire: the caller's parts, or their compression.
#[derive(Debug)]
pub enum Body<'a> {
    Raw(&'a [&'a [u8]]),
    Packed([&'a [u8]; 1]),
}

impl<'a> Body<'a> {
    /// The slices to write, in order.
    pub fn parts(&self) -> &[&'a [u8]] {
        match self {
            Body::Raw(parts) => parts,
            Body::Packed(one) => one,
        }
    }
}

fn malformed(reason: String) -> TransportError {
    TransportError::Malformed { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn frame(id: u64, body: &[u8]) -> Vec<u8> {
        let mut h = Header::request(crate::wire::Op::Push, id);
        h.body_len = body.len() as u32;
        h.raw_len = h.body_len;
        h.seal();
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(body);
        v.resize(HEADER_BYTES + crate::wire::padded(body.len()), 0);
        v
    }

    /// A reader that hands out at most `step` bytes per call, then WouldBlock once, to exercise
    /// frames split across reads.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
        blocked: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.blocked = !self.blocked;
            if self.blocked {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// A read that fills its room may have left bytes behind; one that does not, did not.
    #[test]
    fn a_short_read_says_the_socket_is_drained() {
        let stream: Vec<u8> = (0..3 * READ_ROOM_MIN_BYTES).map(|i| i as u8).collect();
        let mut src = &stream[..];
        let mut reader = FrameReader::new(1 << 20, READ_ROOM_MIN_BYTES);
        assert_eq!(reader.fill(&mut src).unwrap(), Filled::Bytes(READ_ROOM_MIN_BYTES));
        let mut small = &stream[..100];
        let mut fresh = FrameReader::new(1 << 20, READ_ROOM_MIN_BYTES);
        assert_eq!(fresh.fill(&mut small).unwrap(), Filled::Drained(100));
        assert_eq!(fresh.fill(&mut small).unwrap(), Filled::Eof);
    }

    #[test]
    fn frames_survive_any_split() {
        let mut stream = Vec::new();
        for id in 0..50u64 {
            stream.extend(frame(id, &vec![id as u8; (id as usize * 37) % 300]));
        }
        for step in [1, 7, 64, 65, 1000] {
            let mut src = Trickle { data: &stream, step, blocked: false };
            let mut reader = FrameReader::new(1 << 20, 4096);
            let mut next = 0u64;
            while next < 50 {
                if reader.fill(&mut src).unwrap() == Filled::Eof {
                    panic!("eof before all frames at step {step}");
                }
                while let Some((h, body)) = reader.next_frame().unwrap() {
                    assert_eq!(h.request_id, next);
                    assert!(reader.body(body).iter().all(|b| *b == next as u8));
                    next += 1;
                }
            }
        }
    }

    /// Large frames of uneven lengths, read in steps that leave the next frame's start behind
    /// each one: the reader leaves it where it is while the buffer has room for the frame
    /// there, and moves it to the front when not; every frame comes out whole either way.
    #[test]
    fn large_frames_survive_any_split_with_or_without_moving() {
        let count = 40u64;
        let mut stream = Vec::new();
        for id in 0..count {
            stream.extend(frame(id, &vec![id as u8; 1000 + (id as usize * 7919) % 70_000]));
        }
        for step in [4096, 50_000, 65_536, usize::MAX] {
            let mut src = Trickle { data: &stream, step, blocked: false };
            let mut reader = FrameReader::new(1 << 20, 256 << 10);
            let mut next = 0u64;
            while next < count {
                assert_ne!(reader.fill(&mut src).unwrap(), Filled::Eof, "eof before all frames at step {step}");
                while let Some((h, body)) = reader.next_frame().unwrap() {
                    assert_eq!(h.request_id, next);
                    let body = reader.body(body);
                    assert_eq!(body.len(), 1000 + (next as usize * 7919) % 70_000);
                    assert!(body.iter().all(|b| *b == next as u8), "frame {next} at step {step}");
                    next += 1;
                }
            }
            assert!(reader.capacity() <= 1 << 20, "the buffer stays bounded: {}", reader.capacity());
        }
    }

    #[test]
    fn a_reader_stays_one_page_for_small_frames_and_grows_for_a_stream() {
        let small: Vec<u8> = (0..20u64).flat_map(|id| frame(id, &[1; 100])).collect();
        let mut reader = FrameReader::new(1 << 20, 256 << 10);
        let mut src = Trickle { data: &small, step: 200, blocked: false };
        for _ in 0..400 {
            reader.fill(&mut src).unwrap();
            while reader.next_frame().unwrap().is_some() {}
        }
        // The room, past the tail of a frame that came in part: at most two pages.
        assert!(reader.capacity() <= 2 * READ_ROOM_MIN_BYTES, "small frames grew the buffer to {}", reader.capacity());
        // A peer that always has more than the room: every read fills it, so the room doubles.
        let stream: Vec<u8> = (0..64u64).flat_map(|id| frame(id, &[2; 8000])).collect();
        let mut src = Trickle { data: &stream, step: usize::MAX, blocked: false };
        for _ in 0..20 {
            reader.fill(&mut src).unwrap();
            while reader.next_frame().unwrap().is_some() {}
        }
        assert!(reader.capacity() >= 64 << 10, "a streaming peer gets larger reads: {}", reader.capacity());
        assert!(reader.capacity() <= 512 << 10, "read room stays bounded: {}", reader.capacity());
    }

    #[test]
    fn compression_round_trips_and_skips_noise() {
        let mut d = Deflater::default();
        let zeros = vec![0u8; 4096];
        let packed = d.deflate(&[&zeros[..100], &zeros[100..]]).unwrap().to_vec();
        let mut h = Header::request(crate::wire::Op::Push, 1);
        h.flags = flags::COMPRESSED;
        h.body_len = packed.len() as u32;
        h.raw_len = 4096;
        let mut inf = Inflater::default();
        assert_eq!(inf.inflate(&h, &packed).unwrap(), &zeros[..]);
        h.raw_len = 4000;
        assert!(inf.inflate(&h, &packed).is_err(), "length mismatch must be caught");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        assert!(d.deflate(&[&noise]).is_none(), "incompressible data is sent raw");
    }

    #[test]
    fn compact_keeps_alignment() {
        let mut b = AlignedBuf::with_capacity(64);
        b.append_zeroed(48);
        let start = b.compact(19);
        assert_eq!(start, 3);
        assert_eq!(b.len(), 48 - 19 + 3);
    }
}
