//! The Tessera client that workers link in.
//!
//! [`Client::connect`] reaches a cluster: servers that joined a coordinator, every key range on a
//! chain of one or more of them, or one standalone server, whose every range is a chain of one
//! (itself). It routes each range's pushes to the range's head and its pulls to a member fresh
//! enough. Every call sends
//! its frames and returns a [`Ticket`] at once; [`Ticket::wait`] blocks for the replies and
//! returns the vector-clock [`Stamp`] of the keys it touched. Many tickets may be in flight: the
//! results are the same whether the caller waits on each one or pipelines many.
//!
//! A client outlives its servers' restarts. A push not yet acknowledged when its server went
//! away is sent again, to the range's new head or to the restarted server, and applied once. When
//! a standalone server stays away past [`ClientConfig::reconnect_attempts`], or comes back without
//! its data, the calls in flight fail with [`ClientError::OutcomeUnknown`] (a push may or may not
//! have been applied; it is never sent again), and existing [`Table`] handles are routed to the
//! tables of the same name.
//! [`Ticket::ready`] says whether a wait would block.
//!
//! ```no_run
//! use tessera_client::{Client, ClientConfig};
//! use tessera_layout::{TableKind, TableSpec};
//! # fn main() -> Result<(), tessera_client::ClientError> {
//! let client = Client::connect(&["127.0.0.1:7070"], ClientConfig::worker(0))?;
//! let mut spec = TableSpec::new("weights", TableKind::Dense, 0, 1 << 20, 4);
//! spec.updater = "sgd{lr=0.1}".into();
//! let table = client.create_table(&spec)?;
//! let grads = vec![0.5f32; 16 * 4];
//! let pushed = client.push_range(&table, 0, &grads)?; // returns a ticket at once
//! let mut values = vec![0f32; 16 * 4];
//! pushed.wait()?;
//! let stamp = client.pull_range(&table, 0, &mut values)?.wait()?;
//! println!("clocks {:?}, first value {}", stamp.clocks(), values[0]);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

mod call;
mod chain;
mod core;
mod error;
pub mod filter;
mod push_buffer;
mod ticket;

use std::sync::{Arc, Mutex, MutexGuard};

pub use push_buffer::PushBuffer;
use tessera_layout::catalog::TableEntry;
use tessera_layout::placement::Route;
use tessera_layout::TableSpec;
use tessera_transport::{RdmaConfig, TransportConfig, TransportKind};

pub use crate::call::{Call, Consistency};
pub use crate::chain::{ChainStats, PUSH_STAMPS_KEPT, PUSH_WINDOW};
pub use crate::error::{ClientError, Result};
pub use crate::filter::Filter;
pub use crate::ticket::{Detached, Stamp, Ticket, STAMP_INLINE_CLOCKS};

use crate::core::Core;

pub use tessera_transport::keycache::KEY_CACHE_KEYS_DEFAULT;

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// This worker's id: its entry in every vector clock. Distinct workers need distinct ids.
    pub worker: u32,
    pub transport: TransportConfig,
    /// TCP, RDMA, or RDMA where both this machine and the server have it (the default).
    pub kind: TransportKind,
    pub rdma: RdmaConfig,
    /// Snappy-compress request and reply bodies when that saves at least a tenth.
    pub compress: bool,
    /// The consistency model of calls whose table handle and call set none.
    pub consistency: Consistency,
    /// Workers in the job (ids `0..workers`): whom a bounded-delay pull waits for. 0 (the
    /// default) means unknown, and bounded-delay pulls are refused.
    pub workers: u32,
    /// Keys of repeated key lists to send by hash instead of in full, per shard (key-list
    /// caching; 8 bytes a key on each end). Keep it at most the servers' `--key-cache-keys`
    /// (default [`KEY_CACHE_KEYS_DEFAULT`]): a list the server has let go is sent again with its
    /// keys, at the cost of a round trip. 0 (the default) sends every key list in full.
    pub key_cache_keys: usize,
    /// How long a bounded-delay pull waits for slow workers before it fails with
    /// [`ClientError::Stale`], naming the worker that held it back.
    pub stale_timeout: std::time::Duration,
    /// Attempts to reconnect to a standalone server that stopped answering (it restarted, say),
    /// pausing between them as `reconnect_pause_ms` says; 0 never waits for it. Past them, the
    /// calls in flight fail with [`ClientError::OutcomeUnknown`] and are never sent again. (A
    /// cluster's calls wait for the coordinator to name new chains instead.)
    pub reconnect_attempts: u32,
    /// The pause after the first failed attempt to reconnect; it doubles after each, up to a
    /// second.
    pub reconnect_pause_ms: u64,
    /// Over TCP, a push to ranges on chains of one (an unreplicated server, or `--replicas 1`)
    /// waits in the client for the next request on its connection (the worker's next pull
    /// from that server, typically) or for the client's next wait, whichever comes first, and
    /// leaves in the same write: one write and one wake-up of the server instead of two. The
    /// push is then on its way when the worker next talks to the cluster, not when `push`
    /// returns; a worker that pushes and then does a long stretch of other work without
    /// calling the client, while others wait on its pushes (bounded delay), should wait on the
    /// push's ticket or turn this off. On by default. Pushes to longer chains (whose pulls go
    /// to another server), and every request over RDMA, are sent at once.
    pub defer_pushes: bool,
}

impl ClientConfig {
    /// Defaults for worker `worker`.
    pub fn worker(worker: u32) -> Self {
        Self {
            worker,
            transport: TransportConfig::default(),
            kind: TransportKind::Auto,
            rdma: RdmaConfig::default(),
            compress: false,
            consistency: Consistency::Eventual,
            workers: 0,
            key_cache_keys: 0,
            stale_timeout: std::time::Duration::from_secs(60),
            reconnect_attempts: 8,
            reconnect_pause_ms: 50,
            defer_pushes: true,
        }
    }
}

/// A table as the client routes it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Table {
    route: Arc<Route>,
    /// The consistency model of calls on this handle that set none themselves.
    pub(crate) consistency: Option<Consistency>,
    /// The client's count of reconnections when the route was read (see `Core::current`).
    pub(crate) generation: u64,
}

impl Table {
    /// The table's definition.
    pub fn spec(&self) -> &TableSpec {
        &self.route.spec
    }

    /// Components per key.
    pub fn dim(&self) -> usize {
        self.route.spec.dim as usize
    }

    /// This handle, with calls through it running under `model` unless a call says otherwise.
    /// Other handles to the same table keep theirs.
    pub fn with_consistency(mut self, model: Consistency) -> Table {
        self.consistency = Some(model);
        self
    }

    pub(crate) fn route(&self) -> &Arc<Route> {
        &self.route
    }
}

/// A connection to a cluster or to a standalone server. `Send + Sync`; calls from several
/// threads are serialised, so give each worker thread its own client for parallelism.
#[derive(Debug)]
pub struct Client {
    core: Mutex<Core>,
    pub(crate) consistency: Consistency,
    pub(crate) workers: u32,
    pub(crate) stale_timeout: std::time::Duration,
}

impl Client {
    /// Connects as the configured worker to `servers`: any members of a cluster (the client
    /// learns the rest from them), or one standalone server.
    pub fn connect(servers: &[&str], cfg: ClientConfig) -> Result<Client> {
        let (consistency, workers, stale_timeout) = (cfg.consistency, cfg.workers, cfg.stale_timeout);
        Ok(Client { core: Mutex::new(Core::connect(servers, cfg)?), consistency, workers, stale_timeout })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves links mid-frame; refuse to go on with them.
        self.core.lock().expect("a client call panicked earlier; this client is unusable")
    }

    /// The table called `name`.
    pub fn table(&self, name: &str) -> Result<Table> {
        self.lock().table(name)
    }

    /// Creates `spec` on every server (or finds it, if it exists with the same definition).
    pub fn create_table(&self, spec: &TableSpec) -> Result<Table> {
        let mut core = self.lock();
        core.create_table(spec)?;
        core.table(&spec.name)
    }

    /// Every table's entry on each server, freshly fetched.
    pub fn catalogs(&self) -> Result<Vec<Vec<TableEntry>>> {
        self.lock().refresh()
    }

    /// This worker's clock, sent with every push.
    pub fn clock(&self) -> u64 {
        self.lock().clock
    }

    /// Sets this worker's clock (an iteration count; it should only grow). Servers refuse
    /// pushes with a clock over 2^32 - 1.
    pub fn set_clock(&self, clock: u64) {
        self.lock().clock = clock;
    }

    /// A call to be ordered (consistency model, tickets it must follow) before it is sent.
    pub fn call(&self) -> Call<'_> {
        Call::new(self)
    }

    /// A [`Detached`] ticket of this client back, to wait on: `out` must be the buffer (or one of
    /// the same length) the call was given; `None` for a push.
    pub fn resume<'a>(&'a self, ticket: Detached, out: Option<&'a mut [f32]>) -> Ticket<'a> {
        Ticket::resume(self, ticket, out)
    }

    /// Whether waiting on a [`Detached`] ticket of this client would return without blocking;
    /// receives for up to `timeout` first (zero only looks). See [`Ticket::ready`].
    pub fn ready(&self, ticket: &Detached, timeout: std::time::Duration) -> Result<bool> {
        ticket.ready(self, timeout)
    }

    /// Requests sent whose replies have not been received yet, over all shards.
    pub fn in_flight(&self) -> u64 {
        self.lock().in_flight()
    }

    /// Pushes `grads` (`keys.len() * dim` values) for `keys`; the server applies the table's updater.
    pub fn push<'a>(&'a self, table: &Table, keys: &[u64], grads: &[f32]) -> Result<Ticket<'a>> {
        self.call().push(table, keys, grads)
    }

    /// Pushes what `filter` keeps of `grads` for `keys` (see [`filter`]). A push the filter
    /// keeps nothing of sends nothing, and its ticket is answered at once with an empty stamp.
    pub fn push_filtered<'a>(&'a self, table: &Table, keys: &[u64], grads: &[f32], filter: &mut dyn Filter) -> Result<Ticket<'a>> {
        self.call().push_filtered(table, keys, grads, filter)
    }

    /// Pulls the values of `keys` into `out` (`keys.len() * dim` values) once the ticket is waited on.
    pub fn pull<'a>(&'a self, table: &Table, keys: &[u64], out: &'a mut [f32]) -> Result<Ticket<'a>> {
        self.call().pull(table, keys, out)
    }

    /// Pushes `grads` for the dense range of keys starting at `start` (`grads.len() / dim` keys).
    pub fn push_range<'a>(&'a self, table: &Table, start: u64, grads: &[f32]) -> Result<Ticket<'a>> {
        self.call().push_range(table, start, grads)
    }

    /// A buffer of `len` gradient values for [`Client::push_range_from`]: compute each step's
    /// gradients into it and push it.
    pub fn push_buffer(&self, len: usize) -> PushBuffer {
        PushBuffer::new(len)
    }

    /// As [`Client::push_range`] of `grads.as_slice()`. The client copies the values (it keeps
    /// the push until acknowledged, to send it again after a failover), so the buffer may be
    /// filled again as soon as this returns, while the ticket still waits for the replies.
    pub fn push_range_from<'a>(&'a self, table: &Table, start: u64, grads: &PushBuffer) -> Result<Ticket<'a>> {
        self.call().push_range_from(table, start, grads)
    }

    /// Pulls the dense range starting at `start` into `out` (`out.len() / dim` keys). Over RDMA
    /// the values are read one-sided, straight from the shards' memory, once every request sent
    /// before on the same link was served; the stamp is then the meet of the blocks' stamps.
    pub fn pull_range<'a>(&'a self, table: &Table, start: u64, out: &'a mut [f32]) -> Result<Ticket<'a>> {
        self.call().pull_range(table, start, out)
    }

    /// Bytes this client sent and received, frames included.
    pub fn bytes(&self) -> (u64, u64) {
        self.lock().bytes()
    }

    /// What failures have cost this client so far (refreshes of the configuration, resends,
    /// retried pulls) and where its requests went.
    pub fn chain_stats(&self) -> ChainStats {
        self.lock().chain().stats
    }

    /// The id (epoch) of the cluster configuration this client routes by.
    pub fn config_id(&self) -> u64 {
        self.lock().chain().view().id
    }

    /// Key-list caching: requests sent with a key list's hash instead of its keys, and how many
    /// of those the server no longer held (they were sent again in full).
    pub fn key_lists_by_hash(&self) -> (u64, u64) {
        let stats = self.lock().chain().stats;
        (stats.lists_by_hash, stats.keys_unknown)
    }

    /// Dense block copies that one-sided reads found torn (a push overlapped the copy) and read
    /// again; always 0 over TCP.
    pub fn torn_reads(&self) -> u64 {
        self.lock().torn_reads()
    }

    /// Pings the tail of the cluster's first range over the data path and waits for
    /// the answer: the transport's round trip alone, with no table touched (`tessera bench`'s
    /// `ping` row).
    pub fn ping(&self) -> Result<()> {
        self.lock().ping()
    }

    /// The transport the links use: `"rdma"` when every link is RDMA, else `"tcp"`.
    pub fn transport(&self) -> &'static str {
        self.lock().transport()
    }

    /// The status report (JSON) of a cluster's every member, or of the standalone server; each
    /// names its server's address in `addr`.
    pub fn status(&self) -> Result<Vec<serde_json::Value>> {
        self.lock().status()
    }

    /// Has every server write a checkpoint of every shard now (servers started with
    /// `--durability checkpoint` or `wal`); each server's address and what each of its shards
    /// wrote.
    pub fn checkpoint(&self) -> Result<Vec<(String, serde_json::Value)>> {
        self.lock().checkpoint()
    }
}
