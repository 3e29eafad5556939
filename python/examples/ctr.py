"""A click-through-rate trainer on Tessera, beside the same model on a torch.distributed.rpc
parameter server built as PyTorch's parameter-server tutorial builds one.

    python python/examples/ctr.py --workers 2 --examples 200000

Data: generated from a known model (no download). Each example has FIELDS categorical features,
ids drawn with a power-law skew from each field's vocabulary; the click probability is
sigmoid(bias + first-order weights + pairwise factor products) of the true model, so the best
reachable held-out AUC is the true model's own, printed beside the trained ones.

Model: one embedding row (DIM floats) per id, the FIELDS rows concatenated into a small MLP.

- Tessera: each worker process is a Tessera client (worker id = its rank). The embedding rows
  live in a sparse table (adagrad on the servers), the MLP in a dense table through DenseSync
  (adagrad too); the trainers hold no optimizer state.
- RPC baseline: rank 0 is the parameter server holding the whole model; trainers call its
  forward with rpc, run dist_autograd.backward, and step a DistributedOptimizer (Adagrad), as
  the tutorial does.

Both use the same data, model, initial scale, optimizer and learning rate, batch size and worker
count. Each prints examples/s over the training phase and held-out AUC and log-loss; --profile
adds where each trainer's time went.
"""

from __future__ import annotations

import argparse
import json
import warnings
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

FIELDS = 8
DIM = 8
HIDDEN = 64


# --- data from a known model -------------------------------------------------------------------


class TrueModel:
    """The generating model: per-id bias and a K-factor vector per id (a factorisation machine)."""

    K = 4

    def __init__(self, vocab: int, seed: int):
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.bias = -1.0
        self.w = rng.normal(0, 0.6, FIELDS * vocab).astype(np.float32)
        self.v = rng.normal(0, 0.35, (FIELDS * vocab, self.K)).astype(np.float32)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        first = self.w[ids].sum(1)
        v = self.v[ids]  # (n, FIELDS, K)
        s = v.sum(1)
        pairs = 0.5 * ((s * s).sum(1) - (v * v).sum((1, 2)))
        return self.bias + first + pairs


def make_data(n: int, vocab: int, seed: int, model_seed: int = 7):
    """(ids, labels, true probabilities): ids (n, FIELDS) int64 in one index space (field f's ids
    are f * vocab + [0, vocab)), labels float32 in {0, 1}."""
    rng = np.random.default_rng(seed)
    local = np.minimum((vocab * rng.random((n, FIELDS)) ** 2.5).astype(np.int64), vocab - 1)
    ids = local + np.arange(FIELDS, dtype=np.int64) * vocab
    p = 1 / (1 + np.exp(-TrueModel(vocab, model_seed).logits(ids)))
    labels = (rng.random(n) < p).astype(np.float32)
    return ids, labels, p


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties counted half), by ranks."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    pos = labels > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


# --- the model ---------------------------------------------------------------------------------


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FIELDS * DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows.reshape(rows.shape[0], FIELDS * DIM)).squeeze(1)


class CtrModel(nn.Module):
    """The whole model in one module (the RPC baseline's parameter server holds this)."""

    def __init__(self, vocab: int, init_scale: float):
        super().__init__()
        self.emb = nn.Embedding(FIELDS * vocab, DIM, sparse=True)
        nn.init.uniform_(self.emb.weight, -init_scale, init_scale)
        self.mlp = Mlp()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(ids))


class Phases:
    """Seconds per phase of a training loop (the profile)."""

    def __init__(self):
        self.s = {}
        self.t = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.s[phase] = self.s.get(phase, 0.0) + now - self.t
        self.t = now


def train_local(args) -> dict:
    """The same model trained in one process by torch.optim.Adagrad, on all the training data
    (no server, one worker): the quality the distributed runs should match."""
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    torch.manual_seed(0)
    ids, labels, _ = make_data(args.examples, args.vocab, seed=1)
    model = CtrModel(args.vocab, args.init_scale)
    opt = torch.optim.Adagrad(model.parameters(), lr=args.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(args.epochs):
        for b in range(0, args.examples, args.batch):
            opt.zero_grad()
            loss_fn(model(torch.from_numpy(ids[b : b + args.batch])), torch.from_numpy(labels[b : b + args.batch])).backward()
            opt.step()
    held, held_labels, _ = make_data(args.held_out, args.vocab, seed=2)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(held))).numpy()
    return {"auc": auc(held_labels, p), "log_loss": log_loss(held_labels, p)}


# --- Tessera -----------------------------------------------------------------------------------


def tessera_worker(rank: int, args, addr: str, barrier, results) -> None:
    import tessera
    import tessera.torch as tt

    torch.set_num_threads(1)
    torch.manual_seed(1000 + rank)
    ids, labels, _ = make_data(args.examples, args.vocab, seed=1)
    mine = np.arange(rank, args.examples, args.workers)
    # `addr` is one server, or a replicated cluster's servers separated by commas.
    with tessera.Client(addr.split(","), worker=rank, workers=args.workers, consistency=args.consistency, transport="tcp") as client:
        table = client.create_table("ctr.emb", kind="sparse", dim=DIM, updater=f"adagrad{{lr={args.lr}}}", init_scale=args.init_scale, init_seed=3)
        emb = tt.Embedding(table)
        mlp = Mlp()
        dense = tt.DenseSync(client, mlp, name="ctr.mlp", updater=f"adagrad{{lr={args.lr}}}")
        loss_fn = nn.BCEWithLogitsLoss()
        barrier.wait()
        start, cpu = time.perf_counter(), time.process_time()
        ph = Phases()
        step = 0
        for epoch in range(args.epochs):
            for b in range(0, len(mine), args.batch):
                batch = mine[b : b + args.batch]
                step += 1
                client.set_clock(step)
                x, y = torch.from_numpy(ids[batch]), torch.from_numpy(labels[batch])
                ph.mark("data")
                rows = emb(x)  # pull
                ph.mark("pull embeddings")
                loss = loss_fn(mlp(rows), y)
                ph.mark("forward")
                loss.backward()  # pushes the embedding gradients
                ph.mark("backward + push embeddings")
                dense.step()  # push MLP gradients, pull MLP
                ph.mark("push + pull MLP")
            if rank == 0:
                print(f"  tessera worker 0: epoch {epoch + 1} done, last batch loss {loss.item():.4f}", flush=True)
        emb.flush()
        dense.flush()
        ph.mark("flush")
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        barrier.wait()
        wall = time.perf_counter() - start
        result = {"rank": rank, "seconds": seconds, "cpu_s": cpu, "wall": wall, "examples": len(mine) * args.epochs, "phases": ph.s}
        if rank == 0:
            result.update(evaluate_tessera(args, client, emb, mlp, dense))
        results.put(result)


def evaluate_tessera(args, client, emb, mlp, dense) -> dict:
    emb.eval()
    dense.pull()
    ids, labels, p_true = make_data(args.held_out, args.vocab, seed=2)
    with torch.no_grad():
        p = torch.sigmoid(mlp(emb(torch.from_numpy(ids)))).numpy()
    return {"auc": auc(labels, p), "log_loss": log_loss(labels, p)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_tessera(args) -> dict:
    server = start_server(args)
    try:
        before = cpu_seconds(server[0].pid)  # creating tables is not training
        summary = spawn(tessera_worker, args, server[1])
        summary["server_cpu_s"] = cpu_seconds(server[0].pid) - before
        return summary
    finally:
        server[0].kill()
        server[0].wait()


def start_server(args):
    binary = args.tessera_bin
    port = free_port()
    addr = f"127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="tessera-ctr-", suffix=".log", delete=False)
    proc = subprocess.Popen([binary, "server", "--listen", addr, "--shards", str(args.shards), "--no-pin"], stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if "listening on" in Path(log.name).read_text():
            return proc, addr
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"tessera server did not start: {Path(log.name).read_text()}")


def spawn(fn, *a) -> dict:
    """Runs fn(rank, *a) in args.workers processes; returns their results."""
    args = a[0]
    ctx = torch.multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(args.workers), ctx.Queue()
    procs = [ctx.Process(target=fn, args=(rank, *a, barrier, results)) for rank in range(args.workers)]
    for p in procs:
        p.start()
    out = [results.get(timeout=args.timeout_s) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a worker exited with {p.exitcode}")
    return summarize(out)


def summarize(out: list) -> dict:
    out.sort(key=lambda r: r["rank"])
    examples = sum(r["examples"] for r in out)
    wall = max(r["wall"] for r in out)
    summary = {"examples_per_s": examples / wall, "seconds": wall, "examples": examples}
    summary.update({k: v for r in out for k, v in r.items() if k in ("auc", "log_loss")})
    summary["phases"] = {f"worker {r['rank']}": {k: round(v, 3) for k, v in r["phases"].items()} for r in out}
    summary["worker_cpu_s"] = [round(r["cpu_s"], 2) for r in out]
    return summary


# --- torch.distributed.rpc parameter server (PyTorch's tutorial) --------------------------------

_PS: "ParameterServer | None" = None


class ParameterServer(nn.Module):
    """The tutorial's parameter server: holds the model, runs forward for trainers."""

    def __init__(self, vocab: int, init_scale: float):
        super().__init__()
        torch.manual_seed(0)
        self.model = CtrModel(vocab, init_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Trainers run forward, backward and optimizer steps concurrently (asynchronous SGD, as
        # in the tutorial). The MLP's weights are saved for its backward pass, so it runs on
        # copies (clone is differentiable: gradients reach the parameters); otherwise another
        # trainer's in-place step would break this backward. Embeddings save no weights.
        mlp = self.model.mlp
        weights = {name: p.clone() for name, p in mlp.named_parameters()}
        return torch.func.functional_call(mlp, weights, (self.model.emb(ids),))

    def get_param_rrefs(self):
        from torch.distributed.rpc import RRef

        return [RRef(p) for p in self.model.parameters()]


def get_parameter_server(vocab: int, init_scale: float):
    global _PS
    if _PS is None:
        _PS = ParameterServer(vocab, init_scale)
    return _PS


def ps_forward(ids):
    assert _PS is not None, "the parameter server is made before trainers call it"
    return _PS(ids)


def ps_evaluate(held_out: int, vocab: int):
    ids, labels, _ = make_data(held_out, vocab, seed=2)
    assert _PS is not None
    with torch.no_grad():
        p = torch.sigmoid(_PS(torch.from_numpy(ids))).numpy()
    return {"auc": auc(labels, p), "log_loss": log_loss(labels, p)}


def rpc_process(rank: int, args, port: int, barrier, results) -> None:
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    import torch.distributed.autograd as dist_autograd
    import torch.distributed.rpc as rpc
    from torch.distributed.optim import DistributedOptimizer

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    world = args.workers + 1
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=300)
    if rank == 0:
        rpc.init_rpc("ps", rank=0, world_size=world, rpc_backend_options=opts)
        get_parameter_server(args.vocab, args.init_scale)
        rpc.shutdown()  # waits for the trainers
        results.put({"rank": "ps", "cpu_s": time.process_time()})
        return
    rpc.init_rpc(f"trainer{rank}", rank=rank, world_size=world, rpc_backend_options=opts)
    trainer = rank - 1
    ids, labels, _ = make_data(args.examples, args.vocab, seed=1)
    mine = np.arange(trainer, args.examples, args.workers)
    ps_rref = rpc.remote("ps", get_parameter_server, args=(args.vocab, args.init_scale))
    param_rrefs = ps_rref.rpc_sync().get_param_rrefs()
    opt = DistributedOptimizer(torch.optim.Adagrad, param_rrefs, lr=args.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    ph = Phases()
    for epoch in range(args.epochs):
        for b in range(0, len(mine), args.batch):
            batch = mine[b : b + args.batch]
            x, y = torch.from_numpy(ids[batch]), torch.from_numpy(labels[batch])
            ph.mark("data")
            with dist_autograd.context() as cid:
                logits = rpc.rpc_sync("ps", ps_forward, args=(x,))
                ph.mark("rpc forward")
                loss = loss_fn(logits, y)
                dist_autograd.backward(cid, [loss])
                ph.mark("dist_autograd backward")
                opt.step(cid)
                ph.mark("optimizer step (rpc)")
        if trainer == 0:
            print(f"  rpc trainer 0: epoch {epoch + 1} done, last batch loss {loss.item():.4f}", flush=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    barrier.wait()
    wall = time.perf_counter() - start
    result = {"rank": trainer, "seconds": seconds, "cpu_s": cpu, "wall": wall, "examples": len(mine) * args.epochs, "phases": ph.s}
    if trainer == 0:
        result.update(rpc.rpc_sync("ps", ps_evaluate, args=(args.held_out, args.vocab)))
    results.put(result)
    rpc.shutdown()


def run_rpc(args) -> dict:
    ctx = torch.multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(args.workers), ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rpc_process, args=(rank, args, port, barrier, results)) for rank in range(args.workers + 1)]
    for p in procs:
        p.start()
    out = [results.get(timeout=args.timeout_s) for _ in range(args.workers + 1)]
    for p in procs:
        p.join()
    ps = [r for r in out if r["rank"] == "ps"]
    summary = summarize([r for r in out if r["rank"] != "ps"])
    summary["server_cpu_s"] = ps[0]["cpu_s"]  # its whole life, set-up and evaluation included
    return summary


# --- main --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_bin() -> str:
    root = Path(__file__).resolve().parents[2]
    for p in (os.environ.get("TESSERA_BIN"), root / "target/release/tessera", root / "target/debug/tessera", shutil.which("tessera")):
        if p and Path(p).exists():
            return str(p)
    return "tessera"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="trainer processes (each a Tessera worker / an RPC trainer)")
    ap.add_argument("--examples", type=int, default=300_000, help="training examples per epoch")
    ap.add_argument("--held-out", type=int, default=50_000, help="held-out examples")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1_000, help="ids per field")
    ap.add_argument("--lr", type=float, default=0.05, help="adagrad learning rate, embeddings and MLP")
    ap.add_argument("--init-scale", type=float, default=0.05, help="embeddings start uniform in [-s, s)")
    ap.add_argument("--consistency", default="eventual", help="Tessera: eventual, sequential or bounded:N")
    ap.add_argument("--shards", type=int, default=1, help="shards of the Tessera server")
    ap.add_argument("--tessera-bin", default=default_bin(), help="the tessera binary (release build for figures)")
    ap.add_argument("--skip-rpc", action="store_true", help="train on Tessera only")
    ap.add_argument("--profile", action="store_true", help="print where each trainer's time went")
    ap.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    ap.add_argument("--timeout-s", type=float, default=1800)
    return ap


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    ids, labels, p_true = make_data(args.held_out, args.vocab, seed=2)
    best = {"auc": auc(labels, p_true), "log_loss": log_loss(labels, p_true)}
    print(f"data: {args.examples} training examples x {args.epochs} epochs, {args.held_out} held out, {FIELDS} fields of {args.vocab} ids; "
          f"true model: AUC {best['auc']:.4f}, log-loss {best['log_loss']:.4f}", flush=True)
    report = {"true_model": best, "args": vars(args)}
    report["local"] = local = train_local(args)
    print(f"the same model trained in one process (torch.optim.Adagrad, no server): AUC {local['auc']:.4f}, log-loss {local['log_loss']:.4f}", flush=True)
    runs = [("tessera", run_tessera)] + ([] if args.skip_rpc else [("rpc", run_rpc)])
    for name, run in runs:
        print(f"{name}: training with {args.workers} workers ...", flush=True)
        r = run(args)
        report[name] = r
        print(f"{name}: {r['examples_per_s']:,.0f} examples/s ({r['examples']} in {r['seconds']:.1f} s); held-out AUC {r['auc']:.4f}, log-loss {r['log_loss']:.4f}", flush=True)
        if args.profile:
            print(f"  CPU seconds: workers {r['worker_cpu_s']}, server {r['server_cpu_s']:.2f}")
            for worker, phases in r["phases"].items():
                total = sum(phases.values())
                parts = ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in phases.items())
                print(f"  {worker}: {parts}")
    if "rpc" in report:
        ratio = report["tessera"]["examples_per_s"] / report["rpc"]["examples_per_s"]
        report["speedup"] = ratio
        print(f"tessera / rpc: {ratio:.2f}x examples/s; AUC {report['tessera']['auc']:.4f} vs {report['rpc']['auc']:.4f}")
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
