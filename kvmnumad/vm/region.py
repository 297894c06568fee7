"""One block of guest memory: a memfd and its shared mapping in this process.

memfd rather than anonymous memory because shmem keeps the NUMA policy on the
file (so pages KVM faults in later follow mbind), and because a memfd can
outlive the mapping (handed to another process or kept across a restart).
The mapping is libc's mmap, not Python's module: the module refuses to unmap
while a ctypes view exists, and KVM only needs the address.  Every region
owns exactly one fd and one mapping and releases both exactly once.
"""

from __future__ import annotations

import ctypes
import os
import threading

from kvmnumad import libc
from kvmnumad.numa.memory import MemPolicy, mbind, prefault


class _UnmapDeferral:
    """Mappings left in place by close() while on (address, size): the
    process is about to exec with a holder of its address space
    (kvmnumad/holder.py), whose exit unmaps them after the guests run again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: list[tuple[int, int]] | None = None

    def start(self) -> None:
        with self._lock:
            if self._kept is None:
                self._kept = []

    def take(self) -> list[tuple[int, int]]:
        with self._lock:
            kept, self._kept = self._kept or [], None
        return kept

    def unmap(self, hva: int, size: int) -> None:
        with self._lock:
            if self._kept is not None:
                self._kept.append((hva, size))
                return
        libc.munmap(hva, size)


_deferral = _UnmapDeferral()


def defer_unmaps() -> None:
    """From now on a closed region keeps its mapping (its memfd is closed as
    usual) until :func:`take_deferred`.  Unmapping resident guest memory costs
    about 1 s per GiB on this nested host: before an exec whose old address
    space a holder keeps, that time would be spent inside the guests' pause
    for nothing."""
    _deferral.start()


def take_deferred() -> list[tuple[int, int]]:
    """End the deferral; the mappings left in place, now the caller's to
    unmap (or to leave to the holder)."""
    return _deferral.take()


class GuestRegion:
    """Raises OSError (ENOMEM, ENOSPC, EMFILE...) if the kernel refuses it."""

    def __init__(self, name: str, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.hva: int = libc.mmap_shared(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self._closed = False

    @classmethod
    def adopt(cls, fd: int, size: int) -> GuestRegion:
        """A region around a memfd made by an earlier process of the daemon
        (handed over across exec or kept in systemd's fd store): its pages,
        and the NUMA policy shmem keeps on the file, are the same ones.  The
        region owns ``fd`` from here on, also when this raises (closed).

        Refused (ValueError) unless it is a memfd of exactly ``size`` bytes:
        a wrong fd mapped as guest memory would hand the guest someone's file.
        """
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                raise ValueError(f"handed-over memfd {fd} has {st.st_size} bytes, the slot {size}")
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                raise ValueError(f"handed-over fd {fd} is not a memfd")
            os.set_inheritable(fd, False)  # inherited across exec: CLOEXEC again, like a new one
            region = cls.__new__(cls)
            region.size = size
            region._lock = threading.Lock()
            region.fd = fd
            region.hva = libc.mmap_shared(fd, size)
            region._closed = False
        except BaseException:
            os.close(fd)
            raise
        return region

    def bind(self, policy: MemPolicy, nodes: frozenset[int] | set[int] | tuple[int, ...], *,
             move: bool = False) -> None:
        """Apply a NUMA policy to the whole region; ``move`` migrates the pages
        already resident (live migration between host nodes)."""
        mbind(self.hva, self.size, policy, frozenset(nodes), move=move, strict=move)

    def prefault(self) -> None:
        prefault(self.hva, self.size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset:#x} outside region of {self.size:#x}")
        ctypes.memmove(self.hva + offset, data, len(data))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _deferral.unmap(self.hva, self.size)
        os.close(self.fd)

    def __enter__(self) -> GuestRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
