#!/usr/bin/env bash
# Homelab network bench: four hlstore node agents in network namespaces on one bridge,
# each link shaped like a Raspberry Pi's 1 GbE port, the client (fio) on node 1.
#
# Usage: sudo ./benches/homelab_bench.sh          (from the repository root; needs root)
# Env:
#   SIZE=512MiB     volume size (the rebuild copies all of it: it is prefilled first)
#   RUNTIME=10      seconds per timed fio job (plus RAMP)
#   RAMP=1          seconds of ramp-up per timed job
#   RATE=1gbit      link rate, each direction of each node's link (tc)
#   DELAY=100us     one-way delay added on each node's egress (tc netem; RTT = 2 x DELAY).
#                   Kernels without sch_netem get the rate cap only (tbf); the report says so.
#   CAP_MIBPS=30    --resync-mibps for the rebuild under load
#   HLSTORE_BIN=... use this binary instead of `cargo build --release --bin hlstore`
#   KEEP=1          keep the work directory (node logs, fio JSON)
#
# Topology: n1 n2 n3 hold the volume's replicas, the engine and fio run on n1, n4 and n5
# are empty spares that the rebuilds fill. Steps:
#   1. link limits, measured with plain TCP: n1 -> n2 alone, and n1 -> n2 + n1 -> n3 at
#      once (fan-out: what a writer that sends every write to two peers can reach);
#   2. fio (nbd engine, on n1): 1 MiB sequential write QD8 (prefill, then timed), 4 KiB
#      random write QD32, 4 KiB random write QD1 (mean and p99 completion latency);
#   3. rebuild, idle: `volume replace-replica --from n3 --to n4` of the filled volume,
#      timed until every replica is healthy (bytes = the volume's allocated bytes);
#   4. rebuild under load with n1's agent restarted with --resync-mibps CAP_MIBPS: n4 to
#      n5 while fio writes; the copy rate must hold near the cap.
# Prints one table; everything it started (namespaces, agents) is removed on exit.
set -euo pipefail

SIZE="${SIZE:-512MiB}"
RUNTIME="${RUNTIME:-10}"
RAMP="${RAMP:-1}"
RATE="${RATE:-1gbit}"
DELAY="${DELAY:-100us}"
CAP_MIBPS="${CAP_MIBPS:-30}"
KEEP="${KEEP:-0}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
for t in ip tc fio nbdinfo python3; do
  command -v "$t" >/dev/null || { echo "missing $t (Debian: iproute2 fio libnbd-bin python3)" >&2; exit 1; }
done
if [ -z "${HLSTORE_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin hlstore >&2)
  HLSTORE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/hlstore"
fi
[ -x "$HLSTORE_BIN" ] || { echo "no hlstore binary at $HLSTORE_BIN" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/hlstore-homelab-bench.XXXXXX")"
NS="hlb$$"
NODES=(n1 n2 n3 n4 n5)
GRPC=7400
PEERS="$(for i in 1 2 3 4 5; do printf 'n%s=10.233.0.%s:%s,' "$i" "$i" "$GRPC"; done)"
PEERS="${PEERS%,}"

cleanup() {
  local rc=$?
  [ "$KEEP" = 1 ] && echo "kept $WORK" >&2
  exec 2>/dev/null
  for n in "${NODES[@]}"; do
    [ -f "$WORK/$n.pid" ] && kill -9 "$(cat "$WORK/$n.pid")" 2>/dev/null || true
  done
  for n in sw "${NODES[@]}"; do
    ip netns pids "$NS-$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$NS-$n" 2>/dev/null || true
  done
  [ "$KEEP" = 1 ] || rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() { local n="$1"; shift; ip netns exec "$NS-$n" "$@"; }

# --- network: a bridge in "sw", one veth per node, both directions shaped ------------------
ip netns add "$NS-sw"
ip -n "$NS-sw" link set lo up
ip -n "$NS-sw" link add br0 type bridge
ip -n "$NS-sw" link set br0 up
SHAPING=""
for i in 1 2 3 4 5; do
  n="n$i"
  ip netns add "$NS-$n"
  ip -n "$NS-$n" link set lo up
  ip link add hl0 netns "$NS-$n" type veth peer name "$n" netns "$NS-sw"
  ip -n "$NS-$n" addr add "10.233.0.$i/24" dev hl0
  ip -n "$NS-$n" link set hl0 up
  ip -n "$NS-sw" link set "$n" master br0
  ip -n "$NS-sw" link set "$n" up
  # Node egress: rate + delay (netem), or rate only (tbf) where the kernel has no netem.
  if in_ns "$n" tc qdisc add dev hl0 root netem delay "$DELAY" rate "$RATE" limit 100000 2>/dev/null; then
    SHAPING="netem: $RATE, $DELAY each way (RTT $DELAY x 2)"
  else
    in_ns "$n" tc qdisc add dev hl0 root tbf rate "$RATE" burst 256kb latency 20ms
    SHAPING="tbf: $RATE each way; no added delay (this kernel has no sch_netem)"
  fi
  # Node ingress = the switch port's egress.
  ip netns exec "$NS-sw" tc qdisc add dev "$n" root tbf rate "$RATE" burst 256kb latency 20ms
done
echo "links: $SHAPING" >&2

# --- link limits, plain TCP ---------------------------------------------------------------
cat >"$WORK/blast.py" <<'EOF'
import socket, sys, time
mode = sys.argv[1]
if mode == "sink":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(4)
    for _ in range(int(sys.argv[3])):
        c, _ = s.accept()
        while c.recv(1 << 20):
            pass
        c.close()
else:  # send HOST:PORT... for SECONDS; prints MiB/s per destination
    import threading
    secs = float(sys.argv[2]); dests = sys.argv[3:]; buf = b"x" * (1 << 20); out = {}
    def run(d):
        h, p = d.split(":"); c = socket.create_connection((h, int(p))); n = 0; t0 = time.time()
        while time.time() - t0 < secs:
            c.sendall(buf); n += len(buf)
        c.close(); out[d] = n / (time.time() - t0) / (1 << 20)
    ts = [threading.Thread(target=run, args=(d,)) for d in dests]
    [t.start() for t in ts]; [t.join() for t in ts]
    print(sum(out.values()))
EOF
in_ns n2 python3 "$WORK/blast.py" sink 5001 2 & SINK2=$!
in_ns n3 python3 "$WORK/blast.py" sink 5001 1 & SINK3=$!
sleep 0.5
LINK1="$(in_ns n1 python3 "$WORK/blast.py" send 3 10.233.0.2:5001)"
FANOUT="$(in_ns n1 python3 "$WORK/blast.py" send 3 10.233.0.2:5001 10.233.0.3:5001)"
wait "$SINK2" "$SINK3" 2>/dev/null || true
echo "TCP n1->n2: $LINK1 MiB/s; n1->n2+n3 together: $FANOUT MiB/s" >&2

# --- agents ---------------------------------------------------------------------------------
# Mutual TLS on every hop, as deployed: a CA, a node certificate per agent, an admin one.
"$HLSTORE_BIN" cert init --dir "$WORK/tls" >/dev/null
"$HLSTORE_BIN" cert issue --ca-dir "$WORK/tls" --role admin --out "$WORK/tls/admin" >/dev/null
for n in "${NODES[@]}"; do
  "$HLSTORE_BIN" cert issue --ca-dir "$WORK/tls" --role node --node "$n" --ip "10.233.0.${n#n}" --out "$WORK/tls/$n" >/dev/null
done
start_agent() {
  local n="$1"; shift
  local i="${n#n}"
  mkdir -p "$WORK/$n"
  # Not through `in_ns`: a function in the background is a subshell, and $! must be the
  # agent itself (`ip netns exec` and `env` exec into it) for kill and wait to reach it.
  ip netns exec "$NS-$n" env HLSTORE_SCRUB_MIBPS=0 "$HLSTORE_BIN" --tls-dir "$WORK/tls/$n" node --id "$n" --listen "10.233.0.$i:$GRPC" \
    --nbd-listen 127.0.0.1:10809 --metrics-listen 127.0.0.1:9400 --peers "$PEERS" \
    --data-dir "$WORK/$n/data" "$@" >>"$WORK/$n/node.log" 2>&1 &
  echo $! >"$WORK/$n.pid"
  local before
  before="$(grep -c '^listening grpc=' "$WORK/$n/node.log" 2>/dev/null || true)"
  for _ in $(seq 200); do
    [ "$(grep -c '^listening grpc=' "$WORK/$n/node.log" 2>/dev/null || true)" -gt "${before:-0}" ] && return 0
    sleep 0.05
  done
  echo "agent $n did not start:" >&2; tail -20 "$WORK/$n/node.log" >&2; exit 1
}
for n in "${NODES[@]}"; do start_agent "$n"; done
cli() { in_ns n1 env HLSTORE_ENDPOINT="10.233.0.1:$GRPC" HLSTORE_TLS_DIR="$WORK/tls/admin" "$HLSTORE_BIN" "$@"; }

cli volume create bench --size "$SIZE" --nodes n1,n2,n3 >/dev/null
URI="$(cli volume attach bench --node n1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nbd_uri"])')"
BYTES="$(in_ns n1 nbdinfo --size "$URI")"
echo "volume: $URI ($BYTES bytes); load before: $(uptime)" >&2

run_fio() {
  local name="$1"; shift
  echo "  fio $name ..." >&2
  in_ns n1 fio --name="$name" --ioengine=nbd --uri="$URI" --numjobs=1 --group_reporting \
    --output-format=json --output="$WORK/fio-$name.json" "$@" >/dev/null
}
timed=(--time_based --runtime="$RUNTIME" --ramp_time="$RAMP")
run_fio prefill --rw=write --bs=1M --iodepth=8 --size="$BYTES"
run_fio seqwrite --rw=write --bs=1M --iodepth=8 "${timed[@]}"
run_fio randwrite --rw=randwrite --bs=4k --iodepth=32 "${timed[@]}"
run_fio latwrite --rw=randwrite --bs=4k --iodepth=1 "${timed[@]}"

# wait_healthy [NODE BYTES]: seconds until every replica is healthy (and NODE's replica
# holds at least BYTES: a rebuild target is only done once it has the data).
wait_healthy() {
  local t0 now
  t0="$(date +%s.%N)"
  while true; do
    if cli volume show bench --json | python3 -c '
import json, sys
node, want = (sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 2 else (None, 0)
r = json.load(sys.stdin).get("replicas", [])
ok = r and all(x.get("state") == "healthy" for x in r)
if node:
    ok = ok and any(x["node"] == node and x.get("allocated_bytes", 0) >= want for x in r)
sys.exit(0 if ok else 1)' "$@"; then
      break
    fi
    sleep 0.1
  done
  now="$(date +%s.%N)"
  python3 -c "print(f'{$now - $t0:.2f}')"
}
allocated() {
  cli volume show bench --json |
    python3 -c 'import json,sys; print(max(r.get("allocated_bytes", 0) for r in json.load(sys.stdin)["replicas"]))'
}

ALLOC="$(allocated)"
[ "$ALLOC" -gt 0 ] 2>/dev/null || ALLOC="$BYTES"
echo "  rebuild n3 -> n4 (idle) ..." >&2
cli volume replace-replica bench --from n3 --to n4 >/dev/null
REBUILD_IDLE="$(wait_healthy n4 "$ALLOC")"

# Rebuild under load, capped: n1 (the engine's node) restarts with the cap.
kill "$(cat "$WORK/n1.pid")"; wait "$(cat "$WORK/n1.pid")" 2>/dev/null || true
start_agent n1 --resync-mibps "$CAP_MIBPS"
wait_healthy >/dev/null
echo "  rebuild n4 -> n5 under a 4 KiB QD8 write load, --resync-mibps $CAP_MIBPS ..." >&2
ip netns exec "$NS-n1" fio --name=load --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=8 \
  --time_based --runtime=600 --output-format=json --output="$WORK/fio-load.json" >/dev/null 2>&1 &
LOAD=$!
sleep 1
ALLOC_CAP="$(allocated)"
cli volume replace-replica bench --from n4 --to n5 >/dev/null
REBUILD_CAP="$(wait_healthy n5 "$ALLOC_CAP")"
kill "$LOAD" 2>/dev/null || true; wait "$LOAD" 2>/dev/null || true
echo "load after: $(uptime)" >&2

python3 - "$WORK" "$LINK1" "$FANOUT" "$ALLOC" "$REBUILD_IDLE" "$REBUILD_CAP" "$CAP_MIBPS" "$SHAPING" "$ALLOC_CAP" <<'EOF'
import json, os, sys
work, link1, fanout, alloc, idle, cap_s, cap, shaping, alloc_cap = sys.argv[1:]
link1, fanout, alloc, idle, cap_s, cap = float(link1), float(fanout), int(alloc), float(idle), float(cap_s), float(cap)
alloc_cap = int(alloc_cap)
def job(name):
    with open(os.path.join(work, f"fio-{name}.json")) as f:
        return json.load(f)["jobs"][0]["write"]
mib = 1 << 20
half = fanout / 2  # what each of two peers gets when the writer sends to both
rows = []
seq = job("seqwrite")["bw_bytes"] / mib
rows.append(("1 MiB seq write QD8", f"{seq:,.1f} MiB/s", f"fan-out limit {half:,.1f} MiB/s", f"{seq / half * 100:.0f} %", ">= 90 %"))
rw = job("randwrite")
rows.append(("4 KiB randwrite QD32", f"{rw['iops']:,.0f} IOPS", f"{rw['iops'] * 4096 / mib:,.1f} MiB/s of {half:,.1f}", "", ""))
lat = job("latwrite")["clat_ns"]
rows.append(("4 KiB write QD1 mean / p99", f"{lat['mean'] / 1000:,.0f} / {lat['percentile']['99.000000'] / 1000:,.0f} µs", "", "", ""))
import re, datetime
def copy_seconds(target):
    """Seconds from `resync started` of `target` to its `status=healthy` in n1's log."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(os.path.join(work, "n1", "node.log")).read())
    start = end = None
    for line in text.splitlines():
        ts = line.split(" ", 1)[0]
        if f"replica.id={target}" not in line:
            continue
        if "resync started" in line:
            start, end = ts, None  # the last resync of the target is the one measured
        elif "status=healthy" in line and start is not None and end is None:
            end = ts
    if not (start and end):
        return None
    p = lambda t: datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    return (p(end) - p(start)).total_seconds()
# The copy: from the engine's `resync started` to the target's `status=healthy` (what
# replace-replica adds around it, detach and re-attach, is not rebuild throughput).
c = copy_seconds("n4")
r = alloc / mib / (c or idle)
rows.append(("rebuild, idle (the copy)", f"{r:,.1f} MiB/s", f"link {link1:,.1f} MiB/s", f"{r / link1 * 100:.0f} %", ">= 90 %"))
c = copy_seconds("n5")
r_cap = alloc_cap / mib / (c or cap_s)
rows.append((f"rebuild under load, cap {cap:.0f} MiB/s (the copy)", f"{r_cap:,.1f} MiB/s", f"cap {cap:.0f} MiB/s", f"{r_cap / cap * 100:.0f} %", "<= 100 %"))
hdr = ("test", "hlstore", "limit", "of limit", "target")
w = [max(len(r[i]) for r in rows + [hdr]) for i in range(5)]
line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
print(f"links: {shaping}; measured TCP n1->n2 {link1:,.1f} MiB/s, n1->n2+n3 {fanout:,.1f} MiB/s; rebuilt {alloc / mib:,.0f} MiB")
print(line(hdr))
print("|" + "|".join("-" * (x + 2) for x in w) + "|")
for r in rows:
    print(line(r))
EOF
