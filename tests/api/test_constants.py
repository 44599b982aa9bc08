"""virtsim.api.constants carries libvirt-python 9.0's names and values, and nothing invented."""

from __future__ import annotations

import importlib
from types import ModuleType

from tests.api.conftest import need
from virtsim.api import constants


def _real(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _ours() -> dict[str, object]:
    return {k: v for k, v in vars(constants).items() if k.startswith("VIR_")}


def test_every_constant_equals_libvirt_python() -> None:
    libvirt, libvirt_qemu = _real("libvirt"), _real("libvirt_qemu")
    need(libvirt is not None and libvirt_qemu is not None, "python3-libvirt")
    assert libvirt is not None and libvirt_qemu is not None
    assert libvirt.getVersion() // 1000000 == 9, "the oracle must be libvirt 9.x"
    missing, different = [], []
    for name, value in _ours().items():
        module = libvirt_qemu if name.startswith("VIR_DOMAIN_QEMU_MONITOR") else libvirt
        if not hasattr(module, name):
            missing.append(name)
        elif getattr(module, name) != value:
            different.append((name, value, getattr(module, name)))
    assert not missing, f"names libvirt-python does not have: {missing}"
    assert not different, different


def test_complete_enums_the_api_relies_on() -> None:
    libvirt = _real("libvirt")
    need(libvirt is not None, "python3-libvirt")
    ours = _ours()
    prefixes = (
        "VIR_ERR_",
        "VIR_FROM_",
        "VIR_DOMAIN_CHECKPOINT_",
        "VIR_DOMAIN_BACKUP_",
        "VIR_DOMAIN_JOB_",
        "VIR_DOMAIN_EVENT_ID_",
        "VIR_DOMAIN_BLOCK_JOB_TYPE_",
        "VIR_CONNECT_LIST_DOMAINS_",
        "VIR_DOMAIN_XML_",
    )
    real = [n for n in dir(libvirt) if n.startswith(prefixes)]
    assert sorted(set(real) - set(ours)) == []


def test_values_the_spec_names() -> None:
    c = constants
    assert (c.VIR_ERR_OPERATION_DENIED, c.VIR_ERR_OPERATION_INVALID) == (29, 55)
    assert (c.VIR_ERR_CONFIG_UNSUPPORTED, c.VIR_ERR_OPERATION_UNSUPPORTED) == (67, 84)
    assert (c.VIR_ERR_XML_INVALID_SCHEMA, c.VIR_ERR_NO_DOMAIN_CHECKPOINT) == (92, 103)
    assert (c.VIR_ERR_NO_DOMAIN_BACKUP, c.VIR_ERR_CHECKPOINT_INCONSISTENT) == (104, 109)
    assert c.VIR_DOMAIN_JOB_OPERATION_BACKUP == 9
    assert c.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED == 21
    assert c.VIR_DOMAIN_CHECKPOINT_LIST_ROOTS == c.VIR_DOMAIN_CHECKPOINT_LIST_DESCENDANTS == 1
    assert c.VIR_DOMAIN_JOB_DISK_TEMP_USED == "disk_temp_used"
