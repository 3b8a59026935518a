#!/usr/bin/env bash
# nbdcopy round-trip soak (not run in CI): N times (default 20), a fresh 3-node
# `hlstore dev` cluster with a 1 GiB volume; a seeded image is written into the volume with
# nbdcopy and read back with nbdcopy, then compared with cmp. nbdcopy's defaults are what
# a user gets (4 connections, 64 requests of 256 KiB in flight each, holes and zero runs
# sent as WRITE_ZEROES); each iteration draws from the seed:
#   image      mkimage (benches/backup_mkimage.py's mix, seeded layout), runs (random runs
#              between holes), zeroruns (runs, holes and written zeros), dense (no holes)
#   nbdcopy    --connections, --requests, --request-size, --flush, --allocated for the
#              write; --connections for the read
#   timeouts   the agents' defaults, or short ones (a slow replica is left behind sooner)
#   disturb    none; cpu (busy loops during the write); stop (SIGSTOP a replica node for
#              1-4 s during the write: it lags, is left behind and resyncs); kill (kill -9
#              a replica node during the write and restart it: the read back runs while
#              it resyncs); stall (SIGSTOP the engine's node for up to 1.5 s)
# A mismatch prints the differing ranges (offset, length, whether the bad bytes are
# zeros), reads each range again through NBD (at once and after the replicas converged)
# and from every replica directly (`hlstore replica read`), which tells whether the store,
# the engine or the NBD frontend lost it; the node logs are kept. Reads are served by the
# engine's own replica, so a write lost only on the others would not show in the read
# back: every CHECK_REPLICAS-th iteration (default 1: each) also compares each whole
# replica with the image once the replicas converged. Prints one line per iteration and a
# summary; exit 1 on any mismatch or failure.
#
#   tests/soak/nbdcopy.sh [N] [SEED]        (uses target/release/hlstore, or $HLSTORE)
#   Pin a variation: KIND=, WRITE_OPTS= (nbdcopy options, "-" for none), READ_OPTS=,
#   DISTURB=, SHORT_TIMEOUTS=0|1. A failed iteration keeps its logs and findings; KEEP=1 keeps
#   every iteration's directory, images and replica data included (GiBs each).
#   Needs nbdcopy (libnbd-bin) and python3-libnbd.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
N=${1:-20}
SEED=${2:-1}
RANDOM=$SEED
HL=${HLSTORE:-${CARGO_TARGET_DIR:-target}/release/hlstore}
PY=/usr/bin/python3
IMGPY=tests/scripts/soak_image.py
[ -x "$HL" ] || cargo build -q --release --bin hlstore || exit 2
command -v nbdcopy >/dev/null || { echo "missing nbdcopy (libnbd-bin)" >&2; exit 2; }
"$PY" -c 'import nbd' 2>/dev/null || { echo "missing python3-libnbd" >&2; exit 2; }
ROOT=$(mktemp -d /tmp/hlstore-nbdcopy-XXXXXX)
SIZE_MIB=1024
CHECK_REPLICAS=${CHECK_REPLICAS:-1}

# Draws from the seed in this shell (a command substitution's $RANDOM is reseeded).
pick() { local a=("$@"); PICK=${a[RANDOM % ${#a[@]}]}; }
# delay MIN_MS SPAN_MS: sleeps MIN_MS plus up to SPAN_MS, drawn from the seed.
delay() { local r=$RANDOM; sleep "$(awk -v r="$r" -v m="$1" -v s="$2" 'BEGIN { printf "%.2f", (m + r % s) / 1000 }')"; }
ep() { "$PY" -c 'import json,sys; print([n["grpc"] for n in json.load(open(sys.argv[1]))["nodes"] if n["id"]==sys.argv[2]][0])' "$1/cluster.json" "$2"; }
# converged DIR: every replica of the volume healthy at one last_seq.
converged() {
  local st
  st=$("$HL" dev status --dir "$1" --json 2>/dev/null) || return 1
  "$PY" -c 'import json,sys; v=[v for v in json.load(sys.stdin)["volumes"] if v["name"]=="v"][0]; r=v["replicas"]; sys.exit(0 if r and all(x["state"]=="healthy" for x in r) and len({x["last_seq"] for x in r})==1 else 1)' <<<"$st"
}
wait_converged() {
  for _ in $(seq 1 "${2:-120}"); do
    converged "$1" && return 0
    sleep 1
  done
  return 1
}
# replica_read CLUSTER NODE OFFSET LENGTH OUT: the range as the replica on NODE holds it,
# in pieces of at most the largest read the replica service answers.
replica_read() {
  local at=$3 end=$(($3 + $4)) n endpoint
  endpoint="http://$(ep "$1" "$2")"
  : >"$5"
  while [ "$at" -lt "$end" ]; do
    n=$((end - at < 32 << 20 ? end - at : 32 << 20))
    HLSTORE_TLS_DIR="$1/tls/$2" "$HL" replica read v --offset "$at" --length "$n" --output - \
      --endpoint "$endpoint" >>"$5" 2>>"$1/replica-read.err" || return 1
    at=$((at + n))
  done
}
# events CLUSTER: what the engine's log says happened to the replicas.
events() {
  local log="$1/n1/node.log" lb rs lf
  lb=$(grep -c 'left behind' "$log" 2>/dev/null)
  rs=$(grep -c 'resync started' "$log" 2>/dev/null)
  lf=$(grep -c 'replica link failed' "$log" 2>/dev/null)
  echo "lb=${lb:-0},rs=${rs:-0},lf=${lf:-0}"
}

# keep_logs: stops the iteration's cluster and keeps its logs and findings; the images
# and the replicas' data (GiBs per iteration) only with KEEP=1.
keep_logs() {
  "$HL" dev down --dir "$CUR" >/dev/null 2>&1
  rm -f "$DIR/got.img" "$DIR"/replica-n*.img
  [ "${KEEP:-0}" = 1 ] || rm -rf "$IMG" "$CUR"/n*/data
  echo "  kept: $DIR (node logs: $CUR/n*/node.log)"
}

BUSY=()
stop_busy() {
  for p in "${BUSY[@]}"; do kill "$p" 2>/dev/null; done
  BUSY=()
}
CUR=""
cleanup() {
  stop_busy
  [ -n "$CUR" ] && { kill -CONT "$(cat "$CUR/n1/node.pid" 2>/dev/null)" "$(cat "$CUR/n2/node.pid" 2>/dev/null)" "$(cat "$CUR/n3/node.pid" 2>/dev/null)" 2>/dev/null; "$HL" dev down --dir "$CUR" >/dev/null 2>&1; }
}
trap cleanup EXIT

printf '%-4s %-6s %-9s %-44s %-6s %-7s %-6s %6s %6s %-18s %s\n' IT SEED IMAGE WRITE_OPTS READ DISTURB SHORT WRITE_S READ_S EVENTS VERDICT
bad=0
start=$(date +%s)
for ((it = 1; it <= N; it++)); do
  iseed=$RANDOM
  pick mkimage runs zeroruns dense mkimage runs
  kind=${KIND:-$PICK}
  if [ -n "${WRITE_OPTS:-}" ]; then
    wopts=$WRITE_OPTS
    [ "$wopts" = - ] && wopts=""
  else
    wopts=""
    pick "" "" 1 2 4 8; [ -n "$PICK" ] && wopts+=" --connections=$PICK"
    pick "" "" 16 256; [ -n "$PICK" ] && wopts+=" --requests=$PICK"
    pick "" "" 65536 1048576 4194304; [ -n "$PICK" ] && wopts+=" --request-size=$PICK"
    [ $((RANDOM % 3)) -eq 0 ] && wopts+=" --flush"
    [ $((RANDOM % 6)) -eq 0 ] && wopts+=" --allocated"
  fi
  pick - - --connections=1 --connections=8
  ropts=${READ_OPTS:-$PICK}
  [ "$ropts" = - ] && ropts=""
  rshort=${ropts:--}
  rshort=${rshort/--connections=/C}
  pick none none cpu stop stop kill kill stall
  disturb=${DISTURB:-$PICK}
  pick 0 0 1
  short=${SHORT_TIMEOUTS:-$PICK}

  DIR="$ROOT/it-$it"
  CUR="$DIR/cluster"
  mkdir -p "$DIR"
  IMG="$DIR/image.img"
  case "$kind" in
    mkimage) "$PY" benches/backup_mkimage.py mkimage "$IMG" "$SIZE_MIB" "$iseed" ;;
    *) "$PY" "$IMGPY" make "$kind" "$IMG" "$SIZE_MIB" "$iseed" ;;
  esac
  if [ "$short" = 1 ]; then
    export HLSTORE_ACK_TIMEOUT_MS=150 HLSTORE_FAILURE_TIMEOUT_MS=1500 HLSTORE_RETRY_INTERVAL_MS=300
  else
    unset HLSTORE_ACK_TIMEOUT_MS HLSTORE_FAILURE_TIMEOUT_MS HLSTORE_RETRY_INTERVAL_MS
  fi
  URI=$("$HL" dev up --dir "$CUR" --nodes 3 --volume v --size "${SIZE_MIB}MiB" 2>"$DIR/up.err") || {
    printf '%-4s %-6s dev up failed: %s\n' "$it" "$iseed" "$(tail -1 "$DIR/up.err")"
    bad=$((bad + 1))
    "$HL" dev down --dir "$CUR" >/dev/null 2>&1
    continue
  }

  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  nbdcopy $wopts "$IMG" "$URI" 2>"$DIR/write.err" &
  cp_pid=$!
  case "$disturb" in
    cpu)
      for _ in 1 2 3; do (while :; do :; done) & BUSY+=($!); done ;;
    stop | kill | stall)
      delay 500 4000
      pick n2 n3
      node=$PICK
      [ "$disturb" = stall ] && node=n1
      pid=$(cat "$CUR/$node/node.pid" 2>/dev/null)
      if [ -n "$pid" ] && kill -0 "$cp_pid" 2>/dev/null; then
        case "$disturb" in
          stop) kill -STOP "$pid"; delay 1000 3000; kill -CONT "$pid" ;;
          stall) kill -STOP "$pid"; delay 300 1200; kill -CONT "$pid" ;;
          kill)
            kill -9 "$pid"
            delay 1000 2000
            "$HL" dev up --dir "$CUR" >/dev/null 2>>"$DIR/up.err" ;;
        esac
      fi ;;
  esac
  wait "$cp_pid"
  wrc=$?
  stop_busy
  t1=$(date +%s.%N)
  # shellcheck disable=SC2086
  nbdcopy $ropts "$URI" "$DIR/got.img" 2>"$DIR/read.err"
  rrc=$?
  t2=$(date +%s.%N)
  ws=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  rs=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')

  verdict=ok
  if [ "$wrc" -ne 0 ] || [ "$rrc" -ne 0 ]; then
    verdict="NBDCOPY FAILED (write rc $wrc, read rc $rrc)"
  elif ! cmp -s "$IMG" "$DIR/got.img"; then
    verdict=MISMATCH
  fi
  if [ "$verdict" = ok ] && [ $((it % CHECK_REPLICAS)) -eq 0 ]; then
    # The whole of every replica, once they converged.
    if ! wait_converged "$CUR" 180; then
      verdict="NOT CONVERGED"
    else
      for n in n1 n2 n3; do
        replica_read "$CUR" "$n" 0 $((SIZE_MIB << 20)) "$DIR/replica-$n.img" || { verdict="REPLICA READ FAILED ($n)"; break; }
        if ! cmp -s "$IMG" "$DIR/replica-$n.img"; then
          verdict="REPLICA $n MISMATCH"
          "$PY" "$IMGPY" diff "$IMG" "$DIR/replica-$n.img" | head -20 >"$DIR/diff-$n.txt"
        fi
        rm -f "$DIR/replica-$n.img"
      done
      [ "$verdict" = ok ] && verdict="ok (+replicas)"
    fi
  fi
  printf '%-4s %-6s %-9s %-44s %-6s %-7s %-6s %6s %6s %-18s %s\n' "$it" "$iseed" "$kind" "${wopts:- -}" \
    "$rshort" "$disturb" "$short" "$ws" "$rs" "$(events "$CUR")" "$verdict"

  if [ "$verdict" = MISMATCH ]; then
    bad=$((bad + 1))
    "$PY" "$IMGPY" diff "$IMG" "$DIR/got.img" >"$DIR/diff.txt"
    echo "  differing ranges ($(wc -l <"$DIR/diff.txt") in all; first 10):"
    head -10 "$DIR/diff.txt" | sed 's/^/    /'
    mapfile -t RANGES < <(head -5 "$DIR/diff.txt" | "$PY" -c 'import json,sys; [print(r["offset"], r["length"]) for r in map(json.loads, sys.stdin)]')
    # Through NBD again, at once (a transient read?), then from each replica.
    for rg in "${RANGES[@]}"; do
      read -r off len <<<"$rg"
      "$PY" "$IMGPY" nbdread "$URI" "$off" "$len" "$DIR/nbd-again-$off.bin" 2>>"$DIR/nbdread.err"
      line="  at $off+$len: nbd again $("$PY" "$IMGPY" cmp "$IMG" "$off" "$len" "$DIR/nbd-again-$off.bin")"
      for n in n1 n2 n3; do
        replica_read "$CUR" "$n" "$off" "$len" "$DIR/now-$n-$off.bin"
        line+=", $n now $("$PY" "$IMGPY" cmp "$IMG" "$off" "$len" "$DIR/now-$n-$off.bin")"
      done
      echo "$line"
    done
    conv=converged
    wait_converged "$CUR" 120 || conv="NOT converged"
    "$HL" dev status --dir "$CUR" --json >"$DIR/status.json" 2>&1
    for rg in "${RANGES[@]}"; do
      read -r off len <<<"$rg"
      "$PY" "$IMGPY" nbdread "$URI" "$off" "$len" "$DIR/nbd-later-$off.bin" 2>>"$DIR/nbdread.err"
      line="  at $off+$len ($conv): nbd $("$PY" "$IMGPY" cmp "$IMG" "$off" "$len" "$DIR/nbd-later-$off.bin")"
      for n in n1 n2 n3; do
        replica_read "$CUR" "$n" "$off" "$len" "$DIR/later-$n-$off.bin"
        line+=", $n $("$PY" "$IMGPY" cmp "$IMG" "$off" "$len" "$DIR/later-$n-$off.bin")"
      done
      echo "$line"
    done
    keep_logs
  elif [ "$verdict" = ok ] || [ "$verdict" = "ok (+replicas)" ]; then
    "$HL" dev down --dir "$CUR" >/dev/null 2>&1
    [ "${KEEP:-0}" = 1 ] || rm -rf "$DIR"
  else
    bad=$((bad + 1))
    for f in "$DIR"/diff-n*.txt; do
      [ -e "$f" ] && { echo "  $(basename "$f" .txt | sed 's/diff-//') differs from the image:"; head -10 "$f" | sed 's/^/    /'; }
    done
    keep_logs
  fi
  CUR=""
done
echo "iterations $N, seed $SEED, failed $bad, $(($(date +%s) - start)) s; logs: $ROOT"
[ "$bad" -eq 0 ]
