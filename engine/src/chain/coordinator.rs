//! The embedded coordinator: the [`Coordinator`] state machine behind a TCP endpoint, in a
//! thread of whichever process runs it (`tessera coordinator`, or a demo's own process).
//!
//! Servers send heartbeats as `Replicate` requests; the reply carries the configuration when
//! the heartbeat shows an older one. Anyone may ask for the cluster (`ClusterConfig`) or its
//! status (`Status`). The cluster is born once `servers` servers have said hello: ranges are
//! placed on them in epoch 1; servers heard of later join as learners.

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

use crate::error::{EngineError, Result};

/// How often the coordinator looks for failures when no heartbeat wakes it.
const TICK: Duration = Duration::from_millis(10);

/// What `tessera status` shows of a replicated cluster.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterStatus {
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

struct CoordinatorService {
    rcfg: ReplicationConfig,
    servers: u32,
    started: Instant,
    /// Hellos before the cluster is born.
    early: BTreeMap<NodeId, Member>,
    coordinator: Option<Coordinator>,
    reports: BTreeMap<u32, BTreeMap<u32, RangeReport>>,
    changes: Vec<String>,
}

impl CoordinatorService {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn heartbeat(&mut self, msg: Msg, reply: &mut Reply<'_>) {
        let now = self.now_ms();
        let Msg::Heartbeat { node, incarnation, ref addr, config_id, ref ranges } = msg else {
            reply.error(Status::BadRequest, &format!("the coordinator takes heartbeats, not {} messages", msg.kind()));
            return;
        };
        let seen = self.reports.entry(node.0).or_default();
        seen.extend(ranges.iter().map(|r| (r.range.0, *r)));
        match self.coordinator.as_mut() {
            Some(c) => c.step(now, msg),
            None => {
                self.early.insert(node, Member { node, incarnation, addr: addr.clone(), draining: false });
                if self.early.len() as u32 >= self.servers {
                    let members: Vec<Member> = self.early.values().cloned().collect();
                    tracing::info!(servers = members.len(), ranges = self.rcfg.ranges, "cluster born");
                    self.coordinator = Some(Coordinator::new(self.rcfg.clone(), members, now));
                }
            }
        }
        let mut out = Vec::new();
        if let Some(c) = self.coordinator.as_mut() {
            c.take_ready(); // configurations go out in heartbeat replies, below
            if config_id < c.config().id {
                codec::encode(&Msg::Config(c.config().clone()), &mut out);
            }
        }
        reply.ok_bytes(&out);
    }

    fn tick(&mut self) {
        let now = self.now_ms();
        let Some(c) = self.coordinator.as_mut() else { return };
        c.tick(now);
        c.take_ready();
        for change in c.take_changes() {
            tracing::info!(?change, config = c.config().id, "cluster changed");
            self.changes.push(format!("{:.3}s config {}: {change:?}", now as f64 / 1e3, c.config().id));
        }
        if self.changes.len() > CHANGES_KEPT {
            self.changes.drain(..self.changes.len() - CHANGES_KEPT);
        }
    }

    fn status(&self) -> ClusterStatus {
        ClusterStatus {
            replication: self.rcfg.clone(),
            config: self.coordinator.as_ref().map(|c| (**c.config()).clone()),
            waiting_for: if self.coordinator.is_some() { 0 } else { self.servers.saturating_sub(self.early.len() as u32) },
            reports: self.reports.iter().map(|(n, r)| (*n, r.values().copied().collect())).collect(),
            changes: self.changes.clone(),
        }
    }
}

impl Service for CoordinatorService {
    fn serve(&mut self, request: Request<'_>, reply: &mut Reply<'_>) {
        match request.header.op() {
            Some(Op::Replicate) => match codec::decode(request.body) {
                Ok(msg) => self.heartbeat(msg, reply),
                Err(e) => reply.error(Status::Malformed, &e.to_string()),
            },
            Some(Op::ClusterConfig) => {
                let view = ClusterView { replication: self.rcfg.clone(), config: self.coordinator.as_ref().map(|c| (**c.config()).clone()) };
                reply.ok_bytes(&serde_json::to_vec(&view).expect("plain data"));
            }
            Some(Op::Status) => reply.ok_bytes(&serde_json::to_vec(&self.status()).expect("plain data")),
            _ => reply.error(Status::BadRequest, "this is a coordinator: it takes heartbeats, and cluster and status requests"),
        }
    }
}

/// A running coordinator. Dropping it stops it.
#[derive(Debug)]
pub struct CoordinatorHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Waker,
    thread: Option<JoinHandle<()>>,
}

impl CoordinatorHandle {
    /// Binds `listen` and coordinates a cluster born when `servers` servers have said hello.
    pub fn start(listen: &str, rcfg: ReplicationConfig, servers: u32, transport: &TransportConfig) -> Result<Self> {
        rcfg.validate().map_err(|e| EngineError::BadConfig { field: "replication", value: format!("{rcfg:?}"), reason: e.to_string() })?;
        if servers == 0 {
            return Err(EngineError::BadConfig { field: "servers", value: "0".into(), reason: "a cluster needs at least one server".into() });
        }
        let (mut ep, _, addr) = tcp::bind(listen, 0, transport, Arc::from(&b"{}"[..])).map_err(|e| EngineError::Io(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let waker = ep.waker();
        let flag = stop.clone();
        let mut service = CoordinatorService {
            rcfg,
            servers,
            started: Instant::now(),
            early: BTreeMap::new(),
            coordinator: None,
            reports: BTreeMap::new(),
            changes: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("tessera-coordinator".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    if let Err(e) = ep.poll(&mut service, Some(TICK)) {
                        tracing::error!(error = %e, "coordinator poll failed");
                    }
                    service.tick();
                }
            })
            .map_err(|e| EngineError::Io(format!("cannot start the coordinator thread: {e}")))?;
        tracing::info!(%addr, servers, "coordinator listening");
        Ok(Self { addr, stop, waker, thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the coordinator stops.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
