"""One sample of every VM the daemon holds, per guest node and per vCPU, and
of every host node.

``Sampler.take`` is the only stateful part: it keeps the previous CPU times
(the busy fraction is a difference) and, per vCPU thread, the figures of the
last full read.  A vCPU whose CPU time has not moved since then has not run,
so it cannot have changed CPU or migrated: only its schedstat is read again.
That keeps a sample of idle VMs at one small read per vCPU (bench/sampling.py).
The aggregation below is pure: (facts read) -> figures.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import psutil

from kvmnumad.errors import NoSuchVM
from kvmnumad.model import MemoryRegionInfo
from kvmnumad.numa.topology import HostTopology, read_free_memory
from kvmnumad.optimizer import probe
from kvmnumad.optimizer.model import HostNodeSample, Residency, Sample, VcpuSample, VmSample
from kvmnumad.placement import guest_node_of_vcpu


class SampledVm(Protocol):
    """What a sample reads of a VM (kvmnumad.vm.Vm has it)."""

    name: str

    @property
    def numa_enabled(self) -> bool: ...

    @property
    def node_map(self) -> list[int]: ...

    @property
    def numa_nodes(self) -> int: ...

    def vcpu_threads(self) -> list[tuple[int, int]]: ...

    def memory_regions(self) -> list[MemoryRegionInfo]: ...


def process_of(vm: object) -> str:
    """Whose /proc holds the VM's threads and memory: "self" for a VM of
    kvmnumad's own, the VMM's pid for an adopted one (kvmnumad/adopt/vm.py)."""
    return str(getattr(vm, "pid", 0)) if getattr(vm, "adopted", False) else "self"


class _Seen(NamedTuple):
    cpu_time_ns: int
    cpu: int
    migrations: int
    affinity: frozenset[int]


def residency(regions: Sequence[MemoryRegionInfo], node_map: Sequence[int], numa_enabled: bool,
              pages_at: Mapping[int, Mapping[int, int]]) -> tuple[Residency, ...]:
    """Per guest node: its regions' resident pages per host node.  The mapped
    node is the guest node's entry in the node map (NUMA on), else the node
    its first region is bound to."""
    per_guest: dict[int, dict[int, int]] = {}
    home: dict[int, int] = {}
    for r in regions:
        pages = per_guest.setdefault(r.guest_node, {})
        for node, n in pages_at.get(r.hva, {}).items():
            pages[node] = pages.get(node, 0) + n
        if numa_enabled and r.guest_node < len(node_map):
            home[r.guest_node] = node_map[r.guest_node]
        else:
            home.setdefault(r.guest_node, r.host_node)
    return tuple(Residency(g, home[g], dict(sorted(per_guest[g].items()))) for g in sorted(per_guest))


def busy_fractions(before: Sequence[Any] | None, after: Sequence[Any]) -> dict[int, float]:
    """Busy share per CPU between two psutil.cpu_times(percpu=True) readings
    (since boot without ``before``): 1 - (idle + iowait) / total."""
    out: dict[int, float] = {}
    for cpu, now in enumerate(after):
        then = before[cpu] if before is not None and cpu < len(before) else None
        total = float(sum(now)) - (float(sum(then)) if then is not None else 0.0)
        idle = _idle(now) - (_idle(then) if then is not None else 0.0)
        out[cpu] = min(1.0, max(0.0, 1.0 - idle / total)) if total > 0 else 0.0
    return out


def _idle(t: object) -> float:
    return float(getattr(t, "idle", 0.0)) + float(getattr(t, "iowait", 0.0))


def host_nodes(topo: HostTopology, busy: Mapping[int, float], free: Mapping[int, int],
               vms: Sequence[VmSample],
               numastat: Callable[[int], dict[str, int]]) -> tuple[HostNodeSample, ...]:
    pages: dict[int, int] = {}
    vcpus: dict[int, int] = {}
    for vm in vms:
        for r in vm.residency:
            for node, n in r.pages.items():
                pages[node] = pages.get(node, 0) + n
        for v in vm.vcpus:
            if v.node >= 0:
                vcpus[v.node] = vcpus.get(v.node, 0) + 1
    out = []
    for nid in topo.node_ids():
        online = topo.nodes[nid].online_cpus
        load = sum(busy.get(c, 0.0) for c in online) / len(online) if online else 0.0
        out.append(HostNodeSample(nid, frozenset(online), load, free.get(nid, topo.nodes[nid].mem_free),
                                  pages.get(nid, 0), vcpus.get(nid, 0), numastat(nid)))
    return tuple(out)


RESIDENCY_EVERY = 10  # samples between numa_maps reads at the most (see Sampler._pages_at)


class Sampler:
    """See the module docstring.  Not thread-safe: one taker at a time (the timer)."""

    def __init__(self, residency_every: int = RESIDENCY_EVERY) -> None:
        """``residency_every=1``: numa_maps on every take (the balancer's, which
        must see pages that someone else moved)."""
        self._residency_every = residency_every
        self._cpu_times: list[Any] | None = None
        self._seen: dict[int, _Seen] = {}
        self._key: object = None
        self._since = 0
        self._fresh = True
        self._pages: Mapping[int, Mapping[int, int]] = {}

    def take(self, vms: Sequence[SampledVm], topo: HostTopology) -> Sample:
        started = time.thread_time()
        seen: dict[int, _Seen] = {}
        regions = {}
        for vm in vms:
            with contextlib.suppress(NoSuchVM):
                regions[vm.name] = vm.memory_regions()
        vms = [vm for vm in vms if vm.name in regions]
        # Our own VMs' memory is in this process: one numa_maps read for all of
        # them.  An adopted VM's is its VMM's (a mapping address of another
        # address space): read from that process, each sample.
        pages_at = self._pages_at({vm.name: regions[vm.name] for vm in vms if process_of(vm) == "self"})
        vm_samples = {}
        for vm in vms:
            pid = process_of(vm)
            own = pid == "self"
            try:
                vm_samples[vm.name] = measure_vm(
                    vm, topo, self._seen, seen, regions=regions[vm.name],
                    pages_at=pages_at if own else probe.numa_maps([r.hva for r in regions[vm.name]], pid))
            except NoSuchVM:
                continue  # destroyed under the sample: its removal is an event of its own
        self._seen = seen  # threads of VMs gone are forgotten here
        after = list(psutil.cpu_times(percpu=True))
        busy = busy_fractions(self._cpu_times, after)
        self._cpu_times = after
        nodes = host_nodes(topo, busy, read_free_memory(), list(vm_samples.values()), probe.numastat)
        return Sample(time.time(), vm_samples, nodes, time.thread_time() - started, self._fresh)

    def _pages_at(self, regions: Mapping[str, Sequence[MemoryRegionInfo]]) -> Mapping[int, Mapping[int, int]]:
        """numa_maps, read again only when residency may have changed.

        One read costs in proportion to *all* the process's mappings (each
        vCPU thread adds a stack, its guard and a kvm_run mapping): 11 ms for
        64 VMs of 4 vCPUs here, twice the budget of a whole sample.  So it is
        read when the process's resident shared memory (RssShmem: guest memory
        is shmem) or the set of regions and their nodes changed since the last
        read, and at least every RESIDENCY_EVERY samples for what neither
        shows (pages moved by someone else, e.g. migratepages).
        """
        key = (probe.rss_shmem(), tuple(sorted((r.hva, r.size, r.host_node) for rs in regions.values()
                                               for r in rs)))
        self._fresh = key != self._key or self._since >= self._residency_every - 1
        if self._fresh:
            self._pages = probe.numa_maps([r.hva for rs in regions.values() for r in rs])
            self._key, self._since = key, 0
        else:
            self._since += 1
        return self._pages



def measure_vm(vm: SampledVm, topo: HostTopology, previous: Mapping[int, _Seen] | None = None,
               seen: dict[int, _Seen] | None = None, *, regions: Sequence[MemoryRegionInfo] | None = None,
               pages_at: Mapping[int, Mapping[int, int]] | None = None) -> VmSample:
    """One VM now (stateless without ``previous``: every figure read)."""
    if regions is None:
        regions = vm.memory_regions()
    node_map = tuple(vm.node_map)
    numa = vm.numa_enabled
    pid = process_of(vm)
    if pages_at is None:
        pages_at = probe.numa_maps([r.hva for r in regions], pid) if regions else {}
    vcpus = []
    threads = vm.vcpu_threads()
    guests = vm.numa_nodes if numa else 0
    for index, tid in threads:
        guest = guest_node_of_vcpu(index, len(threads), guests) if guests else 0
        vcpus.append(_vcpu(index, tid, guest, topo, previous=previous or {}, seen=seen, pid=pid))
    nodes = residency(regions, node_map, numa, pages_at)
    return VmSample(vm.name, numa, node_map, nodes, tuple(vcpus))


def _vcpu(index: int, tid: int, guest_node: int, topo: HostTopology, *, previous: Mapping[int, _Seen],
          seen: dict[int, _Seen] | None, pid: str = "self") -> VcpuSample:
    stat = probe.schedstat(tid, pid)
    cpu_ns, delay_ns = stat if stat is not None else (0, 0)
    last = previous.get(tid)
    if last is not None and stat is not None and last.cpu_time_ns == cpu_ns:
        # Not run since: the kernel cannot have moved it (a sleeping task
        # changes CPU only when it wakes, and then it runs).
        now = _Seen(cpu_ns, last.cpu, last.migrations, probe.affinity(tid))
    else:
        now = _Seen(cpu_ns, probe.last_cpu(tid, pid), probe.migrations(tid, pid), probe.affinity(tid))
    if seen is not None and stat is not None:
        seen[tid] = now
    node = topo.cpus[now.cpu].node if now.cpu in topo.cpus else -1
    return VcpuSample(index, tid, guest_node, cpu_ns, delay_ns, now.cpu, node, max(0, now.migrations),
                      now.affinity)
