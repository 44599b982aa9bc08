"""The qemu-io command language and simulated workloads (virtsim.sim.guest).

Expected texts are what QEMU 7.2.22 printed; the differential test at the end sends the
same HMP lines to a real QEMU and compares reply, stdout and stderr.
"""

from __future__ import annotations

import dataclasses
import errno
import re
from collections.abc import Iterator

import pytest

from tests.sim.real_qemu import RealQemu, real_qemu_session
from virtsim.sim.errors import SimError
from virtsim.sim.guest import (
    BDRV_REQUEST_MAX_BYTES,
    GuestOp,
    HmpError,
    HmpQemuIo,
    QemuIoCommand,
    Workload,
    node_not_found_reply,
    parse_hmp_qemu_io,
    parse_qemu_io,
    parse_size,
    qdev_not_a_device_reply,
    qdev_not_found_reply,
    report_line,
)

MiB = 1 << 20
TRY = 'Try "help qemu-io" for more information\r\n'
WRITE_USAGE = ("write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of "
               "bytes at a specified offset\n")


# --------------------------------------------------------------------------- a tiny disk


class FakeDisk:
    """Executes GuestOps the way a qcow2 node with default options answers them."""

    def __init__(self, size: int, read_only: bool = False) -> None:
        self.size = size
        self.read_only = read_only
        self.data = bytearray(size)
        self.vmstate = bytearray(MiB)

    def _bad(self, op: GuestOp) -> bool:
        return (op.length > BDRV_REQUEST_MAX_BYTES or op.offset > self.size
                or self.size - op.offset < op.length)

    def run(self, res: QemuIoCommand, duration_ns: int = 1_000_000) -> str:
        out = res.stdout
        for op in res.ops:
            err, data = None, None
            if op.kind in ("write", "zero", "discard", "read") and self._bad(op):
                err = errno.EIO
            elif op.kind == "write":
                self.data[op.offset:op.offset + op.length] = op.data()
            elif op.kind == "zero":
                self.data[op.offset:op.offset + op.length] = bytes(op.length)
            elif op.kind == "read":
                data = bytes(self.data[op.offset:op.offset + op.length])
            elif op.kind == "vmstate-write":
                self.vmstate[op.offset:op.offset + op.length] = op.data()
            elif op.kind == "vmstate-read":
                data = bytes(self.vmstate[op.offset:op.offset + op.length])
            out += op.render(duration_ns, err, data, self.size)
        return out


class Model:
    """The HMP ``qemu-io`` path of an emulator, with FakeDisks as nodes."""

    QOM_OBJECTS = ("", "/machine", "/machine/unattached/sysbus")

    def __init__(self) -> None:
        self.nodes = {"disk0": FakeDisk(64 * MiB), "ro": FakeDisk(64 * MiB, read_only=True)}

    def hmp(self, line: str) -> tuple[str, str, str]:
        parsed = parse_hmp_qemu_io(line)
        if isinstance(parsed, HmpError):
            return parsed.reply, parsed.stdout, ""
        use_device, device, command = parsed
        if use_device:
            if device in self.QOM_OBJECTS:
                return qdev_not_a_device_reply(device), "", ""
            return qdev_not_found_reply(device), "", ""
        disk = self.nodes.get(device)
        if disk is None:
            return node_not_found_reply(device), "", ""
        res = parse_qemu_io(command, lambda: "Block node is read-only" if disk.read_only
                            else None)
        return res.reply, disk.run(res), res.stderr


_RATE = re.compile(r"^(?P<head>.+, \d+ ops); .+ \(.+/sec and .+ ops/sec\)$", re.M)
_CSV = re.compile(r"^(\d+,\d+),[^,\n]+,[^,\n]+,[^,\n]+$", re.M)


def norm(text: str) -> str:
    """Drop the wall-clock figures of qemu-io's report lines."""
    return _CSV.sub(r"\1,<t>", _RATE.sub(r"\g<head>; <t>", text))


def model_run(command: str, disk: FakeDisk | None = None) -> tuple[str, str, str]:
    res = parse_qemu_io(command)
    return res.reply, norm((disk or FakeDisk(64 * MiB)).run(res)), res.stderr


# --------------------------------------------------------------------------- HMP parsing


@pytest.mark.parametrize("line, expected", [
    ('qemu-io disk0 "write -P 0xab 0 1M"', HmpQemuIo(False, "disk0", "write -P 0xab 0 1M")),
    ('  qemu-io  \tdisk0    "write 0 1"', HmpQemuIo(False, "disk0", "write 0 1")),
    ('qemu-io -d /machine/peripheral/vd0/virtio-backend "flush"',
     HmpQemuIo(True, "/machine/peripheral/vd0/virtio-backend", "flush")),
    ('qemu-io -dx disk0', HmpQemuIo(True, "x", "disk0")),
    ('qemu-io "disk0" "write 0 1"', HmpQemuIo(False, "disk0", "write 0 1")),
    ('qemu-io "dis\\"k0" "write 0 1"', HmpQemuIo(False, 'dis"k0', "write 0 1")),
    ('qemu-io disk0 write', HmpQemuIo(False, "disk0", "write")),
    ('qemu-io disk0 ""  ', HmpQemuIo(False, "disk0", "")),
    ('qemu-io disk0 "a\\nb\\r\\\\\\\'"', HmpQemuIo(False, "disk0", "a\nb\r\\'")),
    ('qemu-io #block062 "flush"', HmpQemuIo(False, "#block062", "flush")),
])
def test_hmp_parse(line: str, expected: HmpQemuIo) -> None:
    assert parse_hmp_qemu_io(line) == expected


@pytest.mark.parametrize("line, reply, stdout", [
    ("qemu-io disk0 write 0 1k", "qemu-io: extraneous characters at the end of line\r\n", ""),
    ('qemu-io disk0 "write 0 1k" extra',
     "qemu-io: extraneous characters at the end of line\r\n", ""),
    ("qemu-io \"disk0\" 'write 0 1k'",
     "qemu-io: extraneous characters at the end of line\r\n", ""),
    ('qemu-io -x disk0 "write 0 1"', "qemu-io: unsupported option -x\r\n", ""),
    ('qemu-io -- disk0 "write 0 1"', "qemu-io: unsupported option --\r\n", ""),
    ("qemu-io disk0", "qemu-io: string expected\r\n", ""),
    ("qemu-io", "qemu-io: block device name expected\r\n", ""),
    ('qemu-io "ro', "qemu-io: block device name expected\r\n", "unterminated string\n"),
    ('qemu-io disk0 "write 0 1k', "qemu-io: string expected\r\n", "unterminated string\n"),
    ('qemu-io disk0 "write \\x 0 1k"', "qemu-io: string expected\r\n",
     "unsupported escape code: '\\x'\n"),
    ('qemu-io disk0 "write\\', "qemu-io: string expected\r\n",
     "unsupported escape code: '\\\0'\n"),
])
def test_hmp_parse_errors(line: str, reply: str, stdout: str) -> None:
    assert parse_hmp_qemu_io(line) == HmpError(reply + TRY, stdout)


def test_hmp_option_at_end_of_line_loses_its_newline() -> None:
    # QEMU prints the missing option character with %c: a NUL that ends the message.
    assert parse_hmp_qemu_io("qemu-io -") == HmpError(
        'qemu-io: unsupported option -Try "help qemu-io" for more information\r\n')


def test_hmp_arguments_are_cut_at_1023_bytes() -> None:
    kept = parse_hmp_qemu_io('qemu-io disk0 "write 0' + " " * 1000 + '1"')
    cut = parse_hmp_qemu_io('qemu-io disk0 "write 0' + " " * 1020 + '1"')
    assert isinstance(kept, HmpQemuIo) and kept.command.endswith("1")
    assert isinstance(cut, HmpQemuIo) and len(cut.command) == 1023
    assert parse_qemu_io(cut.command).stderr == (
        "bad argument count 1 to write, expected at least 2 arguments\n")


def test_hmp_lookup_replies() -> None:
    assert node_not_found_reply("nosuch") == (
        "Error: Cannot find device='' nor node-name='nosuch'\r\n")
    assert qdev_not_found_reply("nosuch") == "Error: Device 'nosuch' not found\r\n"
    assert qdev_not_a_device_reply("") == "Error:  is not a hotpluggable device\r\n"


def test_hmp_needs_the_command_name() -> None:
    with pytest.raises(ValueError):
        parse_hmp_qemu_io("info block")


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("64k", 65536), ("1K", 1024), ("1m", MiB), ("1M", MiB), ("1.5k", 1536),
    ("1.k", 1024), ("1.", 1), ("1b", 1), ("0x10", 16), ("0X10", 16), ("0x1b", 27),
    ("+5", 5), ("0.0001k", 0), ("0.001k", 1), ("1.0000000001k", 1024),
    ("7.9E", 9108079886394091136),
    ("1.5e", 1729382256910270464), ("1T", 1 << 40), ("1P", 1 << 50), ("1E", 1 << 60),
    ("9223372036854775807", (1 << 63) - 1), ("\t1", 1),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text, too_large", [
    ("1x", False), ("1.5", False), ("1.5b", False), ("1.5e3", False), ("0x", False),
    ("0x1.5k", False), ("1kk", False), ("-1", False), ("-", False), ('"0"', False),
    ("20E", True), ("8E", True), ("99999999999999999999", True),
    ("-99999999999999999999", True), ("9223372036854775808", True), ("20Ex", False),
])
def test_parse_size_errors(text: str, too_large: bool) -> None:
    with pytest.raises(ValueError) as exc:
        parse_size(text)
    if too_large:
        assert str(exc.value) == f"Parsing error: argument too large -- {text}"
    else:
        assert str(exc.value) == ("Parsing error: non-numeric argument, or "
                                  f"extraneous/unrecognized suffix -- {text}")


def test_hex_with_suffix_warns() -> None:
    warnings: list[str] = []
    assert parse_size("0x1k", warnings) == 1024
    assert warnings == ["Using a multiplier suffix on hex numbers is deprecated: 0x1k"]


# --------------------------------------------------------------------------- qemu-io


def test_write_op() -> None:
    res = parse_qemu_io("write -P 0xab 10M 64k")
    assert res.ops == [GuestOp("write", 10 * MiB, 65536, 0xAB, report=res.ops[0].report)]
    assert res.stdout == res.stderr == res.reply == ""
    assert res.ops[0].render(1_000_000) == (
        "wrote 65536/65536 bytes at offset 10485760\n"
        "64 KiB, 1 ops; 00.00 sec (62.500 MiB/sec and 1000.0000 ops/sec)\n")


@pytest.mark.parametrize("command, kind, fields", [
    ("write 0 64k", "write", {"pattern": 0xCD}),
    ("w 0 1k", "write", {"pattern": 0xCD}),
    ("write 0 64k -P 0x5", "write", {"pattern": 5}),
    ("write -P017 0 1", "write", {"pattern": 15}),
    ("write -zu 0 64k", "zero", {"unmap": True}),
    ("write -nz 0 3G", "zero", {"no_fallback": True, "length": 3 << 30}),
    ("write -f 0 64k", "write", {"fua": True}),
    ("write -c 0 64k", "write", {"compressed": True}),
    ("write -b 0 512", "vmstate-write", {}),
    ("write -s /tmp/f 0 1", "write", {"source_file": "/tmp/f", "pattern": None}),
    ("writev -P 0x22 0 4k 4k", "write", {"pattern": 0x22, "length": 8192}),
    ("aio_write -P 0x33 0 1 2 3", "write", {"pattern": 0x33, "length": 6}),
    ("aio_write -z -P 0x5 0 64k", "zero", {}),
    ("discard 0 64k", "discard", {}),
    ("d 0 64k", "discard", {}),
    ("read -P 0xab -s 512 -l 1k 0 64k", "read", {"verify": (512, 1024), "pattern": 0xAB}),
    ("read -v 0 32", "read", {"verify": None}),
    ("readv -P 0x22 0 4k 4k", "read", {"verify": (0, 8192)}),
    ("read -b 0 512", "vmstate-read", {}),
    ("flush", "flush", {}), ("f", "flush", {}), ("aio_flush", "drain", {}),
    ("length", "length", {}), ("sleep 0x10", "sleep", {"milliseconds": 16}),
])
def test_op_kinds(command: str, kind: str, fields: dict[str, object]) -> None:
    res = parse_qemu_io(command)
    assert res.stdout == res.stderr == "" and len(res.ops) == 1
    op = res.ops[0]
    assert op.kind == kind
    for name, value in fields.items():
        assert getattr(op, name) == value, name


@pytest.mark.parametrize("command, stdout, stderr", [
    ("write -P 256 0 1", "256 is not a valid pattern byte\n", ""),
    ("write -P 0x1g 0 1", "0x1g is not a valid pattern byte\n", ""),
    ("write 0 -1", WRITE_USAGE, "write: invalid option -- '1'\n"),
    ("write --foo 0 1", WRITE_USAGE, "write: invalid option -- '-'\n"),
    ("write 0 1 -P", WRITE_USAGE, "write: option requires an argument -- 'P'\n"),
    ("write -P 256 -x 0 1", "256 is not a valid pattern byte\n", ""),
    ("write -- -1 1", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix"
                      " -- -1\n", ""),
    ("write 0 1 2", WRITE_USAGE, ""),
    ("write 0", "", "bad argument count 1 to write, expected at least 2 arguments\n"),
    ("flush x", "", "bad argument count 1 to flush, expected 0 arguments\n"),
    ("truncate", "", "bad argument count 0 to truncate, expected between 1 and 3 arguments\n"),
    ("bogus", "", 'command "bogus" not found\n'),
    ("WRITE 0 1", "", 'command "WRITE" not found\n'),
    ("trim 0 64k", "", 'command "trim" not found\n'),
    ("write\t0 1", "", 'command "write\t0" not found\n'),
    ("write 0 3G", "length cannot exceed 2147483136 without -n, given 3G\n", ""),
    ("discard 0 3G", "length cannot exceed 2147483136, given 3G\n", ""),
    ("write -z -P 1 0 1", "Only one of -z, -P, and -s can be specified at the same time\n", ""),
    ("write -u 0 1", "-u requires -z to be specified\n", ""),
    ("write -n 0 1", "-n requires -z to be specified\n", ""),
    ("write -b -z 0 1", "-b and -z cannot be specified at the same time\n", ""),
    ("write -fc 0 64k", "-f and -b or -c cannot be specified at the same time\n", ""),
    ("write -c 1 512", "1 is not a sector-aligned value for 'offset'\n", ""),
    ("write -b 0 1", "1 is not a sector-aligned value for 'count'\n", ""),
    ("read -s 512 0 64k", "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a "
                          "number of bytes at a specified offset\n", ""),
    ("read -P 0xab -l 2k -s 64k 0 64k", "pattern verification range exceeds end of read "
                                        "data\n", ""),
    ("writev 0 3G", "Argument '3G' exceeds maximum size 2147483136\n", ""),
    ("writev 0 1G 1G", "The total number of bytes exceed the maximum size 2147483136\n", ""),
    ("aio_write -z 0 64k 64k", "-z supports only a single length parameter\n", ""),
    ("aio_write -i 0 64k", "injecting invalid write request\n", ""),
    ("aio_read -i 0 1", "injecting invalid read request\n", ""),
    ("sleep -1", "-1 is not a valid number\n", ""),
    ("help nosuch", "command nosuch not found\n", ""),
    ("? flush", "flush -- flush all in-core file state to disk\n", ""),
    ("", "", ""),
])
def test_command_errors(command: str, stdout: str, stderr: str) -> None:
    res = parse_qemu_io(command)
    assert (res.stdout, res.stderr, res.ops) == (stdout, stderr, [])


def test_hex_suffix_warning_goes_to_the_reply() -> None:
    res = parse_qemu_io("write -P 0x1 0x1k 0x2k")
    assert res.reply == (
        "warning: Using a multiplier suffix on hex numbers is deprecated: 0x1k\r\n"
        "warning: Using a multiplier suffix on hex numbers is deprecated: 0x2k\r\n")
    assert (res.ops[0].offset, res.ops[0].length) == (1024, 2048)


def test_permission_is_checked_before_arguments() -> None:
    asked: list[bool] = []

    def deny() -> str:
        asked.append(True)
        return "Block node is read-only"

    assert parse_qemu_io("write 0 20Ex", deny).reply == "Block node is read-only\r\n"
    assert parse_qemu_io("read 0 1", deny).ops  # reads need no write permission
    assert parse_qemu_io("write 0", deny).stderr  # the argument count comes first
    assert len(asked) == 1


def test_source_file_data_repeats() -> None:
    (op,) = parse_qemu_io("write -s /tmp/pattern 0 7").ops
    assert op.data(b"abc") == b"abcabca"
    assert op.data() == b"\xcd" * 7  # what a caller without the file would write
    with pytest.raises(ValueError):
        op.data(b"")


def test_unsupported_commands_are_named() -> None:
    assert parse_qemu_io("map").unsupported == "map"
    assert parse_qemu_io("a 0").unsupported == "alloc"


def test_render_outcomes() -> None:
    disk = FakeDisk(64 * MiB)
    assert model_run("write 64M 1", disk)[1] == "write failed: Input/output error\n"
    assert model_run("aio_write 100M 1", disk)[1] == "aio_write failed: Input/output error\n"
    assert model_run("aio_read 100M 1", disk)[1] == "readv failed: Input/output error\n"
    assert model_run("discard 100M 1", disk)[1] == "discard failed: Input/output error\n"
    assert model_run("write -q 0 128k", disk)[1] == ""
    assert model_run("read -P 0xcd -q 0 64k", disk)[1] == ""
    assert model_run("aio_read -P 0x5 -q 0 1k", disk)[1] == (
        "Pattern verification failed at offset 0, 1024 bytes\n")
    assert model_run("read -P 0xab -s 512 -l 1k 0 64k", disk)[1] == (
        "Pattern verification failed at offset 512, 1024 bytes\n"
        "read 65536/65536 bytes at offset 0\n64 KiB, 1 ops; <t>\n")
    assert model_run("read -v 65531 10", disk)[1] == (
        "0000fffb:  cd cd cd cd cd cd cd cd cd cd  ..........\n"
        "read 10/10 bytes at offset 65531\n10 bytes, 1 ops; <t>\n")
    assert model_run("write -C 0 64k", disk)[1] == "65536,1,<t>\n"
    assert model_run("length", disk)[1] == "64 MiB\n"


@pytest.mark.parametrize("args, duration_ns, expected", [
    # report lines QEMU 7.2 printed, with the duration their ops/sec figure implies
    (("wrote", 0, 65536, 65536, 1), 1177978,
     "wrote 65536/65536 bytes at offset 0\n"
     "64 KiB, 1 ops; 00.00 sec (53.057 MiB/sec and 848.9123 ops/sec)\n"),
    (("wrote", 0, 1536, 1536, 1), 17153,
     "wrote 1536/1536 bytes at offset 0\n"
     "1.500 KiB, 1 ops; 00.00 sec (85.399 MiB/sec and 58298.8399 ops/sec)\n"),
    (("wrote", 0, 16, 16, 1), 20834,
     "wrote 16/16 bytes at offset 0\n"
     "16 bytes, 1 ops; 00.00 sec (749.976 KiB/sec and 47998.4640 ops/sec)\n"),
    (("wrote", 0, 1, 1, 1), 1048636,
     "wrote 1/1 bytes at offset 0\n"
     "1 bytes, 1 ops; 00.00 sec (953.619750 bytes/sec and 953.6197 ops/sec)\n"),
    (("wrote", 0, 0, 0, 1), 17883,
     "wrote 0/0 bytes at offset 0\n"
     "0 bytes, 1 ops; 00.00 sec (0 bytes/sec and 55919.0292 ops/sec)\n"),
    (("wrote", 0, 65536, 65536, 1), 4536_835_514_075,
     "wrote 65536/65536 bytes at offset 0\n"
     "64 KiB, 1 ops; 1:15:36.84 (14.445311 bytes/sec and 0.0002 ops/sec)\n"),
])
def test_report_line(args: tuple[str, int, int, int, int], duration_ns: int,
                     expected: str) -> None:
    assert report_line(*args, duration_ns) == expected


def test_report_line_csv_and_zero_time() -> None:
    assert report_line("wrote", 0, 0, 0, 1, 11948, csv=True) == (
        "0,1,0:00:00.00,0.000,83696.016\n")
    assert report_line("wrote", 0, 1, 1, 1, 0) == (
        "wrote 1/1 bytes at offset 0\n1 bytes, 1 ops; 00.00 sec (inf EiB/sec and inf ops/sec)\n")
    assert report_line("wrote", 0, 0, 0, 1, 0, csv=True) == "0,1,0:00:00.00,-nan,inf\n"


def test_help_lists_every_command() -> None:
    out = parse_qemu_io("help").stdout
    assert out.startswith("abort -- simulate a program crash using abort(3)\n")
    assert "map  -- prints the allocated areas of a file\n" in out
    assert out.endswith("\nUse 'help commandname' for extended help.\n")
    assert len(out.splitlines()) == 25


def test_to_qemu_io_round_trips() -> None:
    ops = [GuestOp("write", 512, 4096, 0x5A), GuestOp("zero", 0, 65536, unmap=True),
           GuestOp("discard", 1 << 20, 1 << 16), GuestOp("flush"), GuestOp("read", 0, 512),
           GuestOp("write", 0, 512, 1, fua=True), GuestOp("drain"),
           GuestOp("sleep", milliseconds=5), GuestOp("write", 0, 9, source_file="/tmp/x")]
    for op in ops:
        (parsed,) = parse_qemu_io(op.to_qemu_io()).ops
        assert dataclasses.replace(parsed, report=None) == op


# --------------------------------------------------------------------------- workloads


def test_workload_is_deterministic() -> None:
    w = Workload.from_args({"device": "disk0", "seed": 42, "writes": 200,
                            "zero-ratio": 0.2, "discard-ratio": 0.1, "flush-every": 50})
    a, b = w.ops(1 << 30), Workload.from_args({"seed": 42, "writes": 200, "zero-ratio": 0.2,
                                               "discard-ratio": 0.1,
                                               "flush-every": 50}).ops(1 << 30)
    assert a == b
    assert a != Workload(seed=43, writes=200).ops(1 << 30)
    kinds = [op.kind for op in a]
    assert kinds.count("flush") == 4
    assert set(kinds) == {"write", "zero", "discard", "flush"}
    assert all(op.report is None for op in a)


def test_workload_respects_its_bounds() -> None:
    w = Workload(seed=1, writes=500, size_min=1024, size_max=8192, align=1024,
                 region_offset=1 << 20, region_length=1 << 20)
    for op in w.ops(64 * MiB):
        assert op.offset % 1024 == 0 and op.length % 1024 == 0
        assert 1024 <= op.length <= 8192
        assert (1 << 20) <= op.offset and op.offset + op.length <= 2 << 20
        assert op.pattern is not None and 1 <= op.pattern <= 255


def test_sequential_workload_wraps() -> None:
    ops = Workload(seed=3, writes=50, size_min=65536, size_max=65536, pattern="seq",
                   region_length=1 << 20).ops(64 * MiB)
    assert [op.offset for op in ops[:17]] == [i * 65536 % (1 << 20) for i in range(17)]


@pytest.mark.parametrize("kwargs, text", [
    ({"pattern": "zigzag"}, "Parameter 'pattern' does not accept value 'zigzag'"),
    ({"zero_ratio": 0.7, "discard_ratio": 0.5}, "'zero-ratio' and 'discard-ratio'"),
    ({"region_offset": 60 * MiB, "region_length": 8 * MiB}, "outside the disk"),
    ({"size_min": 8192, "size_max": 4096}, "size-min"),
    ({"size_max": 128 * MiB}, "exceeds the region length"),
    ({"align": 3}, "'align' must be a power of 2"),
])
def test_workload_validation(kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(SimError, match=re.escape(text)):
        Workload(**kwargs).ops(64 * MiB)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- differential

DIFF_LINES = [
    'qemu-io disk0 "write 0 64k"', 'qemu-io disk0 "write -P 0xab 0 1M"',
    'qemu-io disk0 "write -P 256 0 1"', 'qemu-io disk0 "write -P -1 0 1"',
    'qemu-io disk0 "write -P 0x1g 0 1"', 'qemu-io disk0 "write -P 017 0 1"',
    'qemu-io disk0 "write 0 1x"', 'qemu-io disk0 "write 0 -1"', 'qemu-io disk0 "write -1 1"',
    'qemu-io disk0 "write 0 3G"', 'qemu-io disk0 "write 0 2G"', 'qemu-io disk0 "write 64M 1"',
    'qemu-io disk0 "write 63M 2M"', 'qemu-io disk0 "write 0"', 'qemu-io disk0 "write"',
    'qemu-io disk0 "write -x 0 1"', 'qemu-io disk0 "write -z -P 1 0 1"',
    'qemu-io disk0 "write -u 0 1"', 'qemu-io disk0 "write -zu 0 64k"',
    'qemu-io disk0 "write -z 0 64k"', 'qemu-io disk0 "write -b 1 1"',
    'qemu-io disk0 "write -c 1 512"', 'qemu-io disk0 "write -c 512 1"',
    'qemu-io disk0 "write -f 0 64k"', 'qemu-io disk0 "write -fc 0 64k"',
    'qemu-io disk0 "write -n 0 64k"', 'qemu-io disk0 "write -nz 0 64k"',
    'qemu-io disk0 "write -q 0 64k"', 'qemu-io disk0 "write -C 0 64k"',
    'qemu-io disk0 "w 0 1k"', 'qemu-io disk0 "write  0   1k"', 'qemu-io disk0 "write 0 1.5k"',
    'qemu-io disk0 "write 0 0x10"', 'qemu-io disk0 "write 0 1b"', 'qemu-io disk0 "write 0 1T"',
    'qemu-io disk0 "write 0 20E"', 'qemu-io disk0 "write 0 0"', 'qemu-io disk0 "write 1 0"',
    'qemu-io disk0 "bogus"', 'qemu-io disk0 ""', 'qemu-io disk0 "read -P 0xab 0 64k"',
    'qemu-io disk0 "read -P 0xcd 0 64k"', 'qemu-io disk0 "read -P 0xab -s 512 -l 1k 0 64k"',
    'qemu-io disk0 "read -s 512 0 64k"', 'qemu-io disk0 "read -v 0 32"',
    'qemu-io disk0 "read -q 0 32"', 'qemu-io disk0 "discard 0 64k"',
    'qemu-io disk0 "discard -q 0 64k"', 'qemu-io disk0 "trim 0 64k"', 'qemu-io disk0 "flush"',
    'qemu-io disk0 "aio_write -P 0x11 0 64k"', 'qemu-io disk0 "aio_flush"',
    'qemu-io disk0 "aio_read -P 0x11 0 64k"', 'qemu-io disk0 "writev -P 0x22 0 4k 4k"',
    'qemu-io disk0 "readv -P 0x22 0 4k 4k"', 'qemu-io disk0 "length"',
    'qemu-io disk0 write 0 1k', 'qemu-io disk0 "write 0 1k" extra',
    'qemu-io nosuch "write 0 1"', 'qemu-io -d nosuch "write 0 1"',
    'qemu-io -d /machine "write 0 1"', 'qemu-io -d "" "write 0 1"',
    'qemu-io -x disk0 "write 0 1"', 'qemu-io -dx disk0 "write 0 1"',
    'qemu-io -- disk0 "write 0 1"', 'qemu-io -', 'qemu-io disk0', 'qemu-io',
    'qemu-io disk0 "write 0 1k', 'qemu-io disk0 "write \\x 0 1k"',
    'qemu-io disk0 "write \\"0\\" 1k"', 'qemu-io "disk0" \'write 0 1k\'',
    'qemu-io disk0 "write 0 64k -P 0x5"', 'qemu-io disk0 "write -P0x7 0 64k"',
    'qemu-io disk0 "write -qC 0 64k"', 'qemu-io disk0 "write 0 1 -P"',
    'qemu-io disk0 "write -- -1 1"', 'qemu-io disk0 "write --foo 0 1"',
    'qemu-io disk0 "write - 1"', 'qemu-io disk0 "write 0 1 2"',
    'qemu-io disk0 "write -P 256 -x 0 1"', 'qemu-io disk0 "write -x -P 256 0 1"',
    'qemu-io disk0 "write -z -s /nonexist 0 1"', 'qemu-io disk0 "write -b -z 0 1"',
    'qemu-io disk0 "write -nz 0 3G"', 'qemu-io disk0 "write -z 1 512"',
    'qemu-io disk0 "write 1.k 1."', 'qemu-io disk0 "write 1.5 1"',
    'qemu-io disk0 "write 0 0x1k"', 'qemu-io disk0 "write 0 1.5e"', 'qemu-io disk0 "write 0 +5"',
    'qemu-io disk0 "write 0 99999999999999999999"', 'qemu-io disk0 "write 0 0x"',
    'qemu-io disk0 "write 0 1.5e3"', 'qemu-io disk0 "write 0 8E"', 'qemu-io disk0 "write 0 7.9E"',
    'qemu-io disk0 "write 0 1kk"', 'qemu-io disk0 "write 0 0.0001k"',
    'qemu-io disk0 "write 0 0.001k"', 'qemu-io disk0 "write 9223372036854775807 1"',
    'qemu-io disk0 "write -P 0x1 0x1k 0x2k"', 'qemu-io disk0 "write -P 0x1 0x1.5k 1"',
    'qemu-io disk0 "write 0 0x1kz"', 'qemu-io disk0 "write 0 20Ex"',
    'qemu-io disk0 "flush x"', 'qemu-io disk0 "aio_flush x"', 'qemu-io disk0 "discard 0"',
    'qemu-io disk0 "discard 0 3G"', 'qemu-io disk0 "discard 100M 1"',
    'qemu-io disk0 "discard -C 0 64k"', 'qemu-io disk0 "discard -x 0 64k"',
    'qemu-io disk0 "d 0 64k"', 'qemu-io disk0 "read 0 3G"', 'qemu-io disk0 "read 100M 1"',
    'qemu-io disk0 "read -P 0xab -l 2k -s 64k 0 64k"', 'qemu-io disk0 "read -b 1 1"',
    'qemu-io disk0 "read -p -C 0 1k"', 'qemu-io disk0 "r 0 1"', 'qemu-io disk0 "read -a 0 1"',
    'qemu-io disk0 "read -v 65531 10"', 'qemu-io disk0 "readv 0 1x"', 'qemu-io disk0 "readv 0"',
    'qemu-io disk0 "writev 0 3G"', 'qemu-io disk0 "writev 0 1G 1G"',
    'qemu-io disk0 "writev 0 1 1"', 'qemu-io disk0 "writev -z 0 1"',
    'qemu-io disk0 "aio_write -z 0 64k"', 'qemu-io disk0 "aio_write -z 0 64k 64k"',
    'qemu-io disk0 "aio_write -z -P 0x5 0 64k"', 'qemu-io disk0 "aio_write -i 0 64k"',
    'qemu-io disk0 "aio_write -u 0 64k"', 'qemu-io disk0 "aio_write 100M 1"',
    'qemu-io disk0 "aio_read 100M 1"', 'qemu-io disk0 "aio_write -P 0x33 0 1 2 3"',
    'qemu-io disk0 "aio_read -v 0 8"', 'qemu-io disk0 "aio_read -i 0 1"',
    'qemu-io disk0 "aio_read -P 0x5 -q 0 1k"', 'qemu-io disk0 "help"',
    'qemu-io disk0 "help nosuch"', 'qemu-io disk0 "? flush"', 'qemu-io disk0 "help flush x"',
    'qemu-io disk0 "quit"', 'qemu-io disk0 "open x"', 'qemu-io disk0 "sleep x"',
    'qemu-io disk0 "sleep 0x10"', 'qemu-io disk0 "sleep -1"', 'qemu-io disk0 "length x"',
    'qemu-io disk0 "l"', 'qemu-io disk0 "write\t0 1"', 'qemu-io disk0 "write 0 \t1"',
    'qemu-io  \tdisk0    "write 0 1"', 'qemu-io disk0 "WRITE 0 1"', 'qemu-io disk0 "write -C 0 0"',
    'qemu-io disk0 "write -b 0 512"', 'qemu-io disk0 "read -b 0 512"',
    'qemu-io disk0 "map x"', 'qemu-io disk0 "break"', 'qemu-io disk0 "truncate"',
    'qemu-io disk0 "write -C -q 0 1"', 'qemu-io disk0 "write -s"',
    'qemu-io disk0 "write 0' + " " * 1020 + '1"', 'qemu-io disk0 "write 0' + " " * 1000 + '1"',
    'qemu-io disk0 "write\\n0 1"', 'qemu-io disk0 "write \\\'0 1"',
    'qemu-io ro "write 0 1"', 'qemu-io ro "discard 0 1"', 'qemu-io ro "read 0 1"',
    'qemu-io ro "write 0 20Ex"', 'qemu-io ro "aio_write -z 0 1k"', 'qemu-io ro "flush"',
    'qemu-io ro "write 0"', 'qemu-io disk0 "write 0 0.9k"', 'qemu-io disk0 "write 0 1.3m"',
    'qemu-io disk0 "write 0 0.1k"', 'qemu-io disk0 "write 0 0.5b"', 'qemu-io disk0 "write 0 .5k"',
    'qemu-io disk0 "write 0 0.00048828125k"', 'qemu-io disk0 "write 0 0.000488281k"',
    'qemu-io disk0 "i x"', 'qemu-io disk0 "t"', 'qemu-io ro "truncate 1G"',
    'qemu-io ro "writev 0 1"', 'qemu-io ro "d 0 1"', 'qemu-io ro "aio_read 0 1"',
]


@pytest.fixture(scope="module")
def qemu() -> Iterator[RealQemu]:
    for q in real_qemu_session():
        q.image("disk0", 64 * MiB)
        q.image("ro", 64 * MiB, read_only=True)
        yield q


@pytest.mark.real_qemu
def test_same_hmp_replies_and_output_as_qemu(qemu: RealQemu) -> None:
    model = Model()
    mismatches = []
    for line in DIFF_LINES:
        reply, out, err = qemu.hmp(line)
        m_reply, m_out, m_err = model.hmp(line)
        got = (m_reply, norm(m_out), m_err)
        want = (reply, norm(out), err)
        if got != want:
            mismatches.append(f"{line!r}\n  qemu:  {want!r}\n  model: {got!r}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.real_qemu
def test_workload_replays_identically_on_qemu(qemu: RealQemu) -> None:
    """A workload's ops, sent as qemu-io commands, give QEMU's disk the same bytes."""
    model = Model()
    disk = model.nodes["disk0"]
    ops = Workload(seed=9, writes=40, size_max=256 * 1024, zero_ratio=0.2).ops(64 * MiB)
    for op in ops:
        qemu.hmp(f'qemu-io disk0 "{op.to_qemu_io()}"')
        disk.run(parse_qemu_io(op.to_qemu_io()))
    for off in sorted({op.offset for op in ops})[:20]:
        byte = disk.data[off]
        _, out, _ = qemu.hmp(f'qemu-io disk0 "read -q -P 0x{byte:02x} {off} 512"')
        expect = disk.data[off:off + 512] == bytes([byte]) * 512
        assert (out == "") == expect, (off, out)
