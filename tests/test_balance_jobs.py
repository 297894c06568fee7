"""The balancer's memory moves as migration jobs (rebalance.py), on this
one-node host with a real VM on /dev/kvm, a real dbus-daemon and journald.

One node cannot make any rule ask for a move, so the pass is told a
topology and a load instead of the host's (the only stand-in here): the
host's CPUs are "node 1", hogged, and an idle "node 0" has room, so
``node-load`` moves the guest node to host node 0, the real one.  Everything
after the plan is real: the job's move_pages on the VM's memory, its bus
object, the Moved and JobRemoved signals (a dbus-fast client), the journal
(journalctl -o json), the decisions (GetDecisions).  A job moves little
here (the pages are on node 0 already), so it is made long with a chunk of
one page: each chunk is a pool task of its own.  The moves themselves on a
real multi-node kernel are tests/numa/test_numa_balance.py.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import pytest
from dbus_fast import Variant

from kvmnumad.journal import setup_logging
from kvmnumad.manager import Manager
from kvmnumad.numa.topology import HostTopology, synthetic
from kvmnumad.optimizer import balance
from kvmnumad.optimizer.model import HostNodeSample
from tests.busfixtures import (
    MANAGER_IFACE,
    MANAGER_PATH,
    VM_IFACE,
    BusClient,
    MiB,
    RunningService,
    busctl,
    options,
)
from tests.observe import node_cpus, taskset_affinity
from tests.sysfixtures import Journal

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]
BUS, JOB_IFACE = "org.kvmnuma1", "org.kvmnuma1.Job"
# The told host: this machine's CPUs (0-1) are node 1; node 0's CPUs exist only here.
TOLD = synthetic({0: [2, 3], 1: [0, 1]})
MEMORY = 128 * MiB  # 32768 one-page chunks: a job of a second or more


DEFAULTS = balance.Thresholds()


def told_plan(vms: Sequence[balance.VmFacts], load: balance.Load, topo: HostTopology, *, now: float,
              last_moved: Mapping[tuple[str, int], float], thresholds: balance.Thresholds = DEFAULTS,
              moving: Collection[tuple[str, int]] = frozenset()) -> list[balance.Move]:
    """balance.plan itself (its dwell and in-flight guards are the ones under
    test) on the told topology, with node 1 hogged and the vCPUs measured idle."""
    nodes = {0: HostNodeSample(0, frozenset({2, 3}), 0.05, 1 << 34, 0, 0, {}),
             1: HostNodeSample(1, frozenset({0, 1}), 0.97, 1 << 34, 0, 0, {})}
    idle = {v.tid: 0.0 for f in vms for v in f.sample.vcpus}
    return balance.plan(vms, balance.Load(nodes, idle, idle, 1.0), TOLD, now=now, last_moved=last_moved,
                        thresholds=thresholds, moving=moving)


@pytest.fixture
def logged(journald: Journal, restore_logging: None) -> Journal:
    assert setup_logging("info") == "journal"
    return journald


@pytest.fixture
def told(manager: Manager) -> Manager:
    manager.balancer.planner = told_plan
    manager.migration_chunk_pages = 1
    return manager


def create(client: BusClient, name: str, memory: int = MEMORY) -> str:
    (path,) = client.manager("CreateVM", "suta{sv}", name, 2, memory,
                             options(numa_nodes=1, policy="load-balanced", prealloc=True, start=True))
    assert client.get(path, VM_IFACE, "AutoBalance") is True
    return str(path)


def rebalance(address: str, method: str = "Rebalance") -> list[list[Any]]:
    moves: list[list[Any]] = busctl(address, "call", BUS, MANAGER_PATH, MANAGER_IFACE, method)["data"][0]
    return moves


def jobs(address: str) -> list[list[Any]]:
    rows: list[list[Any]] = busctl(address, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "ListJobs")["data"][0]
    return rows


def job_prop(address: str, path: str, name: str) -> Any:
    return busctl(address, "get-property", BUS, path, JOB_IFACE, name)["data"]


def entries(journal: Journal, vm: str, wait_for: int = 0, *matches: str) -> list[dict[str, Any]]:
    return journal.entries("KVMNUMA_EVENT=rebalance", f"KVMNUMA_VM={vm}", *matches, wait_for=wait_for)


@pytest.fixture
def vm_name() -> Iterator[str]:
    yield "bj-" + secrets.token_hex(3)  # its own journal entries, whatever earlier runs logged


def test_a_memory_move_is_a_rebalance_job_the_pass_does_not_wait_for(  # noqa: PLR0917 -- fixtures
        service: RunningService, client: BusClient, told: Manager, logged: Journal, vm_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    a, name = service.address, vm_name
    path = create(client, name)
    caplog.set_level(logging.DEBUG, logger="kvmnumad")
    started = time.monotonic()
    moves = rebalance(a)
    took = time.monotonic() - started
    assert [(m[0], m[1], m[2], m[3], m[4], m[5] > 0.8) for m in moves] == [
        (name, "memory", 0, 0, 0, True), (name, "vcpus", 0, 1, 0, True)]
    assert "node-load" in moves[0][6]
    # The reply came with the job running: it is on the bus, the balancer's.
    ((job_id, job, vm, guest_node, host_node, state),) = jobs(a)
    assert (vm, guest_node, host_node, state) == (path, 0, 0, "running")
    assert job_prop(a, job, "Origin") == "rebalance" and job_prop(a, job, "Starter") == 0
    moved = client.wait_signal(lambda m: m.member == "Moved" and m.body[0] == name)
    assert (moved.body[1], moved.body[7]) == ("memory", job)
    (memory,) = entries(logged, name, 1)
    assert memory["KVMNUMA_JOB"] == str(job_id) and memory["KVMNUMA_RULE"] == "node-load"
    assert f"migration job {job_id}" in memory["MESSAGE"]
    # In flight: planned by nobody, no second job, no Busy; its vCPUs wait for it.
    assert rebalance(a, "PlanRebalance") == [] and rebalance(a) == []
    assert [row[0] for row in jobs(a)] == [job_id]
    assert [e for e in entries(logged, name) if "KVMNUMA_VCPU" in e] == []
    removed = client.wait_signal(lambda m: m.member == "JobRemoved" and m.body[0] == job_id, timeout=120)
    ended = time.monotonic()
    print(f"Rebalance replied in {took * 1000:.0f} ms; the job ran {ended - started:.1f} s")
    assert removed.body[3] == "done"
    assert took < (ended - started) / 2  # the pass did not wait for the job
    # Done: the vCPUs followed (none had moved while it ran), each signalled with no job.
    vcpus = [e for e in entries(logged, name, 3) if "KVMNUMA_VCPU" in e]
    assert sorted(e["KVMNUMA_VCPU"] for e in vcpus) == ["0", "1"]
    signalled = client.wait_signal(lambda m: m.member == "Moved" and m.body[1] == "vcpus")
    assert signalled.body[7] == "/"
    decisions = {row[0]: row for row in client.vm(path, "GetDecisions")[0]}
    assert decisions["guest node 0"][1:3] == ["rebalance", "node-load"]
    assert "a migration job moved it" in decisions["guest node 0"][4]
    assert decisions["vcpu 0"][1:3] == ["rebalance", "node-load"]
    # Within the dwell (60 s) from its end: nothing more.
    assert rebalance(a) == []
    assert not [r for r in caplog.records if "Busy" in r.getMessage() or "being moved" in r.getMessage()]


def test_dwell_counts_from_the_jobs_end(service: RunningService, client: BusClient, told: Manager,
                                        vm_name: str) -> None:
    """A dwell shorter than the job: counted from its start, the pass right
    after the end would move the guest node again; from the end it waits."""
    a, name = service.address, vm_name
    create(client, name, 4 * MEMORY)  # a job of 3-5 s
    told.balancer.thresholds = dataclasses.replace(told.balancer.thresholds, dwell_s=1.5)
    started = time.monotonic()
    assert [m[1] for m in rebalance(a)] == ["memory", "vcpus"]
    ((job_id, *_),) = jobs(a)
    client.wait_signal(lambda m: m.member == "JobRemoved" and m.body[0] == job_id, timeout=120)
    ended = time.monotonic()
    print(f"the job ran {ended - started:.1f} s")
    assert ended - started > 3.0, "too short to tell its start from its end"
    assert rebalance(a) == []
    assert time.monotonic() - ended < 1.5  # that pass came within the dwell from the end
    time.sleep(1.6)
    assert [m[1] for m in rebalance(a)] == ["memory", "vcpus"]  # the dwell is over: free to move again


def test_a_cancelled_job_is_logged_and_explained_and_its_vcpus_stay(
        service: RunningService, client: BusClient, told: Manager, logged: Journal, vm_name: str) -> None:
    a, name = service.address, vm_name
    path = create(client, name)
    rebalance(a)
    ((job_id, job, *_),) = jobs(a)
    busctl(a, "call", BUS, job, JOB_IFACE, "Cancel")
    removed = client.wait_signal(lambda m: m.member == "JobRemoved" and m.body[0] == job_id, timeout=60)
    assert removed.body[3] == "cancelled"
    (entry,) = entries(logged, name, 1, "KVMNUMA_REASON=job-cancelled")
    assert entry["KVMNUMA_JOB"] == str(job_id) and entry["KVMNUMA_RULE"] == "node-load"
    assert "cancelled after" in entry["MESSAGE"] and "vCPUs stay" in entry["MESSAGE"]
    assert [e for e in entries(logged, name) if "KVMNUMA_VCPU" in e] == []
    decisions = {row[0]: row for row in client.vm(path, "GetDecisions")[0]}
    assert decisions["guest node 0"][1:3] == ["rebalance", "node-load"]
    assert f"migration job {job_id} " in decisions["guest node 0"][4]
    assert "cancelled after" in decisions["guest node 0"][4]
    assert decisions["vcpu 0"][1] != "rebalance"
    assert rebalance(a) == []  # a dwell from its end: not tried again at once


def test_a_callers_job_on_the_guest_node_is_left_alone(
        service: RunningService, client: BusClient, told: Manager, vm_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    a, name = service.address, vm_name
    path = create(client, name)
    caplog.set_level(logging.DEBUG, logger="kvmnumad")
    (job,) = client.vm(path, "MigrateNumaNode", "uu", 0, 0)
    assert job_prop(a, job, "Origin") == "caller"
    assert rebalance(a, "PlanRebalance") == [] and rebalance(a) == []
    assert [row[1] for row in jobs(a)] == [job]
    busctl(a, "call", BUS, job, JOB_IFACE, "Cancel")
    client.wait_signal(lambda m: m.member == "JobRemoved" and m.body[1] == job, timeout=60)
    assert rebalance(a) == []  # the caller's cancel holds it for a dwell too
    assert not [r for r in caplog.records if "Busy" in r.getMessage() or "being moved" in r.getMessage()]


def test_an_adopted_vm_is_balanced_as_one_of_ours(
        service: RunningService, client: BusClient, told: Manager, logged: Journal, vm_name: str) -> None:
    """Another process's guest (tests/vmm_threads.py: a real KVM VM fd, a
    memfd, threads named as cloud-hypervisor names its vCPUs): the same
    pass moves its guest node as a job on the VMM's pages, and its vCPU
    threads follow when the job is done, seen by taskset on the VMM's threads."""
    a, name = service.address, vm_name
    with subprocess.Popen([sys.executable, "-m", "tests.vmm_threads", "cloud-hypervisor", "2",
                           str(MEMORY // MiB)],
                          stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout is not None and p.stdout.readline().startswith("ready")
            (path,) = client.manager("AdoptProcess", "ua{sv}", p.pid,
                                     {"name": Variant("s", name), "policy": Variant("s", "load-balanced")})
            assert client.get(path, VM_IFACE, "AutoBalance") is True
            tids = [tid for _i, tid in client.get(path, VM_IFACE, "VcpuThreads")]
            # The VMM narrowed its threads itself: on CPU 1 of the told "node 1", the hogged one.
            for tid in tids:
                subprocess.run(["taskset", "-pc", "1", str(tid)], check=True, capture_output=True)
            moves = rebalance(a)
            assert [(m[0], m[1], m[2], m[3], m[4]) for m in moves] == [
                (name, "memory", 0, 0, 0), (name, "vcpus", 0, 1, 0)]
            ((job_id, job, vm, *_),) = jobs(a)
            assert vm == path and job_prop(a, job, "Origin") == "rebalance"
            removed = client.wait_signal(lambda m: m.member == "JobRemoved" and m.body[0] == job_id,
                                         timeout=120)
            assert removed.body[3] == "done"
            vcpus = [e for e in entries(logged, name, 3) if "KVMNUMA_VCPU" in e]
            assert sorted(e["KVMNUMA_VCPU"] for e in vcpus) == ["0", "1"]
            assert [taskset_affinity(t) for t in tids] == [node_cpus(0)] * 2
            decisions = {row[0]: row for row in client.vm(path, "GetDecisions")[0]}
            assert decisions["guest node 0"][1:3] == ["rebalance", "node-load"]
            assert rebalance(a) == []  # the dwell
            # A caller's pin is explicit here too: handed back only by ClearExplicitPlacement.
            client.vm(path, "SetVcpuAffinity", "uau", 0, [1])
            told.balancer.thresholds = dataclasses.replace(told.balancer.thresholds, dwell_s=0)
            assert [m[1] for m in rebalance(a, "PlanRebalance")] == ["memory"]  # memory to the pin
            client.vm(path, "ClearExplicitPlacement", "auau", [0], [])
            assert [m[1] for m in rebalance(a, "PlanRebalance")] == ["memory", "vcpus"]
        finally:
            p.kill()
