"""Push backups (virtsim.sim.backup) against QEMU 7.2's behaviour.

Event sequences, texts and bitmap counts marked "observed" were recorded on QEMU 7.2.22
with the scenarios in tests/differential/scenarios/backup-*.qmp.  Everything runs on a
VirtualClock: a job throttled with ``speed`` is stepped by the JobRunner, with guest
writes in between, so the copy-before-write path is exercised deterministically.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtsim.sim.backup import BackupAction, BackupJob, CbwNode
from virtsim.sim.block import BlockGraph, Node
from virtsim.sim.clock import VirtualClock
from virtsim.sim.errors import SimError
from virtsim.sim.events import EventBus
from virtsim.sim.job import JobManager, JobRunner
from virtsim.sim.transaction import ACTIONS, run_transaction

MiB = 1 << 20


class Env:
    """A graph, a job manager on a virtual clock, and the events they emit."""

    def __init__(self) -> None:
        self.bus = EventBus()
        self.clock = VirtualClock()
        self.jobs = JobManager(self.bus, self.clock)
        self.runner = JobRunner(self.jobs)
        self.graph = BlockGraph()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.warnings: list[str] = []
        self.graph.warn = self.warnings.append
        self.bus.subscribe(lambda n, d: self.events.append((n, dict(d or {}))))

    def null(self, name: str, size: int = 8 * MiB) -> Node:
        return self.graph.blockdev_add({"driver": "null-co", "node-name": name, "size": size})

    def backup(self, **args: Any) -> None:
        run_transaction(self.graph, [{"type": "blockdev-backup", "data": args}], None,
                        {"blockdev-backup": BackupAction}, self.jobs)

    def tx(self, actions: list[dict[str, Any]], grouped: bool = False) -> None:
        props = {"completion-mode": "grouped"} if grouped else None
        run_transaction(self.graph, actions, props, ACTIONS, self.jobs)

    def statuses(self, job_id: str | None = None) -> list[str]:
        out = []
        for name, data in self.events:
            if name == "JOB_STATUS_CHANGE" and job_id in (None, data["id"]):
                out.append(data["status"] if job_id else f"{data['id']}:{data['status']}")
            elif name.startswith("BLOCK_JOB"):
                out.append(name)
        return out

    def job(self, job_id: str) -> BackupJob:
        job = self.jobs.get(job_id)
        assert isinstance(job, BackupJob)
        return job


@pytest.fixture
def env() -> Env:
    return Env()


def err(fn: Any, **kw: Any) -> str:
    with pytest.raises(SimError) as ei:
        fn(**kw)
    return ei.value.desc


# --------------------------------------------------------------------------- validation


def test_validation_order_and_texts(env: Env) -> None:
    """Observed texts, in QEMU 7.2's check order (backup-errors.qmp)."""
    src, _tgt = env.null("src", 4 * MiB), env.null("tgt", 4 * MiB)
    env.null("small", MiB)
    src.bitmaps.create(4 * MiB, 65536, "b0")
    b = env.backup
    assert err(b, device="nosuch", target="x", sync="full") == \
        "Cannot find device='nosuch' nor node-name='nosuch'"
    assert err(b, device="src", target="x", sync="full") == \
        "Cannot find device='x' nor node-name='x'"
    assert err(b, device="src", target="tgt", sync="incremental") == \
        "must provide a valid bitmap name for 'incremental' sync mode"
    assert err(b, device="src", target="tgt", sync="incremental", bitmap="no",
               **{"bitmap-mode": "always"}) == \
        "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
    assert err(b, device="src", target="tgt", sync="bitmap", bitmap="no") == \
        "Bitmap 'no' could not be found"
    assert err(b, device="src", target="tgt", sync="bitmap", bitmap="b0") == \
        "Bitmap sync mode must be given when providing a bitmap"
    assert err(b, device="src", target="tgt", sync="none", bitmap="b0",
               **{"bitmap-mode": "on-success"}) == \
        "sync mode 'none' does not produce meaningful bitmap outputs"
    assert err(b, device="src", target="tgt", sync="top", bitmap="b0",
               **{"bitmap-mode": "never"}) == \
        "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'top'"
    assert err(b, device="src", target="tgt", sync="full", **{"bitmap-mode": "never"}) == \
        "Cannot specify bitmap sync mode without a bitmap"
    assert err(b, device="src", target="src", sync="full") == \
        "Source and target cannot be the same"
    assert err(b, device="src", target="tgt", sync="full", compress=True) == \
        "Compression is not supported for this drive "
    assert err(b, device="src", target="tgt", sync="full", **{"x-perf": {"max-workers": 0}}) \
        == "max-workers must be between 1 and 2147483647"
    assert err(b, device="src", target="small", sync="bitmap", bitmap="b0",
               **{"bitmap-mode": "always"}) == "Source and target image have different sizes"
    assert env.warnings == []  # nothing reached the filter yet
    assert err(b, device="src", target="tgt", sync="full", **{"filter-node-name": "tgt"}) \
        == "Could not create node: Duplicate nodes with node-name='tgt'"
    assert err(b, device="src", target="tgt", sync="full") == "Invalid job ID ''"
    assert err(b, device="src", target="tgt", sync="full", **{"job-id": "1j"}) == \
        "Invalid job ID '1j'"
    assert len(env.warnings) == 2 and "default block size of 65536" in env.warnings[0]
    # nothing left behind: no successor, no filter, no job
    assert [bm.info()["name"] for bm in src.bitmaps] == ["b0"]
    assert not src.bitmaps.get("b0").busy
    assert [n.node_name for n in env.graph.nodes] == ["src", "tgt", "small"]
    assert env.jobs.jobs() == [] and env.events == []


def test_target_in_use_and_duplicate_id(env: Env) -> None:
    env.null("src"), env.null("tgt"), env.null("t2")
    env.backup(device="src", target="tgt", sync="full", speed=1, **{"job-id": "j"})
    env.events.clear()
    # observed: two drains (transaction's drain_all, then the source) before the error
    assert err(env.backup, device="src", target="tgt", sync="full", **{"job-id": "k"}) == \
        "Node 'tgt' is busy: block device is in use by block job: backup"
    assert env.statuses("j") == ["paused", "running", "paused", "running"]
    assert err(env.backup, device="src", target="t2", sync="full", **{"job-id": "j"}) == \
        "Job ID 'j' already in use"
    assert err(env.graph.blockdev_del, node_name="tgt") == \
        "Node 'tgt' is busy: block device is in use by block job: backup"


# --------------------------------------------------------------------------- lifecycle


def test_full_backup_lifecycle_and_events(env: Env) -> None:
    env.null("src"), env.null("tgt")
    env.backup(device="src", target="tgt", sync="full", **{"job-id": "bk"})
    env.runner.run_until_idle()
    assert env.statuses() == [
        "bk:created", "bk:running", "bk:paused", "bk:running", "bk:waiting", "bk:pending",
        "BLOCK_JOB_COMPLETED", "bk:concluded", "bk:null"]
    done = [d for n, d in env.events if n == "BLOCK_JOB_COMPLETED"][0]
    assert done == {"type": "backup", "device": "bk", "len": 8 * MiB, "offset": 8 * MiB,
                    "speed": 0}
    # the filter went away at finalize
    assert [n.node_name for n in env.graph.nodes] == ["src", "tgt"]
    assert not env.graph.find_node("src").bitmaps.all()  # type: ignore[union-attr]


def test_pending_finalize_dismiss(env: Env) -> None:
    env.null("src"), env.null("tgt")
    env.backup(device="src", target="tgt", sync="full", speed=4 * MiB,
               **{"job-id": "bk", "auto-finalize": False, "auto-dismiss": False})
    job = env.job("bk")
    env.runner.run_due()  # what the emulator does before the reply
    assert job.info() == {"id": "bk", "type": "backup", "status": "running",
                          "current-progress": MiB, "total-progress": 8 * MiB}
    env.runner.run_until_idle()
    assert job.status == "pending"
    assert env.statuses()[-3:] == ["bk:waiting", "bk:pending", "BLOCK_JOB_PENDING"]
    assert any(isinstance(n, CbwNode) for n in env.graph.nodes)
    env.jobs.job_finalize("bk")
    assert job.status == "concluded"
    assert job.block_info()["offset"] == 8 * MiB
    assert not any(isinstance(n, CbwNode) for n in env.graph.nodes)
    env.jobs.job_dismiss("bk")
    assert env.jobs.jobs() == []


def test_sync_none_waits_until_cancelled(env: Env) -> None:
    env.null("src"), env.null("tgt")
    env.backup(device="src", target="tgt", sync="none", **{"job-id": "fl",
                                                            "filter-node-name": "cbw0"})
    env.runner.run_until_idle()
    job = env.job("fl")
    assert job.status == "running" and job.progress_current == 0
    assert job.progress_total == 8 * MiB
    cbw = env.graph.find_node("cbw0")
    assert cbw is not None and cbw.drv == "copy-before-write"
    info = cbw.device_info(True)
    assert info["image"]["format"] == "copy-before-write"
    assert [b["count"] for b in info["dirty-bitmaps"]] == [8 * MiB, 0]
    env.events.clear()
    env.jobs.job_cancel("fl")
    assert env.statuses() == ["fl:aborting", "BLOCK_JOB_CANCELLED", "fl:concluded", "fl:null"]
    assert env.graph.find_node("cbw0") is None


def test_speed_throttles_and_set_speed(env: Env) -> None:
    env.null("src"), env.null("tgt")
    env.backup(device="src", target="tgt", sync="full", speed=1, **{"job-id": "j"})
    job = env.job("j")
    env.runner.advance(1000)
    assert job.progress_current == MiB  # the first chunk, then a very long sleep
    assert job.block_info()["status"] == "running"
    env.jobs.block_job_set_speed("j", 10 * MiB)
    env.runner.run_until_idle()
    assert env.jobs.jobs() == []


# --------------------------------------------------------------------------- point in time


def _qcow2(path: Path, size: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_copy_before_write_point_in_time(env: Env, tmp_path: Path) -> None:
    """Writes interleaved with a throttled job: the target is the disk at job start."""
    for name in ("src", "tgt", "ref"):
        _qcow2(tmp_path / f"{name}.qcow2", "4M")
    g = env.graph

    def open_(name: str) -> Node:
        return g.blockdev_add({"driver": "qcow2", "node-name": name,
                               "file": {"driver": "file",
                                        "filename": str(tmp_path / f"{name}.qcow2")}})

    src, _tgt, ref = open_("src"), open_("tgt"), open_("ref")
    for node in (src, ref):
        node.write(0, b"\xab" * (2 * MiB))
        node.write(2 * MiB, b"\xcd" * (2 * MiB))
    env.backup(device="src", target="tgt", sync="full", speed=MiB, **{"job-id": "bk"})
    job = env.job("bk")
    steps = 0
    pattern = 0
    while job.status == "running":
        # a guest write between every step, ahead of and behind the job's cursor
        off = (pattern * 448 * 1024) % (4 * MiB - 65536)
        src.write(off, bytes([pattern + 1]) * 65536)
        pattern += 1
        env.runner.advance(0.1)
        steps += 1
    assert steps > 3
    env.runner.run_until_idle()
    assert env.jobs.jobs() == []
    g.close_all()
    res = subprocess.run(["qemu-img", "compare", "-q", str(tmp_path / "ref.qcow2"),
                          str(tmp_path / "tgt.qcow2")], capture_output=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["qemu-img", "compare", "-q", str(tmp_path / "src.qcow2"),
                          str(tmp_path / "tgt.qcow2")], capture_output=True)
    assert res.returncode == 1  # the source moved on


# --------------------------------------------------------------------------- bitmaps


def _counts(node: Node) -> list[tuple[str | None, int]]:
    return [(bm.name, bm.count()) for bm in node.bitmaps]


@pytest.mark.parametrize("mode,outcome,expect", [
    ("on-success", "ok", 64 * 1024),          # writes during the job only
    ("on-success", "cancel", 2 * MiB + 64 * 1024),  # original + new writes
    ("always", "ok", 64 * 1024),
    ("always", "cancel", MiB + 64 * 1024),    # not yet copied + new writes
    ("never", "ok", 2 * MiB + 64 * 1024),
    ("never", "cancel", 2 * MiB + 64 * 1024),
])
def test_bitmap_outcomes(env: Env, mode: str, outcome: str, expect: int) -> None:
    src, _ = env.null("src"), env.null("tgt")
    bm = src.bitmaps.create(8 * MiB, 65536, "b0")
    bm.set_dirty(0, 2 * MiB)
    env.backup(device="src", target="tgt", sync="bitmap", bitmap="b0", speed=1,
               **{"job-id": "j", "bitmap-mode": mode})
    job = env.job("j")
    env.runner.advance(1)
    assert (job.progress_current, job.progress_total) == (MiB, 2 * MiB)
    # during the job: copy bitmap, enabled successor, busy frozen parent (observed order)
    assert [(b.name, b.enabled, b.busy) for b in src.bitmaps] == [
        (None, False, False), (None, True, False), ("b0", False, True)]
    src.write(4 * MiB, b"x" * 65536)
    if outcome == "ok":
        env.jobs.block_job_set_speed("j", 0)
        env.runner.run_until_idle()
    else:
        env.jobs.job_cancel("j")
    assert _counts(src) == [("b0", expect)]
    assert src.bitmaps.get("b0").enabled and not src.bitmaps.get("b0").busy


def test_incremental_is_bitmap_on_success(env: Env) -> None:
    src, _ = env.null("src"), env.null("tgt")
    src.bitmaps.create(8 * MiB, 65536, "b0").set_dirty(MiB, 1536 * 1024)
    env.backup(device="src", target="tgt", sync="incremental", bitmap="b0",
               **{"job-id": "j", "auto-finalize": False})
    env.runner.run_until_idle()
    job = env.job("j")
    assert (job.progress_current, job.progress_total) == (1536 * 1024, 1536 * 1024)
    env.jobs.job_finalize("j")
    assert _counts(src) == [("b0", 0)]


def test_top_skips_unallocated(env: Env, tmp_path: Path) -> None:
    (tmp_path / "s.raw").write_bytes(b"")
    src = env.graph.blockdev_add({"driver": "raw", "node-name": "src", "file": {
        "driver": "file", "filename": str(tmp_path / "s.raw")}})
    assert src.length() == 0
    env.null("tgt", 0)
    env.backup(device="src", target="tgt", sync="top", **{"job-id": "j"})
    env.runner.run_until_idle()
    assert "BLOCK_JOB_COMPLETED" in env.statuses()


# --------------------------------------------------------------------------- transactions


def test_transaction_rollback_never_started(env: Env) -> None:
    """Observed: created, aborting, concluded, null and no BLOCK_JOB_* event."""
    src, _ = env.null("src"), env.null("tgt")
    src.bitmaps.create(8 * MiB, 65536, "b0").set_dirty(0, MiB)
    with pytest.raises(SimError, match="Transaction aborted using Abort action"):
        env.tx([{"type": "blockdev-backup", "data": {
            "job-id": "a", "device": "src", "target": "tgt", "sync": "full", "bitmap": "b0",
            "bitmap-mode": "on-success"}}, {"type": "abort", "data": {}}])
    assert env.statuses() == ["a:created", "a:aborting", "a:concluded", "a:null"]
    assert _counts(src) == [("b0", MiB)]
    assert [n.node_name for n in env.graph.nodes] == ["src", "tgt"]


def test_grouped_transaction(env: Env) -> None:
    """Observed order of the start, and a cancelled member cancelling the group."""
    for n in ("s1", "t1", "s2", "t2"):
        env.null(n)
    env.tx([{"type": "blockdev-backup", "data": {"job-id": "g1", "device": "s1",
                                                 "target": "t1", "sync": "full", "speed": 1}},
            {"type": "blockdev-backup", "data": {"job-id": "g2", "device": "s2",
                                                 "target": "t2", "sync": "full", "speed": 1}}],
           grouped=True)
    assert env.statuses() == ["g1:created", "g2:created", "g1:running", "g1:paused",
                              "g2:running", "g2:paused", "g1:running", "g2:running"]
    env.events.clear()
    env.jobs.job_cancel("g2")
    assert env.statuses() == [
        "g2:aborting", "BLOCK_JOB_CANCELLED", "g2:concluded", "g2:null",
        "g1:aborting", "BLOCK_JOB_CANCELLED", "g1:concluded", "g1:null"]


def test_grouped_same_source_refused(env: Env) -> None:
    for n in ("s", "t1", "t2"):
        env.null(n)
    with pytest.raises(SimError, match="QEMU 7.2 crashes"):
        env.tx([{"type": "blockdev-backup", "data": {"job-id": "a", "device": "s",
                                                     "target": "t1", "sync": "full"}},
                {"type": "blockdev-backup", "data": {"job-id": "b", "device": "s",
                                                     "target": "t2", "sync": "full"}}],
               grouped=True)
    assert env.jobs.jobs() == []
    assert [n.node_name for n in env.graph.nodes] == ["s", "t1", "t2"]


# --------------------------------------------------------------------------- I/O errors


class _Failing:
    """Makes a node's writes (or reads) fail with an errno."""

    def __init__(self, node: Node, err: int, what: str = "write") -> None:
        self.err, self.what = err, what
        self.active = True
        orig = getattr(node, f"_drv_{what}")

        def fail(*a: Any) -> Any:
            if self.active:
                raise OSError(self.err, "injected")
            return orig(*a)

        setattr(node, f"_drv_{what}", fail)
        if what == "write":
            node.__dict__["_drv_write_zeroes"] = lambda o, n, u: fail(o, bytes(n))


@pytest.mark.parametrize("policy,action", [("report", "report"), ("enospc", "report")])
def test_target_error_report(env: Env, policy: str, action: str) -> None:
    env.null("src"), _Failing(env.null("tgt"), errno.EIO)
    env.backup(device="src", target="tgt", sync="full", **{"job-id": "j",
                                                            "on-target-error": policy})
    env.runner.run_until_idle()
    errors = [d for n, d in env.events if n == "BLOCK_JOB_ERROR"]
    assert errors == [{"device": "j", "operation": "write", "action": action}]
    done = [d for n, d in env.events if n == "BLOCK_JOB_COMPLETED"][0]
    assert done["error"] == "Input/output error"
    assert env.statuses("j")[-4:] == ["aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]


def test_source_error_stop_then_resume(env: Env) -> None:
    src = env.null("src")
    env.null("tgt")
    fail = _Failing(src, errno.ENOSPC, "read")
    env.backup(device="src", target="tgt", sync="full", **{"job-id": "j",
                                                            "on-source-error": "enospc"})
    env.runner.run_until_idle()
    job = env.job("j")
    assert [d for n, d in env.events if n == "BLOCK_JOB_ERROR"] == [
        {"device": "j", "operation": "read", "action": "stop"}]
    assert job.status == "paused" and job.block_info()["io-status"] == "nospace"
    fail.active = False
    env.jobs.block_job_resume("j")
    env.runner.run_until_idle()
    assert env.jobs.jobs() == []
    assert "BLOCK_JOB_COMPLETED" in env.statuses()


def test_grouped_abort_hangs_like_qemu(env: Env) -> None:
    """QEMU 7.2 hangs when a grouped transaction with two created backups aborts; virtsim
    rolls back completely and answers the transaction's own error instead."""
    for n in ("s1", "t1", "s2", "t2"):
        env.null(n)
    with pytest.raises(SimError, match="Transaction aborted using Abort action"):
        env.tx([{"type": "blockdev-backup", "data": {"job-id": "g1", "device": "s1",
                                                     "target": "t1", "sync": "full"}},
                {"type": "blockdev-backup", "data": {"job-id": "g2", "device": "s2",
                                                     "target": "t2", "sync": "full"}},
                {"type": "abort", "data": {}}], grouped=True)
    assert env.jobs.jobs() == []
    assert sorted(n.node_name for n in env.graph.nodes) == ["s1", "s2", "t1", "t2"]


# --------------------------------------------------------------------------- drive-backup


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_drive_backup_creates_and_closes_target(env: Env, tmp_path: Path) -> None:
    _qcow2(tmp_path / "src.qcow2", "4M")
    src = env.graph.blockdev_add({"driver": "qcow2", "node-name": "src", "file": {
        "driver": "file", "filename": str(tmp_path / "src.qcow2")}})
    src.write(MiB, b"\x5a" * MiB)
    target = str(tmp_path / "new.qcow2")
    env.tx([{"type": "drive-backup", "data": {"job-id": "d", "device": "src",
                                              "target": target, "sync": "full"}}])
    assert len(env.graph.nodes) == 5  # file + qcow2 target, filter
    env.runner.run_until_idle()
    assert len(env.graph.nodes) == 2  # the job closed its target: src and its file
    with pytest.raises(SimError, match="Backing file not supported for file format 'raw'"):
        env.tx([{"type": "drive-backup", "data": {
            "job-id": "e", "device": "src", "target": str(tmp_path / "n.raw"),
            "format": "raw", "sync": "none"}}])
    assert not (tmp_path / "n.raw").exists()
    env.graph.close_all()
    res = subprocess.run(["qemu-img", "compare", "-q", str(tmp_path / "src.qcow2"), target])
    assert res.returncode == 0


# --------------------------------------------------------------------------- filter in the graph


def test_filter_takes_over_parents_and_unshares_write(env: Env) -> None:
    """Observed: the device's node becomes the filter (query-block), and a new writer on the
    source gets a permission conflict naming the filter."""
    from virtsim.sim import perm as P
    from virtsim.sim.block import BlockBackend

    src, _ = env.null("src"), env.null("tgt")
    blk = BlockBackend(env.graph, "", "/machine/peripheral/vd0/virtio-backend")
    env.graph.add_backend(blk, src, P.CONSISTENT_READ | P.WRITE, P.ALL)
    env.backup(device="src", target="tgt", sync="full", speed=1, **{"job-id": "j"})
    cbw = blk.root
    assert isinstance(cbw, CbwNode) and cbw.device_info(False)["backing_file_depth"] == 1
    assert "backing-image" in cbw.image_info(False)
    with pytest.raises(SimError) as ei:
        env.graph.temporary_backend(src, P.WRITE)
    assert ei.value.desc == (
        "Permission conflict on node 'src': permissions 'write' are both required by an "
        f"unnamed block device (uses node 'src' as 'root' child) and unshared by node "
        f"'{cbw.node_name}' (uses node 'src' as 'file' child).")
    env.jobs.job_cancel("j")
    assert blk.root is src and src.parents == [blk.root_edge]
    env.graph.temporary_backend(src, P.WRITE)  # allowed again


def test_block_size_warning_only_without_get_info(env: Env, tmp_path: Path) -> None:
    env.null("src", MiB), env.null("tgt", MiB)
    (tmp_path / "t.raw").write_bytes(bytes(MiB))
    env.graph.blockdev_add({"driver": "raw", "node-name": "rt", "file": {
        "driver": "file", "filename": str(tmp_path / "t.raw")}})
    env.backup(device="src", target="rt", sync="full", **{"job-id": "a"})
    assert env.warnings == []
    env.backup(device="src", target="tgt", sync="full", **{"job-id": "b"})
    assert len(env.warnings) == 1
