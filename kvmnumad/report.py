"""What the Manager tells a person: the host and VM report, and suggestions.

Read-only views over the VMs and the topology; they change nothing, so they
live apart from the code that does.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmnumad import cpulist, placement
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.model import VmState
from kvmnumad.numa.memory import pages_per_node
from kvmnumad.numa.topology import HostTopology
from kvmnumad.optimizer.model import Sample
from kvmnumad.optimizer.suggest import Suggestion
from kvmnumad.vm import Vm


def measure_load(topo: HostTopology, vms: Sequence[Vm], cpu_busy: Sequence[float]) -> placement.Load:
    """What existing VMs already hold, so new placements go elsewhere first.
    ``cpu_busy`` is the busy percentage per CPU since the previous sample."""
    node_vcpus: dict[int, int] = {}
    node_bytes: dict[int, int] = {}
    for vm in vms:
        for _vcpu, cpus in vm.vcpu_affinity():
            nodes = {topo.cpus[c].node for c in cpus if c in topo.cpus}
            if len(nodes) == 1:
                (n,) = nodes
                node_vcpus[n] = node_vcpus.get(n, 0) + 1
        for r in vm.memory_regions():
            # MemFree already excludes what is resident: count only the rest
            resident = sum(pages_per_node(r.hva, r.size).values()) * PAGE_SIZE
            node_bytes[r.host_node] = node_bytes.get(r.host_node, 0) + r.size - resident
    cpu = {i: p / 100.0 for i, p in enumerate(cpu_busy)}
    return placement.Load(cpu=cpu, node_vcpus=node_vcpus, node_bytes=node_bytes)


def report(version: str, topo: HostTopology, cpusets: str, vms: Sequence[Vm],
           sample: Sample | None = None) -> str:
    """Text for a person; with a ``sample``, each VM's residency and its vCPUs' run delay too."""
    fmt = cpulist.describe
    lines = [f"kvmnumad {version}", f"host nodes: {len(topo.nodes)}", f"cpusets: {cpusets}"]
    for nid in topo.node_ids():
        n = topo.nodes[nid]
        lines.append(f"  node {nid}: cpus {fmt(n.cpus)} online {fmt(n.online_cpus)} "
                     f"mem {n.mem_total >> 20} MiB free {n.mem_free >> 20} MiB")
    for hn in sample.nodes if sample is not None else ():
        lines.append(f"  node {hn.node} now: busy {hn.busy:.2f} (since boot at first), our VMs' pages "
                     f"{hn.vm_pages}, our vCPUs {hn.vm_vcpus}")
    lines.append(f"VMs: {len(vms)}")
    for vm in vms:
        lines.append(f"  {vm.name}: {vm.state} vcpus {vm.vcpu_count} policy {vm.policy} "
                     f"numa {vm.numa_nodes} map {vm.node_map}")
        measured = sample.vms.get(vm.name) if sample is not None else None
        usage = {v.vcpu: v for v in measured.vcpus} if measured is not None else {}
        for vcpu, cpus in vm.vcpu_affinity():
            u = usage.get(vcpu)
            figures = (f" on cpu {u.cpu} (node {u.node}), cpu time {u.cpu_time_ns / 1e9:.3f} s, "
                       f"run delay {u.run_delay_ns / 1e9:.3f} s, migrations {u.migrations}") if u else ""
            lines.append(f"    vcpu {vcpu}: cpus {fmt(cpus)}{figures}")
        for r in vm.memory_regions():
            lines.append(f"    slot {r.slot}: {r.size >> 20} MiB guest node {r.guest_node} "
                         f"-> host node {r.host_node}")
        for res in measured.residency if measured is not None else ():
            lines.append(f"    residency guest node {res.guest_node}: {res.pages_there} pages on host node "
                         f"{res.host_node}, {res.pages_elsewhere} elsewhere, locality {res.locality:.1%}")
    return "\n".join(lines) + "\n"


def suggestions(topo: HostTopology, vms: Sequence[Vm],
                actions: Sequence[Suggestion] | None = None) -> list[tuple[str, str, str]]:
    """(vm, kind, text): placements whose vCPUs and memory sit on different nodes.
    With ``actions`` (the optimizer's, measured), those replace the rule of
    declared placements below, each text naming its call."""
    out: list[tuple[str, str, str]] = []
    for vm in vms:
        regions = vm.memory_regions()
        if vm.state == VmState.RUNNING and not regions:
            out.append((vm.name, "no-memory", "VM runs without guest memory regions"))
    if actions is not None:
        return out + [(a.vm, a.kind, a.text()) for a in actions]
    for vm in vms:
        regions = vm.memory_regions()
        if not regions or not vm.numa_enabled or len(topo.nodes) < 2:
            continue
        for vcpu, cpus in vm.vcpu_affinity():
            nodes = {topo.cpus[c].node for c in cpus if c in topo.cpus}
            gnode = vm.guest_node_of_vcpu(vcpu)
            mem_nodes = {r.host_node for r in regions if r.guest_node == gnode}
            if mem_nodes and not nodes <= mem_nodes:
                out.append((vm.name, "remote-memory",
                            f"vCPU {vcpu} may run on node(s) {cpulist.describe(nodes)} but its guest node "
                            f"{gnode} memory is on {cpulist.describe(mem_nodes)}: bind it with "
                            "BindVcpuToNumaNode"))
    return out
