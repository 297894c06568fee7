"""kvmnumad.numa on a real multi-node kernel (the multi-NUMA guest): topology
against numactl -H and the launcher's table, memory policy and page
migration on memfd memory seen in /proc/self/numa_maps, and plans of the
placement module applied for real."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator

import pytest

from kvmnumad.model import Policy
from kvmnumad.numa import libnuma
from kvmnumad.numa.memory import MemPolicy, get_mempolicy, mbind, migrate_range, pages_per_node, prefault
from kvmnumad.numa.topology import UNKNOWN, read_topology
from kvmnumad.placement import Load, PlacementRequest, plan
from tests import observe
from tests.numa_guest import Topology
from tests.numa_guest.hotplug import CpuHotplug
from tests.test_numa_mempolicy import Region, _libc, map_memfd
from tests.test_numa_topology import check_against_numactl

pytestmark = pytest.mark.numa

SIZE = 32 << 20


@pytest.fixture
def region() -> Iterator[Region]:
    r = map_memfd(SIZE, "kvmnumad-numa")
    yield r
    assert _libc.munmap(r.addr, r.size) == 0


def last_node() -> int:
    return max(observe.host_nodes())


def test_topology_matches_numactl_and_the_booted_shape(topology: Topology) -> None:
    topo = read_topology()
    check_against_numactl(topo)  # CPUs, sizes (MB), free (within 64 MB), distances
    assert topo.node_ids() == list(range(len(topology.nodes)))
    for i, want in enumerate(topology.nodes):
        assert topo.cpus_of_node(i) == want.cpus
        assert topo.nodes[i].distances == {j: topology.distance(i, j) for j in range(len(topology.nodes))}
    assert topo.cpu_less_nodes() == {i for i, n in enumerate(topology.nodes) if not n.cpus}
    for cpu in topo.online_cpus():
        assert libnuma.node_of_cpu(cpu) == topo.node_of_cpu(cpu)
    for n in topo.node_ids():
        assert libnuma.node_size64(n)[0] == topo.nodes[n].mem_total
        assert topo.nearest_nodes(n)[0] == n
        ranked = [topo.distance(n, m) for m in topo.nearest_nodes(n)]
        assert ranked == sorted(ranked)


def test_offline_cpu_is_seen(cpu_offline: CpuHotplug) -> None:
    cpu = max(observe.online_cpus())
    node = read_topology().node_of_cpu(cpu)
    with cpu_offline(cpu):
        topo = read_topology()
        assert not topo.cpus[cpu].online and topo.cpus[cpu].node == node
        assert cpu not in topo.online_cpus() and cpu not in topo.cpus_of_node(node)
        assert cpu in topo.cpus_of_node(node, online_only=False)
        assert topo.cpus_of_node(node) == observe.node_cpus(node)
        check_against_numactl(topo)
    topo = read_topology()
    assert topo.cpus[cpu].online and cpu in topo.cpus_of_node(node)
    assert topo.cpus[cpu].core != UNKNOWN


def test_bind_to_last_node_puts_pages_there(region: Region) -> None:
    node = last_node()
    mbind(region.addr, region.size, MemPolicy.BIND, {node}, strict=True)
    prefault(region.addr, region.size)
    entry = region.numa_maps()
    assert entry.policy == f"bind:{node}"
    assert entry.pages_per_node == {node: region.pages}
    assert pages_per_node(region.addr, region.size) == {node: region.pages}
    assert get_mempolicy(region.addr) == (MemPolicy.BIND, frozenset({node}))


def test_migrate_range_moves_pages_from_node_0(region: Region) -> None:
    node = last_node()
    mbind(region.addr, region.size, MemPolicy.PREFERRED, {0})
    prefault(region.addr, region.size)
    assert region.numa_maps().pages_per_node == {0: region.pages}
    assert migrate_range(region.addr, region.size, node) == region.pages
    assert region.numa_maps().pages_per_node == {node: region.pages}
    assert pages_per_node(region.addr, region.size) == {node: region.pages}
    assert migrate_range(region.addr, region.size, node) == 0  # nothing left to move


def test_migrate_range_leaves_absent_pages_absent(region: Region) -> None:
    region.touch(100)
    assert migrate_range(region.addr, region.size, last_node()) in (0, 100)
    assert pages_per_node(region.addr, region.size) == {last_node(): 100}


def test_mbind_move_rebinds_present_pages(region: Region) -> None:
    node = last_node()
    mbind(region.addr, region.size, MemPolicy.BIND, {0})
    prefault(region.addr, region.size)
    with pytest.raises(OSError) as exc:  # STRICT without MOVE: pages on node 0 break the new policy
        mbind(region.addr, region.size, MemPolicy.BIND, {node}, strict=True)
    assert exc.value.errno == errno.EIO
    mbind(region.addr, region.size, MemPolicy.BIND, {node}, move=True, strict=True)
    assert region.numa_maps().pages_per_node == {node: region.pages}


def test_interleave_splits_within_ten_percent(region: Region) -> None:
    nodes = sorted(observe.host_nodes())
    mbind(region.addr, region.size, MemPolicy.INTERLEAVE, nodes)
    prefault(region.addr, region.size)
    counts = region.numa_maps().pages_per_node
    assert counts == pages_per_node(region.addr, region.size)
    assert set(counts) == set(nodes)
    share = region.pages / len(nodes)
    assert all(abs(c - share) <= 0.1 * share for c in counts.values()), counts


def test_half_and_half(region: Region) -> None:
    half = region.size // 2
    mbind(region.addr, half, MemPolicy.BIND, {0})
    mbind(region.addr + half, half, MemPolicy.BIND, {last_node()})
    prefault(region.addr, region.size)
    n = region.pages // 2
    assert pages_per_node(region.addr, region.size) == {0: n, last_node(): n}
    assert pages_per_node(region.addr + half, half) == {last_node(): n}


def test_node_without_memory_is_refused(region: Region) -> None:
    absent = last_node() + 1
    with pytest.raises(OSError) as exc:
        mbind(region.addr, region.size, MemPolicy.BIND, {absent})
    assert exc.value.errno == errno.EINVAL
    region.touch(1)
    with pytest.raises(OSError) as exc:
        migrate_range(region.addr, region.size, absent)
    assert exc.value.errno == errno.ENODEV


# --- placement plans applied for real ---

def pin_a_thread(cpus: frozenset[int]) -> set[int]:
    """A thread pins itself as a vCPU thread would; taskset reads its affinity from outside."""
    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def vcpu() -> None:
        tid.append(threading.get_native_id())
        os.sched_setaffinity(0, cpus)
        ready.set()
        done.wait()

    t = threading.Thread(target=vcpu)
    t.start()
    try:
        ready.wait()
        return observe.taskset_affinity(tid[0])
    finally:
        done.set()
        t.join()


def apply(policy: Policy, vcpus: int, guest_nodes: int) -> tuple[list[dict[int, int]], list[set[int]]]:
    """Plan on the live topology, bind + prefault one memfd region per guest node, pin one
    thread per vCPU; return what numa_maps and taskset say."""
    p = plan(read_topology(), Load(), PlacementRequest(vcpus, guest_nodes * 16 << 20, guest_nodes, policy))
    regions = [map_memfd(node.bytes, f"guest{node.guest_node}") for node in p.nodes]
    try:
        for r, node in zip(regions, p.nodes, strict=True):
            mbind(r.addr, r.size, node.mempolicy, node.host_nodes, strict=node.mempolicy == MemPolicy.BIND)
            prefault(r.addr, r.size)
        pinned = [pin_a_thread(v.cpus) for v in p.vcpus]
        return [observe.numa_maps_at(r.addr).pages_per_node for r in regions], pinned
    finally:
        for r in regions:
            _libc.munmap(r.addr, r.size)


def test_local_first_plan_applied() -> None:
    topo = read_topology()
    with_cpus = [n for n in topo.node_ids() if topo.cpus_of_node(n)]
    pages, pinned = apply(Policy.LOCAL_FIRST, 4, 2)
    homes = []
    for g, per_node in enumerate(pages):
        assert len(per_node) == 1, per_node  # every page of a guest node on one host node
        (home,) = per_node
        homes.append(home)
        assert all(pinned[v] == topo.cpus_of_node(home) for v in (2 * g, 2 * g + 1))
    assert len(set(homes)) == 2 and set(homes) <= set(with_cpus)


def test_interleave_plan_applied() -> None:
    nodes = observe.host_nodes()
    pages, pinned = apply(Policy.INTERLEAVE, 2, 1)
    (counts,) = pages
    share = sum(counts.values()) / len(nodes)
    assert set(counts) == nodes
    assert all(abs(c - share) <= 0.1 * share for c in counts.values()), counts
    assert pinned == [observe.online_cpus()] * 2


def test_load_balanced_plan_applied() -> None:
    cpus = observe.online_cpus()
    pages, pinned = apply(Policy.LOAD_BALANCED, len(cpus), 1)
    assert sorted(min(s) for s in pinned) == sorted(cpus) and all(len(s) == 1 for s in pinned)
    assert set(pages[0]) <= {read_topology().node_of_cpu(c) for c in cpus}

