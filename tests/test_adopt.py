"""Issue 15 on the host: a real QEMU (-accel kvm on /dev/kvm) adopted by the
real daemon process on a real dbus-daemon, every claim checked from outside
(taskset and /proc for threads, numa_maps for memory, busctl/dbus-fast for
the API).  The multi-node half is tests/numa/test_numa_adopt.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, Variant

from kvmnumad.bus.service import BUS_NAME
from tests.busfixtures import (
    MANAGER_IFACE,
    MANAGER_PATH,
    VM_IFACE,
    BusClient,
    BusDaemon,
    CallFailed,
    DaemonProcess,
    busctl,
    daemon_process,
    start_bus_daemon,
)
from tests.observe import numa_maps, taskset_affinity, thread_affinity
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures"]

ROOT = Path(__file__).resolve().parent.parent
ERR = "org.kvmnuma1.Error."
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"


def qemu_argv(name: str, *extra: str, smp: int = 4) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "kvm", "-smp", str(smp), "-m", "256",
            "-name", f"{name},debug-threads=on", "-nodefaults", "-display", "none", "-S", *extra]


def vcpu_tids(pid: int) -> dict[int, int]:
    """vCPU index -> tid, read here from the thread names QEMU gives them."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        if comm.startswith("CPU ") and comm.endswith("/KVM"):
            out[int(comm[4:-4])] = int(tid)
    return out


@contextlib.contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


@contextlib.contextmanager
def qemu(name: str, *extra: str, smp: int = 4) -> Iterator[subprocess.Popen[str]]:
    with running(qemu_argv(name, *extra, smp=smp)) as proc:
        wait_until(lambda: len(vcpu_tids(proc.pid)) == smp or proc.poll() is not None, "QEMU's vCPU threads")
        assert proc.poll() is None, "QEMU exited"
        yield proc


@pytest.fixture(scope="module")
def daemon(bus_daemon: BusDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    state = tmp_path_factory.mktemp("adopt-state")
    with daemon_process("kvmnumad", tmp_path_factory.mktemp("adopt"), "--bus", bus_daemon.address,
                        "--state-dir", str(state)) as d:
        yield d


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[BusClient]:
    c = BusClient(daemon.address)
    try:
        yield c
        for name, _state, _path in c.manager("ListVMs")[0]:  # leave the daemon as we found it
            with contextlib.suppress(CallFailed):
                c.manager("ReleaseVM", "s", name)
    finally:
        c.close()


def adopt(c: BusClient, pid: int, **options: Variant) -> str:
    (path,) = c.manager("AdoptProcess", "ua{sv}", pid, options)
    return str(path)


def error_of(c: BusClient, path: str, iface: str, member: str, signature: str = "",
             *args: object) -> tuple[str, str]:
    return c.error(BUS_NAME, path, iface, member, signature, list(args))


# ------------------------------------------------------------------ acceptance
def test_adopted_qemu_is_placed_from_outside_and_never_stopped(daemon: DaemonProcess,
                                                               client: BusClient) -> None:
    with qemu("t") as q:
        tids = vcpu_tids(q.pid)
        path = adopt(client, q.pid)
        assert path == "/org/kvmnuma1/vm/t"  # QEMU's own -name
        a = daemon.address
        managed = busctl(a, "call", BUS_NAME, MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects")["data"][0]
        assert managed[path][VM_IFACE]["Adopted"]["data"] is True  # renders under busctl --json
        got = client.get_all(path, VM_IFACE)
        assert (got["Adopted"], got["Vmm"], got["ProcessId"], got["Vcpus"]) == (True, "qemu", q.pid, 4)
        assert sorted(map(tuple, got["VcpuThreads"])) == sorted(tids.items())
        assert got["MemoryBytes"] == 256 << 20  # QEMU's pc.ram: its anonymous mapping of -m's size
        before = {i: taskset_affinity(t) for i, t in tids.items()}
        cgroups = {t: Path(f"/proc/{q.pid}/task/{t}/cgroup").read_text() for t in tids.values()}

        # pinning vCPU 2 is seen by taskset on QEMU's "CPU 2/KVM" thread, and only there
        client.vm(path, "SetVcpuAffinity", "uau", 2, [1])
        assert taskset_affinity(tids[2]) == {1}
        assert thread_affinity(q.pid, tids[2]) == {1}
        assert {i: taskset_affinity(t) for i, t in tids.items() if i != 2} == {
            i: c for i, c in before.items() if i != 2}
        assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "VcpuAffinity")["data"][2] == [2, [1]]
        # no thread of the VMM was moved between cgroups (libvirt's machine.slice is libvirt's)
        assert {t: Path(f"/proc/{q.pid}/task/{t}/cgroup").read_text() for t in tids.values()} == cgroups

        # statistics: per-thread CPU time and pages per node of QEMU's guest memory, as busctl prints them
        stats = busctl(a, "call", BUS_NAME, path, VM_IFACE, "GetStats")["data"]
        assert [v[1] for v in stats[1]] == [tids[i] for i in range(4)]

        # Start, Stop, Destroy, DestroyVM: refused, and QEMU keeps running with its threads
        for member in ("Start", "Stop", "Destroy"):
            name, text = error_of(client, path, VM_IFACE, member)
            assert name == ERR + "Busy" and "not ours" in text, (member, name, text)
        name, _ = error_of(client, MANAGER_PATH, MANAGER_IFACE, "DestroyVM", "s", "t")
        assert name == ERR + "Busy"
        name, _ = error_of(client, path, VM_IFACE, "EnableNuma", "u", 2)
        assert name == ERR + "Busy"
        assert q.poll() is None and vcpu_tids(q.pid) == tids
        assert client.manager("ListVMs")[0] == [["t", "running", path]]

        # release: the object goes, the pin stays where it was put
        client.manager("ReleaseVM", "s", "t")
        assert client.manager("ListVMs")[0] == []
        assert taskset_affinity(tids[2]) == {1} and q.poll() is None


def test_qemu_exit_removes_the_object_within_a_second(client: BusClient) -> None:
    with qemu("gone") as q:
        path = adopt(client, q.pid, name=Variant("s", "gone"))
        client.signals.clear()
        os.kill(q.pid, signal.SIGKILL)
        killed = time.monotonic()

        def removed(m: Message) -> bool:
            return m.member == "InterfacesRemoved" and m.body[0] == path

        client.wait_signal(removed, timeout=5)
        took = time.monotonic() - killed
        print(f"InterfacesRemoved {took * 1000:.1f} ms after SIGKILL")
        assert took < 1.0, f"InterfacesRemoved {took:.3f} s after the kill"
        assert client.manager("ListVMs")[0] == []
        assert client.error(BUS_NAME, path, VM_IFACE, "GetStats")[0] == UNKNOWN_OBJECT


def test_adopting_what_is_no_vmm_is_refused_and_creates_nothing(daemon: DaemonProcess,
                                                                client: BusClient) -> None:
    with running(["sleep", "60"]) as sleeper:
        wait_until(lambda: Path(f"/proc/{sleeper.pid}/comm").read_text().strip() == "sleep", "sleep exec'd")
        client.signals.clear()
        cases: list[tuple[int, dict[str, Variant], str, str]] = [
            (sleeper.pid, {}, "InvalidArgument", "anon_inode:kvm-vm"),
            (daemon.pid, {}, "InvalidArgument", ""),  # kvmnumad itself
            (0, {}, "InvalidArgument", "positive"),
            (2**31, {}, "InvalidArgument", "no process"),
            (sleeper.pid, {"colour": Variant("s", "red")}, "InvalidArgument", "unknown option"),
            (sleeper.pid, {"qmp": Variant("s", "relative.sock")}, "InvalidArgument", "absolute"),
            (sleeper.pid, {"qmp": Variant("u", 3)}, "InvalidArgument", "type"),
            (sleeper.pid, {"name": Variant("s", "../x")}, "InvalidArgument", "VM name"),
        ]
        for pid, opts, name, words in cases:
            got, text = error_of(client, MANAGER_PATH, MANAGER_IFACE, "AdoptProcess", "ua{sv}", pid, opts)
            assert got == ERR + name and words in text, (pid, opts, got, text)
        assert client.manager("ListVMs")[0] == []
        assert not [m for m in client.signals if m.member == "InterfacesAdded"]
        assert busctl(daemon.address, "call", BUS_NAME, MANAGER_PATH, OBJECT_MANAGER,
                      "GetManagedObjects")["data"] == [{}]


def test_adopting_twice_or_under_a_taken_name_is_refused(client: BusClient) -> None:
    with qemu("twice", smp=2) as q, qemu("other", smp=2) as other:
        adopt(client, q.pid)
        got, text = error_of(client, MANAGER_PATH, MANAGER_IFACE, "AdoptProcess", "ua{sv}", q.pid,
                             {"name": Variant("s", "again")})
        assert got == ERR + "AlreadyExists" and "adopted already" in text
        got, _ = error_of(client, MANAGER_PATH, MANAGER_IFACE, "AdoptProcess", "ua{sv}", other.pid,
                          {"name": Variant("s", "twice")})
        assert got == ERR + "AlreadyExists"
        assert [r[0] for r in client.manager("ListVMs")[0]] == ["twice"]
        # a VM of kvmnumad's own is not released: that is DestroyVM's
        client.manager("CreateVM", "suta{sv}", "own", 1, 2 << 20, {})
        got, _ = error_of(client, MANAGER_PATH, MANAGER_IFACE, "ReleaseVM", "s", "own")
        assert got == ERR + "InvalidArgument"
        client.manager("DestroyVM", "s", "own")


def test_qmp_gives_the_guest_numa_layout(client: BusClient, tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    with qemu("qmp", "-qmp", f"unix:{sock},server=on,wait=off",
              "-object", "memory-backend-memfd,id=m0,size=128M,prealloc=on",
              "-object", "memory-backend-memfd,id=m1,size=128M,prealloc=on",
              "-numa", "node,nodeid=0,cpus=0,memdev=m0", "-numa", "node,nodeid=1,cpus=1-3,memdev=m1") as q:
        wait_until(sock.exists, "QMP socket")
        path = adopt(client, q.pid, qmp=Variant("s", str(sock)))
        got = client.get_all(path, VM_IFACE)
        assert got["NumaNodes"] == 2
        assert [n for _v, _b, n in got["VcpuNodes"]] == [0, 1, 1, 1]
        assert sorted((r[2], r[3]) for r in got["MemoryRegions"]) == [(128 << 20, 0), (128 << 20, 1)]
        # bind vCPU 3 to its guest node: the host CPUs of the node it maps to (this host: node 0, CPUs 0-1)
        client.vm(path, "BindVcpuToNumaNode", "uu", 3, 1)
        assert taskset_affinity(vcpu_tids(q.pid)[3]) == {0, 1}
        # GetStats counts QEMU's prealloc'd pages of both backends on host node 0
        stats = client.vm(path, "GetStats")
        assert dict(map(tuple, stats[2])) == {0: 2 * (128 << 20) // 4096}


@pytest.mark.parametrize("kind", ["cloud-hypervisor", "firecracker"])
def test_thread_names_of_other_vmms(client: BusClient, kind: str) -> None:
    # Neither VMM ships a binary in Debian 12 or on PyPI: a process with a real
    # KVM VM fd and threads named as theirs are (tests/vmm_threads.py).
    with running([sys.executable, "-m", "tests.vmm_threads", kind, "3", "8"]) as p:
        assert p.stdout is not None and p.stdout.readline().startswith("ready")
        path = adopt(client, p.pid)
        got = client.get_all(path, VM_IFACE)
        assert (got["Vmm"], got["Vcpus"], got["MemoryBytes"]) == (kind, 3, 8 << 20)
        threads = dict(map(tuple, got["VcpuThreads"]))
        pattern = "vcpu{}" if kind == "cloud-hypervisor" else "fc_vcpu {}"
        for i, tid in threads.items():
            assert Path(f"/proc/{p.pid}/task/{tid}/comm").read_text().strip() == pattern.format(i)
        client.vm(path, "SetVcpuAffinity", "uau", 1, [0])
        assert taskset_affinity(threads[1]) == {0}


def test_adoptions_are_reattached_after_a_restart_while_the_process_lives(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # a bus of its own: the module's daemon owns org.kvmnuma1 on the shared one
    with start_bus_daemon() as bus_daemon, qemu("keep", smp=2) as q, qemu("lost", smp=2) as lost:
        tids = vcpu_tids(q.pid)
        (tmp_path / "first").mkdir()
        (tmp_path / "second").mkdir()
        with daemon_process("kvmnumad", tmp_path / "first", "--bus", bus_daemon.address,
                            "--state-dir", str(state)) as d:
            c = BusClient(d.address)
            try:
                path = adopt(c, q.pid)
                adopt(c, lost.pid)
                c.vm(path, "SetVcpuAffinity", "uau", 1, [0])
                busctl(d.address, "set-property", BUS_NAME, path, VM_IFACE, "AutoBalance", "b", "true")
            finally:
                c.close()
        # the daemon is gone; the threads stay where it put them, one process ends, and
        # someone else moves the pinned thread meanwhile
        assert taskset_affinity(tids[1]) == {0}
        lost.kill()
        lost.wait()
        subprocess.run(["taskset", "-pc", "0-1", str(tids[1])], check=True, capture_output=True)
        with daemon_process("kvmnumad", tmp_path / "second", "--bus", bus_daemon.address,
                            "--state-dir", str(state)) as d:
            c = BusClient(d.address)
            try:
                assert c.manager("ListVMs")[0] == [["keep", "running", path]]
                got = c.get_all(path, VM_IFACE)
                assert (got["Adopted"], got["ProcessId"]) == (True, q.pid)
                assert got["DeclaredVcpuAffinity"] == [[0, []], [1, [0]]]
                assert got["AutoBalance"] is True  # kept with the adoption (policy manual's default is off)
                assert taskset_affinity(tids[1]) == {0}  # the declared pin, applied again
            finally:
                c.close()
        assert sorted(p.name for p in (state / "adopted").glob("*.json")) == ["keep.json"]
        assert not list(state.glob("*.json"))  # not a VM definition kvmnumad would try to make


def test_adoption_is_held_to_the_owners_quota() -> None:
    from kvmnumad import errors, quotas  # noqa: PLC0415
    from kvmnumad.adopt.discovery import AdoptOptions  # noqa: PLC0415
    from kvmnumad.manager import Manager  # noqa: PLC0415

    manager = Manager(cpusets=False)
    manager.set_quotas(quotas.parse("[uid:4321]\nvms = 1\n", "test"))
    try:
        with qemu("q1", smp=1) as first, qemu("q2", smp=1) as second:
            manager.adopt_process(first.pid, AdoptOptions(), owner=4321)
            with pytest.raises(errors.QuotaExceeded, match="vms quota"):
                manager.adopt_process(second.pid, AdoptOptions(), owner=4321)
            assert [vm.name for vm in manager.list_vms()] == ["q1"]
            manager.adopt_process(second.pid, AdoptOptions(), owner=0)  # root: unlimited
    finally:
        manager.shutdown()


def test_an_adopted_vms_sampled_figures_are_its_vmms() -> None:
    """Residency and VcpuUsage of an adopted VM come from the VMM's /proc
    (its threads' schedstat, its numa_maps), not the daemon's: read here
    from /proc/PID and compared."""
    from kvmnumad.adopt.discovery import AdoptOptions  # noqa: PLC0415
    from kvmnumad.manager import Manager  # noqa: PLC0415
    from kvmnumad.optimizer.sample import measure_vm  # noqa: PLC0415

    manager = Manager(cpusets=False)
    try:
        with running([sys.executable, "-m", "tests.vmm_threads", "cloud-hypervisor", "2", "8"]) as p:
            assert p.stdout is not None and p.stdout.readline().startswith("ready")
            vm = manager.adopt_process(p.pid, AdoptOptions())
            pages = (8 << 20) // os.sysconf("SC_PAGESIZE")  # all touched (tests/vmm_threads.py)
            for s in (manager.take_sample(), manager.take_sample()):  # a full read, then the steady one
                assert s is not None
                got = s.vms[vm.name]
                for v in got.vcpus:  # the threads sleep: their CPU time stands still
                    fields = Path(f"/proc/{p.pid}/task/{v.tid}/schedstat").read_text().split()
                    assert v.cpu_time_ns == int(fields[0]) > 0
                    assert v.cpu == int(Path(f"/proc/{p.pid}/task/{v.tid}/stat").read_text()
                                        .rsplit(")", 1)[1].split()[36])
                assert sum(sum(r.pages.values()) for r in got.residency) == pages
            stateless = measure_vm(vm, manager.topology())  # what a new object is exported with
            assert sum(sum(r.pages.values()) for r in stateless.residency) == pages
            assert all(v.cpu_time_ns > 0 for v in stateless.vcpus)
    finally:
        manager.shutdown()


def test_an_adopted_vm_is_balanced_and_its_memory_moves_as_a_job(daemon: DaemonProcess,
                                                                 client: BusClient) -> None:
    """AutoBalance as a VM of kvmnumad's own has it (the policy's default,
    the option, the property), and MigrateNumaNode on an adopted VM is a
    migration job on the VMM's pages.  One node here: the job moves nothing;
    the pages it moves from node to node are tests/numa/test_numa_adopt.py's."""
    a = daemon.address
    with running([sys.executable, "-m", "tests.vmm_threads", "cloud-hypervisor", "2", "8"]) as p, \
            qemu("lb", smp=2) as q:
        assert p.stdout is not None and p.stdout.readline().startswith("ready")
        path = adopt(client, p.pid, name=Variant("s", "ch"), policy=Variant("s", "local-first"))
        assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "AutoBalance")["data"] is True
        # the option, checked by type before anything is adopted
        name, _ = error_of(client, MANAGER_PATH, MANAGER_IFACE, "AdoptProcess", "ua{sv}", q.pid,
                           {"auto_balance": Variant("s", "yes")})
        assert name == ERR + "InvalidArgument"
        assert [row[0] for row in client.manager("ListVMs")[0]] == ["ch"]
        qpath = adopt(client, q.pid, policy=Variant("s", "local-first"), auto_balance=Variant("b", False))
        assert busctl(a, "get-property", BUS_NAME, qpath, VM_IFACE, "AutoBalance")["data"] is False
        busctl(a, "set-property", BUS_NAME, qpath, VM_IFACE, "AutoBalance", "b", "true")
        assert busctl(a, "get-property", BUS_NAME, qpath, VM_IFACE, "AutoBalance")["data"] is True

        # MigrateNumaNode: a job of its own on the bus, ending done; the VMM's pages all still there
        (job,) = client.vm(path, "MigrateNumaNode", "uu", 0, 0)
        removed = client.wait_signal(lambda m: m.member == "JobRemoved" and m.body[1] == job, timeout=60)
        assert removed.body[3] == "done"
        pages = (8 << 20) // os.sysconf("SC_PAGESIZE")
        memfd = [e for e in numa_maps(p.pid) if "memfd:cloud-hypervisor" in e.raw]
        assert sum(e.pages_per_node.get(0, 0) for e in memfd) == pages
        assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "NodeMap")["data"] == [0]


def test_a_job_on_an_adopted_vm_whose_process_exits_ends_and_the_object_goes(
        caplog: pytest.LogCaptureFixture) -> None:
    """The VMM exits while a job moves its pages (one page a chunk: a job of
    seconds): the job ends (its move_pages gets ESRCH), the object goes, and
    nothing is logged as a bug."""
    from kvmnumad.adopt.discovery import AdoptOptions  # noqa: PLC0415
    from kvmnumad.manager import Manager  # noqa: PLC0415
    from kvmnumad.model import JobState  # noqa: PLC0415

    manager = Manager(cpusets=False)
    manager.migration_chunk_pages = 1
    try:
        with running([sys.executable, "-m", "tests.vmm_threads", "cloud-hypervisor", "2", "128"]) as p:
            assert p.stdout is not None and p.stdout.readline().startswith("ready")
            vm = manager.adopt_process(p.pid, AdoptOptions(name="exits"))
            job = manager.start_migration(vm.name, 0, 0)
            time.sleep(0.1)
            assert not job.ended, "the job ended before the process did: make it longer"
            p.kill()
            p.wait()
            status = job.wait(30)
            assert status.state == JobState.FAILED and "exited" in status.error, status
            manager.release_vm(vm.name, reason="exited")
            assert manager.list_vms() == [] and manager.jobs == []
            print(f"job {status.state}: {status.pages_total} pages counted, error {status.error!r}")
            assert not [r for r in caplog.records if r.exc_info], caplog.text
    finally:
        manager.shutdown()
