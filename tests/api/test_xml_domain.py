"""Domain XML: the simulated subset parsed, everything else kept, printed as libvirt 9.0 does."""

from __future__ import annotations

import pytest

from tests.api.conftest import assert_valid, reference_input, reference_output
from virtsim.api import constants as c
from virtsim.api.errors import libvirtError
from virtsim.api.xml.domain import (
    DomainDisk,
    domain_xml_flags,
    format_domain,
    parse_domain,
)

OS = "<os><type>hvm</type></os>"

RICH = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>rich</name>
  <uuid>118D99EB240D480BB7392D41EC05F672</uuid>
  <title>a title</title>
  <metadata>
    <app:backup xmlns:app="http://example.com/app/1"><app:policy keep='7'/></app:backup>
  </metadata>
  <memory unit='GiB'>1</memory>
  <vcpu current='1'>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <devices>
    <graphics type='vnc' port='-1' autoport='yes' passwd='s3cret'/>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <target dev='vda' bus='virtio'/>
      <source file='/images/vda.qcow2'/>
      <driver name='qemu' type='qcow2' cache='none'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/vdb.raw'/>
      <target dev='vdb' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/lv'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <memballoon model='virtio'/>
  </devices>
  <qemu:commandline><qemu:arg value='-S'/></qemu:commandline>
</domain>
"""

RICH_OUT = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>rich</name>
  <uuid>118d99eb-240d-480b-b739-2d41ec05f672</uuid>
  <title>a title</title>
  <metadata>
    <app:backup xmlns:app='http://example.com/app/1'>
      <app:policy keep='7'/>
    </app:backup>
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/images/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/vdb.raw'/>
      <target dev='vdb' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/lv'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <graphics type='vnc' port='-1' autoport='yes'{passwd}/>
    <memballoon model='virtio'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-S'/>
  </qemu:commandline>
</domain>
"""


def test_live_domain_round_trips_byte_for_byte() -> None:
    live = reference_output("29-dumpxml.txt")
    defn = parse_domain(live)
    assert format_domain(defn, live_id=1) == live
    assert_valid(format_domain(defn, live_id=1), "domain.rng")


def test_minimal_definition_gets_libvirt_normalization() -> None:
    defn = parse_domain(reference_input("domain.xml"))
    assert (defn.name, defn.type, defn.memory_kib, defn.vcpus) == ("anchor", "qemu", 131072, 1)
    assert defn.disks == [
        DomainDisk(
            target="vda",
            bus="virtio",
            source="/w/vda.qcow2",
            driver_name="qemu",
            format="qcow2",
        )
    ]
    out = format_domain(defn)
    assert (
        "  <memory unit='KiB'>131072</memory>\n  <currentMemory unit='KiB'>131072</currentMemory>\n"
        in out
    )
    assert "  <vcpu placement='static'>1</vcpu>\n" in out
    assert out.startswith("<domain type='qemu'>\n  <name>anchor</name>\n")
    assert_valid(out, "domain.rng")


def test_subset_fields() -> None:
    defn = parse_domain(RICH)
    assert defn.uuid == "118d99eb-240d-480b-b739-2d41ec05f672"
    assert (defn.memory_kib, defn.vcpus, defn.guest_agent) == (1048576, 2, True)
    assert defn.emulator == "/usr/bin/qemu-system-x86_64"
    assert [
        (d.target, d.type, d.device, d.format, d.readonly, d.shareable) for d in defn.disks
    ] == [
        ("vda", "file", "disk", "qcow2", False, False),
        ("vdb", "file", "disk", "raw", False, True),
        ("sda", "file", "cdrom", "raw", True, False),
        ("vdc", "block", "disk", "raw", False, False),
    ]
    assert defn.disks[2].is_empty and not defn.disks[3].is_empty
    assert defn.disks[3].source == "/dev/vg/lv"
    assert [(g.type, g.passwd) for g in defn.graphics] == [("vnc", "s3cret")]


def test_everything_kept_in_libvirt_order_and_passwords_only_with_secure() -> None:
    defn = parse_domain(RICH)
    assert format_domain(defn) == RICH_OUT.format(passwd="")
    secure = format_domain(defn, **domain_xml_flags(c.VIR_DOMAIN_XML_SECURE))
    assert secure == RICH_OUT.format(passwd=" passwd='s3cret'")
    assert_valid(secure, "domain.rng")
    again = parse_domain(secure)
    assert format_domain(again, secure=True) == secure
    again.graphics[0].passwd = "changed"
    assert "passwd='changed'" in format_domain(again, secure=True)
    assert "passwd" not in format_domain(again)


def test_edits_to_the_subset_are_printed() -> None:
    defn = parse_domain(RICH)
    defn.disks[0].source = "/images/other.qcow2"
    defn.disks[1].shareable = False
    defn.disks.append(DomainDisk(target="vdd", bus="virtio", source="/i/d.raw", format="raw"))
    defn.memory_kib = 2048
    defn.name = "renamed"
    out = format_domain(defn)
    assert "<source file='/images/other.qcow2'/>" in out
    assert "<shareable/>" not in out
    assert "<memory unit='KiB'>2048</memory>" in out and "<name>renamed</name>" in out
    assert (
        "    <disk type='file' device='disk'>\n      <driver type='raw'/>\n"
        "      <source file='/i/d.raw'/>\n      <target dev='vdd' bus='virtio'/>\n    </disk>\n"
        "    <channel" in out
    )
    assert_valid(out, "domain.rng")


def test_inactive_drops_the_live_id() -> None:
    defn = parse_domain(reference_output("29-dumpxml.txt"))
    assert format_domain(defn, live_id=1, inactive=True).startswith("<domain type='qemu'>\n")
    assert format_domain(defn).startswith("<domain type='qemu'>\n")


@pytest.mark.parametrize(
    ("unit", "value", "kib"),
    [
        ("KiB", 1024, 1024),
        ("k", 3, 3),
        ("MiB", 128, 131072),
        ("M", 1, 1024),
        ("MB", 1, 977),
        ("GiB", 2, 2097152),
        ("G", 1, 1048576),
        ("GB", 1, 976563),
        ("b", 1025, 2),
        ("bytes", 1, 1),
        ("KB", 1, 1),
        ("TiB", 1, 1073741824),
    ],
)
def test_memory_units(unit: str, value: int, kib: int) -> None:
    xml = f"<domain><name>m</name><memory unit='{unit}'>{value}</memory>{OS}</domain>"
    assert parse_domain(xml).memory_kib == kib


def test_validate_flag_uses_libvirt_schema() -> None:
    with pytest.raises(libvirtError) as info:
        parse_domain(
            "<domain type='kvm'><name>q</name><memory>1024</memory><os><type>hvm</type></os>"
            "<bogus/></domain>",
            validate=True,
        )
    assert info.value.get_error_code() == c.VIR_ERR_XML_INVALID_SCHEMA
    assert str(info.value).endswith("domain.rng\nElement domain has extra content: bogus\n")


def test_memory_from_numa_cells_and_balloon_clamped() -> None:
    numa = parse_domain(
        "<domain type='kvm'><name>n</name><vcpu>2</vcpu><cpu><numa>"
        "<cell id='0' cpus='0' memory='512' unit='MiB'/><cell id='1' cpus='1' memory='1024'/>"
        "</numa></cpu><os><type>hvm</type></os></domain>"
    )
    assert numa.memory_kib == 525312  # what libvirt 9.0 reports for this definition
    over = parse_domain(
        "<domain><name>m</name><memory>1024</memory><currentMemory>4096</currentMemory>"
        f"{OS}</domain>"
    )
    assert "<currentMemory unit='KiB'>1024</currentMemory>" in format_domain(over)
