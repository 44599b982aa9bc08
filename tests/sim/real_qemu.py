"""A real QEMU 7.2 process to compare the model with (tests/sim differential tests).

Built on the differential harness's backend (``stdbuf -oL`` so qemu-io's stdout lines are
on disk before the HMP reply that produced them) and its byte-exact QMP connection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.differential.harness import Closed, QMPConnection, qemu_backend

IN_CI = os.environ.get("CI") == "true"


def require_qemu() -> None:
    """Skip with the reason when QEMU is missing, except in CI where that is a failure."""
    why = qemu_backend().unavailable()
    if why is None and not shutil.which("qemu-img"):
        why = "qemu-img not found"
    if why:
        if IN_CI:
            pytest.fail(f"CI=true but {why}", pytrace=False)
        pytest.skip(why)


class RealQemu:
    """``qemu-system-x86_64 -machine none`` with a QMP socket and captured stdio."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        sock = workdir / "qmp.sock"
        logs = workdir / "logs"
        logs.mkdir()
        self.proc = qemu_backend().spawn([], str(sock), workdir, logs)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.conn = QMPConnection(str(sock))
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError("QEMU did not open its QMP socket") from None
                time.sleep(0.02)
        self._recv()  # greeting
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while True:
            line = self.conn.recv_line(30)
            if line is None:
                raise TimeoutError("no reply from QEMU")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, command: str, /, **args: Any) -> Any:
        """Run a command; its ``return`` value, or raise RuntimeError with the error."""
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        self.conn.send(json.dumps(msg).encode() + b"\n")
        reply = self._recv()
        if "error" in reply:
            raise RuntimeError(reply["error"]["desc"])
        return reply["return"]

    def hmp(self, line: str) -> tuple[str, str, str]:
        """(HMP reply, stdout text, stderr text) of one human-monitor-command."""
        reply = self.cmd("human-monitor-command", **{"command-line": line})
        out = self.proc.read_output()
        stdout = "".join(text + "\n" for stream, text in out if stream == "1")
        stderr = "".join(text + "\n" for stream, text in out if stream == "2")
        return reply, stdout, stderr

    def image(self, name: str, size: int, read_only: bool = False,
              discard: str = "ignore") -> str:
        """Create a qcow2 image in the work directory and add it as node ``name``."""
        path = self.workdir / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                       check=True)
        self.cmd("blockdev-add", driver="qcow2", discard=discard,
                 **{"node-name": name, "read-only": read_only},
                 file={"driver": "file", "filename": str(path), "read-only": read_only})
        return name

    def close(self) -> None:
        try:
            self.cmd("quit")
        except (Closed, OSError, RuntimeError, TimeoutError):
            pass
        if self.proc.wait(10) is None:
            self.proc.kill()
        self.conn.close()


def real_qemu_session() -> Iterator[RealQemu]:
    """Body of a module-scoped fixture: one QEMU in a temporary directory, removed after."""
    require_qemu()
    with tempfile.TemporaryDirectory(prefix="virtsim-sim-") as d:
        qemu = RealQemu(Path(d))
        try:
            yield qemu
        finally:
            qemu.close()
