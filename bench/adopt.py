"""Issue 15's figure: from the adopt call to every vCPU thread pinned, on a real QEMU.

``python -m bench.adopt [--runs N]``.  QEMU (-accel kvm -S, 4 vCPUs, 256 MiB)
is started afresh for each run; Manager.adopt_process with policy
local-first discovers it from /proc and pins every vCPU thread to its guest
node's host CPUs, and the run ends when sched_getaffinity of each
``CPU n/KVM`` thread (read here) shows it.  The baseline, in the same run on
the same QEMU, is what a script does by hand: list /proc/PID/task, read each
comm, sched_setaffinity each vCPU thread.  The ratio says what discovery,
checks and bookkeeping cost on top of the syscalls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.report import Row, median, percentile, table
from kvmnumad.adopt.discovery import AdoptOptions
from kvmnumad.manager import Manager
from kvmnumad.model import Policy

VCPUS = 4


def _qemu() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "kvm", "-smp", str(VCPUS), "-m", "256",
         "-name", "bench,debug-threads=on", "-nodefaults", "-display", "none", "-S"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(_by_hand_tids(proc.pid)) < VCPUS:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("QEMU did not start its vCPU threads")
        time.sleep(0.02)
    return proc


def _by_hand_tids(pid: int) -> list[int]:
    tids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text()
        except FileNotFoundError:
            continue
        if comm.startswith("CPU ") and comm.rstrip().endswith("/KVM"):
            tids.append(int(tid))
    return tids


def adopt_to_pinned(runs: int) -> list[Row]:
    manager = Manager(cpusets=False)
    target = manager.topology().cpus_of_node(0)
    ours: list[float] = []
    floor: list[float] = []
    try:
        for i in range(runs):
            q = _qemu()
            try:
                t0 = time.perf_counter()
                vm = manager.adopt_process(q.pid, AdoptOptions(name=f"b{i}", policy=Policy.LOCAL_FIRST))
                tids = [tid for _v, tid in vm.vcpu_threads()]
                if not all(os.sched_getaffinity(t) == target for t in tids):
                    raise RuntimeError("adopt returned before every vCPU was pinned")
                ours.append((time.perf_counter() - t0) * 1e6)
                manager.release_vm(vm.name)
                t0 = time.perf_counter()
                for tid in _by_hand_tids(q.pid):
                    os.sched_setaffinity(tid, target)
                floor.append((time.perf_counter() - t0) * 1e6)
            finally:
                q.kill()
                q.wait()
    finally:
        manager.shutdown()
    note = (f"{runs} runs, QEMU -accel kvm -S with {VCPUS} vCPUs; "
            "baseline: /proc comm scan + sched_setaffinity")
    return [
        Row("adopt a QEMU to all vCPUs pinned, p50", median(ours), median(floor), "us", note, bench="adopt"),
        Row("adopt a QEMU to all vCPUs pinned, p99", percentile(ours, 99), percentile(floor, 99), "us", note,
            bench="adopt"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.adopt", description=__doc__)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args(argv)
    print(table(adopt_to_pinned(args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
