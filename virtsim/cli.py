"""``virtsim``: the project's command line (the demo now; scenario runner later)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any


def _say(text: str = "") -> None:
    print(text, flush=True)


def _bitmap_line(node: dict[str, Any]) -> str:
    rows = []
    for bm in node.get("dirty-bitmaps", []):
        if "name" not in bm:
            continue
        state = "recording" if bm["recording"] else "disabled"
        rows.append(f"      {bm['name']:<8} dirty={bm['count']:>9} bytes  "
                    f"granularity={bm['granularity']}  {state}"
                    f"{'  persistent' if bm['persistent'] else ''}")
    return "\n".join(rows) or "      (no bitmaps)"


class Demo:
    """Drives an embedded emulator over QMP exactly as a backup tool would."""

    def __init__(self, qmp: Any, workdir: str) -> None:
        self.qmp = qmp
        self.workdir = workdir
        self.t0 = time.monotonic()
        self.ok = True

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    async def run(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(cmd, args or {})

    async def guest(self, cmd: str) -> None:
        await self.run("human-monitor-command",
                       {"command-line": f'qemu-io -d /machine/peripheral/vd0/virtio-backend '
                                        f'"{cmd}"'})
        _say(f"   guest: {cmd}")

    async def bitmaps(self) -> str:
        nodes = await self.run("query-named-block-nodes", {"flat": True})
        return _bitmap_line(next(n for n in nodes if n["node-name"] == "disk0"))

    async def backup(self, listener: Any, title: str, actions: list[dict[str, Any]],
                     job: str) -> None:
        """Run a transaction that starts a backup job; print its events as a timeline."""
        _say(f"{title}")
        listener.clear()
        await self.run("transaction", {"actions": actions})
        while True:
            ev = await listener.get()
            t = time.monotonic() - self.t0
            data = ev.get("data", {})
            if ev["event"] == "JOB_STATUS_CHANGE" and data.get("id") == job:
                _say(f"   {t:7.3f}s  job {job}: {data['status']}")
                if data["status"] == "null":
                    return
            elif ev["event"].startswith("BLOCK_JOB_") and data.get("device") == job:
                err = f"  error={data['error']}" if "error" in data else ""
                _say(f"   {t:7.3f}s  {ev['event']}  offset={data.get('offset')}/"
                     f"{data.get('len')}{err}")
                if "error" in data or ev["event"] == "BLOCK_JOB_CANCELLED":
                    self.ok = False

    def compare(self, what: str, a: str, b: str) -> None:
        """Verify with the real qemu-img (shared read while the emulator holds the disk)."""
        qemu_img = shutil.which("qemu-img")
        if qemu_img is None:
            _say(f"   (qemu-img not installed: cannot verify {what})")
            return
        res = subprocess.run([qemu_img, "compare", "-U", a, b], capture_output=True,
                             text=True)
        verdict = "identical" if res.returncode == 0 else "DIFFERENT"
        _say(f"   verify {what}: qemu-img compare -> {res.stdout.strip() or verdict}")
        if res.returncode != 0:
            self.ok = False


async def demo(workdir: str) -> int:
    """A guest disk with a persistent dirty bitmap; a verified full and incremental push
    backup; the bitmap persisted in the qcow2 image (checked by the real qemu-img)."""
    from qemu.qmp import EventListener, QMPClient

    from .qmp.emulator import DeviceSpec, EmulatorConfig, embedded
    from .sim.image.qcow2 import Qcow2Format
    from .sim.image.store import FileStore

    size = 64 << 20
    disk = os.path.join(workdir, "disk0.qcow2")

    def qcow2(path: str, backing: str | None = None) -> None:
        open(path, "wb").close()
        store = FileStore(path, readonly=False)
        Qcow2Format.create(store, size, backing_file=backing,
                           backing_fmt="qcow2" if backing else None).close()

    qcow2(disk)
    cfg = EmulatorConfig(machine="pc", start_paused=True, echo_qemu_io=False, blockdevs=[
        {"driver": "file", "node-name": "disk0-file", "filename": disk},
        {"driver": "qcow2", "node-name": "disk0", "file": "disk0-file"}],
        devices=[DeviceSpec("virtio-blk-pci", "vd0", "disk0")])
    _say(f"1. virtsim wrote a 64 MiB qcow2 image ({disk}) and started an emulator with it as\n"
         f"   a virtio-blk disk (like `virtsim-qemu -machine pc -blockdev ... -device "
         f"virtio-blk-pci,...`)")
    async with embedded(cfg) as emu:
        qmp = QMPClient("virtsim-demo")
        await qmp.connect(emu.qmp_address)
        d = Demo(qmp, workdir)
        listener = EventListener()
        qmp.register_listener(listener)
        try:
            ver = await d.run("query-version")
            q = ver["qemu"]
            _say(f"2. QMP says QEMU {q['major']}.{q['minor']}.{q['micro']}; the guest writes "
                 f"its disk through HMP qemu-io, as on a libvirt host")
            await d.run("cont")
            for cmd in ("write -P 0x11 0 8M", "write -P 0x22 16M 4M", "write -P 0x33 40M 1M"):
                await d.guest(cmd)

            full = d.path("full.qcow2")
            qcow2(full)
            await d.run("blockdev-add", {"driver": "qcow2", "node-name": "full",
                                         "file": {"driver": "file", "filename": full}})
            await d.backup(listener, "3. full push backup + a new checkpoint bitmap, in one "
                           "transaction:", [
                               {"type": "block-dirty-bitmap-add",
                                "data": {"node": "disk0", "name": "chk1", "persistent": True}},
                               {"type": "blockdev-backup",
                                "data": {"job-id": "full", "device": "disk0", "target": "full",
                                         "sync": "full"}}], "full")
            await d.run("blockdev-del", {"node-name": "full"})
            await d.guest("flush")  # the live image's metadata on disk, for qemu-img -U
            d.compare("full backup == disk now", full, disk)

            _say("4. guest writes after the checkpoint:")
            _say(await d.bitmaps())
            for cmd in ("write -P 0x44 1M 64k", "write -P 0x55 30M 2M", "write -z 40M 256k"):
                await d.guest(cmd)
            _say(await d.bitmaps())

            inc = d.path("inc1.qcow2")
            qcow2(inc, backing=full)
            await d.run("blockdev-add", {"driver": "qcow2", "node-name": "inc1", "backing": None,
                                         "file": {"driver": "file", "filename": inc}})
            await d.backup(listener, "5. incremental push backup of what chk1 recorded "
                           "(sync=incremental, into an overlay on the full backup):", [
                               {"type": "blockdev-backup",
                                "data": {"job-id": "inc1", "device": "disk0", "target": "inc1",
                                         "sync": "incremental", "bitmap": "chk1"}}], "inc1")
            await d.run("blockdev-del", {"node-name": "inc1"})
            sizes = {n: os.stat(d.path(n)).st_blocks * 512 for n in ("full.qcow2", "inc1.qcow2")}
            _say(f"   on disk: full {sizes['full.qcow2'] >> 10} KiB, incremental "
                 f"{sizes['inc1.qcow2'] >> 10} KiB; chk1 was cleared by the successful job:")
            _say(await d.bitmaps())
            await d.guest("flush")
            d.compare("full + incremental chain == disk now", inc, disk)
            await d.run("quit")
        finally:
            await qmp.disconnect()

    qemu_img = shutil.which("qemu-img")
    if qemu_img:
        info = json.loads(subprocess.run([qemu_img, "info", "--output=json", disk],
                                         check=True, capture_output=True, text=True).stdout)
        bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        _say("6. the emulator stored chk1 in the image's bitmaps extension; real qemu-img "
             "sees: " + json.dumps(bitmaps))
        for image in (disk, d.path("full.qcow2"), d.path("inc1.qcow2")):
            chk = subprocess.run([qemu_img, "check", image], capture_output=True, text=True)
            _say(f"   qemu-img check {os.path.basename(image)}: "
                 + (chk.stdout.strip().splitlines() or ["?"])[0])
            if chk.returncode != 0:
                d.ok = False
    _say("\nPull backups over NBD and the libvirt-shaped API arrive with the next issues.")
    _say("DEMO " + ("PASSED" if d.ok else "FAILED"))
    return 0 if d.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtsim", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_demo = sub.add_parser("demo", help="walk through what virtsim can do today")
    p_demo.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        workdir = tempfile.mkdtemp(prefix="virtsim-demo-")
        try:
            return asyncio.run(demo(workdir))
        finally:
            if args.keep:
                _say(f"(kept {workdir})")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
