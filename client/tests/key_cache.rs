//! Key-list caching through a real server: a repeated key list goes by its hash, results stay
//! bit-identical, a list the server let go is sent again without the caller noticing, and a
//! client that names lists the server never saw changes nothing.

mod common;

use common::{bits, client_with, sparse, Model, Rng};
use tessera_client::{Client, ClientConfig, Consistency, Table};
use tessera_engine::{Server, ServerConfig, UpdaterRegistry};
use tessera_replication::codec::{self, KeyList, PushHeader};
use tessera_replication::protocol::{Msg, RangeId, WorkerId};
use tessera_transport::keycache::key_list_hash;
use tessera_transport::tcp::TcpLink;
use tessera_transport::wire::flags;
use tessera_transport::{Header, Link, Op, Status, TransportConfig};

/// A two-shard server whose shards remember `keys` keys of key lists per connection.
fn server_caching(keys: usize) -> Server {
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    cfg.engine.shards = 2;
    cfg.engine.pin_cores = false;
    cfg.engine.key_cache_keys = keys;
    Server::start(cfg, UpdaterRegistry::new()).unwrap()
}

fn caching_client(server: &Server, worker: u32, keys: usize) -> Client {
    client_with(server, ClientConfig { key_cache_keys: keys, ..ClientConfig::worker(worker) })
}

/// Ten rounds over three key lists (each spread over both shards): push, then pull, each
/// round. Returns every pull's values and the bytes the client sent.
fn rounds(client: &Client, table: &Table) -> (Vec<Vec<f32>>, u64) {
    let mut rng = Rng(3);
    let lists: Vec<Vec<u64>> = (0..3).map(|_| (0..400).map(|_| rng.next_u64()).collect()).collect();
    let dim = table.dim();
    let mut model = Model::new(dim);
    let mut pulled = Vec::new();
    for round in 0..10 {
        let keys = &lists[round % 3];
        let grads = rng.values(keys.len() * dim);
        // Dropped, not waited on: the push must still land, whatever its key list's fate.
        drop(client.push(table, keys, &grads).unwrap());
        model.push(keys, &grads);
        let mut out = vec![0f32; keys.len() * dim];
        // Sequential: the pull goes out once the push before it is acknowledged.
        client.call().consistency(Consistency::Sequential).pull(table, keys, &mut out).unwrap().wait().unwrap();
        assert_eq!(bits(&out), bits(&model.get(keys.iter().copied())), "round {round}");
        pulled.push(out);
    }
    (pulled, client.bytes().0)
}

#[test]
fn repeated_key_lists_go_by_hash_and_change_no_result() {
    let server = server_caching(1 << 20);
    let plain = caching_client(&server, 0, 0);
    let table = plain.create_table(&sparse("plain", 2)).unwrap();
    let (plain_values, plain_bytes) = rounds(&plain, &table);

    let cached = caching_client(&server, 1, 1 << 20);
    let table = cached.create_table(&sparse("cached", 2)).unwrap();
    let (cached_values, cached_bytes) = rounds(&cached, &table);
    assert_eq!(plain_values.iter().map(|v| bits(v)).collect::<Vec<_>>(), cached_values.iter().map(|v| bits(v)).collect::<Vec<_>>());
    // 20 calls of 400 keys, 3 distinct lists: 14 of the 20 leave 3,200 bytes of keys out.
    // 20 calls, each split over both shards: 40 frames, 6 distinct (list, shard) pairs.
    assert_eq!(cached.key_lists_by_hash(), (34, 0), "every frame after a list's first goes by hash, none missed");
    assert_eq!(plain.key_lists_by_hash(), (0, 0));
    let saved = plain_bytes - cached_bytes;
    assert!(saved >= 14 * 400 * 8, "saved {saved} of {plain_bytes} bytes");
}

#[test]
fn a_list_the_server_let_go_is_sent_again_transparently() {
    // The server keeps 500 keys per connection and shard, the client assumes 100,000: the three
    // lists (about 200 keys per shard each) keep falling out of the server's cache while the
    // client names them by hash. Every miss is answered `KeysUnknown` and sent again in full.
    let server = server_caching(500);
    let client = caching_client(&server, 0, 100_000);
    let table = client.create_table(&sparse("small", 1)).unwrap();
    rounds(&client, &table);
    let (by_hash, missed) = client.key_lists_by_hash();
    // (After a miss both ends start their lists over, so fewer go by hash than with no misses.)
    assert!(by_hash > 0 && missed > 0 && missed < by_hash, "{by_hash} by hash, {missed} missed");
    // A server that caches nothing: every named list misses, results are still exact.
    let server = server_caching(0);
    let client = caching_client(&server, 0, 100_000);
    let table = client.create_table(&sparse("none", 3)).unwrap();
    rounds(&client, &table);
    let (by_hash, missed) = client.key_lists_by_hash();
    assert!(by_hash > 0 && missed == by_hash, "every list named by hash was sent again: {by_hash} by hash, {missed} missed");
}

#[test]
fn a_client_naming_unknown_lists_gets_a_refusal_and_changes_nothing() {
    let server = server_caching(1 << 20);
    let client = caching_client(&server, 0, 0);
    let table = client.create_table(&sparse("t", 1)).unwrap();
    let addr = server.local_addr().to_string();
    // A raw connection to shard 0 that pushes naming a list it never sent (a worker's push
    // frame to range 0's head: one range per shard on a standalone server).
    let (mut raw, _) = TcpLink::connect(&addr, 0, 5, &TransportConfig::default()).unwrap();
    let plain = PushHeader { table: 0, dim: 1, start: 0, count: 2, worker: 5, clock: 0, listed: true, range_done: false }.keyed_payload(&[1, 2], &[5.0, 5.0]);
    let payload = PushHeader::with_key_list(&plain, KeyList::Cached { hash: key_list_hash(&[1, 2]) });
    let mut body = Vec::new();
    codec::encode_batch([&Msg::Push { range: RangeId(0), worker: WorkerId(5), seq: 1, payload: payload.into() }], &mut body);
    let mut h = Header::request(Op::WorkerPush, 1);
    h.worker = 5;
    raw.send(&mut h, &[&body], false).unwrap();
    let reply = raw.recv(None).unwrap();
    assert_eq!(reply.header.status(), Status::KeysUnknown, "{}", String::from_utf8_lossy(reply.body));

    // Remembering a list on one connection does not lend it to another.
    let mut h = Header::request(Op::Pull, 2);
    h.dim = 1;
    h.count = 2;
    h.flags = flags::KEYS_REMEMBER;
    raw.send(&mut h, &[bytemuck::cast_slice(&[1u64, 2])], false).unwrap();
    assert_eq!(raw.recv(None).unwrap().header.status(), Status::Ok);
    let (mut other, _) = TcpLink::connect(&addr, 0, 6, &TransportConfig::default()).unwrap();
    let mut h = Header::request(Op::Pull, 1);
    h.dim = 1;
    h.count = 2;
    h.start = key_list_hash(&[1, 2]);
    h.flags = flags::KEYS_CACHED;
    other.send(&mut h, &[], false).unwrap();
    assert_eq!(other.recv(None).unwrap().header.status(), Status::KeysUnknown);
    // ... while the connection that sent it may name it: a pull by hash, with no keys.
    let mut h = Header::request(Op::Pull, 3);
    h.dim = 1;
    h.count = 2;
    h.start = key_list_hash(&[1, 2]);
    h.flags = flags::KEYS_CACHED;
    raw.send(&mut h, &[], false).unwrap();
    let reply = raw.recv(None).unwrap();
    assert_eq!(reply.header.status(), Status::Ok);
    assert_eq!(reply.body.len(), reply.header.count as usize * 8 + 8, "stamp and two values");

    // Cache flags on an op that carries no key list are refused.
    let mut h = Header::request(Op::PullRange, 4);
    h.dim = 1;
    h.count = 2;
    h.flags = flags::KEYS_CACHED;
    raw.send(&mut h, &[], false).unwrap();
    assert_eq!(raw.recv(None).unwrap().header.status(), Status::BadRequest);

    let mut out = vec![0f32; 2];
    client.pull(&table, &[1, 2], &mut out).unwrap().wait().unwrap();
    assert_eq!(out, vec![0.0, 0.0], "nothing was applied");
}
