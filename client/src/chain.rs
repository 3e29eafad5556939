//! The client of a replicated cluster: pushes go to each range's head and are acknowledged
//! once the range's tail holds them; pulls read each range's tail. When a server fails, the
//! client learns the new configuration from any server and resends what was not acknowledged
//! to the new heads; the ranges' vector clocks make a resent push an acknowledgement, never a
//! second apply.
//!
//! [`ChainClient::push_range`] (dense tables) and [`ChainClient::push`] (sparse tables) return
//! once every range they touched has acknowledged; their `_pipelined` forms return once the push
//! is sent, and the next push (or [`ChainClient::flush`]) waits for it. A push is one
//! `WorkerPush` frame per server shard that heads any of its ranges, all in flight at once; a
//! head holds its reply until the tail holds the pushes in it, and the reply carries their
//! acknowledgements. The retry logic is the replication crate's [`Pusher`], the same code the
//! deterministic simulator runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_layout::catalog::{Catalog, ServerInfo, TableEntry, TableKind};
use tessera_layout::placement::{range_keys, range_of, shard_of_range};
use tessera_replication::codec::{self, PushHeader};
use tessera_replication::protocol::{Addr, ClusterConfig, ClusterView, Msg, RangeId, WorkerId};
use tessera_replication::worker::Pusher;
use tessera_transport::tcp::TcpLink;
use tessera_transport::wire::HEADER_BYTES;
use tessera_transport::{ask, Caller, Dialer, Header, Op, TransportConfig, TransportError};

use crate::error::{ClientError, Result};
use crate::ClientConfig;

/// How long a push waits for its acknowledgement before it is resent to whoever is head then.
/// It is fixed. A timer that doubled after each resend, as TCP's does, left the emulated guest's
/// spurious resends as many as before. On the host it raised the longest pause after a kill from
/// 0.79 s to 2.13 s in one run: some kills are recovered by this timer's resend.
pub const RETRY_MS: u64 = 300;
/// How long a call keeps trying before it gives up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// While a head is unreachable, or pushes wait longer than [`SLOW_ACK`], how often the
/// configuration is fetched again.
const REFRESH_GAP: Duration = Duration::from_millis(50);
/// Oldest configuration a call starts with: a call with nothing in flight fetches it again
/// first. Failures show up by themselves (a call fails or is slow), but a server that rejoins
/// does not, and a client that never looked again would leave it without worker traffic.
const CONFIG_AGE_MAX: Duration = Duration::from_secs(1);
/// Pushes unacknowledged this long suggest a failed member behind their head: the client then
/// watches for a new configuration as it does when a head is unreachable, and resends at once
/// when one comes, instead of waiting out [`RETRY_MS`]. (A healthy chain acknowledges within
/// milliseconds.)
const SLOW_ACK: Duration = Duration::from_millis(100);
/// Longest pause between two polls for acknowledgements.
const POLL_PAUSE_MAX: Duration = Duration::from_millis(2);

/// A table as a replicated client routes it.
#[derive(Debug, Clone)]
pub struct ChainTable {
    pub entry: TableEntry,
}

/// Counters of what failures cost this client.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChainStats {
    /// Times the configuration was fetched again (a server refused, failed or timed out).
    pub refreshes: u64,
    /// Rounds of resends after the retry timer ran out.
    pub resends: u64,
    /// Rounds of resends at once on a new configuration, fetched because a head could not be
    /// reached or pushes waited longer than [`SLOW_ACK`].
    pub rerouted: u64,
    /// Pull pieces retried.
    pub pull_retries: u64,
    /// Bytes of frames (headers and bodies) sent and received, replies included.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Requests that went over RDMA slots, and over TCP (a TCP link's, or an RDMA link's frames
    /// too large for a slot).
    pub rdma_calls: u64,
    pub tcp_calls: u64,
}

/// A worker's connection to a replicated cluster.
#[derive(Debug)]
pub struct ChainClient {
    worker: u32,
    /// Opens the links pushes and pulls go on: RDMA where both ends have it (`cfg.kind`).
    dialer: Dialer,
    seeds: Vec<String>,
    shards: u16,
    ranges: u32,
    tables: HashMap<String, TableEntry>,
    pusher: Pusher,
    links: HashMap<LinkKey, Caller>,
    /// Push frames sent by the pipelined pushes and not yet answered: (server address, request).
    in_flight: Vec<(String, Started)>,
    started: Instant,
    clock: u64,
    pub stats: ChainStats,
    /// When a push's head last could not be reached (the configuration is then fetched again
    /// every [`REFRESH_GAP`], not only after the retry timer).
    unreachable_at: Option<Instant>,
    refreshed_at: Instant,
}

impl ChainClient {
    /// Connects as worker `cfg.worker` to the cluster any of `servers` belongs to, waiting (up
    /// to [`CALL_TIMEOUT`]) for the cluster to have a configuration. Pushes and pulls go over
    /// `cfg.kind`'s transport: with RDMA, each frame that fits a slot goes through the queue
    /// pair, and a larger one over the link's TCP connection. (`cfg.compress` is not used.)
    pub fn connect(servers: &[&str], cfg: ClientConfig) -> Result<Self> {
        let ClientConfig { worker, transport, kind, rdma, .. } = cfg;
        let dialer = Dialer::new(kind, transport, rdma)?;
        let seeds: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
        let deadline = Instant::now() + CALL_TIMEOUT;
        let (view, info, catalog) = loop {
            match Self::fetch(&seeds, &dialer.cfg) {
                Ok((view, Some(info), Some(catalog))) if view.config.is_some() => break (view, info, catalog),
                Ok(_) | Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                Ok(_) => return Err(ClientError::Unavailable { reason: "the cluster has no configuration yet".into() }),
                Err(e) => return Err(e),
            }
        };
        let config = Arc::new(view.config.expect("checked above"));
        let ranges = view.replication.ranges;
        Ok(Self {
            worker,
            dialer,
            seeds,
            shards: info.shards,
            ranges,
            tables: catalog.tables.into_iter().map(|t| (t.spec.name.clone(), t)).collect(),
            pusher: Pusher::new(WorkerId(worker), ranges, config),
            links: HashMap::new(),
            in_flight: Vec::new(),
            started: Instant::now(),
            clock: 0,
            stats: ChainStats::default(),
            unreachable_at: None,
            refreshed_at: Instant::now(),
        })
    }

    /// The cluster view, a server's self-description and its catalog, from the first of `seeds`
    /// that answers.
    fn fetch(seeds: &[String], transport: &TransportConfig) -> Result<(ClusterView, Option<ServerInfo>, Option<Catalog>)> {
        let mut last = None;
        for addr in seeds {
            let asked = ask(addr, Op::ClusterConfig, &[], transport).and_then(|view| {
                let (_, info) = TcpLink::connect(addr, tessera_transport::CONTROL_SHARD, u32::MAX, transport)?;
                let catalog = ask(addr, Op::Catalog, &[], transport)?;
                Ok((view, info, catalog))
            });
            match asked {
                Ok((view, info, catalog)) => {
                    let bad = |e: serde_json::Error| ClientError::Protocol { server: addr.clone(), reason: e.to_string() };
                    let view: ClusterView = serde_json::from_slice(&view).map_err(bad)?;
                    return Ok((view, serde_json::from_slice(&info).ok(), serde_json::from_slice(&catalog).ok()));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| ClientError::Unavailable { reason: "no servers given".into() }, ClientError::Transport))
    }

    /// Fetches the configuration again from any member (or the servers first given), keeping
    /// the newer one.
    fn refresh(&mut self) {
        self.stats.refreshes += 1;
        self.refreshed_at = Instant::now();
        let mut addrs: Vec<String> = self.pusher.view.members.iter().map(|m| m.addr.clone()).collect();
        addrs.extend(self.seeds.iter().cloned());
        for addr in addrs {
            let Ok(body) = ask(&addr, Op::ClusterConfig, &[], &self.dialer.cfg) else { continue };
            let Ok(ClusterView { config: Some(config), .. }) = serde_json::from_slice::<ClusterView>(&body) else { continue };
            if config.id > self.pusher.view.id {
                self.pusher.view = Arc::new(config);
            }
            return;
        }
    }

    /// Fetches the configuration again if it is older than [`CONFIG_AGE_MAX`] and nothing is in
    /// flight (so nothing needs rerouting).
    fn refresh_if_old(&mut self) {
        if self.refreshed_at.elapsed() >= CONFIG_AGE_MAX && self.pusher.unacked() == 0 {
            self.refresh();
        }
    }

    /// The configuration this client routes by.
    pub fn view(&self) -> &Arc<ClusterConfig> {
        &self.pusher.view
    }

    /// The table called `name`.
    pub fn table(&self, name: &str) -> Result<ChainTable> {
        let entry = self.tables.get(name).ok_or_else(|| ClientError::Placement(tessera_layout::LayoutError::UnknownTable { name: name.into() }))?;
        Ok(ChainTable { entry: entry.clone() })
    }

    /// Sets the clock sent with pushes (the worker's iteration).
    pub fn set_clock(&mut self, clock: u64) {
        self.clock = clock;
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The pieces of `[start, start + count)` that fall in each replication range.
    fn pieces(&self, table: &ChainTable, start: u64, count: u64) -> Result<Vec<(u32, u64, u64)>> {
        let spec = &table.entry.spec;
        let end = start.checked_add(count).filter(|e| start >= spec.start && *e <= spec.end && count > 0);
        let Some(end) = end else {
            return Err(ClientError::KeyOutOfRange { table: spec.name.clone(), key: start, start: spec.start, end: spec.end });
        };
        if spec.kind != TableKind::Dense {
            return Err(ClientError::Protocol { server: String::new(), reason: format!("table {:?} is sparse: push and pull take its keys", spec.name) });
        }
        let mut out = Vec::new();
        let mut key = start;
        while key < end {
            let r = range_of(spec, self.ranges, key);
            let stop = range_keys(spec, self.ranges, r).end.min(end);
            out.push((r, key, stop));
            key = stop;
        }
        Ok(out)
    }

    /// Counts one request of `sent` body bytes and its reply of `received`.
    fn count(&mut self, sent: usize, received: usize) {
        self.stats.bytes_sent += (HEADER_BYTES + sent) as u64;
        self.stats.bytes_received += (HEADER_BYTES + received) as u64;
    }

    fn link(&mut self, key: &LinkKey) -> Result<&mut Caller> {
        if !self.links.contains_key(key) {
            let link = self.dialer.caller(&key.addr, key.shard as u64, self.worker, ServerInfo::serves_rdma)?;
            self.links.insert(key.clone(), link);
        }
        Ok(self.links.get_mut(key).expect("inserted above"))
    }

    /// Sends `call` on its link without waiting for the reply. A link that fails is dropped
    /// (the next call makes a new one).
    fn start(&mut self, mut call: Outgoing) -> Result<Started> {
        let sent = call.body.len();
        let started = self.link(&call.to).and_then(|link| {
            let before = link.calls();
            link.start(&mut call.header, &call.body)?;
            Ok((before, link.calls()))
        });
        match started {
            Ok((before, after)) => {
                self.stats.rdma_calls += after.rdma - before.rdma;
                self.stats.tcp_calls += after.tcp - before.tcp;
                Ok(Started { to: call.to, sent })
            }
            Err(e) => {
                self.links.remove(&call.to);
                Err(e)
            }
        }
    }

    /// Waits for the reply to a started request; returns its body.
    fn finish(&mut self, started: Started) -> Result<Vec<u8>> {
        let link = self.links.get_mut(&started.to).expect("a started request's link is kept until its reply");
        let replied = link.finish(None);
        self.count(started.sent, replied.as_ref().map_or(0, |r| r.1.len()));
        // A refusal is the server's answer; the link is fine.
        if replied.as_ref().is_err_and(|e| !matches!(e, TransportError::Refused { .. })) {
            self.links.remove(&started.to);
        }
        Ok(replied?.1)
    }

    /// Sends every request of `calls` and returns their replies' bodies, in order, counted in
    /// [`ChainStats`]. Requests to different server shards are in flight together (one per
    /// link at a time), so the servers serve them at once.
    fn call_all(&mut self, calls: Vec<Outgoing>) -> Vec<Result<Vec<u8>>> {
        let mut replies: Vec<Option<Result<Vec<u8>>>> = (0..calls.len()).map(|_| None).collect();
        let mut calls: Vec<(usize, Outgoing)> = calls.into_iter().enumerate().collect();
        while !calls.is_empty() {
            // A round: the first request left for each link.
            let mut busy = BTreeSet::new();
            let (round, later): (Vec<_>, Vec<_>) = calls.into_iter().partition(|(_, c)| busy.insert(c.to.clone()));
            calls = later;
            let mut started = Vec::with_capacity(round.len());
            for (i, c) in round {
                match self.start(c) {
                    Ok(s) => started.push((i, s)),
                    Err(e) => replies[i] = Some(Err(e)),
                }
            }
            for (i, s) in started {
                replies[i] = Some(self.finish(s));
            }
        }
        replies.into_iter().map(|r| r.expect("every call was answered")).collect()
    }

    /// A `WorkerPush` request to `at` (a batch of pushes, or a poll when `body` is empty).
    fn worker_push(&self, at: (String, u16), body: Vec<u8>) -> Outgoing {
        let mut header = Header::request(Op::WorkerPush, 0);
        header.worker = self.worker;
        Outgoing { to: LinkKey { addr: at.0, shard: at.1, lane: Lane::Push }, header, body }
    }

    /// `WorkerPush` requests (batches of pushes, or polls with an empty body), each to its
    /// server shard and all in flight together; takes the acknowledgements in their replies.
    fn exchange(&mut self, frames: Vec<((String, u16), Vec<u8>)>) {
        let calls: Vec<Outgoing> = frames.into_iter().map(|(at, body)| self.worker_push(at, body)).collect();
        let addrs: Vec<String> = calls.iter().map(|c| c.to.addr.clone()).collect();
        let replies = self.call_all(calls);
        for (addr, replied) in addrs.iter().zip(replies) {
            self.take_acks(addr, replied);
        }
    }

    /// Takes the acknowledgements in a `WorkerPush` reply. A failed link is noted: what it
    /// carried is resent later.
    fn take_acks(&mut self, addr: &str, replied: Result<Vec<u8>>) {
        let now = self.now_ms();
        let mut stale = false;
        match replied.map(|b| codec::decode_batch(&b)) {
            Ok(Ok(news)) => news.into_iter().for_each(|n| stale |= self.pusher.on_msg(now, n)),
            Ok(Err(e)) => tracing::warn!(addr, error = %e, "a malformed acknowledgement"),
            Err(ClientError::Transport(TransportError::Refused { reason })) => {
                // Not acknowledged in time: the wait asks again, and resends if need be.
                tracing::debug!(addr, reason, "pushes not acknowledged");
            }
            Err(e) => {
                tracing::debug!(addr, error = %e, "push link failed");
                self.unreachable_at = Some(Instant::now());
            }
        }
        if stale {
            self.refresh();
        }
    }

    /// Waits for the replies to the pushes [`push_pipelined`](Self::push_pipelined) left in
    /// flight.
    fn collect_in_flight(&mut self) {
        for (addr, started) in std::mem::take(&mut self.in_flight) {
            let replied = self.finish(started);
            self.take_acks(&addr, replied);
        }
    }

    /// Sends what the pusher has queued and waits for the replies: the pushes to the ranges one
    /// server shard heads go in one frame (more when they exceed the frame limit), and every
    /// server shard's at once.
    fn deliver(&mut self) {
        let frames = self.queued_frames();
        self.exchange(frames);
    }

    /// What the pusher has queued, as `WorkerPush` bodies per server shard.
    fn queued_frames(&mut self) -> Vec<((String, u16), Vec<u8>)> {
        let body_max = self.dialer.cfg.frame_bytes_max.saturating_sub(HEADER_BYTES).max(1);
        let mut frames: BTreeMap<(String, u16), Vec<Vec<u8>>> = BTreeMap::new();
        for (to, msg) in std::mem::take(&mut self.pusher.out) {
            let (Addr::Node(node), Msg::Push { range, .. }) = (to, &msg) else { continue };
            let Some(addr) = self.pusher.view.member(node).map(|m| m.addr.clone()) else { continue };
            let shard = shard_of_range(range.0, self.ranges, self.shards);
            let bodies = frames.entry((addr, shard)).or_default();
            let mut one = Vec::new();
            codec::encode_batch([&msg], &mut one);
            match bodies.last_mut() {
                Some(body) if body.len() + one.len() <= body_max => body.extend_from_slice(&one),
                _ => bodies.push(one),
            }
        }
        frames.into_iter().flat_map(|(at, bodies)| bodies.into_iter().map(move |b| (at.clone(), b))).collect()
    }

    /// Sends what the pusher has queued and returns without waiting for the replies (one
    /// frame per server shard; larger pushes wait, as [`deliver`](Self::deliver) does).
    fn deliver_in_flight(&mut self) {
        let frames = self.queued_frames();
        let mut seen = BTreeSet::new();
        if !frames.iter().all(|(at, _)| seen.insert(at.clone())) {
            return self.exchange(frames);
        }
        for (at, body) in frames {
            let addr = at.0.clone();
            let call = self.worker_push(at, body);
            match self.start(call) {
                Ok(started) => self.in_flight.push((addr, started)),
                Err(e) => self.take_acks(&addr, Err(e)),
            }
        }
    }

    /// Pushes `grads` for the dense keys from `start`, and returns once every range they fall in
    /// has acknowledged (the tail holds the push).
    pub fn push_range(&mut self, table: &ChainTable, start: u64, grads: &[f32]) -> Result<()> {
        self.queue_range(table, start, grads)?;
        self.deliver();
        self.wait_acked()
    }

    /// Pushes `grads` (`dim` per key) for the keys `keys` of a sparse table, and returns once
    /// every range they fall in has acknowledged (the tail holds the push).
    pub fn push(&mut self, table: &ChainTable, keys: &[u64], grads: &[f32]) -> Result<()> {
        self.queue_keys(table, keys, grads)?;
        self.deliver();
        self.wait_acked()
    }

    /// As [`push_range`](Self::push_range), but returns once the push is sent: it is in flight
    /// while the worker goes on (pulls, computes), and the next push, or
    /// [`flush`](Self::flush), waits for its acknowledgement first. One push in flight at a
    /// time, as a bounded-staleness worker of the paper's would run.
    pub fn push_range_pipelined(&mut self, table: &ChainTable, start: u64, grads: &[f32]) -> Result<()> {
        self.queue_range(table, start, grads)?;
        self.deliver_in_flight();
        Ok(())
    }

    /// As [`push`](Self::push), but returns once the push is sent; see
    /// [`push_range_pipelined`](Self::push_range_pipelined).
    pub fn push_pipelined(&mut self, table: &ChainTable, keys: &[u64], grads: &[f32]) -> Result<()> {
        self.queue_keys(table, keys, grads)?;
        self.deliver_in_flight();
        Ok(())
    }

    /// Returns once every push sent is acknowledged.
    pub fn flush(&mut self) -> Result<()> {
        self.wait_acked()
    }

    /// Hands the pusher a dense push, one piece per range; pushes before it are acknowledged
    /// first.
    fn queue_range(&mut self, table: &ChainTable, start: u64, grads: &[f32]) -> Result<()> {
        let dim = table.entry.spec.dim as usize;
        if grads.is_empty() || !grads.len().is_multiple_of(dim) {
            let (keys, want) = (grads.len() / dim, grads.len() / dim * dim);
            let name = table.entry.spec.name.clone();
            return Err(ClientError::Length { what: "the gradient", table: name, keys, dim, got: grads.len(), want });
        }
        let pieces = self.pieces(table, start, (grads.len() / dim) as u64)?;
        self.wait_acked()?;
        self.refresh_if_old();
        let now = self.now_ms();
        for (range, lo, hi) in pieces {
            let h = PushHeader {
                table: table.entry.id,
                dim: dim as u32,
                start: lo,
                count: (hi - lo) as u32,
                worker: self.worker,
                clock: self.clock,
                listed: false,
            };
            let values = &grads[(lo - start) as usize * dim..(hi - start) as usize * dim];
            self.pusher.push(now, RangeId(range), h.payload(values).into());
        }
        Ok(())
    }

    /// Hands the pusher a sparse push, one piece per range; pushes before it are acknowledged
    /// first.
    fn queue_keys(&mut self, table: &ChainTable, keys: &[u64], grads: &[f32]) -> Result<()> {
        let spec = &table.entry.spec;
        if spec.kind != TableKind::Sparse {
            return Err(ClientError::Protocol { server: String::new(), reason: format!("table {:?} is dense: push_range pushes it", spec.name) });
        }
        let dim = spec.dim as usize;
        check_length("the gradient", table, keys.len(), grads.len())?;
        let by_range = self.by_range(table, keys)?;
        self.wait_acked()?;
        self.refresh_if_old();
        let now = self.now_ms();
        for (range, at) in by_range {
            let listed: Vec<u64> = at.iter().map(|i| keys[*i]).collect();
            let values: Vec<f32> = at.iter().flat_map(|i| &grads[i * dim..(i + 1) * dim]).copied().collect();
            let h = PushHeader {
                table: table.entry.id,
                dim: dim as u32,
                start: 0,
                count: listed.len() as u32,
                worker: self.worker,
                clock: self.clock,
                listed: true,
            };
            self.pusher.push(now, RangeId(range), h.keyed_payload(&listed, &values).into());
        }
        Ok(())
    }

    /// For each replication range `keys` fall in, the positions of its keys in `keys`.
    fn by_range(&self, table: &ChainTable, keys: &[u64]) -> Result<BTreeMap<u32, Vec<usize>>> {
        let spec = &table.entry.spec;
        let mut out: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, &key) in keys.iter().enumerate() {
            if key < spec.start || key >= spec.end {
                return Err(ClientError::KeyOutOfRange { table: spec.name.clone(), key, start: spec.start, end: spec.end });
            }
            out.entry(range_of(spec, self.ranges, key)).or_default().push(i);
        }
        Ok(out)
    }

    /// Polls the heads of ranges with pushes in flight until all are acknowledged; resends to
    /// the current heads what waited too long.
    fn wait_acked(&mut self) -> Result<()> {
        self.collect_in_flight();
        let began = Instant::now();
        let deadline = began + CALL_TIMEOUT;
        let mut pause = Duration::from_micros(50);
        while !self.pusher.idle() {
            if Instant::now() > deadline {
                return Err(ClientError::Unavailable { reason: format!("{} pushes unacknowledged after {CALL_TIMEOUT:?}", self.pusher.unacked()) });
            }
            let before = self.pusher.unacked();
            let heads: BTreeSet<(String, u16)> = (0..self.ranges)
                .filter(|r| self.pusher.in_flight(RangeId(*r)) > 0)
                .filter_map(|r| {
                    let head = self.pusher.view.chain(RangeId(r))?.head()?;
                    Some((self.pusher.view.member(head)?.addr.clone(), shard_of_range(r, self.ranges, self.shards)))
                })
                .collect();
            self.exchange(heads.into_iter().map(|at| (at, Vec::new())).collect());
            let now = self.now_ms();
            let unreachable = self.unreachable_at.take().is_some();
            if (unreachable || began.elapsed() >= SLOW_ACK) && self.refreshed_at.elapsed() >= REFRESH_GAP {
                // A head is down, or a member behind it: the coordinator names new chains within
                // the failure timeout, and resending at once on them saves up to a retry timer.
                let known = self.pusher.view.id;
                self.refresh();
                if self.pusher.view.id != known {
                    self.stats.rerouted += 1;
                    self.pusher.resend(now, 0);
                    self.deliver();
                }
            }
            if self.pusher.timed_out(now, RETRY_MS) {
                self.refresh();
                self.stats.resends += 1;
                self.pusher.resend(now, RETRY_MS);
                self.deliver();
            }
            if self.pusher.unacked() < before {
                pause = Duration::from_micros(50);
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(POLL_PAUSE_MAX);
            }
        }
        Ok(())
    }

    /// Pulls the dense keys from `start` into `out`, each range from its chain's tail, every
    /// tail at once.
    pub fn pull_range(&mut self, table: &ChainTable, start: u64, out: &mut [f32]) -> Result<()> {
        let dim = table.entry.spec.dim as usize;
        let pieces = self.pieces(table, start, (out.len() / dim) as u64)?;
        let left: BTreeMap<u32, Keys> = pieces.into_iter().map(|(range, lo, hi)| (range, Keys::Range(lo, hi))).collect();
        self.pull_ranges(table, left, |k| (k - start) as usize, out)
    }

    /// Pulls the values of `keys` into `out` (`dim` per key), each range from its chain's tail:
    /// one request for the keys of all the ranges a server's shard is tail of, every tail at
    /// once.
    pub fn pull(&mut self, table: &ChainTable, keys: &[u64], out: &mut [f32]) -> Result<()> {
        check_length("the output", table, keys.len(), out.len())?;
        let by_range = self.by_range(table, keys)?;
        let left = by_range.into_iter().map(|(range, at)| (range, Keys::Listed(at.into_iter().map(|i| (keys[i], i)).collect()))).collect();
        self.pull_ranges(table, left, |_| 0, out)
    }

    /// Pulls the keys of each range in `left` from its tail into `out`, asking again (after
    /// fetching the configuration) for the ranges whose tail failed, until [`CALL_TIMEOUT`].
    /// `row_of` places a dense key's values in `out`; listed keys carry their rows.
    fn pull_ranges(&mut self, table: &ChainTable, mut left: BTreeMap<u32, Keys>, row_of: impl Fn(u64) -> usize, out: &mut [f32]) -> Result<()> {
        let dim = table.entry.spec.dim as usize;
        let deadline = Instant::now() + CALL_TIMEOUT;
        self.refresh_if_old();
        loop {
            // One request per dense range piece; one per tail shard for listed keys.
            let mut parts: BTreeMap<(String, u16, u32), PullPart> = BTreeMap::new();
            let mut unplaced = None;
            for (&range, keys) in &left {
                let Some(at) = self.tail_of(range) else {
                    unplaced = Some(range);
                    continue;
                };
                let piece = match keys {
                    Keys::Range(..) => range,
                    Keys::Listed(_) => u32::MAX,
                };
                let part = parts.entry((at.0, at.1, piece)).or_default();
                part.ranges.push(range);
                match keys {
                    Keys::Range(lo, hi) => {
                        part.range = Some((*lo, *hi));
                        part.rows.extend((*lo..*hi).map(&row_of));
                    }
                    Keys::Listed(at) => {
                        part.keys.extend(at.iter().map(|(k, _)| *k));
                        part.rows.extend(at.iter().map(|(_, row)| *row));
                    }
                }
            }
            let mut calls = Vec::with_capacity(parts.len());
            let mut placed = Vec::with_capacity(parts.len());
            for ((addr, shard, _), part) in parts {
                let mut header = Header::request(if part.range.is_some() { Op::PullRange } else { Op::Pull }, 0);
                header.table = table.entry.id;
                header.dim = table.entry.spec.dim;
                header.worker = self.worker;
                let body = match part.range {
                    Some((lo, hi)) => {
                        header.start = lo;
                        header.count = (hi - lo) as u32;
                        Vec::new()
                    }
                    None => {
                        header.count = part.keys.len() as u32;
                        bytemuck::cast_slice(&part.keys).to_vec()
                    }
                };
                calls.push(Outgoing { to: LinkKey { addr: addr.clone(), shard, lane: Lane::Pull }, header, body });
                placed.push((addr, part));
            }
            let mut failure = unplaced.map(|r| ClientError::Unavailable { reason: format!("range {r} has no tail") });
            for ((addr, part), replied) in placed.into_iter().zip(self.call_all(calls)) {
                let values = part.rows.len() * dim * 4;
                match replied {
                    Ok(body) if body.len() >= values => {
                        for (row, v) in part.rows.iter().zip(body[body.len() - values..].chunks_exact(dim * 4)) {
                            for (o, b) in out[row * dim..(row + 1) * dim].iter_mut().zip(v.chunks_exact(4)) {
                                *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                            }
                        }
                        part.ranges.iter().for_each(|r| {
                            left.remove(r);
                        });
                    }
                    Ok(body) => {
                        let reason = format!("a pull reply of {} bytes for {values} bytes of values", body.len());
                        failure = Some(ClientError::Protocol { server: addr, reason });
                    }
                    Err(e) => failure = Some(e),
                }
            }
            let Some(e) = failure else { return Ok(()) };
            if Instant::now() > deadline {
                return Err(e);
            }
            self.stats.pull_retries += 1;
            std::thread::sleep(Duration::from_millis(20));
            self.refresh();
        }
    }

    /// The server shard that is `range`'s tail, where its pulls go.
    fn tail_of(&self, range: u32) -> Option<(String, u16)> {
        let tail = self.pusher.view.chain(RangeId(range))?.tail()?;
        let addr = self.pusher.view.member(tail)?.addr.clone();
        Some((addr, shard_of_range(range, self.ranges, self.shards)))
    }
}

/// One request of a pull: a dense range piece, or the listed keys of the ranges one server
/// shard is tail of; and the rows of the output its values go to, in order.
#[derive(Debug, Default)]
struct PullPart {
    ranges: Vec<u32>,
    range: Option<(u64, u64)>,
    keys: Vec<u64>,
    rows: Vec<usize>,
}

/// A request [`ChainClient::call_all`] sends.
#[derive(Debug)]
struct Outgoing {
    to: LinkKey,
    header: Header,
    body: Vec<u8>,
}

/// A request sent whose reply is still to come.
#[derive(Debug)]
struct Started {
    to: LinkKey,
    sent: usize,
}

/// A link: to a server's shard, for pushes or for pulls. Pushes and pulls go on links of their
/// own, so a pull is never queued behind a push's reply, which a head holds until the tail
/// holds the push.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct LinkKey {
    addr: String,
    shard: u16,
    lane: Lane,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Lane {
    Push,
    Pull,
}

/// The keys of one range to pull: a dense piece, or listed keys with their rows in the output.
#[derive(Debug, Clone)]
enum Keys {
    Range(u64, u64),
    Listed(Vec<(u64, usize)>),
}

/// Refuses values that are not `dim` per key for `keys` keys (and a call of no keys).
fn check_length(what: &'static str, table: &ChainTable, keys: usize, got: usize) -> Result<()> {
    let dim = table.entry.spec.dim as usize;
    if keys == 0 || got != keys * dim {
        return Err(ClientError::Length { what, table: table.entry.spec.name.clone(), keys, dim, got, want: keys * dim });
    }
    Ok(())
}
