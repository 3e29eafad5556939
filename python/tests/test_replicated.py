"""The same package against a replicated cluster (a coordinator and three servers, every range
on a chain of two): the same calls, the same floats, the same errors, and a trainer."""

import json
import subprocess
import threading

import numpy as np
import pytest

import tessera
from conftest import Cluster, Server
from test_client import replay_bin, script


@pytest.fixture(scope="module")
def cluster():
    with Cluster() as c:
        yield c


@pytest.mark.parametrize("key_cache_keys", [0, 1 << 20])
def test_pulls_from_a_replicated_cluster_equal_the_rust_clients_on_one_server(tmp_path, cluster, key_cache_keys):
    tables, ops, pulls = script(seed=9)
    # Adam's bias correction counts the pushes each table part applied, and a replicated push is
    # applied piece by piece per replication range: its floats differ by design. Adagrad's do not.
    tables[1]["updater"] = "adagrad{lr=0.01}"
    with Server() as rust_side:
        path = tmp_path / "script.json"
        path.write_text(json.dumps({"servers": [rust_side.addr], "worker": 0, "tables": tables, "ops": ops, "pulls": pulls}))
        ran = subprocess.run([str(replay_bin()), str(path)], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        want = [np.array(p, dtype=np.float32) for p in json.loads(ran.stdout)["pulls"]]

    # With key-list caching, repeated key lists go to the heads and tails by their hash.
    with tessera.Client(cluster.addrs, transport="tcp", key_cache_keys=key_cache_keys) as client:
        emb = client.create_table(f"emb{key_cache_keys}", dim=8, updater="adagrad{lr=0.1}", init_scale=0.05, init_seed=11)
        w = client.create_table(f"w{key_cache_keys}", kind="dense", dim=4, updater="adagrad{lr=0.01}", end=1000)
        tickets = []
        for op in ops:
            if "clock" in op:
                client.set_clock(op["clock"])
            elif "push" in op:
                tickets.append(emb.push(np.array(op["keys"], dtype=np.uint64), np.array(op["values"], dtype=np.float32).reshape(-1, 8)))
            else:
                tickets.append(w.push_range(op["start"], np.array(op["values"], dtype=np.float32)))
        for t in tickets:
            assert t.wait() is None
        assert tickets[-1].stamp == [20], "a replicated push's stamp, as a server's: its keys reached clock 20"
        got = [emb.pull(np.array(pulls[0]["keys"], dtype=np.uint64)), w.pull_range(0, 1000)]
        last = w.pull_range_async(ops[-1]["start"], 100)  # the keys pushed at clock 20
        last.wait()
        assert last.stamp == [20], "the tails' clocks stamp a pull as a server's do"
    for g, wnt in zip(got, want):
        assert np.array_equal(g.reshape(-1).view(np.uint32), wnt.view(np.uint32)), "not the floats one unreplicated server gives"


def test_errors_on_a_replicated_cluster_are_the_same_exceptions(cluster):
    with tessera.Client(cluster.addrs, transport="tcp") as client:
        t = client.create_table("errs", dim=2, updater="sum")
        with pytest.raises(tessera.ArgumentError):
            t.push(np.array([1, 2], dtype=np.uint64), np.ones(3, dtype=np.float32))
        with pytest.raises(tessera.ArgumentError):
            t.push(np.array([1], dtype=np.int64), np.ones(2, dtype=np.float32))
        with pytest.raises(tessera.TableError):
            client.table("no.such.table")
        with pytest.raises(tessera.Error, match="--workers"):
            with tessera.Client(cluster.addrs, worker=40, workers=64, transport="tcp") as stranger:
                stranger.table("errs").push(np.array([1], dtype=np.uint64), np.ones(2, dtype=np.float32)).wait()
    with pytest.raises(tessera.ClosedError):
        t.push(np.array([1], dtype=np.uint64), np.ones(2, dtype=np.float32))


def test_two_workers_under_bounded_delay_on_a_replicated_cluster(cluster):
    """Worker 0 may not run more than one clock ahead of worker 1: its pull waits."""
    with tessera.Client(cluster.addrs, worker=0, workers=2, consistency="bounded:0", transport="tcp") as ahead, \
            tessera.Client(cluster.addrs, worker=1, workers=2, consistency="bounded:0", transport="tcp") as behind:
        t0 = ahead.create_table("bounded", dim=1, updater="sum")
        t1 = behind.table("bounded")
        one = np.ones(1, dtype=np.float32)
        for clock in (1, 2):
            ahead.set_clock(clock)
            t0.push(np.array([7], dtype=np.uint64), one).wait()
        behind.set_clock(1)
        t1.push(np.array([1 << 60], dtype=np.uint64), one).wait()
        ahead.set_clock(3)
        done = threading.Event()
        pulled = []
        waiter = threading.Thread(target=lambda: (pulled.append(t0.pull(np.array([7], dtype=np.uint64))), done.set()))
        waiter.start()
        assert not done.wait(0.3), "the pull did not wait for the worker behind"
        behind.set_clock(2)
        t1.push(np.array([1 << 60], dtype=np.uint64), one).wait()
        assert done.wait(30), "the pull did not return once the worker behind caught up"
        waiter.join()
        assert pulled[0].tolist() == [[2.0]]


def test_two_trainer_processes_train_one_model_on_a_replicated_cluster(cluster):
    from test_torch import LOCAL_GAP_MAX, TRUE_MODEL_GAP_MAX, args_for, ctr, true_auc

    args = args_for(2, 80_000)
    r = ctr.spawn(ctr.tessera_worker, args, ",".join(cluster.addrs))
    best = true_auc(args)
    print(f"two workers on a replicated cluster: held-out AUC {r['auc']:.4f} (true model {best:.4f})")
    assert r["auc"] > ctr.train_local(args)["auc"] - LOCAL_GAP_MAX
    assert r["auc"] > best - TRUE_MODEL_GAP_MAX
