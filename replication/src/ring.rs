//! Consistent hashing with virtual nodes and bounded loads: which servers make up each range's
//! chain.
//!
//! Every server puts `vnodes` points on a ring of u64 positions; range `r` sits at the hash of
//! `r`. Taking the ranges in order, a range's chain is the first `replicas` distinct servers met
//! walking the ring clockwise from there that hold fewer than their share of copies,
//! `ceil(ranges * replicas / servers)`. Without that bound, the servers' shares of a few ranges
//! follow the hash's luck (6 ranges on three servers fell 1, 4 and 1), so one server would
//! hold, and serve, most of a table; with it no server holds more than its share. A server that
//! joins or leaves still moves close to its own share of the copies (8 to 9 servers: 0.13 of
//! them, against the ideal 0.11), most of them to or from itself; a few others shift as the
//! share itself changes.

use std::collections::BTreeMap;

use crate::protocol::NodeId;

/// A well-mixed 64-bit hash (splitmix64's finaliser): stable across builds and machines,
/// which placement must be.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The ring of the servers eligible to hold ranges.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    points: BTreeMap<u64, NodeId>,
    nodes: usize,
}

impl Ring {
    /// A ring of `nodes`, each with `vnodes` points.
    pub fn new(nodes: impl IntoIterator<Item = NodeId>, vnodes: u32) -> Self {
        let mut ring = Self::default();
        for node in nodes {
            ring.nodes += 1;
            for v in 0..vnodes {
                let mut at = mix64(((node.0 as u64) << 32) | v as u64);
                // Two points on one position: the later node moves one step on (deterministic).
                while ring.points.contains_key(&at) {
                    at = at.wrapping_add(1);
                }
                ring.points.insert(at, node);
            }
        }
        ring
    }

    /// Every range's chain: up to `replicas` distinct servers each, head first, no server in
    /// more chains than its share.
    pub fn chains(&self, ranges: u32, replicas: u32) -> Vec<Vec<NodeId>> {
        let want = (replicas as usize).min(self.nodes);
        let share = (ranges as usize * want).div_ceil(self.nodes.max(1));
        let mut held: std::collections::HashMap<NodeId, usize> = std::collections::HashMap::new();
        let mut chains = Vec::with_capacity(ranges as usize);
        for range in 0..ranges {
            let at = mix64(0x5eed_0000_0000_0000 ^ range as u64);
            let walk = || self.points.range(at..).chain(self.points.range(..at)).map(|(_, node)| *node);
            let left = |node: &NodeId| share.saturating_sub(held.get(node).copied().unwrap_or(0));
            // A server with room left for every range still to place must take this one: were
            // it passed over, the last ranges could find too few servers with room (what is
            // left all on one server, which a chain takes once). Taking those first keeps
            // `sum over servers of min(room, ranges to place) >= ranges to place * want`, so
            // every chain finds its `want` servers within their shares.
            let to_place = (ranges - range) as usize;
            let mut chain = Vec::with_capacity(want);
            for room in [to_place, 1] {
                for node in walk() {
                    if chain.len() == want {
                        break;
                    }
                    if !chain.contains(&node) && left(&node) >= room {
                        chain.push(node);
                    }
                }
            }
            chain.iter().for_each(|node| *held.entry(*node).or_default() += 1);
            chains.push(chain);
        }
        chains
    }
}

/// Orders the members of each chain so that every server heads, and ends, about as many
/// chains as any other, over as few links (one server sending updates to another) as that
/// allows. A head applies its ranges' pushes and a tail serves their pulls, so the ring's
/// unevenness over few ranges (4, 7 and 5 heads of 16 ranges on three servers) would make one
/// server the bottleneck; and each link is a stream of `Replicate` requests, their replies and
/// acknowledgements, so three servers keeping three replicas are better served by three links
/// (one cycle) than by all six (28% fewer sends in a replicated demo).
///
/// Two greedy passes over the chains in range order, each taking for a chain one order of its
/// members (of those tried: every order of up to three, else every rotation). The first takes
/// the order adding least to the counts of the roles it gives, then fewest new links: balance.
/// The second takes the order adding fewest new links, then least to the role counts, among
/// those that keep every server's count of each role within the first pass's largest; it is
/// kept if it placed every chain so. Membership, and so what moves when servers join or leave,
/// stays the ring's. Only a new cluster's chains are ordered so: a running chain keeps its
/// order, as a reorder would move its head.
pub fn balance_roles(chains: &mut [Vec<NodeId>]) {
    let balanced = order_chains(chains, None).expect("an uncapped pass places every chain");
    let mut caps = [0usize; 3];
    for (role, count) in role_counts(&balanced) {
        caps[role.0] = caps[role.0].max(count);
    }
    let linked = order_chains(chains, Some(caps));
    let chosen = linked.unwrap_or(balanced);
    chains.iter_mut().zip(chosen).for_each(|(chain, order)| *chain = order);
}

/// A chain member's role by its place: 0 head, 1 middle, 2 tail (a chain of one is its tail).
fn role(pos: usize, len: usize) -> usize {
    if pos + 1 == len {
        2
    } else {
        pos.min(1)
    }
}

/// How many chains give each (role, server).
fn role_counts(chains: &[Vec<NodeId>]) -> std::collections::HashMap<(usize, NodeId), usize> {
    let mut counts = std::collections::HashMap::new();
    for chain in chains {
        for (p, n) in chain.iter().enumerate() {
            *counts.entry((role(p, chain.len()), *n)).or_default() += 1;
        }
    }
    counts
}

/// One greedy pass of [`balance_roles`]: balance first without `caps`; with them, fewest new
/// links first among orders that keep each role's count per server within `caps` (by role),
/// or `None` if some chain has no such order.
fn order_chains(chains: &[Vec<NodeId>], caps: Option<[usize; 3]>) -> Option<Vec<Vec<NodeId>>> {
    let mut counts: std::collections::HashMap<(usize, NodeId), usize> = std::collections::HashMap::new();
    // Links (from, to) the orders chosen so far send updates along.
    let mut links: std::collections::HashSet<(NodeId, NodeId)> = std::collections::HashSet::new();
    let mut ordered = Vec::with_capacity(chains.len());
    for chain in chains {
        let len = chain.len();
        let count = |p: usize, n: &NodeId| counts.get(&(role(p, len), *n)).copied().unwrap_or(0);
        let cost = |order: &[NodeId]| -> usize { order.iter().enumerate().map(|(p, n)| count(p, n)).sum() };
        let within = |order: &[NodeId]| caps.is_none_or(|caps| order.iter().enumerate().all(|(p, n)| count(p, n) < caps[role(p, len)]));
        let new_links = |order: &[NodeId]| order.windows(2).filter(|w| !links.contains(&(w[0], w[1]))).count();
        let mut orders: Vec<Vec<NodeId>> = (0..len).map(|k| chain.iter().cycle().skip(k).take(len).copied().collect()).collect();
        if len == 3 {
            orders.extend((0..3).map(|k| vec![chain[k], chain[(k + 2) % 3], chain[(k + 1) % 3]]));
        }
        if len == 0 {
            // A chain with no members (a ring with no servers) has one order: none.
            orders.push(Vec::new());
        }
        let candidates = orders.into_iter().enumerate().filter(|(_, o)| within(o));
        let best = match caps {
            None => candidates.min_by_key(|(i, o)| (cost(o), new_links(o), *i)),
            Some(_) => candidates.min_by_key(|(i, o)| (new_links(o), cost(o), *i)),
        };
        let (_, best) = best?;
        for (p, n) in best.iter().enumerate() {
            *counts.entry((role(p, len), *n)).or_default() += 1;
        }
        links.extend(best.windows(2).map(|w| (w[0], w[1])));
        ordered.push(best);
    }
    Some(ordered)
}

/// Of the (range, replica) places in `before`, the fraction whose server is not in the same
/// range's chain in `after`: the share of range copies that must move.
pub fn fraction_moved(before: &[Vec<NodeId>], after: &[Vec<NodeId>]) -> f64 {
    let (mut places, mut moved) = (0usize, 0usize);
    for (b, a) in before.iter().zip(after) {
        places += b.len();
        moved += b.iter().filter(|n| !a.contains(n)).count();
    }
    if places == 0 {
        0.0
    } else {
        moved as f64 / places as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: u32) -> Vec<NodeId> {
        (0..n).map(NodeId).collect()
    }

    #[test]
    fn chains_are_distinct_and_stable() {
        let chains = Ring::new(nodes(5), 64).chains(256, 3);
        for c in &chains {
            assert_eq!(c.len(), 3);
            assert!(c[0] != c[1] && c[1] != c[2] && c[0] != c[2]);
        }
        assert_eq!(chains, Ring::new(nodes(5), 64).chains(256, 3), "placement is deterministic");
        assert!(Ring::new(nodes(2), 8).chains(4, 3).iter().all(|c| c.len() == 2), "never more replicas than servers");
        assert!(Ring::new([], 8).chains(4, 2).iter().all(|c| c.is_empty()));
    }

    #[test]
    fn a_join_moves_little_and_mostly_to_the_newcomer() {
        let before = Ring::new(nodes(8), 64).chains(1024, 2);
        let after = Ring::new(nodes(9), 64).chains(1024, 2);
        let moved = fraction_moved(&before, &after);
        // The ideal is 1/9 of the copies (the new server's share); the bound on loads adds some.
        assert!(moved > 0.05 && moved < 0.2, "moved {moved}");
        // Most copies that moved went to the new server; it took its share.
        let (mut to_new, mut to_others) = (0, 0);
        for (b, a) in before.iter().zip(&after) {
            for n in a.iter().filter(|n| !b.contains(n)) {
                if *n == NodeId(8) {
                    to_new += 1;
                } else {
                    to_others += 1;
                }
            }
        }
        assert!(to_others * 4 < to_new, "{to_new} copies moved to the new server, {to_others} to others");
        assert!(after.iter().filter(|c| c.contains(&NodeId(8))).count() >= 1024 * 2 / 9);
    }

    /// Prints the share of range copies that move when a server joins, at the default settings
    /// (256 ranges, 64 virtual nodes, 2 replicas), against the ideal (the newcomer's share).
    /// `cargo test -p tessera-replication --lib fraction_moved_on_join -- --nocapture`
    #[test]
    fn fraction_moved_on_join() {
        let d = crate::config::ReplicationConfig::default();
        for n in [2u32, 4, 8, 16] {
            let before = Ring::new(nodes(n), d.vnodes).chains(d.ranges, d.replicas);
            let after = Ring::new(nodes(n + 1), d.vnodes).chains(d.ranges, d.replicas);
            let moved = fraction_moved(&before, &after);
            let ideal = 1.0 / (n + 1) as f64;
            println!("{n} -> {} servers: {:.3} of range copies moved (ideal {ideal:.3})", n + 1, moved);
            assert!(moved <= 2.0 * ideal, "a join moves more than twice the newcomer's share");
        }
    }

    /// Distinct links (from, to) `chains` send updates along.
    fn links_of(chains: &[Vec<NodeId>]) -> usize {
        let mut links: Vec<(NodeId, NodeId)> = chains.iter().flat_map(|c| c.windows(2).map(|w| (w[0], w[1]))).collect();
        links.sort();
        links.dedup();
        links.len()
    }

    #[test]
    fn chains_with_no_members_stay_empty_when_balanced() {
        let mut chains = Ring::new(nodes(0), 64).chains(4, 2);
        assert!(chains.iter().all(|c| c.is_empty()));
        balance_roles(&mut chains);
        assert!(chains.iter().all(|c| c.is_empty()));
        let mut mixed = vec![vec![NodeId(0), NodeId(1)], Vec::new(), vec![NodeId(1), NodeId(0)]];
        balance_roles(&mut mixed);
        assert_eq!(mixed[1], Vec::<NodeId>::new());
    }

    #[test]
    fn balanced_roles_keep_membership_and_even_out_heads_and_tails_over_few_links() {
        for ranges in [16, 256] {
            for (servers, replicas) in [(3, 1), (3, 2), (3, 3), (5, 2), (5, 3), (8, 4)] {
                let ring = Ring::new(nodes(servers), 64).chains(ranges, replicas);
                let mut balanced = ring.clone();
                balance_roles(&mut balanced);
                for (r, b) in ring.iter().zip(&balanced) {
                    let (mut r, mut b) = (r.clone(), b.clone());
                    r.sort();
                    b.sort();
                    assert_eq!(r, b, "the members stay the ring's");
                }
                // The most chains any server heads (`tail`: ends), and the most and fewest apart.
                let counts = |tail: bool, chains: &[Vec<NodeId>]| {
                    let mut n = vec![0usize; servers as usize];
                    chains.iter().for_each(|c| n[if tail { c[c.len() - 1] } else { c[0] }.0 as usize] += 1);
                    (*n.iter().max().unwrap(), n.iter().max().unwrap() - n.iter().min().unwrap())
                };
                let what = format!("{ranges} ranges, {servers} servers, {replicas} replicas: {balanced:?}");
                // The pass for balance alone bounds what the fewer links may cost.
                let even = order_chains(&ring, None).unwrap();
                for tail in [false, true] {
                    assert!(counts(tail, &balanced).0 <= counts(tail, &even).0, "{what}");
                }
                assert!(links_of(&balanced) <= links_of(&even), "{what}");
                assert!(counts(false, &even).1 <= counts(false, &ring).1.max(1), "{what}");
                if servers == 3 && replicas == 2 {
                    // Every pair of servers shares chains, and balance alone sends both ways
                    // between each pair: a cycle serves them in three links, and the second
                    // pass comes close (4 with 256 ranges).
                    assert!(links_of(&even) == 6 && links_of(&balanced) <= 4, "{what}");
                }
                if servers == 3 && replicas == 3 {
                    // The order alone decides the roles: evenly, over one cycle.
                    assert!(counts(false, &balanced).1 <= 1 && counts(true, &balanced).1 <= 1, "{what}");
                    assert_eq!(links_of(&balanced), 3, "{what}");
                }
            }
        }
    }

    /// Copies each of `servers` servers holds.
    fn loads(chains: &[Vec<NodeId>], servers: u32) -> Vec<usize> {
        let mut load = vec![0usize; servers as usize];
        chains.iter().flatten().for_each(|n| load[n.0 as usize] += 1);
        load
    }

    #[test]
    fn no_server_holds_more_than_its_share() {
        for (servers, ranges, replicas) in [(4, 1024, 2), (3, 6, 1), (3, 3, 1), (3, 6, 2), (3, 16, 3), (5, 7, 2), (2, 256, 2), (16, 256, 3)] {
            let chains = Ring::new(nodes(servers), 64).chains(ranges, replicas);
            let want = replicas.min(servers) as usize;
            assert!(chains.iter().all(|c| c.len() == want));
            let share = (ranges as usize * want).div_ceil(servers as usize);
            let load = loads(&chains, servers);
            assert!(load.iter().all(|l| *l <= share), "{servers} servers, {ranges} ranges, {replicas} replicas: {load:?}");
            // Every copy is placed, so no server falls far short either.
            assert_eq!(load.iter().sum::<usize>(), ranges as usize * want);
        }
        // The hash alone put 1, 4 and 1 of 6 ranges on three servers, and all 3 of 3 on one.
        assert_eq!(loads(&Ring::new(nodes(3), 64).chains(6, 1), 3), vec![2, 2, 2]);
        assert_eq!(loads(&Ring::new(nodes(3), 64).chains(3, 1), 3), vec![1, 1, 1]);
    }

    #[test]
    fn a_leave_moves_about_the_leavers_share() {
        let before = Ring::new(nodes(8), 64).chains(1024, 2);
        let after = Ring::new(nodes(7), 64).chains(1024, 2);
        let moved = fraction_moved(&before, &after);
        // Ideal: the leaver's 1/8 of the copies.
        assert!((0.125..0.2).contains(&moved), "moved {moved}");
    }
}
