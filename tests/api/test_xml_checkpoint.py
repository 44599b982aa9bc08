"""<domaincheckpoint>: libvirt's parse rules, disk defaults and exact output."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.api.conftest import assert_valid, reference_input, reference_output
from virtsim.api import constants as c
from virtsim.api import errors
from virtsim.api.errors import libvirtError
from virtsim.api.xml.checkpoint import (
    CheckpointDisk,
    align_checkpoint_disks,
    checkpoint_flags,
    format_checkpoint,
    parse_checkpoint,
)
from virtsim.api.xml.domain import DomainDef, DomainDisk, parse_domain

DOMAIN = """<domain type='kvm'>
  <name>vm</name>
  <uuid>118d99eb-240d-480b-b739-2d41ec05f672</uuid>
  <memory>131072</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='/i/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='/i/vdb.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
    <graphics type='vnc' passwd='pw'/>
  </devices>
</domain>"""


def _domain() -> DomainDef:
    return parse_domain(DOMAIN)


def _raises(call: Callable[[], object], template: errors.ErrorTemplate, *args: str) -> None:
    with pytest.raises(libvirtError) as info:
        call()
    assert info.value.err[:3] == template(*args).err[:3]


def test_real_checkpoint_output_round_trips() -> None:
    for name in ("02-checkpoint-dumpxml.txt", "12-checkpoint-dumpxml-cp2.txt"):
        xml = reference_output(name)
        defn = parse_checkpoint(xml, redefine=True)
        assert format_checkpoint(defn) == xml
        assert_valid(format_checkpoint(defn), "domaincheckpoint.rng")


def test_create_as_libvirt_does() -> None:
    dom = _domain()
    defn = parse_checkpoint(reference_input("checkpoint-cp2.xml"), now=1795639128)
    assert (defn.name, defn.creation_time, defn.parent) == ("cp2", 1795639128, None)
    defn.parent = "cp1"
    align_checkpoint_disks(defn, dom.disks)
    defn.domain = dom
    out = format_checkpoint(defn)
    assert out.startswith(
        "<domaincheckpoint>\n  <name>cp2</name>\n  <parent>\n    <name>cp1</name>\n  </parent>\n"
        "  <creationTime>1795639128</creationTime>\n  <disks>\n"
        "    <disk name='vda' checkpoint='bitmap' bitmap='cp2'/>\n"
        "    <disk name='vdb' checkpoint='no'/>\n    <disk name='sda' checkpoint='no'/>\n"
        "  </disks>\n  <domain type='kvm'>\n    <name>vm</name>\n"
    )
    assert "passwd" not in out and out.endswith("  </domain>\n</domaincheckpoint>\n")
    assert "passwd='pw'" in format_checkpoint(defn, secure=True)
    assert "<domain " not in format_checkpoint(defn, no_domain=True)
    for xml in (out, format_checkpoint(defn, secure=True)):
        assert_valid(xml, "domaincheckpoint.rng")


def test_defaults_without_disks_and_name() -> None:
    defn = parse_checkpoint(
        "<domaincheckpoint><description>d</description></domaincheckpoint>", now=1700000000
    )
    assert defn.name == "1700000000"
    align_checkpoint_disks(defn, _domain().disks)
    assert defn.disks == [
        CheckpointDisk("vda", "bitmap", "1700000000"),
        CheckpointDisk("vdb", "bitmap", "1700000000"),
        CheckpointDisk("sda", "no"),
    ]


def test_disks_by_source_path_become_targets_and_keep_domain_order() -> None:
    defn = parse_checkpoint(
        "<domaincheckpoint><name>c</name><disks><disk name='/i/vdb.qcow2' bitmap='c'/>"
        "<disk name='vda' checkpoint='no'/></disks></domaincheckpoint>"
    )
    align_checkpoint_disks(defn, _domain().disks)
    assert [(d.name, d.checkpoint, d.bitmap) for d in defn.disks] == [
        ("vda", "no", None),
        ("vdb", "bitmap", "c"),
        ("sda", "no", None),
    ]


def test_size_attribute_only_with_the_flag() -> None:
    defn = parse_checkpoint("<domaincheckpoint><name>c</name></domaincheckpoint>", now=5)
    align_checkpoint_disks(defn, _domain().disks)
    defn.disks[0].size = 1048576
    assert "size=" not in format_checkpoint(defn)
    out = format_checkpoint(defn, **checkpoint_flags(c.VIR_DOMAIN_CHECKPOINT_XML_SIZE))
    assert "    <disk name='vda' checkpoint='bitmap' bitmap='c' size='1048576'/>\n" in out
    assert_valid(out, "domaincheckpoint.rng")


def test_escaping_like_libvirt() -> None:
    defn = parse_checkpoint(
        "<domaincheckpoint><name>c</name><description>a &lt;b&gt; &amp; 'c' \"d\"</description>"
        "</domaincheckpoint>",
        now=5,
    )
    assert defn.description == "a <b> & 'c' \"d\""
    out = format_checkpoint(defn)
    assert "<description>a &lt;b&gt; &amp; &apos;c&apos; &quot;d&quot;</description>" in out
    assert parse_checkpoint(out, redefine=True).description == defn.description


def test_align_errors() -> None:
    disks = _domain().disks

    def align(xml: str, with_disks: list[DomainDisk] = disks) -> None:
        align_checkpoint_disks(parse_checkpoint(xml), with_disks)

    one = "<domaincheckpoint><name>c</name><disks>{}</disks></domaincheckpoint>"
    _raises(lambda: align(one.format("<disk name='vdz'/>")), errors.CHECKPOINT_NO_DISK_NAMED, "vdz")
    _raises(
        lambda: align(one.format("<disk name='vda'/><disk name='/i/vda.qcow2'/>")),
        errors.CHECKPOINT_DISK_TWICE,
        "/i/vda.qcow2",
    )
    _raises(
        lambda: align(one.format("<disk name='sda'/>")), errors.CHECKPOINT_DISK_EMPTY_OR_RO, "sda"
    )
    _raises(
        lambda: align(one.format("<disk name='vda'/><disk name='vdb'/>"), disks[:1]),
        errors.CHECKPOINT_TOO_MANY_DISKS,
    )
    _raises(lambda: align("<domaincheckpoint/>", []), errors.CHECKPOINT_NO_DISKS)


def test_redefine_rules() -> None:
    _raises(
        lambda: parse_checkpoint("<domaincheckpoint/>", redefine=True),
        errors.CHECKPOINT_REDEFINE_NEEDS_NAME,
    )
    _raises(
        lambda: parse_checkpoint(
            "<domaincheckpoint><name>a</name></domaincheckpoint>", redefine=True
        ),
        errors.CHECKPOINT_REDEFINE_NEEDS_TIME,
    )
    defn = parse_checkpoint(
        "<domaincheckpoint><name>a</name><parent><name>p</name></parent>"
        "<creationTime>7</creationTime></domaincheckpoint>",
        redefine=True,
    )
    assert (defn.parent, defn.creation_time, defn.domain) == ("p", 7, None)
    # Without REDEFINE the read-only fields of the input are ignored, as libvirt does.
    plain = parse_checkpoint(
        "<domaincheckpoint><name>a</name><parent><name>p</name></parent>"
        "<creationTime>7</creationTime></domaincheckpoint>",
        now=99,
    )
    assert (plain.parent, plain.creation_time) == (None, 99)


def test_schema_refusals() -> None:
    for bad in (
        "<domaincheckpoint><name>.hidden</name></domaincheckpoint>",
        "<domaincheckpoint><name>a/b</name></domaincheckpoint>",
        "<domaincheckpoint><disks><disk name='vda' checkpoint='no' bitmap='x'/></disks>"
        "</domaincheckpoint>",
    ):
        with pytest.raises(libvirtError) as info:
            parse_checkpoint(bad)
        assert info.value.get_error_code() == c.VIR_ERR_XML_INVALID_SCHEMA
