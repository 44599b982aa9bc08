"""``blockdev-backup`` and (deprecated) ``drive-backup``: a one-action transaction each,
exactly as QEMU 7.2 runs them (``blockdev_do_action``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...sim.backup import BackupAction, DriveBackupAction
from ...sim.transaction import run_transaction
from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator


@command("blockdev-backup")
def blockdev_backup(emu: Emulator, a: dict[str, Any]) -> Any:
    run_transaction(emu.graph, [{"type": "blockdev-backup", "data": a}], None,
                    {BackupAction.kind: BackupAction}, emu.jobs)
    return {}


@command("drive-backup")
def drive_backup(emu: Emulator, a: dict[str, Any]) -> Any:
    run_transaction(emu.graph, [{"type": "drive-backup", "data": a}], None,
                    {DriveBackupAction.kind: DriveBackupAction}, emu.jobs)
    return {}
