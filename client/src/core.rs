//! The client's state behind its lock: its links to the cluster (a standalone server is a
//! cluster of one), the tables it knows, and its clock.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tessera_layout::catalog::{Catalog, TableEntry, TableSpec};
use tessera_layout::placement::Route;
use tessera_transport::{Op, Status, TransportError};

use crate::chain::{Chain, ChainTable, ViewFrom};
use crate::error::{ClientError, Result};
use crate::ticket::{Pushed, Stamp, Ticket};
use crate::{Client, ClientConfig, Table};

/// The keys a push or pull names: listed keys (with whether a push completes the worker's
/// clock on every range, under bounded delay), or a dense range from `start`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Named<'k> {
    Keys { keys: &'k [u64], ranges_done: bool },
    Range { start: u64 },
}

/// Asks `addrs` for their cluster: the first view one of them gives, or `None` when none
/// answers (down, or too busy to take a connection: the chain's connection tries again, and
/// reports why). A server that does not know the request is refused at once.
fn ask_cluster(addrs: &[&str], cfg: &ClientConfig) -> Result<Option<ViewFrom>> {
    for addr in addrs {
        match tessera_transport::ask(addr, Op::ClusterConfig, &[], &cfg.transport) {
            Ok(view) => return Ok(Some(ViewFrom { addr: addr.to_string(), view })),
            Err(TransportError::Refused { status: Status::BadRequest, reason: message }) => {
                let reason = format!("it does not answer ClusterConfig ({message}): it runs a Tessera older than this client");
                return Err(ClientError::Protocol { server: addr.to_string(), reason });
            }
            Err(_) => continue,
        }
    }
    Ok(None)
}

#[derive(Debug)]
pub(crate) struct Core {
    cfg: ClientConfig,
    pub clock: u64,
    /// The chain's count of cluster changes when the tables were last read: a [`Table`] read
    /// under an older one is routed by name again.
    generation: u64,
    /// Routes of tables looked up again since the servers turned out to be another cluster,
    /// by name.
    remapped: HashMap<String, Arc<Route>>,
    chain: Chain,
    /// The cluster's tables, by name.
    tables: HashMap<String, TableEntry>,
}

impl Core {
    pub fn connect(addrs: &[&str], cfg: ClientConfig) -> Result<Core> {
        let chosen = tessera_transport::select::choose(cfg.kind, &cfg.rdma)?;
        let known = ask_cluster(addrs, &cfg)?;
        let (chain, catalog) = Chain::connect(addrs, &cfg, chosen, known)?;
        Ok(Core { cfg, clock: 0, generation: 0, remapped: HashMap::new(), chain, tables: by_name(catalog) })
    }

    /// The cluster's links.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Bytes sent and received, frames included.
    pub fn bytes(&self) -> (u64, u64) {
        (self.chain.stats.bytes_sent, self.chain.stats.bytes_received)
    }

    /// Fetches every server's catalog; the first one's tables are the ones calls route by.
    pub fn refresh(&mut self) -> Result<Vec<Vec<TableEntry>>> {
        let mut catalogs = Vec::new();
        for (server, body) in self.chain.ask_members(Op::Catalog, &[])? {
            let catalog: Catalog = serde_json::from_slice(&body).map_err(|e| ClientError::Protocol { server, reason: format!("bad catalog: {e}") })?;
            catalogs.push(catalog.tables);
        }
        if let Some(first) = catalogs.first() {
            self.tables = by_name(Catalog { tables: first.clone() });
        }
        Ok(catalogs)
    }

    pub fn create_table(&mut self, spec: &TableSpec) -> Result<()> {
        let body = serde_json::to_vec(spec).expect("a table spec serialises");
        self.chain.ask_everyone(Op::CreateTable, &body)?;
        self.refresh().map(|_| ())
    }

    /// Every server's status report, each with its server's address added as `addr`.
    pub fn status(&mut self) -> Result<Vec<serde_json::Value>> {
        let named = |(addr, mut report): (String, serde_json::Value)| {
            if let Some(fields) = report.as_object_mut() {
                fields.insert("addr".into(), addr.into());
            }
            report
        };
        Ok(self.ask_all(Op::Status)?.into_iter().map(named).collect())
    }

    /// Has every server checkpoint every shard now; what each shard wrote, per server.
    pub fn checkpoint(&mut self) -> Result<Vec<(String, serde_json::Value)>> {
        self.ask_all(Op::Checkpoint)
    }

    /// Sends `op` with no body to every member's control plane; each server's address and JSON
    /// reply.
    fn ask_all(&mut self, op: Op) -> Result<Vec<(String, serde_json::Value)>> {
        let parse = |(addr, body): (String, Vec<u8>)| match serde_json::from_slice(&body) {
            Ok(reply) => Ok((addr, reply)),
            Err(e) => Err(ClientError::Protocol { server: addr, reason: format!("bad {op:?} reply: {e}") }),
        };
        self.chain.ask_members(op, &[])?.into_iter().map(parse).collect()
    }

    /// The table's route; a table this client has not seen yet (created by another client) is
    /// looked up again on the servers.
    pub fn table(&mut self, name: &str) -> Result<Table> {
        if !self.tables.contains_key(name) {
            self.refresh()?;
        }
        let entry = self.tables.get(name).ok_or_else(|| tessera_layout::LayoutError::UnknownTable { name: name.into() })?;
        Ok(Table { route: Arc::new(Route { spec: entry.spec.clone(), id: entry.id }), consistency: None, generation: self.generation })
    }

    pub(crate) fn check_len(table: &Table, what: &'static str, keys: usize, got: usize) -> Result<()> {
        let want = keys * table.dim();
        if got != want {
            let name = table.spec().name.clone();
            return Err(ClientError::Length { what, table: name, keys, dim: table.dim(), got, want });
        }
        Ok(())
    }

    /// A push (with `grads`) or a pull (into `out`) of the keys `named`. A push is sent to the
    /// ranges' heads and its ticket waits for their acknowledgements; a pull's requests go to
    /// the tails (or are read one-sided), and its ticket takes the replies.
    pub fn call<'a>(&mut self, client: &'a Client, table: &Table, named: Named<'_>, grads: Option<&[f32]>, out: Option<&'a mut [f32]>) -> Result<Ticket<'a>> {
        let (what, values) = match (grads, &out) {
            (Some(g), _) => ("the gradient", g.len()),
            (None, o) => ("the output", o.as_ref().map_or(0, |o| o.len())),
        };
        let keys = match named {
            Named::Keys { keys, .. } => keys.len(),
            Named::Range { .. } => values / table.dim(),
        };
        Self::check_len(table, what, keys, values)?;
        self.check_finite(table, grads)?;
        let fresh = self.current(table)?;
        let table: &Table = &fresh;
        let clock = self.clock;
        let chain = &mut self.chain;
        let t = ChainTable::of(table.route());
        match (grads, out, named) {
            (Some(g), _, Named::Keys { keys, ranges_done }) => chain.push_keys(t, keys, g, clock, ranges_done).map(|n| Ticket::pushed(client, n, clock)),
            (Some(g), _, Named::Range { start }) => chain.push_range(t, start, g, clock).map(|n| Ticket::pushed(client, n, clock)),
            (None, Some(o), Named::Keys { keys, .. }) => Ok(Ticket::pulling(client, chain.start_pull_keys(table.route(), keys, o)?, o)),
            (None, Some(o), Named::Range { start }) => Ok(Ticket::pulling(client, chain.start_pull_range(table.route(), start, o)?, o)),
            (None, None, _) => unreachable!("a pull has an output"),
        }
    }

    /// `table` as the cluster numbers it now: a handle read before the servers turned out to be
    /// another cluster (a standalone server restarted without its data) is routed as the
    /// table of the same name in the catalog read since.
    fn current<'t>(&mut self, table: &'t Table) -> Result<Cow<'t, Table>> {
        let generation = self.chain.generation;
        if generation != self.generation {
            self.generation = generation;
            self.remapped.clear();
            self.refresh()?;
        }
        if table.generation == self.generation {
            return Ok(Cow::Borrowed(table));
        }
        let name = &table.spec().name;
        let route = match self.remapped.get(name) {
            Some(route) => route.clone(),
            None => {
                let entry = self.tables.get(name).ok_or_else(|| tessera_layout::LayoutError::UnknownTable { name: name.clone() })?;
                if entry.spec != *table.spec() {
                    let reason = format!("table {name:?} has another definition since the servers restarted: look it up again");
                    return Err(ClientError::Config { reason });
                }
                let route = Arc::new(Route { spec: entry.spec.clone(), id: entry.id });
                self.remapped.insert(name.clone(), route.clone());
                route
            }
        };
        Ok(Cow::Owned(Table { route, consistency: table.consistency, generation: self.generation }))
    }

    /// Refuses, before anything is sent, a gradient with NaN or Inf for a table that rejects
    /// them: ranges would refuse their pieces one by one, and the others would apply theirs.
    fn check_finite(&self, table: &Table, grads: Option<&[f32]>) -> Result<()> {
        let Some(g) = grads else { return Ok(()) };
        if table.spec().non_finite != tessera_layout::NonFinite::Reject {
            return Ok(());
        }
        match tessera_layout::catalog::first_non_finite(g) {
            None => Ok(()),
            Some(index) => Err(ClientError::NonFinite { table: table.spec().name.clone(), index, value: g[index] }),
        }
    }

    /// One ping (`Op::Ping`) to the cluster: the transport's round trip, with no table touched.
    pub fn ping(&mut self) -> Result<()> {
        self.chain.ping()
    }

    /// Block copies the links found torn and read again.
    pub fn torn_reads(&self) -> u64 {
        self.chain.torn_reads()
    }

    /// Waits until every push sent so far is acknowledged and every pull answered.
    pub fn settle_all(&mut self) -> Result<()> {
        self.chain.settle(None).map(|_| ())
    }

    /// Whether push number `push`, and every one before it, is acknowledged, waiting until
    /// `deadline` (none: until it is, or fails); for its ticket, which hears if it was refused.
    pub fn push_settled(&mut self, push: u64, deadline: Option<Instant>) -> Result<bool> {
        self.chain.settle_through(push, deadline)
    }

    /// Waits until push number `push`, and every one before it, is answered, for a call that
    /// must follow it: a refused push's error is its ticket's, not this call's.
    pub fn push_answered(&mut self, push: u64) -> Result<()> {
        self.chain.answered_through(push, None).map(|_| ())
    }

    /// Whether pull number `pull` has all its replies in, taking replies until `deadline`.
    pub fn pull_arrived(&mut self, pull: u64, deadline: Instant) -> bool {
        self.chain.pull_arrived(pull, deadline)
    }

    /// Waits for pull number `pull` and writes its values into `out` (see
    /// [`Chain::finish_pull`]).
    pub fn finish_pull(&mut self, pull: u64, out: &mut [f32]) -> Result<Stamp> {
        self.chain.finish_pull(pull, out)
    }

    /// Lets pull number `pull` go: nothing is written.
    pub fn abandon_pull(&mut self, pull: u64) {
        self.chain.abandon_pull(pull);
    }

    /// The stamp of an acknowledged push: the one its heads gave it (see
    /// [`Chain::push_stamp`]), or, when a head's answer did not carry one or it is long gone,
    /// what the acknowledgement vouches for by itself: its keys reached the clock this worker
    /// sent it at.
    pub fn push_stamp(&mut self, pushed: Pushed) -> Stamp {
        let given = self.chain.push_stamp(pushed.push);
        given.unwrap_or_else(|| Stamp::own(self.cfg.worker as usize, pushed.clock))
    }

    /// Pushes not yet acknowledged, and pull requests not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.chain.unacked()
    }

    pub fn transport(&self) -> &'static str {
        self.chain.transport()
    }
}

/// The tables of `catalog`, by name.
fn by_name(catalog: Catalog) -> HashMap<String, TableEntry> {
    catalog.tables.into_iter().map(|t| (t.spec.name.clone(), t)).collect()
}
