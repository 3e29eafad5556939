#!/usr/bin/env bash
# Runs inside the SoftRoCE guest (tests/softroce/run.sh tests/softroce/rdma-bench.sh): perftest on
# rxe0, then `tessera bench` over RDMA and over TCP, all in the same guest, and prints Tessera's
# ratios to perftest. SoftRoCE gives ratios, not hardware speed.
#
#   TESSERA_BIN   the binary (default target/release/tessera, built with --features rdma)
#   BENCH_SECONDS time per size and operation (default 1)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${TESSERA_BIN_RELEASE:-$here/../../target/release/tessera}
secs=${BENCH_SECONDS:-1}
sizes=8,64,512,4K,64K,256K,1M,4M
baseline=$(mktemp /tmp/perftest.XXXXXX.jsonl)
echo "== perftest on ${RDMA_DEV:-rxe0}"
# perftest calibrates its clock against gettimeofday, which an emulated guest sometimes upsets
# (it prints inf); perftest.sh retries each pair, and a pair that still fails only loses its
# ratios, said here. Tessera's own bench failing fails the run.
if ! "$here/perftest.sh" > "$baseline"; then
  echo "rdma-bench: WARNING: some perftest pairs failed; their ratios are missing below" >&2
fi
cat "$baseline"
# One shard and a long spin: perftest busy-polls one queue pair per side, and so do these.
echo "== tessera bench --transport rdma"
"$bin" bench --transport rdma --shards 1 --rdma-spin-us 1000000 --sizes "$sizes" --seconds "$secs" --perftest "$baseline"
echo "== tessera bench --transport tcp (same guest, for comparison)"
"$bin" bench --transport tcp --shards 1 --sizes "$sizes" --seconds "$secs"
