//! Where a server's replicas' messages leave: one thread per peer server, and one for the
//! coordinator, each waiting on its links, so that a dead or slow peer delays only what goes to
//! it. A shard whose peer's thread is idle starts its request on the peer's link itself: a
//! message on an idle chain leaves without waiting for a thread to wake.
//!
//! Who takes the reply to a request a shard started: over TCP, the shard itself, when it can.
//! The link's socket is in the shard's poll ([`Outbox::sockets_to_watch`]), and after a poll in
//! which such a socket turned readable the shard takes what came without waiting
//! ([`Outbox::take_own_replies`]), so a push's
//! acknowledgement wakes one thread, not a peer's thread that then wakes the shard. Whoever
//! holds a peer's links may take any reply on them, in order, so when the links are busy (the
//! peer's thread sends, or waits for a reply of its own) the shard wakes the thread instead,
//! which takes the reply and hands it over ([`OnReplied`]) like its own. An RDMA link's replies
//! land on its queue pair, not a socket: there the thread takes them.
//!
//! Delivery is best effort, as the protocol expects: a message that cannot go now (the peer is
//! down, its queue is full) is dropped, and the replica resends what matters. Heartbeats go to
//! the coordinator, and its reply may carry a newer configuration, which is handed to the shards.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use tessera_layout::catalog::ServerInfo;
use tessera_replication::codec;
use tessera_replication::protocol::{ClusterConfig, ClusterView, Msg, NodeId, RangeId, RangeReport};
use tessera_transport::{Caller, Dialer, Header, Op, TransportError, CONTROL_SHARD};

use super::Locator;

/// Messages waiting for one destination before more are dropped.
const OUT_QUEUE_MAX: usize = 4096;
/// Most messages one `Replicate` request carries to a peer's shard. A peer's thread sends what
/// queued up while its last request was out in one request: a synchronous round trip per
/// message could not keep up with a chain's updates, let alone let a learner catch up.
const PEER_BATCH_MAX: usize = 256;
/// Longest a peer's thread stays parked with nothing queued before it looks again. Its shards
/// unpark it whenever they queue a message, so this is only a bound.
const PEER_PARK_MAX: Duration = Duration::from_millis(100);
/// How often a server whose heartbeats stopped asks the coordinator for its configuration.
const SILENT_CONFIG_GAP: Duration = Duration::from_millis(200);
/// How long a destination that refused a connection is left alone.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);
/// Largest request a shard starts on a peer's link itself. The link has nothing in flight, so
/// the peer has read all it was sent and a request this small goes into the socket (or an RDMA
/// slot) without waiting, even to a peer that has stopped; larger ones go through the thread.
const DIRECT_BODY_MAX: usize = 32 << 10;
/// Largest bulk (an update's delta, a snapshot's data) a peer's thread copies into a request;
/// a larger one is sent from where it lies, as a part of the request of its own. Copying a
/// MiB update into a request cost a pipelined R = 3 chain about 5% of its servers' CPU.
const COPIED_BULK_MAX: usize = 32 << 10;
/// Most messages sent from where they lie in one request: each adds its bulk and the body
/// after it to the request's parts.
const UNCOPIED_PER_REQUEST_MAX: usize = (tessera_transport::SEND_PARTS_MAX - 1) / 2;
/// Most requests a peer's thread keeps in flight on one link: the next goes into the socket
/// while the peer applies and forwards the last, instead of the link idling for a round trip
/// between requests. A request of large updates carries only a few of them
/// ([`UNCOPIED_PER_REQUEST_MAX`]), so with one in flight a chain of MiB pushes moved one or
/// two at a time, stop and wait at every hop.
const PEER_IN_FLIGHT_MAX: usize = 2;

/// A peer's queue of (its shard, the message), its links, and its thread, unparked at each
/// message.
#[derive(Clone)]
struct PeerQueue {
    tx: Sender<(u16, Msg)>,
    links: Arc<Mutex<PeerLinks>>,
    thread: std::thread::Thread,
}

impl std::fmt::Debug for PeerQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerQueue").field("queued", &self.tx.len()).finish_non_exhaustive()
    }
}

/// A peer's links, one per shard of the peer, shared by the peer's thread and this server's
/// shards. Whoever holds the lock may send; the thread holds it from taking messages off the
/// queue until they are sent, and a shard sends only when the queue is empty, so messages leave
/// in the order they were queued.
#[derive(Default)]
struct PeerLinks {
    links: HashMap<u16, Linked>,
    /// The peer's shards whose link carries a request a shard started, the reply not yet taken.
    started: Vec<u16>,
}

/// What a server does with each configuration it hears of: hand it to its shards.
pub type OnConfig = Arc<dyn Fn(Arc<ClusterConfig>) + Send + Sync>;

/// What a server does with each message a peer's reply carried back (acknowledgements, see
/// `ChainShard::serve_peer`): hand it to shard `u16` as from that peer.
pub type OnReplied = Arc<dyn Fn(u16, NodeId, Msg) + Send + Sync>;

/// The newest configuration this server has heard of, shared by its outbox threads.
pub type Latest = Arc<Mutex<Option<Arc<ClusterConfig>>>>;

/// A server's outgoing replication traffic. Cheap to clone; one per shard.
#[derive(Debug, Clone)]
pub struct Outbox {
    me: NodeId,
    dialer: Dialer,
    latest: Latest,
    coordinator: Sender<Msg>,
    /// Each peer's queue, made once per server.
    peers: Arc<Mutex<HashMap<NodeId, PeerQueue>>>,
    /// This handle's copies of the queues it used, so a shard takes the lock once per peer.
    local: HashMap<NodeId, PeerQueue>,
    /// Where a shard encodes a request it starts itself.
    direct_body: Vec<u8>,
    /// Where a shard copies a reply it takes itself, and the messages decoded from it: buffers
    /// kept, so taking a reply allocates nothing.
    reply_body: Vec<u8>,
    reply_msgs: Vec<Msg>,
    on_replied: Replied,
    /// Set for good once this server's log failed ([`fail_stop`](Self::fail_stop)).
    silenced: Arc<AtomicBool>,
    /// A coordinator hears this server's heartbeats (not so for a standalone server's).
    coordinated: bool,
    /// The peers' links (node, its shard) on which this shard started requests whose replies it
    /// takes itself ([`take_own_replies`](Self::take_own_replies)).
    own: Vec<(NodeId, u16)>,
    /// Which of each such link's sockets ([`Linked::made`]) this shard's poll watches.
    watched: HashMap<(NodeId, u16), u64>,
    /// Sockets made since, for the shard's poll to watch ([`sockets_to_watch`](Self::sockets_to_watch)).
    to_watch: Vec<RawFd>,
}

/// [`OnReplied`], shown by name.
#[derive(Clone)]
struct Replied(OnReplied);

impl std::fmt::Debug for Replied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnReplied")
    }
}

impl Outbox {
    /// Starts the coordinator's thread. `on_config` runs for each configuration heard of (the
    /// shards ignore those they have seen): on that thread, and on etcd's for those watched.
    /// Peers are reached through `dialer`: over RDMA when both ends have it. `on_replied` takes
    /// what peers' replies carry back, on the peers' threads.
    pub fn start(me: NodeId, coordinator: Locator, dialer: Dialer, on_config: OnConfig, on_replied: OnReplied) -> Outbox {
        let latest: Latest = Arc::default();
        let (tx, rx) = channel::bounded(OUT_QUEUE_MAX);
        #[cfg(feature = "etcd")]
        if let Locator::Etcd(etcd) = &coordinator {
            let (latest, on_config) = (latest.clone(), on_config.clone());
            etcd.watch_config(Box::new(move |view| {
                if let Some(config) = view.config {
                    deliver(&latest, &*on_config, Arc::new(config));
                }
            }));
        }
        let shared = latest.clone();
        let link_dialer = dialer.clone();
        let silenced: Arc<AtomicBool> = Arc::default();
        let quiet = silenced.clone();
        std::thread::Builder::new()
            .name("tessera-coord-out".into())
            .spawn(move || heartbeats(me, &coordinator, &link_dialer, &rx, &shared, &*on_config, &quiet))
            .expect("a thread for the coordinator's link");
        Outbox {
            me,
            dialer,
            latest,
            coordinator: tx,
            peers: Arc::default(),
            local: HashMap::new(),
            direct_body: Vec::new(),
            reply_body: Vec::new(),
            reply_msgs: Vec::new(),
            on_replied: Replied(on_replied),
            silenced,
            coordinated: true,
            own: Vec::new(),
            watched: HashMap::new(),
            to_watch: Vec::new(),
        }
    }

    /// The outbox of a server that is its own cluster, with no coordinator: `config` (which
    /// puts it alone on every chain) is the only configuration, and heartbeats go nowhere.
    pub fn alone(me: NodeId, dialer: Dialer, config: Arc<ClusterConfig>, on_replied: OnReplied) -> Outbox {
        // Nothing takes heartbeats: `to_coordinator` finds the queue closed and drops them.
        let (tx, _) = channel::bounded(1);
        Outbox {
            me,
            dialer,
            latest: Arc::new(Mutex::new(Some(config))),
            coordinator: tx,
            peers: Arc::default(),
            local: HashMap::new(),
            direct_body: Vec::new(),
            reply_body: Vec::new(),
            reply_msgs: Vec::new(),
            on_replied: Replied(on_replied),
            silenced: Arc::default(),
            coordinated: false,
            own: Vec::new(),
            watched: HashMap::new(),
            to_watch: Vec::new(),
        }
    }

    /// Whether a coordinator hears this server's heartbeats.
    pub fn coordinated(&self) -> bool {
        self.coordinated
    }

    /// The newest configuration heard of.
    pub fn latest(&self) -> Option<Arc<ClusterConfig>> {
        self.latest.lock().expect("no panics under this lock").clone()
    }

    /// Queues `msg` (a heartbeat) for the coordinator, unless this server has stopped them.
    pub fn to_coordinator(&self, msg: Msg) {
        if !self.silenced.load(Ordering::Acquire) {
            let _ = self.coordinator.try_send(msg);
        }
    }

    /// Stops this server's heartbeats for good, every shard's: its log failed, so it can make
    /// nothing durable again, and the coordinator is to take it for failed and carry its chains
    /// on without it (a range whose only member it is keeps it: the range waits for its
    /// restart rather than lose its data). True for the call that stopped them.
    pub fn fail_stop(&self) -> bool {
        !self.silenced.swap(true, Ordering::AcqRel)
    }

    /// Sends `msg` to `node`'s shard `shard`: at once when the peer's thread is idle and its
    /// link to that shard is up and free, else through the peer's queue.
    pub fn to_node(&mut self, node: NodeId, shard: u16, msg: Msg) {
        let peer = match self.local.get(&node) {
            Some(peer) => peer,
            None => {
                let peer = self.queue(node);
                self.local.entry(node).or_insert(peer)
            }
        };
        match start_now(peer, shard, self.me, &msg, &mut self.direct_body) {
            Started::No => {}
            Started::OneWay => return,
            Started::ThreadTakes => {
                peer.thread.unpark();
                return;
            }
            Started::ShardTakes { socket, made } => {
                if !self.own.contains(&(node, shard)) {
                    self.own.push((node, shard));
                }
                if self.watched.insert((node, shard), made) != Some(made) {
                    self.to_watch.push(socket);
                }
                return;
            }
        }
        match peer.tx.try_send((shard, msg)) {
            Ok(()) => peer.thread.unpark(),
            Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => {
                self.local.remove(&node);
            }
        }
    }

    /// Sockets of peers' links this shard has started requests on since it last asked, new to
    /// it: its poll is to watch them (readable), since the replies come there. A link remade is
    /// a new socket, watched anew; a closed one leaves the poll by itself.
    pub fn sockets_to_watch(&mut self) -> impl Iterator<Item = RawFd> + '_ {
        self.to_watch.drain(..)
    }

    /// Takes, without waiting, the replies that came to requests this shard started on peers'
    /// TCP links, and hands each peer's acknowledgements to `replied` (in a buffer the outbox
    /// keeps: take the messages out of it). A peer whose links are held has its thread woken to
    /// take them instead (see the module's notes).
    pub fn take_own_replies(&mut self, replied: &mut dyn FnMut(NodeId, &mut Vec<Msg>)) {
        let Outbox { own, local, reply_body, reply_msgs, .. } = self;
        let mut i = 0;
        while let Some(&(node, shard)) = own.get(i) {
            let Some(peer) = local.get(&node) else {
                own.swap_remove(i);
                continue;
            };
            let Ok(mut held) = peer.links.try_lock() else {
                peer.thread.unpark();
                i += 1;
                continue;
            };
            let Some(linked) = held.links.get_mut(&shard) else {
                drop(held);
                own.swap_remove(i);
                continue;
            };
            while linked.in_flight() > 0 {
                let Some(got) = linked.take_reply_now_into(reply_body) else { break };
                if got {
                    decode_peer_reply(node, reply_body, reply_msgs);
                    if !reply_msgs.is_empty() {
                        replied(node, reply_msgs);
                        reply_msgs.clear();
                    }
                }
            }
            let done = linked.in_flight() == 0;
            drop(held);
            if done {
                own.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// `node`'s queue, links and thread, made on first use.
    fn queue(&self, node: NodeId) -> PeerQueue {
        let mut peers = self.peers.lock().expect("no panics under this lock");
        let peer = peers.entry(node).or_insert_with(|| {
            let (tx, rx) = channel::bounded(OUT_QUEUE_MAX);
            let links: Arc<Mutex<PeerLinks>> = Arc::default();
            let (me, dialer, latest, on_replied, shared) = (self.me, self.dialer.clone(), self.latest.clone(), self.on_replied.0.clone(), links.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tessera-peer-{node}"))
                .spawn(move || to_peer(me, node, &dialer, &rx, &shared, &latest, &*on_replied))
                .expect("a thread for a peer's links");
            PeerQueue { tx, links, thread: thread.thread().clone() }
        });
        peer.clone()
    }
}

/// What [`start_now`] did with a message.
enum Started {
    /// Nothing: the message is to be queued for the peer's thread.
    No,
    /// Sent wanting no reply (acknowledgements over TCP: [`one_way`]), or lost with its link:
    /// there is nothing to take.
    OneWay,
    /// Started (or lost with its link), the peer's thread to take the reply.
    ThreadTakes,
    /// Started on a TCP link, the shard to take the reply when `socket` turns readable;
    /// `made` tells that link's sockets apart ([`Linked::made`]).
    ShardTakes { socket: RawFd, made: u64 },
}

/// Whether a request of `msgs` goes wanting no reply
/// ([`NO_REPLY`](tessera_transport::wire::flags::NO_REPLY)), on a link that
/// can send so (TCP): acknowledgements only. Their receiver, the sender's predecessor in the
/// chain, owes the sender nothing back, so the reply would come empty: one message less per
/// acknowledgement, and no reply for anyone to wake for.
fn one_way<'a>(mut msgs: impl Iterator<Item = &'a Msg>) -> bool {
    msgs.all(|m| matches!(m, Msg::Ack { .. }))
}

/// Starts `msg` as a request on `peer`'s link to its shard `shard` if nothing waits before it:
/// the peer's queue is empty, no one else holds its links, and that link is up with nothing in
/// flight (an acknowledgement over TCP goes behind what is in flight, wanting no reply). Says
/// who is to take the reply, or that the message must be queued instead.
fn start_now(peer: &PeerQueue, shard: u16, me: NodeId, msg: &Msg, body: &mut Vec<u8>) -> Started {
    if codec::bulk_len(msg) > DIRECT_BODY_MAX {
        return Started::No;
    }
    let Ok(mut held) = peer.links.try_lock() else { return Started::No };
    if !peer.tx.is_empty() {
        return Started::No;
    }
    let PeerLinks { links, started } = &mut *held;
    let Some(linked) = links.get_mut(&shard).filter(|l| l.link.is_some()) else { return Started::No };
    if one_way(std::iter::once(msg)) && linked.link.as_ref().is_some_and(Caller::sends_one_way) {
        body.clear();
        codec::encode_batch(std::iter::once(msg), body);
        if let Err(e) = linked.link.as_mut().expect("checked above").start_one_way(&mut replicate_header(me), &[body]) {
            tracing::debug!(addr = linked.addr, error = %e, "replication message lost");
            linked.link = None;
        }
        return Started::OneWay;
    }
    if linked.in_flight() > 0 {
        return Started::No;
    }
    body.clear();
    codec::encode_batch(std::iter::once(msg), body);
    if body.len() > DIRECT_BODY_MAX || linked.link.as_ref().and_then(Caller::fast_body_max).is_some_and(|max| body.len() + 256 > max) {
        return Started::No;
    }
    let link = linked.link.as_mut().expect("checked above");
    match link.start(&mut replicate_header(me), body) {
        Ok(()) => match link.tcp_socket() {
            Some(socket) => Started::ShardTakes { socket, made: linked.made },
            None => {
                started.push(shard);
                Started::ThreadTakes
            }
        },
        Err(e) => {
            // Whether any of it left is unknown: the link is remade and the message dropped,
            // which the protocol resends.
            tracing::debug!(addr = linked.addr, error = %e, "replication message lost");
            linked.link = None;
            Started::ThreadTakes
        }
    }
}

/// The header of a `Replicate` request from `me`.
fn replicate_header(me: NodeId) -> Header {
    let mut header = Header::request(Op::Replicate, 0);
    header.worker = me.0;
    header
}

/// Decodes the messages of a reply from `node` into `msgs` (cleared first); a malformed reply
/// is said and leaves none (acknowledgements are resent).
fn decode_peer_reply(node: NodeId, reply: &[u8], msgs: &mut Vec<Msg>) {
    msgs.clear();
    if let Err(e) = codec::decode_batch_into(reply, None, &mut codec::PayloadPool::unkept(), msgs) {
        msgs.clear();
        tracing::warn!(peer = node.0, error = %e, "a peer's reply to replication is malformed; ignored");
    }
}

/// A link to one place, remade when the place moves or the link breaks.
struct Linked {
    addr: String,
    link: Option<Caller>,
    retry_at: Instant,
    /// Why the other end last refused a message (the link itself is fine).
    refused: Option<String>,
    /// Links made so far: tells a remade link's socket from the last one's, whose descriptor
    /// number it may have taken over.
    made: u64,
}

impl Linked {
    fn new() -> Self {
        Self { addr: String::new(), link: None, retry_at: Instant::now(), refused: None, made: 0 }
    }

    /// Sends `msg` as a `Replicate` request from `me` and returns the reply's body; `None` when
    /// it could not go (dropped: the protocol resends).
    fn send(&mut self, addr: &str, shard: u64, me: NodeId, dialer: &Dialer, msg: &Msg) -> Option<Vec<u8>> {
        let mut body = Vec::new();
        codec::encode(msg, &mut body);
        if !self.start_parts(addr, shard, me, dialer, &[&body], false) {
            return None;
        }
        self.take_reply_into(&mut body).then_some(body)
    }

    /// The largest batch to send at once: what fits the link's fast path (an RDMA slot) when it
    /// has one, else a frame, less room for the header and a message's length.
    fn body_max(&self, dialer: &Dialer) -> usize {
        let fast = self.link.as_ref().and_then(Caller::fast_body_max);
        fast.unwrap_or(dialer.cfg.frame_bytes_max).saturating_sub(256)
    }

    /// Starts a body in `parts` as a `Replicate` request from `me` without waiting for its
    /// reply, which [`take_reply`](Self::take_reply) takes later, in the order started; with
    /// `one_way`, on a link that can ([`Caller::sends_one_way`]), wanting no reply at all. False
    /// when it could not go (dropped: the protocol resends); the link is then remade, and what
    /// was in flight on it is lost too.
    fn start_parts(&mut self, addr: &str, shard: u64, me: NodeId, dialer: &Dialer, parts: &[&[u8]], one_way: bool) -> bool {
        if self.addr != addr {
            self.addr = addr.to_string();
            self.link = None;
        }
        if self.link.is_none() {
            if Instant::now() < self.retry_at {
                return false;
            }
            match dialer.caller(addr, shard, me.0, ServerInfo::serves_rdma) {
                Ok(link) => {
                    self.link = Some(link);
                    self.made += 1;
                }
                Err(e) => {
                    tracing::debug!(addr, error = %e, "replication link down");
                    self.retry_at = Instant::now() + RECONNECT_BACKOFF;
                    return false;
                }
            }
        }
        let link = self.link.as_mut().expect("made above");
        let started = match one_way && link.sends_one_way() {
            true => link.start_one_way(&mut replicate_header(me), parts),
            false => link.start_parts(&mut replicate_header(me), parts),
        };
        match started {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(addr = self.addr, error = %e, "replication message lost");
                self.link = None;
                false
            }
        }
    }

    /// Requests started on this link whose replies are not taken.
    fn in_flight(&self) -> usize {
        self.link.as_ref().map_or(0, Caller::in_flight)
    }

    /// Whether a request of `bytes` may start now, behind what is in flight (see
    /// [`Caller::can_start_len`]); always so on a link still to be made.
    fn can_start_len(&self, bytes: usize) -> bool {
        self.link.as_ref().is_none_or(|l| l.can_start_len(bytes))
    }

    /// Waits for the reply to the oldest request in flight on this link, and copies it into
    /// `body`: `false` when none comes (refused, or the link lost: see
    /// [`replied`](Self::replied)).
    fn take_reply_into(&mut self, body: &mut Vec<u8>) -> bool {
        let Some(link) = self.link.as_mut() else { return false };
        let finished = link.finish_into(None, body);
        self.replied(finished).is_some()
    }

    /// The reply to the oldest request in flight if it has come, without waiting, copied into
    /// `body`: `None` when it has not; `Some(true)` when it has; `Some(false)` when it will not
    /// (refused, or the link lost: see [`replied`](Self::replied)).
    fn take_reply_now_into(&mut self, body: &mut Vec<u8>) -> Option<bool> {
        match self.link.as_mut()?.finish_into(Some(Duration::ZERO), body) {
            Err(TransportError::Timeout { .. }) => None,
            finished => Some(self.replied(finished.map(|_| ())).is_some()),
        }
    }

    /// What a reply brought, or `None` after noting why there is none: a refusal (the link is
    /// fine), or a lost link, remade at the next send.
    fn replied<T>(&mut self, reply: tessera_transport::Result<T>) -> Option<T> {
        match reply {
            Ok(reply) => Some(reply),
            Err(TransportError::Refused { reason, .. }) => {
                self.refused = Some(reason);
                None
            }
            Err(e) => {
                tracing::debug!(addr = self.addr, error = %e, "replication message lost");
                self.link = None;
                None
            }
        }
    }
}

/// How often a coordinator's refusal of this server's heartbeats is logged again.
const REFUSAL_REPEAT: Duration = Duration::from_secs(10);

fn heartbeats(
    me: NodeId,
    coordinator: &Locator,
    dialer: &Dialer,
    rx: &Receiver<Msg>,
    latest: &Latest,
    on_config: &dyn Fn(Arc<ClusterConfig>),
    silenced: &AtomicBool,
) {
    let mut linked = Linked::new();
    let mut addr: Option<String> = None;
    let mut refusal_said = None;
    loop {
        let first = match rx.recv_timeout(SILENT_CONFIG_GAP) {
            Ok(first) => first,
            Err(channel::RecvTimeoutError::Timeout) => {
                if silenced.load(Ordering::Acquire) {
                    // Heartbeats stopped (see `Outbox::fail_stop`): the configurations that
                    // take this server out of its chains are asked for instead.
                    let asked = coordinator.resolve().ok().and_then(|at| tessera_transport::ask(&at, Op::ClusterConfig, &[], &dialer.cfg).ok());
                    if let Some(ClusterView { config: Some(config), .. }) = asked.and_then(|body| serde_json::from_slice(&body).ok()) {
                        deliver(latest, on_config, Arc::new(config));
                    }
                }
                continue;
            }
            Err(channel::RecvTimeoutError::Disconnected) => return,
        };
        let msg = newest_heartbeat(first, rx);
        if addr.is_none() {
            match coordinator.resolve() {
                Ok(found) => addr = Some(found),
                Err(e) => {
                    tracing::debug!(error = %e, "no coordinator to heartbeat to");
                    continue;
                }
            }
        }
        let Some(reply) = linked.send(addr.as_deref().expect("resolved above"), CONTROL_SHARD, me, dialer, &msg) else {
            if let Some(reason) = linked.refused.take() {
                // Refused, not lost: a server of another cluster, say. Said now and then, not
                // at every heartbeat.
                if refusal_said.is_none_or(|at: Instant| at.elapsed() >= REFUSAL_REPEAT) {
                    tracing::error!(reason, "the coordinator refuses this server's heartbeats");
                    refusal_said = Some(Instant::now());
                }
            }
            addr = None; // it may have moved (another coordinator elected)
            continue;
        };
        if reply.is_empty() {
            continue;
        }
        match codec::decode(&reply) {
            // The coordinator answers with the configuration whenever a heartbeat shows an
            // older one: hand it on each time, since some shard is behind (they ignore old ones).
            Ok(Msg::Config(config)) => deliver(latest, on_config, config),
            Ok(other) => tracing::warn!(kind = other.kind(), "the coordinator answered a heartbeat with something else"),
            Err(e) => tracing::warn!(error = %e, "the coordinator's answer is malformed"),
        }
    }
}

/// Most heartbeats folded into one: all that can queue, in practice (each shard queues one per
/// heartbeat interval).
const HEARTBEATS_FOLDED_MAX: usize = OUT_QUEUE_MAX;

/// `first`, with every heartbeat queued behind it folded in: one heartbeat that carries each
/// range's newest report, and the oldest configuration any of them knew (so that the reply
/// brings a newer one if a shard lacks it). A heartbeat tells the coordinator the state now;
/// sent one by one, those that queued while a slow round trip was out (an overloaded machine,
/// an emulated guest) reach it ever later, and it then sees a live server through reports
/// minutes old: a learner its tail had long synced was never promoted, and the chain never
/// healed (the kill test over RDMA in the SoftRoCE guest).
fn newest_heartbeat(first: Msg, rx: &Receiver<Msg>) -> Msg {
    let Msg::Heartbeat { node, incarnation, mut addr, cluster, mut config_id, ranges } = first else { return first };
    let mut newest: BTreeMap<RangeId, RangeReport> = ranges.into_iter().map(|r| (r.range, r)).collect();
    for _ in 0..HEARTBEATS_FOLDED_MAX {
        match rx.try_recv() {
            Ok(Msg::Heartbeat { addr: later, config_id: known, ranges, .. }) => {
                addr = later;
                config_id = config_id.min(known);
                newest.extend(ranges.into_iter().map(|r| (r.range, r)));
            }
            Ok(other) => tracing::warn!(kind = other.kind(), "only heartbeats go to the coordinator; dropped"),
            Err(_) => break,
        }
    }
    Msg::Heartbeat { node, incarnation, addr, cluster, config_id, ranges: newest.into_values().collect() }
}

/// Notes `config` as the newest if it is, and hands it to the shards.
fn deliver(latest: &Latest, on_config: &dyn Fn(Arc<ClusterConfig>), config: Arc<ClusterConfig>) {
    let mut held = latest.lock().expect("no panics under this lock");
    if held.as_ref().is_none_or(|c| c.id < config.id) {
        tracing::info!(config = config.id, "new cluster configuration");
        *held = Some(config.clone());
    }
    drop(held);
    on_config(config);
}

/// One peer's thread: takes the replies to requests shards started on the peer's links, and
/// sends what its shards queued, in order, each shard's messages batched
/// ([`codec::encode_batch`]) into requests of at most [`PEER_BATCH_MAX`] messages and what the
/// link carries fastest ([`Linked::body_max`]); a single message larger than that (a snapshot)
/// still goes, over the link's slower path. With nothing to do it waits parked (the shards
/// unpark it): never spinning or yielding, which on a loaded machine hands the core to another
/// thread for a whole time slice while a message may already wait.
fn to_peer(
    me: NodeId,
    node: NodeId,
    dialer: &Dialer,
    rx: &Receiver<(u16, Msg)>,
    shared: &Mutex<PeerLinks>,
    latest: &Latest,
    on_replied: &dyn Fn(u16, NodeId, Msg),
) {
    let mut replies = PeerReplies { node, on_replied, body: Vec::new(), msgs: Vec::new() };
    let mut queued: Vec<(u16, Msg)> = Vec::with_capacity(PEER_BATCH_MAX);
    let mut requests: HashMap<u16, PeerRequest> = HashMap::new();
    loop {
        let mut held = shared.lock().expect("no panics under this lock");
        let PeerLinks { links, started } = &mut *held;
        for shard in started.drain(..) {
            if let Some(linked) = links.get_mut(&shard) {
                replies.take(shard, linked);
            }
        }
        while queued.len() < PEER_BATCH_MAX {
            match rx.try_recv() {
                Ok(more) => queued.push(more),
                Err(channel::TryRecvError::Empty) => break,
                Err(channel::TryRecvError::Disconnected) => return,
            }
        }
        if queued.is_empty() {
            // Nothing new: wait for a reply still out (a link's oldest), then look at the queue
            // again.
            if let Some((shard, linked)) = links.iter_mut().find(|(_, l)| l.in_flight() > 0) {
                replies.take(*shard, linked);
                continue;
            }
            drop(held);
            std::thread::park_timeout(PEER_PARK_MAX);
            continue;
        }
        let addr = latest.lock().expect("no panics under this lock").as_ref().and_then(|c| c.member(node).map(|m| m.addr.clone()));
        let Some(addr) = addr else {
            queued.clear();
            continue;
        };
        for (shard, msg) in queued.drain(..) {
            let request = requests.entry(shard).or_default();
            let linked = links.entry(shard).or_insert_with(Linked::new);
            let body_max = linked.body_max(dialer);
            // Encoded into the request (a large one's bulk left out, to be sent from where it
            // lies); encoded again into the next request when what came before must go first.
            let at = request.body.len();
            let bulk = request.encode(&msg);
            let full = bulk > 0 && request.uncopied.len() == UNCOPIED_PER_REQUEST_MAX;
            if at > 0 && (request.bytes() + bulk > body_max || full) {
                // Too much for one request: what came before goes first.
                request.body.truncate(at);
                request.start(linked, &addr, me, dialer, shard, &mut replies);
                request.encode(&msg);
            }
            if bulk > 0 {
                request.uncopied.push((request.body.len(), msg));
            }
        }
        for (shard, request) in requests.iter_mut().filter(|(_, r)| !r.is_empty()) {
            request.start(links.entry(*shard).or_insert_with(Linked::new), &addr, me, dialer, *shard, &mut replies);
        }
    }
}

/// How a peer's thread takes the replies to its requests: each into buffers it keeps, each
/// message handed on by itself, so taking one allocates nothing.
struct PeerReplies<'a> {
    node: NodeId,
    on_replied: &'a dyn Fn(u16, NodeId, Msg),
    body: Vec<u8>,
    msgs: Vec<Msg>,
}

impl PeerReplies<'_> {
    /// Waits for the reply to the oldest request in flight on `linked`, the link to the peer's
    /// shard `shard`, and hands on what it carried.
    fn take(&mut self, shard: u16, linked: &mut Linked) {
        if linked.take_reply_into(&mut self.body) {
            decode_peer_reply(self.node, &self.body, &mut self.msgs);
            self.msgs.drain(..).for_each(|msg| (self.on_replied)(shard, self.node, msg));
        }
    }
}

/// A request a peer's thread puts together for one of the peer's shards: a batch of messages
/// ([`codec::encode_batch`]), each encoded into `body` but for the bulk of a large one, which
/// is sent from the message, where it lies.
struct PeerRequest {
    body: Vec<u8>,
    /// The large messages, each after the body's bytes up to its offset.
    uncopied: Vec<(usize, Msg)>,
    /// Every message encoded is one that goes wanting no reply ([`one_way`]).
    one_way: bool,
}

impl Default for PeerRequest {
    fn default() -> Self {
        Self { body: Vec::new(), uncopied: Vec::new(), one_way: true }
    }
}

impl PeerRequest {
    fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// Encodes `msg` into the body, all of it or (a large one) all but its bulk, which is sent
    /// from the message; returns the length of the bulk left out. Bulk lands aligned in the
    /// request as sent (see [`codec::BULK_ALIGN`]), the uncopied bulks ahead of it counted.
    fn encode(&mut self, msg: &Msg) -> usize {
        self.one_way &= one_way(std::iter::once(msg));
        let elsewhere = self.uncopied_bytes();
        match codec::bulk_len(msg) > COPIED_BULK_MAX {
            true => codec::encode_batch_head(msg, &mut self.body, elsewhere).len(),
            false => {
                codec::encode_batch_after(std::iter::once(msg), &mut self.body, elsewhere);
                0
            }
        }
    }

    /// The request's body bytes, bulk included.
    fn bytes(&self) -> usize {
        self.body.len() + self.uncopied_bytes()
    }

    /// The bulk bytes sent from the large messages, not from `body`.
    fn uncopied_bytes(&self) -> usize {
        self.uncopied.iter().map(|(_, m)| codec::bulk_len(m)).sum()
    }

    /// Starts the request on `linked` and empties it. Replies taken first, to keep at most
    /// [`PEER_IN_FLIGHT_MAX`] requests out (or to let this one take the link's other path),
    /// are handed on by `replies`.
    fn start(&mut self, linked: &mut Linked, addr: &str, me: NodeId, dialer: &Dialer, shard: u16, replies: &mut PeerReplies<'_>) {
        let mut parts: [&[u8]; tessera_transport::SEND_PARTS_MAX] = [&[]; tessera_transport::SEND_PARTS_MAX];
        let (mut count, mut from) = (0, 0);
        for (cut, msg) in &self.uncopied {
            (parts[count], parts[count + 1]) = (&self.body[from..*cut], codec::bulk(msg));
            (count, from) = (count + 2, *cut);
        }
        parts[count] = &self.body[from..];
        let parts = &parts[..count + 1];
        let bytes = parts.iter().map(|p| p.len()).sum();
        // A request that wants no reply goes behind what is in flight (TCP keeps the order).
        let waits = !(self.one_way && linked.link.as_ref().is_some_and(Caller::sends_one_way));
        while waits && (linked.in_flight() >= PEER_IN_FLIGHT_MAX || !linked.can_start_len(bytes)) {
            replies.take(shard, linked);
        }
        linked.start_parts(addr, shard as u64, me, dialer, parts, self.one_way);
        self.body.clear();
        self.uncopied.clear();
        self.one_way = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_replication::protocol::Epoch;
    use tessera_transport::wire::flags;

    /// An update of range 0 to `version`, with a small delta.
    fn forward(version: u64) -> Msg {
        let delta = vec![version as u8; 8].into();
        Msg::Forward { range: RangeId(0), epoch: Epoch(1), version, digest: 0, clock: Arc::from(vec![0u32; 4]), delta, durable: 0 }
    }

    fn heartbeat(config_id: u64, reports: &[(u32, u64)]) -> Msg {
        let report = |&(range, version): &(u32, u64)| RangeReport {
            range: RangeId(range),
            epoch: Epoch(1),
            installed: true,
            version,
            committed: version,
            ticks: version,
            learner_synced: false,
        };
        Msg::Heartbeat { node: NodeId(1), incarnation: 7, addr: "a:1".into(), cluster: 3, config_id, ranges: reports.iter().map(report).collect() }
    }

    /// What a peer got: the range and version of each `Ack` and `Forward`, in the order they
    /// arrived, how many messages each request carried, which requests wanted no reply (by
    /// whether they carried only acknowledgements), and how many forwards' deltas were not
    /// what the tests send (every byte the version's low byte), or had to be copied out of the
    /// request's frame (only a large, aligned one is a view of it).
    #[derive(Default)]
    struct Got {
        acks: Vec<(u32, u64)>,
        per_request: Vec<usize>,
        /// Requests that wanted no reply, and the others: (acknowledgements only, wanted none).
        one_way: Vec<(bool, bool)>,
        bad_deltas: usize,
        copied_deltas: usize,
    }

    struct Recorder(Arc<Mutex<Got>>);

    impl tessera_transport::Service for Recorder {
        fn serve(&mut self, request: tessera_transport::Request<'_>, reply: &mut tessera_transport::Reply<'_>) {
            let mut msgs = Vec::new();
            let frame = request.shared.map(|buf| tessera_replication::protocol::Payload::whole(buf.clone()));
            let frame = frame.as_ref();
            codec::decode_batch_into(request.body, frame, &mut codec::PayloadPool::default(), &mut msgs).expect("a batch of messages");
            let mut got = self.0.lock().unwrap();
            let viewed = |delta: &[u8]| frame.is_some_and(|f| f.as_ptr_range().contains(&delta.as_ptr()));
            got.copied_deltas += msgs.iter().filter(|m| matches!(m, Msg::Forward { delta, .. } if !viewed(delta))).count();
            got.per_request.push(msgs.len());
            got.one_way.push((one_way(msgs.iter()), request.header.flags & flags::NO_REPLY != 0));
            got.bad_deltas += msgs.iter().filter(|m| matches!(m, Msg::Forward { version, delta, .. } if delta.iter().any(|b| *b != *version as u8))).count();
            got.acks.extend(msgs.iter().filter_map(|m| match m {
                Msg::Ack { range, version, .. } | Msg::Forward { range, version, .. } => Some((range.0, *version)),
                _ => None,
            }));
            // Each update is acknowledged in the reply, as a tail would.
            let acks: Vec<Msg> = msgs
                .iter()
                .filter_map(|m| match m {
                    Msg::Forward { range, epoch, version, .. } => Some(Msg::Ack { range: *range, epoch: *epoch, version: *version }),
                    _ => None,
                })
                .collect();
            let mut answer = Vec::new();
            codec::encode_batch(&acks, &mut answer);
            reply.ok_bytes(&answer);
        }
    }

    /// A peer (node 2, one shard) that records what it is sent and answers each request with
    /// an acknowledgement of each update it carried, and an outbox of node 1 that knows it, whose peer's
    /// thread hands the replies it takes to `on_replied`.
    struct RecordingPeer {
        seen: Arc<Mutex<Got>>,
        stop: Arc<std::sync::atomic::AtomicBool>,
        serving: [std::thread::JoinHandle<()>; 2],
        outbox: Outbox,
    }

    impl RecordingPeer {
        fn start(on_replied: OnReplied) -> RecordingPeer {
            let info = ServerInfo { version: "test".into(), shards: 1, frame_bytes_max: 1 << 20, workers_max: 4, rdma: false, cluster: 0, alone: false };
            let cfg = tessera_transport::TransportConfig::default();
            let (control, shards, addr) = tessera_transport::tcp::bind("127.0.0.1:0", 1, &cfg, serde_json::to_vec(&info).unwrap().into()).unwrap();
            let (mut control, mut shard) = (Some(control), shards.into_iter().next());
            let seen: Arc<Mutex<Got>> = Arc::default();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let serving = [(seen.clone(), stop.clone(), true), (Arc::default(), stop.clone(), false)].map(|(seen, stop, is_shard)| {
                let mut endpoint: Box<dyn tessera_transport::ShardTransport> =
                    if is_shard { Box::new(shard.take().unwrap()) } else { Box::new(control.take().unwrap()) };
                std::thread::spawn(move || {
                    let mut recorder = Recorder(seen);
                    while !stop.load(std::sync::atomic::Ordering::Acquire) {
                        endpoint.poll(&mut recorder, Some(Duration::from_millis(5))).unwrap();
                    }
                })
            });
            let dialer = Dialer { cfg: cfg.clone(), chosen: tessera_transport::select::Chosen::Tcp, rdma: Default::default(), required: false };
            let outbox = Outbox::start(NodeId(1), Locator::At("127.0.0.1:1".into()), dialer, Arc::new(|_| {}), on_replied);
            let peer = tessera_replication::protocol::Member { node: NodeId(2), incarnation: 1, addr: addr.to_string(), draining: false };
            let config = ClusterConfig { id: 1, members: vec![peer], chains: Vec::new(), drained: Vec::new(), cluster: 1 };
            *outbox.latest.lock().unwrap() = Some(Arc::new(config));
            RecordingPeer { seen, stop, serving, outbox }
        }

        /// Waits up to 30 s for `count` recorded messages, stops the peer and returns what it got.
        fn stop_after(self, count: usize) -> Got {
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.seen.lock().unwrap().acks.len() < count && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.stop.store(true, std::sync::atomic::Ordering::Release);
            self.serving.into_iter().for_each(|t| t.join().unwrap());
            std::mem::take(&mut *self.seen.lock().unwrap())
        }
    }

    /// Two shards send one peer thousands of messages as fast as they can: some start on the
    /// peer's link themselves (it is idle), the rest queue behind the peer's thread while it
    /// sends. Every message arrives, and each shard's in the order it sent them. Before that,
    /// both ways are made to happen: a first message, sent before the link is up, goes alone
    /// from the peer's thread; ten sent while the peer's links are held (as while the thread
    /// sends) queue, and go as one batch.
    #[test]
    fn a_peer_gets_each_shards_messages_in_order_whether_started_by_the_shard_or_queued() {
        const EACH: u64 = 2000; // two shards' worth stays below OUT_QUEUE_MAX
        const HELD: u64 = 10;
        let peer = RecordingPeer::start(Arc::new(|_, _, _| {}));
        let ack = |range: u32, version: u64| Msg::Ack { range: RangeId(range), epoch: Epoch(1), version };
        let mut outbox = peer.outbox.clone();
        outbox.to_node(NodeId(2), 0, ack(2, 1));
        let deadline = Instant::now() + Duration::from_secs(30);
        while peer.seen.lock().unwrap().acks.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let links = outbox.queue(NodeId(2)).links;
        let held = links.lock().unwrap();
        (2..2 + HELD).for_each(|v| outbox.to_node(NodeId(2), 0, ack(2, v)));
        drop(held);
        let senders: Vec<_> = (0..2u32)
            .map(|range| {
                let mut shard_outbox = peer.outbox.clone();
                std::thread::spawn(move || {
                    for v in 1..=EACH {
                        shard_outbox.to_node(NodeId(2), 0, ack(range, v));
                        if v % 16 == 0 {
                            // Now and then the peer's thread catches up and goes idle.
                            std::thread::sleep(Duration::from_micros(300));
                        }
                    }
                })
            })
            .collect();
        senders.into_iter().for_each(|s| s.join().unwrap());
        let got = peer.stop_after(2 * EACH as usize + 1 + HELD as usize);
        for range in 0..3u32 {
            let versions: Vec<u64> = got.acks.iter().filter(|(r, _)| *r == range).map(|(_, v)| *v).collect();
            let sent = if range == 2 { 1 + HELD } else { EACH };
            assert_eq!(versions, (1..=sent).collect::<Vec<_>>(), "shard {range}'s messages, as the peer got them");
        }
        assert_eq!(got.per_request.first(), Some(&1), "the first message went alone");
        // (With any the shards queued before the thread took the queue.)
        let second = got.per_request.get(1).copied().unwrap_or(0);
        assert!(second >= HELD as usize, "the messages queued while the links were held went in batches of {second}");
    }

    /// Who takes the reply to a request a shard started on a peer's TCP link: the shard
    /// itself, from the socket it was told to watch, when the peer's links are free; the peer's
    /// thread, which hands it over, while they are held (as while the thread sends). Each reply
    /// is taken once. A link remade is a new socket, and the shard is told to watch it.
    #[test]
    fn a_shard_takes_its_own_replies_unless_the_peers_links_are_held() {
        type Handed = Arc<Mutex<Vec<(u16, NodeId, Vec<Msg>)>>>;
        let handed: Handed = Arc::default();
        let by_thread = handed.clone();
        let peer = RecordingPeer::start(Arc::new(move |shard, node, msg| by_thread.lock().unwrap().push((shard, node, vec![msg]))));
        let handed_count = || handed.lock().unwrap().len();
        let wait_handed = |count: usize| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while handed_count() < count && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(handed_count(), count, "replies the peer's thread handed over");
        };
        let mut outbox = peer.outbox.clone();
        // No link yet: the thread makes it, sends, and takes the reply.
        outbox.to_node(NodeId(2), 0, forward(1));
        wait_handed(1);
        // The link is free: the shard starts its requests itself and takes their replies. (The
        // thread, waking on its own now and then, may take one first: never both.)
        let mut taken = Vec::new();
        for version in 2..22 {
            outbox.to_node(NodeId(2), 0, forward(version));
            let deadline = Instant::now() + Duration::from_secs(30);
            while taken.len() + handed_count() < version as usize && Instant::now() < deadline {
                outbox.take_own_replies(&mut |node, msgs| taken.push((node, std::mem::take(msgs))));
            }
        }
        let watched: Vec<RawFd> = outbox.sockets_to_watch().collect();
        assert_eq!(watched.len(), 1, "sockets to watch: the link's one");
        assert!(taken.len() >= 10, "replies the shard took itself: {} of 20", taken.len());
        let by_shard = taken.iter().map(|(node, msgs)| (*node, msgs.clone()));
        let by_thread: Vec<(NodeId, Vec<Msg>)> = handed
            .lock()
            .unwrap()
            .iter()
            .map(|(shard, node, msgs)| {
                assert_eq!(*shard, 0, "the shard a reply was handed to");
                (*node, msgs.clone())
            })
            .collect();
        let mut versions: Vec<u64> = by_shard
            .chain(by_thread)
            .flat_map(|(node, msgs)| {
                assert_eq!(node, NodeId(2));
                msgs.into_iter().map(|m| match m {
                    Msg::Ack { version, .. } => version,
                    other => panic!("a reply carried a {}", other.kind()),
                })
            })
            .collect();
        versions.sort_unstable();
        assert_eq!(versions, (1..22).collect::<Vec<_>>(), "each reply taken once");
        // The links held: the shard cannot take its reply, and wakes the thread, which can once
        // they are let go.
        let (before, taken_before) = (handed_count(), taken.len());
        outbox.to_node(NodeId(2), 0, forward(22));
        let links = outbox.queue(NodeId(2)).links;
        let held = links.lock().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        outbox.take_own_replies(&mut |node, msgs| taken.push((node, std::mem::take(msgs))));
        assert_eq!(taken.len(), taken_before, "the shard took a reply while the links were held");
        drop(held);
        wait_handed(before + 1);
        outbox.take_own_replies(&mut |node, msgs| taken.push((node, std::mem::take(msgs))));
        assert_eq!(taken.len(), taken_before, "a reply the thread took was taken again");
        assert!(outbox.own.is_empty(), "links the shard still takes replies on: {:?}", outbox.own);
        // A lost link is remade by the thread; the shard's next request on it has a new socket.
        links.lock().unwrap().links.get_mut(&0).unwrap().link = None;
        outbox.to_node(NodeId(2), 0, forward(23));
        wait_handed(before + 2);
        outbox.to_node(NodeId(2), 0, forward(24));
        assert_eq!(outbox.sockets_to_watch().count(), 1, "sockets to watch after the link was remade");
        peer.stop_after(24);
    }

    /// Acknowledgements go wanting no reply, whether a shard starts them on the peer's link
    /// (behind a request in flight, too) or the peer's thread batches them; updates still get
    /// their replies, each taken once. Every message arrives, in order.
    #[test]
    fn acknowledgements_go_wanting_no_reply() {
        let by_thread = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = by_thread.clone();
        let peer = RecordingPeer::start(Arc::new(move |_, _, _| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let ack = |version: u64| Msg::Ack { range: RangeId(0), epoch: Epoch(1), version };
        let mut outbox = peer.outbox.clone();
        let mut by_shard = 0;
        // The thread makes the link with the first update and takes its reply; once it has let
        // go of the links, the shard starts what it can.
        outbox.to_node(NodeId(2), 0, forward(1));
        let links = outbox.queue(NodeId(2)).links;
        let deadline = Instant::now() + Duration::from_secs(30);
        while (by_thread.load(std::sync::atomic::Ordering::SeqCst) == 0 || links.try_lock().is_err()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        for version in 2..=20 {
            outbox.to_node(NodeId(2), 0, if version % 5 == 0 { forward(version) } else { ack(version) });
            outbox.take_own_replies(&mut |_, msgs| by_shard += msgs.len());
        }
        // Every update answered (none queued, for the acknowledgements to join); then, the
        // links held, the acknowledgements queue, and the thread sends them as one request.
        let updates = 5; // versions 1, 5, 10, 15, 20
        let deadline = Instant::now() + Duration::from_secs(30);
        while by_shard + by_thread.load(std::sync::atomic::Ordering::SeqCst) < updates && Instant::now() < deadline {
            outbox.take_own_replies(&mut |_, msgs| by_shard += msgs.len());
            std::thread::sleep(Duration::from_millis(1));
        }
        let held = links.lock().unwrap();
        (21..=30).for_each(|version| outbox.to_node(NodeId(2), 0, ack(version)));
        drop(held);
        let got = peer.stop_after(30);
        let versions: Vec<u64> = got.acks.iter().map(|(_, v)| *v).collect();
        assert_eq!(versions, (1..=30).collect::<Vec<_>>(), "the messages, as the peer got them");
        for (acks_only, wanted_none) in &got.one_way {
            assert_eq!(acks_only, wanted_none, "a request wants no reply exactly when it carries only acknowledgements: {:?}", got.one_way);
        }
        let one_way: Vec<usize> = got.per_request.iter().zip(&got.one_way).filter(|(_, (_, none))| *none).map(|(n, _)| *n).collect();
        assert!(one_way.len() >= 2 && one_way.iter().any(|n| *n >= 10), "requests that wanted no reply, by messages: {one_way:?}");
        let replied = by_shard + by_thread.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(replied, updates, "acknowledgements the replies carried: one per update");
    }

    /// Updates of 400 KB among small messages, queued faster than they go: two updates fit a
    /// request (sent from where their deltas lie), a third does not and goes in the next. Every
    /// message arrives, in order and whole, and no request is over the frame limit.
    #[test]
    fn large_updates_queued_together_go_in_order_within_the_frame_limit() {
        const COUNT: u64 = 300;
        let peer = RecordingPeer::start(Arc::new(|_, _, _| {}));
        let mut outbox = peer.outbox.clone();
        for version in 1..=COUNT {
            let msg = match version % 10 {
                0..=2 => {
                    let delta = vec![version as u8; 400_000].into();
                    Msg::Forward { range: RangeId(0), epoch: Epoch(1), version, digest: 0, clock: Arc::from(vec![0u32; 4]), delta, durable: 0 }
                }
                _ => Msg::Ack { range: RangeId(0), epoch: Epoch(1), version },
            };
            outbox.to_node(NodeId(2), 0, msg);
        }
        let got = peer.stop_after(COUNT as usize);
        let versions: Vec<u64> = got.acks.iter().map(|(_, v)| *v).collect();
        // A request over the peer's frame limit would be refused, and its messages missing here.
        assert_eq!(versions, (1..=COUNT).collect::<Vec<_>>(), "the messages, as the peer got them");
        assert_eq!(got.bad_deltas, 0, "updates whose deltas arrived changed");
        assert_eq!(got.copied_deltas, 0, "large deltas the peer had to copy out of its read buffer (not aligned, or not lent)");
    }

    /// Two shards' heartbeats queued while the last one was out go as one, with each range's
    /// newest report and the oldest configuration either shard knew.
    #[test]
    fn queued_heartbeats_go_as_one_with_each_ranges_newest_report() {
        let (tx, rx) = channel::bounded(OUT_QUEUE_MAX);
        // Shard 0 holds ranges 0 and 2, shard 1 range 1; each queued three heartbeats.
        for beat in 0..3u64 {
            tx.send(heartbeat(5 + beat, &[(0, 10 + beat), (2, 20 + beat)])).unwrap();
            tx.send(heartbeat(4 + beat, &[(1, 30 + beat)])).unwrap();
        }
        let first = rx.recv().unwrap();
        let Msg::Heartbeat { node, incarnation, config_id, ranges, .. } = newest_heartbeat(first, &rx) else { panic!("not a heartbeat") };
        assert_eq!((node, incarnation, config_id), (NodeId(1), 7, 4));
        let versions: Vec<(u32, u64)> = ranges.iter().map(|r| (r.range.0, r.version)).collect();
        assert_eq!(versions, vec![(0, 12), (1, 32), (2, 22)]);
        assert!(rx.is_empty(), "every queued heartbeat was folded in");
    }
}
