//! Replays a script of pushes through the Rust client and prints what the pulls read: the
//! reference the Python binding's tests compare against (`python/tests/test_client.py`
//! feeds both the same script and wants the same floats, bit for bit).
//!
//! ```sh
//! cargo run -p tessera-client --example replay -- script.json > pulls.json
//! ```
//!
//! The script: `{"servers": ["127.0.0.1:7070"], "worker": 0, "tables": [TableSpec, ..],
//! "ops": [{"clock": 1}, {"push": "t", "keys": [..], "values": [..]},
//! {"push_range": "d", "start": 0, "values": [..]}, ..],
//! "pulls": [{"table": "t", "keys": [..]}, {"table": "d", "start": 0, "count": 4}]}`.
//! Prints `{"pulls": [[f32, ..], ..]}`, one list per pull.

use std::collections::HashMap;

use serde::Deserialize;
use tessera_client::{Client, ClientConfig, Table};
use tessera_layout::TableSpec;

#[derive(Deserialize)]
struct Script {
    servers: Vec<String>,
    worker: u32,
    tables: Vec<TableSpec>,
    ops: Vec<Op>,
    pulls: Vec<Pull>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Op {
    Clock { clock: u64 },
    Push { push: String, keys: Vec<u64>, values: Vec<f32> },
    PushRange { push_range: String, start: u64, values: Vec<f32> },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Pull {
    Keys { table: String, keys: Vec<u64> },
    Range { table: String, start: u64, count: usize },
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: replay SCRIPT.json")?;
    let script: Script = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let servers: Vec<&str> = script.servers.iter().map(String::as_str).collect();
    let client = Client::connect(&servers, ClientConfig { kind: tessera_transport::TransportKind::Tcp, ..ClientConfig::worker(script.worker) })?;
    let mut tables: HashMap<String, Table> = HashMap::new();
    for spec in &script.tables {
        tables.insert(spec.name.clone(), client.create_table(spec)?);
    }
    for op in &script.ops {
        match op {
            Op::Clock { clock } => client.set_clock(*clock),
            Op::Push { push, keys, values } => client.push(&tables[push], keys, values)?.wait().map(drop)?,
            Op::PushRange { push_range, start, values } => client.push_range(&tables[push_range], *start, values)?.wait().map(drop)?,
        }
    }
    let mut pulled = Vec::new();
    for pull in &script.pulls {
        let values = match pull {
            Pull::Keys { table, keys } => {
                let mut out = vec![0f32; keys.len() * tables[table].dim()];
                client.pull(&tables[table], keys, &mut out)?.wait()?;
                out
            }
            Pull::Range { table, start, count } => {
                let mut out = vec![0f32; count * tables[table].dim()];
                client.pull_range(&tables[table], *start, &mut out)?.wait()?;
                out
            }
        };
        pulled.push(values);
    }
    println!("{}", serde_json::json!({ "pulls": pulled }));
    Ok(())
}
