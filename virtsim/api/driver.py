"""The API's asyncio core: one driver per URI, its domains, and their running emulators.

This is the libvirt qemu driver's role in miniature: a domain definition becomes a running
emulator (started with ``-S`` then ``cont``, as libvirt does), and every later operation is
QMP over that emulator's socket.  Checkpoints live in ``checkpoints.py``, backup jobs in
``backup.py``; both work on the ``DomainObj`` defined here.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

from . import constants as c
from . import errors as E
from .launch import (
    DiskNodes,
    EmbeddedEmulator,
    Emulator,
    ProcessEmulator,
    command_line,
    default_simulator,
    plan_disks,
    private_dir,
)
from .monitor import Monitor
from .runner import LoopThread
from .state import StateDir
from .xml.domain import DomainDef, format_domain, parse_domain

if TYPE_CHECKING:
    from .backup import BackupJob
    from .checkpoints import CheckpointTree

#: libvirt 9.0.0
LIB_VERSION = 9_000_000


@dataclass
class DriverConfig:
    """What a URI asks for."""

    uri: str
    mode: str = "embedded"                  # embedded | session
    emulator: str | None = None             # None: simulated; else a binary to run
    statedir: str | None = None
    #: qemu.conf's backup_tls_x509_cert_dir / backup_tls_x509_verify, as URI parameters
    tls_x509_cert_dir: str | None = None
    tls_x509_verify: bool = True

    @property
    def embedded_emulators(self) -> bool:
        return self.mode == "embedded" and self.emulator is None


def parse_uri(uri: str) -> DriverConfig:
    u = urlparse(uri)
    if u.scheme != "virtsim":
        raise E.make_error(c.VIR_ERR_NO_CONNECT, c.VIR_FROM_NONE, uri)
    path = u.path.strip("/") or "embedded"
    if path not in ("embedded", "session"):
        raise E.make_error(c.VIR_ERR_NO_CONNECT, c.VIR_FROM_NONE, uri)
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    return DriverConfig(uri=uri, mode=path, emulator=q.get("emulator"),
                        statedir=q.get("statedir"),
                        tls_x509_cert_dir=q.get("tls_x509_cert_dir"),
                        tls_x509_verify=q.get("tls_x509_verify", "1") not in ("0", "no"))


@dataclass
class Listener:
    id: int
    conn: Any           # the facade connection (what callbacks receive)
    dom_name: str | None
    event_id: int
    cb: Callable[..., Any]
    opaque: Any


@dataclass
class DomainObj:
    """One domain: its definition and, while it runs, its emulator and bookkeeping."""

    defn: DomainDef
    persistent: bool = True
    state: int = c.VIR_DOMAIN_SHUTOFF
    reason: int = c.VIR_DOMAIN_SHUTOFF_UNKNOWN
    id: int | None = None
    emulator: Emulator | None = None
    monitor: Monitor | None = None
    disks: list[DiskNodes] = field(default_factory=list)
    rundir: str | None = None
    node_index: int = 0
    checkpoints: CheckpointTree | None = None
    backups: dict[int, BackupJob] = field(default_factory=dict)
    completed_job: dict[str, Any] | None = None
    #: virtsim:///session: where definitions and checkpoint metadata persist
    statedir: StateDir | None = None
    frozen: bool = False

    @property
    def name(self) -> str:
        return self.defn.name

    @property
    def uuid(self) -> str:
        assert self.defn.uuid is not None
        return self.defn.uuid

    @property
    def active(self) -> bool:
        return self.state not in (c.VIR_DOMAIN_SHUTOFF,)

    def next_index(self) -> int:
        self.node_index += 1
        return self.node_index

    def disk_by_target(self, target: str) -> DiskNodes | None:
        for d in self.disks:
            if d.target == target:
                return d
        return None


class Driver:
    """Everything one URI's connections share."""

    def __init__(self, config: DriverConfig) -> None:
        self.config = config
        self.runner = LoopThread()
        self.domains: dict[str, DomainObj] = {}
        self.listeners: list[Listener] = []
        self._listener_ids = 0
        self._next_id = 1
        self.refs = 0
        self.statedir: StateDir | None = None
        if config.mode == "session":
            self.statedir = StateDir(config.statedir or _default_statedir())
            self.workdir = os.path.join(self.statedir.path, "run")
            self._load()
        else:
            self.workdir = private_dir()

    def _load(self) -> None:
        """Reopen a session: definitions and checkpoints back, leftovers of a dead API
        process (its emulators, their run directories) gone."""
        from .xml.checkpoint import parse_checkpoint

        sd = self.statedir
        assert sd is not None
        for entry in os.listdir(self.workdir):
            path = os.path.join(self.workdir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
        for name, xml in sd.domains():
            sd.reap_stale(name)
            try:
                dom = self.define(xml, True, save=False)
            except E.libvirtError:
                continue
            tree = dom.checkpoints
            assert tree is not None
            docs, current = sd.checkpoints(name)
            for doc in docs:
                with contextlib.suppress(E.libvirtError):
                    cdef = parse_checkpoint(doc, redefine=True)
                    if cdef.name is not None:
                        tree.defs[cdef.name] = cdef
            tree.current = current if current in tree.defs else None

    # ----- events -------------------------------------------------------------------------
    def add_listener(self, conn: Any, dom_name: str | None, event_id: int,
                     cb: Callable[..., Any], opaque: Any) -> int:
        self._listener_ids += 1
        self.listeners.append(Listener(self._listener_ids, conn, dom_name, event_id, cb,
                                       opaque))
        return self._listener_ids

    def remove_listener(self, conn: Any, cb_id: int) -> None:
        for ls in self.listeners:
            if ls.id == cb_id and ls.conn is conn:
                self.listeners.remove(ls)
                return
        raise E.make_error(c.VIR_ERR_INVALID_ARG, c.VIR_FROM_DOMAIN,
                           f"could not find event callback {cb_id} for deletion")

    def emit(self, dom: DomainObj, event_id: int, *args: Any) -> None:
        """Deliver a domain event to matching callbacks (on the callback thread)."""
        for ls in list(self.listeners):
            if ls.event_id != event_id or (ls.dom_name and ls.dom_name != dom.name):
                continue
            facade_dom = ls.conn._domain(dom.name)

            def call(ls: Listener = ls, d: Any = facade_dom) -> None:
                ls.cb(ls.conn, d, *args, ls.opaque)

            self.runner.post(call)

    def lifecycle(self, dom: DomainObj, event: int, detail: int) -> None:
        self.emit(dom, c.VIR_DOMAIN_EVENT_ID_LIFECYCLE, event, detail)

    # ----- definitions ----------------------------------------------------------------------
    def lookup(self, name: str) -> DomainObj:
        dom = self.domains.get(name)
        if dom is None:
            raise E.NO_DOMAIN_BY_NAME(name)
        return dom

    def lookup_uuid(self, uuid: str) -> DomainObj:
        want = uuid.replace("-", "").lower()
        for dom in self.domains.values():
            if dom.uuid.replace("-", "").lower() == want:
                return dom
        raise E.NO_DOMAIN_BY_UUID(uuid)

    def define(self, xml: str, persistent: bool, validate: bool = False,
               save: bool = True) -> DomainObj:
        defn = parse_domain(xml, validate=validate)
        if defn.uuid is None:
            defn.uuid = str(uuidlib.uuid4())
        for other in self.domains.values():
            if other.name == defn.name and other.uuid != defn.uuid:
                raise E.DOMAIN_EXISTS(defn.name, other.uuid)
            if other.uuid == defn.uuid and other.name != defn.name:
                raise E.make_error(c.VIR_ERR_OPERATION_FAILED, c.VIR_FROM_DOMAIN,
                                   f"domain '{other.name}' already exists with uuid "
                                   f"{other.uuid}")
        existing = self.domains.get(defn.name)
        if existing is not None:
            existing.defn = defn if not existing.active else existing.defn
            existing.persistent = existing.persistent or persistent
            if persistent and save:
                self._save(existing, defn)
            return existing
        from .checkpoints import CheckpointTree

        dom = DomainObj(defn=defn, persistent=persistent, statedir=self.statedir)
        dom.checkpoints = CheckpointTree(dom)
        self.domains[defn.name] = dom
        if persistent and save:
            self._save(dom, defn)
        if persistent:
            self.lifecycle(dom, c.VIR_DOMAIN_EVENT_DEFINED, c.VIR_DOMAIN_EVENT_DEFINED_ADDED)
        return dom

    def _save(self, dom: DomainObj, defn: DomainDef) -> None:
        if self.statedir is not None:
            self.statedir.save_domain(dom.name, format_domain(defn, secure=True,
                                                              inactive=True))

    def undefine(self, dom: DomainObj) -> None:
        if self.statedir is not None:
            self.statedir.remove_domain(dom.name)
        if dom.active:
            dom.persistent = False
        else:
            del self.domains[dom.name]
        self.lifecycle(dom, c.VIR_DOMAIN_EVENT_UNDEFINED, c.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED)

    def xml_desc(self, dom: DomainObj, flags: int) -> str:
        return format_domain(dom.defn, secure=bool(flags & c.VIR_DOMAIN_XML_SECURE),
                             inactive=bool(flags & c.VIR_DOMAIN_XML_INACTIVE),
                             live_id=dom.id if dom.active else None)

    # ----- lifecycle --------------------------------------------------------------------------
    async def start(self, dom: DomainObj, paused: bool = False) -> None:
        if dom.active:
            raise E.DOMAIN_ALREADY_RUNNING()
        dom.rundir = private_dir(self.workdir)
        qmp_path = os.path.join(dom.rundir, "monitor.sock")
        dom.node_index = 0
        dom.disks = plan_disks(dom.defn, 1)
        dom.node_index = len(dom.disks)
        real = self.config.emulator is not None and "virtsim" not in os.path.basename(
            self.config.emulator)
        argv = command_line(dom.defn, dom.disks, qmp_path, real_qemu=real)
        emu: Emulator
        if self.config.embedded_emulators:
            emb = EmbeddedEmulator()
            await emb.start(argv, qmp_path)
            emu = emb
        else:
            proc = ProcessEmulator(self.config.emulator or default_simulator())
            await proc.start(argv, qmp_path)
            emu = proc
        mon = Monitor(f"virtsim-{dom.name}")
        try:
            await mon.connect(qmp_path)
            if not paused:
                await mon.execute("cont")
        except BaseException:
            await mon.close()
            await emu.stop()
            raise
        dom.emulator, dom.monitor = emu, mon
        mon.subscribers.append(lambda ev: self._on_event(dom, ev))
        mon.on_lost = lambda: self._lost(dom, mon)
        if self.statedir is not None:
            self.statedir.save_pid(dom.name, emu.pid)
        dom.id = self._next_id
        self._next_id += 1
        if paused:
            dom.state, dom.reason = c.VIR_DOMAIN_PAUSED, c.VIR_DOMAIN_PAUSED_USER
        else:
            dom.state, dom.reason = c.VIR_DOMAIN_RUNNING, c.VIR_DOMAIN_RUNNING_BOOTED
            # libvirt 9.0 relays QEMU's RESUME (from `cont`) before it reports the start
            self.lifecycle(dom, c.VIR_DOMAIN_EVENT_RESUMED, c.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED)
        self.lifecycle(dom, c.VIR_DOMAIN_EVENT_STARTED, c.VIR_DOMAIN_EVENT_STARTED_BOOTED)
        if paused:
            self.lifecycle(dom, c.VIR_DOMAIN_EVENT_SUSPENDED,
                           c.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED)

    async def _lost(self, dom: DomainObj, mon: Monitor) -> None:
        """qemuProcessHandleMonitorEOF: the emulator died; the domain is shut off
        (crashed) and its jobs end."""
        if dom.monitor is mon and dom.active:
            await self.stop(dom, c.VIR_DOMAIN_SHUTOFF_CRASHED,
                            c.VIR_DOMAIN_EVENT_STOPPED_FAILED)

    async def _on_event(self, dom: DomainObj, ev: dict[str, Any]) -> None:
        for job in list(dom.backups.values()):
            await job.on_event(ev)

    async def stop(self, dom: DomainObj, reason: int, event_detail: int) -> None:
        """Tear a running domain down (destroy, shutdown, driver close)."""
        for job in list(dom.backups.values()):
            await job.domain_stopped()
        if dom.monitor is not None:
            await dom.monitor.close()
        if dom.emulator is not None:
            await dom.emulator.stop()
        dom.monitor = dom.emulator = None
        if self.statedir is not None:
            self.statedir.save_pid(dom.name, None)
        if dom.rundir:
            shutil.rmtree(dom.rundir, ignore_errors=True)
            dom.rundir = None
        dom.state, dom.reason, dom.id = c.VIR_DOMAIN_SHUTOFF, reason, None
        dom.disks = []
        self.lifecycle(dom, c.VIR_DOMAIN_EVENT_STOPPED, event_detail)
        if not dom.persistent:
            self.domains.pop(dom.name, None)

    def require_active(self, dom: DomainObj) -> Monitor:
        if not dom.active or dom.monitor is None:
            raise E.DOMAIN_NOT_RUNNING()
        return dom.monitor

    async def suspend(self, dom: DomainObj) -> None:
        mon = self.require_active(dom)
        if dom.state == c.VIR_DOMAIN_PAUSED:
            return
        await mon.execute("stop")
        dom.state, dom.reason = c.VIR_DOMAIN_PAUSED, c.VIR_DOMAIN_PAUSED_USER
        self.lifecycle(dom, c.VIR_DOMAIN_EVENT_SUSPENDED, c.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED)

    async def resume(self, dom: DomainObj) -> None:
        mon = self.require_active(dom)
        if dom.state != c.VIR_DOMAIN_PAUSED:
            raise E.make_error(c.VIR_ERR_OPERATION_INVALID, c.VIR_FROM_DOMAIN,
                               "domain is not paused")
        await mon.execute("cont")
        dom.state, dom.reason = c.VIR_DOMAIN_RUNNING, c.VIR_DOMAIN_RUNNING_UNPAUSED
        self.lifecycle(dom, c.VIR_DOMAIN_EVENT_RESUMED, c.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED)

    async def close(self) -> None:
        for dom in list(self.domains.values()):
            if dom.active:
                with contextlib.suppress(Exception):
                    await self.stop(dom, c.VIR_DOMAIN_SHUTOFF_DESTROYED,
                                    c.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)
        if self.statedir is None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _default_statedir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "virtsim")


def now_ms() -> int:
    return int(time.monotonic() * 1000)


# ----- driver registry: connections to one URI share one driver ------------------------------
_DRIVERS: dict[str, Driver] = {}


def _close_all() -> None:
    """At interpreter exit no emulator process may outlive its user."""
    for drv in list(_DRIVERS.values()):
        drv.refs = 1
        release(drv)


atexit.register(_close_all)


def acquire(uri: str) -> Driver:
    """The shared driver for ``uri`` (libvirt: every connection sees the same domains)."""
    cfg = parse_uri(uri)
    key = f"{cfg.mode}|{cfg.emulator}|{cfg.statedir}|{cfg.tls_x509_cert_dir}"
    drv = _DRIVERS.get(key)
    if drv is None:
        drv = _DRIVERS[key] = Driver(cfg)
    drv.refs += 1
    return drv


def release(drv: Driver) -> None:
    drv.refs -= 1
    if drv.refs > 0:
        return
    for key, d in list(_DRIVERS.items()):
        if d is drv:
            del _DRIVERS[key]
    if not drv.runner.closed:
        with contextlib.suppress(Exception):
            drv.runner.run(drv.close(), timeout=30)
        drv.runner.stop()


async def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.005)
