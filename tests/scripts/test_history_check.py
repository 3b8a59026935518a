#!/usr/bin/python3
"""Unit tests of history_check.py on hand-made histories: each violation kind is caught,
and the legal histories around it pass. Run: python3 -m unittest test_history_check
(tests/history_check.rs runs them in `cargo test`)."""

import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from blockfmt import BLOCK, block_bytes  # noqa: E402
from history_check import BadInput, History, check  # noqa: E402

FILL = bytes(BLOCK)


def history(writers=(), readers=()):
    h = History()
    for engine, text in writers:
        h.add_writer_lines(engine, text.strip().splitlines())
    for label, text in readers:
        h.add_reader_lines(label, text.strip().splitlines())
    return h


def put(path, data):
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def image(*blocks):
    """Region content: each item is a seq (block i holds write seq) or None (fill)."""
    return b"".join(FILL if s is None else block_bytes(s, i) for i, s in enumerate(blocks))


# Writer n1: seq 1 -> block 0 acked at 1.1, seq 2 -> block 1 acked, flush, seq 3 -> block 0 acked.
N1 = """
C 0.5
W 1 0 1.0 1.1
W 2 1 1.2 1.3
F 2 1.4 1.5
W 3 0 2.0 2.1
"""


class Legal(unittest.TestCase):
    def test_fresh_reads_and_final_content_pass(self):
        h = history([("n1", N1)], [("r", "R 0 1 1.15 1.16\nR 0 3 2.2 2.3\nR 1 2 2.2 2.3\nR 2 0 2.2 2.3")])
        rep = check(h, 3, final=image(3, 2, None))
        self.assertTrue(rep.ok, rep.table())
        self.assertEqual(rep.stats["acked_writes"], 3)
        self.assertEqual(rep.stats["reads"], 4)

    def test_read_concurrent_with_a_write_may_see_either_value(self):
        # seq 3 runs 2.0-2.1; reads overlapping it may see seq 1 or seq 3.
        h = history([("n1", N1)], [("r", "R 0 1 2.05 2.06\nR 0 3 2.05 2.06\nR 0 1 1.9 2.05")])
        self.assertTrue(check(h, 2).ok)

    def test_failed_write_may_or_may_not_have_landed(self):
        w = N1 + "E 4 0 5 3.0 3.5\n"
        for final in (image(3, 2), image(4, 2)):
            self.assertTrue(check(history([("n1", w)], [("r", "R 0 4 4.0 4.1\nR 0 3 4.2 4.3")]), 2, final=final).ok)

    def test_block_whose_writes_all_failed_may_stay_empty(self):
        h = history([("n1", "E 1 0 5 1.0 1.1")])
        self.assertTrue(check(h, 1, final=image(None)).ok)

    def test_sequential_engines_are_not_double_writers(self):
        n2 = "W 10 0 3.0 3.1\nW 11 1 3.2 3.3"
        for order in (["n1", "n2"], None):
            self.assertTrue(check(history([("n1", N1), ("n2", n2)]), 2, engine_order=order).ok)

    def test_identical_replicas_pass(self):
        img = image(3, 2)
        rep = check(history([("n1", N1)]), 2, final=img, replicas={"n1": img, "n2": img, "n3": img})
        self.assertTrue(rep.ok, rep.table())
        self.assertEqual(rep.stats["replicas"], 3)


class Violations(unittest.TestCase):
    def kinds(self, rep):
        return {k for k, n in rep.counts.items() if n}

    def test_stale_read_after_failover(self):
        # Old engine n1 acked seq 1 on block 0; new engine n2 acked seq 10 there; a read
        # through n1 afterwards still returns seq 1.
        h = history([("n1", "W 1 0 1.0 1.1"), ("n2", "W 10 0 5.0 5.1")], [("n1-reader", "R 0 1 6.0 6.01")])
        rep = check(h, 1, engine_order=["n1", "n2"])
        self.assertEqual(self.kinds(rep), {"stale_read"}, rep.table())
        self.assertIn("seq 10", rep.table())

    def test_stale_read_of_never_written_content(self):
        h = history([("n1", N1)], [("r", "R 1 0 1.4 1.41")])
        self.assertEqual(self.kinds(check(h, 2)), {"stale_read"})

    def test_read_of_a_value_never_written(self):
        for line in ("R 0 99 3.0 3.1", "R 0 2 3.0 3.1", "RB 0 3.0 3.1 payload of seq 3 damaged"):
            rep = check(history([("n1", N1)], [("r", line)]), 2)
            self.assertEqual(self.kinds(rep), {"never_written"}, line)

    def test_read_from_the_future(self):
        rep = check(history([("n1", N1)], [("r", "R 0 3 1.5 1.6")]), 2)
        self.assertEqual(self.kinds(rep), {"never_written"})

    def test_final_value_older_than_acked_write_is_lost(self):
        rep = check(history([("n1", N1)]), 2, final=image(1, 2))
        self.assertEqual(self.kinds(rep), {"lost_write"})
        self.assertEqual(rep.lost_flushed, 0)

    def test_lost_write_covered_by_a_flush(self):
        rep = check(history([("n1", N1)]), 2, final=image(3, None))
        self.assertEqual(self.kinds(rep), {"lost_write"})
        self.assertEqual(rep.lost_flushed, 1)

    def test_flushed_only_ignores_unflushed_losses(self):
        # After a crash of every replica only flush-covered writes (seq 1, 2) must survive.
        self.assertTrue(check(history([("n1", N1)]), 2, final=image(1, 2), flushed_only=True).ok)
        rep = check(history([("n1", N1)]), 2, final=image(None, 2), flushed_only=True)
        self.assertEqual(self.kinds(rep), {"lost_write"})

    def test_final_value_never_written(self):
        bad = bytearray(image(3, 2))
        bad[BLOCK + 100] ^= 0xFF
        rep = check(history([("n1", N1)]), 2, final=bytes(bad))
        self.assertEqual(self.kinds(rep), {"never_written"})

    def test_old_engine_acking_after_new_one(self):
        # n2 (newer) acked at 3.1; n1 (older) acks a write started at 3.5.
        n1 = N1 + "W 4 1 3.5 3.6\n"
        n2 = "W 10 0 3.0 3.1"
        rep = check(history([("n1", n1), ("n2", n2)]), 2, engine_order=["n1", "n2"])
        self.assertEqual(self.kinds(rep), {"double_writer"}, rep.table())

    def test_interleaved_acks_without_an_order(self):
        a = "W 1 0 1.0 1.1\nW 2 0 3.0 3.1"
        b = "W 10 1 2.0 2.1\nW 11 1 4.0 4.1"
        rep = check(history([("a", a), ("b", b)]), 2)
        self.assertEqual(self.kinds(rep), {"double_writer"}, rep.table())
        # The same acks in the other order of names give the same verdict.
        self.assertEqual(self.kinds(check(history([("b", a), ("a", b)]), 2)), {"double_writer"})

    def test_divergent_replicas(self):
        rep = check(history([("n1", N1)]), 2, replicas={"n1": image(3, 2), "n2": image(3, 2), "n3": image(1, 2)})
        self.assertEqual(self.kinds(rep), {"divergent_block"})
        self.assertEqual(rep.counts["divergent_block"], 1)

    def test_duplicate_seq_is_bad_input(self):
        with self.assertRaises(BadInput):
            history([("n1", "W 1 0 1.0 1.1"), ("n2", "W 1 0 2.0 2.1")])


class CommandLine(unittest.TestCase):
    def run_checker(self, *args):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "history_check.py")
        return subprocess.run([sys.executable, script, *args], capture_output=True, text=True)

    def test_exit_status_and_table(self):
        with tempfile.TemporaryDirectory() as d:
            w = os.path.join(d, "w.log")
            r = os.path.join(d, "r.log")
            f = os.path.join(d, "final.img")
            put(w, N1)
            put(r, "R 0 3 2.5 2.6\n")
            put(f, image(3, 2))
            ok = self.run_checker("--blocks", "2", "--writer", "n1=" + w, "--reader", "r=" + r, "--final", f)
            self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
            self.assertIn("VERDICT ok", ok.stdout)
            put(r, "R 0 1 2.5 2.6\n")
            bad = self.run_checker("--blocks", "2", "--writer", "n1=" + w, "--reader", "r=" + r, "--json")
            self.assertEqual(bad.returncode, 1, bad.stdout + bad.stderr)
            self.assertIn('"stale_read": 1', bad.stdout)
            junk = self.run_checker("--blocks", "2", "--writer", "n1=" + r)
            self.assertEqual(junk.returncode, 2)
            self.assertIn("not a writer log line", junk.stderr)


if __name__ == "__main__":
    unittest.main()
