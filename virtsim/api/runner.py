"""The sync facade's engine: one asyncio loop in a thread, plus an event-callback thread.

The API's core is asyncio (emulators, QMP clients and job bookkeeping all live on one
loop); the libvirt-shaped sync objects submit coroutines to that loop and wait.  User
callbacks (domain events) run on a separate thread, so a callback may itself call the API
— as libvirt-python code routinely does — without deadlocking the loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where available: embedded emulators serve NBD data from this loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class LoopThread:
    """An event loop running in a daemon thread, with a callback dispatcher beside it."""

    def __init__(self, name: str = "virtsim-api") -> None:
        self.loop = _new_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._callbacks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"{name}-events",
                                            daemon=True)
        self._dispatcher.start()
        self.closed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def _dispatch(self) -> None:
        while True:
            fn = self._callbacks.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # a user callback's bug must not stop event delivery
                import traceback

                traceback.print_exc()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        if self.in_loop():
            coro.close()
            raise RuntimeError("virtsim API called from its own event loop thread; "
                               "use the async API there")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def post(self, fn: Callable[[], None]) -> None:
        """Queue a user callback for the dispatcher thread."""
        if not self.closed:
            self._callbacks.put(fn)

    def stop(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._callbacks.put(None)
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.in_loop():
            self._thread.join(timeout=5)
            self.loop.close()
