"""Task headroom: refuse a VM with a typed error before the task limit makes it fail halfway.

The first limit a host full of small VMs reaches is the number of tasks: a
systemd service gets TasksMax= (by default 15 % of min(pid_max,
threads-max): 4,915 with pid_max 32768), enforced by the pids cgroup.  Each
vCPU is a thread, and on Linux 6.13 and later KVM adds one task per VM to the
VM's process (its NX huge page recovery worker, ``kvm-nx-lpage-recovery``).
At the limit, thread creation fails anywhere in the daemon, including the
executor threads that serve bus calls; so a VM is refused while RESERVE
tasks are still free, with the numbers in the error.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvmnumad import errors

CGROUP_ROOT = Path("/sys/fs/cgroup")
TASKS_PER_VM = 1  # KVM's per-VM worker task (kvm-nx-lpage-recovery), besides the vCPU threads
RESERVE = 16  # kept free for the daemon's own threads (bus call executor, hotplug re-pins)


def _pids_dirs(proc_cgroup: str, root: Path) -> list[Path]:
    """The pids cgroup directories of this process and its ancestors (v1 pids controller or v2)."""
    for line in proc_cgroup.splitlines():
        _id, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            base = root / "pids"
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
