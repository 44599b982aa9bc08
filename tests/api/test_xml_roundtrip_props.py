"""Property checks: whatever we print, we (and libvirt's schema) read back unchanged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.api.conftest import assert_valid
from virtsim.api.xml.backup import (
    BackupDef,
    BackupDisk,
    BackupServer,
    BackupStore,
    format_backup,
    parse_backup,
)
from virtsim.api.xml.checkpoint import (
    CheckpointDef,
    CheckpointDisk,
    format_checkpoint,
    parse_checkpoint,
)

names = st.from_regex(r"[a-zA-Z0-9_\-][a-zA-Z0-9_\-.]{0,20}", fullmatch=True)
targets = st.from_regex(r"(vd|sd|hd)[a-z]{1,2}", fullmatch=True)
texts = st.text(st.characters(whitelist_categories=("L", "N", "P", "S", "Zs")), max_size=40)
paths = st.from_regex(r"/[a-zA-Z0-9_./-]{1,30}", fullmatch=True)


@st.composite
def checkpoints(draw: st.DrawFn) -> CheckpointDef:
    name = draw(names)
    disks = []
    for target in draw(st.lists(targets, unique=True, max_size=4)):
        if draw(st.booleans()):
            disks.append(CheckpointDisk(target, "bitmap", name))
        else:
            disks.append(CheckpointDisk(target, "no"))
    return CheckpointDef(
        name=name,
        description=draw(st.none() | texts.filter(lambda t: t.strip() == t and t != "")),
        parent=draw(st.none() | names),
        creation_time=draw(st.integers(1, 2**40)),
        disks=disks,
    )


@settings(max_examples=60, deadline=None)
@given(checkpoints())
def test_checkpoint_round_trip(defn: CheckpointDef) -> None:
    xml = format_checkpoint(defn)
    assert parse_checkpoint(xml, redefine=True) == defn
    assert_valid(xml, "domaincheckpoint.rng")


@st.composite
def backups(draw: st.DrawFn) -> BackupDef:
    pull = draw(st.booleans())
    checkpoint = draw(st.none() | names)
    disks = []
    for target in draw(st.lists(targets, unique=True, min_size=1, max_size=4)):
        if not draw(st.booleans()):
            disks.append(BackupDisk(target, backup=False))
            continue
        incremental = checkpoint or draw(st.none() | names)
        block = draw(st.booleans())
        store = BackupStore(
            type="block" if block else "file",
            path=draw(paths),
            format="qcow2" if pull else draw(st.sampled_from(["qcow2", "raw"])),
        )
        disks.append(
            BackupDisk(
                target,
                backupmode="incremental" if incremental else "full",
                incremental=incremental,
                exportname=draw(st.none() | names) if pull else None,
                exportbitmap=draw(st.none() | names) if pull else None,
                store=store,
            )
        )
    server = None
    if pull:
        server = draw(
            st.builds(BackupServer, transport=st.just("unix"), socket=paths)
            | st.builds(
                BackupServer,
                transport=st.just("tcp"),
                name=st.sampled_from(["localhost", "127.0.0.1", "backup.example.com", "::1"]),
                port=st.none() | st.integers(1, 65535),
            )
        )
    return BackupDef(
        mode="pull" if pull else "push",
        incremental=checkpoint,
        server=server,
        tls=draw(st.none() | st.booleans()) if pull else None,
        disks=disks,
    )


@settings(max_examples=60, deadline=None)
@given(backups())
def test_backup_round_trip(defn: BackupDef) -> None:
    xml = format_backup(defn)
    assert parse_backup(xml) == defn
    assert_valid(xml, "domainbackup.rng")
