"""The block graph: nodes (BlockDriverStates), the edges between them, and BlockBackends.

This mirrors QEMU's block layer closely enough that the observable behaviour matches:
node naming and auto-names, the order in which options are checked, permissions between
parents, which node a write dirties, what ``query-named-block-nodes`` reports.  Drivers
are small subclasses of :class:`Node`; formats delegate the on-disk work to
``virtsim.sim.image``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterator
from typing import Any, cast

from . import perm as P
from .bitmap import BitmapList, DirtyBitmap
from .errors import SimError
from .qjson import dumps as to_json

SECTOR = 512
NODE_NAME_MAX = 31

_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")


def id_wellformed(name: str) -> bool:
    """QEMU's util/id.c rule for node names, job ids and export ids."""
    return bool(_ID_RE.match(name))


def round_up_sector(n: int) -> int:
    return (n + SECTOR - 1) // SECTOR * SECTOR


# Extents returned by block_status: (offset, length, kind)
DATA = "data"
ZERO = "zero"
UNALLOCATED = "unallocated"

WriteHook = Callable[["Node", int, int], None]


class Edge:
    """A parent -> child link (QEMU's BdrvChild) with the permissions the parent holds."""

    def __init__(self, parent: Node | BlockBackend, child: Node, role: str) -> None:
        self.parent = parent
        self.child = child
        self.role = role
        self.perm = 0
        self.shared = P.ALL

    def describe_parent(self) -> str:
        return self.parent.describe()

    def edge_perms(self) -> P.EdgePerms:
        return P.EdgePerms(self.perm, self.shared, self.parent.describe(),
                           self.child.node_name, self.role)


class Node:
    """A BlockDriverState.  Subclasses implement the ``_drv_*`` hooks."""

    drv = "?"
    is_format = False
    is_filter = False

    def __init__(self, graph: BlockGraph, options: dict[str, Any]) -> None:
        self.graph = graph
        self.options = options
        self.node_name = ""
        self.auto_named = False
        self.monitor_owned = False
        self.read_only = bool(options.get("read-only", False))
        self.auto_read_only = bool(options.get("auto-read-only", False))
        self.detect_zeroes = str(options.get("detect-zeroes", "off"))
        self.children: dict[str, Edge] = {}
        self.parents: list[Edge] = []
        self.bitmaps = BitmapList()
        self.closed = False
        # Hooks called before a write reaches this node (copy-before-write, fault injection).
        self.before_write: list[WriteHook] = []
        self.op_blockers: list[str] = []
        # QEMU's write_gen/flushed_gen: a flush reaches the disk only after new writes
        self.write_gen = 0
        self.flushed_gen = 0

    def opened(self) -> None:
        """Called once the node is named and its children are attached."""
        return None

    # ----- identity -------------------------------------------------------------------
    def describe(self) -> str:
        return f"node '{self.node_name}'"

    @property
    def file(self) -> Node | None:
        e = self.children.get("file")
        return e.child if e else None

    @property
    def backing(self) -> Node | None:
        e = self.children.get("backing")
        return e.child if e else None

    def length(self) -> int:
        raise NotImplementedError

    def filename(self) -> str:
        """QEMU's ``bs->filename``: a real path when one describes the node, else json:{}."""
        exact = self.exact_filename()
        if exact is not None and not self.backing_overridden():
            return exact
        return "json:" + to_json(self.full_options())

    def exact_filename(self) -> str | None:
        """The plain filename that describes this node by itself, if there is one."""
        return None

    def strong_options(self) -> dict[str, Any]:
        """Driver options that change what the node shows (QEMU's strong_runtime_opts)."""
        return {}

    def full_options(self) -> dict[str, Any]:
        """QEMU's ``full_open_options``: enough to open the same node again."""
        out: dict[str, Any] = {"driver": self.drv, **self.strong_options()}
        for role, edge in self.children.items():
            if role == "backing" and not self.backing_overridden():
                continue
            out[role] = edge.child.full_options()
        if self.backing is None and self.backing_overridden():
            out["backing"] = None
        return out

    def backing_overridden(self) -> bool:
        return False

    # ----- I/O (public entry points: what a BdrvChild request does) -------------------
    def _check_request(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.length():
            raise OSError(5, "Input/output error")

    def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        self._check_request(offset, length)
        return self._drv_read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check_request(offset, len(data))
        self._check_writable()
        for hook in self.before_write:
            hook(self, offset, len(data))
        try:
            self._drv_write(offset, data)
        finally:
            self.write_gen += 1
            self.set_dirty(offset, len(data))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_request(offset, length)
        self._check_writable()
        for hook in self.before_write:
            hook(self, offset, length)
        try:
            self._drv_write_zeroes(offset, length, unmap)
        finally:
            self.write_gen += 1
            self.set_dirty(offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Discards are dropped (and dirty nothing) unless the node has discard=unmap."""
        self._check_request(offset, length)
        self._check_writable()
        if self.options.get("discard") != "unmap":
            return
        for hook in self.before_write:
            hook(self, offset, length)
        try:
            self._drv_discard(offset, length)
        finally:
            self.write_gen += 1
            self.set_dirty(offset, length)

    def flush(self) -> None:
        primary = self.file
        if primary is not None:  # bdrv_co_flush raises these on the primary child
            primary.debug_event("flush_to_os")
            if self.write_gen != self.flushed_gen and not self.read_only:
                primary.debug_event("flush_to_disk")
        self.flushed_gen = self.write_gen
        self._drv_flush()
        for edge in self.children.values():
            edge.child.flush()

    def debug_event(self, event: str) -> None:
        """QEMU's ``bdrv_debug_event`` (BlkdebugEvent name): only blkdebug reacts."""
        return None

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        """Allocation of [offset, offset+length) in *this* layer."""
        return self._drv_block_status(offset, length)

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(1, "Operation not permitted")

    def set_dirty(self, offset: int, length: int) -> None:
        self.bitmaps.set_dirty(offset, length)

    # ----- driver hooks --------------------------------------------------------------
    def _drv_read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def _drv_write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def _drv_write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._drv_write(offset, bytes(length))

    def _drv_discard(self, offset: int, length: int) -> None:
        return None

    def _drv_flush(self) -> None:
        return None

    def _drv_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        return [(offset, length, DATA)]

    def close(self) -> None:
        self.closed = True

    # ----- permissions ---------------------------------------------------------------
    def cumulative_perms(self) -> tuple[int, int]:
        perm, shared = 0, P.ALL
        for e in self.parents:
            perm |= e.perm
            shared &= e.shared
        return perm, shared

    def child_perms(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        """What this node asks of a child in ``role``, given what its parents ask of it."""
        if role == "backing":
            nperm = perm & P.CONSISTENT_READ
            nshared = (P.WRITE | P.RESIZE) if shared & P.WRITE else 0
            return nperm, nshared | P.CONSISTENT_READ | P.WRITE_UNCHANGED
        if self.is_format and role == "file":
            nperm = perm | P.CONSISTENT_READ
            if not self.read_only:
                nperm |= P.WRITE | P.RESIZE
            return nperm, shared & ~(P.WRITE | P.RESIZE)
        return perm, shared

    # ----- introspection ----------------------------------------------------------------
    def format_specific(self) -> dict[str, Any] | None:
        return None

    def image_info(self, flat: bool) -> dict[str, Any]:
        """ImageInfo, members in QAPI schema order (the serialiser applies QDict order)."""
        info: dict[str, Any] = {"filename": self.filename(), "format": self.drv}
        if self.has_get_info():
            info["dirty-flag"] = False
        asz = self.actual_size()
        if asz is not None:  # QEMU omits it when a protocol (blkdebug) cannot tell
            info["actual-size"] = asz
        info["virtual-size"] = self.length()
        cs = self.cluster_size()
        if cs:
            info["cluster-size"] = cs
        bf = self.backing_filename()
        if bf is not None:
            info["backing-filename"] = bf
            info["full-backing-filename"] = self.full_backing_filename() or bf
            fmt = self.backing_format()
            if fmt:
                info["backing-filename-format"] = fmt
        if not flat and self.backing is not None:
            info["backing-image"] = self.backing.image_info(flat)
        fs = self.format_specific()
        if fs is not None:
            info["format-specific"] = fs
        return info

    def has_get_info(self) -> bool:
        return True

    def cluster_size(self) -> int | None:
        return None

    def actual_size(self) -> int | None:
        f = self.file
        return f.actual_size() if f else 0

    def backing_filename(self) -> str | None:
        return None

    def full_backing_filename(self) -> str | None:
        return None

    def backing_format(self) -> str | None:
        return None

    def backing_depth(self) -> int:
        depth, node = 0, self.backing
        while node is not None:
            depth += 1
            node = node.backing
        return depth

    def device_info(self, flat: bool) -> dict[str, Any]:
        """BlockDeviceInfo as in query-named-block-nodes / query-block's ``inserted``."""
        info: dict[str, Any] = {"file": self.filename(), "node-name": self.node_name,
                                "ro": self.read_only, "drv": self.drv}
        if self.backing is not None:
            info["backing_file"] = self.backing.filename()
        info.update({"backing_file_depth": 0 if flat else self.backing_depth(),
                     "encrypted": False,
                     "detect_zeroes": self.detect_zeroes,
                     "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
                     "image": self.image_info(flat),
                     "cache": {"writeback": True, "direct": False, "no-flush": False},
                     "write_threshold": 0})
        bms = self.bitmaps.infos()
        if bms:
            info["dirty-bitmaps"] = bms
        return info

    def iter_chain(self) -> Iterator[Node]:
        node: Node | None = self
        while node is not None:
            yield node
            node = node.backing or (node.file if node.is_filter else None)


class FileNode(Node):
    """``driver: file`` — a host file through a Store."""

    drv = "file"

    def __init__(self, graph: BlockGraph, options: dict[str, Any]) -> None:
        super().__init__(graph, options)
        from .image.store import FileStore

        path = str(options["filename"])
        self.path = path
        if not path:
            raise SimError("The 'file' block driver requires a file name")
        try:
            self.store = FileStore(path, readonly=self.read_only)
        except FileNotFoundError:
            raise SimError(f"Could not open '{path}': No such file or directory") from None
        except PermissionError:
            if self.auto_read_only and not self.read_only:
                self.read_only = True
                self.store = FileStore(path, readonly=True)
            else:
                raise SimError(f"Could not open '{path}': Permission denied") from None
        except IsADirectoryError:
            raise SimError(f"Could not open '{path}': Is a directory") from None

        from .filelock import ImageLock

        self.lock = ImageLock(self.store.fd) if options.get("locking", "auto") != "off" else None

    def apply_lock(self, perm: int, shared: int) -> None:
        if self.lock is not None and not self.closed:
            self.lock.apply(perm, shared)

    def exact_filename(self) -> str | None:
        return self.path

    def strong_options(self) -> dict[str, Any]:
        return {"filename": self.path}

    def length(self) -> int:
        return round_up_sector(self.store.size())

    def actual_size(self) -> int:
        return self.store.allocated_bytes()

    def _check_request(self, offset: int, length: int) -> None:
        # the file protocol grows on writes past EOF (qcow2 allocation relies on it)
        if offset < 0 or length < 0:
            raise OSError(22, "Invalid argument")

    def _drv_read(self, offset: int, length: int) -> bytes:
        return self.store.pread(offset, length)

    def _drv_write(self, offset: int, data: bytes) -> None:
        self.store.pwrite(offset, data)

    def _drv_write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if unmap:
            self.store.punch_hole(offset, length)
        else:
            self.store.zero_range(offset, length)

    def _drv_discard(self, offset: int, length: int) -> None:
        if self.options.get("discard") == "unmap":
            self.store.punch_hole(offset, length)

    def _drv_flush(self) -> None:
        self.store.flush()

    def _drv_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        return [(o, n, DATA if d else ZERO) for o, n, d in self.store.data_extents(offset, length)]

    def truncate(self, size: int) -> None:
        self.store.truncate(size)

    def close(self) -> None:
        if not self.closed:
            self.store.close()
        super().close()


class NullNode(Node):
    """``driver: null-co`` / ``null-aio``: reads return garbage-or-zeroes, writes vanish."""

    drv = "null-co"

    def __init__(self, graph: BlockGraph, options: dict[str, Any]) -> None:
        super().__init__(graph, options)
        self.drv = str(options.get("driver", "null-co"))
        size = int(options.get("size", 1 << 30))
        if size < 0:
            # QEMU 7.2 aborts on this (assertion in the block layer); refuse it instead.
            raise SimError("Parameter 'size' expects a non-negative number below 2^64")
        self.size = round_up_sector(size)
        self.read_zeroes = bool(options.get("read-zeroes", False))

    def strong_options(self) -> dict[str, Any]:
        return {k: self.options[k] for k in ("size", "read-zeroes", "latency-ns")
                if k in self.options}

    def exact_filename(self) -> str | None:
        return None if self.strong_options() else f"{self.drv}://"

    def has_get_info(self) -> bool:
        return False

    def length(self) -> int:
        return self.size

    def _drv_read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def _drv_write(self, offset: int, data: bytes) -> None:
        return None

    def _drv_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        return [(offset, length, ZERO if self.read_zeroes else DATA)]


class RawNode(Node):
    """``driver: raw`` with optional ``offset``/``size`` window onto its file."""

    drv = "raw"
    is_format = True

    def __init__(self, graph: BlockGraph, options: dict[str, Any], file: Node) -> None:
        super().__init__(graph, options)
        self.offset = int(options.get("offset", 0))
        flen = file.length()
        if "size" in options:
            size = int(options["size"])
            if self.offset + size > flen:
                raise SimError(
                    f"The sum of offset ({self.offset}) and size ({size}) has to be smaller or "
                    f"equal to the  actual size of the containing file ({flen})")
            self.size: int | None = size
        else:
            if self.offset > flen:
                raise SimError(f"Offset ({self.offset}) cannot be greater than size of the "
                               f"containing file ({flen})")
            self.size = None

    def has_get_info(self) -> bool:
        f = self.file
        return f.has_get_info() if f else False

    def strong_options(self) -> dict[str, Any]:
        return {k: self.options[k] for k in ("offset", "size") if k in self.options}

    def exact_filename(self) -> str | None:
        if self.strong_options():
            return None
        f = self.file
        return f.exact_filename() if f else None

    def length(self) -> int:
        f = self.file
        assert f is not None
        if self.size is not None:
            return round_up_sector(self.size)
        return round_up_sector(max(0, f.length() - self.offset))

    def child_perms(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        return perm, shared  # raw is a pass-through

    def _f(self) -> Node:
        f = self.file
        assert f is not None
        return f

    def _drv_read(self, offset: int, length: int) -> bytes:
        self._f().debug_event("read_aio")
        return self._f().read(self.offset + offset, length)

    def _drv_write(self, offset: int, data: bytes) -> None:
        self._f().debug_event("write_aio")
        self._f().write(self.offset + offset, data)

    def _drv_write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._f().write_zeroes(self.offset + offset, length, unmap)

    def _drv_discard(self, offset: int, length: int) -> None:
        self._f().discard(self.offset + offset, length)

    def _drv_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        return [(o - self.offset, n, k)
                for o, n, k in self._f().block_status(self.offset + offset, length)]


class NodeStore:
    """Adapts a child node to the Store interface the image formats expect."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.readonly = node.read_only
        self.filename = node.filename()

    def pread(self, offset: int, length: int) -> bytes:
        size = self.size()
        if offset >= size:
            return bytes(length)
        if offset + length > size:
            return self.node.read(offset, size - offset) + bytes(offset + length - size)
        return self.node.read(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if type(self.node) is FileNode:
            # a file node hands any buffer to pwrite(2) as it is: no copy of every cluster
            # a format writes (Node.write only needs len() of it)
            self.node.write(offset, cast(bytes, data))
        else:
            self.node.write(offset, bytes(data))

    def size(self) -> int:
        n = self.node
        if isinstance(n, FileNode):
            return n.store.size()
        return n.length()

    def truncate(self, size: int) -> None:
        if isinstance(self.node, FileNode):
            self.node.truncate(size)

    def flush(self) -> None:
        self.node.flush()

    def punch_hole(self, offset: int, length: int) -> None:
        self.node.write_zeroes(offset, length, unmap=True)

    def zero_range(self, offset: int, length: int) -> None:
        self.node.write_zeroes(offset, length, unmap=False)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(o, n, k == DATA) for o, n, k in self.node.block_status(offset, length)]

    def allocated_bytes(self) -> int:
        return self.node.actual_size() or 0

    def close(self) -> None:
        return None


class Qcow2Node(Node):
    """``driver: qcow2`` over a file child, with an optional backing node."""

    drv = "qcow2"
    is_format = True

    def __init__(self, graph: BlockGraph, options: dict[str, Any], file: Node) -> None:
        super().__init__(graph, options)
        from .image.qcow2 import Qcow2Format

        self.store = NodeStore(file)
        self.fmt = Qcow2Format.open(self.store, readonly=self.read_only)
        self.fmt.debug_event = file.debug_event
        self.fmt.pass_discard_request = options.get("discard") == "unmap"
        self.fmt.file_discard = file.options.get("discard") == "unmap"
        self.auto_backing_file = str(self.fmt.backing_file or "")
        self._load_persistent_bitmaps()

    # ----- persistent bitmaps (the qcow2 bitmaps extension) -----------------------------
    def _load_persistent_bitmaps(self) -> None:
        """Load stored bitmaps; a writable open marks them in-use on disk, like QEMU.

        A bitmap already marked in-use was not stored cleanly (the process died), so it
        loads as inconsistent and stays so until removed.
        """
        stored = list(self.fmt.stored_bitmaps())
        self._kept_auto: dict[str, bool] = {}
        if not stored:
            return
        length = self.length()
        for sb in stored:  # each one goes to the head of the list: reverse directory order
            bm = DirtyBitmap(length, sb.granularity, sb.name)
            bm.persistent = True
            if sb.in_use:
                bm.inconsistent = True
                bm.enabled = False
                self._kept_auto[sb.name] = bool(sb.auto)  # on-disk flags stay as found
            else:
                bm.set_granules(self.fmt.load_bitmap(sb.name))
                bm.enabled = bool(sb.auto)
            if self.read_only:
                bm.readonly = True
            self.bitmaps.add(bm)
        if not self.read_only:
            self.fmt.set_bitmaps_in_use(True)

    def can_store_bitmap(self, name: str, granularity: int) -> str | None:
        """Why a new persistent bitmap could not be stored here, or None."""
        check = getattr(self.fmt, "can_store_bitmap", None)
        if check is None:
            return None
        names = [b.name for b in self.bitmaps.all() if b.persistent and b.name]
        result = check(name, granularity, names)
        return str(result) if result else None

    def remove_persistent_bitmap(self, bm: DirtyBitmap) -> None:
        if self.read_only:
            return
        self._store_bitmaps(exclude=bm, in_use=True)

    def _store_bitmaps(self, exclude: DirtyBitmap | None = None, in_use: bool = False) -> None:
        """Write the bitmap directory like QEMU: bitmaps already on disk keep their place,
        new ones are appended in list order (newest first)."""
        mine = [bm for bm in self.bitmaps.all()
                if bm.persistent and bm is not exclude and bm.name is not None
                and not bm.skip_store]
        by_name = {bm.name: bm for bm in mine}
        on_disk = [sb.name for sb in self.fmt.stored_bitmaps()]
        order = [by_name[n] for n in on_disk if n in by_name]
        order += [bm for bm in mine if bm.name not in on_disk]
        entries = []
        for bm in order:
            assert bm.name is not None
            keep = bm.inconsistent or bm.readonly
            auto = self._kept_auto.get(bm.name, bm.enabled) if bm.inconsistent else bm.enabled
            entries.append((bm.name, bm.granularity, auto, in_use or bm.inconsistent,
                            None if keep else bm.granules()))
        if entries or on_disk:
            self.fmt.store_bitmaps(entries)

    def store_persistent_bitmaps(self) -> None:
        if not self.read_only:
            self._store_bitmaps()
        elif any(bm.persistent and not bm.readonly for bm in self.bitmaps.all()):
            self.graph.warn(f"Lost persistent bitmaps during inactivation of node "
                            f"'{self.node_name}': No write access")

    def backing_attached(self) -> None:
        """Called once the backing edge exists: from now on unallocated reads go there."""
        self.fmt.backing_read = self._read_backing
        self.fmt.backing_is_zero = self._backing_is_zero

    def _backing_is_zero(self, offset: int, length: int) -> bool:
        b = self.backing
        if b is None:
            return True
        end = min(offset + length, b.length())
        return offset >= end or reads_as_zero(b, offset, end - offset)

    def _read_backing(self, offset: int, length: int) -> bytes:
        b = self.backing
        if b is None:
            return bytes(length)
        blen = b.length()
        if offset >= blen:
            return bytes(length)
        if offset + length > blen:
            return b.read(offset, blen - offset) + bytes(offset + length - blen)
        return b.read(offset, length)

    def exact_filename(self) -> str | None:
        f = self.file
        return f.exact_filename() if f else None

    def backing_overridden(self) -> bool:
        """QEMU compares the header's backing file with the node actually attached."""
        b = self.backing
        if b is not None:
            return self.auto_backing_file != b.filename()
        return self.auto_backing_file != ""

    def length(self) -> int:
        return round_up_sector(int(self.fmt.virtual_size))

    def cluster_size(self) -> int | None:
        return int(self.fmt.cluster_size)

    def format_specific(self) -> dict[str, Any] | None:
        data: dict[str, Any] = {"compat": "1.1" if self.fmt.version >= 3 else "0.10"}
        if self.fmt.version >= 3:
            data["extended-l2"] = False
            data["lazy-refcounts"] = bool(getattr(self.fmt, "lazy_refcounts", False))
            bitmaps = self.stored_bitmap_info()
            if bitmaps:
                data["bitmaps"] = bitmaps
            data["refcount-bits"] = int(getattr(self.fmt, "refcount_bits", 16))
            data["corrupt"] = False
        data["compression-type"] = "zlib"
        return {"type": "qcow2", "data": data}

    def stored_bitmap_info(self) -> list[dict[str, Any]]:
        out = []
        for sb in self.fmt.stored_bitmaps():
            flags = []
            if sb.in_use:
                flags.append("in-use")
            if sb.auto:
                flags.append("auto")
            out.append({"name": sb.name, "granularity": sb.granularity, "flags": flags})
        return out

    def backing_filename(self) -> str | None:
        return self.fmt.backing_file or None

    def full_backing_filename(self) -> str | None:
        bf = self.fmt.backing_file
        if not bf:
            return None
        if bf.startswith("/") or ":" in bf.split("/")[0]:
            return str(bf)
        f = self.file
        base = os.path.dirname(f.filename() if f is not None else "")
        return os.path.join(base, bf)

    def backing_format(self) -> str | None:
        return self.fmt.backing_fmt or None

    def _drv_read(self, offset: int, length: int) -> bytes:
        return bytes(self.fmt.read(offset, length))

    def _drv_write(self, offset: int, data: bytes) -> None:
        self.fmt.write(offset, data)

    def _drv_write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.fmt.write_zeroes(offset, length, unmap)

    def _drv_discard(self, offset: int, length: int) -> None:
        self.fmt.discard(offset, length)

    def _drv_flush(self) -> None:
        self.fmt.flush()

    def _drv_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        # ExtentKind is a StrEnum whose words are DATA / ZERO / UNALLOCATED
        return [(e.offset, e.length, str(e.kind)) for e in self.fmt.block_status(offset, length)]

    def close(self) -> None:
        if not self.closed:
            self.store_persistent_bitmaps()
            self.fmt.close()
        super().close()


def reads_as_zero(node: Node, offset: int, length: int) -> bool:
    """True if [offset, offset+length) of ``node`` reads as zeroes through its chain."""
    for o, n, kind in node.block_status(offset, length):
        if kind == ZERO:
            continue
        if kind == DATA:
            return False
        below = node.backing
        if below is None:
            continue
        blen = below.length()
        if o < blen and not reads_as_zero(below, o, min(n, blen - o)):
            return False
    return True


class BlockBackend:
    """A BlockBackend: what a device (or a named -drive) uses to reach its root node."""

    def __init__(self, graph: BlockGraph, name: str, qdev: str | None,
                 read_only: bool = False) -> None:
        self.graph = graph
        self.name = name
        self.qdev = qdev
        self.read_only = read_only
        self.root_edge: Edge | None = None
        self.io_status = "ok"
        self.removable = False
        self.has_device = False

    @property
    def root(self) -> Node | None:
        return self.root_edge.child if self.root_edge else None

    def describe(self) -> str:
        if self.name:
            return f"block device '{self.name}'"
        if self.qdev:
            return f"block device '{self.qdev}'"
        return "an unnamed block device"


class BlockGraph:
    """All nodes and backends of one emulator instance."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.nodes: list[Node] = []            # in name-assignment order
        self.by_name: dict[str, Node] = {}
        self.backends: list[BlockBackend] = []
        self._auto_counter = 0
        self._rng = rng or random.Random(0)
        self.device_ids: Callable[[], set[str]] = lambda: set()
        # where QEMU would error_report(): the emulator prints it on stderr
        self.warn: Callable[[str], None] = lambda msg: None

    # ----- lookup -----------------------------------------------------------------------
    def find_node(self, name: str) -> Node | None:
        return self.by_name.get(name)

    def find_backend(self, name: str) -> BlockBackend | None:
        if not name:
            return None
        for blk in self.backends:
            if blk.name == name:
                return blk
        return None

    def find_backend_by_qdev(self, path: str) -> BlockBackend | None:
        for blk in self.backends:
            if blk.qdev == path:
                return blk
        return None

    def lookup_bs(self, device: str | None, node_name: str | None) -> Node:
        """QEMU's ``bdrv_lookup_bs``: a BlockBackend name first, then a node name."""
        if device is not None:
            blk = self.find_backend(device)
            if blk is not None:
                root = blk.root
                if root is None:
                    raise SimError(f"Device '{device}' has no medium")
                return root
        if node_name is not None:
            node = self.find_node(node_name)
            if node is not None:
                return node
        raise SimError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")

    # ----- naming -----------------------------------------------------------------------
    def _auto_name(self) -> str:
        name = f"#block{self._auto_counter}{self._rng.randrange(100):02d}"
        self._auto_counter += 1
        return name

    def check_node_name(self, name: str) -> None:
        if not id_wellformed(name):
            raise SimError(f"Invalid node-name: '{name}'")
        if self.find_backend(name) is not None or name in self.device_ids():
            raise SimError(f"node-name={name} is conflicting with a device id")
        if name in self.by_name:
            raise SimError(f"Duplicate nodes with node-name='{name}'")
        if len(name) > NODE_NAME_MAX:
            raise SimError("Node name too long")

    def _register(self, node: Node, name: str | None,
                  slot: tuple[int, str | None] | None = None) -> None:
        """``slot``: (position, reserved auto-name) taken before the children opened."""
        if slot is not None and name is None and slot[1] is not None:
            node.node_name = slot[1]
            node.auto_named = True
        elif name is None:
            node.node_name = self._auto_name()
            node.auto_named = True
        else:
            self.check_node_name(name)
            node.node_name = name
        self.by_name[node.node_name] = node
        if slot is not None:
            self.nodes.insert(slot[0], node)
        else:
            self.nodes.append(node)

    def _unregister(self, node: Node) -> None:
        self.by_name.pop(node.node_name, None)
        if node in self.nodes:
            self.nodes.remove(node)

    # ----- edges & permissions ------------------------------------------------------------
    def attach(self, parent: Node | BlockBackend, child: Node, role: str,
               perm: int, shared: int) -> Edge:
        edge = Edge(parent, child, role)
        edge.perm, edge.shared = perm, shared
        P.check_conflicts([e.edge_perms() for e in child.parents], edge.edge_perms())
        child.parents.append(edge)
        if isinstance(parent, Node):
            parent.children[role] = edge
        try:
            self._refresh_child_perms(child)
        except SimError:
            self.detach(edge)
            raise
        return edge

    def update_perms(self, edge: Edge, perm: int, shared: int) -> None:
        """bdrv_child_try_set_perm: change what an existing parent holds (a device taking
        over a -drive, qemu-io asking for write), QEMU's conflict text if it cannot."""
        others = [e.edge_perms() for e in edge.child.parents if e is not edge]
        P.check_conflicts(others, P.EdgePerms(perm, shared, edge.parent.describe(),
                                              edge.child.node_name, edge.role))
        old = edge.perm, edge.shared
        edge.perm, edge.shared = perm, shared
        try:
            self._refresh_child_perms(edge.child)
        except SimError:
            edge.perm, edge.shared = old
            self._refresh_child_perms(edge.child)
            raise

    def detach(self, edge: Edge) -> None:
        child = edge.child
        if edge in child.parents:
            child.parents.remove(edge)
        if isinstance(edge.parent, Node):
            edge.parent.children.pop(edge.role, None)
        self._refresh_child_perms(child)

    def _refresh_child_perms(self, node: Node) -> None:
        """Propagate permissions down from ``node``; file nodes take QEMU's lock bytes."""
        perm, shared = node.cumulative_perms()
        if isinstance(node, FileNode):
            node.apply_lock(perm, shared)
        for role, edge in node.children.items():
            edge.perm, edge.shared = node.child_perms(role, perm, shared)
            self._refresh_child_perms(edge.child)

    # ----- blockdev-add / blockdev-del ---------------------------------------------------
    def blockdev_add(self, options: dict[str, Any]) -> Node:
        options = {k: v for k, v in options.items() if k != "_arg"}
        if "node-name" not in options:
            raise SimError("'node-name' must be specified for the root node")
        node = self.open_node(options, inherited_ro=None)
        node.monitor_owned = True
        return node

    def open_node(self, options: dict[str, Any], inherited_ro: bool | None,
                  role: str | None = None) -> Node:
        """Open one node and (recursively) its inline children, in QEMU's order."""
        options = dict(options)
        if inherited_ro is not None and "read-only" not in options:
            options["read-only"] = inherited_ro
        driver = options["driver"]
        created: list[Node] = []
        try:
            node = self._open_driver(driver, options, created)
        except BaseException:
            for n in reversed(created):
                self._destroy(n)
            raise
        return node

    def _open_child(self, ref: Any, parent_ro: bool, role: str, created: list[Node],
                    prefix: str = "", parent_opts: dict[str, Any] | None = None) -> Node:
        if isinstance(ref, str):
            try:
                return self.lookup_bs(ref, ref)
            except SimError as e:
                raise SimError(prefix + e.desc) from None
        if role == "file" and parent_opts and "discard" in parent_opts and "discard" not in ref:
            ref = {**ref, "discard": parent_opts["discard"]}  # inline children inherit it
        try:
            node = self.open_node(ref, inherited_ro=parent_ro if role != "backing" else True,
                                  role=role)
        except SimError as e:
            raise SimError(prefix + e.desc) from None
        created.append(node)
        return node

    def _open_driver(self, driver: str, options: dict[str, Any], created: list[Node]) -> Node:
        """QEMU's bdrv_open order: children that hold the data first, then the node name
        checks, then the driver's own open, then (for COW formats) the backing chain."""
        spec = DRIVERS.get(driver)
        if spec is None:
            raise SimError(f"Unknown driver '{driver}'")
        ro = bool(options.get("read-only", False))
        name = options.get("node-name")
        slot: tuple[int, str | None] | None = None
        if spec.named_first:  # a protocol driver opens its children from its own open
            if name is not None:
                self.check_node_name(name)
            slot = (len(self.nodes), self._auto_name() if name is None else None)
        if spec.precheck is not None:
            spec.precheck(options)
        children: dict[str, Node] = {}
        for role in spec.children:
            if role not in options:
                raise SimError(f"A block device must be specified for \"{role}\"")
            children[role] = self._open_child(options[role], ro, role, created,
                                              parent_opts=options)
        if name is not None and slot is None:
            self.check_node_name(name)
        node = spec.factory(self, options, children)
        self._register(node, name, slot)
        try:
            for role, child in children.items():
                nperm, nshared = node.child_perms(role, 0, P.ALL)
                self.attach(node, child, role, nperm, nshared)
            if spec.backing:
                self._open_backing(node, options, created)
            node.opened()
        except BaseException:
            for e in list(node.children.values()):
                self.detach(e)
            self._unregister(node)
            node.close()
            raise
        return node


    def _open_backing(self, node: Node, options: dict[str, Any], created: list[Node]) -> None:
        ref = options.get("backing", "__default__")
        if ref is None:
            return
        implicit = ref == "__default__"
        if implicit:
            bf = node.full_backing_filename()
            if not bf:
                return
            fmt = node.backing_format()
            ref = {"driver": fmt or "raw", "file": {"driver": "file", "filename": bf}}
        bnode = self._open_child(ref, True, "backing", created,
                                 prefix="Could not open backing file: ")
        if implicit and isinstance(node, Qcow2Node):
            node.auto_backing_file = bnode.filename()
        nperm, nshared = node.child_perms("backing", 0, P.ALL)
        self.attach(node, bnode, "backing", nperm, nshared)
        if isinstance(node, Qcow2Node):
            node.backing_attached()
        bnode.op_blockers.append(f"node is used as backing hd of '{node.node_name}'")


    def _destroy(self, node: Node) -> None:
        """Close a node, then drop its children that nobody else holds (QEMU's order:
        the parent closes first, so a qcow2 node can still store its bitmaps)."""
        self.close_node(node)
        for edge in list(node.children.values()):
            child = edge.child
            self.detach(edge)
            if edge.role == "backing":
                msg = f"node is used as backing hd of '{node.node_name}'"
                if msg in child.op_blockers:
                    child.op_blockers.remove(msg)
            if not child.monitor_owned and not child.parents:
                self._destroy(child)
        self._unregister(node)

    def close_node(self, node: Node) -> None:
        """Close a node (a qcow2 node writes its persistent bitmaps back first)."""
        if not node.closed:
            node.close()

    def blockdev_del(self, node_name: str) -> None:
        node = self.find_node(node_name)
        if node is None:
            raise SimError(f"Failed to find node with node-name='{node_name}'")
        if any(isinstance(e.parent, BlockBackend) for e in node.parents):
            raise SimError(f"Node {node_name} is in use")
        if node.op_blockers:
            raise SimError(f"Node '{node_name}' is busy: {node.op_blockers[0]}")
        if not node.monitor_owned:
            raise SimError(f"Node {node_name} is not owned by the monitor")
        if node.parents:
            raise SimError(f"Block device {node_name} is in use")
        self._destroy(node)

    # ----- backends -------------------------------------------------------------------------
    def add_backend(self, blk: BlockBackend, root: Node, perm: int, shared: int) -> None:
        blk.root_edge = self.attach(blk, root, "root", perm, shared)
        self.backends.append(blk)

    def remove_backend(self, blk: BlockBackend) -> None:
        if blk.root_edge is not None:
            self.detach(blk.root_edge)
            blk.root_edge = None
        if blk in self.backends:
            self.backends.remove(blk)

    def temporary_backend(self, node: Node, perm: int) -> BlockBackend:
        """An anonymous BlockBackend like the one HMP qemu-io creates on a node."""
        blk = BlockBackend(self, "", None)
        blk.root_edge = self.attach(blk, node, "root", perm, P.ALL)
        return blk

    # ----- queries --------------------------------------------------------------------------
    def named_nodes_info(self, flat: bool) -> list[dict[str, Any]]:
        return [n.device_info(flat) for n in reversed(self.nodes)]

    def close_all(self) -> None:
        for blk in list(self.backends):
            self.remove_backend(blk)
        for node in reversed(list(self.nodes)):
            if node.monitor_owned and not node.parents:
                self._destroy(node)
        for node in reversed(list(self.nodes)):
            self._destroy(node)


class DriverSpec:
    """How to open one ``driver``: which children to open first, whether it has a backing
    chain, and the factory building the node once they exist."""

    def __init__(self, factory: Callable[[BlockGraph, dict[str, Any], dict[str, Node]], Node],
                 children: tuple[str, ...] = (), backing: bool = False,
                 precheck: Callable[[dict[str, Any]], None] | None = None,
                 named_first: bool = False) -> None:
        self.factory = factory
        self.children = children
        self.backing = backing
        # option checks QEMU makes before it opens the children (qemu_opts parsing)
        self.precheck = precheck
        # QEMU protocol drivers (blkdebug) are named before their children are opened
        self.named_first = named_first


DRIVERS: dict[str, DriverSpec] = {}


def register_driver(name: str, spec: DriverSpec) -> None:
    """Make ``blockdev-add`` know ``driver: name`` (drivers register at import)."""
    DRIVERS[name] = spec


def _open_qcow2(graph: BlockGraph, options: dict[str, Any], ch: dict[str, Node]) -> Node:
    from .errors import ImageError

    try:
        return Qcow2Node(graph, options, ch["file"])
    except ImageError as e:
        raise SimError(str(e)) from None


register_driver("file", DriverSpec(lambda g, o, c: FileNode(g, o), named_first=True))
register_driver("null-co", DriverSpec(lambda g, o, c: NullNode(g, o), named_first=True))
register_driver("null-aio", DriverSpec(lambda g, o, c: NullNode(g, o), named_first=True))
register_driver("raw", DriverSpec(lambda g, o, c: RawNode(g, o, c["file"]), ("file",)))
register_driver("qcow2", DriverSpec(_open_qcow2, ("file",), backing=True))


from . import blkdebug  # noqa: F401,E402

__all__ = ["BlockGraph", "BlockBackend", "Node", "Edge", "DirtyBitmap", "id_wellformed"]
