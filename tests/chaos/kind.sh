#!/usr/bin/env bash
# Chaos test on a kind cluster (needs Docker, kind, kubectl, jq, and `sudo modprobe nbd`
# on the host; not run in CI, which can run Docker but cannot fetch kind's node image or the
# snapshot CRDs: CI smoke-tests the image in plain containers, tests/docker/smoke.sh). The
# same scenario runs without containers in tests/cluster_chaos.rs (real node processes
# killed with SIGKILL).
#
#   1. create the kind cluster (deploy/kind/cluster.yaml: 1 control plane, 3 workers)
#   2. build the hlstore image and load it into the cluster
#   3. deploy the staging overlay (plus the snapshot CRDs it needs)
#   4. a fio pod writes a 3-replica PVC with verify=crc32c while the other workers are
#      killed (docker kill) and restarted one at a time
#   5. the writer's own node is killed too; a new pod re-reads everything (verify_only)
#   6. every replica must return to healthy; any verify error is a lost write
#
# Usage: tests/chaos/kind.sh [--keep]   (--keep leaves the cluster running)
set -euo pipefail

cd "$(dirname "$0")/../.."
CLUSTER=hlstore
IMAGE=ghcr.io/hlstore/hlstore:edge
NS=hlstore-system
SNAPSHOTTER_REF=v8.2.0
KEEP=${1:-}
FAILURES=()
KILLS=0

log() { printf '\n== %s\n' "$*"; }
fail() { FAILURES+=("$*"); printf 'FAIL: %s\n' "$*"; }
k() { kubectl --context "kind-$CLUSTER" "$@"; }

cleanup() {
  if [ "$KEEP" != "--keep" ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

for tool in docker kind kubectl jq; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
[ -d /sys/module/nbd ] || { echo "kernel NBD not loaded: run 'sudo modprobe nbd' first" >&2; exit 2; }

log "1. kind cluster"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --config deploy/kind/cluster.yaml

log "2. image $IMAGE"
DOCKER_BUILDKIT=1 docker build -f deploy/Dockerfile -t "$IMAGE" .
kind load docker-image --name "$CLUSTER" "$IMAGE"

log "3. staging overlay"
k apply -k "github.com/kubernetes-csi/external-snapshotter/client/config/crd?ref=$SNAPSHOTTER_REF"
k apply -k deploy/overlays/staging
k -n "$NS" rollout status daemonset/hlstore-agent --timeout=300s
k -n "$NS" rollout status daemonset/hlstore-csi-node --timeout=300s
k -n "$NS" rollout status deployment/hlstore-csi-controller --timeout=300s

# A fio pod on the claim; $1 = pod name, $2 = extra fio options.
fio_pod() {
  k apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: default}
spec:
  restartPolicy: Never
  containers:
    - name: fio
      image: alpine:3.20
      command: ["sh", "-c", "apk add --no-cache fio >/dev/null && fio --name=chaos --filename=/data/fio.dat --size=256M --bs=4k --rw=randwrite --ioengine=psync --direct=1 --verify=crc32c --verify_fatal=1 $2"]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: chaos}}]
YAML
}

# Volume name of the claim, and its replica states as "node=state ...".
volume_of_claim() { k get pv "$(k get pvc chaos -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}'; }
replica_states() {
  # shellcheck disable=SC2016 # $NODE_IP expands in the agent container, not here.
  k -n "$NS" exec ds/hlstore-agent -- sh -c 'hlstore volume list --json --endpoint "http://$NODE_IP:7400"' |
    jq -r --arg v "$1" '.[] | select(.name == $v) | [.replicas[] | .node + "=" + .state] | join(" ")'
}
wait_healthy() {
  local volume=$1 states=""
  for _ in $(seq 1 60); do
    states=$(replica_states "$volume" || true)
    if [ -n "$states" ] && ! grep -qv '=healthy$' <(tr ' ' '\n' <<<"$states"); then
      echo "replicas healthy: $states"
      return 0
    fi
    sleep 5
  done
  fail "replicas of $volume not healthy after 5 min: $states"
}
kill_and_restart() {
  log "kill worker $1"
  docker kill "$1" >/dev/null
  KILLS=$((KILLS + 1))
  sleep 20
  docker start "$1" >/dev/null
  k wait --for=condition=Ready "node/$1" --timeout=300s
}

log "4. writer under chaos"
k apply -f - <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: chaos, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: hlstore
  resources: {requests: {storage: 1Gi}}
YAML
fio_pod chaos-writer "--do_verify=1 --verify_backlog=1024 --fsync=64"
k wait --for=jsonpath='{.status.phase}'=Running pod/chaos-writer --timeout=300s
writer_node=$(k get pod chaos-writer -o jsonpath='{.spec.nodeName}')
volume=$(volume_of_claim)
echo "writer on $writer_node, volume $volume"
for node in $(k get nodes -l '!node-role.kubernetes.io/control-plane' -o name | sed 's|node/||'); do
  [ "$node" = "$writer_node" ] && continue
  kill_and_restart "$node"
  wait_healthy "$volume"
done
k wait --for=jsonpath='{.status.phase}'=Succeeded pod/chaos-writer --timeout=900s ||
  fail "writer: $(k logs chaos-writer | tail -5)"

log "5. writer's node down, verify from a new pod"
k delete pod chaos-writer --wait=true
kill_and_restart "$writer_node"
wait_healthy "$volume"
fio_pod chaos-verify "--verify_only"
k wait --for=jsonpath='{.status.phase}'=Succeeded pod/chaos-verify --timeout=900s ||
  fail "verify: $(k logs chaos-verify | tail -5)"

log "6. summary"
echo "volume $volume: $(replica_states "$volume")"
if [ ${#FAILURES[@]} -gt 0 ]; then
  printf 'chaos: %d problem(s), possible lost writes:\n' "${#FAILURES[@]}"
  printf '  - %s\n' "${FAILURES[@]}"
  exit 1
fi
echo "chaos: $KILLS worker kills, every write verified (crc32c), replicas healthy"
