"""Issue 15 in a multi-node guest: a real QEMU on the guest's nested /dev/kvm,
with two guest NUMA nodes on memory-backend-memfd backends and a QMP
socket, adopted by the daemon (a process of its own on a private bus).

The observers are the guest kernel's: QEMU's /proc/PID/numa_maps (each
backend's line is told apart by its own bind policy, host-nodes=0 for m0,
host-nodes=1 for m1, as QEMU set it), taskset on QEMU's "CPU n/KVM"
threads, and busctl.  The guest runs (QMP cont) while its memory moves.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.busfixtures import busctl
from tests.numa.conftest import Daemon
from tests.numa.test_numa_hotplug import _nearest_online
from tests.numa_guest.hotplug import CpuHotplug
from tests.observe import node_cpus, taskset_affinity
from tests.waiting import wait_until

pytestmark = pytest.mark.numa

ROOT = Path(__file__).resolve().parents[2]
MANAGER = ("org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager")
VM_IFACE = "org.kvmnuma1.VM"
MiB = 1 << 20
BACKEND = 64  # MiB per guest node: small, TCG is slow


@pytest.fixture
def daemon(balancing_daemon: Daemon) -> str:
    """conftest's balancing daemon (BALANCE_PERIOD, BALANCE_DWELL), shared with test_numa_balance.py."""
    return balancing_daemon.address


def qmp(sock: Path, command: str) -> Any:
    """One QMP command, as any QMP client sends it (the test's own, not the daemon's)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(sock))
        f = s.makefile("rw")
        json.loads(f.readline())
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
        return reply["return"]


def vcpu_tids(pid: int) -> dict[int, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        if comm.startswith("CPU ") and comm.endswith("/KVM"):
            out[int(comm[4:-4])] = int(tid)
    return out


def backend_pages(pid: int, host_node_policy: str) -> dict[int, int]:
    """Pages per node of the memfd backend whose numa_maps policy is ``host_node_policy`` (bind:0 ...)."""
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        fields = line.split()
        if fields[1] == host_node_policy and "memory-backend-memfd" in line:
            return {int(f[1:].split("=")[0]): int(f.split("=")[1]) for f in fields
                    if f.startswith("N") and "=" in f}
    raise AssertionError(f"no memfd backend with policy {host_node_policy} in numa_maps of {pid}")


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "qmp.sock"
    backends = [f"memory-backend-memfd,id=m{n},size={BACKEND}M,prealloc=on,host-nodes={n},policy=bind"
                for n in (0, 1)]
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-smp", "4", "-m", f"{2 * BACKEND}",
            "-name", "adopted,debug-threads=on", "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{sock},server=on,wait=off",
            "-object", backends[0], "-object", backends[1],
            "-numa", "node,nodeid=0,cpus=0-1,memdev=m0", "-numa", "node,nodeid=1,cpus=2-3,memdev=m1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is not None or (sock.exists() and len(vcpu_tids(proc.pid)) == 4),
                   "QEMU's QMP socket and 4 vCPU threads", timeout=120)
        assert proc.poll() is None, f"QEMU exited with {proc.returncode}"
        yield proc, sock
    finally:
        proc.kill()
        proc.wait(30)


def test_adopted_qemu_layout_migration_and_hotplug(daemon: str, guest: tuple[subprocess.Popen[bytes], Path],
                                                   cpu_offline: CpuHotplug) -> None:
    q, sock = guest
    tids = vcpu_tids(q.pid)
    out = busctl(daemon, "call", *MANAGER, "AdoptProcess", "ua{sv}", str(q.pid), "1", "qmp", "s", str(sock))
    path = out["data"][0]
    props = busctl(daemon, "call", "org.kvmnuma1", path, "org.freedesktop.DBus.Properties", "GetAll", "s",
                   VM_IFACE)["data"][0]
    value = {k: v["data"] for k, v in props.items()}
    # the guest-node map comes from QMP: vCPUs 0-1 on guest node 0, 2-3 on 1, each backend where QEMU bound it
    assert value["Adopted"] is True and value["Vmm"] == "qemu" and value["NumaNodes"] == 2
    assert [n for _v, _b, n in value["VcpuNodes"]] == [0, 0, 1, 1]
    assert value["NodeMap"] == [0, 1]
    assert sorted((r[3], r[4]) for r in value["MemoryRegions"]) == [(0, 0), (1, 1)]
    assert sorted(map(tuple, value["VcpuThreads"])) == sorted(tids.items())
    before = backend_pages(q.pid, "bind:0")
    assert before.get(0, 0) >= BACKEND * MiB // 4096 * 0.99, before

    # the guest runs (its vCPUs in KVM_RUN on the firmware) while its node 0 moves to host node 1
    qmp(sock, "cont")
    assert qmp(sock, "query-status")["status"] == "running"
    t0 = time.monotonic()
    busctl(daemon, "call", "org.kvmnuma1", path, VM_IFACE, "MapNumaNode", "uu", "0", "1")
    took = time.monotonic() - t0
    after = backend_pages(q.pid, "bind:0")
    share = after.get(1, 0) / max(sum(after.values()), 1)
    print(f"adopted QEMU guest node 0: {before} -> {after} ({share:.1%} on N1) in {took:.2f} s")
    assert share >= 0.99, after
    assert qmp(sock, "query-status")["status"] == "running" and q.poll() is None
    assert busctl(daemon, "get-property", "org.kvmnuma1", path, VM_IFACE, "NodeMap")["data"] == [1, 1]

    # hotplug: the CPU a vCPU thread is pinned to goes offline, the thread is re-pinned; it comes back
    last = max(n for n in range(8) if os.path.exists(f"/sys/devices/system/node/node{n}") and node_cpus(n))
    victim = max(node_cpus(last))
    busctl(daemon, "call", "org.kvmnuma1", path, VM_IFACE, "SetVcpuAffinity", "uau", "1", "1", str(victim))
    assert taskset_affinity(tids[1]) == {victim}
    cpu_offline.offline(victim)
    expected = _nearest_online(last)
    wait_until(lambda: taskset_affinity(tids[1]) == expected, f"CPU 1/KVM re-pinned to {sorted(expected)}",
               timeout=60)
    cpu_offline.online(victim)
    wait_until(lambda: taskset_affinity(tids[1]) == {victim}, f"CPU 1/KVM back on CPU {victim}", timeout=60)

    # QEMU goes: so does its object
    q.kill()
    wait_until(lambda: busctl(daemon, "call", *MANAGER, "ListVMs")["data"] == [[]], "the adopted VM gone",
               timeout=30)


def together(pid: int, policy: str, tids: list[int]) -> bool:
    """These vCPU threads may run on one host node only, which holds >= 99 % of the backend's pages."""
    pages = backend_pages(pid, policy)
    total = sum(pages.values())
    for node, n in pages.items():
        cpus = node_cpus(node)
        if cpus and n >= 0.99 * total and all(taskset_affinity(t) <= cpus for t in tids):
            return True
    return False


# A repair takes 2-9 s in a quiet guest.  With the host beside two stress-ng it failed 3 times in a row
# at 60 s (2026-12-02): node 0 held 21 % of the pages, GetDecisions was still empty (a memory move's
# decision is recorded when its job ends), and the guest kernel reported an RCU stall in a python
# process's move_pages (get_page_from_freelist): page moves under loaded TCG are that slow.
REPAIR_TIMEOUT = 240.0


def wait_together(daemon: str, path: str, pid: int, policy: str, tids: list[int], *, what: str) -> None:
    """wait_until(together), and on a timeout what the kernel and the daemon said (False says nothing)."""
    try:
        wait_until(lambda: together(pid, policy, tids), what, timeout=REPAIR_TIMEOUT, interval=0.2)
    except AssertionError as e:
        decisions = busctl(daemon, "call", "org.kvmnuma1", path, VM_IFACE, "GetDecisions", check=False)
        jobs = busctl(daemon, "call", *MANAGER, "ListJobs", check=False)
        affinity = [sorted(taskset_affinity(t)) for t in tids]
        raise AssertionError(f"{e}; {policy} pages per host node {backend_pages(pid, policy)}, vCPU affinity "
                             f"{affinity}, GetDecisions {(decisions.stdout or decisions.stderr).strip()}, "
                             f"ListJobs {(jobs.stdout or jobs.stderr).strip()}") from None


def test_an_adopted_qemu_is_balanced(daemon: str, guest: tuple[subprocess.Popen[bytes], Path]) -> None:
    """AutoBalance on an adopted QEMU (local-first's default): memory that
    drifted from a caller's pinned vCPUs comes back to them (a migration job
    on QEMU's pages), and a guest node the policy placed is put together
    again.  Seen in QEMU's numa_maps and by taskset on its "CPU n/KVM" threads."""
    q, sock = guest
    tids = vcpu_tids(q.pid)
    out = busctl(daemon, "call", *MANAGER, "AdoptProcess", "ua{sv}", str(q.pid), "2", "qmp", "s", str(sock),
                 "policy", "s", "local-first")
    path = out["data"][0]
    try:
        assert busctl(daemon, "get-property", "org.kvmnuma1", path, VM_IFACE, "AutoBalance")["data"] is True
        assert [taskset_affinity(tids[i]) for i in range(4)] == [node_cpus(0)] * 2 + [node_cpus(1)] * 2
        # guest node 0's vCPUs pinned by a caller to host node 0: explicit, the memory must come to them
        cpus0 = sorted(node_cpus(0))
        for vcpu in (0, 1):
            busctl(daemon, "call", "org.kvmnuma1", path, VM_IFACE, "SetVcpuAffinity", "uau", str(vcpu),
                   str(len(cpus0)), *map(str, cpus0))
        qmp(sock, "cont")
        # someone moves QEMU's pages from host node 0 to 1 (all of guest node 0's: m0 is bound to node 0)
        subprocess.run(["migratepages", str(q.pid), "0", "1"], check=True, timeout=120)
        drifted = time.monotonic()
        moved = backend_pages(q.pid, "bind:0")
        assert moved.get(1, 0) > moved.get(0, 0), f"migratepages moved nothing: {moved}"
        wait_together(daemon, path, q.pid, "bind:0", [tids[0], tids[1]],
                      what="guest node 0's memory back on host node 0")
        took = time.monotonic() - drifted
        assert [taskset_affinity(tids[i]) for i in (0, 1)] == [set(cpus0)] * 2  # the pins kept
        decisions = {row[0]: row for row in busctl(daemon, "call", "org.kvmnuma1", path, VM_IFACE,
                                                   "GetDecisions")["data"][0]}
        assert decisions["guest node 0"][1] == "rebalance", decisions
        # guest node 1 (placed by the policy, not by a caller) drifts to host node 0: put together again
        subprocess.run(["migratepages", str(q.pid), "1", "0"], check=True, timeout=120)
        drifted = time.monotonic()
        wait_together(daemon, path, q.pid, "bind:1", [tids[2], tids[3]],
                      what="guest node 1 together again")
        took1 = time.monotonic() - drifted
        print(f"adopted QEMU repaired by the balancer: guest node 0 {took:.1f} s, guest node 1 {took1:.1f} s;"
              " "
              f"m0 {backend_pages(q.pid, 'bind:0')}, m1 {backend_pages(q.pid, 'bind:1')}, decisions "
              f"{[(k, v[1], v[2]) for k, v in decisions.items()]}")
        assert qmp(sock, "query-status")["status"] == "running" and q.poll() is None
    finally:
        busctl(daemon, "call", *MANAGER, "ReleaseVM", "s", "adopted", check=False)
