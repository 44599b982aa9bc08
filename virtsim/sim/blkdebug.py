"""``driver: blkdebug`` — QEMU's fault-injection filter, as backup tests use it.

Backup tooling proves its error handling by putting a blkdebug node between a format and its
file (or under a job's target) and letting QEMU fail chosen requests.  What matters, and what
this mirrors from QEMU 7.2 (observed on the binary):

* **Events arm rules; requests trip them.**  A rule does nothing until its ``event`` is raised
  *on this node*: ``read_aio``/``write_aio`` (and ``read_backing_aio``, ``l2_load``) by the
  format above it when it does data I/O on its file, ``flush_to_os``/``flush_to_disk`` when
  that parent flushes, ``pwritev``/``pwritev_zero``/``pwritev_done`` by the generic write path
  of this node itself.  Raising an event that has inject-error rules for the current state
  *replaces* the list of armed rules.  Every later request through this node (any I/O type in
  the rule's mask: by default read, write, write-zeroes, discard and flush, not block-status)
  is then checked against the armed rules, so an armed ``write_aio`` rule also fails reads.
* **Matching**: the first armed rule (in definition order) whose ``sector`` lies inside the
  request (``sector`` absent: any request; flushes have no range and only match those) and
  whose ``iotype`` fits decides; ``errno: 0`` makes it a non-failing match, a negative errno
  never fails.  ``once`` disarms and deletes the rule once it has failed a request.
* **State machine**: the state starts at 1; ``state`` (0 or absent: any) restricts a rule to
  one state; ``set-state`` rules switch it after all rules of the event were processed.
* ``immediately`` only changes QEMU's coroutine scheduling (the error comes back on a later
  loop iteration): in the simulator every error is immediate.

``flush_to_disk`` (and the node's own flush check) happen only when something was written
since the last flush, as QEMU's write generation decides.  ``config`` files are read (QEMU's
``[inject-error]``/``[set-state]`` format); their rules come before the options' rules.

Not modelled: request alignment/splitting from ``align`` and ``max-transfer`` (validated and
shown, but requests are not split or read-modify-written, so ``pwritev_rmw_*`` never fire);
qcow2 metadata events other than ``l2_load`` (refcount/L1 events, ``cluster_alloc``...,
``cow_read``/``cow_write``) and ``cor_write``; qcow2 raises ``flush_to_os`` and
``flush_to_disk`` before writing back its metadata rather than around it.
"""

from __future__ import annotations

import errno as _errno
import os
import re
from dataclasses import dataclass
from typing import Any

from . import perm as P
from .block import BlockGraph, DriverSpec, Node, register_driver
from .errors import SimError
from .qdict import qdict_order

IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
_DEFAULT_MASK = frozenset(IOTYPES[:5])
_INT_MAX = (1 << 31) - 1
_SIZE_OPTS = ("align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
              "max-discard")
_PERMS = {"consistent-read": P.CONSISTENT_READ, "write": P.WRITE,
          "write-unchanged": P.WRITE_UNCHANGED, "resize": P.RESIZE}


@dataclass(eq=False)
class Rule:
    """One ``inject-error`` (``new_state is None``) or ``set-state`` rule."""

    event: str
    state: int = 0
    # inject-error
    error: int = _errno.EIO
    offset: int = -1  # byte offset of ``sector``; -1 = any request
    once: bool = False
    immediately: bool = False
    iotypes: frozenset[str] = _DEFAULT_MASK
    # set-state
    new_state: int | None = None


_GROUPS = {
    "inject-error": {"event": "str", "state": "num", "iotype": "str", "errno": "num",
                     "sector": "num", "once": "bool", "immediately": "bool"},
    "set-state": {"event": "str", "state": "num", "new_state": "num"},
}
# QAPI BlkdebugEvent, in schema order (a test keeps it equal to virtsim.qmp.qapi_defs')
EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load",
    "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
    "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero", "pwritev_done",
    "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters",
    "cor_write", "cluster_alloc_space", "none")


def _c_number(text: str) -> int | None:
    """strtoull with base 0: optional sign, 0x hex, leading-0 octal, else decimal."""
    t = text.strip()
    neg = t.startswith("-")
    if t[:1] in "+-":
        t = t[1:]
    try:
        if t[:2].lower() == "0x":
            n = int(t[2:], 16)
        elif len(t) > 1 and t[0] == "0":
            n = int(t[1:], 8)
        else:
            n = int(t, 10)
    except ValueError:
        return None
    return -n if neg else n


def _config_value(name: str, kind: str, value: str) -> Any:
    if kind == "num":
        n = _c_number(value)
        if n is None:
            raise SimError(f"Parameter '{name}' expects a number")
        return n
    if kind == "bool":
        if value in ("on", "yes", "true", "y"):
            return True
        if value in ("off", "no", "false", "n"):
            return False
        raise SimError(f"Parameter '{name}' expects 'on' or 'off'")
    return value


_GROUP_ID_RE = re.compile(r'\[(\S{1,63})\s*"[^"]{1,63}"\]')
_GROUP_RE = re.compile(r"\[([^\]]{1,63})\]")
_OPT_RE = re.compile(r'\s*(\S{1,63})\s*=\s*"([^"]*)"')
_ARG_RE = re.compile(r"\s*(\S{1,63})")


def parse_config(path: str) -> tuple[dict[str, list[dict[str, Any]]], str | None]:
    """A blkdebug config file (QEMU's qemu_config_parse format), as rule option dicts.

    ``[inject-error]`` / ``[set-state]`` groups of ``name = "value"`` lines; like QEMU, a
    line with a bare word counts as ``word = ""``.  Syntax errors and rule errors (event,
    iotype) raise at once.  QEMU 7.2 checks a group's name and members only when the group
    is complete, and such an error does not stop the open at once: the image is still
    opened (observed: it takes an auto node-name) before the error is reported.  That error
    is returned as the second item for the caller to raise after opening the image.
    """
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise SimError(f"Could not read blkdebug config file: "
                       f"{os.strerror(e.errno or _errno.EIO)}") from None
    groups: dict[str, list[dict[str, Any]]] = {"inject-error": [], "set-state": []}
    deferred: list[str] = []
    current: tuple[str, list[tuple[str, str]]] | None = None

    def close_group() -> None:
        if current is None or deferred:
            return
        name, items = current
        spec = _GROUPS.get(name)
        if spec is None:
            deferred.append(f"There is no option group '{name}'")
            return
        opts: dict[str, Any] = {}
        try:
            for arg, value in items:
                kind = spec.get(arg)
                if kind is None:
                    raise SimError(f"Invalid parameter '{arg}'")
                opts[arg] = _config_value(arg, kind, value)
        except SimError as e:
            deferred.append(e.desc)
            return
        groups[name].append(opts)

    for line in lines[:-1] if lines and lines[-1] == "" else lines:
        if line == "" or line.startswith("#"):
            continue
        m = _GROUP_ID_RE.match(line) or _GROUP_RE.match(line)
        if m:
            close_group()
            current = (m.group(1), [])
            continue
        m = _OPT_RE.match(line)
        if m:
            arg, value = m.group(1), m.group(2)
        else:
            m = _ARG_RE.match(line)
            if not m:
                raise SimError("parse error")
            arg, value = m.group(1), ""
        if current is None:
            raise SimError("no group defined")
        current[1].append((arg, value))
    close_group()
    if deferred:
        return groups, deferred[0]
    for group in ("inject-error", "set-state"):
        for opts in groups[group]:
            event = opts.get("event")
            if event is None:
                raise SimError("Missing event name for rule")
            if event not in EVENTS:
                raise SimError(f"invalid parameter value: {event}")
            iotype = opts.get("iotype")
            if iotype is not None and iotype not in IOTYPES:
                raise SimError(f"invalid parameter value: {iotype}")
    return groups, None


def _precheck(options: dict[str, Any]) -> None:
    """What QEMU rejects while parsing the options, before the image child is opened."""
    for name in _SIZE_OPTS:
        if name in options and int(options[name]) < 0:
            raise SimError(f"Parameter '{name}' expects a non-negative number below 2^64")
    config = options.get("config")
    if config is not None:
        parse_config(str(config))  # the deferred kind of error is raised by the open


def _check_limits(options: dict[str, Any]) -> dict[str, int]:
    """blkdebug_open's checks, made once the image is open (same order and texts)."""
    v = {k: int(options.get(k, 0)) for k in _SIZE_OPTS}
    align = v["align"]
    if align and (align >= _INT_MAX or align & (align - 1)):
        raise SimError(f"Cannot meet constraints with align {align}")
    base = max(align, 1)  # a file/null child has request_alignment 1

    def check(name: str, multiple_of: int) -> None:
        val = v[name]
        if val and (val >= _INT_MAX or val % multiple_of):
            raise SimError(f"Cannot meet constraints with {name} {val}")

    check("max-transfer", base)
    check("opt-write-zero", base)
    check("max-write-zero", max(v["opt-write-zero"], base))
    check("opt-discard", base)
    check("max-discard", max(v["opt-discard"], base))
    return v


_TOP_ORDER = ("config",) + _SIZE_OPTS + ("inject-error", "set-state")
_RULE_ORDER = ("event", "state", "iotype", "errno", "sector", "once", "immediately",
               "new_state")


def _iterate(keys: list[str]) -> list[str]:
    """Keys in QDict iteration order, given their insertion order."""
    return list(qdict_order(dict.fromkeys(keys)))


def _flat_keys(options: dict[str, Any]) -> list[str]:
    """The order ``qdict_flatten`` inserts the strong options' flattened keys in.

    It walks each dictionary (QAPI schema order as inserted) in QDict order, list elements
    in list order.
    """
    out: list[str] = []
    top = [k for k in _TOP_ORDER if k in options]
    for key in _iterate(top):
        value = options[key]
        if not isinstance(value, list):
            continue  # top-level scalars stay where they were inserted
        for i, elem in enumerate(value):
            fields = [f for f in _RULE_ORDER if f in elem]
            out.extend(f"{key}.{i}.{f}" for f in _iterate(fields))
    return [k for k in top if not isinstance(options[k], list)] + out


def _strong_order(options: dict[str, Any], prefix: list[str]) -> list[str]:
    """Insertion order of the strong options in ``full_open_options``.

    Observed on QEMU 7.2 (and reproduced by replaying its QDict copies): blockdev-add
    flattens the options, every bdrv_open clones them once, and every inline level extracts
    the child's ``role.`` subset; each copy re-inserts keys in iteration order.
    """
    pre = "".join(p + "." for p in prefix)
    keys = _iterate([pre + k for k in _flat_keys(options)])
    for part in prefix:
        keys = [k[len(part) + 1:] for k in _iterate(keys)]  # extract "role."
        keys = _iterate(keys)  # the child's clone
    return keys


def _get_path(options: dict[str, Any], key: str) -> Any:
    top, _, rest = key.partition(".")
    value = options[top]
    if not rest:
        return value
    idx, _, field = rest.partition(".")
    return value[int(idx)][field]


def _inline_prefix(node: Node) -> list[str]:
    """The roles leading from the blockdev-add root down to ``node`` while it is inline."""
    for e in node.parents:
        parent = e.parent
        if isinstance(parent, Node) and isinstance(parent.options.get(e.role), dict):
            return _inline_prefix(parent) + [e.role]
    return []


class BlkdebugNode(Node):
    """The blkdebug filter over its ``image`` child."""

    drv = "blkdebug"
    is_filter = True

    def __init__(self, graph: BlockGraph, options: dict[str, Any]) -> None:
        super().__init__(graph, options)
        conf: dict[str, list[dict[str, Any]]] = {}
        if "config" in options:
            conf, deferred = parse_config(str(options["config"]))
            if deferred is not None:
                raise SimError(deferred)
        self.limits = _check_limits(options)
        self.state = 1
        self.rules: dict[str, list[Rule]] = {}
        self.active: list[Rule] = []
        for spec in conf.get("inject-error", []) + list(options.get("inject-error", [])):
            iotype = spec.get("iotype")
            sector = int(spec.get("sector", -1))
            self._add(Rule(str(spec["event"]), int(spec.get("state", 0)),
                           error=int(spec.get("errno", _errno.EIO)),
                           offset=-1 if sector == -1 else sector * 512,
                           once=bool(spec.get("once", False)),
                           immediately=bool(spec.get("immediately", False)),
                           iotypes=frozenset({iotype}) if iotype else _DEFAULT_MASK))
        for spec in conf.get("set-state", []) + list(options.get("set-state", [])):
            self._add(Rule(str(spec["event"]), int(spec.get("state", 0)),
                           new_state=int(spec.get("new_state", 0))))
        self.take = 0
        for name in options.get("take-child-perms", []):
            self.take |= _PERMS[name]
        self.unshare = 0
        for name in options.get("unshare-child-perms", []):
            self.unshare |= _PERMS[name]

    def _add(self, rule: Rule) -> None:
        # QEMU inserts at the head of the event's list
        self.rules.setdefault(rule.event, []).insert(0, rule)

    # ----- the rule engine ---------------------------------------------------------------
    def debug_event(self, event: str) -> None:
        """An event raised on this node: arm its inject-error rules, apply set-state."""
        new_state = self.state
        armed = 0
        for rule in list(self.rules.get(event, [])):
            if rule.state and rule.state != self.state:
                continue
            if rule.new_state is not None:
                new_state = rule.new_state
                continue
            armed += 1
            if armed == 1:
                self.active = []  # the first armed rule of an event replaces the list
            self.active.insert(0, rule)
        self.state = new_state

    def check(self, iotype: str, offset: int, length: int) -> None:
        """QEMU's rule_check: raise the armed rule's errno for a matching request."""
        for rule in self.active:
            if (rule.offset == -1 or (length and offset <= rule.offset < offset + length)) \
                    and iotype in rule.iotypes:
                break
        else:
            return
        err = rule.error
        if not err:
            return
        if rule.once:
            self.active.remove(rule)
            lst = self.rules.get(rule.event, [])
            if rule in lst:
                lst.remove(rule)
        if err > 0:
            raise OSError(err, os.strerror(err))

    # ----- identity ---------------------------------------------------------------------
    @property
    def file(self) -> Node | None:
        """QEMU's ``bs->file`` of a blkdebug node is its ``image`` child."""
        e = self.children.get("image")
        return e.child if e else None

    def _image(self) -> Node:
        img = self.file
        assert img is not None
        return img

    def strong_options(self) -> dict[str, Any]:
        order = _strong_order(self.options, _inline_prefix(self))
        return {k: _get_path(self.options, k) for k in order}

    def exact_filename(self) -> str | None:
        """``blkdebug:CONFIG:FILE`` when nothing but the config and the image describe it."""
        img = self.file
        inner = img.exact_filename() if img is not None else None
        if not inner or any(k != "config" for k in self.strong_options()):
            return None
        return f"blkdebug:{self.options.get('config', '')}:{inner}"

    def length(self) -> int:
        return self._image().length()

    def _check_request(self, offset: int, length: int) -> None:
        # a filter grows with its image (qcow2 allocates by writing past the file's end)
        self._image()._check_request(offset, length)

    def has_get_info(self) -> bool:
        return self._image().has_get_info()

    def actual_size(self) -> int | None:
        return None  # a protocol driver without the callback: QEMU omits actual-size

    def child_perms(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        return perm | self.take, shared & ~self.unshare

    # ----- I/O --------------------------------------------------------------------------
    def _drv_read(self, offset: int, length: int) -> bytes:
        self.check("read", offset, length)
        return self._image().read(offset, length)

    def _drv_write(self, offset: int, data: bytes) -> None:
        self.debug_event("pwritev")
        try:
            self.check("write", offset, len(data))
            self._image().write(offset, data)
        finally:
            self.debug_event("pwritev_done")

    def _drv_write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.debug_event("pwritev_zero")
        try:
            self.check("write-zeroes", offset, length)
            self._image().write_zeroes(offset, length, unmap)
        finally:
            self.debug_event("pwritev_done")

    def _drv_discard(self, offset: int, length: int) -> None:
        self.check("discard", offset, length)
        self._image().discard(offset, length)

    def flush(self) -> None:
        """Checked only when something was written through the node since the last
        successful flush (QEMU's write generation), then the image flushes."""
        img = self._image()
        img.debug_event("flush_to_os")
        if self.write_gen != self.flushed_gen and not self.read_only:
            gen = self.write_gen
            img.debug_event("flush_to_disk")
            self.check("flush", 0, 0)
            self.flushed_gen = gen
        img.flush()

    def _drv_block_status(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        self.check("block-status", offset, length)
        return self._image().block_status(offset, length)


def _open(graph: BlockGraph, options: dict[str, Any], children: dict[str, Node]) -> Node:
    return BlkdebugNode(graph, options)


register_driver("blkdebug", DriverSpec(_open, ("image",), precheck=_precheck,
                                                named_first=True))
