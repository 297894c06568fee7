"""Inside the numa guest: what moving a nested QEMU's memory costs per move_pages call, and why.

The adopt tests move a nested QEMU's 64 MiB memfd backend between guest
nodes.  In a quiet guest that takes 2-9 s; beside two host stress-ng it has
taken minutes, with the guest kernel reporting soft lockups and RCU stalls in
the daemon's move_pages (get_page_from_freelist, clear_page_erms).  This
times the same move_pages calls the daemon makes, in chunks of 512 and 4096
pages, on three address spaces:

- ``own``: a memfd of this process (no KVM at all);
- ``paused``: the QEMU's backend, its vCPUs created but not running (-S);
- ``running``: the same after QMP ``cont`` (its vCPUs in KVM_RUN).

For each it prints the calls' p50 and max, the whole move's time, and what
the kernel counted meanwhile (/proc/vmstat pgmigrate_*, and the TLB shootdown
and function-call interrupts of /proc/interrupts), which tells copying from
cross-CPU waiting.  Run by ``python -m tests.numa_guest --topology 2node --move-cost N``
(N rounds, each moving every page to node 1 and back).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from ctypes import c_int, c_void_p
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvmnumad.numa import libnuma

MiB = 1 << 20
PAGE = 4096
BACKEND = 64  # MiB per guest node, as tests/numa/test_numa_adopt.py


def counters() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, value = line.split()
        if key.startswith("pgmigrate_") or key in ("thp_migration_success", "thp_migration_split"):
            out[key] = int(value)
    for line in Path("/proc/interrupts").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in ("TLB:", "CAL:", "RES:"):
            out[fields[0].rstrip(":")] = sum(int(f) for f in fields[1:] if f.isdigit())
    return out


class Sampler:
    """While a move_pages call has run for more than SLOW s, the kernel stacks
    of the moving thread and of QEMU's threads, every 0.1 s: where a slow call waits."""

    SLOW = 0.3

    def __init__(self) -> None:
        self.began: float | None = None
        self.tid = threading.get_native_id()
        self.qemu = 0
        self.seen: collections.Counter[str] = collections.Counter()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def _stack(path: str) -> str:
        try:
            frames = [ln.split()[1].split("+")[0] for ln in Path(path).read_text().splitlines()]
        except OSError:
            return ""
        return " < ".join(frames[:4])

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            began = self.began
            if began is None or time.monotonic() - began < self.SLOW:
                continue
            stat = Path(f"/proc/self/task/{self.tid}/stat").read_text().rsplit(")", 1)[1].split()
            where = self._stack(f"/proc/self/task/{self.tid}/stack") or f"(running, state {stat[0]})"
            self.seen[f"mover: {where}"] += 1
            if self.qemu:
                with contextlib.suppress(OSError):
                    for t in os.listdir(f"/proc/{self.qemu}/task"):
                        comm = Path(f"/proc/{self.qemu}/task/{t}/comm").read_text().strip()
                        stack = self._stack(f"/proc/{self.qemu}/task/{t}/stack") or "(running)"
                        self.seen[f"{comm}: {stack}"] += 1

    def report(self, label: str) -> None:
        for what, n in self.seen.most_common(8):
            print(f"move-cost {label} slow-call samples {n}: {what}", flush=True)
        self.seen.clear()


SAMPLER = Sampler()  # idle until a call is slow


def move_all(pid: int, addr: int, size: int, node: int, chunk: int) -> list[float]:
    """Every page of [addr, addr+size) of ``pid`` to ``node``, ``chunk`` pages a call; each call's seconds."""
    took = []
    for start in range(addr, addr + size, chunk * PAGE):
        pages = list(range(start, min(addr + size, start + chunk * PAGE), PAGE))
        status = (c_int * len(pages))()
        targets = (c_int * len(pages))(*([node] * len(pages)))
        t0 = time.monotonic()
        SAMPLER.began = t0
        libnuma.sys_move_pages((c_void_p * len(pages))(*pages), targets, status, pid=pid)
        SAMPLER.began = None
        took.append(time.monotonic() - t0)
    return took


def measure(label: str, pid: int, addr: int, size: int, rounds: int) -> None:
    for chunk in (512, 4096):
        before = counters()
        calls: list[float] = []
        t0 = time.monotonic()
        for _ in range(rounds):
            calls += move_all(pid, addr, size, 1, chunk)
            calls += move_all(pid, addr, size, 0, chunk)
        whole = time.monotonic() - t0
        after = counters()
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        pages = 2 * rounds * size // PAGE
        print(f"move-cost {label} chunk {chunk}: {pages} pages in {whole:.2f} s "
              f"({whole / pages * 1e6:.0f} us/page); calls p50 {statistics.median(calls) * 1e3:.1f} ms, "
              f"max {max(calls) * 1e3:.1f} ms; kernel {delta}", flush=True)
        SAMPLER.report(f"{label} chunk {chunk}")


# x86-64 SysV (rdi = buffer, rsi = bytes): zero it with one rep stosb, as the kernel's
# clear_page_erms does a page, or with a loop of eight 8-byte stores per 64 bytes
# (clear_page_orig's shape).  Under TCG a rep instruction can take an interrupt after
# every iteration; a loop only between translation blocks.
_REP_STOSB = bytes([0x48, 0x89, 0xF1, 0x31, 0xC0, 0xF3, 0xAA, 0xC3])
_STORE_LOOP = bytes([0x31, 0xC0,  # xor eax, eax; then mov [rdi+8*i], rax for i in 0..7
                     0x48, 0x89, 0x07, *(b for i in range(1, 8) for b in (0x48, 0x89, 0x47, 8 * i)),
                     0x48, 0x83, 0xC7, 0x40, 0x48, 0x83, 0xEE, 0x40, 0x75, 0xD7, 0xC3])  # add, sub; jnz; ret


def local_timer_interrupts(cpu: int) -> int:
    for line in Path("/proc/interrupts").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "LOC:":
            return int(fields[1 + cpu])
    return 0


def stores(rounds: int) -> None:
    """Zeroing 16 MiB with rep stosb and with a store loop, on CPU 0, with the timer interrupts it took."""
    code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(_REP_STOSB + b"\x90" * (64 - len(_REP_STOSB)) + _STORE_LOOP)
    base = ctypes.addressof(ctypes.c_char.from_buffer(code))
    kinds = {"rep stosb": ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)(base),
             "store loop": ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t)(base + 64)}
    size = 16 * MiB
    buf = mmap.mmap(-1, size)
    buf.write(b"\1" * size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    os.sched_setaffinity(0, {0})
    clock = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip()
    for _ in range(rounds):
        for kind, fn in kinds.items():
            irq, t0 = local_timer_interrupts(0), time.monotonic()
            fn(addr, size)
            took = time.monotonic() - t0
            print(f"move-cost stores {kind}: 16 MiB in {took * 1e3:.0f} ms "
                  f"({took / 4096 * 1e6:.0f} us/page), "
                  f"{local_timer_interrupts(0) - irq} local timer interrupts on CPU 0 (clocksource {clock})",
                  flush=True)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def qmp(sock: str, command: str) -> object:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(sock)
        f = s.makefile("rw")
        json.loads(f.readline())
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
        return reply["return"]


def backend_range(pid: int) -> tuple[int, int]:
    """m0's mapping: the memfd backend bound to node 0 (numa_maps), its size from maps."""
    starts = [int(line.split()[0], 16) for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines()
              if "bind:0" in line and "memory-backend-memfd" in line]
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo in starts:
            return lo, hi - lo
    raise SystemExit("no memfd backend bound to node 0 in QEMU's maps")


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    print(f"move-cost: {rounds} round(s); guest CPUs {os.cpu_count()}; kernel command line "
          f"{Path('/proc/cmdline').read_text().split('virtme_console')[0].strip()!r}; the kernel's rep flags "
          f"{[f for f in ('erms', 'fsrm', 'rep_good') if f in flags.split()]}", flush=True)

    stores(3)
    fd = os.memfd_create("move-cost")
    os.ftruncate(fd, BACKEND * MiB)
    own = mmap.mmap(fd, BACKEND * MiB)
    own.write(b"\1" * (BACKEND * MiB))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(own))
    move_all(0, addr, BACKEND * MiB, 0, 4096)
    measure("own", 0, addr, BACKEND * MiB, rounds)

    sock = os.path.join(tempfile.mkdtemp(), "qmp.sock")
    backends = [f"memory-backend-memfd,id=m{n},size={BACKEND}M,prealloc=on,host-nodes={n},policy=bind"
                for n in (0, 1)]
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-smp", "4", "-m", f"{2 * BACKEND}",
            "-name", "adopted,debug-threads=on", "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off",
            "-object", backends[0], "-object", backends[1],
            "-numa", "node,nodeid=0,cpus=0-1,memdev=m0", "-numa", "node,nodeid=1,cpus=2-3,memdev=m1"]
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(sock) and time.monotonic() < deadline and qemu.poll() is None:
            time.sleep(0.5)
        qmp(sock, "query-status")
        lo, size = backend_range(qemu.pid)
        SAMPLER.qemu = qemu.pid
        # QEMU's bind policy would send pages back to node 0 only on a new fault; move_pages overrides it
        measure("paused", qemu.pid, lo, size, rounds)
        qmp(sock, "cont")
        print(f"move-cost: QEMU {qmp(sock, 'query-status')}", flush=True)
        measure("running", qemu.pid, lo, size, rounds)
        threads = {t: Path(f"/proc/{qemu.pid}/task/{t}/stat").read_text().split()[13:15]
                   for t in os.listdir(f"/proc/{qemu.pid}/task")}
        print(f"move-cost: QEMU threads' utime/stime {threads}", flush=True)
    finally:
        qemu.kill()
        qemu.wait()
    print("move-cost: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
