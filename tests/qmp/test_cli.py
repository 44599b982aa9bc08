"""``virtsim-qemu`` as a process: the same scripts run against real ``qemu-system-x86_64``.

Every test that real QEMU 7.2 can run is parametrised over ``qemu`` and ``virtsim`` and runs
the *same* script (command line, socket traffic, signals, expected texts) against both: that
is the "swap the binary, the script runs unchanged" promise.  Texts are QEMU's own, observed
on 7.2.22.  Where virtsim differs today the virtsim case is ``xfail(strict=True)`` with the
exact difference in the reason, so a fix shows up as XPASS (and must then drop the mark).

Not here: QMP wire behaviour of a single session, covered by ``tests/differential``.

Every process is started with its own session and killed by pid in a fixture finalizer;
daemons (not our children) are found by their command line, which names the test's
private directory.  Needs real QEMU for the ``qemu`` cases: skipped when it is missing,
a failure when CI=true.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"
QEMU = shutil.which(os.environ.get("QEMU_SYSTEM") or "qemu-system-x86_64")
_SCRIPT = Path(sys.executable).parent / "virtsim-qemu"
VIRTSIM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "virtsim.qmp.cli"]
#: Both print this program name first (QEMU: basename of argv[0]).
PROG = "qemu-system-x86_64"
TIMEOUT = 10.0
#: syscall number of ppoll: QEMU's main thread sits in it once the main loop runs
PPOLL = {"x86_64": 271, "aarch64": 73}.get(os.uname().machine)
IMG_SIZE = 1 << 20


# --------------------------------------------------------------------------- parametrisation


def both(virtsim_xfail: str | None = None) -> list[Any]:
    """``qemu`` and ``virtsim``; the virtsim case strictly xfails with a known difference."""
    marks = [pytest.mark.xfail(strict=True, reason=virtsim_xfail)] if virtsim_xfail else []
    return [pytest.param("qemu", id="qemu"), pytest.param("virtsim", id="virtsim", marks=marks)]


def command(binary: str) -> list[str]:
    """The binary's command; real QEMU missing: skip (fail when CI=true)."""
    if binary == "virtsim":
        return list(VIRTSIM)
    if QEMU is None:
        if IN_CI:
            pytest.fail("CI=true but qemu-system-x86_64 is not installed (set QEMU_SYSTEM)",
                        pytrace=False)
        pytest.skip("qemu-system-x86_64 not found (set QEMU_SYSTEM); real QEMU is the reference")
    return [QEMU]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- processes


def wait_main_loop(pid: int, timeout: float = 5.0) -> None:
    """Real QEMU 7.2 has a start-up race with wait=off (a client connecting during
    initialisation can get RESUME before the greeting, or a dead monitor): connect only once
    its main thread idles in ppoll (three samples in a row), as tests/differential does."""
    if PPOLL is None:
        time.sleep(0.2)
        return
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 3 and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/syscall") as f:
                nr = f.read().split(" ", 1)[0]
        except OSError:
            return  # gone (or /proc unreadable): let the caller see what happens
        streak = streak + 1 if nr == str(PPOLL) else 0
        time.sleep(0.001)


def proc_state(pid: int) -> str | None:
    """State letter from /proc (``Z`` = exited, not reaped), or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper(on: bool) -> bool:
    """Linux: orphaned descendants (daemons) are re-parented to this process rather than to
    init, so a test can reap them and read their exit status (and no zombie is left where
    init does not reap).  False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def wait_daemon(pid: int, timeout: float = TIMEOUT) -> int | None:
    """Wait until a daemon has exited: its exit status when it is our child (subreaper),
    None when it is not (then: gone, or a zombie of someone else).  AssertionError on
    timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if proc_state(pid) in (None, "Z", "X"):
                return None
        else:
            if wpid == pid:
                return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} is still running")
        time.sleep(0.005)


def reap_zombie_children(keep: set[int]) -> None:
    """Reap exited children we inherited as subreaper (QEMU's intermediate fork...)."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in keep:
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] == "Z" and fields[1] == me:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(int(entry), os.WNOHANG)


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@dataclass
class Emu:
    """One emulator process started by a test."""

    binary: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> Emu:
        if self.binary == "qemu":
            wait_main_loop(self.pid)
        return self

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stdout(self) -> str:
        return self.out.read_text(errors="backslashreplace")

    def stderr(self) -> str:
        return self.err.read_text(errors="backslashreplace")


class Runner:
    """Starts emulators in a test's private directory; kills whatever is left by pid."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.n = 0
        self.subreaper = set_child_subreaper(True)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def start(self, binary: str, *args: str, cwd: Path | None = None) -> Emu:
        self.n += 1
        out, err = self.dir / f"stdout{self.n}", self.dir / f"stderr{self.n}"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen([*command(binary), "-nodefaults", "-display", "none", *args],
                                    cwd=cwd or self.dir, stdin=subprocess.DEVNULL, stdout=fo,
                                    stderr=fe, start_new_session=True)
        self.procs.append(proc)
        return Emu(binary, proc, out, err)

    def daemon_pids(self) -> list[int]:
        """Processes whose command line names our private directory (daemons included)."""
        me = str(self.dir).encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if me in f.read():
                            pids.append(int(entry))
        return pids

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for pid in self.daemon_pids():
            if proc_state(pid) not in (None, "Z", "X"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(AssertionError):
                wait_daemon(pid, 5)
        if self.subreaper:
            reap_zombie_children({p.pid for p in self.procs})
            set_child_subreaper(False)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Runner]:
    r = Runner(tmp_path)
    try:
        yield r
    finally:
        r.close()
        # no socket, image or log is left behind
        for p in list(tmp_path.iterdir()):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


# --------------------------------------------------------------------------- QMP client


class Client:
    """A minimal synchronous QMP client over a unix path or a (host, port) pair."""

    def __init__(self, addr: str | tuple[str, int], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            fam = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            try:
                s.connect(addr)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.sock = s
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = TIMEOUT) -> dict[str, Any] | None:
        """The next message; None at EOF; TimeoutError when nothing arrives."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from the emulator")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise TimeoutError("no message from the emulator") from None
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                if not self.buf:
                    return None
                raise AssertionError(f"partial message at EOF: {self.buf!r}")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def silent(self, secs: float) -> bool:
        """Nothing arrives (and no EOF) within ``secs``."""
        try:
            msg = self.recv(secs)
        except TimeoutError:
            return True
        raise AssertionError(f"expected silence, got {msg!r}")

    def greeting(self) -> dict[str, Any]:
        msg = self.recv()
        assert msg is not None and "QMP" in msg, msg
        return msg

    def execute(self, name: str, args: dict[str, Any] | None = None,
                id: Any = None, end: bytes = b"\n") -> dict[str, Any]:
        """Send a command; events before the reply go to ``self.events``."""
        msg: dict[str, Any] = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        if id is not None:
            msg["id"] = id
        self.send(json.dumps(msg).encode() + end)
        return self.reply()

    def reply(self) -> dict[str, Any]:
        while True:
            msg = self.recv()
            assert msg is not None, "EOF instead of a reply"
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def negotiate(self) -> dict[str, Any]:
        greeting = self.greeting()
        assert self.execute("qmp_capabilities") == {"return": {}}
        return greeting

    def hmp(self, line: str) -> Any:
        rep = self.execute("human-monitor-command", {"command-line": line})
        assert "return" in rep, rep
        return rep["return"]

    def wait_event(self, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev["event"] == name:
                del self.events[i]
                return ev
        while True:
            msg = self.recv(timeout)
            assert msg is not None, f"EOF while waiting for {name}"
            assert "event" in msg, f"unexpected {msg!r} while waiting for {name}"
            if msg["event"] == name:
                return msg
            self.events.append(msg)

    def expect_eof(self, timeout: float = TIMEOUT) -> None:
        msg = self.recv(timeout)
        assert msg is None, f"expected EOF, got {msg!r}"

    def close(self) -> None:
        self.sock.close()


def check_greeting(greeting: dict[str, Any]) -> None:
    ver = greeting["QMP"]["version"]["qemu"]
    assert (ver["major"], ver["minor"]) == (7, 2)
    assert greeting["QMP"]["capabilities"] == ["oob"]


def quit_and_exit(emu: Emu, *clients: Client) -> None:
    """``quit`` on the first client; every negotiated client sees SHUTDOWN, all see EOF."""
    first = clients[0]
    # no newline after quit: QEMU reads its socket a byte at a time and exits right after
    # the command's '}'; an unread '\n' makes the kernel close a TCP connection with RST,
    # which can discard the SHUTDOWN event and the reply before the client reads them
    assert first.execute("quit", id="bye", end=b"") == {"return": {}, "id": "bye"}
    ev = first.wait_event("SHUTDOWN")
    assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    first.expect_eof()
    assert emu.wait() == 0


# =========================================================================== 1. monitors


@pytest.mark.parametrize("binary", both())
def test_qmp_tcp(runner: Runner, binary: str) -> None:
    port = free_port()
    emu = runner.start(binary, "-machine", "none",
                       "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off").ready()
    c = Client(("127.0.0.1", port))
    check_greeting(c.negotiate())
    assert c.execute("query-status") == {
        "return": {"status": "running", "singlestep": False, "running": True}}
    quit_and_exit(emu, c)
    assert emu.stderr() == ""


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("binary", both())
def test_chardev_mon_control(runner: Runner, binary: str, kind: str) -> None:
    if kind == "unix":
        addr: str | tuple[str, int] = runner.path("mon.sock")
        chardev = f"socket,id=mon0,path={addr},server=on,wait=off"
    else:
        addr = ("127.0.0.1", free_port())
        chardev = f"socket,id=mon0,host=127.0.0.1,port={addr[1]},server=on,wait=off"
    emu = runner.start(binary, "-machine", "none", "-S", "-name", "guest=vm1",
                       "-chardev", chardev, "-mon", "chardev=mon0,mode=control").ready()
    c = Client(addr)
    check_greeting(c.negotiate())
    assert c.execute("query-name") == {"return": {"name": "vm1"}}
    assert c.execute("query-status") == {
        "return": {"status": "prelaunch", "singlestep": False, "running": False}}
    quit_and_exit(emu, c)
    if isinstance(addr, str):
        assert not os.path.exists(addr), "the monitor socket is removed at exit"


@pytest.mark.parametrize("binary", both())
def test_three_monitors_each_serve_own_client_and_get_events(runner: Runner,
                                                             binary: str) -> None:
    """-qmp unix, -qmp tcp and -chardev/-mon at once: replies go to the asking client only,
    events to every negotiated client; a client still negotiating capabilities gets none."""
    a_path, port, c_path = runner.path("a.sock"), free_port(), runner.path("c.sock")
    emu = runner.start(binary, "-machine", "pc", "-S",
                       "-qmp", f"unix:{a_path},server=on,wait=off",
                       "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off",
                       "-chardev", f"socket,id=m2,path={c_path},server=on,wait=off",
                       "-mon", "chardev=m2,mode=control").ready()
    a, b, c = Client(a_path), Client(("127.0.0.1", port)), Client(c_path)
    a.negotiate()
    b.negotiate()
    c.greeting()  # stays in capabilities negotiation mode
    assert a.execute("cont", id="a1") == {"return": {}, "id": "a1"}
    assert [e["event"] for e in a.events] == ["RESUME"]  # the event comes before the reply
    assert b.wait_event("RESUME")["event"] == "RESUME"
    assert b.execute("stop", id="b1") == {"return": {}, "id": "b1"}
    assert [e["event"] for e in b.events] == ["STOP"]
    a.events.clear()
    b.events.clear()
    assert a.wait_event("STOP")["event"] == "STOP"
    # nothing else is pending for either (no other client's reply, no other event): the
    # next message is the reply to its own command
    assert a.execute("query-status", id="a2") == {
        "return": {"status": "paused", "singlestep": False, "running": False}, "id": "a2"}
    assert b.execute("query-status", id="b2")["id"] == "b2"
    assert a.events == [] and b.events == []
    assert c.silent(0.2), "no events before capabilities negotiation"
    assert b.execute("quit", id="bq", end=b"") == {"return": {}, "id": "bq"}
    for cl in (a, b):
        assert cl.wait_event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-qmp-quit"}
        cl.expect_eof()
    c.expect_eof()
    assert emu.wait() == 0


# =========================================================================== 2. one client


@pytest.mark.parametrize("binary", both())
def test_one_client_at_a_time(runner: Runner, binary: str) -> None:
    """A second client connects but hears nothing until the first one leaves; what it sent
    meanwhile is read afterwards, after its greeting."""
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", "none",
                       "-qmp", f"unix:{path},server=on,wait=off").ready()
    a = Client(path)
    a.negotiate()
    b = Client(path)  # the kernel accepts the connection; the monitor does not serve it
    b.send(b'{"execute": "qmp_capabilities", "id": "early"}\n')
    assert b.silent(0.3)
    assert a.execute("query-status", id=1)["id"] == 1  # the first client is still served
    assert b.silent(0.05)
    a.close()
    check_greeting(b.greeting())
    assert b.reply() == {"return": {}, "id": "early"}
    assert b.execute("query-status")["return"]["status"] == "running"
    c = Client(path)  # and the next one waits for b
    assert c.silent(0.15)
    quit_and_exit(emu, b)
    c.expect_eof()


# =========================================================================== 3. daemonize


def _daemon_args(sock: str, pidfile: str) -> list[str]:
    return ["-machine", "none", "-qmp", f"unix:{sock},server=on,wait=off",
            "-daemonize", "-pidfile", pidfile]


def _read_pid(pidfile: str) -> int:
    with open(pidfile) as f:
        text = f.read()
    assert text.endswith("\n") and text.strip().isdigit(), repr(text)
    return int(text)


@pytest.mark.parametrize("binary", both())
def test_daemonize_pidfile(runner: Runner, binary: str) -> None:
    sock, pidfile = runner.path("qmp.sock"), runner.path("emu.pid")
    t0 = time.monotonic()
    launcher = runner.start(binary, *_daemon_args(sock, pidfile))
    assert launcher.wait(5) == 0
    assert time.monotonic() - t0 < 5
    assert launcher.stdout() == "" and launcher.stderr() == ""
    pid = _read_pid(pidfile)
    assert pid != launcher.pid
    assert proc_state(pid) in ("S", "R")
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert sock.encode() in f.read()
    if binary == "qemu":
        wait_main_loop(pid)
    c = Client(sock)
    c.negotiate()
    assert c.execute("query-status")["return"]["status"] == "running"
    os.kill(pid, signal.SIGTERM)
    assert c.wait_event("SHUTDOWN")["data"] == {"guest": False, "reason": "host-signal"}
    c.expect_eof()
    status = wait_daemon(pid)
    if runner.subreaper:
        assert status == 0
    # QEMU removes its pidfile at exit (an exit notifier), and its socket
    assert not os.path.exists(pidfile)
    assert not os.path.exists(sock)


@pytest.mark.parametrize("binary", both())
def test_daemonize_pidfile_is_locked(runner: Runner, binary: str) -> None:
    sock, pidfile = runner.path("qmp.sock"), runner.path("emu.pid")
    assert runner.start(binary, *_daemon_args(sock, pidfile)).wait(5) == 0
    pid = _read_pid(pidfile)
    second = runner.start(binary, *_daemon_args(runner.path("qmp2.sock"), pidfile))
    assert second.wait(5) == 1
    assert second.stderr() == (f"{PROG}: cannot create PID file: Cannot lock pid file: "
                               "Resource temporarily unavailable\n")
    assert _read_pid(pidfile) == pid
    assert not os.path.exists(runner.path("qmp2.sock"))
    os.kill(pid, signal.SIGTERM)
    wait_daemon(pid)


@pytest.mark.parametrize("binary", both())
def test_daemonize_pidfile_mode(runner: Runner, binary: str) -> None:
    sock, pidfile = runner.path("qmp.sock"), runner.path("emu.pid")
    old = os.umask(0o022)
    try:
        assert runner.start(binary, *_daemon_args(sock, pidfile)).wait(5) == 0
    finally:
        os.umask(old)
    pid = _read_pid(pidfile)
    assert os.stat(pidfile).st_mode & 0o777 == 0o600
    os.kill(pid, signal.SIGTERM)
    wait_daemon(pid)


@pytest.mark.parametrize("binary", both())
def test_daemonize_cwd_is_root(runner: Runner, binary: str) -> None:
    sock, pidfile = runner.path("qmp.sock"), runner.path("emu.pid")
    (runner.dir / "disk.img").write_bytes(b"")
    assert runner.start(binary, *_daemon_args(sock, pidfile)).wait(5) == 0
    pid = _read_pid(pidfile)
    if binary == "qemu":
        wait_main_loop(pid)
    c = Client(sock)
    c.negotiate()
    rep = c.execute("blockdev-add", {"driver": "file", "node-name": "f0",
                                     "filename": "disk.img"})
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    with open(f"/proc/{pid}/status") as f:
        assert "Umask:\t0027\n" in f.read().splitlines(keepends=True)
    assert rep == {"error": {"class": "GenericError",
                             "desc": "Could not open 'disk.img': No such file or directory"}}
    os.kill(pid, signal.SIGTERM)
    wait_daemon(pid)


@pytest.mark.parametrize("binary", both())
def test_daemonize_startup_error(runner: Runner, binary: str) -> None:
    """An error during start-up reaches the launcher's stderr and its exit status."""
    sock, pidfile = runner.path("qmp.sock"), runner.path("emu.pid")
    arg = "driver=file,node-name=f0,filename=missing.img"
    launcher = runner.start(binary, *_daemon_args(sock, pidfile), "-blockdev", arg)
    assert launcher.wait(5) == 1
    assert launcher.stderr() == (
        f"{PROG}: -blockdev {arg}: Could not open 'missing.img': No such file or directory\n")
    assert not os.path.exists(pidfile)
    deadline = time.monotonic() + 2  # virtsim's child may still be exiting: give it a moment
    while runner.daemon_pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [p for p in runner.daemon_pids() if proc_state(p) not in ("Z", "X")] == []


# =========================================================================== 4. signals


@pytest.mark.parametrize("binary", both())
def test_sigterm_shutdown_event_and_status(runner: Runner, binary: str) -> None:
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", "none",
                       "-qmp", f"unix:{path},server=on,wait=off").ready()
    c = Client(path)
    c.negotiate()
    emu.proc.send_signal(signal.SIGTERM)
    ev = c.wait_event("SHUTDOWN")
    assert ev["data"] == {"guest": False, "reason": "host-signal"}
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}
    c.expect_eof()
    assert emu.wait() == 0
    assert emu.stderr().startswith(f"{PROG}: terminating on signal 15")
    assert not os.path.exists(path)


@pytest.mark.parametrize("binary", both())
def test_sigterm_right_after_greeting(runner: Runner, binary: str) -> None:
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", "none",
                       "-qmp", f"unix:{path},server=on,wait=off").ready()
    c = Client(path)
    c.greeting()
    emu.proc.send_signal(signal.SIGTERM)
    c.expect_eof()  # not negotiated: no SHUTDOWN event for this client
    assert emu.wait() == 0
    assert emu.stderr().startswith(f"{PROG}: terminating on signal 15")


def _argv0(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0", 1)[0].decode()


@pytest.mark.parametrize("binary", both())
def test_sigterm_stderr_names_sender(runner: Runner, binary: str) -> None:
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", "none",
                       "-qmp", f"unix:{path},server=on,wait=off").ready()
    Client(path).greeting()  # start-up is over
    os.kill(emu.pid, signal.SIGTERM)
    assert emu.wait() == 0
    me = os.getpid()
    assert emu.stderr() == f"{PROG}: terminating on signal 15 from pid {me} ({_argv0(me)})\n"


# =========================================================================== 5. bad options

_BD_FILE = "driver=file,node-name=f0,filename=disk.img"
_BD_RAW = "driver=raw,node-name=d0,file=f0"
_DISK = ["-blockdev", _BD_FILE, "-blockdev", _BD_RAW]


@dataclass
class BadCase:
    id: str
    args: list[str]
    stderr: str  # QEMU 7.2's exact stderr, without the program-name prefix
    virtsim_xfail: str | None = None


BAD_CASES = [
    BadCase("unknown-option", ["-machine", "none", "-foo"], "-foo: invalid option\n"),
    BadCase("missing-argument", ["-machine", "none", "-blockdev"],
            "-blockdev: requires an argument\n"),
    BadCase("blockdev-json-truncated", ["-machine", "none", "-blockdev", '{"driver":"file",'],
            '-blockdev {"driver":"file",: JSON parse error, premature EOI\n'),
    BadCase("blockdev-json-no-value", ["-machine", "none", "-blockdev", '{"driver":}'],
            '-blockdev {"driver":}: JSON parse error, expecting value\n'),
    BadCase("blockdev-json-trailing", ["-machine", "none", "-blockdev", '{"driver":"file"} x'],
            '-blockdev {"driver":"file"} x: Expecting at most one JSON value\n'),
    BadCase("blockdev-json-single-quotes",
            ["-machine", "none", "-blockdev",
             "{'driver':'file','node-name':'f0','filename':'missing.img'}"],
            "-blockdev {'driver':'file','node-name':'f0','filename':'missing.img'}: "
            "Could not open 'missing.img': No such file or directory\n"),
    BadCase("blockdev-missing-file-json",
            ["-machine", "none", "-blockdev",
             '{"driver":"file","node-name":"f0","filename":"missing.img"}'],
            '-blockdev {"driver":"file","node-name":"f0","filename":"missing.img"}: '
            "Could not open 'missing.img': No such file or directory\n"),
    BadCase("blockdev-missing-file-keyval",
            ["-machine", "none", "-blockdev", "driver=file,node-name=f0,filename=missing.img"],
            "-blockdev driver=file,node-name=f0,filename=missing.img: "
            "Could not open 'missing.img': No such file or directory\n"),
    BadCase("blockdev-bad-node-name",
            ["-machine", "none", "-blockdev", "driver=file,node-name=1bad,filename=disk.img"],
            "-blockdev driver=file,node-name=1bad,filename=disk.img: "
            "Invalid node-name: '1bad'\n"),
    BadCase("blockdev-no-node-name",
            ["-machine", "none", "-blockdev", '{"driver":"file","filename":"disk.img"}'],
            '-blockdev {"driver":"file","filename":"disk.img"}: '
            "'node-name' must be specified for the root node\n"),
    BadCase("blockdev-duplicate-node-name",
            ["-machine", "none", "-blockdev", _BD_FILE, "-blockdev", _BD_FILE],
            f"-blockdev {_BD_FILE}: Duplicate nodes with node-name='f0'\n"),
    BadCase("blockdev-unknown-driver",
            ["-machine", "none", "-blockdev", '{"driver":"nosuch","node-name":"f0"}'],
            '-blockdev {"driver":"nosuch","node-name":"f0"}: '
            "Parameter 'driver' does not accept value 'nosuch'\n"),
    BadCase("blockdev-unexpected-parameter",
            ["-machine", "none", "-blockdev", _BD_FILE + ",bogus=1"],
            f"-blockdev {_BD_FILE},bogus=1: Parameter 'bogus' is unexpected\n"),
    BadCase("blockdev-missing-filename",
            ["-machine", "none", "-blockdev", "driver=file,node-name=f0"],
            "-blockdev driver=file,node-name=f0: Parameter 'filename' is missing\n"),
    BadCase("device-virtio-bad-drive",
            ["-machine", "pc", "-S", "-device", "virtio-blk-pci,drive=nosuch,id=vd0"],
            "-device virtio-blk-pci,drive=nosuch,id=vd0: "
            "Property 'virtio-blk-device.drive' can't find value 'nosuch'\n"),
    BadCase("device-scsi-bad-drive",
            ["-machine", "pc", "-S", "-device", "virtio-scsi-pci,id=scsi0",
             "-device", "scsi-hd,drive=nosuch,id=sd0"],
            "-device scsi-hd,drive=nosuch,id=sd0: "
            "Property 'scsi-hd.drive' can't find value 'nosuch'\n"),
    BadCase("device-ide-bad-drive",
            ["-machine", "pc", "-S", "-device", "ide-hd,drive=nosuch,id=hd0"],
            "-device ide-hd,drive=nosuch,id=hd0: "
            "Property 'ide-hd.drive' can't find value 'nosuch'\n"),
    BadCase("device-no-drive",
            ["-machine", "pc", "-S", *_DISK, "-device", "virtio-blk-pci,id=vd0"],
            "-device virtio-blk-pci,id=vd0: drive property not set\n"),
    BadCase("device-unknown-model",
            ["-machine", "pc", "-S", *_DISK, "-device", "bogus-dev,drive=d0"],
            "-device bogus-dev,drive=d0: 'bogus-dev' is not a valid device model name\n"),
    BadCase("device-no-pci-bus",
            ["-machine", "none", *_DISK, "-device", "virtio-blk-pci,drive=d0,id=vd0"],
            "-device virtio-blk-pci,drive=d0,id=vd0: "
            "No 'PCI' bus found for device 'virtio-blk-pci'\n"),
    BadCase("device-no-ide-bus",
            ["-machine", "none", *_DISK, "-device", "ide-hd,drive=d0,id=hd0"],
            "-device ide-hd,drive=d0,id=hd0: No 'IDE' bus found for device 'ide-hd'\n"),
    BadCase("device-scsi-no-controller",
            ["-machine", "pc", "-S", *_DISK, "-device", "scsi-hd,drive=d0,id=sd0"],
            "-device scsi-hd,drive=d0,id=sd0: No 'SCSI' bus found for device 'scsi-hd'\n"),
    BadCase("device-scsi-bus-not-found",
            ["-machine", "pc", "-S", *_DISK, "-device", "scsi-hd,drive=d0,id=sd0,bus=scsi0.0"],
            "-device scsi-hd,drive=d0,id=sd0,bus=scsi0.0: Bus 'scsi0.0' not found\n"),
    BadCase("device-ide-bus-not-found",
            ["-machine", "pc", "-S", *_DISK, "-device", "ide-hd,drive=d0,id=hd0,bus=ide.5"],
            "-device ide-hd,drive=d0,id=hd0,bus=ide.5: Bus 'ide.5' not found\n"),
    BadCase("device-duplicate-id",
            ["-machine", "pc", "-S", *_DISK, "-blockdev", "driver=null-co,node-name=n1",
             "-device", "virtio-blk-pci,drive=d0,id=vd0",
             "-device", "virtio-blk-pci,drive=n1,id=vd0"],
            "-device virtio-blk-pci,drive=n1,id=vd0: Duplicate ID 'vd0' for device\n"),
    BadCase("device-permission-conflict-virtio",
            ["-machine", "pc", "-S", *_DISK, "-device", "virtio-blk-pci,drive=d0,id=vd0",
             "-device", "virtio-blk-pci,drive=d0,id=vd1"],
            "-device virtio-blk-pci,drive=d0,id=vd1: Permission conflict on node 'd0': "
            "permissions 'write' are both required by block device "
            "'/machine/peripheral/vd0/virtio-backend' (uses node 'd0' as 'root' child) and "
            "unshared by block device '/machine/peripheral/vd1/virtio-backend' (uses node "
            "'d0' as 'root' child).\n"),
    BadCase("device-permission-conflict-ide",
            ["-machine", "pc", "-S", *_DISK, "-device", "virtio-blk-pci,drive=d0,id=vd0",
             "-device", "ide-hd,drive=d0,id=hd0"],
            "-device ide-hd,drive=d0,id=hd0: Permission conflict on node 'd0': permissions "
            "'write' are both required by block device '/machine/peripheral/vd0/virtio-backend'"
            " (uses node 'd0' as 'root' child) and unshared by block device 'hd0' (uses node "
            "'d0' as 'root' child).\n"),
    BadCase("mon-chardev-not-found",
            ["-machine", "none", "-mon", "chardev=nosuch,mode=control"],
            '-mon chardev=nosuch,mode=control: chardev "nosuch" not found\n'),
    BadCase("chardev-no-id",
            ["-machine", "none", "-chardev", "socket,path=x.sock,server=on,wait=off"],
            "-chardev socket,path=x.sock,server=on,wait=off: chardev: no id specified\n"),
    BadCase("machine-unknown-type", ["-machine", "bogus"],
            "unsupported machine type\nUse -machine help to list supported machines\n"),
]


@dataclass
class Outcome:
    status: int | str  # exit status, or "running" (it started and answered QMP)
    stderr: str


def _run_bad(binary: str, case: BadCase, workdir: Path) -> Outcome:
    """Start ``case`` with a QMP monitor: it must exit; if it answers a QMP command instead
    (start-up finished), it is recorded as running and killed."""
    workdir.mkdir()
    (workdir / "disk.img").write_bytes(bytes(IMG_SIZE))
    sock = str(workdir / "q.sock")
    err = workdir / "stderr"
    with open(err, "wb") as fe:
        proc = subprocess.Popen([*command(binary), "-nodefaults", "-display", "none",
                                 "-qmp", f"unix:{sock},server=on,wait=off", *case.args],
                                cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=fe, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if os.path.exists(sock):
                with contextlib.suppress(OSError, TimeoutError, AssertionError, ValueError):
                    c = Client(sock, timeout=0.5)
                    try:
                        c.negotiate()
                        if "return" in c.execute("query-status"):
                            return Outcome("running", err.read_text())
                    finally:
                        c.close()
            time.sleep(0.02)
        status = proc.wait(0.5)
        return Outcome(status, err.read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def bad_outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str],
                                                                          Outcome]]:
    """All bad command lines, for both binaries, in parallel (each is its own process)."""
    root = tmp_path_factory.mktemp("bad")
    binaries = ["virtsim"] + (["qemu"] if QEMU else [])
    jobs = [(b, c) for b in binaries for c in BAD_CASES]
    with ThreadPoolExecutor(8) as pool:
        futs = {(b, c.id): pool.submit(_run_bad, b, c, root / f"{b}-{c.id}") for b, c in jobs}
        results = {k: f.result() for k, f in futs.items()}
    shutil.rmtree(root, ignore_errors=True)
    yield results


def _bad_params() -> list[Any]:
    params = []
    for case in BAD_CASES:
        for p in both(case.virtsim_xfail):
            params.append(pytest.param(p.values[0], case, id=f"{case.id}-{p.id}",
                                       marks=p.marks))
    return params


@pytest.mark.parametrize(("binary", "case"), _bad_params())
def test_bad_command_line(bad_outcomes: dict[tuple[str, str], Outcome], binary: str,
                          case: BadCase) -> None:
    command(binary)  # skip (or fail in CI) when real QEMU is missing
    got = bad_outcomes[(binary, case.id)]
    assert (got.status, got.stderr) == (1, f"{PROG}: {case.stderr}")


VIRTSIM_REFUSES = [
    (["-machine", "microvm"], "-machine microvm", "microvm"),
    (["-machine", "none", "-chardev", "pty,id=c0", "-mon", "chardev=c0,mode=control"],
     "-chardev pty,id=c0", "socket"),
    (["-machine", "none", "-chardev", "socket,id=c0,path=m.sock,server=on,wait=off",
      "-mon", "chardev=c0"], "-mon chardev=c0", "mode=control"),
    (["-machine", "none", "-qmp", "unix:m.sock"], "-qmp unix:m.sock", "server=on"),
    (["-machine", "none", "-qmp", "stdio"], "-qmp stdio", "server=on"),
    (["-machine", "none", "-display", "gtk"], "-display gtk", "-display none"),
    (["-machine", "none", "-drive", "file=disk.img,format=raw"],
     "-drive file=disk.img,format=raw", "if=none"),
    (["-machine", "none", "disk.img"], "disk.img", "disk image"),
]


@pytest.mark.parametrize(("args", "names", "hint"), VIRTSIM_REFUSES,
                         ids=[a[1].split()[0].lstrip("-") + "-" + a[2] for a in VIRTSIM_REFUSES])
def test_virtsim_refuses_unsupported(runner: Runner, args: list[str], names: str,
                                     hint: str) -> None:
    """What QEMU would run but virtsim does not emulate: one clear line naming the option and
    'virtsim', exit status 1, nothing started."""
    (runner.dir / "disk.img").write_bytes(bytes(IMG_SIZE))
    emu = runner.start("virtsim", *args)
    assert emu.wait() == 1
    err = emu.stderr()
    assert err.count("\n") == 1 and err.startswith(f"{PROG}: ") and names in err, err
    assert "virtsim" in err and hint in err, err
    assert emu.stdout() == ""
    assert not (runner.dir / "m.sock").exists()


# =========================================================================== 6. devices + I/O

_IO_LINE = "{op} 65536/65536 bytes at offset 0"


def _io_report(stdout: str) -> list[str]:
    """qemu-io's report with the timing line reduced to its counts."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("64 KiB, 1 ops; "):
            line = "64 KiB, 1 ops; <time>"
        out.append(line)
    return out


def _write_read_back(c: Client, target: str) -> None:
    """``target``: ``-d QDEV`` (a device) or a BlockBackend name (``-drive`` id)."""
    assert c.hmp(f'qemu-io {target} "write -P 0xab 0 64k"') == ""
    assert c.hmp(f'qemu-io {target} "read -P 0xab 0 64k"') == ""
    assert c.hmp(f'qemu-io {target} "read -P 0xcd 0 64k"') == ""  # must fail verification


_EXPECTED_IO = ["wrote 65536/65536 bytes at offset 0", "64 KiB, 1 ops; <time>",
                "read 65536/65536 bytes at offset 0", "64 KiB, 1 ops; <time>",
                "Pattern verification failed at offset 0, 65536 bytes",
                "read 65536/65536 bytes at offset 0", "64 KiB, 1 ops; <time>"]


def _check_image(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) == IMG_SIZE
    assert data[:65536] == b"\xab" * 65536
    assert data[65536:] == bytes(IMG_SIZE - 65536)


DEVICE_SETUPS = {
    # id: (machine, extra -device args before the disk, disk -device, qdev path for qemu-io)
    "virtio-blk-pci": ("pc", [], "virtio-blk-pci,drive=d0,id=vd0",
                       "/machine/peripheral/vd0/virtio-backend"),
    "virtio-blk-pci-q35": ("q35", [], "virtio-blk-pci,drive=d0,id=vd0",
                           "/machine/peripheral/vd0/virtio-backend"),
    "ide-hd-pc": ("pc", [], "ide-hd,drive=d0,id=hd0", "/machine/peripheral/hd0"),
    "ide-hd-q35": ("q35", [], "ide-hd,drive=d0,id=hd0", "/machine/peripheral/hd0"),
    "ide-hd-bus": ("pc", [], "ide-hd,drive=d0,id=hd0,bus=ide.1", "/machine/peripheral/hd0"),
    "scsi-hd": ("pc", ["-device", "virtio-scsi-pci,id=scsi0"], "scsi-hd,drive=d0,id=sd0",
                "/machine/peripheral/sd0"),
    "scsi-hd-bus": ("pc", ["-device", "virtio-scsi-pci,id=scsi0"],
                    "scsi-hd,drive=d0,id=sd0,bus=scsi0.0", "/machine/peripheral/sd0"),
}


@pytest.mark.parametrize("setup", list(DEVICE_SETUPS))
@pytest.mark.parametrize("binary", both())
def test_device_hmp_qemu_io(runner: Runner, binary: str, setup: str) -> None:
    """-S -device ... + HMP qemu-io write then read back through the device's qdev path."""
    machine, controllers, device, qdev = DEVICE_SETUPS[setup]
    (runner.dir / "disk.img").write_bytes(bytes(IMG_SIZE))
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", machine, "-S",
                       "-qmp", f"unix:{path},server=on,wait=off",
                       *_DISK, *controllers, "-device", device).ready()
    c = Client(path)
    c.negotiate()
    _write_read_back(c, f"-d {qdev}")
    quit_and_exit(emu, c)
    assert _io_report(emu.stdout()) == _EXPECTED_IO
    assert emu.stderr() == ""
    _check_image(runner.dir / "disk.img")


@pytest.mark.parametrize("binary", both())
def test_drive_if_none_with_virtio_blk(runner: Runner, binary: str) -> None:
    (runner.dir / "disk.img").write_bytes(bytes(IMG_SIZE))
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", "pc", "-S", "-qmp", f"unix:{path},server=on,wait=off",
                       "-drive", "if=none,id=drive0,file=disk.img,format=raw",
                       "-device", "virtio-blk-pci,drive=drive0,id=vd0").ready()
    c = Client(path)
    c.negotiate()
    blocks = c.execute("query-block")["return"]
    assert [(b["device"], b["qdev"]) for b in blocks] == [
        ("drive0", "/machine/peripheral/vd0/virtio-backend")]
    _write_read_back(c, "drive0")  # a -drive's BlockBackend, by name (no -d)
    quit_and_exit(emu, c)
    assert _io_report(emu.stdout()) == _EXPECTED_IO
    _check_image(runner.dir / "disk.img")


def _three_devices(runner: Runner, binary: str) -> tuple[Emu, Client]:
    for n in range(3):
        (runner.dir / f"disk{n}.img").write_bytes(bytes(IMG_SIZE))
    args = []
    for n in range(3):
        args += ["-blockdev", f"driver=file,node-name=f{n},filename=disk{n}.img",
                 "-blockdev", f"driver=raw,node-name=d{n},file=f{n}"]
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", "pc", "-S", "-qmp", f"unix:{path},server=on,wait=off",
                       *args, "-device", "virtio-blk-pci,drive=d0,id=vd0",
                       "-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=d1,id=sd0",
                       "-device", "ide-hd,drive=d2,id=hd0").ready()
    c = Client(path)
    c.negotiate()
    return emu, c


@pytest.mark.parametrize("binary", both())
def test_query_block_qdev_names(runner: Runner, binary: str) -> None:
    emu, c = _three_devices(runner, binary)
    blocks = c.execute("query-block")["return"]
    assert sorted(b["qdev"] for b in blocks) == [
        "/machine/peripheral/vd0/virtio-backend", "hd0", "sd0"]
    quit_and_exit(emu, c)


@pytest.mark.parametrize("binary", both())
def test_qemu_io_bare_device_id(runner: Runner, binary: str) -> None:
    emu, c = _three_devices(runner, binary)
    for qdev in ("sd0", "hd0"):
        _write_read_back(c, f"-d {qdev}")
    # a virtio-blk-pci proxy has no BlockBackend itself
    assert c.hmp('qemu-io -d vd0 "read 0 512"') == (
        "Error: Device does not have a block device backend\r\n")
    quit_and_exit(emu, c)
    assert _io_report(emu.stdout()) == _EXPECTED_IO * 2


# =========================================================================== 7. robustness


@pytest.mark.parametrize("binary", both())
def test_client_disconnects_mid_message(runner: Runner, binary: str) -> None:
    """Half a JSON object (mid-string even), then the client goes: the next client starts
    from a clean parser and is served."""
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", "none",
                       "-qmp", f"unix:{path},server=on,wait=off").ready()
    for half in (b'{"execute": "query-status", "argum', b'{"execute": "qmp_capabilities", '
                 b'"id": "unterminated string', b'{"execute": "query-name"}\n{"exe'):
        a = Client(path)
        a.negotiate()
        a.send(half)
        time.sleep(0.05)
        a.close()
    b = Client(path)
    b.negotiate()
    assert b.execute("query-status", id="b")["id"] == "b"
    assert b.events == []
    quit_and_exit(emu, b)


#: 10 MB on virtsim; real QEMU reads a QMP socket one byte per main-loop iteration
#: (monitor_can_read() returns 1), about 2.6 us a byte here: 10 MB would take ~26 s.
GARBAGE_SIZE = {"virtsim": 10_000_000, "qemu": 128 * 1024}


def _garbage(n: int) -> bytes:
    """'@' (a stray character: one error) then n bytes that QEMU's lexer skips while it
    recovers (anything but structural characters and control bytes): exactly one error."""
    table = bytes(b if 0x20 <= b <= 0xFD and b not in b"[]{}:," else 0x40 for b in range(256))
    return b"@" + random.Random(7).randbytes(n).translate(table) + b"\n"


@pytest.mark.parametrize("binary", both())
def test_garbage_flood_then_command(runner: Runner, binary: str) -> None:
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", "none",
                       "-qmp", f"unix:{path},server=on,wait=off").ready()
    c = Client(path)
    c.negotiate()
    assert c.execute("query-status")["return"]["running"] is True  # warm: tables loaded
    before = vm_hwm_kib(emu.pid)
    payload = _garbage(GARBAGE_SIZE[binary]) + b'{"execute": "query-status", "id": "after"}\n'
    failure: list[BaseException] = []

    def send() -> None:
        try:
            c.sock.sendall(payload)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            failure.append(e)

    c.sock.settimeout(TIMEOUT)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        first = c.recv(TIMEOUT * 2)
        second = c.recv(TIMEOUT * 2)
    finally:
        if sender.is_alive():
            c.sock.shutdown(socket.SHUT_RDWR)
        sender.join(TIMEOUT)
    assert not failure, failure
    assert first == {"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}
    assert second == {"return": {"status": "running", "singlestep": False, "running": True},
                      "id": "after"}
    grown = vm_hwm_kib(emu.pid) - before
    if binary == "virtsim":
        # bounded: the garbage is skipped as it streams in, never buffered whole
        assert grown < 8 * 1024, f"peak RSS grew by {grown} KiB for 10 MB of garbage"
    quit_and_exit(emu, c)


@pytest.mark.parametrize("binary", both())
def test_flood_without_reading_replies_is_bounded(runner: Runner, binary: str) -> None:
    """Each ']' is an error reply; the client never reads them.  Memory must stay bounded:
    the emulator has to stop reading input it cannot answer."""
    path = runner.path("qmp.sock")
    emu = runner.start(binary, "-machine", "none",
                       "-qmp", f"unix:{path},server=on,wait=off").ready()
    c = Client(path)
    c.negotiate()
    assert c.execute("query-status")["return"]["running"] is True
    before = vm_hwm_kib(emu.pid)
    c.sock.setblocking(False)
    chunk = b"]" * 65536
    sent, last_progress, start = 0, time.monotonic(), time.monotonic()
    # push up to 1 MiB; stop once the emulator has not read anything for 0.3 s
    while sent < 1 << 20 and time.monotonic() - last_progress < 0.3 \
            and time.monotonic() - start < 3:
        try:
            sent += c.sock.send(chunk)
            last_progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.005)
    grown = vm_hwm_kib(emu.pid) - before
    deadline = time.monotonic() + 0.8  # what was read is being answered: let it show
    while grown < 16 * 1024 and time.monotonic() < deadline:
        time.sleep(0.02)
        grown = vm_hwm_kib(emu.pid) - before
    assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB ({sent} bytes accepted)"
