"""The dirty-bitmap operations behind the QMP commands, with QEMU 7.2's check order.

Each operation exists in two shapes: a direct call (what the plain QMP command does) and a
transaction action with prepare / commit / abort, because ``transaction`` rolls back
bitmap changes exactly and users rely on that atomicity.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .bitmap import CHECK_ALLOW_RO, CHECK_DEFAULT, DirtyBitmap, check_bitmap, merge_bitmaps
from .block import BlockGraph, Node
from .errors import SimError
from .transaction import Action


def default_granularity(node: Node) -> int:
    """Cluster size clamped to [4 KiB, 64 KiB]; 64 KiB when the driver has no clusters."""
    cs = node.cluster_size() if node.is_format else None
    if not cs:
        f = node.file
        cs = f.cluster_size() if (f is not None and node.drv == "raw") else None
    if not cs:
        return 65536
    return min(max(cs, 4096), 65536)


def lookup(graph: BlockGraph, node: str, name: str) -> tuple[Node, DirtyBitmap]:
    """QEMU's ``block_dirty_bitmap_lookup``: node first ("Node 'X' not found")."""
    bs = graph.find_backend(node)
    target = bs.root if bs is not None else None
    if target is None:
        target = graph.find_node(node)
    if target is None:
        raise SimError(f"Node '{node}' not found")
    bm = target.bitmaps.find(name)
    if bm is None:
        raise SimError(f"Dirty bitmap '{name}' not found")
    return target, bm


def _device_or_node_name(graph: BlockGraph, node: Node) -> str:
    for blk in graph.backends:
        if blk.root is node and blk.name:
            return blk.name
    return node.node_name


def add(graph: BlockGraph, node: str, name: str, granularity: int | None = None,
        persistent: bool = False, disabled: bool = False) -> DirtyBitmap:
    if not name:
        raise SimError("Bitmap name cannot be empty")
    bs = graph.lookup_bs(node, node)
    if granularity is not None:
        if granularity < 512 or granularity & (granularity - 1):
            raise SimError("Granularity must be power of 2 and at least 512")
    else:
        granularity = default_granularity(bs)
    if persistent:
        store_check = getattr(bs, "can_store_bitmap", None)
        if store_check is None:
            raise SimError(f"Can't store persistent bitmaps to "
                           f"{_device_or_node_name(graph, bs)}: Operation not supported")
        if bs.bitmaps.find(name) is not None:
            raise SimError(f"Bitmap already exists: {name}")
        problem = store_check(name, granularity)
        if problem:
            raise SimError(f"Can't make bitmap '{name}' persistent in "
                           f"'{_device_or_node_name(graph, bs)}': {problem}")
    bm = bs.bitmaps.create(bs.length(), granularity, name)
    bm.persistent = persistent
    if disabled:
        bm.enabled = False
    return bm


def remove(graph: BlockGraph, node: str, name: str, release: bool = True) -> DirtyBitmap:
    bs, bm = lookup(graph, node, name)
    check_bitmap(bm, CHECK_DEFAULT & ~_inconsistent_flag())
    if bm.persistent:
        remover = getattr(bs, "remove_persistent_bitmap", None)
        if remover is not None and release:
            remover(bm)
    if release:
        bs.bitmaps.remove(bm)
    return bm


def _inconsistent_flag() -> int:
    from .bitmap import CHECK_INCONSISTENT

    return int(CHECK_INCONSISTENT)


def clear(graph: BlockGraph, node: str, name: str) -> None:
    _, bm = lookup(graph, node, name)
    check_bitmap(bm, CHECK_DEFAULT)
    bm.clear()


def enable(graph: BlockGraph, node: str, name: str) -> None:
    _, bm = lookup(graph, node, name)
    check_bitmap(bm, CHECK_ALLOW_RO)
    bm.enabled = True


def disable(graph: BlockGraph, node: str, name: str) -> None:
    _, bm = lookup(graph, node, name)
    check_bitmap(bm, CHECK_ALLOW_RO)
    bm.enabled = False


def _merge_sources(graph: BlockGraph, bs: Node, bitmaps: list[Any]) -> Iterator[DirtyBitmap]:
    """Each source, looked up only when its turn comes (QEMU merges one, then looks up the
    next): a string names a bitmap on ``bs``, an object any node's bitmap."""
    for src in bitmaps:
        if isinstance(src, str):
            bm = bs.bitmaps.find(src)
            if bm is None:
                raise SimError(f"Dirty bitmap '{src}' not found")
        else:
            _, bm = lookup(graph, src["node"], src["name"])
        yield bm


def merge(graph: BlockGraph, node: str, target: str, bitmaps: list[Any]) -> DirtyBitmap | None:
    """Merge sources into target; returns a backup of target for rollback (None if unchanged)."""
    if not bitmaps:
        # QEMU 7.2 dereferences a NULL list here and crashes; refuse clearly instead.
        raise SimError("Parameter 'bitmaps' must contain at least one bitmap "
                       "(an empty list crashes QEMU 7.2)")
    bs, dst = lookup(graph, node, target)
    check_bitmap(dst, CHECK_DEFAULT)
    backup: DirtyBitmap | None = None
    try:
        for src in _merge_sources(graph, bs, bitmaps):
            if backup is None:
                backup = dst.copy()
            merge_bitmaps(dst, src)
    except SimError:
        if backup is not None:
            dst.restore_from(backup)
        raise
    return backup


def sha256(graph: BlockGraph, node: str, name: str) -> str:
    _, bm = lookup(graph, node, name)
    return bm.sha256()


# ----- transaction actions ---------------------------------------------------------------
# QEMU calls ``abort`` on every action that *started* prepare, including the one that
# failed, with whatever state it had filled in by then.  The actions below keep that
# exact partial-state behaviour (it is observable: a failed enable leaves the bitmap
# disabled), but never crash where QEMU 7.2 dereferences a NULL bitmap.

class BitmapAddAction(Action):
    kind = "block-dirty-bitmap-add"

    def prepare(self) -> None:
        self.bm: DirtyBitmap | None = None
        a = self.args
        self.bm = add(self.graph, a["node"], a["name"], a.get("granularity"),
                      a.get("persistent", False), a.get("disabled", False))
        self.node = self.graph.lookup_bs(a["node"], a["node"])

    def abort(self) -> None:
        bm = getattr(self, "bm", None)
        if bm is not None:
            self.node.bitmaps.remove(bm)


class BitmapRemoveAction(Action):
    kind = "block-dirty-bitmap-remove"

    def prepare(self) -> None:
        self.bm = None
        a = self.args
        node, bm = lookup(self.graph, a["node"], a["name"])
        remove(self.graph, a["node"], a["name"], release=False)
        self.node, self.bm = node, bm
        bm.busy = True
        bm.skip_store = True

    def commit(self) -> None:
        assert self.bm is not None
        self.bm.busy = False
        if self.bm.persistent:
            remover = getattr(self.node, "remove_persistent_bitmap", None)
            if remover is not None:
                remover(self.bm)
        self.node.bitmaps.remove(self.bm)

    def abort(self) -> None:
        bm = getattr(self, "bm", None)
        if bm is not None:
            bm.busy = False
            bm.skip_store = False


class BitmapClearAction(Action):
    kind = "block-dirty-bitmap-clear"

    def prepare(self) -> None:
        self.bm = None
        self.backup: DirtyBitmap | None = None
        a = self.args
        _, self.bm = lookup(self.graph, a["node"], a["name"])
        check_bitmap(self.bm, CHECK_DEFAULT)
        self.backup = self.bm.copy()
        self.bm.clear()

    def abort(self) -> None:
        backup = getattr(self, "backup", None)
        if backup is not None and self.bm is not None:
            self.bm.restore_from(backup)


class BitmapEnableAction(Action):
    kind = "block-dirty-bitmap-enable"
    target_state = True

    def prepare(self) -> None:
        self.bm = None
        # QEMU's state starts zeroed: was_enabled == False until the checks pass.
        self.was = False
        a = self.args
        _, self.bm = lookup(self.graph, a["node"], a["name"])
        check_bitmap(self.bm, CHECK_ALLOW_RO)
        self.was = self.bm.enabled
        self.bm.enabled = self.target_state

    def abort(self) -> None:
        bm = getattr(self, "bm", None)
        if bm is None:
            return  # QEMU 7.2 dereferences NULL here (SIGSEGV); nothing to undo
        if self.target_state and not self.was:
            bm.enabled = False
        elif not self.target_state and self.was:
            bm.enabled = True


class BitmapDisableAction(BitmapEnableAction):
    kind = "block-dirty-bitmap-disable"
    target_state = False


class BitmapMergeAction(Action):
    kind = "block-dirty-bitmap-merge"

    def prepare(self) -> None:
        self.bm = None
        self.backup = None
        a = self.args
        _, self.bm = lookup(self.graph, a["node"], a["target"])
        self.backup = merge(self.graph, a["node"], a["target"], a["bitmaps"])

    def abort(self) -> None:
        backup = getattr(self, "backup", None)
        if backup is not None and self.bm is not None:
            self.bm.restore_from(backup)


BITMAP_ACTIONS: dict[str, type[Action]] = {
    cls.kind: cls for cls in (BitmapAddAction, BitmapRemoveAction, BitmapClearAction,
                              BitmapEnableAction, BitmapDisableAction, BitmapMergeAction)
}
