"""Value types shared by the core and its front ends.

They are plain frozen dataclasses so that the D-Bus layer and the CLI can
translate them field by field without reaching into live objects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class OpenFile(Protocol):
    """A file the caller opened and handed over (an fd passed on the bus):
    the core reads it, its owner closes it."""

    def fileno(self) -> int: ...


class VmState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"  # a vCPU stopped by itself (a fatal exit or a thread error) while running


class Policy(enum.StrEnum):
    MANUAL = "manual"
    LOCAL_FIRST = "local-first"
    LOAD_BALANCED = "load-balanced"
    INTERLEAVE = "interleave"
    PREFERRED = "preferred"


@dataclass(frozen=True)
class CreateOptions:
    """Options of CreateVM/PlanVM, already parsed and type-checked by the front end."""

    numa_nodes: int = 0
    policy: Policy | None = None  # None: the manager's default policy
    host_nodes: tuple[int, ...] = ()  # empty: every host node is allowed
    # A flat binary the caller opened (never a path: the daemon would open it
    # with its own rights); None: the built-in touch payload.
    payload: OpenFile | None = None
    prealloc: bool = False
    start: bool = False
    allow_split: bool = False
    passes: int = 0  # built-in payload: passes over its memory before a final HLT; 0 = forever


@dataclass(frozen=True)
class MemoryRegionInfo:
    slot: int
    gpa: int
    size: int
    guest_node: int
    host_node: int
    hva: int  # the daemon's own address: for its diagnostics and tests, never published (ASLR)


@dataclass(frozen=True)
class VcpuStats:
    vcpu: int
    tid: int
    cpu_time_ns: int
    current_cpu: int
    exits: dict[str, int]
    progress: int


@dataclass(frozen=True)
class VmStats:
    exits: dict[str, int]  # summed over vCPUs, by exit reason name ("io", "hlt", "intr", ...)
    vcpus: tuple[VcpuStats, ...]
    pages_per_host_node: dict[int, int]  # resident guest pages by host node (move_pages query)
    dirty_pages: int  # pages dirtied since each slot was made, over all slots: a running total


class JobState(enum.StrEnum):
    """Where a memory migration job is (systemd's jobs have the same shape: one
    object per job, gone once it ended, its outcome told by its removal)."""

    RUNNING = "running"
    DONE = "done"  # every page moved (bar those in ``failed``); the map says the new host node
    CANCELLED = "cancelled"  # stopped between chunks: moved pages stay moved, the map keeps the old node
    FAILED = "failed"  # the kernel refused the move as a whole: everything went back


@dataclass(frozen=True)
class JobStatus:
    """One job at one moment, as its events carry it (a value: never changes under a reader)."""

    id: int
    vm: str
    guest_node: int
    slot: int | None  # None: every slot of the guest node
    host_node: int
    starter: int  # uid of whoever started it: Cancel is theirs (or an admin's)
    state: JobState
    pages_moved: int
    pages_total: int  # resident pages off the destination when the job began; 0 until counted
    failed: tuple[tuple[int, int], ...] = ()  # (errno, pages) of pages that did not move, by errno
    error: str = ""  # why it FAILED
    origin: str = "caller"  # who started it: "caller" (a method call) or "rebalance" (the balancer)
