"""The API suite of issue 5, run against all three emulator kinds (fixture ``api_uri``):
the embedded emulator, ``virtsim-qemu`` processes and a real ``qemu-system-x86_64``.

Every flow is driven only through the libvirt-shaped API, as backup software would drive
libvirt: domains, checkpoints, push and pull backups (full and incremental) with guest
writes racing the jobs, job stats and events, abort semantics, libvirt's errors, read-only
connections, and virtsim's id-based job model.  Backups are verified the way a restore
would be: ``qemu-img compare`` against a shadow image that received exactly the guest
writes made before the backup started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

import virtsim.api as libvirt

from .conftest import EMULATOR_URIS, assert_valid, need, reference_output

T = TypeVar("T")
MiB = 1 << 20
DISK_SIZE = 64 * MiB
HMP = libvirt.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP


# ----- helpers ---------------------------------------------------------------------------------
def tool(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, name)
    assert path is not None
    return path


def make_disk(path: Path, *writes: str) -> Path:
    """A 64 MiB qcow2 image, optionally with data written offline (qemu-io commands)."""
    subprocess.run([tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), "64M"],
                   check=True)
    if writes:
        qemu_io(path, *writes)
    return path


def qemu_io(path: Path, *cmds: str) -> None:
    argv = [tool("qemu-io"), "-f", "qcow2"]
    for cmd in cmds:
        argv += ["-c", cmd]
    subprocess.run([*argv, str(path)], check=True, stdout=subprocess.DEVNULL)


def compare(a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "qcow2") -> None:
    """qemu-img compare: same guest-visible content (exit 0) or the test fails with its text."""
    r = subprocess.run([tool("qemu-img"), "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"{a} != {b}: {r.stdout}{r.stderr}"


def domain_xml(name: str, disks: list[Path]) -> str:
    """A domain like the one real libvirt ran for the reference transcripts."""
    devs = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{p}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, p in enumerate(disks))
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
            f"<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type>"
            f"<boot dev='hd'/></os><devices>"
            f"<emulator>/usr/bin/qemu-system-x86_64</emulator>{devs}"
            f"<memballoon model='none'/></devices></domain>")


class Guest:
    """Guest writes through the monitor, as on a real libvirt host; a shadow image gets the
    same writes while ``shadowing`` so it always equals the disk 'as of now'."""

    def __init__(self, dom: libvirt.virDomain, shadow: Path | None = None, dev: int = 0) -> None:
        self.dom = dom
        self.shadow = shadow
        self.dev = dev

    def write(self, pattern: int, offset: int, length: int, shadow: bool = True) -> None:
        cmd = f"write -P 0x{pattern:02x} {offset} {length}"
        out = libvirt.qemuMonitorCommand(
            self.dom, f'qemu-io -d /machine/peripheral/virtio-disk{self.dev}/virtio-backend '
                      f'"{cmd}"', HMP)
        assert "error" not in out.lower(), out
        if shadow and self.shadow is not None:
            qemu_io(self.shadow, cmd)


class JobEvents:
    """VIR_DOMAIN_EVENT_ID_JOB_COMPLETED callbacks, collected."""

    def __init__(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> None:
        self.params: list[dict[str, Any]] = []
        self.doms: list[str] = []
        self._cond = threading.Condition()
        self.seen = 0
        self.cb_id = conn.domainEventRegisterAny(
            dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._cb, "opaque-value")

    def _cb(self, conn: Any, dom: libvirt.virDomain, params: dict[str, Any],
            opaque: Any) -> None:
        assert opaque == "opaque-value"
        with self._cond:
            self.params.append(params)
            self.doms.append(dom.name())
            self._cond.notify_all()

    def next(self, timeout: float = 20.0) -> dict[str, Any]:
        """The next event not yet looked at (waiting for it if need be)."""
        with self._cond:
            self.seen += 1
            assert self._cond.wait_for(lambda: len(self.params) >= self.seen, timeout), \
                f"no JOB_COMPLETED event #{self.seen}"
            return self.params[self.seen - 1]


def start(conn: libvirt.virConnect, name: str, disks: list[Path]) -> libvirt.virDomain:
    dom = conn.defineXML(domain_xml(name, disks))
    assert dom.create() == 0
    return dom


def error_of(fn: Callable[[], object]) -> libvirt.libvirtError:
    with pytest.raises(libvirt.libvirtError) as info:
        fn()
    return info.value


def assert_error(fn: Callable[[], object], code: int, message: str) -> None:
    e = error_of(fn)
    assert (e.get_error_code(), e.get_error_message()) == (code, message)


def is_real_qemu(conn: libvirt.virConnect) -> bool:
    return conn.getURI() == EMULATOR_URIS["qemu"]


def push_xml(disk: str, target: Path, incremental: str | None = None) -> str:
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (f"<domainbackup mode='push'>{inc}<disks><disk name='{disk}' type='file'>"
            f"<target file='{target}'/><driver type='qcow2'/></disk></disks></domainbackup>")


def pull_xml(disk: str, socket: Path, scratch: Path, incremental: str | None = None) -> str:
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (f"<domainbackup mode='pull'>{inc}<server transport='unix' socket='{socket}'/>"
            f"<disks><disk name='{disk}' backup='yes' type='file'>"
            f"<scratch file='{scratch}'/></disk></disks></domainbackup>")


def checkpoint_xml(name: str, description: str | None = None) -> str:
    desc = f"<description>{description}</description>" if description else ""
    return f"<domaincheckpoint><name>{name}</name>{desc}</domaincheckpoint>"


def begin_held(conn: libvirt.virConnect, dom: libvirt.virDomain, events: JobEvents,
               job_id: str, begin: Callable[[int], T],
               missed: Callable[[T], object] = lambda _: None) -> T:
    """Begin a push (``begin(attempt)``) that is still running afterwards, held paused, so
    a test can abort it.

    A virtsim emulator pauses the job (as job-pause would) at a pause point armed before
    the job exists: deterministic.  Real QEMU gets job-pause right after the start; QEMU
    puts the whole 64 MiB copy in flight at once (64 workers of 1 MiB) and may, on a busy
    machine, conclude before the pause lands; then the job is let end (``missed`` cleans up)
    and the test tries again.  (A throttle would never land in time: block-copy checks the
    rate limit only before dispatching.)"""
    for attempt in range(8):
        if not is_real_qemu(conn):
            qmp(dom, "x-virtsim-job-pause-at", {"id": job_id, "offset": MiB})
        result = begin(attempt)
        if not is_real_qemu(conn):
            return result
        reply = qmp_reply(dom, "job-pause", {"id": job_id})
        if "return" in reply:
            return result
        assert reply["error"]["desc"] in (
            f"Job '{job_id}' in state 'concluded' cannot accept command verb 'pause'",
            "Job not found"), reply
        assert events.next()["success"] is True
        missed(result)
    pytest.fail("QEMU finished every push before it could be paused")


def qmp_reply(dom: libvirt.virDomain, cmd: str, args: dict[str, Any] | None = None) -> Any:
    msg: dict[str, Any] = {"execute": cmd}
    if args is not None:
        msg["arguments"] = args
    return json.loads(libvirt.qemuMonitorCommand(dom, json.dumps(msg), 0))


def qmp(dom: libvirt.virDomain, cmd: str, args: dict[str, Any] | None = None) -> Any:
    reply = qmp_reply(dom, cmd, args)
    assert "return" in reply, reply
    return reply["return"]


def bitmaps(dom: libvirt.virDomain, node: str = "libvirt-1-format") -> dict[str, dict[str, Any]]:
    for n in qmp(dom, "query-named-block-nodes", {"flat": True}):
        if n["node-name"] == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
    raise AssertionError(f"no node {node}")


def nbd_read_dirty(socket: Path, export: str, bitmap: str, into: Path) -> list[tuple[int, int]]:
    """Read the dirty extents of ``qemu:dirty-bitmap:<bitmap>`` with libnbd and write them
    into the raw image ``into`` (an incremental restore onto the previous full copy)."""
    try:
        import nbd
    except ImportError:
        need(False, "python3-libnbd (module nbd)")
        raise
    context = f"qemu:dirty-bitmap:{bitmap}"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.set_export_name(export)
    h.connect_unix(str(socket))
    try:
        assert h.can_meta_context(context)
        size = h.get_size()
        assert size == DISK_SIZE
        dirty: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            replies: list[tuple[int, list[int]]] = []

            def extent(ctx: str, offset: int, entries: list[int], err: Any,
                       replies: list[tuple[int, list[int]]] = replies) -> int:
                if ctx == context:
                    replies.append((offset, list(entries)))
                return 0

            h.block_status(min(size - pos, 1 << 30), pos, extent)
            assert replies
            for offset, entries in replies:
                for length, flags in zip(entries[::2], entries[1::2], strict=True):
                    if flags & 1:
                        if dirty and dirty[-1][0] + dirty[-1][1] == offset:
                            dirty[-1] = (dirty[-1][0], dirty[-1][1] + length)
                        else:
                            dirty.append((offset, length))
                    offset += length
                pos = offset
        fd = os.open(into, os.O_WRONLY)
        try:
            for offset, length in dirty:
                for at in range(offset, offset + length, 4 * MiB):
                    n = min(4 * MiB, offset + length - at)
                    os.pwrite(fd, h.pread(n, at), at)
        finally:
            os.close(fd)
        return dirty
    finally:
        h.shutdown()


@contextmanager
def read_only(uri: str) -> Iterator[libvirt.virConnect]:
    ro = libvirt.openReadOnly(uri)
    try:
        yield ro
    finally:
        ro.close()


# ----- domains ---------------------------------------------------------------------------------
def test_domain_lifecycle(conn: libvirt.virConnect, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "vda.qcow2")
    events: list[tuple[str, int, int]] = []
    got = threading.Condition()

    def lifecycle(c: Any, d: libvirt.virDomain, event: int, detail: int, opaque: Any) -> None:
        with got:
            events.append((d.name(), event, detail))
            got.notify_all()

    cb = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle,
                                     None)
    assert conn.getLibVersion() == 9_000_000
    dom = conn.defineXML(domain_xml("life", [disk]))
    assert dom.name() == "life" and conn.lookupByName("life") == dom
    assert conn.lookupByUUIDString(dom.UUIDString()) == dom
    assert dom.isActive() == 0 and dom.isPersistent() == 1
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN]
    inactive = dom.XMLDesc(0)
    assert "id=" not in inactive.split("\n", 1)[0]
    assert_valid(inactive, "domain.rng")

    assert dom.create() == 0
    assert dom.isActive() == 1
    assert dom.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED]
    live = dom.XMLDesc(0)
    assert re.match(r"<domain type='qemu' id='\d+'>", live)
    assert f"<source file='{disk}'" in live and "<emulator>/usr/bin/qemu-system-x86_64<" in live
    assert_valid(live, "domain.rng")
    assert [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)] \
        == ["life"]
    assert_error(dom.create, libvirt.VIR_ERR_OPERATION_INVALID,
                 "Requested operation is not valid: domain is already running")

    assert dom.suspend() == 0
    assert dom.state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]
    assert dom.resume() == 0
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    assert dom.destroy() == 0
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED]
    assert_error(dom.destroy, libvirt.VIR_ERR_OPERATION_INVALID,
                 "Requested operation is not valid: domain is not running")
    with got:
        assert got.wait_for(lambda: len(events) >= 7, 10), events
    # the order real libvirt 9.0 delivers them in (RESUMED is QEMU's answer to `cont`,
    # SHUTDOWN/HOST its answer to SIGTERM)
    assert events == [
        ("life", libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED),
        ("life", libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED),
        ("life", libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED),
        ("life", libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED),
        ("life", libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED),
        ("life", libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_HOST),
        ("life", libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED),
    ]
    conn.domainEventDeregisterAny(cb)
    # a domain left running is destroyed by close() (checked by the fixture)
    assert dom.create() == 0


# ----- checkpoints -----------------------------------------------------------------------------
def names(cps: list[libvirt.virDomainCheckpoint]) -> list[str]:
    return [cp.getName() for cp in cps]


def test_checkpoint_tree_listing_and_xml(conn: libvirt.virConnect, tmp_path: Path) -> None:
    dom = start(conn, "cps", [make_disk(tmp_path / "vda.qcow2")])
    guest = Guest(dom)
    cp1 = dom.checkpointCreateXML(checkpoint_xml("cp1", "first checkpoint"))
    guest.write(0xAA, 0, 64 * 1024)
    cp2 = dom.checkpointCreateXML(checkpoint_xml("cp2"))
    cp3 = dom.checkpointCreateXML("<domaincheckpoint><name>cp3</name><disks>"
                                  "<disk name='vda' checkpoint='bitmap'/></disks>"
                                  "</domaincheckpoint>")
    guest.write(0xBB, 8 * MiB, MiB)
    assert cp1.getName() == "cp1" and cp1.domain() == dom

    lst = dom.listAllCheckpoints
    assert sorted(names(lst())) == ["cp1", "cp2", "cp3"]
    assert names(lst(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS)) == ["cp1"]
    assert names(lst(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)) == ["cp1", "cp2", "cp3"]
    assert names(lst(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES)) == ["cp3"]
    assert sorted(names(lst(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_NO_LEAVES))) == ["cp1", "cp2"]
    both = libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES | libvirt.VIR_DOMAIN_CHECKPOINT_LIST_NO_LEAVES
    assert sorted(names(lst(both))) == ["cp1", "cp2", "cp3"]
    assert names(lst(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS
                     | libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES)) == []

    assert cp3.getParent() == cp2 and cp2.getParent().getName() == "cp1"
    assert_error(cp1.getParent, libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
                 "Domain checkpoint not found: checkpoint 'cp1' does not have a parent")
    assert names(cp1.listAllChildren()) == ["cp2"]
    assert names(cp1.listAllChildren(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_DESCENDANTS)) \
        == ["cp2", "cp3"]
    assert names(cp1.listAllChildren(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_DESCENDANTS
                                     | libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES)) == ["cp3"]
    assert names(cp3.listAllChildren()) == []
    assert conn.lookupByName("cps").checkpointLookupByName("cp2") == cp2
    assert_error(lambda: dom.checkpointLookupByName("nope"), libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
                 "Domain checkpoint not found: no domain checkpoint with matching name 'nope'")

    full = cp1.getXMLDesc(0)
    assert_valid(full, "domaincheckpoint.rng")
    assert re.fullmatch(
        r"<domaincheckpoint>\n  <name>cp1</name>\n  <description>first checkpoint</description>\n"
        r"  <creationTime>\d+</creationTime>\n  <disks>\n"
        r"    <disk name='vda' checkpoint='bitmap' bitmap='cp1'/>\n  </disks>\n"
        r"  <domain type='qemu'>\n.*</domain>\n</domaincheckpoint>\n", full, re.S), full
    assert "<parent>\n    <name>cp1</name>\n  </parent>" in cp2.getXMLDesc(0)
    nodom = cp2.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
    assert "<domain " not in nodom
    assert_valid(nodom, "domaincheckpoint.rng")
    sizes = {}
    for cp in (cp1, cp2, cp3):
        xml = cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE
                            | libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
        assert_valid(xml, "domaincheckpoint.rng")
        m = re.search(r"<disk name='vda' checkpoint='bitmap' bitmap='cp\d' size='(\d+)'/>", xml)
        assert m, xml
        sizes[cp.getName()] = int(m.group(1))
    assert sizes == {"cp1": MiB + 64 * 1024, "cp2": MiB, "cp3": MiB}
    # the bitmaps QEMU holds are libvirt's: persistent, recording, named like the checkpoints
    bms = bitmaps(dom)
    assert sorted(bms) == ["cp1", "cp2", "cp3"]
    assert all(b["persistent"] and b["recording"] for b in bms.values())

    # SIZE needs a running domain; plain XML does not
    dom.destroy()
    assert_error(lambda: cp1.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE),
                 libvirt.VIR_ERR_OPERATION_INVALID,
                 "Requested operation is not valid: domain is not running")
    assert cp1.getXMLDesc(0) == full
    assert_error(lambda: dom.checkpointCreateXML(checkpoint_xml("cp4")),
                 libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                 "Operation not supported: cannot create checkpoint for inactive domain")
    assert_error(lambda: cp3.delete(0), libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                 "Operation not supported: cannot delete checkpoint for inactive domain")


def test_checkpoint_delete_flags(conn: libvirt.virConnect, tmp_path: Path) -> None:
    dom = start(conn, "cpdel", [make_disk(tmp_path / "vda.qcow2")])
    for n in ("a", "b", "c"):
        dom.checkpointCreateXML(checkpoint_xml(n))
    a = dom.checkpointLookupByName("a")
    assert_error(lambda: a.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN
                                  | libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY),
                 libvirt.VIR_ERR_INVALID_ARG,
                 "Flags 'VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN' and "
                 "'VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY' are mutually exclusive")

    # CHILDREN_ONLY: b and c go (metadata and bitmaps), a stays and becomes current
    assert a.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY) == 0
    assert names(dom.listAllCheckpoints()) == ["a"] and sorted(bitmaps(dom)) == ["a"]
    d = dom.checkpointCreateXML(checkpoint_xml("d"))
    assert d.getParent() == a

    # a plain delete re-parents the children to the deleted one's parent
    assert a.delete(0) == 0
    assert names(dom.listAllCheckpoints()) == ["d"] and sorted(bitmaps(dom)) == ["d"]
    assert_error(d.getParent, libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
                 "Domain checkpoint not found: checkpoint 'd' does not have a parent")
    assert names(dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS)) == ["d"]
    e = dom.checkpointCreateXML(checkpoint_xml("e"))
    assert e.getParent() == d

    # METADATA_ONLY forgets the checkpoint but leaves QEMU's bitmap alone
    assert e.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY) == 0
    assert names(dom.listAllCheckpoints()) == ["d"] and sorted(bitmaps(dom)) == ["d", "e"]
    assert_error(lambda: e.getXMLDesc(0), libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
                 "Domain checkpoint not found: no domain checkpoint with matching name 'e'")

    # CHILDREN: the whole subtree
    dom.checkpointCreateXML(checkpoint_xml("f"))
    dom.checkpointCreateXML(checkpoint_xml("g"))
    assert d.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN) == 0
    assert dom.listAllCheckpoints() == [] and sorted(bitmaps(dom)) == ["e"]


def test_checkpoint_redefine(conn: libvirt.virConnect, tmp_path: Path) -> None:
    dom = start(conn, "redef", [make_disk(tmp_path / "vda.qcow2")])
    r = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    validate = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    c1 = dom.checkpointCreateXML(checkpoint_xml("c1"))
    c2 = dom.checkpointCreateXML(checkpoint_xml("c2"))
    saved = {cp.getName(): cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SECURE)
             for cp in (c1, c2)}
    # metadata lost (as after moving a VM), bitmaps still in the image
    c1.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
              | libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN)
    assert dom.listAllCheckpoints() == [] and sorted(bitmaps(dom)) == ["c1", "c2"]

    assert_error(lambda: dom.checkpointCreateXML(saved["c1"], validate),
                 libvirt.VIR_ERR_INVALID_ARG,
                 "Flag 'VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE' is required by flag "
                 "'VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE'")
    assert dom.checkpointCreateXML(saved["c1"], r | validate).getName() == "c1"
    assert dom.checkpointCreateXML(saved["c2"], r).getParent().getName() == "c1"
    assert names(dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)) \
        == ["c1", "c2"]
    assert dom.checkpointLookupByName("c1").getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SECURE) \
        == saved["c1"]
    # the redefined chain is current again: a new checkpoint hangs below c2
    assert dom.checkpointCreateXML(checkpoint_xml("c3")).getParent().getName() == "c2"
    # redefining an existing one replaces its definition and keeps its children
    again = saved["c1"].replace("<name>c1</name>", "<name>c1</name>\n  <description>moved"
                                "</description>")
    dom.checkpointCreateXML(again, r)
    assert "<description>moved</description>" in dom.checkpointLookupByName("c1").getXMLDesc(0)
    assert names(dom.checkpointLookupByName("c1").listAllChildren()) == ["c2"]

    # VALIDATE against QEMU's bitmaps: missing, or present but not recording -> inconsistent
    def renamed(xml: str, name: str) -> str:
        return xml.replace("<name>c1</name>", f"<name>{name}</name>", 1) \
            .replace("bitmap='c1'", f"bitmap='{name}'")

    ghost = renamed(saved["c1"], "ghost")
    assert_error(lambda: dom.checkpointCreateXML(ghost, r | validate),
                 libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT,
                 "checkpoint inconsistent: missing or broken bitmap 'ghost' for disk 'vda'")
    qmp(dom, "block-dirty-bitmap-add", {"node": "libvirt-1-format", "name": "frozen",
                                        "persistent": True, "disabled": True})
    frozen = renamed(saved["c1"], "frozen")
    assert_error(lambda: dom.checkpointCreateXML(frozen, r | validate),
                 libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT,
                 "checkpoint inconsistent: missing or broken bitmap 'frozen' for disk 'vda'")
    assert sorted(names(dom.listAllCheckpoints())) == ["c1", "c2", "c3"]
    # without VALIDATE libvirt trusts the caller
    assert dom.checkpointCreateXML(frozen, r).getName() == "frozen"
    # an incremental backup from it then finds the broken bitmap
    assert_error(lambda: dom.backupBegin(push_xml("vda", tmp_path / "t.qcow2", "frozen")),
                 libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT,
                 "checkpoint inconsistent: missing or broken bitmap 'frozen' for disk 'vda'")
    assert not (tmp_path / "t.qcow2").exists()
    # a different domain's checkpoint cannot be redefined here
    other = re.sub(r"<uuid>[^<]+</uuid>", "<uuid>00000000-0000-0000-0000-000000000001</uuid>",
                   saved["c1"]).replace("<name>c1</name>", "<name>x1</name>", 1)
    e = error_of(lambda: dom.checkpointCreateXML(other, r))
    assert (e.get_error_code(), e.get_error_domain()) == (libvirt.VIR_ERR_INVALID_ARG,
                                                          libvirt.VIR_FROM_DOMAIN_CHECKPOINT)
    assert e.get_error_message() == ("invalid argument: definition for checkpoint x1 must use "
                                     f"uuid {dom.UUIDString()}")


# ----- push ------------------------------------------------------------------------------------
def test_push_full_then_incremental(conn: libvirt.virConnect, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "vda.qcow2", "write -P 0x11 0 8M", "write -P 0x22 40M 4M")
    shadow = tmp_path / "shadow.qcow2"
    shutil.copyfile(disk, shadow)
    dom = start(conn, "push", [disk])
    events = JobEvents(conn, dom)
    guest = Guest(dom, shadow)
    guest.write(0x33, 4 * MiB, 2 * MiB)

    # full push with checkpoint cp1 atomically at the same point in time
    full = tmp_path / "full.qcow2"
    assert dom.backupBegin(push_xml("vda", full), checkpoint_xml("cp1")) == 0
    for i in range(8):      # racing the job: never in the backup
        guest.write(0x40 + i, i * 5 * MiB + 512 * 1024, MiB, shadow=False)
    done = events.next()
    assert done["success"] is True and done["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    assert done[libvirt.VIR_DOMAIN_JOB_DISK_TOTAL] == DISK_SIZE
    assert done[libvirt.VIR_DOMAIN_JOB_DISK_PROCESSED] == DISK_SIZE
    assert done[libvirt.VIR_DOMAIN_JOB_DISK_REMAINING] == 0
    assert events.doms == ["push"]
    compare(full, shadow)
    assert names(dom.listAllCheckpoints()) == ["cp1"]
    for i in range(8):
        qemu_io(shadow, f"write -P 0x{0x40 + i:02x} {i * 5 * MiB + 512 * 1024} {MiB}")

    guest.write(0x55, 20 * MiB, 3 * MiB)
    assert_error(lambda: dom.backupBegin(push_xml("vda", full)), libvirt.VIR_ERR_INVALID_ARG,
                 f"invalid argument: store '{full}' for backup of 'vda' exists")

    # incremental push from cp1 with checkpoint cp2
    incr = tmp_path / "incr.qcow2"
    assert dom.backupBegin(push_xml("vda", incr, "cp1"), checkpoint_xml("cp2")) == 0
    guest.write(0x66, 20 * MiB, MiB, shadow=False)
    guest.write(0x67, 60 * MiB, MiB, shadow=False)
    done = events.next()
    assert done["success"] is True
    # only what was dirtied since cp1 is copied: the 8 racing writes and 20M..23M (one of
    # the racing writes lies inside it): 10 MiB
    assert done[libvirt.VIR_DOMAIN_JOB_DISK_TOTAL] == 10 * MiB
    assert done[libvirt.VIR_DOMAIN_JOB_DISK_REMAINING] == 0
    stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    assert stats["type"] == libvirt.VIR_DOMAIN_JOB_COMPLETED
    assert {k: v for k, v in stats.items() if k != "type"} == done
    # the temporary bitmap is gone, the checkpoints' stay
    assert sorted(bitmaps(dom)) == ["cp1", "cp2"]
    # restore: the incremental image over the full one equals the disk at cp2
    subprocess.run([tool("qemu-img"), "rebase", "-u", "-f", "qcow2", "-b", str(full),
                    "-F", "qcow2", str(incr)], check=True)
    compare(incr, shadow)
    assert names(dom.checkpointLookupByName("cp2").getParent().listAllChildren()) == ["cp2"]


def test_push_defaults(conn: libvirt.virConnect, tmp_path: Path) -> None:
    """``<domainbackup/>``: push, full, every disk, a target named after the checkpoint."""
    disk = make_disk(tmp_path / "vda.qcow2", "write -P 0x77 1M 3M")
    shadow = tmp_path / "shadow.qcow2"
    shutil.copyfile(disk, shadow)
    dom = start(conn, "defaults", [disk])
    events = JobEvents(conn, dom)
    dom.backupBegin("<domainbackup/>", checkpoint_xml("cpx"))
    try:
        xml: str | None = dom.backupGetXMLDesc()
    except libvirt.libvirtError as e:   # the job may already have ended (it is tiny)
        assert e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP
        xml = None
    done = events.next()
    if xml is not None:
        assert re.sub(r" index='\d+'", "", xml) == (
            "<domainbackup mode='push'>\n  <disks>\n"
            "    <disk name='vda' backup='yes' type='file' backupmode='full'>\n"
            "      <driver type='qcow2'/>\n"
            f"      <target file='{disk}.cpx'/>\n"
            "    </disk>\n  </disks>\n</domainbackup>\n")
        assert_valid(xml, "domainbackup.rng")
    assert done["success"] is True
    compare(Path(f"{disk}.cpx"), shadow)
    assert names(dom.listAllCheckpoints()) == ["cpx"]


def test_abort_push_is_cancelled(conn: libvirt.virConnect, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "vda.qcow2", "write -P 0x5a 0 64M")
    dom = start(conn, "abortpush", [disk])
    events = JobEvents(conn, dom)
    job = "backup-vda-libvirt-1-format"

    def begin(attempt: int) -> Path:
        target = tmp_path / f"target{attempt}.qcow2"
        dom.backupBegin(push_xml("vda", target), checkpoint_xml(f"kept{attempt}"))
        return target

    target = begin_held(conn, dom, events, job, begin, lambda t: t.unlink())
    running = dom.jobStats()
    assert running["type"] == libvirt.VIR_DOMAIN_JOB_UNBOUNDED
    assert running[libvirt.VIR_DOMAIN_JOB_DISK_TOTAL] == DISK_SIZE
    assert "success" not in running
    info = dom.jobInfo()
    assert info[0] == libvirt.VIR_DOMAIN_JOB_UNBOUNDED and info[3] == DISK_SIZE
    assert info[9] == DISK_SIZE and info[4] == info[10]
    assert dom.blockJobInfo("vda")["type"] == libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP
    assert target.exists()

    assert dom.abortJob() == 0
    done = events.next()
    assert done["success"] is False
    assert done[libvirt.VIR_DOMAIN_JOB_ERRMSG] == "Operation canceled"
    stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    assert stats == {"type": libvirt.VIR_DOMAIN_JOB_CANCELLED, **done}
    # the target of an unfinished push goes; the checkpoint made with it stays
    assert not target.exists()
    current = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES)[0].getName()
    assert current.startswith("kept") and current in bitmaps(dom)
    assert qmp(dom, "query-jobs") == []
    assert dom.blockJobInfo("vda") == {}
    assert_error(dom.abortJob, libvirt.VIR_ERR_OPERATION_INVALID,
                 "Requested operation is not valid: no job is active on the domain")

    # REUSE_EXTERNAL: the caller's target is the caller's (libvirt deletes what it made)
    def begin_reuse(attempt: int) -> Path:
        target = tmp_path / f"mine{attempt}.qcow2"
        make_disk(target)
        dom.backupBegin(push_xml("vda", target), None,
                        libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
        return target

    mine = begin_held(conn, dom, events, job, begin_reuse)
    dom.abortJob()
    assert events.next()["success"] is False
    assert mine.exists()


def test_second_backup_waits_for_the_job_lock(conn: libvirt.virConnect,
                                              tmp_path: Path) -> None:
    """libvirt's one async job per domain: a second backupBegin waits for a running push
    (up to 30 s) and starts once it ended; here the first one is aborted meanwhile."""
    dom = start(conn, "lock", [make_disk(tmp_path / "vda.qcow2", "write -P 0x5a 0 64M")])
    events = JobEvents(conn, dom)
    job = "backup-vda-libvirt-1-format"

    def begin(attempt: int) -> None:
        dom.backupBegin(push_xml("vda", tmp_path / f"first{attempt}.qcow2"))

    begin_held(conn, dom, events, job, begin, lambda _: None)
    second: list[object] = []
    waiter = threading.Thread(target=lambda: second.append(
        dom.backupBegin(push_xml("vda", tmp_path / "second.qcow2"))))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and second == []     # still waiting for the lock
    dom.abortJob()
    waiter.join(20)
    assert second == [0]
    assert events.next()["success"] is False      # the first, aborted
    assert events.next()["success"] is True       # the second, complete
    assert (tmp_path / "second.qcow2").exists()


# ----- pull ------------------------------------------------------------------------------------
def test_pull_full_then_incremental(conn: libvirt.virConnect, tmp_path: Path) -> None:
    nbdcopy = tool("nbdcopy")
    disk = make_disk(tmp_path / "vda.qcow2", "write -P 0x11 0 8M", "write -P 0x22 48M 4M")
    shadow = tmp_path / "shadow.qcow2"
    shutil.copyfile(disk, shadow)
    dom = start(conn, "pull", [disk])
    events = JobEvents(conn, dom)
    guest = Guest(dom, shadow)
    guest.write(0x33, 8 * MiB, MiB)
    sock, scratch = tmp_path / "backup.sock", tmp_path / "scratch-vda.qcow2"

    assert dom.backupBegin(pull_xml("vda", sock, scratch), checkpoint_xml("cp1")) == 0
    xml = dom.backupGetXMLDesc()
    expected = reference_output("07-backup-dumpxml-pull-full.txt", str(tmp_path))
    assert re.sub(r" index='\d+'", "", xml) == re.sub(r" index='\d+'", "", expected)
    assert_valid(xml, "domainbackup.rng")
    stats = dom.jobStats()
    assert stats["type"] == libvirt.VIR_DOMAIN_JOB_UNBOUNDED
    assert stats["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
    assert stats[libvirt.VIR_DOMAIN_JOB_DISK_TEMP_TOTAL] == DISK_SIZE
    assert libvirt.VIR_DOMAIN_JOB_DISK_TOTAL not in stats and "success" not in stats
    assert scratch.exists()

    full = tmp_path / "full.raw"
    copy = subprocess.Popen([nbdcopy, f"nbd+unix:///vda?socket={sock}", str(full)],
                            stderr=subprocess.PIPE)
    for i in range(8):      # racing the reader: the export keeps the point in time
        guest.write(0x70 + i, i * 7 * MiB, MiB, shadow=False)
    assert copy.wait(30) == 0, copy.stderr.read() if copy.stderr else ""
    compare(full, shadow, "raw")
    used = dom.jobStats()[libvirt.VIR_DOMAIN_JOB_DISK_TEMP_USED]
    assert used >= 8 * MiB    # the racing writes copied old data into the scratch
    assert dom.blockJobInfo("vda") == {"type": libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP,
                                       "bandwidth": 0, "cur": used, "end": DISK_SIZE}
    info = dom.jobInfo()      # libvirt's legacy struct has no place for temp-space numbers
    assert info[0] == libvirt.VIR_DOMAIN_JOB_UNBOUNDED and info[2:] == [0] * 10

    assert dom.abortJob() == 0
    done = events.next()
    # libvirt: an aborted pull backup is a *completed* one (the client ended it)
    assert done["success"] is True and done[libvirt.VIR_DOMAIN_JOB_ERRMSG] == "Operation canceled"
    kept = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                        | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
    assert kept["type"] == libvirt.VIR_DOMAIN_JOB_COMPLETED
    assert kept[libvirt.VIR_DOMAIN_JOB_DISK_TEMP_TOTAL] == DISK_SIZE
    assert dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) == kept
    assert dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) == {
        "type": libvirt.VIR_DOMAIN_JOB_NONE}
    assert not scratch.exists()       # (a killed QEMU 7.2 leaves its NBD socket file behind)
    assert_error(dom.backupGetXMLDesc, libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
                 "Domain backup job id not found: no domain backup job present")
    for i in range(8):
        qemu_io(shadow, f"write -P 0x{0x70 + i:02x} {i * 7 * MiB} {MiB}")

    guest.write(0x88, 32 * MiB, 64 * 1024)
    guest.write(0x89, 60 * MiB, 2 * MiB)
    assert_error(lambda: dom.backupBegin(pull_xml("vda", sock, scratch, "nope")),
                 libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
                 "Domain checkpoint not found: Checkpoint 'nope' for incremental backup of "
                 "disk 'vda' not found")
    assert not scratch.exists()
    assert dom.backupBegin(pull_xml("vda", sock, scratch, "cp1")) == 0
    xml = dom.backupGetXMLDesc()
    expected = reference_output("17-backup-dumpxml-pull-incr.txt", str(tmp_path))
    assert re.sub(r" index='\d+'", "", xml) == re.sub(r" index='\d+'", "", expected)
    guest.write(0x99, 32 * MiB, 4 * MiB, shadow=False)     # after the point in time
    dirty = nbd_read_dirty(sock, "vda", "backup-vda", full)
    assert dirty == [(i * 7 * MiB, MiB) for i in range(5)] + [
        (32 * MiB, 64 * 1024), (35 * MiB, MiB), (42 * MiB, MiB), (49 * MiB, MiB),
        (60 * MiB, 2 * MiB)]
    compare(full, shadow, "raw")
    assert dom.abortJob() == 0
    done = events.next()
    assert done["success"] is True
    assert dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)["type"] \
        == libvirt.VIR_DOMAIN_JOB_COMPLETED
    assert sorted(bitmaps(dom)) == ["cp1"]
    assert not scratch.exists()


def test_pull_over_tcp(conn: libvirt.virConnect, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "vda.qcow2", "write -P 0x3c 2M 6M")
    shadow = tmp_path / "shadow.qcow2"
    shutil.copyfile(disk, shadow)
    dom = start(conn, "tcp", [disk])
    with socket.socket() as s:        # a free port (libvirt 9.0 requires one to be given)
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    dom.backupBegin(f"<domainbackup mode='pull'><server name='localhost' port='{port}'/>"
                    f"<disks><disk name='vda' type='file'><scratch file='{tmp_path / 's.qcow2'}'/>"
                    f"</disk></disks></domainbackup>")
    xml = dom.backupGetXMLDesc()
    assert f"<server transport='tcp' name='localhost' port='{port}'/>" in xml, xml
    assert_valid(xml, "domainbackup.rng")
    Guest(dom).write(0x3d, 4 * MiB, MiB)
    copy = tmp_path / "copy.raw"
    subprocess.run([tool("nbdcopy"), f"nbd://localhost:{port}/vda", str(copy)], check=True)
    compare(copy, shadow, "raw")
    dom.abortJob()


# ----- errors ----------------------------------------------------------------------------------
def test_backup_errors(conn: libvirt.virConnect, tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "vda.qcow2")
    dom = conn.defineXML(domain_xml("errs", [disk]))
    assert_error(dom.backupGetXMLDesc, libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
                 "Domain backup job id not found: no domain backup job present")
    assert_error(lambda: dom.backupBegin("<domainbackup/>"), libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                 "Operation not supported: cannot perform disk backup for inactive domain")
    assert_error(dom.abortJob, libvirt.VIR_ERR_OPERATION_INVALID,
                 "Requested operation is not valid: domain is not running")
    assert_error(dom.jobStats, libvirt.VIR_ERR_OPERATION_INVALID,
                 "Requested operation is not valid: domain is not running")
    assert_error(lambda: dom.backupGetXMLDesc(1), libvirt.VIR_ERR_INVALID_ARG,
                 "unsupported flags (0x1) in function qemuBackupGetXMLDesc")
    dom.create()
    assert_error(dom.abortJob, libvirt.VIR_ERR_OPERATION_INVALID,
                 "Requested operation is not valid: no job is active on the domain")
    assert dom.jobStats() == {"type": libvirt.VIR_DOMAIN_JOB_NONE}
    assert dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) == {
        "type": libvirt.VIR_DOMAIN_JOB_NONE}
    e = error_of(lambda: dom.backupBegin("<domainbackup/>", None, 8))
    assert e.get_error_code() == libvirt.VIR_ERR_INVALID_ARG
    assert e.get_error_message() == "unsupported flags (0x8) in function qemuBackupBegin"
    assert_error(lambda: dom.backupBegin(push_xml("vda", tmp_path / "t.qcow2", "nope")),
                 libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
                 "Domain checkpoint not found: Checkpoint 'nope' for incremental backup of "
                 "disk 'vda' not found")
    assert_error(lambda: dom.backupBegin(
        "<domainbackup><disks><disk name='vda' backup='no'/></disks></domainbackup>"),
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        "unsupported configuration: no disks selected for backup")
    assert_error(lambda: dom.backupBegin("<domainbackup mode='pull'><server name='localhost'/>"
                                         "</domainbackup>"),
                 libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                 "Operation not supported: <domainbackup> must specify TCP port for now")
    exists = tmp_path / "exists.qcow2"
    exists.write_bytes(b"")
    assert_error(lambda: dom.backupBegin(push_xml("vda", exists)), libvirt.VIR_ERR_INVALID_ARG,
                 f"invalid argument: store '{exists}' for backup of 'vda' exists")
    # nothing is left over by the refusals: no job, no nodes, no files
    assert dom.jobStats() == {"type": libvirt.VIR_DOMAIN_JOB_NONE}
    assert not (tmp_path / "t.qcow2").exists()
    assert qmp(dom, "query-jobs") == []
    assert sorted(n["node-name"] for n in qmp(dom, "query-named-block-nodes")) \
        == ["libvirt-1-format", "libvirt-1-storage"]

    # a second libvirt-shaped backup while one runs: libvirt's job lock says no
    sock, scratch = tmp_path / "b.sock", tmp_path / "s.qcow2"
    dom.backupBegin(pull_xml("vda", sock, scratch))
    e = error_of(lambda: dom.backupBegin(push_xml("vda", tmp_path / "t2.qcow2")))
    assert e.get_error_code() == libvirt.VIR_ERR_OPERATION_TIMEOUT
    assert e.get_error_message() == ("Timed out during operation: cannot acquire state change "
                                     "lock (held by monitor=remoteDispatchDomainBackupBegin)")
    assert not (tmp_path / "t2.qcow2").exists()
    assert "<domainbackup mode='pull'>" in dom.backupGetXMLDesc()
    events = JobEvents(conn, dom)
    dom.abortJob()
    # libvirt's job lock: a begin right after an abort waits for the job to end
    dom.backupBegin(pull_xml("vda", sock, scratch))
    assert events.next()["success"] is True
    # the domain goes away under a running backup: libvirt 9.0 reports it CANCELLED, with
    # nothing counted and no message; files are cleaned up
    dom.destroy()
    done = events.next()
    assert done == {"operation": libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP,
                    "time_elapsed": done["time_elapsed"], "success": False}
    assert dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) == {
        "type": libvirt.VIR_DOMAIN_JOB_CANCELLED, **done}
    assert not scratch.exists()       # (a killed QEMU 7.2 leaves its NBD socket file behind)


# ----- read-only -------------------------------------------------------------------------------
def test_read_only_connection(conn: libvirt.virConnect, api_uri: str, tmp_path: Path) -> None:
    dom = start(conn, "ro", [make_disk(tmp_path / "vda.qcow2")])
    dom.checkpointCreateXML(checkpoint_xml("cp1"))
    sock, scratch = tmp_path / "b.sock", tmp_path / "s.qcow2"
    dom.backupBegin(pull_xml("vda", sock, scratch))
    with read_only(api_uri) as ro:
        rdom = ro.lookupByName("ro")
        cp = rdom.checkpointLookupByName("cp1")
        xml = domain_xml("ro2", [tmp_path / "x.qcow2"])
        denied: dict[str, Callable[[], object]] = {
            "virDomainDefineXML": lambda: ro.defineXML(xml),
            "virDomainCreateXML": lambda: ro.createXML(xml, 0),
            "virDomainCreate": rdom.create,
            "virDomainDestroy": rdom.destroy,
            "virDomainShutdown": rdom.shutdown,
            "virDomainSuspend": rdom.suspend,
            "virDomainResume": rdom.resume,
            "virDomainUndefine": rdom.undefine,
            "virDomainFSFreeze": rdom.fsFreeze,
            "virDomainFSThaw": rdom.fsThaw,
            "virDomainBackupBegin": lambda: rdom.backupBegin(push_xml("vda", tmp_path / "t")),
            "virDomainAbortJob": rdom.abortJob,
            "virDomainCheckpointCreateXML": lambda: rdom.checkpointCreateXML(
                checkpoint_xml("cp2")),
            "virDomainCheckpointDelete": cp.delete,
            "virDomainQemuMonitorCommand": lambda: libvirt.qemuMonitorCommand(
                rdom, "info block", HMP),
        }
        for function, call in denied.items():
            e = error_of(call)
            assert e.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED, function
            assert e.get_error_message() == \
                f"operation forbidden: read only access prevents {function}"
            if not function.startswith("virDomainCheckpoint"):   # (as real libvirt 9.0 says)
                assert e.get_error_domain() == (
                    libvirt.VIR_FROM_NONE if function == "virDomainQemuMonitorCommand"
                    else libvirt.VIR_FROM_DOMAIN), function
        for call in (lambda: rdom.backupBeginJob(push_xml("vda", tmp_path / "t")),
                     lambda: rdom.backupEnd(1, libvirt.VIRTSIM_BACKUP_END_ABORT)):
            assert error_of(call).get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
        assert_error(lambda: rdom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE),
                     libvirt.VIR_ERR_OPERATION_DENIED,
                     "operation forbidden: virDomainGetXMLDesc with secure flag")
        assert_error(lambda: cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SECURE),
                     libvirt.VIR_ERR_OPERATION_DENIED,
                     "operation forbidden: virDomainCheckpointGetXMLDesc with secure flag")
        # reading is allowed, and nothing was changed by the refusals
        assert rdom.isActive() == 1 and rdom.XMLDesc(0) == dom.XMLDesc(0)
        assert names(rdom.listAllCheckpoints()) == ["cp1"]
        assert rdom.backupGetXMLDesc() == dom.backupGetXMLDesc()
        assert rdom.jobStats()["type"] == libvirt.VIR_DOMAIN_JOB_UNBOUNDED
        assert "<domain" in cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE)
        assert [d.name() for d in ro.listAllDomains()] == ["ro"]
    assert dom.abortJob() == 0


# ----- virtsim's job model: ids, names, several jobs at once ------------------------------------
def test_backup_jobs_by_id(conn: libvirt.virConnect, tmp_path: Path) -> None:
    vda = make_disk(tmp_path / "vda.qcow2", "write -P 0x1a 0 64M")
    vdb = make_disk(tmp_path / "vdb.qcow2", "write -P 0x1b 0 4M")
    vdc = make_disk(tmp_path / "vdc.qcow2", "write -P 0x1c 8M 4M")
    shadow_b, shadow_c = tmp_path / "shadow-b.qcow2", tmp_path / "shadow-c.qcow2"
    shutil.copyfile(vdb, shadow_b)
    shutil.copyfile(vdc, shadow_c)
    dom = start(conn, "jobs", [vda, vdb, vdc])
    events = JobEvents(conn, dom)
    sock = tmp_path / "backup.sock"

    # two pull jobs on disjoint disks share QEMU's one NBD server
    b = dom.backupBeginJob(pull_xml("vdb", sock, tmp_path / "s-vdb.qcow2"),
                           checkpoint_xml("cpb"), 0, name="pull-vdb")
    Guest(dom, dev=1).write(0x2b, 0, MiB)          # after b's point in time
    e = error_of(lambda: dom.backupBeginJob(
        pull_xml("vdc", tmp_path / "other.sock", tmp_path / "s-vdc.qcow2")))
    assert e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
    assert not (tmp_path / "s-vdc.qcow2").exists()
    c = dom.backupBeginJob(pull_xml("vdc", sock, tmp_path / "s-vdc.qcow2"), None, 0)
    Guest(dom, dev=2).write(0x2c, 8 * MiB, MiB)

    # a push on the third disk, ended with ABORT while it runs: 0 (not a usable backup)
    push_job = "backup-vda-libvirt-3-format"       # libvirt numbers disks from the end

    def begin(attempt: int) -> int:
        return dom.backupBeginJob(push_xml("vda", tmp_path / f"a{attempt}.qcow2"), None, 0,
                                  name="nightly-vda")

    def missed(job_id: int) -> None:
        assert dom.backupEnd(job_id, libvirt.VIRTSIM_BACKUP_END_ABORT) == 1

    a = begin_held(conn, dom, events, push_job, begin, missed)
    target = Path(re.findall(r"<target file='([^']+)'", dom.backupJobXMLDesc(a))[0])
    assert len({a, b, c}) == 3
    jobs = dom.listBackupJobs()
    assert [j["id"] for j in dom.listBackupJobs(libvirt.VIRTSIM_BACKUP_LIST_PUSH)] == [a]
    assert dom.backupEnd(a, libvirt.VIRTSIM_BACKUP_END_ABORT) == 0
    assert [(j["id"], j["name"], j["mode"], j["disks"], j["active"]) for j in jobs] == [
        (b, "pull-vdb", "pull", ["vdb"], True), (c, "", "pull", ["vdc"], True),
        (a, "nightly-vda", "push", ["vda"], True)]
    assert not target.exists()

    # a stale end of job a never touches the others
    e = error_of(lambda: dom.backupEnd(a, libvirt.VIRTSIM_BACKUP_END_ABORT))
    assert e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP
    assert [j["id"] for j in dom.listBackupJobs(libvirt.VIRTSIM_BACKUP_LIST_ACTIVE)] == [b, c]
    assert [j["id"] for j in dom.listBackupJobs(libvirt.VIRTSIM_BACKUP_LIST_PULL)] == [b, c]
    assert dom.listBackupJobs(libvirt.VIRTSIM_BACKUP_LIST_PUSH) == []
    assert dom.listBackupJobs(libvirt.VIRTSIM_BACKUP_LIST_FINISHED) == []
    assert f"<scratch file='{tmp_path / 's-vdb.qcow2'}'/>" in dom.backupJobXMLDesc(b)
    stats = dom.backupJobStats(b)
    assert (stats["type"], stats["name"], stats["id"]) == (libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
                                                           "pull-vdb", b)
    # a second job on a busy disk is refused; the libvirt-shaped calls keep libvirt's rules
    assert_error(lambda: dom.backupBeginJob(push_xml("vdb", tmp_path / "x.qcow2")),
                 libvirt.VIR_ERR_OPERATION_INVALID,
                 "Requested operation is not valid: another backup job is already running")
    assert error_of(lambda: dom.backupBegin(push_xml("vda", tmp_path / "x.qcow2"))) \
        .get_error_code() == libvirt.VIR_ERR_OPERATION_TIMEOUT
    assert_error(dom.abortJob, libvirt.VIR_ERR_OPERATION_INVALID,
                 "Requested operation is not valid: no job is active on the domain")
    assert_error(dom.backupGetXMLDesc, libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
                 "Domain backup job id not found: no domain backup job present")
    assert dom.jobStats() == {"type": libvirt.VIR_DOMAIN_JOB_NONE}
    assert not (tmp_path / "x.qcow2").exists()

    restored = tmp_path / "b.raw"
    subprocess.run([tool("nbdcopy"), f"nbd+unix:///vdb?socket={sock}", str(restored)],
                   check=True)
    compare(restored, shadow_b, "raw")
    assert dom.backupEnd(b) == 1                    # a pull ended normally
    assert not (tmp_path / "s-vdb.qcow2").exists()
    # job c and its export live on
    libvirt_nodes = [n["node-name"] for n in qmp(dom, "query-named-block-nodes")
                     if n["node-name"].startswith("libvirt-")]
    assert len(libvirt_nodes) == 3 * 2 + 2          # the disks and c's scratch
    restored = tmp_path / "c.raw"
    subprocess.run([tool("nbdcopy"), f"nbd+unix:///vdc?socket={sock}", str(restored)],
                   check=True)
    compare(restored, shadow_c, "raw")
    assert dom.backupEnd(c, libvirt.VIRTSIM_BACKUP_END_ABORT) == 0
    assert dom.listBackupJobs() == [] and not sock.exists()
    assert names(dom.listAllCheckpoints()) == ["cpb"]
    # every job announced its end like a libvirt backup: a cancelled push, two pulls
    assert [events.next()["success"] for _ in range(3)] == [False, True, True]

    # a push that completed before its end: 1, and the target is kept
    d = dom.backupBeginJob(push_xml("vdb", tmp_path / "d.qcow2"), None, 0)
    assert events.next()["success"] is True
    assert [(j["id"], j["status"]) for j in dom.listBackupJobs(
        libvirt.VIRTSIM_BACKUP_LIST_FINISHED)] == [(d, libvirt.VIR_DOMAIN_JOB_COMPLETED)]
    assert dom.backupEnd(d, libvirt.VIRTSIM_BACKUP_END_ABORT) == 1
    assert (tmp_path / "d.qcow2").exists()
    # id-based jobs never show up as libvirt's "completed job"
    assert dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) == {
        "type": libvirt.VIR_DOMAIN_JOB_NONE}
    assert set(events.doms) == {"jobs"}
