"""`make demo` must keep working: run it and require every verification to pass."""

from __future__ import annotations

import os
import shutil

import pytest

from virtsim.cli import main


def test_demo_passes(capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("qemu-img") is None and os.environ.get("CI") != "true":
        pytest.skip("qemu-img is needed to verify the demo's backups")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "DEMO PASSED" in out
    assert out.count("Images are identical.") == 4
