"""Figure 5: Vm.set_vcpu_affinity / get_vcpu_affinity vs the bare syscalls on the same thread."""

from __future__ import annotations

import os
import time

from bench.report import Row
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions
from tests.observe import thread_affinity

BLOCK = 100


def _rate(calls: int, ns: int) -> float:
    return calls / (ns / 1e9)


def affinity(manager: Manager, plain: Manager, calls: int) -> list[Row]:
    """``plain`` is a Manager without cpusets, to tell the cgroup's share."""
    rows = _affinity(manager, calls, "")
    return rows[:2] + _affinity(plain, calls, ", Manager(cpusets=False)")[:1] + rows[2:]


def _affinity(manager: Manager, calls: int, label: str) -> list[Row]:
    vm = manager.create_vm("bench-aff", 4, 0, CreateOptions())
    try:
        tid = dict(vm.vcpu_threads())[0]
        online = sorted(os.sched_getaffinity(0))
        sets = [online[:1], online]  # alternate: every call really changes the mask
        k_set = r_set = k_get = r_get = k_same = r_same = 0
        for start in range(0, calls, BLOCK):
            n = min(BLOCK, calls - start)
            t0 = time.perf_counter_ns()
            for i in range(n):
                vm.set_vcpu_affinity(0, sets[i & 1])
            t1 = time.perf_counter_ns()
            for i in range(n):
                os.sched_setaffinity(tid, sets[i & 1])
            t2 = time.perf_counter_ns()
            for _ in range(n):
                vm.get_vcpu_affinity(0)
            t3 = time.perf_counter_ns()
            for _ in range(n):
                os.sched_getaffinity(tid)
            t4 = time.perf_counter_ns()
            for _ in range(n):  # the same pin again: the cpuset is unchanged, so no cgroup I/O
                vm.set_vcpu_affinity(0, sets[0])
            t5 = time.perf_counter_ns()
            for _ in range(n):
                os.sched_setaffinity(tid, sets[0])
            t6 = time.perf_counter_ns()
            k_same += t5 - t4
            r_same += t6 - t5
            k_set += t1 - t0
            r_set += t2 - t1
            k_get += t3 - t2
            r_get += t4 - t3
        vm.set_vcpu_affinity(0, sets[0])
        seen = thread_affinity(os.getpid(), tid)
        if seen != set(sets[0]):
            raise RuntimeError(f"/proc shows vCPU 0 thread {tid} on {seen}, set {sets[0]}")
        cg = "with cpuset cgroup writes" if vm.cpuset is not None else "no cpuset cgroup"
    finally:
        manager.destroy_vm("bench-aff")
    return [
        Row(f"Vm.set_vcpu_affinity{label}, calls/s", _rate(calls, k_set), _rate(calls, r_set), "calls/s",
            f"vs os.sched_setaffinity(tid) on the same vCPU thread, {calls} calls alternating "
            f"{sets[0]}/{sets[1]}; kvmnumad validates, {cg}, logs and emits; checked in /proc",
            higher_is_better=True),
        Row(f"Vm.set_vcpu_affinity{label}, same CPUs again, calls/s", _rate(calls, k_same),
            _rate(calls, r_same), "calls/s",
            f"vs os.sched_setaffinity(tid) with the same set, {calls} calls of {sets[0]}; {cg} (unchanged: "
            "no cgroup write, goal <= 10x)", higher_is_better=True),
        Row("Vm.get_vcpu_affinity, calls/s", _rate(calls, k_get), _rate(calls, r_get), "calls/s",
            "vs os.sched_getaffinity(tid): kvmnumad reads the kernel, no cache", higher_is_better=True),
    ]
