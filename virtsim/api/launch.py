"""Starting a domain's emulator the way libvirt's qemu driver does, and stopping it.

The command line is built once (``-S``, one ``-blockdev`` pair per disk with libvirt's
``libvirt-N-storage``/``libvirt-N-format`` node names, one ``-device`` per disk, a QMP
socket) and then either parsed into an embedded emulator inside the API's loop, or given
to a process: ``virtsim-qemu`` or a real ``qemu-system-x86_64``.  Either way the API
only talks QMP to it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from .xml.domain import DomainDef, DomainDisk

#: bus -> (device model, QOM path suffix that reaches the disk's BlockBackend)
_DEVICE = {"virtio": ("virtio-blk-pci", "/virtio-backend"), "scsi": ("scsi-hd", ""),
           "ide": ("ide-hd", ""), "sata": ("ide-hd", "")}
_ALIAS = {"virtio": "virtio-disk", "scsi": "scsi0-0-0-", "ide": "ide0-0-", "sata": "sata0-0-"}


@dataclass
class DiskNodes:
    """What libvirt names for one running disk."""

    target: str
    index: int
    path: str
    fmt: str
    readonly: bool
    device_id: str
    qom_path: str

    @property
    def storage(self) -> str:
        return f"libvirt-{self.index}-storage"

    @property
    def format_node(self) -> str:
        return f"libvirt-{self.index}-format"


def plan_disks(defn: DomainDef, first_index: int = 1) -> list[DiskNodes]:
    """Node names and device ids, in domain order (libvirt numbers disks from the end
    of the list: the last disk gets the lowest index, as ``qemuDomainPrepareDisk`` walks
    them; with one disk that is libvirt-1-*)."""
    usable = [d for d in defn.disks if d.source is not None and d.device == "disk"]
    out = []
    counters: dict[str, int] = {}
    for i, disk in enumerate(usable):
        bus = disk.bus or _bus_for(disk.target)
        n = counters.get(bus, 0)
        counters[bus] = n + 1
        did = f"{_ALIAS.get(bus, 'virtio-disk')}{n}"
        suffix = _DEVICE.get(bus, _DEVICE["virtio"])[1]
        out.append(DiskNodes(disk.target, first_index + len(usable) - 1 - i,
                             disk.source or "", disk.format or "raw", disk.readonly, did,
                             f"/machine/peripheral/{did}{suffix}"))
    return out


def _bus_for(target: str) -> str:
    if target.startswith("vd"):
        return "virtio"
    if target.startswith("sd"):
        return "scsi"
    return "ide"


def command_line(defn: DomainDef, disks: list[DiskNodes], qmp_path: str,
                 real_qemu: bool) -> list[str]:
    argv = ["-name", f"guest={defn.name},debug-threads=on", "-S",
            "-machine", "pc,accel=tcg" if real_qemu else "pc",
            "-m", f"size={defn.memory_kib or 65536}k", "-nodefaults", "-no-user-config",
            "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    by_target = {d.target: d for d in defn.disks}
    for node in disks:
        dom: DomainDisk = by_target[node.target]
        storage = {"driver": "file", "filename": node.path, "node-name": node.storage,
                   "auto-read-only": True, "discard": "unmap"}
        fmt: dict[str, Any] = {"node-name": node.format_node, "read-only": node.readonly,
                               "driver": node.fmt, "file": node.storage}
        argv += ["-blockdev", json.dumps(storage, separators=(",", ":")),
                 "-blockdev", json.dumps(fmt, separators=(",", ":"))]
        model = _DEVICE.get(dom.bus or _bus_for(node.target), _DEVICE["virtio"])[0]
        argv += ["-device", f"{model},drive={node.format_node},id={node.device_id}"]
    if defn.guest_agent:  # QUIESCE: the guest agent channel, its socket in the run dir
        from .agent import channel_argv

        argv += channel_argv(os.path.dirname(qmp_path))
    return argv


class Emulator:
    """A running emulator: where its QMP socket is, and how to end it."""

    qmp_path: str

    async def stop(self) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None


class EmbeddedEmulator(Emulator):
    """An emulator object inside the API's own loop (``virtsim:///embedded``)."""

    def __init__(self) -> None:
        self._ctx: Any = None
        self._dir: str | None = None

    async def start(self, argv: list[str], qmp_path: str) -> None:
        from ..qmp.cli import parse_args
        from ..qmp.emulator import embedded

        config, _extra = parse_args(argv)
        # qemu-io's report goes to QEMU's stdout, which is the API user's here: keep quiet
        config.echo_qemu_io = False
        self.qmp_path = qmp_path
        self._ctx = embedded(config)
        await self._ctx.__aenter__()

    async def stop(self) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            with contextlib.suppress(Exception):
                await ctx.__aexit__(None, None, None)
        with contextlib.suppress(OSError):
            os.unlink(self.qmp_path)


class ProcessEmulator(Emulator):
    """``virtsim-qemu`` or a real QEMU as a child process, ended by pid."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, argv: list[str], qmp_path: str) -> None:
        """Spawn it with stderr in a log file beside its socket (as libvirt keeps
        /var/log/libvirt/qemu/NAME.log): a pipe could fill up, or break when we die."""
        self.qmp_path = qmp_path
        log = os.path.join(os.path.dirname(qmp_path), "emulator.log")
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                self.binary, *argv, stdin=asyncio.subprocess.DEVNULL,
                stdout=fd, stderr=fd)
        finally:
            os.close(fd)
        for _ in range(400):
            if os.path.exists(qmp_path):
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.005)
        await self.stop()
        try:
            with open(log, encoding="utf-8", errors="replace") as f:
                err = f.read()
        except OSError:
            err = ""
        raise RuntimeError(f"emulator {self.binary} did not start: {err.strip()}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.qmp_path)


def default_simulator() -> str:
    """The ``virtsim-qemu`` next to this Python, else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "virtsim-qemu")
    return here if os.path.exists(here) else (shutil.which("virtsim-qemu") or "virtsim-qemu")


def private_dir(base: str | None = None) -> str:
    d = tempfile.mkdtemp(prefix="virtsim-dom-", dir=base)
    os.chmod(d, 0o700)
    return d
