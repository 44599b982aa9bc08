"""``human-monitor-command``: the HMP lines backup tooling sends, above all ``qemu-io``.

Guest writes reach a simulated disk exactly as on a real libvirt host: HMP
``qemu-io -d /machine/peripheral/ID/virtio-backend "write -P 0xab 0 64k"``.  As in QEMU,
qemu-io's own output goes to the emulator's stdout, and only lookup, permission and
parser errors land in the HMP reply.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from ...sim import guest
from ...sim import perm as P
from ...sim.block import BlockBackend, Node
from ...sim.errors import SimError
from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator


def run_ops(emu: Emulator, node: Node, ops: list[guest.GuestOp], echo: bool) -> list[str]:
    """Execute guest ops on ``node``; returns what qemu-io would print for each."""
    out = []
    for op in ops:
        t0 = time.monotonic_ns()
        error: int | None = None
        data: bytes | None = None
        try:
            if op.kind in ("write", "zero", "discard", "read") and \
                    op.offset + op.length > node.length():
                # blk_check_byte_request: a BlockBackend never writes past the end, even
                # where the node below would grow (file, blkdebug over file)
                raise OSError(5, "Input/output error")
            if op.kind == "write":
                node.write(op.offset, op.data())
            elif op.kind == "zero":
                node.write_zeroes(op.offset, op.length, op.unmap)
            elif op.kind == "discard":
                node.discard(op.offset, op.length)
            elif op.kind == "flush":
                node.flush()
            elif op.kind == "read":
                data = node.read(op.offset, op.length)
        except OSError as e:
            error = e.errno or 5
        text = op.render(time.monotonic_ns() - t0, error, data, node.length())
        if echo and text:
            sys.stdout.write(text)
        out.append(text)
    if echo:
        sys.stdout.flush()
    return out


def _qemu_io(emu: Emulator, line: str) -> str:
    parsed = guest.parse_hmp_qemu_io(line)
    if isinstance(parsed, guest.HmpError):
        if parsed.stdout:
            sys.stdout.write(parsed.stdout)
        return parsed.reply
    temp: BlockBackend | None = None
    if parsed.use_device:
        try:
            blk = emu.resolve_qdev(parsed.device)
        except SimError as e:
            return guest.hmp_error_reply(e.desc)
        node = blk.root
        if node is None:
            return guest.hmp_error_reply(f"Device '{parsed.device}' has no medium")
    else:
        blk2 = emu.graph.find_backend(parsed.device)
        node = blk2.root if blk2 is not None else emu.graph.find_node(parsed.device)
        if node is None:
            return guest.node_not_found_reply(parsed.device)
        if blk2 is None:
            _drain_jobs(emu, node)  # attaching a BlockBackend drains the node
            temp = emu.graph.temporary_backend(node, 0)

    def acquire_write() -> str | None:
        if node.read_only:
            return "Block node is read-only"
        if temp is not None and temp.root_edge is not None:
            edge = temp.root_edge
            try:
                emu.graph.update_perms(edge, edge.perm | P.WRITE, edge.shared)
            except SimError as e:
                return e.desc
        return None

    try:
        res = guest.parse_qemu_io(parsed.command, acquire_write)
        if res.stdout:
            sys.stdout.write(res.stdout)
        if res.stderr:
            sys.stderr.write(res.stderr)
        if res.unsupported:
            sys.stderr.write(f"virtsim: qemu-io command '{res.unsupported}' is not "
                             f"emulated\n")
        run_ops(emu, node, res.ops, emu.config.echo_qemu_io)
        return res.reply
    finally:
        if temp is not None:
            emu.graph.remove_backend(temp)
            _drain_jobs(emu, node)


def _drain_jobs(emu: Emulator, node: Node) -> None:
    """A drained section on ``node``: QEMU pauses and resumes every job whose nodes sit
    below or above it (visible as JOB_STATUS_CHANGE paused/running pairs)."""
    if emu._jobs is None:
        return
    related = {id(n) for n in _closure(node)}
    for job in reversed(emu.jobs.jobs()):
        nodes = [getattr(job, "source", None), getattr(job, "target", None)]
        if job.status.value == "running" and any(n is not None and id(n) in related
                                                  for n in nodes):
            job.internal_pause()
            job.internal_resume()


def _closure(node: Node) -> list[Node]:
    """``node``, everything below it, and every node above it."""
    seen: dict[int, Node] = {}
    todo = [node]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen[id(n)] = n
        todo.extend(e.child for e in n.children.values())
    up = [node]
    while up:
        n = up.pop()
        for e in n.parents:
            p = e.parent
            if isinstance(p, Node) and id(p) not in seen:
                seen[id(p)] = p
                up.append(p)
    return list(seen.values())


def _info(emu: Emulator, what: str) -> str:
    if what == "version":
        v = emu.version_info()
        q = v["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']}{v['package']}\r\n"
    if what == "name":
        return f"{emu.config.name}\r\n" if emu.config.name is not None else ""
    if what == "status":
        if emu.run_state == "running":
            return "VM status: running\r\n"
        if emu.run_state == "prelaunch":
            return "VM status: paused (prelaunch)\r\n"
        return "VM status: paused\r\n"
    return f"unknown command: 'info {what}'\r\n"  # pragma: no cover - approximate


@command("human-monitor-command")
def human_monitor_command(emu: Emulator, args: dict[str, Any]) -> Any:
    line: str = args["command-line"]
    cpu = args.get("cpu-index")
    if cpu is not None and not (emu.config.machine != "none" and cpu == 0):
        raise SimError("Parameter 'cpu-index' expects a CPU number")
    stripped = line.lstrip()
    word = stripped.split(None, 1)[0] if stripped.split() else ""
    if word == "qemu-io":
        return _qemu_io(emu, stripped)
    if word == "info":
        rest = stripped[4:].split()
        if rest:
            return _info(emu, rest[0])
    if not word:
        return ""
    return f"unknown command: '{word}'\r\n"


@command("x-virtsim-guest-workload")
def guest_workload(emu: Emulator, args: dict[str, Any]) -> Any:
    """Run a seeded guest workload on a device (QOM path with qdev=true) or node."""
    node, _ = emu.node_for_io(args["device"], bool(args.get("qdev", False)))
    wl = guest.Workload.from_args(args)
    ops = wl.ops(node.length())

    def run() -> dict[str, int]:
        run_ops(emu, node, ops, echo=False)
        written = sum(op.length for op in ops if op.kind in ("write", "zero", "discard"))
        return {"requests": len(ops), "bytes": written}

    if emu.agent is not None and emu.agent.frozen:
        # the guest's filesystems are frozen (guest-fsfreeze-freeze): its writes block
        # until the thaw, and so does this reply (other commands are still served)
        return emu.agent.after_thaw(run)
    return run()
