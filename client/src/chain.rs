//! The client of a replicated cluster: pushes go to each range's head and are acknowledged
//! once the range's tail holds them; pulls read each range's tail. When a server fails, the
//! client learns the new configuration from any server and resends what was not acknowledged
//! to the new heads; the ranges' vector clocks make a resent push an acknowledgement, never a
//! second apply.
//!
//! Calls are synchronous: [`ChainClient::push_range`] (dense tables) and [`ChainClient::push`]
//! (sparse tables) return once every range they touched has acknowledged. The retry logic is the replication crate's [`Pusher`], the same code the
//! deterministic simulator runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_replication::catalog::{Catalog, ServerInfo, TableEntry, TableKind};
use tessera_replication::codec::{self, PushHeader};
use tessera_replication::placement::{range_keys, range_of, shard_of_range};
use tessera_replication::protocol::{Addr, ClusterConfig, ClusterView, Msg, RangeId, WorkerId};
use tessera_replication::worker::Pusher;
use tessera_transport::tcp::TcpLink;
use tessera_transport::wire::HEADER_BYTES;
use tessera_transport::{ask, Caller, Dialer, Header, Op, TransportConfig};

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
    links: HashMap<(String, u16), Caller>,
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
        let entry = self.tables.get(name).ok_or_else(|| ClientError::Placement(tessera_replication::PlacementError::UnknownTable { name: name.into() }))?;
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

    fn link(&mut self, addr: &str, shard: u16) -> Result<&mut Caller> {
        let key = (addr.to_string(), shard);
        if !self.links.contains_key(&key) {
            let link = self.dialer.caller(addr, shard as u64, self.worker, ServerInfo::serves_rdma)?;
            self.links.insert(key.clone(), link);
        }
        Ok(self.links.get_mut(&key).expect("inserted above"))
    }

    /// One request to `addr`'s `shard` and its reply's body, counted in [`ChainStats`]. A link
    /// that fails is dropped (the next call makes a new one).
    fn call_on(&mut self, addr: &str, shard: u16, header: &mut Header, body: &[u8]) -> Result<Vec<u8>> {
        let link = self.link(addr, shard)?;
        let before = link.calls();
        let replied = link.call(header, body, None);
        let after = link.calls();
        self.stats.rdma_calls += after.rdma - before.rdma;
        self.stats.tcp_calls += after.tcp - before.tcp;
        self.count(body.len(), replied.as_ref().map_or(0, |r| r.1.len()));
        if replied.is_err() {
            self.links.remove(&(addr.to_string(), shard));
        }
        Ok(replied?.1)
    }

    /// One `WorkerPush` (a push, or a poll when `msg` is `None`) to `addr`'s `shard`; takes the
    /// acknowledgements in the reply. A failed link is dropped: what it carried is resent later.
    fn exchange(&mut self, addr: &str, shard: u16, msg: Option<&Msg>) {
        let mut body = Vec::new();
        if let Some(m) = msg {
            codec::encode(m, &mut body);
        }
        let mut header = Header::request(Op::WorkerPush, 0);
        header.worker = self.worker;
        let replied = self.call_on(addr, shard, &mut header, &body);
        let news = match replied.map(|b| codec::decode_batch(&b)) {
            Ok(Ok(news)) => news,
            Ok(Err(e)) => {
                tracing::warn!(addr, error = %e, "a malformed acknowledgement");
                return;
            }
            Err(e) => {
                tracing::debug!(addr, error = %e, "push link failed");
                self.unreachable_at = Some(Instant::now());
                return;
            }
        };
        let now = self.now_ms();
        let mut stale = false;
        for n in news {
            stale |= self.pusher.on_msg(now, n);
        }
        if stale {
            self.refresh();
        }
    }

    /// Sends what the pusher has queued, each push to its range's head.
    fn deliver(&mut self) {
        for (to, msg) in std::mem::take(&mut self.pusher.out) {
            let (Addr::Node(node), Msg::Push { range, .. }) = (to, &msg) else { continue };
            let Some(addr) = self.pusher.view.member(node).map(|m| m.addr.clone()) else { continue };
            let shard = shard_of_range(range.0, self.ranges, self.shards);
            self.exchange(&addr, shard, Some(&msg));
        }
    }

    /// Pushes `grads` for the dense keys from `start`, and returns once every range they fall in
    /// has acknowledged (the tail holds the push).
    pub fn push_range(&mut self, table: &ChainTable, start: u64, grads: &[f32]) -> Result<()> {
        let dim = table.entry.spec.dim as usize;
        if grads.is_empty() || !grads.len().is_multiple_of(dim) {
            let (keys, want) = (grads.len() / dim, grads.len() / dim * dim);
            let name = table.entry.spec.name.clone();
            return Err(ClientError::Length { what: "the gradient", table: name, keys, dim, got: grads.len(), want });
        }
        self.refresh_if_old();
        let now = self.now_ms();
        for (range, lo, hi) in self.pieces(table, start, (grads.len() / dim) as u64)? {
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
        self.deliver();
        self.wait_acked()
    }

    /// Pushes `grads` (`dim` per key) for the keys `keys` of a sparse table, and returns once
    /// every range they fall in has acknowledged (the tail holds the push).
    pub fn push(&mut self, table: &ChainTable, keys: &[u64], grads: &[f32]) -> Result<()> {
        let spec = &table.entry.spec;
        if spec.kind != TableKind::Sparse {
            return Err(ClientError::Protocol { server: String::new(), reason: format!("table {:?} is dense: push_range pushes it", spec.name) });
        }
        let dim = spec.dim as usize;
        check_length("the gradient", table, keys.len(), grads.len())?;
        self.refresh_if_old();
        let now = self.now_ms();
        for (range, at) in self.by_range(table, keys)? {
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
        self.deliver();
        self.wait_acked()
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
            for (addr, shard) in heads {
                self.exchange(&addr, shard, None);
            }
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

    /// Pulls the dense keys from `start` into `out`, each range from its chain's tail.
    pub fn pull_range(&mut self, table: &ChainTable, start: u64, out: &mut [f32]) -> Result<()> {
        let dim = table.entry.spec.dim as usize;
        let deadline = Instant::now() + CALL_TIMEOUT;
        self.refresh_if_old();
        for (range, lo, hi) in self.pieces(table, start, (out.len() / dim) as u64)? {
            let values = &mut out[(lo - start) as usize * dim..(hi - start) as usize * dim];
            self.pull_retrying(table, range, Keys::Range(lo, hi), values, deadline)?;
        }
        Ok(())
    }

    /// Pulls the values of `keys` into `out` (`dim` per key), each range from its chain's tail.
    pub fn pull(&mut self, table: &ChainTable, keys: &[u64], out: &mut [f32]) -> Result<()> {
        let dim = table.entry.spec.dim as usize;
        check_length("the output", table, keys.len(), out.len())?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        self.refresh_if_old();
        for (range, at) in self.by_range(table, keys)? {
            let listed: Vec<u64> = at.iter().map(|i| keys[*i]).collect();
            let mut values = vec![0f32; listed.len() * dim];
            self.pull_retrying(table, range, Keys::Listed(&listed), &mut values, deadline)?;
            for (i, v) in at.iter().zip(values.chunks_exact(dim)) {
                out[i * dim..(i + 1) * dim].copy_from_slice(v);
            }
        }
        Ok(())
    }

    /// Pulls one range's piece, asking again (after fetching the configuration) until `deadline`.
    fn pull_retrying(&mut self, table: &ChainTable, range: u32, keys: Keys<'_>, out: &mut [f32], deadline: Instant) -> Result<()> {
        while let Err(e) = self.pull_piece(table, range, keys, out) {
            if Instant::now() > deadline {
                return Err(e);
            }
            self.stats.pull_retries += 1;
            std::thread::sleep(Duration::from_millis(20));
            self.refresh();
        }
        Ok(())
    }

    fn pull_piece(&mut self, table: &ChainTable, range: u32, keys: Keys<'_>, out: &mut [f32]) -> Result<()> {
        let unavailable = || ClientError::Unavailable { reason: format!("range {range} has no tail") };
        let tail = self.pusher.view.chain(RangeId(range)).and_then(|c| c.tail()).ok_or_else(unavailable)?;
        let addr = self.pusher.view.member(tail).map(|m| m.addr.clone()).ok_or_else(unavailable)?;
        let shard = shard_of_range(range, self.ranges, self.shards);
        let (op, start, count, body): (Op, u64, usize, &[u8]) = match keys {
            Keys::Range(lo, hi) => (Op::PullRange, lo, (hi - lo) as usize, &[]),
            Keys::Listed(keys) => (Op::Pull, 0, keys.len(), bytemuck::cast_slice(keys)),
        };
        let mut header = Header::request(op, 0);
        header.table = table.entry.id;
        header.start = start;
        header.count = count as u32;
        header.dim = table.entry.spec.dim;
        header.worker = self.worker;
        let body = self.call_on(&addr, shard, &mut header, body)?;
        let values = out.len() * 4;
        if body.len() < values {
            return Err(ClientError::Protocol { server: addr, reason: format!("a pull reply of {} bytes for {values} bytes of values", body.len()) });
        }
        for (o, b) in out.iter_mut().zip(body[body.len() - values..].chunks_exact(4)) {
            *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
        Ok(())
    }
}

/// The keys of one pull piece: a dense range, or listed keys.
#[derive(Debug, Clone, Copy)]
enum Keys<'a> {
    Range(u64, u64),
    Listed(&'a [u64]),
}

/// Refuses values that are not `dim` per key for `keys` keys (and a call of no keys).
fn check_length(what: &'static str, table: &ChainTable, keys: usize, got: usize) -> Result<()> {
    let dim = table.entry.spec.dim as usize;
    if keys == 0 || got != keys * dim {
        return Err(ClientError::Length { what, table: table.entry.spec.name.clone(), keys, dim, got, want: keys * dim });
    }
    Ok(())
}
