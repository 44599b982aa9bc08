"""Raw NBD byte sequences against real QEMU 7.2 and virtsim-qemu: replies must be identical.

One real ``qemu-system-x86_64`` and one ``virtsim-qemu`` are started per module with the
same QMP set-up (a read-only export with a disabled bitmap and allocation-depth, and a
writable one); every probe sends the same bytes to both servers, reads until the server
hangs up (each probe ends with NBD_OPT_ABORT / NBD_CMD_DISC or provokes a disconnect) and
requires identical reply bytes, identical hang-up, and identical stderr (QEMU's
error_report texts).  Probes run in file order on both sides, so writes to the writable
export leave both in the same state.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from .emu import (
    Conversation,
    Emulator,
    Reply,
    connect,
    converse,
    emulator,
    meta,
    name_info,
    need_tool,
    opt,
    probe,
    read_all,
    req,
    reset_after,
    u32,
)

KINDS = ("qemu", "virtsim")

# options / commands (numbers spelled out so the test does not trust virtsim's tables)
EXPORT_NAME, ABORT, LIST, PEEK, STARTTLS, INFO, GO, SR, LIST_META, SET_META = range(1, 11)
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
FIXED, NOZ = 1, 2
MiB = 1 << 20


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Emulator, str]]]:
    need_tool("qemu-img")
    need_tool("qemu-io")
    out: dict[str, tuple[Emulator, str]] = {}
    with ExitStack() as stack:
        for kind in KINDS:
            d = tmp_path_factory.mktemp(kind)
            stack.callback(shutil.rmtree, d, True)       # images and sockets go too
            img, img2, img3 = d / "a.qcow2", d / "b.qcow2", d / "c.qcow2"
            for p in (img, img2, img3):
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M"],
                               check=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k",
                            "-c", "write -z 256k 64k", str(img)], check=True,
                           capture_output=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128k", str(img3)],
                           check=True, capture_output=True)
            emu = stack.enter_context(emulator(kind, d))
            emu.qmp("blockdev-add", driver="qcow2", node_name="d0",
                    file={"driver": "file", "filename": str(img)})
            emu.qmp("blockdev-add", driver="qcow2", node_name="d1",
                    file={"driver": "file", "filename": str(img2)})
            emu.qmp("block-dirty-bitmap-add", node="d0", name="b0")
            emu.hmp('qemu-io d0 "write -P 0xcd 512k 64k"')
            emu.qmp("block-dirty-bitmap-disable", node="d0", name="b0")
            sock = str(d / "nbd.sock")
            emu.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
            emu.qmp("block-export-add", type="nbd", id="e0", node_name="d0", name="exp",
                    bitmaps=["b0"], allocation_depth=True, description="the disk")
            emu.qmp("block-export-add", type="nbd", id="e1", node_name="d1", name="rw",
                    writable=True)
            # data reads of this one fail with EIO: qcow2 over blkdebug (read_aio is the
            # event qcow2 raises for data cluster reads)
            emu.qmp("blockdev-add", driver="qcow2", node_name="bad",
                    file={"driver": "blkdebug",
                          "inject-error": [{"event": "read_aio", "errno": 5}],
                          "image": {"driver": "file", "filename": str(img3)}})
            emu.qmp("block-export-add", type="nbd", id="e2", node_name="bad", name="bad")
            emu.new_stderr()
            out[kind] = (emu, sock)
        yield out


def both(servers: dict[str, tuple[Emulator, str]], *sends: bytes,
         half_close: bool = False) -> tuple[Reply, list[str]]:
    """Run one probe on both; assert identical results and return QEMU's."""
    got: dict[str, tuple[Reply, list[str]]] = {}
    for kind in KINDS:
        emu, sock = servers[kind]
        if half_close:
            with connect(sock) as s:
                for chunk in sends:
                    s.sendall(chunk)
                s.shutdown(socket.SHUT_WR)
                r = read_all(s)
        else:
            r = probe(sock, *sends)
        got[kind] = (r, emu.new_stderr())
    assert got["virtsim"] == got["qemu"], _explain(got["qemu"], got["virtsim"])
    return got["qemu"]


def _explain(q: tuple[Reply, list[str]], v: tuple[Reply, list[str]]) -> str:
    """Where the two differ: hang-up, stderr, and the first differing bytes."""
    (qr, qe), (vr, ve) = q, v
    lines = [f"eof qemu={qr.eof} virtsim={vr.eof}; stderr qemu={qe} virtsim={ve}",
             f"lengths qemu={len(qr.data)} virtsim={len(vr.data)}"]
    i = next((n for n, (a, b) in enumerate(zip(qr.data, vr.data, strict=False)) if a != b),
             min(len(qr.data), len(vr.data)))
    lo = max(0, i - 32)
    lines.append(f"first difference at {i}:")
    lines.append(f"  qemu    {qr.data[lo:i + 64].hex(' ', 4)}")
    lines.append(f"  virtsim {vr.data[lo:i + 64].hex(' ', 4)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers
C = u32(FIXED | NOZ)
END = opt(ABORT)


def go(name: bytes = b"exp", *infos: int) -> bytes:
    return opt(GO, name_info(name, *infos))


Tx = tuple[bytes, bytes, bool]


def tx(*reqs: bytes, structured: bool = True, export: bytes = b"exp",
       contexts: tuple[bytes, ...] = (b"base:allocation",)) -> Tx:
    """Negotiation (structured replies + contexts by default, then GO) and requests."""
    head = C
    if structured:
        head += opt(SR)
        if contexts:
            head += opt(SET_META, meta(export, *contexts))
    return head + go(export), b"".join(reqs), False


def both_tx(servers: dict[str, tuple[Emulator, str]], t: Tx) -> Conversation:
    """One conversation on both: same negotiation, same replies per request, same
    hang-up and stderr."""
    got: dict[str, tuple[Conversation, list[str]]] = {}
    for kind in KINDS:
        emu, sock = servers[kind]
        conv = converse(sock, t[0], t[1], export_name=t[2])
        got[kind] = (conv, emu.new_stderr())
    assert got["virtsim"] == got["qemu"], _explain_tx(got["qemu"], got["virtsim"])
    return got["qemu"][0]


def _explain_tx(q: tuple[Conversation, list[str]], v: tuple[Conversation, list[str]]) -> str:
    (qc, qe), (vc, ve) = q, v
    lines = [f"stderr qemu={qe} virtsim={ve}",
             f"eof_early qemu={qc.eof_early} virtsim={vc.eof_early}"]
    for what, a, b in [("negotiation", qc.negotiation, vc.negotiation),
                       ("trailing", qc.trailing, vc.trailing),
                       *[(f"handle {h}", qc.replies.get(h, b""), vc.replies.get(h, b""))
                         for h in sorted(set(qc.replies) | set(vc.replies))]]:
        if a != b:
            i = next((n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
            lo = max(0, i - 16)
            lines += [f"{what}: lengths {len(a)} / {len(b)}, first difference at {i}",
                      f"  qemu    {a[lo:i + 96].hex(' ', 4)}",
                      f"  virtsim {b[lo:i + 96].hex(' ', 4)}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- handshake
HANDSHAKE = {
    "bad-option-magic": [C, b"XHAVEOPT" + u32(1) + u32(0)],
    "unknown-client-flags": [u32(7)],
    "unknown-option": [C, opt(99), END],
    "peek-export": [C, opt(PEEK), END],
    "option-too-long": [C, b"IHAVEOPT" + u32(LIST) + u32(32 * MiB + 1)],
    "list": [C, opt(LIST), END],
    "list-with-payload": [C, opt(LIST, b"x"), END],
    "abort-with-payload": [C, opt(ABORT, b"xyz")],
    "export-name-no-zeroes": [C, opt(EXPORT_NAME, b"exp"), req(DISC)],
    "export-name-zeroes": [u32(FIXED), opt(EXPORT_NAME, b"exp"), req(DISC)],
    "export-name-unknown": [C, opt(EXPORT_NAME, b"nope")],
    "export-name-oversized": [C, opt(EXPORT_NAME, b"x" * 4097)],
    "export-name-embedded-nul": [C, opt(EXPORT_NAME, b"exp\0junk"), req(DISC)],
    "export-name-after-sr": [C, opt(SR), opt(EXPORT_NAME, b"exp"), req(DISC)],
    "plain-newstyle-export-name": [u32(0), opt(EXPORT_NAME, b"exp"), req(DISC)],
    "plain-newstyle-no-zeroes": [u32(NOZ), opt(EXPORT_NAME, b"rw"), req(DISC)],
    "plain-newstyle-list": [u32(0), opt(LIST)],
    "plain-newstyle-abort": [u32(0), END],
    "info-exp": [C, opt(INFO, name_info(b"exp")), END],
    "info-all": [C, opt(INFO, name_info(b"exp", 1, 2, 3, 0, 77)), END],
    "info-rw-name": [C, opt(INFO, name_info(b"rw", 1)), END],
    "info-unknown": [C, opt(INFO, name_info(b"nope")), END],
    "info-long-name-unknown": [C, opt(INFO, name_info(b"n" * 200)), END],
    "info-oversized-name": [C, opt(INFO, u32(5000) + b"x" * 5000 + b"\0\0"), END],
    "info-embedded-nul": [C, opt(INFO, name_info(b"e\0p")), END],
    "info-short": [C, opt(INFO, u32(10) + b"exp"), END],
    "info-trailing": [C, opt(INFO, name_info(b"exp") + b"zz"), END],
    "info-count-short": [C, opt(INFO, u32(3) + b"exp" + b"\0\x05\0\x01"), END],
    "go-default-export": [C, opt(GO, name_info(b"")), END],
    "go-then-disc": [C, go(b"exp", 3), req(DISC)],
    "go-after-sr": [C, opt(SR), go(b"exp", 1), req(DISC)],
    "starttls-no-tls": [C, opt(STARTTLS), END],
    "starttls-payload": [C, opt(STARTTLS, b"x"), END],
    "sr-twice": [C, opt(SR), opt(SR), END],
    "sr-payload": [C, opt(SR, b"x"), END],
    "list-meta-all": [C, opt(LIST_META, meta(b"exp")), END],
    "list-meta-all-rw": [C, opt(LIST_META, meta(b"rw")), END],
    "list-meta-queries": [C, opt(LIST_META, meta(b"exp", b"base:", b"qemu:", b"nope:x",
                                                  b"qemu:dirty-bitmap:", b"qemu:bogus")),
                          END],
    "list-meta-exact": [C, opt(LIST_META, meta(b"exp", b"qemu:dirty-bitmap:b0",
                                                b"qemu:allocation-depth",
                                                b"base:allocation", b"base:allocationx")), END],
    "list-meta-unknown-export": [C, opt(LIST_META, meta(b"nope", b"base:allocation")), END],
    "set-meta-without-sr": [C, opt(SET_META, meta(b"exp", b"base:allocation")), END],
    "set-meta-patterns": [C, opt(SR), opt(SET_META, meta(b"exp", b"base:", b"qemu:",
                                                         b"qemu:dirty-bitmap:")), END],
    "set-meta-all": [C, opt(SR), opt(SET_META, meta(b"exp", b"qemu:dirty-bitmap:b0",
                                                    b"base:allocation",
                                                    b"qemu:allocation-depth")), END],
    "set-meta-nothing": [C, opt(SR), opt(SET_META, meta(b"exp")), END],
    "set-meta-trailing": [C, opt(SR), opt(SET_META, meta(b"exp", b"base:allocation")
                                          + b"junk"), END],
    "set-meta-short": [C, opt(SR), opt(SET_META, u32(3) + b"exp" + u32(2) + u32(4) + b"base"),
                       END],
    "set-meta-oversized-query": [C, opt(SR), opt(SET_META, u32(3) + b"exp" + u32(2)
                                                 + u32(5000) + b"q" * 5000 + u32(15)
                                                 + b"base:allocation"), END],
    "set-meta-nul-query": [C, opt(SR), opt(SET_META, meta(b"exp", b"base:all\0cation")), END],
    "set-meta-oversized-name": [C, opt(SR), opt(SET_META, u32(4097) + b"n" * 4097), END],
    "set-meta-unknown-export": [C, opt(SR), opt(SET_META, meta(b"zz", b"base:allocation")),
                                END],
    "tls-not-required-export-name-before-flags": [opt(EXPORT_NAME, b"exp")],
}


@pytest.mark.parametrize("name", list(HANDSHAKE))
def test_handshake(servers: dict[str, tuple[Emulator, str]], name: str) -> None:
    both(servers, *HANDSHAKE[name])


@pytest.mark.parametrize("cut", [0, 2, 4, 10, 14, 18, 20, 24])
@pytest.mark.parametrize("option", [INFO, EXPORT_NAME, 99, LIST_META])
def test_truncated_handshake(servers: dict[str, tuple[Emulator, str]], cut: int,
                             option: int) -> None:
    """The client half-closes after ``cut`` bytes of flags + one option."""
    payload = meta(b"exp", b"base:allocation") if option == LIST_META else name_info(b"exp")
    both(servers, (C + opt(option, payload))[:cut], half_close=True)


# --------------------------------------------------------------------------- transmission
TRANSMISSION = {
    "read-simple": tx(req(READ, 5, 0, 4096), structured=False),
    "read-simple-zero-length": tx(req(READ, 5, 0, 0), structured=False),
    "read-sparse": tx(req(READ, 6, 32768, 1 * MiB - 32768)),
    "read-sparse-hole-only": tx(req(READ, 6, 128 * 1024, 4096)),
    "read-df": tx(req(READ, 7, 32768, 65536, flags=DF)),
    "read-zero-length-structured": tx(req(READ, 8, 4096, 0)),
    "read-fua": tx(req(READ, 8, 0, 512, flags=FUA)),
    "read-df-without-sr": tx(req(READ, 8, 0, 512, flags=DF), structured=False),
    "read-past-eof": tx(req(READ, 9, MiB, 512)),
    "read-past-eof-simple": tx(req(READ, 9, MiB - 511, 512), structured=False),
    "read-offset-huge": tx(req(READ, 9, 1 << 63, 1)),
    "read-too-big": tx(req(READ, 9, 0, 32 * MiB + 1)),
    "read-max": tx(req(READ, 9, 0, 32 * MiB)),
    "read-bad-flags": tx(req(READ, 10, 0, 512, flags=NO_HOLE)),
    "write-read-only": tx(req(WRITE, 11, 0, 4, data=b"abcd")),
    "write-read-only-simple": tx(req(WRITE, 11, 0, 4, data=b"abcd"), structured=False),
    "trim-read-only": tx(req(TRIM, 11, 0, 4096)),
    "write-zeroes-read-only": tx(req(WZ, 11, 0, 4096)),
    "write-too-big": tx(req(WRITE, 12, 0, 32 * MiB + 1)),
    "write-bad-magic-next": tx(b"\0" * 4 + req(READ, 13)[4:]),
    "bad-magic-simple": tx(b"\x12\x34\x56\x78" + req(DISC, 13)[4:], structured=False),
    "unknown-command": tx(req(42, 14, 0, 512)),
    "unknown-command-simple": tx(req(42, 14, 0, 512), structured=False),
    "flush": tx(req(FLUSH, 15)),
    "flush-bad-flags": tx(req(FLUSH, 15, flags=DF)),
    "cache": tx(req(CACHE, 16, 0, 65536)),
    "cache-too-big": tx(req(CACHE, 16, 0, 32 * MiB + 1)),
    "cache-past-eof": tx(req(CACHE, 16, MiB, 1)),
    "bs-base": tx(req(BS, 17, 0, MiB)),
    "bs-req-one": tx(req(BS, 17, 0, MiB, flags=REQ_ONE)),
    "bs-all-contexts": tx(req(BS, 18, 0, MiB), contexts=(b"qemu:dirty-bitmap:b0",
                                                          b"qemu:allocation-depth",
                                                          b"base:allocation")),
    "bs-all-req-one": tx(req(BS, 18, 4096, MiB - 4096, flags=REQ_ONE),
                         contexts=(b"qemu:dirty-bitmap:b0", b"qemu:allocation-depth",
                                   b"base:allocation")),
    "bs-bitmap-only": tx(req(BS, 18, 500 * 1024, 100 * 1024),
                         contexts=(b"qemu:dirty-bitmap:b0",)),
    "bs-not-negotiated": tx(req(BS, 19, 0, 512), contexts=()),
    "bs-simple": tx(req(BS, 19, 0, 512), structured=False),
    "bs-zero-length": tx(req(BS, 19, 0, 0)),
    "bs-past-eof": tx(req(BS, 19, MiB - 512, 1024)),
    "bs-bad-flags": tx(req(BS, 19, 0, 512, flags=DF)),
    "bs-large-length": tx(req(BS, 19, 0, 0xFFFFFFFF)),
    "bs-contexts-for-other-export": (C + opt(SR) + opt(SET_META, meta(b"rw", b"base:allocation"))
                                     + go(b"exp"), req(BS, 20, 0, 4096), False),
    "pipelined": tx(*[req(READ, 100 + i, i * 65536, 65536) for i in range(16)],
                    req(BS, 200, 0, MiB), req(READ, 201, MiB, 1), req(FLUSH, 202)),
    # dependent requests go in separate conversations: QEMU serves a client's requests
    # concurrently, so a READ pipelined behind a WRITE may see the old data
    "rw-write": tx(req(WRITE, 30, 4096, 8, data=b"12345678"),
                   req(WRITE, 31, 8192, 4, flags=FUA, data=b"wxyz"), export=b"rw"),
    "rw-read-after-write": tx(req(READ, 32, 0, 16384), req(BS, 33, 0, MiB), export=b"rw"),
    "rw-write-zeroes": tx(req(WZ, 34, 4096, 4096), export=b"rw"),
    "rw-write-zeroes-no-hole": tx(req(WZ, 35, 0, 4096, flags=NO_HOLE), export=b"rw"),
    "rw-fast-zero-unallocated": tx(req(WZ, 36, 512 * 1024, 4096, flags=FAST_ZERO | FUA),
                                   export=b"rw"),
    "rw-read-after-zeroes": tx(req(BS, 37, 0, MiB), req(READ, 38, 0, 16384), export=b"rw"),
    "rw-write-2": tx(req(WRITE, 40, 65536, 4, data=b"abcd"), export=b"rw"),
    "rw-trim": tx(req(TRIM, 41, 65536, 65536), export=b"rw"),
    "rw-trim-fua": tx(req(TRIM, 42, 0, 512, flags=FUA), export=b"rw"),
    "rw-status-after-trim": tx(req(BS, 43, 0, MiB), req(READ, 44, 65536, 8), export=b"rw"),
    "rw-write-past-eof": tx(req(WRITE, 44, MiB, 4, data=b"abcd"), export=b"rw"),
    "rw-write-zeroes-past-eof": tx(req(WZ, 45, MiB - 512, 1024), export=b"rw"),
    "rw-trim-past-eof": tx(req(TRIM, 46, MiB, 1), export=b"rw"),
    "rw-write-bad-flags": tx(req(WRITE, 47, 0, 4, flags=DF, data=b"abcd"), export=b"rw"),
    "rw-write-zeroes-bad-flags": tx(req(WZ, 48, 0, 4, flags=REQ_ONE), export=b"rw"),
    "rw-write-simple": tx(req(WRITE, 49, 0, 4, data=b"abcd"), structured=False, export=b"rw"),
    "rw-read-simple": tx(req(READ, 50, 0, 4), structured=False, export=b"rw"),
    "rw-write-zero-length": tx(req(WRITE, 51, 0, 0), req(WZ, 52, 0, 0), req(TRIM, 53, 0, 0),
                               export=b"rw"),
    "read-error-sparse": tx(req(READ, 80, 0, 4096), export=b"bad", contexts=()),
    "read-error-df": tx(req(READ, 81, 0, 4096, flags=DF), export=b"bad", contexts=()),
    "read-error-simple": tx(req(READ, 82, 0, 4096), export=b"bad", structured=False),
    "bs-on-failing-export": tx(req(BS, 83, 0, 4096), export=b"bad"),
    "disc-with-junk-flags": tx(req(DISC, 60, MiB * 8, 99, flags=0xffff)),
    "export-name-then-read": (C + opt(SR) + opt(EXPORT_NAME, b"exp"), req(READ, 61, 0, 512),
                              True),
    "export-name-zeroes-then-read": (u32(FIXED) + opt(EXPORT_NAME, b"exp"),
                                     req(READ, 61, 0, 512), True),
    # last: virtsim diverges here and the export's content with it
    "rw-fast-zero-allocated": tx(req(WZ, 36, 8192, 4096, flags=FAST_ZERO), export=b"rw"),
}
#: known differences (strict: a fix shows up as XPASS)
XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=XFAIL[n])] if n in XFAIL else [])
    for n in TRANSMISSION])
def test_transmission(servers: dict[str, tuple[Emulator, str]], name: str) -> None:
    both_tx(servers, TRANSMISSION[name])


def test_truncated_request_and_write_payload(servers: dict[str, tuple[Emulator, str]]) -> None:
    """EOF inside a request header / a WRITE payload: QEMU's texts for it."""
    for cut in (0, 1, 27):
        both(servers, tx()[0], req(READ, 70, 0, 512)[:cut], half_close=True)
    both(servers, tx(export=b"rw")[0], req(WRITE, 71, 0, 512, data=b"x" * 100),
         half_close=True)


RESETS = {
    "after-flags": [C],
    "mid-option-header": [C + b"IHAVEOPT\0"],
    "mid-option-payload": [C + opt(INFO, name_info(b"exp"))[:20]],
    "at-request-boundary": [C + go()],
    "mid-request": [C + go(), req(READ, 90, 0, 512)[:5]],
    "after-a-read": [C + go(), req(READ, 91, 0, 512)],
}


@pytest.mark.parametrize("name", list(RESETS))
def test_client_reset(servers: dict[str, tuple[Emulator, str]], name: str) -> None:
    """The client resets the connection (RST): QEMU reports its pending read's error."""
    got = {}
    for kind in KINDS:
        emu, sock = servers[kind]
        reset_after(sock, *RESETS[name])
        got[kind] = emu.wait_stderr()
    assert got["virtsim"] == got["qemu"]
    assert got["qemu"] and got["qemu"][0].endswith(
        "Unable to read from socket: Connection reset by peer")


def _greeting(s: socket.socket) -> bool:
    data = b""
    while len(data) < 18:
        chunk = s.recv(18 - len(data))
        if not chunk:
            return False
        data += chunk
    return data[:8] == b"NBDMAGIC"


def test_max_connections_queues_extra_clients(tmp_path: Path) -> None:
    """max-connections=1: a second client is accepted only when the first has gone
    (QEMU stops accepting, so it waits in the listen backlog without a greeting)."""
    for kind in KINDS:
        with emulator(kind, tmp_path / kind) as emu:
            emu.qmp("blockdev-add", driver="null-co", node_name="n0", size=MiB)
            sock = str(tmp_path / kind / "nbd.sock")
            emu.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}},
                    max_connections=1)
            emu.qmp("block-export-add", type="nbd", id="e0", node_name="n0", name="exp")
            first = connect(sock)
            assert _greeting(first)
            second = connect(sock)
            assert read_all(second, idle=0.3).data == b"", kind
            first.sendall(C + END)
            assert read_all(first).eof
            first.close()
            assert _greeting(second), kind
            second.close()
            emu.qmp("nbd-server-stop")
