"""VM cpusets on cgroup v2 (the guest mounts cgroup2 at /sys/fs/cgroup): the
threaded subtree, read back from the kernel's files after create, a hotplug
re-pin and destroy.  (cgroup v1 is covered on the host: tests/test_cgroups.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from tests.numa_guest.hotplug import CpuHotplug
from tests.observe import node_cpus, numa_maps_at, parse_cpulist, taskset_affinity

pytestmark = pytest.mark.numa

MiB = 1 << 20
CGROUP2 = Path("/sys/fs/cgroup")


def cat(path: Path) -> str:
    return path.read_text().strip()


def cpus_of(d: Path, effective: bool = False) -> set[int]:
    return parse_cpulist(cat(d / ("cpuset.cpus.effective" if effective else "cpuset.cpus")))


def thread_cgroup(tid: int) -> str:
    """The unified-hierarchy line of /proc/PID/task/TID/cgroup."""
    for line in Path(f"/proc/{os.getpid()}/task/{tid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise LookupError(f"thread {tid}: no cgroup v2 line")


def test_v2_threaded_subtree_follows_placement_and_hotplug(manager: Manager, cpu_offline: CpuHotplug) -> None:
    cs = manager.cpusets
    assert cs is not None, "cgroup v2 cpusets must work in the guest (see the daemon's warning)"
    assert (cs.version, cs.mount) == (2, CGROUP2)
    inst = CGROUP2 / "kvmnumad" / str(os.getpid())
    assert cs.root == inst
    assert thread_cgroup(os.getpid()) == f"/kvmnumad/{os.getpid()}", "the process moved into its instance"
    assert str(os.getpid()) in cat(inst / "cgroup.procs").split()

    vm = manager.create_vm("cg2", 2, 8 * MiB,
                           CreateOptions(numa_nodes=2, policy=Policy.LOCAL_FIRST, prealloc=True))
    vmdir = inst / "vm-cg2"
    assert cat(inst / "cgroup.type") == "domain threaded"
    assert cat(vmdir / "cgroup.type") == "threaded"
    assert "cpuset" in cat(inst / "cgroup.subtree_control").split()
    assert "cpuset" in cat(vmdir / "cgroup.subtree_control").split()
    all_mems = set(parse_cpulist(cat(inst / "cpuset.mems.effective")))
    region_nodes: set[int] = set()
    for r in vm.memory_regions():
        (node,) = numa_maps_at(r.hva).pages_per_node  # one node per region under local-first
        region_nodes.add(node)
    tids = dict(vm.vcpu_threads())
    union: set[int] = set()
    for vcpu, tid in tids.items():
        d = vmdir / f"vcpu{vcpu}"
        assert cat(d / "cgroup.type") == "threaded"
        assert cat(d / "cgroup.threads").split() == [str(tid)]
        assert thread_cgroup(tid) == f"/kvmnumad/{os.getpid()}/vm-cg2/vcpu{vcpu}"
        affinity = taskset_affinity(tid)
        assert len({n for n in region_nodes if affinity <= node_cpus(n)}) == 1, (affinity, region_nodes)
        assert cpus_of(d) == cpus_of(d, effective=True) == affinity
        # never narrowed to the regions' nodes: a cpuset.mems write rebinds and migrates the
        # daemon's whole mm, every VM's memory (cgroups.VmCpuset.set_mems); mbind places it
        assert parse_cpulist(cat(d / "cpuset.mems.effective")) == all_mems
        union |= affinity
    assert cpus_of(vmdir) == union
    assert parse_cpulist(cat(vmdir / "cpuset.mems.effective")) == all_mems

    # Hotplug: vCPU 0 pinned to CPU 3; CPU 3 goes; it moves to CPU 2 (node 1 in
    # 2node, node 2 at distance 15 in 4node); CPU 3 returns, so does vCPU 0.
    # vCPU 1 on CPU 0 keeps the kernel's own fallback for vCPU 0 (the VM's
    # effective CPUs, {0}) apart from the re-pin's target: a move is seen.
    vcpu0 = vmdir / "vcpu0"
    vm.set_vcpu_affinity(1, [0])
    vm.set_vcpu_affinity(0, [3])
    assert cpus_of(vcpu0) == {3} == taskset_affinity(tids[0])
    with cpu_offline(3):
        moves = manager.on_topology_changed("cpu3 offline")
        assert ("cg2", 0, [2]) in moves
        assert cpus_of(vcpu0) == cpus_of(vcpu0, effective=True) == {2} == taskset_affinity(tids[0])
        assert cat(vcpu0 / "cgroup.threads").split() == [str(tids[0])]
    moves = manager.on_topology_changed("cpu3 online")
    assert ("cg2", 0, [3]) in moves
    assert cpus_of(vcpu0) == cpus_of(vcpu0, effective=True) == {3} == taskset_affinity(tids[0])
    assert thread_cgroup(tids[0]) == f"/kvmnumad/{os.getpid()}/vm-cg2/vcpu0"
    assert 3 in cpus_of(vmdir)

    manager.destroy_vm("cg2")
    assert not vmdir.exists()
    assert inst.is_dir() and thread_cgroup(os.getpid()) == f"/kvmnumad/{os.getpid()}"


def test_a_remap_leaves_the_other_vms_memory_and_policy_alone(manager: Manager) -> None:
    """Two VMs on different host nodes, then the first one's guest node is
    remapped (MapNumaNode's job): the second's pages stay where they were and
    its region keeps its bind policy, by numa_maps.  Before set_mems stopped
    writing cpuset.mems, the first VM's narrowing made the kernel rebind and
    migrate the daemon's whole mm (update_tasks_nodemask), the second VM's
    memory with it."""
    assert manager.cpusets is not None
    nodes = [n for n in sorted(manager.topology().nodes) if node_cpus(n)]
    assert len(nodes) >= 2
    first, second = nodes[0], nodes[1]
    options = CreateOptions(numa_nodes=1, policy=Policy.MANUAL, prealloc=True, start=True)
    a = manager.create_vm("remap-a", 1, 16 * MiB, options)
    b = manager.create_vm("remap-b", 1, 16 * MiB, options)
    try:
        manager.map_numa_node("remap-a", 0, first)
        manager.map_numa_node("remap-b", 0, second)
        (rb,) = b.memory_regions()
        before = numa_maps_at(rb.hva)
        assert set(before.pages_per_node) == {second}, before.raw
        manager.map_numa_node("remap-a", 0, second)  # a's cgroup would have narrowed to {second}...
        manager.map_numa_node("remap-a", 0, first)  # ...and then to {first}: b's node dropped
        (ra,) = a.memory_regions()
        assert set(numa_maps_at(ra.hva).pages_per_node) == {first}
        after = numa_maps_at(rb.hva)
        assert after.pages_per_node == before.pages_per_node, (before.raw, after.raw)
        assert after.policy == before.policy == f"bind:{second}", (before.raw, after.raw)
    finally:
        manager.destroy_vm("remap-a")
        manager.destroy_vm("remap-b")
