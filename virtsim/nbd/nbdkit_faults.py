"""An nbdkit Python plugin (API version 2) serving an image with scripted faults.

Run by nbdkit's embedded interpreter, so it imports nothing from virtsim::

    nbdkit -U SOCK python virtsim/nbd/nbdkit_faults.py size=64M enospc-after=1M
    nbdkit -U SOCK python virtsim/nbd/nbdkit_faults.py file=disk.img eio-at=65536:4096

Parameters (all optional except one of ``file``/``size``):

``file=PATH``           serve a host file (its size is the export size)
``size=SIZE``           serve zero-filled memory of that size (nbdkit size syntax: 1M)
``enospc-after=BYTES``  writes fail with ENOSPC once that many bytes were written
                        (a write that would cross the limit fails whole, writes nothing)
``eio-at=OFF[:LEN]``    reads/writes touching [OFF, OFF+LEN) fail with EIO (LEN default 1);
                        may be given more than once
``latency=SECONDS``     sleep that long before each request
``stall-file=PATH``     requests wait while PATH exists (delete it to release them)
``readonly=1``          refuse writes (the export is advertised read-only)

Backup tools need these because real storage fails in exactly these ways mid-job.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import nbdkit  # type: ignore[import-not-found]

API_VERSION = 2

_cfg: dict[str, Any] = {"file": None, "size": None, "enospc": None, "eio": [],
                        "latency": 0.0, "stall": None, "readonly": False}
_state: dict[str, Any] = {"written": 0, "mem": None, "fd": None}


def config(key: str, value: str) -> None:
    if key == "file":
        _cfg["file"] = os.path.abspath(value)
    elif key == "size":
        _cfg["size"] = nbdkit.parse_size(value)
    elif key == "enospc-after":
        _cfg["enospc"] = nbdkit.parse_size(value)
    elif key == "eio-at":
        off, _, length = value.partition(":")
        _cfg["eio"].append((nbdkit.parse_size(off), nbdkit.parse_size(length) if length else 1))
    elif key == "latency":
        _cfg["latency"] = float(value)
    elif key == "stall-file":
        _cfg["stall"] = value
    elif key == "readonly":
        _cfg["readonly"] = value not in ("0", "false", "no", "off")
    else:
        raise RuntimeError(f"unknown parameter {key!r}")


def config_complete() -> None:
    if (_cfg["file"] is None) == (_cfg["size"] is None):
        raise RuntimeError("give exactly one of file=PATH or size=SIZE")
    if _cfg["size"] is not None:
        _state["mem"] = bytearray(_cfg["size"])


def thread_model() -> int:
    # one request at a time keeps the fault script (byte counter, stalls) deterministic
    return int(nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS)


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit looks the name up
    if _cfg["file"] is not None and _state["fd"] is None:
        flags = os.O_RDONLY if readonly or _cfg["readonly"] else os.O_RDWR
        _state["fd"] = os.open(_cfg["file"], flags)
    return 1


def get_size(h: int) -> int:
    if _state["mem"] is not None:
        return len(_state["mem"])
    return os.fstat(_state["fd"]).st_size


def can_write(h: int) -> bool:
    return not _cfg["readonly"]


def can_flush(h: int) -> bool:
    return True


def can_trim(h: int) -> bool:
    return True


def can_zero(h: int) -> bool:
    return True


def _fail(code: int) -> None:
    nbdkit.set_error(code)
    raise OSError(code, os.strerror(code))


def _before(offset: int, count: int, io: bool) -> None:
    """Apply latency and stalls; fail requests touching an eio-at range."""
    if _cfg["latency"]:
        time.sleep(_cfg["latency"])
    stall = _cfg["stall"]
    while stall is not None and os.path.exists(stall):
        time.sleep(0.01)
    if io:
        for off, length in _cfg["eio"]:
            if offset < off + length and off < offset + count:
                _fail(errno.EIO)


def _account(count: int) -> None:
    limit = _cfg["enospc"]
    if limit is not None and _state["written"] + count > limit:
        _fail(errno.ENOSPC)
    _state["written"] += count


def _write(offset: int, data: bytes) -> None:
    if _state["mem"] is not None:
        _state["mem"][offset:offset + len(data)] = data
    else:
        os.pwrite(_state["fd"], data, offset)


def pread(h: int, buf: Any, offset: int, flags: int) -> None:
    _before(offset, len(buf), True)
    if _state["mem"] is not None:
        buf[:] = _state["mem"][offset:offset + len(buf)]
    else:
        data = os.pread(_state["fd"], len(buf), offset)
        buf[:] = data + bytes(len(buf) - len(data))


def pwrite(h: int, buf: Any, offset: int, flags: int) -> None:
    _before(offset, len(buf), True)
    _account(len(buf))
    _write(offset, bytes(buf))


def zero(h: int, count: int, offset: int, flags: int) -> None:
    _before(offset, count, True)
    _account(count)
    _write(offset, bytes(count))


def trim(h: int, count: int, offset: int, flags: int) -> None:
    _before(offset, count, False)
    _write(offset, bytes(count))


def flush(h: int, flags: int) -> None:
    _before(0, 0, False)
    if _state["fd"] is not None:
        os.fsync(_state["fd"])
