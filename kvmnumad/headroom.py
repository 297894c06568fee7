"""Task and memory headroom: refuse a VM with a typed error before a cgroup limit makes it fail halfway.

The first limit a host full of small VMs reaches is the number of tasks: a
systemd service gets TasksMax= (by default 15 % of min(pid_max,
threads-max): 4,915 with pid_max 32768), enforced by the pids cgroup.  Each
vCPU is a thread, and on Linux 6.13 and later KVM adds one task per VM to the
VM's process (its NX huge page recovery worker, ``kvm-nx-lpage-recovery``).
At the limit, thread creation fails anywhere in the daemon, including the
executor threads that serve bus calls; so a VM is refused while RESERVE
tasks are still free, with the numbers in the error.

Memory the same way: a service may run under MemoryMax= (the memory cgroup's
memory.max, v1 memory.limit_in_bytes), which the kernel's per-node free
memory that placement reads knows nothing of.  Guest memory is shmem charged
when a vCPU first touches it, so a VM admitted past the limit is not refused
by any call: the OOM killer ends the daemon and every VM with it.  So a
region is admitted only while the tightest limit above the daemon still has
room for it, for what existing VMs were promised and have not touched yet,
and for MEMORY_RESERVE kept for the daemon itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvmnumad import errors

CGROUP_ROOT = Path("/sys/fs/cgroup")
TASKS_PER_VM = 1  # KVM's per-VM worker task (kvm-nx-lpage-recovery), besides the vCPU threads
RESERVE = 16  # kept free for the daemon's own threads (bus call executor, hotplug re-pins)
MEMORY_RESERVE = 64 << 20  # bytes kept under a memory limit for the daemon's own growth


def _pids_dirs(proc_cgroup: str, root: Path, controller: str = "pids") -> list[Path]:
    """The ``controller`` cgroup directories of this process and its ancestors (v1 or v2)."""
    for line in proc_cgroup.splitlines():
        _id, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            base = root / controller
            break
        if controllers == "" and (root / "cgroup.controllers").exists():
            base = root
            break
    else:
        return []
    dirs = []
    d = base / path.lstrip("/")
    while True:
        dirs.append(d)
        if d == base:
            return dirs
        d = d.parent


def free_tasks(root: Path = CGROUP_ROOT) -> tuple[int, int] | None:
    """(tasks free, the limit) of the tightest pids cgroup above this process; None: unlimited."""
    try:
        dirs = _pids_dirs(Path("/proc/self/cgroup").read_text(), root)
    except OSError:
        return None
    best: tuple[int, int] | None = None
    for d in dirs:
        try:
            limit = (d / "pids.max").read_text().strip()
            if limit == "max":
                continue
            current = int((d / "pids.current").read_text())
        except (OSError, ValueError):
            continue
        free = int(limit) - current
        if best is None or free < best[0]:
            best = (free, int(limit))
    return best


def check_tasks(vm: str, vcpus: int, root: Path = CGROUP_ROOT) -> None:
    """ResourceExhausted if ``vcpus`` threads and KVM's worker would leave fewer than RESERVE tasks."""
    free = free_tasks(root)
    if free is None:
        return
    need = vcpus + TASKS_PER_VM
    if free[0] - need < RESERVE:
        raise errors.ResourceExhausted(
            f"VM {vm!r} needs {need} tasks ({vcpus} vCPU threads + {TASKS_PER_VM} KVM worker) but only "
            f"{free[0]} of the task limit {free[1]} (TasksMax=, pids.max) are free and {RESERVE} are kept "
            f"for the daemon itself", vm=vm, tasks_needed=need, tasks_free=free[0], tasks_max=free[1],
            pid=os.getpid())


def _v1_or_v2(d: Path, v1: str, v2: str) -> str:
    try:
        return (d / v1).read_text().strip()
    except FileNotFoundError:
        return (d / v2).read_text().strip()


def _inactive_file(d: Path) -> int:
    """Page cache the kernel reclaims before it charges a limit: not in the way."""
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("total_inactive_file", "inactive_file"):  # v1 (hierarchical), v2
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def free_memory(root: Path = CGROUP_ROOT) -> tuple[int, int] | None:
    """(bytes free, the limit) of the tightest memory cgroup above this process; None: unlimited."""
    try:
        dirs = _pids_dirs(Path("/proc/self/cgroup").read_text(), root, "memory")
    except OSError:
        return None
    best: tuple[int, int] | None = None
    for d in dirs:
        try:
            raw = _v1_or_v2(d, "memory.limit_in_bytes", "memory.max")
            if raw == "max" or int(raw) >= 1 << 62:  # v1 writes "unlimited" as a page-rounded 2**63-1
                continue
            used = int(_v1_or_v2(d, "memory.usage_in_bytes", "memory.current")) - _inactive_file(d)
        except (OSError, ValueError):
            continue
        free = int(raw) - max(used, 0)
        if best is None or free < best[0]:
            best = (free, int(raw))
    return best


def check_memory(what: str, size: int, promised: int, root: Path = CGROUP_ROOT) -> None:
    """InsufficientMemory if ``size`` more bytes, besides ``promised`` (untouched
    bytes of existing VMs), would leave less than MEMORY_RESERVE under the limit."""
    if size <= 0:
        return
    free = free_memory(root)
    if free is None:
        return
    if size + promised > free[0] - MEMORY_RESERVE:
        raise errors.InsufficientMemory(
            f"{what} needs {size} bytes but the memory limit of {free[1]} bytes (MemoryMax=, memory.max) "
            f"leaves {free[0]} free, {promised} of them promised to existing VMs and {MEMORY_RESERVE} kept "
            f"for the daemon itself", requested=size, free=free[0], limit=free[1], promised=promised,
            pid=os.getpid())
