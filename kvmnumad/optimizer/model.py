"""The figures one sample holds: plain frozen values, so that the bus, the
report, the metrics and the suggestions read the same numbers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class Residency:
    """Where one guest node's resident pages are.  ``host_node`` is the node
    the guest node is mapped to; pages never touched are not counted."""

    guest_node: int
    host_node: int
    pages: Mapping[int, int]  # host node -> resident pages (numa_maps N<node>=)

    @property
    def pages_there(self) -> int:
        return self.pages.get(self.host_node, 0)

    @property
    def pages_elsewhere(self) -> int:
        return sum(n for node, n in self.pages.items() if node != self.host_node)

    @property
    def locality(self) -> float:
        """Share of resident pages on the mapped node; 1.0 while nothing is
        resident (nothing sits anywhere else)."""
        total = self.pages_there + self.pages_elsewhere
        return self.pages_there / total if total else 1.0


class VcpuSample(NamedTuple):
    """A NamedTuple, not a frozen dataclass: a sample makes one per vCPU, and
    creating a 9-field frozen dataclass costs several times as much."""

    vcpu: int
    tid: int
    guest_node: int
    cpu_time_ns: int  # schedstat field 1: time on a CPU (guest time included)
    run_delay_ns: int  # schedstat field 2: time runnable but waiting for a CPU
    cpu: int  # the CPU it last ran on (stat field 39), -1 once the thread is gone
    node: int  # that CPU's host node, -1 if unknown
    migrations: int  # se.nr_migrations of /proc/.../sched
    affinity: frozenset[int] = frozenset()  # sched_getaffinity now


@dataclass(frozen=True)
class VmSample:
    name: str
    numa_enabled: bool
    node_map: tuple[int, ...]
    residency: tuple[Residency, ...]
    vcpus: tuple[VcpuSample, ...]


@dataclass(frozen=True)
class HostNodeSample:
    node: int
    online_cpus: frozenset[int]
    busy: float  # 0..1, mean over its online CPUs since the previous sample (since boot at first)
    mem_free: int  # bytes, the node's MemFree
    vm_pages: int  # resident pages of our VMs on this node
    vm_vcpus: int  # vCPUs of our VMs that last ran on this node
    numastat: Mapping[str, int]  # /sys/devices/system/node/nodeN/numastat (pages, since boot)


@dataclass(frozen=True)
class Sample:
    taken_at: float  # time.time()
    vms: Mapping[str, VmSample]
    nodes: tuple[HostNodeSample, ...]
    cost_s: float = 0.0  # CPU time the sample cost this thread
    residency_read: bool = True  # numa_maps read for this sample (else the last read's figures still hold)
