//! The etcd coordinator's link to etcd (feature `etcd`).
//!
//! What a cluster keeps in etcd, under `/tessera/<cluster>/`:
//! - `config`: the cluster's latest [`ClusterView`] (replication settings, members, chains and
//!   epochs), as JSON. Only the coordinator holding the election writes it, one transaction per
//!   configuration, and only if it still holds the election and nobody wrote since it last read.
//! - `leader/…`: etcd's election among coordinators. Each candidate campaigns with a lease it
//!   keeps alive; the winner's value is the address servers heartbeat to. A coordinator that dies
//!   loses its lease within [`LEASE_TTL_S`], and the next candidate takes over from `config`.
//!
//! Servers find the coordinator through the election, and watch `config`, so a new
//! configuration reaches every server as soon as it is written, not at its next heartbeat.
//!
//! etcd-client is asynchronous; this module runs it on a small runtime of its own (one thread)
//! and offers blocking calls to the coordinator's and the server's threads.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, LeaderKey, Txn, TxnOp};
use tessera_replication::protocol::ClusterView;

use crate::error::{CoordinatorError, Result};
use crate::service::{ConfigStore, Lead};

/// The coordinators' lease: a dead leader is replaced within this many seconds (etcd's lease
/// granularity is a second).
pub const LEASE_TTL_S: i64 = 2;
/// How long one etcd request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a broken watch waits before watching again.
const REWATCH: Duration = Duration::from_millis(100);

/// A connection to a cluster's keys in etcd. Cheap to share.
pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
    endpoints: String,
    cluster: String,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "etcd {} cluster {:?}", self.endpoints, self.cluster)
    }
}

impl Etcd {
    /// Connects to etcd at `endpoints` (comma-separated `host:port` or `http://host:port`), for
    /// the cluster named `cluster`.
    pub fn connect(endpoints: &str, cluster: &str) -> Result<Arc<Self>> {
        if cluster.is_empty() || cluster.contains('/') {
            return Err(CoordinatorError::BadConfig { field: "cluster", value: cluster.into(), reason: "a cluster name is non-empty and has no '/'".into() });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tessera-etcd")
            .enable_all()
            .build()
            .map_err(|e| CoordinatorError::Io(format!("cannot start etcd's runtime: {e}")))?;
        let list: Vec<&str> = endpoints.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        // No per-request timeout here: campaigns and watches last as long as they must; single
        // requests are bounded in `call`.
        let options = ConnectOptions::new().with_connect_timeout(REQUEST_TIMEOUT);
        let client = rt.block_on(Client::connect(&list, Some(options))).map_err(|e| CoordinatorError::Etcd {
            op: "connect",
            endpoints: endpoints.into(),
            reason: e.to_string(),
        })?;
        let etcd = Self { rt, client, endpoints: endpoints.into(), cluster: cluster.into() };
        // Connecting is lazy: ask something, so that a wrong address fails here, clearly.
        etcd.call("reach", |mut c, key| async move { c.get(key, None).await }, "config")?;
        Ok(Arc::new(etcd))
    }

    fn key(&self, name: &str) -> String {
        format!("/tessera/{}/{name}", self.cluster)
    }

    /// Runs one request, bounded by [`REQUEST_TIMEOUT`].
    fn call<T, F, Fut>(&self, op: &'static str, f: F, key: &str) -> Result<T>
    where
        F: FnOnce(Client, String) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let fut = f(self.client.clone(), self.key(key));
        match self.rt.block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, fut).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(op, e.to_string())),
            Err(_) => Err(self.error(op, format!("no answer within {REQUEST_TIMEOUT:?}"))),
        }
    }

    fn error(&self, op: &'static str, reason: String) -> CoordinatorError {
        CoordinatorError::Etcd { op, endpoints: self.endpoints.clone(), reason }
    }

    /// The address of the coordinator that holds the election, if one does.
    pub fn leader_addr(&self) -> Result<Option<String>> {
        match self.call("find the leader", |mut c, key| async move { c.leader(key).await }, "leader") {
            Ok(resp) => Ok(resp.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd answers "election: no leader" as an error.
            Err(CoordinatorError::Etcd { reason, .. }) if reason.contains("no leader") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The cluster's stored configuration and the revision it was written at.
    fn load(&self) -> Result<Option<(ClusterView, i64)>> {
        let resp = self.call("read the configuration", |mut c, key| async move { c.get(key, None).await }, "config")?;
        let Some(kv) = resp.kvs().first() else { return Ok(None) };
        let view = serde_json::from_slice(kv.value())
            .map_err(|e| CoordinatorError::Corrupt { what: format!("{} in etcd", self.key("config")), reason: e.to_string() })?;
        Ok(Some((view, kv.mod_revision())))
    }

    /// Calls `on_view` with the stored configuration, then with each one written after it, on
    /// etcd's thread, until the process ends. A broken watch is remade (reading the current one
    /// first, so nothing written meanwhile is missed).
    pub fn watch_config(self: &Arc<Self>, on_view: Box<dyn Fn(ClusterView) + Send + Sync>) {
        let etcd = self.clone();
        let key = self.key("config");
        self.rt.spawn(async move {
            let decode = |bytes: &[u8]| match serde_json::from_slice::<ClusterView>(bytes) {
                Ok(view) => Some(view),
                Err(e) => {
                    tracing::warn!(error = %e, "a malformed configuration in etcd");
                    None
                }
            };
            loop {
                let mut client = etcd.client.clone();
                let from = match client.get(key.clone(), None).await {
                    Ok(resp) => {
                        if let Some(view) = resp.kvs().first().and_then(|kv| decode(kv.value())) {
                            on_view(view);
                        }
                        resp.header().map_or(0, |h| h.revision()) + 1
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the configuration from etcd");
                        tokio::time::sleep(REWATCH).await;
                        continue;
                    }
                };
                let options = etcd_client::WatchOptions::new().with_start_revision(from);
                match client.watch(key.clone(), Some(options)).await {
                    Ok(mut stream) => {
                        while let Ok(Some(resp)) = stream.message().await {
                            for event in resp.events().iter().filter(|e| e.event_type() == EventType::Put) {
                                if let Some(view) = event.kv().and_then(|kv| decode(kv.value())) {
                                    on_view(view);
                                }
                            }
                        }
                        tracing::debug!("etcd watch ended; watching again");
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot watch the configuration in etcd"),
                }
                tokio::time::sleep(REWATCH).await;
            }
        });
    }
}

/// A coordinator's seat in etcd: its election (once won) and the configuration revision it
/// last read or wrote.
#[derive(Debug)]
pub struct EtcdStore {
    etcd: Arc<Etcd>,
    /// The campaign under way, until it is won.
    campaign: Option<std::sync::mpsc::Receiver<std::result::Result<LeaderKey, String>>>,
    leader: Option<LeaderKey>,
    /// Set when the lease could not be kept alive: the election may be someone else's. Also
    /// set by [`ConfigStore::step_down`], to retire the lease's keeper.
    lost: Arc<AtomicBool>,
    /// The lease the campaign or the leadership is held with.
    lease: Option<i64>,
    revision: i64,
}

impl EtcdStore {
    pub fn new(etcd: Arc<Etcd>) -> Self {
        Self { etcd, campaign: None, leader: None, lost: Arc::new(AtomicBool::new(false)), lease: None, revision: 0 }
    }

    /// Grants a lease and keeps it alive from etcd's thread; `lost` is set if that fails.
    fn lease(&mut self) -> Result<i64> {
        let grant = self.etcd.call("grant a lease", |mut c, _| async move { c.lease_grant(LEASE_TTL_S, None).await }, "")?;
        let id = grant.id();
        self.lease = Some(id);
        let (mut keeper, mut stream) = self.etcd.call("keep a lease", |mut c, _| async move { c.lease_keep_alive(id).await }, "")?;
        let lost = self.lost.clone();
        self.etcd.rt.spawn(async move {
            let every = Duration::from_millis(LEASE_TTL_S as u64 * 1000 / 4);
            loop {
                if lost.load(Ordering::Acquire) {
                    return; // retired: the coordinator stepped down
                }
                let alive = match keeper.keep_alive().await {
                    Ok(()) => matches!(stream.message().await, Ok(Some(resp)) if resp.ttl() > 0),
                    Err(_) => false,
                };
                if !alive {
                    tracing::error!(lease = id, "the coordinator's etcd lease has lapsed: it no longer leads");
                    lost.store(true, Ordering::Release);
                    return;
                }
                tokio::time::sleep(every).await;
            }
        });
        Ok(id)
    }
}

impl ConfigStore for EtcdStore {
    fn lead(&mut self, addr: &str) -> Result<Lead> {
        if self.lost.load(Ordering::Acquire) {
            return Err(CoordinatorError::LostLeadership { reason: "its etcd lease lapsed while it campaigned".into() });
        }
        let Some(campaign) = &self.campaign else {
            // Campaign on etcd's thread: it returns once this coordinator wins, however long
            // that takes, and the coordinator answers (as a standby) meanwhile.
            let lease = self.lease()?;
            tracing::info!(addr, etcd = ?self.etcd, "campaigning to lead the cluster");
            let (tx, rx) = std::sync::mpsc::channel();
            let (mut client, name, value) = (self.etcd.client.clone(), self.etcd.key("leader"), addr.to_string());
            self.etcd.rt.spawn(async move {
                let won = client.campaign(name, value, lease).await.map_err(|e| e.to_string());
                let _ = tx.send(won.and_then(|resp| resp.leader().cloned().ok_or_else(|| "etcd named no leader key".to_string())));
            });
            self.campaign = Some(rx);
            return Ok(Lead::Waiting);
        };
        let leader = match campaign.try_recv() {
            Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(Lead::Waiting),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return Err(self.etcd.error("campaign", "the campaign ended without an answer".into())),
            Ok(Err(reason)) => return Err(self.etcd.error("campaign", reason)),
            Ok(Ok(leader)) => leader,
        };
        tracing::info!(addr, key = %String::from_utf8_lossy(leader.key()), "elected: this coordinator leads the cluster");
        self.leader = Some(leader);
        let stored = self.etcd.load()?;
        self.revision = stored.as_ref().map_or(0, |(_, rev)| *rev);
        Ok(Lead::Leading(stored.map(|(view, _)| view)))
    }

    fn still_leads(&self) -> Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(CoordinatorError::LostLeadership { reason: "its etcd lease lapsed".into() });
        }
        Ok(())
    }

    fn store(&mut self, view: &ClusterView) -> Result<()> {
        let leader = self.leader.as_ref().ok_or_else(|| CoordinatorError::LostLeadership { reason: "it never led".into() })?;
        if self.lost.load(Ordering::Acquire) {
            return Err(CoordinatorError::LostLeadership { reason: "its etcd lease lapsed".into() });
        }
        let json = serde_json::to_vec(view).expect("plain data");
        // One transaction per configuration: written only while this coordinator's election
        // key still exists (its lease is alive) and nobody has written the configuration since.
        let txn = Txn::new()
            .when([
                Compare::create_revision(leader.key().to_vec(), CompareOp::Equal, leader.rev()),
                Compare::mod_revision(self.etcd.key("config"), CompareOp::Equal, self.revision),
            ])
            .and_then([TxnOp::put(self.etcd.key("config"), json, None)]);
        let resp = self.etcd.call("write the configuration", |mut c, _| async move { c.txn(txn).await }, "")?;
        if !resp.succeeded() {
            return Err(CoordinatorError::LostLeadership { reason: "another coordinator holds the election or wrote the configuration".into() });
        }
        self.revision = resp.header().map_or(self.revision, |h| h.revision());
        Ok(())
    }

    fn step_down(&mut self) {
        // The old lease's keeper stops, and the lease is revoked, which deletes the election key
        // it holds (or a campaign still waiting on it): an old campaign cannot win after this.
        // If etcd cannot be reached, the lease lapses within its TTL instead.
        self.lost.store(true, Ordering::Release);
        self.lost = Arc::new(AtomicBool::new(false));
        self.campaign = None;
        self.leader = None;
        self.revision = 0;
        if let Some(id) = self.lease.take() {
            let mut client = self.etcd.client.clone();
            self.etcd.rt.spawn(async move {
                if let Err(e) = client.lease_revoke(id).await {
                    tracing::debug!(lease = id, error = %e, "could not revoke the old lease; it lapses by itself");
                }
            });
        }
    }

    fn describe(&self) -> String {
        format!("in etcd at {} (cluster {:?})", self.etcd.endpoints, self.etcd.cluster)
    }
}
