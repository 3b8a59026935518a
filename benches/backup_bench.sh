#!/usr/bin/env bash
# Whole-system backup benchmark: hlstore vs restic vs borg on the same mixed image.
#
# Usage: benches/backup_bench.sh [--size-mib N] [--workdir DIR] [--keep] [--no-volume] [--no-fs]
#   --size-mib   image size (default 1024)
#   --workdir    scratch directory (default: a fresh temp dir, removed unless --keep)
#   --no-volume  skip the volume case
#   --no-fs      skip the real-filesystem case (needs root: it loop-mounts the image)
# Env: HLSTORE_BIN (default: builds `cargo build --release --bin hlstore`); PY_NBD, a
# python with the libnbd module (default /usr/bin/python3).
#
# Measures, per tool: full backup time, backup time after changing 1 % of the image in
# scattered 64 KiB runs, restore time, repository size, repository growth after the
# change (and growth / changed bytes), peak RSS. All tools encrypt (hlstore:
# XChaCha20-Poly1305; restic: AES-256; borg: repokey-blake2) and compress
# (hlstore zstd 3, restic auto, borg zstd 3). Page cache is warm for everyone. hlstore's
# restore ends with an fsync, the others' do not: "+ sync" adds a timed `sync` after each
# tool's restore (the restore until its image is on disk). Every tool makes its full
# backup twice (into a new repository each time) and restores twice; the faster run of
# each is reported: on a VM, the first writes into page-cache memory the guest never
# touched cost 2-3x the system time, and that fell on whichever tool ran first.
#
# Real-filesystem case: a 1.5 GiB ext4 image made by mkfs.ext4 -d from /usr/share and
# Python's standard library (backup_mkimage.py mkfs); the change deletes a tree, adds the
# PostgreSQL binaries and appends to 300 files through a loop mount (fschange).
#
# After each hlstore restore, the restored backup's image is also read through
# `hlstore backup mount` (FUSE) with cmp: time and MiB/s of one cold sequential pass.
#
# Volume case: a 3-node local cluster (`hlstore dev up`) with a volume holding the same
# image; `hlstore backup create --volume` (full), the same 1 % change written to the image
# file and the volume alike, then an incremental volume backup (reads only the changed
# blocks) against `restic backup` re-reading the changed image file (restic's repository
# from the run above, so restic is incremental too), three rounds, the median of each
# tool reported; then `hlstore restore --to-volume` of the last backup into a new
# 3-replica volume, checked byte for byte against the image. Goal: volume incremental
# <= 0.1x restic's time.
set -euo pipefail

SIZE_MIB=1024
WORK=""
KEEP=0
VOLUME=1
FS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) SIZE_MIB="$2"; shift 2 ;;
    --workdir) WORK="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-volume) VOLUME=0; shift ;;
    --no-fs) FS=0; shift ;;
    -h|--help) sed -n "2,37p" "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${HLSTORE_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin hlstore >&2)
  HLSTORE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/hlstore"
fi
for t in restic borg python3 /usr/bin/time; do
  command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }
done
if [ -z "$WORK" ]; then WORK="$(mktemp -d /tmp/hlstore-bench.XXXXXX)"; fi
mkdir -p "$WORK"
cleanup() {
  if [ -n "${MOUNT_PID:-}" ]; then kill -TERM "$MOUNT_PID" 2>/dev/null || true; wait "$MOUNT_PID" 2>/dev/null || true; fi
  if [ -f "$WORK/cluster/cluster.json" ]; then "$HLSTORE_BIN" dev down --dir "$WORK/cluster" >/dev/null 2>&1 || true; fi
  if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

export HLSTORE_REPO_PASSWORD=bench-password RESTIC_PASSWORD=bench-password BORG_PASSPHRASE=bench-password
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export BORG_BASE_DIR="$WORK/borg-home" RESTIC_CACHE_DIR="$WORK/restic-cache"

IMG="$WORK/image.img"
echo "building ${SIZE_MIB} MiB mixed image..." >&2
python3 "$ROOT/benches/backup_mkimage.py" mkimage "$IMG" "$SIZE_MIB"
cp --sparse=always "$IMG" "$WORK/orig.img"
MIXED_IMG="$IMG"
FS_IMG="$WORK/fs.img"
if [ "$FS" = 1 ]; then
  echo "building the 1.5 GiB ext4 image..." >&2
  python3 "$ROOT/benches/backup_mkimage.py" mkfs "$FS_IMG" 1536 >/dev/null
  cp --sparse=always "$FS_IMG" "$WORK/fs-orig.img"
fi
CASE=mixed

# timed NAME CMD...: runs CMD, records "<seconds> <peak RSS KiB>" in $WORK/NAME.time.
timed() {
  local name="$1"; shift
  /usr/bin/time -f "%e %M" -o "$WORK/$name.time" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
    echo "$name failed:" >&2; cat "$WORK/$name.err" >&2; exit 1; }
}
secs() { cut -d' ' -f1 "$WORK/$1.time"; }
rss() { cut -d' ' -f2 "$WORK/$1.time"; }
size() { du -sb "$1" | cut -f1; }
same() { cmp -s "$1" "$IMG" && echo ok || echo MISMATCH; }

reset_image() {
  if [ "$CASE" = fs ]; then cp --sparse=always "$WORK/fs-orig.img" "$IMG"; else cp --sparse=always "$WORK/orig.img" "$IMG"; fi
}
change_image() {
  if [ "$CASE" = fs ]; then python3 "$ROOT/benches/backup_mkimage.py" fschange "$IMG"
  else python3 "$ROOT/benches/backup_mkimage.py" change "$IMG" 1 64 7; fi
}

declare -A FULL INCR REST RSYNC SZ GROW RSS CHECK
MOUNT_PID=""
MOUNT_LINE=""
# mount_read REPO ID: reads backup ID's image through `hlstore backup mount` with cmp
# (cold chunk cache, one sequential pass) and sets MOUNT_LINE.
mount_read() {
  local mnt="$WORK/mnt"
  mkdir -p "$mnt"
  "$HLSTORE_BIN" backup mount --repo "$1" "$mnt" >"$WORK/mount.out" 2>"$WORK/mount.err" &
  MOUNT_PID=$!
  for _ in $(seq 300); do [ -s "$WORK/mount.out" ] && break; sleep 0.1; done
  [ -s "$WORK/mount.out" ] || { echo "backup mount did not start:" >&2; cat "$WORK/mount.err" >&2; exit 1; }
  local t0 t1 ok=ok
  t0=$(date +%s.%N)
  cmp -s "$mnt/by-id/$2/image" "$IMG" || ok=MISMATCH
  t1=$(date +%s.%N)
  kill -TERM "$MOUNT_PID"; wait "$MOUNT_PID" || true; MOUNT_PID=""
  MOUNT_LINE=$(awk -v a="$t0" -v b="$t1" -v s="$(stat -c %s "$IMG")" -v ok="$ok" \
    'BEGIN { printf "hlstore backup mount: the image read through FUSE (cmp, cold cache) in %.2f s, %.0f MiB/s, %s", b - a, s / 1048576 / (b - a), ok }')
}
CHANGED=0

run_tool() {
  local tool="$1" repo="$WORK/repo-$1-$CASE"
  reset_image
  # Two full backups into a new repository each; the faster counts (see the restore).
  local attempt best=""
  for attempt in 1 2; do
    rm -rf "$repo"
    case "$tool" in
      hlstore)
        "$HLSTORE_BIN" backup init --repo "$repo" >/dev/null
        timed "hlstore-full$attempt" "$HLSTORE_BIN" backup create --repo "$repo" --source "$IMG" --json ;;
      restic)
        restic init -r "$repo" --repository-version 2 >/dev/null 2>&1
        timed "restic-full$attempt" restic -r "$repo" backup "$IMG" ;;
      borg)
        borg init -e repokey-blake2 "$repo" >/dev/null 2>&1
        timed "borg-full$attempt" borg create --compression zstd,3 "$repo::full" "$IMG" ;;
    esac
    if [ -z "$best" ] || awk -v a="$(secs "$tool-full$attempt")" -v b="$(secs "$tool-full$best")" 'BEGIN { exit !(a < b) }'; then
      best=$attempt
    fi
  done
  cp "$WORK/$tool-full$best.time" "$WORK/$tool-full.time"
  local s1; s1=$(size "$repo")
  CHANGED=$(change_image)
  case "$tool" in
    hlstore) timed hlstore-incr "$HLSTORE_BIN" backup create --repo "$repo" --source "$IMG" --json ;;
    restic) timed restic-incr restic -r "$repo" backup "$IMG" ;;
    borg) timed borg-incr borg create --compression zstd,3 "$repo::incr" "$IMG" ;;
  esac
  local s2; s2=$(size "$repo")
  local out="$WORK/restore-$tool"
  best=""
  # Two restores; the faster (restore + sync) counts (see the header).
  for attempt in 1 2; do
    rm -rf "$out"; mkdir -p "$out"
    sync # nothing dirty from earlier steps is flushed on the restore's account
    case "$tool" in
      hlstore)
        local id; id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/hlstore-incr.out")
        timed "hlstore-restore$attempt" "$HLSTORE_BIN" restore "$id" --repo "$repo" --to-file "$out/image.img"
        CHECK[$tool]=$(same "$out/image.img") ;;
      restic)
        timed "restic-restore$attempt" restic -r "$repo" restore latest --target "$out"
        CHECK[$tool]=$(same "$out$IMG") ;;
      borg)
        (cd "$out" && timed "borg-restore$attempt" borg extract --sparse "$repo::incr")
        CHECK[$tool]=$(same "$out$IMG") ;;
    esac
    # hlstore's restore ends with the image on disk (fsync); the others leave it in the
    # page cache: "+ sync" is each restore until its image is durable.
    timed "$tool-sync$attempt" sync
    [ "${CHECK[$tool]}" = ok ] || { best=$attempt; break; }
    if [ -z "$best" ] || awk -v a="$(secs "$tool-restore$attempt")" -v b="$(secs "$tool-sync$attempt")" \
      -v c="$(secs "$tool-restore$best")" -v d="$(secs "$tool-sync$best")" 'BEGIN { exit !(a + b < c + d) }'; then
      best=$attempt
    fi
  done
  cp "$WORK/$tool-restore$best.time" "$WORK/$tool-restore.time"
  cp "$WORK/$tool-sync$best.time" "$WORK/$tool-sync.time"
  [ "$tool" = hlstore ] && mount_read "$repo" "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/hlstore-incr.out")"
  rm -rf "$out"
  FULL[$tool]=$(secs "$tool-full"); INCR[$tool]=$(secs "$tool-incr"); REST[$tool]=$(secs "$tool-restore")
  RSYNC[$tool]=$(awk -v a="$(secs "$tool-restore")" -v b="$(secs "$tool-sync")" 'BEGIN { printf "%.2f", a + b }')
  SZ[$tool]=$s1; GROW[$tool]=$((s2 - s1))
  local m1 m2 m3; m1=$(rss "$tool-full"); m2=$(rss "$tool-incr"); m3=$(rss "$tool-restore")
  RSS[$tool]=$(printf '%s\n' "$m1" "$m2" "$m3" | sort -n | tail -1)
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
CORES=$(nproc)
table() {
  printf '| %-8s | %11s | %11s | %10s | %10s | %13s | %13s | %13s | %13s | %13s | %7s |\n' tool "full backup s" "2nd backup s" "restore s" "+ sync s" "MiB/s/core" "repo MiB" "growth MiB" "growth/change" "peak RSS MiB" restore
  printf '|%s|\n' "----------|-------------|-------------|------------|------------|---------------|---------------|---------------|---------------|---------------|---------"
  for tool in hlstore restic borg; do
    printf '| %-8s | %11s | %11s | %10s | %10s | %13s | %13s | %13s | %13s | %13s | %7s |\n' "$tool" "${FULL[$tool]}" "${INCR[$tool]}" "${REST[$tool]}" "${RSYNC[$tool]}" \
      "$(awk -v s="${FULL[$tool]}" -v b="$ALLOC" -v c="$CORES" 'BEGIN { printf "%.1f", b / 1048576 / s / c }')" \
      "$(mib "${SZ[$tool]}")" "$(mib "${GROW[$tool]}")" \
      "$(awk -v g="${GROW[$tool]}" -v c="$CHANGED" 'BEGIN { printf "%.2fx", g / c }')" \
      "$(awk -v k="${RSS[$tool]}" 'BEGIN { printf "%.0f", k / 1024 }')" "${CHECK[$tool]}"
  done
  awk -v hf="${FULL[hlstore]}" -v rf="${FULL[restic]}" -v hr="${REST[hlstore]}" -v rr="${REST[restic]}" \
    -v hs="${RSYNC[hlstore]}" -v rs="${RSYNC[restic]}" -v hz="${SZ[hlstore]}" -v rz="${SZ[restic]}" \
    'BEGIN { printf "\nrestic / hlstore: full backup %.2fx, restore %.2fx (%.2fx until on disk); repository %.3f of restic'"'"'s (goals: >= 2x, <= 1)\n", rf / hf, rr / hr, rs / hs, hz / rz }'
}

for tool in hlstore restic borg; do
  echo "running $tool (mixed image)..." >&2
  run_tool "$tool"
done
ALLOC=$(du -B1 "$WORK/orig.img" | cut -f1)
echo
echo "image: ${SIZE_MIB} MiB mixed (random, zeros, text, system libraries), $(mib "$ALLOC") MiB allocated; change: $(mib "$CHANGED") MiB in scattered 64 KiB runs; MiB/s/core = allocated MiB / full backup s / $CORES cores"
table
echo
echo "$MOUNT_LINE"

if [ "$FS" = 1 ]; then
  CASE=fs
  IMG="$FS_IMG"
  for tool in hlstore restic borg; do
    echo "running $tool (ext4 image)..." >&2
    run_tool "$tool"
  done
  ALLOC=$(du -B1 "$WORK/fs-orig.img" | cut -f1)
  echo
  echo "ext4 image: 1.5 GiB, $(mib "$ALLOC") MiB allocated (/usr/share + Python's standard library); change: a tree deleted, PostgreSQL's binaries added, 300 files appended ($(mib "$CHANGED") MiB written)"
  table
  echo
  echo "$MOUNT_LINE"
  rm -rf "$WORK"/repo-*-fs "$WORK/fs-orig.img" "$FS_IMG"
  CASE=mixed
  IMG="$MIXED_IMG"
fi

[ "$VOLUME" = 1 ] || exit 0
# Debian's python3-libnbd lives in the system interpreter.
PY_NBD="${PY_NBD:-/usr/bin/python3}"
command -v nbdcopy >/dev/null || { echo "missing nbdcopy" >&2; exit 1; }
"$PY_NBD" -c 'import nbd' 2>/dev/null || { echo "missing python3-libnbd for $PY_NBD" >&2; exit 1; }
echo "running the volume case..." >&2
reset_image
export HLSTORE_TLS_DIR="$WORK/cluster/tls/admin"  # the admin certificate `dev up` makes
URI=$("$HLSTORE_BIN" dev up --dir "$WORK/cluster" --nodes 3 --volume bvol --size "${SIZE_MIB}MiB" --replicas 3)
EP=$("$HLSTORE_BIN" dev status --dir "$WORK/cluster" --json \
  | python3 -c 'import json,sys; print([n for n in json.load(sys.stdin)["nodes"] if n["id"] == "n1"][0]["endpoint"])')
nbdcopy "$IMG" "$URI"
VREPO="$WORK/repo-volume"
"$HLSTORE_BIN" backup init --repo "$VREPO" >/dev/null
timed hlstore-vol-full "$HLSTORE_BIN" backup create --repo "$VREPO" --volume bvol --endpoint "$EP" --json
# Three rounds of a 1 % change, each backed up by both tools; the median round of each
# counts (one incremental takes a few hundred ms, and one slow fsync on this kind of disk
# moves it by a third).
HL_INCR=() RESTIC_INCR=()
for round in 1 2 3; do
  VCHANGED=$("$PY_NBD" "$ROOT/benches/backup_mkimage.py" change "$IMG" 1 64 $((6 + round)) "$URI")
  timed "hlstore-vol-incr$round" "$HLSTORE_BIN" backup create --repo "$VREPO" --volume bvol --endpoint "$EP" --json
  timed "restic-vol-incr$round" restic -r "$WORK/repo-restic-mixed" backup "$IMG"
  HL_INCR+=("$(secs "hlstore-vol-incr$round")") RESTIC_INCR+=("$(secs "restic-vol-incr$round")")
done
median() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
printf '%s %s\n' "$(median "${HL_INCR[@]}")" 0 >"$WORK/hlstore-vol-incr.time"
printf '%s %s\n' "$(median "${RESTIC_INCR[@]}")" 0 >"$WORK/restic-vol-incr.time"
cp "$WORK/hlstore-vol-incr3.out" "$WORK/hlstore-vol-incr.out"
field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(v[sys.argv[2]])' "$WORK/$1.out" "$2"; }
VID=$(field hlstore-vol-incr id)
VREAD=$(field hlstore-vol-incr bytes_read)
VINC=$(field hlstore-vol-incr incremental)
timed hlstore-vol-restore "$HLSTORE_BIN" restore "$VID" --repo "$VREPO" --to-volume bvol2 --replicas 3 --endpoint "$EP"
URI2=$("$HLSTORE_BIN" volume attach bvol2 --node n2 --endpoint "$EP")
nbdcopy "$URI2" "$WORK/volume-restored.img"
VCHECK=$(same "$WORK/volume-restored.img")
rm -f "$WORK/volume-restored.img"

echo
echo "volume case: ${SIZE_MIB} MiB volume (3 replicas) holding the same image; change: $(mib "$VCHANGED") MiB; incremental: $VINC"
printf '| %-40s | %14s |\n' measure value
printf '|%s|\n' "------------------------------------------|----------------"
printf '| %-40s | %14s |\n' "hlstore volume full backup s" "$(secs hlstore-vol-full)" \
  "hlstore volume 1% backup s, median" "$(secs hlstore-vol-incr)" \
  "restic 1% backup of the image s, median" "$(secs restic-vol-incr)" \
  "rounds, hlstore s" "${HL_INCR[*]}" \
  "rounds, restic s" "${RESTIC_INCR[*]}" \
  "ratio hlstore / restic (goal <=0.1)" "$(awk -v a="$(secs hlstore-vol-incr)" -v b="$(secs restic-vol-incr)" 'BEGIN { printf "%.2fx", a / b }')" \
  "hlstore bytes read MiB" "$(mib "$VREAD")" \
  "bytes read / bytes changed" "$(awk -v r="$VREAD" -v c="$VCHANGED" 'BEGIN { printf "%.2fx", r / c }')" \
  "restore --to-volume s" "$(secs hlstore-vol-restore)" \
  "restored volume = image" "$VCHECK"
