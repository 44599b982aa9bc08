"""Is this buffer all zeroes?  Asked for every chunk a backup job or a copy-before-write
copies (zeroes are written as zero clusters, not data), so it must run at memcmp speed."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=16)
def _zeros(n: int) -> bytes:
    return bytes(n)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    n = len(data)
    if n <= 64 << 20:
        return bool(data == _zeros(n))
    view = memoryview(data)
    step = 16 << 20
    return all(view[i:i + step] == _zeros(min(step, n - i)) for i in range(0, n, step))
