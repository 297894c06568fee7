"""The host's NUMA topology as immutable values, read from sysfs.

sysfs is the source libnuma itself reads (node cpumaps, ``distance``,
``meminfo``), so reading it directly gives the same figures for any root
directory: tests feed a hand-made tree for shapes this host cannot have, and
the multi-NUMA guest checks the real ones against ``numactl -H``.

Shapes handled: one node; memory-only nodes (no CPUs); offline CPUs (the
kernel removes their ``topology/`` directory and their bit in the node
cpulist, but keeps the ``nodeN/cpuM`` links); and no ``/sys/devices/system/node``
at all (a kernel without CONFIG_NUMA: one node 0 holding every CPU).  With a
single node its memory figures are psutil's system-wide ones (see read_topology).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import psutil

from kvmnumad import cpulist
from kvmnumad.errors import CpuOffline, InvalidArgument, NodeOutOfRange

UNKNOWN = -1  # core/package of an offline CPU: the kernel hides its topology/ directory

_NODE_DIR = re.compile(r"^node(\d+)$")
_CPU_DIR = re.compile(r"^cpu(\d+)$")


# Kept as names of this module: topology readers and their tests use them.
parse_cpulist = cpulist.parse
format_cpulist = cpulist.format


@dataclass(frozen=True)
class Cpu:
    id: int
    node: int
    core: int  # core_id, UNKNOWN while offline
    package: int  # physical_package_id, UNKNOWN while offline
    siblings: frozenset[int]  # thread_siblings_list, the CPU itself included
    online: bool


@dataclass(frozen=True)
class Node:
    id: int
    cpus: frozenset[int]  # every CPU of the node, offline ones included
    mem_total: int  # bytes
    mem_free: int  # bytes
    distances: dict[int, int]  # node id -> SLIT distance (10 = local)
    offline_cpus: frozenset[int] = frozenset()

    @property
    def online_cpus(self) -> frozenset[int]:
        return self.cpus - self.offline_cpus


@dataclass(frozen=True)
class HostTopology:
    nodes: dict[int, Node]
    cpus: dict[int, Cpu]

    def node_ids(self) -> list[int]:
        return sorted(self.nodes)

    @functools.cached_property
    def _online(self) -> frozenset[int]:
        return frozenset(c.id for c in self.cpus.values() if c.online)

    def online_cpus(self) -> frozenset[int]:
        """Cached: a topology is immutable, and every pin checks against it."""
        return self._online

    def require_online(self, cpus: Iterable[int]) -> frozenset[int]:
        """``cpus`` as a set; a CPU the host does not have is InvalidArgument
        (no hotplug can bring it: the request is wrong), one that exists but
        is offline CpuOffline (it may come back); both name the CPU."""
        wanted = frozenset(cpus)
        if not wanted:
            raise InvalidArgument("CPU set is empty")
        if wanted <= self._online:
            return wanted
        for cpu in sorted(wanted - self._online):
            if cpu not in self.cpus:
                raise InvalidArgument(f"CPU {cpu} does not exist (host CPUs: {cpulist.describe(self.cpus)})",
                                      cpu=cpu)
            raise CpuOffline(f"CPU {cpu} is offline (online: {cpulist.describe(self._online)})", cpu=cpu)
        return wanted  # pragma: no cover - the loop always raises

    def nearest_online_cpus(self, node: int) -> frozenset[int]:
        """Online CPUs of ``node`` or, when it has none (memory-only, or all of
        them offline), of the nearest node by distance that has some: where a
        vCPU of that node runs best."""
        for candidate in self.nearest_nodes(node):
            cpus = self.nodes[candidate].online_cpus
            if cpus:
                return cpus
        raise CpuOffline(f"no online CPU near host node {node}", node=node)

    def node(self, node: int) -> Node:
        try:
            return self.nodes[node]
        except KeyError:
            raise NodeOutOfRange(f"host node {node} does not exist (nodes: {self.node_ids()})",
                                 node=node) from None

    def node_of_cpu(self, cpu: int) -> int:
        try:
            return self.cpus[cpu].node
        except KeyError:
            known = format_cpulist(set(self.cpus))
            raise InvalidArgument(f"host CPU {cpu} does not exist (CPUs: {known})", cpu=cpu) from None

    def cpus_of_node(self, node: int, online_only: bool = True) -> frozenset[int]:
        n = self.node(node)
        return n.online_cpus if online_only else n.cpus

    def distance(self, a: int, b: int) -> int:
        self.node(b)
        return self.node(a).distances[b]

    def nearest_nodes(self, node: int) -> list[int]:
        """Every node, nearest first (the node itself leads: its distance is the smallest)."""
        dist = self.node(node).distances
        return sorted(self.nodes, key=lambda other: (other != node, dist.get(other, 255), other))

    def cpu_less_nodes(self) -> frozenset[int]:
        """Nodes with no online CPU: memory-only nodes, or nodes whose CPUs are all offline."""
        return frozenset(n.id for n in self.nodes.values() if not n.online_cpus)

    def smt_siblings(self, cpu: int) -> frozenset[int]:
        """Hardware threads sharing ``cpu``'s core, ``cpu`` included (the kernel's thread_siblings_list)."""
        self.node_of_cpu(cpu)
        return self.cpus[cpu].siblings


def synthetic(
    node_cpus: dict[int, list[int]],
    *,
    mem_free: int | dict[int, int] = 1 << 30,
    distances: dict[tuple[int, int], int] | None = None,
    smt: list[list[int]] | None = None,
    offline: set[int] | frozenset[int] = frozenset(),
) -> HostTopology:
    """A hand-made topology for pure code (placement) and its tests.

    ``distances`` gives one direction per pair (the other is mirrored; 10 local,
    20 remote by default); ``smt`` lists groups of hardware threads sharing a core.
    """
    free = mem_free if isinstance(mem_free, dict) else dict.fromkeys(node_cpus, mem_free)
    dist = dict(distances or {})
    core_of: dict[int, int] = {}
    for core, group in enumerate(smt or []):
        core_of.update(dict.fromkeys(group, core))
    cpus: dict[int, Cpu] = {}
    for nid, ids in node_cpus.items():
        for cid in ids:
            core = core_of.get(cid, 1000 + cid)
            siblings = frozenset(c for c, k in core_of.items() if k == core) or frozenset({cid})
            cpus[cid] = Cpu(cid, nid, core, 0, siblings, cid not in offline)
    nodes = {
        nid: Node(
            nid,
            frozenset(ids),
            free.get(nid, 0),
            free.get(nid, 0),
            {o: 10 if o == nid else dist.get((nid, o), dist.get((o, nid), 20)) for o in node_cpus},
            frozenset(ids) & frozenset(offline),
        )
        for nid, ids in node_cpus.items()
    }
    return HostTopology(nodes=nodes, cpus=cpus)


class _RawNode(NamedTuple):
    cpus: frozenset[int]  # cpulist (online CPUs) plus the cpuN links (offline ones too)
    mem_total: int
    mem_free: int
    distance_row: list[int]


def _read(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        if default is None:
            raise
        return default


def _ids(directory: Path, pattern: re.Pattern[str]) -> frozenset[int]:
    return frozenset(int(m.group(1)) for e in os.listdir(directory) if (m := pattern.match(e)))


def _meminfo(path: Path) -> tuple[int, int]:
    """(MemTotal, MemFree) in bytes from a node's meminfo ("Node 0 MemTotal:  6121676 kB")."""
    fields: dict[str, int] = {}
    for line in _read(path, "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("MemTotal:", "MemFree:"):
            fields[parts[2]] = int(parts[3]) * 1024
    return fields.get("MemTotal:", 0), fields.get("MemFree:", 0)


def _node_ids(node_dir: Path) -> list[int]:
    online = _read(node_dir / "online", "").strip()
    return sorted(parse_cpulist(online) if online else _ids(node_dir, _NODE_DIR))


def _read_nodes(node_dir: Path) -> dict[int, _RawNode]:
    out: dict[int, _RawNode] = {}
    for nid in _node_ids(node_dir):
        d = node_dir / f"node{nid}"
        cpus = parse_cpulist(_read(d / "cpulist", "")) | _ids(d, _CPU_DIR)
        row = [int(x) for x in _read(d / "distance", "").split()]
        out[nid] = _RawNode(cpus, *_meminfo(d / "meminfo"), row)
    return out


def _read_cpu(cpu_dir: Path, cid: int, node: int, online: bool) -> Cpu:
    topo = cpu_dir / f"cpu{cid}/topology"
    unknown = Cpu(cid, node, UNKNOWN, UNKNOWN, frozenset({cid}), online)
    if not topo.is_dir():  # offline: the kernel removed it
        return unknown
    try:
        core = int(_read(topo / "core_id", str(UNKNOWN)))
        package = int(_read(topo / "physical_package_id", str(UNKNOWN)))
        siblings = parse_cpulist(_read(topo / "thread_siblings_list", "")) | {cid}
    except OSError:
        # The CPU went offline between the directory check and the read
        # (ENODEV or EPERM from its topology files, seen in the hotplug
        # storm): its uevent follows and brings a fresh read.
        return unknown
    return Cpu(cid, node, core, package, siblings, online)


def read_topology(sysfs: Path = Path("/sys")) -> HostTopology:
    """Read nodes, CPUs, distances and per-node memory under ``sysfs``."""
    cpu_dir = sysfs / "devices/system/cpu"
    node_dir = sysfs / "devices/system/node"
    present = parse_cpulist(_read(cpu_dir / "present", "")) or _ids(cpu_dir, _CPU_DIR)
    online_text = _read(cpu_dir / "online", "").strip()
    online = parse_cpulist(online_text) if online_text else present

    raw = _read_nodes(node_dir) if node_dir.is_dir() else {0: _RawNode(present, 0, 0, [10])}
    if len(raw) == 1:
        # With one node all memory is that node's, and the system figures are the reliable
        # ones: some kernels (lazily initialised memory in VMs) under-report node meminfo.
        ((nid, r),) = raw.items()
        vm = psutil.virtual_memory()
        raw[nid] = r._replace(mem_total=int(vm.total), mem_free=int(vm.free))
    node_ids = sorted(raw)
    node_of = {cid: nid for nid, r in raw.items() for cid in r.cpus}

    cpus = {c: _read_cpu(cpu_dir, c, node_of.get(c, node_ids[0]), c in online) for c in sorted(present)}
    nodes: dict[int, Node] = {}
    for nid, r in raw.items():
        # The row lists distances to the online nodes in id order; without one, assume the
        # kernel's defaults (10 local, 20 remote).
        distances = {other: 10 if other == nid else 20 for other in node_ids}
        if len(r.distance_row) == len(node_ids):
            distances = dict(zip(node_ids, r.distance_row, strict=True))
        mine = frozenset(c.id for c in cpus.values() if c.node == nid)
        offline = frozenset(c for c in mine if c not in online)
        nodes[nid] = Node(nid, mine, r.mem_total, r.mem_free, distances, offline)
    return HostTopology(nodes=nodes, cpus=cpus)


def read_free_memory(sysfs: Path = Path("/sys")) -> dict[int, int]:
    """MemFree per node now, read as read_topology reads it (the system figure
    with one node).  Admission re-reads this at every plan: a topology read at
    start kept its free memory while VMs became resident (issue 12 finding 3:
    the planner saw 23.05 GiB free when the kernel said 22.03)."""
    node_dir = sysfs / "devices/system/node"
    nids = _node_ids(node_dir) if node_dir.is_dir() else [0]
    if len(nids) == 1:
        return {nid: int(psutil.virtual_memory().free) for nid in nids}
    # Only the meminfo files: the whole _read_nodes (cpulists, a listing of each node's
    # directory) costs ten times as much, and the sampler reads this every period.
    return {nid: _meminfo(node_dir / f"node{nid}" / "meminfo")[1] for nid in nids}


def with_free_memory(topo: HostTopology, free: dict[int, int]) -> HostTopology:
    """``topo`` with each node's mem_free replaced by ``free`` (nodes missing there keep theirs)."""
    nodes = {nid: replace(n, mem_free=free.get(nid, n.mem_free)) for nid, n in topo.nodes.items()}
    return HostTopology(nodes=nodes, cpus=topo.cpus)
