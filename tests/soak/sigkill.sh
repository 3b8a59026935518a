#!/usr/bin/env bash
# SIGKILL soak (not run in CI): ROUNDS (default 200) times, SIGKILL a random node agent of a
# 3-node `hlstore dev` cluster and restart it after a random delay, while fio
# (--ioengine=nbd --verify=crc32c) and the logging writer (tests/scripts/nbd_load.py) run
# on the volume. fio runs in passes; a pass cut short by the loss of its connection (the
# engine's node was killed) is restarted and counted, a verify error is a violation. At the
# end the history checker checks the writer's log against the final content and every
# replica (after convergence). Prints a results table; exit 1 on any violation.
#
#   tests/soak/sigkill.sh [ROUNDS] [SEED]        (uses target/debug/hlstore, or $HLSTORE)
#   FIO_IO_SIZE (default 1M): bytes each fio pass writes before verifying them; small
#   enough that most passes finish (and verify) between two kills of the engine's node.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
ROUNDS=${1:-200}
SEED=${2:-1}
RANDOM=$SEED
HL=${HLSTORE:-${CARGO_TARGET_DIR:-target}/debug/hlstore}
PY=/usr/bin/python3
[ -x "$HL" ] || cargo build -q --bin hlstore || exit 2
export HLSTORE_ACK_TIMEOUT_MS=300 HLSTORE_FAILURE_TIMEOUT_MS=3000 HLSTORE_IO_TIMEOUT_MS=5000 HLSTORE_RETRY_INTERVAL_MS=300
DIR=$(mktemp -d /tmp/hlstore-sigkill-XXXXXX)
BLOCKS=4096 # the writer's region: the first 16 MiB; fio uses 16-80 MiB
URI=$("$HL" dev up --dir "$DIR/cluster" --nodes 3 --volume soak --size 128MiB 2>"$DIR/up.err") || { cat "$DIR/up.err"; exit 2; }
cleanup() {
  touch "$DIR/w.stop" "$DIR/fio.stop"
  [ -n "${WPID:-}" ] && kill "$WPID" 2>/dev/null
  [ -n "${FPID:-}" ] && kill "$FPID" 2>/dev/null
  "$HL" dev down --dir "$DIR/cluster" >/dev/null 2>&1
}
trap cleanup EXIT
ep() { "$PY" -c 'import json,sys; print([n["grpc"] for n in json.load(open(sys.argv[1]))["nodes"] if n["id"]==sys.argv[2]][0])' "$DIR/cluster/cluster.json" "$1"; }

"$PY" tests/scripts/nbd_load.py write "$URI" --blocks $BLOCKS --stop-file "$DIR/w.stop" --seed "$SEED" \
  --op-timeout 30 >"$DIR/writer.log" 2>"$DIR/writer.err" &
WPID=$!
# fio passes in a loop until the stop file exists.
(
  pass=0
  while [ ! -e "$DIR/fio.stop" ]; do
    pass=$((pass + 1))
    fio --name=soak --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --offset=16M --size=64M \
      --io_size=${FIO_IO_SIZE:-1M} --verify=crc32c --do_verify=1 --verify_fatal=1 --output="$DIR/fio-$pass.out" >/dev/null 2>&1
    echo "$pass $?" >>"$DIR/fio.passes"
  done
) &
FPID=$!

declare -A KILLS=([n1]=0 [n2]=0 [n3]=0)
for ((round = 1; round <= ROUNDS; round++)); do
  node="n$((RANDOM % 3 + 1))"
  pid=$(cat "$DIR/cluster/$node/node.pid" 2>/dev/null)
  if [ -n "$pid" ] && grep -q "$DIR/cluster" "/proc/$pid/cmdline" 2>/dev/null; then
    kill -9 "$pid"
    KILLS[$node]=$((KILLS[$node] + 1))
  fi
  sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 0.2 + (r % 3000) / 1000 }')"
  "$HL" dev up --dir "$DIR/cluster" >/dev/null 2>>"$DIR/up.err" || echo "round $round: dev up failed" >&2
  sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 1 + (r % 2000) / 1000 }')"
done
touch "$DIR/fio.stop" "$DIR/w.stop"
wait "$WPID"
wait "$FPID"

# Wait for convergence, then read the final content and every replica.
for _ in $(seq 1 300); do
  st=$("$HL" dev status --dir "$DIR/cluster" --json 2>/dev/null)
  if [ -n "$st" ] && "$PY" -c 'import json,sys; v=[v for v in json.load(sys.stdin)["volumes"] if v["name"]=="soak"][0]; r=v["replicas"]; sys.exit(0 if r and all(x["state"]=="healthy" for x in r) and len({x["last_seq"] for x in r})==1 else 1)' <<<"$st"; then
    break
  fi
  sleep 1
done
URI=$("$PY" -c 'import json,sys; print([v for v in json.load(sys.stdin)["volumes"] if v["name"]=="soak"][0]["nbd_uri"] or "")' <<<"$st")
"$PY" tests/scripts/nbd_load.py dump "$URI" --blocks $BLOCKS --out "$DIR/final.img"
REPLICAS=()
for n in n1 n2 n3; do
  HLSTORE_TLS_DIR="$DIR/cluster/tls/$n" "$HL" replica read soak --length $((BLOCKS * 4096)) --output "$DIR/replica-$n.img" --endpoint "http://$(ep "$n")" &&
    REPLICAS+=(--replica "$n=$DIR/replica-$n.img")
done
"$PY" tests/scripts/history_check.py --blocks $BLOCKS --writer "n1=$DIR/writer.log" --final "$DIR/final.img" "${REPLICAS[@]}" >"$DIR/check.txt"
check_rc=$?

passes=$(wc -l <"$DIR/fio.passes" 2>/dev/null || echo 0)
fio_ok=$(awk '$2 == 0' "$DIR/fio.passes" 2>/dev/null | wc -l)
fio_verify=$(grep -l -E 'verify: bad|crc32c: wanted|bad magic' "$DIR"/fio-*.out 2>/dev/null | wc -l)
printf '%-34s %10s\n' "seed" "$SEED" "rounds (SIGKILLs)" "$ROUNDS" "kills n1/n2/n3" "${KILLS[n1]}/${KILLS[n2]}/${KILLS[n3]}" \
  "fio passes" "$passes" "fio passes completed" "$fio_ok" "fio passes cut short" "$((passes - fio_ok - fio_verify))" \
  "FIO VERIFY FAILURES" "$fio_verify"
cat "$DIR/check.txt"
echo "logs: $DIR"
[ "$fio_verify" -eq 0 ] && [ "$check_rc" -eq 0 ]
