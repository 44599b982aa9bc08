"""Byte stores under the image formats: a host file (QEMU's file-posix) or host memory.

The formats only need positional reads and writes plus a few allocation primitives, so
anything that can offer those (a child block node, an NBD client) can stand in for a file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ..errors import IOErrorEnospc

Buffer = bytes | bytearray | memoryview

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

# QEMU's file-posix writes the first block of a new file so alignment probing works later
# (allocate_first_block); mimicking it keeps actual-size and `qemu-img map` identical.
_FIRST_BLOCK = 4096


@runtime_checkable
class Store(Protocol):
    """What an image format needs from the layer below it.

    A store may also offer ``zero_range(offset, length)`` (zero, keep allocated, grow if
    needed: fallocate ZERO_RANGE).  The formats probe for it, because QEMU zeroes COW areas
    and raw write-zeroes that way, and ``qemu-img map`` then shows those ranges as holes.
    """

    filename: str
    readonly: bool

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes; whatever lies past the end reads as zeros."""
        ...

    def pwrite(self, offset: int, data: Buffer) -> None:
        """Write, growing the store if the write ends past its end."""
        ...

    def size(self) -> int:
        ...

    def truncate(self, size: int) -> None:
        ...

    def flush(self) -> None:
        ...

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a range (it then reads as zeros) without changing the size."""
        ...

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, is_data)`` runs covering the range; holes read as zeros."""
        ...

    def allocated_bytes(self) -> int:
        """Host bytes in use (QEMU's ``actual-size``)."""
        ...

    def close(self) -> None:
        ...


def _libc_fallocate() -> Callable[..., int] | None:
    """fallocate(2) through ctypes, or None where libc has none (non-Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    result: Callable[..., int] = fn
    return result


_fallocate = _libc_fallocate()


def _ebadf() -> OSError:
    return OSError(errno.EBADF, os.strerror(errno.EBADF))


def _enospc() -> IOErrorEnospc:
    return IOErrorEnospc(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _merge_runs(runs: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for off, n, d in runs:
        if n <= 0:
            continue
        if out and out[-1][2] == d and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, d)
        else:
            out.append((off, n, d))
    return out


class FileStore:
    """A host file accessed like QEMU's file-posix driver (pread/pwrite, fallocate, lseek).

    ``capacity`` simulates a filesystem with that many bytes: a write that would need more
    host blocks than are left fails with ENOSPC and writes nothing.
    """

    def __init__(self, filename: str, readonly: bool = False, *,
                 capacity: int | None = None, durable: bool = False) -> None:
        self.filename = filename
        self.readonly = readonly
        self.capacity = capacity
        # fdatasync on flush costs milliseconds; a simulator rarely needs it
        self.durable = durable
        fd = os.open(filename, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), filename)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._has_punch = _fallocate is not None
        self._has_zero_range = _fallocate is not None
        self._has_seek = hasattr(os, "SEEK_DATA")

    @classmethod
    def open(cls, filename: str, readonly: bool = False, *,
             capacity: int | None = None) -> FileStore:
        return cls(filename, readonly, capacity=capacity)

    @classmethod
    def create(cls, filename: str, size: int = 0, *, capacity: int | None = None) -> FileStore:
        """Create (or truncate) ``filename`` like file-posix's create with preallocation=off."""
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            if size > 0:
                os.pwrite(fd, bytes(min(size, _FIRST_BLOCK)), 0)
        finally:
            os.close(fd)
        return cls(filename, False, capacity=capacity)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise _ebadf()
        return self._fd

    # ----- I/O --------------------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        fd = self.fd
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            chunk = os.pread(fd, length - got, offset + got)
            if not chunk:
                parts.append(bytes(length - got))
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def pwrite(self, offset: int, data: Buffer) -> None:
        if self.readonly:
            raise _ebadf()
        n = len(data)
        if n == 0:
            return
        fd = self.fd
        if self.capacity is not None:
            self._check_capacity(offset, n)
        view = memoryview(data)
        done = 0
        while done < n:
            done += os.pwrite(fd, view[done:], offset + done)

    def _check_capacity(self, offset: int, length: int) -> None:
        """Fail like a full filesystem if the write would allocate past ``capacity``."""
        assert self.capacity is not None
        growth = sum(n for _, n, d in self.data_extents(offset, length) if not d)
        if growth and self.allocated_bytes() + growth > self.capacity:
            raise _enospc()

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        if self.readonly:
            raise _ebadf()
        os.ftruncate(self.fd, size)

    def flush(self) -> None:
        if self._fd is not None and self.durable and not self.readonly:
            os.fdatasync(self._fd)

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        """Run fallocate; False if the filesystem does not support that mode."""
        if _fallocate is None:
            return False
        if _fallocate(self.fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        if err == errno.ENOSPC:
            raise _enospc()
        raise OSError(err, os.strerror(err))

    def punch_hole(self, offset: int, length: int) -> None:
        if self.readonly:
            raise _ebadf()
        if length <= 0:
            return
        if self._has_punch:
            if self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
                return
            self._has_punch = False
        size = self.size()
        end = min(offset + length, size)
        if end > offset:
            self._write_zeros(offset, end - offset)

    def zero_range(self, offset: int, length: int) -> None:
        """Zero a range keeping it allocated (file-posix write_zeroes without MAY_UNMAP).

        Like fallocate(FALLOC_FL_ZERO_RANGE) this grows the file when the range ends past
        its end.  Not part of :class:`Store`: callers probe for it.
        """
        if self.readonly:
            raise _ebadf()
        if length <= 0:
            return
        if self.capacity is not None:
            self._check_capacity(offset, length)
        # file-posix's chain: ZERO_RANGE, else punch a hole and fallocate it back (tmpfs),
        # else fallocate past EOF, else plain zero writes (the block layer's fallback)
        if self._has_zero_range:
            if self._fallocate(_FALLOC_FL_ZERO_RANGE, offset, length):
                return
            self._has_zero_range = False
        if self._has_punch:
            if self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
                if self._fallocate(0, offset, length):
                    return
            else:
                self._has_punch = False
        if offset >= self.size() and self._fallocate(0, offset, length):
            return
        self._write_zeros(offset, length)

    def _write_zeros(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            os.pwrite(self.fd, chunk[:n], pos)
            pos += n

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        end = offset + length
        if length <= 0:
            return []
        size = self.size()
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        fd = self.fd
        while pos < end:
            if pos >= size:
                runs.append((pos, end - pos, False))
                break
            if not self._has_seek:
                runs.append((pos, min(end, size) - pos, True))
                pos = min(end, size)
                continue
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    data = size
                elif e.errno == errno.EINVAL:
                    self._has_seek = False
                    continue
                else:
                    raise
            if data > pos:
                stop = min(data, end)
                runs.append((pos, stop - pos, False))
                pos = stop
                continue
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = size
            stop = min(max(hole, pos + 1), end, size)
            runs.append((pos, stop - pos, True))
            pos = stop
        return _merge_runs(runs)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __repr__(self) -> str:
        return f"FileStore({self.filename!r}, readonly={self.readonly})"


class MemoryStore:
    """A sparse store in host memory, in fixed chunks, for fast tests.

    Chunks that were never written (or were punched whole) are holes; ``allocated_bytes``
    counts whole chunks, so it is only an approximation of a filesystem's block usage.
    """

    def __init__(self, size: int = 0, *, filename: str = "memory", readonly: bool = False,
                 capacity: int | None = None, chunk_size: int = 65536) -> None:
        if chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise ValueError("chunk_size must be a power of two")
        self.filename = filename
        self.readonly = readonly
        self.capacity = capacity
        self.chunk_size = chunk_size
        self._shift = chunk_size.bit_length() - 1
        self._chunks: dict[int, bytearray] = {}
        self._size = size
        self.closed = False

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        cs, shift = self.chunk_size, self._shift
        end = offset + length
        limit = min(end, self._size)
        out = bytearray(length)
        pos = offset
        while pos < limit:
            idx = pos >> shift
            base = idx << shift
            stop = min(base + cs, limit)
            chunk = self._chunks.get(idx)
            if chunk is not None:
                out[pos - offset:stop - offset] = chunk[pos - base:stop - base]
            pos = stop
        return bytes(out)

    def pwrite(self, offset: int, data: Buffer) -> None:
        if self.readonly:
            raise _ebadf()
        n = len(data)
        if n == 0:
            return
        cs, shift = self.chunk_size, self._shift
        if self.capacity is not None:
            first, last = offset >> shift, (offset + n - 1) >> shift
            new = sum(1 for i in range(first, last + 1) if i not in self._chunks)
            if new and (len(self._chunks) + new) * cs > self.capacity:
                raise _enospc()
        view = memoryview(data)
        pos, end = offset, offset + n
        while pos < end:
            idx = pos >> shift
            base = idx << shift
            stop = min(base + cs, end)
            chunk = self._chunks.get(idx)
            if chunk is None:
                if stop - pos == cs:
                    self._chunks[idx] = bytearray(view[pos - offset:stop - offset])
                    pos = stop
                    continue
                chunk = self._chunks[idx] = bytearray(cs)
            chunk[pos - base:stop - base] = view[pos - offset:stop - offset]
            pos = stop
        if end > self._size:
            self._size = end

    def size(self) -> int:
        return self._size

    def truncate(self, size: int) -> None:
        if self.readonly:
            raise _ebadf()
        if size < self._size:
            shift = self._shift
            first_gone = (size + self.chunk_size - 1) >> shift
            for idx in [i for i in self._chunks if i >= first_gone]:
                del self._chunks[idx]
            tail = size >> shift
            chunk = self._chunks.get(tail)
            if chunk is not None:
                cut = size - (tail << shift)
                chunk[cut:] = bytes(self.chunk_size - cut)
        self._size = size

    def flush(self) -> None:
        return None

    def punch_hole(self, offset: int, length: int) -> None:
        if self.readonly:
            raise _ebadf()
        end = min(offset + length, self._size)
        cs, shift = self.chunk_size, self._shift
        pos = offset
        while pos < end:
            idx = pos >> shift
            base = idx << shift
            stop = min(base + cs, end)
            chunk = self._chunks.get(idx)
            if chunk is not None:
                if pos == base and stop - base == cs:
                    del self._chunks[idx]
                else:
                    chunk[pos - base:stop - base] = bytes(stop - pos)
            pos = stop

    def zero_range(self, offset: int, length: int) -> None:
        """Zero a range, growing the store like fallocate(ZERO_RANGE) would."""
        self.punch_hole(offset, length)
        if offset + length > self._size:
            self._size = offset + length

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        runs: list[tuple[int, int, bool]] = []
        end = offset + length
        cs, shift = self.chunk_size, self._shift
        pos = offset
        while pos < end:
            if pos >= self._size:
                runs.append((pos, end - pos, False))
                break
            idx = pos >> shift
            stop = min((idx << shift) + cs, end, self._size)
            runs.append((pos, stop - pos, idx in self._chunks))
            pos = stop
        return _merge_runs(runs)

    def allocated_bytes(self) -> int:
        return len(self._chunks) * self.chunk_size

    def close(self) -> None:
        self.closed = True

    def getvalue(self) -> bytes:
        """The whole content (tests)."""
        return self.pread(0, self._size)
