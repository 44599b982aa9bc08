"""QEMU 7.2's generic job layer: states, verbs, completion, transactions, registry.

Backup clients react to the exact order of ``JOB_STATUS_CHANGE`` and ``BLOCK_JOB_*``
events and to the exact refusal texts, so the state machine, the verb table and the way a
finished job walks through its transaction follow QEMU's job.c / blockjob.c rule by rule.
Job types (backup, blockdev-create) subclass :class:`Job` or :class:`BlockJob` and supply
only the work (:meth:`Job.work`) and the finalisation callbacks.

Concurrency: QEMU runs each job as a coroutine.  Here the coroutine is a small state
(sleeping until a deadline, waiting for a kick, parked in a pause point, held mid-request,
finished) plus a step function.  Whoever owns time calls :meth:`Job.step` when a job's
deadline (``wake_at``, on the model's clock) has passed: :class:`JobRunner` does that
deterministically for tests, an asyncio task can do it for the emulator.  Commands that
enter a sleeping job in QEMU (pause, cancel) take effect synchronously here too, which is
what QEMU 7.2 shows: the ``paused`` / ``aborting`` events arrive before the reply.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from .block import id_wellformed
from .clock import Clock, VirtualClock
from .errors import HangError, SimError
from .events import EventBus


class JobStatus(StrEnum):
    """qapi/job.json ``JobStatus``, in schema order (the tables' column order)."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(StrEnum):
    """qapi/job.json ``JobVerb``: the user actions the verb table gates."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    DISMISS = "dismiss"
    FINALIZE = "finalize"


# --------------------------------------------------------------------------- the tables
# Both grids are QEMU 7.2's facts, laid out like job.c so they can be checked by eye.
# Columns are the states in JobStatus order: U=undefined C=created R=running P=paused
# Y=ready S=standby W=waiting D=pending X=aborting E=concluded N=null.

_TRANSITION_GRID = """
                U C R P Y S W D X E N
    undefined   . 1 . . . . . . . . .
    created     . . 1 . . . . . 1 . 1
    running     . . . 1 1 . 1 . 1 . .
    paused      . . 1 . . . . . . . .
    ready       . . . . . 1 1 . 1 . .
    standby     . . . . 1 . . . . . .
    waiting     . . . . . . . 1 1 . .
    pending     . . . . . . . . 1 1 .
    aborting    . . . . . . . . 1 1 .
    concluded   . . . . . . . . . . 1
    null        . . . . . . . . . . .
"""

_VERB_GRID = """
                U C R P Y S W D X E N
    cancel      . 1 1 1 1 1 1 1 . . .
    pause       . 1 1 1 1 1 . . . . .
    resume      . 1 1 1 1 1 . . . . .
    set-speed   . 1 1 1 1 1 . . . . .
    complete    . . . . 1 1 . . . . .
    dismiss     . . . . . . . . . 1 .
    finalize    . . . . . . . 1 . . .
"""


def _parse_grid(grid: str) -> dict[str, frozenset[JobStatus]]:
    """Row name -> the set of states marked ``1`` in that row."""
    lines = [line.split() for line in grid.strip().splitlines()]
    columns = list(JobStatus)
    if len(lines[0]) != len(columns):
        raise AssertionError("grid header does not list every JobStatus")
    table: dict[str, frozenset[JobStatus]] = {}
    for name, *marks in lines[1:]:
        if len(marks) != len(columns):
            raise AssertionError(f"grid row {name!r} has {len(marks)} columns")
        table[name] = frozenset(s for s, m in zip(columns, marks, strict=True) if m == "1")
    return table


#: Allowed transitions: ``TRANSITIONS[old]`` is the set of states ``old`` may move to.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus(k): v for k, v in _parse_grid(_TRANSITION_GRID).items()}
#: Verb table: ``VERBS[verb]`` is the set of states in which the verb is accepted.
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb(k): v for k, v in _parse_grid(_VERB_GRID).items()}

_COMPLETED_STATES = frozenset({JobStatus.WAITING, JobStatus.PENDING, JobStatus.ABORTING,
                               JobStatus.CONCLUDED, JobStatus.NULL})

# glibc's strerror texts, fixed here so the model does not depend on the host's libc.
_STRERROR = {
    errno.ECANCELED: "Operation canceled",
    errno.EIO: "Input/output error",
    errno.ENOSPC: "No space left on device",
    errno.EPERM: "Operation not permitted",
    errno.EINVAL: "Invalid argument",
}


def strerror(err: int) -> str:
    """The text QEMU puts in a job's error for a bare ``-errno`` return."""
    return _STRERROR.get(err) or os.strerror(err)


class JobStateError(AssertionError):
    """A transition or call QEMU would assert on: a bug in the model or its caller."""


class QemuHang(HangError):
    """QEMU 7.2 would wait here forever.

    Raised after the events QEMU does send; the caller decides how to play dead (e.g. stop
    answering the monitor).  Observed: aborting a ``grouped`` transaction that created two
    backup jobs hangs QEMU 7.2 after the second job reaches ``null`` (the first job was never
    started, and the abort waits for it to finish).
    """


@dataclass(frozen=True)
class Finished:
    """What a job's run returned: ``ret`` 0 or ``-errno``; ``error`` overrides strerror."""

    ret: int = 0
    error: str | None = None


#: What :meth:`Job.work` returns: seconds to sleep before the next step (0.0: run again
#: soon), ``None`` to wait until kicked (:meth:`Job.kick`), or :class:`Finished`.
WorkResult = float | Finished | None


class _Co(StrEnum):
    """Where the job's coroutine is."""

    UNSTARTED = "unstarted"
    RUNNING = "running"            # inside a step (busy)
    SLEEPING = "sleeping"          # timer armed: runnable once wake_at has passed
    WAITING = "waiting"            # yielded without a timer: runs again only when kicked
    PAUSED = "paused"              # parked in a pause point
    HELD = "held"                  # a request in flight that never ends (pause_at hold)
    EXIT_PENDING = "exit-pending"  # run returned; job_exit not yet run
    EXITED = "exited"


_FINISH_SYNC_LIMIT = 1_000_000


# --------------------------------------------------------------------------- Job


class Job:
    """One job (job.c ``Job``): state machine, verbs and the completion path.

    Subclasses set :attr:`job_type` and implement :meth:`work`; they may override the
    driver callbacks (``prepare``/``commit``/``abort``/``clean``, ``on_*``).  A job is
    inert until :meth:`JobManager.add` registers it (that emits ``created``).
    """

    #: qapi ``JobType`` value (``backup``, ``create``, ...).
    job_type: ClassVar[str] = ""
    #: Whether the type has a ``complete`` callback (mirror/commit do, backup does not).
    supports_complete: ClassVar[bool] = False

    def __init__(self, job_id: str, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        self.id = job_id
        self.status = JobStatus.UNDEFINED
        # A created job counts as paused until job_start drops this first pause.
        self.pause_count = 1
        self.user_paused = False
        self.paused = True
        self.busy = False
        self.speed = 0
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.progress_current = 0
        self.progress_total = 0
        self.ret = 0
        self.error: str | None = None
        self.cancelled = False
        self.force_cancel = False
        self.txn: JobTxn | None = None
        self.started = False
        self.deferred_to_main_loop = False
        #: Monotonic time (model clock) at which the sleeping job wants its next step.
        self.wake_at: float | None = None
        self._co = _Co.UNSTARTED
        self._paused_from: JobStatus | None = None
        self._pause_at: int | None = None
        self._pause_at_hold = False
        self._manager: JobManager | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self.status.value} co={self._co.value}>"

    # ----- identity and plumbing -------------------------------------------------------
    @property
    def type(self) -> str:
        return self.job_type

    @property
    def co_state(self) -> str:
        """Where the coroutine is (``sleeping``, ``paused``, ``held``, ...), for tests."""
        return self._co.value

    @property
    def manager(self) -> JobManager:
        if self._manager is None:
            raise JobStateError(f"job {self.id!r} is not registered with a JobManager")
        return self._manager

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self.manager.bus.emit(name, data)

    def _now(self) -> float:
        return self.manager.clock.monotonic()

    def _txn(self) -> JobTxn:
        if self.txn is None:
            raise JobStateError(f"job {self.id!r} has no transaction")
        return self.txn

    # ----- driver callbacks (override in job types) ---------------------------------------
    def work(self, limit: int | None) -> WorkResult:
        """Do one chunk of the job's run; ``limit`` caps the progress it may make now."""
        raise NotImplementedError

    def cancelled_step(self) -> WorkResult:
        """The step of a force-cancelled job: by default its run returns at once."""
        return Finished()

    def on_cancel(self, force: bool) -> bool:
        """driver->cancel: returns the effective force (no callback means forced)."""
        return True

    def on_pause(self) -> None:
        """driver->pause, at a pause point before parking."""

    def on_resume(self) -> None:
        """driver->resume, when leaving a pause point."""

    def on_user_resume(self) -> None:
        """driver->user_resume, on job-resume and when a cancel lifts a user pause."""

    def on_set_speed(self, speed: int) -> None:
        """driver->set_speed."""

    def do_complete(self) -> None:
        """driver->complete (only reached when :attr:`supports_complete`)."""

    def prepare(self) -> int:
        """driver->prepare: 0 or ``-errno`` (set ``self.error`` for a custom text)."""
        return 0

    def commit(self) -> None:
        """driver->commit: the job and its whole transaction succeeded."""

    def abort(self) -> None:
        """driver->abort: the job failed or was cancelled (or its transaction was)."""

    def clean(self) -> None:
        """driver->clean: after commit or abort."""

    # event hooks: generic jobs have none; BlockJob sends BLOCK_JOB_*
    def _event_pending(self) -> None:
        return None

    def _event_ready(self) -> None:
        return None

    def _event_completed(self) -> None:
        return None

    def _event_cancelled(self) -> None:
        return None

    # ----- state machine -------------------------------------------------------------
    def _transition(self, new: JobStatus) -> None:
        old = self.status
        if new not in TRANSITIONS[old]:
            raise JobStateError(
                f"job {self.id!r}: transition {old.value} -> {new.value} is not allowed")
        self.status = new
        if new != old:
            self._emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})

    def check_verb(self, verb: JobVerb) -> None:
        """job_apply_verb: refuse a verb the current state does not accept."""
        if self.status not in VERBS[verb]:
            raise SimError(f"Job '{self.id}' in state '{self.status.value}' "
                           f"cannot accept command verb '{verb.value}'")

    def is_completed(self) -> bool:
        return self.status in _COMPLETED_STATES

    def is_ready(self) -> bool:
        return self.status in (JobStatus.READY, JobStatus.STANDBY)

    def _should_pause(self) -> bool:
        return self.pause_count > 0

    # ----- progress ------------------------------------------------------------------
    def progress_update(self, done: int) -> None:
        self.progress_current += done

    def progress_set_remaining(self, remaining: int) -> None:
        self.progress_total = self.progress_current + remaining

    def progress_increase_remaining(self, delta: int) -> None:
        self.progress_total += delta

    # ----- start, pause points, sleeping ---------------------------------------------------
    def start(self, *, spurious_pause: bool = False) -> None:
        """job_start.  ``spurious_pause`` wraps it in a drain the way a QMP-started job is
        (blockdev-backup, transaction): ``running``, ``paused``, ``running``."""
        if self.started or self.status != JobStatus.CREATED:
            raise JobStateError(f"job {self.id!r} cannot start in state {self.status.value}")
        if spurious_pause:
            self.internal_pause()
        self.started = True
        self.pause_count -= 1
        self.busy = True
        self.paused = False
        self._co = _Co.RUNNING
        self._transition(JobStatus.RUNNING)
        # The coroutine's entry is a pause point before the job proper.
        if not self._pause_point():
            self._sleep(0.0)
        if spurious_pause:
            self.internal_resume()

    def _pause_point(self) -> bool:
        """job_pause_point: park the coroutine if a pause is pending; True if it parked."""
        if not self._should_pause() or self.force_cancel:
            return False
        self.on_pause()
        if not self._should_pause() or self.force_cancel:
            self.on_resume()
            return False
        saved = self.status
        self._transition(JobStatus.STANDBY if saved == JobStatus.READY else JobStatus.PAUSED)
        self._paused_from = saved
        self.paused = True
        self.busy = False
        self.wake_at = None
        self._co = _Co.PAUSED
        return True

    def _leave_pause_point(self) -> None:
        if self._co != _Co.PAUSED or self._paused_from is None:
            raise JobStateError(f"job {self.id!r} is not parked in a pause point")
        status, self._paused_from = self._paused_from, None
        self.paused = False
        self.busy = True
        self._co = _Co.RUNNING
        self._transition(status)
        self.on_resume()

    def _sleep(self, seconds: float) -> None:
        """Arm the job's timer (also used as "run again as soon as possible")."""
        self._co = _Co.SLEEPING
        self.busy = False
        self.wake_at = self._now() + max(0.0, seconds)
        self.manager._notify()

    @property
    def runnable(self) -> bool:
        """Sleeping with a timer armed: :meth:`step` may be called (once it is due)."""
        return self._co == _Co.SLEEPING

    def step(self, budget: int | None = None, *, exit: bool = True) -> float | None:
        """The job's timer fires: run it up to its next yield (at most one chunk of work).

        ``budget`` caps the progress this step may make (passed on to :meth:`work`).
        Returns the seconds until it wants to run again, or ``None`` when it now waits for
        something else (a resume, a kick, :meth:`release`, or it finished).  With
        ``exit=False`` a finished run stops before job_exit (call :meth:`exit`), which
        opens the window QEMU has between a job's last request and its completion.
        """
        if self._co != _Co.SLEEPING:
            raise JobStateError(f"job {self.id!r} is not runnable (coroutine {self._co.value})")
        return self._co_run(budget, exit=exit)

    def _co_run(self, budget: int | None = None, *, exit: bool = True) -> float | None:
        """The coroutine gets control where it yielded and runs to its next yield."""
        if self._co == _Co.PAUSED:
            self._leave_pause_point()
        else:
            # woken from a sleep or a yield: both end in a pause point
            self.wake_at = None
            self.busy = True
            self._co = _Co.RUNNING
            if self._pause_point():
                return None
        return self._work_once(budget, exit=exit)

    def _work_once(self, budget: int | None, *, exit: bool) -> float | None:
        self._co = _Co.RUNNING
        self.busy = True
        result: WorkResult
        limit = budget
        if self._pause_at is not None:
            left = max(0, self._pause_at - self.progress_current)
            limit = left if limit is None else min(limit, left)
        if self.force_cancel:
            result = self.cancelled_step()
        elif limit == 0 and self._pause_at is not None:
            result = 0.0  # the offset is already reached: stop before doing any work
        else:
            result = self.work(limit)
        if isinstance(result, Finished):
            self.ret = result.ret
            if result.error is not None:
                self.error = result.error
            self.deferred_to_main_loop = True
            self._co = _Co.EXIT_PENDING
            self.wake_at = None
            if exit:
                self.exit()
            return None
        if (not self.force_cancel and self._pause_at is not None
                and self.progress_current >= self._pause_at):
            self._reach_pause_at()
            if self._co == _Co.HELD:
                return None
        return self._yield(result)

    def _yield(self, result: float | None) -> float | None:
        """job_sleep_ns / job_yield after a chunk: sleep, wait, or park if asked to pause."""
        if self.force_cancel:
            # both return at once for a cancelled job, which then finishes its run; a
            # delay here comes from cancelled_step: requests still in flight
            delay = result or 0.0
            self._sleep(delay)
            return delay
        if self._pause_point():
            return None
        if result is None:
            self._co = _Co.WAITING
            self.busy = False
            self.wake_at = None
            return None
        self._sleep(result)
        return result

    def exit(self) -> None:
        """job_exit: complete a job whose run has returned."""
        if self._co != _Co.EXIT_PENDING:
            raise JobStateError(f"job {self.id!r} has no pending exit ({self._co.value})")
        self._co = _Co.EXITED
        self.busy = False
        self._completed()

    def kick(self) -> None:
        """job_enter for drivers: wake a sleeping or waiting job now (no-op otherwise)."""
        if self._co in (_Co.SLEEPING, _Co.WAITING):
            self._sleep(0.0)

    # ----- test hooks: stopping at an offset -------------------------------------------
    def pause_at(self, offset: int, *, hold: bool = False) -> None:
        """Stop when progress reaches ``offset`` (race reproduction).

        Default: pause as if by job-pause (``paused`` event; job-resume continues).
        ``hold=True``: stop silently as if a request never completed: the job stays
        ``running`` and ``busy``; pause/cancel requests take effect after :meth:`release`.
        """
        self._pause_at = offset
        self._pause_at_hold = hold

    def _reach_pause_at(self) -> None:
        hold, self._pause_at = self._pause_at_hold, None
        if hold:
            self._co = _Co.HELD
            self.busy = True
            self.wake_at = None
        elif not self.user_paused:
            self.user_paused = True
            self.pause_count += 1

    def release(self) -> None:
        """End a hold: the stuck request completes and the job runs on."""
        if self._co != _Co.HELD:
            raise JobStateError(f"job {self.id!r} is not held")
        self._sleep(0.0)

    # ----- pause / resume ----------------------------------------------------------------
    def internal_pause(self) -> None:
        """job_pause (drains, error stops): a sleeping job parks at once."""
        self.pause_count += 1
        if not self.paused and self.started and not self.deferred_to_main_loop \
                and not self.busy and self._co in (_Co.SLEEPING, _Co.WAITING):
            self.wake_at = None
            self.busy = True
            self._co = _Co.RUNNING
            if not self._pause_point():
                self._sleep(0.0)

    def internal_resume(self) -> None:
        """job_resume: the last resume lets a parked job run again."""
        if self.pause_count <= 0:
            raise JobStateError(f"job {self.id!r}: resume without a pause")
        self.pause_count -= 1
        if self.pause_count or not self.started or self.deferred_to_main_loop or self.busy:
            return
        # kick only if no timer is pending
        if self._co == _Co.PAUSED:
            self._leave_pause_point()
            self._sleep(0.0)
        elif self._co == _Co.WAITING:
            self._sleep(0.0)

    def pause(self) -> None:
        """job-pause / block-job-pause (verb check first, then the user-pause check)."""
        self.check_verb(JobVerb.PAUSE)
        if self.user_paused:
            raise SimError("Job is already paused")
        self.user_paused = True
        delay = self.pause_delay()
        if delay > 0 and self._co == _Co.SLEEPING:
            # the driver's pause waits for the job's requests in flight: the job parks at
            # its pause point once they are done, after the reply
            self.pause_count += 1
            self._sleep(delay)
            return
        self.internal_pause()

    def pause_delay(self) -> float:
        """Seconds a user pause takes to reach the job (driver->pause waiting for
        requests in flight); drains wait for those themselves, so they park at once."""
        return 0.0

    def resume(self) -> None:
        """job-resume / block-job-resume (user-pause check *before* the verb check)."""
        if not self.user_paused or self.pause_count <= 0:
            raise SimError("Can't resume a job that was not paused")
        self.check_verb(JobVerb.RESUME)
        self.on_user_resume()
        self.user_paused = False
        self.internal_resume()

    # ----- other verbs -------------------------------------------------------------------
    def set_speed(self, speed: int) -> None:
        """block-job-set-speed: a faster limit cuts the current sleep short."""
        self.check_verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise SimError("Parameter 'speed' expects a non-negative value")
        old = self.speed
        self.speed = speed
        self.on_set_speed(speed)
        if speed and speed <= old:
            return
        # kick only if a timer is pending
        if self._co == _Co.SLEEPING:
            self._sleep(0.0)

    def complete(self) -> None:
        """job-complete / block-job-complete."""
        self.check_verb(JobVerb.COMPLETE)
        if self.cancelled or not self.supports_complete:
            raise SimError(f"The active block job '{self.id}' cannot be completed")
        self.do_complete()

    def finalize(self) -> None:
        """job-finalize: finalises the job's whole transaction."""
        self.check_verb(JobVerb.FINALIZE)
        self._txn()._do_finalize(self)

    def dismiss(self) -> None:
        """job-dismiss: a concluded job leaves the lists and frees its id."""
        self.check_verb(JobVerb.DISMISS)
        self._do_dismiss()

    def transition_to_ready(self) -> None:
        """For job types with a ready phase (mirror): ``ready`` plus BLOCK_JOB_READY."""
        self._transition(JobStatus.READY)
        self._event_ready()

    # ----- cancel --------------------------------------------------------------------------
    def cancel(self, force: bool = True) -> None:
        """job_user_cancel (job-cancel always forces; block-job-cancel passes its flag)."""
        self.check_verb(JobVerb.CANCEL)
        self._cancel(force)

    def cancel_sync(self, force: bool = True) -> None:
        """job_cancel_sync: cancel and wait until the job has completed (transaction
        abort of a job created in prepare).  May raise :class:`QemuHang`."""
        self._cancel(force)
        self._finish_sync()

    def _cancel(self, force: bool) -> None:
        if self.status == JobStatus.NULL:
            return  # already finished and dismissed (e.g. by its group's rollback)
        if self.status == JobStatus.CONCLUDED:
            self._do_dismiss()
            return
        self._cancel_async(force)
        if not self.started:
            self._completed()
        elif self.deferred_to_main_loop:
            # run already returned: only a forced cancel still changes the outcome
            if self.force_cancel:
                self._txn()._abort(self)
        elif self._co in (_Co.SLEEPING, _Co.WAITING, _Co.PAUSED):
            # job_enter: the job runs now, sees the cancel and finishes its run
            self._co_run()

    def _cancel_async(self, force: bool) -> None:
        force = self.on_cancel(force)
        if self.user_paused:
            self.on_user_resume()
            self.user_paused = False
            if self.pause_count <= 0:
                raise JobStateError(f"job {self.id!r}: user pause without pause count")
            self.pause_count -= 1
        if force or not self.deferred_to_main_loop:
            self.cancelled = True
            self.force_cancel |= force

    def _finish_sync(self) -> None:
        """job_finish_sync: drive the job until it has completed."""
        for _ in range(_FINISH_SYNC_LIMIT):
            if self.is_completed():
                return
            if not self.started:
                raise QemuHang(f"waiting for job '{self.id}', which was never started")
            if self._co == _Co.EXIT_PENDING:
                self.exit()
            elif self._co == _Co.HELD:
                self._sleep(0.0)  # the stuck request completes after all
            elif self._co in (_Co.SLEEPING, _Co.WAITING, _Co.PAUSED):
                self._co_run()
            else:
                raise JobStateError(f"job {self.id!r}: finish_sync from inside the job")
        raise JobStateError(f"job {self.id!r} did not finish")

    # ----- completion ------------------------------------------------------------------
    def _update_rc(self) -> int:
        """A cancelled job's result becomes -ECANCELED; any failure means ``aborting``."""
        if not self.ret and self.force_cancel:
            self.ret = -errno.ECANCELED
        if self.ret:
            if self.error is None:
                self.error = strerror(-self.ret)
            self._transition(JobStatus.ABORTING)
        return self.ret

    def _completed(self) -> None:
        """job_completed: the run is over; succeed or fail within the transaction."""
        if self.is_completed():
            raise JobStateError(f"job {self.id!r} completed twice")
        self._update_rc()
        if self.ret:
            self._txn()._abort(self)
        else:
            self._txn()._success(self)

    def _to_pending(self) -> None:
        self._transition(JobStatus.PENDING)
        if not self.auto_finalize:
            self._event_pending()

    def _prepare(self) -> int:
        if self.ret == 0:
            self.ret = self.prepare()
            self._update_rc()
        return self.ret

    def _finalize_single(self) -> None:
        """Commit or abort, clean, the BLOCK_JOB_* event, then ``concluded``."""
        if not self.is_completed():
            raise JobStateError(f"job {self.id!r} finalised before completing")
        self._update_rc()
        if self.ret == 0:
            self.commit()
        else:
            self.abort()
        self.clean()
        if self.started:  # a job that never ran sends no BLOCK_JOB_* event
            if self.force_cancel:
                self._event_cancelled()
            else:
                self._event_completed()
        self._txn()._remove(self)
        self._conclude()

    def _conclude(self) -> None:
        self._transition(JobStatus.CONCLUDED)
        if self.auto_dismiss or not self.started:
            self._do_dismiss()

    def _do_dismiss(self) -> None:
        self.busy = False
        self.paused = False
        self.deferred_to_main_loop = True
        self.wake_at = None
        if self.txn is not None:
            self.txn._remove(self)
        self._transition(JobStatus.NULL)
        self.manager._remove(self)

    # ----- query ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """A query-jobs entry (``JobInfo``, schema member order)."""
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "status": self.status.value,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self.error is not None:
            info["error"] = self.error
        return info


# --------------------------------------------------------------------------- BlockJob


class BlockJob(Job):
    """A job that is also a block job (blockjob.c): BLOCK_JOB_* events, io-status,
    error actions, and an entry in query-block-jobs.  Backup, mirror, commit, stream."""

    def __init__(self, job_id: str, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        super().__init__(job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        #: ``BlockDeviceIoStatus``: ok, failed, nospace.
        self.io_status = "ok"

    def _progress_data(self) -> dict[str, Any]:
        return {"type": self.type, "device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "speed": self.speed}

    def _event_pending(self) -> None:
        self._emit("BLOCK_JOB_PENDING", {"type": self.type, "id": self.id})

    def _event_ready(self) -> None:
        self._emit("BLOCK_JOB_READY", self._progress_data())

    def _event_completed(self) -> None:
        data = self._progress_data()
        if self.ret < 0:
            data["error"] = self.error if self.error is not None else strerror(-self.ret)
        self._emit("BLOCK_JOB_COMPLETED", data)

    def _event_cancelled(self) -> None:
        self._emit("BLOCK_JOB_CANCELLED", self._progress_data())

    def on_user_resume(self) -> None:
        self.io_status = "ok"

    def error_action(self, on_error: str, *, is_read: bool, err: int) -> str:
        """block_job_error_action: pick the action for an I/O error (``err`` a positive
        errno), send BLOCK_JOB_ERROR, and on ``stop`` pause the job as if by the user
        (it parks at its next pause point: call this from :meth:`work`)."""
        if on_error in ("enospc", "auto"):
            action = "stop" if err == errno.ENOSPC else "report"
        elif on_error in ("stop", "report", "ignore"):
            action = on_error
        else:
            raise ValueError(f"unknown on-error policy {on_error!r}")
        self._emit("BLOCK_JOB_ERROR", {"device": self.id,
                                       "operation": "read" if is_read else "write",
                                       "action": action})
        if action == "stop":
            if not self.user_paused:
                self.internal_pause()
                self.user_paused = True
            if self.io_status == "ok":
                self.io_status = "nospace" if err == errno.ENOSPC else "failed"
        return action

    def block_info(self) -> dict[str, Any]:
        """A query-block-jobs entry (``BlockJobInfo``, schema member order)."""
        info: dict[str, Any] = {
            "type": self.type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.pause_count > 0,
            "speed": self.speed,
            "io-status": self.io_status,
            "ready": self.is_ready(),
            "status": self.status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.ret:
            info["error"] = self.error if self.error is not None else strerror(-self.ret)
        return info


# --------------------------------------------------------------------------- JobTxn


class JobTxn:
    """Jobs that complete together (``completion-mode: grouped``; a lone job has its own).

    ``jobs`` is newest first, like QEMU's list: that is the order in which pending,
    finalisation and abort walk the group (observed: the job of the later action first).
    """

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False

    def _add(self, job: Job) -> None:
        if job.txn is not None:
            raise JobStateError(f"job {job.id!r} is already in a transaction")
        job.txn = self
        self.jobs.insert(0, job)

    def _remove(self, job: Job) -> None:
        if job.txn is self:
            self.jobs.remove(job)
            job.txn = None

    def _success(self, job: Job) -> None:
        """A job's run succeeded: wait for the others, then pending and finalize."""
        job._transition(JobStatus.WAITING)
        for other in self.jobs:
            if not other.is_completed():
                return
            if other.ret:
                raise JobStateError(f"job {other.id!r} failed inside a succeeding group")
        for other in list(self.jobs):
            other._to_pending()
        if all(other.auto_finalize for other in self.jobs):
            self._do_finalize(job)

    def _do_finalize(self, job: Job) -> None:
        """Prepare every job; if all succeed finalise each in turn, else abort them all."""
        rc = 0
        for other in list(self.jobs):
            rc = other._prepare()
            if rc:
                break
        if rc:
            self._abort(job)
        else:
            for other in list(self.jobs):
                other._finalize_single()

    def _abort(self, job: Job) -> None:
        """One job failed or was cancelled: force-cancel the others, then finalise each."""
        if self.aborting:
            return  # the job that started the abort handles everything
        self.aborting = True
        for other in list(self.jobs):
            if other is not job:
                other._cancel_async(True)
        hang: QemuHang | None = None
        while self.jobs:
            other = self.jobs[0]
            if not other.is_completed():
                if not other.cancelled:
                    raise JobStateError(f"job {other.id!r} left running in an aborted group")
                if other.started:
                    other._finish_sync()
                else:
                    # QEMU 7.2 waits forever for a job that never started; the model
                    # finishes the rollback and reports the hang to its caller afterwards
                    hang = hang or QemuHang(f"waiting for job '{other.id}', which was "
                                            "never started")
                    other._update_rc()
            other._finalize_single()
        if hang is not None:
            raise hang


# --------------------------------------------------------------------------- registry


class JobManager:
    """All jobs of one emulator (job.c's job list) and the QMP-level job commands."""

    def __init__(self, bus: EventBus, clock: Clock | None = None) -> None:
        self.bus = bus
        self.clock = clock if clock is not None else Clock()
        self._jobs: list[Job] = []  # newest first, the order query-jobs reports
        #: Called whenever a job's timer is (re)armed, so a scheduler can re-plan.
        self.on_wakeup: Callable[[], None] | None = None

    def _notify(self) -> None:
        if self.on_wakeup is not None:
            self.on_wakeup()

    # ----- registration ------------------------------------------------------------------
    def check_new_id(self, job_id: str) -> None:
        """job_create's id rules (a concluded job keeps its id until dismissed)."""
        if not id_wellformed(job_id):
            raise SimError(f"Invalid job ID '{job_id}'")
        if self.get(job_id) is not None:
            raise SimError(f"Job ID '{job_id}' already in use")

    def add(self, job: Job, txn: JobTxn | None = None) -> Job:
        """job_create: check the id, register the job (``created``), join ``txn`` (or a
        transaction of its own)."""
        if job._manager is not None or job.status != JobStatus.UNDEFINED:
            raise JobStateError(f"job {job.id!r} is already registered")
        self.check_new_id(job.id)
        job._manager = self
        job._transition(JobStatus.CREATED)
        self._jobs.insert(0, job)
        (txn if txn is not None else JobTxn())._add(job)
        return job

    def _remove(self, job: Job) -> None:
        if job in self._jobs:
            self._jobs.remove(job)

    def start_jobs(self, jobs: Iterable[Job], *, spurious_pause: bool = True) -> None:
        """Start the jobs of one QMP command the way QEMU 7.2 shows it: every job goes
        ``running``, ``paused`` in order, then every job ``running`` again (the drain
        around the transaction).  Without ``spurious_pause``: plain job_start."""
        todo = list(jobs)
        for job in todo:
            if spurious_pause:
                job.internal_pause()
            job.start()
        if spurious_pause:
            for job in todo:
                job.internal_resume()

    # ----- lookups -------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        """Every job not yet dismissed, newest first."""
        return list(self._jobs)

    def get(self, job_id: str) -> Job | None:
        for job in self._jobs:
            if job.id == job_id:
                return job
        return None

    def find_job(self, job_id: str) -> Job:
        """The lookup of ``job-*`` commands."""
        job = self.get(job_id)
        if job is None:
            raise SimError("Job not found")
        return job

    def find_block_job(self, job_id: str) -> BlockJob:
        """The lookup of ``block-job-*`` commands (other job types are not block jobs)."""
        job = self.get(job_id)
        if not isinstance(job, BlockJob):
            raise SimError(f"Block job '{job_id}' not found", "DeviceNotActive")
        return job

    # ----- job-* commands ----------------------------------------------------------------
    def job_pause(self, job_id: str) -> None:
        self.find_job(job_id).pause()

    def job_resume(self, job_id: str) -> None:
        self.find_job(job_id).resume()

    def job_cancel(self, job_id: str) -> None:
        self.find_job(job_id).cancel(True)

    def job_complete(self, job_id: str) -> None:
        self.find_job(job_id).complete()

    def job_finalize(self, job_id: str) -> None:
        self.find_job(job_id).finalize()

    def job_dismiss(self, job_id: str) -> None:
        self.find_job(job_id).dismiss()

    # ----- block-job-* commands ------------------------------------------------------------
    def block_job_pause(self, device: str) -> None:
        self.find_block_job(device).pause()

    def block_job_resume(self, device: str) -> None:
        self.find_block_job(device).resume()

    def block_job_cancel(self, device: str, force: bool = False) -> None:
        job = self.find_block_job(device)
        if job.user_paused and not force:
            raise SimError(f"The block job for device '{device}' is currently paused")
        job.cancel(force)

    def block_job_complete(self, device: str) -> None:
        self.find_block_job(device).complete()

    def block_job_finalize(self, job_id: str) -> None:
        self.find_block_job(job_id).finalize()

    def block_job_dismiss(self, job_id: str) -> None:
        self.find_block_job(job_id).dismiss()

    def block_job_set_speed(self, device: str, speed: int) -> None:
        self.find_block_job(device).set_speed(speed)

    # ----- queries -------------------------------------------------------------------------
    def query_jobs(self) -> list[dict[str, Any]]:
        return [job.info() for job in self._jobs]

    def query_block_jobs(self) -> list[dict[str, Any]]:
        return [job.block_info() for job in self._jobs if isinstance(job, BlockJob)]


# --------------------------------------------------------------------------- driving


class JobRunner:
    """Runs due job steps on the manager's clock, deterministically.

    ``run_due`` works on any clock (the emulator calls it from its loop whenever
    ``next_wakeup`` passes); ``advance`` and ``run_until_idle`` move a
    :class:`VirtualClock` from deadline to deadline, so a throttled job runs instantly.
    Due jobs run oldest first; a job that asks for no sleep runs again in the same call.

    On an event loop: point ``manager.on_wakeup`` at an event's ``set``, and loop
    "``run_due()``; wait for the event, at most until ``next_wakeup()``".  Calling
    ``run_due()`` after each command, before its reply, gives QEMU's ordering for fast
    jobs (an unthrottled null-co backup completes before blockdev-backup's reply).
    """

    def __init__(self, manager: JobManager, max_steps: int = 1_000_000) -> None:
        self.manager = manager
        self.max_steps = max_steps

    def _runnable(self) -> list[Job]:
        return [j for j in reversed(self.manager.jobs()) if j.runnable]

    def next_wakeup(self) -> float | None:
        """The earliest deadline of any sleeping job (monotonic), or None if none sleeps."""
        times = [j.wake_at for j in self._runnable() if j.wake_at is not None]
        return min(times) if times else None

    def run_due(self) -> int:
        """Step every job whose deadline has passed, until none is due; returns the count."""
        steps = 0
        while True:
            now = self.manager.clock.monotonic()
            due = [j for j in self._runnable() if j.wake_at is not None and j.wake_at <= now]
            if not due:
                return steps
            for job in due:
                if job.runnable and job.wake_at is not None and job.wake_at <= now:
                    job.step()
                    steps += 1
            if steps > self.max_steps:
                raise RuntimeError("jobs keep running without time passing")

    def _virtual(self) -> VirtualClock:
        clock = self.manager.clock
        if not isinstance(clock, VirtualClock):
            raise TypeError("advancing time needs a VirtualClock")
        return clock

    def advance(self, seconds: float) -> int:
        """Let ``seconds`` of virtual time pass, running each step at its deadline."""
        clock = self._virtual()
        end = clock.monotonic() + seconds
        steps = self.run_due()
        while (t := self.next_wakeup()) is not None and t <= end:
            if t > clock.monotonic():
                clock.advance(t - clock.monotonic())
            steps += self.run_due()
        if end > clock.monotonic():
            clock.advance(end - clock.monotonic())
        return steps + self.run_due()

    def run_until_idle(self, max_seconds: float = 1e7) -> int:
        """Advance virtual time until no job sleeps (all finished, paused or waiting)."""
        clock = self._virtual()
        limit = clock.monotonic() + max_seconds
        steps = self.run_due()
        while (t := self.next_wakeup()) is not None:
            if t > limit:
                raise RuntimeError("jobs still running after max_seconds of virtual time")
            if t > clock.monotonic():
                clock.advance(t - clock.monotonic())
            steps += self.run_due()
        return steps


class RateLimit:
    """QEMU's slice throttle (util ratelimit): ``speed`` bytes per second, accounted in
    slices (100 ms for block jobs); a request that overdraws a slice delays the next."""

    def __init__(self, clock: Clock, slice_seconds: float = 0.1) -> None:
        self.clock = clock
        self.slice = slice_seconds
        self.quota = 0.0
        self._start = 0.0
        self._end = float("-inf")
        self._dispatched = 0.0

    def set_speed(self, speed: int) -> None:
        self.quota = max(speed * self.slice, 1.0) if speed else 0.0

    def delay(self, n: int) -> float:
        """Account ``n`` bytes just dispatched; seconds to wait before the next request."""
        if not self.quota:
            return 0.0
        now = self.clock.monotonic()
        if self._end < now:
            self._start, self._end, self._dispatched = now, now + self.slice, 0.0
        self._dispatched += n
        if self._dispatched < self.quota:
            return 0.0
        self._end = self._start + (self._dispatched / self.quota) * self.slice
        return self._end - now
