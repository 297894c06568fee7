"""One KVM virtual machine: a facade over its parts, and the coordinator of
what needs more than one of them.

The parts each own one job: ``GuestMemory`` (slots, regions, dirty log),
``Vcpus`` (threads and their placement), ``GuestNuma`` (the guest node
layout), ``SerialBuffer``.  The Vm owns the VM fd and the lifecycle, holds the
one lock that serializes every change, and does what spans parts: mapping a
guest node moves its memory *and* the vCPUs bound to it.  Every placement it
reports is read back from the kernel; it keeps only the declared intent.

All methods are synchronous and thread-safe; the blocking ones (ioctls,
mbind, thread joins) must be called off an event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, MutableMapping, Sequence
from contextlib import AbstractContextManager

from kvmnumad import cpulist, crashpoints, errors, headroom
from kvmnumad.cgroups import VmCpuset
from kvmnumad.events import Aspect, Event
from kvmnumad.journal import log_event
from kvmnumad.kvm import payload as kvm_payload
from kvmnumad.kvm.system import Kvm
from kvmnumad.kvm.vm import VmFd
from kvmnumad.model import JobState, Policy, VmState
from kvmnumad.numa.memory import MemPolicy
from kvmnumad.numa.topology import HostTopology
from kvmnumad.optimizer.explain import Decision, Kind, node_subject, vcpu_subject
from kvmnumad.vm.console import SerialBuffer
from kvmnumad.vm.layout import ENTRY
from kvmnumad.vm.memory import GuestMemory, Region, resource_error
from kvmnumad.vm.numa import GuestNuma
from kvmnumad.vm.saved import Recovery, SavedVcpu
from kvmnumad.vm.vcpus import Repin, Vcpu, Vcpus
from kvmnumad.vm.views import VmViews

log = logging.getLogger(__name__)


def _admit_any(size: int) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


class Vm(VmViews):
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
        adopt: MutableMapping[int, int] | None = None,
    ) -> None:
        """``adopt``: slot -> memfd handed over by an earlier process (GuestMemory)."""
        self.name = name
        self.owner = owner
        self.policy = policy
        # A caller's own code is part of what the VM is: kept (bytes and hash)
        # so that persistence can bring the same VM back (issue 12 finding 12).
        self.payload = payload
        self.payload_sha256 = hashlib.sha256(payload).hexdigest() if payload is not None else None
        self._topology = topology
        self._emit = emit
        self._passes = passes
        self.cpuset = cpuset
        self._lock = threading.RLock()
        self._admission: Callable[[int], AbstractContextManager[None]] = _admit_any
        self._state = VmState.CREATED
        self._destroyed = False
        self.faults: dict[int, str] = {}  # vCPU -> why it stopped by itself
        self.recovery = Recovery.NONE  # how it came back after a restart of the daemon
        # Where a caller's placement decision is recorded (the Manager's DecisionLog).
        self.on_decision: Callable[[Decision], object] = lambda d: None
        self.numa = GuestNuma(name)
        # Automatic balancing (optimizer/balance.py): the Manager sets it from
        # the policy or the saved definition; what a caller placed is kept out.
        self.auto_balance = False
        self.explicit_nodes: set[int] = set()
        self.allowed_nodes: frozenset[int] = frozenset()  # the request's host_nodes; empty: every node
        self.serial = SerialBuffer()
        headroom.check_tasks(name, vcpus)  # refused before any kernel object exists
        try:
            self._vm: VmFd = kvm.create_vm()
        except OSError as e:
            raise resource_error(e, f"KVM_CREATE_VM for VM {name!r}") or e from e
        try:
            self.memory = GuestMemory(name, self._vm, payload or kvm_payload.TOUCH_PAYLOAD, max_slots, adopt)
        except BaseException:
            self._vm.close()
            raise
        try:
            self.vcpus = Vcpus(name, self._vm, vcpus, cpuset, on_serial=self.serial.append,
                               on_fault=self._on_vcpu_fault)
        except BaseException:
            self.memory.close()
            self._vm.close()
            raise

    def _on_vcpu_fault(self, vcpu: int, fault: str) -> None:
        """On the vCPU's own thread: the VM is no longer what it says it is."""
        self.faults[vcpu] = fault
        log.error("vCPU %d of VM %s stopped by itself: %s", vcpu, self.name, fault)
        self._changed(Aspect.STATE)

    def limit_memory(self, admission: Callable[[int], AbstractContextManager[None]]) -> None:
        """From now on each added region (of that many bytes) is admitted
        first: the owner's quota (Manager.admit_memory) may refuse it."""
        self._admission = admission

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._lock:
            self._alive()
            if self._state == VmState.RUNNING:
                return
            if self.faults:
                raise errors.Busy(f"VM {self.name!r} cannot run again: its vCPU(s) stopped by themselves "
                                  f"({self.faults}); destroy and create it anew", faults=dict(self.faults))
            self.vcpus.start(self._init_vcpu)
            self._state = VmState.RUNNING
        log_event("vm-started", f"VM {self.name} started", vm=self.name)
        self._changed(Aspect.STATE)

    def _init_vcpu(self, v: Vcpu) -> None:
        node = self.guest_node_of_vcpu(v.index) if self.numa.enabled else None
        base, size = self.memory.payload_range(node)
        v.fd.setup_flat32(ENTRY, **kvm_payload.touch_payload_regs(base, size, v.index, self._passes))

    def stop(self) -> None:
        with self._lock:
            self._alive()
            if self._state != VmState.RUNNING:
                return
            self.vcpus.stop()
            self._state = VmState.STOPPED
        log_event("vm-stopped", f"VM {self.name} stopped", vm=self.name)
        self._changed(Aspect.STATE)

    def destroy(self) -> None:
        """Stop every vCPU thread and release every kernel object, once; the
        first failure is raised after everything else was released."""
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
            try:
                self.vcpus.close()
            finally:
                self._vm.close()
                self.memory.close()
                # Last: KVM's per-VM worker (kvm-nx-lpage-recovery, Linux 6.13+) is
                # started by the first vCPU thread to run, so it sits in that vCPU's
                # cgroup until the VM's last fd is closed; removed before that, the
                # directory stayed behind (EBUSY) and broke the next VM of the name.
                if self.cpuset is not None:
                    self.cpuset.remove()

    # ------------------------------------------------------------------ guest NUMA and memory
    def enable_numa(self, nodes: int, node_map: Sequence[int] | None = None) -> None:
        topo = self._topology()
        with self._lock:
            self._alive()
            GuestNuma.check(nodes, node_map, topo)
            if self.memory.regions:
                raise errors.Busy(f"VM {self.name!r} has {len(self.memory.regions)} memory region(s): "
                                  "NUMA layout is fixed", regions=len(self.memory.regions))
            self.numa.enable(nodes, node_map, topo)
        self._changed(Aspect.NUMA_LAYOUT, Aspect.VCPU_PLACEMENT)

    def disable_numa(self) -> None:
        with self._lock:
            self._alive()
            self.numa.require_enabled()
            if self.memory.regions:
                raise errors.Busy(
                    f"VM {self.name!r} still has {len(self.memory.regions)} NUMA memory region(s) "
                    f"({self.memory.total_bytes} bytes): guest NUMA cannot be disabled under them",
                    regions=len(self.memory.regions))
            self.vcpus.unbind_all()
            self.numa.disable()
        self._changed(Aspect.NUMA_LAYOUT, Aspect.VCPU_PLACEMENT)

    def setup_numa_memory(self, node: int, size: int, gpa: int, *, policy: MemPolicy = MemPolicy.BIND,
                          host_nodes: frozenset[int] | None = None, prealloc: bool = False) -> int:
        """One memory slot for guest node ``node``; returns its slot.  Refused
        without guest NUMA (add_memory is the way in for a VM without it)."""
        with self._lock:
            self._alive()
            self.numa.require(node)
            return self.add_memory(node, size, gpa, policy=policy, host_nodes=host_nodes, prealloc=prealloc)

    def add_memory(self, node: int, size: int, gpa: int, *, policy: MemPolicy = MemPolicy.BIND,
                   host_nodes: frozenset[int] | None = None, prealloc: bool = False) -> int:
        """A region placed on real host nodes, with or without guest NUMA."""
        topo = self._topology()
        with self._lock:
            self._alive()
            if host_nodes is None:
                host_nodes = frozenset({self.numa.host_of(node) if self.numa.enabled else min(topo.nodes)})
            with self._admission(size):
                region = self.memory.add(node, size, gpa, policy=policy, host_nodes=host_nodes, topo=topo,
                                         prealloc=prealloc)
            self._sync_cpuset_mems()
        self._changed(Aspect.MEMORY)
        return region.slot

    def _sync_cpuset_mems(self) -> None:
        if self.cpuset is not None and self.memory.regions:
            self.cpuset.set_mems(self.memory.host_nodes())

    def map_numa_node(self, node: int, host_node: int, *, explicit: bool = True) -> list[tuple[int, int]]:
        """Remap guest node ``node`` to ``host_node`` live: its memory moves and
        its bound vCPUs follow.  Returns (slot, pages in the slot) per region.
        ``explicit=False``: the balancer's move, not a caller's map; it moves
        the pages even when the node is mapped there already (someone moved
        them away), and records no caller decision (the balancer records its own)."""
        topo = self._topology()
        with self._lock:
            self._alive()
            self.numa.require(node)
            topo.node(host_node)
            old = self.numa.host_of(node)
            if old == host_node and explicit:
                self.explicit_nodes.add(node)
                return []
            moved = self.memory.move(self.memory.of_guest_node(node), host_node)
            crashpoints.reached("migrate.moved")
            self.numa.node_map[node] = host_node
            if explicit:
                self._sync_cpuset_mems()
            elif self.cpuset is not None:
                # The balancer's move only widens the cpuset's nodes.  Narrowing
                # them makes cgroup v2 (memory_migrate always on) move every page
                # of this process's address space on the old nodes, other VMs'
                # and the daemon's own included, under the VM's lock: 30 s and
                # more in a 4-node TCG guest, the VM unanswering meanwhile.
                self.cpuset.set_mems(self.cpuset.mems | set(self.memory.host_nodes()))
            for slot, pages in moved:
                log_event("migrate", f"VM {self.name} guest node {node} slot {slot} ({pages} pages) moved "
                          f"from host node {old} to {host_node}", vm=self.name, node=host_node,
                          from_node=old, to_node=host_node,
                          reason="map-numa-node" if explicit else "rebalance")
            cpus = self.numa.host_cpus(node, topo)
            self.vcpus.follow_node(node, cpus)
            followers = [v.index for v in self.vcpus if v.bound_node == node]
            if explicit:
                self.explicit_nodes.add(node)
        if not explicit:
            self._changed(Aspect.NUMA_LAYOUT, Aspect.MEMORY, Aspect.VCPU_PLACEMENT)
            return moved
        pages = sum(p for _, p in moved)
        self.on_decision(Decision(
            self.name, node_subject(node), Kind.CALLER, "caller-map", f"host node {host_node}",
            f"a caller mapped it from host node {old} to {host_node}; {pages} pages moved", node=host_node))
        for index in followers:
            self.on_decision(Decision(
                self.name, vcpu_subject(index), Kind.CALLER, "follows-guest-node",
                f"CPUs {cpulist.describe(cpus)}",
                f"bound to guest node {node}, which a caller mapped to host node {host_node}: its CPUs",
                vcpu=index, node=host_node))
        self._changed(Aspect.NUMA_LAYOUT, Aspect.MEMORY, Aspect.VCPU_PLACEMENT)
        return moved

    # ------------------------------------------------------------------ vCPU placement
    def set_vcpu_affinity(self, vcpu: int, cpus: Sequence[int]) -> None:
        topo = self._topology()
        with self._lock:
            self._alive()
            v = self.vcpus.get(vcpu)
            wanted = topo.require_online(cpus)
            was_explicit, v.explicit = v.explicit, True
            if not self.vcpus.declare(v, wanted, None) and was_explicit:
                return  # the same pin again: nothing to log, publish or persist
        log_event("pin", f"vCPU {vcpu} of VM {self.name} pinned to CPUs {cpulist.describe(wanted)}",
                  vm=self.name, vcpu=vcpu, cpus=wanted, reason="api")
        nodes = {topo.cpus[c].node for c in wanted if c in topo.cpus}
        self.on_decision(Decision(
            self.name, vcpu_subject(vcpu), Kind.CALLER, "caller-pin", f"CPUs {cpulist.describe(wanted)}",
            f"a caller pinned it to CPUs {cpulist.describe(wanted)} "
            f"(host node(s) {cpulist.describe(nodes)}), all online",
            vcpu=vcpu, node=min(nodes) if len(nodes) == 1 else None))
        self._changed(Aspect.VCPU_PLACEMENT)

    def get_vcpu_affinity(self, vcpu: int) -> list[int]:
        with self._lock:
            self._alive()
            return sorted(self.vcpus.get(vcpu).effective())

    def bind_vcpu_to_numa_node(self, vcpu: int, node: int) -> frozenset[int]:
        topo = self._topology()
        with self._lock:
            self._alive()
            v = self.vcpus.get(vcpu)
            self.numa.require(node)
            cpus = self.numa.host_cpus(node, topo)
            self.vcpus.declare(v, cpus, node)
            v.explicit = True
            host = self.numa.host_of(node)
        log_event("bind", f"vCPU {vcpu} of VM {self.name} bound to guest node {node} "
                  f"(host node {host}, CPUs {cpulist.describe(cpus)})",
                  vm=self.name, vcpu=vcpu, cpus=cpus, node=host, reason="api")
        self.on_decision(Decision(
            self.name, vcpu_subject(vcpu), Kind.CALLER, "caller-bind", f"CPUs {cpulist.describe(cpus)}",
            f"a caller bound it to guest node {node}, mapped to host node {host}: that node's online CPUs",
            vcpu=vcpu, node=host))
        self._changed(Aspect.VCPU_PLACEMENT)
        return cpus

    def apply_declared(self, vcpu: int, cpus: frozenset[int] | None, bound_node: int | None) -> None:
        """Record and apply a placement decided by a policy (the planner
        already checked it against the topology)."""
        with self._lock:
            self.vcpus.declare(self.vcpus.get(vcpu), cpus, bound_node)
        self._changed(Aspect.VCPU_PLACEMENT)

    def _vcpu_list(self) -> Vcpus:  # ExplicitPlacement's
        return self.vcpus

    def _vcpu_at(self, index: int) -> Vcpu:
        return self.vcpus.get(index)

    def repin(self, topo: HostTopology) -> list[Repin]:
        """Effective affinities back in line with declared intent on ``topo``."""
        with self._lock:
            if self._destroyed:
                return []
            moves = self.vcpus.repin(topo)
        if moves:
            self._changed(Aspect.VCPU_PLACEMENT)
        return moves

    # ------------------------------------------------------------------ handover
    def pause_for_handover(self) -> list[SavedVcpu | None]:
        """Park every vCPU and save its state (None: never ran, it starts from
        entry).  The VM keeps its declared state (running stays running in the
        definition) and stays paused: the process is about to hand it over."""
        with self._lock:
            self._alive()
            self.vcpus.stop()
            saved: list[SavedVcpu | None] = []
            for v in self.vcpus:
                if not v.initialized:
                    saved.append(None)
                    continue
                saved.append(SavedVcpu(v.fd.save_state(), v.runner.progress, v.runner.done))
            return saved

    def resume_vcpus(self, saved: Sequence[SavedVcpu | None], recovery: Recovery) -> None:
        """Load each saved vCPU state into the new vCPUs before the first run,
        so that start() continues the guest where it paused instead of at entry."""
        with self._lock:
            self._alive()
            if len(saved) not in (0, len(self.vcpus)):
                raise errors.InvalidArgument(f"VM {self.name!r}: {len(saved)} saved vCPUs for "
                                             f"{len(self.vcpus)}", vm=self.name)
            for v, s in zip(self.vcpus, saved, strict=False):
                if s is None:
                    continue
                v.fd.restore_state(s.state)
                v.runner.seed(s.progress, s.done)
                v.initialized = True
            if any(s is not None for s in saved) and self._state == VmState.CREATED:
                self._state = VmState.STOPPED  # it ran before: paused, not new (start() may follow)
            self.recovery = recovery

    # ------------------------------------------------------------------ migration jobs (vm/migration.py)
    def begin_migration(self, node: int, host_node: int, slot: int | None) -> list[Region]:
        """Check a move of guest node ``node`` (or its ``slot``) to
        ``host_node`` and point the regions' policy there (no page moves yet:
        new faults land on the destination).  All or nothing: a refusal of
        the kernel puts back the policies already changed."""
        topo = self._topology()
        with self._lock:
            self._alive()
            self.numa.require(node)
            topo.node(host_node)
            regions = self.memory.of_guest_node(node)
            if slot is not None:
                regions = [r for r in regions if r.slot == slot]
                if not regions:
                    raise errors.InvalidArgument(f"VM {self.name!r} has no memory slot {slot} in guest node "
                                                 f"{node}", slot=slot, node=node)
            if not regions:
                raise errors.InvalidArgument(f"guest node {node} of VM {self.name!r} has no memory to move",
                                             node=node)
            if self.cpuset is not None:  # the vCPUs fault pages in: their cpuset must allow the destination
                self.cpuset.set_mems(self.memory.host_nodes() | {host_node})
            done: list[Region] = []
            try:
                for r in regions:
                    r.mem.bind(r.policy, {host_node})
                    done.append(r)
            except OSError as e:
                for r in done:
                    r.mem.bind(r.policy, r.host_nodes)
                self._sync_cpuset_mems()
                raise resource_error(e, f"binding memory to host node {host_node}") or errors.InvalidArgument(
                    f"host node {host_node} cannot take memory: {e.strerror}", node=host_node) from e
            return regions

    def end_migration(self, node: int, host_node: int, regions: list[Region], state: JobState,
                      moved: int) -> tuple[int, list[int], frozenset[int]]:
        """The VM's side of a job's end (vm/migration.py says what each state
        leaves).  Returns the guest node's host node before, and the vCPUs
        that followed it with their CPUs (for the decisions the caller records)."""
        topo = self._topology()
        with self._lock:
            if self._destroyed:
                return host_node, [], frozenset()
            old = self.numa.host_of(node) if self.numa.enabled else host_node
            followers: list[int] = []
            cpus: frozenset[int] = frozenset()
            if state == JobState.DONE:
                crashpoints.reached("migrate.moved")  # the pages moved, the new map not saved yet
                for r in regions:
                    r.host_nodes = frozenset({host_node})
                whole = all(r.host_nodes == {host_node} for r in self.memory.of_guest_node(node))
                if whole and old != host_node:
                    self.numa.node_map[node] = host_node
                    cpus = self.numa.host_cpus(node, topo)
                    self.vcpus.follow_node(node, cpus)
                    followers = [v.index for v in self.vcpus if v.bound_node == node]
                self._sync_cpuset_mems()
            else:
                for r in regions:  # back to the declared node; FAILED moves the pages back too
                    r.mem.bind(r.policy, r.host_nodes, move=state == JobState.FAILED)
                if state == JobState.FAILED:
                    self._sync_cpuset_mems()
                elif self.cpuset is not None:  # the moved pages stay: so does their node in the cpuset
                    self.cpuset.set_mems(self.memory.host_nodes() | {host_node})
        self._changed(Aspect.NUMA_LAYOUT, Aspect.MEMORY, Aspect.VCPU_PLACEMENT)
        return old, followers, cpus
