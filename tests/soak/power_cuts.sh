#!/bin/sh
# Seeded power-cut soak: N schedules of a 3-node dev cluster on faultfs disks (random
# replica node, random cut mode drop/torn, cut during writes, resync or snapshot create),
# each checked for lost acknowledged writes and divergent replicas. Prints one table row
# per schedule: seed, what was cut, acknowledged writes, lost, divergent replicas, verdict.
#
# Usage: tests/soak/power_cuts.sh [N] [FIRST_SEED]      (default: 10 schedules from seed 1)
# Needs root (FUSE mounts), /dev/fuse, python3-libnbd.
set -eu
n=${1:-10}
first=${2:-1}
cd "$(dirname "$0")/../.."
HLSTORE_SOAK_SEEDS="$first..$((first + n))" \
    cargo test --test power_loss -- --ignored soak_power_cuts --nocapture --test-threads 1 2>&1 |
    tee "${TMPDIR:-/tmp}/hlstore-power-soak.log" |
    awk '/^seed +cut/ {table = 1} table && !/^test |^$/ {print} /^test result/ {print}'
