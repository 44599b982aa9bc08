"""The NBD server and block exports: ``nbd-server-start/stop``, ``block-export-add/del``,
``query-block-exports`` and the deprecated ``nbd-server-add/remove``.

Checks run in QEMU 7.2's order (``blk_exp_add`` then ``nbd_export_create``) with its
texts.  An export holds its node through an anonymous BlockBackend (consistent-read, plus
write when writable; resize unshared), marks its bitmaps busy, and is deleted once it is
asked to shut down and its last client has gone; then BLOCK_EXPORT_DELETED follows.
Creating and destroying that BlockBackend drains the node, so running jobs on it show the
paused/running pairs QEMU shows.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import TYPE_CHECKING, Any

from ...nbd.export import NbdExport
from ...nbd.server import DEFAULT_MAX_CONNECTIONS, NbdServer
from ...sim import perm as P
from ...sim.bitmap import CHECK_ALLOW_RO, DirtyBitmap, check_bitmap
from ...sim.bitmap_ops import lookup as bitmap_lookup
from ...sim.block import id_wellformed
from ...sim.errors import SimError
from . import command
from .hmp import _drain_jobs
from .objects import TLS_TYPES, peer_dn

if TYPE_CHECKING:
    from ...sim.block import Node
    from ..emulator import Emulator

MAX_STRING_SIZE = 4096


def _server(emu: Emulator) -> NbdServer | None:
    srv = emu.nbd_server
    assert srv is None or isinstance(srv, NbdServer)
    return srv


# ------------------------------------------------------------------------------------------
# nbd-server-start / nbd-server-stop
# ------------------------------------------------------------------------------------------
@command("nbd-server-start")
def nbd_server_start(emu: Emulator, a: dict[str, Any]) -> Any:
    if emu.nbd_server is not None:
        raise SimError("NBD server already running")
    addr = a["addr"]
    kind, data = addr["type"], addr["data"]
    max_conn = a.get("max-connections", DEFAULT_MAX_CONNECTIONS)
    srv = NbdServer(max_connections=max_conn, warn=emu.graph.warn,
                    on_client_gone=lambda exp: _client_gone(emu, exp))
    try:
        if kind == "unix":
            srv.listen_unix(data["path"])
        elif kind == "inet":
            family = _inet_family(data)
            srv.listen_inet(data["host"], data["port"], family == socket.AF_INET or None,
                            family == socket.AF_INET6 or None)
        elif kind == "fd":
            raise SimError(f"File descriptor named '{data['str']}' has not been found")
        else:
            srv._serve(_vsock_listener(data["cid"], data["port"]))
    except OSError as e:
        raise SimError(e.strerror or str(e)) from None
    try:
        if "tls-creds" in a:
            srv.tls = _tls_context(emu, a["tls-creds"])
            if "tls-authz" in a:
                srv.tls_check = _Authz(emu, a["tls-authz"]).check
    except SimError:
        srv.close()
        raise
    emu.nbd_server = srv
    return {}


def _inet_family(data: dict[str, Any]) -> int:
    """inet_ai_family_from_address: what the ipv4/ipv6 flags leave to getaddrinfo."""
    v4, v6 = data.get("ipv4"), data.get("ipv6")
    if v4 is False and v6 is False:
        raise SimError("Cannot disable IPv4 and IPv6 at same time")
    if v4 and v6:
        return socket.AF_UNSPEC
    if v6 or v4 is False:
        return socket.AF_INET6
    if v4 or v6 is False:
        return socket.AF_INET
    return socket.AF_UNSPEC


def _vsock_listener(cid: str, port: str) -> socket.socket:
    """vsock_listen_saddr: parse, bind, listen (the kernel decides which cids work)."""
    def number(text: str, what: str) -> int:
        if not text.isdigit() or int(text) > 0xFFFFFFFF:
            raise SimError(f"Failed to parse {what} '{text}'")
        return int(text)

    addr = (number(cid, "cid"), number(port, "port"))
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as e:
        raise SimError(f"Failed to create socket: {os.strerror(e.errno or 0)}") from None
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise SimError(f"Failed to bind socket: {os.strerror(e.errno or 0)}") from None
    try:
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise SimError(f"Failed to listen on socket: {os.strerror(e.errno or 0)}") from None
    return sock


def _tls_context(emu: Emulator, creds: str) -> Any:
    obj = emu.objects.get(creds)
    if obj is None:
        raise SimError(f"No TLS credentials with id '{creds}'")
    if obj.qom_type not in TLS_TYPES:
        raise SimError(f"Object with id '{creds}' is not TLS credentials")
    if obj.endpoint != "server":
        raise SimError("Expected TLS credentials for a server endpoint")
    assert obj.ssl_context is not None
    return obj.ssl_context


class _Authz:
    """The ``tls-authz`` check QEMU runs once the TLS handshake is done."""

    def __init__(self, emu: Emulator, authz: str) -> None:
        self.emu, self.authz = emu, authz

    def check(self, peercert: dict[str, Any] | None) -> str | None:
        dn = peer_dn(peercert or {})
        obj = self.emu.objects.get(self.authz)
        if obj is None:
            return f"Cannot find QAuthZ object ID {self.authz}"
        if obj.qom_type == "authz-simple" and obj.props.get("identity") == dn:
            return None
        if obj.qom_type == "authz-list":
            from fnmatch import fnmatchcase

            for rule in obj.props.get("rules", []):
                glob = rule.get("format") == "glob"
                if (fnmatchcase(dn, rule["match"]) if glob else dn == rule["match"]):
                    return None if rule["policy"] == "allow" else \
                        f"TLS x509 authz check for {dn} is denied"
            if obj.props.get("policy", "deny") == "allow":
                return None
        return f"TLS x509 authz check for {dn} is denied"


@command("nbd-server-stop")
def nbd_server_stop(emu: Emulator, a: dict[str, Any]) -> Any:
    srv = _server(emu)
    if srv is None:
        raise SimError("NBD server not running")
    # blk_exp_close_all_type: every NBD export goes, clients dropped; the deletions
    # (and their events) come oldest export first
    for exp in list(emu.block_exports.values()):
        if isinstance(exp, NbdExport):
            _request_shutdown(emu, exp, now=True)
    srv.close()
    emu.nbd_server = None
    return {}


def stop_server(emu: Emulator) -> None:
    """Emulator shutdown: drop the server and its exports without events."""
    srv = _server(emu)
    if srv is not None:
        srv.close()
        emu.nbd_server = None
    for exp in list(emu.block_exports.values()):
        _release(emu, exp, drain=False)
    emu.block_exports.clear()


# ------------------------------------------------------------------------------------------
# block-export-add / nbd-server-add
# ------------------------------------------------------------------------------------------
@command("block-export-add")
def block_export_add(emu: Emulator, a: dict[str, Any]) -> Any:
    if a["type"] not in ("nbd", "vhost-user-blk"):
        raise SimError(f"virtsim: block export type '{a['type']}' is not emulated")
    _add(emu, a)
    return {}


class VhostUserBlkExport:
    """A vhost-user-blk export as far as QMP sees it: it holds its node, listens on its
    socket, shows in query-block-exports and is deleted with an event.  virtsim does not
    speak vhost-user, so a connecting VM gets no answer."""

    type = "vhost-user-blk"

    def __init__(self, export_id: str, node: Node, sock: socket.socket) -> None:
        self.id, self.node, self.sock = export_id, node, sock
        self.shutting_down = False
        self.clients: set[Any] = set()
        self.bitmaps: list[DirtyBitmap] = []
        self.backend: Any = None


def _vhost_user_blk_create(a: dict[str, Any], node: Node) -> VhostUserBlkExport:
    """vu_blk_exp_create: block size, queues, then the listening socket."""
    eid = a["id"]
    lbs = a.get("logical-block-size", 512)
    if lbs < 512 or lbs > 2097152:
        raise SimError(f"Property {eid}.logical-block-size doesn't take value {lbs} "
                       "(minimum: 512, maximum: 2097152)")
    if lbs & (lbs - 1):
        raise SimError(f"Property {eid}.logical-block-size doesn't take value '{lbs}', "
                       "it's not a power of 2")
    if a.get("num-queues", 1) == 0:
        raise SimError("num-queues must be greater than 0")
    addr = a["addr"]
    if addr["type"] != "unix":
        raise SimError("Only socket address types 'unix' and 'fd' are supported")
    path = addr["path"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):
            os.unlink(path)
        sock.bind(path)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise SimError(f"Failed to bind socket to {path}: {e.strerror}") from None
    return VhostUserBlkExport(eid, node, sock)


def _add(emu: Emulator, a: dict[str, Any]) -> NbdExport | VhostUserBlkExport:
    eid = a["id"]
    if not id_wellformed(eid):
        raise SimError("Invalid block export id")
    if eid in emu.block_exports:
        raise SimError(f"Block export id '{eid}' is already in use")
    node = emu.graph.lookup_bs(None, a["node-name"])
    if a.get("iothread") is not None:
        raise SimError(f"iothread \"{a['iothread']}\" not found")
    writable = bool(a.get("writable", False))
    if writable and node.read_only:
        raise SimError("Cannot export read-only node as writable")
    perm = P.CONSISTENT_READ | (P.WRITE if writable else 0)
    blk = emu.graph.temporary_backend(node, perm)
    try:
        if a["type"] == "vhost-user-blk":
            vexp = _vhost_user_blk_create(a, node)
            vexp.backend = blk
            emu.block_exports[vexp.id] = vexp
            return vexp
        return _create(emu, a, node, blk, writable)
    except SimError:
        emu.graph.remove_backend(blk)
        _drain_jobs(emu, node)
        _drain_jobs(emu, node)
        raise


def _create(emu: Emulator, a: dict[str, Any], node: Node, blk: Any,
            writable: bool) -> NbdExport:
    """nbd_export_create."""
    srv = _server(emu)
    if srv is None:
        raise SimError("NBD server not running")
    name = a.get("name", a["node-name"])
    if len(name.encode()) > MAX_STRING_SIZE:
        raise SimError(f"export name '{name}' too long")
    desc = a.get("description")
    if desc is not None and len(desc.encode()) > MAX_STRING_SIZE:
        raise SimError(f"description '{desc}' too long")
    if srv.find_export(name) is not None:
        raise SimError(f"NBD server already has export named '{name}'")
    # no resizing under a client's feet
    emu.graph.update_perms(blk.root_edge, blk.root_edge.perm, P.ALL & ~P.RESIZE)
    bitmaps: list[DirtyBitmap] = []
    frozen: list[bool] = []
    for item in a.get("bitmaps", []):
        holder, bm = _find_bitmap(emu, node, item, writable)
        bitmaps.append(bm)
        # busy while exported, so only recording could change it: not on a read-only node
        frozen.append(not bm.enabled or holder.read_only)
    for bm in bitmaps:
        check_bitmap(bm, CHECK_ALLOW_RO)
    for bm in bitmaps:
        bm.busy = True
    exp = NbdExport(export_id=a["id"], name=name, description=desc, node=node,
                    edge=blk.root_edge, writable=writable,
                    multi_conn=srv.max_connections != 1, bitmaps=bitmaps,
                    bitmap_names=[bm.name or "" for bm in bitmaps], frozen=frozen,
                    allocation_depth=bool(a.get("allocation-depth", False)))
    exp.backend = blk  # type: ignore[attr-defined]
    srv.exports.append(exp)
    emu.block_exports[exp.id] = exp
    return exp


def _find_bitmap(emu: Emulator, node: Node, item: Any,
                 writable: bool) -> tuple[Node, DirtyBitmap]:
    """The bitmap an export names, and the node that holds it."""
    if isinstance(item, dict):
        return bitmap_lookup(emu.graph, item["node"], item["name"])
    bs: Node | None = node
    while bs is not None:
        bm = bs.bitmaps.find(item)
        if bm is not None:
            if not writable and _is_writable(bs) and bm.enabled:
                raise SimError(f"Enabled bitmap '{item}' incompatible with readonly export")
            return bs, bm
        bs = bs.backing or (bs.file if bs.is_filter else None)
    raise SimError(f"Bitmap '{item}' is not found")


def _is_writable(node: Node) -> bool:
    """bdrv_is_writable: opened read-write (whether anyone writes does not matter)."""
    return not node.read_only


@command("nbd-server-add")
def nbd_server_add(emu: Emulator, a: dict[str, Any]) -> Any:
    node = emu.graph.lookup_bs(a["device"], a["device"])
    name = a.get("name", a["device"])
    opts: dict[str, Any] = {"type": "nbd", "id": name, "node-name": node.node_name,
                            "name": name}
    if "description" in a:
        opts["description"] = a["description"]
    if "writable" in a:
        opts["writable"] = a["writable"]
    if "bitmap" in a:
        opts["bitmaps"] = [a["bitmap"]]
    if node.read_only:
        opts["writable"] = False   # the legacy command downgrades instead of failing
    _add(emu, opts)
    return {}


# ------------------------------------------------------------------------------------------
# block-export-del / nbd-server-remove / query-block-exports
# ------------------------------------------------------------------------------------------
@command("block-export-del")
def block_export_del(emu: Emulator, a: dict[str, Any]) -> Any:
    eid = a["id"]
    exp = emu.block_exports.get(eid)
    if exp is None:
        raise SimError(f"Export '{eid}' is not found")
    if exp.shutting_down:
        raise SimError(f"Export '{eid}' is already shutting down")
    if a.get("mode", "safe") == "safe" and exp.clients:
        raise SimError(f"export '{eid}' still in use")
    _request_shutdown(emu, exp)
    return {}


@command("nbd-server-remove")
def nbd_server_remove(emu: Emulator, a: dict[str, Any]) -> Any:
    exp = emu.block_exports.get(a["name"])
    if exp is not None and not isinstance(exp, NbdExport):
        raise SimError(f"Block export '{a['name']}' is not an NBD export")
    return block_export_del(emu, {"id": a["name"], **({"mode": a["mode"]}
                                                       if "mode" in a else {})})


@command("query-block-exports")
def query_block_exports(emu: Emulator, a: dict[str, Any]) -> Any:
    return [{"id": exp.id, "type": "nbd" if isinstance(exp, NbdExport) else exp.type,
             "node-name": exp.node.node_name,
             "shutting-down": exp.shutting_down}
            for exp in reversed(list(emu.block_exports.values()))]


def _request_shutdown(emu: Emulator, exp: NbdExport | VhostUserBlkExport,
                      now: bool = False) -> None:
    """blk_exp_request_shutdown: unlisted at once, deleted when no client holds it."""
    exp.shutting_down = True
    srv = _server(emu)
    if srv is not None and exp in srv.exports:
        srv.exports.remove(exp)
    clients = list(exp.clients)
    for client in clients:
        client.close(hard=True)
    if now:
        exp.clients.clear()
    if not exp.clients:
        _delete(emu, exp)


def _client_gone(emu: Emulator, exp: NbdExport | VhostUserBlkExport) -> None:
    if exp.shutting_down and not exp.clients and exp.id in emu.block_exports:
        _delete(emu, exp)


def _release(emu: Emulator, exp: NbdExport | VhostUserBlkExport, drain: bool) -> None:
    if isinstance(exp, VhostUserBlkExport):
        exp.sock.close()
    for bm in exp.bitmaps:
        bm.busy = False
    blk = getattr(exp, "backend", None)
    if blk is not None:
        emu.graph.remove_backend(blk)
        exp.backend = None  # type: ignore[union-attr]  # NbdExport gets it in _create
    if drain:
        _drain_jobs(emu, exp.node)
        _drain_jobs(emu, exp.node)


def _delete(emu: Emulator, exp: NbdExport | VhostUserBlkExport) -> None:
    """blk_exp_delete_bh: bitmaps released, BlockBackend gone, then the event."""
    if emu.block_exports.get(exp.id) is not exp:
        return
    _release(emu, exp, drain=True)
    del emu.block_exports[exp.id]
    emu.bus.emit("BLOCK_EXPORT_DELETED", {"id": exp.id})
