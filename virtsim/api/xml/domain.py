"""The domain XML subset virtsim simulates, with everything else kept and printed back.

Users bring domain XML from real hosts, so nothing valid may be refused or lost: the parsed
document is kept whole (`DomainDef.tree`) and the simulated fields (name, uuid, memory, vcpu,
emulator, file/block disks, the guest-agent channel, graphics passwords) are read from it into
dataclasses. Formatting writes those fields back into a copy of the tree and prints it the way
libvirt 9.0 does: memory in KiB with currentMemory, `vcpu placement='static'`, elements in
libvirt's fixed order, graphics passwords only with VIR_DOMAIN_XML_SECURE.
Defaults that only a running driver adds (controllers, addresses, aliases) are the caller's job.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

from lxml import etree

from virtsim.api import constants as c
from virtsim.api import errors
from virtsim.api.xml.safe import parse_document, text_of
from virtsim.api.xml.writer import XMLWriter

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"

# Order of <domain> children in virDomainDefFormatInternal; unknown ones keep their place.
_DOMAIN_ORDER = (
    "name uuid genid title description metadata maxMemory memory currentMemory blkiotune memtune "
    "memoryBacking vcpu vcpus iothreads iothreadids defaultiothread cputune numatune resource "
    "sysinfo bootloader bootloader_args os idmap features cpu clock on_poweroff on_reboot on_crash "
    "on_lockfailure pm perf devices seclabel keywrap launchSecurity"
).split()
# Order of <devices> children (one list per device type in virDomainDef).
_DEVICES_ORDER = (
    "emulator disk controller lease filesystem interface smartcard serial parallel console "
    "channel input tpm graphics sound audio video hostdev redirdev redirfilter hub watchdog "
    "memballoon rng nvram panic shmem memory iommu vsock crypto"
).split()
# Order of <disk> children in virDomainDiskDefFormat.
_DISK_ORDER = (
    "driver auth source backingStore backenddomain geometry blockio mirror target iotune boot "
    "readonly shareable transient serial wwn vendor product encryption alias address"
).split()

_UNIT_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


@dataclass
class DomainDisk:
    """A <disk>: what the emulator needs to open it and what backups/checkpoints look at."""

    target: str
    bus: str | None = None
    type: str = "file"  # file | block | network | volume | ...
    device: str = "disk"  # disk | cdrom | floppy | lun
    source: str | None = None  # file= or dev= path; None: no media
    driver_name: str | None = None
    format: str | None = None  # <driver type=...>: raw | qcow2 | ...
    readonly: bool = False
    shareable: bool = False
    element: etree._Element | None = field(default=None, repr=False, compare=False)

    @property
    def is_empty(self) -> bool:
        """virStorageSourceIsEmpty: a local disk without a source path has no media."""
        return self.source is None and self.type in ("file", "block", "volume")


@dataclass
class DomainGraphics:
    type: str
    passwd: str | None = None
    element: etree._Element | None = field(default=None, repr=False, compare=False)


@dataclass
class DomainDef:
    name: str
    type: str = "kvm"
    uuid: str | None = None
    memory_kib: int | None = None
    current_memory_kib: int | None = None
    vcpus: int = 1
    emulator: str | None = None
    disks: list[DomainDisk] = field(default_factory=list)
    graphics: list[DomainGraphics] = field(default_factory=list)
    guest_agent: bool = False  # a virtio channel named org.qemu.guest_agent.0 exists
    tree: etree._Element | None = field(default=None, repr=False, compare=False)


def parse_domain(xml: str | bytes, *, validate: bool = False) -> DomainDef:
    """Parse domain XML (virDomainDefParseString); `validate` is VIR_DOMAIN_DEFINE_VALIDATE."""
    doc = parse_document(
        xml,
        url="(domain_definition)",
        root="domain",
        err_domain=c.VIR_FROM_DOMAIN,
        schema="domain.rng" if validate else None,
    )
    return parse_domain_element(doc)


def parse_domain_element(doc: etree._Element) -> DomainDef:
    """The DomainDef of an already parsed <domain> element (also used inside checkpoints)."""
    name = text_of(doc.find("name"))
    if not name:
        raise errors.make_error(c.VIR_ERR_NO_NAME, c.VIR_FROM_DOMAIN)
    uuid = text_of(doc.find("uuid"))
    if uuid is not None:
        uuid = _normalize_uuid(uuid)
    if not text_of(doc.find("os/type")):
        raise errors.make_error(
            c.VIR_ERR_XML_ERROR, c.VIR_FROM_DOMAIN, "an os <type> must be specified"
        )
    memory = _scaled_kib(doc.find("memory"), "./memory[1]")
    cells = doc.findall("cpu/numa/cell")
    if memory is None and cells:
        # libvirt sizes a domain without <memory> from its NUMA cells.
        memory = sum(_scaled_kib(cell, "memory", attr=True) or 0 for cell in cells)
    if memory is None:
        raise errors.make_error(
            c.VIR_ERR_XML_ERROR,
            c.VIR_FROM_DOMAIN,
            "Memory size must be specified via <memory> or in the <numa> configuration",
        )
    vcpu_text = text_of(doc.find("vcpu"))
    vcpus = 1
    if vcpu_text is not None:
        if not vcpu_text.strip().isdigit():
            raise errors.make_error(
                c.VIR_ERR_XML_ERROR, c.VIR_FROM_DOMAIN, "maximum vcpus count must be an integer"
            )
        vcpus = int(vcpu_text.strip())
    defn = DomainDef(
        name=name,
        type=doc.get("type", "kvm"),
        uuid=uuid,
        memory_kib=memory,
        current_memory_kib=_scaled_kib(doc.find("currentMemory"), "./currentMemory[1]"),
        vcpus=vcpus,
        emulator=text_of(doc.find("devices/emulator")),
        tree=copy.deepcopy(doc),
    )
    assert defn.tree is not None
    for disk_el in defn.tree.iterfind("devices/disk"):
        defn.disks.append(_parse_disk(disk_el))
    for gfx in defn.tree.iterfind("devices/graphics"):
        defn.graphics.append(DomainGraphics(gfx.get("type", ""), gfx.get("passwd"), gfx))
    for chan in defn.tree.iterfind("devices/channel/target"):
        if chan.get("type") == "virtio" and chan.get("name") == GUEST_AGENT_CHANNEL:
            defn.guest_agent = True
    return defn


def _normalize_uuid(text: str) -> str:
    """libvirt accepts UUIDs with or without dashes (and spaces); prints them canonically."""
    hexdigits = re.sub(r"[-\s]", "", text.strip())
    if not re.fullmatch(r"[0-9a-fA-F]{32}", hexdigits):
        raise errors.make_error(
            c.VIR_ERR_INTERNAL_ERROR, c.VIR_FROM_DOMAIN, "malformed uuid element"
        )
    h = hexdigits.lower()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _scaled_kib(el: etree._Element | None, where: str, *, attr: bool = False) -> int | None:
    """virDomainParseMemory: a size with libvirt's unit suffixes, rounded up to KiB.

    `where` names the value in libvirt's error (an XPath, or the attribute when `attr`).
    """
    if el is None:
        return None
    text = el.get(where) if attr else text_of(el)
    if text is None or not text.strip():
        return None
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise errors.make_error(
            c.VIR_ERR_XML_ERROR,
            c.VIR_FROM_XML,
            f"Invalid value '{text}' for element or attribute '{where}'",
        )
    unit = (el.get("unit") or "KiB").strip()
    low = unit.lower()
    if low in ("b", "bytes"):
        scale = 1
    elif low and low[0] in _UNIT_POWERS:
        power = _UNIT_POWERS[low[0]]
        rest = low[1:]
        if rest in ("", "ib"):
            scale = 1024**power
        elif rest == "b":
            scale = 1000**power
        else:
            raise _bad_unit(unit)
    else:
        raise _bad_unit(unit)
    return math.ceil(value * scale / 1024)


def _bad_unit(unit: str) -> errors.libvirtError:
    return errors.make_error(c.VIR_ERR_INVALID_ARG, c.VIR_FROM_NONE, f"unknown suffix '{unit}'")


def _parse_disk(el: etree._Element) -> DomainDisk:
    target_el = el.find("target")
    source_el = el.find("source")
    driver_el = el.find("driver")
    source = None
    if source_el is not None:
        source = source_el.get("file") or source_el.get("dev") or source_el.get("name")
    if target_el is None or not target_el.get("dev"):
        raise errors.make_error(c.VIR_ERR_NO_TARGET, c.VIR_FROM_DOMAIN, source)
    return DomainDisk(
        target=target_el.get("dev", ""),
        bus=target_el.get("bus"),
        type=el.get("type", "file"),
        device=el.get("device", "disk"),
        source=source,
        driver_name=driver_el.get("name") if driver_el is not None else None,
        format=driver_el.get("type") if driver_el is not None else None,
        readonly=el.find("readonly") is not None,
        shareable=el.find("shareable") is not None,
        element=el,
    )


def format_domain(
    defn: DomainDef, *, secure: bool = False, inactive: bool = False, live_id: int | None = None
) -> str:
    """virDomainDefFormat for XMLDesc: `secure` = VIR_DOMAIN_XML_SECURE, `inactive` drops the id."""
    root = copy.deepcopy(defn.tree) if defn.tree is not None else etree.Element("domain")
    _sync(root, defn, secure=secure)
    if live_id is not None and not inactive:
        attrs = dict(root.attrib)
        root.attrib.clear()
        root.set("type", attrs.pop("type", defn.type))
        root.set("id", str(live_id))
        for k, v in attrs.items():
            if k != "id":
                root.set(k, v)
    elif "id" in root.attrib:
        del root.attrib["id"]
    _order(root, _DOMAIN_ORDER)
    devices = root.find("devices")
    if devices is not None:
        _order(devices, _DEVICES_ORDER)
        for disk in devices.iterfind("disk"):
            _order(disk, _DISK_ORDER)
    w = XMLWriter()
    w.element(root, ns_last=True)
    return w.value()


def domain_xml_flags(flags: int) -> dict[str, bool]:
    """Keyword arguments of format_domain for VIR_DOMAIN_XML_* flags."""
    return {
        "secure": bool(flags & c.VIR_DOMAIN_XML_SECURE),
        "inactive": bool(flags & c.VIR_DOMAIN_XML_INACTIVE),
    }


def _child(parent: etree._Element, tag: str, after: tuple[str, ...] = ()) -> etree._Element:
    """The first `tag` child, created (right after the last of `after` present) when missing."""
    el = parent.find(tag)
    if el is not None:
        return el
    el = etree.Element(tag)
    anchor = None
    for name in after:
        found = parent.find(name)
        if found is not None:
            anchor = found
    if anchor is not None:
        anchor.addnext(el)
    else:
        parent.insert(0, el)
    return el


def _sync(root: etree._Element, defn: DomainDef, *, secure: bool) -> None:
    if "type" not in root.attrib:
        root.set("type", defn.type)
    _child(root, "name").text = defn.name
    if defn.uuid is not None:
        _child(root, "uuid", ("name",)).text = defn.uuid
    if defn.memory_kib is not None:
        mem = _child(root, "memory", ("name", "uuid", "maxMemory"))
        _set_kib(mem, defn.memory_kib)
        cur = _child(root, "currentMemory", ("memory",))
        current = defn.current_memory_kib or defn.memory_kib
        _set_kib(cur, min(current, defn.memory_kib))  # libvirt clamps the balloon to <memory>
    vcpu = _child(root, "vcpu", ("name", "uuid", "memory", "currentMemory"))
    vcpu.text = str(defn.vcpus)
    _reorder_attrs(vcpu, {"placement": "static"}, ("placement", "cpuset", "current"))
    if defn.emulator is not None:
        devices = _child(root, "devices", tuple(_DOMAIN_ORDER))
        _child(devices, "emulator").text = defn.emulator
    _sync_disks(root, defn)
    originals = list(defn.tree.iterfind("devices/graphics")) if defn.tree is not None else []
    copies = dict(zip((id(o) for o in originals), root.iterfind("devices/graphics"), strict=True))
    for gfx in defn.graphics:
        el = copies.get(id(gfx.element))
        if el is not None and gfx.passwd is not None:
            el.set("passwd", gfx.passwd)
    for gfx_el in root.iterfind("devices/graphics"):
        # virDomainGraphicsAuthDefFormatAttr: the password only with VIR_DOMAIN_XML_SECURE.
        if not secure and "passwd" in gfx_el.attrib:
            del gfx_el.attrib["passwd"]


def _reorder_attrs(el: etree._Element, defaults: dict[str, str], first: tuple[str, ...]) -> None:
    """Fill default attributes and put the ones libvirt prints first in its order."""
    attrs = {**defaults, **dict(el.attrib)}
    el.attrib.clear()
    for key in first:
        if key in attrs:
            el.set(key, attrs.pop(key))
    for key, value in attrs.items():
        el.set(key, value)


def _set_kib(el: etree._Element, kib: int) -> None:
    # libvirt prints dumpCore (the only other attribute) before the unit.
    attrs = {k: v for k, v in el.attrib.items() if k != "unit"}
    el.attrib.clear()
    for key, value in attrs.items():
        el.set(key, value)
    el.set("unit", "KiB")
    el.text = str(kib)


def _sync_disks(root: etree._Element, defn: DomainDef) -> None:
    """Rewrite the <disk> elements from defn.disks (the list may have been edited by the caller)."""
    devices = root.find("devices")
    originals = list(defn.tree.iterfind("devices/disk")) if defn.tree is not None else []
    copies = list(devices.iterfind("disk")) if devices is not None else []
    by_original = dict(zip((id(o) for o in originals), copies, strict=True))
    if devices is None:
        if not defn.disks:
            return
        devices = _child(root, "devices", tuple(_DOMAIN_ORDER))
    for stale in copies:
        devices.remove(stale)
    insert_at = 1 if devices.find("emulator") is not None else 0
    for offset, disk in enumerate(defn.disks):
        el = by_original.get(id(disk.element)) if disk.element is not None else None
        el = el if el is not None else etree.Element("disk")
        _write_disk(el, disk)
        devices.insert(insert_at + offset, el)


def _write_disk(el: etree._Element, disk: DomainDisk) -> None:
    el.set("type", disk.type)
    el.set("device", disk.device)
    if disk.driver_name is not None or disk.format is not None:
        drv = _child(el, "driver")
        if disk.driver_name is not None:
            drv.set("name", disk.driver_name)
        if disk.format is not None:
            drv.set("type", disk.format)
    src = el.find("source")
    if disk.source is not None:
        src = src if src is not None else _child(el, "source", ("driver",))
        src.set({"block": "dev", "volume": "volume"}.get(disk.type, "file"), disk.source)
    tgt = _child(el, "target", ("driver", "source", "backingStore"))
    tgt.set("dev", disk.target)
    if disk.bus is not None:
        tgt.set("bus", disk.bus)
    for flag, present in (("readonly", disk.readonly), ("shareable", disk.shareable)):
        found = el.find(flag)
        if present and found is None:
            _child(el, flag, ("target",))
        elif not present and found is not None:
            el.remove(found)


def _order(parent: etree._Element, order: list[str]) -> None:
    """Stable-sort children into libvirt's order; unknown ones stay after their neighbour."""
    rank = {name: i for i, name in enumerate(order)}
    keyed: list[tuple[float, int, etree._Element]] = []
    last = -1.0
    for pos, child in enumerate(parent):
        if not isinstance(child.tag, str):
            continue
        qn = etree.QName(child)
        if qn.namespace is None and qn.localname in rank:
            last = float(rank[qn.localname])
            keyed.append((last, pos, child))
        elif qn.namespace is not None:
            keyed.append((float(len(order)), pos, child))  # driver namespaces print last
        else:
            keyed.append((last + 0.5, pos, child))
    keyed.sort(key=lambda item: (item[0], item[1]))
    for _, _, child in keyed:
        parent.remove(child)
    for _, _, child in keyed:
        parent.append(child)
