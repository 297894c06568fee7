"""A plain process of a small VM's shape, for bench/repair.py's baselines:
N MiB of anonymous memory in T threads, each rewriting its own share
(ctypes.memset runs without the GIL, so each thread is a CPU's worth of
work, as numad wants to see).

Each share is a mapping of its own between two PROT_NONE guard pages: an
anonymous mapping merges with an anonymous neighbour of the same flags, and
then its numa_maps line starts elsewhere and counts the neighbour's pages
too; with the guards, the line that starts at the share's address is exactly
the share.  Prints one JSON line, ``[[tid, address, bytes], ...]`` per
thread once every page is resident, then runs until its stdin closes or it
is killed."""

import ctypes
import json
import mmap
import sys
import threading

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value
PROT_NONE = 0  # <sys/mman.h>; Python's mmap module names only PROT_READ, PROT_WRITE and PROT_EXEC

mib, threads = int(sys.argv[1]), int(sys.argv[2])
share = ((mib << 20) // threads) // mmap.PAGESIZE * mmap.PAGESIZE


def guarded(size: int) -> int:
    """``size`` bytes read-write, a PROT_NONE page either side; the inner address."""
    base = libc.mmap(None, size + 2 * mmap.PAGESIZE, PROT_NONE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap")
    inner = base + mmap.PAGESIZE
    if libc.mprotect(inner, size, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    return int(inner)


shares = [guarded(share) for _ in range(threads)]
for addr in shares:
    ctypes.memset(addr, 1, share)  # first touched on the CPUs the process was started on
tids: list[int] = [0] * threads
started = threading.Barrier(threads + 1)


def rewrite(i: int) -> None:
    tids[i] = threading.get_native_id()
    started.wait()
    value = 0
    while True:
        value = (value + 1) & 0xFF
        ctypes.memset(shares[i], value, share)


for i in range(threads):
    threading.Thread(target=rewrite, args=(i,), daemon=True).start()
started.wait()
print(json.dumps([[tids[i], shares[i], share] for i in range(threads)]), flush=True)
sys.stdin.read()
