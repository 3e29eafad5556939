//! The consistency models and task dependencies, each shown with what it guarantees: sequential
//! and `after` by what is still in flight when a call is sent, bounded delay with a deliberately
//! slow worker, by the values the fast workers pull.

mod common;

use std::time::{Duration, Instant};

use common::{client, client_with, dense, server, sparse, Cluster, Rng};
use tessera_client::{Client, ClientConfig, ClientError, Consistency, Table};

/// A dense table over `[0, 2000)` split over the server's two shards: a full-range call is two
/// requests, one per shard.
fn two_shard_table(client: &Client) -> Table {
    client.create_table(&dense("c", 0, 2_000, 1)).unwrap()
}

#[test]
fn sequential_calls_go_out_only_once_every_earlier_call_is_answered() {
    let server = server(2);
    let client = client(&server, 0);
    let table = two_shard_table(&client);
    let ones = vec![1.0f32; 2_000];

    // Eventual: the second call goes out with the first still unanswered.
    let a = client.push_range(&table, 0, &ones).unwrap();
    let b = client.push_range(&table, 0, &ones).unwrap();
    assert_eq!(client.in_flight(), 4, "eventual: both calls' requests in flight at once");
    a.wait().unwrap();
    b.wait().unwrap();

    // Sequential, set on the handle: the first call's replies are in before the second leaves.
    let seq = table.clone().with_consistency(Consistency::Sequential);
    let a = client.push_range(&seq, 0, &ones).unwrap();
    assert_eq!(client.in_flight(), 2);
    let b = client.push_range(&seq, 0, &ones).unwrap();
    assert_eq!(client.in_flight(), 2, "sequential: only the new call's two requests are in flight");
    let mut out = vec![0f32; 2_000];
    let c = client.pull_range(&seq, 0, &mut out).unwrap();
    assert_eq!(client.in_flight(), 2);
    // The earlier tickets keep their results: waiting on them now returns what the servers said.
    a.wait().unwrap();
    b.wait().unwrap();
    let stamp = c.wait().unwrap();
    assert!(out.iter().all(|&v| v == 4.0), "the pull follows all four pushes");
    assert_eq!(stamp.get(0), 0, "clock 0 throughout");

    // A call may ask for sequential on its own, whatever the handle says.
    let a = client.push_range(&table, 0, &ones).unwrap();
    let b = client.call().consistency(Consistency::Sequential).push_range(&table, 0, &ones).unwrap();
    assert_eq!(client.in_flight(), 2);
    a.wait().unwrap();
    b.wait().unwrap();
}

#[test]
fn after_waits_for_the_named_ticket_and_nothing_else() {
    let server = server(2);
    let client = client(&server, 0);
    let table = two_shard_table(&client);
    let ones = vec![1.0f32; 10];
    let on_shard_0 = client.push_range(&table, 0, &ones).unwrap();
    let on_shard_1 = client.push_range(&table, 1_500, &ones).unwrap();
    assert_eq!(client.in_flight(), 2);
    let mut out = vec![0f32; 10];
    let dependent = client.call().after(&on_shard_0).pull_range(&table, 1_500, &mut out).unwrap();
    // on_shard_0 was answered before the pull went out; on_shard_1 was not waited for.
    assert_eq!(client.in_flight(), 2, "on_shard_1 and the pull");
    on_shard_0.wait().unwrap();
    on_shard_1.wait().unwrap();
    dependent.wait().unwrap();
    assert_eq!(out, ones, "the pull went after the push to its shard, in order on that link");
    assert_eq!(client.in_flight(), 0);
}

/// On a cluster of chains of one, pulls are in flight as on a standalone server: a sequential
/// call and a call `after` a pull ticket go out only once the pull's replies are in.
#[test]
fn sequential_and_after_wait_for_pulls_in_flight_on_chains_of_one() {
    let cluster = Cluster::start(2, 2, 1, 8);
    let client = cluster.client(0);
    let table = two_shard_table(&client);
    let ones = vec![1.0f32; 2_000];
    let seq = table.clone().with_consistency(Consistency::Sequential);

    let mut before = vec![f32::NAN; 2_000];
    let pulled = client.pull_range(&table, 0, &mut before).unwrap();
    assert!(client.in_flight() > 0, "eventual: the pull is in flight");
    let pushed = client.push_range(&seq, 0, &ones).unwrap();
    assert!(pulled.ready(Duration::ZERO).unwrap(), "sequential: the pull's replies were in before the push left");
    pushed.wait().unwrap();
    pulled.wait().unwrap();
    assert!(before.iter().all(|&v| v == 0.0), "the pull went before the push");

    let mut first = vec![f32::NAN; 2_000];
    let pulled = client.pull_range(&table, 0, &mut first).unwrap();
    let mut second = vec![f32::NAN; 10];
    let dependent = client.call().after(&pulled).pull_range(&table, 1_500, &mut second).unwrap();
    assert!(pulled.ready(Duration::ZERO).unwrap(), "after: the named pull's replies were in first");
    assert!(client.in_flight() > 0, "the dependent pull itself is in flight");
    dependent.wait().unwrap();
    pulled.wait().unwrap();
    assert_eq!((first, second), (ones, vec![1.0; 10]));
    assert_eq!(client.in_flight(), 0);
}

/// Three workers, each iteration `t` = 1..=T: pull under `model` at clock `t`, then push 1.0 at
/// clock `t`. Worker 2 sleeps before each push. Returns, per fast worker, the lowest value each
/// of its pulls saw of the keys every worker pushes every time, with the clock it pulled at.
///
/// Dense: every worker pulls and pushes the whole table. Sparse: each pull and push is of key 7
/// (which every worker pushes every time) and 50 random keys over the whole key space, a
/// different set each time, as hashed features are.
fn slow_worker_run(model: Consistency, is_sparse: bool) -> Vec<Vec<(u64, f32)>> {
    const T: u64 = 10;
    const WORKERS: u32 = 3;
    let server = server(2);
    let setup = client(&server, 0);
    let table = if is_sparse { setup.create_table(&sparse("sp", 1)).unwrap() } else { two_shard_table(&setup) };
    let table = table.with_consistency(model);
    let cfg = |w| ClientConfig { workers: WORKERS, stale_timeout: Duration::from_secs(20), ..ClientConfig::worker(w) };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (server, table) = (&server, table.clone());
                scope.spawn(move || {
                    let client = client_with(server, cfg(w));
                    let mut rng = Rng(100 + u64::from(w));
                    let mut random_keys = || -> Vec<u64> { std::iter::once(7).chain((0..50).map(|_| rng.next_u64())).collect() };
                    let ones = vec![1.0f32; 2_000];
                    let mut out = vec![0f32; 2_000];
                    let mut seen = Vec::new();
                    for t in 1..=T {
                        client.set_clock(t);
                        let (stamp, lowest) = if is_sparse {
                            let keys = random_keys();
                            let stamp = client.pull(&table, &keys, &mut out[..keys.len()]).unwrap().wait().unwrap();
                            (stamp, out[0])
                        } else {
                            let stamp = client.pull_range(&table, 0, &mut out).unwrap().wait().unwrap();
                            (stamp, out.iter().copied().fold(f32::INFINITY, f32::min))
                        };
                        if let Some(need) = model.pull_needs(t) {
                            assert!(stamp.min_over(WORKERS as usize) >= need, "worker {w} at {t}: stamp {stamp:?}");
                        }
                        seen.push((t, lowest));
                        if w == 2 {
                            std::thread::sleep(Duration::from_millis(40));
                        }
                        if is_sparse {
                            let keys = random_keys();
                            client.push(&table, &keys, &ones[..keys.len()]).unwrap().wait().unwrap();
                        } else {
                            client.push_range(&table, 0, &ones).unwrap().wait().unwrap();
                        }
                    }
                    seen
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).take(2).collect()
    })
}

#[test]
fn bounded_delay_holds_fast_workers_within_tau_of_a_slow_one() {
    check_bounded_delay(false);
}

#[test]
fn bounded_delay_holds_on_sparse_keys_that_change_every_iteration() {
    // Each push completes the worker's clock on every part of the table (flags::PART_DONE), so
    // a pull of keys that worker never pushed still sees how far it got.
    check_bounded_delay(true);
}

fn check_bounded_delay(is_sparse: bool) {
    let tau = 1;
    for (w, seen) in slow_worker_run(Consistency::BoundedDelay(tau), is_sparse).iter().enumerate() {
        for &(t, lowest) in seen {
            // Every worker's pushes at clocks 1 ..= t - tau - 1 are in: 3 per clock on every key.
            let need = t.saturating_sub(tau + 1);
            assert!(lowest >= 3.0 * need as f32, "worker {w} at clock {t} pulled {lowest}, below {}", 3 * need);
        }
    }
}

#[test]
fn eventual_lets_fast_workers_run_ahead_of_a_slow_one() {
    // The same run without the bound: the fast workers finish while the slow one is far behind,
    // so their last pulls miss pushes that bounded delay would have waited for. (The slow worker
    // needs 400 ms for its ten pushes; the fast ones' ten iterations take a few milliseconds.)
    let runs = slow_worker_run(Consistency::Eventual, false);
    let behind = runs.iter().map(|seen| seen.last().unwrap()).filter(|&&(t, lowest)| lowest < 3.0 * (t - 2) as f32).count();
    assert!(behind > 0, "no fast worker ran ahead: {runs:?}");
}

#[test]
fn a_bounded_delay_pull_names_the_worker_it_waited_for() {
    let server = server(2);
    let cfg = ClientConfig { workers: 2, stale_timeout: Duration::from_millis(300), ..ClientConfig::worker(0) };
    let client = client_with(&server, cfg);
    let table = two_shard_table(&client).with_consistency(Consistency::BoundedDelay(0));
    let ones = vec![1.0f32; 2_000];
    for t in 1..=3 {
        client.set_clock(t);
        client.push_range(&table, 0, &ones).unwrap().wait().unwrap();
    }
    // Worker 1 never pushed: a pull at clock 3 with τ = 0 needs it at clock 2.
    let mut out = vec![0f32; 2_000];
    let started = Instant::now();
    let err = client.pull_range(&table, 0, &mut out).map(|_| ()).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300));
    match &err {
        ClientError::Stale { need: 2, worker: 1, clock: 0, .. } => {}
        other => panic!("expected a Stale error naming worker 1, got {other:?}"),
    }
    assert!(err.to_string().contains("worker 1 is still at 0"), "{err}");
    // The same pull under eventual consistency returns what there is.
    let call = client.call().consistency(Consistency::Eventual);
    call.pull_range(&table, 0, &mut out).unwrap().wait().unwrap();
    assert!(out.iter().all(|&v| v == 3.0));

    // Without the job's worker count a bounded-delay pull is refused, not left to wait forever.
    let blind = client_with(&server, ClientConfig::worker(3));
    blind.set_clock(5);
    let err = blind.pull_range(&table, 0, &mut out).map(|_| ()).unwrap_err();
    assert!(matches!(err, ClientError::Config { .. }), "{err}");
    assert_eq!("bounded:2".parse::<Consistency>(), Ok(Consistency::BoundedDelay(2)));
    assert!("bounded".parse::<Consistency>().is_err());
}
