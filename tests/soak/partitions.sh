#!/usr/bin/env bash
# Seeded partition soak (not run in CI): ROUNDS schedules (default 50), each a fresh
# 3-node cluster in network namespaces with a writer and a reader, one fault drawn from the
# seed (engine node cut off + failover with --force, replica node cut off, one-way drop in
# or out, delay/loss), heal, convergence, then the history checker over the client logs,
# the final content and every replica. Prints a results table; exit 1 on any violation.
#
#   tests/soak/partitions.sh [ROUNDS] [FIRST_SEED]      (root; iproute2, iptables)
#
# Reproduce one schedule: SEED=<seed> cargo test --test partition soak_partition_schedule -- --ignored --exact --nocapture
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
ROUNDS=${1:-50}
FIRST=${2:-1}
export HLSTORE_REQUIRE_NETNS=1
cargo test --test partition --no-run >/dev/null 2>&1 || { echo "build failed: cargo test --test partition --no-run" >&2; exit 2; }
LOGDIR=$(mktemp -d /tmp/hlstore-partitions-XXXXXX)
printf '%-6s %-20s %-6s %8s %8s %6s %6s %6s %6s %6s %s\n' SEED FAULT VICTIM HOLD_MS ACKED LOST STALE NEVER DOUBLE DIVERG VERDICT
bad=0
for ((seed = FIRST; seed < FIRST + ROUNDS; seed++)); do
  log="$LOGDIR/seed-$seed.log"
  SEED=$seed cargo test -q --test partition soak_partition_schedule -- --ignored --exact --nocapture >"$log" 2>&1
  rc=$?
  line=$(grep -m1 '^SOAK ' "$log" || true)
  if [ -z "$line" ]; then
    printf '%-6s %-20s %s\n' "$seed" "-" "FAILED before the check (rc $rc; see $log)"
    bad=$((bad + 1))
    continue
  fi
  get() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
  printf '%-6s %-20s %-6s %8s %8s %6s %6s %6s %6s %6s %s\n' "$seed" "$(get fault)" "$(get victim)" "$(get hold_ms)" \
    "$(get acked)" "$(get lost)" "$(get stale)" "$(get never_written)" "$(get double)" "$(get divergent)" "$(get verdict)"
  [ "$rc" -eq 0 ] || bad=$((bad + 1))
done
echo "rounds: $ROUNDS, violated or failed: $bad, logs: $LOGDIR"
[ "$bad" -eq 0 ]
