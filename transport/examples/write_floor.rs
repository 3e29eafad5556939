//! What it costs to notice a small RDMA write, measured three ways on one device: the floor under
//! Tessera's small requests and replies. Run it where there is a device, e.g. in the SoftRoCE
//! guest:
//!
//! ```sh
//! cargo build --release -p tessera-transport --features rdma --example write_floor
//! tests/softroce/run.sh target/release/examples/write_floor
//! ```
//!
//! Two threads, on CPUs 0 and 1 as perftest's pair is pinned, ping-pong `FLOOR_BYTES` bytes
//! (default 16; the last 8 number the message) `FLOOR_ITERS` times (default 20,000) each way,
//! for `FLOOR_ROUNDS` rounds (default 3), and print each way's one-way median and 10th percentile:
//!
//! - `write, memory`: a plain write; the receiver polls the last word of its buffer. This is
//!   what perftest's `ib_write_lat` does.
//! - `imm, completion first`: a write with immediate data; the receiver takes the completion
//!   and posts the receive again before it answers (`--rdma-arrival completion`).
//! - `imm, memory`: the same write; the receiver sees the last word, answers, and takes the
//!   completion after (`--rdma-arrival memory`, Tessera's default).

use std::time::Instant;

use tessera_transport::rdma::verbs::{Access, Completion, Cq, Device, DeviceConfig, Opcode, Qp, Region, RemoteChunk};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Way {
    WriteMemory,
    ImmCompletionFirst,
    ImmMemory,
}

const WAYS: [(Way, &str); 3] = [(Way::WriteMemory, "write, memory"), (Way::ImmCompletionFirst, "imm, completion first"), (Way::ImmMemory, "imm, memory")];

/// One end: a queue pair whose sends and receives complete on one CQ, as a Tessera link's do,
/// and the buffer the other end writes into.
struct End {
    qp: Qp,
    cq: Cq,
    inbox: Region,
    completions: Vec<Completion>,
}

impl End {
    fn new(dev: &Device) -> End {
        let cq = Cq::new(dev, 256).expect("a completion queue");
        let qp = Qp::new(dev, &cq, &cq, 128, 64).expect("a queue pair");
        let inbox = Region::new(dev, 4096, Access { remote_write: true, remote_read: false }).expect("a region");
        End { qp, cq, inbox, completions: Vec::with_capacity(64) }
    }

    /// Takes the completions there are, posting a receive again for each one a write used.
    fn reap(&mut self) -> usize {
        self.completions.clear();
        self.cq.poll(&mut self.completions, 64);
        let mut receives = 0;
        for c in &self.completions {
            assert!(c.ok, "a work request failed: {}", c.status_text);
            if c.opcode == Opcode::RecvRdmaWithImm {
                self.qp.post_recv(c.wr_id).expect("posting a receive");
                receives += 1;
            }
        }
        receives
    }
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity get valid
    // pointers to it for the duration of the calls.
    unsafe {
        let mut set = std::mem::zeroed::<libc::cpu_set_t>();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

/// One end's side of `iters` exchanges; the first end sends first and times each round trip.
fn run(mut end: End, peer: RemoteChunk, way: Way, first: bool, iters: u64, bytes: usize) -> Vec<u64> {
    for i in 0..64 {
        end.qp.post_recv(i).expect("posting a receive");
    }
    let seq_at = bytes - 8;
    let mut message = vec![7u8; bytes];
    let mut times = Vec::with_capacity(iters as usize);
    for i in 1..=iters {
        let start = Instant::now();
        for turn in [first, !first] {
            if turn {
                message[seq_at..].copy_from_slice(&i.to_le_bytes());
                let signaled = i % 32 == 0;
                let posted = match way {
                    Way::WriteMemory => end.qp.post_write_inline(i, &message, peer.addr, peer.rkey, signaled),
                    _ => end.qp.post_write_imm_inline(i, &message, peer.addr, peer.rkey, 1, signaled),
                };
                posted.expect("posting a write");
                if way != Way::ImmCompletionFirst {
                    end.reap(); // after answering: off the round trip
                }
            } else if way == Way::ImmCompletionFirst {
                while end.reap() == 0 {}
                assert_eq!(end.inbox.load_u64(seq_at), i, "the completion came before the bytes");
            } else {
                while end.inbox.load_u64(seq_at) != i {
                    std::hint::spin_loop();
                }
            }
        }
        times.push(start.elapsed().as_nanos() as u64);
    }
    times
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let (iters, rounds) = (env("FLOOR_ITERS", 20_000), env("FLOOR_ROUNDS", 3));
    let bytes = env("FLOOR_BYTES", 16).clamp(8, 256) as usize / 8 * 8;
    let dev = match Device::open(&DeviceConfig::from_env().expect("the RDMA environment")) {
        Ok(dev) => dev,
        Err(unavailable) => {
            eprintln!("write_floor: no RDMA device: {unavailable}");
            std::process::exit(2);
        }
    };
    println!("{bytes}-byte messages, {iters} round trips per way and round; one-way times in us");
    for round in 1..=rounds {
        for (way, name) in WAYS {
            let (mut a, mut b) = (End::new(&dev), End::new(&dev));
            let (info_a, info_b) = (a.qp.info(), b.qp.info());
            a.qp.connect(&info_b).expect("connecting");
            b.qp.connect(&info_a).expect("connecting");
            let (to_a, to_b) = (a.inbox.remote_span(0, 4096), b.inbox.remote_span(0, 4096));
            let other = std::thread::spawn(move || {
                pin(1);
                run(b, to_a, way, false, iters, bytes)
            });
            pin(0);
            let mut times = run(a, to_b, way, true, iters, bytes);
            other.join().expect("the other end");
            times.sort_unstable();
            let one_way = |q: usize| times[times.len() * q / 100] as f64 / 2000.0;
            println!("round {round}  {name:<22} median {:6.2}  p10 {:6.2}", one_way(50), one_way(10));
        }
    }
}
