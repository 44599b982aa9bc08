"""blockdev-add / blockdev-del and the block queries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator


@command("blockdev-add")
def blockdev_add(emu: Emulator, args: dict[str, Any]) -> Any:
    emu.graph.blockdev_add(emu.check_blockdev_options(args))
    return {}


@command("blockdev-del")
def blockdev_del(emu: Emulator, args: dict[str, Any]) -> Any:
    emu.graph.blockdev_del(args["node-name"])
    return {}


@command("query-named-block-nodes")
def query_named_block_nodes(emu: Emulator, args: dict[str, Any]) -> Any:
    return emu.graph.named_nodes_info(bool(args.get("flat", False)))


@command("query-block")
def query_block(emu: Emulator, args: dict[str, Any]) -> Any:
    out = []
    for blk in emu.graph.backends:
        info: dict[str, Any] = {"device": blk.name}
        if blk.qdev:
            info["qdev"] = blk.qdev
        info.update({"type": "unknown", "removable": blk.removable, "locked": False})
        root = blk.root
        if root is not None:
            info["inserted"] = root.device_info(flat=False)
        if blk.has_device:
            info["io-status"] = blk.io_status
        out.append(info)
    return out



@command("device_add")
def device_add(emu: Emulator, args: dict[str, Any]) -> Any:
    from ..emulator import DeviceSpec

    props = {k: str(v) for k, v in args.items()}
    emu.add_device(DeviceSpec(str(args["driver"]), props.get("id"), props.get("drive"), props))
    return {}


@command("device_del")
def device_del(emu: Emulator, args: dict[str, Any]) -> Any:
    emu.del_device(args["id"])
    return {}
