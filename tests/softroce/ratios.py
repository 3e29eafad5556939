#!/usr/bin/env python3
"""Summarises `tessera bench --json-out` reports taken in rounds against perftest.

    ratios.py REPORT.json...

For every (size, comparison) the reports share, prints the median ratio over the reports, the
lowest and highest, whether the median meets the target (latency <= 1.5x perftest, bandwidth
>= 0.8x), and "best": each side's best round against the other's (the lowest latency or the
highest bandwidth over the rounds). The guest hands each process one of two speeds for RDMA
READs (and drifts for everything else), so a round whose two processes drew different speeds
says little; the best of each side compares the two at the same speed. Exit code 0 either way:
the figures are for reading, not a gate.
"""
import json
import statistics
import sys

LATENCY_MAX = 1.5
BANDWIDTH_MIN = 0.8


def human(n):
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def main(paths):
    seen = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for p in report["perftest"]:
            seen.setdefault((p["size_bytes"], p["what"]), []).append((p["ratio"], p["tessera"], p["perftest"]))
    if not seen:
        print("ratios.py: no perftest comparisons in", " ".join(paths))
        return 1
    print(f"{'size':>9}  {'comparison':<60} {'rounds':>6} {'median':>7} {'range':>13} {'best':>5}  target")
    for (size, what), rounds in sorted(seen.items()):
        ratios = [r for r, _, _ in rounds]
        med = statistics.median(ratios)
        bandwidth = "MiB/s" in what
        best_of = max if bandwidth else min
        best = best_of(t for _, t, _ in rounds) / best_of(p for _, _, p in rounds)
        met = med >= BANDWIDTH_MIN if bandwidth else med <= LATENCY_MAX
        goal = f">= {BANDWIDTH_MIN}" if bandwidth else f"<= {LATENCY_MAX}"
        span = f"{min(ratios):.2f}-{max(ratios):.2f}"
        verdict = f"{goal}: {'met' if met else 'MISSED'}"
        if what.startswith("ping"):
            verdict = "no target: the transport alone, beside the pushes"
        elif what.startswith("replicated"):
            verdict = "no target: a replicated cluster, beside the unreplicated server"
        print(f"{human(size):>9}  {what:<60} {len(ratios):>6} {med:>7.2f} {span:>13} {best:>5.2f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
