//! The coordinator: the [`Coordinator`] state machine behind a TCP endpoint, in a thread of
//! whichever process runs it (`tessera coordinator`, or a demo's own process).
//!
//! Servers send heartbeats as `Replicate` requests; the reply carries the configuration when
//! the heartbeat shows an older one. Anyone may ask for the cluster (`ClusterConfig`) or its
//! status (`Status`). The cluster is born once `servers` servers have said hello: ranges are
//! placed on them in epoch 1; servers heard of later join as learners.
//!
//! Where the configuration is kept, and who may change it, is a [`ConfigStore`]: [`Embedded`]
//! keeps it in this process (one coordinator, the default), the etcd store (feature `etcd`)
//! keeps it in etcd, where coordinators hold an election and the winner writes each
//! configuration in one transaction. A configuration is handed out only once it is stored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tessera_replication::codec;
use tessera_replication::coordinator::Coordinator;
use tessera_replication::protocol::{ClusterConfig, ClusterView, Member, Msg, NodeId, RangeReport};
use tessera_replication::ReplicationConfig;
use tessera_transport::{tcp, Op, Reply, Request, Service, ShardTransport, Status, TransportConfig, Waker};

use crate::error::{CoordinatorError, Result};

/// How often the coordinator looks for failures when no heartbeat wakes it.
const TICK: Duration = Duration::from_millis(10);
/// After a coordinator steps down (its store failed it), how long before it campaigns again.
const RECAMPAIGN_AFTER: Duration = Duration::from_secs(1);

/// The coordinator trait: where the cluster's configuration is read from and written to, and
/// who may write it.
pub trait ConfigStore: Send + std::fmt::Debug {
    /// Whether this coordinator, reachable at `addr`, may change the configuration yet: asked
    /// each tick until it may (so it must not block), and then answered with the configuration
    /// stored, if any, to continue from.
    fn lead(&mut self, addr: &str) -> Result<Lead>;
    /// Stores `view`, which follows the configuration last read or stored, atomically. An error
    /// means this coordinator must step down: it no longer leads, or cannot reach the store.
    fn store(&mut self, view: &ClusterView) -> Result<()>;
    /// Whether this coordinator, leading, still may: asked each tick (so it must not block). An
    /// error means it must step down at once, before it answers anyone as the leader again.
    fn still_leads(&self) -> Result<()> {
        Ok(())
    }
    /// Gives up leading or campaigning (after an error from the store): the next
    /// [`lead`](Self::lead) campaigns afresh, and nothing of the old seat may still win or
    /// write.
    fn step_down(&mut self) {}
    /// Where the configuration is kept, for logs.
    fn describe(&self) -> String;
}

/// See [`ConfigStore::lead`].
#[derive(Debug)]
pub enum Lead {
    /// Another coordinator leads (or the election is not decided yet): stand by.
    Waiting,
    /// This one leads, and continues from this stored configuration, if any.
    Leading(Option<ClusterView>),
}

/// The embedded coordinator: the configuration lives in this process, which alone leads.
#[derive(Debug, Default)]
pub struct Embedded;

impl ConfigStore for Embedded {
    fn lead(&mut self, _addr: &str) -> Result<Lead> {
        Ok(Lead::Leading(None))
    }

    fn store(&mut self, _view: &ClusterView) -> Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "in this process (embedded)".into()
    }
}

/// What `tessera status` shows of a replicated cluster.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterStatus {
    /// Whether the coordinator asked leads the cluster (a standby shows nothing else).
    pub leading: bool,
    pub replication: ReplicationConfig,
    pub config: Option<ClusterConfig>,
    /// Servers heard from before the cluster was born.
    pub waiting_for: u32,
    /// The latest report each server gave of each range it holds.
    pub reports: BTreeMap<u32, Vec<RangeReport>>,
    /// Configuration changes so far, newest last (at most [`CHANGES_KEPT`]).
    pub changes: Vec<String>,
}

/// Changes the status keeps.
pub const CHANGES_KEPT: usize = 200;

#[derive(Debug)]
struct CoordinatorService {
    rcfg: ReplicationConfig,
    servers: u32,
    started: Instant,
    store: Box<dyn ConfigStore>,
    addr: String,
    leading: bool,
    /// Hellos before the cluster is born.
    early: BTreeMap<NodeId, Member>,
    /// The cluster the first early hello from a server with a disk named: the cluster being
    /// born is that one, started again (a coordinator that keeps no configuration, restarted
    /// with its servers), else a new one.
    early_cluster: Option<u64>,
    coordinator: Option<Coordinator>,
    /// The newest configuration stored, the only one handed out.
    published: Option<Arc<ClusterConfig>>,
    changes: Vec<String>,
    /// After it stepped down (why is in the log and the status's changes): when this
    /// coordinator campaigns again.
    campaign_at: Option<Instant>,
}

impl CoordinatorService {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Continues from the configuration the store holds, if it holds one.
    fn resume(&mut self, stored: Option<ClusterView>) {
        let Some(view) = stored else { return };
        if view.replication != self.rcfg {
            tracing::warn!(stored = ?view.replication, flags = ?self.rcfg, "the stored cluster's replication settings win over this coordinator's flags");
            self.rcfg = view.replication;
        }
        if let Some(config) = view.config {
            tracing::info!(config = config.id, members = config.members.len(), "continuing the stored cluster");
            self.published = Some(Arc::new(config.clone()));
            self.coordinator = Some(Coordinator::resume(self.rcfg.clone(), config, self.now_ms()));
        }
    }

    /// Asks the store whether this coordinator leads yet, and takes over when it does.
    fn stand(&mut self) {
        if self.leading {
            if let Err(e) = self.store.still_leads() {
                self.step_down(e);
            }
            return;
        }
        if self.campaign_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        match self.store.lead(&self.addr) {
            Ok(Lead::Waiting) => {}
            Ok(Lead::Leading(stored)) => {
                self.leading = true;
                self.campaign_at = None;
                self.note("leading".into());
                self.resume(stored);
            }
            Err(e) => self.step_down(e),
        }
    }

    /// Keeps `change` for the status, stamped with the time, and at most [`CHANGES_KEPT`].
    fn note(&mut self, change: String) {
        self.changes.push(format!("{:.3}s {change}", self.now_ms() as f64 / 1e3));
        if self.changes.len() > CHANGES_KEPT {
            self.changes.drain(..self.changes.len() - CHANGES_KEPT);
        }
    }

    /// The store failed this coordinator (its lease lapsed, another wrote the configuration,
    /// or the store cannot be reached): it forgets the cluster, answers as a standby, and
    /// campaigns again after [`RECAMPAIGN_AFTER`], continuing from whatever is stored then. It
    /// never exits for this: a coordinator that outlives an outage of the store leads again
    /// without a supervisor.
    fn step_down(&mut self, why: CoordinatorError) {
        tracing::error!(error = %why, again_in = ?RECAMPAIGN_AFTER, "this coordinator steps down, and will campaign again");
        self.note(format!("stepped down: {why}"));
        self.leading = false;
        self.coordinator = None;
        self.published = None;
        self.early.clear();
        self.early_cluster = None;
        self.store.step_down();
        self.campaign_at = Some(Instant::now() + RECAMPAIGN_AFTER);
    }

    fn heartbeat(&mut self, msg: Msg, reply: &mut Reply<'_>) {
        let now = self.now_ms();
        let Msg::Heartbeat { node, incarnation, ref addr, cluster: claim, config_id, .. } = msg else {
            reply.error(Status::BadRequest, &format!("the coordinator takes heartbeats, not {} messages", msg.kind()));
            return;
        };
        let ours = self.coordinator.as_ref().map(|c| c.config().cluster).or(self.early_cluster).filter(|c| *c != 0);
        if let Some(ours) = ours.filter(|ours| claim != 0 && claim != *ours) {
            let reason = format!(
                "server {node} ({addr}) keeps the data of cluster {claim:016x} in its data directory, and this coordinator's cluster is {ours:016x}: \
                 start it against its own cluster's coordinator, or with an empty data directory to join this cluster as a new server"
            );
            tracing::warn!(node = node.0, %addr, "{reason}");
            reply.error(Status::BadRequest, &reason);
            return;
        }
        match self.coordinator.as_mut() {
            Some(c) => c.step(now, msg),
            None => {
                if claim != 0 {
                    self.early_cluster.get_or_insert(claim);
                }
                self.early.insert(node, Member { node, incarnation, addr: addr.clone(), draining: false });
                if self.early.len() as u32 >= self.servers {
                    let members: Vec<Member> = self.early.values().cloned().collect();
                    let cluster = self.early_cluster.unwrap_or_else(new_cluster_name);
                    tracing::info!(servers = members.len(), ranges = self.rcfg.ranges, cluster = format!("{cluster:016x}"), "cluster born");
                    self.coordinator = Some(Coordinator::new(self.rcfg.clone(), cluster, members, now));
                    self.publish();
                }
            }
        }
        let mut out = Vec::new();
        if let Some(c) = self.coordinator.as_mut() {
            c.take_ready(); // configurations go out in heartbeat replies, below
        }
        if let Some(config) = self.published.as_ref().filter(|c| c.id > config_id) {
            codec::encode(&Msg::Config(config.clone()), &mut out);
        }
        reply.ok_bytes(&out);
    }

    fn tick(&mut self) {
        let now = self.now_ms();
        let Some(c) = self.coordinator.as_mut() else { return };
        c.tick(now);
        c.take_ready();
        let (changes, id) = (c.take_changes(), c.config().id);
        // A change after a server's failure is the failover: its span ties the log lines of
        // the new configuration together.
        let _failover = (!changes.is_empty()).then(|| tracing::info_span!("failover", config = id).entered());
        for change in changes {
            if change.is_loss() {
                tracing::error!(?change, config = id, "a range lost every copy: its acknowledged updates are gone, and it cannot heal");
            } else {
                tracing::info!(?change, config = id, "cluster changed");
            }
            self.note(format!("config {id}: {change:?}"));
        }
        self.publish();
    }

    /// Stores the state machine's configuration if it is newer than the one handed out, and
    /// hands it out once stored.
    fn publish(&mut self) {
        let Some(c) = self.coordinator.as_ref() else { return };
        if !self.leading || self.published.as_ref().is_some_and(|p| p.id >= c.config().id) {
            return;
        }
        let config = c.config().clone();
        match self.store.store(&self.view_of(Some(&config))) {
            Ok(()) => self.published = Some(config),
            Err(e) => self.step_down(e),
        }
    }

    /// Starts draining the member named by `body` (its address, or its node id); answers its
    /// node id.
    fn drain(&mut self, body: &[u8], reply: &mut Reply<'_>) {
        let name = String::from_utf8_lossy(body);
        let Some((c, config)) = self.coordinator.as_mut().zip(self.published.as_ref()) else {
            reply.error(Status::BadRequest, "the cluster is not born yet: nothing to drain");
            return;
        };
        let Some(member) = config.members.iter().find(|m| m.addr == name || m.node.0.to_string() == name) else {
            let members: Vec<String> = config.members.iter().map(|m| format!("{} ({})", m.addr, m.node)).collect();
            reply.error(Status::BadRequest, &format!("no member {name:?}; the members are {}", members.join(", ")));
            return;
        };
        tracing::info!(node = member.node.0, addr = %member.addr, "draining on request");
        c.drain(member.node);
        reply.ok_bytes(member.node.0.to_string().as_bytes());
    }

    fn view_of(&self, config: Option<&Arc<ClusterConfig>>) -> ClusterView {
        ClusterView { replication: self.rcfg.clone(), config: config.map(|c| (**c).clone()) }
    }

    fn status(&self) -> ClusterStatus {
        let reports = self.coordinator.iter().flat_map(|c| c.reports()).map(|(n, r)| (n.0, r.copied().collect())).collect();
        ClusterStatus {
            leading: self.leading,
            replication: self.rcfg.clone(),
            config: self.published.as_ref().map(|c| (**c).clone()),
            waiting_for: if self.coordinator.is_some() { 0 } else { self.servers.saturating_sub(self.early.len() as u32) },
            reports,
            changes: self.changes.clone(),
        }
    }
}

/// A new cluster's name: a random non-zero number.
pub fn new_cluster_name() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).expect("the operating system's random number generator works");
    u64::from_le_bytes(bytes).max(1)
}

impl Service for CoordinatorService {
    fn serve(&mut self, request: Request<'_>, reply: &mut Reply<'_>) {
        let op = request.header.op();
        if !self.leading && op != Some(Op::Status) {
            reply.error(
                Status::NotOwned,
                &format!("a standby coordinator: the cluster's coordinator is whichever holds the election {}", self.store.describe()),
            );
            return;
        }
        match op {
            Some(Op::Replicate) => match codec::decode(request.body) {
                Ok(msg) => self.heartbeat(msg, reply),
                Err(e) => reply.error(Status::Malformed, &e.to_string()),
            },
            Some(Op::ClusterConfig) => reply.ok_bytes(&serde_json::to_vec(&self.view_of(self.published.as_ref())).expect("plain data")),
            Some(Op::Drain) => self.drain(request.body, reply),
            Some(Op::Status) => reply.ok_bytes(&serde_json::to_vec(&self.status()).expect("plain data")),
            _ => reply.error(Status::BadRequest, "this is a coordinator: it takes heartbeats, and cluster, drain and status requests"),
        }
    }
}

/// A running coordinator. Dropping it stops it.
#[derive(Debug)]
pub struct CoordinatorHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Waker,
    thread: Option<JoinHandle<Result<()>>>,
}

impl CoordinatorHandle {
    /// Binds `listen` and coordinates a cluster born when `servers` servers have said hello,
    /// keeping its configuration in `store`. With a shared store (etcd), it stands by until
    /// elected, then continues the stored cluster if there is one.
    pub fn start(listen: &str, rcfg: ReplicationConfig, servers: u32, transport: &TransportConfig, store: Box<dyn ConfigStore>) -> Result<Self> {
        rcfg.validate().map_err(|e| CoordinatorError::BadConfig { field: "replication", value: format!("{rcfg:?}"), reason: e.to_string() })?;
        if servers == 0 {
            return Err(CoordinatorError::BadConfig { field: "servers", value: "0".into(), reason: "a cluster needs at least one server".into() });
        }
        let (mut ep, _, addr) = tcp::bind(listen, 0, transport, Arc::from(&b"{}"[..])).map_err(|e| CoordinatorError::Io(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let waker = ep.waker();
        let flag = stop.clone();
        tracing::info!(%addr, servers, store = store.describe(), "coordinator listening");
        let mut service = CoordinatorService {
            rcfg,
            servers,
            started: Instant::now(),
            store,
            addr: addr.to_string(),
            leading: false,
            early: BTreeMap::new(),
            early_cluster: None,
            coordinator: None,
            published: None,
            changes: Vec::new(),
            campaign_at: None,
        };
        let thread = std::thread::Builder::new()
            .name("tessera-coordinator".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    service.stand();
                    if let Err(e) = ep.poll(&mut service, Some(TICK)) {
                        tracing::error!(error = %e, "coordinator poll failed");
                    }
                    service.tick();
                }
                Ok(())
            })
            .map_err(|e| CoordinatorError::Io(format!("cannot start the coordinator thread: {e}")))?;
        Ok(Self { addr, stop, waker, thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the coordinator stops; an error says why it had to.
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(CoordinatorError::Io("the coordinator thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for CoordinatorHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
