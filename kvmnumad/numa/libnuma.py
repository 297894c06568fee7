"""libnuma.so.1 through ctypes: loaded once, every function typed by one table.

The pattern is pyudev's ``_ctypeslib/utils.py``: a signature table gives each
function its argtypes/restype, an errcheck turns the C error convention into
``OSError`` with the real errno (the library is opened with ``use_errno=True``),
so no caller ever compares a return value with -1.  Calls through a ``CDLL``
release the GIL, which matters for ``mbind``/``move_pages`` on gigabytes.

The library is opened on first use, not at import: ``kvmnumad.placement``
imports the policy enum without needing libnuma on the machine.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Sequence
from ctypes import POINTER, c_int, c_long, c_longlong, c_uint, c_ulong, c_void_p
from typing import Any

from kvmnumad.errors import NumaDisabled

LIBRARY = "libnuma.so.1"

ULongArray = ctypes.Array[c_ulong]
IntArray = ctypes.Array[c_int]
PtrArray = ctypes.Array[c_void_p]


class LibnumaMissing(NumaDisabled):
    """libnuma.so.1 cannot be loaded: NUMA placement is unavailable on this host."""


def _check_minus_one(result: int, func: Any, args: tuple[Any, ...]) -> int:
    """libnuma and its syscall wrappers report failure as -1 with errno set."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{func.__name__}: {os.strerror(err)}")
    return result


def _check_distance(result: int, func: Any, args: tuple[Any, ...]) -> int:
    """numa_distance() returns 0 (not -1) for a node it does not know."""
    if result == 0:
        raise OSError(22, f"numa_distance{args}: no such node")
    return result


ErrCheck = Callable[[int, Any, tuple[Any, ...]], int]

# name: (argtypes, restype, errcheck).  Prototypes from numa.h / numaif.h of libnuma 2.0.
SIGNATURES: dict[str, tuple[list[Any], Any, ErrCheck | None]] = {
    "numa_available": ([], c_int, None),  # -1 means "no NUMA": a value, not an error
    "numa_max_node": ([], c_int, None),
    "numa_node_of_cpu": ([c_int], c_int, _check_minus_one),
    "numa_distance": ([c_int, c_int], c_int, _check_distance),
    "numa_node_size64": ([c_int, POINTER(c_longlong)], c_longlong, _check_minus_one),
    # long mbind(void *start, unsigned long len, int mode, const unsigned long *nmask,
    #            unsigned long maxnode, unsigned flags)
    "mbind": ([c_void_p, c_ulong, c_int, POINTER(c_ulong), c_ulong, c_uint], c_long, _check_minus_one),
    # long get_mempolicy(int *mode, unsigned long *nmask, unsigned long maxnode, void *addr, unsigned flags)
    "get_mempolicy": (
        [POINTER(c_int), POINTER(c_ulong), c_ulong, c_void_p, c_uint],
        c_long,
        _check_minus_one,
    ),
    # long move_pages(int pid, unsigned long count, void **pages, const int *nodes, int *status, int flags)
    "move_pages": (
        [c_int, c_ulong, POINTER(c_void_p), POINTER(c_int), POINTER(c_int), c_int],
        c_long,
        _check_minus_one,
    ),
}


def load(name: str = LIBRARY) -> ctypes.CDLL:
    """Open ``name`` and type every function of SIGNATURES (all must exist)."""
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise LibnumaMissing(
            f"cannot load {name} ({exc}): install libnuma1 (Debian/Ubuntu) or numactl-libs (Fedora)"
        ) from exc
    for fname, (argtypes, restype, errcheck) in SIGNATURES.items():
        try:
            func = getattr(lib, fname)
        except AttributeError as exc:
            raise LibnumaMissing(f"{name} lacks {fname}: libnuma >= 2.0.9 is needed") from exc
        func.argtypes = argtypes
        func.restype = restype
        if errcheck is not None:
            func.errcheck = errcheck
    return lib


@functools.cache
def lib() -> ctypes.CDLL:
    """The process-wide libnuma handle (a second racing load is harmless)."""
    return load()


def available() -> bool:
    """numa_available(): False when the kernel has no NUMA syscalls (get_mempolicy fails)."""
    return int(lib().numa_available()) != -1


def max_node() -> int:
    return int(lib().numa_max_node())


def node_of_cpu(cpu: int) -> int:
    return int(lib().numa_node_of_cpu(cpu))


def distance(a: int, b: int) -> int:
    return int(lib().numa_distance(a, b))


def node_size64(node: int) -> tuple[int, int]:
    """(total, free) bytes of ``node``, from its sysfs meminfo as libnuma reads it."""
    free = c_longlong(0)
    total = int(lib().numa_node_size64(node, ctypes.byref(free)))
    return total, free.value


def ulong_array(words: Sequence[int]) -> ULongArray:
    return (c_ulong * len(words))(*words)


def sys_mbind(addr: int, length: int, mode: int, mask: ULongArray, *, maxnode: int, flags: int) -> None:
    lib().mbind(addr, length, mode, mask, maxnode, flags)


def sys_get_mempolicy(mask: ULongArray, maxnode: int, addr: int, flags: int) -> int:
    """Returns the mode word (policy | mode flags); fills ``mask``."""
    mode = c_int(0)
    lib().get_mempolicy(ctypes.byref(mode), mask, maxnode, addr, flags)
    return mode.value


def sys_move_pages(pages: PtrArray, nodes: IntArray | None, status: IntArray, flags: int = 0,
                   pid: int = 0) -> int:
    """move_pages(2) on process ``pid`` (0: this one); ``nodes=None`` only queries. Returns the
    number of pages the kernel could not move (>= 0); per-page results are in ``status``."""
    return int(lib().move_pages(pid, len(pages), pages, nodes, status, flags))
