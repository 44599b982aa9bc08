"""``make bench``: virtsim against the real tools, measured in the same run.

Each line prints virtsim's figure, the real tool's, the ratio, and the target, so a
regression shows as a broken target rather than a number nobody remembers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

QEMU = shutil.which("qemu-system-x86_64")
VENV_BIN = os.path.dirname(sys.executable)
VIRTSIM_QEMU = shutil.which("virtsim-qemu", path=VENV_BIN) or shutil.which("virtsim-qemu")

results: list[tuple[str, str, str, str, bool | None]] = []


def report(name: str, ours: str, theirs: str, ratio: float | None, target: str,
           ok: bool | None) -> None:
    r = f"{ratio:.2f}x" if ratio is not None else "-"
    status = {True: "OK", False: "MISSED", None: "-"}[ok]
    results.append((name, ours, theirs, r, ok))
    print(f"{name:<52} virtsim {ours:>12}   real {theirs:>12}   ratio {r:>7}   "
          f"target {target:<10} {status}", flush=True)


def wait_for_socket(path: str, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.0005)


def start_to_greeting(binary: list[str], runs: int = 10, first_reply: bool = False) -> float:
    """Median seconds from spawning the process to reading the QMP greeting (or, with
    ``first_reply``, the reply to qmp_capabilities: the time until it really serves)."""
    times = []
    for _ in range(runs):
        d = tempfile.mkdtemp()
        path = os.path.join(d, "q.sock")
        t0 = time.perf_counter()
        p = subprocess.Popen(binary + ["-machine", "none", "-nodefaults", "-display", "none",
                                       "-qmp", f"unix:{path},server=on,wait=off"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            s = wait_for_socket(path)
            f = s.makefile("rwb")
            f.readline()
            if first_reply:
                f.write(b'{"execute":"qmp_capabilities"}\n')
                f.flush()
                f.readline()
            times.append(time.perf_counter() - t0)
            s.close()
        finally:
            p.kill()
            p.wait()
            shutil.rmtree(d, ignore_errors=True)
    times.sort()
    return times[len(times) // 2]


def round_trips(path: str, n: int) -> float:
    s = wait_for_socket(path)
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute":"qmp_capabilities"}\n')
    f.flush()
    f.readline()
    t0 = time.perf_counter()
    for _ in range(n):
        f.write(b'{"execute":"query-version"}\n')
        f.flush()
        f.readline()
    dt = time.perf_counter() - t0
    s.close()
    return dt


def with_process(binary: list[str], fn: Callable[[str], float]) -> float:
    d = tempfile.mkdtemp()
    path = os.path.join(d, "q.sock")
    p = subprocess.Popen(binary + ["-machine", "none", "-nodefaults", "-display", "none",
                                   "-qmp", f"unix:{path},server=on,wait=off"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(path).close()
        return fn(path)
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(d, ignore_errors=True)


def bench_qmp() -> None:
    assert QEMU and VIRTSIM_QEMU
    n = 1000
    real = with_process([QEMU], lambda p: round_trips(p, n))
    ours = with_process([VIRTSIM_QEMU], lambda p: round_trips(p, n))
    report("QMP round trip, 1000x query-version (process)", f"{ours*1000:.0f} ms",
           f"{real*1000:.0f} ms", ours / real, "<= 0.5x", ours / real <= 0.5)

    async def embedded_rt() -> float:
        from virtsim.qmp.emulator import embedded

        # the client runs in its own process, as it does against the real QEMU
        code = ("import sys, bench.__main__ as b; "
                f"print(b.round_trips(sys.argv[1], {n}))")
        async with embedded() as emu:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, str(emu.qmp_address),
                stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)))
            out, _ = await proc.communicate()
            return float(out)

    emb = asyncio.run(embedded_rt())
    report("QMP round trip, 1000x query-version (embedded)", f"{emb*1000:.0f} ms",
           f"{real*1000:.0f} ms", emb / real, "<= 0.5x", emb / real <= 0.5)


def bench_start() -> None:
    assert QEMU and VIRTSIM_QEMU
    real = start_to_greeting([QEMU])
    ours = start_to_greeting([VIRTSIM_QEMU])
    report("process start -> greeting", f"{ours*1000:.1f} ms", f"{real*1000:.1f} ms",
           ours / real, "<= 3x", ours / real <= 3)
    real1 = start_to_greeting([QEMU], first_reply=True)
    ours1 = start_to_greeting([VIRTSIM_QEMU], first_reply=True)
    report("process start -> first command reply (info)", f"{ours1*1000:.1f} ms",
           f"{real1*1000:.1f} ms", ours1 / real1, "-", None)

    async def emb() -> float:
        from virtsim.qmp.emulator import embedded

        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            async with embedded() as emu:
                r, w = await asyncio.open_unix_connection(str(emu.qmp_address))
                await r.readline()
                times.append(time.perf_counter() - t0)
                w.close()
        times.sort()
        return times[len(times) // 2]

    e = asyncio.run(emb())
    report("embedded start -> first QMP reply", f"{e*1000:.2f} ms", f"{real*1000:.1f} ms",
           e / real, "<= 0.1x", e / real <= 0.1)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_memory() -> None:
    from virtsim.qmp.emulator import Emulator, EmulatorConfig, MonitorSpec

    async def run() -> float:
        d = tempfile.mkdtemp()
        gc.collect()
        before = rss_kib()
        emus = []
        for i in range(1000):
            emu = Emulator(EmulatorConfig(monitors=[MonitorSpec("unix",
                                                                path=f"{d}/{i}.sock")]))
            await emu.start()
            emus.append(emu)
        gc.collect()
        after = rss_kib()
        for emu in emus:
            await emu.close()
        shutil.rmtree(d, ignore_errors=True)
        return (after - before) / 1000 / 1024

    per = asyncio.run(run())
    report("idle memory per embedded emulator (1000)", f"{per*1024:.0f} KiB", "-", None,
           "<= 1 MiB", per <= 1.0)


def bench_bitmap() -> None:
    from virtsim.sim.bitmap import DirtyBitmap

    size = 16 << 40
    gran = 64 << 10
    granules = size // gran
    dirty = granules // 1000
    a = DirtyBitmap(size, gran, "a")
    b = DirtyBitmap(size, gran, "b")
    step = granules // dirty
    t0 = time.perf_counter()
    for i in range(dirty):
        a.set_dirty(i * step * gran, gran)
        b.set_dirty((i * step + 1) * gran, gran)
    fill = time.perf_counter() - t0
    mem = a.memory_bytes() if hasattr(a, "memory_bytes") else len(a.granules().serialize())
    t0 = time.perf_counter()
    a.merge_from(b)
    merge = time.perf_counter() - t0
    t0 = time.perf_counter()
    count = a.count()
    cnt = time.perf_counter() - t0
    t0 = time.perf_counter()
    a.clear()
    clr = time.perf_counter() - t0
    report("16 TiB bitmap, 0.1% dirty: size", f"{mem/1024:.0f} KiB", "-", None, "<= 1 MiB",
           mem <= 1 << 20)
    report("16 TiB bitmap: merge / count / clear",
           f"{merge*1000:.1f}/{cnt*1000:.2f}/{clr*1000:.2f} ms", "-", None, "ms", merge < 0.1)
    _ = (fill, count)


class RawQmp:
    """A minimal blocking QMP client for the benchmarks (events skipped unless awaited)."""

    def __init__(self, path: str) -> None:
        self.sock = wait_for_socket(path)
        self.f = self.sock.makefile("rwb")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(reply["error"]["desc"])
            return reply["return"]

    events: list[dict[str, Any]] = []

    def wait_event(self, name: str) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev["event"] == name:
                return self.events.pop(i)
        while True:
            ev = json.loads(self.f.readline())
            if ev.get("event") == name:
                return ev  # type: ignore[no-any-return]


def bench_backup() -> None:
    """Push full backup of a 1 GiB qcow2 to a qcow2 target, fully written and sparse."""
    assert QEMU and VIRTSIM_QEMU
    qemu_img = shutil.which("qemu-img")
    assert qemu_img
    d = tempfile.mkdtemp(prefix="virtsim-bench-")
    try:
        full = os.path.join(d, "full.qcow2")
        sparse = os.path.join(d, "sparse.qcow2")
        raw = os.path.join(d, "data.raw")
        with open(raw, "wb") as f:
            block = bytes(range(256)) * 4096
            for _ in range(1024):
                f.write(block)
        subprocess.run([qemu_img, "convert", "-O", "qcow2", raw, full], check=True)
        os.unlink(raw)
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", sparse, "1G"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 0x5a 512M 4M", sparse], check=True,
                       capture_output=True)
        for label, src in (("fully written", full), ("sparse", sparse)):
            times = {}
            for who, binary in (("real", QEMU), ("virtsim", VIRTSIM_QEMU)):
                tgt = os.path.join(d, f"tgt-{who}.qcow2")
                subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", tgt, "1G"],
                               check=True)

                def run(path: str, src: str = src, tgt: str = tgt) -> float:
                    q = RawQmp(path)
                    q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "src", "file": {
                        "driver": "file", "filename": src}})
                    q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {
                        "driver": "file", "filename": tgt}})
                    t0 = time.perf_counter()
                    q.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                              "sync": "full"})
                    q.wait_event("BLOCK_JOB_COMPLETED")
                    dt = time.perf_counter() - t0
                    q.sock.close()
                    return dt

                times[who] = with_process([binary], run)
                os.unlink(tgt)
            r = times["virtsim"] / times["real"]
            report(f"push full backup, 1 GiB qcow2 {label}", f"{times['virtsim']:.2f} s",
                   f"{times['real']:.2f} s", r, "<= 1.0x", r <= 1.0)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bench_jobs() -> None:
    """100 throttled backup jobs at once: the loop must stay responsive (<= 2x idle RT)."""
    assert VIRTSIM_QEMU and QEMU
    n, rts = 100, 200

    def rt(q: RawQmp) -> float:
        t0 = time.perf_counter()
        for _ in range(rts):
            q.cmd("query-version")
        return time.perf_counter() - t0

    def run(path: str) -> float:
        q = RawQmp(path)
        rt(q)                      # warm up (lazy imports, caches)
        idle = rt(q)
        for i in range(n):
            for role in ("s", "t"):
                q.cmd("blockdev-add", {"driver": "null-co", "node-name": f"{role}{i}",
                                       "size": 1 << 30})
        for i in range(n):
            q.cmd("blockdev-backup", {"job-id": f"j{i}", "device": f"s{i}",
                                      "target": f"t{i}", "sync": "full", "speed": 1 << 20})
        busy = rt(q)
        q.sock.close()
        return busy / idle

    ours = with_process([VIRTSIM_QEMU], run)
    real = with_process([QEMU], run)
    report("QMP RT with 100 throttled jobs / idle RT", f"{ours:.2f}x", f"{real:.2f}x", None,
           "<= 2x idle", ours <= 2.0)


def bench_nbd_server() -> None:
    from bench.nbd import bench_nbd

    assert QEMU and VIRTSIM_QEMU
    bench_nbd(QEMU, VIRTSIM_QEMU, with_process, RawQmp, report)


def bench_api_flow() -> None:
    from bench.api import bench_api

    assert VIRTSIM_QEMU
    bench_api(VIRTSIM_QEMU, report)


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench")
    ap.add_argument("only", nargs="*", help="qmp start memory bitmap backup nbd api jobs")
    ns = ap.parse_args()
    todo: dict[str, Callable[[], None]] = {"qmp": bench_qmp, "start": bench_start,
                                           "memory": bench_memory, "bitmap": bench_bitmap,
                                           "backup": bench_backup, "nbd": bench_nbd_server,
                                           "api": bench_api_flow,
                                           "jobs": bench_jobs}
    for name, fn in todo.items():
        if ns.only and name not in ns.only:
            continue
        if name in ("qmp", "start", "backup", "nbd", "api", "jobs") and not (QEMU and VIRTSIM_QEMU):
            print(f"{name}: skipped (needs qemu-system-x86_64 and virtsim-qemu)")
            continue
        fn()
    missed = [r for r in results if r[4] is False]
    print(json.dumps({"missed": [r[0] for r in missed]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


_ = Any
