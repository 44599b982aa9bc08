"""Real NBD clients read pull-mode exports while the guest keeps writing.

A pull backup is only correct if what the client reads is the disk *as it was when the
backup started*, however the guest's writes interleave with the reads.  Each case builds
the export the way a backup tool does -- libvirt's classic fleecing (qcow2 scratch with
backing=disk, ``blockdev-backup sync=none``) or copy-before-write + snapshot-access --
for a full backup (plain export) or an incremental one (plus a disabled bitmap merged from
the checkpoint bitmap, as libvirt does), copies the disk image at the point in time, and
then runs every client with guest writes (HMP qemu-io through the virtio disk) racing it:
``nbdinfo --list``/``--map`` per context, ``nbdcopy`` to a file and to ``null:``,
``qemu-img convert``/``compare``/``map`` (``x-dirty-bitmap`` too), and a libnbd script
doing block_status + pread per context.  The oracle is the copy (``qemu-img compare``).

The same cases run against real QEMU 7.2 as well: the expectations are checked on the
reference, not invented (see ``_guest_writes`` for what QEMU 7.2's snapshot-access cannot
take).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .realtools import (
    Emu,
    Emus,
    GuestWriter,
    MiB,
    img,
    need,
    need_libnbd_python,
    open_emus,
    run,
)

DEV = "/machine/peripheral/vd0/virtio-backend"
PROBE = Path(__file__).with_name("nbd_probe.py")
SIZE = 64 * MiB
BITMAP = "backup-vda"
#: what checkpoint c1 recorded: the guest writes after it was added
DIRTY = [(8 * MiB, MiB), (20 * MiB, MiB), (32 * MiB, 64 << 10)]


@pytest.fixture
def emus(tmp_path: Path) -> Iterator[Emus]:
    yield from open_emus(tmp_path)


def _guest_writes(scheme: str, round_: int) -> list[str]:
    """Writes that race one client.  Classic scheme: anywhere, any size, zeroes too.
    snapshot-access: whole data areas only -- QEMU 7.2 answers block status of a copied
    run followed by uncopied clusters from the live disk (virtsim/sim/fleecing.py), so
    a write over a hole or zeroes would show up in the map (and zeroes over data would
    make clients skip old data); reads that start on a copied run and go past it would
    return new data, which requests no larger than these runs never do."""
    if scheme == "cbw":
        return ["write -P {p} 0 4M", "write -P {p} 8M 1M", "write -P {p} 32M 64k",
                "write -P {p} 44M 4M"]
    return [f"write -P {{p}} {round_ * MiB + 4096} 100k",
            f"write -P {{p}} {8 * MiB + 32768} 1M",
            f"write -z {(20 + round_) * MiB} 64k",
            "write -P {p} 32M 128k",
            f"write -P {{p}} {(44 + round_) * MiB + 512} 3M",
            f"write -P {{p}} {(50 + round_) * MiB} 1M"]


def _fleece(emu: Emu, w: Path, scheme: str, incremental: bool) -> list[str]:
    """Start the pull backup; the export's contexts."""
    q = emu.qmp
    bitmaps: list[Any] = []
    if scheme == "classic":
        q.execute("blockdev-add", {"driver": "qcow2", "node-name": "scratch",
                                   "file": {"driver": "file",
                                            "filename": f"{w}/scratch.qcow2"},
                                   "backing": "disk0"})
        actions: list[dict[str, Any]] = [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": "c2", "persistent": True}}]
        if incremental:
            actions += [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "scratch", "name": BITMAP, "persistent": False,
                          "disabled": True}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "scratch", "target": BITMAP,
                          "bitmaps": [{"node": "disk0", "name": "c1"}]}},
                {"type": "block-dirty-bitmap-disable",
                 "data": {"node": "disk0", "name": "c1"}}]
            bitmaps = [BITMAP]
        actions.append({"type": "blockdev-backup",
                        "data": {"device": "disk0", "target": "scratch", "sync": "none",
                                 "job-id": "backup-vda-fleece"}})
        q.execute("transaction", {"actions": actions})
        node = "scratch"
    else:
        actions = [{"type": "block-dirty-bitmap-add",
                    "data": {"node": "disk0", "name": "c2", "persistent": True}}]
        if incremental:
            actions += [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "disk0", "name": BITMAP, "persistent": False,
                          "disabled": True}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "disk0", "target": BITMAP, "bitmaps": ["c1"]}},
                {"type": "block-dirty-bitmap-disable",
                 "data": {"node": "disk0", "name": "c1"}}]
            bitmaps = [{"node": "disk0", "name": BITMAP}]
        q.execute("transaction", {"actions": actions})
        q.execute("blockdev-add", {"driver": "qcow2", "node-name": "fleece",
                                   "file": {"driver": "file",
                                            "filename": f"{w}/scratch.qcow2"}})
        q.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw",
                                   "file": "disk0", "target": "fleece"})
        q.execute("qom-set", {"path": "/machine/peripheral/vd0", "property": "drive",
                              "value": "cbw"})
        q.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "snap",
                                   "file": "cbw"})
        node = "snap"
    q.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": emu.nbd_path}}})
    q.execute("block-export-add", {"type": "nbd", "id": "vda", "node-name": node,
                                   "name": "vda", "allocation-depth": True,
                                   "bitmaps": bitmaps})
    ctxs = ["base:allocation", "qemu:allocation-depth"]
    return ctxs + [f"qemu:dirty-bitmap:{BITMAP}"] if incremental else ctxs


def _parse_map(text: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map`` lines -> merged (offset, length, type) runs."""
    out: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        off, length, typ = (int(x) for x in line.split()[:3])
        if out and out[-1][2] == typ and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, typ)
        else:
            out.append((off, length, typ))
    return out


def _img_map(text: str) -> list[tuple[int, int, bool, bool]]:
    """``qemu-img map --output=json`` -> merged (start, length, data, zero) runs."""
    out: list[tuple[int, int, bool, bool]] = []
    for e in json.loads(text):
        key = (bool(e["data"]), bool(e["zero"]))
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *key)
        else:
            out.append((e["start"], e["length"], *key))
    return out


def _alloc_from_img_map(runs: list[tuple[int, int, bool, bool]]) -> list[tuple[int, int, int]]:
    """What base:allocation must say for an image qemu-img mapped this way."""
    out: list[tuple[int, int, int]] = []
    for start, length, data, zero in runs:
        typ = (0 if data else 1) | (2 if zero else 0)
        if out and out[-1][2] == typ:
            out[-1] = (out[-1][0], out[-1][1] + length, typ)
        else:
            out.append((start, length, typ))
    return out


def _dirty_runs() -> list[tuple[int, int, int]]:
    out, pos = [], 0
    for off, n in DIRTY:
        if off > pos:
            out.append((pos, off - pos, 0))
        out.append((off, n, 1))
        pos = off + n
    out.append((pos, SIZE - pos, 0))
    return out


@pytest.mark.parametrize("mode", ["full", "incremental"])
@pytest.mark.parametrize("scheme", ["classic", "cbw"])
@pytest.mark.parametrize("binary", ["virtsim", "qemu"])
def test_pull_export_reads_point_in_time(emus: Emus, tmp_path: Path, binary: str,
                                         scheme: str, mode: str) -> None:
    need("qemu-img", "nbdinfo", "nbdcopy")
    py = need_libnbd_python()
    w = tmp_path / "img"
    w.mkdir()
    disk, t0 = w / "disk.qcow2", w / "t0.qcow2"
    img("create", "-q", "-f", "qcow2", str(disk), str(SIZE))
    img("create", "-q", "-f", "qcow2", str(w / "scratch.qcow2"), str(SIZE))
    emu = emus.start(binary, [
        "-machine", "pc", "-accel", "tcg",
        "-blockdev", f"driver=file,node-name=disk0-file,filename={disk}",
        "-blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
        "-device", "virtio-blk-pci,drive=disk0,id=vd0"])
    q = emu.qmp

    def guest(cmd: str) -> None:
        q.qemu_io(DEV, cmd, device=True)

    def racing(round_: int) -> GuestWriter:
        return GuestWriter(q, DEV, _guest_writes(scheme, round_), device=True)

    guest("write -P 0xab 0 4M")
    guest("write -P 0xac 44M 4M")
    q.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "c1", "persistent": True})
    guest("write -P 0xcd 8M 1M")
    guest("write -z 20M 1M")
    guest("write -P 0xce 32M 64k")
    guest("flush")
    shutil.copyfile(disk, t0)  # the disk at the point in time of the backup
    ctxs = _fleece(emu, w, scheme, mode == "incremental")
    # first writes land before any client has read anything
    for cmd in _guest_writes(scheme, 0):
        guest(cmd.format(p=0x99))
    u = emu.uri("vda")
    raw = w / "t0.raw"
    img("convert", "-U", "-O", "raw", str(t0), str(raw))
    want_alloc = _alloc_from_img_map(_img_map(
        img("map", "-U", "--output=json", str(t0)).stdout))

    # nbdinfo --list and --map per context
    with racing(1):
        listing = run("nbdinfo", "--list", emu.uri()).stdout
    assert 'export="vda":' in listing and "export-size: 67108864" in listing
    assert "is_read_only: true" in listing
    assert all(f"\t\t{c}\n" in listing for c in ctxs), listing
    maps: dict[str, list[tuple[int, int, int]]] = {}
    for i, ctx in enumerate(ctxs):
        with racing(2 + i):
            maps[ctx] = _parse_map(run("nbdinfo", f"--map={ctx}", u).stdout)
    assert maps["base:allocation"] == want_alloc
    depth = maps["qemu:allocation-depth"]
    assert sum(n for _, n, _ in depth) == SIZE
    if mode == "incremental":
        assert maps[f"qemu:dirty-bitmap:{BITMAP}"] == _dirty_runs()

    # nbdcopy to a file and to null:, qemu-img convert and compare
    with racing(5) as writer:
        run("nbdcopy", u, str(w / "copy.raw"))
        run("nbdcopy", u, "null:")
    # the guest wrote all along: several rounds landed while nbdcopy read
    assert writer.stop() > len(_guest_writes(scheme, 5)), "no write raced nbdcopy"
    img("compare", "-U", "-f", "raw", "-F", "qcow2", str(w / "copy.raw"), str(t0))
    with racing(6):
        img("convert", "-f", "raw", "-O", "qcow2", u, str(w / "conv.qcow2"))
        cmp = img("compare", "-f", "raw", "-F", "qcow2", u, str(t0), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    img("compare", "-U", str(w / "conv.qcow2"), str(t0))

    # qemu-img map, plain and through the dirty bitmap (dirty reads as data: false)
    with racing(7):
        plain = _img_map(run("qemu-img", "map", "--output=json", u).stdout)
        if mode == "incremental":
            bm = _img_map(run(
                "qemu-img", "map", "--output=json", "--image-opts",
                f"driver=nbd,server.type=unix,server.path={emu.nbd_path},export=vda,"
                f"x-dirty-bitmap=qemu:dirty-bitmap:{BITMAP}").stdout)
    assert _alloc_from_img_map(plain) == want_alloc
    if mode == "incremental":
        assert [(s, n) for s, n, data, _ in bm if not data] == DIRTY

    # libnbd: block_status + pread per context
    dump = w / "dump"
    dump.mkdir()
    with racing(8):
        out = run(py, str(PROBE), u, *[a for c in ctxs for a in ("--context", c)],
                  "--dump", str(dump)).stdout
    probe = json.loads(out)
    assert probe["size"] == SIZE and probe["flags"]["is_read_only"]
    assert probe["zero_but_data"] == []
    assert [tuple(e) for e in probe["extents"]["base:allocation"]] == want_alloc
    old = raw.read_bytes()
    for i, ctx in enumerate(ctxs):
        got = (dump / f"{i}.raw").read_bytes()
        for off, n, flags in probe["extents"][ctx]:
            if ctx == "base:allocation" or flags:
                assert got[off:off + n] == old[off:off + n], (ctx, off, n)
    if mode == "incremental":
        assert [tuple(e) for e in probe["extents"][f"qemu:dirty-bitmap:{BITMAP}"]] == \
            _dirty_runs()

    # the guest really changed the disk underneath: the reads were not trivially right
    guest("flush")
    assert img("compare", "-U", str(t0), str(disk), check=False).returncode == 1
    assert emu.io_errors(disconnects=False) == []
