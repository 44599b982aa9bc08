"""Guest I/O: the qemu-io command language as QEMU 7.2's HMP ``qemu-io`` runs it, and
seeded simulated guest workloads.

Backup tools and their tests make guest writes through ``human-monitor-command``
``qemu-io [-d] DEVICE "COMMAND"`` and match on what comes back, so both layers are
reproduced as QEMU 7.2 behaves (all texts below were observed on the real binary):

* the HMP argument parser (quoting, escapes, the 1023-byte buffer, its error replies);
* qemu-io's command table, GNU getopt handling (options may follow operands), size
  suffixes and fractions, and every check with its message and output stream.

Where each text goes matters: qemu-io prints results and most errors on QEMU's *stdout*,
unknown-command and argument-count errors on *stderr*, and only ``error_report`` /
``warn_report`` texts (device lookup, permission failures, deprecation warnings) land in
the HMP reply.  Parsing is pure: the caller executes the returned :class:`GuestOp` s on
its block layer and asks each op for the text qemu-io would print, given the outcome and
a duration (so output does not depend on the wall clock).
"""

from __future__ import annotations

import errno
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from .errors import SimError

#: Largest request the block layer accepts (``BDRV_REQUEST_MAX_BYTES``).
BDRV_REQUEST_MAX_BYTES = 2147483136
#: Size of HMP's argument buffer; longer strings are cut to one byte less.
HMP_ARG_BUFFER = 1024

_C_SPACE = " \t\n\v\f\r"
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1


# --------------------------------------------------------------------------- HMP layer


class HmpQemuIo(NamedTuple):
    """A parsed ``qemu-io`` HMP command line."""

    use_device: bool  # -d: DEVICE is a qdev id or QOM path, not a BlockBackend/node name
    device: str
    command: str


class HmpError(NamedTuple):
    """The HMP parser refused the line: ``reply`` is the monitor's answer (CRLF line
    ends, as human-monitor-command returns it); ``stdout`` what it printed on stdout."""

    reply: str
    stdout: str = ""


def hmp_text(text: str) -> str:
    """The monitor turns every LF into CRLF."""
    return text.replace("\n", "\r\n")


def hmp_error_reply(desc: str) -> str:
    """How HMP reports an ``Error`` (``hmp_handle_error``)."""
    return hmp_text(f"Error: {desc}\n")


def node_not_found_reply(name: str) -> str:
    """Reply when ``DEVICE`` is neither a BlockBackend nor a node name."""
    return hmp_error_reply(f"Cannot find device='' nor node-name='{name}'")


def qdev_not_found_reply(path: str) -> str:
    """Reply for ``-d`` when nothing is at the qdev id / QOM path."""
    return hmp_error_reply(f"Device '{path}' not found")


def qdev_not_a_device_reply(path: str) -> str:
    """Reply for ``-d`` when the QOM path names an object that is not a device."""
    return hmp_error_reply(f"{path} is not a hotpluggable device")


def qdev_no_backend_reply() -> str:
    """Reply for ``-d`` when the device has no block backend."""
    return hmp_error_reply("Device does not have a block device backend")


def _hmp_fail(message: str) -> str:
    return hmp_text(f"{message}\nTry \"help qemu-io\" for more information\n")


def _skip_space(s: str, p: int) -> int:
    while p < len(s) and s[p] in _C_SPACE:
        p += 1
    return p


def _truncate_arg(text: str) -> str:
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) < HMP_ARG_BUFFER:
        return text
    return raw[: HMP_ARG_BUFFER - 1].decode("utf-8", "replace")


_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def _get_str(s: str, p: int) -> tuple[str | None, int, str]:
    """HMP's ``get_str``: a bare word or a double-quoted string with \\n \\r \\\\ \\' \\"
    escapes.  Returns (value or None on error, new position, text printed on stdout)."""
    if s[p] != '"':
        q = p
        while q < len(s) and s[q] not in _C_SPACE:
            q += 1
        return _truncate_arg(s[p:q]), q, ""
    p += 1
    out: list[str] = []
    while p < len(s) and s[p] != '"':
        if s[p] == "\\":
            c = s[p + 1] if p + 1 < len(s) else "\0"
            p += 2
            if c not in _ESCAPES:
                return None, p, f"unsupported escape code: '\\{c}'\n"
            out.append(_ESCAPES[c])
        else:
            out.append(s[p])
            p += 1
    if p >= len(s):
        return None, p, "unterminated string\n"
    return _truncate_arg("".join(out)), p + 1, ""


def parse_hmp_qemu_io_args(args: str) -> HmpQemuIo | HmpError:
    """Parse what follows ``qemu-io`` on an HMP line (args_type ``-d``, ``B``, ``s``)."""
    s = args
    p = _skip_space(s, 0)
    use_device = False
    if p < len(s) and s[p] == "-":
        opt = s[p + 1] if p + 1 < len(s) else ""
        if opt != "d":
            # QEMU prints the character with %c; a missing one is a NUL that ends the text.
            text = f"qemu-io: unsupported option -{opt}"
            tail = "\n" if opt else ""
            return HmpError(hmp_text(f"{text}{tail}Try \"help qemu-io\" for more information\n"))
        use_device = True
        p += 2
    p = _skip_space(s, p)
    if p >= len(s):
        return HmpError(_hmp_fail("qemu-io: block device name expected"))
    device, p, printed = _get_str(s, p)
    if device is None:
        return HmpError(_hmp_fail("qemu-io: block device name expected"), printed)
    p = _skip_space(s, p)
    if p >= len(s):
        return HmpError(_hmp_fail("qemu-io: string expected"))
    command, p, printed = _get_str(s, p)
    if command is None:
        return HmpError(_hmp_fail("qemu-io: string expected"), printed)
    p = _skip_space(s, p)
    if p < len(s):
        return HmpError(_hmp_fail("qemu-io: extraneous characters at the end of line"))
    return HmpQemuIo(use_device, device, command)


def parse_hmp_qemu_io(line: str) -> HmpQemuIo | HmpError:
    """Parse a whole HMP command line that starts with ``qemu-io``.

    The caller then resolves the device: without ``-d`` a BlockBackend name first, then a
    node name (failure: :func:`node_not_found_reply`); with ``-d`` a qdev id relative to
    ``/machine/peripheral`` or an absolute QOM path (failures: :func:`qdev_not_found_reply`,
    :func:`qdev_not_a_device_reply`, :func:`qdev_no_backend_reply`).
    """
    p = _skip_space(line, 0)
    q = p
    while q < len(line) and line[q] != "/" and line[q] not in _C_SPACE:
        q += 1
    if line[p:q] != "qemu-io":
        raise ValueError(f"not a qemu-io command line: {line!r}")
    return parse_hmp_qemu_io_args(line[q:])


# --------------------------------------------------------------------------- numbers


_SUFFIX = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_HEX = "0123456789abcdefABCDEF"
_FRACTION = re.compile(r"\.(\d+)([eE][+-]?\d+)?")


def _suffix_mul(c: str) -> int:
    shift = _SUFFIX.get(c.upper()) if c else None
    return -1 if shift is None else 1 << shift


def _strtou64(s: str, base: int) -> tuple[int, int, int]:
    """glibc ``strtoull`` as QEMU's ``qemu_strtou64`` wraps it: (value, end, error) with
    error 0, -EINVAL (nothing converted; end is 0) or -ERANGE (overflow)."""
    p = _skip_space(s, 0)
    negative = p < len(s) and s[p] == "-"
    if p < len(s) and s[p] in "+-":
        p += 1
    digits = "0123456789" if base == 10 else _HEX
    if base == 16 and s[p:p + 2] in ("0x", "0X") and s[p + 2:p + 3] in tuple(_HEX):
        p += 2
    q = p
    while q < len(s) and s[q] in digits:
        q += 1
    if q == p:
        if base == 16 and s[p:p + 1] == "0":  # "0x" without hex digits parses the "0"
            return 0, p + 1, 0
        return 0, 0, -errno.EINVAL
    value = int(s[p:q], base)
    if value > _UINT64_MAX:
        return _UINT64_MAX, q, -errno.ERANGE
    return ((-value) & _UINT64_MAX if negative else value), q, 0


def parse_size(text: str, warnings: list[str] | None = None) -> int:
    """qemu-io's ``cvtnum``: QEMU's ``qemu_strtosz`` with 1024-based suffixes B K M G T P E
    (either case), decimal fractions with a suffix ("1.5k"), hex without fractions, and a
    result that must fit in int64.  Raises ``ValueError`` with qemu-io's message.

    Hex numbers followed by a suffix still work but QEMU warns; the warning text (which
    QEMU puts in the HMP reply) is appended to ``warnings``.
    """
    code, end, value = _strtosz(text, warnings)
    if end < len(text):  # anything left unparsed makes the whole argument invalid
        code = -errno.EINVAL
    if code == 0 and value > _INT64_MAX:
        code = -errno.ERANGE
    if code == -errno.ERANGE:
        raise ValueError(f"Parsing error: argument too large -- {text}")
    if code:
        raise ValueError("Parsing error: non-numeric argument, or extraneous/unrecognized "
                         f"suffix -- {text}")
    return value


def _strtosz(s: str, warnings: list[str] | None) -> tuple[int, int, int]:
    """(error, end, value) of QEMU's ``do_strtosz`` before its trailing-text check."""
    val, end, code = _strtou64(s, 10)
    if code:
        return code, end, 0
    if "-" in s[:end]:
        return -errno.EINVAL, 0, 0
    fraction = 0
    if val == 0 and s[end:end + 1] in ("x", "X"):
        val, end, code = _strtou64(s, 16)
        if code:
            return code, end, 0
        if s[end:end + 1] == ".":
            return -errno.EINVAL, 0, 0
        if _suffix_mul(s[end:end + 1]) > 0 and warnings is not None:
            warnings.append(f"Using a multiplier suffix on hex numbers is deprecated: {s}")
    elif s[end:end + 1] == ".":
        m = _FRACTION.match(s, end)
        if m is None:
            end += 1  # "1." or "1.k": no fractional digits
        elif m.group(2):
            return -errno.EINVAL, 0, 0  # exponents are refused
        else:
            fraction = int(float("0." + m.group(1)) * 2.0**64)  # 64-bit fixed point
            end = m.end()
    mul = _suffix_mul(s[end:end + 1])
    if mul > 0:
        end += 1
    if mul <= 1:
        if fraction:
            return -errno.EINVAL, 0, 0  # a fraction needs a unit larger than a byte
        return 0, end, val
    frac = fraction * mul
    result = val * mul + (frac >> 64) + ((frac & _UINT64_MAX) >> 63)  # round half up
    if result > _UINT64_MAX:
        return -errno.ERANGE, end, 0
    return 0, end, result


_STRTOL0 = re.compile(r"[" + _C_SPACE + r"]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _strtol0(arg: str) -> int | None:
    """``strtol(arg, &end, 0)`` that must consume the whole argument (hex, octal or
    decimal, optional sign), else None."""
    m = _STRTOL0.fullmatch(arg)
    if m is None:
        return None
    body = m.group(2)
    base = 16 if body[:2] in ("0x", "0X") else 8 if body.startswith("0") else 10
    value = int(body, base)
    return -value if m.group(1) == "-" else value


def _parse_pattern(arg: str) -> int | None:
    """A ``-P`` pattern: a whole byte value."""
    value = _strtol0(arg)
    return value if value is not None and 0 <= value <= 255 else None


# --------------------------------------------------------------------------- reporting


_UNITS = ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB"))


def _cvtstr(value: float) -> str:
    """qemu-io's human size: three decimals in the largest binary unit, ".000" dropped."""
    text, unit = _cfmt("%f", value), " bytes"
    for shift, name in _UNITS:
        if value >= float(1 << shift):
            text, unit = _cfmt("%.3f", value / float(1 << shift)), name
            break
    cut = text.find(".000")
    return (text[:cut] if cut >= 0 else text) + unit


def _cfmt(fmt: str, value: float) -> str:
    """printf of a double; glibc prints the NaN of 0.0/0.0 as "-nan"."""
    if value != value:
        return "-nan"
    return fmt % value


def _tdiv(value: float, seconds: int, nanos: int) -> float:
    elapsed = float(seconds) + float(nanos) / 1e9
    if elapsed == 0.0:
        return float("inf") if value else float("nan")
    return value / elapsed


def _timestr(seconds: int, nanos: int, verbose: bool) -> str:
    frac = nanos / 1e9
    if verbose or seconds:
        hours, minutes, secs = seconds // 3600, (seconds % 3600) // 60, seconds % 60
        return f"{hours}:{minutes:02d}:{secs + frac:05.2f}"
    return f"{frac:05.2f} sec"


def report_line(op: str, offset: int, count: int, total: int, ops: int, duration_ns: int,
                csv: bool = False) -> str:
    """qemu-io's ``print_report``: the two result lines (or one line with ``-C``)."""
    seconds, nanos = divmod(max(duration_ns, 0), 1_000_000_000)
    ts = _timestr(seconds, nanos, csv)
    rate = _tdiv(float(total), seconds, nanos)
    per = _tdiv(float(ops), seconds, nanos)
    if csv:
        return f"{total},{ops},{ts},{_cfmt('%.3f', rate)},{_cfmt('%.3f', per)}\n"
    return (f"{op} {total}/{count} bytes at offset {offset}\n"
            f"{_cvtstr(float(total))}, {ops} ops; {ts} ({_cvtstr(rate)}/sec and "
            f"{_cfmt('%.4f', per)} ops/sec)\n")


def _dump(data: bytes, offset: int) -> str:
    lines = []
    for i in range(0, len(data), 16):
        row = data[i:i + 16]
        hexes = "".join(f"{b:02x} " for b in row)
        text = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in row)
        lines.append(f"{offset + i:08x}:  {hexes} {text}\n")
    return "".join(lines)


@dataclass(frozen=True)
class Report:
    """How qemu-io prints the outcome of one op."""

    verb: str  # "wrote", "read", "discard"
    failure: str  # prefix of the "<failure> failed: <strerror>" line
    quiet: bool = False  # -q
    csv: bool = False  # -C
    dump: bool = False  # -v
    #: aio_write -z never starts its stopwatch, so QEMU reports the monotonic clock's
    #: reading as the duration; pass that reading as ``duration_ns`` to reproduce it.
    clock_since_boot: bool = False


@dataclass(frozen=True)
class GuestOp:
    """One request a guest sends to its disk (or a qemu-io step).

    ``kind`` is one of ``write``, ``zero``, ``discard``, ``flush``, ``read``, ``drain``
    (aio_flush), ``vmstate-write``/``vmstate-read`` (``-b``: the VM state area, not the
    disk), ``sleep`` and ``length``.  Writes and zero writes dirty every granule they
    touch in every enabled bitmap of the node; so do discards, but only on a node opened
    with ``discard=unmap`` (otherwise QEMU drops them before its dirty tracking).
    """

    kind: str
    offset: int = 0
    length: int = 0
    pattern: int | None = None  # byte written, or byte expected by a verifying read
    fua: bool = False  # -f
    unmap: bool = False  # zero: -u
    no_fallback: bool = False  # zero: -n
    compressed: bool = False  # write -c
    source_file: str | None = None  # write -s: data repeats this host file's bytes
    verify: tuple[int, int] | None = None  # read -P: (offset in the read, length)
    milliseconds: int = 0  # sleep
    report: Report | None = None

    def data(self, source: bytes | None = None) -> bytes:
        """The bytes the write puts on the disk: the pattern byte repeated, or for
        ``write -s`` the file's ``source`` bytes repeated to the length.

        Reading that file is the caller's job; QEMU reports an unreadable file as
        ``"<path>: <strerror>"`` and an empty one as ``"<path>: file is empty"``, both on
        stderr, and then writes nothing.
        """
        if source is not None:
            if not source:
                raise ValueError("empty source file")
            return (source * (self.length // len(source) + 1))[: self.length]
        return bytes([self.pattern if self.pattern is not None else 0xCD]) * self.length

    def render(self, duration_ns: int = 0, error: int | None = None,
               data: bytes | None = None, size: int | None = None) -> str:
        """What qemu-io prints on stdout once the op has run.

        ``error`` is the errno of a failed request; ``data`` the bytes a read returned
        (needed for ``-P`` verification and ``-v`` dumps); ``size`` the disk length for
        ``length``.
        """
        rep = self.report
        if self.kind == "length":
            if error:
                return f"getlength: {os.strerror(error)}\n"
            return f"{_cvtstr(float(size or 0))}\n"
        if rep is None:
            return ""
        if error:
            return f"{rep.failure} failed: {os.strerror(error)}\n"
        out = []
        if self.verify is not None and data is not None:
            voff, vlen = self.verify
            expect = bytes([self.pattern or 0]) * vlen
            if data[voff:voff + vlen] != expect:
                out.append(f"Pattern verification failed at offset {self.offset + voff}, "
                           f"{vlen} bytes\n")
        if rep.quiet:
            return "".join(out)
        if rep.dump and data is not None:
            out.append(_dump(data, self.offset))
        out.append(report_line(rep.verb, self.offset, self.length, self.length, 1,
                               duration_ns, rep.csv))
        return "".join(out)

    def to_qemu_io(self) -> str:
        """The qemu-io command doing this op, e.g. to replay a workload on real QEMU."""
        if self.kind == "write":
            flags = "".join(f for f, on in (("f", self.fua), ("c", self.compressed)) if on)
            opts = f"-{flags} " if flags else ""
            if self.source_file is not None:
                opts += f"-s {self.source_file} "
            elif self.pattern is not None:
                opts += f"-P 0x{self.pattern:02x} "
            return f"write {opts}{self.offset} {self.length}"
        if self.kind == "zero":
            flags = "z" + "".join(f for f, on in (("u", self.unmap), ("n", self.no_fallback),
                                                  ("f", self.fua)) if on)
            return f"write -{flags} {self.offset} {self.length}"
        if self.kind == "discard":
            return f"discard {self.offset} {self.length}"
        if self.kind == "read":
            pat = f"-P 0x{self.pattern:02x} " if self.pattern is not None else ""
            return f"read {pat}{self.offset} {self.length}"
        if self.kind in ("flush", "length"):
            return self.kind
        if self.kind == "drain":
            return "aio_flush"
        if self.kind == "sleep":
            return f"sleep {self.milliseconds}"
        raise ValueError(f"no qemu-io command for {self.kind}")


@dataclass
class QemuIoCommand:
    """The result of parsing one qemu-io command line.

    Run ``ops`` in order and print each op's :meth:`GuestOp.render` after ``stdout``.
    ``stderr`` goes to QEMU's stderr, ``reply`` into the HMP reply.  ``unsupported``
    names a known qemu-io command the model does not emulate (alloc, map, info, ...).
    """

    ops: list[GuestOp] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    reply: str = ""
    unsupported: str | None = None


# --------------------------------------------------------------------------- qemu-io


class _Cmd(NamedTuple):
    name: str
    alt: str | None
    argmin: int
    argmax: int  # -1: no limit
    args: str | None
    oneline: str
    writes: bool  # needs the BLK_PERM_WRITE permission


_COMMANDS = [
    _Cmd("abort", None, 0, 0, None, "simulate a program crash using abort(3)", False),
    _Cmd("aio_flush", None, 0, 0, None, "completes all outstanding aio requests", False),
    _Cmd("aio_read", None, 2, -1, "[-Ciqv] [-P pattern] off len [len..]",
         "asynchronously reads a number of bytes", False),
    _Cmd("aio_write", None, 2, -1, "[-Cfiquz] [-P pattern] off len [len..]",
         "asynchronously writes a number of bytes", True),
    _Cmd("alloc", "a", 1, 2, "offset [count]", "checks if offset is allocated in the file",
         False),
    _Cmd("break", None, 2, 2, "event tag",
         "sets a breakpoint on event and tags the stopped request as tag", False),
    _Cmd("discard", "d", 2, -1, "[-Cq] off len",
         "discards a number of bytes at a specified offset", True),
    _Cmd("flush", "f", 0, 0, None, "flush all in-core file state to disk", False),
    _Cmd("help", "?", 0, 1, "[command]", "help for one or all commands", False),
    _Cmd("info", "i", 0, 0, None, "prints information about the current file", False),
    _Cmd("length", "l", 0, 0, None, "gets the length of the current file", False),
    _Cmd("map", None, 0, 0, "", "prints the allocated areas of a file", False),
    _Cmd("read", "r", 2, -1, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
         "reads a number of bytes at a specified offset", False),
    _Cmd("readv", None, 2, -1, "[-Cqv] [-P pattern] off len [len..]",
         "reads a number of bytes at a specified offset", False),
    _Cmd("remove_break", None, 1, 1, "tag", "remove a breakpoint by tag", False),
    _Cmd("reopen", None, 0, -1, "[(-r|-w)] [-c cache] [-o options]",
         "reopens an image with new options", False),
    _Cmd("resume", None, 1, 1, "tag", "resumes the request tagged as tag", False),
    _Cmd("sigraise", None, 1, 1, "signal", "raises a signal", False),
    _Cmd("sleep", None, 1, 1, None, "waits for the given value in milliseconds", False),
    _Cmd("truncate", "t", 1, 3, "[-m prealloc_mode] off",
         "truncates the current file at the given offset", True),
    _Cmd("wait_break", None, 1, 1, "tag", "waits for the suspension of a request", False),
    _Cmd("write", "w", 2, -1, "[-bcCfnquz] [-P pattern | -s source_file] off len",
         "writes a number of bytes at a specified offset", True),
    _Cmd("writev", None, 2, -1, "[-Cfq] [-P pattern] off len [len..]",
         "writes a number of bytes at a specified offset", True),
]
_BY_NAME = {c.name: c for c in _COMMANDS} | {c.alt: c for c in _COMMANDS if c.alt}


def _usage(cmd: _Cmd) -> str:
    return f"{cmd.name} {cmd.args} -- {cmd.oneline}\n"


def _help_line(name: str, cmd: _Cmd) -> str:
    args = f"{cmd.args} " if cmd.args is not None else ""
    return f"{name} {args}-- {cmd.oneline}\n"


class _Abort(Exception):
    """Stop the command; what it printed is already in the result."""


class _Ctx:
    """Per-command output collection and the helpers every qemu-io command shares."""

    def __init__(self, cmd: _Cmd, argv: list[str]) -> None:
        self.cmd = cmd
        self.argv = argv
        self.res = QemuIoCommand()
        self.warnings: list[str] = []

    def out(self, text: str) -> None:
        self.res.stdout += text

    def fail(self, text: str) -> None:
        self.out(text)
        raise _Abort

    def usage(self) -> None:
        self.fail(_usage(self.cmd))

    def getopt(self, optstring: str) -> tuple[list[tuple[str, str]], list[str]]:
        """GNU getopt over argv[1:]: options may follow operands (they are permuted),
        ``--`` ends options, flags cluster and arguments may be attached.  Scanning stops
        at the first error, returned as ``("?", glibc's message)``; the command prints it
        on stderr when it gets there (see :meth:`bad_option`)."""
        opts: list[tuple[str, str]] = []
        rest: list[str] = []
        args = self.argv[1:]
        i = 0
        while i < len(args):
            a = args[i]
            i += 1
            if a == "--":
                rest.extend(args[i:])
                break
            if len(a) < 2 or a[0] != "-":
                rest.append(a)
                continue
            j = 1
            while j < len(a):
                c = a[j]
                j += 1
                pos = optstring.find(c) if c != ":" else -1
                if pos < 0:
                    opts.append(("?", f"{self.argv[0]}: invalid option -- '{c}'\n"))
                    return opts, rest
                if optstring[pos + 1:pos + 2] != ":":
                    opts.append((c, ""))
                    continue
                if j < len(a):
                    opts.append((c, a[j:]))
                elif i < len(args):
                    opts.append((c, args[i]))
                    i += 1
                else:
                    opts.append(("?", f"{self.argv[0]}: option requires an argument "
                                      f"-- '{c}'\n"))
                    return opts, rest
                break
        return opts, rest

    def bad_option(self, message: str) -> None:
        """getopt's complaint on stderr, then the command's usage on stdout."""
        self.res.stderr += message
        self.usage()

    def num(self, text: str) -> int:
        try:
            return parse_size(text, self.warnings)
        except ValueError as exc:
            self.fail(f"{exc}\n")
            raise AssertionError from None  # unreachable: fail() raises

    def pattern(self, text: str) -> int:
        value = _parse_pattern(text)
        if value is None:
            self.fail(f"{text} is not a valid pattern byte\n")
        assert value is not None
        return value

    def iovec(self, lengths: list[str]) -> int:
        """``create_iovec``: each length and the total within the request limit."""
        total = 0
        for arg in lengths:
            n = self.num(arg)
            if n > BDRV_REQUEST_MAX_BYTES:
                self.fail(f"Argument '{arg}' exceeds maximum size {BDRV_REQUEST_MAX_BYTES}\n")
            if total > BDRV_REQUEST_MAX_BYTES - n:
                self.fail("The total number of bytes exceed the maximum size "
                          f"{BDRV_REQUEST_MAX_BYTES}\n")
            total += n
        return total

    def sector_aligned(self, offset: int, count: int) -> None:
        if offset % 512:
            self.fail(f"{offset} is not a sector-aligned value for 'offset'\n")
        if count % 512:
            self.fail(f"{count} is not a sector-aligned value for 'count'\n")


def _read(c: _Ctx) -> None:
    opts, rest = c.getopt("bCl:pP:qs:v")
    flags: set[str] = set()
    pattern, voff, vlen = 0, 0, 0
    for o, arg in opts:
        if o == "?":
            c.bad_option(arg)
        elif o == "P":
            flags.add("P")
            pattern = c.pattern(arg)
        elif o == "l":
            flags.add("l")
            vlen = c.num(arg)
        elif o == "s":
            flags.add("s")
            voff = c.num(arg)
        else:
            flags.add(o)
    if len(rest) != 2:
        c.usage()
    offset = c.num(rest[0])
    count = c.num(rest[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        c.fail(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {rest[1]}\n")
    if "P" not in flags and ("l" in flags or "s" in flags):
        c.usage()
    if "l" not in flags:
        vlen = count - voff
    if vlen < 0 or vlen + voff > count:
        c.fail("pattern verification range exceeds end of read data\n")
    if "b" in flags:
        c.sector_aligned(offset, count)
    rep = Report("read", "read", "q" in flags, "C" in flags, "v" in flags)
    kind = "vmstate-read" if "b" in flags else "read"
    verify = (voff, vlen) if "P" in flags else None
    c.res.ops.append(GuestOp(kind, offset, count, pattern if verify else None,
                             verify=verify, report=rep))


def _vectored(c: _Ctx, optstring: str, write: bool, aio: bool) -> None:
    """readv, writev, aio_read and aio_write share operand and iovec handling."""
    opts, rest = c.getopt(optstring)
    flags: set[str] = set()
    pattern: int | None = None
    for o, arg in opts:
        if o == "?":
            c.bad_option(arg)
        elif o == "P":
            pattern = c.pattern(arg)
            if not write:
                flags.add("P")
        elif o == "i":
            c.fail(f"injecting invalid {'write' if write else 'read'} request\n")
        else:
            flags.add(o)
    if len(rest) < 2:
        c.usage()
    zero = "z" in flags
    if zero and len(rest) != 2:
        c.fail("-z supports only a single length parameter\n")
    if "u" in flags and not zero:
        c.fail("-u requires -z to be specified\n")
    offset = c.num(rest[0])
    quiet, csv = "q" in flags, "C" in flags
    if write:
        failure = "aio_write" if aio else "writev"
        if zero:
            count = c.num(rest[1])
            rep = Report("wrote", failure, quiet, csv, clock_since_boot=True)
            c.res.ops.append(GuestOp("zero", offset, count, fua="f" in flags,
                                     unmap="u" in flags, report=rep))
            return
        count = c.iovec(rest[1:])
        rep = Report("wrote", failure, quiet, csv)
        c.res.ops.append(GuestOp("write", offset, count, 0xCD if pattern is None else pattern,
                                 fua="f" in flags, report=rep))
        return
    count = c.iovec(rest[1:])
    rep = Report("read", "readv", quiet, csv, "v" in flags)
    verify = (0, count) if "P" in flags else None
    c.res.ops.append(GuestOp("read", offset, count, pattern if verify else None,
                             verify=verify, report=rep))


def _write(c: _Ctx) -> None:
    opts, rest = c.getopt("bcCfnpP:qs:uz")
    flags: set[str] = set()
    pattern, source = 0xCD, None
    for o, arg in opts:
        if o == "?":
            c.bad_option(arg)
        elif o == "P":
            flags.add("P")
            pattern = c.pattern(arg)
        elif o == "s":
            flags.add("s")
            source = arg
        else:
            flags.add(o)
    if len(rest) != 2:
        c.usage()
    zero, vmstate, compressed = "z" in flags, "b" in flags, "c" in flags
    if vmstate and zero:
        c.fail("-b and -z cannot be specified at the same time\n")
    if "f" in flags and (vmstate or compressed):
        c.fail("-f and -b or -c cannot be specified at the same time\n")
    if "n" in flags and not zero:
        c.fail("-n requires -z to be specified\n")
    if "u" in flags and not zero:
        c.fail("-u requires -z to be specified\n")
    if len(flags & {"z", "P", "s"}) > 1:
        c.fail("Only one of -z, -P, and -s can be specified at the same time\n")
    offset = c.num(rest[0])
    count = c.num(rest[1])
    if count > BDRV_REQUEST_MAX_BYTES and "n" not in flags:
        c.fail(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, given {rest[1]}\n")
    if vmstate or compressed:
        c.sector_aligned(offset, count)
    rep = Report("wrote", "write", "q" in flags, "C" in flags)
    if zero:
        op = GuestOp("zero", offset, count, fua="f" in flags, unmap="u" in flags,
                     no_fallback="n" in flags, report=rep)
    else:
        op = GuestOp("vmstate-write" if vmstate else "write", offset, count,
                     None if source is not None else pattern, fua="f" in flags,
                     compressed=compressed, source_file=source, report=rep)
    c.res.ops.append(op)


def _discard(c: _Ctx) -> None:
    opts, rest = c.getopt("Cq")
    flags = set()
    for o, arg in opts:
        if o == "?":
            c.bad_option(arg)
        flags.add(o)
    if len(rest) != 2:
        c.usage()
    offset = c.num(rest[0])
    count = c.num(rest[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        c.fail(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {rest[1]}\n")
    rep = Report("discard", "discard", "q" in flags, "C" in flags)
    c.res.ops.append(GuestOp("discard", offset, count, report=rep))


def _sleep(c: _Ctx) -> None:
    value = _strtol0(c.argv[1])
    if value is None or value < 0:
        c.fail(f"{c.argv[1]} is not a valid number\n")
    assert value is not None
    c.res.ops.append(GuestOp("sleep", milliseconds=value))


def _help(c: _Ctx) -> None:
    if len(c.argv) == 1:
        c.out("".join(_help_line(cmd.name, cmd) for cmd in _COMMANDS))
        c.out("\nUse 'help commandname' for extended help.\n")
        return
    cmd = _BY_NAME.get(c.argv[1])
    if cmd is None:
        c.fail(f"command {c.argv[1]} not found\n")
    assert cmd is not None
    # Only the synopsis line; the extended help paragraphs are not reproduced.
    c.out(_help_line(c.argv[1], cmd))


_RUNNERS: dict[str, Callable[[_Ctx], None]] = {
    "read": _read,
    "readv": lambda c: _vectored(c, "CP:qv", write=False, aio=False),
    "aio_read": lambda c: _vectored(c, "CP:iqv", write=False, aio=True),
    "writev": lambda c: _vectored(c, "CfqP:", write=True, aio=False),
    "aio_write": lambda c: _vectored(c, "CfiqP:uz", write=True, aio=True),
    "write": _write,
    "discard": _discard,
    "flush": lambda c: c.res.ops.append(GuestOp("flush")),
    "aio_flush": lambda c: c.res.ops.append(GuestOp("drain")),
    "length": lambda c: c.res.ops.append(GuestOp("length")),
    "sleep": _sleep,
    "help": _help,
}


def parse_qemu_io(command: str,
                  acquire_write: Callable[[], str | None] | None = None) -> QemuIoCommand:
    """Parse one qemu-io command as QEMU 7.2 runs it on an HMP ``qemu-io`` line.

    ``acquire_write`` is called, after the argument count check and before anything else,
    when the command needs write permission on the node; it returns the text QEMU's
    permission failure puts in the HMP reply (e.g. "Block node is read-only"), or None.
    """
    argv = [w for w in command.split(" ") if w]
    if not argv:
        return QemuIoCommand()
    cmd = _BY_NAME.get(argv[0])
    if cmd is None:
        return QemuIoCommand(stderr=f'command "{argv[0]}" not found\n')
    nargs = len(argv) - 1
    if nargs < cmd.argmin or (cmd.argmax != -1 and nargs > cmd.argmax):
        if cmd.argmax == -1:
            expect = f"at least {cmd.argmin} arguments"
        elif cmd.argmin == cmd.argmax:
            expect = f"{cmd.argmin} arguments"
        else:
            expect = f"between {cmd.argmin} and {cmd.argmax} arguments"
        return QemuIoCommand(stderr=f"bad argument count {nargs} to {argv[0]}, expected "
                                    f"{expect}\n")
    if cmd.writes and acquire_write is not None:
        problem = acquire_write()
        if problem:
            return QemuIoCommand(reply=hmp_text(f"{problem}\n"))
    ctx = _Ctx(cmd, argv)
    runner = _RUNNERS.get(cmd.name)
    if runner is None:
        ctx.res.unsupported = cmd.name
        return ctx.res
    try:
        runner(ctx)
    except _Abort:
        pass
    ctx.res.reply = "".join(hmp_text(f"warning: {w}\n") for w in ctx.warnings)
    return ctx.res


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A seeded simulated guest: a deterministic list of writes, zero writes and discards.

    Arguments of ``x-virtsim-guest-workload`` (all but ``device`` optional):
    ``seed``; ``writes`` (number of requests); ``size-min``/``size-max`` (bytes per
    request); ``pattern`` ``random`` (offsets anywhere in the region) or ``seq`` (each
    request follows the previous one, wrapping at the end of the region); ``region``
    ``{"offset", "length"}`` (default: the whole disk); ``zero-ratio`` and
    ``discard-ratio`` (share of requests that are zero writes / discards);
    ``align`` (request alignment, default 512 like a guest's sectors);
    ``flush-every`` (a flush after every N requests, 0 = never).
    Only ``random.Random(seed)`` is used, so the same arguments give the same ops.
    """

    seed: int = 0
    writes: int = 100
    size_min: int = 4096
    size_max: int = 65536
    pattern: str = "random"
    region_offset: int = 0
    region_length: int | None = None
    zero_ratio: float = 0.0
    discard_ratio: float = 0.0
    align: int = 512
    flush_every: int = 0

    _KEYS: ClassVar[dict[str, str]] = {"seed": "seed", "writes": "writes", "size-min": "size_min",
             "size-max": "size_max", "pattern": "pattern", "zero-ratio": "zero_ratio",
             "discard-ratio": "discard_ratio", "align": "align",
             "flush-every": "flush_every"}

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Workload:
        """Build from QMP arguments (``device`` and unknown keys are the caller's)."""
        kw: dict[str, Any] = {cls._KEYS[k]: v for k, v in args.items() if k in cls._KEYS}
        region = args.get("region")
        if region is not None:
            kw["region_offset"] = region.get("offset", 0)
            kw["region_length"] = region.get("length")
        return cls(**kw)

    def validate(self, disk_size: int) -> tuple[int, int]:
        """Check the arguments against the disk; returns the region as (start, end)."""
        if self.pattern not in ("random", "seq"):
            raise SimError("Parameter 'pattern' does not accept value "
                           f"'{self.pattern}'")
        if self.writes < 0:
            raise SimError("'writes' must not be negative")
        if self.align < 1 or self.align & (self.align - 1):
            raise SimError("'align' must be a power of 2")
        if not 0.0 <= self.zero_ratio <= 1.0 or not 0.0 <= self.discard_ratio <= 1.0 \
                or self.zero_ratio + self.discard_ratio > 1.0:
            raise SimError("'zero-ratio' and 'discard-ratio' must be within 0..1 together")
        if self.flush_every < 0:
            raise SimError("'flush-every' must not be negative")
        start = self.region_offset
        length = disk_size - start if self.region_length is None else self.region_length
        if start < 0 or length < 0 or start + length > disk_size:
            raise SimError(f"region {start}+{length} is outside the disk (size {disk_size})")
        if start % self.align or length % self.align:
            raise SimError(f"region {start}+{length} is not aligned to {self.align}")
        if not self.align <= self.size_min <= self.size_max:
            raise SimError(f"need align <= size-min <= size-max (got {self.align}, "
                           f"{self.size_min}, {self.size_max})")
        if self.writes and self.size_max > length:
            raise SimError(f"size-max {self.size_max} exceeds the region length {length}")
        return start, start + length

    def ops(self, disk_size: int) -> list[GuestOp]:
        return list(self.iter_ops(disk_size))

    def iter_ops(self, disk_size: int) -> Iterator[GuestOp]:
        start, end = self.validate(disk_size)
        rng = random.Random(self.seed)
        a = self.align
        cursor = start
        for i in range(self.writes):
            length = rng.randint(self.size_min // a, self.size_max // a) * a
            if self.pattern == "seq":
                if cursor + length > end:
                    cursor = start
                offset = cursor
                cursor += length
            else:
                offset = start + rng.randrange((end - start - length) // a + 1) * a
            r = rng.random()
            if r < self.discard_ratio:
                yield GuestOp("discard", offset, length)
            elif r < self.discard_ratio + self.zero_ratio:
                yield GuestOp("zero", offset, length)
            else:
                yield GuestOp("write", offset, length, rng.randrange(1, 256))
            if self.flush_every and (i + 1) % self.flush_every == 0:
                yield GuestOp("flush")
