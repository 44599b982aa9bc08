"""Run state, identity and introspection commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...sim.errors import SimError
from . import REGISTRY, command

if TYPE_CHECKING:
    from ..emulator import Emulator


@command("query-version")
def query_version(emu: Emulator, args: dict[str, Any]) -> Any:
    return emu.version_info()


@command("query-commands")
def query_commands(emu: Emulator, args: dict[str, Any]) -> Any:
    return [{"name": name} for name in emu.command_names()]


@command("query-status")
def query_status(emu: Emulator, args: dict[str, Any]) -> Any:
    return {"running": emu.run_state == "running", "singlestep": False, "status": emu.run_state}


@command("query-name")
def query_name(emu: Emulator, args: dict[str, Any]) -> Any:
    return {"name": emu.config.name} if emu.config.name is not None else {}


@command("stop")
def stop(emu: Emulator, args: dict[str, Any]) -> Any:
    emu.stop_vm()
    return {}


@command("cont")
def cont(emu: Emulator, args: dict[str, Any]) -> Any:
    emu.cont_vm()
    return {}


@command("system_powerdown")
def system_powerdown(emu: Emulator, args: dict[str, Any]) -> Any:
    emu.powerdown()
    return {}


@command("system_reset")
def system_reset(emu: Emulator, args: dict[str, Any]) -> Any:
    emu.bus.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
    return {}


@command("quit")
def quit_(emu: Emulator, args: dict[str, Any]) -> Any:
    emu.request_quit()
    return {}


@command("migrate-pause")
def migrate_pause(emu: Emulator, args: dict[str, Any]) -> Any:
    raise SimError("migrate-pause is currently only supported during postcopy-active state")


assert "quit" in REGISTRY
