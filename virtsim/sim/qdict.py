"""QEMU's QDict iteration order, so emitted JSON objects match QEMU's byte for byte.

QEMU serialises dictionaries by walking a 512-bucket hash table: keys come out ordered by
``tdb_hash(key) % 512``, and keys sharing a bucket come out newest-inserted first.  That
order is deterministic, so reproducing it costs one sort and makes transcripts identical.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

_BUCKETS = 512


@lru_cache(maxsize=4096)
def bucket(key: str) -> int:
    """The bucket QEMU's QDict puts ``key`` in."""
    data = key.encode("utf-8")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, ch in enumerate(data):
        value = (value + (ch << ((i * 5) % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _BUCKETS


def qdict_order(d: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``d`` (one level) whose key order is QEMU's output order.

    ``d``'s own order is taken as the insertion order (QAPI output visitors insert
    members in schema order).
    """
    keys = tuple(d)
    order = _ORDERS.get(keys)
    if order is None:
        # stable sort on (bucket, -insertion index): same bucket -> newest first
        order = tuple(sorted(keys, key=lambda k: (bucket(k), -keys.index(k))))
        if len(_ORDERS) < 4096:
            _ORDERS[keys] = order
    return {k: d[k] for k in order}


_ORDERS: dict[tuple[str, ...], tuple[str, ...]] = {}
