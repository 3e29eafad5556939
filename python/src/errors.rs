//! The `tessera.Error` hierarchy, and how each [`ClientError`] maps onto it.
//!
//! The classes are made once, when the module is imported, by running [`CLASSES`]: Python
//! classes may have two bases, so `ArgumentError` is also a `ValueError`, `TimeoutError` a
//! built-in `TimeoutError`, and `except tessera.Error` catches every one of them.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};
use tessera_client::ClientError;
use tessera_layout::LayoutError;
use tessera_transport::{Status, TransportError};

/// Each class of the hierarchy; its position is its index in [`CLASSES`]' `__all__`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Error = 0,
    Connection,
    OutcomeUnknown,
    Timeout,
    Table,
    Argument,
    Server,
    Closed,
}

/// The hierarchy, as Python. `__name__` is set to `tessera` so the classes print as
/// `tessera.TableError`, where users import them from.
const CLASSES: &std::ffi::CStr = cr#"
import builtins

class Error(Exception):
    """Every error the Tessera client raises. The message is the client's own."""

class ConnectionError(Error, builtins.ConnectionError):
    """A server cannot be reached, refused the connection, or reconnecting failed (the next call
    tries again)."""

class OutcomeUnknownError(ConnectionError):
    """The call's server was lost with this call in flight (a standalone server down past the
    reconnection attempts, or back without its data): a push may or may not have been applied, a
    pull's output is not complete. The call is never sent again; the next call reconnects."""

class TimeoutError(Error, builtins.TimeoutError):
    """No answer in time: a server did not reply within the I/O timeout, a ticket's wait ran out
    (the ticket is still in flight), or a bounded-delay pull waited too long for a slow worker."""

class TableError(Error, LookupError):
    """No table has that name, or a table is defined differently from what was asked."""

class ArgumentError(Error, builtins.ValueError):
    """An argument is wrong: an array's type, dtype, shape or length, a key outside the table, a
    NaN or Inf gradient the table rejects, an unknown option. Nothing was sent."""

class ServerError(Error):
    """A server refused the request for a reason of its own (full, shutting down, not durable)."""

class ClosedError(Error):
    """The client was closed."""

__all__ = ["Error", "ConnectionError", "OutcomeUnknownError", "TimeoutError", "TableError",
           "ArgumentError", "ServerError", "ClosedError"]
"#;

static TYPES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

fn types(py: Python<'_>) -> PyResult<&Vec<Py<PyType>>> {
    TYPES.get_or_try_init(py, || {
        let ns = PyDict::new(py);
        ns.set_item("__name__", "tessera")?;
        py.run(CLASSES, Some(&ns), None)?;
        let names: Vec<String> = ns.get_item("__all__")?.expect("CLASSES defines __all__").extract()?;
        names.iter().map(|n| Ok(ns.get_item(n)?.expect("__all__ names a class").cast_into::<PyType>()?.unbind())).collect()
    })
}

/// Adds every class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for ty in types(m.py())? {
        let ty = ty.bind(m.py());
        m.add(ty.name()?, ty)?;
    }
    Ok(())
}

/// An exception of class `kind` with `message`.
pub fn raise(py: Python<'_>, kind: Kind, message: impl Into<String>) -> PyErr {
    match types(py) {
        Ok(types) => PyErr::from_type(types[kind as usize].bind(py).clone(), message.into()),
        Err(e) => e,
    }
}

/// The class a client error belongs to.
pub fn kind_of(e: &ClientError) -> Kind {
    match e {
        ClientError::Server { status, .. } => match status {
            Status::UnknownTable => Kind::Table,
            Status::KeyOutOfRange | Status::ValuesLength | Status::NonFinite | Status::WrongDim | Status::BadRequest | Status::FrameTooLarge => Kind::Argument,
            Status::Unauthenticated => Kind::Connection,
            _ => Kind::Server,
        },
        ClientError::Placement(p) => match p {
            LayoutError::BadDenseLayout { .. } => Kind::Error,
            _ => Kind::Table,
        },
        ClientError::Transport(t) => match t {
            TransportError::Timeout { .. } => Kind::Timeout,
            TransportError::BadConfig { .. } | TransportError::RdmaUnavailable { .. } | TransportError::FrameTooLarge { .. } => Kind::Argument,
            _ => Kind::Connection,
        },
        ClientError::KeyOutOfRange { .. } | ClientError::Length { .. } | ClientError::NonFinite { .. } => Kind::Argument,
        ClientError::Config { reason } if reason.contains("another definition") => Kind::Table,
        ClientError::Config { .. } => Kind::Argument,
        ClientError::Stale { .. } => Kind::Timeout,
        ClientError::OutcomeUnknown { .. } => Kind::OutcomeUnknown,
        ClientError::Reconnect { .. } | ClientError::Unavailable { .. } => Kind::Connection,
        ClientError::Protocol { .. } => Kind::Error,
    }
}

/// The Python exception for a client error, with the client's message.
pub fn client(py: Python<'_>, e: ClientError) -> PyErr {
    raise(py, kind_of(&e), e.to_string())
}

/// An [`Kind::Argument`] error.
pub fn argument(py: Python<'_>, message: impl Into<String>) -> PyErr {
    raise(py, Kind::Argument, message)
}
