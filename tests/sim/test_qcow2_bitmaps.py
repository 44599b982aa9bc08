"""The qcow2 bitmaps extension against qemu-img bitmap and a real QEMU 7.2."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from tests.sim import image_oracle as oracle
from virtsim.sim.errors import ImageError
from virtsim.sim.image import qcow2_bitmaps as bmx
from virtsim.sim.image.qcow2 import Qcow2Format
from virtsim.sim.image.store import FileStore, MemoryStore

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.fixture
def tools() -> None:
    oracle.require("qemu-img", "qemu-io")


@pytest.fixture
def qemu() -> None:
    oracle.require("qemu-img", "qemu-io", "qemu-system-x86_64")


def _open(p: Path, readonly: bool = False) -> Qcow2Format:
    return Qcow2Format.open(FileStore(str(p), readonly=readonly), readonly=readonly)


def _naive_bits(data: bytes, first: int, count: int) -> set[int]:
    return {first + i for i in range(count) if data[i >> 3] >> (i & 7) & 1}


# ----- codec ---------------------------------------------------------------------------------

@st.composite
def granule_sets(draw: st.DrawFn) -> BitMap64:
    bits = BitMap64()
    span = draw(st.sampled_from([1 << 12, 1 << 17, 1 << 20]))
    for _ in range(draw(st.integers(0, 4))):
        lo = draw(st.integers(0, span))
        bits.add_range(lo, lo + draw(st.integers(1, 70000)))
    bits.update(draw(st.lists(st.integers(0, span + 80000), max_size=300)))
    if draw(st.booleans()):
        rnd = random.Random(draw(st.integers(0, 1000)))
        base = draw(st.integers(0, 3)) << 16
        bits.update(rnd.sample(range(base, base + 65536), draw(st.sampled_from([10, 4000, 4200,
                                                                            30000]))))
    return bits


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(granule_sets())
def test_chunk_codec_roundtrip(bits: BitMap64) -> None:
    chunks = list(bmx.chunks_from_bits(bits))
    assert [k for k, _ in chunks] == sorted({g >> 16 for g in bits})
    for k, data in chunks:
        assert len(data) == 8192
        want = {g for g in bits if g >> 16 == k}
        if len(want) < 3000:
            assert _naive_bits(data, k << 16, 65536) == want
    total = (bits.max() + 1) if bits else 0
    assert bmx.bits_from_chunks(chunks, total) == bits
    if bits:
        cut = bits.max() // 2
        assert bmx.bits_from_chunks(chunks, cut) == BitMap64(g for g in bits if g < cut)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=granule_sets(), cs=st.sampled_from([512, 4096, 65536, 2 * M]),
       gran=st.sampled_from([512, 4096]))
def test_store_load_roundtrip_any_cluster_size(bits: BitMap64, cs: int, gran: int) -> None:
    size = 64 * M if gran == 512 else 4 * G
    total = bmx.granule_count(size, gran)
    f = Qcow2Format.create(MemoryStore(), size, cluster_size=cs)
    f.store_bitmaps([("a", gran, True, False, bits), ("b", gran * 2, False, False, BitMap64())])
    assert f.load_bitmap("a") == BitMap64(g for g in bits if g < total)
    assert f.load_bitmap("b") == BitMap64()
    assert f.check().clean
    f.close()


def test_all_ones_table_entries_are_read() -> None:
    """QEMU never writes them, but the spec allows bit 0 of an entry: every bit set."""
    s = MemoryStore()
    f = Qcow2Format.create(s, 64 * M, cluster_size=512)
    f.store_bitmaps([("x", 512, True, False, BitMap64([5]))])
    e = f.stored_bitmaps()[0]
    table = bytearray(s.pread(e.table_offset, e.table_size * 8))
    table[8 * 3 + 7] = 1  # entry 3: offset 0, all ones
    s.pwrite(e.table_offset, bytes(table))
    bits = f.load_bitmap("x")
    assert 5 in bits and bits.range_cardinality(3 * 4096, 4 * 4096) == 4096
    assert len(bits) == 4097
    f.close()


# ----- what qemu-img bitmap writes ---------------------------------------------------------

def test_loads_qemu_img_bitmaps(tmp_path: Path, tools: None) -> None:
    p, src = tmp_path / "b.qcow2", tmp_path / "src.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", p, str(64 * M))
    oracle.qemu_img("bitmap", "--add", p, "b0")
    oracle.qemu_img("bitmap", "--add", "-g", "512k", p, "second")
    oracle.qemu_img("bitmap", "--add", "--disable", p, "third")
    oracle.qemu_img("bitmap", "--enable", p, "third")
    oracle.qemu_img("bitmap", "--disable", p, "b0")
    f = _open(p, readonly=True)
    got = [(b.name, b.granularity, b.auto, b.in_use) for b in f.stored_bitmaps()]
    assert got == [("b0", 65536, False, False), ("second", 524288, True, False),
                   ("third", 65536, True, False)]
    assert all(f.load_bitmap(n) == BitMap64() for n, *_ in got)
    f.close()
    # merge bits from another image's bitmap (written by virtsim)
    oracle.qemu_img("create", "-q", "-f", "qcow2", src, str(64 * M))
    g = _open(src)
    want = BitMap64([0, 1, 2, 500, 1023])
    g.store_bitmaps([("s", 65536, True, False, want)])
    g.close()
    oracle.qemu_img("bitmap", "--merge", "s", "-F", "qcow2", "-b", src, p, "b0")
    f = _open(p, readonly=True)
    assert f.load_bitmap("b0") == want
    assert f.format_specific()["bitmaps"] == oracle.info(p)["format-specific"]["data"]["bitmaps"]
    f.close()
    oracle.assert_clean(p)


def test_ignored_extension_when_autoclear_bit_is_clear(tmp_path: Path, tools: None) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", a, str(M))
    oracle.qemu_img("bitmap", "--add", a, "x")
    with open(a, "r+b") as fh:  # a program without bitmap support touched the image
        fh.seek(88)
        fh.write(bytes(8))
    shutil.copy(a, b)
    f = _open(b, readonly=True)
    assert f.stored_bitmaps() == [] and f.warnings
    f.close()
    oracle.qemu_io(a, "read 0 512")  # a writable open drops the stale extension
    _open(b).close()
    assert a.read_bytes() == b.read_bytes()


# ----- real QEMU reads what we store, we read what it stores ----------------------------------

def test_qemu_written_bits_load(tmp_path: Path, qemu: None) -> None:
    p = tmp_path / "x.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", p, str(64 * M))
    oracle.qemu_img("bitmap", "--add", p, "b0")
    oracle.qemu_img("bitmap", "--add", "-g", "4k", p, "small")
    r = oracle.qmp(oracle.blockdev_add(p), oracle.hmp_qemu_io("n0", "write 0 64k"),
                   oracle.hmp_qemu_io("n0", "write 1M 4k"),
                   oracle.hmp_qemu_io("n0", "write 10M 3M"),
                   oracle.hmp_qemu_io("n0", "write 60M 100k"),
                   {"execute": "x-debug-block-dirty-bitmap-sha256",
                    "arguments": {"node": "n0", "name": "b0"}},
                   {"execute": "x-debug-block-dirty-bitmap-sha256",
                    "arguments": {"node": "n0", "name": "small"}})
    assert all("return" in x for x in r), r
    f = _open(p, readonly=True)
    assert [b.in_use for b in f.stored_bitmaps()] == [False, False]
    for name, gran, reply in (("b0", 65536, r[-2]), ("small", 4096, r[-1])):
        bits = f.load_bitmap(name)
        assert oracle.hbitmap_sha256(bits, 64 * M, gran) == reply["return"]["sha256"]
    assert f.load_bitmap("b0") == BitMap64([0, 16, *range(160, 208), *range(960, 962)])
    f.close()


def test_qemu_loads_what_we_store(tmp_path: Path, qemu: None) -> None:
    p = tmp_path / "y.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", p, str(256 * M))
    f = _open(p)
    rnd = random.Random(7)
    on = BitMap64(rnd.sample(range(4096), 300))
    on.add_range(1000, 1500)
    fine = BitMap64(range(0, 512 * 1024, 3))
    f.write(0, b"\1" * M)
    f.store_bitmaps([("on", 65536, True, False, on), ("off", 131072, False, False, BitMap64()),
                     ("fine", 512, True, False, fine)])
    f.close()
    oracle.assert_clean(p)
    flags = [(b["name"], b["flags"], b["granularity"])
             for b in oracle.info(p)["format-specific"]["data"]["bitmaps"]]
    assert flags == [("on", ["auto"], 65536), ("off", [], 131072), ("fine", ["auto"], 512)]
    r = oracle.qmp(oracle.blockdev_add(p),
                   *({"execute": "x-debug-block-dirty-bitmap-sha256",
                      "arguments": {"node": "n0", "name": n}} for n in ("on", "off", "fine")),
                   {"execute": "query-named-block-nodes", "arguments": {"flat": True}})
    assert r[1]["return"]["sha256"] == oracle.hbitmap_sha256(on, 256 * M, 65536)
    assert r[2]["return"]["sha256"] == oracle.hbitmap_sha256(BitMap64(), 256 * M, 131072)
    assert r[3]["return"]["sha256"] == oracle.hbitmap_sha256(fine, 256 * M, 512)
    node = next(n for n in r[4]["return"] if n["node-name"] == "n0")
    seen = {b["name"]: (b["count"], b["recording"], b.get("inconsistent", False))
            for b in node["dirty-bitmaps"]}
    assert seen == {"on": (len(on) * 65536, True, False), "off": (0, False, False),
                    "fine": (len(fine) * 512, True, False)}


def test_session_is_byte_identical_to_qemu(tmp_path: Path, qemu: None) -> None:
    """Open rw, write, add a bitmap, close: QEMU and virtsim leave the same bytes."""
    x = tmp_path / "x.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", x, str(64 * M))
    oracle.qemu_img("bitmap", "--add", x, "b0")
    oracle.qemu_img("bitmap", "--add", "-g", "4k", x, "small")
    oracle.qmp(oracle.blockdev_add(x), oracle.hmp_qemu_io("n0", "write 0 64k"),
               oracle.hmp_qemu_io("n0", "write 10M 3M"))
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    shutil.copy(x, a)
    shutil.copy(x, b)
    writes = [(0, 65536), (5 << 20, 70000), (30 << 20, 1 << 20)]
    r = oracle.qmp(oracle.blockdev_add(a),
                   *(oracle.hmp_qemu_io("n0", f"write {o} {n}") for o, n in writes),
                   {"execute": "block-dirty-bitmap-add",
                    "arguments": {"node": "n0", "name": "new", "persistent": True,
                                  "granularity": 131072}},
                   oracle.hmp_qemu_io("n0", "write 40M 64k"))
    assert all("return" in x for x in r), r

    f = _open(b)
    bms = {e.name: (e.granularity, e.auto, f.load_bitmap(e.name)) for e in f.stored_bitmaps()}
    f.set_bitmaps_in_use(True)

    def dirty(o: int, n: int) -> None:
        for g, _auto, bits in bms.values():
            bits.add_range(o // g, (o + n - 1) // g + 1)

    for o, n in writes:
        f.write(o, b"\xcd" * n)
        dirty(o, n)
    bms["new"] = (131072, True, BitMap64())
    f.write(40 << 20, b"\xcd" * 65536)
    dirty(40 << 20, 65536)
    f.store_bitmaps([(n, g, a_, False, bits) for n, (g, a_, bits) in bms.items()])
    f.close()
    assert a.read_bytes() == b.read_bytes()


def test_inconsistent_bitmap_and_removal_match_qemu(tmp_path: Path, qemu: None) -> None:
    """In-use at open means inconsistent: kept as is, like QEMU; remove rewrites the dir."""
    c = tmp_path / "crashed.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", c, str(64 * M))
    oracle.qemu_img("bitmap", "--add", c, "b0")
    oracle.qemu_img("bitmap", "--add", "-g", "4k", c, "small")
    f = _open(c)
    f.set_bitmaps_in_use(True)  # ...and the process dies before storing
    f.close()
    flags = [b["flags"] for b in oracle.info(c)["format-specific"]["data"]["bitmaps"]]
    assert flags == [["in-use", "auto"], ["in-use", "auto"]]
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    shutil.copy(c, a)
    shutil.copy(c, b)
    r = oracle.qmp(oracle.blockdev_add(a), {"execute": "query-named-block-nodes"},
                   {"execute": "block-dirty-bitmap-add",
                    "arguments": {"node": "n0", "name": "fresh", "persistent": True}},
                   oracle.hmp_qemu_io("n0", "write 2M 64k"),
                   {"execute": "block-dirty-bitmap-remove",
                    "arguments": {"node": "n0", "name": "small"}},
                   oracle.hmp_qemu_io("n0", "write 3M 64k"))
    assert all("return" in x for x in r), r
    node = next(n for n in r[1]["return"] if n["node-name"] == "n0")
    assert [(x["name"], x.get("inconsistent")) for x in node["dirty-bitmaps"]] == \
        [("small", True), ("b0", True)]

    f = _open(b)
    assert [(e.name, e.in_use) for e in f.stored_bitmaps()] == [("b0", True), ("small", True)]
    assert f.load_bitmap("b0") == BitMap64()  # in-use data is never trusted
    f.set_bitmaps_in_use(True)
    fresh = BitMap64()
    f.write(2 << 20, b"\xcd" * 65536)
    fresh.add(32)
    f.store_bitmaps([("b0", 65536, True, True, None)])  # remove "small", keep b0's table
    f.write(3 << 20, b"\xcd" * 65536)
    fresh.add(48)
    f.store_bitmaps([("b0", 65536, True, True, None), ("fresh", 65536, True, False, fresh)])
    f.close()
    assert a.read_bytes() == b.read_bytes()
    oracle.assert_clean(b)


# ----- scale, constraints ---------------------------------------------------------------------

def test_huge_sparse_bitmap_is_small_and_fast(tmp_path: Path, tools: None) -> None:
    p = tmp_path / "big.qcow2"
    f = Qcow2Format.create(FileStore.create(str(p)), 16 * T)
    n = 16 * T // 65536
    rnd = random.Random(1)
    bits = BitMap64(rnd.sample(range(n), n // 1000))  # 0.1% dirty, scattered
    bits.add_range(1000, 200000)
    t0 = time.monotonic()
    f.store_bitmaps([("b", 65536, True, False, bits)])
    f.close()
    t_store = time.monotonic() - t0
    t0 = time.monotonic()
    g = _open(p, readonly=True)
    assert g.load_bitmap("b") == bits
    t_load = time.monotonic() - t0
    g.close()
    assert t_store < 5 and t_load < 5, (t_store, t_load)
    assert p.stat().st_size < 40 * M  # 512 data clusters of 64 KiB + metadata
    oracle.assert_clean(p)
    info = oracle.info(p)
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["auto"], "name": "b", "granularity": 65536}]


def test_sparse_bitmap_stores_only_dirty_clusters() -> None:
    s = MemoryStore()
    f = Qcow2Format.create(s, 16 * T)
    before = s.size()
    f.store_bitmaps([("b", 65536, True, False, BitMap64([7, 1 << 27]))])
    # two data clusters + one table cluster + one directory cluster
    assert s.size() - before <= 4 * 65536 + 8 * 512
    assert f.load_bitmap("b") == BitMap64([7, 1 << 27])
    f.close()


def test_constraint_messages() -> None:
    f = Qcow2Format.create(MemoryStore(), G)
    assert f.can_store_bitmap("x", 65536, []) is None
    assert f.can_store_bitmap("x", 256, []) == "Granularity is under minimum (512 bytes)"
    assert f.can_store_bitmap("x", 1 << 32, []) == \
        "Granularity exceeds maximum (2147483648 bytes)"
    assert f.can_store_bitmap("n" * 1024, 65536, []) == \
        "Name length exceeds maximum (1023 characters)"
    assert f.can_store_bitmap("n" * 1023, 65536, []) is None
    assert f.can_store_bitmap("x", 65536, 65535) == \
        "Maximum number of persistent bitmaps is already reached"
    assert f.can_store_bitmap("x", 65536, ["y" * 1023] * 64100) == \
        "Not enough space in the bitmap directory"
    assert Qcow2Format.create(MemoryStore(), 16 * T).can_store_bitmap("x", 512, []) == \
        "Too much space will be occupied by the bitmap. Use larger granularity"
    f.close()
    v2 = Qcow2Format.create(MemoryStore(), G, version=2)
    assert v2.can_store_bitmap("x", 65536, []) == "Cannot store dirty bitmaps in qcow2 v2 files"
    with pytest.raises(ImageError, match="v2"):
        v2.store_bitmaps([("x", 65536, True, False, BitMap64())])
    v2.close()


def test_store_bitmaps_validation_and_removal() -> None:
    s = MemoryStore()
    f = Qcow2Format.create(s, G)
    with pytest.raises(ImageError, match="not stored"):
        f.store_bitmaps([("nope", 65536, True, False, None)])
    with pytest.raises(ImageError, match="twice"):
        f.store_bitmaps([("a", 65536, True, False, BitMap64()),
                         ("a", 65536, True, False, BitMap64())])
    with pytest.raises(ImageError, match="constraints"):
        f.store_bitmaps([("a", 100, True, False, BitMap64())])
    f.store_bitmaps([("a", 65536, True, False, BitMap64([1, 2, 3])),
                     ("b", 65536, False, False, BitMap64([9]))])
    assert [b.name for b in f.stored_bitmaps()] == ["a", "b"]
    f.store_bitmaps([("b", 65536, False, False, None)])  # drop "a", keep b's data
    assert f.load_bitmap("b") == BitMap64([9])
    f.store_bitmaps([])
    assert f.stored_bitmaps() == [] and f.check().clean
    assert not f.header.autoclear_features & 1 and f.header.bitmaps_ext is None
    with pytest.raises(ImageError, match="not found"):
        f.load_bitmap("a")
    f.close()
    g = Qcow2Format.open(s, readonly=True)
    assert g.stored_bitmaps() == []
    g.close()
