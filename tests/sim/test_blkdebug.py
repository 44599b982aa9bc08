"""blkdebug: rule arming, matching, state machine, filenames and open checks.

Expected behaviour and texts were observed on QEMU 7.2.22 (the blkdebug-* differential
scenarios pin the same cases against the binary).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from virtsim.sim.blkdebug import EVENTS, BlkdebugNode
from virtsim.sim.block import BlockGraph, Node
from virtsim.sim.errors import SimError
from virtsim.sim.image.qcow2 import Qcow2Format
from virtsim.sim.image.store import FileStore

NULL = {"driver": "null-co", "size": 1 << 20, "read-zeroes": True}


def raw_over(graph: BlockGraph, **bd: Any) -> tuple[Node, BlkdebugNode]:
    r = graph.blockdev_add({"driver": "raw", "node-name": "r",
                            "file": {"driver": "blkdebug", "node-name": "bd",
                                     "image": dict(NULL), **bd}})
    node = graph.find_node("bd")
    assert isinstance(node, BlkdebugNode)
    return r, node


def err(fn: Any, *args: Any) -> int | None:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def test_rules_wait_for_their_event() -> None:
    g = BlockGraph()
    r, bd = raw_over(g, **{"inject-error": [{"event": "write_aio"}]})
    assert err(bd.read, 0, 512) is None  # nothing armed yet: no event was raised
    assert err(r.read, 0, 512) is None  # read_aio has no rules
    assert err(r.write, 0, b"x" * 512) == errno.EIO  # write_aio arms it (default EIO)
    # armed rules stay armed and match every I/O type of the default mask
    assert err(r.read, 0, 512) == errno.EIO
    assert err(bd.read, 0, 512) == errno.EIO
    assert err(r.write_zeroes, 0, 512) == errno.EIO
    assert err(bd.block_status, 0, 512) is None  # block-status is not in the default mask


def test_once_and_errno() -> None:
    g = BlockGraph()
    r, bd = raw_over(g, **{"inject-error": [
        {"event": "read_aio", "errno": 5, "once": True},
        {"event": "write_aio", "errno": 28}]})
    assert err(r.read, 0, 4096) == errno.EIO
    assert err(r.read, 0, 4096) is None  # the once rule is gone for good
    assert err(r.write, 0, bytes(4096)) == errno.ENOSPC
    assert err(r.read, 0, 4096) == errno.ENOSPC  # read_aio has no rule left to re-arm
    assert bd.rules["read_aio"] == []


def test_sector_matching_priority_and_errno_zero() -> None:
    g = BlockGraph()
    r, _ = raw_over(g, **{"inject-error": [
        {"event": "read_aio", "errno": 5, "sector": 8},
        {"event": "read_aio", "errno": 0, "sector": 16},
        {"event": "read_aio", "errno": 28, "iotype": "read"},
        {"event": "pwritev_zero", "errno": 1, "iotype": "write-zeroes", "sector": 2040}]})
    assert err(r.read, 0, 4096) == errno.ENOSPC  # sector 8 (4096) is not in [0, 4096)
    assert err(r.read, 4096, 4096) == errno.EIO  # first matching rule in definition order
    assert err(r.read, 4095, 2) == errno.EIO
    assert err(r.read, 8192, 4096) is None  # errno 0: a match that does not fail
    assert err(r.write, 0, bytes(4096)) is None  # nothing armed matches this write
    assert err(r.write_zeroes, 0, 4096) is None  # pwritev_zero replaced the armed list
    assert err(r.write_zeroes, 1020 * 1024, 4096) == errno.EPERM
    assert err(r.read, 1020 * 1024, 4096) == errno.ENOSPC  # read_aio re-armed its rules


def test_negative_errno_and_sector_never_fail() -> None:
    g = BlockGraph()
    r, _ = raw_over(g, **{"inject-error": [{"event": "read_aio", "errno": -5},
                                           {"event": "read_aio", "sector": -7}]})
    assert err(r.read, 0, 4096) is None


def test_state_machine() -> None:
    g = BlockGraph()
    bd = g.blockdev_add({
        "driver": "blkdebug", "node-name": "bd", "image": dict(NULL),
        "set-state": [{"event": "read_aio", "state": 1, "new_state": 2},
                      {"event": "write_aio", "state": 2, "new_state": 3},
                      {"event": "pwritev", "state": 3, "new_state": 1}],
        "inject-error": [{"event": "read_aio", "state": 2, "errno": 5},
                         {"event": "write_aio", "state": 3, "errno": 28, "once": True}]})
    r = g.blockdev_add({"driver": "raw", "node-name": "r", "file": "bd"})
    assert isinstance(bd, BlkdebugNode) and bd.state == 1
    assert err(r.read, 0, 4096) is None  # state 1 -> 2; rules of state 2 not yet
    assert bd.state == 2
    assert err(r.read, 0, 4096) == errno.EIO
    # write_aio: 2 -> 3, pwritev (this node's write path): 3 -> 1; the read rule still armed
    assert err(r.write, 0, bytes(4096)) == errno.EIO
    assert bd.state == 1


def test_pwritev_fires_on_writes_to_the_node_itself() -> None:
    g = BlockGraph()
    bd = g.blockdev_add({"driver": "blkdebug", "node-name": "bd", "image": dict(NULL),
                         "inject-error": [{"event": "pwritev", "errno": 28,
                                           "iotype": "write", "once": True}]})
    assert err(bd.write, 0, bytes(512)) == errno.ENOSPC
    assert err(bd.write, 0, bytes(512)) is None


def test_flush_checked_only_after_writes() -> None:
    g = BlockGraph()
    r, bd = raw_over(g, **{
        "set-state": [{"event": "flush_to_disk", "new_state": 5}],
        "inject-error": [{"event": "flush_to_disk", "state": 5, "iotype": "flush"}]})
    r.flush()
    assert bd.state == 1  # nothing written: QEMU skips flush_to_disk
    r.write(0, bytes(512))
    r.flush()
    assert bd.state == 5
    r.write(0, bytes(512))
    with pytest.raises(OSError):
        r.flush()  # flush_to_disk (state 5) arms the flush rule, the node's flush trips it


def test_qcow2_above_fires_data_events_only(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    fmt = Qcow2Format.create(FileStore.create(str(path)), 1 << 20)
    fmt.write(0, b"\x11" * 65536)
    fmt.close()
    g = BlockGraph()
    q = g.blockdev_add({"driver": "qcow2", "node-name": "q", "file": {
        "driver": "blkdebug", "node-name": "bd",
        "image": {"driver": "file", "filename": str(path)},
        "inject-error": [{"event": "read_aio", "once": True}]}})
    assert err(q.read, 65536, 4096) is None  # unallocated: no data read, no event
    assert err(q.read, 0, 4096) == errno.EIO
    assert q.read(0, 4096) == b"\x11" * 4096
    q.write(131072, b"\x22" * 4096)  # write_aio has no rules: the write goes through
    assert q.read(131072, 4096) == b"\x22" * 4096
    g.close_all()


def test_filenames(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(1 << 20))
    g = BlockGraph()
    b3 = g.blockdev_add({"driver": "blkdebug", "node-name": "b3",
                         "image": {"driver": "file", "filename": str(path)}})
    assert b3.filename() == f"blkdebug::{path}"
    assert b3.image_info(True).get("actual-size") is None
    r = g.blockdev_add({"driver": "raw", "node-name": "r5",
                        "file": {"driver": "blkdebug", "image": {"driver": "null-co",
                                                                 "size": 65536}}})
    assert r.filename() == ('json:{"driver": "raw", "file": {"image": {"driver": "null-co", '
                            '"size": 65536}, "driver": "blkdebug"}}')
    # observed key order: the flattened options come out in QEMU's QDict copy order, which
    # differs between a root node and an inline one
    rules = {"inject-error": [{"event": "read_aio", "errno": 5, "once": True},
                              {"event": "write_aio", "errno": 28}]}
    root = g.blockdev_add({"driver": "blkdebug", "node-name": "bd",
                           "image": {"driver": "null-co"}, **rules})
    assert root.filename() == (
        'json:{"inject-error.0.once": true, "image": {"driver": "null-co"}, '
        '"driver": "blkdebug", "inject-error.0.event": "read_aio", "inject-error.0.errno": 5, '
        '"inject-error.1.event": "write_aio", "inject-error.1.errno": 28}')
    inner = g.blockdev_add({"driver": "raw", "node-name": "r",
                            "file": {"driver": "blkdebug", "image": {"driver": "null-co"},
                                     **rules}})
    assert inner.filename() == (
        'json:{"driver": "raw", "file": {"inject-error.0.once": true, '
        '"image": {"driver": "null-co"}, "driver": "blkdebug", "inject-error.0.errno": 5, '
        '"inject-error.1.errno": 28, "inject-error.0.event": "read_aio", '
        '"inject-error.1.event": "write_aio"}}')
    g.close_all()


def test_named_before_its_image() -> None:
    g = BlockGraph()
    g.blockdev_add({"driver": "raw", "node-name": "r",
                    "file": {"driver": "blkdebug", "image": dict(NULL)}})
    names = [n.node_name for n in g.nodes]
    assert names[0].startswith("#block0") and names[1].startswith("#block1")
    assert g.nodes[0].drv == "blkdebug" and names[2] == "r"


@pytest.mark.parametrize("opts, text", [
    ({"align": 3}, "Cannot meet constraints with align 3"),
    ({"align": 1 << 32}, "Cannot meet constraints with align 4294967296"),
    ({"align": 4096, "max-transfer": 512}, "Cannot meet constraints with max-transfer 512"),
    ({"align": 512, "opt-write-zero": 3}, "Cannot meet constraints with opt-write-zero 3"),
    ({"align": 512, "max-write-zero": 1000},
     "Cannot meet constraints with max-write-zero 1000"),
    ({"align": 512, "opt-discard": 1000}, "Cannot meet constraints with opt-discard 1000"),
    ({"align": 512, "max-discard": 1000}, "Cannot meet constraints with max-discard 1000"),
    ({"max-transfer": -1}, "Parameter 'max-transfer' expects a non-negative number below 2^64"),
    ({"align": -512}, "Parameter 'align' expects a non-negative number below 2^64"),
    ({"config": "/nonexistent/blkdebug.conf"},
     "Could not read blkdebug config file: No such file or directory"),
])
def test_open_errors(opts: dict[str, Any], text: str) -> None:
    g = BlockGraph()
    with pytest.raises(SimError) as e:
        g.blockdev_add({"driver": "blkdebug", "node-name": "b", "image": dict(NULL), **opts})
    assert e.value.desc == text
    assert g.nodes == []


CONF = ('[inject-error]\nevent = "read_aio"\nerrno = "28"\nonce = "on"\n\n# c\n'
        '[set-state]\nevent = "read_aio"\nstate = "1"\nnew_state = "2"\n'
        '[inject-error "x"]\nevent = "read_aio"\nstate = "2"\nsector = "010"\n')


def test_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "bd.conf"
    conf.write_text(CONF)
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    g = BlockGraph()
    r = g.blockdev_add({"driver": "raw", "node-name": "r", "file": {
        "driver": "blkdebug", "config": str(conf),
        "image": {"driver": "file", "filename": str(img)}}})
    assert r.filename() == f"blkdebug:{conf}:{img}"
    assert err(r.read, 4096, 4096) == errno.ENOSPC  # state 1: the once rule; then state 2
    assert err(r.read, 4096, 4096) == errno.EIO  # sector 010 (octal: 8)
    assert err(r.read, 0, 4096) is None
    g.close_all()


@pytest.mark.parametrize("text, error, deferred", [
    ('[inject-error]\nevent = "foo"\n', "invalid parameter value: foo", False),
    ('[inject-error]\nerrno = "5"\n', "Missing event name for rule", False),
    ('[nosuch]\nx = "1"\n', "There is no option group 'nosuch'", True),
    ("garbage\n", "no group defined", False),
    ('[inject-error]\nevent = "read_aio"\nbogus = "1"\n', "Invalid parameter 'bogus'", True),
    ('[inject-error]\nevent = "read_aio"\nerrno = "x"\n',
     "Parameter 'errno' expects a number", True),
    ('[inject-error]\nevent = "read_aio"\nonce = "maybe"\n',
     "Parameter 'once' expects 'on' or 'off'", True),
    ("[inject-error]\nevent read_aio\n", "invalid parameter value: ", False),
    ('[inject-error]\nevent = "read_aio"\n  \n', "parse error", False),
    ('[inject-error]\nevent = "read_aio"\niotype = "foo"\n', "invalid parameter value: foo",
     False),
])
def test_config_errors(tmp_path: Path, text: str, error: str, deferred: bool) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(text)
    g = BlockGraph()
    with pytest.raises(SimError) as e:
        g.blockdev_add({"driver": "blkdebug", "node-name": "b", "config": str(conf),
                        "image": {"driver": "null-co"}})
    assert e.value.desc == error
    # observed: errors QEMU finds when a group is complete come after the image was opened
    r = g.blockdev_add({"driver": "raw", "node-name": "r", "file": {"driver": "null-co"}})
    assert r.file is not None
    assert r.file.node_name.startswith("#block1" if deferred else "#block0")


def test_events_match_the_schema() -> None:
    from virtsim.qmp.qapi_defs import DEFINITIONS

    assert list(EVENTS) == next(d["data"] for d in DEFINITIONS
                                if d.get("enum") == "BlkdebugEvent")


def test_limits_accepted_and_child_perms() -> None:
    g = BlockGraph()
    bd = g.blockdev_add({"driver": "blkdebug", "node-name": "b", "image": dict(NULL),
                         "align": 512, "max-transfer": 65536, "opt-write-zero": 4096,
                         "max-write-zero": 8192, "opt-discard": 4096, "max-discard": 8192,
                         "take-child-perms": ["resize"], "unshare-child-perms": ["write"]})
    assert isinstance(bd, BlkdebugNode)
    edge = bd.children["image"]
    assert edge.perm & 0x8 and not edge.shared & 0x2


def test_keyval_blockdev_builds_rule_lists() -> None:
    from virtsim.qmp.cli import parse_blockdev

    opts = parse_blockdev("driver=blkdebug,image=f,inject-error.0.event=read_aio,"
                          "inject-error.0.once=off,inject-error.0.errno=28,"
                          "inject-error.1.event=write_aio,set-state.0.event=flush_to_disk,"
                          "set-state.0.new_state=2")
    assert opts == {"driver": "blkdebug", "image": "f",
                    "inject-error": [{"event": "read_aio", "once": False, "errno": 28},
                                     {"event": "write_aio"}],
                    "set-state": [{"event": "flush_to_disk", "new_state": 2}]}
