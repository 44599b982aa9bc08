"""An emulator on a virtual clock: throttled jobs finish at once, with QEMU's numbers."""

from __future__ import annotations

import time

from qemu.qmp import EventListener, QMPClient

from virtsim.qmp.emulator import embedded
from virtsim.sim.clock import VirtualClock


async def test_throttled_backup_finishes_in_virtual_time() -> None:
    clock = VirtualClock()
    async with embedded(clock=clock) as emu:
        qmp = QMPClient("vclock")
        await qmp.connect(emu.qmp_address)
        try:
            for name in ("src", "tgt"):
                await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": name,
                                                   "size": 64 << 20})
            done = EventListener(("BLOCK_JOB_COMPLETED",))
            t0 = time.monotonic()
            with qmp.listen(done):
                await qmp.execute("blockdev-backup", {"job-id": "j", "device": "src",
                                                      "target": "tgt", "sync": "full",
                                                      "speed": 1 << 20})
                ev = await done.get()
            assert ev["data"]["offset"] == ev["data"]["len"] == 64 << 20
            # 64 MiB at 1 MiB/s is about a minute of model time, a blink of real time
            assert clock.monotonic() >= 60
            assert time.monotonic() - t0 < 20
            # and the event timestamps follow the virtual clock too
            assert ev["timestamp"]["seconds"] >= 1_700_000_060
        finally:
            await qmp.disconnect()
