//! The client's state behind its lock: links, the range map, and reusable routing buffers.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_layout::catalog::{Catalog, ServerInfo, TableEntry, TableSpec};
use tessera_layout::placement::{Owner, RangeMap, Route};
use tessera_layout::TableKind;
use tessera_transport::tcp::TcpLink;
use tessera_transport::{Chosen, Header, Link, Op, PushBuffer, Status, TransportError, CONTROL_SHARD};

use crate::chain::{keys_fitting, Carries, Chain, ChainTable, ViewFrom};
use crate::error::{ClientError, Result};
use crate::ticket::{server_error, Pushed, Resend, Stamp, Sub, Ticket};
use crate::{Client, ClientConfig, Table};
use tessera_transport::keycache::{key_list_hash, KeyLists, Remembered};
use tessera_transport::wire::flags;

/// Push or pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Push,
    Pull,
}

/// A reply that arrived while the caller waited for another one.
#[derive(Debug)]
struct Parked {
    header: Header,
    body: Vec<u8>,
}

/// One ordered stream of requests to one shard.
#[derive(Debug)]
struct Shard {
    link: Box<dyn Link>,
    next_id: u64,
    parked: BTreeMap<u64, Parked>,
    abandoned: BTreeSet<u64>,
    /// Requests sent whose replies have not been received yet.
    outstanding: u64,
    /// The key lists the shard remembers for this link, as far as this side can tell.
    lists: KeyLists<()>,
    /// Requests below this id were in flight on a connection that broke: their replies never
    /// come, and their tickets report [`ClientError::OutcomeUnknown`]. Ids go on counting across
    /// reconnections, so an old ticket is never matched with a new connection's reply.
    lost_below: u64,
}

impl Shard {
    /// Receives one reply and parks it for its ticket; returns the bytes received.
    fn receive_one(&mut self, addr: &str) -> Result<u64> {
        let Shard { link, next_id, parked, abandoned, outstanding, .. } = self;
        let frame = link.recv(None)?;
        *outstanding = outstanding.saturating_sub(1);
        park(addr, *next_id, parked, abandoned, &frame.header, frame.body)?;
        Ok(frame.header.frame_len() as u64)
    }
}

/// Keeps a reply that no one is waiting for yet (a copy: the frame lives in the link's buffer),
/// unless its ticket was dropped.
fn park(addr: &str, next_id: u64, parked: &mut BTreeMap<u64, Parked>, abandoned: &mut BTreeSet<u64>, header: &Header, body: &[u8]) -> Result<()> {
    let rid = header.request_id;
    if rid >= next_id {
        let reason = format!("reply to request {rid}, which was never sent");
        return Err(ClientError::Protocol { server: addr.to_string(), reason });
    }
    if !abandoned.remove(&rid) {
        parked.insert(rid, Parked { header: *header, body: body.to_vec() });
    }
    Ok(())
}

#[derive(Debug)]
struct ServerLinks {
    addr: String,
    control: TcpLink,
    shards: Vec<Shard>,
    /// The longest stamp a reply can carry.
    workers_max: u32,
    /// Set when a connection to the server broke: why. The next call reconnects first.
    broken: Option<String>,
    /// Why connections to the server were last lost, for the tickets that were in flight.
    lost: String,
}

/// The longest pause between two attempts to reconnect to a server.
const RECONNECT_PAUSE_MS_MAX: u64 = 1_000;

/// Whether `e` leaves a link unusable: anything that may have cut a frame in two, or shows the
/// connection gone. A receive that timed out leaves the stream whole (the reply may come yet).
fn breaks_link(e: &TransportError, receiving: bool) -> bool {
    match e {
        TransportError::Timeout { .. } => !receiving,
        TransportError::Closed { .. } | TransportError::Io(_) | TransportError::Malformed { .. } | TransportError::Rdma { .. } => true,
        _ => false,
    }
}

/// Connects to one server: its control plane (whose hello says how many shards it has), then
/// one link per shard, over the transport `chosen`.
fn dial(addr: &str, cfg: &ClientConfig, chosen: &Chosen) -> Result<ServerLinks> {
    let (mut control, info) = TcpLink::connect(addr, CONTROL_SHARD, cfg.worker, &cfg.transport)?;
    let info: ServerInfo =
        serde_json::from_slice(&info).map_err(|e| ClientError::Protocol { server: addr.to_string(), reason: format!("bad hello reply: {e}") })?;
    control.limit_frames(info.frame_bytes_max as usize);
    if cfg.kind == tessera_transport::TransportKind::Rdma && !info.rdma {
        let reason = format!("server {addr} serves TCP only; start it with --transport rdma");
        return Err(ClientError::Transport(TransportError::RdmaUnavailable { reason }));
    }
    let mut shards = Vec::with_capacity(info.shards as usize);
    for shard in 0..info.shards {
        let (mut link, _) = tessera_transport::select::connect_link(addr, shard as u64, cfg.worker, &cfg.transport, chosen, info.rdma, &cfg.rdma)?;
        link.limit_frames(info.frame_bytes_max as usize);
        shards.push(Shard {
            link,
            next_id: 1,
            parked: BTreeMap::new(),
            abandoned: BTreeSet::new(),
            outstanding: 0,
            lists: KeyLists::new(cfg.key_cache_keys),
            lost_below: 0,
        });
    }
    Ok(ServerLinks { addr: addr.to_string(), control, shards, workers_max: info.workers_max, broken: None, lost: String::new() })
}

/// What the servers `addrs` say when asked for their cluster.
enum Asked {
    /// The first that answered: the first view the chain starts from.
    View(ViewFrom),
    /// A server that does not know the request: one from before every server ran the chain
    /// protocol, reached by direct links.
    Unknown,
    /// None answered (down, or too busy to take a connection): the chain's connection tries
    /// again, and reports why.
    Unanswered,
}

/// Asks `addrs` for their cluster, the first that answers.
fn ask_cluster(addrs: &[&str], cfg: &ClientConfig) -> Asked {
    for addr in addrs {
        match tessera_transport::ask(addr, Op::ClusterConfig, &[], &cfg.transport) {
            Ok(view) => return Asked::View(ViewFrom { addr: addr.to_string(), view }),
            Err(TransportError::Refused { status: Status::BadRequest, .. }) => return Asked::Unknown,
            Err(_) => continue,
        }
    }
    Asked::Unanswered
}

/// The keys a call on a replicated cluster names: listed keys (with whether a push completes
/// the worker's clock on every range, under bounded delay), or a dense range from `start`.
#[derive(Debug, Clone, Copy)]
enum Named<'k> {
    Keys { keys: &'k [u64], ranges_done: bool },
    Range { start: u64 },
}

/// Routing buffers, reused from call to call.
#[derive(Debug, Default)]
struct Scratch {
    part_of: Vec<u32>,
    counts: Vec<usize>,
    keys: Vec<u64>,
    grads: Vec<f32>,
    /// Parts a call touches, and where each part's group starts while grouping.
    used: Vec<usize>,
    next: Vec<usize>,
    /// Buffers of tickets that were waited on, for the next tickets.
    orders: Vec<Vec<u32>>,
    subs: Vec<Vec<Sub>>,
    /// The stamp of the last one-sided read.
    read_stamp: Vec<u64>,
    /// Resend records of requests sent by key-list hash, for the next such requests. The boxes
    /// are what is reused: a part holds its record boxed, to keep `Sub` small.
    #[allow(clippy::vec_box)]
    resends: Vec<Box<Resend>>,
}

/// Most resend records kept for reuse.
const RESENDS_KEPT_MAX: usize = 64;

/// Why `standalone` holds links: every call that reaches it comes on a standalone server.
const STANDALONE: &str = "only a standalone server's calls come here";

#[derive(Debug)]
pub(crate) struct Core {
    cfg: ClientConfig,
    /// The transport chosen at connect time (the RDMA device, if any), for push buffers.
    chosen: Chosen,
    /// A standalone server's links and range map (`None` on a cluster, where every call goes
    /// through the chains).
    standalone: Option<ServerLinks>,
    map: RangeMap,
    control_id: u64,
    scratch: Scratch,
    pub clock: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Key-list requests sent by hash, and those the shard did not hold (sent again in full).
    pub lists_by_hash: u64,
    pub lists_missed: u64,
    /// Counts reconnections: a [`Table`] read under an older one is routed by name again.
    generation: u64,
    /// Routes of tables looked up again since the last reconnection, by name.
    remapped: HashMap<String, Arc<Route>>,
    /// A cluster's links and tables (`standalone` is then `None`).
    chain: Option<(Chain, HashMap<String, TableEntry>)>,
}

impl Core {
    pub fn connect(addrs: &[&str], cfg: ClientConfig) -> Result<Core> {
        let chosen = tessera_transport::select::choose(cfg.kind, &cfg.rdma)?;
        let chain = match ask_cluster(addrs, &cfg) {
            Asked::View(view) => Some(Chain::connect(addrs, &cfg, chosen.clone(), Some(view))?),
            Asked::Unanswered => Some(Chain::connect(addrs, &cfg, chosen.clone(), None)?),
            Asked::Unknown => None,
        };
        let standalone = match (&chain, addrs) {
            (Some(_), _) => None,
            (None, [addr]) => Some(dial(addr, &cfg, &chosen)?),
            (None, _) => {
                let reason = format!(
                    "{} are standalone servers, not a cluster: connect to one of them, or start the servers with a coordinator (`tessera coordinator --replicas 1` keeps one copy of every range) and connect to any of them",
                    addrs.join(", ")
                );
                return Err(ClientError::Config { reason });
            }
        };
        let mut core = Core {
            cfg,
            chosen,
            standalone,
            map: RangeMap::default(),
            control_id: 0,
            scratch: Scratch::default(),
            clock: 0,
            bytes_sent: 0,
            bytes_received: 0,
            lists_by_hash: 0,
            lists_missed: 0,
            generation: 0,
            remapped: HashMap::new(),
            chain: chain.map(|(chain, catalog)| (chain, catalog.tables.into_iter().map(|t| (t.spec.name.clone(), t)).collect())),
        };
        if core.chain.is_none() {
            core.refresh()?;
        }
        Ok(core)
    }

    /// The replicated cluster's links, when the servers are one.
    pub fn chain(&self) -> Option<&Chain> {
        self.chain.as_ref().map(|(chain, _)| chain)
    }

    /// Bytes sent and received, frames included.
    pub fn bytes(&self) -> (u64, u64) {
        match self.chain() {
            Some(chain) => (chain.stats.bytes_sent, chain.stats.bytes_received),
            None => (self.bytes_sent, self.bytes_received),
        }
    }

    /// One request on the standalone server's control plane; returns the reply body.
    fn control(&mut self, op: Op, body: &[u8]) -> Result<Vec<u8>> {
        if self.standalone.as_ref().expect(STANDALONE).broken.is_some() {
            self.heal()?;
        }
        self.control_id += 1;
        let s = self.standalone.as_mut().expect(STANDALONE);
        let mut header = Header::request(op, self.control_id);
        let sent = s.control.send(&mut header, &[body], false);
        let reply = match sent.and_then(|()| s.control.recv(None)) {
            Ok(reply) => reply,
            Err(e) => {
                // The control plane is strictly one request, one reply: after any failure a late
                // reply could be taken for the next one's, so the connection is not used again.
                self.break_server(&e);
                return Err(e.into());
            }
        };
        if reply.header.status() != Status::Ok {
            let message = String::from_utf8_lossy(reply.body).into_owned();
            return Err(server_error(&s.addr, &reply.header, message));
        }
        Ok(reply.body.to_vec())
    }

    /// Fetches every server's catalog and rebuilds the range map.
    pub fn refresh(&mut self) -> Result<Vec<Vec<TableEntry>>> {
        if let Some((chain, tables)) = self.chain.as_mut() {
            let mut catalogs = Vec::new();
            for (_, body) in chain.ask_members(Op::Catalog, &[])? {
                let catalog: Catalog =
                    serde_json::from_slice(&body).map_err(|e| ClientError::Protocol { server: String::new(), reason: format!("bad catalog: {e}") })?;
                catalogs.push(catalog.tables);
            }
            if let Some(first) = catalogs.first() {
                *tables = first.iter().map(|t| (t.spec.name.clone(), t.clone())).collect();
            }
            return Ok(catalogs);
        }
        let body = self.control(Op::Catalog, &[])?;
        let catalog: Catalog = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol { server: self.standalone.as_ref().expect(STANDALONE).addr.clone(), reason: format!("bad catalog: {e}") })?;
        self.map = RangeMap::from_catalog(&catalog)?;
        Ok(vec![catalog.tables])
    }

    pub fn create_table(&mut self, spec: &TableSpec) -> Result<()> {
        let body = serde_json::to_vec(spec).expect("a table spec serialises");
        if let Some((chain, _)) = self.chain.as_mut() {
            chain.ask_everyone(Op::CreateTable, &body)?;
        }
        if self.standalone.is_some() {
            self.control(Op::CreateTable, &body)?;
        }
        self.refresh().map(|_| ())
    }

    /// Every server's status report, each with its server's address added as `addr`.
    pub fn status(&mut self) -> Result<Vec<serde_json::Value>> {
        let named = |(addr, mut report): (String, serde_json::Value)| {
            if let Some(fields) = report.as_object_mut() {
                fields.insert("addr".into(), addr.into());
            }
            report
        };
        Ok(self.ask_all(Op::Status)?.into_iter().map(named).collect())
    }

    /// Has every server checkpoint every shard now; what each shard wrote, per server.
    pub fn checkpoint(&mut self) -> Result<Vec<(String, serde_json::Value)>> {
        self.ask_all(Op::Checkpoint)
    }

    /// Sends `op` with no body to every server's control connection; each server's address
    /// and JSON reply.
    fn ask_all(&mut self, op: Op) -> Result<Vec<(String, serde_json::Value)>> {
        let replies = match self.chain.as_mut() {
            Some((chain, _)) => chain.ask_members(op, &[])?,
            None => vec![(self.standalone.as_ref().expect(STANDALONE).addr.clone(), self.control(op, &[])?)],
        };
        let parse = |(addr, body): (String, Vec<u8>)| match serde_json::from_slice(&body) {
            Ok(reply) => Ok((addr, reply)),
            Err(e) => Err(ClientError::Protocol { server: addr, reason: format!("bad {op:?} reply: {e}") }),
        };
        replies.into_iter().map(parse).collect()
    }

    /// The table's route; a table this client has not seen yet (created by another client) is
    /// looked up again on the servers.
    pub fn table(&mut self, name: &str) -> Result<Table> {
        if let Some((_, tables)) = &self.chain {
            if !tables.contains_key(name) {
                self.refresh()?;
            }
            let (_, tables) = self.chain.as_ref().expect("replicated");
            let entry = tables.get(name).ok_or_else(|| tessera_layout::LayoutError::UnknownTable { name: name.into() })?;
            return Ok(Table { route: Arc::new(Route::replicated(entry.spec.clone(), entry.id)), consistency: None, generation: self.generation });
        }
        if self.map.table(name).is_err() {
            self.refresh()?;
        }
        Ok(Table { route: Arc::new(self.map.table(name)?.clone()), consistency: None, generation: self.generation })
    }

    /// `table` as the standalone server routes it now. Reconnects first if the server's
    /// connections broke; a handle read before a reconnection is then routed as the table of the
    /// same name in the catalog read since (a restarted server may number its tables differently).
    pub fn current<'t>(&mut self, table: &'t Table) -> Result<Cow<'t, Table>> {
        if self.standalone.as_ref().expect(STANDALONE).broken.is_some() {
            self.heal()?;
        }
        if table.generation == self.generation {
            return Ok(Cow::Borrowed(table));
        }
        let name = &table.spec().name;
        let route = match self.remapped.get(name) {
            Some(route) => route.clone(),
            None => {
                let found = self.map.table(name)?;
                if found.spec != *table.spec() {
                    let reason = format!("table {name:?} has another definition since the client reconnected: look it up again");
                    return Err(ClientError::Config { reason });
                }
                let route = Arc::new(found.clone());
                self.remapped.insert(name.clone(), route.clone());
                route
            }
        };
        Ok(Cow::Owned(Table { route, consistency: table.consistency, generation: self.generation }))
    }

    /// Marks the standalone server's connections broken by `e`: the requests in flight on them
    /// are lost, and the next call reconnects.
    fn break_server(&mut self, e: &TransportError) {
        let s = self.standalone.as_mut().expect(STANDALONE);
        tracing::warn!(server = %s.addr, error = %e, "connection lost; the next call reconnects");
        s.lost = e.to_string();
        s.broken.get_or_insert_with(|| e.to_string());
        for shard in &mut s.shards {
            shard.lost_below = shard.next_id;
            shard.outstanding = 0;
            shard.abandoned.clear();
        }
    }

    /// The error for a link failure, after marking the server's connections broken when the
    /// failure breaks them. A request in flight on a broken link has an unknown outcome.
    fn link_failed(&mut self, e: ClientError, receiving: bool) -> ClientError {
        match e {
            ClientError::Transport(t) if breaks_link(&t, receiving) => {
                self.break_server(&t);
                let s = self.standalone.as_ref().expect(STANDALONE);
                if receiving {
                    return ClientError::OutcomeUnknown { server: s.addr.clone(), reason: s.lost.clone() };
                }
                ClientError::Transport(t)
            }
            other => other,
        }
    }

    /// Reconnects to the server if its connections broke, and reads its catalog again. Tries
    /// `reconnect_attempts` times, the pause between tries doubling from `reconnect_pause_ms`
    /// up to a second; fails with [`ClientError::Reconnect`], and the next call tries again.
    fn heal(&mut self) -> Result<()> {
        if self.standalone.as_ref().expect(STANDALONE).broken.is_some() {
            let fresh = self.redial()?;
            self.adopt(fresh);
        }
        self.generation += 1;
        self.remapped.clear();
        self.refresh().map(|_| ())
    }

    fn redial(&self) -> Result<ServerLinks> {
        let addr = &self.standalone.as_ref().expect(STANDALONE).addr;
        let attempts = self.cfg.reconnect_attempts;
        let mut pause_ms = self.cfg.reconnect_pause_ms;
        let mut last = String::from("reconnecting is off (ClientConfig::reconnect_attempts is 0)");
        for attempt in 0..attempts {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(pause_ms));
                pause_ms = (pause_ms * 2).min(RECONNECT_PAUSE_MS_MAX);
            }
            match dial(addr, &self.cfg, &self.chosen) {
                Ok(links) => return Ok(links),
                Err(e) => last = e.to_string(),
            }
        }
        Err(ClientError::Reconnect { server: addr.clone(), attempts, reason: last })
    }

    /// Puts the links of a fresh connection to the server in place of its broken ones. Replies
    /// that arrived before the break stay parked for their tickets; request ids go on from
    /// where they were.
    fn adopt(&mut self, fresh: ServerLinks) {
        let old = self.standalone.as_mut().expect(STANDALONE);
        let base = old.shards.iter().map(|s| s.next_id).max().unwrap_or(1);
        let mut kept = std::mem::take(&mut old.shards).into_iter();
        for mut shard in fresh.shards {
            match kept.next() {
                Some(mut was) => {
                    (was.link, was.lists) = (shard.link, shard.lists);
                    old.shards.push(was);
                }
                None => {
                    (shard.next_id, shard.lost_below) = (base, base);
                    old.shards.push(shard);
                }
            }
        }
        (old.control, old.workers_max, old.broken) = (fresh.control, fresh.workers_max, None);
    }

    /// Sends one frame to `owner` and returns its request id.
    fn send(&mut self, owner: Owner, header: Header, parts: &[&[u8]]) -> Result<u64> {
        let compress = self.cfg.compress;
        self.send_with(owner, header, |link, header| link.send(header, parts, compress))
    }

    /// Fills in the request's id, table, worker and clock, has `send` send it on `owner`'s link,
    /// and counts it.
    fn send_with(&mut self, owner: Owner, mut header: Header, send: impl FnOnce(&mut dyn Link, &mut Header) -> tessera_transport::Result<()>) -> Result<u64> {
        if self.standalone.as_ref().expect(STANDALONE).broken.is_some() {
            self.heal()?;
        }
        let shard = &mut self.standalone.as_mut().expect(STANDALONE).shards[owner.shard as usize];
        header.request_id = shard.next_id;
        header.table = owner.table_id;
        header.worker = self.cfg.worker;
        header.clock = self.clock;
        if self.cfg.compress {
            header.flags |= tessera_transport::wire::flags::COMPRESS_REPLY;
        }
        if let Err(e) = send(shard.link.as_mut(), &mut header) {
            return Err(self.link_failed(e.into(), false));
        }
        shard.next_id += 1;
        shard.outstanding += 1;
        self.bytes_sent += header.frame_len() as u64;
        Ok(header.request_id)
    }

    /// As [`Core::send`], for a body that lies in `source`: an RDMA link sends it without
    /// copying it, and [`Core::release_buffers`] must then run before the caller may change the buffer.
    /// Compressed bodies are built from a copy anyway, so they go the usual way.
    fn send_from(&mut self, owner: Owner, header: Header, body: &[u8], source: &PushBuffer) -> Result<u64> {
        if self.cfg.compress {
            return self.send(owner, header, &[body]);
        }
        self.send_with(owner, header, |link, header| match link.one_sided() {
            Some(one_sided) => one_sided.send_from(header, body, source),
            None => link.send(header, &[body], false),
        })
    }

    /// Waits until the links `subs` went over have read every body they send from callers'
    /// buffers.
    fn release_buffers(&mut self, subs: &[Sub]) -> Result<()> {
        for s in subs {
            let link = &mut self.standalone.as_mut().expect(STANDALONE).shards[s.shard as usize].link;
            if let Err(e) = link.one_sided().map_or(Ok(()), |one_sided| one_sided.settle()) {
                return Err(self.link_failed(e.into(), false));
            }
        }
        Ok(())
    }

    /// A buffer of `len` values a push can send without copying ([`PushBuffer`]).
    pub fn push_buffer(&self, len: usize) -> Result<PushBuffer> {
        Ok(PushBuffer::new(len, &self.chosen)?)
    }

    /// Most keys one frame to `owner` may carry, so that the request and its reply both fit the
    /// smaller of the two sides' frame limits. Larger calls are split into several frames.
    fn keys_per_frame(&self, owner: Owner, kind: Kind, dim: usize, with_keys: bool) -> usize {
        let server = self.standalone.as_ref().expect(STANDALONE);
        let room = server.shards[owner.shard as usize].link.send_bytes_max().saturating_sub(tessera_transport::wire::HEADER_BYTES);
        let stamp = server.workers_max as usize;
        match (kind, with_keys) {
            (Kind::Push, true) => keys_fitting(room, stamp, dim, Carries::KeysAndValues),
            (Kind::Push, false) => keys_fitting(room, stamp, dim, Carries::Values),
            (Kind::Pull, true) => keys_fitting(room, stamp, dim, Carries::Reply).min(keys_fitting(room, stamp, dim, Carries::Keys)),
            (Kind::Pull, false) => keys_fitting(room, stamp, dim, Carries::Reply),
        }
    }

    pub(crate) fn check_len(table: &Table, what: &'static str, keys: usize, got: usize) -> Result<()> {
        let want = keys * table.dim();
        if got != want {
            let name = table.spec().name.clone();
            return Err(ClientError::Length { what, table: name, keys, dim: table.dim(), got, want });
        }
        Ok(())
    }

    /// Routes each key to its part; fills `scratch.part_of` and `scratch.counts`.
    fn route_keys(&mut self, table: &Table, keys: &[u64]) -> Result<()> {
        let route = table.route();
        let s = &mut self.scratch;
        s.part_of.clear();
        s.counts.clear();
        s.counts.resize(route.parts(), 0);
        for &key in keys {
            let spec = &route.spec;
            let part = route.locate(key).ok_or_else(|| ClientError::KeyOutOfRange { table: spec.name.clone(), key, start: spec.start, end: spec.end })?;
            s.part_of.push(part as u32);
            s.counts[part] += 1;
        }
        Ok(())
    }

    /// A push or pull of a key list.
    #[allow(clippy::too_many_arguments)]
    pub fn send_keys<'a>(
        &mut self,
        client: &'a Client,
        table: &Table,
        kind: Kind,
        keys: &[u64],
        grads: Option<&[f32]>,
        out: Option<&'a mut [f32]>,
        part_done: bool,
    ) -> Result<Ticket<'a>> {
        if self.chain.is_some() {
            return self.chain_call(client, table, Named::Keys { keys, ranges_done: part_done }, grads, out);
        }
        let fresh = self.current(table)?;
        let table: &Table = &fresh;
        let dim = table.dim();
        // A push that completes this clock on every part: each part's last frame says so, and
        // parts without keys get an empty push that does.
        let done_flag = if part_done && kind == Kind::Push { flags::PART_DONE } else { 0 };
        match (grads, &out) {
            (Some(g), _) => Self::check_len(table, "the gradient", keys.len(), g.len())?,
            (_, Some(o)) => Self::check_len(table, "the output", keys.len(), o.len())?,
            _ => {}
        }
        self.check_finite(table, grads)?;
        self.route_keys(table, keys)?;
        let mut subs = self.scratch.subs.pop().unwrap_or_default();
        let mut order = Vec::new();
        let mut used = std::mem::take(&mut self.scratch.used);
        used.clear();
        used.extend((0..self.scratch.counts.len()).filter(|p| self.scratch.counts[*p] > 0));
        if let [only] = used[..] {
            // Everything goes to one shard: send straight from the caller's slices.
            let owner = table.route().owner(only);
            let per_frame = self.keys_per_frame(owner, kind, dim, true);
            for (c, chunk) in keys.chunks(per_frame).enumerate() {
                let at = c * per_frame;
                let g = grads.map(|g| &g[at * dim..(at + chunk.len()) * dim]);
                let last = at + chunk.len() == keys.len();
                let sent = self.send_one(owner, kind, dim, chunk, g, if last { done_flag } else { 0 });
                let (id, resend) = self.sent_or_abandon(sent, &subs)?;
                let range = at * dim..(at + chunk.len()) * dim;
                subs.push(Sub { shard: owner.shard, id, range, scatter: false, resend });
            }
        } else {
            self.group(keys, grads, dim, &mut order);
            let mut at = 0;
            for &part in &used {
                let n = self.scratch.counts[part];
                let owner = table.route().owner(part);
                let per_frame = self.keys_per_frame(owner, kind, dim, true);
                let keys = std::mem::take(&mut self.scratch.keys);
                let group_grads = std::mem::take(&mut self.scratch.grads);
                let mut failed = None;
                for lo in (at..at + n).step_by(per_frame) {
                    let hi = (lo + per_frame).min(at + n);
                    let g = grads.map(|_| &group_grads[lo * dim..hi * dim]);
                    let last = hi == at + n;
                    match self.send_one(owner, kind, dim, &keys[lo..hi], g, if last { done_flag } else { 0 }) {
                        Ok((id, resend)) => subs.push(Sub { shard: owner.shard, id, range: lo..hi, scatter: true, resend }),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                self.scratch.keys = keys;
                self.scratch.grads = group_grads;
                if let Some(e) = failed {
                    self.sent_or_abandon(Err(e), &subs)?;
                }
                at += n;
            }
        }
        if done_flag != 0 {
            for part in 0..self.scratch.counts.len() {
                if self.scratch.counts[part] > 0 {
                    continue;
                }
                let owner = table.route().owner(part);
                let sent = self.send_one(owner, kind, dim, &[], Some(&[]), done_flag);
                let (id, resend) = self.sent_or_abandon(sent, &subs)?;
                subs.push(Sub { shard: owner.shard, id, range: 0..0, scatter: false, resend });
            }
        }
        self.scratch.used = used;
        Ok(Ticket { client, subs, out, order, dim, stamp: None, mismatched: false, chained: None })
    }

    /// [`send_keys`](Self::send_keys) and [`send_range`](Self::send_range) on a replicated
    /// cluster: a push is sent to the ranges' heads and its ticket waits for their
    /// acknowledgements; a pull's requests go to the tails, and its ticket takes the replies.
    fn chain_call<'a>(&mut self, client: &'a Client, table: &Table, named: Named<'_>, grads: Option<&[f32]>, out: Option<&'a mut [f32]>) -> Result<Ticket<'a>> {
        let (what, values) = match (grads, &out) {
            (Some(g), _) => ("the gradient", g.len()),
            (None, o) => ("the output", o.as_ref().map_or(0, |o| o.len())),
        };
        let keys = match named {
            Named::Keys { keys, .. } => keys.len(),
            Named::Range { .. } => values / table.dim(),
        };
        Self::check_len(table, what, keys, values)?;
        self.check_finite(table, grads)?;
        let fresh = self.chain_current(table)?;
        let table: &Table = &fresh;
        let clock = self.clock;
        let (chain, _) = self.chain.as_mut().expect("replicated");
        let t = ChainTable::of(table.route());
        match (grads, out, named) {
            (Some(g), _, Named::Keys { keys, ranges_done }) => chain.push_keys(t, keys, g, clock, ranges_done).map(|n| Ticket::pushed(client, n, clock)),
            (Some(g), _, Named::Range { start }) => chain.push_range(t, start, g, clock).map(|n| Ticket::pushed(client, n, clock)),
            (None, Some(o), Named::Keys { keys, .. }) => Ok(Ticket::pulling(client, chain.start_pull_keys(table.route(), keys, o)?, o)),
            (None, Some(o), Named::Range { start }) => Ok(Ticket::pulling(client, chain.start_pull_range(table.route(), start, o)?, o)),
            (None, None, _) => unreachable!("a pull has an output"),
        }
    }

    /// `table` as the cluster numbers it now: a handle read before the servers turned out to be
    /// another cluster (a standalone server restarted without its data) is routed as the
    /// table of the same name in the catalog read since.
    fn chain_current<'t>(&mut self, table: &'t Table) -> Result<Cow<'t, Table>> {
        let generation = self.chain().expect("replicated").generation;
        if generation != self.generation {
            self.generation = generation;
            self.remapped.clear();
            self.refresh()?;
        }
        if table.generation == self.generation {
            return Ok(Cow::Borrowed(table));
        }
        let name = &table.spec().name;
        let route = match self.remapped.get(name) {
            Some(route) => route.clone(),
            None => {
                let (_, tables) = self.chain.as_ref().expect("replicated");
                let entry = tables.get(name).ok_or_else(|| tessera_layout::LayoutError::UnknownTable { name: name.clone() })?;
                if entry.spec != *table.spec() {
                    let reason = format!("table {name:?} has another definition since the servers restarted: look it up again");
                    return Err(ClientError::Config { reason });
                }
                let route = Arc::new(Route::replicated(entry.spec.clone(), entry.id));
                self.remapped.insert(name.clone(), route.clone());
                route
            }
        };
        Ok(Cow::Owned(Table { route, consistency: table.consistency, generation: self.generation }))
    }

    /// Passes a send's result through; on failure, forgets the sub-requests already sent, so that
    /// their replies are dropped when they come. (Building the ticket only after every send keeps
    /// a failed call from dropping a ticket, which would lock the client again from inside.)
    /// A call whose frames went out in part when a connection broke has an unknown outcome:
    /// the parts sent may be applied.
    fn sent_or_abandon<T>(&mut self, sent: Result<T>, subs: &[Sub]) -> Result<T> {
        let Err(e) = sent else { return sent };
        for s in subs {
            self.abandon(s.shard, s.id);
        }
        match e {
            ClientError::Transport(t) if !subs.is_empty() && breaks_link(&t, false) => {
                let server = self.standalone.as_ref().expect(STANDALONE).addr.clone();
                Err(ClientError::OutcomeUnknown { server, reason: t.to_string() })
            }
            e => Err(e),
        }
    }

    /// Refuses, before anything is sent, a gradient with NaN or Inf for a table that rejects
    /// them: shards would refuse their parts one by one, and the others would apply theirs.
    fn check_finite(&self, table: &Table, grads: Option<&[f32]>) -> Result<()> {
        let Some(g) = grads else { return Ok(()) };
        if table.spec().non_finite != tessera_layout::NonFinite::Reject {
            return Ok(());
        }
        match tessera_layout::catalog::first_non_finite(g) {
            None => Ok(()),
            Some(index) => Err(ClientError::NonFinite { table: table.spec().name.clone(), index, value: g[index] }),
        }
    }

    /// One ping (`Op::Ping`) to `shard` of the standalone server (or to the cluster): the
    /// transport's round trip, with no table touched.
    pub fn ping(&mut self, shard: u16) -> Result<()> {
        if let Some((chain, _)) = self.chain.as_mut() {
            return chain.ping();
        }
        let id = self.send(Owner { shard, table_id: 0 }, Header::request(Op::Ping, 0), &[])?;
        self.await_reply(shard, id, |h, body| match h.status() {
            Status::Ok => Ok(()),
            _ => Err(String::from_utf8_lossy(body).into_owned()),
        })
    }

    /// Sends one key-list frame. With key caching on, a list the shard holds goes by its hash
    /// (and the returned [`Resend`] keeps what it takes to send it again with its keys); a new
    /// one goes in full, for both ends to remember.
    #[allow(clippy::too_many_arguments)]
    fn send_one(&mut self, owner: Owner, kind: Kind, dim: usize, keys: &[u64], grads: Option<&[f32]>, extra_flags: u16) -> Result<(u64, Option<Box<Resend>>)> {
        let op = if kind == Kind::Push { Op::Push } else { Op::Pull };
        let mut header = Header::request(op, 0);
        header.flags = extra_flags;
        header.count = keys.len() as u32;
        header.dim = dim as u32;
        let lists = &mut self.standalone.as_mut().expect(STANDALONE).shards[owner.shard as usize].lists;
        let mut full_flags = extra_flags;
        match lists.remember(keys) {
            Some(Remembered::Held(hash)) => {
                header.flags |= flags::KEYS_CACHED;
                header.start = hash;
                let values: &[f32] = grads.unwrap_or_default();
                let id = self.send(owner, header, &[bytemuck::cast_slice(values)])?;
                self.lists_by_hash += 1;
                // Reused from earlier calls (see `recycle`): no allocation once warm.
                let mut resend = self.scratch.resends.pop().unwrap_or_default();
                resend.keys.clear();
                resend.keys.extend_from_slice(keys);
                resend.grads.clear();
                resend.grads.extend_from_slice(values);
                (resend.owner, resend.push, resend.dim, resend.flags) = (Some(owner), kind == Kind::Push, dim, extra_flags);
                return Ok((id, Some(resend)));
            }
            Some(Remembered::New) => full_flags |= flags::KEYS_REMEMBER,
            None => {}
        }
        let id = self.send_in_full(owner, kind == Kind::Push, dim, keys, grads.unwrap_or_default(), full_flags)?;
        Ok((id, None))
    }

    /// Sends a key-list request with its keys (and, for a push, its values).
    fn send_in_full(&mut self, owner: Owner, push: bool, dim: usize, keys: &[u64], grads: &[f32], flags: u16) -> Result<u64> {
        let mut header = Header::request(if push { Op::Push } else { Op::Pull }, 0);
        header.count = keys.len() as u32;
        header.dim = dim as u32;
        header.flags = flags;
        let key_bytes: &[u8] = bytemuck::cast_slice(keys);
        if push {
            self.send(owner, header, &[key_bytes, bytemuck::cast_slice(grads)])
        } else {
            self.send(owner, header, &[key_bytes])
        }
    }

    /// Sends a request again with its keys, after its shard answered that it did not hold the
    /// key list the request named; both ends remember the list again.
    fn resend(&mut self, r: &Resend) -> Result<u64> {
        let owner = r.owner.expect("a resend records its owner");
        let lists = &mut self.standalone.as_mut().expect(STANDALONE).shards[owner.shard as usize].lists;
        lists.insert(key_list_hash(&r.keys), r.keys.len() as u32, ());
        self.send_in_full(owner, r.push, r.dim, &r.keys, &r.grads, flags::KEYS_REMEMBER | r.flags)
    }

    /// [`Core::await_reply`] for one part of a call. A part sent by a cached key list that its
    /// shard did not hold is sent again with its keys, and awaited again.
    pub fn await_sub(&mut self, sub: &mut Sub, mut take: impl FnMut(&Sub, &Header, &[u8]) -> std::result::Result<(), String>) -> Result<()> {
        loop {
            let mut missed = false;
            let resendable = sub.resend.is_some();
            let got = self.await_reply(sub.shard, sub.id, |header, body| {
                if resendable && header.status() == Status::KeysUnknown {
                    missed = true;
                    return Ok(());
                }
                take(sub, header, body)
            });
            if !missed {
                return got;
            }
            self.lists_missed += 1;
            sub.id = self.resend(sub.resend.as_deref().expect("only a resendable part misses"))?;
        }
    }

    /// Groups keys (and gradients) by part, stably, into the scratch buffers; `order` maps each
    /// grouped position back to the caller's index.
    fn group(&mut self, keys: &[u64], grads: Option<&[f32]>, dim: usize, order: &mut Vec<u32>) {
        let s = &mut self.scratch;
        *order = s.orders.pop().unwrap_or_default();
        order.clear();
        order.resize(keys.len(), 0);
        let mut next = std::mem::take(&mut s.next);
        next.clear();
        let mut at = 0;
        for c in &s.counts {
            next.push(at);
            at += c;
        }
        s.keys.resize(keys.len(), 0);
        s.grads.resize(if grads.is_some() { keys.len() * dim } else { 0 }, 0.0);
        for (i, (&key, &part)) in keys.iter().zip(&s.part_of).enumerate() {
            let slot = next[part as usize];
            next[part as usize] += 1;
            s.keys[slot] = key;
            order[slot] = i as u32;
            if let Some(g) = grads {
                s.grads[slot * dim..(slot + 1) * dim].copy_from_slice(&g[i * dim..(i + 1) * dim]);
            }
        }
        s.next = next;
    }

    /// A push or pull of the dense range `start .. start + len / dim`.
    #[allow(clippy::too_many_arguments)]
    pub fn send_range<'a>(
        &mut self,
        client: &'a Client,
        table: &Table,
        kind: Kind,
        start: u64,
        len: usize,
        grads: Option<&[f32]>,
        out: Option<&'a mut [f32]>,
        source: Option<&PushBuffer>,
    ) -> Result<Ticket<'a>> {
        if self.chain.is_some() {
            return self.chain_call(client, table, Named::Range { start }, grads, out);
        }
        let fresh = self.current(table)?;
        let table: &Table = &fresh;
        let dim = table.dim();
        let count = len / dim;
        Self::check_len(table, if kind == Kind::Push { "the gradient" } else { "the output" }, count, len)?;
        let route = table.route();
        let spec = &route.spec;
        let end = start.saturating_add(count as u64);
        let bad = if start < spec.start {
            Some(start)
        } else if end > spec.end {
            Some(spec.end.max(start))
        } else {
            None
        };
        if let Some(key) = bad {
            return Err(ClientError::KeyOutOfRange { table: spec.name.clone(), key, start: spec.start, end: spec.end });
        }
        self.check_finite(table, grads)?;
        let mut subs = self.scratch.subs.pop().unwrap_or_default();
        let mut out = out;
        let mut read_stamp: Option<Stamp> = None;
        let mut key = start;
        while key < end {
            let part = route.locate(key).expect("keys inside the table have a part");
            let owner = route.owner(part);
            let part_end = route.range(part).end.min(end);
            if let (Kind::Pull, Some(o), TableKind::Dense) = (kind, out.as_deref_mut(), spec.kind) {
                // Dense pulls go one-sided where the link can: straight from the shard's memory.
                let values = (key - start) as usize * dim..(part_end - start) as usize * dim;
                let read = self.read_dense(owner, dim, key, &mut o[values]);
                if self.sent_or_abandon(read, &subs)? {
                    let first = read_stamp.is_none();
                    let clocks = self.scratch.read_stamp.iter().copied();
                    read_stamp.get_or_insert_with(Stamp::default).meet(clocks, first);
                    key = part_end;
                    continue;
                }
            }
            let per_frame = self.keys_per_frame(owner, kind, dim, false) as u64;
            let stop = part_end.min(key.saturating_add(per_frame));
            let values = (key - start) as usize * dim..(stop - start) as usize * dim;
            let op = if kind == Kind::Push { Op::PushRange } else { Op::PullRange };
            let mut header = Header::request(op, 0);
            header.start = key;
            header.count = (stop - key) as u32;
            header.dim = dim as u32;
            let sent = match (grads, source) {
                (Some(g), Some(src)) => self.send_from(owner, header, bytemuck::cast_slice(&g[values.clone()]), src),
                (Some(g), None) => self.send(owner, header, &[bytemuck::cast_slice(&g[values.clone()])]),
                (None, _) => self.send(owner, header, &[]),
            };
            let id = match self.sent_or_abandon(sent, &subs) {
                Ok(id) => id,
                Err(e) => {
                    // The frames already sent may still be read from the caller's buffer.
                    if source.is_some() {
                        let _ = self.release_buffers(&subs);
                    }
                    return Err(e);
                }
            };
            subs.push(Sub { shard: owner.shard, id, range: values, scatter: false, resend: None });
            key = stop;
        }
        if source.is_some() {
            // The caller gets its buffer back when this returns: the device must be done with it.
            let settled = self.release_buffers(&subs);
            self.sent_or_abandon(settled, &subs)?;
        }
        Ok(Ticket { client, subs, out, order: Vec::new(), dim, stamp: read_stamp, mismatched: false, chained: None })
    }

    /// A one-sided read of `out.len() / dim` keys from `start` on `owner`'s shard, if its link can
    /// (`false` if not); the blocks' stamp is left in `scratch.read_stamp`.
    fn read_dense(&mut self, owner: Owner, dim: usize, start: u64, out: &mut [f32]) -> Result<bool> {
        let link = &mut self.standalone.as_mut().expect(STANDALONE).shards[owner.shard as usize].link;
        let Some(one_sided) = link.one_sided() else { return Ok(false) };
        let read = match one_sided.read_dense(owner.table_id, start, dim as u32, out, &mut self.scratch.read_stamp) {
            Ok(read) => read,
            Err(e) => return Err(self.link_failed(e.into(), false)),
        };
        if read {
            self.bytes_received += (out.len() * 4) as u64;
        }
        Ok(read)
    }

    /// Block copies the links found torn and read again.
    pub fn torn_reads(&self) -> u64 {
        let chained = self.chain().map_or(0, Chain::torn_reads);
        chained + self.standalone.iter().flat_map(|s| &s.shards).filter_map(|s| s.link.one_sided_ref()).map(|o| o.torn_reads()).sum::<u64>()
    }

    /// Waits for the reply to request `id` on one shard and hands it to `take`. Replies to other
    /// requests that arrive first are parked for their own tickets.
    pub fn await_reply(&mut self, shard: u16, id: u64, take: impl FnOnce(&Header, &[u8]) -> std::result::Result<(), String>) -> Result<()> {
        let s = self.standalone.as_mut().expect(STANDALONE);
        let addr = &s.addr;
        let Some(shard) = s.shards.get_mut(shard as usize).filter(|sh| id >= sh.lost_below || sh.parked.contains_key(&id)) else {
            return Err(ClientError::OutcomeUnknown { server: addr.clone(), reason: s.lost.clone() });
        };
        if let Some(p) = shard.parked.remove(&id) {
            return take(&p.header, &p.body).map_err(|m| server_error(addr, &p.header, m));
        }
        let Shard { link, next_id, parked, abandoned, outstanding, .. } = shard;
        loop {
            let frame = match link.recv(None) {
                Ok(frame) => frame,
                Err(e) => return Err(self.link_failed(e.into(), true)),
            };
            self.bytes_received += frame.header.frame_len() as u64;
            *outstanding = outstanding.saturating_sub(1);
            if frame.header.request_id == id {
                return take(&frame.header, frame.body).map_err(|m| server_error(addr, &frame.header, m));
            }
            park(addr, *next_id, parked, abandoned, &frame.header, frame.body)?;
        }
    }

    /// Whether waiting for request `id`'s reply on one shard would return without blocking: its
    /// reply is parked, or it was lost with a broken connection (the wait reports that).
    /// Receives, and parks, what arrives for up to `timeout` (zero: only what is there now).
    pub fn arrived(&mut self, shard: u16, id: u64, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let s = self.standalone.as_mut().expect(STANDALONE);
        let addr = &s.addr;
        let Some(sh) = s.shards.get_mut(shard as usize) else { return Ok(true) };
        loop {
            if sh.parked.contains_key(&id) || id < sh.lost_below || sh.outstanding == 0 {
                return Ok(true);
            }
            let Shard { link, next_id, parked, abandoned, outstanding, .. } = sh;
            let frame = match link.recv(Some(deadline.saturating_duration_since(Instant::now()))) {
                Ok(frame) => frame,
                Err(TransportError::Timeout { .. }) => return Ok(false),
                Err(e) if breaks_link(&e, true) => {
                    self.break_server(&e);
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            };
            self.bytes_received += frame.header.frame_len() as u64;
            *outstanding = outstanding.saturating_sub(1);
            park(addr, *next_id, parked, abandoned, &frame.header, frame.body)?;
        }
    }

    /// Receives replies on one shard until request `id`'s is in, and parks it for its ticket.
    /// A request whose reply is already parked (or was taken) returns at once.
    pub fn settle(&mut self, shard: u16, id: u64) -> Result<()> {
        let s = self.standalone.as_mut().expect(STANDALONE);
        let addr = &s.addr;
        let shard = &mut s.shards[shard as usize];
        while shard.outstanding > 0 && !shard.parked.contains_key(&id) {
            match shard.receive_one(addr) {
                Ok(bytes) => self.bytes_received += bytes,
                Err(e) => return Err(self.link_failed(e, true)),
            }
        }
        Ok(())
    }

    /// Receives every reply still due on every shard, parking each for its ticket: afterwards
    /// every request sent so far has been answered.
    pub fn settle_all(&mut self) -> Result<()> {
        if let Some((chain, _)) = self.chain.as_mut() {
            return chain.settle(None).map(|_| ());
        }
        let s = self.standalone.as_mut().expect(STANDALONE);
        let addr = &s.addr;
        for shard in &mut s.shards {
            while shard.outstanding > 0 {
                match shard.receive_one(addr) {
                    Ok(bytes) => self.bytes_received += bytes,
                    Err(e) => return Err(self.link_failed(e, true)),
                }
            }
        }
        Ok(())
    }

    /// Whether push number `push` to the replicated cluster, and every one before it, is
    /// acknowledged, waiting until `deadline` (none: until it is, or fails).
    pub fn chain_settled(&mut self, push: u64, deadline: Option<Instant>) -> Result<bool> {
        match self.chain.as_mut() {
            Some((chain, _)) => chain.settle_through(push, deadline),
            None => Ok(true),
        }
    }

    /// Whether pull number `pull` from the replicated cluster has all its replies in, taking
    /// replies until `deadline`.
    pub fn chain_pull_arrived(&mut self, pull: u64, deadline: Instant) -> bool {
        self.chain.as_mut().is_none_or(|(chain, _)| chain.pull_arrived(pull, deadline))
    }

    /// Waits for pull number `pull` from the replicated cluster and writes its values into
    /// `out` (see [`Chain::finish_pull`]).
    pub fn chain_finish_pull(&mut self, pull: u64, out: &mut [f32]) -> Result<Stamp> {
        let (chain, _) =
            self.chain.as_mut().ok_or_else(|| ClientError::Config { reason: "a replicated cluster's pull ticket given to another client".into() })?;
        chain.finish_pull(pull, out)
    }

    /// Lets pull number `pull` from the replicated cluster go: nothing is written.
    pub fn chain_abandon_pull(&mut self, pull: u64) {
        if let Some((chain, _)) = self.chain.as_mut() {
            chain.abandon_pull(pull);
        }
    }

    /// The stamp of a push to the replicated cluster, acknowledged: the one its heads gave it
    /// (see [`Chain::push_stamp`]), or, when a head's answer did not carry one or it is long
    /// gone, what the acknowledgement vouches for by itself: its keys reached this worker's
    /// clock it was sent at.
    pub fn chain_push_stamp(&mut self, pushed: Pushed) -> Stamp {
        let given = self.chain.as_mut().and_then(|(chain, _)| chain.push_stamp(pushed.push));
        given.unwrap_or_else(|| Stamp::own(self.cfg.worker as usize, pushed.clock))
    }

    /// Requests sent whose replies have not arrived, over every shard.
    pub fn in_flight(&self) -> u64 {
        if let Some(chain) = self.chain() {
            return chain.unacked();
        }
        self.standalone.iter().flat_map(|s| &s.shards).map(|s| s.outstanding).sum()
    }

    pub fn transport(&self) -> &'static str {
        if let Some(chain) = self.chain() {
            return chain.transport();
        }
        let all_rdma = self.standalone.iter().flat_map(|s| &s.shards).all(|s| s.link.kind() == "rdma");
        if all_rdma {
            "rdma"
        } else {
            "tcp"
        }
    }

    /// Forgets a request whose ticket was dropped.
    pub fn abandon(&mut self, shard: u16, id: u64) {
        let Some(shard) = self.standalone.as_mut().and_then(|s| s.shards.get_mut(shard as usize)) else { return };
        // A request lost with a broken connection has no reply to drop.
        if shard.parked.remove(&id).is_none() && id >= shard.lost_below {
            shard.abandoned.insert(id);
        }
    }

    /// Returns a grouping buffer, and the resend records of its parts, for reuse.
    pub fn recycle(&mut self, order: Vec<u32>, mut subs: Vec<Sub>) {
        if order.capacity() > 0 && self.scratch.orders.len() < 16 {
            self.scratch.orders.push(order);
        }
        for resend in subs.iter_mut().filter_map(|s| s.resend.take()) {
            if self.scratch.resends.len() < RESENDS_KEPT_MAX {
                self.scratch.resends.push(resend);
            }
        }
        if subs.capacity() > 0 && self.scratch.subs.len() < 16 {
            subs.clear();
            self.scratch.subs.push(subs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_that_may_cut_a_frame_break_a_link() {
        let timeout = || TransportError::Timeout { what: "a reply", ms: 1 };
        assert!(!breaks_link(&timeout(), true), "a late reply may still come whole");
        assert!(breaks_link(&timeout(), false), "a send that timed out may have written part of a frame");
        assert!(breaks_link(&TransportError::Closed { mid_frame: false }, true));
        assert!(breaks_link(&TransportError::Io(std::io::ErrorKind::ConnectionReset.into()), false));
        assert!(!breaks_link(&TransportError::FrameTooLarge { bytes: 2, limit: 1 }, false), "refused before a byte was written");
    }
}
