"""asyncio adapter: QMP monitors on unix or TCP sockets around the sans-I/O core.

Like a QEMU chardev socket server, a monitor serves one client at a time; a second client
connects but hears nothing (no greeting) until the first one leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

from ..sim.errors import SimError
from . import schema
from .commands import REGISTRY
from .protocol import QmpServerProtocol

if TYPE_CHECKING:
    from .emulator import Emulator, MonitorSpec

READ_CHUNK = 65536


class MonitorServer:
    """One ``-qmp``/``-mon`` listener."""

    def __init__(self, emu: Emulator, spec: MonitorSpec) -> None:
        self.emu = emu
        self.spec = spec
        self.server: asyncio.AbstractServer | None = None
        self.address: str | tuple[str, int] = ""
        self._session_lock = asyncio.Lock()
        self._conns: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        if self.spec.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.path)
            self.server = await asyncio.start_unix_server(self._accept, path=self.spec.path)
            os.chmod(self.spec.path, 0o600) if False else None  # QEMU leaves umask perms
            self.address = self.spec.path
        else:
            self.server = await asyncio.start_server(self._accept, host=self.spec.host,
                                                     port=self.spec.port)
            sock = self.server.sockets[0].getsockname()
            self.address = (sock[0], sock[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._conns):
                t.cancel()
            for t in list(self._conns):
                with contextlib.suppress(BaseException):
                    await t
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None
            if self.spec.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.spec.path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            async with self._session_lock:
                self._writers.add(writer)
                await Session(self.emu, reader, writer).run()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()


def _command_info(name: str) -> bool:
    return name in REGISTRY and schema.has_command(name) or name == "qmp_capabilities"


class Session:
    """One connected QMP client."""

    def __init__(self, emu: Emulator, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.emu = emu
        self.reader = reader
        self.writer = writer
        self.core = QmpServerProtocol(
            emu.version_info(),
            has_command=_command_info,
            allows_oob=lambda n: schema.allows_oob(n) if schema.has_command(n) else False)

    def _on_event(self, name: str, data: dict[str, Any] | None) -> None:
        self.core.send_event(name, data, self.emu.clock.wall())
        self._flush()

    def _flush(self) -> None:
        out = self.core.data_to_send()
        if out and not self.writer.is_closing():
            self.writer.write(out)

    async def run(self) -> None:
        self.writer.write(self.core.greeting())
        unsubscribe = self.emu.bus.subscribe(self._on_event)
        try:
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                for req in self.core.receive_data(data):
                    self.dispatch(req)
                    if self.emu.quitting:
                        break
                self._flush()
                await self.writer.drain()
                if self.emu.quitting:
                    self.emu.finish_quit()
                    break
        finally:
            unsubscribe()

    def dispatch(self, req: Any) -> None:
        handler = REGISTRY.get(req.name)
        try:
            if handler is None:
                raise SimError(f"The command {req.name} has not been found", "CommandNotFound")
            args = schema.validate(req.name, req.arguments)
            self.emu.in_command = True
            try:
                value = handler(self.emu, args)
            finally:
                self.emu.in_command = False
        except SimError as e:
            self.core.send_error(req, e.error_class, e.desc)
        except Exception as e:  # a bug in virtsim: say so in QEMU's terms, keep serving
            print(f"virtsim: internal error in {req.name}: {e!r}", file=sys.stderr)
            import traceback

            traceback.print_exc()
            self.core.send_error(req, "GenericError", f"virtsim internal error: {e}")
        else:
            self.core.send_return(req, value)
        self._flush()
