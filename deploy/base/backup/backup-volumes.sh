#!/bin/sh
# Backs up the hlstore volumes selected by StorageClass (BACKUP_STORAGE_CLASSES, comma
# separated) or PVC label selector (BACKUP_PVC_SELECTOR) that are due by their schedule
# (StorageClass parameter backupSchedule; DEFAULT_BACKUP_SCHEDULE, default daily, for
# volumes without one), then applies the retention policy. The CronJob runs hourly.
# Runs in the hlstore-backup CronJob; needs curl and jq (both in the hlstore image).
# Exits non-zero if any volume failed, after trying all of them.
set -eu
: "${HLSTORE_REPO:?HLSTORE_REPO must name the backup repository}"

DRIVER=csi.hlstore.io
# In-cluster API access (overridable for tests).
API=${KUBERNETES_API:-https://kubernetes.default.svc}
SA=${SERVICEACCOUNT_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
METRICS_DIR=${METRICS_DIR:-/tmp/hlstore-metrics}
# An empty endpoint means AWS itself.
if [ -z "${AWS_ENDPOINT_URL:-}" ]; then unset AWS_ENDPOINT_URL; fi

api() {
  curl -fsS --cacert "$SA/ca.crt" -H "Authorization: Bearer $(cat "$SA/token")" "$API$1"
}

# 1. Which volumes: claims matching the label selector, then every PV of this driver whose
#    StorageClass is listed or whose claim matched.
claims='[]'
if [ -n "${BACKUP_PVC_SELECTOR:-}" ]; then
  selector=$(printf '%s' "$BACKUP_PVC_SELECTOR" | jq -sRr @uri)
  claims=$(api "/api/v1/persistentvolumeclaims?labelSelector=$selector" |
    jq -c '[.items[] | .metadata.namespace + "/" + .metadata.name]')
fi
volumes=$(api /api/v1/persistentvolumes | jq -r \
  --arg driver "$DRIVER" --arg classes "${BACKUP_STORAGE_CLASSES:-}" --argjson claims "$claims" '
  ($classes | split(",") | map(select(length > 0))) as $cls
  | .items[]
  | select(.spec.csi.driver == $driver)
  | select((.spec.storageClassName as $c | $cls | index($c) != null)
      or ((.spec.claimRef.namespace + "/" + .spec.claimRef.name) as $k | $claims | index($k) != null))
  | .spec.csi.volumeHandle + " " + (.spec.claimRef.namespace // "-") + " " + (.spec.claimRef.name // "-")' |
  sort -u)

if [ -z "$volumes" ]; then
  echo "no hlstore volumes selected (storage classes: '${BACKUP_STORAGE_CLASSES:-}', selector: '${BACKUP_PVC_SELECTOR:-}')"
fi

# 2. One backup per volume; a failure does not stop the others.
mkdir -p "$METRICS_DIR"
failed=""
skipped=0
# Each line: volume handle, claim namespace, claim name ("-" when the PV has no claim): the
# backup carries the claim's namespace and name, so a rebuilt cluster finds the backup
# of each app's claim (the labels in hlstore backup list --json).
while read -r volume pvc_ns pvc_name; do
  [ -n "$volume" ] || continue
  echo "backing up volume $volume (claim $pvc_ns/$pvc_name) if due"
  metrics="$METRICS_DIR/$volume.prom"
  rm -f "$metrics"
  # --if-due: only when the volume's backupSchedule (or DEFAULT_BACKUP_SCHEDULE) says so
  # against its newest backup; otherwise hlstore says when it is due and exits 0.
  if hlstore backup create --repo "$HLSTORE_REPO" --volume "$volume" \
    --label "volume=$volume" --label "pvc=$pvc_ns/$pvc_name" --label "pvc-namespace=$pvc_ns" \
    --label "pvc-name=$pvc_name" --label trigger=cronjob --metrics-textfile "$metrics" \
    --if-due --default-schedule "${DEFAULT_BACKUP_SCHEDULE:-daily}" </dev/null; then
    if [ ! -f "$metrics" ]; then
      skipped=$((skipped + 1))
    elif [ -n "${PUSHGATEWAY_URL:-}" ]; then
      curl -fsS --data-binary "@$metrics" "$PUSHGATEWAY_URL/metrics/job/hlstore-backup/volume/$volume" ||
        echo "warning: could not push metrics for $volume to $PUSHGATEWAY_URL"
    fi
  else
    echo "error: backup of volume $volume failed"
    failed="$failed $volume"
  fi
done <<EOF
$volumes
EOF

# 3. Retention, when this run made backups (the job runs hourly; most runs have nothing
#    due). Data of forgotten backups is freed after the prune grace period, never while a
#    backup that may still reference it is running.
selected=$(echo "$volumes" | grep -c . || true)
if [ "$skipped" -lt "$selected" ]; then
  hlstore backup prune --repo "$HLSTORE_REPO" \
    --keep-daily "${KEEP_DAILY:-7}" --keep-weekly "${KEEP_WEEKLY:-4}" --keep-monthly "${KEEP_MONTHLY:-6}"
fi

echo "selected: $selected volume(s), not due: $skipped"
if [ -n "$failed" ]; then
  echo "failed volumes:$failed"
  exit 1
fi
