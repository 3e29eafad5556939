//! The C ABI (`tessera-capi`), called as a careless C program would: handles that were closed,
//! never opened or made up; table names that are not UTF-8; NULL, misaligned and oversized
//! arrays; counts that do not match; tickets waited on twice or guessed; calls in any order.
//!
//! The calls go to a real server, started in this process once (two shards, TCP on
//! loopback), through one client kept for the whole run and any the input opens (closed at the
//! end of each input). Table names come from a small pool, so the server holds a bounded
//! number of tables however long the fuzzer runs.
//!
//! The harness keeps the header's side of the contract, and only that: every array it passes
//! holds the count it passes, except where the library promises to check first (a NULL
//! pointer, a misaligned one, a count whose byte size overflows). Like a C caller, it frees a
//! pull's output buffer as soon as the library may no longer write it: when the call failed,
//! when it waited, when its ticket was waited on, or when its client was closed. Under
//! AddressSanitizer a write after that is a crash.
//!
//! What every call must do: return a known status (never `TESSERA_ERR_PANIC`), with a message
//! exactly when it failed.

use std::ffi::{c_char, CStr, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};

use tessera::*;
use tessera_engine::{Server, ServerConfig, UpdaterRegistry};

use crate::{Input, Output, Seed};

/// Operations per input at most: a long program costs time, not coverage.
const OPS_MAX: usize = 48;
/// Keys per call at most, and the largest dim a table is created with (bar refused ones).
const KEYS_MAX: usize = 32;
const DIM_MAX: u32 = 16;

/// The server and the client kept for the whole run.
struct Shared {
    addr: String,
    base: TesseraClient,
}

static SERVER: Mutex<Option<Server>> = Mutex::new(None);
static SHARED: LazyLock<Shared> = LazyLock::new(|| {
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    cfg.engine.shards = 2;
    cfg.engine.pin_cores = false;
    cfg.engine.sparse_capacity_keys_default = 2048;
    let server = Server::start(cfg, UpdaterRegistry::new()).expect("an in-process server");
    let addr = server.local_addr().to_string();
    *SERVER.lock().unwrap() = Some(server);
    let text = CString::new(addr.clone()).unwrap();
    let mut base = 0;
    // SAFETY: NUL-terminated strings and a writable handle.
    let rc = unsafe { tessera_connect(text.as_ptr(), 0, c"tcp".as_ptr(), &mut base) };
    assert_eq!(rc, TESSERA_OK, "{}", last_error());
    Shared { addr, base }
});

fn last_error() -> String {
    // SAFETY: the library returns a NUL-terminated string valid until this thread's next call.
    unsafe { CStr::from_ptr(tessera_last_error()) }.to_string_lossy().into_owned()
}

/// Set `TESSERA_FUZZ_TRACE=1` to see each call and its status (to check what a seed does).
static TRACE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("TESSERA_FUZZ_TRACE").is_some());

/// Calls that succeeded, in this process.
static SUCCEEDED: AtomicUsize = AtomicUsize::new(0);

/// Checks what every call promises about its status and message.
fn check(what: &str, rc: i32) -> i32 {
    if *TRACE {
        eprintln!("{what} -> {rc} {}", last_error());
    }
    SUCCEEDED.fetch_add(usize::from(rc == TESSERA_OK), Ordering::Relaxed);
    assert!(rc >= TESSERA_OK && rc != TESSERA_ERR_PANIC, "{what}: status {rc}: {}", last_error());
    let message = last_error();
    assert_eq!(rc == TESSERA_OK, message.is_empty(), "{what}: status {rc} with message {message:?}");
    // SAFETY: tessera_status_name returns a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr(tessera_status_name(rc)) };
    assert_ne!(name.to_bytes(), b"unknown status");
    rc
}

/// Where a call writes a handle, a dim or a ticket: NULL, somewhere misaligned, or a slot.
struct Slot {
    words: [u64; 2],
    mode: u8,
}

impl Slot {
    fn new(input: &mut Input<'_>) -> Self {
        // Mostly a good slot, so that calls get far.
        Self { words: [0; 2], mode: input.u8() % 8 }
    }

    fn ptr<T>(&mut self) -> *mut T {
        match self.mode {
            0 => std::ptr::null_mut(),
            1 => self.words.as_mut_ptr().cast::<u8>().wrapping_add(1).cast(),
            _ => self.words.as_mut_ptr().cast(),
        }
    }

    /// What the call wrote, if the slot was a good one.
    fn get<T: Copy>(&self) -> Option<T> {
        // SAFETY: the slot is 16 aligned bytes, enough for any T used here (u32, u64).
        (self.mode >= 2).then(|| unsafe { self.words.as_ptr().cast::<T>().read() })
    }
}

/// An array the caller passes in, and the pointer and count it passes for it.
struct Array<T> {
    data: Vec<T>,
    ptr: *const T,
    n: usize,
}

impl<T: Copy> Array<T> {
    /// `wanted` is the count that matches the call, if the harness knows it.
    fn new(input: &mut Input<'_>, wanted: Option<usize>, mut value: impl FnMut(&mut Input<'_>) -> T) -> Self {
        let mode = input.u8();
        let n = match (mode >> 3) % 4 {
            0 | 1 => wanted.unwrap_or(usize::from(mode >> 5)),
            2 => usize::from(input.u8()) % (KEYS_MAX * DIM_MAX as usize + 1),
            _ => usize::from(input.u8() % 8),
        };
        let data: Vec<T> = (0..n).map(|_| value(input)).collect();
        let size = std::mem::size_of::<T>();
        let (ptr, n) = match mode % 8 {
            // A NULL array, of any count.
            0 => (std::ptr::null(), [0, n, 1][usize::from(mode >> 6) % 3]),
            // One element short of the buffer: the count is honest, the shape may not match.
            1 => (data.as_ptr(), n.saturating_sub(1)),
            // Misaligned by a byte, with a count that stays inside the buffer.
            2 => (data.as_ptr().cast::<u8>().wrapping_add(1).cast(), n.saturating_sub(1)),
            // A count whose byte size does not fit an isize: refused before anything is read.
            3 => (data.as_ptr(), [isize::MAX as usize / size + 1, usize::MAX, usize::MAX / size + 1][usize::from(mode >> 6) % 3]),
            _ => (data.as_ptr(), n),
        };
        Self { data, ptr, n }
    }
}

fn key(input: &mut Input<'_>) -> u64 {
    match input.u8() % 8 {
        0 => input.u64(),
        1 => u64::MAX - u64::from(input.u8()),
        _ => u64::from(input.u8()),
    }
}

fn value(input: &mut Input<'_>) -> f32 {
    match input.u8() % 16 {
        0 => f32::from_bits(input.u32()),
        1 => f32::NAN,
        b => f32::from(b) * 0.25 - 1.0,
    }
}

/// Text for a call: NULL, one of `pool`, bytes that are not UTF-8, or (when `free` allows, for
/// calls that only look things up) any bytes the input gives.
fn text(input: &mut Input<'_>, pool: &[&str], free: bool) -> Option<CString> {
    let choice = input.u8();
    let bytes: Vec<u8> = match choice % 4 {
        0 => return None,
        1 if !free => pool[usize::from(choice >> 2) % pool.len()].as_bytes().to_vec(),
        1 => input.bytes(usize::from(choice >> 2)).to_vec(),
        2 => {
            let mut b = input.bytes(usize::from(choice >> 4)).to_vec();
            b.insert(usize::from(choice >> 2) % (b.len() + 1), 0xff);
            b
        }
        _ => pool[usize::from(choice >> 2) % pool.len()].as_bytes().to_vec(),
    };
    Some(CString::new(bytes.into_iter().filter(|b| *b != 0).collect::<Vec<u8>>()).expect("NULs removed"))
}

fn ptr(text: &Option<CString>) -> *const c_char {
    text.as_ref().map_or(std::ptr::null(), |t| t.as_ptr())
}

const NAMES: [&str; 7] = [
    "w",
    "emb",
    "sp",
    "x",
    "",
    "tab\tle",
    "a-name-far-too-long-for-any-table-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];
const UPDATERS: [&str; 8] = ["sum", "assign", "sgd{lr=0.1}", "adagrad{lr=0.05}", "adam{lr=0.01}", "ftrl{alpha=0.1}", "sgd{lr=", "nope"];
const TRANSPORTS: [&str; 5] = ["tcp", "auto", "rdma", "TCP", ""];

/// A pull's output buffer the library may still write, and whose ticket it is.
struct Out {
    client: TesseraClient,
    ticket: TesseraTicket,
    _values: Vec<f32>,
}

/// One input's run: the handles it has seen, and the buffers it must keep alive.
struct Run {
    base: TesseraClient,
    addr: String,
    clients: Vec<TesseraClient>,
    opened: Vec<TesseraClient>,
    /// (client, table handle, dim) as lookups returned them.
    tables: Vec<(TesseraClient, TesseraTable, u32)>,
    tickets: Vec<(TesseraClient, TesseraTicket)>,
    outs: Vec<Out>,
}

/// Runs one input; returns how many calls succeeded.
pub fn run(data: &[u8]) -> usize {
    let shared = &*SHARED;
    let mut run = Run {
        base: shared.base,
        addr: shared.addr.clone(),
        clients: vec![shared.base],
        opened: Vec::new(),
        tables: Vec::new(),
        tickets: Vec::new(),
        outs: Vec::new(),
    };
    let before = SUCCEEDED.load(Ordering::Relaxed);
    let mut input = Input::new(data);
    for _ in 0..OPS_MAX {
        if input.is_empty() {
            break;
        }
        run.op(&mut input);
    }
    run.finish();
    SUCCEEDED.load(Ordering::Relaxed) - before
}

impl Run {
    fn client(&self, input: &mut Input<'_>) -> TesseraClient {
        let b = input.u8();
        match b % 4 {
            0 | 1 => self.clients[usize::from(b >> 2) % self.clients.len()],
            2 => u64::from(b >> 2),
            _ => input.u64(),
        }
    }

    /// A table handle and the dim the harness knows for it (on the client it picks).
    fn table(&self, input: &mut Input<'_>) -> (TesseraClient, TesseraTable, Option<u32>) {
        let b = input.u8();
        match (b % 4, self.tables.is_empty()) {
            (0 | 1, false) => {
                let (c, t, d) = self.tables[usize::from(b >> 2) % self.tables.len()];
                (c, t, Some(d))
            }
            (2, _) => (self.client(input), u32::from(b >> 2), None),
            _ => (self.client(input), input.u32(), None),
        }
    }

    fn op(&mut self, input: &mut Input<'_>) {
        match input.u8() % 13 {
            0 => self.connect(input),
            1 => self.close(input),
            2 => self.lookup(input),
            3 => self.create(input),
            4 => {
                let client = self.client(input);
                let clock = match input.u8() % 4 {
                    0 => 0,
                    1 => 1,
                    2 => u64::from(input.u8()),
                    _ => input.u64(),
                };
                check("tessera_set_clock", tessera_set_clock(client, clock));
            }
            5 => self.push(input),
            6 => self.pull(input),
            7 => self.push_range(input),
            8 => self.pull_range(input),
            9 => self.wait(input),
            11 => self.wait_briefly(input),
            12 => self.poll(input),
            _ => {
                // SAFETY: tessera_status_name returns a static NUL-terminated string for any code.
                let name = unsafe { CStr::from_ptr(tessera_status_name(input.u32() as i32)) };
                assert!(name.to_str().is_ok());
            }
        }
    }

    fn connect(&mut self, input: &mut Input<'_>) {
        let pair = format!("{0}, {0}", self.addr);
        let refused = format!("{},127.0.0.1:1", self.addr);
        // Addresses that answer at once: this server, twice, a closed port, none at all.
        let pool = [self.addr.as_str(), pair.as_str(), "127.0.0.1:1", refused.as_str(), ",", " , ,"];
        let servers = text(input, &pool, false);
        let worker = match input.u8() % 5 {
            0 => 0,
            1 => 1,
            2 => 15,
            3 => 16,
            _ => input.u32(),
        };
        let transport = text(input, &TRANSPORTS, false);
        let mut slot = Slot::new(input);
        // SAFETY: the strings are NUL-terminated or NULL, the slot is writable, NULL or
        // misaligned (which the library checks).
        let rc = unsafe { tessera_connect(ptr(&servers), worker, ptr(&transport), slot.ptr()) };
        if check("tessera_connect", rc) == TESSERA_OK {
            let client = slot.get::<TesseraClient>().expect("a good slot");
            assert!(client != 0 && !self.clients.contains(&client), "a fresh client handle");
            self.clients.push(client);
            self.opened.push(client);
        }
    }

    fn close(&mut self, input: &mut Input<'_>) {
        let client = self.client(input);
        if client == self.base {
            return; // kept for the whole run
        }
        let rc = check("tessera_close", tessera_close(client));
        assert!(rc == TESSERA_OK || rc == TESSERA_ERR_CLOSED);
        // Its pulls' buffers are the caller's again.
        self.outs.retain(|o| o.client != client);
    }

    fn lookup(&mut self, input: &mut Input<'_>) {
        let client = self.client(input);
        let name = text(input, &NAMES, true);
        let (mut table, mut dim) = (Slot::new(input), Slot::new(input));
        let dim_ptr = if dim.mode == 0 { std::ptr::null_mut() } else { dim.ptr() };
        // SAFETY: a NUL-terminated name or NULL; slots writable, NULL or misaligned.
        let rc = unsafe { tessera_table(client, ptr(&name), table.ptr(), dim_ptr) };
        if check("tessera_table", rc) == TESSERA_OK {
            let t = table.get::<TesseraTable>().expect("a good slot");
            let d = dim.get::<u32>().unwrap_or(0);
            self.tables.push((client, t, d));
        }
    }

    fn create(&mut self, input: &mut Input<'_>) {
        let client = self.client(input);
        let name = text(input, &NAMES, false);
        let shape = input.u8();
        let kind = match shape % 4 {
            0 | 2 => TESSERA_DENSE,
            1 => TESSERA_SPARSE,
            _ => input.u32(),
        };
        let start = match (shape >> 2) % 4 {
            0 => 0,
            1 => u64::from(input.u8()),
            2 => u64::MAX - 1,
            _ => input.u64(),
        };
        let dim = match (shape >> 4) % 4 {
            0 => 1 + u32::from(input.u8()) % DIM_MAX,
            1 => 0,
            2 => (1 << 20) | 1,
            _ => u32::MAX,
        };
        // Dense tables stay small: what a table holds is mapped by the server.
        let keys = if dim > DIM_MAX { 1 } else { 1 + u64::from(input.u16()) % 1024 };
        let end = if shape >> 6 == 3 {
            start
        } else if kind == TESSERA_SPARSE && shape >> 6 == 2 {
            u64::MAX
        } else {
            start.saturating_add(keys)
        };
        let updater = text(input, &UPDATERS, false);
        let mut table = Slot::new(input);
        // SAFETY: NUL-terminated strings or NULL; the slot is writable, NULL or misaligned.
        let rc = unsafe { tessera_create_table(client, ptr(&name), kind, start, end, dim, ptr(&updater), table.ptr()) };
        if check("tessera_create_table", rc) == TESSERA_OK {
            self.tables.push((client, table.get::<TesseraTable>().expect("a good slot"), dim));
        }
    }

    /// Keeps a call's ticket (and its pull's buffer), or gives the buffer back.
    fn handed_out(&mut self, client: TesseraClient, rc: i32, ticket: &Slot, values: Option<Vec<f32>>) {
        let Some(t) = ticket.get::<TesseraTicket>().filter(|_| rc == TESSERA_OK) else { return };
        assert!(t != 0, "0 is never a ticket");
        self.tickets.push((client, t));
        if let Some(values) = values {
            self.outs.push(Out { client, ticket: t, _values: values });
        }
    }

    fn ticket_slot(input: &mut Input<'_>) -> Slot {
        let mut slot = Slot::new(input);
        // NULL half the time: the call waits before it returns.
        if slot.mode >= 2 && input.u8().is_multiple_of(2) {
            slot.mode = 0;
        }
        slot
    }

    fn push(&mut self, input: &mut Input<'_>) {
        let (client, table, dim) = self.table(input);
        let keys = Array::new(input, None, key);
        let grads = Array::new(input, dim.map(|d| keys.n.min(KEYS_MAX) * d as usize), value);
        let mut ticket = Self::ticket_slot(input);
        // SAFETY: each array holds its count, or the library refuses it unread (NULL,
        // misaligned, oversized); the ticket slot is writable, NULL or misaligned.
        let rc = unsafe { tessera_push(client, table, keys.ptr, keys.n, grads.ptr, grads.n, ticket.ptr()) };
        check("tessera_push", rc);
        self.handed_out(client, rc, &ticket, None);
    }

    fn pull(&mut self, input: &mut Input<'_>) {
        let (client, table, dim) = self.table(input);
        let keys = Array::new(input, None, key);
        let mut out = Array::new(input, dim.map(|d| keys.n.min(KEYS_MAX) * d as usize), |_| f32::NAN);
        let mut ticket = Self::ticket_slot(input);
        let out_ptr = out.ptr.cast_mut();
        // SAFETY: as for a push; `out` stays allocated, and untouched, until the library may
        // no longer write it (see `handed_out`).
        let rc = unsafe { tessera_pull(client, table, keys.ptr, keys.n, out_ptr, out.n, ticket.ptr()) };
        check("tessera_pull", rc);
        self.handed_out(client, rc, &ticket, Some(std::mem::take(&mut out.data)));
    }

    fn push_range(&mut self, input: &mut Input<'_>) {
        let (client, table, dim) = self.table(input);
        let start = key(input);
        let wanted = dim.map(|d| usize::from(input.u8() % 8) * d as usize);
        let grads = Array::new(input, wanted, value);
        let mut ticket = Self::ticket_slot(input);
        // SAFETY: as for a push.
        let rc = unsafe { tessera_push_range(client, table, start, grads.ptr, grads.n, ticket.ptr()) };
        check("tessera_push_range", rc);
        self.handed_out(client, rc, &ticket, None);
    }

    fn pull_range(&mut self, input: &mut Input<'_>) {
        let (client, table, dim) = self.table(input);
        let start = key(input);
        let wanted = dim.map(|d| usize::from(input.u8() % 8) * d as usize);
        let mut out = Array::new(input, wanted, |_| f32::NAN);
        let mut ticket = Self::ticket_slot(input);
        let out_ptr = out.ptr.cast_mut();
        // SAFETY: as for a pull.
        let rc = unsafe { tessera_pull_range(client, table, start, out_ptr, out.n, ticket.ptr()) };
        check("tessera_pull_range", rc);
        self.handed_out(client, rc, &ticket, Some(std::mem::take(&mut out.data)));
    }

    /// A ticket handed out, or a guess: tickets are numbered from 1 on each client.
    fn ticket(&self, input: &mut Input<'_>) -> (TesseraClient, TesseraTicket) {
        let b = input.u8();
        match (b % 4, self.tickets.is_empty()) {
            (0 | 1, false) => self.tickets[usize::from(b >> 2) % self.tickets.len()],
            (2, _) => (self.client(input), u64::from(b >> 2)),
            _ => (self.client(input), input.u64()),
        }
    }

    fn wait(&mut self, input: &mut Input<'_>) {
        let (client, ticket) = self.ticket(input);
        let rc = check("tessera_wait", tessera_wait(client, ticket));
        self.waited(client, ticket, rc);
    }

    /// A wait of at most 2 ms: a ticket that times out stays in flight, its buffer lent.
    fn wait_briefly(&mut self, input: &mut Input<'_>) {
        let (client, ticket) = self.ticket(input);
        let timeout_ms = u64::from(input.u8() % 3);
        let rc = check("tessera_wait_timeout", tessera_wait_timeout(client, ticket, timeout_ms));
        if rc == TESSERA_ERR_TIMEOUT {
            assert!(self.tickets.contains(&(client, ticket)), "ticket {ticket} of client {client} timed out, never handed out");
            return;
        }
        self.waited(client, ticket, rc);
    }

    /// A poll never ends a ticket.
    fn poll(&mut self, input: &mut Input<'_>) {
        let (client, ticket) = self.ticket(input);
        let mut slot = Slot::new(input);
        // SAFETY: the slot is writable, NULL or misaligned (which the library checks).
        let rc = check("tessera_poll", unsafe { tessera_poll(client, ticket, slot.ptr()) });
        if rc == TESSERA_OK {
            assert!(self.tickets.contains(&(client, ticket)), "polled ticket {ticket} of client {client}, never handed out");
            assert!(matches!(slot.get::<i32>(), Some(0 | 1)), "ready is 0 or 1");
        }
    }

    /// Bookkeeping after a wait that returned `rc`.
    fn waited(&mut self, client: TesseraClient, ticket: TesseraTicket, rc: i32) {
        if rc == TESSERA_OK {
            assert!(self.tickets.contains(&(client, ticket)), "waited on ticket {ticket} of client {client}, never handed out");
        }
        // Waited on (or never in flight): its buffer is the caller's again.
        self.tickets.retain(|t| *t != (client, ticket));
        self.outs.retain(|o| (o.client, o.ticket) != (client, ticket));
    }

    /// Waits for the kept client's tickets, closes every client the input opened; only then
    /// are the pulls' buffers freed.
    fn finish(mut self) {
        for (client, ticket) in std::mem::take(&mut self.tickets) {
            if client == self.base {
                let rc = check("tessera_wait", tessera_wait(client, ticket));
                assert!(rc != TESSERA_ERR_CLOSED, "ticket {ticket} of the kept client was lost");
            }
        }
        for client in self.opened {
            check("tessera_close", tessera_close(client));
        }
        self.outs.clear();
    }
}

/// Programs: connect, create and look up tables, push and pull with and without tickets,
/// wait twice, use a closed client, pass NULL, misaligned and oversized arrays.
pub fn seeds() -> Vec<Seed> {
    // Op codes, as `Run::op` reads them.
    const CONNECT: u8 = 0;
    const CLOSE: u8 = 1;
    const LOOKUP: u8 = 2;
    const CREATE: u8 = 3;
    const PUSH: u8 = 5;
    const PULL: u8 = 6;
    const PUSH_RANGE: u8 = 7;
    const PULL_RANGE: u8 = 8;
    const WAIT: u8 = 9;
    // The k-th entry of a pool of texts, or of the handles seen so far.
    let pool = |k: u8| (k << 2) | 3;
    let seen = |k: u8| k << 2;
    // A good slot; a ticket slot then says whether to wait now (even) or keep the ticket.
    const GOOD: u8 = 2;
    const MISALIGNED: u8 = 1;
    const NOW: u8 = 0;
    const KEEP: u8 = 1;
    // Arrays: honest with the count the table wants (or two keys), NULL with a count of two,
    // misaligned, oversized.
    const KEYS: u8 = 2 << 5 | 4;
    const HONEST: u8 = 4;
    const NULL_TWO: u8 = 1 << 6;
    const MISALIGN: u8 = 2;
    const OVERSIZED: u8 = 3;
    let keys_3_5 = [2, 3, 2, 5];
    let grads = [6, 8, 10, 12, 14, 4, 5, 7];

    let mut create = Output::default();
    // "w": dense, keys [0, 64), dim 4, sgd; then "sp": sparse over every key, dim 2, sum.
    create.u8(CREATE).u8(seen(0)).u8(pool(0)).u8(0).u8(3).u16(63).u8(pool(2)).u8(GOOD);
    create.u8(CREATE).u8(seen(0)).u8(pool(2)).u8(1 | 2 << 6).u8(1).u16(0).u8(pool(0)).u8(GOOD);
    // Look "w" up again, with its dim.
    create.u8(LOOKUP).u8(seen(0)).u8(pool(0)).u8(GOOD).u8(GOOD);

    let mut data = create.clone();
    // Push keys 3 and 5 to "w", waiting; pull them with a ticket, wait, and wait again by guess.
    data.u8(PUSH).u8(seen(0)).u8(KEYS).bytes(&keys_3_5).u8(HONEST).bytes(&grads).u8(GOOD).u8(NOW);
    data.u8(PULL).u8(seen(0)).u8(KEYS).bytes(&keys_3_5).u8(HONEST).u8(GOOD).u8(KEEP);
    data.u8(WAIT).u8(seen(0)).u8(WAIT).u8(2 | 1 << 2).u8(seen(0));
    // A dense range of two keys from 0, pushed and pulled with tickets, waited on.
    data.u8(PUSH_RANGE).u8(seen(0)).bytes(&[2, 0]).u8(2).u8(HONEST).bytes(&grads).u8(GOOD).u8(KEEP);
    data.u8(PULL_RANGE).u8(seen(0)).bytes(&[2, 0]).u8(2).u8(HONEST).u8(GOOD).u8(KEEP);
    data.u8(WAIT).u8(seen(0)).u8(WAIT).u8(seen(0));
    // The sparse table: keys anywhere.
    data.u8(PUSH).u8(seen(1)).u8(KEYS).bytes(&[0]).u64(u64::MAX - 5).bytes(&[1, 7]).u8(HONEST).bytes(&grads[..4]).u8(GOOD).u8(NOW);

    let mut lifecycle = create.clone();
    // Connect a second client (tcp, worker 1), look "w" up on it, pull with a ticket, close
    // the client with the pull in flight, wait on it, push through the closed handle, close
    // it again.
    lifecycle.u8(CONNECT).u8(pool(0)).u8(1).u8(pool(0)).u8(GOOD);
    lifecycle.u8(LOOKUP).u8(seen(1)).u8(pool(0)).u8(GOOD).u8(GOOD);
    lifecycle.u8(PULL).u8(seen(3)).u8(KEYS).bytes(&keys_3_5).u8(HONEST).u8(GOOD).u8(KEEP);
    lifecycle.u8(CLOSE).u8(seen(1)).u8(WAIT).u8(seen(0));
    lifecycle.u8(PUSH).u8(seen(3)).u8(KEYS).bytes(&keys_3_5).u8(HONEST).bytes(&grads).u8(GOOD).u8(NOW);
    lifecycle.u8(CLOSE).u8(seen(1));

    let mut bad = create.clone();
    // NULL keys with a count, misaligned grads, an oversized output, a name that is not UTF-8,
    // NULL servers, RDMA where there is none, a dim of 0.
    bad.u8(PUSH).u8(seen(0)).u8(NULL_TWO).bytes(&keys_3_5).u8(HONEST).bytes(&grads).u8(GOOD).u8(NOW);
    bad.u8(PUSH).u8(seen(0)).u8(KEYS).bytes(&keys_3_5).u8(MISALIGN).bytes(&grads).u8(GOOD).u8(NOW);
    bad.u8(PULL).u8(seen(0)).u8(KEYS).bytes(&keys_3_5).u8(OVERSIZED).u8(GOOD).u8(KEEP);
    bad.u8(LOOKUP).u8(seen(0)).u8(2 | 3 << 4).bytes(b"emb").u8(GOOD).u8(GOOD);
    bad.u8(CONNECT).u8(0).u8(0).u8(pool(0)).u8(GOOD);
    bad.u8(CONNECT).u8(pool(0)).u8(0).u8(pool(2)).u8(GOOD);
    bad.u8(CREATE).u8(seen(0)).u8(pool(3)).u8(1 << 4).u16(5).u8(pool(0)).u8(GOOD);

    let mut ticket = create.clone();
    // A pull whose ticket slot is misaligned on a fresh client: the call fails, so the caller
    // frees its buffer; then a wait on the ticket number the library would have used.
    ticket.u8(CONNECT).u8(pool(0)).u8(1).u8(pool(0)).u8(GOOD);
    ticket.u8(LOOKUP).u8(seen(1)).u8(pool(0)).u8(GOOD).u8(GOOD);
    ticket.u8(PULL).u8(seen(3)).u8(KEYS).bytes(&keys_3_5).u8(HONEST).u8(MISALIGNED);
    ticket.u8(WAIT).u8(2 | 1 << 2).u8(seen(1));
    vec![("create", create.0), ("push-pull", data.0), ("lifecycle", lifecycle.0), ("bad-arguments", bad.0), ("misaligned-ticket", ticket.0)]
}
