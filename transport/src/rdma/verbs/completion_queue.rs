//! Completion queues with their completion channels, and the completions read from them.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::Arc;

use rdma_mummy_sys::{ibv_wc, ibv_wc_opcode, ibv_wc_status};
use sideway::ibverbs::completion::{CompletionChannel, CompletionQueue, ExtendedCompletionQueue};

use super::*;

/// What a work completion reports, copied out of the CQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Send,
    RdmaWrite,
    RdmaRead,
    Recv,
    RecvRdmaWithImm,
    Other(u32),
}

impl Opcode {
    /// Reported for error completions, whose opcode verbs leave undefined.
    pub const UNDEFINED: Opcode = Opcode::Other(u32::MAX);

    fn from_raw(raw: u32) -> Self {
        match raw {
            ibv_wc_opcode::IBV_WC_SEND => Opcode::Send,
            ibv_wc_opcode::IBV_WC_RDMA_WRITE => Opcode::RdmaWrite,
            ibv_wc_opcode::IBV_WC_RDMA_READ => Opcode::RdmaRead,
            ibv_wc_opcode::IBV_WC_RECV => Opcode::Recv,
            ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => Opcode::RecvRdmaWithImm,
            other => Opcode::Other(other),
        }
    }
}

/// One work completion, copied before the poller moves on (the extended CQ reads its fields
/// lazily from the current entry).
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub wr_id: u64,
    pub ok: bool,
    /// `ibv_wc_status`, raw.
    pub status: u32,
    /// What `ibv_wc_status_str` says for `status`.
    pub status_text: &'static str,
    /// [`Opcode::UNDEFINED`] when `!ok`.
    pub opcode: Opcode,
    /// Bytes placed by a receive (the write's length for RecvRdmaWithImm, the read's for
    /// RdmaRead); 0 when `!ok`.
    pub byte_len: u32,
    /// The immediate data in host order, for RecvRdmaWithImm only.
    pub imm: Option<u32>,
}

impl Completion {
    fn from_wc(wc: &ibv_wc) -> Self {
        let ok = wc.status == ibv_wc_status::IBV_WC_SUCCESS;
        let opcode = if ok { Opcode::from_raw(wc.opcode) } else { Opcode::UNDEFINED };
        // SAFETY: both members of the union are a plain u32, so either reading is defined.
        let imm = unsafe { wc.imm_data_invalidated_rkey_union.imm_data };
        Completion {
            wr_id: wc.wr_id,
            ok,
            status: wc.status,
            status_text: status_text(wc.status),
            opcode,
            byte_len: if ok { wc.byte_len } else { 0 },
            imm: (opcode == Opcode::RecvRdmaWithImm).then(|| u32::from_be(imm)),
        }
    }
}

/// The texts of rdma-core's `ibv_wc_status_str`, without a call into the C library.
fn status_text(status: u32) -> &'static str {
    use ibv_wc_status::*;
    match status {
        IBV_WC_SUCCESS => "success",
        IBV_WC_LOC_LEN_ERR => "local length error",
        IBV_WC_LOC_QP_OP_ERR => "local QP operation error",
        IBV_WC_LOC_EEC_OP_ERR => "local EE context operation error",
        IBV_WC_LOC_PROT_ERR => "local protection error",
        IBV_WC_WR_FLUSH_ERR => "Work Request Flushed Error",
        IBV_WC_MW_BIND_ERR => "memory management operation error",
        IBV_WC_BAD_RESP_ERR => "bad response error",
        IBV_WC_LOC_ACCESS_ERR => "local access error",
        IBV_WC_REM_INV_REQ_ERR => "remote invalid request error",
        IBV_WC_REM_ACCESS_ERR => "remote access error",
        IBV_WC_REM_OP_ERR => "remote operation error",
        IBV_WC_RETRY_EXC_ERR => "transport retry counter exceeded",
        IBV_WC_RNR_RETRY_EXC_ERR => "RNR retry counter exceeded",
        IBV_WC_LOC_RDD_VIOL_ERR => "local RDD violation error",
        IBV_WC_REM_INV_RD_REQ_ERR => "remote invalid RD request",
        IBV_WC_REM_ABORT_ERR => "aborted error",
        IBV_WC_INV_EECN_ERR => "invalid EE context number",
        IBV_WC_INV_EEC_STATE_ERR => "invalid EE context state",
        IBV_WC_FATAL_ERR => "fatal error",
        IBV_WC_RESP_TIMEOUT_ERR => "response timeout error",
        IBV_WC_GENERAL_ERR => "general error",
        IBV_WC_TM_ERR => "TM error",
        IBV_WC_TM_RNDV_INCOMPLETE => "TM software rendezvous",
        _ => "unknown",
    }
}

/// A completion queue with its own completion channel, so a shard's event loop can sleep on the
/// channel's fd. The loop is: poll; [`Cq::arm`]; poll again (a completion that landed before
/// arming raises no event); sleep until [`Cq::fd`] is readable; [`Cq::ack_events`]; repeat.
#[derive(Debug)]
pub struct Cq {
    pub(super) cq: Arc<ExtendedCompletionQueue>,
    // The CQ holds the channel too; kept here for the fd and ibv_get_cq_event.
    channel: Arc<CompletionChannel>,
}

impl Cq {
    /// A CQ of `entries` completions (at least the send and receive depths of every QP using it,
    /// or it overruns).
    pub fn new(dev: &Device, entries: u32) -> Result<Cq, VerbsError> {
        check_depth("cq entries", entries, dev.cqe_max)?;
        let channel = dev.context.create_comp_channel().map_err(VerbsError::CreateChannel)?;
        // Non-blocking, so draining events never stalls the loop; epoll/mio does the waiting.
        channel.set_nonblocking(true).map_err(VerbsError::ChannelNonblocking)?;
        let cq = dev
            .context
            .create_cq_builder()
            .setup_cqe(entries)
            .setup_comp_channel(&channel, 0)
            .build_ex()
            .map_err(|source| VerbsError::CreateCq { entries, source })?;
        Ok(Cq { cq, channel })
    }

    /// Non-blocking: appends up to min(`max`, `out.capacity() - out.len()`) completions to `out`
    /// and returns how many. Does not allocate.
    ///
    /// Uses the classic `ibv_poll_cq`, one call into the provider for a batch, on the extended
    /// CQ: both rxe and mlx5 serve it from the same queue as `ibv_start_poll`, which the data path
    /// no longer calls (rxe's `ibv_next_poll` corrupted the CQ, so the extended reader took one
    /// completion per six calls).
    ///
    /// Panics if the device reports a polling error: that means the CQ overran (it is smaller than
    /// the queues feeding it) or the device died.
    pub fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> usize {
        const BATCH: usize = 32;
        let mut room = max.min(out.capacity() - out.len());
        let mut taken = 0;
        while room > 0 {
            let want = room.min(BATCH);
            let mut wcs = [std::mem::MaybeUninit::<ibv_wc>::uninit(); BATCH];
            // Why this is sound: the CQ is live (owned through `self.cq`); the extended CQ begins with the basic
            // `ibv_cq`, which is what sideway's `cq()` points at and what the provider's poll_cq
            // takes. The provider writes at most `want` entries into `wcs` and returns how many
            // (or a negative errno), keeping no pointer.
            // SAFETY: a live CQ and a buffer of `want` entries for the provider to fill.
            let n = unsafe { rdma_mummy_sys::ibv_poll_cq(self.cq.cq().as_ptr(), want as i32, wcs.as_mut_ptr().cast()) };
            let n = usize::try_from(n).unwrap_or_else(|_| panic!("polling the completion queue failed: {}", io::Error::from_raw_os_error(-n)));
            for wc in &wcs[..n] {
                // SAFETY: the provider initialised the first `n` entries.
                out.push(Completion::from_wc(unsafe { wc.assume_init_ref() }));
            }
            taken += n;
            if n < want {
                break;
            }
            room -= n;
        }
        taken
    }

    /// The completion channel's fd (non-blocking), to register with epoll/mio for readability.
    pub fn fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    /// Requests an event for the next completion of any kind (`ibv_req_notify_cq`). After
    /// arming, poll once more before sleeping: a completion may have raced in.
    pub fn arm(&mut self) -> Result<(), VerbsError> {
        // Why this is sound: `self.cq` is a live CQ owned (through its Arc) by `self` for the whole call; the
        // extended CQ begins with the basic `ibv_cq` fields, which is what sideway's `cq()` casts
        // to and what rdma-core's ibv_cq_ex_to_cq does. ibv_req_notify_cq reads the CQ and rings
        // the device, keeping no pointer.
        // SAFETY: the CQ is live for the whole call, and the call keeps no pointer.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
        match rc {
            0 => Ok(()),
            errno => Err(VerbsError::Arm(io::Error::from_raw_os_error(errno))),
        }
    }

    /// Reads and acks every pending channel event (after the fd turned readable). Never leaves
    /// events unacked: `ibv_destroy_cq` would wait for those acks forever.
    pub fn ack_events(&mut self) {
        let mut events = 0u32;
        while self.take_event() {
            events += 1;
        }
        if events > 0 {
            // SAFETY: the CQ is live (owned through `self.cq`) and received exactly `events`
            // events from its channel in the loop above, none of them acked yet.
            unsafe { rdma_mummy_sys::ibv_ack_cq_events(self.cq.cq().as_ptr(), events) };
        }
    }

    /// Reads one event off the channel; false when there is none (the fd is non-blocking).
    fn take_event(&mut self) -> bool {
        loop {
            let mut event_cq = ptr::null_mut();
            let mut event_context = ptr::null_mut();
            // SAFETY: the channel is live (owned through `self.channel`), the out-pointers point
            // to locals, and the fd is non-blocking, so the call returns EAGAIN, not sleep.
            let rc = unsafe { rdma_mummy_sys::ibv_get_cq_event(self.channel.comp_channel().as_ptr(), &mut event_cq, &mut event_context) };
            if rc == 0 {
                // SAFETY: only reads the CQ's handle for a comparison; `self.cq` keeps it alive.
                let ours = unsafe { self.cq.cq().as_ptr() };
                assert_eq!(event_cq, ours, "event for a CQ this channel was not created for");
                return true;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => return false,
                io::ErrorKind::Interrupted => continue,
                _ => panic!("reading the completion channel failed: {err}"),
            }
        }
    }
}
