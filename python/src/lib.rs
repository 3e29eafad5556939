//! The Tessera client for Python: the extension module `tessera._tessera`, which the package
//! `tessera` (`python/tessera/`, pure Python on top) re-exports, with `tessera.torch` beside it.
//!
//! It wraps [`tessera_client::Client`] and nothing else, so a trainer in Python gets what the
//! Rust client does: routing by the servers' range map, tickets, consistency models,
//! reconnection, TCP or RDMA. numpy arrays are read and written in place, and every call that
//! may wait on the network releases the GIL. Each [`ClientError`](tessera_client::ClientError)
//! becomes an exception of the `tessera.Error` hierarchy ([`errors`]) with the client's message;
//! nothing panics across the boundary that a caller's argument could reach.
//!
//! No unsafe code of its own: the FFI is PyO3's and the numpy crate's. Build and install it with `pip install ./python` (maturin is the build backend).

#![forbid(unsafe_code)]

mod arrays;
mod client;
mod errors;
mod ticket;

use pyo3::prelude::*;

#[pymodule]
fn _tessera(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<client::PyClient>()?;
    m.add_class::<client::PyTable>()?;
    m.add_class::<ticket::PyTicket>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
