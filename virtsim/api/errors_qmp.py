"""How a failed QMP command surfaces through the API: libvirt's monitor error text."""

from __future__ import annotations

from typing import Any

from . import constants as c
from .errors import libvirtError, make_error


def qmp_error(e: Exception, cmd: str | None = None) -> libvirtError:
    """qemuMonitorJSONCheckError: "internal error: unable to execute QEMU command 'X': desc"."""
    if isinstance(e, libvirtError):
        return e
    desc = str(e)
    command = cmd
    err: Any = getattr(e, "error", None)
    if err is not None:
        desc = getattr(err, "desc", desc)
    sent: Any = getattr(e, "sent", None)
    if command is None and sent is not None:
        try:
            command = str(sent["execute"])
        except (KeyError, TypeError):
            command = None
    if command is None:
        return make_error(c.VIR_ERR_INTERNAL_ERROR, c.VIR_FROM_QEMU, desc)
    return make_error(c.VIR_ERR_INTERNAL_ERROR, c.VIR_FROM_QEMU,
                      f"unable to execute QEMU command '{command}': {desc}")
