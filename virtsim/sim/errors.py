"""Errors raised by the model, carrying QEMU's error class and exact message.

QEMU's block layer reports failures through ``Error`` objects that already carry an
``ErrorClass`` (nearly always GenericError).  The monitor passes them on unchanged, so the
model raises them with the final wording and the QMP layer only serialises them.
"""

from __future__ import annotations


class SimError(Exception):
    """A failure reported to the monitor as ``{"class": error_class, "desc": desc}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def __repr__(self) -> str:
        return f"SimError({self.desc!r}, {self.error_class!r})"


class ImageError(Exception):
    """A malformed or unsupported image file (corrupt header, bad table, unknown feature)."""


class IOErrorEnospc(OSError):
    """Simulated "no space left on device" from a capacity-limited store."""


class HangError(Exception):
    """QEMU 7.2 would stop responding at this point (a documented QEMU bug).

    The model raises it after emitting what QEMU does emit, so callers can roll back and
    answer instead of hanging like QEMU."""
