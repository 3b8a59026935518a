#!/usr/bin/env python3
"""Builds the backup benchmark image and its 1 % scattered change.

mkimage PATH SIZE_MIB [SEED]: interleaved 1-4 MiB segments of random data, zeros, repeated text
and copies of system libraries (the layout is deterministic for a SEED, default 42; the random
segments are not).
mkfs PATH SIZE_MIB: an ext4 filesystem image (mkfs.ext4 -d) holding /usr/share and Python's
standard library (without site-packages): real files, real allocation.
fschange PATH: loop-mounts the ext4 image (root) and changes it like a day of use: deletes
one tree, adds the PostgreSQL binaries (or /usr/bin when there are none), appends a line to
300 files. Prints the bytes of the files added and appended.
change PATH PERCENT RUN_KIB SEED [NBD_URI]: overwrites PERCENT % of the image with random
data in scattered RUN_KIB runs at 4 KiB-aligned offsets (like a filesystem's writes); with
NBD_URI, writes the same runs to that NBD export too (python3-libnbd), so a volume holding
the image keeps holding it. Prints the bytes changed.
"""
import glob
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile

MIB = 1 << 20


def libraries():
    files = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*") + glob.glob("/usr/lib/aarch64-linux-gnu/*.so*"))
    for f in files:
        try:
            if os.path.isfile(f) and not os.path.islink(f) and os.path.getsize(f) > 64 * 1024:
                yield f
        except OSError:
            pass


def mkimage(path, size_mib, seed=42):
    rnd = random.Random(seed)
    libs = list(libraries())
    text = b"".join(b"%06d the quick brown fox jumps over the lazy dog; hlstore bench\n" % i for i in range(1000))
    total = size_mib * MIB
    done = 0
    li = 0
    kinds = ["random", "zero", "text", "lib", "lib", "random", "zero", "lib"]
    k = 0
    with open(path, "wb") as out:
        while done < total:
            n = min(rnd.randint(1, 4) * MIB, total - done)
            kind = kinds[k % len(kinds)]
            k += 1
            if kind == "random":
                out.write(os.urandom(n))
            elif kind == "zero":
                out.seek(n, 1)
            elif kind == "text":
                reps = n // len(text) + 1
                out.write((text * reps)[:n])
            else:
                buf = bytearray()
                while len(buf) < n and libs:
                    with open(libs[li % len(libs)], "rb") as f:
                        buf += f.read(n - len(buf))
                    li += 1
                buf = bytes(buf[:n]).ljust(n, b"\0")
                out.write(buf)
            done += n
        out.truncate(total)


def change(path, percent, run_kib, seed, nbd_uri=None):
    size = os.path.getsize(path)
    run = run_kib * 1024
    runs = max(1, int(size * percent / 100) // run)
    rnd = random.Random(seed)
    h = None
    if nbd_uri:
        import nbd

        h = nbd.NBD()
        h.connect_uri(nbd_uri)
    with open(path, "r+b") as f:
        for _ in range(runs):
            off = rnd.randrange(0, (size - run) // 4096) * 4096
            data = os.urandom(run)
            f.seek(off)
            f.write(data)
            if h is not None:
                h.pwrite(data, off)
    if h is not None:
        h.flush()
        h.shutdown()
    print(runs * run)


def mkfs(path, size_mib):
    stage = tempfile.mkdtemp(prefix="hlstore-fs-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        subprocess.run(["cp", "-a", "/usr/share", os.path.join(stage, "share")], check=True)
        std = sysconfig.get_paths()["stdlib"]
        shutil.copytree(std, os.path.join(stage, "python"), symlinks=True,
                        ignore=shutil.ignore_patterns("site-packages", "__pycache__"))
        if os.path.exists(path):
            os.remove(path)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", stage, path, "%dM" % size_mib], check=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def fschange(path):
    mnt = tempfile.mkdtemp(prefix="hlstore-mnt-")
    subprocess.run(["mount", "-o", "loop", path, mnt], check=True)
    added = 0
    try:
        trees = sorted(d for d in glob.glob(os.path.join(mnt, "share", "*")) if os.path.isdir(d))
        victim = max(trees, key=lambda d: sum(len(f) for _, _, f in os.walk(d)) if "doc" not in d else 0)
        shutil.rmtree(victim)
        pg = [d for d in ["/usr/lib/postgresql", "/usr/local/pgsql/bin"] if os.path.isdir(d)]
        src = pg[0] if pg else "/usr/local/bin" if os.path.exists("/usr/local/bin/postgres") else "/usr/bin"
        dst = os.path.join(mnt, "added")
        shutil.copytree(src, dst, symlinks=True)
        for root, _, files in os.walk(dst):
            for f in files:
                fp = os.path.join(root, f)
                if os.path.isfile(fp) and not os.path.islink(fp):
                    added += os.path.getsize(fp)
        rnd = random.Random(5)
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(mnt, "python")) for f in fs)
        files = [f for f in files if os.path.isfile(f) and not os.path.islink(f)]
        for f in rnd.sample(files, min(300, len(files))):
            with open(f, "ab") as fh:
                fh.write(b"# touched\n")
            added += 10
    finally:
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)
    print(added)


if __name__ == "__main__":
    if sys.argv[1] == "mkimage":
        mkimage(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 42)
    elif sys.argv[1] == "mkfs":
        mkfs(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "fschange":
        fschange(sys.argv[2])
    elif sys.argv[1] == "change":
        uri = sys.argv[6] if len(sys.argv) > 6 else None
        change(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), uri)
    else:
        sys.exit("usage: mkimage PATH SIZE_MIB [SEED] | mkfs PATH SIZE_MIB | fschange PATH | change PATH PERCENT RUN_KIB SEED [NBD_URI]")
