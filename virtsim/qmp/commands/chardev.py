"""``query-chardev``: how libvirt learns whether a guest agent has opened its port.

Monitors are listed with QEMU's labels (``compat_monitorN`` for ``-qmp``, the chardev id
for ``-chardev``/``-mon``); a guest agent channel reports ``frontend-open`` once the
simulated guest's qemu-ga runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator


@command("query-chardev")
def query_chardev(emu: Emulator, args: dict[str, Any]) -> Any:
    out: list[dict[str, Any]] = []
    if emu.agent is not None:
        out.append(emu.agent.chardev_info())
    compat = 0
    for srv in emu.servers:
        spec = srv.spec
        where = (f"unix:{spec.path}" if spec.kind == "unix"
                 else f"tcp:{spec.host}:{spec.port}")
        label = spec.label
        if label is None:
            label = f"compat_monitor{compat}"
            compat += 1
        prefix = "" if srv.active is not None else "disconnected:"
        out.append({"frontend-open": True, "filename": f"{prefix}{where},server=on",
                    "label": label})
    return out
