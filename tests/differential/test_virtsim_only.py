"""Cases that cannot be differential because real QEMU 7.2 crashes on them.

Each was observed to kill qemu-system-x86_64 7.2.22 (Debian 12); virtsim must answer with
an error instead and keep serving. The texts are QEMU's where it has one, else virtsim's own;
these tests pin the class and that the emulator survives.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.differential.conftest import CANDIDATE
from tests.differential.harness import Transcript, get_backend, run_text

HEAD = (
    "# title: {title}\n"
    "!start\n"
    '> {{"execute": "qmp_capabilities"}}\n'
    '> {{"execute": "blockdev-add", "arguments": '
    '{{"driver": "null-co", "node-name": "n", "size": 16777216}}}}\n'
    '> {{"execute": "block-dirty-bitmap-add", "arguments": {{"node": "n", "name": "b"}}}}\n'
)
ALIVE = '> {"execute": "query-status", "id": "alive"}\n'


@pytest.fixture(scope="module")
def backend_name() -> str:
    be = get_backend(CANDIDATE)
    why = be.unavailable()
    if not why and CANDIDATE == "virtsim" and importlib.util.find_spec("virtsim.qmp.cli") is None:
        why = "virtsim.qmp.cli does not exist yet"
    if why:
        pytest.fail(f"{CANDIDATE}: {why}", pytrace=False)
    return CANDIDATE


def _run(backend: str, title: str, command: str) -> Transcript:
    return run_text(HEAD.format(title=title) + f"> {command}\n" + ALIVE, backend)


def _error_class(t: Transcript, msg_id: str) -> str | None:
    reply = t.reply(msg_id)
    assert reply is not None, t.render()
    cls = reply.get("error", {}).get("class")
    return cls if isinstance(cls, str) else None


def _assert_survived(t: Transcript) -> None:
    reply = t.reply("alive")
    assert reply is not None and "return" in reply, t.render()


def test_merge_empty_bitmaps_list(backend_name: str) -> None:
    # QEMU 7.2: SIGSEGV (spec §2 "merge"); QEMU has no text for it, this one is virtsim's.
    t = _run(
        backend_name,
        "merge with bitmaps: []",
        '{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "n", '
        '"target": "b", "bitmaps": []}, "id": "m"}',
    )
    assert _error_class(t, "m") == "GenericError"
    assert t.reply("m")["error"]["desc"] == (  # type: ignore[index]
        "Parameter 'bitmaps' must contain at least one bitmap "
        "(an empty list crashes QEMU 7.2)")
    _assert_survived(t)


def test_transaction_enable_missing_bitmap(backend_name: str) -> None:
    # QEMU 7.2: SIGSEGV in block_dirty_bitmap_enable_abort (bitmap is NULL). The error it
    # would have reported first is the lookup error.
    t = _run(
        backend_name,
        "transaction enable of a missing bitmap",
        '{"execute": "transaction", "arguments": {"actions": [{"type": '
        '"block-dirty-bitmap-enable", "data": {"node": "n", "name": "nosuch"}}]}, "id": "t"}',
    )
    assert _error_class(t, "t") == "GenericError"
    assert t.reply("t")["error"]["desc"] == "Dirty bitmap 'nosuch' not found"  # type: ignore[index]
    _assert_survived(t)


def test_transaction_enable_grouped(backend_name: str) -> None:
    # QEMU 7.2: SIGSEGV, same abort path (the completion-mode check returns before lookup).
    # The text is the one QEMU gives for every other bitmap action.
    t = _run(
        backend_name,
        "transaction enable with completion-mode grouped",
        '{"execute": "transaction", "arguments": {"actions": [{"type": '
        '"block-dirty-bitmap-enable", "data": {"node": "n", "name": "b"}}], '
        '"properties": {"completion-mode": "grouped"}}, "id": "t"}',
    )
    assert _error_class(t, "t") == "GenericError"
    assert t.reply("t")["error"]["desc"] == (  # type: ignore[index]
        "Action 'block-dirty-bitmap-enable' does not support Transaction property "
        "completion-mode = grouped"
    )
    _assert_survived(t)


def test_null_co_negative_size(backend_name: str) -> None:
    # QEMU 7.2: abort() in parse_option_size after composing "Parameter 'size' expects a
    # non-negative number below 2^64"; virtsim reports that very text instead of aborting.
    t = _run(
        backend_name,
        "null-co with size -1",
        '{"execute": "blockdev-add", "arguments": {"driver": "null-co", '
        '"node-name": "neg", "size": -1}, "id": "s"}',
    )
    assert _error_class(t, "s") == "GenericError"
    assert t.reply("s")["error"]["desc"] == (  # type: ignore[index]
        "Parameter 'size' expects a non-negative number below 2^64")
    _assert_survived(t)


def test_grouped_backups_of_one_source(backend_name: str) -> None:
    # QEMU 7.2: SIGSEGV when one grouped transaction backs up the same source twice.
    t = run_text(HEAD.format(title="two grouped backups of one source")
                 + '> {"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                   '"node-name": "t1", "size": 16777216}}\n'
                 + '> {"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                   '"node-name": "t2", "size": 16777216}}\n'
                 + '> {"execute": "transaction", "arguments": {"actions": ['
                   '{"type": "blockdev-backup", "data": {"job-id": "g1", "device": "n", '
                   '"target": "t1", "sync": "full", "speed": 1}}, '
                   '{"type": "blockdev-backup", "data": {"job-id": "g2", "device": "n", '
                   '"target": "t2", "sync": "full", "speed": 1}}], '
                   '"properties": {"completion-mode": "grouped"}}, "id": "t"}\n'
                 + ALIVE, backend_name)
    assert _error_class(t, "t") == "GenericError"
    _assert_survived(t)


def test_grouped_abort_of_created_backups(backend_name: str) -> None:
    # QEMU 7.2 hangs (waits forever for a job that was never started); virtsim rolls back
    # both jobs and answers the transaction's own error.
    t = run_text(HEAD.format(title="grouped transaction aborted after two backups")
                 + "".join('> {"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                           f'"node-name": "{n}", "size": 16777216}}}}\n'
                           for n in ("s2", "t1", "t2"))
                 + '> {"execute": "transaction", "arguments": {"actions": ['
                   '{"type": "blockdev-backup", "data": {"job-id": "g1", "device": "n", '
                   '"target": "t1", "sync": "full"}}, '
                   '{"type": "blockdev-backup", "data": {"job-id": "g2", "device": "s2", '
                   '"target": "t2", "sync": "full"}}, {"type": "abort", "data": {}}], '
                   '"properties": {"completion-mode": "grouped"}}, "id": "t"}\n'
                 + '> {"execute": "query-jobs", "id": "q"}\n'
                 + ALIVE, backend_name)
    assert t.reply("t")["error"]["desc"] == (  # type: ignore[index]
        "Transaction aborted using Abort action")
    assert t.reply("q")["return"] == []  # type: ignore[index]
    _assert_survived(t)
