"""A fake export table for the sans-I/O NBD core, and a driver that runs the core to rest.

The fake export models storage in 64 KiB blocks that are data, zero (allocated zeroes) or
unallocated, plus dirty bitmaps as sets of blocks: enough to give sparse reads and every
meta context something to report, with no block graph involved.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from virtsim.nbd import protocol as P
from virtsim.nbd import wire as W

BLOCK = 64 * 1024


@dataclass
class FakeExport:
    name: str
    size: int = 1 << 20
    description: str | None = None
    writable: bool = False
    bitmap_names: list[str] = field(default_factory=list)
    allocation_depth: bool = False
    align: int = 1
    #: block index -> "data" | "zero"; missing: unallocated (reads as zero)
    blocks: dict[int, str] = field(default_factory=dict)
    dirty: dict[str, set[int]] = field(default_factory=dict)
    fail_read: bool = False
    data: bytearray = field(init=False)
    flushes: int = 0

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)
        self.nbdflags = (W.TF_HAS_FLAGS | W.TF_SEND_FLUSH | W.TF_SEND_FUA | W.TF_SEND_CACHE
                         | W.TF_CAN_MULTI_CONN)
        if self.writable:
            self.nbdflags |= W.TF_SEND_TRIM | W.TF_SEND_WRITE_ZEROES | W.TF_SEND_FAST_ZERO
        else:
            self.nbdflags |= W.TF_READ_ONLY

    def fill(self, block: int, byte: int) -> None:
        self.blocks[block] = "data"
        self.data[block * BLOCK:(block + 1) * BLOCK] = bytes([byte]) * BLOCK

    # ----- protocol.Export
    def request_alignment(self) -> int:
        return self.align

    def max_transfer(self) -> int:
        return 0x7FFFFFFF

    def read(self, offset: int, length: int) -> bytes:
        if self.fail_read:
            raise OSError(errno.EIO, "injected")
        return bytes(self.data[offset:offset + length])

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, str | None]]:
        pos, end = offset, offset + length
        while pos < end:
            blk = pos // BLOCK
            n = min(end, (blk + 1) * BLOCK) - pos
            yield n, self.blocks.get(blk)
            pos += n

    def read_map(self, offset: int, length: int) -> Iterator[tuple[int, bool]]:
        for n, st in self._runs(offset, length):
            yield n, st != "data"

    def status_runs(self, context_id: int, offset: int,
                    length: int) -> Iterator[tuple[int, int]]:
        if context_id == W.META_ID_BASE_ALLOCATION:
            for n, st in self._runs(offset, length):
                yield n, {"data": 0, "zero": W.STATE_ZERO}.get(
                    st or "", W.STATE_HOLE | W.STATE_ZERO)
        elif context_id == W.META_ID_ALLOCATION_DEPTH:
            for n, st in self._runs(offset, length):
                yield n, 1 if st else 0
        else:
            dirty = self.dirty.get(self.bitmap_names[context_id - W.META_ID_DIRTY_BITMAP],
                                   set())
            pos = offset
            for n, _ in self._runs(offset, length):
                yield n, W.STATE_DIRTY if pos // BLOCK in dirty else 0
                pos += n

    def write(self, offset: int, data: P.Buffer, fua: bool) -> None:
        self.data[offset:offset + len(data)] = data
        for blk in range(offset // BLOCK, (offset + len(data) + BLOCK - 1) // BLOCK):
            self.blocks[blk] = "data"

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                     fast: bool) -> None:
        self.data[offset:offset + length] = bytes(length)

    def trim(self, offset: int, length: int) -> None:
        return None

    def flush(self) -> None:
        self.flushes += 1

    def cache(self, offset: int, length: int) -> None:
        return None


class FakeTable:
    def __init__(self, *exports: FakeExport) -> None:
        self.exports = list(exports)

    def find_export(self, name: str) -> FakeExport | None:
        return next((e for e in self.exports if e.name == name), None)

    def list_exports(self) -> list[FakeExport]:
        return list(self.exports)


class Driver:
    """Feeds a ServerConnection and runs it until it needs data; requests are served."""

    def __init__(self, table: FakeTable, tls: bool = False) -> None:
        self.conn = P.ServerConnection(table, tls=tls)
        self.events: list[object] = []
        self.out = bytearray()
        self._drain()

    def _drain(self) -> None:
        while True:
            ev = self.conn.next_event()
            if ev is P.NEED_DATA:
                break
            self.events.append(ev)
            if isinstance(ev, P.Request):
                closed = self.conn.serve(ev)
                if closed is not None:
                    self.events.append(closed)
                    break
            elif isinstance(ev, P.Closed):
                break
        for buf in self.conn.data_to_send():
            self.out += buf

    def send(self, data: bytes) -> bytes:
        """Feed ``data``; return what the server sent in response."""
        start = len(self.out)
        self.conn.receive_data(data)
        self._drain()
        return bytes(self.out[start:])

    @property
    def closed(self) -> P.Closed | None:
        return next((e for e in self.events if isinstance(e, P.Closed)), None)


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of consecutive option replies."""
    out, pos = [], 0
    while pos < len(data):
        magic, opt, typ, n = W.OPTION_REPLY.unpack_from(data, pos)
        assert magic == W.OPT_REPLY_MAGIC, data[pos:].hex()
        out.append((opt, typ, data[pos + 20:pos + 20 + n]))
        pos += 20 + n
    return out


def chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(flags, type, handle, payload) of consecutive structured reply chunks."""
    out, pos = [], 0
    while pos < len(data):
        magic, flags, typ, handle, n = W.CHUNK_HEADER.unpack_from(data, pos)
        assert magic == W.STRUCTURED_REPLY_MAGIC, data[pos:].hex()
        out.append((flags, typ, handle, data[pos + 20:pos + 20 + n]))
        pos += 20 + n
    return out


def error_chunk(payload: bytes) -> tuple[int, str]:
    err, n = struct.unpack_from(">IH", payload)
    return err, payload[6:6 + n].decode()
