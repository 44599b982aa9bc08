"""Shared helpers for the API tests: the real-libvirt reference outputs and the RNG check."""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

import virtsim.api as libvirt
from virtsim.api.xml import safe

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "libvirt-9.0"
IN_CI = os.environ.get("CI") == "true"


def need(ok: bool, what: str) -> None:
    """Skip outside CI when an oracle is missing; in CI a missing oracle is a failure."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} missing in CI")
    pytest.skip(f"{what} not installed here")


def reference_output(name: str, workdir: str = "/w") -> str:
    """The XML printed by a recorded virsh command, with its $W placeholder filled in."""
    need(REFERENCE.is_dir(), f"shared reference outputs ({REFERENCE})")
    text = (REFERENCE / name).read_text()
    body = text.split("\n", 1)[1].rsplit("[rc=", 1)[0]
    return body.replace("$W", workdir).strip() + "\n"


def reference_input(name: str, workdir: str = "/w") -> str:
    need(REFERENCE.is_dir(), f"shared reference outputs ({REFERENCE})")
    return (REFERENCE / name).read_text().replace("$W", workdir)


@functools.cache
def _schema(name: str) -> etree.RelaxNG:
    # Compiled independently of virtsim's own cache: the check must not trust the code under test.
    return etree.RelaxNG(etree.parse(str(safe.SCHEMA_DIR / name)))


def assert_valid(xml: str, schema: str) -> None:
    """Validate emitted XML against libvirt's own RNG schema (Debian package libvirt0).

    Backup XML is checked without `index`: libvirt 9.0 prints it in backupGetXMLDesc although
    domainbackup.rng does not allow it (virtsim prints it too, as libvirt does).
    """
    need(safe.schemas_available(), "libvirt RNG schemas (/usr/share/libvirt/schemas, libvirt0)")
    if schema == "domainbackup.rng":
        xml = re.sub(r" index='\d+'", "", xml)
    rng = _schema(schema)
    doc = etree.fromstring(xml.encode())
    assert rng.validate(doc), [e.message for e in rng.error_log]


# ----- the three ways a domain's emulator can run (the API suite runs against each) ----------
QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
VIRTSIM_QEMU = str(Path(sys.executable).parent / "virtsim-qemu")
EMULATOR_URIS = {
    "embedded": "virtsim:///embedded",
    "virtsim-qemu": f"virtsim:///embedded?emulator={VIRTSIM_QEMU}",
    "qemu": f"virtsim:///embedded?emulator={QEMU_BINARY}",
}


def processes_mentioning(text: str) -> list[int]:
    """Pids (other than ours) whose command line contains ``text``: the emulators a test
    started all name its tmp_path in their -blockdev arguments."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text in cmdline and not zombie:
            found.append(int(entry))
    return found


@pytest.fixture(params=list(EMULATOR_URIS), ids=list(EMULATOR_URIS))
def api_uri(request: pytest.FixtureRequest) -> str:
    """A virtsim URI per emulator kind; real QEMU is required in CI, skipped elsewhere only
    when it is not installed."""
    if request.param == "qemu":
        need(os.access(QEMU_BINARY, os.X_OK), QEMU_BINARY)
    if request.param == "virtsim-qemu":
        need(os.access(VIRTSIM_QEMU, os.X_OK), f"{VIRTSIM_QEMU} (make setup)")
    return EMULATOR_URIS[request.param]


@pytest.fixture
def conn(api_uri: str, tmp_path: Path) -> Iterator[libvirt.virConnect]:
    """A read-write connection; closing it (always) destroys its domains and ends every
    emulator, which the fixture checks."""
    from virtsim.api import driver

    c = libvirt.open(api_uri)
    drv = c.drv
    try:
        yield c
    finally:
        c.close()
        assert drv.refs == 0, "a test left another connection to this URI open"
        assert drv not in driver._DRIVERS.values()
        assert not os.path.exists(drv.workdir), "emulator run directories left behind"
        assert all(not d.active for d in drv.domains.values())
        for _ in range(100):
            if not processes_mentioning(str(tmp_path)):
                break
            time.sleep(0.01)
        assert processes_mentioning(str(tmp_path)) == [], "emulator processes outlived close()"
