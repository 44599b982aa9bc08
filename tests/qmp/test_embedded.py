"""The embedded emulator (``virtsim.qmp.emulator.embedded``) driven by the real ``qemu.qmp``.

``embedded()`` runs an emulator inside the test's own asyncio loop, reached over a real unix
socket.  These tests use the ``qemu.qmp`` library exactly as a backup tool would against
QEMU, and real ``qemu-img`` as the oracle for the image (made by it, locks, bitmaps stored).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from virtsim.qmp.emulator import EmulatorConfig, embedded

IN_CI = os.environ.get("CI") == "true"
QEMU_IMG = shutil.which("qemu-img")
TIMEOUT = 10.0
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _leave_nothing(tmp_path: Path) -> Iterator[None]:
    """Images made by a test are removed after it (the emulators closed them)."""
    yield
    for p in tmp_path.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def need_qemu_img() -> str:
    if QEMU_IMG is None:
        if IN_CI:
            pytest.fail("CI=true but qemu-img is not installed", pytrace=False)
        pytest.skip("qemu-img not found: it makes the qcow2 images and checks them")
    return QEMU_IMG


async def run(*cmd: str) -> tuple[int, str, str]:
    """A tool run without blocking the loop the emulator lives in."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def make_qcow2(path: Path, size: int = 16 * MiB) -> Path:
    rc, out, err = await run(need_qemu_img(), "create", "-q", "-f", "qcow2", str(path),
                             str(size))
    assert rc == 0, err
    return path


async def image_info(path: Path) -> tuple[int, dict[str, Any] | None, str]:
    """``qemu-img info`` *without* -U: fails while anyone holds the image's write lock."""
    rc, out, err = await run(need_qemu_img(), "info", "--output=json", str(path))
    return rc, (json.loads(out) if rc == 0 else None), err


@asynccontextmanager
async def client(emu: Any, name: str = "test") -> AsyncIterator[QMPClient]:
    qmp = QMPClient(name)
    await asyncio.wait_for(qmp.connect(emu.qmp_address), TIMEOUT)
    try:
        yield qmp
    finally:
        await qmp.disconnect()


async def execute(qmp: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> Any:
    return await asyncio.wait_for(qmp.execute(cmd, args), TIMEOUT)


async def next_event(listener: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
    ev: dict[str, Any] = await asyncio.wait_for(listener.get(), timeout)
    return ev


async def bitmaps(qmp: QMPClient, node: str) -> list[dict[str, Any]]:
    nodes = await execute(qmp, "query-named-block-nodes", {"flat": True})
    found = [n for n in nodes if n["node-name"] == node]
    assert len(found) == 1, [n["node-name"] for n in nodes]
    result: list[dict[str, Any]] = found[0].get("dirty-bitmaps", [])
    return result


async def hmp(qmp: QMPClient, line: str) -> Any:
    return await execute(qmp, "human-monitor-command", {"command-line": line})


# --------------------------------------------------------------------------- the tour


async def test_embedded_with_qemu_qmp_client(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    img = await make_qcow2(tmp_path / "disk.qcow2")
    async with embedded(EmulatorConfig(machine="pc", start_paused=True, name="vm1")) as emu:
        sock = emu.qmp_address
        assert isinstance(sock, str) and os.path.exists(sock)
        async with client(emu) as qmp:
            assert qmp.greeting is not None
            ver = await execute(qmp, "query-version")
            assert (ver["qemu"]["major"], ver["qemu"]["minor"]) == (7, 2)
            assert await execute(qmp, "query-name") == {"name": "vm1"}
            assert (await execute(qmp, "query-status"))["status"] == "prelaunch"

            await execute(qmp, "blockdev-add", {
                "driver": "qcow2", "node-name": "disk0",
                "file": {"driver": "file", "filename": str(img)}})
            # the image is open read-write: qemu-img cannot take its lock now
            rc, _, err = await image_info(img)
            assert rc == 1 and 'Failed to get shared "write" lock' in err, err

            await execute(qmp, "block-dirty-bitmap-add",
                          {"node": "disk0", "name": "bm0", "persistent": True})
            await execute(qmp, "device_add",
                          {"driver": "virtio-blk-pci", "drive": "disk0", "id": "vd0"})
            qdev = "/machine/peripheral/vd0/virtio-backend"
            assert await hmp(qmp, f'qemu-io -d {qdev} "write -P 0xab 0 64k"') == ""
            assert await hmp(qmp, f'qemu-io -d {qdev} "write -P 0xcd 1M 4k"') == ""
            assert await hmp(qmp, f'qemu-io -d {qdev} "read -P 0xab 0 64k"') == ""
            [bm] = await bitmaps(qmp, "disk0")
            assert (bm["name"], bm["count"], bm["granularity"]) == ("bm0", 131072, 65536)
            assert bm["persistent"] is True and bm["recording"] is True

            # events, through the client's default listener (qmp.events)
            qmp.events.clear()
            await execute(qmp, "cont")
            ev = await next_event(qmp.events)
            assert ev["event"] == "RESUME"
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            await execute(qmp, "stop")
            assert (await next_event(qmp.events))["event"] == "STOP"
            with qmp.listener("SHUTDOWN") as shutdown:
                await execute(qmp, "quit")
                ev = await next_event(shutdown)
            assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await asyncio.wait_for(emu.wait_quit(), TIMEOUT)
    # the context has closed everything
    assert not os.path.exists(sock)
    assert not os.path.exists(os.path.dirname(sock))
    rc, info, err = await image_info(img)
    assert rc == 0, err
    assert info is not None
    stored = info["format-specific"]["data"].get("bitmaps")
    assert stored == [{"flags": ["auto"], "name": "bm0", "granularity": 65536}]
    rc, out, err = await run(need_qemu_img(), "check", str(img))
    assert rc == 0, out + err
    # qemu-io's report went to stdout, as QEMU prints it
    printed = capsys.readouterr().out.splitlines()
    assert [ln for ln in printed if not ln.startswith(("64 KiB", "4 KiB"))] == [
        "wrote 65536/65536 bytes at offset 0", "wrote 4096/4096 bytes at offset 1048576",
        "read 65536/65536 bytes at offset 0"]


async def test_data_written_reaches_the_image(tmp_path: Path) -> None:
    """qemu-io (real, on the closed image) reads back what the guest wrote in virtsim."""
    img = await make_qcow2(tmp_path / "disk.qcow2")
    cfg = EmulatorConfig(machine="pc", start_paused=True, echo_qemu_io=False)
    async with embedded(cfg) as emu, client(emu) as qmp:
        await execute(qmp, "blockdev-add", {"driver": "qcow2", "node-name": "disk0",
                                            "file": {"driver": "file", "filename": str(img)}})
        await execute(qmp, "device_add", {"driver": "virtio-blk-pci", "drive": "disk0",
                                          "id": "vd0"})
        line = 'qemu-io -d /machine/peripheral/vd0/virtio-backend "write -P 0x5a 2M 128k"'
        assert await hmp(qmp, line) == ""
    qemu_io = shutil.which("qemu-io")
    if qemu_io is None:
        if IN_CI:
            pytest.fail("CI=true but qemu-io is not installed", pytrace=False)
        pytest.skip("qemu-io not found")
    rc, out, err = await run(qemu_io, "-f", "qcow2", "-c", "read -P 0x5a 2M 128k",
                             "-c", "read -P 0 0 2M", str(img))
    assert rc == 0 and "Pattern verification failed" not in out, out + err
    assert out.count("read ") == 2, out


# --------------------------------------------------------------------------- isolation


async def test_two_embedded_emulators_are_independent(tmp_path: Path) -> None:
    img_a = await make_qcow2(tmp_path / "a.qcow2")
    img_b = await make_qcow2(tmp_path / "b.qcow2", 32 * MiB)
    async with embedded(EmulatorConfig(name="a", start_paused=True)) as a, \
            embedded(EmulatorConfig(name="b", start_paused=True)) as b:
        assert a.qmp_address != b.qmp_address
        async with client(a, "qa") as qa, client(b, "qb") as qb:
            assert await execute(qa, "query-name") == {"name": "a"}
            assert await execute(qb, "query-name") == {"name": "b"}
            # the same node name in both: no clash
            for qmp, img in ((qa, img_a), (qb, img_b)):
                await execute(qmp, "blockdev-add", {
                    "driver": "qcow2", "node-name": "disk0",
                    "file": {"driver": "file", "filename": str(img)}})
            await execute(qa, "block-dirty-bitmap-add", {"node": "disk0", "name": "only-a"})
            await execute(qa, "block-dirty-bitmap-add", {"node": "disk0", "name": "shared"})
            await execute(qb, "block-dirty-bitmap-add", {"node": "disk0", "name": "shared",
                                                         "granularity": 131072})
            await execute(qa, "x-virtsim-guest-workload",
                          {"device": "disk0", "seed": 1, "writes": 20})
            got_a = {bm["name"]: bm for bm in await bitmaps(qa, "disk0")}
            got_b = {bm["name"]: bm for bm in await bitmaps(qb, "disk0")}
            assert set(got_a) == {"only-a", "shared"} and set(got_b) == {"shared"}
            assert got_a["shared"]["count"] > 0 and got_b["shared"]["count"] == 0
            assert got_b["shared"]["granularity"] == 131072
            with pytest.raises(ExecuteError) as exc:
                await execute(qb, "block-dirty-bitmap-remove",
                              {"node": "disk0", "name": "only-a"})
            assert str(exc.value) == "Dirty bitmap 'only-a' not found"

            # run state and events are per emulator
            qa.events.clear()
            qb.events.clear()
            await execute(qa, "cont")
            assert (await next_event(qa.events))["event"] == "RESUME"
            assert (await execute(qb, "query-status"))["status"] == "prelaunch"
            assert qb.events.empty()

            # one quits; the other keeps serving, its image still open
            await execute(qa, "quit")
            await asyncio.wait_for(a.wait_quit(), TIMEOUT)
            assert (await execute(qb, "query-status"))["status"] == "prelaunch"
            assert qb.events.empty()
    for img in (img_a, img_b):
        rc, _, err = await image_info(img)
        assert rc == 0, err


async def test_cleanup_after_exit_and_after_an_exception(tmp_path: Path) -> None:
    img = await make_qcow2(tmp_path / "disk.qcow2")
    socks = []

    async def session(fail: bool) -> None:
        async with embedded() as emu:
            socks.append(emu.qmp_address)
            async with client(emu) as qmp:
                await execute(qmp, "blockdev-add", {
                    "driver": "qcow2", "node-name": "disk0",
                    "file": {"driver": "file", "filename": str(img)}})
                await execute(qmp, "block-dirty-bitmap-add",
                              {"node": "disk0", "name": f"bm{len(socks)}", "persistent": True})
                rc, _, _ = await image_info(img)
                assert rc == 1  # locked while open
                if fail:
                    raise RuntimeError("the caller's code failed")

    await session(fail=False)
    with pytest.raises(RuntimeError, match="the caller's code failed"):
        await session(fail=True)
    for sock in socks:
        assert isinstance(sock, str)
        assert not os.path.exists(sock)
        assert not os.path.exists(os.path.dirname(sock))
    rc, info, err = await image_info(img)  # no lock left behind, both bitmaps stored
    assert rc == 0, err
    assert info is not None
    names = [bm["name"] for bm in info["format-specific"]["data"].get("bitmaps", [])]
    assert sorted(names) == ["bm1", "bm2"]


async def test_socket_dir_argument(tmp_path: Path) -> None:
    """``socket_dir``: the private directory is made there and removed afterwards."""
    async with embedded(socket_dir=str(tmp_path)) as emu, client(emu) as qmp:
        sock = emu.qmp_address
        assert isinstance(sock, str)
        assert os.path.dirname(os.path.dirname(sock)) == str(tmp_path)
        assert os.stat(os.path.dirname(sock)).st_mode & 0o777 == 0o700
        assert (await execute(qmp, "query-status"))["running"] is True
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- workload


WORKLOAD = {"writes": 200, "size-min": 4096, "size-max": 131072, "zero-ratio": 0.2,
            "discard-ratio": 0.1, "align": 4096,
            "region": {"offset": 4 * MiB, "length": 32 * MiB}}


async def _workload_sha256(args: dict[str, Any], granularity: int = 65536,
                           qdev: bool = False) -> tuple[str, int, Any]:
    """A fresh emulator, a 64 MiB disk, one bitmap, the workload: (sha256, count, reply)."""
    cfg = EmulatorConfig(machine="pc", start_paused=True, echo_qemu_io=False)
    async with embedded(cfg) as emu, client(emu) as qmp:
        await execute(qmp, "blockdev-add", {"driver": "null-co", "node-name": "disk0",
                                            "size": 64 * MiB})
        await execute(qmp, "block-dirty-bitmap-add",
                      {"node": "disk0", "name": "bm0", "granularity": granularity})
        device = "disk0"
        if qdev:
            await execute(qmp, "device_add", {"driver": "virtio-blk-pci", "drive": "disk0",
                                              "id": "vd0"})
            device = "/machine/peripheral/vd0/virtio-backend"
        reply = await execute(qmp, "x-virtsim-guest-workload",
                              {"device": device, "qdev": qdev, **args})
        sha = await execute(qmp, "x-debug-block-dirty-bitmap-sha256",
                            {"node": "disk0", "name": "bm0"})
        [bm] = await bitmaps(qmp, "disk0")
        return sha["sha256"], bm["count"], reply


@pytest.mark.parametrize("pattern", ["random", "seq"])
async def test_guest_workload_is_deterministic(pattern: str) -> None:
    args = {**WORKLOAD, "pattern": pattern}
    # two emulators side by side in one loop, same seed
    (sha1, count1, rep1), (sha2, count2, rep2), (sha3, count3, _) = await asyncio.gather(
        _workload_sha256({**args, "seed": 42}), _workload_sha256({**args, "seed": 42}),
        _workload_sha256({**args, "seed": 43}))
    assert (sha1, count1, rep1) == (sha2, count2, rep2)
    assert rep1["requests"] == 200
    region = WORKLOAD["region"]
    assert isinstance(region, dict)
    assert 0 < count1 <= region["length"]
    assert sha3 != sha1, "a different seed dirties different clusters"
    # and through the device's QOM path, the same ops
    sha4, count4, rep4 = await _workload_sha256({**args, "seed": 42}, qdev=True)
    assert (sha4, count4, rep4) == (sha1, count1, rep1)


async def test_guest_workload_region_is_respected() -> None:
    """Nothing outside ``region`` gets dirty: with one 4 MiB granule exactly covering the
    region, the count is that one granule, never more."""
    args = {**WORKLOAD, "seed": 5, "size-max": 65536, "region": {"offset": 4 * MiB,
                                                                 "length": 4 * MiB}}
    sha, count, _ = await _workload_sha256(args, granularity=4 * MiB)
    assert count == 4 * MiB
    sha_empty, count_empty, rep = await _workload_sha256({**args, "writes": 0},
                                                         granularity=4 * MiB)
    assert (count_empty, rep) == (0, {"requests": 0, "bytes": 0})
    assert sha_empty != sha
