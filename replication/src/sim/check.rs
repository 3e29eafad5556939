//! The simulator's checkers. Each returns the first violation it finds as a sentence.

use std::collections::BTreeMap;

use crate::coordinator::Coordinator;
use crate::protocol::{Epoch, NodeId, RangeId, WorkerId};
use crate::replica::Replica;

use super::store::{SimStore, VALUES};
use super::worker::SimWorker;
use super::Params;

type Nodes<'a> = [Option<&'a Replica<SimStore>>];

/// What the checkers remember between steps.
#[derive(Debug)]
pub struct Checker {
    ranges: u32,
    /// Who acted as head of each range in each epoch.
    heads: BTreeMap<(RangeId, Epoch), NodeId>,
    /// Each replica's last clock of each range it holds, and which holding of the range it was.
    clocks: BTreeMap<(NodeId, RangeId), (u64, Vec<u32>)>,
    /// The clock and data every replica at (range, version) must hold: the first one seen.
    history: BTreeMap<(RangeId, u64), (Vec<u32>, [i64; VALUES])>,
    /// Every push started: (range, worker, seq) to its values.
    ledger: BTreeMap<(RangeId, WorkerId, u32), [i64; VALUES]>,
    /// The highest seq acknowledged to each worker, per range.
    acked: BTreeMap<(WorkerId, RangeId), u32>,
}

impl Checker {
    pub fn new(p: &Params) -> Self {
        Self {
            ranges: p.rcfg.ranges,
            heads: BTreeMap::new(),
            clocks: BTreeMap::new(),
            history: BTreeMap::new(),
            ledger: BTreeMap::new(),
            acked: BTreeMap::new(),
        }
    }

    pub fn pushed(&mut self, worker: WorkerId, range: RangeId, seq: u32, values: [i64; VALUES]) {
        self.ledger.insert((range, worker, seq), values);
    }

    pub fn acked(&mut self, worker: WorkerId, range: RangeId, seq: u32) {
        let a = self.acked.entry((worker, range)).or_default();
        *a = (*a).max(seq);
    }

    pub fn restarted(&mut self, node: NodeId) {
        self.clocks.retain(|(n, _), _| *n != node);
    }

    /// After every step: one head per (range, epoch); clocks monotonic; histories agree.
    pub fn step(&mut self, now: u64, nodes: &Nodes) -> Result<(), String> {
        for replica in nodes.iter().flatten() {
            let node = replica.id();
            if replica.stats().refused > 0 {
                // Nothing in the simulation is hostile: a refused message is one the protocol
                // sent wrong (a clock that went backwards, an ack of a version never sent...).
                return Err(format!("node {node} refused {} peer messages", replica.stats().refused));
            }
            for (range, epoch) in replica.heads() {
                let head = *self.heads.entry((range, epoch)).or_insert(node);
                if head != node {
                    return Err(format!("two heads of range {range} in epoch {epoch}: {head} and {node}"));
                }
            }
            for r in 0..self.ranges {
                let range = RangeId(r);
                let Some(view) = replica.range_state(range).filter(|s| s.installed) else {
                    self.clocks.remove(&(node, range));
                    continue;
                };
                let (version, clock) = (view.version, view.clock);
                if let Some((generation, old)) = self.clocks.get(&(node, range)) {
                    if *generation == view.generation && old.iter().zip(clock).any(|(o, c)| c < o) {
                        return Err(format!("node {node}: range {range}'s clock went backwards at {now} ms: {old:?} -> {clock:?}"));
                    }
                }
                self.clocks.insert((node, range), (view.generation, clock.to_vec()));
                if version > view.committed {
                    // Past what the tail holds, a deposed head may have gone its own way; that
                    // branch is never committed (its successors are in another epoch) and is
                    // dropped with the range.
                    continue;
                }
                let data = replica.store().ranges.get(&range).copied().unwrap_or_default();
                let first = self.history.entry((range, version)).or_insert_with(|| (clock.to_vec(), data));
                if first.0 != clock || first.1 != data {
                    return Err(format!(
                        "node {node}: range {range} at version {version} holds clock {clock:?} data {data:?}, another replica held {:?} {:?}",
                        first.0, first.1
                    ));
                }
            }
        }
        Ok(())
    }

    /// No acknowledged push is missing from its range's tail.
    pub fn lost(&self, nodes: &Nodes, coordinator: &Coordinator, workers: &[SimWorker]) -> Result<(), String> {
        let config = coordinator.config();
        for w in workers {
            for r in 0..self.ranges {
                let range = RangeId(r);
                let acked = self.acked.get(&(w.id, range)).copied().unwrap_or(0);
                let tail = config.chain(range).and_then(|c| c.tail());
                let held =
                    tail.and_then(|t| nodes[t.0 as usize]).and_then(|rep| rep.range_state(range)).filter(|s| s.installed).map(|s| s.clock[w.id.0 as usize]);
                if held.is_some_and(|h| h < acked) {
                    return Err(format!(
                        "acknowledged push lost: worker {} had pushes to range {range} up to {acked} acknowledged, the tail ({}) holds {}",
                        w.id,
                        tail.expect("held implies a tail"),
                        held.expect("checked")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Once settled: nothing acknowledged lost, replicas identical, and each range holds exactly
    /// the sum of the pushes its clock counts, which are all the pushes there were.
    pub fn finish(&self, nodes: &Nodes, coordinator: &Coordinator, workers: &[SimWorker]) -> Result<(), String> {
        self.lost(nodes, coordinator, workers)?;
        // No range loses what it acknowledged here, so no worker may have taken pushes for lost
        // and numbered the rest anew.
        if let Some(w) = workers.iter().find(|w| w.lost > 0) {
            return Err(format!("worker {} took {} acknowledged pushes for lost by their ranges, and numbered the rest anew", w.id, w.lost));
        }
        let config = coordinator.config();
        for (r, chain) in config.chains.iter().enumerate() {
            let range = RangeId(r as u32);
            let state = |n: NodeId| {
                let rep = nodes[n.0 as usize].ok_or_else(|| format!("range {range}: chain member {n} is down"))?;
                let v = rep.range_state(range).ok_or_else(|| format!("range {range}: {n} holds nothing"))?;
                let data = rep.store().ranges.get(&range).copied().unwrap_or_default();
                Ok::<_, String>((v.installed, v.version, v.clock.to_vec(), data))
            };
            let tail = chain.tail().ok_or_else(|| format!("range {range} has no chain"))?;
            let want = state(tail)?;
            for n in &chain.nodes {
                let got = state(*n)?;
                if got != want {
                    return Err(format!("range {range}: replicas differ once quiet: {n} holds {got:?}, the tail {tail} {want:?}"));
                }
            }
            let clock = &want.2;
            let mut sum = [0i64; VALUES];
            for ((_, worker, seq), values) in self.ledger.range((range, WorkerId(0), 0)..=(range, WorkerId(u32::MAX), u32::MAX)) {
                if *seq <= clock[worker.0 as usize] {
                    for (s, v) in sum.iter_mut().zip(values) {
                        *s = s.wrapping_add(*v);
                    }
                }
            }
            if sum != want.3 {
                return Err(format!("range {range}: holds {:?}, but the pushes its clock {clock:?} counts sum to {sum:?}", want.3));
            }
            for w in workers {
                let started = self.ledger.range((range, w.id, 0)..=(range, w.id, u32::MAX)).count() as u32;
                if clock[w.id.0 as usize] != started {
                    return Err(format!("range {range}: worker {} started {started} pushes, the clock counts {}", w.id, clock[w.id.0 as usize]));
                }
            }
        }
        Ok(())
    }

    /// Whether losing `out` (crashed or cut off) leaves, for every range, a chain member that is
    /// up, reachable and holds every committed update: the simulator injects no more failures
    /// than replication is built to survive.
    pub fn survives(&self, out: &[NodeId], nodes: &Nodes, coordinator: &Coordinator) -> bool {
        let config = coordinator.config();
        (0..self.ranges).all(|r| {
            let range = RangeId(r);
            let committed = nodes.iter().flatten().flat_map(|rep| rep.reports()).filter(|rep| rep.range == range).map(|rep| rep.committed).max().unwrap_or(0);
            config.chain(range).is_some_and(|c| {
                c.nodes
                    .iter()
                    .filter(|n| !out.contains(n))
                    .any(|n| nodes[n.0 as usize].and_then(|rep| rep.range_state(range)).is_some_and(|v| v.installed && v.version >= committed))
            })
        })
    }
}
