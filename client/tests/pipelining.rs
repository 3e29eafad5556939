//! Tickets: pipelining many calls gives the same results as waiting on each, dropped tickets do
//! not disturb later calls, and stamps carry the workers' clocks.

mod common;

use common::{bits, client, dense, pull, pull_range, server, sparse, Cluster, Model, Rng};
use std::time::Duration;

use tessera_client::{Client, Stamp, Table, Ticket};

/// One call of a deterministic workload.
#[derive(Debug, Clone)]
enum Call {
    Push { table: usize, keys: Vec<u64>, grads: Vec<f32> },
    PushRange { start: u64, grads: Vec<f32> },
    Pull { table: usize, keys: Vec<u64> },
    PullRange { start: u64, keys: usize },
}

const DIM: usize = 2;
/// The dense table's keys; with 3 shards its parts are [0, 1000), [1000, 2000), [2000, 3000).
const DENSE_KEYS: u64 = 3_000;

/// A workload over table 0 (dense) and table 1 (sparse) mixing every call, sized to cross shards.
fn workload(seed: u64, calls: usize) -> Vec<Call> {
    let mut rng = Rng(seed);
    let sparse_pool: Vec<u64> = (0..200).map(|_| rng.next_u64() % (u64::MAX - 1)).collect();
    let keys = |rng: &mut Rng, table: usize| -> Vec<u64> {
        let n = 1 + rng.below(40) as usize;
        (0..n)
            .map(|_| match table {
                0 => rng.below(DENSE_KEYS),
                _ => sparse_pool[rng.below(sparse_pool.len() as u64) as usize],
            })
            .collect()
    };
    (0..calls)
        .map(|_| {
            let table = rng.below(2) as usize;
            match rng.below(4) {
                0 => {
                    let keys = keys(&mut rng, table);
                    let grads = rng.values(keys.len() * DIM);
                    Call::Push { table, keys, grads }
                }
                1 => {
                    let n = 1 + rng.below(600);
                    let start = rng.below(DENSE_KEYS - n + 1);
                    Call::PushRange { start, grads: rng.values(n as usize * DIM) }
                }
                2 => Call::Pull { table, keys: keys(&mut rng, table) },
                _ => {
                    let n = 1 + rng.below(1_500);
                    Call::PullRange { start: rng.below(DENSE_KEYS - n + 1), keys: n as usize }
                }
            }
        })
        .collect()
}

impl Call {
    fn out_len(&self) -> usize {
        match self {
            Call::Pull { keys, .. } => keys.len() * DIM,
            Call::PullRange { keys, .. } => keys * DIM,
            _ => 0,
        }
    }

    fn issue<'a>(&self, client: &'a Client, tables: &[Table; 2], out: &'a mut [f32]) -> Ticket<'a> {
        let ticket = match self {
            Call::Push { table, keys, grads } => client.push(&tables[*table], keys, grads),
            Call::PushRange { start, grads } => client.push_range(&tables[0], *start, grads),
            Call::Pull { table, keys } => client.pull(&tables[*table], keys, out),
            Call::PullRange { start, .. } => client.pull_range(&tables[0], *start, out),
        };
        ticket.expect("every call of the workload is valid")
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Wait {
    /// Wait on each ticket as soon as it is issued.
    AtOnce,
    /// Issue `window` tickets, then wait on them in issue order.
    InOrder { window: usize },
    /// Issue `window` tickets, then wait on them newest first.
    Reversed { window: usize },
}

/// Runs `calls` on fresh tables; returns every pull's values and every call's stamp.
fn run(client: &Client, suffix: &str, calls: &[Call], wait: Wait) -> (Vec<Vec<f32>>, Vec<Stamp>) {
    let tables = [
        client.create_table(&dense(&format!("pipe-dense-{suffix}"), 0, DENSE_KEYS, DIM as u32)).unwrap(),
        client.create_table(&sparse(&format!("pipe-sparse-{suffix}"), DIM as u32)).unwrap(),
    ];
    let (window, reversed) = match wait {
        Wait::AtOnce => (1, false),
        Wait::InOrder { window } => (window, false),
        Wait::Reversed { window } => (window, true),
    };
    let mut outs: Vec<Vec<f32>> = calls.iter().map(|c| vec![f32::NAN; c.out_len()]).collect();
    let mut stamps = vec![Stamp::default(); calls.len()];
    {
        let mut flight: Vec<(usize, Ticket<'_>)> = Vec::with_capacity(window);
        for (i, (call, out)) in calls.iter().zip(outs.iter_mut()).enumerate() {
            client.set_clock(i as u64 / 8 + 1);
            flight.push((i, call.issue(client, &tables, out)));
            if flight.len() == window || i + 1 == calls.len() {
                if reversed {
                    flight.reverse();
                }
                for (i, ticket) in flight.drain(..) {
                    stamps[i] = ticket.wait().unwrap_or_else(|e| panic!("call {i} ({wait:?}) failed: {e}"));
                }
            }
        }
    }
    (outs, stamps)
}

/// What each pull of `calls` should return, applying pushes in issue order.
fn expected(calls: &[Call]) -> Vec<Vec<f32>> {
    let mut models = [Model::new(DIM), Model::new(DIM)];
    calls
        .iter()
        .map(|call| match call {
            Call::Push { table, keys, grads } => {
                models[*table].push(keys, grads);
                Vec::new()
            }
            Call::PushRange { start, grads } => {
                let keys: Vec<u64> = (*start..*start + (grads.len() / DIM) as u64).collect();
                models[0].push(&keys, grads);
                Vec::new()
            }
            Call::Pull { table, keys } => models[*table].get(keys.iter().copied()),
            Call::PullRange { start, keys } => models[0].get(*start..*start + *keys as u64),
        })
        .collect()
}

#[test]
fn pipelined_calls_match_waited_calls_bit_for_bit() {
    let server = server(3);
    pipelined_calls_match_waited_calls(&client(&server, 0));
}

/// The same on a cluster of chains of one (two servers of two shards): a pull's requests go out
/// with the call, and its ticket takes the values.
#[test]
fn pipelined_calls_match_waited_calls_bit_for_bit_on_chains_of_one() {
    let cluster = Cluster::start(2, 2, 1, 8);
    let client = cluster.client(0);
    // A pull's ticket comes back before its replies: its requests are in flight until waited on.
    let table = client.create_table(&dense("in-flight", 0, 100, 1)).unwrap();
    client.push_range(&table, 0, &[1.0; 100]).unwrap().wait().unwrap();
    let mut out = [f32::NAN; 100];
    let ticket = client.pull_range(&table, 0, &mut out).unwrap();
    assert!(client.in_flight() > 0, "the pull's requests are in flight when its ticket comes back");
    assert!(ticket.ready(Duration::from_secs(30)).unwrap());
    assert_eq!(client.in_flight(), 0);
    ticket.wait().unwrap();
    assert_eq!(out, [1.0; 100]);
    pipelined_calls_match_waited_calls(&client);
}

fn pipelined_calls_match_waited_calls(client: &Client) {
    let calls = workload(11, 400);
    let pulls = calls.iter().filter(|c| c.out_len() > 0).count();
    assert!(pulls > 100 && calls.len() - pulls > 100, "the workload mixes pushes and pulls");

    let (waited, waited_stamps) = run(client, "waited", &calls, Wait::AtOnce);
    let want = expected(&calls);
    for (i, (got, want)) in waited.iter().zip(&want).enumerate() {
        assert_eq!(bits(got), bits(want), "call {i} ({:?}) waited on at once", calls[i]);
    }
    let nonzero = waited.iter().flatten().filter(|v| **v != 0.0).count();
    assert!(nonzero > 10_000, "the pulls saw the pushes ({nonzero} non-zero values)");

    for wait in [Wait::InOrder { window: 64 }, Wait::Reversed { window: 64 }, Wait::Reversed { window: 400 }] {
        let suffix = format!("{wait:?}").replace([' ', '{', '}', ':'], "");
        let (got, stamps) = run(client, &suffix, &calls, wait);
        for (i, (got, want)) in got.iter().zip(&waited).enumerate() {
            assert_eq!(bits(got), bits(want), "call {i} ({:?}) with {wait:?}", calls[i]);
        }
        assert_eq!(stamps, waited_stamps, "stamps with {wait:?}");
    }
    // The last stamps reflect the clocks the calls were issued with.
    let last = waited_stamps.last().unwrap();
    assert!(last.get(0) >= 1 && last.clocks().len() <= 1, "one worker: {last:?}");
}

#[test]
fn dropped_tickets_do_not_disturb_later_calls() {
    let server = server(3);
    dropped_tickets_do_not_disturb(&client(&server, 0), 1);
}

#[test]
fn dropped_tickets_do_not_disturb_later_calls_on_chains_of_one() {
    let cluster = Cluster::start(2, 2, 1, 8);
    dropped_tickets_do_not_disturb(&cluster.client(0), 2);
}

/// Drops tickets of every kind on `client`, whose `servers` servers answer `status`.
fn dropped_tickets_do_not_disturb(client: &Client, servers: usize) {
    let table = client.create_table(&dense("drop", 0, 300, 1)).unwrap();
    let sparse_table = client.create_table(&sparse("drop-sparse", 1)).unwrap();

    // A dropped push was still sent: the server applies it.
    drop(client.push_range(&table, 0, &[1.0; 300]).unwrap());
    // A dropped pull never writes into its buffer, even though its reply arrives later.
    let mut never = vec![f32::NAN; 300];
    drop(client.pull_range(&table, 0, &mut never).unwrap());
    // A ticket dropped after a later wait parked its reply.
    let early = client.push_range(&table, 0, &[2.0; 300]).unwrap();
    let mut seen = vec![f32::NAN; 300];
    client.pull_range(&table, 0, &mut seen).unwrap().wait().unwrap();
    drop(early);
    assert_eq!(seen, vec![3.0; 300], "the pull saw both earlier pushes");
    // A push the table would refuse (NaN under Reject) is refused before anything is sent.
    assert!(matches!(client.push(&table, &[5, 6], &[f32::NAN, 1.0]), Err(tessera_client::ClientError::NonFinite { index: 0, .. })));
    // Many dropped tickets on every shard, of both kinds, interleaved.
    let mut bufs = vec![vec![0f32; 3]; 200];
    for (i, buf) in bufs.iter_mut().enumerate() {
        drop(client.push(&table, &[i as u64 % 300, 299 - i as u64 % 300], &[0.5, 0.5]).unwrap());
        drop(client.pull(&table, &[0, 150, 299], buf).unwrap());
        drop(client.push(&sparse_table, &[i as u64, u64::MAX - 2], &[1.0, 1.0]).unwrap());
    }
    assert!(bufs.iter().flatten().all(|v| *v == 0.0), "no dropped pull wrote anything");

    client.push_range(&table, 0, &[4.0; 300]).unwrap().wait().unwrap();
    let got = pull_range(client, &table, 0, 300);
    for (k, v) in got.iter().enumerate() {
        // 1 + 2 + 4, plus 0.5 per dropped key-list push that named key k (twice for i and 299 - i).
        let named = (0..200).filter(|i| *i == k || 299 - *i == k).count();
        assert_eq!(*v, 7.0 + 0.5 * named as f32, "key {k}");
    }
    assert_eq!(pull(client, &sparse_table, &[0, 199, 200, u64::MAX - 2]), [1.0, 1.0, 0.0, 200.0]);
    assert!(never.iter().all(|v| v.is_nan()), "the dropped pull's buffer was never written");
    let status = client.status().unwrap();
    assert_eq!(status.len(), servers, "the control plane still answers");
}

#[test]
fn stamps_carry_each_workers_clock_and_take_the_minimum_over_shards() {
    let server = server(3);
    let c0 = client(&server, 0);
    let c1 = client(&server, 1);
    // Shards own [0, 100), [100, 200), [200, 300).
    let table = c0.create_table(&dense("stamps", 0, 300, 1)).unwrap();
    // c1 connected before the table existed: looking it up asks the servers again.
    let t1 = c1.table("stamps").unwrap();
    assert_eq!(t1.spec(), table.spec());
    let full = |c: &Client, t: &Table| c.pull_range(t, 0, &mut [0.0; 300]).unwrap().wait().unwrap();
    let keys = |c: &Client, t: &Table, keys: &[u64]| c.pull(t, keys, &mut vec![0.0; keys.len()]).unwrap().wait().unwrap();

    assert_eq!(full(&c0, &table).clocks(), [0u64; 0], "nobody pushed yet");
    c0.set_clock(5);
    assert_eq!(c0.push_range(&table, 0, &[1.0; 300]).unwrap().wait().unwrap().clocks(), [5]);
    c1.set_clock(3);
    assert_eq!(c1.push_range(&t1, 0, &[1.0; 100]).unwrap().wait().unwrap().clocks(), [5, 3]);
    assert_eq!(full(&c0, &table).get(0), 5);
    assert_eq!(full(&c0, &table).get(1), 0, "worker 1 has not pushed shards 1 and 2");
    assert_eq!(c0.pull_range(&table, 0, &mut [0.0; 100]).unwrap().wait().unwrap().clocks(), [5, 3]);
    assert_eq!(keys(&c0, &table, &[50, 10]).clocks(), [5, 3]);
    assert_eq!(keys(&c0, &table, &[50, 150]).get(1), 0);

    c1.set_clock(4);
    assert_eq!(c1.push(&t1, &[250, 150], &[1.0, 1.0]).unwrap().wait().unwrap().clocks(), [5, 4]);
    assert_eq!(keys(&c0, &table, &[0, 150, 250]).clocks(), [5, 3], "the min over the shards touched");
    assert_eq!(full(&c0, &table).get(1), 0, "keys 100..150 of shard 1 are still at 0 for worker 1");
    c1.set_clock(6);
    assert_eq!(c1.push_range(&t1, 0, &[1.0; 300]).unwrap().wait().unwrap().clocks(), [5, 6]);
    assert_eq!(full(&c0, &table).clocks(), [5, 6]);
    c0.set_clock(9);
    assert_eq!(c0.push(&table, &[299], &[1.0]).unwrap().wait().unwrap().clocks(), [9, 6]);
    assert_eq!(full(&c1, &t1).clocks(), [5, 6]);
    c0.set_clock(2);
    assert_eq!(c0.push(&table, &[299], &[1.0]).unwrap().wait().unwrap().clocks(), [9, 6], "clocks never go back");

    // Over a sequence, both workers' stamps only grow and equal the slower worker's progress.
    let mut previous = full(&c0, &table);
    for round in 10..40u64 {
        c0.set_clock(round);
        c1.set_clock(round - 3);
        let a = c0.push_range(&table, 0, &[0.0; 300]).unwrap();
        let b = c1.push_range(&t1, 100 + round % 100, &[0.0; 100]).unwrap();
        assert_eq!(a.wait().unwrap().get(0), round, "a push's stamp has this worker's clock");
        assert_eq!(b.wait().unwrap().get(1), round - 3);
        let now = full(&c0, &table);
        for w in 0..2 {
            assert!(now.get(w) >= previous.get(w), "round {round}: stamp went back: {previous:?} -> {now:?}");
        }
        assert_eq!(now.get(0), round);
        assert_eq!(now.get(1), 6, "worker 1 pushed only part of the range since clock 6");
        assert_eq!(keys(&c1, &t1, &[100 + round % 100]).clocks(), [round, round - 3]);
        previous = now;
    }
    assert_eq!(pull(&c0, &table, &[299, 0]), [4.0, 3.0], "every push was applied, stale clocks too");
    assert_eq!(pull_range(&c0, &table, 150, 1), [3.0]);
}

#[test]
fn one_client_shared_by_threads_pipelining_at_once() {
    let server = server(3);
    shared_by_threads(&client(&server, 0));
}

#[test]
fn one_client_shared_by_threads_pipelining_at_once_on_chains_of_one() {
    let cluster = Cluster::start(2, 2, 1, 8);
    shared_by_threads(&cluster.client(0));
}

fn shared_by_threads(client: &Client) {
    let table = client.create_table(&dense("shared", 0, 3_000, 1)).unwrap();
    std::thread::scope(|s| {
        for thread in 0..2u64 {
            let (client, table) = (client, &table);
            s.spawn(move || {
                // Each thread owns every other block of 100 keys, so its pulls are deterministic
                // while the other thread's replies are parked and handed over between them.
                let blocks: Vec<u64> = (0..30).filter(|b| b % 2 == thread).collect();
                for round in 1..=10u32 {
                    let mut outs = vec![vec![f32::NAN; 100]; blocks.len()];
                    let mut flight = Vec::new();
                    for (block, out) in blocks.iter().zip(outs.iter_mut()) {
                        flight.push(client.push_range(table, block * 100, &[1.0; 100]).unwrap());
                        flight.push(client.pull_range(table, block * 100, out).unwrap());
                    }
                    for ticket in flight.into_iter().rev() {
                        ticket.wait().unwrap();
                    }
                    for (block, out) in blocks.iter().zip(&outs) {
                        assert!(out.iter().all(|v| *v == round as f32), "thread {thread} block {block} round {round}");
                    }
                }
            });
        }
    });
    assert_eq!(pull_range(client, &table, 0, 3_000), vec![10.0; 3_000]);
}

/// What `observer` sees of `table`'s first key within `within`, pulling again until it is
/// `want`.
fn seen_within(observer: &Client, table: &Table, want: f32, within: Duration) -> f32 {
    let began = std::time::Instant::now();
    loop {
        let seen = pull_range(observer, table, 0, 1)[0];
        if seen == want || began.elapsed() >= within {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_deferred_push_leaves_with_the_workers_next_wait_or_drop_and_at_once_when_turned_off() {
    let server = server(2);
    let observer = client(&server, 1);
    // Keys [0, 500) on shard 0, [500, 1000) on shard 1.
    let table = observer.create_table(&dense("deferred", 0, 1_000, 1)).unwrap();
    let (quiet, soon) = (Duration::from_millis(300), Duration::from_secs(10));

    // Deferred (the default): the push waits in the worker's client, which does nothing more.
    let worker = client(&server, 0);
    let pushed = worker.push_range(&table, 0, &[1.0; 500]).unwrap();
    assert_eq!(seen_within(&observer, &table, 1.0, quiet), 0.0, "a deferred push stays with its worker until it next waits");
    // A wait for a pull from the other shard (another connection) sends it first.
    assert_eq!(pull_range(&worker, &table, 500, 500), vec![0.0; 500]);
    assert_eq!(seen_within(&observer, &table, 1.0, soon), 1.0, "the worker's wait sent its push");
    pushed.wait().unwrap();

    // A client dropped with a push deferred sends it as it goes.
    drop(worker.push_range(&table, 0, &[1.0; 500]).unwrap());
    drop(worker);
    assert_eq!(seen_within(&observer, &table, 2.0, soon), 2.0, "the dropped client sent its push");

    // Turned off, a push leaves when `push_range` returns.
    let worker = common::client_with(&server, tessera_client::ClientConfig { defer_pushes: false, ..tessera_client::ClientConfig::worker(0) });
    let _pushed = worker.push_range(&table, 0, &[1.0; 500]).unwrap();
    assert_eq!(seen_within(&observer, &table, 3.0, soon), 3.0, "an undeferred push leaves at once");
    assert_eq!(pull_range(&observer, &table, 0, 500), vec![3.0; 500]);
}
