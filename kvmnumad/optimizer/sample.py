"""One sample of every VM the daemon holds, per guest node and per vCPU, and
of every host node.

``Sampler.take`` is the only stateful part: it keeps the previous CPU times
(the busy fraction is a difference) and, per vCPU thread, its last schedstat
line and the figures made of it.  A vCPU whose CPU time has not moved since
then has not run, so it cannot have changed CPU or migrated: only its
schedstat and affinity are read again, and an unchanged line gives back the
same VcpuSample (an idle VM's VmSample and Residency likewise: a sample of
idle VMs makes almost no objects).  The timer's sampler also keeps the files
open (``keep_open``, probe.KeptFiles).  Together that keeps a sample of 64
idle VMs x 4 vCPUs at the cost of one bare read per vCPU (bench/sampling.py).
The aggregation below is pure: (facts read) -> figures.
"""

from __future__ import annotations

import contextlib
import threading
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
    """A vCPU thread's schedstat path, its last line as read, and the figures made of it."""

    path: str
    raw: bytes
    sample: VcpuSample


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
    """See the module docstring.  Not thread-safe: one taker at a time (the
    timer); ``forget`` and ``close`` may come from any thread."""

    def __init__(self, residency_every: int = RESIDENCY_EVERY, *, keep_open: bool = False) -> None:
        """``residency_every=1``: numa_maps on every take (the balancer's, which
        must see pages that someone else moved).  ``keep_open``: the files a
        take reads stay open for the next (probe.KeptFiles: a sixth of the
        cost), one per vCPU thread and up to three for one that ran; for a
        sampler that takes again and again, whose owner calls ``forget`` when
        a VM goes and ``close`` at the end."""
        self._residency_every = residency_every
        self._cpu_times: list[Any] | None = None
        self._seen: dict[int, _Seen] = {}
        self._key: object = None
        self._since = 0
        self._fresh = True
        self._pages: Mapping[int, Mapping[int, int]] = {}
        self._generation = 0  # of self._pages: a VM's residency is made again when it moves on
        self._files = probe.KeptFiles() if keep_open else None
        self._read: probe.Read = self._files.read if self._files is not None else probe.read_file
        self._topo: HostTopology | None = None
        self._last: dict[str, tuple[tuple[object, ...], VmSample]] = {}  # per VM: its sample and what made it
        self._lock = threading.Lock()
        self._threads: dict[str, tuple[str, list[int]]] = {}  # per VM: (pid, tids) of its last take
        self._forgotten: set[str] = set()  # VMs forgotten since the take under way began

    def take(self, vms: Sequence[SampledVm], topo: HostTopology) -> Sample:
        started = time.thread_time()
        with self._lock:
            self._forgotten.clear()
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
        # A topology re-read (hotplug) makes every vCPU's figures afresh: their CPUs' nodes may differ
        previous = self._seen if topo is self._topo else {}
        self._topo = topo
        vm_samples = {}
        last: dict[str, tuple[tuple[object, ...], VmSample]] = {}
        threads: dict[str, tuple[str, list[int]]] = {}
        for vm in vms:
            pid = process_of(vm)
            # An adopted VM's pages are read afresh each take: a token that never matches
            pages, token = ((pages_at, self._generation) if pid == "self" else
                            (probe.numa_maps([r.hva for r in regions[vm.name]], pid), object()))
            try:
                made = self._measure(vm, topo, previous=previous, seen=seen, regions=regions[vm.name],
                                     pages_at=pages, token=token, pid=pid)
            except NoSuchVM:
                continue  # destroyed under the sample: its removal is an event of its own
            vm_samples[vm.name] = made[1]
            last[vm.name] = made
            threads[vm.name] = (pid, [v.tid for v in made[1].vcpus])
        self._seen = seen  # threads of VMs gone are forgotten here
        self._last = last
        after = list(psutil.cpu_times(percpu=True))
        busy = busy_fractions(self._cpu_times, after)
        self._cpu_times = after
        nodes = host_nodes(topo, busy, read_free_memory(), list(vm_samples.values()),
                           lambda node: probe.numastat(node, self._read))
        self._keep(threads)
        return Sample(time.time(), vm_samples, nodes, time.thread_time() - started, self._fresh)

    def _keep(self, threads: dict[str, tuple[str, list[int]]]) -> None:
        """Close the files this take did not read (threads and VMs gone, files
        of a vCPU that did not run), and those of VMs forgotten while it ran."""
        if self._files is None:
            return
        with self._lock:
            for name in self._forgotten:
                if name in threads:
                    self._files.discard(_paths(*threads.pop(name)))
            self._threads = threads
            if threads:
                self._files.retain_read()
            else:  # no VM left: the host's files (status, numastat) go too, the timer now sleeps
                self._files.close()

    def forget(self, vm: str) -> None:
        """The VM is gone: close its threads' files now (and, at its end, those
        the take under way opened for it); with the last VM, all."""
        if self._files is None:
            return
        with self._lock:
            self._forgotten.add(vm)
            if vm in self._threads:
                self._files.discard(_paths(*self._threads.pop(vm)))
            if not self._threads:
                self._files.close()

    def close(self) -> None:
        if self._files is not None:
            self._files.close()

    def rerun(self) -> None:
        """The next take makes every vCPU's figures again, as if each had run
        (its files stay open): the busy VMs' cost, for bench/sampling.py."""
        self._seen = {}

    def open_files(self) -> set[str]:
        """The files kept open (for the tests' cross-check against /proc/PID/fd)."""
        return self._files.paths() if self._files is not None else set()

    def _measure(self, vm: SampledVm, topo: HostTopology, *, previous: Mapping[int, _Seen],
                 seen: dict[int, _Seen], regions: Sequence[MemoryRegionInfo],
                 pages_at: Mapping[int, Mapping[int, int]], token: object,
                 pid: str) -> tuple[tuple[object, ...], VmSample]:
        """One VM, the previous sample's objects kept where nothing changed:
        an idle VM's sample is the same VmSample again, no churn."""
        node_map = tuple(vm.node_map)
        numa = vm.numa_enabled
        guests = vm.numa_nodes if numa else 0
        key = (tuple(regions), node_map, numa, token)
        before = self._last.get(vm.name)
        if before is not None and before[0] == key:
            nodes = before[1].residency
        else:
            nodes = residency(regions, node_map, numa, pages_at)
        threads = vm.vcpu_threads()
        count = len(threads)
        read = self._read
        vcpus = []
        for index, tid in threads:
            guest = guest_node_of_vcpu(index, count, guests) if guests else 0
            last = previous.get(tid)
            if last is not None:
                # The steady case inline (a function call per vCPU is a tenth of the sample)
                raw = read(last.path)
                old = last.sample
                if raw == last.raw and old.vcpu == index and old.guest_node == guest \
                        and probe.affinity(tid) == old.affinity:
                    seen[tid] = last
                    vcpus.append(old)
                    continue
            else:
                raw = read(probe.task_path(pid, tid, "schedstat"))
            vcpus.append(_vcpu(index, tid, guest, topo, raw=raw, last=last, seen=seen, pid=pid, read=read))
        made = tuple(vcpus)
        if before is not None:
            old_vm = before[1]
            if old_vm.residency is nodes and old_vm.vcpus == made and old_vm.node_map == node_map \
                    and old_vm.numa_enabled == numa:
                return key, old_vm
        return key, VmSample(vm.name, numa, node_map, nodes, made)

    def _pages_at(self, regions: Mapping[str, Sequence[MemoryRegionInfo]]) -> Mapping[int, Mapping[int, int]]:
        """numa_maps, read again only when residency may have changed.

        One read costs in proportion to *all* the process's mappings (each
        vCPU thread adds a stack, its guard and a kvm_run mapping) and to the
        guest pages it walks: 9 ms for 64 VMs of 4 vCPUs and 512 MiB here,
        twice the budget of a whole sample (a move_pages query of the same
        pages costs 25 ms).  So it is read when the process's resident shared
        memory (RssShmem: guest memory is shmem) or the set of regions and
        their nodes changed since the last read, and at least every
        RESIDENCY_EVERY samples for what neither shows (pages moved by
        someone else, e.g. migratepages).
        """
        key = (probe.rss_shmem(self._read),
               tuple(sorted((r.hva, r.size, r.host_node) for rs in regions.values() for r in rs)))
        self._fresh = key != self._key or self._since >= self._residency_every - 1
        if self._fresh:
            self._pages = probe.numa_maps([r.hva for rs in regions.values() for r in rs])
            self._key, self._since = key, 0
            self._generation += 1
        else:
            self._since += 1
        return self._pages


_FILES = ("schedstat", "stat", "sched")  # what a vCPU's sample may read (probe.py)


def _paths(pid: str, tids: list[int]) -> list[str]:
    return [probe.task_path(pid, tid, name) for tid in tids for name in _FILES]


def measure_vm(vm: SampledVm, topo: HostTopology, *, regions: Sequence[MemoryRegionInfo] | None = None,
               pages_at: Mapping[int, Mapping[int, int]] | None = None) -> VmSample:
    """One VM now, every figure read (a new bus object's first values)."""
    if regions is None:
        regions = vm.memory_regions()
    node_map = tuple(vm.node_map)
    numa = vm.numa_enabled
    pid = process_of(vm)
    if pages_at is None:
        pages_at = probe.numa_maps([r.hva for r in regions], pid) if regions else {}
    threads = vm.vcpu_threads()
    guests = vm.numa_nodes if numa else 0
    read = probe.read_file
    vcpus = tuple(_vcpu(index, tid, guest_node_of_vcpu(index, len(threads), guests) if guests else 0, topo,
                        raw=read(probe.task_path(pid, tid, "schedstat")), last=None, seen=None, pid=pid,
                        read=read)
                  for index, tid in threads)
    return VmSample(vm.name, numa, node_map, residency(regions, node_map, numa, pages_at), vcpus)


def _vcpu(index: int, tid: int, guest_node: int, topo: HostTopology, *, raw: bytes | None, last: _Seen | None,
          seen: dict[int, _Seen] | None, pid: str, read: probe.Read) -> VcpuSample:
    """One vCPU from its schedstat line ``raw`` and ``last``, its figures of
    the previous take.  A CPU time that has not moved means the thread has
    not run since: the kernel cannot have moved it (a sleeping task changes
    CPU only when it wakes, and then it runs), so its stat and sched are not
    read again."""
    if raw is None:  # gone: no figures, and nothing kept of it
        return VcpuSample(index, tid, guest_node, 0, 0, -1, -1, 0, frozenset(probe.affinity(tid)))
    cpu_ns, delay_ns = probe.parse_schedstat(raw)
    if last is not None and last.sample.cpu_time_ns == cpu_ns:
        cpu, migrations = last.sample.cpu, last.sample.migrations
    else:
        cpu, migrations = probe.last_cpu(tid, pid, read), max(0, probe.migrations(tid, pid, read))
    cpu_info = topo.cpus.get(cpu)
    now = VcpuSample(index, tid, guest_node, cpu_ns, delay_ns, cpu, cpu_info.node if cpu_info else -1,
                     migrations, frozenset(probe.affinity(tid)))
    if seen is not None:
        seen[tid] = _Seen(last.path if last is not None else probe.task_path(pid, tid, "schedstat"), raw, now)
    return now
