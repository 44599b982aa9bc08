"""`<domaincheckpoint>`: parse, libvirt's disk defaults, and libvirt 9.0's output form.

Facts from libvirt's checkpoint_conf.c: the document is always RNG-validated; without REDEFINE the
creation time is "now", the name defaults to that time, and any parent/creationTime/domain in the
input are ignored (the driver sets them); with REDEFINE a name and creationTime are mandatory and
the embedded <domain> is kept. Output order: name, description, parent, creationTime, disks, domain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from virtsim.api import constants as c
from virtsim.api import errors
from virtsim.api.xml.domain import DomainDef, DomainDisk, format_domain, parse_domain_element
from virtsim.api.xml.safe import parse_document, text_of
from virtsim.api.xml.writer import XMLWriter

CheckpointKind = Literal["bitmap", "no"]


@dataclass
class CheckpointDisk:
    name: str
    checkpoint: CheckpointKind | None = None  # None: attribute absent (parse) -> bitmap
    bitmap: str | None = None
    size: int | None = None  # dirty bytes, filled only for VIR_DOMAIN_CHECKPOINT_XML_SIZE


@dataclass
class CheckpointDef:
    name: str | None = None
    description: str | None = None
    parent: str | None = None
    creation_time: int | None = None
    disks: list[CheckpointDisk] = field(default_factory=list)
    domain: DomainDef | None = None


def parse_checkpoint(
    xml: str | bytes, *, redefine: bool = False, now: int | None = None
) -> CheckpointDef:
    """Parse checkpoint XML as virDomainCheckpointDefParseString does (errors are libvirt's)."""
    doc = parse_document(
        xml,
        url="(domain_checkpoint)",
        root="domaincheckpoint",
        err_domain=c.VIR_FROM_DOMAIN_CHECKPOINT,
        schema="domaincheckpoint.rng",
    )
    defn = CheckpointDef(
        name=text_of(doc.find("name")), description=text_of(doc.find("description"))
    )
    if redefine:
        if defn.name is None:
            raise errors.CHECKPOINT_REDEFINE_NEEDS_NAME()
        created = text_of(doc.find("creationTime"))
        try:
            defn.creation_time = int(created) if created is not None else None
        except ValueError:
            defn.creation_time = None
        if defn.creation_time is None:
            raise errors.CHECKPOINT_REDEFINE_NEEDS_TIME()
        defn.parent = text_of(doc.find("parent/name"))
        dom_el = doc.find("domain")
        if dom_el is not None:
            defn.domain = parse_domain_element(dom_el)
    else:
        # libvirt's moment post-parse: creation time now, name defaults to it.
        defn.creation_time = int(time.time()) if now is None else now
        if defn.name is None:
            defn.name = str(defn.creation_time)
    for disk_el in doc.findall("disks/disk"):
        kind = disk_el.get("checkpoint")
        size = disk_el.get("size")
        defn.disks.append(
            CheckpointDisk(
                name=disk_el.get("name", ""),
                checkpoint="no" if kind == "no" else ("bitmap" if kind == "bitmap" else None),
                bitmap=disk_el.get("bitmap"),
                size=int(size) if size is not None else None,
            )
        )
    return defn


def align_checkpoint_disks(defn: CheckpointDef, disks: list[DomainDisk]) -> None:
    """virDomainCheckpointAlignDisks: one entry per domain disk, in domain order, defaults filled.

    Disks may be named by target or by source path (normalized to the target). With no <disks>,
    every writable disk with media gets a bitmap; with <disks>, unlisted disks get checkpoint='no'.
    Bitmap names default to the checkpoint name. Raises libvirt's CONFIG_UNSUPPORTED errors.
    """
    if len(defn.disks) > len(disks):
        raise errors.CHECKPOINT_TOO_MANY_DISKS()
    if not disks:
        raise errors.CHECKPOINT_NO_DISKS()
    default: CheckpointKind | None = "bitmap" if not defn.disks else None
    chosen: dict[str, CheckpointDisk] = {}
    for req in defn.disks:
        dom = _disk_by_name(disks, req.name)
        if dom is None:
            raise errors.CHECKPOINT_NO_DISK_NAMED(req.name)
        if dom.target in chosen:
            raise errors.CHECKPOINT_DISK_TWICE(req.name)
        chosen[dom.target] = req
        if (dom.is_empty or dom.readonly) and req.checkpoint != "no":
            raise errors.CHECKPOINT_DISK_EMPTY_OR_RO(req.name)
        req.name = dom.target
        if req.checkpoint is None:
            req.checkpoint = "bitmap"
    aligned = []
    for dom in disks:
        if dom.target in chosen:
            aligned.append(chosen[dom.target])
            continue
        kind: CheckpointKind | None = "no" if (dom.is_empty or dom.readonly) else default
        aligned.append(CheckpointDisk(name=dom.target, checkpoint=kind or "no"))
    for disk in aligned:
        if disk.checkpoint == "bitmap" and disk.bitmap is None:
            disk.bitmap = defn.name
    defn.disks = aligned


def _disk_by_name(disks: list[DomainDisk], name: str) -> DomainDisk | None:
    for disk in disks:
        if disk.target == name:
            return disk
    for disk in disks:
        if disk.source is not None and disk.source == name:
            return disk
    return None


def format_checkpoint(
    defn: CheckpointDef, *, secure: bool = False, no_domain: bool = False, size: bool = False
) -> str:
    """virDomainCheckpointDefFormat: the XML of checkpointGetXMLDesc for the given flags.

    The embedded domain is the inactive definition; passwords only with `secure`.
    """
    w = XMLWriter()
    w.open("domaincheckpoint")
    w.text("name", defn.name)
    w.text("description", defn.description)
    if defn.parent is not None:
        w.open("parent")
        w.text("name", defn.parent)
        w.close("parent")
    if defn.creation_time:
        w.text("creationTime", defn.creation_time)
    if defn.disks:
        w.open("disks")
        for disk in defn.disks:
            attrs: list[tuple[str, str | int | None]] = [("name", disk.name)]
            attrs.append(("checkpoint", disk.checkpoint))
            if disk.bitmap is not None:
                attrs.append(("bitmap", disk.bitmap))
                if size and disk.size is not None:
                    attrs.append(("size", disk.size))
            w.empty("disk", attrs)
        w.close("disks")
    if defn.domain is not None and not no_domain:
        w.lines(format_domain(defn.domain, secure=secure, inactive=True))
    w.close("domaincheckpoint")
    return w.value()


def checkpoint_flags(flags: int) -> dict[str, bool]:
    """Keyword arguments of format_checkpoint for VIR_DOMAIN_CHECKPOINT_XML_* flags."""
    return {
        "secure": bool(flags & c.VIR_DOMAIN_CHECKPOINT_XML_SECURE),
        "no_domain": bool(flags & c.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN),
        "size": bool(flags & c.VIR_DOMAIN_CHECKPOINT_XML_SIZE),
    }


__all__ = [
    "CheckpointDef",
    "CheckpointDisk",
    "align_checkpoint_disks",
    "checkpoint_flags",
    "format_checkpoint",
    "parse_checkpoint",
]
