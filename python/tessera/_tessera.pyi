"""Type stubs of the extension module tessera._tessera (python/src/)."""

import builtins
from types import TracebackType
from typing import List, Optional, Sequence, Tuple, Type, Union, final

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = ["Error", "ConnectionError", "OutcomeUnknownError", "TimeoutError", "TableError", "ArgumentError", "ServerError", "ClosedError", "Client", "Table", "Ticket", "__version__"]

_Keys = npt.NDArray[np.uint64]
_Values = npt.NDArray[np.float32]

class Error(Exception):
    """Every error the Tessera client raises. The message is the client's own."""

class ConnectionError(Error, builtins.ConnectionError):
    """A server cannot be reached, refused the connection, or reconnecting failed."""

class OutcomeUnknownError(ConnectionError):
    """The connection broke with this call in flight: a push may or may not have been applied."""

class TimeoutError(Error, builtins.TimeoutError):
    """No answer in time (the I/O timeout, a ticket's wait, or a bounded-delay pull)."""

class TableError(Error, LookupError):
    """No table has that name, or a table is defined differently from what was asked."""

class ArgumentError(Error, builtins.ValueError):
    """An argument is wrong: dtype, shape, length, a key outside the table, NaN, an option."""

class ServerError(Error):
    """A server refused the request for a reason of its own."""

class ClosedError(Error):
    """The client was closed."""

@final
class Ticket:
    """A push or pull in flight. ``wait()`` returns a pull's values (None for a push)."""

    def wait(self, timeout: Optional[float] = None) -> Optional[_Values]:
        """Waits until every server answered; raises the call's error. ``timeout`` in seconds:
        past it ``TimeoutError``, and the ticket stays in flight."""
    def ready(self, timeout: float = 0.0) -> bool:
        """Whether ``wait()`` would return at once; receives for up to ``timeout`` seconds."""
    @property
    def done(self) -> bool:
        """Whether the ticket has been waited on."""
    @property
    def stamp(self) -> Optional[List[int]]:
        """The vector-clock stamp (one clock per worker), once waited on successfully."""

@final
class Table:
    """A table of one client. Keys uint64, values float32 of shape (len(keys), dim)."""

    def push(self, keys: _Keys, values: _Values) -> Ticket:
        """Pushes ``values`` for ``keys``; returns a ticket at once (the arrays were read)."""
    def pull(self, keys: _Keys, out: Optional[_Values] = None) -> _Values:
        """Pulls and waits: (len(keys), dim) float32, written into ``out`` when given."""
    def pull_async(self, keys: _Keys, out: Optional[_Values] = None) -> Ticket:
        """As ``pull``; ``ticket.wait()`` writes and returns the values."""
    def push_range(self, start: int, values: _Values) -> Ticket:
        """Pushes ``values`` (count x dim) for the dense keys from ``start``."""
    def pull_range(self, start: int, count: int, out: Optional[_Values] = None) -> _Values:
        """Pulls ``count`` dense keys from ``start`` and waits: (count, dim) float32."""
    def pull_range_async(self, start: int, count: int, out: Optional[_Values] = None) -> Ticket:
        """As ``pull_range``; ``ticket.wait()`` writes and returns the values."""
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str:
        """"sparse" or "dense"."""
    @property
    def dim(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def updater(self) -> str: ...
    @property
    def client(self) -> Client: ...

@final
class Client:
    """A connection, as one worker, to a cluster through any of its servers, or to one
    standalone server."""

    def __new__(
        cls,
        servers: Union[Sequence[str], str],
        worker: int = 0,
        workers: int = 1,
        consistency: str = "eventual",
        secret_file: Optional[str] = None,
        transport: str = "auto",
        *,
        compress: bool = False,
        key_cache_keys: int = 0,
        io_timeout_ms: int = 30000,
        reconnect_attempts: int = 8,
        defer_pushes: bool = True,
    ) -> Client: ...
    def create_table(
        self,
        name: str,
        kind: str = "sparse",
        dim: int = 16,
        updater: str = "adagrad{lr=0.05}",
        start: int = 0,
        end: Optional[int] = None,
        *,
        init_scale: float = 0.0,
        init_seed: int = 0,
        non_finite: str = "reject",
        capacity: int = 0,
    ) -> Table:
        """Creates the table on every server (or finds it with the same definition)."""
    def table(self, name: str) -> Table:
        """The table called ``name``."""
    @property
    def clock(self) -> int:
        """This worker's clock, sent with every push."""
    def set_clock(self, t: int) -> None:
        """Sets this worker's clock (an iteration count from 1; it should only grow)."""
    def close(self) -> None:
        """Closes the client; later calls raise ``ClosedError``."""
    @property
    def closed(self) -> bool: ...
    def __enter__(self) -> Client: ...
    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]) -> bool: ...
    @property
    def worker(self) -> int: ...
    @property
    def workers(self) -> int: ...
    @property
    def servers(self) -> List[str]: ...
    @property
    def consistency_model(self) -> str: ...
    @property
    def transport_in_use(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def bytes(self) -> Tuple[int, int]: ...
    def ping(self) -> None: ...
    def status(self) -> List[str]:
        """Every server's status report, as JSON text; each names its server in ``addr``."""
