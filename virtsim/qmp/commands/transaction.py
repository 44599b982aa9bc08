"""The ``transaction`` command."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...sim.bitmap_ops import BITMAP_ACTIONS
from ...sim.transaction import ACTIONS, Action, run_transaction
from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator

def registry() -> dict[str, type[Action]]:
    """Every transaction action: the generic ones, bitmaps, and whatever feature modules
    (backup jobs...) added to ``virtsim.sim.transaction.ACTIONS`` when imported."""
    return {**ACTIONS, **BITMAP_ACTIONS}


@command("transaction")
def transaction(emu: Emulator, a: dict[str, Any]) -> Any:
    run_transaction(emu.graph, a["actions"], a.get("properties"), registry(), emu.jobs)
    return {}
