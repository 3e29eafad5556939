//! The deterministic simulator as a test: many seeds must pass every checker, and a planted bug
//! must be caught. `SIM_SEEDS` and `SIM_SEED_FROM` choose the seeds (the test command runs
//! 10,000 in a release build); a failure prints the command that replays it.

use tessera_replication::replica::Canary;
use tessera_replication::sim::{self, SimOptions};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn seeds_pass_every_checker() {
    // A debug build runs about fifteen times slower than a release one.
    let count = env_u64("SIM_SEEDS", if cfg!(debug_assertions) { 200 } else { 3000 });
    let from = env_u64("SIM_SEED_FROM", 0);
    let mut failures = Vec::new();
    let (mut crashes, mut partitions, mut power_losses, mut snapshots, mut resumes) = (0, 0, 0, 0, 0);
    let (mut joins, mut drains) = (0, 0);
    for seed in from..from + count {
        match sim::run(&SimOptions { seed, ..Default::default() }) {
            Ok(report) => {
                crashes += report.crashes;
                partitions += report.partitions;
                power_losses += report.power_losses;
                snapshots += report.snapshots;
                resumes += report.resumes;
                joins += report.joins;
                drains += report.drains;
            }
            Err(failure) => failures.push(failure.to_string()),
        }
    }
    println!(
        "{count} seeds from {from}: {} failed, {crashes} crashes, {power_losses} whole-cluster power losses, {partitions} partitions, {joins} servers joined, {drains} drained; {snapshots} snapshots sent, {resumes} learners resumed from what they held",
        failures.len()
    );
    assert!(joins > count / 4 && drains > count / 10, "servers joined and were drained: {joins} joins, {drains} drains in {count} seeds");
    assert!(
        crashes > count && partitions > count / 4 && power_losses > count / 10,
        "the faults were injected: {crashes} crashes, {power_losses} power losses, {partitions} partitions"
    );
    assert!(resumes > count / 10, "restarted servers resumed from their disks ({resumes} in {count} seeds)");
    assert!(failures.is_empty(), "{} of {count} seeds failed:\n{}", failures.len(), failures.join("\n"));
}

/// Runs the first 200 seeds with `canary` planted until one fails in a way `caught` accepts;
/// panics if none does.
fn canary_is_caught(canary: Canary, caught: impl Fn(&str) -> bool) {
    let mut found = None;
    let mut failed = 0;
    for seed in 0..200 {
        if let Err(failure) = sim::run(&SimOptions { seed, canary, ..Default::default() }) {
            failed += 1;
            if caught(&failure.what) {
                found = Some(failure);
                break;
            }
        }
    }
    let found = found.unwrap_or_else(|| panic!("the planted bug {canary:?} was not caught ({failed} of 200 seeds failed otherwise)"));
    println!("canary {canary:?} caught at seed {} ({failed} seeds failed up to it):\n{found}", found.seed);
}

#[test]
fn canary_ack_at_head_is_caught() {
    // A head that acknowledges a push before the tail holds it loses acknowledged pushes when it
    // fails: the checker that no acknowledged push is lost must say so, for some seed.
    canary_is_caught(Canary::AckAtHead, |what| what.starts_with("acknowledged push lost"));
}

#[test]
fn canary_ack_before_durable_is_caught() {
    // Replicas that commit updates their disks do not hold yet break what an acknowledgement
    // promises (every member's disk holds the push), and lose acknowledged pushes when the whole
    // cluster loses power: a checker must say so, at the acknowledgement, as a lost push, or as a
    // version committed twice with different contents (a chain revived from a disk that lacked it
    // went on without it).
    canary_is_caught(Canary::AckBeforeDurable, |what| {
        what.contains("holds them only up to") || what.starts_with("acknowledged push lost") || what.contains("another replica held")
    });
}

#[test]
fn canary_tail_ack_undurable_is_caught() {
    // A tail that acknowledges workers once it holds a push on disk, without waiting for the
    // replicas upstream to hold it on disk too, breaks what an acknowledgement promises: the
    // checker at each acknowledgement must say so. (A power loss alone need not lose it: the
    // tail's disk has it.)
    canary_is_caught(Canary::TailAckUndurable, |what| what.contains("holds them only up to"));
}

#[test]
fn canary_resume_unchecked_is_caught() {
    // A tail that lets a restarted server resume from its disk without comparing history
    // digests lets an old head's branch (updates it applied that never reached its successor)
    // back into the chain: a checker must see two replicas hold different data at the same
    // version (seed 183 of the first 300: the same clock, too), or a replica refuse an update
    // that does not follow what it holds.
    canary_is_caught(Canary::ResumeUnchecked, |what| what.contains("another replica held") || what.contains("refused"));
}
