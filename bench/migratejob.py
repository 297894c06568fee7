"""Issue 14: the throughput of a memory migration job against numactl's ``migratepages``.

kvmnumad: Manager.start_migration of a 64 MiB guest node (policy pointed at
the destination, then move_pages in chunks on the worker pool) until the job
ends, timed from the call to its end.  Baseline, same run: ``migratepages
PID FROM TO`` on a plain helper process holding an equal memfd region
(shmem, as guest memory is), every page touched first; it includes starting
migratepages and moves the helper's whole process (its Python heap too, a
few MiB), which is what an administrator moving a plain process gets.

Both regions are touched before the first move (untouched memory migrates
faster, which would fake a win), the direction alternates A->B, B->A, and
which of the two goes first alternates from move to move.  Every move is
checked in numa_maps (all pages on the destination) before the next.  The
VM is not started: its vCPU threads would share the CPUs with the move.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.migrate import _HELPER, _on_node
from bench.report import Row, median, timed_us
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, JobState, Policy

MiB = 1 << 20
SIZE = 64 * MiB
NEEDS = "needs 2 host nodes: run `python -m bench.guest` (boots a 4-node QEMU guest)"


def migrate_job(manager: Manager, runs: int) -> list[Row]:
    hosts = manager.host_nodes()
    if len(hosts) < 2:
        return [Row("migration job throughput, 64 MiB", None, None, "MiB/s", NEEDS, higher_is_better=True)]
    a, b = hosts[0], hosts[1]
    job_s: list[float] = []
    tool_s: list[float] = []
    opts = CreateOptions(numa_nodes=1, policy=Policy.MANUAL, host_nodes=(a,), prealloc=True)
    vm = manager.create_vm("bench-job", 1, SIZE, opts)
    helper = None
    try:
        region = vm.memory_regions()[0]
        _on_node(region.hva, a)
        helper = subprocess.Popen(
            ["numactl", f"--membind={a}", sys.executable, "-c", _HELPER.format(size=SIZE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert helper.stdout is not None
        helper_addr = int(helper.stdout.readline())
        _on_node(helper_addr, a, helper.pid)
        pid = helper.pid

        def by_job(dst: int) -> None:
            t0 = time.perf_counter()
            status = manager.start_migration("bench-job", 0, dst).wait(300)
            job_s.append(time.perf_counter() - t0)
            if status.state != JobState.DONE or status.pages_moved != SIZE // 4096:
                raise RuntimeError(f"migration job: {status}")
            _on_node(region.hva, dst)

        def by_tool(src: int, dst: int) -> None:
            tool_s.append(timed_us(lambda: subprocess.run(["migratepages", str(pid), str(src), str(dst)],
                                                          check=True)) / 1e6)
            _on_node(helper_addr, dst, pid)

        for i in range(2 * runs):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            if (i // 2) % 2 == 0:
                by_job(dst)
                by_tool(src, dst)
            else:
                by_tool(src, dst)
                by_job(dst)
    finally:
        if helper is not None:
            helper.kill()
            helper.wait()
        manager.destroy_vm("bench-job")
    mib = SIZE / MiB
    return [
        Row("migration job throughput, 64 MiB guest node, median", mib / median(job_s), mib / median(tool_s),
            "MiB/s",
            f"Manager.start_migration to the job's end (chunks of {manager.migration_chunk_pages} pages) vs "
            f"`migratepages PID {a} {b}` on a helper holding an equal touched memfd; {len(job_s)} moves "
            "each, directions and which goes first alternating; every move checked in numa_maps",
            higher_is_better=True),
    ]
