#!/usr/bin/env bash
# Builds the `hlstore` binary for a Rust target, natively or cross-compiled, on Debian 12
# (the image's builder stage and the CI cross-build check both use it).
#
#   scripts/build-hlstore.sh [--target TRIPLE] [--profile PROFILE] [--out FILE] [--install-deps]
#
#   --target        Rust target triple (default: the host's): x86_64-unknown-linux-gnu or
#                   aarch64-unknown-linux-gnu
#   --profile       cargo profile (default: release)
#   --out           copy the binary there
#   --install-deps  first install what the target needs (idempotent; root): Debian's cross
#                   gcc/g++, the target's RocksDB (below) and the Rust standard library for
#                   it (rustup target add)
#
# RocksDB is Debian's librocksdb-dev (see ARCHITECTURE.md, "Build choices"): .cargo/config.toml
# sets ROCKSDB_LIB_DIR, which makes librocksdb-sys link the system library instead of
# compiling its C++ copy. Natively the linker finds it in /usr/lib/<triplet>. For another
# architecture the script takes the same Debian packages through dpkg multiarch
# (`dpkg --add-architecture arm64`, then librocksdb-dev:arm64 and the libraries it links)
# but unpacks them into a private sysroot, ${CARGO_TARGET_DIR:-target}/cross-sysroot/<arch>,
# instead of installing them: librocksdb-dev is not co-installable across architectures,
# and installing the arm64 one would remove the machine's own. The link then searches the
# sysroot (ROCKSDB_LIB_DIR, -rpath-link). The script checks the result: the binary must be
# for the target, must load librocksdb.so dynamically, and (cross-built, where qemu-user is
# installed; --install-deps installs it) must print its version under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."

host=$(rustc -vV | sed -n 's/^host: //p')
target=$host
profile=release
out=""
install_deps=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --install-deps) install_deps=1; shift ;;
    *) echo "build-hlstore: unknown argument $1" >&2; exit 2 ;;
  esac
done

case "$target" in
  x86_64-unknown-linux-gnu) debarch=amd64; triplet=x86_64-linux-gnu; machine="X86-64" ;;
  aarch64-unknown-linux-gnu) debarch=arm64; triplet=aarch64-linux-gnu; machine="AArch64" ;;
  *) echo "build-hlstore: unsupported target $target" >&2; exit 2 ;;
esac
host_debarch=$(dpkg --print-architecture)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "build-hlstore: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

sysroot=""
if [ "$debarch" != "$host_debarch" ]; then
  sysroot=$(mkdir -p "${CARGO_TARGET_DIR:-target}" && cd "${CARGO_TARGET_DIR:-target}" && pwd)/cross-sysroot/$debarch
fi

if [ -n "$install_deps" ]; then
  if [ -z "$sysroot" ]; then
    apt_install librocksdb-dev libclang-dev pkg-config gcc g++ binutils
  else
    apt_install libclang-dev pkg-config binutils gcc-"$triplet" g++-"$triplet" qemu-user
    if [ ! -e "$sysroot/.complete" ]; then
      if ! dpkg --print-foreign-architectures | grep -qx "$debarch"; then
        echo "build-hlstore: dpkg --add-architecture $debarch"
        $SUDO dpkg --add-architecture "$debarch"
      fi
      $SUDO apt-get update -qq
      # Download (only) librocksdb-dev:ARCH and every ARCH package it needs that is not
      # installed, then unpack them into the sysroot. Nothing is installed or removed.
      debs=$(mktemp -d)
      mkdir -p "$debs/partial"
      $SUDO chmod -R 777 "$debs"
      echo "build-hlstore: fetching librocksdb-dev:$debarch and its libraries into $sysroot"
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --download-only --no-install-recommends \
        -o Dir::Cache::archives="$debs" "librocksdb-dev:$debarch" >/dev/null
      rm -rf "$sysroot"
      mkdir -p "$sysroot"
      n=0
      for deb in "$debs"/*_"$debarch".deb; do
        [ -e "$deb" ] || continue
        dpkg-deb -x "$deb" "$sysroot"
        n=$((n + 1))
      done
      rm -rf "$debs"
      [ -e "$sysroot/usr/lib/$triplet/librocksdb.so" ] || { echo "build-hlstore: no librocksdb.so in $sysroot" >&2; exit 1; }
      # The -L directory holds RocksDB only: the sysroot's libc.so is a linker script
      # naming absolute paths; libc comes from the cross toolchain.
      mkdir -p "$sysroot/rocksdb"
      ln -sf "../usr/lib/$triplet/librocksdb.so" "$sysroot/rocksdb/librocksdb.so"
      echo "build-hlstore: $n packages unpacked into $sysroot"
      touch "$sysroot/.complete"
    fi
  fi
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$target"; then
    echo "build-hlstore: rustup target add $target"
    rustup target add "$target"
  fi
fi

# cc-rs (zstd, blake3, ring, aws-lc) and the final link use the target's gcc; Debian's
# native gcc package installs the triplet-prefixed names too, so this holds natively.
tvar=${target//-/_}
TVAR=$(echo "$tvar" | tr '[:lower:]' '[:upper:]')
export "CC_$tvar=${triplet}-gcc" "CXX_$tvar=${triplet}-g++" "AR_$tvar=${triplet}-ar"
export "CARGO_TARGET_${TVAR}_LINKER=${triplet}-gcc"
if [ -n "$sysroot" ]; then
  [ -e "$sysroot/rocksdb/librocksdb.so" ] ||
    { echo "build-hlstore: no $debarch RocksDB in $sysroot: run with --install-deps" >&2; exit 1; }
  # librocksdb.so from the sysroot, and the libraries it needs (snappy, lz4, zstd, ...)
  # found there at link time. Target flags only: build scripts and proc macros (host) are
  # built exactly as for a native build, so they are shared with it.
  export ROCKSDB_LIB_DIR="$sysroot/rocksdb"
  rustflags="-C link-arg=-Wl,-rpath-link,$sysroot/usr/lib/$triplet -C link-arg=-Wl,-rpath-link,$sysroot/lib/$triplet"
  export "CARGO_TARGET_${TVAR}_RUSTFLAGS=$rustflags"
fi

cargo build --locked --profile "$profile" --target "$target" --bin hlstore
dir=$profile
if [ "$profile" = dev ] || [ "$profile" = test ]; then dir=debug; fi
bin="${CARGO_TARGET_DIR:-target}/$target/$dir/hlstore"

# The checks: the right machine, and Debian's RocksDB linked rather than a bundled copy.
if ! LC_ALL=C readelf -h "$bin" | grep -q "Machine:.*$machine"; then
  echo "build-hlstore: $bin is not a $machine binary:" >&2
  readelf -h "$bin" | grep Machine >&2
  exit 1
fi
if ! LC_ALL=C readelf -d "$bin" | grep -q 'NEEDED.*librocksdb\.so'; then
  echo "build-hlstore: $bin does not link librocksdb.so dynamically (bundled RocksDB?)" >&2
  exit 1
fi
echo "build-hlstore: $bin ($machine, links $(LC_ALL=C readelf -d "$bin" | sed -n 's/.*Shared library: \[\(librocksdb[^]]*\)\].*/\1/p'))"
# A cross-built binary must also start: under QEMU user emulation (Debian's qemu-user),
# with the cross toolchain's libc and the sysroot's RocksDB.
qemu="qemu-${triplet%%-*}"
if [ -n "$sysroot" ] && command -v "$qemu" >/dev/null 2>&1; then
  if ! ver=$(QEMU_LD_PREFIX="/usr/$triplet" LD_LIBRARY_PATH="$sysroot/usr/lib/$triplet:$sysroot/lib/$triplet" \
    "$qemu" "$bin" --version 2>&1); then
    echo "build-hlstore: $bin does not start under $qemu: $ver" >&2
    exit 1
  fi
  echo "build-hlstore: runs under $qemu: $ver"
fi
if [ -n "$out" ]; then
  mkdir -p "$(dirname "$out")"
  cp "$bin" "$out"
fi
