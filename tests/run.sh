#!/usr/bin/env bash
# Tessera's whole test suite: what CI runs, and what the README tells you to run.
#
#   ./tests/run.sh            # everything
#   QUICK=1 ./tests/run.sh    # skip clippy and the RDMA benchmark
#
# It installs the system packages it needs (as root, with apt) when they are missing, builds the
# workspace once with every feature (RDMA included), and runs every test: unit and property
# tests, the replication simulator (thousands of seeded runs with faults), client/server
# integration tests, the real-process tests (servers started and killed as
# separate processes on loopback, crash recovery after kill -9 among them), and, inside a SoftRoCE
# guest (tests/softroce/), the RDMA tests on real verbs, the replication kill test over RDMA, and
# the RDMA benchmark against perftest; the cargo-fuzz targets for a bounded time each (and the
# canary, whose planted bug must be found); then the disk benchmark against fio; last, the Python
# package's tests (python/tests) in a cached venv, and its RDMA tests in a guest. A guest whose rxe device cannot be
# created fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's heading carries the time since the start, so a log shows where the minutes go.
log() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

# --- system packages --------------------------------------------------------------------------
# ensure CMD:PACKAGE ... installs each PACKAGE whose CMD is missing (apt, as root), so that a warm
# machine never touches the network. The SoftRoCE guest and the RDMA build (cmake, libclang for
# sideway) install theirs through tests/softroce/setup.sh; the etcd and fio suites add theirs here.
ensure() {
  local missing=() cmd pkg
  for pair in "$@"; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || { echo "run as root, or install: ${missing[*]}" >&2; exit 1; }
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
log "system packages: etcd (the replication tests' coordinator store), protoc (to build the etcd client), pkg-config and g++ (the C ABI's trainer example), make (to build jemalloc, the tessera binary's allocator)"
ensure etcd:etcd-server protoc:protobuf-compiler pkg-config:pkg-config g++:g++ make:make
log "system packages for the RDMA build and the SoftRoCE guest"
tests/softroce/setup.sh

# The suite must leave the checkout as it found it: nothing it runs may rewrite a tracked file.
tracked_before=$(git status --porcelain --untracked-files=no 2>/dev/null || true)

log "formatting: cargo fmt --check (rustfmt.toml), the workspace and the fuzz crate"
cargo fmt --all --check
(cd tests/fuzz && cargo fmt --check)
log "lock files: the workspace's and the fuzz crate's Cargo.lock match their manifests"
# The fuzz crate is its own workspace: a dependency added to an engine crate changes its lock too.
cargo metadata --locked --format-version 1 >/dev/null
(cd tests/fuzz && cargo metadata --locked --format-version 1 >/dev/null) ||
  { echo "tests/fuzz/Cargo.lock is stale: run 'cargo metadata' in tests/fuzz and commit the lock" >&2; exit 1; }

# --- build once ---------------------------------------------------------------------------------
log "building the workspace and its tests"
cargo build --workspace --all-targets --all-features --locked
export TESSERA_BIN="$PWD/target/debug/tessera"

if [ "${QUICK:-0}" != 1 ]; then
  log "clippy (workspace lints: unsafe blocks must carry a SAFETY comment)"
  cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
  cargo clippy --workspace --all-targets --locked -- -D warnings   # and the default build, without RDMA
fi

# --- tests ------------------------------------------------------------------------------------------
log "unit, property, integration and real-process tests"
cargo test --workspace --all-features --locked -- --test-threads 2

log "replication simulator: 10,000 seeds with faults, in a release build (its canary ran with the tests above)"
# The debug run above covered 200 seeds and the canary; a failing seed prints its replay command.
cargo run -p tessera-replication --release --locked --example sim -- --seeds "${SIM_SEEDS:-10000}"

log "fuzzing: every cargo-fuzz target for ${FUZZ_SECONDS:-60} s from its seed corpus, and the canary's planted bug must be found"
# Installs the nightly toolchain and cargo-fuzz when missing; fails on any crash of a real target.
FUZZ_SECONDS="${FUZZ_SECONDS:-60}" tests/fuzz/run.sh

# Each test binary below runs in its own SoftRoCE guest (about ten seconds to boot under TCG).
log "RDMA on real verbs, in the SoftRoCE guest: verbs layer and transport tests"
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/tests/softroce/run.sh"
cargo test -p tessera-transport --all-features --locked --lib -- rdma::
cargo test -p tessera-tests --all-features --locked --test rdma --test rdma_keys --test rdma_steady_state
log "replication over RDMA, in the SoftRoCE guest: the kill test and the whole-cluster power loss, on verbs"
# Three kills of real server processes, with the embedded coordinator, then a drain and a join;
# the sums are checked exactly. The failure timeout is 2 s here, not 500 ms: under emulation a
# live server's heartbeat is at times answered more than 500 ms late (see docs/testing.md). A
# heal may take 180 s, not 60: a rejoined server's learners catch up several times slower than
# on the host. Then the whole cluster, servers (with --durability wal) and coordinator, killed at
# once and restarted from their disks, twice, on the same verbs.
REPLICATION_TRANSPORT=rdma REPLICATION_KILLS_EMBEDDED=3 REPLICATION_FAILURE_TIMEOUT_MS=2000 REPLICATION_HEAL_S=180 \
  cargo test -p tessera-tests --all-features --locked --test replication -- --exact \
  training_survives_kill_9_of_servers_with_the_embedded_coordinator a_whole_cluster_killed_at_once_comes_back_from_its_disks
unset CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER

if [ "${QUICK:-0}" != 1 ]; then
  log "RDMA benchmark in the SoftRoCE guest, against perftest on the same device"
  cargo build --release -p tessera-tools --features rdma --locked
  # About 13 minutes in a quiet guest (seven rounds, perftest beside each size); room for a slow one.
  SOFTROCE_TIMEOUT=3000 tests/softroce/run.sh tests/softroce/rdma-bench.sh
  log "disk benchmark: WAL group commit against an fdatasync loop, checkpoint writes against fio (same disk, same run)"
  ./target/release/tessera bench --disk "${TMPDIR:-/tmp}/tessera-diskbench-$$" --seconds 2
  rm -rf "${TMPDIR:-/tmp}/tessera-diskbench-$$"
fi

log "criterion benchmarks compile and run once each (no timing: figures come from cargo bench)"
cargo test -p tessera-benches --benches --locked

log "Python package: pip install ./python into a cached venv, then its pytest suite against target/debug/tessera"
# The venv lives outside the checkout, so reruns find torch (about 5 GB with its CUDA libraries,
# which run on CPU) already installed. The wheel is built without LTO here to keep CI short;
# users get the release profile. The suite starts servers from $TESSERA_BIN and uses the Rust
# reference target/debug/examples/replay, both built above.
venv="${XDG_CACHE_HOME:-$HOME/.cache}/tessera/venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  "$venv/bin/pip" install -q ./python pytest numpy torch mypy
"$venv/bin/pytest" -q -p no:cacheprovider python/tests

log "Python package over RDMA, in the SoftRoCE guest: a wheel built with the rdma feature, against one server and a replicated cluster"
# Its own small venv (numpy and pytest; no torch): the tests run in the guest from the host's
# filesystem, which the guest sees read-only.
venv_rdma="${XDG_CACHE_HOME:-$HOME/.cache}/tessera/venv-rdma"
[ -x "$venv_rdma/bin/python" ] || python3 -m venv "$venv_rdma"
"$venv_rdma/bin/pip" install -q --upgrade pip
MATURIN_PEP517_ARGS="--features rdma" CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
  "$venv_rdma/bin/pip" install -q --force-reinstall --no-deps ./python
"$venv_rdma/bin/pip" install -q pytest numpy
PYTHONDONTWRITEBYTECODE=1 SOFTROCE_TIMEOUT=900 tests/softroce/run.sh "$venv_rdma/bin/pytest" -q -p no:cacheprovider python/tests/test_rdma.py

tracked_after=$(git status --porcelain --untracked-files=no 2>/dev/null || true)
if [ "$tracked_after" != "$tracked_before" ]; then
  echo "the test suite changed tracked files of the checkout:" >&2
  diff <(echo "$tracked_before") <(echo "$tracked_after") >&2 || true
  exit 1
fi

log "all tests passed"
