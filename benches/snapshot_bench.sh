#!/usr/bin/env bash
# Snapshot benchmark: on a 3-node local cluster (separate processes on loopback), time
# creating COUNT snapshots of a volume (64 MiB written) and then deleting them, through one
# client connection. Each create flushes every replica and records the snapshot; each
# delete frees the block versions only it kept.
#
# Usage: ./benches/snapshot_bench.sh            (from the repository root)
# Env:
#   COUNT=1000      snapshots
#   SIZE=256MiB     volume size
#   HLSTORE_BIN=... use this binary instead of building `cargo build --release --bin hlstore`
#   KEEP=1          keep the scratch directory
# Prints a table.
set -euo pipefail

COUNT="${COUNT:-1000}"
SIZE="${SIZE:-256MiB}"
KEEP="${KEEP:-0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
for t in qemu-io python3; do
  command -v "$t" >/dev/null || { echo "missing $t (Debian: qemu-utils python3)" >&2; exit 1; }
done
if [ -z "${HLSTORE_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin hlstore >&2)
  HLSTORE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/hlstore"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hlstore-snapshot-bench.XXXXXX")"
cleanup() {
  "$HLSTORE_BIN" dev down --dir "$WORK/cluster" >/dev/null 2>&1 || true
  if [ "$KEEP" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

export HLSTORE_TLS_DIR="$WORK/cluster/tls/admin"  # the admin certificate `dev up` makes
URI="$("$HLSTORE_BIN" dev up --dir "$WORK/cluster" --nodes 3 --volume bench --size "$SIZE")"
EP="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["grpc"])' "$WORK/cluster/cluster.json")"
EP="http://${EP#http://}"
echo "volume at $URI, agent $EP" >&2
qemu-io -f raw -c "write -P 0x11 0 64M" "$URI" >/dev/null

RESULT="$("$HLSTORE_BIN" debug snapshot-bench --endpoint "$EP" --volume bench --count "$COUNT")"
echo "$RESULT" >&2

python3 - "$RESULT" "$COUNT" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); n = int(sys.argv[2])
print(f"| {'measure':<44} | {'value':>12} |")
print(f"|{'-'*46}|{'-'*14}|")
print(f"| {'snapshots created (listed after)':<44} | {r['listed']:>12} |")
print(f"| {f'create {n} snapshots, total (s)':<44} | {r['create_s']:>12.2f} |")
print(f"| {'create, mean per snapshot (ms)':<44} | {1000*r['create_s']/n:>12.2f} |")
print(f"| {'create, slowest (ms)':<44} | {r['create_worst_ms']:>12.2f} |")
print(f"| {f'delete {n} snapshots, total (s)':<44} | {r['delete_s']:>12.2f} |")
print(f"| {'delete, mean per snapshot (ms)':<44} | {1000*r['delete_s']/n:>12.2f} |")
PY
