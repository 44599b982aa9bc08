"""job-* and block-job-* commands and the job queries: thin calls into the job manager."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator


@command("query-jobs")
def query_jobs(emu: Emulator, a: dict[str, Any]) -> Any:
    return emu.jobs.query_jobs()


@command("query-block-jobs")
def query_block_jobs(emu: Emulator, a: dict[str, Any]) -> Any:
    return emu.jobs.query_block_jobs()


def _job_verb(verb: str) -> None:
    def handler(emu: Emulator, a: dict[str, Any]) -> Any:
        getattr(emu.jobs, f"job_{verb}")(a["id"])
        return {}

    command(f"job-{verb}")(handler)


for _verb in ("pause", "resume", "cancel", "complete", "finalize", "dismiss"):
    _job_verb(_verb)


@command("block-job-pause")
def block_job_pause(emu: Emulator, a: dict[str, Any]) -> Any:
    emu.jobs.block_job_pause(a["device"])
    return {}


@command("block-job-resume")
def block_job_resume(emu: Emulator, a: dict[str, Any]) -> Any:
    emu.jobs.block_job_resume(a["device"])
    return {}


@command("block-job-cancel")
def block_job_cancel(emu: Emulator, a: dict[str, Any]) -> Any:
    emu.jobs.block_job_cancel(a["device"], bool(a.get("force", False)))
    return {}


@command("block-job-complete")
def block_job_complete(emu: Emulator, a: dict[str, Any]) -> Any:
    emu.jobs.block_job_complete(a["device"])
    return {}


@command("block-job-finalize")
def block_job_finalize(emu: Emulator, a: dict[str, Any]) -> Any:
    emu.jobs.block_job_finalize(a["id"])
    return {}


@command("block-job-dismiss")
def block_job_dismiss(emu: Emulator, a: dict[str, Any]) -> Any:
    emu.jobs.block_job_dismiss(a["id"])
    return {}


@command("block-job-set-speed")
def block_job_set_speed(emu: Emulator, a: dict[str, Any]) -> Any:
    emu.jobs.block_job_set_speed(a["device"], int(a["speed"]))
    return {}


@command("x-virtsim-job-pause-at")
def x_job_pause_at(emu: Emulator, a: dict[str, Any]) -> Any:
    """Arm a pause point: when job ``id`` (now, or once a job with that id is created)
    reaches ``offset`` bytes of progress it pauses (``hold``: it stays "running" as if one
    request never completed, until x-virtsim-job-release) — to place a race exactly."""
    emu.arm_pause_point(a["id"], int(a["offset"]), bool(a.get("hold", False)))
    return {}


@command("x-virtsim-job-release")
def x_job_release(emu: Emulator, a: dict[str, Any]) -> Any:
    from ...sim.errors import SimError
    from ...sim.job import JobStateError

    job = emu.jobs.find_job(a["id"])
    try:
        job.release()
    except JobStateError:
        raise SimError(f"Job '{a['id']}' is not held at a pause point") from None
    return {}
