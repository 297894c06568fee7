"""What the core tells its subscribers, in the core's own terms.

Each event says *what* changed (a VM's state, its memory, its vCPU
placement...), never how a front end shows it: the D-Bus layer decides which
properties and signals an aspect means, persistence decides whether a
definition must be written.  Events are delivered synchronously, in order,
on the thread that made the change, before the call that made it returns:
the bus layer relies on that to publish a change before its method reply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmnumad.model import JobStatus, Policy


class Aspect(enum.StrEnum):
    """One part of a VM that a change may touch."""

    STATE = "state"  # created / running / stopped
    NUMA_LAYOUT = "numa-layout"  # guest NUMA on or off, node count, guest-to-host node map
    MEMORY = "memory"  # memory regions (slots, sizes, host nodes)
    VCPU_PLACEMENT = "vcpu-placement"  # declared or effective affinity, bindings
    BALANCING = "balancing"  # automatic balancing on or off, what a caller placed explicitly


@dataclass(frozen=True)
class VmAdded:
    vm: str


@dataclass(frozen=True)
class VmRemoved:
    vm: str


@dataclass(frozen=True)
class VmChanged:
    vm: str
    aspects: frozenset[Aspect]


@dataclass(frozen=True)
class VcpuRepinned:
    """A vCPU moved because the host changed (hotplug), not because a caller asked."""

    vm: str
    vcpu: int
    old: frozenset[int]
    new: frozenset[int]
    reason: str


@dataclass(frozen=True)
class TopologyChanged:
    online_cpus: frozenset[int]
    reason: str


@dataclass(frozen=True)
class DefaultPolicyChanged:
    policy: Policy


@dataclass(frozen=True)
class JobAdded:
    """A memory migration job started (vm/migration.py); ``status`` as it started."""

    status: JobStatus


@dataclass(frozen=True)
class JobChanged:
    """Its progress or state, at most every PROGRESS_INTERVAL while it runs."""

    status: JobStatus


@dataclass(frozen=True)
class JobRemoved:
    """It ended (``status.state`` says how) and is gone from Manager.jobs."""

    status: JobStatus


@dataclass(frozen=True)
class Rebalanced:
    """The balancer moved a guest node's vCPUs or memory (optimizer/balance.py's Move)."""

    vm: str
    kind: str  # "vcpus" or "memory"
    guest_node: int
    from_node: int
    to_node: int
    gain: float
    reason: str
    job: int | None = None  # a memory move: the migration job that moves it (started, not yet done)




Event = (VmAdded | VmRemoved | VmChanged | VcpuRepinned | TopologyChanged | DefaultPolicyChanged
         | JobAdded | JobChanged | JobRemoved | Rebalanced)
