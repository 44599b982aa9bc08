"""qcow2 in pure Python against real qemu-img/qemu-io.

The strongest oracle is byte equality: an image created by ``qemu-img create`` and written
with virtsim must be identical, byte for byte, to the same image written by qemu-io with
the same operations in one session (same allocation order, metadata and zero flags).
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap64

from tests.sim import image_oracle as oracle
from virtsim.sim.errors import ImageError
from virtsim.sim.image.extent import DATA, UNALLOCATED, ZERO, Extent
from virtsim.sim.image.qcow2 import Qcow2Format
from virtsim.sim.image.qcow2_header import dump_u64
from virtsim.sim.image.store import FileStore, MemoryStore

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40

Op = tuple[str, int, int] | tuple[str, int, int, int]  # kind, offset, length[, pattern]


def _qemu_io_cmd(op: Op) -> str:
    kind, off, n = op[0], op[1], op[2]
    return {"w": f"write -P {op[3] if len(op) == 4 else 0} {off} {n}",
            "z": f"write -z {off} {n}", "zu": f"write -z -u {off} {n}",
            "d": f"discard {off} {n}"}[kind]


def _apply(f: Qcow2Format, ops: list[Op]) -> None:
    for op in ops:
        kind, off, n = op[0], op[1], op[2]
        if kind == "w":
            f.write(off, bytes([op[3] if len(op) == 4 else 0]) * n)
        elif kind == "z":
            f.write_zeroes(off, n, False)
        elif kind == "zu":
            f.write_zeroes(off, n, True)
        else:
            f.discard(off, n)


def _attach_backing(f: Qcow2Format, base: Qcow2Format) -> None:
    f.backing_read = base.read
    f.backing_is_zero = lambda o, n: all(e.kind == ZERO or
                                         (e.kind == UNALLOCATED)
                                         for e in base.block_status(o, n))


def _create_pair(tmp_path: Path, size: int, opts: str, backing: bool) -> tuple[Path, Path]:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        args = ["create", "-q", "-f", "qcow2"]
        if opts:
            args += ["-o", opts]
        if backing:
            args += ["-b", str(tmp_path / "base.qcow2"), "-F", "qcow2", str(p)]
        else:
            args += [str(p), str(size)]
        oracle.qemu_img(*args)
    return a, b


def differential(tmp_path: Path, ops: list[Op], size: int = G, opts: str = "",
                 backing_ops: list[Op] | None = None) -> None:
    """qemu-io and virtsim apply ``ops``; the images must be identical and clean."""
    base = tmp_path / "base.qcow2"
    if backing_ops is not None:
        oracle.qemu_img("create", "-q", "-f", "qcow2", base, str(size))
        if backing_ops:
            oracle.qemu_io(base, *map(_qemu_io_cmd, backing_ops))
    a, b = _create_pair(tmp_path, size, opts, backing_ops is not None)
    oracle.qemu_io(a, *map(_qemu_io_cmd, ops))
    f = Qcow2Format.open(FileStore(str(b)))
    bf = None
    if backing_ops is not None:
        bf = Qcow2Format.open(FileStore(str(base), readonly=True), readonly=True)
        _attach_backing(f, bf)
    _apply(f, ops)
    ours = f.block_status(0, f.virtual_size)
    f.close()
    if bf is not None:
        bf.close()
    theirs = oracle.qmap(a)
    assert oracle.qmap(b) == theirs
    assert [(e.offset, e.length, str(e.kind), e.host_offset) for e in ours] == \
        oracle.map_as_extents(theirs)
    oracle.assert_clean(b)
    assert oracle.compare(a, b) == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.fixture
def tools() -> None:
    oracle.require("qemu-img", "qemu-io")


# ----- create ---------------------------------------------------------------------------------

CREATE_CASES = [
    dict(cs=65536, size=G), dict(cs=65536, size=0), dict(cs=65536, size=1000),
    dict(cs=65536, size=16 * T), dict(cs=512, size=G), dict(cs=512, size=64 * G),
    dict(cs=4096, size=8 * G), dict(cs=8192, size=G), dict(cs=2 * M, size=T),
    dict(cs=65536, size=G, rb=1), dict(cs=65536, size=G, rb=8), dict(cs=65536, size=G, rb=64),
    dict(cs=512, size=16 * G, rb=1), dict(cs=65536, size=G, lazy=True),
    dict(cs=65536, size=G, backing="base.qcow2", bfmt="qcow2"),
    dict(cs=65536, size=G, backing="/abs/path/base.raw", bfmt="raw"),
    dict(cs=65536, size=G, v=2), dict(cs=4096, size=G, v=2, backing="b.raw", bfmt="raw"),
]


@pytest.mark.parametrize("case", CREATE_CASES, ids=lambda c: ",".join(
    f"{k}={v}" for k, v in c.items()))
def test_create_is_byte_identical(tmp_path: Path, tools: None, case: dict[str, object]) -> None:
    cs, size = int(str(case["cs"])), int(str(case["size"]))
    opts = [f"cluster_size={cs}"]
    if "rb" in case:
        opts.append(f"refcount_bits={case['rb']}")
    if case.get("lazy"):
        opts.append("lazy_refcounts=on")
    if case.get("v") == 2:
        opts.append("compat=0.10")
    ref = tmp_path / "ref.qcow2"
    args = ["create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if "backing" in case:
        args += ["-u", "-b", str(case["backing"]), "-F", str(case["bfmt"])]
    oracle.qemu_img(*args, ref, str(size))
    mine = tmp_path / "mine.qcow2"
    f = Qcow2Format.create(FileStore.create(str(mine)), size, cluster_size=cs,
                           refcount_bits=int(str(case.get("rb", 16))),
                           lazy_refcounts=bool(case.get("lazy")),
                           backing_file=case.get("backing"),  # type: ignore[arg-type]
                           backing_fmt=case.get("bfmt"),  # type: ignore[arg-type]
                           version=int(str(case.get("v", 3))))
    assert f.virtual_size == (size + 511) // 512 * 512
    f.close()
    assert ref.read_bytes() == mine.read_bytes()
    info = oracle.info(mine)
    assert info["virtual-size"] == (size + 511) // 512 * 512
    assert info["cluster-size"] == cs
    assert info["dirty-flag"] is False
    data = info["format-specific"]["data"]
    assert data["compat"] == ("0.10" if case.get("v") == 2 else "1.1")
    if case.get("v") != 2:
        assert data["refcount-bits"] == case.get("rb", 16)
        assert data["lazy-refcounts"] == bool(case.get("lazy"))
    if "backing" in case:
        assert info["backing-filename"] == case["backing"]
        assert info["backing-filename-format"] == case["bfmt"]
    oracle.assert_clean(mine)


def test_create_errors() -> None:
    with pytest.raises(ImageError, match="too large for file format 'qcow2'"):
        Qcow2Format.create(MemoryStore(), T, cluster_size=512)
    with pytest.raises(ImageError, match="Cluster size must be a power of two"):
        Qcow2Format.create(MemoryStore(), G, cluster_size=3000)
    with pytest.raises(ImageError, match="Refcount width"):
        Qcow2Format.create(MemoryStore(), G, refcount_bits=128)
    with pytest.raises(ImageError, match="Lazy refcounts only supported"):
        Qcow2Format.create(MemoryStore(), G, version=2, lazy_refcounts=True)
    with pytest.raises(ImageError, match="Backing format cannot be used"):
        Qcow2Format.create(MemoryStore(), G, backing_fmt="raw")


def test_open_reports_header_fields(tmp_path: Path, tools: None) -> None:
    p = tmp_path / "i.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=128k,lazy_refcounts=on",
                    "-b", "base.raw", "-F", "raw", "-u", p, str(3 * G))
    f = Qcow2Format.open(FileStore(str(p), readonly=True), readonly=True)
    assert (f.version, f.cluster_size, f.virtual_size) == (3, 128 * K, 3 * G)
    assert (f.backing_file, f.backing_fmt) == ("base.raw", "raw")
    assert f.lazy_refcounts and f.refcount_bits == 16 and not f.dirty and not f.corrupt
    assert f.compression_type == "zlib"
    assert f.format_specific()["compat"] == "1.1"
    f.close()


# ----- data path: byte-identical to qemu-io ----------------------------------------------

SCENARIOS: dict[str, list[Op]] = {
    "simple": [("w", 0, 4 * K, 1)],
    "aligned": [("w", 0, M, 1), ("w", M, M, 2)],
    "partial": [("w", 100, 5000, 3), ("w", 70000, 200000, 4)],
    "l2_boundary": [("w", 512 * M - 100 * K, 300 * K, 5)],
    "overwrite": [("w", 0, 256 * K, 1), ("w", 64 * K, 64 * K, 2), ("w", 10, 20, 3)],
    "zeroes": [("w", 0, 256 * K, 1), ("z", 64 * K, 64 * K), ("zu", 128 * K, 64 * K),
               ("z", 300 * K, 10 * K), ("z", M, 3 * M), ("z", 5 * M + 1000, 3000)],
    "discard": [("w", 0, 512 * K, 1), ("d", 64 * K, 128 * K), ("d", 1000, 5000),
                ("w", 64 * K, 4 * K, 9)],
    "discard_realloc": [("w", 0, 128 * K, 1), ("d", 0, 64 * K), ("w", 0, 4 * K, 2)],
    "zero_then_write": [("w", 0, 128 * K, 1), ("z", 0, 128 * K), ("w", 10 * K, 10 * K, 7),
                        ("w", 64 * K, 64 * K, 8)],
    "sparse_far": [("w", 900 * M, K, 1), ("w", 10 * M, K, 2), ("w", 600 * M, 2 * M, 3)],
    "big_unaligned": [("w", 1000, 9 * M, 6), ("w", 2 * M + 7, 5 * M, 7)],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_writes_match_qemu_io(tmp_path: Path, tools: None, name: str) -> None:
    differential(tmp_path, SCENARIOS[name])


def test_backing_cow_and_zeroes(tmp_path: Path, tools: None) -> None:
    differential(tmp_path, [("w", 10 * K, 5 * K, 2), ("z", 64 * K, 64 * K), ("d", 128 * K, 64 * K),
                            ("z", 200 * K, 4 * K), ("w", M - 100, 200, 4),
                            ("z", 3 * M, 4 * K), ("d", 4 * M, 64 * K)],
                 backing_ops=[("w", 0, 2 * M, 1), ("z", 3 * M, 64 * K)])


def test_unaligned_image_end(tmp_path: Path, tools: None) -> None:
    differential(tmp_path, [("w", 0, 4 * K, 1), ("w", 96 * K, 3 * K, 2), ("w", 97 * K, 3 * K, 3),
                            ("d", 64 * K, 100 * K - 64 * K)], size=100 * K)
    for p in tmp_path.iterdir():
        p.unlink()
    differential(tmp_path, [("w", 0, 100 * K + 512, 1), ("z", 4 * K, 96 * K - 3584)],
                 size=100 * K + 512)


@pytest.mark.parametrize("opts", ["cluster_size=512", "lazy_refcounts=on", "refcount_bits=1",
                                  "compat=0.10", "cluster_size=2M"])
def test_option_variants(tmp_path: Path, tools: None, opts: str) -> None:
    ops: list[Op] = [("w", 0, 4 * M, 1), ("d", M, M), ("zu", 2 * M, 64 * K),
                     ("w", 3 * M + 5, 2 * M, 5), ("z", 6 * M, 512 * K)]
    differential(tmp_path, ops, size=64 * M, opts=opts)


def test_refcount_table_growth(tmp_path: Path, tools: None) -> None:
    """512-byte clusters: new refblocks and a reftable move mid-write, as in QEMU."""
    differential(tmp_path, [("w", 0, 9 * M, 1), ("w", 20 * M, 100 * K, 2)], size=64 * M,
                 opts="cluster_size=512")


@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_match_qemu_io(tmp_path: Path, tools: None, seed: int) -> None:
    rnd = random.Random(seed)
    cs = rnd.choice([512, 4096, 65536])
    size = rnd.choice([4 * M, 16 * M + 512 * rnd.randint(0, 40)])
    ops: list[Op] = []
    for _ in range(rnd.randint(5, 30)):
        kind = rnd.choice(["w", "w", "w", "z", "zu", "d"])
        align = rnd.choice([1, 512, cs])
        off = rnd.randrange(0, size) // align * align
        n = max(1, min(rnd.choice([1, 512, 4096, cs, 3 * cs, 200 * K]), size - off))
        if kind != "w":
            off -= off % 512
            n = min(max(512, n - n % 512), size - off)
            ops.append((kind, off, n))
        else:
            ops.append((kind, off, n, rnd.randrange(1, 255)))
    backing: list[Op] | None = None
    if rnd.random() < 0.5:
        backing = [("w", o, min(64 * K, size - o), 7)
                   for o in (rnd.randrange(0, size) // 512 * 512 for _ in range(4))]
    differential(tmp_path, ops, size=size, opts=f"cluster_size={cs}", backing_ops=backing)


@pytest.mark.parametrize("size,new,cs", [(G, 5 * G, 65536), (G, 300 * G, 65536),
                                         (64 * M, 2 * G, 512)])
def test_grow_matches_qemu_img_resize(tmp_path: Path, tools: None, size: int, new: int,
                                      cs: int) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", a, str(size))
    oracle.qemu_io(a, "write -P 3 0 1M")
    b.write_bytes(a.read_bytes())
    oracle.qemu_img("resize", "-q", a, str(new))
    f = Qcow2Format.open(FileStore(str(b)))
    f.truncate(new)
    assert f.virtual_size == new and f.read(0, 4) == b"\3" * 4
    f.close()
    assert a.read_bytes() == b.read_bytes()
    g = Qcow2Format.create(MemoryStore(), M)
    with pytest.raises(ImageError, match="multiple of 512"):
        g.truncate(M + 1)
    with pytest.raises(ImageError, match="shrinking"):
        g.truncate(512)
    g.close()


# ----- reading what QEMU wrote ---------------------------------------------------------------

def test_reads_and_block_status_of_qemu_written_image(tmp_path: Path, tools: None) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", base, str(64 * M))
    oracle.qemu_io(base, "write -P 0x11 0 4M", "write -P 0x22 10M 100k")
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    oracle.qemu_io(top, "write -P 0x33 1M 64k", "write -z 2M 128k", "discard 3M 64k",
                   "write -P 0x44 5000 3000", "write -z -u 20M 1M", "write -P 0x55 63M 1M")
    b = Qcow2Format.open(FileStore(str(base), readonly=True), readonly=True)
    t = Qcow2Format.open(FileStore(str(top), readonly=True), readonly=True)
    t.backing_read = b.read
    assert t.read(0, 5000) == b"\x11" * 5000
    assert t.read(5000, 3000) == b"\x44" * 3000
    assert t.read(M, 64 * K) == b"\x33" * (64 * K)
    assert t.read(2 * M, 128 * K) == bytes(128 * K)
    assert t.read(3 * M, 64 * K) == bytes(64 * K)
    assert t.read(3 * M + 64 * K, 4 * K) == b"\x11" * (4 * K)
    assert t.read(10 * M, 100 * K) == b"\x22" * (100 * K)
    assert t.read(63 * M, M) == b"\x55" * M
    assert t.read(64 * M - 10, 20) == b"\x55" * 10 + bytes(10)  # past the end: zeros
    ours = [(e.offset, e.length, str(e.kind), e.host_offset)
            for e in t.block_status(0, 64 * M)]
    assert ours == oracle.map_as_extents(oracle.qmap(top))
    b.close()
    t.close()


def test_compressed_clusters(tmp_path: Path, tools: None) -> None:
    raw, comp = tmp_path / "src.raw", tmp_path / "c.qcow2"
    rnd = random.Random(3)
    content = bytearray(4 * M)
    for i in range(0, 4 * M, 64 * K):
        content[i:i + 20000] = bytes(rnd.randrange(0, 4) for _ in range(20000))
    raw.write_bytes(bytes(content))
    oracle.qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, comp)
    f = Qcow2Format.open(FileStore(str(comp)))
    assert f.read(0, 4 * M) == bytes(content)
    assert {e.kind for e in f.block_status(0, 4 * M)} <= {DATA, UNALLOCATED, ZERO}
    f.write(100 * K, b"\x77" * 1000)  # COW out of a compressed cluster
    f.write_zeroes(M, 64 * K, unmap=False)  # compressed -> freed even without unmap
    f.discard(2 * M, 128 * K)
    content[100 * K:100 * K + 1000] = b"\x77" * 1000
    content[M:M + 64 * K] = bytes(64 * K)
    content[2 * M:2 * M + 128 * K] = bytes(128 * K)
    f.close()
    raw.write_bytes(bytes(content))
    oracle.assert_clean(comp)
    assert oracle.compare(raw, comp, "raw", "qcow2") == 0


def test_internal_snapshot_is_preserved(tmp_path: Path, tools: None) -> None:
    p = tmp_path / "s.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", p, str(16 * M))
    oracle.qemu_io(p, "write -P 0x01 0 2M")
    oracle.qemu_img("snapshot", "-c", "snap1", p)
    f = Qcow2Format.open(FileStore(str(p)))
    f.write(64 * K + 10, b"\x02" * 200 * K)  # shared clusters and L2 table: copy on write
    f.write_zeroes(M, 64 * K, unmap=True)
    f.discard(M + 64 * K, 64 * K)
    assert f.check().clean
    f.close()
    oracle.assert_clean(p)
    snap = tmp_path / "snap.raw"
    oracle.qemu_img("convert", "-q", "-l", "snapshot.name=snap1", "-O", "raw", p, snap)
    assert snap.read_bytes()[:2 * M] == b"\x01" * (2 * M)
    out = oracle.qemu_io(p, "read -P 0x02 65546 204800", "read -P 0 1M 128k",
                         "read -P 0x01 0 65546")
    assert "read 204800/204800" in out


def test_lazy_refcounts_dirty_bit_and_repair(tmp_path: Path, tools: None) -> None:
    p = tmp_path / "l.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", p, str(64 * M))
    f = Qcow2Format.open(FileStore(str(p)))
    f.write(0, b"\x09" * M)
    assert f.dirty
    # "crash" of a lazy-refcounts writer: L2/L1 reached the disk, refcount blocks did not
    for off in f._l2_dirty:
        f.store.pwrite(off, dump_u64(f._l2[off]))
    f._write_entries(f._l1, f._l1_dirty, f.header.l1_table_offset)
    f.store.close()
    rc, report, _err = oracle.check(p)
    assert rc != 0 and report.get("corruptions", 0) > 0
    assert oracle.info(p)["dirty-flag"] is True
    g = Qcow2Format.open(FileStore(str(p)))  # a writable open repairs, like QEMU
    assert not g.dirty
    g.close()
    assert oracle.info(p)["dirty-flag"] is False
    oracle.assert_clean(p)
    assert "read 1048576/1048576" in oracle.qemu_io(p, "read -P 9 0 1M")
    # a clean lazy session: dirty while written, clean after close
    h = Qcow2Format.open(FileStore(str(p)))
    h.write(2 * M, b"\x01" * M)
    assert h.dirty
    h.close()
    assert oracle.info(p)["dirty-flag"] is False
    oracle.assert_clean(p)
    assert "read 1048576/1048576" in oracle.qemu_io(p, "read -P 1 2M 1M")


def test_check_finds_leaks_and_errors() -> None:
    s = MemoryStore()
    f = Qcow2Format.create(s, 64 * M)
    f.write(0, b"\1" * (128 * K))
    f.close()
    g = Qcow2Format.open(s)
    assert g.check().clean
    g._alloc_clusters(64 * K)  # leak one cluster...
    g.write(M, b"\2" * (64 * K))  # ...inside the file (check stops at its end, like QEMU)
    res = g.check()
    assert res.leaks == 1 and not res.corruptions
    g.check(fix=True)
    assert g.check().clean
    g.close()


# ----- feature bits and robustness ------------------------------------------------------------

def test_unknown_incompatible_feature_refused(tmp_path: Path, tools: None) -> None:
    p = tmp_path / "f.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", p, str(M))
    with open(p, "r+b") as fh:
        fh.seek(72)
        fh.write(struct.pack(">Q", (1 << 63) | (1 << 5)))
    err = oracle.qemu_img("info", p, check=False).stderr
    with pytest.raises(ImageError) as ei:
        Qcow2Format.open(FileStore(str(p), readonly=True), readonly=True)
    assert str(ei.value) in err
    assert str(ei.value) == "Unsupported qcow2 feature(s): Unknown incompatible feature: " \
        "8000000000000020"


def test_corrupt_bit(tmp_path: Path, tools: None) -> None:
    p = tmp_path / "c.qcow2"
    oracle.qemu_img("create", "-q", "-f", "qcow2", p, str(M))
    with open(p, "r+b") as fh:
        fh.seek(72)
        fh.write(struct.pack(">Q", 2))
    with pytest.raises(ImageError, match="Image is corrupt; cannot be opened read/write"):
        Qcow2Format.open(FileStore(str(p)))
    f = Qcow2Format.open(FileStore(str(p), readonly=True), readonly=True)
    assert f.corrupt
    f.close()


def test_unknown_autoclear_bits_cleared_on_rw_open(tmp_path: Path, tools: None) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    for p in (a, b):
        oracle.qemu_img("create", "-q", "-f", "qcow2", p, str(M))
        with open(p, "r+b") as fh:
            fh.seek(88)
            fh.write(struct.pack(">Q", 0x80))
    ro = Qcow2Format.open(FileStore(str(b), readonly=True), readonly=True)
    ro.close()
    assert b.read_bytes()[88:96] == struct.pack(">Q", 0x80)
    oracle.qemu_io(a, "read 0 512")
    Qcow2Format.open(FileStore(str(b))).close()
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[88:96] == bytes(8)


@pytest.mark.parametrize("cut", [0, 3, 50, 100, 104, 300, 4096, 65536, 65544, 131072,
                                 196616, 200000])
def test_truncated_images_raise_image_error(tmp_path: Path, cut: int) -> None:
    s = MemoryStore()
    f = Qcow2Format.create(s, 16 * M)
    f.write(0, b"\1" * (200 * K))
    f.close()
    data = s.getvalue()[:cut]
    t = MemoryStore()
    t.pwrite(0, data)
    try:
        g = Qcow2Format.open(t, readonly=True)
        g.read(0, 300 * K)
        g.block_status(0, 16 * M)
        g.check()
    except ImageError:
        pass


def _image_bytes() -> bytes:
    s = MemoryStore()
    f = Qcow2Format.create(s, 8 * M, cluster_size=4096, backing_file="b", backing_fmt="raw")
    f.write(0, b"\1" * (20 * K))
    f.write_zeroes(64 * K, 8 * K, True)
    f.store_bitmaps([("bm", 4096, True, False, BitMap64([1, 5, 100, 2000]))])
    f.close()
    return s.getvalue()


IMAGE = _image_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(IMAGE) - 1), st.integers(0, 255)),
                min_size=1, max_size=6))
def test_fuzzed_metadata_never_crashes(mutations: list[tuple[int, int]]) -> None:
    """A damaged image may open or fail, but only ever with ImageError."""
    data = bytearray(IMAGE)
    for pos, val in mutations:
        data[pos % 4096 if pos % 3 else pos] = val  # mostly the header cluster
    s = MemoryStore()
    s.pwrite(0, bytes(data))
    try:
        f = Qcow2Format.open(s, readonly=True)
        f.read(0, 64 * K)
        f.block_status(0, f.virtual_size)
        f.check()
    except ImageError:
        pass
    except MemoryError:
        pass


# ----- model-based test (no QEMU) ------------------------------------------------------------

MODEL_SIZE = 2 * M + 4096


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cs=st.sampled_from([512, 4096, 65536]),
       backing=st.booleans(),
       ops=st.lists(st.tuples(st.sampled_from(["w", "z", "zu", "d", "flush", "reopen"]),
                              st.integers(0, MODEL_SIZE - 1), st.integers(1, 300 * 1024),
                              st.integers(1, 255)), max_size=25))
def test_random_ops_match_model(cs: int, backing: bool,
                                ops: list[tuple[str, int, int, int]]) -> None:
    """Any sequence of writes/zeroes/discards reads back like a plain byte array model."""
    base_bytes = bytes(random.Random(cs).randrange(256) for _ in range(256)) * \
        (MODEL_SIZE // 256 + 1)
    base_bytes = base_bytes[:MODEL_SIZE]
    model = bytearray(base_bytes if backing else bytes(MODEL_SIZE))
    store = MemoryStore(chunk_size=4096)
    f = Qcow2Format.create(store, MODEL_SIZE, cluster_size=cs)

    def hook(img: Qcow2Format) -> None:
        if backing:
            img.backing_read = lambda o, n: base_bytes[o:o + n] + bytes(max(0, o + n - MODEL_SIZE))
            img.backing_is_zero = lambda o, n: False

    hook(f)
    for kind, off, n, pat in ops:
        n = min(n, MODEL_SIZE - off)
        if kind == "w":
            f.write(off, bytes([pat]) * n)
            model[off:off + n] = bytes([pat]) * n
        elif kind in ("z", "zu"):
            f.write_zeroes(off, n, kind == "zu")
            model[off:off + n] = bytes(n)
        elif kind == "d":
            f.discard(off, n)
            # whole clusters (and the image's last partial cluster) only
            start = -(-off // cs) * cs
            end = off + n if off + n == MODEL_SIZE else (off + n) // cs * cs
            if end > start:
                model[start:end] = bytes(end - start)
        elif kind == "flush":
            f.flush()
        else:
            f.close()
            f = Qcow2Format.open(store)
            hook(f)
        assert f.read(0, MODEL_SIZE) == bytes(model)
    res = f.check()
    assert res.clean, res.messages[:5]
    ext = f.block_status(0, MODEL_SIZE)
    assert sum(e.length for e in ext) == MODEL_SIZE
    for e in ext:
        if e.kind == ZERO:
            assert model[e.offset:e.offset + e.length] == bytes(e.length)
        if e.kind == UNALLOCATED and not backing:
            assert model[e.offset:e.offset + e.length] == bytes(e.length)
    f.close()


def test_memory_store_roundtrip_and_extent_type() -> None:
    s = MemoryStore()
    f = Qcow2Format.create(s, 4 * M)
    f.write(M, b"abc")
    ext = f.block_status(0, 4 * M)
    assert ext[0] == Extent(0, M, UNALLOCATED, None)
    assert ext[1].kind == DATA and ext[1].host_offset is not None and str(ext[1].kind) == "data"
    f.close()
    g = Qcow2Format.open(s, readonly=True)
    assert g.read(M, 3) == b"abc"
    with pytest.raises(ImageError):
        g.write(0, b"x")
    g.close()


def test_throughput_sequential_copy() -> None:
    """A 256 MiB sequential copy in 1 MiB writes stays well within QEMU's pace."""
    import time
    f = Qcow2Format.create(MemoryStore(), 256 * M)
    buf = os.urandom(M)
    t0 = time.monotonic()
    for off in range(0, 256 * M, M):
        f.write(off, buf)
    f.flush()
    for off in range(0, 256 * M, M):
        assert len(f.read(off, M)) == M
    assert time.monotonic() - t0 < 10
    assert zlib.crc32(f.read(255 * M, M)) == zlib.crc32(buf)
    f.close()
