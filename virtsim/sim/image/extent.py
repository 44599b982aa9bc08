"""Allocation extents reported by the image formats' ``block_status``.

Each format reports only its own layer (like a QEMU driver's ``bdrv_co_block_status``):
the block layer decides what UNALLOCATED means by asking the backing node.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class ExtentKind(enum.StrEnum):
    """What one extent of a layer holds; a StrEnum so ``str(kind)`` is the plain word."""

    DATA = "data"
    ZERO = "zero"
    UNALLOCATED = "unallocated"


DATA = ExtentKind.DATA
ZERO = ExtentKind.ZERO
UNALLOCATED = ExtentKind.UNALLOCATED


class Extent(NamedTuple):
    """``(offset, length, kind, host_offset)``; host_offset is set where QEMU reports one."""

    offset: int
    length: int
    kind: ExtentKind
    host_offset: int | None = None


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Join neighbours of the same kind whose host offsets (if any) are contiguous too."""
    out: list[Extent] = []
    for e in extents:
        if e.length <= 0:
            continue
        if out:
            p = out[-1]
            if p.kind == e.kind and p.offset + p.length == e.offset:
                if p.host_offset is None and e.host_offset is None:
                    out[-1] = Extent(p.offset, p.length + e.length, p.kind, None)
                    continue
                if (p.host_offset is not None and e.host_offset is not None
                        and p.host_offset + p.length == e.host_offset):
                    out[-1] = Extent(p.offset, p.length + e.length, p.kind, p.host_offset)
                    continue
        out.append(e)
    return out
