"""Shared helpers for the API tests: the real-libvirt reference outputs and the RNG check."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
from lxml import etree

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
