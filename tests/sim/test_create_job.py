"""blockdev-create jobs (virtsim.sim.create_job) against QEMU 7.2's behaviour.

Texts, event sequences and check order were observed on QEMU 7.2.22 (Debian 12) with
``blockdev-create``; the qcow2 bytes were compared with images real QEMU wrote through
blockdev-create (identical for v2/v3, 512 B..2 MiB clusters, refcount widths 1..64, lazy
refcounts, backing file and format, and a file node that already held data).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from virtsim.sim.block import BlockGraph
from virtsim.sim.clock import VirtualClock
from virtsim.sim.create_job import CreateJob, check_create_driver
from virtsim.sim.errors import SimError
from virtsim.sim.events import EventBus
from virtsim.sim.job import JobManager, JobRunner

MiB = 1 << 20


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bus = EventBus()
        self.events: list[str] = []
        self.bus.subscribe(self._on)
        self.jobs = JobManager(self.bus, VirtualClock())
        self.runner = JobRunner(self.jobs)
        self.graph = BlockGraph()
        self.warnings: list[str] = []
        self.graph.warn = self.warnings.append

    def _on(self, name: str, data: dict[str, Any] | None) -> None:
        assert data is not None
        self.events.append(f"{data.get('id')}:{data.get('status')}")

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def create(self, job_id: str, options: dict[str, Any],
               defer: Callable[[Callable[[], None]], None] | None = None) -> CreateJob:
        check_create_driver(options["driver"])
        job = CreateJob(job_id, self.graph, options)
        job.defer = defer
        self.jobs.add(job)
        job.start()
        return job

    def run(self, job_id: str, options: dict[str, Any]) -> dict[str, Any]:
        """Create, run to the end, return the query-jobs entry, dismiss."""
        self.create(job_id, options)
        self.runner.run_until_idle()
        info = self.jobs.find_job(job_id).info()
        self.jobs.job_dismiss(job_id)
        return info

    def error(self, options: dict[str, Any]) -> str | None:
        return self.run("e", options).get("error")


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    yield e  # type: ignore[misc]
    e.graph.close_all()


def _qemu_img(*args: str) -> Any:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img not installed")
    out = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    return out


# --------------------------------------------------------------------------- lifecycle


def test_driver_checks_before_the_job() -> None:
    with pytest.raises(SimError, match="^Driver does not support blockdev-create$"):
        check_create_driver("raw")
    with pytest.raises(SimError, match="^Driver 'vmdk' is not supported by virtsim$"):
        check_create_driver("vmdk")
    check_create_driver("file")
    check_create_driver("qcow2")


def test_success_lifecycle_and_manual_dismiss(env: Env) -> None:
    info = env.run("c1", {"driver": "file", "filename": env.path("a.img"), "size": 0})
    assert info == {"id": "c1", "type": "create", "status": "concluded",
                    "current-progress": 1, "total-progress": 1}
    assert env.events == ["c1:created", "c1:running", "c1:waiting", "c1:pending",
                          "c1:concluded", "c1:null"]
    assert os.path.getsize(env.path("a.img")) == 0
    assert env.jobs.query_block_jobs() == []


def test_sync_failure_concludes_inside_the_first_step(env: Env) -> None:
    """QEMU: a failure before the first I/O concludes the job before the command's reply."""
    job = env.create("c2", {"driver": "file", "filename": env.path("no/dir/x"), "size": 1024})
    env.runner.run_due()
    assert job.status == "concluded"
    assert env.events == ["c2:created", "c2:running", "c2:aborting", "c2:concluded"]
    assert job.info()["error"] == (
        f"Could not create '{env.path('no/dir/x')}': No such file or directory")
    assert job.info()["current-progress"] == 1


def test_deferred_io_completes_after_release(env: Env) -> None:
    """With ``defer`` the run waits (busy) until the callback: QEMU's thread-pool I/O,
    whose completion comes after the reply; a pause meanwhile does not park it."""
    pending: list[Callable[[], None]] = []
    job = env.create("c3", {"driver": "file", "filename": env.path("b.img"), "size": MiB},
                     defer=pending.append)
    env.runner.run_due()
    assert job.status == "running" and job.busy and len(pending) == 1
    assert env.events == ["c3:created", "c3:running"]
    env.jobs.job_pause("c3")
    assert env.events[-1] == "c3:running"
    pending.pop()()
    env.runner.run_due()
    assert env.events[2:] == ["c3:waiting", "c3:pending", "c3:concluded"]
    assert os.path.getsize(env.path("b.img")) == MiB


def test_cancel_while_writing_still_creates(env: Env) -> None:
    pending: list[Callable[[], None]] = []
    env.create("c4", {"driver": "file", "filename": env.path("c.img"), "size": 4096},
               defer=pending.append)
    env.runner.run_due()
    env.jobs.job_cancel("c4")
    pending.pop()()
    env.runner.run_due()
    job = env.jobs.find_job("c4")
    assert job.info()["error"] == "Operation canceled"
    assert env.events[-2:] == ["c4:aborting", "c4:concluded"]
    assert os.path.getsize(env.path("c.img")) == 4096


def test_job_id_rules(env: Env) -> None:
    env.create("same", {"driver": "file", "filename": env.path("d.img"), "size": 0})
    with pytest.raises(SimError, match="^Job ID 'same' already in use$"):
        env.create("same", {"driver": "file", "filename": env.path("d.img"), "size": 0})
    with pytest.raises(SimError, match="^Invalid job ID '1bad'$"):
        env.create("1bad", {"driver": "file", "filename": env.path("d.img"), "size": 0})


# --------------------------------------------------------------------------- driver: file


def test_file_sizes_and_preallocation(env: Env) -> None:
    p = env.path
    assert env.error({"driver": "file", "filename": p("s100"), "size": 100}) is None
    assert os.path.getsize(p("s100")) == 512  # allocate_first_block grows it (observed)
    assert env.error({"driver": "file", "filename": p("s5000"), "size": 5000}) is None
    assert os.path.getsize(p("s5000")) == 5000
    for mode in ("falloc", "full"):
        assert env.error({"driver": "file", "filename": p(mode), "size": MiB,
                          "preallocation": mode}) is None
        st = os.stat(p(mode))
        assert st.st_size == MiB and st.st_blocks * 512 >= MiB
    assert env.error({"driver": "file", "filename": p("m"), "size": MiB,
                      "preallocation": "metadata"}) == "Unsupported preallocation mode: metadata"
    assert os.path.getsize(p("m")) == 0
    assert env.error({"driver": "file", "filename": p("n1"), "size": -1}) == (
        "Could not resize file: Invalid argument")
    assert env.error({"driver": "file", "filename": p("n2"), "size": -1,
                      "preallocation": "full"}) == "Cannot use preallocation for shrinking files"


def test_file_existing_is_cleared(env: Env) -> None:
    Path(env.path("old")).write_bytes(b"x" * 10000)
    assert env.error({"driver": "file", "filename": env.path("old"), "size": 4096}) is None
    assert Path(env.path("old")).read_bytes() == bytes(4096)


def test_file_errors(env: Env) -> None:
    assert env.error({"driver": "file", "filename": env.path("x"), "size": 0,
                      "extent-size-hint": 1 << 33}) == "Extent size hint is too large"
    assert env.error({"driver": "file", "filename": str(env.tmp), "size": 0}) == (
        f"Could not create '{env.tmp}': Is a directory")
    assert env.error({"driver": "file", "filename": "", "size": 0}) == (
        "Could not create '': No such file or directory")


def test_file_locked_by_a_writer(env: Env) -> None:
    Path(env.path("u.qcow2")).write_bytes(b"")
    env.run("mk", {"driver": "qcow2", "file": {"driver": "file",
                                                "filename": env.path("u.qcow2")},
                   "size": MiB})
    env.graph.blockdev_add({"driver": "qcow2", "node-name": "u",
                            "file": {"driver": "file", "node-name": "uf",
                                     "filename": env.path("u.qcow2")}})
    assert env.error({"driver": "file", "filename": env.path("u.qcow2"), "size": 0}) == (
        'Failed to get "write" lock')
    assert env.error({"driver": "qcow2", "file": "uf", "size": MiB}) == (
        "Permission conflict on node 'uf': permissions 'write, resize' are both required by "
        "an unnamed block device (uses node 'uf' as 'root' child) and unshared by node 'u' "
        "(uses node 'uf' as 'file' child).")


# --------------------------------------------------------------------------- driver: qcow2


def _file_node(env: Env, name: str = "f", ro: bool = False) -> str:
    path = env.path(f"{name}.img")
    Path(path).write_bytes(b"")
    env.graph.blockdev_add({"driver": "file", "node-name": name, "filename": path,
                            "read-only": ro})
    return path


@pytest.mark.parametrize(("opts", "text"), [
    ({"size": 1000, "cluster-size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"version": "v2", "extended-l2": True, "cluster-size": 1000},
     "Extended L2 entries are only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"cluster-size": 256, "backing-fmt": "raw"},
     "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster-size": 4 * MiB}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"extended-l2": True, "cluster-size": 4096},
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ({"backing-file": "x", "preallocation": "metadata", "backing-fmt": "raw"},
     "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ({"backing-fmt": "raw", "lazy-refcounts": True, "version": "v2"},
     "Backing format cannot be used without backing file"),
    ({"lazy-refcounts": True, "version": "v2", "refcount-bits": 3},
     "Lazy refcounts only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"version": "v2", "refcount-bits": 3},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount-bits": 0}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"version": "v2", "refcount-bits": 8, "data-file-raw": True},
     "Different refcount widths than 16 bits require compatibility level 1.1 or above "
     "(use version=v3 or greater)"),
    ({"data-file-raw": True, "compression-type": "zstd", "version": "v2"},
     "data-file-raw requires data-file"),
    ({"data-file-raw": True, "backing-file": "x", "data-file": "f"},
     "Backing file and data-file-raw cannot be used at the same time"),
    ({"data-file": "nosuch", "version": "v2", "compression-type": "zstd"},
     "External data files are only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"data-file": "nosuch", "compression-type": "zstd"},
     "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"compression-type": "zstd", "version": "v2"},
     "Non-zlib compression type is only supported with compatibility level 1.1 and above "
     "(use version=v3 or greater)"),
    ({"size": -512}, "Could not resize image: Image size cannot be negative"),
    ({"size": 1 << 62, "cluster-size": 512},
     "Could not resize image: Failed to grow the L1 table: File too large"),
    ({"compression-type": "zstd"}, "virtsim: qcow2 compression type 'zstd' is not supported"),
    ({"preallocation": "metadata"}, "virtsim: qcow2 preallocation 'metadata' is not supported"),
])
def test_qcow2_checks_in_qemu_order(env: Env, opts: dict[str, Any], text: str) -> None:
    _file_node(env)
    assert env.error({"driver": "qcow2", "file": "f", "size": MiB, **opts}) == text


def test_qcow2_node_errors(env: Env) -> None:
    _file_node(env, "ro", ro=True)
    assert env.error({"driver": "qcow2", "file": "nosuch", "size": MiB}) == (
        "Cannot find device='nosuch' nor node-name='nosuch'")
    # the size is checked before the permissions
    assert env.error({"driver": "qcow2", "file": "ro", "size": 1000}) == (
        "Image size must be a multiple of 512 bytes")
    assert env.error({"driver": "qcow2", "file": "ro", "size": MiB}) == (
        "Block node is read-only")
    assert not env.graph.find_node("ro").parents  # type: ignore[union-attr]


def test_qcow2_backing_name_errors(env: Env) -> None:
    _file_node(env)
    long = "a" * 1100
    assert env.error({"driver": "qcow2", "file": "f", "size": MiB,
                      "backing-file": long}) == (
        f"Could not assign backing file '{long}' with format '(null)': Invalid argument")
    b = "b" * 450
    assert env.error({"driver": "qcow2", "file": "f", "size": MiB, "cluster-size": 512,
                      "backing-file": b, "backing-fmt": "raw"}) == (
        f"Could not assign backing file '{b}' with format 'raw': No space left on device")


def test_qcow2_image_and_auto_names(env: Env) -> None:
    path = _file_node(env)
    env.graph.blockdev_add({"driver": "raw", "node-name": "r0",
                            "file": {"driver": "file", "filename": path}})
    assert env.error({"driver": "qcow2", "file": "f", "size": 64 * MiB,
                      "backing-file": "base.qcow2", "backing-fmt": "qcow2"}) is None
    # r0's file took #block0; the two re-opens of the new image took 1 and 2
    env.graph.blockdev_add({"driver": "raw", "node-name": "r1",
                            "file": {"driver": "file", "filename": path}})
    assert env.graph.find_node("r1").file.node_name.startswith("#block3")  # type: ignore
    assert [n.node_name for n in env.graph.nodes if not n.node_name.startswith("#")] == [
        "f", "r0", "r1"]
    assert not env.graph.find_node("f").parents  # type: ignore[union-attr]
    env.graph.close_all()
    info = json.loads(_qemu_img("info", "--output=json", path).stdout)
    assert info["virtual-size"] == 64 * MiB and info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    _qemu_img("create", "-f", "qcow2", env.path("base.qcow2"), "64M")
    assert _qemu_img("check", path).returncode == 0


def test_qcow2_inline_file_is_closed_afterwards(env: Env) -> None:
    path = env.path("i.img")
    Path(path).write_bytes(b"")
    assert env.error({"driver": "qcow2", "size": MiB, "version": "v2",
                      "file": {"driver": "file", "filename": path}}) is None
    assert env.graph.nodes == []
    assert Path(path).read_bytes()[:4] == b"QFI\xfb"


def test_qcow2_keeps_data_past_the_metadata(env: Env) -> None:
    """QEMU formats in place: it never truncates the node (qemu-img create does)."""
    path = env.path("junk.img")
    Path(path).write_bytes(b"\xaa" * MiB)
    env.graph.blockdev_add({"driver": "file", "node-name": "j", "filename": path})
    assert env.error({"driver": "qcow2", "file": "j", "size": 32 * MiB,
                      "cluster-size": 16384}) is None
    data = Path(path).read_bytes()
    assert len(data) == MiB and data[-16:] == b"\xaa" * 16
