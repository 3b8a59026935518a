#!/usr/bin/env bash
# Node agent memory with many attached volumes: a 3-node local cluster, VOLUMES volumes
# (default 10) attached on n1, and n1's resident set size
#   - idle right after the attaches,
#   - during and after 4 KiB random writes to every volume at once (QD32 each),
#   - during and after 1 MiB sequential writes to every volume at once (QD8 each),
#   - idle IDLE seconds (default 15) after the load (the agent hands freed heap back to
#     the system every 10 s, and its metadata memtables once its store is idle).
# Prints a Markdown table. Needs fio with its nbd engine.
#
#   HLSTORE_BIN=target/release/hlstore ./benches/agent_memory.sh
set -euo pipefail

VOLUMES="${VOLUMES:-10}"
SIZE="${SIZE:-128MiB}"
IDLE="${IDLE:-15}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
command -v fio >/dev/null || { echo "missing fio" >&2; exit 1; }
if [ -z "${HLSTORE_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin hlstore >&2)
  HLSTORE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/hlstore"
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hlstore-agent-memory.XXXXXX")"
CLUSTER="$WORK/cluster"
cleanup() {
  local rc=$?
  "$HLSTORE_BIN" dev down --dir "$CLUSTER" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export HLSTORE_TLS_DIR="$CLUSTER/tls/admin"
echo "starting a 3-node cluster in $CLUSTER ..." >&2
"$HLSTORE_BIN" dev up --dir "$CLUSTER" --nodes 3 --replicas 3 --volume v0 --size "$SIZE" >"$WORK/uri" 2>"$WORK/dev-up.log" || {
  cat "$WORK/dev-up.log" >&2; exit 1; }
EP="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["grpc"])' "$CLUSTER/cluster.json")"
hl() { "$HLSTORE_BIN" "$@" --endpoint "$EP"; }
PID="$(cat "$CLUSTER/n1/node.pid")"
mib() { awk -v k="$1:" '$1 == k {printf "%d", $2 / 1024}' "/proc/$PID/status"; }

uris=("$(tail -n1 "$WORK/uri")")
for i in $(seq 1 $((VOLUMES - 1))); do
  hl volume create "v$i" --size "$SIZE" >/dev/null
  uris+=("$(hl volume attach "v$i" --node n1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nbd_uri"])')")
done
echo "$VOLUMES volumes attached on n1" >&2
sleep 2
idle0="$(mib VmRSS)"

# load NAME FIO-ARGS...: fio on every volume at once; samples RSS every 0.2 s meanwhile.
load() {
  local name="$1"; shift
  echo "  $name on $VOLUMES volumes ..." >&2
  local pids=() peak=0 now
  for u in "${uris[@]}"; do
    fio --name="$name" --ioengine=nbd --uri="$u" "$@" >/dev/null 2>&1 &
    pids+=($!)
  done
  alive() { local p; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
  while alive; do
    now="$(mib VmRSS)"
    [ "$now" -gt "$peak" ] && peak="$now"
    sleep 0.2
  done
  wait
  echo "$peak"
}
rand_peak="$(load randwrite --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=5)"
rand_after="$(mib VmRSS)"
seq_peak="$(load seqwrite --rw=write --bs=1M --iodepth=8 --size="$SIZE")"
seq_after="$(mib VmRSS)"
sleep "$IDLE"
idle1="$(mib VmRSS)"
hwm="$(mib VmHWM)"

cat <<EOF
| n1 (engine of $VOLUMES volumes) | RSS | target |
|---|---|---|
| idle, $VOLUMES volumes attached | $idle0 MiB | <= 64 MiB |
| 4 KiB random writes to all (peak / right after) | $rand_peak / $rand_after MiB | <= 256 MiB |
| 1 MiB sequential writes to all (peak / right after) | $seq_peak / $seq_after MiB | <= 256 MiB |
| idle ${IDLE} s after the load | $idle1 MiB | |
| high-water mark (VmHWM) | $hwm MiB | |
EOF
