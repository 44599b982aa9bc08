"""virtsim's libvirt-shaped backup API: ``import virtsim.api as libvirt`` and go.

``open("virtsim:///embedded")`` runs every domain's emulator inside this process;
``?emulator=/usr/bin/qemu-system-x86_64`` (or ``virtsim-qemu``) runs processes instead.
The API talks to emulators only over QMP, so a real QEMU can stand in.
"""

from __future__ import annotations

from .backup import (
    VIRTSIM_BACKUP_BEGIN_NO_METADATA,
    VIRTSIM_BACKUP_BEGIN_QUIESCE,
    VIRTSIM_BACKUP_END_ABORT,
    VIRTSIM_BACKUP_LIST_ACTIVE,
    VIRTSIM_BACKUP_LIST_FINISHED,
    VIRTSIM_BACKUP_LIST_PULL,
    VIRTSIM_BACKUP_LIST_PUSH,
)
from .constants import *  # noqa: F403 - libvirt's flat namespace of constants
from .errors import libvirtError
from .facade import (
    VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
    open,
    openReadOnly,
    qemuMonitorCommand,
    virConnect,
    virDomain,
    virDomainCheckpoint,
)

__all__ = ["VIRTSIM_BACKUP_BEGIN_NO_METADATA", "VIRTSIM_BACKUP_BEGIN_QUIESCE",
           "VIRTSIM_BACKUP_END_ABORT", "VIRTSIM_BACKUP_LIST_ACTIVE",
           "VIRTSIM_BACKUP_LIST_FINISHED", "VIRTSIM_BACKUP_LIST_PULL",
           "VIRTSIM_BACKUP_LIST_PUSH", "VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP", "libvirtError",
           "open", "openReadOnly", "qemuMonitorCommand", "virConnect", "virDomain",
           "virDomainCheckpoint"]
