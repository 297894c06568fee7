"""Figure 3: what a VM whose vCPUs are all halted costs, in process CPU time."""

from __future__ import annotations

import time

import psutil

from bench import rawkvm
from bench.report import Row
from kvmnumad.kvm.payload import TOUCH_PAYLOAD  # guest bytes only: the same guest on both sides
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions

MiB = 1 << 20
RSI = 4  # kvm_regs index: the payload's vCPU number (base, size, passes stay 0: OUT, OUT, HLT forever)


def _cpu_percent(window: float) -> tuple[float, float]:
    """Process CPU time (all threads) over ``window`` s, in % of one CPU: by
    CLOCK_PROCESS_CPUTIME_ID (ns resolution) and by psutil (clock ticks:
    10 ms, i.e. 0.1 % of a 10 s window, too coarse alone for a 0.1 % goal)."""
    proc = psutil.Process()
    c0 = proc.cpu_times()  # psutil reads /proc: outside the precise window
    t0, p0 = time.monotonic_ns(), time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID)
    time.sleep(window)
    p1, t1 = time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID), time.monotonic_ns()
    c1 = proc.cpu_times()
    ticks = (c1.user + c1.system) - (c0.user + c0.system)
    return 100 * (p1 - p0) / (t1 - t0), float(100 * ticks * 1e9 / (t1 - t0))


def _wait_states(manager: Manager, name: str, state: str, timeout: float = 10.0) -> None:
    vm = manager.get_vm(name)
    deadline = time.monotonic() + timeout
    while not all(s == state for s in vm.runner_states()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"vCPUs of {name} not all {state}: {vm.runner_states()}")
        time.sleep(0.02)


def idle_cost(manager: Manager, kvm_fd: int, window: float, hlt_window: float) -> list[Row]:
    baseline, baseline_ps = _cpu_percent(window)
    manager.create_vm("bench-idle", 4, 16 * MiB, CreateOptions(numa_nodes=2, passes=1, start=True))
    try:
        _wait_states(manager, "bench-idle", "halted")
        halted, halted_ps = _cpu_percent(window)
    finally:
        manager.destroy_vm("bench-idle")
    rows = [
        Row("idle VM (4 vCPUs halted), CPU", halted, baseline, "% of 1 CPU",
            f"process CPU time (CLOCK_PROCESS_CPUTIME_ID) over {window:.0f} s; baseline: same process, "
            f"no VM, {window:.0f} s just before; excess {halted - baseline:+.5f} points (goal < 0.1); "
            f"psutil agrees: {halted_ps:.2f} vs {baseline_ps:.2f} (10 ms ticks)"),
    ]
    if hlt_window > 0:
        # A guest OS idles in HLT without an irqchip: each HLT exits to user space, which sleeps
        # idle_interval (50 ms) and re-enters.  Empty memory: the payload loop is just OUT, OUT, HLT.
        manager.create_vm("bench-hlt", 4, 0, CreateOptions(start=True))
        try:
            hlt, _ = _cpu_percent(hlt_window)
            exits = manager.get_vm("bench-hlt").stats().exits
        finally:
            manager.destroy_vm("bench-hlt")
        # Baseline: the same payload in 4 raw vCPU threads looping on KVM_RUN by hand.
        raw = rawkvm.RawVm.create(kvm_fd, 4, 0, [], boot=TOUCH_PAYLOAD)
        try:
            raw.start(lambda i: {RSI: i}, idle=0.05)
            raw_hlt, _ = _cpu_percent(hlt_window)
        finally:
            raw.close()
        rate = exits.get("hlt", 0) / hlt_window
        rows.append(Row("HLT-idle VM (4 vCPUs, HLT every 50 ms), CPU", hlt, raw_hlt, "% of 1 CPU",
                        f"{hlt_window:.0f} s; about {rate:.0f} HLT exits/s (each after 2 I/O exits); "
                        "baseline: the same payload in 4 raw threads looping KVM_RUN, 50 ms sleep per HLT"))
    return rows
