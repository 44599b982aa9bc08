"""The qcow2 header and its extensions (docs/interop/qcow2.txt), parsed and built like QEMU.

Parsing raises :class:`ImageError` with QEMU's wording; building reproduces what QEMU 7.2's
``qcow2_update_header`` writes, byte for byte, so that images look as if QEMU wrote them.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass, field

from ..errors import ImageError

QCOW_MAGIC = 0x514649FB

# header field offsets (big-endian)
OFF_BACKING_FILE_OFFSET = 8
OFF_SIZE = 24
OFF_L1_SIZE = 36
OFF_L1_TABLE_OFFSET = 40
OFF_REFCOUNT_TABLE_OFFSET = 48
OFF_INCOMPAT = 72
V2_HEADER_SIZE = 72
V3_HEADER_MIN = 104
V3_HEADER_SIZE = 112  # with the compression type byte and its padding (QEMU >= 5.1)

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

FEAT_INCOMPAT, FEAT_COMPAT, FEAT_AUTOCLEAR = 0, 1, 2
# The feature name table QEMU 7.2 writes into every v3 image, in its order.
FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (FEAT_INCOMPAT, 0, "dirty bit"),
    (FEAT_INCOMPAT, 1, "corrupt bit"),
    (FEAT_INCOMPAT, 2, "external data file"),
    (FEAT_INCOMPAT, 3, "compression type"),
    (FEAT_INCOMPAT, 4, "extended L2 entries"),
    (FEAT_COMPAT, 0, "lazy refcounts"),
    (FEAT_AUTOCLEAR, 0, "bitmaps"),
    (FEAT_AUTOCLEAR, 1, "raw external data"),
)

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_SIZE = 0x2000000  # bytes
MAX_REFTABLE_SIZE = 0x800000  # QEMU's QCOW_MAX_REFTABLE_SIZE (8 MiB)
MAX_BACKING_FILE_NAME = 1023
BACKING_FORMAT_MAX = 15  # sizeof(bs->backing_format) - 1
INT64_MAX = (1 << 63) - 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

_LITTLE = sys.byteorder == "little"

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")


@dataclass
class Qcow2Header:
    """Every header field plus the extensions QEMU understands (and the ones it keeps)."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_SIZE
    compression_type: int = COMPRESSION_ZLIB
    unknown_header_fields: bytes = b""
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    # feature name table read from the image: (type, bit) -> name
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    # bitmaps extension: (nb_bitmaps, directory_size, directory_offset); None if absent/ignored
    bitmaps_ext: tuple[int, int, int] | None = None
    bitmaps_ext_ignored: bool = False  # present but the autoclear bit was clear
    # unknown extensions, kept in the order QEMU keeps them (it prepends: reversed)
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def _u32(data: bytes, off: int) -> int:
    return int.from_bytes(data[off:off + 4], "big")


def parse_header(data: bytes, file_size: int | None = None) -> Qcow2Header:
    """Parse the header cluster (``data`` holds at least the whole first cluster if any).

    Mirrors qcow2_do_open's checks in order, with its error texts.
    """
    if len(data) < V2_HEADER_SIZE:
        data = data + bytes(V2_HEADER_SIZE - len(data))
    (magic, version, backing_off, backing_size, cluster_bits, size, crypt, l1_size, l1_off,
     rt_off, rt_clusters, nb_snap, snap_off) = _V2.unpack_from(data, 0)
    if magic != QCOW_MAGIC:
        raise ImageError("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise ImageError(f"Unsupported qcow2 version {version}")
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS:
        raise ImageError(f"Unsupported cluster size: 2^{cluster_bits}")
    h = Qcow2Header(version=version, backing_file_offset=backing_off,
                    backing_file_size=backing_size, cluster_bits=cluster_bits, size=size,
                    crypt_method=crypt, l1_size=l1_size, l1_table_offset=l1_off,
                    refcount_table_offset=rt_off, refcount_table_clusters=rt_clusters,
                    nb_snapshots=nb_snap, snapshots_offset=snap_off)
    cs = 1 << cluster_bits
    if version == 2:
        h.header_length = V2_HEADER_SIZE
    else:
        if len(data) < V3_HEADER_MIN:
            data = data + bytes(V3_HEADER_MIN - len(data))
        (h.incompatible_features, h.compatible_features, h.autoclear_features,
         h.refcount_order, h.header_length) = _V3.unpack_from(data, V2_HEADER_SIZE)
        if h.header_length < V3_HEADER_MIN:
            raise ImageError("qcow2 header too short")
        if h.header_length > cs:
            raise ImageError("qcow2 header exceeds cluster size")
        if h.header_length > V3_HEADER_MIN:
            if len(data) < h.header_length:
                data = data + bytes(h.header_length - len(data))
            h.compression_type = data[V3_HEADER_MIN]
        if h.header_length > V3_HEADER_SIZE:
            h.unknown_header_fields = bytes(data[V3_HEADER_SIZE:h.header_length])
    if h.backing_file_offset > cs:
        raise ImageError("Invalid backing file offset")

    ext_end = h.backing_file_offset if h.backing_file_offset else cs
    _parse_extensions(h, data, h.header_length if version == 3 else V2_HEADER_SIZE, ext_end)

    if h.incompatible_features & ~INCOMPAT_MASK:
        raise ImageError("Unsupported qcow2 feature(s): "
                         + _describe_features(h, h.incompatible_features & ~INCOMPAT_MASK))
    if h.refcount_order > 6:
        raise ImageError("Reference count entry width too large; may not exceed 64 bits")
    if h.version >= 3 and h.header_length > V3_HEADER_MIN:
        if h.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
            raise ImageError(f"qcow2: unknown compression type: {h.compression_type}")
        if h.compression_type == COMPRESSION_ZLIB and \
                h.incompatible_features & INCOMPAT_COMPRESSION:
            raise ImageError("qcow2: Compression type incompatible feature bit must not be "
                             "set if compression type is zlib")
        if h.compression_type != COMPRESSION_ZLIB and \
                not h.incompatible_features & INCOMPAT_COMPRESSION:
            raise ImageError("qcow2: Compression type incompatible feature bit must be set "
                             "if compression type is not zlib")

    if h.backing_file_offset:
        n = h.backing_file_size
        if n > min(MAX_BACKING_FILE_NAME, cs - h.backing_file_offset) or n >= 4096:
            raise ImageError("Backing file name too long")
        raw = bytes(data[h.backing_file_offset:h.backing_file_offset + n])
        h.backing_file = raw.decode("utf-8", "surrogateescape")

    if h.l1_size > MAX_L1_SIZE // 8:
        raise ImageError("Active L1 table too large")
    _validate_table(h, h.refcount_table_offset, h.refcount_table_clusters * cs, 1,
                    MAX_REFTABLE_SIZE, "Reference count table")
    if h.refcount_table_clusters == 0:
        raise ImageError("Image does not contain a reference count table")
    _validate_table(h, h.snapshots_offset, h.nb_snapshots, 40, 65536 * 1024,
                    "Snapshot table")
    _validate_table(h, h.l1_table_offset, h.l1_size, 8, MAX_L1_SIZE, "Active L1 table")
    return h


def _validate_table(h: Qcow2Header, offset: int, entries: int, entry_len: int,
                    max_bytes: int, name: str) -> None:
    if entries > max_bytes // entry_len:
        raise ImageError(f"{name} too large")
    if INT64_MAX - entries * entry_len < offset or offset & (h.cluster_size - 1):
        raise ImageError(f"{name} offset invalid")


def _describe_features(h: Qcow2Header, mask: int) -> str:
    """QEMU's report_unsupported_feature: names from the image's table, else the bits."""
    parts: list[str] = []
    rest = mask
    for (ftype, bit), name in h.feature_names.items():
        if ftype == FEAT_INCOMPAT and mask & (1 << bit):
            parts.append(name)
            rest &= ~(1 << bit)
    if rest:
        parts.append(f"Unknown incompatible feature: {rest:x}")
    return ", ".join(parts)


def _parse_extensions(h: Qcow2Header, data: bytes, start: int, end: int) -> None:
    off = start
    while off < end:
        if off + 8 > len(data):
            data = data + bytes(off + 8 - len(data))
        magic, length = _EXT.unpack_from(data, off)
        off += 8
        if off > end or length > end - off:
            raise ImageError("Header extension too large")
        payload = bytes(data[off:off + length])
        if magic == EXT_END:
            return
        if magic == EXT_BACKING_FORMAT:
            if length > BACKING_FORMAT_MAX:
                raise ImageError(f"ERROR: ext_backing_format: len={length} too large (>=16)")
            h.backing_format = payload.decode("utf-8", "surrogateescape")
        elif magic == EXT_FEATURE_TABLE:
            for i in range(0, length - length % 48, 48):
                name = payload[i + 2:i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                h.feature_names[(payload[i], payload[i + 1])] = name
        elif magic == EXT_BITMAPS:
            if length != 24:
                raise ImageError("bitmaps_ext: Invalid extension length")
            if not h.autoclear_features & AUTOCLEAR_BITMAPS:
                h.bitmaps_ext_ignored = True
            else:
                nb, reserved, dir_size, dir_off = struct.unpack(">IIQQ", payload)
                if reserved:
                    raise ImageError("bitmaps_ext: Reserved field is not zero")
                if nb > 65535:
                    raise ImageError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU "
                                     "supported maximum of 65535")
                if nb == 0:
                    raise ImageError("found bitmaps extension with zero bitmaps")
                if dir_off & (h.cluster_size - 1):
                    raise ImageError("bitmaps_ext: invalid bitmap directory offset")
                if dir_size > 1024 * 65535:
                    raise ImageError(f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds "
                                     f"the maximum supported size ({1024 * 65535})")
                h.bitmaps_ext = (nb, dir_size, dir_off)
        elif magic == EXT_DATA_FILE:
            h.data_file = payload.decode("utf-8", "surrogateescape")
        else:
            h.unknown_extensions.insert(0, (magic, payload))
        off += (length + 7) & ~7


def _ext(magic: int, payload: bytes) -> bytes:
    pad = (-len(payload)) & 7
    return _EXT.pack(magic, len(payload)) + payload + bytes(pad)


def _feature_table() -> bytes:
    out = bytearray()
    for ftype, bit, name in FEATURE_TABLE:
        out += bytes([ftype, bit]) + name.encode().ljust(46, b"\0")
    return bytes(out)


def build_header(h: Qcow2Header) -> bytes:
    """The header cluster exactly as qcow2_update_header writes it (a whole cluster)."""
    cs = h.cluster_size
    buf = bytearray(cs)
    header_length = V3_HEADER_SIZE + len(h.unknown_header_fields)
    rt_clusters = h.refcount_table_clusters
    _V2.pack_into(buf, 0, QCOW_MAGIC, h.version, 0, 0, h.cluster_bits, h.size,
                  h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
                  rt_clusters, h.nb_snapshots, h.snapshots_offset)
    if h.version >= 3:
        _V3.pack_into(buf, V2_HEADER_SIZE, h.incompatible_features, h.compatible_features,
                      h.autoclear_features, h.refcount_order, header_length)
        buf[V3_HEADER_MIN] = h.compression_type
        pos = V3_HEADER_SIZE
        buf[pos:pos + len(h.unknown_header_fields)] = h.unknown_header_fields
        pos += len(h.unknown_header_fields)
    else:
        pos = V2_HEADER_SIZE
    exts = bytearray()
    if h.backing_format:
        exts += _ext(EXT_BACKING_FORMAT, h.backing_format.encode("utf-8", "surrogateescape"))
    if h.data_file:
        exts += _ext(EXT_DATA_FILE, h.data_file.encode("utf-8", "surrogateescape"))
    if h.version >= 3 and cs > 4096:  # QEMU skips the table in small header clusters
        exts += _ext(EXT_FEATURE_TABLE, _feature_table())
    if h.bitmaps_ext is not None:
        nb, dir_size, dir_off = h.bitmaps_ext
        exts += _ext(EXT_BITMAPS, struct.pack(">IIQQ", nb, 0, dir_size, dir_off))
    for magic, payload in h.unknown_extensions:
        exts += _ext(magic, payload)
    exts += _EXT.pack(EXT_END, 0)
    if pos + len(exts) > cs:
        raise ImageError("qcow2 header does not fit in the first cluster")
    buf[pos:pos + len(exts)] = exts
    pos += len(exts)
    if h.backing_file:
        name = h.backing_file.encode("utf-8", "surrogateescape")
        if pos + len(name) > cs:
            raise ImageError("Backing file name too long")
        buf[pos:pos + len(name)] = name
        struct.pack_into(">QI", buf, OFF_BACKING_FILE_OFFSET, pos, len(name))
        h.backing_file_offset, h.backing_file_size = pos, len(name)
    else:
        h.backing_file_offset, h.backing_file_size = 0, 0
    h.header_length = header_length if h.version >= 3 else V2_HEADER_SIZE
    return bytes(buf)


# ----- big-endian tables -------------------------------------------------------------------

def load_u64(data: bytes) -> array[int]:
    """Big-endian u64 table -> native array (one C-level pass)."""
    a = array("Q")
    a.frombytes(data[:len(data) - len(data) % 8])
    if _LITTLE:
        a.byteswap()
    return a


def dump_u64(a: array[int], start: int = 0, stop: int | None = None) -> bytes:
    b = a[start:stop] if (start or stop is not None) else array("Q", a)
    if _LITTLE:
        b.byteswap()
    return b.tobytes()


class RefcountCodec:
    """Refcount block (de)serialisation for every width QEMU allows (1..64 bits).

    Entries live in an ``array`` with one item per refcount; sub-byte widths are packed
    least-significant-bits first like QEMU's get/set_refcount_ro0..2.
    """

    def __init__(self, order: int, cluster_size: int) -> None:
        self.order = order
        self.bits = 1 << order
        self.max = (1 << self.bits) - 1
        self.entries = cluster_size * 8 // self.bits
        self.cluster_size = cluster_size
        if order <= 3:
            self.typecode = "B"
        elif order == 4:
            self.typecode = "H"
        elif order == 5:
            self.typecode = "I" if array("I").itemsize == 4 else "L"
        else:
            self.typecode = "Q"
        self.per_byte = 8 // self.bits if order < 3 else 0
        self._zero = array(self.typecode, bytes(array(self.typecode).itemsize * self.entries))

    def empty(self) -> array[int]:
        return array(self.typecode, self._zero)

    def decode(self, data: bytes) -> array[int]:
        if len(data) < self.cluster_size:
            data = data + bytes(self.cluster_size - len(data))
        if self.per_byte:
            per, w = self.per_byte, self.bits
            mask = (1 << w) - 1
            out = array("B", bytes(self.entries))
            for k in range(per):
                table = bytes(((v >> (k * w)) & mask) for v in range(256))
                out[k::per] = array("B", data.translate(table))
            return out
        a = array(self.typecode)
        a.frombytes(data[:self.cluster_size])
        if _LITTLE and a.itemsize > 1:
            a.byteswap()
        return a

    def encode(self, a: array[int]) -> bytes:
        if self.per_byte:
            per, w = self.per_byte, self.bits
            mask = (1 << w) - 1
            acc = 0
            for k in range(per):
                table = bytes((((v & mask) << (k * w)) & 0xFF) for v in range(256))
                acc |= int.from_bytes(a[k::per].tobytes().translate(table), "little")
            return acc.to_bytes(self.cluster_size, "little")
        if _LITTLE and a.itemsize > 1:
            b = array(self.typecode, a)
            b.byteswap()
            return b.tobytes()
        return a.tobytes()
