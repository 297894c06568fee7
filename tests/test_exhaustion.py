"""Creating VMs until a real limit is reached (issue 12, item 4).

Each test puts a real kernel limit around a real daemon and creates VMs until
one is refused.  The refusal must be a typed org.kvmnuma1.Error.* reached
before the limit hurts (the daemon is not killed, the host not touched), the
daemon must still answer afterwards and make a VM again once room is freed,
and the refused call must leave nothing: its fds, threads and cgroups, seen
in /proc/PID/fd, /proc/PID/task and the cpuset tree, are as before the call.
The daemon exits 0 at the end (daemon_process checks).

* file descriptors: ``prlimit --nofile`` on the daemon (each vCPU costs 2, a VM 2 more);
* tasks: a pids cgroup (pids.max) around the daemon: RLIMIT_NPROC would be the
  obvious limit, but the kernel does not apply it to root, which the daemon is;
* memory: a memory cgroup (memory.limit_in_bytes / memory.max) around the daemon,
  which is what systemd's MemoryMax= makes; the kernel's free memory per node,
  which placement reads, does not see it.

Quotas (vms, vcpus, memory, regions) have their own tests (test_quotas.py,
test_system_quotas.py); a vCPU count above MaxVcpus is InvalidArgument (test_bus_errors.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_fast import Message

from tests.busfixtures import BusClient, BusDaemon, DaemonProcess, daemon_process, options
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures"]

MiB = 1 << 20
ERR = "org.kvmnuma1.Error."
CGROUPS = Path("/sys/fs/cgroup")


@pytest.fixture
def daemon(bus_daemon: BusDaemon, tmp_path: Path) -> Iterator[DaemonProcess]:
    (tmp_path / "config").mkdir()
    with daemon_process("kvmnumad", tmp_path, "--bus", bus_daemon.address,
                        "--config-dir", str(tmp_path / "config")) as d:
        yield d


def _held(pid: int) -> dict[str, object]:
    """What the daemon holds of VMs, read from /proc and the cpuset tree."""
    fds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            vm_kind = target.startswith(("/memfd:", "anon_inode:"))
            kind = target.split(":", 2)[1].split("-node")[0] if vm_kind else "other"
            fds[kind] = fds.get(kind, 0) + 1
    threads: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            # KVM's own per-VM worker (kvm-nx-lpage-recovery) starts and ends on
            # its own time, after a VM's first KVM_RUN and after its fd closes:
            # counted apart (_kernel_workers), not in the before/after snapshot.
            if comm.startswith(("vcpu", "kvm")) and comm != KVM_WORKER:
                threads[comm] = threads.get(comm, 0) + 1
    mine = CGROUPS / "cpuset" / "kvmnumad" / str(pid)
    cgroups = sorted(p.name for p in mine.iterdir() if p.is_dir()) if mine.is_dir() else []
    return {"fds": {k: v for k, v in fds.items() if k != "other"}, "threads": threads, "cgroups": cgroups}


KVM_WORKER = "kvm-nx-lpage-re"  # comm is cut at 15 characters


def _kernel_workers(pid: int) -> int:
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            n += Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == KVM_WORKER
    return n


def _tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _create(client: BusClient, name: str, vcpus: int, memory: int) -> Message:
    return client.call("org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM", "suta{sv}",
                       [name, vcpus, memory, options(policy="local-first", start=True, passes=1)])


def _fill_until_refused(d: DaemonProcess, vcpus: int, memory: int, expected: str,
                        most: int = 200) -> tuple[list[str], Message]:
    """Create VMs until one is refused; check the refusal and what it left; return (made, refusal)."""
    client = BusClient(d.address)
    made: list[str] = []
    try:
        tasks_before: dict[str, int] = {}
        for i in range(most):
            before = _held(d.pid)
            tasks_before[f"x{i}"] = _tasks(d.pid)
            reply = _create(client, f"x{i}", vcpus, memory)
            if reply.error_name is None:
                made.append(f"x{i}")
                continue
            assert reply.error_name == ERR + expected, (reply.error_name, reply.body)
            assert _held(d.pid) == before  # the refused VM left nothing behind
            # nor a KVM worker: at most one per VM made (they end after their VM fd closes)
            wait_until(lambda: _kernel_workers(d.pid) <= len(made), "no KVM worker of the refused VM")
            listed = [name for name, _s, _p in client.manager("ListVMs")[0]]
            assert listed == made  # and the daemon still answers
            # room again: one VM fewer, and the same VM is made
            gone = made.pop()
            client.manager("DestroyVM", "s", gone)
            # its threads end after the reply (KVM's worker once the VM fd is closed)
            room = tasks_before[gone]
            wait_until(lambda: _tasks(d.pid) <= room, f"the tasks of {gone} ended")  # noqa: B023 (called here)
            assert _create(client, f"x{i}", vcpus, memory).error_name is None
            made.append(f"x{i}")
            for name in made:
                client.manager("DestroyVM", "s", name)
            return made, reply
        raise AssertionError(f"{most} VMs made and no refusal")
    finally:
        client.close()


def test_the_fd_limit_ends_in_resource_exhausted(daemon: DaemonProcess) -> None:
    open_now = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    limit = open_now + 48  # a VM of 2 vCPUs holds 6: room for 7 or 8
    subprocess.run(["prlimit", f"--pid={daemon.pid}", f"--nofile={limit}:{limit}"], check=True)
    made, refusal = _fill_until_refused(daemon, 2, 0, "ResourceExhausted")
    assert 3 <= len(made) <= 9, made
    assert "Too many open files" in refusal.body[0], refusal.body


@contextlib.contextmanager
def _cgroup_around(controller: str, pid: int, limits: dict[str, str]) -> Iterator[Path]:
    """A v1 cgroup of ``controller`` below ``pid``'s, with ``limits``; ``pid`` moved in and back."""
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if controller in x.split(":")[1].split(","))
    parent = CGROUPS / controller / line.split(":", 2)[2].lstrip("/")
    if not parent.is_dir():
        pytest.skip(f"no v1 {controller} cgroup hierarchy at {CGROUPS / controller}")
    group = parent / f"kvmnumad-exhaustion-{os.getpid()}"
    group.mkdir()
    try:
        for name, value in limits.items():
            (group / name).write_text(value)
        (group / "cgroup.procs").write_text(str(pid))
        try:
            yield group
        finally:
            (parent / "cgroup.procs").write_text(str(pid))
    finally:
        group.rmdir()


def test_a_task_limit_ends_in_resource_exhausted(daemon: DaemonProcess) -> None:
    tasks = len(os.listdir(f"/proc/{daemon.pid}/task"))
    # headroom.RESERVE (16) kept for the daemon; a VM of 2 vCPUs is 3 tasks (KVM's worker too)
    with _cgroup_around("pids", daemon.pid, {"pids.max": str(tasks + 16 + 3 * 3)}):
        made, refusal = _fill_until_refused(daemon, 2, 0, "ResourceExhausted")
    assert 1 <= len(made) <= 4, made
    assert "task limit" in refusal.body[0], refusal.body


def test_a_memory_limit_ends_in_insufficient_memory(daemon: DaemonProcess) -> None:
    # v1 charges what the daemon allocates from now on (no charge moves with it):
    # headroom.MEMORY_RESERVE (64 MiB) and four touched VMs of 48 MiB fit, a fifth not
    limit = 64 * MiB + 4 * 48 * MiB + 24 * MiB
    with _cgroup_around("memory", daemon.pid, {"memory.limit_in_bytes": str(limit)}) as group:
        made, refusal = _fill_until_refused(daemon, 1, 48 * MiB, "InsufficientMemory")
        assert int((group / "memory.failcnt").read_text()) == 0  # the limit itself was never hit
    assert 3 <= len(made) <= 5, made
    assert "memory limit" in refusal.body[0], refusal.body
