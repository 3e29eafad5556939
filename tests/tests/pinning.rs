//! Pinned shards of servers that share one process take different cores: each server's shards
//! start where `first_core` says (a `tessera demo --servers --pin` cluster sets it per server),
//! instead of every server's shard 0 landing on the first core.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tessera_engine::{Server, ServerConfig, UpdaterRegistry};

/// The cores the threads named `name` may run on, read from `/proc/self/task`.
fn cores_of_threads(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else { continue };
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("a Cpus_allowed_list line");
        found.push(allowed.trim().to_string());
    }
    found
}

#[test]
fn servers_in_one_process_pin_their_shards_to_different_cores() {
    let allowed = std::thread::available_parallelism().map_or(1, usize::from);
    if allowed < 2 {
        eprintln!("one core: nothing to spread");
        return;
    }
    let start = |first_core: usize| {
        let mut cfg = ServerConfig::single("127.0.0.1:0");
        (cfg.engine.shards, cfg.engine.pin_cores, cfg.engine.first_core) = (1, true, first_core);
        Server::start(cfg, UpdaterRegistry::new()).unwrap()
    };
    let servers = [start(0), start(1)];
    // A shard thread names and pins itself once it runs, which may be after `start` returns.
    let pinned = |cores: &Vec<String>| cores.len() == 2 && cores.iter().all(|c| !c.contains([',', '-']));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut cores = cores_of_threads("tessera-shard-0");
    while !pinned(&cores) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        cores = cores_of_threads("tessera-shard-0");
    }
    assert_eq!(cores.len(), 2, "two shard threads named tessera-shard-0: {cores:?}");
    for listed in &cores {
        assert!(!listed.contains([',', '-']), "each shard is pinned to one core: {cores:?}");
    }
    let distinct: BTreeSet<&String> = cores.iter().collect();
    assert_eq!(distinct.len(), 2, "the two servers' shards share a core: {cores:?}");
    drop(servers);
}
