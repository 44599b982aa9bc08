"""``blockdev-create``: check the driver, then start a create job (virtsim.sim.create_job)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...sim.create_job import CreateJob, check_create_driver
from . import command

if TYPE_CHECKING:
    from ..emulator import Emulator


def _after_reply(emu: Emulator) -> Callable[[Callable[[], None]], None] | None:
    """Run a callback on the loop's next turn, i.e. after the reply has been written: that
    is when QEMU's thread pool hands the create's first I/O back to the job.  The job then
    runs at once, before any later command is read, as QEMU's completion handler does."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None

    def defer(cb: Callable[[], None]) -> None:
        def complete() -> None:
            cb()
            emu.run_jobs()

        loop.call_soon(complete)

    return defer


@command("blockdev-create")
def blockdev_create(emu: Emulator, a: dict[str, Any]) -> Any:
    options = a["options"]
    check_create_driver(str(options["driver"]))
    job = CreateJob(a["job-id"], emu.graph, options)
    job.defer = _after_reply(emu)
    emu.jobs.add(job)
    job.start()
    return {}
