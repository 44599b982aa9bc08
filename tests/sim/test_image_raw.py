"""Stores (host file, memory) and the raw format, checked against qemu-img/qemu-io."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.sim import image_oracle as oracle
from virtsim.sim.errors import IOErrorEnospc
from virtsim.sim.image.extent import DATA, ZERO, Extent
from virtsim.sim.image.raw import RawFormat
from virtsim.sim.image.store import FileStore, MemoryStore, Store

K, M = 1024, 1024 * 1024


def _file_store(tmp_path: Path, size: int) -> Store:
    return FileStore.create(str(tmp_path / "s.raw"), size)


def _mem_store(tmp_path: Path, size: int) -> Store:
    return MemoryStore(size, chunk_size=4096)


STORES: list[Callable[[Path, int], Store]] = [_file_store, _mem_store]


@pytest.mark.parametrize("make", STORES, ids=["file", "memory"])
def test_store_basics(tmp_path: Path, make: Callable[[Path, int], Store]) -> None:
    s = make(tmp_path, 0)
    assert s.size() == 0
    assert s.pread(0, 10) == bytes(10)  # past EOF reads as zeros
    s.pwrite(100, b"abc")
    assert s.size() == 103
    assert s.pread(99, 10) == b"\0abc" + bytes(6)
    s.truncate(1 * M)
    assert s.size() == M and s.pread(M - 4, 8) == bytes(8)
    s.pwrite(64 * K, b"x" * (64 * K))
    s.punch_hole(64 * K, 64 * K)
    assert s.pread(64 * K, 64 * K) == bytes(64 * K)
    assert s.size() == M  # punching keeps the size
    ext = s.data_extents(0, M)
    assert ext[0][0] == 0 and sum(n for _, n, _ in ext) == M
    assert all(not d for o, n, d in ext if o >= 64 * K and o + n <= 128 * K)
    s.truncate(50)
    assert s.size() == 50 and s.pread(0, 200) == bytes(100) + b"abc"[:0] + bytes(100)
    s.flush()
    s.close()


@pytest.mark.parametrize("make", STORES, ids=["file", "memory"])
def test_store_extents_and_allocation(tmp_path: Path, make: Callable[[Path, int], Store]) -> None:
    s = make(tmp_path, 4 * M)
    s.pwrite(M, b"\1" * M)
    before = s.allocated_bytes()
    assert before >= M
    ext = s.data_extents(0, 4 * M)
    data = [(o, n) for o, n, d in ext if d]
    assert (M, M) in data or any(o <= M and o + n >= 2 * M for o, n in data)
    s.punch_hole(M, M)
    assert s.allocated_bytes() <= before - M
    assert not any(d and o < 2 * M and o + n > M for o, n, d in s.data_extents(0, 4 * M))
    # beyond EOF is a hole
    assert s.data_extents(4 * M, 100) == [(4 * M, 100, False)]
    s.close()


def test_filestore_create_matches_qemu_img(tmp_path: Path) -> None:
    """file-posix allocates the first block of a new file; so do we (actual-size, map)."""
    oracle.require("qemu-img")
    ref = tmp_path / "ref.raw"
    oracle.qemu_img("create", "-q", "-f", "raw", ref, str(64 * M))
    mine = FileStore.create(str(tmp_path / "mine.raw"), 64 * M)
    mine.close()
    assert os.path.getsize(ref) == os.path.getsize(tmp_path / "mine.raw")
    assert os.stat(ref).st_blocks == os.stat(tmp_path / "mine.raw").st_blocks
    assert oracle.qmap(ref, "raw") == [
        {**e, "offset": e["offset"]} for e in oracle.qmap(tmp_path / "mine.raw", "raw")]


def test_filestore_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileStore(str(tmp_path / "missing"))
    with pytest.raises(IsADirectoryError):
        FileStore(str(tmp_path), readonly=True)
    with pytest.raises(IsADirectoryError):
        FileStore(str(tmp_path))
    path = tmp_path / "ro.raw"
    path.write_bytes(b"data")
    ro = FileStore(str(path), readonly=True)
    assert ro.readonly and ro.filename == str(path)
    with pytest.raises(OSError):
        ro.pwrite(0, b"x")
    ro.close()
    ro.close()  # idempotent
    with pytest.raises(OSError):
        ro.pread(0, 1)


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_capacity_enospc(tmp_path: Path, kind: str) -> None:
    s: FileStore | MemoryStore
    if kind == "file":
        s = FileStore.create(str(tmp_path / "c.raw"))
        s.capacity = 256 * K
    else:
        s = MemoryStore(capacity=256 * K)
    s.pwrite(0, b"a" * (128 * K))
    s.pwrite(0, b"b" * (128 * K))  # rewriting allocated space needs nothing new
    with pytest.raises(IOErrorEnospc) as ei:
        s.pwrite(128 * K, b"c" * (512 * K))
    assert ei.value.errno == errno.ENOSPC
    assert isinstance(ei.value, OSError)
    assert s.pread(0, 4) == b"bbbb"
    s.close()


# ----- raw format -----------------------------------------------------------------------------

OPS: list[tuple[str, int, int]] = [
    ("w", 0, 3 * M), ("w", 5 * M + 100, 70 * K), ("z", 512 * K, 512 * K),
    ("zu", M, 256 * K), ("d", 2 * M, 512 * K), ("w", 2 * M + 4 * K, 4 * K),
    ("z", 7 * M, M), ("zu", 6 * M, 4 * K),
]


def _apply_raw(f: RawFormat, ops: list[tuple[str, int, int]]) -> None:
    for i, (op, off, n) in enumerate(ops):
        if op == "w":
            f.write(off, bytes([i + 1]) * n)
        elif op == "z":
            f.write_zeroes(off, n, unmap=False)
        elif op == "zu":
            f.write_zeroes(off, n, unmap=True)
        else:
            f.discard(off, n)


def _qemu_io_cmd(i: int, op: str, off: int, n: int) -> str:
    return {"w": f"write -P {i + 1} {off} {n}", "z": f"write -z {off} {n}",
            "zu": f"write -z -u {off} {n}", "d": f"discard {off} {n}"}[op]


def test_raw_against_qemu_io(tmp_path: Path) -> None:
    """Same operations through qemu-io and RawFormat: same bytes, map and actual size."""
    oracle.require("qemu-img", "qemu-io")
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    oracle.qemu_img("create", "-q", "-f", "raw", a, str(8 * M))
    FileStore.create(str(b), 8 * M).close()
    oracle.qemu_io(a, *(_qemu_io_cmd(i, *op) for i, op in enumerate(OPS)), fmt="raw")
    f = RawFormat(FileStore(str(b)))
    _apply_raw(f, OPS)
    assert f.virtual_size == 8 * M
    # ext4 reports fallocated-but-unwritten ranges as holes only while no page of them is
    # cached, so ask both sides before anything reads the files
    ours = f.block_status(0, 8 * M)
    theirs = oracle.qmap(b, "raw")
    f.close()
    assert ours == [Extent(e["start"], e["length"], DATA if e["data"] else ZERO, e["offset"])
                    for e in theirs]
    assert oracle.qmap(a, "raw") == theirs
    # the same allocation, give or take an ext4 extent-tree block
    assert abs(os.stat(a).st_blocks - os.stat(b).st_blocks) * 512 <= 64 * K
    assert a.read_bytes() == b.read_bytes()


def test_raw_reads_what_qemu_io_wrote(tmp_path: Path) -> None:
    oracle.require("qemu-img", "qemu-io")
    a = tmp_path / "a.raw"
    oracle.qemu_img("create", "-q", "-f", "raw", a, str(M))
    oracle.qemu_io(a, "write -P 0x5a 1000 5000", "write -P 0x11 512k 64k", fmt="raw")
    f = RawFormat(FileStore(str(a), readonly=True))
    assert f.read(1000, 5000) == b"\x5a" * 5000
    assert f.read(0, 1000) == bytes(1000)
    assert f.read(512 * K, 64 * K) == b"\x11" * (64 * K)
    f.close()


def test_raw_memory_store() -> None:
    f = RawFormat(MemoryStore(4 * M, chunk_size=65536))
    _apply_raw(f, OPS[:-2])
    assert f.read(0, 512 * K) == b"\1" * (512 * K)
    assert f.read(512 * K, 512 * K) == bytes(512 * K)
    assert f.read(M, 256 * K) == bytes(256 * K)
    assert f.read(2 * M, 4 * K) == bytes(4 * K)
    assert f.read(2 * M + 4 * K, 4 * K) == b"\6" * (4 * K)
    kinds = {e.kind for e in f.block_status(0, 4 * M)}
    assert kinds <= {DATA, ZERO}
    f.flush()
    f.close()
