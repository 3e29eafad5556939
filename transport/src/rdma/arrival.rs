//! Arrival tags, and what a receiving end knows of the frames landing in its slots.

use super::{SlotLayout, SHORT_FRAME, TAG_BYTES};
use crate::config::Arrival;

/// Arrival tags: how a receiver sees, by reading its own memory, that a frame has landed whole.
///
/// Every frame written into a slot (a request into the shard's ring, a reply into the worker's
/// inbox) is followed by an 8-byte tag, `seq ^ salt`, where `seq` numbers the frames of that
/// direction of the link and the receiver picked `salt` at random when the link was set up. The
/// receiver polls the place where the frame it expects next would end, by the body length its
/// header declares ([`landed`]). A write lands in increasing address order, so once the tag is
/// there the frame is whole. This is what perftest's `ib_write_lat` relies on when it polls the
/// last byte of its buffer, and what the device does for a queue pair's writes (rxe copies each
/// packet forward, and places a queue pair's packets in order).
///
/// Why: the write still carries immediate data, so it still consumes a receive and completes,
/// and a sleeping receiver is woken by that completion. But taking a completion and posting the
/// next receive before serving costs the round trip of every small message: in the SoftRoCE
/// guest a raw write-with-immediate ping-pong took 12.0-12.2 us one way when each side took its
/// completion first, and 10.9-11.1 us (as `ib_write_lat`'s 10.6-11.0) when each side saw the tag,
/// answered, and took completions afterwards. The completions are still taken, after the answer
/// is posted: they carry errors, repost receives, and find frames whose tag never shows (a
/// misbehaving peer's); with [`Arrival::Completion`](crate::config::Arrival) they are the only
/// way in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tags {
    salt: u64,
}

impl Tags {
    pub fn new(salt: u64) -> Self {
        Self { salt }
    }

    /// A fresh salt for the tags a peer will write to this side.
    pub fn random_salt() -> u64 {
        let mut bytes = [0u8; 8];
        // The salt only has to differ from the bytes a slot held before; should the system's
        // generator fail, the clock does that too.
        if getrandom::getrandom(&mut bytes).is_err() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            bytes = (now.as_nanos() as u64).to_le_bytes();
        }
        u64::from_le_bytes(bytes)
    }

    /// The tag that follows frame number `seq`.
    pub fn tag(self, seq: u64) -> u64 {
        seq ^ self.salt
    }
}

/// `Some(frame_len)` when the frame tagged `tag` has landed whole in `region[at..at + room]`,
/// a short frame (`short`) or a long one; `None` while it has not (or when the area holds
/// something else). The header's body-length word may still be half written when it is read, so
/// the tag is looked for where the header says the frame ends, and the header is read again
/// after the tag was found: a frame counts as landed only if both reads agree. A wrong guess of
/// the frame's end finds the tag only if the bytes there happen to equal it, which a random salt
/// makes a 1-in-2^64 event per look.
/// Where the frame tagged `tag` landed in slot `slot` of a region laid out as `layout`, read by
/// `load` ([`Region::load_u64`](super::verbs::Region::load_u64)): in its
/// compact area (`Some(true)`), its full area (`Some(false)`), or not yet (`None`).
fn landed_in_slot(load: &impl Fn(usize) -> u64, layout: SlotLayout, slot: usize, tag: u64) -> Option<bool> {
    [true, false].into_iter().find(|&short| {
        let (at, room) = layout.area(slot, short);
        landed(load, at, room, short, tag).is_some()
    })
}

/// `load(offset)` reads the 8-byte word at `offset` ([`Region::load_u64`](super::verbs::Region::load_u64)).
fn landed(load: &impl Fn(usize) -> u64, at: usize, room: usize, short: bool, tag: u64) -> Option<usize> {
    let word_at = at + 8 * crate::wire::body_len_word(short);
    let len = crate::wire::declared_frame_len(load(word_at), short);
    let fits = len + TAG_BYTES <= room;
    (fits && load(at + len) == tag && crate::wire::declared_frame_len(load(word_at), short) == len).then_some(len)
}

/// What one receiving end (a shard for a worker's requests, a worker's link for its replies) knows
/// of the frames arriving in its slots: how many have landed, found by their tags or by their
/// receive completions, how many receive completions it took, and which area of its slot each
/// lies in. Frame `n` lies in slot `n % slots`; frames land in order.
#[derive(Debug)]
pub(crate) struct Arrivals {
    tags: Tags,
    by_memory: bool,
    /// Frames landed.
    pub landed: u64,
    /// Receive completions taken; each one's receive is posted again by the caller.
    pub recvs: u64,
    /// Per slot: whether the frame that landed there is a short one (in its compact area).
    short: Vec<bool>,
}

impl Arrivals {
    /// For `slots` slots whose frames carry tags salted with `salt`, found as `arrival` says.
    pub fn new(slots: usize, salt: u64, arrival: Arrival) -> Self {
        Self { tags: Tags::new(salt), by_memory: arrival == Arrival::Memory, landed: 0, recvs: 0, short: vec![false; slots] }
    }

    pub fn slots(&self) -> u64 {
        self.short.len() as u64
    }

    /// Whether frames are found by their tags ([`Arrival::Memory`]).
    pub fn by_memory(&self) -> bool {
        self.by_memory
    }

    /// Whether the frame that landed in `slot` is a short one.
    pub fn short(&self, slot: usize) -> bool {
        self.short[slot]
    }

    /// Counts as landed, in order, every frame whose tag shows in the region `load` reads (laid
    /// out as `layout`), up to `limit` frames in all; nothing with [`Arrival::Completion`].
    /// Returns how many it counted.
    pub fn look(&mut self, load: impl Fn(usize) -> u64, layout: SlotLayout, limit: u64) -> u64 {
        let before = self.landed;
        while self.by_memory && self.landed < limit {
            let slot = (self.landed % self.slots()) as usize;
            let Some(short) = landed_in_slot(&load, layout, slot, self.tags.tag(self.landed)) else {
                break;
            };
            self.short[slot] = short;
            self.landed += 1;
        }
        self.landed - before
    }

    /// A receive completion whose immediate data is `imm`: it announces the next frame not yet
    /// announced, which lands now unless its tag was seen first. `Ok(true)` when it landed now;
    /// `Err(slot)`, changing nothing, when `imm` names another slot than that frame's `slot`: a
    /// peer that skips or reuses slots.
    pub fn took(&mut self, imm: u32) -> Result<bool, u32> {
        let slot = (self.recvs % self.slots()) as usize;
        if imm & !SHORT_FRAME != slot as u32 {
            return Err(slot as u32);
        }
        // Frames land in order, and a completion comes only once its frame has landed, so the
        // completions taken never run ahead of the frames counted.
        debug_assert!(self.recvs <= self.landed, "a completion for a frame beyond the next");
        let now = self.recvs == self.landed;
        if now {
            self.short[slot] = imm & SHORT_FRAME != 0;
            self.landed += 1;
        }
        self.recvs += 1;
        Ok(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::SMALL_SLOT_BYTES;
    use zerocopy::IntoBytes;

    /// A slot area as words, written the way a frame lands: forward, word by word.
    fn area_with(frame: &[u8], tag: u64, room: usize) -> Vec<u64> {
        let mut bytes = vec![0xAAu8; room];
        bytes[..frame.len()].copy_from_slice(frame);
        bytes[frame.len()..frame.len() + TAG_BYTES].copy_from_slice(&tag.to_le_bytes());
        bytes.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect()
    }

    #[test]
    fn a_frame_has_landed_once_its_tag_follows_the_length_its_header_declares() {
        use crate::wire::{Header, Op, ShortHeader};
        let tags = Tags::new(0x1234_5678_9abc_def0);
        let mut header = Header::request(Op::Push, 3);
        (header.body_len, header.raw_len) = (12, 12);
        let short = ShortHeader::shorten(&header).unwrap();
        let mut frame = short.as_bytes().to_vec();
        frame.resize(short.frame_len(), 7);
        let room = SMALL_SLOT_BYTES;
        let words = area_with(&frame, tags.tag(9), room);
        fn load(w: &[u64]) -> impl Fn(usize) -> u64 + '_ {
            move |at| w[at / 8]
        }
        assert_eq!(landed(&load(&words), 0, room, true, tags.tag(9)), Some(short.frame_len()));
        // Another frame's tag, or the other kind of header: not this frame.
        assert_eq!(landed(&load(&words), 0, room, true, tags.tag(10)), None);
        assert_eq!(landed(&load(&words), 0, room, false, tags.tag(9)), None);
        // Landing word by word: the tag is found only with every word before it in place.
        let stale = area_with(&[0u8; 48], tags.tag(9 + 16), room);
        for done in 0..=frame.len() / 8 + 1 {
            let mut partial = stale.clone();
            partial[..done].copy_from_slice(&words[..done]);
            let found = landed(&load(&partial), 0, room, true, tags.tag(9));
            assert_eq!(found.is_some(), done == frame.len() / 8 + 1, "{done} words landed");
        }
        // A header declaring more than the area holds is never taken as landed.
        let mut huge = short;
        huge.body_len = u16::MAX;
        let words = area_with(huge.as_bytes(), tags.tag(9), room);
        assert_eq!(landed(&load(&words), 0, room, true, tags.tag(9)), None);
    }

    #[test]
    fn arrivals_count_frames_by_tag_or_completion_in_order_and_refuse_a_skipped_slot() {
        let layout = SlotLayout::new(2, SMALL_SLOT_BYTES * 32);
        let mut arrivals = Arrivals::new(2, 0x77, Arrival::Memory);
        // Frame 0 lands short in slot 0: an empty short frame, then its tag.
        let mut words = vec![0u64; layout.region_bytes() / 8];
        let (at, _) = layout.area(0, true);
        words[at / 8 + crate::wire::SHORT_HEADER_BYTES / 8] = Tags::new(0x77).tag(0);
        let load = |w: &Vec<u64>| {
            let w = w.clone();
            move |o: usize| w[o / 8]
        };
        assert_eq!(arrivals.look(load(&words), layout, 0), 0, "nothing beyond the limit");
        assert_eq!(arrivals.look(load(&words), layout, 2), 1);
        assert!(arrivals.short(0));
        // Its completion lands nothing new; frame 1's, whose tag never showed, lands it (long).
        assert_eq!(arrivals.took(SHORT_FRAME), Ok(false));
        assert_eq!(arrivals.took(1), Ok(true));
        assert_eq!((arrivals.landed, arrivals.recvs), (2, 2));
        assert!(!arrivals.short(1));
        // Frame 2 must name slot 0: one naming slot 1 is refused and changes nothing.
        assert_eq!(arrivals.took(1), Err(0));
        assert_eq!((arrivals.landed, arrivals.recvs), (2, 2));
        // Completions only: tags are not looked for.
        let mut completions = Arrivals::new(2, 0x77, Arrival::Completion);
        assert_eq!(completions.look(load(&words), layout, 2), 0);
    }
}
