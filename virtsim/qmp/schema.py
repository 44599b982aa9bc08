"""QAPI argument validation with QEMU 7.2's exact error texts.

QEMU checks every command's arguments with its QObject input visitor before the command
runs, and clients match on the resulting texts.  This module compiles the definitions in
:mod:`virtsim.qmp.qapi_defs` once, at import, into small checker objects that walk the
arguments the way the visitor does:

* members are visited in schema order (base first, then the union branch), so the first
  failing member in that order wins;
* unknown members are reported only after all known ones were visited, and when there are
  several the one named is the first in GLib hash-table order (reproduced exactly below);
* missing-member and type errors use the full dotted path (``file.filename``,
  ``actions[0].data.node``); enum, integer-range and alternate errors use the bare member
  name, and ``'null'`` when the value is a list element -- that is what QEMU prints.

Nothing here fills in defaults: commands see exactly what the client sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..sim.errors import SimError
from ..sim.qdict import qdict_order
from . import qapi_defs
from .qapi_defs import (
    SUPPORTED_CREATE_DRIVERS,
    SUPPORTED_DRIVERS,
    SUPPORTED_OBJECT_TYPES,
    UNSUPPORTED_DRIVERS,
)

__all__ = [
    "SUPPORTED_CREATE_DRIVERS",
    "SUPPORTED_DRIVERS",
    "SUPPORTED_OBJECT_TYPES",
    "UNSUPPORTED_DRIVERS",
    "QapiType",
    "allows_oob",
    "allows_preconfig",
    "command_names",
    "command_features",
    "command_returns",
    "has_command",
    "lookup_type",
    "validate",
    "validate_type",
]

# A visitor stack entry: (name of the container in its parent, list index or None for an
# object, parent entry).  Built only when descending, read only when an error is reported.
Frame = tuple[str | None, int | None, "Frame | None"]

_INT64_MIN = -(1 << 63)
_INT64_END = 1 << 63
_UINT64_END = 1 << 64


# ----------------------------------------------------------------------------------------
# error texts (qapi/qmp/qerror.h wording)
# ----------------------------------------------------------------------------------------
def _full_name(frame: Frame | None, name: str | None) -> str:
    """The dotted/indexed path QEMU's ``full_name()`` builds from the visitor stack."""
    parts: list[str] = []
    n = name
    f = frame
    while f is not None:
        cname, index, parent = f
        if index is None:
            parts.append("." + (n if n is not None else "<anonymous>"))
        else:
            parts.append(f"[{index}]")
        n = cname
        f = parent
    text = "".join(reversed(parts))
    if n is not None:
        return n + text
    if text.startswith("."):
        return text[1:]
    return text or "<anonymous>"


def _bare(name: str | None) -> str:
    """QEMU's ``name ? name : "null"``, used by enum, int-range and alternate errors."""
    return name if name is not None else "null"


def _type_error(frame: Frame | None, name: str | None, expected: str) -> SimError:
    return SimError(f"Invalid parameter type for '{_full_name(frame, name)}', "
                    f"expected: {expected}")


def _value_error(label: str, expected: str) -> SimError:
    return SimError(f"Parameter '{label}' expects {expected}")


# ----------------------------------------------------------------------------------------
# GLib hash-table order, for "Parameter 'x' is unexpected" when several keys are unknown
# ----------------------------------------------------------------------------------------
# QEMU copies the object's keys (in QDict order) into a GHashTable, removes each key as
# its member is visited, and reports the first key left in the table's slot order.  GLib
# 2.74 (Debian 12) uses g_str_hash (djb2 over *signed* chars), buckets (hash * 11) % prime,
# quadratic probing over a power-of-two table, tombstones on removal, and an in-place
# rehash when the table grows past 15/16 or shrinks below 1/4.
_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
              65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213,
              33554393, 67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647)
_MASK32 = 0xFFFFFFFF


def _g_str_hash(key: str) -> int:
    h = 5381
    for b in key.encode("utf-8"):
        if b >= 128:
            b -= 256
        h = (h * 33 + b) & _MASK32
    return h if h > 1 else 2


class GHashTableModel:
    """Just enough of GLib 2.74's GHashTable to reproduce its iteration order."""

    __slots__ = ("size", "mod", "mask", "nnodes", "noccupied", "hashes", "keys")

    def __init__(self) -> None:
        self.size = self.mod = self.mask = self.nnodes = self.noccupied = 0
        self._set_shift(3)
        self.hashes = [0] * self.size
        self.keys: list[str | None] = [None] * self.size

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, h: int) -> int:
        return ((h * 11) & _MASK32) % self.mod

    def _lookup(self, key: str) -> tuple[int, int]:
        h = _g_str_hash(key)
        i = self._index(h)
        step = 0
        tombstone = -1
        while self.hashes[i] != 0:
            if self.hashes[i] == h and self.keys[i] == key:
                return i, h
            if self.hashes[i] == 1 and tombstone < 0:
                tombstone = i
            step += 1
            i = (i + step) & self.mask
        return (tombstone if tombstone >= 0 else i), h

    def insert(self, key: str) -> None:
        i, h = self._lookup(key)
        old = self.hashes[i]
        if old >= 2:
            return
        self.hashes[i] = h
        self.keys[i] = key
        self.nnodes += 1
        if old == 0:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        i, _ = self._lookup(key)
        if self.hashes[i] < 2:
            return
        self.hashes[i] = 1
        self.keys[i] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        occ = self.noccupied
        if (self.size > self.nnodes * 4 and self.size > 8) or self.size <= occ + occ // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        n = int(self.nnodes * 1.333)
        shift = 0
        while n:
            n >>= 1
            shift += 1
        self._set_shift(max(shift, 3))
        if self.size > old_size:
            self.hashes += [0] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        placed = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = 0
                continue
            if placed[i]:
                continue
            self.hashes[i] = 0
            key = self.keys[i]
            self.keys[i] = None
            while True:
                step = 0
                j = self._index(node_hash)
                while placed[j]:
                    step += 1
                    j = (j + step) & self.mask
                placed[j] = True
                replaced = self.hashes[j]
                self.hashes[j] = node_hash
                if replaced < 2:
                    self.keys[j] = key
                    break
                node_hash = replaced
                key, self.keys[j] = self.keys[j], key
        if self.size < old_size:
            del self.hashes[self.size:]
            del self.keys[self.size:]
        self.noccupied = self.nnodes

    def order(self) -> list[str]:
        """Keys in ``g_hash_table_iter_next`` order."""
        return [k for h, k in zip(self.hashes, self.keys, strict=True)
                if h >= 2 and k is not None]


def first_unexpected(keys: Iterable[str], consumed: Iterable[str]) -> str | None:
    """The key QEMU names after inserting ``keys`` (QDict order) and removing ``consumed``."""
    table = GHashTableModel()
    for k in qdict_order(dict.fromkeys(keys)):
        table.insert(k)
    for k in consumed:
        table.remove(k)
    left = table.order()
    return left[0] if left else None


# ----------------------------------------------------------------------------------------
# compiled types
# ----------------------------------------------------------------------------------------
class QapiType:
    """A compiled QAPI type; ``check`` raises SimError exactly where QEMU's visitor would."""

    __slots__ = ("name", "kind")

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        raise NotImplementedError

    def qtypes(self) -> tuple[type, ...]:
        """The Python types (JSON kinds) an alternate dispatches to this branch."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<QapiType {self.kind} {self.name}>"


class _Str(QapiType):
    __slots__ = ()

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        if type(value) is not str:
            raise _type_error(frame, name, "string")

    def qtypes(self) -> tuple[type, ...]:
        return (str,)


class _Bool(QapiType):
    __slots__ = ()

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        if type(value) is not bool:
            raise _type_error(frame, name, "boolean")

    def qtypes(self) -> tuple[type, ...]:
        return (bool,)


class _Number(QapiType):
    __slots__ = ()

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        if type(value) is not int and type(value) is not float:
            raise _type_error(frame, name, "number")

    def qtypes(self) -> tuple[type, ...]:
        return (int, float)


class _Any(QapiType):
    __slots__ = ()

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        return None

    def qtypes(self) -> tuple[type, ...]:
        return (dict, list, str, bool, int, float, type(None))


class _Null(QapiType):
    __slots__ = ()

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        if value is not None:
            raise _type_error(frame, name, "null")

    def qtypes(self) -> tuple[type, ...]:
        return (type(None),)


class _Int(QapiType):
    """Signed integers: anything that is not an int64 is a type error, then the range."""

    __slots__ = ("lo", "hi", "ctype")

    def __init__(self, name: str, bits: int) -> None:
        super().__init__(name, "builtin")
        self.lo = -(1 << (bits - 1))
        self.hi = (1 << (bits - 1)) - 1
        self.ctype = f"int{bits}_t"

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        # JSON numbers outside int64 (and all fractions) are doubles in QEMU: not integers
        if type(value) is not int or not _INT64_MIN <= value < _INT64_END:
            raise _type_error(frame, name, "integer")
        if not self.lo <= value <= self.hi:
            raise _value_error(_bare(name), self.ctype)

    def qtypes(self) -> tuple[type, ...]:
        return (int, float)


class _UInt(QapiType):
    """Unsigned integers; negative int64 values wrap around, as QEMU accepts them."""

    __slots__ = ("hi", "ctype")

    def __init__(self, name: str, bits: int) -> None:
        super().__init__(name, "builtin")
        self.hi = (1 << bits) - 1
        self.ctype = f"uint{bits}_t"

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        if type(value) is not int or not _INT64_MIN <= value < _UINT64_END:
            raise _value_error(_full_name(frame, name), "uint64")
        if value < 0:
            value += _UINT64_END
        if value > self.hi:
            raise _value_error(_bare(name), self.ctype)

    def qtypes(self) -> tuple[type, ...]:
        return (int, float)


class _Enum(QapiType):
    __slots__ = ("values", "value_set", "features")

    def __init__(self, name: str, values: tuple[str, ...],
                 features: dict[str, tuple[str, ...]]) -> None:
        super().__init__(name, "enum")
        self.values = values
        self.value_set = frozenset(values)
        self.features = features

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        if type(value) is not str:
            raise _type_error(frame, name, "string")
        if value not in self.value_set:
            raise SimError(f"Parameter '{_bare(name)}' does not accept value '{value}'")

    def qtypes(self) -> tuple[type, ...]:
        return (str,)


class _List(QapiType):
    __slots__ = ("element",)

    def __init__(self, element: QapiType) -> None:
        super().__init__(f"[{element.name}]", "array")
        self.element = element

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        if type(value) is not list:
            raise _type_error(frame, name, "array")
        element = self.element
        for i, item in enumerate(value):
            element.check(item, None, (name, i, frame))

    def qtypes(self) -> tuple[type, ...]:
        return (list,)


# (member name, optional, type)
Member = tuple[str, bool, QapiType]


class _Object(QapiType):
    """A struct, or a flat union (``tag`` set): base members, then the tag's branch."""

    __slots__ = ("members", "keys", "tag", "branches", "features", "_branch_names")

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(name, kind)
        self.members: tuple[Member, ...] = ()
        self.keys: frozenset[str] = frozenset()
        self.tag: str | None = None
        # tag value -> (branch-only members, all members in visit order, all member names)
        self.branches: dict[str, tuple[tuple[Member, ...], tuple[Member, ...],
                                       frozenset[str]]] = {}
        self.features: dict[str, tuple[str, ...]] = {}
        self._branch_names: dict[str, str] = {}

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        if type(value) is not dict:
            raise _type_error(frame, name, "object")
        inner: Frame = (name, None, frame)
        members = self.members
        keys = self.keys
        seen = 0
        for key, optional, typ in members:
            if key in value:
                typ.check(value[key], key, inner)
                seen += 1
            elif not optional:
                raise SimError(f"Parameter '{_full_name(inner, key)}' is missing")
        if self.tag is not None:
            branch, members, keys = self.branches[value[self.tag]]
            for key, optional, typ in branch:
                if key in value:
                    typ.check(value[key], key, inner)
                    seen += 1
                elif not optional:
                    raise SimError(f"Parameter '{_full_name(inner, key)}' is missing")
        if seen != len(value):
            _report_unexpected(value, members, keys, inner)

    def qtypes(self) -> tuple[type, ...]:
        return (dict,)

    def branch_type_name(self, tag_value: str) -> str | None:
        """The named type of a union branch (None for an implicitly empty one)."""
        return self._branch_names.get(tag_value)


def _report_unexpected(value: Mapping[str, Any], members: tuple[Member, ...],
                       keys: frozenset[str], frame: Frame) -> None:
    extra = [k for k in value if k not in keys]
    if len(extra) == 1:
        key: str | None = extra[0]
    else:
        key = first_unexpected(value, [m[0] for m in members if m[0] in value])
    raise SimError(f"Parameter '{_full_name(frame, key)}' is unexpected")


class _Alternate(QapiType):
    """Dispatch on the JSON kind; a kind no branch takes is named with the bare name."""

    __slots__ = ("choices", "by_type")

    def __init__(self, name: str) -> None:
        super().__init__(name, "alternate")
        self.choices: tuple[tuple[str, QapiType], ...] = ()
        self.by_type: dict[type, QapiType] = {}

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        typ = self.by_type.get(type(value))
        if typ is None:
            raise SimError(f"Invalid parameter type for '{_bare(name)}', "
                           f"expected: {self.name}")
        typ.check(value, name, frame)

    def qtypes(self) -> tuple[type, ...]:
        return tuple(self.by_type)


class _Loose(_Object):
    """A ``'gen': false`` command: QEMU only insists that its required members exist.

    The members are kept for introspection; the device model parses the rest itself.
    """

    __slots__ = ()

    def check(self, value: Any, name: str | None, frame: Frame | None) -> None:
        if type(value) is not dict:
            raise _type_error(frame, name, "object")
        for key, optional, _ in self.members:
            if not optional and key not in value:
                raise SimError(f"Parameter '{_full_name((name, None, frame), key)}' "
                               "is missing")


# ----------------------------------------------------------------------------------------
# compiler
# ----------------------------------------------------------------------------------------
_BUILTINS: dict[str, QapiType] = {
    "str": _Str("str", "builtin"),
    "bool": _Bool("bool", "builtin"),
    "number": _Number("number", "builtin"),
    "any": _Any("any", "builtin"),
    "null": _Null("null", "builtin"),
    "int": _Int("int", 64),
    "int8": _Int("int8", 8),
    "int16": _Int("int16", 16),
    "int32": _Int("int32", 32),
    "int64": _Int("int64", 64),
    "uint8": _UInt("uint8", 8),
    "uint16": _UInt("uint16", 16),
    "uint32": _UInt("uint32", 32),
    "uint64": _UInt("uint64", 64),
    "size": _UInt("size", 64),
}


class _Command:
    __slots__ = ("name", "args", "returns", "allow_oob", "allow_preconfig", "features")

    def __init__(self, name: str, args: QapiType, returns: QapiType, allow_oob: bool,
                 allow_preconfig: bool, features: tuple[str, ...]) -> None:
        self.name = name
        self.args = args
        self.returns = returns
        self.allow_oob = allow_oob
        self.allow_preconfig = allow_preconfig
        self.features = features


def _features_of(spec: Any) -> tuple[str, ...]:
    if isinstance(spec, dict):
        return tuple(spec.get("features", ()))
    return ()


class _Compiler:
    """Turns qapi_defs data into linked QapiType objects (recursion-safe)."""

    def __init__(self, definitions: list[dict[str, Any]]) -> None:
        self.defs: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, _Command] = {}
        for d in definitions:
            for meta in ("enum", "struct", "union", "alternate"):
                if meta in d:
                    if d[meta] in self.defs:
                        raise ValueError(f"duplicate QAPI type {d[meta]}")
                    self.defs[d[meta]] = d
        self.types: dict[str, QapiType] = dict(_BUILTINS)
        self._empty = _Object("q_empty", "object")
        for d in definitions:
            if "command" in d:
                self._command(d)
        for tname in self.defs:
            self.resolve(tname)

    def resolve(self, spec: Any) -> QapiType:
        if isinstance(spec, dict):
            spec = spec["type"]
        if isinstance(spec, list):
            return _List(self.resolve(spec[0]))
        typ = self.types.get(spec)
        if typ is not None:
            return typ
        d = self.defs.get(spec)
        if d is None:
            raise KeyError(f"undefined QAPI type {spec!r}")
        if "enum" in d:
            values = tuple(v if isinstance(v, str) else v["name"] for v in d["data"])
            feats = {v["name"]: tuple(v["features"]) for v in d["data"]
                     if isinstance(v, dict) and v.get("features")}
            typ = _Enum(spec, values, feats)
            self.types[spec] = typ
            return typ
        if "alternate" in d:
            alt = _Alternate(spec)
            self.types[spec] = alt
            choices = tuple((k, self.resolve(v)) for k, v in d["data"].items())
            alt.choices = choices
            for _, t in choices:
                for py in t.qtypes():
                    if py in alt.by_type:
                        raise ValueError(f"alternate {spec} is ambiguous for {py}")
                    alt.by_type[py] = t
            return alt
        obj = _Object(spec, "object")
        self.types[spec] = obj
        self._fill_object(obj, d)
        return obj

    def _members(self, data: Mapping[str, Any], feats: dict[str, tuple[str, ...]]
                 ) -> list[Member]:
        out: list[Member] = []
        for raw, spec in data.items():
            optional = raw.startswith("*")
            key = raw[1:] if optional else raw
            out.append((key, optional, self.resolve(spec)))
            if _features_of(spec):
                feats[key] = _features_of(spec)
        return out

    def _struct_members(self, d: Mapping[str, Any], feats: dict[str, tuple[str, ...]]
                        ) -> list[Member]:
        """A struct's members including its base's, base first."""
        members: list[Member] = []
        base = d.get("base")
        if isinstance(base, str):
            members += self._struct_members(self.defs[base], feats)
        elif isinstance(base, dict):
            members += self._members(base, feats)
        members += self._members(d.get("data", {}), feats)
        return members

    def _fill_object(self, obj: _Object, d: Mapping[str, Any]) -> None:
        feats: dict[str, tuple[str, ...]] = {}
        if "union" in d:
            base = self._struct_members({"base": d["base"]}, feats)
            obj.members = tuple(base)
            obj.keys = frozenset(m[0] for m in base)
            obj.tag = d["discriminator"]
            tag_type = next(m[2] for m in base if m[0] == obj.tag)
            assert isinstance(tag_type, _Enum)
            for value in tag_type.values:
                branch_name = d["data"].get(value)
                branch: list[Member] = []
                if branch_name is not None:
                    obj._branch_names[value] = branch_name
                    branch = self._struct_members(self.defs[branch_name], feats)
                everything = tuple(base + branch)
                obj.branches[value] = (tuple(branch), everything,
                                       frozenset(m[0] for m in everything))
        else:
            members = self._struct_members(d, feats)
            obj.members = tuple(members)
            obj.keys = frozenset(m[0] for m in members)
        obj.features = feats

    def _inline(self, cname: str, data: Any) -> QapiType:
        """A command's argument type; 'boxed' or not, QEMU visits it the same way."""
        if data is None:
            return self._empty
        if isinstance(data, str):
            return self.resolve(data)
        obj = _Object(f"q_obj_{cname}-arg", "object")
        self._fill_object(obj, {"data": data})
        return obj

    def _command(self, d: Mapping[str, Any]) -> None:
        name = d["command"]
        if d.get("gen", True) is False:
            loose = _Loose(f"q_obj_{name}-arg", "object")
            self._fill_object(loose, {"data": d.get("data", {})})
            args: QapiType = loose
        else:
            args = self._inline(name, d.get("data"))
        ret_spec = d.get("returns")
        returns = self._empty if ret_spec is None else self.resolve(ret_spec)
        self.commands[name] = _Command(name, args, returns, bool(d.get("allow-oob")),
                                       bool(d.get("allow-preconfig")),
                                       tuple(d.get("features", ())))


_SCHEMA = _Compiler(qapi_defs.DEFINITIONS)
_COMMANDS = _SCHEMA.commands


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------
def validate(command: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    """Check ``arguments`` for ``command`` as QEMU's marshaller does; return them unchanged.

    Raises SimError (GenericError) with QEMU's text on the first problem, or
    CommandNotFound for a command the schema does not define.
    """
    cmd = _COMMANDS.get(command)
    if cmd is None:
        raise SimError(f"The command {command} has not been found", "CommandNotFound")
    if arguments is None:
        arguments = {}
    elif type(arguments) is not dict:
        raise SimError("QMP input member 'arguments' must be an object")
    cmd.args.check(arguments, None, None)
    return arguments


def validate_type(type_name: str, value: Any, name: str | None = None) -> Any:
    """Validate ``value`` as the named QAPI type (e.g. ``-blockdev`` JSON as BlockdevOptions).

    With ``name`` None the value is the visit's root (QEMU's command-line case); otherwise it
    is checked as member ``name`` of a root object, so paths read ``name.member``.
    """
    typ = lookup_type(type_name)
    if name is None:
        typ.check(value, None, None)
    else:
        typ.check(value, name, (None, None, None))
    return value


def lookup_type(type_name: str) -> QapiType:
    """The compiled type (``[T]`` for lists); KeyError if undefined."""
    if type_name.startswith("[") and type_name.endswith("]"):
        return _List(lookup_type(type_name[1:-1]))
    return _SCHEMA.types[type_name]


def command_names() -> list[str]:
    """Every defined command, in definition order (for query-commands)."""
    return list(_COMMANDS)


def has_command(name: str) -> bool:
    """Whether the schema defines ``name`` (unknown names are CommandNotFound)."""
    return name in _COMMANDS


def allows_oob(name: str) -> bool:
    """Whether ``exec-oob`` is allowed; no command virtsim defines is OOB-capable."""
    cmd = _COMMANDS.get(name)
    return cmd is not None and cmd.allow_oob


def allows_preconfig(name: str) -> bool:
    """Whether the command runs before machine init (``--preconfig``), as observed."""
    cmd = _COMMANDS.get(name)
    return cmd is not None and cmd.allow_preconfig


def command_features(name: str) -> tuple[str, ...]:
    """Schema features of a command (``deprecated``, ``unstable``, ...)."""
    return _COMMANDS[name].features


def command_arguments(name: str) -> QapiType:
    """The compiled argument type of a command (for introspection and tests)."""
    return _COMMANDS[name].args


def command_returns(name: str) -> QapiType:
    """The compiled return type of a command (documentation; replies are not checked)."""
    return _COMMANDS[name].returns
