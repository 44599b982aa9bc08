"""One emulated QEMU instance: machine state, block graph, devices, monitors.

The same object runs inside ``virtsim-qemu`` (a process) and embedded in a caller's
asyncio loop; either way clients reach it only through a real QMP socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..sim import perm as P
from ..sim.clock import Clock, VirtualClock
from ..sim.errors import SimError
from ..sim.events import EventBus
from .config import DEBIAN_VERSION, DeviceSpec, EmulatorConfig, MonitorSpec

if TYPE_CHECKING:
    from ..sim.block import BlockBackend, BlockGraph, Node
    from ..sim.job import JobManager, JobRunner
    from .agent import GuestAgent

__all__ = ["DEBIAN_VERSION", "DeviceSpec", "Emulator", "EmulatorConfig", "MonitorSpec",
           "StartupError", "embedded"]


class StartupError(Exception):
    """A command-line object could not be created; QEMU prints it and exits 1."""


class Emulator:
    """The emulator's state and the glue between monitors and the model."""

    def __init__(self, config: EmulatorConfig | None = None, clock: Clock | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.clock = clock or Clock()
        self.rng = random.Random(self.config.seed)
        self.bus = EventBus()
        self._graph: BlockGraph | None = None
        self._jobs: JobManager | None = None
        self._job_task: asyncio.Task[None] | None = None
        self._job_wakeup: asyncio.Event | None = None
        self._pause_points: dict[str, tuple[int, bool]] = {}
        self._pause_subscribed = False
        self.run_state = "prelaunch" if self.config.start_paused else "running"
        self.devices: dict[str, BlockBackend] = {}
        self.device_paths: dict[str, str] = {}          # device id -> QOM path
        self.blk_by_path: dict[str, BlockBackend] = {}  # QOM path of a disk's backend owner
        self.buses: dict[str, str] = self._machine_buses()  # bus name -> PCI/IDE/SCSI
        self._anon_devices = 0
        self.servers: list[Any] = []
        self.nbd_server: Any = None                   # virtsim.nbd.server.NbdServer
        self.block_exports: dict[str, Any] = {}       # export id -> NbdExport, by age
        self.objects: dict[str, Any] = {}             # object-add id -> QomObject
        self.quit_event: asyncio.Event | None = None  # made by start(), inside the loop
        self._quitting = False
        self.in_command = False
        self.agent: GuestAgent | None = None  # the guest's qemu-ga, if a channel exists
        if self.config.agent_channels:
            from .agent import GuestAgent

            self.agent = GuestAgent(self, self.config.agent_channels[0])
        for opts in self.config.blockdevs:
            try:
                self.graph.blockdev_add(self.check_blockdev_options(opts))
            except SimError as e:
                raise StartupError(f"-blockdev {opts.get('_arg', '')}: {e.desc}") from None
        for drive in self.config.drives:
            try:
                self.add_drive(drive)
            except SimError as e:
                raise StartupError(f"-drive {drive.get('_arg', '')}: {e.desc}") from None
        for dev in self.config.devices:
            try:
                self.add_device(dev)
            except SimError as e:
                raise StartupError(f"-device {dev.props.get('_arg', '')}: {e.desc}") from None

    @property
    def graph(self) -> BlockGraph:
        """The block graph, built on first use (keeps a bare emulator's start-up short)."""
        if self._graph is None:
            from ..nbd import blockdriver  # noqa: F401
            from ..sim.block import BlockGraph

            self._graph = BlockGraph(rng=self.rng)
            self._graph.device_ids = self.device_ids
            self._graph.warn = self._report
        return self._graph

    @property
    def jobs(self) -> JobManager:
        """The job list (job.c's), built on first use like the graph."""
        if self._jobs is None:
            from ..sim.job import JobManager, JobRunner

            self._jobs = JobManager(self.bus, self.clock)
            self._jobs.on_wakeup = self._wake_jobs
            self.job_runner: JobRunner = JobRunner(self._jobs)
        return self._jobs

    def arm_pause_point(self, job_id: str, offset: int, hold: bool) -> None:
        """x-virtsim-job-pause-at: on an existing job now, else when it is created (so a
        test can arm it before the command that starts the job)."""
        job = self.jobs.get(job_id)
        if job is not None:
            job.pause_at(offset, hold=hold)
            return
        if not self._pause_subscribed:
            self.bus.subscribe(self._apply_pause_points)
            self._pause_subscribed = True
        self._pause_points[job_id] = (offset, hold)

    def _apply_pause_points(self, name: str, data: dict[str, Any] | None) -> None:
        # "created" is announced before the job is listed; "running" comes before any work
        if name == "JOB_STATUS_CHANGE" and data and data.get("status") in ("created", "running"):
            job_id = str(data.get("id"))
            job = self.jobs.get(job_id)
            if job is not None and job_id in self._pause_points:
                offset, hold = self._pause_points.pop(job_id)
                job.pause_at(offset, hold=hold)

    def _wake_jobs(self) -> None:
        if self._job_wakeup is not None:
            self._job_wakeup.set()
        elif self._job_task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._job_wakeup = asyncio.Event()
            self._job_wakeup.set()
            self._job_task = loop.create_task(self._drive_jobs())

    async def _drive_jobs(self) -> None:
        """Run job steps when they are due: the emulator's equivalent of QEMU's coroutines."""
        assert self._job_wakeup is not None
        while True:
            self.run_jobs()
            nxt = self.job_runner.next_wakeup()
            self._job_wakeup.clear()
            if nxt is not None and isinstance(self.clock, VirtualClock):
                # virtual time: let pending I/O run, then jump straight to the next step
                # (throttled jobs finish at once, in the same order as in real time)
                await asyncio.sleep(0)
                if not self._job_wakeup.is_set() and nxt > self.clock.monotonic():
                    self.clock.advance(nxt - self.clock.monotonic())
                continue
            timeout = None if nxt is None else max(0.0, nxt - self.clock.monotonic())
            try:
                await asyncio.wait_for(self._job_wakeup.wait(), timeout)
            except TimeoutError:
                pass

    def run_jobs(self) -> None:
        """Step every due job now (also called after each command, before its reply, so a
        fast job's events precede the reply as in QEMU)."""
        if self._jobs is not None:
            self.job_runner.run_due()

    def _report(self, msg: str) -> None:
        """QEMU's error_report(): program name prefix, on stderr."""
        import sys

        # like QEMU, no program-name prefix while a monitor command is running
        prefix = "" if self.in_command else "qemu-system-x86_64: "
        try:
            print(f"{prefix}{msg}", file=sys.stderr, flush=True)
        except OSError:  # nobody reads our stderr any more; keep running
            pass

    # ----- identity -------------------------------------------------------------------
    def version_info(self) -> dict[str, Any]:
        return self.config.version

    def command_names(self) -> list[str]:
        from . import schema
        from .commands import load_all

        registry = load_all()
        return [n for n in schema.command_names() if n in registry] + ["qmp_capabilities"]

    def device_ids(self) -> set[str]:
        return set(self.device_paths)

    # ----- run state ------------------------------------------------------------------
    def cont_vm(self) -> None:
        if self.run_state != "running":
            self.run_state = "running"
            self.bus.emit("RESUME", None)
            if self.agent is not None:
                self.agent.guest_state_changed()

    def stop_vm(self) -> None:
        if self.run_state == "running":
            self.run_state = "paused"
            self.bus.emit("STOP", None)
            if self.agent is not None:
                self.agent.guest_state_changed()

    def powerdown(self) -> None:
        self.bus.emit("POWERDOWN", None)

    def request_quit(self) -> None:
        """``quit``: QEMU reports SHUTDOWN before the command's reply, then exits."""
        self._quitting = True
        self.bus.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})

    @property
    def quitting(self) -> bool:
        return self._quitting

    # ----- block helpers ----------------------------------------------------------------
    def check_blockdev_options(self, opts: dict[str, Any]) -> dict[str, Any]:
        drv = opts.get("driver")
        from . import schema

        unsupported: frozenset[str] = schema.UNSUPPORTED_DRIVERS
        if drv in unsupported:
            raise SimError(f"Driver '{drv}' is not supported by virtsim")
        return opts

    def add_drive(self, d: dict[str, str]) -> None:
        """Legacy ``-drive if=none,id=X,file=F,format=FMT``: a named BlockBackend."""
        iface = d.get("if", "ide")
        if iface != "none":
            raise SimError(f"virtsim supports only if=none drives (got if={iface})")
        did = d.get("id")
        if not did:
            raise SimError("drive with if=none needs an id")
        if self.graph.find_backend(did) is not None:
            raise SimError(f"Duplicate ID '{did}' for drive")
        ro = d.get("readonly", d.get("read-only", "off")) in ("on", "true")
        from ..sim.block import BlockBackend

        fmt = d.get("format") or "raw"
        opts: dict[str, Any] = {"driver": fmt, "read-only": ro,
                                "file": {"driver": "file", "filename": d["file"]}}
        if "node-name" in d:
            opts["node-name"] = d["node-name"]
        if "discard" in d:
            opts["discard"] = d["discard"]
        node = self.graph.open_node(opts, inherited_ro=None)
        blk = BlockBackend(self.graph, did, None, read_only=ro)
        blk.removable = True
        self.graph.add_backend(blk, node, 0, P.ALL)

    # guest-visible buses: what a disk device can plug into
    _CONTROLLERS = {"virtio-scsi-pci": "SCSI", "virtio-scsi": "SCSI", "ich9-ahci": "IDE",
                    "piix3-ide": "IDE"}
    _DISKS = {"virtio-blk-pci": "PCI", "virtio-blk": "PCI", "scsi-hd": "SCSI",
              "ide-hd": "IDE"}

    def _machine_buses(self) -> dict[str, str]:
        if self.config.machine == "pc":
            return {"pci.0": "PCI", "ide.0": "IDE", "ide.1": "IDE"}
        if self.config.machine == "q35":
            return {"pcie.0": "PCI", **{f"ide.{i}": "IDE" for i in range(6)}}
        return {}

    def _new_path(self, did: str | None) -> str:
        if did:
            return f"/machine/peripheral/{did}"
        n = self._anon_devices
        self._anon_devices += 1
        return f"/machine/peripheral-anon/device[{n}]"

    def add_device(self, dev: DeviceSpec) -> None:
        """``-device``/``device_add`` for disks (a simulated guest disk is a BlockBackend
        attached to a device) and for the controllers that give them a bus."""
        from ..sim.block import BlockBackend

        kind = self._CONTROLLERS.get(dev.driver) or self._DISKS.get(dev.driver)
        if kind is None:
            raise SimError(f"'{dev.driver}' is not a valid device model name")
        need = "PCI" if dev.driver in self._CONTROLLERS else kind
        bus = dev.props.get("bus")
        if bus is not None:
            if self.buses.get(bus) is None:
                raise SimError(f"Bus '{bus}' not found")
        elif need not in self.buses.values():
            raise SimError(f"No '{need}' bus found for device '{dev.driver}'")
        did = dev.id
        if did is not None and did in self.device_paths:
            raise SimError(f"Duplicate ID '{did}' for device")
        if dev.driver in self._CONTROLLERS:
            path = self._new_path(did)
            if did is not None:
                self.device_paths[did] = path
            if kind == "SCSI":
                self.buses[f"{did or 'scsi'}.0"] = "SCSI"
            else:
                for i in range(6):
                    self.buses[f"{did or 'ide'}.{i}"] = "IDE"
            return
        if dev.drive is None:
            raise SimError("drive property not set")
        virtio = dev.driver.startswith("virtio-blk")
        prop_owner = "virtio-blk-device" if virtio else dev.driver
        drive_blk = self.graph.find_backend(dev.drive)
        node = drive_blk.root if drive_blk is not None else self.graph.find_node(dev.drive)
        if node is None:
            raise SimError(f"Property '{prop_owner}.drive' can't find value '{dev.drive}'")
        path = self._new_path(did)
        # the BlockBackend's device: virtio-blk-pci's inner virtio-blk-device (no id, so it
        # goes by its QOM path), or the scsi-hd/ide-hd device itself (by id if it has one)
        blk_path = path + "/virtio-backend" if virtio else path
        qdev = blk_path if virtio or not did else did
        ro = node.read_only
        perm = P.CONSISTENT_READ | (0 if ro else P.WRITE)
        shared = P.CONSISTENT_READ | P.WRITE_UNCHANGED | P.RESIZE
        if dev.props.get("share-rw") in ("on", "true"):
            shared |= P.WRITE
        if drive_blk is not None:
            # a -drive BlockBackend gets attached to the device: it keeps its name
            assert drive_blk.root_edge is not None
            self.graph.update_perms(drive_blk.root_edge, perm, shared)
            drive_blk.qdev = qdev
            drive_blk.removable = False
            drive_blk.has_device = True
            blk = drive_blk
        else:
            blk = BlockBackend(self.graph, "", qdev, read_only=ro)
            blk.has_device = True
            self.graph.add_backend(blk, node, perm, shared)
        if did is not None:
            self.device_paths[did] = path
        self.devices[did or path] = blk
        self.blk_by_path[blk_path] = blk

    def del_device(self, did: str) -> None:
        path = self.device_paths.get(did)
        if path is None:
            raise SimError(f"Device '{did}' not found")
        del self.device_paths[did]
        blk = self.devices.pop(did, None)
        if blk is not None:
            for p in [p for p, b in self.blk_by_path.items() if b is blk]:
                del self.blk_by_path[p]
            if blk.name:
                blk.qdev = None
                blk.has_device = False
                blk.removable = True
            else:
                self.graph.remove_backend(blk)
        self.bus.emit("DEVICE_DELETED", {"device": did, "path": path})

    def resolve_qdev(self, ident: str) -> BlockBackend:
        """QEMU's blk_by_qdev_id: a device id or QOM path, then the device's backend."""
        path = self.device_paths.get(ident, ident)
        blk = self.blk_by_path.get(path)
        if blk is not None:
            return blk
        known = set(self.device_paths.values())
        if path in known or any(p.startswith(path + "/") for p in self.blk_by_path):
            raise SimError("Device does not have a block device backend")
        if path in ("/machine", "/machine/peripheral", "/machine/peripheral-anon"):
            raise SimError(f"{path} is not a hotpluggable device")
        raise SimError(f"Device '{ident}' not found")

    def node_for_io(self, device: str, qdev: bool) -> tuple[Node, BlockBackend | None]:
        if qdev:
            blk = self.resolve_qdev(device)
            root = blk.root
            if root is None:
                raise SimError(f"Device '{device}' has no medium")
            return root, blk
        blk2 = self.graph.find_backend(device)
        if blk2 is not None and blk2.root is not None:
            return blk2.root, blk2
        node = self.graph.find_node(device)
        if node is None:
            raise SimError(f"Cannot find device='' nor node-name='{device}'")
        return node, None

    # ----- serving --------------------------------------------------------------------
    async def start(self) -> None:
        from .server import MonitorServer

        if self.quit_event is None:
            self.quit_event = asyncio.Event()
        for spec in self.config.monitors:
            srv = MonitorServer(self, spec)
            await srv.start()
            self.servers.append(srv)
        if self.agent is not None:
            await self.agent.start()
            self.agent.guest_state_changed()

    async def wait_quit(self) -> None:
        assert self.quit_event is not None
        await self.quit_event.wait()

    def finish_quit(self) -> None:
        if self.quit_event is not None:
            self.quit_event.set()

    async def close(self) -> None:
        if self._job_task is not None:
            self._job_task.cancel()
            with contextlib.suppress(BaseException):
                await self._job_task
            self._job_task = None
        if self.nbd_server is not None or self.block_exports:
            from .commands.nbd import stop_server

            stop_server(self)
        if self.agent is not None:
            await self.agent.close()
        for srv in self.servers:
            await srv.close()
        self.servers.clear()
        if self._graph is not None:
            self._graph.close_all()

    @property
    def qmp_address(self) -> str | tuple[str, int]:
        srv = self.servers[0]
        return srv.address  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def embedded(config: EmulatorConfig | None = None, socket_dir: str | None = None,
                   clock: Clock | None = None) -> AsyncIterator[Emulator]:
    """Run an emulator inside the current loop, listening on a private unix socket.

    Yields the emulator; its socket path is ``emu.qmp_address``.
    """
    import tempfile

    config = config or EmulatorConfig()
    tmp = None
    if not config.monitors:
        tmp = tempfile.mkdtemp(prefix="virtsim-", dir=socket_dir)
        os.chmod(tmp, 0o700)
        config.monitors.append(MonitorSpec("unix", path=os.path.join(tmp, "qmp.sock")))
    emu = Emulator(config, clock=clock)
    await emu.start()
    from .server import warm_up

    warm_up()
    try:
        yield emu
    finally:
        await emu.close()
        if tmp is not None:
            with contextlib.suppress(OSError):
                for f in os.listdir(tmp):
                    os.unlink(os.path.join(tmp, f))
                os.rmdir(tmp)
