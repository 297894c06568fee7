"""Reads of /proc and /sys for the sampler: the I/O edge of the optimizer.

Each reader is one read of a small kernel file and answers None or an empty
value for a thread or node that went away meanwhile -- a sample is a
snapshot of a moving system, not a transaction.  A reader takes ``read``:
``read_file`` (open, read, close: os.open/os.read, a third of the cost of
open().read() here) or a ``KeptFiles``'s (the file kept open and read again
with pread, a sixth of that).  All block briefly: call off the loop.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Collection, Iterable

NODE_SYSFS = "/sys/devices/system/node"

_BUF = 1 << 16
_SMALL = 4096  # every file read here but numa_maps is shorter (/proc/TID/sched: about 1.9 KB)
_GONE = (errno.ESRCH, errno.ENOENT, errno.ENODEV)

Read = Callable[[str], "bytes | None"]


def read_file(path: str) -> bytes | None:
    """The whole file by open, read and close; None if it (or its thread) is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, _BUF)
            if not chunk:
                break
            chunks.append(chunk)
            if len(chunk) < _BUF and not path.endswith("numa_maps"):
                break  # one read returns a whole small seq_file
        return b"".join(chunks)
    except (ProcessLookupError, OSError):
        return None
    finally:
        os.close(fd)



class KeptFiles:
    """Small /proc and /sys files kept open between samples, read again with
    ``os.pread(fd, n, 0)``.

    A read from offset 0 makes a seq_file generate its text afresh
    (fs/seq_file.c resets its iterator at position 0; kernfs attributes are
    seq_files too), so the figures are current: 0.9 us a schedstat here
    against 5.7 us for open, read and close.  An fd of /proc/PID/task/TID
    holds the thread's struct pid, not its number: once the thread has
    exited every read fails with ESRCH, never answers an old value, and never
    a later thread's that got the same tid.  Such an fd is closed there and
    the path opened once more (that later thread, or None).

    Bounded: one fd per file a sample reads, and ``retain_read`` closes those
    a sample did not read (the sampler calls it after each take); ``close``
    ends all.  Thread-safe: the sampler's thread reads, a VM's destroy
    discards (closes) its threads' files.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._read: set[str] = set()  # paths read since the last retain_read
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._fds)

    def read(self, path: str) -> bytes | None:
        # Under the lock: a close from another thread (discard) never lands
        # between the lookup and the pread, where the number could already
        # name a file opened since (a new VM's memfd).
        with self._lock:
            self._read.add(path)
            fd = self._fds.get(path)
            if fd is not None:
                try:
                    return os.pread(fd, _SMALL, 0)
                except OSError as e:
                    if e.errno not in _GONE:
                        return None
                    del self._fds[path]  # its thread (or node) ended: never its old figures
                    os.close(fd)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None  # gone, or no fd left (EMFILE): the figure is missing, nothing else
            try:
                raw = os.pread(fd, _SMALL, 0)
            except OSError:
                os.close(fd)
                return None
            self._fds[path] = fd
            return raw

    def retain_read(self) -> None:
        """Close every kept file not read since the last call."""
        with self._lock:
            fds = [self._fds.pop(p) for p in [p for p in self._fds if p not in self._read]]
            self._read = set()
            for fd in fds:
                os.close(fd)

    def discard(self, paths: Iterable[str]) -> None:
        with self._lock:
            for fd in [fd for fd in (self._fds.pop(p, None) for p in paths) if fd is not None]:
                os.close(fd)

    def paths(self) -> set[str]:
        with self._lock:
            return set(self._fds)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
            for fd in fds:
                os.close(fd)


def task_path(pid: str, tid: int, name: str) -> str:
    """/proc/PID/task/TID/NAME of process ``pid`` (this one, "self", or an
    adopted VMM's: kvmnumad/adopt/)."""
    return f"/proc/{pid}/task/{tid}/{name}"


def parse_schedstat(raw: bytes) -> tuple[int, int]:
    """(CPU time ns, run delay ns) from a schedstat line."""
    cpu_ns, delay_ns, _ = raw.split(None, 2)
    return int(cpu_ns), int(delay_ns)


def last_cpu(tid: int, pid: str = "self", read: Read = read_file) -> int:
    """Field 39 of stat (the CPU it last ran on), -1 if gone.  Fields after
    the command name, which may hold spaces and ')', start at field 3."""
    raw = read(task_path(pid, tid, "stat"))
    if raw is None:
        return -1
    return int(raw.rsplit(b")", 1)[1].split()[39 - 3])


def migrations(tid: int, pid: str = "self", read: Read = read_file) -> int:
    """se.nr_migrations of /proc/.../sched (CONFIG_SCHED_DEBUG kernels, as
    Debian's), -1 where the kernel has no such file."""
    raw = read(task_path(pid, tid, "sched"))
    if raw is None:
        return -1
    at = raw.find(b"se.nr_migrations")
    if at < 0:
        return -1
    line = raw[at:raw.find(b"\n", at)]
    return int(line.rsplit(b":", 1)[1])


def affinity(tid: int) -> set[int] | frozenset[int]:
    """sched_getaffinity, empty once the thread is gone; a set as the kernel
    call gives it (compared as is with a kept frozenset: no copy per vCPU)."""
    try:
        return os.sched_getaffinity(tid)
    except OSError:
        return frozenset()


def numa_maps(starts: Collection[int], pid: str = "self") -> dict[int, dict[int, int]]:
    """Resident pages per node of the mappings that start at ``starts``, from
    one read of numa_maps (guest memory is a memfd: shmem, matched by its
    start address, as kvm-notes.md says).  A missing start: not mapped."""
    raw = read_file(f"/proc/{pid}/numa_maps")
    out: dict[int, dict[int, int]] = {}
    if raw is None or not starts:
        return out
    # Matched as the hex text the kernel prints ("%08lx"): of the ~1,500 lines
    # (a stack, guard and kvm_run per vCPU thread), only the guest regions' are parsed.
    wanted = {b"%08x" % start: start for start in starts}
    for line in raw.split(b"\n"):
        head, _, rest = line.partition(b" ")
        start = wanted.get(head)
        if start is None:
            continue
        pages: dict[int, int] = {}
        for tok in rest.split():
            if tok[:1] == b"N":
                node, eq, n = tok[1:].partition(b"=")
                if eq and node.isdigit():
                    pages[int(node)] = int(n)
        out[start] = pages
    return out


def numastat(node: int, read: Read = read_file) -> dict[str, int]:
    raw = read(f"{NODE_SYSFS}/node{node}/numastat")
    if raw is None:
        return {}
    out: dict[str, int] = {}
    for line in raw.decode().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def rss_shmem(read: Read = read_file) -> int:
    """RssShmem of this process in kB (guest memory is shmem), -1 if the kernel has no such line."""
    raw = read("/proc/self/status") or b""
    at = raw.find(b"RssShmem:")
    if at < 0:
        return -1
    return int(raw[at + 9:raw.find(b"kB", at)])
