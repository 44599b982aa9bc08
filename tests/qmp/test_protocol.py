"""QmpServerProtocol: unit tests, the recorded QEMU 7.2 transcript, and a differential run.

The differential test sends the same raw bytes to the real qemu-system-x86_64 and to the core
(whole and byte by byte) and requires identical output bytes after normalising event
timestamps.  The dispatcher is a stub that knows just enough commands for protocol edges.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtsim.qmp import schema
from virtsim.qmp.protocol import QmpServerProtocol, QmpState, Request
from virtsim.sim.errors import SimError

QEMU = shutil.which("qemu-system-x86_64")
# Reference material lives beside the checkout (../shared), not in the repository.
SHARED = Path(os.environ.get("VIRTSIM_SHARED", Path(__file__).resolve().parents[3] / "shared"))
TRANSCRIPT = SHARED / "reference/qemu-7.2/a_protocol.jsonl"
VERSION: dict[str, Any] = {
    "qemu": {"micro": 22, "minor": 2, "major": 7},
    "package": "Debian 1:7.2+dfsg-7+deb12u18+b3",
}
CAPS = b'{"execute":"qmp_capabilities"}'
CAPS_OOB = b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}'
# 0xFF forces QEMU's lexer into error recovery from any state, "\n" ends recovery: whatever a
# case left half-parsed, the sentinel request after it is read and answered.
SENTINEL = b'\xff\n{"execute":"query-version","id":"@@end@@"}'
TIMESTAMP = re.compile(rb'"timestamp": \{"seconds": \d+, "microseconds": \d+\}')


# -- a stub dispatcher ----------------------------------------------------------------------

OOB_COMMANDS = {"migrate-pause"}
STUB_COMMANDS = {"query-version", "query-status", "stop", "cont", "quit", "migrate-pause"}


def _stub_has(name: str) -> bool:
    return name in STUB_COMMANDS


def _stub_oob(name: str) -> bool:
    return name in OOB_COMMANDS


def make_core(version: dict[str, Any] | None = None) -> QmpServerProtocol:
    return QmpServerProtocol(version or VERSION, has_command=_stub_has, allows_oob=_stub_oob)


def dispatch(core: QmpServerProtocol, req: Request, clock: Callable[[], tuple[int, int]]) -> None:
    """Answer like QEMU 7.2 -machine none would, for the few commands the stub knows."""
    try:
        if req.name == "migrate-pause":  # not in virtsim's schema; it takes no arguments
            extra = schema.first_unexpected(req.arguments, ())
            if extra is not None:
                raise SimError(f"Parameter '{extra}' is unexpected")
        else:
            schema.validate(req.name, req.arguments)
    except SimError as exc:
        core.send_error(req, exc.error_class, exc.desc)
        return
    if req.name == "query-version":
        core.send_return(req, core.version)
    elif req.name == "query-status":
        core.send_return(req, {"running": True, "singlestep": False, "status": "running"})
    elif req.name in ("stop", "cont"):
        core.send_event("STOP" if req.name == "stop" else "RESUME", None, clock())
        core.send_return(req)
    elif req.name == "quit":
        core.send_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}, clock())
        core.send_return(req)
    else:
        core.send_error(req, "GenericError",
                        "migrate-pause is currently only supported during postcopy-active state")


def _clock() -> tuple[int, int]:
    now = time.time()
    return int(now), int(now % 1 * 1_000_000)


def run_core(core: QmpServerProtocol, data: bytes, bytewise: bool = False) -> bytes:
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    out = bytearray()
    for chunk in chunks:
        for req in core.receive_data(chunk):
            dispatch(core, req, _clock)
        out += core.data_to_send()
    return bytes(out)


# -- unit tests -----------------------------------------------------------------------------

def test_greeting_bytes_match_transcript() -> None:
    first = json.loads(TRANSCRIPT.read_text().splitlines()[0]) if TRANSCRIPT.exists() else None
    expected = (
        b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
        b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n'
    )
    assert make_core().greeting() == expected
    if first is not None:
        assert first["raw"].encode() + b"\r\n" == expected
    # whatever order the caller builds the version dict in, QEMU's order comes out
    schema_order = {"package": VERSION["package"], "qemu": {"major": 7, "minor": 2, "micro": 22}}
    assert make_core(schema_order).greeting() == expected
    assert QmpServerProtocol(VERSION, []).greeting().endswith(b'"capabilities": []}}\r\n')


def test_negotiation_then_command_mode() -> None:
    core = make_core()
    assert core.state is QmpState.NEGOTIATING
    assert core.receive_data(b'{"execute":"query-version","id":1}') == []
    assert core.data_to_send() == (
        b'{"id": 1, "error": {"class": "CommandNotFound", "desc": '
        b'"Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n')
    assert core.receive_data(b'{"execute":"qmp_capabilities","id":"c"}') == []
    assert core.data_to_send() == b'{"return": {}, "id": "c"}\r\n'
    assert core.state.value == "command" and not core.oob_enabled
    [req] = core.receive_data(b'{"execute":"query-version","arguments":{},"id":[1]}')
    assert (req.name, req.arguments, req.id, req.has_id, req.oob) == (
        "query-version", {}, [1], True, False)
    core.send_return(req, {"x": 1})
    assert core.data_to_send() == b'{"return": {"x": 1}, "id": [1]}\r\n'
    assert core.receive_data(b'{"execute":"qmp_capabilities"}') == []
    assert b"Capabilities negotiation is already complete, command ignored" in (
        core.data_to_send())


def test_request_without_id_and_null_id() -> None:
    core = make_core()
    core.receive_data(CAPS)
    core.data_to_send()
    [a, b] = core.receive_data(b'{"execute":"stop"}{"execute":"stop","id":null}')
    assert (a.has_id, a.id, b.has_id, b.id) == (False, None, True, None)
    core.send_return(a)
    core.send_error(b, "GenericError", "x")
    assert core.data_to_send() == (
        b'{"return": {}}\r\n{"id": null, "error": {"class": "GenericError", "desc": "x"}}\r\n')


def test_events_dropped_while_negotiating() -> None:
    core = make_core()
    core.send_event("STOP", None, (1, 2))
    assert core.data_to_send() == b""
    core.receive_data(CAPS)
    core.data_to_send()
    core.send_event("STOP", None, (1, 2))
    core.send_event("X", {"b": 1, "a": [True, None, 1.5]}, (-1, -1))
    assert core.data_to_send() == (
        b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'
        b'{"timestamp": {"seconds": -1, "microseconds": -1}, "event": "X", '
        b'"data": {"a": [true, null, 1.5], "b": 1}}\r\n')


def test_replies_keep_request_order_events_do_not_wait() -> None:
    core = make_core()
    core.receive_data(CAPS)
    core.data_to_send()
    r1, r2 = core.receive_data(b'{"execute":"stop","id":1} xyz {"execute":"stop","id":2}]')
    # nothing may overtake r1's reply: the parse error and r2 wait behind it
    assert core.data_to_send() == b""
    core.send_event("STOP", None, (5, 6))  # emitted while r1 runs: goes out first
    core.send_return(r2)
    assert core.data_to_send() == (
        b'{"timestamp": {"seconds": 5, "microseconds": 6}, "event": "STOP"}\r\n')
    core.send_return(r1)
    assert core.data_to_send() == (
        b'{"return": {}, "id": 1}\r\n'
        b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword '
        b'\'xyz\'"}}\r\n'
        b'{"return": {}, "id": 2}\r\n'
        b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n')
    with pytest.raises(RuntimeError):
        core.send_return(r1)


def test_oob_requests_and_errors_overtake_pending_in_band() -> None:
    core = make_core()
    core.receive_data(CAPS_OOB)
    assert core.data_to_send() == b'{"return": {}}\r\n' and core.oob_enabled
    reqs = core.receive_data(
        b'{"execute":"stop","id":1}{"exec-oob":"migrate-pause","id":2}'
        b'{"exec-oob":"stop","id":3}{"execute":"query-version","exec-oob":"stop","id":4}')
    assert [(r.name, r.oob) for r in reqs] == [("stop", False), ("migrate-pause", True)]
    # OOB traffic waits only for earlier OOB traffic (QEMU answers it while parsing) ...
    assert core.data_to_send() == b""
    core.send_error(reqs[1], "GenericError", "later")
    assert core.data_to_send() == (
        b'{"id": 2, "error": {"class": "GenericError", "desc": "later"}}\r\n'
        b'{"id": 3, "error": {"class": "GenericError", '
        b'"desc": "The command stop does not support OOB"}}\r\n')
    # ... while in-band output waits for everything before it
    core.send_return(reqs[0])
    assert core.data_to_send() == (
        b'{"return": {}, "id": 1}\r\n'
        b'{"id": 4, "error": {"class": "GenericError", '
        b'"desc": "QMP input member \'execute\' clashes with \'exec-oob\'"}}\r\n')
    # an OOB rejection overtakes an in-band request that is still running
    [slow] = core.receive_data(b'{"execute":"stop","id":5}{"exec-oob":"stop","id":6} x ')
    assert core.data_to_send().startswith(b'{"id": 6, "error"')
    core.send_return(slow)
    assert core.data_to_send() == (
        b'{"return": {}, "id": 5}\r\n'
        b'{"error": {"class": "GenericError", '
        b'"desc": "JSON parse error, invalid keyword \'x\'"}}\r\n')


def test_oob_needs_no_id_in_qemu_7_2() -> None:
    core = make_core()
    core.receive_data(CAPS_OOB)
    core.data_to_send()
    [req] = core.receive_data(b'{"exec-oob":"migrate-pause"}')
    assert (req.oob, req.has_id) == (True, False)
    core.send_return(req)
    assert core.data_to_send() == b'{"return": {}}\r\n'


def test_oob_capability_not_offered() -> None:
    core = QmpServerProtocol(VERSION, [], has_command=_stub_has)
    core.receive_data(CAPS_OOB)
    assert core.data_to_send() == (
        b'{"error": {"class": "GenericError", "desc": "Capability oob not available"}}\r\n')
    assert core.state is QmpState.NEGOTIATING
    core.receive_data(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}}')
    assert b"Capability oob, oob not available" in core.data_to_send()


def test_close_discards_everything() -> None:
    core = make_core()
    core.receive_data(CAPS)
    [req] = core.receive_data(b'{"execute":"stop"} {"execute":')
    core.close()
    assert core.closed
    core.send_return(req)
    core.send_event("STOP", None, (0, 0))
    assert core.receive_data(b'"stop"}') == []
    assert core.data_to_send() == b""


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b'{"foo": 1}', "QMP input member 'foo' is unexpected"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b"{}", "QMP input lacks member 'execute'"),
        (b'{"execute": "stop", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"exec-oob": "stop"}', "QMP input member 'exec-oob' is unexpected"),
        (b'{"arguments":1,"execute":2}', "QMP input member 'execute' must be a string"),
        (b'{"id":1,"foo":2,"bar":3}', "QMP input member 'bar' is unexpected"),
        (b'{"execute":"nope"}', "The command nope has not been found"),
    ],
)
def test_request_shape_errors(data: bytes, desc: str) -> None:
    core = make_core()
    core.receive_data(CAPS)
    core.data_to_send()
    assert core.receive_data(data) == []
    reply = json.loads(core.data_to_send())
    assert reply["error"]["desc"] == desc


# -- the recorded transcript ----------------------------------------------------------------

def _transcript() -> list[dict[str, Any]]:
    if not TRANSCRIPT.exists():
        pytest.skip(f"reference transcript not found at {TRANSCRIPT} (set VIRTSIM_SHARED); "
                    "the differential test covers the same ground on the real binary")
    return [json.loads(line) for line in TRANSCRIPT.read_text().splitlines() if line.strip()]


def test_transcript_replay() -> None:
    """Replay every exchange of a_protocol.jsonl whose commands the stub can answer."""
    records = _transcript()
    core = make_core()
    assert core.greeting() == records[0]["raw"].encode() + b"\r\n"
    known = STUB_COMMANDS | {"qmp_capabilities", "no-such-command"}
    replayed = 0
    want = got = b""  # cumulative: a bare keyword like 'xyz' is answered at the next byte
    i = 1
    while i < len(records):
        rec = records[i]
        i += 1
        if rec["dir"] != "send":
            continue
        expected = []
        while i < len(records) and records[i]["dir"] == "recv":
            expected.append(records[i]["raw"].encode() + b"\r\n")
            i += 1
        msg = rec["msg"]
        name = msg.get("execute") if isinstance(msg, dict) else None
        if isinstance(name, str) and name not in known:
            continue  # needs the block layer or HMP: covered by other modules' tests
        got += TIMESTAMP.sub(b"TS", run_core(core, rec["raw"].encode()))
        want += TIMESTAMP.sub(b"TS", b"".join(expected))
        assert want.startswith(got), rec["raw"]
        replayed += 1
    assert got == want
    assert replayed >= 20


# -- fuzzing --------------------------------------------------------------------------------

_JSONISH = st.lists(
    st.sampled_from([
        b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"\\u", b"d800", b"00e9",
        b" ", b"\n", b"\t", b"\x00", b"\x01", b"\xff", b"\xfe", b"\xc3\xa9", b"\xc0\x80", b"\xed",
        b"0", b"1", b"-", b".", b"e", b"+", b"true", b"nul", b"%", b"x", b"execute",
        b'"execute"', b'"qmp_capabilities"', b'"stop"', b'"id"', b'"arguments"', b'"exec-oob"',
        b'{"execute":"stop"}', b'{"exec-oob":"migrate-pause"}', b"9223372036854775808",
    ]),
    max_size=60,
).map(b"".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.one_of(st.binary(max_size=300), _JSONISH), oob=st.booleans(),
       seed=st.integers(0, 2**32))
def test_fuzz_never_raises_and_keeps_serving(garbage: bytes, oob: bool, seed: int) -> None:
    """Any input: no exception, well-formed output, identical for any chunking, then service."""
    outputs = []
    for mode in ("whole", "bytes", "random"):
        core = make_core()
        run_core(core, CAPS_OOB if oob else CAPS)
        if mode == "random":
            rnd = random.Random(seed)
            out = bytearray()
            pos = 0
            while pos < len(garbage):
                step = rnd.randint(1, 17)
                out += run_core(core, garbage[pos : pos + step])
                pos += step
            outputs.append(bytes(out))
        else:
            outputs.append(run_core(core, garbage, bytewise=mode == "bytes"))
        tail = run_core(core, b'\xff\n{"execute":"query-version","id":"after"}')
        assert tail.endswith(b'"id": "after"}\r\n')
    outputs = [TIMESTAMP.sub(b"TS", out) for out in outputs]
    assert outputs[0] == outputs[1] == outputs[2]
    for line in outputs[0].split(b"\r\n")[:-1]:
        assert line.isascii() and line.startswith(b"{") and line.endswith(b"}")


def test_garbage_stream_of_megabytes_is_bounded() -> None:
    """Random bytes and one huge unterminated string: fast, and memory stays proportional."""
    rnd = random.Random(7)
    core = make_core()
    run_core(core, CAPS)
    garbage = rnd.randbytes(512 << 10)
    start = time.monotonic()
    produced = 0
    for off in range(0, len(garbage), 65536):
        produced += len(run_core(core, garbage[off : off + 65536]))
    big = b'{"execute":"stop","id":"' + b"a" * (4 << 20)
    for off in range(0, len(big), 65536):
        produced += len(run_core(core, big[off : off + 65536]))
    tail = run_core(core, b'\xff\n{"execute":"query-version","id":"after"}')
    assert time.monotonic() - start < 30
    assert produced > 0 and tail.endswith(b'"id": "after"}\r\n')


# -- the differential test against the real binary -----------------------------------------

def _need_qemu() -> str:
    if QEMU is None:
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-system-x86_64 is required in CI")
        pytest.skip("qemu-system-x86_64 not installed")
    return QEMU


@pytest.fixture(scope="module")
def real_qemu() -> Iterator[str]:
    binary = _need_qemu()
    tmpdir = tempfile.mkdtemp(prefix="vsqmp")
    sock_path = os.path.join(tmpdir, "qmp.sock")
    proc = subprocess.Popen(
        [binary, "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{sock_path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("qemu-system-x86_64 did not create its QMP socket")
            time.sleep(0.02)
        yield sock_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.exists(sock_path):
            os.unlink(sock_path)
        os.rmdir(tmpdir)


def _read_line(sock: socket.socket, buf: bytearray) -> bytes:
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("QEMU closed the connection")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return line + b"\r\n"


def qemu_exchange(sock_path: str, caps: bytes | None, data: bytes) -> tuple[bytes, bytes]:
    """(greeting, everything QEMU answers to ``data`` up to the sentinel's reply).

    A fresh connection per case.  QEMU's socket chardev now and then resets a client that
    connects while it is still tearing down the previous one; such a case is simply retried.
    """
    for attempt in range(3):
        try:
            return _qemu_exchange_once(sock_path, caps, data)
        except ConnectionError:
            if attempt == 2:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _qemu_exchange_once(sock_path: str, caps: bytes | None, data: bytes) -> tuple[bytes, bytes]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(sock_path)
        buf = bytearray()
        greeting = _read_line(sock, buf)
        if caps is not None:
            sock.sendall(caps)
            _read_line(sock, buf)
        sock.sendall(data + SENTINEL)
        out = bytearray()
        while True:
            line = _read_line(sock, buf)
            out += line
            if b'"@@end@@"' in line:
                return greeting, bytes(out)


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


IDS = [b"1.5", b"0.1", b"1e999", b"-1e999", b"-0", b"-0.0", b"18446744073709551616",
       b"18446744073709551615", b"9223372036854775808", b"-9223372036854775808",
       b"-9223372036854775809", b"1E-400", b"123.456e7", b"2.5E+3", b"null", b"true",
       b'{"b":1,"a":2,"c":[true,false,null]}', b'{"execute":1,"return":2,"id":3,"error":4}',
       b'"\xc3\xa9\x7f/\\u0000\\ud83d\\ude00\\b\\f\\n\\r\\t\\u0001\\"\\\\ \\/"',
       b"'single \\' \"quoted\"'", b'"\xf0\x9f\x98\x80\xc0\x80"', b'"\\u00e9\\u20AC\\uFEFF"']


def _req(ident: bytes) -> bytes:
    return b'{"execute":"query-version","id":' + ident + b"}"


DIFF_CASES: list[tuple[bytes | None, bytes]] = [
    # --- before qmp_capabilities
    (None, b'{"execute":"query-version"}'),
    (None, b'{"execute":"query-version","id":"pre"}{"execute":"stop","arguments":{"x":1}}'),
    (None, b'{"execute":"nonexistent","arguments":[],"id":1}{"execute":1,"id":2}{"id":3}'),
    (None, b'{"exec-oob":"qmp_capabilities","id":1}{"exec-oob":"nope"}'),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":1}'),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}'
           b'{"execute":"qmp_capabilities","arguments":{"enable":[1]}}'
           b'{"execute":"qmp_capabilities","arguments":{"enable":null}}'),
    (None, b'{"execute":"qmp_capabilities","arguments":{"a":1,"b":2,"c":3},"id":1}'
           b'{"execute":"qmp_capabilities","arguments":{"x":1,"enable":3}}'),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":1}' + _req(b"2")),
    (None, b'xyz {"execute":"qmp_capabilities"}{"execute":"qmp_capabilities"}' + _req(b"3")),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}}'
           b'{"exec-oob":"migrate-pause","id":2}' + _req(b"3")),
    (None, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}'
           b'{"exec-oob":"query-version","id":7}{"exec-oob":"qmp_capabilities"}'),
    # --- JSON errors and recovery
    (CAPS, b"}}}"),
    (CAPS, b"]"),
    (CAPS, b'[}{"execute":"query-version"}]'),
    (CAPS, b"[xyz]"),
    (CAPS, b'{"a" 1}{"a":}{"a":1,}{,}[1 2][1,]{1:2}{"a":1 "b":2}'),
    (CAPS, b"xyz abcD nul truex tru "),
    (CAPS, b"\x00\x00 \x01 %% %x @@ T True ~"),
    (CAPS, b"01 -a - 1. 1.e5 1e 1e+ .5 0.e1 1x2 --1 -01 00"),
    (CAPS, b"\xff\xfe\xff {\xff} [\xfe]"),
    (CAPS, b'"abc\n' + _req(b'"after-newline"')),
    (CAPS, b"'abc\x01 \"x" + b"\xfe" + _req(b'"after-fe"')),
    (CAPS, b'@@@ {"execute":"query-version","id":4} x\t{"execute"\t:  "query-version"}'),
    (CAPS, b'\r\n\t {"execute" : "query-version" , "id" : 5 }  \n\n'),
    (CAPS, b'xyz{"execute":"query-version","id":1}]]{"execute":"query-version","id":2}'),
    (CAPS, b'{"execute":"query-version","id":"ab\x01cd"}'),
    (CAPS, b'{"execute":"query-version","id":"ab\ncd"}{"execute":"query-version","id":"ab\tcd"}'),
    (CAPS, b'{"execute":"query-version","id":"ab\xfecd"}'),
    (CAPS, b'{"a":1,"a":2}{"execute":"stop","execute":"stop"}'),
    (CAPS, b"".join(_req(b'"' + bad + b'"') for bad in [
        b"\\ud800", b"\\ud800\\u0041", b"\\ud800x", b"\\u12G4", b"\\u12", b"\\u1", b"\\a",
        b"\\ufffe", b"\\ud83f\\udffe", b"\\uDBFF\\uDFFF", b"\\uFDD0", b"\\", b"\\x"])),
    (CAPS, b"".join(_req(b'"' + bad + b'"') for bad in [
        b"\xef\xbf\xbe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe9", b"\xf4\x90\x80\x80",
        b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82", b"\xc3\xa9\xc3"])),
    (CAPS, b"".join(_req(ident) for ident in IDS)),
    (CAPS, _req(b"'" + b"x" * 3000 + b"'") + b"a" * 2000 + b" " + b"\\u" * 1 + b"b" * 5),
    (CAPS, _req(b'"\\u00e9' + b"\\uz" * 400 + b'"')),
    # --- request shape, QMP-level checks
    (CAPS, b'"str"1 null true [] {} 2.5 '),
    (CAPS, b'{"execute":"query-version","arguments":{},"id":1,"foo":2}{"id":1,"foo":2,"bar":3}'),
    (CAPS, b'{"exec-oob":"query-version","execute":"query-version"}{"arguments":1,"execute":2}'),
    (CAPS, b'{"execute":"\xc3\xa9","id":"x"}{"execute":"a\\u0000b","id":{"\\u0000":0}}'),
    (CAPS, b'{"execute":"query-version","arguments":{"a":1,"b":2}}'
           b'{"execute":"query-version","arguments":{"q":1,"r":2,"s":3,"t":4,"u":5,"v":6,'
           b'"w":7,"x":8,"y":9,"z":10}}'),
    (CAPS, b'{"execute":"qmp_capabilities","arguments":{"enable":"x"},"id":1}'
           b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":2}'
           b'{"execute":"qmp_capabilities","arguments":{"x":1}}'),
    (CAPS, b'{"execute":"query-version","id":null}{"execute":"query-status","id":[]}'),
    (CAPS, b'{"execute":"stop","id":"s"}{"execute":"cont","id":"c"}'),
    (CAPS_OOB, b'{"exec-oob":"query-version","execute":"query-version","id":7}'),
    (CAPS_OOB, b'{"exec-oob":1,"id":1}'),
    (CAPS_OOB, b'{"exec-oob":"migrate-pause","arguments":[],"id":1}'),
    (CAPS_OOB, b'{"exec-oob":"nonexistent","id":1}'),
    (CAPS_OOB, b'{"exec-oob":"qmp_capabilities"}'),
    (CAPS_OOB, b'{"exec-oob":"migrate-pause","arguments":{"x":1}}'),
    # --- limits
    (CAPS, _deep(1024)),
    (CAPS, _deep(1025)),
    (CAPS, b'{"a":' * 1023 + b"1" + b"}" * 1023),
    (CAPS, b'{"a":' * 1025 + b"1" + b"}" * 1025),
    (CAPS, _req(_deep(1000))),
    (CAPS, b"[" * 1030 + b"]" * 10 + b'{"execute":"query-version","id":"deep"}'),
]


@pytest.mark.real_qemu
def test_differential_against_real_qemu(real_qemu: str) -> None:
    assert len(DIFF_CASES) >= 40
    failures = []
    greeting = b""
    for caps, data in DIFF_CASES:
        greeting, expected = qemu_exchange(real_qemu, caps, data)
        expected = TIMESTAMP.sub(b"TS", expected)
        version = json.loads(greeting)["QMP"]["version"]
        for bytewise in (False, True):
            core = make_core(version)
            assert core.greeting() == greeting
            if caps is not None:
                run_core(core, caps)
            got = TIMESTAMP.sub(b"TS", run_core(core, data + SENTINEL, bytewise=bytewise))
            if got != expected:
                failures.append((caps, data[:200], bytewise, expected, got))
                break
    assert not failures, "\n\n".join(
        f"caps={c!r} input={d!r} bytewise={b}\nqemu: {e!r}\nsim:  {g!r}"
        for c, d, b, e, g in failures)


_RANDOM_PIECES = [
    b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"\\u", b"d800", b"dc00", b"00e9",
    b"fffe", b"\\n", b"\\'", b" ", b"\n", b"\t", b"\x00", b"\x01", b"\xff", b"\xfe", b"\xc3\xa9",
    b"\xc0\x80", b"\xed", b"\xa0", b"\x80", b"\x7f", b"0", b"1", b"9", b"-", b".", b"e", b"E", b"+",
    b"true", b"nul", b"%", b"x", b"NaN", b'"execute"', b'"qmp_capabilities"', b'"stop"',
    b'"query-version"', b'"id"', b'"arguments"', b'"enable"', b'["oob"]', b"9223372036854775808",
    b"1e999", b'{"execute":"query-version","id":', b'{"execute":"query-version"}',
]


@pytest.mark.real_qemu
def test_differential_random_inputs(real_qemu: str) -> None:
    """Seeded random JSON-ish byte soup, whole inputs compared byte for byte."""
    rnd = random.Random(20240607)
    failures = []
    for _ in range(60):
        if rnd.random() < 0.2:
            data = rnd.randbytes(rnd.randint(0, 100))
        else:
            data = b"".join(rnd.choice(_RANDOM_PIECES) for _ in range(rnd.randint(0, 40)))
        # Not with OOB on: QEMU 7.2 then queues in-band work from its I/O thread and aborts
        # (qmp.c:384 "mon->qmp_requests->length < QMP_REQ_QUEUE_LEN_MAX") when one input byte
        # yields two messages while seven are queued -- timing-dependent, seen in this test.
        caps = rnd.choice([None, CAPS])
        greeting, expected = qemu_exchange(real_qemu, caps, data)
        core = make_core(json.loads(greeting)["QMP"]["version"])
        if caps is not None:
            run_core(core, caps)
        got = run_core(core, data + SENTINEL)
        if TIMESTAMP.sub(b"TS", got) != TIMESTAMP.sub(b"TS", expected):
            failures.append(f"caps={caps!r} input={data!r}\nqemu: {expected!r}\nsim:  {got!r}")
    assert not failures, "\n\n".join(failures)


def test_cli_early_greeting_matches_core() -> None:
    """virtsim-qemu greets before the core is imported; both must give the same bytes."""
    from virtsim.qmp.cli import greeting_bytes
    from virtsim.qmp.config import DEBIAN_VERSION

    for version in (DEBIAN_VERSION,
                    {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "v7.2.0"},
                    {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}):
        assert greeting_bytes(version) == QmpServerProtocol(version).greeting()
    assert greeting_bytes({"qemu": {"major": 7, "minor": 2, "micro": 0},
                           "package": 'q"uote'}) is None
