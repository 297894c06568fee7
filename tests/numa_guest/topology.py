"""The guest shapes the NUMA suite runs in.

One table serves both sides: the launcher turns it into vng flags, and the
smoke test inside the guest checks the kernel really shows it, so the two can
never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOCAL_DISTANCE = 10
DEFAULT_REMOTE_DISTANCE = 20  # what QEMU reports for a pair without -numa dist


@dataclass(frozen=True)
class Node:
    mem_mb: int
    cpus: frozenset[int]  # empty: a memory-only node


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: tuple[Node, ...]
    # One direction per pair; QEMU mirrors it.
    distances: dict[tuple[int, int], int] = field(default_factory=dict)

    @property
    def ncpus(self) -> int:
        return sum(len(n.cpus) for n in self.nodes)

    @property
    def mem_mb(self) -> int:
        return sum(n.mem_mb for n in self.nodes)

    def distance(self, a: int, b: int) -> int:
        if a == b:
            return LOCAL_DISTANCE
        return self.distances.get((a, b), self.distances.get((b, a), DEFAULT_REMOTE_DISTANCE))

    def vng_args(self) -> list[str]:
        args = ["--cpus", str(self.ncpus), "-m", f"{self.mem_mb}M"]
        for node in self.nodes:
            spec = f"{node.mem_mb}M"
            if node.cpus:
                lo, hi = min(node.cpus), max(node.cpus)
                assert node.cpus == frozenset(range(lo, hi + 1)), "vng takes one CPU range per node"
                spec += f",cpus={lo}" if lo == hi else f",cpus={lo}-{hi}"
            args += ["--numa", spec]
        for (a, b), d in sorted(self.distances.items()):
            args += ["--numa-distance", f"{a},{b}={d}"]
        return args


def _cpus(*cpus: int) -> frozenset[int]:
    return frozenset(cpus)


TOPOLOGIES: dict[str, Topology] = {
    t.name: t
    for t in (
        Topology("2node", (Node(1024, _cpus(0, 1)), Node(1024, _cpus(2, 3)))),
        Topology(
            "4node",
            tuple(Node(512, _cpus(c)) for c in range(4)),
            {(0, 1): 15, (0, 2): 30, (0, 3): 30, (1, 2): 30, (1, 3): 30, (2, 3): 15},
        ),
        # Nodes 0 and 1 carry the CPUs, node 2 only memory (like CXL or HBM
        # expanders): placement code must not assume every node has CPUs.
        Topology(
            "memonly",
            (Node(768, _cpus(0, 1)), Node(768, _cpus(2, 3)), Node(512, _cpus())),
        ),
    )
}
