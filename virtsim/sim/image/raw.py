"""The raw format: guest offset = host offset, holes in the store read as zeros."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from .extent import DATA, ZERO, Extent
from .store import Buffer, Store


class RawFormat:
    """A raw image over a store, behaving like QEMU's raw driver on file-posix."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.readonly = store.readonly

    @property
    def virtual_size(self) -> int:
        return self.store.size()

    def read(self, offset: int, length: int) -> bytes:
        return self.store.pread(offset, length)

    def write(self, offset: int, data: Buffer) -> None:
        self.store.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero a range: punched if unmapping is allowed, else zeroed in place.

        file-posix uses fallocate(PUNCH_HOLE) for MAY_UNMAP and fallocate(ZERO_RANGE)
        otherwise; a store without ``zero_range`` gets real zeros written.
        """
        if length <= 0:
            return
        if unmap:
            end = min(offset + length, self.store.size())
            if end > offset:
                self.store.punch_hole(offset, end - offset)
            if offset + length > end:
                self._zero(max(offset, end), offset + length - max(offset, end))
            return
        self._zero(offset, length)

    def _zero(self, offset: int, length: int) -> None:
        zero_range = getattr(self.store, "zero_range", None)
        if zero_range is not None:
            cast(Callable[[int, int], None], zero_range)(offset, length)
            return
        step = 1 << 20
        pos, end = offset, offset + length
        while pos < end:
            n = min(step, end - pos)
            self.store.pwrite(pos, bytes(n))
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """file-posix discards by punching a hole; the range then reads as zeros."""
        end = min(offset + length, self.store.size())
        if end > offset:
            self.store.punch_hole(offset, end - offset)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Every byte of a raw image is allocated: data where the store has data, else zero."""
        return [Extent(o, n, DATA if d else ZERO, o)
                for o, n, d in self.store.data_extents(offset, length)]

    def flush(self) -> None:
        self.store.flush()

    def close(self) -> None:
        self.store.close()
