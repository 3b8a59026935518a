#!/usr/bin/env bash
# The one-command tour: installs what is missing, builds hlstore, starts a node agent on
# loopback with its data under $HLSTORE_DEMO_DIR (default /tmp/hlstore-demo), creates a
# thin 10 GiB replica, writes a file into it, reads it back, shows the metrics, and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --quiet --bin hlstore
HL="$PWD/target/debug/hlstore"
DIR="${HLSTORE_DEMO_DIR:-/tmp/hlstore-demo}"
mkdir -p "$DIR"

"$HL" node --id demo-node --data-dir "$DIR/node" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >"$DIR/node.out" 2>"$DIR/node.log" &
NODE_PID=$!
trap 'kill $NODE_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q '^listening' "$DIR/node.out" 2>/dev/null && break; sleep 0.1; done
read -r GRPC METRICS < <(sed -n 's/^listening grpc=\([^ ]*\) metrics=\(.*\)$/\1 \2/p' "$DIR/node.out")
export HLSTORE_ENDPOINT="http://$GRPC"
echo "node agent demo-node: gRPC $HLSTORE_ENDPOINT, metrics http://$METRICS/metrics, data $DIR/node"

"$HL" replica create demo --size 10GiB 2>/dev/null || echo "replica demo already exists (kept from an earlier run)"
head -c 1048576 /dev/urandom >"$DIR/payload.bin"
"$HL" replica write demo --offset 1GiB --input "$DIR/payload.bin"
"$HL" replica read demo --offset 1GiB --length 1MiB --output "$DIR/readback.bin"
cmp "$DIR/payload.bin" "$DIR/readback.bin" && echo "round trip: 1 MiB written and read back byte-identical"
"$HL" replica list
echo "metrics sample:"
curl -s "http://$METRICS/metrics" 2>/dev/null | grep -E '^hlstore_replica_(writes_total|allocated_bytes)' || true
