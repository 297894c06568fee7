"""Placement policies: where a VM's vCPUs run and where its memory lives.

Pure functions of (host topology, current load, request) -> Plan: no I/O, so
the same code answers PlanVM (a dry run) and CreateVM, and every rule is
tested on hand-made topologies.  The Vm applies a Plan with mbind and
sched_setaffinity; observers check the result from outside.

Vocabulary: guest node i holds ``memory_bytes / guest_nodes`` (in whole
pages) and the contiguous block of vCPUs ``v`` with ``v * guest_nodes //
vcpus == i``.  A node's "pressure" is (measured CPU load + vCPUs already
placed there) per online CPU: the least pressed node is filled first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from kvmnumad.errors import InsufficientMemory, InvalidArgument, NodeOutOfRange
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.model import Policy
from kvmnumad.numa.memory import MemPolicy
from kvmnumad.numa.topology import HostTopology, format_cpulist


@dataclass(frozen=True)
class Load:
    """What the host carries already.  ``node_bytes`` is memory promised to
    existing VMs and not resident yet (committed minus pages_per_node): the
    kernel's MemFree does not count it, so the planner subtracts it."""

    cpu: Mapping[int, float] = field(default_factory=dict)  # busy fraction 0..1 per CPU (missing: 0)
    node_vcpus: Mapping[int, int] = field(default_factory=dict)  # vCPUs of existing VMs per host node
    node_bytes: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacementRequest:
    vcpus: int
    memory_bytes: int  # 0: a VM without memory yet, only its vCPUs are placed
    guest_nodes: int = 1  # 0 (NUMA off) plans as one guest node
    policy: Policy = Policy.LOCAL_FIRST
    host_nodes: tuple[int, ...] = ()  # allowed host nodes, in the order guest nodes map to; empty = all
    allow_split: bool = False


@dataclass(frozen=True)
class NodePlan:
    guest_node: int
    host_nodes: tuple[int, ...]  # node set of the memory policy, first = primary
    mempolicy: MemPolicy  # BIND, PREFERRED or INTERLEAVE
    bytes: int
    per_host: dict[int, int]  # expected bytes per host node (an estimate for INTERLEAVE/PREFERRED)
    why: str = ""  # the rule and the numbers that chose host_nodes (explanations)


@dataclass(frozen=True)
class VcpuPlan:
    vcpu: int
    guest_node: int
    cpus: frozenset[int]
    why: str = ""


@dataclass(frozen=True)
class Plan:
    policy: Policy
    nodes: tuple[NodePlan, ...]
    vcpus: tuple[VcpuPlan, ...]

    @property
    def node_map(self) -> list[int]:
        """Guest node i -> its primary host node (Vm.node_map)."""
        return [n.host_nodes[0] for n in self.nodes]


def wrap_node_map(guest_nodes: int, host_nodes: tuple[int, ...] | list[int]) -> list[int]:
    """Guest node i -> host_nodes[i mod len]: identity when there are enough host nodes."""
    if not host_nodes:
        raise InvalidArgument("no host node to map guest nodes to")
    return [host_nodes[i % len(host_nodes)] for i in range(guest_nodes)]


def guest_node_of_vcpu(vcpu: int, vcpus: int, guest_nodes: int) -> int:
    """Contiguous blocks of vCPUs per guest node, as QEMU assigns them by default."""
    return vcpu * max(1, guest_nodes) // vcpus


def plan(topo: HostTopology, load: Load, req: PlacementRequest) -> Plan:
    return _Planner(topo, load, req).run()


class _Planner:
    """One planning pass; tracks the memory and vCPUs it has handed out so far."""

    def __init__(self, topo: HostTopology, load: Load, req: PlacementRequest) -> None:
        _validate(topo, req)
        self.topo, self.load, self.req = topo, load, req
        self.allowed = tuple(dict.fromkeys(req.host_nodes)) or tuple(topo.node_ids())
        self.guests = max(1, req.guest_nodes)
        pages, extra = divmod(req.memory_bytes // PAGE_SIZE, self.guests)
        self.sizes = [(pages + (i < extra)) * PAGE_SIZE for i in range(self.guests)]
        self.vcpu_guest = [guest_node_of_vcpu(v, req.vcpus, self.guests) for v in range(req.vcpus)]
        self.free = {n: max(0, topo.nodes[n].mem_free - load.node_bytes.get(n, 0)) for n in self.allowed}
        self.placed: dict[int, int] = {}  # vCPUs this plan put on each host node
        self.vcpu_why: dict[int, str] = {}

    def run(self) -> Plan:
        nodes, vcpu_cpus = {
            Policy.MANUAL: self._manual,
            Policy.LOCAL_FIRST: self._local_first,
            Policy.LOAD_BALANCED: self._load_balanced,
            Policy.INTERLEAVE: self._interleave,
            Policy.PREFERRED: self._preferred,
        }[self.req.policy]()
        vcpus = tuple(VcpuPlan(v, g, vcpu_cpus[v], self.vcpu_why.get(v, ""))
                      for v, g in enumerate(self.vcpu_guest))
        return Plan(self.req.policy, tuple(nodes), vcpus)

    # --- the policies ---

    def _manual(self) -> tuple[list[NodePlan], list[frozenset[int]]]:
        """Memory of guest node i bound to allowed[i] (wrapped); vCPUs float over the allowed CPUs."""
        mapping = wrap_node_map(self.guests, self.allowed)
        nodes = [
            replace(self._bind(g, [h], split=False),
                    why=f"guest node {g} takes allowed host node #{g % len(self.allowed)} of "
                        f"{list(self.allowed)}, in the order given")
            for g, h in enumerate(mapping)
        ]
        return nodes, [self._allowed_cpus()] * self.req.vcpus

    def _local_first(self) -> tuple[list[NodePlan], list[frozenset[int]]]:
        """Each guest node on one host node (memory bound there, vCPUs on its CPUs)."""
        nodes: list[NodePlan] = []
        cpus: dict[int, frozenset[int]] = {}
        for g, size in enumerate(self.sizes):
            host = self._best_node(size)
            why = self._why_node(host, size)
            if self.free[host] < size and not self.req.allow_split:
                most = max(self.allowed, key=lambda n: self.free[n])
                raise InsufficientMemory(
                    f"local-first: guest node {g} needs {size} bytes and no allowed host node has that "
                    f"much free (most: {self.free[most]} bytes on node {most}); allow_split spreads it"
                )
            nodes.append(replace(self._bind(g, [host], split=self.req.allow_split), why=why))
            cpus[g] = self.topo.cpus_of_node(host)
            self.placed[host] = self.placed.get(host, 0) + self.vcpu_guest.count(g)
        self._follow_guest_nodes(nodes, cpus)
        return nodes, [cpus[g] for g in self.vcpu_guest]

    def _load_balanced(self) -> tuple[list[NodePlan], list[frozenset[int]]]:
        """One vCPU per CPU, least loaded first, SMT siblings of used cores last;
        each guest node's memory bound to the nodes its vCPUs landed on."""
        assigned: dict[int, int] = {}
        guest_hosts: dict[int, list[int]] = {}
        chosen: list[frozenset[int]] = []
        for g in self.vcpu_guest:
            mine = guest_hosts.setdefault(g, [])
            cpu = min(self._allowed_cpus(), key=lambda c: self._cpu_rank(c, assigned, mine))
            node = self.topo.node_of_cpu(cpu)
            self.vcpu_why[len(chosen)] = (
                f"CPU {cpu} (host node {node}) ranks first: {assigned.get(cpu, 0)} vCPUs of this VM on it, "
                f"busy {self.load.cpu.get(cpu, 0.0):.2f}, node pressure {self._pressure(node):.2f}")
            assigned[cpu] = assigned.get(cpu, 0) + 1
            self.placed[node] = self.placed.get(node, 0) + 1
            if node not in mine:
                mine.append(node)
            chosen.append(frozenset({cpu}))
        nodes = [
            replace(self._bind(g, guest_hosts.get(g) or [self._best_node(size)], split=self.req.allow_split),
                    why=f"memory on the host node(s) its vCPUs landed on: {guest_hosts.get(g) or 'none'}")
            for g, size in enumerate(self.sizes)
        ]
        return nodes, chosen

    def _interleave(self) -> tuple[list[NodePlan], list[frozenset[int]]]:
        """Every guest node's memory interleaved over all allowed nodes; vCPUs float over allowed CPUs."""
        with_memory = [n for n in self.allowed if self.topo.nodes[n].mem_total > 0] or list(self.allowed)
        self._require_total(sum(self.sizes), with_memory)
        nodes = []
        for g, size in enumerate(self.sizes):
            share = {h: size // len(with_memory) for h in with_memory}
            free = describe_size(sum(self.free[n] for n in with_memory))
            nodes.append(NodePlan(g, tuple(with_memory), MemPolicy.INTERLEAVE, size, share,
                                  f"interleaved over the allowed host nodes with memory {with_memory}: "
                                  f"{free} free >= {describe_size(size)}"))
        cpus = self._allowed_cpus()
        for v in range(self.req.vcpus):
            self.vcpu_why[v] = f"floats over the allowed host nodes' CPUs {format_cpulist(cpus)}"
        return nodes, [cpus] * self.req.vcpus

    def _preferred(self) -> tuple[list[NodePlan], list[frozenset[int]]]:
        """Like local-first, but MPOL_PREFERRED: the kernel spills to the nearest nodes when full."""
        self._require_total(sum(self.sizes), list(self.allowed))
        nodes: list[NodePlan] = []
        cpus: dict[int, frozenset[int]] = {}
        for g, size in enumerate(self.sizes):
            host = self._best_node(size)
            why = self._why_node(host, size) + "; preferred: spills to the nearest nodes when full"
            per_host = self._take(g, self._nearest_allowed(host), size, split=True)
            nodes.append(NodePlan(g, (host,), MemPolicy.PREFERRED, size, per_host, why))
            cpus[g] = self.topo.cpus_of_node(host)
            self.placed[host] = self.placed.get(host, 0) + self.vcpu_guest.count(g)
        self._follow_guest_nodes(nodes, cpus)
        return nodes, [cpus[g] for g in self.vcpu_guest]

    # --- explanations ---

    def _figures(self, node: int) -> str:
        cpus = self.topo.cpus_of_node(node)
        busy = sum(self.load.cpu.get(c, 0.0) for c in cpus) / len(cpus) if cpus else 0.0
        return (f"node {node}: {describe_size(self.free[node])} free, busy {busy:.2f}, "
                f"pressure {self._pressure(node):.2f}")

    def _why_node(self, host: int, size: int) -> str:
        """Why _best_node chose ``host``: fit first, then pressure, then free memory."""
        fits = ">=" if self.free[host] >= size else "<"
        why = f"host node {host}: {describe_size(self.free[host])} free {fits} {describe_size(size)} needed"
        others = [n for n in self.allowed if n != host]
        if others:
            why += "; " + self._figures(host) + "; " + "; ".join(self._figures(n) for n in others)
        return why

    def _follow_guest_nodes(self, nodes: list[NodePlan], cpus: dict[int, frozenset[int]]) -> None:
        for v, g in enumerate(self.vcpu_guest):
            host = nodes[g].host_nodes[0]
            self.vcpu_why[v] = (f"follows guest node {g} to host node {host}: "
                                f"its CPUs {format_cpulist(cpus[g])}")

    # --- helpers ---

    def _pressure(self, node: int) -> float:
        cpus = self.topo.cpus_of_node(node)
        if not cpus:
            return math.inf
        busy = sum(self.load.cpu.get(c, 0.0) for c in cpus)
        return (busy + self.load.node_vcpus.get(node, 0) + self.placed.get(node, 0)) / len(cpus)

    def _best_node(self, size: int) -> int:
        """Allowed node with online CPUs, one that fits ``size`` first, then least pressed, most free."""
        candidates = [n for n in self.allowed if self.topo.cpus_of_node(n)]
        if not candidates:
            raise InvalidArgument(f"allowed host nodes {list(self.allowed)} have no online CPU")
        return min(candidates, key=lambda n: (self.free[n] < size, self._pressure(n), -self.free[n], n))

    def _cpu_rank(self, cpu: int, assigned: Mapping[int, int], guest_hosts: list[int]) -> tuple[object, ...]:
        node = self.topo.node_of_cpu(cpu)
        sibling_used = any(assigned.get(s, 0) for s in self.topo.smt_siblings(cpu) if s != cpu)
        tenth = int(self.load.cpu.get(cpu, 0.0) * 10)  # loads within a tenth count as equal
        return (
            assigned.get(cpu, 0),
            sibling_used,
            tenth,
            int(self._pressure(node) * 10),
            node not in guest_hosts,  # keep a guest node together when nothing else decides
            cpu,
        )

    def _allowed_cpus(self) -> frozenset[int]:
        """Online CPUs of the allowed nodes; if those are memory-only, of the nearest node with CPUs."""
        cpus = frozenset(c for n in self.allowed for c in self.topo.cpus_of_node(n))
        return cpus or self.topo.nearest_online_cpus(self.allowed[0])

    def _nearest_allowed(self, node: int) -> list[int]:
        return [n for n in self.topo.nearest_nodes(node) if n in self.free]

    def _bind(self, guest: int, hosts: list[int], *, split: bool) -> NodePlan:
        """MPOL_BIND on ``hosts`` (plus, with ``split``, the nearest allowed nodes it spills to)."""
        order = hosts + [n for n in self._nearest_allowed(hosts[0]) if n not in hosts] if split else hosts
        per_host = self._take(guest, order, self.sizes[guest], split=split)
        used = tuple(dict.fromkeys([*hosts, *per_host]))
        return NodePlan(guest, used, MemPolicy.BIND, self.sizes[guest], per_host)

    def _take(self, guest: int, order: list[int], size: int, *, split: bool) -> dict[int, int]:
        """Reserve ``size`` bytes from the nodes of ``order``, in that order."""
        if sum(self.free[n] for n in order) < size:
            free = ", ".join(f"{self.free[n]} on node {n}" for n in order)
            hint = "" if split else "; allow_split spreads a guest node over several host nodes"
            raise InsufficientMemory(f"guest node {guest} needs {size} bytes, free bytes: {free}{hint}")
        per_host: dict[int, int] = {}
        left = size
        for n in order:
            take = min(left, self.free[n])
            if take:
                per_host[n] = take
                self.free[n] -= take
                left -= take
        return per_host

    def _require_total(self, size: int, nodes: list[int]) -> None:
        total = sum(self.free[n] for n in nodes)
        if total < size:
            raise InsufficientMemory(f"{size} bytes asked, host nodes {nodes} have {total} bytes free")


def describe_size(n: int) -> str:
    """Bytes for a reason text: GiB with one decimal from 1 GiB, else MiB."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def _validate(topo: HostTopology, req: PlacementRequest) -> None:
    if req.vcpus < 1:
        raise InvalidArgument(f"vcpus must be at least 1, got {req.vcpus}")
    # memory_bytes 0: memory comes later (SetupNumaMemory); only vCPUs are placed.
    if req.memory_bytes < 0 or req.memory_bytes % PAGE_SIZE:
        raise InvalidArgument(f"memory_bytes must be a multiple of {PAGE_SIZE}: {req.memory_bytes}")
    if req.guest_nodes < 0:
        raise InvalidArgument(f"guest_nodes must not be negative, got {req.guest_nodes}")
    if req.memory_bytes and req.memory_bytes // PAGE_SIZE < max(1, req.guest_nodes):
        raise InvalidArgument(f"{req.memory_bytes} bytes: under a page per guest node ({req.guest_nodes})")
    if not isinstance(req.policy, Policy):
        raise InvalidArgument(f"unknown policy {req.policy!r}")
    for n in req.host_nodes:
        if n not in topo.nodes:
            raise NodeOutOfRange(f"host node {n} does not exist (nodes: {format_cpulist(set(topo.nodes))})")
