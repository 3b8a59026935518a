#!/usr/bin/env python3
"""Images for the nbdcopy soak (tests/soak/nbdcopy.sh) and what differs when one reads back wrong.

make KIND PATH SIZE_MIB SEED: a seeded image (the bytes too, not only the layout):
  runs      random runs (4 KiB to 4 MiB, any 4 KiB multiple) between holes (same sizes);
  zeroruns  like runs, but a third of the gaps are written zeros (not holes), so they
            reach nbdcopy as data and its zero detection turns them into WRITE_ZEROES
            inside a data extent;
  dense     random data everywhere (no hole, no zero run).
diff EXPECTED GOT: prints the ranges that differ (4 KiB granularity) as JSON lines:
  {"offset", "length", "offset_mib", "got_zero", "expected_zero"}; exit 1 if any differ.
cmp EXPECTED OFFSET LENGTH FILE: how FILE (LENGTH bytes read at OFFSET) compares with the
  same bytes of EXPECTED: "same", "zeros" (FILE has zeros where EXPECTED has data),
  "differs" or "short".
nbdread URI OFFSET LENGTH OUT: reads a range through NBD (python3-libnbd) into OUT.
"""
import json
import os
import random
import sys

KIB = 1024
MIB = 1 << 20
BLOCK = 4096


def make(kind, path, size_mib, seed):
    rnd = random.Random(seed)
    total = size_mib * MIB
    with open(path, "wb") as out:
        out.truncate(total)
        at = 0
        data = kind == "dense"
        while at < total:
            if kind == "dense":
                n = min(8 * MIB, total - at)
            else:
                n = min(rnd.randint(1, 1024) * BLOCK, total - at)
            if data:
                out.seek(at)
                out.write(rnd.randbytes(n))
            elif kind == "zeroruns" and rnd.random() < 1 / 3:
                out.seek(at)
                out.write(bytes(n))
            at += n
            if kind != "dense":
                data = not data


def is_zero(b):
    return not any(b) if len(b) < 64 else b.count(0) == len(b)


def diff(expected, got):
    ranges = []
    cur = None
    with open(expected, "rb") as fe, open(got, "rb") as fg:
        at = 0
        while True:
            e = fe.read(MIB)
            g = fg.read(MIB)
            if not e and not g:
                break
            if e != g:
                n = max(len(e), len(g))
                for i in range(0, n, BLOCK):
                    eb, gb = e[i : i + BLOCK], g[i : i + BLOCK]
                    off = at + i
                    if eb == gb:
                        continue
                    gz, ez = is_zero(gb) and len(gb) == len(eb), is_zero(eb)
                    if cur and cur["offset"] + cur["length"] == off and (cur["got_zero"], cur["expected_zero"]) == (gz, ez):
                        cur["length"] += BLOCK
                    else:
                        cur = {"offset": off, "length": BLOCK, "got_zero": gz, "expected_zero": ez}
                        ranges.append(cur)
            at += max(len(e), len(g))
    for r in ranges:
        r["offset_mib"] = round(r["offset"] / MIB, 4)
        print(json.dumps(r))
    return 1 if ranges else 0


def cmp_range(expected, offset, length, path):
    with open(expected, "rb") as f:
        f.seek(offset)
        e = f.read(length)
    try:
        with open(path, "rb") as f:
            g = f.read()
    except OSError:
        return "unreadable"
    if len(g) < len(e):
        return "short"
    g = g[: len(e)]
    if g == e:
        return "same"
    return "zeros" if is_zero(g) else "differs"


def nbdread(uri, offset, length, out):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    buf = bytearray()
    while len(buf) < length:
        n = min(8 * MIB, length - len(buf))
        buf += h.pread(n, offset + len(buf))
    h.shutdown()
    with open(out, "wb") as f:
        f.write(buf)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "make":
        make(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "diff":
        sys.exit(diff(sys.argv[2], sys.argv[3]))
    elif cmd == "cmp":
        print(cmp_range(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
    elif cmd == "nbdread":
        nbdread(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(__doc__)
