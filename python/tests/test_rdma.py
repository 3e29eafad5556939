"""The package over RDMA verbs, in the SoftRoCE guest (tests/run.sh runs this file there, with a
wheel built with the `rdma` feature): one server and a replicated cluster, both serving RDMA, and
clients that insist on it. Skipped where there is no RDMA device (RDMA_DEV is set by the guest)."""

import os

import numpy as np
import pytest

import tessera
from conftest import Cluster, Server

pytestmark = pytest.mark.skipif(not os.environ.get("RDMA_DEV"), reason="no RDMA device here: runs in the SoftRoCE guest")

# Servers that serve RDMA, with the default slots the Python client asks for.
RDMA_SERVER = ("--transport", "rdma")


def round_trip(client: tessera.Client, prefix: str) -> None:
    emb = client.create_table(f"{prefix}.emb", dim=4, updater="sum")
    w = client.create_table(f"{prefix}.w", kind="dense", dim=2, updater="sum", end=5000)
    keys = np.array([1, 7, 1 << 40, (1 << 63) + 5], dtype=np.uint64)
    grads = np.arange(16, dtype=np.float32).reshape(4, 4)
    tickets = [emb.push(keys, grads) for _ in range(3)]
    # A dense push larger than a slot goes over the link's TCP connection; smaller ones by verbs.
    tickets += [w.push_range(0, np.ones((5000, 2), dtype=np.float32)), w.push_range(10, np.ones((4, 2), dtype=np.float32))]
    for t in tickets:
        t.wait()
    assert np.array_equal(emb.pull(keys), grads * 3)
    dense = w.pull_range(0, 5000)
    assert dense[10:14].tolist() == [[2.0, 2.0]] * 4 and dense[0].tolist() == [1.0, 1.0] and dense[4999].tolist() == [1.0, 1.0]
    assert client.transport_in_use == "rdma"


def test_one_server_over_rdma():
    with Server(*RDMA_SERVER) as s, tessera.Client([s.addr], transport="rdma") as client:
        round_trip(client, "one")


def test_a_replicated_cluster_over_rdma():
    with Cluster(server_args=RDMA_SERVER) as c, tessera.Client(c.addrs, transport="rdma") as client:
        round_trip(client, "chain")
