"""QMP command handlers, one module per family, each a thin call into ``virtsim.sim``.

A handler takes the emulator and the (already schema-validated) arguments and returns the
QMP ``return`` value, or raises ``SimError`` with QEMU's class and text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..emulator import Emulator

Handler = Callable[["Emulator", dict[str, Any]], Any]

REGISTRY: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of QMP command ``name``."""

    def deco(fn: Handler) -> Handler:
        REGISTRY[name] = fn
        return fn

    return deco


# command modules; a feature adds its module name here
MODULES = ["backup", "bitmap", "block", "chardev", "create", "hmp", "job", "misc", "nbd",
           "objects", "qom", "transaction"]


def load_all() -> dict[str, Handler]:
    """Import every command module (registration happens at import)."""
    import importlib

    for mod in MODULES:
        importlib.import_module(f"{__name__}.{mod}")
    return REGISTRY
