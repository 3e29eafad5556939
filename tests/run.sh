#!/usr/bin/env bash
# Tessera's whole test suite: what CI runs, and what the README tells you to run.
#
#   ./tests/run.sh            # everything
#   QUICK=1 ./tests/run.sh    # skip clippy
#
# It installs the system packages it needs (as root, with apt) when they are missing, builds the
# workspace once, and runs every test: unit and property tests, client/server integration tests,
# and the real-process tests (servers started and killed as separate processes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- system packages --------------------------------------------------------------------------
# ensure CMD:PACKAGE ... installs each PACKAGE whose CMD is missing (apt, as root), so that a warm
# machine never touches the network. The TCP suite needs nothing beyond the Rust toolchain; the
# SoftRoCE, etcd and fio suites add their packages here.
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
ensure

# --- build once ---------------------------------------------------------------------------------
log "building the workspace and its tests"
cargo build --workspace --all-targets --locked
export TESSERA_BIN="$PWD/target/debug/tessera"

if [ "${QUICK:-0}" != 1 ]; then
  log "clippy (workspace lints: unsafe blocks must carry a SAFETY comment)"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

# --- tests ------------------------------------------------------------------------------------------
log "unit, property, integration and real-process tests"
cargo test --workspace --locked -- --test-threads 2

log "criterion benchmarks compile and run once each (no timing: figures come from cargo bench)"
cargo test -p tessera-benches --benches --locked

log "all tests passed"
