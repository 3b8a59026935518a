#!/usr/bin/env bash
# Smoke test of the hlstore image: builds it from deploy/Dockerfile, runs three node agents
# and the CSI controller in containers on a Docker network (mutual TLS with certificates
# from `hlstore cert`), and drives them like a container orchestrator would:
#
#   CSI CreateVolume (3 replicas) → ControllerPublishVolume on a1 → write 64 MiB through the
#   NBD export inside a1's network namespace → read it back → CreateSnapshot → overwrite
#   the first MiB → `hlstore backup create --volume` (backup role) into a directory
#   repository → `hlstore restore --to-volume` (admin role) → publish the restored volume
#   on a3 and the snapshot's clone (CreateVolume from the snapshot) on a2 → compare both
#   with what was written → unpublish, delete, and check the agents logged no panic.
#
# The image is the Dockerfile's `prebuilt` target: the run stage plus a binary compiled
# outside Docker (default: the debug build CI's `cargo test` just made), so CI does not
# compile hlstore twice. The default target compiles inside Docker (see deploy/Dockerfile).
# The base image is a build argument: without a registry it is made with debootstrap and
# `docker import` (kept as $HLSTORE_SMOKE_BASE_IMAGE for the next run).
#
# NBD listens on each agent's loopback only (as in a cluster); the test reaches it from the
# host with nsenter into the agent container's network namespace, with nbdcopy (libnbd-bin).
#
# Environment:
#   HLSTORE_BIN                  binary to put in the image (default: $CARGO_TARGET_DIR or
#                                target, /debug/hlstore)
#   HLSTORE_SMOKE_BASE_IMAGE     base image (default hlstore-ci/debian:bookworm; made with
#                                debootstrap when missing)
#   HLSTORE_SMOKE_KEEP=1         leave containers, network and files for debugging
#
# Needs root (nsenter, dockerd), docker (docker.io), debootstrap, libnbd-bin (nbdcopy),
# util-linux (nsenter), python3-grpcio, python3-protobuf, protobuf-compiler and
# libprotobuf-dev (tests/docker/csi_call.py); scripts/setup.sh installs them. Exits 0 with
# "SKIPPED" when no Docker daemon can run here; 1 on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
unset RUST_BACKTRACE

BASE_IMAGE=${HLSTORE_SMOKE_BASE_IMAGE:-hlstore-ci/debian:bookworm}
BIN=${HLSTORE_BIN:-${CARGO_TARGET_DIR:-target}/debug/hlstore}
TAG="hlstore-smoke:$$"
P="hlsmoke$$"          # container/network name prefix
NET="$P-net"
WORK=$(mktemp -d /tmp/hlstore-smoke.XXXXXX)
PASSWORD="smoke-test-password-$$"
SIZE=$((64 << 20))
started_dockerd=""
t0=$(date +%s)

log() { echo "smoke: [$(($(date +%s) - t0))s] $*"; }
fail() {
  echo "smoke: FAIL: $*" >&2
  exit 1
}

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    for c in $(docker ps -a --filter "name=^$P-" --format '{{.Names}}' 2>/dev/null); do
      echo "---- docker logs $c (last 30 lines)" >&2
      docker logs --tail 30 "$c" 2>&1 | sed 's/^/    /' >&2 || true
    done
  fi
  if [ "${HLSTORE_SMOKE_KEEP:-}" = 1 ]; then
    echo "smoke: kept containers $P-*, network $NET, image $TAG, files $WORK" >&2
  else
    docker ps -aq --filter "name=^$P-" 2>/dev/null | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker network rm "$NET" >/dev/null 2>&1 || true
    docker image rm "$TAG" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.5; done
  fi
  if [ "$rc" = 0 ]; then echo "smoke: PASS ($(($(date +%s) - t0))s)"; else echo "smoke: FAIL (exit $rc)" >&2; fi
}
trap cleanup EXIT

# --- Docker: use a running daemon, or start one for this run ---
if ! command -v docker >/dev/null 2>&1; then
  echo "smoke: SKIPPED: no docker client (apt-get install docker.io)"
  exit 0
fi
if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null 2>&1; then
    log "starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 1 60); do
      docker info >/dev/null 2>&1 && break
      kill -0 "$started_dockerd" 2>/dev/null || break
      sleep 0.5
    done
  fi
  if ! docker info >/dev/null 2>&1; then
    echo "smoke: SKIPPED: Docker cannot run here (no daemon answers and none could be started)"
    [ -f "$WORK/dockerd.log" ] && tail -5 "$WORK/dockerd.log" | sed 's/^/    /'
    started_dockerd=""
    exit 0
  fi
fi

for tool in nsenter nbdcopy protoc /usr/bin/python3; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing (scripts/setup.sh installs it)"
done
/usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null || fail "python3-grpcio / python3-protobuf missing"
[ -x "$BIN" ] || fail "no hlstore binary at $BIN (cargo build, or set HLSTORE_BIN)"
csi() { /usr/bin/python3 tests/docker/csi_call.py "$WORK/csi/csi.sock" "$@"; }

# --- base image and the hlstore image ---
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || fail "debootstrap is missing (scripts/setup.sh installs it)"
  log "making base image $BASE_IMAGE with debootstrap (bookworm, minbase)"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
  tar -C "$WORK/rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
fi
arch=$(dpkg --print-architecture)
mkdir -p "$WORK/context"
# Debug info stripped: the image needs the code only.
objcopy --strip-debug "$BIN" "$WORK/context/hlstore-$arch"
log "building image $TAG (deploy/Dockerfile, target prebuilt, base $BASE_IMAGE)"
# The Dockerfile needs BuildKit: buildx where it is installed, else the BuildKit built into
# Docker 20.10+ (Debian's docker.io; newer clients without buildx refuse DOCKER_BUILDKIT=1).
built=""
for client in "docker buildx build --load" "docker build" "/usr/bin/docker build"; do
  read -r -a cmd <<<"$client"
  if [ "${cmd[1]}" = buildx ] && ! docker buildx version >/dev/null 2>&1; then continue; fi
  [ -x "$(command -v "${cmd[0]}")" ] || continue
  if DOCKER_BUILDKIT=1 "${cmd[@]}" -f deploy/Dockerfile --target prebuilt \
    --build-arg "BUILD_IMAGE=$BASE_IMAGE" --build-arg "RUNTIME_IMAGE=$BASE_IMAGE" \
    -t "$TAG" "$WORK/context" >"$WORK/build.log" 2>&1; then
    built=1
    break
  fi
  grep -q 'buildx component is missing' "$WORK/build.log" || break
done
if [ -z "$built" ]; then
  cat "$WORK/build.log" >&2
  fail "docker build failed"
fi
docker run --rm "$TAG" --version | grep -q '^hlstore ' || fail "the image's hlstore does not run"

# --- certificates (made with the image) ---
run_image() { docker run --rm -v "$WORK/tls:/tls" "$TAG" "$@" >/dev/null; }
mkdir -p "$WORK/tls" "$WORK/repo" "$WORK/csi" "$WORK/data"
run_image cert init --dir /tls/ca
for n in a1 a2 a3; do run_image cert issue --ca-dir /tls/ca --role node --node "$n" --out "/tls/$n"; done
run_image cert issue --ca-dir /tls/ca --role admin --out /tls/admin
run_image cert issue --ca-dir /tls/ca --role backup --out /tls/backup
log "certificates issued: CA, nodes a1-a3, admin, backup"

# --- three agents and the CSI controller ---
docker network create "$NET" >/dev/null
peers="a1=a1:7400,a2=a2:7400,a3=a3:7400"
for n in a1 a2 a3; do
  docker run -d --name "$P-$n" --hostname "$n" --network "$NET" --network-alias "$n" \
    -v "$WORK/tls/$n:/tls:ro" "$TAG" \
    node --id "$n" --data-dir /var/lib/hlstore --listen 0.0.0.0:7400 --metrics-listen 0.0.0.0:9400 \
    --nbd-listen 127.0.0.1:10809 --peers "$peers" --tls-dir /tls >/dev/null
done
docker run -d --name "$P-csi" --hostname csi-controller --network "$NET" \
  -v "$WORK/tls/admin:/tls:ro" -v "$WORK/csi:/csi" "$TAG" \
  csi --mode controller --csi-endpoint unix:///csi/csi.sock --node-id a1 --agent a1:7400 \
  --tls-dir /tls --metrics-listen 0.0.0.0:9410 >/dev/null

ip_of() { docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$P-$1"; }
pid_of() { docker inspect -f '{{.State.Pid}}' "$P-$1"; }
for n in a1 a2 a3; do
  ip=$(ip_of "$n")
  ok=""
  for _ in $(seq 1 60); do
    if curl -fsS "http://$ip:9400/healthz" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
  done
  [ -n "$ok" ] || fail "agent $n (http://$ip:9400/healthz) did not become healthy"
done
for _ in $(seq 1 60); do
  [ -S "$WORK/csi/csi.sock" ] && csi Identity Probe >/dev/null 2>&1 && break
  sleep 0.5
done
csi Identity GetPluginInfo >"$WORK/info.json" || fail "CSI Identity.GetPluginInfo"
grep -q '"csi.hlstore.io"' "$WORK/info.json" || fail "unexpected plugin info: $(cat "$WORK/info.json")"
log "agents a1-a3 healthy, CSI controller answers ($(cat "$WORK/info.json"))"

# Peer connections are mutual TLS: a client without a certificate of the CA is refused.
if docker run --rm --network "$NET" "$TAG" --insecure volume list --endpoint a1:7400 >"$WORK/plain.out" 2>&1; then
  fail "an agent answered a plaintext client"
fi
cat >"$WORK/tls/other.sh" <<'EOF'
set -e
hlstore cert init --dir /tmp/ca >/dev/null
hlstore cert issue --ca-dir /tmp/ca --role admin --out /tmp/admin >/dev/null
hlstore --tls-dir /tmp/admin volume list --endpoint a1:7400
EOF
if docker run --rm --network "$NET" -v "$WORK/tls/other.sh:/other.sh:ro" --entrypoint sh "$TAG" /other.sh >"$WORK/other.out" 2>&1; then
  fail "an agent answered a client whose certificate is of another CA"
fi
grep -qi 'certificate' "$WORK/other.out" || fail "another CA's client failed, but not on its certificate: $(cat "$WORK/other.out")"
log "agents refuse plaintext clients and certificates of another CA ($(tail -1 "$WORK/other.out" | cut -c1-160))"

# --- volume: create, publish on a1, write and read through NBD ---
BLOCK='{"block":{},"accessMode":{"mode":"SINGLE_NODE_WRITER"}}'
csi Controller CreateVolume "{\"name\":\"pvc-smoke-1\",\"capacityRange\":{\"requiredBytes\":\"$SIZE\"},\"volumeCapabilities\":[$BLOCK],\"parameters\":{\"replicas\":\"3\"}}" >"$WORK/create.json" ||
  fail "CreateVolume"
vol=$(jq -r .volume.volumeId "$WORK/create.json")
[ "$(jq -r .volume.capacityBytes "$WORK/create.json")" = "$SIZE" ] || fail "CreateVolume: $(cat "$WORK/create.json")"

publish() { # volume node → prints the NBD URI
  csi Controller ControllerPublishVolume "{\"volumeId\":\"$1\",\"nodeId\":\"$2\",\"volumeCapability\":$BLOCK}" >"$WORK/publish.json" ||
    fail "ControllerPublishVolume $1 on $2"
  jq -r '.publishContext.nbdUri // empty' "$WORK/publish.json"
}
unpublish() {
  csi Controller ControllerUnpublishVolume "{\"volumeId\":\"$1\",\"nodeId\":\"$2\"}" >/dev/null || fail "ControllerUnpublishVolume $1 on $2"
}
in_netns() { # node command... : runs a host command in the agent container's network namespace
  local n=$1
  shift
  nsenter --net="/proc/$(pid_of "$n")/ns/net" "$@"
}

uri=$(publish "$vol" a1)
case "$uri" in nbd://127.0.0.1:*) ;; *) fail "publish context of $vol has no loopback NBD URI: $(cat "$WORK/publish.json")" ;; esac
log "volume $vol (64 MiB, 3 replicas) published on a1: $uri"

# 16 MiB of random data, 44 MiB of zeros, 4 MiB of random data at the end.
head -c $((16 << 20)) /dev/urandom >"$WORK/v1.img"
head -c $((44 << 20)) /dev/zero >>"$WORK/v1.img"
head -c $((4 << 20)) /dev/urandom >>"$WORK/v1.img"
in_netns a1 nbdcopy --flush "$WORK/v1.img" "$uri" || fail "writing through NBD on a1"
in_netns a1 nbdcopy "$uri" "$WORK/read1.img" || fail "reading through NBD on a1"
cmp "$WORK/v1.img" "$WORK/read1.img" || fail "data read back through NBD differs from what was written"
log "wrote and read back 64 MiB through a1's NBD export"

# --- snapshot, then change the volume ---
csi Controller CreateSnapshot "{\"sourceVolumeId\":\"$vol\",\"name\":\"snapshot-smoke-1\"}" >"$WORK/snap.json" || fail "CreateSnapshot"
snap=$(jq -r .snapshot.snapshotId "$WORK/snap.json")
[ "$(jq -r .snapshot.readyToUse "$WORK/snap.json")" = true ] || fail "snapshot not ready: $(cat "$WORK/snap.json")"
cp "$WORK/v1.img" "$WORK/v2.img"
head -c $((1 << 20)) /dev/urandom >"$WORK/mib.img"
dd if="$WORK/mib.img" of="$WORK/v2.img" conv=notrunc status=none
in_netns a1 nbdcopy --flush "$WORK/v2.img" "$uri" || fail "overwriting through NBD on a1"
log "snapshot $snap ready; first MiB of the volume overwritten after it"

# --- backup (backup role) to a directory repository, restore (admin role) ---
hl() { # role command... : the CLI in a container on the network, with that role's certificate
  local role=$1
  shift
  docker run --rm --network "$NET" -v "$WORK/tls/$role:/tls:ro" -v "$WORK/repo:/repo" \
    -e HLSTORE_TLS_DIR=/tls -e HLSTORE_REPO=/repo -e HLSTORE_REPO_PASSWORD="$PASSWORD" "$TAG" "$@"
}
hl backup backup init --json >/dev/null || fail "backup init"
hl backup backup create --volume "$vol" --endpoint a2:7400 --label smoke=1 --json >"$WORK/backup.json" ||
  fail "backup create --volume $vol"
bid=$(jq -r .id "$WORK/backup.json")
if [ -z "$bid" ] || [ "$bid" = null ]; then fail "backup create printed no id: $(cat "$WORK/backup.json")"; fi
hl backup backup verify --read-data >/dev/null || fail "backup verify --read-data"
log "backup $bid of $vol in the directory repository, verified"
if hl backup volume delete "$vol" --endpoint a1:7400 >"$WORK/delete.out" 2>&1; then
  fail "the backup role deleted a volume"
fi
grep -q 'permission denied' "$WORK/delete.out" || fail "backup role's delete failed for another reason: $(cat "$WORK/delete.out")"
hl admin restore "$bid" --to-volume restored-smoke-1 --replicas 3 --endpoint a2:7400 --json >"$WORK/restore.json" ||
  fail "restore $bid --to-volume"
log "restored $bid into volume restored-smoke-1"

# --- compare: the restored volume (on a3) = v2, the snapshot's clone (on a2) = v1 ---
uri3=$(publish restored-smoke-1 a3)
in_netns a3 nbdcopy "$uri3" "$WORK/restored.img" || fail "reading the restored volume on a3"
cmp "$WORK/v2.img" "$WORK/restored.img" || fail "the restored volume differs from the volume at backup time"
log "restored volume read on a3 equals the volume at backup time"

# The copy runs in the background: CreateVolume answers ABORTED until it is done, and the
# external-provisioner calls again; so does this loop (at most 120 s).
clone_req="{\"name\":\"pvc-smoke-clone\",\"capacityRange\":{\"requiredBytes\":\"$SIZE\"},\"volumeCapabilities\":[$BLOCK],\"volumeContentSource\":{\"snapshot\":{\"snapshotId\":\"$snap\"}}}"
for i in $(seq 1 120); do
  if csi Controller CreateVolume "$clone_req" >"$WORK/clone.json" 2>"$WORK/clone.err"; then break; fi
  grep -q '^ABORTED' "$WORK/clone.err" || fail "CreateVolume from snapshot $snap: $(cat "$WORK/clone.err")"
  [ "$i" -lt 120 ] || fail "CreateVolume from snapshot $snap still in progress after 120 s"
  sleep 1
done
clone=$(jq -r .volume.volumeId "$WORK/clone.json")
uri2=$(publish "$clone" a2)
in_netns a2 nbdcopy "$uri2" "$WORK/clone.img" || fail "reading the snapshot's clone on a2"
cmp "$WORK/v1.img" "$WORK/clone.img" || fail "the volume cloned from the snapshot differs from the data at snapshot time"
log "clone of snapshot $snap read on a2 equals the volume at snapshot time"

# --- clean up through CSI; the agents stay up and log no panic ---
unpublish "$vol" a1
unpublish restored-smoke-1 a3
unpublish "$clone" a2
csi Controller DeleteSnapshot "{\"snapshotId\":\"$snap\"}" >/dev/null || fail "DeleteSnapshot"
for v in "$clone" "$vol" restored-smoke-1; do
  csi Controller DeleteVolume "{\"volumeId\":\"$v\"}" >/dev/null || fail "DeleteVolume $v"
done
left=$(hl admin volume list --endpoint a3:7400 --json | jq 'length')
[ "$left" = 0 ] || fail "$left volumes left after DeleteVolume"
curl -fsS "http://$(ip_of a1):9400/metrics" | grep -q '^hlstore_' || fail "a1's /metrics has no hlstore metric"
for c in a1 a2 a3 csi; do
  [ "$(docker inspect -f '{{.State.Running}}' "$P-$c")" = true ] || fail "container $c stopped"
  if docker logs "$P-$c" 2>&1 | grep -q 'panicked at'; then fail "container $c logged a panic"; fi
done
log "unpublished and deleted everything; agents and the CSI controller still running, no panic logged"
