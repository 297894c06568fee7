"""Which D-Bus properties a core change touches, and how each is read.

The core says *what* changed (events.Aspect); this is the one place that
says what that means on the bus.  A VmChanged re-reads only the properties
of its aspects, and PropertiesChanged carries only the values that differ.
Values are in their D-Bus shape (structs as lists: dbus-fast 1.84 refuses
tuples).  Every reader blocks (a Vm getter takes the VM's lock, which a long
mbind may hold; max_vcpus opens /dev/kvm): call them off the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kvmnumad.adopt.vm import adoption_of
from kvmnumad.bus.samples import host_node_rows, residency_rows, vcpu_usage_rows
from kvmnumad.errors import NoSuchVM
from kvmnumad.events import Aspect
from kvmnumad.manager import Manager
from kvmnumad.optimizer.model import HostNodeSample, VmSample
from kvmnumad.optimizer.sample import measure_vm
from kvmnumad.vm import Vm

VM_PROPERTIES: dict[str, Callable[[Vm], Any]] = {
    "Name": lambda vm: vm.name,
    "State": lambda vm: str(vm.state),
    "Vcpus": lambda vm: vm.vcpu_count,
    "MemoryBytes": lambda vm: vm.memory_bytes,
    "NumaEnabled": lambda vm: vm.numa_enabled,
    "NumaNodes": lambda vm: vm.numa_nodes,
    "NodeMap": lambda vm: list(vm.node_map),
    "Policy": lambda vm: str(vm.policy),
    "VcpuThreads": lambda vm: [[v, tid] for v, tid in vm.vcpu_threads()],
    "VcpuAffinity": lambda vm: [[v, list(cpus)] for v, cpus in vm.vcpu_affinity()],
    "DeclaredVcpuAffinity": lambda vm: [[v, list(cpus)] for v, cpus in vm.declared_vcpu_affinity()],
    "VcpuNodes": lambda vm: [[v, bound, node] for v, bound, node in vm.vcpu_nodes()],
    # No host virtual address: the bus is a privilege boundary, and the
    # daemon's mapping addresses would undo its ASLR for any local user.
    "MemoryRegions": lambda vm: [
        [r.slot, r.gpa, r.size, r.guest_node, r.host_node] for r in vm.memory_regions()
    ],
    "Owner": lambda vm: vm.owner,
    "Recovery": lambda vm: str(vm.recovery),
    # An adopted VM (kvmnumad/adopt/): another process's guest, by which VMM
    "Adopted": lambda vm: adoption_of(vm)[1] != 0,
    "Vmm": lambda vm: adoption_of(vm)[0],
    "ProcessId": lambda vm: adoption_of(vm)[1],
    "AutoBalance": lambda vm: bool(getattr(vm, "auto_balance", False)),
}

# Fixed when the VM is made (vCPU threads exist from then on).
VM_CONSTANT = frozenset({"Name", "Vcpus", "Policy", "VcpuThreads", "Owner", "Recovery", "Adopted", "Vmm",
                         "ProcessId"})

ASPECT_PROPERTIES: dict[Aspect, frozenset[str]] = {
    Aspect.STATE: frozenset({"State"}),
    # VcpuNodes names each vCPU's guest node, which the node count decides
    Aspect.NUMA_LAYOUT: frozenset({"NumaEnabled", "NumaNodes", "NodeMap", "VcpuNodes"}),
    Aspect.MEMORY: frozenset({"MemoryBytes", "MemoryRegions"}),
    Aspect.VCPU_PLACEMENT: frozenset({"VcpuAffinity", "DeclaredVcpuAffinity", "VcpuNodes"}),
    Aspect.BALANCING: frozenset({"AutoBalance"}),
}

# A host CPU going or coming changes effective affinities the kernel
# reports, re-pinned or not (an unpinned vCPU loses the offline CPU too).
TOPOLOGY_VM_PROPERTIES = frozenset({"VcpuAffinity", "VcpuNodes"})

MANAGER_PROPERTIES: dict[str, Callable[[Manager], Any]] = {
    "Version": lambda m: m.version,
    "HostNodes": lambda m: list(m.host_nodes()),
    "OnlineCPUs": lambda m: list(m.online_cpus()),
    "DefaultPolicy": lambda m: str(m.default_policy),
    "MaxVcpus": lambda m: m.max_vcpus(),
}
TOPOLOGY_PROPERTIES = frozenset({"HostNodes", "OnlineCPUs"})


def touched(aspects: Iterable[Aspect]) -> frozenset[str]:
    return frozenset().union(*(ASPECT_PROPERTIES[a] for a in aspects))


def vm_snapshot(manager: Manager, vm: Vm, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The values of ``names`` (default: all), read while ``vm`` is the
    Manager's VM of that name; NoSuchVM if it is no longer (destroyed or
    replaced meanwhile: its removal is a core event of its own)."""
    wanted = VM_PROPERTIES if names is None else {n: VM_PROPERTIES[n] for n in sorted(names)}
    try:
        values = {name: read(vm) for name, read in wanted.items()}
        if names is None:  # on export: the sampled figures measured now, until the timer's next
            values.update(sampled_vm_values(measure_vm(vm, manager.topology())))
    except Exception:
        _require_registered(manager, vm)  # a VM torn down under the reads: NoSuchVM
        raise
    # Registered after the reads means registered during them: the Manager
    # unregisters a VM before destroying it.
    _require_registered(manager, vm)
    return values


def manager_snapshot(manager: Manager, names: Iterable[str] | None = None) -> dict[str, Any]:
    wanted = MANAGER_PROPERTIES if names is None else {n: MANAGER_PROPERTIES[n] for n in sorted(names)}
    values = {name: read(manager) for name, read in wanted.items()}
    if names is None:
        values.update(sampled_manager_values(manager.measure_host_nodes()))
    return values


# Measured, not changed by a call: only the sampling timer publishes them, at
# most once per period and only those that differ (BusService.follow_samples).
SAMPLED_VM_PROPERTIES = frozenset({"Residency", "VcpuUsage"})
SAMPLED_MANAGER_PROPERTIES = frozenset({"HostNodeUsage"})


def sampled_vm_values(s: VmSample) -> dict[str, Any]:
    return {"Residency": residency_rows(s), "VcpuUsage": vcpu_usage_rows(s)}


def sampled_manager_values(nodes: tuple[HostNodeSample, ...]) -> dict[str, Any]:
    return {"HostNodeUsage": host_node_rows(nodes)}


def _require_registered(manager: Manager, vm: Vm) -> None:
    if manager.get_vm(vm.name) is not vm:  # get_vm raises NoSuchVM when there is none
        raise NoSuchVM(f"VM {vm.name!r} was destroyed and made anew")
