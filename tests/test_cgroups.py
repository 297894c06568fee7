"""VM cpusets on the host (cgroup v1 here; v2 is proven in tests/numa/test_numa_cpusets.py).

Every check reads the kernel's own files: cpuset.cpus/cpuset.mems and the
member list of each cgroup, /proc/PID/task/TID/cgroup, taskset.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmnumad import errors
from kvmnumad.cgroups import CpusetBackend
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from tests.observe import node_cpus, online_cpus, open_fds, parse_cpulist, taskset_affinity, thread_ids

MiB = 1 << 20


def backend(manager: Manager) -> CpusetBackend:
    assert manager.cpusets is not None, "this host has a writable cpuset cgroup (v1 at /sys/fs/cgroup/cpuset)"
    return manager.cpusets


def cat(path: Path) -> str:
    return subprocess.run(["cat", str(path)], check=True, capture_output=True, text=True).stdout.strip()


def cpus_of(directory: Path) -> set[int]:
    return parse_cpulist(cat(directory / "cpuset.cpus"))


def mems_of(directory: Path) -> set[int]:
    return parse_cpulist(cat(directory / "cpuset.mems"))


def members(cs: CpusetBackend, directory: Path) -> set[int]:
    name = "tasks" if cs.version == 1 else "cgroup.threads"
    return {int(t) for t in cat(directory / name).split()}


def thread_cpuset(cs: CpusetBackend, tid: int) -> str:
    """The thread's cpuset cgroup path, as /proc shows it."""
    for line in Path(f"/proc/{os.getpid()}/task/{tid}/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if (cs.version == 1 and "cpuset" in controllers.split(",")) or (cs.version == 2 and _id == "0"):
            return path
    raise LookupError(f"thread {tid} has no cpuset cgroup line")


def rel(cs: CpusetBackend, directory: Path) -> str:
    return "/" + str(directory.relative_to(cs.mount))


def subdirs(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_dir()}


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not os.path.exists(f"/proc/{proc.pid}")
    return proc.pid


@pytest.fixture
def live_child() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_create_pin_bind_destroy_match_placement(manager: Manager) -> None:
    cs = backend(manager)
    assert cs.root == cs.mount / "kvmnumad" / str(os.getpid())
    vm = manager.create_vm("cg-a", 2, 8 * MiB,
                           CreateOptions(numa_nodes=1, policy=Policy.LOCAL_FIRST, prealloc=True))
    vmdir = cs.root / "vm-cg-a"
    node0 = node_cpus(0)
    assert cpus_of(vmdir) == node0 and mems_of(vmdir) == {0}
    for vcpu, tid in vm.vcpu_threads():
        d = vmdir / f"vcpu{vcpu}"
        assert cpus_of(d) == node0 == taskset_affinity(tid)
        assert mems_of(d) == {0}
        assert members(cs, d) == {tid}
        assert thread_cpuset(cs, tid) == rel(cs, d)

    tids = dict(vm.vcpu_threads())
    vm.set_vcpu_affinity(0, [1])
    vm.set_vcpu_affinity(1, [1])
    assert cpus_of(vmdir / "vcpu0") == {1} == taskset_affinity(tids[0])
    assert cpus_of(vmdir) == {1}, "the VM's cpuset is the union of its vCPUs'"
    vm.set_vcpu_affinity(1, [0])
    assert cpus_of(vmdir / "vcpu1") == {0} == taskset_affinity(tids[1])
    assert cpus_of(vmdir) == {0, 1}
    vm.bind_vcpu_to_numa_node(0, 0)
    assert cpus_of(vmdir / "vcpu0") == node0 == taskset_affinity(tids[0])
    assert thread_cpuset(cs, tids[0]) == rel(cs, vmdir / "vcpu0")

    manager.destroy_vm("cg-a")
    assert not vmdir.exists()
    assert cs.root.is_dir()
    manager.shutdown()
    if cs.version == 1:
        assert not cs.root.exists(), "v1: the instance directory goes with the Manager"


def test_manual_vm_has_no_vcpu_cgroups_until_pinned(manager: Manager) -> None:
    cs = backend(manager)
    vm = manager.create_vm("cg-manual", 2, 0, CreateOptions(policy=Policy.MANUAL))
    vmdir = cs.root / "vm-cg-manual"
    assert subdirs(vmdir) == set()
    vm.set_vcpu_affinity(1, [0])
    assert subdirs(vmdir) == {"vcpu1"} and cpus_of(vmdir / "vcpu1") == {0}


ODD_NAMES = ["tasks", "cpuset.cpus", "cgroup.procs", "notify_on_release", "a.b-C_9", "-"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_vm_names(manager: Manager, name: str) -> None:
    cs = backend(manager)
    vm = manager.create_vm(name, 1, 0, CreateOptions(policy=Policy.LOAD_BALANCED))
    vmdir = cs.root / f"vm-{name}"
    (_, tid), = vm.vcpu_threads()
    (_, cpus), = vm.declared_vcpu_affinity()
    assert len(cpus) == 1
    assert cpus_of(vmdir / "vcpu0") == set(cpus) == taskset_affinity(tid)
    assert thread_cpuset(cs, tid) == rel(cs, vmdir / "vcpu0")
    manager.destroy_vm(name)
    assert not vmdir.exists()
    assert subdirs(cs.root) == set()


def test_stale_instance_of_dead_pid_cleaned_at_start(dead_pid: int, live_child: int) -> None:
    first = Manager()
    cs = backend(first)
    first.shutdown()
    stale = cs.top / str(dead_pid) / "vm-crashed" / "vcpu0"
    alive = cs.top / str(live_child)
    try:
        for d in (cs.top / str(dead_pid), stale.parent, stale, alive):
            d.mkdir()
            if cs.version == 1:  # as the crashed daemon left them: limits written
                d.joinpath("cpuset.mems").write_text("0")
                d.joinpath("cpuset.cpus").write_text("0")
        second = Manager()
        try:
            assert not (cs.top / str(dead_pid)).exists()
            assert alive.is_dir(), "a live process's directory is not touched"
        finally:
            second.shutdown()
    finally:
        for d in (alive, stale, stale.parent, stale.parent.parent):
            if d.exists():
                d.rmdir()


@pytest.mark.skipif(not Path("/sys/fs/cgroup/cpuset/cpuset.cpus").exists(), reason="v1-only kernel behaviour")
def test_v1_cpus_lost_to_offline_come_back_on_repin(manager: Manager) -> None:
    """cgroup v1 drops an offlined CPU from every cpuset and never puts it back.
    The host's CPUs are shared, so instead of offlining CPU 1 this writes the
    state an offline leaves behind (CPU 1 gone from the instance, VM and vCPU
    cpusets, the thread's affinity reset by the kernel); the re-pin that
    follows a hotplug must rewrite the whole chain."""
    cs = backend(manager)
    if cs.version != 1 or online_cpus() != {0, 1}:
        pytest.skip("needs the v1 host with CPUs 0-1")
    vm = manager.create_vm("cg-lost", 1, 0, CreateOptions(numa_nodes=1, policy=Policy.LOCAL_FIRST))
    (_, tid), = vm.vcpu_threads()
    vmdir = cs.root / "vm-cg-lost"
    assert vm.cpuset is not None and vm.cpuset.holds(0, tid, {0, 1})
    for d in (vmdir / "vcpu0", vmdir, cs.root):  # children first: v1's subset rule
        d.joinpath("cpuset.cpus").write_text("0")
    assert taskset_affinity(tid) == {0}
    assert not vm.cpuset.holds(0, tid, {0, 1})

    moves = manager.on_topology_changed("cpu1 online")
    assert moves == [("cg-lost", 0, [0, 1])]
    for d in (cs.root, vmdir, vmdir / "vcpu0"):
        assert cpus_of(d) == {0, 1}, d
    assert taskset_affinity(tid) == {0, 1}
    assert members(cs, vmdir / "vcpu0") == {tid}
    assert vm.cpuset.holds(0, tid, {0, 1})


def test_refused_vm_creates_no_cgroup(manager: Manager) -> None:
    cs = backend(manager)
    before = subdirs(cs.root)
    opts = CreateOptions(numa_nodes=1, policy=Policy.LOCAL_FIRST)
    with pytest.raises(errors.InsufficientMemory):
        manager.plan_vm(1, 1 << 40, opts)
    fds, threads = open_fds(), thread_ids()
    with pytest.raises(errors.InsufficientMemory):
        manager.create_vm("cg-huge", 1, 1 << 40, opts)
    assert subdirs(cs.root) == before
    assert (open_fds(), thread_ids()) == (fds, threads), "a refused VM left an fd or a thread behind"
    assert manager.list_vms() == []
