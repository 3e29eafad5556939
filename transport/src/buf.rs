//! Aligned, reusable byte buffers and the frame reader built on them.
//!
//! Buffers are backed by `Vec<u64>`, so every frame that starts at a multiple of 8 can be viewed in
//! place as keys (u64) and values (f32). They grow to the largest frame seen and are then reused:
//! the steady state does not allocate.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::ops::Range;
use std::sync::Arc;

use crate::config::{LENT_BUFFERS_MAX, SHARED_BODY_BYTES_MIN};
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

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
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

/// Splits a byte stream into frames, in place. A frame's body can be lent out
/// ([`FrameReader::lend`]) for as long as its borrower likes: the reader then reads on into
/// another buffer, and takes the lent one back once nothing holds it.
#[derive(Debug)]
pub struct FrameReader {
    /// Written only while nothing else holds it.
    buf: Arc<AlignedBuf>,
    /// Start of the first unconsumed frame; always a multiple of 8.
    pos: usize,
    /// Buffers lent out, oldest first, to read into again once returned.
    lent: VecDeque<Arc<AlignedBuf>>,
    /// Whether reads of a large frame stop at its end (see [`FrameReader::lending`]).
    lends: bool,
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
        Self { buf: Arc::new(AlignedBuf::with_capacity(read_room)), pos: 0, lent: VecDeque::new(), lends: false, frame_bytes_max, read_chunk_bytes, read_room }
    }

    /// [`FrameReader::new`] for a reader whose large frames' bodies are lent out: a read into a
    /// frame of [`SHARED_BODY_BYTES_MIN`] or more stops at its end, so that lending the buffer
    /// leaves none of the next frame's bytes to move into another.
    pub fn lending(frame_bytes_max: usize, read_chunk_bytes: usize) -> Self {
        Self { lends: true, ..Self::new(frame_bytes_max, read_chunk_bytes) }
    }

    /// The buffer, to write into: if a body of it is still lent out, the unconsumed bytes move
    /// first to a returned buffer, or a new one.
    fn own(&mut self) -> &mut AlignedBuf {
        if Arc::get_mut(&mut self.buf).is_none() {
            let mut fresh = self.returned().unwrap_or_else(|| Arc::new(AlignedBuf::with_capacity(self.buf.capacity())));
            let held = &self.buf.bytes()[self.pos..];
            let into = Arc::get_mut(&mut fresh).expect("a returned or new buffer is held by nothing else");
            into.reserve_total(held.len());
            into.all_mut()[..held.len()].copy_from_slice(held);
            into.set_len(held.len());
            let lent = std::mem::replace(&mut self.buf, fresh);
            self.pos = 0;
            if self.lent.len() == LENT_BUFFERS_MAX {
                // Its borrowers free it; this reader no longer waits for it.
                self.lent.pop_front();
            }
            self.lent.push_back(lent);
        }
        Arc::get_mut(&mut self.buf).expect("held by nothing else")
    }

    /// A lent buffer nothing holds any more, if the oldest few include one.
    fn returned(&mut self) -> Option<Arc<AlignedBuf>> {
        for _ in 0..self.lent.len().min(RETURN_LOOKS) {
            let mut lent = self.lent.pop_front().expect("counted");
            if let Some(buf) = Arc::get_mut(&mut lent) {
                buf.set_len(0);
                return Some(lent);
            }
            self.lent.push_back(lent);
        }
        None
    }

    /// The buffer the last frame's body lies in, for a holder to keep as long as it likes
    /// (a clone of the `Arc`), with no copy: the reader leaves the buffer alone while it is held.
    pub fn lend(&self) -> &Arc<AlignedBuf> {
        &self.buf
    }

    /// Bytes of the buffer this reader reads into (those of lent buffers not counted).
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
        let pos = self.pos;
        // The frame in progress moves to the front (offset 0, aligned) only when the buffer has
        // no room for it where it is: a stream of large frames would otherwise move up to a
        // read's worth of each next frame's bytes, every frame.
        if pos > 0 && (held == 0 || pos + wanted > self.buf.capacity()) {
            // A lent buffer is left as it is: its unconsumed bytes move to the front of another.
            self.own();
            let pos = self.pos;
            if pos > 0 {
                self.pos = self.own().compact(pos);
            }
            debug_assert_eq!(self.pos, 0);
        }
        let stop_at_frame = self.lends && frame >= SHARED_BODY_BYTES_MIN && held < frame;
        let (unknown_frame, read_room) = (self.lends && frame == 0, self.read_room);
        self.own();
        let pos = self.pos;
        let buf = self.own();
        buf.reserve_total(pos + wanted);
        let len = buf.len();
        // A lending reader reads at most its room past a frame whose length it does not know
        // yet, so that a large frame is found before its end is read.
        let end = match (stop_at_frame, unknown_frame) {
            (true, _) => (pos + frame).min(buf.capacity()),
            (false, true) => (len + read_room).min(buf.capacity()),
            (false, false) => buf.capacity(),
        };
        let room = end - len;
        match src.read(&mut buf.all_mut()[len..end]) {
            Ok(0) => Ok(Filled::Eof),
            Ok(n) => {
                buf.set_len(len + n);
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

/// Lent buffers the reader looks at for a returned one before it makes a new one.
const RETURN_LOOKS: usize = 8;

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

    /// Bodies lent out stay as they were while the reader reads on, whatever the split of the
    /// stream; a large frame's reads end with it, so lending moves no bytes of the next; and a
    /// lent buffer is read into again once its bodies are dropped.
    #[test]
    fn lent_bodies_stay_whole_and_their_buffers_come_back() {
        let sizes = |id: u64| if id.is_multiple_of(3) { SHARED_BODY_BYTES_MIN + (id as usize * 7919) % 400_000 } else { 100 + id as usize };
        let count = 30u64;
        let stream: Vec<u8> = (0..count).flat_map(|id| frame(id, &vec![id as u8; sizes(id)])).collect();
        for step in [4096, 65_536, 300_000, usize::MAX] {
            let mut src = Trickle { data: &stream, step, blocked: false };
            let mut reader = FrameReader::lending(1 << 20, 256 << 10);
            let (mut kept, mut next) = (Vec::new(), 0u64);
            while next < count {
                assert_ne!(reader.fill(&mut src).unwrap(), Filled::Eof, "eof before all frames at step {step}");
                while let Some((h, body)) = reader.next_frame().unwrap() {
                    assert_eq!(h.request_id, next);
                    let len = reader.body(body.clone()).len();
                    if len >= SHARED_BODY_BYTES_MIN {
                        // A frame larger than a read began in an earlier read than its end:
                        // the reads since stopped where it ends.
                        if len > 256 << 10 {
                            assert_eq!(reader.buffered(), 0, "a large frame's read ends with it");
                        }
                        let lent = reader.lend().clone();
                        let at = body.start - HEADER_BYTES;
                        kept.push((next, lent, body));
                        assert!(at.is_multiple_of(8));
                    }
                    next += 1;
                }
                if kept.len() > 3 {
                    // The oldest is done with: its buffer may be read into again.
                    kept.remove(0);
                }
                for (id, lent, body) in &kept {
                    let body = &lent.bytes()[body.clone()];
                    assert_eq!(body.len(), sizes(*id));
                    assert!(body.iter().all(|b| *b == *id as u8), "lent frame {id} changed at step {step}");
                    assert!((body.as_ptr() as usize).is_multiple_of(8));
                }
            }
            assert!(reader.lent.len() <= 5, "returned buffers are read into again: {} lent", reader.lent.len());
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
