"""Issue 13 on a real multi-node kernel: a VM spread over two host nodes is
made anew on its handed-over memfds and its placement comes back as it was:
each slot bound to its own host node with its pages there (numa_maps), each
bound vCPU on its node's CPUs (taskset), and the guest's counters continue."""

from __future__ import annotations

import fcntl

import pytest

from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions
from kvmnumad.vm.saved import Recovery, Resume
from tests import observe
from tests.waiting import wait_until

pytestmark = pytest.mark.numa

MiB = 1 << 20


def test_handover_keeps_a_two_node_placement(manager: Manager) -> None:
    last = max(n for n in observe.host_nodes() if observe.node_cpus(n))  # memory-only nodes have no CPUs
    vm = manager.create_vm("hn", 2, 16 * MiB, CreateOptions(numa_nodes=2, start=True, allow_split=True))
    vm.map_numa_node(0, 0)
    vm.map_numa_node(1, last)
    vm.bind_vcpu_to_numa_node(0, 0)
    vm.bind_vcpu_to_numa_node(1, 1)
    wait_until(lambda: min(vm.progress()) >= 2, "two passes on every vCPU", timeout=120)
    definition = vm.definition()
    saved = vm.pause_for_handover()
    memfds = {slot: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0) for slot, fd in vm.memory.memfds()}
    manager.shutdown()
    fresh = Manager()
    try:
        back = fresh.restore_vm(definition, None, Resume(memfds, saved))
        assert back.recovery == Recovery.RESUMED
        floor = [s.progress for s in saved if s is not None]
        wait_until(lambda: all(p >= f + 2 for p, f in zip(back.progress(), floor, strict=True)),
                   "every vCPU two passes further", timeout=120)
        want = {0: 0, 1: last}
        for r in back.memory_regions():
            entry = observe.numa_maps_of_slot("hn", r.slot)
            host = want[r.guest_node]
            assert entry.policy == f"bind:{host}", entry.raw
            assert set(entry.pages_per_node) == {host}, entry.raw
        tids = dict(back.vcpu_threads())
        assert observe.taskset_affinity(tids[0]) == observe.node_cpus(0)
        assert observe.taskset_affinity(tids[1]) == observe.node_cpus(last)
    finally:
        fresh.shutdown()
