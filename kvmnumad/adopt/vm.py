"""An adopted VM: another process's KVM guest, placed by kvmnumad.

It answers the same read side and placement verbs as the Manager's own Vm
(the bus, reports and hotplug use it unchanged) but owns nothing: no VM fd,
no thread, no memory.  Placement is done to the VMM's threads and pages
from outside, with sched_setaffinity on their tids and move_pages(2) on
the process: never by moving a thread between cgroups, because a VMM run
by libvirt lives in libvirt's machine.slice and libvirt owns that.
Lifecycle verbs (start, stop, destroy, guest NUMA changes) are refused: the
guest is the VMM's.  Release leaves every thread and page where it is.

Balancing (AutoBalance, rebalance.py) treats it as one of kvmnumad's own: a
guest node's memory moves as a migration job (vm/migration.py, move_pages
on the VMM's pid) and its vCPUs follow.  What a caller pinned, bound or
mapped is explicit here too, and the balancer leaves it be.

The process is held by a pidfd opened before anything was read from /proc,
so the pid cannot be reused under the adoption; watch.py waits on it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmnumad import cpulist, errors, placement
from kvmnumad.adopt import procfs
from kvmnumad.adopt.discovery import AdoptOptions, Discovery, Region
from kvmnumad.events import Aspect, Event
from kvmnumad.journal import log_event
from kvmnumad.model import JobState, MemoryRegionInfo, Policy, VcpuStats, VmState, VmStats
from kvmnumad.numa import memory as numa_memory
from kvmnumad.numa.topology import HostTopology
from kvmnumad.vm.explicit import ExplicitPlacement
from kvmnumad.vm.numa import GuestNuma
from kvmnumad.vm.saved import Recovery
from kvmnumad.vm.vcpus import Repin, _nearest_online

log = logging.getLogger(__name__)


@dataclass
class AdoptedVcpu:
    index: int
    tid: int
    declared: frozenset[int] | None = None
    bound_node: int | None = None
    explicit: bool = False  # a caller's pin or bind (not the policy's, not the balancer's)

    def effective(self) -> frozenset[int]:
        return frozenset(os.sched_getaffinity(self.tid))


@dataclass(frozen=True)
class AdoptedMemory:
    """The VMM's guest memory mappings (for the owner's quota count, as a Vm's regions are)."""

    regions: tuple[Region, ...]

    def of_guest_node(self, node: int) -> list[Region]:
        return [r for r in self.regions if r.guest_node == node]


class AdoptedVm(ExplicitPlacement):
    adopted = True
    recovery = Recovery.NONE  # a daemon restart re-attaches it (records.py), it is never re-made

    allowed_nodes: frozenset[int] = frozenset()  # no request limited its host nodes: the balancer may use all

    def __init__(self, name: str, found: Discovery, pidfd: int, topology: Callable[[], HostTopology], *,
                 owner: int = 0, policy: Policy = Policy.MANUAL,
                 node_map: Sequence[int] | None = None, options: AdoptOptions | None = None) -> None:
        self.name = name
        self.options = options or AdoptOptions()  # what it was adopted with: a restart re-adopts with it
        self.owner = owner
        self.policy = policy
        self.found = found
        self.pid = found.pid
        self.start_time = found.start_time
        self.vmm = found.vmm
        self.pidfd = pidfd
        self.memory = AdoptedMemory(found.regions)
        self._topology = topology
        self._emit: Callable[[Event], None] = lambda event: None
        self._lock = threading.RLock()
        self._released = False
        self.vcpus = [AdoptedVcpu(i, found.vcpus[i]) for i in sorted(found.vcpus)]
        self.auto_balance = False
        self.explicit_nodes: set[int] = set()  # guest nodes a caller mapped (MapNumaNode, a caller's job)
        self.numa = GuestNuma(name)
        topo = topology()
        observed = list(node_map) if node_map is not None else self._observed_map(topo)
        self.numa.enable(found.numa_nodes, observed, topo)

    def _observed_map(self, topo: HostTopology) -> list[int]:
        """Guest node -> the host node holding most of its pages now (what the
        VMM did), else its backend's host-nodes, else the planner's default."""
        default = placement.wrap_node_map(self.found.numa_nodes, topo.node_ids())
        resident = self._resident()
        out = []
        for g in range(self.found.numa_nodes):
            counts: dict[int, int] = {}
            for r in self.memory.regions:
                if r.guest_node == g:
                    for n, c in resident.get(r.start, {}).items():
                        counts[n] = counts.get(n, 0) + c
            hinted = [h for h in self.found.host_nodes.get(g, ()) if h in topo.nodes]
            if counts:
                out.append(max(counts, key=lambda n: counts[n]))
            else:
                out.append(hinted[0] if hinted else default[g])
        return out

    def _resident(self) -> dict[int, dict[int, int]]:
        """Mapping start -> pages per node (the kernel's numa_maps)."""
        try:
            return procfs.numa_maps_pages(self.pid)
        except (ProcessLookupError, PermissionError):
            return {}  # the process went away: its removal follows from the pidfd

    def _alive(self) -> None:
        if self._released:
            raise errors.NoSuchVM(f"VM {self.name!r} has been released", vm=self.name)

    def _not_ours(self, verb: str) -> errors.Busy:
        return errors.Busy(f"VM {self.name!r} is adopted ({self.vmm or 'VMM'} process {self.pid}): "
                           f"kvmnumad does not {verb} it, the guest is not ours; ReleaseVM lets it go",
                           vm=self.name, pid=self.pid)

    # ------------------------------------------------------------------ lifecycle (refused)
    def start(self) -> None:
        self._alive()
        raise self._not_ours("start")

    def stop(self) -> None:
        self._alive()
        raise self._not_ours("stop")

    def refuse_destroy(self) -> None:
        raise self._not_ours("destroy")

    def enable_numa(self, nodes: int, node_map: Sequence[int] | None = None) -> None:
        raise self._not_ours("change the guest NUMA layout of")

    def disable_numa(self) -> None:
        raise self._not_ours("change the guest NUMA layout of")

    def setup_numa_memory(self, node: int, size: int, gpa: int, **kw: object) -> int:
        raise self._not_ours("add memory to")

    def definition(self) -> None:
        """Not a VM kvmnumad can make: a Reexec handover (handover.py) leaves it out, and the new
        process re-attaches it from its record (records.py), its VMM having run on meanwhile."""
        raise errors.Busy(f"VM {self.name!r} is adopted ({self.vmm or 'VMM'} process {self.pid}): nothing to "
                          "hand over, it is re-attached from its adoption record", vm=self.name)

    def release(self) -> None:
        """Let go: threads and pages stay where they are; only the pidfd closes."""
        with self._lock:
            if self._released:
                return
            self._released = True
            os.close(self.pidfd)

    destroy = release  # Manager.shutdown releases every VM it holds

    def exited(self) -> bool:
        try:
            return procfs.start_time(self.pid) != self.start_time
        except ProcessLookupError:
            return True

    # ------------------------------------------------------------------ placement
    def _vcpu(self, index: int) -> AdoptedVcpu:
        if not 0 <= index < len(self.vcpus):
            raise errors.NoSuchVcpu(f"VM {self.name!r} has no vCPU {index} (it has {len(self.vcpus)})",
                                    vcpu=index, vcpus=len(self.vcpus))
        return self.vcpus[index]

    def _apply(self, v: AdoptedVcpu, cpus: frozenset[int]) -> None:
        try:
            os.sched_setaffinity(v.tid, cpus)
        except ProcessLookupError:
            raise errors.NoSuchVM(f"VM {self.name!r}: its process {self.pid} is gone", vm=self.name) from None
        except OSError as e:
            if e.errno == errno.EINVAL:
                # Online CPUs outside the thread's cpuset: its cgroup belongs
                # to whoever runs the VMM (libvirt), and we do not move it.
                raise errors.InvalidArgument(
                    f"CPUs {cpulist.describe(cpus)} are outside the cpuset of thread {v.tid} of process "
                    f"{self.pid} (its cgroup is the VMM manager's: kvmnumad never moves it)",
                    cpus=sorted(cpus)) from e
            raise errors.CpuOffline(f"sched_setaffinity({v.tid}, {cpulist.describe(cpus)}): {e.strerror}",
                                    cpus=sorted(cpus)) from e

    def _declare(self, v: AdoptedVcpu, cpus: frozenset[int], bound: int | None) -> bool:
        changed = (v.declared, v.bound_node) != (cpus, bound) or v.effective() != cpus
        self._apply(v, cpus)
        v.declared, v.bound_node = cpus, bound
        return changed

    def set_vcpu_affinity(self, vcpu: int, cpus: Sequence[int]) -> None:
        topo = self._topology()
        with self._lock:
            self._alive()
            v = self._vcpu(vcpu)
            wanted = topo.require_online(cpus)
            changed = self._declare(v, wanted, None) or not v.explicit
            v.explicit = True
            if not changed:
                return
        log_event("pin", f"vCPU {vcpu} of adopted VM {self.name} (thread {v.tid}) pinned to CPUs "
                  f"{cpulist.describe(wanted)}", vm=self.name, vcpu=vcpu, cpus=wanted, reason="api")
        self._changed(Aspect.VCPU_PLACEMENT)

    def get_vcpu_affinity(self, vcpu: int) -> list[int]:
        with self._lock:
            self._alive()
            return sorted(self._vcpu(vcpu).effective())

    def bind_vcpu_to_numa_node(self, vcpu: int, node: int) -> frozenset[int]:
        topo = self._topology()
        with self._lock:
            self._alive()
            v = self._vcpu(vcpu)
            self.numa.require(node)
            cpus = self.numa.host_cpus(node, topo)
            self._declare(v, cpus, node)
            v.explicit = True
        log_event("bind", f"vCPU {vcpu} of adopted VM {self.name} bound to guest node {node} "
                  f"(CPUs {cpulist.describe(cpus)})", vm=self.name, vcpu=vcpu, cpus=cpus,
                  node=self.numa.host_of(node), reason="api")
        self._changed(Aspect.VCPU_PLACEMENT)
        return cpus

    def bind_all(self) -> None:
        """A policy's placement at adoption: every vCPU on its guest node's host CPUs."""
        topo = self._topology()
        with self._lock:
            for v in self.vcpus:
                g = self.found.vcpu_nodes.get(v.index, 0)
                self._declare(v, self.numa.host_cpus(g, topo), g)
        self._changed(Aspect.VCPU_PLACEMENT)

    def get_vcpu_numa_node(self, vcpu: int) -> tuple[bool, int]:
        topo = self._topology()
        with self._lock:
            self._alive()
            v = self._vcpu(vcpu)
            if v.bound_node is None:
                return False, self.guest_node_of_vcpu(vcpu)
            return v.effective() <= self.numa.host_cpus(v.bound_node, topo), v.bound_node

    def map_numa_node(self, node: int, host_node: int) -> list[tuple[int, int]]:
        """Move guest node ``node``'s pages to ``host_node`` with move_pages(2)
        on the VMM process, live; its bound vCPUs follow.  The VMM's own
        memory policy is left alone (mbind cannot reach into another
        process), so pages it faults in later go where it says."""
        topo = self._topology()
        with self._lock:
            self._alive()
            self.numa.require(node)
            topo.node(host_node)
            old = self.numa.host_of(node)
            moved = []
            done: list[Region] = []
            for slot, r in enumerate(self.memory.regions):
                if r.guest_node != node:
                    continue
                try:
                    pages = numa_memory.migrate_range(r.start, r.size, host_node, pid=self.pid)
                except ProcessLookupError:
                    raise errors.NoSuchVM(f"VM {self.name!r}: its process {self.pid} is gone",
                                          vm=self.name) from None
                except OSError as e:
                    self._move_back(done, old)
                    raise errors.InsufficientMemory(f"moving {r.name} of adopted VM {self.name!r} to host "
                                                    f"node {host_node}: {e}", node=host_node) from e
                done.append(r)
                moved.append((slot, pages))
                log_event("migrate", f"adopted VM {self.name} guest node {node} ({r.name}, {pages} pages) "
                          f"moved from host node {old} to {host_node}", vm=self.name, node=host_node,
                          from_node=old, to_node=host_node, reason="map-numa-node")
            self.numa.node_map[node] = host_node
            self.explicit_nodes.add(node)
            self._follow(node, self.numa.host_cpus(node, topo))
        self._changed(Aspect.NUMA_LAYOUT, Aspect.MEMORY, Aspect.VCPU_PLACEMENT)
        return moved

    def _follow(self, node: int, cpus: frozenset[int]) -> list[int]:
        """The vCPUs bound to guest node ``node`` go to its new host CPUs: which ones."""
        followers = []
        for v in self.vcpus:
            if v.bound_node == node:
                self._apply(v, cpus)
                v.declared = cpus
                followers.append(v.index)
        return followers

    # ------------------------------------------------------------------ migration jobs (vm/migration.py)
    def begin_migration(self, node: int, host_node: int, slot: int | None) -> list[Region]:
        """The regions a job moves (``slot``: an index of MemoryRegions).
        Nothing is pointed anywhere first, unlike a Vm's: the VMM's memory
        policy is its own (mbind cannot reach into another process), so the
        job's move_pages alone moves the pages, and pages the VMM faults in
        later go where its policy says."""
        topo = self._topology()
        with self._lock:
            self._alive()
            self.numa.require(node)
            topo.node(host_node)
            regions = [r for i, r in enumerate(self.memory.regions)
                       if r.guest_node == node and (slot is None or i == slot)]
            if slot is not None and not regions:
                raise errors.InvalidArgument(f"VM {self.name!r} has no memory slot {slot} in guest node "
                                             f"{node}", slot=slot, node=node)
            if not regions:
                raise errors.InvalidArgument(f"guest node {node} of VM {self.name!r} has no memory to move",
                                             node=node)
            return regions

    def end_migration(self, node: int, host_node: int, regions: list[Region], state: JobState,
                      moved: int) -> tuple[int, list[int], frozenset[int]]:
        """As Vm.end_migration: DONE re-maps the guest node (when the job
        covered all of it) and its bound vCPUs follow; CANCELLED leaves the
        pages where they are; FAILED moves them back, as far as the kernel lets it."""
        topo = self._topology()
        with self._lock:
            old = self.numa.host_of(node)
            if self._released or self.exited():  # nothing to re-map, nothing to move back
                return old, [], frozenset()
            followers: list[int] = []
            cpus: frozenset[int] = frozenset()
            if state == JobState.DONE:
                whole = {r.start for r in regions} == {r.start for r in self.memory.of_guest_node(node)}
                if whole and old != host_node:
                    self.numa.node_map[node] = host_node
                    cpus = self.numa.host_cpus(node, topo)
                    followers = self._follow(node, cpus)
            elif state == JobState.FAILED:
                self._move_back(regions, old)
        self._changed(Aspect.NUMA_LAYOUT, Aspect.MEMORY, Aspect.VCPU_PLACEMENT)
        return old, followers, cpus

    # ------------------------------------------------------------------ balancing (rebalance.py)
    def _vcpu_list(self) -> list[AdoptedVcpu]:  # ExplicitPlacement's: set_auto_balance, clear_explicit...
        return self.vcpus

    def _vcpu_at(self, index: int) -> AdoptedVcpu:
        return self._vcpu(index)

    def _move_back(self, regions: list[Region], node: int) -> None:
        """A move that failed half-way: what moved goes back, as far as the kernel lets it."""
        for r in regions:
            try:
                numa_memory.migrate_range(r.start, r.size, node, pid=self.pid)
            except OSError as e:
                log.error("adopted VM %s: %s could not be moved back to host node %d: %s", self.name, r.name,
                          node, e)

    def apply_declared(self, vcpu: int, cpus: frozenset[int] | None, bound_node: int | None) -> None:
        with self._lock:
            v = self._vcpu(vcpu)
            if cpus is not None:
                self._declare(v, cpus, bound_node)
        self._changed(Aspect.VCPU_PLACEMENT)

    def repin(self, topo: HostTopology) -> list[Repin]:
        """The same rule as a Vm's vCPUs (vm/vcpus.py), on the VMM's threads."""
        moves: list[Repin] = []
        online = topo.online_cpus()
        with self._lock:
            if self._released:
                return []
            for v in self.vcpus:
                if v.declared is None:
                    continue
                target = v.declared & online or _nearest_online(topo, v.declared)
                try:
                    old = v.effective()
                    if target != old:
                        os.sched_setaffinity(v.tid, target)
                        moves.append((v.index, old, target))
                except OSError:
                    continue  # the thread is gone: the process's exit removes the VM
        if moves:
            self._changed(Aspect.VCPU_PLACEMENT)
        return moves

    def placement(self) -> tuple[list[int], list[tuple[int, list[int] | None, int | None]]]:
        """(node map, per vCPU (index, declared CPUs, bound guest node)): what a restart restores."""
        with self._lock:
            return list(self.numa.node_map), [
                (v.index, None if v.declared is None else sorted(v.declared), v.bound_node)
                for v in self.vcpus]

    def restore_placement(self, node_map: Sequence[int],
                          vcpus: Sequence[tuple[int, list[int] | None, int | None]]) -> None:
        """Declare again what placement() gave, on the CPUs online now."""
        topo = self._topology()
        GuestNuma.check(self.numa.nodes, node_map, topo)
        online = topo.online_cpus()
        with self._lock:
            self.numa.node_map = list(node_map)
            for index, cpus, bound in vcpus:
                v = self._vcpu(index)
                if bound is not None:
                    self.numa.require(bound)
                    self._declare(v, self.numa.host_cpus(bound, topo), bound)
                elif cpus:
                    declared = frozenset(cpus)
                    self._apply(v, declared & online or _nearest_online(topo, declared))
                    v.declared, v.bound_node = declared, None
        self._changed(Aspect.VCPU_PLACEMENT)

    # ------------------------------------------------------------------ views
    @property
    def state(self) -> VmState:
        return VmState.RUNNING

    @property
    def vcpu_count(self) -> int:
        return len(self.vcpus)

    @property
    def memory_bytes(self) -> int:
        return sum(r.size for r in self.memory.regions)

    def guest_node_of_vcpu(self, vcpu: int) -> int:
        return self.found.vcpu_nodes.get(vcpu, 0)

    def vcpu_threads(self) -> list[tuple[int, int]]:
        return [(v.index, v.tid) for v in self.vcpus]

    def _effective_or_empty(self, v: AdoptedVcpu) -> list[int]:
        try:
            return sorted(v.effective())
        except OSError:
            return []  # exited: the VM's removal follows

    def vcpu_affinity(self) -> list[tuple[int, list[int]]]:
        with self._lock:
            return [(v.index, self._effective_or_empty(v)) for v in self.vcpus]

    def declared_vcpu_affinity(self) -> list[tuple[int, list[int]]]:
        with self._lock:
            return [(v.index, sorted(v.declared or ())) for v in self.vcpus]

    def vcpu_nodes(self) -> list[tuple[int, bool, int]]:
        with self._lock:
            out = []
            for v in self.vcpus:
                try:
                    out.append((v.index, *self.get_vcpu_numa_node(v.index)))
                except (OSError, errors.NoSuchVM):
                    out.append((v.index, False, self.guest_node_of_vcpu(v.index)))
            return out

    def memory_regions(self) -> list[MemoryRegionInfo]:
        """Guest-physical addresses are the VMM's and not known here: 0."""
        with self._lock:
            return [MemoryRegionInfo(i, 0, r.size, r.guest_node, self.numa.host_of(r.guest_node), r.start)
                    for i, r in enumerate(self.memory.regions)]

    def stats(self) -> VmStats:
        """Per-thread CPU time and CPU from /proc; pages per host node from
        the process's numa_maps.  Exit counts are the VMM's (none here)."""
        with self._lock:
            self._alive()
            per_vcpu = tuple(VcpuStats(v.index, v.tid, procfs.task_cpu_time_ns(self.pid, v.tid),
                                       procfs.task_current_cpu(self.pid, v.tid), {}, 0) for v in self.vcpus)
            pages: dict[int, int] = {}
            resident = self._resident()
            for r in self.memory.regions:
                for n, c in resident.get(r.start, {}).items():
                    pages[n] = pages.get(n, 0) + c
            return VmStats({}, per_vcpu, pages, 0)


def is_adopted(vm: object) -> bool:
    return isinstance(vm, AdoptedVm)


def adoption_of(vm: object) -> tuple[str, int]:
    """(VMM, pid) of an adopted VM; ("", 0) for one of kvmnumad's own."""
    return (vm.vmm or "unknown", vm.pid) if isinstance(vm, AdoptedVm) else ("", 0)
