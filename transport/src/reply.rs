//! The reply to one request, written in place into whatever buffer the transport sends from: a
//! TCP connection's outgoing queue, or an RDMA connection's registered staging slot.

use std::ops::Range;

use zerocopy::{FromBytes, IntoBytes};

use crate::buf::Deflater;
use crate::wire::{flags, padded, Header, Status, HEADER_BYTES};

/// Error messages are cut to this length, so an error reply always fits any transport's frames.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;

/// Where a transport lets replies be written: an append-only byte area whose frames start
/// 8-byte aligned.
pub(crate) trait ReplyArea {
    /// Bytes in use.
    fn used(&self) -> usize;
    /// Drops bytes past `len`.
    fn truncate(&mut self, len: usize);
    /// Appends `n` bytes (contents unspecified) and returns their range; `None` when full.
    fn grow(&mut self, n: usize) -> Option<Range<usize>>;
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

/// The reply to one request, written straight into the buffer the transport sends from.
pub struct Reply<'a> {
    out: &'a mut dyn ReplyArea,
    request: Header,
    /// Where this reply's frame starts in `out`, once one was begun.
    frame: Option<usize>,
    /// Largest reply frame the transport can carry back.
    frame_bytes_max: usize,
    /// The reply may leave only once the service's durable log position reaches this.
    hold: Option<u64>,
}

impl<'a> Reply<'a> {
    pub(crate) fn new(out: &'a mut dyn ReplyArea, request: Header, frame_bytes_max: usize) -> Self {
        Self { out, request, frame: None, frame_bytes_max, hold: None }
    }

    /// Largest reply frame (header included) this transport carries back to the requester; a
    /// service refuses requests whose reply would be larger.
    pub fn frame_bytes_max(&self) -> usize {
        self.frame_bytes_max
    }

    /// Bytes of the reply's frame so far, header included (0 before it is begun).
    pub fn frame_len(&self) -> usize {
        self.frame.map_or(0, |at| self.out.used() - at)
    }

    /// The request this replies to.
    pub fn request(&self) -> &Header {
        &self.request
    }

    /// Holds this reply back until [`Service::durable`](crate::Service::durable) reaches `lsn`:
    /// a push is acknowledged only once its log record is on disk. Replies on one connection
    /// leave in order, so the ones after a held reply wait with it. An error reply (which says
    /// nothing was applied) is never held.
    pub fn hold_until(&mut self, lsn: u64) {
        self.hold = Some(lsn);
    }

    /// Drops a reply begun earlier, so that an error can replace it.
    fn discard(&mut self) {
        if let Some(start) = self.frame.take() {
            self.out.truncate(start);
        }
    }

    fn begin(&mut self, status: Status, count: u32, body_len: usize) -> std::ops::Range<usize> {
        self.discard();
        let mut header = Header::reply_to(&self.request, status);
        header.count = count;
        header.body_len = u32::try_from(body_len).expect("reply bodies stay under the frame limit");
        header.raw_len = header.body_len;
        let frame = self.out.grow(HEADER_BYTES + padded(body_len)).expect("services size replies under frame_bytes_max");
        // Only the padding is cleared: the service fills the body, and stale bytes must not leak.
        // (Most bodies need none: stamps are whole words.)
        let body = frame.start + HEADER_BYTES..frame.start + HEADER_BYTES + body_len;
        if body.end < frame.end {
            self.out.bytes_mut()[body.end..frame.end].fill(0);
        }
        *self.header_mut(frame.start) = header;
        self.frame = Some(frame.start);
        body
    }

    /// The header of the frame that starts at `at` in the area, in place.
    fn header_mut(&mut self, at: usize) -> &mut Header {
        let bytes = &mut self.out.bytes_mut()[at..at + HEADER_BYTES];
        Header::mut_from_bytes(bytes).expect("reply frames start 8-byte aligned (ReplyArea)")
    }

    /// A success reply carrying a `stamp_len`-entry vector-clock stamp and then `values_len`
    /// values; returns both for the service to fill in place. Their contents are unspecified:
    /// the service must write every element.
    pub fn ok(&mut self, stamp_len: usize, values_len: usize) -> (&mut [u64], &mut [f32]) {
        let body = self.begin(Status::Ok, stamp_len as u32, stamp_len * 8 + values_len * 4);
        let bytes = &mut self.out.bytes_mut()[body];
        let (stamp, values) = bytes.split_at_mut(stamp_len * 8);
        (bytemuck::cast_slice_mut(stamp), bytemuck::cast_slice_mut(values))
    }

    /// A success reply carrying only a vector-clock stamp (a push's acknowledgement): `fill`
    /// writes its `stamp_len` clocks, and the trailing zero ones are then dropped. A worker
    /// missing from a stamp has clock 0, so the reply says the same in fewer bytes: a push from
    /// the only worker of a table that tracks 16 is acknowledged with one clock, not 16 (8 bytes,
    /// not 128).
    pub fn ok_stamp(&mut self, stamp_len: usize, fill: impl FnOnce(&mut [u64])) {
        let body = self.begin(Status::Ok, stamp_len as u32, stamp_len * 8);
        let stamp: &mut [u64] = bytemuck::cast_slice_mut(&mut self.out.bytes_mut()[body.clone()]);
        fill(stamp);
        let keep = stamp.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
        if keep == stamp_len {
            return;
        }
        let header = self.header_mut(body.start - HEADER_BYTES);
        header.count = keep as u32;
        header.body_len = (keep * 8) as u32;
        header.raw_len = header.body_len;
        // Whole clocks: the shorter body needs no padding.
        self.out.truncate(body.start + keep * 8);
    }

    /// A success reply carrying a vector-clock stamp (`count` says how many clocks) and then an
    /// opaque body: a replicated head's answer to a worker's pushes, the stamp of what it applied
    /// before the messages for the worker.
    pub fn ok_stamped(&mut self, stamp: &[u64], body: &[u8]) {
        let stamp_bytes = stamp.len() * 8;
        let range = self.begin(Status::Ok, stamp.len() as u32, stamp_bytes + body.len());
        let bytes = &mut self.out.bytes_mut()[range];
        bytes[..stamp_bytes].copy_from_slice(bytemuck::cast_slice(stamp));
        bytes[stamp_bytes..].copy_from_slice(body);
    }

    /// A success reply with an opaque body (control replies: JSON).
    pub fn ok_bytes(&mut self, body: &[u8]) {
        self.status_bytes(Status::Ok, body);
    }

    /// A reply with `status` and a binary body: a step of a handshake, not an error
    /// ([`Status::AuthChallenge`]).
    pub fn status_bytes(&mut self, status: Status, body: &[u8]) {
        let range = self.begin(status, 0, body.len());
        self.out.bytes_mut()[range].copy_from_slice(body);
    }

    /// An error reply; replaces anything begun before. The message should say what to do.
    pub fn error(&mut self, status: Status, message: &str) {
        assert_ne!(status, Status::Ok, "an error reply needs an error status");
        let message = &message.as_bytes()[..message.len().min(ERROR_MESSAGE_BYTES_MAX)];
        self.hold = None;
        let range = self.begin(status, 0, message.len());
        self.out.bytes_mut()[range].copy_from_slice(message);
    }

    /// Seals the reply, compressing its body if the request asked for that and it pays. Returns
    /// the byte range of the sealed frame in the area, and the log position it waits for.
    pub(crate) fn finish(self, deflater: &mut Deflater, compress_bytes_min: usize) -> (Range<usize>, Option<u64>) {
        self.finish_with(deflater, compress_bytes_min, true)
    }

    /// [`Reply::finish`] without the header's checksum, for a transport that will send most
    /// replies with a short header (which has none) and seals the others itself (RDMA).
    #[cfg(feature = "rdma")]
    pub(crate) fn finish_unsealed(self, deflater: &mut Deflater, compress_bytes_min: usize) -> (Range<usize>, Option<u64>) {
        self.finish_with(deflater, compress_bytes_min, false)
    }

    fn finish_with(mut self, deflater: &mut Deflater, compress_bytes_min: usize, seal: bool) -> (Range<usize>, Option<u64>) {
        let Some(start) = self.frame else {
            self.error(Status::Internal, "the server produced no reply to this request (a bug)");
            return self.finish_with(deflater, compress_bytes_min, seal);
        };
        // The header is changed in place, and only when something changes it: most replies are
        // neither compressed nor (over RDMA) sealed here.
        if self.request.flags & flags::COMPRESS_REPLY != 0 {
            self.compress(start, deflater, compress_bytes_min);
        }
        if seal {
            self.header_mut(start).seal();
        }
        (start..self.out.used(), self.hold)
    }

    /// Compresses the body of the frame at `start` in place when it is large enough and that pays.
    fn compress(&mut self, start: usize, deflater: &mut Deflater, compress_bytes_min: usize) {
        let body_at = start + HEADER_BYTES;
        let body = body_at..body_at + self.header_mut(start).body_len as usize;
        if body.len() < compress_bytes_min {
            return;
        }
        if let Some(z) = deflater.deflate(&[&self.out.bytes()[body]]) {
            // The body is still in place until truncate below; z lives in the deflater, and it
            // is smaller than the body, so the area has room for it.
            self.out.truncate(body_at);
            let room = self.out.grow(padded(z.len())).expect("a compressed body is smaller");
            let bytes = self.out.bytes_mut();
            bytes[room.start..room.start + z.len()].copy_from_slice(z);
            bytes[room.start + z.len()..room.end].fill(0);
            let header = self.header_mut(start);
            header.flags |= flags::COMPRESSED;
            header.body_len = z.len() as u32;
        }
    }
}

/// Writes, from the start of `out`, the error `failure` makes of `reply` (a sealed reply's
/// header), which was held for a log or a chain that then failed. `out` may be where that reply
/// was staged. The message is cut to fit; returns the frame's length.
pub(crate) fn held_error(reply: &Header, failure: crate::HeldFailure<'_>, out: &mut [u8]) -> usize {
    match failure.status {
        Status::NotDurable => {
            let message = format!("the push was applied in memory but is not acknowledged: {}", failure.reason);
            error_frame(reply, Status::NotDurable, &message, out)
        }
        status => error_frame(reply, status, failure.reason, out),
    }
}

/// Writes a sealed error reply to `request` into `out`, its message cut to fit; returns its length.
pub(crate) fn error_frame(request: &Header, status: Status, message: &str, out: &mut [u8]) -> usize {
    let room = out.len().saturating_sub(HEADER_BYTES) & !7;
    let message = &message.as_bytes()[..message.len().min(ERROR_MESSAGE_BYTES_MAX).min(room)];
    let mut header = Header::reply_to(request, status);
    header.body_len = message.len() as u32;
    header.raw_len = header.body_len;
    header.seal();
    let end = HEADER_BYTES + padded(message.len());
    out[..HEADER_BYTES].copy_from_slice(header.as_bytes());
    out[HEADER_BYTES..HEADER_BYTES + message.len()].copy_from_slice(message);
    out[HEADER_BYTES + message.len()..end].fill(0);
    end
}

impl std::fmt::Debug for Reply<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").field("request", &self.request).field("frame", &self.frame).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Op;

    /// A fixed, 8-byte aligned area, as the transports' are.
    struct Area {
        words: Vec<u64>,
        used: usize,
    }

    impl ReplyArea for Area {
        fn used(&self) -> usize {
            self.used
        }
        fn truncate(&mut self, len: usize) {
            self.used = len;
        }
        fn grow(&mut self, n: usize) -> Option<Range<usize>> {
            (self.used + n <= self.words.len() * 8).then(|| {
                self.used += n;
                self.used - n..self.used
            })
        }
        fn bytes(&self) -> &[u8] {
            bytemuck::cast_slice(&self.words)
        }
        fn bytes_mut(&mut self) -> &mut [u8] {
            bytemuck::cast_slice_mut(&mut self.words)
        }
    }

    /// A stamp-only reply with `clocks`, finished: its header and its stamp.
    fn acknowledged(clocks: &[u64]) -> (Header, Vec<u64>) {
        let mut area = Area { words: vec![0; 64], used: 0 };
        let mut reply = Reply::new(&mut area, Header::request(Op::PushRange, 9), 512);
        reply.ok_stamp(clocks.len(), |stamp| stamp.copy_from_slice(clocks));
        let (frame, _) = reply.finish(&mut Deflater::default(), usize::MAX);
        let header = Header::decode(&area.bytes()[frame.clone()], 512).expect("a sealed, well-formed reply");
        assert_eq!(frame.len(), HEADER_BYTES + padded(header.body_len as usize), "the frame ends with its body");
        assert_eq!(header.body_len, header.count * 8, "the body is the stamp");
        let body = &area.bytes()[frame.start + HEADER_BYTES..frame.start + HEADER_BYTES + header.count as usize * 8];
        (header, body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
    }

    #[cfg(feature = "rdma")]
    #[test]
    fn an_unsealed_finish_leaves_the_header_as_it_was_begun() {
        let mut area = Area { words: vec![0; 64], used: 0 };
        let mut reply = Reply::new(&mut area, Header::request(Op::Ping, 5), 512);
        reply.ok_bytes(b"abc");
        let (frame, hold) = reply.finish_unsealed(&mut Deflater::default(), 0);
        assert_eq!((frame.clone(), hold), (0..HEADER_BYTES + 8, None));
        let header = Header::decode_unchecked(&area.bytes()[..HEADER_BYTES]);
        assert_eq!((header.request_id, header.body_len, header.header_crc), (5, 3, 0), "not sealed, nothing else changed");
        assert_eq!(&area.bytes()[HEADER_BYTES..frame.end], b"abc\0\0\0\0\0", "the padding is cleared");
    }

    #[test]
    fn a_reply_asked_to_be_compressed_is_compressed_in_place_and_sealed() {
        let mut area = Area { words: vec![0xffff_ffff_ffff_ffff; 1024], used: 0 };
        let mut request = Header::request(Op::PullRange, 2);
        request.flags |= flags::COMPRESS_REPLY;
        let mut reply = Reply::new(&mut area, request, 8192);
        let (stamp, values) = reply.ok(1, 1000);
        stamp[0] = 3;
        values.fill(0.5);
        let (frame, _) = reply.finish(&mut Deflater::default(), 64);
        let header = Header::decode(&area.bytes()[frame.clone()], 8192).expect("sealed");
        assert_ne!(header.flags & flags::COMPRESSED, 0);
        assert_eq!(header.raw_len, 8 + 4000, "the raw length stays");
        assert!(header.body_len < 1000, "1,000 equal values compress to under a quarter: {}", header.body_len);
        assert_eq!(frame.len(), HEADER_BYTES + padded(header.body_len as usize));
        let body = &area.bytes()[frame.start + HEADER_BYTES..frame.end];
        assert!(body[header.body_len as usize..].iter().all(|&b| b == 0), "the padding is cleared");
        let raw = crate::buf::Inflater::default().inflate(&header, &body[..header.body_len as usize]).expect("inflates").to_vec();
        assert_eq!(&raw[..8], 3u64.to_le_bytes());
        assert!(raw[8..].chunks_exact(4).all(|c| f32::from_le_bytes(c.try_into().unwrap()) == 0.5));
    }

    #[test]
    fn a_stamp_loses_its_trailing_zero_clocks_and_nothing_else() {
        assert_eq!(acknowledged(&[4, 0, 7, 0, 0, 0]).1, [4, 0, 7]);
        assert_eq!(acknowledged(&[0; 16]).1, [0u64; 0], "all zero: no clocks at all");
        assert_eq!(acknowledged(&[1, 2]).1, [1, 2], "nothing to trim");
        assert_eq!(acknowledged(&[]).1, [0u64; 0]);
    }
}
