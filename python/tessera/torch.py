"""PyTorch on Tessera: embeddings and dense parameters kept on the servers.

``Embedding`` and ``EmbeddingBag`` are ``nn.Module``s whose rows live in a Tessera table. The
forward pass pulls the batch's rows (each distinct id once); the backward pass pushes their
gradients, summed per distinct id, and the table's updater (adagrad, adam, ftrl, sgd) applies
them on the servers. The trainer keeps no optimizer state for these rows. Pushes are
asynchronous: ``backward()`` returns once a push is sent, and the next batch's pull goes out
behind it on the same connections, so it sees the push without waiting for its answer. Tickets
are kept and waited on (``max_in_flight`` at most in flight, and ``flush()``), so errors surface.

``DenseSync`` does the same for a module's dense parameters: ``step()`` after ``backward()``
pushes the gradients into a dense table and pulls the parameters back, so several trainers
share one model with no all-reduce.

Each trainer process is one worker with its own id: ``worker_from_env()`` reads torchrun's
RANK and WORLD_SIZE. Set the clock once per batch (``client.set_clock(step)``, from 1) when the
client runs under bounded delay: pulls then wait for slow workers on the servers' vector clocks.
"""

from __future__ import annotations

import collections
import os
from typing import Deque, Optional, Tuple

import numpy as np
import torch
from torch import nn

import tessera

__all__ = ["Embedding", "EmbeddingBag", "DenseSync", "worker_from_env"]


def worker_from_env() -> Tuple[int, int]:
    """(worker id, worker count) from torchrun's RANK and WORLD_SIZE (0 and 1 when unset)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _keys(ids: torch.Tensor) -> np.ndarray:
    """The ids as uint64 keys, without a copy when they are a contiguous int64 CPU tensor
    (negative ids map to keys at the top of the u64 space)."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise tessera.ArgumentError(f"ids have dtype {ids.dtype}; use an integer tensor")
    flat = ids.detach().reshape(-1).to("cpu", torch.int64).contiguous()
    return flat.numpy().view(np.uint64)


class _Pushes:
    """Push tickets in flight: at most ``limit``; the oldest is waited on to make room."""

    def __init__(self, limit: int):
        if limit < 1:
            raise tessera.ArgumentError(f"max_in_flight is {limit}; it must be at least 1")
        self.limit = limit
        self.tickets: Deque[tessera.Ticket] = collections.deque()

    def add(self, ticket: tessera.Ticket) -> None:
        self.tickets.append(ticket)
        while len(self.tickets) > self.limit:
            self.tickets.popleft().wait()

    def flush(self) -> None:
        while self.tickets:
            self.tickets.popleft().wait()


class _TableModule(nn.Module):
    def __init__(self, table: tessera.Table, max_in_flight: int):
        super().__init__()
        self.table = table
        self.dim = table.dim
        self._pushes = _Pushes(max_in_flight)

    def _rows(self, ids: torch.Tensor):
        """Pulls the distinct ids' rows: (rows, inverse), rows (n_distinct, dim) on the
        autograd graph when training, inverse mapping each id to its row."""
        keys = _keys(ids)
        distinct, inverse = np.unique(keys, return_inverse=True)
        values = torch.from_numpy(self.table.pull(distinct))
        inverse_t = torch.from_numpy(inverse.astype(np.int64, copy=False)).reshape(ids.shape)
        if self.training and torch.is_grad_enabled():
            # A leaf of its own: autograd sums the gradient of every use of a row into it, and
            # the hook pushes that sum when backward reaches it (the rows are then dropped).
            values.requires_grad_(True)
            values.register_hook(lambda grad: self._push(distinct, grad))
        return values, inverse_t

    def _push(self, keys: np.ndarray, grad: torch.Tensor) -> None:
        g = grad.detach().to("cpu", torch.float32).contiguous()
        self._pushes.add(self.table.push(keys, g.numpy()))

    def flush(self) -> None:
        """Waits for every push in flight; raises the first error."""
        self._pushes.flush()

    def extra_repr(self) -> str:
        return f"table={self.table.name!r}, dim={self.dim}, updater={self.table.updater!r}"


class Embedding(_TableModule):
    """``nn.Embedding`` whose rows live in a Tessera table (sparse, or dense over [0, n)).

    ``forward(ids)`` takes an integer tensor of any shape and returns float32 rows of shape
    ``ids.shape + (dim,)``. Ids are the table's keys (int64, read as uint64). In training mode
    ``backward()`` pushes the rows' gradients, summed per distinct id; keep at most
    ``max_in_flight`` pushes unanswered. Create the table with an updater and an ``init_scale``
    (``client.create_table(name, dim=16, updater="adagrad{lr=0.05}", init_scale=0.01)``).
    """

    def __init__(self, table: tessera.Table, *, max_in_flight: int = 4):
        super().__init__(table, max_in_flight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        values, inverse = self._rows(ids)
        return values[inverse]


class EmbeddingBag(_TableModule):
    """``nn.EmbeddingBag`` (mode "sum" or "mean") whose rows live in a Tessera table.

    ``forward(ids, offsets=None, per_sample_weights=None)`` as ``nn.EmbeddingBag``: ids of shape
    (bags, ids per bag), or flat with ``offsets``. Returns (bags, dim). Backward pushes as
    ``Embedding`` does.
    """

    def __init__(self, table: tessera.Table, mode: str = "sum", *, max_in_flight: int = 4):
        if mode not in ("sum", "mean"):
            raise tessera.ArgumentError(f"mode {mode!r}: use 'sum' or 'mean'")
        super().__init__(table, max_in_flight)
        self.mode = mode

    def forward(self, ids: torch.Tensor, offsets: Optional[torch.Tensor] = None, per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        values, inverse = self._rows(ids)
        return nn.functional.embedding_bag(inverse, values, offsets, mode=self.mode, per_sample_weights=per_sample_weights)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode!r}"


class DenseSync:
    """Keeps ``module``'s parameters in a dense Tessera table shared by every worker.

    The table (``name``, ``updater`` applied on the servers) holds each parameter's change from
    its initial value; the initial values are worker 0's, published once in ``name + ".init"``
    (updater "assign") and read by the others, so workers need not seed alike. Call ``step()``
    after ``backward()``: it pushes the gradients (asynchronously) and pulls the parameters
    back into the module, which then holds the shared model with every push so far applied
    (its own included). Use no optimizer for these parameters.

    The pull is sent at once and waited on just before the module's next forward pass (a
    forward pre-hook), so its round trip overlaps whatever the trainer does in between, such as
    the next batch's embedding pull, which then travels behind it on the same connection.
    """

    def __init__(self, client: tessera.Client, module: nn.Module, name: str = "dense", updater: str = "adam{lr=0.001}", *, dim: int = 64, max_in_flight: int = 2, init_timeout_s: float = 60.0):
        self.client = client
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.count = sum(p.numel() for p in self.params)
        if self.count == 0:
            raise tessera.ArgumentError("the module has no parameters that require grad")
        # The parameters, flat, padded to whole keys of `dim` values (fewer keys, less per-key work).
        self.keys = -(-self.count // dim)
        self.table = client.create_table(name, kind="dense", dim=dim, updater=updater, end=self.keys)
        init_table = client.create_table(name + ".init", kind="dense", dim=dim, updater="assign", end=self.keys)
        self._pushes = _Pushes(max_in_flight)
        self._grads = np.zeros(self.keys * dim, dtype=np.float32)
        self._delta = np.zeros((self.keys, dim), dtype=np.float32)
        self._init = self._initial(client, init_table, init_timeout_s)
        self._pulling: Optional[tessera.Ticket] = None
        module.register_forward_pre_hook(lambda _module, _inputs: self._apply())
        self.pull()

    def _flat(self) -> np.ndarray:
        with torch.no_grad():
            flat = np.zeros(self._grads.shape, dtype=np.float32)
            flat[: self.count] = torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params]).numpy()
            return flat

    def _initial(self, client: tessera.Client, table: tessera.Table, timeout_s: float) -> np.ndarray:
        """Worker 0's initial parameters: pushed by worker 0 at clock 1; the others pull until
        the stamp shows worker 0's push in (the servers' vector clocks say when)."""
        import time

        if client.worker == 0:
            clock = client.clock
            client.set_clock(max(clock, 1))
            table.push_range(0, self._flat()).wait()
            client.set_clock(clock)
        deadline = time.monotonic() + timeout_s
        while True:
            ticket = table.pull_range_async(0, self.keys)
            values = ticket.wait()
            stamp = ticket.stamp or []
            if values is not None and stamp and stamp[0] >= 1:
                return values.reshape(-1)[: self.count].copy()
            if time.monotonic() > deadline:
                raise tessera.TimeoutError(f"worker 0 did not publish {table.name!r} within {timeout_s} s")
            time.sleep(0.01)

    def push(self) -> None:
        """Pushes the parameters' gradients (zeros for those without one); returns at once."""
        at = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                self._grads[at : at + n] = 0
            else:
                self._grads[at : at + n] = p.grad.detach().reshape(-1).cpu().numpy()
            at += n
        self._pushes.add(self.table.push_range(0, self._grads))

    def pull(self) -> None:
        """Pulls the shared parameters into the module now."""
        self.pull_async()
        self._apply()

    def pull_async(self) -> None:
        """Sends the pull; the parameters land in the module before its next forward pass (or
        at the next ``pull()``)."""
        self._pulling = self.table.pull_range_async(0, self.keys, out=self._delta)

    def _apply(self) -> None:
        if self._pulling is None:
            return
        ticket, self._pulling = self._pulling, None
        ticket.wait()
        flat = torch.from_numpy(self._init + self._delta.reshape(-1)[: self.count])
        at = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(flat[at : at + n].view_as(p))
                at += n

    def step(self) -> None:
        """``push()`` then ``pull_async()``, and clears the gradients. The module holds the new
        parameters from its next forward pass on (call ``pull()`` to have them at once)."""
        self.push()
        self.pull_async()
        for p in self.params:
            p.grad = None

    def flush(self) -> None:
        """Waits for every push in flight; raises the first error."""
        self._pushes.flush()
