"""The session state directory: private modes, atomic files, stale emulators reaped."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from virtsim.api.state import StateDir


def test_layout_modes_and_roundtrip(tmp_path: os.PathLike[str]) -> None:
    sd = StateDir(os.path.join(str(tmp_path), "state"))
    sd.save_domain("vm", "<domain><name>vm</name></domain>")
    sd.save_checkpoint("vm", "c1", "<domaincheckpoint><name>c1</name></domaincheckpoint>")
    sd.save_checkpoint("vm", "c2", "<domaincheckpoint><name>c2</name></domaincheckpoint>")
    sd.save_current("vm", "c2")
    for root, dirs, files in os.walk(sd.path):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600
    again = StateDir(sd.path)
    assert again.domains() == [("vm", "<domain><name>vm</name></domain>")]
    docs, cur = again.checkpoints("vm")
    assert [d.split("<name>")[1].split("<")[0] for d in docs] == ["c1", "c2"]
    assert cur == "c2"
    again.remove_domain("vm")
    assert again.domains() == []


def test_reap_stale_only_touches_emulators(tmp_path: os.PathLike[str]) -> None:
    sd = StateDir(str(tmp_path))
    # a process that is not an emulator is never signalled
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sd.save_pid("vm", other.pid)
        assert sd.reap_stale("vm") is False
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    assert sd.reap_stale("vm") is False
