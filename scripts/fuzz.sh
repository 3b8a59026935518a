#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo fuzz, libFuzzer), each for a bounded time, and
# prints one line per target: executions, seconds, result. Exits non-zero if any target
# crashed (panic, failed assertion, timeout, out-of-memory) or did not build.
#
# Usage: scripts/fuzz.sh [seconds] [target...]
#   seconds  per target (default: $FUZZ_SECONDS, else 60)
#   target   default: every target (`cargo fuzz list`)
# Environment:
#   FUZZ_TOOLCHAIN  nightly | stable. Default: nightly when there is one, else stable.
#   FUZZ_SANITIZER  address | none. Default: address on a nightly toolchain, none on stable.
#   FUZZ_ARGS       extra libFuzzer options (e.g. "-max_len=65536").
#
# Toolchain: nightly when installed (or, when a sanitizer is wanted, installable with
# rustup), else stable with `--sanitizer none` (cargo fuzz's instrumentation flags are
# stable; only the sanitizers need nightly). AddressSanitizer also makes libFuzzer report
# any single allocation above 2 GiB as out-of-memory. Corpora grow in fuzz/corpus/<target>,
# crash inputs land in fuzz/artifacts/<target>; replay one with
# `cd fuzz && cargo fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

CARGO_FUZZ_VERSION=0.13.2
seconds=${1:-${FUZZ_SECONDS:-60}}
if [ $# -gt 0 ]; then shift; fi
case "$seconds" in '' | *[!0-9]*) echo "fuzz: seconds must be a number, got '$seconds'" >&2; exit 2 ;; esac

if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION"; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" --quiet
fi

# Nightly if present, or installable when a sanitizer is wanted (quietly: a CI machine may
# not reach the toolchain server), else stable without a sanitizer.
toolchain=stable
if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    toolchain=$FUZZ_TOOLCHAIN
elif rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=nightly
elif [ "${FUZZ_SANITIZER:-address}" != none ] \
    && timeout 180 rustup toolchain install nightly --profile minimal >/dev/null 2>&1 \
    && rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=nightly
fi
if [ "$toolchain" = nightly ]; then
    sanitizer=${FUZZ_SANITIZER:-address}
else
    [ "${FUZZ_SANITIZER:-none}" = none ] || echo "fuzz: no nightly toolchain: sanitizer ${FUZZ_SANITIZER} needs one, building without" >&2
    sanitizer=none
fi

# Builds never share the main workspace's target directory; one per toolchain and
# sanitizer so switching does not rebuild everything.
unset CARGO_TARGET_DIR
target_dir="$ROOT/fuzz/target/$toolchain-$sanitizer"
# Link Debian's libzstd (libzstd-dev) instead of compiling zstd's C sources: a minute of
# build time on 2 cores. zstd is C code, not instrumented either way.
if pkg-config --exists libzstd 2>/dev/null; then
    export ZSTD_SYS_USE_PKG_CONFIG=1
fi
# 16 codegen units: cargo fuzz's default of 1 makes a cold build twice as long on 2 cores.
build_flags=(--sanitizer "$sanitizer" --codegen-units 16 --target-dir "$target_dir")

cd fuzz
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo "+$toolchain" fuzz list)
fi

echo "fuzz: ${targets[*]}: ${seconds}s each, $toolchain toolchain, sanitizer $sanitizer"
# One target: build just it; otherwise all of them, in one cargo build.
build_target=()
if [ ${#targets[@]} -eq 1 ]; then build_target=("${targets[0]}"); fi
start=$(date +%s)
if ! cargo "+$toolchain" fuzz build "${build_flags[@]}" "${build_target[@]}"; then
    echo "fuzz: build failed" >&2
    exit 1
fi
echo "fuzz: built in $(( $(date +%s) - start ))s"

log_dir="$target_dir/logs"
mkdir -p "$log_dir"
rows=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$log_dir/$t.log"
    t0=$(date +%s)
    # -timeout: one input running longer than 10 s is a finding (a hang), not a wait.
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of options
    if cargo "+$toolchain" fuzz run "${build_flags[@]}" "$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1; then
        result=ok
    else
        artifact=$(grep -o 'Test unit written to .*' "$log" | tail -1 | sed 's/Test unit written to //')
        kind=$(grep -oE 'ERROR: libFuzzer: [a-z-]+|panicked at' "$log" | head -1 | sed 's/ERROR: libFuzzer: //')
        result="crash${kind:+ ($kind)}: ${artifact:-no artifact, see $log}"
        failed=1
    fi
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    if [ -z "$execs" ]; then
        execs=$(grep -oE '^Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -1 || true)
    fi
    if [ -z "$execs" ]; then
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#' || true)
    fi
    rows+=("$(printf '%-14s %12s %8s  %s' "$t" "${execs:-?}" "$(( $(date +%s) - t0 ))" "$result")")
done

echo
printf '%-14s %12s %8s  %s\n' target executions seconds result
printf '%s\n' "${rows[@]}"
if [ "$failed" != 0 ]; then
    echo "fuzz: a target crashed; its input is in the artifact named above, logs in $log_dir" >&2
    exit 1
fi
