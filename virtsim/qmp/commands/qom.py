"""``qom-get``/``qom-set`` for what fleecing needs: a disk device's ``drive`` property.

Fleecing moves a running guest's disk onto a copy-before-write filter with
``qom-set {path, property: "drive", value: NODE}`` (QEMU's ``blk_replace_bs``): the
device's BlockBackend keeps its permissions and now reaches the new node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...sim import fleecing  # noqa: F401  (registers copy-before-write, snapshot-access)
from ...sim.block import BlockBackend
from ...sim.errors import SimError
from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator

_BACKEND = "/virtio-backend"


def _resolve(emu: Emulator, path: str) -> tuple[BlockBackend, str]:
    """object_resolve_path (absolute, or a unique partial path) to a disk device: its
    BlockBackend and QOM type name (for "Property 'TYPE.x' not found")."""
    candidates: dict[str, BlockBackend] = {}
    for blk_path, blk in emu.blk_by_path.items():
        candidates[blk_path] = blk
        if blk_path.endswith(_BACKEND):
            candidates[blk_path[:-len(_BACKEND)]] = blk
    if path.startswith("/"):
        found = [path] if path in candidates else []
    else:
        found = [p for p in candidates if p == path or p.endswith("/" + path)]
    if len(found) != 1:
        raise SimError(f"Device '{path}' not found", "DeviceNotFound")
    p = found[0]
    if p.endswith(_BACKEND):
        return candidates[p], "virtio-blk-device"
    if p + _BACKEND in emu.blk_by_path:
        return candidates[p], "virtio-blk-pci"
    return candidates[p], "scsi-hd" if "scsi" in (candidates[p].qdev or "") else "ide-hd"


@command("qom-get")
def qom_get(emu: Emulator, a: dict[str, Any]) -> Any:
    blk, kind = _resolve(emu, a["path"])
    if a["property"] != "drive":
        raise SimError(f"Property '{kind}.{a['property']}' not found")
    if blk.name:
        return blk.name
    root = blk.root
    return root.node_name if root is not None else ""


@command("qom-set")
def qom_set(emu: Emulator, a: dict[str, Any]) -> Any:
    blk, kind = _resolve(emu, a["path"])
    if a["property"] != "drive":
        raise SimError(f"Property '{kind}.{a['property']}' not found")
    value = a["value"]
    if not isinstance(value, str):
        raise SimError("Invalid parameter type for 'drive', expected: string")
    node = emu.graph.lookup_bs(None, value)
    old = blk.root_edge
    if old is None or old.child is node:
        # QEMU 7.2 aborts (assertion old_bs != new_bs); keeping the drive is the intent
        return {}
    perm, shared = old.perm, old.shared
    emu.graph.detach(old)
    try:
        blk.root_edge = emu.graph.attach(blk, node, "root", perm, shared)
    except SimError:
        blk.root_edge = emu.graph.attach(blk, old.child, "root", perm, shared)
        raise
    return {}
