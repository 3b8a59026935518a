#!/usr/bin/env bash
# The one-command tour on an embedded default: installs what is missing, builds hlstore,
# starts a local cluster of three node agents (separate processes on loopback, data under
# $HLSTORE_DEMO_DIR, default /tmp/hlstore-demo), creates and attaches a 3-replica volume,
# writes an image into it over NBD and reads it back, then backs the volume's contents
# up to a local directory repository and restores them. The cluster keeps running at the
# end; stop it with: hlstore dev down --dir $HLSTORE_DEMO_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="/usr/bin:$PATH"
cargo build --quiet --bin hlstore
HL="$PWD/target/debug/hlstore"
DIR="${HLSTORE_DEMO_DIR:-/tmp/hlstore-demo}"
mkdir -p "$DIR"

echo "== starting a 3-node cluster in $DIR"
URI=$("$HL" dev up --dir "$DIR" --nodes 3 --volume demo --size 1GiB)
echo "volume demo is exported at $URI"
# `dev up` made the cluster's CA and certificates under $DIR/tls; the CLI uses the admin one.
export HLSTORE_TLS_DIR="$DIR/tls/admin"

echo "== writing 64 MiB through NBD (qemu-img), reading it back (nbdcopy, 4 connections)"
head -c 64M /dev/urandom >"$DIR/image.bin"
qemu-img convert -n -f raw -O raw "$DIR/image.bin" "$URI"
nbdcopy --connections=4 "$URI" "$DIR/readback.bin"
cmp -n $((64 << 20)) "$DIR/image.bin" "$DIR/readback.bin"
echo "round trip: 64 MiB byte-identical"
"$HL" dev status --dir "$DIR"

echo "== backing the volume's contents up to $DIR/repo and restoring them"
export HLSTORE_REPO_PASSWORD="${HLSTORE_REPO_PASSWORD:-demo-password}"
[ -f "$DIR/repo/config" ] || [ -d "$DIR/repo/keys" ] || "$HL" backup init --repo "$DIR/repo" || true
ID=$("$HL" backup create --repo "$DIR/repo" --source "$DIR/readback.bin" --label volume=demo --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
"$HL" backup list --repo "$DIR/repo"
rm -f "$DIR/restored.bin"
"$HL" restore "$ID" --repo "$DIR/repo" --to-file "$DIR/restored.bin"
cmp "$DIR/readback.bin" "$DIR/restored.bin"
echo "backup $ID restored byte-identical"
echo
echo "The cluster is still running: hlstore dev status --dir $DIR ; stop it with hlstore dev down --dir $DIR"
echo "For hlstore volume/snapshot commands: export HLSTORE_TLS_DIR=$DIR/tls/admin HLSTORE_ENDPOINT=\$(the endpoint in hlstore dev status)"
