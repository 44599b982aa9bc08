"""Checkpoints, the libvirt 9.0 way: one persistent recording bitmap per disk, a
metadata tree (parent, children, the current checkpoint) kept by the API.

Bitmaps are created and removed over QMP in one ``transaction`` each (libvirt's
``qemuCheckpointCreateCommon`` / ``qemuCheckpointDiscardBitmaps``); everything else —
listing, parents, XML — is metadata.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

from . import constants as c
from . import errors as E
from .xml.checkpoint import (
    CheckpointDef,
    align_checkpoint_disks,
    format_checkpoint,
    parse_checkpoint,
)

if TYPE_CHECKING:
    from .driver import DomainObj, Driver
    from .monitor import Monitor


class CheckpointTree:
    """A domain's checkpoint metadata (virDomainMomentObjList)."""

    def __init__(self, dom: DomainObj) -> None:
        self.dom = dom
        self.defs: dict[str, CheckpointDef] = {}     # creation order
        self.current: str | None = None

    # ----- lookup ---------------------------------------------------------------------------
    def get(self, name: str) -> CheckpointDef:
        d = self.defs.get(name)
        if d is None:
            raise E.CHECKPOINT_NOT_FOUND(name)
        return d

    def children(self, name: str | None) -> list[str]:
        return [n for n, d in self.defs.items() if d.parent == name]

    def descendants(self, name: str) -> list[str]:
        out: list[str] = []
        todo = self.children(name)
        while todo:
            n = todo.pop(0)
            out.append(n)
            todo += self.children(n)
        return out

    def parent(self, name: str) -> str:
        d = self.get(name)
        if d.parent is None:
            raise E.CHECKPOINT_NO_PARENT(name)
        return d.parent

    # ----- listing -------------------------------------------------------------------------------
    def names(self, flags: int, of: str | None = None) -> list[str]:
        """virDomainListAllCheckpoints / ListAllChildren with libvirt's filter groups."""
        if of is None:
            names = list(self.defs)
            if flags & c.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS:
                names = [n for n in names if self.defs[n].parent is None]
        elif flags & c.VIR_DOMAIN_CHECKPOINT_LIST_DESCENDANTS:
            names = self.descendants(of)
        else:
            names = self.children(of)
        leaves = bool(flags & c.VIR_DOMAIN_CHECKPOINT_LIST_LEAVES)
        no_leaves = bool(flags & c.VIR_DOMAIN_CHECKPOINT_LIST_NO_LEAVES)
        if leaves != no_leaves:
            names = [n for n in names if (not self.children(n)) == leaves]
        if flags & c.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL:
            order = {n: i for i, n in enumerate(self._topological())}
            names.sort(key=lambda n: order[n])
        return names

    def _topological(self) -> list[str]:
        out: list[str] = []
        todo = [n for n, d in self.defs.items() if d.parent is None]
        while todo:
            n = todo.pop(0)
            out.append(n)
            todo = self.children(n) + todo
        return out

    # ----- XML ---------------------------------------------------------------------------------
    async def xml(self, drv: Driver, name: str, flags: int) -> str:
        d = self.get(name)
        if flags & c.VIR_DOMAIN_CHECKPOINT_XML_SIZE:
            mon = drv.require_active(self.dom)
            d = copy.copy(d)
            d.disks = [copy.copy(x) for x in d.disks]
            counts = await bitmap_counts(mon)
            for disk in d.disks:
                node = self.dom.disk_by_target(disk.name)
                if disk.checkpoint == "bitmap" and node is not None:
                    disk.size = counts.get((node.format_node, disk.bitmap or ""), 0)
        return format_checkpoint(d, secure=bool(flags & c.VIR_DOMAIN_CHECKPOINT_XML_SECURE),
                                 no_domain=bool(flags & c.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN),
                                 size=bool(flags & c.VIR_DOMAIN_CHECKPOINT_XML_SIZE))

    # ----- create ------------------------------------------------------------------------------
    def prepare(self, xml: str, flags: int) -> CheckpointDef:
        """Parse and align a new checkpoint (no QMP yet); the caller adds the bitmaps."""
        defn = parse_checkpoint(xml)
        if not self.dom.active:
            raise E.CHECKPOINT_CREATE_INACTIVE()
        assert defn.name is not None
        if defn.name in self.defs:
            raise E.CHECKPOINT_EXISTS(defn.name)
        align_checkpoint_disks(defn, self.dom.defn.disks)
        for disk in defn.disks:
            if disk.checkpoint != "bitmap":
                continue
            if disk.bitmap != defn.name:
                raise E.CHECKPOINT_BITMAP_NAME_MISMATCH(disk.name, defn.name)
            dd = next(x for x in self.dom.defn.disks if x.target == disk.name)
            if (dd.format or "raw") != "qcow2":
                raise E.CHECKPOINT_UNSUPPORTED_STORAGE(disk.name, dd.format or "raw")
        defn.parent = self.current
        defn.domain = copy.deepcopy(self.dom.defn)
        return defn

    def bitmap_actions(self, defn: CheckpointDef) -> list[dict[str, Any]]:
        out = []
        for disk in defn.disks:
            node = self.dom.disk_by_target(disk.name)
            if disk.checkpoint == "bitmap" and node is not None:
                out.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": node.format_node, "name": disk.bitmap,
                                     "persistent": True, "disabled": False}})
        return out

    def commit(self, defn: CheckpointDef) -> None:
        assert defn.name is not None
        self.defs[defn.name] = defn
        self.current = defn.name
        self.persist()

    def persist(self) -> None:
        """virtsim:///session: one metadata file per checkpoint (libvirt's
        checkpointDir/<vm>/<name>.xml, secure redefine form) and the current one."""
        sd = self.dom.statedir
        if sd is None:
            return
        _docs, _cur = sd.checkpoints(self.dom.name)
        cdir = os.path.join(sd.path, "checkpoints", self.dom.name)
        for f in os.listdir(cdir):
            if f.endswith(".xml") and f[:-4] not in self.defs:
                sd.remove_checkpoint(self.dom.name, f[:-4])
        for name, d in self.defs.items():
            sd.save_checkpoint(self.dom.name, name, format_checkpoint(d, secure=True))
        sd.save_current(self.dom.name, self.current)

    async def create(self, drv: Driver, xml: str, flags: int) -> str:
        if flags & c.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE:
            return await self.redefine(drv, xml, flags)
        defn = self.prepare(xml, flags)
        mon = drv.require_active(self.dom)
        actions = self.bitmap_actions(defn)
        quiesce = bool(flags & c.VIR_DOMAIN_CHECKPOINT_CREATE_QUIESCE)
        if quiesce:
            await freeze(drv, self.dom)
        try:
            if actions:
                await _transaction(mon, actions)
        finally:
            if quiesce:
                await thaw(drv, self.dom)
        self.commit(defn)
        assert defn.name is not None
        return defn.name

    async def redefine(self, drv: Driver, xml: str, flags: int) -> str:
        defn = parse_checkpoint(xml, redefine=True)
        assert defn.name is not None
        if defn.domain is not None and defn.domain.uuid and self.dom.defn.uuid and \
                defn.domain.uuid.replace("-", "") != self.dom.defn.uuid.replace("-", ""):
            raise E.CHECKPOINT_REDEFINE_UUID(defn.name, self.dom.defn.uuid)
        if defn.domain is None:
            defn.domain = copy.deepcopy(self.dom.defn)
        if flags & c.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE:
            mon = drv.require_active(self.dom)
            infos = await bitmap_infos(mon)
            for disk in defn.disks:
                if disk.checkpoint != "bitmap":
                    continue
                node = self.dom.disk_by_target(disk.name)
                if node is None:
                    continue
                info = infos.get((node.format_node, disk.bitmap or defn.name))
                if not _bitmap_valid(info):
                    raise E.BACKUP_BROKEN_BITMAP(disk.bitmap or defn.name, disk.name)
        old = self.defs.get(defn.name)
        self.defs[defn.name] = defn
        if old is None and (self.current is None or defn.parent == self.current):
            self.current = defn.name
        self.persist()
        return defn.name

    # ----- delete ------------------------------------------------------------------------------
    async def delete(self, drv: Driver, name: str, flags: int) -> None:
        self.get(name)
        metadata_only = bool(flags & c.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        doomed: list[str] = []
        if flags & (c.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN
                    | c.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY):
            doomed = self.descendants(name)
        if not flags & c.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY:
            doomed.append(name)
        if not metadata_only:
            if not self.dom.active:
                raise E.CHECKPOINT_DELETE_INACTIVE()
            mon = drv.require_active(self.dom)
            infos = await bitmap_infos(mon)
            actions = []
            for n in doomed:
                for disk in self.defs[n].disks:
                    if disk.checkpoint != "bitmap":
                        continue
                    if not disk.bitmap:
                        raise E.CHECKPOINT_MISSING_BITMAP_NAME(disk.name, n)
                    node = self.dom.disk_by_target(disk.name)
                    if node is None:
                        continue
                    if (node.format_node, disk.bitmap) not in infos:
                        raise E.CHECKPOINT_BITMAP_NOT_IN_CHAIN(disk.bitmap, node.path)
                    actions.append({"type": "block-dirty-bitmap-remove",
                                    "data": {"node": node.format_node, "name": disk.bitmap}})
            if actions:
                await _transaction(mon, actions)
        for n in reversed(doomed):
            d = self.defs.pop(n)
            for child in self.children(n):
                self.defs[child].parent = d.parent
            if self.current == n:
                self.current = d.parent if d.parent in self.defs else None
        if flags & c.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY and self.current is None:
            self.current = name
        self.persist()


async def _transaction(mon: Monitor, actions: list[dict[str, Any]]) -> None:
    from .errors_qmp import qmp_error

    try:
        await mon.execute("transaction", {"actions": actions})
    except Exception as e:  # a QMP error becomes libvirt's internal error with QEMU's text
        raise qmp_error(e) from None


async def bitmap_infos(mon: Monitor) -> dict[tuple[str, str], dict[str, Any]]:
    """(node-name, bitmap name) -> QEMU's BlockDirtyInfo, from query-named-block-nodes."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for node in await mon.execute("query-named-block-nodes", {"flat": True}):
        for bm in node.get("dirty-bitmaps", []):
            if "name" in bm:
                out[(node["node-name"], bm["name"])] = bm
    return out


async def bitmap_counts(mon: Monitor) -> dict[tuple[str, str], int]:
    return {k: int(v.get("count", 0)) for k, v in (await bitmap_infos(mon)).items()}


def _bitmap_valid(info: dict[str, Any] | None) -> bool:
    """qemuBlockBitmapChainIsValid for one layer: present, recording, persistent, sane."""
    return bool(info and info.get("recording") and info.get("persistent")
                and not info.get("inconsistent"))


async def freeze(drv: Driver, dom: DomainObj) -> None:
    """QUIESCE: freeze guest filesystems through the guest agent (see agent.py)."""
    from .agent import fs_freeze

    await fs_freeze(drv, dom)


async def thaw(drv: Driver, dom: DomainObj) -> None:
    """After the QUIESCE'd transaction; a thaw error never hides the transaction's."""
    from .agent import quiesce_thaw

    await quiesce_thaw(drv, dom)
