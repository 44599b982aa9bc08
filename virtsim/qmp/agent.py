"""The simulated guest's QEMU Guest Agent, behind a ``virtserialport`` chardev socket.

Backup tools quiesce a guest through qemu-ga (``guest-fsfreeze-freeze`` before the
checkpoint/backup transaction, ``guest-fsfreeze-thaw`` after), and libvirt decides whether
an agent is there at all from the port's state (``VSERPORT_CHANGE``, ``query-chardev``'s
``frontend-open``).  So this module plays both halves a real host has: the chardev socket
the host connects to, and a guest whose qemu-ga opens the port once the VM runs and then
answers the QGA protocol with qemu-ga 7.2's texts (line-delimited JSON replies, the 0xFF
sentinel of ``guest-sync-delimited``, commands disabled while frozen).

While the guest is frozen, simulated guest writes (``x-virtsim-guest-workload``) wait
for the thaw; host-side I/O (HMP ``qemu-io``, block jobs, NBD) is unaffected, as in QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..sim.errors import SimError
from ..sim.qjson import dumps
from .jsonstream import JsonParseError, JsonStreamParser

if TYPE_CHECKING:
    from .config import AgentChannelSpec
    from .emulator import Emulator

SENTINEL = b"\xff"
FROZEN_MSG = "the agent is in frozen state"
#: what qemu-ga keeps enabled while frozen (qga/main.c's freeze allow-list)
FREEZE_ALLOWED = frozenset({"guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
                            "guest-fsfreeze-status", "guest-fsfreeze-thaw"})


class Filesystem:
    """One mounted guest filesystem on one guest disk."""

    def __init__(self, name: str, mountpoint: str, disk_id: str, bus_type: str,
                 size: int, unit: int) -> None:
        self.name = name
        self.mountpoint = mountpoint
        self.disk_id = disk_id
        self.bus_type = bus_type
        self.size = size
        self.unit = unit
        self.frozen = False


class GuestAgent:
    """qemu-ga inside the simulated guest, and the host end of its port."""

    def __init__(self, emu: Emulator, spec: AgentChannelSpec) -> None:
        self.emu = emu
        self.spec = spec
        self.port_open = False        # the guest opened its end (VSERPORT_CHANGE open)
        self.frozen = False           # ga_is_frozen()
        self._fs: list[Filesystem] | None = None
        self._after_thaw: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self.server: asyncio.AbstractServer | None = None
        self.active: AgentSession | None = None
        self.waiting: list[AgentSession] = []

    # ----- the guest ---------------------------------------------------------------------
    def filesystems(self) -> list[Filesystem]:
        """One filesystem per guest disk, fixed at first use (the guest's mount table):
        the first disk holds ``/``, the others ``/mnt/<device id>``."""
        if self._fs is None:
            self._fs = []
            counters: dict[str, int] = {}
            for did, blk in self.emu.devices.items():
                node = blk.root
                if node is None:
                    continue
                qdev = blk.qdev or ""
                bus = "virtio" if qdev.endswith("/virtio-backend") else "scsi"
                prefix = "vd" if bus == "virtio" else "sd"
                n = counters.get(prefix, 0)
                counters[prefix] = n + 1
                dev = f"{prefix}{chr(ord('a') + n % 26)}1"
                mount = "/" if not self._fs else f"/mnt/{did.rsplit('/', 1)[-1]}"
                self._fs.append(Filesystem(dev, mount, did, bus, node.length(), n))
        return self._fs

    def guest_state_changed(self) -> None:
        """The VM started or stopped running: a booted guest's qemu-ga opens its port
        (once, after the command that started the VM has been answered) and serves
        requests only while the VM runs."""
        running = self.emu.run_state == "running"
        if running and not self.port_open and self.emu.config.guest_agent:
            asyncio.get_running_loop().call_soon(self._open_port)
        if self.active is not None:
            self.active.update_reading()

    def _open_port(self) -> None:
        if self.port_open or self.emu.run_state != "running":
            return
        self.port_open = True
        self.emu.bus.emit("VSERPORT_CHANGE", {"id": self.spec.port_id or "", "open": True})
        if self.active is not None:
            self.active.update_reading()

    @property
    def serving(self) -> bool:
        return self.port_open and self.emu.run_state == "running"

    def after_thaw(self, work: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``work`` (a guest write) once the filesystems thaw; its outcome resolves
        the returned future."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._after_thaw.append((work, fut))
        return fut

    def _release_writes(self) -> None:
        pending, self._after_thaw = self._after_thaw, []
        for work, fut in pending:
            if fut.done():
                continue
            try:
                fut.set_result(work())
            except SimError as e:
                fut.set_exception(e)

    # ----- QGA commands ----------------------------------------------------------------
    def _freeze(self, mountpoints: list[str] | None) -> int:
        self.frozen = True  # ga_set_frozen(): set before any FIFREEZE
        count = 0
        for fs in reversed(self.filesystems()):  # reverse mount order, as qemu-ga
            if mountpoints is not None and fs.mountpoint not in mountpoints:
                continue
            fs.frozen = True
            count += 1
        if count == 0:
            self.frozen = False  # nothing frozen: qemu-ga unsets the frozen state
        return count

    def _thaw(self) -> int:
        count = 0
        for fs in self.filesystems():
            if fs.frozen:
                fs.frozen = False
                count += 1
        self.frozen = False
        self._release_writes()
        return count

    def _info(self) -> dict[str, Any]:
        q = self.emu.version_info()["qemu"]
        cmds = [{"enabled": self._enabled(name), "name": name, "success-response": True}
                for name in sorted(_COMMANDS)]
        return {"version": f"{q['major']}.{q['minor']}.{q['micro']}",
                "supported_commands": cmds}

    def _fsinfo(self) -> list[dict[str, Any]]:
        out = []
        for i, fs in enumerate(self.filesystems()):
            addr: dict[str, Any] = {
                "pci-controller": {"domain": 0, "bus": 0, "slot": 4 + i, "function": 0},
                "bus-type": fs.bus_type, "bus": 0, "target": 0, "unit": 0,
                "dev": f"/dev/{fs.name[:-1]}"}
            used = fs.size // 4
            out.append({"name": fs.name, "mountpoint": fs.mountpoint, "type": "ext4",
                        "used-bytes": used, "total-bytes": fs.size, "disk": [addr]})
        return out

    def _enabled(self, name: str) -> bool:
        return not self.frozen or name in FREEZE_ALLOWED

    def execute(self, name: str, args: dict[str, Any], session: AgentSession) -> Any:
        """One validated-by-name command: its ``return`` value, or SimError."""
        spec = _COMMANDS[name]
        _check_args(args, spec)
        if name in ("guest-sync", "guest-sync-delimited"):
            if name == "guest-sync-delimited":
                session.delimit_next = True
            return args["id"]
        if name == "guest-ping":
            return None
        if name == "guest-info":
            return self._info()
        if name == "guest-fsfreeze-status":
            return "frozen" if self.frozen else "thawed"
        if name == "guest-fsfreeze-freeze":
            return self._freeze(None)
        if name == "guest-fsfreeze-freeze-list":
            return self._freeze(args.get("mountpoints"))
        if name == "guest-fsfreeze-thaw":
            return self._thaw()
        if name == "guest-get-fsinfo":
            return self._fsinfo()
        raise AssertionError(name)  # pragma: no cover - _COMMANDS and this list agree

    # ----- the chardev socket ----------------------------------------------------------
    async def start(self) -> None:
        """Listen on the chardev's socket (server=on,wait=off): the host may connect at
        any time; bytes it sends before the guest opens the port wait in the socket."""
        from .emulator import StartupError

        spec = self.spec.socket
        loop = asyncio.get_running_loop()
        try:
            if spec.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spec.path)
                self.server = await loop.create_unix_server(lambda: AgentSession(self),
                                                            spec.path)
            else:
                self.server = await loop.create_server(lambda: AgentSession(self),
                                                       spec.host, spec.port)
        except OSError as e:
            what = spec.path if spec.kind == "unix" else f"{spec.host}:{spec.port}"
            raise StartupError(f"-chardev {self.spec.arg}: Failed to bind socket to {what}: "
                               f"{e.strerror}") from None

    async def close(self) -> None:
        for _work, fut in self._after_thaw:
            fut.cancel()
        self._after_thaw.clear()
        if self.server is None:
            return
        self.server.close()
        for sess in [self.active, *self.waiting]:
            if sess is not None and sess.transport is not None:
                sess.transport.close()
        with contextlib.suppress(Exception):
            await self.server.wait_closed()
        self.server = None
        if self.spec.socket.kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spec.socket.path)

    def chardev_info(self) -> dict[str, Any]:
        """This chardev's ``query-chardev`` entry (QEMU prefixes the filename with
        ``disconnected:`` while no host client is attached)."""
        spec = self.spec.socket
        where = (f"unix:{spec.path}" if spec.kind == "unix"
                 else f"tcp:{spec.host}:{spec.port}")
        prefix = "" if self.active is not None else "disconnected:"
        return {"frontend-open": self.port_open, "filename": f"{prefix}{where},server=on",
                "label": self.spec.chardev}

    def _arrived(self, sess: AgentSession) -> None:
        if self.active is None:
            self.active = sess
        else:
            self.waiting.append(sess)  # a chardev socket serves one client at a time
        sess.update_reading()

    def _left(self, sess: AgentSession) -> None:
        if sess in self.waiting:
            self.waiting.remove(sess)
        if self.active is sess:
            self.active = self.waiting.pop(0) if self.waiting else None
            if self.active is not None:
                self.active.update_reading()


class AgentSession(asyncio.Protocol):
    """One host connection to the agent's chardev socket."""

    def __init__(self, agent: GuestAgent) -> None:
        self.agent = agent
        self.transport: asyncio.Transport | None = None
        self.parser = JsonStreamParser()
        self.delimit_next = False
        self._reading = True
        self._held: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.agent._arrived(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent._left(self)
        self.transport = None

    def _may_read(self) -> bool:
        return self.agent.active is self and self.agent.serving

    def update_reading(self) -> None:
        """Read only while this client owns the chardev and the guest's qemu-ga runs
        (otherwise QEMU does not take bytes off the socket: they wait there)."""
        if self.transport is None:
            return
        if not self._may_read():
            self._reading = False
            self.transport.pause_reading()
            return
        held, self._held = self._held, []
        for chunk in held:
            self._serve(chunk)
        if not self._reading:
            self._reading = True
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        # Python 3.11 starts reading right after connection_made() even if it paused:
        # bytes that arrive while the port is closed are kept, as the socket would
        if self._held or not self._may_read():
            self._held.append(data)
            self.update_reading()
            return
        self._serve(data)

    def _serve(self, data: bytes) -> None:
        for item in self.parser.feed(data):
            if isinstance(item, JsonParseError):
                self._send({"error": {"class": "GenericError", "desc": item.desc}})
            else:
                self._send(self._dispatch(item))

    def _send(self, msg: dict[str, Any]) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        line = dumps(msg).encode("utf-8") + b"\n"
        if self.delimit_next:
            self.delimit_next = False
            line = SENTINEL + line
        self.transport.write(line)

    def _dispatch(self, msg: Any) -> dict[str, Any]:
        """qmp_dispatch() as qemu-ga calls it (no OOB): request checks, then the command."""
        has_id = isinstance(msg, dict) and "id" in msg
        try:
            value = self._run(msg)
        except SimError as e:
            out: dict[str, Any] = {"error": {"class": e.error_class, "desc": e.desc}}
        else:
            out = {"return": {} if value is None else value}
        if has_id:
            out["id"] = msg["id"]
        return out

    def _run(self, msg: Any) -> Any:
        if not isinstance(msg, dict):
            raise SimError("QMP input must be a JSON object")
        for key, value in msg.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise SimError("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise SimError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise SimError(f"QMP input member '{key}' is unexpected")
        name = msg.get("execute")
        if name is None:
            raise SimError("QMP input lacks member 'execute'")
        if name not in _COMMANDS:
            raise SimError(f"The command {name} has not been found", "CommandNotFound")
        if not self.agent._enabled(name):
            raise SimError(f"Command {name} has been disabled: {FROZEN_MSG}",
                           "CommandNotFound")
        return self.agent.execute(name, msg.get("arguments", {}), self)


# command -> {argument: (QAPI type, required)}
_COMMANDS: dict[str, dict[str, tuple[str, bool]]] = {
    "guest-sync-delimited": {"id": ("int", True)},
    "guest-sync": {"id": ("int", True)},
    "guest-ping": {},
    "guest-info": {},
    "guest-fsfreeze-status": {},
    "guest-fsfreeze-freeze": {},
    "guest-fsfreeze-freeze-list": {"mountpoints": ("[str]", False)},
    "guest-fsfreeze-thaw": {},
    "guest-get-fsinfo": {},
}

_TYPE_NAMES = {"int": "integer", "[str]": "array", "str": "string"}


def _check_args(args: dict[str, Any], spec: dict[str, tuple[str, bool]]) -> None:
    """The QAPI input visitor's checks and texts for the few argument shapes used here."""
    for key, (typ, required) in spec.items():
        if key not in args:
            if required:
                raise SimError(f"Parameter '{key}' is missing")
            continue
        value = args[key]
        ok = (isinstance(value, int) and not isinstance(value, bool)) if typ == "int" \
            else isinstance(value, list)
        if not ok:
            raise SimError(f"Invalid parameter type for '{key}', expected: "
                           f"{_TYPE_NAMES[typ]}")
        if typ == "[str]":
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise SimError(f"Invalid parameter type for '{key}[{i}]', expected: "
                                   f"string")
    for key in args:
        if key not in spec:
            raise SimError(f"Parameter '{key}' is unexpected")
