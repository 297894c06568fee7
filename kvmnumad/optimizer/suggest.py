"""Suggestions: each one says what to change, the exact call that changes it,
and the locality it should bring.  Pure: (sample, topology) -> suggestions.

The one rule today: a vCPU whose allowed CPUs all sit on other host nodes
than the one holding most of its guest node's resident memory reaches that
memory remotely on every access.  The fix moves the vCPU to the memory (not
the memory to the vCPU: that copies every page, and a caller who pinned the
vCPU may have pinned it there for a reason): BindVcpuToNumaNode when its
guest node is mapped to that node, else SetVcpuAffinity to that node's
online CPUs.  "Locality" of a vCPU here is the share of its guest node's
resident pages on the node it may run on.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmnumad import cpulist
from kvmnumad.numa.topology import HostTopology
from kvmnumad.optimizer.model import Residency, VcpuSample, VmSample


@dataclass(frozen=True)
class Suggestion:
    vm: str
    kind: str  # "remote-memory", ...
    what: str  # what is wrong and what to change
    method: str  # the org.kvmnuma1.VM method that applies it
    args: tuple[tuple[str, object], ...]  # its arguments as (D-Bus signature, value)
    locality_now: float
    locality_expected: float

    def call(self) -> str:
        """The call as a person types it: ``BindVcpuToNumaNode(0, 0)``."""
        return f"{self.method}({', '.join(_arg(v) for _, v in self.args)})"

    def text(self) -> str:
        return (f"{self.what}: call {self.call()}; expected locality {self.locality_now:.0%} -> "
                f"{self.locality_expected:.0%}")


def _arg(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def suggest(vms: list[VmSample], topo: HostTopology) -> list[Suggestion]:
    out: list[Suggestion] = []
    for vm in vms:
        by_guest = {r.guest_node: r for r in vm.residency}
        for v in vm.vcpus:
            r = by_guest.get(v.guest_node)
            if r is not None:
                s = _remote_memory(vm, v, r, topo)
                if s is not None:
                    out.append(s)
    return out


def _remote_memory(vm: VmSample, v: VcpuSample, r: Residency, topo: HostTopology) -> Suggestion | None:
    total = sum(r.pages.values())
    if not total or not v.affinity:
        return None
    home = max(r.pages, key=lambda n: (r.pages[n], n == r.host_node))  # most pages, mapped node on a tie
    target = topo.cpus_of_node(home) if home in topo.nodes else frozenset()
    run_nodes = {topo.cpus[c].node for c in v.affinity if c in topo.cpus}
    if not target or home in run_nodes:
        return None
    now = sum(r.pages.get(n, 0) for n in run_nodes) / total
    expected = r.pages[home] / total
    where = (f"vCPU {v.vcpu} of VM {vm.name} may run only on host node(s) {cpulist.describe(run_nodes)} "
             f"(CPUs {cpulist.describe(v.affinity)}), but {r.pages[home]} of the {total} resident pages of "
             f"its guest node {r.guest_node} are on host node {home}")
    if vm.numa_enabled and r.host_node == home:
        return Suggestion(vm.name, "remote-memory", f"{where}: bind it to its guest node",
                          "BindVcpuToNumaNode", (("u", v.vcpu), ("u", r.guest_node)), now, expected)
    return Suggestion(vm.name, "remote-memory", f"{where}: pin it to that node's CPUs",
                      "SetVcpuAffinity", (("u", v.vcpu), ("au", sorted(target))), now, expected)
