"""tessera.torch against real servers: the modules compute what torch's own do, training reaches
the known model's quality, and two trainer processes share one model."""

import queue
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import tessera
import tessera.torch as tt
from conftest import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import ctr  # noqa: E402  (the example: data from a known model, the trainer, AUC)


def test_embedding_and_bags_match_torch_and_push_summed_gradients(shared_server):
    torch.manual_seed(0)
    with tessera.Client([shared_server.addr], transport="tcp") as client:
        for mode in ("sum", "mean"):
            table = client.create_table(f"bag.{mode}", kind="dense", dim=3, updater="sgd{lr=1}", end=10)
            start = torch.randn(10, 3)
            table.push_range(0, -start.numpy()).wait()  # sgd with lr 1 subtracts: rows = start
            ids = torch.tensor([[1, 2, 2], [7, 1, 0]])
            ref = torch.nn.EmbeddingBag(10, 3, mode=mode)
            ref.weight.data.copy_(start)
            ours = tt.EmbeddingBag(table, mode=mode)
            out, want = ours(ids), ref(ids)
            assert torch.allclose(out, want)
            weights = torch.randn(2, 3)
            (out * weights).sum().backward()
            (want * weights).sum().backward()
            ours.flush()
            after = torch.from_numpy(table.pull_range(0, 10))
            assert torch.allclose(after, start - ref.weight.grad, atol=1e-6), "the server applied the summed gradient per id"

        table = client.create_table("emb.plain", dim=4, updater="sgd{lr=0.5}", init_scale=0.1, init_seed=1)
        emb = tt.Embedding(table)
        ids = torch.tensor([5, 9, 5, -2])  # -2 is key 2^64 - 2
        rows = emb(ids)
        assert rows.shape == (4, 4) and torch.equal(rows[0], rows[2])
        before = table.pull(np.array([5, 9], dtype=np.uint64))
        rows.sum().backward()
        emb.flush()
        after = table.pull(np.array([5, 9], dtype=np.uint64))
        assert np.allclose(after, before - 0.5 * np.array([[2.0] * 4, [1.0] * 4]), atol=1e-6)
        emb.eval()
        with torch.no_grad():
            assert torch.allclose(emb(torch.tensor([5])), torch.from_numpy(after[:1]))
        with pytest.raises(tessera.ArgumentError):
            emb(torch.tensor([1.5]))


def test_dense_sync_shares_parameters_through_the_table(shared_server):
    with tessera.Client([shared_server.addr], worker=0, workers=2, transport="tcp") as c0:
        torch.manual_seed(1)
        m0 = torch.nn.Linear(4, 2)
        s0 = tt.DenseSync(c0, m0, name="sync", updater="sgd{lr=0.1}", dim=3)
        with tessera.Client([shared_server.addr], worker=1, workers=2, transport="tcp") as c1:
            torch.manual_seed(2)
            m1 = torch.nn.Linear(4, 2)
            s1 = tt.DenseSync(c1, m1, name="sync", updater="sgd{lr=0.1}", dim=3)
            assert torch.equal(m1.weight, m0.weight), "worker 1 starts from worker 0's parameters"
            w = m0.weight.detach().clone()
            m1(torch.ones(1, 4)).sum().backward()
            s1.step()
            s1.flush()
            s0.pull()
            assert torch.allclose(m0.weight, w - 0.1), "worker 0 sees worker 1's step"


def args_for(workers: int, examples: int):
    return ctr.parser().parse_args(["--workers", str(workers), "--examples", str(examples), "--held-out", "20000", "--epochs", "1", "--vocab", "300", "--lr", "0.05"])


def true_auc(args) -> float:
    ids, labels, p = ctr.make_data(args.held_out, args.vocab, seed=2)
    return ctr.auc(labels, p)


# This MLP on concatenated embeddings reaches about 0.78 held-out AUC on this data however long
# it trains in one process (0.7799 after one epoch, 0.7801 after three), against the generating
# model's 0.87: the pairwise products of the true model are hard for it. So training through
# Tessera must match local training closely, and the true model within this bound.
TRUE_MODEL_GAP_MAX = 0.10
LOCAL_GAP_MAX = 0.01


def test_training_reaches_the_known_models_quality():
    args = args_for(1, 80_000)
    best, local = true_auc(args), ctr.train_local(args)["auc"]
    results: "queue.Queue" = queue.Queue()
    with Server() as s:
        ctr.tessera_worker(0, args, s.addr, threading.Barrier(1), results)
    r = results.get_nowait()
    print(f"held-out AUC {r['auc']:.4f} (trained locally {local:.4f}, true model {best:.4f}), log-loss {r['log_loss']:.4f}")
    assert r["auc"] > local - LOCAL_GAP_MAX, f"AUC {r['auc']:.4f}; the same model trained locally reaches {local:.4f}"
    assert r["auc"] > best - TRUE_MODEL_GAP_MAX, f"AUC {r['auc']:.4f} is not within {TRUE_MODEL_GAP_MAX} of the true model's {best:.4f}"


def test_two_trainer_processes_train_one_model():
    args = args_for(2, 80_000)
    best = true_auc(args)
    with Server() as s:
        r = ctr.spawn(ctr.tessera_worker, args, s.addr)
        with tessera.Client([s.addr], transport="tcp") as client:
            dense = client.table("ctr.mlp")
            ticket = dense.pull_range_async(0, dense.end)
            ticket.wait()
            stamp = ticket.stamp
    print(f"two workers: held-out AUC {r['auc']:.4f} (true model {best:.4f}), stamp {stamp}")
    assert len(stamp) == 2 and min(stamp) >= 150, f"both workers pushed every batch (clocks {stamp})"
    assert r["auc"] > ctr.train_local(args)["auc"] - LOCAL_GAP_MAX
    assert r["auc"] > best - TRUE_MODEL_GAP_MAX


def test_worker_ids_come_from_torchruns_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert tt.worker_from_env() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert tt.worker_from_env() == (3, 4)
