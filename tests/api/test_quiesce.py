"""QUIESCE through the libvirt-shaped API: fsFreeze/fsThaw over the guest agent channel,
checkpoints with VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE and backups with
VIRTSIM_BACKUP_BEGIN_QUIESCE, on every emulator kind.

The simulated guests (embedded, ``virtsim-qemu``) run an agent; a real QEMU has no guest
OS, so its agent port never opens and every agent call fails the way libvirt 9.0 fails
there (recorded on this machine: VIR_ERR_AGENT_UNRESPONSIVE, VIR_FROM_QEMU, "Guest agent
is not responding: QEMU guest agent is not connected").
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

import virtsim.api as libvirt

from .conftest import need

AGENT_CHANNEL = ("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
                 "</channel>")
NOT_CONNECTED = "Guest agent is not responding: QEMU guest agent is not connected"
HMP = libvirt.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP


def make_disk(path: Path) -> Path:
    import shutil

    qemu_img = shutil.which("qemu-img")
    need(qemu_img is not None, "qemu-img")
    assert qemu_img is not None
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def domain_xml(name: str, disk: Path, agent: bool = True) -> str:
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
            f"<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            f"<emulator>/usr/bin/qemu-system-x86_64</emulator>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
            f"{AGENT_CHANNEL if agent else ''}<memballoon model='none'/></devices></domain>")


def real_qemu(conn: libvirt.virConnect) -> bool:
    return "qemu-system" in (conn.drv.config.emulator or "")


def agent_error(err: libvirt.libvirtError) -> tuple[int, int, str]:
    return err.get_error_code(), err.get_error_domain(), err.get_error_message()


@pytest.fixture
def dom(conn: libvirt.virConnect, tmp_path: Path) -> libvirt.virDomain:
    d = conn.createXML(domain_xml("quiesce", make_disk(tmp_path / "vda.qcow2")), 0)
    return d


def test_fs_freeze_and_thaw(conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
    if real_qemu(conn):
        for call in (dom.fsFreeze, dom.fsThaw):
            with pytest.raises(libvirt.libvirtError) as ei:
                call()
            assert agent_error(ei.value) == (libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
                                             libvirt.VIR_FROM_QEMU, NOT_CONNECTED)
        return
    assert dom.fsFreeze() == 1                 # one filesystem on the one disk
    with pytest.raises(libvirt.libvirtError) as ei:
        dom.fsFreeze()                         # qemu-ga refuses a second freeze
    assert ei.value.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR
    assert ei.value.get_error_message() == (
        "internal error: unable to execute QEMU agent command 'guest-fsfreeze-freeze': "
        "Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state")
    assert dom.fsThaw() == 1
    assert dom.fsThaw() == 0                   # nothing left frozen
    assert dom.fsFreeze(["/"]) == 1
    assert dom.fsThaw() == 1
    assert dom.fsFreeze(["/nowhere"]) == 0     # nothing matched: the guest stays thawed
    assert dom.fsFreeze() == 1
    assert dom.fsThaw() == 1


def test_argument_checks(conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
    with pytest.raises(libvirt.libvirtError) as ei:
        dom.fsThaw(["/"])
    assert agent_error(ei.value) == (libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
                                     libvirt.VIR_FROM_QEMU,
                                     "argument unsupported: specifying mountpoints is not "
                                     "supported")
    with pytest.raises(libvirt.libvirtError) as ei:
        dom.fsFreeze(None, 1)
    assert ei.value.get_error_message() == "unsupported flags (0x1) in function qemuDomainFSFreeze"


def test_no_agent_channel(conn: libvirt.virConnect, tmp_path: Path) -> None:
    d = conn.createXML(domain_xml("noagent", make_disk(tmp_path / "a.qcow2"), agent=False), 0)
    for call in (d.fsFreeze, d.fsThaw):
        with pytest.raises(libvirt.libvirtError) as ei:
            call()
        assert agent_error(ei.value) == (
            libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_FROM_QEMU,
            "argument unsupported: QEMU guest agent is not configured")


def test_inactive_and_paused(conn: libvirt.virConnect, tmp_path: Path) -> None:
    d = conn.defineXML(domain_xml("idle", make_disk(tmp_path / "b.qcow2")))
    with pytest.raises(libvirt.libvirtError) as ei:
        d.fsFreeze()
    assert agent_error(ei.value) == (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_DOMAIN,
                                     "Requested operation is not valid: domain is not running")
    d.create()
    d.suspend()
    with pytest.raises(libvirt.libvirtError) as ei:
        d.fsFreeze()
    assert agent_error(ei.value) == (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_FROM_QEMU,
                                     "Requested operation is not valid: domain is not running")
    d.resume()
    d.destroy()
    d.undefine()


def test_checkpoint_quiesce(conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
    xml = "<domaincheckpoint><name>c1</name></domaincheckpoint>"
    if real_qemu(conn):
        with pytest.raises(libvirt.libvirtError) as ei:
            dom.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE)
        assert ei.value.get_error_message() == NOT_CONNECTED
        assert dom.listAllCheckpoints() == []  # nothing was created
        return
    cp = dom.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE)
    assert cp.getName() == "c1"
    assert dom.fsThaw() == 0                   # QUIESCE thawed after the transaction
    # a guest frozen by the user: QUIESCE's own freeze fails, nothing is created
    assert dom.fsFreeze() == 1
    with pytest.raises(libvirt.libvirtError) as ei:
        dom.checkpointCreateXML("<domaincheckpoint><name>c2</name></domaincheckpoint>",
                                libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE)
    assert "has been disabled: the agent is in frozen state" in ei.value.get_error_message()
    assert [c.getName() for c in dom.listAllCheckpoints()] == ["c1"]
    assert dom.fsThaw() == 1


def test_backup_quiesce(conn: libvirt.virConnect, dom: libvirt.virDomain,
                        tmp_path: Path) -> None:
    target = tmp_path / "full.qcow2"
    backup = (f"<domainbackup><disks><disk name='vda' type='file'>"
              f"<target file='{target}'/><driver type='qcow2'/></disk></disks></domainbackup>")
    if real_qemu(conn):
        with pytest.raises(libvirt.libvirtError) as ei:
            dom.backupBegin(backup, None, libvirt.VIRTSIM_BACKUP_BEGIN_QUIESCE)
        assert ei.value.get_error_message() == NOT_CONNECTED
        return
    done = threading.Event()

    def on_job(*_args: object) -> None:
        done.set()

    cb = conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED,
                                     on_job, None)
    try:
        dom.backupBegin(backup, None, libvirt.VIRTSIM_BACKUP_BEGIN_QUIESCE)
        assert done.wait(30)
    finally:
        conn.domainEventDeregisterAny(cb)
    assert dom.fsThaw() == 0                   # thawed right after the transaction
    assert target.exists()


def test_guest_writes_wait_while_frozen(conn: libvirt.virConnect,
                                        dom: libvirt.virDomain) -> None:
    """A simulated guest write issued while frozen lands only after the thaw; host-side
    qemu-io and other monitor commands keep working meanwhile."""
    qom = "/machine/peripheral/virtio-disk0/virtio-backend"
    if real_qemu(conn):  # no guest to freeze; host-side qemu-io works regardless
        with pytest.raises(libvirt.libvirtError, match=NOT_CONNECTED):
            dom.fsFreeze()
        assert libvirt.qemuMonitorCommand(dom, f'qemu-io -d {qom} "write 0 4k"', HMP) == ""
        return
    assert dom.fsFreeze() == 1
    result: list[str] = []
    workload = json.dumps({"execute": "x-virtsim-guest-workload",
                           "arguments": {"device": qom, "qdev": True, "writes": 4, "seed": 1}})
    t = threading.Thread(target=lambda: result.append(
        libvirt.qemuMonitorCommand(dom, workload, 0)))
    t.start()
    try:
        t.join(0.3)
        assert t.is_alive() and not result        # the guest's writes wait for the thaw
        out = libvirt.qemuMonitorCommand(dom, f'qemu-io -d {qom} "write -P 0x11 0 4k"', HMP)
        assert out == ""                            # host I/O is not frozen
        assert dom.listAllCheckpoints() == []       # the monitor still answers
    finally:
        assert dom.fsThaw() == 1
        t.join(10)
    assert not t.is_alive()
    assert '"requests": 4' in result[0]
