"""How the backup job issues its copy requests (block-copy), as QEMU 7.2 shows it.

Pinned against the binary by tests/differential/scenarios/matrix-*.qmp (the iotest 257
bitmap-sync matrix): a request covers one block-status run (so a throttled full backup's
first request is the first data cluster, not 1 MiB), requests go out in bursts that run
even after one of them failed, and a job stopped by an I/O error that is then cancelled
runs one more burst (its retry starts before it sees the cancel).  That a cancel or a
job-pause of an unthrottled file backup waits for its requests in flight was observed on
QEMU by hand: how many requests that is depends on I/O timing under load, so it cannot be
a differential scenario.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from virtsim.sim.backup import BackupAction, BackupJob
from virtsim.sim.block import BlockGraph, Node
from virtsim.sim.clock import VirtualClock
from virtsim.sim.events import EventBus
from virtsim.sim.job import JobManager, JobRunner
from virtsim.sim.transaction import run_transaction

MiB = 1 << 20
KiB = 1 << 10


class Env:
    def __init__(self) -> None:
        self.bus = EventBus()
        self.clock = VirtualClock()
        self.jobs = JobManager(self.bus, self.clock)
        self.runner = JobRunner(self.jobs)
        self.graph = BlockGraph()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.bus.subscribe(lambda n, d: self.events.append((n, dict(d or {}))))

    def null(self, name: str, size: int = 8 * MiB) -> Node:
        return self.graph.blockdev_add({"driver": "null-co", "node-name": name, "size": size})

    def backup(self, **args: Any) -> BackupJob:
        run_transaction(self.graph, [{"type": "blockdev-backup", "data": args}], None,
                        {"blockdev-backup": BackupAction}, self.jobs)
        job = self.jobs.get(args["job-id"])
        assert isinstance(job, BackupJob)
        return job

    def named(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.events if n == name]


@pytest.fixture
def env() -> Env:
    return Env()


class FailOnce:
    """Fails the first write to a node that touches [offset, offset+length)."""

    def __init__(self, node: Node, offset: int, length: int) -> None:
        self.armed = True

        def hit(off: int, n: int) -> None:
            if self.armed and off < offset + length and offset < off + n:
                self.armed = False
                raise OSError(errno.EIO, "injected")

        write, zeroes = node._drv_write, node._drv_write_zeroes

        def fail_write(off: int, data: bytes) -> None:
            hit(off, len(data))
            write(off, data)

        def fail_zeroes(off: int, n: int, unmap: bool) -> None:
            hit(off, n)
            zeroes(off, n, unmap)

        node.__dict__["_drv_write"] = fail_write
        node.__dict__["_drv_write_zeroes"] = fail_zeroes


def test_request_covers_one_status_run(env: Env, tmp_path: Path) -> None:
    """Observed (matrix-full-*-cancel): at speed 1 the first request of a full backup is
    the 64k data cluster at 0, not the 1 MiB chunk; guest writes then copy per cluster."""
    path = tmp_path / "s.raw"
    path.write_bytes(b"")
    os.truncate(path, 8 * MiB)
    src = env.graph.blockdev_add({"driver": "raw", "node-name": "src", "file": {
        "driver": "file", "filename": str(path)}})
    src.write(0, b"\x11" * 64 * KiB)
    src.write(MiB, b"\x22" * 64 * KiB)
    env.null("tgt")
    job = env.backup(device="src", target="tgt", sync="full", speed=1, **{"job-id": "j"})
    env.runner.advance(1)
    assert job.progress_current == 64 * KiB
    src.write(192 * KiB, b"\x33" * 64 * KiB)  # a zero cluster: copied as zeroes
    assert job.progress_current == 128 * KiB


def test_burst_runs_all_requests_after_a_failure(env: Env) -> None:
    """Every request of a burst runs; only the failed one stays dirty, and with
    bitmap-mode always the bitmap gets what was left (matrix-full-always-ioerror)."""
    src = env.null("src")
    FailOnce(env.null("tgt"), MiB, MiB)
    src.bitmaps.create(8 * MiB, 65536, "b0")
    # 25 MiB/s: 2.5 MiB per 100 ms slice, so a burst is three 1 MiB requests
    job = env.backup(device="src", target="tgt", sync="full", bitmap="b0", speed=25 * MiB,
                     **{"job-id": "j", "bitmap-mode": "always"})
    env.runner.run_until_idle()
    assert env.named("BLOCK_JOB_ERROR") == [
        {"device": "j", "operation": "write", "action": "report"}]
    done = env.named("BLOCK_JOB_COMPLETED")[0]
    assert (done["offset"], done["error"]) == (2 * MiB, "Input/output error")
    assert job.status == "null"
    b0 = src.bitmaps.get("b0")
    assert b0 is not None and b0.count() == 6 * MiB
    assert list(b0.dirty_extents(0, 8 * MiB)) == [(MiB, MiB), (3 * MiB, 5 * MiB)]


def test_cancel_after_stop_runs_one_more_burst(env: Env) -> None:
    """Observed (matrix-target-errors): cancelling a job paused by on-target-error=stop
    resumes it into the retry, which starts over at 0 and copies one burst first."""
    env.null("src")
    FailOnce(env.null("tgt"), MiB, MiB)
    job = env.backup(device="src", target="tgt", sync="full", speed=25 * MiB,
                     **{"job-id": "j", "on-target-error": "stop"})
    env.runner.run_until_idle()
    assert job.status == "paused" and job.progress_current == 2 * MiB
    env.runner.advance(1)  # the throttle's slice is long over
    env.events.clear()
    env.jobs.job_cancel("j")
    env.runner.run_until_idle()
    statuses = [d["status"] for d in env.named("JOB_STATUS_CHANGE")]
    assert statuses == ["running", "aborting", "concluded", "null"]
    # the failed 1 MiB again, then [3M, 5M): the throttle ends the burst
    assert env.named("BLOCK_JOB_CANCELLED")[0]["offset"] == 5 * MiB


def test_resume_after_stop_retries_from_the_start(env: Env) -> None:
    env.null("src")
    FailOnce(env.null("tgt"), MiB, MiB)
    job = env.backup(device="src", target="tgt", sync="full", speed=25 * MiB,
                     **{"job-id": "j", "on-target-error": "stop"})
    env.runner.run_until_idle()
    env.jobs.job_resume("j")
    env.runner.run_until_idle()
    done = env.named("BLOCK_JOB_COMPLETED")
    assert done and "error" not in done[0] and done[0]["offset"] == 8 * MiB
    assert job.status == "null"


def test_cancel_waits_for_requests_in_flight(env: Env, tmp_path: Path) -> None:
    """Observed on an unthrottled 256 MiB file backup cancelled right after it started:
    the reply comes first, then the 65 requests in flight (64 workers and the next one)
    complete, then aborting and BLOCK_JOB_CANCELLED with offset 65 MiB."""
    for name, fill in (("src", b"\x5a"), ("tgt", b"")):
        path = tmp_path / f"{name}.raw"
        path.write_bytes(fill * (16 * MiB))
        os.truncate(path, 16 * MiB)
        env.graph.blockdev_add({"driver": "raw", "node-name": name, "file": {
            "driver": "file", "filename": str(path)}})
    job = env.backup(device="src", target="tgt", sync="full",
                     **{"job-id": "j", "x-perf": {"max-workers": 4}})
    env.runner.run_due()
    assert job.progress_current == 5 * MiB
    env.jobs.job_cancel("j")
    assert job.status == "running" and not env.named("BLOCK_JOB_CANCELLED")
    env.runner.run_until_idle()
    assert env.named("BLOCK_JOB_CANCELLED")[0]["offset"] == 5 * MiB
    assert job.status == "null"


def test_pause_waits_for_requests_in_flight(env: Env, tmp_path: Path) -> None:
    """Observed: job-pause of an unthrottled file backup answers first; ``paused``
    follows once the requests in flight are done (a drain parks the job at once)."""
    for name, fill in (("src", b"\x5a"), ("tgt", b"")):
        path = tmp_path / f"{name}.raw"
        path.write_bytes(fill * (16 * MiB))
        os.truncate(path, 16 * MiB)
        env.graph.blockdev_add({"driver": "raw", "node-name": name, "file": {
            "driver": "file", "filename": str(path)}})
    job = env.backup(device="src", target="tgt", sync="full",
                     **{"job-id": "j", "x-perf": {"max-workers": 4}})
    env.runner.run_due()
    env.events.clear()
    env.jobs.job_pause("j")
    assert job.status == "running" and env.events == []
    env.runner.run_until_idle()
    assert job.status == "paused" and job.progress_current == 5 * MiB
    env.jobs.job_resume("j")
    env.runner.run_until_idle()
    assert env.named("BLOCK_JOB_COMPLETED")[0]["offset"] == 16 * MiB
