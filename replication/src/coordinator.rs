//! The coordinator's logic, as a state machine with no I/O: it hears heartbeats, and publishes
//! the cluster configuration (members, and each range's chain and epoch).
//!
//! The embedded coordinator runs it in the server's process; the etcd coordinator runs it in
//! whichever coordinator holds etcd's election, and writes each configuration to etcd in one
//! transaction before publishing it. The simulator runs it too.
//!
//! Each [`Coordinator::tick`] makes at most one change per range, in this order:
//! 1. A member not heard from for `failure_timeout_ms`, or heard from with a new incarnation
//!    (it restarted, and what it held in memory is gone), leaves every chain it is in. The last
//!    member of a chain never leaves it: the range waits for it rather than lose its data. When
//!    every member of a chain is down and some come back restarted, the one whose disk holds the
//!    most of the range (the highest version it reports) becomes the chain alone, and the
//!    others rejoin as learners: every member's disk holds every committed update, so any of
//!    them will do, and the best loses the least of the rest. A restarted member of such a chain
//!    is taken as restarted only once one of the chain's restarted members has reported the
//!    range, or a failure timeout after it came back: its shards report in separate heartbeats.
//! 2. A learner its tail reports synced (holding every committed update) joins the chain as
//!    the new tail.
//! 3. A server the consistent-hash ring places in a chain it is not in becomes its learner
//!    (one at a time); the tail sends it a snapshot.
//! 4. A chain with every placed server in it drops a member the ring no longer places there
//!    (a server draining, or one that moved away when another joined).
//! 5. A member in no chain that has stopped heartbeating leaves the configuration.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{ReplicationConfig, DRAINED_KEPT_MAX};
use crate::protocol::{Addr, Chain, ClusterConfig, Epoch, Member, Msg, NodeId, RangeId, RangeReport};
use crate::ring::Ring;

/// What the coordinator last heard from one server.
#[derive(Debug, Clone)]
struct Seen {
    incarnation: u64,
    /// When this incarnation was first heard from.
    since_ms: u64,
    addr: String,
    heard_ms: u64,
    config_id: u64,
    reports: BTreeMap<RangeId, RangeReport>,
}

/// A change the coordinator made, for logs and `tessera status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Failed {
        node: NodeId,
    },
    Restarted {
        node: NodeId,
    },
    Joined {
        node: NodeId,
    },
    LearnerAdded {
        range: RangeId,
        node: NodeId,
    },
    Promoted {
        range: RangeId,
        node: NodeId,
    },
    Removed {
        range: RangeId,
        node: NodeId,
    },
    Draining {
        node: NodeId,
    },
    Left {
        node: NodeId,
    },
    /// Every member of the range's chain went down, and `node` came back restarted holding the
    /// range on its disk: the chain is `node` alone, from what its disk holds.
    Recovered {
        range: RangeId,
        node: NodeId,
    },
    /// Every member of the range's chain failed, and one came back restarted, holding nothing:
    /// the range's copies are gone, acknowledged updates with them. The chain stays as it is
    /// (nothing can heal it); an operator must restore the range.
    Lost {
        range: RangeId,
    },
}

impl Change {
    /// Whether the change loses data (see [`Change::Lost`]).
    pub fn is_loss(&self) -> bool {
        matches!(self, Change::Lost { .. })
    }
}

/// The coordinator.
#[derive(Debug)]
pub struct Coordinator {
    rcfg: ReplicationConfig,
    config: Arc<ClusterConfig>,
    seen: BTreeMap<NodeId, Seen>,
    /// Servers asked to leave (`tessera drain`).
    draining: Vec<NodeId>,
    /// When [`Coordinator::tick`] last ran.
    ticked_ms: Option<u64>,
    out: Vec<(Addr, Msg)>,
    changes: Vec<Change>,
}

impl Coordinator {
    /// A new cluster named `cluster` of `members` (at least one): every range is born in epoch 1
    /// on the chain the ring gives it, its members ordered to even out heads and tails
    /// ([`balance_roles`](crate::ring::balance_roles)).
    pub fn new(rcfg: ReplicationConfig, cluster: u64, members: Vec<Member>, now_ms: u64) -> Self {
        assert!(!members.is_empty(), "a cluster starts with at least one server");
        let ring = Ring::new(members.iter().map(|m| m.node), rcfg.vnodes);
        let mut chains = ring.chains(rcfg.ranges, rcfg.replicas);
        crate::ring::balance_roles(&mut chains);
        let chains = chains.into_iter().map(|nodes| Chain { epoch: Epoch(1), nodes, learner: None }).collect();
        Self::resume(rcfg, ClusterConfig { id: 1, members, chains, drained: Vec::new(), cluster }, now_ms)
    }

    /// Takes over a cluster whose last configuration is `config` (a new coordinator elected
    /// after the last one failed). Every member counts as heard from now, so it has a failure
    /// timeout to find this coordinator; learners wait for fresh reports.
    pub fn resume(rcfg: ReplicationConfig, config: ClusterConfig, now_ms: u64) -> Self {
        let seen = config
            .members
            .iter()
            .map(|m| {
                let seen =
                    Seen { incarnation: m.incarnation, since_ms: now_ms, addr: m.addr.clone(), heard_ms: now_ms, config_id: 0, reports: BTreeMap::new() };
                (m.node, seen)
            })
            .collect();
        let draining = config.members.iter().filter(|m| m.draining).map(|m| m.node).collect();
        Self { rcfg, config: Arc::new(config), seen, draining, ticked_ms: None, out: Vec::new(), changes: Vec::new() }
    }

    pub fn config(&self) -> &Arc<ClusterConfig> {
        &self.config
    }

    /// Messages to send.
    pub fn take_ready(&mut self) -> Vec<(Addr, Msg)> {
        std::mem::take(&mut self.out)
    }

    /// Changes made since the last call.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// The latest report `node` gave of `range`.
    pub fn report(&self, node: NodeId, range: RangeId) -> Option<&RangeReport> {
        self.seen.get(&node)?.reports.get(&range)
    }

    /// Every server's latest report of each range it holds, by server.
    pub fn reports(&self) -> impl Iterator<Item = (NodeId, impl Iterator<Item = &RangeReport>)> {
        self.seen.iter().map(|(node, seen)| (*node, seen.reports.values()))
    }

    /// Asks `node` to leave: its ranges move to other servers, then it leaves the configuration.
    pub fn drain(&mut self, node: NodeId) {
        if !self.draining.contains(&node) {
            self.draining.push(node);
        }
    }

    /// Takes one message (heartbeats; anything else is ignored).
    pub fn step(&mut self, now_ms: u64, msg: Msg) {
        let Msg::Heartbeat { node, incarnation, config_id, ranges, addr, cluster } = msg else { return };
        if self.config.cluster != 0 && cluster != 0 && cluster != self.config.cluster {
            // A server on another cluster's disk: not a member of this one, whatever it holds.
            return;
        }
        let seen = self.seen.entry(node).or_insert_with(|| Seen {
            incarnation,
            since_ms: now_ms,
            addr: addr.clone(),
            heard_ms: now_ms,
            config_id,
            reports: BTreeMap::new(),
        });
        if seen.incarnation != incarnation {
            seen.reports.clear();
            seen.since_ms = now_ms;
        }
        seen.incarnation = incarnation;
        seen.addr = addr;
        seen.heard_ms = now_ms;
        seen.config_id = config_id;
        // A server's shards report their own ranges, each in its own heartbeat: merge. A report
        // left behind by a range the server dropped names an epoch the range has left, and is
        // never taken as current.
        seen.reports.extend(ranges.into_iter().map(|r| (r.range, r)));
        if config_id < self.config.id {
            self.out.push((Addr::Node(node), Msg::Config(self.config.clone())));
        }
    }

    fn alive(&self, node: NodeId, now_ms: u64) -> bool {
        self.seen.get(&node).is_some_and(|s| s.heard_ms + self.rcfg.failure_timeout_ms >= now_ms)
    }

    /// Detects failures and moves ranges; publishes the new configuration if anything changed.
    /// Call it at least once a heartbeat interval.
    pub fn tick(&mut self, now_ms: u64) {
        self.forgive_stall(now_ms);
        let mut next = (*self.config).clone();
        let before = self.changes.len();
        let awaiting = self.remove_lost(&mut next, now_ms);
        self.add_joined(&mut next, now_ms);
        let placeable = |n: &NodeId| self.alive(*n, now_ms) && !self.draining.contains(n) && !awaiting.contains(n);
        let placeable: Vec<NodeId> = next.members.iter().map(|m| m.node).filter(placeable).collect();
        let desired = Ring::new(placeable, self.rcfg.vnodes).chains(next.chains.len() as u32, self.rcfg.replicas);
        for (r, desired) in desired.iter().enumerate() {
            self.place(RangeId(r as u32), &mut next.chains[r], desired);
        }
        self.remove_departed(&mut next, now_ms);
        if self.changes.len() > before {
            next.id += 1;
            self.config = Arc::new(next);
            for m in &self.config.members {
                self.out.push((Addr::Node(m.node), Msg::Config(self.config.clone())));
            }
        }
    }

    /// Time the coordinator itself did not run (its process descheduled or stopped, its machine
    /// overloaded) is not held against the servers: it could not hear them then, and the
    /// heartbeats they sent meanwhile may still be on their way. So when ticks come more than a
    /// heartbeat interval apart, every server is credited with the excess, as if heard that much
    /// later; otherwise one stall of the coordinator takes every server for failed at once.
    fn forgive_stall(&mut self, now_ms: u64) {
        let last = self.ticked_ms.replace(now_ms).unwrap_or(now_ms);
        let stalled = now_ms.saturating_sub(last).saturating_sub(self.rcfg.heartbeat_interval_ms);
        if stalled > 0 {
            for seen in self.seen.values_mut() {
                seen.heard_ms = (seen.heard_ms + stalled).min(now_ms);
            }
        }
    }

    /// Whether `node` holds `range` in the incarnation the coordinator hears now: for a
    /// restarted server, from its disk.
    fn recovered(&self, node: NodeId, range: RangeId) -> Option<u64> {
        self.report(node, range).filter(|r| r.installed).map(|r| r.version)
    }

    /// Members heard from with a new incarnation whose restart waits (see step 1 above): each
    /// is in a chain whose members are all down, none of whose restarted members has reported
    /// the range yet, and it came back less than a failure timeout ago.
    fn awaiting_reports(&self, next: &ClusterConfig, now_ms: u64) -> Vec<NodeId> {
        let restarted = |n: &NodeId| next.member(*n).is_some_and(|m| self.seen[n].incarnation != m.incarnation);
        let down = |n: &NodeId| restarted(n) || !self.alive(*n, now_ms);
        let mut awaiting = Vec::new();
        for (r, chain) in next.chains.iter().enumerate() {
            let range = RangeId(r as u32);
            if chain.nodes.is_empty()
                || !chain.nodes.iter().all(down)
                || chain.nodes.iter().filter(|n| restarted(n)).any(|n| self.recovered(*n, range).is_some())
            {
                continue;
            }
            let fresh = chain.nodes.iter().filter(|n| restarted(n) && self.seen[*n].since_ms + self.rcfg.failure_timeout_ms > now_ms);
            awaiting.extend(fresh);
        }
        awaiting.sort();
        awaiting.dedup();
        awaiting
    }

    /// Step 1: failed and restarted members leave their chains. Returns the restarted members
    /// whose restart waits for their reports (they are placed nowhere meanwhile).
    fn remove_lost(&mut self, next: &mut ClusterConfig, now_ms: u64) -> Vec<NodeId> {
        let awaiting = self.awaiting_reports(next, now_ms);
        // Until it is taken as restarted, an awaited member counts as failed.
        let (mut lost, mut restarted) = (awaiting.clone(), Vec::new());
        for m in &mut next.members {
            let seen = &self.seen[&m.node];
            if awaiting.contains(&m.node) {
                continue;
            }
            if seen.incarnation != m.incarnation {
                lost.push(m.node);
                restarted.push(m.node);
                self.changes.push(Change::Restarted { node: m.node });
                m.incarnation = seen.incarnation;
            } else if seen.heard_ms + self.rcfg.failure_timeout_ms < now_ms {
                lost.push(m.node);
            }
        }
        let mut failed = Vec::new();
        for (r, chain) in next.chains.iter_mut().enumerate() {
            let range = RangeId(r as u32);
            let mut removed: Vec<NodeId> = chain.learner.filter(|l| lost.contains(l)).into_iter().collect();
            let keep: Vec<NodeId> = chain.nodes.iter().copied().filter(|n| !lost.contains(n)).collect();
            let best = chain.nodes.iter().filter(|n| restarted.contains(n)).filter_map(|n| Some((self.recovered(*n, range)?, *n))).max_by_key(|(v, _)| *v);
            if let (true, Some((_, node))) = (keep.is_empty(), best) {
                self.changes.push(Change::Recovered { range, node });
                removed.extend(chain.nodes.iter().filter(|n| **n != node));
                removed.extend(chain.learner);
                chain.nodes = vec![node];
                chain.learner = None;
                chain.epoch = Epoch(chain.epoch.0 + 1);
                removed.sort();
                removed.dedup();
                for node in removed {
                    self.changes.push(Change::Removed { range, node });
                    if !failed.contains(&node) {
                        failed.push(node);
                    }
                }
                continue;
            }
            if keep.is_empty() && chain.nodes.iter().any(|n| restarted.contains(n)) {
                self.changes.push(Change::Lost { range });
            }
            if keep.len() < chain.nodes.len() && !keep.is_empty() {
                removed.extend(chain.nodes.iter().filter(|n| !keep.contains(n)));
                chain.nodes = keep;
            }
            if removed.is_empty() {
                continue;
            }
            if chain.learner.is_some_and(|l| removed.contains(&l)) {
                chain.learner = None;
            }
            chain.epoch = Epoch(chain.epoch.0 + 1);
            for node in removed {
                self.changes.push(Change::Removed { range, node });
                if !failed.contains(&node) {
                    failed.push(node);
                }
            }
        }
        for node in failed {
            self.changes.push(Change::Failed { node });
        }
        awaiting
    }

    /// Servers heard from that are not members yet become members.
    fn add_joined(&mut self, next: &mut ClusterConfig, now_ms: u64) {
        for (node, seen) in &self.seen {
            if next.drained.iter().any(|m| m.node == *node && m.incarnation == seen.incarnation) {
                continue;
            }
            if next.member(*node).is_none() && seen.heard_ms + self.rcfg.failure_timeout_ms >= now_ms {
                next.drained.retain(|m| m.node != *node);
                let member = Member { node: *node, incarnation: seen.incarnation, addr: seen.addr.clone(), draining: false };
                next.members.push(member);
                self.changes.push(Change::Joined { node: *node });
            }
        }
        for m in &mut next.members {
            let draining = self.draining.contains(&m.node);
            if m.draining != draining {
                m.draining = draining;
                self.changes.push(Change::Draining { node: m.node });
            }
        }
    }

    /// Steps 2 to 4 for one range.
    fn place(&mut self, range: RangeId, chain: &mut Chain, desired: &[NodeId]) {
        let epoch = chain.epoch;
        if let Some(learner) = chain.learner {
            if self.caught_up(learner, range, chain) {
                chain.nodes.push(learner);
                chain.learner = None;
                chain.epoch = Epoch(epoch.0 + 1);
                self.changes.push(Change::Promoted { range, node: learner });
            }
            return;
        }
        if chain.nodes.is_empty() {
            return;
        }
        // A chain changes only once its members have shown, since its last change, that they are
        // alive and hold the range. A member that never heard of the range's first epoch holds
        // nothing, and only that epoch lets a member start empty: were the chain to take a
        // learner first, the member would hold nothing for ever (a server drained, or one
        // joining, moments after the cluster started). And one could have failed without being
        // noticed yet: the member removed below could then be the last copy.
        let confirmed = |n: &NodeId| self.report(*n, range).is_some_and(|r| r.epoch == epoch && r.installed);
        if let Some(node) = desired.iter().copied().find(|d| !chain.nodes.contains(d)) {
            if !chain.nodes.iter().all(confirmed) {
                return;
            }
            chain.learner = Some(node);
            chain.epoch = Epoch(epoch.0 + 1);
            self.changes.push(Change::LearnerAdded { range, node });
        } else if chain.nodes.len() > desired.len().max(1) {
            let node = *chain.nodes.iter().find(|n| !desired.contains(n)).expect("more members than desired ones");
            if !chain.nodes.iter().filter(|n| **n != node).all(confirmed) {
                return;
            }
            chain.nodes.retain(|n| *n != node);
            chain.epoch = Epoch(epoch.0 + 1);
            self.changes.push(Change::Removed { range, node });
        }
    }

    /// Whether the tail of `range`'s chain reports, in the chain's current epoch, that
    /// `learner` holds every committed update (see [`RangeReport::learner_synced`]).
    fn caught_up(&self, learner: NodeId, range: RangeId, chain: &Chain) -> bool {
        let current = |node: NodeId| self.report(node, range).filter(|r| r.epoch == chain.epoch && r.installed);
        current(learner).is_some() && chain.tail().and_then(current).is_some_and(|t| t.learner_synced)
    }

    /// Members in no chain that are gone stop being members. A drained member (draining, and in
    /// no chain) stays one until it stops heartbeating: that configuration is how it learns it
    /// has been drained, and it then stops. One that goes quiet while draining (stopped, or only
    /// late) joins the configuration's `drained` list as it leaves: should it heartbeat again, it
    /// is not taken back as a new member, and the list tells it it is done.
    fn remove_departed(&mut self, next: &mut ClusterConfig, now_ms: u64) {
        let gone: Vec<Member> = next.members.iter().filter(|m| !self.alive(m.node, now_ms) && !next.holds_any(m.node)).cloned().collect();
        for member in gone {
            next.members.retain(|m| m.node != member.node);
            if self.draining.contains(&member.node) {
                self.draining.retain(|n| *n != member.node);
                next.drained.retain(|m| m.node != member.node);
                if next.drained.len() == DRAINED_KEPT_MAX {
                    next.drained.remove(0);
                }
                next.drained.push(member.clone());
            }
            self.changes.push(Change::Left { node: member.node });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node: u32) -> Member {
        Member { node: NodeId(node), incarnation: 1, addr: format!("s{node}"), draining: false }
    }

    fn heartbeat(node: u32, config_id: u64) -> Msg {
        heartbeat_of(node, 1, config_id)
    }

    fn heartbeat_of(node: u32, incarnation: u64, config_id: u64) -> Msg {
        Msg::Heartbeat { node: NodeId(node), incarnation, addr: format!("s{node}"), cluster: 0, config_id, ranges: Vec::new() }
    }

    /// A chain takes a learner only once its members have reported the range in the chain's
    /// epoch: a member that never heard of the first epoch holds nothing, and would hold nothing
    /// for ever once the chain moved on without it.
    #[test]
    fn a_chain_takes_a_learner_only_once_its_members_reported_the_range() {
        let rcfg = ReplicationConfig { replicas: 1, ranges: 8, failure_timeout_ms: 500, ..ReplicationConfig::default() };
        let mut c = Coordinator::new(rcfg, 1, vec![member(1)], 0);
        // Node 2 joins before node 1 has reported anything (its first configuration was lost).
        c.step(10, heartbeat(1, 0));
        c.step(10, heartbeat(2, 0));
        c.tick(10);
        let changes = c.take_changes();
        assert!(changes.contains(&Change::Joined { node: NodeId(2) }), "{changes:?}");
        assert!(!changes.iter().any(|ch| matches!(ch, Change::LearnerAdded { .. })), "a learner before node 1 holds the ranges: {changes:?}");
        // Node 1 holds every range in epoch 1: the ring's share moves to node 2.
        let reports = (0..8).map(|r| report(r, 1, 0)).collect();
        let id = c.config().id;
        c.step(20, Msg::Heartbeat { node: NodeId(1), incarnation: 1, addr: "s1".into(), cluster: 0, config_id: id, ranges: reports });
        c.tick(20);
        let changes = c.take_changes();
        assert!(changes.iter().any(|ch| matches!(ch, Change::LearnerAdded { node: NodeId(2), .. })), "{changes:?}");
    }

    /// A draining server taken for failed (its heartbeats late, as on a slow machine) leaves,
    /// and when it heartbeats again it is not taken back: the configuration it is sent, without
    /// it, tells it it has left. Restarted, it may join again.
    #[test]
    fn a_draining_server_taken_for_failed_is_not_taken_back() {
        let rcfg = ReplicationConfig { replicas: 2, ranges: 4, failure_timeout_ms: 500, ..ReplicationConfig::default() };
        let mut c = Coordinator::new(rcfg, 1, (1..=3).map(member).collect(), 0);
        c.drain(NodeId(3));
        c.step(100, heartbeat(1, 1));
        c.step(100, heartbeat(2, 1));
        c.tick(100);
        let draining = c.config().clone();
        assert!(draining.member(NodeId(3)).is_some_and(|m| m.draining) && !draining.left(NodeId(3), 1));
        // Node 3 goes quiet past the failure timeout while 1 and 2 keep heartbeating.
        for t in (200..=1_000).step_by(100) {
            c.step(t, heartbeat(1, c.config().id));
            c.step(t, heartbeat(2, c.config().id));
            c.tick(t);
        }
        let without = c.config().clone();
        assert!(without.member(NodeId(3)).is_none() && !without.holds_any(NodeId(3)), "{without:?}");
        assert!(without.left(NodeId(3), 1), "a server that was draining learns it has left");
        assert!(!without.left(NodeId(3), 2) && !without.left(NodeId(1), 1));
        // Its late heartbeat brings the configuration without it, and no membership.
        c.take_ready();
        c.step(1_050, heartbeat_of(3, 1, draining.id));
        assert!(c.take_ready().iter().any(|(to, m)| *to == Addr::Node(NodeId(3)) && matches!(m, Msg::Config(k) if k.id == without.id)));
        c.tick(1_100);
        assert!(c.config().member(NodeId(3)).is_none(), "the drained server was taken back");
        // Restarted, it joins again.
        c.step(1_200, heartbeat_of(3, 2, 0));
        c.tick(1_200);
        assert!(c.config().member(NodeId(3)).is_some_and(|m| m.incarnation == 2 && !m.draining));
        assert!(!c.config().left(NodeId(3), 2) && c.config().drained.is_empty());
    }

    /// A coordinator that did not run for longer than the failure timeout takes nobody for
    /// failed on waking; a server still silent a failure timeout later is.
    #[test]
    fn a_stalled_coordinator_takes_nobody_for_failed() {
        let rcfg = ReplicationConfig { replicas: 3, ranges: 4, failure_timeout_ms: 500, ..ReplicationConfig::default() };
        let mut c = Coordinator::new(rcfg, 1, (1..=3).map(member).collect(), 0);
        for t in (0..=300).step_by(50) {
            (1..=3).for_each(|n| c.step(t, heartbeat(n, 1)));
            c.tick(t);
        }
        // Nothing runs from 300 to 2,300 ms; then two servers' queued heartbeats arrive.
        c.step(2_300, heartbeat(1, 1));
        c.step(2_300, heartbeat(2, 1));
        c.tick(2_300);
        let id = c.config().id;
        assert_eq!(id, 1, "a stall took servers for failed: {:?}", c.take_changes());
        for t in (2_350..=2_900).step_by(50) {
            c.step(t, heartbeat(1, 1));
            c.step(t, heartbeat(2, 1));
            c.tick(t);
        }
        assert!(c.config().chains.iter().all(|ch| !ch.holds(NodeId(3))), "server 3 stayed silent and must be out");
    }

    /// A chain whose only member comes back restarted holding nothing of it (no disk, or an
    /// empty one) has lost the range, and says so, once the member had a failure timeout to
    /// report what its disk holds.
    #[test]
    fn a_range_whose_last_member_restarted_is_reported_lost() {
        let rcfg = ReplicationConfig { replicas: 1, ranges: 2, failure_timeout_ms: 500, ..ReplicationConfig::default() };
        let mut c = Coordinator::new(rcfg, 1, vec![member(1)], 0);
        c.step(100, heartbeat_of(1, 2, 1));
        c.tick(100);
        assert_eq!(c.take_changes(), vec![], "it may still report what its disk holds");
        c.step(600, heartbeat_of(1, 2, 1));
        c.tick(600);
        let changes = c.take_changes();
        assert!(changes.contains(&Change::Lost { range: RangeId(0) }) && changes.contains(&Change::Lost { range: RangeId(1) }), "{changes:?}");
    }

    fn report(range: u32, epoch: u64, version: u64) -> RangeReport {
        RangeReport { range: RangeId(range), epoch: Epoch(epoch), installed: true, version, committed: 0, ticks: 0, learner_synced: false }
    }

    /// The whole cluster lost power. A resumed coordinator revives each range from the
    /// restarted member whose disk holds the most of it, once one has reported it, and the
    /// other members leave the chain (to rejoin as learners). A restarted member whose shards
    /// have not all reported yet waits rather than be taken for empty.
    #[test]
    fn after_a_whole_cluster_power_loss_each_range_is_revived_from_the_best_disk() {
        let rcfg = ReplicationConfig { replicas: 3, ranges: 2, failure_timeout_ms: 500, ..ReplicationConfig::default() };
        let stored = (**Coordinator::new(rcfg.clone(), 1, (1..=3).map(member).collect(), 0).config()).clone();
        let mut c = Coordinator::resume(rcfg, stored.clone(), 1_000);
        // Node 1's shard for range 1 reports, not yet the one for range 0; nodes 2 and 3
        // report both ranges; every one of them restarted (incarnation 2).
        let hb = |node: u32, ranges: Vec<RangeReport>| Msg::Heartbeat {
            node: NodeId(node),
            incarnation: 2,
            addr: format!("s{node}"),
            cluster: 1,
            config_id: 0,
            ranges,
        };
        c.step(1_100, hb(1, vec![report(1, 0, 9)]));
        c.tick(1_100);
        // Nodes 2 and 3 are still alive as far as it knows: node 1 leaves its chains (and
        // comes back as a learner).
        assert!(c.config().chains.iter().all(|ch| !ch.nodes.contains(&NodeId(1))), "{:?}", c.config());
        c.step(1_200, hb(2, vec![report(0, 0, 7), report(1, 0, 8)]));
        c.step(1_200, hb(3, vec![report(0, 0, 4)]));
        c.tick(1_200);
        let now = c.config().clone();
        assert_eq!(now.chains[0].nodes, vec![NodeId(2)], "range 0 revived from node 2 (version 7 against 4)");
        assert_eq!(now.chains[1].nodes, vec![NodeId(2)], "range 1 revived from node 2, the only restarted member that reported it");
        assert!(now.chains.iter().zip(&stored.chains).all(|(a, b)| a.epoch > b.epoch));
        let changes = c.take_changes();
        assert!(changes.contains(&Change::Recovered { range: RangeId(0), node: NodeId(2) }), "{changes:?}");
        assert!(!changes.iter().any(Change::is_loss), "{changes:?}");
    }

    /// The drain asked for while the server is already late: it is taken out of its chains and
    /// leaves in the same configuration, never seeing itself draining, and still learns it is done.
    #[test]
    fn a_server_late_when_its_drain_begins_learns_it_left() {
        let rcfg = ReplicationConfig { replicas: 2, ranges: 4, failure_timeout_ms: 500, ..ReplicationConfig::default() };
        let mut c = Coordinator::new(rcfg, 1, (1..=3).map(member).collect(), 0);
        c.step(600, heartbeat(1, 1));
        c.step(600, heartbeat(2, 1));
        c.drain(NodeId(3));
        c.tick(600);
        let now = c.config().clone();
        assert!(now.member(NodeId(3)).is_none() && now.left(NodeId(3), 1), "{now:?}");
        c.step(650, heartbeat(3, 1));
        c.tick(650);
        assert!(c.config().member(NodeId(3)).is_none() && c.config().left(NodeId(3), 1));
    }

    /// A coordinator elected after another died continues its configuration: the same ids and
    /// epochs, and a member that never reaches the new coordinator fails as it would have.
    #[test]
    fn a_resumed_coordinator_continues_the_stored_configuration() {
        let rcfg = ReplicationConfig { replicas: 3, ranges: 4, ..ReplicationConfig::default() };
        let mut first = Coordinator::new(rcfg.clone(), 1, (1..=3).map(member).collect(), 0);
        first.drain(NodeId(3));
        first.tick(10);
        let stored = (**first.config()).clone();
        assert!(stored.id > 1 && stored.member(NodeId(3)).is_some_and(|m| m.draining));

        let mut next = Coordinator::resume(rcfg, stored.clone(), 1_000);
        for t in (1_000..=1_500).step_by(100) {
            next.tick(t);
        }
        assert_eq!(**next.config(), stored, "nothing changes while every member has a failure timeout left");
        next.step(1_500, heartbeat(1, stored.id));
        next.step(1_500, heartbeat(3, stored.id));
        next.tick(1_600);
        let now = next.config();
        assert_eq!(now.id, stored.id + 1);
        for (before, after) in stored.chains.iter().zip(&now.chains) {
            assert!(!after.nodes.contains(&NodeId(2)), "member 2 never heartbeated to the new coordinator");
            assert_eq!(after.epoch.0, before.epoch.0 + 1);
        }
        assert!(now.member(NodeId(3)).is_some_and(|m| m.draining), "a drain in progress survives the change of coordinator");
    }

    /// A server whose disk belongs to another cluster is never admitted, nor its reports taken
    /// (a whole-cluster restart would otherwise revive ranges from its disk); one with no
    /// cluster yet, or this one, is.
    #[test]
    fn a_server_of_another_cluster_is_not_admitted() {
        let rcfg = ReplicationConfig { replicas: 2, ranges: 4, failure_timeout_ms: 500, ..ReplicationConfig::default() };
        let mut c = Coordinator::new(rcfg, 7, (1..=2).map(member).collect(), 0);
        let claiming = |node: u32, cluster: u64| Msg::Heartbeat {
            node: NodeId(node),
            incarnation: 1,
            addr: format!("s{node}"),
            cluster,
            config_id: 1,
            ranges: vec![RangeReport {
                range: RangeId(0),
                epoch: Epoch(9),
                installed: true,
                version: 1_000,
                committed: 1_000,
                ticks: 1_000,
                learner_synced: false,
            }],
        };
        c.step(100, claiming(3, 8));
        assert!(c.report(NodeId(3), RangeId(0)).is_none(), "a foreign server's reports are not taken");
        for t in (100..=400).step_by(100) {
            c.step(t, heartbeat(1, c.config().id));
            c.step(t, heartbeat(2, c.config().id));
            c.step(t, claiming(3, 8));
            c.tick(t);
        }
        assert!(c.config().member(NodeId(3)).is_none(), "{:?}", c.config());
        assert_eq!(c.config().cluster, 7);
        c.step(500, claiming(4, 7));
        c.step(500, heartbeat(5, 1));
        c.tick(500);
        assert!(c.config().member(NodeId(4)).is_some() && c.config().member(NodeId(5)).is_some(), "{:?}", c.config());
    }
}
