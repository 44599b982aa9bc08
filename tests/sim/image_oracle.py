"""Real qemu-img / qemu-io / QEMU as oracles for the image-format tests.

Each helper runs one short-lived process.  A missing binary skips the test with the reason,
except when CI=true, where it is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyroaring import BitMap64

IN_CI = os.environ.get("CI") == "true"


def require(*tools: str) -> None:
    """Skip (or fail in CI) unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        why = f"{', '.join(missing)} not installed"
        if IN_CI:
            pytest.fail(f"CI=true but {why}", pytrace=False)
        pytest.skip(why)


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", *args, check=check)


def qemu_io(path: str | Path, *cmds: str, fmt: str = "qcow2",
            extra: tuple[str, ...] = ()) -> str:
    """Run qemu-io commands in one process; fail on any reported error."""
    args: list[str | Path] = ["qemu-io", "-f", fmt, *extra]
    for c in cmds:
        args += ["-c", c]
    args.append(path)
    r = run(*args)
    low = r.stdout.lower()
    assert "error" not in low and "failed" not in low, r.stdout + r.stderr
    return r.stdout


def info(path: str | Path, fmt: str = "qcow2") -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        qemu_img("info", "-f", fmt, "--output=json", path).stdout)
    return out


def _without_backing(path: str | Path) -> str:
    return "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                 "file": {"driver": "file", "filename": str(path)}})


def check(path: str | Path) -> tuple[int, dict[str, Any], str]:
    """(exit status, JSON report, stderr) of ``qemu-img check``; 0 means clean.

    The backing file is not opened (it may not exist): only this image is checked.
    """
    r = qemu_img("check", "--output=json", _without_backing(path), check=False)
    report: dict[str, Any] = json.loads(r.stdout) if r.stdout.strip() else {}
    return r.returncode, report, r.stderr


def assert_clean(path: str | Path) -> dict[str, Any]:
    rc, report, err = check(path)
    assert rc == 0, (report, err)
    assert report.get("check-errors", 0) == 0 and "leaks" not in report \
        and "corruptions" not in report, report
    return report


def qmap(path: str | Path, fmt: str = "qcow2") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(
        qemu_img("map", "-f", fmt, "--output=json", path).stdout)
    return out


def compare(a: str | Path, b: str | Path, fa: str = "qcow2", fb: str = "qcow2") -> int:
    return qemu_img("compare", "-f", fa, "-F", fb, a, b, check=False).returncode


def qmp(*commands: dict[str, Any], timeout: float = 60) -> list[dict[str, Any]]:
    """Run QMP commands in a fresh ``qemu-system-x86_64 -machine none``, then quit.

    Returns one reply per command (``{"return": ...}`` or ``{"error": ...}``).
    """
    lines = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    p = subprocess.run(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", "stdio"],
        input="".join(json.dumps(c) + "\n" for c in lines), capture_output=True, text=True,
        timeout=timeout)
    replies = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    replies = [r for r in replies if "return" in r or "error" in r]
    assert len(replies) == len(lines), (p.stdout, p.stderr)
    return replies[1:-1]


def blockdev_add(path: str | Path, node: str = "n0", read_only: bool = False) -> dict[str, Any]:
    return {"execute": "blockdev-add",
            "arguments": {"driver": "qcow2", "node-name": node, "read-only": read_only,
                          "file": {"driver": "file", "filename": str(path)}}}


def hmp_qemu_io(node: str, cmd: str) -> dict[str, Any]:
    return {"execute": "human-monitor-command",
            "arguments": {"command-line": f'qemu-io {node} "{cmd}"'}}


def hbitmap_sha256(bits: BitMap64, disk_size: int, granularity: int) -> str:
    """What x-debug-block-dirty-bitmap-sha256 prints for these dirty granules."""
    n = (disk_size + granularity - 1) // granularity
    buf = bytearray((n + 63) // 64 * 8)
    for g in bits:
        buf[g >> 3] |= 1 << (g & 7)
    return hashlib.sha256(buf).hexdigest()


def map_as_extents(entries: list[dict[str, Any]]) -> list[tuple[int, int, str, int | None]]:
    """``qemu-img map`` entries of the top layer as (start, length, kind, host offset)."""
    out: list[tuple[int, int, str, int | None]] = []
    for e in entries:
        if e.get("depth", 0) != 0 or not e.get("present", True):
            kind = "unallocated"
        elif e["data"]:
            kind = "data"
        else:
            kind = "zero"
        host = e.get("offset") if kind != "unallocated" else None
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == e["start"] and (
                (host is None and out[-1][3] is None) or
                (host is not None and out[-1][3] is not None and
                 out[-1][3] + out[-1][1] == host)):
            s, n, k, h = out[-1]
            out[-1] = (s, n + e["length"], k, h)
        else:
            out.append((e["start"], e["length"], kind, host))
    return out
