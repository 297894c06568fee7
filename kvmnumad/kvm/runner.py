"""One host thread per vCPU, for the vCPU's whole life.

The thread exists (and has its native tid) as soon as the runner is built,
parked before its first KVM_RUN, so that placement can pin it before the
guest executes one instruction.  Every wait is on one Condition: a parked,
idle or halted vCPU costs no CPU, and ``stop``/``close`` wake it at once.

A vCPU inside KVM_RUN is kicked out with ``immediate_exit`` (covers the
window just before entering the kernel) plus a signal to its thread (covers
the time inside it).  The signal has a no-op Python handler: its only effect
is KVM_RUN returning EINTR.  Python installs signal handlers only from the
main thread, hence :func:`install_kick_signal`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import FrameType

from kvmnumad import libc
from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.ioctls import ExitReason
from kvmnumad.kvm.payload import DONE_PORT, PROGRESS_PORT, SERIAL_PORT
from kvmnumad.kvm.vcpu import VcpuFd

log = logging.getLogger(__name__)

KICK_SIGNAL = int(signal.SIGRTMIN) + 1  # SIGRTMIN itself is often claimed by others; glibc hides 32-33

# Exits after which re-entering KVM_RUN is pointless or unsafe: the vCPU stops with the reason recorded.
FATAL_EXITS = frozenset(
    {
        ExitReason.UNKNOWN,
        ExitReason.EXCEPTION,
        ExitReason.SHUTDOWN,
        ExitReason.FAIL_ENTRY,
        ExitReason.INTERNAL_ERROR,
        ExitReason.SYSTEM_EVENT,
    }
)

CREATED, RUNNING, IDLE, HALTED, STOPPED = "created", "running", "idle", "halted", "stopped"


def _on_kick(signum: int, frame: FrameType | None) -> None:
    """Nothing to do: the signal's delivery already made KVM_RUN return EINTR."""


def install_kick_signal() -> None:
    """Install the no-op handler of KICK_SIGNAL; must run in the main thread.

    A daemon that builds runners off the main thread (in an executor) calls
    this once at startup; the constructor does it lazily when it can.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_kick_signal() must be called from the main thread")
    signal.signal(KICK_SIGNAL, _on_kick)


def kick_signal_installed() -> bool:
    return signal.getsignal(KICK_SIGNAL) is _on_kick


class VcpuRunner:
    """Runs one VcpuFd on its own thread.  All public methods are thread-safe.

    The runner never closes the VcpuFd: its owner closes it after ``close()``
    returned (the thread no longer touches it then).

    States: "created" (parked, never started), "running" (in or around
    KVM_RUN), "idle" (guest executed HLT, sleeping ``idle_interval``),
    "halted" (guest wrote the done port; sleeps until stop/close), "stopped"
    (stop() or close(), or a fatal exit: then ``fault`` says which).
    """

    def __init__(
        self,
        vcpu: VcpuFd,
        index: int,
        on_serial: Callable[[int, bytes], None] | None = None,
        idle_interval: float = 0.05,
        on_fault: Callable[[int, str], None] | None = None,
    ) -> None:
        if not kick_signal_installed():
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError(
                    "VcpuRunner made off the main thread before install_kick_signal() ran in it"
                )
            install_kick_signal()
        self.index = index
        self._vcpu = vcpu
        self._on_serial = on_serial
        self._on_fault = on_fault  # called on the vCPU's thread when it stops by itself
        self._idle_interval = idle_interval
        self._cond = threading.Condition()
        # Everything below is guarded by _cond.
        self._state = CREATED
        self._want_run = False
        self._closing = False
        self._done = False
        self._in_run = False  # the thread is alive and in (or about to enter) KVM_RUN
        self._parked = False
        self._ended = False
        self._fault: str | None = None
        self._exits: Counter[str] = Counter()
        self._progress = 0
        self._tid = 0
        self._final_cpu_ns: int | None = None
        self._thread = threading.Thread(target=self._main, name=f"vcpu{index}", daemon=True)
        self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._parked or self._ended)

    # --- observers --------------------------------------------------------------------------

    @property
    def tid(self) -> int:
        """Native thread id (for sched_setaffinity, /proc/self/task/TID)."""
        return self._tid

    @property
    def state(self) -> str:
        with self._cond:
            return self._state

    @property
    def fault(self) -> str | None:
        """Why the vCPU stopped by itself (e.g. "shutdown"), None when it did not."""
        with self._cond:
            return self._fault

    @property
    def progress(self) -> int:
        """The last value the guest wrote to the progress port 0x510."""
        with self._cond:
            return self._progress

    @property
    def done(self) -> bool:
        """The guest wrote the done port 0x511: it halted for good."""
        with self._cond:
            return self._done

    def seed(self, progress: int, done: bool) -> None:
        """Carry the counters of the same guest's previous runner (a handover):
        the progress a caller reads continues instead of dropping to 0."""
        with self._cond:
            self._progress = progress
            self._done = done

    def exit_counts(self) -> dict[str, int]:
        """KVM_RUN returns so far by lowercase reason name ("io", "hlt", "intr", ...)."""
        with self._cond:
            return dict(self._exits)

    def cpu_time_ns(self) -> int:
        """CPU time of the vCPU thread (guest time included), from the kernel's schedstat."""
        with self._cond:
            if self._final_cpu_ns is not None:
                return self._final_cpu_ns
        try:
            with open(f"/proc/self/task/{self._tid}/schedstat") as f:
                return int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            with self._cond:
                return self._final_cpu_ns or 0

    def current_cpu(self) -> int:
        """The host CPU the thread last ran on (field 39 of its stat), -1 once it ended."""
        try:
            with open(f"/proc/self/task/{self._tid}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return -1
        # Fields after the command name (which may contain spaces) start at field 3.
        return int(stat.rsplit(")", 1)[1].split()[39 - 3])

    # --- control ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run, or resume after stop(); returns at once. A halted guest stays halted.

        Raises KvmError (EBADF) once closed, (EIO) after a fatal exit.
        """
        with self._cond:
            if self._closing:
                raise KvmError(errno.EBADF, "KVM_RUN", f"vCPU {self.index} runner closed")
            if self._fault is not None:
                raise KvmError(errno.EIO, "KVM_RUN", f"vCPU {self.index} stopped: {self._fault}")
            self._want_run = True
            if self._parked and not self._runnable():
                self._state = self._parked_state()  # a done guest: "halted" again
            self._cond.notify_all()

    def request_stop(self) -> None:
        """Kick the vCPU out of KVM_RUN without waiting for it to park."""
        with self._cond:
            self._want_run = False
            self._kick_locked()

    def stop(self, timeout: float = 1.0) -> None:
        """Pause: kick the vCPU out of KVM_RUN and return once its thread is parked
        (at once when called from that thread, e.g. by on_serial)."""
        with self._cond:
            self._want_run = False
            self._kick_locked()
            if threading.get_ident() == self._thread.ident:
                return
            if not self._cond.wait_for(lambda: self._parked or self._ended, timeout):
                raise TimeoutError(f"vCPU {self.index} did not stop within {timeout} s")
            if self._parked:
                self._state = self._parked_state()  # parked earlier as "halted" or "created"

    def request_close(self) -> None:
        """Ask the thread to end without waiting for it: a VM kicks all its
        vCPUs first and joins them after, so none keeps running (and taking a
        CPU from the others) while another is being joined."""
        with self._cond:
            self._closing = True
            self._want_run = False
            self._kick_locked()

    def close(self, timeout: float = 1.0) -> None:
        """End the thread and join it; idempotent. The VcpuFd stays open (the caller's).

        From the vCPU thread itself (on_serial) it only asks; a later close() joins.
        """
        self.request_close()
        if threading.get_ident() == self._thread.ident:
            return
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"vCPU {self.index} thread did not end within {timeout} s")
        # join() returns when Python is done with the thread; the detached OS thread
        # exits an instant later.  Wait for that too, so that callers counting
        # /proc/self/task see it gone (no event exists for it: short sleeps).
        pause = 0.0002
        while os.path.exists(f"/proc/self/task/{self._tid}"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"vCPU {self.index} thread {self._tid} still exists after {timeout} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def _kick_locked(self) -> None:
        self._cond.notify_all()
        if self._ended:
            return
        self._vcpu.immediate_exit = True
        if self._in_run:
            # _in_run is cleared only under _cond, which we hold: the thread is alive,
            # so its pthread id is valid for pthread_kill.
            signal.pthread_kill(self._thread.ident or 0, KICK_SIGNAL)

    # --- the thread -------------------------------------------------------------------------

    def _main(self) -> None:
        # The creator may block signals for its own reasons (signalfd, asyncio): the
        # kick must get through here whatever mask this thread inherited.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {KICK_SIGNAL})
        libc.set_thread_name(f"vcpu{self.index}")
        with self._cond:
            self._tid = threading.get_native_id()
        try:
            self._loop()
        except BaseException as e:  # recorded, never a silent death of the thread
            log.exception("vCPU %d thread failed", self.index)
            self._set_fault(f"error: {e}")
        finally:
            with self._cond:
                self._final_cpu_ns = time.thread_time_ns()
                self._in_run = False
                self._parked = False
                self._ended = True
                self._state = STOPPED
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._runnable():
                    self._parked = True
                    self._state = self._parked_state()
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._closing or self._runnable())
                    self._parked = False
                if self._closing:
                    return
                self._vcpu.immediate_exit = False  # a stop() after this line kicks again
                self._in_run = True
                self._state = RUNNING
            try:
                reason = self._vcpu.run()
            except KvmError as e:
                log.warning("vCPU %d stopped: %s", self.index, e)
                self._set_fault(f"error: {e}")
                continue
            finally:
                with self._cond:
                    self._in_run = False
            self._handle(reason)

    def _set_fault(self, fault: str) -> None:
        """Record why the vCPU stopped by itself (the first reason wins) and
        tell the owner, so that the VM's state says so."""
        with self._cond:
            if self._fault is not None:
                return
            self._fault = fault
        if self._on_fault is not None:
            try:
                self._on_fault(self.index, fault)
            except Exception:  # the owner's bug must not hide the fault
                log.exception("vCPU %d: fault consumer failed", self.index)

    def _runnable(self) -> bool:
        return self._want_run and not self._done and self._fault is None and not self._closing

    def _parked_state(self) -> str:
        if self._fault is not None:
            return STOPPED
        if self._done and self._want_run:
            return HALTED
        if self._state == CREATED and not self._want_run:
            return CREATED
        return STOPPED

    def _handle(self, reason: ExitReason) -> None:
        with self._cond:
            self._exits[reason.name.lower()] += 1
        if reason == ExitReason.IO:
            self._handle_io()
        elif reason == ExitReason.HLT:
            with self._cond:
                self._state = IDLE
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._closing or not self._want_run, self._idle_interval)
        elif reason in FATAL_EXITS:
            detail = self._vcpu.exit_detail(reason)
            detail = f" ({detail})" if detail else ""
            where = f"; {self._vcpu.describe_state()}" if reason == ExitReason.SHUTDOWN else ""
            log.warning("vCPU %d stopped by exit %s%s%s", self.index, reason.name, detail, where)
            self._set_fault(reason.name.lower() + detail)
        # INTR: nothing to do, the loop re-reads what is wanted; MMIO and others: ignored.

    def _handle_io(self) -> None:
        io = self._vcpu.io_exit()
        if not io.is_out:
            self._vcpu.set_io_in_data(b"\xff" * len(io.data))  # an unclaimed port reads all ones
        elif io.port == SERIAL_PORT:
            if self._on_serial is not None:
                try:
                    self._on_serial(self.index, io.data)
                except Exception:  # a consumer's bug must not kill the vCPU
                    log.exception("vCPU %d: serial consumer failed", self.index)
        elif io.port == PROGRESS_PORT:
            with self._cond:
                self._progress = io.value
        elif io.port == DONE_PORT:
            with self._cond:
                self._done = True
