"""A VM's vCPUs and where they run: declared intent vs the kernel's truth.

Each vCPU has a KVM fd, a host thread (VcpuRunner) and a *declared*
placement: the CPUs a caller or a policy asked for, and the guest node it is
bound to, if any.  The effective placement is always read back from the
kernel (sched_getaffinity), never from here; the declared one is what a
hotplug re-pin restores once the CPUs come back.  Not locked on its own: the
owning Vm serializes calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvmnumad import cpulist, errors
from kvmnumad.cgroups import VmCpuset
from kvmnumad.kvm.runner import VcpuRunner
from kvmnumad.kvm.vcpu import VcpuFd
from kvmnumad.kvm.vm import VmFd
from kvmnumad.model import VcpuStats
from kvmnumad.numa.topology import HostTopology
from kvmnumad.vm.definition import VcpuDef
from kvmnumad.vm.memory import resource_error


@dataclass
class Vcpu:
    index: int
    fd: VcpuFd
    runner: VcpuRunner
    declared: frozenset[int] | None = None  # None: not pinned by anyone
    bound_node: int | None = None  # guest node it is bound to, if any
    initialized: bool = False
    explicit: bool = False  # a caller's pin or binding: the balancer leaves it until the caller clears it

    @property
    def tid(self) -> int:
        return self.runner.tid

    def effective(self) -> frozenset[int]:
        return frozenset(os.sched_getaffinity(self.runner.tid))


_NO_THREAD = "can't start new thread"

Repin = tuple[int, frozenset[int], frozenset[int]]  # (vcpu, old, new)


class Vcpus:
    """The vCPUs of one VM and their placement (see the module docstring)."""

    def __init__(self, name: str, vmfd: VmFd, count: int, cpuset: VmCpuset | None, *,
                 on_serial: Callable[[int, bytes], None], on_fault: Callable[[int, str], None]) -> None:
        self._name = name
        self._cpuset = cpuset
        self._list: list[Vcpu] = []
        try:
            for i in range(count):
                self._list.append(self._make(vmfd, i, on_serial, on_fault))
        except BaseException:
            self.close()
            raise

    def _make(self, vmfd: VmFd, index: int, on_serial: Callable[[int, bytes], None],
              on_fault: Callable[[int, str], None]) -> Vcpu:
        try:
            fd = vmfd.create_vcpu(index)
        except OSError as e:
            raise resource_error(e, f"vCPU {index} of VM {self._name!r}") or e from e
        try:
            runner = VcpuRunner(fd, index, on_serial=on_serial, on_fault=on_fault)
        except RuntimeError as e:
            fd.close()
            if str(e).startswith(_NO_THREAD):  # threading.Thread.start() at the task limit
                raise errors.ResourceExhausted(f"no thread for vCPU {index} of VM {self._name!r}: {e}") from e
            raise
        except BaseException:
            fd.close()
            raise
        return Vcpu(index, fd, runner)

    def __len__(self) -> int:
        return len(self._list)

    def __iter__(self) -> Iterator[Vcpu]:
        return iter(self._list)

    def get(self, index: int) -> Vcpu:
        if not 0 <= index < len(self._list):
            raise errors.NoSuchVcpu(f"VM {self._name!r} has no vCPU {index} (it has {len(self._list)})",
                                    vcpu=index, vcpus=len(self._list))
        return self._list[index]

    # ------------------------------------------------------------ placement
    def apply(self, v: Vcpu, cpus: frozenset[int], *, force: bool = False) -> None:
        """cpuset first, then sched_setaffinity (cgroups.py says why that order).
        Out of fds or memory is said so (a full fd table once read as CpuOffline)."""
        what = f"cpuset of vCPU {v.index} of VM {self._name!r}"
        try:
            if self._cpuset is not None:
                self._cpuset.place_vcpu(v.index, v.runner.tid, cpus, force=force)
            what = f"sched_setaffinity({v.runner.tid}, {cpulist.describe(cpus)})"
            os.sched_setaffinity(v.runner.tid, cpus)
        except OSError as e:
            typed = resource_error(e, what) or errors.CpuOffline(f"{what}: {e.strerror}", cpus=sorted(cpus))
            raise typed from e

    def declare(self, v: Vcpu, cpus: frozenset[int] | None, bound_node: int | None) -> bool:
        """Apply and record a placement; True if anything changed: the declared
        intent, or the thread's real affinity (someone else's taskset)."""
        changed = (v.declared, v.bound_node) != (cpus, bound_node)
        if cpus is not None:
            changed = changed or v.effective() != cpus
            self.apply(v, cpus)
        v.declared, v.bound_node = cpus, bound_node
        return changed

    def follow_node(self, guest_node: int, cpus: frozenset[int]) -> None:
        """A guest node moved to other host CPUs: the vCPUs bound to it follow."""
        for v in self._list:
            if v.bound_node == guest_node:
                self.apply(v, cpus)
                v.declared = cpus

    def unbind_all(self) -> None:
        for v in self._list:
            v.bound_node = None

    def repin(self, topo: HostTopology) -> list[Repin]:
        """Bring every vCPU's effective affinity back in line with its declared
        intent on ``topo``: the declared CPUs that are online, else the online
        CPUs of the nearest node to them."""
        moves: list[Repin] = []
        online = topo.online_cpus()
        if self._cpuset is not None:
            self._cpuset.forget()  # hotplug may have rewritten what we wrote
        for v in self._list:
            if v.declared is None:
                continue
            target = v.declared & online or _nearest_online(topo, v.declared)
            old = v.effective()
            # the affinity can look right while the cpuset is not (v1 moves
            # the thread up a level on offline, v2 keeps the lost CPU asked)
            stale = self._cpuset is not None and not self._cpuset.holds(v.index, v.runner.tid, target)
            if target != old or stale:
                # reported even when the kernel's own fallback already put the
                # thread there: the placement was repaired all the same
                self.apply(v, target, force=True)
                moves.append((v.index, old, target))
        return moves

    # ------------------------------------------------------------ views
    def threads(self) -> list[tuple[int, int]]:
        return [(v.index, v.tid) for v in self._list]

    def affinity(self) -> list[tuple[int, list[int]]]:
        """Effective, from the kernel."""
        return [(v.index, sorted(v.effective())) for v in self._list]

    def declared_affinity(self) -> list[tuple[int, list[int]]]:
        return [(v.index, sorted(v.declared or ())) for v in self._list]

    def definitions(self) -> tuple[VcpuDef, ...]:
        return tuple(VcpuDef(v.index, None if v.declared is None else tuple(sorted(v.declared)), v.bound_node)
                     for v in self._list)

    def stats(self) -> tuple[dict[str, int], tuple[VcpuStats, ...]]:
        """(exits summed over vCPUs, per-vCPU figures)."""
        per_vcpu: list[VcpuStats] = []
        totals: dict[str, int] = {}
        for v in self._list:
            exits = v.runner.exit_counts()
            for k, n in exits.items():
                totals[k] = totals.get(k, 0) + n
            per_vcpu.append(VcpuStats(v.index, v.tid, v.runner.cpu_time_ns(), v.runner.current_cpu(), exits,
                                      v.runner.progress))
        return totals, tuple(per_vcpu)

    # ------------------------------------------------------------ lifecycle
    def start(self, init: Callable[[Vcpu], None]) -> None:
        for v in self._list:
            if not v.initialized:
                init(v)
                v.initialized = True
        for v in self._list:
            v.runner.start()

    def stop(self) -> None:
        for v in self._list:  # kick all, then wait for each: they park in parallel
            v.runner.request_stop()
        for v in self._list:
            v.runner.stop()

    def close(self) -> None:
        """End every thread, then close every fd; the first failure is raised
        after everything else was released."""
        first: BaseException | None = None
        for v in self._list:
            v.runner.request_close()
        for v in self._list:
            try:
                v.runner.close()
            except BaseException as e:
                first = first or e
        for v in self._list:
            v.fd.close()
        self._list.clear()
        if first is not None:
            raise first


def _nearest_online(topo: HostTopology, cpus: frozenset[int]) -> frozenset[int]:
    """Where vCPUs whose CPUs all went offline go: the nearest node (by
    distance) to the node of the lost CPUs that has online CPUs."""
    nodes = [topo.cpus[c].node for c in cpus if c in topo.cpus]
    if not nodes:
        return topo.online_cpus()
    try:
        return topo.nearest_online_cpus(min(nodes))
    except errors.CpuOffline:
        return topo.online_cpus()
