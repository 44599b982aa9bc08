"""The CI flow a backup team runs per test, through virtsim's API and through real libvirt.

define + start a VM with a disk full of data, full pull backup read by nbdcopy, 64 MiB of
guest writes, incremental pull read through the dirty-bitmap context and applied onto the
full copy, verify, destroy and undefine.  Phases are timed separately so the ones virtsim
owns (start, backupBegin, abortJob, destroy) can be told apart from moving data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from virtsim.cli import apply_dirty

MiB = 1 << 20
TOOL = "/work/shared/tools/real-libvirt.sh"

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>"""


def _hmp(lv: Any, dom: Any, cmd: str) -> None:
    line = f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{cmd}"'
    if hasattr(lv, "qemuMonitorCommand"):
        lv.qemuMonitorCommand(dom, line, 1)
    else:
        import libvirt_qemu  # type: ignore[import-untyped]

        libvirt_qemu.qemuMonitorCommand(dom, line, 1)


def _wait_done(lv: Any, dom: Any) -> None:
    for _ in range(2000):
        if dom.jobStats().get("type", 0) == 0:
            return
        time.sleep(0.002)


def flow(lv: Any, uri: str, workdir: str, size_mib: int, name: str) -> dict[str, float]:
    """One run of the CI flow; seconds per phase."""
    disk = os.path.join(workdir, f"{name}-vda.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, f"{size_mib}M"],
                   check=True)
    subprocess.run(["qemu-io", "-c", f"write -q -P 0x5a 0 {size_mib}M", disk], check=True)
    os.chmod(disk, 0o666)
    sock = os.path.join(workdir, f"{name}.sock")
    full = os.path.join(workdir, f"{name}-full.raw")
    snap = os.path.join(workdir, f"{name}-snap.raw")
    t: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        t[phase] = t.get(phase, 0.0) + now - t0
        t0 = now

    conn = lv.open(uri)
    try:
        dom = conn.defineXML(DOMAIN.format(name=name, disk=disk))
        dom.create()
        lap("start")
        scratch = os.path.join(workdir, f"{name}-scratch.qcow2")
        pull = ("<domainbackup mode='pull'>{inc}<server transport='unix' "
                f"socket='{sock}'/><disks><disk name='vda' type='file'>"
                f"<scratch file='{scratch}'/></disk></disks></domainbackup>")
        dom.backupBegin(pull.format(inc=""), f"<domaincheckpoint><name>{name}-c1</name>"
                        "</domaincheckpoint>", 0)
        lap("backupBegin")
        subprocess.run(["nbdcopy", f"nbd+unix:///vda?socket={sock}", full], check=True)
        lap("data: nbdcopy full")
        dom.abortJob()
        _wait_done(lv, dom)
        lap("abortJob")
        for i in range(64):
            _hmp(lv, dom, f"write -P 0x{i + 1:02x} {(i * size_mib // 64) * MiB} 1M")
        _hmp(lv, dom, "flush")
        lap("guest writes 64 MiB")
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", disk, snap], check=True)
        lap("(reference snapshot)")
        dom.backupBegin(pull.format(inc=f"<incremental>{name}-c1</incremental>"), None, 0)
        lap("backupBegin")
        apply_dirty(f"nbd+unix:///vda?socket={sock}", full, "qemu:dirty-bitmap:backup-vda")
        lap("data: incremental via dirty bitmap")
        dom.abortJob()
        _wait_done(lv, dom)
        lap("abortJob")
        res = subprocess.run(["qemu-img", "compare", "-q", full, snap])
        if res.returncode != 0:
            raise RuntimeError(f"{uri}: incremental restore differs from the disk")
        lap("verify")
        dom.destroy()
        lap("destroy")
        for cp in dom.listAllCheckpoints(0):
            cp.delete(lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        dom.undefine()
        lap("undefine")
    finally:
        conn.close()
    for f in (disk, full, snap):
        with_suppress_unlink(f)
    return t


def with_suppress_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _real_libvirt() -> tuple[Any, Callable[[], None]] | None:
    """Start real libvirt with the shared tool when it can run here; None otherwise."""
    if not (os.path.exists(TOOL) and shutil.which("libvirtd") and os.geteuid() == 0):
        return None
    started = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode != 0
    if subprocess.run(["bash", TOOL, "up"], capture_output=True).returncode != 0:
        return None
    import libvirt  # type: ignore[import-untyped]

    def stop() -> None:
        if started:
            subprocess.run(["bash", TOOL, "down"], capture_output=True)

    return libvirt, stop


def bench_api(virtsim_qemu: str,
              report: Callable[[str, str, str, float | None, str, bool | None], None]) -> None:
    import virtsim.api as vlv

    for size in (256, 1024):
        d = tempfile.mkdtemp(prefix="virtsim-bench-api-")
        os.chmod(d, 0o1777)
        try:
            runs: dict[str, dict[str, float]] = {}
            runs["virtsim"] = flow(vlv, "virtsim:///embedded", d, size, "vs")
            runs["virtsim API + real QEMU"] = flow(
                vlv, "virtsim:///embedded?emulator=/usr/bin/qemu-system-x86_64", d, size, "vq")
            real = _real_libvirt()
            if real is not None:
                lv, stop = real
                try:
                    runs["libvirt 9.0 + QEMU 7.2"] = flow(lv, "qemu:///system", d, size, "rl")
                finally:
                    stop()
            _print(size, runs, report)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _print(size: int, runs: dict[str, dict[str, float]],
           report: Callable[[str, str, str, float | None, str, bool | None], None]) -> None:
    phases = list(next(iter(runs.values())))
    print(f"  CI flow, {size} MiB disk (seconds per phase):")
    print("    " + f"{'phase':<38}" + "".join(f"{k:>26}" for k in runs))
    for p in phases:
        print("    " + f"{p:<38}" + "".join(f"{r.get(p, 0):>26.3f}" for r in runs.values()))
    totals = {k: sum(v for p, v in r.items() if not p.startswith("(")) for k, r in runs.items()}
    print("    " + f"{'total':<38}" + "".join(f"{v:>26.3f}" for v in totals.values()))
    ours = totals["virtsim"]
    real = totals.get("libvirt 9.0 + QEMU 7.2")
    owned = ("start", "backupBegin", "abortJob", "destroy")
    if size == 256:
        target = ">= 5x faster"
        ratio = real / ours if real else None
        report(f"API CI flow {size} MiB vs real libvirt", f"{ours:.2f} s",
               f"{real:.2f} s" if real else "n/a", ratio, target,
               (ratio >= 5.0) if ratio else None)
    else:
        o = sum(runs["virtsim"].get(p, 0) for p in owned)
        r = sum(runs["libvirt 9.0 + QEMU 7.2"].get(p, 0) for p in owned) if real else None
        ratio = r / o if r else None
        report(f"API flow {size} MiB: start/begin/abort/destroy", f"{o:.3f} s",
               f"{r:.3f} s" if r else "n/a", ratio, ">= 10x faster",
               (ratio >= 10.0) if ratio else None)
