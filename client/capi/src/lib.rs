//! The C ABI of the Tessera client: `libtessera.so` (or `.a`) and `include/tessera.h`, which
//! cbindgen generates from this file (`tests/header.rs` fails when the two disagree).
//!
//! # How it is built to be hard to misuse
//! - **Handles, not pointers.** A client, a table and a ticket are integers. A closed client, a
//!   ticket already waited on, or a number that was never a handle gives `TESSERA_ERR_CLOSED`,
//!   never a dangling pointer.
//! - **Every function returns a status** (`TESSERA_OK` is 0); `tessera_last_error()` then says
//!   what went wrong, in this thread.
//! - **Null pointers and wrong lengths are refused** before anything is sent.
//! - **No panic crosses the boundary**: one that happens anyway (a bug) returns
//!   `TESSERA_ERR_PANIC`, and the client should be closed.
//! - **Threads:** any function may be called from any thread. Calls on one client are
//!   serialised; give each trainer thread its own client for parallelism.
//!
//! The one thing the library cannot check is the lifetime of a pull's output buffer: it must
//! stay valid, and untouched by the caller, until the pull's ticket is waited on (as with
//! `MPI_Irecv`). Pass a null ticket pointer to have a call wait before it returns instead.
//!
//! The unsafe code here is the boundary's: turning the caller's pointers into slices, each
//! after a null, alignment and size check, on the contract the header states.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tessera_client::filter::{self, Filter};
use tessera_client::{Client, ClientConfig, ClientError, Detached, PushBuffer, Table};
use tessera_layout::catalog::{Init, NonFinite};
use tessera_layout::{LayoutError, TableKind, TableSpec};
use tessera_transport::auth::ClusterSecret;
use tessera_transport::{Status, TransportError, TransportKind};

/// The library's version, as in `tessera_version()`: major, minor and patch. A program can
/// compare what it was compiled against with what it runs with.
pub const TESSERA_VERSION_MAJOR: u32 = 0;
pub const TESSERA_VERSION_MINOR: u32 = 1;
pub const TESSERA_VERSION_PATCH: u32 = 0;

/// The version of the library running, "MAJOR.MINOR.PATCH" (static text).
#[no_mangle]
pub extern "C" fn tessera_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Success.
pub const TESSERA_OK: i32 = 0;
/// A pointer the call needs was null.
pub const TESSERA_ERR_NULL: i32 = 1;
/// An argument is wrong: a length that does not match the table, a key outside it, text that
/// is not UTF-8, an unknown kind or transport, a non-finite gradient.
pub const TESSERA_ERR_ARGUMENT: i32 = 2;
/// The client, table or ticket handle is unknown: never opened, closed, or already waited on.
pub const TESSERA_ERR_CLOSED: i32 = 3;
/// Connecting to the servers failed, or reconnecting to one whose connection broke (the next
/// call tries again).
pub const TESSERA_ERR_CONNECT: i32 = 4;
/// No table has that name (or id).
pub const TESSERA_ERR_UNKNOWN_TABLE: i32 = 5;
/// A server refused the request (`tessera_last_error()` has its message).
pub const TESSERA_ERR_SERVER: i32 = 6;
/// The network failed or a server did not answer in time.
pub const TESSERA_ERR_TRANSPORT: i32 = 7;
/// A bug in Tessera: close the client.
pub const TESSERA_ERR_PANIC: i32 = 8;
/// The call's server was lost with this call in flight (a standalone server that did not answer
/// through the reconnection attempts, or came back without its data): a push may or may not have
/// been applied, and a pull's output is not complete. The call is never sent again; the client's
/// next call reconnects by itself. (A push in flight when a server restarts with its data, or
/// when a cluster's member fails, is sent again and applied once instead.)
pub const TESSERA_ERR_UNKNOWN_OUTCOME: i32 = 9;
/// No answer in time: the ticket of `tessera_wait` or `tessera_wait_timeout` is still in flight
/// (wait on it again, poll it, or close the client). A call made with a NULL ticket that
/// times out may still be applied.
pub const TESSERA_ERR_TIMEOUT: i32 = 10;

/// A connected client (0 is never one).
pub type TesseraClient = u64;
/// A table of one client, from `tessera_table` or `tessera_create_table`.
pub type TesseraTable = u32;
/// A call in flight, to wait on with `tessera_wait` (0 is never one).
pub type TesseraTicket = u64;
/// A gradient buffer of one client, from `tessera_push_buffer` (0 is never one).
pub type TesseraBuffer = u64;
/// A push filter of one client, from `tessera_filter_new` (0 is never one).
pub type TesseraFilter = u64;

/// `tessera_create_table`'s `kind`: a dense table (every key in `[start, end)` exists).
pub const TESSERA_DENSE: u32 = 0;
/// `tessera_create_table`'s `kind`: a sparse table (keys exist once pushed).
pub const TESSERA_SPARSE: u32 = 1;

/// Why a call failed: its status and message.
struct Fail {
    code: i32,
    message: String,
}

impl Fail {
    fn new(code: i32, message: impl Into<String>) -> Fail {
        Fail { code, message: message.into() }
    }
}

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Fail {
        let code = match &e {
            ClientError::Server { status: Status::UnknownTable, .. } => TESSERA_ERR_UNKNOWN_TABLE,
            ClientError::Server { .. } => TESSERA_ERR_SERVER,
            ClientError::Placement(LayoutError::UnknownTable { .. }) => TESSERA_ERR_UNKNOWN_TABLE,
            ClientError::Transport(TransportError::RdmaUnavailable { .. }) => TESSERA_ERR_ARGUMENT,
            ClientError::OutcomeUnknown { .. } => TESSERA_ERR_UNKNOWN_OUTCOME,
            ClientError::Reconnect { .. } => TESSERA_ERR_CONNECT,
            ClientError::Transport(_) | ClientError::Unavailable { .. } | ClientError::Protocol { .. } | ClientError::Stale { .. } => TESSERA_ERR_TRANSPORT,
            _ => TESSERA_ERR_ARGUMENT,
        };
        Fail::new(code, e.to_string())
    }
}

type Outcome<T = ()> = Result<T, Fail>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Runs one entry point: catches panics, and records the message of a failure for
/// `tessera_last_error`.
fn entry(f: impl FnOnce() -> Outcome) -> i32 {
    let (code, message) = match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => (TESSERA_OK, String::new()),
        Ok(Err(fail)) => (fail.code, fail.message),
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            (TESSERA_ERR_PANIC, format!("internal error (a bug in Tessera): {}", what.unwrap_or_default()))
        }
    };
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
    code
}

/// One open client, its tables, and its tickets in flight.
struct Handle {
    client: Client,
    /// Set by `tessera_close`: waits still running on other threads return at their next slice.
    closed: AtomicBool,
    /// How long `tessera_wait`, and a call made with a NULL ticket, wait for an answer.
    io_timeout: Duration,
    tables: Mutex<Vec<Table>>,
    tickets: Mutex<HashMap<TesseraTicket, Pending>>,
    next_ticket: AtomicU64,
    /// Gradient buffers, freed with `tessera_push_buffer_free` or with the client.
    buffers: Mutex<HashMap<TesseraBuffer, PushBuffer>>,
    next_buffer: AtomicU64,
    /// Push filters, freed with `tessera_filter_free` or with the client.
    filters: Mutex<HashMap<TesseraFilter, PushFilter>>,
    next_filter: AtomicU64,
}

/// A push filter of one client (see `tessera_filter_new`).
#[derive(Debug)]
enum PushFilter {
    Significant(filter::SignificantlyModified),
    RandomSkip(filter::RandomSkip),
    Kkt(filter::Kkt),
}

impl PushFilter {
    fn as_filter(&mut self) -> &mut dyn Filter {
        match self {
            PushFilter::Significant(f) => f,
            PushFilter::RandomSkip(f) => f,
            PushFilter::Kkt(f) => f,
        }
    }
}

/// A ticket in flight, and (for a pull) where its values go: the caller's buffer, as an
/// address and a length, turned back into a slice when it is waited on.
struct Pending {
    ticket: Detached,
    out: Option<(usize, usize)>,
}

static CLIENTS: LazyLock<Mutex<HashMap<TesseraClient, Arc<Handle>>>> = LazyLock::new(Default::default);
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Locks a registry; a poisoned one (a panic while it was held) is still consistent, as every
/// update is a single insert or remove.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn handle(client: TesseraClient) -> Outcome<Arc<Handle>> {
    lock(&CLIENTS).get(&client).cloned().ok_or_else(|| Fail::new(TESSERA_ERR_CLOSED, format!("client {client} is not open (closed, or never opened)")))
}

/// Runs one entry point that works on a table of an open client.
fn on_table(client: TesseraClient, table: TesseraTable, f: impl FnOnce(&Handle, &Table) -> Outcome) -> i32 {
    entry(|| {
        let h = handle(client)?;
        let t = table_of(&h, table)?;
        f(&h, &t)
    })
}

fn table_of(h: &Handle, table: TesseraTable) -> Outcome<Table> {
    lock(&h.tables).get(table as usize).cloned().ok_or_else(|| Fail::new(TESSERA_ERR_CLOSED, format!("table handle {table} was not opened on this client")))
}

/// The caller's `n` values at `ptr` (any pointer when `n` is 0).
///
/// # Safety
/// When `n > 0`, `ptr` must point to `n` initialised values that stay valid and unchanged for the
/// returned lifetime (the header's contract for every input array).
unsafe fn slice_in<'a, T>(ptr: *const T, n: usize, what: &str) -> Outcome<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    check_pointer(ptr, n, what)?;
    // SAFETY: non-null, aligned, and n * size_of::<T>() fits isize (checked above); the caller
    // guarantees n readable values that outlive 'a.
    Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
}

/// The caller's buffer of `n` values at `ptr`, to write into.
///
/// # Safety
/// When `n > 0`, `ptr` must point to `n` writable values that nothing else reads or writes for
/// the returned lifetime (the header's contract for a pull's output, until its ticket is waited
/// on).
unsafe fn slice_out<'a>(ptr: *mut f32, n: usize, what: &str) -> Outcome<&'a mut [f32]> {
    if n == 0 {
        return Ok(&mut []);
    }
    check_pointer(ptr.cast_const(), n, what)?;
    // SAFETY: non-null, aligned, size checked; the caller guarantees exclusive access for 'a.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, n) })
}

fn check_pointer<T>(ptr: *const T, n: usize, what: &str) -> Outcome {
    if ptr.is_null() {
        return Err(Fail::new(TESSERA_ERR_NULL, format!("{what} is NULL but its length is {n}")));
    }
    if !ptr.is_aligned() {
        return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("{what} is not aligned for its type")));
    }
    if n.checked_mul(size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("{what}: length {n} is too large")));
    }
    Ok(())
}

/// A NUL-terminated UTF-8 string from the caller.
///
/// # Safety
/// A non-null `ptr` must point to a NUL-terminated string valid for the call.
unsafe fn text<'a>(ptr: *const c_char, what: &str) -> Outcome<&'a str> {
    if ptr.is_null() {
        return Err(Fail::new(TESSERA_ERR_NULL, format!("{what} is NULL")));
    }
    // SAFETY: non-null; the caller guarantees a NUL-terminated string that outlives the call.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str().map_err(|_| Fail::new(TESSERA_ERR_ARGUMENT, format!("{what} is not UTF-8")))
}

/// Refuses an out-pointer that [`put`] would refuse. Calls check theirs before they do
/// anything, so that a call that fails leaves nothing behind: no request sent, no ticket in
/// flight (whose buffer the caller would free), no client open.
fn check_out<T>(ptr: *mut T, what: &str) -> Outcome {
    if ptr.is_null() {
        return Err(Fail::new(TESSERA_ERR_NULL, format!("{what} is NULL")));
    }
    if !ptr.is_aligned() {
        return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("{what} is not aligned for its type")));
    }
    Ok(())
}

/// [`check_out`] for an out-pointer that may be NULL.
fn check_out_or_null<T>(ptr: *mut T, what: &str) -> Outcome {
    if ptr.is_null() {
        return Ok(());
    }
    check_out(ptr, what)
}

/// Writes `value` through the caller's out-pointer.
///
/// # Safety
/// A non-null `ptr` must be valid for writing one `T`.
unsafe fn put<T>(ptr: *mut T, value: T, what: &str) -> Outcome {
    check_out(ptr, what)?;
    // SAFETY: non-null and aligned; the caller guarantees it is writable.
    unsafe { ptr.write(value) };
    Ok(())
}

/// The environment variable that names the cluster secret file.
const SECRET_FILE_VAR: &str = "TESSERA_CLUSTER_SECRET_FILE";

/// How a client connects and behaves (`tessera_connect_with`). Fill it with
/// `tessera_options_init`, then change what you need: a program built against this header
/// keeps working with later versions of the library, which may add fields at the end.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TesseraOptions {
    /// `sizeof(TesseraOptions)` as the program was compiled (set by `tessera_options_init`).
    pub size: u32,
    /// This trainer's worker id: its entry in the vector clocks, distinct per trainer.
    pub worker: u32,
    /// "auto" (RDMA where both ends have it), "tcp" or "rdma"; NULL is "auto".
    pub transport: *const c_char,
    /// The consistency model of every call: "eventual", "sequential" or "bounded:N" (bounded
    /// delay N); NULL is "eventual".
    pub consistency: *const c_char,
    /// Workers in the job (ids 0 .. workers - 1), whom a bounded-delay pull waits for; 0 is
    /// unknown, and bounded-delay pulls are refused.
    pub workers: u32,
    /// 1: Snappy-compress request and reply bodies when that saves at least a tenth.
    pub compress: u32,
    /// Keys of repeated key lists sent by hash instead of in full, per shard; 0 (the default)
    /// sends every list in full. Keep it at most the servers' --key-cache-keys.
    pub key_cache_keys: u64,
    /// How long a call waits for the network, and `tessera_wait` for an answer (30 000).
    pub io_timeout_ms: u64,
    /// How long a bounded-delay pull waits for slow workers (60 000).
    pub stale_timeout_ms: u64,
    /// Attempts to reconnect to a server whose connection broke, made by the next call (8); 0
    /// never reconnects.
    pub reconnect_attempts: u32,
    /// The pause after the first failed attempt to reconnect, doubling up to a second (50).
    pub reconnect_pause_ms: u32,
    /// A file holding the cluster secret, or NULL for the file named by the environment
    /// variable `TESSERA_CLUSTER_SECRET_FILE` (if set).
    pub cluster_secret_file: *const c_char,
    /// 1 (the default): over TCP a push waits for the next request to its server, or the
    /// client's next wait, and leaves in the same write; 0 sends each push at once.
    pub defer_pushes: u32,
}

impl Default for TesseraOptions {
    fn default() -> Self {
        let (client, transport) = (ClientConfig::worker(0), tessera_transport::TransportConfig::default());
        TesseraOptions {
            size: size_of::<TesseraOptions>() as u32,
            worker: 0,
            transport: std::ptr::null(),
            consistency: std::ptr::null(),
            workers: client.workers,
            compress: u32::from(client.compress),
            key_cache_keys: client.key_cache_keys as u64,
            io_timeout_ms: transport.io_timeout_ms,
            stale_timeout_ms: client.stale_timeout.as_millis() as u64,
            reconnect_attempts: client.reconnect_attempts,
            reconnect_pause_ms: client.reconnect_pause_ms as u32,
            cluster_secret_file: std::ptr::null(),
            defer_pushes: u32::from(client.defer_pushes),
        }
    }
}

/// Fills `*options` with the defaults (and its `size`).
///
/// # Safety
/// `options` must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_options_init(options: *mut TesseraOptions) -> i32 {
    // SAFETY: the caller's contract above.
    entry(|| unsafe { put(options, TesseraOptions::default(), "options") })
}

/// The caller's versioned struct: the fields its leading `size` covers, the others at their
/// defaults. A struct larger than this library knows comes from a newer header, and is refused.
///
/// # Safety
/// `ptr` must point to a struct that starts with its size in bytes (a `u32`) and is readable for
/// that many bytes.
unsafe fn versioned<T: Copy>(ptr: *const T, defaults: T, what: &str) -> Outcome<T> {
    check_pointer(ptr, 1, what)?;
    // SAFETY: non-null and aligned (checked above); every version starts with its u32 size.
    let size = unsafe { ptr.cast::<u32>().read() } as usize;
    if !(size_of::<u32>()..=size_of::<T>()).contains(&size) {
        let reason = format!(
            "{what}.size is {size}, this libtessera knows {} bytes: call the init function, and link the libtessera the header came from",
            size_of::<T>()
        );
        return Err(Fail::new(TESSERA_ERR_ARGUMENT, reason));
    }
    let mut value = defaults;
    // SAFETY: the caller's struct is readable for `size` bytes, at most size_of::<T>() (checked
    // above), which `value` holds; the two do not overlap (`value` is a local).
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&raw mut value).cast::<u8>(), size) };
    Ok(value)
}

/// A client configuration from the caller's options.
///
/// # Safety
/// The options' strings, unless NULL, must be NUL-terminated.
unsafe fn client_config(o: &TesseraOptions) -> Outcome<ClientConfig> {
    let kind = if o.transport.is_null() {
        TransportKind::Auto
    } else {
        // SAFETY: the caller's contract above.
        match unsafe { text(o.transport, "transport") }? {
            "auto" => TransportKind::Auto,
            "tcp" => TransportKind::Tcp,
            "rdma" => TransportKind::Rdma,
            other => return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("transport {other:?}: use auto, tcp or rdma"))),
        }
    };
    let mut cfg = ClientConfig { kind, ..ClientConfig::worker(o.worker) };
    if !o.consistency.is_null() {
        // SAFETY: the caller's contract above.
        cfg.consistency = unsafe { text(o.consistency, "consistency") }?.parse().map_err(|e: String| Fail::new(TESSERA_ERR_ARGUMENT, e))?;
    }
    if o.compress > 1 {
        return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("compress is {}: use 0 or 1", o.compress)));
    }
    if o.defer_pushes > 1 {
        return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("defer_pushes is {}: use 0 or 1", o.defer_pushes)));
    }
    (cfg.workers, cfg.compress, cfg.key_cache_keys, cfg.defer_pushes) = (o.workers, o.compress == 1, o.key_cache_keys as usize, o.defer_pushes == 1);
    if o.io_timeout_ms == 0 {
        return Err(Fail::new(TESSERA_ERR_ARGUMENT, "io_timeout_ms is 0: every call would time out at once"));
    }
    cfg.transport.io_timeout_ms = o.io_timeout_ms;
    cfg.stale_timeout = Duration::from_millis(o.stale_timeout_ms);
    (cfg.reconnect_attempts, cfg.reconnect_pause_ms) = (o.reconnect_attempts, u64::from(o.reconnect_pause_ms));
    let secret_file = if o.cluster_secret_file.is_null() {
        std::env::var_os(SECRET_FILE_VAR).filter(|p| !p.is_empty()).map(|p| (std::path::PathBuf::from(p), SECRET_FILE_VAR))
    } else {
        // SAFETY: the caller's contract above.
        Some((unsafe { text(o.cluster_secret_file, "cluster_secret_file") }?.into(), "cluster_secret_file"))
    };
    if let Some((path, what)) = secret_file {
        let secret = ClusterSecret::from_file(&path).map_err(|e| Fail::new(TESSERA_ERR_ARGUMENT, format!("{what}: {e}")))?;
        cfg.transport.cluster_secret = Some(secret);
    }
    cfg.transport.validate().map_err(|e| Fail::new(TESSERA_ERR_ARGUMENT, e.to_string()))?;
    Ok(cfg)
}

/// Connects to `servers` as configured by `o`, and returns the new client's handle.
///
/// # Safety
/// As [`client_config`]; `servers` must be a NUL-terminated string.
unsafe fn open_client(servers: *const c_char, o: &TesseraOptions, client: *mut TesseraClient) -> Outcome {
    // SAFETY: the caller's contract above.
    let servers = unsafe { text(servers, "servers") }?;
    // SAFETY: the caller's contract above.
    let cfg = unsafe { client_config(o) }?;
    check_out(client, "client")?;
    let addrs: Vec<&str> = servers.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if addrs.is_empty() {
        return Err(Fail::new(TESSERA_ERR_ARGUMENT, "servers names no address"));
    }
    let io_timeout = Duration::from_millis(cfg.transport.io_timeout_ms);
    let opened = Client::connect(&addrs, cfg).map_err(|e| match Fail::from(e) {
        Fail { code: TESSERA_ERR_TRANSPORT, message } => Fail::new(TESSERA_ERR_CONNECT, message),
        other => other,
    })?;
    let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    let h = Handle {
        client: opened,
        closed: AtomicBool::new(false),
        io_timeout,
        tables: Mutex::default(),
        tickets: Mutex::default(),
        next_ticket: AtomicU64::new(1),
        buffers: Mutex::default(),
        next_buffer: AtomicU64::new(1),
        filters: Mutex::default(),
        next_filter: AtomicU64::new(1),
    };
    lock(&CLIENTS).insert(id, Arc::new(h));
    // SAFETY: the caller's contract above.
    unsafe { put(client, id, "client") }
}

/// Connects to a Tessera cluster.
///
/// `servers`: any servers of a cluster, comma-separated ("10.0.0.5:7070,10.0.0.6:7070"; the
/// client learns the rest from them), or one standalone server's address.
/// `worker`: this trainer's worker id (distinct per trainer; its entry in the vector clocks).
/// `transport`: "auto" (RDMA where both ends have it), "tcp", "rdma", or NULL for "auto".
/// When the environment variable `TESSERA_CLUSTER_SECRET_FILE` names a file, the client proves
/// it holds that cluster secret to every server, and talks only to servers that prove the same
/// (as `--cluster-secret-file` does for the tools). Everything else is at its default
/// (`tessera_connect_with` sets it).
/// On success `*client` is the new client.
///
/// # Safety
/// `servers` (and `transport`, unless NULL) must be NUL-terminated strings; `client` must be
/// writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_connect(servers: *const c_char, worker: u32, transport: *const c_char, client: *mut TesseraClient) -> i32 {
    let options = TesseraOptions { worker, transport, ..TesseraOptions::default() };
    // SAFETY: the caller's contract above.
    entry(|| unsafe { open_client(servers, &options, client) })
}

/// Connects as `tessera_connect` does, with every setting from `*options` (filled by
/// `tessera_options_init`, then changed where needed).
///
/// # Safety
/// `servers` must be a NUL-terminated string; `options` must point to a `TesseraOptions` whose
/// size field is right and whose strings, unless NULL, are NUL-terminated; `client` must be
/// writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_connect_with(servers: *const c_char, options: *const TesseraOptions, client: *mut TesseraClient) -> i32 {
    entry(|| {
        // SAFETY: the caller's contract above.
        let o = unsafe { versioned(options, TesseraOptions::default(), "options") }?;
        // SAFETY: the caller's contract above.
        unsafe { open_client(servers, &o, client) }
    })
}

/// Closes a client: its connections close, and tickets not waited on are dropped (a pull's
/// buffer is not written after this returns). Its push buffers are freed. The handle is then
/// unknown to every function. Waits blocked on the client in other threads return
/// `TESSERA_ERR_CLOSED` within a few milliseconds.
#[no_mangle]
pub extern "C" fn tessera_close(client: TesseraClient) -> i32 {
    entry(|| match lock(&CLIENTS).remove(&client) {
        Some(h) => {
            h.closed.store(true, Ordering::Release);
            Ok(())
        }
        None => Err(Fail::new(TESSERA_ERR_CLOSED, format!("client {client} is not open (closed twice?)"))),
    })
}

/// Looks up the table called `name`; `*table` is its handle on this client and, unless `dim`
/// is NULL, `*dim` its values per key.
///
/// # Safety
/// `name` must be a NUL-terminated string; `table` (and `dim`, unless NULL) must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_table(client: TesseraClient, name: *const c_char, table: *mut TesseraTable, dim: *mut u32) -> i32 {
    entry(|| {
        let h = handle(client)?;
        // SAFETY: the caller's contract above.
        let name = unsafe { text(name, "name") }?;
        check_out(table, "table")?;
        check_out_or_null(dim, "dim")?;
        let found = h.client.table(name)?;
        // SAFETY: the caller's contract above.
        unsafe { register_table(&h, found, table, dim) }
    })
}

/// Creates a table on every server (or finds it, if it exists with the same definition) and
/// looks it up as `tessera_table` does.
///
/// `kind`: `TESSERA_DENSE` or `TESSERA_SPARSE`. Keys are `[start, end)`, `dim` values each.
/// `updater`: how pushes are applied, e.g. "sum", "sgd{lr=0.1}", "adagrad{lr=0.05}"; NULL is
/// "sum". Everything else is at its default (`tessera_create_table_with` sets it).
///
/// # Safety
/// `name` (and `updater`, unless NULL) must be NUL-terminated strings; `table` must be
/// writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tessera_create_table(
    client: TesseraClient,
    name: *const c_char,
    kind: u32,
    start: u64,
    end: u64,
    dim: u32,
    updater: *const c_char,
    table: *mut TesseraTable,
) -> i32 {
    let options = TesseraTableOptions { kind, start, end, dim, updater, ..TesseraTableOptions::default() };
    // SAFETY: the caller's contract above.
    entry(|| unsafe { create_table(client, name, &options, table) })
}

/// A table's definition (`tessera_create_table_with`). Fill it with
/// `tessera_table_options_init`, then set at least `end`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TesseraTableOptions {
    /// `sizeof(TesseraTableOptions)` as the program was compiled (set by the init function).
    pub size: u32,
    /// `TESSERA_DENSE` (the default) or `TESSERA_SPARSE`.
    pub kind: u32,
    /// Keys are `[start, end)` (start 0, end unset: 0).
    pub start: u64,
    pub end: u64,
    /// Values per key (1).
    pub dim: u32,
    /// What a push with NaN or Inf does: `TESSERA_NON_FINITE_REJECT` (the default; nothing of
    /// it is applied) or `TESSERA_NON_FINITE_SKIP` (the finite components are).
    pub non_finite: u32,
    /// How pushes are applied, e.g. "sum", "sgd{lr=0.1}"; NULL is "sum".
    pub updater: *const c_char,
    /// Initial values: 0 (the default) starts every key at zero; a positive scale starts each
    /// component uniform in `[-init_scale, init_scale)`, a pure function of `init_seed`, the key
    /// and the component.
    pub init_scale: f32,
    pub init_seed: u64,
    /// A sparse table's most keys per shard; 0 is the servers' default.
    pub capacity: u64,
}

/// `TesseraTableOptions::non_finite`: refuse a push with NaN or Inf; nothing of it is applied.
pub const TESSERA_NON_FINITE_REJECT: u32 = 0;
/// `TesseraTableOptions::non_finite`: apply a push's finite components and skip the others.
pub const TESSERA_NON_FINITE_SKIP: u32 = 1;

impl Default for TesseraTableOptions {
    fn default() -> Self {
        TesseraTableOptions {
            size: size_of::<TesseraTableOptions>() as u32,
            kind: TESSERA_DENSE,
            start: 0,
            end: 0,
            dim: 1,
            non_finite: TESSERA_NON_FINITE_REJECT,
            updater: std::ptr::null(),
            init_scale: 0.0,
            init_seed: 0,
            capacity: 0,
        }
    }
}

/// Fills `*options` with a table definition's defaults (and its `size`).
///
/// # Safety
/// `options` must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_table_options_init(options: *mut TesseraTableOptions) -> i32 {
    // SAFETY: the caller's contract above.
    entry(|| unsafe { put(options, TesseraTableOptions::default(), "options") })
}

/// Creates the table `name` as `*options` defines it (see `tessera_create_table`).
///
/// # Safety
/// `name` must be a NUL-terminated string; `options` must point to a `TesseraTableOptions`
/// whose size field is right and whose updater string, unless NULL, is NUL-terminated; `table` must be
/// writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_create_table_with(
    client: TesseraClient,
    name: *const c_char,
    options: *const TesseraTableOptions,
    table: *mut TesseraTable,
) -> i32 {
    entry(|| {
        // SAFETY: the caller's contract above.
        let o = unsafe { versioned(options, TesseraTableOptions::default(), "options") }?;
        // SAFETY: the caller's contract above.
        unsafe { create_table(client, name, &o, table) }
    })
}

/// The table definition `o` describes, called `name`.
///
/// # Safety
/// `o.updater`, unless NULL, must be a NUL-terminated string.
unsafe fn table_spec(name: &str, o: &TesseraTableOptions) -> Outcome<TableSpec> {
    let kind = match o.kind {
        TESSERA_DENSE => TableKind::Dense,
        TESSERA_SPARSE => TableKind::Sparse,
        other => return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("kind {other}: use TESSERA_DENSE or TESSERA_SPARSE"))),
    };
    if o.start >= o.end || o.dim == 0 {
        let reason = format!("keys [{}, {}) with dim {}: need start < end and dim > 0", o.start, o.end, o.dim);
        return Err(Fail::new(TESSERA_ERR_ARGUMENT, reason));
    }
    let mut spec = TableSpec::new(name, kind, o.start, o.end, o.dim);
    if !o.updater.is_null() {
        // SAFETY: the caller's contract above.
        spec.updater = unsafe { text(o.updater, "updater") }?.to_string();
    }
    spec.non_finite = match o.non_finite {
        TESSERA_NON_FINITE_REJECT => NonFinite::Reject,
        TESSERA_NON_FINITE_SKIP => NonFinite::Skip,
        other => return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("non_finite {other}: use TESSERA_NON_FINITE_REJECT or _SKIP"))),
    };
    spec.init = match o.init_scale {
        0.0 => Init::Zero,
        scale if scale.is_finite() && scale > 0.0 => Init::Uniform { scale, seed: o.init_seed },
        scale => return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("init_scale {scale}: use 0 (zeros) or a positive scale"))),
    };
    spec.capacity = o.capacity;
    Ok(spec)
}

/// # Safety
/// `name` must be a NUL-terminated string, `o.updater` too unless NULL; `table` must be
/// writable.
unsafe fn create_table(client: TesseraClient, name: *const c_char, o: &TesseraTableOptions, table: *mut TesseraTable) -> Outcome {
    let h = handle(client)?;
    // SAFETY: the caller's contract above.
    let name = unsafe { text(name, "name") }?;
    // SAFETY: the caller's contract above.
    let spec = unsafe { table_spec(name, o) }?;
    check_out(table, "table")?;
    let created = h.client.create_table(&spec)?;
    // SAFETY: the caller's contract above.
    unsafe { register_table(&h, created, table, std::ptr::null_mut()) }
}

/// # Safety
/// `table` must be writable; `dim`, unless NULL, too.
unsafe fn register_table(h: &Handle, found: Table, table: *mut TesseraTable, dim: *mut u32) -> Outcome {
    if table.is_null() {
        return Err(Fail::new(TESSERA_ERR_NULL, "table is NULL"));
    }
    let d = found.dim() as u32;
    let id = {
        let mut tables = lock(&h.tables);
        match tables.iter().position(|t| t.spec() == found.spec()) {
            Some(i) => i,
            None => {
                tables.push(found);
                tables.len() - 1
            }
        }
    };
    // SAFETY: the caller's contract above.
    unsafe { put(table, id as TesseraTable, "table") }?;
    if !dim.is_null() {
        // SAFETY: the caller's contract above.
        unsafe { put(dim, d, "dim") }?;
    }
    Ok(())
}

/// Sets this client's clock (an iteration count, from 1), sent with every push after it.
#[no_mangle]
pub extern "C" fn tessera_set_clock(client: TesseraClient, clock: u64) -> i32 {
    entry(|| {
        handle(client)?.client.set_clock(clock);
        Ok(())
    })
}

/// Keeps a call's ticket for `tessera_wait`, or waits for it now when `ticket` is NULL.
///
/// # Safety
/// `ticket`, unless NULL, must be writable; `out`, unless None, must be the call's output
/// buffer under the header's contract.
unsafe fn hand_out(h: &Handle, sent: tessera_client::Ticket<'_>, out: Option<(usize, usize)>, ticket: *mut TesseraTicket) -> Outcome {
    let pending = Pending { ticket: sent.detach(), out };
    if ticket.is_null() {
        // SAFETY: the caller's contract above: `out` is the call's output buffer.
        return match unsafe { finish(h, pending, h.io_timeout) } {
            Ok(()) => Ok(()),
            Err((_, fail)) => Err(fail),
        };
    }
    let id = h.next_ticket.fetch_add(1, Ordering::Relaxed);
    lock(&h.tickets).insert(id, pending);
    // SAFETY: the caller's contract above.
    unsafe { put(ticket, id, "ticket") }
}

/// Pushes `grads` (`n_grads` = `n_keys` x the table's dim values) for `keys`; the servers apply
/// the table's updater. The arrays are read before this returns. `*ticket` is the push's
/// ticket; with `ticket` NULL the call waits for the push instead.
///
/// # Safety
/// `keys` and `grads` must hold `n_keys` and `n_grads` values (or be anything when the count is
/// 0); `ticket`, unless NULL, must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_push(
    client: TesseraClient,
    table: TesseraTable,
    keys: *const u64,
    n_keys: usize,
    grads: *const f32,
    n_grads: usize,
    ticket: *mut TesseraTicket,
) -> i32 {
    on_table(client, table, |h, t| {
        check_out_or_null(ticket, "ticket")?;
        // SAFETY: the caller's contract above.
        let (keys, grads) = unsafe { (slice_in(keys, n_keys, "keys")?, slice_in(grads, n_grads, "grads")?) };
        let sent = h.client.push(t, keys, grads)?;
        // SAFETY: the caller's contract above.
        unsafe { hand_out(h, sent, None, ticket) }
    })
}

/// `tessera_filter_new`'s `kind`: send a key only once its change, accumulated over pushes,
/// exceeds `param` in some component; until then it is held here and keeps adding up.
pub const TESSERA_FILTER_SIGNIFICANT: u32 = 0;
/// `tessera_filter_new`'s `kind`: drop each key with probability `param` (in [0, 1)), scaling
/// what is sent by 1 / (1 - param); `seed` makes runs repeat.
pub const TESSERA_FILTER_RANDOM_SKIP: u32 = 1;
/// `tessera_filter_new`'s `kind`: the KKT filter of an L1-regularised model with strength
/// `param`: a key whose weight is zero is not sent while its gradient is within `param`. Hand it
/// every pull's values with `tessera_filter_observe`.
pub const TESSERA_FILTER_KKT: u32 = 2;

/// Makes a push filter for `tessera_push_filtered`: `kind` is a `TESSERA_FILTER_*`, with its
/// `param` (and `seed` for random skips). `*filter` is its handle, until
/// `tessera_filter_free` or `tessera_close`.
///
/// # Safety
/// `filter` must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_filter_new(client: TesseraClient, kind: u32, param: f64, seed: u64, filter: *mut TesseraFilter) -> i32 {
    entry(|| {
        let h = handle(client)?;
        check_out(filter, "filter")?;
        let made = match kind {
            TESSERA_FILTER_SIGNIFICANT if param >= 0.0 => PushFilter::Significant(filter::SignificantlyModified::new(param as f32)),
            TESSERA_FILTER_RANDOM_SKIP if (0.0..1.0).contains(&param) => PushFilter::RandomSkip(filter::RandomSkip::new(param, seed)),
            TESSERA_FILTER_KKT if param >= 0.0 => PushFilter::Kkt(filter::Kkt::new(param as f32)),
            TESSERA_FILTER_SIGNIFICANT | TESSERA_FILTER_RANDOM_SKIP | TESSERA_FILTER_KKT => {
                return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("filter param {param}: a threshold or strength is >= 0, a skip in [0, 1)")));
            }
            other => return Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("filter kind {other}: use a TESSERA_FILTER_* constant"))),
        };
        let id = h.next_filter.fetch_add(1, Ordering::Relaxed);
        lock(&h.filters).insert(id, made);
        // SAFETY: the caller's contract above.
        unsafe { put(filter, id, "filter") }
    })
}

/// Frees a filter from `tessera_filter_new` (what a significance filter still holds back is
/// dropped).
#[no_mangle]
pub extern "C" fn tessera_filter_free(client: TesseraClient, filter: TesseraFilter) -> i32 {
    entry(|| {
        let h = handle(client)?;
        let freed = lock(&h.filters).remove(&filter);
        freed.map(drop).ok_or_else(|| Fail::new(TESSERA_ERR_CLOSED, format!("filter {filter} is not open on client {client} (freed twice?)")))
    })
}

fn filter_missing(client: TesseraClient, filter: TesseraFilter) -> Fail {
    Fail::new(TESSERA_ERR_CLOSED, format!("filter {filter} is not open on client {client}"))
}

/// Pushes what `filter` keeps of `grads` for `keys`, as `tessera_push` does. A push the filter
/// keeps nothing of sends nothing, and its ticket is answered at once.
///
/// # Safety
/// As `tessera_push`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tessera_push_filtered(
    client: TesseraClient,
    table: TesseraTable,
    filter: TesseraFilter,
    keys: *const u64,
    n_keys: usize,
    grads: *const f32,
    n_grads: usize,
    ticket: *mut TesseraTicket,
) -> i32 {
    on_table(client, table, |h, t| {
        check_out_or_null(ticket, "ticket")?;
        // SAFETY: the caller's contract above.
        let (keys, grads) = unsafe { (slice_in(keys, n_keys, "keys")?, slice_in(grads, n_grads, "grads")?) };
        let mut filters = lock(&h.filters);
        let f = filters.get_mut(&filter).ok_or_else(|| filter_missing(client, filter))?;
        let sent = h.client.push_filtered(t, keys, grads, f.as_filter())?;
        drop(filters);
        // SAFETY: the caller's contract above.
        unsafe { hand_out(h, sent, None, ticket) }
    })
}

/// Hands a KKT filter the values just pulled for `keys` (`n_values` = `n_keys` x the table's
/// dim), so that it knows which weights are zero.
///
/// # Safety
/// `keys` and `values` must hold `n_keys` and `n_values` values.
#[no_mangle]
pub unsafe extern "C" fn tessera_filter_observe(
    client: TesseraClient,
    table: TesseraTable,
    filter: TesseraFilter,
    keys: *const u64,
    n_keys: usize,
    values: *const f32,
    n_values: usize,
) -> i32 {
    on_table(client, table, |h, t| {
        // SAFETY: the caller's contract above.
        let (keys, values) = unsafe { (slice_in(keys, n_keys, "keys")?, slice_in(values, n_values, "values")?) };
        if values.len() != keys.len() * t.dim() {
            let reason = format!("{} values for {} keys of dim {}", values.len(), keys.len(), t.dim());
            return Err(Fail::new(TESSERA_ERR_ARGUMENT, reason));
        }
        match lock(&h.filters).get_mut(&filter) {
            Some(PushFilter::Kkt(kkt)) => {
                kkt.observe(t.dim(), keys, values);
                Ok(())
            }
            Some(_) => Err(Fail::new(TESSERA_ERR_ARGUMENT, format!("filter {filter} is not a KKT filter"))),
            None => Err(filter_missing(client, filter)),
        }
    })
}

/// Pulls the values of `keys` into `out` (`n_out` = `n_keys` x dim values). `keys` is read
/// before this returns; `out` is written by the time `tessera_wait` returns for `*ticket` and
/// must stay valid, and untouched, until then. With `ticket` NULL the call waits instead.
///
/// # Safety
/// `keys` must hold `n_keys` values and `out` `n_out` writable ones, as above; `ticket`, unless
/// NULL, must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_pull(
    client: TesseraClient,
    table: TesseraTable,
    keys: *const u64,
    n_keys: usize,
    out: *mut f32,
    n_out: usize,
    ticket: *mut TesseraTicket,
) -> i32 {
    on_table(client, table, |h, t| {
        check_out_or_null(ticket, "ticket")?;
        // SAFETY: the caller's contract above.
        let (keys, values) = unsafe { (slice_in(keys, n_keys, "keys")?, slice_out(out, n_out, "out")?) };
        let sent = h.client.pull(t, keys, values)?;
        // SAFETY: the caller's contract above: `out` stays the caller's buffer until the wait.
        unsafe { hand_out(h, sent, Some((out as usize, n_out)), ticket) }
    })
}

/// Pushes `grads` for the dense range of keys from `start` (`n_grads` / dim keys). As
/// `tessera_push` otherwise.
///
/// # Safety
/// `grads` must hold `n_grads` values; `ticket`, unless NULL, must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_push_range(
    client: TesseraClient,
    table: TesseraTable,
    start: u64,
    grads: *const f32,
    n_grads: usize,
    ticket: *mut TesseraTicket,
) -> i32 {
    on_table(client, table, |h, t| {
        check_out_or_null(ticket, "ticket")?;
        // SAFETY: the caller's contract above.
        let grads = unsafe { slice_in(grads, n_grads, "grads") }?;
        let sent = h.client.push_range(t, start, grads)?;
        // SAFETY: the caller's contract above.
        unsafe { hand_out(h, sent, None, ticket) }
    })
}

/// Makes a buffer of `n` zeroed floats for `tessera_push_range_from`. `*buffer` is its handle
/// and `*data` its values: compute gradients straight into them. `*data` stays valid until
/// `tessera_push_buffer_free` or `tessera_close`.
///
/// # Safety
/// `buffer` and `data` must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_push_buffer(client: TesseraClient, n: usize, buffer: *mut TesseraBuffer, data: *mut *mut f32) -> i32 {
    entry(|| {
        let h = handle(client)?;
        check_out(buffer, "buffer")?;
        check_out(data, "data")?;
        let mut made = h.client.push_buffer(n);
        let values = made.as_mut_slice().as_mut_ptr();
        let id = h.next_buffer.fetch_add(1, Ordering::Relaxed);
        lock(&h.buffers).insert(id, made);
        // SAFETY: the caller's contract above. The values stay where they are while the map
        // holds the buffer: it owns a heap block that moving it does not move.
        unsafe { put(buffer, id, "buffer").and_then(|()| put(data, values, "data")) }
    })
}

/// Frees a buffer from `tessera_push_buffer`; its `data` pointer is invalid afterwards.
#[no_mangle]
pub extern "C" fn tessera_push_buffer_free(client: TesseraClient, buffer: TesseraBuffer) -> i32 {
    entry(|| {
        let h = handle(client)?;
        let freed = lock(&h.buffers).remove(&buffer);
        match freed {
            Some(_) => Ok(()),
            None => Err(Fail::new(TESSERA_ERR_CLOSED, format!("buffer {buffer} is not open on client {client} (freed twice?)"))),
        }
    })
}

/// Pushes all of `buffer`'s values for the dense range of keys from `start` (its length / dim
/// keys), as `tessera_push_range` does. The client copies the values (it keeps each push until
/// acknowledged, to send it again after a failover): the buffer may be written again as soon as
/// this returns, before `*ticket` is waited on, but not while it runs.
///
/// # Safety
/// `ticket`, unless NULL, must be writable; no thread writes the buffer's values during the call.
#[no_mangle]
pub unsafe extern "C" fn tessera_push_range_from(
    client: TesseraClient,
    table: TesseraTable,
    start: u64,
    buffer: TesseraBuffer,
    ticket: *mut TesseraTicket,
) -> i32 {
    on_table(client, table, |h, t| {
        check_out_or_null(ticket, "ticket")?;
        let buffers = lock(&h.buffers);
        let grads = buffers.get(&buffer).ok_or_else(|| Fail::new(TESSERA_ERR_CLOSED, format!("buffer {buffer} is not open on client {client}")))?;
        let sent = h.client.push_range_from(t, start, grads)?;
        drop(buffers);
        // SAFETY: the caller's contract above.
        unsafe { hand_out(h, sent, None, ticket) }
    })
}

/// Pulls the dense range of keys from `start` into `out` (`n_out` / dim keys). As
/// `tessera_pull` otherwise.
///
/// # Safety
/// `out` must hold `n_out` writable values until the ticket is waited on; `ticket`, unless
/// NULL, must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_pull_range(
    client: TesseraClient,
    table: TesseraTable,
    start: u64,
    out: *mut f32,
    n_out: usize,
    ticket: *mut TesseraTicket,
) -> i32 {
    on_table(client, table, |h, t| {
        check_out_or_null(ticket, "ticket")?;
        // SAFETY: the caller's contract above.
        let values = unsafe { slice_out(out, n_out, "out") }?;
        let sent = h.client.pull_range(t, start, values)?;
        // SAFETY: the caller's contract above: `out` stays the caller's buffer until the wait.
        unsafe { hand_out(h, sent, Some((out as usize, n_out)), ticket) }
    })
}

/// How long a wait holds its client at a time: between slices it lets other threads' calls
/// through and sees a `tessera_close` from another thread.
const WAIT_SLICE: Duration = Duration::from_millis(10);

/// Waits up to `timeout` for the call `pending` stands for, in slices of [`WAIT_SLICE`], and
/// takes its result. On a timeout the ticket comes back unchanged, for another wait.
///
/// # Safety
/// A pull's `out` must still be its output buffer under the header's contract.
unsafe fn finish(h: &Handle, pending: Pending, timeout: Duration) -> Result<(), (Option<Box<Pending>>, Fail)> {
    let deadline = Instant::now() + timeout;
    loop {
        if h.closed.load(Ordering::Acquire) {
            return Err((None, Fail::new(TESSERA_ERR_CLOSED, "the client was closed while this call waited")));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match h.client.ready(&pending.ticket, left.min(WAIT_SLICE)) {
            Ok(true) => break,
            Ok(false) if left.is_zero() => {
                let message = format!("no answer within {} ms; the call is still in flight", timeout.as_millis());
                return Err((Some(Box::new(pending)), Fail::new(TESSERA_ERR_TIMEOUT, message)));
            }
            Ok(false) => {}
            Err(e) => return Err((None, e.into())),
        }
    }
    let out = match pending.out {
        // SAFETY: the address and length of the pull's output buffer, which the caller keeps
        // valid and untouched until this wait (the header's contract for pulls).
        Some((addr, n)) => Some(unsafe { slice_out(addr as *mut f32, n, "out") }.map_err(|f| (None, f))?),
        None => None,
    };
    h.client.resume(pending.ticket, out).wait().map_err(|e| (None, e.into()))?;
    Ok(())
}

/// Waits up to `timeout` for `ticket`; on a timeout it stays in flight under the same handle.
fn wait_ticket(client: TesseraClient, ticket: TesseraTicket, timeout: Option<Duration>) -> Outcome {
    let h = handle(client)?;
    let pending = lock(&h.tickets)
        .remove(&ticket)
        .ok_or_else(|| Fail::new(TESSERA_ERR_CLOSED, format!("ticket {ticket} is not in flight on client {client} (waited on already?)")))?;
    // SAFETY: `pending` holds the pull's buffer as the call that made it was given it, under
    // the header's contract until this wait.
    match unsafe { finish(&h, pending, timeout.unwrap_or(h.io_timeout)) } {
        Ok(()) => Ok(()),
        Err((kept, fail)) => {
            if let Some(pending) = kept {
                lock(&h.tickets).insert(ticket, *pending);
            }
            Err(fail)
        }
    }
}

/// Waits until every server answered the call `ticket` stands for; a pull's values are then in
/// its buffer. A ticket can be waited on once; after that its handle is unknown. Waits up to
/// the client's I/O timeout (30 s unless set at connect time): then it returns
/// `TESSERA_ERR_TIMEOUT` and the ticket is still in flight. A `tessera_close` of the client
/// from another thread ends the wait with `TESSERA_ERR_CLOSED`.
#[no_mangle]
pub extern "C" fn tessera_wait(client: TesseraClient, ticket: TesseraTicket) -> i32 {
    entry(|| wait_ticket(client, ticket, None))
}

/// As `tessera_wait`, for at most `timeout_ms` milliseconds (0: only if the answer is in
/// already). On `TESSERA_ERR_TIMEOUT` the ticket is still in flight: wait on it again, or poll
/// it.
#[no_mangle]
pub extern "C" fn tessera_wait_timeout(client: TesseraClient, ticket: TesseraTicket, timeout_ms: u64) -> i32 {
    entry(|| wait_ticket(client, ticket, Some(Duration::from_millis(timeout_ms))))
}

/// Sets `*ready` to 1 when `tessera_wait` on `ticket` would return at once (every server
/// answered, or a connection it went over broke), else to 0. Never blocks on the network; the
/// ticket stays in flight either way.
///
/// # Safety
/// `ready` must be writable.
#[no_mangle]
pub unsafe extern "C" fn tessera_poll(client: TesseraClient, ticket: TesseraTicket, ready: *mut i32) -> i32 {
    entry(|| {
        let h = handle(client)?;
        check_out(ready, "ready")?;
        let done = {
            let tickets = lock(&h.tickets);
            let pending = tickets
                .get(&ticket)
                .ok_or_else(|| Fail::new(TESSERA_ERR_CLOSED, format!("ticket {ticket} is not in flight on client {client} (waited on already?)")))?;
            h.client.ready(&pending.ticket, Duration::ZERO)?
        };
        // SAFETY: the caller's contract above.
        unsafe { put(ready, i32::from(done), "ready") }
    })
}

/// The message of the last failed call in this thread ("" after a success). The text stays
/// valid until this thread's next call into the library.
#[no_mangle]
pub extern "C" fn tessera_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// The name of a status code ("TESSERA_ERR_NULL" ...), or "unknown status".
#[no_mangle]
pub extern "C" fn tessera_status_name(code: i32) -> *const c_char {
    let name: &'static CStr = match code {
        TESSERA_OK => c"TESSERA_OK",
        TESSERA_ERR_NULL => c"TESSERA_ERR_NULL",
        TESSERA_ERR_ARGUMENT => c"TESSERA_ERR_ARGUMENT",
        TESSERA_ERR_CLOSED => c"TESSERA_ERR_CLOSED",
        TESSERA_ERR_CONNECT => c"TESSERA_ERR_CONNECT",
        TESSERA_ERR_UNKNOWN_TABLE => c"TESSERA_ERR_UNKNOWN_TABLE",
        TESSERA_ERR_SERVER => c"TESSERA_ERR_SERVER",
        TESSERA_ERR_TRANSPORT => c"TESSERA_ERR_TRANSPORT",
        TESSERA_ERR_PANIC => c"TESSERA_ERR_PANIC",
        TESSERA_ERR_UNKNOWN_OUTCOME => c"TESSERA_ERR_UNKNOWN_OUTCOME",
        TESSERA_ERR_TIMEOUT => c"TESSERA_ERR_TIMEOUT",
        _ => c"unknown status",
    };
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_macros_and_function_agree_with_the_package() {
        let parts = [TESSERA_VERSION_MAJOR, TESSERA_VERSION_MINOR, TESSERA_VERSION_PATCH].map(|p| p.to_string());
        assert_eq!(parts.join("."), env!("CARGO_PKG_VERSION"), "set the TESSERA_VERSION_* constants to the package's version");
        // SAFETY: tessera_version returns a static NUL-terminated string.
        let text = unsafe { CStr::from_ptr(tessera_version()) };
        assert_eq!(text.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }
    use tessera_engine::{Server, ServerConfig, UpdaterRegistry};

    /// Found by the fuzzer (`tests/fuzz`, target `capi`): a pull whose ticket pointer was
    /// misaligned failed, but was sent and left in flight as ticket 1, holding the buffer the
    /// caller then freed; a wait on ticket 1 wrote into it. Every out-pointer is now checked
    /// before the call has any effect.
    #[test]
    fn a_call_refused_for_its_out_pointer_leaves_nothing_behind() {
        let mut cfg = ServerConfig::single("127.0.0.1:0");
        (cfg.engine.shards, cfg.engine.pin_cores) = (1, false);
        let server = Server::start(cfg, UpdaterRegistry::new()).unwrap();
        let addr = CString::new(server.local_addr().to_string()).unwrap();
        let mut slot = [0u64; 2];
        let misaligned = slot.as_mut_ptr().cast::<u8>().wrapping_add(1);
        let open = lock(&CLIENTS).len();
        // SAFETY: a NUL-terminated address; the misaligned handle is refused, never written.
        let rc = unsafe { tessera_connect(addr.as_ptr(), 0, c"tcp".as_ptr(), misaligned.cast()) };
        assert_eq!(rc, TESSERA_ERR_ARGUMENT);
        assert_eq!(lock(&CLIENTS).len(), open, "no client is left open");
        let mut client = 0;
        // SAFETY: a NUL-terminated address and a writable handle.
        assert_eq!(unsafe { tessera_connect(addr.as_ptr(), 0, c"tcp".as_ptr(), &mut client) }, TESSERA_OK);

        let mut table = 0;
        // SAFETY: NUL-terminated strings; the misaligned handle is refused, never written.
        let rc = unsafe { tessera_create_table(client, c"t".as_ptr(), TESSERA_DENSE, 0, 4, 1, std::ptr::null(), misaligned.cast()) };
        assert_eq!(rc, TESSERA_ERR_ARGUMENT);
        // SAFETY: a NUL-terminated name and a writable handle.
        let rc = unsafe { tessera_table(client, c"t".as_ptr(), &mut table, std::ptr::null_mut()) };
        assert_eq!(rc, TESSERA_ERR_UNKNOWN_TABLE, "the refused call created no table");
        // SAFETY: as above.
        let rc = unsafe { tessera_create_table(client, c"t".as_ptr(), TESSERA_DENSE, 0, 4, 1, std::ptr::null(), &mut table) };
        assert_eq!(rc, TESSERA_OK);

        let ones = [1f32; 4];
        let mut out = [7f32; 4];
        // SAFETY: four values each way; the misaligned tickets are refused before anything is sent.
        unsafe {
            assert_eq!(tessera_push_range(client, table, 0, ones.as_ptr(), 4, misaligned.cast()), TESSERA_ERR_ARGUMENT);
            assert_eq!(tessera_pull_range(client, table, 0, out.as_mut_ptr(), 4, misaligned.cast()), TESSERA_ERR_ARGUMENT);
            assert_eq!(tessera_push(client, table, [0u64].as_ptr(), 1, ones.as_ptr(), 1, misaligned.cast()), TESSERA_ERR_ARGUMENT);
            assert_eq!(tessera_pull(client, table, [0u64].as_ptr(), 1, out.as_mut_ptr(), 1, misaligned.cast()), TESSERA_ERR_ARGUMENT);
        }
        assert_eq!(tessera_wait(client, 1), TESSERA_ERR_CLOSED, "no ticket was left in flight");
        assert_eq!(out, [7.0; 4], "nothing was written to the refused pulls' buffer");
        // SAFETY: four writable values; the call waits.
        assert_eq!(unsafe { tessera_pull_range(client, table, 0, out.as_mut_ptr(), 4, std::ptr::null_mut()) }, TESSERA_OK);
        assert_eq!(out, [0.0; 4], "the refused pushes were not applied");
        assert_eq!(tessera_close(client), TESSERA_OK);
    }
}
