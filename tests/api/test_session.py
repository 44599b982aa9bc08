"""virtsim:///session: definitions and checkpoints survive, kills leave a consistent or a
reported-inconsistent chain (never a silently wrong one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import virtsim.api as libvirt

DOMAIN = """<domain type='kvm'>
  <name>sess</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


def _uri(tmp: Path) -> str:
    return f"virtsim:///session?statedir={tmp / 'state'}"


def _disk(tmp: Path) -> Path:
    disk = tmp / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    return disk


def _write(dom: libvirt.virDomain, cmd: str) -> None:
    libvirt.qemuMonitorCommand(
        dom, f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{cmd}"',
        libvirt.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def _push_incremental(dom: libvirt.virDomain, tmp: Path, since: str, name: str) -> None:
    dom.backupBegin(f"<domainbackup><incremental>{since}</incremental><disks>"
                    f"<disk name='vda' type='file'><target file='{tmp / name}'/>"
                    f"<driver type='qcow2'/></disk></disks></domainbackup>", None)
    for _ in range(500):
        if dom.jobStats()["type"] == libvirt.VIR_DOMAIN_JOB_NONE:
            break
        time.sleep(0.01)
    st = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    assert st["type"] == libvirt.VIR_DOMAIN_JOB_COMPLETED, st


def _pid(tmp: Path) -> int:
    return int((tmp / "state" / "run" / "sess.pid").read_text())


def test_definitions_and_checkpoints_survive_reopen(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    with libvirt.open(_uri(tmp_path)) as conn:
        dom = conn.defineXML(DOMAIN.format(disk=disk))
        dom.create()
        dom.checkpointCreateXML("<domaincheckpoint><name>c1</name></domaincheckpoint>")
        _write(dom, "write -P 0x11 0 1M")
        dom.checkpointCreateXML("<domaincheckpoint><name>c2</name></domaincheckpoint>")
        xml_before = dom.checkpointLookupByName("c2").getXMLDesc(0)
    state = tmp_path / "state"
    for path in state.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), path
    with libvirt.open(_uri(tmp_path)) as conn:
        dom = conn.lookupByName("sess")
        assert not dom.isActive()
        names = [c.getName() for c in dom.listAllCheckpoints(
            libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)]
        assert names == ["c1", "c2"]
        assert dom.checkpointLookupByName("c2").getParent().getName() == "c1"
        assert dom.checkpointLookupByName("c2").getXMLDesc(0) == xml_before
        dom.create()
        # the bitmaps were stored when the emulator stopped: the chain is usable
        _write(dom, "write -P 0x22 4M 64k")
        _push_incremental(dom, tmp_path, "c2", "inc.qcow2")
        dom.destroy()
        dom.undefine()
    assert not list((state / "domains").iterdir())


def test_killed_emulator_reports_inconsistent_checkpoint(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    with libvirt.open(_uri(tmp_path)) as conn:
        dom = conn.defineXML(DOMAIN.format(disk=disk))
        dom.create()
        dom.checkpointCreateXML("<domaincheckpoint><name>c1</name></domaincheckpoint>")
        _write(dom, "write -P 0x11 0 1M")
        os.kill(_pid(tmp_path), signal.SIGKILL)
        for _ in range(500):
            if not dom.isActive():
                break
            time.sleep(0.01)
        assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED]
        dom.create()
        # the bitmap could not be stored: QEMU loads it inconsistent, libvirt refuses it
        with pytest.raises(libvirt.libvirtError) as ei:
            dom.backupBegin(f"<domainbackup><incremental>c1</incremental><disks>"
                            f"<disk name='vda' type='file'>"
                            f"<target file='{tmp_path / 'x.qcow2'}'/></disk></disks>"
                            f"</domainbackup>", None)
        assert ei.value.get_error_code() == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT
        assert "missing or broken bitmap 'c1' for disk 'vda'" in str(ei.value)
        assert not (tmp_path / "x.qcow2").exists()
        with pytest.raises(libvirt.libvirtError) as ei:
            dom.checkpointCreateXML(open_redefine(dom, "c1"),
                                    libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                                    | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
        assert ei.value.get_error_code() == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT


def open_redefine(dom: libvirt.virDomain, name: str) -> str:
    return dom.checkpointLookupByName(name).getXMLDesc(0)


def test_killed_api_process_mid_backup(tmp_path: Path) -> None:
    """The API process dies during a pull backup: reopening ends its emulator cleanly,
    and the checkpoint made with the backup is consistent and usable."""
    disk = _disk(tmp_path)
    script = textwrap.dedent(f"""
        import os, virtsim.api as libvirt
        conn = libvirt.open({_uri(tmp_path)!r})
        dom = conn.defineXML({DOMAIN.format(disk=disk)!r})
        dom.create()
        libvirt.qemuMonitorCommand(dom, 'qemu-io -d /machine/peripheral/virtio-disk0/'
                                   'virtio-backend "write -P 0x33 0 2M"', 1)
        dom.backupBegin("<domainbackup mode='pull'><server transport='unix' "
                        "socket='{tmp_path / 'b.sock'}'/><disks><disk name='vda' "
                        "type='file'><scratch file='{tmp_path / 's.qcow2'}'/></disk>"
                        "</disks></domainbackup>",
                        "<domaincheckpoint><name>c1</name></domaincheckpoint>")
        print("begun", flush=True)
        os._exit(9)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert "begun" in out.stdout, out.stderr
    pid = _pid(tmp_path)
    with libvirt.open(_uri(tmp_path)) as conn:
        # the orphaned emulator was ended on reopen
        for _ in range(200):
            if not _alive(pid):
                break
            time.sleep(0.01)
        assert not _alive(pid)
        dom = conn.lookupByName("sess")
        assert not dom.isActive()
        assert [c.getName() for c in dom.listAllCheckpoints(0)] == ["c1"]
        dom.create()
        _write(dom, "write -P 0x44 8M 64k")
        _push_incremental(dom, tmp_path, "c1", "inc.qcow2")
        dom.destroy()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
