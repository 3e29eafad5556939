#!/usr/bin/env bash
# tests/softroce/perftest.sh -- the perftest baseline Tessera's RDMA benchmarks are compared to.
#
#   tests/softroce/run.sh tests/softroce/perftest.sh                 # in the SoftRoCE VM
#   RDMA_DEV=mlx5_0 RDMA_GID_INDEX=3 RDMA_IP=192.0.2.7 tests/softroce/perftest.sh   # real HCA
#
# Runs each perftest server/client pair on one device, client and server in the same machine
# (loopback through the device), one pair at a time:
#   ib_write_lat, ib_read_lat   at 8, 64, 512 and 4096 bytes
#   ib_send_lat                 at 8 bytes
#   ib_write_bw                 at 64 KiB, 256 KiB, 1 MiB and 4 MiB
# and prints one JSON object per line on stdout, nothing else (progress goes to stderr):
#   {"test":"ib_write_lat","size":8,"iters":5000,"typical_us":14.1,"p99_us":30.2,"avg_us":15.0,"p999_us":410.5}
#   {"test":"ib_write_bw","size":65536,"iters":1024,"bw_avg_MBps":27.1,"bw_peak_MBps":28.0,"msg_rate_Mpps":0.000433}
# perftest's "MB" is 2^20 bytes, so bw_*_MBps are MiB/s. Latencies are perftest's own: for
# ib_write_lat and ib_send_lat half a round trip, for ib_read_lat a whole read.
# Exit code: 0 if every pair ran and parsed; otherwise 1, with the failing pair's output on stderr
# and no line on stdout for it. A reader must treat a missing line as a failure.
#
# Environment: RDMA_DEV, RDMA_IP, RDMA_GID_INDEX (run.sh sets all three in the VM), and
#   PERFTEST_SET        lat (the latency pairs), bw (the bandwidth pairs) or all (default)
#   PERFTEST_LAT_SIZES  the latency pairs' sizes (default "8 64 512 4096"); ib_send_lat runs
#                       only when 8 is among them
#   PERFTEST_LAT_ITERS  iterations per latency test (default 5000)
#   PERFTEST_BW_BYTES   bytes moved per bandwidth test (default 64 MiB; at least 8 iterations)
#   PERFTEST_PORT       TCP port perftest exchanges QP numbers on (default 18515)
#   PERFTEST_SERVER_CPU, PERFTEST_CLIENT_CPU
#                       CPUs to pin the server and the client to (taskset). Default in the VM:
#                       1 and 0, so each side reads one vCPU's TSC all along (the guest kernel
#                       finds the emulated TSCs unsynchronized); elsewhere: not pinned.
#   PERFTEST_ATTEMPTS   tries per pair before it counts as failed (default 3). perftest
#                       calibrates rdtsc against gettimeofday as it starts; when the host
#                       deschedules an emulated vCPU during that, the fit fails ("Correlation
#                       coefficient r^2 < 0.9"), perftest divides by zero and prints "inf".
#                       That is noise of the emulator, not of the device, so the pair runs again.
# Under TCG emulation the whole run takes about a minute; each pair spends most of it starting up.
set -uo pipefail

DEV=${RDMA_DEV:?set RDMA_DEV (run.sh sets it in the VM; on a host: e.g. mlx5_0 or rxe0)}
IP=${RDMA_IP:?set RDMA_IP to the IPv4 address of $DEV}
GID_INDEX=${RDMA_GID_INDEX:?set RDMA_GID_INDEX to the RoCEv2 IPv4 GID index (show_gids lists them)}
LAT_ITERS=${PERFTEST_LAT_ITERS:-5000}
LAT_SIZES=${PERFTEST_LAT_SIZES:-8 64 512 4096}
BW_BYTES=${PERFTEST_BW_BYTES:-$((64 << 20))}
PORT=${PERFTEST_PORT:-18515}
ATTEMPTS=${PERFTEST_ATTEMPTS:-3}
SET=${PERFTEST_SET:-all}
case $SET in lat|bw|all) ;; *) echo "perftest: PERFTEST_SET must be lat, bw or all, not '$SET'" >&2; exit 2 ;; esac
if [ "${SOFTROCE_VM:-0}" = 1 ] && [ "$(nproc)" -ge 2 ]; then
  SERVER_CPU=${PERFTEST_SERVER_CPU-1}
  CLIENT_CPU=${PERFTEST_CLIENT_CPU-0}
else
  SERVER_CPU=${PERFTEST_SERVER_CPU-}
  CLIENT_CPU=${PERFTEST_CLIENT_CPU-}
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

log() { echo "perftest: $*" >&2; }
pinned() {  # pinned CPU COMMAND...: run COMMAND on CPU, or anywhere if CPU is empty
  local cpu=$1; shift
  if [ -n "$cpu" ]; then taskset -c "$cpu" "$@"; else "$@"; fi
}
failures=0

# parse_table KIND SIZE ITERS FILE: turn perftest's result table into one JSON line.
# Columns are found by their header names, not positions, so a perftest that adds a column
# still parses. Every value must be a plain number ("nan" or a missing column is a failure).
parse_table() {
  local test=$1 size=$2 iters=$3 file=$4
  awk -v test="$test" -v size="$size" -v iters="$iters" '
    function num(col,   v) {
      v = (col in at) ? $(at[col]) : ""
      if (v !~ /^[0-9]+(\.[0-9]+)?$/) { bad = bad " " col "=" (v == "" ? "missing" : v) }
      return v
    }
    /^ *#bytes/ {
      h = $0
      gsub(/99\.9% percentile\[usec\]/, "p999", h); gsub(/99% percentile\[usec\]/, "p99", h)
      gsub(/BW peak\[MB\/sec\]/, "bw_peak", h); gsub(/BW average\[MB\/sec\]/, "bw_avg", h)
      gsub(/MsgRate\[Mpps\]/, "msg_rate", h); gsub(/\[usec\]/, "", h)
      n = split(h, names, " ")
      for (i = 1; i <= n; i++) at[names[i]] = i
      header = 1; next
    }
    header && $1 == size && !done {
      done = 1
      if ("t_typical" in at)
        line = sprintf("{\"test\":\"%s\",\"size\":%d,\"iters\":%d,\"typical_us\":%s,\"p99_us\":%s,\"avg_us\":%s,\"p999_us\":%s}",
          test, size, iters, num("t_typical"), num("p99"), num("t_avg"), num("p999"))
      else
        line = sprintf("{\"test\":\"%s\",\"size\":%d,\"iters\":%d,\"bw_avg_MBps\":%s,\"bw_peak_MBps\":%s,\"msg_rate_Mpps\":%s}",
          test, size, iters, num("bw_avg"), num("bw_peak"), num("msg_rate"))
    }
    END {
      if (!done) { print "no result row for size " size > "/dev/stderr"; exit 1 }
      if (bad != "") { print "unparsable values:" bad > "/dev/stderr"; exit 1 }
      print line
    }' "$file"
}

# run_pair TEST SIZE ITERS: run one server/client pair until it gives a result or runs out of
# attempts; print its JSON line, or count a failure and show what perftest said.
run_pair() {
  local test=$1 size=$2 iters=$3 attempt t0 json out=$TMP/$1-$2
  for attempt in $(seq "$ATTEMPTS"); do
    t0=$(date +%s%3N)
    if json=$(try_pair "$test" "$size" "$iters" "$out"); then
      echo "$json"
      log "$test -s $size -n $iters: ok ($(($(date +%s%3N) - t0)) ms)"
      return
    fi
    log "$test -s $size -n $iters: attempt $attempt/$ATTEMPTS failed: $(cat "$out.why")"
  done
  failures=$((failures + 1))
  log "$test -s $size -n $iters: FAILED"
  sed 's/^/  client| /' "$out.client" >&2
  sed 's/^/  server| /' "$out.server" >&2
}

# try_pair TEST SIZE ITERS OUT: start the server, wait until it listens, run the client, parse
# the client's table. Outputs go to OUT.server and OUT.client, the reason of a failure to OUT.why.
try_pair() {
  local test=$1 size=$2 iters=$3 out=$4 server server_rc=0 client_rc=0
  local args=(-d "$DEV" -x "$GID_INDEX" -p "$PORT" -s "$size" -n "$iters" -F)
  pinned "$SERVER_CPU" timeout 120 "$test" "${args[@]}" > "$out.server" 2>&1 &
  server=$!
  # Under emulation a server takes a second or more to listen; a client that connects before
  # then fails at once. Wait for the listening socket (10 s at most).
  for _ in $(seq 100); do
    ss -Hltn "sport = :$PORT" | grep -q . && break
    kill -0 $server 2>/dev/null || break
    sleep 0.1
  done
  pinned "$CLIENT_CPU" timeout 90 "$test" "${args[@]}" "$IP" > "$out.client" 2>&1 || client_rc=$?
  wait $server || server_rc=$?
  if [ $client_rc != 0 ] || [ $server_rc != 0 ]; then
    echo "client exit code $client_rc, server exit code $server_rc" > "$out.why"
    return 1
  fi
  parse_table "$test" "$size" "$iters" "$out.client" 2> "$out.why"
}

log "device $DEV, GID index $GID_INDEX, $IP; active MTU $(ibv_devinfo -d "$DEV" 2>/dev/null | awk '/active_mtu/ { print $2; exit }'); perftest $(ib_write_lat --version 2>/dev/null | awk '{ print $NF; exit }'); server on CPU ${SERVER_CPU:-any}, client on CPU ${CLIENT_CPU:-any}"
if [ "$SET" != bw ]; then
  for size in $LAT_SIZES; do
    run_pair ib_write_lat "$size" "$LAT_ITERS"
    run_pair ib_read_lat "$size" "$LAT_ITERS"
  done
  case " $LAT_SIZES " in *" 8 "*) run_pair ib_send_lat 8 "$LAT_ITERS" ;; esac
fi
if [ "$SET" != lat ]; then
  for size in 65536 262144 1048576 4194304; do
    iters=$((BW_BYTES / size))
    run_pair ib_write_bw "$size" $((iters < 8 ? 8 : iters))
  done
fi

if [ $failures -ne 0 ]; then
  log "$failures pair(s) failed"
  exit 1
fi
