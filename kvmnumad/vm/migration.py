"""Moving a guest node's memory to another host node as a job, while the VM runs.

Why a job and not one mbind(MPOL_MF_MOVE): that call moves a whole node in
one uninterruptible syscall (seconds for GiBs) that nobody can watch or stop,
and it holds a worker thread throughout.  A job first points the regions'
policy at the destination (mbind without MPOL_MF_MOVE, so every page the
guest faults from now on lands there), counts the resident pages that are
elsewhere, then moves them ``chunk_pages`` of address space at a time with
move_pages(2), one pool task per chunk, so the VM keeps running, readers of
the VM are not blocked, and Cancel takes effect between two chunks.

Outcomes (model.JobState):

- DONE: the regions' recorded host node, the guest node's map entry (when
  the job covered all its slots) and its bound vCPUs follow the destination,
  and the VM's definition is saved so; pages that would not move (EBUSY...)
  are counted by errno and stay where they were.
- CANCELLED: what moved stays moved and what did not stays put; the policy
  goes back to the old host node and so does nothing of the map or the
  definition: the declared placement is the one the caller had, and
  Residency (measured, not declared) shows the split as it is.  A user who
  cancels wants the move to stop, not to be undone (which would be a second
  migration of its own) nor to be completed under another name.
- FAILED: the kernel refused the move as a whole (ENOMEM, ENODEV): like any
  failure half-way, everything goes back (policy and pages, mbind with
  MPOL_MF_MOVE to the old node) and the error says why.

The regions are a Vm's (vm/memory.py) or an adopted VM's (adopt/), whose
pages are another process's: ``pid`` names it (0: ours), and move_pages(2)
takes it as such.

Thread-safe; every blocking step runs on the executor given (the daemon's
WorkerPool), as the daemon's own work, never on the caller's thread.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Protocol

from kvmnumad import errors
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.model import JobState, JobStatus
from kvmnumad.numa.memory import move_range_to_node, pages_off_node

log = logging.getLogger(__name__)

CHUNK_PAGES = 4096  # pages of address space per chunk (16 MiB): one move_pages batch, ~10 ms on this hardware
PROGRESS_INTERVAL = 0.1  # seconds: progress is published at most this often while a job runs


class Region(Protocol):
    """What a job moves: a range of the address space of process ``pid``."""

    @property
    def hva(self) -> int: ...

    @property
    def size(self) -> int: ...


def _has_memory(pid: int) -> bool:
    """Whether process ``pid`` still has an address space (move_pages says
    ESRCH once it is reaped, EINVAL while it exits: no mm)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return f.read().split(b" ", 1)[0] != b"0"
    except OSError:
        return False


class MigrationJob:
    """One move of (a slot of) a guest node to a host node; see the module doc.

    Made by Manager.start_migration, which checks the request and the
    bounds; ``finish(state)`` is the VM's side of the ending (vm.Vm.end_migration).
    """

    def __init__(self, job_id: int, vm: str, guest_node: int, *, slot: int | None, host_node: int,
                 from_node: int, starter: int, regions: Sequence[Region], executor: Executor,
                 finish: Callable[[JobState, int], None], on_progress: Callable[[JobStatus], None],
                 on_end: Callable[[MigrationJob], None],
                 chunk_pages: int = CHUNK_PAGES, origin: str = "caller", pid: int = 0) -> None:
        self.id = job_id
        self.vm = vm
        self.guest_node = guest_node
        self.slot = slot
        self.host_node = host_node
        self.from_node = from_node  # the guest node's host node when it started
        self.starter = starter
        self.origin = origin  # "caller" or "rebalance" (explain.Kind's value): JobStatus.origin
        self._regions = regions
        self._pid = pid  # whose address space the regions are in (0: ours)
        self._executor = executor
        self._finish = finish
        self._on_progress = on_progress
        self._on_end = on_end
        self._chunk = max(1, chunk_pages) * PAGE_SIZE
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._cancel = threading.Event()
        self._state = JobState.RUNNING
        self._ending = False
        self._moved = 0
        self._total = 0
        self._failed: dict[int, int] = {}
        self._error: errors.KvmnumaError | None = None
        self._published = 0.0
        # (region, offset, length, resident pages already on the destination, pages to move) of
        # each chunk with something to move, from the count: one int tuple per chunk, 64K for 1 TiB
        self._chunks: list[tuple[Region, int, int, int, int]] = []
        self._counting: Iterator[tuple[Region, int]] | None = None
        self._counted = 0

    # ------------------------------------------------------------ readers
    def status(self) -> JobStatus:
        with self._lock:
            return JobStatus(self.id, self.vm, self.guest_node, self.slot, self.host_node, self.starter,
                             self._state, self._moved, self._total, tuple(sorted(self._failed.items())),
                             str(self._error) if self._error is not None else "", self.origin)

    @property
    def state(self) -> JobState:
        return self._state

    @property
    def error(self) -> errors.KvmnumaError | None:
        """Why it FAILED (typed, as the caller of a synchronous move would have got it)."""
        return self._error

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until it ended (or ``timeout``); its status then."""
        self._ended.wait(timeout)
        return self.status()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    # ------------------------------------------------------------ control
    def start(self) -> None:
        self._submit(self._count)

    def cancel(self) -> bool:
        """Stop after the chunk in progress; False if it had ended already."""
        if self._ended.is_set():
            return False
        self._cancel.set()
        return True

    # ------------------------------------------------------------ the work
    def _submit(self, step: Callable[[], None]) -> None:
        # As the daemon's own work (no CALLER in an empty context): it always
        # gets a pool thread, so a destroy waiting for the job cannot starve it.
        try:
            future = contextvars.Context().run(self._executor.submit, self._guarded, step)
        except RuntimeError as e:  # the pool is shutting down: the daemon stops
            self._end(JobState.CANCELLED, errors.Internal(f"job {self.id}: {e}"))
            return
        # A pool that shuts down cancels what has not started: the job ends there, not never.
        future.add_done_callback(lambda f: self._end(JobState.CANCELLED) if f.cancelled() else None)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except OSError as e:
            if self._pid and e.errno in (errno.ESRCH, errno.EINVAL) and not _has_memory(self._pid):
                self._end(JobState.FAILED, errors.NoSuchVM(f"VM {self.vm!r}: its process {self._pid} exited "
                                                           "while the job moved its pages", vm=self.vm))
                return
            kind = errors.InsufficientMemory if e.errno in (errno.ENOMEM, errno.ENOSPC) else errors.Internal
            self._end(JobState.FAILED, kind(f"moving guest node {self.guest_node} of VM {self.vm!r} to host "
                                            f"node {self.host_node}: {e.strerror or e}", node=self.host_node,
                                            errno=e.errno))
        except errors.KvmnumaError as e:
            self._end(JobState.FAILED, e)
        except Exception as e:  # a bug: logged with its traceback, the job still ends and rolls back
            log.exception("migration job %d", self.id)
            self._end(JobState.FAILED, errors.Internal(f"job {self.id} failed: {e}"))

    def _count(self) -> None:
        """One query of every page, a chunk per pool task (Cancel is heard
        between them too), which is also each chunk's plan: the moves then
        need no query of their own (half the syscalls), and a chunk with
        nothing off the destination (a job after a cancel) is skipped."""
        if self._cancel.is_set():
            self._end(JobState.CANCELLED)
            return
        if self._counting is None:
            self._counting = iter([(r, off) for r in self._regions for off in range(0, r.size, self._chunk)])
        chunk = next(self._counting, None)
        if chunk is not None:
            r, off = chunk
            length = min(self._chunk, r.size - off)
            resident, away = pages_off_node(r.hva + off, length, self.host_node, pid=self._pid)
            if away:
                self._chunks.append((r, off, length, resident - away, away))
                self._counted += away
            self._submit(self._count)
            return
        self._chunks.reverse()  # popped from the end: in address order
        with self._lock:
            self._total = self._counted
        self._progress(force=True)
        self._submit(self._step)

    def _step(self) -> None:
        if self._cancel.is_set():
            self._end(JobState.CANCELLED)
            return
        if not self._chunks:
            self._end(JobState.DONE)
            return
        region, off, length, there, away = self._chunks.pop()
        on_node, failed = move_range_to_node(region.hva + off, length, self.host_node, pid=self._pid)
        # A page the guest touched for the first time since the count lands on
        # the destination (the policy says so): it is no move, hence the bound.
        moved = min(max(on_node - there, 0), away)
        with self._lock:
            self._moved = min(self._moved + moved, self._total)
            for e, n in failed.items():
                self._failed[e] = self._failed.get(e, 0) + n
        self._progress()
        self._submit(self._step)

    def _progress(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._published < PROGRESS_INTERVAL:
            return
        self._published = now
        self._on_progress(self.status())

    def _end(self, state: JobState, error: errors.KvmnumaError | None = None) -> None:
        with self._lock:
            if self._ending:  # once: a step and the pool's cancel callback may both get here
                return
            self._ending = True
            self._error = error
        try:
            self._finish(state, self._moved)
        except Exception as e:  # the VM's side failed (rolling back, say): the job still ends
            log.exception("ending migration job %d", self.id)
            state = JobState.FAILED
            self._error = self._error or errors.Internal(f"ending job {self.id}: {e}")
        with self._lock:
            self._state = state
        try:
            self._on_progress(self.status())  # the last figures and the outcome, whatever the interval
        except Exception:
            log.exception("progress of migration job %d", self.id)
        try:
            self._on_end(self)  # before waiters wake: JobRemoved is published ahead of their replies
        finally:
            self._ended.set()
