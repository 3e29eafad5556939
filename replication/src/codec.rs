//! Protocol messages as bytes, for the server's transport: a kind byte, then fixed-width
//! little-endian fields and length-prefixed byte strings. Heartbeats and configurations are
//! rare and small, and go as JSON.
//!
//! Decoding checks every length against the bytes present and refuses trailing bytes, so a
//! malformed or hostile frame is an error, never a panic or an allocation it asked for.
//!
//! Bulk bytes (a push's payload, a forward's delta, a snapshot's data) start at a multiple of
//! [`BULK_ALIGN`] in the frame body: a byte after their length says how many zero bytes pad
//! them there. A large bulk decoded from a frame its caller shares ([`decode_batch_into`]) is
//! then a view of the frame, not a copy, and its values read in place as f32s and u64s.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::config::{REUSED_PAYLOADS_MAX, REUSED_PAYLOAD_BYTES_MAX, SHARED_BULK_BYTES_MIN, WORKERS_MAX};
use crate::error::{ReplicationError, Result};
use crate::protocol::{ClusterConfig, Epoch, Msg, NodeId, Payload, RangeId, RangeReport, WorkerId};

const PUSH: u8 = 1;
const PUSH_ACK: u8 = 2;
const NOT_HEAD: u8 = 3;
const FORWARD: u8 = 4;
const ACK: u8 = 5;
const NEED: u8 = 6;
const SNAPSHOT: u8 = 7;
const HEARTBEAT: u8 = 8;
const CONFIG: u8 = 9;
const SEQ_COUNT: u8 = 10;
const RESUME: u8 = 11;
const DURABLE: u8 = 12;
const REFUSED: u8 = 13;

/// A heartbeat's fields, as JSON carries them.
#[derive(serde::Serialize, serde::Deserialize)]
struct HeartbeatJson {
    node: NodeId,
    incarnation: u64,
    addr: String,
    #[serde(default)]
    cluster: u64,
    config_id: u64,
    ranges: Vec<RangeReport>,
}

/// Where bulk bytes start in a frame body: a multiple of this, so that they read in place as
/// u64s and f32s.
pub const BULK_ALIGN: usize = 8;

/// Appends `msg` to `out`, taken to start a frame body.
pub fn encode(msg: &Msg, out: &mut Vec<u8>) {
    encode_with(msg, out, true, 0);
}

/// [`encode`], with the bulk bytes ([`bulk`]) themselves left out when `with_bulk` is false
/// (their length is written): they end the message, so they can follow from where they lie.
/// `elsewhere` counts the body's bytes ahead of `out`'s end that are not in `out` (bulk sent
/// from where it lies), so that this message's bulk is aligned where it lands in the body.
fn encode_with(msg: &Msg, out: &mut Vec<u8>, with_bulk: bool, elsewhere: usize) {
    let mut w = Writer { out, elsewhere };
    match msg {
        Msg::Push { range, worker, seq, payload } => {
            w.u8(PUSH).u32(range.0).u32(worker.0).u32(*seq).bulk(payload, with_bulk);
        }
        Msg::PushAck { range, seq } => {
            w.u8(PUSH_ACK).u32(range.0).u32(*seq);
        }
        Msg::SeqCount { range, seq } => {
            w.u8(SEQ_COUNT).u32(range.0).u32(*seq);
        }
        Msg::NotHead { range, config_id } => {
            w.u8(NOT_HEAD).u32(range.0).u64(*config_id);
        }
        Msg::Refused { range, seq, status, reason } => {
            w.u8(REFUSED).u32(range.0).u32(*seq).u32(u32::from(*status)).bytes(reason.as_bytes());
        }
        Msg::Forward { range, epoch, version, digest, clock, delta, durable } => {
            w.u8(FORWARD).u32(range.0).u64(epoch.0).u64(*version).u32(*digest).u64(*durable).clock(clock).bulk(delta, with_bulk);
        }
        Msg::Durable { range, epoch, version } => {
            w.u8(DURABLE).u32(range.0).u64(epoch.0).u64(*version);
        }
        Msg::Ack { range, epoch, version } => {
            w.u8(ACK).u32(range.0).u64(epoch.0).u64(*version);
        }
        Msg::Need { range, epoch, version } => {
            w.u8(NEED).u32(range.0).u64(epoch.0).u64(*version);
        }
        Msg::Snapshot { range, epoch, version, digest, clock, data } => {
            w.u8(SNAPSHOT).u32(range.0).u64(epoch.0).u64(*version).u32(*digest).clock(clock).bulk(data, with_bulk);
        }
        Msg::Resume { range, epoch, version, digest } => {
            w.u8(RESUME).u32(range.0).u64(epoch.0).u64(*version).u32(*digest);
        }
        Msg::Heartbeat { node, incarnation, addr, cluster, config_id, ranges } => {
            let hb =
                HeartbeatJson { node: *node, incarnation: *incarnation, addr: addr.clone(), cluster: *cluster, config_id: *config_id, ranges: ranges.clone() };
            w.u8(HEARTBEAT).bytes(&serde_json::to_vec(&hb).expect("plain data serialises"));
        }
        Msg::Config(config) => {
            w.u8(CONFIG).bytes(&serde_json::to_vec(&**config).expect("plain data serialises"));
        }
    }
}

/// The length of `msg`'s bulk bytes (a push's payload, a forward's delta, a snapshot's data):
/// a lower bound of its encoded length that costs nothing to know, for choosing a path before
/// encoding. Zero for the other messages.
pub fn bulk_len(msg: &Msg) -> usize {
    bulk(msg).len()
}

/// `msg`'s bulk bytes (a push's payload, a forward's delta, a snapshot's data), with which its
/// encoding ends; empty for the other messages.
pub fn bulk(msg: &Msg) -> &[u8] {
    match msg {
        Msg::Push { payload, .. } => payload,
        Msg::Forward { delta, .. } => delta,
        Msg::Snapshot { data, .. } => data,
        _ => &[],
    }
}

/// Reads one message that fills `bytes` exactly.
pub fn decode(bytes: &[u8]) -> Result<Msg> {
    decode_with(bytes, None, &mut PayloadPool::unkept())
}

/// [`decode`], with payloads viewed in `frame` when they lie in it ([`PayloadPool::take`]), or from
/// `payloads`.
fn decode_with(bytes: &[u8], frame: Option<&Payload>, payloads: &mut PayloadPool) -> Result<Msg> {
    let mut r = Reader { bytes, at: 0 };
    let msg = match r.u8()? {
        PUSH => Msg::Push { range: RangeId(r.u32()?), worker: WorkerId(r.u32()?), seq: r.u32()?, payload: payloads.take(r.bulk()?, frame) },
        PUSH_ACK => Msg::PushAck { range: RangeId(r.u32()?), seq: r.u32()? },
        SEQ_COUNT => Msg::SeqCount { range: RangeId(r.u32()?), seq: r.u32()? },
        NOT_HEAD => Msg::NotHead { range: RangeId(r.u32()?), config_id: r.u64()? },
        REFUSED => {
            let (range, seq, status) = (RangeId(r.u32()?), r.u32()?, r.u32()?);
            let status = u16::try_from(status).map_err(|_| bad(format!("status {status} in a refusal")))?;
            let reason = String::from_utf8_lossy(r.bytes()?).into_owned();
            Msg::Refused { range, seq, status, reason }
        }
        FORWARD => Msg::Forward {
            range: RangeId(r.u32()?),
            epoch: Epoch(r.u64()?),
            version: r.u64()?,
            digest: r.u32()?,
            durable: r.u64()?,
            clock: payloads.clock(r.clock()?),
            delta: payloads.take(r.bulk()?, frame),
        },
        DURABLE => Msg::Durable { range: RangeId(r.u32()?), epoch: Epoch(r.u64()?), version: r.u64()? },
        ACK => Msg::Ack { range: RangeId(r.u32()?), epoch: Epoch(r.u64()?), version: r.u64()? },
        NEED => Msg::Need { range: RangeId(r.u32()?), epoch: Epoch(r.u64()?), version: r.u64()? },
        SNAPSHOT => Msg::Snapshot {
            range: RangeId(r.u32()?),
            epoch: Epoch(r.u64()?),
            version: r.u64()?,
            digest: r.u32()?,
            clock: payloads.clock(r.clock()?),
            data: r.bulk()?.to_vec().into(),
        },
        RESUME => Msg::Resume { range: RangeId(r.u32()?), epoch: Epoch(r.u64()?), version: r.u64()?, digest: r.u32()? },
        HEARTBEAT => {
            let hb: HeartbeatJson = serde_json::from_slice(r.bytes()?).map_err(|e| bad(format!("heartbeat: {e}")))?;
            Msg::Heartbeat { node: hb.node, incarnation: hb.incarnation, addr: hb.addr, cluster: hb.cluster, config_id: hb.config_id, ranges: hb.ranges }
        }
        CONFIG => {
            let config: ClusterConfig = serde_json::from_slice(r.bytes()?).map_err(|e| bad(format!("configuration: {e}")))?;
            Msg::Config(Arc::new(config))
        }
        kind => return Err(bad(format!("unknown message kind {kind}"))),
    };
    if r.at != bytes.len() {
        return Err(bad(format!("{} bytes after a {} message", bytes.len() - r.at, msg.kind())));
    }
    Ok(msg)
}

fn bad(reason: String) -> ReplicationError {
    ReplicationError::BadMessage { reason }
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    /// Bytes of the body ahead of `out`'s end that are not in `out` (see [`encode_with`]).
    elsewhere: usize,
}

impl Writer<'_> {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// `v` after its length.
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).expect("a message part under 4 GiB"));
        self.out.extend_from_slice(v);
        self
    }
    /// `v`'s length, the zero bytes that bring `v` to a multiple of [`BULK_ALIGN`] in the body
    /// (their count first), and `v` itself if `with`.
    fn bulk(&mut self, v: &[u8], with: bool) -> &mut Self {
        self.u32(u32::try_from(v.len()).expect("a message part under 4 GiB"));
        let pad = (self.elsewhere + self.out.len() + 1).wrapping_neg() % BULK_ALIGN;
        self.u8(pad as u8);
        self.out.extend_from_slice(&[0; BULK_ALIGN][..pad]);
        if with {
            self.out.extend_from_slice(v);
        }
        self
    }
    fn clock(&mut self, clock: &[u32]) -> &mut Self {
        self.u32(clock.len() as u32);
        clock.iter().for_each(|c| self.out.extend_from_slice(&c.to_le_bytes()));
        self
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or_else(|| bad(format!("truncated: {n} bytes wanted at offset {}, {} present", self.at, self.bytes.len())))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// What [`Writer::bulk`] wrote.
    fn bulk(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        let pad = self.u8()? as usize;
        if pad >= BULK_ALIGN {
            return Err(bad(format!("{pad} bytes of padding before bulk bytes, at most {} allowed", BULK_ALIGN - 1)));
        }
        self.take(pad)?;
        self.take(n)
    }
    /// A clock's words, little-endian (see [`PayloadPool::clock`]).
    fn clock(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()?;
        if n > WORKERS_MAX {
            return Err(bad(format!("a clock of {n} workers, over the limit of {WORKERS_MAX}")));
        }
        self.take(n as usize * 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A push in a batch, at any offset and of any payload length, takes at most
    /// [`PUSH_BATCHED_OVERHEAD_MAX`] bytes beyond its payload; an acknowledgement fits in it too.
    #[test]
    fn a_batched_push_takes_at_most_its_overhead_beyond_the_payload() {
        for ahead in 0..2 * BULK_ALIGN {
            for len in [0, 1, 7, 8, 13, 4096] {
                let msg = Msg::Push { range: RangeId(1), worker: WorkerId(2), seq: 3, payload: Payload::from(vec![5u8; len]) };
                let mut out = vec![0; ahead];
                encode_batch_after([&msg], &mut out, 0);
                assert!(out.len() - ahead <= len + PUSH_BATCHED_OVERHEAD_MAX, "{} bytes for a {len}-byte payload after {ahead}", out.len() - ahead);
            }
        }
        let mut out = Vec::new();
        encode_batch([&Msg::PushAck { range: RangeId(1), seq: 2 }], &mut out);
        assert!(out.len() <= PUSH_BATCHED_OVERHEAD_MAX);
    }
    use crate::protocol::{Chain, Member};

    fn samples() -> Vec<Msg> {
        let clock: Arc<[u32]> = vec![3, 0, 7].into();
        let config = ClusterConfig {
            id: 4,
            members: vec![Member { node: NodeId(2), incarnation: 9, addr: "127.0.0.1:1".into(), draining: false }],
            chains: vec![Chain { epoch: Epoch(3), nodes: vec![NodeId(2)], learner: None }],
            drained: vec![Member { node: NodeId(5), incarnation: 2, addr: "127.0.0.1:2".into(), draining: true }],
            cluster: 11,
        };
        let report = RangeReport { range: RangeId(1), epoch: Epoch(2), installed: true, version: 5, committed: 4, ticks: 10, learner_synced: false };
        vec![
            Msg::Push { range: RangeId(1), worker: WorkerId(2), seq: 3, payload: vec![1, 2, 3].into() },
            Msg::PushAck { range: RangeId(1), seq: 9 },
            Msg::SeqCount { range: RangeId(2), seq: 4 },
            Msg::NotHead { range: RangeId(1), config_id: 77 },
            Msg::Refused { range: RangeId(3), seq: 12, status: 7, reason: "table 1 is full".into() },
            Msg::Forward { range: RangeId(5), epoch: Epoch(2), version: 8, digest: 0xDEAD_BEEF, clock: clock.clone(), delta: vec![9; 10].into(), durable: 6 },
            Msg::Durable { range: RangeId(5), epoch: Epoch(2), version: 7 },
            Msg::Ack { range: RangeId(5), epoch: Epoch(2), version: 8 },
            Msg::Need { range: RangeId(5), epoch: Epoch(2), version: 8 },
            Msg::Snapshot { range: RangeId(5), epoch: Epoch(2), version: 8, digest: 7, clock, data: Vec::new().into() },
            Msg::Resume { range: RangeId(5), epoch: Epoch(2), version: 8, digest: 7 },
            Msg::Heartbeat { node: NodeId(1), incarnation: 2, addr: "a:1".into(), cluster: 7, config_id: 3, ranges: vec![report] },
            Msg::Config(Arc::new(config)),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let mut bytes = Vec::new();
            encode(&msg, &mut bytes);
            assert_eq!(decode(&bytes).unwrap(), msg);
            assert!(bulk_len(&msg) < bytes.len(), "{}: the bulk bytes bound the encoding from below", msg.kind());
        }
        let forward = &samples().into_iter().find(|m| m.kind() == "forward").expect("a forward");
        assert_eq!(bulk_len(forward), 10, "a forward's bulk is its delta");
    }

    /// A batch's head of a message, then its bulk, are the batch's encoding of it, after
    /// whatever the batch held before.
    #[test]
    fn a_batch_head_and_its_bulk_are_the_batch() {
        for msg in samples() {
            let before = Msg::PushAck { range: RangeId(1), seq: 9 };
            let mut whole = Vec::new();
            encode_batch([&before, &msg], &mut whole);
            let mut parts = Vec::new();
            encode_batch([&before], &mut parts);
            let tail = encode_batch_head(&msg, &mut parts, 0);
            assert_eq!(tail, bulk(&msg));
            parts.extend_from_slice(tail);
            assert_eq!(parts, whole, "{}", msg.kind());
        }
    }

    /// An aligned buffer, as a frame a transport shares.
    struct Words(Vec<u64>);

    impl AsRef<[u8]> for Words {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }

    /// However a body is put together (encoded whole, or heads with each large bulk sent from
    /// where it lies), every bulk starts at a multiple of [`BULK_ALIGN`] in it; decoded from a
    /// shared frame, a large bulk is a view of the frame and a small one a copy.
    #[test]
    fn bulk_lands_aligned_and_a_large_one_is_viewed_in_place() {
        let push = |seq: u32, n: usize| Msg::Push { range: RangeId(1), worker: WorkerId(2), seq, payload: Payload::from(vec![seq as u8; n]) };
        let msgs = [
            push(1, SHARED_BULK_BYTES_MIN + 3),
            Msg::PushAck { range: RangeId(1), seq: 9 },
            push(2, 10),
            push(3, SHARED_BULK_BYTES_MIN + 5),
            push(4, SHARED_BULK_BYTES_MIN),
        ];
        let mut whole = Vec::new();
        encode_batch(&msgs, &mut whole);
        let (mut heads, mut cuts, mut elsewhere) = (Vec::new(), Vec::new(), 0);
        for msg in &msgs {
            if bulk_len(msg) >= SHARED_BULK_BYTES_MIN {
                let bulk = encode_batch_head(msg, &mut heads, elsewhere);
                cuts.push((heads.len(), bulk));
                elsewhere += bulk.len();
            } else {
                encode_batch_after([msg], &mut heads, elsewhere);
            }
        }
        let (mut sent, mut from) = (Vec::new(), 0);
        for (cut, bulk) in cuts {
            sent.extend_from_slice(&heads[from..cut]);
            sent.extend_from_slice(bulk);
            from = cut;
        }
        sent.extend_from_slice(&heads[from..]);
        assert_eq!(sent, whole, "heads and bulks are the body encoded whole");
        let mut words = vec![0u64; whole.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..whole.len()].copy_from_slice(&whole);
        let frame = Payload::whole(Arc::new(Words(words)));
        let frame = frame.view(&frame[..whole.len()]).expect("a part of it");
        let mut decoded = Vec::new();
        decode_batch_into(&frame, Some(&frame), &mut PayloadPool::default(), &mut decoded).unwrap();
        assert_eq!(decoded, msgs);
        let within = |p: &[u8]| frame.as_ptr_range().contains(&p.as_ptr());
        for msg in &decoded {
            let bulk = bulk(msg);
            assert!((bulk.as_ptr() as usize).is_multiple_of(BULK_ALIGN) || bulk.is_empty(), "{msg:?} aligned");
            assert_eq!(within(bulk), bulk.len() >= SHARED_BULK_BYTES_MIN, "only a large bulk is a view");
        }
        // A frame the bytes do not lie in is no source: every payload is a copy.
        let elsewhere = Payload::from(whole.clone());
        decode_batch_into(&frame, Some(&elsewhere), &mut PayloadPool::default(), &mut decoded).unwrap();
        assert!(decoded.iter().all(|m| !elsewhere.as_ptr_range().contains(&bulk(m).as_ptr())));
        // Padding past its limit is malformed.
        let mut bad = Vec::new();
        encode(&push(5, 8), &mut bad);
        let pad_at = 1 + 12 + 4;
        bad[pad_at] = BULK_ALIGN as u8;
        assert!(decode(&bad).unwrap_err().to_string().contains("padding"));
    }

    #[test]
    fn truncated_extended_and_unknown_messages_are_errors() {
        for msg in samples() {
            let mut bytes = Vec::new();
            encode(&msg, &mut bytes);
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "{} cut at {cut}", msg.kind());
            }
            bytes.push(0);
            assert!(decode(&bytes).unwrap_err().to_string().contains("after a"));
        }
        assert!(decode(&[200]).unwrap_err().to_string().contains("unknown message kind 200"));
        // A clock claiming four billion workers is refused before anything is allocated.
        let mut huge = vec![FORWARD];
        huge.extend_from_slice(&[0; 4 + 8 + 8 + 4 + 8]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).unwrap_err().to_string().contains("over the limit"));
    }
}

/// What a worker's push names, before its keys and values: the payload of a [`Msg::Push`] as
/// the engine reads it. 40 bytes; then, for a push of listed keys (`listed`), `count`
/// little-endian u64 keys; then `count * dim` little-endian f32s. A dense push names the keys
/// `start .. start + count` instead, and a listed one leaves `start` at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushHeader {
    pub table: u32,
    pub dim: u32,
    pub start: u64,
    pub count: u32,
    pub worker: u32,
    /// The worker's clock (its iteration), for the engine's per-key vector clocks.
    pub clock: u64,
    /// The keys are listed after the header (a sparse push), not a range from `start`.
    pub listed: bool,
    /// The push completes the worker's clock on the whole replication range, not only on the
    /// keys it lists: a sparse push under bounded delay, whose pulls wait on every worker's
    /// clock over the keys they read. Such a push may list no keys at all (`count` 0).
    pub range_done: bool,
}

/// How a listed push's keys travel from a worker to its head: key-list caching (Li et al.,
/// OSDI'14, section 5.1) between the two ends of one connection. A head turns every push back
/// into a [`KeyList::Plain`] one ([`PushHeader::plain`]) before it applies, logs or forwards
/// it, so nothing past the head sees the other two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyList {
    /// The keys are in the payload.
    Plain,
    /// The keys are in the payload, and the head remembers them (for this connection) under
    /// their list's hash.
    Remember,
    /// The keys are left out: the header's `start` is the hash of a list the head remembers
    /// for this connection, and `count` its length.
    Cached { hash: u64 },
}

/// A push payload's flag bits (the word after `clock`), and where that word and `start` are.
const LISTED: u32 = 1;
const RANGE_DONE: u32 = 2;
const KEYS_REMEMBER: u32 = 4;
const KEYS_CACHED: u32 = 8;
const START_AT: usize = 8;
const FLAGS_AT: usize = 32;

/// A push's payload, split: its header, its listed keys' bytes (empty for a range), its values' bytes.
pub type PushParts<'a> = (PushHeader, &'a [u8], &'a [u8]);

impl PushHeader {
    pub const BYTES: usize = 40;

    /// The payload of a range push: this header, then `values`.
    pub fn payload(&self, values: &[f32]) -> Vec<u8> {
        self.keyed_payload(&[], values)
    }

    /// The payload: this header, then `keys` (empty unless `listed`), then `values`.
    pub fn keyed_payload(&self, keys: &[u64], values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::BYTES + keys.len() * 8 + values.len() * 4);
        self.write_head(&mut out);
        // Little-endian in place, as every frame of the wire format (the transport refuses to
        // build for big-endian hosts).
        out.extend_from_slice(bytemuck::cast_slice(keys));
        out.extend_from_slice(bytemuck::cast_slice(values));
        out
    }

    /// Appends this header to `out`: a payload's first [`Self::BYTES`] bytes, which its keys
    /// (if `listed`) and then its values follow.
    pub fn write_head(&self, out: &mut Vec<u8>) {
        Writer { out, elsewhere: 0 }.u32(self.table).u32(self.dim).u64(self.start).u32(self.count).u32(self.worker).u64(self.clock);
        let flags = if self.listed { LISTED } else { 0 } | if self.range_done { RANGE_DONE } else { 0 };
        Writer { out, elsewhere: 0 }.u32(flags).u32(0);
    }

    /// Splits a payload into its header, its keys' bytes and its values' bytes, checking
    /// their lengths.
    pub fn parse(payload: &[u8]) -> Result<PushParts<'_>> {
        let mut r = Reader { bytes: payload, at: 0 };
        let mut h = PushHeader {
            table: r.u32()?,
            dim: r.u32()?,
            start: r.u64()?,
            count: r.u32()?,
            worker: r.u32()?,
            clock: r.u64()?,
            listed: false,
            range_done: false,
        };
        (h.listed, h.range_done) = match (r.u32()?, r.u32()?) {
            (0, 0) => (false, false),
            (LISTED, 0) => (true, false),
            (3, 0) => (true, true),
            (l, 0) if l & (KEYS_REMEMBER | KEYS_CACHED) != 0 => {
                return Err(bad(format!("a push whose keys are cached or to be remembered (flags {l}) past the head that resolves them")))
            }
            (l, pad) => return Err(bad(format!("a push header with flags {l} and {pad}"))),
        };
        let key_bytes = if h.listed { h.count as usize * 8 } else { 0 };
        let rest = &payload[Self::BYTES..];
        let values = h.count as u64 * h.dim as u64 * 4;
        if rest.len() as u64 != key_bytes as u64 + values {
            return Err(bad(format!("{} bytes of keys and values for {} keys of {} components", rest.len(), h.count, h.dim)));
        }
        let (keys, values) = rest.split_at(key_bytes);
        Ok((h, keys, values))
    }

    /// How `payload`'s keys travel (see [`KeyList`]).
    pub fn key_list(payload: &[u8]) -> Result<KeyList> {
        if payload.len() < Self::BYTES {
            return Err(bad(format!("a push payload of {} bytes, shorter than its header", payload.len())));
        }
        let word = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
        let flags = word(FLAGS_AT);
        let listed = flags & LISTED != 0;
        match (flags & KEYS_REMEMBER != 0, flags & KEYS_CACHED != 0) {
            (false, false) => Ok(KeyList::Plain),
            (true, false) if listed => Ok(KeyList::Remember),
            (false, true) if listed => Ok(KeyList::Cached { hash: u64::from_le_bytes(payload[START_AT..START_AT + 8].try_into().expect("8 bytes")) }),
            _ => Err(bad(format!("a push header with flags {flags}: only a listed push's keys are cached, and not both ways at once"))),
        }
    }

    /// `plain` (a plain push payload with listed keys, as [`keyed_payload`](Self::keyed_payload)
    /// makes) sent as `how`: with its keys to be remembered, or with `hash` in their place.
    pub fn with_key_list(plain: &[u8], how: KeyList) -> Vec<u8> {
        let mut out = Vec::new();
        Self::write_with_key_list(plain, how, &mut out);
        out
    }

    /// [`with_key_list`](Self::with_key_list), written into `out` (cleared first).
    pub fn write_with_key_list(plain: &[u8], how: KeyList, out: &mut Vec<u8>) {
        out.clear();
        match how {
            KeyList::Plain | KeyList::Remember => out.extend_from_slice(plain),
            KeyList::Cached { hash } => {
                let count = u32::from_le_bytes(plain[16..20].try_into().expect("4 bytes")) as usize;
                out.extend_from_slice(&plain[..Self::BYTES]);
                out.extend_from_slice(&plain[Self::BYTES + count * 8..]);
                out[START_AT..START_AT + 8].copy_from_slice(&hash.to_le_bytes());
            }
        }
        let flag = match how {
            KeyList::Plain => 0,
            KeyList::Remember => KEYS_REMEMBER,
            KeyList::Cached { .. } => KEYS_CACHED,
        };
        let flags = u32::from_le_bytes(out[FLAGS_AT..FLAGS_AT + 4].try_into().expect("4 bytes")) | flag;
        out[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&flags.to_le_bytes());
    }

    /// The plain payload `sent` stands for: a [`KeyList::Remember`] one without its flag, or a
    /// [`KeyList::Cached`] one with `keys` (the list its hash names) put back. Checked as
    /// [`parse`](Self::parse) checks a plain payload.
    pub fn plain(sent: &[u8], keys: Option<&[u64]>) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(sent.len() + keys.map_or(0, |k| k.len() * 8));
        Self::write_plain(sent, keys, &mut out)?;
        Ok(out)
    }

    /// [`plain`](Self::plain), written into `out` (cleared first).
    pub fn write_plain(sent: &[u8], keys: Option<&[u64]>, out: &mut Vec<u8>) -> Result<()> {
        let how = Self::key_list(sent)?;
        out.clear();
        match (how, keys) {
            (KeyList::Cached { .. }, Some(keys)) => {
                out.extend_from_slice(&sent[..Self::BYTES]);
                out.extend_from_slice(bytemuck::cast_slice(keys));
                out.extend_from_slice(&sent[Self::BYTES..]);
                out[START_AT..START_AT + 8].copy_from_slice(&0u64.to_le_bytes());
            }
            (KeyList::Cached { .. }, None) => return Err(bad("a cached key list's payload needs its keys back".into())),
            _ => out.extend_from_slice(sent),
        }
        let flags = u32::from_le_bytes(out[FLAGS_AT..FLAGS_AT + 4].try_into().expect("4 bytes")) & !(KEYS_REMEMBER | KEYS_CACHED);
        out[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&flags.to_le_bytes());
        Self::parse(out)?;
        Ok(())
    }
}

/// Most bytes a `Push` (or a `PushAck`) takes in a batch beyond its payload: its length, kind,
/// range, worker, seq, payload length, padding count and up to [`BULK_ALIGN`] - 1 bytes of
/// padding. A batch's writer knows before encoding whether a push still fits its frame.
pub const PUSH_BATCHED_OVERHEAD_MAX: usize = 4 + 1 + 4 + 4 + 4 + 4 + 1 + BULK_ALIGN - 1;

/// Appends `msgs` to `out`, each with its length first: a request or reply carrying several
/// messages. `out` is taken to start a frame body.
pub fn encode_batch<'a>(msgs: impl IntoIterator<Item = &'a Msg>, out: &mut Vec<u8>) {
    encode_batch_after(msgs, out, 0);
}

/// [`encode_batch`] into a body that also holds `elsewhere` bytes ahead of `out`'s end that are
/// not in `out` (see [`encode_batch_head`]).
pub fn encode_batch_after<'a>(msgs: impl IntoIterator<Item = &'a Msg>, out: &mut Vec<u8>, elsewhere: usize) {
    for msg in msgs {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        encode_with(msg, out, true, elsewhere);
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// [`encode_batch_after`] of one more message, all but its bulk bytes, which it returns: `out`,
/// then the bulk, are what it would have written. A large update is sent from where it lies, not
/// copied into a request first.
pub fn encode_batch_head<'m>(msg: &'m Msg, out: &mut Vec<u8>, elsewhere: usize) -> &'m [u8] {
    let bulk = bulk(msg);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    encode_with(msg, out, false, elsewhere);
    let len = u32::try_from(out.len() - at - 4 + bulk.len()).expect("a message under 4 GiB");
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    bulk
}

/// Reads what [`encode_batch`] wrote.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Msg>> {
    let mut msgs = Vec::new();
    decode_batch_into(bytes, None, &mut PayloadPool::unkept(), &mut msgs)?;
    Ok(msgs)
}

/// [`decode_batch`] into `msgs` (cleared first), a vector its caller keeps. A large payload is
/// a view of `frame` when `bytes` lie in it (the caller shares the frame's buffer), else a copy
/// from `payloads` ([`PayloadPool::take`]). On an error `msgs` holds the messages before the
/// bad one.
pub fn decode_batch_into(bytes: &[u8], frame: Option<&Payload>, payloads: &mut PayloadPool, msgs: &mut Vec<Msg>) -> Result<()> {
    msgs.clear();
    let mut r = Reader { bytes, at: 0 };
    while r.at < bytes.len() {
        msgs.push(decode_with(r.bytes()?, frame, payloads)?);
    }
    Ok(())
}

/// Payloads of the messages a server decodes (pushes, forwarded updates) and a client sends,
/// refilled for a later payload, at any length, once nothing else holds them: a warm data path
/// allocates none. Freeing and allocating a payload of hundreds of KiB per message also made
/// glibc's allocator hand its pages back to the kernel and fault them in again.
#[derive(Debug)]
pub struct PayloadPool {
    /// Oldest handed out first: payloads are let go of in about the order they were made (as
    /// their pushes are acknowledged), so the front is the likeliest to be free.
    kept: VecDeque<Payload>,
    /// The capacities of `kept`, summed.
    bytes: usize,
    /// The clocks of the updates decoded, refilled the same way.
    clocks: VecDeque<Arc<[u32]>>,
    /// Whether payloads are kept at all: a one-off decode keeps none.
    keeps: bool,
}

impl Default for PayloadPool {
    fn default() -> Self {
        Self { kept: VecDeque::new(), bytes: 0, clocks: VecDeque::new(), keeps: true }
    }
}

impl PayloadPool {
    /// A pool that keeps nothing: every payload is a new allocation, for a decoder that has no
    /// pool of its own ([`decode`], [`decode_batch`]).
    pub const fn unkept() -> Self {
        Self { kept: VecDeque::new(), bytes: 0, clocks: VecDeque::new(), keeps: false }
    }

    /// A payload holding `bytes`; see [`make_with`](Self::make_with).
    pub fn make(&mut self, bytes: &[u8]) -> Payload {
        self.make_with(|out| out.extend_from_slice(bytes))
    }

    /// A payload holding `bulk`: a view of `frame`, with no copy, when `bulk` lies in it, is at
    /// least [`SHARED_BULK_BYTES_MIN`] long (a small one would keep a whole frame's buffer from
    /// reuse) and starts aligned to [`BULK_ALIGN`] (to be read in place); else [`make`](Self::make).
    pub fn take(&mut self, bulk: &[u8], frame: Option<&Payload>) -> Payload {
        let viewable = bulk.len() >= SHARED_BULK_BYTES_MIN && (bulk.as_ptr() as usize).is_multiple_of(BULK_ALIGN);
        match frame.filter(|_| viewable).and_then(|frame| frame.view(bulk)) {
            Some(view) => view,
            None => self.make(bulk),
        }
    }

    /// A payload that `fill` writes (it is given it empty): a kept one that nothing else holds
    /// any more, if one of the [`REUSE_LOOKS`] oldest is; else a new one, kept too while the
    /// pool holds fewer than [`REUSED_PAYLOADS_MAX`] of at most [`REUSED_PAYLOAD_BYTES_MAX`]
    /// bytes of capacity together.
    pub fn make_with(&mut self, fill: impl FnOnce(&mut Vec<u8>)) -> Payload {
        if !self.keeps {
            let mut made = Vec::new();
            fill(&mut made);
            return made.into();
        }
        for _ in 0..self.kept.len().min(REUSE_LOOKS) {
            let mut kept = self.kept.pop_front().expect("counted");
            if let Some(free) = kept.vec_mut() {
                let before = free.capacity();
                free.clear();
                fill(free);
                self.bytes = self.bytes - before + free.capacity();
                if self.bytes <= REUSED_PAYLOAD_BYTES_MAX {
                    self.kept.push_back(kept.clone());
                } else {
                    // Grown past the cap: handed out, and no longer kept.
                    self.bytes -= kept.capacity();
                }
                return kept;
            }
            self.kept.push_back(kept);
        }
        let mut made = Vec::new();
        fill(&mut made);
        let made = Payload::from(made);
        if self.kept.len() < REUSED_PAYLOADS_MAX && self.bytes + made.capacity() <= REUSED_PAYLOAD_BYTES_MAX {
            self.bytes += made.capacity();
            self.kept.push_back(made.clone());
        } else if self.bytes + made.capacity() > REUSED_PAYLOAD_BYTES_MAX {
            // Make room for the next ones by letting go of the payloads nothing else holds.
            self.kept.retain(Payload::is_shared);
            self.bytes = self.kept.iter().map(|k| k.capacity()).sum();
        }
        made
    }
}

impl PayloadPool {
    /// A clock holding the little-endian words `raw`: a kept one of its length that nothing
    /// else holds any more, if one of the [`REUSE_LOOKS`] oldest is (a replica keeps the clocks
    /// of its last updates, as it keeps their payloads); else a new one, kept too while the
    /// pool holds fewer than [`REUSED_PAYLOADS_MAX`].
    pub fn clock(&mut self, raw: &[u8]) -> Arc<[u32]> {
        let words = || raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")));
        if !self.keeps {
            return words().collect();
        }
        for _ in 0..self.clocks.len().min(REUSE_LOOKS) {
            let mut kept = self.clocks.pop_front().expect("counted");
            if kept.len() == raw.len() / 4 {
                if let Some(free) = Arc::get_mut(&mut kept) {
                    free.iter_mut().zip(words()).for_each(|(to, word)| *to = word);
                    self.clocks.push_back(kept.clone());
                    return kept;
                }
            }
            self.clocks.push_back(kept);
        }
        let made: Arc<[u32]> = words().collect();
        if self.clocks.len() < REUSED_PAYLOADS_MAX {
            self.clocks.push_back(made.clone());
        }
        made
    }
}

/// Kept payloads [`PayloadPool::make_with`] looks at for a free one before it makes one.
const REUSE_LOOKS: usize = 8;

#[cfg(test)]
mod payload_tests {
    use super::*;

    /// A clock is reused only once nothing else holds it, and only for a clock of its length.
    #[test]
    fn payload_pool_reuses_only_clocks_nothing_else_holds() {
        let le = |words: &[u32]| words.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        let mut pool = PayloadPool::default();
        let first = pool.clock(&le(&[1, 2, 3]));
        let second = pool.clock(&le(&[4, 5, 6]));
        assert_eq!((&*first, &*second), (&[1, 2, 3][..], &[4, 5, 6][..]));
        assert_ne!(first.as_ptr(), second.as_ptr(), "a clock still held is not handed out again");
        let at = first.as_ptr();
        drop(first);
        let longer = pool.clock(&le(&[7, 8, 9, 10]));
        assert_ne!(longer.as_ptr(), at, "a clock of another length is not refilled");
        let third = pool.clock(&le(&[7, 8, 9]));
        assert_eq!((third.as_ptr(), &*third), (at, &[7, 8, 9][..]), "a free clock is refilled");
        let mut unkept = PayloadPool::unkept();
        assert_eq!(&*unkept.clock(&le(&[1])), &[1]);
        assert!(unkept.clocks.is_empty(), "a pool that keeps nothing keeps no clock");
    }

    /// A payload is reused, at any length, only once nothing else holds it; the pool keeps no
    /// more than its caps; a pool that keeps nothing keeps nothing.
    #[test]
    fn payload_pool_reuses_only_payloads_nothing_else_holds() {
        let mut pool = PayloadPool::default();
        let first = pool.make(&[7u8; 100]);
        let second = pool.make(&[7u8; 100]);
        assert_ne!(first.as_ptr(), second.as_ptr(), "a payload still held is not handed out again");
        let at = first.as_ptr();
        let copy = first.clone();
        drop(first);
        assert_ne!(pool.make(&[9u8; 60]).as_ptr(), at, "nor one a clone of it still holds");
        drop(copy);
        let again = pool.make(&[9u8; 60]);
        assert_eq!(again.as_ptr(), at, "a payload nothing else holds is reused, at another length");
        assert_eq!(&again[..], &[9u8; 60][..], "and refilled");
        let mut unkept = PayloadPool::unkept();
        let once = unkept.make(&[1, 2, 3]);
        assert_eq!(&once[..], &[1, 2, 3]);
        assert!(unkept.kept.is_empty() && unkept.bytes == 0, "a pool that keeps nothing keeps no payload");
        let big = vec![7u8; 1 << 20];
        let held: Vec<_> = (0..(REUSED_PAYLOAD_BYTES_MAX >> 20) * 2).map(|_| pool.make(&big)).collect();
        assert!(pool.bytes <= REUSED_PAYLOAD_BYTES_MAX);
        assert_eq!(pool.bytes, pool.kept.iter().map(|k| k.capacity()).sum::<usize>());
        drop((held, second, again));
        // A free payload refilled past the cap is handed out and no longer kept.
        let huge = pool.make(&vec![0u8; REUSED_PAYLOAD_BYTES_MAX]);
        assert!(!pool.kept.iter().any(|k| k.as_ptr() == huge.as_ptr()));
        assert!(pool.bytes <= REUSED_PAYLOAD_BYTES_MAX);
        assert_eq!(pool.bytes, pool.kept.iter().map(|k| k.capacity()).sum::<usize>());
        drop(huge);
        let many: Vec<_> = (0..REUSED_PAYLOADS_MAX + 10).map(|_| pool.make(&[1])).collect();
        assert!(pool.kept.len() <= REUSED_PAYLOADS_MAX);
        drop(many);
    }

    #[test]
    fn push_payloads_and_batches_round_trip_and_wrong_lengths_are_refused() {
        let h = PushHeader { table: 3, dim: 2, start: 10, count: 2, worker: 1, clock: 7, listed: false, range_done: false };
        let p = h.payload(&[1.0, 2.0, 3.0, 4.0]);
        let (back, keys, values) = PushHeader::parse(&p).unwrap();
        assert_eq!((back, keys.len(), values.len()), (h, 0, 16));
        assert!(PushHeader::parse(&p[..p.len() - 4]).is_err());
        assert!(PushHeader::parse(&p[..10]).is_err());
        let listed = PushHeader { start: 0, listed: true, ..h };
        let p = listed.keyed_payload(&[5, 1 << 40], &[1.0, 2.0, 3.0, 4.0]);
        let (back, keys, values) = PushHeader::parse(&p).unwrap();
        assert_eq!((back, keys.len(), values.len()), (listed, 16, 16));
        assert_eq!(&keys[8..], &(1u64 << 40).to_le_bytes());
        assert!(PushHeader::parse(&p[..p.len() - 4]).is_err());
        let mut flagged = p.clone();
        flagged[32] = 7;
        assert!(PushHeader::parse(&flagged).unwrap_err().to_string().contains("flags 7"));
        // Key-list caching: the remembered and cached forms come back as the plain payload;
        // nothing past the head parses them.
        assert_eq!(PushHeader::key_list(&p).unwrap(), KeyList::Plain);
        let remember = PushHeader::with_key_list(&p, KeyList::Remember);
        assert_eq!(PushHeader::key_list(&remember).unwrap(), KeyList::Remember);
        assert!(PushHeader::parse(&remember).unwrap_err().to_string().contains("past the head"));
        assert_eq!(PushHeader::plain(&remember, None).unwrap(), p);
        let cached = PushHeader::with_key_list(&p, KeyList::Cached { hash: 0xfeed });
        assert_eq!(cached.len(), p.len() - 16);
        assert_eq!(PushHeader::key_list(&cached).unwrap(), KeyList::Cached { hash: 0xfeed });
        assert_eq!(PushHeader::plain(&cached, Some(&[5, 1 << 40])).unwrap(), p);
        assert!(PushHeader::plain(&cached, None).is_err());
        assert!(PushHeader::plain(&cached, Some(&[5])).is_err(), "a list of another length");
        let range = h.payload(&[1.0, 2.0, 3.0, 4.0]);
        assert!(PushHeader::key_list(&PushHeader::with_key_list(&range, KeyList::Remember)).is_err(), "a range push has no list");
        assert!(PushHeader::key_list(&p[..20]).is_err());
        let done = PushHeader { count: 0, range_done: true, ..listed };
        assert_eq!(PushHeader::parse(&done.keyed_payload(&[], &[])).unwrap().0, done);
        let msgs = vec![Msg::PushAck { range: RangeId(1), seq: 2 }, Msg::NotHead { range: RangeId(3), config_id: 4 }];
        let mut bytes = Vec::new();
        encode_batch(&msgs, &mut bytes);
        assert_eq!(decode_batch(&bytes).unwrap(), msgs);
        assert!(decode_batch(&bytes[..bytes.len() - 1]).is_err());
    }
}
