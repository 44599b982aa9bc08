"""Pull-mode fleecing drivers: a user-created ``copy-before-write`` filter and
``snapshot-access`` on top of it (QEMU >= 7.0, the "fleecing-format" scheme).

The classic scheme (qcow2 scratch backed by the live node + ``blockdev-backup sync=none``)
needs nothing here: it is the backup job's own filter (see :mod:`.backup`).

Here the filter is opened by ``blockdev-add`` and stays until ``blockdev-del``.  A guest
reaches it after ``qom-set`` of its device's ``drive``; writes through it first copy the
old data of clusters not yet copied to ``target``.  ``snapshot-access`` reads the point in
time: copied clusters from the target, the rest from the (unchanged) source.  QEMU only
unshares write on the source once the filter has a parent, which is why the device must be
moved to the filter *before* snapshot-access is added (else: permission conflict).
"""

from __future__ import annotations

import errno
from typing import Any

from . import perm as P
from .backup import _BLOCK_SIZE_WARNING, DEFAULT_CLUSTER, CbwNode, _touches_files
from .bitmap import DirtyBitmap
from .block import BlockGraph, DriverSpec, Node, register_driver
from .blockstatus import layer_status
from .errors import SimError
from .zeroes import is_zero

_ON_CBW_ERROR = ("break-guest-write", "break-snapshot")


class CbwFilterNode(CbwNode):
    """``copy-before-write`` opened by the user: {file, target, bitmap?, on-cbw-error?,
    cbw-timeout?}.  Keeps QEMU's three bitmaps (copy on the source, done + access on the
    filter) so queries show what QEMU shows."""

    def __init__(self, graph: BlockGraph, options: dict[str, Any], source: Node,
                 target: Node) -> None:
        super().__init__(graph, source)
        self.options = options
        self.target = target
        self.on_cbw_error = str(options.get("on-cbw-error", "break-guest-write"))
        self.snapshot_broken = False
        size = source.length()
        sync = _find_sync_bitmap(graph, options.get("bitmap"))
        self.cluster = max(DEFAULT_CLUSTER, target.cluster_size() or 0)
        if (target.cluster_size() is None and target.backing is None
                and not _touches_files(target)):
            # block_copy_calculate_cluster_size, as for a backup job's filter
            graph.warn(_BLOCK_SIZE_WARNING)
        self.copy_bitmap = source.bitmaps.create(size, self.cluster)
        self.copy_bitmap.enabled = False
        if sync is None:
            self.copy_bitmap.set_dirty(0, size)
        else:
            for off, n in sync.dirty_extents(0, size):
                self.copy_bitmap.set_dirty(off, n)
        self.done_bitmap: DirtyBitmap | None = None
        self.access_bitmap: DirtyBitmap | None = None

    def opened(self) -> None:
        # created after the node is named (cbw_open order): done, then access
        size = self.source.length()
        self.done_bitmap = self.bitmaps.create(size, self.cluster)
        self.done_bitmap.enabled = False
        self.access_bitmap = self.bitmaps.create(size, self.cluster)
        self.access_bitmap.enabled = False
        self.access_bitmap.merge_from(self.copy_bitmap)

    @property
    def source(self) -> Node:
        e = self.children.get("file")
        return e.child if e else self._source

    @source.setter
    def source(self, node: Node) -> None:
        self._source = node

    def child_perms(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        if role == "target":
            # cbw_child_perms: the target is written, others may write it too
            return P.WRITE, P.WRITE_UNCHANGED | P.WRITE | P.CONSISTENT_READ
        nperm, nshared = perm, shared
        if self.parents:
            # only a filter with parents guards its source against writers behind it
            if perm & P.WRITE:
                nperm |= P.CONSISTENT_READ
            nshared &= ~(P.WRITE | P.RESIZE)
        return nperm, nshared

    def perms_with_parent(self, perm: int, shared: int) -> tuple[int, int]:
        """What the source edge would need once a parent holding (perm, shared) joins."""
        nperm = perm | (P.CONSISTENT_READ if perm & P.WRITE else 0)
        return nperm, shared & ~(P.WRITE | P.RESIZE)

    # ----- copy-before-write -------------------------------------------------------------
    def _cbw(self, offset: int, length: int) -> None:
        start = offset // self.cluster * self.cluster
        end = min(self.source.length(),
                  -(-(offset + length) // self.cluster) * self.cluster)
        if not self.snapshot_broken:
            for off, n in list(self.copy_bitmap.dirty_extents(start, end - start)):
                try:
                    data = self.source.read(off, n)
                    if not is_zero(data):
                        self.target.write(off, data)
                    else:
                        self.target.write_zeroes(off, n)
                except OSError:
                    if self.on_cbw_error == "break-guest-write":
                        raise
                    self.snapshot_broken = True
                    break
                self.copy_bitmap.reset_dirty(off, n)
        if self.done_bitmap is not None:
            self.done_bitmap.set_dirty(start, end - start)

    def _drv_write(self, offset: int, data: bytes) -> None:
        self._cbw(offset, len(data))
        self.source.write(offset, data)

    def _drv_write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._cbw(offset, length)
        self.source.write_zeroes(offset, length, unmap)

    def _drv_discard(self, offset: int, length: int) -> None:
        self._cbw(offset, length)
        self.source.discard(offset, length)

    def snapshot_read(self, offset: int, length: int) -> bytes:
        """cbw_co_preadv_snapshot as QEMU 7.2 does it: any cluster outside the access
        bitmap fails the read (EACCES); a range whose clusters were all copied is read
        from the target; otherwise the source is read from ``offset`` up to the first
        copied cluster *after the first uncopied one* -- so a read starting on a copied
        cluster and running into uncopied ones returns the guest's new data there (a
        QEMU 7.2 quirk, observed)."""
        assert self.access_bitmap is not None and self.done_bitmap is not None
        if self.snapshot_broken or self.access_bitmap.next_clean(offset, length) is not None:
            raise OSError(errno.EACCES, "Permission denied")
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            first_new = self.done_bitmap.next_clean(pos, end - pos)
            if first_new is None:
                out += self.target.read(pos, end - pos)
                break
            nxt = self.done_bitmap.next_dirty(first_new, end - first_new)
            stop = end if nxt is None else nxt
            out += self.source.read(pos, stop - pos)
            pos = stop
        return bytes(out)

    def snapshot_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        """cbw_co_snapshot_block_status: one layer's status (``bdrv_block_status``) of the
        child cbw_snapshot_read_lock picks.  That is the target only for a run of copied
        clusters reaching the end of the request: QEMU 7.2's ``hbitmap_status`` answers
        "not copied" for a copied run followed by uncopied clusters, so such a run answers
        from the *source* -- the guest's new data or zeroes (observed: an extent reported
        as zero that then reads the old data).  Outside the access bitmap: EACCES."""
        assert self.access_bitmap is not None and self.done_bitmap is not None
        if self.snapshot_broken or self.access_bitmap.next_clean(offset, length) is not None:
            raise OSError(errno.EACCES, "Permission denied")
        out: list[tuple[int, int, str]] = []
        pos, end = offset, offset + length
        while pos < end:
            if self.done_bitmap.is_dirty(pos):
                clean = self.done_bitmap.next_clean(pos, end - pos)
                child, stop = (self.target, end) if clean is None else (self.source, clean)
            else:
                nxt = self.done_bitmap.next_dirty(pos, end - pos)
                child, stop = self.source, end if nxt is None else nxt
            out.extend(layer_status(child, pos, stop - pos))
            pos = stop
        return out

    def close(self) -> None:
        if self.copy_bitmap in self._source.bitmaps:
            self._source.bitmaps.remove(self.copy_bitmap)
        super().close()


def _find_sync_bitmap(graph: BlockGraph, ref: Any) -> DirtyBitmap | None:
    """The ``bitmap`` option ({node, name}): QEMU's block_dirty_bitmap_lookup texts."""
    if ref is None:
        return None
    node = graph.find_node(ref["node"])
    if node is None:
        raise SimError(f"Node '{ref['node']}' not found")
    bm = node.bitmaps.find(ref["name"])
    if bm is None:
        raise SimError(f"Dirty bitmap '{ref['name']}' not found")
    return bm


class SnapshotAccessNode(Node):
    """``snapshot-access``: a read-only view of a cbw filter's point in time."""

    drv = "snapshot-access"
    is_filter = False
    #: no format: what the chosen child calls unallocated stays unallocated (not zero)
    supports_backing = False

    def __init__(self, graph: BlockGraph, options: dict[str, Any], cbw: Node) -> None:
        super().__init__(graph, options)
        # QEMU accepts any file child; reads then fail (bdrv_co_preadv_snapshot: ENOTSUP)
        self.cbw = cbw

    def length(self) -> int:
        return self.cbw.length()

    def exact_filename(self) -> str | None:
        return self.cbw.filename()

    def has_get_info(self) -> bool:
        return False

    def child_perms(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        return 0, P.ALL

    def _drv_read(self, offset: int, length: int) -> bytes:
        if not isinstance(self.cbw, CbwFilterNode):
            raise OSError(errno.ENOTSUP, "Operation not supported")
        return self.cbw.snapshot_read(offset, length)

    def _drv_write(self, offset: int, data: bytes) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    def _drv_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        if not isinstance(self.cbw, CbwFilterNode):
            raise OSError(errno.ENOTSUP, "Operation not supported")
        return self.cbw.snapshot_block_status(offset, length)


def _precheck_cbw(options: dict[str, Any]) -> None:
    if "on-cbw-error" in options and options["on-cbw-error"] not in _ON_CBW_ERROR:
        raise SimError(f"Parameter 'on-cbw-error' does not accept value "
                       f"'{options['on-cbw-error']}'")


def _open_cbw(graph: BlockGraph, options: dict[str, Any], ch: dict[str, Node]) -> Node:
    return CbwFilterNode(graph, options, ch["file"], ch["target"])


def _open_snapshot_access(graph: BlockGraph, options: dict[str, Any],
                          ch: dict[str, Node]) -> Node:
    cbw = ch["file"]
    if isinstance(cbw, CbwFilterNode) and not cbw.parents:
        # the filter's first parent makes it unshare write on its source
        src_edge = cbw.children["file"]
        nperm, nshared = cbw.perms_with_parent(0, P.ALL)
        others = [e.edge_perms() for e in src_edge.child.parents if e is not src_edge]
        P.check_conflicts(others, P.EdgePerms(nperm, nshared, cbw.describe(),
                                              src_edge.child.node_name, "file"))
    return SnapshotAccessNode(graph, options, cbw)


register_driver("copy-before-write",
                DriverSpec(_open_cbw, ("file", "target"), precheck=_precheck_cbw))
register_driver("snapshot-access", DriverSpec(_open_snapshot_access, ("file",)))
