"""Reads of /proc and /sys for the sampler: the I/O edge of the optimizer.

Each reader is one open + read of a small kernel file (os.open/os.read: a
third of the cost of open().read() here), and answers None or an empty value
for a thread or node that went away meanwhile -- a sample is a snapshot of a
moving system, not a transaction.  All block briefly: call off the loop.
"""

from __future__ import annotations

import os
from collections.abc import Collection

NODE_SYSFS = "/sys/devices/system/node"

_BUF = 1 << 16


def _read(path: str) -> bytes | None:
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


def schedstat(tid: int, pid: str = "self") -> tuple[int, int] | None:
    """(CPU time ns, run delay ns) of a thread of process ``pid`` (this one,
    or an adopted VMM's: kvmnumad/adopt/)."""
    raw = _read(f"/proc/{pid}/task/{tid}/schedstat")
    if raw is None:
        return None
    fields = raw.split()
    return int(fields[0]), int(fields[1])


def last_cpu(tid: int, pid: str = "self") -> int:
    """Field 39 of stat (the CPU it last ran on), -1 if gone.  Fields after
    the command name, which may hold spaces and ')', start at field 3."""
    raw = _read(f"/proc/{pid}/task/{tid}/stat")
    if raw is None:
        return -1
    return int(raw.rsplit(b")", 1)[1].split()[39 - 3])


def migrations(tid: int, pid: str = "self") -> int:
    """se.nr_migrations of /proc/.../sched (CONFIG_SCHED_DEBUG kernels, as
    Debian's), -1 where the kernel has no such file."""
    raw = _read(f"/proc/{pid}/task/{tid}/sched")
    if raw is None:
        return -1
    at = raw.find(b"se.nr_migrations")
    if at < 0:
        return -1
    line = raw[at:raw.find(b"\n", at)]
    return int(line.rsplit(b":", 1)[1])


def affinity(tid: int) -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(tid))
    except OSError:
        return frozenset()


def numa_maps(starts: Collection[int], pid: str = "self") -> dict[int, dict[int, int]]:
    """Resident pages per node of the mappings that start at ``starts``, from
    one read of numa_maps (guest memory is a memfd: shmem, matched by its
    start address, as kvm-notes.md says).  A missing start: not mapped."""
    raw = _read(f"/proc/{pid}/numa_maps")
    out: dict[int, dict[int, int]] = {}
    if raw is None or not starts:
        return out
    wanted = set(starts)
    for line in raw.split(b"\n"):
        space = line.find(b" ")
        if space <= 0:
            continue
        start = int(line[:space], 16)
        if start not in wanted:
            continue
        pages: dict[int, int] = {}
        for tok in line.split()[2:]:
            if tok[:1] == b"N" and b"=" in tok:
                node, _, n = tok[1:].partition(b"=")
                if node.isdigit():
                    pages[int(node)] = int(n)
        out[start] = pages
    return out


def numastat(node: int) -> dict[str, int]:
    raw = _read(f"{NODE_SYSFS}/node{node}/numastat")
    if raw is None:
        return {}
    out: dict[str, int] = {}
    for line in raw.decode().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def rss_shmem() -> int:
    """RssShmem of this process in kB (guest memory is shmem), -1 if the kernel has no such line."""
    raw = _read("/proc/self/status") or b""
    at = raw.find(b"RssShmem:")
    if at < 0:
        return -1
    return int(raw[at + 9:raw.find(b"kB", at)])
