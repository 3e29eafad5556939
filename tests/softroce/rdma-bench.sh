#!/usr/bin/env bash
# Runs inside the SoftRoCE guest (tests/softroce/run.sh tests/softroce/rdma-bench.sh): perftest on
# rxe0, then `tessera bench` over RDMA (one server; and, at one size, a replicated cluster beside
# one server) and over TCP, all in the same guest, and prints Tessera's ratios to perftest.
# SoftRoCE gives ratios, not hardware speed.
#
# An emulated guest's speed drifts by tens of percent within seconds (the host is shared; in one
# guest perftest's own 8 B write latency read 9.4 and 14.2 us a minute apart), so the comparison
# runs in BENCH_ROUNDS rounds, and within a round each latency size runs right after perftest's
# pairs at that size (seconds apart, not a minute), then the bandwidth sizes after perftest's.
# The summary gives each ratio's median over the rounds beside its range. Tessera's shard and
# worker are pinned to one vCPU each (--pin), as perftest's server and client are.
#
#   TESSERA_BIN_RELEASE  the binary (default target/release/tessera, built with --features rdma)
#   BENCH_SECONDS        time per size and operation (default 1)
#   BENCH_ROUNDS         rounds (default 7)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${TESSERA_BIN_RELEASE:-$here/../../target/release/tessera}
secs=${BENCH_SECONDS:-1}
rounds=${BENCH_ROUNDS:-7}
out=$(mktemp -d /tmp/rdma-bench.XXXXXX)
# One shard, and pollers that spin 1 ms before they sleep: longer than any round trip here, so
# during pushes both sides busy-poll as perftest's pair does, while a shard with nothing to do
# (a pull is a one-sided READ) goes to sleep, as ib_read_lat's server sits idle. Under SoftRoCE
# the kernel serves READs with the CPU; with the shard spinning on the other vCPU all along
# (--rdma-spin-us 1000000, used until 2026-11-22), 8 B pulls ran at the guest's slow READ speed
# in 5 of 6 alternating rounds, against 2 of 6 with a short spin.
# The bench is a one-worker job, so its tables track one worker's clock (--workers-max 1, as
# that flag's help advises): each dense block then carries one clock entry, not 16. Each
# latency size also runs with the default 16 (rdma16-*), to show what a 16-worker job's
# blocks cost a pull.
rdma=(--transport rdma --shards 1 --pin --rdma-spin-us 1000 --seconds "$secs")
job=(--workers-max 1)
# Only what is compared with perftest runs over RDMA: the ping, pushes and pulls at the latency
# sizes, pipelined pushes at the bandwidth sizes (the push+pull round trip and the raw TCP echo
# run once, in the TCP comparison at the end). The time saved buys rounds: 7, not 5.
lat_ops=(--ops ping,push,pull)
# Pipelined pushes keep 16 in flight, as every earlier run of this comparison did (the bench's
# default became 32 for replicated streams on TCP; 32 has not been measured here yet).
bw_ops=(--ops pipelined --window 16)
# A replicated cluster's push against the same perftest pair, in each round at one latency size:
# three servers in one process, every range on a chain of three, beside one unreplicated server
# measured in the same run (`tessera bench --replicas`, which starts them all; unpinned, since
# four servers' shards share the two vCPUs).
replicated_size=4096
replicated=(--replicas 3 --transport rdma --shards 1 --seconds "$secs")

# perftest calibrates its clock against gettimeofday, which an emulated guest sometimes upsets
# (it prints inf); perftest.sh retries each pair, and a pair that still fails only loses its
# ratios, said here. Tessera's own bench failing fails the run.
perftest() {  # perftest SET FILE [LATENCY_SIZES]
  if ! PERFTEST_SET=$1 PERFTEST_LAT_SIZES=${3:-8 64 512 4096} "$here/perftest.sh" > "$2"; then
    echo "rdma-bench: WARNING: some perftest pairs failed; their ratios are missing below" >&2
  fi
  cat "$2"
}

# bench ARGS...: `tessera bench`, which a run should finish in well under BENCH_LIMIT_S (default
# 300) seconds. One that does not is a hang: print what each of its threads is blocked in, then
# fail the run rather than sit out the VM's whole time limit.
limit=${BENCH_LIMIT_S:-300}
bench() {
  "$bin" bench "$@" &
  local pid=$! waited=0
  while kill -0 $pid 2>/dev/null && [ $waited -lt "$limit" ]; do sleep 1; waited=$((waited + 1)); done
  if kill -0 $pid 2>/dev/null; then
    echo "rdma-bench: tessera bench $* did not finish in $limit s; its threads:" >&2
    for t in /proc/$pid/task/*; do
      echo "  $(cat "$t/comm") state=$(awk '{print $3}' "$t/stat") wchan=$(cat "$t/wchan") syscall=$(cut -d' ' -f1 "$t/syscall")" >&2
    done
    kill -9 $pid
    exit 1
  fi
  wait $pid
}

for r in $(seq "$rounds"); do
  for size in 8 64 512 4096; do
    echo "== round $r/$rounds: perftest latency at $size B on ${RDMA_DEV:-rxe0}, then tessera bench --transport rdma"
    perftest lat "$out/perftest-lat-$r-$size.jsonl" "$size"
    bench "${rdma[@]}" "${job[@]}" "${lat_ops[@]}" --sizes "$size" --perftest "$out/perftest-lat-$r-$size.jsonl" --json-out "$out/rdma-lat-$r-$size.json"
    bench "${rdma[@]}" --workers-max 16 "${lat_ops[@]}" --sizes "$size" --perftest "$out/perftest-lat-$r-$size.jsonl" --json-out "$out/rdma16-lat-$r-$size.json" > /dev/null
    if [ "$size" = "$replicated_size" ]; then
      bench "${replicated[@]}" "${job[@]}" --sizes "$size" --perftest "$out/perftest-lat-$r-$size.jsonl" --json-out "$out/replicated-lat-$r.json"
    fi
  done
  echo "== round $r/$rounds: perftest bandwidth on ${RDMA_DEV:-rxe0}"
  perftest bw "$out/perftest-bw-$r.jsonl"
  echo "== round $r/$rounds: tessera bench --transport rdma, bandwidth sizes"
  bench "${rdma[@]}" "${job[@]}" "${bw_ops[@]}" --sizes 64K,256K,1M,4M --perftest "$out/perftest-bw-$r.jsonl" --json-out "$out/rdma-bw-$r.json"
done
echo "== tessera bench --transport tcp (same guest, for comparison)"
bench --transport tcp --shards 1 "${job[@]}" --sizes 8,64,512,4K,64K,256K,1M,4M --seconds "$secs"
echo "== summary (--workers-max 1: the bench's one worker)"
python3 "$here/ratios.py" "$out"/rdma-*.json
echo "== summary of the latency sizes with --workers-max 16 (16 clock entries in every dense block)"
python3 "$here/ratios.py" "$out"/rdma16-*.json
echo "== summary of tessera bench --replicas 3 at $replicated_size B: a chain of three's push and pull, and the unreplicated server's beside it in the same process"
python3 "$here/ratios.py" "$out"/replicated-*.json
