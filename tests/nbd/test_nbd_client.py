"""The ``nbd`` block driver and NBD client against real nbdkit servers.

nbdkit runs in the foreground with ``--exit-with-parent`` and is also killed by pid in a
finalizer, so no server outlives a test.  The fault plugin (virtsim/nbd/nbdkit_faults.py)
scripts ENOSPC/EIO/stalls the way real storage fails under a backup job.  Expected texts
were observed on QEMU 7.2 against the same servers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import virtsim.nbd
from virtsim.nbd import blockdriver  # noqa: F401  (registers driver: nbd)
from virtsim.nbd.client import InetAddress, NbdClient, UnixAddress, export_uri
from virtsim.sim.block import BlockGraph
from virtsim.sim.errors import SimError

IN_CI = os.environ.get("CI") == "true"
PLUGIN = Path(virtsim.nbd.__file__).parent / "nbdkit_faults.py"
MiB = 1 << 20


def _need(what: str, ok: bool) -> None:
    if not ok:
        if IN_CI:
            pytest.fail(f"CI=true but {what} is not installed", pytrace=False)
        pytest.skip(f"{what} not found")


def _have_python_plugin() -> bool:
    if not shutil.which("nbdkit"):
        return False
    r = subprocess.run(["nbdkit", "--dump-plugin", "python"], capture_output=True, timeout=10)
    return r.returncode == 0


Nbdkit = Callable[..., str]


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Nbdkit]:
    """``nbdkit(*args)`` starts a server on a fresh unix socket and returns the socket."""
    _need("nbdkit", shutil.which("nbdkit") is not None)
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, unix: bool = True) -> str:
        """With ``unix=False`` the caller passes ``-p PORT`` and polls the port itself."""
        sock = str(tmp_path / f"nbd{len(procs)}.sock")
        log = open(tmp_path / f"nbdkit{len(procs)}.log", "wb")  # noqa: SIM115
        with log:
            p = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent",
                                  *(["-U", sock] if unix else []), *args],
                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        procs.append(p)
        deadline = time.monotonic() + 10
        while unix and not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / f"nbdkit{len(procs) - 1}.log").read_text())
            time.sleep(0.01)
        return sock

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
    for f in tmp_path.iterdir():  # sockets, logs, images: leave nothing behind
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)


def faults(nbdkit: Nbdkit, *params: str) -> str:
    _need("nbdkit-plugin-python", _have_python_plugin())
    return nbdkit("python", str(PLUGIN), *params)


def nbd_opts(sock: str, name: str = "n0", **extra: Any) -> dict[str, Any]:
    return {"driver": "nbd", "node-name": name, "server": {"type": "unix", "path": sock},
            **extra}


# ----------------------------------------------------------------------------- client


def test_client_roundtrip_memory(nbdkit: Nbdkit) -> None:
    sock = nbdkit("memory", "1M")
    c = NbdClient(UnixAddress(sock))
    try:
        assert c.size() == MiB and not c.export_readonly
        assert c.filename == f"nbd+unix://?socket={sock}"
        c.pwrite(4096, b"\xab" * 8192)
        assert c.pread(4096, 8192) == b"\xab" * 8192
        c.write_zeroes(8192, 4096)
        assert c.pread(4096, 8192) == b"\xab" * 4096 + bytes(4096)
        c.punch_hole(4096, 4096)
        assert c.pread(4096, 4096) == bytes(4096)
        c.flush()
        assert c.pread(MiB - 2, 4) == bytes(4)  # past the end reads as zeros (Store rule)
        with pytest.raises(OSError) as ei:
            c.truncate(2 * MiB)
        assert ei.value.errno == 95
    finally:
        c.close()
    c.close()  # idempotent


def test_fault_plugin_enospc_eio_and_latency(nbdkit: Nbdkit) -> None:
    sock = faults(nbdkit, "size=1M", "enospc-after=8k", "eio-at=64k:4k", "latency=0.05")
    c = NbdClient(UnixAddress(sock))
    try:
        t0 = time.monotonic()
        c.pwrite(0, b"a" * 4096)
        assert time.monotonic() - t0 >= 0.05
        with pytest.raises(OSError) as ei:
            c.pwrite(4096, b"b" * 8192)  # would cross 8k: fails whole
        assert ei.value.errno == 28
        assert c.pread(4096, 4) == bytes(4)
        c.write_zeroes(8192, 4096)  # exactly reaches the limit
        with pytest.raises(OSError) as ei:
            c.pread(60 * 1024, 8192)  # touches 64k
        assert ei.value.errno == 5
        assert c.pread(0, 4) == b"aaaa"
    finally:
        c.close()


def test_fault_plugin_stall_file(nbdkit: Nbdkit, tmp_path: Path) -> None:
    stall = tmp_path / "stall"
    sock = faults(nbdkit, "size=1M", f"stall-file={stall}")
    c = NbdClient(UnixAddress(sock))
    try:
        stall.touch()
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(c.pread(0, 512)))
        t.start()
        t.join(0.2)
        assert t.is_alive() and not got  # held by the server
        stall.unlink()
        t.join(5)
        assert got == [bytes(512)]
    finally:
        c.close()


# ---------------------------------------------------------------------- block driver


def test_blockdev_add_errors(nbdkit: Nbdkit, tmp_path: Path) -> None:
    g = BlockGraph()
    missing = str(tmp_path / "none.sock")
    with pytest.raises(SimError) as ei:
        g.blockdev_add(nbd_opts(missing))
    assert ei.value.desc == f"Failed to connect to '{missing}': No such file or directory"
    with pytest.raises(SimError) as ei:
        g.blockdev_add(nbd_opts(str(tmp_path)))
    assert ei.value.desc == f"Failed to connect to '{tmp_path}': Connection refused"
    ro = nbdkit("-r", "memory", "1M")
    with pytest.raises(SimError) as ei:
        g.blockdev_add(nbd_opts(ro))
    assert ei.value.desc == "Could not open image: Permission denied"
    with pytest.raises(SimError) as ei:
        g.blockdev_add(nbd_opts(ro, **{"tls-creds": "nope"}))
    assert ei.value.desc == "No TLS credentials with id 'nope'"
    strict = nbdkit("--filter=exportname", "memory", "1M", "exportname=foo",
                    "exportname-strict=true")
    with pytest.raises(SimError) as ei:
        g.blockdev_add(nbd_opts(strict, export="bar"))
    assert ei.value.desc == "Requested export not available"
    assert g.nodes == []
    g.blockdev_add(nbd_opts(strict, "s", export="foo"))
    n = g.blockdev_add(nbd_opts(ro, "r1", **{"read-only": True}))
    a = g.blockdev_add(nbd_opts(ro, "r2", **{"auto-read-only": True}))
    assert n.read_only and a.read_only
    with pytest.raises(OSError):
        n.write(0, b"x")
    g.close_all()


def test_query_and_qemu_io_in_embedded_emulator(nbdkit: Nbdkit,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from qemu.qmp import QMPClient

    from virtsim.qmp.emulator import embedded

    sock = faults(nbdkit, "size=1M", "enospc-after=8k", "eio-at=64k:4k")

    async def main() -> list[dict[str, Any]]:
        async with embedded() as emu:
            qmp = QMPClient("t")
            await qmp.connect(emu.qmp_address)
            try:
                await qmp.execute("blockdev-add", nbd_opts(sock, export="exp"))
                for cmd in ("write -P 0x11 0 4k", "write 4k 8k", "read 64k 512",
                            "write -z 8k 4k", "read -P 0x11 0 4k"):
                    r = await qmp.execute("human-monitor-command",
                                          {"command-line": f'qemu-io n0 "{cmd}"'})
                    assert r == ""
                nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
                assert isinstance(nodes, list)
                await qmp.execute("blockdev-del", {"node-name": "n0"})
                return nodes
            finally:
                await qmp.disconnect()

    nodes = asyncio.run(main())
    uri = f"nbd+unix:///exp?socket={sock}"
    assert nodes[0]["file"] == uri and nodes[0]["drv"] == "nbd"
    assert nodes[0]["image"] == {"filename": uri, "format": "nbd", "virtual-size": MiB}
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "ops;" not in ln]
    assert lines == ["wrote 4096/4096 bytes at offset 0",
                     "write failed: No space left on device",
                     "read failed: Input/output error",
                     "wrote 4096/4096 bytes at offset 8192",
                     "read 4096/4096 bytes at offset 0"]


def test_qcow2_over_nbd(nbdkit: Nbdkit, tmp_path: Path) -> None:
    _need("qemu-img", shutil.which("qemu-img") is not None)
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    os.truncate(img, 2 * MiB)  # room for clusters: an NBD export cannot grow
    sock = faults(nbdkit, f"file={img}")
    g = BlockGraph()
    q = g.blockdev_add({"driver": "qcow2", "node-name": "q",
                        "file": {"driver": "nbd", "server": {"type": "unix", "path": sock}}})
    q.write(0, b"\x22" * 65536)
    assert q.read(0, 65536) == b"\x22" * 65536
    info = q.image_info(flat=True)
    assert info["filename"] == f"nbd+unix://?socket={sock}" and "actual-size" not in info
    assert q.file is not None and q.file.image_info(True)["virtual-size"] == 2 * MiB
    q.flush()
    g.close_all()
    chk = subprocess.run(["qemu-img", "check", "-q", str(img)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    io = subprocess.run(["qemu-io", "-c", "read -P 0x22 0 64k", "-f", "qcow2", str(img)],
                        capture_output=True, text=True)
    assert "read 65536/65536" in io.stdout, io.stdout + io.stderr


def test_inet_server_and_filenames(nbdkit: Nbdkit) -> None:
    with socket.socket() as s:  # a free port (a tiny race with other tests is acceptable)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nbdkit("-i", "127.0.0.1", "-p", str(port), "memory", "64k", unix=False)
    deadline = time.monotonic() + 10
    g = BlockGraph()
    while True:
        try:
            n = g.blockdev_add({"driver": "nbd", "node-name": "i", "export": "x",
                                "server": {"type": "inet", "host": "127.0.0.1",
                                           "port": str(port)}})
            break
        except SimError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    assert n.filename() == f"nbd://127.0.0.1:{port}/x" and n.length() == 65536
    g.close_all()
    assert export_uri(InetAddress("localhost", "10809"), "") == "nbd://localhost:10809"
    assert export_uri(UnixAddress("/s"), "") == "nbd+unix://?socket=/s"
    with pytest.raises(SimError) as ei:
        g.blockdev_add({"driver": "nbd", "node-name": "i",
                        "server": {"type": "inet", "host": "127.0.0.1", "port": "1"}})
    assert ei.value.desc == "Failed to connect to '127.0.0.1:1': Connection refused"


def test_server_gone_fails_with_eio(nbdkit: Nbdkit, tmp_path: Path) -> None:
    pidfile = tmp_path / "gone.pid"
    sock = nbdkit("-P", str(pidfile), "memory", "1M")
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    g = BlockGraph()
    n = g.blockdev_add(nbd_opts(sock))
    n.write(0, b"x" * 512)
    os.kill(int(pidfile.read_text()), 9)
    for _ in range(2):  # the dead connection stays dead: EIO every time
        with pytest.raises(OSError) as ei:
            n.read(0, 512)
        assert ei.value.errno == 5
    g.close_all()
