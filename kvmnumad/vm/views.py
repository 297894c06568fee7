"""The read side of a Vm: what it looks like now, for the bus, reports and tests.

Kept apart from the Vm's mutations so that each side stays small; every view
takes the VM's lock (a long mbind may hold it: call off the event loop) and
reads placements back from the kernel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmnumad import errors
from kvmnumad.model import MemoryRegionInfo, Policy, VmState, VmStats
from kvmnumad.numa.topology import HostTopology
from kvmnumad.vm.console import SerialBuffer
from kvmnumad.vm.definition import VmDefinition
from kvmnumad.vm.explicit import ExplicitPlacement
from kvmnumad.vm.memory import GuestMemory
from kvmnumad.vm.numa import GuestNuma
from kvmnumad.vm.vcpus import Vcpus


class VmViews(ExplicitPlacement):
    """Mixed into Vm, which provides these parts (ExplicitPlacement: what the balancer may move)."""

    name: str
    owner: int
    payload_sha256: str | None
    policy: Policy
    _passes: int
    _state: VmState
    _lock: threading.RLock
    _destroyed: bool
    faults: dict[int, str]
    _topology: Callable[[], HostTopology]
    numa: GuestNuma
    serial: SerialBuffer
    memory: GuestMemory
    vcpus: Vcpus
    auto_balance: bool
    explicit_nodes: set[int]
    allowed_nodes: frozenset[int]

    def _alive(self) -> None:
        if self._destroyed:
            raise errors.NoSuchVM(f"VM {self.name!r} has been destroyed", vm=self.name)

    def get_vcpu_numa_node(self, vcpu: int) -> tuple[bool, int]:
        """(bound, guest node), judged from the thread's real affinity: a vCPU
        counts as bound only while the kernel keeps it inside its node."""
        topo = self._topology()
        with self._lock:
            self._alive()
            v = self.vcpus.get(vcpu)
            if v.bound_node is None or not self.numa.enabled:
                return False, self.guest_node_of_vcpu(vcpu)
            effective = v.effective()
            host_cpus = topo.cpus_of_node(self.numa.host_of(v.bound_node), online_only=False)
            inside = bool(host_cpus) and effective <= host_cpus
            return inside or effective <= self.numa.host_cpus(v.bound_node, topo), v.bound_node

    @property
    def state(self) -> VmState:
        """FAILED while a vCPU that should run has stopped by itself."""
        if self._state == VmState.RUNNING and self.faults:
            return VmState.FAILED
        return self._state

    @property
    def vcpu_count(self) -> int:
        return len(self.vcpus)

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return self.memory.total_bytes

    def guest_node_of_vcpu(self, vcpu: int) -> int:
        return self.numa.node_of_vcpu(vcpu, len(self.vcpus))


    def vcpu_threads(self) -> list[tuple[int, int]]:
        with self._lock:
            return self.vcpus.threads()

    def vcpu_affinity(self) -> list[tuple[int, list[int]]]:
        with self._lock:
            return self.vcpus.affinity()

    def declared_vcpu_affinity(self) -> list[tuple[int, list[int]]]:
        with self._lock:
            return self.vcpus.declared_affinity()

    def vcpu_nodes(self) -> list[tuple[int, bool, int]]:
        with self._lock:
            return [(v.index, *self.get_vcpu_numa_node(v.index)) for v in self.vcpus]

    def memory_regions(self) -> list[MemoryRegionInfo]:
        with self._lock:
            return self.memory.info()

    def serial_output(self) -> bytes:
        return self.serial.read()

    def dirty_pages(self, slot: int) -> int:
        with self._lock:
            return self.memory.dirty_pages(slot)

    def runner_states(self) -> list[str]:
        with self._lock:
            return [v.runner.state for v in self.vcpus]

    def progress(self) -> list[int]:
        with self._lock:
            return [v.runner.progress for v in self.vcpus]

    def stats(self) -> VmStats:
        with self._lock:
            self._alive()
            exits, per_vcpu = self.vcpus.stats()
            return VmStats(exits, per_vcpu, self.memory.resident_pages(), self.memory.dirty_pages())

    def definition(self) -> VmDefinition:
        """What persistence needs to recreate this VM and its declared placement."""
        with self._lock:
            return VmDefinition(
                name=self.name, owner=self.owner, vcpus=len(self.vcpus), policy=self.policy,
                passes=self._passes, numa_nodes=self.numa.nodes, node_map=tuple(self.numa.node_map),
                regions=self.memory.definitions(), vcpu_placement=self.vcpus.definitions(),
                running=self._state == VmState.RUNNING, payload_sha256=self.payload_sha256,
                auto_balance=self.auto_balance, explicit_vcpus=self.explicit_vcpus(),
                explicit_nodes=tuple(sorted(self.explicit_nodes)),
                allowed_nodes=tuple(sorted(self.allowed_nodes)))
