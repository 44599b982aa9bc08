"""A small synchronous NBD client, shaped like a :class:`virtsim.sim.image.store.Store`.

The block layer is synchronous, so blocking socket I/O is the simplest faithful choice:
one request in flight, simple replies only (QEMU negotiates structured replies, but what a
request returns — data or an errno — is the same either way).  The model stays pure: only
this package touches sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from . import wire as W

Buffer = bytes | bytearray | memoryview

# keep each request below the 32 MiB most servers accept
MAX_REQUEST = 32 << 20


class NbdError(Exception):
    """A handshake failure, with the server's message (becomes a blockdev-add error)."""


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def describe(self) -> str:
        return self.path


@dataclass(frozen=True)
class InetAddress:
    host: str
    port: str

    def describe(self) -> str:
        return f"{self.host}:{self.port}"


Address = UnixAddress | InetAddress


class _ReplyError(OSError):
    """An error the server replied with (as opposed to a broken transport)."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def connect(addr: Address, timeout: float | None = None) -> socket.socket:
    """Open the transport; raises OSError like QEMU's socket code would see it."""
    if isinstance(addr, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr.path)
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((addr.host, int(addr.port)), timeout=timeout)


class NbdClient:
    """One negotiated NBD connection to one export; also a Store for the image formats."""

    def __init__(self, addr: Address, export: str = "", *, readonly: bool = False,
                 timeout: float | None = 30.0) -> None:
        self.addr = addr
        self.export = export
        self.readonly = readonly
        self.filename = export_uri(addr, export)
        self._sock: socket.socket | None = connect(addr, timeout)
        self._handle = 0
        try:
            self._size, self.flags = self._handshake()
        except BaseException:
            self._sock.close()
            self._sock = None
            raise
        self.export_readonly = bool(self.flags & W.TF_READ_ONLY)

    # ----- wire ----------------------------------------------------------------------
    def _s(self) -> socket.socket:
        if self._sock is None:
            raise oserror(errno.EBADF)
        return self._sock

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        sock = self._s()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise oserror(errno.EIO)  # server went away mid-request
            buf += chunk
        return bytes(buf)

    def _handshake(self) -> tuple[int, int]:
        magic, opt, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != W.NBDMAGIC:
            raise NbdError("Bad initial magic received")
        if opt != W.IHAVEOPT:
            raise NbdError("Server does not support fixed newstyle negotiation")
        cflags = W.FLAG_FIXED_NEWSTYLE | (hflags & W.FLAG_NO_ZEROES)
        sock = self._s()
        sock.sendall(struct.pack(">I", cflags))
        name = self.export.encode()
        payload = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, W.INFO_BLOCK_SIZE)
        sock.sendall(struct.pack(">QII", W.IHAVEOPT, W.OPT_GO, len(payload)) + payload)
        size: int | None = None
        tflags = 0
        while True:
            rmagic, ropt, rtype, rlen = struct.unpack(">QIII", self._recv(20))
            data = self._recv(rlen) if rlen else b""
            if rmagic != W.OPT_REPLY_MAGIC or ropt != W.OPT_GO:
                raise NbdError("Unexpected option reply")
            if rtype & W.REP_ERR_BIT:
                if rtype == W.REP_ERR_UNKNOWN:  # QEMU drops the server's own message
                    raise NbdError("Requested export not available")
                msg = data.decode(errors="replace")
                raise NbdError(msg or f"Server rejected option NBD_OPT_GO ({rtype:#x})")
            if rtype == W.REP_INFO and len(data) >= 2:
                (itype,) = struct.unpack(">H", data[:2])
                if itype == W.INFO_EXPORT:
                    size, tflags = struct.unpack(">QH", data[2:12])
            elif rtype == W.REP_ACK:
                break
        if size is None:
            raise NbdError("Server did not send export information")
        return size, tflags

    def _request(self, cmd: int, offset: int, length: int, data: Buffer = b"",
                 flags: int = 0) -> bytes:
        """One request; a transport failure kills the connection and every later request
        fails with EIO (QEMU's nbd client without reconnect-delay does the same)."""
        if self._sock is None:
            raise oserror(errno.EIO)
        try:
            return self._exchange(cmd, offset, length, data, flags)
        except OSError as e:
            if isinstance(e, _ReplyError):
                raise OSError(e.errno, e.strerror) from None  # the connection is fine
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            raise oserror(errno.EIO) from None

    def _exchange(self, cmd: int, offset: int, length: int, data: Buffer,
                  flags: int) -> bytes:
        self._handle += 1
        hdr = struct.pack(">IHHQQI", W.REQUEST_MAGIC, flags, cmd, self._handle, offset, length)
        sock = self._s()
        sock.sendall(hdr + bytes(data) if len(data) < 65536 else hdr)
        if len(data) >= 65536:
            sock.sendall(data)
        if cmd == W.CMD_DISC:
            return b""
        magic, err, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != W.SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise ConnectionError("bad reply")
        if err:
            raise _ReplyError(W.wire_to_errno(err))
        return self._recv(length) if cmd == W.CMD_READ else b""

    # ----- Store ---------------------------------------------------------------------
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        """Read; the part past the export's end reads as zeros (Store contract)."""
        inside = max(0, min(length, self._size - offset))
        out = bytearray()
        pos = offset
        while len(out) < inside:
            n = min(MAX_REQUEST, inside - len(out))
            out += self._request(W.CMD_READ, pos, n)
            pos += n
        return bytes(out) + bytes(length - inside)

    def pwrite(self, offset: int, data: Buffer) -> None:
        if self.readonly:
            raise oserror(errno.EPERM)
        view = memoryview(bytes(data))
        for i in range(0, len(view), MAX_REQUEST):
            chunk = view[i:i + MAX_REQUEST]
            self._request(W.CMD_WRITE, offset + i, len(chunk), chunk)

    def _ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(offset + i, min(MAX_REQUEST, length - i)) for i in range(0, length, MAX_REQUEST)]

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """NBD_CMD_WRITE_ZEROES (plain zero writes when the server lacks it)."""
        if self.readonly:
            raise oserror(errno.EPERM)
        for off, n in self._ranges(offset, length):
            if self.flags & W.TF_SEND_WRITE_ZEROES:
                self._request(W.CMD_WRITE_ZEROES, off, n, flags=0 if unmap else W.CMD_FLAG_NO_HOLE)
            else:
                self._request(W.CMD_WRITE, off, n, bytes(n))

    def zero_range(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length, unmap=False)

    def punch_hole(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM: advisory, so a server without it simply keeps the data."""
        if self.readonly:
            raise oserror(errno.EPERM)
        if self.flags & W.TF_SEND_TRIM:
            for off, n in self._ranges(offset, length):
                self._request(W.CMD_TRIM, off, n)

    def flush(self) -> None:
        if self.flags & W.TF_SEND_FLUSH and not self.readonly:
            self._request(W.CMD_FLUSH, 0, 0)

    def truncate(self, size: int) -> None:
        """An export has a fixed size (NBD has no resize command)."""
        if size != self._size:
            raise oserror(errno.ENOTSUP)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Everything is data: this client does not negotiate base:allocation."""
        return [(offset, length, True)] if length > 0 else []

    def allocated_bytes(self) -> int:
        return 0

    def close(self) -> None:
        """Send NBD_CMD_DISC (best effort) and drop the connection."""
        if self._sock is None:
            return
        try:
            self._exchange(W.CMD_DISC, 0, 0, b"", 0)
        except OSError:
            pass
        finally:
            if self._sock is not None:
                self._sock.close()
            self._sock = None


def export_uri(addr: Address, export: str) -> str:
    """QEMU's nbd filename: ``nbd+unix:///EXPORT?socket=PATH`` / ``nbd://HOST:PORT/EXPORT``."""
    if isinstance(addr, UnixAddress):
        if export:
            return f"nbd+unix:///{export}?socket={addr.path}"
        return f"nbd+unix://?socket={addr.path}"
    if export:
        return f"nbd://{addr.host}:{addr.port}/{export}"
    return f"nbd://{addr.host}:{addr.port}"
