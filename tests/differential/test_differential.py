"""Differential conformance: every scenario in scenarios/ must give the same normalised
transcript on real QEMU 7.2 and on the candidate backend (virtsim-qemu by default).

Nothing is golden: real QEMU runs live on every test run (CI has it), so the reference can
never drift from the binary. Normalisation rules: README.md in this folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.differential.conftest import QemuTranscripts
from tests.differential.harness import (
    Backend,
    RawNumber,
    Renderer,
    RunContext,
    Transcript,
    all_scenarios,
    diff,
    parse_json,
    parse_scenario,
    pretty,
    qemu_dumps,
    run_scenario,
)

SCENARIOS = all_scenarios()
MAX_DIFF_LINES = 400


def _ids(p: Path) -> str:
    return p.stem


def _candidate_missing(backend: Backend) -> str | None:
    """A one-line reason when the candidate cannot even start, so the report says so
    instead of showing 70 diffs of a traceback."""
    why = backend.unavailable()
    if why:
        return why
    if backend.name == "virtsim" and importlib.util.find_spec("virtsim.qmp.cli") is None:
        return "virtsim.qmp.cli does not exist yet (virtsim-qemu is not implemented)"
    return None


def _save(fail_dir: Path, name: str, ref: Transcript, cand: Transcript, d: str) -> None:
    for t in (ref, cand):
        (fail_dir / f"{name}.{t.backend}.txt").write_text(t.render())
        (fail_dir / f"{name}.{t.backend}.raw.txt").write_text(t.render(normalise=False))
    (fail_dir / f"{name}.diff").write_text(d)


@pytest.mark.real_qemu
@pytest.mark.qemu_img
@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_differential(
    scenario: Path,
    qemu_transcripts: QemuTranscripts,
    candidate: Backend,
    failure_dir: Path,
) -> None:
    why = _candidate_missing(candidate)
    if why:
        pytest.fail(f"{candidate.name}: {why}", pytrace=False)
    cand = run_scenario(scenario, candidate)
    ref = qemu_transcripts.get(scenario)
    d = diff(ref, cand)
    if not d:
        return
    _save(failure_dir, scenario.stem, ref, cand, d)
    lines = d.splitlines()
    hint = ""
    if not diff(ref, cand, sort_keys=True):
        hint = "  (equal except for JSON key order)\n"
    shown = "\n".join(lines[:MAX_DIFF_LINES])
    more = (
        f"\n... {len(lines) - MAX_DIFF_LINES} more diff lines"
        if len(lines) > MAX_DIFF_LINES
        else ""
    )
    pytest.fail(
        f"{scenario.stem}: {candidate.name} differs from real QEMU "
        f"({parse_scenario(scenario).title})\n{hint}"
        f"  transcripts and diff: {failure_dir}/{scenario.stem}.*\n{shown}{more}",
        pytrace=False,
    )


# ----------------------------------------------------------------- harness self-checks
# These need no binaries: they keep the harness itself honest.


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_scenario_parses(scenario: Path) -> None:
    sc = parse_scenario(scenario)
    assert sc.title and sc.steps


def test_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 70


def test_qemu_dumps_matches_qemu_wire_format() -> None:
    # Observed on QEMU 7.2: upper-case \u escapes, surrogate pairs, numbers as printed.
    raw = (
        '{"return": {}, "id": "h\\u00E9\\uD83D\\uDE00\\t\\u007F", '
        '"n": -0, "f": 0.10000000000000001}'
    )
    assert qemu_dumps(parse_json(raw)) == raw
    assert qemu_dumps(parse_json('{"a":1}')) != '{"a":1}'


def test_pretty_keeps_tokens() -> None:
    obj = parse_json('{"return": [{"name": "' + "x" * 120 + '", "count": 0}]}')
    text = pretty(obj)
    assert '"count": 0' in text and "\n" in text
    assert parse_json(text) == obj


def _render_one(raw: str, ctx: RunContext | None = None) -> str:
    t = Transcript("x", "y", ctx=ctx or RunContext(started=1000.0, finished=1010.0))
    t.add("recv", raw)
    return t.render()


def test_normalise_timestamp_only_when_plausible() -> None:
    ok = '{"timestamp": {"seconds": 1005, "microseconds": 7}, "event": "X"}\r\n'
    bad = '{"timestamp": {"seconds": 5, "microseconds": 7}, "event": "X"}\r\n'
    assert '"<seconds>"' in _render_one(ok)
    assert '"seconds": 5' in _render_one(bad)


def test_normalise_node_names_keep_counter() -> None:
    out = _render_one('{"return": ["#block123", "#block4567", "#blockx"]}\r\n')
    assert '"#block1__", "#block45__", "#blockx"' in out


def test_normalise_paths_and_version() -> None:
    ctx = RunContext(workdirs=["/tmp/abc/w"], started=0, finished=0)
    out = _render_one(
        '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
        '"package": "pkg"}, "capabilities": ["oob"]}}\r\n',
        ctx,
    )
    assert '"micro": "<micro>", "minor": 2, "major": 7' in out
    assert _render_one('{"return": "/tmp/abc/w/d.qcow2"}\r\n', ctx).startswith('< {"return": "$W/')


def test_noncanonical_wire_is_visible() -> None:
    out = _render_one('{"return":{}}\r\n')
    assert "<~ wire bytes" in out
    out = _render_one('{"return": {}}\n')
    assert "<~ wire bytes" in out
    assert "<~" not in _render_one('{"return": {}}\r\n')


def test_qemu_io_rate_line() -> None:
    r = Renderer(RunContext(), True, False)
    line = "64 KiB, 1 ops; 00.00 sec (1.844 GiB/sec and 30211.4804 ops/sec)"
    assert r.norm_line(line) == "64 KiB, 1 ops; <time> sec (<rate>/sec and <rate> ops/sec)"
    assert isinstance(parse_json("1"), RawNumber)
