"""libvirt-python's shapes: ``virConnect``, ``virDomain``, ``virDomainCheckpoint``.

Method names, arguments and return values follow libvirt-python so code ports by changing
the import.  Each call runs the async core on the driver's loop thread.  Read-only
connections refuse every mutating call with VIR_ERR_OPERATION_DENIED, as libvirt's entry
points do, before any other check.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from . import backup as B
from . import constants as c
from . import errors as E
from .driver import LIB_VERSION, DomainObj, Driver, acquire, release
from .errors_qmp import qmp_error

T = TypeVar("T")

# libvirt_qemu's flag for HMP pass-through
VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP = 1


class virConnect:  # noqa: N801 - libvirt-python's class names
    def __init__(self, uri: str, read_only: bool = False) -> None:
        self._drv: Driver | None = acquire(uri)
        self._uri = uri
        self.read_only = read_only

    # ----- plumbing --------------------------------------------------------------------------
    @property
    def drv(self) -> Driver:
        if self._drv is None:
            raise E.make_error(c.VIR_ERR_INVALID_CONN, c.VIR_FROM_NONE, "virConnect")
        return self._drv

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.drv.runner.run(coro)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run a synchronous core step on the loop thread (the core is single-threaded)."""
        async def wrap() -> T:
            return fn()
        return self._run(wrap())

    def _rw(self, function: str) -> None:
        if self.read_only:
            raise E.read_only_denied(function)

    def _domain(self, name: str) -> virDomain:
        return virDomain(self, name)

    # ----- connection ------------------------------------------------------------------------
    def getLibVersion(self) -> int:
        return LIB_VERSION

    def getVersion(self) -> int:
        return 7_002_022

    def getURI(self) -> str:
        return self._uri

    def getType(self) -> str:
        return "QEMU"

    def isAlive(self) -> int:
        return 1 if self._drv is not None else 0

    def isReadOnly(self) -> int:  # virtsim helper
        return 1 if self.read_only else 0

    def close(self) -> int:
        drv, self._drv = self._drv, None
        if drv is not None:
            for ls in [x for x in drv.listeners if x.conn is self]:
                drv.listeners.remove(ls)
            release(drv)
        return 0

    def __enter__(self) -> virConnect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- domains ---------------------------------------------------------------------------
    def defineXML(self, xml: str) -> virDomain:
        # each libvirt entry point names itself in the read-only refusal
        self._rw("virDomainDefineXML")
        return self.defineXMLFlags(xml, 0)

    def defineXMLFlags(self, xml: str, flags: int = 0) -> virDomain:
        self._rw("virDomainDefineXMLFlags")
        dom = self._call(lambda: self.drv.define(
            xml, True, bool(flags & c.VIR_DOMAIN_DEFINE_VALIDATE)))
        return virDomain(self, dom.name)

    def createXML(self, xml: str, flags: int = 0) -> virDomain:
        self._rw("virDomainCreateXML")

        async def go() -> str:
            dom = self.drv.define(xml, False)
            try:
                await self.drv.start(dom, paused=bool(flags & c.VIR_DOMAIN_START_PAUSED))
            except BaseException:
                if not dom.active:
                    self.drv.domains.pop(dom.name, None)
                raise
            return dom.name
        return virDomain(self, self._run(go()))

    def lookupByName(self, name: str) -> virDomain:
        return virDomain(self, self._call(lambda: self.drv.lookup(name)).name)

    def lookupByUUIDString(self, uuid: str) -> virDomain:
        return virDomain(self, self._call(lambda: self.drv.lookup_uuid(uuid)).name)

    def lookupByUUID(self, uuid: bytes) -> virDomain:
        return self.lookupByUUIDString(str(uuidlib.UUID(bytes=uuid)))

    def lookupByID(self, id: int) -> virDomain:
        for dom in list(self.drv.domains.values()):
            if dom.id == id:
                return virDomain(self, dom.name)
        raise E.make_error(c.VIR_ERR_NO_DOMAIN, c.VIR_FROM_QEMU, f"no domain with matching id {id}")

    def listAllDomains(self, flags: int = 0) -> list[virDomain]:
        out = []
        for dom in list(self.drv.domains.values()):
            if flags & c.VIR_CONNECT_LIST_DOMAINS_ACTIVE and not dom.active:
                continue
            if flags & c.VIR_CONNECT_LIST_DOMAINS_INACTIVE and dom.active:
                continue
            if flags & c.VIR_CONNECT_LIST_DOMAINS_PERSISTENT and not dom.persistent:
                continue
            if flags & c.VIR_CONNECT_LIST_DOMAINS_TRANSIENT and dom.persistent:
                continue
            out.append(virDomain(self, dom.name))
        return out

    def listDomainsID(self) -> list[int]:
        return [d.id for d in self.drv.domains.values() if d.id is not None]

    def listDefinedDomains(self) -> list[str]:
        return [d.name for d in self.drv.domains.values() if not d.active and d.persistent]

    # ----- events ----------------------------------------------------------------------------
    def domainEventRegisterAny(self, dom: virDomain | None, eventID: int,
                               cb: Callable[..., Any], opaque: Any) -> int:
        return self.drv.add_listener(self, dom.name() if dom is not None else None, eventID,
                                     cb, opaque)

    def domainEventDeregisterAny(self, callbackID: int) -> int:
        self.drv.remove_listener(self, callbackID)
        return 0

    def registerCloseCallback(self, cb: Callable[..., Any], opaque: Any) -> int:
        self._close_cb: tuple[Callable[..., Any], Any] | None = (cb, opaque)
        return 0

    def unregisterCloseCallback(self) -> int:
        self._close_cb = None
        return 0


class virDomain:  # noqa: N801
    def __init__(self, conn: virConnect, name: str) -> None:
        self._conn = conn
        self._name = name

    def __repr__(self) -> str:
        return f"<virtsim.virDomain {self._name}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, virDomain) and other._name == self._name

    def __hash__(self) -> int:
        return hash(self._name)

    @property
    def _drv(self) -> Driver:
        return self._conn.drv

    def _obj(self) -> DomainObj:
        return self._drv.lookup(self._name)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._conn._run(coro)

    def connect(self) -> virConnect:
        return self._conn

    # ----- identity & state ------------------------------------------------------------------
    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._conn._call(lambda: self._obj().uuid)

    def UUID(self) -> bytes:
        return uuidlib.UUID(self.UUIDString()).bytes

    def ID(self) -> int:
        dom = self._conn._call(self._obj)
        return dom.id if dom.id is not None else -1

    def isActive(self) -> int:
        return 1 if self._conn._call(self._obj).active else 0

    def isPersistent(self) -> int:
        return 1 if self._conn._call(self._obj).persistent else 0

    def state(self, flags: int = 0) -> list[int]:
        dom = self._conn._call(self._obj)
        return [dom.state, dom.reason]

    def info(self) -> list[int]:
        dom = self._conn._call(self._obj)
        mem = dom.defn.memory_kib or 0
        return [dom.state, mem, mem if dom.active else 0, dom.defn.vcpus, 0]

    def XMLDesc(self, flags: int = 0) -> str:
        if flags & c.VIR_DOMAIN_XML_SECURE and self._conn.read_only:
            raise E.secure_denied("virDomainGetXMLDesc")
        return self._conn._call(lambda: self._drv.xml_desc(self._obj(), flags))

    # ----- lifecycle ---------------------------------------------------------------------------
    def create(self) -> int:
        self._conn._rw("virDomainCreate")
        return self.createWithFlags(0)

    def createWithFlags(self, flags: int = 0) -> int:
        self._conn._rw("virDomainCreateWithFlags")

        async def go() -> None:
            await self._drv.start(self._obj(), paused=bool(flags & c.VIR_DOMAIN_START_PAUSED))
        self._run(go())
        return 0

    def destroy(self) -> int:
        self._conn._rw("virDomainDestroy")
        return self.destroyFlags(0)

    def destroyFlags(self, flags: int = 0) -> int:
        self._conn._rw("virDomainDestroyFlags")

        async def go() -> None:
            dom = self._obj()
            self._drv.require_active(dom)
            # SIGTERM makes QEMU report a host-initiated SHUTDOWN first (libvirt relays it)
            self._drv.lifecycle(dom, c.VIR_DOMAIN_EVENT_SHUTDOWN,
                                c.VIR_DOMAIN_EVENT_SHUTDOWN_HOST)
            await self._drv.stop(dom, c.VIR_DOMAIN_SHUTOFF_DESTROYED,
                                 c.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)
        self._run(go())
        return 0

    def shutdown(self) -> int:
        self._conn._rw("virDomainShutdown")
        return self.shutdownFlags(0)

    def shutdownFlags(self, flags: int = 0) -> int:
        """No guest OS listens to ACPI here: the simulated guest powers off at once."""
        self._conn._rw("virDomainShutdownFlags")

        async def go() -> None:
            dom = self._obj()
            mon = self._drv.require_active(dom)
            await mon.execute("system_powerdown")
            await self._drv.stop(dom, c.VIR_DOMAIN_SHUTOFF_SHUTDOWN,
                                 c.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)
        self._run(go())
        return 0

    def suspend(self) -> int:
        self._conn._rw("virDomainSuspend")
        self._run(self._drv.suspend(self._obj()))
        return 0

    def resume(self) -> int:
        self._conn._rw("virDomainResume")
        self._run(self._drv.resume(self._obj()))
        return 0

    def undefine(self) -> int:
        self._conn._rw("virDomainUndefine")
        return self.undefineFlags(0)

    def undefineFlags(self, flags: int = 0) -> int:
        self._conn._rw("virDomainUndefineFlags")
        self._conn._call(lambda: self._drv.undefine(self._obj()))
        return 0

    # ----- guest agent -------------------------------------------------------------------------
    def fsFreeze(self, mountpoints: list[str] | None = None, flags: int = 0) -> int:
        self._conn._rw("virDomainFSFreeze")
        if flags:
            raise E.unsupported_flags(flags, "qemuDomainFSFreeze")
        from . import agent

        async def go() -> int:
            dom = self._obj()
            if not dom.active:
                raise E.DOMAIN_NOT_RUNNING()
            return await agent.fs_freeze(self._drv, dom, mountpoints)
        return self._run(go())

    def fsThaw(self, mountpoints: list[str] | None = None, flags: int = 0) -> int:
        self._conn._rw("virDomainFSThaw")
        if flags:
            raise E.unsupported_flags(flags, "qemuDomainFSThaw")
        from . import agent

        if mountpoints:
            raise agent.THAW_MOUNTPOINTS()

        async def go() -> int:
            dom = self._obj()
            if not dom.active:
                raise E.DOMAIN_NOT_RUNNING()
            return await agent.fs_thaw(self._drv, dom)
        return self._run(go())

    # ----- backups (libvirt's calls) -------------------------------------------------------------
    def backupBegin(self, backupXML: str, checkpointXML: str | None = None,
                    flags: int = 0) -> int:
        self._conn._rw("virDomainBackupBegin")
        self._run(B.begin(self._drv, self._obj(), backupXML, checkpointXML, flags))
        return 0

    def backupGetXMLDesc(self, flags: int = 0) -> str:
        if flags:
            raise E.unsupported_flags(flags, "qemuBackupGetXMLDesc")

        def get() -> str:
            job = B.active_job(self._obj())
            if job is None:
                raise E.NO_DOMAIN_BACKUP()
            return job.xml()
        return self._conn._call(get)

    def abortJob(self) -> int:
        self._conn._rw("virDomainAbortJob")
        return self.abortJobFlags(0)

    def abortJobFlags(self, flags: int = 0) -> int:
        self._conn._rw("virDomainAbortJobFlags")

        async def go() -> None:
            dom = self._obj()
            self._drv.require_active(dom)
            job = B.active_job(dom)
            if job is None:
                raise E.NO_ACTIVE_JOB()
            await job.abort()
        self._run(go())
        return 0

    def jobInfo(self) -> list[int]:
        st = self.jobStats(0)
        # qemuDomainJobDataToInfo: a backup fills the file* fields from the push counters
        # only; a pull's temp-space numbers have no place here (all zero, as in libvirt)
        total = int(st.get(c.VIR_DOMAIN_JOB_DISK_TOTAL, 0))
        done = int(st.get(c.VIR_DOMAIN_JOB_DISK_PROCESSED, 0))
        elapsed = int(st.get(c.VIR_DOMAIN_JOB_TIME_ELAPSED, 0))
        return [int(st["type"]), elapsed, 0, total, done, total - done, 0, 0, 0,
                total, done, total - done]

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            dom = self._obj()
            if flags & c.VIR_DOMAIN_JOB_STATS_COMPLETED:
                if B.active_job(dom) is not None or dom.completed_job is None:
                    return {"type": c.VIR_DOMAIN_JOB_NONE}
                out = dict(dom.completed_job)
                if not flags & c.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED:
                    dom.completed_job = None
                return out
            # libvirt: the completed job survives the domain; the current one needs it running
            self._drv.require_active(dom)
            job = B.active_job(dom)
            if job is None:
                return {"type": c.VIR_DOMAIN_JOB_NONE}
            await job.refresh()
            return {"type": c.VIR_DOMAIN_JOB_UNBOUNDED, **job.stats()}
        return self._run(go())

    def blockJobInfo(self, disk: str, flags: int = 0) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            dom = self._obj()
            for job in dom.backups.values():
                for d in job.disks:
                    if d.target == disk and d.state in ("running", "cancelling"):
                        await job.refresh()
                        return {"type": c.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP, "bandwidth": 0,
                                "cur": d.current, "end": d.total}
            return {}
        return self._run(go())

    # ----- backups (virtsim's job model) -------------------------------------------------------
    def backupBeginJob(self, backupXML: str, checkpointXML: str | None = None,
                       flags: int = 0, name: str | None = None) -> int:
        """Start a backup and return its job id; jobs on disjoint disks may overlap."""
        self._conn._rw("virDomainBackupBegin")
        job = self._run(B.begin(self._drv, self._obj(), backupXML, checkpointXML, flags,
                                libvirt_shaped=False, name=name))
        return job.id

    def _job(self, job_id: int) -> B.BackupJob:
        job = self._obj().backups.get(job_id)
        if job is None:
            raise E.make_error(c.VIR_ERR_NO_DOMAIN_BACKUP, c.VIR_FROM_QEMU,
                               f"no domain backup job with id {job_id}")
        return job

    def backupJobXMLDesc(self, jobID: int, flags: int = 0) -> str:
        return self._conn._call(lambda: self._job(jobID).xml())

    def backupJobStats(self, jobID: int) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            job = self._job(jobID)
            await job.refresh()
            return {"type": job.status, "id": job.id, "name": job.name or "", **job.stats()}
        return self._run(go())

    def listBackupJobs(self, flags: int = 0) -> list[dict[str, Any]]:
        def go() -> list[dict[str, Any]]:
            out = []
            for job in self._obj().backups.values():
                if flags & B.VIRTSIM_BACKUP_LIST_PUSH and not job.push:
                    continue
                if flags & B.VIRTSIM_BACKUP_LIST_PULL and job.push:
                    continue
                if flags & B.VIRTSIM_BACKUP_LIST_ACTIVE and job.finished is not None:
                    continue
                if flags & B.VIRTSIM_BACKUP_LIST_FINISHED and job.finished is None:
                    continue
                out.append({"id": job.id, "name": job.name or "", "mode": job.defn.mode,
                            "disks": [d.target for d in job.disks],
                            "active": job.finished is None, "status": job.status})
            return out
        return self._conn._call(go)

    def backupEnd(self, jobID: int, flags: int = 0) -> int:
        """End job ``jobID``: 1 when its data is complete and consistent (a push that
        finished, a pull ended normally), 0 when it was aborted or failed.  Without
        VIRTSIM_BACKUP_END_ABORT a running push is refused."""
        self._conn._rw("virDomainBackupEnd")

        async def go() -> int:
            dom = self._obj()
            job = self._job(jobID)
            abort = bool(flags & B.VIRTSIM_BACKUP_END_ABORT)
            if job.finished is None:
                if job.push and not abort:
                    raise E.make_error(c.VIR_ERR_OPERATION_INVALID, c.VIR_FROM_QEMU,
                                       f"backup job {jobID} is still running")
                await job.abort()
                await job.done.wait()
            dom.backups.pop(jobID, None)
            if job.push:
                return 1 if job.status == c.VIR_DOMAIN_JOB_COMPLETED and not job.aborted else 0
            return 0 if abort or job.status == c.VIR_DOMAIN_JOB_FAILED else 1
        return self._run(go())

    # ----- checkpoints -------------------------------------------------------------------------
    def checkpointCreateXML(self, xmlDesc: str, flags: int = 0) -> virDomainCheckpoint:
        self._conn._rw("virDomainCheckpointCreateXML")
        if flags & c.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE and \
                flags & c.VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE:
            raise E.exclusive_flags("VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE",
                                    "VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE",
                                    "virDomainCheckpointCreateXML")
        if flags & c.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE and \
                not flags & c.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE:
            raise E.required_flag("VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE",
                                  "VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE",
                                  "virDomainCheckpointCreateXML")

        async def go() -> str:
            dom = self._obj()
            assert dom.checkpoints is not None
            return await dom.checkpoints.create(self._drv, xmlDesc, flags)
        return virDomainCheckpoint(self, self._run(go()))

    def checkpointLookupByName(self, name: str, flags: int = 0) -> virDomainCheckpoint:
        def go() -> str:
            dom = self._obj()
            assert dom.checkpoints is not None
            dom.checkpoints.get(name)
            return name
        return virDomainCheckpoint(self, self._conn._call(go))

    def listAllCheckpoints(self, flags: int = 0) -> list[virDomainCheckpoint]:
        def go() -> list[str]:
            dom = self._obj()
            assert dom.checkpoints is not None
            return dom.checkpoints.names(flags)
        return [virDomainCheckpoint(self, n) for n in self._conn._call(go)]

    def checkpointCurrent(self, flags: int = 0) -> virDomainCheckpoint:  # virtsim helper
        def go() -> str:
            dom = self._obj()
            assert dom.checkpoints is not None
            if dom.checkpoints.current is None:
                raise E.make_error(c.VIR_ERR_NO_DOMAIN_CHECKPOINT, c.VIR_FROM_QEMU,
                                   "the domain does not have a current checkpoint")
            return dom.checkpoints.current
        return virDomainCheckpoint(self, self._conn._call(go))


class virDomainCheckpoint:  # noqa: N801
    def __init__(self, dom: virDomain, name: str) -> None:
        self._dom = dom
        self._name = name

    def __repr__(self) -> str:
        return f"<virtsim.virDomainCheckpoint {self._name}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, virDomainCheckpoint) and other._name == self._name \
            and other._dom == self._dom

    def __hash__(self) -> int:
        return hash((self._dom, self._name))

    def getName(self) -> str:
        return self._name

    def domain(self) -> virDomain:
        return self._dom

    def getConnect(self) -> virConnect:
        return self._dom._conn

    def _tree(self) -> Any:
        return self._dom._obj().checkpoints

    def getXMLDesc(self, flags: int = 0) -> str:
        conn = self._dom._conn
        if flags & c.VIR_DOMAIN_CHECKPOINT_XML_SECURE and conn.read_only:
            raise E.secure_denied("virDomainCheckpointGetXMLDesc")

        async def go() -> str:
            tree = self._tree()
            return str(await tree.xml(self._dom._drv, self._name, flags))
        return conn._run(go())

    def getParent(self, flags: int = 0) -> virDomainCheckpoint:
        return virDomainCheckpoint(self._dom, self._dom._conn._call(
            lambda: self._tree().parent(self._name)))

    def listAllChildren(self, flags: int = 0) -> list[virDomainCheckpoint]:
        names = self._dom._conn._call(lambda: self._tree().names(flags, of=self._name))
        return [virDomainCheckpoint(self._dom, n) for n in names]

    def delete(self, flags: int = 0) -> int:
        conn = self._dom._conn
        conn._rw("virDomainCheckpointDelete")
        if flags & c.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN and \
                flags & c.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY:
            raise E.exclusive_flags("VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN",
                                    "VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY",
                                    "virDomainCheckpointDelete")

        async def go() -> None:
            await self._tree().delete(self._dom._drv, self._name, flags)
        conn._run(go())
        return 0


# ----- libvirt_qemu's monitor pass-through ----------------------------------------------------
def qemuMonitorCommand(domain: virDomain, cmd: str, flags: int = 0) -> str:
    """libvirt_qemu.qemuMonitorCommand: raw QMP JSON in and out, or HMP with flag 1."""
    domain._conn._rw("virDomainQemuMonitorCommand")

    async def go() -> str:
        dom = domain._obj()
        mon = domain._drv.require_active(dom)
        if flags & VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP:
            return await mon.hmp(cmd)
        msg = json.loads(cmd)
        try:
            ret = await mon.execute(msg["execute"], msg.get("arguments"))
        except Exception as e:
            err = getattr(e, "error", None)
            if err is not None:
                return json.dumps({"id": msg.get("id"), "error": {
                    "class": getattr(err, "class_", "GenericError"),
                    "desc": getattr(err, "desc", str(e))}})
            raise qmp_error(e) from None
        out: dict[str, Any] = {"return": ret}
        if "id" in msg:
            out["id"] = msg["id"]
        return json.dumps(out)
    return domain._run(go())


def open(uri: str | None = None) -> virConnect:  # noqa: A001 - libvirt.open
    return virConnect(uri or "virtsim:///embedded")


def openReadOnly(uri: str | None = None) -> virConnect:
    return virConnect(uri or "virtsim:///embedded", read_only=True)
