"""nbdkit as the reference NBD server: the same file served by nbdkit (a small Python
plugin, tests/nbd/nbdkit_file_plugin.py) and by virtsim's NBD server looks the same to a
libnbd client -- size, the flags a client acts on, data and ``base:allocation`` extents --
read-only, and writable after the same writes, zeroes and trims.

The QEMU side runs against real qemu-system-x86_64 too, so a difference between nbdkit and
QEMU (which would be no bug of virtsim's) shows up as such.  Two are known and allowed
for: QEMU advertises FUA on read-only exports (nbdkit -r does not), and QEMU's export size
is the node's rounded down to 512 (the file here is a multiple of 512).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .realtools import (
    TIMEOUT,
    Emus,
    MiB,
    nbdcopy_sha256,
    need,
    need_libnbd_python,
    need_nbdkit_python,
    open_emus,
    run,
    uri,
)

PLUGIN = Path(__file__).with_name("nbdkit_file_plugin.py")
PROBE = Path(__file__).with_name("nbd_probe.py")
SIZE = 8 * MiB + 3 * 512
#: writes a backup restore (or a writable export's user) makes: data with and without FUA
#: into holes and data, zeroes with and without unmap, a trim later overwritten, flush
OPS: list[list[Any]] = [
    ["pwrite", 4096, 8192, 0x31, False], ["pwrite", 3 * MiB + 100, 70000, 0x32, True],
    ["pwrite", 5 * MiB, 4096, 0x33, False], ["zero", 0, 65536, False, False],
    ["zero", MiB, 8192, True, True], ["trim", 2 * MiB, MiB],
    ["pwrite", 2 * MiB, MiB, 0x34, False], ["zero", SIZE - 512, 512, True, False],
    ["flush"]]


@pytest.fixture
def emus(tmp_path: Path) -> Iterator[Emus]:
    yield from open_emus(tmp_path)


def _make_file(path: Path) -> None:
    """Data, holes, explicit zeroes (data to SEEK_DATA), unaligned runs, a tail."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(range(256)) * 256, 0)                 # 64k of data
        os.pwrite(fd, b"\x5a" * (4096 + 100), MiB)                  # ends mid-block
        os.pwrite(fd, bytes(MiB), 2 * MiB)                          # zeroes, allocated
        os.pwrite(fd, b"\xa5" * 12345, 5 * MiB + 1000)
        os.pwrite(fd, b"\xee" * 1000, SIZE - 1000)                 # up to the end
    finally:
        os.close(fd)


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Any]:
    """``nbdkit(file, writable)`` serves the file through the Python plugin; returns the
    socket.  Each server is killed by pid at the end."""
    need_nbdkit_python()
    procs: list[subprocess.Popen[bytes]] = []

    def start(path: Path, writable: bool) -> str:
        sock = str(tmp_path / f"nbdkit{len(procs)}.sock")
        args = ["nbdkit", "-f", "--exit-with-parent", "-U", sock]
        if not writable:
            args.append("-r")
        args += ["python", str(PLUGIN), f"file={path}"]
        if writable:
            args.append("writable=1")
        log = tmp_path / f"nbdkit{len(procs)}.log"
        with open(log, "wb") as lf:
            p = subprocess.Popen(args, stdout=lf, stderr=lf, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        procs.append(p)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nbdkit did not start:\n{log.read_text()}")
            time.sleep(0.01)
        return sock

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(TIMEOUT)


def _probe(py: str, u: str, ops: list[list[Any]] | None = None) -> dict[str, Any]:
    args = [py, str(PROBE), u, "--context", "base:allocation"]
    if ops:
        args += ["--ops", json.dumps(ops)]
    res: dict[str, Any] = json.loads(run(*args).stdout)
    return res


def _serve(emus: Emus, binary: str, path: Path, writable: bool) -> str:
    emu = emus.start(binary, [
        "-machine", "none",
        "-blockdev", f"driver=file,node-name=f,filename={path}",
        "-blockdev", "driver=raw,node-name=disk,file=f"], name=f"{binary}-{writable}")
    emu.qmp.execute("nbd-server-start",
                    {"addr": {"type": "unix", "data": {"path": emu.nbd_path}}})
    emu.qmp.execute("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk",
                                         "name": "", "writable": writable})
    return uri(emu.nbd_path)


@pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])
@pytest.mark.parametrize("binary", ["virtsim", "qemu"])
def test_same_as_nbdkit(emus: Emus, nbdkit: Any, tmp_path: Path, binary: str,
                        writable: bool) -> None:
    py = need_libnbd_python()
    need("nbdcopy")
    ref, mine = tmp_path / "ref.raw", tmp_path / "mine.raw"
    _make_file(ref)
    _make_file(mine)
    kit = uri(nbdkit(ref, writable))
    sim = _serve(emus, binary, mine, writable)
    want, got = _probe(py, kit), _probe(py, sim)
    assert got["size"] == want["size"] == SIZE
    if writable:
        assert got["flags"] == want["flags"]
    else:
        # FUA on a read-only export means nothing: QEMU advertises it, nbdkit does not
        assert {**got["flags"], "can_fua": False} == want["flags"]
    assert got["flags"]["is_read_only"] is not writable
    assert got["extents"] == want["extents"]
    assert got["reads"] == want["reads"]
    # the layout really has holes and data (the comparison is not of two blank maps)
    assert {e[2] for e in want["extents"]["base:allocation"]} == {0, 3}
    if writable:
        want, got = _probe(py, kit, OPS), _probe(py, sim, OPS)
        assert got["extents"] == want["extents"]
        assert nbdcopy_sha256(sim) == nbdcopy_sha256(kit)
        assert ref.read_bytes() == mine.read_bytes()
    else:
        r = run(py, "-c", "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
                "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print(e.errno)\n",
                sim, check=False)
        assert r.stdout.strip() == "EPERM", r.stdout + r.stderr
