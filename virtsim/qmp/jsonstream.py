"""QEMU 7.2's JSON dialect for QMP, sans-I/O: a streaming reader and a writer.

Why this exists: QMP clients match on QEMU's exact error texts and output bytes, and on how the
monitor recovers from garbage.  The reader reproduces qobject/json-lexer.c (its DFA, error
recovery and token-size cap), json-streamer.c (message framing by bracket counting, the token
size/count/nesting limits) and json-parser.c (first-error-wins texts, modified UTF-8 checks,
int64/uint64/double numbers).  The writer reproduces json-writer.c (separators, escapes,
``%.17g`` doubles) and prints dict keys in QDict iteration order (virtsim.sim.qdict), which is
why QEMU prints ``{"return": ..., "id": ...}`` but ``{"id": ..., "error": ...}``.

Python values stand for QObjects: dict (insertion order = the order QEMU inserted keys),
list, str (``"\\x00"`` stands for QEMU's ``\\xC0\\x80``), int (QNUM_I64 when it fits int64,
else QNUM_U64), float (QNUM_DOUBLE, also for integers beyond uint64), bool, None (QNull).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

# the writer (QEMU's JSON output) lives below the QMP layer: the block layer needs it too
from virtsim.sim.qjson import _I64_MIN, _U64_END, _is_valid_codepoint

MAX_TOKEN_SIZE: Final = 64 << 20
MAX_TOKEN_COUNT: Final = 2 << 20
MAX_NESTING: Final = 1 << 10

# Token types (json-lexer.h).  _OVERSIZE is the lexer handing over a token that outgrew
# MAX_TOKEN_SIZE with its *state* as type; the streamer treats it as an ordinary token.
_LCURLY, _RCURLY, _LSQUARE, _RSQUARE, _COLON, _COMMA = 1, 2, 3, 4, 5, 6
_INTEGER, _FLOAT, _KEYWORD, _STRING, _ERROR, _OVERSIZE = 7, 8, 9, 10, 11, 12

# Lexer states (json-lexer.c), minus the interpolation ones QMP never enables.
(
    _S_START, _S_RECOVERY, _S_DQ, _S_DQ_ESC, _S_SQ, _S_SQ_ESC, _S_ZERO, _S_DIGITS, _S_SIGN,
    _S_MANT, _S_MANT_DIGITS, _S_EXP_E, _S_EXP_SIGN, _S_EXP_DIGITS, _S_KEYWORD,
) = range(15)

_STRUCTURAL: Final = {
    ord("{"): _LCURLY, ord("}"): _RCURLY, ord("["): _LSQUARE,
    ord("]"): _RSQUARE, ord(":"): _COLON, ord(","): _COMMA,
}
_WS: Final = frozenset(b" \t\r\n")
_DIGIT: Final = frozenset(b"0123456789")

# Runs of bytes that keep the lexer in one state; they let us skip long strings or garbage
# with one regex call instead of a Python step per byte.  Escape pairs stay inside a string.
_RUN_DQ: Final = re.compile(rb'(?:[^"\\\x00-\x1f\xfe\xff]|\\[\x20-\xfd])+')
_RUN_SQ: Final = re.compile(rb"(?:[^'\\\x00-\x1f\xfe\xff]|\\[\x20-\xfd])+")
_RUN_DIGITS: Final = re.compile(rb"[0-9]+")
_RUN_KEYWORD: Final = re.compile(rb"[a-z]+")
_RUN_WS: Final = re.compile(rb"[ \t\r\n]+")
# Recovery skips to a structural char, an ASCII control char other than TAB, or 0xFE/0xFF.
_RUN_RECOVERY: Final = re.compile(rb"[^\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]+")

_NONCHAR_RE: Final = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17))
    + "]"
)
_SIMPLE_ESCAPES: Final = {
    ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
    ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t",
}
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


@dataclass(frozen=True)
class JsonParseError:
    """One message the reader rejected; ``desc`` is the exact GenericError text QEMU sends."""

    desc: str


class _Fail(Exception):
    """A json-parser.c parse_error(); carries the raw C message before 'JSON parse error, '."""

    def __init__(self, msg: bytes) -> None:
        super().__init__(msg)
        self.msg = msg


_MIN_CP: Final = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def cstr_to_str(raw: bytes) -> str:
    """Read bytes the way QEMU's JSON writer reads a C string (mod_utf8_codepoint()).

    Stops at NUL, maps ``\\xC0\\x80`` to U+0000 and every invalid sequence to U+FFFD, advancing
    exactly as QEMU does, so error texts quoting raw input bytes come out identical.
    """
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    if raw.isascii():
        return raw.decode("ascii")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return _NONCHAR_RE.sub("\ufffd", text)
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        if byte < 0x80:
            out.append(chr(byte))
            i += 1
            continue
        if byte >= 0xFE or not byte & 0x40:
            out.append("\ufffd")
            i += 1
            continue
        length, mask = 0, 0x80
        while byte & mask:
            length += 1
            mask >>= 1
        cp = byte & (mask - 1)
        j = 1
        while j < length:
            if i + j >= n or raw[i + j] & 0xC0 != 0x80:
                cp = -1
                break
            cp = cp << 6 | raw[i + j] & 0x3F
            j += 1
        i += j
        if cp < 0 or not _is_valid_codepoint(cp):
            out.append("\ufffd")
        elif cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2):
            out.append("\ufffd")
        else:
            out.append(chr(cp))
    return "".join(out)


def _error_desc(msg: bytes) -> str:
    """parse_error(): vsnprintf() into char[1024], then prefixed; long quotes get cut."""
    return cstr_to_str(b"JSON parse error, " + msg[:1023])


def _decode_segment(seg: bytes) -> str:
    """Validate unescaped string bytes as modified UTF-8 (json-parser.c parse_string)."""
    try:
        text = seg.decode("utf-8")
    except UnicodeDecodeError:
        if b"\xc0\x80" not in seg:
            raise _Fail(b"invalid UTF-8 sequence in string") from None
        try:
            text = "\x00".join(piece.decode("utf-8") for piece in seg.split(b"\xc0\x80"))
        except UnicodeDecodeError:
            raise _Fail(b"invalid UTF-8 sequence in string") from None
    if _NONCHAR_RE.search(text):
        raise _Fail(b"invalid UTF-8 sequence in string")
    return text


def _cvt4hex(buf: bytes, pos: int) -> int:
    """Four hex digits at ``pos``, or -1; stops at the first non-hex byte like QEMU's cvt4hex."""
    cp = 0
    for k in range(4):
        ch = buf[pos + k]
        if ch not in _HEX:
            return -1
        cp = cp << 4 | int(chr(ch), 16)
    return cp


def _decode_string(tok: bytes) -> str:
    """A JSON_STRING token (quotes included) to str, with QEMU's escapes and error texts."""
    inner = tok[1:-1]
    if b"\\" not in inner:
        return inner.decode("ascii") if inner.isascii() else _decode_segment(inner)
    buf = tok + b"\0"  # QEMU reads the token as a NUL-terminated C string
    parts: list[str] = []
    i, n = 0, len(inner)
    while i < n:
        j = inner.find(b"\\", i)
        if j < 0:
            j = n
        if j > i:
            parts.append(_decode_segment(inner[i:j]))
        if j >= n:
            break
        esc = inner[j + 1]
        simple = _SIMPLE_ESCAPES.get(esc)
        if simple is not None:
            parts.append(simple)
            i = j + 2
            continue
        if esc != ord("u"):
            raise _Fail(b"invalid escape sequence in string")
        beg = j + 1  # index of the backslash in buf
        p = beg + 2
        cp = _cvt4hex(buf, p)
        p += 4
        if 0xD800 <= cp <= 0xDBFF and buf[p : p + 2] == b"\\u":
            cp = 0x10000 + ((cp & 0x3FF) << 10)
            trailing = _cvt4hex(buf, p + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp |= trailing & 0x3FF
                p += 6
            else:
                cp = -1
        if not _is_valid_codepoint(cp):
            quoted = buf[beg:p].split(b"\0", 1)[0]
            raise _Fail(quoted + b" is not a valid Unicode character")
        parts.append(chr(cp))
        i = p - 1
    return "".join(parts)


def _number(ttype: int, text: bytes) -> int | float:
    """JSON_INTEGER as int64, else uint64, else double; JSON_FLOAT as double (strtod)."""
    if ttype == _INTEGER and len(text) <= 20:
        value = int(text)
        if _I64_MIN <= value < _U64_END:
            return value
    return float(text)


def _keyword(text: bytes) -> bool | None:
    if text == b"true":
        return True
    if text == b"false":
        return False
    if text == b"null":
        return None
    raise _Fail(b"invalid keyword '" + text + b"'")


class _Frame:
    """A container being filled by the iterative parser (one level of parse_object/array)."""

    __slots__ = ("container", "is_obj", "want_key", "key")

    def __init__(self, container: dict[str, Any] | list[Any], is_obj: bool) -> None:
        self.container = container
        self.is_obj = is_obj
        self.want_key = is_obj
        self.key = ""


def _parse(types: bytearray, texts: list[bytes | None]) -> Any:
    """json_parser_parse() over one message's tokens, without recursion (nesting reaches 1024).

    Raises _Fail with the *first* error QEMU would report; QEMU stops at that point too.
    """
    n = len(types)
    i = 0
    stack: list[_Frame] = []
    while True:
        # parse_value()
        if i >= n:
            raise _Fail(b"premature EOI")
        ttype = types[i]
        value: Any
        if ttype == _LCURLY or ttype == _LSQUARE:
            is_obj = ttype == _LCURLY
            i += 1
            if i >= n:
                raise _Fail(b"premature EOI")
            if types[i] == (_RCURLY if is_obj else _RSQUARE):
                i += 1
                value = {} if is_obj else []
            else:
                stack.append(_Frame({} if is_obj else [], is_obj))
                continue
        elif ttype == _STRING:
            value = _decode_string(texts[i] or b"")
            i += 1
        elif ttype == _INTEGER or ttype == _FLOAT:
            value = _number(ttype, texts[i] or b"")
            i += 1
        elif ttype == _KEYWORD:
            value = _keyword(texts[i] or b"")
            i += 1
        else:
            raise _Fail(b"expecting value")
        # A value is complete: hand it to the enclosing containers.
        while True:
            if not stack:
                return value
            frame = stack[-1]
            if frame.is_obj:
                obj = frame.container
                assert isinstance(obj, dict)
                if frame.want_key:
                    if not isinstance(value, str):
                        raise _Fail(b"key is not a string in object")
                    frame.key = value
                    if i >= n:
                        raise _Fail(b"premature EOI")
                    i += 1
                    if types[i - 1] != _COLON:
                        raise _Fail(b"missing : in object pair")
                    frame.want_key = False
                    break
                if frame.key in obj:
                    raise _Fail(b"duplicate key")
                obj[frame.key] = value
                if i >= n:
                    raise _Fail(b"premature EOI")
                i += 1
                sep = types[i - 1]
                if sep == _RCURLY:
                    stack.pop()
                    value = obj
                    continue
                if sep != _COMMA:
                    raise _Fail(b"expected separator in dict")
                frame.want_key = True
                break
            arr = frame.container
            assert isinstance(arr, list)
            arr.append(value)
            if i >= n:
                raise _Fail(b"premature EOI")
            i += 1
            sep = types[i - 1]
            if sep == _RSQUARE:
                stack.pop()
                value = arr
                continue
            if sep != _COMMA:
                raise _Fail(b"expected separator in list")
            break


class _FastPathMiss(Exception):
    """The standard decoder's result might differ from QEMU's: use the exact path."""


def _pairs_no_dup(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _FastPathMiss
    return obj


def _reject_constant(_name: str) -> Any:
    raise _FastPathMiss


_FAST_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_pairs_no_dup,
    parse_int=lambda s: _number(_INTEGER, s.encode("ascii")),
    parse_constant=_reject_constant,
)


class JsonStreamParser:
    """Bytes in, complete top-level JSON values or JsonParseError out, like QEMU's QMP reader.

    ``feed()`` never raises on any input; state persists across calls, so values may arrive split
    anywhere.  Scalars end only at the next byte (as in QEMU: ``1`` waits for a delimiter).
    """

    def __init__(self) -> None:
        self._out: list[Any] = []
        self.reset()

    def reset(self) -> None:
        """Drop all partial input, as QEMU does when a monitor client disconnects."""
        self._state = _S_START
        self._tok = bytearray()  # prefix of a token that started in an earlier chunk
        self._types = bytearray()
        self._texts: list[bytes | None] = []
        self._size = 0
        self._braces = 0
        self._brackets = 0

    @property
    def idle(self) -> bool:
        """True when no partial token or message is buffered."""
        return self._state in (_S_START, _S_RECOVERY) and not self._types

    def feed(self, data: bytes) -> list[Any]:
        """Consume ``data``; return what QEMU's parser would emit, in order."""
        out = self._out = []
        n = len(data)
        pos = 0
        text: str | None = None
        fast = data.isascii() and b"\\u" not in data
        while pos < n:
            if fast and self._state == _S_START and not self._types:
                m = _RUN_WS.match(data, pos)
                if m:
                    pos = m.end()
                    if pos >= n:
                        break
                if data[pos] == 0x7B:
                    if text is None:
                        text = data.decode("ascii")
                    end = self._fast(text, pos)
                    if end > pos:
                        pos = end
                        continue
            pos = self._lex(data, pos, n)
        self._out = []
        return out

    def _fast(self, text: str, pos: int) -> int:
        """Decode one whole object with the C json module when that provably matches QEMU.

        Safe because the chunk is ASCII without ``\\u`` escapes (so no surrogate/noncharacter
        differences), duplicates/NaN/Infinity fall back, and size and depth stay under QEMU's
        limits.  Returns the end offset, or ``pos`` when the exact path must run.
        """
        try:
            value, end = _FAST_DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError, _FastPathMiss):
            return pos
        if end - pos > MAX_TOKEN_COUNT:
            return pos
        span = text[pos:end]
        if span.count("{") + span.count("[") > MAX_NESTING:
            return pos
        self._out.append(value)
        return end

    # -- json-streamer.c -------------------------------------------------------------------

    def _emit(self, item: Any) -> None:
        self._braces = self._brackets = 0
        self._types = bytearray()
        self._texts = []
        self._size = 0
        self._out.append(item)

    def _token(self, ttype: int, text: bytes | None) -> None:
        """json_message_process_token(): count brackets, enforce limits, parse when balanced."""
        if ttype == _ERROR:
            stray = (text or b"").split(b"\0", 1)[0]
            self._emit(JsonParseError(cstr_to_str(b"JSON parse error, stray '" + stray + b"'")))
            return
        if ttype == _LCURLY:
            self._braces += 1
        elif ttype == _RCURLY:
            self._braces -= 1
        elif ttype == _LSQUARE:
            self._brackets += 1
        elif ttype == _RSQUARE:
            self._brackets -= 1
        length = 1 if text is None else len(text)
        if self._size + length + 1 > MAX_TOKEN_SIZE:
            self._emit(JsonParseError("JSON token size limit exceeded"))
            return
        if len(self._types) + 1 > MAX_TOKEN_COUNT:
            self._emit(JsonParseError("JSON token count limit exceeded"))
            return
        if self._braces + self._brackets > MAX_NESTING:
            self._emit(JsonParseError("JSON nesting depth limit exceeded"))
            return
        self._types.append(ttype)
        self._texts.append(text)
        self._size += length
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        try:
            result: Any = _parse(self._types, self._texts)
        except _Fail as exc:
            result = JsonParseError(_error_desc(exc.msg))
        self._emit(result)

    # -- json-lexer.c ----------------------------------------------------------------------

    def _lex(self, data: bytes, pos: int, n: int) -> int:
        """Run the lexer DFA over data[pos:n].

        Returns early (at an idle point) once a message has been emitted, so ``feed`` can try
        the fast path on what follows.
        """
        state = self._state
        tok = self._tok
        tstart = pos
        emitted = len(self._out)
        token = self._token
        while pos < n:
            if state == _S_START:
                ch = data[pos]
                if ch in _WS:
                    m = _RUN_WS.match(data, pos)
                    assert m is not None
                    pos = m.end()
                    continue
                if len(self._out) != emitted and not self._types:
                    break
                struct = _STRUCTURAL.get(ch)
                if struct is not None:
                    token(struct, None)
                    pos += 1
                    continue
                tstart = pos
                pos += 1
                if ch == 0x22:
                    state = _S_DQ
                elif ch == 0x27:
                    state = _S_SQ
                elif ch == 0x30:
                    state = _S_ZERO
                elif 0x31 <= ch <= 0x39:
                    state = _S_DIGITS
                elif ch == 0x2D:
                    state = _S_SIGN
                elif 0x61 <= ch <= 0x7A:
                    state = _S_KEYWORD
                else:
                    token(_ERROR, data[tstart:pos])
                    state = _S_RECOVERY
                    continue
            elif state == _S_RECOVERY:
                m = _RUN_RECOVERY.match(data, pos)
                if m:
                    pos = m.end()
                if pos < n:
                    state = _S_START
                continue
            elif state == _S_DQ or state == _S_SQ:
                cap = min(n, pos + MAX_TOKEN_SIZE + 1 - len(tok) - (pos - tstart))
                m = (_RUN_DQ if state == _S_DQ else _RUN_SQ).match(data, pos, cap)
                if m:
                    pos = m.end()
                if pos < n and pos < cap:
                    ch = data[pos]
                    pos += 1
                    if ch == (0x22 if state == _S_DQ else 0x27):
                        token(_STRING, self._take(tok, data, tstart, pos))
                        state = _S_START
                        continue
                    if ch == 0x5C:
                        state = _S_DQ_ESC if state == _S_DQ else _S_SQ_ESC
                    else:
                        token(_ERROR, self._take(tok, data, tstart, pos))
                        state = _S_RECOVERY
                        continue
            elif state == _S_DQ_ESC or state == _S_SQ_ESC:
                ch = data[pos]
                pos += 1
                if 0x20 <= ch <= 0xFD:
                    state = _S_DQ if state == _S_DQ_ESC else _S_SQ
                else:
                    token(_ERROR, self._take(tok, data, tstart, pos))
                    state = _S_RECOVERY
                    continue
            elif state == _S_KEYWORD or state == _S_DIGITS or state == _S_MANT_DIGITS \
                    or state == _S_EXP_DIGITS:
                cap = min(n, pos + MAX_TOKEN_SIZE + 1 - len(tok) - (pos - tstart))
                m = (_RUN_KEYWORD if state == _S_KEYWORD else _RUN_DIGITS).match(data, pos, cap)
                if m:
                    pos = m.end()
                if pos < n and pos < cap:
                    ch = data[pos]
                    if state == _S_KEYWORD:
                        token(_KEYWORD, self._take(tok, data, tstart, pos))
                        state = _S_START
                        continue
                    if state != _S_EXP_DIGITS and ch in (0x65, 0x45):
                        pos += 1
                        state = _S_EXP_E
                    elif state == _S_DIGITS and ch == 0x2E:
                        pos += 1
                        state = _S_MANT
                    else:
                        ttype = _INTEGER if state == _S_DIGITS else _FLOAT
                        token(ttype, self._take(tok, data, tstart, pos))
                        state = _S_START
                        continue
            else:
                ch = data[pos]
                nxt = self._step(state, ch)
                if nxt is None:  # terminal reached by lookahead: IN_ZERO ends an integer
                    token(_INTEGER, self._take(tok, data, tstart, pos))
                    state = _S_START
                    continue
                pos += 1
                if nxt == _S_RECOVERY:
                    token(_ERROR, self._take(tok, data, tstart, pos))
                    state = _S_RECOVERY
                    continue
                state = nxt
            if len(tok) + pos - tstart > MAX_TOKEN_SIZE:
                token(_OVERSIZE, self._take(tok, data, tstart, pos))
                state = _S_START
        if state not in (_S_START, _S_RECOVERY) and pos >= n:
            tok += data[tstart:n]
        self._state = state
        return pos

    @staticmethod
    def _take(tok: bytearray, data: bytes, start: int, end: int) -> bytes:
        """The finished token's text; clears the cross-chunk prefix."""
        if not tok:
            return data[start:end]
        text = bytes(tok) + data[start:end]
        tok.clear()
        return text

    @staticmethod
    def _step(state: int, ch: int) -> int | None:
        """Single-byte transitions of the number states; None = emit integer (lookahead)."""
        if state == _S_ZERO:
            if ch in _DIGIT:
                return _S_RECOVERY
            return _S_MANT if ch == 0x2E else None
        if state == _S_SIGN:
            if ch == 0x30:
                return _S_ZERO
            return _S_DIGITS if 0x31 <= ch <= 0x39 else _S_RECOVERY
        if state == _S_MANT:
            return _S_MANT_DIGITS if ch in _DIGIT else _S_RECOVERY
        if state == _S_EXP_E:
            if ch in (0x2B, 0x2D):
                return _S_EXP_SIGN
            return _S_EXP_DIGITS if ch in _DIGIT else _S_RECOVERY
        # _S_EXP_SIGN
        return _S_EXP_DIGITS if ch in _DIGIT else _S_RECOVERY


# -- json-writer.c -------------------------------------------------------------------------
