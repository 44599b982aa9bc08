"""NBD server benchmarks: nbdcopy throughput and block status, virtsim vs real QEMU."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

GiB = 1 << 30


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    assert path, "qemu-img is needed"
    return path


def _export(q: Any, image: str, sock: str, bitmap: str | None = None) -> None:
    q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "src", "read-only": True,
                           "file": {"driver": "file", "filename": image}})
    q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    args: dict[str, Any] = {"type": "nbd", "id": "e", "node-name": "src", "name": "e"}
    if bitmap:
        args["bitmaps"] = [bitmap]
    q.cmd("block-export-add", args)


def _timed(argv: list[str], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_nbd(qemu: str, virtsim: str, with_process: Callable[..., float],
              raw_qmp: Callable[[str], Any],
              report: Callable[[str, str, str, float | None, str, bool | None], None]) -> None:
    nbdcopy = shutil.which("nbdcopy")
    nbdinfo = shutil.which("nbdinfo")
    if not (nbdcopy and nbdinfo):
        print("nbd: skipped (needs nbdcopy and nbdinfo from libnbd-bin)")
        return
    d = tempfile.mkdtemp(prefix="virtsim-bench-nbd-")
    try:
        full = os.path.join(d, "full.qcow2")
        subprocess.run([_qemu_img(), "create", "-q", "-f", "qcow2", full, "1G"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1G", full], check=True,
                       capture_output=True)
        sock = os.path.join(d, "nbd.sock")
        uri = f"nbd+unix:///e?socket={sock}"
        for label, extra in (("default", []), ("--connections=1", ["--connections=1"])):
            times: dict[str, float] = {}
            for who, binary in (("real", qemu), ("virtsim", virtsim)):
                def run(path: str, extra: list[str] = extra) -> float:
                    q = raw_qmp(path)
                    _export(q, full, sock)
                    dt = _timed([nbdcopy, *extra, uri, "null:"])
                    q.sock.close()
                    return dt

                times[who] = with_process([binary], run)
            gbs = {k: GiB / v / 1e9 for k, v in times.items()}
            r = gbs["virtsim"] / gbs["real"]
            report(f"nbdcopy 1 GiB written export -> null: ({label})",
                   f"{gbs['virtsim']:.2f} GB/s", f"{gbs['real']:.2f} GB/s", r,
                   ">= 1.0x", r >= 1.0)
        nbdkit = shutil.which("nbdkit")
        if nbdkit:
            # the practical ceiling: nbdkit's memory plugin, filled with the same data
            ksock = os.path.join(d, "kit.sock")
            proc = subprocess.Popen([nbdkit, "-f", "-U", ksock, "memory", "1G"])
            try:
                for _ in range(200):
                    if os.path.exists(ksock):
                        break
                    time.sleep(0.01)
                kuri = f"nbd+unix:///?socket={ksock}"
                subprocess.run([_qemu_img(), "convert", "-n", "-O", "raw", full, kuri],
                               check=True)
                dt = _timed([nbdcopy, kuri, "null:"])
                print(f"{'  (nbdkit memory plugin, same data)':<52} "
                      f"{GiB / dt / 1e9:.2f} GB/s", flush=True)
            finally:
                proc.terminate()
                proc.wait()
        _bench_block_status(d, qemu, virtsim, nbdinfo, with_process, raw_qmp, report)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _bench_block_status(d: str, qemu: str, virtsim: str, nbdinfo: str,
                        with_process: Callable[..., float], raw_qmp: Callable[[str], Any],
                        report: Callable[..., None]) -> None:
    """1 TiB sparse image, 10,000 dirty extents (and as many data clusters)."""
    big = os.path.join(d, "big.qcow2")
    subprocess.run([_qemu_img(), "create", "-q", "-f", "qcow2", big, "1T"], check=True)
    subprocess.run([_qemu_img(), "bitmap", "--add", big, "b0"], check=True)
    step = (1 << 40) // 10000 // 65536 * 65536
    cmds: list[str] = []
    for i in range(10000):
        cmds += ["-c", f"write -q {i * step} 4k"]
    subprocess.run(["qemu-io", *cmds, big], check=True, capture_output=True)
    sock = os.path.join(d, "bs.sock")
    uri = f"nbd+unix:///e?socket={sock}"
    for ctx in ("qemu:dirty-bitmap:b0", "base:allocation"):
        times: dict[str, float] = {}
        for who, binary in (("real", qemu), ("virtsim", virtsim)):
            def run(path: str, ctx: str = ctx) -> float:
                q = raw_qmp(path)
                _export(q, big, sock, bitmap="b0")
                dt = _timed([nbdinfo, f"--map={ctx}", uri], runs=2)
                q.sock.close()
                return dt

            times[who] = with_process([binary], run)
        r = times["virtsim"] / times["real"]
        report(f"block status 1 TiB, 10k extents ({ctx.split(':')[-1]})",
               f"{times['virtsim'] * 1000:.0f} ms", f"{times['real'] * 1000:.0f} ms", r,
               "<= 1.0x", r <= 1.0)
