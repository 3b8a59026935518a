"""The self-describing 4 KiB block written by nbd_load.py and decoded by history_check.py.

A block holds a header (magic, seq, block index) and a payload derived from both, so a
read shows which write it holds and whether it is intact. No libnbd needed here, so the
history checker and its unit tests run anywhere.
"""

import hashlib
import struct

BLOCK = 4096
MAGIC = b"HLSTBLK1"
HEADER = struct.Struct("<8sQQ")


def block_bytes(seq, blk):
    head = HEADER.pack(MAGIC, seq, blk)
    digest = hashlib.sha256(b"%d:%d" % (seq, blk)).digest()
    body = (digest * (BLOCK // len(digest) + 1))[: BLOCK - len(head)]
    return head + body


def decode(data, blk, fill=0):
    """What a 4 KiB block read at index `blk` holds: ("fill", 0) for the never-written
    content, ("write", seq) for an intact block of write `seq`, ("bad", reason) otherwise."""
    if len(data) != BLOCK:
        return ("bad", "short block (%d bytes)" % len(data))
    if data == bytes([fill]) * BLOCK:
        return ("fill", 0)
    magic, seq, hblk = HEADER.unpack_from(data)
    if magic != MAGIC:
        return ("bad", "no block header (first bytes %s)" % data[:8].hex())
    if hblk != blk:
        return ("bad", "header of block %d (seq %d)" % (hblk, seq))
    if data != block_bytes(seq, blk):
        return ("bad", "payload of seq %d damaged" % seq)
    return ("write", seq)
