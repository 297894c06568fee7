"""The sampling timer: one sample per period, off the event loop.

A loop.call_later timer, not a thread that sleeps and not a polling loop:
between samples nothing of the daemon runs for it.  The sample itself (reads
of /proc and /sys) runs in the loop's default executor (the bounded pool of
kvmnumad/workers.py, as the daemon's own work), and the subscribers (bus
properties, metrics) get it on the loop.  With no VM, ``take`` answers None
and the timer stops until ``wake()`` (a VM was added): an idle daemon pays
nothing for it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from kvmnumad.optimizer.model import Sample

if TYPE_CHECKING:  # only the types: the loop is given (and daemon.py reads DEFAULT_PERIOD before asyncio)
    import asyncio

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_PERIOD = 5.0  # seconds


class PeriodicTimer(Generic[T]):
    """``take`` once per period off the loop; None from it: asleep until wake().
    The sampling timer, and the balancing timer (rebalance.py) with ``trigger``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, take: Callable[[], T | None],
                 period: float = DEFAULT_PERIOD, *, from_start: bool = False) -> None:
        """``from_start``: a period runs from one run's start to the next (its
        own cost inside it: the balancer's periods stay periods where a pass is
        slow), else from one run's end to the next start (the sampler's: its
        publications stay at least a period apart)."""
        if not period > 0:
            raise ValueError(f"sampling period must be positive, got {period}")
        self._loop = loop
        self._take = take
        self.period = period
        self._subscribers: list[Callable[[T], None]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._woken = False
        self.latest: T | None = None
        self._from_start = from_start
        self._started = 0.0
        self.samples = 0

    def subscribe(self, callback: Callable[[T], None]) -> None:
        """``callback(sample)`` on the loop after each sample."""
        self._subscribers.append(callback)

    def start(self) -> None:
        self._schedule(0.0)

    def wake(self) -> None:
        """From any thread: sample soon if the timer sleeps for want of a VM."""
        with contextlib.suppress(RuntimeError):  # loop closed: the daemon is stopping
            self._loop.call_soon_threadsafe(self._wake)

    def trigger(self) -> None:
        """From any thread: run soon, also when the next run is only scheduled
        (an event asks for a pass now); triggers before it starts are one run."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._trigger)

    def _trigger(self) -> None:
        self._woken = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is None and not self._closed:
            self._schedule(0.0)

    def _wake(self) -> None:
        self._woken = True  # a sample under way that found no VM must not put the timer to sleep
        if self._handle is None and self._task is None and not self._closed:
            self._schedule(0.0)

    def _schedule(self, delay: float) -> None:
        if not self._closed:
            self._handle = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._task = self._loop.create_task(self._run())

    def _next(self) -> float:
        if not self._from_start:
            return self.period
        return max(0.0, self.period - (self._loop.time() - self._started))

    async def _run(self) -> None:
        self._woken = False
        self._started = self._loop.time()
        try:
            sample = await self._loop.run_in_executor(None, self._take)
        except Exception:
            log.exception("sampling failed; trying again next period")
            sample = None
            self._schedule(self._next())
            self._task = None
            return
        self._task = None
        if sample is None:
            if self._woken:
                self._schedule(0.0)
            return  # no VM: asleep until wake()
        self.latest = sample
        self.samples += 1
        for cb in list(self._subscribers):
            try:
                cb(sample)
            except Exception:
                log.exception("a sample subscriber failed")
        self._schedule(self._next())

    def close(self) -> None:
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None:
            self._task.cancel()
            self._task = None


SamplingTimer = PeriodicTimer[Sample]
