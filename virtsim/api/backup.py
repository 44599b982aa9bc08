"""Backup jobs as libvirt 9.0's qemu driver runs them (``qemu_backup.c``), over QMP.

``begin`` plans the stores (a push target or a pull scratch per disk), creates them with
``blockdev-create`` like libvirt, starts the NBD server for pull, and issues one
``transaction`` holding the checkpoint bitmaps, the incremental bitmap merges and one
``blockdev-backup`` per disk.  Completion comes from QEMU's job events: each concluded disk
job is queried and dismissed; when no disk is left running the job terminates with
libvirt's status rules (an aborted pull ends COMPLETED, an aborted push CANCELLED), the
stores are removed (scratch always, a push target unless it completed), and
JOB_COMPLETED is emitted.

Beyond libvirt, every job has an id and an optional name, and several jobs may run on
disjoint disks of one domain (``backupBeginJob``/``backupEnd``); the libvirt-shaped calls
keep libvirt's one-job rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import constants as c
from . import errors as E
from .checkpoints import bitmap_infos, freeze, thaw
from .errors_qmp import qmp_error
from .launch import DiskNodes
from .xml.backup import (
    BackupDef,
    align_backup_disks,
    fill_driver_defaults,
    format_backup,
    parse_backup,
)

if TYPE_CHECKING:
    from .driver import DomainObj, Driver
    from .monitor import Monitor

# virtsim's extensions (high bits, so they never collide with libvirt's flags)
VIRTSIM_BACKUP_BEGIN_NO_METADATA = 1 << 16
VIRTSIM_BACKUP_BEGIN_QUIESCE = 1 << 17
VIRTSIM_BACKUP_END_ABORT = 1 << 0
VIRTSIM_BACKUP_LIST_PUSH = 1 << 0
VIRTSIM_BACKUP_LIST_PULL = 1 << 1
VIRTSIM_BACKUP_LIST_ACTIVE = 1 << 2
VIRTSIM_BACKUP_LIST_FINISHED = 1 << 3

#: qemuAliasTLSObjFromSrcAlias("libvirt_backup")
TLS_ALIAS = "objlibvirt_backup_tls0"
#: libvirt's default_tls_x509_cert_dir, which backup_tls_x509_cert_dir defaults to
DEFAULT_TLS_DIR = "/etc/pki/qemu"

_BEGIN_FLAGS = (c.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL | VIRTSIM_BACKUP_BEGIN_NO_METADATA
                | VIRTSIM_BACKUP_BEGIN_QUIESCE)


@dataclass
class DiskJob:
    target: str
    node: DiskNodes
    mode: str                       # full | incremental
    store_path: str
    store_fmt: str
    store_index: int
    job_id: str
    bitmap: str | None = None       # temporary merged bitmap (push: on the disk; pull: scratch)
    created_file: bool = False
    state: str = "running"          # running | cancelling | complete | failed | cancelled
    current: int = 0
    total: int = 0
    error: str | None = None

    @property
    def storage(self) -> str:
        return f"libvirt-{self.store_index}-storage"

    @property
    def format_node(self) -> str:
        return f"libvirt-{self.store_index}-format"


@dataclass
class BackupJob:
    drv: Driver
    dom: DomainObj
    id: int
    defn: BackupDef
    name: str | None = None
    libvirt_shaped: bool = True
    disks: list[DiskJob] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    status: int = c.VIR_DOMAIN_JOB_UNBOUNDED
    errmsg: str | None = None
    reuse_external: bool = False
    aborted: bool = False
    nbd_started: bool = False
    tls_object: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stats_final: dict[str, Any] | None = None
    #: the emulator is going away: no more QMP from this job (the monitor is closed by
    #: the driver, which owns it)
    gone: bool = False

    @property
    def push(self) -> bool:
        return self.defn.mode == "push"

    @property
    def mon(self) -> Monitor:
        assert self.dom.monitor is not None
        return self.dom.monitor

    # ----- stats -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The typed parameters of virDomainGetJobStats / JOB_COMPLETED (qemu_domainjob.c)."""
        end = self.finished or time.monotonic()
        out: dict[str, Any] = {c.VIR_DOMAIN_JOB_OPERATION: c.VIR_DOMAIN_JOB_OPERATION_BACKUP,
                               c.VIR_DOMAIN_JOB_TIME_ELAPSED: int((end - self.started) * 1000)}
        total = sum(d.total for d in self.disks)
        cur = sum(d.current for d in self.disks)
        if self.push:
            if total or cur:
                out[c.VIR_DOMAIN_JOB_DISK_TOTAL] = total
                out[c.VIR_DOMAIN_JOB_DISK_PROCESSED] = cur
                out[c.VIR_DOMAIN_JOB_DISK_REMAINING] = total - cur
        elif total or cur:
            out[c.VIR_DOMAIN_JOB_DISK_TEMP_USED] = cur
            out[c.VIR_DOMAIN_JOB_DISK_TEMP_TOTAL] = total
        if self.finished is not None:
            out[c.VIR_DOMAIN_JOB_SUCCESS] = self.status == c.VIR_DOMAIN_JOB_COMPLETED
            if self.errmsg:
                out[c.VIR_DOMAIN_JOB_ERRMSG] = self.errmsg
        return out

    async def refresh(self) -> None:
        """Live progress from query-jobs (libvirt does this for GetJobStats)."""
        if self.finished is not None or self.gone or self.dom.monitor is None:
            return
        with contextlib.suppress(Exception):
            jobs = {j["id"]: j for j in await self.mon.execute("query-jobs")}
            for d in self.disks:
                j = jobs.get(d.job_id)
                if j is not None and d.state in ("running", "cancelling"):
                    d.current = int(j.get("current-progress", 0))
                    d.total = int(j.get("total-progress", 0))

    def xml(self) -> str:
        return format_backup(self.defn)

    # ----- events ------------------------------------------------------------------------
    async def on_event(self, ev: dict[str, Any]) -> None:
        if ev.get("event") != "JOB_STATUS_CHANGE":
            return
        data = ev.get("data", {})
        if data.get("status") != "concluded":
            return
        disk = next((d for d in self.disks if d.job_id == data.get("id")), None)
        if disk is None or disk.state not in ("running", "cancelling"):
            return
        await self._concluded(disk)

    async def _concluded(self, disk: DiskJob) -> None:
        """qemuBlockJobEventProcessConcluded + qemuBackupNotifyBlockjobEnd."""
        info: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            for j in await self.mon.execute("query-jobs"):
                if j["id"] == disk.job_id:
                    info = j
        disk.current = int(info.get("current-progress", disk.current))
        disk.total = int(info.get("total-progress", disk.total))
        err = info.get("error")
        with contextlib.suppress(Exception):
            await self.mon.execute("job-dismiss", {"id": disk.job_id})
        if disk.state == "cancelling":
            disk.state = "cancelled"
        elif err:
            disk.state = "failed"
        else:
            disk.state = "complete"
        if err and self.errmsg is None:
            self.errmsg = str(err)
        await self._after_disk_end()

    async def _after_disk_end(self) -> None:
        if not self.push and self.nbd_started:
            self.nbd_started = False
            await self._stop_nbd()
        running = [d for d in self.disks if d.state == "running"]
        bad = [d for d in self.disks if d.state in ("failed", "cancelled")]
        if running and bad:
            for d in running:
                await self._cancel_disk(d)
            return
        if any(d.state in ("running", "cancelling") for d in self.disks):
            return
        if any(d.state == "failed" for d in self.disks):
            status = c.VIR_DOMAIN_JOB_FAILED
        elif any(d.state == "cancelled" for d in self.disks) and self.push:
            status = c.VIR_DOMAIN_JOB_CANCELLED
        else:
            status = c.VIR_DOMAIN_JOB_COMPLETED
        await self._terminate(status)

    async def _cancel_disk(self, d: DiskJob) -> None:
        d.state = "cancelling"
        try:
            await self.mon.execute("block-job-cancel", {"device": d.job_id, "force": True})
        except Exception:
            d.state = "cancelled"

    async def abort(self) -> None:
        """virDomainAbortJob on a backup: cancel every running disk job (asynchronous)."""
        self.aborted = True
        running = [d for d in self.disks if d.state == "running"]
        for d in running:
            await self._cancel_disk(d)
        if not any(d.state == "cancelling" for d in self.disks):
            if self.finished is None:
                await self._terminate(c.VIR_DOMAIN_JOB_CANCELLED)

    async def _stop_nbd(self) -> None:
        if self.gone or self.dom.monitor is None:
            return
        others = [j for j in self.dom.backups.values()
                  if j is not self and not j.push and j.nbd_started]
        if others:
            # the server stays for the other pull jobs: only this job's exports go (an
            # export keeps its scratch node in use, so blockdev-del would fail)
            await _del_exports(self.mon, [f"libvirt-nbd-{d.format_node}" for d in self.disks])
            return
        with contextlib.suppress(Exception):
            await self.mon.execute("nbd-server-stop")
        await _drop_tls(self)

    async def _terminate(self, status: int) -> None:
        """qemuBackupJobTerminate: clean up, record the completed job, emit the event."""
        if self.finished is not None:
            return
        for d in self.disks:
            if not self.gone and self.dom.monitor is not None:
                for node in (d.format_node, d.storage):
                    with contextlib.suppress(Exception):
                        await self.mon.execute("blockdev-del", {"node-name": node})
                if self.push and d.bitmap:
                    with contextlib.suppress(Exception):
                        await self.mon.execute("block-dirty-bitmap-remove",
                                               {"node": d.node.format_node, "name": d.bitmap})
            remove = d.created_file and (not self.push or status != c.VIR_DOMAIN_JOB_COMPLETED)
            if remove:
                with contextlib.suppress(OSError):
                    os.unlink(d.store_path)
        self.status = status
        self.finished = time.monotonic()
        self.stats_final = {"type": status, **self.stats()}
        if self.libvirt_shaped:
            self.dom.completed_job = self.stats_final
        self.done.set()
        self.drv.emit(self.dom, c.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self.stats())
        if self.libvirt_shaped:
            self.dom.backups.pop(self.id, None)

    async def domain_stopped(self) -> None:
        """The emulator went away under the job (destroy): libvirt 9.0 ends the backup as
        CANCELLED, success false, no errmsg, and counts nothing for disk jobs that never
        concluded (observed with real libvirt)."""
        for d in self.disks:
            if d.state in ("running", "cancelling"):
                d.state = "cancelled"
                d.current = d.total = 0
        self.gone = True
        await self._terminate(c.VIR_DOMAIN_JOB_CANCELLED)


# ---------------------------------------------------------------------------------------------
# begin
# ---------------------------------------------------------------------------------------------
async def begin(drv: Driver, dom: DomainObj, backup_xml: str, checkpoint_xml: str | None,
                flags: int, *, libvirt_shaped: bool = True, name: str | None = None) -> BackupJob:
    if flags & ~_BEGIN_FLAGS:
        raise E.unsupported_flags(flags & ~_BEGIN_FLAGS, "qemuBackupBegin")
    defn = parse_backup(backup_xml)
    if not dom.active or dom.monitor is None:
        raise E.BACKUP_INACTIVE()
    assert dom.checkpoints is not None
    chk = dom.checkpoints.prepare(checkpoint_xml, 0) if checkpoint_xml else None
    suffix = chk.name if chk is not None and chk.name else str(int(time.time()))
    align_backup_disks(defn, dom.defn.disks, suffix)
    if libvirt_shaped:
        await _acquire_job_lock(dom)
    busy = {d.target for j in dom.backups.values() if j.finished is None for d in j.disks}
    chosen = [d for d in defn.disks if d.backup]
    for d in chosen:
        if d.name in busy:
            raise E.BACKUP_ALREADY_RUNNING()
    if defn.mode == "pull":
        srv = defn.server
        if srv is None or srv.transport == "tcp" and srv.port is None:
            raise E.BACKUP_TCP_PORT_REQUIRED()
    if not chosen:
        raise E.BACKUP_NO_DISKS_SELECTED()
    fill_driver_defaults(defn)
    if defn.mode == "pull":
        for d in chosen:
            if d.store is not None and d.store.format != "qcow2":
                raise E.BACKUP_PULL_REQUIRES_QCOW2(d.name)
    mon = dom.monitor
    job_id = max(dom.backups, default=0) + 1
    job = BackupJob(drv, dom, job_id, defn, name=name, libvirt_shaped=libvirt_shaped,
                    reuse_external=bool(flags & c.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL))
    actions: list[dict[str, Any]] = []
    if chk is not None:
        actions += dom.checkpoints.bitmap_actions(chk)
    infos = await bitmap_infos(mon)
    nodes = {n["node-name"]: n for n in await mon.execute("query-named-block-nodes",
                                                          {"flat": True})}
    try:
        for d in chosen:
            node = dom.disk_by_target(d.name)
            if node is None or d.store is None or d.store.path is None:
                raise E.BACKUP_NO_DISK_NAMED(d.name)
            if d.backupmode == "incremental":
                assert d.incremental is not None
                if d.incremental not in dom.checkpoints.defs:
                    raise E.BACKUP_CHECKPOINT_NOT_FOUND(d.incremental, d.name)
                info = infos.get((node.format_node, d.incremental))
                if not (info and info.get("recording") and info.get("persistent")
                        and not info.get("inconsistent")):
                    raise E.BACKUP_BROKEN_BITMAP(d.incremental, d.name)
            if not job.reuse_external and os.path.exists(d.store.path):
                raise E.BACKUP_STORE_EXISTS(d.store.path, d.name)
            d.index = dom.next_index()
            dj = DiskJob(target=d.name, node=node, mode=d.backupmode or "full",
                         store_path=d.store.path, store_fmt=d.store.format or "qcow2",
                         store_index=d.index, job_id=f"backup-{d.name}-{node.format_node}")
            job.disks.append(dj)
            size = int(nodes.get(node.format_node, {}).get("image", {}).get("virtual-size", 0))
            backing = job.push is False or dj.mode == "incremental"
            await _create_store(mon, job, dj, size, backing)
            if dj.mode == "incremental":
                gran = int(infos[(node.format_node, d.incremental or "")].get("granularity",
                                                                              65536))
                where = node.format_node if job.push else dj.format_node
                dj.bitmap = (d.exportbitmap if not job.push and d.exportbitmap
                             else f"backup-{d.name}")
                actions.append({"type": "block-dirty-bitmap-add",
                                "data": {"node": where, "name": dj.bitmap,
                                         "persistent": False, "disabled": True,
                                         "granularity": gran}})
                actions.append({"type": "block-dirty-bitmap-merge",
                                "data": {"node": where, "target": dj.bitmap,
                                         "bitmaps": [{"node": node.format_node,
                                                      "name": d.incremental}]}})
            data: dict[str, Any] = {"device": node.format_node, "job-id": dj.job_id,
                                    "target": dj.format_node}
            if not job.push:
                data["sync"] = "none"
            elif dj.mode == "incremental":
                data["sync"] = "incremental"
                data["bitmap"] = dj.bitmap
            else:
                data["sync"] = "full"
            data["auto-finalize"] = True
            data["auto-dismiss"] = False
            actions.append({"type": "blockdev-backup", "data": data})
        if not job.push:
            await _start_nbd(dom, job)
        quiesce = bool(flags & VIRTSIM_BACKUP_BEGIN_QUIESCE)
        if quiesce:
            await freeze(drv, dom)
        try:
            await mon.execute("transaction", {"actions": actions})
        except Exception as e:
            if quiesce:
                await thaw(drv, dom)
            raise qmp_error(e, "transaction") from None
    except BaseException:
        await _rollback(job)
        raise
    if chk is not None and not flags & VIRTSIM_BACKUP_BEGIN_NO_METADATA:
        dom.checkpoints.commit(chk)
    dom.backups[job.id] = job
    if quiesce:  # thawed once the job is registered: its events may arrive meanwhile
        await thaw(drv, dom)
    if not job.push:
        for dj, d in zip(job.disks, chosen, strict=True):
            args: dict[str, Any] = {"type": "nbd", "id": f"libvirt-nbd-{dj.format_node}",
                                    "node-name": dj.format_node, "writable": False,
                                    "name": d.exportname or d.name}
            if dj.bitmap:
                args["bitmaps"] = [dj.bitmap]
            try:
                await mon.execute("block-export-add", args)
            except Exception as e:
                await job.abort()
                raise qmp_error(e, "block-export-add") from None
    return job


#: how long libvirt waits for the domain's async job before giving up (VIR_JOB_WAIT_TIME)
JOB_LOCK_WAIT = 30.0


async def _acquire_job_lock(dom: DomainObj) -> None:
    """libvirt's one async job per domain: a second backupBegin waits for the running
    backup to end, for 30 s, then fails with the lock timeout.  virtsim waits only where
    the job will end by itself (a push, or any job being aborted); a pull that nobody
    ends, or an id-based job, gets the same error at once instead of after 30 s."""
    for job in list(dom.backups.values()):
        if job.finished is not None:
            continue
        if job.libvirt_shaped and (job.push or job.aborted):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), JOB_LOCK_WAIT)
        if job.finished is None:
            raise E.STATE_LOCK_TIMEOUT_MONITOR("remoteDispatchDomainBackupBegin")


async def _create_store(mon: Monitor, job: BackupJob, dj: DiskJob, size: int,
                        backing: bool) -> None:
    """qemuBlockStorageSourceCreate: file, blockdev-add storage, blockdev-create, format."""
    if not job.reuse_external:
        fd = os.open(dj.store_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        dj.created_file = True
    try:
        await mon.execute("blockdev-add", {"driver": "file", "filename": dj.store_path,
                                           "node-name": dj.storage, "auto-read-only": True,
                                           "discard": "unmap"})
        if not job.reuse_external:
            if dj.store_fmt == "qcow2":
                opts: dict[str, Any] = {"driver": "qcow2", "file": dj.storage, "size": size,
                                        "cluster-size": 65536}
                if backing:
                    opts["backing-file"] = dj.node.path
                    opts["backing-fmt"] = dj.node.fmt
                await _run_create(mon, f"create-{dj.format_node}", opts)
            else:
                os.truncate(dj.store_path, size)
        fmt: dict[str, Any] = {"node-name": dj.format_node, "read-only": False,
                               "driver": dj.store_fmt, "file": dj.storage}
        if dj.store_fmt == "qcow2":
            fmt["backing"] = dj.node.format_node if backing else None
        await mon.execute("blockdev-add", fmt)
    except E.libvirtError:
        raise
    except Exception as e:
        raise qmp_error(e) from None


async def _run_create(mon: Monitor, job_id: str, opts: dict[str, Any]) -> None:
    """blockdev-create as a job: wait for it to conclude, read its error, dismiss it."""
    done = asyncio.Event()

    async def watch(ev: dict[str, Any]) -> None:
        if ev.get("event") == "JOB_STATUS_CHANGE" and ev["data"].get("id") == job_id \
                and ev["data"].get("status") == "concluded":
            done.set()

    mon.subscribers.append(watch)
    try:
        await mon.execute("blockdev-create", {"job-id": job_id, "options": opts})
        await asyncio.wait_for(done.wait(), 60)
        err = None
        for j in await mon.execute("query-jobs"):
            if j["id"] == job_id:
                err = j.get("error")
        await mon.execute("job-dismiss", {"id": job_id})
        if err:
            raise E.make_error(c.VIR_ERR_OPERATION_FAILED, c.VIR_FROM_QEMU,
                               f"failed to create image: {err}")
    finally:
        mon.subscribers.remove(watch)


async def _del_exports(mon: Monitor, ids: list[str]) -> None:
    """block-export-del (hard: clients are cut off) and wait until QEMU has let go.

    Polls query-block-exports rather than waiting for BLOCK_EXPORT_DELETED: this runs
    inside the monitor's event delivery, which cannot deliver the next event meanwhile."""
    with contextlib.suppress(Exception):
        for eid in ids:
            with contextlib.suppress(Exception):
                await mon.execute("block-export-del", {"id": eid, "mode": "hard"})
        for _ in range(400):
            live = {e["id"] for e in await mon.execute("query-block-exports")}
            if not live & set(ids):
                return
            await asyncio.sleep(0.005)


def _server_key(defn: BackupDef) -> tuple[object, ...]:
    srv = defn.server
    if srv is None:
        return ()
    if srv.transport == "unix":
        return ("unix", srv.socket)
    return ("tcp", srv.name or "localhost", srv.port, bool(defn.tls))


async def _start_nbd(dom: DomainObj, job: BackupJob) -> None:
    srv = job.defn.server
    assert srv is not None
    running = [j for j in dom.backups.values() if not j.push and j.nbd_started]
    if running:
        # QEMU has one NBD server: concurrent pull jobs (virtsim's id-based model) share it,
        # so they must ask for the same one
        other = running[0].defn.server
        if other is not None and _server_key(running[0].defn) != _server_key(job.defn):
            where = other.socket if other.transport == "unix" else f"{other.name}:{other.port}"
            raise E.make_error(c.VIR_ERR_OPERATION_INVALID, c.VIR_FROM_QEMU,
                               f"the NBD server of backup job {running[0].id} is already "
                               f"running at {where}: concurrent pull backups must use the "
                               f"same <server>")
        job.nbd_started = True
        return
    if srv.transport == "unix":
        addr = {"type": "unix", "data": {"path": srv.socket}}
    else:
        addr = {"type": "inet", "data": {"host": srv.name or "localhost",
                                         "port": str(srv.port)}}
    args: dict[str, Any] = {"addr": addr}
    if job.defn.tls:
        # libvirt: x509 credentials from backup_tls_x509_cert_dir (qemu.conf; here the
        # URI's tls_x509_cert_dir, defaulting like libvirt to /etc/pki/qemu), verified
        # clients, and the object gone again when the server stops
        try:
            await job.mon.execute("object-add", {
                "qom-type": "tls-creds-x509", "id": TLS_ALIAS, "endpoint": "server",
                "dir": job.drv.config.tls_x509_cert_dir or DEFAULT_TLS_DIR,
                "verify-peer": job.drv.config.tls_x509_verify})
        except Exception as e:
            raise qmp_error(e, "object-add") from None
        job.tls_object = True
        args["tls-creds"] = TLS_ALIAS
    try:
        await job.mon.execute("nbd-server-start", args)
    except Exception as e:
        await _drop_tls(job)
        raise qmp_error(e, "nbd-server-start") from None
    job.nbd_started = True


async def _drop_tls(job: BackupJob) -> None:
    if job.tls_object and job.dom.monitor is not None:
        job.tls_object = False
        with contextlib.suppress(Exception):
            await job.dom.monitor.execute("object-del", {"id": TLS_ALIAS})


async def _rollback(job: BackupJob) -> None:
    """A failed begin leaves nothing behind: nodes, NBD server and files go."""
    mon = job.dom.monitor
    for d in job.disks:
        if mon is not None:
            for node in (d.format_node, d.storage):
                with contextlib.suppress(Exception):
                    await mon.execute("blockdev-del", {"node-name": node})
        if d.created_file:
            with contextlib.suppress(OSError):
                os.unlink(d.store_path)
    if job.nbd_started and mon is not None:
        others = [j for j in job.dom.backups.values()
                  if j is not job and not j.push and j.nbd_started]
        if others:
            await _del_exports(mon, [f"libvirt-nbd-{d.format_node}" for d in job.disks])
        else:
            with contextlib.suppress(Exception):
                await mon.execute("nbd-server-stop")
        job.nbd_started = False
    await _drop_tls(job)


def active_job(dom: DomainObj) -> BackupJob | None:
    """The domain's libvirt-shaped backup job, if one runs: what backupGetXMLDesc,
    abortJob and jobStats see.  Id-based jobs are reached through their ids only."""
    for j in dom.backups.values():
        if j.finished is None and j.libvirt_shaped:
            return j
    return None
