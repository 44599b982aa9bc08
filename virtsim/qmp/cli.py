"""``virtsim-qemu``: the emulator as a process, command-line compatible with QEMU's subset.

One script must run unchanged against ``qemu-system-x86_64`` or ``virtsim-qemu``, so the
options, their syntax (``unix:PATH,server=on,wait=off``, keyval or JSON ``-blockdev``) and
the failure messages follow QEMU.  Options that only matter to a real guest (memory, CPUs,
RTC...) are accepted and ignored; anything else is refused by name.
"""

from __future__ import annotations

import os
import sys

from ..sim.errors import SimError
from .config import AgentChannelSpec, DeviceSpec, EmulatorConfig, MonitorSpec

TYPE_CHECKING = False  # typing costs ~8 ms to import; virtsim-qemu starts without it
if TYPE_CHECKING:
    import socket
    from typing import Any

PROG = "qemu-system-x86_64"

# options taking an argument that we accept and ignore (no guest is emulated)
_IGNORED_WITH_ARG = {"m", "smp", "uuid", "msg", "accel", "overcommit", "rtc", "boot", "sandbox",
                     "cpu", "global", "vga", "k", "serial", "parallel", "monitor", "L", "bios",
                     "audiodev", "vnc", "spice", "runas", "chroot", "D", "d",
                     "trace"}
_IGNORED_FLAGS = {"nodefaults", "nographic", "no-user-config", "no-shutdown", "enable-kvm",
                  "no-reboot", "no-hpet", "no-acpi"}
_INT_KEYS = {"size", "offset", "granularity", "cluster-size", "port", "max-connections",
             "cbw-timeout", "iops", "bps",
             # blkdebug
             "align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
             "max-discard", "state", "new_state", "errno", "sector"}
_BOOL_KEYS = {"read-only", "auto-read-only", "read-zeroes", "force-share", "persistent",
              "disabled", "writable", "locking", "once", "immediately"}


class UsageError(Exception):
    """A command-line error, printed as QEMU prints it, exit status 1."""


def split_opts(text: str) -> list[tuple[str, str | None]]:
    """QEMU's QemuOpts syntax: comma separated ``key=value``; ``,,`` is a literal comma."""
    parts: list[str] = []
    cur = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out: list[tuple[str, str | None]] = []
    for p in parts:
        if "=" in p:
            k, v = p.split("=", 1)
            out.append((k, v))
        else:
            out.append((p, None))
    return out


def _keyval_value(key: str, v: str) -> Any:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _BOOL_KEYS:
        if v in ("on", "true", "yes"):
            return True
        if v in ("off", "false", "no"):
            return False
    if leaf in _INT_KEYS:
        try:
            return int(v, 0)
        except ValueError:
            return v
    return v


def parse_blockdev(arg: str) -> dict[str, Any]:
    """-blockdev as JSON (``{...}``) or dotted keyval (``driver=qcow2,file.filename=x``)."""
    if arg.lstrip().startswith("{"):
        return parse_json_option(arg, "-blockdev")
    out: dict[str, Any] = {}
    for i, (k, v) in enumerate(split_opts(arg)):
        if v is None:
            if i == 0:
                k, v = "driver", k
            else:
                raise UsageError(f"-blockdev {arg}: Expected '=' after parameter '{k}'")
        cur = out
        keys = k.split(".")
        for sub in keys[:-1]:
            nxt = cur.setdefault(sub, {})
            if not isinstance(nxt, dict):
                raise UsageError(f"-blockdev {arg}: Parameter '{k}' used inconsistently")
            cur = nxt
        cur[keys[-1]] = _keyval_value(k, v)
    listified: dict[str, Any] = _listify(out)
    return listified


def _listify(value: Any) -> Any:
    """keyval's lists: an object whose keys are all 0..N-1 is the list of its members
    (``inject-error.0.event=...``)."""
    if not isinstance(value, dict):
        return value
    items = {k: _listify(v) for k, v in value.items()}
    if items and all(k.isdigit() for k in items) and \
            sorted(int(k) for k in items) == list(range(len(items))):
        return [items[str(i)] for i in range(len(items))]
    return items


def parse_json_option(arg: str, opt: str) -> dict[str, Any]:
    """A JSON command-line argument, read by QEMU's own JSON parser rules and texts."""
    from .jsonstream import JsonParseError, JsonStreamParser

    parser = JsonStreamParser()
    values = parser.feed(arg.encode("utf-8")) + parser.feed(b"\n")
    if values and isinstance(values[0], JsonParseError):
        raise UsageError(f"{opt} {arg}: {values[0].desc}")
    if len(values) > 1:
        raise UsageError(f"{opt} {arg}: Expecting at most one JSON value")
    if not parser.idle or not values:
        raise UsageError(f"{opt} {arg}: JSON parse error, premature EOI")
    value = values[0]
    if not isinstance(value, dict):
        raise UsageError(f"{opt} {arg}: Invalid parameter type for 'null', expected: object")
    return value


def _parse_chardev_addr(arg: str, opt: str) -> MonitorSpec:
    """``unix:PATH,server=on,wait=off`` or ``tcp:HOST:PORT,server=on,wait=off``."""
    opts = split_opts(arg)
    head = opts[0][0] if opts[0][1] is None else f"{opts[0][0]}={opts[0][1]}"
    flags = {k: v for k, v in opts[1:]}
    pretty = flags.get("pretty") in ("on", "true")
    if "server" not in flags:
        raise UsageError(f"-{opt} {arg}: virtsim only supports listening monitors "
                         f"(server=on,wait=off)")
    if head.startswith("unix:"):
        return MonitorSpec("unix", path=head[5:], pretty=pretty)
    if head.startswith("tcp:"):
        host, _, port = head[4:].rpartition(":")
        return MonitorSpec("tcp", host=host or "127.0.0.1", port=int(port), pretty=pretty)
    raise UsageError(f"-{opt} {arg}: virtsim supports unix: and tcp: monitors only")


def parse_args(argv: list[str]) -> tuple[EmulatorConfig, dict[str, Any]]:
    """Parse a QEMU command line into an EmulatorConfig and process options."""
    cfg = EmulatorConfig()
    proc: dict[str, Any] = {"daemonize": False, "pidfile": None}
    chardevs: dict[str, MonitorSpec] = {}
    serial_buses: set[str] = set()     # virtio-serial buses created so far
    used_chardevs: set[str] = set()    # chardevs a device or monitor already owns
    serial_controllers: list[str] = []  # what QEMU says if there is no PCI bus for them
    chardev_args: dict[str, str] = {}
    i = 0

    def need() -> str:
        nonlocal i
        if i + 1 >= len(argv):
            raise UsageError(f"{argv[i]}: requires an argument")
        i += 1
        return argv[i]

    while i < len(argv):
        raw = argv[i]
        if not raw.startswith("-"):
            raise UsageError(f"virtsim does not support disk image arguments: {raw}")
        opt = raw.lstrip("-")
        if opt in ("machine", "M"):
            val = need()
            kv = split_opts(val)
            mtype = kv[0][0] if kv[0][1] is None else dict(kv).get("type", "none")
            mtype = mtype or "none"
            if mtype in ("none", "pc", "q35") or mtype.startswith(("pc-i440fx-", "pc-q35-")):
                cfg.machine = "q35" if "q35" in mtype else ("pc" if mtype != "none" else "none")
            elif mtype in ("isapc", "microvm", "x-remote"):
                raise UsageError(f"-machine {val}: virtsim does not emulate machine type "
                                 f"'{mtype}' (it emulates none, pc and q35)")
            else:
                raise UsageError("unsupported machine type\n"
                                 "Use -machine help to list supported machines")
        elif opt == "S":
            cfg.start_paused = True
        elif opt == "name":
            val = need()
            kv = split_opts(val)
            if kv[0][1] is None:
                cfg.name = kv[0][0]
            else:
                cfg.name = dict(kv).get("guest")
        elif opt == "display":
            val = need()
            if split_opts(val)[0][0] != "none":
                raise UsageError(f"-display {val}: virtsim has no display (use -display none)")
        elif opt == "qmp":
            cfg.monitors.append(_parse_chardev_addr(need(), "qmp"))
        elif opt == "qmp-pretty":
            spec = _parse_chardev_addr(need(), "qmp-pretty")
            spec.pretty = True
            cfg.monitors.append(spec)
        elif opt == "chardev":
            val = need()
            kv = split_opts(val)
            backend = kv[0][0]
            d = {k: v for k, v in kv[1:]}
            cid = d.get("id")
            if not cid:
                raise UsageError(f"-chardev {val}: chardev: no id specified")
            if backend != "socket":
                raise UsageError(f"-chardev {val}: virtsim supports socket chardevs only")
            if "path" in d:
                chardevs[cid] = MonitorSpec("unix", path=d["path"] or "")
            else:
                chardevs[cid] = MonitorSpec("tcp", host=d.get("host") or "127.0.0.1",
                                            port=int(d.get("port") or 0))
            chardevs[cid].label = cid
            chardev_args[cid] = val
        elif opt == "mon":
            val = need()
            d = {k: v for k, v in split_opts(val)}
            cid = d.get("chardev") or ""
            if cid not in chardevs:
                raise UsageError(f"-mon {val}: chardev \"{cid}\" not found")
            if d.get("mode", "readline") != "control":
                raise UsageError(f"-mon {val}: virtsim supports mode=control monitors only")
            spec = chardevs[cid]
            used_chardevs.add(cid)
            spec.pretty = d.get("pretty") in ("on", "true")
            cfg.monitors.append(spec)
        elif opt == "blockdev":
            val = need()
            bd = parse_blockdev(val)
            try:
                from . import schema

                schema.validate_type("BlockdevOptions", bd)
            except SimError as e:
                raise UsageError(f"-blockdev {val}: {e.desc}") from None
            bd["_arg"] = val
            cfg.blockdevs.append(bd)
        elif opt == "drive":
            val = need()
            drive: dict[str, str] = {k: (v if v is not None else "on")
                                     for k, v in split_opts(val)}
            drive["_arg"] = val
            cfg.drives.append(drive)
        elif opt == "device":
            val = need()
            driver, props = _parse_device(val)
            if driver in ("virtio-serial-pci", "virtio-serial", "virtserialport"):
                _serial_device(cfg, val, driver, props, chardevs, serial_buses, used_chardevs,
                               serial_controllers, chardev_args)
            # devices with nothing to simulate: accepted, not modelled
            elif driver not in ("pcie-root-port", "virtio-balloon-pci"):
                props["_arg"] = val
                cfg.devices.append(DeviceSpec(driver, props.get("id"), props.get("drive"),
                                              props))
        elif opt == "daemonize":
            proc["daemonize"] = True
        elif opt == "pidfile":
            proc["pidfile"] = need()
        elif opt == "x-virtsim-guest-agent":
            # on (default): the simulated guest runs qemu-ga and opens its port once the
            # VM runs; off: the port stays closed, like a real QEMU with no guest OS
            val = need()
            if val not in ("on", "off"):
                raise UsageError(f"-x-virtsim-guest-agent {val}: expected on or off")
            cfg.guest_agent = val == "on"
        elif opt == "x-virtsim-seed":
            cfg.seed = int(need())
        elif opt == "x-virtsim-version":
            # what query-version and the greeting report: MAJOR.MINOR.MICRO[,package=TEXT]
            val = need()
            kv = split_opts(val)
            try:
                major, minor, micro = (int(x) for x in kv[0][0].split("."))
            except ValueError:
                raise UsageError(f"-x-virtsim-version {val}: expected MAJOR.MINOR.MICRO"
                                 ) from None
            package = dict(kv[1:]).get("package") or ""
            cfg.version = {"qemu": {"major": major, "minor": minor, "micro": micro},
                           "package": package}
        elif opt in _IGNORED_FLAGS:
            pass
        elif opt in _IGNORED_WITH_ARG:
            need()
        else:
            raise UsageError(f"{raw}: invalid option")
        i += 1
    if serial_controllers and cfg.machine == "none":  # -machine counts wherever it stands
        raise UsageError(serial_controllers[0])
    return cfg, proc


def _parse_device(val: str) -> tuple[str, dict[str, str]]:
    """-device as keyval (``driver,key=value``) or JSON (libvirt's form since 7.x)."""
    if val.lstrip().startswith("{"):
        obj = parse_json_option(val, "-device")
        props = {k: ("on" if v is True else "off" if v is False else str(v))
                 for k, v in obj.items() if k != "driver"}
        return str(obj.get("driver") or ""), props
    kv = split_opts(val)
    driver = kv[0][0] if kv[0][1] is None else (dict(kv).get("driver") or "")
    return driver, {k: (v or "") for k, v in kv[1:] if k != "driver"}


def _serial_device(cfg: EmulatorConfig, val: str, driver: str, props: dict[str, str],
                   chardevs: dict[str, MonitorSpec], buses: set[str], used: set[str],
                   controllers: list[str], chardev_args: dict[str, str]) -> None:
    """virtio-serial controllers and ports: only a guest agent port has a simulation
    behind it (``virtsim.qmp.agent``); the checks and texts are QEMU's."""
    if driver != "virtserialport":
        buses.add(f"{props.get('id') or 'virtio-serial'}.0")
        controllers.append(f"-device {val}: No 'PCI' bus found for device '{driver}'")
        return
    bus = props.get("bus")
    if (bus is not None and bus not in buses) or not buses:
        raise UsageError(f"-device {val}: Bus '{bus}' not found" if bus is not None else
                         f"-device {val}: No 'virtio-serial-bus' bus found for device "
                         f"'virtserialport'")
    cid = props.get("chardev")
    if cid is None:
        return
    if cid not in chardevs:
        raise UsageError(f"-device {val}: Property 'virtserialport.chardev' can't find "
                         f"value '{cid}'")
    if cid in used:
        raise UsageError(f"-device {val}: Property 'virtserialport.chardev' can't take "
                         f"value '{cid}': Device '{cid}' is in use")
    used.add(cid)
    if props.get("name") == "org.qemu.guest_agent.0":
        cfg.agent_channels.append(AgentChannelSpec(cid, chardevs[cid], props.get("id"),
                                                   arg=chardev_args.get(cid, "")))


def _daemonize() -> int:
    """QEMU's -daemonize: fork, setsid, fork again (so the daemon does not lead a session);
    the launcher waits until the daemon is ready and exits 0, or 1 if it failed."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        status = os.read(rfd, 1)
        os._exit(0 if status == b"\0" else 1)
    os.close(rfd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    return wfd


def _write_pidfile(path: str) -> int:
    """QEMU's qemu_write_pidfile: 0600, locked for the process's lifetime, one per path."""
    import fcntl

    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UsageError(f"cannot create PID file: Cannot open pid file: {e.strerror}"
                         ) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise UsageError(f"cannot create PID file: Cannot lock pid file: {e.strerror}"
                         ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class SignalWatcher:
    """Termination signals, caught from the first instant and reported as QEMU does.

    The signals are blocked in every thread and collected by one thread with
    sigwaitinfo(), which also tells who sent them ("from pid N (ARGV0)").  Until the event
    loop is up they are kept; then each one shuts the emulator down.
    """

    SIGNALS = (15, 2, 1)  # SIGTERM, SIGINT, SIGHUP

    def __init__(self) -> None:
        import signal
        import threading

        self.pending: list[tuple[int, int]] = []
        self.deliver: Any = None
        self._lock = threading.Lock()
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        self.thread = threading.Thread(target=self._wait, name="virtsim-signals", daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        import signal

        while True:
            info = signal.sigwaitinfo(self.SIGNALS)
            with self._lock:
                if self.deliver is None:
                    self.pending.append((info.si_signo, info.si_pid))
                    continue
                deliver = self.deliver
            deliver(info.si_signo, info.si_pid)

    def attach(self, deliver: Any) -> None:
        """From now on call ``deliver(signo, pid)`` (thread-safe); replay what came early."""
        with self._lock:
            self.deliver = deliver
            pending, self.pending = self.pending, []
        for signo, pid in pending:
            deliver(signo, pid)


def _terminating_message(signo: int, pid: int) -> str:
    if pid == 0:
        return f"{PROG}: terminating on signal {signo}"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            name = f.read().split(b"\0")[0].decode(errors="replace") or "<unknown process>"
    except OSError:
        name = "<unknown process>"
    return f"{PROG}: terminating on signal {signo} from pid {pid} ({name})"


async def _run(cfg: EmulatorConfig, proc: dict[str, Any], ready_fd: int | None,
               greeter: EarlyGreeter | None = None,
               signals: SignalWatcher | None = None) -> int:
    import asyncio
    import contextlib

    from .emulator import Emulator, StartupError

    try:
        emu = Emulator(cfg)
        if greeter is not None:
            greeter.stop()
        await emu.start()
        from .server import warm_up

        asyncio.get_running_loop().call_soon(warm_up)
    except (SimError, StartupError, OSError) as e:
        print(f"{PROG}: {getattr(e, 'desc', e)}", file=sys.stderr)
        if proc["pidfile"]:
            _remove(proc["pidfile"])
        if ready_fd is not None:
            os.write(ready_fd, b"\1")
        return 1
    loop = asyncio.get_running_loop()

    def on_signal(signo: int, pid: int) -> None:
        # a vanished reader of our stderr (the parent died) must not cost the clean
        # shutdown that stores persistent bitmaps
        with contextlib.suppress(OSError):
            print(_terminating_message(signo, pid), file=sys.stderr, flush=True)
        emu.bus.emit("SHUTDOWN", {"guest": False, "reason": "host-signal"})
        emu.finish_quit()

    if signals is not None:
        signals.attach(lambda signo, pid: loop.call_soon_threadsafe(on_signal, signo, pid))
    if ready_fd is not None:
        os.write(ready_fd, b"\0")
        os.close(ready_fd)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        # QEMU's os_setup_post(): a daemon runs from / with umask 027
        os.chdir("/")
        os.umask(0o027)
    try:
        await emu.wait_quit()
    finally:
        await emu.close()
        if proc["pidfile"]:
            _remove(proc["pidfile"])
    return 0


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def greeting_bytes(version: dict[str, Any]) -> bytes | None:
    """QEMU's greeting, formatted without importing the JSON machinery (None if the package
    string would need escaping: the full writer then produces it)."""
    q = version["qemu"]
    pkg = str(version["package"])
    if not (pkg.isascii() and pkg.isprintable()) or '"' in pkg or "\\" in pkg:
        return None
    return (f'{{"QMP": {{"version": {{"qemu": {{"micro": {int(q["micro"])}, "minor": '
            f'{int(q["minor"])}, "major": {int(q["major"])}}}, "package": "{pkg}"}}, '
            f'"capabilities": ["oob"]}}}}\r\n').encode("ascii")


def _listen(spec: MonitorSpec) -> socket.socket:
    import socket

    if spec.kind == "unix":
        try:
            os.unlink(spec.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(spec.path)
        except OSError as e:
            sock.close()
            raise UsageError(f"-qmp unix:{spec.path}: Failed to bind socket to {spec.path}: "
                             f"{e.strerror}") from None
    else:
        try:
            sock = socket.create_server((spec.host, spec.port))
        except OSError as e:
            raise UsageError(f"-qmp tcp:{spec.host}:{spec.port}: Failed to bind socket: "
                             f"{e.strerror}") from None
    sock.listen(16)
    return sock


class EarlyGreeter:
    """Bind the monitors and greet the first client of each while the rest of the
    emulator is still being imported (Python's start-up is the slow part of a launch).

    Used only when nothing on the command line can still fail after the greeting (no
    -blockdev/-drive/-device): QEMU never greets and then exits with a start-up error, so
    neither may we.  Anything the client sends meanwhile waits in the socket.
    """

    def __init__(self, specs: list[MonitorSpec], greeting: bytes) -> None:
        import threading

        self.specs = specs
        self.greeting = greeting
        for spec in specs:
            spec.sock = _listen(spec)
        self._rfd, self._wfd = os.pipe()
        self.thread = threading.Thread(target=self._serve, name="virtsim-greeter",
                                       daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import select

        pending = {spec.sock.fileno(): spec for spec in self.specs if spec.sock is not None}
        while pending:
            ready, _, _ = select.select([*pending, self._rfd], [], [])
            if self._rfd in ready:
                return
            for fd in ready:
                spec = pending.pop(fd)
                assert spec.sock is not None
                conn, _ = spec.sock.accept()
                try:
                    conn.sendall(self.greeting)
                except OSError:
                    conn.close()
                    continue
                spec.accepted = conn

    def stop(self) -> None:
        os.write(self._wfd, b"x")
        self.thread.join()
        os.close(self._rfd)
        os.close(self._wfd)


def _loop_runner() -> Any:
    """uvloop when installed (a faster loop for the monitor traffic), else asyncio's own.

    VIRTSIM_LOOP=asyncio forces the standard loop."""
    if os.environ.get("VIRTSIM_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop

            return uvloop.run
        except ImportError:
            pass
    import asyncio

    return asyncio.run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--version", "-version"):
        print("QEMU emulator version 7.2.22 (virtsim)")
        return 0
    try:
        cfg, proc = parse_args(argv)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    signals = SignalWatcher()
    ready_fd = _daemonize() if proc["daemonize"] else None
    if ready_fd is not None:
        signals = SignalWatcher()  # the watcher thread does not survive fork()
    for spec in cfg.monitors:
        if spec.kind == "unix":
            spec.path = os.path.abspath(spec.path)  # unlinked correctly after chdir("/")
    if proc["pidfile"]:
        try:
            proc["pidfile_fd"] = _write_pidfile(proc["pidfile"])
        except UsageError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            if ready_fd is not None:
                os.write(ready_fd, b"\1")
            return 1
        proc["pidfile"] = os.path.abspath(proc["pidfile"])
    greeter = None
    if (cfg.monitors and not (cfg.blockdevs or cfg.drives or cfg.devices or cfg.agent_channels)
            and os.environ.get("VIRTSIM_EARLY_GREETING", "1") != "0"):
        greeting = greeting_bytes(cfg.version)
        if greeting is not None:
            try:
                greeter = EarlyGreeter(cfg.monitors, greeting)
            except UsageError as e:
                print(f"{PROG}: {e}", file=sys.stderr)
                return 1
    try:
        status: int = _loop_runner()(_run(cfg, proc, ready_fd, greeter, signals))
        return status
    except SimError as e:
        print(f"{PROG}: {e.desc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
