"""QMP ``transaction``: prepare every action in order, then commit all or abort in reverse.

Only the rules live here (order, rollback, which actions accept ``grouped``); the actions
themselves live with the feature they belong to (bitmaps now, backup jobs next).
"""

from __future__ import annotations

from typing import Any, ClassVar

from .block import BlockGraph
from .errors import HangError, SimError


class Action:
    """One transaction action.  ``prepare`` may raise; ``commit``/``abort`` must not."""

    kind: ClassVar[str] = ""
    supports_grouped: ClassVar[bool] = False

    def __init__(self, graph: BlockGraph, args: dict[str, Any], ctx: TransactionContext) -> None:
        self.graph = graph
        self.args = args
        self.ctx = ctx

    def prepare(self) -> None:
        return None

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        return None

    def clean(self) -> None:
        return None


class AbortAction(Action):
    kind = "abort"
    supports_grouped = True

    def prepare(self) -> None:
        raise SimError("Transaction aborted using Abort action")


class TransactionContext:
    """State shared by the actions of one transaction (e.g. a job group for ``grouped``)."""

    def __init__(self, completion_mode: str, jobs: Any = None) -> None:
        self.completion_mode = completion_mode
        self.jobs = jobs            # the emulator's JobManager, for actions that create jobs
        self.txn: Any = None        # the shared JobTxn of a grouped transaction, made lazily
        self.extra: dict[str, Any] = {}


def run_transaction(graph: BlockGraph, actions: list[dict[str, Any]],
                    properties: dict[str, Any] | None,
                    registry: dict[str, type[Action]], jobs: Any = None) -> TransactionContext:
    """Execute a transaction; raises the first prepare error after rolling back.

    Like QEMU: prepare in order; on failure abort every action that began preparing, in
    reverse; else commit in order; then clean in order either way."""
    mode = (properties or {}).get("completion-mode", "individual")
    ctx = TransactionContext(mode, jobs)
    todo: list[Action] = []
    for spec in actions:
        kind = spec["type"]
        cls = registry.get(kind)
        if cls is None:
            raise SimError(f"Action '{kind}' is not supported by virtsim")
        todo.append(cls(graph, spec.get("data", {}), ctx))
    if jobs is not None:
        _drain_all(jobs)
    done: list[Action] = []
    try:
        for act in todo:
            done.append(act)
            if mode == "grouped" and not act.supports_grouped:
                raise SimError(f"Action '{act.kind}' does not support Transaction property "
                               f"completion-mode = {mode}")
            act.prepare()
    except SimError:
        for act in reversed(done):
            try:
                act.abort()
            except HangError as hang:
                # QEMU 7.2 stops answering here; virtsim finishes the rollback and answers
                # the transaction's error (noted on stderr so the divergence is visible)
                graph.warn(f"virtsim: QEMU 7.2 would hang here ({hang}); rolled back instead")
        for act in done:
            act.clean()
        raise
    for act in todo:
        act.commit()
    for act in todo:
        act.clean()
    return ctx


def _drain_all(jobs: Any) -> None:
    """qmp_transaction starts with bdrv_drain_all(): each running job pauses and resumes
    (QEMU 7.2 shows a ``paused``/``running`` pair per job, before any action prepares)."""
    todo = list(reversed(jobs.jobs()))
    for job in todo:
        job.internal_pause()
    for job in todo:
        job.internal_resume()


ACTIONS: dict[str, type[Action]] = {"abort": AbortAction}
