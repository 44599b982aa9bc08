"""Pull-mode fleecing drivers (virtsim.sim.fleecing) against QEMU 7.2's behaviour.

Texts and read results marked "observed" were recorded on QEMU 7.2.22 with the scenarios
tests/differential/scenarios/fleece-*.qmp.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from virtsim.sim import perm as P
from virtsim.sim.block import BlockBackend, BlockGraph, Node
from virtsim.sim.errors import SimError
from virtsim.sim.fleecing import CbwFilterNode

MiB = 1 << 20
K64 = 65536


def _raw(g: BlockGraph, tmp: Path, name: str, size: int = 4 * MiB) -> Node:
    path = tmp / f"{name}.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    return g.blockdev_add({"driver": "file", "node-name": name, "filename": str(path)})


def _setup(tmp: Path, bitmap: bool = False) -> tuple[BlockGraph, Node, BlockBackend]:
    g = BlockGraph()
    src = _raw(g, tmp, "src")
    src.write(0, b"\xab" * (2 * MiB))
    src.write(2 * MiB, b"\xcd" * (2 * MiB))
    _raw(g, tmp, "tgt")
    blk = BlockBackend(g, "", "/machine/peripheral/vd0/virtio-backend")
    g.add_backend(blk, src, P.CONSISTENT_READ | P.WRITE,
                  P.CONSISTENT_READ | P.WRITE_UNCHANGED | P.RESIZE)
    if bitmap:
        bm = src.bitmaps.create(src.length(), K64, "b0")
        bm.set_dirty(MiB, 128 * 1024)
    return g, src, blk


def _move(g: BlockGraph, blk: BlockBackend, node: Node) -> None:
    old = blk.root_edge
    assert old is not None
    g.detach(old)
    blk.root_edge = g.attach(blk, node, "root", old.perm, old.shared)


def test_snapshot_needs_device_moved_first(tmp_path: Path) -> None:
    g, src, blk = _setup(tmp_path)
    g.blockdev_add({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                    "target": "tgt"})
    with pytest.raises(SimError) as ei:  # observed
        g.blockdev_add({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
    assert ei.value.desc == (
        "Permission conflict on node 'src': permissions 'write' are both required by block "
        "device '/machine/peripheral/vd0/virtio-backend' (uses node 'src' as 'root' child) "
        "and unshared by node 'cbw' (uses node 'src' as 'file' child).")
    assert g.find_node("acc") is None


def test_point_in_time_reads_and_copies(tmp_path: Path) -> None:
    g, src, blk = _setup(tmp_path)
    cbw = g.blockdev_add({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                          "target": "tgt"})
    _move(g, blk, cbw)
    acc = g.blockdev_add({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
    cbw.write(0, b"\xee" * K64)
    cbw.write(3 * MiB, b"\x77" * MiB)
    assert src.read(0, K64) == b"\xee" * K64
    tgt = g.find_node("tgt")
    assert tgt is not None and tgt.read(0, K64) == b"\xab" * K64
    assert acc.read(0, K64) == b"\xab" * K64
    assert acc.read(2 * MiB, 2 * MiB) == b"\xcd" * (2 * MiB)
    # QEMU 7.2 quirk (observed): starting on a copied cluster and running into uncopied
    # ones reads the source -- the guest's new data -- for the copied part
    assert acc.read(0, 3 * K64) == b"\xee" * K64 + b"\xab" * (2 * K64)
    with pytest.raises(OSError) as ei:
        acc.write(0, b"x")
    assert ei.value.strerror == "Operation not supported"
    # three bitmaps as QEMU shows them: copy on the source, access + done on the filter
    assert [b.count() for b in cbw.bitmaps] == [4 * MiB, K64 + MiB]
    assert isinstance(cbw, CbwFilterNode)
    copy = cbw.copy_bitmap
    assert copy in src.bitmaps and copy.count() == 3 * MiB - K64


def test_bitmap_limits_copy_and_access(tmp_path: Path) -> None:
    g, src, blk = _setup(tmp_path, bitmap=True)
    cbw = g.blockdev_add({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                          "target": "tgt", "bitmap": {"node": "src", "name": "b0"}})
    _move(g, blk, cbw)
    acc = g.blockdev_add({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
    cbw.write(0, b"\x22" * (4 * MiB))
    assert acc.read(MiB, 128 * 1024) == b"\xab" * (128 * 1024)
    for off, n in ((0, K64), (MiB, 192 * 1024)):  # observed: EACCES outside the bitmap
        with pytest.raises(OSError) as ei:
            acc.read(off, n)
        assert ei.value.strerror == "Permission denied"


@pytest.mark.parametrize("opts, text", [
    ({"file": "src"}, 'A block device must be specified for "target"'),
    ({"target": "tgt"}, 'A block device must be specified for "file"'),
    ({"file": "src", "target": "tgt", "bitmap": {"node": "src", "name": "x"}},
     "Dirty bitmap 'x' not found"),
    ({"file": "src", "target": "tgt", "bitmap": {"node": "x", "name": "b0"}},
     "Node 'x' not found"),
])
def test_bad_options(tmp_path: Path, opts: dict[str, object], text: str) -> None:
    g, src, _ = _setup(tmp_path)
    with pytest.raises(SimError) as ei:
        g.blockdev_add({"driver": "copy-before-write", "node-name": "cbw", **opts})
    assert ei.value.desc == text
    assert not list(src.bitmaps)  # a failed open leaves no copy bitmap behind


def test_snapshot_access_over_other_node_fails_reads(tmp_path: Path) -> None:
    g, _, _ = _setup(tmp_path)
    acc = g.blockdev_add({"driver": "snapshot-access", "node-name": "acc", "file": "tgt"})
    with pytest.raises(OSError) as ei:  # observed: accepted, reads ENOTSUP
        acc.read(0, K64)
    assert ei.value.strerror == "Operation not supported"


def test_teardown_drops_copy_bitmap(tmp_path: Path) -> None:
    g, src, blk = _setup(tmp_path)
    cbw = g.blockdev_add({"driver": "copy-before-write", "node-name": "cbw", "file": "src",
                          "target": "tgt"})
    _move(g, blk, cbw)
    _move(g, blk, src)
    g.blockdev_del("cbw")
    g.blockdev_del("tgt")
    assert not list(src.bitmaps)
    assert [n.node_name for n in g.nodes] == ["src"]
