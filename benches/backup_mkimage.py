#!/usr/bin/env python3
"""Builds the backup benchmark image and its 1 % scattered change.

mkimage PATH SIZE_MIB: interleaved 1-4 MiB segments of random data, zeros, repeated text and
copies of system libraries (deterministic apart from the random segments).
change PATH PERCENT RUN_KIB SEED [NBD_URI]: overwrites PERCENT % of the image with random
data in scattered RUN_KIB runs at 4 KiB-aligned offsets (like a filesystem's writes); with
NBD_URI, writes the same runs to that NBD export too (python3-libnbd), so a volume holding
the image keeps holding it. Prints the bytes changed.
"""
import glob
import os
import random
import sys

MIB = 1 << 20


def libraries():
    files = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/*.so*") + glob.glob("/usr/lib/aarch64-linux-gnu/*.so*"))
    for f in files:
        try:
            if os.path.isfile(f) and not os.path.islink(f) and os.path.getsize(f) > 64 * 1024:
                yield f
        except OSError:
            pass


def mkimage(path, size_mib):
    rnd = random.Random(42)
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


if __name__ == "__main__":
    if sys.argv[1] == "mkimage":
        mkimage(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "change":
        uri = sys.argv[6] if len(sys.argv) > 6 else None
        change(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), uri)
    else:
        sys.exit("usage: mkimage PATH SIZE_MIB | change PATH PERCENT RUN_KIB SEED [NBD_URI]")
