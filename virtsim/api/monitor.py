"""The API's QMP connection to one emulator (the ``qemu.qmp`` client), with event fan-out.

Everything the API knows about a running domain arrives here, so the same code drives
an embedded emulator, ``virtsim-qemu`` or a real QEMU.  Events are handed to the
subscribers in arrival order, from one task, so job bookkeeping sees them in QEMU's order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

Subscriber = Callable[[dict[str, Any]], Awaitable[None]]

__all__ = ["ExecuteError", "Monitor"]


class Monitor:
    def __init__(self, name: str) -> None:
        self.client = QMPClient(name)
        self.subscribers: list[Subscriber] = []
        self._task: asyncio.Task[None] | None = None
        #: every message exchanged, for timelines and debugging (seam for scenarios)
        self.log: list[tuple[str, Any]] = []
        #: called once if the emulator goes away without close() (it died or quit)
        self.on_lost: Callable[[], Awaitable[None]] | None = None
        self._closing = False
        self._watch: asyncio.Task[None] | None = None

    async def connect(self, path: str, timeout: float = 10.0) -> None:
        """Connect once the emulator accepts (its socket file can precede its listen())."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.client.connect(path)
                break
            except Exception:
                if loop.time() > deadline:
                    raise
                # a failed client keeps its error state: start over with a fresh one
                self.client = QMPClient(self.client.name)
                await asyncio.sleep(0.005)
        self._task = asyncio.get_running_loop().create_task(self._pump())
        self._watch = asyncio.get_running_loop().create_task(self._watch_runstate())

    async def _watch_runstate(self) -> None:
        """libvirt's monitor EOF handling: the emulator vanished under us."""
        from qemu.qmp import Runstate

        with contextlib.suppress(asyncio.CancelledError):
            while self.client.runstate == Runstate.RUNNING:
                await self.client.runstate_changed()
            if not self._closing and self.on_lost is not None:
                await self.on_lost()

    async def _pump(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            async for event in self.client.events:
                msg = dict(event)
                self.log.append(("event", msg))
                for sub in list(self.subscribers):
                    try:
                        await sub(msg)
                    except Exception:  # a bookkeeping bug must not kill event delivery
                        import traceback

                        traceback.print_exc()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.log.append(("cmd", {"execute": cmd, **({"arguments": args} if args else {})}))
        return await self.client.execute(cmd, args)

    async def hmp(self, line: str) -> str:
        out = await self.execute("human-monitor-command", {"command-line": line})
        return str(out)

    async def close(self) -> None:
        self._closing = True
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
            with contextlib.suppress(BaseException):
                await self._watch
        self._watch = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.client.disconnect()
