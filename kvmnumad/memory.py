"""Guest memory regions: memfd + shared mapping, bound to host NUMA nodes.

The mapping is made with libc's mmap through ctypes rather than Python's
``mmap`` module: the module refuses to unmap while a ctypes view of it exists,
and KVM only needs the host virtual address.  Every region owns exactly one fd
and one mapping and releases both exactly once.
"""

from __future__ import annotations

import ctypes
import os
import threading

from kvmnumad.numa.memory import MemPolicy, mbind, prefault

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_RW = 0x1 | 0x2
_MAP_SHARED = 0x01


class GuestRegion:
    """One memfd-backed block of guest memory in this process."""

    def __init__(self, name: str, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            addr = _libc.mmap(None, size, _PROT_RW, _MAP_SHARED, self.fd, 0)
            if addr is None or addr == _MAP_FAILED:
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of {size} bytes: {os.strerror(err)}")
        except BaseException:
            os.close(self.fd)
            raise
        self.hva: int = addr
        self._closed = False

    def bind(self, policy: MemPolicy, nodes: frozenset[int] | set[int] | tuple[int, ...], *,
             move: bool = False) -> None:
        """Apply a NUMA policy to the whole region.

        shmem keeps the policy on the file, so it also governs pages faulted
        in later by KVM on behalf of the guest.  ``move`` migrates pages that
        are already resident (live migration between host nodes).
        """
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
        if _libc.munmap(self.hva, self.size) != 0:  # pragma: no cover - only on a corrupted address
            raise OSError(ctypes.get_errno(), "munmap")
        os.close(self.fd)

    def __enter__(self) -> GuestRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_page_aligned(value: int) -> bool:
    return value % PAGE_SIZE == 0


__all__ = ["PAGE_SIZE", "GuestRegion", "is_page_aligned"]
