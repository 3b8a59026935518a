#!/usr/bin/env bash
# Runs everything CI runs: setup (idempotent), format check, clippy, the whole test suite,
# bounded fuzzing, the aarch64 cross-build and the Docker image smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TERM_COLOR=never
# nbdsh must run with Debian's Python (python3-libnbd lives there), so /usr/bin goes first;
# `weed` (SeaweedFS, from PyPI) lives in the default python3's scripts directory.
PYBIN=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
export PATH="/usr/bin:$PATH${PYBIN:+:$PYBIN}"
# The S3 tests need `weed`; here they must run rather than skip.
export HLSTORE_REQUIRE_S3=1
# CI runs as root: the network-namespace tests must run rather than skip.
export HLSTORE_REQUIRE_NETNS=1
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo deny (licenses, bans, sources; deny.toml)"
# The RustSec advisory database is fetched from GitHub, which CI cannot reach: advisories
# are checked only where it can (`cargo deny check advisories`).
DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -q "$DENY_VERSION"; then
    cargo install cargo-deny --locked --version "$DENY_VERSION" --quiet
fi
cargo deny --log-level warn check --hide-inclusion-graph licenses bans sources
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
LOG_DIR="${CARGO_TARGET_DIR:-target}"
mkdir -p "$LOG_DIR"
# Every agent log and CLI stderr of the run is kept here and scanned for secrets below.
HLSTORE_TEST_LOG_DIR="$(cd "$LOG_DIR" && pwd)/test-logs"
export HLSTORE_TEST_LOG_DIR
rm -rf "$HLSTORE_TEST_LOG_DIR"
cargo test --workspace --no-fail-fast 2>&1 | tee "$LOG_DIR/test.log"
summary=$(grep -E '^test result:' "$LOG_DIR/test.log" | awk '{p+=$4; f+=$6; i+=$8} END {printf "%d passed, %d failed, %d skipped", p, f, i}')
echo "== fuzz (bounded)"
# Every fuzz target for a few seconds (scripts/fuzz.sh; longer runs: `scripts/fuzz.sh 300`).
# No sanitizer here even where nightly is installed: the address-sanitized build costs two
# more minutes of CI on 2 cores, and the targets are safe Rust plus C libraries that are
# not instrumented either way.
FUZZ_SECONDS=${HLSTORE_FUZZ_SECONDS:-20} FUZZ_SANITIZER=${HLSTORE_FUZZ_SANITIZER:-none} bash scripts/fuzz.sh
echo "== aarch64 cross-build (scripts/build-hlstore.sh)"
# hlstore for aarch64-unknown-linux-gnu with Debian's cross gcc and arm64 librocksdb-dev:
# compiles and links, and the binary loads librocksdb.so. Dev profile: its build scripts and
# proc macros are the ones `cargo test` just built. HLSTORE_SKIP_CROSS=1 skips it locally.
if [ "${HLSTORE_SKIP_CROSS:-}" = 1 ]; then
    echo "skipped: HLSTORE_SKIP_CROSS=1"
else
    cross_start=$(date +%s)
    bash scripts/build-hlstore.sh --install-deps --target aarch64-unknown-linux-gnu --profile dev
    echo "aarch64 cross-build: $(($(date +%s) - cross_start))s"
fi
echo "== docker image smoke test (tests/docker/smoke.sh)"
# The image from deploy/Dockerfile (with the binary `cargo test` built), three agents and
# the CSI controller in containers. Skips with a message where Docker cannot run;
# HLSTORE_SKIP_DOCKER=1 skips it locally.
if [ "${HLSTORE_SKIP_DOCKER:-}" = 1 ]; then
    echo "skipped: HLSTORE_SKIP_DOCKER=1"
else
    bash tests/docker/smoke.sh
fi
echo "$summary"
echo "== secrets in the logs of the run"
bash tests/scripts/scan_secrets.sh "$HLSTORE_TEST_LOG_DIR" "$LOG_DIR/test.log"
