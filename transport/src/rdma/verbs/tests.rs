//! Tests against real verbs. On a plain host they skip (saying so); under
//! `tests/softroce/run.sh` (SOFTROCE_VM=1, RDMA_DEV=rxe0) a missing device fails them.
//!
//! Build on the host, run the printed binary in the guest:
//! `cargo test -p tessera-transport --features rdma --no-run`, then
//! `tests/softroce/run.sh target/debug/deps/tessera_transport-<hash> rdma::verbs`.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_mummy_sys::ibv_wc_status;
use sideway::ibverbs::memory_region::RegisterMemoryRegionErrorKind;

use super::device::{effective_mr_bytes_max, gid_index_from};
use super::memory_region::registration_error;
use super::*;

const TIMEOUT: Duration = Duration::from_secs(5);
const KIB: usize = 1024;
const IMM: u32 = 0xC0FF_EE01;

/// The device the environment names (`RDMA_DEV`, `RDMA_GID_INDEX`), as the transport takes it.
fn env_config() -> DeviceConfig {
    DeviceConfig::from_env().expect("RDMA_GID_INDEX in the test's environment is a GID index")
}

/// True where a device must exist: in the SoftRoCE VM, or wherever RDMA_DEV names one.
fn device_expected() -> bool {
    std::env::var_os("SOFTROCE_VM").is_some() || std::env::var_os("RDMA_DEV").is_some()
}

/// The configured device; `None` (after saying so) on a host without RDMA, a test failure where
/// one is expected.
fn device_or_fail_with(cfg: &DeviceConfig) -> Option<Arc<Device>> {
    match Device::open(cfg) {
        Ok(dev) => Some(dev),
        Err(unavailable) if device_expected() => {
            panic!("no RDMA device although SOFTROCE_VM or RDMA_DEV is set: {unavailable}")
        }
        Err(_) => {
            println!("no RDMA device: skipped on this host, run under tests/softroce/run.sh");
            None
        }
    }
}

fn device_or_fail() -> Option<Arc<Device>> {
    device_or_fail_with(&env_config())
}

/// One side of a loopback connection: a QP with its own send and receive CQs.
struct End {
    qp: Qp,
    send_cq: Cq,
    recv_cq: Cq,
}

fn end(dev: &Device) -> End {
    let send_cq = Cq::new(dev, 64).expect("send cq");
    let recv_cq = Cq::new(dev, 64).expect("recv cq");
    let qp = Qp::new(dev, &send_cq, &recv_cq, 32, 32).expect("qp");
    End { qp, send_cq, recv_cq }
}

/// Two QPs on one device, connected to each other.
fn connected_pair(dev: &Device) -> (End, End) {
    let (mut a, mut b) = (end(dev), end(dev));
    let (info_a, info_b) = (a.qp.info(), b.qp.info());
    assert_eq!(info_a.gid, dev.gid());
    a.qp.connect(&info_b).expect("connect a");
    b.qp.connect(&info_a).expect("connect b");
    assert!(!a.qp.is_broken() && !b.qp.is_broken());
    (a, b)
}

/// Busy-polls until `want` completions arrived; panics after TIMEOUT.
fn wait(cq: &mut Cq, want: usize) -> Vec<Completion> {
    let start = Instant::now();
    let mut found = Vec::with_capacity(want + 8);
    while found.len() < want {
        let missing = want - found.len();
        cq.poll(&mut found, missing);
        assert!(start.elapsed() < TIMEOUT, "got {found:?} of {want} completions in {TIMEOUT:?}");
        std::hint::spin_loop();
    }
    found
}

fn expect_ok(found: &[Completion], wr_id: u64, opcode: Opcode) -> Completion {
    assert_eq!(found.len(), 1, "{found:?}");
    let c = found[0];
    assert!(c.ok, "{c:?}");
    assert_eq!((c.wr_id, c.opcode, c.status, c.status_text), (wr_id, opcode, 0, "success"));
    c
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

const LOCAL_ONLY: Access = Access { remote_write: false, remote_read: false };
const REMOTE_RW: Access = Access { remote_write: true, remote_read: true };

#[test]
fn open_without_rdma_is_unavailable_not_a_panic() {
    let result = Device::open(&env_config());
    let host_has_devices = std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut dir| dir.next().is_some());
    match result {
        Ok(dev) => assert!(host_has_devices || device_expected(), "opened {} without a device in sysfs", dev.name()),
        Err(unavailable) => {
            println!("rdma: unavailable ({unavailable}); a caller would use TCP");
            assert!(!unavailable.reason.is_empty());
            assert!(!device_expected(), "no device in the VM: {unavailable}");
        }
    }
}

#[test]
fn open_bogus_device_name_is_unavailable() {
    let cfg = DeviceConfig { device: Some("no-such-rdma-dev".into()), ..env_config() };
    let unavailable = Device::open(&cfg).expect_err("a device that does not exist");
    println!("{unavailable}");
    if device_expected() {
        assert!(unavailable.reason.contains("no-such-rdma-dev"), "{unavailable}");
    }
}

#[test]
fn qp_info_round_trips_through_bytes() {
    let info = QpInfo { qpn: 0x12_3456, psn: 0xab_cdef, gid: core::array::from_fn(|i| i as u8) };
    let bytes = info.to_bytes();
    assert_eq!(&bytes[0..4], &[0x56, 0x34, 0x12, 0]);
    assert_eq!(QpInfo::from_bytes(bytes), info);
}

#[test]
fn mr_bytes_max_is_page_rounded_and_clamped() {
    assert_eq!(effective_mr_bytes_max(u64::MAX, None), Some(u64::MAX - 4095));
    assert_eq!(effective_mr_bytes_max(u64::MAX, Some(64 * 1024 + 100)), Some(64 * 1024));
    assert_eq!(effective_mr_bytes_max(1 << 20, Some(1 << 30)), Some(1 << 20));
    assert_eq!(effective_mr_bytes_max(u64::MAX, Some(4095)), None);
}

#[test]
fn registration_failure_under_a_memlock_limit_names_the_fix() {
    let failure = |errno| RegisterMemoryRegionError::from(RegisterMemoryRegionErrorKind::Ibverbs(io::Error::from_raw_os_error(errno)));
    let err = registration_error(1 << 20, 0, 1 << 20, failure(libc::ENOMEM), Some(64 << 10));
    assert!(matches!(err, VerbsError::MemlockTooLow { have_kib: 64, need_kib: 1024 }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("RLIMIT_MEMLOCK") && text.contains("ulimit -l unlimited"), "{text}");
    let err = registration_error(1 << 20, 0, 1 << 20, failure(libc::EPERM), Some(0));
    assert!(matches!(err, VerbsError::MemlockTooLow { have_kib: 0, need_kib: 1024 }), "{err:?}");
    // Unlimited, or another errno: the device's own error, with offsets.
    let err = registration_error(1 << 20, 4096, 8192, failure(libc::ENOMEM), None);
    assert!(matches!(err, VerbsError::RegisterMr { offset: 4096, end: 8192, .. }), "{err:?}");
    let err = registration_error(1 << 20, 0, 4096, failure(libc::EINVAL), Some(64 << 10));
    assert!(matches!(err, VerbsError::RegisterMr { .. }), "{err:?}");
    assert!(report(&err).ends_with("(os error 22)"), "{}", report(&err));
}

#[test]
fn bad_arguments_are_errors_and_leave_the_qp_connectable() {
    let Some(dev) = device_or_fail() else { return };
    assert!(matches!(Cq::new(&dev, 0), Err(VerbsError::Depth { what: "cq entries", asked: 0, .. })));
    assert!(matches!(Cq::new(&dev, u32::MAX), Err(VerbsError::Depth { .. })));
    let (mut a, mut b) = (end(&dev), end(&dev));
    let deep = Qp::new(&dev, &a.send_cq, &a.recv_cq, u32::MAX, 1);
    assert!(matches!(deep, Err(VerbsError::Depth { what: "send depth", .. })), "{deep:?}");

    let good = b.qp.info();
    for bad in [QpInfo { qpn: 1 << 24, ..good }, QpInfo { psn: 1 << 24, ..good }, QpInfo { gid: [0; 16], ..good }] {
        let err = a.qp.connect(&bad).expect_err("malformed peer");
        assert!(matches!(err, VerbsError::BadPeer { .. }), "{err:?}");
    }
    // Connecting twice fails (RTS -> RTR is no transition) and puts the QP back in INIT, with
    // the same PSN, so the retry with the peer's (unchanged) info works.
    let info_a = a.qp.info();
    a.qp.connect(&good).unwrap();
    let twice = a.qp.connect(&good).expect_err("already connected");
    println!("connect twice: {}", report(&twice));
    assert_eq!(a.qp.info(), info_a);
    a.qp.connect(&good).unwrap();
    b.qp.connect(&info_a).unwrap();
    let src = Region::new(&dev, 4096, LOCAL_ONLY).unwrap();
    let dst = Region::new(&dev, 4096, REMOTE_RW).unwrap();
    let target = dst.remote_span(0, 0);
    b.qp.post_recv(1).unwrap();
    // SAFETY: zero bytes: the device reads nothing of src.
    unsafe { a.qp.post_write_imm(2, &src, 0, 0, target.addr, target.rkey, IMM, true) }.unwrap();
    let recv = expect_ok(&wait(&mut b.recv_cq, 1), 1, Opcode::RecvRdmaWithImm);
    assert_eq!((recv.imm, recv.byte_len), (Some(IMM), 0), "a zero-length write carries only its imm");
    expect_ok(&wait(&mut a.send_cq, 1), 2, Opcode::RdmaWrite);
}

#[test]
fn write_with_immediate_lands_with_its_bytes_and_imm() {
    let Some(dev) = device_or_fail() else { return };
    let (mut a, mut b) = connected_pair(&dev);
    let mut src = Region::new(&dev, 64 * KIB, LOCAL_ONLY).unwrap();
    let dst = Region::new(&dev, 64 * KIB, REMOTE_RW).unwrap();
    assert_eq!(src.addr() % PAGE_BYTES as u64, 0);
    let data = pattern(1, 4096);
    src.as_mut_slice()[..4096].copy_from_slice(&data);

    b.qp.post_recv(7).unwrap();
    let target = dst.remote_span(8192, 4096);
    // SAFETY: src[0..4096] is neither dropped nor written until A's completion below.
    unsafe { a.qp.post_write_imm(1, &src, 0, 4096, target.addr, target.rkey, IMM, true) }.unwrap();

    let recv = expect_ok(&wait(&mut b.recv_cq, 1), 7, Opcode::RecvRdmaWithImm);
    assert_eq!((recv.imm, recv.byte_len), (Some(IMM), 4096));
    expect_ok(&wait(&mut a.send_cq, 1), 1, Opcode::RdmaWrite);
    assert!(dst.as_slice()[8192..8192 + 4096] == data[..], "written bytes differ");
    assert!(dst.as_slice()[..8192].iter().all(|&byte| byte == 0), "bytes before the target changed");
}

#[test]
fn read_returns_the_remote_bytes() {
    let Some(dev) = device_or_fail() else { return };
    let (mut a, _b) = connected_pair(&dev);
    let dst = Region::new(&dev, 64 * KIB, LOCAL_ONLY).unwrap();
    let mut src = Region::new(&dev, 64 * KIB, REMOTE_RW).unwrap();
    let data = pattern(2, 8192);
    src.as_mut_slice()[16 * KIB..24 * KIB].copy_from_slice(&data);

    let source = src.remote_span(16 * KIB, 8192);
    // SAFETY: dst[4096..4096 + 8192] is not touched until the completion below.
    unsafe { a.qp.post_read(2, &dst, 4096, 8192, source.addr, source.rkey, true) }.unwrap();
    let done = expect_ok(&wait(&mut a.send_cq, 1), 2, Opcode::RdmaRead);
    assert_eq!(done.byte_len, 8192);
    assert!(dst.as_slice()[4096..4096 + 8192] == data[..], "read bytes differ");
}

#[test]
fn region_split_into_chunks_serves_writes_and_reads_with_the_right_keys() {
    let cfg = DeviceConfig { mr_bytes_max: Some(64 * KIB as u64), ..env_config() };
    let Some(dev) = device_or_fail_with(&cfg) else {
        return;
    };
    assert_eq!(dev.max_mr_size(), 64 * KIB as u64);
    let (mut a, mut b) = connected_pair(&dev);
    let mut local = Region::new(&dev, 1024 * KIB, REMOTE_RW).unwrap();
    let mut remote = Region::new(&dev, 1024 * KIB, REMOTE_RW).unwrap();
    let chunks = remote.remote_chunks();
    assert_eq!(chunks.len(), 16);
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!((chunk.addr, chunk.len), (remote.addr() + (i * 64 * KIB) as u64, 64 * KIB as u64));
        assert_eq!(remote.remote_span(i * 64 * KIB + 100, 200).rkey, chunk.rkey);
    }
    let mut rkeys: Vec<u32> = chunks.iter().map(|chunk| chunk.rkey).collect();
    rkeys.dedup();
    assert_eq!(rkeys.len(), 16, "each chunk has its own rkey");

    // Writes: (local chunk, remote chunk, offset inside the chunk, length): a whole chunk, and
    // spans that end exactly at a chunk's end.
    let writes = [(3, 0, 0, 64 * KIB), (0, 5, 4096, 16 * KIB), (15, 15, 48 * KIB, 16 * KIB), (7, 9, 60 * KIB, 4 * KIB)];
    for (wr_id, &(from, to, inner, len)) in writes.iter().enumerate() {
        let (local_offset, remote_offset) = (from * 64 * KIB + inner, to * 64 * KIB + inner);
        let data = pattern(wr_id as u8, len);
        local.as_mut_slice()[local_offset..local_offset + len].copy_from_slice(&data);
        b.qp.post_recv(100 + wr_id as u64).unwrap();
        let chunk = chunks[to];
        let remote_addr = chunk.addr + inner as u64;
        // SAFETY: the local span is not written until A's completion below.
        unsafe { a.qp.post_write_imm(wr_id as u64, &local, local_offset, len, remote_addr, chunk.rkey, wr_id as u32, true) }.unwrap();
        let recv = expect_ok(&wait(&mut b.recv_cq, 1), 100 + wr_id as u64, Opcode::RecvRdmaWithImm);
        assert_eq!((recv.imm, recv.byte_len as usize), (Some(wr_id as u32), len));
        expect_ok(&wait(&mut a.send_cq, 1), wr_id as u64, Opcode::RdmaWrite);
        assert!(remote.as_slice()[remote_offset..remote_offset + len] == data[..], "write {wr_id} differs");
    }

    // A read from remote chunk 11 into local chunk 2.
    let data = pattern(9, 32 * KIB);
    remote.as_mut_slice()[11 * 64 * KIB + 8 * KIB..][..32 * KIB].copy_from_slice(&data);
    let source = remote.remote_span(11 * 64 * KIB + 8 * KIB, 32 * KIB);
    assert_eq!(source.rkey, chunks[11].rkey);
    // SAFETY: the local span is not touched until the completion below.
    unsafe { a.qp.post_read(50, &local, 2 * 64 * KIB + 32 * KIB, 32 * KIB, source.addr, source.rkey, true) }.unwrap();
    expect_ok(&wait(&mut a.send_cq, 1), 50, Opcode::RdmaRead);
    assert!(local.as_slice()[2 * 64 * KIB + 32 * KIB..][..32 * KIB] == data[..], "read differs");

    // Spans with no single key (lkey and remote_span panic on them: a broken invariant).
    assert_eq!(local.span_chunk(64 * KIB - 8, 8), Ok(0));
    assert_eq!(local.span_chunk(64 * KIB, 0), Ok(1));
    assert_eq!(local.span_chunk(1024 * KIB, 0), Ok(15));
    assert!(local.span_chunk(64 * KIB - 8, 16).is_err(), "across a chunk boundary");
    assert!(local.span_chunk(1024 * KIB - 8, 16).is_err(), "past the region's end");
    assert!(local.span_chunk(usize::MAX, 2).is_err(), "overflowing");
}

#[test]
fn write_with_a_wrong_rkey_fails_and_breaks_the_qp() {
    let Some(dev) = device_or_fail() else { return };
    let (mut a, mut b) = connected_pair(&dev);
    let src = Region::new(&dev, 64 * KIB, LOCAL_ONLY).unwrap();
    let dst = Region::new(&dev, 64 * KIB, REMOTE_RW).unwrap();
    b.qp.post_recv(8).unwrap();
    let target = dst.remote_span(0, 64);
    // SAFETY: src[0..64] is not touched until the completion below.
    unsafe { a.qp.post_write_imm(3, &src, 0, 64, target.addr, !target.rkey, IMM, true) }.unwrap();
    let found = wait(&mut a.send_cq, 1);
    let c = found[0];
    println!("bad rkey: {c:?}");
    assert!(!c.ok && c.wr_id == 3, "{c:?}");
    assert_eq!((c.status, c.status_text), (ibv_wc_status::IBV_WC_REM_ACCESS_ERR, "remote access error"));
    assert_eq!((c.opcode, c.byte_len, c.imm), (Opcode::UNDEFINED, 0, None));
    assert!(a.qp.is_broken(), "the requester's QP is in the error state");
    assert!(dst.as_slice().iter().all(|&byte| byte == 0), "nothing landed");

    // Recovery: both sides reset, exchange their (new) PSNs and carry traffic again.
    let (mut leftovers, deadline) = (Vec::with_capacity(64), Instant::now() + Duration::from_millis(200));
    while Instant::now() < deadline {
        b.recv_cq.poll(&mut leftovers, 64);
    }
    a.qp.reset().unwrap();
    b.qp.reset().unwrap();
    a.qp.connect(&b.qp.info()).unwrap();
    b.qp.connect(&a.qp.info()).unwrap();
    assert!(!a.qp.is_broken() && !b.qp.is_broken());
    b.qp.post_recv(9).unwrap();
    // SAFETY: as above.
    unsafe { a.qp.post_write_imm(4, &src, 0, 64, target.addr, target.rkey, IMM, true) }.unwrap();
    expect_ok(&wait(&mut b.recv_cq, 1), 9, Opcode::RecvRdmaWithImm);
    expect_ok(&wait(&mut a.send_cq, 1), 4, Opcode::RdmaWrite);
}

/// Waits up to `timeout_ms` for `fd` to turn readable.
fn readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: `pfd` is one valid pollfd on the stack, and the kernel writes only its revents.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    assert!(n >= 0, "poll: {}", io::Error::last_os_error());
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[test]
fn armed_cq_fd_turns_readable_after_a_completion() {
    let Some(dev) = device_or_fail() else { return };
    let (mut a, mut b) = connected_pair(&dev);
    let src = Region::new(&dev, 64 * KIB, LOCAL_ONLY).unwrap();
    let dst = Region::new(&dev, 64 * KIB, REMOTE_RW).unwrap();
    let target = dst.remote_span(0, 256);
    let mut found = Vec::with_capacity(8);
    for round in 0..3u64 {
        assert_eq!(b.recv_cq.poll(&mut found, 8), 0);
        b.recv_cq.arm().unwrap();
        assert_eq!(b.recv_cq.poll(&mut found, 8), 0, "nothing raced in");
        assert!(!readable(b.recv_cq.fd(), 0), "round {round}: readable before any completion");
        b.qp.post_recv(round).unwrap();
        // SAFETY: src[0..256] is never written in this test.
        unsafe { a.qp.post_write_imm(round, &src, 0, 256, target.addr, target.rkey, round as u32, true) }.unwrap();
        assert!(readable(b.recv_cq.fd(), TIMEOUT.as_millis() as i32), "round {round}: no event");
        b.recv_cq.ack_events();
        assert!(!readable(b.recv_cq.fd(), 0), "round {round}: events left after ack_events");
        let recv = expect_ok(&wait(&mut b.recv_cq, 1), round, Opcode::RecvRdmaWithImm);
        assert_eq!(recv.imm, Some(round as u32));
        expect_ok(&wait(&mut a.send_cq, 1), round, Opcode::RdmaWrite);
    }
    // Dropping everything here must not hang: every event read was acked.
}

#[test]
fn poll_respects_max_and_the_vec_capacity() {
    let Some(dev) = device_or_fail() else { return };
    let (mut a, mut b) = connected_pair(&dev);
    let src = Region::new(&dev, 64 * KIB, LOCAL_ONLY).unwrap();
    let dst = Region::new(&dev, 64 * KIB, REMOTE_RW).unwrap();
    let target = dst.remote_span(0, 64);
    for wr_id in 0..5 {
        b.qp.post_recv(wr_id).unwrap();
        // SAFETY: src is never written in this test.
        unsafe { a.qp.post_write_imm(wr_id, &src, 0, 64, target.addr, target.rkey, 0, wr_id == 4) }.unwrap();
    }
    expect_ok(&wait(&mut a.send_cq, 1), 4, Opcode::RdmaWrite);
    let all = wait(&mut b.recv_cq, 1);
    let mut out = Vec::with_capacity(3);
    out.extend_from_slice(&all);
    let deadline = Instant::now() + TIMEOUT;
    while out.len() < 2 && Instant::now() < deadline {
        b.recv_cq.poll(&mut out, 1);
    }
    assert_eq!(out.len(), 2);
    let capacity = out.capacity();
    assert_eq!(b.recv_cq.poll(&mut out, 100), capacity - 2, "filled to capacity only");
    assert_eq!(out.capacity(), capacity, "poll does not grow the vec");
    let rest = wait(&mut b.recv_cq, 5 - capacity);
    let ids: Vec<u64> = out.iter().chain(&rest).map(|c| c.wr_id).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4], "receives complete in order");
}

/// A QP with its own CQs, in `pd`.
fn end_in(dev: &Device, pd: &Pd) -> End {
    let send_cq = Cq::new(dev, 64).expect("send cq");
    let recv_cq = Cq::new(dev, 64).expect("recv cq");
    let qp = Qp::new_in(pd, &send_cq, &recv_cq, 32, 32).expect("qp");
    End { qp, send_cq, recv_cq }
}

fn connect_ends(a: &mut End, b: &mut End) {
    let (info_a, info_b) = (a.qp.info(), b.qp.info());
    a.qp.connect(&info_b).expect("connect a");
    b.qp.connect(&info_a).expect("connect b");
}

/// Takes whatever completions arrive on `cq` within `ms` milliseconds.
fn drain_for(cq: &mut Cq, ms: u64) -> Vec<Completion> {
    let (mut found, deadline) = (Vec::with_capacity(64), Instant::now() + Duration::from_millis(ms));
    while Instant::now() < deadline && found.len() < found.capacity() {
        cq.poll(&mut found, 64);
    }
    found
}

#[test]
fn a_region_of_another_pd_fails_locally_and_nothing_is_sent() {
    let Some(dev) = device_or_fail() else { return };
    let (mine, other) = (dev.alloc_pd().unwrap(), dev.alloc_pd().unwrap());
    let (mut a, mut b) = (end_in(&dev, &mine), end(&dev));
    connect_ends(&mut a, &mut b);
    let mut foreign = Region::new_in(&other, 4096, LOCAL_ONLY).unwrap();
    let mut own = Region::new_in(&mine, 4096, LOCAL_ONLY).unwrap();
    foreign.as_mut_slice()[..64].copy_from_slice(&pattern(3, 64));
    own.as_mut_slice()[..64].copy_from_slice(&pattern(4, 64));
    let dst = Region::new(&dev, 4096, REMOTE_RW).unwrap();
    let target = dst.remote_span(0, 64);

    // The same write from a region of the QP's own domain works...
    b.qp.post_recv(1).unwrap();
    // SAFETY: own[0..64] is not touched until A's completion below.
    unsafe { a.qp.post_write_imm(1, &own, 0, 64, target.addr, target.rkey, IMM, true) }.unwrap();
    expect_ok(&wait(&mut b.recv_cq, 1), 1, Opcode::RecvRdmaWithImm);
    expect_ok(&wait(&mut a.send_cq, 1), 1, Opcode::RdmaWrite);
    assert!(dst.as_slice()[..64] == pattern(4, 64)[..]);

    // ...and from another domain's region the post is accepted but the device refuses to read it.
    b.qp.post_recv(2).unwrap();
    // SAFETY: foreign[0..64] is not touched until A's completion below.
    unsafe { a.qp.post_write_imm(2, &foreign, 0, 64, target.addr, target.rkey, IMM, true) }.unwrap();
    let c = wait(&mut a.send_cq, 1)[0];
    println!("region of another pd: {c:?}");
    assert!(!c.ok && c.wr_id == 2, "{c:?}");
    // The spec says local protection error; rxe says local QP operation error (see the module
    // docs). Either way a local error: nothing went on the wire.
    let local = [ibv_wc_status::IBV_WC_LOC_PROT_ERR, ibv_wc_status::IBV_WC_LOC_QP_OP_ERR];
    assert!(local.contains(&c.status), "a local error, not {c:?}");
    assert!(a.qp.is_broken(), "the poster's QP is in the error state");
    let at_b = drain_for(&mut b.recv_cq, 200);
    assert!(at_b.iter().all(|c| c.wr_id != 2 || !c.ok), "nothing arrived at the peer: {at_b:?}");
    assert!(dst.as_slice()[..64] == pattern(4, 64)[..], "the target kept the first write's bytes");
}

#[test]
fn a_foreign_rkey_from_another_pd_is_a_remote_access_error() {
    let Some(dev) = device_or_fail() else { return };
    // Two "workers" a and c, each connected to a QP of its own domain on the "shard" side.
    let (pd_b, pd_d) = (dev.alloc_pd().unwrap(), dev.alloc_pd().unwrap());
    let (mut a, mut b) = (end(&dev), end_in(&dev, &pd_b));
    let (mut c, mut d) = (end(&dev), end_in(&dev, &pd_d));
    connect_ends(&mut a, &mut b);
    connect_ends(&mut c, &mut d);
    let ring_b = Region::new_in(&pd_b, 64 * KIB, REMOTE_RW).unwrap();
    let ring_d = Region::new_in(&pd_d, 64 * KIB, REMOTE_RW).unwrap();
    let mut src = Region::new(&dev, 4096, LOCAL_ONLY).unwrap();
    src.as_mut_slice()[..256].copy_from_slice(&pattern(5, 256));
    let (key_b, key_d) = (ring_b.remote_span(0, 256), ring_d.remote_span(0, 256));

    // a reaches b's ring through b...
    b.qp.post_recv(1).unwrap();
    // SAFETY: src is never written after the fill above.
    unsafe { a.qp.post_write_imm(1, &src, 0, 256, key_b.addr, key_b.rkey, IMM, true) }.unwrap();
    expect_ok(&wait(&mut b.recv_cq, 1), 1, Opcode::RecvRdmaWithImm);
    expect_ok(&wait(&mut a.send_cq, 1), 1, Opcode::RdmaWrite);

    // ...but d's key, valid on d's own QP, is refused on b's: it names no region of b's domain.
    b.qp.post_recv(2).unwrap();
    // SAFETY: as above.
    unsafe { a.qp.post_write_imm(2, &src, 0, 256, key_d.addr, key_d.rkey, IMM, true) }.unwrap();
    let failed = wait(&mut a.send_cq, 1)[0];
    println!("foreign rkey at the writer: {failed:?}");
    assert!(!failed.ok && failed.wr_id == 2, "{failed:?}");
    assert_eq!((failed.status, failed.status_text), (ibv_wc_status::IBV_WC_REM_ACCESS_ERR, "remote access error"));
    assert!(a.qp.is_broken(), "the writer's QP is in the error state");
    let at_b = drain_for(&mut b.recv_cq, 200);
    println!("foreign rkey at the responder: {at_b:?}");
    assert!(at_b.iter().all(|c| !c.ok), "the responder saw no successful arrival: {at_b:?}");
    assert!(ring_d.as_slice().iter().all(|&byte| byte == 0), "nothing landed in d's ring");

    // The key itself is good: c writes through d's QP with it.
    d.qp.post_recv(3).unwrap();
    // SAFETY: as above.
    unsafe { c.qp.post_write_imm(3, &src, 0, 256, key_d.addr, key_d.rkey, IMM, true) }.unwrap();
    expect_ok(&wait(&mut d.recv_cq, 1), 3, Opcode::RecvRdmaWithImm);
    expect_ok(&wait(&mut c.send_cq, 1), 3, Opcode::RdmaWrite);
    assert!(ring_d.as_slice()[..256] == pattern(5, 256)[..]);
}

#[test]
fn a_bad_gid_index_is_an_error_that_says_what_to_set_not_a_panic() {
    assert_eq!(gid_index_from(None).unwrap(), 1);
    assert_eq!(gid_index_from(Some(" 3 ")).unwrap(), 3);
    for bad in ["", "x", "-1", "256", "1.5"] {
        let err = gid_index_from(Some(bad)).unwrap_err().reason;
        assert!(err.contains("RDMA_GID_INDEX") && err.contains("ibv_devinfo -v"), "{bad:?}: {err}");
    }
}
