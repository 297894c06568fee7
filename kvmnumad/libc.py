"""The C library through ctypes: loaded once, every function typed by one table.

The same pattern as ``numa/libnuma.py`` (and pyudev's ``_ctypeslib``): a
signature table gives each function its argtypes and restype, and an errcheck
turns C's ``-1``/``MAP_FAILED`` with errno into ``OSError`` with the errno's
name, so no caller compares a return value with -1 or an errno with 12.  The
handle is our own CDLL instance (``use_errno=True``), so argtypes set here
cannot clash with anyone else's ``ctypes.CDLL(None)``.  Calls through a CDLL
release the GIL, which KVM_RUN and a long mbind need.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from ctypes import c_char_p, c_int, c_long, c_size_t, c_ulong, c_void_p
from typing import Any

# The host's page size: memfd regions, mbind and move_pages ranges, KVM's
# dirty bitmap (one bit per host page) and guest page walks all count in it.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

MAP_FAILED = ctypes.c_void_p(-1).value
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MADV_POPULATE_WRITE = 23  # Linux 5.14
PR_SET_NAME = 15


def _check_minus_one(result: int, func: Any, args: tuple[Any, ...]) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{func.__name__}: {os.strerror(err)}")
    return result


def _check_mmap(result: int | None, func: Any, args: tuple[Any, ...]) -> int:
    if result is None or result == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {args[1]} bytes: {os.strerror(err)}")
    return result


ErrCheck = Callable[[Any, Any, tuple[Any, ...]], Any]

# name: (argtypes, restype, errcheck).  ioctl and prctl are variadic; on x86-64
# passing their arguments as fixed integer/pointer arguments is ABI-compatible.
SIGNATURES: dict[str, tuple[list[Any], Any, ErrCheck | None]] = {
    "mmap": ([c_void_p, c_size_t, c_int, c_int, c_int, c_long], c_void_p, _check_mmap),
    "munmap": ([c_void_p, c_size_t], c_int, _check_minus_one),
    "madvise": ([c_void_p, c_size_t, c_int], c_int, _check_minus_one),
    # ioctl returns -1 with errno; KVM callers raise their own KvmError naming the request
    "ioctl": ([c_int, c_ulong, c_ulong], c_int, None),
    "prctl": ([c_int, c_char_p, c_ulong, c_ulong, c_ulong], c_int, _check_minus_one),
    # clone(fn, stack, flags, arg, parent_tid): glibc's wrapper, variadic after arg (kvmnumad/holder.py)
    "clone": ([c_void_p, c_void_p, c_int, c_void_p, c_void_p], c_int, _check_minus_one),
    "unshare": ([c_int], c_int, _check_minus_one),
}


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    for name, (argtypes, restype, errcheck) in SIGNATURES.items():
        func = getattr(lib, name)
        func.argtypes = argtypes
        func.restype = restype
        if errcheck is not None:
            func.errcheck = errcheck
    return lib


libc = _load()


def mmap_shared(fd: int, size: int) -> int:
    """Map ``fd`` read-write and shared; returns the address.  Not Python's
    mmap module: it refuses to unmap while a ctypes view exists, and KVM only
    needs the address."""
    addr: int = libc.mmap(None, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    return addr


def munmap(addr: int, size: int) -> None:
    libc.munmap(addr, size)


def madvise(addr: int, size: int, advice: int) -> None:
    libc.madvise(addr, size, advice)


def set_thread_name(name: str) -> None:
    """Name the calling thread (comm, 15 bytes) so that ps -T, top and
    observers see "vcpu3", not "python"."""
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
