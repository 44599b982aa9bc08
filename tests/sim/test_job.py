"""The generic job layer (virtsim.sim.job) against QEMU 7.2's job.c rules.

Sequences and texts marked "observed" were recorded on QEMU 7.2.22 (Debian
1:7.2+dfsg-7+deb12u18) with blockdev-backup between null-co nodes (speed-limited so that
the job stays running), blkdebug with inject-error for failures, and the transcripts in
/work/shared/reference/qemu-7.2.  Everything runs on a VirtualClock: no real time passes.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from virtsim.sim.clock import VirtualClock
from virtsim.sim.errors import SimError
from virtsim.sim.events import EventBus
from virtsim.sim.job import (
    TRANSITIONS,
    VERBS,
    BlockJob,
    Finished,
    Job,
    JobManager,
    JobRunner,
    JobStateError,
    JobStatus,
    JobTxn,
    JobVerb,
    QemuHang,
    RateLimit,
    WorkResult,
)

MiB = 1 << 20

# --------------------------------------------------------------------------- dummy jobs


class ChunkJob(BlockJob):
    """A block job whose run copies ``chunks`` chunks, optionally throttled or failing."""

    job_type = "backup"

    def __init__(self, job_id: str, log: list[str], *, chunks: int = 4, chunk: int = MiB,
                 fail_at: int | None = None, on_error: str = "report",
                 prepare_ret: int = 0, **kw: Any) -> None:
        super().__init__(job_id, **kw)
        self.log = log
        self.chunk = chunk
        self.progress_total = chunks * chunk
        self.fail_at = fail_at
        self.on_error = on_error
        self.prepare_ret = prepare_ret
        self._rl: RateLimit | None = None

    @property
    def rl(self) -> RateLimit:
        if self._rl is None:
            self._rl = RateLimit(self.manager.clock)
        return self._rl

    def on_set_speed(self, speed: int) -> None:
        self.rl.set_speed(speed)

    def work(self, limit: int | None) -> WorkResult:
        if self.fail_at is not None and self.progress_current >= self.fail_at:
            action = self.error_action(self.on_error, is_read=False, err=errno.EIO)
            if action == "report":
                return Finished(-errno.EIO)
            if action == "stop":
                return 0.0
        n = min(self.chunk, self.progress_total - self.progress_current)
        if limit is not None:
            n = min(n, limit)
        self.progress_update(n)
        if self.progress_current >= self.progress_total:
            return Finished()
        return self.rl.delay(n)

    def prepare(self) -> int:
        self.log.append(f"{self.id}.prepare")
        return self.prepare_ret

    def commit(self) -> None:
        self.log.append(f"{self.id}.commit")

    def abort(self) -> None:
        self.log.append(f"{self.id}.abort")

    def clean(self) -> None:
        self.log.append(f"{self.id}.clean")


class ReadyJob(ChunkJob):
    """A mirror-like job: ready after its copy, then waits for complete (or a cancel)."""

    job_type = "mirror"
    supports_complete = True

    def __init__(self, job_id: str, log: list[str], **kw: Any) -> None:
        super().__init__(job_id, log, **kw)
        self.completing = False

    def work(self, limit: int | None) -> WorkResult:
        if self.completing or self.cancelled:
            return Finished()
        if self.progress_current < self.progress_total:
            self.progress_update(min(self.chunk, self.progress_total - self.progress_current))
            return 0.0
        if self.status == JobStatus.RUNNING:
            self.transition_to_ready()
        return None

    def do_complete(self) -> None:
        self.completing = True
        self.kick()


class StuckReadyJob(ReadyJob):
    """A ready job type without a complete callback."""

    supports_complete = False


class SoftReadyJob(ReadyJob):
    """Honours a soft cancel (block-job-cancel without force), like mirror when ready."""

    def on_cancel(self, force: bool) -> bool:
        return force


class CreateJob(Job):
    """A job that is not a block job (like blockdev-create)."""

    job_type = "create"

    def work(self, limit: int | None) -> WorkResult:
        self.progress_total = 1
        self.progress_update(1)
        return Finished()


# --------------------------------------------------------------------------- harness


def render(name: str, data: dict[str, Any] | None) -> str:
    """Events as short lines: "j running", "COMPLETED j", "ERROR j write stop"."""
    assert data is not None
    if name == "JOB_STATUS_CHANGE":
        return f"{data['id']} {data['status']}"
    short = name.removeprefix("BLOCK_JOB_")
    if name == "BLOCK_JOB_ERROR":
        return f"ERROR {data['device']} {data['operation']} {data['action']}"
    if name == "BLOCK_JOB_PENDING":
        return f"PENDING {data['id']}"
    if "error" in data:
        return f"{short} {data['device']} error={data['error']}"
    return f"{short} {data['device']}"


class Env:
    """Bus + virtual clock + manager + runner; events and callbacks in one log."""

    def __init__(self) -> None:
        self.bus = EventBus()
        self.clock = VirtualClock()
        self.mgr = JobManager(self.bus, self.clock)
        self.runner = JobRunner(self.mgr)
        self.log: list[str] = []
        self.events: list[tuple[str, dict[str, Any] | None]] = []
        self.bus.subscribe(self._on_event)

    def _on_event(self, name: str, data: dict[str, Any] | None) -> None:
        self.events.append((name, data))
        self.log.append(render(name, data))

    def job(self, job_id: str = "j", *, txn: JobTxn | None = None, speed: int = 0,
            cls: type[ChunkJob] = ChunkJob, **kw: Any) -> ChunkJob:
        job = cls(job_id, self.log, **kw)
        self.mgr.add(job, txn)
        if speed:
            job.set_speed(speed)
        return job

    def started(self, job_id: str = "j", **kw: Any) -> ChunkJob:
        """Created and started like blockdev-backup does it (spurious pair included)."""
        job = self.job(job_id, **kw)
        job.start(spurious_pause=True)
        return job

    def take(self) -> list[str]:
        out, self.log[:] = self.log[:], []
        return out

    def data(self, name: str) -> list[dict[str, Any]]:
        return [d for n, d in self.events if n == name and d is not None]


@pytest.fixture
def env() -> Env:
    return Env()


def V(job_id: str, state: str, verb: str) -> str:
    return f"Job '{job_id}' in state '{state}' cannot accept command verb '{verb}'"


START = ["j created", "j running", "j paused", "j running"]  # observed for every backup


def raises(desc: str, cls: str = "GenericError") -> Any:
    class _Ctx:
        def __enter__(self) -> None:
            return None

        def __exit__(self, et: Any, e: Any, tb: Any) -> bool:
            assert isinstance(e, SimError), f"expected SimError({desc!r}), got {e!r}"
            assert (e.desc, e.error_class) == (desc, cls)
            return True

    return _Ctx()


# --------------------------------------------------------------------------- tables

# QEMU 7.2 job.c JobSTT and JobVerbTable, written out independently of the module.
EXPECTED_TRANSITIONS = {
    "undefined": {"created"},
    "created": {"running", "aborting", "null"},
    "running": {"paused", "ready", "waiting", "aborting"},
    "paused": {"running"},
    "ready": {"standby", "waiting", "aborting"},
    "standby": {"ready"},
    "waiting": {"pending", "aborting"},
    "pending": {"aborting", "concluded"},
    "aborting": {"aborting", "concluded"},
    "concluded": {"null"},
    "null": set(),
}
_ACTIVE = {"created", "running", "paused", "ready", "standby"}
EXPECTED_VERBS = {
    "cancel": _ACTIVE | {"waiting", "pending"},
    "pause": _ACTIVE,
    "resume": _ACTIVE,
    "set-speed": _ACTIVE,
    "complete": {"ready", "standby"},
    "dismiss": {"concluded"},
    "finalize": {"pending"},
}


def test_tables_match_qemu() -> None:
    assert [s.value for s in JobStatus] == list(EXPECTED_TRANSITIONS)
    assert [v.value for v in JobVerb] == list(EXPECTED_VERBS)
    assert {k.value: {s.value for s in v} for k, v in TRANSITIONS.items()} == EXPECTED_TRANSITIONS
    assert {k.value: {s.value for s in v} for k, v in VERBS.items()} == EXPECTED_VERBS


@pytest.mark.parametrize("state", list(JobStatus))
@pytest.mark.parametrize("verb", list(JobVerb))
def test_verb_table_every_state(env: Env, state: JobStatus, verb: JobVerb) -> None:
    job = ChunkJob("j", env.log)
    job.status = state
    if state.value in EXPECTED_VERBS[verb.value]:
        job.check_verb(verb)
    else:
        with raises(V("j", state.value, verb.value)):
            job.check_verb(verb)


def test_disallowed_transition_is_a_bug(env: Env) -> None:
    job = env.started()
    with pytest.raises(JobStateError):
        job._transition(JobStatus.PENDING)
    with pytest.raises(JobStateError):
        job._transition(JobStatus.CONCLUDED)


# --------------------------------------------------------------------------- verbs per state


def _in_state(env: Env, state: str) -> ChunkJob:
    """A job "j" brought into ``state`` the way a client would get it there."""
    if state == "created":
        return env.job()
    if state == "running":
        return env.started(speed=MiB)
    if state == "paused":
        job = env.started(speed=MiB)
        job.pause()
        return job
    if state == "waiting":
        txn = JobTxn()
        job = env.job("j", txn=txn)
        env.job("other", txn=txn, speed=MiB, chunks=64)
        env.mgr.start_jobs(env.mgr.jobs()[::-1])
        env.runner.advance(0.5)
        return job
    if state == "pending":
        job = env.started(auto_finalize=False)
        env.runner.run_until_idle()
        return job
    if state == "concluded":
        job = env.started(auto_dismiss=False)
        env.runner.run_until_idle()
        return job
    if state in ("ready", "standby"):
        rjob = env.job(cls=StuckReadyJob)
        rjob.start(spurious_pause=True)
        env.runner.run_until_idle()
        if state == "standby":
            rjob.pause()
        return rjob
    raise AssertionError(state)


COMMANDS = {
    "job-pause": lambda m: m.job_pause("j"),
    "job-resume": lambda m: m.job_resume("j"),
    "job-cancel": lambda m: m.job_cancel("j"),
    "job-complete": lambda m: m.job_complete("j"),
    "job-finalize": lambda m: m.job_finalize("j"),
    "job-dismiss": lambda m: m.job_dismiss("j"),
    "block-job-pause": lambda m: m.block_job_pause("j"),
    "block-job-cancel": lambda m: m.block_job_cancel("j"),
    "block-job-cancel-force": lambda m: m.block_job_cancel("j", force=True),
    "block-job-complete": lambda m: m.block_job_complete("j"),
    "block-job-set-speed": lambda m: m.block_job_set_speed("j", 5),
    "block-job-set-speed-neg": lambda m: m.block_job_set_speed("j", -1),
}

NOT_PAUSED = "Can't resume a job that was not paused"
NEG_SPEED = "Parameter 'speed' expects a non-negative value"
CANNOT_COMPLETE = "The active block job 'j' cannot be completed"


def _verb_errors(state: str) -> dict[str, str | None]:
    """Each command's outcome by the verb table alone (plus resume's own check)."""
    def v(verb: str) -> str | None:
        return None if state in EXPECTED_VERBS[verb] else V("j", state, verb)

    out: dict[str, str | None] = {
        "job-pause": v("pause"), "block-job-pause": v("pause"),
        "job-resume": NOT_PAUSED,
        "job-cancel": v("cancel"), "block-job-cancel": v("cancel"),
        "block-job-cancel-force": v("cancel"),
        "job-complete": v("complete"), "block-job-complete": v("complete"),
        "job-finalize": v("finalize"), "job-dismiss": v("dismiss"),
        "block-job-set-speed": v("set-speed"),
        "block-job-set-speed-neg": v("set-speed") or NEG_SPEED,
    }
    return out


# Expected outcome (None = accepted) of every command in every state a client can reach.
# running, paused, waiting, pending and concluded: observed on QEMU 7.2.22; created,
# ready and standby follow job.c (not reachable from QMP with backup).
EXPECTED_BY_STATE: dict[str, dict[str, str | None]] = {
    "created": _verb_errors("created"),
    "running": _verb_errors("running"),
    "paused": {**_verb_errors("paused"),
               "job-pause": "Job is already paused", "block-job-pause": "Job is already paused",
               "job-resume": None,
               "block-job-cancel": "The block job for device 'j' is currently paused"},
    "waiting": _verb_errors("waiting"),
    "pending": _verb_errors("pending"),
    "concluded": _verb_errors("concluded"),
    "ready": {**_verb_errors("ready"),
              "job-complete": CANNOT_COMPLETE, "block-job-complete": CANNOT_COMPLETE},
    "standby": {**_verb_errors("standby"),
                "job-complete": CANNOT_COMPLETE, "block-job-complete": CANNOT_COMPLETE,
                "job-pause": "Job is already paused",
                "block-job-pause": "Job is already paused", "job-resume": None,
                "block-job-cancel": "The block job for device 'j' is currently paused"},
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("state", list(EXPECTED_BY_STATE))
def test_command_in_state(env: Env, state: str, command: str) -> None:
    job = _in_state(env, state)
    assert job.status.value == state
    expected = EXPECTED_BY_STATE[state][command]
    if expected is None:
        COMMANDS[command](env.mgr)
    else:
        before = (job.status, len(env.log))
        with raises(expected):
            COMMANDS[command](env.mgr)
        assert (job.status, len(env.log)) == before  # a refused verb changes nothing


def test_missing_jobs(env: Env) -> None:
    # observed: job-* -> GenericError "Job not found"; block-job-* -> DeviceNotActive
    for name in ("job_pause", "job_resume", "job_cancel", "job_complete",
                 "job_finalize", "job_dismiss"):
        with raises("Job not found"):
            getattr(env.mgr, name)("nosuch")
    for name in ("block_job_pause", "block_job_resume", "block_job_cancel",
                 "block_job_complete", "block_job_finalize", "block_job_dismiss"):
        with raises("Block job 'nosuch' not found", "DeviceNotActive"):
            getattr(env.mgr, name)("nosuch")
    with raises("Block job 'nosuch' not found", "DeviceNotActive"):
        env.mgr.block_job_set_speed("nosuch", 1)


def test_non_block_job(env: Env) -> None:
    """A "create" job answers job-* but not block-job-*, and sends no BLOCK_JOB_*."""
    job = CreateJob("c", auto_dismiss=False)
    env.mgr.add(job)
    env.mgr.start_jobs([job])
    with raises("Block job 'c' not found", "DeviceNotActive"):
        env.mgr.block_job_pause("c")
    assert env.mgr.query_block_jobs() == []
    env.runner.run_until_idle()
    assert env.take() == ["c created", "c running", "c paused", "c running", "c waiting",
                          "c pending", "c concluded"]
    assert env.mgr.query_jobs() == [{"id": "c", "type": "create", "status": "concluded",
                                     "current-progress": 1, "total-progress": 1}]
    env.mgr.job_dismiss("c")
    assert env.take() == ["c null"]


# --------------------------------------------------------------------------- ids


def test_job_ids(env: Env) -> None:
    # observed texts
    for bad in ("1bad", "", "a b", "-x"):
        with raises(f"Invalid job ID '{bad}'"):
            env.job(bad)
    job = env.started(auto_dismiss=False)
    with raises("Job ID 'j' already in use"):
        env.job("j")
    env.runner.run_until_idle()
    assert job.status == JobStatus.CONCLUDED
    with raises("Job ID 'j' already in use"):  # a concluded job still holds its id
        env.job("j")
    env.mgr.job_dismiss("j")
    env.job("j")  # free again
    assert [e for e in env.log if "." not in e] == START + [
        "j waiting", "j pending", "COMPLETED j", "j concluded", "j null", "j created"]


# --------------------------------------------------------------------------- lifecycles


def test_success(env: Env) -> None:
    job = env.started(chunks=4)
    assert env.take() == START
    assert env.mgr.query_jobs() == [{"id": "j", "type": "backup", "status": "running",
                                     "current-progress": 0, "total-progress": 4 * MiB}]
    env.runner.run_until_idle()
    # observed (c_push_backup.jsonl, part 1); callbacks per job.c
    assert env.take() == ["j waiting", "j pending", "j.prepare", "j.commit", "j.clean",
                          "COMPLETED j", "j concluded", "j null"]
    assert env.data("BLOCK_JOB_COMPLETED") == [
        {"type": "backup", "device": "j", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0}]
    assert list(env.data("BLOCK_JOB_COMPLETED")[0]) == ["type", "device", "len", "offset",
                                                        "speed"]
    assert job.status == JobStatus.NULL
    assert env.mgr.query_jobs() == [] and env.mgr.query_block_jobs() == []


def test_auto_finalize_false(env: Env) -> None:
    job = env.started(auto_finalize=False, speed=MiB, chunks=64)
    env.runner.advance(0.5)
    # observed (speed 1 MiB/s, query after ~0.5 s): busy false, paused false
    assert env.mgr.query_block_jobs() == [{
        "type": "backup", "device": "j", "len": 64 * MiB, "offset": MiB, "busy": False,
        "paused": False, "speed": MiB, "io-status": "ok", "ready": False,
        "status": "running", "auto-finalize": False, "auto-dismiss": True}]
    env.take()
    env.mgr.block_job_set_speed("j", 0)
    env.runner.run_due()
    # observed: waiting, pending, BLOCK_JOB_PENDING; then job-finalize
    assert env.take() == ["j waiting", "j pending", "PENDING j"]
    assert env.data("BLOCK_JOB_PENDING") == [{"type": "backup", "id": "j"}]
    assert env.mgr.query_block_jobs()[0]["status"] == "pending"
    assert env.mgr.query_block_jobs()[0]["busy"] is False
    env.mgr.job_finalize("j")
    assert env.take() == ["j.prepare", "j.commit", "j.clean", "COMPLETED j",
                          "j concluded", "j null"]
    assert job.status == JobStatus.NULL
    with raises("Job not found"):
        env.mgr.job_finalize("j")
    with raises("Block job 'j' not found", "DeviceNotActive"):
        env.mgr.block_job_finalize("j")


def test_auto_dismiss_false(env: Env) -> None:
    env.started(auto_dismiss=False)
    env.runner.run_until_idle()
    assert env.take()[-3:] == ["j.clean", "COMPLETED j", "j concluded"]
    # observed: the concluded job stays listed, without an error
    assert env.mgr.query_jobs() == [{"id": "j", "type": "backup", "status": "concluded",
                                     "current-progress": 4 * MiB,
                                     "total-progress": 4 * MiB}]
    info = env.mgr.query_block_jobs()
    assert info[0]["status"] == "concluded" and "error" not in info[0]
    env.mgr.block_job_dismiss("j")
    assert env.take() == ["j null"]


def test_cancel_running(env: Env) -> None:
    env.started(speed=MiB, chunks=64, auto_dismiss=False)
    env.runner.advance(0.5)
    env.take()
    env.mgr.job_cancel("j")
    # observed: aborting, CANCELLED (offset as reached), concluded; never waiting/pending
    assert env.take() == ["j aborting", "j.abort", "j.clean", "CANCELLED j", "j concluded"]
    assert env.data("BLOCK_JOB_CANCELLED") == [
        {"type": "backup", "device": "j", "len": 64 * MiB, "offset": MiB, "speed": MiB}]
    assert env.mgr.query_jobs() == [{"id": "j", "type": "backup", "status": "concluded",
                                     "current-progress": MiB, "total-progress": 64 * MiB,
                                     "error": "Operation canceled"}]
    assert env.mgr.query_block_jobs() == [{
        "type": "backup", "device": "j", "len": 64 * MiB, "offset": MiB, "busy": False,
        "paused": False, "speed": MiB, "io-status": "ok", "ready": False,
        "status": "concluded", "auto-finalize": True, "auto-dismiss": False,
        "error": "Operation canceled"}]
    env.mgr.job_dismiss("j")
    assert env.take() == ["j null"]
    env.runner.run_until_idle()
    assert env.log == []


def test_block_job_cancel_running(env: Env) -> None:
    env.started(speed=MiB, chunks=64)
    env.runner.advance(0.5)
    env.take()
    env.mgr.block_job_cancel("j")  # observed (c_push_backup part 8)
    assert env.take() == ["j aborting", "j.abort", "j.clean", "CANCELLED j", "j concluded",
                          "j null"]


@pytest.mark.parametrize("how", ["job-cancel", "block-job-cancel-force"])
def test_cancel_paused(env: Env, how: str) -> None:
    job = env.started(speed=MiB, chunks=64)
    env.runner.advance(0.5)
    env.take()
    env.mgr.job_pause("j")
    assert env.take() == ["j paused"]  # observed: before the reply
    assert env.mgr.query_block_jobs()[0]["paused"] is True
    if how == "job-cancel":
        env.mgr.job_cancel("j")
    else:
        env.mgr.block_job_cancel("j", force=True)
    # observed: the job leaves its pause point (running) before aborting
    assert env.take() == ["j running", "j aborting", "j.abort", "j.clean", "CANCELLED j",
                          "j concluded", "j null"]
    assert not job.user_paused


def test_pause_resume(env: Env) -> None:
    job = env.started(speed=MiB, chunks=64)
    env.runner.advance(0.5)
    env.take()
    env.mgr.job_pause("j")
    env.mgr.block_job_set_speed("j", 2 * MiB)  # observed: allowed while paused
    assert env.mgr.query_block_jobs()[0]["speed"] == 2 * MiB
    env.runner.advance(10)
    assert job.progress_current == MiB  # a paused job makes no progress
    env.mgr.job_resume("j")
    assert env.take() == ["j paused", "j running"]
    env.runner.run_due()
    assert job.progress_current == 2 * MiB  # observed: the next chunk follows at once
    with raises(NOT_PAUSED):
        env.mgr.job_resume("j")


def test_cancel_pending(env: Env) -> None:
    env.started(auto_finalize=False, auto_dismiss=False)
    env.runner.run_until_idle()
    assert env.take() == START + ["j waiting", "j pending", "PENDING j"]
    env.mgr.job_cancel("j")
    # observed: CANCELLED even though everything was copied
    assert env.take() == ["j aborting", "j.abort", "j.clean", "CANCELLED j", "j concluded"]
    assert env.data("BLOCK_JOB_CANCELLED")[0]["offset"] == 4 * MiB
    assert env.mgr.query_jobs()[0]["error"] == "Operation canceled"
    assert env.mgr.query_block_jobs()[0]["error"] == "Operation canceled"


def test_failure(env: Env) -> None:
    env.started(fail_at=0, auto_dismiss=False)
    env.runner.run_until_idle()
    # observed (blkdebug target, on-target-error report)
    assert env.take() == START + ["ERROR j write report", "j aborting", "j.abort", "j.clean",
                                  "COMPLETED j error=Input/output error", "j concluded"]
    assert env.data("BLOCK_JOB_ERROR") == [
        {"device": "j", "operation": "write", "action": "report"}]
    assert list(env.data("BLOCK_JOB_COMPLETED")[0]) == [
        "type", "device", "len", "offset", "speed", "error"]
    assert env.mgr.query_jobs()[0]["error"] == "Input/output error"
    assert env.mgr.query_block_jobs()[0]["error"] == "Input/output error"
    env.mgr.job_dismiss("j")


def test_error_stop(env: Env) -> None:
    job = env.started(fail_at=0, on_error="stop")
    env.runner.run_until_idle()
    # observed: BLOCK_JOB_ERROR stop, then paused as if by the user, io-status failed
    assert env.take() == START + ["ERROR j write stop", "j paused"]
    info = env.mgr.query_block_jobs()[0]
    assert (info["status"], info["paused"], info["io-status"]) == ("paused", True, "failed")
    with raises("Job is already paused"):
        env.mgr.job_pause("j")
    env.mgr.job_resume("j")
    assert job.io_status == "ok"
    env.runner.run_due()
    assert env.take() == ["j running", "ERROR j write stop", "j paused"]  # observed
    assert job.io_status == "failed"
    env.mgr.job_cancel("j")
    # observed order of events (QEMU sent its reply after "running": backup restarts its
    # copy loop before it notices the cancel; a backup driver can model that)
    assert env.take() == ["j running", "j aborting", "j.abort", "j.clean", "CANCELLED j",
                          "j concluded", "j null"]


def test_error_ignore_and_enospc(env: Env) -> None:
    job = env.started(fail_at=0, on_error="ignore", chunks=2)
    env.runner.run_until_idle()
    assert env.take()[4:] == ["ERROR j write ignore", "ERROR j write ignore", "j waiting",
                              "j pending", "j.prepare", "j.commit", "j.clean",
                              "COMPLETED j", "j concluded", "j null"]
    assert job.status == JobStatus.NULL
    k = env.started("k", speed=MiB)
    env.take()
    assert k.error_action("enospc", is_read=True, err=errno.EIO) == "report"
    assert k.error_action("auto", is_read=True, err=errno.ENOSPC) == "stop"
    assert k.io_status == "nospace" and k.user_paused
    assert env.take() == ["ERROR k read report", "ERROR k read stop", "k paused"]


def test_never_started_cancel(env: Env) -> None:
    env.job()
    env.mgr.get("j").cancel_sync()  # type: ignore[union-attr]
    # observed (e_transaction part 4): no BLOCK_JOB_* for a job that never ran
    assert env.take() == ["j created", "j aborting", "j.abort", "j.clean", "j concluded",
                          "j null"]
    assert env.mgr.jobs() == []


def test_individual_abort_order(env: Env) -> None:
    """transaction [backup a1, backup a2, abort]: abort runs in reverse (observed)."""
    a1, a2 = env.job("a1"), env.job("a2")
    for job in (a2, a1):
        job.cancel_sync()
    assert [e for e in env.take() if "." not in e] == [
        "a1 created", "a2 created", "a2 aborting", "a2 concluded", "a2 null",
        "a1 aborting", "a1 concluded", "a1 null"]


def test_grouped_abort_of_two_unstarted_jobs_hangs(env: Env) -> None:
    """Observed: QEMU 7.2 sends a2's events and then hangs (it waits for a1 forever).
    The model sends the same events, finishes a1's rollback too, then raises QemuHang so
    the caller knows where QEMU would have stopped."""
    txn = JobTxn()
    a1, a2 = env.job("a1", txn=txn), env.job("a2", txn=txn)
    with pytest.raises(QemuHang):
        a2.cancel_sync()
    assert [e for e in env.take() if "." not in e] == [
        "a1 created", "a2 created", "a2 aborting", "a2 concluded", "a2 null",
        "a1 aborting", "a1 concluded", "a1 null"]
    assert a1.status == JobStatus.NULL


def test_grouped_abort_of_one_unstarted_job(env: Env) -> None:
    txn = JobTxn()
    env.job("a1", txn=txn).cancel_sync()  # observed: fine with a single job
    assert [e for e in env.take() if "." not in e] == [
        "a1 created", "a1 aborting", "a1 concluded", "a1 null"]


# --------------------------------------------------------------------------- grouped txn


def _group(env: Env, *specs: tuple[str, dict[str, Any]]) -> list[ChunkJob]:
    txn = JobTxn()
    jobs = [env.job(jid, txn=txn, **kw) for jid, kw in specs]
    env.mgr.start_jobs(jobs)
    return jobs


def test_grouped_success(env: Env) -> None:
    # e_transaction.jsonl part 7 (gj0 device disk0, gj1 device disk1; gj1 finished first)
    _group(env, ("gj0", {"chunks": 4}), ("gj1", {"chunks": 2}))
    assert env.take() == ["gj0 created", "gj1 created", "gj0 running", "gj0 paused",
                          "gj1 running", "gj1 paused", "gj0 running", "gj1 running"]
    env.runner.run_until_idle()
    assert env.take() == [
        "gj1 waiting", "gj0 waiting", "gj1 pending", "gj0 pending",
        "gj1.prepare", "gj0.prepare",
        "gj1.commit", "gj1.clean", "COMPLETED gj1", "gj1 concluded", "gj1 null",
        "gj0.commit", "gj0.clean", "COMPLETED gj0", "gj0 concluded", "gj0 null"]


def test_grouped_waits_for_all(env: Env) -> None:
    # observed: g1 (fast) waits in "waiting" while g2 (throttled) runs; pending in
    # list order (newest first) once g2 is done
    g1, g2 = _group(env, ("g1", {}), ("g2", {"speed": 4 * MiB, "chunks": 64}))
    env.runner.advance(0.4)
    assert env.take()[-1] == "g1 waiting"
    assert [j["id"] for j in env.mgr.query_jobs()] == ["g2", "g1"]  # observed: newest first
    assert [j["status"] for j in env.mgr.query_jobs()] == ["running", "waiting"]
    env.mgr.block_job_set_speed("g2", 0)
    env.runner.run_due()
    assert [e for e in env.take() if "." not in e] == [
        "g2 waiting", "g2 pending", "g1 pending", "COMPLETED g2", "g2 concluded", "g2 null",
        "COMPLETED g1", "g1 concluded", "g1 null"]


def test_grouped_cancel_running(env: Env) -> None:
    # e_transaction.jsonl part 6: job-cancel gi0 while both run throttled
    _group(env, ("gi0", {"speed": MiB}), ("gi1", {"speed": MiB}))
    env.runner.advance(1.5)
    env.take()
    env.mgr.job_cancel("gi0")
    assert env.take() == [
        "gi0 aborting", "gi1 aborting", "gi1.abort", "gi1.clean", "CANCELLED gi1",
        "gi1 concluded", "gi1 null", "gi0.abort", "gi0.clean", "CANCELLED gi0",
        "gi0 concluded", "gi0 null"]
    assert [d["offset"] for d in env.data("BLOCK_JOB_CANCELLED")] == [2 * MiB, 2 * MiB]


def test_grouped_failure(env: Env) -> None:
    # observed: f2 (target fails) ends first with an error, f1 is then cancelled
    _group(env, ("f1", {"speed": MiB, "chunks": 64}), ("f2", {"fail_at": 0}))
    env.runner.advance(0.5)
    assert [e for e in env.take()[8:] if "." not in e] == [
        "ERROR f2 write report", "f2 aborting", "COMPLETED f2 error=Input/output error",
        "f2 concluded", "f2 null", "f1 aborting", "CANCELLED f1", "f1 concluded", "f1 null"]


def test_grouped_cancel_waiting(env: Env) -> None:
    # observed: cancelling the waiting h1 first runs down the running h2
    _group(env, ("h1", {}), ("h2", {"speed": MiB, "chunks": 64}))
    env.runner.advance(0.5)
    assert env.take()[-1] == "h1 waiting"
    env.mgr.job_cancel("h1")
    assert [e for e in env.take() if "." not in e] == [
        "h2 aborting", "CANCELLED h2", "h2 concluded", "h2 null",
        "h1 aborting", "CANCELLED h1", "h1 concluded", "h1 null"]
    assert env.data("BLOCK_JOB_CANCELLED")[1] == {
        "type": "backup", "device": "h1", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0}


def test_grouped_cancel_other_while_waiting(env: Env) -> None:
    # observed: d1 waits, d2 (running) is cancelled: d2 first, then d1 cancelled too
    _group(env, ("d1", {}), ("d2", {"speed": MiB, "chunks": 64}))
    env.runner.advance(0.5)
    env.take()
    env.mgr.job_cancel("d2")
    assert [e for e in env.take() if "." not in e] == [
        "d2 aborting", "CANCELLED d2", "d2 concluded", "d2 null",
        "d1 aborting", "CANCELLED d1", "d1 concluded", "d1 null"]


def test_grouped_one_manual_finalize(env: Env) -> None:
    # observed: b1 auto-finalize=false holds the whole group; finalizing b2 finalizes both
    _group(env, ("b1", {"auto_finalize": False, "chunks": 4}), ("b2", {"chunks": 2}))
    env.runner.run_until_idle()
    assert env.take()[8:] == ["b2 waiting", "b1 waiting", "b2 pending", "b1 pending",
                              "PENDING b1"]
    env.mgr.job_finalize("b2")
    assert [e for e in env.take() if "." not in e] == [
        "COMPLETED b2", "b2 concluded", "b2 null", "COMPLETED b1", "b1 concluded", "b1 null"]
    with raises("Job not found"):
        env.mgr.job_finalize("b1")


def test_grouped_both_manual(env: Env) -> None:
    # observed: each pending is followed by its BLOCK_JOB_PENDING; finalize walks newest first
    _group(env, ("c1", {"auto_finalize": False, "chunks": 4}),
           ("c2", {"auto_finalize": False, "auto_dismiss": False, "chunks": 2}))
    env.runner.run_until_idle()
    assert env.take()[8:] == ["c2 waiting", "c1 waiting", "c2 pending", "PENDING c2",
                              "c1 pending", "PENDING c1"]
    env.mgr.job_finalize("c1")
    assert [e for e in env.take() if "." not in e] == [
        "COMPLETED c2", "c2 concluded", "COMPLETED c1", "c1 concluded", "c1 null"]
    env.mgr.job_dismiss("c2")
    assert env.take() == ["c2 null"]


def test_grouped_prepare_failure(env: Env) -> None:
    # job.c: every job is prepared first; a failing prepare aborts the whole group
    _group(env, ("p1", {}), ("p2", {"prepare_ret": -errno.EIO}))
    env.runner.run_until_idle()
    assert env.take()[8:] == [
        "p1 waiting", "p2 waiting", "p2 pending", "p1 pending", "p2.prepare", "p2 aborting",
        "p2.abort", "p2.clean", "COMPLETED p2 error=Input/output error", "p2 concluded",
        "p2 null", "p1 aborting", "p1.abort", "p1.clean", "CANCELLED p1", "p1 concluded",
        "p1 null"]


# --------------------------------------------------------------------------- driving


def test_throttled_progress_is_deterministic(env: Env) -> None:
    job = env.started(speed=MiB, chunks=8)
    assert job.runnable and job.wake_at == env.clock.monotonic()
    assert env.runner.next_wakeup() == env.clock.monotonic()
    env.runner.advance(0.5)
    assert job.progress_current == MiB  # first chunk at once, then 1 s per MiB
    t0 = env.clock.monotonic()
    assert job.wake_at == pytest.approx(t0 + 0.5)
    env.runner.advance(0.5)
    assert job.progress_current == 2 * MiB
    env.runner.run_until_idle()
    assert job.status == JobStatus.NULL
    assert env.clock.monotonic() == pytest.approx(7.0)


def test_manual_stepping(env: Env) -> None:
    """step() fires the job's timer whatever the clock says: tests drive it chunk by chunk."""
    job = env.started(chunks=3, speed=MiB)
    assert job.step(budget=MiB // 2) == pytest.approx(0.5)
    assert job.progress_current == MiB // 2
    assert job.step() == pytest.approx(1.5)  # same rate-limit slice: the debt adds up
    env.mgr.job_pause("j")
    with pytest.raises(JobStateError):
        job.step()  # parked in a pause point: only a resume lets it run
    env.mgr.job_resume("j")
    assert job.step() == pytest.approx(2.5)
    assert job.step() is None
    assert job.status == JobStatus.NULL
    assert job.progress_current == 3 * MiB


def test_same_run_same_log() -> None:
    def run() -> list[str]:
        env = Env()
        _group(env, ("x", {"speed": MiB, "chunks": 5}), ("y", {"speed": 3 * MiB, "chunks": 9}))
        env.runner.advance(1.0)
        env.mgr.job_pause("y")
        env.runner.advance(2.0)
        env.mgr.job_resume("y")
        env.runner.run_until_idle()
        return env.log

    assert run() == run()


def test_set_speed_kicks_sleeping_job(env: Env) -> None:
    job = env.started(speed=MiB // 16, chunks=4)
    env.runner.run_due()
    assert job.wake_at == pytest.approx(16.0)
    env.mgr.block_job_set_speed("j", MiB // 32)  # slower: no kick
    assert job.wake_at == pytest.approx(16.0)
    env.mgr.block_job_set_speed("j", MiB)  # faster: the sleep is cut short
    assert job.wake_at == env.clock.monotonic()
    wakeups: list[int] = []
    env.mgr.on_wakeup = lambda: wakeups.append(1)
    env.mgr.block_job_set_speed("j", 0)
    assert wakeups == [1]


def test_runner_needs_virtual_clock() -> None:
    from virtsim.sim.clock import Clock

    mgr = JobManager(EventBus(), Clock())
    with pytest.raises(TypeError):
        JobRunner(mgr).run_until_idle()
    assert JobRunner(mgr).run_due() == 0


def test_spurious_pair_from_drain(env: Env) -> None:
    """Observed: a drain (e.g. another blockdev-backup on the same node) pauses and
    resumes a running job: paused, running."""
    job = env.started(speed=MiB, chunks=8)
    env.runner.run_due()
    env.take()
    job.internal_pause()
    job.internal_resume()
    assert env.take() == ["j paused", "j running"]
    # a user pause survives the drain: no event on the drain's resume
    job.pause()
    job.internal_pause()
    job.internal_resume()
    assert env.take() == ["j paused"]


# --------------------------------------------------------------------------- pause points


def test_pause_at_offset(env: Env) -> None:
    job = env.started(chunk=3 * MiB, chunks=4)
    job.pause_at(5 * MiB)
    env.take()
    env.runner.run_until_idle()
    assert job.progress_current == 5 * MiB  # the chunk was cut at the offset
    assert env.take() == ["j paused"]
    assert job.user_paused and env.mgr.query_block_jobs()[0]["paused"] is True
    env.mgr.job_resume("j")
    env.runner.run_until_idle()
    assert env.take()[:2] == ["j running", "j waiting"]


def test_hold_at_offset(env: Env) -> None:
    job = env.started(chunks=8)
    job.pause_at(2 * MiB, hold=True)
    env.take()
    env.runner.run_until_idle()
    assert job.progress_current == 2 * MiB and job.co_state == "held"
    info = env.mgr.query_block_jobs()[0]
    assert (info["status"], info["busy"], info["paused"]) == ("running", True, False)
    env.mgr.job_pause("j")  # lands while a request is in flight: no event yet
    assert env.take() == []
    job.release()
    env.runner.run_due()
    assert env.take() == ["j paused"]
    env.mgr.job_resume("j")
    env.runner.run_until_idle()
    assert job.status == JobStatus.NULL


def test_cancel_while_held(env: Env) -> None:
    job = env.started(chunks=8)
    job.pause_at(MiB, hold=True)
    env.runner.run_until_idle()
    env.take()
    env.mgr.job_cancel("j")
    assert env.take() == []  # nothing until the request completes
    job.release()
    env.runner.run_due()
    assert [e for e in env.take() if "." not in e] == [
        "j aborting", "CANCELLED j", "j concluded", "j null"]


def test_cancel_between_last_request_and_exit(env: Env) -> None:
    """job.c: a cancel after the run returned but before job_exit still cancels."""
    job = env.started(chunks=1)
    env.take()
    assert job.step(exit=False) is None
    assert job.status == JobStatus.RUNNING and job.progress_current == MiB
    env.mgr.job_cancel("j")
    assert [e for e in env.take() if "." not in e] == [
        "j aborting", "CANCELLED j", "j concluded", "j null"]
    assert env.data("BLOCK_JOB_CANCELLED")[0]["offset"] == MiB


def test_pause_before_start(env: Env) -> None:
    job = env.job()
    env.mgr.job_pause("j")
    env.mgr.start_jobs([job])
    assert env.take() == ["j created", "j running", "j paused"]
    env.mgr.job_resume("j")
    assert env.take() == ["j running"]


# --------------------------------------------------------------------------- ready / complete


def test_ready_standby_complete(env: Env) -> None:
    job = env.job(cls=ReadyJob, chunks=2)
    job.start()
    env.runner.run_until_idle()
    assert env.take() == ["j created", "j running", "j ready", "READY j"]
    assert env.data("BLOCK_JOB_READY") == [
        {"type": "mirror", "device": "j", "len": 2 * MiB, "offset": 2 * MiB, "speed": 0}]
    assert env.mgr.query_block_jobs()[0]["ready"] is True
    env.mgr.job_pause("j")
    assert env.take() == ["j standby"]
    assert env.mgr.query_block_jobs()[0]["ready"] is True
    env.mgr.job_resume("j")
    env.mgr.job_complete("j")
    env.runner.run_until_idle()
    assert [e for e in env.take() if "." not in e] == [
        "j ready", "j waiting", "j pending", "COMPLETED j", "j concluded", "j null"]


def test_complete_after_soft_cancel(env: Env) -> None:
    job = env.job(cls=SoftReadyJob, chunks=2, auto_dismiss=False)
    job.start()
    env.runner.run_until_idle()
    env.mgr.block_job_cancel("j")  # soft: the job completes without error
    with raises("Job 'j' in state 'concluded' cannot accept command verb 'complete'"):
        env.mgr.job_complete("j")
    assert env.mgr.query_jobs()[0]["status"] == "concluded"
    assert "error" not in env.mgr.query_jobs()[0]
    assert env.data("BLOCK_JOB_COMPLETED")


def test_rate_limit() -> None:
    clock = VirtualClock()
    rl = RateLimit(clock)
    assert rl.delay(MiB) == 0.0  # unthrottled
    rl.set_speed(MiB)
    assert rl.delay(64 * 1024) == 0.0  # within the 100 ms slice quota
    assert rl.delay(64 * 1024) == pytest.approx(0.125)
    clock.advance(0.125)
    assert rl.delay(MiB) == pytest.approx(1.0)


# --------------------------------------------------------------------------- replays


def qmp(env: Env, cmd: str, **a: Any) -> tuple[str | None, list[str]]:
    """Run one command the way the emulator will: the command, then every job step that
    is due, then the reply.  Returns (error text or None, events without callbacks)."""
    m = env.mgr
    calls = {
        "job-pause": lambda: m.job_pause(a["id"]),
        "job-resume": lambda: m.job_resume(a["id"]),
        "job-cancel": lambda: m.job_cancel(a["id"]),
        "job-complete": lambda: m.job_complete(a["id"]),
        "job-finalize": lambda: m.job_finalize(a["id"]),
        "job-dismiss": lambda: m.job_dismiss(a["id"]),
        "block-job-pause": lambda: m.block_job_pause(a["device"]),
        "block-job-resume": lambda: m.block_job_resume(a["device"]),
        "block-job-cancel": lambda: m.block_job_cancel(a["device"], a.get("force", False)),
        "block-job-complete": lambda: m.block_job_complete(a["device"]),
        "block-job-finalize": lambda: m.block_job_finalize(a["id"]),
        "block-job-dismiss": lambda: m.block_job_dismiss(a["id"]),
        "block-job-set-speed": lambda: m.block_job_set_speed(a["device"], a["speed"]),
    }
    err = None
    try:
        calls[cmd]()
    except SimError as e:
        err = e.desc
    env.runner.run_due()
    return err, [e for e in env.take() if "." not in e]


# Command, arguments, error (None: {}), events before the reply -- all observed on QEMU
# 7.2.22 for blockdev-backup {"job-id": "j", "sync": "full", "speed": 1048576,
# "auto-finalize": false} between two 64 MiB null-co nodes.
OBSERVED_MANUAL_FINALIZE: list[tuple[str, dict[str, Any], str | None, list[str]]] = [
    ("job-complete", {"id": "j"}, V("j", "running", "complete"), []),
    ("job-finalize", {"id": "j"}, V("j", "running", "finalize"), []),
    ("job-dismiss", {"id": "j"}, V("j", "running", "dismiss"), []),
    ("job-resume", {"id": "j"}, NOT_PAUSED, []),
    ("block-job-complete", {"device": "j"}, V("j", "running", "complete"), []),
    ("block-job-set-speed", {"device": "j", "speed": -1}, NEG_SPEED, []),
    ("block-job-resume", {"device": "j"}, NOT_PAUSED, []),
    ("job-pause", {"id": "j"}, None, ["j paused"]),
    ("job-pause", {"id": "j"}, "Job is already paused", []),
    ("block-job-pause", {"device": "j"}, "Job is already paused", []),
    ("block-job-cancel", {"device": "j"},
     "The block job for device 'j' is currently paused", []),
    ("block-job-cancel", {"device": "j", "force": False},
     "The block job for device 'j' is currently paused", []),
    ("job-complete", {"id": "j"}, V("j", "paused", "complete"), []),
    ("job-finalize", {"id": "j"}, V("j", "paused", "finalize"), []),
    ("job-dismiss", {"id": "j"}, V("j", "paused", "dismiss"), []),
    ("block-job-set-speed", {"device": "j", "speed": -1}, NEG_SPEED, []),
    ("block-job-set-speed", {"device": "j", "speed": 2097152}, None, []),
    ("job-resume", {"id": "j"}, None, ["j running"]),
    ("job-resume", {"id": "j"}, NOT_PAUSED, []),
    ("block-job-set-speed", {"device": "j", "speed": 0}, None,
     ["j waiting", "j pending", "PENDING j"]),
    ("job-pause", {"id": "j"}, V("j", "pending", "pause"), []),
    ("job-resume", {"id": "j"}, NOT_PAUSED, []),
    ("job-complete", {"id": "j"}, V("j", "pending", "complete"), []),
    ("job-dismiss", {"id": "j"}, V("j", "pending", "dismiss"), []),
    ("block-job-set-speed", {"device": "j", "speed": 5}, V("j", "pending", "set-speed"), []),
    ("block-job-pause", {"device": "j"}, V("j", "pending", "pause"), []),
    ("job-finalize", {"id": "j"}, None, ["COMPLETED j", "j concluded", "j null"]),
    ("job-finalize", {"id": "j"}, "Job not found", []),
    ("block-job-finalize", {"id": "j"}, "Block job 'j' not found", []),
    ("block-job-pause", {"device": "nosuch"}, "Block job 'nosuch' not found", []),
    ("block-job-dismiss", {"id": "nosuch"}, "Block job 'nosuch' not found", []),
    ("job-pause", {"id": "nosuch"}, "Job not found", []),
]

# blockdev-backup {"job-id": "j", "speed": 1048576, "auto-dismiss": false}, paused, then
# cancelled; then every verb on the concluded job (observed on QEMU 7.2.22).
OBSERVED_CONCLUDED: list[tuple[str, dict[str, Any], str | None, list[str]]] = [
    ("job-pause", {"id": "j"}, None, ["j paused"]),
    ("job-cancel", {"id": "j"}, None,
     ["j running", "j aborting", "CANCELLED j", "j concluded"]),
    ("job-pause", {"id": "j"}, V("j", "concluded", "pause"), []),
    ("job-resume", {"id": "j"}, NOT_PAUSED, []),
    ("job-complete", {"id": "j"}, V("j", "concluded", "complete"), []),
    ("job-finalize", {"id": "j"}, V("j", "concluded", "finalize"), []),
    ("job-cancel", {"id": "j"}, V("j", "concluded", "cancel"), []),
    ("block-job-cancel", {"device": "j"}, V("j", "concluded", "cancel"), []),
    ("block-job-cancel", {"device": "j", "force": True}, V("j", "concluded", "cancel"), []),
    ("block-job-set-speed", {"device": "j", "speed": 5}, V("j", "concluded", "set-speed"), []),
    ("block-job-set-speed", {"device": "j", "speed": -5},
     V("j", "concluded", "set-speed"), []),
    ("block-job-dismiss", {"id": "j"}, None, ["j null"]),
]


@pytest.mark.parametrize("script,kw", [
    (OBSERVED_MANUAL_FINALIZE, {"auto_finalize": False}),
    (OBSERVED_CONCLUDED, {"auto_dismiss": False}),
], ids=["manual-finalize", "concluded"])
def test_observed_sessions(env: Env, script: list[tuple[str, dict[str, Any], str | None,
                                                       list[str]]], kw: dict[str, Any]) -> None:
    env.started(speed=MiB, chunks=64, **kw)
    env.runner.advance(0.5)
    assert env.take() == START
    for i, (cmd, args, error, events) in enumerate(script):
        assert qmp(env, cmd, **args) == (error, events), f"step {i}: {cmd} {args}"
