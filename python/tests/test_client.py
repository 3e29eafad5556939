"""The binding against real servers: the same floats as the Rust client, in-place arrays,
tickets, and an exception (never a crash) for every misuse."""

import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tessera
from conftest import Server, tessera_bin


def replay_bin() -> Path:
    """The Rust reference: client/examples/replay.rs, built beside the tessera binary."""
    path = tessera_bin().parent / "examples" / "replay"
    if not path.exists():
        pytest.fail(f"{path} does not exist: build it with `cargo build -p tessera-client --example replay`")
    return path


def script(seed: int):
    """Tables and a sequence of pushes with repeated keys, clocks and two updaters."""
    rng = np.random.default_rng(seed)
    tables = [
        {"name": "emb", "kind": "sparse", "dim": 8, "updater": "adagrad{lr=0.1}", "init": {"uniform": {"scale": 0.05, "seed": 11}}},
        {"name": "w", "kind": "dense", "start": 0, "end": 1000, "dim": 4, "updater": "adam{lr=0.01}"},
    ]
    ops = []
    for step in range(1, 21):
        ops.append({"clock": step})
        keys = rng.integers(0, 1 << 63, 50, dtype=np.uint64)
        keys[:10] = rng.integers(0, 20, 10).astype(np.uint64)  # hot keys, pushed again and again
        keys = np.unique(keys)
        ops.append({"push": "emb", "keys": keys.tolist(), "values": rng.normal(0, 1, len(keys) * 8).astype(np.float32).tolist()})
        start = int(rng.integers(0, 900))
        ops.append({"push_range": "w", "start": start, "values": rng.normal(0, 1, 100 * 4).astype(np.float32).tolist()})
    hot = list(range(20)) + [int(k) for k in keys[-5:]]
    pulls = [{"table": "emb", "keys": hot}, {"table": "w", "start": 0, "count": 1000}]
    return tables, ops, pulls


def test_pulls_equal_the_rust_clients_bit_for_bit_after_the_same_pushes(tmp_path):
    tables, ops, pulls = script(seed=5)
    with Server() as rust_side, Server() as python_side:
        path = tmp_path / "script.json"
        path.write_text(json.dumps({"servers": [rust_side.addr], "worker": 0, "tables": tables, "ops": ops, "pulls": pulls}))
        ran = subprocess.run([str(replay_bin()), str(path)], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        want = [np.array(p, dtype=np.float32) for p in json.loads(ran.stdout)["pulls"]]

        with tessera.Client([python_side.addr], transport="tcp") as client:
            emb = client.create_table("emb", dim=8, updater="adagrad{lr=0.1}", init_scale=0.05, init_seed=11)
            w = client.create_table("w", kind="dense", dim=4, updater="adam{lr=0.01}", end=1000)
            tickets = []  # pipelined here, waited on one by one there: the same result
            for op in ops:
                if "clock" in op:
                    client.set_clock(op["clock"])
                elif "push" in op:
                    keys = np.array(op["keys"], dtype=np.uint64)
                    tickets.append(emb.push(keys, np.array(op["values"], dtype=np.float32).reshape(-1, 8)))
                else:
                    tickets.append(w.push_range(op["start"], np.array(op["values"], dtype=np.float32)))
            for t in tickets:
                assert t.wait() is None
            got = [emb.pull(np.array(pulls[0]["keys"], dtype=np.uint64)), w.pull_range(0, 1000)]
    assert got[0].shape == (25, 8) and got[1].shape == (1000, 4)
    for g, wnt in zip(got, want):
        assert np.array_equal(g.reshape(-1).view(np.uint32), wnt.view(np.uint32)), "not the same floats as the Rust client"
    assert np.abs(got[0]).max() > 0.05, "the pushes moved the hot keys away from their initial values"


def test_pulls_write_in_place_and_tickets_report(shared_server):
    with tessera.Client([shared_server.addr], transport="tcp") as client:
        t = client.create_table("inplace", dim=4, updater="sum")
        keys = np.array([3, 1, 4, 1 << 62], dtype=np.uint64)
        client.set_clock(1)
        ticket = t.push(keys, np.ones((4, 4), dtype=np.float32))
        assert isinstance(ticket, tessera.Ticket)
        assert ticket.wait() is None and ticket.done and ticket.stamp == [1]
        assert ticket.wait() is None, "a second wait returns the same"
        out = np.full((4, 4), 7, dtype=np.float32)
        assert t.pull(keys, out=out) is out
        assert (out == 1).all()
        # Non-contiguous inputs are accepted (copied once); a flat values array too.
        t.push(np.repeat(keys, 2)[::2], np.ones(16, dtype=np.float32)).wait()
        pulled = t.pull_async(keys, out=out)
        assert pulled.wait() is out and (out == 2).all()
        assert t.pull(np.array([], dtype=np.uint64)).shape == (0, 4)

        d = client.create_table("inplace.dense", kind="dense", dim=2, updater="sgd{lr=0.5}", end=10)
        d.push_range(4, np.ones((3, 2), dtype=np.float32)).wait()
        assert d.pull_range(3, 5).tolist() == [[0, 0], [-0.5, -0.5], [-0.5, -0.5], [-0.5, -0.5], [0, 0]]
        assert d.pull_range_async(4, 1).wait().tolist() == [[-0.5, -0.5]]
        assert (d.name, d.kind, d.dim, d.start, d.end, d.updater) == ("inplace.dense", "dense", 2, 0, 10, "sgd{lr=0.5}")
        assert client.table("inplace.dense").dim == 2


def test_wrong_arrays_raise_argument_errors_and_send_nothing(shared_server):
    with tessera.Client([shared_server.addr], transport="tcp") as client:
        t = client.create_table("args", dim=4, updater="sum")
        keys = np.arange(3, dtype=np.uint64)
        ones = np.ones((3, 4), dtype=np.float32)
        cases = {
            "keys dtype": lambda: t.push(keys.astype(np.int64), ones),
            "keys not an array": lambda: t.push([0, 1, 2], ones),
            "keys 2-D": lambda: t.pull(keys.reshape(3, 1)),
            "values dtype": lambda: t.push(keys, ones.astype(np.float64)),
            "values shape": lambda: t.push(keys, np.ones((3, 3), dtype=np.float32)),
            "values length": lambda: t.push(keys, np.ones(11, dtype=np.float32)),
            "out dtype": lambda: t.pull(keys, out=np.zeros((3, 4), dtype=np.float64)),
            "out shape": lambda: t.pull(keys, out=np.zeros((4, 3), dtype=np.float32)),
            "out not contiguous": lambda: t.pull(keys, out=np.zeros((4, 3), dtype=np.float32).T),
            "out read-only": lambda: t.pull(keys, out=_readonly((3, 4))),
            "NaN gradient": lambda: t.push(keys, np.full((3, 4), np.nan, dtype=np.float32)),
            "range values of the wrong width": lambda: t.push_range(0, np.ones((2, 3), dtype=np.float32)),
        }
        for name, call in cases.items():
            with pytest.raises(tessera.ArgumentError):
                call()
            # Also the built-in ValueError, for code that catches that.
            with pytest.raises(ValueError):
                call()
        assert (t.pull(keys) == 0).all(), "no refused push was applied"

        d = client.create_table("args.dense", kind="dense", dim=1, updater="sum", end=10)
        with pytest.raises(tessera.ArgumentError, match="outside"):
            d.push_range(8, np.ones(3, dtype=np.float32))
        with pytest.raises(tessera.ArgumentError, match="needs end"):
            client.create_table("args.noend", kind="dense")
        with pytest.raises(tessera.ArgumentError, match="kind"):
            client.create_table("args.kind", kind="ragged")
        with pytest.raises(tessera.Error):
            client.create_table("args.updater", updater="nesterov{lr=1}")


def _readonly(shape):
    a = np.zeros(shape, dtype=np.float32)
    a.setflags(write=False)
    return a


def test_bad_options_and_unknown_tables_raise(shared_server):
    for kwargs in ({"consistency": "strong"}, {"transport": "carrier-pigeon"}, {"worker": 2, "workers": 2}, {"io_timeout_ms": 0}):
        with pytest.raises(tessera.ArgumentError):
            tessera.Client([shared_server.addr], **kwargs)
    with pytest.raises(tessera.ArgumentError, match="secret_file"):
        tessera.Client([shared_server.addr], secret_file="/nonexistent/secret")
    with tessera.Client(shared_server.addr, consistency="bounded:2", workers=3, worker=1) as client:
        assert client.consistency_model == "bounded:2" and client.worker == 1 and client.workers == 3
        with pytest.raises(tessera.TableError):
            client.table("no-such-table")
        with pytest.raises(LookupError):
            client.table("no-such-table")
        client.create_table("defined", dim=4)
        with pytest.raises(tessera.Error):
            client.create_table("defined", dim=8)  # exists with another definition


def test_a_closed_client_raises_closed_error(shared_server):
    client = tessera.Client([shared_server.addr], transport="tcp")
    t = client.create_table("closing", dim=2, updater="sum")
    keys = np.arange(2, dtype=np.uint64)
    ticket = t.push(keys, np.ones((2, 2), dtype=np.float32))
    with client:
        pass  # the context manager closes it
    assert client.closed
    for call in (lambda: t.pull(keys), lambda: t.push(keys, np.ones((2, 2), dtype=np.float32)), lambda: client.table("closing"), ticket.wait, lambda: client.set_clock(3)):
        with pytest.raises(tessera.ClosedError):
            call()
    client.close()  # twice is fine


def test_a_dead_server_raises_connection_errors():
    with Server() as s:
        addr = s.addr
        client = tessera.Client([addr], transport="tcp", reconnect_attempts=1, io_timeout_ms=2000)
        t = client.create_table("dead", dim=2, updater="sum")
        keys = np.arange(2, dtype=np.uint64)
        t.push(keys, np.ones((2, 2), dtype=np.float32)).wait()
    # The server is killed: calls fail with a connection error (OutcomeUnknownError for a call
    # in flight), none crashes, and the built-in ConnectionError catches them too.
    for _ in range(3):
        with pytest.raises(tessera.ConnectionError):
            t.pull(keys)
    with pytest.raises(ConnectionError):
        t.push(keys, np.ones((2, 2), dtype=np.float32)).wait()
    client.close()
    with pytest.raises(tessera.ConnectionError, match="cannot connect"):
        tessera.Client([addr], transport="tcp")


def test_a_wait_with_a_timeout_keeps_the_ticket_in_flight():
    # A stopped server (SIGSTOP) answers nothing until it is continued.
    with Server() as s, tessera.Client([s.addr], transport="tcp") as client:
        t = client.create_table("slow", dim=2, updater="sum")
        keys = np.arange(2, dtype=np.uint64)
        # A worker's first push to a range asks the range's head how many of its pushes it
        # holds, in the call: that one goes before the pause.
        t.push(keys, np.zeros((2, 2), dtype=np.float32)).wait()
        s.pause()
        try:
            ticket = t.push(keys, np.ones((2, 2), dtype=np.float32))
            started = time.monotonic()
            with pytest.raises(tessera.TimeoutError):
                ticket.wait(timeout=0.2)
            assert 0.15 < time.monotonic() - started < 5
            assert not ticket.ready() and not ticket.done
        finally:
            s.resume()
        assert ticket.wait(timeout=30) is None
        assert (t.pull(keys) == 1).all()


def test_closing_the_client_ends_a_wait_in_another_thread():
    with Server() as s:
        client = tessera.Client([s.addr], transport="tcp")
        t = client.create_table("close-wait", dim=2, updater="sum")
        t.push(np.arange(2, dtype=np.uint64), np.zeros((2, 2), dtype=np.float32)).wait()  # (see above)
        s.pause()
        try:
            ticket = t.push(np.arange(2, dtype=np.uint64), np.ones((2, 2), dtype=np.float32))
            raised = []

            def wait():
                try:
                    ticket.wait()
                except tessera.Error as e:
                    raised.append(e)

            waiter = threading.Thread(target=wait)
            waiter.start()
            time.sleep(0.2)
            started = time.monotonic()
            client.close()
            waiter.join(5)
            assert not waiter.is_alive() and time.monotonic() - started < 1
            assert isinstance(raised[0], tessera.ClosedError)
            with pytest.raises(tessera.ClosedError):
                ticket.wait()
        finally:
            s.resume()


def test_waits_release_the_gil():
    """A thread blocked in a wait on a stopped server leaves the interpreter to the others."""
    with Server() as s, tessera.Client([s.addr], transport="tcp") as client:
        t = client.create_table("gil", dim=2, updater="sum")
        keys = np.arange(2, dtype=np.uint64)
        s.pause()
        try:
            blocked = threading.Thread(target=lambda: t.pull(keys))
            blocked.start()
            time.sleep(0.1)
            counted, deadline = 0, time.monotonic() + 0.3
            while time.monotonic() < deadline:
                counted += 1
            assert blocked.is_alive() and counted > 10_000, f"main thread ran {counted} loops while the pull waited"
        finally:
            s.resume()
        blocked.join(30)
        assert not blocked.is_alive()


def test_bounded_delay_pulls_wait_for_the_slow_worker(shared_server):
    """Under bounded:0 a pull by worker 0 at clock 2 returns only once worker 1's clock-1 push is
    in (the servers' vector clocks say so); pull_async then has its values at once."""
    with tessera.Client([shared_server.addr], worker=0, workers=2, consistency="bounded:0") as fast, tessera.Client(
        [shared_server.addr], worker=1, workers=2, consistency="bounded:0"
    ) as slow:
        t_fast = fast.create_table("bounded", kind="dense", dim=1, updater="sum", end=8)
        t_slow = slow.table("bounded")
        fast.set_clock(1)
        t_fast.push_range(0, np.ones(8, dtype=np.float32)).wait()
        fast.set_clock(2)
        got = {}
        puller = threading.Thread(target=lambda: got.setdefault("values", t_fast.pull_range(0, 8)))
        puller.start()
        time.sleep(0.3)
        assert puller.is_alive(), "the pull waits for worker 1"
        slow.set_clock(1)
        t_slow.push_range(0, np.full(8, 2, dtype=np.float32)).wait()
        puller.join(10)
        assert not puller.is_alive()
        assert (got["values"] == 3).all(), "it saw worker 1's push"
        ticket = t_fast.pull_range_async(0, 8)
        assert ticket.done and (ticket.wait() == 3).all()
