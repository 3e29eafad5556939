//! Broken and hostile input against a real `tessera server` process.
//!
//! Every case follows one pattern: a well-behaved client pushes known values and waits for them
//! (they are acknowledged); then something hostile happens; then the same client, on the
//! connections it already had, must still work and must pull back exactly the acknowledged sums,
//! bit for bit (the tables use the `sum` updater and gradients that add exactly in f32).
//! Hostile frames are built by hand ([`RawConn`]) because the client library refuses to send them;
//! where it does refuse, that local refusal is tested too.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_client::{Client, ClientConfig, ClientError, Table};
use tessera_layout::catalog::TableEntry;
use tessera_tests::raw::{self, RawConn};
use tessera_tests::{ScratchDir, ServerProc};
use tessera_transport::tcp::TcpLink;
use tessera_transport::wire::{flags, Header, Op, Status, CONTROL_SHARD, REPLY_BIT};
use tessera_transport::{TransportConfig, TransportError};

const DIM: usize = 4;
const DENSE_KEYS: u64 = 1000;
const SMALL_KEYS: u64 = 100;
/// Sparse keys pushed every round, spread over both shards' halves of the key space.
const SPARSE_KEYS: [u64; 5] = [3, 77, 1 << 40, (1 << 63) + 5, u64::MAX - 1];
/// Sparse keys never pushed: they must read as their initial value, zero.
const SPARSE_UNTOUCHED: [u64; 2] = [10, 1 << 50];
/// Worker id of the raw connections (below the server's 64-worker limit).
const RAW_WORKER: u32 = 7;

const TABLES_TOML: &str = r#"
[[table]]
name = "dense"
kind = "dense"
start = 0
end = 1000
dim = 4

[[table]]
name = "sparse"
kind = "sparse"
dim = 4
capacity = 10000

[[table]]
name = "skip"
kind = "dense"
start = 0
end = 100
dim = 4
non_finite = "skip"

[[table]]
name = "reject"
kind = "dense"
start = 0
end = 100
dim = 4
"#;

/// A 64-wide table, for frames over a 64 KiB limit.
const WIDE_TOML: &str = r#"
[[table]]
name = "wide"
kind = "dense"
start = 0
end = 1000
dim = 64
"#;

/// What every table must hold: the sum of every acknowledged push.
#[derive(Debug, Clone)]
struct Model {
    dense: Vec<f32>,
    sparse: BTreeMap<u64, Vec<f32>>,
    skip: Vec<f32>,
    reject: Vec<f32>,
}

/// A server with the four tables, a well-behaved client, and the values it acknowledged.
struct Fixture {
    server: ServerProc,
    _dir: ScratchDir,
    client: Client,
    dense: Table,
    sparse: Table,
    skip: Table,
    reject: Table,
    entries: Vec<TableEntry>,
    model: Model,
    rounds: u32,
}

/// The gradient of component `i` in round `round`: quarters, which f32 adds exactly.
fn gradient(round: u32, i: usize) -> f32 {
    ((i % 13) as f32 - 6.0) * 0.25 + round as f32
}

fn add(values: &mut [f32], grads: &[f32]) {
    assert_eq!(values.len(), grads.len());
    for (v, g) in values.iter_mut().zip(grads) {
        *v += g;
    }
}

/// Panics, naming the first differing component, unless `got` and `want` are equal bit for bit.
#[track_caller]
fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, expected {}", got.len(), want.len());
    if let Some(i) = (0..got.len()).find(|i| got[*i].to_bits() != want[*i].to_bits()) {
        panic!("{what}: component {i} (key {}, c {}) is {}, expected {}", i / DIM, i % DIM, got[i], want[i]);
    }
}

impl Fixture {
    fn start() -> Fixture {
        Fixture::start_with(&[], "")
    }

    fn start_with(extra_args: &[&str], extra_tables: &str) -> Fixture {
        let dir = ScratchDir::new("bad-input");
        let tables = dir.write("tables.toml", &format!("{TABLES_TOML}{extra_tables}"));
        let tables = tables.to_str().expect("a UTF-8 temp path");
        let mut args = vec!["--tables", tables, "--shards", "2"];
        args.extend_from_slice(extra_args);
        let server = ServerProc::start(&args);
        let client = Client::connect(&[server.addr()], ClientConfig::worker(0)).expect("the good client connects");
        let table = |name: &str| client.table(name).unwrap_or_else(|e| panic!("table {name}: {e}"));
        let (dense, sparse, skip, reject) = (table("dense"), table("sparse"), table("skip"), table("reject"));
        let entries = client.catalogs().expect("catalog").remove(0);
        let model = Model {
            dense: vec![0.0; DENSE_KEYS as usize * DIM],
            sparse: SPARSE_KEYS.iter().chain(&SPARSE_UNTOUCHED).map(|k| (*k, vec![0.0; DIM])).collect(),
            skip: vec![0.0; SMALL_KEYS as usize * DIM],
            reject: vec![0.0; SMALL_KEYS as usize * DIM],
        };
        Fixture { server, _dir: dir, client, dense, sparse, skip, reject, entries, model, rounds: 0 }
    }

    fn addr(&self) -> &str {
        self.server.addr()
    }

    fn entry(&self, name: &str) -> &TableEntry {
        self.entries.iter().find(|e| e.spec.name == name).unwrap_or_else(|| panic!("no table {name} in the catalog"))
    }

    /// The table's id on the server, as raw frames name it.
    fn id(&self, name: &str) -> u32 {
        self.entry(name).id
    }

    /// The shard that owns `key` of table `name`.
    fn shard_of(&self, name: &str, key: u64) -> u64 {
        let part = self.entry(name).parts.iter().find(|p| p.start <= key && key < p.end);
        u64::from(part.unwrap_or_else(|| panic!("no part of {name} owns {key}")).shard)
    }

    /// A raw connection, greeted, to shard `shard`.
    fn raw(&self, shard: u64) -> RawConn {
        RawConn::hello(self.addr(), shard, RAW_WORKER).0
    }

    /// Pushes one round of known gradients to every table, pipelined, and waits for all of them.
    fn push_round(&mut self) {
        self.rounds += 1;
        let round = self.rounds;
        let grads = |n: usize| (0..n).map(|i| gradient(round, i)).collect::<Vec<f32>>();
        let dense = grads(self.model.dense.len());
        let sparse = grads(SPARSE_KEYS.len() * DIM);
        let small = grads(self.model.skip.len());
        let c = &self.client;
        let tickets = [
            c.push_range(&self.dense, 0, &dense).expect("push dense"),
            c.push(&self.sparse, &SPARSE_KEYS, &sparse).expect("push sparse"),
            c.push_range(&self.skip, 0, &small).expect("push skip"),
            c.push_range(&self.reject, 0, &small).expect("push reject"),
        ];
        for (ticket, name) in tickets.into_iter().zip(["dense", "sparse", "skip", "reject"]) {
            ticket.wait().unwrap_or_else(|e| panic!("round {round}: push to {name} failed: {e}"));
        }
        add(&mut self.model.dense, &dense);
        for (key, g) in SPARSE_KEYS.iter().zip(sparse.chunks_exact(DIM)) {
            add(self.model.sparse.get_mut(key).expect("modelled key"), g);
        }
        add(&mut self.model.skip, &small);
        add(&mut self.model.reject, &small);
    }

    /// Pulls every table through the good client and compares with the model, bit for bit.
    #[track_caller]
    fn verify(&self) {
        let c = &self.client;
        let mut dense = vec![f32::NAN; self.model.dense.len()];
        c.pull_range(&self.dense, 0, &mut dense).expect("pull dense").wait().expect("pull dense");
        assert_bits_eq("dense", &dense, &self.model.dense);
        let keys: Vec<u64> = self.model.sparse.keys().copied().collect();
        let mut sparse = vec![f32::NAN; keys.len() * DIM];
        c.pull(&self.sparse, &keys, &mut sparse).expect("pull sparse").wait().expect("pull sparse");
        let want: Vec<f32> = self.model.sparse.values().flatten().copied().collect();
        assert_bits_eq("sparse", &sparse, &want);
        for (table, want, name) in [(&self.skip, &self.model.skip, "skip"), (&self.reject, &self.model.reject, "reject")] {
            let mut got = vec![f32::NAN; want.len()];
            c.pull_range(table, 0, &mut got).expect("pull").wait().unwrap_or_else(|e| panic!("pull {name}: {e}"));
            assert_bits_eq(name, &got, want);
        }
    }

    /// After the hostile part: what was acknowledged is there, and the good client goes on.
    #[track_caller]
    fn verify_and_continue(&mut self) {
        self.verify();
        self.push_round();
        self.verify();
    }

    /// The model's values of `keys` in the dense table.
    fn dense_values(&self, keys: std::ops::Range<usize>) -> &[f32] {
        &self.model.dense[keys.start * DIM..keys.end * DIM]
    }

    #[track_caller]
    fn expect_logged(&self, needle: &str) {
        assert!(self.server.wait_for_log(needle, Duration::from_secs(5)), "the server log does not mention {needle:?}:\n{}", self.server.log());
    }
}

/// A header whose lengths are set and which is sealed, so that a test can corrupt it afterwards.
fn sealed(mut header: Header, body: &[u8]) -> Header {
    header.body_len = body.len() as u32;
    header.raw_len = header.body_len;
    header.seal();
    header
}

#[test]
fn malformed_frames_get_an_error_then_the_connection_closes() {
    let mut f = Fixture::start();
    f.push_round();
    let dense = f.id("dense");

    // Not Tessera at all, before any hello: an HTTP request.
    let mut c = RawConn::connect(f.addr());
    c.send_bytes(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n").unwrap();
    c.recv().expect("an error reply to garbage").expect_error(Status::Malformed, "bad magic");
    c.expect_closed();

    // A frame with the wrong magic on a shard connection.
    let mut c = f.raw(0);
    let (mut header, body) = raw::pull(dense, DIM as u32, &[1]);
    header.magic = u32::from_le_bytes(*b"TSRB");
    c.send_frame(header, &body).unwrap();
    c.recv().expect("an error reply to a bad magic").expect_error(Status::Malformed, "bad magic");
    c.expect_closed();

    // A corrupted header: one bit of `start` flipped after sealing, on both shards and the
    // control plane.
    for shard in [0, 1, CONTROL_SHARD] {
        let mut c = f.raw(shard);
        let (header, body) = raw::pull_range(dense, DIM as u32, 0, 10);
        let mut header = sealed(header, &body);
        header.start ^= 1 << 3;
        c.send_bytes(&raw::frame_bytes(&header, &body)).unwrap();
        c.recv().expect("an error reply to a bad checksum").expect_error(Status::Malformed, "checksum");
        c.expect_closed();
    }

    // Right checksum, wrong version; unknown op; unknown flags.
    for (edit, needle) in [
        ((|h: &mut Header| h.version = 9) as fn(&mut Header), "version"),
        (|h: &mut Header| h.op = 77, "unknown op"),
        (|h: &mut Header| h.flags = 0x8000, "unknown flags"),
    ] {
        let mut c = f.raw(1);
        let (mut header, body) = raw::pull(dense, DIM as u32, &[600]);
        edit(&mut header);
        c.send_frame(header, &body).unwrap();
        c.recv().expect("an error reply").expect_error(Status::Malformed, needle);
        c.expect_closed();
    }

    // Flags only a replicated worker's `WorkerPush` carries, on a pull: refused, the
    // connection kept.
    for flag in [flags::PUSH_SEQS, flags::TAIL_ACKS] {
        let mut c = f.raw(1);
        let (mut header, body) = raw::pull(dense, DIM as u32, &[600]);
        header.flags |= flag;
        c.send_frame(header, &body).unwrap();
        c.recv().expect("an error reply").expect_error(Status::BadRequest, "only a WorkerPush");
    }

    // A request that wants no reply: any op but a peer's `Replicate` is refused, and answered;
    // a `Replicate` whose messages do not decode is served (refused, the error logged, not
    // sent). The connection carries on either way: the next pull's reply is the next frame.
    let mut c = f.raw(1);
    let (mut header, body) = raw::pull(dense, DIM as u32, &[600]);
    header.flags |= flags::NO_REPLY;
    c.send_frame(header, &body).unwrap();
    c.recv().expect("an error reply").expect_error(Status::BadRequest, "only a Replicate request");
    let mut header = Header::request(Op::Replicate, 0);
    header.flags |= flags::NO_REPLY;
    c.send_frame(header, b"not a batch of messages").unwrap();
    let reply = c.call(raw::pull(dense, DIM as u32, &[600]));
    assert_eq!(reply.status(), Status::Ok, "the pull after the one-way request: {}", reply.message());

    // A client that sends a reply frame.
    let mut c = f.raw(0);
    let (mut header, body) = raw::pull(dense, DIM as u32, &[1]);
    header.op |= REPLY_BIT;
    c.send_frame(header, &body).unwrap();
    c.recv().expect("an error reply").expect_error(Status::Malformed, "reply frame");
    c.expect_closed();

    f.expect_logged("closing connection");
    f.expect_logged("bad magic");
    f.expect_logged("checksum");
    f.verify_and_continue();
}

#[test]
fn a_compressed_body_that_does_not_inflate_is_refused_and_the_connection_stays() {
    let mut f = Fixture::start();
    f.push_round();
    let dense = f.id("dense");
    let mut c = f.raw(0);
    let (mut header, _) = raw::push(dense, DIM as u32, &[1], &[1.0; DIM]);
    header.flags = flags::COMPRESSED;
    let junk = [0xffu8; 40];
    header.body_len = junk.len() as u32;
    header.raw_len = 40;
    header.request_id = 5;
    header.seal();
    c.send_bytes(&raw::frame_bytes(&header, &junk)).unwrap();
    let reply = c.recv().expect("an error reply");
    reply.expect_error(Status::Malformed, "snappy");
    assert_eq!(reply.header.request_id, 5);
    // The frame itself was whole, so the stream is still in step: the connection stays usable.
    let pulled = c.call(raw::pull(dense, DIM as u32, &[1, 2]));
    assert_eq!(pulled.status(), Status::Ok, "{}", pulled.message());
    assert_bits_eq("raw pull after a bad body", &pulled.values(), f.dense_values(1..3));
    f.verify_and_continue();
}

#[test]
fn truncated_frames_get_an_error_naming_the_truncation() {
    let mut f = Fixture::start();
    f.push_round();
    let dense = f.id("dense");

    // A push whose body stops partway, on a shard connection: nothing of it may be applied.
    let mut c = f.raw(0);
    let (header, body) = raw::push(dense, DIM as u32, &[1, 2], &[100.0; 2 * DIM]);
    let header = sealed(header, &body);
    let bytes = raw::frame_bytes(&header, &body);
    c.send_bytes(&bytes[..64 + 20]).unwrap();
    c.shutdown_write();
    let reply = c.recv().expect("an error reply to a truncated frame");
    reply.expect_error(Status::Malformed, "truncated");
    assert!(reply.message().contains("84 of 112"), "the message should say how much came: {}", reply.message());
    c.expect_closed();

    // A header cut short, before any hello.
    let mut c = RawConn::connect(f.addr());
    c.send_bytes(&bytes[..30]).unwrap();
    c.shutdown_write();
    c.recv().expect("an error reply to a truncated header").expect_error(Status::Malformed, "truncated");
    c.expect_closed();

    f.expect_logged("truncated frame");
    f.verify_and_continue();
}

#[test]
fn unknown_table_is_refused_and_the_connection_stays_usable() {
    let mut f = Fixture::start();
    f.push_round();
    let dense = f.id("dense");
    let mut c = f.raw(0);
    c.call(raw::worker_push(0, 99, DIM as u32, &[1], &[1.0; DIM])).expect_error(Status::UnknownTable, "99");
    c.call(raw::pull(4, DIM as u32, &[1])).expect_error(Status::UnknownTable, "4");
    c.call(raw::worker_push_range(0, u32::MAX, DIM as u32, 0, 1, &[1.0; DIM])).expect_error(Status::UnknownTable, "unknown table");
    // A control request on a data connection is refused too, without closing.
    c.request(Header::request(Op::Catalog, 0), &[]).expect_error(Status::BadRequest, "control");
    let pulled = c.call(raw::pull(dense, DIM as u32, &[1, 2]));
    assert_eq!(pulled.status(), Status::Ok, "{}", pulled.message());
    assert_bits_eq("raw pull after the errors", &pulled.values(), f.dense_values(1..3));

    // A data request on the control plane: refused, and the control connection goes on.
    let (mut control, _) = RawConn::hello(f.addr(), CONTROL_SHARD, RAW_WORKER);
    control.call(raw::pull(dense, DIM as u32, &[1])).expect_error(Status::BadRequest, "shard");
    let catalog = control.request(Header::request(Op::Catalog, 0), &[]);
    assert_eq!(catalog.status(), Status::Ok, "{}", catalog.message());
    assert!(catalog.message().contains("\"reject\""), "catalog: {}", catalog.message());
    // Bad table definitions on the control plane: refused, and the connection goes on.
    control.request(Header::request(Op::CreateTable, 0), b"{not json").expect_error(Status::BadRequest, "bad table definition");
    let conflicting = br#"{"name":"dense","kind":"dense","start":0,"end":10,"dim":4}"#;
    control.request(Header::request(Op::CreateTable, 0), conflicting).expect_error(Status::BadRequest, "different definition");
    let status = control.request(Header::request(Op::Status, 0), &[]);
    assert_eq!(status.status(), Status::Ok, "{}", status.message());
    f.verify_and_continue();
}

#[test]
fn keys_outside_the_range_are_refused_by_server_and_client() {
    let mut f = Fixture::start();
    f.push_round();
    let (dense, sparse) = (f.id("dense"), f.id("sparse"));
    let last = f.shard_of("dense", DENSE_KEYS - 1);
    let mut c = f.raw(last);
    let range = last as u32; // one range per shard on a standalone server
    c.call(raw::worker_push(range, dense, DIM as u32, &[DENSE_KEYS], &[1.0; DIM])).expect_error(Status::KeyOutOfRange, "1000");
    // One good key and one bad: the whole push is refused, key 999 stays as it was (verify).
    c.call(raw::worker_push(range, dense, DIM as u32, &[DENSE_KEYS - 1, 5000], &[1.0; 2 * DIM])).expect_error(Status::KeyOutOfRange, "5000");
    c.call(raw::pull(dense, DIM as u32, &[DENSE_KEYS])).expect_error(Status::KeyOutOfRange, "1000");
    c.call(raw::worker_push_range(range, dense, DIM as u32, DENSE_KEYS - 2, 5, &[1.0; 5 * DIM])).expect_error(Status::KeyOutOfRange, "range");
    c.call(raw::pull_range(dense, DIM as u32, u64::MAX - 1, 4)).expect_error(Status::KeyOutOfRange, "range");
    // In the table, but another range's: a different refusal.
    c.call(raw::worker_push(range, dense, DIM as u32, &[0], &[1.0; DIM])).expect_error(Status::BadRequest, "not in range");
    // The sparse table spans [0, u64::MAX): u64::MAX itself is outside.
    let mut s = f.raw(f.shard_of("sparse", u64::MAX - 1));
    s.call(raw::worker_push(f.shard_of("sparse", u64::MAX - 1) as u32, sparse, DIM as u32, &[u64::MAX], &[1.0; DIM]))
        .expect_error(Status::KeyOutOfRange, "outside");

    // The client library refuses the same keys before sending anything.
    let client = &f.client;
    let zeros = [0.0f32; 2 * DIM];
    let refused = |r: Result<tessera_client::Ticket<'_>, ClientError>, want_key: u64| match r {
        Err(ClientError::KeyOutOfRange { key, start, end, .. }) => {
            assert_eq!(key, want_key);
            assert!(start <= end);
        }
        other => panic!("expected ClientError::KeyOutOfRange for key {want_key}, got {other:?}"),
    };
    refused(client.push(&f.dense, &[5, DENSE_KEYS], &zeros), DENSE_KEYS);
    refused(client.push_range(&f.dense, DENSE_KEYS - 1, &zeros), DENSE_KEYS);
    refused(client.push(&f.sparse, &[u64::MAX], &zeros[..DIM]), u64::MAX);
    let mut out = [0.0f32; DIM];
    refused(client.pull(&f.skip, &[SMALL_KEYS], &mut out), SMALL_KEYS);
    f.verify_and_continue();
}

#[test]
fn values_of_the_wrong_length_are_refused_by_server_and_client() {
    let mut f = Fixture::start();
    f.push_round();
    let dense = f.id("dense");
    let mut c = f.raw(0);
    c.call(raw::worker_push(0, dense, DIM as u32, &[1, 2], &[1.0; 2 * DIM - 1]))
        .expect_error(Status::BadRequest, "44 bytes of keys and values for 2 keys of 4");
    c.call(raw::worker_push_range(0, dense, DIM as u32, 1, 3, &[1.0; 2 * DIM])).expect_error(Status::BadRequest, "32 bytes of keys and values for 3 keys of 4");
    c.call(raw::worker_push(0, dense, DIM as u32, &[], &[])).expect_error(Status::BadRequest, "no keys");
    c.call(raw::worker_push_range(0, dense, DIM as u32, 1, 0, &[])).expect_error(Status::BadRequest, "no keys");
    // A body that does not even split into messages.
    let (header, mut body) = raw::worker_push(0, dense, DIM as u32, &[1], &[1.0; DIM]);
    body.pop();
    c.request(header, &body).expect_error(Status::BadRequest, "batch");
    let (mut header, body) = raw::pull(dense, DIM as u32, &[1, 2]);
    header.count = 3;
    c.request(header, &body).expect_error(Status::BadRequest, "count 3");

    // The client library checks lengths before routing.
    let length = |r: Result<tessera_client::Ticket<'_>, ClientError>, want_got: usize, want_want: usize| match r {
        Err(ClientError::Length { got, want, .. }) => assert_eq!((got, want), (want_got, want_want)),
        other => panic!("expected ClientError::Length {{ got: {want_got}, want: {want_want} }}, got {other:?}"),
    };
    length(f.client.push(&f.dense, &[1, 2], &[1.0; 2 * DIM - 1]), 7, 8);
    length(f.client.push_range(&f.dense, 0, &[1.0; 2 * DIM + 1]), 9, 8);
    let mut out = [0.0f32; 3 * DIM];
    length(f.client.pull(&f.dense, &[1, 2], &mut out), 12, 8);
    f.verify_and_continue();
}

#[test]
fn non_finite_gradients_are_rejected_or_skipped_per_table() {
    let mut f = Fixture::start();
    f.push_round();
    let n = SMALL_KEYS as usize * DIM;

    // Reject tables, by raw frames: the shard refuses the push whole, nothing is applied.
    let (reject, sparse) = (f.id("reject"), f.id("sparse"));
    let mut c = f.raw(0);
    let mut g = vec![1.0f32; 2 * DIM];
    g[5] = f32::NAN;
    c.call(raw::worker_push(0, reject, DIM as u32, &[3, 4], &g)).expect_error(Status::NonFinite, "component 5 is not finite (NaN)");
    g[5] = f32::INFINITY;
    c.call(raw::worker_push_range(0, reject, DIM as u32, 3, 2, &g)).expect_error(Status::NonFinite, "(inf)");
    // The sparse table rejects by default; a refused push inserts no key.
    g[5] = 1.0;
    g[6] = f32::NEG_INFINITY;
    c.call(raw::worker_push(0, sparse, DIM as u32, &[7, 8], &g)).expect_error(Status::NonFinite, "component 6");
    f.model.sparse.insert(7, vec![0.0; DIM]);
    f.model.sparse.insert(8, vec![0.0; DIM]);
    f.verify();

    // The client library refuses the same before sending anything, even for a push that spans
    // both shards (where shard-side refusal alone would let the other shard apply its part).
    let reject_split = f.shard_of("reject", 0) != f.shard_of("reject", SMALL_KEYS - 1);
    assert!(reject_split, "two shards split the reject table");
    let mut g: Vec<f32> = (0..n).map(|i| (i % 5) as f32).collect();
    g[1] = f32::NAN;
    let refused = |r: Result<tessera_client::Ticket<'_>, ClientError>, want: usize| match r {
        Err(ClientError::NonFinite { index, value, .. }) => assert_eq!((index, value.is_finite()), (want, false)),
        other => panic!("expected ClientError::NonFinite at {want}, got {other:?}"),
    };
    refused(f.client.push_range(&f.reject, 0, &g), 1);
    g[1] = 0.0;
    g[n - 1] = f32::INFINITY;
    refused(f.client.push_range(&f.reject, 0, &g), n - 1);
    let mut sg = vec![2.0f32; 2 * DIM];
    sg[6] = f32::NEG_INFINITY;
    refused(f.client.push(&f.sparse, &[7, 1 << 63], &sg), 6);
    f.verify();

    // Skip table: finite components are applied, the others keep their values.
    let mut g: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.5).collect();
    let bad = [(5, f32::NAN), (250, f32::INFINITY), (399, f32::NEG_INFINITY)];
    for (i, v) in bad {
        g[i] = v;
    }
    f.client.push_range(&f.skip, 0, &g).unwrap().wait().expect("the skip table accepts non-finite gradients");
    let mut g2 = vec![0.75f32; 2 * DIM];
    g2[2] = f32::NAN;
    f.client.push(&f.skip, &[7, 93], &g2).unwrap().wait().expect("the skip table accepts non-finite gradients");
    for (i, v) in g.iter().enumerate().filter(|(_, v)| v.is_finite()) {
        f.model.skip[i] += v;
    }
    for (j, key) in [7usize, 93].into_iter().enumerate() {
        for c in (0..DIM).filter(|c| g2[j * DIM + c].is_finite()) {
            f.model.skip[key * DIM + c] += g2[j * DIM + c];
        }
    }
    f.verify();

    // The server counted what it skipped.
    let skip_id = u64::from(f.id("skip"));
    let status = f.client.status().expect("status");
    let skipped: u64 = status[0]["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .flat_map(|s| s["tables"].as_array().expect("tables").iter())
        .filter(|t| t["table"].as_u64() == Some(skip_id))
        .map(|t| t["non_finite_skipped"].as_u64().expect("a counter"))
        .sum();
    assert_eq!(skipped, bad.len() as u64 + 1, "non_finite_skipped in {status:?}");
    f.verify_and_continue();
}

#[test]
fn frames_over_the_limit_are_refused_by_server_and_client() {
    const LIMIT: usize = 65536;
    let mut f = Fixture::start_with(&["--frame-bytes-max", "65536"], WIDE_TOML);
    f.push_round();
    let wide = f.id("wide");

    // A header announcing a body over the limit, on a shard and on the control plane before hello.
    // Only the header is sent: the server must refuse before reading the body.
    let (header, _) = raw::push(wide, 64, &[1], &[]);
    let mut big = header;
    big.body_len = 100_000;
    big.raw_len = 100_000;
    big.request_id = 77;
    big.seal();
    // Before its hello a connection may send only small frames (4096 bytes), so that a stranger
    // cannot make the server allocate for it.
    for (conn, limit) in [(f.raw(0), "65536"), (RawConn::connect(f.addr()), "4096")] {
        let mut c = conn;
        c.send_bytes(zerocopy::IntoBytes::as_bytes(&big)).unwrap();
        let reply = c.recv().expect("an error reply");
        reply.expect_error(Status::FrameTooLarge, limit);
        assert_eq!(reply.header.request_id, 77, "the error echoes the request id");
        c.expect_closed();
    }
    // A compressed frame that would inflate past the limit.
    let mut c = f.raw(1);
    let mut zipped = header;
    zipped.flags = flags::COMPRESSED;
    zipped.body_len = 16;
    zipped.raw_len = 1 << 20;
    zipped.seal();
    c.send_bytes(&raw::frame_bytes(&zipped, &[0; 16])).unwrap();
    c.recv().expect("an error reply").expect_error(Status::FrameTooLarge, "limit");
    c.expect_closed();
    f.expect_logged("closing connection");

    // A pull whose reply would not fit: refused with the same status, the connection stays.
    let part = f.entry("wide").parts[0];
    let keys = (part.end - part.start) as u32; // 500 keys x 64 x 4 bytes: a 128 KB reply
    let mut c = f.raw(part.shard as u64);
    c.call(raw::pull_range(wide, 64, part.start, keys)).expect_error(Status::FrameTooLarge, "fewer keys");
    let fits = c.call(raw::pull_range(wide, 64, part.start, 10));
    assert_eq!(fits.status(), Status::Ok, "the connection stays usable: {}", fits.message());
    assert!(fits.values().iter().all(|v| v.to_bits() == 0), "the wide table was never pushed");

    // The client never sends such frames: it adopts the server's limit and splits calls to fit.
    let mut cfg = ClientConfig::worker(3);
    cfg.transport = TransportConfig { frame_bytes_max: 4 * LIMIT, ..TransportConfig::default() };
    let client = Client::connect(&[f.addr()], cfg).expect("connect");
    let wide_table = client.table("wide").unwrap();
    let mut out = vec![f32::NAN; keys as usize * 64];
    client.pull_range(&wide_table, part.start, &mut out).unwrap().wait().expect("split into frames that fit");
    assert!(out.iter().all(|v| v.to_bits() == 0), "the wide table was never pushed");
    // A frame over the limit is still refused locally, before sending, where a call cannot split:
    // a control request.
    let huge = tessera_layout::TableSpec::new(&"t".repeat(200_000), tessera_layout::TableKind::Dense, 0, 10, 1);
    match client.create_table(&huge) {
        Err(ClientError::Transport(TransportError::FrameTooLarge { limit, .. })) => assert_eq!(limit, LIMIT),
        other => panic!("expected a local FrameTooLarge, got {other:?}"),
    }
    client.pull_range(&wide_table, 0, &mut out[..640]).unwrap().wait().expect("the client still works");
    f.verify_and_continue();
}

#[test]
fn wrong_dim_is_refused_and_the_connection_stays_usable() {
    let mut f = Fixture::start();
    f.push_round();
    let (dense, sparse) = (f.id("dense"), f.id("sparse"));
    let mut c = f.raw(0);
    c.call(raw::pull(dense, 2, &[1])).expect_error(Status::WrongDim, "dim 4");
    c.call(raw::pull(dense, 8, &[1])).expect_error(Status::WrongDim, "dim 8");
    c.call(raw::pull_range(dense, 1, 0, 4)).expect_error(Status::WrongDim, "dim 1");
    c.call(raw::worker_push(0, dense, 2, &[1, 2], &[1.0; 4])).expect_error(Status::WrongDim, "dim 2");
    c.call(raw::worker_push_range(0, dense, 0, 0, 1, &[])).expect_error(Status::WrongDim, "dim 0");
    c.call(raw::pull(sparse, 1, &[3])).expect_error(Status::WrongDim, "dim 1");
    let pulled = c.call(raw::pull(dense, DIM as u32, &[1, 2]));
    assert_eq!(pulled.status(), Status::Ok, "{}", pulled.message());
    assert_bits_eq("raw pull after the errors", &pulled.values(), f.dense_values(1..3));
    f.verify_and_continue();
}

#[test]
fn workers_over_the_limit_are_refused_without_changing_anything() {
    let mut f = Fixture::start();
    f.push_round();
    let dense = f.id("dense");
    let mut c = RawConn::hello(f.addr(), 0, 1000).0;
    let (mut header, body) = raw::worker_push(0, dense, DIM as u32, &[1], &[5.0; DIM]);
    header.worker = 1000;
    c.request(header, &body).expect_error(Status::BadRequest, "1000");
    f.verify_and_continue();
}

/// Worker `RAW_WORKER`'s push numbered `seq` from client `incarnation`, as a `WorkerPush` to
/// range 0's head (shard 0): `value` added to keys 0..4 of the dense table.
fn push_as_client(f: &Fixture, c: &mut RawConn, incarnation: u64, seq: u32, value: f32) -> raw::RawReply {
    let (mut header, body) = raw::worker_push_range_as(RAW_WORKER, seq, 0, f.id("dense"), DIM as u32, 0, 4, &[value; 4 * DIM]);
    header.start = incarnation;
    c.request(header, &body)
}

#[test]
fn two_clients_with_one_worker_id_are_refused_by_name_and_nothing_acknowledged_is_lost() {
    let mut f = Fixture::start();
    f.push_round();
    let mut c = f.raw(0);
    let (first, second) = (0x1111, 0x2222);
    let applied = |f: &mut Fixture, r: raw::RawReply, value: f32| {
        assert_eq!(r.status(), Status::Ok, "{}", r.message());
        assert_eq!(r.refusal(), None);
        f.model.dense[..4 * DIM].iter_mut().for_each(|v| *v += value);
    };
    for seq in 1..=2 {
        let r = push_as_client(&f, &mut c, first, seq, 1.0);
        applied(&mut f, r, 1.0);
    }
    // A second client with the same worker id numbers a push as one the head applied from the
    // first: taken for a resend, it would be acknowledged and never applied.
    push_as_client(&f, &mut c, second, 2, 100.0).expect_error(Status::WorkerIdInUse, "numbered as one the range's head applied from another client");
    // The newer client has the id: the first one's pushes are refused from now on, by name.
    push_as_client(&f, &mut c, first, 3, 1000.0).expect_error(Status::WorkerIdInUse, "a client that started later pushes as this worker");
    let r = push_as_client(&f, &mut c, second, 3, 10.0);
    applied(&mut f, r, 10.0);
    f.verify();
    // A frame naming no client is not checked (a raw test client, an older build).
    let r = push_as_client(&f, &mut c, 0, 4, 5.0);
    applied(&mut f, r, 5.0);
    f.verify_and_continue();
}

#[test]
fn a_client_whose_worker_id_another_client_took_gets_the_reason_on_its_ticket() {
    let mut f = Fixture::start();
    f.push_round();
    // Another client as worker 0, the fixture's client's id, pushing while it lives.
    let other = Client::connect(&[f.addr()], ClientConfig::worker(0)).expect("the other client connects");
    let dense = other.table("dense").expect("dense");
    let grads = vec![2.0f32; 10 * DIM];
    other.push_range(&dense, 0, &grads).expect("sent").wait().expect("the newest client of an id is taken");
    add(&mut f.model.dense[..10 * DIM], &grads);
    let err = f.client.push_range(&f.dense, 0, &grads).expect("sent").wait().expect_err("the superseded client is refused");
    match &err {
        ClientError::Server { status: Status::WorkerIdInUse, message, .. } => {
            assert!(message.contains("worker id 0 is in use by another client"), "{message}");
        }
        e => panic!("expected WorkerIdInUse, got {e}"),
    }
    // Nothing of the refused push was applied, every acknowledged one is there, and the client
    // that has the id goes on.
    f.verify();
    other.push_range(&dense, 0, &grads).expect("sent").wait().expect("pushes on");
    add(&mut f.model.dense[..10 * DIM], &grads);
    f.verify();
}

#[test]
fn handshake_mistakes_are_refused() {
    let mut f = Fixture::start();
    f.push_round();
    let dense = f.id("dense");

    // A data request before any hello.
    let mut c = RawConn::connect(f.addr());
    let (header, body) = raw::pull(dense, DIM as u32, &[1]);
    c.send_frame(header, &body).unwrap();
    c.recv().expect("an error reply").expect_error(Status::BadRequest, "hello");
    c.expect_closed();

    // A second hello, on the control plane and on a shard connection.
    for shard in [CONTROL_SHARD, 0, 1] {
        let mut c = f.raw(shard);
        c.send_hello(1, RAW_WORKER).expect("an error reply").expect_error(Status::BadRequest, "second hello");
        c.expect_closed();
    }

    // A hello naming a shard that does not exist.
    for shard in [2u64, 255, 1 << 40] {
        let mut c = RawConn::connect(f.addr());
        c.send_hello(shard, RAW_WORKER).expect("an error reply").expect_error(Status::BadRequest, &format!("no shard {shard}"));
        c.expect_closed();
    }
    // Legal but unusual: a hello and a request in one write. The control plane hands the
    // connection to the shard with the request already read, and the shard answers it.
    let mut c = RawConn::connect(f.addr());
    let mut hello = Header::request(Op::Hello, 0);
    hello.start = f.shard_of("dense", 600);
    hello.worker = RAW_WORKER;
    let (mut pull, body) = raw::pull(dense, DIM as u32, &[600, 601]);
    pull.request_id = 9;
    let mut bytes = raw::frame_bytes(&sealed(hello, &[]), &[]);
    bytes.extend(raw::frame_bytes(&sealed(pull, &body), &body));
    c.send_bytes(&bytes).unwrap();
    assert_eq!(c.recv().expect("the hello reply").status(), Status::Ok);
    let pulled = c.recv().expect("the pull reply");
    assert_eq!((pulled.status(), pulled.header.request_id), (Status::Ok, 9), "{}", pulled.message());
    assert_bits_eq("pull pipelined behind its hello", &pulled.values(), f.dense_values(600..602));

    // The transport's own link reports a refused hello as a refused handshake.
    match TcpLink::connect(f.addr(), 5, RAW_WORKER, &TransportConfig::default()) {
        Err(TransportError::Refused { reason, .. }) => assert!(reason.contains("no shard 5"), "{reason}"),
        other => panic!("expected a refused handshake, got {other:?}"),
    }
    f.verify_and_continue();
}

#[test]
fn a_silent_connection_is_dropped_after_the_hello_timeout() {
    // The server's hello timeout is 5 s (not configurable from the command line), so this test
    // takes about that long.
    let mut f = Fixture::start();
    f.push_round();
    let started = Instant::now();
    let mut silent = RawConn::connect(f.addr());
    let mut partial = RawConn::connect(f.addr());
    partial.send_bytes(b"TSRA\x01").unwrap();
    let (mut greeted, _) = RawConn::hello(f.addr(), CONTROL_SHARD, RAW_WORKER);

    let closed = silent.closed_within(Duration::from_secs(12)).expect("the silent connection is dropped");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(4500), "dropped after {elapsed:?} ({closed:?}), before the 5 s hello timeout");
    partial.closed_within(Duration::from_secs(3)).expect("a connection with half a hello is dropped too");
    // A greeted connection that is just as quiet stays.
    let catalog = greeted.request(Header::request(Op::Catalog, 0), &[]);
    assert_eq!(catalog.status(), Status::Ok, "{}", catalog.message());
    f.expect_logged("no hello within 5000 ms");
    f.verify_and_continue();
}

/// One hostile connection of kind `kind`; asserts the server's answer to it. Some are kept open
/// (`keep`) until the flood ends.
fn hostile(addr: &str, kind: usize, ids: (u32, u32), keep: &mut Vec<RawConn>) {
    let (dense, reject) = ids;
    let d = DIM as u32;
    match kind % 10 {
        0 => {
            let mut c = RawConn::connect(addr);
            c.send_bytes(&[0xA5; 100]).unwrap();
            c.recv().expect("reply").expect_error(Status::Malformed, "magic");
            c.expect_closed();
        }
        1 => {
            let mut c = RawConn::hello(addr, (kind / 10 % 2) as u64, RAW_WORKER).0;
            let (h, b) = raw::push(dense, d, &[1], &[1e9; DIM]);
            let mut h = sealed(h, &b);
            h.count ^= 4;
            c.send_bytes(&raw::frame_bytes(&h, &b)).unwrap();
            c.recv().expect("reply").expect_error(Status::Malformed, "checksum");
            c.expect_closed();
        }
        2 => {
            let mut c = RawConn::hello(addr, 0, RAW_WORKER).0;
            let (h, b) = raw::push(dense, d, &[1, 2], &[1e9; 2 * DIM]);
            c.send_bytes(&raw::frame_bytes(&sealed(h, &b), &b)[..70]).unwrap();
            c.shutdown_write();
            c.recv().expect("reply").expect_error(Status::Malformed, "truncated");
            c.expect_closed();
        }
        3 => {
            let mut c = RawConn::hello(addr, 1, RAW_WORKER).0;
            c.call(raw::worker_push(1, dense + 100, d, &[600], &[1e9; DIM])).expect_error(Status::UnknownTable, "unknown");
        }
        4 => {
            let mut c = RawConn::connect(addr);
            let (mut h, _) = raw::push(dense, d, &[1], &[]);
            h.body_len = 1 << 30;
            h.raw_len = 1 << 30;
            h.seal();
            c.send_bytes(zerocopy::IntoBytes::as_bytes(&h)).unwrap();
            c.recv().expect("reply").expect_error(Status::FrameTooLarge, "limit");
            c.expect_closed();
        }
        5 => drop(RawConn::connect(addr)),
        6 => {
            let mut c = RawConn::connect(addr);
            let (h, b) = raw::push(dense, d, &[1], &[1e9; DIM]);
            c.send_frame(h, &b).unwrap();
            c.recv().expect("reply").expect_error(Status::BadRequest, "hello");
            c.expect_closed();
        }
        7 => {
            let mut c = RawConn::hello(addr, 0, RAW_WORKER).0;
            c.call(raw::worker_push(0, dense, 1, &[1], &[1e9])).expect_error(Status::WrongDim, "dim");
        }
        8 => {
            let mut c = RawConn::hello(addr, 0, RAW_WORKER).0;
            let mut g = [1e9f32; DIM];
            g[3] = f32::NAN;
            c.call(raw::worker_push(0, reject, d, &[1], &g)).expect_error(Status::NonFinite, "finite");
        }
        _ => {
            // Asks for a lot and never reads the replies; kept open until the flood ends, or it
            // just sits there without saying hello.
            if kind % 20 == 9 {
                let mut c = RawConn::hello(addr, 1, RAW_WORKER).0;
                let (h, b) = raw::pull_range(dense, d, 500, 500);
                let frame = raw::frame_bytes(&sealed(h, &b), &b);
                for _ in 0..200 {
                    c.send_bytes(&frame).unwrap();
                }
                keep.push(c);
            } else {
                keep.push(RawConn::connect(addr));
            }
        }
    }
}

#[test]
fn a_flood_of_hostile_connections_leaves_good_clients_exact() {
    const HOSTILE_THREADS: usize = 4;
    const HOSTILE_PER_THREAD: usize = 50;
    const HOSTILE_PACE: Duration = Duration::from_millis(40);
    /// Bounds on each good client's loop; it normally ends when the flood does.
    const ITERATIONS_MAX: u32 = 5000;
    const GOOD_TIME_MAX: Duration = Duration::from_secs(30);
    const GOOD_PACE: Duration = Duration::from_millis(2);

    let mut f = Fixture::start();
    f.push_round();
    let base = f.model.dense.clone();
    let parts: Vec<(usize, usize)> = f.entry("dense").parts.iter().map(|p| (p.start as usize, p.end as usize)).collect();
    let ids = (f.id("dense"), f.id("reject"));
    let addr = f.addr().to_string();
    let hostile_done = Arc::new(AtomicBool::new(false));

    // Worker 1 adds 1 to components 0 and 1 of every key per push, worker 2 to components 2 and 3,
    // so a pulled value minus the acknowledged base counts each worker's applied pushes exactly.
    let good = |worker: u32| {
        let addr = addr.clone();
        let done = hostile_done.clone();
        let (base, parts) = (base.clone(), parts.clone());
        std::thread::spawn(move || -> u32 {
            let client = Client::connect(&[addr.as_str()], ClientConfig::worker(worker)).expect("connect");
            let table = client.table("dense").expect("table");
            let mine = if worker == 1 { 0..2 } else { 2..4 };
            let grads: Vec<f32> = (0..DENSE_KEYS as usize * DIM).map(|i| if mine.contains(&(i % DIM)) { 1.0 } else { 0.0 }).collect();
            let mut out = vec![0.0f32; grads.len()];
            let started = Instant::now();
            let mut acked = 0;
            let mut outlived_the_flood = false;
            while acked < ITERATIONS_MAX && started.elapsed() < GOOD_TIME_MAX {
                if done.load(Ordering::Acquire) {
                    outlived_the_flood = true;
                    break;
                }
                client.push_range(&table, 0, &grads).expect("push").wait().expect("a good push during the flood");
                acked += 1;
                client.pull_range(&table, 0, &mut out).expect("pull").wait().expect("a good pull during the flood");
                // Each shard applies a push whole: within a part every key shows the same counts,
                // and this worker sees at least its own acknowledged pushes.
                let count = |i: usize| out[i] - base[i];
                for &(start, end) in &parts {
                    let first = [count(start * DIM), count(start * DIM + 2)];
                    for key in start..end {
                        let at = key * DIM;
                        let got = [count(at), count(at + 1), count(at + 2), count(at + 3)];
                        let want = [first[0], first[0], first[1], first[1]];
                        assert_eq!(got, want, "key {key} disagrees with its part [{start}, {end})");
                    }
                    let seen = first[mine.start / 2];
                    let why = format!("worker {worker} acknowledged {acked} pushes but reads {seen} in [{start}, {end})");
                    assert!(seen >= acked as f32, "{why}");
                }
                std::thread::sleep(GOOD_PACE);
            }
            let ran = started.elapsed();
            assert!(outlived_the_flood, "worker {worker} stopped after {acked} pushes in {ran:?}, before the flood ended");
            acked
        })
    };
    let good_threads = [good(1), good(2)];

    let started = Instant::now();
    let hostile_threads: Vec<_> = (0..HOSTILE_THREADS)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut keep = Vec::new();
                for i in 0..HOSTILE_PER_THREAD {
                    hostile(&addr, i * HOSTILE_THREADS + t, ids, &mut keep);
                    std::thread::sleep(HOSTILE_PACE);
                }
                keep.len()
            })
        })
        .collect();
    let kept: usize = hostile_threads.into_iter().map(|h| h.join().expect("a hostile thread failed")).sum();
    let hostile_time = started.elapsed();
    hostile_done.store(true, Ordering::Release);
    let [a, b] = good_threads.map(|h| h.join().expect("a good client failed"));
    eprintln!("{} hostile connections ({kept} held open) in {hostile_time:?}; good clients pushed {a} and {b} times", HOSTILE_THREADS * HOSTILE_PER_THREAD);

    for (i, v) in f.model.dense.iter_mut().enumerate() {
        *v = base[i] + if i % DIM < 2 { a as f32 } else { b as f32 };
    }
    f.verify_and_continue();
}

/// Runs `body` on its own thread and returns its result, or panics after `timeout`: a client
/// that deadlocks fails the test instead of hanging it (the stuck thread is left behind).
fn within<T: Send + 'static>(timeout: Duration, what: &str, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(body());
    });
    rx.recv_timeout(timeout).unwrap_or_else(|_| panic!("{what} did not return within {timeout:?}"))
}

#[test]
fn a_push_too_big_for_one_frame_is_split_across_frames_and_shards() {
    let f = Fixture::start_with(&["--frame-bytes-max", "65536"], WIDE_TOML);
    let addr = f.addr().to_string();
    let split = f.entry("wide").parts[1].start;
    let (pushed, after, values) = within(Duration::from_secs(10), "a push refused in its second part", move || {
        let mut cfg = ClientConfig::worker(3);
        cfg.transport = TransportConfig { frame_bytes_max: 65536, ..TransportConfig::default() };
        let client = Client::connect(&[addr.as_str()], cfg).expect("connect");
        let table = client.table("wide").expect("table");
        // 100 keys to the first shard (25 KB, one frame), then 500 to the second (128 KB: three).
        let start = split - 100;
        let pushed = client.push_range(&table, start, &vec![1.0; 600 * 64]).map(|_| ());
        let mut out = vec![f32::NAN; 200 * 64];
        let after = client.pull_range(&table, start, &mut out).map(|t| t.wait().map(|_| ()));
        (format!("{pushed:?}"), format!("{after:?}"), out)
    });
    assert_eq!(pushed, "Ok(())", "the push is split into frames that fit");
    assert_eq!(after, "Ok(Ok(()))");
    assert!(values.iter().all(|v| *v == 1.0), "every frame was applied once: {:?}", &values[..4]);
}

#[test]
fn the_client_adopts_the_servers_frame_limit_and_splits_calls_to_fit() {
    let f = Fixture::start_with(&["--frame-bytes-max", "65536"], WIDE_TOML);
    let client = Client::connect(&[f.addr()], ClientConfig::worker(3)).expect("connect");
    let table = client.table("wide").expect("table");
    // 128 KB of values against a 64 KiB server: the client splits the call into frames that fit.
    let grads: Vec<f32> = (0..500 * 64).map(|i| (i % 7) as f32).collect();
    client.push_range(&table, 0, &grads).expect("split into frames").wait().expect("every frame applied");
    let mut out = vec![0.0f32; 500 * 64];
    client.pull_range(&table, 0, &mut out).unwrap().wait().expect("the pull is split too");
    assert_eq!(out, grads, "the split push and pull round-trip exactly");
    let keys: Vec<u64> = (0..500).rev().collect();
    let mut by_key = vec![0.0f32; 500 * 64];
    client.pull(&table, &keys, &mut by_key).unwrap().wait().expect("a split key-list pull");
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(by_key[i * 64..(i + 1) * 64], grads[*k as usize * 64..(*k as usize + 1) * 64], "key {k}");
    }
}

/// The server's resident memory, from `/proc`.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("a VmRSS line");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("VmRSS in kB") >> 10
}

#[test]
fn headers_announcing_large_bodies_do_not_make_the_server_allocate_them() {
    const CONNECTIONS: usize = 8;
    const ANNOUNCED_BYTES: u32 = 60 << 20;
    const RSS_GROWTH_MAX_MIB: u64 = 64;
    let server = ServerProc::start(&["--shards", "2"]);
    let before = rss_mib(server.pid());
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        // 64 bytes each, no hello: a header announcing a 60 MiB body (under the 64 MiB limit).
        let mut c = RawConn::connect(server.addr());
        let (mut header, _) = raw::push(0, DIM as u32, &[1], &[]);
        header.body_len = ANNOUNCED_BYTES;
        header.raw_len = ANNOUNCED_BYTES;
        header.seal();
        c.send_bytes(zerocopy::IntoBytes::as_bytes(&header)).unwrap();
        conns.push(c);
    }
    // Give the server time to read every header (well within the 5 s hello timeout).
    let mut peak = before;
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        peak = peak.max(rss_mib(server.pid()));
    }
    assert!(peak <= before + RSS_GROWTH_MAX_MIB, "{CONNECTIONS} connections sent 64 bytes each and the server grew from {before} MiB to {peak} MiB");
}
