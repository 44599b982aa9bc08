"""The asyncio NBD server under bad and heavy input: it keeps serving, never crashes.

A real ``NbdServer`` over a raw file node (a block graph of its own, no emulator) on a
unix socket in ``tmp_path``; clients are asyncio streams in the same loop.  Every test
installs a loop exception handler: any exception that escapes a callback or task fails
the test, which is what "never crashes" means for an asyncio server.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from virtsim.nbd import server as server_mod
from virtsim.nbd.export import NbdExport
from virtsim.nbd.server import NbdServer
from virtsim.sim.block import BlockGraph

from .emu import name_info, opt, req, u32

SIZE = 4 << 20
MiB = 1 << 20
GO, SR, LIST = 7, 8, 3


@functools.lru_cache(maxsize=64)
def pattern(offset: int, length: int) -> bytes:
    """Each 4-byte word holds its own offset / 4: any misplaced byte shows."""
    first = offset // 4
    words = struct.pack(f">{(length + 7) // 4 + 1}I",
                        *range(first, first + (length + 7) // 4 + 1))
    skip = offset % 4
    return words[skip:skip + length]


@dataclass
class Srv:
    server: NbdServer
    path: str
    warnings: list[str]
    errors: list[dict[str, Any]] = field(default_factory=list)


@asynccontextmanager
async def serving(tmp_path: Path, max_connections: int = 0) -> AsyncIterator[Srv]:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(pattern(0, SIZE))
    g = BlockGraph()
    node = g.blockdev_add({"driver": "raw", "node-name": "d0",
                           "file": {"driver": "file", "filename": str(raw)}})
    exp = NbdExport(export_id="e0", name="exp", description=None, node=node, edge=None,
                    writable=False, multi_conn=True, bitmaps=[], bitmap_names=[],
                    allocation_depth=False)
    warnings: list[str] = []
    srv = NbdServer(max_connections=max_connections, warn=warnings.append)
    srv.exports.append(exp)
    path = str(tmp_path / "nbd.sock")
    loop = asyncio.get_running_loop()
    state = Srv(srv, path, warnings)
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: state.errors.append(ctx))
    srv.listen_unix(path)
    try:
        yield state
    finally:
        srv.close()
        await asyncio.sleep(0.01)
        loop.set_exception_handler(old)
        raw.unlink()
    assert not state.errors, state.errors
    assert not os.path.exists(path)


async def attach(path: str, structured: bool = False
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_unix_connection(path)
    assert (await r.readexactly(18))[:8] == b"NBDMAGIC"
    w.write(u32(3) + (opt(SR) if structured else b"") + opt(GO, name_info(b"exp")))
    while True:
        _, o, typ, n = struct.unpack(">QIII", await r.readexactly(20))
        await r.readexactly(n)
        if o == GO and typ == 1:
            return r, w


async def read_replies(r: asyncio.StreamReader, expect: dict[int, tuple[int, int]]) -> None:
    """Simple replies for READs ``handle -> (offset, length)``, in any order."""
    left = dict(expect)
    while left:
        magic, err, handle = struct.unpack(">IIQ", await r.readexactly(16))
        assert magic == 0x67446698 and err == 0, (magic, err)
        off, n = left.pop(handle)
        assert await r.readexactly(n) == pattern(off, n), handle


async def wait_until(cond: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def good_client(path: str, seed: int, nreq: int = 64) -> None:
    rnd = random.Random(seed)
    r, w = await attach(path)
    expect = {}
    for h in range(nreq):
        off = rnd.randrange(0, SIZE - 65536)
        n = rnd.choice([1, 512, 4096, 65536 - off % 7])
        expect[h] = (off, n)
        w.write(req(0, h, off, n))
    await read_replies(r, expect)
    w.write(req(2))
    assert await r.read() == b""
    w.close()


async def test_many_clients_each_with_many_requests_in_flight(tmp_path: Path) -> None:
    async with serving(tmp_path) as s:
        await asyncio.wait_for(asyncio.gather(*[good_client(s.path, i) for i in range(40)]),
                               20)
        await wait_until(lambda: not s.server.clients)
        assert s.warnings == []


GARBAGE = [
    b"",                                         # connects and leaves
    b"\xff" * 4,                                 # unknown client flags
    u32(3) + os.urandom(64),                     # bad option magic
    u32(3) + b"IHAVEOPT" + u32(LIST) + u32(0xFFFFFFFF),        # absurd option length
    u32(3) + b"IHAVEOPT" + u32(1) + u32(4097) + b"x" * 4097,   # oversized export name
    u32(3) + opt(GO, u32(1 << 31)),              # name length beyond the option
    u32(3) + opt(GO, name_info(b"exp"))[:30],    # truncated mid-option
    u32(0) + opt(GO, name_info(b"exp")),         # option a plain newstyle client can't use
    u32(3) + opt(GO, name_info(b"exp")) + os.urandom(28),      # garbage request
    u32(3) + opt(GO, name_info(b"exp")) + req(1, 1, 0, 64 << 20),  # huge WRITE header
    u32(3) + opt(GO, name_info(b"exp")) + req(0, 1, 0, 512)[:13],  # truncated request
]


async def bad_client(path: str, data: bytes, how: str) -> None:
    r, w = await asyncio.open_unix_connection(path)
    w.write(data)
    if how == "half-close":
        w.write_eof()
        await asyncio.wait_for(r.read(), 5)      # the server hangs up
    elif how == "reset":
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.close()


async def test_garbage_and_truncated_handshakes_leave_others_unaffected(tmp_path: Path) -> None:
    async with serving(tmp_path) as s:
        bad = [bad_client(s.path, data, how) for data in GARBAGE
               for how in ("half-close", "close", "reset")]
        good = [good_client(s.path, 1000 + i, 32) for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*bad, *good), 20)
        await wait_until(lambda: not s.server.clients)
        assert "option negotiation failed: Unknown client flags 0xfffffffc received" \
            in s.warnings
        # and the server still serves
        await good_client(s.path, 7)


async def test_clients_vanishing_mid_reply(tmp_path: Path) -> None:
    """Clients queue big reads and go away without reading the replies (FIN or RST)."""
    async with serving(tmp_path) as s:
        async def vanish(i: int) -> None:
            r, w = await attach(s.path, structured=i % 2 == 0)
            for h in range(8):
                w.write(req(0, h, 0, SIZE, flags=4 if i % 4 == 0 else 0))
            await w.drain()
            if i % 3 == 0:
                await r.readexactly(1000)              # part of a reply, then gone
            if i % 3 == 1:
                w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                      struct.pack("ii", 1, 0))
            w.close()

        await asyncio.wait_for(asyncio.gather(*[vanish(i) for i in range(12)]), 20)
        await wait_until(lambda: not s.server.clients)
        await good_client(s.path, 3)


async def test_a_slow_reader_does_not_make_the_server_build_every_reply(tmp_path: Path) -> None:
    """32 pipelined 4 MiB reads (128 MiB of replies) against a client that reads slowly:
    the server stops serving while its output is backed up, and every reply arrives."""
    async with serving(tmp_path) as s:
        r, w = await attach(s.path)
        for h in range(32):
            w.write(req(0, h, 0, SIZE))
        await asyncio.sleep(0.05)
        (client,) = s.server.clients
        assert client.conn._in, "requests should be waiting unserved"
        await read_replies(r, {h: (0, SIZE) for h in range(32)})
        w.close()


async def test_handshake_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU shuts an unfinished handshake down after 10 s; the pending read's
    end-of-file is what it reports (observed on 7.2.22)."""
    monkeypatch.setattr(server_mod, "HANDSHAKE_MAX_SECS", 0.2)
    async with serving(tmp_path) as s:
        idle_r, idle_w = await asyncio.open_unix_connection(s.path)
        flags_r, flags_w = await asyncio.open_unix_connection(s.path)
        flags_w.write(u32(3))
        ok_r, ok_w = await attach(s.path)
        assert len(await asyncio.wait_for(idle_r.read(), 3)) == 18
        assert len(await asyncio.wait_for(flags_r.read(), 3)) == 18
        assert sorted(s.warnings) == [
            "option negotiation failed: Failed to read flags: Unexpected end-of-file "
            "before all data were read",
            "option negotiation failed: Failed to read opts magic: Unexpected end-of-file "
            "before all data were read"]
        await asyncio.sleep(0.3)          # attached clients have no limit
        ok_w.write(req(0, 1, 0, 8))
        await read_replies(ok_r, {1: (0, 8)})
        for w in (idle_w, flags_w, ok_w):
            w.close()


async def test_max_connections_makes_extra_clients_wait(tmp_path: Path) -> None:
    async with serving(tmp_path, max_connections=2) as s:
        c1 = await attach(s.path)
        c2 = await attach(s.path)
        r3, w3 = await asyncio.open_unix_connection(s.path)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r3.readexactly(18), 0.2)
        c1[1].close()
        assert (await asyncio.wait_for(r3.readexactly(18), 3))[:8] == b"NBDMAGIC"
        for w in (c2[1], w3):
            w.close()
