//! Pushes and pulls through a real server on loopback: values come back exactly where and as
//! they were pushed, across shard boundaries, compressed or not, large or small, from one client
//! or two at once.

mod common;

use common::{bits, client, client_with, dense, pull, pull_range, server, sparse, Model, Rng};
use tessera_client::ClientConfig;

#[test]
fn dense_ranges_across_shard_boundaries_sum_exactly() {
    let server = server(3);
    let client = client(&server, 0);
    let (start, end, dim) = (1_000u64, 4_001u64, 3usize);
    let table = client.create_table(&dense("d", start, end, dim as u32)).unwrap();
    let mut model = Model::new(dim);
    let mut rng = Rng(1);
    // Ranges chosen to start and end inside different shards ([1000,2000), [2000,3000), [3000,4001)).
    for (at, n) in [(1_500u64, 2_000usize), (1_000, 3_001), (1_999, 2), (2_999, 1_002), (3_990, 11), (1_000, 1)] {
        let grads = rng.values(n * dim);
        client.push_range(&table, at, &grads).unwrap().wait().unwrap();
        model.push(&(at..at + n as u64).collect::<Vec<_>>(), &grads);
    }
    let all = pull_range(&client, &table, start, (end - start) as usize);
    assert_eq!(bits(&all), bits(&model.get(start..end)), "pull_range over every shard");
    let middle = pull_range(&client, &table, 1_990, 1_020);
    assert_eq!(bits(&middle), bits(&model.get(1_990..3_010)));

    // A key list in random order, with duplicates, spread over all shards.
    let mut keys: Vec<u64> = (0..300).map(|_| start + rng.below(end - start)).collect();
    keys.extend_from_slice(&[1_999, 2_000, 1_999, 4_000, 1_000, 4_000]);
    rng.shuffle(&mut keys);
    assert_eq!(bits(&pull(&client, &table, &keys)), bits(&model.get(keys.iter().copied())));

    // Key-list pushes into the dense table, with duplicates, land where they should.
    let grads = rng.values(keys.len() * dim);
    client.push(&table, &keys, &grads).unwrap().wait().unwrap();
    model.push(&keys, &grads);
    assert_eq!(bits(&pull_range(&client, &table, start, (end - start) as usize)), bits(&model.get(start..end)));
}

#[test]
fn sparse_keys_over_the_whole_space_sum_exactly() {
    let server = server(3);
    let client = client(&server, 0);
    let dim = 4;
    let table = client.create_table(&sparse("s", dim as u32)).unwrap();
    let mut model = Model::new(dim);
    let mut rng = Rng(2);
    let mut pool: Vec<u64> = (0..600).map(|_| rng.next_u64() % (u64::MAX - 1)).collect();
    pool.extend_from_slice(&[0, 1, u64::MAX - 2, u64::MAX / 3, u64::MAX / 3 * 2, u64::MAX - 1]);
    let thirds = [u64::MAX / 3, u64::MAX / 3 * 2];
    assert!(pool.iter().any(|k| *k < thirds[0]) && pool.iter().any(|k| *k > thirds[1]), "keys on every shard");
    for _ in 0..30 {
        let n = 1 + rng.below(80) as usize;
        let keys: Vec<u64> = (0..n).map(|_| pool[rng.below(pool.len() as u64) as usize]).collect();
        let grads = rng.values(n * dim);
        client.push(&table, &keys, &grads).unwrap().wait().unwrap();
        model.push(&keys, &grads);
    }
    // Every pooled key (pushed or not) plus never-pushed keys, shuffled and duplicated.
    let mut keys = pool.clone();
    keys.extend_from_slice(&pool[..50]);
    keys.extend((0..20).map(|_| rng.next_u64() % (u64::MAX - 1)));
    rng.shuffle(&mut keys);
    let got = pull(&client, &table, &keys);
    assert_eq!(bits(&got), bits(&model.get(keys.iter().copied())));
    assert!(model.values.len() > 300, "the test pushed many distinct keys");

    // A range pull that crosses a shard boundary of the sparse table reads untouched keys as zero.
    let at = thirds[0] - 3;
    let got = pull_range(&client, &table, at, 8);
    assert_eq!(bits(&got), bits(&model.get(at..at + 8)));
}

#[test]
fn compression_changes_bytes_not_results() {
    let server = server(2);
    let plain = client(&server, 0);
    let packed = client_with(&server, ClientConfig { compress: true, ..ClientConfig::worker(1) });
    let n = 1 << 16;
    let a = plain.create_table(&dense("plain", 0, n as u64, 1)).unwrap();
    let b = packed.create_table(&dense("packed", 0, n as u64, 1)).unwrap();
    let mut rng = Rng(3);

    // Zeros compress: the packed client sends and receives far fewer bytes for the same work.
    let zeros = vec![0f32; n];
    let (sent_a, recv_a) = plain.bytes();
    let (sent_b, recv_b) = packed.bytes();
    plain.push_range(&a, 0, &zeros).unwrap().wait().unwrap();
    packed.push_range(&b, 0, &zeros).unwrap().wait().unwrap();
    let out_a = pull_range(&plain, &a, 0, n);
    let out_b = pull_range(&packed, &b, 0, n);
    assert_eq!(bits(&out_a), bits(&out_b));
    let sent = (plain.bytes().0 - sent_a, packed.bytes().0 - sent_b);
    let recv = (plain.bytes().1 - recv_a, packed.bytes().1 - recv_b);
    assert!(sent.0 >= (n * 4) as u64, "the plain push carries every value: {sent:?}");
    assert!(sent.1 * 10 < sent.0, "compressed zeros are under a tenth: {sent:?}");
    assert!(recv.1 * 10 < recv.0, "compressed replies are under a tenth: {recv:?}");

    // Noisy values, compressible values and key lists: identical results either way.
    let noise = rng.values(n);
    let ramp: Vec<f32> = (0..n).map(|i| (i % 16) as f32).collect();
    for (client, table) in [(&plain, &a), (&packed, &b)] {
        client.push_range(table, 0, &noise).unwrap().wait().unwrap();
        client.push_range(table, 100, &ramp[100..]).unwrap().wait().unwrap();
        let keys: Vec<u64> = (0..2_000).map(|i| (i * 7_919) % n as u64).collect();
        client.push(table, &keys, &ramp[..2_000]).unwrap().wait().unwrap();
    }
    let (out_a, out_b) = (pull_range(&plain, &a, 0, n), pull_range(&packed, &b, 0, n));
    assert_eq!(bits(&out_a), bits(&out_b));
    let mut want = noise.clone();
    want[100..].iter_mut().zip(&ramp[100..]).for_each(|(w, g)| *w += g);
    for i in 0..2_000 {
        want[(i * 7_919) % n] += ramp[i];
    }
    assert_eq!(bits(&out_a), bits(&want), "the values are the pushed ones");
    let keys = [n as u64 - 1, 0, 7_919, 3];
    assert_eq!(bits(&pull(&plain, &a, &keys)), bits(&pull(&packed, &b, &keys)));
}

#[test]
fn four_mib_dense_round_trip_is_exact() {
    let server = server(2);
    let client = client(&server, 0);
    let n = (4 << 20) / 4;
    let table = client.create_table(&dense("big", 0, n as u64, 4)).unwrap();
    let mut rng = Rng(4);
    let grads = rng.values(n);
    client.push_range(&table, 0, &grads).unwrap().wait().unwrap();
    let got = pull_range(&client, &table, 0, n / 4);
    assert!(got == grads, "a 4 MiB range comes back exactly");
    // The same keys as one key-list pull, reversed.
    let keys: Vec<u64> = (0..n as u64 / 4).rev().collect();
    let got = pull(&client, &table, &keys);
    let want: Vec<f32> = grads.chunks_exact(4).rev().flatten().copied().collect();
    assert!(got == want, "a 4 MiB key-list pull lands every key at its position");
}

#[test]
fn two_clients_pushing_concurrently_sum_to_the_total() {
    let server = server(3);
    let setup = client(&server, 0);
    let dense_table = setup.create_table(&dense("cd", 0, 3_000, 2)).unwrap();
    let sparse_table = setup.create_table(&sparse("cs", 2)).unwrap();
    let rounds = 150u64;
    let sparse_keys = [5u64, u64::MAX / 2, u64::MAX - 2, 5, 1 << 62];
    std::thread::scope(|s| {
        for worker in 0..2u32 {
            let server = &server;
            let (dt, st) = (&dense_table, &sparse_table);
            s.spawn(move || {
                let c = client(server, worker);
                for round in 0..rounds {
                    c.set_clock(round + 1);
                    // Integer values: any interleaving gives the same exact sum.
                    let g = (worker as f32 + 1.0) * (round % 5) as f32;
                    let d = c.push_range(dt, 900, &vec![g; 2 * 1_300]).unwrap();
                    let sp = c.push(st, &sparse_keys, &[g; 10]).unwrap();
                    d.wait().unwrap();
                    sp.wait().unwrap();
                }
            });
        }
    });
    // Per worker: sum over rounds of (worker + 1) * (round % 5) = (worker + 1) * 300.
    let per_key = 300.0 + 600.0;
    let got = pull_range(&setup, &dense_table, 0, 3_000);
    for (k, v) in got.chunks_exact(2).enumerate() {
        let want = if (900..2_200).contains(&k) { per_key } else { 0.0 };
        assert_eq!(v, [want, want], "dense key {k}");
    }
    let got = pull(&setup, &sparse_table, &[5, u64::MAX / 2, u64::MAX - 2, 1 << 62, 6]);
    assert_eq!(got, [2.0 * per_key, 2.0 * per_key, per_key, per_key, per_key, per_key, per_key, per_key, 0.0, 0.0]);
    let stamp = setup.pull_range(&dense_table, 900, &mut vec![0.0; 2 * 1_300]).unwrap().wait().unwrap();
    assert_eq!(stamp.clocks(), [rounds, rounds], "both workers finished every round on every shard");
}
