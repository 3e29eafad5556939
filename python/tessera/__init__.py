"""Tessera's Python client: push gradients to and pull parameters from a Tessera cluster.

    import numpy as np
    import tessera

    with tessera.Client(["127.0.0.1:7070"], worker=0, workers=1) as client:
        table = client.create_table("emb", kind="sparse", dim=16, updater="adagrad{lr=0.05}")
        keys = np.array([17, 99_000_000_123], dtype=np.uint64)
        table.push(keys, np.ones((2, 16), dtype=np.float32)).wait()
        values = table.pull(keys)          # float32, shape (2, 16)

``tessera.torch`` has ``Embedding``, ``EmbeddingBag`` and ``DenseSync`` for PyTorch trainers.
Every error is a ``tessera.Error``; see the subclasses below.
"""

from ._tessera import (
    ArgumentError,
    Client,
    ClosedError,
    ConnectionError,
    Error,
    OutcomeUnknownError,
    ServerError,
    Table,
    TableError,
    Ticket,
    TimeoutError,
    __version__,
)

__all__ = [
    "ArgumentError",
    "Client",
    "ClosedError",
    "ConnectionError",
    "Error",
    "OutcomeUnknownError",
    "ServerError",
    "Table",
    "TableError",
    "Ticket",
    "TimeoutError",
    "__version__",
]
