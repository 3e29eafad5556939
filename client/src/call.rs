//! Consistency models and task dependencies (Li et al., OSDI'14, section 3.3 "Flexible
//! Consistency", and 3.2's tasks that depend on earlier ones).
//!
//! A [`Call`] is one push or pull with its ordering: the [`Consistency`] model (from the call,
//! else the table handle, else the client's configuration) and the tickets it must come after.
//! `client.push(..)` is `client.call().push(..)`.
//!
//! - **Eventual**: the call is sent at once, whatever is in flight.
//! - **Sequential**: the call is sent only once every earlier call of this client has been
//!   answered by its servers.
//! - **Bounded delay τ**: a pull by a worker at clock `t` returns only once every worker's pushes
//!   up to clock `t - τ - 1` have been applied to every key it pulls. The servers' range vector
//!   clocks decide it: the pull is repeated, with a growing pause, until the stamp its keys carry
//!   reaches that clock for each of the job's [`ClientConfig::workers`](crate::ClientConfig)
//!   workers. There is no barrier process. Pushes never wait. On a sparse table, whose keys
//!   change from push to push, a key-list push under bounded delay raises the worker's clock
//!   over every part of the table (`flags::PART_DONE`, with an empty push to parts it has no
//!   keys for), so it completes the worker's clock there.
//!
//! Clocks count iterations from 1: a push at clock `c` raises the worker's entry in the pushed
//! keys' vector clocks to `c`, and a clock of 0 means "has not pushed".

use std::time::{Duration, Instant};

use crate::core::Named;
use crate::error::{ClientError, Result};
use crate::filter::Filter;
use crate::ticket::{Called, Pushed, Stamp, Ticket};
use crate::{Client, PushBuffer, Table};

/// How a call orders itself against other calls. See the [module](self) documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Consistency {
    /// Nothing waits: calls are pipelined (the default).
    #[default]
    Eventual,
    /// Each call waits until every earlier call of the same client has been answered.
    Sequential,
    /// A pull at clock `t` waits until all workers' pushes up to `t - τ - 1` are in its keys.
    /// `BoundedDelay(0)` lets no worker run ahead of another.
    BoundedDelay(u64),
}

impl Consistency {
    /// The clock every worker must have reached on the keys a pull at `clock` reads; `None`
    /// when the pull need not wait.
    pub fn pull_needs(self, clock: u64) -> Option<u64> {
        match self {
            Consistency::BoundedDelay(tau) => Some(clock.saturating_sub(tau.saturating_add(1))).filter(|&c| c > 0),
            _ => None,
        }
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;

    /// `eventual`, `sequential`, or `bounded:N` (bounded delay τ = N).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "eventual" => Ok(Consistency::Eventual),
            "sequential" => Ok(Consistency::Sequential),
            _ => match s.strip_prefix("bounded:").map(str::parse) {
                Some(Ok(tau)) => Ok(Consistency::BoundedDelay(tau)),
                _ => Err(format!("{s:?} is not a consistency model: use eventual, sequential, or bounded:N (τ = N)")),
            },
        }
    }
}

/// The longest pause between two tries of a bounded-delay pull.
const STALE_PAUSE_MAX: Duration = Duration::from_millis(5);
/// The first pause between two tries of a bounded-delay pull.
const STALE_PAUSE_MIN: Duration = Duration::from_micros(50);

/// One push or pull, with the consistency it runs under and the calls it must follow. Build it
/// with [`Client::call`], then send it with one of the four operations.
///
/// ```no_run
/// # use tessera_client::{Client, Consistency, Table};
/// # fn f(client: &Client, table: &Table, keys: &[u64], grads: &[f32], out: &mut [f32]) -> tessera_client::Result<()> {
/// let pushed = client.push(table, keys, grads)?;
/// // Sent only once `pushed` has been answered by every shard it went to.
/// let pulled = client.call().after(&pushed).pull(table, keys, out)?;
/// pushed.wait()?;
/// pulled.wait()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a call does nothing until push, pull, push_range or pull_range sends it"]
pub struct Call<'c> {
    client: &'c Client,
    consistency: Option<Consistency>,
    /// It follows pushes: it waits for the acknowledgement of the latest of them (and so of
    /// every one before it).
    after_pushes: Option<u64>,
    /// Pulls it follows: it waits for their replies.
    after_pulls: Vec<u64>,
}

impl<'c> Call<'c> {
    pub(crate) fn new(client: &'c Client) -> Self {
        Self { client, consistency: None, after_pushes: None, after_pulls: Vec::new() }
    }

    /// Runs this call under `model`, whatever the table handle or the client say.
    pub fn consistency(mut self, model: Consistency) -> Self {
        self.consistency = Some(model);
        self
    }

    /// Sends this call only once `ticket`'s call is answered (a push acknowledged, a pull's
    /// replies in). The ticket keeps its result: waiting on it afterwards returns at once.
    pub fn after(mut self, ticket: &Ticket<'_>) -> Self {
        match ticket.call {
            Called::Push(pushed) => self.after_pushes = self.after_pushes.max(Some(pushed.push)),
            Called::Pull(pull) => self.after_pulls.push(pull),
            Called::Answered(_) => {}
        }
        self
    }

    /// [`Client::push`] under this call's ordering.
    pub fn push(self, table: &Table, keys: &[u64], grads: &[f32]) -> Result<Ticket<'c>> {
        let client = self.client;
        let ranges_done = self.completes_ranges(table);
        self.ready(table)?.call(client, table, Named::Keys { keys, ranges_done }, Some(grads), None)
    }

    /// [`Client::push_filtered`] under this call's ordering.
    pub fn push_filtered(self, table: &Table, keys: &[u64], grads: &[f32], filter: &mut dyn Filter) -> Result<Ticket<'c>> {
        crate::core::Core::check_len(table, "the gradient", keys.len(), grads.len())?;
        let (mut kept_keys, mut kept_grads) = (Vec::new(), Vec::new());
        filter.filter(table.dim(), keys, grads, &mut kept_keys, &mut kept_grads);
        if kept_grads.len() != kept_keys.len() * table.dim() {
            return Err(ClientError::Config {
                reason: format!("a push filter kept {} keys but {} values (dim {})", kept_keys.len(), kept_grads.len(), table.dim()),
            });
        }
        self.push(table, &kept_keys, &kept_grads)
    }

    /// [`Client::push_range`] under this call's ordering.
    pub fn push_range(self, table: &Table, start: u64, grads: &[f32]) -> Result<Ticket<'c>> {
        let client = self.client;
        self.ready(table)?.call(client, table, Named::Range { start }, Some(grads), None)
    }

    /// [`Client::push_range_from`] under this call's ordering.
    pub fn push_range_from(self, table: &Table, start: u64, grads: &PushBuffer) -> Result<Ticket<'c>> {
        let client = self.client;
        self.ready(table)?.call(client, table, Named::Range { start }, Some(grads.as_slice()), None)
    }

    /// [`Client::pull`] under this call's ordering. Under bounded delay it returns only once
    /// the values are fresh enough (its ticket is then already answered).
    pub fn pull(self, table: &Table, keys: &[u64], out: &'c mut [f32]) -> Result<Ticket<'c>> {
        let client = self.client;
        let model = self.model(table);
        let mut core = self.ready(table)?;
        let Some(need) = model.pull_needs(core.clock) else {
            return core.call(client, table, Named::Keys { keys, ranges_done: false }, None, Some(out));
        };
        drop(core);
        fresh_pull(client, table, need, out, Pulled::Keys(keys))
    }

    /// [`Client::pull_range`] under this call's ordering. Under bounded delay it returns only
    /// once the values are fresh enough (its ticket is then already answered).
    pub fn pull_range(self, table: &Table, start: u64, out: &'c mut [f32]) -> Result<Ticket<'c>> {
        let client = self.client;
        let model = self.model(table);
        let mut core = self.ready(table)?;
        let Some(need) = model.pull_needs(core.clock) else {
            return core.call(client, table, Named::Range { start }, None, Some(out));
        };
        drop(core);
        fresh_pull(client, table, need, out, Pulled::Range(start))
    }

    /// Whether a key-list push completes the worker's clock on every range of the table: under
    /// bounded delay on a sparse table, where a worker's keys change from push to push and a
    /// pull waits on every worker's clock over the ranges it reads (a dense range push stamps
    /// the range it covers).
    fn completes_ranges(&self, table: &Table) -> bool {
        matches!(self.model(table), Consistency::BoundedDelay(_)) && table.spec().kind == tessera_layout::TableKind::Sparse
    }

    fn model(&self, table: &Table) -> Consistency {
        self.consistency.or(table.consistency).unwrap_or(self.client.consistency)
    }

    /// Locks the client once everything this call must follow has been answered.
    fn ready(&self, table: &Table) -> Result<std::sync::MutexGuard<'c, crate::core::Core>> {
        let mut core = self.client.lock();
        for &pull in &self.after_pulls {
            core.pull_arrived(pull, Instant::now() + crate::chain::CALL_TIMEOUT);
        }
        if self.model(table) == Consistency::Sequential {
            core.settle_all()?;
        } else if let Some(push) = self.after_pushes {
            core.push_answered(push)?;
        }
        Ok(core)
    }
}

/// What a bounded-delay pull reads.
#[derive(Debug, Clone, Copy)]
enum Pulled<'k> {
    Keys(&'k [u64]),
    Range(u64),
}

/// Repeats a pull until its stamp shows every one of the job's workers at `need` or later, with
/// a pause that doubles from 50 µs to 5 ms between tries; gives up after the client's
/// `stale_timeout` with the worker that held it back.
fn fresh_pull<'c>(client: &'c Client, table: &Table, need: u64, out: &'c mut [f32], what: Pulled<'_>) -> Result<Ticket<'c>> {
    let workers = client.workers;
    if workers == 0 {
        return Err(ClientError::Config { reason: "a bounded-delay pull needs the job's worker count: set ClientConfig::workers".into() });
    }
    let started = Instant::now();
    let mut pause = STALE_PAUSE_MIN;
    loop {
        let named = match what {
            Pulled::Keys(keys) => Named::Keys { keys, ranges_done: false },
            Pulled::Range(start) => Named::Range { start },
        };
        let ticket = client.lock().call(client, table, named, None, Some(&mut *out));
        let stamp = ticket?.wait()?;
        let behind = (0..workers as usize).map(|w| (w, stamp.get(w))).min_by_key(|&(_, c)| c).expect("workers > 0");
        if behind.1 >= need {
            return Ok(Ticket::answered(client, stamp));
        }
        if started.elapsed() >= client.stale_timeout {
            return Err(ClientError::Stale {
                table: table.spec().name.clone(),
                need,
                worker: behind.0 as u32,
                clock: behind.1,
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(STALE_PAUSE_MAX);
    }
}

impl<'c> Ticket<'c> {
    /// A ticket whose call is already answered, with its stamp.
    pub(crate) fn answered(client: &'c Client, stamp: Stamp) -> Self {
        Ticket { client, out: None, call: Called::Answered(stamp), mismatched: false }
    }

    /// Pull number `pull`, into `out`, whose wait takes its replies.
    pub(crate) fn pulling(client: &'c Client, pull: u64, out: &'c mut [f32]) -> Self {
        Ticket { client, out: Some(out), call: Called::Pull(pull), mismatched: false }
    }

    /// Push number `push`, sent at `clock`, whose wait waits for its acknowledgement.
    pub(crate) fn pushed(client: &'c Client, push: u64, clock: u64) -> Self {
        Ticket { client, out: None, call: Called::Push(Pushed { push, clock }), mismatched: false }
    }
}
