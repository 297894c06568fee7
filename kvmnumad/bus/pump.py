"""Core events onto the bus, one at a time and in order, with a barrier for replies.

The core calls ``submit`` on whatever thread made the change, before the
core call returns.  ``submit`` only schedules a put on the loop
(call_soon_threadsafe), and the loop runs callbacks in the order they were
scheduled: by the time ``await asyncio.to_thread(core_call)`` resumes, the
call's events are in the queue.  A barrier queued then is reached after
them, so a method's reply, sent once its barrier is reached, comes after the
PropertiesChanged its change caused -- without the method reading anything.

A failure to publish an event is logged at error level where it happens and
handed to every ``settled`` block about the same object path, so that the
caller whose change it was hears of it (typed Internal), instead of reading
stale properties after a success.  A VM destroyed meanwhile is no failure:
its removal is on its way through the same queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from kvmnumad.errors import Internal, NoSuchVM
from kvmnumad.events import Event

log = logging.getLogger(__name__)


class _Watch:
    def __init__(self, path: str) -> None:
        self.path = path
        self.failures: list[BaseException] = []


class EventPump:
    """``handle(event)`` publishes one event; ``path_of(event)`` names the object it is about."""

    def __init__(self, handle: Callable[[Event], Awaitable[None]], path_of: Callable[[Event], str]) -> None:
        self._handle = handle
        self._path_of = path_of
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event | asyncio.Future[None]] = asyncio.Queue()
        self._watches: set[_Watch] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = self._loop.create_task(self._run())

    def close(self) -> None:
        """Stop; nobody waits on a barrier that will never be reached."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, asyncio.Future) and not item.done():
                item.set_result(None)

    def submit(self, event: Event) -> None:
        """From any thread, the core's: hand over to the loop, nothing more."""
        if self._closed:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the service is gone
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def barrier(self) -> None:
        """Return once everything queued before this call has been handled."""
        if self._closed or self._task is None or self._task.done():
            return
        reached = self._loop.create_future()
        self._queue.put_nowait(reached)
        await reached

    @contextlib.asynccontextmanager
    async def settled(self, path: str) -> AsyncIterator[None]:
        watch = _Watch(path)
        self._watches.add(watch)
        try:
            yield
        finally:
            try:
                await self.barrier()
            finally:
                self._watches.discard(watch)
        if watch.failures:
            raise Internal(f"the change was made, but publishing it on {path} failed") from watch.failures[0]

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, asyncio.Future):
                if not item.done():
                    item.set_result(None)
                continue
            try:
                await self._handle(item)
            except NoSuchVM as e:
                log.debug("not published, the VM is going away: %s (%s)", item, e)
            except Exception as e:
                log.error("publishing core event %s failed", item, exc_info=e)
                path = self._path_of(item)
                for watch in self._watches:
                    if watch.path == path:
                        watch.failures.append(e)
