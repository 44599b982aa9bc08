"""The asyncio side of the NBD server: listening socket, connections, TLS upgrade.

Thin on purpose: every protocol decision is in ``protocol.ServerConnection``; this module
moves bytes, enforces ``max-connections`` the way QEMU does (it stops accepting while the
limit is reached, so extra clients wait in the listen backlog), drops clients that do not
finish the handshake within 10 s (Debian 7.2's CVE-2024-7409 backport), and upgrades the
transport for NBD_OPT_STARTTLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

from . import protocol as proto
from .export import NbdExport

#: nbd-server-start's handshake limit in Debian's 7.2 (NBD_DEFAULT_HANDSHAKE_MAX_SECS)
HANDSHAKE_MAX_SECS = 10.0
#: Debian's 7.2 default for max-connections (NBD_DEFAULT_MAX_CONNECTIONS)
DEFAULT_MAX_CONNECTIONS = 100
#: stop reading a client's requests while this much reply data waits to be sent
_HIGH_WATER = 64 << 20


class NbdServer:
    """One ``nbd-server-start``: a listener plus the exports it serves."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, max_connections: int = 0,
                 warn: Callable[[str], None] | None = None,
                 on_client_gone: Callable[[NbdExport], None] | None = None) -> None:
        self.tls = tls
        #: tls-authz: given the client's certificate, an error text to refuse it
        self.tls_check: Callable[[dict[str, Any] | None], str | None] | None = None
        self.max_connections = max_connections
        self.warn = warn or (lambda msg: None)
        self.on_client_gone = on_client_gone or (lambda exp: None)
        self.exports: list[NbdExport] = []        # by name, oldest first (QEMU's list)
        self.clients: set[NbdClientProtocol] = set()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self.unix_path: str | None = None
        self.address: Any = None

    # ----- export table (protocol.ExportTable) -------------------------------------------
    def find_export(self, name: str) -> NbdExport | None:
        for exp in self.exports:
            if exp.name == name:
                return exp
        return None

    def list_exports(self) -> list[NbdExport]:
        return list(self.exports)

    # ----- listening ---------------------------------------------------------------------
    def listen_unix(self, path: str) -> None:
        """Bind like QEMU's unix_listen_saddr: a stale socket file is replaced."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.path.exists(path) and not os.path.isdir(path):
                    os.unlink(path)
            try:
                sock.bind(path)
            except OSError as e:
                raise OSError(e.errno, f"Failed to bind socket to {path}: "
                                       f"{os.strerror(e.errno or errno.EIO)}") from None
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        self.unix_path = path
        self.address = path
        self._serve(sock)

    def listen_inet(self, host: str, port: str, ipv4: bool | None = None,
                    ipv6: bool | None = None) -> None:
        family = socket.AF_UNSPEC
        if ipv4 and not ipv6:
            family = socket.AF_INET
        elif ipv6 and not ipv4:
            family = socket.AF_INET6
        try:
            infos = socket.getaddrinfo(host or None, port, family, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise OSError(errno.EINVAL, f"address resolution failed for {host}:{port}: "
                                        f"{e.strerror}") from None
        last: OSError | None = None
        for fam, typ, prot, _, addr in infos:
            sock = socket.socket(fam, typ, prot)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
                sock.listen(socket.SOMAXCONN)
            except OSError as e:
                sock.close()
                last = e
                continue
            self.address = sock.getsockname()[:2]
            self._serve(sock)
            return
        err = last.errno if last and last.errno else errno.EADDRNOTAVAIL
        raise OSError(err, f"Failed to bind socket: {os.strerror(err)}")

    def _serve(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._update_watch()

    def _update_watch(self) -> None:
        """nbd_update_server_watch: accept only while under max-connections."""
        if self._sock is None or self._loop is None:
            return
        want = not self.max_connections or len(self.clients) < self.max_connections
        if want and not self._accepting:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._accepting = True
        elif not want and self._accepting:
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False

    def _accept(self) -> None:
        assert self._sock is not None and self._loop is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.warn(f"NBD server: accept failed: {e}")
            return
        conn.setblocking(False)
        proto_ = NbdClientProtocol(self)
        self.clients.add(proto_)
        self._update_watch()
        task = self._loop.create_task(self._connect(conn, proto_))
        proto_.task = task

    async def _connect(self, conn: socket.socket, proto_: NbdClientProtocol) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(lambda: proto_, sock=conn)
        except OSError:
            conn.close()
            self._client_done(proto_)

    def _client_done(self, client: NbdClientProtocol) -> None:
        self.clients.discard(client)
        exp = client.export
        if exp is not None:
            exp.clients.discard(client)
            self.on_client_gone(exp)
        self._update_watch()

    def close(self) -> None:
        """Stop listening and drop every client (nbd-server-stop)."""
        if self._sock is not None:
            if self._accepting and self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
                self._accepting = False
            self._sock.close()
            self._sock = None
            if self.unix_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.unix_path)
        for client in list(self.clients):
            client.close(hard=True)


class NbdClientProtocol(asyncio.Protocol):
    """One client connection: feeds the sans-I/O core and writes what it produces."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.conn = proto.ServerConnection(server, tls=server.tls is not None)
        self.transport: asyncio.Transport | None = None
        self.export: NbdExport | None = None
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._upgrading = False

    # ----- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.set_write_buffer_limits(high=_HIGH_WATER)  # type: ignore[attr-defined]
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_MAX_SECS,
                                                            self._handshake_timeout)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
        if self.conn.state != "closed" and self.conn.state != "transmission":
            self.server.warn("option negotiation failed: Unexpected end-of-file before "
                             "all data were read")
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.server._client_done(self)

    def pause_writing(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    # ----- driving the core -------------------------------------------------------------------
    def _pump(self) -> None:
        while not self._closed and not self._upgrading:
            ev = self.conn.next_event()
            if ev is proto.NEED_DATA:
                break
            if isinstance(ev, proto.Request):
                closed = self.conn.serve(ev)
                self._flush()
                if closed is not None:
                    self._end(closed)
                    return
            elif isinstance(ev, proto.Attached):
                self._flush()
                self._attach(ev.export)
            elif isinstance(ev, proto.StartTls):
                self._flush()
                self._upgrading = True
                asyncio.get_running_loop().create_task(self._start_tls())
                return
            elif isinstance(ev, proto.Closed):
                self._end(ev)
                return
        self._flush()

    def _attach(self, exp: Any) -> None:
        assert isinstance(exp, NbdExport)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.export = exp
        exp.clients.add(self)

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self._closed:
            self.transport.writelines(out)

    def _end(self, ev: proto.Closed) -> None:
        self._flush()
        if ev.error:
            self.server.warn(ev.error)
        self.close()

    async def _start_tls(self) -> None:
        assert self.server.tls is not None and self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(self.transport, self, self.server.tls,
                                       server_side=True)
        except (ssl.SSLError, OSError, ConnectionError) as e:
            self.server.warn(f"option negotiation failed: TLS handshake failed: {e}")
            self.close()
            return
        if new is None:
            self.close()
            return
        self.transport = new
        if self.server.tls_check is not None:
            err = self.server.tls_check(new.get_extra_info("peercert"))
            if err is not None:
                self.server.warn(f"option negotiation failed: {err}")
                self.close(hard=True)
                return
        self._upgrading = False
        self.conn.tls_started()
        self._pump()

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.conn.state not in ("transmission", "closed"):
            self.server.warn("option negotiation failed: handshake timed out")
            self.close()

    def close(self, hard: bool = False) -> None:
        """End the connection: after what is queued (a protocol close), or at once
        (``hard``: client_close with shutdown, pending replies abandoned)."""
        if self.transport is None:
            self._closed = True
            return
        if hard:
            self.transport.abort()
        elif not self.transport.is_closing():
            self.transport.close()
