"""block-dirty-bitmap-* commands: thin wrappers over ``virtsim.sim.bitmap_ops``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...sim import bitmap_ops as ops
from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator


@command("block-dirty-bitmap-add")
def add(emu: Emulator, a: dict[str, Any]) -> Any:
    ops.add(emu.graph, a["node"], a["name"], a.get("granularity"), a.get("persistent", False),
            a.get("disabled", False))
    return {}


@command("block-dirty-bitmap-remove")
def remove(emu: Emulator, a: dict[str, Any]) -> Any:
    ops.remove(emu.graph, a["node"], a["name"])
    return {}


@command("block-dirty-bitmap-clear")
def clear(emu: Emulator, a: dict[str, Any]) -> Any:
    ops.clear(emu.graph, a["node"], a["name"])
    return {}


@command("block-dirty-bitmap-enable")
def enable(emu: Emulator, a: dict[str, Any]) -> Any:
    ops.enable(emu.graph, a["node"], a["name"])
    return {}


@command("block-dirty-bitmap-disable")
def disable(emu: Emulator, a: dict[str, Any]) -> Any:
    ops.disable(emu.graph, a["node"], a["name"])
    return {}


@command("block-dirty-bitmap-merge")
def merge(emu: Emulator, a: dict[str, Any]) -> Any:
    ops.merge(emu.graph, a["node"], a["target"], a["bitmaps"])
    return {}


@command("x-debug-block-dirty-bitmap-sha256")
def sha256(emu: Emulator, a: dict[str, Any]) -> Any:
    return {"sha256": ops.sha256(emu.graph, a["node"], a["name"])}
