"""`<domainbackup>`: parse, libvirt's defaults, and the output of backupGetXMLDesc.

Facts from libvirt 9.0 (backup_conf.c, qemu_backup.c) and the reference transcripts:
- Input is RNG-validated (domainbackup.rng); mode defaults to push; <server> only in pull mode.
- Defaults come in two steps, both exposed here for the backup code:
  1. `align_backup_disks` (virDomainBackupAlignDisks): one entry per domain disk in domain order;
     with no <disks> every writable disk with media is backed up, otherwise unlisted disks get
     backup='no'; a missing target/scratch path becomes "<disk source>.<suffix>" (suffix: the
     checkpoint name when one is created with the backup, else the Unix time); backupmode becomes
     incremental when the backup or the disk names a checkpoint, else full; incremental disks
     inherit the top-level checkpoint name.
  2. `fill_driver_defaults` (the qemu driver, seen in backup-dumpxml): store format qcow2; in pull
     mode exportname = disk target and, for incremental disks, exportbitmap = "backup-<target>".
- Output order: <incremental>, <server transport tls name port socket>, <disks>; disk attributes
  name backup [state] type backupmode incremental exportname exportbitmap index, then <driver>
  and <target>/<scratch>. `index` (the store's node index) is printed by libvirt 9.0 although its
  own domainbackup.rng does not allow it; `state` and <privateData> only in the internal form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lxml import etree

from virtsim.api import constants as c
from virtsim.api import errors
from virtsim.api.xml.domain import DomainDisk
from virtsim.api.xml.safe import parse_document, text_of
from virtsim.api.xml.writer import Attrs, XMLWriter

BackupMode = Literal["push", "pull"]
DiskBackupMode = Literal["full", "incremental"]


@dataclass
class BackupServer:
    """Where a pull backup's NBD server listens (virStorageNetHostDef)."""

    transport: str = "tcp"  # tcp | unix (rdma is parsed and refused)
    name: str | None = None
    port: int | None = None
    socket: str | None = None


@dataclass
class BackupStore:
    """A push target or a pull scratch image."""

    type: str = "file"  # file | block
    path: str | None = None
    format: str | None = None  # <driver type=...>
    extra: list[etree._Element] = field(default_factory=list, repr=False, compare=False)
    """Children kept verbatim (seclabel, encryption): not simulated, printed back."""


@dataclass
class BackupDisk:
    name: str
    backup: bool = True
    backupmode: DiskBackupMode | None = None
    incremental: str | None = None
    exportname: str | None = None
    exportbitmap: str | None = None
    store: BackupStore | None = None
    state: str | None = None  # internal form only: running|complete|failed|cancelling|cancelled
    index: int | None = None  # libvirt's storage source id of the store


@dataclass
class BackupDef:
    mode: BackupMode = "push"
    incremental: str | None = None
    server: BackupServer | None = None
    tls: bool | None = None
    disks: list[BackupDisk] = field(default_factory=list)
    tls_alias: str | None = None  # internal form only
    tls_secret_alias: str | None = None  # internal form only


def parse_backup(xml: str | bytes, *, internal: bool = False) -> BackupDef:
    """virDomainBackupDefParseString; `internal` parses the status form (no RNG, state/index)."""
    doc = parse_document(
        xml,
        url="(domain_backup)",
        root="domainbackup",
        err_domain=c.VIR_FROM_DOMAIN,
        schema=None if internal else "domainbackup.rng",
    )
    defn = BackupDef()
    mode = doc.get("mode")
    if mode is not None:
        if mode not in ("push", "pull"):
            raise errors.BACKUP_UNKNOWN_MODE(mode)
        defn.mode = "pull" if mode == "pull" else "push"
    defn.incremental = text_of(doc.find("incremental"))
    server_el = doc.find("server")
    if server_el is not None:
        if defn.mode != "pull":
            raise errors.BACKUP_SERVER_NEEDS_PULL()
        defn.server = _parse_server(server_el)
        defn.tls = _yes_no(server_el.get("tls"))
    for disk_el in doc.findall("disks/*"):
        defn.disks.append(_parse_disk(disk_el, defn.mode == "push", internal))
    if internal:
        secret = doc.find("privateData/objects/secret[@type='tlskey']")
        defn.tls_secret_alias = secret.get("alias") if secret is not None else None
        tls = doc.find("privateData/objects/TLSx509")
        defn.tls_alias = tls.get("alias") if tls is not None else None
    return defn


def _yes_no(value: str | None) -> bool | None:
    return None if value is None else value == "yes"


def _parse_server(el: etree._Element) -> BackupServer:
    server = BackupServer(
        transport=el.get("transport", "tcp"), name=el.get("name"), socket=el.get("socket")
    )
    port = el.get("port")
    if port:
        server.port = int(port)
    if server.transport == "rdma":
        raise errors.BACKUP_RDMA_UNSUPPORTED()
    if server.transport == "unix" and not (server.socket or "").startswith("/"):
        raise errors.BACKUP_SOCKET_NOT_ABSOLUTE(server.socket or "")
    return server


def _parse_disk(el: etree._Element, push: bool, internal: bool) -> BackupDisk:
    name = el.get("name")
    if name is None:
        raise errors.BACKUP_DISK_MISSING_NAME()
    disk = BackupDisk(name=name, backup=el.get("backup", "yes") != "no")
    if not disk.backup:
        return disk
    if not push:
        disk.exportname = el.get("exportname")
        disk.exportbitmap = el.get("exportbitmap")
    mode = el.get("backupmode")
    if mode in ("full", "incremental"):
        disk.backupmode = "full" if mode == "full" else "incremental"
    disk.incremental = el.get("incremental")
    if internal:
        disk.state = el.get("state")
        index = el.get("index")
        disk.index = int(index) if index else None
    store_type = el.get("type", "file")
    if store_type not in ("file", "block"):
        raise errors.BACKUP_DISK_UNSUPPORTED_TYPE(store_type)
    driver = el.find("driver")
    store = BackupStore(type=store_type, format=driver.get("type") if driver is not None else None)
    src = el.find("target" if push else "scratch")
    if src is not None:
        store.path = src.get("dev" if store_type == "block" else "file")
        store.extra = [child for child in src if isinstance(child.tag, str)]
    disk.store = store
    return disk


def align_backup_disks(defn: BackupDef, disks: list[DomainDisk], suffix: str) -> None:
    """virDomainBackupAlignDisks (see the module docstring); raises libvirt's errors."""
    if not disks:
        raise errors.BACKUP_NO_DISKS()
    by_target = {d.target: d for d in disks}
    seen: set[str] = set()
    for req in defn.disks:
        dom = by_target.get(req.name)
        if dom is None:
            raise errors.BACKUP_NO_DISK_NAMED(req.name)
        if req.name in seen:
            raise errors.BACKUP_DISK_TWICE(req.name)
        seen.add(req.name)
        if req.backupmode == "incremental" and not req.incremental and not defn.incremental:
            raise errors.BACKUP_INCREMENTAL_NEEDS_CHECKPOINT(req.name)
        if req.backup:
            _assign_store(req, dom, suffix, explicit=True)
    backup_all = not defn.disks
    aligned = {d.name: d for d in defn.disks}
    result: list[BackupDisk] = list(defn.disks)
    for dom in disks:
        if dom.target in aligned:
            continue
        extra = BackupDisk(name=dom.target, backup=False)
        if backup_all and not dom.is_empty and not dom.readonly:
            extra.backup = True
            _assign_store(extra, dom, suffix, explicit=False)
        result.append(extra)
    for disk in result:
        if not disk.backup:
            continue
        if disk.backupmode is None:
            disk.backupmode = "incremental" if (defn.incremental or disk.incremental) else "full"
        if disk.incremental is None and disk.backupmode == "incremental":
            disk.incremental = defn.incremental
    defn.disks = result


def _assign_store(disk: BackupDisk, dom: DomainDisk, suffix: str, *, explicit: bool) -> None:
    if dom.is_empty:
        if explicit:
            raise errors.BACKUP_DISK_NO_MEDIA(disk.name)
        return
    if disk.store is None:
        disk.store = BackupStore()
    if disk.store.path is None:
        if dom.type != "file" or dom.source is None:
            raise errors.BACKUP_CANNOT_NAME_STORE(disk.name)
        disk.store.type = "file"
        disk.store.path = f"{dom.source}.{suffix}"


def fill_driver_defaults(defn: BackupDef) -> None:
    """The qemu driver's own defaults, visible in backupGetXMLDesc (see the module docstring)."""
    for disk in defn.disks:
        if not disk.backup or disk.store is None:
            continue
        if disk.store.format is None:
            disk.store.format = "qcow2"
        if defn.mode == "pull":
            if disk.exportname is None:
                disk.exportname = disk.name
            if disk.exportbitmap is None and disk.backupmode == "incremental":
                disk.exportbitmap = f"backup-{disk.name}"


def format_backup(defn: BackupDef, *, internal: bool = False) -> str:
    """virDomainBackupDefFormat: public form for backupGetXMLDesc, or the internal status form."""
    w = XMLWriter()
    w.open("domainbackup", [("mode", defn.mode)])
    w.text("incremental", defn.incremental)
    if defn.server is not None:
        s = defn.server
        tls = None if defn.tls is None else ("yes" if defn.tls else "no")
        w.empty(
            "server",
            [
                ("transport", s.transport),
                ("tls", tls),
                ("name", s.name),
                ("port", s.port or None),
                ("socket", s.socket),
            ],
        )
    if defn.disks:
        w.open("disks")
        for disk in defn.disks:
            _format_disk(w, disk, push=defn.mode == "push", internal=internal)
        w.close("disks")
    if internal and (defn.tls_alias or defn.tls_secret_alias):
        w.open("privateData")
        w.open("objects")
        if defn.tls_secret_alias:
            w.empty("secret", [("type", "tlskey"), ("alias", defn.tls_secret_alias)])
        if defn.tls_alias:
            w.empty("TLSx509", [("alias", defn.tls_alias)])
        w.close("objects")
        w.close("privateData")
    w.close("domainbackup")
    return w.value()


def _format_disk(w: XMLWriter, disk: BackupDisk, *, push: bool, internal: bool) -> None:
    attrs: list[tuple[str, str | int | None]] = [
        ("name", disk.name),
        ("backup", "yes" if disk.backup else "no"),
    ]
    if internal:
        attrs.append(("state", disk.state))
    if not disk.backup or disk.store is None:
        w.empty("disk", attrs)
        return
    store = disk.store
    attrs += [
        ("type", store.type),
        ("backupmode", disk.backupmode),
        ("incremental", disk.incremental),
        ("exportname", disk.exportname),
        ("exportbitmap", disk.exportbitmap),
        ("index", disk.index or None),
    ]
    if store.format is None and store.path is None and not store.extra:
        w.empty("disk", attrs)
        return
    w.open("disk", attrs)
    if store.format is not None:
        w.empty("driver", [("type", store.format)])
    if store.path is not None or store.extra:
        tag = "target" if push else "scratch"
        src_attrs: Attrs = [("dev" if store.type == "block" else "file", store.path)]
        if store.extra:
            w.open(tag, src_attrs)
            for child in store.extra:
                w.element(child)
            w.close(tag)
        else:
            w.empty(tag, src_attrs)
    w.close("disk")
