//! RC queue pairs: connecting them, and posting work requests on them.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::ptr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdma_mummy_sys::{ibv_recv_wr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wr_opcode, rdma_t, wr_t};
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::GenericCompletionQueue;
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::queue_pair::{ExtendedQueuePair, QueuePair, QueuePairAttribute, QueuePairAttributeMask, QueuePairState};
use sideway::ibverbs::AccessFlags;

use super::*;

/// What a peer needs to connect its queue pair to this one, sent out of band (TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    /// Queue pair number, 24-bit.
    pub qpn: u32,
    /// The first packet sequence number this side sends, 24-bit.
    pub psn: u32,
    pub gid: [u8; 16],
}

impl QpInfo {
    /// Little-endian `qpn`, `psn`, then the GID as is.
    pub fn to_bytes(&self) -> [u8; QP_INFO_BYTES] {
        let mut bytes = [0; QP_INFO_BYTES];
        bytes[0..4].copy_from_slice(&self.qpn.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.psn.to_le_bytes());
        bytes[8..24].copy_from_slice(&self.gid);
        bytes
    }

    /// The inverse of [`QpInfo::to_bytes`]; [`Qp::connect`] checks the values.
    pub fn from_bytes(bytes: [u8; QP_INFO_BYTES]) -> Self {
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let mut gid = [0; 16];
        gid.copy_from_slice(&bytes[8..24]);
        QpInfo { qpn: word(0), psn: word(4), gid }
    }
}

/// A reliable-connected queue pair; send and receive completions go to the CQs it was made with.
#[derive(Debug)]
pub struct Qp {
    qp: ExtendedQueuePair,
    psn: u32,
    gid: [u8; 16],
    port: u8,
    gid_index: u8,
    mtu: Mtu,
    read_depth: u8,
    dest_read_depth: u8,
}

impl Qp {
    /// Creates the QP in the device's default protection domain and moves it to INIT with a
    /// random PSN. One scatter/gather entry per work request, no inline data. `send_cq` and
    /// `recv_cq` may be the same CQ.
    pub fn new(dev: &Device, send_cq: &Cq, recv_cq: &Cq, send_depth: u32, recv_depth: u32) -> Result<Qp, VerbsError> {
        Self::new_in(&dev.pd, send_cq, recv_cq, send_depth, recv_depth)
    }

    /// As [`Qp::new`], in `pd`: the QP posts only regions of `pd` and its peer reaches only
    /// regions of `pd`. The CQs may be shared with QPs of other domains of the same device.
    pub fn new_in(pd: &Pd, send_cq: &Cq, recv_cq: &Cq, send_depth: u32, recv_depth: u32) -> Result<Qp, VerbsError> {
        let port = pd.port;
        check_depth("send depth", send_depth, port.qp_wr_max)?;
        check_depth("receive depth", recv_depth, port.qp_wr_max)?;
        let qp = pd
            .pd
            .create_qp_builder()
            .setup_max_send_wr(send_depth)
            .setup_max_recv_wr(recv_depth)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(INLINE_BYTES_MAX as u32)
            .setup_send_cq(GenericCompletionQueue::from(Arc::clone(&send_cq.cq)))
            .setup_recv_cq(GenericCompletionQueue::from(Arc::clone(&recv_cq.cq)))
            .build_ex()
            .map_err(|source| VerbsError::CreateQp { send_depth, recv_depth, source })?;
        LIVE_QPS.fetch_add(1, Ordering::Relaxed);
        let mut qp = Qp {
            qp,
            psn: random_psn(),
            gid: port.gid,
            port: port.port,
            gid_index: port.gid_index,
            mtu: port.mtu,
            read_depth: port.read_depth,
            dest_read_depth: port.dest_read_depth,
        };
        qp.enter_init()?;
        Ok(qp)
    }

    pub fn info(&self) -> QpInfo {
        QpInfo { qpn: self.qpn(), psn: self.psn, gid: self.gid }
    }

    fn qpn(&self) -> u32 {
        self.qp.qp_number()
    }

    /// RTR then RTS towards `remote`: RoCE GRH from the device's GID index, path MTU = the
    /// device's active MTU (both sides must agree on it), read depth as the device allows (up to
    /// 16), retry 7, RNR retry 7 (forever). The QP must be in INIT (new, or after [`Qp::reset`]);
    /// if a step fails it is put back in INIT with the same PSN, so the call can be retried.
    pub fn connect(&mut self, remote: &QpInfo) -> Result<(), VerbsError> {
        check_peer(remote)?;
        let result = self.enter_rtr(remote).and_then(|()| self.enter_rts());
        if result.is_err() {
            // Best effort: the first error is the one worth reporting.
            let _ = self.reset_to_init();
        }
        result
    }

    /// Back to RESET and INIT with a fresh PSN, after an error: outstanding work requests are
    /// discarded (poll their flushed completions first if they matter). Exchange [`Qp::info`]
    /// again, then [`Qp::connect`].
    pub fn reset(&mut self) -> Result<(), VerbsError> {
        self.psn = random_psn();
        self.reset_to_init()
    }

    /// True when the QP is in the error state, or cannot be queried. Queries the device: the
    /// state sideway caches still says RTS after an error completion.
    pub fn is_broken(&mut self) -> bool {
        match self.qp.query(QueuePairAttributeMask::State) {
            Ok((attr, _)) => matches!(attr.state(), QueuePairState::Error | QueuePairState::SendQueueError),
            Err(_) => true,
        }
    }

    /// Posts a zero-length receive, consumed by an incoming write-with-immediate (whose data
    /// lands by rkey). Safe: there is no buffer. Does not allocate.
    pub fn post_recv(&mut self, wr_id: u64) -> Result<(), VerbsError> {
        let mut wr = ibv_recv_wr { wr_id, next: ptr::null_mut(), sg_list: ptr::null_mut(), num_sge: 0 };
        let mut bad_wr = ptr::null_mut();
        // Why this is sound: the QP is live (owned by `self.qp`); `wr` is a single, terminated work request
        // on the stack with no scatter/gather entries, so the device is handed no memory at all;
        // ibv_post_recv copies the request into the receive queue before returning. sideway's
        // own receive guard would do the same call but allocate two Vecs per post.
        // SAFETY: the QP is live, and the request hands the device no memory.
        let rc = unsafe { rdma_mummy_sys::ibv_post_recv(self.qp.qp().as_ptr(), &mut wr, &mut bad_wr) };
        match rc {
            0 => Ok(()),
            errno => Err(VerbsError::PostRecv { qpn: self.qpn(), wr_id, source: io::Error::from_raw_os_error(errno) }),
        }
    }

    /// RDMA WRITE WITH IMMEDIATE of `local[offset..offset + len]` to `remote_addr` (which, with
    /// the length, must lie in the peer's chunk `rkey` names). Consumes one receive at the peer,
    /// whose completion carries `imm` (host order) and `byte_len == len`. Unsignaled requests
    /// free their send-queue slot only when a later signaled one completes, so signal at least
    /// once per send depth. Panics if the local span crosses a chunk or `len` exceeds u32.
    ///
    /// # Safety
    /// `local[offset..offset + len]` must stay valid (the Region alive) and unmodified until this
    /// work request's completion is polled (or, unsignaled, that of a later signaled request on
    /// this QP): the device reads it asynchronously.
    #[allow(clippy::too_many_arguments)] // each is one field of the work request
    pub unsafe fn post_write_imm(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote_addr: u64,
        rkey: u32,
        imm: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let sge = local_sge(local, offset, len);
        let op = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        // lkey/addr/len describe a span of `local` inside one registered chunk (checked by
        // local_sge). The Region owns the mapping and its registrations; the caller keeps it
        // alive and the span unmodified until the completion, as this function's contract says,
        // and the provider's doorbell orders our earlier stores to it before the device reads.
        // SAFETY: the span is registered and, by the caller's contract, outlives the completion.
        unsafe { self.post_one(wr_id, op, signal_flags(signaled), sge, remote_addr, rkey, imm.to_be()) }
    }

    /// As [`Qp::post_write_imm`] for at most [`INLINE_BYTES_MAX`] bytes, which are copied into the
    /// work request when it is posted: the caller may reuse `data` at once, so this is safe. Small
    /// frames skip the device's read of local memory, as perftest's latency tests do.
    #[allow(clippy::too_many_arguments)] // each is one field of the work request
    pub fn post_write_imm_inline(&mut self, wr_id: u64, data: &[u8], remote_addr: u64, rkey: u32, imm: u32, signaled: bool) -> Result<(), VerbsError> {
        let op = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        self.post_inline(wr_id, op, data, remote_addr, rkey, imm.to_be(), signaled)
    }

    /// A plain inline RDMA WRITE: it consumes no receive at the peer and completes nowhere
    /// there, so the peer can only notice it by reading memory. Tessera's data path writes with
    /// immediate data; this is for the `write_floor` example, which measures what perftest's
    /// `ib_write_lat` does beside it.
    pub fn post_write_inline(&mut self, wr_id: u64, data: &[u8], remote_addr: u64, rkey: u32, signaled: bool) -> Result<(), VerbsError> {
        self.post_inline(wr_id, ibv_wr_opcode::IBV_WR_RDMA_WRITE, data, remote_addr, rkey, 0, signaled)
    }

    /// Posts `data` inline as one work request of `opcode`.
    #[allow(clippy::too_many_arguments)] // each is one field of the work request
    fn post_inline(
        &mut self,
        wr_id: u64,
        opcode: ibv_wr_opcode::Type,
        data: &[u8],
        remote_addr: u64,
        rkey: u32,
        imm_be: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        assert!(data.len() <= INLINE_BYTES_MAX, "inline writes carry at most {INLINE_BYTES_MAX} bytes");
        // An inline request's SGE names the bytes to copy; it needs no key.
        let sge = ibv_sge { addr: data.as_ptr() as u64, length: data.len() as u32, lkey: 0 };
        let flags = signal_flags(signaled) | ibv_send_flags::IBV_SEND_INLINE.0;
        // SAFETY: with IBV_SEND_INLINE the provider copies `data` into the send queue before
        // ibv_post_send returns, so the borrow of `data` outlives every use of it.
        unsafe { self.post_one(wr_id, opcode, flags, sge, remote_addr, rkey, imm_be) }
    }

    /// RDMA READ of `len` bytes at the peer's `remote_addr` (in the chunk `rkey` names) into
    /// `local[offset..offset + len]`. The data is there once the completion (opcode RdmaRead) of
    /// this request, or of a later signaled one on this queue pair, is polled: an RC send queue
    /// completes in order, so unsignaled reads followed by a signaled one cost one completion.
    /// Panics if the local span crosses a chunk or `len` exceeds u32.
    ///
    /// # Safety
    /// `local[offset..offset + len]` must stay valid (the Region alive) and must be neither read
    /// nor written by the CPU until that completion is polled: the device writes it
    /// asynchronously.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_read(
        &mut self,
        wr_id: u64,
        local: &Region,
        offset: usize,
        len: usize,
        remote_addr: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let sge = local_sge(local, offset, len);
        let op = ibv_wr_opcode::IBV_WR_RDMA_READ;
        // As in post_write_imm, but the device writes the span: the caller neither reads nor
        // writes it until the completion, whose poll orders the device's writes before the CPU's
        // later loads (the provider's poll_cq reads the CQE with the barrier it needs).
        // SAFETY: the span is registered and, by the caller's contract, untouched until the completion.
        unsafe { self.post_one(wr_id, op, signal_flags(signaled), sge, remote_addr, rkey, 0) }
    }

    /// Posts one work request with one SGE (none when `sge.length` is 0: a zero SGE length means
    /// 2 GiB on some providers) through the provider's `post_send`: one call, no allocation.
    ///
    /// # Safety
    /// Unless `flags` has IBV_SEND_INLINE, the SGE's span must be registered under its lkey and
    /// stay valid (and, for a write, unmodified) until the request completes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn post_one(
        &mut self,
        wr_id: u64,
        opcode: ibv_wr_opcode::Type,
        flags: u32,
        mut sge: ibv_sge,
        remote_addr: u64,
        rkey: u32,
        imm_be: u32,
    ) -> Result<(), VerbsError> {
        let sges = if sge.length > 0 { std::slice::from_mut(&mut sge) } else { &mut [] };
        // SAFETY: the caller's contract for the SGE's span is this function's.
        unsafe { self.post_sges(wr_id, opcode, flags, sges, remote_addr, rkey, imm_be) }
    }

    /// Posts one work request gathering `sges` (none for a zero-length request) through the
    /// provider's `post_send`: one call, no allocation.
    ///
    /// # Safety
    /// Unless `flags` has IBV_SEND_INLINE, every SGE's span must be registered under its lkey
    /// and stay valid (and, for a write, unmodified) until the request completes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn post_sges(
        &mut self,
        wr_id: u64,
        opcode: ibv_wr_opcode::Type,
        flags: u32,
        sges: &mut [ibv_sge],
        remote_addr: u64,
        rkey: u32,
        imm_be: u32,
    ) -> Result<(), VerbsError> {
        // SAFETY: ibv_send_wr is a plain C struct (integers, pointers and unions of them), for
        // which all-zero bytes are its documented empty value.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = opcode;
        wr.send_flags = flags;
        wr.imm_data_invalidated_rkey_union.imm_data = imm_be;
        wr.wr = wr_t { rdma: rdma_t { remote_addr, rkey } };
        if !sges.is_empty() {
            wr.sg_list = sges.as_mut_ptr();
            wr.num_sge = sges.len() as i32;
        }
        let mut bad_wr = ptr::null_mut();
        // Why this is sound: the QP is live (owned by `self.qp`); `wr` is a single, terminated request on the
        // stack, and `sges` (no more than the queue pair was created for, else the provider
        // refuses the request) outlive the call. The provider copies them into its send queue
        // (and, inline, the bytes they name) before returning; what the device later reads is the
        // caller's to keep valid, per this function's contract.
        // SAFETY: a live QP, a well-formed request, and the caller's contract for its memory.
        let rc = unsafe { rdma_mummy_sys::ibv_post_send(self.qp.qp().as_ptr(), &mut wr, &mut bad_wr) };
        match rc {
            0 => Ok(()),
            errno => Err(VerbsError::PostSend { qpn: self.qpn(), wr_id, source: io::Error::from_raw_os_error(errno) }),
        }
    }

    fn enter_init(&mut self) -> Result<(), VerbsError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            .setup_access_flags(AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead);
        self.modify(&attr, "INIT")
    }

    fn enter_rtr(&mut self, remote: &QpInfo) -> Result<(), VerbsError> {
        // RoCE has no LIDs: the path is the GRH (source GID index, destination GID, hop limit).
        let mut address = AddressHandleAttribute::new();
        address.setup_port(self.port).setup_grh(&Gid { raw: remote.gid }, 0, self.gid_index, HOP_LIMIT, 0);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(self.mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(self.dest_read_depth)
            .setup_min_rnr_timer(MIN_RNR_TIMER)
            .setup_address_vector(&address);
        self.modify(&attr, "RTR")
    }

    fn enter_rts(&mut self) -> Result<(), VerbsError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(ACK_TIMEOUT)
            .setup_retry_cnt(RETRY_COUNT)
            .setup_rnr_retry(RNR_RETRY)
            .setup_max_read_atomic(self.read_depth);
        self.modify(&attr, "RTS")
    }

    fn reset_to_init(&mut self) -> Result<(), VerbsError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Reset);
        self.modify(&attr, "RESET")?;
        self.enter_init()
    }

    fn modify(&mut self, attr: &QueuePairAttribute, target: &'static str) -> Result<(), VerbsError> {
        let qpn = self.qpn();
        self.qp.modify(attr).map_err(|source| VerbsError::ModifyQp { qpn, target, source })
    }
}

fn check_peer(remote: &QpInfo) -> Result<(), VerbsError> {
    let reason = if remote.qpn & !QPN_PSN_MASK != 0 {
        format!("queue pair number {:#x} is wider than 24 bits", remote.qpn)
    } else if remote.psn & !QPN_PSN_MASK != 0 {
        format!("PSN {:#x} is wider than 24 bits", remote.psn)
    } else if remote.gid == [0; 16] {
        "its GID is all zeros".to_string()
    } else {
        return Ok(());
    };
    Err(VerbsError::BadPeer { reason })
}

/// A 24-bit PSN from the standard library's per-process random hash keys: unpredictable enough
/// that a reconnected QP does not accept a stale packet of its previous life.
fn random_psn() -> u32 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish() as u32 & QPN_PSN_MASK
}

/// A send work request's flags: signaled, or not.
fn signal_flags(signaled: bool) -> u32 {
    if signaled {
        ibv_send_flags::IBV_SEND_SIGNALED.0
    } else {
        0
    }
}

/// The scatter/gather entry for `region[offset..offset + len]`; panics if it is not inside one
/// registration chunk or longer than a work request can carry.
fn local_sge(region: &Region, offset: usize, len: usize) -> ibv_sge {
    let lkey = region.lkey(offset, len);
    let length = u32::try_from(len).expect("a work request carries at most u32::MAX bytes");
    ibv_sge { addr: region.addr() + offset as u64, length, lkey }
}

impl Drop for Qp {
    fn drop(&mut self) {
        LIVE_QPS.fetch_sub(1, Ordering::Relaxed);
    }
}
