"""The QEMU guest agent, as libvirt's qemu driver reaches it (qemu_agent.c, and the checks
of qemuDomainAgentAvailable), for fsFreeze/fsThaw and QUIESCE.

A domain whose XML has the ``org.qemu.guest_agent.0`` virtio channel gets a chardev socket
in its run directory (``launch.command_line``).  Before every agent call the domain must
be running and the guest must have opened its end of the port (``query-chardev``'s
``frontend-open``, which a real QEMU with no guest OS never reports): otherwise the call
fails at once with libvirt's error, instead of waiting on a guest that is not there.
Then the client syncs (``0xFF`` + ``guest-sync-delimited`` with a fresh id; stale replies
and garbage before the sentinel are skipped) within 5 s, and sends the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
from typing import TYPE_CHECKING, Any

from . import constants as c
from . import errors as E

if TYPE_CHECKING:
    from .driver import DomainObj, Driver

#: the channel's socket name in the domain's run directory (libvirt names it the same)
AGENT_SOCKET = "org.qemu.guest_agent.0"
#: libvirt's aliases for the first guest agent channel
AGENT_CHARDEV = "charchannel0"
AGENT_PORT = "channel0"
#: QEMU_AGENT_WAIT_TIME: how long a guest-sync may take
SYNC_TIMEOUT = 5.0
SENTINEL = b"\xff"

NOT_CONFIGURED = E.ErrorTemplate(c.VIR_ERR_ARGUMENT_UNSUPPORTED, E.Q,
                                 "QEMU guest agent is not configured")
NOT_CONNECTED = E.ErrorTemplate(c.VIR_ERR_AGENT_UNRESPONSIVE, E.Q,
                                "QEMU guest agent is not connected")
NOT_AVAILABLE = E.ErrorTemplate(c.VIR_ERR_AGENT_UNRESPONSIVE, E.Q,
                                "Guest agent not available for now")
DISAPPEARED = E.ErrorTemplate(c.VIR_ERR_AGENT_UNRESPONSIVE, E.Q,
                              "Guest agent disappeared while executing command")
NOT_RUNNING = E.ErrorTemplate(c.VIR_ERR_OPERATION_INVALID, E.Q, "domain is not running")
COMMAND_FAILED = E.ErrorTemplate(c.VIR_ERR_INTERNAL_ERROR, E.Q,
                                 "unable to execute QEMU agent command '%s': %s")
COMMAND_NO_RETURN = E.ErrorTemplate(c.VIR_ERR_INTERNAL_ERROR, E.Q,
                                    "unable to execute QEMU agent command '%s'")
MALFORMED = E.ErrorTemplate(c.VIR_ERR_INTERNAL_ERROR, E.Q, "malformed return value")
THAW_MOUNTPOINTS = E.ErrorTemplate(c.VIR_ERR_ARGUMENT_UNSUPPORTED, E.Q,
                                   "specifying mountpoints is not supported")


def socket_path(rundir: str) -> str:
    return os.path.join(rundir, AGENT_SOCKET)


def channel_argv(rundir: str) -> list[str]:
    """The channel as libvirt puts it on QEMU's command line (chardev by path)."""
    return ["-chardev", f"socket,id={AGENT_CHARDEV},path={socket_path(rundir)},"
                        "server=on,wait=off",
            "-device", "virtio-serial-pci,id=virtio-serial0",
            "-device", f"virtserialport,bus=virtio-serial0.0,nr=1,chardev={AGENT_CHARDEV},"
                       f"id={AGENT_PORT},name={AGENT_SOCKET}"]


class AgentClient:
    """One connection to a guest agent socket, speaking QGA like libvirt's qemuAgent."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._buf = b""

    async def __aenter__(self) -> AgentClient:
        try:
            self.reader, self.writer = await asyncio.open_unix_connection(self.path)
        except OSError:
            raise NOT_CONNECTED() from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _line(self) -> bytes:
        """The next reply line; an EOF means the agent went away."""
        assert self.reader is not None
        while b"\n" not in self._buf:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise DISAPPEARED()
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def sync(self, timeout: float = SYNC_TIMEOUT) -> None:
        """Flush the agent's parser (0xFF), then guest-sync-delimited with a fresh id and
        skip everything until the reply that carries it."""
        sync_id = random.randrange(1, 1 << 53)
        msg = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        self._send(SENTINEL + json.dumps(msg).encode() + b"\n")

        async def wait() -> None:
            while True:
                line = await self._line()
                if SENTINEL in line:  # the sentinel: what came before it is stale
                    line = line.rsplit(SENTINEL, 1)[1]
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue  # garbage on sync is expected
                if isinstance(reply, dict) and reply.get("return") == sync_id:
                    return

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise NOT_AVAILABLE() from None

    async def command(self, name: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Sync, run ``name``, return its ``return`` value or raise libvirt's error.
        ``timeout`` None blocks like libvirt's default agent timeout."""
        await self.sync(SYNC_TIMEOUT if timeout is None else min(timeout, SYNC_TIMEOUT))
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self._send(json.dumps(msg).encode() + b"\n")

        async def wait() -> dict[str, Any]:
            while True:
                line = await self._line()
                try:
                    reply = json.loads(line.lstrip(SENTINEL))
                except ValueError:
                    continue
                if isinstance(reply, dict) and ("return" in reply or "error" in reply):
                    return reply

        try:
            reply = await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise NOT_AVAILABLE() from None
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            detail = err.get("desc") or _class_text(err.get("class"))
            raise COMMAND_FAILED(name, detail)
        return reply["return"]


def _class_text(klass: Any) -> str:
    """qemuAgentStringifyErrorClass, for errors without a desc."""
    texts = {"CommandNotFound": "The command has not been found",
             "GenericError": "GenericError"}
    return texts.get(klass, klass) if isinstance(klass, str) else "unknown QEMU command error"


async def available(drv: Driver, dom: DomainObj) -> str:
    """qemuDomainAgentAvailable: the agent socket of a running domain whose guest agent
    is connected, else libvirt's error."""
    mon = drv.require_active(dom)
    if dom.state != c.VIR_DOMAIN_RUNNING:
        raise NOT_RUNNING()
    if not dom.defn.guest_agent or dom.rundir is None:
        raise NOT_CONFIGURED()
    try:
        chardevs = await mon.execute("query-chardev")
    except Exception:
        chardevs = []
    if not any(ch.get("label") == AGENT_CHARDEV and ch.get("frontend-open")
               for ch in chardevs):
        raise NOT_CONNECTED()
    return socket_path(dom.rundir)


async def fs_freeze(drv: Driver, dom: DomainObj, mountpoints: list[str] | None = None) -> int:
    """qemuAgentFSFreeze: guest-fsfreeze-freeze, or -freeze-list with mountpoints."""
    path = await available(drv, dom)
    async with AgentClient(path) as agent:
        if mountpoints:
            ret = await agent.command("guest-fsfreeze-freeze-list",
                                      {"mountpoints": list(mountpoints)})
        else:
            ret = await agent.command("guest-fsfreeze-freeze")
    if not isinstance(ret, int) or isinstance(ret, bool):
        raise MALFORMED()
    dom.frozen = dom.frozen or ret > 0
    return ret


async def fs_thaw(drv: Driver, dom: DomainObj) -> int:
    """qemuAgentFSThaw: guest-fsfreeze-thaw, the number of filesystems thawed."""
    path = await available(drv, dom)
    async with AgentClient(path) as agent:
        ret = await agent.command("guest-fsfreeze-thaw")
    if not isinstance(ret, int) or isinstance(ret, bool):
        raise MALFORMED()
    dom.frozen = False
    return ret


async def quiesce_thaw(drv: Driver, dom: DomainObj) -> None:
    """The thaw after a QUIESCE'd transaction (qemuSnapshotFSThaw(vm, report)): its
    errors surface only when nothing else failed, so a failed transaction keeps its own
    error."""
    failing = sys.exc_info()[1] is not None
    try:
        await fs_thaw(drv, dom)
    except Exception:
        if not failing:
            raise
