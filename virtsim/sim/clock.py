"""Time for the model: wall clock for event timestamps, monotonic time for delays.

A virtual clock lets tests run long throttled jobs instantly and deterministically; every
delay in the model asks the clock, never ``time`` directly.
"""

from __future__ import annotations

import time


class Clock:
    """Real time."""

    def wall(self) -> tuple[int, int]:
        """(seconds, microseconds) since the epoch, as QMP event timestamps carry."""
        ns = time.time_ns()
        return ns // 1_000_000_000, (ns // 1000) % 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


class VirtualClock(Clock):
    """Time that only moves when told to (``advance``), starting at a fixed epoch."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 0.0

    def wall(self) -> tuple[int, int]:
        us = int(round(self._now * 1_000_000))
        return us // 1_000_000, us % 1_000_000

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds
