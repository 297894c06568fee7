"""Issue 3 acceptance on this host's real /dev/kvm (one NUMA node).

Every placement claim is read back from outside kvmnumad's bookkeeping:
taskset / /proc for threads, /proc/PID/numa_maps for memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil
import pytest

from kvmnumad import errors
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, VmState
from kvmnumad.vm import Vm
from tests.observe import (
    numa_maps,
    numa_maps_at,
    online_cpus,
    open_fds,
    taskset_affinity,
    thread_affinity,
    thread_ids,
)
from tests.waiting import wait_until

MiB = 1 << 20
PAGE = 4096


def _vm(manager: Manager, name: str = "core", *, passes: int = 1, start: bool = True,
        memory: int = 128 * MiB, vcpus: int = 4, nodes: int = 2) -> Vm:
    return manager.create_vm(name, vcpus, memory, CreateOptions(numa_nodes=nodes, passes=passes, start=start))


def test_vm_runs_payload_and_placement_is_real(manager: Manager) -> None:
    vm = _vm(manager)
    wait_until(lambda: all(s == "halted" for s in vm.runner_states()), "every vCPU to halt")
    # the payload ran: progress port reached its pass count, serial bytes arrived
    assert vm.progress() == [1, 1, 1, 1]
    assert sorted(vm.serial_output()) == sorted(b"0123")
    # every vCPU thread is pinned as declared, per the kernel (taskset)
    cpus = online_cpus()
    for vcpu, tid in vm.vcpu_threads():
        assert taskset_affinity(tid) == set(vm.declared_vcpu_affinity()[vcpu][1] or cpus)
    vm.set_vcpu_affinity(0, [1])
    vm.bind_vcpu_to_numa_node(3, 1)
    tids = dict(vm.vcpu_threads())
    assert taskset_affinity(tids[0]) == {1}
    assert thread_affinity(os.getpid(), tids[3]) == {0, 1}  # host node 0 = CPUs 0-1 here
    assert vm.get_vcpu_numa_node(3) == (True, 1)
    assert vm.get_vcpu_affinity(0) == [1]
    # each region's pages sit on its bound host node, per numa_maps
    regions = vm.memory_regions()
    assert [(r.guest_node, r.size) for r in regions] == [(0, 64 * MiB), (1, 64 * MiB)]
    for r in regions:
        entry = numa_maps_at(r.hva)
        assert entry.policy.startswith("bind:") and entry.policy.split(":")[1] == str(r.host_node), entry.raw
        assert entry.pages_per_node.get(r.host_node, 0) == r.size // PAGE, entry.raw
        assert entry.file is not None and "memfd:kvmnumad-core" in entry.file
    # the dirty log saw every page the payload touched, once; the count is a
    # running total, so a second read (the VM halted) gives the same figure
    for r in regions:
        assert vm.dirty_pages(r.slot) == r.size // PAGE
        assert vm.dirty_pages(r.slot) == r.size // PAGE
    stats = vm.stats()
    assert stats.exits.get("io", 0) == 4 * 3, stats.exits  # progress, serial, done per vCPU
    assert stats.pages_per_host_node == {0: 2 * 64 * MiB // PAGE}


def test_progress_rises_while_running(manager: Manager) -> None:
    vm = _vm(manager, passes=0, memory=8 * MiB)
    wait_until(lambda: min(vm.progress()) >= 3, "3 passes on every vCPU")
    first = vm.progress()
    wait_until(lambda: all(b > a for a, b in zip(first, vm.progress(), strict=True)),
               "every vCPU to progress further")
    t = time.monotonic()
    vm.stop()
    assert time.monotonic() - t < 1.0
    assert vm.state == VmState.STOPPED
    stopped = vm.progress()
    time.sleep(0.2)
    assert vm.progress() == stopped  # parked: the guest makes no progress
    vm.start()
    wait_until(lambda: min(vm.progress()) > max(stopped), "every vCPU to progress after start")


def _snapshot() -> tuple[set[int], int]:
    return open_fds(), len(thread_ids())


def _bad_calls(vm: Vm) -> list[tuple[Callable[[], object], type[errors.KvmnumaError], str]]:
    big = 1 << 50
    return [
        (lambda: vm.setup_numa_memory(2, 4 * MiB, 512 * MiB), errors.NodeOutOfRange, "guest node 2"),
        (lambda: vm.setup_numa_memory(0, 0, 512 * MiB), errors.InvalidArgument, "size 0"),
        (lambda: vm.setup_numa_memory(0, 4 * MiB + 1, 512 * MiB), errors.InvalidArgument, "4194305"),
        (lambda: vm.setup_numa_memory(0, 4 * MiB, 512 * MiB + 1), errors.InvalidArgument, "0x20000001"),
        (lambda: vm.setup_numa_memory(0, 4 * MiB, 0x1000), errors.Overlap, "boot slot"),
        (lambda: vm.setup_numa_memory(0, 4 * MiB, 2 * MiB), errors.Overlap, "slot 1"),
        (lambda: vm.setup_numa_memory(1, big, 1 << 40), errors.InsufficientMemory, str(big)),
        (lambda: vm.set_vcpu_affinity(7, [0]), errors.NoSuchVcpu, "vCPU 7"),
        (lambda: vm.set_vcpu_affinity(0, []), errors.InvalidArgument, "empty"),
        (lambda: vm.set_vcpu_affinity(0, [0, 99]), errors.InvalidArgument, "CPU 99 does not exist"),
        (lambda: vm.bind_vcpu_to_numa_node(0, 5), errors.NodeOutOfRange, "guest node 5"),
        (lambda: vm.bind_vcpu_to_numa_node(9, 0), errors.NoSuchVcpu, "vCPU 9"),
        (lambda: vm.map_numa_node(0, 7), errors.NodeOutOfRange, "host node 7"),
        (lambda: vm.map_numa_node(3, 0), errors.NodeOutOfRange, "guest node 3"),
        (lambda: vm.enable_numa(0), errors.InvalidArgument, "at least 1"),
        (lambda: vm.enable_numa(4), errors.Busy, "memory region"),
        (vm.disable_numa, errors.Busy, "cannot be disabled"),
        (lambda: vm.get_vcpu_numa_node(4), errors.NoSuchVcpu, "vCPU 4"),
    ]


def _kernel_view(vm: Vm) -> tuple[list[tuple[int, str, str]], dict[int, set[int]]]:
    """What the kernel says of a VM: its guest-memory mappings (start, policy, memfd) from
    numa_maps, and each vCPU thread's affinity from taskset."""
    mappings = [(e.start, e.policy, e.file) for e in numa_maps()
                if e.file is not None and f"memfd:kvmnumad-{vm.name}" in e.file]
    return mappings, {tid: taskset_affinity(tid) for _, tid in vm.vcpu_threads()}


def test_invalid_inputs_are_typed_and_change_nothing(manager: Manager) -> None:
    vm = _vm(manager, start=False, memory=8 * MiB)
    before_regions = vm.memory_regions()
    before_aff = vm.vcpu_affinity()
    before_kernel = _kernel_view(vm)
    # the kernel shows each region's memfd (and the boot slot's)
    assert {r.hva for r in before_regions} < {start for start, *_ in before_kernel[0]}, before_kernel
    before = _snapshot()
    for call, kind, needle in _bad_calls(vm):
        with pytest.raises(kind) as info:
            call()
        assert needle in str(info.value), (kind, str(info.value))
        assert _snapshot() == before, f"{kind.__name__} leaked fds or threads"
        assert _kernel_view(vm) == before_kernel, f"{kind.__name__} changed a mapping or an affinity"
    assert vm.memory_regions() == before_regions
    assert vm.vcpu_affinity() == before_aff


def test_numa_off_vm_and_numa_errors(manager: Manager) -> None:
    vm = manager.create_vm("flat", 1, 4 * MiB, CreateOptions(numa_nodes=0, passes=1, start=True))
    wait_until(lambda: vm.runner_states() == ["halted"], "the vCPU to halt")
    assert not vm.numa_enabled and vm.memory_bytes == 4 * MiB
    with pytest.raises(errors.NumaDisabled):
        vm.bind_vcpu_to_numa_node(0, 0)
    with pytest.raises(errors.NumaDisabled):
        vm.setup_numa_memory(0, 4 * MiB, 64 * MiB)
    with pytest.raises(errors.NumaDisabled):
        vm.disable_numa()


def test_enable_disable_numa_without_memory(manager: Manager) -> None:
    vm = manager.create_vm("empty", 2, 0, CreateOptions())
    vm.enable_numa(3)
    assert vm.numa_nodes == 3 and vm.node_map == [0, 0, 0]  # wrapped onto the one host node
    slot = vm.setup_numa_memory(2, 4 * MiB, 16 * MiB)
    assert slot == 1 and numa_maps_at(vm.memory_regions()[0].hva).policy == "bind:0"
    with pytest.raises(errors.Busy):
        vm.disable_numa()


def test_manager_errors(manager: Manager) -> None:
    _vm(manager, name="dup", start=False, memory=0)
    before = _snapshot()
    with pytest.raises(errors.AlreadyExists):
        _vm(manager, name="dup", start=False, memory=0)
    with pytest.raises(errors.NoSuchVM):
        manager.get_vm("nope")
    with pytest.raises(errors.InvalidArgument, match="bad/name"):
        _vm(manager, name="bad/name")
    with pytest.raises(errors.InvalidArgument, match="vcpus 0"):
        _vm(manager, name="x", vcpus=0)
    with pytest.raises(errors.NodeOutOfRange):
        manager.create_vm("y", 1, 0, CreateOptions(host_nodes=(3,)))
    r, w = os.pipe()  # a payload must be a regular file: a pipe would block a worker
    try:
        with pytest.raises(errors.InvalidArgument, match="payload"), open(r, "rb", closefd=False) as pipe:
            manager.create_vm("z", 1, 0, CreateOptions(payload=pipe))
    finally:
        os.close(r)
        os.close(w)
    assert [vm.name for vm in manager.list_vms()] == ["dup"]
    assert _snapshot() == before, "a refused VM left an fd or a thread behind"
    broken = Manager("/nonexistent/kvm", cpusets=False)
    with pytest.raises(errors.KvmUnavailable):
        broken.create_vm("k", 1, 0, CreateOptions())
    broken.shutdown()


def test_destroy_ends_threads_and_releases_everything(manager: Manager) -> None:
    manager.max_vcpus()  # opens the manager's own /dev/kvm handle, kept for its lifetime
    before = _snapshot()
    vm = _vm(manager, passes=0, memory=8 * MiB)
    wait_until(lambda: min(vm.progress()) >= 1, "a pass on every vCPU")
    tids = [tid for _, tid in vm.vcpu_threads()]
    hvas = [r.hva for r in vm.memory_regions()]
    t = time.monotonic()
    manager.destroy_vm("core")
    elapsed = time.monotonic() - t
    assert elapsed < 1.0, elapsed
    assert not (set(tids) & thread_ids())
    assert _snapshot() == before
    with pytest.raises(LookupError):
        numa_maps_at(hvas[0])


def test_200_create_destroy_cycles_leave_nothing(manager: Manager) -> None:
    _vm(manager, name="warm", memory=4 * MiB, vcpus=2, nodes=1)  # first-use allocations
    manager.destroy_vm("warm")
    before = _snapshot()
    for i in range(200):
        vm = manager.create_vm(f"c{i}", 2, 2 * MiB, CreateOptions(numa_nodes=1, passes=1, start=i % 2 == 0))
        manager.destroy_vm(vm.name)
    assert _snapshot() == before


def test_idle_vm_costs_almost_nothing(manager: Manager) -> None:
    vm = _vm(manager, memory=8 * MiB)
    wait_until(lambda: all(s == "halted" for s in vm.runner_states()), "every vCPU to halt")
    proc = psutil.Process()
    t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
    time.sleep(5)
    used = (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
    assert used < 0.05, f"idle VM used {used:.1%} of one CPU"
