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
from typing import Any


def _say(text: str = "") -> None:
    print(text, flush=True)


def _bitmap_line(node: dict[str, Any]) -> str:
    rows = []
    for bm in node.get("dirty-bitmaps", []):
        state = "recording" if bm["recording"] else "disabled"
        rows.append(f"    {bm.get('name', '(anonymous)'):<10} count={bm['count']:>9} bytes  "
                    f"granularity={bm['granularity']}  {state}"
                    f"{'  persistent' if bm['persistent'] else ''}")
    return "\n".join(rows) or "    (no bitmaps)"


async def demo(workdir: str) -> int:
    """Guest writes dirty a bitmap; the bitmap persists in the qcow2 image (shown by qemu-img)."""
    from qemu.qmp import QMPClient

    from .qmp.emulator import EmulatorConfig, embedded
    from .sim.image.qcow2 import Qcow2Format
    from .sim.image.store import FileStore

    image = os.path.join(workdir, "disk0.qcow2")
    with open(image, "wb"):
        pass
    store = FileStore(image, readonly=False)
    Qcow2Format.create(store, 64 << 20).close()
    store.close()
    _say(f"1. virtsim created a 64 MiB qcow2 image: {image}")

    async with embedded(EmulatorConfig(echo_qemu_io=False)) as emu:
        qmp = QMPClient("virtsim-demo")
        await qmp.connect(emu.qmp_address)
        try:
            ver: Any = await qmp.execute("query-version")
            _say(f"2. embedded emulator up; query-version says QEMU "
                 f"{ver['qemu']['major']}.{ver['qemu']['minor']}.{ver['qemu']['micro']}")
            await qmp.execute("blockdev-add", {"driver": "file", "node-name": "disk0-file",
                                                "filename": image})
            await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                                "file": "disk0-file"})
            await qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "chk1",
                                                          "persistent": True})
            nodes: Any = await qmp.execute("query-named-block-nodes", {"flat": True})
            _say("3. bitmap chk1 added (persistent). Before guest writes:")
            _say(_bitmap_line(next(n for n in nodes if n["node-name"] == "disk0")))
            for cmd in ('write -P 0xab 0 1M', 'write -P 0xcd 10M 64k', 'write -z 32M 128k'):
                await qmp.execute("human-monitor-command",
                                  {"command-line": f'qemu-io disk0 "{cmd}"'})
                _say(f"   guest: qemu-io disk0 \"{cmd}\"")
            nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
            _say("4. After guest writes:")
            _say(_bitmap_line(next(n for n in nodes if n["node-name"] == "disk0")))
            sha: Any = await qmp.execute("x-debug-block-dirty-bitmap-sha256",
                                    {"node": "disk0", "name": "chk1"})
            _say(f"   sha256 of chk1 (same algorithm as QEMU): {sha['sha256']}")
            await qmp.execute("blockdev-del", {"node-name": "disk0"})
            await qmp.execute("blockdev-del", {"node-name": "disk0-file"})
            _say("5. blockdev-del stored the persistent bitmap in the qcow2 bitmaps extension")
        finally:
            await qmp.disconnect()

    qemu_img = shutil.which("qemu-img")
    if qemu_img:
        info = json.loads(subprocess.run([qemu_img, "info", "--output=json", image],
                                         check=True, capture_output=True, text=True).stdout)
        bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        _say("6. real qemu-img info sees: " + json.dumps(bitmaps))
        chk = subprocess.run([qemu_img, "check", image], capture_output=True, text=True)
        _say("   qemu-img check: " + (chk.stdout.strip().splitlines() or ["?"])[0])
        if chk.returncode != 0:
            return 1
    else:
        _say("6. (qemu-img not installed: skipping the real-tool check)")
    _say("\nBackup jobs, the NBD server and the libvirt-shaped API arrive with the next issues.")
    return 0


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
