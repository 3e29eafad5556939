#!/usr/bin/env bash
# Builds Tessera's fuzz targets once, runs each real target for a bounded time from its seed
# corpus, checks that the canary target's planted bug is found, and prints what ran. CI calls
# this; README.md here says what the targets check and what the last runs found.
#
#   tests/fuzz/run.sh                 every real target for FUZZ_SECONDS each, then the canary
#   tests/fuzz/run.sh wal_reader ...  only the targets named (canary among them if named)
#   tests/fuzz/run.sh seeds           regenerates the committed seed corpus (corpus/<target>/)
#
# Environment:
#   FUZZ_SECONDS    seconds per real target (default 60)
#   FUZZ_TOOLCHAIN  the nightly toolchain to build with (default nightly-2026-05-20, installed
#                   with rustup when missing)
#   CANARY_SECONDS  time the canary's bug must be found in (default 120)
#   FUZZ_RSS_MB     libFuzzer's memory limit per target, MB (default 2048)
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (default 60)
#   FUZZ_WORK       scratch directory: the growing corpus, logs, crash artifacts
#                   (default tests/fuzz/scratch; the committed corpus is only ever read)
#
# Needs rustup and a C++ compiler (libFuzzer is C++); installs the pinned nightly toolchain, cargo-fuzz
# and, as root on Debian, g++ when they are missing. Exits non-zero when a real target crashes
# (its artifact is named in the output) or when the canary's bug is not found.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
real_targets=(frame_header wal_reader checkpoint_reader capi)
fuzz_seconds=${FUZZ_SECONDS:-60}
# A dated nightly, so that CI does not change with each day's nightly; the one these targets were
# built and run with.
toolchain=${FUZZ_TOOLCHAIN:-nightly-2026-05-20}
canary_seconds=${CANARY_SECONDS:-120}
rss_mb=${FUZZ_RSS_MB:-2048}
timeout_s=${FUZZ_TIMEOUT:-60}
work=${FUZZ_WORK:-$here/scratch}
# Must match PLANTED in src/canary.rs.
planted="canary: the planted bug was reached"

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 2; }

ensure_tools() {
    command -v rustup >/dev/null || die "needs rustup (https://rustup.rs)"
    if ! rustup toolchain list | grep -q "^$toolchain"; then
        say "installing the $toolchain toolchain (cargo-fuzz needs -Zsanitizer)"
        rustup toolchain install "$toolchain" --profile minimal
    fi
    if ! cargo +"$toolchain" fuzz --version >/dev/null 2>&1; then
        say "installing cargo-fuzz"
        cargo install cargo-fuzz --locked --version 0.13.2
    fi
    if ! command -v c++ >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            say "installing g++ (libfuzzer-sys builds libFuzzer, which is C++)"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
        else
            die "needs a C++ compiler for libFuzzer: apt-get install g++"
        fi
    fi
}

# Writes every target's seeds, from the real writers, into $1/<target>/.
generate_seeds() {
    cargo +"$toolchain" run -q --manifest-path "$here/Cargo.toml" --example seeds -- "$1" >/dev/null
}

if [ "${1:-}" = seeds ]; then
    ensure_tools
    fresh=$(mktemp -d)
    generate_seeds "$fresh"
    for dir in "$fresh"/*; do
        t=$(basename "$dir")
        rm -rf "${here:?}/corpus/$t"
        mkdir -p "$here/corpus/$t"
        cp "$dir"/* "$here/corpus/$t/"
    done
    rm -rf "$fresh"
    say "seeds written to $here/corpus/ ($(du -sh "$here/corpus" | cut -f1))"
    exit 0
fi

targets=("$@")
if [ ${#targets[@]} = 0 ]; then
    targets=(canary "${real_targets[@]}")
fi

ensure_tools
mkdir -p "$work"
rm -rf "${work:?}"/{corpus,seeds,artifacts,logs}
mkdir -p "$work"/{corpus,seeds,artifacts,logs}

say "building the fuzz targets (once; every run below reuses them)"
(cd "$root" && cargo +"$toolchain" fuzz build --fuzz-dir tests/fuzz --release --debug-assertions)
triple=$(rustc +"$toolchain" -vV | sed -n 's/^host: //p')
bin="$here/target/$triple/release"

# Seeds made now by the current writers run beside the committed ones, so a format change
# cannot leave the fuzzers starting from stale seeds only; a difference is reported.
say "generating fresh seeds"
generate_seeds "$work/seeds"
if ! diff -rq "$here/corpus" "$work/seeds" >/dev/null 2>&1; then
    say "note: the committed seeds differ from freshly generated ones; refresh them with: tests/fuzz/run.sh seeds"
fi

rows=()
failed=0

# Runs target $1 for $2 seconds; $3 is "crash" when a crash is the expected outcome.
run_target() {
    local t=$1 seconds=$2 expect=${3:-}
    local log="$work/logs/$t.log" artifacts="$work/artifacts/$t/"
    mkdir -p "$work/corpus/$t" "$artifacts" "$here/corpus/$t" "$work/seeds/$t"
    say "fuzzing $t for up to ${seconds}s (log: $log)"
    local started rc=0
    started=$(date +%s.%N)
    # The scratch corpus comes first: libFuzzer writes what it finds into the first directory
    # only, so the committed seeds are never touched.
    "$bin/$t" "$work/corpus/$t" "$here/corpus/$t" "$work/seeds/$t" \
        -max_total_time="$seconds" -rss_limit_mb="$rss_mb" -timeout="$timeout_s" \
        -artifact_prefix="$artifacts" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    local wall runs secs result
    wall=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    if [ "$expect" = crash ]; then
        if [ "$rc" != 0 ] && grep -qF "$planted" "$log"; then
            result="planted bug found after ${wall}s (as it must be)"
        else
            result="FAILED: the planted bug was not found in ${seconds}s; the fuzzing setup is broken"
            failed=1
        fi
    elif [ "$rc" = 0 ]; then
        result="no crash"
    else
        local artifact
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        result="CRASH (exit $rc): ${artifact:-see $log}"
        failed=1
        say "$t crashed; the end of its log:"
        grep -v '^#' "$log" | tail -40 >&2
        [ -n "$artifact" ] && say "reproduce: $bin/$t $artifact"
    fi
    rows+=("$(printf '| %-17s | %13s | %7s | %s |' "$t" "${runs:--}" "${secs:-$wall}" "$result")")
}

for t in "${targets[@]}"; do
    case $t in
        canary) run_target canary "$canary_seconds" crash ;;
        frame_header | wal_reader | checkpoint_reader | capi) run_target "$t" "$fuzz_seconds" ;;
        *) die "unknown target $t (targets: canary ${real_targets[*]})" ;;
    esac
done

echo
echo "| target            |    executions | seconds | result |"
echo "|-------------------|---------------|---------|--------|"
printf '%s\n' "${rows[@]}"
echo
echo "(nightly $(rustc +"$toolchain" -V | cut -d' ' -f2-), $(cargo +"$toolchain" fuzz --version 2>/dev/null); logs and artifacts in $work)"
exit "$failed"
