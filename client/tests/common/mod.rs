//! Shared set-up for the client's integration tests: an in-process server on loopback, clients
//! connected to it, table specs, and a seeded generator so every run sees the same data.

#![allow(dead_code)] // Each test binary uses its own subset of these helpers.

use std::collections::BTreeMap;

use tessera_client::{Client, ClientConfig, Table};
use tessera_engine::{Server, ServerConfig, UpdaterRegistry};
use tessera_layout::{TableKind, TableSpec};

/// A server with `shards` unpinned shards on a free loopback port.
pub fn server(shards: u16) -> Server {
    let mut cfg = ServerConfig::single("127.0.0.1:0");
    cfg.engine.shards = shards;
    cfg.engine.pin_cores = false;
    Server::start(cfg, UpdaterRegistry::new()).expect("an in-process server starts on loopback")
}

/// An embedded coordinator and in-process servers on loopback, every range on a chain of
/// `replicas`. The servers stop before the coordinator.
pub struct Cluster {
    pub servers: Vec<Server>,
    pub coordinator: tessera_coordinator::CoordinatorHandle,
}

impl Cluster {
    /// `servers` servers of `shards` unpinned shards each, the tables cut into `ranges` ranges.
    pub fn start(servers: u32, shards: u16, replicas: u32, ranges: u32) -> Cluster {
        let rcfg = tessera_replication::config::ReplicationConfig { replicas, ranges, workers: 4, ..Default::default() };
        let transport = tessera_transport::TransportConfig::default();
        let store = Box::new(tessera_coordinator::Embedded);
        let coordinator =
            tessera_coordinator::CoordinatorHandle::start("127.0.0.1:0", rcfg, servers, &transport, store).expect("an embedded coordinator starts");
        let servers = (1..=servers)
            .map(|node| {
                let mut cfg = ServerConfig::single("127.0.0.1:0");
                cfg.engine.shards = shards;
                cfg.engine.pin_cores = false;
                let at = tessera_engine::chain::Locator::At(coordinator.local_addr().to_string());
                cfg.replication = Some(tessera_engine::server::Join { node, coordinator: at, advertise: None });
                Server::start(cfg, UpdaterRegistry::new()).expect("an in-process server joins the cluster")
            })
            .collect();
        Cluster { servers, coordinator }
    }

    /// A client of the cluster as worker `worker`, over TCP.
    pub fn client(&self, worker: u32) -> Client {
        let addrs: Vec<String> = self.servers.iter().map(|s| s.local_addr().to_string()).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let mut cfg = ClientConfig::worker(worker);
        cfg.kind = tessera_transport::TransportKind::Tcp;
        Client::connect(&refs, cfg).expect("the client connects to the cluster")
    }
}

/// A client of `server` as worker `worker`.
pub fn client(server: &Server, worker: u32) -> Client {
    client_with(server, ClientConfig::worker(worker))
}

pub fn client_with(server: &Server, cfg: ClientConfig) -> Client {
    let addr = server.local_addr().to_string();
    Client::connect(&[addr.as_str()], cfg).expect("the client connects to the in-process server")
}

/// A dense `sum` table over `[start, end)`.
pub fn dense(name: &str, start: u64, end: u64, dim: u32) -> TableSpec {
    TableSpec::new(name, TableKind::Dense, start, end, dim)
}

/// A sparse `sum` table over the whole key space, with a capacity small enough to map quickly.
pub fn sparse(name: &str, dim: u32) -> TableSpec {
    let mut spec = TableSpec::new(name, TableKind::Sparse, 0, u64::MAX, dim);
    spec.capacity = 20_000;
    spec
}

/// A small deterministic generator (splitmix64), so failures replay exactly.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A float with a non-trivial mantissa, so sums are sensitive to the order of addition.
    pub fn value(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 20) as f32 - 8.0
    }

    pub fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// The table's contents as the test expects them, applied in the order the server applies them:
/// pushes in issue order, keys of one push in list order.
#[derive(Debug, Default)]
pub struct Model {
    pub dim: usize,
    pub values: BTreeMap<u64, Vec<f32>>,
}

impl Model {
    pub fn new(dim: usize) -> Self {
        Self { dim, values: BTreeMap::new() }
    }

    pub fn push(&mut self, keys: &[u64], grads: &[f32]) {
        for (k, g) in keys.iter().zip(grads.chunks_exact(self.dim)) {
            let v = self.values.entry(*k).or_insert_with(|| vec![0.0; self.dim]);
            v.iter_mut().zip(g).for_each(|(v, g)| *v += g);
        }
    }

    pub fn get(&self, keys: impl IntoIterator<Item = u64>) -> Vec<f32> {
        let zero = vec![0.0; self.dim];
        keys.into_iter().flat_map(|k| self.values.get(&k).unwrap_or(&zero).clone()).collect()
    }
}

/// Pulls `keys` and waits.
pub fn pull(client: &Client, table: &Table, keys: &[u64]) -> Vec<f32> {
    let mut out = vec![f32::NAN; keys.len() * table.dim()];
    client.pull(table, keys, &mut out).unwrap().wait().unwrap();
    out
}

/// Pulls `keys` keys from `start` and waits.
pub fn pull_range(client: &Client, table: &Table, start: u64, keys: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; keys * table.dim()];
    client.pull_range(table, start, &mut out).unwrap().wait().unwrap();
    out
}
