"""Bounded fuzzing of the sans-I/O NBD core: mutated client streams never raise.

Streams are built from plausible pieces (client flags, options with well-formed and
broken payloads, requests of every type, write payloads) and then mutated (bytes flipped,
cut, duplicated, spliced); they are fed in random slices.  Whatever arrives, the core
must only produce events and reply bytes, and stay closed once it has closed.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtsim.nbd import protocol as P
from virtsim.nbd import wire as W

from .core_helpers import FakeExport, FakeTable
from .emu import meta, name_info, opt, req, u32

NAMES = [b"exp", b"rw", b"", b"nope", b"x" * 300]
CONTEXTS = [b"base:allocation", b"base:", b"qemu:", b"qemu:dirty-bitmap:b0",
            b"qemu:dirty-bitmap:", b"qemu:allocation-depth", b"nope", b"q\0x"]

flags = st.sampled_from([3, 1, 0, 2, 7, 0xFFFFFFFF]).map(u32)
options = st.one_of(
    st.builds(lambda n, i: opt(W.OPT_GO, name_info(n, *i)), st.sampled_from(NAMES),
              st.lists(st.integers(0, 5), max_size=4)),
    st.builds(lambda n, i: opt(W.OPT_INFO, name_info(n, *i)), st.sampled_from(NAMES),
              st.lists(st.integers(0, 5), max_size=4)),
    st.builds(lambda o, n, q: opt(o, meta(n, *q)),
              st.sampled_from([W.OPT_LIST_META_CONTEXT, W.OPT_SET_META_CONTEXT]),
              st.sampled_from(NAMES), st.lists(st.sampled_from(CONTEXTS), max_size=4)),
    st.builds(lambda n: opt(W.OPT_EXPORT_NAME, n), st.sampled_from(NAMES)),
    st.builds(opt, st.sampled_from([W.OPT_LIST, W.OPT_STRUCTURED_REPLY, W.OPT_STARTTLS,
                                    W.OPT_ABORT, W.OPT_PEEK_EXPORT, 11, 0x7FFFFFFF]),
              st.binary(max_size=12)),
    st.builds(lambda o, p, n: opt(o, p, n), st.integers(0, 12), st.binary(max_size=40),
              st.integers(0, 64)),
)
requests = st.builds(
    lambda typ, fl, h, off, n: req(typ, h, off, n, fl,
                                   data=bytes(n) if typ == W.CMD_WRITE and n <= 8192 else b""),
    st.integers(0, 9), st.sampled_from([0, 1, 2, 4, 8, 16, 0xFFFF]), st.integers(0, 5),
    st.sampled_from([0, 511, 4096, 65536, (1 << 20) - 1, 1 << 20, 1 << 63]),
    st.sampled_from([0, 1, 512, 4096, 8192, 1 << 20, (32 << 20) + 1, 0xFFFFFFFF]))


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    parts = [draw(flags), *draw(st.lists(options, max_size=5)),
             *draw(st.lists(requests, max_size=6))]
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "dup", "insert", "truncate"]))
        if kind == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == "dup":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 32))]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos:]
    cuts = draw(st.lists(st.integers(1, 64), max_size=8))
    return bytes(data), cuts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.booleans())
def test_core_survives_mutated_streams(stream: tuple[bytes, list[int]], tls: bool) -> None:
    data, cuts = stream
    exp = FakeExport("exp", bitmap_names=["b0"], allocation_depth=True)
    exp.fill(0, 0x11)
    conn = P.ServerConnection(FakeTable(exp, FakeExport("rw", writable=True)), tls=tls)
    out = bytearray(b"".join(conn.data_to_send()))
    assert out == b"NBDMAGICIHAVEOPT\x00\x03"
    closed = False
    pos = 0
    slices = [*cuts, len(data)]
    for n in slices:
        if pos >= len(data):
            break
        conn.receive_data(data[pos:pos + n])
        pos += n
        while True:
            ev = conn.next_event()
            if ev is P.NEED_DATA:
                break
            assert not closed, "an event after Closed"
            if isinstance(ev, P.Request):
                assert conn.state in ("transmission", "closing")
                if conn.serve(ev) is not None:
                    closed = True
            elif isinstance(ev, P.StartTls):
                conn.tls_started()
            elif isinstance(ev, P.Attached):
                assert ev.export in (exp, *conn.table.list_exports())
            else:
                assert isinstance(ev, P.Closed)
                closed = True
        for buf in conn.data_to_send():
            assert isinstance(buf, bytes | bytearray | memoryview)
            out += buf
        if closed:
            conn.receive_data(b"more")
            assert conn.next_event() is P.NEED_DATA
            break
    end = conn.receive_eof()
    assert end is None if closed else isinstance(end, P.Closed)
    assert conn.state == "closed"
    assert not conn.data_to_send()
