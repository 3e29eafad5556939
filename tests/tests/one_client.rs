//! The one `Client` on a replicated cluster: the same calls, handles and tickets as on an
//! unreplicated server, with every client feature (consistency models, task dependencies,
//! filters, compression, detached tickets), checked against the exact sums the pushes make.
//! A coordinator and three servers run as processes; every range is on a chain of two.

use std::time::Duration;

use tessera_client::filter::RandomSkip;
use tessera_client::{Client, ClientConfig, ClientError, Consistency};
use tessera_layout::{TableKind, TableSpec};
use tessera_tests::{free_port, ServerProc};
use tessera_transport::{Status, TransportKind};

struct Cluster {
    _coordinator: ServerProc,
    servers: Vec<ServerProc>,
    addrs: Vec<String>,
}

impl Cluster {
    /// A coordinator and three servers of two shards, every range on a chain of two.
    fn start(workers: u32) -> Cluster {
        Self::start_with(workers, &[])
    }

    /// [`Cluster::start`], each server with `extra` arguments too.
    fn start_with(workers: u32, extra: &[&str]) -> Cluster {
        let coordinator = format!("127.0.0.1:{}", free_port());
        let workers = workers.to_string();
        let args = ["--servers", "3", "--replicas", "2", "--ranges", "8", "--workers", &workers, "--failure-timeout-ms", "1000"];
        let _coordinator = ServerProc::coordinator_at(&coordinator, &args);
        let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let servers = (0..3)
            .map(|i| {
                let node = (i + 1).to_string();
                let mut args = vec!["--node-id", &node, "--shards", "2", "--no-pin", "--coordinator", &coordinator];
                args.extend_from_slice(extra);
                ServerProc::start_at(&addrs[i], &args)
            })
            .collect();
        Cluster { _coordinator, servers, addrs }
    }

    fn client(&self, cfg: ClientConfig) -> Client {
        let refs: Vec<&str> = self.addrs.iter().map(String::as_str).collect();
        Client::connect(&refs, cfg).expect("connect to the replicated cluster")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &self.servers {
            assert!(!s.log().contains("panicked"), "{}", s.log());
        }
    }
}

fn config(worker: u32) -> ClientConfig {
    let mut cfg = ClientConfig::worker(worker);
    cfg.kind = TransportKind::Tcp;
    cfg.workers = 2;
    cfg
}

fn sum_table(name: &str, kind: TableKind, end: u64, dim: u32) -> TableSpec {
    let mut spec = TableSpec::new(name, kind, 0, end, dim);
    spec.updater = "sum".into();
    if kind == TableKind::Sparse {
        spec.capacity = 10_000;
    }
    spec
}

#[test]
fn the_client_works_on_a_replicated_cluster_with_every_feature() {
    let cluster = Cluster::start(2);
    let client = cluster.client(config(0));
    assert_eq!(client.status().unwrap().len(), 3, "the client did not see every member of the cluster");

    // Tables made at run time, on every member.
    let dense = client.create_table(&sum_table("w", TableKind::Dense, 1000, 1)).expect("create a dense table");
    let sparse = client.create_table(&sum_table("emb", TableKind::Sparse, u64::MAX, 2)).expect("create a sparse table");
    let other = cluster.client(config(1));
    assert_eq!(other.table("emb").expect("another client finds the table").spec(), sparse.spec());

    // Pushes return tickets at once; a ticket's wait means the tails hold the push.
    let keys = [5u64, 1 << 40, 77, u64::MAX - 1];
    let grads = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
    let pushed = client.push(&sparse, &keys, &grads).expect("push");
    let ranged = client.call().after(&pushed).push_range(&dense, 990, &[1.0; 10]).expect("a push after another");
    pushed.wait().expect("acknowledged");
    ranged.wait().expect("acknowledged");
    let mut out = [0f32; 8];
    client.pull(&sparse, &keys, &mut out).expect("pull").wait().expect("pulled");
    assert_eq!(out, grads);
    // A span of a sparse table, as on an unreplicated server: its keys one by one, and the
    // keys never pushed read as zero.
    client.push_range(&sparse, 76, &[1.0, 1.0, 2.0, 2.0]).expect("a range push to a sparse table").wait().expect("acknowledged");
    let mut span = [f32::NAN; 8];
    client.pull_range(&sparse, 74, &mut span).expect("a range pull of a sparse table").wait().expect("pulled");
    assert_eq!(span, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 7.0, 8.0], "keys 74 to 77 (77 held 5, 6)");
    let mut row = [0f32; 10];
    let stamp = client.pull_range(&dense, 990, &mut row).expect("pull").wait().expect("pulled");
    assert_eq!(row, [1.0; 10]);
    assert_eq!(stamp.get(0), 0, "pushes at clock 0 leave clock 0");

    // A detached ticket, as the C ABI and Python hold them.
    let detached = client.push(&sparse, &keys[..1], &grads[..2]).expect("push").detach();
    assert!(client.ready(&detached, Duration::from_secs(10)).expect("ready"), "a push not acknowledged in 10 s");
    client.resume(detached, None).wait().expect("acknowledged");
    let mut first = [0f32; 2];
    let detached = client.pull(&sparse, &keys[..1], &mut first).expect("pull").detach();
    client.resume(detached, Some(&mut first)).wait().expect("pulled");
    assert_eq!(first, [2.0, 4.0]);

    // Pushes kept in flight, more than the client's window, waited on newest first: each
    // ticket waits for its own push and the ones before it, and every push lands once.
    let piped = client.create_table(&sum_table("piped", TableKind::Dense, 1000, 1)).expect("create a dense table");
    let flight: Vec<_> = (0..3 * tessera_client::PUSH_WINDOW).map(|_| client.push_range(&piped, 0, &[1.0; 1000]).expect("push")).collect();
    // A piece per range (8 ranges) per push in flight.
    let unacked = client.in_flight();
    assert!(unacked <= tessera_client::PUSH_WINDOW * 8, "{unacked} pieces in flight: the window is not kept");
    for ticket in flight.into_iter().rev() {
        ticket.wait().expect("acknowledged");
    }
    let mut all = vec![0f32; 1000];
    client.pull_range(&piped, 0, &mut all).expect("pull").wait().expect("pulled");
    assert_eq!(all, vec![3.0 * tessera_client::PUSH_WINDOW as f32; 1000]);

    // A new client as the same worker (a restarted trainer) numbers its pushes on from the
    // heads' count: its pushes are applied, not taken for resends of the old client's.
    drop(client);
    let restarted = cluster.client(config(0));
    restarted.push(&sparse, &keys[..1], &[10.0, 10.0]).expect("push").wait().expect("acknowledged");
    restarted.pull(&sparse, &keys[..1], &mut first).expect("pull").wait().expect("pulled");
    assert_eq!(first, [12.0, 14.0], "the restarted worker's push was dropped");

    // Bounded delay: worker 0 runs ahead, and its pull waits until worker 1 catches up.
    let bounded = ClientConfig { consistency: Consistency::BoundedDelay(0), ..config(0) };
    let (ahead, behind) = (cluster.client(bounded.clone()), cluster.client(ClientConfig { worker: 1, ..bounded }));
    let t = ahead.table("emb").unwrap();
    for clock in 1..=2 {
        ahead.set_clock(clock);
        ahead.push(&t, &[9], &[1.0, 1.0]).unwrap().wait().unwrap();
    }
    behind.set_clock(1);
    behind.push(&behind.table("emb").unwrap(), &[1 << 50], &[1.0, 1.0]).unwrap().wait().unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let mut v = [0f32; 2];
            // At clock 3 with τ = 0, every worker must have pushed clock 2.
            ahead.set_clock(3);
            ahead.pull(&t, &[9], &mut v).and_then(|t| t.wait())
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiter.is_finished(), "a bounded-delay pull did not wait for the worker behind");
        behind.set_clock(2);
        behind.push(&behind.table("emb").unwrap(), &[1 << 50], &[1.0, 1.0]).unwrap().wait().unwrap();
        let stamp = waiter.join().unwrap().expect("the pull returns once worker 1 is at clock 2");
        assert!(stamp.get(1) >= 2, "{stamp:?}");
    });

    // A push's stamp, as on one server: for each worker, a clock every key the push touched
    // has reached, as its heads applied it (here the meet over the table's 8 ranges).
    let (first, second) = (cluster.client(config(0)), cluster.client(config(1)));
    let stamped = first.create_table(&sum_table("stamped", TableKind::Dense, 1000, 1)).expect("create a dense table");
    first.set_clock(5);
    let stamp = first.push_range(&stamped, 0, &[1.0; 1000]).and_then(|t| t.wait()).expect("acknowledged");
    assert_eq!(stamp.clocks(), [5], "worker 0's push at clock 5");
    let stamped = second.table("stamped").expect("the table");
    second.set_clock(3);
    let stamp = second.push_range(&stamped, 0, &[1.0; 1000]).and_then(|t| t.wait()).expect("acknowledged");
    assert_eq!(stamp.clocks(), [5, 3], "worker 1's push at clock 3, over keys worker 0 took to clock 5");
    // A ticket waited on after more pushes than the client keeps stamps for vouches only for
    // its own worker's clock.
    let late = second.push_range(&stamped, 0, &[1.0; 1000]).expect("push");
    for _ in 0..tessera_client::PUSH_STAMPS_KEPT {
        second.push_range(&stamped, 0, &[1.0; 10]).and_then(|t| t.wait()).expect("acknowledged");
    }
    assert_eq!(late.wait().expect("acknowledged").clocks(), [0, 3]);

    // Sequential consistency, compression and a filter change nothing of the sums.
    let squeezed = cluster.client(ClientConfig { compress: true, consistency: Consistency::Sequential, ..config(0) });
    let w = squeezed.table("w").unwrap();
    for _ in 0..3 {
        let _ = squeezed.push_range(&w, 0, &[0.5; 100]).unwrap();
    }
    let mut v = vec![0f32; 100];
    squeezed.pull_range(&w, 0, &mut v).unwrap().wait().unwrap();
    assert_eq!(v, vec![1.5; 100], "three sequential pushes, each after the one before");
    let emb = squeezed.table("emb").unwrap();
    let keys: Vec<u64> = (0..200).map(|k| 1000 + k * 7919).collect();
    let mut skip = RandomSkip::new(0.5, 7);
    for _ in 0..4 {
        squeezed.push_filtered(&emb, &keys, &vec![1.0; 400], &mut skip).unwrap().wait().unwrap();
    }
    let mut v = vec![0f32; 400];
    squeezed.pull(&emb, &keys, &mut v).unwrap().wait().unwrap();
    // The filter skips each key with probability 1/2 and doubles what it keeps (unbiased).
    assert!(v.iter().all(|x| *x % 2.0 == 0.0 && *x <= 8.0), "{v:?}");
    let skipped = v.iter().step_by(2).map(|x| 4.0 - x / 2.0).sum::<f32>();
    assert!(skipped > 100.0 && skipped < 700.0, "the filter skipped {skipped} of 800 keys pushed");
}

#[test]
fn bad_calls_on_a_replicated_cluster_get_clear_errors_and_change_nothing() {
    let cluster = Cluster::start(2);
    let client = cluster.client(config(0));
    let mut full = sum_table("small", TableKind::Sparse, u64::MAX, 1);
    full.capacity = 4;
    let small = client.create_table(&full).expect("create");
    let w = client.create_table(&sum_table("w", TableKind::Dense, 100, 1)).expect("create");

    // Refused by the client before anything is sent.
    assert!(matches!(client.push(&small, &[1, 2], &[1.0]), Err(ClientError::Length { .. })));
    assert!(matches!(client.push_range(&w, 99, &[1.0, 1.0]), Err(ClientError::KeyOutOfRange { .. })));

    // Refused by the head: a sparse table with no room left. The push is taken back, the
    // call fails with the server's error, and the next push goes through.
    let many: Vec<u64> = (0..20_000).map(|k| k << 44).collect();
    let err = client.push(&small, &many, &vec![1.0; many.len()]).and_then(|t| t.wait()).expect_err("a push to a full table");
    assert_eq!(err.status(), Some(Status::Full), "{err}");
    client.push(&small, &[3], &[1.0]).expect("push").wait().expect("a push after the refused one");
    let mut v = [0f32];
    client.pull(&small, &[3], &mut v).unwrap().wait().unwrap();
    assert_eq!(v, [1.0]);

    // Refused while later pushes to the same ranges are on their way: those are numbered
    // anew behind the one taken back, not left after a gap, and each is applied once.
    let refused = client.push(&small, &many, &vec![1.0; many.len()]).expect("sent");
    let after: Vec<_> = (0..4).map(|_| client.push(&small, &[3], &[1.0]).expect("sent")).collect();
    let err = refused.wait().expect_err("a push to a full table");
    assert_eq!(err.status(), Some(Status::Full), "{err}");
    for ticket in after {
        ticket.wait().expect("a push sent after a refused one");
    }
    client.pull(&small, &[3], &mut v).unwrap().wait().unwrap();
    assert_eq!(v, [5.0]);

    // A worker id over the cluster's --workers (2 here): refused, not dropped unanswered.
    let stranger = cluster.client(config(5));
    let err = stranger.push(&small, &[3], &[1.0]).and_then(|t| t.wait()).expect_err("a worker over --workers");
    assert!(err.to_string().contains("--workers"), "{err}");

    // A table the servers do not have.
    let err = client.table("nope").expect_err("an unknown table");
    assert!(err.to_string().contains("nope"), "{err}");
}

/// The same on one standalone server (a chain of one): a push refused outright for its clock
/// while pushes behind it are on their way fails alone, on its own ticket, and those are
/// applied once each.
#[test]
fn a_refused_push_does_not_hold_back_the_pushes_after_it_on_one_server() {
    let server = ServerProc::start(&["--shards", "2", "--no-pin"]);
    let client = Client::connect(&[server.addr()], config(0)).expect("connect");
    let w = client.create_table(&sum_table("w", TableKind::Dense, 64, 1)).expect("create");
    client.set_clock(u64::MAX);
    let refused = client.push_range(&w, 0, &[1.0; 64]).expect("sent");
    client.set_clock(1);
    let after: Vec<_> = (0..3).map(|_| client.push_range(&w, 0, &[1.0; 64]).expect("sent")).collect();
    // A call that must follow the refused push goes once it is answered: the refusal is the
    // refused push's ticket's to hear, as each ticket hears its own, in any order.
    let mut out = vec![0f32; 64];
    client.call().after(&refused).pull_range(&w, 0, &mut out).expect("a call after a refused push").wait().expect("pulled");
    for ticket in after {
        ticket.wait().expect("a push sent after a refused one");
    }
    let err = refused.wait().expect_err("a clock over the limit");
    assert!(err.to_string().contains("clock"), "{err}");
    let sequential = client.call().consistency(Consistency::Sequential).push_range(&w, 0, &[1.0; 64]).expect("sent");
    sequential.wait().expect("a sequential push after a refused one");
    assert_eq!(pull_all(&client, &w), vec![4.0; 64]);
}

/// A call cut into several pushes to fit the server's frames fails when a head refuses one of
/// its parts, even one before its last: its ticket is the call's.
#[test]
fn a_call_cut_into_pushes_fails_when_a_part_before_its_last_is_refused() {
    let server = ServerProc::start(&["--shards", "1", "--no-pin", "--frame-bytes-max", "65536"]);
    let client = Client::connect(&[server.addr()], config(0)).expect("connect");
    let mut spec = sum_table("emb", TableKind::Sparse, u64::MAX, 64);
    spec.capacity = 400;
    let emb = client.create_table(&spec).expect("create");
    // Room for 768 keys (capacity 400 at most 75% full in a table of a power of two).
    let held: Vec<u64> = (0..600).collect();
    client.push(&emb, &held, &vec![1.0; held.len() * 64]).expect("push").wait().expect("room for 600 keys");
    // 300 new keys, then the 600 held ones: cut into pushes of about 250 keys, the first
    // refused (848 keys) and the rest applied.
    let keys: Vec<u64> = (600..900).chain(0..600).collect();
    let err = client.push(&emb, &keys, &vec![1.0; keys.len() * 64]).expect("sent").wait().expect_err("a part refused");
    assert_eq!(err.status(), Some(Status::Full), "{err}");
    client.push(&emb, &[0], &[1.0; 64]).expect("push").wait().expect("a push after the refused call");
    let mut v = vec![0f32; 3 * 64];
    client.pull(&emb, &[600, 599, 0], &mut v).unwrap().wait().unwrap();
    assert_eq!((v[0], v[64], v[128]), (0.0, 2.0, 3.0), "the refused part applied nothing, the last part once");
}

/// Key-list caching on a replicated cluster: a push sends its keys to each head once and then
/// their list's hash, a pull likewise to each tail; the sums are those of full sends. Heads and
/// tails that keep fewer lists than the worker assumes (`--key-cache-keys 60` here, against
/// the worker's million) answer a hash they lost with `KeysUnknown`, and the worker sends the
/// keys again: nothing is lost or applied twice.
#[test]
fn key_lists_are_cached_on_a_replicated_cluster() {
    let cluster = Cluster::start_with(2, &["--key-cache-keys", "60"]);
    let plain = cluster.client(config(0));
    let cached = cluster.client(ClientConfig { key_cache_keys: 1 << 20, ..config(1) });
    let emb = plain.create_table(&sum_table("emb", TableKind::Sparse, u64::MAX, 2)).expect("create");
    let cached_emb = cached.table("emb").expect("table");

    // Short lists (a few keys per range): every head and tail keeps them.
    let keys: Vec<u64> = (0..24u64).map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let grads = vec![1.0f32; keys.len() * 2];
    let mut got = vec![0f32; keys.len() * 2];
    for client in [&plain, &cached] {
        let table = if std::ptr::eq(client, &plain) { &emb } else { &cached_emb };
        for _ in 0..10 {
            client.push(table, &keys, &grads).expect("push").wait().expect("acknowledged");
            client.pull(table, &keys, &mut got).expect("pull").wait().expect("pulled");
        }
    }
    assert_eq!(got, vec![20.0; keys.len() * 2], "ten pushes of each worker");
    let (sent_plain, sent_cached) = (plain.chain_stats().bytes_sent, cached.chain_stats().bytes_sent);
    // The first push and pull send the keys; the nine after each name them by hash, which
    // saves most of their bytes (how much of the total that is depends on how many heads and
    // tails the keys spread over, which is the placement's business).
    let repeated_key_bytes = 9 * 2 * keys.len() as u64 * 8;
    assert!(sent_plain.saturating_sub(sent_cached) * 4 >= repeated_key_bytes * 3, "caching sent {sent_cached} bytes against {sent_plain} without");

    // Long lists: more keys per head and tail than they keep, so hashes the worker sends
    // name lists they dropped.
    let long: Vec<u64> = (0..400u64).map(|k| (k + 1000).wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let (lists_a, lists_b) = long.split_at(200);
    let mut out = vec![0f32; 400];
    for round in 1..=6 {
        for part in [lists_a, lists_b] {
            cached.push(&cached_emb, part, &vec![1.0; part.len() * 2]).expect("push").wait().expect("acknowledged");
            cached.pull(&cached_emb, part, &mut out[..part.len() * 2]).expect("pull").wait().expect("pulled");
            assert!(out[..part.len() * 2].iter().all(|v| *v == round as f32), "round {round}: {:?}", &out[..4]);
        }
    }
    // Pipelined, with the lists alternating, and waited on at the end.
    let tickets: Vec<_> = (0..8).map(|i| cached.push(&cached_emb, [lists_a, lists_b][i % 2], &[1.0; 400]).expect("push")).collect();
    for ticket in tickets {
        ticket.wait().expect("acknowledged");
    }
    let lost = cached.chain_stats().keys_unknown;
    assert!(lost > 0, "no head or tail ever lost a key list: the recovery went untested");
    eprintln!("requests sent again with their keys: {lost}");
    let mut all = vec![0f32; 800];
    plain.pull(&emb, &long, &mut all).expect("pull").wait().expect("pulled");
    assert!(all.iter().all(|v| *v == 10.0), "six rounds and four pipelined pushes of each list: {:?}", &all[..4]);
}

/// Servers that take frames of at most 64 KiB (`--frame-bytes-max`): the client adopts their
/// limit and cuts larger calls into pushes and pulls that fit (requests, replies, and the
/// heads' forwards down their chains), with exact sums, and a ticket's stamp the meet of its
/// parts'. Compression counts on the wire: zeros go in a fraction of their bytes.
#[test]
fn calls_over_the_servers_frame_limit_are_cut_to_fit_on_a_replicated_cluster() {
    let cluster = Cluster::start_with(2, &["--frame-bytes-max", "65536"]);
    let client = cluster.client(config(0));
    let packed = cluster.client(ClientConfig { compress: true, ..config(1) });
    let wide = client.create_table(&sum_table("wide", TableKind::Dense, 1000, 64)).expect("create");
    let emb = client.create_table(&sum_table("emb", TableKind::Sparse, u64::MAX, 64)).expect("create");

    // Zeros over the whole table (256 KB against 64 KiB frames) from worker 1 at clock 5,
    // compressed on the wire, requests and replies.
    let packed_wide = packed.table("wide").expect("table");
    let zeros = vec![0f32; 1000 * 64];
    let mut out = vec![f32::NAN; 1000 * 64];
    packed.set_clock(5);
    let (sent, received) = packed.bytes();
    packed.push_range(&packed_wide, 0, &zeros).expect("cut into pushes that fit").wait().expect("acknowledged");
    packed.pull_range(&packed_wide, 0, &mut out).expect("cut into pulls").wait().expect("pulled");
    let (sent, received) = (packed.bytes().0 - sent, packed.bytes().1 - received);
    assert_eq!(out, zeros);
    assert!(sent * 10 < (zeros.len() * 4) as u64, "compressed zeros are under a tenth on the wire: {sent} bytes sent");
    assert!(received * 10 < (zeros.len() * 4) as u64, "compressed replies are under a tenth: {received} bytes received");

    // 900 keys of 64 values from worker 0 at clock 3: the stamp of every part holds worker
    // 1's clock 5, and the call's is their meet (a part's missing would leave none).
    let grads: Vec<f32> = (0..900 * 64).map(|i| (i % 7) as f32).collect();
    client.set_clock(3);
    let stamp = client.push_range(&wide, 50, &grads).expect("cut into pushes that fit").wait().expect("every part applied");
    assert_eq!((stamp.get(0), stamp.get(1)), (3, 5), "the parts' stamps meet into the call's: {stamp:?}");
    let mut out = vec![0f32; 900 * 64];
    client.pull_range(&wide, 50, &mut out).unwrap().wait().expect("the pull is cut too");
    assert_eq!(out, grads, "the cut push and pull round-trip exactly");
    let keys: Vec<u64> = (50..950).rev().collect();
    let mut by_key = vec![0f32; 900 * 64];
    client.pull(&wide, &keys, &mut by_key).unwrap().wait().expect("a cut key-list pull");
    for (i, k) in keys.iter().enumerate() {
        let at = (*k - 50) as usize * 64;
        assert_eq!(by_key[i * 64..(i + 1) * 64], grads[at..at + 64], "key {k}");
    }

    // Keyed pushes, twice, the second under bounded delay (its last part completes the
    // worker's clock on every range).
    let sparse: Vec<u64> = (0..900u64).map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    client.push(&emb, &sparse, &vec![1.0; 900 * 64]).expect("push").wait().expect("acknowledged");
    // Worker 1 completes its clock 1 with one key; a pull at worker 0's clock 3 then needs
    // clock 1 of both on every range it reads.
    let bounded = client.table("emb").expect("table").with_consistency(Consistency::BoundedDelay(1));
    let packed_bounded = packed.table("emb").expect("table").with_consistency(Consistency::BoundedDelay(1));
    packed.set_clock(1);
    packed.push(&packed_bounded, &[7], &[0.0; 64]).expect("push").wait().expect("acknowledged");
    client.push(&bounded, &sparse, &vec![2.0; 900 * 64]).expect("push").wait().expect("acknowledged");
    let mut got = vec![0f32; 900 * 64];
    client.pull(&bounded, &sparse, &mut got).expect("pull").wait().expect("pulled");
    assert!(got.iter().all(|v| *v == 3.0), "every part of both pushes applied once: {:?}", &got[..4]);
}

/// `Ticket::ready` with a timeout waits no longer than it, on a replicated cluster too: with
/// every server frozen (SIGSTOP), a push's and a pull's `ready` say false in about their
/// timeout, and once the servers go on, both tickets end as usual.
#[test]
fn ready_waits_no_longer_than_its_timeout_on_a_replicated_cluster() {
    let cluster = Cluster::start(2);
    let client = cluster.client(config(0));
    let table = client.create_table(&sum_table("ready", TableKind::Dense, 1_000, 1)).unwrap();
    client.push_range(&table, 0, &[1.0; 1_000]).unwrap().wait().unwrap();
    // The links made first: making one to a frozen server waits for its hello.
    assert_eq!(pull_all(&client, &table), vec![1.0; 1_000]);
    cluster.servers.iter().for_each(ServerProc::freeze);
    let pushed = client.push_range(&table, 0, &[1.0; 1_000]).unwrap();
    let mut out = vec![0f32; 1_000];
    let began = std::time::Instant::now();
    let push_ready = pushed.ready(Duration::from_millis(50)).unwrap();
    let push_looked = began.elapsed();
    let pulled = client.pull_range(&table, 0, &mut out).unwrap();
    let began = std::time::Instant::now();
    let pull_ready = pulled.ready(Duration::from_millis(50)).unwrap();
    let pull_looked = began.elapsed();
    cluster.servers.iter().for_each(ServerProc::resume);
    assert!(
        !push_ready && !pull_ready,
        "nothing can be ready while every server is frozen (push {push_ready} in {push_looked:?}, pull {pull_ready} in {pull_looked:?})"
    );
    assert!(push_looked < Duration::from_secs(2) && pull_looked < Duration::from_secs(2), "ready took {push_looked:?} and {pull_looked:?}");
    assert!(pushed.ready(Duration::from_secs(30)).unwrap());
    pushed.wait().unwrap();
    pulled.wait().unwrap();
    assert!(out.iter().all(|v| *v == 1.0 || *v == 2.0), "the pull saw the first push, and maybe the second");
    assert_eq!(pull_all(&client, &table), vec![2.0; 1_000]);
}

fn pull_all(client: &Client, table: &tessera_client::Table) -> Vec<f32> {
    let mut out = vec![0f32; table.spec().end as usize];
    client.pull_range(table, 0, &mut out).unwrap().wait().unwrap();
    out
}
