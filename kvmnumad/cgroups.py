"""cpuset cgroups for VMs: the placement, visible to every cgroup tool.

Layout: one directory per daemon process, one per VM, one per vCPU thread,
``<mount>/kvmnumad/<pid>/<vm>/vcpu<N>``.  The pid level keeps two daemons
(or a daemon and a test) out of each other's way and tells a crashed
instance's leftovers apart: a directory whose pid is dead is removed at the
next start.

* cgroup v1 (cpuset controller mounted on its own): a thread joins through
  ``tasks`` (v1 accepts thread ids there).
* cgroup v2 (unified): v2 keeps all threads of a process inside one domain,
  so the daemon's process moves into ``kvmnumad/<pid>``, which becomes the
  domain root of a *threaded* subtree; each VM and vCPU cgroup is of type
  ``threaded`` and a thread joins through ``cgroup.threads``.

Why both: this project's machines run v1, real hosts mostly v2.  Where
neither is writable the daemon runs without cpusets and its report says so.

Ordering rule (both versions): a cpuset's ``cpus`` is written *before* the
thread's affinity, because writing ``cpuset.cpus`` resets the affinity of
its member threads to the whole set; sched_setaffinity then narrows it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

TOP = "kvmnumad"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def cpulist(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


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


class CpusetBackend:
    """Where and how VM cpusets are made; None-like when unavailable."""

    version: int
    root: Path  # the kvmnumad directory

    def __init__(self, version: int, mount: Path) -> None:
        self.version = version
        self.mount = mount
        self.top = mount / TOP
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
            if fstype == "cgroup2" and "cpuset" in _read(mnt / "cgroup.controllers").split():
                backend = cls(2, mnt)
                if backend._prepare():
                    return backend
        return None

    def _prepare(self) -> bool:
        try:
            self.top.mkdir(exist_ok=True)
            self.root.mkdir(exist_ok=True)
            if self.version == 1:
                for d in (self.top, self.root):
                    _write(d / "cpuset.cpus", _read(self.mount / "cpuset.cpus"))
                    _write(d / "cpuset.mems", _read(self.mount / "cpuset.mems"))
            else:
                self._enable_cpuset(self.mount)
                self._enable_cpuset(self.top)
                _write(self.root / "cgroup.procs", str(os.getpid()))
            self.cleanup_stale()
            return True
        except OSError as e:
            log.warning("cpuset cgroup v%d at %s not usable: %s", self.version, self.mount, e)
            return False

    @staticmethod
    def _enable_cpuset(directory: Path) -> None:
        if "cpuset" not in _read(directory / "cgroup.subtree_control").split():
            _write(directory / "cgroup.subtree_control", "+cpuset")

    def cleanup_stale(self) -> list[str]:
        """Remove the cgroups of kvmnumad instances that are gone (crashed):
        their pid directory names a process that no longer exists."""
        removed = []
        for inst in self.top.iterdir() if self.top.exists() else []:
            if inst.is_dir() and inst.name.isdigit() and not os.path.exists(f"/proc/{inst.name}"):
                self._rmtree(inst)
                removed.append(inst.name)
        return removed

    def _rmtree(self, directory: Path) -> None:
        if not directory.exists():
            return
        for child in directory.iterdir():
            if child.is_dir():
                self._rmtree(child)
        try:
            directory.rmdir()
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("could not remove cgroup %s: %s", directory, e)

    def close(self) -> None:
        """v1: remove this instance's directory.  v2: the process itself lives
        in it, so it stays until the next start finds the pid dead."""
        if self.version == 1:
            self._rmtree(self.root)

    def describe(self) -> str:
        return f"cgroup v{self.version} cpuset at {self.root}"

    # ---------------------------------------------------------------- per VM
    def vm_cpuset(self, vm: str) -> VmCpuset:
        return VmCpuset(self, _SAFE.sub("_", vm))


class VmCpuset:
    """The cgroup directory of one VM and its vCPU children."""

    def __init__(self, backend: CpusetBackend, name: str) -> None:
        self.backend = backend
        self.path = backend.root / name
        self._vcpus: dict[int, set[int]] = {}
        self._mems: set[int] = set()
        self._ensure()

    def _ensure(self) -> None:
        if self.path.exists():
            return
        self.path.mkdir()
        backend = self.backend
        if backend.version == 2:
            _write(self.path / "cgroup.type", "threaded")
            with contextlib.suppress(OSError):  # possible only once a threaded child exists
                CpusetBackend._enable_cpuset(backend.root)
            CpusetBackend._enable_cpuset(self.path)
        else:
            self._write_limits(self.path, self._all_cpus(), self._all_mems())

    def _all_cpus(self) -> set[int]:
        from kvmnumad.numa.topology import read_topology

        return set(read_topology().online_cpus())

    def _all_mems(self) -> set[int]:
        from kvmnumad.numa.topology import read_topology

        return set(read_topology().nodes)

    def _write_limits(self, directory: Path, cpus: set[int], mems: set[int]) -> None:
        # v1 refuses a child wider than its parent and a parent narrower than a
        # child: widen parents first, narrow children first.  Here the parent
        # is always the union of its children, so writing parent-then-child
        # when widening and child-then-parent when narrowing is enough.
        _write(directory / "cpuset.mems", cpulist(mems))
        _write(directory / "cpuset.cpus", cpulist(cpus))

    def set_mems(self, mems: Iterable[int]) -> None:
        """Memory nodes of the VM's regions: written to every vCPU cgroup at
        once, because a vCPU thread faults guest pages in and a cpuset that
        excludes a region's node would override its mbind policy."""
        self._mems = set(mems)
        if not self._mems:
            return
        self._ensure()
        mems_text = cpulist(self._mems)
        children = [self.path / f"vcpu{i}" for i in self._vcpus]
        if self.backend.version == 1:
            _write(self.path / "cpuset.mems", cpulist(self._mems | self._all_mems()))
            for child in children:
                _write(child / "cpuset.mems", mems_text)
        else:
            _write(self.path / "cpuset.mems", mems_text)
            for child in children:
                _write(child / "cpuset.mems", mems_text)
        _write(self.path / "cpuset.mems", mems_text)

    def read(self, index: int | None = None) -> tuple[set[int], set[int]]:
        """(cpus, mems) as the kernel holds them, for reports."""
        from kvmnumad.numa.topology import parse_cpulist

        d = self.path if index is None else self.path / f"vcpu{index}"
        return parse_cpulist(_read(d / "cpuset.cpus")), parse_cpulist(_read(d / "cpuset.mems"))

    def place_vcpu(self, index: int, tid: int, cpus: Iterable[int]) -> None:
        """Put thread ``tid`` into ``vcpu<index>`` limited to ``cpus``; call
        before sched_setaffinity (see the module docstring)."""
        cpus = set(cpus)
        self._ensure()
        mems = self._mems or self._all_mems()
        child = self.path / f"vcpu{index}"
        new_child = not child.exists()
        child.mkdir(exist_ok=True)
        self._vcpus[index] = cpus
        union = set().union(*self._vcpus.values())
        if self.backend.version == 1:
            self._write_limits(self.path, union | self._all_cpus(), mems | self._all_mems())
            self._write_limits(child, cpus, mems)
            self._write_limits(self.path, union, mems)
            _write(child / "tasks", str(tid))
        else:
            if new_child:
                _write(child / "cgroup.type", "threaded")
            _write(self.path / "cpuset.cpus", cpulist(union))
            _write(self.path / "cpuset.mems", cpulist(mems))
            _write(child / "cpuset.mems", cpulist(mems))
            _write(child / "cpuset.cpus", cpulist(cpus))
            _write(child / "cgroup.threads", str(tid))

    def release_vcpu(self, index: int) -> None:
        self._vcpus.pop(index, None)

    def remove(self) -> None:
        """After the vCPU threads have ended: the directories are empty."""
        self.backend._rmtree(self.path)
