"""``blockdev-add driver: nbd``: a protocol node whose bytes live on an NBD server.

Kept out of ``virtsim.sim`` because it opens sockets; importing this module registers the
driver (the emulator imports it when it builds its block graph).
"""

from __future__ import annotations

import errno
import os
from typing import Any

from ..sim.block import DATA, BlockGraph, DriverSpec, Node, register_driver
from ..sim.errors import SimError
from .client import Address, InetAddress, NbdClient, NbdError, UnixAddress, export_uri


def parse_server(server: dict[str, Any]) -> Address:
    """SocketAddress (already schema-checked) -> the client's address."""
    kind = server.get("type")
    if kind == "unix":
        return UnixAddress(str(server["path"]))
    if kind == "inet":
        return InetAddress(str(server["host"]), str(server["port"]))
    raise SimError(f"Unsupported socket address type '{kind}' for NBD")


class NbdNode(Node):
    """``driver: nbd`` — QEMU's NBD client block driver over :class:`NbdClient`."""

    drv = "nbd"

    def __init__(self, graph: BlockGraph, options: dict[str, Any]) -> None:
        super().__init__(graph, options)
        self.addr = parse_server(dict(options["server"]))
        self.export = str(options.get("export", ""))
        creds = options.get("tls-creds")
        if creds is not None:  # the emulator has no TLS credential objects
            raise SimError(f"No TLS credentials with id '{creds}'")
        try:
            self.client = NbdClient(self.addr, self.export, readonly=self.read_only)
        except NbdError as e:
            raise SimError(str(e)) from None
        except OSError as e:
            reason = e.strerror or os.strerror(e.errno or errno.EIO)
            raise SimError(f"Failed to connect to '{self.addr.describe()}': {reason}") from None
        if self.client.export_readonly and not self.read_only:
            if self.auto_read_only:
                self.read_only = True
                self.client.readonly = True
            else:
                self.client.close()
                raise SimError("Could not open image: Permission denied")

    @property
    def store(self) -> NbdClient:
        return self.client

    def exact_filename(self) -> str | None:
        return export_uri(self.addr, self.export)

    def strong_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"server": dict(self.options["server"])}
        if self.export:
            out["export"] = self.export
        return out

    def has_get_info(self) -> bool:
        return False

    def actual_size(self) -> int | None:
        return None

    def length(self) -> int:
        return self.client.size()

    def _drv_read(self, offset: int, length: int) -> bytes:
        return self.client.pread(offset, length)

    def _drv_write(self, offset: int, data: bytes) -> None:
        self.client.pwrite(offset, data)

    def _drv_write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.client.write_zeroes(offset, length, unmap)

    def _drv_discard(self, offset: int, length: int) -> None:
        self.client.punch_hole(offset, length)

    def _drv_flush(self) -> None:
        self.client.flush()

    def _drv_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        return [(offset, length, DATA)]

    def truncate(self, size: int) -> None:
        self.client.truncate(size)

    def close(self) -> None:
        if not self.closed:
            self.client.close()
        super().close()


register_driver("nbd", DriverSpec(lambda g, o, c: NbdNode(g, o), named_first=True))
