"""nbdkit Python plugin (API 2) serving a sparse file, as the reference NBD server the
conformance test compares virtsim with.

``nbdkit python nbdkit_file_plugin.py file=PATH [writable=1]``.  It advertises what a
QEMU export over a file advertises (flush, native FUA, cache, multi-conn; trim, zero and
fast zero when writable) and answers extents from the file's holes (SEEK_DATA/SEEK_HOLE),
as QEMU's file-posix driver does, so both servers should look alike to a client.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

import nbdkit  # type: ignore[import-not-found,unused-ignore]

API_VERSION = 2

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_opts: dict[str, str] = {}


def config(key: str, value: str) -> None:
    if key not in ("file", "writable"):
        raise RuntimeError(f"unknown parameter {key}")
    _opts[key] = value


def config_complete() -> None:
    if "file" not in _opts:
        raise RuntimeError("file=PATH is required")


def _writable() -> bool:
    return _opts.get("writable") == "1"


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit's callback name
    return os.open(_opts["file"], os.O_RDONLY if readonly or not _writable() else os.O_RDWR)


def close(h: int) -> None:
    os.close(h)


def get_size(h: int) -> int:
    return os.fstat(h).st_size


def can_write(h: int) -> bool:
    return _writable()


def can_flush(h: int) -> bool:
    return True


def can_fua(h: int) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_trim(h: int) -> bool:
    return _writable()


def can_zero(h: int) -> bool:
    return _writable()


def can_fast_zero(h: int) -> bool:
    return _writable()


def can_multi_conn(h: int) -> bool:
    return True


def can_cache(h: int) -> int:
    return int(nbdkit.CACHE_NATIVE)


def can_extents(h: int) -> bool:
    return True


def pread(h: int, buf: Any, offset: int, flags: int) -> None:
    data = os.pread(h, len(buf), offset)
    buf[:len(data)] = data
    buf[len(data):] = bytes(len(buf) - len(data))


def pwrite(h: int, buf: Any, offset: int, flags: int) -> None:
    os.pwrite(h, bytes(buf), offset)
    if flags & nbdkit.FLAG_FUA:
        os.fsync(h)


def flush(h: int, flags: int) -> None:
    os.fsync(h)


def _fallocate(h: int, mode: int, count: int, offset: int) -> None:
    if _libc.fallocate(h, mode, ctypes.c_long(offset), ctypes.c_long(count)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def trim(h: int, count: int, offset: int, flags: int) -> None:
    _fallocate(h, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, count, offset)


def zero(h: int, count: int, offset: int, flags: int) -> None:
    """Like file-posix: punch a hole when allowed to, else FALLOC_FL_ZERO_RANGE (unwritten
    extents, which SEEK_DATA calls holes), else write zeroes."""
    try:
        if flags & nbdkit.FLAG_MAY_TRIM:
            _fallocate(h, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, count, offset)
        else:
            _fallocate(h, _FALLOC_FL_ZERO_RANGE, count, offset)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        os.pwrite(h, bytes(count), offset)
    if flags & nbdkit.FLAG_FUA:
        os.fsync(h)


def cache(h: int, count: int, offset: int, flags: int) -> None:
    return None


def extents(h: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    end = min(offset + count, get_size(h))
    pos = offset
    while pos < end:
        try:
            data = os.lseek(h, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = end  # a trailing hole
        if data > pos:
            n = min(data, end) - pos
            out.append((pos, n, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO))
            pos += n
            continue
        hole = min(os.lseek(h, pos, os.SEEK_HOLE), end)
        out.append((pos, hole - pos, 0))
        pos = hole
    return out
