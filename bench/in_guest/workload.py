"""A plain process of a small VM's shape, for bench/repair.py's baselines:
N MiB of anonymous memory, every page touched, and T threads rewriting it
(ctypes.memset runs without the GIL, so each thread is a CPU's worth of
work, as numad wants to see).  Prints the memory's address, then runs until
its stdin closes or it is killed."""

import ctypes
import mmap
import sys
import threading

mib, threads = int(sys.argv[1]), int(sys.argv[2])
size = mib << 20
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
ctypes.memset(addr, 1, size)
chunk = size // threads


def rewrite(i: int) -> None:
    base, value = addr + i * chunk, 0
    while True:
        value = (value + 1) & 0xFF
        ctypes.memset(base, value, chunk)


for i in range(threads):
    threading.Thread(target=rewrite, args=(i,), daemon=True).start()
print(f"{addr:x} {size}", flush=True)
sys.stdin.read()
