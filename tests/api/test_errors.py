"""Error objects and texts: libvirt-python's shape, and libvirt 9.0's words (checked live)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.api.conftest import need
from virtsim.api import constants as c
from virtsim.api import errors
from virtsim.api.errors import libvirtError
from virtsim.api.xml.checkpoint import parse_checkpoint
from virtsim.api.xml.domain import parse_domain


@pytest.fixture
def real() -> Iterator[Any]:
    """libvirt-python with its in-process test driver (test:///default), silenced."""
    try:
        libvirt = importlib.import_module("libvirt")
    except ImportError:
        libvirt = None
    need(libvirt is not None, "python3-libvirt")
    assert libvirt is not None
    libvirt.registerErrorHandler(lambda *_: None, None)
    yield libvirt


def real_error(libvirt: Any, call: Callable[[], object]) -> tuple[int, str]:
    with pytest.raises(libvirt.libvirtError) as info:
        call()
    return info.value.get_error_code(), info.value.get_error_message()


def ours(call: Callable[[], object]) -> libvirtError:
    with pytest.raises(libvirtError) as info:
        call()
    return info.value


def same(err: libvirtError) -> tuple[int, str]:
    return err.get_error_code(), err.get_error_message()


def test_error_object_is_shaped_like_libvirt_python() -> None:
    err = errors.CHECKPOINT_NOT_FOUND("cp9")
    assert str(err) == "Domain checkpoint not found: no domain checkpoint with matching name 'cp9'"
    assert err.get_error_code() == c.VIR_ERR_NO_DOMAIN_CHECKPOINT
    assert err.get_error_domain() == c.VIR_FROM_QEMU
    assert err.get_error_level() == c.VIR_ERR_ERROR
    assert err.get_str1() == "Domain checkpoint not found: %s"
    assert err.get_str2() == "no domain checkpoint with matching name 'cp9'"
    assert (err.get_str3(), err.get_int1(), err.get_int2()) == (None, -1, -1)
    assert err.err[:4] == (103, 10, str(err), 2)
    assert errors.make_error(c.VIR_ERR_NO_DOMAIN, c.VIR_FROM_QEMU).get_error_message() == (
        "Domain not found"
    )


@pytest.mark.parametrize(
    ("template", "args", "message"),
    [
        (
            errors.NO_DOMAIN_BACKUP,
            (),
            "Domain backup job id not found: no domain backup job present",
        ),
        (
            errors.BACKUP_ALREADY_RUNNING,
            (),
            "Requested operation is not valid: another backup job is already running",
        ),
        (
            errors.BACKUP_INACTIVE,
            (),
            "Operation not supported: cannot perform disk backup for inactive domain",
        ),
        (
            errors.BACKUP_BROKEN_BITMAP,
            ("cp1", "vda"),
            "checkpoint inconsistent: missing or broken bitmap 'cp1' for disk 'vda'",
        ),
        (
            errors.BACKUP_CHECKPOINT_NOT_FOUND,
            ("cp1", "vda"),
            "Domain checkpoint not found: Checkpoint 'cp1' for incremental backup of disk 'vda' "
            "not found",
        ),
        (
            errors.BACKUP_STORE_EXISTS,
            ("/b/t.qcow2", "vda"),
            "invalid argument: store '/b/t.qcow2' for backup of 'vda' exists",
        ),
        (
            errors.BACKUP_NO_DISKS_SELECTED,
            (),
            "unsupported configuration: no disks selected for backup",
        ),
        (
            errors.BACKUP_TCP_PORT_REQUIRED,
            (),
            "Operation not supported: <domainbackup> must specify TCP port for now",
        ),
        (
            errors.NO_ACTIVE_JOB,
            (),
            "Requested operation is not valid: no job is active on the domain",
        ),
        (errors.DOMAIN_NOT_RUNNING, (), "Requested operation is not valid: domain is not running"),
        (
            errors.CHECKPOINT_CREATE_INACTIVE,
            (),
            "Operation not supported: cannot create checkpoint for inactive domain",
        ),
        (
            errors.CHECKPOINT_BITMAP_NOT_IN_CHAIN,
            ("cp1", "vda"),
            "internal error: bitmap 'cp1' not found in backing chain of 'vda'",
        ),
        (
            errors.STATE_LOCK_TIMEOUT,
            (),
            "Timed out during operation: cannot acquire state change lock",
        ),
    ],
)
def test_driver_error_texts(
    template: errors.ErrorTemplate, args: tuple[str, ...], message: str
) -> None:
    err = template(*args)
    assert str(err) == message
    assert err.get_error_code() == template.code


def test_flag_errors_have_no_prefix() -> None:
    err = errors.unsupported_flags(0x8, "qemuDomainCheckpointCreateXML")
    assert str(err) == "unsupported flags (0x8) in function qemuDomainCheckpointCreateXML"
    assert err.get_error_code() == c.VIR_ERR_INVALID_ARG
    assert (err.get_str1(), err.get_str2(), err.get_int1()) == (
        "qemuDomainCheckpointCreateXML",
        "flags",
        0,
    )


def test_texts_match_real_libvirt(real: Any) -> None:
    conn = real.open("test:///default")
    ro = real.openReadOnly("test:///default")
    dom, rodom = conn.lookupByName("test"), ro.lookupByName("test")
    cp = dom.checkpointCreateXML("<domaincheckpoint><name>a</name></domaincheckpoint>")
    cases: list[tuple[Callable[[], object], libvirtError]] = [
        (lambda: dom.checkpointLookupByName("nope"), errors.CHECKPOINT_NOT_FOUND("nope")),
        (lambda: cp.getParent(), errors.CHECKPOINT_NO_PARENT("a")),
        (
            lambda: rodom.checkpointCreateXML("<domaincheckpoint/>"),
            errors.read_only_denied("virDomainCheckpointCreateXML"),
        ),
        (
            lambda: rodom.backupBegin("<domainbackup/>", None),
            errors.read_only_denied("virDomainBackupBegin"),
        ),
        (lambda: rodom.abortJob(), errors.read_only_denied("virDomainAbortJob")),
        (
            lambda: rodom.XMLDesc(c.VIR_DOMAIN_XML_SECURE),
            errors.secure_denied("virDomainGetXMLDesc"),
        ),
        (
            lambda: dom.checkpointCreateXML("<domaincheckpoint/>", 8),
            errors.unsupported_flags(8, "testDomainCheckpointCreateXML"),
        ),
        (
            lambda: cp.delete(c.VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN | 4),
            errors.exclusive_flags(
                "VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN",
                "VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN_ONLY",
                "virDomainCheckpointDelete",
            ),
        ),
        (
            lambda: dom.checkpointCreateXML("<domaincheckpoint/>", 4),
            errors.required_flag(
                "VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE",
                "VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE",
                "virDomainCheckpointCreateXML",
            ),
        ),
        (
            lambda: dom.checkpointCreateXML("<domaincheckpoint><name>a</name></domaincheckpoint>"),
            errors.CHECKPOINT_EXISTS("a"),
        ),
        (
            lambda: dom.checkpointCreateXML(
                "<domaincheckpoint><disks><disk name='vdz'/></disks></domaincheckpoint>"
            ),
            errors.CHECKPOINT_NO_DISK_NAMED("vdz"),
        ),
        (
            lambda: dom.checkpointCreateXML(
                "<domaincheckpoint><name>z</name></domaincheckpoint>",
                c.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE,
            ),
            errors.CHECKPOINT_REDEFINE_NEEDS_TIME(),
        ),
        (lambda: dom.backupGetXMLDesc(), errors.no_support("virDomainBackupGetXMLDesc")),
    ]
    for call, expected in cases:
        assert real_error(real, call) == same(expected)


@pytest.mark.parametrize(
    "xml",
    [
        "<domain><name>x</name>",
        "<domain/><b/>",
        "",
        "<domain type='test'>\n  <name>q</name>\n</domainx>",
        "<domain type='test'><memory>1024</memory><os><type>hvm</type></os></domain>",
        "<domain type='test'><name>q</name><os><type>hvm</type></os></domain>",
        "<domain type='test'><name>q</name><uuid>zz</uuid><memory>1</memory>"
        "<os><type>hvm</type></os></domain>",
        "<domain type='test'><name>q</name><memory>1</memory><os><type>hvm</type></os><devices>"
        "<disk type='file' device='disk'><source file='/a.img'/></disk></devices></domain>",
        "<domaincheckpoint/>",
        "<domain type='test'><name>q</name><memory>1024</memory></domain>",
        "<domain type='test'><name>q</name><memory>abc</memory><os><type>hvm</type></os></domain>",
        "<domain type='test'><name>q</name><memory unit='zz'>1</memory><os><type>hvm</type></os>"
        "</domain>",
        "<domain type='test'><name>q</name><memory>-1</memory><os><type>hvm</type></os></domain>",
        "<domain type='test'><name>q</name><memory>1024</memory><vcpu>x</vcpu>"
        "<os><type>hvm</type></os></domain>",
        "<domain type='test'><name>q</name><memory>1</memory><currentMemory>zz</currentMemory>"
        "<os><type>hvm</type></os></domain>",
    ],
)
def test_domain_parse_errors_match_real_libvirt(real: Any, xml: str) -> None:
    conn = real.open("test:///default")
    assert same(ours(lambda: parse_domain(xml))) == real_error(real, lambda: conn.defineXML(xml))


@pytest.mark.parametrize(
    "xml",
    [
        "<domaincheckpoint>\n<name>q</name>\n</domaincheckpointx>",
        "<domainsnapshot/>",
        "<domaincheckpoint><name>bad name</name></domaincheckpoint>",
        "<domaincheckpoint><bogus/></domaincheckpoint>",
        "<domaincheckpoint><name>x</name><disks><disk name='vda' checkpoint='maybe'/></disks>"
        "</domaincheckpoint>",
        "<?xml version='1.0'?>\n<!DOCTYPE d [ <!ENTITY e 'hello'> ]>\n"
        "<domaincheckpoint><name>z</name><description>&e;</description></domaincheckpoint>",
        "<?xml version='1.0'?>\n<!DOCTYPE d [ <!ENTITY x SYSTEM 'file:///etc/hostname'> ]>\n"
        "<domaincheckpoint><name>&x;</name></domaincheckpoint>",
    ],
)
def test_checkpoint_parse_errors_match_real_libvirt(real: Any, xml: str) -> None:
    dom = real.open("test:///default").lookupByName("test")
    expected = real_error(real, lambda: dom.checkpointCreateXML(xml))
    assert same(ours(lambda: parse_checkpoint(xml))) == expected


def test_domain_of_parse_errors() -> None:
    assert ours(lambda: parse_domain("<domain>")).get_error_domain() == c.VIR_FROM_DOMAIN
    err = ours(lambda: parse_checkpoint("<domaincheckpoint>"))
    assert err.get_error_domain() == c.VIR_FROM_DOMAIN_CHECKPOINT
    assert ours(lambda: parse_checkpoint("<x/>")).get_error_domain() == c.VIR_FROM_XML
