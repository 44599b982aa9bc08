"""<domainbackup>: libvirt's parse rules, the two default-filling steps, exact output."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.api.conftest import assert_valid, reference_input, reference_output
from virtsim.api import constants as c
from virtsim.api import errors
from virtsim.api.errors import libvirtError
from virtsim.api.xml.backup import (
    BackupDef,
    align_backup_disks,
    fill_driver_defaults,
    format_backup,
    parse_backup,
)
from virtsim.api.xml.domain import DomainDisk, parse_domain

DOMAIN = """<domain type='kvm'>
  <name>vm</name>
  <memory>131072</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='/i/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/><source file='/i/vdb.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/><source dev='/dev/vg/lv'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
  </devices>
</domain>"""


def _disks() -> list[DomainDisk]:
    return parse_domain(DOMAIN).disks


def _begin(
    xml: str, suffix: str = "1700000000", disks: list[DomainDisk] | None = None
) -> BackupDef:
    """What backupBegin does with the XML before it starts: parse, align, driver defaults."""
    defn = parse_backup(xml)
    align_backup_disks(defn, _disks() if disks is None else disks, suffix)
    fill_driver_defaults(defn)
    return defn


def _raises(call: Callable[[], object], template: errors.ErrorTemplate, *args: str) -> None:
    with pytest.raises(libvirtError) as info:
        call()
    assert info.value.err[:3] == template(*args).err[:3]


@pytest.mark.parametrize(
    ("given", "shown", "index"),
    [
        ("backup-pull-full.xml", "07-backup-dumpxml-pull-full.txt", 8),
        ("backup-pull-incr.xml", "17-backup-dumpxml-pull-incr.txt", 9),
    ],
)
def test_real_pull_backups(given: str, shown: str, index: int) -> None:
    vda = DomainDisk(target="vda", bus="virtio", source="/w/vda.qcow2", format="qcow2")
    defn = _begin(reference_input(given), "cp2", [vda])
    defn.disks[0].index = index
    assert format_backup(defn) == reference_output(shown)
    assert_valid(format_backup(defn), "domainbackup.rng")


def test_real_push_incremental() -> None:
    vda = DomainDisk(target="vda", bus="virtio", source="/w/vda.qcow2", format="qcow2")
    defn = _begin(reference_input("backup-push-incr.xml"), "x", [vda])
    out = format_backup(defn)
    assert out == (
        "<domainbackup mode='push'>\n  <incremental>cp2</incremental>\n  <disks>\n"
        "    <disk name='vda' backup='yes' type='file' backupmode='incremental'"
        " incremental='cp2'>\n"
        "      <driver type='qcow2'/>\n      <target file='/w/push-vda.qcow2'/>\n    </disk>\n"
        "  </disks>\n</domainbackup>\n"
    )
    assert_valid(out, "domainbackup.rng")


def test_empty_backup_is_push_full_of_writable_disks() -> None:
    no_block = [d for d in _disks() if d.type != "block"]
    out = format_backup(_begin("<domainbackup/>", "1700000000", no_block))
    assert out == (
        "<domainbackup mode='push'>\n  <disks>\n"
        "    <disk name='vda' backup='yes' type='file' backupmode='full'>\n"
        "      <driver type='qcow2'/>\n      <target file='/i/vda.qcow2.1700000000'/>\n"
        "    </disk>\n"
        "    <disk name='vdb' backup='yes' type='file' backupmode='full'>\n"
        "      <driver type='qcow2'/>\n      <target file='/i/vdb.raw.1700000000'/>\n    </disk>\n"
        "    <disk name='sda' backup='no'/>\n  </disks>\n</domainbackup>\n"
    )
    assert_valid(out, "domainbackup.rng")


def test_block_disk_needs_an_explicit_store() -> None:
    # vdc is a block device: with no <disks> at all libvirt refuses to invent a file for it.
    _raises(lambda: _begin("<domainbackup/>"), errors.BACKUP_CANNOT_NAME_STORE, "vdc")


def test_listed_disks_only_and_per_disk_modes() -> None:
    defn = _begin(
        "<domainbackup mode='pull'>"
        "<incremental>cp1</incremental>"
        "<server transport='tcp' tls='yes' name='localhost' port='10809'/>"
        "<disks>"
        "<disk name='vdb' backupmode='full' exportname='b'/>"
        "<disk name='vda' type='file'><scratch file='/s/a.qcow2'/></disk>"
        "<disk name='vdc' type='block' incremental='cp0' exportbitmap='mine'>"
        "<driver type='qcow2'/><scratch dev='/dev/vg/scratch'/></disk>"
        "</disks></domainbackup>"
    )
    out = format_backup(defn)
    assert out == (
        "<domainbackup mode='pull'>\n  <incremental>cp1</incremental>\n"
        "  <server transport='tcp' tls='yes' name='localhost' port='10809'/>\n  <disks>\n"
        "    <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='b'>\n"
        "      <driver type='qcow2'/>\n      <scratch file='/i/vdb.raw.1700000000'/>\n"
        "    </disk>\n"
        "    <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='cp1'"
        " exportname='vda' exportbitmap='backup-vda'>\n"
        "      <driver type='qcow2'/>\n      <scratch file='/s/a.qcow2'/>\n    </disk>\n"
        "    <disk name='vdc' backup='yes' type='block' backupmode='incremental' incremental='cp0'"
        " exportname='vdc' exportbitmap='mine'>\n"
        "      <driver type='qcow2'/>\n      <scratch dev='/dev/vg/scratch'/>\n    </disk>\n"
        "    <disk name='sda' backup='no'/>\n  </disks>\n</domainbackup>\n"
    )
    assert_valid(out, "domainbackup.rng")


def test_unix_server_and_kept_encryption_round_trip() -> None:
    xml = (
        "<domainbackup mode='pull'>\n"
        "  <server transport='unix' socket='/run/b.sock'/>\n"
        "  <disks>\n"
        "    <disk name='vda' backup='yes' type='file' backupmode='full' exportname='vda'>\n"
        "      <driver type='qcow2'/>\n"
        "      <scratch file='/s/vda.qcow2'>\n"
        "        <encryption format='luks'>\n"
        "          <secret type='passphrase' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/>\n"
        "        </encryption>\n"
        "      </scratch>\n"
        "    </disk>\n"
        "    <disk name='vdb' backup='no'/>\n"
        "  </disks>\n"
        "</domainbackup>\n"
    )
    assert format_backup(parse_backup(xml)) == xml
    assert_valid(xml, "domainbackup.rng")


def test_internal_form_with_state_and_private_data() -> None:
    defn = _begin(
        "<domainbackup mode='pull'><server name='localhost' port='10809'/>"
        "<disks><disk name='vda'/></disks></domainbackup>"
    )
    defn.disks[0].state, defn.disks[0].index = "running", 3
    defn.tls_alias, defn.tls_secret_alias = "libvirt_backup_tls", "libvirt_backup_tls_secret"
    internal = format_backup(defn, internal=True)
    assert "<disk name='vda' backup='yes' state='running' type='file' backupmode='full'" in internal
    assert internal.endswith(
        "  <privateData>\n    <objects>\n"
        "      <secret type='tlskey' alias='libvirt_backup_tls_secret'/>\n"
        "      <TLSx509 alias='libvirt_backup_tls'/>\n    </objects>\n  </privateData>\n"
        "</domainbackup>\n"
    )
    back = parse_backup(internal, internal=True)
    assert format_backup(back, internal=True) == internal
    public = format_backup(defn)
    assert "state=" not in public and "privateData" not in public and "index='3'" in public


def test_parse_errors() -> None:
    _raises(
        lambda: parse_backup(
            "<domainbackup mode='pull'><server transport='unix' socket='rel'/></domainbackup>",
            internal=True,
        ),
        errors.BACKUP_SOCKET_NOT_ABSOLUTE,
        "rel",
    )
    _raises(
        lambda: parse_backup(
            "<domainbackup mode='push'><server name='h'/></domainbackup>", internal=True
        ),
        errors.BACKUP_SERVER_NEEDS_PULL,
    )
    _raises(
        lambda: parse_backup("<domainbackup mode='sideways'/>", internal=True),
        errors.BACKUP_UNKNOWN_MODE,
        "sideways",
    )
    for bad in (
        "<domainbackup mode='push'><server name='h'/></domainbackup>",
        "<domainbackup mode='pull'><disks><disk name='vda'><driver type='raw'/></disk></disks>"
        "</domainbackup>",
        "<domainbackup><disks><disk name='vda' type='network'/></disks></domainbackup>",
    ):
        with pytest.raises(libvirtError) as info:
            parse_backup(bad)
        assert info.value.get_error_code() == c.VIR_ERR_XML_INVALID_SCHEMA


def test_align_errors() -> None:
    _raises(
        lambda: _begin(
            "<domainbackup><disks><disk name='vdz' type='file'/></disks></domainbackup>"
        ),
        errors.BACKUP_NO_DISK_NAMED,
        "vdz",
    )
    _raises(
        lambda: _begin(
            "<domainbackup><disks><disk name='vda' type='file'/>"
            "<disk name='vda' type='file'/></disks></domainbackup>"
        ),
        errors.BACKUP_DISK_TWICE,
        "vda",
    )
    _raises(
        lambda: _begin(
            "<domainbackup><disks><disk name='vda' type='file' "
            "backupmode='incremental'/></disks></domainbackup>"
        ),
        errors.BACKUP_INCREMENTAL_NEEDS_CHECKPOINT,
        "vda",
    )
    _raises(
        lambda: _begin(
            "<domainbackup><disks><disk name='sda' type='file'/></disks></domainbackup>"
        ),
        errors.BACKUP_DISK_NO_MEDIA,
        "sda",
    )
    _raises(lambda: _begin("<domainbackup/>", disks=[]), errors.BACKUP_NO_DISKS)


SCHEMA = "Unable to validate doc against /usr/share/libvirt/schemas/domainbackup.rng\n"
SERVER_IN_PUSH = (
    SCHEMA
    + "Extra element server in interleave\n"
    + ("Element domainbackup failed to validate content\n")
)


@pytest.mark.parametrize(
    ("xml", "code", "domain", "detail"),
    [
        # Observed with backupBegin on libvirt 9.0's qemu driver (Debian 12).
        (
            "<domainbackup mode='sideways'/>",
            c.VIR_ERR_XML_INVALID_SCHEMA,
            c.VIR_FROM_XML,
            SCHEMA + "Invalid attribute mode for element domainbackup\n",
        ),
        (
            "<domainbackup mode='push'><server name='h'/></domainbackup>",
            c.VIR_ERR_XML_INVALID_SCHEMA,
            c.VIR_FROM_XML,
            SERVER_IN_PUSH,
        ),
        (
            "<domainbackup mode='pull'><server transport='unix' socket='rel.sock'/></domainbackup>",
            c.VIR_ERR_XML_INVALID_SCHEMA,
            c.VIR_FROM_XML,
            SERVER_IN_PUSH,
        ),
        (
            "<domainbackup>",
            c.VIR_ERR_XML_DETAIL,
            c.VIR_FROM_DOMAIN,
            "(domain_backup):1: Premature end of data in tag domainbackup line 1\n"
            "<domainbackup>\n--------------^",
        ),
        (
            "",
            c.VIR_ERR_XML_DETAIL,
            c.VIR_FROM_DOMAIN,
            "(domain_backup):1: Document is empty\n(null)\n^",
        ),
        (
            "<domaincheckpoint/>",
            c.VIR_ERR_XML_ERROR,
            c.VIR_FROM_XML,
            "expecting root element of 'domainbackup', not 'domaincheckpoint'",
        ),
        (
            "<domainbackup><disks><disk name='vdz' type='file'/></disks></domainbackup>",
            c.VIR_ERR_CONFIG_UNSUPPORTED,
            c.VIR_FROM_DOMAIN,
            "no disk named 'vdz'",
        ),
    ],
)
def test_errors_observed_on_real_libvirt(xml: str, code: int, domain: int, detail: str) -> None:
    with pytest.raises(libvirtError) as info:
        _begin(xml)
    expected = errors.make_error(code, domain, detail)
    assert info.value.err[:3] == expected.err[:3]
