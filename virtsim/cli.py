"""``virtsim``: the project's command line (the demo now; scenario runner later)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any


def _say(text: str = "") -> None:
    print(text, flush=True)


DOMAIN_XML = """<domain type='kvm'>
  <name>demo</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


class ApiDemo:
    """The four backup flows through the libvirt-shaped API, each verified."""

    def __init__(self, workdir: str, uri: str) -> None:
        import virtsim.api as libvirt

        self.lv = libvirt
        self.workdir = workdir
        self.uri = uri
        self.t0 = time.monotonic()
        self.ok = True
        self.disk = self.path("vda.qcow2")
        self.qemu_img = shutil.which("qemu-img") or "qemu-img"

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def t(self) -> str:
        return f"{time.monotonic() - self.t0:7.3f}s"

    def guest(self, dom: Any, cmd: str) -> None:
        self.lv.qemuMonitorCommand(
            dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{cmd}"',
            self.lv.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        _say(f"   {self.t()}  guest: {cmd}")

    def snapshot(self, name: str) -> str:
        """The disk as it is now (what a backup started now must reproduce); the guest
        flushes first so the image file holds its metadata for the outside reader."""
        self.lv.qemuMonitorCommand(
            self._dom, 'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "flush"',
            self.lv.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        out = self.path(name)
        subprocess.run([self.qemu_img, "convert", "-U", "-O", "raw", self.disk, out],
                       check=True)
        return out

    def compare(self, what: str, a: str, b: str) -> None:
        res = subprocess.run([self.qemu_img, "compare", "-U", a, b], capture_output=True,
                             text=True)
        _say(f"   verify {what}: qemu-img compare -> "
             f"{res.stdout.strip() or res.stderr.strip()}")
        if res.returncode != 0:
            self.ok = False

    def wait_completed(self, events: list[Any], dom: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        last = -1
        while not events and time.monotonic() < deadline:
            st = dom.jobStats()
            done = st.get("disk_processed", st.get("disk_temp_used"))
            if done is not None and done != last:
                total = st.get("disk_total", st.get("disk_temp_total"))
                _say(f"   {self.t()}  jobStats: {done}/{total} bytes")
                last = done
            time.sleep(0.01)
        params: dict[str, Any] = events.pop(0) if events else {}
        _say(f"   {self.t()}  JOB_COMPLETED: success={params.get('success')} "
             f"elapsed={params.get('time_elapsed')} ms"
             + (f" errmsg={params['errmsg']!r}" if "errmsg" in params else ""))
        return params

    def run(self) -> int:
        lv = self.lv
        subprocess.run([self.qemu_img, "create", "-q", "-f", "qcow2", self.disk, "64M"],
                       check=True)
        conn = lv.open(self.uri)
        events: list[Any] = []
        try:
            dom = conn.defineXML(DOMAIN_XML.format(disk=self.disk))
            conn.domainEventRegisterAny(dom, lv.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                        lambda c, d, p, o: events.append(p), None)
            dom.create()
            self._dom = dom
            _say(f"1. {self.t()}  domain 'demo' defined and started on {self.uri} "
                 f"(libvirt {conn.getLibVersion()}); its emulator speaks QMP only")
            for cmd in ("write -P 0x11 0 8M", "write -P 0x22 16M 4M", "write -P 0x33 40M 1M"):
                self.guest(dom, cmd)

            _say("2. push FULL backup with checkpoint c1 (one QMP transaction):")
            snap = self.snapshot("at-c1.raw")
            dom.backupBegin(f"<domainbackup><disks><disk name='vda' type='file'>"
                            f"<target file='{self.path('full.qcow2')}'/>"
                            f"<driver type='qcow2'/></disk></disks></domainbackup>",
                            "<domaincheckpoint><name>c1</name></domaincheckpoint>")
            self.guest(dom, "write -P 0x44 1M 64k")      # races the copy: must not show
            self.wait_completed(events, dom)
            self.compare("full backup == disk at c1", self.path("full.qcow2"), snap)

            self.guest(dom, "write -P 0x55 30M 2M")
            self.guest(dom, "write -z 40M 256k")
            _say("3. push INCREMENTAL backup since c1, with checkpoint c2:")
            snap = self.snapshot("at-c2.raw")
            inc = self.path("inc.qcow2")
            dom.backupBegin(f"<domainbackup><incremental>c1</incremental><disks>"
                            f"<disk name='vda' type='file'><target file='{inc}'/>"
                            f"<driver type='qcow2'/></disk></disks></domainbackup>",
                            "<domaincheckpoint><name>c2</name></domaincheckpoint>")
            self.wait_completed(events, dom)
            subprocess.run([self.qemu_img, "rebase", "-u", "-F", "qcow2", "-b",
                            self.path("full.qcow2"), inc], check=True)
            _say(f"   the incremental holds {os.stat(inc).st_blocks * 512 >> 10} KiB; "
                 f"rebased onto the full backup:")
            self.compare("full + incremental == disk at c2", inc, snap)

            self.guest(dom, "write -P 0x66 2M 1M")
            sock = self.path("nbd.sock")
            _say("4. pull FULL backup with checkpoint c3: a scratch image fleeces the disk, "
                 "NBD serves it")
            snap = self.snapshot("at-c3.raw")
            pull_xml = ("<domainbackup mode='pull'>{inc}<server transport='unix' "
                        f"socket='{sock}'/><disks><disk name='vda' type='file'>"
                        f"<scratch file='{self.path('scratch.qcow2')}'/></disk></disks>"
                        "</domainbackup>")
            dom.backupBegin(pull_xml.format(inc=""),
                            "<domaincheckpoint><name>c3</name></domaincheckpoint>")
            self.guest(dom, "write -P 0x77 0 4M")        # after the point in time
            full_raw = self.path("pull-full.raw")
            subprocess.run(["nbdcopy", f"nbd+unix:///vda?socket={sock}", full_raw],
                           check=True)
            _say(f"   {self.t()}  nbdcopy read the export into pull-full.raw")
            dom.abortJob()
            self.wait_completed(events, dom)
            self.compare("pulled full == disk at c3", full_raw, snap)

            self.guest(dom, "write -P 0x88 8M 128k")
            _say("5. pull INCREMENTAL since c3 with checkpoint c4: only dirty blocks travel")
            snap = self.snapshot("at-c4.raw")
            dom.backupBegin(pull_xml.format(inc="<incremental>c3</incremental>"),
                            "<domaincheckpoint><name>c4</name></domaincheckpoint>")
            self.guest(dom, "write -P 0x99 8M 64k")      # after the point in time
            moved = apply_dirty(f"nbd+unix:///vda?socket={sock}", full_raw)
            _say(f"   {self.t()}  libnbd read {moved} dirty bytes through "
                 f"qemu:dirty-bitmap:backup-vda and applied them to the full copy")
            dom.abortJob()
            self.wait_completed(events, dom)
            self.compare("pulled full + incremental == disk at c4", full_raw, snap)
            names = [c.getName() for c in dom.listAllCheckpoints(
                lv.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)]
            _say(f"6. checkpoints: {' -> '.join(names)}")
            dom.destroy()
        finally:
            conn.close()
        return 0 if self.ok else 1


def apply_dirty(uri: str, target: str, context: str = "qemu:dirty-bitmap:backup-vda") -> int:
    """Read the dirty extents of ``context`` over NBD (libnbd) into the raw ``target``:
    what an incremental pull client does.  Returns the bytes moved."""
    import nbd  # type: ignore[import-untyped]

    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    size = h.get_size()
    dirty: list[tuple[int, int]] = []
    pos = 0

    def cb(ctx: str, off: int, entries: list[int], err: Any) -> int:
        nonlocal pos
        for i in range(0, len(entries), 2):
            if entries[i + 1] & 1:
                dirty.append((pos, entries[i]))
            pos += entries[i]
        return 0

    while pos < size:
        h.block_status(min(size - pos, 1 << 30), pos, cb)
    moved = 0
    step = 32 << 20   # QEMU's largest request
    with open(target, "r+b") as f:
        for off, n in dirty:
            for o in range(off, off + n, step):
                k = min(step, off + n - o)
                f.seek(o)
                f.write(h.pread(k, o))
                moved += k
    h.shutdown()
    return moved


def demo(workdir: str, uri: str = "virtsim:///embedded") -> int:
    """Push full, push incremental, pull full (nbdcopy), pull incremental (dirty-bitmap
    context), each verified with qemu-img compare against the disk at that checkpoint."""
    d = ApiDemo(workdir, uri)
    rc = d.run()
    _say("DEMO " + ("PASSED" if rc == 0 else "FAILED"))
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="virtsim", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_demo = sub.add_parser("demo", help="walk through what virtsim can do today")
    p_demo.add_argument("--keep", action="store_true", help="keep the work directory")
    p_demo.add_argument("--uri", default="virtsim:///embedded",
                        help="API URI, e.g. virtsim:///embedded?emulator=/usr/bin/"
                             "qemu-system-x86_64 to run the same flows on real QEMU")
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        workdir = tempfile.mkdtemp(prefix="virtsim-demo-")
        try:
            return demo(workdir, args.uri)
        finally:
            if args.keep:
                _say(f"(kept {workdir})")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
