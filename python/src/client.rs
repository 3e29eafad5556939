//! `tessera.Client` and `tessera.Table`: the Rust [`Client`] behind a Python object.
//!
//! Every call that may wait on the network runs with the GIL released, so other Python threads
//! (a data loader, another trainer thread with its own client) run meanwhile. The client's own
//! lock serialises calls on one client, as in Rust.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use numpy::PyArray2;
use pyo3::prelude::*;
use pyo3::types::PyString;
use tessera_client::{Client, ClientConfig, Consistency, Table, Ticket};
use tessera_layout::catalog::{Init, NonFinite};
use tessera_layout::{TableKind, TableSpec};
use tessera_transport::auth::ClusterSecret;
use tessera_transport::TransportKind;

use crate::arrays;
use crate::errors::{self, Kind};
use crate::ticket::PyTicket;

/// The environment variable that names the cluster secret file, as for the tools and the C ABI.
const SECRET_FILE_VAR: &str = "TESSERA_CLUSTER_SECRET_FILE";

/// A connection to a Tessera cluster or standalone server, as one worker.
///
/// ``servers`` is a list of "host:port" (or one comma-separated string): any servers of a
/// cluster (servers started with a coordinator; pushes then go to each range's head, pulls to
/// its tail), or one standalone server. ``worker`` is this trainer's id (its entry in every
/// vector clock, distinct per trainer, below the servers' ``--workers-max``) and ``workers``
/// the job's trainer count.
/// ``consistency`` is "eventual" (nothing waits), "sequential" (a call is sent once every
/// earlier call was answered) or "bounded:N" (a pull at clock t waits until every worker's
/// pushes up to t - N - 1 are in). ``secret_file`` holds the cluster secret (default: the file
/// named by TESSERA_CLUSTER_SECRET_FILE, if set). ``transport`` is "auto", "tcp" or "rdma".
///
/// Use it as a context manager, or call ``close()``.
#[pyclass(frozen, name = "Client", module = "tessera")]
#[derive(Debug)]
pub struct PyClient {
    /// `None` once closed. Calls clone the `Arc`, so a call in flight in another thread ends
    /// normally and the connections close when it returns.
    inner: RwLock<Option<Arc<Client>>>,
    servers: Vec<String>,
    worker: u32,
    workers: u32,
    consistency: Consistency,
}

impl PyClient {
    /// The Rust client, or `ClosedError`.
    pub fn live(&self, py: Python<'_>) -> PyResult<Arc<Client>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.clone().ok_or_else(|| errors::raise(py, Kind::Closed, "the client is closed"))
    }

    /// The Rust client, if open (no exception: for `Drop`).
    pub fn open(&self) -> Option<Arc<Client>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn consistency(&self) -> Consistency {
        self.consistency
    }
}

fn server_list(py: Python<'_>, servers: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    let list: Vec<String> = if let Ok(s) = servers.cast::<PyString>() {
        s.to_str()?.split(',').map(|a| a.trim().to_string()).collect()
    } else {
        servers.extract().map_err(|_| errors::argument(py, "servers must be a list of \"host:port\" strings"))?
    };
    let list: Vec<String> = list.into_iter().filter(|a| !a.is_empty()).collect();
    if list.is_empty() {
        return Err(errors::argument(py, "servers names no address"));
    }
    Ok(list)
}

#[allow(clippy::too_many_arguments)]
fn config(
    py: Python<'_>,
    worker: u32,
    workers: u32,
    consistency: &str,
    secret_file: Option<&str>,
    transport: &str,
    compress: bool,
    key_cache_keys: usize,
    io_timeout_ms: u64,
    reconnect_attempts: u32,
    defer_pushes: bool,
) -> PyResult<ClientConfig> {
    let kind = match transport {
        "auto" => TransportKind::Auto,
        "tcp" => TransportKind::Tcp,
        "rdma" => TransportKind::Rdma,
        other => return Err(errors::argument(py, format!("transport {other:?}: use \"auto\", \"tcp\" or \"rdma\""))),
    };
    let mut cfg = ClientConfig { kind, workers, compress, key_cache_keys, reconnect_attempts, defer_pushes, ..ClientConfig::worker(worker) };
    cfg.consistency = consistency.parse().map_err(|e: String| errors::argument(py, e))?;
    if io_timeout_ms == 0 {
        return Err(errors::argument(py, "io_timeout_ms is 0: every call would time out at once"));
    }
    cfg.transport.io_timeout_ms = io_timeout_ms;
    let secret = match secret_file {
        Some(path) => Some((std::path::PathBuf::from(path), "secret_file")),
        None => std::env::var_os(SECRET_FILE_VAR).filter(|p| !p.is_empty()).map(|p| (p.into(), SECRET_FILE_VAR)),
    };
    if let Some((path, what)) = secret {
        let secret = ClusterSecret::from_file(&path).map_err(|e| errors::argument(py, format!("{what}: {e}")))?;
        cfg.transport.cluster_secret = Some(secret);
    }
    cfg.transport.validate().map_err(|e| errors::argument(py, e.to_string()))?;
    Ok(cfg)
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (servers, worker=0, workers=1, consistency="eventual", secret_file=None, transport="auto", *, compress=false, key_cache_keys=0, io_timeout_ms=30_000, reconnect_attempts=8, defer_pushes=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        servers: &Bound<'_, PyAny>,
        worker: u32,
        workers: u32,
        consistency: &str,
        secret_file: Option<&str>,
        transport: &str,
        compress: bool,
        key_cache_keys: usize,
        io_timeout_ms: u64,
        reconnect_attempts: u32,
        defer_pushes: bool,
    ) -> PyResult<Self> {
        let servers = server_list(py, servers)?;
        if workers == 0 || worker >= workers {
            return Err(errors::argument(py, format!("worker {worker} of {workers} workers: ids run from 0 to workers - 1")));
        }
        let cfg = config(py, worker, workers, consistency, secret_file, transport, compress, key_cache_keys, io_timeout_ms, reconnect_attempts, defer_pushes)?;
        let consistency = cfg.consistency;
        let addrs: Vec<&str> = servers.iter().map(String::as_str).collect();
        let client = py.detach(|| Client::connect(&addrs, cfg)).map_err(|e| {
            // Failing to connect at all is a connection error, whatever the transport said.
            let kind = match errors::kind_of(&e) {
                Kind::Timeout | Kind::Error => Kind::Connection,
                k => k,
            };
            errors::raise(py, kind, e.to_string())
        })?;
        Ok(PyClient { inner: RwLock::new(Some(Arc::new(client))), servers, worker, workers, consistency })
    }

    /// Creates a table on every server (or finds it, if it exists with the same definition) and
    /// returns it.
    ///
    /// ``kind`` is "sparse" (keys exist once pushed; hashed features) or "dense" (every key in
    /// [start, end) exists). ``dim`` values per key. ``updater`` applies pushes on the servers:
    /// "sum", "assign", "sgd{lr=..}", "adagrad{lr=..,eps=..}", "adam{lr=..,b1=..,b2=..,eps=..}",
    /// "ftrl{alpha=..,beta=..,l1=..,l2=..}". ``end`` defaults to 2^64 - 1 for sparse tables; a
    /// dense table needs it. ``init_scale`` > 0 starts every component uniform in
    /// [-init_scale, init_scale), a pure function of ``init_seed``, the key and the component
    /// (embeddings need it); 0 starts at zero. ``non_finite`` is "reject" (a push with NaN or Inf
    /// is refused) or "skip" (its finite components are applied). ``capacity``: a sparse table's
    /// most keys per shard (0: the servers' default).
    #[pyo3(signature = (name, kind="sparse", dim=16, updater="adagrad{lr=0.05}", start=0, end=None, *, init_scale=0.0, init_seed=0, non_finite="reject", capacity=0))]
    #[allow(clippy::too_many_arguments)]
    fn create_table(
        slf: &Bound<'_, Self>,
        name: &str,
        kind: &str,
        dim: u32,
        updater: &str,
        start: u64,
        end: Option<u64>,
        init_scale: f32,
        init_seed: u64,
        non_finite: &str,
        capacity: u64,
    ) -> PyResult<PyTable> {
        let py = slf.py();
        let kind = match kind {
            "sparse" => TableKind::Sparse,
            "dense" => TableKind::Dense,
            other => return Err(errors::argument(py, format!("kind {other:?}: use \"sparse\" or \"dense\""))),
        };
        let end = match (end, kind) {
            (Some(end), _) => end,
            (None, TableKind::Sparse) => u64::MAX,
            (None, TableKind::Dense) => return Err(errors::argument(py, "a dense table needs end: its keys are [start, end)")),
        };
        if start >= end || dim == 0 {
            return Err(errors::argument(py, format!("keys [{start}, {end}) with dim {dim}: need start < end and dim > 0")));
        }
        let mut spec = TableSpec::new(name, kind, start, end, dim);
        spec.updater = updater.to_string();
        spec.non_finite = match non_finite {
            "reject" => NonFinite::Reject,
            "skip" => NonFinite::Skip,
            other => return Err(errors::argument(py, format!("non_finite {other:?}: use \"reject\" or \"skip\""))),
        };
        spec.init = match init_scale {
            0.0 => Init::Zero,
            scale if scale.is_finite() && scale > 0.0 => Init::Uniform { scale, seed: init_seed },
            scale => return Err(errors::argument(py, format!("init_scale {scale}: use 0 (zeros) or a positive scale"))),
        };
        spec.capacity = capacity;
        let client = slf.get().live(py)?;
        let table = py.detach(|| client.create_table(&spec)).map_err(|e| errors::client(py, e))?;
        Ok(PyTable { client: slf.clone().unbind(), table })
    }

    /// The table called ``name`` (created by any client, or by the servers' --tables file).
    fn table(slf: &Bound<'_, Self>, name: &str) -> PyResult<PyTable> {
        let py = slf.py();
        let client = slf.get().live(py)?;
        let table = py.detach(|| client.table(name)).map_err(|e| errors::client(py, e))?;
        Ok(PyTable { client: slf.clone().unbind(), table })
    }

    /// This worker's clock (an iteration count), sent with every push.
    #[getter]
    fn clock(&self, py: Python<'_>) -> PyResult<u64> {
        let client = self.live(py)?;
        Ok(py.detach(|| client.clock()))
    }

    /// Sets this worker's clock: the iteration its next pushes belong to (from 1; it should only
    /// grow). Bounded-delay pulls wait on every worker's clock.
    fn set_clock(&self, py: Python<'_>, t: u64) -> PyResult<()> {
        let client = self.live(py)?;
        py.detach(|| client.set_clock(t));
        Ok(())
    }

    /// Closes the client: its connections close once no call of another thread is using them.
    /// Tables and tickets of a closed client raise ``ClosedError``. Closing twice does nothing.
    fn close(&self) {
        let taken = self.inner.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(taken);
    }

    /// Whether ``close()`` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.open().is_none()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close();
        false
    }

    /// This worker's id.
    #[getter]
    fn worker(&self) -> u32 {
        self.worker
    }

    /// The job's worker count.
    #[getter]
    fn workers(&self) -> u32 {
        self.workers
    }

    /// The servers connected to.
    #[getter]
    fn servers(&self) -> Vec<String> {
        self.servers.clone()
    }

    /// The consistency model: "eventual", "sequential" or "bounded:N".
    #[getter]
    fn consistency_model(&self) -> String {
        match self.consistency {
            Consistency::Eventual => "eventual".into(),
            Consistency::Sequential => "sequential".into(),
            Consistency::BoundedDelay(tau) => format!("bounded:{tau}"),
        }
    }

    /// The transport the connections use: "tcp", or "rdma" when every link is RDMA.
    #[getter]
    fn transport_in_use(&self, py: Python<'_>) -> PyResult<&'static str> {
        let client = self.live(py)?;
        Ok(py.detach(|| client.transport()))
    }

    /// Requests sent whose replies have not arrived yet, over every shard.
    #[getter]
    fn in_flight(&self, py: Python<'_>) -> PyResult<u64> {
        let client = self.live(py)?;
        Ok(py.detach(|| client.in_flight()))
    }

    /// (bytes sent, bytes received) by this client, frames included.
    #[getter]
    fn bytes(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        let client = self.live(py)?;
        Ok(py.detach(|| client.bytes()))
    }

    /// One round trip to the first server's first shard, with no table touched.
    fn ping(&self, py: Python<'_>) -> PyResult<()> {
        let client = self.live(py)?;
        py.detach(|| client.ping()).map_err(|e| errors::client(py, e))
    }

    /// Every server's status report (its address, tables, shards, clocks), as JSON text, one
    /// per server.
    fn status(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let client = self.live(py)?;
        let reports = py.detach(|| client.status()).map_err(|e| errors::client(py, e))?;
        Ok(reports.iter().map(|r| r.to_string()).collect())
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { ", closed" } else { "" };
        format!("tessera.Client({:?}, worker={}, workers={}, consistency={:?}{state})", self.servers, self.worker, self.workers, self.consistency_model())
    }
}

/// A table of one client: push gradients, pull values. Get one from ``Client.create_table`` or
/// ``Client.table``.
///
/// Keys are numpy uint64 arrays, values float32 arrays of shape (len(keys), dim) (or flat).
/// Arrays are read, and pulls written, in place: nothing is copied between numpy and the
/// client's buffers when they are C-contiguous. Do not change an array from another thread
/// while a call that was given it runs.
#[pyclass(frozen, name = "Table", module = "tessera")]
#[derive(Debug)]
pub struct PyTable {
    client: Py<PyClient>,
    table: Table,
}

impl PyTable {
    fn live(&self, py: Python<'_>) -> PyResult<Arc<Client>> {
        self.client.get().live(py)
    }

    fn dim_usize(&self) -> usize {
        self.table.dim()
    }

    fn ticket(&self, py: Python<'_>, sent: tessera_client::Detached, out: Option<Py<PyArray2<f32>>>) -> PyTicket {
        PyTicket::new(self.client.clone_ref(py), sent, out)
    }

    /// Pulls `keys` into `out` and waits; the values are in `out` on return.
    fn pull_keys_into(&self, py: Python<'_>, keys: &[u64], out: &Bound<'_, PyArray2<f32>>) -> PyResult<()> {
        let client = self.live(py)?;
        let table = &self.table;
        arrays::write_into(out, |o| py.detach(|| client.pull(table, keys, o)?.wait()).map(drop).map_err(|e| errors::client(py, e)))
    }

    fn pull_range_into(&self, py: Python<'_>, start: u64, out: &Bound<'_, PyArray2<f32>>) -> PyResult<()> {
        let client = self.live(py)?;
        let table = &self.table;
        arrays::write_into(out, |o| py.detach(|| client.pull_range(table, start, o)?.wait()).map(drop).map_err(|e| errors::client(py, e)))
    }

    /// A pull sent now whose values land in `out` when its ticket is waited on. Under bounded
    /// delay a pull returns only once its values are fresh enough, so it is waited on here.
    fn pull_later(
        &self,
        py: Python<'_>,
        out: Bound<'_, PyArray2<f32>>,
        send: impl for<'a> Fn(&'a Client, &'a mut [f32]) -> tessera_client::Result<Ticket<'a>> + Sync,
    ) -> PyResult<PyTicket> {
        let client = self.live(py)?;
        if matches!(self.client.get().consistency(), Consistency::BoundedDelay(_)) {
            arrays::write_into(&out, |o| py.detach(|| send(&client, o)?.wait()).map(drop).map_err(|e| errors::client(py, e)))?;
            return Ok(PyTicket::answered(self.client.clone_ref(py), Some(out.unbind())));
        }
        let sent = arrays::write_into(&out, |o| py.detach(|| send(&client, o).map(Ticket::detach)).map_err(|e| errors::client(py, e)))?;
        Ok(self.ticket(py, sent, Some(out.unbind())))
    }
}

#[pymethods]
impl PyTable {
    /// Pushes ``values`` (float32, shape (len(keys), dim) or flat) for ``keys`` (uint64); the
    /// servers apply the table's updater. Returns a ``Ticket`` at once: the arrays have been
    /// read (and may be reused) when this returns; ``ticket.wait()`` says how the push ended.
    fn push(&self, py: Python<'_>, keys: &Bound<'_, PyAny>, values: &Bound<'_, PyAny>) -> PyResult<PyTicket> {
        let client = self.live(py)?;
        let keys = arrays::keys(keys)?;
        let values = arrays::values(values, "values", Some(keys.len()?), self.dim_usize())?;
        let (k, v) = (arrays::slice(&keys), arrays::slice(&values));
        let table = &self.table;
        let sent = py.detach(|| client.push(table, &k, &v).map(Ticket::detach)).map_err(|e| errors::client(py, e))?;
        Ok(self.ticket(py, sent, None))
    }

    /// Pulls the values of ``keys`` (uint64) and waits for them: a float32 array of shape
    /// (len(keys), dim). With ``out`` (float32, that shape, C-contiguous) the values are written
    /// straight into it, and it is returned. Keys a sparse table has never seen read as its
    /// initial values.
    #[pyo3(signature = (keys, out=None))]
    fn pull<'py>(&self, py: Python<'py>, keys: &Bound<'py, PyAny>, out: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let keys = arrays::keys(keys)?;
        let out = arrays::out(py, out, keys.len()?, self.dim_usize())?;
        self.pull_keys_into(py, &arrays::slice(&keys), &out)?;
        Ok(out)
    }

    /// As ``pull``, but returns a ``Ticket`` at once; ``ticket.wait()`` writes the values into
    /// ``out`` (a new array when None) and returns it. Leave ``out`` alone until then.
    #[pyo3(signature = (keys, out=None))]
    fn pull_async(&self, py: Python<'_>, keys: &Bound<'_, PyAny>, out: Option<&Bound<'_, PyAny>>) -> PyResult<PyTicket> {
        let keys = arrays::keys(keys)?;
        let out = arrays::out(py, out, keys.len()?, self.dim_usize())?;
        let k = arrays::slice(&keys);
        let table = &self.table;
        self.pull_later(py, out, |client, o| client.pull(table, &k, o))
    }

    /// Pushes ``values`` (float32, shape (count, dim) or flat) for the dense range of keys from
    /// ``start``. Returns a ``Ticket`` at once.
    fn push_range(&self, py: Python<'_>, start: u64, values: &Bound<'_, PyAny>) -> PyResult<PyTicket> {
        let client = self.live(py)?;
        let values = arrays::values(values, "values", None, self.dim_usize())?;
        let v = arrays::slice(&values);
        let table = &self.table;
        let sent = py.detach(|| client.push_range(table, start, &v).map(Ticket::detach)).map_err(|e| errors::client(py, e))?;
        Ok(self.ticket(py, sent, None))
    }

    /// Pulls ``count`` keys of a dense table from ``start`` and waits: a float32 array of shape
    /// (count, dim), or ``out`` filled in place.
    #[pyo3(signature = (start, count, out=None))]
    fn pull_range<'py>(&self, py: Python<'py>, start: u64, count: usize, out: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let out = arrays::out(py, out, count, self.dim_usize())?;
        self.pull_range_into(py, start, &out)?;
        Ok(out)
    }

    /// As ``pull_range``, but returns a ``Ticket`` at once; ``ticket.wait()`` returns the values.
    #[pyo3(signature = (start, count, out=None))]
    fn pull_range_async(&self, py: Python<'_>, start: u64, count: usize, out: Option<&Bound<'_, PyAny>>) -> PyResult<PyTicket> {
        let out = arrays::out(py, out, count, self.dim_usize())?;
        let table = &self.table;
        self.pull_later(py, out, |client, o| client.pull_range(table, start, o))
    }

    /// The table's name.
    #[getter]
    fn name(&self) -> String {
        self.table.spec().name.clone()
    }

    /// "sparse" or "dense".
    #[getter]
    fn kind(&self) -> &'static str {
        match self.table.spec().kind {
            TableKind::Sparse => "sparse",
            TableKind::Dense => "dense",
        }
    }

    /// Values per key.
    #[getter]
    fn dim(&self) -> usize {
        self.dim_usize()
    }

    /// The first key.
    #[getter]
    fn start(&self) -> u64 {
        self.table.spec().start
    }

    /// One past the last key.
    #[getter]
    fn end(&self) -> u64 {
        self.table.spec().end
    }

    /// How the servers apply pushes, e.g. "adagrad{lr=0.05}".
    #[getter]
    fn updater(&self) -> String {
        self.table.spec().updater.clone()
    }

    /// The client this table belongs to.
    #[getter]
    fn client(&self, py: Python<'_>) -> Py<PyClient> {
        self.client.clone_ref(py)
    }

    fn __repr__(&self) -> String {
        let s = self.table.spec();
        format!("tessera.Table({:?}, kind={:?}, dim={}, updater={:?}, start={}, end={})", s.name, self.kind(), s.dim, s.updater, s.start, s.end)
    }
}

/// How long one slice of a ticket's wait runs with the GIL released before it looks at
/// signals (Ctrl-C) and its timeout.
pub const WAIT_SLICE: Duration = Duration::from_millis(50);
