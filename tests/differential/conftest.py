"""Fixtures for the differential suite: the real-QEMU transcript cache, the candidate
backend and the skip policy (skip only when binaries are missing *and* CI != "true")."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.differential.harness import (
    Backend,
    Transcript,
    get_backend,
    run_scenario,
)

IN_CI = os.environ.get("CI") == "true"
#: Which backend is compared with real QEMU ("virtsim" = the virtsim-qemu process).
CANDIDATE = os.environ.get("VIRTSIM_DIFF_BACKEND", "virtsim")
#: Where the transcripts of the latest failures are written.
FAILURE_DIR = Path(tempfile.gettempdir()) / "virtsim-differential" / "latest"
#: Real QEMU runs in the background while the candidate runs in the test's thread.
QEMU_WORKERS = int(os.environ.get("VIRTSIM_DIFF_WORKERS", "2"))

_SELECTED: list[Path] = []


def missing_tools() -> str | None:
    """Why real QEMU cannot be the reference here, or None."""
    why = get_backend("qemu").unavailable()
    if why:
        return why
    for tool in ("qemu-img", "qemu-io"):
        if not shutil.which(tool):
            return f"{tool} not found"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip with the reason outside CI; in CI a missing binary is a failure."""
    if IN_CI:
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Remember which scenarios were selected so real QEMU runs only those, up front."""
    for item in items:
        cs = getattr(item, "callspec", None)
        if cs is not None and "scenario" in cs.params and item.name.startswith("test_differential"):
            _SELECTED.append(cs.params["scenario"])


class QemuTranscripts:
    """Session cache: each selected scenario runs on real QEMU once, in a small thread pool,
    started as soon as the first test asks (so QEMU and the candidate run side by side)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(QEMU_WORKERS, thread_name_prefix="qemu-ref")
        self.futures: dict[Path, Future[Transcript]] = {}
        self.backend: Backend = get_backend("qemu")

    def prefetch(self, paths: list[Path]) -> None:
        for p in paths:
            self._submit(p)

    def _submit(self, path: Path) -> Future[Transcript]:
        fut = self.futures.get(path)
        if fut is None:
            fut = self.pool.submit(run_scenario, path, self.backend)
            self.futures[path] = fut
        return fut

    def get(self, path: Path) -> Transcript:
        return self._submit(path).result()

    def close(self) -> None:
        for fut in self.futures.values():
            fut.cancel()
        self.pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def qemu_transcripts() -> Iterator[QemuTranscripts]:
    """Work dirs live in harness.scratch_dir() (tmpfs when possible, see its docstring),
    not in tmp_path; each run removes its own."""
    why = missing_tools()
    if why:
        skip_or_fail(why)
    cache = QemuTranscripts()
    cache.prefetch(list(_SELECTED))
    try:
        yield cache
    finally:
        cache.close()


@pytest.fixture(scope="session")
def candidate() -> Backend:
    return get_backend(CANDIDATE)


@pytest.fixture(scope="session")
def failure_dir() -> Path:
    """Cleared once per session so that what is there belongs to the latest run."""
    shutil.rmtree(FAILURE_DIR, ignore_errors=True)
    FAILURE_DIR.mkdir(parents=True, exist_ok=True)
    return FAILURE_DIR
