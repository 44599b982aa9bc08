"""One QMP monitor connection as a sans-I/O state machine (QEMU 7.2 monitor/qmp.c, qmp-dispatch.c).

Why: everything QEMU decides before a command handler runs (JSON errors, request shape,
capabilities negotiation, OOB rules, command lookup, ``qmp_capabilities`` itself) is answered
here with QEMU's exact texts, so the dispatcher only ever sees well-formed requests for commands
that exist.  Output keeps QEMU's ordering: replies leave in request order, while events and OOB
replies overtake in-band work that has not been answered yet, as they do in QEMU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from virtsim.qmp.jsonstream import JsonParseError, JsonStreamParser
from virtsim.sim.errors import SimError
from virtsim.sim.qdict import qdict_order
from virtsim.sim.qjson import dumps

__all__ = [
    "QmpServerProtocol",
    "QmpState",
    "Request",
    "encode_message",
]


class QmpState(StrEnum):
    """Monitor mode: before ``qmp_capabilities`` only that command exists and events are muted."""

    NEGOTIATING = "negotiating"
    COMMAND = "command"


@dataclass(eq=False)
class Request:
    """A well-formed request for an existing command; the dispatcher validates ``arguments``.

    ``arguments`` is the parsed dict in wire order (``{}`` when absent), which the QAPI visitor
    emulation needs to reproduce QEMU's choice of error.  Identity-hashed: one reply per object.
    """

    name: str
    arguments: dict[str, Any]
    id: Any
    has_id: bool
    oob: bool


class _Entry:
    """Output not written yet: a reply still being computed, or bytes that must wait for one.

    In QEMU the I/O thread answers OOB requests while parsing, and the main thread answers
    in-band work in order.  So an in-band entry waits for every earlier entry, and an
    ``immediate`` one (OOB traffic) only for earlier immediate entries.
    """

    __slots__ = ("data", "immediate")

    def __init__(self, data: bytes | None, immediate: bool) -> None:
        self.data = data
        self.immediate = immediate


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One QMP message as QEMU writes it: compact JSON in QDict key order, then CRLF."""
    return dumps(message).encode("ascii") + b"\r\n"


def _return_message(value: Any, req_id: Any, has_id: bool) -> bytes:
    """A success reply; QEMU supplies ``{}`` when a command returns nothing."""
    msg: dict[str, Any] = {"return": {} if value is None else value}
    if has_id:
        msg["id"] = req_id
    return encode_message(msg)


def _error_message(error_class: str, desc: str, req_id: Any, has_id: bool) -> bytes:
    """qmp_error_response() plus the id QEMU adds when the request had one."""
    msg: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        msg["id"] = req_id
    return encode_message(msg)


class _Answered(Exception):
    """The request was rejected inside the core with this QMP error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def _generic(desc: str) -> _Answered:
    return _Answered("GenericError", desc)


class QmpServerProtocol:
    """The QMP server side of one client connection: bytes in, requests out, bytes back.

    Feed received bytes to ``receive_data``; dispatch the returned requests (in order) and
    answer each exactly once with ``send_return``/``send_error``; push ``data_to_send()`` to
    the peer whenever it is non-empty.  Call ``close()`` when the connection ends.
    ``has_command(name)`` says whether a command exists (``qmp_capabilities`` is handled here
    regardless); ``allows_oob(name)`` whether it may run under ``exec-oob``.
    """

    def __init__(
        self,
        version: Mapping[str, Any],
        capabilities: tuple[str, ...] | list[str] = ("oob",),
        *,
        has_command: Callable[[str], bool] = lambda _name: False,
        allows_oob: Callable[[str], bool] = lambda _name: False,
    ) -> None:
        qemu = version["qemu"]
        # Rebuilt in QAPI schema order (major, minor, micro): the writer's QDict order depends
        # on insertion order for keys sharing a bucket, and QEMU inserts in schema order.
        self.version: dict[str, Any] = {
            "qemu": {"major": qemu["major"], "minor": qemu["minor"], "micro": qemu["micro"]},
            "package": version["package"],
        }
        self.capabilities: tuple[str, ...] = tuple(capabilities)
        self._has_command = has_command
        self._allows_oob = allows_oob
        self.state = QmpState.NEGOTIATING
        self.oob_enabled = False
        self.closed = False
        self._parser = JsonStreamParser()
        self._ready = bytearray()
        self._pending: deque[_Entry] = deque()
        self._pending_immediate = 0
        self._slots: dict[Request, _Entry] = {}
        self._detached: set[Request] = set()

    # -- output ------------------------------------------------------------------------------

    def greeting(self) -> bytes:
        """The banner QEMU sends on connect (monitor/qmp.c qmp_greeting())."""
        return encode_message(
            {"QMP": {"version": self.version, "capabilities": list(self.capabilities)}}
        )

    def data_to_send(self) -> bytes:
        """Drain bytes that may go to the peer now (replies stay in request order)."""
        out = bytes(self._ready)
        self._ready.clear()
        return out

    def _push(self, data: bytes | None, immediate: bool) -> _Entry | None:
        """Write ``data`` now if nothing it must wait for is pending, else queue it."""
        if data is not None and not (self._pending_immediate if immediate else self._pending):
            self._ready += data
            return None
        entry = _Entry(data, immediate)
        self._pending.append(entry)
        self._pending_immediate += immediate
        return entry

    def _in_band(self, data: bytes) -> None:
        self._push(data, False)

    def _immediate(self, data: bytes) -> None:
        self._push(data, True)

    def _reply(self, req: Request, data: bytes) -> None:
        if self.closed:
            return
        entry = self._slots.pop(req, None)
        if entry is None:
            raise RuntimeError(f"request {req.name!r} already answered or not from this monitor")
        entry.data = data
        if req in self._detached:
            self._detached.discard(req)
            self._ready += data
            return
        self._release()

    def detach(self, req: Request) -> None:
        """Let later replies overtake ``req``, whose answer waits on the simulated guest
        (a virtsim extension: in QEMU no in-band command waits on the guest)."""
        entry = self._slots.get(req)
        if entry is None or entry not in self._pending:
            return
        self._pending.remove(entry)
        self._pending_immediate -= entry.immediate
        self._detached.add(req)
        self._release()

    def _release(self) -> None:
        """Write every queued entry that no longer waits for an unanswered one."""
        blocked_any = blocked_immediate = False
        kept: deque[_Entry] = deque()
        for item in self._pending:
            waits = blocked_immediate if item.immediate else blocked_any
            if item.data is not None and not waits:
                self._ready += item.data
                self._pending_immediate -= item.immediate
            else:
                kept.append(item)
                blocked_any = True
                blocked_immediate |= item.immediate
        self._pending = kept

    def send_return(self, req: Request, value: Any = None) -> None:
        """Answer ``req`` with success; None means "no return data" and becomes ``{}``."""
        self._reply(req, _return_message(value, req.id, req.has_id))

    def send_error(self, req: Request, error_class: str, desc: str) -> None:
        """Answer ``req`` with ``{"id": ..., "error": {"class": ..., "desc": ...}}``."""
        self._reply(req, _error_message(error_class, desc, req.id, req.has_id))

    def send_event(
        self, name: str, data: Mapping[str, Any] | None, timestamp: tuple[int, int]
    ) -> None:
        """Emit an event now; dropped while negotiating, exactly like QEMU."""
        if self.closed or self.state is QmpState.NEGOTIATING:
            return
        msg: dict[str, Any] = {
            "event": name,
            "timestamp": {"seconds": timestamp[0], "microseconds": timestamp[1]},
        }
        if data is not None:
            msg["data"] = data
        self._ready += encode_message(msg)  # events go out the moment they happen

    def close(self) -> None:
        """The connection is gone: drop partial input, pending replies and output."""
        self.closed = True
        self._parser.reset()
        self._ready.clear()
        self._pending.clear()
        self._pending_immediate = 0
        self._slots.clear()
        self._detached.clear()

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Request]:
        """Parse ``data``; answer protocol-level errors here, return requests to dispatch."""
        if self.closed:
            return []
        requests: list[Request] = []
        for item in self._parser.feed(data):
            if isinstance(item, JsonParseError):
                self._in_band(_error_message("GenericError", item.desc, None, False))
                continue
            req = self._handle(item)
            if req is None:
                continue
            entry = self._push(None, req.oob)
            assert entry is not None
            self._slots[req] = entry
            requests.append(req)
        return requests

    def _handle(self, msg: Any) -> Request | None:
        """handle_qmp_command() + qmp_dispatch() up to the command handler."""
        if not isinstance(msg, dict):
            self._in_band(_error_message("GenericError", "QMP input must be a JSON object",
                                         None, False))
            return None
        # qmp_is_oob(): such requests skip the in-band queue (only observable with OOB on;
        # without it QEMU would not even have read them while earlier requests run).
        emit = (
            self._immediate
            if self.oob_enabled and "exec-oob" in msg and "execute" not in msg
            else self._in_band
        )
        has_id = "id" in msg
        req_id = msg.get("id")
        try:
            return self._dispatch(msg, req_id, has_id)
        except _Answered as exc:
            emit(_error_message(exc.error_class, exc.desc, req_id, has_id))
            return None

    def _dispatch(self, msg: dict[str, Any], req_id: Any, has_id: bool) -> Request | None:
        allow_oob = self.oob_enabled
        exec_key: str | None = None
        for key in qdict_order(msg):  # qmp_dispatch_check_obj() walks the QDict
            value = msg[key]
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    raise _generic(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise _generic(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise _generic("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise _generic(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise _generic("QMP input lacks member 'execute'")
        name: str = msg[exec_key]
        oob = exec_key == "exec-oob"
        arguments: dict[str, Any] = msg.get("arguments", {})

        if self.state is QmpState.NEGOTIATING:
            if name != "qmp_capabilities":
                raise _Answered("CommandNotFound",
                                "Expecting capabilities negotiation with 'qmp_capabilities'")
            self._qmp_capabilities(arguments)
            self._in_band(_return_message(None, req_id, has_id))
            return None

        if name == "qmp_capabilities":
            if oob:
                raise _generic("The command qmp_capabilities does not support OOB")
            self._qmp_capabilities(arguments)  # its arguments are checked before the mode
            raise _Answered("CommandNotFound",
                            "Capabilities negotiation is already complete, command ignored")
        if not self._has_command(name):
            raise _Answered("CommandNotFound", f"The command {name} has not been found")
        if oob and not self._allows_oob(name):
            raise _generic(f"The command {name} does not support OOB")
        return Request(name=name, arguments=arguments, id=req_id, has_id=has_id, oob=oob)

    def _qmp_capabilities(self, arguments: dict[str, Any]) -> None:
        """monitor/qmp-cmds-control.c: arguments are unmarshalled first, then the mode checked."""
        try:
            from virtsim.qmp import schema  # lazily: not needed before the first request

            schema.validate("qmp_capabilities", arguments)
        except SimError as exc:
            raise _Answered(exc.error_class, exc.desc) from None
        if self.state is QmpState.COMMAND:
            return
        enabled: list[str] = arguments.get("enable", [])
        unavailable = [cap for cap in enabled if cap not in self.capabilities]
        if unavailable:
            raise _generic(f"Capability {', '.join(unavailable)} not available")
        self.oob_enabled = "oob" in enabled
        self.state = QmpState.COMMAND
