"""The event bus: the one way the model reports what happened.

QMP monitors, timelines, scenario hooks and (later) libvirt-style event streams all
subscribe here; the model never knows who listens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Listener = Callable[[str, "dict[str, Any] | None"], None]


class EventBus:
    """Synchronous fan-out of ``(name, data)`` events, in emission order."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns a function that removes it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        for listener in list(self._listeners):
            listener(name, data)
