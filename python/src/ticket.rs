//! `tessera.Ticket`: a call in flight, kept as the Rust client's [`Detached`] ticket (which
//! borrows nothing) and, for a pull, the array its values go to.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use numpy::PyArray2;
use pyo3::prelude::*;
use tessera_client::Detached;

use crate::arrays;
use crate::client::{PyClient, WAIT_SLICE};
use crate::errors::{self, Kind};

#[derive(Debug)]
enum State {
    /// Sent, not waited on yet.
    Pending { ticket: Detached, out: Option<Py<PyArray2<f32>>> },
    /// A thread is waiting on it now.
    Waiting,
    /// Waited on: the stamp, or the error (raised again by later waits).
    Finished(Result<Vec<u64>, PyErr>, Option<Py<PyArray2<f32>>>),
}

/// A push or pull in flight, returned at once by ``Table.push`` and the ``*_async`` pulls.
///
/// ``wait()`` blocks (with the GIL released) until every server answered and raises the call's
/// error, if any; a pull's ticket then returns its values. A ticket dropped without a wait
/// abandons the result, not the call: a push is applied all the same, and its errors go unseen.
#[pyclass(frozen, name = "Ticket", module = "tessera")]
#[derive(Debug)]
pub struct PyTicket {
    client: Py<PyClient>,
    state: Mutex<State>,
}

impl PyTicket {
    pub fn new(client: Py<PyClient>, ticket: Detached, out: Option<Py<PyArray2<f32>>>) -> Self {
        PyTicket { client, state: Mutex::new(State::Pending { ticket, out }) }
    }

    /// A ticket whose call has been answered already.
    pub fn answered(client: Py<PyClient>, out: Option<Py<PyArray2<f32>>>) -> Self {
        PyTicket { client, state: Mutex::new(State::Finished(Ok(Vec::new()), out)) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The result of a finished ticket, as `wait` returns it.
    fn result(py: Python<'_>, result: &Result<Vec<u64>, PyErr>, out: &Option<Py<PyArray2<f32>>>) -> PyResult<Option<Py<PyArray2<f32>>>> {
        match result {
            Ok(_) => Ok(out.as_ref().map(|o| o.clone_ref(py))),
            Err(e) => Err(e.clone_ref(py)),
        }
    }

    /// Waits in slices until the servers answered, or the deadline passes (`Ok(false)`), or a
    /// signal handler raises, or another thread closes the client.
    fn await_ready(&self, py: Python<'_>, ticket: &Detached, timeout: Option<Duration>) -> PyResult<bool> {
        let client = self.client.get().live(py)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map_or(WAIT_SLICE, |d| d.saturating_duration_since(Instant::now()).min(WAIT_SLICE));
            if py.detach(|| client.ready(ticket, left)).map_err(|e| errors::client(py, e))? {
                return Ok(true);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
            if self.client.get().open().is_none() {
                return Err(errors::raise(py, Kind::Closed, "the client was closed while this call waited"));
            }
            py.check_signals()?;
        }
    }

    /// Takes the answered call's result: its stamp, with a pull's values written to `out`.
    fn take(&self, py: Python<'_>, ticket: Detached, out: &Option<Py<PyArray2<f32>>>) -> PyResult<Vec<u64>> {
        let client = self.client.get().live(py)?;
        let waited = match out {
            Some(out) => arrays::write_into(out.bind(py), |o| py.detach(|| client.resume(ticket, Some(o)).wait()).map_err(|e| errors::client(py, e))),
            None => py.detach(|| client.resume(ticket, None).wait()).map_err(|e| errors::client(py, e)),
        };
        waited.map(|stamp| stamp.clocks().to_vec())
    }
}

#[pymethods]
impl PyTicket {
    /// Waits until every server answered; returns a pull's values (None for a push) or raises the
    /// call's error. ``timeout`` in seconds: past it, ``TimeoutError`` is raised and the ticket
    /// is still in flight (wait again). Waiting again on a finished ticket returns (or raises)
    /// the same.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyArray2<f32>>>> {
        let timeout = timeout.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX));
        // Taken in a statement of its own: the guard must be dropped before the arms lock again.
        let taken = std::mem::replace(&mut *self.state(), State::Waiting);
        let (ticket, out) = match taken {
            State::Pending { ticket, out } => (ticket, out),
            State::Waiting => return Err(errors::argument(py, "another thread is waiting on this ticket")),
            State::Finished(result, out) => {
                let r = Self::result(py, &result, &out);
                *self.state() = State::Finished(result, out);
                return r;
            }
        };
        match self.await_ready(py, &ticket, timeout) {
            Ok(true) => {}
            Ok(false) => {
                *self.state() = State::Pending { ticket, out };
                let ms = timeout.unwrap_or_default().as_millis();
                return Err(errors::raise(py, Kind::Timeout, format!("no answer within {ms} ms; the call is still in flight (wait again)")));
            }
            Err(e) => {
                // Interrupted (a signal) or the client was closed: keep the ticket as it was.
                if !e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) && self.client.get().open().is_none() {
                    *self.state() = State::Finished(Err(e.clone_ref(py)), out);
                } else {
                    *self.state() = State::Pending { ticket, out };
                }
                return Err(e);
            }
        }
        let result = self.take(py, ticket, &out);
        let r = Self::result(py, &result, &out);
        *self.state() = State::Finished(result, out);
        r
    }

    /// Whether ``wait()`` would return at once: every server answered, or a connection the call
    /// went over broke. Receives for up to ``timeout`` seconds first (0: only looks).
    #[pyo3(signature = (timeout=0.0))]
    fn ready(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let taken = std::mem::replace(&mut *self.state(), State::Waiting);
        let (ticket, out) = match taken {
            State::Pending { ticket, out } => (ticket, out),
            State::Waiting => return Ok(false),
            finished => {
                *self.state() = finished;
                return Ok(true);
            }
        };
        let timeout = Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(Duration::MAX);
        let ready = match self.client.get().live(py) {
            Ok(client) => py.detach(|| client.ready(&ticket, timeout)).map_err(|e| errors::client(py, e)),
            Err(e) => Err(e),
        };
        *self.state() = State::Pending { ticket, out };
        ready
    }

    /// Whether the ticket has been waited on.
    #[getter]
    fn done(&self) -> bool {
        matches!(*self.state(), State::Finished(..))
    }

    /// The vector-clock stamp of the keys the call touched (one clock per worker id, trailing
    /// zeros dropped), once waited on successfully; else None.
    #[getter]
    fn stamp(&self) -> Option<Vec<u64>> {
        match &*self.state() {
            State::Finished(Ok(stamp), _) => Some(stamp.clone()),
            _ => None,
        }
    }

    fn __repr__(&self) -> String {
        let what = match &*self.state() {
            State::Pending { out: Some(_), .. } => "pull in flight",
            State::Pending { out: None, .. } => "push in flight",
            State::Waiting => "being waited on",
            State::Finished(Ok(_), _) => "done",
            State::Finished(Err(_), _) => "failed",
        };
        format!("<tessera.Ticket: {what}>")
    }
}

impl Drop for PyTicket {
    fn drop(&mut self) {
        let state = std::mem::replace(self.state.get_mut().unwrap_or_else(|p| p.into_inner()), State::Waiting);
        if let (State::Pending { ticket, .. }, Some(client)) = (state, self.client.get().open()) {
            // Resumed and dropped at once: the client forgets the requests, and their replies
            // are thrown away when they come (a pull's output is never written).
            drop(client.resume(ticket, None));
        }
    }
}
