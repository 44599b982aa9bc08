"""The sans-I/O NBD server core (``protocol.ServerConnection``) against a fake export table.

Bytes and texts here are QEMU 7.2's (each was observed on Debian's 7.2.22 by
``test_wire_vs_qemu.py``, which compares the running servers byte for byte); these
tests pin the core's behaviour without sockets or a block graph.
"""

from __future__ import annotations

import struct

import pytest

from virtsim.nbd import protocol as P
from virtsim.nbd import wire as W

from .core_helpers import BLOCK, Driver, FakeExport, FakeTable, chunks, error_chunk, option_replies
from .emu import meta, name_info, opt, req, u32

MiB = 1 << 20
EINVAL, EPERM = W.NBD_EINVAL, W.NBD_EPERM
GREETING = b"NBDMAGICIHAVEOPT\x00\x03"


def table() -> FakeTable:
    exp = FakeExport("exp", description="the disk", bitmap_names=["b0", "b1"],
                     allocation_depth=True)
    exp.fill(0, 0xAB)
    exp.blocks[2] = "zero"
    exp.fill(8, 0xCD)
    exp.dirty = {"b0": {8}, "b1": {0, 1}}
    return FakeTable(exp, FakeExport("rw", writable=True), FakeExport("odd", align=512))


def fresh(tls: bool = False, flags: int = 3) -> Driver:
    d = Driver(table(), tls=tls)
    assert bytes(d.out) == GREETING
    d.send(u32(flags))
    return d


def attach(name: bytes = b"exp", structured: bool = True,
           contexts: tuple[bytes, ...] = (b"base:allocation",)) -> Driver:
    d = fresh()
    if structured:
        d.send(opt(W.OPT_STRUCTURED_REPLY))
        if contexts:
            d.send(opt(W.OPT_SET_META_CONTEXT, meta(name, *contexts)))
    reps = option_replies(d.send(opt(W.OPT_GO, name_info(name))))
    assert reps[-1][1] == W.REP_ACK
    assert isinstance(d.events[-1], P.Attached)
    return d


# --------------------------------------------------------------------------- negotiation
def test_greeting_and_export_name_with_and_without_no_zeroes() -> None:
    d = fresh(flags=W.FLAG_C_FIXED_NEWSTYLE | W.FLAG_C_NO_ZEROES)
    out = d.send(opt(W.OPT_EXPORT_NAME, b"exp"))
    assert out == struct.pack(">QH", MiB, 0x50F)        # no SEND_DF without structured
    d = fresh(flags=W.FLAG_C_FIXED_NEWSTYLE)
    assert d.send(opt(W.OPT_EXPORT_NAME, b"rw")) == struct.pack(">QH", MiB, 0xD6D) + bytes(124)
    d = fresh()
    d.send(opt(W.OPT_STRUCTURED_REPLY))
    assert d.send(opt(W.OPT_EXPORT_NAME, b"exp")) == struct.pack(">QH", MiB, 0x58F)
    assert d.conn.state == "transmission"


def test_plain_newstyle_only_takes_export_name() -> None:
    d = fresh(flags=0)
    assert d.send(opt(W.OPT_EXPORT_NAME, b"exp")) == struct.pack(">QH", MiB, 0x50F) + bytes(124)
    d = fresh(flags=0)
    assert d.send(opt(W.OPT_LIST)) == b""
    assert d.closed == P.Closed("option negotiation failed: Unsupported option 3 (list)")


@pytest.mark.parametrize("data,text", [
    (u32(4), "Unknown client flags 0x4 received"),
    (u32(3) + b"IHAVEOPX", "Bad magic received"),
    (u32(3) + b"IHAVEOPT" + u32(3) + u32(32 * MiB + 1),
     "len (33554433 ) is larger than max len (33554432)"),
    (u32(3) + opt(W.OPT_EXPORT_NAME, b"x" * 4097), "Bad length received"),
    (u32(3) + opt(W.OPT_EXPORT_NAME, b"nope"), "export not found"),
])
def test_fatal_negotiation_errors(data: bytes, text: str) -> None:
    d = Driver(table())
    assert d.send(data) == b""
    assert d.closed == P.Closed("option negotiation failed: " + text)
    assert d.send(b"more") == b"" and d.conn.next_event() is P.NEED_DATA


def test_magic_is_checked_before_the_header_is_complete() -> None:
    d = fresh()
    d.send(b"IHAVEOPX")
    assert d.closed is not None


def test_list_abort_unknown_and_peek() -> None:
    d = fresh()
    reps = option_replies(d.send(opt(W.OPT_LIST)))
    assert reps == [(3, W.REP_SERVER, u32(3) + b"expthe disk"), (3, W.REP_SERVER, u32(2) + b"rw"),
                    (3, W.REP_SERVER, u32(3) + b"odd"), (3, W.REP_ACK, b"")]
    reps = option_replies(d.send(opt(W.OPT_LIST, b"x")))
    assert reps == [(3, W.REP_ERR_INVALID, b"option 'list' has unexpected length")]
    assert option_replies(d.send(opt(99, b"abc"))) == [
        (99, W.REP_ERR_UNSUP, b"Unsupported option 99 (<unknown>)")]
    assert option_replies(d.send(opt(W.OPT_PEEK_EXPORT))) == [
        (4, W.REP_ERR_UNSUP, b"Unsupported option 4 (<unknown>)")]
    assert option_replies(d.send(opt(W.OPT_ABORT))) == [(2, W.REP_ACK, b"")]
    assert d.closed == P.Closed(None)


def test_info_and_go_replies() -> None:
    d = fresh()
    reps = option_replies(d.send(opt(W.OPT_INFO, name_info(b"exp", W.INFO_NAME,
                                                            W.INFO_DESCRIPTION, 77))))
    assert reps == [
        (6, W.REP_INFO, struct.pack(">H", W.INFO_NAME) + b"exp"),
        (6, W.REP_INFO, struct.pack(">H", W.INFO_DESCRIPTION) + b"the disk"),
        (6, W.REP_INFO, struct.pack(">HIII", W.INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)),
        (6, W.REP_INFO, struct.pack(">HQH", W.INFO_EXPORT, MiB, 0x50F)),
        (6, W.REP_ACK, b""),
    ]
    assert d.conn.state == "options"
    # an alignment > 1: INFO must ask for block sizes, GO need not (then minimum 1)
    reps = option_replies(d.send(opt(W.OPT_INFO, name_info(b"odd"))))
    assert reps[0][2] == struct.pack(">HIII", W.INFO_BLOCK_SIZE, 512, 4096, 32 * MiB)
    assert reps[-1] == (6, W.REP_ERR_BLOCK_SIZE_REQD,
                        b"request NBD_INFO_BLOCK_SIZE to use this export")
    reps = option_replies(d.send(opt(W.OPT_INFO, name_info(b"odd", W.INFO_BLOCK_SIZE))))
    assert reps[-1] == (6, W.REP_ACK, b"")
    d.send(opt(W.OPT_STRUCTURED_REPLY))
    reps = option_replies(d.send(opt(W.OPT_GO, name_info(b"odd"))))
    assert reps[0][2] == struct.pack(">HIII", W.INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)
    assert reps[1][2] == struct.pack(">HQH", W.INFO_EXPORT, MiB, 0x58F)
    assert d.events[-1] == P.Attached(d.conn.export)  # type: ignore[arg-type]


@pytest.mark.parametrize("payload,text", [
    (name_info(b"nope"), (W.REP_ERR_UNKNOWN, "export 'nope' not present")),
    (name_info(b"n" * 100), (W.REP_ERR_UNKNOWN, f"export '{'n' * 80}...' not present")),
    (u32(5000) + b"x" * 5000, (W.REP_ERR_INVALID, "Invalid name length: 5000")),
    (name_info(b"e\0p"), (W.REP_ERR_INVALID, "Unexpected embedded NUL in option info")),
    (u32(10) + b"exp", (W.REP_ERR_INVALID, "Inconsistent lengths in option info")),
    (name_info(b"exp") + b"z", (W.REP_ERR_INVALID, "option 'info' has unexpected length")),
])
def test_info_errors(payload: bytes, text: tuple[int, str]) -> None:
    d = fresh()
    assert option_replies(d.send(opt(W.OPT_INFO, payload))) == [(6, text[0], text[1].encode())]
    assert d.closed is None


def test_structured_reply_and_starttls_without_tls() -> None:
    d = fresh()
    assert option_replies(d.send(opt(W.OPT_STRUCTURED_REPLY, b"x"))) == [
        (8, W.REP_ERR_INVALID, b"option 'structured reply' has unexpected length")]
    assert option_replies(d.send(opt(W.OPT_STRUCTURED_REPLY))) == [(8, W.REP_ACK, b"")]
    assert option_replies(d.send(opt(W.OPT_STRUCTURED_REPLY))) == [
        (8, W.REP_ERR_INVALID, b"structured reply already negotiated")]
    assert option_replies(d.send(opt(W.OPT_STARTTLS))) == [
        (5, W.REP_ERR_POLICY, b"TLS not configured")]


def _contexts(reps: list[tuple[int, int, bytes]]) -> list[tuple[int, str]]:
    assert reps[-1][1] == W.REP_ACK
    return [(int.from_bytes(p[:4], "big"), p[4:].decode()) for _, t, p in reps[:-1]
            if t == W.REP_META_CONTEXT]


def test_list_meta_context() -> None:
    d = fresh()
    every = [(0, "base:allocation"), (0, "qemu:allocation-depth"),
             (0, "qemu:dirty-bitmap:b0"), (0, "qemu:dirty-bitmap:b1")]
    assert _contexts(option_replies(d.send(opt(W.OPT_LIST_META_CONTEXT, meta(b"exp"))))) == every
    got = _contexts(option_replies(d.send(opt(W.OPT_LIST_META_CONTEXT,
                                              meta(b"exp", b"base:", b"qemu:")))))
    assert got == every
    got = _contexts(option_replies(d.send(opt(W.OPT_LIST_META_CONTEXT,
                                              meta(b"exp", b"qemu:dirty-bitmap:", b"x:y")))))
    assert got == every[2:]
    got = _contexts(option_replies(d.send(opt(W.OPT_LIST_META_CONTEXT,
                                              meta(b"rw", b"qemu:allocation-depth")))))
    assert got == []
    assert option_replies(d.send(opt(W.OPT_LIST_META_CONTEXT, meta(b"zz")))) == [
        (9, W.REP_ERR_UNKNOWN, b"export 'zz' not present")]


def test_set_meta_context() -> None:
    d = fresh()
    assert option_replies(d.send(opt(W.OPT_SET_META_CONTEXT, meta(b"exp")))) == [
        (10, W.REP_ERR_INVALID,
         b"request option 'set meta context' when structured reply is not negotiated")]
    d.send(opt(W.OPT_STRUCTURED_REPLY))
    # patterns select nothing on SET; exact names get QEMU's fixed ids
    assert _contexts(option_replies(d.send(opt(W.OPT_SET_META_CONTEXT, meta(
        b"exp", b"base:", b"qemu:", b"qemu:dirty-bitmap:"))))) == []
    assert _contexts(option_replies(d.send(opt(W.OPT_SET_META_CONTEXT, meta(
        b"exp", b"qemu:dirty-bitmap:b1", b"qemu:allocation-depth", b"base:allocation",
        b"q" * 5000))))) == [(0, "base:allocation"), (1, "qemu:allocation-depth"),
                             (3, "qemu:dirty-bitmap:b1")]
    assert d.conn.meta.count == 3
    # a failed SET forgets the earlier selection
    d.send(opt(W.OPT_SET_META_CONTEXT, meta(b"zz", b"base:allocation")))
    assert d.conn.meta.count == 0


def test_meta_context_stops_after_its_queries() -> None:
    """Bytes after the last query are read as the next option (QEMU 7.2)."""
    d = fresh()
    d.send(opt(W.OPT_STRUCTURED_REPLY))
    out = d.send(opt(W.OPT_SET_META_CONTEXT, meta(b"exp", b"base:allocation") + b"junk"))
    assert _contexts(option_replies(out)) == [(0, "base:allocation")]
    assert d.closed is None                   # "junk" is half an option magic so far
    d.send(opt(W.OPT_ABORT))
    assert d.closed == P.Closed("option negotiation failed: Bad magic received")


def test_tls_gate() -> None:
    d = fresh(tls=True)
    assert option_replies(d.send(opt(W.OPT_LIST))) == [
        (3, W.REP_ERR_TLS_REQD, b"Option 0x3 not permitted before TLS")]
    assert option_replies(d.send(opt(W.OPT_STARTTLS))) == [(5, W.REP_ACK, b"")]
    assert isinstance(d.events[-1], P.StartTls)
    assert d.send(opt(W.OPT_LIST)) == b""        # nothing until the transport is TLS
    d.conn.tls_started()
    d.send(b"")
    assert option_replies(bytes(d.out[len(GREETING):]))[-1] == (3, W.REP_ACK, b"")
    assert option_replies(d.send(opt(W.OPT_STARTTLS))) == [
        (5, W.REP_ERR_INVALID, b"TLS already enabled")]
    d = fresh(tls=True)
    assert d.send(opt(W.OPT_EXPORT_NAME, b"exp")) == b""
    assert d.closed == P.Closed("option negotiation failed: Option 0x1 not permitted before TLS")
    d = fresh(tls=True)
    assert option_replies(d.send(opt(W.OPT_ABORT))) == [
        (2, W.REP_ERR_TLS_REQD, b"Option 0x2 not permitted before TLS")]
    assert d.closed == P.Closed(None)
    d = fresh(tls=True, flags=0)
    d.send(opt(W.OPT_STARTTLS))
    assert d.closed == P.Closed("option negotiation failed: Unsupported option 0x5")
    d = fresh(tls=True)
    d.send(opt(W.OPT_STARTTLS, b"x"))
    assert d.closed == P.Closed(
        "option negotiation failed: option 'starttls' has unexpected length")


@pytest.mark.parametrize("data,text", [
    (b"", "Failed to read flags: "),
    (u32(3) + b"IHAV", "Failed to read opts magic: "),
    (u32(3) + b"IHAVEOPT\0\0", "Failed to read option: "),
    (u32(3) + b"IHAVEOPT" + u32(3) + b"\0", "Failed to read option length: "),
    (u32(3) + b"IHAVEOPT" + u32(1) + u32(3) + b"e", "Failed to read export name: "),
    (u32(3) + b"IHAVEOPT" + u32(6) + u32(30) + b"e", ""),
])
def test_eof_texts_in_negotiation(data: bytes, text: str) -> None:
    d = Driver(table())
    d.send(data)
    assert d.conn.receive_eof() == P.Closed("option negotiation failed: " + text
                                            + "Unexpected end-of-file before all data were read")
    assert d.conn.receive_eof() is None


def test_eof_texts_in_transmission() -> None:
    d = attach()
    assert d.conn.receive_eof() == P.Closed(None)
    d = attach()
    d.send(req(W.CMD_READ)[:10])
    assert d.conn.receive_eof() == P.Closed(
        "Disconnect client, due to: Unexpected end-of-file before all bytes were read")
    d = attach(b"rw")
    d.send(req(W.CMD_WRITE, 1, 0, 8, data=b"1234"))
    assert d.conn.receive_eof() == P.Closed(
        "Disconnect client, due to: Failed to read CMD_WRITE data: "
        "Unexpected end-of-file before all data were read")


# --------------------------------------------------------------------------- transmission
def test_simple_read_and_disc() -> None:
    d = attach(structured=False)
    out = d.send(req(W.CMD_READ, 7, BLOCK - 2, 4))
    assert out == struct.pack(">IIQ", W.SIMPLE_REPLY_MAGIC, 0, 7) + b"\xab\xab\0\0"
    assert d.send(req(W.CMD_DISC)) == b""
    assert d.closed == P.Closed(None)


def test_structured_sparse_read_and_df() -> None:
    d = attach()
    got = chunks(d.send(req(W.CMD_READ, 9, BLOCK - 4, 2 * BLOCK + 8)))
    # one chunk per allocation run: data, unallocated, allocated zeroes, unallocated
    assert [(f, t, h) for f, t, h, _ in got] == [
        (0, W.REPLY_TYPE_OFFSET_DATA, 9), (0, W.REPLY_TYPE_OFFSET_HOLE, 9),
        (0, W.REPLY_TYPE_OFFSET_HOLE, 9), (W.REPLY_FLAG_DONE, W.REPLY_TYPE_OFFSET_HOLE, 9)]
    assert got[0][3] == struct.pack(">Q", BLOCK - 4) + b"\xab" * 4
    assert got[1][3] == struct.pack(">QI", BLOCK, BLOCK)
    assert got[2][3] == struct.pack(">QI", 2 * BLOCK, BLOCK)
    assert got[3][3] == struct.pack(">QI", 3 * BLOCK, 4)
    got = chunks(d.send(req(W.CMD_READ, 10, BLOCK - 4, 8, flags=W.CMD_FLAG_DF)))
    assert got == [(W.REPLY_FLAG_DONE, W.REPLY_TYPE_OFFSET_DATA, 10,
                    struct.pack(">Q", BLOCK - 4) + b"\xab" * 4 + bytes(4))]
    assert chunks(d.send(req(W.CMD_READ, 11, 0, 0))) == [
        (W.REPLY_FLAG_DONE, W.REPLY_TYPE_NONE, 11, b"")]


def test_block_status_every_context_and_req_one() -> None:
    d = attach(contexts=(b"qemu:dirty-bitmap:b1", b"qemu:dirty-bitmap:b0",
                         b"qemu:allocation-depth", b"base:allocation"))
    got = chunks(d.send(req(W.CMD_BLOCK_STATUS, 12, 0, 3 * BLOCK)))
    assert {t for _, t, _, _ in got} == {W.REPLY_TYPE_BLOCK_STATUS}
    bodies = [struct.unpack(f">{len(p) // 4}I", p) for _, _, _, p in got]
    assert bodies == [
        (0, BLOCK, 0, BLOCK, 3, BLOCK, 2),                  # base: data, hole, zero
        (1, BLOCK, 1, BLOCK, 0, BLOCK, 1),                  # depth
        (2, 3 * BLOCK, 0),                                  # b0: clean here
        (3, 2 * BLOCK, 1, BLOCK, 0),                        # b1
    ]
    assert [f for f, _, _, _ in got] == [0, 0, 0, W.REPLY_FLAG_DONE]
    got = chunks(d.send(req(W.CMD_BLOCK_STATUS, 13, 0, 3 * BLOCK, flags=W.CMD_FLAG_REQ_ONE)))
    assert [struct.unpack(f">{len(p) // 4}I", p) for _, _, _, p in got] == [
        (0, BLOCK, 0), (1, BLOCK, 1), (2, 3 * BLOCK, 0), (3, 2 * BLOCK, 1)]


def test_writes_on_a_writable_export() -> None:
    """Success is a simple reply even with structured replies (nbd_send_generic_reply)."""
    d = attach(b"rw")
    assert d.send(req(W.CMD_WRITE, 20, 100, 4, flags=W.CMD_FLAG_FUA, data=b"wxyz")) \
        == struct.pack(">IIQ", W.SIMPLE_REPLY_MAGIC, 0, 20)
    exp = d.conn.export
    assert isinstance(exp, FakeExport) and exp.data[100:104] == b"wxyz"
    for typ, flags in [(W.CMD_WRITE_ZEROES, W.CMD_FLAG_NO_HOLE | W.CMD_FLAG_FAST_ZERO),
                       (W.CMD_TRIM, W.CMD_FLAG_FUA), (W.CMD_FLUSH, 0), (W.CMD_CACHE, 0)]:
        got = d.send(req(typ, 21, 0, 512 if typ != W.CMD_FLUSH else 0, flags=flags))
        assert got == struct.pack(">IIQ", W.SIMPLE_REPLY_MAGIC, 0, 21)
    assert exp.data[100:104] == bytes(4) and exp.flushes == 2


@pytest.mark.parametrize("request_,text", [
    (req(W.CMD_READ, 5, MiB, 1), "operation past EOF; From: 1048576, Len: 1, Size: 1048576"),
    (req(W.CMD_WRITE, 5, 0, 2, data=b"ab"), "Export is read-only"),
    (req(W.CMD_TRIM, 5, 0, 2), "Export is read-only"),
    (req(W.CMD_READ, 5, 0, 2, flags=W.CMD_FLAG_NO_HOLE),
     "unsupported flags for command read (got 0x2)"),
    (req(W.CMD_BLOCK_STATUS, 5, 0, 2, flags=W.CMD_FLAG_DF),
     "unsupported flags for command block status (got 0x4)"),
    (req(W.CMD_CACHE, 5, 0, 32 * MiB + 1), "len (33554433 ) is larger than max len (33554432)"),
    (req(W.CMD_BLOCK_STATUS, 5, 0, 0), "need non-zero length"),
    (req(42, 5, 0, 1), "invalid request type (42) received"),
])
def test_refused_requests_are_einval_with_qemus_text(request_: bytes, text: str) -> None:
    d = attach()
    assert [(f, t, h, error_chunk(p)) for f, t, h, p in chunks(d.send(request_))] == [
        (W.REPLY_FLAG_DONE, W.REPLY_TYPE_ERROR, 5, (EINVAL, text))]
    assert d.closed is None


def test_refusals_without_structured_replies_and_block_status_not_negotiated() -> None:
    d = attach(structured=False)
    assert d.send(req(W.CMD_WRITE, 6, 0, 2, data=b"ab")) == struct.pack(
        ">IIQ", W.SIMPLE_REPLY_MAGIC, EINVAL, 6)
    d = attach(contexts=())
    assert [error_chunk(p) for _, _, _, p in chunks(d.send(req(W.CMD_BLOCK_STATUS, 7, 0, 1)))] \
        == [(EINVAL, "CMD_BLOCK_STATUS not negotiated")]
    # contexts chosen for another export do not carry over
    d = fresh()
    d.send(opt(W.OPT_STRUCTURED_REPLY)
           + opt(W.OPT_SET_META_CONTEXT, meta(b"rw", b"base:allocation")))
    d.send(opt(W.OPT_GO, name_info(b"exp")))
    assert [error_chunk(p) for _, _, _, p in chunks(d.send(req(W.CMD_BLOCK_STATUS, 8, 0, 1)))] \
        == [(EINVAL, "CMD_BLOCK_STATUS not negotiated")]


def test_oversized_write_and_bad_magic_are_answered_then_dropped() -> None:
    d = attach(b"rw")
    got = chunks(d.send(req(W.CMD_WRITE, 3, 0, 32 * MiB + 1)))
    assert [error_chunk(p) for _, _, _, p in got] == [
        (EINVAL, "len (33554433 ) is larger than max len (33554432)")]
    assert d.closed == P.Closed("Disconnect client, due to: Request handling failed in "
                                "intermediate state")
    d = attach()
    got = chunks(d.send(b"\x12\x34\x56\x78" + req(W.CMD_READ, 4)[4:] + req(W.CMD_READ, 5)))
    assert [(h, error_chunk(p)) for _, _, h, p in got] == [
        (4, (EINVAL, "invalid magic (got 0x12345678)"))]
    assert d.closed is not None and "intermediate state" in (d.closed.error or "")


def test_read_errors() -> None:
    d = attach(structured=False)
    exp = d.conn.export
    assert isinstance(exp, FakeExport)
    exp.fail_read = True
    assert d.send(req(W.CMD_READ, 1, 0, 4)) == struct.pack(">IIQ", W.SIMPLE_REPLY_MAGIC,
                                                           W.NBD_EIO, 1)
    d = attach()
    exp = d.conn.export
    assert isinstance(exp, FakeExport)
    exp.fail_read = True
    assert d.send(req(W.CMD_READ, 2, 0, 4)) == b""
    assert d.closed == P.Closed("Disconnect client, due to: Failed to send reply: reading from "
                                "file failed: Input/output error")


def test_pipelined_requests_in_one_buffer() -> None:
    d = attach()
    data = b"".join(req(W.CMD_READ, 100 + i, i * BLOCK, 16, flags=W.CMD_FLAG_DF)
                    for i in range(10)) + req(W.CMD_DISC)
    got = chunks(d.send(data))
    assert [h for _, _, h, _ in got] == list(range(100, 110))
    assert d.closed == P.Closed(None)
