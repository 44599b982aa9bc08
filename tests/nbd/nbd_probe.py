"""A libnbd client the way backup tools use it: connect with meta contexts, walk each
context with block_status, pread the extents that context selects, and print JSON.

Run as a script (``python nbd_probe.py URI [--context CTX]... [--dump DIR] [--ops JSON]``)
with an
interpreter that imports libnbd's ``nbd`` module (Debian's python3-libnbd).  With
``--dump`` the bytes read for context CTX land at their offsets in ``DIR/<n>.raw`` (a
sparse file of the export's size), so the test can compare them with the disk as it was:
base:allocation reads every extent (holes must read as zeroes), a dirty bitmap its dirty
extents, allocation-depth the allocated ones.  ``--ops`` runs writes first: a JSON list
of ``["pwrite", off, len, byte, fua]``, ``["zero", off, len, may_trim, fua]``,
``["trim", off, len]``, ``["flush"]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

import nbd  # type: ignore[import-not-found,import-untyped,unused-ignore]

CHUNK = 4 << 20  # a read never spans two of the tests' copied runs
FLAGS = ("is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
         "can_cache", "can_multi_conn", "can_df")


def walk(h: Any, ctx: str, size: int) -> list[list[int]]:
    """Every extent of one context over the whole export (adjacent equal runs merged)."""
    out: list[list[int]] = []
    off = 0
    while off < size:
        got: list[int] = []

        def cb(meta: str, start: int, entries: list[int], err: Any, got: list[int] = got,
               ) -> int:
            if meta == ctx:
                got.extend(entries)
            return 0

        h.block_status(min(size - off, 1 << 30), off, cb)
        assert got, f"no extents for {ctx} at {off}"
        for i in range(0, len(got), 2):
            n, flags = min(got[i], size - off), got[i + 1]
            if n <= 0:
                break
            if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == off:
                out[-1][1] += n
            else:
                out.append([off, n, flags])
            off += n
    return out


def selected(ctx: str, flags: int) -> bool:
    """Which extents a backup tool reads for this context."""
    if ctx.startswith("qemu:dirty-bitmap:"):
        return bool(flags & 1)
    if ctx == "qemu:allocation-depth":
        return flags > 0
    return True


def main(argv: list[str]) -> int:
    uri = argv[0]
    contexts: list[str] = []
    dump: str | None = None
    ops: list[list[Any]] = []
    i = 1
    while i < len(argv):
        if argv[i] == "--context":
            contexts.append(argv[i + 1])
        elif argv[i] == "--dump":
            dump = argv[i + 1]
        elif argv[i] == "--ops":
            ops = json.loads(argv[i + 1])
        else:
            raise SystemExit(f"unknown argument {argv[i]}")
        i += 2
    h = nbd.NBD()
    for ctx in contexts:
        h.add_meta_context(ctx)
    h.connect_uri(uri)
    size = h.get_size()
    for op in ops:
        if op[0] == "pwrite":
            h.pwrite(bytes([op[3]]) * op[2], op[1], nbd.CMD_FLAG_FUA if op[4] else 0)
        elif op[0] == "zero":
            h.zero(op[2], op[1], (0 if op[3] else nbd.CMD_FLAG_NO_HOLE)
                   | (nbd.CMD_FLAG_FUA if op[4] else 0))
        elif op[0] == "trim":
            h.trim(op[2], op[1])
        elif op[0] == "flush":
            h.flush()
        else:
            raise SystemExit(f"unknown op {op}")
    res: dict[str, Any] = {
        "size": size,
        "flags": {f: bool(getattr(h, f)()) for f in FLAGS},
        "contexts": {c: bool(h.can_meta_context(c)) for c in contexts},
        "extents": {},
        "reads": {},
        #: extents reported as zero that read non-zero bytes (QEMU 7.2's snapshot-access
        #: can do that while the guest writes: see virtsim/sim/fleecing.py)
        "zero_but_data": [],
    }
    for n, ctx in enumerate(contexts):
        if not res["contexts"][ctx]:
            continue
        try:
            exts = walk(h, ctx, size)
        except nbd.Error as e:  # e.g. EACCES outside a cbw filter's bitmap
            res["extents"][ctx] = f"error: {e.errno}"
            continue
        res["extents"][ctx] = exts
        digest = hashlib.sha256()
        fd = -1
        if dump is not None:
            fd = os.open(os.path.join(dump, f"{n}.raw"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.ftruncate(fd, size)
        try:
            for off, length, flags in exts:
                if not selected(ctx, flags):
                    continue
                pos = off
                while pos < off + length:
                    buf = h.pread(min(CHUNK, off + length - pos), pos)
                    if ctx == "base:allocation" and flags & 2 and buf.count(0) != len(buf):
                        res["zero_but_data"].append([pos, len(buf)])
                    digest.update(pos.to_bytes(8, "little") + buf)
                    if fd >= 0:
                        os.pwrite(fd, buf, pos)
                    pos += len(buf)
        finally:
            if fd >= 0:
                os.close(fd)
        res["reads"][ctx] = digest.hexdigest()
    try:
        h.shutdown()
    except nbd.Error as e:  # the server broke the connection (QEMU 7.2 can, see tests)
        res["shutdown"] = f"error: {e.errno}"
    json.dump(res, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
