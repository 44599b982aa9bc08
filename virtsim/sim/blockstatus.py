"""Block status through a chain: QEMU's ``bdrv_block_status_above`` and
``bdrv_is_allocated_above`` over the layer-only answers of each node's ``block_status``.

An NBD server asks this for every sparse read and for the ``base:allocation`` and
``qemu:allocation-depth`` contexts; a fleecing export (a scratch image whose backing is
the live disk) is exactly the case where the answer comes from two layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from .image.extent import DATA, UNALLOCATED, ZERO

if TYPE_CHECKING:
    from .block import Node


class Status(NamedTuple):
    """One run: ``allocated`` is BDRV_BLOCK_ALLOCATED (then ``depth`` is the layer that
    holds it, 1 = the top); ``data``/``zero`` are BDRV_BLOCK_DATA/ZERO."""

    length: int
    allocated: bool
    data: bool
    zero: bool
    depth: int


def _below(node: Node) -> Node | None:
    """``bdrv_filter_or_cow_bs``: the backing image, or a filter's filtered child."""
    if node.backing is not None:
        return node.backing
    return node.file if node.is_filter else None


def _supports_backing(node: Node) -> bool:
    """``drv->supports_backing``: format drivers; a node that answers "unallocated" without
    being one (snapshot-access) leaves the area neither allocated nor zero."""
    return bool(getattr(node, "supports_backing", True))


def layer_status(node: Node, offset: int, length: int) -> Iterator[tuple[int, int, str]]:
    """``bdrv_block_status``: one layer's answer as its parent gets it (want_zero), i.e.
    filters answer for their child, and an unallocated area of a format node reads as
    ZERO when nothing is below it (or the backing ends before it)."""
    if node.is_filter and node.file is not None and node.backing is None:
        yield from layer_status(node.file, offset, length)
        return
    for off, n, kind in node.block_status(offset, length):
        if n <= 0:
            continue
        if kind != UNALLOCATED or not _supports_backing(node):
            yield off, n, kind
            continue
        below = node.backing
        within = 0 if below is None else max(0, min(n, below.length() - off))
        if within:
            yield off, within, UNALLOCATED
        if n > within:
            yield off + within, n - within, ZERO


def status_above(node: Node, offset: int, length: int, depth: int = 1) -> Iterator[Status]:
    """Runs covering [offset, offset+length) as seen through ``node``'s chain.

    Unallocated areas of the bottom layer read as zeroes (QEMU's want_zero answer for a
    format node without backing); areas beyond a shorter backing read as zeroes too.  A
    node that is no format (snapshot-access) reports its unallocated areas as such.
    """
    for off, n, kind in node.block_status(offset, length):
        if n <= 0:
            continue
        if kind == DATA:
            yield Status(n, True, True, False, depth)
            continue
        if kind == ZERO:
            yield Status(n, True, False, True, depth)
            continue
        below = _below(node)
        if below is None:
            yield Status(n, False, False, _supports_backing(node), depth)
            continue
        within = max(0, min(n, below.length() - off))
        if within:
            yield from status_above(below, off, within, depth + 1)
        if n > within:
            # the top layer defers to a layer that ends early: zeroes, allocated there
            yield Status(n - within, True, False, True, depth + 1)
