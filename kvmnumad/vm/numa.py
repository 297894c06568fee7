"""A VM's guest NUMA layout: how many guest nodes, and the host node of each.

The layout is the VM's promise to its guest (which vCPUs and which memory
form node N) plus the host side of it (the node map).  Memory regions and
vCPU bindings refer to guest nodes, so every check of a guest node index
lives here.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmnumad import errors, placement
from kvmnumad.numa.topology import HostTopology
from kvmnumad.vm.layout import MAX_GUEST_NODES


class GuestNuma:
    def __init__(self, vm: str) -> None:
        self._vm = vm
        self.nodes = 0
        self.node_map: list[int] = []

    @property
    def enabled(self) -> bool:
        return self.nodes > 0

    @staticmethod
    def check(nodes: int, node_map: Sequence[int] | None, topo: HostTopology) -> list[int]:
        """The node map enable() would set.  Without a map, guest node i goes
        to host node i (round robin over the host's nodes when the guest has more)."""
        if nodes < 1:
            raise errors.InvalidArgument(f"number of guest NUMA nodes must be at least 1, got {nodes}",
                                         nodes=nodes)
        if nodes > MAX_GUEST_NODES:
            raise errors.InvalidArgument(f"at most {MAX_GUEST_NODES} guest NUMA nodes, got {nodes}",
                                         nodes=nodes, maximum=MAX_GUEST_NODES)
        if node_map is None:
            node_map = placement.wrap_node_map(nodes, topo.node_ids())
        if len(node_map) != nodes:
            raise errors.InvalidArgument(f"node map {list(node_map)} must have {nodes} entries",
                                         node_map=list(node_map), nodes=nodes)
        for h in node_map:
            topo.node(h)
        return list(node_map)

    def enable(self, nodes: int, node_map: Sequence[int] | None, topo: HostTopology) -> None:
        self.node_map = self.check(nodes, node_map, topo)
        self.nodes = nodes

    def disable(self) -> None:
        self.nodes = 0
        self.node_map = []

    def require_enabled(self) -> None:
        if not self.nodes:
            raise errors.NumaDisabled(f"guest NUMA is disabled on VM {self._vm!r}")

    def require(self, node: int) -> None:
        self.require_enabled()
        if not 0 <= node < self.nodes:
            raise errors.NodeOutOfRange(
                f"guest node {node} out of range: VM {self._vm!r} has {self.nodes} guest nodes",
                node=node, nodes=self.nodes)

    def host_of(self, node: int) -> int:
        return self.node_map[node]

    def node_of_vcpu(self, vcpu: int, vcpus: int) -> int:
        return placement.guest_node_of_vcpu(vcpu, vcpus, self.nodes) if self.nodes else 0

    def host_cpus(self, node: int, topo: HostTopology) -> frozenset[int]:
        """Where a vCPU bound to guest node ``node`` runs: the online CPUs of
        its host node, or of the nearest node with CPUs for a memory-only one."""
        return topo.nearest_online_cpus(self.node_map[node])
