"""Shared plumbing for the NBD tests that run real tools against real QEMU and virtsim.

An emulator is a process (``qemu-system-x86_64`` or ``virtsim-qemu``, same argv) driven
over a small synchronous QMP client, so the *same* Python script runs against both and the
real NBD clients (nbdinfo, nbdcopy, qemu-img, libnbd) run as plain subprocesses.  Every
process is started in its own session and killed by pid when the test ends; everything
lives in the test's ``tmp_path``.

Tools missing: skip with the reason, except under CI=true where that is a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"
TIMEOUT = 20.0
MiB = 1 << 20
_SCRIPT = Path(sys.executable).parent / "virtsim-qemu"
VIRTSIM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "virtsim.qmp.cli"]
#: syscall number of ppoll: real QEMU's main thread idles in it once the main loop runs
_PPOLL = {"x86_64": 271, "aarch64": 73}.get(os.uname().machine)


def need(*tools: str) -> None:
    """Skip (fail under CI=true) when a real tool is not installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        msg = f"{', '.join(missing)} not found: the test needs the real tool(s)"
        if IN_CI:
            pytest.fail(f"CI=true but {msg}", pytrace=False)
        pytest.skip(msg)


def need_libnbd_python() -> str:
    """The interpreter that imports libnbd's ``nbd`` module (python3-libnbd)."""
    for py in (sys.executable, "/usr/bin/python3"):
        r = subprocess.run([py, "-c", "import nbd"], capture_output=True, timeout=TIMEOUT)
        if r.returncode == 0:
            return py
    msg = "python3-libnbd (module nbd) is not installed"
    if IN_CI:
        pytest.fail(f"CI=true but {msg}", pytrace=False)
    pytest.skip(msg)


def need_nbdkit_python() -> None:
    need("nbdkit")
    r = subprocess.run(["nbdkit", "python", "--dump-plugin"], capture_output=True,
                       timeout=TIMEOUT)
    if r.returncode != 0:
        msg = "nbdkit-plugin-python is not installed"
        if IN_CI:
            pytest.fail(f"CI=true but {msg}", pytrace=False)
        pytest.skip(msg)


def run(*cmd: str, check: bool = True, timeout: float = TIMEOUT,
        stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """A real tool, with a time limit (the child is killed when it runs over)."""
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                       input=None if stdin is None else stdin.decode())
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def nbdcopy_sha256(source: str) -> str:
    """sha256 of what ``nbdcopy SOURCE -`` streams (or ``rc=N stderr`` when it fails)."""
    r = subprocess.run(["nbdcopy", source, "-"], capture_output=True, timeout=TIMEOUT)
    if r.returncode != 0:
        return f"rc={r.returncode} {r.stderr.decode(errors='replace')}"
    return hashlib.sha256(r.stdout).hexdigest()


def img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", *args, check=check)


def uri(sock: str, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


class QmpError(Exception):
    def __init__(self, err: dict[str, Any]) -> None:
        super().__init__(f"{err.get('class')}: {err.get('desc')}")
        self.error = err


class Qmp:
    """Minimal synchronous QMP client (one command at a time; events are queued)."""

    def __init__(self, path: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        s.settimeout(TIMEOUT)
        self.sock = s
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        greeting = self._recv()
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("QMP connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """The command's ``return``; QmpError on an error reply."""
        msg: dict[str, Any] = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        with self.lock:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                reply = self._recv()
                if "event" in reply:
                    self.events.append(reply)
                    continue
                if "error" in reply:
                    raise QmpError(reply["error"])
                return reply["return"]

    def hmp(self, line: str) -> str:
        out = self.execute("human-monitor-command", {"command-line": line})
        assert isinstance(out, str)
        return out

    def qemu_io(self, target: str, cmd: str, device: bool = False) -> None:
        """HMP qemu-io on a node (or with ``device``, a qdev's BlockBackend); any output
        is an error (with the echo off, successful writes print nothing)."""
        out = self.hmp(f'qemu-io {"-d " if device else ""}{target} "{cmd}"')
        assert out == "" or "wrote" in out or "read" in out, out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _wait_main_loop(pid: int, timeout: float = 5.0) -> None:
    """Real QEMU 7.2 can drop a QMP client that connects during initialisation with
    wait=off: connect once its main thread idles in ppoll (three samples in a row)."""
    if _PPOLL is None:
        time.sleep(0.3)
        return
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 3 and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                nr = f.read().split(" ", 1)[0]
        except OSError:
            return
        streak = streak + 1 if nr == str(_PPOLL) else 0
        time.sleep(0.002)


def emulator_command(binary: str) -> list[str]:
    if binary == "virtsim":
        return list(VIRTSIM)
    qemu = shutil.which(os.environ.get("QEMU_SYSTEM") or "qemu-system-x86_64")
    if qemu is None:
        msg = "qemu-system-x86_64 not found (set QEMU_SYSTEM): real QEMU is the reference"
        if IN_CI:
            pytest.fail(f"CI=true but {msg}", pytrace=False)
        pytest.skip(msg)
    return [qemu]


class Emu:
    """One emulator process with its QMP connection and NBD socket path."""

    def __init__(self, binary: str, workdir: Path, args: list[str]) -> None:
        self.binary = binary
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = str(workdir / "qmp.sock")
        self.nbd_path = str(workdir / "nbd.sock")
        self.log = workdir / "emu.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*emulator_command(binary), "-nodefaults", "-display", "none", "-S",
                 "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *args],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{binary} did not start:\n{self.log.read_text()}")
            time.sleep(0.01)
        if binary == "qemu":
            _wait_main_loop(self.proc.pid)
        self.qmp = Qmp(self.qmp_path)

    def uri(self, export: str = "") -> str:
        return uri(self.nbd_path, export)

    def io_errors(self, disconnects: bool = True) -> list[str]:
        """Lines of the emulator's output that are not qemu-io's success reports (both
        binaries print qemu-io's output, errors included, on stdout, not over HMP).
        ``disconnects=False`` leaves out QEMU's notes on NBD clients that hung up
        mid-reply: whether (and which) one is printed depends on timing."""
        ok = re.compile(r"^(wrote|read) \d+/\d+ bytes at offset \d+$|^[\d.]+ \w+, \d+ ops; ")
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if line.strip() and not ok.match(line)
                and (disconnects or "Disconnect client, due to:" not in line)]

    def stop(self) -> None:
        """Quit over QMP when possible, then make sure the pid is gone."""
        with contextlib.suppress(Exception):
            self.qmp.execute("quit")
        self.qmp.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, 9)
            self.proc.wait(5)


class Emus:
    """Starts emulators for one test; ``close`` ends each by pid."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[Emu] = []

    def start(self, binary: str, args: list[str], name: str | None = None) -> Emu:
        emu = Emu(binary, self.base / (name or binary), args)
        self.started.append(emu)
        return emu

    def close(self) -> None:
        for emu in self.started:
            emu.stop()


def open_emus(tmp_path: Path) -> Iterator[Emus]:
    """Body of each module's ``emus`` fixture: emulators ended, the directory emptied."""
    e = Emus(tmp_path)
    try:
        yield e
    finally:
        e.close()
        clean_dir(tmp_path)


def clean_dir(path: Path) -> None:
    """Leave no socket, image or log behind."""
    for p in list(path.iterdir()):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


class GuestWriter:
    """A guest that writes (HMP qemu-io, through its device) on a thread for as long as
    the ``with`` block runs -- the client inside it reads while the disk changes -- and at
    least one round of ``writes`` (each round with a new pattern byte where ``{p}``)."""

    def __init__(self, qmp: Qmp, target: str, writes: list[str], device: bool) -> None:
        self.qmp, self.target, self.writes, self.device = qmp, target, writes, device
        self.done = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            rnd = 0
            while rnd == 0 or not self._halt.is_set():
                for cmd in self.writes:
                    self.qmp.qemu_io(self.target, cmd.format(p=(0x40 + rnd) % 256),
                                     device=self.device)
                    self.done += 1
                    time.sleep(0.003)  # let the reads get their share of the emulator
                rnd += 1
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def __enter__(self) -> GuestWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int:
        self._halt.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "guest writes hung"
        if self.error is not None:
            raise self.error
        return self.done
