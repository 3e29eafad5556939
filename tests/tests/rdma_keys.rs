//! A worker can write into its own request ring on a shard and nowhere else, and read only the
//! dense parts it was granted. Each worker's ring
//! sits in a protection domain of its own, so a worker that writes with another worker's rkey (a
//! foreign key), with the key of a ring the shard has released (a stale key) or with a made-up
//! one gets an error, and the parameters do not change.
//!
//! The misbehaving workers are raw [`RdmaLink`]s whose slot keys a test hook replaces. Like
//! `tests/rdma.rs`, these tests need an RDMA device: run them in the SoftRoCE guest
//! (`tests/softroce/run.sh`); under the harness (`SOFTROCE_VM`) or with `RDMA_DEV` set, a
//! missing device fails them; on a plain host they say they did not run.

#![cfg(feature = "rdma")]

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_client::{Client, ClientConfig, Table};
use tessera_engine::{Server, ServerConfig, UpdaterRegistry};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::raw;
use tessera_transport::rdma::verbs::Device;
use tessera_transport::rdma::RdmaLink;
use tessera_transport::wire::{padded, ShortHeader};
use tessera_transport::{Chosen, Link, OneSided, RdmaConfig, Status, TransportConfig, TransportError, TransportKind};
use zerocopy::IntoBytes;

/// Keys of the test table, all on shard 0 (the server has one shard).
const KEYS: u64 = 64;
const DIM: usize = 4;
const SHARD: u64 = 0;
/// How long a worker waits for the reply, or the error, to one push.
const REPLY_WITHIN: Duration = Duration::from_secs(10);
/// How long the server may take to notice a closed connection and release its ring.
const RELEASE_WITHIN: Duration = Duration::from_secs(10);
/// Links opened at most while looking for one whose keys differ from a stale set.
const FRESH_LINK_TRIES_MAX: usize = 4;

fn fast() -> RdmaConfig {
    RdmaConfig { slots: 8, slot_bytes: 64 << 10, spin_us: 20, ..RdmaConfig::default() }
}

/// A one-shard RDMA server, a well-behaved RDMA worker (worker 0) with a dense table, and the
/// device for raw links.
struct Fixture {
    server: Server,
    client: Client,
    table: Table,
    /// The table's id on the server, as raw frames name it.
    id: u32,
    dev: Arc<Device>,
}

impl Fixture {
    fn start() -> Fixture {
        let mut cfg = ServerConfig::single("127.0.0.1:0");
        cfg.engine.shards = 1;
        cfg.engine.pin_cores = false;
        cfg.transport_kind = TransportKind::Rdma;
        cfg.rdma = fast();
        let server = Server::start(cfg, UpdaterRegistry::new()).expect("server");
        let ccfg = ClientConfig { kind: TransportKind::Rdma, rdma: fast(), ..ClientConfig::worker(0) };
        let client = Client::connect(&[&server.local_addr().to_string()], ccfg).expect("client");
        assert_eq!(client.transport(), "rdma");
        let table = client.create_table(&TableSpec::new("keys", TableKind::Dense, 0, KEYS, DIM as u32)).unwrap();
        let entries = client.catalogs().expect("catalog").remove(0);
        let id = entries.iter().find(|e| e.spec.name == "keys").expect("the table in the catalog").id;
        let dev = match tessera_transport::select::choose(TransportKind::Rdma, &fast()).expect("a device") {
            Chosen::Rdma(dev) => dev,
            Chosen::Tcp => panic!("asked for RDMA, got TCP"),
        };
        Fixture { server, client, table, id, dev }
    }

    /// A raw RDMA link to shard 0 as `worker`.
    fn link(&self, worker: u32) -> RdmaLink {
        let addr = self.server.local_addr().to_string();
        RdmaLink::connect(&addr, SHARD, worker, &TransportConfig::default(), &fast(), Arc::clone(&self.dev))
            .unwrap_or_else(|e| panic!("worker {worker}: rdma link to shard {SHARD}: {e}"))
            .0
    }

    /// The whole table, pulled by the well-behaved worker.
    fn values(&self) -> Vec<f32> {
        let mut out = vec![0f32; KEYS as usize * DIM];
        self.client.pull_range(&self.table, 0, &mut out).unwrap().wait().unwrap();
        out
    }

    /// Connections open on the server's shards.
    fn connections(&self) -> u64 {
        let status = self.client.status().unwrap();
        status[0]["shards"].as_array().unwrap().iter().map(|s| s["connections"].as_u64().unwrap()).sum()
    }

    /// Waits until the server has `want` connections open.
    fn wait_for_connections(&self, want: u64) {
        let deadline = Instant::now() + RELEASE_WITHIN;
        while self.connections() != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(self.connections(), want, "the server's connection count after {RELEASE_WITHIN:?}");
    }
}

/// Pushes `value` to each of `keys` over `link` as `worker`'s push number `seq` to the shard's
/// one range (a worker's push frame, as to a range's head): the reply's status, or the link's
/// error.
fn push(link: &mut RdmaLink, id: u32, worker: u32, seq: u32, keys: &[u64], value: f32) -> Result<Status, TransportError> {
    let (mut header, body) = raw::worker_push_as(worker, seq, 0, id, DIM as u32, keys, &vec![value; keys.len() * DIM]);
    header.clock = 1;
    link.send(&mut header, &[&body], false)?;
    Ok(link.recv(Some(REPLY_WITHIN))?.header.status())
}

#[track_caller]
fn expect_served(result: Result<Status, TransportError>, what: &str) {
    match result {
        Ok(Status::Ok) => {}
        other => panic!("{what}: expected the push to be served, got {other:?}"),
    }
}

/// The device must refuse the write or read: the link reports a remote access error, promptly.
#[track_caller]
fn expect_refused<T: std::fmt::Debug>(result: Result<T, TransportError>, what: &str) {
    match result {
        Err(e @ TransportError::Rdma { .. }) if e.to_string().contains("remote access error") => {
            println!("{what}: refused as it must be: {e}");
        }
        Err(e) => panic!("{what}: failed, but not with the device's remote access error: {e}"),
        Ok(done) => panic!("{what}: it went through ({done:?}); it must have been refused"),
    }
}

/// The table as it must be: `value` at each of `keys`, zero elsewhere.
fn expected(pushed: &[(u64, f32)]) -> Vec<f32> {
    let mut values = vec![0f32; KEYS as usize * DIM];
    for &(key, value) in pushed {
        values[key as usize * DIM..(key as usize + 1) * DIM].iter_mut().for_each(|v| *v += value);
    }
    values
}

/// A random u32 from the standard library's per-process hash keys.
fn random_u32() -> u32 {
    RandomState::new().hash_one(Instant::now()) as u32
}

#[test]
fn a_worker_writing_with_another_workers_rkey_gets_an_error_and_nothing_lands() {
    let test = "a_worker_writing_with_another_workers_rkey_gets_an_error_and_nothing_lands";
    if !tessera_tests::rdma_here(test) {
        return;
    }
    let f = Fixture::start();
    let (mut a, mut b) = (f.link(1), f.link(2));
    expect_served(push(&mut b, f.id, 2, 1, &[1, 2], 1.0), "B's first push");
    let (keys_a, keys_b) = (a.remote_slot_keys(), b.remote_slot_keys());
    assert!(keys_a.iter().all(|(_, rkey)| keys_b.iter().all(|(_, other)| rkey != other)), "A and B share an rkey");

    // A writes with B's keys: into B's ring, at the address B's next request goes to.
    a.override_remote_slot_keys(keys_b);
    expect_refused(push(&mut a, f.id, 1, 1, &[1, 2, 3], 100.0), "A with B's keys");

    // B is untouched: its next push (into the very slot A aimed at) is served.
    expect_served(push(&mut b, f.id, 2, 2, &[1, 2], 1.0), "B after A's attempt");
    let want = expected(&[(1, 2.0), (2, 2.0)]);
    assert_eq!(f.values(), want, "only B's acknowledged pushes are in the table");
}

#[test]
fn a_worker_writing_with_a_released_rings_rkey_gets_an_error_and_nothing_changes() {
    let test = "a_worker_writing_with_a_released_rings_rkey_gets_an_error_and_nothing_changes";
    if !tessera_tests::rdma_here(test) {
        return;
    }
    let f = Fixture::start();
    let baseline = f.connections();
    let mut first = f.link(1);
    expect_served(push(&mut first, f.id, 1, 1, &[5], 1.0), "the first link's push");
    let stale = first.remote_slot_keys();
    drop(first);
    // The shard releases the ring (and its protection domain) when the TCP connection closes.
    f.wait_for_connections(baseline);

    // A new link whose ring happens to get one of the stale keys back would make them live
    // again; keep such a link open (so its keys stay taken) and open another.
    let mut spares = Vec::new();
    let mut second = f.link(2);
    while second.remote_slot_keys().iter().any(|key| stale.contains(key)) {
        assert!(spares.len() + 1 < FRESH_LINK_TRIES_MAX, "{FRESH_LINK_TRIES_MAX} links in a row reused a stale key");
        spares.push(second);
        second = f.link(2 + spares.len() as u32);
    }
    second.override_remote_slot_keys(stale);
    expect_refused(push(&mut second, f.id, 2, 1, &[5, 6], 100.0), "a link with a released ring's keys");
    assert_eq!(f.values(), expected(&[(5, 1.0)]), "the table holds the first link's push alone");
}

#[test]
fn a_worker_writing_with_a_made_up_rkey_gets_an_error_and_the_server_serves_on() {
    let test = "a_worker_writing_with_a_made_up_rkey_gets_an_error_and_the_server_serves_on";
    if !tessera_tests::rdma_here(test) {
        return;
    }
    let f = Fixture::start();
    let (mut guesser, mut other) = (f.link(3), f.link(4));
    let taken: Vec<u32> = guesser.remote_slot_keys().iter().chain(&other.remote_slot_keys()).map(|k| k.1).collect();
    let mut garbage = random_u32();
    while taken.contains(&garbage) {
        garbage = garbage.wrapping_add(1);
    }
    // The right addresses, a made-up key.
    let keys = guesser.remote_slot_keys().into_iter().map(|(addr, _)| (addr, garbage)).collect();
    guesser.override_remote_slot_keys(keys);
    expect_refused(push(&mut guesser, f.id, 3, 1, &[9], 100.0), &format!("a link with rkey {garbage:#x}"));

    // Other workers are served: a raw link, the client, and the guesser once it reconnects.
    expect_served(push(&mut other, f.id, 4, 1, &[9], 1.0), "another worker's link");
    f.client.push(&f.table, &[9, 10], &[2.0; 2 * DIM]).unwrap().wait().unwrap();
    drop(guesser);
    let mut again = f.link(3);
    expect_served(push(&mut again, f.id, 3, 1, &[10], 4.0), "the guesser, reconnected with its own keys");
    assert_eq!(f.values(), expected(&[(9, 1.0), (9, 2.0), (10, 2.0), (10, 4.0)]), "only the served pushes");
}

/// Reads the whole table over `link` with one-sided reads: the values, or the link's error.
fn read(link: &mut RdmaLink, id: u32) -> Result<Vec<f32>, TransportError> {
    let mut out = vec![0f32; KEYS as usize * DIM];
    let mut stamp = Vec::new();
    assert!(link.read_dense(id, 0, DIM as u32, &mut out, &mut stamp)?, "the dense table is readable over RDMA");
    Ok(out)
}

#[test]
fn a_worker_reading_with_another_workers_or_a_released_rkey_or_at_a_request_ring_gets_an_error() {
    let test = "a_worker_reading_with_another_workers_or_a_released_rkey_or_at_a_request_ring_gets_an_error";
    if !tessera_tests::rdma_here(test) {
        return;
    }
    let f = Fixture::start();
    f.client.push(&f.table, &[1], &[3.0; DIM]).unwrap().wait().unwrap();
    let want = expected(&[(1, 3.0)]);
    // (The well-behaved worker's links are made by its first calls.)
    assert_eq!(f.values(), want);
    let baseline = f.connections();

    // B is granted the table: its reads work, with keys of its own.
    let mut b = f.link(2);
    assert_eq!(read(&mut b, f.id).expect("B reads its grant"), want);
    let keys_b = b.remote_dense_keys(f.id, 0).unwrap().expect("a dense part");

    // A reads with B's keys: another protection domain's region.
    let mut a = f.link(1);
    let keys_a = a.remote_dense_keys(f.id, 0).unwrap().expect("a dense part");
    assert!(keys_a.iter().all(|(_, k)| keys_b.iter().all(|(_, kb)| k != kb)), "A and B were granted the same rkey");
    a.override_remote_dense_keys(f.id, 0, &keys_b);
    expect_refused(read(&mut a, f.id), "A reading with B's keys");

    // C reads B's request ring (registered for remote writes by B alone).
    let mut c = f.link(3);
    let chunks = c.remote_dense_keys(f.id, 0).unwrap().expect("a dense part").len();
    let ring = b.remote_slot_keys()[0];
    c.override_remote_dense_keys(f.id, 0, &vec![ring; chunks]);
    expect_refused(read(&mut c, f.id), "C reading B's request ring");

    // D reads with the keys of a worker that left: its grant was deregistered with its ring.
    let mut gone = f.link(4);
    let stale = gone.remote_dense_keys(f.id, 0).unwrap().expect("a dense part");
    drop((gone, a, c));
    f.wait_for_connections(baseline + 1);
    // A link granted one of the released keys again would make them live: keep such links open
    // (so their keys stay taken) and open another.
    let mut spares = Vec::new();
    let mut d = f.link(5);
    while d.remote_dense_keys(f.id, 0).unwrap().expect("a dense part").iter().any(|k| stale.contains(k)) {
        assert!(spares.len() + 1 < FRESH_LINK_TRIES_MAX, "{FRESH_LINK_TRIES_MAX} links in a row reused a released key");
        spares.push(d);
        d = f.link(6 + spares.len() as u32);
    }
    d.override_remote_dense_keys(f.id, 0, &stale);
    expect_refused(read(&mut d, f.id), "D reading with a released grant's keys");

    // B, and the table, are as they were.
    assert_eq!(read(&mut b, f.id).expect("B reads on"), want);
    assert_eq!(f.values(), want);
}

/// A frame as bytes: `head` (a short or a long header), then `body` padded to 8.
fn frame(head: &[u8], body: &[u8]) -> Vec<u8> {
    let mut bytes = head.to_vec();
    bytes.extend_from_slice(body);
    bytes.resize(head.len() + padded(body.len()), 0);
    bytes
}

#[test]
fn malformed_frames_over_rdma_get_error_replies_and_change_nothing() {
    let test = "malformed_frames_over_rdma_get_error_replies_and_change_nothing";
    if !tessera_tests::rdma_here(test) {
        return;
    }
    let f = Fixture::start();
    let mut link = f.link(5);
    let (mut header, body) = raw::worker_push_as(5, 1, 0, f.id, DIM as u32, &[7], &[50.0; DIM]);
    (header.clock, header.body_len, header.raw_len) = (1, body.len() as u32, body.len() as u32);
    let good = ShortHeader::shorten(&header).expect("a small push shortens");
    let short = |edit: &dyn Fn(&mut ShortHeader)| {
        let mut s = good;
        edit(&mut s);
        s
    };
    let cases: Vec<(&str, Vec<u8>, bool, Status)> = vec![
        ("a short frame with an unknown op", frame(short(&|s| s.op = 99).as_bytes(), &body), true, Status::Malformed),
        ("a short frame claiming compression", frame(short(&|s| s.flags = 1).as_bytes(), &body), true, Status::Malformed),
        ("a short frame longer than its slot", frame(short(&|s| s.body_len = u16::MAX).as_bytes(), &body), true, Status::Malformed),
        ("a short frame of 0xff bytes", vec![0xff; 64], true, Status::Malformed),
        ("a short push frame cut short", frame(short(&|s| s.body_len -= 8).as_bytes(), &body[..body.len() - 8]), true, Status::BadRequest),
        ("a short frame of 8 bytes", vec![0; 8], true, Status::Malformed),
        ("a long frame with a bad checksum", frame(header.as_bytes(), &body), false, Status::Malformed),
        ("a long frame of 0xff bytes", vec![0xff; 512], false, Status::Malformed),
    ];
    for (what, bytes, is_short, want) in cases {
        link.send_raw(&bytes, is_short).unwrap_or_else(|e| panic!("{what}: posting failed: {e}"));
        let reply = link.recv(Some(REPLY_WITHIN)).unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
        let message = String::from_utf8_lossy(reply.body).into_owned();
        assert_eq!(reply.header.status(), want, "{what}: {message}");
        println!("{what}: {:?}: {message}", reply.header.status());
    }
    // A well-formed push whose arrival tag never shows (zeros follow it where the tag goes):
    // the shard finds it by its receive completion instead, and serves it.
    let (mut header, body) = raw::worker_push_as(5, 1, 0, f.id, DIM as u32, &[8], &[4.0; DIM]);
    (header.clock, header.body_len, header.raw_len) = (1, body.len() as u32, body.len() as u32);
    let untagged = [frame(ShortHeader::shorten(&header).expect("shortens").as_bytes(), &body), vec![0; 8]].concat();
    link.send_raw(&untagged, true).expect("posting an untagged push");
    let reply = link.recv(Some(REPLY_WITHIN)).expect("a reply to the untagged push");
    assert_eq!(reply.header.status(), Status::Ok, "{}", String::from_utf8_lossy(reply.body));
    // The link, the client and the table are as they were: only served pushes land.
    expect_served(push(&mut link, f.id, 5, 2, &[8], 1.0), "the same link, well-formed again");
    f.client.push(&f.table, &[8], &[2.0; DIM]).unwrap().wait().unwrap();
    assert_eq!(f.values(), expected(&[(8, 4.0), (8, 1.0), (8, 2.0)]), "only the served pushes");
}
