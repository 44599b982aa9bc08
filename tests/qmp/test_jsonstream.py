"""The QEMU-compatible JSON reader and writer (virtsim.qmp.jsonstream).

Expected texts were observed on QEMU 7.2.22; test_protocol.py replays them on the binary.
"""

from __future__ import annotations

import json
import math
import random
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtsim.qmp import jsonstream
from virtsim.qmp.jsonstream import JsonParseError, JsonStreamParser, cstr_to_str
from virtsim.sim.qjson import dumps


def feed(data: bytes, chunk: int = 0) -> list[Any]:
    parser = JsonStreamParser()
    if not chunk:
        return parser.feed(data)
    out: list[Any] = []
    for i in range(0, len(data), chunk):
        out += parser.feed(data[i : i + chunk])
    return out


def errors(data: bytes) -> list[str]:
    return [item.desc if isinstance(item, JsonParseError) else repr(item) for item in feed(data)]


E = "JSON parse error, "


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"}}}", [E + "expecting value"] * 3),
        (b"]", [E + "expecting value"]),
        (b"[}", [E + "expecting value"]),
        (b"[xyz]", [E + "invalid keyword 'xyz'"]),  # the first error wins
        (b'{"a" 1}', [E + "missing : in object pair"]),
        (b'{"a":}', [E + "expecting value"]),
        (b'{"a":1,}', [E + "expecting value"]),
        (b"[1 2]", [E + "expected separator in list"]),
        (b'{"a":1 "b":2}', [E + "expected separator in dict"]),
        (b"{1:2}", [E + "key is not a string in object"]),
        (b'{"a":1,"a":"\\x"}', [E + "invalid escape sequence in string"]),
        (b'{"a":1,"a":2}', [E + "duplicate key"]),
        (b"xyz ", [E + "invalid keyword 'xyz'"]),
        (b"abcD ", [E + "invalid keyword 'abc'", E + "stray 'D'"]),
        (b"\x00", [E + "stray ''"]),  # QEMU prints the token as a C string
        (b"%% x", [E + "stray '%'"]),  # recovery skips up to a structural/control byte
        (b"01", [E + "stray '01'"]),
        (b"-a", [E + "stray '-a'"]),
        (b"True", [E + "stray 'T'"]),
        (b"\xff\xfe\xff", [E + "stray '\ufffd'"] * 3),
        (b'"ab\x01cd"', [E + "stray '\"ab\x01'"]),
        (b'"ab\ncd"}', [E + "stray '\"ab\n'", E + "expecting value"]),
        (b'"ab\xfecd"', [E + "stray '\"ab\ufffd'"]),
        (b'"\\ud800"', [E + "\\ud800 is not a valid Unicode character"]),
        (b'"\\ud800\\u0041"', [E + "\\ud800 is not a valid Unicode character"]),
        (b'"\\u12G4"', [E + "\\u12G4 is not a valid Unicode character"]),
        (b'"\\u12"', [E + '\\u12" is not a valid Unicode character']),
        (b'"\\ufffe"', [E + "\\ufffe is not a valid Unicode character"]),
        (b'"\\uDBFF\\uDFFF"', [E + "\\uDBFF\\uDFFF is not a valid Unicode character"]),
        (b'"\xef\xbf\xbe"', [E + "invalid UTF-8 sequence in string"]),
        (b'"\xc0\xaf"', [E + "invalid UTF-8 sequence in string"]),
        (b'"\xed\xa0\x80"', [E + "invalid UTF-8 sequence in string"]),
        (b'"\xe9"', [E + "invalid UTF-8 sequence in string"]),
        (b'"\xf4\x90\x80\x80"', [E + "invalid UTF-8 sequence in string"]),
        (b"[" * 1025, ["JSON nesting depth limit exceeded"]),
        (b"'it''s' ", ["'it'", "'s'"]),
    ],
)
def test_error_texts_and_recovery(data: bytes, expected: list[str]) -> None:
    assert errors(data) == expected
    assert feed(data, 1) == feed(data)


def test_long_keyword_message_is_cut_like_vsnprintf() -> None:
    [err] = feed(b"a" * 2000 + b" ")
    assert err.desc == E + "invalid keyword '" + "a" * (1023 - 17)
    [err] = feed(b'"' + b"x" * 5000 + b"\x01")  # "stray" texts are not cut
    assert err.desc == E + "stray '\"" + "x" * 5000 + "\x01'"


def test_values_and_number_types() -> None:
    [value] = feed(
        b'{"i": 9223372036854775807, "n": -9223372036854775808, "u": 9223372036854775808,'
        b' "umax": 18446744073709551615, "big": 18446744073709551616,'
        b' "neg": -9223372036854775809, "z": -0, "f": -0.0, "inf": 1e999, "e": 1E2,'
        b' "t": true, "F": false, "null": null, "l": [], "o": {}, "s": \'q"\\\'\'}')
    assert value == {
        "i": 2**63 - 1, "n": -(2**63), "u": 2**63, "umax": 2**64 - 1, "big": 2.0**64,
        "neg": -(2.0**63), "z": 0, "f": -0.0, "inf": math.inf, "e": 100.0, "t": True,
        "F": False, "null": None, "l": [], "o": {}, "s": "q\"'",
    }
    for key in ("i", "n", "u", "umax", "z"):
        assert type(value[key]) is int
    for key in ("big", "neg", "f", "e"):
        assert type(value[key]) is float
    assert math.copysign(1, value["f"]) == -1
    assert list(value) == list(json.loads(json.dumps(list(value))))  # wire order kept


def test_strings() -> None:
    [value] = feed(b'["\\u0000", "\xc0\x80", "\\ud83d\\ude00", "\xf0\x9f\x98\x80", '
                   b'"\\b\\f\\n\\r\\t\\/\\\\\\"\\\'", "%s %d", "\x7f"]')
    assert value == ["\x00", "\x00", "\U0001F600", "\U0001F600", "\b\f\n\r\t/\\\"'", "%s %d",
                     "\x7f"]


def test_scalars_wait_for_a_delimiter() -> None:
    parser = JsonStreamParser()
    assert parser.feed(b"12") == [] and parser.feed(b"3") == []
    assert parser.feed(b" ") == [123]
    assert parser.feed(b"true") == [] and parser.feed(b"}") == [True, JsonParseError(
        E + "expecting value")]


def test_split_anywhere_gives_the_same_results() -> None:
    data = (b' {"execute": "query-version", "id": [1, 2.5e3, "\xc3\xa9\\u00e9"]}\n'
            b"xyz {'a': 'b'} \xff [}\x00 \"abc\\\"def\" -12 {\"k\": {\"k\": [true]}}")
    whole = feed(data)
    for size in (1, 2, 3, 5, 7, 11):
        assert feed(data, size) == whole
    assert len(whole) == 7  # after the NUL, recovery skips up to the next '{'
    assert whole[2] == {"a": "b"} and whole[-1] == {"k": {"k": [True]}}


def test_limits_are_qemus() -> None:
    assert jsonstream.MAX_TOKEN_SIZE == 64 << 20
    assert jsonstream.MAX_TOKEN_COUNT == 2 << 20
    assert jsonstream.MAX_NESTING == 1024
    [deep] = feed(b"[" * 1024 + b"]" * 1024)
    for _ in range(1023):
        [deep] = deep
    assert deep == []
    # 1025 opening brackets: the error, then every closer stands alone
    out = feed(b"[" * 1025 + b"]" * 1025)
    assert out[0] == JsonParseError("JSON nesting depth limit exceeded")
    assert out[1:] == [JsonParseError(E + "expecting value")] * 1025


def test_token_count_limit_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    # verified on QEMU at the real limit: 2**21 tokens pass, one more fails
    monkeypatch.setattr(jsonstream, "MAX_TOKEN_COUNT", 10)
    assert feed(b"[1,1,1,{}]") == [[1, 1, 1, {}]]  # 10 tokens
    assert feed(b"[1,1,1,1,1]") == [JsonParseError("JSON token count limit exceeded")]  # 11
    # the 11th token fails; what follows is read as new messages
    assert feed(b"[1,1,1,1,1,1,1]") == [JsonParseError("JSON token count limit exceeded"),
                                        1, JsonParseError(E + "expecting value"),
                                        1, JsonParseError(E + "expecting value")]


def test_token_size_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonstream, "MAX_TOKEN_SIZE", 100)
    # a message whose tokens add up to more than the limit
    assert feed(b'["' + b"a" * 40 + b'","' + b"b" * 40 + b'"]') == [["a" * 40, "b" * 40]]
    assert feed(b'["' + b"a" * 60 + b'","' + b"b" * 60 + b'"]') == [
        JsonParseError("JSON token size limit exceeded"), JsonParseError(E + "expecting value")]
    # a single token that outgrows the lexer's buffer, fed in pieces
    parser = JsonStreamParser()
    out = []
    for piece in [b'"', b"x" * 50, b"x" * 60, b"y" * 20]:
        out += parser.feed(piece)
    assert out == [JsonParseError("JSON token size limit exceeded")]
    # the lexer restarts inside the string: the rest lexes as a keyword
    assert parser.feed(b"\xff\n[1]\n") == [
        JsonParseError(E + "invalid keyword '" + "x" * 10 + "y" * 20 + "'"),
        JsonParseError(E + "stray '\ufffd'"), [1]]


def test_reset_drops_partial_input() -> None:
    parser = JsonStreamParser()
    assert parser.feed(b'{"a": "unterminated') == [] and not parser.idle
    parser.reset()
    assert parser.idle and parser.feed(b"[2] ") == [[2]]


# -- fast path and exact path must agree ----------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                   max_size=4),
    max_leaves=12,
)


def _has_nonchar(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE for c in value)
    if isinstance(value, dict):
        return any(_has_nonchar(k) or _has_nonchar(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nonchar(v) for v in value)
    return False


@settings(max_examples=150, deadline=None)
@given(value=st.dictionaries(st.text(max_size=5), _json_values, max_size=5),
       ascii_only=st.booleans(), chunk=st.integers(1, 13))
def test_standard_json_round_trips_exactly(value: dict[str, Any], ascii_only: bool,
                                           chunk: int) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    whole = feed(data)
    assert whole == feed(data, chunk)
    if _has_nonchar(value):  # QEMU rejects noncharacters; the json module accepts them
        assert len(whole) == 1 and isinstance(whole[0], JsonParseError)
        return
    [parsed] = whole
    assert parsed == json.loads(data, parse_int=lambda s: int(s) if -(2**63) <= int(s) < 2**64
                                else float(s))


_jsonish = st.lists(st.sampled_from([
    b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"\\u", b"d83d", b"de00", b" ",
    b"\n", b"\x00", b"\xff", b"\xc3\xa9", b"\xc0\x80", b"0", b"1", b"-", b".", b"e", b"true",
    b"nul", b'"a"', b'"a":1', b"1e999", b"99999999999999999999", b"NaN", b"Infinity", b"%",
]), max_size=40).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(_jsonish, st.binary(max_size=200)))
def test_whole_chunk_and_bytewise_agree(data: bytes) -> None:
    """Whole-chunk feeding may take the json-module fast path; byte-wise never can."""
    assert feed(data + b"\n") == feed(data + b"\n", 1)


# -- writer ---------------------------------------------------------------------------------

def test_writer_matches_qemu_bytes() -> None:
    assert dumps({"return": {}, "id": "caps-1"}) == '{"return": {}, "id": "caps-1"}'
    assert dumps({"error": {"class": "C", "desc": "d"}, "id": 1}) == (
        '{"id": 1, "error": {"class": "C", "desc": "d"}}')
    # QAPI inserts major, minor, micro; micro and minor share a QDict bucket
    assert dumps({"major": 7, "minor": 2, "micro": 22}) == (
        '{"micro": 22, "minor": 2, "major": 7}')
    assert dumps([0.1, 1.5, -0.0, math.inf, -math.inf, 1e16, 2.0**64, 123456789.0]) == (
        "[0.10000000000000001, 1.5, -0, inf, -inf, 10000000000000000, "
        "1.8446744073709552e+19, 123456789]")
    assert dumps([2**63, 2**64 - 1, -(2**63), True, False, None, [], {}]) == (
        "[9223372036854775808, 18446744073709551615, -9223372036854775808, true, false, "
        "null, [], {}]")
    assert dumps("\u00e9\x7f/\x00\U0001F600\b\f\n\r\t\x01\"\\ \ufffe\ud800") == (
        '"\\u00E9\\u007F/\\u0000\\uD83D\\uDE00\\b\\f\\n\\r\\t\\u0001\\"\\\\ '
        '\\uFFFD\\uFFFD"')
    assert dumps(("a", 1)) == '["a", 1]'
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_writer_handles_qemus_full_depth() -> None:
    deep: Any = 1
    for _ in range(3000):
        deep = [deep]
    assert dumps(deep) == "[" * 3000 + "1" + "]" * 3000


def test_cstr_to_str_follows_mod_utf8_codepoint() -> None:
    assert cstr_to_str(b"ab\x00cd") == "ab"
    assert cstr_to_str(b"\xc0\x80") == "\x00"
    assert cstr_to_str(b"\xc3\xa9\xff\x80") == "\u00e9\ufffd\ufffd"
    assert cstr_to_str(b"\xe2\x82") == "\ufffd"  # truncated sequence: one replacement
    assert cstr_to_str(b"\xe2\x82x") == "\ufffdx"
    assert cstr_to_str(b"\xef\xbf\xbe") == "\ufffd"  # noncharacter
    assert cstr_to_str(b"\xc0\xaf\xed\xa0\x80") == "\ufffd\ufffd"  # overlong, surrogate
    assert cstr_to_str(b"\xf8\x88\x80\x80\x80z") == "\ufffdz"  # 5-byte form


# -- cost -----------------------------------------------------------------------------------

def test_common_case_is_cheap() -> None:
    msg = b'{"execute": "block-dirty-bitmap-add", "arguments": {"node": "d0", "name": "b"}}\n'
    start = time.perf_counter()
    out = feed(msg * 10000)
    assert len(out) == 10000 and out[0]["arguments"]["name"] == "b"
    assert time.perf_counter() - start < 2.0


def test_garbage_is_linear() -> None:
    garbage = random.Random(3).randbytes(512 << 10)
    start = time.perf_counter()
    out = feed(garbage, 65536)
    assert out and all(isinstance(x, JsonParseError) or x is not None for x in out)
    assert time.perf_counter() - start < 10.0


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_JSON_VALUES)
def test_fast_writer_matches_exact_writer(value: object) -> None:
    """The C-encoder fast path must produce exactly the exact writer's bytes."""
    from virtsim.sim.qjson import _dumps_exact, dumps

    assert dumps(value) == _dumps_exact(value)
