#!/usr/bin/python3
"""History checker for hlstore fault tests: what the clients saw against what they were told.

Inputs are the logs of nbd_load.py clients (writers and readers; CLOCK_MONOTONIC stamps,
which every network namespace shares, so logs of clients on different nodes compare), and
optionally the final content of the region (`nbd_load.py dump`) and raw copies of every
replica (`hlstore replica read`). Each writer log is labelled with the engine it wrote
through (`--writer n1=PATH`); engines may be ranked oldest first (`--engine-order n1,n2`).

Rules (a write is identified by its seq; seqs are unique across all writer logs):
  stale read     a read returned the never-written content, or a write W, although some
                 write acknowledged before the read started began after W was acknowledged
                 (W cannot be the newest value any more). Failed writes have an undefined
                 effect at any time after they start, so they never make a read stale.
  never written  a read or the final content holds something no write attempted on that
                 block (wrong header, damaged payload, or a seq written elsewhere), or a
                 write that started only after the read ended.
  lost write     the final content of a block is older (same rule as a stale read) than an
                 acknowledged write; counted separately when an acknowledged FLUSH after it
                 covered it. With --flushed-only only flush-covered writes must survive
                 (a crash of every replica).
  double writer  two engines acknowledged in overlapping periods: with an engine order, an
                 older engine acknowledged a request that started after a newer one had
                 acknowledged anything; without one, two engines each acknowledged a request
                 started after the other's first acknowledgement.
  divergence     replica copies (after convergence) differ in some block.

Prints a verdict table (or JSON with --json) and exits 1 on any violation, 2 on bad input.
"""

import argparse
import json
import sys

from blockfmt import BLOCK, decode

KINDS = ("stale_read", "never_written", "lost_write", "double_writer", "divergent_block")
INF = float("inf")


class BadInput(Exception):
    pass


class Write:
    __slots__ = ("seq", "block", "acked", "t0", "t1", "engine", "flushed")

    def __init__(self, seq, block, acked, t0, t1, engine):
        self.seq, self.block, self.acked, self.t0, self.t1, self.engine = seq, block, acked, t0, t1, engine
        self.flushed = False

    def precedes(self, other):
        """True when this write certainly took effect before `other` started."""
        return self.acked and self.t1 < other.t0


class Read:
    __slots__ = ("label", "block", "seq", "bad", "t0", "t1")

    def __init__(self, label, block, seq, bad, t0, t1):
        self.label, self.block, self.seq, self.bad, self.t0, self.t1 = label, block, seq, bad, t0, t1


class History:
    def __init__(self):
        self.writes = {}  # seq -> Write
        self.by_block = {}  # block -> [Write]
        self.acks = {}  # engine -> [(t0, t1, what)] acknowledged writes and flushes
        self.reads = []
        self.read_errors = 0
        self.failed_writes = 0
        self.acked_flushes = 0

    def add_writer_lines(self, engine, lines, name="<log>"):
        pending = []  # acked writes of this log not yet covered by an acked flush
        acks = self.acks.setdefault(engine, [])
        for n, line in enumerate(lines, 1):
            p = line.split()
            if not p:
                continue
            try:
                if p[0] in ("W", "E"):
                    seq, blk = int(p[1]), int(p[2])
                    t0, t1 = (float(p[3]), float(p[4])) if p[0] == "W" else (float(p[4]), float(p[5]))
                    if seq in self.writes:
                        raise BadInput("%s:%d: seq %d appears twice (writers need distinct --seq-base)" % (name, n, seq))
                    w = Write(seq, blk, p[0] == "W", t0, t1, engine)
                    self.writes[seq] = w
                    self.by_block.setdefault(blk, []).append(w)
                    if w.acked:
                        acks.append((t0, t1, "write seq %d" % seq))
                        pending.append(w)
                    else:
                        self.failed_writes += 1
                elif p[0] == "F":
                    t0, t1 = float(p[2]), float(p[3])
                    self.acked_flushes += 1
                    acks.append((t0, t1, "flush at seq %s" % p[1]))
                    for w in pending:
                        if w.t1 <= t0:
                            w.flushed = True
                    pending = [w for w in pending if not w.flushed]
                elif p[0] in ("FE", "C", "X"):
                    pass
                else:
                    raise BadInput("%s:%d: not a writer log line: %r" % (name, n, line))
            except (IndexError, ValueError):
                raise BadInput("%s:%d: malformed line %r" % (name, n, line))

    def add_reader_lines(self, label, lines, name="<log>"):
        for n, line in enumerate(lines, 1):
            p = line.split()
            if not p:
                continue
            try:
                if p[0] == "R":
                    self.reads.append(Read(label, int(p[1]), int(p[2]), None, float(p[3]), float(p[4])))
                elif p[0] == "RB":
                    what = " ".join(p[4:]) or "unrecognised content"
                    self.reads.append(Read(label, int(p[1]), None, what, float(p[2]), float(p[3])))
                elif p[0] == "RE":
                    self.read_errors += 1
                elif p[0] in ("C", "X"):
                    pass
                else:
                    raise BadInput("%s:%d: not a reader log line: %r" % (name, n, line))
            except (IndexError, ValueError):
                raise BadInput("%s:%d: malformed line %r" % (name, n, line))


class Report:
    def __init__(self):
        self.counts = {k: 0 for k in KINDS}
        self.lost_flushed = 0
        self.examples = []  # (kind, detail), at most LIMIT per kind
        self.stats = {}

    LIMIT = 20

    def add(self, kind, detail):
        self.counts[kind] += 1
        if self.counts[kind] <= self.LIMIT:
            self.examples.append((kind, detail))

    @property
    def ok(self):
        return not any(self.counts.values())

    def to_json(self):
        d = dict(self.stats)
        d.update(self.counts)
        d["lost_flushed"] = self.lost_flushed
        d["ok"] = self.ok
        d["violations"] = [{"kind": k, "detail": t} for k, t in self.examples]
        return d

    def table(self):
        rows = [
            ("acknowledged writes", self.stats.get("acked_writes", 0)),
            ("failed writes", self.stats.get("failed_writes", 0)),
            ("acknowledged flushes", self.stats.get("acked_flushes", 0)),
            ("reads checked", self.stats.get("reads", 0)),
            ("failed reads", self.stats.get("read_errors", 0)),
            ("final blocks checked", self.stats.get("final_blocks", 0)),
            ("replicas compared", self.stats.get("replicas", 0)),
            ("LOST acknowledged writes", self.counts["lost_write"]),
            ("  of them covered by a flush", self.lost_flushed),
            ("STALE reads", self.counts["stale_read"]),
            ("NEVER-WRITTEN values", self.counts["never_written"]),
            ("DOUBLE-WRITER acks", self.counts["double_writer"]),
            ("DIVERGENT replica blocks", self.counts["divergent_block"]),
        ]
        lines = ["%-30s %10d" % r for r in rows]
        lines += ["VIOLATION %s: %s" % e for e in self.examples]
        lines.append("VERDICT %s" % ("ok" if self.ok else "VIOLATED"))
        return "\n".join(lines)


def describe(w):
    if w is None:
        return "never-written content"
    return "seq %d (%s via %s, %.3f-%.3f)" % (w.seq, "acked" if w.acked else "failed", w.engine, w.t0, w.t1)


def newer_acked(h, blk, value, before, flushed_only=False):
    """The acknowledged write to `blk` completed before `before` that proves `value`
    (a Write or None for never-written content) outdated, or None."""
    best = None
    for w in h.by_block.get(blk, ()):
        if not w.acked or w.t1 >= before or (flushed_only and not w.flushed):
            continue
        if w is value:
            continue
        if value is None or value.precedes(w):
            if best is None or w.t1 > best.t1:
                best = w
    return best


def check_value(h, rep, kind_stale, where, blk, seq, bad, before, after_t1=None, flushed_only=False):
    """Checks one observed block value; returns False on a violation."""
    if bad is not None:
        rep.add("never_written", "%s: block %d holds %s" % (where, blk, bad))
        return False
    value = None
    if seq:
        value = h.writes.get(seq)
        if value is None or value.block != blk:
            rep.add("never_written", "%s: block %d holds seq %d, never written to this block" % (where, blk, seq))
            return False
        if after_t1 is not None and value.t0 > after_t1:
            rep.add("never_written", "%s: block %d holds seq %d, written only after the read ended" % (where, blk, seq))
            return False
    w = newer_acked(h, blk, value, before, flushed_only)
    if w is not None:
        if kind_stale == "lost_write" and w.flushed:
            rep.lost_flushed += 1
        rep.add(kind_stale, "%s: block %d holds %s, but %s was acknowledged before" % (where, blk, describe(value), describe(w)))
        return False
    return True


def check_double_writers(h, rep, order):
    engines = sorted(e for e in h.acks if h.acks[e])
    first = {e: min(t1 for _, t1, _ in h.acks[e]) for e in engines}
    rank = {e: i for i, e in enumerate(order or [])}
    pairs = []  # (older engine, newer engine)
    if order:
        pairs = [(a, b) for a in engines for b in engines if a in rank and b in rank and rank[a] < rank[b]]
    else:
        # No order known: only an interleaving of acknowledgements proves two live engines;
        # the one that acknowledged first counts as the older.
        for i, a in enumerate(engines):
            for b in engines[i + 1 :]:
                if any(t0 > first[b] for t0, _, _ in h.acks[a]) and any(t0 > first[a] for t0, _, _ in h.acks[b]):
                    pairs.append((a, b) if first[a] <= first[b] else (b, a))
    for old, new in pairs:
        for t0, t1, what in h.acks[old]:
            if t0 > first[new]:
                rep.add(
                    "double_writer",
                    "engine %s acknowledged %s (%.3f-%.3f) after engine %s had acknowledged at %.3f"
                    % (old, what, t0, t1, new, first[new]),
                )


def check_divergence(rep, replicas, blocks, fill):
    names = sorted(replicas)
    if len(names) < 2:
        return
    for blk in range(blocks):
        chunks = {n: replicas[n][blk * BLOCK : (blk + 1) * BLOCK] for n in names}
        if len(set(chunks.values())) > 1:
            seen = ", ".join("%s=%s" % (n, "%s %s" % decode(chunks[n], blk, fill)) for n in names)
            rep.add("divergent_block", "block %d differs between replicas: %s" % (blk, seen))


def check(h, blocks, fill=0, final=None, replicas=None, engine_order=None, flushed_only=False):
    rep = Report()
    for r in h.reads:
        if r.block >= blocks:
            raise BadInput("read of block %d outside the region of %d blocks" % (r.block, blocks))
        check_value(h, rep, "stale_read", "read by %s at %.3f" % (r.label, r.t0), r.block, r.seq, r.bad, r.t0, r.t1)
    if final is not None:
        if len(final) < blocks * BLOCK:
            raise BadInput("final content has %d bytes, the region %d" % (len(final), blocks * BLOCK))
        for blk in range(blocks):
            kind, what = decode(final[blk * BLOCK : (blk + 1) * BLOCK], blk, fill)
            seq = what if kind == "write" else 0
            bad = what if kind == "bad" else None
            check_value(h, rep, "lost_write", "final content", blk, seq, bad, INF, flushed_only=flushed_only)
    replicas = replicas or {}
    for n, data in replicas.items():
        if len(data) < blocks * BLOCK:
            raise BadInput("replica %s has %d bytes, the region %d" % (n, len(data), blocks * BLOCK))
    check_divergence(rep, replicas, blocks, fill)
    check_double_writers(h, rep, engine_order)
    rep.stats = {
        "acked_writes": sum(1 for w in h.writes.values() if w.acked),
        "failed_writes": h.failed_writes,
        "acked_flushes": h.acked_flushes,
        "reads": len(h.reads),
        "read_errors": h.read_errors,
        "final_blocks": blocks if final is not None else 0,
        "replicas": len(replicas),
    }
    return rep


def labelled(spec):
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError("expected LABEL=PATH, got %r" % spec)
    return label, path


def read_lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError as e:
        raise BadInput("cannot read %s: %s" % (path, e))


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadInput("cannot read %s: %s" % (path, e))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, required=True, help="region size in 4 KiB blocks")
    p.add_argument("--fill", type=lambda x: int(x, 0), default=0, help="content byte of never-written blocks")
    p.add_argument("--writer", type=labelled, action="append", default=[], metavar="ENGINE=LOG")
    p.add_argument("--reader", type=labelled, action="append", default=[], metavar="LABEL=LOG")
    p.add_argument("--engine-order", default="", help="engines oldest first, e.g. n1,n2")
    p.add_argument("--final", help="final content of the region (nbd_load.py dump)")
    p.add_argument("--replica", type=labelled, action="append", default=[], metavar="NODE=FILE")
    p.add_argument("--flushed-only", action="store_true", help="only flush-covered writes must survive")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    args = p.parse_args(argv)
    try:
        h = History()
        for engine, path in args.writer:
            h.add_writer_lines(engine, read_lines(path), path)
        for label, path in args.reader:
            h.add_reader_lines(label, read_lines(path), path)
        final = read_bytes(args.final) if args.final else None
        replicas = {n: read_bytes(path) for n, path in args.replica}
        order = [e for e in args.engine_order.split(",") if e]
        rep = check(h, args.blocks, args.fill, final, replicas, order, args.flushed_only)
    except BadInput as e:
        sys.stderr.write("history_check: %s\n" % e)
        return 2
    print(json.dumps(rep.to_json(), indent=1) if args.json else rep.table())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
