"""The one check of a VM request, shared by CreateVM, PlanVM and restore.

A request is refused here, with the offending values as fields of the error,
before anything is planned or made: a restored definition is held to the
same rules as a caller's request, so a state file cannot smuggle in what the
API would refuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmnumad import errors
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.model import CreateOptions
from kvmnumad.numa.topology import HostTopology
from kvmnumad.vm.layout import MAX_GUEST_NODES

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_vm_name(name: str) -> str:
    """The VM name rule.  Names become object path elements, state file names
    and cgroup directory names: a leading dot would make "." and ".." (and
    hidden files) of them; fullmatch, because "$" accepts a trailing newline."""
    if not _NAME.fullmatch(name) or name.startswith("."):
        raise errors.InvalidArgument(
            f"VM name {name!r} must be 1-64 characters of [A-Za-z0-9_.-], not starting with '.'", name=name)
    return name


@dataclass(frozen=True)
class Limits:
    """What one VM may ask for on this host."""

    max_vcpus: int = 256
    max_memory: int = 1 << 40


def validate_request(topo: HostTopology, limits: Limits, *, name: str | None, vcpus: int, memory_bytes: int,
                     options: CreateOptions) -> None:
    if name is not None:
        check_vm_name(name)
    if not 1 <= vcpus <= limits.max_vcpus:
        raise errors.InvalidArgument(f"vcpus {vcpus} out of range 1..{limits.max_vcpus}",
                                     vcpus=vcpus, maximum=limits.max_vcpus)
    if not 0 <= memory_bytes <= limits.max_memory:
        raise errors.InvalidArgument(f"memory_bytes {memory_bytes} out of range 0..{limits.max_memory}",
                                     memory_bytes=memory_bytes, maximum=limits.max_memory)
    if options.numa_nodes > MAX_GUEST_NODES:
        raise errors.InvalidArgument(f"numa_nodes {options.numa_nodes} out of range 0..{MAX_GUEST_NODES}",
                                     numa_nodes=options.numa_nodes, maximum=MAX_GUEST_NODES)
    parts = max(options.numa_nodes, 1)
    if memory_bytes % (parts * PAGE_SIZE):
        raise errors.InvalidArgument(
            f"memory_bytes {memory_bytes} must split into {parts} page-aligned parts "
            f"(a multiple of {parts * PAGE_SIZE})", memory_bytes=memory_bytes, multiple=parts * PAGE_SIZE)
    for h in options.host_nodes:
        topo.node(h)
    if options.passes < 0:
        raise errors.InvalidArgument(f"passes {options.passes} must be >= 0", passes=options.passes)
