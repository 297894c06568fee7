"""Figure 6: moving a 64 MiB guest node between host nodes (needs 2+ host nodes).

Every region is touched before the first move (memory never touched
migrates about 2x slower and would fake a win for whoever goes second), and
the order of the three rotates from move to move.

kvmnumad: Vm.map_numa_node (mbind MPOL_MF_MOVE on the memfd region).
Baselines, same run: the same mbind by hand on a same-size memfd in this
process, and numactl's ``migratepages PID FROM TO`` on a helper process
holding a same-size memfd buffer (that one moves the helper's whole process
and includes starting migratepages: the figure a operator would get).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial

from bench import rawkvm
from bench.report import Row, median, timed_us
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from tests.observe import numa_maps_at

MiB = 1 << 20
SIZE = 64 * MiB
PAGES = SIZE // 4096
MOVE = rawkvm.MPOL_MF_MOVE | rawkvm.MPOL_MF_STRICT
NEEDS = "needs 2 host nodes: run `python -m bench.guest` (boots a 2-node QEMU guest)"

_HELPER = """
import mmap, os, sys
fd = os.memfd_create("bench-migrate")
os.ftruncate(fd, {size})
m = mmap.mmap(fd, {size})
for off in range(0, {size}, 4096):
    m[off] = 1
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, flush=True)
sys.stdin.read()
"""


def _on_node(addr: int, node: int, pid: int | None = None) -> None:
    """Independent check: numa_maps shows every page of the mapping on ``node``."""
    entry = numa_maps_at(addr, pid)
    if entry.pages_per_node != {node: PAGES}:
        raise RuntimeError(f"numa_maps at {addr:#x}: {entry.raw}, expected N{node}={PAGES}")


def unavailable() -> list[Row]:
    return [Row("memory migration, 64 MiB between nodes", None, None, "ms", NEEDS)]


def migrate(manager: Manager, runs: int) -> list[Row]:
    hosts = manager.host_nodes()
    if len(hosts) < 2:
        return unavailable()
    a, b = hosts[0], hosts[1]
    k: list[float] = []
    raw: list[float] = []
    tool: list[float] = []
    opts = CreateOptions(numa_nodes=2, policy=Policy.MANUAL, host_nodes=(a, b), prealloc=True)
    vm = manager.create_vm("bench-mig", 2, 2 * SIZE, opts)
    fd = os.memfd_create("bench-raw-migrate", os.MFD_CLOEXEC)
    helper = None
    try:
        vm.map_numa_node(0, a)
        region = next(r for r in vm.memory_regions() if r.guest_node == 0)
        _on_node(region.hva, a)
        os.ftruncate(fd, SIZE)
        hva = rawkvm.mmap_shared(fd, SIZE)
        rawkvm.mbind(hva, SIZE, a)
        ctypes.memset(hva, 1, SIZE)
        _on_node(hva, a)
        helper = subprocess.Popen(
            ["numactl", f"--membind={a}", sys.executable, "-c", _HELPER.format(size=SIZE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert helper.stdout is not None
        helper_addr = int(helper.stdout.readline())
        _on_node(helper_addr, a, helper.pid)
        for i in range(2 * runs):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            cmd = ["migratepages", str(helper.pid), str(src), str(dst)]
            steps: list[tuple[list[float], Callable[[], object], Callable[[], object]]] = [
                (k, partial(vm.map_numa_node, 0, dst), partial(_on_node, region.hva, dst)),
                (raw, partial(rawkvm.mbind, hva, SIZE, dst, MOVE), partial(_on_node, hva, dst)),
                (tool, partial(subprocess.run, cmd, check=True),
                 partial(_on_node, helper_addr, dst, helper.pid)),
            ]
            # whoever goes first may find colder caches: rotate the order every move
            for samples, move, check in steps[i % 3:] + steps[:i % 3]:
                samples.append(timed_us(move) / 1000)
                check()
        rawkvm.munmap(hva, SIZE)
    finally:
        os.close(fd)
        if helper is not None:
            helper.kill()
            helper.wait()
        manager.destroy_vm("bench-mig")
    n = len(k)
    return [
        Row("memory migration, 64 MiB guest node, median", median(k), median(raw), "ms",
            f"Vm.map_numa_node vs mbind(MPOL_BIND, MPOL_MF_MOVE) by hand on a 64 MiB memfd; "
            f"{n} moves alternating node {a}<->{b}, all regions touched first, the order of the three "
            "rotated every move; every move checked in numa_maps"),
        Row("  vs numactl migratepages, median", median(k), median(tool), "ms",
            f"`migratepages PID {a} {b}` on a helper holding a 64 MiB memfd (moves its whole process; "
            "includes exec of migratepages)"),
    ]
