#!/usr/bin/python3
"""Self-describing block load for hlstore's cluster tests (python3-libnbd).

`write` writes 4 KiB blocks at random block indexes of a region and prints one line per
finished request, so the caller knows exactly which writes were acknowledged:

    W <seq> <block> <t_start> <t_end>            write acknowledged
    E <seq> <block> <errno> <t_start> <t_end>    write failed (content of the block undefined)
    F <seq> <t_start> <t_end>                    flush acknowledged (covers every seq <= seq)
    FE <seq> <errno> <t_start> <t_end>           flush failed
    C <t>                                        (re)connected
    X <t> <message>                              connection lost

Times are CLOCK_MONOTONIC seconds. Every block carries a header (magic, seq, block) and a
payload derived from both, so a read shows which write it holds and whether it is intact.
The writer stops when the stop file exists (after a final flush), after --count writes or
after --duration seconds.

`read` reads 4 KiB blocks (random, or in order with --sequential) and logs what each read
returned, for the history checker (history_check.py):

    R <block> <seq> <t_start> <t_end>            read returned write <seq> (0: never-written content)
    RB <block> <t_start> <t_end> <what>          read returned something no write wrote
    RE <block> <errno> <t_start> <t_end>         read failed

With --op-timeout, a request not answered in time counts as failed with ETIMEDOUT (110)
and the connection is dropped, so a server that never answers cannot hang the client.

`dump` copies the first --blocks blocks of an export to a file (for the checker).

`verify` reads every block of the region and checks it against one or more write logs:
a block holds a write that was attempted on it and is not older than the newest
acknowledged one; a block never written holds --fill bytes (zeroes), and so may a block
whose writes all failed. Exit status 1 on any mismatch.
"""

import argparse
import errno as errno_mod
import os
import random
import sys
import time

import nbd

from blockfmt import BLOCK, HEADER, MAGIC, block_bytes, decode


def now():
    return time.monotonic()


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def err_no(e):
    """The numeric errno of a libnbd error (-1 if it has none)."""
    n = e.errnum
    return n if isinstance(n, int) else -1


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


class OpTimeout(Exception):
    pass


def wait_op(h, cookie, deadline):
    """Waits for an AIO command; raises nbd.Error if it failed, OpTimeout after deadline."""
    while not h.aio_command_completed(cookie):
        left = deadline - now()
        if left <= 0:
            raise OpTimeout()
        h.poll(max(1, min(200, int(left * 1000))))


def do_write(h, data, off, timeout):
    if not timeout:
        h.pwrite(data, off)
        return
    wait_op(h, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off), now() + timeout)


def do_flush(h, timeout):
    if not timeout:
        h.flush()
        return
    wait_op(h, h.aio_flush(), now() + timeout)


def do_read(h, off, timeout):
    if not timeout:
        return h.pread(BLOCK, off)
    buf = nbd.Buffer(BLOCK)
    wait_op(h, h.aio_pread(buf, off), now() + timeout)
    return bytes(buf.to_bytearray())


def usable(h):
    return h is not None and (h.aio_is_ready() or h.aio_is_processing())


def expired(args, start):
    return bool(args.duration) and now() - start > args.duration


def write(args):
    rng = random.Random(args.seed)
    start = now()
    h = None
    seq = args.seq_base
    since_flush = 0
    written = 0

    def flush():
        t0 = now()
        try:
            do_flush(h, args.op_timeout)
            out("F %d %.6f %.6f" % (seq, t0, now()))
        except nbd.Error as e:
            out("FE %d %d %.6f %.6f" % (seq, err_no(e), t0, now()))
        except OpTimeout:
            out("FE %d %d %.6f %.6f" % (seq, errno_mod.ETIMEDOUT, t0, now()))
            return False
        return True

    while True:
        if os.path.exists(args.stop_file) or (args.count and written >= args.count) or expired(args, start):
            if usable(h) and h.aio_is_ready():
                flush()
            break
        if not usable(h):
            h = reconnect(args.uri)
            if h is None:
                continue
        seq += 1
        blk = (written % args.blocks) if args.sequential else rng.randrange(args.blocks)
        t0 = now()
        try:
            do_write(h, block_bytes(seq, blk), blk * BLOCK, args.op_timeout)
            out("W %d %d %.6f %.6f" % (seq, blk, t0, now()))
        except nbd.Error as e:
            out("E %d %d %d %.6f %.6f" % (seq, blk, err_no(e), t0, now()))
            if not usable(h):
                out("X %.6f %s" % (now(), str(e).replace("\n", " ")))
                time.sleep(0.2)
            else:
                time.sleep(0.02)  # a server failing every request at once: do not spin
        except OpTimeout:
            out("E %d %d %d %.6f %.6f" % (seq, blk, errno_mod.ETIMEDOUT, t0, now()))
            out("X %.6f request timed out; dropping the connection" % now())
            h = None
        written += 1
        since_flush += 1
        if args.flush_every and since_flush >= args.flush_every and usable(h) and h.aio_is_ready():
            since_flush = 0
            if not flush():
                h = None
        if args.pause_ms:
            time.sleep(args.pause_ms / 1000.0)


def reconnect(uri):
    """A new connection (logged as C), or None after logging X and a short pause."""
    try:
        h = connect(uri)
        out("C %.6f" % now())
        return h
    except nbd.Error as e:
        out("X %.6f %s" % (now(), str(e).replace("\n", " ")))
        time.sleep(0.2)
        return None


def read(args):
    rng = random.Random(args.seed)
    start = now()
    h = None
    done = 0
    failed = 0
    while True:
        if os.path.exists(args.stop_file) or (args.count and done >= args.count) or expired(args, start):
            break
        if args.max_errors and failed >= args.max_errors:
            break
        if not usable(h):
            h = reconnect(args.uri)
            if h is None:
                continue
        blk = (done % args.blocks) if args.sequential else rng.randrange(args.blocks)
        t0 = now()
        try:
            data = do_read(h, blk * BLOCK, args.op_timeout)
            t1 = now()
            kind, what = decode(data, blk, args.fill)
            if kind == "bad":
                out("RB %d %.6f %.6f %s" % (blk, t0, t1, what))
            else:
                out("R %d %d %.6f %.6f" % (blk, what, t0, t1))
        except nbd.Error as e:
            failed += 1
            out("RE %d %d %.6f %.6f" % (blk, err_no(e), t0, now()))
            if not usable(h):
                out("X %.6f %s" % (now(), str(e).replace("\n", " ")))
                time.sleep(0.2)
        except OpTimeout:
            failed += 1
            out("RE %d %d %.6f %.6f" % (blk, errno_mod.ETIMEDOUT, t0, now()))
            out("X %.6f request timed out; dropping the connection" % now())
            h = None
        done += 1
        if args.pause_ms:
            time.sleep(args.pause_ms / 1000.0)


def dump(args):
    h = connect(args.uri)
    chunk = 256
    with open(args.out, "wb") as f:
        for first in range(0, args.blocks, chunk):
            n = min(chunk, args.blocks - first)
            f.write(h.pread(n * BLOCK, first * BLOCK))
    h.shutdown()


def parse_logs(paths, acked_upto=None):
    """block -> (attempted seqs, newest acknowledged seq); with `acked_upto`, only writes
    with a seq up to it count as acknowledged (those a later acknowledged flush covers)."""
    attempted = {}
    acked = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                p = line.split()
                if not p:
                    continue
                if p[0] == "W":
                    seq, blk = int(p[1]), int(p[2])
                    attempted.setdefault(blk, set()).add(seq)
                    if acked_upto is None or seq <= acked_upto:
                        acked[blk] = max(acked.get(blk, 0), seq)
                elif p[0] == "E":
                    seq, blk = int(p[1]), int(p[2])
                    attempted.setdefault(blk, set()).add(seq)
    return attempted, acked


def verify(args):
    attempted, acked = parse_logs(args.logs, args.acked_upto)
    fill = bytes([args.fill]) * BLOCK
    h = connect(args.uri)
    bad = 0
    checked = 0
    chunk = 256

    def report(msg):
        if bad <= 50:
            out("BAD " + msg)

    for first in range(0, args.blocks, chunk):
        n = min(chunk, args.blocks - first)
        data = h.pread(n * BLOCK, first * BLOCK)
        for i in range(n):
            blk = first + i
            got = data[i * BLOCK : (i + 1) * BLOCK]
            checked += 1
            if blk not in attempted:
                if got != fill:
                    bad += 1
                    report("%d never written but does not hold the fill byte %#x" % (blk, args.fill))
                continue
            if got == fill and acked.get(blk, 0) == 0:
                continue  # only failed (or not yet durable) writes: the old content may stay
            magic, seq, hblk = HEADER.unpack_from(got)
            if magic != MAGIC or hblk != blk:
                bad += 1
                report("%d header %r seq %d block %d (acked seq %d)" % (blk, magic, seq, hblk, acked.get(blk, 0)))
                continue
            if got != block_bytes(seq, blk):
                bad += 1
                report("%d payload of seq %d damaged" % (blk, seq))
                continue
            if seq not in attempted[blk]:
                bad += 1
                report("%d holds seq %d, never written there" % (blk, seq))
                continue
            if seq < acked.get(blk, 0):
                bad += 1
                report("%d holds seq %d, older than acknowledged seq %d (lost write)" % (blk, seq, acked[blk]))
    h.shutdown()
    out("CHECKED %d BAD %d ACKED_BLOCKS %d" % (checked, bad, len(acked)))
    sys.exit(1 if bad else 0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("write")
    w.add_argument("uri")
    w.add_argument("--blocks", type=int, required=True, help="region size in 4 KiB blocks")
    w.add_argument("--stop-file", required=True)
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--seq-base", type=int, default=0, help="first seq is seq-base + 1")
    w.add_argument("--flush-every", type=int, default=16)
    w.add_argument("--count", type=int, default=0, help="stop after this many writes (0: until the stop file)")
    w.add_argument("--pause-ms", type=float, default=0)
    w.add_argument("--sequential", action="store_true", help="write blocks 0, 1, 2, ... in turn")
    w.add_argument("--op-timeout", type=float, default=0, help="seconds per request (0: wait forever)")
    r = sub.add_parser("read")
    r.add_argument("uri")
    r.add_argument("--blocks", type=int, required=True, help="region size in 4 KiB blocks")
    r.add_argument("--stop-file", required=True)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--count", type=int, default=0, help="stop after this many reads (0: until the stop file)")
    r.add_argument("--pause-ms", type=float, default=0)
    r.add_argument("--sequential", action="store_true", help="read blocks 0, 1, 2, ... in turn")
    r.add_argument("--fill", type=lambda x: int(x, 0), default=0, help="content byte of never-written blocks")
    r.add_argument("--op-timeout", type=float, default=0, help="seconds per request (0: wait forever)")
    r.add_argument("--max-errors", type=int, default=0, help="stop after this many failed reads (0: never)")
    for m in (w, r):
        m.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: never)")
    d = sub.add_parser("dump")
    d.add_argument("uri")
    d.add_argument("--blocks", type=int, required=True)
    d.add_argument("--out", required=True)
    v = sub.add_parser("verify")
    v.add_argument("uri")
    v.add_argument("--blocks", type=int, required=True)
    v.add_argument("--fill", type=lambda x: int(x, 0), default=0, help="content byte of never-written blocks")
    v.add_argument("--acked-upto", type=int, default=None, help="count only writes up to this seq as acknowledged")
    v.add_argument("logs", nargs="+")
    args = p.parse_args()
    {"write": write, "read": read, "dump": dump, "verify": verify}[args.mode](args)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        sys.exit(errno_mod.EPIPE)
