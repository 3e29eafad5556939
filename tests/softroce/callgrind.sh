#!/usr/bin/env bash
# Runs inside the SoftRoCE guest (tests/softroce/run.sh tests/softroce/callgrind.sh): counts the
# user-space instructions one request costs over RDMA, on the worker's thread and on the shard's,
# with valgrind's callgrind around `tessera bench --transport rdma`. Instruction counts do not
# drift with the shared host as the guest's timings do, so they compare two binaries exactly.
#
#   TESSERA_BIN_RELEASE  the binary (default target/release/tessera, built with --features rdma)
#   CALLGRIND_OPS        what to measure, one run each (default "ping push")
#   CALLGRIND_SIZE       message size (default 8)
#   CALLGRIND_BENCH_ARGS more flags for tessera bench (e.g. --fixed-clock)
#   CALLGRIND_OUT        where the callgrind files go (default a temporary directory); put it in
#                        SOFTROCE_RW_DIRS to keep them
#
# How: the bench runs with --rdma-spin-us 0 (valgrind runs one thread at a time, so a spinning
# poller would starve the other), and callgrind collects only inside the worker's call
# (bench::push, bench::ping) and the shard's serving and completion handling (serve_landed,
# reap). Two kinds of figure come out. The thread totals and the functions that wait (the
# link's recv, Ticket::wait) include idle polls and wake-ups, which grow when the guest runs
# slowly (on a busy host, recv read 6,688 instructions a ping against about 900 on a quiet one),
# so do not compare them across runs. The others (sending, serving, posting) do the same work
# whatever the timing and are exact: they matched to the instruction between a quiet run and a
# busy one.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${TESSERA_BIN_RELEASE:-$here/../../target/release/tessera}
out=${CALLGRIND_OUT:-$(mktemp -d /tmp/callgrind.XXXXXX)}
size=${CALLGRIND_SIZE:-8}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
for op in ${CALLGRIND_OPS:-ping push}; do
  dir=$out/$op
  mkdir -p "$dir"
  rm -f "$dir"/callgrind.out.*
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$dir/callgrind.out.%p" \
    --collect-atstart=no --toggle-collect=tessera::bench::push --toggle-collect=tessera::bench::ping \
    --toggle-collect='*State::serve_landed' --toggle-collect='*State::reap' \
    "$bin" bench --transport rdma --shards 1 --rdma-spin-us 0 --seconds 3 --iters-max 1500 \
    --workers-max 1 --ops "$op" --sizes "$size" --json-out "$dir/bench.json" ${CALLGRIND_BENCH_ARGS:-} > "$dir/valgrind.log" 2>&1
  python3 - "$dir" "$op" "$size" <<'EOF'
import glob, re, subprocess, sys
d, op, size = sys.argv[1:]
def annotate(path):
    return subprocess.run(['callgrind_annotate', '--tree=caller', '--inclusive=yes', path],
                          capture_output=True, text=True, check=True).stdout
def functions(text):
    """(inclusive cost, calls recorded from collected callers, name) per function."""
    calls = 0
    for line in text.splitlines():
        m = re.match(r'\s*[\d,]+ .*<.*\((\d[\d,]*)x\)', line)
        if m:
            calls += int(m.group(1).replace(',', ''))
        m = re.match(r'\s*([\d,]+) \([^)]*\)\s+\*\s+[^:]*:(.*?)(?: \[.*)?$', line)
        if m:
            yield int(m.group(1).replace(',', '')), calls, m.group(2)
            calls = 0
        if not line.strip():
            calls = 0
def total(text):
    m = re.search(r'([\d,]+) (?:\([^)]*\)\s+)?PROGRAM TOTALS', text)  # a thread that collected nothing has none
    return int(m.group(1).replace(',', '')) if m else 0
# Thread 1 is the bench's worker; the shard's thread is the other one that collected anything.
texts = [annotate(p) for p in sorted(glob.glob(f'{d}/callgrind.out.*-*'))]
worker = texts[0]
shard = max(texts[1:], key=total)
# A function inlined elsewhere is listed again under the other source file; the largest entry
# is the function itself.
per = {'worker': {}, 'shard': {}}
for side, text in (('worker', worker), ('shard', shard)):
    for cost, _, name in functions(text):
        per[side][name] = max(cost, per[side].get(name, 0))
requests = next((calls for _, calls, name in functions(shard) if name.endswith('Peer::post_reply')), 0)
if requests == 0:
    sys.exit(f'callgrind.sh: no request was served in the {op} run; see {d}/valgrind.log')
print(f'== {op} at {size} B: {requests} requests (inclusive instructions per request)')
print(f'{total(worker) / requests:9.0f}  worker thread in all (idle polls included: varies with the guest)')
print(f'{total(shard) / requests:9.0f}  shard thread in all (idle polls included: varies with the guest)')
shown = ['Link>::send', 'Link>::recv', 'Core::send_range', 'Ticket::wait', 'Shard as tessera_transport::Service>::serve',
         'TablePart::push_range', 'RangeClocks::advance', 'DenseStore::stamp', 'Reply::finish_with', 'Peer::post_reply',
         'Qp::post_inline']
for side in ('worker', 'shard'):
    for name, cost in sorted(per[side].items(), key=lambda kv: -kv[1]):
        if any(name.endswith(s) for s in shown):
            print(f'{cost / requests:9.0f}  {side}: {name}')
EOF
done
echo "callgrind files: $out"
