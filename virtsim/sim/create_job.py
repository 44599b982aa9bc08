"""``blockdev-create`` as a job (QEMU 7.2's block/create.c plus the file and qcow2 creators).

A create job is a plain :class:`Job` of type ``create``: no BLOCK_JOB_* events, absent from
query-block-jobs, ``auto-dismiss`` off (the client dismisses it after ``concluded``).

Timing is what clients see, so the run is split where QEMU's coroutine first yields to the
thread pool.  The *synchronous part* (option checks in QEMU's order, opening or looking up
the node, permissions, locks) runs in the first step: a failure there concludes the job
before the command's reply, as on QEMU.  The rest (truncation, writing the image) runs
after the reply: the first step parks the job "busy" (an I/O request in flight) and asks
:attr:`CreateJob.defer` to release it later; without ``defer`` it simply runs on.

The qcow2 image is written by :meth:`Qcow2Format.create` (byte-identical to QEMU's
blockdev-create, checked against 7.2.22), then opened twice as an anonymous qcow2 node the
way QEMU re-opens it, which also consumes the same two auto node-names.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from typing import Any

from . import perm as P
from .block import BlockBackend, BlockGraph, Node, NodeStore
from .errors import ImageError, SimError
from .filelock import ImageLock
from .image.qcow2 import Qcow2Format
from .image.qcow2_header import MAX_BACKING_FILE_NAME, MAX_L1_SIZE, Qcow2Header, build_header
from .job import Finished, Job, WorkResult, strerror

#: The ``BlockdevCreateOptions`` branches: drivers QEMU 7.2 can create.
QEMU_CREATE_DRIVERS = frozenset({
    "file", "gluster", "luks", "nfs", "parallels", "qcow", "qcow2", "qed", "rbd", "ssh",
    "vdi", "vhdx", "vmdk", "vpc"})
#: The ones virtsim implements.
CREATE_DRIVERS = frozenset({"file", "qcow2"})

_MiB = 1 << 20
_U64 = 1 << 64
_FIRST_BLOCK = 4096  # file-posix's MAX_BLOCKSIZE
# linux/fs.h ioctls file-posix tries while creating (failures are not fatal)
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_NOCOW_FL = 0x00800000
_FS_IOC_FSGETXATTR = 0x801C581F
_FS_IOC_FSSETXATTR = 0x401C5820
_FS_XFLAG_EXTSIZE = 0x00000800
_FSXATTR = struct.Struct("=IIIII8s")

Continuation = Callable[[], Finished]


def check_create_driver(driver: str) -> None:
    """qmp_blockdev_create's checks, made before the job (and its id) exist."""
    if driver not in QEMU_CREATE_DRIVERS:
        raise SimError("Driver does not support blockdev-create")
    if driver not in CREATE_DRIVERS:
        raise SimError(f"Driver '{driver}' is not supported by virtsim")


def _s64(v: int) -> int:
    """A QAPI ``size`` (uint64) as QEMU's int64 offsets see it: 2^64-512 is -512."""
    u = v % _U64
    return u - _U64 if u >= 1 << 63 else u


def _failed(text: str, err: int = errno.EINVAL) -> Finished:
    return Finished(-err, text)


class _KeepSize:
    """A store whose ``truncate`` does nothing: QEMU formats the node in place and never
    shrinks it, so whatever lay past the new metadata stays (qemu-img create truncates)."""

    def __init__(self, inner: NodeStore) -> None:
        self._inner = inner
        self.filename = inner.filename
        self.readonly = inner.readonly

    def truncate(self, size: int) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CreateJob(Job):
    """One ``blockdev-create`` job for ``driver: file`` or ``driver: qcow2``."""

    job_type = "create"

    def __init__(self, job_id: str, graph: BlockGraph, options: dict[str, Any]) -> None:
        super().__init__(job_id, auto_finalize=True, auto_dismiss=False)
        self.graph = graph
        self.options = dict(options)
        #: Called with a callback once the synchronous part is done; it must call it back
        #: later (after the command's reply).  None: the job runs on in its next step.
        self.defer: Callable[[Callable[[], None]], None] | None = None
        self._rest: Continuation | None = None
        # Set once the run has yielded in QEMU's terms (opening an inline node drains, and
        # a drain inside a coroutine yields): later failures come after the reply.
        self._yielded = False

    # ----- the run ------------------------------------------------------------------------
    def work(self, limit: int | None) -> WorkResult:
        if self._rest is None:
            done = self._run_sync()
            if done is not None:
                return done
            if self.defer is not None:
                self.pause_at(self.progress_current, hold=True)  # busy: request in flight
                self.defer(self._io_completed)
            return 0.0
        return self._run_rest()

    def cancelled_step(self) -> WorkResult:
        """A cancel cannot stop the create: it runs to the end and is then cancelled."""
        if self._rest is None:
            done = self._run_sync()
            if done is not None:
                return done
        return self._run_rest()

    def _pause_point(self) -> bool:
        # QEMU's create run has no pause point once it has started.
        if self._rest is not None:
            return False
        return super()._pause_point()

    def _io_completed(self) -> None:
        if self.co_state == "held":
            self.release()

    def _run_sync(self) -> Finished | None:
        self.progress_set_remaining(1)
        try:
            if self.options["driver"] == "file":
                self._rest = self._file_sync()
            else:
                self._rest = self._qcow2_sync()
        except SimError as e:
            if self._yielded:
                text = e.desc
                self._rest = lambda: _failed(text)
                return None
            self.progress_update(1)
            return _failed(e.desc)
        return None

    def _run_rest(self) -> Finished:
        assert self._rest is not None
        rest, self._rest = self._rest, lambda: Finished()
        try:
            return rest()
        finally:
            self.progress_update(1)

    # ----- driver: file (file-posix's create) ---------------------------------------------
    def _file_sync(self) -> Continuation:
        o = self.options
        filename = str(o["filename"])
        hint_given = "extent-size-hint" in o
        hint = int(o.get("extent-size-hint", _MiB)) % _U64
        if hint > 0xFFFFFFFF:
            raise SimError("Extent size hint is too large")
        try:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise SimError(f"Could not create '{filename}': {strerror(e.errno or 0)}") from None
        try:
            ImageLock(fd).apply(P.WRITE | P.RESIZE, P.ALL & ~P.RESIZE)
        except BaseException:
            os.close(fd)
            raise
        size = _s64(int(o["size"]))
        prealloc = str(o.get("preallocation", "off"))
        nocow = bool(o.get("nocow", False))

        def rest() -> Finished:
            try:
                return self._file_rest(fd, size, prealloc, nocow, hint, hint_given)
            finally:
                os.close(fd)  # drops the lock bytes too

        return rest

    def _file_rest(self, fd: int, size: int, prealloc: str, nocow: bool, hint: int,
                   hint_given: bool) -> Finished:
        err = _truncate(fd, 0, "off")
        if err:
            return _failed(err)
        if nocow:
            try:
                # the kernel reads and writes an int through these "long" ioctls
                flags = struct.unpack("=i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(4)))[0]
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("=i", flags | _FS_NOCOW_FL))
            except (OSError, struct.error):
                pass
        try:
            raw = fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
            xflags, _, nextents, projid, cowext, pad = _FSXATTR.unpack(raw)
            fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, _FSXATTR.pack(
                xflags | _FS_XFLAG_EXTSIZE, hint, nextents, projid, cowext, pad))
        except OSError as e:
            if hint_given and hint:
                self.graph.warn(f"warning: Failed to set extent size hint: "
                                f"{strerror(e.errno or 0)}")
        err = _truncate(fd, size, prealloc)
        return _failed(err) if err else Finished()

    # ----- driver: qcow2 ------------------------------------------------------------------
    def _open_ref(self, ref: Any) -> tuple[Node, bool]:
        """bdrv_open_blockdev_ref: a name, or inline options opened as a new node (owned)."""
        if isinstance(ref, str):
            return self.graph.lookup_bs(ref, ref), False
        self._yielded = True
        return self.graph.open_node(dict(ref), inherited_ro=None), True

    def _drop(self, node: Node, owned: bool, hold: BlockBackend | None) -> None:
        if hold is not None:
            self.graph.remove_backend(hold)
        if owned and not node.parents and node.node_name in self.graph.by_name:
            self.graph._destroy(node)

    def _qcow2_sync(self) -> Continuation:
        o = self.options
        node, owned = self._open_ref(o["file"])
        # QEMU holds a reference on the node for the whole run
        hold = self.graph.temporary_backend(node, 0)
        blk: BlockBackend | None = None
        try:
            params = _qcow2_params(o)
            if "data-file" in o:
                data, data_owned = self._open_ref(o["data-file"])
                self._drop(data, data_owned, None)
            # blk_new_with_bs(bs, WRITE | RESIZE, ALL): conflicts, then read-only, then locks
            perm = P.WRITE | P.RESIZE
            P.check_conflicts([e.edge_perms() for e in node.parents],
                              P.EdgePerms(perm, P.ALL, "an unnamed block device",
                                          node.node_name, "root"))
            if node.read_only:
                raise SimError("Block node is read-only")
            blk = self.graph.temporary_backend(node, perm)
            _virtsim_limits(o, params)
        except BaseException:
            if blk is not None:
                self.graph.remove_backend(blk)
            self._drop(node, owned, hold)
            raise

        def rest() -> Finished:
            try:
                return self._qcow2_rest(node, blk, params)
            finally:
                self._drop(node, owned, hold)

        return rest

    def _qcow2_rest(self, node: Node, blk: BlockBackend | None,
                    p: dict[str, Any]) -> Finished:
        size, cs = int(p["size"]), int(p["cluster_size"])
        bf: str | None = p["backing_file"]
        bfmt: str | None = p["backing_fmt"]
        l1 = -(-max(size, 0) // (cs * (cs // 8)))
        error: str | None = None
        err = errno.EINVAL
        if size < 0:
            error = "Could not resize image: Image size cannot be negative"
        elif l1 > MAX_L1_SIZE // 8:
            error = "Could not resize image: Failed to grow the L1 table: File too large"
            err = errno.EFBIG
        elif bf is not None:
            err = _backing_fits(p, bf, bfmt)
            if err:
                error = (f"Could not assign backing file '{bf}' with format "
                         f"'{bfmt if bfmt is not None else '(null)'}': {strerror(err)}")
        store = NodeStore(node)
        try:
            fmt = Qcow2Format.create(
                _KeepSize(store),
                size if size >= 0 and l1 <= MAX_L1_SIZE // 8 else 0, cs,
                backing_file=bf if bf and error is None else None,
                backing_fmt=bfmt if bf and error is None else None,
                lazy_refcounts=bool(p["lazy"]), refcount_bits=int(p["refcount_bits"]),
                version=int(p["version"]))
            fmt.close()
            if bf == "" and error is None:
                _empty_backing_name(store, fmt.header, bfmt)
        except (ImageError, OSError) as e:
            return _failed(str(e) if isinstance(e, ImageError) else
                           f"Could not write qcow2 header: {strerror(e.errno or 0)}")
        finally:
            if blk is not None:
                self.graph.remove_backend(blk)
        # QEMU opens the new image (then fails, or finishes it), closes and re-opens it
        for _ in range(1 if error else 2):
            try:
                q = self.graph.open_node({"driver": "qcow2", "file": node.node_name,
                                          "backing": None}, inherited_ro=None)
            except SimError as e:
                return _failed(e.desc)
            self.graph._destroy(q)
        return _failed(error, err) if error else Finished()


def _truncate(fd: int, size: int, prealloc: str) -> str | None:
    """file-posix's truncate in the thread pool; returns QEMU's error text or None."""
    cur = os.fstat(fd).st_size
    if cur > size and prealloc != "off":
        return "Cannot use preallocation for shrinking files"
    try:
        if prealloc == "off":
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                return f"Could not resize file: {strerror(e.errno or 0)}"
            if cur == 0 and size > 0:
                # allocate_first_block: helps later alignment probing; may grow the file
                try:
                    os.pwrite(fd, bytes(512 if size < _FIRST_BLOCK else _FIRST_BLOCK), 0)
                except OSError:
                    pass
        elif prealloc == "falloc":
            if size > cur:
                try:
                    os.posix_fallocate(fd, cur, size - cur)
                except OSError as e:
                    return f"Could not preallocate new data: {strerror(e.errno or 0)}"
        elif prealloc == "full":
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                return f"Could not resize file: {strerror(e.errno or 0)}"
            zeros = bytes(65536)
            off = cur
            try:
                while off < size:
                    off += os.pwrite(fd, zeros[:min(65536, size - off)], off)
            except OSError as e:
                return f"Could not write zeros for preallocation: {strerror(e.errno or 0)}"
        else:
            return f"Unsupported preallocation mode: {prealloc}"
    except OSError as e:  # pragma: no cover - fstat and friends on a broken fd
        return strerror(e.errno or 0)
    return None


def _qcow2_params(o: dict[str, Any]) -> dict[str, Any]:
    """qcow2_co_create's option checks, in QEMU 7.2's order and words."""
    size = _s64(int(o["size"]))
    if size % 512:
        raise SimError("Image size must be a multiple of 512 bytes")
    version = 2 if o.get("version") == "v2" else 3
    cs = int(o.get("cluster-size", 65536)) % _U64
    ext_l2 = bool(o.get("extended-l2", False))
    if ext_l2 and version < 3:
        raise SimError("Extended L2 entries are only supported with compatibility level 1.1 "
                       "and above (use version=v3 or greater)")
    if cs < 512 or cs > 2 * _MiB or cs & (cs - 1):
        raise SimError("Cluster size must be a power of two between 512 and 2048k")
    if ext_l2 and cs < 16384:
        raise SimError("Extended L2 entries are only supported with cluster sizes of at "
                       "least 16384 bytes")
    prealloc = str(o.get("preallocation", "off"))
    has_bf = "backing-file" in o
    if has_bf and prealloc != "off" and not ext_l2:
        raise SimError("Backing file and preallocation can only be used at the same time "
                       "if extended_l2 is on")
    if "backing-fmt" in o and not has_bf:
        raise SimError("Backing format cannot be used without backing file")
    lazy = bool(o.get("lazy-refcounts", False))
    if version < 3 and lazy:
        raise SimError("Lazy refcounts only supported with compatibility level 1.1 and above "
                       "(use version=v3 or greater)")
    rbits = int(o.get("refcount-bits", 16))
    if rbits <= 0 or rbits > 64 or rbits & (rbits - 1):
        raise SimError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and rbits != 16:
        raise SimError("Different refcount widths than 16 bits require compatibility level "
                       "1.1 or above (use version=v3 or greater)")
    raw = bool(o.get("data-file-raw", False))
    if raw and "data-file" not in o:
        raise SimError("data-file-raw requires data-file")
    if raw and has_bf:
        raise SimError("Backing file and data-file-raw cannot be used at the same time")
    if raw and prealloc == "off":
        prealloc = "metadata"
    if "data-file" in o and version < 3:
        raise SimError("External data files are only supported with compatibility level 1.1 "
                       "and above (use version=v3 or greater)")
    if o.get("compression-type", "zlib") != "zlib" and version < 3:
        raise SimError("Non-zlib compression type is only supported with compatibility "
                       "level 1.1 and above (use version=v3 or greater)")
    return {"size": size, "version": version, "cluster_size": cs, "ext_l2": ext_l2,
            "prealloc": prealloc, "lazy": lazy, "refcount_bits": rbits,
            "backing_file": o.get("backing-file"), "backing_fmt": o.get("backing-fmt")}


def _virtsim_limits(o: dict[str, Any], p: dict[str, Any]) -> None:
    """What QEMU accepts but virtsim's qcow2 cannot write: say so plainly."""
    if "data-file" in o:
        raise SimError("virtsim: qcow2 external data files are not supported")
    if p["ext_l2"]:
        raise SimError("virtsim: qcow2 extended L2 entries are not supported")
    if o.get("compression-type", "zlib") != "zlib":
        raise SimError("virtsim: qcow2 compression type "
                       f"'{o['compression-type']}' is not supported")
    if "encrypt" in o:
        raise SimError("virtsim: qcow2 encryption is not supported")
    if p["prealloc"] != "off":
        raise SimError(f"virtsim: qcow2 preallocation '{p['prealloc']}' is not supported")


def _blank_header(p: dict[str, Any]) -> Qcow2Header:
    cs, version = int(p["cluster_size"]), int(p["version"])
    return Qcow2Header(version=version, cluster_bits=cs.bit_length() - 1,
                       refcount_table_offset=cs, refcount_table_clusters=1,
                       refcount_order=int(p["refcount_bits"]).bit_length() - 1)


def _backing_fits(p: dict[str, Any], bf: str, bfmt: str | None) -> int:
    """qcow2_change_backing_file's refusals: 0, EINVAL (name too long) or ENOSPC (the
    header cluster cannot hold it)."""
    if len(bf.encode("utf-8", "surrogateescape")) > MAX_BACKING_FILE_NAME:
        return errno.EINVAL
    h = _blank_header(p)
    h.backing_file, h.backing_format = bf or None, bfmt
    try:
        build_header(h)
    except ImageError:
        return errno.ENOSPC
    return 0


def _empty_backing_name(store: NodeStore, header: Qcow2Header, bfmt: str | None) -> None:
    """``backing-file: ""``: QEMU records an empty name (offset set, length 0)."""
    h = dataclasses.replace(header, backing_file="x", backing_format=bfmt)
    buf = bytearray(build_header(h))
    struct.pack_into(">QI", buf, 8, h.backing_file_offset, 0)
    buf[h.backing_file_offset] = 0
    store.pwrite(0, bytes(buf))
