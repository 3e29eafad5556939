#!/usr/bin/env bash
# Runs inside the SoftRoCE guest (tests/softroce/run.sh tests/softroce/ab.sh A B): times two
# `tessera` binaries against each other, alternating them in rounds, with the flags rdma-bench.sh
# uses for its latency rows. The guest's speed drifts with the shared host over seconds, so two
# binaries run minutes apart cannot be compared; alternated within a round, each pair of runs
# sees nearly the same guest, and the per-round ratio B/A cancels most of the drift.
#
#   AB_ROUNDS   rounds (default 6); each runs A then B, or B then A on odd rounds
#   AB_SIZES    sizes (default 8,512)
#   AB_OPS      operations (default ping,push)
#   AB_SECONDS  time per size and operation (default 1)
#
# Prints each round's p50s and, per (op, size), the median p50 of each binary and the median and
# range of the per-round ratio B/A (below 1: B is faster).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: ab.sh BINARY_A BINARY_B (inside the guest: tests/softroce/run.sh tests/softroce/ab.sh A B)" >&2; exit 2; }
bins=("$1" "$2")
for b in "${bins[@]}"; do [ -x "$b" ] || { echo "ab.sh: $b is not an executable" >&2; exit 2; }; done
rounds=${AB_ROUNDS:-6}
out=$(mktemp -d /tmp/ab.XXXXXX)
for r in $(seq "$rounds"); do
  order=(0 1)
  [ $((r % 2)) -eq 1 ] || order=(1 0)
  for i in "${order[@]}"; do
    "${bins[$i]}" bench --transport rdma --shards 1 --pin --rdma-spin-us 1000 --workers-max 1 \
      --seconds "${AB_SECONDS:-1}" --ops "${AB_OPS:-ping,push}" --sizes "${AB_SIZES:-8,512}" \
      --json-out "$out/$i-$r.json" > /dev/null
  done
  echo "== round $r/$rounds done"
done
python3 - "$out" "$rounds" "${bins[@]}" <<'EOF'
import json, statistics, sys
out, rounds, a, b = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def rows(i, r):
    with open(f"{out}/{i}-{r}.json") as f:
        return {(x["op"], x["size_bytes"]): x["p50_us"] for x in json.load(f)["results"]}
p50 = {}
for r in range(1, rounds + 1):
    for i in (0, 1):
        for key, v in rows(i, r).items():
            p50.setdefault(key, ([], []))[i].append(v)
print(f"A = {a}\nB = {b}")
print(f"{'op':>6} {'size':>6}  {'A p50 us (median)':>18} {'B p50 us (median)':>18} {'B/A median':>10} {'B/A range':>13}  rounds")
for (op, size), (xa, xb) in sorted(p50.items()):
    ratios = [vb / va for va, vb in zip(xa, xb)]
    print(f"{op:>6} {size:>6}  {statistics.median(xa):18.2f} {statistics.median(xb):18.2f} "
          f"{statistics.median(ratios):10.3f} {min(ratios):6.3f}-{max(ratios):6.3f}  {len(ratios)}")
    print(f"{'':>14}A: {' '.join(f'{v:.1f}' for v in xa)}\n{'':>14}B: {' '.join(f'{v:.1f}' for v in xb)}")
EOF
