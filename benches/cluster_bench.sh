#!/usr/bin/env bash
# Volume I/O benchmark: a 3-node local hlstore cluster vs nbdkit's file plugin, both over
# NBD on loopback, both backed by the same disk, driven by fio's nbd engine.
#
# Usage: ./benches/cluster_bench.sh            (from the repository root)
# Env:
#   SIZE=1GiB       volume size (hlstore syntax; nbdkit's file gets the same byte count)
#   RUNTIME=15      seconds per timed job (plus RAMP)
#   RAMP=2          seconds of ramp-up per timed job (not measured)
#   WORKDIR=DIR     scratch directory (default: a fresh temp dir under $TMPDIR or /tmp)
#   KEEP=1          keep WORKDIR (cluster data, fio JSON, node logs) after the run
#   HLSTORE_BIN=... use this binary instead of building `cargo build --release --bin hlstore`
#
# Jobs, each run against nbdkit and then hlstore (job by job, a `sync` before each run;
# same parameters):
#   prefill      1 MiB sequential write of the whole volume, QD8 (untimed; informational)
#   randread     4 KiB random read, QD32
#   randwrite    4 KiB random write, QD32
#   seqwrite     1 MiB sequential write, QD8
#   lat-write    4 KiB random write, QD1: mean and p99 completion latency
#   lat-write+fl 4 KiB random write, QD1, NBD flush after every write (fsync=1)
# Then, hlstore only (the cluster has a fourth node for this):
#   rebuild      `volume replace-replica --from n3 --to n4` of the filled volume, timed until
#                every replica is healthy, against `cp` + `sync` of the same bytes
#   resync       n2 stopped, 1 % of the volume rewritten (4 KiB random writes), n2 started:
#                time until it is healthy, against `cp` + `sync` of the changed bytes
#   RSS          of the engine's agent (n1): idle after the jobs, and its peak (VmHWM)
#   CPU / write  user+system CPU of all agents during the randwrite job per write
# Prints a table: test | nbdkit | hlstore | ratio (hlstore/nbdkit; latency: added µs).
set -euo pipefail

SIZE="${SIZE:-1GiB}"
RUNTIME="${RUNTIME:-15}"
RAMP="${RAMP:-2}"
KEEP="${KEEP:-0}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
for t in fio nbdkit nbdinfo python3; do
  command -v "$t" >/dev/null || { echo "missing $t (Debian: fio nbdkit libnbd-bin python3)" >&2; exit 1; }
done
if ! fio --enghelp=nbd >/dev/null 2>&1; then
  echo "this fio has no nbd ioengine (Debian's fio has it)" >&2
  exit 1
fi
if [ -z "${HLSTORE_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin hlstore >&2)
  HLSTORE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/hlstore"
fi
[ -x "$HLSTORE_BIN" ] || { echo "no hlstore binary at $HLSTORE_BIN" >&2; exit 1; }

WORK="${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/hlstore-cluster-bench.XXXXXX")}"
mkdir -p "$WORK"
CLUSTER="$WORK/cluster"
NBDKIT_PID=""

cleanup() {
  local rc=$?
  if [ -f "$CLUSTER/cluster.json" ]; then
    "$HLSTORE_BIN" dev down --dir "$CLUSTER" >/dev/null 2>&1 || true
  fi
  if [ -n "$NBDKIT_PID" ]; then
    kill "$NBDKIT_PID" 2>/dev/null || true
    wait "$NBDKIT_PID" 2>/dev/null || true
  fi
  if [ "$KEEP" = 1 ]; then
    echo "kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# --- hlstore: 3 node agents on loopback, one volume attached on n1 --------------------------
echo "starting a 3-node hlstore cluster in $CLUSTER ..." >&2
export HLSTORE_TLS_DIR="$CLUSTER/tls/admin"  # the admin certificate `dev up` makes
HL_URI="$("$HLSTORE_BIN" dev up --dir "$CLUSTER" --nodes 4 --replicas 3 --volume bench --size "$SIZE" 2>"$WORK/dev-up.log")" || {
  cat "$WORK/dev-up.log" >&2; exit 1; }
HL_URI="$(printf '%s\n' "$HL_URI" | tail -n1)"
case "$HL_URI" in
  nbd://127.0.0.1:*) ;;
  *) echo "unexpected NBD URI from dev up: '$HL_URI' (loopback only)" >&2; exit 1 ;;
esac
BYTES="$(nbdinfo --size "$HL_URI")"

# --- nbdkit: file plugin on a sparse file of the same size, same disk -------------------------
IMG="$WORK/nbdkit.img"
truncate -s "$BYTES" "$IMG"
PORT="$(free_port)"
nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$PORT" file "file=$IMG" 2>"$WORK/nbdkit.log" &
NBDKIT_PID=$!
KIT_URI="nbd://127.0.0.1:$PORT"
for _ in $(seq 100); do
  nbdinfo --size "$KIT_URI" >/dev/null 2>&1 && break
  kill -0 "$NBDKIT_PID" 2>/dev/null || { cat "$WORK/nbdkit.log" >&2; exit 1; }
  sleep 0.1
done
nbdinfo --size "$KIT_URI" >/dev/null

echo "hlstore: $HL_URI   nbdkit: $KIT_URI   size: $BYTES bytes" >&2
echo "load before: $(uptime)" >&2
echo "load before: $(uptime)" >"$WORK/load.txt"

# run_fio TARGET URI NAME ARGS...: one fio job, JSON to $WORK/TARGET-NAME.json.
run_fio() {
  local target="$1" uri="$2" name="$3"; shift 3
  echo "  $target $name ..." >&2
  fio --name="$name" --ioengine=nbd --uri="$uri" --numjobs=1 --group_reporting \
    --output-format=json --output="$WORK/$target-$name.json" "$@" >/dev/null
}
timed=(--time_based --runtime="$RUNTIME" --ramp_time="$RAMP")

# agent_cpu: user+system clock ticks of every hlstore agent of the cluster.
agent_cpu() {
  local total=0 pid
  for f in "$CLUSTER"/n*/node.pid; do
    pid="$(cat "$f")"
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}

# Job by job, nbdkit then hlstore, so both run with the disk in a like state (the
# writeback of the previous job's dirty pages goes on in the background).
for job in prefill randread randwrite seqwrite latwrite latwriteflush; do
  for target in nbdkit hlstore; do
    if [ "$target" = nbdkit ]; then uri="$KIT_URI"; else uri="$HL_URI"; fi
    sync
    case "$job" in
      prefill) run_fio "$target" "$uri" prefill --rw=write --bs=1M --iodepth=8 --size="$BYTES" ;;
      randread) run_fio "$target" "$uri" randread --rw=randread --bs=4k --iodepth=32 "${timed[@]}" ;;
      randwrite)
        cpu0="$(agent_cpu)"
        run_fio "$target" "$uri" randwrite --rw=randwrite --bs=4k --iodepth=32 "${timed[@]}"
        cpu1="$(agent_cpu)"
        [ "$target" = hlstore ] && echo "$((cpu1 - cpu0))" >"$WORK/randwrite-ticks.txt"
        ;;
      seqwrite) run_fio "$target" "$uri" seqwrite --rw=write --bs=1M --iodepth=8 "${timed[@]}" ;;
      latwrite) run_fio "$target" "$uri" latwrite --rw=randwrite --bs=4k --iodepth=1 "${timed[@]}" ;;
      latwriteflush)
        run_fio "$target" "$uri" latwriteflush --rw=randwrite --bs=4k --iodepth=1 --fsync=1 "${timed[@]}" ;;
    esac
  done
done

# --- hlstore only: rebuild, incremental resync, memory -----------------------------------
hl() { "$HLSTORE_BIN" "$@" --endpoint "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nodes"][0]["grpc"])' "$CLUSTER/cluster.json")"; }
# seconds SCRIPT: wall-clock seconds a command takes.
seconds() { local t0 t1; t0="$(date +%s.%N)"; "$@"; t1="$(date +%s.%N)"; python3 -c "print($t1 - $t0)"; }
# wait_healthy [NODE BYTES]: until every replica is healthy (and NODE's holds BYTES).
# Polls every 0.25 s: each poll is a CLI call and a Python start, which took a tenth of
# the CPU from the rebuild being measured at 0.05 s (the copy is timed from the engine's
# log, not by this loop).
wait_healthy() {
  until hl volume show bench --json | python3 -c '
import json, sys
node, want = (sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 2 else (None, 0)
r = json.load(sys.stdin)["replicas"]
ok = r and all(x["state"] == "healthy" for x in r)
if node:
    ok = ok and any(x["node"] == node and x["allocated_bytes"] >= want for x in r)
sys.exit(0 if ok else 1)' "$@"; do sleep 0.25; done
}
allocated() { hl volume show bench --json | python3 -c 'import json,sys; print(max(r["allocated_bytes"] for r in json.load(sys.stdin)["replicas"]))'; }
N1_PID="$(cat "$CLUSTER/n1/node.pid")"
rss_kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
# Idle: the agent hands memory back once its store saw no change for a second (looked at
# every second); 3 s after the last job it has.
sleep 3
echo "$(rss_kib "$N1_PID" VmRSS) $(rss_kib "$N1_PID" VmHWM)" >"$WORK/rss.txt"

echo "  hlstore rebuild n3 -> n4 ..." >&2
ALLOC="$(allocated)"
rebuild_run() { hl volume replace-replica bench --from n3 --to n4 >/dev/null; wait_healthy n4 "$ALLOC"; }
seconds rebuild_run >"$WORK/rebuild-s.txt"
echo "$ALLOC" >"$WORK/rebuild-bytes.txt"
head -c "$ALLOC" "$IMG" >"$WORK/src.img"; sync
cp_part() { cp "$WORK/src.img" "$WORK/copy.img"; sync "$WORK/copy.img"; }
seconds cp_part >"$WORK/cp-s.txt"
rm -f "$WORK/copy.img" "$WORK/src.img"

echo "  hlstore incremental resync of n2 after 1 % changed ..." >&2
N2_PID="$(cat "$CLUSTER/n2/node.pid")"
# The rebuild left up to 512 MiB of dirty pages on n4; the resync is measured (like the
# copy it is compared with) on a disk that is not still writing them back.
sync
kill -STOP "$N2_PID"
CHANGED=$((BYTES / 100))
fio --name=change --ioengine=nbd --uri="$HL_URI" --rw=randwrite --bs=4k --iodepth=16 --size="$BYTES" \
  --io_size="$CHANGED" --randrepeat=0 --norandommap=0 >/dev/null
# Wait until n2 is marked failed (its writes time out), then let it come back.
until hl volume show bench --json | python3 -c '
import json, sys
r = [x for x in json.load(sys.stdin)["replicas"] if x["node"] == "n2"]
sys.exit(0 if r and r[0]["state"] not in ("healthy", "lagging") else 1)'; do sleep 0.1; done
kill -CONT "$N2_PID"
seconds wait_healthy >"$WORK/resync-s.txt"
echo "$CHANGED" >"$WORK/resync-bytes.txt"
head -c "$CHANGED" /dev/urandom >"$WORK/changed.bin"; sync
cp_changed() { cp "$WORK/changed.bin" "$WORK/changed.copy"; sync "$WORK/changed.copy"; }
seconds cp_changed >"$WORK/cp-changed-s.txt"
rm -f "$WORK/changed.bin" "$WORK/changed.copy"

echo "load after:  $(uptime)" >&2
echo "load after:  $(uptime)" >>"$WORK/load.txt"

python3 - "$WORK" <<'EOF'
import json, sys, os

work = sys.argv[1]

def job(target, name):
    with open(os.path.join(work, f"{target}-{name}.json")) as f:
        return json.load(f)["jobs"][0]

def iops(j, d):
    return j[d]["iops"]

def mibs(j, d):
    return j[d]["bw_bytes"] / (1 << 20)

def clat_us(j, d, which):
    c = j[d]["clat_ns"]
    v = c["mean"] if which == "mean" else c["percentile"]["99.000000"]
    return v / 1000.0

rows = []
def tput(label, name, d, fn, unit, target=None):
    k, h = fn(job("nbdkit", name), d), fn(job("hlstore", name), d)
    ratio = h / k if k else float("nan")
    rows.append((label, f"{k:,.0f} {unit}", f"{h:,.0f} {unit}", f"{ratio:.2f}x", target or ""))

def lat(label, name, which, target=None):
    k, h = clat_us(job("nbdkit", name), "write", which), clat_us(job("hlstore", name), "write", which)
    rows.append((label, f"{k:,.0f} µs", f"{h:,.0f} µs", f"{h - k:+,.0f} µs", target or ""))

tput("prefill 1 MiB seq write QD8 (MiB/s)", "prefill", "write", mibs, "MiB/s")
tput("4 KiB randread QD32 (IOPS)", "randread", "read", iops, "IOPS", ">= 0.5x")
tput("4 KiB randwrite QD32 (IOPS)", "randwrite", "write", iops, "IOPS", ">= 0.25x")
tput("1 MiB seq write QD8 (MiB/s)", "seqwrite", "write", mibs, "MiB/s", ">= 0.25x")
lat("4 KiB write QD1, mean clat", "latwrite", "mean", "<= +100 µs")
lat("4 KiB write QD1, p99 clat", "latwrite", "p99", "<= +250 µs")
def sync_us(target, which):
    j = job(target, "latwriteflush")
    s = j["sync"]["lat_ns"]
    flush = s["mean"] if which == "mean" else s["percentile"]["99.000000"]
    write = j["write"]["clat_ns"]["mean"] if which == "mean" else 0.0
    return (write + flush) / 1000.0

k, h = sync_us("nbdkit", "mean"), sync_us("hlstore", "mean")
rows.append(("4 KiB write + flush QD1, mean of both", f"{k:,.0f} µs", f"{h:,.0f} µs", f"{h - k:+,.0f} µs", ""))
k, h = sync_us("nbdkit", "p99"), sync_us("hlstore", "p99")
rows.append(("4 KiB write + flush QD1, flush p99", f"{k:,.0f} µs", f"{h:,.0f} µs", f"{h - k:+,.0f} µs", ""))

def num(name):
    with open(os.path.join(work, name)) as f:
        return float(f.read().split()[0])

mib = 1 << 20
import re, datetime
def copy_seconds(target):
    """Seconds from the engine's `resync started` of `target` to its `status=healthy`."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(os.path.join(work, "cluster", "n1", "node.log")).read())
    start = end = None
    for line in text.splitlines():
        if f"replica.id={target}" not in line:
            continue
        ts = line.split(" ", 1)[0]
        if "resync started" in line:
            start, end = ts, None  # the last resync of the target is the one measured
        elif "status=healthy" in line and start is not None and end is None:
            end = ts
    if not (start and end):
        return None
    p = lambda t: datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    return (p(end) - p(start)).total_seconds()

rb, rs, cs = num("rebuild-bytes.txt"), num("rebuild-s.txt"), num("cp-s.txt")
# The copy itself (replace-replica's detach and re-attach around it are not rebuild speed).
rs = copy_seconds("n4") or rs
rows.append((f"full rebuild of {rb / mib:,.0f} MiB (MiB/s; cp + sync)", f"{rb / mib / cs:,.0f} MiB/s",
             f"{rb / mib / rs:,.0f} MiB/s", f"{cs / rs:.2f}x", ">= 0.5x"))
zb, zs, zc = num("resync-bytes.txt"), num("resync-s.txt"), num("cp-changed-s.txt")
zs = copy_seconds("n2") or zs
rows.append((f"resync after 1 % ({zb / mib:,.1f} MiB) changed (s; cp + sync)", f"{zc:.2f} s", f"{zs:.2f} s",
             f"{zs / zc:.1f}x", "<= 2x"))
with open(os.path.join(work, "rss.txt")) as f:
    rss, hwm = (int(x) for x in f.read().split())
rows.append(("engine agent RSS idle / peak", "", f"{rss / 1024:,.0f} / {hwm / 1024:,.0f} MiB", "", "<= 64 / 256 MiB"))
ticks = num("randwrite-ticks.txt") / os.sysconf("SC_CLK_TCK")
writes = job("hlstore", "randwrite")["write"]["total_ios"]
rows.append(("agent CPU per 4 KiB write (3 agents)", "", f"{ticks / max(writes, 1) * 1e6:,.0f} µs", "", ""))

hdr = ("test", "nbdkit", "hlstore", "ratio", "target")
w = [max(len(r[i]) for r in rows + [hdr]) for i in range(5)]
line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"
print(line(hdr))
print("|" + "|".join("-" * (x + 2) for x in w) + "|")
for r in rows:
    print(line(r))
EOF
cat "$WORK/load.txt"
