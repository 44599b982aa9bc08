"""The simulated guest agent: libvirt's channel command line, the QGA protocol as qemu-ga 7.2
speaks it, fsfreeze, and guest writes that wait while the guest is frozen.

Each scenario runs on an emulator started the same way in three kinds: the ``virtsim-qemu``
process, the embedded emulator (in a thread with its own loop), and, where a real QEMU can
show the same thing (command-line checks, ``query-chardev`` before any guest agent runs, an
agent that never answers), ``qemu-system-x86_64`` itself.  Processes are ended by pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"
QEMU = shutil.which("qemu-system-x86_64")
_SCRIPT = Path(sys.executable).parent / "virtsim-qemu"
VIRTSIM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "virtsim.qmp.cli"]


def channel_args(agent_sock: Path, json_device: bool = False) -> list[str]:
    """libvirt's guest agent channel (9.0 passes -device as JSON; both forms work)."""
    port = ("virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,"
            "name=org.qemu.guest_agent.0")
    if json_device:
        port = json.dumps({"driver": "virtserialport", "bus": "virtio-serial0.0", "nr": 1,
                           "chardev": "charchannel0", "id": "channel0",
                           "name": "org.qemu.guest_agent.0"})
    return ["-chardev", f"socket,id=charchannel0,path={agent_sock},server=on,wait=off",
            "-device", "virtio-serial-pci,id=virtio-serial0", "-device", port]


def need_qemu() -> str:
    if QEMU is None:
        if IN_CI:
            pytest.fail("CI=true but qemu-system-x86_64 is not installed")
        pytest.skip("qemu-system-x86_64 not installed")
    return QEMU


# --------------------------------------------------------------------------- emulators


class Emu:
    """One running emulator, whatever its kind: its QMP and agent socket paths."""

    def __init__(self, qmp: Path, agent: Path, disk: Path | None) -> None:
        self.qmp = qmp
        self.agent = agent
        self.disk = disk  # a 1 MiB raw image behind virtio-disk0


class _Embedded:
    """An embedded emulator on a private loop thread (the tests talk to it over its
    sockets only, like to a process)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop_ev: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        async def run() -> None:
            from virtsim.qmp.cli import parse_args
            from virtsim.qmp.emulator import embedded

            try:
                cfg, _ = parse_args(self.argv)
                cfg.echo_qemu_io = False
                self.stop_ev = asyncio.Event()
                async with embedded(cfg):
                    self.ready.set()
                    await self.stop_ev.wait()
            except BaseException as e:
                self.error = e
                self.ready.set()

        self.loop.run_until_complete(run())
        self.loop.close()

    def close(self) -> None:
        if self.stop_ev is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.stop_ev.set)
        self.thread.join(10)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Any]:
    """``launch(kind, *extra_args, agent=True)`` -> Emu; ends everything it started."""
    procs: list[subprocess.Popen[bytes]] = []
    embeds: list[_Embedded] = []
    counter = [0]

    def start(kind: str, *extra: str, agent: bool = True, json_device: bool = False,
              disk: bool = True) -> Emu:
        counter[0] += 1
        qmp = tmp_path / f"qmp{counter[0]}.sock"
        ags = tmp_path / f"agent{counter[0]}.sock"
        argv = ["-S", "-machine", "pc", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        img = None
        if disk:
            img = tmp_path / f"disk{counter[0]}.raw"
            img.write_bytes(b"\0" * (1 << 20))
            argv += ["-blockdev", json.dumps({"driver": "raw", "node-name": "disk0",
                                              "file": {"driver": "file",
                                                       "filename": str(img)}}),
                     "-device", "virtio-blk-pci,drive=disk0,id=virtio-disk0"]
        if agent:
            argv += channel_args(ags, json_device)
        argv += list(extra)
        if kind == "embedded":
            embeds.append(_Embedded(argv))
        else:
            cmd = [need_qemu(), "-accel", "tcg"] if kind == "qemu" else list(VIRTSIM)
            p = subprocess.Popen([*cmd, *argv], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 start_new_session=True)
            procs.append(p)
            deadline = time.monotonic() + 10
            while not qmp.exists():
                assert p.poll() is None, p.stderr.read() if p.stderr else b""
                assert time.monotonic() < deadline, "emulator did not create its socket"
                time.sleep(0.01)
        return Emu(qmp, ags, img)

    try:
        yield start
    finally:
        for e in embeds:
            e.close()
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
            if p.stderr is not None:
                p.stderr.close()


# --------------------------------------------------------------------------- clients


class Qmp:
    """A minimal blocking QMP client that keeps events and out-of-order replies apart."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                assert time.monotonic() < deadline
                time.sleep(0.01)
        self.sock.settimeout(10)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        assert "QMP" in self._read()
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "monitor closed"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def send(self, name: str, args: dict[str, Any] | None = None, id: Any = None) -> None:
        msg: dict[str, Any] = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        if id is not None:
            msg["id"] = id
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def next_reply(self) -> dict[str, Any]:
        if self.replies:
            return self.replies.pop(0)
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        self.send(name, args)
        reply = self.next_reply()
        assert "return" in reply, reply
        return reply["return"]

    def wait_event(self, name: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == name:
                    self.events.remove(ev)
                    return ev
            assert time.monotonic() < deadline, f"no {name} event"
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self._read()
            except TimeoutError:
                continue
            finally:
                self.sock.settimeout(10)
            (self.events if "event" in msg else self.replies).append(msg)

    def close(self) -> None:
        self.sock.close()


class Agent:
    """Raw QGA traffic: bytes out, reply lines (sentinel included) back."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes | dict[str, Any]) -> None:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n"
        self.sock.sendall(raw)

    def line(self, timeout: float = 5.0) -> bytes | None:
        """The next reply line with its newline, or None if none comes in time."""
        self.sock.settimeout(timeout)
        try:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return None
                self.buf += chunk
        except TimeoutError:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def call(self, name: str, args: dict[str, Any] | None = None, **extra: Any) -> Any:
        msg: dict[str, Any] = {"execute": name, **extra}
        if args is not None:
            msg["arguments"] = args
        self.send(msg)
        line = self.line()
        assert line is not None, f"no reply to {name}"
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


SIM_KINDS = ["virtsim", "embedded"]


def booted(launch: Any, kind: str, **kw: Any) -> tuple[Emu, Qmp, Agent]:
    emu = launch(kind, **kw)
    qmp = Qmp(emu.qmp)
    qmp.cmd("cont")
    ev = qmp.wait_event("VSERPORT_CHANGE")
    assert ev["data"] == {"id": "channel0", "open": True}
    return emu, qmp, Agent(emu.agent)


# --------------------------------------------------------------------------- command line


BAD_LINES = [
    (["-device", "virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,"
                 "name=org.qemu.guest_agent.0"],
     "-device virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,"
     "name=org.qemu.guest_agent.0: Bus 'virtio-serial0.0' not found"),
    (["-device", "virtio-serial-pci,id=virtio-serial0", "-device",
      "virtserialport,bus=virtio-serial0.0,nr=1,chardev=nochar,id=channel0,"
      "name=org.qemu.guest_agent.0"],
     "-device virtserialport,bus=virtio-serial0.0,nr=1,chardev=nochar,id=channel0,"
     "name=org.qemu.guest_agent.0: Property 'virtserialport.chardev' can't find value "
     "'nochar'"),
    (["-machine", "none", "-device", "virtio-serial-pci,id=virtio-serial0"],
     "-device virtio-serial-pci,id=virtio-serial0: No 'PCI' bus found for device "
     "'virtio-serial-pci'"),
    (["-chardev", "socket,id=c,path={tmp}/x.sock,server=on,wait=off",
      "-device", "virtio-serial-pci,id=virtio-serial0",
      "-device", "virtserialport,chardev=c,id=channel0,name=org.qemu.guest_agent.0",
      "-device", "virtserialport,chardev=c,id=channel1,name=foo"],
     "-device virtserialport,chardev=c,id=channel1,name=foo: Property "
     "'virtserialport.chardev' can't take value 'c': Device 'c' is in use"),
    (["-chardev", "socket,id=c,path={tmp}/no/x.sock,server=on,wait=off",
      "-device", "virtio-serial-pci,id=virtio-serial0",
      "-device", "virtserialport,chardev=c,id=channel0,name=org.qemu.guest_agent.0"],
     "-chardev socket,id=c,path={tmp}/no/x.sock,server=on,wait=off: Failed to bind socket "
     "to {tmp}/no/x.sock: No such file or directory"),
]


@pytest.mark.parametrize("binary", ["qemu", "virtsim"])
@pytest.mark.parametrize("case", range(len(BAD_LINES)))
def test_channel_command_line_errors(binary: str, case: int, tmp_path: Path) -> None:
    args, text = BAD_LINES[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    text = text.replace("{tmp}", str(tmp_path))
    cmd = [need_qemu()] if binary == "qemu" else list(VIRTSIM)
    # -machine pc: QEMU's default machine (virtsim's default is none)
    r = subprocess.run([*cmd, "-nodefaults", "-display", "none", "-S", "-machine", "pc",
                        *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == f"qemu-system-x86_64: {text}"


@pytest.mark.parametrize("kind", ["qemu", "virtsim", "embedded"])
def test_query_chardev_before_the_guest_runs(launch: Any, kind: str) -> None:
    emu = launch(kind, json_device=True)
    qmp = Qmp(emu.qmp)
    chardevs = qmp.cmd("query-chardev")
    assert {"frontend-open": False, "label": "charchannel0",
            "filename": f"disconnected:unix:{emu.agent},server=on"} in chardevs
    assert {"frontend-open": True, "label": "compat_monitor0",
            "filename": f"unix:{emu.qmp},server=on"} in chardevs
    agent = Agent(emu.agent)  # bytes wait in the socket: nobody in the guest reads them
    agent.send(b'{"execute":"guest-ping"}\n')
    assert agent.line(timeout=0.3) is None
    assert {"frontend-open": False, "label": "charchannel0",
            "filename": f"unix:{emu.agent},server=on"} in qmp.cmd("query-chardev")
    agent.close()
    qmp.close()


@pytest.mark.parametrize("kind", ["qemu", "virtsim"])
def test_guest_without_agent_never_answers(launch: Any, kind: str) -> None:
    """A running VM whose guest runs no agent (real QEMU with no OS; virtsim with
    ``-x-virtsim-guest-agent off``): the port stays closed and requests go unanswered."""
    extra = ["-x-virtsim-guest-agent", "off"] if kind == "virtsim" else []
    emu = launch(kind, *extra)
    qmp = Qmp(emu.qmp)
    qmp.cmd("cont")
    agent = Agent(emu.agent)
    agent.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":1}}\n')
    assert agent.line(timeout=0.5) is None
    assert not any(ev["event"] == "VSERPORT_CHANGE" for ev in qmp.events)
    entry = next(c for c in qmp.cmd("query-chardev") if c["label"] == "charchannel0")
    assert entry["frontend-open"] is False
    agent.close()
    qmp.close()


# --------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("kind", SIM_KINDS)
def test_sync_delimited_and_basic_commands(launch: Any, kind: str) -> None:
    emu, qmp, agent = booted(launch, kind)
    # a half-sent request from an earlier client, then libvirt's flush + sync
    agent.send(b'{"execute":"guest-ping"')
    agent.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":1234}}\n')
    assert agent.line() == (b'{"error": {"class": "GenericError", "desc": '
                            b'"JSON parse error, stray \'\\uFFFD\'"}}\n')
    assert agent.line() == b'\xff{"return": 1234}\n'
    assert agent.call("guest-sync", {"id": 99}) == {"return": 99}
    assert agent.call("guest-ping", id="p1") == {"return": {}, "id": "p1"}
    info = agent.call("guest-info")["return"]
    assert info["version"] == "7.2.22"
    names = {c["name"]: c["enabled"] for c in info["supported_commands"]}
    assert names["guest-fsfreeze-freeze"] is True and names["guest-get-fsinfo"] is True
    fsinfo = agent.call("guest-get-fsinfo")["return"]
    assert [(f["name"], f["mountpoint"], f["type"]) for f in fsinfo] == [("vda1", "/", "ext4")]
    assert fsinfo[0]["total-bytes"] == 1 << 20
    assert chardev_open(qmp)
    agent.close()
    qmp.close()


def chardev_open(qmp: Qmp) -> bool:
    entry = next(c for c in qmp.cmd("query-chardev") if c["label"] == "charchannel0")
    return bool(entry["frontend-open"])


@pytest.mark.parametrize("kind", SIM_KINDS)
def test_request_errors(launch: Any, kind: str) -> None:
    emu, qmp, agent = booted(launch, kind)
    cases: list[tuple[bytes, str, str]] = [
        (b'[1]\n', "GenericError", "QMP input must be a JSON object"),
        (b'{"arguments": {}}\n', "GenericError", "QMP input lacks member 'execute'"),
        (b'{"execute": 1}\n', "GenericError", "QMP input member 'execute' must be a string"),
        (b'{"execute": "guest-ping", "arguments": 1}\n', "GenericError",
         "QMP input member 'arguments' must be an object"),
        (b'{"exec-oob": "guest-ping"}\n', "GenericError",
         "QMP input member 'exec-oob' is unexpected"),
        (b'{"execute": "guest-exec"}\n', "CommandNotFound",
         "The command guest-exec has not been found"),
        (b'{"execute": "guest-sync"}\n', "GenericError", "Parameter 'id' is missing"),
        (b'{"execute": "guest-sync", "arguments": {"id": "x"}}\n', "GenericError",
         "Invalid parameter type for 'id', expected: integer"),
        (b'{"execute": "guest-ping", "arguments": {"x": 1}}\n', "GenericError",
         "Parameter 'x' is unexpected"),
        (b'{"execute": "guest-fsfreeze-freeze-list", "arguments": {"mountpoints": [1]}}\n',
         "GenericError", "Invalid parameter type for 'mountpoints[0]', expected: string"),
    ]
    for raw, klass, desc in cases:
        agent.send(raw)
        line = agent.line()
        assert line is not None
        assert json.loads(line) == {"error": {"class": klass, "desc": desc}}, raw
    agent.close()
    qmp.close()


@pytest.mark.parametrize("kind", SIM_KINDS)
def test_freeze_and_thaw(launch: Any, kind: str) -> None:
    emu, qmp, agent = booted(launch, kind)
    assert agent.call("guest-fsfreeze-status") == {"return": "thawed"}
    assert agent.call("guest-fsfreeze-thaw") == {"return": 0}
    assert agent.call("guest-fsfreeze-freeze") == {"return": 1}
    assert agent.call("guest-fsfreeze-status") == {"return": "frozen"}
    disabled = "has been disabled: the agent is in frozen state"
    for name in ("guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-get-fsinfo"):
        assert agent.call(name) == {"error": {"class": "CommandNotFound",
                                              "desc": f"Command {name} {disabled}"}}
    enabled = {c["name"]: c["enabled"]
               for c in agent.call("guest-info")["return"]["supported_commands"]}
    assert enabled["guest-fsfreeze-freeze"] is False and enabled["guest-ping"] is True
    assert agent.call("guest-ping") == {"return": {}}
    assert agent.call("guest-fsfreeze-thaw") == {"return": 1}
    assert agent.call("guest-fsfreeze-status") == {"return": "thawed"}
    assert agent.call("guest-fsfreeze-freeze-list", {"mountpoints": ["/"]}) == {"return": 1}
    assert agent.call("guest-fsfreeze-thaw") == {"return": 1}
    # nothing matches: qemu-ga returns 0 and leaves the guest thawed
    assert agent.call("guest-fsfreeze-freeze-list", {"mountpoints": ["/x"]}) == {"return": 0}
    assert agent.call("guest-fsfreeze-status") == {"return": "thawed"}
    # the state belongs to the guest, not the connection
    agent.call("guest-fsfreeze-freeze")
    agent.close()
    again = Agent(emu.agent)
    assert again.call("guest-fsfreeze-status") == {"return": "frozen"}
    assert again.call("guest-fsfreeze-thaw") == {"return": 1}
    again.close()
    qmp.close()


@pytest.mark.parametrize("kind", SIM_KINDS)
def test_agent_is_silent_while_the_vm_is_paused(launch: Any, kind: str) -> None:
    emu, qmp, agent = booted(launch, kind)
    qmp.cmd("stop")
    agent.send({"execute": "guest-ping"})
    assert agent.line(timeout=0.3) is None
    qmp.cmd("cont")
    assert agent.line() == b'{"return": {}}\n'
    agent.close()
    qmp.close()


@pytest.mark.parametrize("kind", SIM_KINDS)
def test_guest_writes_wait_while_frozen(launch: Any, kind: str) -> None:
    emu, qmp, agent = booted(launch, kind)
    qom = "/machine/peripheral/virtio-disk0/virtio-backend"
    assert emu.disk is not None
    assert agent.call("guest-fsfreeze-freeze") == {"return": 1}
    qmp.send("x-virtsim-guest-workload",
             {"device": qom, "qdev": True, "writes": 8, "seed": 3, "size-min": 65536,
              "size-max": 65536, "region": {"offset": 65536, "length": 983040}}, id="guest")
    # the monitor keeps serving: host-side qemu-io is not frozen, its reply overtakes
    qmp.send("human-monitor-command",
             {"command-line": f'qemu-io -d {qom} "write -P 0x5a 0 4k"'}, id="host")
    assert qmp.next_reply() == {"return": "", "id": "host"}
    qmp.send("query-status", id="status")
    assert qmp.next_reply()["id"] == "status"
    data = emu.disk.read_bytes()
    assert data[:4096] == b"\x5a" * 4096          # the host write landed
    assert data[65536:] == bytes(983040)           # the guest's writes did not
    assert agent.call("guest-fsfreeze-thaw") == {"return": 1}
    reply = qmp.next_reply()
    assert reply == {"return": {"requests": 8, "bytes": 8 * 65536}, "id": "guest"}
    assert emu.disk.read_bytes()[65536:] != bytes(983040)  # now they did
    agent.close()
    qmp.close()


def test_workload_reply_is_immediate_when_thawed(launch: Any) -> None:
    emu, qmp, agent = booted(launch, "embedded")
    res = qmp.cmd("x-virtsim-guest-workload",
                  {"device": "/machine/peripheral/virtio-disk0/virtio-backend", "qdev": True,
                   "writes": 2, "seed": 1, "size-min": 4096, "size-max": 4096})
    assert res == {"requests": 2, "bytes": 8192}
    agent.close()
    qmp.close()
