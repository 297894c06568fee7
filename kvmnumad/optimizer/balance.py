"""Automatic balancing: which guest nodes to move, as pure functions over samples.

The unit is a guest node: its vCPUs and its memory belong together on one
host node.  Two rules, each with hysteresis (a move is made only when its
expected gain beats a threshold well above the noise) and a dwell time (a
guest node moved less than ``dwell_s`` ago is left alone, whatever the
figures say), so the balancer never oscillates:

- ``follow-memory`` (local-first and load-balanced): the guest node's vCPUs
  sit on host node V but most of its resident pages are on H (someone ran
  migratepages, or the kernel put them there).  Locality now is the share of
  pages on V; when it is below ``1 - min_gain`` the guest node goes to H (the
  vCPUs move, the memory is re-mapped where it already is: almost no copy),
  or, when H is busy, the memory comes back to V (a copy).
- ``node-load`` (load-balanced only): the vCPUs' node is contended: its busy
  fraction not counting this guest node's own vCPUs, plus the share of time
  those vCPUs waited for a CPU (run delay), is >= ``busy_high``.  The guest
  node (vCPUs and memory) goes to the least busy node with room for its
  memory, if that is at least ``min_load_gain`` less contended.  Counting run
  delay is what makes a CPU-bound vCPU sharing a CPU with a hog count as
  contended (the node then looks only half busy with others).

A caller's explicit pin (SetVcpuAffinity, BindVcpuToNumaNode) or map
(MapNumaNode) is never changed: the other half of the guest node comes to it
instead (memory to pinned vCPUs, vCPUs to mapped memory), and when both are
explicit nothing moves.  Guest nodes whose vCPUs are unpinned or spread over
several host nodes, guest nodes a migration job is moving (whoever started
it), and VMs without guest NUMA, are left alone.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kvmnumad.errors import CpuOffline
from kvmnumad.model import Policy
from kvmnumad.numa.topology import HostTopology
from kvmnumad.optimizer.model import HostNodeSample, Residency, VcpuSample, VmSample

VCPUS = "vcpus"  # re-pin a guest node's vCPUs to a host node's CPUs
MEMORY = "memory"  # re-map a guest node's memory to a host node

BALANCED_POLICIES = frozenset({Policy.LOCAL_FIRST, Policy.LOAD_BALANCED})


def default_auto_balance(policy: Policy) -> bool:
    """AutoBalance of a new VM: on for the policies that place by measure."""
    return policy in BALANCED_POLICIES


@dataclass(frozen=True)
class Thresholds:
    min_gain: float = 0.30  # locality gain (share of the guest node's pages) a memory rule must expect
    busy_high: float = 0.60  # contention of a node at which the load rule looks for a better one
    min_load_gain: float = 0.40  # contention the load rule must expect to shed
    dwell_s: float = 60.0  # a guest node moved less than this long ago stays where it is
    reserve_bytes: int = 64 << 20  # free memory a destination keeps besides the pages it receives
    low_free_bytes: int = 256 << 20  # a node's free memory crossing this triggers a pass


@dataclass(frozen=True)
class Move:
    vm: str
    kind: str  # VCPUS or MEMORY
    guest_node: int
    from_node: int  # MEMORY: the node it is mapped to (memory-to-vcpus: the one holding most pages)
    to_node: int
    gain: float  # locality (0..1) for follow-memory, contention shed (0..1) for node-load
    rule: str
    reason: str


@dataclass(frozen=True)
class VmFacts:
    """One VM with AutoBalance on, as the balancer needs it."""

    sample: VmSample
    policy: Policy
    explicit_vcpus: frozenset[int] = frozenset()  # vCPUs a caller pinned or bound
    explicit_nodes: frozenset[int] = frozenset()  # guest nodes a caller mapped
    page_size: int = 4096
    allowed_nodes: frozenset[int] = frozenset()  # the host nodes its request allowed; empty: all

    def allows(self, node: int) -> bool:
        return not self.allowed_nodes or node in self.allowed_nodes


@dataclass(frozen=True)
class Load:
    """Per host node its busy fraction (0..1, all CPUs' mean) and free bytes;
    per vCPU thread the CPUs' worth it ran and the share of time it waited
    (both over the last interval)."""

    nodes: Mapping[int, HostNodeSample]
    vcpu_busy: Mapping[int, float] = field(default_factory=dict)  # tid -> CPU seconds per second
    vcpu_delay: Mapping[int, float] = field(default_factory=dict)  # tid -> waiting seconds per second
    interval_s: float = 0.0  # what the figures cover; 0: a first measure (busy since boot), not judged


def plan(vms: Sequence[VmFacts], load: Load, topo: HostTopology, *, now: float,
         last_moved: Mapping[tuple[str, int], float], thresholds: Thresholds = Thresholds(),
         moving: Collection[tuple[str, int]] = frozenset()) -> list[Move]:
    """Every move one pass makes now, guest node by guest node.  ``moving``:
    the (VM, guest node)s a migration job moves now, the balancer's or a
    caller's: each is left alone (its figures are a move half-way, and a
    second job on it would only be refused Busy)."""
    moves: list[Move] = []
    for facts in vms:
        vm = facts.sample
        if not vm.numa_enabled:
            continue
        by_guest = {r.guest_node: r for r in vm.residency}
        for g, r in sorted(by_guest.items()):
            if (vm.name, g) in moving:
                continue
            if now - last_moved.get((vm.name, g), float("-inf")) < thresholds.dwell_s:
                continue
            vcpus = [v for v in vm.vcpus if v.guest_node == g]
            moves.extend(_guest_node(_Unit(facts, g, r, vcpus), load, topo, thresholds))
    return moves


def _node_of(vcpus: Sequence[VcpuSample], topo: HostTopology) -> int | None:
    """The one host node all these vCPUs may run on, else None."""
    nodes = {topo.cpus[c].node for v in vcpus for c in v.affinity if c in topo.cpus}
    return nodes.pop() if len(nodes) == 1 and all(v.affinity for v in vcpus) else None


class _Unit(NamedTuple):
    """One guest node of one VM: what the rules weigh."""

    facts: VmFacts
    g: int
    r: Residency
    vcpus: Sequence[VcpuSample]


def _guest_node(unit: _Unit, load: Load, topo: HostTopology, th: Thresholds) -> list[Move]:
    facts, g, r, vcpus = unit
    if not vcpus:
        return []
    vm = facts.sample.name
    v_node = _node_of(vcpus, topo)
    if v_node is None:
        return []  # unpinned or spread over nodes: no one node to compare the memory with
    pinned = any(v.vcpu in facts.explicit_vcpus for v in vcpus)
    mapped = g in facts.explicit_nodes
    total = sum(r.pages.values())
    if pinned and mapped:
        return []  # the caller decided both halves
    if mapped:
        # The caller's map stays: the vCPUs come to it.
        if v_node == r.host_node:
            return []
        share = r.pages.get(r.host_node, 0) / total if total else 1.0
        now = r.pages.get(v_node, 0) / total if total else 0.0
        return [Move(vm, VCPUS, g, v_node, r.host_node, share - now, "follow-caller-map",
                     f"guest node {g}: a caller mapped it to host node {r.host_node}, its vCPUs run on node "
                     f"{v_node}: they follow the caller's map")]
    if not pinned and facts.policy == Policy.LOAD_BALANCED:
        moved = _node_load(unit, v_node, load, topo, th)
        if moved:
            return moved
    if not total:
        return []
    # A memory-only node's pages are as near as they get to the CPUs of its nearest node with CPUs.
    near = {n: cpu_home(topo, n) for n in r.pages}
    here = sum(p for n, p in r.pages.items() if near[n] == v_node) / total
    if here >= 1.0 - th.min_gain:
        return []  # local enough: what a move could gain is within the hysteresis band
    most = max(r.pages, key=lambda n: (r.pages[n], near[n] == v_node))
    share = r.pages[most] / total
    to_cpus = near[most]
    if to_cpus is None or to_cpus == v_node:
        return []
    figures = (f"guest node {g}: {share:.0%} of its {total} resident pages on host node {most}, "
               f"{here:.0%} on node {v_node} where its vCPUs run")
    target_busy = _busy(load, to_cpus)
    if not pinned and target_busy < th.busy_high and facts.allows(most) and facts.allows(to_cpus):
        if share - here < th.min_gain:
            return []
        why = f"{figures}: follow the memory (no copy; node {to_cpus} busy {target_busy:.2f})"
        out = [Move(vm, MEMORY, g, r.host_node, most, share - here, "follow-memory", why)] \
            if r.host_node != most else []
        return [*out, Move(vm, VCPUS, g, v_node, to_cpus, share - here, "follow-memory", why)]
    # The memory comes to the vCPUs: they are the caller's, or the memory's node is busy (or not allowed).
    copy = (total - r.pages.get(v_node, 0)) * facts.page_size
    if 1.0 - here < th.min_gain or not facts.allows(v_node) or not _room(load, v_node, copy, th):
        return []
    if pinned:
        why = f"{figures}: its vCPUs are pinned by a caller: the memory comes to them (a copy)"
    elif not facts.allows(most):
        why = f"{figures}: node {most} is not among the VM's allowed nodes: the memory comes back (a copy)"
    else:
        why = (f"{figures}: node {to_cpus} is busy {target_busy:.2f} >= {th.busy_high:.2f}: the memory comes "
               "back to the vCPUs (a copy)")
    return [Move(vm, MEMORY, g, most, v_node, 1.0 - here, "memory-to-vcpus", why)]


def cpu_home(topo: HostTopology, node: int) -> int | None:
    """Where a vCPU near ``node``'s memory runs: the node itself when it has
    online CPUs, else the nearest one that has (a memory-only node)."""
    if node not in topo.nodes:
        return None
    if topo.cpus_of_node(node):
        return node
    try:
        cpus = topo.nearest_online_cpus(node)
    except CpuOffline:  # no online CPU anywhere: nowhere to put vCPUs
        return None
    return topo.cpus[min(cpus)].node if cpus else None


def _busy(load: Load, node: int) -> float:
    n = load.nodes.get(node)
    return n.busy if n is not None else 1.0


def _room(load: Load, node: int, size: int, th: Thresholds) -> bool:
    n = load.nodes.get(node)
    return n is not None and n.mem_free >= size + th.reserve_bytes


def contention(load: Load, node: int, vcpus: Sequence[VcpuSample]) -> float:
    """How contended ``node`` is for these vCPUs: its busy fraction without
    their own CPU use, plus the mean share of time they waited for a CPU."""
    n = load.nodes.get(node)
    if n is None or not n.online_cpus:
        return 1.0
    own = sum(load.vcpu_busy.get(v.tid, 0.0) for v in vcpus) / len(n.online_cpus)
    waited = sum(load.vcpu_delay.get(v.tid, 0.0) for v in vcpus) / len(vcpus)
    return min(1.0, max(0.0, n.busy - own) + waited)


def _node_load(unit: _Unit, v_node: int, load: Load, topo: HostTopology, th: Thresholds) -> list[Move]:
    facts, g, r, vcpus = unit
    if not load.interval_s > 0 or any(v.tid not in load.vcpu_busy for v in vcpus):
        return []  # busy since boot, or vCPUs not measured over the interval: nothing to judge by
    here = contention(load, v_node, vcpus)
    if here < th.busy_high:
        return []
    resident = sum(r.pages.values()) * facts.page_size
    candidates = [
        n for n in load.nodes.values()
        if n.node != v_node and n.online_cpus and facts.allows(n.node) and _room(load, n.node, resident, th)
    ]
    if not candidates:
        return []
    distance = topo.nodes[v_node].distances if v_node in topo.nodes else {}
    best = min(candidates, key=lambda n: (n.busy, distance.get(n.node, 255), n.node))
    gain = here - best.busy
    if gain < th.min_load_gain:
        return []
    vm = facts.sample.name
    why = (f"guest node {g}: host node {v_node} contended {here:.2f} >= {th.busy_high:.2f} (busy without its "
           f"vCPUs plus their run delay); node {best.node} busy {best.busy:.2f} with "
           f"{best.mem_free >> 20} MiB free for its {resident >> 20} MiB: move there")
    out = [Move(vm, MEMORY, g, r.host_node, best.node, gain, "node-load", why)]
    return [*out, Move(vm, VCPUS, g, v_node, best.node, gain, "node-load", why)]


def crossings(before: Sequence[HostNodeSample] | None, after: Sequence[HostNodeSample],
              th: Thresholds = Thresholds()) -> list[str]:
    """What changed between two samples that deserves a pass now, not at the
    next period: a node's busy fraction or free memory crossing its threshold
    (either way: load that went is room to use)."""
    if before is None:
        return []
    then = {n.node: n for n in before}
    out = []
    for n in after:
        old = then.get(n.node)
        if old is None:
            continue
        if (old.busy >= th.busy_high) != (n.busy >= th.busy_high):
            out.append(f"host node {n.node} busy {old.busy:.2f} -> {n.busy:.2f} "
                       f"(threshold {th.busy_high:.2f})")
        if (old.mem_free < th.low_free_bytes) != (n.mem_free < th.low_free_bytes):
            out.append(f"host node {n.node} free memory {old.mem_free >> 20} -> {n.mem_free >> 20} MiB "
                       f"(threshold {th.low_free_bytes >> 20} MiB)")
    return out
