"""The old address space kept alive past exec, so that exec does not pay its teardown.

An exec drops the old address space, and dropping it unmaps every resident
guest page: about 1 s per GiB on this nested host (page-table updates are
paravirtualized), all of it inside the guests' pause.  A child cloned with
CLONE_VM shares that address space, so exec's drop is not the last reference
and unmaps nothing.  The new image lets the child go once its VMs run again;
the child's exit then pays the unmap, off the pause (QEMU's CPR has the same
problem and keeps the old mappings in the new process instead).

The child, the holder, must never run Python: until the exec it shares the
interpreter's memory.  It runs libc's ``read()`` on the read end of a pipe and
nothing else, with every signal blocked, and that read end is its only fd: it
is cloned from a thread that first unshared its fd table and closed every
other fd in it, so it keeps no bus connection, listening socket, netlink
socket, VM fd or memfd open.  The write end goes to the new image across
exec.  Closing it, or the new image's death however it dies, gives the holder
EOF; glibc's clone trampoline then ends it (SYS_exit with read's result), and
whoever is its parent then (the new image, or init if that died) reaps it.
PR_SET_PDEATHSIG would not do: the holder would have to set it on itself.

Under systemd (``systemctl restart``) none of this applies: the new process
starts only when the unit's cgroup is empty, so the old process's exit pays
the unmap inside the pause there.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass

from kvmnumad.libc import libc

log = logging.getLogger(__name__)

CLONE_VM = 0x00000100
CLONE_FILES = 0x00000400
STACK_SIZE = 64 << 10  # read() and the trampoline need a few hundred bytes

# The holder's stack and the thread whose TLS it runs on (the fs register is
# inherited through clone): both stay allocated as long as this image lives.
# After exec only the holder uses that memory, and nothing unmaps it.
_kept: list[object] = []


@dataclass
class Holder:
    """A child sharing this process's address space (its pid) and the pipe
    end whose closing lets it go (``fd``, owned here)."""

    pid: int
    fd: int
    _thread_free: threading.Event | None = None  # the cloning thread, waiting while the holder needs its TLS
    _let_go_at: float | None = None
    _reaped: bool = False

    def let_go(self) -> None:
        """Close the pipe: the holder reads EOF and exits (unmapping the old
        address space as it does).  Not reaped here: see :meth:`reap`."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._let_go_at = time.monotonic()

    def reap(self) -> float:
        """Let it go and wait for its exit (blocking while it unmaps); the ms
        from its release to its exit.  Once only."""
        self.let_go()
        if not self._reaped:
            self._reaped = True
            with contextlib.suppress(ChildProcessError):  # not our child (any more)
                os.waitpid(self.pid, 0)
            if self._thread_free is not None:
                self._thread_free.set()
        return (time.monotonic() - (self._let_go_at or time.monotonic())) * 1000


def spawn() -> Holder:
    """Clone a holder of this address space.  Raises OSError when the kernel
    (or a seccomp filter) refuses; then nothing is left behind."""
    read_end, write_end = os.pipe()  # both close-on-exec in this image
    outcome: list[int | BaseException] = []
    cloned = threading.Event()
    free = threading.Event()
    read_fn = ctypes.cast(libc.read, ctypes.c_void_p).value
    stack = ctypes.create_string_buffer(STACK_SIZE)
    top = (ctypes.addressof(stack) + STACK_SIZE) & ~0xF  # the ABI's 16-byte alignment

    def clone_from_a_bare_table() -> None:
        try:
            # The child inherits this thread's mask: no handler of this
            # interpreter may ever run in it, nor interrupt its read.
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            libc.unshare(CLONE_FILES)  # this thread's own fd table from here on
            os.closerange(0, read_end)
            os.closerange(read_end + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
            # In the child: read(read_end, stack - 16, 1).  The buffer and the
            # count are the registers glibc's trampoline leaves (rsi = the
            # child's stack minus the two slots it popped, rdx = parent_tid,
            # unused without CLONE_PARENT_SETTID).  Nobody ever writes to the
            # pipe, so the read only ever returns EOF and writes nothing.
            outcome.append(libc.clone(read_fn, top, CLONE_VM | signal.SIGCHLD, read_end, 1))
        except BaseException as e:  # handed to the caller's thread
            outcome.append(e)
        cloned.set()
        free.wait()  # until the exec ends this thread, or the holder was reaped

    thread = threading.Thread(target=clone_from_a_bare_table, name="holder-clone", daemon=True)
    thread.start()
    cloned.wait()
    os.close(read_end)
    result = outcome[0]
    if isinstance(result, BaseException):
        free.set()
        os.close(write_end)
        raise result
    _kept.extend((stack, thread))
    return Holder(result, write_end, free)


def from_environ_value(value: str | None, fd: int | None) -> Holder | None:
    """The holder an earlier image of this process left (its pid from the
    environment, its pipe end inherited); our child now, since exec kept the PID."""
    if value is None or fd is None:
        if fd is not None:
            os.close(fd)
        return None
    try:
        return Holder(int(value), fd)
    except ValueError:
        os.close(fd)
        return None
