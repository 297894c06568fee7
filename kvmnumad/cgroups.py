"""cpuset cgroups for VMs: the placement, visible to every cgroup tool.

Layout: one directory per daemon process, one per VM, one per vCPU thread,
``<base>/kvmnumad/<pid>/vm-<name>/vcpu<N>``, where base is the cpuset mount
(v1) or the process's own cgroup (v2: under systemd the service's, handed to
it by ``Delegate=cpuset``, so systemd's tree stays systemd's).  The pid level keeps two
daemons (or a daemon and a test) out of each other's way and tells a crashed
instance's leftovers apart: a directory whose pid is dead is removed at the
next start.  The ``vm-`` prefix keeps a VM called ``tasks`` or
``cpuset.cpus`` from colliding with the kernel's control files.

* cgroup v1 (cpuset controller mounted on its own): a thread joins through
  ``tasks`` (v1 accepts thread ids there).  v1 insists that a child is a
  subset of its parent, and it removes an offlined CPU from every cpuset for
  good: each placement therefore widens the ancestors back to what the
  hierarchy's root holds (the online CPUs) before narrowing the children.
* cgroup v2 (unified): v2 keeps all threads of a process inside one domain,
  so the daemon's process moves into ``kvmnumad/<pid>``, which becomes the
  domain root of a *threaded* subtree; each VM and vCPU cgroup is of type
  ``threaded`` and a thread joins through ``cgroup.threads``.  v2 keeps the
  requested CPUs across hotplug (only ``cpuset.cpus.effective`` shrinks).

Why both: this project's machines run v1, real hosts mostly v2.  Where
neither is writable the daemon runs without cpusets and its report says so.

Ordering rule (both versions): a cpuset's ``cpus`` is written *before* the
thread's affinity, because writing ``cpuset.cpus`` resets the affinity of
its member threads to the whole set; sched_setaffinity then narrows it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from kvmnumad.numa.topology import format_cpulist, parse_cpulist

log = logging.getLogger(__name__)

TOP = "kvmnumad"
VM_PREFIX = "vm-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# How long a VM's cgroup removal retries EBUSY: a task that ended a moment ago
# may still count as a member (KVM's per-VM worker ends when the VM's last fd
# is closed, just before the removal: vm/vm.py Vm.destroy).  No event says when
# (v1 has none): short sleeps, then the failure is the caller's.
RMDIR_PATIENCE = 1.0


def cpulist(cpus: Iterable[int]) -> str:
    return format_cpulist(set(cpus))


def vm_dirname(vm: str) -> str:
    """``vm-<name>``, other bytes escaped as ``\\xHH`` (systemd's unit-name
    escaping: injective, so two VM names never share a directory)."""
    return VM_PREFIX + _UNSAFE.sub(lambda m: "".join(f"\\x{b:02x}" for b in m.group().encode()), vm)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    return path.read_text().strip()


def _mountpoints() -> list[tuple[str, Path, str]]:
    out: list[tuple[str, Path, str]] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, fstype, opts, *_ = line.split()
            if fstype in ("cgroup", "cgroup2"):
                out.append((fstype, Path(mnt), opts))
    return out


def _own_v2_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return ""


def _v2_base() -> str:
    """Where this process may build: its own cgroup (the service's, delegated
    by systemd), or the root when it runs outside any (a test, a guest).  A
    second Manager in a process that already moved into ``kvmnumad/<pid>``
    builds beside the first, not inside it, and so does a child it started."""
    own = _own_v2_cgroup() or "/"
    # also a child process started from inside another instance's cgroup
    # (a test starting the daemon) builds beside it
    m = re.search(rf"(?:/{TOP}/\d+)+$", own)
    if m:
        own = own[: m.start()] or "/"
    return own


class CpusetBackend:
    """Where and how VM cpusets are made; Manager.cpusets is None without one."""

    def __init__(self, version: int, mount: Path) -> None:
        self.version = version
        self.mount = mount
        self.base = mount if version == 1 else mount / _v2_base().lstrip("/")
        self.top = self.base / TOP
        self.root = self.top / str(os.getpid())

    # ---------------------------------------------------------------- setup
    @classmethod
    def detect(cls) -> CpusetBackend | None:
        mounts = _mountpoints()
        for fstype, mnt, opts in mounts:
            if fstype == "cgroup" and "cpuset" in opts.split(","):
                backend = cls(1, mnt)
                if backend._prepare():
                    return backend
        for fstype, mnt, _ in mounts:
            try:
                controllers = _read(mnt / "cgroup.controllers").split()
            except OSError:
                continue
            if fstype == "cgroup2" and "cpuset" in controllers:
                backend = cls(2, mnt)
                if backend._prepare():
                    return backend
        return None

    def _prepare(self) -> bool:
        try:
            self.top.mkdir(exist_ok=True)
            self.root.mkdir(exist_ok=True)
            if self.version == 1:
                self.widen_ancestors()
            else:
                if self.base == self.mount:
                    self._enable_cpuset(self.mount)
                # Only when not there yet: re-writing cgroup.procs would pull
                # the vCPU threads of another Manager in this process out of
                # their vcpuN cgroups.
                if _own_v2_cgroup() != "/" + str(self.root.relative_to(self.mount)):
                    _write(self.root / "cgroup.procs", str(os.getpid()))
                # Under systemd (Delegate=cpuset) the base is the service's own
                # cgroup: it may enable controllers only once no process is
                # left in it, i.e. after the move above.
                self._enable_cpuset(self.base)
                self._enable_cpuset(self.top)
            self.cleanup_stale()
            return True
        except OSError as e:
            log.warning("cpuset cgroup v%d at %s not usable: %s", self.version, self.mount, e)
            return False

    @staticmethod
    def _enable_cpuset(directory: Path) -> None:
        if "cpuset" not in _read(directory / "cgroup.subtree_control").split():
            _write(directory / "cgroup.subtree_control", "+cpuset")

    def all_cpus(self) -> set[int]:
        """What the hierarchy's root may use: the online CPUs as the kernel sees them now."""
        name = "cpuset.cpus" if self.version == 1 else "cpuset.cpus.effective"
        return set(parse_cpulist(_read(self.mount / name)))

    def all_mems(self) -> set[int]:
        """The nodes with memory (a CPU-only or memory-less node cannot be in cpuset.mems)."""
        name = "cpuset.mems" if self.version == 1 else "cpuset.mems.effective"
        return set(parse_cpulist(_read(self.mount / name)))

    def widen_ancestors(self) -> None:
        """v1: give ``kvmnumad`` and ``kvmnumad/<pid>`` everything the root has,
        which brings back CPUs that an offline/online cycle took from them."""
        if self.version != 1:
            return
        cpus, mems = cpulist(self.all_cpus()), cpulist(self.all_mems())
        for d in (self.top, self.root):
            _write(d / "cpuset.mems", mems)
            _write(d / "cpuset.cpus", cpus)

    def cleanup_stale(self) -> list[str]:
        """Remove the cgroups of kvmnumad instances that are gone (crashed):
        their pid directory names a process that no longer exists."""
        removed: list[str] = []
        try:
            instances = list(self.top.iterdir())
        except FileNotFoundError:
            return removed
        for inst in instances:
            if inst.is_dir() and inst.name.isdigit() and not os.path.exists(f"/proc/{inst.name}"):
                self._rmtree(inst)
                removed.append(inst.name)
        return removed

    def _rmtree(self, directory: Path, patience: float = 0.0, strict: bool = False) -> None:
        """Depth-first rmdir (cgroup directories hold only kernel files).
        Tolerates a concurrent remover: another daemon's start may be
        cleaning the same stale instance.  ``patience``: seconds an EBUSY
        directory is retried (see RMDIR_PATIENCE); ``strict``: a directory
        left raises its OSError instead of a warning."""
        try:
            children = [c for c in directory.iterdir() if c.is_dir()]
        except FileNotFoundError:
            return
        for child in children:
            self._rmtree(child, patience, strict)
        start = time.monotonic()
        deadline, pause = start + patience, 0.0005
        while True:
            try:
                directory.rmdir()
                if pause > 0.0005:
                    log.debug("cgroup %s removed after %.1f ms of EBUSY", directory,
                              (time.monotonic() - start) * 1000)
                return
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                if e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.02)
                    continue
                if strict:
                    raise
                log.warning("could not remove cgroup %s: %s", directory, e)
                return

    def close(self) -> None:
        """v1: remove this instance's directory.  v2: the process itself lives
        in it, so it stays until the next start finds the pid dead."""
        if self.version == 1:
            self._rmtree(self.root)

    def describe(self) -> str:
        return f"cgroup v{self.version} cpuset at {self.root}"

    # ---------------------------------------------------------------- per VM
    def vm_cpuset(self, vm: str) -> VmCpuset:
        return VmCpuset(self, vm_dirname(vm))


class VmCpuset:
    """The cgroup directory of one VM and its vCPU children.

    The VM directory holds the union of its vCPUs' CPUs; each ``vcpu<N>``
    holds that vCPU's CPUs.  Every one keeps all memory nodes (set_mems says
    why: the mm is shared by every VM).
    """

    def __init__(self, backend: CpusetBackend, name: str) -> None:
        self.backend = backend
        self.path = backend.root / name
        self._vcpus: dict[int, set[int]] = {}
        self._mems: set[int] = set()
        # What this object last wrote, file by file, and each vCPU's whole
        # placement: a file is written only when its value changes (the
        # kernel, too, ignores an equal cpuset.cpus), and a placement equal
        # to the last one costs no cgroup I/O at all.  forget() drops both
        # when the kernel may have changed files behind our back (hotplug).
        self._written: dict[Path, str] = {}
        self._placed: dict[int, tuple[int, frozenset[int]]] = {}
        self._ensured = False
        self._ensured_once = False
        self._ensure()

    def forget(self) -> None:
        self._written.clear()
        self._placed.clear()
        self._ensured = False

    def _write(self, path: Path, value: str) -> None:
        if self._written.get(path) != value:
            _write(path, value)
            self._written[path] = value

    def _ensure(self) -> None:
        """The VM's directory, and (v1) ancestors wide enough for it: once, and
        again after forget(), since only hotplug takes CPUs from them."""
        if self._ensured:
            return
        backend = self.backend
        if not self._ensured_once and self.path.exists():
            # Left by an earlier VM of this name whose release failed: its vcpuN
            # children hold the old CPUs, and v1 refuses (EBUSY) to narrow this
            # directory below them.  Gone, or this VM is refused (OSError).
            backend._rmtree(self.path, RMDIR_PATIENCE, strict=True)
        self._ensured_once = True
        if backend.version == 1:
            backend.widen_ancestors()
            if not self.path.exists():
                self.path.mkdir()
                self._write_limits(self.path, backend.all_cpus(), backend.all_mems())
        else:
            if not self.path.exists():
                self.path.mkdir()
            _make_threaded(self.path)
            # Possible only now: kvmnumad/<pid> holds processes, so it may enable
            # a controller for its children only once it is a threaded domain.
            CpusetBackend._enable_cpuset(backend.root)
            CpusetBackend._enable_cpuset(self.path)
        self._ensured = True

    def _write_limits(self, directory: Path, cpus: set[int], mems: set[int]) -> None:
        self._write(directory / "cpuset.mems", cpulist(mems))
        self._write(directory / "cpuset.cpus", cpulist(cpus))

    def _children(self) -> list[Path]:
        return [self.path / f"vcpu{i}" for i in sorted(self._vcpus)]

    def set_mems(self, mems: Iterable[int]) -> None:
        """Recorded, never written: every cgroup of a VM keeps all memory nodes.

        A write to cpuset.mems of a cgroup holding a vCPU thread makes the
        kernel rebind the policy of every mapping of the thread's mm and (always
        on cgroup v2, with memory_migrate on v1) migrate that whole mm's pages
        off the nodes dropped (update_tasks_nodemask: mpol_rebind_mm,
        cpuset_migrate_mm).  The mm is the daemon's, shared by every VM: one
        VM's narrowing moved the pages of every VM on the old node (seen in the
        4-node guest, a worker blocked for over 30 s), and the rebind remaps
        other VMs' MPOL_BIND nodes.  Guest memory is placed by each region's
        mbind policy alone, which a cpuset holding all nodes never overrides."""
        self._mems = set(mems)

    @property
    def mems(self) -> frozenset[int]:
        """The nodes of the VM's regions, as last recorded (empty: none yet)."""
        return frozenset(self._mems)

    def place_vcpu(self, index: int, tid: int, cpus: Iterable[int], *, force: bool = False) -> None:
        """Put thread ``tid`` into ``vcpu<index>`` limited to ``cpus``; call
        before sched_setaffinity (see the module docstring).  The same
        placement again is free; ``force`` (a hotplug re-pin) rewrites the
        whole chain, ancestors included."""
        cpus = set(cpus)
        placement = (tid, frozenset(cpus))
        if not force and self._placed.get(index) == placement:
            return
        if force:
            self.forget()
        self._ensure()
        backend = self.backend
        mems = backend.all_mems()  # never narrowed: see set_mems
        child = self.path / f"vcpu{index}"
        child.mkdir(exist_ok=True)
        self._vcpus[index] = cpus
        union = set[int]().union(*self._vcpus.values())
        if backend.version == 1:
            # v1 subset rule: widen the VM first, narrow it after the child.
            self._write_limits(self.path, union | backend.all_cpus(), mems | backend.all_mems())
            self._write_limits(child, cpus, mems)
            self._write_limits(self.path, union, mems)
            self._write(child / "tasks", str(tid))
        else:
            _make_threaded(child)
            self._write_limits(self.path, union, mems)
            self._write_limits(child, cpus, mems)
            self._write(child / "cgroup.threads", str(tid))
        self._placed[index] = placement

    def holds(self, index: int, tid: int, cpus: Iterable[int]) -> bool:
        """Whether ``vcpu<index>`` still holds ``tid`` limited to ``cpus``.  A
        CPU offline can leave the thread's affinity right while its cgroup is
        wrong: v1 moves the thread up to the VM's cgroup, v2 keeps the old
        CPUs requested; a re-pin that only compares affinities misses both."""
        child = self.path / f"vcpu{index}"
        members = "tasks" if self.backend.version == 1 else "cgroup.threads"
        try:
            return (str(tid) in _read(child / members).split()
                    and set(parse_cpulist(_read(child / "cpuset.cpus"))) == set(cpus))
        except OSError:
            return False

    def remove(self) -> None:
        """After the vCPU threads have ended: the directories are empty, or
        soon (RMDIR_PATIENCE); OSError when one is still busy after that."""
        self._vcpus.clear()
        self.forget()
        self.backend._rmtree(self.path, RMDIR_PATIENCE, strict=True)


def _make_threaded(directory: Path) -> None:
    if _read(directory / "cgroup.type") != "threaded":
        _write(directory / "cgroup.type", "threaded")
