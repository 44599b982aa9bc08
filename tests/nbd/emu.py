"""Real ``qemu-system-x86_64`` and ``virtsim-qemu`` side by side, for NBD wire comparisons.

Both start with the same argv (``-machine none -nodefaults -display none -qmp unix:...``)
and are driven by the same QMP script; :func:`probe` then speaks raw bytes to their NBD
servers and records what comes back, so a test can require identical replies.  Every
process is killed by pid when the fixture ends; files live in the test's ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"
QEMU = shutil.which(os.environ.get("QEMU_SYSTEM") or "qemu-system-x86_64")
_SCRIPT = Path(sys.executable).parent / "virtsim-qemu"
VIRTSIM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "virtsim.qmp.cli"]
TIMEOUT = 10.0
#: ppoll's syscall number: real QEMU's main thread idles in it once the main loop runs
_PPOLL = {"x86_64": 271, "aarch64": 73}.get(os.uname().machine)


def need_tool(name: str) -> str:
    """Path of a real tool; missing: skip, or fail when CI=true."""
    path = QEMU if name == "qemu-system-x86_64" else shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"CI=true but {name} is not installed", pytrace=False)
        pytest.skip(f"{name} not found: real QEMU tools are the reference")
    return path


def _wait_main_loop(pid: int, timeout: float = 5.0) -> None:
    """Real QEMU answers QMP reliably only once its main loop runs (three ppoll samples)."""
    if _PPOLL is None:
        time.sleep(0.2)
        return
    deadline, streak = time.monotonic() + timeout, 0
    while streak < 3 and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                nr = f.read().split(" ", 1)[0]
        except OSError:
            return
        streak = streak + 1 if nr == str(_PPOLL) else 0
        time.sleep(0.001)


class QmpError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('class')}: {error.get('desc')}")
        self.error = error


@dataclass
class Emulator:
    """One running emulator with a QMP connection."""

    kind: str                      # "qemu" | "virtsim"
    proc: subprocess.Popen[bytes]
    errfile: Path
    sock: socket.socket
    _buf: bytes = b""
    _err_seen: int = 0

    def qmp(self, command: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._recv()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QmpError(reply["error"])

    def hmp(self, line: str) -> str:
        out: str = self.qmp("human-monitor-command", command_line=line)
        return out

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            self.sock.settimeout(TIMEOUT)
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError(f"{self.kind}: QMP closed; stderr: {self.stderr()}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def stderr(self) -> str:
        return self.errfile.read_text(errors="backslashreplace")

    def new_stderr(self, settle: float = 0.0) -> list[str]:
        """Lines written to stderr since the last call (without the program name)."""
        if settle:
            time.sleep(settle)
        text = self.stderr()
        new, self._err_seen = text[self._err_seen:], len(text)
        prefix = "qemu-system-x86_64: "
        return [ln[len(prefix):] if ln.startswith(prefix) else ln
                for ln in new.splitlines()]

    def wait_stderr(self, lines: int = 1, timeout: float = 3.0) -> list[str]:
        """Like :meth:`new_stderr`, waiting until ``lines`` new lines have arrived (for
        reports that follow what the client did asynchronously, e.g. a reset)."""
        deadline = time.monotonic() + timeout
        while (self.stderr()[self._err_seen:].count("\n") < lines
               and time.monotonic() < deadline):
            time.sleep(0.005)
        return self.new_stderr()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


@contextlib.contextmanager
def emulator(kind: str, workdir: Path) -> Iterator[Emulator]:
    """Start ``kind`` with a QMP socket in ``workdir``; killed by pid on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [need_tool("qemu-system-x86_64")] if kind == "qemu" else list(VIRTSIM)
    qmp_path = workdir / "qmp.sock"
    qmp_path.unlink(missing_ok=True)      # its appearance is the readiness signal
    errfile = workdir / "stderr"
    with open(errfile, "wb") as fe:
        proc = subprocess.Popen(
            [*cmd, "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{qmp_path},server=on,wait=off"],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fe,
            start_new_session=True)
    emu: Emulator | None = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while not qmp_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{kind} did not start: {errfile.read_text()}")
            time.sleep(0.005)
        if kind == "qemu":
            _wait_main_loop(proc.pid)
        while True:             # the socket file exists from bind(), before listen()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(qmp_path))
                break
            except ConnectionRefusedError:
                s.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        emu = Emulator(kind, proc, errfile, s)
        greeting = emu._recv()
        assert "QMP" in greeting, greeting
        emu.qmp("qmp_capabilities")
        yield emu
    finally:
        if emu is not None:
            emu.close()
        elif proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait(5)
        qmp_path.unlink(missing_ok=True)     # a killed QEMU leaves its socket file
        errfile.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- raw client


@dataclass
class Reply:
    """What a server sent back to one probe, and whether it hung up."""

    data: bytes
    eof: bool

    def __repr__(self) -> str:
        return f"Reply(eof={self.eof}, data={self.data.hex(' ', 4)})"


def connect(addr: str | tuple[str, int]) -> socket.socket:
    fam = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(addr)
    return s


def read_all(s: socket.socket, timeout: float = TIMEOUT, idle: float | None = None) -> Reply:
    """Everything until the server closes; with ``idle``, stop after that much silence."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return Reply(bytes(data), False)
        s.settimeout(min(left, idle) if idle else left)
        try:
            chunk = s.recv(1 << 20)
        except TimeoutError:
            if idle:
                return Reply(bytes(data), False)
            raise AssertionError(f"server kept the connection open; got {bytes(data)!r}"
                                 ) from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return Reply(bytes(data), True)
        data += chunk


def reset_after(addr: str | tuple[str, int], *sends: bytes, pause: float = 0.1) -> None:
    """Send ``sends`` (pausing after each so the server has read them), then reset the
    connection (SO_LINGER 0: RST instead of FIN)."""
    s = connect(addr)
    for chunk in sends:
        s.sendall(chunk)
        time.sleep(pause)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def probe(addr: str | tuple[str, int], *sends: bytes, idle: float | None = None) -> Reply:
    """Send ``sends`` (a send error after a server hang-up is fine), then read to EOF."""
    with contextlib.closing(connect(addr)) as s:
        for chunk in sends:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_all(s, idle=idle)


# ----------------------------------------------------------------------------- byte builders

IHAVEOPT = b"IHAVEOPT"


def u16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def opt(option: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """One option: magic, number, length (``length`` overrides the true one), payload."""
    return IHAVEOPT + u32(option) + u32(len(payload) if length is None else length) + payload


def name_info(name: bytes, *infos: int) -> bytes:
    """NBD_OPT_INFO/GO payload."""
    return u32(len(name)) + name + u16(len(infos)) + b"".join(u16(i) for i in infos)


def meta(name: bytes, *queries: bytes) -> bytes:
    """NBD_OPT_LIST/SET_META_CONTEXT payload."""
    return (u32(len(name)) + name + u32(len(queries))
            + b"".join(u32(len(q)) + q for q in queries))


def req(typ: int, handle: int = 1, offset: int = 0, length: int = 0, flags: int = 0,
        data: bytes = b"") -> bytes:
    return (u32(0x25609513) + u16(flags) + u16(typ) + handle.to_bytes(8, "big")
            + offset.to_bytes(8, "big") + u32(length) + data)


# ----------------------------------------------------------------------------- conversations

OPT_REPLY_MAGIC = 0x0003E889045565A9
_SIMPLE, _STRUCTURED = 0x67446698, 0x668E33EF


class _Stream:
    def __init__(self, s: socket.socket) -> None:
        self.s, self.buf, self.eof = s, bytearray(), False

    def take(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes, or None at EOF (what was there stays in ``buf``)."""
        while len(self.buf) < n and not self.eof:
            try:
                chunk = self.s.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk
        if len(self.buf) < n:
            return None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


@dataclass
class Conversation:
    """A negotiation followed by pipelined requests: what came back, per request."""

    negotiation: bytes
    replies: dict[int, bytes]      # handle -> its reply bytes (chunks in order)
    trailing: bytes                # bytes after the last complete reply (up to EOF)
    eof_early: bool                # the server hung up before answering every request


def _requests(data: bytes) -> list[tuple[int, int, int]]:
    """(handle, type, length) of the well-formed requests in ``data`` (WRITE payloads
    skipped), stopping at the first one with a bad magic."""
    out, pos = [], 0
    while pos + 28 <= len(data):
        magic = int.from_bytes(data[pos:pos + 4], "big")
        typ = int.from_bytes(data[pos + 6:pos + 8], "big")
        handle = int.from_bytes(data[pos + 8:pos + 16], "big")
        length = int.from_bytes(data[pos + 24:pos + 28], "big")
        out.append((handle, typ, length))
        if magic != 0x25609513:
            break
        pos += 28 + (length if typ == 1 else 0)
    return out


def converse(addr: str | tuple[str, int], negotiation: bytes, requests: bytes,
             export_name: bool = False) -> Conversation:
    """Negotiate, wait for the GO/EXPORT_NAME answer, send ``requests`` at once, collect a
    reply for each (QEMU may answer out of order), then NBD_CMD_DISC and read to EOF."""
    no_zeroes = bool(int.from_bytes(negotiation[:4], "big") & 2)
    with contextlib.closing(connect(addr)) as s:
        st = _Stream(s)
        s.sendall(negotiation)
        neg = bytearray(st.take(18) or b"")
        attached = False
        while not st.eof:
            head = st.take(8)
            if head is None:
                break
            if int.from_bytes(head, "big") != OPT_REPLY_MAGIC and export_name:
                neg += head + (st.take(2 if no_zeroes else 126) or b"")
                attached = True
                break
            rest = st.take(12) or b""
            neg += head + rest
            if len(rest) < 12:
                break
            opt_, typ, length = (int.from_bytes(rest[i:i + 4], "big") for i in (0, 4, 8))
            neg += st.take(length) or b""
            if opt_ == 7 and typ == 1:
                attached = True
                break
            if opt_ == 7 and typ & (1 << 31):
                break
        replies: dict[int, bytes] = {}
        eof_early = False
        if attached:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(requests)
            pending = {h: (t, n) for h, t, n in _requests(requests) if t != 2}
            while pending:
                head = st.take(4)
                if head is None:
                    eof_early = True
                    break
                magic = int.from_bytes(head, "big")
                if magic == _SIMPLE:
                    rest = st.take(12) or b""
                    err = int.from_bytes(rest[:4], "big")
                    handle = int.from_bytes(rest[4:12], "big")
                    typ, n = pending.pop(handle, (-1, 0))
                    body = head + rest
                    if typ == 0 and not err:
                        body += st.take(n) or b""
                    replies[handle] = replies.get(handle, b"") + body
                elif magic == _STRUCTURED:
                    rest = st.take(16) or b""
                    flags = int.from_bytes(rest[:2], "big")
                    handle = int.from_bytes(rest[4:12], "big")
                    length = int.from_bytes(rest[12:16], "big")
                    body = head + rest + (st.take(length) or b"")
                    replies[handle] = replies.get(handle, b"") + body
                    if flags & 1:
                        pending.pop(handle, None)
                else:
                    st.buf[:0] = head
                    break
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(req(2))
        trailing = bytearray(st.buf)
        st.buf.clear()
        while not st.eof:
            trailing += st.take(1 << 16) or b""
        trailing += st.buf
        return Conversation(bytes(neg), replies, bytes(trailing), eof_early)
