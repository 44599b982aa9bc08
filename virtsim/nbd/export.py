"""An NBD export over a block node: what ``protocol.ServerConnection`` reads and writes.

QEMU's ``NBDExport`` on top of a BlockBackend: the size is the node's length rounded
down to 512, the transmission flags follow ``nbd_export_create``, reads and block status
go through the node's whole chain (a fleecing scratch image falls through to the live
disk), and each exported dirty bitmap becomes a ``qemu:dirty-bitmap:NAME`` context.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..sim.blockstatus import status_above
from . import wire as W

if TYPE_CHECKING:
    from ..sim.bitmap import DirtyBitmap
    from ..sim.block import Edge, Node

Buffer = bytes | bytearray | memoryview

#: the largest request a file-backed node takes in one go (blk_get_max_transfer: no limit)
_MAX_TRANSFER = 0x7FFFFFFF


def export_flags(writable: bool, multi_conn: bool) -> int:
    """``nbd_export_create``'s flags (SEND_DF is added per client with structured replies):
    0x50f read-only, 0xd6d writable, CAN_MULTI_CONN unless max-connections is 1."""
    flags = W.TF_HAS_FLAGS | W.TF_SEND_FLUSH | W.TF_SEND_FUA | W.TF_SEND_CACHE
    if multi_conn:
        flags |= W.TF_CAN_MULTI_CONN
    if writable:
        flags |= W.TF_SEND_TRIM | W.TF_SEND_WRITE_ZEROES | W.TF_SEND_FAST_ZERO
    else:
        flags |= W.TF_READ_ONLY
    return flags


class NbdExport:
    """One NBD export (the block-export ``id`` is kept by the QMP layer's registry)."""

    def __init__(self, *, export_id: str, name: str, description: str | None,
                 node: Node, edge: Edge | None, writable: bool, multi_conn: bool,
                 bitmaps: list[DirtyBitmap], bitmap_names: list[str],
                 allocation_depth: bool, frozen: list[bool] | None = None) -> None:
        self.id = export_id
        self.name = name
        self.description = description
        self.node = node
        self.edge = edge
        self.writable = writable
        self.size = node.length() // 512 * 512
        self.nbdflags = export_flags(writable, multi_conn)
        self.bitmaps = bitmaps
        self.bitmap_names = bitmap_names
        #: bitmaps that cannot change while exported (busy; disabled, or on a read-only
        #: node): their dirty ranges are listed once
        self.frozen = frozen if frozen is not None else [not bm.enabled for bm in bitmaps]
        self.allocation_depth = allocation_depth
        #: connected clients (anything with ``close()``); each holds a reference
        self.clients: set[Any] = set()
        self.shutting_down = False
        self._bm_ranges: dict[int, tuple[list[int], list[int]]] = {}
        #: called before every read (seam for scenarios that act "at an NBD read")
        self.read_hooks: list[Callable[[NbdExport, int, int], None]] = []

    # ----- Export protocol --------------------------------------------------------------
    def request_alignment(self) -> int:
        return 1

    def max_transfer(self) -> int:
        return _MAX_TRANSFER

    def read(self, offset: int, length: int) -> Buffer:
        for hook in self.read_hooks:
            hook(self, offset, length)
        return self.node.read(offset, length)

    def read_map(self, offset: int, length: int) -> Iterator[tuple[int, bool]]:
        for st in status_above(self.node, offset, length):
            yield st.length, st.zero

    def status_runs(self, context_id: int, offset: int,
                    length: int) -> Iterator[tuple[int, int]]:
        if context_id == W.META_ID_BASE_ALLOCATION:
            for st in status_above(self.node, offset, length):
                yield st.length, ((0 if st.data else W.STATE_HOLE)
                                  | (W.STATE_ZERO if st.zero else 0))
        elif context_id == W.META_ID_ALLOCATION_DEPTH:
            for st in status_above(self.node, offset, length):
                yield st.length, st.depth if st.allocated else 0
        else:
            yield from self._bitmap_runs(context_id - W.META_ID_DIRTY_BITMAP, offset, length)

    def status_flat(self, context_id: int, offset: int, length: int,
                    limit: int) -> list[int] | None:
        """A block status chunk's extents as a flat [length, flags, ...] list, already
        merged and cut to ``limit``, for a frozen exported bitmap (None: use status_runs).
        List slicing instead of a loop per extent: a 1 TiB map with thousands of dirty
        areas costs about what QEMU's C loop costs."""
        i = context_id - W.META_ID_DIRTY_BITMAP
        if i < 0 or not self.frozen[i]:
            return None
        starts, ends = self._ranges(i)
        pos, end = offset, offset + length
        k0 = bisect.bisect_right(ends, pos)
        k1 = bisect.bisect_left(starts, end)
        if k0 >= k1:
            return [length, 0]
        b = [0] * (2 * (k1 - k0) + 2)
        b[0], b[-1] = pos, end
        b[1:-1:2] = starts[k0:k1]
        b[2:-1:2] = ends[k0:k1]
        b[1] = max(b[1], pos)
        b[-2] = min(b[-2], end)
        lengths = [y - x for x, y in zip(b, b[1:], strict=False)]
        flags = [0, W.STATE_DIRTY] * (len(lengths) // 2) + [0]
        first = 1 if lengths[0] == 0 else 0
        last = len(lengths) - (1 if lengths[-1] == 0 else 0)
        lengths, flags = lengths[first:last], flags[first:last]
        out = [0] * (2 * len(lengths))
        out[0::2] = lengths
        out[1::2] = flags
        return out[:2 * limit]

    def _ranges(self, i: int) -> tuple[list[int], list[int]]:
        cached = self._bm_ranges.get(i)
        if cached is None:
            cached = self._bm_ranges[i] = self.bitmaps[i].dirty_ranges()
        return cached

    def _bitmap_runs(self, i: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """A disabled bitmap cannot change while exported (it is busy), so its dirty
        ranges are listed once and each request only slices them."""
        bm = self.bitmaps[i]
        if not self.frozen[i]:
            yield from _bitmap_runs(bm, offset, length)
            return
        starts, ends = self._ranges(i)
        pos, end = offset, offset + length
        k = bisect.bisect_right(ends, pos)
        while k < len(starts) and starts[k] < end:
            a, b = max(starts[k], pos), min(ends[k], end)
            if a > pos:
                yield a - pos, 0
            yield b - a, W.STATE_DIRTY
            pos = b
            k += 1
        if end > pos:
            yield end - pos, 0

    def write(self, offset: int, data: Buffer, fua: bool) -> None:
        self.node.write(offset, bytes(data))
        if fua:
            self.node.flush()

    def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                     fast: bool) -> None:
        if fast and self._zeroing_needs_write(offset, length):
            # BDRV_REQ_NO_FALLBACK: qcow2 cannot zero part of an allocated cluster
            # without writing it, so QEMU refuses instead of being slow
            raise OSError(errno.ENOTSUP, "Operation not supported")
        self.node.write_zeroes(offset, length, unmap=may_unmap)
        if fua:
            self.node.flush()

    def _zeroing_needs_write(self, offset: int, length: int) -> bool:
        cluster = self.node.cluster_size() if self.node.drv == "qcow2" else None
        if not cluster or not length:
            return False
        end = offset + length
        partial = []
        if offset % cluster:
            partial.append(offset // cluster * cluster)
        if end % cluster:
            partial.append(end // cluster * cluster)
        for start in partial:
            n = min(cluster, self.node.length() - start)
            if any(kind == "data" for _o, _n, kind in self.node.block_status(start, n)):
                return True
        return False

    def trim(self, offset: int, length: int) -> None:
        self.node.discard(offset, length)

    def flush(self) -> None:
        self.node.flush()

    def cache(self, offset: int, length: int) -> None:
        return None


def _bitmap_runs(bm: DirtyBitmap, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """``bitmap_to_extents``: alternating clean/dirty runs (1 = dirty)."""
    pos, end = offset, offset + length
    for off, n in bm.dirty_extents(offset, length):
        if off > pos:
            yield off - pos, 0
        yield n, W.STATE_DIRTY
        pos = off + n
    if end > pos:
        yield end - pos, 0
