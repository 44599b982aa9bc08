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
_HIGH_WATER = 4 << 20


class NbdServer:
    """One ``nbd-server-start``: a listener plus the exports it serves."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, max_connections: int = 0,
                 warn: Callable[[str], None] | None = None,
                 on_client_gone: Callable[[NbdExport], None] | None = None) -> None:
        self._tls: ssl.SSLContext | None = None
        #: verify-peer: a client certificate is required (checked after the handshake)
        self.verify_peer = False
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

    @property
    def tls(self) -> ssl.SSLContext | None:
        return self._tls

    @tls.setter
    def tls(self, ctx: ssl.SSLContext | None) -> None:
        """QEMU (GnuTLS) finishes the handshake without a client certificate and refuses
        the client afterwards ("Verify failed: ..."), so the client sees the connection
        end rather than a handshake alert: ask for the certificate, check it ourselves."""
        if ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED:
            ctx.verify_mode = ssl.CERT_OPTIONAL
            self.verify_peer = True
        elif ctx is not None and ctx.verify_mode == ssl.CERT_NONE:
            self.verify_peer = False
        self._tls = ctx

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
        with contextlib.suppress(OSError):  # whole replies fit: fewer wakeups per request
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
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


def _reason(e: ssl.SSLError) -> str:
    return str(getattr(e, "reason", "") or "")


#: OpenSSL reasons for bytes that are no TLS record a server expects
_UNEXPECTED_PACKET = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST",
                      "UNKNOWN_PROTOCOL", "UNEXPECTED_MESSAGE", "UNEXPECTED_RECORD",
                      "EXCESSIVE_MESSAGE_SIZE", "PACKET_LENGTH_TOO_LONG", "LENGTH_MISMATCH",
                      "BAD_PACKET_LENGTH", "RECORD_LENGTH_MISMATCH", "WRONG_SSL_VERSION",
                      "UNSUPPORTED_PROTOCOL", "BAD_RECORD_TYPE"}


def _gnutls_text(e: ssl.SSLError) -> str:
    """The gnutls_strerror() QEMU prints for the TLS handshake failures clients cause
    (observed on 7.2.22); OpenSSL's own text for anything else."""
    if isinstance(e, ssl.SSLEOFError):
        return "The TLS connection was non-properly terminated."
    if _reason(e) in _UNEXPECTED_PACKET:
        return "An unexpected TLS packet was received."
    return _reason(e) or str(e)


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
        self._write_paused = False
        #: after NBD_OPT_STARTTLS: TLS done here over memory BIOs (QEMU's qio_channel_tls);
        #: loop.start_tls cannot take the handshake bytes that came with the option
        self._ssl: ssl.SSLObject | None = None
        self._bio_in = ssl.MemoryBIO()
        self._bio_out = ssl.MemoryBIO()
        self._close_notify = False

    # ----- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: no Transport subclass
        transport.set_write_buffer_limits(high=_HIGH_WATER)  # type: ignore[attr-defined]
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_MAX_SECS,
                                                            self._handshake_timeout)
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._ssl is not None:
            self._tls_received(data)
            return
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
        if self._ssl is not None and self._upgrading:
            self._fail("option negotiation failed: TLS handshake failed: The TLS connection "
                       "was non-properly terminated.")
            return None
        error = None
        if self._ssl is not None and not self._close_notify:
            # GnuTLS: GNUTLS_E_PREMATURE_TERMINATION, which QEMU turns into ECONNABORTED
            error = "Cannot read from TLS channel: Software caused connection abort"
        closed = self.conn.receive_eof(error)
        if closed is not None and closed.error and not self._closed:
            self.server.warn(closed.error)
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, ConnectionResetError) and not self._closed:
            # QEMU always has a read pending, so a reset shows up as that read's error
            if self._ssl is not None and self._upgrading:
                self.conn.receive_eof()
                self.server.warn("option negotiation failed: TLS handshake failed: Error in "
                                 "the pull function.")
            else:
                error = ("Cannot read from TLS channel: Input/output error" if self._ssl
                         else f"Unable to read from socket: {os.strerror(errno.ECONNRESET)}")
                closed = self.conn.receive_eof(error)
                if closed is not None and closed.error:
                    self.server.warn(closed.error)
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.server._client_done(self)

    def pause_writing(self) -> None:
        """Too much reply data queued: stop reading *and* stop serving requests that are
        already buffered (a client pipelining many large reads must not make us build
        all their replies at once)."""
        self._write_paused = True
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()
            self._pump()

    # ----- driving the core -------------------------------------------------------------------
    def _pump(self) -> None:
        while not self._closed and not self._upgrading and not self._write_paused:
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
                self._start_tls()
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
        if not out or self.transport is None or self._closed:
            return
        if self._ssl is None:
            self.transport.writelines(out)
            return
        for buf in out:
            view = memoryview(buf)
            while view:
                view = view[self._ssl.write(view):]
        self._tls_send()

    def _end(self, ev: proto.Closed) -> None:
        self._flush()
        if ev.error:
            self.server.warn(ev.error)
        self.close()

    # ----- TLS ------------------------------------------------------------------------------
    def _start_tls(self) -> None:
        assert self.server.tls is not None
        self._ssl = self.server.tls.wrap_bio(self._bio_in, self._bio_out, server_side=True)
        self._upgrading = True
        self._tls_received(self.conn.take_unread())

    def _tls_send(self) -> None:
        data = self._bio_out.read()
        if data and self.transport is not None and not self._closed:
            self.transport.write(data)

    def _tls_received(self, data: bytes) -> None:
        assert self._ssl is not None
        if data:
            self._bio_in.write(data)
        if self._upgrading:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._tls_send()
                return
            except ssl.SSLError as e:
                # nothing more is sent: GnuTLS sends no alert here either
                self._bio_out.read()
                if _reason(e) == "CERTIFICATE_VERIFY_FAILED":
                    # libnbd (GnuTLS) withholds a certificate the server's CAs did not
                    # issue, so QEMU sees none: its text, after a finished handshake
                    self._fail("option negotiation failed: Verify failed: No certificate "
                               "was found.", hard=True)
                else:
                    self._fail("option negotiation failed: TLS handshake failed: "
                               + _gnutls_text(e))
                return
            self._tls_send()
            if not self._tls_accepted():
                return
            self._upgrading = False
            self.conn.tls_started()
        plain = bytearray()
        while True:
            try:
                chunk = self._ssl.read(1 << 18)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._close_notify = True
                break
            except ssl.SSLError:
                self._tls_send()
                closed = self.conn.receive_eof("Cannot read from TLS channel: Input/output "
                                               "error")
                if closed is not None and closed.error:
                    self.server.warn(closed.error)
                self.close(hard=True)
                return
            if not chunk:                # close_notify (SSLObject reads it as b"")
                self._close_notify = True
                break
            plain += chunk
        self._tls_send()
        if plain:
            self.conn.receive_data(plain)
        self._pump()
        if self._close_notify and not self._closed:
            self.eof_received()          # GnuTLS reports close_notify as end-of-file

    def _tls_accepted(self) -> bool:
        """qcrypto_tls_session_check_credentials, then tls-authz."""
        assert self._ssl is not None
        peercert = self._ssl.getpeercert()
        err = None
        if self.server.verify_peer and not peercert:
            err = "Verify failed: No certificate was found."
        elif self.server.tls_check is not None:
            err = self.server.tls_check(peercert)
        if err is not None:
            self._fail(f"option negotiation failed: {err}", hard=True)
            return False
        return True

    def _fail(self, text: str, hard: bool = False) -> None:
        self.conn.receive_eof()          # the core is done with this client
        self.server.warn(text)
        self.close(hard=hard)

    def _handshake_timeout(self) -> None:
        """QEMU shuts the socket down: the pending read fails as at end-of-file, and
        that read's error is what gets reported."""
        self._timer = None
        if self._ssl is not None and self._upgrading:
            self._fail("option negotiation failed: TLS handshake failed: The TLS connection "
                       "was non-properly terminated.", hard=True)
        elif self.conn.state not in ("transmission", "closed"):
            # after the shutdown GnuTLS sees the stream end without close_notify
            closed = self.conn.receive_eof(
                "Cannot read from TLS channel: Software caused connection abort"
                if self._ssl is not None else None)
            if closed is not None and closed.error:
                self.server.warn(closed.error)
            self.close(hard=True)

    def close(self, hard: bool = False) -> None:
        """End the connection: after what is queued (a protocol close), or at once
        (``hard``: client_close with shutdown, pending replies abandoned)."""
        if self.transport is None:
            self._closed = True
            return
        if hard:
            # client_close(force): qio_channel_shutdown(BOTH) first, so the peer reads a
            # clean end-of-stream (not a reset) even with its next request unread here
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    # asyncio's socket wrapper refuses shutdown(): use a duplicate
                    with socket.socket(fileno=os.dup(sock.fileno())) as dup:
                        dup.shutdown(socket.SHUT_RDWR)
            self.transport.abort()
        elif not self.transport.is_closing():
            self.transport.close()
