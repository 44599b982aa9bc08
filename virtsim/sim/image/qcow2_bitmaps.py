"""The qcow2 bitmaps extension: directory entries, bitmap tables and bitmap data.

Pure encoding/decoding plus QEMU's constraint checks (block/qcow2-bitmap.c); the cluster
allocation that stores them lives in :mod:`.qcow2`.  Bitmaps are handled as sets of dirty
*granule indices* in a roaring bitmap, so cost follows the number of dirty runs, not the
disk size.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pyroaring import BitMap64

from ..errors import ImageError

BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = 0xFFFFFFFC  # QEMU treats extra-data-compatible as reserved too
BT_DIRTY_TRACKING_BITMAP = 1

BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1

_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes


@dataclass(frozen=True)
class StoredBitmapInfo:
    """One bitmap directory entry, as stored."""

    name: str
    granularity_bits: int
    flags: int
    table_offset: int
    table_size: int
    type: int = BT_DIRTY_TRACKING_BITMAP
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & BME_FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & BME_FLAG_AUTO)

    @property
    def qapi_flags(self) -> list[str]:
        """The ``flags`` list ``qemu-img info`` shows (Qcow2BitmapInfoFlags)."""
        out = []
        if self.in_use:
            out.append("in-use")
        if self.auto:
            out.append("auto")
        return out


def dir_entry_size(name_size: int, extra_data_size: int = 0) -> int:
    """calc_dir_entry_size: header + extra data + name, padded to 8."""
    return (_ENTRY.size + name_size + extra_data_size + 7) & ~7


def granule_count(disk_size: int, granularity: int) -> int:
    return (disk_size + granularity - 1) // granularity


def serialized_bytes(disk_size: int, granularity: int) -> int:
    """hbitmap_serialization_size for the whole bitmap: whole 64-bit words."""
    return (granule_count(disk_size, granularity) + 63) // 64 * 8


def table_size_for(disk_size: int, granularity: int, cluster_size: int) -> int:
    """Number of bitmap table entries (bitmap data clusters) QEMU uses for a bitmap."""
    return (serialized_bytes(disk_size, granularity) + cluster_size - 1) // cluster_size


def check_dir_entry(e: StoredBitmapInfo, cluster_size: int, disk_size: int) -> bool:
    """QEMU's check_dir_entry: True if the entry is acceptable."""
    if (e.table_size == 0 or e.table_offset == 0 or e.table_offset % cluster_size
            or e.table_size > BME_MAX_TABLE_SIZE
            or e.granularity_bits > BME_MAX_GRANULARITY_BITS
            or e.granularity_bits < BME_MIN_GRANULARITY_BITS
            or e.flags & BME_RESERVED_FLAGS
            or len(e.name.encode("utf-8", "surrogateescape")) > BME_MAX_NAME_SIZE
            or e.type != BT_DIRTY_TRACKING_BITMAP):
        return False
    phys = e.table_size * cluster_size
    if phys > BME_MAX_PHYS_SIZE:
        return False
    return bool(e.in_use or disk_size <= (phys * 8) << e.granularity_bits)


def parse_directory(data: bytes, nb_bitmaps: int, cluster_size: int,
                    disk_size: int) -> list[StoredBitmapInfo]:
    """bitmap_list_load: decode and validate the directory (QEMU's error texts)."""
    if not data:
        raise ImageError("Requested bitmap directory size is zero")
    if len(data) > MAX_DIRECTORY_SIZE:
        raise ImageError("Requested bitmap directory size is too big")
    out: list[StoredBitmapInfo] = []
    pos, end = 0, len(data)
    while pos < end:
        if pos + _ENTRY.size > end:
            raise ImageError("Broken bitmap directory")
        if len(out) + 1 > nb_bitmaps:
            raise ImageError("More bitmaps found than specified in header extension")
        (tb_off, tb_size, flags, btype, gbits, name_size,
         extra_size) = _ENTRY.unpack_from(data, pos)
        size = dir_entry_size(name_size, extra_size)
        if pos + size > end:
            raise ImageError("Broken bitmap directory")
        extra = data[pos + _ENTRY.size:pos + _ENTRY.size + extra_size]
        nstart = pos + _ENTRY.size + extra_size
        name = data[nstart:nstart + name_size].decode("utf-8", "surrogateescape")
        if extra_size:
            raise ImageError("Bitmap extra data is not supported")
        e = StoredBitmapInfo(name, gbits, flags, tb_off, tb_size, btype, bytes(extra))
        if not check_dir_entry(e, cluster_size, disk_size):
            raise ImageError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(e)
        pos += size
    if len(out) != nb_bitmaps:
        raise ImageError("Less bitmaps found than specified in header extension")
    return out


def build_directory(entries: Iterable[StoredBitmapInfo]) -> bytes:
    """bitmap_list_store's directory bytes (extra data is never written, like QEMU)."""
    out = bytearray()
    for e in entries:
        name = e.name.encode("utf-8", "surrogateescape")
        rec = _ENTRY.pack(e.table_offset, e.table_size, e.flags, BT_DIRTY_TRACKING_BITMAP,
                          e.granularity_bits, len(name), 0) + name
        out += rec + bytes(dir_entry_size(len(name)) - len(rec))
    return bytes(out)


def check_table_entry(entry: int, cluster_size: int) -> bool:
    """QEMU's check_table_entry: True if a bitmap table entry is valid."""
    if entry & BME_TABLE_ENTRY_RESERVED_MASK:
        return False
    off = entry & BME_TABLE_ENTRY_OFFSET_MASK
    if off:
        if entry & BME_TABLE_ENTRY_FLAG_ALL_ONES or off % cluster_size:
            return False
    return True


# ----- constraints (the errors QMP's block-dirty-bitmap-add reports) ------------------------

def check_constraints(name: str, granularity: int, disk_size: int,
                      cluster_size: int) -> str | None:
    """check_constraints_on_bitmap: the reason a bitmap cannot be stored, or None."""
    if granularity <= 0 or granularity & (granularity - 1):
        return "Granularity must be a power of 2"
    gbits = granularity.bit_length() - 1
    if gbits > BME_MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << BME_MAX_GRANULARITY_BITS} bytes)"
    if gbits < BME_MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << BME_MIN_GRANULARITY_BITS} bytes)"
    bitmap_bytes = serialized_bytes(disk_size, granularity)
    if bitmap_bytes > BME_MAX_PHYS_SIZE or bitmap_bytes > BME_MAX_TABLE_SIZE * cluster_size:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name.encode("utf-8", "surrogateescape")) > BME_MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)"
    return None


def can_store_new(name: str, granularity: int, disk_size: int, cluster_size: int,
                  version: int, existing_names: Iterable[str]) -> str | None:
    """qcow2_co_can_store_new_dirty_bitmap without the prefix and the duplicate check.

    ``existing_names`` are the node's other persistent bitmaps.  The caller prepends
    "Can't make bitmap 'N' persistent in 'NODE': ".
    """
    if version < 3:
        return "Cannot store dirty bitmaps in qcow2 v2 files"
    err = check_constraints(name, granularity, disk_size, cluster_size)
    if err:
        return err
    count = 1
    dir_size = dir_entry_size(len(name.encode("utf-8", "surrogateescape")))
    for other in existing_names:
        count += 1
        dir_size += dir_entry_size(len(other.encode("utf-8", "surrogateescape")))
    if count > MAX_BITMAPS:
        return "Maximum number of persistent bitmaps is already reached"
    if dir_size > MAX_DIRECTORY_SIZE:
        return "Not enough space in the bitmap directory"
    return None


# ----- bitmap data: one bit per granule, LSB first, 64-bit little-endian words ----------------
#
# The on-disk layout of a bitmap is exactly a roaring "bitset container" stream: 8 KiB of it
# cover 65536 granules, LSB first.  Converting through pyroaring's portable serialization
# keeps the work in C: dense chunks are copied as bitset containers, sparse chunks are
# padded into bitset form and the padding removed afterwards.

CHUNK_BYTES = _CHUNK = 8192  # bytes of bitmap data per roaring container (65536 granules)
_COOKIE_NO_RUN = 12346
_COOKIE_RUN = 12347
_ZERO_CHUNK = bytes(_CHUNK)
_LITTLE = sys.byteorder == "little"
_BIT_POSITIONS: tuple[tuple[int, ...], ...] = tuple(
    tuple(b for b in range(8) if v >> b & 1) for v in range(256))
_NZ_TO_ONE = bytes([0] + [1] * 255)


def _positions(chunk: bytes) -> array[int]:
    """Sorted bit positions set in a (sparse) chunk, as a uint16 array."""
    out: list[int] = []
    ext = out.extend
    marks = chunk.translate(_NZ_TO_ONE)
    i = marks.find(1)
    while i >= 0:
        ext(map((i * 8).__add__, _BIT_POSITIONS[chunk[i]]))
        i = marks.find(1, i + 1)
    return array("H", out)


def _u16le(a: array[int]) -> bytes:
    if not _LITTLE:
        a = array("H", a)
        a.byteswap()
    return a.tobytes()


def bits_from_chunks(chunks: Iterable[tuple[int, bytes]], total_granules: int) -> BitMap64:
    """Granule set from (chunk_index, up to 8 KiB of bitmap data) pairs in increasing order.

    ``chunk_index`` k holds granules [k*65536, (k+1)*65536).  Bits at or past
    ``total_granules`` are dropped.
    """
    buckets: dict[int, list[tuple[int, int, bytes]]] = {}
    padding: list[tuple[int, int]] = []
    for k, data in chunks:
        if len(data) < _CHUNK:
            data = data + bytes(_CHUNK - len(data))
        if data == _ZERO_CHUNK:
            continue
        card = int.from_bytes(data, "little").bit_count()
        base = k << 16
        if card <= 4096:
            need = (4097 - card + 7) // 8
            z = data.find(bytes(need))
            if z >= 0:
                # pad into a valid bitset container; the padding is removed below
                buf = bytearray(data)
                buf[z:z + need] = b"\xff" * need
                data = bytes(buf)
                card += need * 8
                padding.append((base + z * 8, base + (z + need) * 8))
            else:
                buckets.setdefault(k >> 16, []).append((k & 0xFFFF, card,
                                                        _u16le(_positions(data))))
                continue
        buckets.setdefault(k >> 16, []).append((k & 0xFFFF, card, data))
    parts = [struct.pack("<Q", len(buckets))]
    for high in sorted(buckets):
        conts = buckets[high]
        n = len(conts)
        head = bytearray(struct.pack("<II", _COOKIE_NO_RUN, n))
        for key, card, _ in conts:
            head += struct.pack("<HH", key, card - 1)
        offset = len(head) + 4 * n
        for _key, _card, payload in conts:
            head += struct.pack("<I", offset)
            offset += len(payload)
        parts.append(struct.pack("<I", high))
        parts.append(bytes(head))
        parts.extend(payload for _k, _c, payload in conts)
    out = BitMap64.deserialize(b"".join(parts))
    for lo, hi in padding:
        out.remove_range(lo, hi)
    if out and out.max() >= total_granules:
        out.remove_range(total_granules, out.max() + 1)
    return out


def _set_range(buf: bytearray, lo: int, hi: int) -> None:
    """Set bits [lo, hi) of a little-endian bit buffer."""
    if lo >= hi:
        return
    b0, b1 = lo >> 3, (hi - 1) >> 3
    if b0 == b1:
        buf[b0] |= ((1 << (hi - lo)) - 1) << (lo & 7)
        return
    buf[b0] |= (0xFF << (lo & 7)) & 0xFF
    if b1 > b0 + 1:
        buf[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
    buf[b1] |= (1 << (((hi - 1) & 7) + 1)) - 1


def chunks_from_bits(bits: BitMap64) -> Iterator[tuple[int, bytes]]:
    """(chunk_index, 8 KiB of bitmap data) for every non-empty 65536-granule chunk, in order.

    Walks pyroaring's portable serialization: bitset containers are copied, run
    containers filled by slices, array containers bit by bit.
    """
    blob = bits.serialize()
    nb = struct.unpack_from("<Q", blob, 0)[0]
    pos = 8
    for _ in range(nb):
        high, cookie = struct.unpack_from("<II", blob, pos)
        pos += 8
        if cookie & 0xFFFF == _COOKIE_RUN:
            n = (cookie >> 16) + 1
            runmask = blob[pos:pos + (n + 7) // 8]
            pos += (n + 7) // 8
            has_offsets = n >= 4
        elif cookie == _COOKIE_NO_RUN:
            n = struct.unpack_from("<I", blob, pos)[0]
            pos += 4
            runmask = b""
            has_offsets = True
        else:
            raise ImageError("unexpected roaring serialization")
        desc = struct.unpack_from(f"<{2 * n}H", blob, pos)
        pos += 4 * n
        if has_offsets:
            pos += 4 * n
        for i in range(n):
            key, card = desc[2 * i], desc[2 * i + 1] + 1
            index = (high << 16) | key
            if runmask and runmask[i >> 3] >> (i & 7) & 1:
                nruns = struct.unpack_from("<H", blob, pos)[0]
                runs = struct.unpack_from(f"<{2 * nruns}H", blob, pos + 2)
                pos += 2 + 4 * nruns
                buf = bytearray(_CHUNK)
                for j in range(0, 2 * nruns, 2):
                    _set_range(buf, runs[j], runs[j] + runs[j + 1] + 1)
                yield index, bytes(buf)
            elif card > 4096:
                yield index, blob[pos:pos + _CHUNK]
                pos += _CHUNK
            else:
                vals = struct.unpack_from(f"<{card}H", blob, pos)
                pos += 2 * card
                buf = bytearray(_CHUNK)
                for v in vals:
                    buf[v >> 3] |= 1 << (v & 7)
                yield index, bytes(buf)
