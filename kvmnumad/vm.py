"""One KVM virtual machine: its fds, memory regions, vCPU threads and placement.

A Vm owns its kernel objects outright (VM fd, one memfd region per slot, one
vCPU fd and one host thread per vCPU) and releases each exactly once.  Every
placement it reports is read back from the kernel (sched_getaffinity,
move_pages), never from its own bookkeeping; the bookkeeping holds only the
*declared* intent that hotplug re-pinning needs to restore.

All methods are synchronous and thread-safe; the blocking ones (ioctls,
mbind, thread joins) must be called off an event loop.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvmnumad import errors
from kvmnumad.cgroups import VmCpuset
from kvmnumad.events import Aspect, Event, VmChanged
from kvmnumad.journal import log_event
from kvmnumad.kvm import payload as kvm_payload
from kvmnumad.kvm.runner import VcpuRunner
from kvmnumad.kvm.system import Kvm
from kvmnumad.kvm.vcpu import VcpuFd
from kvmnumad.kvm.vm import VmFd
from kvmnumad.memory import PAGE_SIZE, GuestRegion, is_page_aligned
from kvmnumad.model import (
    MemoryRegionInfo,
    Policy,
    VcpuStats,
    VmState,
    VmStats,
)
from kvmnumad.numa.memory import MemPolicy, pages_per_node
from kvmnumad.numa.topology import HostTopology, format_cpulist

log = logging.getLogger(__name__)

BOOT_SLOT = 0
BOOT_GPA = 0
BOOT_SIZE = 0x100000  # 1 MiB: payload code lives at ENTRY; guest NUMA memory starts above it
ENTRY = 0x1000
GUEST_RAM_BASE = 0x100000
GUEST_ADDR_LIMIT = 1 << 32  # the built-in payload runs in 32-bit flat mode
SERIAL_KEEP = 64 * 1024


@dataclass
class _Region:
    slot: int
    gpa: int
    guest_node: int
    host_nodes: frozenset[int]
    policy: MemPolicy
    mem: GuestRegion

    @property
    def size(self) -> int:
        return self.mem.size

    @property
    def end(self) -> int:
        return self.gpa + self.mem.size


@dataclass
class _Vcpu:
    index: int
    fd: VcpuFd
    runner: VcpuRunner
    declared: frozenset[int] | None = None  # None: not pinned by anyone
    bound_node: int | None = None  # guest node it is bound to, if any
    initialized: bool = False


def vcpu_guest_node(vcpu: int, vcpus: int, guest_nodes: int) -> int:
    """Contiguous blocks, as QEMU assigns CPUs to nodes by default."""
    if guest_nodes <= 0:
        return 0
    return vcpu * guest_nodes // vcpus


class Vm:
    """A VM owned by the Manager."""

    def __init__(
        self,
        name: str,
        kvm: Kvm,
        vcpus: int,
        topology: Callable[[], HostTopology],
        emit: Callable[[Event], None],
        *,
        owner: int = 0,
        policy: Policy = Policy.MANUAL,
        payload: bytes | None = None,
        passes: int = 0,
        max_slots: int = 32,
        cpuset: VmCpuset | None = None,
    ) -> None:
        self.name = name
        self.owner = owner
        self._topology = topology
        self._emit = emit
        self._policy = policy
        self._passes = passes
        self._max_slots = max_slots
        self.cpuset = cpuset
        self._lock = threading.RLock()
        self._state = VmState.CREATED
        self._regions: list[_Region] = []
        self._vcpus: list[_Vcpu] = []
        self._numa_nodes = 0
        self._node_map: list[int] = []
        self._serial = bytearray()
        self._serial_lock = threading.Lock()
        self._destroyed = False
        self._vm: VmFd = kvm.create_vm()
        self._boot: GuestRegion | None = None
        try:
            self._boot = GuestRegion(f"kvmnumad-{name}-boot", BOOT_SIZE)
            self._boot.write(ENTRY, payload if payload is not None else kvm_payload.TOUCH_PAYLOAD)
            self._vm.set_user_memory_region(BOOT_SLOT, BOOT_GPA, BOOT_SIZE, self._boot.hva, 0)
            for i in range(vcpus):
                fd = self._vm.create_vcpu(i)
                try:
                    runner = VcpuRunner(fd, i, on_serial=self._on_serial)
                except BaseException:
                    fd.close()
                    raise
                self._vcpus.append(_Vcpu(i, fd, runner))
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------------ properties
    @property
    def state(self) -> VmState:
        return self._state

    @property
    def vcpu_count(self) -> int:
        return len(self._vcpus)

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return sum(r.size for r in self._regions)

    @property
    def numa_enabled(self) -> bool:
        return self._numa_nodes > 0

    @property
    def numa_nodes(self) -> int:
        return self._numa_nodes

    @property
    def node_map(self) -> list[int]:
        with self._lock:
            return list(self._node_map)

    @property
    def policy(self) -> Policy:
        return self._policy

    # ------------------------------------------------------------------ helpers
    def _changed(self, *aspects: Aspect) -> None:
        self._emit(VmChanged(self.name, frozenset(aspects)))

    def _on_serial(self, index: int, data: bytes) -> None:
        with self._serial_lock:
            self._serial += data
            if len(self._serial) > SERIAL_KEEP:
                del self._serial[: len(self._serial) - SERIAL_KEEP]

    def _vcpu(self, vcpu: int) -> _Vcpu:
        if not 0 <= vcpu < len(self._vcpus):
            raise errors.NoSuchVcpu(f"VM {self.name!r} has no vCPU {vcpu} (it has {len(self._vcpus)})")
        return self._vcpus[vcpu]

    def _require_numa(self) -> None:
        if not self._numa_nodes:
            raise errors.NumaDisabled(f"guest NUMA is disabled on VM {self.name!r}")

    def _require_guest_node(self, node: int) -> None:
        self._require_numa()
        if not 0 <= node < self._numa_nodes:
            raise errors.NodeOutOfRange(
                f"guest node {node} out of range: VM {self.name!r} has {self._numa_nodes} guest nodes"
            )

    def _require_host_node(self, topo: HostTopology, node: int) -> None:
        if node not in topo.nodes:
            raise errors.NodeOutOfRange(f"host node {node} does not exist (host nodes: {sorted(topo.nodes)})")

    def _check_cpus(self, topo: HostTopology, cpus: Sequence[int]) -> frozenset[int]:
        if not cpus:
            raise errors.InvalidArgument("CPU set is empty")
        online = topo.online_cpus()
        for cpu in cpus:
            if cpu not in topo.cpus:
                raise errors.CpuOffline(f"CPU {cpu} does not exist (host CPUs: {_fmt(topo.cpus)})")
            if cpu not in online:
                raise errors.CpuOffline(f"CPU {cpu} is offline (online: {_fmt(online)})")
        return frozenset(cpus)

    def guest_node_of_vcpu(self, vcpu: int) -> int:
        return vcpu_guest_node(vcpu, len(self._vcpus), self._numa_nodes)

    def host_cpus_for_guest_node(self, topo: HostTopology, node: int) -> frozenset[int]:
        """Online CPUs of the host node a guest node maps to; for a CPU-less
        (memory-only) host node, those of the nearest node that has some."""
        host = self._node_map[node]
        for candidate in topo.nearest_nodes(host):
            cpus = topo.cpus_of_node(candidate, online_only=True)
            if cpus:
                return frozenset(cpus)
        raise errors.CpuOffline(f"no online CPU near host node {host}")

    def _apply_affinity(self, v: _Vcpu, cpus: frozenset[int]) -> None:
        try:
            if self.cpuset is not None:
                self.cpuset.place_vcpu(v.index, v.runner.tid, cpus)
            os.sched_setaffinity(v.runner.tid, cpus)
        except OSError as e:
            raise errors.CpuOffline(f"sched_setaffinity({v.runner.tid}, {_fmt(cpus)}): {e.strerror}") from e

    def effective_affinity(self, vcpu: int) -> frozenset[int]:
        return frozenset(os.sched_getaffinity(self._vcpu(vcpu).runner.tid))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._lock:
            self._require_alive()
            if self._state == VmState.RUNNING:
                return
            for v in self._vcpus:
                if not v.initialized:
                    base, size = self._payload_range(v.index)
                    regs = kvm_payload.touch_payload_regs(base, size, v.index, self._passes)
                    v.fd.setup_flat32(ENTRY, **regs)
                    v.initialized = True
            for v in self._vcpus:
                v.runner.start()
            self._state = VmState.RUNNING
        log_event("vm-started", f"VM {self.name} started", vm=self.name)
        self._changed(Aspect.STATE)

    def _payload_range(self, vcpu: int) -> tuple[int, int]:
        if not self._numa_nodes:
            region = self._regions[0] if self._regions else None
        else:
            node = self.guest_node_of_vcpu(vcpu)
            region = next((r for r in self._regions if r.guest_node == node), None)
        if region is None or region.gpa >= GUEST_ADDR_LIMIT:
            return 0, 0
        return region.gpa, min(region.size, GUEST_ADDR_LIMIT - region.gpa)

    def stop(self) -> None:
        with self._lock:
            self._require_alive()
            if self._state != VmState.RUNNING:
                return
            for v in self._vcpus:  # kick all, then wait for each: they park in parallel
                v.runner.request_stop()
            for v in self._vcpus:
                v.runner.stop()
            self._state = VmState.STOPPED
        log_event("vm-stopped", f"VM {self.name} stopped", vm=self.name)
        self._changed(Aspect.STATE)

    def _require_alive(self) -> None:
        if self._destroyed:
            raise errors.NoSuchVM(f"VM {self.name!r} has been destroyed")

    def destroy(self) -> None:
        """Stop every vCPU thread and release every kernel object, once."""
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
            self._release()

    def _release(self) -> None:
        first: BaseException | None = None
        for v in self._vcpus:
            v.runner.request_close()
        for v in self._vcpus:
            try:
                v.runner.close()
            except BaseException as e:  # keep releasing the rest
                first = first or e
        for v in self._vcpus:
            v.fd.close()
        self._vcpus.clear()
        if self.cpuset is not None:
            self.cpuset.remove()
        self._vm.close()
        for r in self._regions:
            r.mem.close()
        self._regions.clear()
        if self._boot is not None:
            self._boot.close()
            self._boot = None
        if first is not None:
            raise first

    # ------------------------------------------------------------------ NUMA config
    def enable_numa(self, nodes: int, node_map: Sequence[int] | None = None) -> None:
        topo = self._topology()
        with self._lock:
            self._require_alive()
            if nodes < 1:
                raise errors.InvalidArgument(f"number of guest NUMA nodes must be at least 1, got {nodes}")
            if nodes > 64:
                raise errors.InvalidArgument(f"at most 64 guest NUMA nodes, got {nodes}")
            if self._regions:
                raise errors.Busy(
                    f"VM {self.name!r} has {len(self._regions)} memory region(s): NUMA layout is fixed"
                )
            if node_map is None:
                hosts = sorted(topo.nodes)
                node_map = [hosts[i % len(hosts)] for i in range(nodes)]
            if len(node_map) != nodes:
                raise errors.InvalidArgument(f"node map {list(node_map)} must have {nodes} entries")
            for h in node_map:
                self._require_host_node(topo, h)
            self._numa_nodes = nodes
            self._node_map = list(node_map)
        self._changed(Aspect.NUMA_LAYOUT, Aspect.VCPU_PLACEMENT)

    def disable_numa(self) -> None:
        with self._lock:
            self._require_alive()
            self._require_numa()
            if self._regions:
                raise errors.Busy(
                    f"VM {self.name!r} still has {len(self._regions)} NUMA memory region(s) "
                    f"({self.memory_bytes} bytes): guest NUMA cannot be disabled under them"
                )
            bound = [v for v in self._vcpus if v.bound_node is not None]
            for v in bound:
                v.bound_node = None
            self._numa_nodes = 0
            self._node_map = []
        self._changed(Aspect.NUMA_LAYOUT, Aspect.VCPU_PLACEMENT)

    def setup_numa_memory(
        self,
        node: int,
        size: int,
        gpa: int,
        *,
        policy: MemPolicy = MemPolicy.BIND,
        host_nodes: frozenset[int] | None = None,
        prealloc: bool = False,
    ) -> int:
        """Create one memory slot for guest node ``node``; returns its slot.

        Everything is validated before the first kernel object is made, and a
        failure after that releases what was made: the VM is left exactly as
        it was.
        """
        with self._lock:
            self._require_alive()
            self._require_guest_node(node)
            return self.add_memory(node, size, gpa, policy=policy, host_nodes=host_nodes, prealloc=prealloc)

    def add_memory(
        self,
        node: int,
        size: int,
        gpa: int,
        *,
        policy: MemPolicy = MemPolicy.BIND,
        host_nodes: frozenset[int] | None = None,
        prealloc: bool = False,
    ) -> int:
        """setup_numa_memory without the guest-NUMA requirement: a VM without
        guest NUMA still has its one region placed on real host nodes."""
        topo = self._topology()
        with self._lock:
            self._require_alive()
            if size <= 0 or not is_page_aligned(size):
                raise errors.InvalidArgument(f"size {size} must be a non-zero multiple of {PAGE_SIZE}")
            if gpa < 0 or not is_page_aligned(gpa):
                raise errors.InvalidArgument(f"guest-physical address {gpa:#x} must be {PAGE_SIZE}-aligned")
            end = gpa + size
            if gpa < BOOT_GPA + BOOT_SIZE:
                raise errors.Overlap(
                    f"[{gpa:#x}, {end:#x}) overlaps the boot slot [{BOOT_GPA:#x}, {BOOT_SIZE:#x})"
                )
            for r in self._regions:
                if gpa < r.end and r.gpa < end:
                    raise errors.Overlap(
                        f"[{gpa:#x}, {end:#x}) overlaps slot {r.slot} [{r.gpa:#x}, {r.end:#x})"
                    )
            if len(self._regions) + 2 > self._max_slots:
                raise errors.InsufficientMemory(
                    f"KVM memory slot limit reached ({self._max_slots} slots)"
                )
            if host_nodes is None:
                host_nodes = frozenset({self._node_map[node] if self._node_map else min(topo.nodes)})
            for h in host_nodes:
                self._require_host_node(topo, h)
            free = sum(topo.nodes[h].mem_free for h in host_nodes)
            if policy == MemPolicy.BIND and size > free:
                raise errors.InsufficientMemory(
                    f"{size} bytes do not fit host node(s) {_fmt(host_nodes)}: {free} bytes free"
                )
            slot = self._next_slot()
            mem = GuestRegion(f"kvmnumad-{self.name}-node{node}-slot{slot}", size)
            try:
                mem.bind(policy, host_nodes)
                if prealloc:
                    mem.prefault()
                self._vm.set_user_memory_region(slot, gpa, size, mem.hva)
            except OSError as e:
                mem.close()
                if e.errno in (12, 28):  # ENOMEM, ENOSPC
                    raise errors.InsufficientMemory(
                        f"{size} bytes on host node(s) {_fmt(host_nodes)}: {e.strerror}"
                    ) from e
                raise
            except BaseException:
                mem.close()
                raise
            self._regions.append(_Region(slot, gpa, node, frozenset(host_nodes), policy, mem))
            self._sync_cpuset_mems()
        self._changed(Aspect.MEMORY)
        return slot

    def _sync_cpuset_mems(self) -> None:
        if self.cpuset is not None and self._regions:
            self.cpuset.set_mems(set().union(*(r.host_nodes for r in self._regions)))

    def _next_slot(self) -> int:
        used = {r.slot for r in self._regions} | {BOOT_SLOT}
        slot = 1
        while slot in used:
            slot += 1
        return slot

    def next_free_gpa(self) -> int:
        with self._lock:
            return max([GUEST_RAM_BASE, *(r.end for r in self._regions)])

    def map_numa_node(self, node: int, host_node: int) -> list[tuple[int, int]]:
        """Remap guest node ``node`` to ``host_node``, live.

        Its memory moves with mbind(MPOL_MF_MOVE) and its pinned vCPUs follow.
        Returns (slot, pages in the slot) per region moved; counting the
        resident pages first would cost a move_pages query as long as the move.
        """
        topo = self._topology()
        moved: list[tuple[int, int]] = []
        with self._lock:
            self._require_alive()
            self._require_guest_node(node)
            self._require_host_node(topo, host_node)
            old = self._node_map[node]
            if old == host_node:
                return moved
            regions = [r for r in self._regions if r.guest_node == node]
            done: list[_Region] = []
            try:
                for r in regions:
                    r.mem.bind(r.policy, {host_node}, move=True)
                    done.append(r)
                    moved.append((r.slot, r.size // PAGE_SIZE))
            except OSError as e:
                for r in done:  # roll back what already moved
                    r.mem.bind(r.policy, r.host_nodes, move=True)
                raise errors.InsufficientMemory(
                    f"moving guest node {node} to host node {host_node}: {e.strerror}"
                ) from e
            for r in regions:
                r.host_nodes = frozenset({host_node})
            self._node_map[node] = host_node
            self._sync_cpuset_mems()
            for slot, pages in moved:
                log_event("migrate", f"VM {self.name} guest node {node} slot {slot} ({pages} pages) moved "
                          f"from host node {old} to {host_node}", vm=self.name, node=host_node,
                          from_node=old, to_node=host_node, reason="map-numa-node")
            cpus = self.host_cpus_for_guest_node(topo, node)
            for v in self._vcpus:
                if v.bound_node == node:
                    self._apply_affinity(v, cpus)
                    v.declared = cpus
        self._changed(Aspect.NUMA_LAYOUT, Aspect.MEMORY, Aspect.VCPU_PLACEMENT)
        return moved

    # ------------------------------------------------------------------ vCPU placement
    def set_vcpu_affinity(self, vcpu: int, cpus: Sequence[int]) -> None:
        topo = self._topology()
        with self._lock:
            self._require_alive()
            v = self._vcpu(vcpu)
            wanted = self._check_cpus(topo, cpus)
            self._apply_affinity(v, wanted)
            v.declared = wanted
            v.bound_node = None
        log_event("pin", f"vCPU {vcpu} of VM {self.name} pinned to CPUs {_fmt(wanted)}",
                  vm=self.name, vcpu=vcpu, cpus=wanted, reason="api")
        self._changed(Aspect.VCPU_PLACEMENT)

    def get_vcpu_affinity(self, vcpu: int) -> list[int]:
        with self._lock:
            self._require_alive()
            return sorted(self.effective_affinity(vcpu))

    def bind_vcpu_to_numa_node(self, vcpu: int, node: int) -> frozenset[int]:
        topo = self._topology()
        with self._lock:
            self._require_alive()
            v = self._vcpu(vcpu)
            self._require_guest_node(node)
            cpus = self.host_cpus_for_guest_node(topo, node)
            self._apply_affinity(v, cpus)
            v.declared = cpus
            v.bound_node = node
        log_event("bind", f"vCPU {vcpu} of VM {self.name} bound to guest node {node} "
                  f"(host node {self._node_map[node]}, CPUs {_fmt(cpus)})",
                  vm=self.name, vcpu=vcpu, cpus=cpus, node=self._node_map[node], reason="api")
        self._changed(Aspect.VCPU_PLACEMENT)
        return cpus

    def get_vcpu_numa_node(self, vcpu: int) -> tuple[bool, int]:
        """(bound, guest node), judged from the thread's real affinity: a vCPU
        counts as bound only while the kernel keeps it inside its node."""
        topo = self._topology()
        with self._lock:
            self._require_alive()
            v = self._vcpu(vcpu)
            if v.bound_node is None or not self._numa_nodes:
                return False, self.guest_node_of_vcpu(vcpu) if self._numa_nodes else 0
            effective = self.effective_affinity(vcpu)
            host_cpus = topo.cpus_of_node(self._node_map[v.bound_node], online_only=False)
            inside = bool(host_cpus) and effective <= host_cpus
            return inside or effective <= self.host_cpus_for_guest_node(topo, v.bound_node), v.bound_node

    def apply_declared(self, vcpu: int, cpus: frozenset[int] | None, bound_node: int | None) -> None:
        """Record and apply a placement decided by a policy (no validation
        beyond the kernel's: the planner already checked it)."""
        with self._lock:
            v = self._vcpu(vcpu)
            if cpus is not None:
                self._apply_affinity(v, cpus)
            v.declared = cpus
            v.bound_node = bound_node
        self._changed(Aspect.VCPU_PLACEMENT)

    def repin(self, topo: HostTopology) -> list[tuple[int, frozenset[int], frozenset[int]]]:
        """Bring every vCPU's effective affinity back in line with its declared
        intent on the current topology. Returns (vcpu, old, new) per move."""
        moves: list[tuple[int, frozenset[int], frozenset[int]]] = []
        online = topo.online_cpus()
        with self._lock:
            if self._destroyed:
                return moves
            for v in self._vcpus:
                if v.declared is None:
                    continue
                target = v.declared & online
                if not target:
                    target = _nearest_online(topo, v.declared)
                old = self.effective_affinity(v.index)
                # the affinity can look right while the cpuset is not (v1 moves
                # the thread up a level on offline, v2 keeps the lost CPU asked)
                stale_cpuset = self.cpuset is not None and not self.cpuset.holds(
                    v.index, v.runner.tid, target)
                if target and (target != old or stale_cpuset):
                    # reported even when the kernel's own fallback already put
                    # the thread there: the placement was repaired all the same
                    self._apply_affinity(v, target)
                    moves.append((v.index, old, target))
        if moves:
            self._changed(Aspect.VCPU_PLACEMENT)
        return moves

    # ------------------------------------------------------------------ views
    def vcpu_threads(self) -> list[tuple[int, int]]:
        with self._lock:
            return [(v.index, v.runner.tid) for v in self._vcpus]

    def vcpu_affinity(self) -> list[tuple[int, list[int]]]:
        with self._lock:
            return [(v.index, sorted(self.effective_affinity(v.index))) for v in self._vcpus]

    def declared_vcpu_affinity(self) -> list[tuple[int, list[int]]]:
        with self._lock:
            return [(v.index, sorted(v.declared) if v.declared is not None else []) for v in self._vcpus]

    def vcpu_nodes(self) -> list[tuple[int, bool, int]]:
        with self._lock:
            return [(v.index, *self.get_vcpu_numa_node(v.index)) for v in self._vcpus]

    def memory_regions(self) -> list[MemoryRegionInfo]:
        with self._lock:
            return [
                MemoryRegionInfo(r.slot, r.gpa, r.size, r.guest_node, min(r.host_nodes), r.mem.hva)
                for r in self._regions
            ]

    def region_policies(self) -> list[tuple[int, MemPolicy, frozenset[int]]]:
        with self._lock:
            return [(r.slot, r.policy, r.host_nodes) for r in self._regions]

    def serial_output(self) -> bytes:
        with self._serial_lock:
            return bytes(self._serial)

    def stats(self) -> VmStats:
        with self._lock:
            self._require_alive()
            per_vcpu: list[VcpuStats] = []
            totals: dict[str, int] = {}
            for v in self._vcpus:
                exits = v.runner.exit_counts()
                for k, n in exits.items():
                    totals[k] = totals.get(k, 0) + n
                per_vcpu.append(
                    VcpuStats(
                        vcpu=v.index,
                        tid=v.runner.tid,
                        cpu_time_ns=v.runner.cpu_time_ns(),
                        current_cpu=v.runner.current_cpu(),
                        exits=exits,
                        progress=v.runner.progress,
                    )
                )
            pages: dict[int, int] = {}
            dirty = 0
            for r in self._regions:
                for node, n in pages_per_node(r.mem.hva, r.size).items():
                    pages[node] = pages.get(node, 0) + n
                dirty += self._vm.count_dirty(r.slot, r.size)
            return VmStats(totals, tuple(per_vcpu), pages, dirty)

    def dirty_pages(self, slot: int) -> int:
        with self._lock:
            for r in self._regions:
                if r.slot == slot:
                    return self._vm.count_dirty(slot, r.size)
        raise errors.InvalidArgument(f"VM {self.name!r} has no memory slot {slot}")

    def runner_states(self) -> list[str]:
        with self._lock:
            return [v.runner.state for v in self._vcpus]

    def progress(self) -> list[int]:
        with self._lock:
            return [v.runner.progress for v in self._vcpus]

    def definition(self) -> dict[str, object]:
        """What persistence needs to recreate this VM and its declared placement."""
        with self._lock:
            return {
                "name": self.name,
                "owner": self.owner,
                "vcpus": len(self._vcpus),
                "policy": str(self._policy),
                "passes": self._passes,
                "numa_nodes": self._numa_nodes,
                "node_map": list(self._node_map),
                "regions": [
                    {
                        "node": r.guest_node,
                        "size": r.size,
                        "gpa": r.gpa,
                        "policy": int(r.policy),
                        "host_nodes": sorted(r.host_nodes),
                    }
                    for r in self._regions
                ],
                "vcpu_placement": [
                    {
                        "vcpu": v.index,
                        "declared": sorted(v.declared) if v.declared is not None else None,
                        "bound_node": v.bound_node,
                    }
                    for v in self._vcpus
                ],
                "running": self._state == VmState.RUNNING,
            }


def _nearest_online(topo: HostTopology, cpus: frozenset[int]) -> frozenset[int]:
    """Online CPUs of the nearest node (by distance) to the node of the lost CPUs."""
    nodes = [topo.cpus[c].node for c in cpus if c in topo.cpus]
    if not nodes:
        return topo.online_cpus()
    for candidate in topo.nearest_nodes(min(nodes)):
        online = topo.cpus_of_node(candidate, online_only=True)
        if online:
            return frozenset(online)
    return topo.online_cpus()


def _fmt(cpus: Iterable[int]) -> str:
    return format_cpulist(cpus) or "(none)"
