"""A re-pin that meets a CPU going offline under it (found by the hotplug storm).

On the 2node guest, 200 storm cycles left every vCPU placed right, but the
journal showed ``re-pinning after cpu2 offline failed ... CpuOffline:
sched_setaffinity(424, 2-3): Invalid argument``: the re-pin read the topology,
a second CPU went offline, and the write was refused.  The CPU going offline
between a read and a write cannot be timed for real on the one-node host (and
is a race in the guest), so the handler here raises the daemon's own error.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from kvmnumad import errors
from kvmnumad.hotplug import RACE_RETRIES, RepinQueue


def test_a_repin_that_races_hotplug_reads_the_topology_again(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def handler(reason: str) -> None:
        calls.append(reason)
        if len(calls) == 1:
            raise errors.CpuOffline("sched_setaffinity(424, 2-3): Invalid argument")

    async def main() -> None:
        queue = RepinQueue(handler)
        queue.request("cpu2 offline")
        await queue.drain()

    with caplog.at_level(logging.INFO, logger="kvmnumad.hotplug"):
        asyncio.run(main())
    assert calls == ["cpu2 offline", "cpu2 offline"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_repin_that_always_races_is_an_error_not_a_loop(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def handler(reason: str) -> None:
        calls.append(reason)
        raise errors.CpuOffline("sched_setaffinity(424, 3): Invalid argument")

    async def main() -> None:
        queue = RepinQueue(handler)
        queue.request("cpu3 offline")
        await queue.drain()

    with caplog.at_level(logging.INFO, logger="kvmnumad.hotplug"):
        asyncio.run(main())
    assert len(calls) == RACE_RETRIES + 1
    assert [r.levelno for r in caplog.records if r.levelno >= logging.ERROR] == [logging.ERROR]
