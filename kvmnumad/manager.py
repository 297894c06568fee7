"""The Manager: owns every VM, the host topology and the event stream.

(API skeleton: bodies are being written; signatures are the contract the
front ends code against.)
"""

from __future__ import annotations

from collections.abc import Callable

from kvmnumad.model import CreateOptions, Event, Policy
from kvmnumad.numa.topology import HostTopology
from kvmnumad.vm import Vm


class Manager:
    """Thread-safe, synchronous. Front ends call blocking methods off their
    event loop and receive Events through subscribe() (callbacks may run on
    any thread: marshal them to your loop)."""

    def __init__(self, kvm_path: str = "/dev/kvm") -> None: raise NotImplementedError

    version: str
    @property
    def default_policy(self) -> Policy: raise NotImplementedError
    def set_default_policy(self, policy: Policy) -> None: raise NotImplementedError
    def topology(self) -> HostTopology: raise NotImplementedError
    def refresh_topology(self) -> HostTopology: raise NotImplementedError
    def host_nodes(self) -> list[int]: raise NotImplementedError
    def online_cpus(self) -> list[int]: raise NotImplementedError
    def max_vcpus(self) -> int: raise NotImplementedError

    def create_vm(self, name: str, vcpus: int, memory_bytes: int, options: CreateOptions,
                  owner: int = 0) -> Vm: raise NotImplementedError
    def destroy_vm(self, name: str) -> None: raise NotImplementedError
    def get_vm(self, name: str) -> Vm: raise NotImplementedError
    def list_vms(self) -> list[Vm]: raise NotImplementedError
    def plan_vm(self, vcpus: int, memory_bytes: int, options: CreateOptions) -> str: raise NotImplementedError
    def report(self) -> str: raise NotImplementedError
    def suggestions(self) -> list[tuple[str, str, str]]: raise NotImplementedError
    def subscribe(self, callback: Callable[[Event], None]) -> None: raise NotImplementedError
    def shutdown(self) -> None: raise NotImplementedError
