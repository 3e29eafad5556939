//! Push filters through a real server: what each sends, what it holds back, and that the
//! significantly-modified filter loses nothing once flushed.

mod common;

use common::{bits, client, pull, server, sparse, Model, Rng};
use tessera_client::filter::{Kkt, RandomSkip, SignificantlyModified};
use tessera_client::Filter;

/// Gradients on a 1/64 grid, small enough that sums of a few hundred stay exact in f32.
fn grid_values(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.below(129) as f32 - 64.0) / 64.0).collect()
}

#[test]
fn significantly_modified_holds_small_changes_back_and_loses_none_of_them() {
    let server = server(2);
    let client = client(&server, 0);
    let (dim, keys_n) = (2usize, 500u64);
    let table = client.create_table(&sparse("s", dim as u32)).unwrap();
    let mut filter = SignificantlyModified::new(2.0);
    let mut model = Model::new(dim);
    let mut rng = Rng(7);
    let keys: Vec<u64> = (0..keys_n).map(|k| k * 1_000_003).collect();
    let (sent_before, _) = client.bytes();
    for _ in 0..20 {
        let grads = grid_values(&mut rng, keys.len() * dim);
        model.push(&keys, &grads);
        client.push_filtered(&table, &keys, &grads, &mut filter).unwrap().wait().unwrap();
    }
    let (filtered_bytes, _) = client.bytes();
    let filtered_bytes = filtered_bytes - sent_before;
    assert!(filter.held() > 0, "some keys' changes are still held back");
    let partial = pull(&client, &table, &keys);
    assert_ne!(bits(&partial), bits(&model.get(keys.iter().copied())), "held-back changes are not on the server yet");

    let (mut rest_keys, mut rest_grads) = (Vec::new(), Vec::new());
    filter.flush(&mut rest_keys, &mut rest_grads);
    assert_eq!(filter.held(), 0);
    client.push(&table, &rest_keys, &rest_grads).unwrap().wait().unwrap();
    assert_eq!(bits(&pull(&client, &table, &keys)), bits(&model.get(keys.iter().copied())), "after the flush the server holds every change");
    // 20 pushes of 500 keys unfiltered carry 20 x 500 x (8 + 8) bytes of keys and values.
    assert!(filtered_bytes < 20 * 500 * 16 / 2, "the filter sent {filtered_bytes} bytes");
}

#[test]
fn random_skip_sends_about_the_asked_share_scaled_up() {
    let server = server(1);
    let client = client(&server, 0);
    let table = client.create_table(&sparse("r", 1)).unwrap();
    let keys: Vec<u64> = (0..10_000).collect();
    let grads = vec![1.0f32; keys.len()];
    let mut filter = RandomSkip::new(0.75, 42);
    client.push_filtered(&table, &keys, &grads, &mut filter).unwrap().wait().unwrap();
    let values = pull(&client, &table, &keys);
    let sent = values.iter().filter(|&&v| v != 0.0).count();
    // Binomial(10000, 0.25): mean 2500, sd about 43.
    assert!((2_300..2_700).contains(&sent), "{sent} of 10000 keys sent at skip 0.75");
    assert!(values.iter().all(|&v| v == 0.0 || v == 4.0), "sent gradients are scaled by 1 / (1 - 0.75)");
}

#[test]
fn kkt_drops_zero_weights_whose_gradient_is_within_lambda() {
    let server = server(1);
    let client = client(&server, 0);
    let table = client.create_table(&sparse("k", 1)).unwrap();
    let mut kkt = Kkt::new(0.5);
    // Key 3 holds a weight, which the worker has pulled; keys 1 and 2 are at zero.
    client.push(&table, &[3], &[1.0]).unwrap().wait().unwrap();
    let keys = [1u64, 2, 3];
    kkt.observe(1, &keys, &pull(&client, &table, &keys));
    // Key 1: zero weight, gradient within lambda: dropped. Key 2: beyond lambda: sent. Key 3:
    // non-zero weight: sent whatever its gradient.
    client.push_filtered(&table, &keys, &[0.25, -0.75, 0.25], &mut kkt).unwrap().wait().unwrap();
    assert_eq!(pull(&client, &table, &keys), vec![0.0, -0.75, 1.25]);
}

/// A user's own filter: sends even keys only.
struct EvenKeys;

impl Filter for EvenKeys {
    fn filter(&mut self, dim: usize, keys: &[u64], grads: &[f32], keep_keys: &mut Vec<u64>, keep_grads: &mut Vec<f32>) {
        for (&k, g) in keys.iter().zip(grads.chunks_exact(dim)) {
            if k % 2 == 0 {
                keep_keys.push(k);
                keep_grads.extend_from_slice(g);
            }
        }
    }
}

/// A broken filter: keeps a key without its values.
struct Broken;

impl Filter for Broken {
    fn filter(&mut self, _: usize, keys: &[u64], _: &[f32], keep_keys: &mut Vec<u64>, _: &mut Vec<f32>) {
        keep_keys.extend_from_slice(keys);
    }
}

#[test]
fn user_filters_plug_in_and_broken_ones_are_refused() {
    let server = server(1);
    let client = client(&server, 0);
    let table = client.create_table(&sparse("u", 1)).unwrap();
    let keys = [1u64, 2, 3, 4];
    client.push_filtered(&table, &keys, &[1.0, 2.0, 3.0, 4.0], &mut EvenKeys).unwrap().wait().unwrap();
    assert_eq!(pull(&client, &table, &keys), vec![0.0, 2.0, 0.0, 4.0]);
    // A filter that keeps nothing sends nothing.
    client.push_filtered(&table, &[1, 3], &[1.0, 1.0], &mut EvenKeys).unwrap().wait().unwrap();
    assert_eq!(client.in_flight(), 0);
    let err = client.push_filtered(&table, &keys, &[1.0; 4], &mut Broken).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("kept 4 keys but 0 values"), "{err}");
    assert_eq!(pull(&client, &table, &keys), vec![0.0, 2.0, 0.0, 4.0], "nothing changed");
}
