"""Core placement on a real multi-node kernel (runs in the 2- and 4-node guests).

Memory is proven by /proc/self/numa_maps, threads by taskset: never by
kvmnumad's own view.
"""

from __future__ import annotations

import pytest

from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from tests.observe import host_nodes, node_cpus, numa_maps_at, taskset_affinity
from tests.waiting import wait_until

pytestmark = pytest.mark.numa

MiB = 1 << 20
PAGE = 4096


def test_each_guest_node_lands_on_its_host_node(manager: Manager) -> None:
    nodes = sorted(n for n in host_nodes() if node_cpus(n))
    vm = manager.create_vm(
        "spread", len(nodes), len(nodes) * 8 * MiB,
        CreateOptions(numa_nodes=len(nodes), policy=Policy.MANUAL, passes=1, prealloc=True, start=True),
    )
    wait_until(lambda: all(s == "halted" for s in vm.runner_states()), "every vCPU to halt", timeout=60)
    assert vm.node_map == nodes
    tids = dict(vm.vcpu_threads())
    for g, host in enumerate(nodes):
        vm.bind_vcpu_to_numa_node(g, g)
        assert taskset_affinity(tids[g]) == node_cpus(host)
    regions = vm.memory_regions()
    assert sorted(r.guest_node for r in regions) == list(range(len(nodes)))
    for r in regions:  # guest node g on host node nodes[g], per numa_maps (not per the region's own record)
        entry = numa_maps_at(r.hva)
        assert entry.policy == f"bind:{nodes[r.guest_node]}", entry.raw
        assert entry.pages_per_node == {nodes[r.guest_node]: r.size // PAGE}, entry.raw


def test_bind_moves_thread_to_node1(manager: Manager) -> None:
    vm = manager.create_vm("mover", 2, 0, CreateOptions(numa_nodes=2, policy=Policy.MANUAL))
    tid = dict(vm.vcpu_threads())[0]
    vm.bind_vcpu_to_numa_node(0, 0)
    assert taskset_affinity(tid) == node_cpus(0)
    vm.bind_vcpu_to_numa_node(0, 1)
    assert taskset_affinity(tid) == node_cpus(1)
    assert vm.get_vcpu_numa_node(0) == (True, 1)


def test_map_numa_node_migrates_memory_live(manager: Manager) -> None:
    vm = manager.create_vm("migr", 2, 16 * MiB,
                           CreateOptions(numa_nodes=2, policy=Policy.MANUAL, passes=0, start=True))
    wait_until(lambda: min(vm.progress()) >= 2, "2 passes on every vCPU", timeout=60)
    vm.bind_vcpu_to_numa_node(0, 0)
    r0 = vm.memory_regions()[0]
    assert numa_maps_at(r0.hva).pages_per_node == {0: r0.size // PAGE}
    vm.map_numa_node(0, 1)  # while the guest keeps writing to it
    entry = numa_maps_at(r0.hva)
    assert entry.policy == "bind:1" and entry.pages_per_node == {1: r0.size // PAGE}, entry.raw
    assert taskset_affinity(dict(vm.vcpu_threads())[0]) == node_cpus(1)
    prog = vm.progress()
    wait_until(lambda: min(vm.progress()) > max(prog), "every vCPU to progress after the move",
               timeout=60)  # the guest survived the move
