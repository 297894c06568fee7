"""Figures 1 and 2: VM create+destroy, vCPU stop and VM destroy latency."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import ExitStack
from typing import Any

from bench import rawkvm
from bench.report import Row, median, percentile, timed_us
from kvmnumad.kvm.runner import VcpuRunner
from kvmnumad.kvm.system import Kvm
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions
from kvmnumad.vm.region import GuestRegion
from tests.observe import open_fds, thread_ids

MiB = 1 << 20
VCPUS = 4
REGION = 8 * MiB
SETTLE = 0.003  # the vCPU is surely inside KVM_RUN on jmp $ after this
SHAPE = f"{VCPUS} vCPUs, 2 x {REGION // MiB} MiB, 2 guest nodes"


def _raw_nodes(manager: Manager) -> list[int]:
    """The host nodes kvmnumad maps 2 guest nodes to (wrapped on a 1-node host)."""
    hosts = manager.host_nodes()
    return [hosts[i % len(hosts)] for i in range(2)]


def create_destroy(manager: Manager, plain: Manager, kvm_fd: int, runs: int) -> list[Row]:
    """Alternating runs, so both sides see the same machine load; one warm-up each.
    ``plain`` is a Manager without cpusets: the third column of each run."""
    opts = CreateOptions(numa_nodes=2)
    nodes = _raw_nodes(manager)
    k_create: list[float] = []
    k_destroy: list[float] = []
    r_create: list[float] = []
    r_destroy: list[float] = []
    plain_both: list[float] = []
    before: tuple[set[int], set[int]] = (set(), set())
    for i in range(runs + 1):
        if i == 1:  # after the warm-up: /dev/kvm, opened once by the Manager, stays open
            before = (open_fds(), thread_ids())
        t0 = time.perf_counter_ns()
        manager.create_vm("bench-cd", VCPUS, 2 * REGION, opts)
        t1 = time.perf_counter_ns()
        manager.destroy_vm("bench-cd")
        t2 = time.perf_counter_ns()
        raw = rawkvm.RawVm.create(kvm_fd, VCPUS, REGION, nodes)
        t3 = time.perf_counter_ns()
        raw.close()
        t4 = time.perf_counter_ns()
        plain.create_vm("bench-cd", VCPUS, 2 * REGION, opts)
        plain.destroy_vm("bench-cd")
        t5 = time.perf_counter_ns()
        if i:
            plain_both.append((t5 - t4) / 1000)
            k_create.append((t1 - t0) / 1000)
            k_destroy.append((t2 - t1) / 1000)
            r_create.append((t3 - t2) / 1000)
            r_destroy.append((t4 - t3) / 1000)
    leaked = (open_fds() - before[0], thread_ids() - before[1])
    if any(leaked):
        raise RuntimeError(f"create/destroy left fds {leaked[0]} threads {leaked[1]} behind")
    both_k = [c + d for c, d in zip(k_create, k_destroy, strict=True)]
    both_r = [c + d for c, d in zip(r_create, r_destroy, strict=True)]
    extra = "kvmnumad also makes a 1 MiB boot slot, 4 parked vCPU threads and a cpuset"
    return [
        Row(f"VM create+destroy ({SHAPE}), median", median(both_k), median(both_r), "us",
            f"Manager.create_vm/destroy_vm vs raw ioctls (ctypes), {runs} alternating runs; {extra}"),
        Row("  same, Manager(cpusets=False), median", median(plain_both), median(both_r), "us",
            "the cpuset cgroup's share is the difference to the row above"),
        Row("  create only, median", median(k_create), median(r_create), "us",
            "KVM_CREATE_VM, memfd+mmap+mbind+SET_USER_MEMORY_REGION x2, CREATE_VCPU+mmap x4"),
        Row("  destroy only, median", median(k_destroy), median(r_destroy), "us",
            "kvmnumad joins its vCPU threads and waits for them to leave /proc; raw closes fds"),
    ]


def stop_latency(kvm_fd: int, runs: int) -> list[Row]:
    """VcpuRunner.stop() on a guest spinning in KVM_RUN vs a hand-made kick of a raw vCPU thread."""
    k: list[float] = []
    raw_rt: list[float] = []
    raw_oneway: list[float] = []
    with ExitStack() as stack:
        kvm = stack.enter_context(Kvm())
        vm = stack.enter_context(kvm.create_vm())
        boot = stack.enter_context(GuestRegion("bench-stop", rawkvm.BOOT_SIZE))
        boot.write(rawkvm.ENTRY, rawkvm.SPIN)
        vm.set_user_memory_region(0, 0, rawkvm.BOOT_SIZE, boot.hva, 0)
        vcpu = stack.enter_context(vm.create_vcpu(0))
        vcpu.setup_flat32(rawkvm.ENTRY)
        runner = VcpuRunner(vcpu, 0)
        stack.callback(runner.close)
        kicker = rawkvm.RawKicker(kvm_fd)
        stack.callback(kicker.close)
        missed = 0
        for i in range(runs + 1):
            kicks = runner.exit_counts().get("intr", 0)
            runner.start()
            rawkvm.wait_for(lambda: runner.state == "running")
            time.sleep(SETTLE)
            t = timed_us(runner.stop)
            if runner.exit_counts().get("intr", 0) == kicks:
                missed += 1  # stopped before it entered KVM_RUN: not a kick, not a sample
                continue
            one, rt = kicker.kick(SETTLE)
            if i:
                k.append(t)
                raw_rt.append(rt)
                raw_oneway.append(one)
        if runner.state != "stopped" or len(k) < runs // 2:
            raise RuntimeError(f"runner not kicked: {runner.exit_counts()} {runner.state}, {missed} missed")
    note = (f"{len(k)} stops of 1 vCPU on jmp $ (in KVM_RUN, {missed} not yet: dropped) vs pthread_kill + "
            f"KVM_RUN EINTR + Event back to the kicker (one way, signal to EINTR seen in the vCPU thread: "
            f"median {median(raw_oneway):.0f} us)")
    return [
        Row("vCPU stop latency, median", median(k), median(raw_rt), "us", note),
        Row("vCPU stop latency, p99", percentile(k, 99), percentile(raw_rt, 99), "us", "same samples"),
    ]


def _payload(path: str, stack: ExitStack) -> Any:
    """The payload option as this core takes it: an open file (the bus passes an fd) or, before, a path."""
    if "OpenFile" in str(CreateOptions.__dataclass_fields__["payload"].type):
        return stack.enter_context(open(path, "rb"))  # closed by the stack
    return path


def destroy_latency(manager: Manager, kvm_fd: int, runs: int) -> list[Row]:
    """Destroy of a running VM (4 vCPUs inside KVM_RUN) vs kick + join + close of a raw one."""
    nodes = _raw_nodes(manager)
    k: list[float] = []
    r: list[float] = []
    fd, path = tempfile.mkstemp(prefix="bench-spin-", suffix=".bin")
    stack = ExitStack()
    try:
        os.write(fd, rawkvm.SPIN)
        os.close(fd)
        opts = CreateOptions(numa_nodes=2, payload=_payload(path, stack), start=True)
        for i in range(runs + 1):
            manager.create_vm("bench-dl", VCPUS, 2 * REGION, opts)
            time.sleep(SETTLE * 5)
            t = timed_us(lambda: manager.destroy_vm("bench-dl"))
            raw = rawkvm.RawVm.create(kvm_fd, VCPUS, REGION, nodes, boot=rawkvm.SPIN)
            raw.start()
            time.sleep(SETTLE * 5)
            tr = timed_us(raw.close)
            if i:
                k.append(t)
                r.append(tr)
    finally:
        stack.close()
        os.unlink(path)
    note = f"{runs} runs; 4 vCPUs spinning in the guest; raw: immediate_exit + pthread_kill x4, join, close"
    return [
        Row("running VM destroy latency, median", median(k), median(r), "us", note),
        Row("running VM destroy latency, p99", percentile(k, 99), percentile(r, 99), "us", "same samples"),
    ]
