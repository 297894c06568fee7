"""The daemon's pool for blocking work: bounded, fair between callers, never waited on at exit.

Why not asyncio's default executor (a ThreadPoolExecutor): on these 2-CPU
machines it has 6 threads, shared first come first served by every caller.
Six calls that block (a FIFO given as a payload, a GetStats walking a large
VM's pages behind its lock) made root's ListVMs time out (issue 12 finding
4), and its threads are joined at exit, so SIGTERM then hung.

This pool is installed as the loop's default executor, so every
``asyncio.to_thread`` of the bus objects runs here without their knowing.
Each piece of work is filed under the caller that asked for it, read from
``CALLER`` (a context variable the Dispatcher sets in the task serving a
call; ``to_thread`` submits from that task's context):

- work with no caller (the event pump, restore, shutdown: the daemon's own)
  always gets a thread at once, up to ``reserve`` threads beyond the
  callers' ``max_workers``, so the daemon can still publish and stop when
  every caller thread is stuck;
- callers' work is taken round-robin between uids, then between the unique
  names of one uid, so a uid that floods waits behind its own calls only;
- a non-root uid runs at most ``per_uid`` threads at a time: the threads it
  can block for good are bounded, and the others stay free for everyone else.

Threads are daemonic and started on demand; an idle one ends after
``idle_timeout`` seconds, so a burst's threads do not stay.  ``shutdown``
cancels what has not started, waits ``grace`` seconds at most for what runs,
and returns: a stuck worker is abandoned, never joined.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Caller:
    """Whose work it is: the uid (its share of threads) and the unique name (fairness within it)."""

    uid: int
    sender: str


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("kvmnumad_worker_caller", default=None)

MAX_WORKERS = 16  # threads for callers' work (blocking core calls are short syscalls, mostly)
PER_UID = 4  # threads a non-root uid may hold at once
RESERVE = 8  # threads beyond MAX_WORKERS for the daemon's own work
IDLE_TIMEOUT = 2.0  # seconds before an idle thread ends (starting one costs ~50 us)


@dataclass
class _Item:
    future: concurrent.futures.Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    caller: Caller | None


class WorkerPool(concurrent.futures.ThreadPoolExecutor):
    """See the module doc.  A ThreadPoolExecutor only because
    ``loop.set_default_executor`` accepts nothing else: ``submit`` and
    ``shutdown`` are this class's own, and none of the base's threads exist."""

    def __init__(self, max_workers: int = MAX_WORKERS, per_uid: int = PER_UID, reserve: int = RESERVE,
                 idle_timeout: float = IDLE_TIMEOUT, name: str = "kvmnumad-worker") -> None:
        super().__init__(max_workers=1, thread_name_prefix=name)
        self.max_workers = max_workers
        self.per_uid = per_uid
        self.reserve = reserve
        self.idle_timeout = idle_timeout
        self._name = name
        self._cond = threading.Condition()
        self._own: deque[_Item] = deque()  # the daemon's own work (no caller)
        # uid -> sender -> queue; both levels in round-robin order
        self._queues: OrderedDict[int, OrderedDict[str, deque[_Item]]] = OrderedDict()
        self._running: dict[int, int] = {}  # uid -> callers' threads busy for it
        self._callers_running = 0
        self._nthreads = 0
        self._nidle = 0
        self._seq = 0
        self._closed = False

    # ------------------------------------------------------------ Executor
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        item = _Item(future, fn, args, kwargs, CALLER.get())
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            if item.caller is None:
                self._own.append(item)
            else:
                senders = self._queues.setdefault(item.caller.uid, OrderedDict())
                senders.setdefault(item.caller.sender, deque()).append(item)
            if self._nidle == 0 and self._nthreads < self.max_workers + self.reserve and self._runnable():
                self._start_thread()
            self._cond.notify()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Cancel what has not started; wait (at most ``grace``) for what runs; never join."""
        with self._cond:
            self._closed = True
            pending = [*self._own, *(i for s in self._queues.values() for q in s.values() for i in q)]
            self._own.clear()
            self._queues.clear()
            self._cond.notify_all()
        for item in pending:
            item.future.cancel()
        if wait:
            self.wait_idle(self.grace)

    grace = 2.0

    # ------------------------------------------------------------ figures
    def stats(self) -> dict[str, int]:
        """Threads, busy ones, and queued items (tests and logs)."""
        with self._cond:
            queued = len(self._own) + sum(len(q) for s in self._queues.values() for q in s.values())
            return {"threads": self._nthreads, "idle": self._nidle, "callers_running": self._callers_running,
                    "queued": queued}

    def wait_idle(self, timeout: float) -> bool:
        """True once no thread is busy (within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._nthreads - self._nidle > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # ------------------------------------------------------------ inside
    def _runnable(self) -> bool:
        if self._own:
            return True
        if self._callers_running >= self.max_workers:
            return False
        return any(self._may_run(uid) for uid in self._queues)

    def _may_run(self, uid: int) -> bool:
        return uid == 0 or self._running.get(uid, 0) < self.per_uid

    def _take(self) -> _Item | None:
        """The next item a thread may run now (lock held), round-robin."""
        if self._own:
            return self._own.popleft()
        if self._callers_running >= self.max_workers:
            return None
        for uid in list(self._queues):
            if not self._may_run(uid):
                continue
            senders = self._queues[uid]
            sender, queue = next(iter(senders.items()))
            item = queue.popleft()
            senders.move_to_end(sender)
            if not queue:
                del senders[sender]
            self._queues.move_to_end(uid)
            if not senders:
                del self._queues[uid]
            self._running[uid] = self._running.get(uid, 0) + 1
            self._callers_running += 1
            return item
        return None

    def _start_thread(self) -> None:
        self._nthreads += 1
        self._seq += 1
        threading.Thread(target=self._work, name=f"{self._name}-{self._seq}", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._cond:
                item = self._take()
                # Idle since now: a wake-up that brings no item (another thread
                # ending, a submit taken by a sibling) does not restart the
                # clock, or a burst's threads would outlive it by one
                # idle_timeout per thread.
                idle_until = time.monotonic() + self.idle_timeout
                while item is None:
                    left = idle_until - time.monotonic()
                    if self._closed or left <= 0:
                        self._nthreads -= 1
                        self._cond.notify_all()
                        return
                    self._nidle += 1
                    self._cond.wait(left)
                    self._nidle -= 1
                    item = self._take()
                # Another thread for what is still runnable, if none is idle.
                if self._nidle == 0 and self._nthreads < self.max_workers + self.reserve and self._runnable():
                    self._start_thread()
            try:
                if item.future.set_running_or_notify_cancel():
                    try:
                        result = item.fn(*item.args, **item.kwargs)
                    except BaseException as e:  # handed to the waiter, as ThreadPoolExecutor does
                        item.future.set_exception(e)
                    else:
                        item.future.set_result(result)
            finally:
                del item.fn, item.args, item.kwargs  # nothing of a finished call stays referenced
                with self._cond:
                    if item.caller is not None:
                        uid = item.caller.uid
                        self._running[uid] -= 1
                        if not self._running[uid]:
                            del self._running[uid]
                        self._callers_running -= 1
                    self._cond.notify_all()
