"""asyncio adapter: QMP monitors on unix or TCP sockets around the sans-I/O core.

Like a QEMU chardev socket server, a monitor serves one client at a time; a second client
connects but hears nothing (no greeting, no replies) until the first one leaves.  The
adapter is a plain ``asyncio.Protocol``: bytes in go straight to the core, replies go
straight to the transport, so a request costs one loop iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any

from ..sim.errors import SimError
from .protocol import QmpServerProtocol, Request

if TYPE_CHECKING:
    from .emulator import Emulator, MonitorSpec


_LAZY: dict[str, Any] = {}
FEED_SLICE = 4096  # bytes of input served before checking whether the client still reads


def _schema() -> Any:
    """The schema module, imported on first use (it is the slowest import at start-up)."""
    mod = _LAZY.get("schema")
    if mod is None:
        from . import schema as mod

        _LAZY["schema"] = mod
    return mod


def warm_up() -> None:
    """Import the schema and the command table now (they load lazily so a new process can
    greet sooner; this runs right after, before the first request needs them)."""
    _schema()
    _registry()


def _registry() -> dict[str, Any]:
    reg = _LAZY.get("registry")
    if reg is None:
        from .commands import load_all

        reg = _LAZY["registry"] = load_all()
    return reg


class MonitorServer:
    """One ``-qmp``/``-mon`` listener."""

    def __init__(self, emu: Emulator, spec: MonitorSpec) -> None:
        self.emu = emu
        self.spec = spec
        self.server: asyncio.AbstractServer | None = None
        self.address: str | tuple[str, int] = ""
        self.active: Session | None = None
        self.waiting: deque[Session] = deque()
        self.sessions: set[Session] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.spec.sock is not None:
            # a socket the CLI already bound (and maybe a client it already greeted)
            sock, self.spec.sock = self.spec.sock, None
            if self.spec.kind == "unix":
                self.server = await loop.create_unix_server(lambda: Session(self), sock=sock)
                self.address = self.spec.path
            else:
                self.server = await loop.create_server(lambda: Session(self), sock=sock)
                name = sock.getsockname()
                self.address = (name[0], name[1])
            conn, self.spec.accepted = self.spec.accepted, None
            if conn is not None:
                await loop.connect_accepted_socket(lambda: Session(self, greeted=True), conn)
            return
        if self.spec.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.path)
            self.server = await loop.create_unix_server(lambda: Session(self), self.spec.path)
            self.address = self.spec.path
        else:
            self.server = await loop.create_server(lambda: Session(self), self.spec.host,
                                                   self.spec.port)
            sock = self.server.sockets[0].getsockname()
            self.address = (sock[0], sock[1])

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for sess in list(self.sessions):
            sess.abort()
        with contextlib.suppress(Exception):
            await self.server.wait_closed()
        self.server = None
        if self.spec.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.path)

    # one client at a time
    def _arrived(self, sess: Session) -> None:
        self.sessions.add(sess)
        if self.active is None:
            self._activate(sess)
        else:
            sess.pause()
            self.waiting.append(sess)

    def _left(self, sess: Session) -> None:
        self.sessions.discard(sess)
        if sess in self.waiting:
            self.waiting.remove(sess)
        if self.active is sess:
            self.active = None
            while self.waiting:
                nxt = self.waiting.popleft()
                if not nxt.lost:
                    self._activate(nxt)
                    break

    def _activate(self, sess: Session) -> None:
        self.active = sess
        sess.begin()


class Session(asyncio.Protocol):
    """One connected QMP client."""

    def __init__(self, monitor: MonitorServer, greeted: bool = False) -> None:
        self.monitor = monitor
        self.greeted = greeted
        self.emu: Emulator = monitor.emu
        self.transport: asyncio.Transport | None = None
        self.core: QmpServerProtocol | None = None
        self.lost = False
        self._unsubscribe: Any = None
        self._held: list[bytes] = []
        self._writing_paused = False

    # ----- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.monitor._arrived(self)

    def data_received(self, data: bytes) -> None:
        if self.core is None or self._held:
            self._held.append(data)  # waiting for the monitor to be free, or for the client
            return                   # to read the replies it already has
        self._feed(data)

    def pause_writing(self) -> None:
        # the client is not reading its replies: stop reading its requests (QEMU does the
        # same), so an unread backlog cannot grow without bound
        self._writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.core is None:
            return
        held, self._held = self._held, []
        for i, chunk in enumerate(held):
            self._feed(chunk)
            if self._writing_paused:
                self._held = self._held + held[i + 1:]
                return
        if self.transport is not None and not self._writing_paused:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.monitor._left(self)

    # ----- session control -------------------------------------------------------------
    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def begin(self) -> None:
        # the schema and the command table load on the first request, not before the
        # greeting: a client connecting to a fresh process hears from it sooner
        self.core = QmpServerProtocol(
            self.emu.version_info(),
            has_command=lambda n: n in _registry() and _schema().has_command(n),
            allows_oob=lambda n: _schema().has_command(n) and _schema().allows_oob(n))
        if not self.greeted:
            self._write(self.core.greeting())
        self._unsubscribe = self.emu.bus.subscribe(self._on_event)
        if self.transport is not None:
            self.transport.resume_reading()
        held, self._held = self._held, []
        for chunk in held:
            self._feed(chunk)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ----- traffic ------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush(self) -> None:
        if self.core is not None:
            self._write(self.core.data_to_send())

    def _on_event(self, name: str, data: dict[str, Any] | None) -> None:
        if self.core is not None:
            self.core.send_event(name, data, self.emu.clock.wall())
            self._flush()

    def _feed(self, data: bytes) -> None:
        """Serve ``data`` in slices; once the client stops reading, keep the rest for later."""
        assert self.core is not None
        for pos in range(0, len(data), FEED_SLICE):
            if self._writing_paused:
                self._held.append(data[pos:])
                return
            for req in self.core.receive_data(data[pos:pos + FEED_SLICE]):
                self.dispatch(req)
                if self.emu.quitting:
                    break
            self._flush()
            if self.emu.quitting:
                self.emu.finish_quit()
                return

    def dispatch(self, req: Request) -> None:
        assert self.core is not None
        handler = _registry().get(req.name)
        try:
            if handler is None:
                raise SimError(f"The command {req.name} has not been found", "CommandNotFound")
            args = _schema().validate(req.name, req.arguments)
            self.emu.in_command = True
            try:
                value = handler(self.emu, args)
            finally:
                self.emu.in_command = False
                self.emu.run_jobs()
        except SimError as e:
            self.core.send_error(req, e.error_class, e.desc)
        except Exception as e:  # a bug in virtsim: say so in QEMU's terms, keep serving
            print(f"virtsim: internal error in {req.name}: {e!r}", file=sys.stderr)
            traceback.print_exc()
            self.core.send_error(req, "GenericError", f"virtsim internal error: {e}")
        else:
            if isinstance(value, asyncio.Future):
                self._answer_later(req, value)
            else:
                self.core.send_return(req, value)

    def _answer_later(self, req: Request, fut: asyncio.Future[Any]) -> None:
        """A command whose work waits on the simulated guest (a guest write while the
        guest agent has the filesystems frozen): answered when it is done, while the
        monitor keeps serving (its later replies may overtake this one)."""
        assert self.core is not None
        core = self.core
        core.detach(req)

        def done(f: asyncio.Future[Any]) -> None:
            if self.lost or core.closed or f.cancelled():
                return
            exc = f.exception()
            if isinstance(exc, SimError):
                core.send_error(req, exc.error_class, exc.desc)
            elif exc is not None:
                core.send_error(req, "GenericError", f"virtsim internal error: {exc}")
            else:
                core.send_return(req, f.result())
            self._flush()

        fut.add_done_callback(done)
