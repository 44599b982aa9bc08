"""QEMU's image locking (file-posix): OFD byte-range locks that encode permissions.

Byte 100+i is read-locked while this open file holds permission bit i; byte 200+i while it
refuses to share bit i.  Using the very same bytes means virtsim, real QEMU, qemu-img and
qemu-io all see each other's locks: opening an image that another process writes fails
the same way everywhere.
"""

from __future__ import annotations

import fcntl
import os
import struct

from . import perm as P
from .errors import SimError

PERM_BASE = 100
SHARED_BASE = 200
_BITS = [(0, P.CONSISTENT_READ, "consistent read"), (1, P.WRITE, "write"),
         (2, P.WRITE_UNCHANGED, "write unchanged"), (3, P.RESIZE, "resize")]
_FLOCK = "hhxxxxqqixxxx"
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)


def _lock(fd: int, start: int, kind: int) -> None:
    fcntl.fcntl(fd, _OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, start, 1, 0))


def _conflicts(fd: int, start: int) -> bool:
    """Would an exclusive lock on ``start`` conflict with another open file's lock?"""
    res = fcntl.fcntl(fd, _OFD_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET,
                                                  start, 1, 0))
    kind: int = struct.unpack(_FLOCK, res)[0]
    return kind != fcntl.F_UNLCK


class ImageLock:
    """The lock bytes one open file holds; ``apply`` moves them to a new (perm, shared)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.perm = 0
        self.shared = P.ALL

    def check(self, perm: int, shared: int) -> None:
        """Raise QEMU's error if another open file blocks ``perm`` or needs what we unshare."""
        for i, bit, name in _BITS:
            if perm & bit and _conflicts(self.fd, SHARED_BASE + i):
                raise SimError(f'Failed to get "{name}" lock')
        for i, bit, name in _BITS:
            if not shared & bit and _conflicts(self.fd, PERM_BASE + i):
                raise SimError(f'Failed to get shared "{name}" lock')

    def apply(self, perm: int, shared: int) -> None:
        if (perm, shared) == (self.perm, self.shared):
            return
        self.check(perm, shared)
        for i, bit, _ in _BITS:
            _lock(self.fd, PERM_BASE + i, fcntl.F_RDLCK if perm & bit else fcntl.F_UNLCK)
            _lock(self.fd, SHARED_BASE + i,
                  fcntl.F_RDLCK if not shared & bit else fcntl.F_UNLCK)
        self.perm, self.shared = perm, shared
