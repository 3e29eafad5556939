//! A seeded, single-threaded simulation of a replicated cluster: servers ([`Replica`]), the
//! [`Coordinator`], training workers and the network between them, all driven by one clock and
//! one random generator. The same seed gives the same run, step for step.
//!
//! While faults are on, the network drops, duplicates, delays and so reorders messages,
//! partitions servers from each other and from the coordinator, and servers crash (losing
//! everything in memory) and restart. Then the faults stop, and the run goes on until the
//! workers' pushes are all acknowledged and the cluster has settled.
//!
//! Half the seeds give every server a disk ([`store::SimDisk`]): each write reaches it at the
//! server's next sync (a group commit every few milliseconds), and a crash keeps what was synced,
//! plus a prefix of the writes since with the next one torn. A restarted server recovers what its
//! disk holds. In those seeds the whole cluster also loses power at once, coordinator included
//! (which then resumes from the configuration it last published, as it would from etcd or its
//! own file), and every server restarts from its disk: no acknowledged push may be lost.
//!
//! In a third of the seeds the cluster's servers change while the faults go on, as they do
//! while a job trains: servers that were not members join (and the ring moves ranges to them),
//! and members are drained (their ranges move away) and stop once the configuration says they
//! are done. Seeds keep one, two or three replicas. A chain of one survives the loss of its
//! member only from its disk: without disks, such seeds crash and cut off no server.
//!
//! The failures stay within what chain replication promises to survive: every range keeps a
//! reachable, running chain member that holds its committed updates, and a crash or partition
//! comes at least one failure-detection time (`failure_timeout_ms` plus a heartbeat) after the
//! one before. Two servers failing within one detection time of each other can both be copies
//! of a range the coordinator is meanwhile shrinking back to `replicas` members.
//!
//! The checkers ([`check`]) watch every step: at most one head per range and epoch; vector
//! clocks never go backwards; every replica at a range's version `v` holds the same clock and
//! data. At the end: no acknowledged push is lost, every range's replicas are byte-identical,
//! and each holds exactly the sum of the pushes its clock counts.
//!
//! `cargo run -p tessera-replication --release --example sim -- --seed N --trace` replays seed
//! N and prints every message.

pub mod check;
pub mod store;
pub mod worker;

use std::collections::BTreeMap;
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::config::ReplicationConfig;
use crate::coordinator::Coordinator;
use crate::protocol::{Addr, Member, Msg, NodeId, RangeId, WorkerId};
use crate::replica::{Canary, Replica};
use check::Checker;
use store::{SimStore, VALUES};
use worker::SimWorker;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    pub seed: u64,
    /// A bug to plant in every replica; the checkers must catch it.
    pub canary: Canary,
    /// Print every message and fault to stderr.
    pub trace: bool,
    /// Whether tails acknowledge workers in every seed, overriding each seed's pick.
    pub tail_acks: Option<bool>,
}

/// The cluster and faults a seed picks.
#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: u32,
    pub rcfg: ReplicationConfig,
    pub pushes_per_worker: u32,
    pub fault_ms: u64,
    pub drop_p: f64,
    pub dup_p: f64,
    pub delay_max_ms: u64,
    pub crash_every_ms: u64,
    pub partition_every_ms: u64,
    pub worker_retry_ms: u64,
    pub quiet_ms_max: u64,
    /// What a snapshot (a whole range) takes on top of any message's delay: up to this, each
    /// one; a link slower than the replicas' resend waits, as TCP under load or in an emulated
    /// guest. 0 for most seeds.
    pub snapshot_delay_max_ms: u64,
    /// Workers go on pushing after the faults end until every chain is whole again, as a
    /// training job does: a learner must catch up with a range that keeps changing, not only
    /// with one that has gone still. Otherwise each worker stops after its pushes.
    pub push_until_whole: bool,
    /// Tails acknowledge workers' pushes themselves, besides the heads
    /// ([`Replica::ack_from_tail`]); always with the canary that gets that wrong.
    pub tail_acks: bool,
    /// Servers keep their ranges on disk, synced every `sync_every_ms`; the whole cluster
    /// loses power about every `power_loss_every_ms` (`None`: servers have no disk).
    pub disks: Option<Disks>,
    /// Servers join and are drained while the faults go on (`None`: the members stay).
    pub churn: Option<Churn>,
}

/// The joins and drains of a seed whose cluster changes.
#[derive(Debug, Clone, Copy)]
pub struct Churn {
    /// Servers that are not members at the start: each joins the cluster at a random time (at
    /// the latest when the faults end).
    pub joining: u32,
    /// About how often a server joins, and a member is drained, while the faults go on.
    pub join_every_ms: u64,
    pub drain_every_ms: u64,
}

/// The disks of a seed whose servers have them.
#[derive(Debug, Clone, Copy)]
pub struct Disks {
    pub sync_every_ms: u64,
    pub power_loss_every_ms: u64,
}

impl Params {
    fn pick(rng: &mut Xoshiro256PlusPlus) -> Self {
        let nodes = rng.gen_range(3..=5);
        let rcfg = ReplicationConfig {
            replicas: rng.gen_range(1..=3),
            ranges: rng.gen_range(2..=8),
            vnodes: 16,
            workers: rng.gen_range(2..=4),
            heartbeat_interval_ms: 20,
            failure_timeout_ms: 100,
            resend_interval_ms: 10,
        };
        Self {
            nodes,
            rcfg,
            pushes_per_worker: rng.gen_range(30..=120),
            fault_ms: rng.gen_range(1000..=3000),
            drop_p: rng.gen_range(0.0..0.08),
            dup_p: rng.gen_range(0.0..0.05),
            delay_max_ms: rng.gen_range(1..=8),
            crash_every_ms: rng.gen_range(150..=1500),
            partition_every_ms: rng.gen_range(300..=3000),
            worker_retry_ms: 40,
            quiet_ms_max: 30_000,
            snapshot_delay_max_ms: if rng.gen_bool(0.3) { rng.gen_range(50..=3000) } else { 0 },
            push_until_whole: rng.gen_bool(0.5),
            tail_acks: rng.gen_bool(0.5),
            disks: rng.gen_bool(0.5).then(|| Disks { sync_every_ms: rng.gen_range(1..=20), power_loss_every_ms: rng.gen_range(500..=2500) }),
            churn: rng.gen_bool(1.0 / 3.0).then(|| Churn {
                joining: rng.gen_range(1..=2),
                join_every_ms: rng.gen_range(200..=1500),
                drain_every_ms: rng.gen_range(200..=1500),
            }),
        }
    }
}

/// What a passing run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub sim_ms: u64,
    pub messages: u64,
    pub dropped: u64,
    pub crashes: u64,
    /// Times the whole cluster lost power at once.
    pub power_losses: u64,
    pub partitions: u64,
    /// Crashes and partitions that began while another was still undetected (within one
    /// detection time of it): only with 3 replicas.
    pub overlapping: u64,
    pub pushes_acked: u64,
    /// Milliseconds from each acknowledged push's start to its first acknowledgement, summed.
    pub ack_ms: u64,
    /// The same for the pushes started after the faults ended (the network still delays).
    pub quiet_acked: u64,
    pub quiet_ack_ms: u64,
    /// Acknowledgements workers had from tails ([`Replica::ack_from_tail`]).
    pub tail_acks: u64,
    pub configs: u64,
    /// Servers that joined the cluster, and servers drained that stopped.
    pub joins: u64,
    pub drains: u64,
    /// Snapshots sent, and learners resumed from what they held instead (every replica's,
    /// crashed ones' included).
    pub snapshots: u64,
    pub resumes: u64,
}

impl Report {
    /// Adds what `replica` did to the counts (when it stops, and at the end).
    fn count(&mut self, replica: &Replica<SimStore>) {
        self.snapshots += replica.stats().snapshots_sent;
        self.tail_acks += replica.stats().tail_acks;
        self.resumes += replica.stats().resumes;
    }
}

/// A checker's finding, with what it takes to replay it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub at_ms: u64,
    pub what: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at {} ms: {}\n  replay: cargo run -p tessera-replication --release --example sim -- --seed {} --trace",
            self.seed, self.at_ms, self.what, self.seed
        )
    }
}

struct Node {
    replica: Option<Replica<SimStore>>,
    incarnation: u64,
    /// When a crashed node restarts; never, for one that has not joined yet or has left.
    restart_ms: u64,
    /// Not started yet: a server that joins the cluster later ([`Churn`]).
    joining: bool,
    /// Drained, and stopped for good.
    left: bool,
    /// While down: what it restarts from (its disk).
    store: SimStore,
}

struct Sim {
    p: Params,
    opts: SimOptions,
    rng: Xoshiro256PlusPlus,
    now: u64,
    next_id: u64,
    queue: BTreeMap<(u64, u64), (Addr, Addr, Msg)>,
    nodes: Vec<Node>,
    coordinator: Coordinator,
    /// Until when the coordinator is down (the cluster lost power): it then resumes from the
    /// configuration it last published.
    coordinator_down: Option<u64>,
    workers: Vec<SimWorker>,
    /// Servers cut off from the other servers and the coordinator, until when.
    partition: Option<(Vec<NodeId>, u64)>,
    faults: bool,
    /// When the crashes and partitions of the last detection time began. At most `replicas - 1`
    /// (and at least one) begin within one detection time: a chain of `replicas` survives that
    /// many failures the coordinator has not noticed yet, and no more.
    failed_ms: Vec<u64>,
    checker: Checker,
    /// When each push not yet acknowledged started, by (worker, range, seq).
    started: BTreeMap<(u32, u32, u32), u64>,
    /// An acknowledgement that broke its promise ([`Sim::check_on_disks`]).
    violation: Option<String>,
    report: Report,
}

/// Runs one seed. A panic inside (a replica's or coordinator's assertion) is a failure too.
pub fn run(opts: &SimOptions) -> Result<Report, Failure> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_inner(opts))) {
        Ok(result) => result,
        Err(panic) => {
            let what =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "a panic".into());
            Err(Failure { seed: opts.seed, at_ms: 0, what: format!("panicked: {what}") })
        }
    }
}

fn run_inner(opts: &SimOptions) -> Result<Report, Failure> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(opts.seed);
    let mut p = Params::pick(&mut rng);
    p.tail_acks = opts.tail_acks.unwrap_or(p.tail_acks);
    let members = (0..p.nodes).map(|n| Member { node: NodeId(n), incarnation: 1, addr: String::new(), draining: false });
    let coordinator = Coordinator::new(p.rcfg.clone(), 1, members.collect(), 0);
    let store = || if p.disks.is_some() { SimStore::with_disk() } else { SimStore::default() };
    let members = (0..p.nodes).map(|n| Node {
        replica: Some(new_replica(&p, opts, n, 1, store())),
        incarnation: 1,
        restart_ms: 0,
        joining: false,
        left: false,
        store: SimStore::default(),
    });
    // Servers that join later start with an empty disk (new machines), as the first ones did.
    let joining =
        (0..p.churn.map_or(0, |c| c.joining)).map(|_| Node { replica: None, incarnation: 0, restart_ms: u64::MAX, joining: true, left: false, store: store() });
    let nodes = members.chain(joining);
    let view = coordinator.config().clone();
    let workers = (0..p.rcfg.workers).map(|w| SimWorker::new(WorkerId(w), p.rcfg.ranges, p.pushes_per_worker, view.clone()));
    let mut sim = Sim {
        checker: Checker::new(&p),
        nodes: nodes.collect(),
        workers: workers.collect(),
        coordinator,
        coordinator_down: None,
        p,
        opts: opts.clone(),
        rng,
        now: 0,
        next_id: 0,
        queue: BTreeMap::new(),
        partition: None,
        faults: true,
        failed_ms: Vec::new(),
        started: BTreeMap::new(),
        violation: None,
        report: Report::default(),
    };
    if opts.trace {
        eprintln!("sim seed {}: {:?}", opts.seed, sim.p);
    }
    let config = sim.coordinator.config().clone();
    for n in 0..sim.p.nodes {
        sim.route(Addr::Coordinator, Addr::Node(NodeId(n)), Msg::Config(config.clone()));
    }
    sim.run().map_err(|what| Failure { seed: opts.seed, at_ms: sim.now, what })?;
    sim.report.sim_ms = sim.now;
    for replica in sim.nodes.iter().filter_map(|n| n.replica.as_ref()) {
        sim.report.count(replica);
    }
    Ok(sim.report)
}

fn new_replica(p: &Params, opts: &SimOptions, node: u32, incarnation: u64, store: SimStore) -> Replica<SimStore> {
    let mut r = Replica::new(NodeId(node), incarnation, String::new(), p.rcfg.clone(), store);
    r.plant(opts.canary);
    r.ack_from_tail(p.tail_acks || opts.canary == Canary::TailAckUndurable);
    r
}

impl Sim {
    fn run(&mut self) -> Result<(), String> {
        let end = self.p.fault_ms + self.p.quiet_ms_max;
        while self.now < end {
            if self.faults && self.now >= self.p.fault_ms {
                self.heal();
            }
            self.deliver_due();
            self.tick();
            let nodes: Vec<_> = self.nodes.iter().map(|n| n.replica.as_ref()).collect();
            self.checker.step(self.now, &nodes)?;
            if let Some(violation) = self.violation.take() {
                return Err(violation);
            }
            if self.faults {
                self.inject();
            } else if self.settled() {
                return self.checker.finish(&self.nodes_view(), &self.coordinator, &self.workers);
            }
            self.now += 1;
        }
        self.checker.lost(&self.nodes_view(), &self.coordinator, &self.workers)?;
        Err(format!("no progress: the cluster did not settle within {} ms of the faults' end; {}", self.p.quiet_ms_max, self.stuck()))
    }

    fn nodes_view(&self) -> Vec<Option<&Replica<SimStore>>> {
        self.nodes.iter().map(|n| n.replica.as_ref()).collect()
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.opts.trace {
            eprintln!("{:>6} ms  {}", self.now, what());
        }
    }

    /// Queues a message, or loses it to the network's faults.
    fn route(&mut self, from: Addr, to: Addr, msg: Msg) {
        self.report.messages += 1;
        if self.faults {
            let cut = self.partition.as_ref().is_some_and(|(cut, _)| {
                let inside = |a: Addr| matches!(a, Addr::Node(n) if cut.contains(&n));
                let replication = |a: Addr| matches!(a, Addr::Node(_) | Addr::Coordinator);
                replication(from) && replication(to) && inside(from) != inside(to)
            });
            if cut || self.rng.gen_bool(self.p.drop_p) {
                self.report.dropped += 1;
                self.trace(|| format!("drop {from:?} -> {to:?} {}", msg.kind()));
                return;
            }
            if self.rng.gen_bool(self.p.dup_p) {
                self.enqueue(from, to, msg.clone());
            }
        }
        self.enqueue(from, to, msg);
    }

    fn enqueue(&mut self, from: Addr, to: Addr, msg: Msg) {
        let mut at = self.now + self.rng.gen_range(1..=self.p.delay_max_ms);
        if matches!(msg, Msg::Snapshot { .. }) && self.p.snapshot_delay_max_ms > 0 {
            at += self.rng.gen_range(0..=self.p.snapshot_delay_max_ms);
        }
        self.next_id += 1;
        self.queue.insert((at, self.next_id), (from, to, msg));
    }

    fn deliver_due(&mut self) {
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let (from, to, msg) = entry.remove();
            self.trace(|| format!("{from:?} -> {to:?} {msg:?}"));
            match to {
                Addr::Node(n) => {
                    if let Some(r) = self.nodes[n.0 as usize].replica.as_mut() {
                        r.step(self.now, from, msg);
                    }
                }
                Addr::Worker(w) => {
                    let Addr::Node(from) = from else { unreachable!("only servers send workers messages") };
                    let coordinator_view = self.coordinator.config().clone();
                    if let Msg::PushAck { range, seq } = &msg {
                        self.checker.acked(w, *range, *seq);
                        self.timed_ack(w, *range, *seq);
                    }
                    let worker = &mut self.workers[w.0 as usize];
                    if worker.on_msg(self.now, from, msg) {
                        worker.view = coordinator_view;
                    }
                }
                Addr::Coordinator if self.coordinator_down.is_none() => self.coordinator.step(self.now, msg),
                Addr::Coordinator => {}
            }
        }
    }

    /// One millisecond of everyone's time, then their messages onto the network.
    fn tick(&mut self) {
        let now = self.now;
        let mut out = Vec::new();
        let sync = self.p.disks.is_some_and(|d| now.is_multiple_of(d.sync_every_ms));
        for node in &mut self.nodes {
            if let Some(r) = node.replica.as_mut() {
                if sync {
                    r.store_mut().sync();
                }
                r.flush();
                r.tick(now);
                out.extend(r.take_ready().into_iter().map(|(to, m)| (Addr::Node(r.id()), to, m)));
            }
        }
        self.stop_drained();
        if self.coordinator_down.is_some_and(|until| now >= until) {
            self.coordinator_down = None;
            self.coordinator = Coordinator::resume(self.p.rcfg.clone(), (**self.coordinator.config()).clone(), now);
            self.trace(|| "coordinator resumed from its stored configuration".into());
        }
        if now.is_multiple_of(5) && self.coordinator_down.is_none() {
            self.coordinator.tick(now);
            for change in self.coordinator.take_changes() {
                self.trace(|| format!("coordinator: {change:?}"));
            }
            let config = self.coordinator.config();
            if config.id > self.report.configs {
                self.report.configs = config.id;
            }
        }
        for (from, to, msg) in &out {
            if let (Addr::Node(n), Addr::Worker(w), Msg::PushAck { range, seq }) = (from, to, msg) {
                self.check_on_disks(*n, *w, *range, *seq);
            }
        }
        out.extend(self.coordinator.take_ready().into_iter().map(|(to, m)| (Addr::Coordinator, to, m)));
        self.push_work();
        for w in &mut self.workers {
            let id = w.id;
            out.extend(w.out.drain(..).map(|(to, m)| (Addr::Worker(id), to, m)));
        }
        for (from, to, msg) in out {
            self.route(from, to, msg);
        }
    }

    /// Workers start pushes at random, and resend those that timed out.
    fn push_work(&mut self) {
        let ranges = self.p.rcfg.ranges;
        if self.p.push_until_whole && !self.faults && !self.chains_whole(false) {
            for w in &mut self.workers {
                w.to_push = w.to_push.max(1);
            }
        }
        for w in 0..self.workers.len() {
            if self.workers[w].timed_out(self.now, self.p.worker_retry_ms) {
                self.workers[w].view = self.coordinator.config().clone();
                self.poll_heads(w);
                self.workers[w].resend(self.now, self.p.worker_retry_ms);
            }
            if !self.rng.gen_bool(0.3) {
                continue;
            }
            let range = RangeId(self.rng.gen_range(0..ranges));
            if !self.workers[w].can_push(range) {
                continue;
            }
            let values: [i64; VALUES] = std::array::from_fn(|_| self.rng.gen_range(-1000..=1000));
            let seq = self.workers[w].push(self.now, range, store::encode(&values).into());
            self.checker.pushed(WorkerId(w as u32), range, seq, values);
            self.started.insert((w as u32, range.0, seq), self.now);
        }
    }

    /// Node `n` acknowledges worker `w`'s pushes to `range` up to `seq`: what an acknowledgement
    /// promises on servers with disks is that every member of the range's chain holds them on
    /// disk. Checked against the members of the chain in `n`'s configuration that are still in
    /// the coordinator's (one removed since may have dropped the range), running or crashed.
    fn check_on_disks(&mut self, n: NodeId, w: WorkerId, range: RangeId, seq: u32) {
        if self.p.disks.is_none() || self.violation.is_some() {
            return;
        }
        let Some(view) = self.nodes[n.0 as usize].replica.as_ref().and_then(|r| r.config().cloned()) else { return };
        let (Some(chain), Some(now)) = (view.chain(range), self.coordinator.config().chain(range)) else { return };
        for m in chain.nodes.iter().filter(|m| now.nodes.contains(m)) {
            let node = &self.nodes[m.0 as usize];
            let disk = node.replica.as_ref().map_or(&node.store, |r| r.store()).disk.as_ref();
            let held = disk.and_then(|d| d.held.get(&range)).map_or(0, |(_, clock, _, _)| clock.get(w.0 as usize).copied().unwrap_or(0));
            if held < seq {
                self.violation =
                    Some(format!("{n} acknowledged {w:?}'s pushes to {range:?} up to {seq}, but the disk of chain member {m} holds them only up to {held}"));
                return;
            }
        }
    }

    /// Worker `w`'s pushes to `range` up to `seq` are acknowledged: each one's first
    /// acknowledgement is timed.
    fn timed_ack(&mut self, w: WorkerId, range: RangeId, seq: u32) {
        let acked: Vec<_> = self.started.range((w.0, range.0, 0)..=(w.0, range.0, seq)).map(|(k, at)| (*k, *at)).collect();
        for (key, at) in acked {
            self.started.remove(&key);
            self.report.pushes_acked += 1;
            self.report.ack_ms += self.now - at;
            if at >= self.p.fault_ms {
                self.report.quiet_acked += 1;
                self.report.quiet_ack_ms += self.now - at;
            }
        }
    }

    /// What a client's polls tell it before it resends: it polls each head (in the worker's
    /// view) of a range it has pushes in flight to, and each answers, as a server's shard does,
    /// for every range it heads by its own configuration (which may be older or newer than the
    /// worker's): the worker's pushes committed there are acknowledged, and it says how many it
    /// applied; the worker resends only the others. A reply may be lost.
    fn poll_heads(&mut self, w: usize) {
        let id = self.workers[w].id;
        let mut heads: Vec<NodeId> = (0..self.p.rcfg.ranges)
            .map(RangeId)
            .filter(|r| self.workers[w].in_flight(*r) > 0)
            .filter_map(|r| self.workers[w].view.chain(r).and_then(|c| c.head()))
            .collect();
        heads.sort_unstable();
        heads.dedup();
        for head in heads {
            let Some(replica) = self.nodes[head.0 as usize].replica.as_ref() else { continue };
            let answers: Vec<_> = (0..self.p.rcfg.ranges).map(RangeId).map(|r| (r, replica.worker_committed(r, id), replica.worker_seq(r, id))).collect();
            if self.faults && self.rng.gen_bool(self.p.drop_p) {
                continue;
            }
            for (range, committed, applied) in answers {
                if committed.is_none() && applied.is_none() {
                    continue;
                }
                self.trace(|| format!("poll: head {head} committed {committed:?} and applied {applied:?} of {id:?}'s pushes to {range:?}"));
                if let Some(seq) = committed.filter(|s| *s > 0) {
                    self.checker.acked(id, range, seq);
                    self.timed_ack(id, range, seq);
                    self.workers[w].on_msg(self.now, head, Msg::PushAck { range, seq });
                }
                if let Some(seq) = applied {
                    self.workers[w].on_msg(self.now, head, Msg::SeqCount { range, seq });
                }
            }
        }
    }

    /// Crashes, restarts and partitions, joins and drains, at random.
    fn inject(&mut self) {
        let now = self.now;
        for n in 0..self.nodes.len() {
            if self.nodes[n].replica.is_none() && now >= self.nodes[n].restart_ms {
                self.restart(n);
            }
        }
        if let Some(churn) = self.p.churn {
            if self.rng.gen_range(0..churn.join_every_ms) == 0 {
                if let Some(n) = self.nodes.iter().position(|n| n.joining) {
                    self.join(n);
                }
            }
            if self.rng.gen_range(0..churn.drain_every_ms) == 0 {
                self.drain_one();
            }
        }
        let detection_ms = self.p.rcfg.failure_timeout_ms + self.p.rcfg.heartbeat_interval_ms;
        self.failed_ms.retain(|at| now < at + detection_ms);
        if let Some(disks) = self.p.disks {
            // Once every server took up its first configuration: a range is born when its first
            // chain's members hear of it, and a power loss before that loses a cluster that
            // never started (its ranges are on no disk yet).
            let started = self.nodes.iter().all(|n| n.replica.as_ref().is_some_and(|r| r.config().is_some()));
            if self.rng.gen_range(0..disks.power_loss_every_ms) == 0 && self.coordinator_down.is_none() && started {
                self.power_loss();
                return;
            }
        }
        // A chain of one with no disk survives no crash or cut of its member: it has no copy to
        // fail over to. The check below (`survives`) sees only the chains of the moment, and a
        // chain of one that a join or drain grew to two for a while is shrunk back (to the
        // member that may have just failed) before its failure is noticed: none at all then.
        let fragile = self.p.rcfg.replicas == 1 && self.p.disks.is_none();
        let may_fail = self.failed_ms.len() < (self.p.rcfg.replicas as usize).saturating_sub(1).max(1) && !fragile;
        if self.rng.gen_range(0..self.p.crash_every_ms) == 0 && may_fail {
            let n = self.rng.gen_range(0..self.nodes.len());
            let mut out = self.cut().to_vec();
            out.push(NodeId(n as u32));
            if self.nodes[n].replica.is_some() && self.checker.survives(&out, &self.nodes_view(), &self.coordinator) {
                self.crash(n);
                self.report.crashes += 1;
                self.report.overlapping += u64::from(!self.failed_ms.is_empty());
                self.failed_ms.push(now);
            }
        }
        match &self.partition {
            Some((_, until)) if now >= *until => {
                self.partition = None;
                self.trace(|| "partition healed".into());
            }
            None if self.rng.gen_range(0..self.p.partition_every_ms) == 0 && may_fail => {
                let k = self.rng.gen_range(1..=(self.nodes.len() / 2).max(1));
                let mut cut: Vec<NodeId> = Vec::new();
                while cut.len() < k {
                    let n = NodeId(self.rng.gen_range(0..self.nodes.len() as u32));
                    if !cut.contains(&n) {
                        cut.push(n);
                    }
                }
                let until = now + self.rng.gen_range(100..=800);
                // The coordinator takes cut-off servers for failed; the same bound as crashes.
                if self.checker.survives(&cut, &self.nodes_view(), &self.coordinator) {
                    self.trace(|| format!("PARTITION {cut:?} until {until} ms"));
                    self.partition = Some((cut, until));
                    self.report.partitions += 1;
                    self.report.overlapping += u64::from(!self.failed_ms.is_empty());
                    self.failed_ms.push(now);
                }
            }
            _ => {}
        }
    }

    fn cut(&self) -> &[NodeId] {
        self.partition.as_ref().map_or(&[], |(cut, _)| cut.as_slice())
    }

    /// Node `n` stops; what it restarts from is its disk, with some writes that were never
    /// synced on it, the next torn.
    fn crash(&mut self, n: usize) {
        let replica = self.nodes[n].replica.take().expect("crashing a running node");
        self.report.count(&replica);
        let pending = replica.store().disk.as_ref().map_or(0, |d| d.pending());
        let landed = self.rng.gen_range(0..=pending);
        self.nodes[n].store = replica.store().crashed(landed);
        self.nodes[n].restart_ms = self.now + self.rng.gen_range(50..=600);
        self.trace(|| format!("CRASH node {n} ({landed} of {pending} unsynced writes landed)"));
    }

    /// Every server and the coordinator stop at once; each server restarts from its disk, and
    /// the coordinator from its stored configuration.
    fn power_loss(&mut self) {
        self.trace(|| "POWER LOSS: every server and the coordinator".into());
        for n in 0..self.nodes.len() {
            if self.nodes[n].replica.is_some() {
                self.crash(n);
            }
        }
        self.coordinator_down = Some(self.now + self.rng.gen_range(0..=400));
        self.partition = None;
        self.failed_ms.push(self.now);
        self.report.power_losses += 1;
    }

    fn restart(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.incarnation += 1;
        let store = std::mem::take(&mut node.store);
        node.replica = Some(new_replica(&self.p, &self.opts, n as u32, node.incarnation, store));
        self.checker.restarted(NodeId(n as u32));
        self.trace(|| format!("RESTART node {n} (incarnation {})", self.nodes[n].incarnation));
    }

    /// Node `n`, not a member, starts: its heartbeats make it one, and the ring gives it ranges.
    fn join(&mut self, n: usize) {
        self.nodes[n].joining = false;
        self.restart(n);
        self.report.joins += 1;
        self.trace(|| format!("JOIN node {n}"));
    }

    /// Drains a running member, if the members not draining would still be more than enough
    /// for every chain: its ranges move to the others, and it stops once it is done.
    fn drain_one(&mut self) {
        let config = self.coordinator.config().clone();
        let staying: Vec<NodeId> = config.members.iter().filter(|m| !m.draining).map(|m| m.node).collect();
        let running = |n: &NodeId| self.nodes[n.0 as usize].replica.is_some();
        let candidates: Vec<NodeId> = staying.iter().copied().filter(running).collect();
        if staying.len() <= (self.p.rcfg.replicas as usize).max(2) || candidates.is_empty() {
            return;
        }
        let node = candidates[self.rng.gen_range(0..candidates.len())];
        self.coordinator.drain(node);
        self.trace(|| format!("DRAIN node {node}"));
    }

    /// Servers whose configuration says they were drained stop, for good (as `tessera server`
    /// does).
    fn stop_drained(&mut self) {
        for n in 0..self.nodes.len() {
            let incarnation = self.nodes[n].incarnation;
            let Some(replica) = self.nodes[n].replica.as_ref() else { continue };
            if !replica.config().is_some_and(|c| c.left(NodeId(n as u32), incarnation)) {
                continue;
            }
            let replica = self.nodes[n].replica.take().expect("checked above");
            self.report.count(&replica);
            self.nodes[n].left = true;
            self.nodes[n].restart_ms = u64::MAX;
            self.report.drains += 1;
            self.trace(|| format!("LEFT node {n}: drained, it stops"));
        }
    }

    /// The faults stop: partitions heal and crashed servers come back.
    fn heal(&mut self) {
        self.faults = false;
        self.partition = None;
        if self.coordinator_down.is_some() {
            self.coordinator_down = Some(self.now);
        }
        for n in 0..self.nodes.len() {
            if self.nodes[n].joining {
                self.join(n);
            } else if self.nodes[n].replica.is_none() && !self.nodes[n].left {
                self.restart(n);
            }
        }
        self.trace(|| "faults off".into());
    }

    /// Every push acknowledged, every chain whole and in step, everyone on the latest config.
    fn settled(&self) -> bool {
        self.workers.iter().all(SimWorker::done) && self.chains_whole(true)
    }

    /// Every live server has the newest configuration, and every chain has its full length, no
    /// learner, each member holding the range; and, if `same_versions`, the same version at each
    /// member (not while pushes go on).
    fn chains_whole(&self, same_versions: bool) -> bool {
        let config = self.coordinator.config();
        let live = self.nodes.iter().filter(|n| n.replica.is_some()).count();
        let want = (self.p.rcfg.replicas as usize).min(live);
        let on_latest = self.nodes.iter().filter_map(|n| n.replica.as_ref()).all(|r| r.config().is_some_and(|c| c.id == config.id));
        on_latest
            && config.chains.iter().enumerate().all(|(r, chain)| {
                let states: Vec<_> =
                    chain.nodes.iter().map(|n| self.nodes[n.0 as usize].replica.as_ref().and_then(|rep| rep.range_state(RangeId(r as u32)))).collect();
                chain.learner.is_none()
                    && chain.nodes.len() == want
                    && states.iter().all(|s| s.is_some_and(|s| s.installed))
                    && (!same_versions || states.windows(2).all(|w| w[0].map(|s| s.version) == w[1].map(|s| s.version)))
            })
    }

    fn stuck(&self) -> String {
        let unacked: usize = self.workers.iter().map(|w| w.unacked()).sum();
        let to_push: u32 = self.workers.iter().map(|w| w.to_push).sum();
        let config = self.coordinator.config();
        let chains: Vec<String> = config
            .chains
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let versions: Vec<String> = c
                    .nodes
                    .iter()
                    .map(|n| match self.nodes[n.0 as usize].replica.as_ref().and_then(|rep| rep.range_state(RangeId(r as u32))) {
                        Some(v) => format!("{n}:{}{}", v.version, if v.installed { "" } else { "(empty)" }),
                        None => format!("{n}:-"),
                    })
                    .collect();
                format!("r{r} e{} [{}] learner {:?}", c.epoch, versions.join(" "), c.learner)
            })
            .collect();
        format!("{unacked} pushes unacknowledged, {to_push} not started; config {}: {}", config.id, chains.join("; "))
    }
}
