"""The ``transaction`` command."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...sim.bitmap_ops import BITMAP_ACTIONS
from ...sim.transaction import ACTIONS, Action, run_transaction
from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator

REGISTRY: dict[str, type[Action]] = {**ACTIONS, **BITMAP_ACTIONS}


@command("transaction")
def transaction(emu: Emulator, a: dict[str, Any]) -> Any:
    run_transaction(emu.graph, a["actions"], a.get("properties"), REGISTRY)
    return {}
