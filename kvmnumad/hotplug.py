"""CPU and memory hotplug through udev, read from the asyncio loop.

pyudev has no asyncio observer (its issue 450), so this does what its GLib
observer does: the loop watches the monitor's fd and drains it with
``poll(timeout=0)``.  No thread, no timer: an idle daemon wakes only when the
kernel has something to say.  The monitor is started before anyone reads the
topology, so a CPU that changes state in between is not missed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import pyudev

from kvmnumad import errors

log = logging.getLogger(__name__)

SUBSYSTEMS = ("cpu", "memory", "node")
# Re-runs of a re-pin that met a CPU going offline under it, before that counts as a failure.
RACE_RETRIES = 3
_INTERESTING = {"online", "offline", "add", "remove", "change"}


def udevd_running() -> bool:
    """udevd leaves its control socket under /run/udev; without it only the
    kernel's own uevents exist (source 'kernel')."""
    return os.path.exists("/run/udev/control")


class HotplugMonitor:
    """Calls ``on_change(reason)`` once per burst of relevant uevents.

    A burst (e.g. offlining a CPU emits offline + change events) is coalesced
    within one drain of the socket; the callback then re-reads sysfs, so the
    exact event list does not matter, only that something changed.
    """

    def __init__(self, on_change: Callable[[str], None], *, source: str | None = None) -> None:
        self.source = source or ("udev" if udevd_running() else "kernel")
        self._context = pyudev.Context()
        self._monitor = pyudev.Monitor.from_netlink(self._context, source=self.source)
        for subsystem in SUBSYSTEMS:
            self._monitor.filter_by(subsystem)
        self._on_change = on_change
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._monitor.start()
        self._loop.add_reader(self._monitor.fileno(), self._drain)
        log.info("watching %s hotplug through %s uevents", "/".join(SUBSYSTEMS), self.source)

    def _drain(self) -> None:
        reasons: list[str] = []
        while True:
            device = self._monitor.poll(timeout=0)
            if device is None:
                break
            action = device.action or "change"
            if action in _INTERESTING:
                reasons.append(f"{device.subsystem}:{device.sys_name}:{action}")
        if reasons:
            reason = _summarize(reasons)
            try:
                self._on_change(reason)
            except Exception:
                log.exception("hotplug handler failed for %s", reason)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
            self._loop = None


def _summarize(reasons: list[str]) -> str:
    """'cpu3 offline' style text for signals and logs; the last state wins."""
    last: dict[str, str] = {}
    for r in reasons:
        _subsystem, name, action = r.split(":", 2)
        if action in ("online", "offline") or name not in last:
            last[name] = action
    return ", ".join(f"{name} {action}" for name, action in last.items())


class RepinQueue:
    """Runs ``handler(reason)`` off the loop, one call at a time.

    A re-pin reads the topology and moves threads; two running at once could
    act on different topology reads and leave the older one's moves last.
    So bursts that arrive while one runs are coalesced into exactly one more
    run, which reads the newest topology.  A failure is logged, never lost
    with a dropped future.
    """

    def __init__(self, handler: Callable[[str], object]) -> None:
        self._handler = handler
        self._pending: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def request(self, reason: str) -> None:
        """Called on the loop (the monitor's reader)."""
        self._pending.append(reason)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        raced = 0
        while self._pending:
            reason = ", ".join(dict.fromkeys(self._pending))
            self._pending.clear()
            try:
                await asyncio.to_thread(self._handler, reason)
                raced = 0
            except errors.CpuOffline as e:
                # The topology moved between the re-pin's read and its write (the
                # hotplug storm: a second CPU going offline in the same burst, its
                # uevent not yet read).  Not a failure: read the topology again.
                raced += 1
                if raced > RACE_RETRIES:
                    log.error("re-pinning after %s kept meeting CPUs going offline: %s", reason, e)
                    raced = 0
                else:
                    log.info("re-pinning after %s raced CPU hotplug (%s); re-reading the topology", reason, e)
                    self._pending.append(reason)
            except Exception:
                log.exception("re-pinning after %s failed", reason)

    async def drain(self) -> None:
        """Wait for the runs requested so far (shutdown, tests)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
