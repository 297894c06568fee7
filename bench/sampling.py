"""Issue 14: what one optimizer sample costs the daemon, 64 VMs x 4 vCPUs x 2 guest nodes.

The cost is CPU time of the sampling thread (CLOCK_THREAD_CPUTIME_ID: its
system time included, so numa_maps' page-table walk counts), median and p99
of repeated samples.  The baseline, measured in the same run on the same
VMs, is the floor any sampler pays for the same figures: one bare read of
every vCPU's schedstat (and of the process's numa_maps), parsed by nothing.
Three kvmnumad rows: idle VMs (their vCPUs halted after one pass: the
timer's steady case, a schedstat through its kept fd and an affinity per
vCPU, numa_maps only when residency may have changed); the same sampler
when every vCPU counts as having run since the last take (busy VMs: stat
and sched too, through kept fds); and a new sampler's first take, every
figure read afresh (numa_maps, and each file opened).
The issue's goal is under 5 ms per sample; the rows say the absolute figure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from bench.report import Row, median, percentile
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from kvmnumad.optimizer.sample import RESIDENCY_EVERY, Sampler

MiB = 1 << 20
VMS, VCPUS, NODES = 64, 4, 2


def _cpu_ms(action: Callable[[], object]) -> float:
    t0 = time.thread_time_ns()
    action()
    return (time.thread_time_ns() - t0) / 1e6


def _schedstats(tids: list[int], files: tuple[str, ...] = ("schedstat",)) -> None:
    for tid in tids:
        for name in files:
            fd = os.open(f"/proc/self/task/{tid}/{name}", os.O_RDONLY)
            os.read(fd, 256 if name == "schedstat" else 4096)
            os.close(fd)


def _floor(tids: list[int]) -> None:
    _schedstats(tids)
    fd = os.open("/proc/self/numa_maps", os.O_RDONLY)
    while os.read(fd, 1 << 16):
        pass
    os.close(fd)


def sampling(manager: Manager, runs: int) -> list[Row]:
    names = [f"bench-sample-{i}" for i in range(VMS)]
    made: list[str] = []
    try:
        for name in names:
            manager.create_vm(name, VCPUS, NODES * 4 * MiB,
                              CreateOptions(numa_nodes=NODES, policy=Policy.MANUAL, passes=1, start=True,
                                            prealloc=True))
            made.append(name)
        vms = [vm for vm in manager.list_vms() if vm.name in set(made)]
        tids = [tid for vm in vms for _, tid in vm.vcpu_threads()]
        _wait_halted(manager, made)
        topo = manager.topology()
        steady = Sampler(keep_open=True)  # as the timer's (Manager's): its files stay open
        try:
            steady.take(vms, topo)  # the first sample reads everything; the timer's next ones need not
            idle = [_cpu_ms(lambda: steady.take(vms, topo)) for _ in range(runs)]
            ran = []
            for _ in range(runs):
                steady.rerun()
                ran.append(_cpu_ms(lambda: steady.take(vms, topo)))
        finally:
            steady.close()
        fresh = [_cpu_ms(lambda: Sampler().take(vms, topo)) for _ in range(runs)]
        floor = [_cpu_ms(lambda: _floor(tids)) for _ in range(runs)]
        floor_vcpus = [_cpu_ms(lambda: _schedstats(tids)) for _ in range(runs)]
        floor_ran = [_cpu_ms(lambda: _schedstats(tids, ("schedstat", "stat", "sched"))) for _ in range(runs)]
    finally:
        for name in made:
            manager.destroy_vm(name)
    shape = f"{VMS} VMs x {VCPUS} vCPUs x {NODES} guest nodes ({len(tids)} vCPU threads)"
    mean = sum(idle) / len(idle)
    return [
        Row("optimizer sample, idle VMs (the timer's steady case), CPU", median(idle), median(floor_vcpus),
            "ms",
            f"{shape}; mean {mean:.2f} ms with a numa_maps read every {RESIDENCY_EVERY}th sample, p99 "
            f"{percentile(idle, 99):.2f} ms (goal: under 5 ms); {runs} samples; baseline: one bare read of "
            "each vCPU's schedstat"),
        Row("optimizer sample, every vCPU ran since the last (files kept), CPU", median(ran),
            median(floor_ran), "ms",
            f"{shape}; p99 {percentile(ran, 99):.2f} ms; the timer's sampler when every vCPU ran (busy VMs: "
            "schedstat, stat and sched of each; numa_maps as above); baseline: one bare read of each vCPU's "
            "schedstat, stat and sched"),
        Row("optimizer sample, every figure read (numa_maps included), CPU", median(fresh), median(floor),
            "ms",
            f"{shape}; p99 {percentile(fresh, 99):.2f} ms; baseline: one bare read of each schedstat and of "
            "numa_maps, the floor of the same figures (numa_maps alone grows with all the process's "
            "mappings: a stack, guard and kvm_run per vCPU thread)"),
    ]


def _wait_halted(manager: Manager, names: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for name in names:
        vm = manager.get_vm(name)
        while not all(s == "halted" for s in vm.runner_states()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"vCPUs of {name} not halted: {vm.runner_states()}")
            time.sleep(0.02)
