"""The server side of the NBD protocol as a sans-I/O state machine (QEMU 7.2's behaviour).

Bytes go in with :meth:`ServerConnection.receive_data`; :meth:`next_event` hands back what
the transport must act on (a request to serve, a STARTTLS upgrade, an export chosen, a
close); replies accumulate as buffers for :meth:`data_to_send`.  No sockets, no clock: the
asyncio adapter (``server.py``), the fuzz tests and replays all drive this same object.

Option negotiation follows QEMU's ``nbd_negotiate_options`` (fixed newstyle, TLS gate, the
option reply texts word for word); transmission follows ``nbd_co_receive_request`` /
``nbd_handle_request`` (validation order, EINVAL for refused requests, structured chunks,
one BLOCK_STATUS chunk per negotiated context with DONE on the last).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from . import wire as W

Buffer = bytes | bytearray | memoryview


# ----------------------------------------------------------------------------------------
# what the core needs from an export (implemented over the block graph by export.py)
# ----------------------------------------------------------------------------------------
class Export(Protocol):
    name: str
    description: str | None
    size: int
    nbdflags: int              # transmission flags without SEND_DF (added per client)
    allocation_depth: bool
    bitmap_names: list[str]    # in export order: context id META_ID_DIRTY_BITMAP + i

    def request_alignment(self) -> int: ...
    def max_transfer(self) -> int: ...
    def read(self, offset: int, length: int) -> Buffer: ...
    def read_map(self, offset: int, length: int) -> Iterator[tuple[int, bool]]:
        """(length, reads_as_zero) runs covering the range: what a sparse read uses."""
        ...
    def status_runs(self, context_id: int, offset: int, length: int
                    ) -> Iterator[tuple[int, int]]:
        """(length, flags) runs for one meta context (need not be merged)."""
        ...
    def write(self, offset: int, data: Buffer, fua: bool) -> None: ...
    def write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                     fast: bool) -> None: ...
    def trim(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def cache(self, offset: int, length: int) -> None: ...


class ExportTable(Protocol):
    def find_export(self, name: str) -> Export | None: ...
    def list_exports(self) -> Sequence[Export]: ...


# ----------------------------------------------------------------------------------------
# events
# ----------------------------------------------------------------------------------------
@dataclass
class Request:
    """One transmission-phase request; ``error`` is set when validation refused it."""

    handle: int
    type: int
    flags: int
    offset: int
    length: int
    data: Buffer | None = None
    error: tuple[int, str] | None = None
    #: QEMU had not read a WRITE's payload: after the error reply it disconnects
    incomplete: bool = False


@dataclass
class StartTls:
    """Replied ACK to NBD_OPT_STARTTLS: upgrade the transport, then :meth:`tls_started`."""


@dataclass
class Attached:
    """The client chose ``export`` (NBD_OPT_GO / NBD_OPT_EXPORT_NAME): transmission."""

    export: Export


@dataclass
class Closed:
    """Close the connection; ``error`` is what QEMU would error_report(), or None."""

    error: str | None = None


Event = Request | StartTls | Attached | Closed


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
class _OptError(Exception):
    """An option that fails with an error reply (negotiation goes on)."""

    def __init__(self, rep: int, msg: str) -> None:
        super().__init__(msg)
        self.rep = rep
        self.msg = msg


class _Fatal(Exception):
    """Negotiation cannot go on: QEMU drops the connection (with this message)."""


def sanitize_name(name: str) -> str:
    """``nbd_sanitize_name``: long names are cut to 80 characters plus '...'."""
    return name if len(name) < 80 else name[:80] + "..."


class _OptReader:
    """``nbd_opt_read`` over one option's payload, with QEMU's length errors."""

    def __init__(self, opt: int, payload: bytes) -> None:
        self.opt = opt
        self.buf = payload
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def _inconsistent(self) -> _OptError:
        return _OptError(W.REP_ERR_INVALID,
                         f"Inconsistent lengths in option {W.opt_name(self.opt)}")

    def take(self, n: int, check_nul: bool = False) -> bytes:
        if n > self.left:
            raise self._inconsistent()
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        if check_nul and b"\0" in data:
            raise _OptError(W.REP_ERR_INVALID,
                            f"Unexpected embedded NUL in option {W.opt_name(self.opt)}")
        return data

    def skip(self, n: int) -> None:
        if n > self.left:
            raise self._inconsistent()
        self.pos += n

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def name(self) -> str:
        n = self.u32()
        if n > W.MAX_STRING_SIZE:
            raise _OptError(W.REP_ERR_INVALID, f"Invalid name length: {n}")
        return self.take(n, check_nul=True).decode("utf-8", "surrogateescape")


def _reject_length(opt: int) -> _OptError:
    return _OptError(W.REP_ERR_INVALID, f"option '{W.opt_name(opt)}' has unexpected length")


@dataclass
class _Meta:
    """NBDExportMetaContexts: what SET_META_CONTEXT selected, for which export."""

    export: Export | None = None
    base_allocation: bool = False
    allocation_depth: bool = False
    bitmaps: list[bool] = field(default_factory=list)
    count: int = 0

    def ids(self) -> list[int]:
        out = []
        if self.base_allocation:
            out.append(W.META_ID_BASE_ALLOCATION)
        if self.allocation_depth:
            out.append(W.META_ID_ALLOCATION_DEPTH)
        out += [W.META_ID_DIRTY_BITMAP + i for i, on in enumerate(self.bitmaps) if on]
        return out


def _merge_runs(runs: Iterable[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """``nbd_extent_array_add``: join equal neighbours (up to 4 GiB - 1), stop at limit."""
    out: list[tuple[int, int]] = []
    for length, flags in runs:
        if length <= 0:
            continue
        if out and out[-1][1] == flags and out[-1][0] + length <= 0xFFFFFFFF:
            out[-1] = (out[-1][0] + length, flags)
            continue
        if len(out) >= limit:
            break
        out.append((length, flags))
    return out


# ----------------------------------------------------------------------------------------
# the connection
# ----------------------------------------------------------------------------------------
class ServerConnection:
    """One client of QEMU's NBD server, from the first byte to the close."""

    def __init__(self, table: ExportTable, *, tls: bool = False,
                 max_connections: int = 0) -> None:
        self.table = table
        self.tls_required = tls
        self.tls_active = False
        self._in = bytearray()
        self._out: list[Buffer] = []
        self.state = "client-flags"     # -> options -> (starttls) -> transmission -> closed
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self.meta = _Meta()
        self.export: Export | None = None
        self._pending: list[Event] = []
        self._out.append(W.HANDSHAKE.pack(W.NBDMAGIC, W.IHAVEOPT,
                                          W.FLAG_FIXED_NEWSTYLE | W.FLAG_NO_ZEROES))

    # ----- I/O surface ----------------------------------------------------------------------
    def receive_data(self, data: Buffer) -> None:
        if self.state not in ("closed", "closing"):
            self._in += data

    def data_to_send(self) -> list[Buffer]:
        out, self._out = self._out, []
        return out

    def tls_started(self) -> None:
        """The transport is now TLS: negotiation starts over inside it."""
        self.tls_active = True
        self.state = "options"

    def take_unread(self) -> bytes:
        """Bytes received after NBD_OPT_STARTTLS: the start of the client's TLS handshake,
        for the transport's TLS layer."""
        data = bytes(self._in)
        self._in.clear()
        return data

    def next_event(self) -> Event | _NeedData:
        if self._pending:
            return self._pending.pop(0)
        if self.state == "closed" or self.state == "starttls":
            return NEED_DATA
        try:
            while True:
                if self.state == "client-flags":
                    if len(self._in) < 4:
                        return NEED_DATA
                    self._client_flags(int.from_bytes(self._take(4), "big"))
                elif self.state == "options":
                    ev = self._option()
                    if ev is not None:
                        return ev
                    if self.state == "options" and not self._option_ready():
                        return NEED_DATA
                elif self.state == "transmission":
                    return self._request()
                else:
                    return NEED_DATA
        except _Fatal as e:
            return self._close(str(e) or None)

    # ----- negotiation ----------------------------------------------------------------------
    def _take(self, n: int) -> bytes:
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def _close(self, error: str | None) -> Closed:
        self.state = "closed"
        self._in.clear()
        return Closed(error)

    def _client_flags(self, flags: int) -> None:
        if flags & W.FLAG_C_FIXED_NEWSTYLE:
            self.fixed_newstyle = True
        if flags & W.FLAG_C_NO_ZEROES:
            self.no_zeroes = True
        rest = flags & ~(W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES)
        if rest:
            raise _Fatal(f"option negotiation failed: Unknown client flags 0x{rest:x} received")
        self.state = "options"

    def _option_ready(self) -> bool:
        if len(self._in) < 16:
            return False
        length = int.from_bytes(self._in[12:16], "big")
        return len(self._in) >= 16 + length

    def _option(self) -> Event | None:
        """Handle one whole option if buffered; None when more bytes are needed or after
        an option that only produced replies.  The header is checked field by field as
        it arrives (QEMU drops a bad magic before the rest of the header is sent)."""
        fail = "option negotiation failed: "
        if len(self._in) < 8:
            return None
        if int.from_bytes(self._in[:8], "big") != W.IHAVEOPT:
            raise _Fatal(fail + "Bad magic received")
        if len(self._in) < 16:
            return None
        _, opt, length = W.OPTION_HEADER.unpack_from(self._in)
        if length > W.MAX_BUFFER_SIZE:
            raise _Fatal(fail + f"len ({length} ) is larger than max len "
                                f"({W.MAX_BUFFER_SIZE})")
        if self.tls_required and not self.tls_active:
            if not self.fixed_newstyle:
                raise _Fatal(fail + f"Unsupported option 0x{opt:x}")
            if opt == W.OPT_EXPORT_NAME:
                raise _Fatal(fail + f"Option 0x{opt:x} not permitted before TLS")
        elif not self.fixed_newstyle and opt != W.OPT_EXPORT_NAME:
            raise _Fatal(fail + f"Unsupported option {opt} ({W.opt_name(opt)})")
        if opt == W.OPT_EXPORT_NAME and length > W.MAX_STRING_SIZE:
            raise _Fatal(fail + "Bad length received")
        if len(self._in) < 16 + length:
            return None
        del self._in[:16]
        payload = self._take(length)
        rd = _OptReader(opt, payload)
        try:
            ev = self._dispatch(opt, rd)
        except _OptError as e:
            self._rep(opt, e.rep, e.msg.encode())
            return None
        if rd.left and opt in (W.OPT_LIST_META_CONTEXT, W.OPT_SET_META_CONTEXT):
            # QEMU's meta context parser stops after the last query: whatever follows
            # in the option is read as the next option header
            self._in[:0] = rd.buf[rd.pos:]
        return ev

    def _eof_text(self, error: str | None) -> str | None:
        """What QEMU reports when the client hangs up here (``receive_eof``)."""
        eof = error or "Unexpected end-of-file before all data were read"
        fail = "option negotiation failed: "
        if self.state == "client-flags":
            return fail + "Failed to read flags: " + eof
        if self.state == "options":
            n = len(self._in)
            if n < 8:
                return fail + "Failed to read opts magic: " + eof
            if n < 12:
                return fail + "Failed to read option: " + eof
            if n < 16:
                return fail + "Failed to read option length: " + eof
            opt = int.from_bytes(self._in[8:12], "big")
            if opt == W.OPT_EXPORT_NAME and not self.tls_required:
                return fail + "Failed to read export name: " + eof
            return fail + eof
        if self.state == "transmission":
            # whole requests may still be buffered (the adapter stopped serving while
            # its output was backed up): the cut is where the stream ends
            pos, n = 0, len(self._in)
            while n - pos >= 28:
                _, _, typ, _, _, length = W.REQUEST.unpack_from(self._in, pos)
                pos += 28
                if typ == W.CMD_WRITE and length <= W.MAX_BUFFER_SIZE:
                    if n - pos < length:
                        return ("Disconnect client, due to: Failed to read CMD_WRITE "
                                "data: " + eof)
                    pos += length
            if error is not None:
                return "Disconnect client, due to: " + error
            if pos == n:
                return None
            return ("Disconnect client, due to: Unexpected end-of-file before all bytes "
                    "were read")
        return None

    def receive_eof(self, error: str | None = None) -> Closed | None:
        """The client's stream ended: cleanly, or with the transport's read ``error``
        (e.g. "Cannot read from TLS channel: Software caused connection abort", which
        replaces the end-of-file text).  The Closed to act on; None once closed."""
        if self.state == "closed":
            return None
        return self._close(self._eof_text(error))

    def _rep(self, opt: int, rep: int, payload: bytes = b"") -> None:
        self._out.append(W.OPTION_REPLY.pack(W.OPT_REPLY_MAGIC, opt, rep, len(payload))
                         + payload)

    def _dispatch(self, opt: int, rd: _OptReader) -> Event | None:
        if self.tls_required and not self.tls_active:
            if opt == W.OPT_STARTTLS:
                if rd.left:
                    raise _Fatal("option negotiation failed: option 'starttls' has "
                                 "unexpected length")
                self._rep(opt, W.REP_ACK)
                self.state = "starttls"
                return StartTls()
            self._rep(opt, W.REP_ERR_TLS_REQD,
                      f"Option 0x{opt:x} not permitted before TLS".encode())
            if opt == W.OPT_ABORT:
                return self._close(None)
            return None
        if opt == W.OPT_EXPORT_NAME:
            return self._export_name(rd)
        if opt == W.OPT_LIST:
            if rd.left:
                raise _reject_length(opt)
            for exp in self.table.list_exports():
                name = exp.name.encode("utf-8", "surrogateescape")
                desc = (exp.description or "").encode("utf-8", "surrogateescape")
                self._rep(opt, W.REP_SERVER, len(name).to_bytes(4, "big") + name + desc)
            self._rep(opt, W.REP_ACK)
            return None
        if opt == W.OPT_ABORT:
            self._rep(opt, W.REP_ACK)
            return self._close(None)
        if opt in (W.OPT_INFO, W.OPT_GO):
            return self._info(opt, rd)
        if opt == W.OPT_STARTTLS:
            if rd.left:
                raise _reject_length(opt)
            if self.tls_active:
                raise _OptError(W.REP_ERR_INVALID, "TLS already enabled")
            raise _OptError(W.REP_ERR_POLICY, "TLS not configured")
        if opt == W.OPT_STRUCTURED_REPLY:
            if rd.left:
                raise _reject_length(opt)
            if self.structured:
                raise _OptError(W.REP_ERR_INVALID, "structured reply already negotiated")
            self._rep(opt, W.REP_ACK)
            self.structured = True
            return None
        if opt in (W.OPT_LIST_META_CONTEXT, W.OPT_SET_META_CONTEXT):
            self._meta_queries(opt, rd)
            return None
        raise _OptError(W.REP_ERR_UNSUP, f"Unsupported option {opt} ({W.opt_name(opt)})")

    def _export_name(self, rd: _OptReader) -> Event:
        name = rd.take(rd.left).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        exp = self.table.find_export(name)
        if exp is None:
            raise _Fatal("option negotiation failed: export not found")
        flags = exp.nbdflags | (W.TF_SEND_DF if self.structured else 0)
        reply = exp.size.to_bytes(8, "big") + flags.to_bytes(2, "big")
        if not self.no_zeroes:
            reply += bytes(124)
        self._out.append(reply)
        return self._attach(exp)

    def _attach(self, exp: Export) -> Attached:
        self.export = exp
        if self.meta.export is not exp:      # nbd_check_meta_export
            self.meta.count = 0
        self.state = "transmission"
        return Attached(exp)

    def _info(self, opt: int, rd: _OptReader) -> Event | None:
        namelen = rd.u32()
        if namelen > W.MAX_STRING_SIZE:
            raise _OptError(W.REP_ERR_INVALID, f"Invalid name length: {namelen}")
        raw = rd.take(namelen, check_nul=True)
        name = raw.decode("utf-8", "surrogateescape")
        sendname = blocksize = False
        for _ in range(rd.u16()):
            req = rd.u16()
            if req == W.INFO_NAME:
                sendname = True
            elif req == W.INFO_BLOCK_SIZE:
                blocksize = True
        if rd.left:
            raise _reject_length(opt)
        exp = self.table.find_export(name)
        if exp is None:
            raise _OptError(W.REP_ERR_UNKNOWN, f"export '{sanitize_name(name)}' not present")
        if sendname:
            self._rep(opt, W.REP_INFO, W.INFO_NAME.to_bytes(2, "big") + raw)
        if exp.description:
            desc = exp.description.encode("utf-8", "surrogateescape")
            self._rep(opt, W.REP_INFO, W.INFO_DESCRIPTION.to_bytes(2, "big") + desc)
        align = exp.request_alignment()
        minimum = align if (opt == W.OPT_INFO or blocksize) else 1
        sizes = struct.pack(">HIII", W.INFO_BLOCK_SIZE, minimum, max(4096, minimum),
                            min(exp.max_transfer(), W.MAX_BUFFER_SIZE))
        self._rep(opt, W.REP_INFO, sizes)
        flags = exp.nbdflags | (W.TF_SEND_DF if self.structured else 0)
        self._rep(opt, W.REP_INFO, struct.pack(">HQH", W.INFO_EXPORT, exp.size, flags))
        if opt == W.OPT_INFO and not blocksize and align > 1:
            raise _OptError(W.REP_ERR_BLOCK_SIZE_REQD,
                            "request NBD_INFO_BLOCK_SIZE to use this export")
        self._rep(opt, W.REP_ACK)
        if opt == W.OPT_GO:
            return self._attach(exp)
        return None

    def _meta_queries(self, opt: int, rd: _OptReader) -> None:
        listing = opt == W.OPT_LIST_META_CONTEXT
        if not listing and not self.structured:
            raise _OptError(W.REP_ERR_INVALID, f"request option '{W.opt_name(opt)}' when "
                                               "structured reply is not negotiated")
        meta = _Meta()
        if not listing:            # SET forgets the previous selection even if it fails
            self.meta = meta
        name = rd.name()
        exp = self.table.find_export(name)
        if exp is None:
            raise _OptError(W.REP_ERR_UNKNOWN, f"export '{sanitize_name(name)}' not present")
        meta.export = exp
        meta.bitmaps = [False] * len(exp.bitmap_names)
        queries = rd.u32()
        if listing and queries == 0:
            meta.base_allocation = True
            meta.allocation_depth = exp.allocation_depth
            meta.bitmaps = [True] * len(exp.bitmap_names)
        else:
            for _ in range(queries):
                qlen = rd.u32()
                if qlen > W.MAX_STRING_SIZE:
                    rd.skip(qlen)
                    continue
                query = rd.take(qlen, check_nul=True).decode("utf-8", "surrogateescape")
                self._meta_query(meta, exp, query, listing)
        names = []
        if meta.base_allocation:
            names.append((W.META_ID_BASE_ALLOCATION, "base:allocation"))
        if meta.allocation_depth:
            names.append((W.META_ID_ALLOCATION_DEPTH, "qemu:allocation-depth"))
        for i, on in enumerate(meta.bitmaps):
            if on:
                names.append((W.META_ID_DIRTY_BITMAP + i,
                              f"qemu:dirty-bitmap:{exp.bitmap_names[i]}"))
        for cid, ctx in names:
            self._rep(opt, W.REP_META_CONTEXT,
                      (0 if listing else cid).to_bytes(4, "big") + ctx.encode())
        self._rep(opt, W.REP_ACK)
        if not listing:
            meta.count = len(names)

    @staticmethod
    def _meta_query(meta: _Meta, exp: Export, query: str, listing: bool) -> None:
        if query.startswith("base:"):
            rest = query[5:]
            if (not rest and listing) or rest == "allocation":
                meta.base_allocation = True
            return
        if not query.startswith("qemu:"):
            return
        rest = query[5:]
        if not rest:
            if listing:
                meta.allocation_depth = exp.allocation_depth
                meta.bitmaps = [True] * len(exp.bitmap_names)
            return
        if rest == "allocation-depth":
            meta.allocation_depth = exp.allocation_depth
            return
        if rest.startswith("dirty-bitmap:"):
            bm = rest[len("dirty-bitmap:"):]
            if not bm:
                if listing:
                    meta.bitmaps = [True] * len(exp.bitmap_names)
                return
            for i, name in enumerate(exp.bitmap_names):
                if name == bm:
                    meta.bitmaps[i] = True
                    return

    # ----- transmission ---------------------------------------------------------------------
    def _request(self) -> Event | _NeedData:
        if len(self._in) < 28:
            return NEED_DATA
        magic, flags, typ, handle, offset, length = W.REQUEST.unpack_from(self._in)
        if magic != W.REQUEST_MAGIC:
            # Debian's 7.2 answers it (EINVAL, with the handle as sent), then hangs up
            del self._in[:28]
            self.state = "closing"
            return Request(handle, typ, flags, offset, length, incomplete=True,
                           error=(errno.EINVAL, f"invalid magic (got 0x{magic:x})"))
        if typ == W.CMD_DISC:
            return self._close(None)
        req = Request(handle, typ, flags, offset, length)
        too_big = (typ in (W.CMD_READ, W.CMD_WRITE, W.CMD_CACHE)
                   and length > W.MAX_BUFFER_SIZE)
        if typ == W.CMD_WRITE and not too_big:
            if len(self._in) < 28 + length:
                return NEED_DATA
            req.data = bytes(self._in[28:28 + length])
            del self._in[:28 + length]
        else:
            del self._in[:28]
        req.error = self._validate(req, too_big)
        if too_big and typ == W.CMD_WRITE:
            req.incomplete = True
        return req

    def _validate(self, req: Request, too_big: bool) -> tuple[int, str] | None:
        exp = self.export
        assert exp is not None
        if too_big:
            return errno.EINVAL, (f"len ({req.length} ) is larger than max len "
                                  f"({W.MAX_BUFFER_SIZE})")
        if exp.nbdflags & W.TF_READ_ONLY and req.type in (W.CMD_WRITE, W.CMD_WRITE_ZEROES,
                                                           W.CMD_TRIM):
            return errno.EROFS, "Export is read-only"
        if req.offset > exp.size or req.length > exp.size - req.offset:
            err = errno.ENOSPC if req.type in (W.CMD_WRITE, W.CMD_WRITE_ZEROES) \
                else errno.EINVAL
            return err, (f"operation past EOF; From: {req.offset}, Len: {req.length}, "
                         f"Size: {exp.size}")
        valid = W.CMD_FLAG_FUA
        if req.type == W.CMD_READ and self.structured:
            valid |= W.CMD_FLAG_DF
        elif req.type == W.CMD_WRITE_ZEROES:
            valid |= W.CMD_FLAG_NO_HOLE | W.CMD_FLAG_FAST_ZERO
        elif req.type == W.CMD_BLOCK_STATUS:
            valid |= W.CMD_FLAG_REQ_ONE
        if req.flags & ~valid:
            return errno.EINVAL, (f"unsupported flags for command {W.cmd_name(req.type)} "
                                  f"(got 0x{req.flags:x})")
        return None

    # ----- replies --------------------------------------------------------------------------
    def serve(self, req: Request) -> Closed | None:
        """Carry out ``req`` on the export and queue its reply; a Closed when QEMU would
        drop the client afterwards."""
        try:
            if req.error is not None:
                # nbd_trip answers a refused request with EINVAL and the refusal's text
                self._generic(req.handle, errno.EINVAL, req.error[1])
                if req.incomplete:
                    return self._close("Disconnect client, due to: Request handling "
                                       "failed in intermediate state")
                return None
            return self._handle(req)
        except _Fatal as e:
            return self._close(str(e))

    def _generic(self, handle: int, err: int, msg: str) -> None:
        """nbd_send_generic_reply: an error chunk with text when structured, else simple."""
        if self.structured and err:
            text = msg.encode()
            payload = struct.pack(">IH", W.errno_to_wire(err), len(text)) + text
            self._chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_ERROR, handle, payload)
        else:
            self._out.append(W.SIMPLE_REPLY.pack(W.SIMPLE_REPLY_MAGIC,
                                                 W.errno_to_wire(err) if err else 0, handle))

    def _chunk(self, flags: int, typ: int, handle: int, payload: Buffer,
               extra: Buffer | None = None) -> None:
        size = len(payload) + (len(extra) if extra is not None else 0)
        self._out.append(W.CHUNK_HEADER.pack(W.STRUCTURED_REPLY_MAGIC, flags, typ, handle,
                                             size) + payload)
        if extra is not None and len(extra):
            self._out.append(extra)

    def _handle(self, req: Request) -> Closed | None:
        exp = self.export
        assert exp is not None
        h, typ = req.handle, req.type

        def run(fn: Callable[[], None], what: str) -> None:
            # nbd_send_generic_reply: the errno travels, the text is just ``what``
            try:
                fn()
            except OSError as e:
                self._generic(h, e.errno or errno.EIO, what)
                return
            self._generic(h, 0, "")

        if typ == W.CMD_READ:
            return self._read(req)
        if typ == W.CMD_WRITE:
            assert req.data is not None
            run(lambda: exp.write(req.offset, req.data or b"", bool(req.flags & W.CMD_FLAG_FUA)),
                "writing to file failed")
        elif typ == W.CMD_WRITE_ZEROES:
            run(lambda: exp.write_zeroes(req.offset, req.length,
                                         not req.flags & W.CMD_FLAG_NO_HOLE,
                                         bool(req.flags & W.CMD_FLAG_FUA),
                                         bool(req.flags & W.CMD_FLAG_FAST_ZERO)),
                "writing to file failed")
        elif typ == W.CMD_FLUSH:
            run(exp.flush, "flush failed")
        elif typ == W.CMD_TRIM:
            def trim() -> None:
                exp.trim(req.offset, req.length)
                if req.flags & W.CMD_FLAG_FUA:
                    exp.flush()
            run(trim, "discard failed")
        elif typ == W.CMD_CACHE:
            run(lambda: exp.cache(req.offset, req.length), "caching data failed")
        elif typ == W.CMD_BLOCK_STATUS:
            self._block_status(req)
        else:
            self._generic(h, errno.EINVAL, f"invalid request type ({typ}) received")
        return None

    def _read(self, req: Request) -> Closed | None:
        exp = self.export
        assert exp is not None
        h = req.handle
        if req.flags & W.CMD_FLAG_FUA:
            try:
                exp.flush()
            except OSError as e:
                self._generic(h, e.errno or errno.EIO, "flush failed")
                return None
        if self.structured and not req.flags & W.CMD_FLAG_DF and req.length:
            return self._sparse_read(req)
        try:
            data = exp.read(req.offset, req.length)
        except OSError as e:
            self._generic(h, e.errno or errno.EIO, "reading from file failed")
            return None
        if self.structured:
            if req.length:
                self._chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_OFFSET_DATA, h,
                            req.offset.to_bytes(8, "big"), data)
            else:
                self._chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_NONE, h, b"")
        else:
            self._out.append(W.SIMPLE_REPLY.pack(W.SIMPLE_REPLY_MAGIC, 0, h))
            if len(data):
                self._out.append(data)
        return None

    def _sparse_read(self, req: Request) -> Closed | None:
        """nbd_co_send_sparse_read: one chunk per allocation run, DONE on the last."""
        exp = self.export
        assert exp is not None
        h, pos, end = req.handle, req.offset, req.offset + req.length
        try:
            runs = list(exp.read_map(req.offset, req.length))
        except OSError as e:
            msg = f"unable to check for holes: {_strerror(e)}"
            self._generic(h, e.errno or errno.EIO, msg)
            return None
        for length, is_zero in runs:
            length = min(length, end - pos)
            if length <= 0:
                break
            final = W.REPLY_FLAG_DONE if pos + length >= end else 0
            if is_zero:
                self._chunk(final, W.REPLY_TYPE_OFFSET_HOLE, h,
                            struct.pack(">QI", pos, length))
            else:
                try:
                    data = exp.read(pos, length)
                except OSError as e:
                    # QEMU 7.2 gives up on the whole reply and drops the client
                    raise _Fatal("Disconnect client, due to: Failed to send reply: reading "
                                 f"from file failed: {_strerror(e)}") from None
                self._chunk(final, W.REPLY_TYPE_OFFSET_DATA, h, pos.to_bytes(8, "big"), data)
            pos += length
        return None

    def _block_status(self, req: Request) -> None:
        exp = self.export
        assert exp is not None
        h = req.handle
        if not req.length:
            self._generic(h, errno.EINVAL, "need non-zero length")
            return
        if not self.meta.count:
            self._generic(h, errno.EINVAL, "CMD_BLOCK_STATUS not negotiated")
            return
        limit = 1 if req.flags & W.CMD_FLAG_REQ_ONE else W.MAX_BLOCK_STATUS_EXTENTS
        ids = self.meta.ids()
        for n, cid in enumerate(ids):
            last = n == len(ids) - 1
            try:
                flat = getattr(exp, "status_flat", None)
                values = flat(cid, req.offset, req.length, limit) if flat else None
                if values is None:
                    extents = _merge_runs(exp.status_runs(cid, req.offset, req.length),
                                          limit)
                    values = [v for ext in extents for v in ext]
            except OSError as e:
                text = b"can't get block status"
                payload = struct.pack(">IH", W.errno_to_wire(e.errno or errno.EIO),
                                      len(text)) + text
                # QEMU 7.2 marks the error chunk DONE yet goes on with the remaining
                # contexts: a client that asked for several sees chunks after DONE
                self._chunk(W.REPLY_FLAG_DONE, W.REPLY_TYPE_ERROR, h, payload)
                continue
            body = struct.pack(f">I{len(values)}I", cid, *values)
            self._chunk(W.REPLY_FLAG_DONE if last else 0, W.REPLY_TYPE_BLOCK_STATUS, h, body)


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)
