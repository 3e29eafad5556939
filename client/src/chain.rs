//! A [`Client`](crate::Client)'s links to a replicated cluster: pushes go to each range's
//! head and are acknowledged once the range's tail holds them; pulls read each range's tail.
//! When a server fails, the client learns the new configuration from any server and resends
//! what was not acknowledged to the new heads; the ranges' vector clocks make a resent push an
//! acknowledgement, never a second apply.
//!
//! A push is one `WorkerPush` frame per server shard that heads any of its ranges, all in flight
//! at once; a head holds its reply until the tail holds the pushes in it, and the reply carries
//! their acknowledgements. [`Chain::push_keys`] and [`Chain::push_range`] return once the push is
//! sent, with up to [`PUSH_WINDOW`] pushes in flight: the frames to one server shard follow one
//! another on one connection, which keeps each range's pushes in the order the head must apply
//! them. [`Chain::settle`] waits for acknowledgements. The retry logic is the replication
//! crate's [`Pusher`], the same code the deterministic simulator runs.
//!
//! A pull is one request per tail server shard (per dense range piece), all in flight at once
//! beside the pushes: [`Chain::start_pull_keys`] and [`Chain::start_pull_range`] return once
//! they are sent, and [`Chain::finish_pull`] (its ticket's wait) takes their replies, oldest
//! first on each of its links, and writes the values.

use std::collections::{BTreeSet, VecDeque};

use rustc_hash::FxHashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_layout::catalog::{Catalog, ServerInfo, TableKind, TableSpec};
use tessera_layout::placement::{range_keys, range_runs, ranges_of, shard_of_range, span_runs, Route};
use tessera_replication::codec::{self, KeyList, PayloadPool, PushHeader};
use tessera_replication::protocol::{Addr, ClusterConfig, ClusterView, Member, Msg, NodeId, Payload, RangeId, WorkerId};
use tessera_replication::worker::Pusher;
use tessera_transport::keycache::{KeyLists, Remembered};
use tessera_transport::tcp::TcpLink;
use tessera_transport::wire::flags;
use tessera_transport::wire::HEADER_BYTES;
use tessera_transport::{ask, Caller, Chosen, ControlLink, Dialer, Header, Op, Status, TransportConfig, TransportError, SEND_PARTS_MAX};

use crate::error::{ClientError, Result};
use crate::ticket::{copy_le_f32, Stamp};
use crate::ClientConfig;

/// Most requests in flight over all the links at once: a pull that would send more takes the
/// oldest reply first (and keeps it for its ticket).
const IN_FLIGHT_MAX: usize = 2 * PUSH_WINDOW as usize;

/// How long a push waits for its acknowledgement before it is resent to whoever is head then.
/// It is fixed. A timer that doubled after each resend, as TCP's does, left the emulated guest's
/// spurious resends as many as before. On the host it raised the longest pause after a kill from
/// 0.79 s to 2.13 s in one run: some kills are recovered by this timer's resend.
pub const RETRY_MS: u64 = 300;
/// Pushes a client keeps in flight on a replicated cluster: a push waits for the
/// acknowledgement of the one this many before it. Each costs the heads a held reply and a
/// place in the chain's log, and the client a copy of its payload for resends. At R = 3, 32
/// moved a stream of 256 KiB pushes a third faster than 16 (`tessera bench --replicas 3 --ops
/// pipelined`: see docs/benchmarks.md).
pub const PUSH_WINDOW: u64 = 32;
/// Pushes whose stamps (from their heads' answers) a client keeps for their tickets: a ticket
/// waited on this many pushes late gets only its own worker's clock.
pub const PUSH_STAMPS_KEPT: u64 = 4 * PUSH_WINDOW;
/// Largest push payload copied into its request; a larger one is sent from where the client
/// keeps it, as a part of the request of its own ([`Uncopied`]).
const COPIED_PAYLOAD_MAX: usize = 32 << 10;
/// Most payloads one request sends from where they lie: each adds itself and the body after
/// it to the request's parts.
const UNCOPIED_PER_FRAME_MAX: usize = (SEND_PARTS_MAX - 1) / 2;
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
/// How long a reply may be silent before a cluster's client looks whether its server is still
/// in its chains ([`Chain::finish_within`]).
const SILENT_SERVER_CHECK: Duration = Duration::from_millis(250);
/// Push frame bodies kept for reuse ([`Chain::spare_bodies`]): one per head shard a push
/// reaches, on a cluster of a few dozen servers.
const SPARE_BODIES_MAX: usize = 64;
/// Most bytes of capacity the kept buffers of one [`SpareBodies`] may hold together: one very
/// large push or pull must not leave its buffers held by the client for good.
const SPARE_BODY_BYTES_MAX: usize = 16 << 20;
/// Piece lists kept for reuse ([`Chain::spare_pieces`]): one per push in the window, and one
/// per frame of each.
const SPARE_PIECE_LISTS_MAX: usize = 4 * PUSH_WINDOW as usize;
/// Longest pause between two polls for acknowledgements.
const POLL_PAUSE_MAX: Duration = Duration::from_millis(2);
/// Room a frame keeps, besides a push's keys and values or a pull reply's values and stamp,
/// for the rest: the batch's and the message's fields, the push header, and the forwarding
/// fields a head adds before it sends the push down its chain (whose clock
/// [`Chain::stamp_clocks_max`] bounds too).
const FRAME_ROOM_BYTES: usize = 256;

/// Buffers kept for reuse (sent push frames' bodies, read replies' bodies), at most
/// [`SPARE_BODIES_MAX`] of them holding at most [`SPARE_BODY_BYTES_MAX`] bytes of capacity
/// together. Freeing and allocating hundreds of KiB per push or pull made glibc's allocator
/// hand the pages back to the kernel and fault them in again.
#[derive(Debug, Default)]
struct SpareBodies {
    bodies: Vec<Vec<u8>>,
    /// The capacity of `bodies`, summed.
    bytes: usize,
}

impl SpareBodies {
    /// Keeps `body` for reuse if there is room, else frees it.
    fn keep(&mut self, body: Vec<u8>) {
        let bytes = self.bytes + body.capacity();
        if self.bodies.len() < SPARE_BODIES_MAX && bytes <= SPARE_BODY_BYTES_MAX {
            self.bytes = bytes;
            self.bodies.push(body);
        }
    }

    /// An empty body, reused if one is kept.
    fn take(&mut self) -> Vec<u8> {
        let mut body = self.bodies.pop().unwrap_or_default();
        self.bytes -= body.capacity();
        body.clear();
        body
    }
}

/// Counters of what failures cost a client of a replicated cluster
/// ([`Client::chain_stats`](crate::Client::chain_stats)).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChainStats {
    /// Times the configuration was fetched again: once a second while calls are made, and
    /// whenever a server refused, failed or timed out.
    pub refreshes: u64,
    /// Control-plane connections made for those fetches. The one that answered is kept and
    /// asked again, so this grows only when its server goes away or closes it.
    pub control_connections: u64,
    /// Rounds of resends after the retry timer ran out.
    pub resends: u64,
    /// Rounds of resends at once on a new configuration, fetched because a head could not be
    /// reached or pushes waited longer than [`SLOW_ACK`].
    pub rerouted: u64,
    /// Pull pieces retried.
    pub pull_retries: u64,
    /// Dense range pieces read one-sidedly (RDMA READs of the tail's blocks).
    pub one_sided_reads: u64,
    /// Requests sent by a key list's hash that a server shard no longer held (it keeps fewer
    /// lists than the client's `key_cache_keys` assumes), sent again with their keys.
    pub keys_unknown: u64,
    /// Key lists sent by their hash (key-list caching), pushes' and pulls'.
    pub lists_by_hash: u64,
    /// Bytes of frames (headers and bodies) sent and received, replies included.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Requests that went over RDMA slots, and over TCP (a TCP link's, or an RDMA link's frames
    /// too large for a slot).
    pub rdma_calls: u64,
    pub tcp_calls: u64,
    /// Pieces (one per range a push reaches) of acknowledged pushes that their range said it no
    /// longer holds (its only server restarted without its disk, or its chain came back from
    /// an older checkpoint): lost, and the pushes after them numbered on from what it holds.
    pub push_pieces_lost: u64,
    /// Times the pushes and pulls in flight were let go with a standalone server that stopped
    /// answering, or that came back as another cluster.
    pub given_up: u64,
}

/// A cluster view (`Op::ClusterConfig`'s reply body) and the server that gave it.
#[derive(Debug)]
pub(crate) struct ViewFrom {
    pub addr: String,
    pub view: Vec<u8>,
}

/// `config` with the members that advertise an unspecified address (a server listening on
/// `0.0.0.0` without `--advertise`) reached at the host of `from`, the server that gave it.
fn reachable(mut config: ClusterConfig, from: &str) -> ClusterConfig {
    let Some((host, _)) = from.rsplit_once(':') else { return config };
    for member in &mut config.members {
        if let Ok(at) = member.addr.parse::<std::net::SocketAddr>() {
            if at.ip().is_unspecified() {
                member.addr = format!("{host}:{}", at.port());
            }
        }
    }
    config
}

/// Runs of pushes let go ([`Chain::give_up`]) remembered, for their tickets.
const LOST_RUNS_KEPT: usize = 16;
/// Pushes refused outright remembered, for their tickets (a ticket let go never asks).
const REFUSALS_KEPT: usize = 4 * PUSH_WINDOW as usize;

/// A push a head refused outright (it can never be applied), kept for its ticket's wait.
#[derive(Debug)]
struct Refusal {
    /// The push's number ([`Chain::pushes`]).
    push: u64,
    error: ClientError,
}

/// A client's incarnation: random, never 0 (which names none).
fn new_incarnation() -> u64 {
    let nonce = tessera_transport::auth::random_nonce();
    u64::from_le_bytes(nonce[..8].try_into().expect("8 bytes")).max(1)
}

/// How long a client's reconnection attempts take in all ([`ClientConfig::reconnect_attempts`],
/// [`ClientConfig::reconnect_pause_ms`] doubling up to a second).
fn reconnect_patience(cfg: &ClientConfig) -> Duration {
    let mut pause = cfg.reconnect_pause_ms;
    let mut total = 0;
    for _ in 0..cfg.reconnect_attempts {
        total += pause;
        pause = (pause * 2).min(1_000);
    }
    Duration::from_millis(total)
}

/// A table as a push or pull names it: its id on every server, and its definition.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChainTable<'t> {
    pub id: u32,
    pub spec: &'t TableSpec,
}

impl<'t> ChainTable<'t> {
    /// The table a client's handle routes by.
    pub fn of(route: &'t Route) -> Self {
        ChainTable { id: route.id, spec: &route.spec }
    }
}

/// A worker's links to a replicated cluster.
#[derive(Debug)]
pub(crate) struct Chain {
    worker: u32,
    /// This client's incarnation, random and never 0, sent with every `WorkerPush`: a shard
    /// refuses the pushes of a client that another one with the same worker id succeeded.
    incarnation: u64,
    /// Opens the links pushes and pulls go on: RDMA where both ends have it (`cfg.kind`).
    dialer: Dialer,
    compress: bool,
    seeds: Vec<String>,
    shards: u16,
    ranges: u32,
    /// The largest frame sent or received: the smaller of this client's limit and the
    /// cluster's (its servers' hello says); a larger call is cut into several pushes or pulls.
    frame_bytes_max: usize,
    /// Most clocks a reply's stamp carries (a pull's reply has room for them beside its values).
    stamp_clocks_max: usize,
    pusher: Pusher,
    links: FxHashMap<LinkKey, Linked>,
    /// Links made so far.
    links_made: u64,
    /// Keys of remembered lists each link's server shard keeps for it (0: no key-list caching).
    key_cache_keys: usize,
    /// A head did not hold a key list a push named by its hash: what it refused is resent in
    /// full at once.
    keys_unknown: bool,
    /// Pushes to send again at once, not after the retry timer: a range lost acknowledged
    /// pushes and the ones waiting were numbered anew, a head refused a push beside them, or
    /// they were on their way to a server taken out of its chains.
    resend_at_once: bool,
    /// Requests sent and not yet answered, oldest first over every link: push frames, and the
    /// parts of pulls whose tickets have not taken their values.
    in_flight: VecDeque<InFlight>,
    /// Pulls with requests in flight or replies their tickets have not taken, by their number.
    pulls: Vec<PendingPull>,
    /// Pulls started so far (a pull's number is its place in this count, from 1).
    pulls_started: u64,
    /// Emptied pending pulls, their buffers kept for the next.
    spare_pulls: Vec<PendingPull>,
    /// Pushes sent so far (a push's number is its place in this count, from 1).
    pushes: u64,
    /// The pushes not known to be acknowledged, oldest first: each one's number and its
    /// pieces (range, seq).
    unconfirmed: VecDeque<(u64, Vec<(RangeId, u32)>)>,
    /// The stamps the heads gave the last [`PUSH_STAMPS_KEPT`] pushes, oldest first, until
    /// their tickets take them.
    stamps: VecDeque<PushStamp>,
    /// Piece lists of confirmed pushes, kept for the next pushes' (no allocation once warm).
    spare_pieces: Vec<Vec<(RangeId, u32)>>,
    /// Bodies of push frames already sent, kept for the next frames': a large push's frame is
    /// not allocated anew each time (freeing and allocating hundreds of KiB per push made the
    /// allocator hand the pages back to the kernel and fault them in again).
    spare_bodies: SpareBodies,
    /// Bodies of replies already read, kept for the next replies' ([`Chain::finish`]).
    spare_replies: SpareBodies,
    /// The last call's keys grouped by range: buffers kept.
    groups: RangeGroups,
    /// Push payloads, refilled once acknowledged.
    payloads: PayloadPool,
    /// The acknowledgements a frame set awaits from tails ([`queued_frames`](Self::queued_frames)):
    /// a buffer kept.
    awaited: Vec<(NodeId, u16, Msg)>,
    /// Buffers kept between calls, so that a warm client allocates nothing per call: the
    /// requests of an exchange, which are left and which go in this round, what each frame
    /// carried, the replies, the messages decoded from one, the frames being filled, a push's
    /// or pull's pieces and ranges, and a pull's requests.
    calls: Vec<Outgoing>,
    calls_left: Vec<usize>,
    round: Vec<(usize, Option<Started>)>,
    sent: Vec<Sent>,
    replies: Vec<Result<Reply>>,
    news: Vec<Msg>,
    frames: Vec<Frame>,
    spans: Vec<(u32, u64, u64)>,
    range_list: Vec<u32>,
    pulls_left: Vec<(u32, Keys)>,
    pull_parts: Vec<PullPart>,
    spare_parts: Vec<PullPart>,
    /// Pushes heads refused outright, oldest first, each for its own ticket.
    refusals: VecDeque<Refusal>,
    /// A head's log failed: its pushes are kept and sent again; the next settle reports why.
    not_durable: Option<ClientError>,
    /// The stamp of the last one-sided read.
    read_stamp: Vec<u64>,
    /// Per range: whether the pushes are numbered on from the head's count of this worker's
    /// pushes (see [`count_pushes`](Self::count_pushes)).
    counted: Vec<bool>,
    /// The cluster's name (0 when its servers did not say).
    cluster: u64,
    /// The cluster is one standalone server: nothing takes its ranges over while it is down.
    alone: bool,
    /// The servers serve RDMA (as the first to answer said).
    serves_rdma: bool,
    /// How long pushes wait for a standalone server that does not answer before they are let
    /// go ([`ClientConfig::reconnect_attempts`]).
    alone_patience: Duration,
    reconnect_attempts: u32,
    /// Since when a standalone server has not answered pushes (cleared by its next answer).
    down_since: Option<Instant>,
    /// Why the last link dropped for a failure was dropped.
    link_lost: String,
    /// Links with push frames deferred ([`Caller::start_deferred`]): they leave with the
    /// link's next request, or before this client waits for any reply
    /// ([`flush_deferred`](Self::flush_deferred)).
    deferred_on: Vec<LinkKey>,
    /// Pushes sent for the first time are deferred ([`ClientConfig::defer_pushes`]).
    defer_pushes: bool,
    /// What the link said when the standalone server stopped answering.
    down_because: String,
    /// Pushes let go with their cluster ([`give_up`](Self::give_up)): the first and last
    /// number of each run, newest last, and why.
    lost: VecDeque<(u64, u64)>,
    lost_reason: String,
    /// Counts the times the servers turned out to be another cluster: table handles read
    /// before are looked up again by name.
    pub generation: u64,
    started: Instant,
    pub stats: ChainStats,
    /// When a push's head last could not be reached (the configuration is then fetched again
    /// every [`REFRESH_GAP`], not only after the retry timer).
    unreachable_at: Option<Instant>,
    refreshed_at: Instant,
    /// The control-plane connection the configuration was last fetched on, kept for the next
    /// fetch (once a second at most: [`CONFIG_AGE_MAX`]).
    control: Option<ControlLink>,
}

impl Chain {
    /// Connects as worker `cfg.worker` to the cluster any of `servers` belongs to, waiting (up
    /// to [`CALL_TIMEOUT`]) for the cluster to have a configuration; returns the catalog of
    /// tables too. Pushes and pulls go over `cfg.kind`'s transport: with RDMA, each frame that
    /// fits a slot goes through the queue pair, and a larger one over the link's TCP
    /// connection. `chosen` is the transport the client chose for this process. `known` is a
    /// cluster view one of `servers` already gave (it is not asked for it again).
    pub fn connect(servers: &[&str], cfg: &ClientConfig, chosen: Chosen, mut known: Option<ViewFrom>) -> Result<(Self, Catalog)> {
        let required = cfg.kind == tessera_transport::TransportKind::Rdma;
        let dialer = Dialer { cfg: cfg.transport.clone(), chosen, rdma: cfg.rdma.clone(), required };
        let seeds: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
        // A cluster being born is waited for up to the call timeout; servers that answer but
        // refuse (at their connection limit) or do not answer in time, for the reconnection
        // attempts' patience: then the caller hears why.
        let started = Instant::now();
        let (view, info, catalog) = loop {
            match Self::fetch(&seeds, &dialer.cfg, known.take()) {
                Ok((view, Some(info), Some(catalog))) if view.config.is_some() => break (view, info, catalog),
                // Nothing listens there, or it cannot prove it holds the cluster's secret: said
                // at once, not waited out.
                Err(e @ ClientError::Transport(TransportError::Connect { .. } | TransportError::AuthFailed { .. })) => return Err(e),
                Ok(_) if started.elapsed() < CALL_TIMEOUT => std::thread::sleep(Duration::from_millis(100)),
                Err(_) if started.elapsed() < reconnect_patience(cfg) => std::thread::sleep(Duration::from_millis(100)),
                Ok(_) => return Err(ClientError::Unavailable { reason: "the cluster has no configuration yet".into() }),
                Err(e) => return Err(e),
            }
        };
        let distinct: BTreeSet<&String> = seeds.iter().collect();
        if info.alone && distinct.len() > 1 {
            let reason = format!(
                "{} are standalone servers, not a cluster: connect to one of them, or start the servers with a coordinator (`tessera coordinator --replicas 1` keeps one copy of every range) and connect to any of them",
                seeds.join(", ")
            );
            return Err(ClientError::Config { reason });
        }
        let config = Arc::new(view.config.expect("checked above"));
        let ranges = view.replication.ranges;
        let chain = Self {
            worker: cfg.worker,
            incarnation: new_incarnation(),
            dialer,
            compress: cfg.compress,
            seeds,
            shards: info.shards,
            ranges,
            frame_bytes_max: cfg.transport.frame_bytes_max.min(usize::try_from(info.frame_bytes_max).unwrap_or(usize::MAX)),
            stamp_clocks_max: (info.workers_max.max(view.replication.workers)) as usize,
            pusher: Pusher::new(WorkerId(cfg.worker), ranges, config),
            links: FxHashMap::default(),
            links_made: 0,
            key_cache_keys: cfg.key_cache_keys,
            keys_unknown: false,
            resend_at_once: false,
            in_flight: VecDeque::new(),
            pulls: Vec::new(),
            pulls_started: 0,
            spare_pulls: Vec::new(),
            pushes: 0,
            unconfirmed: VecDeque::new(),
            stamps: VecDeque::new(),
            spare_pieces: Vec::new(),
            spare_bodies: SpareBodies::default(),
            spare_replies: SpareBodies::default(),
            groups: RangeGroups::default(),
            payloads: PayloadPool::default(),
            awaited: Vec::new(),
            calls: Vec::new(),
            calls_left: Vec::new(),
            round: Vec::new(),
            sent: Vec::new(),
            replies: Vec::new(),
            news: Vec::new(),
            frames: Vec::new(),
            spans: Vec::new(),
            range_list: Vec::new(),
            pulls_left: Vec::new(),
            pull_parts: Vec::new(),
            spare_parts: Vec::new(),
            refusals: VecDeque::new(),
            not_durable: None,
            read_stamp: Vec::new(),
            counted: vec![false; ranges as usize],
            cluster: info.cluster,
            alone: info.alone,
            serves_rdma: info.rdma,
            alone_patience: reconnect_patience(cfg),
            reconnect_attempts: cfg.reconnect_attempts,
            down_since: None,
            down_because: String::new(),
            link_lost: String::new(),
            deferred_on: Vec::new(),
            defer_pushes: cfg.defer_pushes,
            lost: VecDeque::new(),
            lost_reason: String::new(),
            generation: 0,
            started: Instant::now(),
            stats: ChainStats::default(),
            unreachable_at: None,
            refreshed_at: Instant::now(),
            control: None,
        };
        Ok((chain, catalog))
    }

    /// The addresses of the configuration's members, else the servers first given.
    pub fn members(&self) -> Vec<String> {
        let members: Vec<String> = self.pusher.view.members.iter().map(|m| m.addr.clone()).collect();
        if members.is_empty() {
            self.seeds.clone()
        } else {
            members
        }
    }

    /// Sends `op` with `body` to every member's control plane; each reply's body.
    pub fn ask_members(&mut self, op: Op, body: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
        self.refresh();
        let cfg = self.asking();
        self.members().into_iter().map(|addr| ask(&addr, op, body, &cfg).map_err(|e| in_server(&addr, e)).map(|reply| (addr, reply))).collect()
    }

    /// Sends `op` with `body` to every server this client knows of: the configuration's
    /// members and the servers it was given, which include any that is out of the
    /// configuration for now (a server that missed a heartbeat and will rejoin). Table
    /// definitions go this way: every server numbers its tables in the order they are made,
    /// and one that missed a table would number the next ones differently. Fails if any of
    /// them cannot be reached (the call may be made again: a table that exists with the same
    /// definition is found, not made twice).
    pub fn ask_everyone(&mut self, op: Op, body: &[u8]) -> Result<()> {
        self.refresh();
        let mut all = self.members();
        for seed in &self.seeds {
            if !all.contains(seed) {
                all.push(seed.clone());
            }
        }
        let cfg = self.asking();
        for addr in &all {
            ask(addr, op, body, &cfg).map_err(|e| in_server(addr, e))?;
        }
        Ok(())
    }

    /// How control requests go: within the cluster's frame limit, so that one too large is
    /// refused here, before anything is sent.
    fn asking(&self) -> TransportConfig {
        TransportConfig { frame_bytes_max: self.frame_bytes_max, ..self.dialer.cfg.clone() }
    }

    /// The transport of the links made so far: `"rdma"` when every one is RDMA. Before any,
    /// the one they will take: RDMA when this client and the servers both have it.
    pub fn transport(&self) -> &'static str {
        let rdma = match self.links.is_empty() {
            true => self.dialer.chosen.name() == "rdma" && self.serves_rdma,
            false => self.links.values().all(|l| l.caller.kind() == "rdma"),
        };
        if rdma {
            "rdma"
        } else {
            "tcp"
        }
    }

    /// Pushes started whose acknowledgements have not come yet, and pull requests whose
    /// replies have not.
    pub fn unacked(&self) -> u64 {
        self.pusher.unacked() as u64 + self.pulls.iter().map(|p| p.due as u64).sum::<u64>()
    }

    /// Pings the shard of the first range's tail over a pull link.
    pub fn ping(&mut self) -> Result<()> {
        let at = self.tail_of(0).ok_or_else(|| ClientError::Unavailable { reason: "range 0 has no tail".into() })?;
        let call = Outgoing {
            to: LinkKey { node: at.0, shard: at.1, lane: Lane::Pull },
            header: Header::request(Op::Ping, 0),
            body: Vec::new(),
            uncopied: Uncopied::default(),
            defer: false,
        };
        let mut replies = Vec::with_capacity(1);
        self.call_all(&mut [call], &mut replies);
        replies.pop().expect("one call").map(|_| ())
    }

    /// The cluster view, a server's self-description and its catalog, from the first of `seeds`
    /// that answers; the view `known` names is taken as its server's answer.
    fn fetch(seeds: &[String], transport: &TransportConfig, mut known: Option<ViewFrom>) -> Result<(ClusterView, Option<ServerInfo>, Option<Catalog>)> {
        let mut last = None;
        for addr in seeds {
            let view = match known.take_if(|k| k.addr == *addr) {
                Some(k) => Ok(k.view),
                None => ask(addr, Op::ClusterConfig, &[], transport),
            };
            let asked = view.and_then(|view| {
                let (_, info) = TcpLink::connect(addr, tessera_transport::CONTROL_SHARD, u32::MAX, transport)?;
                let catalog = ask(addr, Op::Catalog, &[], transport)?;
                Ok((view, info, catalog))
            });
            match asked {
                Ok((view, info, catalog)) => {
                    let bad = |e: serde_json::Error| ClientError::Protocol { server: addr.clone(), reason: e.to_string() };
                    let mut view: ClusterView = serde_json::from_slice(&view).map_err(bad)?;
                    view.config = view.config.map(|c| reachable(c, addr));
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
        self.refresh_asking_last(None);
    }

    /// [`refresh`](Self::refresh), asking server `last` only if no other answers, and the
    /// servers in no chain after those in one: a server that has stopped answering (and was
    /// taken out of its chains for it) would hold the question up for the hello timeout.
    fn refresh_asking_last(&mut self, last: Option<NodeId>) {
        self.flush_deferred();
        self.stats.refreshes += 1;
        self.refreshed_at = Instant::now();
        let view = &self.pusher.view;
        let last = last.and_then(|node| view.member(node)).map(|m| m.addr.clone());
        let mut members: Vec<&Member> = view.members.iter().collect();
        members.sort_by_key(|m| !view.holds_any(m.node));
        let addrs = members.into_iter().map(|m| &m.addr).chain(&self.seeds);
        let mut addrs: Vec<String> = addrs.filter(|a| Some(*a) != last.as_ref()).cloned().collect();
        // The server that answered last is asked first, on the connection kept to it (unless
        // it is the one to ask last).
        if let Some(at) = self.control.as_ref().and_then(|c| addrs.iter().position(|a| a == c.addr())) {
            addrs[..=at].rotate_right(1);
        }
        addrs.extend(last);
        for addr in addrs {
            let Ok(body) = self.ask_control(&addr, Op::ClusterConfig) else { continue };
            let Ok(ClusterView { config: Some(config), .. }) = serde_json::from_slice::<ClusterView>(&body) else { continue };
            if config.id > self.pusher.view.id {
                self.pusher.view = Arc::new(reachable(config, &addr));
            }
            return;
        }
    }

    /// `op` to the control plane of `addr`, on the connection kept to it. One is made, and kept
    /// instead, when there is none, when it is to another server, or when it failed (its server
    /// restarted, or closed it for idleness); none is kept to a standalone server. A live
    /// server answers at once: the reply is waited for as long as a handshake, as it was on a
    /// new connection.
    fn ask_control(&mut self, addr: &str, op: Op) -> Result<Vec<u8>> {
        let timeout = Some(Duration::from_millis(self.dialer.cfg.hello_timeout_ms));
        if let Some(kept) = self.control.as_mut().filter(|c| c.addr() == addr) {
            match kept.ask(op, &[], timeout) {
                Ok(body) => return Ok(body),
                Err(e) => tracing::debug!(server = addr, error = %e, "the kept control connection failed: connecting again"),
            }
        }
        self.control = None;
        let mut link = ControlLink::connect(addr, &self.dialer.cfg)?;
        self.stats.control_connections += 1;
        let body = link.ask(op, &[], timeout)?;
        // (A standalone server's configuration never changes: it is seldom asked again.)
        if !self.alone {
            self.control = Some(link);
        }
        Ok(body)
    }

    /// Fetches the configuration again if it is older than [`CONFIG_AGE_MAX`]. Pushes not yet
    /// acknowledged when it changed are resent at once to the heads it names.
    fn refresh_if_old(&mut self) {
        // (A standalone server's configuration never changes.)
        if self.alone || self.refreshed_at.elapsed() < CONFIG_AGE_MAX {
            return;
        }
        let known = self.pusher.view.id;
        self.refresh();
        if self.pusher.view.id != known && !self.pusher.idle() {
            self.stats.rerouted += 1;
            self.resend_now();
        }
    }

    /// The configuration this client routes by.
    pub fn view(&self) -> &Arc<ClusterConfig> {
        &self.pusher.view
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The pieces of `[start, start + count)` that fall in each replication range, into `out`.
    fn pieces(&self, table: ChainTable<'_>, start: u64, count: u64, out: &mut Vec<(u32, u64, u64)>) -> Result<()> {
        let spec = table.spec;
        let end = start.checked_add(count).filter(|e| start >= spec.start && *e <= spec.end && count > 0);
        let Some(end) = end else {
            // (The first key outside the table.)
            let key = if start < spec.start { start } else { start.max(spec.end) };
            return Err(ClientError::KeyOutOfRange { table: spec.name.clone(), key, start: spec.start, end: spec.end });
        };
        debug_assert!(spec.kind == TableKind::Dense, "a span of a sparse table goes by its keys (`sparse_span`)");
        out.clear();
        out.extend(span_runs(spec, self.ranges, start..end).map(|(r, run)| (r, run.start, run.end)));
        Ok(())
    }

    /// Counts one request frame of `sent` bytes on the wire and its reply frame of `received`
    /// (compressed bodies count as sent).
    fn count(&mut self, sent: usize, received: usize) {
        self.stats.bytes_sent += sent as u64;
        self.stats.bytes_received += received as u64;
    }

    /// The link `key` names, made now if there is none (or its server has moved to another
    /// address since it was made).
    fn link(&mut self, key: LinkKey) -> Result<&mut Linked> {
        let Some(member) = self.pusher.view.member(key.node) else {
            return Err(ClientError::Unavailable { reason: format!("server {} is not in the cluster's configuration", key.node) });
        };
        if self.links.get(&key).is_some_and(|l| l.addr != member.addr) {
            self.links.remove(&key);
        }
        if !self.links.contains_key(&key) {
            let caller = self.dialer.caller(&member.addr, key.shard as u64, self.worker, ServerInfo::serves_rdma)?.compressing(self.compress);
            let cluster = serde_json::from_slice::<ServerInfo>(caller.hello()).map_or(0, |info| info.cluster);
            if cluster != 0 && self.cluster != 0 && cluster != self.cluster {
                let addr = member.addr.clone();
                let reason = format!("{addr} now serves cluster {cluster:016x}, not {:016x} (restarted without its data?)", self.cluster);
                tracing::warn!(server = %addr, "{reason}: the pushes and pulls in flight are let go, and tables are looked up again by name");
                self.replaced(cluster, &addr, reason.clone());
                return Err(ClientError::OutcomeUnknown { server: addr, reason });
            }
            self.links_made += 1;
            let linked = Linked { made: self.links_made, addr: member.addr.clone(), caller, lists: KeyLists::new(self.key_cache_keys) };
            self.links.insert(key, linked);
        }
        Ok(self.links.get_mut(&key).expect("inserted above"))
    }

    /// The address of the server `node`, for messages: its link's, or the configuration's.
    fn addr_of(&self, node: NodeId) -> String {
        let linked = self.links.iter().find(|(k, _)| k.node == node).map(|(_, l)| l.addr.clone());
        linked.or_else(|| self.pusher.view.member(node).map(|m| m.addr.clone())).unwrap_or_else(|| format!("server {node}"))
    }

    /// Sends `call` on its link without waiting for the reply. A listed pull goes by its key
    /// list's hash when the link's shard holds the list, else asks it to remember the list. A
    /// link that fails is dropped (the next call makes a new one).
    fn start(&mut self, call: &mut Outgoing) -> Result<Started> {
        let defer = call.defer;
        let started = self.link(call.to).and_then(|link| {
            if call.header.op() == Some(Op::Pull) {
                match link.lists.remember_le(&call.body) {
                    Some(Remembered::Held(hash)) => {
                        call.header.flags |= flags::KEYS_CACHED;
                        call.header.start = hash;
                        call.body.clear();
                    }
                    Some(Remembered::New) => call.header.flags |= flags::KEYS_REMEMBER,
                    None => {}
                }
            }
            let before = link.caller.calls();
            let mut parts = [&[][..]; SEND_PARTS_MAX];
            match defer && call.uncopied.len == 0 {
                true => link.caller.start_deferred(&mut call.header, &call.body)?,
                false => link.caller.start_parts(&mut call.header, call.uncopied.parts(&call.body, &mut parts))?,
            }
            Ok((before, link.caller.calls(), link.made))
        });
        match started {
            Ok((before, after, link)) => {
                if call.header.flags & flags::KEYS_CACHED != 0 {
                    self.stats.lists_by_hash += 1;
                }
                if defer && !self.deferred_on.contains(&call.to) {
                    self.deferred_on.push(call.to);
                }
                self.stats.rdma_calls += after.rdma - before.rdma;
                self.stats.tcp_calls += after.tcp - before.tcp;
                let sent = call.header.frame_len();
                // Sent (copied out): the body serves the next frame.
                if call.header.op() == Some(Op::WorkerPush) {
                    self.spare_bodies.keep(std::mem::take(&mut call.body));
                }
                Ok(Started { to: call.to, link, sent })
            }
            Err(e) => {
                self.links.remove(&call.to);
                self.link_lost = e.to_string();
                Err(e)
            }
        }
    }

    /// Waits for the reply to a started request; returns its header and body. A refusal is
    /// the server's [`ClientError::Server`] answer.
    fn finish(&mut self, started: Started) -> Result<Reply> {
        self.finish_within(&started, None).expect("no timeout given")
    }

    /// [`finish`](Self::finish), waiting no longer than `timeout` when one is given: `None`
    /// when the reply did not come by then (the request stays in flight).
    ///
    /// On a cluster, a wait with no end of its own goes in slices of [`SILENT_SERVER_CHECK`].
    /// A server that stops answering with its connection open (a hung process, a host cut
    /// off) is taken out of its chains by the coordinator within its failure timeout: after a
    /// silent slice the client fetches the configuration (from another server first), and when
    /// the server is in no chain any more it lets the link go, failing what is in flight on it
    /// (pushes are sent again at once to the new heads), instead of waiting out the transport's
    /// I/O timeout. A server still in its chains is waited on for that timeout, as before.
    fn finish_within(&mut self, started: &Started, timeout: Option<Duration>) -> Option<Result<Reply>> {
        if timeout.is_some() || self.alone {
            return self.finish_within_once(started, timeout);
        }
        let began = Instant::now();
        let io_timeout = Duration::from_millis(self.dialer.cfg.io_timeout_ms);
        loop {
            let slice = SILENT_SERVER_CHECK.min(io_timeout.saturating_sub(began.elapsed()));
            if let Some(replied) = self.finish_within_once(started, Some(slice)) {
                return Some(replied);
            }
            let node = started.to.node;
            let silent = began.elapsed();
            if silent >= io_timeout || self.left_chains(node) {
                let why = match silent >= io_timeout {
                    true => "no reply within the I/O timeout",
                    false => "the coordinator took it out of its chains",
                };
                let reason = format!("{} answered nothing for {silent:?}: {why}", self.addr_of(node));
                tracing::warn!(node = node.0, "{reason}; what was in flight to it goes elsewhere");
                self.links.remove(&started.to);
                self.link_lost = reason.clone();
                self.resend_at_once = true;
                return Some(Err(ClientError::Unavailable { reason }));
            }
        }
    }

    /// Whether `node`, silent, is in no range's chain in the configuration as fetched now
    /// (asking the other servers first; at most every [`REFRESH_GAP`]).
    fn left_chains(&mut self, node: NodeId) -> bool {
        if self.refreshed_at.elapsed() >= REFRESH_GAP {
            self.refresh_asking_last(Some(node));
        }
        !self.pusher.view.holds_any(node)
    }

    /// Writes the push frames deferred on every link. Whatever this client waits for, every
    /// push it started is on its way first: a reply awaited from one server may depend on
    /// a push to another (a bounded-delay pull on another worker's progress, say).
    fn flush_deferred(&mut self) {
        if self.deferred_on.is_empty() {
            return;
        }
        // (The list goes back emptied: a warm client allocates nothing per call.)
        let mut deferred_on = std::mem::take(&mut self.deferred_on);
        for key in deferred_on.drain(..) {
            let Some(link) = self.links.get_mut(&key) else { continue };
            if let Err(e) = link.caller.flush_deferred() {
                // As a failed start: what was in flight on the link fails at its finish.
                self.links.remove(&key);
                self.link_lost = e.to_string();
            }
        }
        self.deferred_on = deferred_on;
    }

    /// Sleeps for `how_long`, the deferred pushes sent first.
    fn pause(&mut self, how_long: Duration) {
        self.flush_deferred();
        std::thread::sleep(how_long);
    }

    /// One wait of [`finish_within`](Self::finish_within).
    fn finish_within_once(&mut self, started: &Started, timeout: Option<Duration>) -> Option<Result<Reply>> {
        self.flush_deferred();
        let link = match self.links.get_mut(&started.to) {
            Some(link) if link.made == started.link => link,
            // The link failed while this request was in flight (another request on it saw the
            // failure): its reply is lost with it.
            _ => {
                let reason = format!("the link to {} broke before the reply came ({})", self.addr_of(started.to.node), self.link_lost);
                return Some(Err(ClientError::Unavailable { reason }));
            }
        };
        let mut body = self.spare_replies.take();
        let replied = link.caller.finish_into(timeout, &mut body).map(|header| (header, body));
        if timeout.is_some() && matches!(replied, Err(TransportError::Timeout { .. })) {
            return None;
        }
        if matches!(replied, Err(TransportError::Refused { status: Status::KeysUnknown, .. })) {
            // The shard holds fewer lists than this side thought: start both over.
            link.lists = KeyLists::new(self.key_cache_keys);
            self.stats.keys_unknown += 1;
        }
        self.count(started.sent, replied.as_ref().map_or(HEADER_BYTES, |r| r.0.frame_len()));
        Some(match replied {
            Ok(reply) => Ok(reply),
            // A refusal is the server's answer; the link is fine.
            Err(TransportError::Refused { status, reason }) => Err(ClientError::Server { server: self.addr_of(started.to.node), status, message: reason }),
            Err(e) => {
                self.links.remove(&started.to);
                self.link_lost = e.to_string();
                Err(e.into())
            }
        })
    }

    /// Sends every request of `calls` and leaves their replies in `replies`, in order, counted
    /// in [`ChainStats`]. Requests to different server shards are in flight together (one per
    /// link at a time), so the servers serve them at once. A request's body stays in `calls`
    /// for the caller to reuse (a push frame's is kept for the next frames).
    fn call_all(&mut self, calls: &mut [Outgoing], replies: &mut Vec<Result<Reply>>) {
        // The replies to the requests in flight on these links (pushes, pipelined pulls) come
        // first on them: they are taken once this exchange's requests are sent, so that a
        // server shard reads a push and the pull after it at once and answers both together.
        let after_in_flight = calls.iter().any(|c| self.links.get(&c.to).is_some_and(|l| l.caller.in_flight() > 0));
        replies.clear();
        replies.extend(calls.iter().map(|_| Err(ClientError::Unavailable { reason: String::new() })));
        let mut left = std::mem::take(&mut self.calls_left);
        let mut round = std::mem::take(&mut self.round);
        left.clear();
        left.extend(0..calls.len());
        while !left.is_empty() {
            // A round: the first request left for each link.
            round.clear();
            left.retain(|&i| {
                let busy = round.iter().any(|&(j, _)| calls[j].to == calls[i].to);
                if !busy {
                    round.push((i, None));
                }
                busy
            });
            for (i, started) in round.iter_mut() {
                let i = *i;
                if self.links.get(&calls[i].to).is_some_and(|l| !l.caller.can_start_len(calls[i].len())) {
                    self.collect_in_flight();
                }
                match self.start(&mut calls[i]) {
                    Ok(s) => *started = Some(s),
                    Err(e) => replies[i] = Err(e),
                }
            }
            if after_in_flight {
                self.collect_in_flight();
            }
            for (i, started) in round.drain(..) {
                if let Some(started) = started {
                    replies[i] = self.finish(started);
                }
            }
        }
        self.calls_left = left;
        self.round = round;
    }

    /// A `WorkerPush` request to `at` (a batch of pushes, or a poll when `body` is empty). A
    /// batch hears from the tails ([`flags::TAIL_ACKS`]): its heads answer at once, and it names
    /// the pushes it awaits from the shard as their ranges' tail ([`queued_frames`](Self::queued_frames)).
    fn worker_push(&self, at: (NodeId, u16), body: Vec<u8>, uncopied: Uncopied) -> Outgoing {
        let mut header = Header::request(Op::WorkerPush, 0);
        header.worker = self.worker;
        header.start = self.incarnation;
        if !body.is_empty() {
            header.flags |= flags::TAIL_ACKS;
        }
        Outgoing { to: LinkKey { node: at.0, shard: at.1, lane: Lane::Push }, header, body, uncopied, defer: false }
    }

    /// `WorkerPush` requests (batches of pushes, or polls with no pushes), each to its server
    /// shard and all in flight together; takes the acknowledgements in their replies. A poll
    /// also asks how many of this worker's pushes the shard's ranges applied, so that a resend
    /// leaves out what their heads hold ([`Pusher::resend`]). Leaves `frames` empty.
    fn exchange(&mut self, frames: &mut Vec<Frame>) {
        let mut calls = std::mem::take(&mut self.calls);
        let mut sent = std::mem::take(&mut self.sent);
        let mut replies = std::mem::take(&mut self.replies);
        calls.clear();
        sent.clear();
        for f in frames.drain(..) {
            let poll = f.len() == 0;
            let mut call = self.worker_push(f.at, f.body, f.uncopied);
            if poll {
                call.header.flags |= flags::PUSH_SEQS;
            }
            calls.push(call);
            sent.push(Sent { to: f.at, pieces: f.pieces, first: f.first, push: 0 });
        }
        self.call_all(&mut calls, &mut replies);
        for (s, replied) in sent.drain(..).zip(replies.drain(..)) {
            self.take_acks(s, replied);
        }
        calls.clear();
        self.calls = calls;
        self.sent = sent;
        self.replies = replies;
    }

    /// Takes the acknowledgements in a `WorkerPush` reply. A failed link is noted: what it
    /// carried is resent later. A frame of new pushes that the head refused outright (it can
    /// never be applied: a full table, say) takes those pushes back, and the error is kept for
    /// the push's ticket ([`settle_through`](Self::settle_through)).
    fn take_acks(&mut self, sent: Sent, replied: Result<Reply>) {
        let now = self.now_ms();
        let node = sent.to.0 .0;
        let mut stale = false;
        let stamped = sent.push > 0 && !sent.pieces.is_empty();
        let mut news = std::mem::take(&mut self.news);
        if replied.is_ok() {
            self.down_since = None;
        }
        let decoded = replied.map(|(header, body)| {
            // A head's answer to pushes starts with the stamp of what it applied.
            let decoded = match body.split_at_checked(header.count as usize * 8) {
                Some((stamp, batch)) => {
                    if stamped {
                        self.met_stamp(sent.push, stamp);
                    }
                    // Acknowledgements carry no payload: nothing to keep for them.
                    codec::decode_batch_into(batch, None, &mut PayloadPool::unkept(), &mut news).map_err(|e| e.to_string())
                }
                None => Err(format!("a stamp of {} clocks in a reply of {} bytes", header.count, body.len())),
            };
            self.spare_replies.keep(body);
            decoded
        });
        if stamped && !matches!(decoded, Ok(Ok(_))) {
            self.met_stamp(sent.push, &[]);
        }
        match decoded {
            Ok(Ok(())) => {
                let mut refusals = Vec::new();
                for n in news.drain(..) {
                    match n {
                        Msg::Refused { range, seq, status, reason } => refusals.push((range, seq, Status::from_u16(status), reason)),
                        n => stale |= self.pusher.on_msg(now, sent.to.0, n),
                    }
                }
                self.follow_renumbering();
                if !refusals.is_empty() {
                    self.head_refused(&sent, refusals);
                }
            }
            Ok(Err(e)) => tracing::warn!(node, error = %e, "a malformed acknowledgement"),
            Err(ClientError::Server { status, server, message }) if sent.first && status.never_applies() && !sent.pieces.is_empty() => {
                self.refused(sent.push, &sent.pieces, ClientError::Server { server, status, message });
            }
            Err(ClientError::Server { status: Status::NotDurable, server, message }) => {
                // The head's log failed: what it applied it cannot make durable, and it takes
                // no more. The pushes stay this client's, sent again until a head takes them
                // (the server restarted with room, or another head); the wait reports it now.
                let message = format!(
                    "{message}. The push is not acknowledged: this client keeps it and sends it again until its range's head can log it (do not push it again)"
                );
                self.not_durable.get_or_insert(ClientError::Server { server, status: Status::NotDurable, message });
            }
            Err(ClientError::Server { status: Status::KeysUnknown, .. }) => {
                // The head did not hold a list a push named: nothing of the frame was applied,
                // and the link's lists start over (see `finish`). Resent in full at once.
                self.keys_unknown = true;
            }
            Err(ClientError::Server { message, .. }) => {
                // Not acknowledged in time: the wait asks again, and resends if need be.
                tracing::debug!(node, message, "pushes not acknowledged");
            }
            Err(e) => {
                tracing::debug!(node, error = %e, "push link failed");
                self.unreachable_at = Some(Instant::now());
                if self.alone && self.down_since.is_none() {
                    self.down_since = Some(Instant::now());
                    self.down_because = e.to_string();
                }
            }
        }
        news.clear();
        self.news = news;
        self.keep_pieces(sent.pieces);
        if stale {
            self.refresh();
        }
    }

    /// A head refused pushes by name (range, seq, why): they can never be applied, and nothing
    /// of the frame `sent` that carried them was. A new push's frame is taken back whole (its
    /// pieces are all new, so none was applied); from a resend, only the named pieces are (a
    /// push's pieces to other ranges may have been applied before; a head names at most one
    /// push per range, as the range's later ones wait behind it). Either way the rest goes
    /// again at once.
    fn head_refused(&mut self, sent: &Sent, refusals: Vec<(RangeId, u32, Status, String)>) {
        let server = self.addr_of(sent.to.0);
        let error = |status, message| ClientError::Server { server: server.clone(), status, message };
        if sent.first {
            let (_, _, status, message) = refusals.into_iter().next().expect("a refusal");
            self.refused(sent.push, &sent.pieces, error(status, message));
        } else {
            for (range, seq, status, message) in refusals {
                match self.unconfirmed.iter().find(|(_, pieces)| pieces.contains(&(range, seq))) {
                    Some(&(push, _)) => self.refused(push, &[(range, seq)], error(status, message)),
                    None => tracing::warn!(range = range.0, seq, message, "a head refused a push this client does not keep"),
                }
            }
        }
        self.resend_at_once = true;
    }

    /// Push `push` refused outright with `error`: takes back its `pieces` (none applied), and
    /// keeps the error for the push's ticket ([`settle_through`](Self::settle_through)).
    fn refused(&mut self, push: u64, pieces: &[(RangeId, u32)], error: ClientError) {
        for &(range, seq) in pieces {
            let taken_back = self.pusher.withdraw(range, seq);
            self.withdrawn(range, seq, taken_back);
        }
        // A push sent to several shards may be refused by more than one: its first refusal is
        // its ticket's.
        if !self.refusals.iter().any(|r| r.push == push) {
            if self.refusals.len() == REFUSALS_KEPT {
                self.refusals.pop_front();
            }
            self.refusals.push_back(Refusal { push, error });
        }
    }

    /// Keeps a list of pieces for a later frame's or push's, if fewer than
    /// [`SPARE_PIECE_LISTS_MAX`] are kept.
    fn keep_pieces(&mut self, mut pieces: Vec<(RangeId, u32)>) {
        if self.spare_pieces.len() < SPARE_PIECE_LISTS_MAX {
            pieces.clear();
            self.spare_pieces.push(pieces);
        }
    }

    /// Meets `stamp` (little-endian clocks, from a head's answer to a frame of push `push`) into
    /// the push's stamp; an empty one (an answer without a stamp, or none) leaves the push with
    /// no stamp from its heads.
    fn met_stamp(&mut self, push: u64, stamp: &[u8]) {
        let Some(entry) = self.stamps.iter_mut().rev().find(|s| s.push == push) else { return };
        if stamp.is_empty() {
            entry.whole = false;
            return;
        }
        let clocks = stamp.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
        entry.stamp.meet(clocks, !entry.met);
        entry.met = true;
    }

    /// The stamp push number `push`'s heads gave it, taken: the meet of their stamps of the keys
    /// it touched, as they applied it. `None` when a frame of it came back without one (a
    /// failover, a resend) or it is more than [`PUSH_STAMPS_KEPT`] pushes old.
    pub fn push_stamp(&mut self, push: u64) -> Option<Stamp> {
        let at = self.stamps.iter().position(|s| s.push == push)?;
        let first = self.stamps[at].first;
        let mut stamp = Stamp::default();
        let (mut found, mut whole) = (0, true);
        self.stamps.retain(|s| {
            let part = (first..=push).contains(&s.push);
            if part {
                whole &= s.whole && s.met;
                stamp.meet(s.stamp.clocks().iter().copied(), found == 0);
                found += 1;
            }
            !part
        });
        (whole && found == push - first + 1).then_some(stamp)
    }

    /// Waits for the replies to the pushes [`deliver_in_flight`](Self::deliver_in_flight) left
    /// in flight.
    fn collect_in_flight(&mut self) {
        while self.collect_oldest() {}
    }

    /// Waits for the reply to the oldest request in flight; false if there is none. A push
    /// frame's acknowledgements are taken; a pull part's reply is kept for its ticket (or let go,
    /// if the ticket was dropped).
    fn collect_oldest(&mut self) -> bool {
        self.collect_at(0, None)
    }

    /// Waits for the reply to the oldest request in flight on the link of pull `number`'s
    /// oldest request (that one, or one sent before it on its link: pushes and other pulls
    /// sent on other links are not waited for), until `deadline` at most; false, with the
    /// request still in flight, when it did not come by then, or when the pull has none.
    fn collect_for_pull(&mut self, number: u64, deadline: Option<Instant>) -> bool {
        let Some(to) = self.in_flight.iter().find_map(|f| match f {
            InFlight::Pull { pull, started, .. } if *pull == number => Some(started.to),
            _ => None,
        }) else {
            return false;
        };
        let at = self.in_flight.iter().position(|f| f.started().to == to).expect("the pull's request is in flight");
        self.collect_at(at, deadline)
    }

    /// Waits for the reply to the request in flight at `at` in [`in_flight`](Self::in_flight),
    /// which must be the oldest on its link, until `deadline` at most: false, with the request
    /// still in flight, when it did not come by then.
    fn collect_at(&mut self, at: usize, deadline: Option<Instant>) -> bool {
        let Some(started) = self.in_flight.get(at).map(InFlight::started) else { return false };
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let Some(replied) = self.finish_within(&started, timeout) else { return false };
        match self.in_flight.remove(at).expect("looked at above") {
            InFlight::Push(sent, _) => self.take_acks(sent, replied),
            InFlight::Pull { pull, part, .. } => self.keep_pull_reply(pull, part, replied),
        }
        true
    }

    /// Resends every push not acknowledged, in order, to the heads of the configuration held
    /// now, and waits for the replies (the frames in flight are taken first: theirs come
    /// first on the links).
    fn resend_now(&mut self) {
        let now = self.now_ms();
        self.pusher.resend(now, 0);
        self.deliver();
    }

    /// Sends what the pusher has queued (resends) and waits for the replies: the pushes to the
    /// ranges one server shard heads go in one frame (more when they exceed the frame limit),
    /// and every server shard's at once.
    fn deliver(&mut self) {
        let mut frames = std::mem::take(&mut self.frames);
        self.queued_frames(false, &mut frames);
        self.exchange(&mut frames);
        self.frames = frames;
    }

    /// What the pusher has queued, as `WorkerPush` frames per server shard, into `frames`;
    /// `first` when they are pushes sent for the first time. Each push to a chain longer than
    /// one is also named, as a `PushAck` awaited, in the frame to its chain's tail: the tail
    /// answers when it holds it, so the acknowledgement takes one hop back instead of the
    /// chain's way up. A server shard's frames follow one another in `frames` in the order
    /// they must be sent.
    fn queued_frames(&mut self, first: bool, frames: &mut Vec<Frame>) {
        let body_max = self.frame_bytes_max.saturating_sub(HEADER_BYTES).max(1);
        // Only pushes sent for the first time go by their key list's hash: resends go plain.
        let caching = first && self.key_cache_keys > 0;
        let mut awaited = std::mem::take(&mut self.awaited);
        let mut out = std::mem::take(&mut self.pusher.out);
        for (to, msg) in out.drain(..) {
            let (Addr::Node(node), Msg::Push { range, seq, .. }) = (to, &msg) else { continue };
            let shard = shard_of_range(range.0, self.ranges, self.shards);
            let cached = match caching {
                true => self
                    .links
                    .get_mut(&LinkKey { node, shard, lane: Lane::Push })
                    .and_then(|l| with_cached_keys(&mut l.lists, &msg, &mut self.payloads, &mut self.stats)),
                false => None,
            };
            let sending = cached.as_ref().unwrap_or(&msg);
            let Some(at) = self.frame_to(frames, node, shard, body_max, first, sending) else { continue };
            if let Some(tail) = self.pusher.view.chain(*range).and_then(|c| c.tail()).filter(|t| *t != node) {
                awaited.push((tail, shard, Msg::PushAck { range: *range, seq: *seq }));
            }
            frames[at].encode(sending);
            frames[at].pieces.push((*range, *seq));
        }
        // Nothing queued more pushes meanwhile: the emptied list (and its room) goes back.
        debug_assert!(self.pusher.out.is_empty());
        self.pusher.out = out;
        for (tail, shard, msg) in awaited.drain(..) {
            if let Some(at) = self.frame_to(frames, tail, shard, body_max, first, &msg) {
                frames[at].encode(&msg);
            }
        }
        self.awaited = awaited;
    }

    /// Where in `frames` the frame being filled for server `node`'s shard `shard` is, with
    /// room for `msg` (a push or an acknowledgement awaited), its payload sent from where it
    /// lies if it goes so: a new one at the end when it has none or its last has no room. An
    /// empty frame takes any message. `None` when the configuration does not know `node`.
    fn frame_to(&mut self, frames: &mut Vec<Frame>, node: NodeId, shard: u16, body_max: usize, first: bool, msg: &Msg) -> Option<usize> {
        self.pusher.view.member(node)?;
        let (bytes, in_place) = (codec::bulk_len(msg) + codec::PUSH_BATCHED_OVERHEAD_MAX, sent_in_place(msg));
        let room = |f: &Frame| f.len() == 0 || (f.len() + bytes <= body_max && !(in_place && f.uncopied.is_full()));
        match frames.iter().rposition(|f| f.at == (node, shard)) {
            Some(at) if room(&frames[at]) => Some(at),
            _ => {
                let (body, pieces) = (self.spare_bodies.take(), self.spare_pieces.pop().unwrap_or_default());
                frames.push(Frame { at: (node, shard), body, uncopied: Uncopied::default(), pieces, first });
                Some(frames.len() - 1)
            }
        }
    }

    /// Sends the pushes just queued as push number [`pushes`](Self::pushes) and returns
    /// without waiting for the replies. A frame that would take another path of its link (RDMA
    /// or TCP) than the frames in flight there waits for them first, so it cannot overtake them.
    fn deliver_in_flight(&mut self) {
        let mut frames = std::mem::take(&mut self.frames);
        self.queued_frames(true, &mut frames);
        let mut pieces = self.spare_pieces.pop().unwrap_or_default();
        pieces.extend(frames.iter().flat_map(|f| f.pieces.iter().copied()));
        self.pushes += 1;
        self.unconfirmed.push_back((self.pushes, pieces));
        while self.stamps.front().is_some_and(|s| s.push + PUSH_STAMPS_KEPT <= self.pushes) {
            self.stamps.pop_front();
        }
        self.stamps.push_back(PushStamp { push: self.pushes, first: self.pushes, stamp: Stamp::default(), met: false, whole: true });
        for f in frames.drain(..) {
            let sent = Sent { to: f.at, pieces: f.pieces, first: true, push: self.pushes };
            // Deferred only when its ranges are on chains of one: their pulls take the same
            // link ([`pull_lane`](Self::pull_lane)), so the worker's next pull carries it.
            // A head's pulls go to another server (the tail): nothing would carry it sooner.
            let alone = |(r, _): &(RangeId, u32)| self.pusher.view.chain(*r).is_some_and(|c| c.nodes.len() == 1);
            let defer = self.defer_pushes && !sent.pieces.is_empty() && sent.pieces.iter().all(alone);
            let mut call = self.worker_push(f.at, f.body, f.uncopied);
            call.defer = defer;
            if self.links.get(&call.to).is_some_and(|l| !l.caller.can_start_len(call.len())) {
                self.collect_in_flight();
            }
            match self.start(&mut call) {
                Ok(started) => self.in_flight.push_back(InFlight::Push(sent, started)),
                Err(e) => {
                    self.spare_bodies.keep(call.body);
                    self.take_acks(sent, Err(e));
                }
            }
        }
        self.frames = frames;
    }

    /// Maps the seqs this client keeps of pushes the pusher numbered anew (a range that lost
    /// acknowledged pushes, see `Pusher::renumber_after`), and says what was lost.
    fn follow_renumbering(&mut self) {
        if self.pusher.renumbered.is_empty() {
            return;
        }
        for (range, old_first, new_first) in std::mem::take(&mut self.pusher.renumbered) {
            tracing::warn!(
                range = range.0,
                pieces_lost = self.pusher.lost,
                "a range holds fewer of this worker's pushes than were acknowledged (its only server restarted without its disk, or its chain came back from an older checkpoint): \
                 those are lost, and the pushes not yet acknowledged are numbered on from what it holds"
            );
            // Pieces below the first renumbered one were acknowledged (then lost): done with.
            let remap = |pieces: &mut Vec<(RangeId, u32)>| {
                pieces.retain(|(r, seq)| *r != range || *seq >= old_first);
                pieces.iter_mut().filter(|(r, _)| *r == range).for_each(|(_, seq)| *seq = *seq - old_first + new_first);
            };
            self.unconfirmed.iter_mut().for_each(|(_, pieces)| remap(pieces));
            self.in_flight.iter_mut().for_each(|f| {
                if let InFlight::Push(sent, _) = f {
                    remap(&mut sent.pieces);
                }
            });
        }
        self.stats.push_pieces_lost = self.pusher.lost;
        // The renumbered pushes go again at once, not after the retry timer.
        self.resend_at_once = true;
    }

    /// Forgets push `seq` to `range`, refused outright. When the pusher took it back
    /// ([`Pusher::withdraw`]), maps the seqs this client keeps of the pushes after it, which the
    /// pusher numbered one lower; those go again at once, as a head dropped any it had under
    /// their old numbers.
    fn withdrawn(&mut self, range: RangeId, seq: u32, taken_back: bool) {
        let remap = |pieces: &mut Vec<(RangeId, u32)>| {
            pieces.retain(|p| *p != (range, seq));
            if taken_back {
                pieces.iter_mut().filter(|(r, s)| *r == range && *s > seq).for_each(|(_, s)| *s -= 1);
            }
        };
        self.unconfirmed.iter_mut().for_each(|(_, pieces)| remap(pieces));
        self.in_flight.iter_mut().for_each(|f| {
            if let InFlight::Push(sent, _) = f {
                remap(&mut sent.pieces);
            }
        });
        self.resend_at_once |= taken_back && self.pusher.in_flight(range) > 0;
    }

    /// Drops the pushes acknowledged from the front of [`unconfirmed`](Self::unconfirmed).
    fn confirm(&mut self) {
        while let Some((_, pieces)) = self.unconfirmed.front() {
            if pieces.iter().any(|(range, seq)| self.pusher.acked[range.0 as usize] < *seq) {
                return;
            }
            let (_, pieces) = self.unconfirmed.pop_front().expect("a front");
            self.keep_pieces(pieces);
        }
    }

    /// Whether push number `push` and every one before it are acknowledged.
    fn confirmed_through(&mut self, push: u64) -> bool {
        self.confirm();
        self.unconfirmed.front().is_none_or(|(n, _)| *n > push)
    }

    /// Makes room for one more push: waits until at most [`PUSH_WINDOW`] - 1 are in flight.
    /// What became of the pushes waited for is their tickets' to hear, not this push's.
    fn make_room(&mut self) -> Result<()> {
        if self.pushes >= PUSH_WINDOW {
            self.settle_pushes_through(self.pushes + 1 - PUSH_WINDOW, None)?;
        }
        Ok(())
    }

    /// Asks the heads of `ranges` not asked yet how many of this worker's pushes they applied,
    /// and numbers the next pushes on from there: a worker id's pushes are numbered per range,
    /// and a head takes a number it has seen for a resend. Without this, a client started as a
    /// worker that pushed before (a restarted trainer) would have its first pushes taken for
    /// old ones and dropped. Tries until [`CALL_TIMEOUT`].
    fn count_pushes(&mut self, ranges: &[u32]) -> Result<()> {
        if ranges.iter().all(|r| self.counted[*r as usize]) {
            return Ok(());
        }
        let deadline = Instant::now() + self.patience();
        loop {
            let left: Vec<u32> = ranges.iter().copied().filter(|r| !self.counted[*r as usize]).collect();
            if left.is_empty() {
                return Ok(());
            }
            let heads: BTreeSet<(NodeId, u16)> = left.iter().filter_map(|&r| self.head_of(r)).collect();
            let mut calls: Vec<Outgoing> = heads
                .into_iter()
                .map(|at| {
                    let mut call = self.worker_push(at, Vec::new(), Uncopied::default());
                    call.header.flags |= flags::PUSH_SEQS;
                    call
                })
                .collect();
            let now = self.now_ms();
            let mut replies = Vec::with_capacity(calls.len());
            self.call_all(&mut calls, &mut replies);
            for (call, replied) in calls.iter().zip(replies) {
                let from = call.to.node;
                // (A head whose log failed takes no pushes until it is restarted.)
                let refused = |status: &Status| status.never_applies() || *status == Status::NotDurable;
                if let Err(e @ ClientError::Server { .. }) = replied {
                    match e.status().is_some_and(|s| refused(&s)) {
                        true => return Err(e),
                        false => continue,
                    }
                }
                let Ok(Ok(msgs)) = replied.map(|(_, body)| codec::decode_batch(&body)) else { continue };
                for msg in msgs {
                    // A count is taken from the range's head only (`Pusher::on_msg`).
                    if let Msg::SeqCount { range, .. } = &msg {
                        if let Some(c) = self.counted.get_mut(range.0 as usize).filter(|_| self.pusher.head_of(*range) == Some(from)) {
                            *c = true;
                        }
                    }
                    self.pusher.on_msg(now, from, msg);
                }
            }
            self.follow_renumbering();
            if left.iter().any(|r| !self.counted[*r as usize]) {
                if Instant::now() > deadline && self.alone {
                    let reason = format!("the standalone server did not answer for {:?}", self.alone_patience);
                    return Err(ClientError::Reconnect { server: self.seeds.join(", "), attempts: self.reconnect_attempts, reason });
                }
                if Instant::now() > deadline {
                    return Err(ClientError::Unavailable { reason: format!("no head answered for ranges {left:?}") });
                }
                self.pause(Duration::from_millis(20));
                self.refresh();
            }
        }
    }

    /// Most keys of `dim` values one frame carries as `what`, so that every request and reply
    /// of a call fits [`frame_bytes_max`](Self::frame_bytes_max): a call of more is cut into
    /// several, each with its pieces by range (a piece never holds more keys than its call).
    /// Room for a clock per worker is kept in every frame: a forward's clock, a reply's stamp.
    fn keys_per_frame(&self, dim: usize, what: Carries) -> usize {
        let room = self.frame_bytes_max.saturating_sub(HEADER_BYTES + FRAME_ROOM_BYTES + 8 * self.stamp_clocks_max);
        keys_fitting(room, 0, dim, what)
    }

    /// Makes the last push sent the end of a call cut into pushes `first` to it: its stamp,
    /// when taken, is the meet of theirs.
    fn join_stamps(&mut self, first: u64) {
        if let Some(last) = self.stamps.back_mut() {
            last.first = first;
        }
    }

    /// Pushes `grads` for the dense keys of `table` from `start`, one piece per replication
    /// range. Waits for room in the [`PUSH_WINDOW`] first; returns the push's number once it is
    /// sent.
    pub fn push_range(&mut self, table: ChainTable<'_>, start: u64, grads: &[f32], clock: u64) -> Result<u64> {
        let dim = table.spec.dim as usize;
        if grads.is_empty() || !grads.len().is_multiple_of(dim) {
            let (keys, want) = (grads.len() / dim, grads.len() / dim * dim);
            return Err(ClientError::Length { what: "the gradient", table: table.spec.name.clone(), keys, dim, got: grads.len(), want });
        }
        if table.spec.kind == TableKind::Sparse {
            // As an unreplicated server takes it: the keys of the span, one by one.
            let keys = sparse_span(table, start, grads.len() / dim)?;
            return self.push_keys(table, &keys, grads, clock, false);
        }
        let per_push = self.keys_per_frame(dim, Carries::Values);
        if grads.len() / dim <= per_push {
            return self.push_range_in_frame(table, start, grads, clock);
        }
        let first = self.pushes + 1;
        for (i, part) in grads.chunks(per_push * dim).enumerate() {
            self.push_range_in_frame(table, start + (i * per_push) as u64, part, clock)?;
        }
        self.join_stamps(first);
        Ok(self.pushes)
    }

    /// [`push_range`](Self::push_range) of a call whose pieces each fit one frame.
    fn push_range_in_frame(&mut self, table: ChainTable<'_>, start: u64, grads: &[f32], clock: u64) -> Result<u64> {
        let dim = table.spec.dim as usize;
        let mut pieces = std::mem::take(&mut self.spans);
        let mut ranges = std::mem::take(&mut self.range_list);
        let ready = self.pieces(table, start, (grads.len() / dim) as u64, &mut pieces).and_then(|()| {
            self.make_room()?;
            self.refresh_if_old();
            ranges.clear();
            ranges.extend(pieces.iter().map(|p| p.0));
            self.count_pushes(&ranges)
        });
        self.range_list = ranges;
        if let Err(e) = ready {
            self.spans = pieces;
            return Err(e);
        }
        let now = self.now_ms();
        for &(range, lo, hi) in &pieces {
            let h = PushHeader {
                table: table.id,
                dim: dim as u32,
                start: lo,
                count: (hi - lo) as u32,
                worker: self.worker,
                clock,
                listed: false,
                range_done: false,
            };
            let values = &grads[(lo - start) as usize * dim..(hi - start) as usize * dim];
            // Written once, into a payload kept for resends and refilled once acknowledged.
            let payload = self.payloads.make_with(|out| {
                h.write_head(out);
                out.extend_from_slice(bytemuck::cast_slice(values));
            });
            self.pusher.push(now, RangeId(range), payload);
        }
        self.spans = pieces;
        self.deliver_in_flight();
        Ok(self.pushes)
    }

    /// Pushes `grads` (`dim` per key) for `keys`, one piece per replication range. With
    /// `ranges_done` (bounded delay), the push completes the worker's clock on every range of
    /// the table, with an empty piece to the ranges it has no keys in. Waits for room in the
    /// [`PUSH_WINDOW`] first; returns the push's number once it is sent.
    pub fn push_keys(&mut self, table: ChainTable<'_>, keys: &[u64], grads: &[f32], clock: u64, ranges_done: bool) -> Result<u64> {
        let dim = table.spec.dim as usize;
        let per_push = self.keys_per_frame(dim, Carries::KeysAndValues);
        if keys.len() <= per_push {
            return self.push_keys_in_frame(table, keys, grads, clock, ranges_done);
        }
        // Only the last part completes the worker's clock on the ranges (bounded delay): the
        // parts before it are applied first, as a range applies a worker's pushes in order.
        let first = self.pushes + 1;
        let parts = keys.chunks(per_push).zip(grads.chunks(per_push * dim));
        let last = keys.len().div_ceil(per_push) - 1;
        for (i, (keys, grads)) in parts.enumerate() {
            self.push_keys_in_frame(table, keys, grads, clock, ranges_done && i == last)?;
        }
        self.join_stamps(first);
        Ok(self.pushes)
    }

    /// [`push_keys`](Self::push_keys) of a call whose pieces each fit one frame.
    fn push_keys_in_frame(&mut self, table: ChainTable<'_>, keys: &[u64], grads: &[f32], clock: u64, ranges_done: bool) -> Result<u64> {
        let spec = table.spec;
        let dim = spec.dim as usize;
        let groups = self.group_keys(table, keys)?;
        let mut pushed = std::mem::take(&mut self.range_list);
        pushed.clear();
        match ranges_done {
            true => pushed.extend((0..self.ranges).filter(|r| !range_keys(spec, self.ranges, *r).is_empty() || groups.positions(*r).is_some())),
            false => pushed.extend(groups.iter().map(|(range, _)| range)),
        }
        let sent = self.make_room().and_then(|()| {
            self.refresh_if_old();
            self.count_pushes(&pushed)
        });
        if let Err(e) = sent {
            self.groups = groups;
            self.range_list = pushed;
            return Err(e);
        }
        let now = self.now_ms();
        for &range in &pushed {
            let at = groups.positions(range).unwrap_or(&[]);
            let h = PushHeader {
                table: table.id,
                dim: dim as u32,
                start: 0,
                count: at.len() as u32,
                worker: self.worker,
                clock,
                listed: true,
                range_done: ranges_done,
            };
            // The payload's keys, then their values: one copy each when the range's keys came
            // together (sorted keys do), else gathered key by key.
            let payload = self.payloads.make_with(|payload| {
                h.write_head(payload);
                match groups.run_of(range) {
                    Some(run) => {
                        extend_le_u64(payload, &keys[run.clone()]);
                        payload.extend_from_slice(bytemuck::cast_slice(&grads[run.start * dim..run.end * dim]));
                    }
                    None => {
                        at.iter().for_each(|i| payload.extend_from_slice(&keys[*i as usize].to_le_bytes()));
                        at.iter().for_each(|i| payload.extend_from_slice(bytemuck::cast_slice(&grads[*i as usize * dim..(*i as usize + 1) * dim])));
                    }
                }
            });
            self.pusher.push(now, RangeId(range), payload);
        }
        self.range_list = pushed;
        self.groups = groups;
        self.deliver_in_flight();
        Ok(self.pushes)
    }

    /// Groups `keys` by replication range into `self.groups` (checking every key is in the
    /// table), and takes the groups out for the caller to put back.
    fn group_keys(&mut self, table: ChainTable<'_>, keys: &[u64]) -> Result<RangeGroups> {
        let spec = table.spec;
        if let Some(&key) = keys.iter().find(|k| **k < spec.start || **k >= spec.end) {
            return Err(ClientError::KeyOutOfRange { table: spec.name.clone(), key, start: spec.start, end: spec.end });
        }
        let mut groups = std::mem::take(&mut self.groups);
        groups.group(spec, self.ranges, keys);
        Ok(groups)
    }

    /// Takes the replies to every pull in flight (keeping them for their tickets), then waits
    /// until every push sent is answered; see [`answered_through`](Self::answered_through).
    pub fn settle(&mut self, deadline: Option<Instant>) -> Result<bool> {
        self.collect_in_flight();
        self.answered_through(u64::MAX, deadline)
    }

    /// How long a call waits for the cluster to answer: a standalone server, which nothing
    /// replaces while it is down, for the client's reconnection attempts; a cluster, whose
    /// coordinator names new chains, for [`CALL_TIMEOUT`].
    fn patience(&self) -> Duration {
        if self.alone {
            self.alone_patience
        } else {
            CALL_TIMEOUT
        }
    }

    /// Lets every push and pull in flight go, their outcome unknown: their tickets fail with
    /// [`ClientError::OutcomeUnknown`] saying `reason`, and nothing of them is sent again.
    /// Pushes are numbered afresh from each head's count. Only for a cluster whose ranges
    /// were lost with its server: a standalone server that stopped answering, or servers that
    /// turned out to be another cluster.
    fn give_up(&mut self, reason: String) {
        if let (Some((first, _)), true) = (self.unconfirmed.front(), self.pushes > 0) {
            if self.lost.len() == LOST_RUNS_KEPT {
                self.lost.pop_front();
            }
            self.lost.push_back((*first, self.pushes));
        }
        while let Some((_, pieces)) = self.unconfirmed.pop_front() {
            self.keep_pieces(pieces);
        }
        self.pusher = Pusher::new(WorkerId(self.worker), self.ranges, self.pusher.view.clone());
        self.counted.fill(false);
        self.in_flight.clear();
        self.links.clear();
        for pull in &mut self.pulls {
            pull.due = 0;
            pull.failed = Some(ClientError::OutcomeUnknown { server: self.seeds.join(", "), reason: reason.clone() });
        }
        self.pulls.retain(|p| !p.dropped);
        self.down_since = None;
        self.stats.given_up += 1;
        self.lost_reason = reason;
    }

    /// The servers now serve cluster `cluster` (the server at `addr` says): a standalone
    /// server restarted without its data. What was in flight is let go ([`give_up`]), the
    /// configuration is read again, and tables are to be looked up again by name.
    fn replaced(&mut self, cluster: u64, addr: &str, reason: String) {
        self.give_up(reason);
        self.cluster = cluster;
        self.generation += 1;
        if let Ok(body) = ask(addr, Op::ClusterConfig, &[], &self.dialer.cfg) {
            if let Ok(ClusterView { config: Some(config), .. }) = serde_json::from_slice::<ClusterView>(&body) {
                self.pusher.view = Arc::new(reachable(config, addr));
            }
        }
    }

    /// Waits until push number `push` and every push before it are acknowledged, or until
    /// `deadline` (then returns false, having waited no longer for any reply). Takes the replies to the frames in flight, oldest
    /// first; if those do not acknowledge it, polls the heads of ranges with pushes in flight
    /// and resends to the current heads what waited too long. Fails after [`CALL_TIMEOUT`] in
    /// all, or, for push `push`'s ticket, with the error of a head that refused it outright.
    pub fn settle_through(&mut self, push: u64, deadline: Option<Instant>) -> Result<bool> {
        let answered = self.answered_through(push, deadline)?;
        if !answered || self.refusals.is_empty() {
            return Ok(answered);
        }
        // A call cut into pushes (its ticket's number is its last push's) fails with its
        // first part refused.
        let call = self.call_first(push)..=push;
        match self.refusals.iter().position(|r| call.contains(&r.push)) {
            Some(at) => {
                let refused = self.refusals.remove(at).expect("found").error;
                self.refusals.retain(|r| !call.contains(&r.push));
                Err(refused)
            }
            None => Ok(answered),
        }
    }

    /// The first push of the call that push `push` ends: itself, unless the call was cut into
    /// several ([`join_stamps`](Self::join_stamps)) and its stamp is still kept.
    fn call_first(&self, push: u64) -> u64 {
        self.stamps.iter().rev().find(|s| s.push == push).map_or(push, |s| s.first)
    }

    /// [`settle_through`](Self::settle_through) for a call that follows push `push` (a
    /// dependency, the sequential model): a push refused outright was answered, and its
    /// refusal stays its ticket's.
    pub fn answered_through(&mut self, push: u64, deadline: Option<Instant>) -> Result<bool> {
        let settled = self.settle_pushes_through(push, deadline);
        match self.lost.iter().any(|(first, last)| (*first..=*last).contains(&push)) {
            true => Err(ClientError::OutcomeUnknown { server: self.seeds.join(", "), reason: self.lost_reason.clone() }),
            false => settled,
        }
    }

    /// [`settle_through`](Self::settle_through), before pushes let go are told apart.
    fn settle_pushes_through(&mut self, push: u64, deadline: Option<Instant>) -> Result<bool> {
        // (With a deadline, a reply that does not come by then stays in flight.)
        while !self.confirmed_through(push) && self.collect_at(0, deadline) {}
        let began = Instant::now();
        let timeout = began + CALL_TIMEOUT;
        let mut pause = Duration::from_micros(50);
        while !self.confirmed_through(push) {
            if let Some(e) = self.not_durable.take() {
                return Err(e);
            }
            if let Some(since) = self.down_since.filter(|since| since.elapsed() >= self.alone_patience) {
                let server = self.seeds.join(", ");
                let reason = format!(
                    "{}; the standalone server did not answer for {:?} after that (ClientConfig::reconnect_attempts)",
                    self.down_because,
                    since.elapsed()
                );
                self.give_up(reason.clone());
                return Err(ClientError::OutcomeUnknown { server, reason });
            }
            if Instant::now() > timeout {
                return Err(ClientError::Unavailable { reason: format!("{} pushes unacknowledged after {CALL_TIMEOUT:?}", self.pusher.unacked()) });
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            if std::mem::take(&mut self.keys_unknown) | std::mem::take(&mut self.resend_at_once) {
                self.resend_now();
            }
            let before = self.pusher.unacked();
            let heads: BTreeSet<(NodeId, u16)> = (0..self.ranges).filter(|r| self.pusher.in_flight(RangeId(*r)) > 0).filter_map(|r| self.head_of(r)).collect();
            let mut polls =
                heads.into_iter().map(|at| Frame { at, body: Vec::new(), uncopied: Uncopied::default(), pieces: Vec::new(), first: false }).collect();
            self.exchange(&mut polls);
            let now = self.now_ms();
            let unreachable = self.unreachable_at.take().is_some();

            if (unreachable || began.elapsed() >= SLOW_ACK) && self.refreshed_at.elapsed() >= REFRESH_GAP {
                // A head is down, or a member behind it: the coordinator names new chains within
                // the failure timeout, and resending at once on them saves up to a retry timer.
                let known = self.pusher.view.id;
                self.refresh();
                if self.pusher.view.id != known {
                    self.stats.rerouted += 1;
                    self.resend_now();
                }
            }
            if self.pusher.timed_out(now, RETRY_MS) {
                self.refresh();
                self.stats.resends += 1;
                self.pusher.resend(now, RETRY_MS);
                tracing::debug!(
                    unacked = self.pusher.unacked(),
                    resent = self.pusher.out.len(),
                    config = self.pusher.view.id,
                    "pushes waited out the retry timer"
                );
                self.deliver();
            }
            if self.pusher.unacked() < before {
                pause = Duration::from_micros(50);
            } else {
                self.pause(pause);
                pause = (pause * 2).min(POLL_PAUSE_MAX);
            }
        }
        match self.not_durable.take() {
            Some(e) => Err(e),
            None => Ok(true),
        }
    }

    /// Starts a pull of the dense keys from `start` into `out`, each range from its chain's
    /// tail, every tail at once, and returns its number for [`finish_pull`](Self::finish_pull).
    /// Pieces the tails' memory serves one-sidedly are read into `out` now; the others'
    /// requests are in flight, their values written when the pull is finished.
    pub fn start_pull_range(&mut self, route: &Arc<Route>, start: u64, out: &mut [f32]) -> Result<u64> {
        let table = ChainTable::of(route);
        let dim = table.spec.dim as usize;
        if out.is_empty() || !out.len().is_multiple_of(dim) {
            let (keys, want) = (out.len() / dim, out.len() / dim * dim);
            return Err(ClientError::Length { what: "the output", table: table.spec.name.clone(), keys, dim, got: out.len(), want });
        }
        if table.spec.kind == TableKind::Sparse {
            let keys = sparse_span(table, start, out.len() / dim)?;
            return self.start_pull_keys(route, &keys, out);
        }
        self.refresh_if_old();
        let number = self.new_pull(route, Again::Range(start));
        let per_pull = self.keys_per_frame(dim, Carries::Reply);
        let mut pieces = std::mem::take(&mut self.spans);
        let mut left = std::mem::take(&mut self.pulls_left);
        let mut parts = std::mem::take(&mut self.pull_parts);
        let mut started = Ok(());
        for (i, chunk) in out.chunks_mut(per_pull * dim).enumerate() {
            let first_key = start + (i * per_pull) as u64;
            if let Err(e) = self.pieces(table, first_key, (chunk.len() / dim) as u64, &mut pieces) {
                started = Err(e);
                break;
            }
            left.clear();
            for &(range, lo, hi) in &pieces {
                let values = &mut chunk[(lo - first_key) as usize * dim..(hi - first_key) as usize * dim];
                if self.read_one_sided(table, range, lo, values) {
                    let read = std::mem::take(&mut self.read_stamp);
                    self.pending(number).expect("just made").meet(&read);
                    self.read_stamp = read;
                } else {
                    left.push((range, Keys::Range(lo, hi)));
                }
            }
            let unplaced = self.place_parts(&left, Listed::NONE, |k| (k - start) as usize, 0, &mut parts);
            self.send_pull_parts(table, number, unplaced, &mut parts);
        }
        self.spans = pieces;
        self.pull_started(number, started, left, parts)
    }

    /// Starts a pull of the values of `keys` (`dim` per key, into an output of as many values
    /// as [`finish_pull`](Self::finish_pull) is given), each range from its chain's tail: one
    /// request for the keys of all the ranges a server's shard is tail of, every tail at once.
    pub fn start_pull_keys(&mut self, route: &Arc<Route>, keys: &[u64], out: &mut [f32]) -> Result<u64> {
        let table = ChainTable::of(route);
        let dim = table.spec.dim as usize;
        debug_assert_eq!(out.len(), keys.len() * dim);
        self.refresh_if_old();
        let per_pull = self.keys_per_frame(dim, Carries::Reply).min(self.keys_per_frame(dim, Carries::Keys));
        let number = self.new_pull(route, Again::Keys);
        self.pending(number).expect("just made").keys.extend_from_slice(keys);
        let mut left = std::mem::take(&mut self.pulls_left);
        let mut parts = std::mem::take(&mut self.pull_parts);
        let mut started = Ok(());
        for (i, chunk) in keys.chunks(per_pull).enumerate() {
            // A key the table has not fails the call; what went out before it only reads.
            let groups = match self.group_keys(table, chunk) {
                Ok(groups) => groups,
                Err(e) => {
                    started = Err(e);
                    break;
                }
            };
            left.clear();
            left.extend(groups.iter().map(|(range, _)| (range, Keys::Listed)));
            let unplaced = self.place_parts(&left, Listed { keys: chunk, groups: &groups }, |_| 0, (i * per_pull) as u32, &mut parts);
            self.groups = groups;
            self.send_pull_parts(table, number, unplaced, &mut parts);
        }
        self.pull_started(number, started, left, parts)
    }

    /// Pull `number`'s number once its requests are sent (`started`), or why it failed (it is
    /// then let go: what it sent only reads). Keeps the buffers the start used.
    fn pull_started(&mut self, number: u64, started: Result<()>, left: Vec<(u32, Keys)>, parts: Vec<PullPart>) -> Result<u64> {
        self.pulls_left = left;
        self.pull_parts = parts;
        if let Err(e) = started {
            self.abandon_pull(number);
            return Err(e);
        }
        Ok(number)
    }

    /// A new pending pull of `route`'s table, made again as `again` should a part fail; its
    /// number.
    fn new_pull(&mut self, route: &Arc<Route>, again: Again) -> u64 {
        self.pulls_started += 1;
        let mut pull = self.spare_pulls.pop().unwrap_or_default();
        pull.number = self.pulls_started;
        pull.route = Some(route.clone());
        pull.again = again;
        self.pulls.push(pull);
        self.pulls_started
    }

    /// The pending pull numbered `number`, if its ticket still waits for it.
    fn pending(&mut self, number: u64) -> Option<&mut PendingPull> {
        self.pulls.iter_mut().find(|p| p.number == number)
    }

    /// Sends the requests of `parts` as pull `number`'s, leaving them in flight (`parts` is left
    /// empty). A part that cannot be sent, or a range with no tail (`unplaced`), fails the
    /// pull's first try: finishing it then makes the whole pull again, waiting.
    fn send_pull_parts(&mut self, table: ChainTable<'_>, number: u64, unplaced: Option<u32>, parts: &mut Vec<PullPart>) {
        if let Some(range) = unplaced {
            let pull = self.pending(number).expect("started");
            pull.failed.get_or_insert(ClientError::Unavailable { reason: format!("range {range} has no tail") });
        }
        for mut part in parts.drain(..) {
            let mut call = self.part_request(table, &mut part);
            if self.in_flight.len() >= IN_FLIGHT_MAX {
                self.collect_oldest();
            }
            if self.links.get(&call.to).is_some_and(|l| !l.caller.can_start_len(call.len())) {
                self.collect_in_flight();
            }
            let started = self.start(&mut call);
            if part.range.is_none() {
                // The request's body (the listed keys) serves the part's next use.
                part.keys = call.body;
            }
            match started {
                Ok(started) => {
                    self.pending(number).expect("started").due += 1;
                    self.in_flight.push_back(InFlight::Pull { pull: number, part, started });
                }
                Err(e) => {
                    self.pending(number).expect("started").failed.get_or_insert(e);
                    self.spare_parts.push(part.cleared());
                }
            }
        }
    }

    /// Keeps the reply to a part of pull `number` for its ticket; lets it go if the ticket was
    /// dropped.
    fn keep_pull_reply(&mut self, number: u64, part: PullPart, replied: Result<Reply>) {
        let Some(at) = self.pulls.iter().position(|p| p.number == number) else {
            self.recycle_part(part, replied);
            return;
        };
        let pull = &mut self.pulls[at];
        pull.due -= 1;
        if !pull.dropped {
            pull.replies.push((part, replied));
            return;
        }
        let done = pull.due == 0;
        self.recycle_part(part, replied);
        if done {
            let pull = self.pulls.swap_remove(at);
            self.recycle_pull(pull);
        }
    }

    /// Keeps a pull part's buffers, and its reply's, for the next pulls.
    fn recycle_part(&mut self, part: PullPart, replied: Result<Reply>) {
        if let Ok((_, body)) = replied {
            self.spare_replies.keep(body);
        }
        self.spare_parts.push(part.cleared());
    }

    /// Keeps a finished or dropped pull's buffers for the next pulls.
    fn recycle_pull(&mut self, mut pull: PendingPull) {
        for (part, replied) in pull.replies.drain(..) {
            self.recycle_part(part, replied);
        }
        self.spare_pulls.push(pull.cleared());
    }

    /// Whether pull `number`'s replies are all in (finishing it would not wait for a server),
    /// taking the replies of the requests in flight before them until `deadline`.
    pub fn pull_arrived(&mut self, number: u64, deadline: Instant) -> bool {
        while self.pending(number).is_some_and(|p| p.due > 0) {
            if !self.collect_for_pull(number, Some(deadline)) {
                return false;
            }
        }
        true
    }

    /// Lets pull `number` go (its ticket was dropped): its replies are let go as they come,
    /// and nothing is written anywhere.
    pub fn abandon_pull(&mut self, number: u64) {
        let Some(at) = self.pulls.iter().position(|p| p.number == number) else { return };
        if self.pulls[at].due > 0 {
            self.pulls[at].dropped = true;
        } else {
            let pull = self.pulls.swap_remove(at);
            self.recycle_pull(pull);
        }
    }

    /// Waits for pull `number`'s replies and writes their values into `out`, the output its
    /// call was given; returns the stamp of everything it read. When a part failed (its tail
    /// failed, or left its chain), the whole pull is made again and waited for, asking again
    /// after fetching the configuration, until [`CALL_TIMEOUT`].
    pub fn finish_pull(&mut self, number: u64, out: &mut [f32]) -> Result<Stamp> {
        while self.pending(number).is_some_and(|p| p.due > 0) && self.collect_for_pull(number, None) {}
        let Some(at) = self.pulls.iter().position(|p| p.number == number) else {
            return Err(ClientError::Config { reason: format!("pull {number} is not this client's, or was finished already") });
        };
        let mut pull = self.pulls.swap_remove(at);
        let route = pull.route.take().expect("set when started");
        let table = ChainTable::of(&route);
        let dim = table.spec.dim as usize;
        let mut failure = pull.failed.take();
        let (mut stamp, mut first) = (std::mem::take(&mut pull.stamp), !pull.met);
        let mut replies = std::mem::take(&mut pull.replies);
        for (part, replied) in replies.drain(..) {
            if let Err(e) = self.place_reply(dim, &part, replied, out, &mut stamp, &mut first) {
                failure.get_or_insert(e);
            }
            self.spare_parts.push(part.cleared());
        }
        pull.replies = replies;
        let finished = match failure {
            None => Ok(stamp),
            Some(e) if matches!(&e, ClientError::Server { status, .. } if status.never_applies()) => Err(e),
            Some(e @ ClientError::OutcomeUnknown { .. }) => Err(e),
            Some(_) => {
                self.stats.pull_retries += 1;
                match pull.again {
                    Again::Range(start) => self.pull_range_now(table, start, out),
                    Again::Keys => self.pull_keys_now(table, &pull.keys, out),
                }
            }
        };
        self.spare_pulls.push(pull.cleared());
        finished
    }

    /// Pulls the dense keys from `start` into `out` and waits for them: each range from its
    /// chain's tail, every tail at once, asking again for what failed.
    fn pull_range_now(&mut self, table: ChainTable<'_>, start: u64, out: &mut [f32]) -> Result<Stamp> {
        let dim = table.spec.dim as usize;
        let per_pull = self.keys_per_frame(dim, Carries::Reply);
        let mut stamp = Stamp::default();
        for (i, part) in out.chunks_mut(per_pull * dim).enumerate() {
            let got = self.pull_range_in_frame(table, start + (i * per_pull) as u64, part)?;
            stamp.meet(got.clocks().iter().copied(), i == 0);
        }
        Ok(stamp)
    }

    /// [`pull_range_now`](Self::pull_range_now) of a call whose pieces' replies each fit one
    /// frame.
    fn pull_range_in_frame(&mut self, table: ChainTable<'_>, start: u64, out: &mut [f32]) -> Result<Stamp> {
        let dim = table.spec.dim as usize;
        let mut pieces = std::mem::take(&mut self.spans);
        if let Err(e) = self.pieces(table, start, (out.len() / dim) as u64, &mut pieces) {
            self.spans = pieces;
            return Err(e);
        }
        self.refresh_if_old();
        let mut stamp = Stamp::default();
        let mut first = true;
        let mut left = std::mem::take(&mut self.pulls_left);
        left.clear();
        for &(range, lo, hi) in &pieces {
            let values = &mut out[(lo - start) as usize * dim..(hi - start) as usize * dim];
            if self.read_one_sided(table, range, lo, values) {
                stamp.meet(self.read_stamp.iter().copied(), first);
                first = false;
            } else {
                left.push((range, Keys::Range(lo, hi)));
            }
        }
        self.spans = pieces;
        if left.is_empty() {
            self.pulls_left = left;
            return Ok(stamp);
        }
        let rest = self.pull_ranges(table, left, Listed::NONE, |k| (k - start) as usize, out)?;
        stamp.meet(rest.clocks().iter().copied(), first);
        Ok(stamp)
    }

    /// Pulls the values of `keys` into `out` (`dim` per key) and waits for them: each range
    /// from its chain's tail, one request for the keys of all the ranges a server's shard is
    /// tail of, every tail at once, asking again for what failed.
    fn pull_keys_now(&mut self, table: ChainTable<'_>, keys: &[u64], out: &mut [f32]) -> Result<Stamp> {
        let dim = table.spec.dim as usize;
        let per_pull = self.keys_per_frame(dim, Carries::Reply).min(self.keys_per_frame(dim, Carries::Keys));
        let mut stamp = Stamp::default();
        for (i, (keys, out)) in keys.chunks(per_pull).zip(out.chunks_mut(per_pull * dim)).enumerate() {
            let groups = self.group_keys(table, keys)?;
            let mut left = std::mem::take(&mut self.pulls_left);
            left.clear();
            left.extend(groups.iter().map(|(range, _)| (range, Keys::Listed)));
            let pulled = self.pull_ranges(table, left, Listed { keys, groups: &groups }, |_| 0, out);
            self.groups = groups;
            stamp.meet(pulled?.clocks().iter().copied(), i == 0);
        }
        Ok(stamp)
    }

    /// Pulls the keys of each range in `left` (in ascending order) from its tail into `out`,
    /// asking again (after fetching the configuration) for the ranges whose tail failed, until
    /// [`CALL_TIMEOUT`]. `row_of` places a dense key's values in `out`; listed keys are
    /// `listed`'s, each range's in its group, and their rows are their places there.
    fn pull_ranges(
        &mut self,
        table: ChainTable<'_>,
        mut left: Vec<(u32, Keys)>,
        listed: Listed<'_>,
        row_of: impl Fn(u64) -> usize,
        out: &mut [f32],
    ) -> Result<Stamp> {
        let dim = table.spec.dim as usize;
        let mut stamp = Stamp::default();
        let mut first = true;
        let began = Instant::now();
        // A standalone server has no other member to read from: it answers within the
        // reconnection attempts or the pull fails.
        let deadline = began + self.patience();
        self.refresh_if_old();
        let mut parts = std::mem::take(&mut self.pull_parts);
        let mut calls = std::mem::take(&mut self.calls);
        let mut replies = std::mem::take(&mut self.replies);
        let pulled = loop {
            let unplaced = self.place_parts(&left, listed, &row_of, 0, &mut parts);
            calls.clear();
            for part in &mut parts {
                let call = self.part_request(table, part);
                calls.push(call);
            }
            let mut failure = unplaced.map(|r| ClientError::Unavailable { reason: format!("range {r} has no tail") });
            self.call_all(&mut calls, &mut replies);
            for ((mut part, call), replied) in parts.drain(..).zip(calls.iter_mut()).zip(replies.drain(..)) {
                if part.range.is_none() {
                    // The request's body (the listed keys) serves the part's next use.
                    part.keys = std::mem::take(&mut call.body);
                }
                match self.place_reply(dim, &part, replied, out, &mut stamp, &mut first) {
                    Ok(()) => left.retain(|(r, _)| !part.ranges.contains(r)),
                    Err(e) => failure = Some(e),
                }
                self.spare_parts.push(part.cleared());
            }
            let Some(e) = failure else { break Ok(stamp) };
            if matches!(e, ClientError::OutcomeUnknown { .. }) || matches!(&e, ClientError::Server { status, .. } if status.never_applies()) {
                break Err(e);
            }
            if Instant::now() > deadline {
                break Err(match self.alone {
                    true => ClientError::OutcomeUnknown {
                        server: self.seeds.join(", "),
                        reason: format!("the standalone server did not answer for {:?}: {e}", began.elapsed()),
                    },
                    false => e,
                });
            }
            self.stats.pull_retries += 1;
            if !matches!(&e, ClientError::Server { status: Status::KeysUnknown, .. }) {
                // (A shard that lost a key list is asked again at once, with the keys.)
                self.pause(Duration::from_millis(20));
                self.refresh();
            }
        };
        calls.clear();
        left.clear();
        self.pull_parts = parts;
        self.calls = calls;
        self.replies = replies;
        self.pulls_left = left;
        pulled
    }

    /// Adds the keys of each range in `left` to the request to its tail's shard in `parts`: one
    /// per dense range piece (its rows in the output from `row_of` its first key), one per tail
    /// shard for listed keys (their rows `row_base` on from their places in `listed`). Returns
    /// a range whose tail the configuration held does not name, if any: its keys are in no part.
    fn place_parts(
        &mut self,
        left: &[(u32, Keys)],
        listed: Listed<'_>,
        row_of: impl Fn(u64) -> usize,
        row_base: u32,
        parts: &mut Vec<PullPart>,
    ) -> Option<u32> {
        let mut unplaced = None;
        for (range, keys) in left {
            let range = *range;
            let Some(tail) = self.pusher.view.chain(RangeId(range)).and_then(|c| c.tail()) else {
                unplaced = Some(range);
                continue;
            };
            let shard = shard_of_range(range, self.ranges, self.shards);
            let piece = match keys {
                Keys::Range(..) => range,
                Keys::Listed => u32::MAX,
            };
            let at = match parts.iter().position(|p: &PullPart| p.to == (tail, shard, piece)) {
                Some(at) => at,
                None => {
                    // Listed keys take the kept part with the most room for them, a dense
                    // piece the one with the least.
                    let room = |p: &PullPart| p.keys.capacity();
                    let kept = match keys {
                        Keys::Listed => self.spare_parts.iter().enumerate().max_by_key(|(_, p)| room(p)),
                        Keys::Range(..) => self.spare_parts.iter().enumerate().min_by_key(|(_, p)| room(p)),
                    };
                    let mut part = kept.map(|(at, _)| at).map(|at| self.spare_parts.swap_remove(at)).unwrap_or_default();
                    part.to = (tail, shard, piece);
                    parts.push(part);
                    parts.len() - 1
                }
            };
            let part = &mut parts[at];
            part.ranges.push(range);
            match keys {
                Keys::Range(lo, hi) => {
                    part.range = Some((*lo, *hi));
                    part.first_row = row_of(*lo);
                }
                Keys::Listed => {
                    let at = listed.groups.positions(range).unwrap_or(&[]);
                    match listed.groups.run_of(range) {
                        Some(run) => extend_le_u64(&mut part.keys, &listed.keys[run]),
                        None => at.iter().for_each(|i| part.keys.extend_from_slice(&listed.keys[*i as usize].to_le_bytes())),
                    }
                    part.listed_rows.extend(at.iter().map(|row| row + row_base));
                }
            }
        }
        parts.retain_mut(|part| {
            let known = self.pusher.view.member(part.to.0).is_some();
            if !known {
                unplaced = part.ranges.first().copied();
                self.spare_parts.push(std::mem::take(part).cleared());
            }
            known
        });
        unplaced
    }

    /// The request that pulls `part` from its tail (a listed part's keys move into its body).
    fn part_request(&self, table: ChainTable<'_>, part: &mut PullPart) -> Outgoing {
        let (tail, shard, _) = part.to;
        let mut header = Header::request(if part.range.is_some() { Op::PullRange } else { Op::Pull }, 0);
        header.table = table.id;
        header.dim = table.spec.dim;
        header.worker = self.worker;
        let body = match part.range {
            Some((lo, hi)) => {
                header.start = lo;
                header.count = (hi - lo) as u32;
                Vec::new()
            }
            None => {
                header.count = part.rows() as u32;
                std::mem::take(&mut part.keys)
            }
        };
        let lane = self.pull_lane(&part.ranges);
        Outgoing { to: LinkKey { node: tail, shard, lane }, header, body, uncopied: Uncopied::default(), defer: false }
    }

    /// Puts the values of the reply to `part` where its rows say in `out`, and meets its stamp
    /// into `stamp` (`first`: nothing met yet). The reply's body is kept for the next replies.
    fn place_reply(&mut self, dim: usize, part: &PullPart, replied: Result<Reply>, out: &mut [f32], stamp: &mut Stamp, first: &mut bool) -> Result<()> {
        let values = part.rows() * dim * 4;
        let (header, body) = replied?;
        if body.len() != values + header.count as usize * 8 {
            let reason = format!("a pull reply of {} bytes for a {}-clock stamp and {values} bytes of values", body.len(), header.count);
            return Err(ClientError::Protocol { server: self.addr_of(part.to.0), reason });
        }
        let clocks = body[..header.count as usize * 8].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
        stamp.meet(clocks, *first);
        *first = false;
        let bytes = &body[body.len() - values..];
        match part.range {
            // A dense piece's rows follow one another: one block.
            Some(_) => copy_le_f32(bytes, &mut out[part.first_row * dim..part.first_row * dim + values / 4]),
            None => match RangeGroups::run(&part.listed_rows) {
                // Rows that follow one another (sorted keys): one block.
                Some(rows) => copy_le_f32(bytes, &mut out[rows.start * dim..rows.end * dim]),
                None => {
                    for (row, v) in part.listed_rows.iter().map(|r| *r as usize).zip(bytes.chunks_exact(dim * 4)) {
                        copy_le_f32(v, &mut out[row * dim..(row + 1) * dim]);
                    }
                }
            },
        }
        self.spare_replies.keep(body);
        Ok(())
    }

    /// Reads dense keys `[lo, lo + values.len() / dim)` of `range` into `values` straight from
    /// the memory of the range's tail (RDMA READs, torn copies read again), leaving their stamp
    /// in `read_stamp`; false, with nothing read, when the link to the tail cannot (TCP, or the
    /// tail exposes no such part yet) or failed: the piece is then pulled with a request, which
    /// retries and reports. A tail that left the chain has stopped exposing the range's part;
    /// a read that raced with that fails, and takes the link down with it.
    fn read_one_sided(&mut self, table: ChainTable<'_>, range: u32, lo: u64, values: &mut [f32]) -> bool {
        if matches!(self.dialer.chosen, Chosen::Tcp) {
            return false;
        }
        let Some((node, shard)) = self.tail_of(range) else { return false };
        self.flush_deferred();
        let key = LinkKey { node, shard, lane: Lane::Pull };
        let mut stamp = std::mem::take(&mut self.read_stamp);
        let read = match self.link(key) {
            Ok(link) => link.caller.one_sided().map(|o| o.read_dense(table.id, lo, table.spec.dim, values, &mut stamp)),
            Err(_) => None,
        };
        self.read_stamp = stamp;
        match read.unwrap_or(Ok(false)) {
            Ok(read) => {
                if read {
                    self.stats.one_sided_reads += 1;
                    self.stats.bytes_received += (values.len() * 4) as u64;
                }
                read
            }
            Err(e) => {
                tracing::debug!(node = node.0, error = %e, "a one-sided read failed; the link is dropped and the piece pulled");
                self.links.remove(&key);
                self.link_lost = e.to_string();
                false
            }
        }
    }

    /// Block copies one-sided reads found torn and read again, over the links open now.
    pub fn torn_reads(&self) -> u64 {
        self.links.values().map(|l| l.caller.torn_reads()).sum()
    }

    /// The lane a pull of `ranges` (all on one server shard) takes: the push lane when each is
    /// on a chain of one, whose push replies the shard does not hold for a successor, so the
    /// pull and the pushes before it go in one exchange on one link, their replies together;
    /// else a lane of its own, not queued behind a push a head holds for its tail.
    fn pull_lane(&self, ranges: &[u32]) -> Lane {
        let alone = |r: &u32| self.pusher.view.chain(RangeId(*r)).is_some_and(|c| c.nodes.len() == 1);
        if ranges.iter().all(alone) {
            Lane::Push
        } else {
            Lane::Pull
        }
    }

    /// The server shard that is `range`'s head, where its pushes go.
    fn head_of(&self, range: u32) -> Option<(NodeId, u16)> {
        let head = self.pusher.view.chain(RangeId(range))?.head()?;
        self.pusher.view.member(head)?;
        Some((head, shard_of_range(range, self.ranges, self.shards)))
    }

    /// The server shard that is `range`'s tail, where its pulls go.
    fn tail_of(&self, range: u32) -> Option<(NodeId, u16)> {
        let tail = self.pusher.view.chain(RangeId(range))?.tail()?;
        self.pusher.view.member(tail)?;
        Some((tail, shard_of_range(range, self.ranges, self.shards)))
    }
}

impl Drop for Chain {
    /// Pushes deferred go now: a client let go without waiting still sends what it started.
    fn drop(&mut self) {
        self.flush_deferred();
    }
}

/// One request of a pull: a dense range piece, or the listed keys of the ranges one server
/// shard is tail of; and the rows of the output its values go to.
#[derive(Debug, Default)]
struct PullPart {
    /// The tail's server and shard, and the range of a dense piece (`u32::MAX` for listed keys).
    to: (NodeId, u16, u32),
    ranges: Vec<u32>,
    /// A dense piece's keys, whose values go to the output's rows from `first_row` on.
    range: Option<(u64, u64)>,
    first_row: usize,
    /// The listed keys' bytes: the request's body; and their rows, in order.
    keys: Vec<u8>,
    listed_rows: Vec<u32>,
}

impl PullPart {
    /// This part emptied for its next use, its buffers kept.
    fn cleared(mut self) -> Self {
        self.ranges.clear();
        self.range = None;
        self.first_row = 0;
        self.keys.clear();
        self.listed_rows.clear();
        self
    }

    /// Rows of values the reply carries.
    fn rows(&self) -> usize {
        match self.range {
            Some((lo, hi)) => (hi - lo) as usize,
            None => self.listed_rows.len(),
        }
    }
}

/// The listed keys of a pull, and their groups by range.
#[derive(Clone, Copy)]
struct Listed<'k> {
    keys: &'k [u64],
    groups: &'k RangeGroups,
}

impl Listed<'static> {
    /// No listed keys: a dense pull's.
    const NONE: Listed<'static> = Listed { keys: &[], groups: &RangeGroups::EMPTY };
}

/// Positions of keys grouped by replication range, in ascending range order: a counting sort
/// whose buffers a client keeps, so grouping a batch allocates nothing once warm.
#[derive(Debug, Default)]
pub(crate) struct RangeGroups {
    /// Per range: where its positions start in `order` (the last entry is the end).
    starts: Vec<u32>,
    /// Each key's range, then the keys' positions grouped by range.
    of_key: Vec<u32>,
    order: Vec<u32>,
    /// Whether `order` is the keys' own order (they came sorted), so that each range's
    /// positions are one run.
    in_order: bool,
}

impl RangeGroups {
    const EMPTY: RangeGroups = RangeGroups { starts: Vec::new(), of_key: Vec::new(), order: Vec::new(), in_order: false };

    /// Groups `keys` (each inside `spec`) by their range of `ranges`.
    fn group(&mut self, spec: &TableSpec, ranges: u32, keys: &[u64]) {
        self.in_order = keys.is_sorted();
        if self.in_order {
            // Sorted keys are grouped already: each range's keys are one run, in range order.
            self.starts.clear();
            self.starts.resize(ranges as usize + 1, 0);
            for (range, run) in range_runs(spec, ranges, keys) {
                self.starts[range as usize + 1] = run.end as u32;
            }
            for r in 1..=ranges as usize {
                self.starts[r] = self.starts[r].max(self.starts[r - 1]);
            }
            self.order.clear();
            self.order.extend(0..keys.len() as u32);
            return;
        }
        self.starts.clear();
        self.starts.resize(ranges as usize + 1, 0);
        self.of_key.clear();
        self.of_key.extend(ranges_of(spec, ranges, keys));
        for r in &self.of_key {
            self.starts[*r as usize + 1] += 1;
        }
        for r in 0..ranges as usize {
            self.starts[r + 1] += self.starts[r];
        }
        self.order.clear();
        self.order.resize(keys.len(), 0);
        // Each range's next free place; the starts are put back by walking the ranges after.
        for (i, r) in self.of_key.iter().enumerate() {
            let at = &mut self.starts[*r as usize];
            self.order[*at as usize] = i as u32;
            *at += 1;
        }
        for r in (1..=ranges as usize).rev() {
            self.starts[r] = self.starts[r - 1];
        }
        if let Some(first) = self.starts.first_mut() {
            *first = 0;
        }
    }

    /// The positions of range `range`'s keys, in the order they came; `None` if it has none.
    fn positions(&self, range: u32) -> Option<&[u32]> {
        let (lo, hi) = (*self.starts.get(range as usize)?, *self.starts.get(range as usize + 1)?);
        (hi > lo).then(|| &self.order[lo as usize..hi as usize])
    }

    /// Range `range`'s positions as one run, when each follows the one before it: always for
    /// keys that came sorted, else found by looking.
    fn run_of(&self, range: u32) -> Option<Range<usize>> {
        match self.in_order {
            true => self.positions(range).map(|at| at[0] as usize..at[0] as usize + at.len()),
            false => Self::run(self.positions(range)?),
        }
    }

    /// The positions `at` as one run `first..last + 1`, when each follows the one before it.
    fn run(at: &[u32]) -> Option<Range<usize>> {
        let (first, last) = (*at.first()? as usize, *at.last()? as usize);
        let follow = last.checked_sub(first) == Some(at.len() - 1) && at.windows(2).all(|w| w[1] == w[0].wrapping_add(1));
        follow.then_some(first..last + 1)
    }

    /// Each range with keys, in order, with their positions.
    fn iter(&self) -> impl Iterator<Item = (u32, &[u32])> + '_ {
        (0..self.starts.len().saturating_sub(1) as u32).filter_map(|r| Some((r, self.positions(r)?)))
    }
}

/// Appends `keys` to `out` as little-endian bytes: one copy on a little-endian machine.
fn extend_le_u64(out: &mut Vec<u8>, keys: &[u64]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(keys));
    } else {
        keys.iter().for_each(|k| out.extend_from_slice(&k.to_le_bytes()));
    }
}

/// A request [`Chain::call_all`] sends.
#[derive(Debug)]
struct Outgoing {
    to: LinkKey,
    header: Header,
    body: Vec<u8>,
    /// Payloads sent from where they lie, between parts of `body`.
    uncopied: Uncopied,
    /// Sent with the link's next request, or before the client next waits
    /// ([`Caller::start_deferred`]): a push not waited for at once.
    defer: bool,
}

impl Outgoing {
    /// The request's body bytes as sent.
    fn len(&self) -> usize {
        self.body.len() + self.uncopied.bytes()
    }
}

/// A reply's header and body.
type Reply = (Header, Vec<u8>);

/// A `WorkerPush` frame to send: to which server shard, its body, the pushes in it (none in a
/// poll), and whether they are sent for the first time.
#[derive(Debug)]
struct Frame {
    at: (NodeId, u16),
    body: Vec<u8>,
    /// Large payloads of the frame's pushes, sent from where they lie, not copied into `body`.
    uncopied: Uncopied,
    pieces: Vec<(RangeId, u32)>,
    first: bool,
}

impl Frame {
    /// The frame's body bytes as sent: `body` and the payloads sent from where they lie.
    fn len(&self) -> usize {
        self.body.len() + self.uncopied.bytes()
    }

    /// Appends `msg` to the batch. A push's payload larger than [`COPIED_PAYLOAD_MAX`] is sent
    /// from where it lies while the frame has room for one more such; the bytes sent are the
    /// same either way, bulk aligned where it lands ([`codec::encode_batch_after`]).
    fn encode(&mut self, msg: &Msg) {
        let elsewhere = self.uncopied.bytes();
        match msg {
            Msg::Push { payload, .. } if sent_in_place(msg) && !self.uncopied.is_full() => {
                codec::encode_batch_head(msg, &mut self.body, elsewhere);
                self.uncopied.push(self.body.len(), payload.clone());
            }
            _ => codec::encode_batch_after([msg], &mut self.body, elsewhere),
        }
    }
}

/// Whether `msg` is a push whose payload a request sends from where it lies
/// ([`COPIED_PAYLOAD_MAX`]), not copied into its body.
fn sent_in_place(msg: &Msg) -> bool {
    matches!(msg, Msg::Push { payload, .. } if payload.len() > COPIED_PAYLOAD_MAX)
}

/// Payloads larger than [`COPIED_PAYLOAD_MAX`] that a request sends from where they lie (the
/// payload the client keeps for resends): each goes at its offset in the request's body, so
/// the body holds everything else. Copying a 4 MiB payload into the body cost a push a tenth
/// of its time.
#[derive(Debug, Default)]
struct Uncopied {
    cuts: [(usize, Payload); UNCOPIED_PER_FRAME_MAX],
    len: usize,
}

impl Uncopied {
    fn is_full(&self) -> bool {
        self.len == UNCOPIED_PER_FRAME_MAX
    }

    /// The payload bytes it holds.
    fn bytes(&self) -> usize {
        self.cuts[..self.len].iter().map(|(_, p)| p.len()).sum()
    }

    /// Adds `payload`, to go at offset `at` of the body.
    fn push(&mut self, at: usize, payload: Payload) {
        self.cuts[self.len] = (at, payload);
        self.len += 1;
    }

    /// `body` with the payloads put in at their offsets, as parts to send one after the other.
    fn parts<'a>(&'a self, body: &'a [u8], parts: &'a mut [&'a [u8]; SEND_PARTS_MAX]) -> &'a [&'a [u8]] {
        let (mut count, mut from) = (0, 0);
        for (cut, payload) in &self.cuts[..self.len] {
            (parts[count], parts[count + 1]) = (&body[from..*cut], payload);
            (count, from) = (count + 2, *cut);
        }
        parts[count] = &body[from..];
        &parts[..count + 1]
    }
}

/// What a sent `WorkerPush` frame carried, for its reply.
#[derive(Debug)]
struct Sent {
    /// The server shard it went to.
    to: (NodeId, u16),
    pieces: Vec<(RangeId, u32)>,
    first: bool,
    /// The push whose first frame this is (0: resends and polls), for its stamp.
    push: u64,
}

/// The stamp of one push, met from its heads' answers as they come ([`Chain::push_stamp`]).
#[derive(Debug)]
struct PushStamp {
    push: u64,
    /// The first push of the call this one ends (itself, unless the call was cut into several).
    first: u64,
    stamp: Stamp,
    /// Whether an answer has been met into `stamp` yet.
    met: bool,
    /// Whether every frame of the push came back with a stamp.
    whole: bool,
}

/// What a frame of a call carries per key ([`keys_fitting`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Carries {
    /// A dense push's values.
    Values,
    /// A push's keys and their values.
    KeysAndValues,
    /// A pull's keys.
    Keys,
    /// A pull reply's values.
    Reply,
}

/// Most keys of `dim` values a frame body of `room` bytes carries as `what` (at least one: a
/// larger one is the server's to refuse); a reply keeps room for a stamp of `stamp_clocks`
/// clocks beside its values. A call of more keys is cut into frames of this many.
pub(crate) fn keys_fitting(room: usize, stamp_clocks: usize, dim: usize, what: Carries) -> usize {
    let n = match what {
        Carries::Values => room / (4 * dim),
        Carries::KeysAndValues => room / (8 + 4 * dim),
        Carries::Keys => room / 8,
        Carries::Reply => room.saturating_sub(8 * stamp_clocks) / (4 * dim),
    };
    n.max(1)
}

/// A request in flight ([`Chain::in_flight`]).
#[derive(Debug)]
enum InFlight {
    /// A `WorkerPush` frame, its acknowledgements taken from its reply.
    Push(Sent, Started),
    /// A part of pull number `pull`, its reply kept for the pull's ticket.
    Pull { pull: u64, part: PullPart, started: Started },
}

impl InFlight {
    fn started(&self) -> Started {
        match self {
            InFlight::Push(_, started) | InFlight::Pull { started, .. } => *started,
        }
    }
}

/// How a pull whose first try failed in part is made again: a dense pull from its first key,
/// or a pull of its listed keys ([`PendingPull::keys`]).
#[derive(Debug, Clone, Copy, Default)]
enum Again {
    #[default]
    Keys,
    Range(u64),
}

/// A pull started and not finished: its requests in flight, the replies come in, and what it
/// takes to put their values in place and to make the pull again.
#[derive(Debug, Default)]
struct PendingPull {
    number: u64,
    route: Option<Arc<Route>>,
    again: Again,
    /// The listed keys of a pull of keys, to make it again.
    keys: Vec<u64>,
    /// Requests in flight.
    due: usize,
    /// The replies taken, each with its part.
    replies: Vec<(PullPart, Result<Reply>)>,
    /// Why a part could not be sent.
    failed: Option<ClientError>,
    /// The stamp of the values read one-sidedly when the pull started, and whether any were.
    stamp: Stamp,
    met: bool,
    /// Its ticket was dropped: its replies are let go as they come.
    dropped: bool,
}

impl PendingPull {
    /// Meets the stamp of values read into this pull's.
    fn meet(&mut self, clocks: &[u64]) {
        self.stamp.meet(clocks.iter().copied(), !self.met);
        self.met = true;
    }

    /// This pull emptied for its next use, its buffers kept.
    fn cleared(mut self) -> Self {
        debug_assert!(self.replies.is_empty() && self.due == 0);
        self.keys.clear();
        PendingPull { keys: self.keys, replies: self.replies, ..PendingPull::default() }
    }
}

/// A request sent whose reply is still to come.
#[derive(Debug, Clone, Copy)]
struct Started {
    to: LinkKey,
    /// The number the link was made as: a link that broke and was made again has lost this
    /// request's reply, and the new one's replies belong to other requests.
    link: u64,
    sent: usize,
}

/// A link and what goes with it: the number it was made as (see [`Started`]), and the key
/// lists its server shard remembers for it, as far as this side can tell (a new link starts
/// with none, as the shard does for a new connection).
#[derive(Debug)]
struct Linked {
    made: u64,
    /// The address of the server it goes to (a server that moves gets a new link).
    addr: String,
    caller: Caller,
    lists: KeyLists<()>,
}

/// `msg`, a push sent for the first time on a link whose shard remembers `lists`, with its
/// keys sent by their list's hash, or to be remembered (its payload from `payloads`); `None` to
/// send it as it is (not a listed push, or a list too long to cache).
fn with_cached_keys(lists: &mut KeyLists<()>, msg: &Msg, payloads: &mut PayloadPool, stats: &mut ChainStats) -> Option<Msg> {
    let Msg::Push { range, worker, seq, payload } = msg else { return None };
    let (h, keys, _) = PushHeader::parse(payload).ok()?;
    if !h.listed {
        return None;
    }
    let how = match lists.remember_le(keys)? {
        Remembered::Held(hash) => {
            stats.lists_by_hash += 1;
            KeyList::Cached { hash }
        }
        Remembered::New => KeyList::Remember,
    };
    let sent = payloads.make_with(|out| PushHeader::write_with_key_list(payload, how, out));
    Some(Msg::Push { range: *range, worker: *worker, seq: *seq, payload: sent })
}

/// A link: to a server's shard, for pushes or for pulls. Pulls go on links of their own, so a
/// pull is never queued behind a push's reply, which a head holds until the tail holds the
/// push; except a pull of ranges on chains of one (see `Chain::pull_lane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct LinkKey {
    node: NodeId,
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
    /// The range's keys of the pull's [`Listed`] keys.
    Listed,
}

/// The keys of a span of a sparse table, from `start`: a range call on a sparse table is a
/// call on these keys (rare, and small, as on an unreplicated server).
fn sparse_span(table: ChainTable<'_>, start: u64, count: usize) -> Result<Vec<u64>> {
    let spec = table.spec;
    let end = start.checked_add(count as u64).filter(|e| start >= spec.start && *e <= spec.end);
    let Some(end) = end else {
        return Err(ClientError::KeyOutOfRange { table: spec.name.clone(), key: start, start: spec.start, end: spec.end });
    };
    Ok((start..end).collect())
}

/// A refusal by `addr` as the server's error; other failures as they are.
fn in_server(addr: &str, e: TransportError) -> ClientError {
    match e {
        TransportError::Refused { status, reason } => ClientError::Server { server: addr.to_string(), status, message: reason },
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_layout::placement::range_of;

    /// A frame whose large payloads are sent from where they lie sends the very bytes the
    /// copied batch would be, bulk aligned: small and large pushes mixed, more large ones than
    /// a frame sends uncopied (the rest are copied), and an acknowledgement awaited after them.
    #[test]
    fn a_frame_with_uncopied_payloads_sends_the_bytes_of_the_copied_batch() {
        let push = |seq: u32, len: usize| Msg::Push {
            range: RangeId(seq),
            worker: WorkerId(1),
            seq,
            payload: Payload::from((0..len).map(|i| (i * 7 + len) as u8).collect::<Vec<u8>>()),
        };
        let big = COPIED_PAYLOAD_MAX + 3;
        let mut msgs = vec![push(1, 5), push(2, big), push(3, 13), push(4, big + 1)];
        msgs.extend((5..5 + UNCOPIED_PER_FRAME_MAX as u32).map(|seq| push(seq, big)));
        msgs.push(Msg::PushAck { range: RangeId(9), seq: 9 });
        let mut frame = Frame { at: (NodeId(1), 0), body: Vec::new(), uncopied: Uncopied::default(), pieces: Vec::new(), first: true };
        for msg in &msgs {
            frame.encode(msg);
        }
        assert!(frame.uncopied.is_full(), "{} payloads sent uncopied", frame.uncopied.len);
        let mut parts = [&[][..]; SEND_PARTS_MAX];
        let sent: Vec<u8> = frame.uncopied.parts(&frame.body, &mut parts).concat();
        let mut copied = Vec::new();
        codec::encode_batch(&msgs, &mut copied);
        assert_eq!(sent.len(), frame.len());
        assert!(sent == copied, "the parts sent differ from the copied batch");
        assert_eq!(codec::decode_batch(&sent).expect("decodes"), msgs);
    }

    /// Kept bodies stay within both the count and the byte cap, and a taken body is empty.
    #[test]
    fn spare_bodies_hold_no_more_than_their_caps() {
        let mut spare = SpareBodies::default();
        for _ in 0..(SPARE_BODY_BYTES_MAX >> 20) + 4 {
            spare.keep(Vec::with_capacity(1 << 20));
        }
        assert!(spare.bytes <= SPARE_BODY_BYTES_MAX);
        assert_eq!(spare.bytes, spare.bodies.iter().map(Vec::capacity).sum::<usize>());
        let huge = Vec::with_capacity(SPARE_BODY_BYTES_MAX + 1);
        spare.keep(huge);
        assert!(spare.bytes <= SPARE_BODY_BYTES_MAX, "a body past the byte cap is freed");
        for _ in 0..SPARE_BODIES_MAX * 2 {
            spare.keep(Vec::new());
        }
        assert!(spare.bodies.len() <= SPARE_BODIES_MAX);
        let mut body = spare.take();
        assert!(body.is_empty());
        body.extend_from_slice(b"sent");
        spare.keep(body);
        assert!(spare.take().is_empty(), "a kept body comes back cleared");
        while !spare.bodies.is_empty() {
            spare.take();
        }
        assert_eq!(spare.bytes, 0);
    }

    /// The groups hold every key's position once, each under its own range, in the order the
    /// keys came, ranges ascending; and the buffers are reused by the next grouping.
    #[test]
    fn range_groups_partition_the_keys_by_range() {
        let spec = TableSpec::new("t", TableKind::Sparse, 0, u64::MAX, 1);
        let hash = |x: u64| x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut groups = RangeGroups::default();
        let cases = [(0u64, 4u32), (1, 1), (500, 16), (37, 3), (200, 16)];
        // Unsorted keys, and the same keys sorted (grouped without a sort of their own).
        for (n, ranges, sorted) in cases.iter().flat_map(|(n, r)| [(*n, *r, false), (*n, *r, true)]) {
            let mut keys: Vec<u64> = (0..n).map(hash).collect();
            if sorted {
                keys.sort_unstable();
            }
            groups.group(&spec, ranges, &keys);
            let mut seen = vec![false; keys.len()];
            let mut last_range = None;
            for (range, at) in groups.iter() {
                assert!(last_range < Some(range), "ranges ascend");
                last_range = Some(range);
                assert!(at.windows(2).all(|w| w[0] < w[1]), "positions keep the keys' order");
                for i in at {
                    assert_eq!(range_of(&spec, ranges, keys[*i as usize]), range);
                    assert!(!std::mem::replace(&mut seen[*i as usize], true), "position {i} twice");
                }
            }
            assert!(seen.iter().all(|s| *s), "every key is in a group");
            for range in 0..ranges {
                // Knowing the keys came sorted gives the run that looking finds.
                assert_eq!(groups.run_of(range), groups.positions(range).and_then(RangeGroups::run));
            }
            assert!(groups.positions(ranges).is_none());
        }
    }

    /// Positions make one run only when each follows the one before it.
    #[test]
    fn a_run_is_positions_with_no_gap_in_order() {
        assert_eq!(RangeGroups::run(&[3, 4, 5]), Some(3..6));
        assert_eq!(RangeGroups::run(&[7]), Some(7..8));
        assert_eq!(RangeGroups::run(&[]), None);
        assert_eq!(RangeGroups::run(&[3, 5]), None);
        // The right first and last, and the right count, out of order: rows of two ranges
        // interleaved (unsorted keys) must not be taken for one block.
        assert_eq!(RangeGroups::run(&[0, 2, 1, 3]), None);
        assert_eq!(RangeGroups::run(&[5, 4]), None);
    }
}
