"""QEMU's JSON writer (qobject/json-writer.c behaviour), shared by every layer.

QMP replies and events, and the block layer's ``json:{...}`` pseudo-filenames, must come out
exactly as QEMU prints them: QDict key order, ``", "``/``": "`` separators, ASCII output
with upper-case ``\\uXXXX`` escapes, ``%.17g`` doubles.  Pure functions, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Final

from .qdict import qdict_order

_I64_MIN: Final = -(1 << 63)
_U64_END: Final = 1 << 64


def _is_valid_codepoint(cp: int) -> bool:
    """util/unicode.c is_valid_codepoint(): in range, not a noncharacter, not a surrogate."""
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


_NEEDS_ESCAPE: Final = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_WRITER_ESCAPES: Final = {
    '"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    special = _WRITER_ESCAPES.get(ch)
    if special is not None:
        return special
    cp = ord(ch)
    if cp and not _is_valid_codepoint(cp):
        cp = 0xFFFD  # QEMU's reader of its own strings rejects these and substitutes U+FFFD
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def quote_string(text: str) -> str:
    """json-writer.c quoted_str(): ASCII output, uppercase \\uXXXX for controls, DEL, non-ASCII."""
    if _NEEDS_ESCAPE.search(text) is None:
        return '"' + text + '"'
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, text) + '"'


def _number_str(value: int | float) -> str:
    if isinstance(value, int) and _I64_MIN <= value < _U64_END:
        return str(int(value))
    return f"{value:.17g}"


_END: Final = object()


class _Slow(Exception):
    """The value needs the exact writer (floats, unusual strings, huge ints, deep nesting)."""


_encode_fast = json.JSONEncoder(separators=(", ", ": "), ensure_ascii=True,
                                check_circular=False).encode
# a \u escape is one preceded by an even number of backslashes (an escaped backslash
# followed by "u" is literal text and must stay as it is)
_UPPER_U: Final = re.compile(r"(?<!\\)((?:\\\\)*)\\u([0-9a-f]{4})")


def _prepare(value: Any, depth: int = 0) -> Any:
    """Reorder dicts into QDict order for the C encoder; raise _Slow where it would differ."""
    t = type(value)
    if t is str:
        if value.isascii() and value.isprintable() or _plain_text(value):
            return value
        raise _Slow
    if t is dict:
        if depth > 64:
            raise _Slow
        out = {}
        for k, v in qdict_order(value).items():
            if type(k) is not str or not (k.isascii() and k.isprintable() or _plain_text(k)):
                raise _Slow
            out[k] = _prepare(v, depth + 1)
        return out
    if t is int:
        if _I64_MIN <= value < _U64_END:
            return value
        raise _Slow
    if t is bool or value is None:
        return value
    if t is list or t is tuple:
        if depth > 64:
            raise _Slow
        return [_prepare(v, depth + 1) for v in value]
    raise _Slow


def _raise_slow() -> bool:
    raise _Slow


def _plain_text(text: str) -> bool:
    """Strings the C encoder escapes exactly as QEMU does (after upper-casing \\u)."""
    return "\x7f" not in text and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def dumps(value: Any) -> str:
    """Serialise like QEMU's compact JSON writer; dict keys come out in QDict iteration order.

    Common replies go through the C encoder after a reordering walk; anything whose
    bytes could differ from QEMU's (floats, DEL, lone surrogates, out-of-range integers,
    deep nesting) takes the exact writer below.
    """
    try:
        text = _encode_fast(_prepare(value))
    except _Slow:
        return _dumps_exact(value)
    if "\\u" in text:
        text = _UPPER_U.sub(lambda m: m.group(1) + "\\u" + m.group(2).upper(), text)
    return text


def _dumps_exact(value: Any) -> str:
    """The exact writer. Iterative, so values nested up to QEMU's 1024 levels never hit
    Python's recursion limit."""
    out: list[str] = []
    append = out.append
    stack: list[tuple[Iterator[Any], bool]] = []
    started: list[bool] = []
    item = value
    while True:
        if isinstance(item, str):
            append(quote_string(item))
        elif item is None:
            append("null")
        elif isinstance(item, bool):
            append("true" if item else "false")
        elif isinstance(item, (int, float)):
            append(_number_str(item))
        elif isinstance(item, dict):
            if item:
                append("{")
                stack.append((iter(qdict_order(item).items()), True))
                started.append(False)
            else:
                append("{}")
        elif isinstance(item, (list, tuple)):
            if item:
                append("[")
                stack.append((iter(item), False))
                started.append(False)
            else:
                append("[]")
        else:
            raise TypeError(f"cannot serialise {type(item).__name__} as QMP JSON")
        while stack:
            it, is_obj = stack[-1]
            nxt: Any = next(it, _END)
            if nxt is _END:
                append("}" if is_obj else "]")
                stack.pop()
                started.pop()
                continue
            if started[-1]:
                append(", ")
            started[-1] = True
            if is_obj:
                key, item = nxt
                append(quote_string(key))
                append(": ")
            else:
                item = nxt
            break
        else:
            return "".join(out)
