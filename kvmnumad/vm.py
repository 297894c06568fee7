"""One KVM virtual machine: its fds, memory regions, vCPU threads and placement.

(API skeleton: bodies are being written; signatures are the contract the
front ends code against.)
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmnumad.model import MemoryRegionInfo, Policy, VmState, VmStats


class Vm:
    """A VM owned by the Manager. Every method is thread-safe and synchronous;
    blocking ones (ioctls, mbind, joins) must be called off the event loop."""

    name: str
    owner: int  # uid of the creator

    @property
    def state(self) -> VmState: raise NotImplementedError
    @property
    def vcpu_count(self) -> int: raise NotImplementedError
    @property
    def memory_bytes(self) -> int: raise NotImplementedError
    @property
    def numa_enabled(self) -> bool: raise NotImplementedError
    @property
    def numa_nodes(self) -> int: raise NotImplementedError
    @property
    def node_map(self) -> list[int]: raise NotImplementedError  # guest node i -> host node
    @property
    def policy(self) -> Policy: raise NotImplementedError

    def start(self) -> None: raise NotImplementedError
    def stop(self) -> None: raise NotImplementedError
    def enable_numa(self, nodes: int) -> None: raise NotImplementedError
    def disable_numa(self) -> None: raise NotImplementedError
    def setup_numa_memory(self, node: int, size: int, gpa: int) -> int: raise NotImplementedError
    def set_vcpu_affinity(self, vcpu: int, cpus: Sequence[int]) -> None: raise NotImplementedError
    def get_vcpu_affinity(self, vcpu: int) -> list[int]: raise NotImplementedError
    def bind_vcpu_to_numa_node(self, vcpu: int, node: int) -> None: raise NotImplementedError
    def get_vcpu_numa_node(self, vcpu: int) -> tuple[bool, int]: raise NotImplementedError
    def map_numa_node(self, node: int, host_node: int) -> None: raise NotImplementedError
    def stats(self) -> VmStats: raise NotImplementedError
    def vcpu_threads(self) -> list[tuple[int, int]]: raise NotImplementedError
    def vcpu_affinity(self) -> list[tuple[int, list[int]]]: raise NotImplementedError
    def declared_vcpu_affinity(self) -> list[tuple[int, list[int]]]: raise NotImplementedError
    def vcpu_nodes(self) -> list[tuple[int, bool, int]]: raise NotImplementedError
    def memory_regions(self) -> list[MemoryRegionInfo]: raise NotImplementedError
    def serial_output(self) -> bytes: raise NotImplementedError
