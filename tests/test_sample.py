"""The sampler's kept files and reused figures (issue 14 item 1), checked from outside.

The timer's Sampler keeps each vCPU's /proc/PID/task/TID/schedstat open and
reads it again with pread, and hands back the previous sample's objects when
nothing changed (kvmnumad/optimizer/probe.py, sample.py).  Both are only
worth it if nothing goes stale: every figure here is compared with what the
kernel tells someone else (a fresh open of the same /proc file, stat,
taskset, numa_maps), and the fds by /proc/PID/fd, before and after a
thread's exit and a VM's destroy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, MemoryRegionInfo, Policy
from kvmnumad.numa.topology import read_topology
from kvmnumad.optimizer import probe
from kvmnumad.optimizer.sample import Sampler
from tests.busfixtures import DaemonProcess, busctl, daemon_process
from tests.observe import numa_maps_at, online_cpus, taskset_affinity
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
BUS = "org.kvmnuma1"
MGR, MGR_IFACE, VM_IFACE = "/org/kvmnuma1", "org.kvmnuma1.Manager", "org.kvmnuma1.VM"


def schedstat(pid: int | str, tid: int) -> tuple[int, int]:
    """Read as anyone would: a fresh open of the file."""
    fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    return int(fields[0]), int(fields[1])


def fd_targets(pid: int | str = "self") -> set[str]:
    """What the kernel says the process holds open."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue  # the listing's own fd, or one closed meanwhile
    return out


def task_files(targets: set[str], tids: set[int]) -> set[str]:
    return {t for t in targets if t.startswith("/proc/") and "/task/" in t
            and int(t.split("/task/")[1].split("/")[0]) in tids}


class _Burner:
    """A real thread that uses CPU until told to stop, then exits."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.tid = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self._ready.set()
        x = 0
        while not self._stop.is_set():
            x += 1

    def end(self) -> None:
        self._stop.set()
        self.thread.join(10)
        wait_until(lambda: not Path(f"/proc/self/task/{self.tid}").exists(), "the thread to leave /proc")


class _ThreadsVm:
    """The read side a Sampler takes of a VM (sample.SampledVm), over real
    threads that are not vCPUs: a vCPU thread of kvmnumad's own VMs lives as
    long as its VM, so a thread that exits under a living VM (an adopted
    VMM's) is made here with threads this test can end."""

    numa_enabled = False
    node_map: list[int] = []
    numa_nodes = 0

    def __init__(self, name: str, tids: list[int]) -> None:
        self.name = name
        self.tids = tids

    def vcpu_threads(self) -> list[tuple[int, int]]:
        return list(enumerate(self.tids))

    def memory_regions(self) -> list[MemoryRegionInfo]:
        return []


def test_a_kept_fd_reads_current_figures_and_ends_with_its_thread() -> None:
    burner = _Burner()
    files = probe.KeptFiles()
    path = f"/proc/self/task/{burner.tid}/schedstat"
    try:
        seen = []
        for _ in range(5):
            before = schedstat("self", burner.tid)
            raw = files.read(path)
            after = schedstat("self", burner.tid)
            assert raw is not None
            kept = probe.parse_schedstat(raw)
            assert before[0] <= kept[0] <= after[0]  # read now, not at the open
            seen.append(kept[0])
            time.sleep(0.02)
        assert len(set(seen)) == len(seen) and seen == sorted(seen)  # the burner ran between reads
        assert len(files) == 1  # one fd, read again
        ours = {t for t in fd_targets() if t.endswith(f"/task/{burner.tid}/schedstat")}
        assert len(ours) == 1
        burner.end()
        assert files.read(path) is None  # ESRCH through the kept fd: no old figures
        assert len(files) == 0
        assert not {t for t in fd_targets() if f"/task/{burner.tid}/" in t}
    finally:
        burner.end()
        files.close()


def test_a_thread_that_exits_is_reported_gone_and_its_fds_closed() -> None:
    burners = [_Burner(), _Burner()]
    tids = [b.tid for b in burners]
    sampler = Sampler(keep_open=True)
    vm = _ThreadsVm("threads", tids)
    topo = read_topology()
    try:
        for _ in range(3):
            s = sampler.take([vm], topo).vms["threads"]
            for v, tid in zip(s.vcpus, tids, strict=True):
                assert 0 < v.cpu_time_ns <= schedstat("self", tid)[0]
                assert v.affinity == taskset_affinity(tid)
            time.sleep(0.02)
        # its schedstat kept (and stat and sched, read when it ran since the take before)
        assert f"/proc/{os.getpid()}/task/{tids[0]}/schedstat" in task_files(fd_targets(), {tids[0]})
        burners[0].end()
        gone, alive = sampler.take([vm], topo).vms["threads"].vcpus
        assert (gone.cpu_time_ns, gone.run_delay_ns, gone.cpu, gone.node) == (0, 0, -1, -1)
        assert 0 < alive.cpu_time_ns <= schedstat("self", tids[1])[0]
        assert not task_files(fd_targets(), {tids[0]})  # closed at the ESRCH
        held = {p.replace("/proc/self/", f"/proc/{os.getpid()}/") for p in sampler.open_files()}
        assert task_files(fd_targets(), {tids[1]}) == task_files(held, {tids[1]}) != set()
        burners[1].end()
        sampler.take([vm], topo)
        assert not task_files(fd_targets(), set(tids))
    finally:
        for b in burners:
            b.end()
        sampler.close()
    assert not task_files(fd_targets(), set(tids))


def _create(manager: Manager, name: str, *, passes: int, prealloc: bool, start: bool) -> None:
    manager.create_vm(name, 2, 2 * 4 * MiB, CreateOptions(numa_nodes=2, policy=Policy.MANUAL, passes=passes,
                                                          start=start, prealloc=prealloc))


def _halted(manager: Manager, name: str) -> None:
    vm = manager.get_vm(name)
    wait_until(lambda: all(s == "halted" for s in vm.runner_states()), f"{name}'s vCPUs to halt", timeout=30)


def test_steady_samples_follow_a_running_vm(manager: Manager) -> None:
    """The timer's sampler (Manager.take_sample): each take's CPU time lies
    between two fresh reads around it, and moves from take to take."""
    _create(manager, "run", passes=0, prealloc=True, start=True)
    tids = dict(manager.get_vm("run").vcpu_threads())
    taken: dict[int, list[int]] = {v: [] for v in tids}
    for _ in range(5):
        before = {v: schedstat("self", t)[0] for v, t in tids.items()}
        s = manager.take_sample()
        after = {v: schedstat("self", t)[0] for v, t in tids.items()}
        assert s is not None
        for v in s.vms["run"].vcpus:
            assert before[v.vcpu] <= v.cpu_time_ns <= after[v.vcpu]  # read now: never an old figure
            assert v.cpu in online_cpus() and v.affinity == taskset_affinity(v.tid)
            taken[v.vcpu].append(v.cpu_time_ns)
        time.sleep(0.2)  # the payload passes over its memory every 50 ms (HLT and the runner's idle wait)
    for values in taken.values():
        assert values == sorted(values) and len(set(values)) >= 4, values


def test_an_idle_vm_shows_what_changed_under_it(manager: Manager) -> None:
    """An idle VM's sample is made of the last one's objects; a pin and pages
    faulted in since must still show (by taskset and numa_maps)."""
    _create(manager, "idle", passes=1, prealloc=False, start=False)
    first = manager.take_sample()
    assert first is not None
    assert sum(sum(r.pages.values()) for r in first.vms["idle"].residency) == 0
    same = manager.take_sample()
    assert same is not None and same.vms["idle"] is first.vms["idle"]  # nothing changed: nothing made
    manager.get_vm("idle").start()  # not a change the sampler is told of
    _halted(manager, "idle")  # one pass over its memory: every page touched
    vm = manager.get_vm("idle")
    vm.set_vcpu_affinity(1, [0])
    tids = dict(vm.vcpu_threads())
    before = {v: schedstat("self", t)[0] for v, t in tids.items()}
    s = manager.take_sample()
    after = {v: schedstat("self", t)[0] for v, t in tids.items()}
    assert s is not None
    observed: dict[int, int] = {}
    for r in vm.memory_regions():
        observed[r.guest_node] = observed.get(r.guest_node, 0) + numa_maps_at(r.hva).total_pages
    assert {r.guest_node: sum(r.pages.values()) for r in s.vms["idle"].residency} == observed
    assert all(n > 0 for n in observed.values())
    for v in s.vms["idle"].vcpus:
        assert v.affinity == taskset_affinity(tids[v.vcpu])
        assert first.vms["idle"].vcpus[v.vcpu].cpu_time_ns < before[v.vcpu] <= v.cpu_time_ns <= after[v.vcpu]
    assert s.vms["idle"].vcpus[1].affinity == {0}


# ------------------------------------------------------------------ the daemon, from outside


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("sample")
    (tmp / "config").mkdir()
    with daemon_process("kvmnumad", tmp, "--bus", "private", "--config-dir", str(tmp / "config"),
                        "--sample-interval", "0.2") as d:
        yield d


def _call(d: DaemonProcess, path: str, iface: str, method: str, sig: str, *args: str) -> object:
    reply = busctl(d.address, "call", BUS, path, iface, method, *([sig, *args] if sig else []))
    return None if reply is None else reply["data"]


def _vm(d: DaemonProcess, name: str, vcpus: int) -> tuple[str, set[int]]:
    path = _call(d, MGR, MGR_IFACE, "CreateVM", "suta{sv}", name, str(vcpus), str(8 * MiB), "2",
                 "numa_nodes", "u", "2", "prealloc", "b", "true")[0]  # type: ignore[index]
    _call(d, path, VM_IFACE, "Start", "")
    threads = busctl(d.address, "get-property", BUS, path, VM_IFACE, "VcpuThreads")["data"]
    return path, {tid for _vcpu, tid in threads}


@pytest.mark.parametrize("others", [0, 1], ids=["last-vm", "among-others"])
def test_destroy_closes_the_vms_sampler_files(daemon: DaemonProcess, others: int) -> None:
    """Counted in /proc/DAEMON/fd: a VM's sampled files are open while it
    runs (one schedstat per vCPU at least) and none is left once DestroyVM
    has answered, also when it was the last VM (the timer then sleeps and
    takes no sample that could close them) and while another VM is sampled."""
    base = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    kept = [_vm(daemon, f"other{i}", 1) for i in range(others)]
    _path, tids = _vm(daemon, "sampled", 3)
    schedstats = {f"/proc/{daemon.pid}/task/{tid}/schedstat" for tid in tids}
    wait_until(lambda: schedstats <= task_files(fd_targets(daemon.pid), tids),
               "the sampler to keep the VM's schedstat files", timeout=10)
    _call(daemon, MGR, MGR_IFACE, "DestroyVM", "s", "sampled")
    assert not task_files(fd_targets(daemon.pid), tids)
    time.sleep(0.6)  # a few periods: nothing of it comes back
    assert not task_files(fd_targets(daemon.pid), tids)
    for i, (_p, other_tids) in enumerate(kept):
        assert task_files(fd_targets(daemon.pid), other_tids)  # the other VM is still sampled
        _call(daemon, MGR, MGR_IFACE, "DestroyVM", "s", f"other{i}")
    wait_until(lambda: len(os.listdir(f"/proc/{daemon.pid}/fd")) <= base, "the daemon's fds back to before",
               timeout=10)


def test_an_adopted_vms_files_close_at_release_and_at_its_exit(manager: Manager) -> None:
    """An adopted VM's threads are another process's (/proc/VMM/task/TID):
    ReleaseVM closes the files kept of them, and so does the VMM's exit
    (its threads' reads fail with ESRCH) at the next take."""
    from kvmnumad.adopt.discovery import AdoptOptions  # noqa: PLC0415

    argv = [sys.executable, "-m", "tests.vmm_threads", "cloud-hypervisor", "2", "8"]
    for end in ("release", "exit"):
        with subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) as p:
            assert p.stdout is not None and p.stdout.readline().startswith("ready")
            vm = manager.adopt_process(p.pid, AdoptOptions())
            _create(manager, "own", passes=1, prealloc=True, start=True)  # a VM that stays sampled
            tids = {tid for _i, tid in vm.vcpu_threads()}
            s = manager.take_sample()
            assert s is not None and s.vms[vm.name].vcpus[0].cpu_time_ns > 0
            assert {f"/proc/{p.pid}/task/{tid}/schedstat" for tid in tids} <= fd_targets()
            if end == "release":
                manager.release_vm(vm.name)
                assert not {t for t in fd_targets() if t.startswith(f"/proc/{p.pid}/")}
                p.kill()
            else:
                p.kill()
                p.wait(10)
                s = manager.take_sample()  # the VM is still listed until its pidfd is seen
                assert s is not None
                if vm.name in s.vms:
                    assert all(v.cpu_time_ns == 0 and v.cpu == -1 for v in s.vms[vm.name].vcpus)
                assert not {t for t in fd_targets() if t.startswith(f"/proc/{p.pid}/")}
                manager.release_vm(vm.name)
            p.wait(10)
            manager.destroy_vm("own")
