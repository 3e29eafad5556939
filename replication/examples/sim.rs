//! Runs the replication simulator: one seed (to replay a failure), or many.
//!
//!   cargo run -p tessera-replication --release --example sim -- --seed 42 --trace
//!   cargo run -p tessera-replication --release --example sim -- --seeds 10000 [--from 0]
//!   cargo run -p tessera-replication --release --example sim -- --seeds 200 --canary ack-at-head
//!   cargo run -p tessera-replication --release --example sim -- --seeds 200 --canary ack-before-durable
//!   cargo run -p tessera-replication --release --example sim -- --seeds 200 --canary resume-unchecked
//!   cargo run -p tessera-replication --release --example sim -- --seeds 200 --canary tail-ack-undurable

use std::process::ExitCode;
use std::time::Instant;

use tessera_replication::replica::Canary;
use tessera_replication::sim::{self, SimOptions};

const USAGE: &str = "usage: sim [--seed N | --seeds COUNT [--from N]] [--trace] [--tail-acks on|off] [--canary ack-at-head|ack-before-durable|resume-unchecked|tail-ack-undurable]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut from, mut count, mut trace, mut canary) = (0u64, 1u64, false, Canary::None);
    let mut tail_acks = None;
    while let Some(arg) = args.next() {
        let mut number = |what: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("{what} needs a number\n{USAGE}");
            }
            v
        };
        match arg.as_str() {
            "--seed" => match number("--seed") {
                Some(n) => (from, count) = (n, 1),
                None => return ExitCode::from(2),
            },
            "--seeds" => match number("--seeds") {
                Some(n) => count = n,
                None => return ExitCode::from(2),
            },
            "--from" => match number("--from") {
                Some(n) => from = n,
                None => return ExitCode::from(2),
            },
            "--trace" => trace = true,
            "--tail-acks" => match args.next().as_deref() {
                Some("on") => tail_acks = Some(true),
                Some("off") => tail_acks = Some(false),
                other => {
                    eprintln!("--tail-acks takes on or off, not {other:?}\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--canary" => match args.next().as_deref() {
                Some("ack-at-head") => canary = Canary::AckAtHead,
                Some("ack-before-durable") => canary = Canary::AckBeforeDurable,
                Some("resume-unchecked") => canary = Canary::ResumeUnchecked,
                Some("tail-ack-undurable") => canary = Canary::TailAckUndurable,
                other => {
                    eprintln!("unknown canary {other:?}; the ones there are: ack-at-head, ack-before-durable, resume-unchecked, tail-ack-undurable\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let started = Instant::now();
    let (mut failed, mut sim_ms, mut crashes, mut partitions, mut messages) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut power_losses = 0u64;
    let mut overlapping = 0u64;
    let (mut joins, mut drains) = (0u64, 0u64);
    let (mut acked, mut ack_ms, mut tail_acked, mut quiet_acked, mut quiet_ack_ms) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for seed in from..from + count {
        match sim::run(&SimOptions { seed, canary, trace, tail_acks }) {
            Ok(r) => {
                sim_ms += r.sim_ms;
                crashes += r.crashes;
                power_losses += r.power_losses;
                partitions += r.partitions;
                overlapping += r.overlapping;
                (joins, drains) = (joins + r.joins, drains + r.drains);
                messages += r.messages;
                (acked, ack_ms, tail_acked) = (acked + r.pushes_acked, ack_ms + r.ack_ms, tail_acked + r.tail_acks);
                (quiet_acked, quiet_ack_ms) = (quiet_acked + r.quiet_acked, quiet_ack_ms + r.quiet_ack_ms);
                if count == 1 {
                    println!("seed {seed} passed: {r:?}");
                }
            }
            Err(f) => {
                failed += 1;
                println!("{f}");
            }
        }
    }
    println!(
        "{count} seeds from {from}: {failed} failed; {:.1} s simulated, {crashes} crashes, {power_losses} whole-cluster power losses, {partitions} partitions ({overlapping} of them while another was undetected), {joins} servers joined, {drains} drained, {messages} messages, in {:.1} s",
        sim_ms as f64 / 1000.0,
        started.elapsed().as_secs_f64()
    );
    if acked > 0 {
        let mean = |ms: u64, n: u64| ms as f64 / n.max(1) as f64;
        println!(
            "{acked} pushes acknowledged, {:.2} ms from start to first acknowledgement on average ({quiet_acked} started after the faults: {:.2} ms); {tail_acked} acknowledgements from tails",
            mean(ack_ms, acked),
            mean(quiet_ack_ms, quiet_acked)
        );
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
