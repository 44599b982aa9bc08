"""Differential conformance harness: run one scenario script against an emulator and
record a transcript that can be compared, after normalisation, with real QEMU's.

Why a harness of our own instead of a QMP client library: the comparison has to be
byte-strict (key order, escaping, number formatting, CRLF framing, error texts), has to
send malformed input, and has to see every event in arrival order. See README.md in this
folder for the scenario language and every normalisation rule.

Usage (debugging): ``python -m tests.differential.harness SCENARIO [--backend qemu|virtsim]``.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import difflib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
SCENARIO_DIR = HERE / "scenarios"
REPO = HERE.parent.parent

#: Seconds to wait for a reply to a command (only reached when something is wrong).
REPLY_TIMEOUT = float(os.environ.get("VIRTSIM_DIFF_TIMEOUT", "10"))
#: Seconds to wait for the QMP socket of a starting emulator.
START_TIMEOUT = float(os.environ.get("VIRTSIM_DIFF_START_TIMEOUT", "15"))
#: Seconds a shell step may run.
SHELL_TIMEOUT = 60.0
#: The id of the command the harness sends after the last step to flush stray messages.
BARRIER_ID = "harness-barrier"


class ScenarioError(Exception):
    """A scenario file is malformed (a bug in the scenario, not in an emulator)."""


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Step:
    """One line (plus continuation lines) of a scenario."""

    kind: str  # start, kill, close, connect, send, raw, event, eof, shell, commands
    arg: str  # the text after the directive, as written (``$W`` not substituted)
    line: int
    count: int = 1  # replies to wait for (raw steps)
    timeout: float | None = None


@dataclass(frozen=True)
class Scenario:
    """A parsed scenario file."""

    path: Path
    title: str
    steps: tuple[Step, ...]

    @property
    def name(self) -> str:
        return self.path.stem

    def uses_shell(self) -> bool:
        return any(s.kind == "shell" for s in self.steps)


_REPEAT_RE = re.compile(r"\$\[(\d+)\*((?:[^\]\\]|\\.)*)\]")


def _expand_repeat(m: re.Match[str]) -> str:
    return re.sub(r"\\(.)", r"\1", m.group(2)) * int(m.group(1))


_RAW_RE = re.compile(r"^>(raw|esc)(?::(\d+))? ?(.*)$", re.S)


def parse_scenario(path: Path | str) -> Scenario:
    """Parse a ``.qmp`` scenario file (format: README.md, "Scenario language")."""
    path = Path(path)
    title = ""
    steps: list[Step] = []
    pending: list[tuple[int, str]] = []  # (line number, text) of the step being built

    def flush() -> None:
        if not pending:
            return
        lineno, text = pending[0]
        text = "\n".join([text] + [t for _, t in pending[1:]])
        pending.clear()
        steps.append(_parse_step(path, lineno, text))

    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line[:1] in (" ", "\t") and line.strip() and pending:
            pending.append((lineno, line))  # continuation of the previous step
            continue
        flush()
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            m = re.match(r"#\s*title:\s*(.*)$", stripped)
            if m and not title:
                title = m.group(1).strip()
            continue
        pending.append((lineno, line.rstrip("\n")))
    flush()
    if not title:
        raise ScenarioError(f"{path}: missing '# title:' line")
    for s in steps:
        if s.kind == "start":
            break
        if s.kind != "shell":
            raise ScenarioError(f"{path}:{s.line}: only '$' steps may come before '!start'")
    else:
        raise ScenarioError(f"{path}: no '!start' step")
    return Scenario(path, title, tuple(steps))


def _parse_step(path: Path, lineno: int, text: str) -> Step:
    where = f"{path.name}:{lineno}"
    if text.startswith(">raw") or text.startswith(">esc"):
        m = _RAW_RE.match(text)
        if not m:
            raise ScenarioError(f"{where}: bad raw step")
        if m.group(1) == "esc":
            try:
                codecs.escape_decode(m.group(3).encode("utf-8"))
            except ValueError as exc:
                raise ScenarioError(f"{where}: bad escape: {exc}") from None
        return Step(m.group(1), m.group(3), lineno, count=int(m.group(2) or 1))
    if text.startswith(">"):
        body = text[1:].strip()
        try:
            json.loads(_REPEAT_RE.sub("x", body).replace("$W", "/w"))
        except ValueError as exc:
            raise ScenarioError(f"{where}: '>' needs valid JSON (use >raw): {exc}") from None
        return Step("send", body, lineno)
    if text.startswith("$"):
        return Step("shell", text[1:].strip(), lineno)
    if text.startswith("@event"):
        parts = text.split()
        if len(parts) not in (2, 3):
            raise ScenarioError(f"{where}: '@event NAME [TIMEOUT]'")
        return Step("event", parts[1], lineno, timeout=float(parts[2]) if len(parts) == 3 else None)
    if text.startswith("@eof"):
        parts = text.split()
        return Step("eof", "", lineno, timeout=float(parts[1]) if len(parts) == 2 else None)
    if text.strip() == "?bitmaps":
        return Step("bitmaps", "", lineno)
    if text.startswith("?commands"):
        names = text.split()[1:]
        if not names:
            raise ScenarioError(f"{where}: '?commands NAME...'")
        return Step("commands", " ".join(names), lineno)
    if text.startswith("!"):
        word, _, rest = text[1:].partition(" ")
        if word in ("start", "kill", "close", "connect"):
            if word != "start" and rest.strip():
                raise ScenarioError(f"{where}: '!{word}' takes no argument")
            return Step(word, rest.strip(), lineno)
    raise ScenarioError(f"{where}: cannot parse step {text!r}")


def all_scenarios() -> list[Path]:
    """Every scenario file, sorted by name."""
    return sorted(SCENARIO_DIR.glob("*.qmp"))


# --------------------------------------------------------------------------- JSON


class RawNumber(str):
    """A JSON number kept as its exact text (QEMU prints doubles with %.17g, '-0', ...)."""


def parse_json(text: str) -> Any:
    """Parse preserving key order and the exact text of numbers."""
    return json.loads(
        text,
        parse_int=RawNumber,
        parse_float=RawNumber,
        parse_constant=RawNumber,
        object_pairs_hook=_no_dup_pairs,
    )


class DuplicateKeyError(ValueError):
    pass


def _no_dup_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _qemu_str(s: str) -> str:
    """Quote like QEMU's qobject/qjson.c: ASCII only, upper-case \\uXXXX, surrogate pairs."""
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0x20 <= cp <= 0x7E:
            out.append(ch)
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        else:
            out.append(f"\\u{cp:04X}")
    out.append('"')
    return "".join(out)


def qemu_dumps(obj: Any, indent: int | None = None, _level: int = 0) -> str:
    """Serialise the way QEMU does (``{"a": 1, "b": [1, 2]}``); with indent, the same tokens
    laid out one member a line, for readable diffs."""
    if isinstance(obj, RawNumber):
        return str(obj)
    if isinstance(obj, str):
        return _qemu_str(obj)
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if obj is None:
        return "null"
    if isinstance(obj, int | float):
        return json.dumps(obj)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{_qemu_str(k)}: {qemu_dumps(v, indent, _level + 1)}" for k, v in obj.items()]
        return _join("{", items, "}", indent, _level)
    if isinstance(obj, list):
        if not obj:
            return "[]"
        return _join("[", [qemu_dumps(v, indent, _level + 1) for v in obj], "]", indent, _level)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _join(open_: str, items: list[str], close: str, indent: int | None, level: int) -> str:
    if indent is None:
        return open_ + ", ".join(items) + close
    pad = " " * (indent * (level + 1))
    return open_ + "\n" + ",\n".join(pad + i for i in items) + "\n" + " " * (indent * level) + close


def pretty(obj: Any, width: int = 100, _col: int = 0) -> str:
    """QEMU's tokens, but containers that do not fit in ``width`` columns are broken up one
    member a line (2-space indent), so a diff points at the member that differs."""
    flat = qemu_dumps(obj)
    if len(flat) + _col <= width or not isinstance(obj, dict | list) or not obj:
        return flat
    pad = " " * (_col + 2)
    if isinstance(obj, dict):
        parts = []
        for k, v in obj.items():
            key = f"{_qemu_str(k)}: "
            parts.append(pad + key + _pretty_tail(v, width, _col + 2, len(key)))
        return "{\n" + ",\n".join(parts) + "\n" + " " * _col + "}"
    return (
        "[\n" + ",\n".join(pad + pretty(v, width, _col + 2) for v in obj) + "\n" + " " * _col + "]"
    )


def _pretty_tail(v: Any, width: int, col: int, keylen: int) -> str:
    flat = qemu_dumps(v)
    if col + keylen + len(flat) <= width or not isinstance(v, dict | list) or not v:
        return flat
    return pretty(v, width, col)


# --------------------------------------------------------------------------- transcripts


@dataclass
class Item:
    """One recorded thing. ``kind``: title, start, send, recv, shell, out, err, commands, note."""

    kind: str
    text: str  # raw text (received line, sent script text, output line, note)
    extra: Any = None


@dataclass
class RunContext:
    """What normalisation needs to know about one run."""

    workdirs: list[str] = field(default_factory=list)
    sockdirs: list[str] = field(default_factory=list)
    progs: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0


@dataclass
class Transcript:
    """What happened when a scenario ran on one backend."""

    scenario: str
    backend: str
    items: list[Item] = field(default_factory=list)
    ctx: RunContext = field(default_factory=RunContext)

    def add(self, kind: str, text: str, extra: Any = None) -> None:
        self.items.append(Item(kind, text, extra))

    def messages(self) -> list[Any]:
        """Every received QMP message, parsed (unparseable lines are skipped)."""
        out = []
        for it in self.items:
            if it.kind in ("recv", "bitmaps"):
                try:
                    out.append(json.loads(it.text))
                except (ValueError, RecursionError):
                    pass
        return out

    def reply(self, msg_id: Any) -> dict[str, Any] | None:
        """The reply carrying ``id`` == msg_id, if any."""
        for m in self.messages():
            if isinstance(m, dict) and "id" in m and m["id"] == msg_id:
                return m
        return None

    def render(self, normalise: bool = True, sort_keys: bool = False) -> str:
        """The transcript as text; the normalised form is what the differential test compares."""
        return Renderer(self.ctx, normalise, sort_keys).render(self.items)


class Renderer:
    """Turn items into text, applying the normalisation rules of README.md when asked."""

    _NODE_RE = re.compile(r"#block(\d+)(\d\d)(?!\d)")
    _QEMU_IO_RATE = re.compile(
        r"^(?P<head>\S+ \S+, \d+ ops); \S+ sec \(\S+ \S+/sec and \S+ ops/sec\)$"
    )

    def __init__(self, ctx: RunContext, normalise: bool, sort_keys: bool) -> None:
        self.ctx = ctx
        self.normalise = normalise
        self.sort_keys = sort_keys
        self.version: tuple[str, str] | None = None  # ("7.2.22", package) from the greeting
        paths: list[tuple[str, str]] = []
        for d in ctx.workdirs:
            paths += [(d, "$W"), (os.path.realpath(d), "$W")]
        for d in ctx.sockdirs:
            paths += [(d, "$S"), (os.path.realpath(d), "$S")]
        self.paths = sorted(set(paths), key=lambda p: -len(p[0]))

    # -- rules -------------------------------------------------------------------------
    def norm_text(self, s: str) -> str:
        """Rules applied to every string: paths, node names, version text."""
        if not self.normalise:
            return s
        for old, new in self.paths:
            s = s.replace(old, new)
        s = self._NODE_RE.sub(lambda m: f"#block{m.group(1)}__", s)
        if self.version:
            full, pkg = self.version
            major_minor = full.rsplit(".", 1)[0]
            s = s.replace(full + pkg, f"{major_minor}.<micro><package>")
        return s

    def norm_line(self, s: str) -> str:
        """Rules for emulator and tool output lines: the above plus program names and the
        wall-clock figures in qemu-io's report line."""
        s = self.norm_text(s)
        if not self.normalise:
            return s
        for prog in self.ctx.progs:
            if s.startswith(prog + ":"):
                s = "<emulator>" + s[len(prog) :]
        return self._QEMU_IO_RATE.sub(r"\g<head>; <time> sec (<rate>/sec and <rate> ops/sec)", s)

    def norm_obj(self, obj: Any) -> Any:
        if isinstance(obj, RawNumber):
            return obj
        if isinstance(obj, str):
            return self.norm_text(obj)
        if isinstance(obj, list):
            return [self.norm_obj(v) for v in obj]
        if isinstance(obj, dict):
            if self.normalise:
                obj = self._norm_version(self._norm_timestamp(obj))
            items = [(self.norm_text(k), self.norm_obj(v)) for k, v in obj.items()]
            if self.sort_keys:
                items.sort()
            return dict(items)
        return obj

    def _norm_timestamp(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Event timestamps are wall clock: replaced when plausible, kept (so they show in
        the diff) when not."""
        ts = msg.get("timestamp")
        if (
            "event" not in msg
            or not isinstance(ts, dict)
            or list(ts) != ["seconds", "microseconds"]
        ):
            return msg
        try:
            sec, usec = int(ts["seconds"]), int(ts["microseconds"])
        except (TypeError, ValueError):
            return msg
        lo, hi = int(self.ctx.started) - 2, int(self.ctx.finished or time.time()) + 2
        if (sec, usec) != (-1, -1) and not (lo <= sec <= hi and 0 <= usec <= 999_999):
            return msg
        out = dict(msg)
        out["timestamp"] = {"seconds": "<seconds>", "microseconds": "<microseconds>"}
        return out

    def _norm_version(self, obj: dict[str, Any]) -> dict[str, Any]:
        """VersionInfo: keep major.minor, mask micro and package (they name the build)."""
        q = obj.get("qemu")
        if list(obj) != ["qemu", "package"] or not isinstance(q, dict):
            return obj
        if sorted(q) != ["major", "micro", "minor"]:
            return obj
        if self.version is None:
            self.version = (f"{q['major']}.{q['minor']}.{q['micro']}", str(obj["package"]))
        out = dict(obj)
        out["qemu"] = {k: ("<micro>" if k == "micro" else v) for k, v in q.items()}
        out["package"] = "<package>"
        return out

    # -- layout ------------------------------------------------------------------------
    def render(self, items: list[Item]) -> str:
        lines: list[str] = []
        for it in items:
            lines.extend(self.render_item(it))
        return "\n".join(lines) + "\n"

    def render_item(self, it: Item) -> list[str]:
        k = it.kind
        if k == "title":
            return [f"# {it.text}"]
        if k == "start":
            return [f"!start {it.text}".rstrip()]
        if k == "send":
            first, *rest = it.text.split("\n")
            return [f"> {first}"] + [f"  {r}" for r in rest]
        if k == "rawsend":
            return [f">{it.extra} {it.text}"]
        if k == "recv":
            return self.render_recv(it.text)
        if k == "shell":
            return [f"$ {it.text}"]
        if k == "out":
            return [f"{it.extra}| {self.norm_line(it.text)}"]
        if k == "commands":
            return [f"? {it.text}"]
        if k == "bitmaps":
            return self.render_bitmaps(it.text)
        if k == "note":
            return [f"= {self.norm_line(it.text)}"]
        raise AssertionError(k)

    def render_bitmaps(self, raw: str) -> list[str]:
        """``?bitmaps``: the dirty-bitmaps member of every node, in query order."""
        return _bitmaps_lines(self, raw)

    def render_recv(self, raw: str) -> list[str]:
        try:
            return self._render_recv(raw)
        except RecursionError:
            return [f"<~ too deeply nested to render: {self.norm_text(raw)!r}"]

    def _render_recv(self, raw: str) -> list[str]:
        body = raw[:-2] if raw.endswith("\r\n") else raw
        try:
            obj = parse_json(body)
        except (ValueError, RecursionError) as exc:
            return [f"<~ unparseable ({exc}): {self.norm_text(raw)!r}"]
        canonical = qemu_dumps(obj) + "\r\n" == raw
        obj = self.norm_obj(obj)
        text = pretty(obj, 98)
        first, *rest = text.split("\n")
        out = [f"< {first}"] + [f"  {r}" for r in rest]
        if not canonical:
            # Not byte-identical to QEMU's own serialisation of the same value: show the bytes.
            out.append(f"<~ wire bytes: {self.norm_text(raw)!r}")
        return out


def _bitmaps_lines(r: Renderer, raw: str) -> list[str]:
    body = raw[:-2] if raw.endswith("\r\n") else raw
    try:
        msg = parse_json(body)
        nodes = msg["return"]
        out = ["? bitmaps"]
        for node in nodes:
            name = r.norm_text(node["node-name"])
            bms = node.get("dirty-bitmaps")
            if bms is None:
                out.append(f"?   {name}: -")
            else:
                out.append(f"?   {name}:")
                out.extend(f"?     {qemu_dumps(r.norm_obj(b))}" for b in bms)
    except (ValueError, KeyError, TypeError, RecursionError):
        return r.render_recv(raw)
    if qemu_dumps(msg) + "\r\n" != raw:
        out.append("<~ query-named-block-nodes reply is not in QEMU's wire format")
    return out


def diff(a: Transcript, b: Transcript, sort_keys: bool = False) -> str:
    """Unified diff of two normalised transcripts ('' when they match)."""
    ta, tb = a.render(sort_keys=sort_keys), b.render(sort_keys=sort_keys)
    if ta == tb:
        return ""
    return "".join(
        difflib.unified_diff(ta.splitlines(True), tb.splitlines(True), a.backend, b.backend, n=4)
    )


# --------------------------------------------------------------------------- backends


class Emulator(Protocol):
    """A started emulator, whatever it is (process, in-process thread...)."""

    def poll(self) -> int | None: ...
    def wait(self, timeout: float) -> int | None: ...
    def wait_ready(self, timeout: float) -> None:
        """Return once it is safe to connect (may return at once)."""

    def kill(self) -> None:
        """Stop abruptly, like SIGKILL: nothing may be flushed or cleaned up."""

    def read_output(self) -> list[tuple[str, str]]:
        """New complete output lines since the last call, as (stream, line) with stream
        '1' (stdout) or '2' (stderr)."""


class Backend(Protocol):
    """Something that can start emulators speaking QMP on a unix socket."""

    name: str

    def unavailable(self) -> str | None:
        """Why this backend cannot run here, or None."""

    def prog_names(self) -> list[str]:
        """The names the emulator prefixes its messages with (argv[0] as QEMU prints it)."""

    def spawn(self, args: Sequence[str], qmp_path: str, cwd: Path, logdir: Path) -> Emulator: ...


class _LogReader:
    """Incrementally reads complete lines from a log file an emulator writes."""

    def __init__(self, path: Path, stream: str) -> None:
        self.path, self.stream, self.pos, self.partial = path, stream, 0, b""

    def read(self, final: bool = False) -> list[tuple[str, str]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if final and self.partial:
            lines.append(self.partial + b" <no newline>")
            self.partial = b""
        return [(self.stream, ln.decode("utf-8", "backslashreplace").rstrip("\r")) for ln in lines]


class ProcessEmulator:
    """An emulator running as a child process (real QEMU or virtsim-qemu)."""

    def __init__(
        self,
        cmd: list[str],
        cwd: Path,
        logdir: Path,
        env: dict[str, str],
        ready_syscall: int | None = None,
    ) -> None:
        self.ready_syscall = ready_syscall
        n = len(list(logdir.glob("stdout*")))
        out, err = logdir / f"stdout{n}", logdir / f"stderr{n}"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            self.proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                env=env,
                start_new_session=True,
            )
        self.readers = [_LogReader(out, "1"), _LogReader(err, "2")]

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait_ready(self, timeout: float) -> None:
        """Wait until the main thread idles in the main loop before anyone connects.

        Real QEMU 7.2 has a start-up race with wait=off: a client connecting while QEMU
        still initialises sometimes gets vm_start()'s RESUME event before the greeting,
        or a monitor that never answers (seen ~1 in 300 starts under load, once with a
        GLib g_source_attach assertion). Linux shows the main thread's current syscall
        in /proc/PID/syscall; three samples in a row in ppoll mean the main loop runs.
        """
        if self.ready_syscall is None:
            return
        path = f"/proc/{self.proc.pid}/syscall"
        deadline = time.monotonic() + timeout
        streak = 0
        while streak < 3 and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with open(path) as f:
                    nr = f.read().split(" ", 1)[0]
            except OSError:
                time.sleep(0.2)  # cannot look: give start-up a moment instead
                return
            streak = streak + 1 if nr == str(self.ready_syscall) else 0
            time.sleep(0.001)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def read_output(self) -> list[tuple[str, str]]:
        final = self.proc.poll() is not None
        return [x for r in self.readers for x in r.read(final)]


@dataclass
class ProcessBackend:
    """A QEMU-command-line-compatible binary started once per ``!start``."""

    name: str
    command: list[str]
    prog: str
    env: dict[str, str] = field(default_factory=dict)
    why_missing: str | None = None
    #: Syscall number the main thread sits in once the emulator idles (see wait_ready).
    ready_syscall: int | None = None
    #: Other program names its messages may start with (normalised like ``prog``).
    extra_progs: list[str] = field(default_factory=list)

    def unavailable(self) -> str | None:
        return self.why_missing

    def prog_names(self) -> list[str]:
        return [self.prog, *self.extra_progs]

    def spawn(self, args: Sequence[str], qmp_path: str, cwd: Path, logdir: Path) -> Emulator:
        base = ["-nodefaults", "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if not any(a in ("-machine", "-M") or a.startswith("-machine=") for a in args):
            base = ["-machine", "none", *base]
        env = {**os.environ, **self.env}
        return ProcessEmulator([*self.command, *base, *args], cwd, logdir, env, self.ready_syscall)


def qemu_backend() -> ProcessBackend:
    """Real QEMU; stdout line-buffered (stdbuf) so qemu-io output is on disk before the
    reply to the HMP command that printed it, as it would be on a terminal."""
    binary = shutil.which(os.environ.get("QEMU_SYSTEM") or "qemu-system-x86_64")
    if not binary:
        return ProcessBackend(
            "qemu",
            [],
            "qemu-system-x86_64",
            why_missing="qemu-system-x86_64 not found (set QEMU_SYSTEM)",
        )
    stdbuf = shutil.which("stdbuf")
    cmd = [stdbuf, "-oL", binary] if stdbuf else [binary]
    ppoll = {"x86_64": 271, "aarch64": 73}.get(os.uname().machine)
    return ProcessBackend("qemu", cmd, os.path.basename(binary), ready_syscall=ppoll)


def virtsim_backend() -> ProcessBackend:
    """virtsim-qemu: $VIRTSIM_QEMU, else the console script next to this Python, else
    ``python -m virtsim.qmp.cli``."""
    env = {"PYTHONUNBUFFERED": "1"}
    override = os.environ.get("VIRTSIM_QEMU")
    if override:
        cmd = shlex.split(override)
    else:
        script = Path(sys.executable).parent / "virtsim-qemu"
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "virtsim.qmp.cli"]
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
    backend = ProcessBackend("virtsim", cmd, "virtsim-qemu", env=env)
    backend.extra_progs = ["qemu-system-x86_64"]  # it may introduce itself as QEMU does
    return backend


#: Backend factories by name; the lead can register more (e.g. an embedded emulator).
BACKENDS: dict[str, Callable[[], Backend]] = {
    "qemu": qemu_backend,
    "virtsim": virtsim_backend,
}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make a backend selectable by name (CLI ``--backend``, env VIRTSIM_DIFF_BACKEND)."""
    BACKENDS[name] = factory


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise SystemExit(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None


# --------------------------------------------------------------------------- QMP client


class Closed(Exception):
    """The emulator closed the QMP connection."""


class QMPConnection:
    """Line-oriented QMP client over a unix socket; keeps received bytes exact."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:  # EPIPE/ECONNRESET: peer is gone; the next read sees EOF
            self.eof = True
            raise Closed(str(exc)) from None

    def recv_line(self, timeout: float) -> str | None:
        """One message line including its terminator; None on timeout; Closed at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                if self.buf:
                    line, self.buf = self.buf, b""
                    return line.decode("utf-8", "backslashreplace")
                raise Closed("EOF")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return (line + b"\n").decode("utf-8", "backslashreplace")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------- runner


class _Abort(Exception):
    """Stop running the scenario (the reason is already in the transcript)."""


class Runner:
    """Executes one scenario on one backend, filling a Transcript."""

    def __init__(self, scenario: Scenario, backend: Backend, root: Path) -> None:
        self.sc, self.backend = scenario, backend
        self.workdir = root / "w"
        self.workdir.mkdir(parents=True)
        self.logdir = root / "log"
        self.logdir.mkdir()
        # AF_UNIX paths are limited to 108 bytes: sockets live in a short private dir.
        self.sockdir = Path(tempfile.mkdtemp(prefix="vsd-", dir=scratch_dir()))
        self.qmp_path = str(self.sockdir / "qmp.sock")
        self.t = Transcript(scenario.name, backend.name)
        self.t.ctx.workdirs.append(str(self.workdir))
        self.t.ctx.sockdirs.append(str(self.sockdir))
        self.t.ctx.progs.extend(backend.prog_names())
        self.emu: Emulator | None = None
        self.conn: QMPConnection | None = None
        self.dead: list[Emulator] = []

    # -- helpers -------------------------------------------------------------------------
    def subst(self, text: str) -> str:
        """Expand ``$W`` (the work dir) and ``$[N*TEXT]`` (TEXT repeated N times)."""
        text = _REPEAT_RE.sub(_expand_repeat, text)
        return text.replace("$W", str(self.workdir))

    def collect_output(self) -> None:
        if self.emu is not None:
            for stream, line in self.emu.read_output():
                self.t.add("out", line, stream)

    def note(self, text: str) -> None:
        self.t.add("note", text)

    def record_exit(self, timeout: float) -> None:
        assert self.emu is not None
        rc = self.emu.wait(timeout)
        self.collect_output()
        self.note(f"exit {rc}" if rc is not None else f"still running after {timeout:g}s")
        if rc is not None:
            self.dead.append(self.emu)
            self.emu = None

    def need_conn(self, step: Step) -> QMPConnection:
        if self.conn is None or self.conn.eof:
            self.note(f"line {step.line}: no QMP connection; scenario aborted")
            raise _Abort
        return self.conn

    def recv(self, timeout: float, what: str) -> dict[str, Any] | None:
        """Receive and record one message; None if unparseable. Aborts on timeout/EOF."""
        assert self.conn is not None
        try:
            line = self.conn.recv_line(timeout)
        except Closed:
            self.collect_output()
            self.note("eof")
            self.record_exit(REPLY_TIMEOUT)
            raise _Abort from None
        if line is None:
            self.collect_output()
            self.note(f"timeout after {timeout:g}s waiting for {what}; scenario aborted")
            raise _Abort
        self.t.add("recv", line)
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            return None
        return msg if isinstance(msg, dict) else None

    def send(self, data: bytes) -> None:
        assert self.conn is not None
        try:
            self.conn.send(data)
        except Closed:
            pass  # the following read records the EOF

    def wait_reply(self, count: int = 1, reply_id: Any = None) -> None:
        """Record messages until ``count`` non-event messages (with ``reply_id``) arrived."""
        got = 0
        while got < count:
            msg = self.recv(REPLY_TIMEOUT, "a reply")
            if msg is not None and "event" in msg:
                continue
            if reply_id is None or (msg is not None and msg.get("id") == reply_id):
                got += 1

    # -- steps ---------------------------------------------------------------------------
    def run(self) -> Transcript:
        self.t.ctx.started = time.time()
        self.t.add("title", self.sc.title)
        try:
            for step in self.sc.steps:
                getattr(self, f"do_{step.kind}")(step)
                self.collect_output()
            self.finish()
        except _Abort:
            pass
        finally:
            self.cleanup()
            self.t.ctx.finished = time.time()
        return self.t

    def do_start(self, step: Step) -> None:
        if self.emu is not None and self.emu.poll() is None:
            # The scenario expected it to be gone (validated on QEMU): a real difference.
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            self.emu.kill()
            self.collect_output()
            self.note("emulator still running at !start; killed by the harness")
        if self.emu is not None:
            self.dead.append(self.emu)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_path)
        self.t.add("start", step.arg)
        args = [self.subst(a) for a in shlex.split(step.arg)]
        self.emu = self.backend.spawn(args, self.qmp_path, self.workdir, self.logdir)
        self.connect(step)

    def connect(self, step: Step) -> None:
        assert self.emu is not None
        self.emu.wait_ready(START_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.emu.poll() is not None:
                self.record_exit(1)
                return
            try:
                self.conn = QMPConnection(self.qmp_path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.note(f"no QMP socket after {START_TIMEOUT:g}s; scenario aborted")
                    raise _Abort from None
                time.sleep(0.005)
        # Greeting. An emulator that dies during start-up may accept and then close.
        while True:
            try:
                line = self.conn.recv_line(START_TIMEOUT)
            except Closed:
                self.conn = None
                self.record_exit(REPLY_TIMEOUT)
                return
            if line is None:
                self.note("no greeting; scenario aborted")
                raise _Abort
            self.t.add("recv", line)
            return

    def do_connect(self, step: Step) -> None:
        if self.emu is None:
            self.note(f"line {step.line}: '!connect' but no emulator runs; scenario aborted")
            raise _Abort
        if self.conn is not None:
            self.conn.close()
        self.t.add("note", "connect")
        self.connect(step)

    def do_close(self, step: Step) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.note("close")

    def do_kill(self, step: Step) -> None:
        if self.emu is None:
            self.note(f"line {step.line}: '!kill' but no emulator runs; scenario aborted")
            raise _Abort
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.emu.kill()
        self.collect_output()
        self.note("killed")
        self.dead.append(self.emu)
        self.emu = None

    def do_send(self, step: Step) -> None:
        self.need_conn(step)
        self.t.add("send", step.arg)
        self.send((self.subst(step.arg) + "\n").encode())
        self.wait_reply()

    def do_raw(self, step: Step) -> None:
        self._raw(step, step.arg.encode("utf-8") + b"\n", "raw")

    def do_esc(self, step: Step) -> None:
        data = codecs.escape_decode(step.arg.encode("utf-8"))[0]  # checked when parsed
        self._raw(step, data, "esc")

    def _raw(self, step: Step, data: bytes, kind: str) -> None:
        self.need_conn(step)
        label = kind if step.count == 1 else f"{kind}:{step.count}"
        self.t.add("rawsend", step.arg, label)
        self.send(self.subst(data.decode("latin-1")).encode("latin-1"))
        self.wait_reply(step.count)

    def do_event(self, step: Step) -> None:
        self.need_conn(step)
        timeout = step.timeout or 5.0
        while True:
            msg = self.recv(timeout, f"event {step.arg}")
            if msg is not None and msg.get("event") == step.arg:
                return

    def do_eof(self, step: Step) -> None:
        conn = self.need_conn(step)
        timeout = step.timeout or REPLY_TIMEOUT
        while True:
            try:
                line = conn.recv_line(timeout)
            except Closed:
                break
            if line is None:
                self.note(f"no EOF after {timeout:g}s; scenario aborted")
                raise _Abort
            self.t.add("recv", line)
        self.conn = None
        self.collect_output()
        self.note("eof")
        if self.emu is not None:
            self.record_exit(timeout)

    def do_shell(self, step: Step) -> None:
        self.t.add("shell", step.arg)
        env = {**os.environ, "W": str(self.workdir), "LC_ALL": "C"}
        try:
            p = subprocess.run(
                ["bash", "-c", step.arg],
                cwd=self.workdir,
                env=env,
                capture_output=True,
                timeout=SHELL_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            self.note(f"shell step timed out after {SHELL_TIMEOUT:g}s; scenario aborted")
            raise _Abort from None
        for stream, data in (("", p.stdout), ("!", p.stderr)):
            for ln in data.decode("utf-8", "backslashreplace").splitlines():
                self.t.add("out", ln, f"${stream}")
        if p.returncode:
            self.note(f"exit {p.returncode}")

    def _query(self, step: Step, cmd: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Send a harness query; record what arrives before its reply; return the reply."""
        conn = self.need_conn(step)
        self.send(json.dumps(cmd).encode() + b"\n")
        while True:
            try:
                line = conn.recv_line(REPLY_TIMEOUT)
            except Closed:
                self.note("eof")
                raise _Abort from None
            if line is None:
                self.note(f"timeout waiting for {cmd['execute']}; scenario aborted")
                raise _Abort
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):
                msg = None
            if isinstance(msg, dict) and msg.get("id") == cmd["id"]:
                return line, msg
            self.t.add("recv", line)

    def do_bitmaps(self, step: Step) -> None:
        """Only the dirty bitmaps of query-named-block-nodes (flat), node by node."""
        line, _ = self._query(
            step,
            {
                "execute": "query-named-block-nodes",
                "arguments": {"flat": True},
                "id": "harness-bitmaps",
            },
        )
        self.t.add("bitmaps", line)

    def do_commands(self, step: Step) -> None:
        """query-commands is not comparable as a whole (virtsim has a subset): record only
        whether each named command is present."""
        line, msg = self._query(step, {"execute": "query-commands", "id": "harness-commands"})
        if not isinstance(msg.get("return"), list):
            self.t.add("recv", line)
            return
        have = {c.get("name") for c in msg["return"] if isinstance(c, dict)}
        for name in step.arg.split():
            self.t.add("commands", f"{name}: {'present' if name in have else 'absent'}")

    def finish(self) -> None:
        """Flush: a barrier command catches messages nobody waited for."""
        if self.conn is None or self.conn.eof:
            return
        self.send(json.dumps({"execute": "query-status", "id": BARRIER_ID}).encode() + b"\n")
        while True:
            try:
                line = self.conn.recv_line(2.0)
            except Closed:
                self.collect_output()
                self.note("eof")
                return
            if line is None:
                self.note("no reply to the end-of-scenario barrier")
                return
            try:
                msg = json.loads(line)
            except (ValueError, RecursionError):
                msg = None
            if isinstance(msg, dict) and msg.get("id") == BARRIER_ID:
                self.collect_output()
                return
            self.t.add("recv", line)

    def cleanup(self) -> None:
        if self.conn is not None:
            self.conn.close()
        for emu in [self.emu, *self.dead]:
            if emu is not None:
                emu.kill()
        if self.emu is not None:
            self.collect_output()
        shutil.rmtree(self.sockdir, ignore_errors=True)


def scratch_dir() -> str:
    """Where work dirs go: $VIRTSIM_DIFF_TMPDIR, else /dev/shm when writable, else $TMPDIR.

    Why tmpfs: image ``actual-size`` is st_blocks, and on disk file systems (ext4, xfs)
    st_blocks also counts extent-tree blocks, whose number depends on how fragmented the
    file came out, i.e. on unrelated I/O on the host. Seen on real QEMU under load: the
    same scenario gave 540672 and 544768. tmpfs counts data pages only.
    """
    env = os.environ.get("VIRTSIM_DIFF_TMPDIR")
    if env:
        return env
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def run_scenario(
    path: Path | str, backend: Backend | str, workroot: Path | None = None, keep: bool = False
) -> Transcript:
    """Run a scenario on a backend and return its transcript. Every process started is
    killed before returning; the work dir (in ``workroot``, default scratch_dir()) is
    removed unless ``keep``."""
    sc = parse_scenario(path)
    be = get_backend(backend) if isinstance(backend, str) else backend
    why = be.unavailable()
    if why:
        raise RuntimeError(f"backend {be.name} unavailable: {why}")
    base = workroot if workroot is not None else Path(scratch_dir())
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"vsdiff-{sc.name}-{be.name}-", dir=base))
    try:
        return Runner(sc, be, root).run()
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept work dir {root}", file=sys.stderr)


def run_text(text: str, backend: Backend | str, name: str = "inline") -> Transcript:
    """Run a scenario given as text (for tests that cannot be differential)."""
    d = Path(tempfile.mkdtemp(prefix="vsdiff-inline-", dir=scratch_dir()))
    try:
        path = d / f"{name}.qmp"
        path.write_text(text)
        return run_scenario(path, backend)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- CLI


def _resolve(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
    for cand in (SCENARIO_DIR / name, SCENARIO_DIR / f"{name}.qmp"):
        if cand.exists():
            return cand
    raise SystemExit(f"no scenario {name!r}")


def _iter_paths(names: Sequence[str]) -> Iterator[Path]:
    if not names:
        yield from all_scenarios()
    for n in names:
        yield _resolve(n)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.differential.harness", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("scenarios", nargs="*", help="scenario files or names (default: all)")
    ap.add_argument("--backend", "-b", default="qemu", help=f"one of {', '.join(BACKENDS)}")
    ap.add_argument("--raw", action="store_true", help="print without normalisation")
    ap.add_argument("--sort-keys", action="store_true", help="ignore key order (debug aid)")
    ap.add_argument("--diff", metavar="BACKEND", help="also run BACKEND and print the diff")
    ap.add_argument(
        "--stability",
        action="store_true",
        help="run each scenario twice on --backend and report differences",
    )
    ap.add_argument("--keep", action="store_true", help="keep work dirs")
    ns = ap.parse_args(argv)
    rc = 0
    for path in _iter_paths(ns.scenarios):
        t = run_scenario(path, ns.backend, keep=ns.keep)
        if ns.stability or ns.diff:
            other = run_scenario(path, ns.diff or ns.backend, keep=ns.keep)
            d = diff(t, other, ns.sort_keys)
            print(f"{'DIFF' if d else 'same'} {path.stem}")
            if d:
                print(d)
                rc = 1
        else:
            print(t.render(normalise=not ns.raw, sort_keys=ns.sort_keys), end="")
    return rc


if __name__ == "__main__":
    sys.exit(main())
