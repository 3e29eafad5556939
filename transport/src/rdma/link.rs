//! The worker's side of RDMA: a [`Link`] that writes request frames into the shard's slots and
//! finds replies written into its own.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use zerocopy::IntoBytes;

use crate::buf::{Deflater, Inflater};
use crate::config::TransportConfig;
use crate::error::{Result, TransportError};
use crate::tcp::TcpLink;
use crate::wire::{padded, Header, Op, Status, HEADER_BYTES};
use crate::{Frame, Link};

use super::verbs::{Access, Completion, Cq, Device, Opcode, Qp, Region, INLINE_BYTES_MAX};
use super::{rdma, slot_keys, Endpoint, RdmaConfig, SlotKey};

/// A link to one shard over an RC queue pair. Field order is drop order: the queue pair goes
/// before the regions it reads and writes.
pub struct RdmaLink {
    qp: Qp,
    /// Request frames are built here, then written into the shard's slot of the same index.
    out: Region,
    /// The shard writes replies here.
    inbox: Region,
    cq: Cq,
    sleeper: Poll,
    events: Events,
    _dev: Arc<Device>,
    /// Kept open: the shard releases this link's queue pair and rings when it closes.
    tcp: TcpLink,
    remote: Vec<SlotKey>,
    slot_bytes: usize,
    send_bytes_max: usize,
    slots: u64,
    /// Requests posted, replies arrived, replies handed out or parked, request writes completed.
    sent: u64,
    arrived: u64,
    consumed: u64,
    writes_done: u64,
    /// Replies copied out of their slot because a new request needed it before anyone asked.
    parked: VecDeque<Vec<u8>>,
    current: Vec<u8>,
    inflater: Inflater,
    deflater: Deflater,
    completions: Vec<Completion>,
    spin: Duration,
    io_timeout: Duration,
}

impl std::fmt::Debug for RdmaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaLink").field("peer", &self.tcp.peer()).field("sent", &self.sent).finish()
    }
}

impl RdmaLink {
    /// Connects over TCP as [`TcpLink::connect`] does, then sets up the queue pair and rings on
    /// that connection. Returns the link and the server's hello reply.
    pub fn connect(
        addr: &str,
        shard: u64,
        worker: u32,
        cfg: &TransportConfig,
        rcfg: &RdmaConfig,
        dev: Arc<Device>,
    ) -> Result<(Self, Vec<u8>)> {
        rcfg.validate()?;
        let (mut tcp, info) = TcpLink::connect(addr, shard, worker, cfg)?;
        let (slots, sb) = (rcfg.slots, rcfg.slot_bytes);
        let cq = Cq::new(&dev, 2 * slots + 2).map_err(rdma)?;
        let mut qp = Qp::new(&dev, &cq, &cq, slots + 1, slots + 1).map_err(rdma)?;
        let out = Region::new(&dev, slots as usize * sb, Access { remote_write: false, remote_read: false }).map_err(rdma)?;
        let inbox = Region::new(&dev, slots as usize * sb, Access { remote_write: true, remote_read: false }).map_err(rdma)?;
        for slot in 0..slots {
            qp.post_recv(slot as u64).map_err(rdma)?;
        }
        let mine = Endpoint { qp: qp.info(), slot_bytes: sb, slots: slot_keys(&inbox, slots, sb)? };
        let mut header = Header::request(Op::RdmaConnect, 0);
        tcp.send(&mut header, &[&mine.encode()], false)?;
        let reply = tcp.recv(None)?;
        if reply.header.status() != Status::Ok {
            return Err(rdma(format!("the shard refused RDMA: {}", String::from_utf8_lossy(reply.body))));
        }
        let theirs = Endpoint::decode(reply.body)?;
        qp.connect(&theirs.qp).map_err(rdma)?;
        let sleeper = Poll::new()?;
        sleeper.registry().register(&mut mio::unix::SourceFd(&cq.fd()), Token(0), Interest::READABLE)?;
        let link = Self {
            qp,
            out,
            inbox,
            cq,
            sleeper,
            events: Events::with_capacity(4),
            _dev: dev,
            tcp,
            remote: theirs.slots,
            slot_bytes: sb,
            send_bytes_max: sb.min(cfg.frame_bytes_max),
            slots: slots as u64,
            sent: 0,
            arrived: 0,
            consumed: 0,
            writes_done: 0,
            parked: VecDeque::new(),
            current: Vec::new(),
            inflater: Inflater::default(),
            deflater: Deflater::default(),
            completions: Vec::with_capacity(16),
            spin: Duration::from_micros(rcfg.spin_us),
            io_timeout: Duration::from_millis(cfg.io_timeout_ms),
        };
        Ok((link, info))
    }

    /// Test hook only, for tests that play a misbehaving worker: the shard slots (address,
    /// rkey) this link writes its requests to, in slot order.
    #[doc(hidden)]
    pub fn remote_slot_keys(&self) -> Vec<(u64, u32)> {
        self.remote.iter().map(|k| (k.addr, k.rkey)).collect()
    }

    /// Test hook only, for tests that play a misbehaving worker: from now on, write requests to
    /// these (address, rkey) slots instead of the ones the shard gave. Panics unless there is
    /// one per slot.
    #[doc(hidden)]
    pub fn override_remote_slot_keys(&mut self, keys: Vec<(u64, u32)>) {
        assert_eq!(keys.len(), self.remote.len(), "one (address, rkey) per slot");
        self.remote = keys.into_iter().map(|(addr, rkey)| SlotKey { addr, rkey, reserved: 0 }).collect();
    }

    /// Takes every completion there is; returns how many.
    fn reap(&mut self) -> Result<usize> {
        self.completions.clear();
        let n = self.cq.poll(&mut self.completions, 16);
        for i in 0..n {
            let c = self.completions[i];
            if !c.ok {
                return Err(rdma(format!("work request failed: {} (the shard may be gone)", c.status_text)));
            }
            match c.opcode {
                Opcode::RecvRdmaWithImm => {
                    let expected = (self.arrived % self.slots) as u32;
                    if c.imm != Some(expected) {
                        return Err(rdma(format!("reply in slot {:?}, expected {expected}", c.imm)));
                    }
                    self.arrived += 1;
                    self.qp.post_recv(c.wr_id).map_err(rdma)?;
                }
                Opcode::RdmaWrite => self.writes_done += 1,
                _ => {}
            }
        }
        Ok(n)
    }

    /// Waits until at least one more completion was taken: spins, then sleeps on the channel.
    fn progress(&mut self, deadline: Instant, what: &'static str) -> Result<()> {
        let spin_until = Instant::now() + self.spin;
        loop {
            if self.reap()? > 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout { what, ms: self.io_timeout.as_millis() as u64 });
            }
            if now < spin_until {
                std::hint::spin_loop();
                continue;
            }
            self.cq.arm().map_err(rdma)?;
            if self.reap()? > 0 {
                return Ok(());
            }
            match self.sleeper.poll(&mut self.events, Some(deadline - now)) {
                Ok(()) => self.cq.ack_events(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The frame in reply slot `slot`: its header and the whole frame's bytes.
    fn reply_frame(&self, slot: usize) -> Result<(Header, &[u8])> {
        let at = slot * self.slot_bytes;
        let bytes = &self.inbox.as_slice()[at..at + self.slot_bytes];
        let header = Header::decode(bytes, self.slot_bytes)?;
        Ok((header, &bytes[..header.frame_len()]))
    }

    /// Copies the oldest unread reply out of its slot, so that the slot can take a new request.
    fn park_oldest(&mut self, deadline: Instant) -> Result<()> {
        while self.arrived <= self.consumed {
            self.progress(deadline, "a reply to free a slot")?;
        }
        let (_, frame) = self.reply_frame((self.consumed % self.slots) as usize)?;
        let copy = frame.to_vec();
        self.parked.push_back(copy);
        self.consumed += 1;
        Ok(())
    }
}

impl Link for RdmaLink {
    fn send(&mut self, header: &mut Header, parts: &[&[u8]], compress: bool) -> Result<()> {
        let deadline = Instant::now() + self.io_timeout;
        let seq = self.sent;
        // The reply slot this request will use must hold no unread reply, and the staging slot
        // must no longer be read by the device.
        while self.consumed + self.slots <= seq {
            self.park_oldest(deadline)?;
        }
        while self.writes_done + self.slots <= seq {
            self.progress(deadline, "a slot to send from")?;
        }
        let packed = self.deflater.frame_body(header, parts, compress);
        let body = packed.parts();
        let frame_len = HEADER_BYTES + padded(header.body_len as usize);
        if frame_len > self.send_bytes_max {
            return Err(TransportError::FrameTooLarge { bytes: frame_len, limit: self.send_bytes_max });
        }
        header.seal();
        let slot = (seq % self.slots) as usize;
        let at = slot * self.slot_bytes;
        let staging = &mut self.out.as_mut_slice()[at..at + frame_len];
        staging[..HEADER_BYTES].copy_from_slice(header.as_bytes());
        let mut pos = HEADER_BYTES;
        for part in body {
            staging[pos..pos + part.len()].copy_from_slice(part);
            pos += part.len();
        }
        staging[pos..].fill(0);
        let key = self.remote[slot];
        if frame_len <= INLINE_BYTES_MAX {
            // Small frames are copied into the work request as it is posted.
            let frame = &self.out.as_slice()[at..at + frame_len];
            self.qp.post_write_imm_inline(seq, frame, key.addr, key.rkey, slot as u32, true).map_err(rdma)?;
        } else {
            // Why this is sound: out[at..at + frame_len] is this link's staging for slot `slot`. The CPU writes it
            // only here, and only after the write that last used this slot completed (`writes_done`
            // above), so it stays unchanged until the device has read it. The region outlives the
            // queue pair (field order), so dropping the link flushes the queue pair first.
            // SAFETY: this slot's staging stays mapped and unchanged until its write completes.
            unsafe { self.qp.post_write_imm(seq, &self.out, at, frame_len, key.addr, key.rkey, slot as u32, true) }
                .map_err(rdma)?;
        }
        self.sent += 1;
        Ok(())
    }

    fn recv(&mut self, timeout: Option<Duration>) -> Result<Frame<'_>> {
        let deadline = Instant::now() + timeout.unwrap_or(self.io_timeout);
        if let Some(parked) = self.parked.pop_front() {
            self.current = parked;
            let header = Header::decode(&self.current, usize::MAX)?;
            let raw = &self.current[HEADER_BYTES..HEADER_BYTES + header.body_len as usize];
            return Ok(Frame { header, body: self.inflater.inflate(&header, raw)? });
        }
        if self.sent <= self.consumed {
            return Err(rdma("waiting for a reply to no request"));
        }
        while self.arrived <= self.consumed {
            self.progress(deadline, "a reply")?;
        }
        let slot = (self.consumed % self.slots) as usize;
        self.consumed += 1;
        let at = slot * self.slot_bytes;
        let bytes = &self.inbox.as_slice()[at..at + self.slot_bytes];
        let header = Header::decode(bytes, self.slot_bytes)?;
        let raw = &bytes[HEADER_BYTES..HEADER_BYTES + header.body_len as usize];
        Ok(Frame { header, body: self.inflater.inflate(&header, raw)? })
    }

    fn peer(&self) -> &str {
        self.tcp.peer()
    }

    fn send_bytes_max(&self) -> usize {
        self.send_bytes_max
    }

    fn kind(&self) -> &'static str {
        "rdma"
    }

    fn limit_frames(&mut self, peer_frame_bytes_max: usize) {
        self.send_bytes_max = self.send_bytes_max.min(peer_frame_bytes_max);
    }
}
