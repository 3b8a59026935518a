#!/usr/bin/env bash
# Scans the logs of a full test run for secrets: every agent log and CLI stderr the test
# support collected under $1 (HLSTORE_TEST_LOG_DIR) plus the cargo test output $2. The
# secrets are the ones the tests use (tests/scripts/test_secrets.txt: repository
# passwords, S3 keys) and any PEM private key. Exits 1 naming file and secret on a hit,
# and also when there are no logs (a scan of nothing proves nothing).
set -euo pipefail
dir="$1"
shift
list="$(dirname "$0")/test_secrets.txt"
files=$(find "$dir" -type f -name '*.log' | wc -l)
if [ "$files" -lt 10 ]; then
    echo "scan_secrets: only $files log files under $dir; the test support did not collect the run's logs" >&2
    exit 1
fi
bytes=$(cat "$dir"/*.log "$@" | wc -c)
found=0
while IFS= read -r secret; do
    case "$secret" in '' | '#'*) continue ;; esac
    if hits=$(grep -rlF -- "$secret" "$dir" "$@"); then
        echo "scan_secrets: secret \"${secret:0:3}...\" appears in: $hits" >&2
        found=1
    fi
done <"$list"
if hits=$(grep -rlE -- '-----BEGIN ([A-Z]+ )?PRIVATE KEY-----' "$dir" "$@"); then
    echo "scan_secrets: a PEM private key appears in: $hits" >&2
    found=1
fi
if [ "$found" = 0 ]; then
    echo "scan_secrets: no secret in $files log files ($bytes bytes)"
fi
exit "$found"
