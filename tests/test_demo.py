"""make run's demo VM: real placement, and no CPU once it has made its passes.

The daemon runs exactly as ``make run`` starts it (``python -m kvmnumad.demo``)
and is observed from outside: /proc/PID/stat for its CPU time,
/proc/PID/task for the vCPU threads and their affinity, /proc/PID/numa_maps
for the guest memory, the bus for what the daemon says about them.
"""

from __future__ import annotations

import mmap
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmnumad.demo import DEMO_PASSES, DEMO_VCPUS, DEMO_VM
from tests.busfixtures import VM_IFACE, BusClient, CallFailed, DaemonProcess, busctl, daemon_process
from tests.observe import node_cpus, numa_maps_of_slot, thread_affinity
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
NAME = "org.kvmnuma1"
VM_PATH = f"/org/kvmnuma1/vm/{DEMO_VM}"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WINDOW = 3.0  # seconds of CPU time measured: 5 % of it is 15 ticks at CLK_TCK 100
MAX_SHARE = 0.05  # of one CPU


Demo = DaemonProcess


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """``python -m kvmnumad.demo`` as make run starts it; Ctrl-C stops it."""
    with daemon_process("kvmnumad.demo", tmp_path, stop=signal.SIGINT) as demo:
        yield demo


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (fields 14 and 15 of /proc/PID/stat), all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields after the command name start at 3
    return (int(fields[14 - 3]) + int(fields[15 - 3])) / CLK_TCK


def prop(address: str, name: str) -> Any:
    return busctl(address, "get-property", NAME, VM_PATH, VM_IFACE, name)["data"]


def test_demo_shows_placement_at_no_cpu(demo: Demo) -> None:
    client = BusClient(demo.address)
    try:
        def passes_done() -> dict[int, int] | None:
            try:
                _exits, vcpus, _pages, _dirty = client.vm(VM_PATH, "GetStats")
            except CallFailed as e:
                # the fixture returns once the bus name is owned; the demo makes its VM just after
                if e.name != "org.freedesktop.DBus.Error.UnknownObject":
                    raise
                return None
            # a vCPU is (vcpu, tid, cpu_time_ns, current_cpu, exits, progress)
            progress: dict[int, int] = {v[0]: v[5] for v in vcpus}
            done = len(progress) == DEMO_VCPUS and all(p == DEMO_PASSES for p in progress.values())
            return progress if done else None

        wait_until(passes_done, f"every demo vCPU to make its {DEMO_PASSES} passes", timeout=60)
    finally:
        client.close()

    before, started = cpu_seconds(demo.pid), time.monotonic()
    time.sleep(WINDOW)  # the measurement itself, not a wait for readiness
    used, elapsed = cpu_seconds(demo.pid) - before, time.monotonic() - started
    share = used / elapsed
    print(f"\ndemo daemon: {used:.2f} s CPU in {elapsed:.2f} s = {share:.1%} of one CPU")
    assert share < MAX_SHARE, f"{share:.1%} of one CPU; log:\n{demo.log.read_text()}"

    # Still there and placed: every vCPU thread, on CPUs of its guest node's host node ...
    node_map = prop(demo.address, "NodeMap")
    guest_node = {vcpu: node for vcpu, _bound, node in prop(demo.address, "VcpuNodes")}
    affinity = {vcpu: set(cpus) for vcpu, cpus in prop(demo.address, "VcpuAffinity")}
    threads = dict(prop(demo.address, "VcpuThreads"))
    assert sorted(threads) == list(range(DEMO_VCPUS)), threads
    for vcpu, tid in threads.items():
        with open(f"/proc/{demo.pid}/task/{tid}/comm") as f:
            assert f.read().strip() == f"vcpu{vcpu}"
        allowed = thread_affinity(demo.pid, tid)
        assert allowed == affinity[vcpu], (vcpu, allowed, affinity[vcpu])
        assert allowed <= node_cpus(node_map[guest_node[vcpu]]), (vcpu, allowed, node_map)
    # ... and every page of guest memory resident, bound to the region's host node.
    regions = prop(demo.address, "MemoryRegions")
    assert {guest for _slot, _gpa, _size, guest, _host in regions} == {0, 1}, regions
    for slot, _gpa, size, _guest, host in regions:
        entry = numa_maps_of_slot(DEMO_VM, slot, demo.pid)
        assert entry.policy == f"bind:{host}", entry.raw
        assert entry.pages_per_node == {host: size // mmap.PAGESIZE}, entry.raw
