"""Memory migration jobs on the bus (issue 14 item 6), on the one-node host.

The host has one NUMA node, so every job here moves to node 0, where the
pages are already: real (the policy is set, every chunk is a move_pages
query on the live region) but with nothing to move.  To see a job while it
runs, the manager's chunk is one page, so a 1 GiB node takes 262,144
chunks (counted one per pool task), about 8 s on this machine; what moves between nodes is
tests/numa/test_numa_jobs.py's subject, in the 2- and 4-node guests.

Everything is read from outside: busctl (--json=short, so every reply must
render), gdbus for error names, a dbus-fast client for the signals, the
journal for the end of the job.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from kvmnumad import errors
from kvmnumad.bus.service import BUS_NAME
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from kvmnumad.quotas import MAX_JOBS
from tests.busfixtures import (
    MANAGER_IFACE,
    MANAGER_PATH,
    VM_IFACE,
    BusClient,
    MiB,
    RunningService,
    busctl,
    options,
    run_service,
)
from tests.test_bus_contract import JOB_CONSTANT, JOB_IFACE, canon, interface_of, shipped
from tests.waiting import wait_until

if TYPE_CHECKING:
    from dbus_fast import Message

    from tests.sysfixtures import Polkitd, SystemBus, User

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]

E = "org.kvmnuma1.Error."
DENIED = "org.freedesktop.DBus.Error.AccessDenied"
UNKNOWN = "org.freedesktop.DBus.Error.UnknownObject"


@pytest.fixture
def slow(manager: Manager) -> Manager:
    manager.migration_chunk_pages = 1  # one page per chunk: a 1 GiB job runs for seconds
    return manager


def _vm(client: BusClient, name: str, nodes: int = 1, size: int = 1024 * MiB) -> str:
    (path,) = client.manager("CreateVM", "suta{sv}", name, nodes, size,
                             options(numa_nodes=nodes, prealloc=True, start=True))
    return str(path)


def _job_signals(client: BusClient, member: str, job: str) -> list[Message]:
    return [m for m in client.signals if m.member == member and m.path == MANAGER_PATH and m.body[1] == job]


def _exists(address: str, path: str) -> bool:
    out = busctl(address, "get-property", BUS_NAME, path, JOB_IFACE, "State", check=False)
    return bool(out.returncode == 0)


def test_a_job_appears_runs_and_is_cancelled(service: RunningService, client: BusClient,
                                             slow: Manager) -> None:
    a = service.address
    path = _vm(client, "mover")
    (job,) = busctl(a, "call", BUS_NAME, path, VM_IFACE, "MigrateNumaNode", "uu", "0", "0")["data"]
    assert re.fullmatch(r"/org/kvmnuma1/job/\d+", job), job
    job_id = int(job.rsplit("/", 1)[1])
    # exported before the reply, announced the way systemd announces its jobs
    # (sent before busctl's reply; this other client may get it a little later)
    new = client.wait_signal(lambda m: m.member == "JobNew" and m.body[1] == job)
    assert new.body == [job_id, job, path] and _job_signals(client, "JobNew", job) == [new]
    added = [m for m in client.signals if m.member == "InterfacesAdded" and m.body[0] == job]
    assert len(added) == 1 and added[0].path == MANAGER_PATH
    assert busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListJobs")["data"] == [
        [[job_id, job, path, 0, 0, "running"]]]
    props = {k: v["data"] for k, v in busctl(a, "call", BUS_NAME, job, "org.freedesktop.DBus.Properties",
                                               "GetAll", "s", JOB_IFACE)["data"][0].items()}
    assert props["VM"] == path and props["VMName"] == "mover" and props["State"] == "running"
    assert (props["GuestNode"], props["Slot"], props["HostNode"], props["Starter"]) == (0, 0, 0, 0)
    assert props["PagesMoved"] == 0 and props["FailedPages"] == []  # all on node 0 already: nothing to move
    managed = busctl(a, "call", BUS_NAME, MANAGER_PATH, "org.freedesktop.DBus.ObjectManager",
                     "GetManagedObjects")["data"][0]
    assert JOB_IFACE in managed[job]

    # the live introspection is the shipped XML (busctl and gdbus), const where it says
    raw = busctl(a, "introspect", "--xml-interface", BUS_NAME, job, json_=False).stdout
    assert canon(interface_of(raw, JOB_IFACE)) == canon(shipped(JOB_IFACE))
    out = busctl(a, "introspect", BUS_NAME, job, JOB_IFACE, json_=False).stdout
    flags = {ln.split()[0][1:]: ln.split()[-1] for ln in out.splitlines() if " property " in ln}
    assert {n for n, f in flags.items() if f == "const"} == JOB_CONSTANT, out

    # a second job on the same guest node, and MapNumaNode of it, are Busy
    name, text = client.error(BUS_NAME, path, VM_IFACE, "MigrateNumaNode", "uu", [0, 0])
    assert name == E + "Busy" and f"job {job_id}" in text, text
    name, _ = client.error(BUS_NAME, path, VM_IFACE, "MigrateNumaSlot", "uuu", [0, 1, 0])
    assert name == E + "Busy"

    busctl(a, "call", BUS_NAME, job, JOB_IFACE, "Cancel")
    removed = client.wait_signal(lambda m: m.member == "JobRemoved" and m.body[1] == job, timeout=30)
    assert removed.body == [job_id, job, path, "cancelled"]
    client.wait_signal(lambda m: m.member == "InterfacesRemoved" and m.body[0] == job)
    assert not _exists(a, job)
    assert busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListJobs")["data"] == [[]]
    # the VM runs on, and its node can be moved again
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "State")["data"] == "running"
    name, _ = client.error(BUS_NAME, job, JOB_IFACE, "Cancel")
    assert name == UNKNOWN


def test_a_job_ends_done_and_its_last_state_is_published(service: RunningService, client: BusClient,
                                                        manager: Manager) -> None:
    a = service.address
    path = _vm(client, "quick", size=16 * MiB)
    (job,) = busctl(a, "call", BUS_NAME, path, VM_IFACE, "MigrateNumaSlot", "uuu", "0", "1", "0")["data"]
    removed = client.wait_signal(lambda m: m.member == "JobRemoved" and m.body[1] == job, timeout=30)
    assert removed.body[3] == "done"
    states = [m.body[1]["State"].value for m in client.signals if m.member == "PropertiesChanged"
              and m.path == job and "State" in m.body[1]]
    assert states[-1:] == ["done"]
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "NodeMap")["data"] == [0]
    decisions = busctl(a, "call", BUS_NAME, path, VM_IFACE, "GetDecisions")["data"][0]
    assert any(d[0] == "guest node 0" and d[2] == "caller-migrate" for d in decisions), decisions


def test_bad_requests_get_typed_errors_and_change_nothing(service: RunningService, client: BusClient) -> None:
    path = _vm(client, "typed", nodes=2, size=4 * MiB)
    (plain,) = client.manager("CreateVM", "suta{sv}", "flat", 1, 2 * MiB, options())
    (empty,) = client.manager("CreateVM", "suta{sv}", "empty", 1, 0, options(numa_nodes=1))
    cases = [
        (path, "MigrateNumaNode", "uu", [2, 0], "NodeOutOfRange", "guest node 2"),
        (path, "MigrateNumaNode", "uu", [0, 7], "NodeOutOfRange", "host node 7"),
        (path, "MigrateNumaSlot", "uuu", [0, 2, 0], "InvalidArgument", "slot 2"),  # slot 2 is node 1's
        (path, "MigrateNumaSlot", "uuu", [0, 99, 0], "InvalidArgument", "slot 99"),
        (empty, "MigrateNumaNode", "uu", [0, 0], "InvalidArgument", "no memory"),
        (plain, "MigrateNumaNode", "uu", [0, 0], "NumaDisabled", "disabled"),
    ]
    before = busctl(service.address, "get-property", BUS_NAME, path, VM_IFACE, "MemoryRegions")["data"]
    for obj, member, sig, args, error, text in cases:
        name, message = client.error(BUS_NAME, obj, VM_IFACE, member, sig, args)
        assert (name, text in message) == (E + error, True), (member, args, name, message)
        assert "Traceback" not in message
    assert client.manager("ListJobs") == [[]]
    assert not [m for m in client.signals if m.member in ("JobNew", "JobRemoved")]
    after = busctl(service.address, "get-property", BUS_NAME, path, VM_IFACE, "MemoryRegions")["data"]
    assert after == before


def test_destroying_the_vm_cancels_its_job_first(service: RunningService, client: BusClient,
                                                 slow: Manager) -> None:
    a = service.address
    path = _vm(client, "doomed")
    (job,) = busctl(a, "call", BUS_NAME, path, VM_IFACE, "MigrateNumaNode", "uu", "0", "0")["data"]
    busctl(a, "call", BUS_NAME, path, VM_IFACE, "Destroy")
    # Cancelled, not failed: it stopped between two chunks before the VM's memory was
    # released (a chunk on released memory would have failed it).  Both are gone by the reply.
    client.wait_signal(lambda m: m.member == "InterfacesRemoved" and m.body[0] == path)
    client.wait_signal(lambda m: m.member == "InterfacesRemoved" and m.body[0] == job)
    removed = [(m.member, m.body[0] if m.member == "InterfacesRemoved" else m.body[1]) for m in client.signals
               if m.member in ("JobRemoved", "InterfacesRemoved")]
    assert sorted(removed) == [("InterfacesRemoved", job), ("InterfacesRemoved", path), ("JobRemoved", job)]
    assert _job_signals(client, "JobRemoved", job)[0].body[3] == "cancelled"
    assert busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs")["data"] == [[]]


def test_jobs_are_bounded_in_total(manager: Manager) -> None:
    """The 17th job at once is refused (LimitReached), before it changes anything."""
    manager.migration_chunk_pages = 1
    manager.create_vm("many", 1, (MAX_JOBS + 1) * 64 * MiB,
                      CreateOptions(numa_nodes=MAX_JOBS + 1, policy=Policy.MANUAL))
    jobs = [manager.start_migration("many", g, 0) for g in range(MAX_JOBS)]
    try:
        with pytest.raises(errors.LimitReached, match=f"{MAX_JOBS} migration jobs running"):
            manager.start_migration("many", MAX_JOBS, 0)
        assert len(manager.jobs) == MAX_JOBS
    finally:
        for j in jobs:
            j.cancel()
        for j in jobs:
            assert j.wait(30).state in ("cancelled", "done")
    assert manager.jobs == []


# ---------------------------------------------------- authorization (polkitd)
@pytest.fixture
def system_service(system_bus: SystemBus, polkitd: Polkitd, manager: Manager) -> Iterator[RunningService]:
    manager.migration_chunk_pages = 1
    with run_service(system_bus.address, manager, polkit=True) as running:
        yield running


def test_only_the_starter_or_an_admin_moves_memory_and_cancels(
    system_service: RunningService, polkitd: Polkitd, unpriv_user: User
) -> None:
    """Through the real polkitd: a user who neither owns the VM nor is granted
    org.kvmnuma1.migrate-memory can start no job and cancel none of root's;
    nothing changes.  The owner of a VM moves its memory without polkit."""
    a, u = system_service.address, unpriv_user
    path = busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "CreateVM", "suta{sv}", "roots", "1",
                  str(1024 * MiB), "2", "numa_nodes", "u", "1", "prealloc", "b", "true")["data"][0]
    out = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", path,
                "--method", f"{VM_IFACE}.MigrateNumaNode", "0", "0")
    assert out.returncode != 0 and f"GDBus.Error:{DENIED}" in out.stderr, out.stderr
    assert busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListJobs")["data"] == [[]]

    (job,) = busctl(a, "call", BUS_NAME, path, VM_IFACE, "MigrateNumaNode", "uu", "0", "0")["data"]
    out = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", job,
                "--method", f"{JOB_IFACE}.Cancel")
    assert out.returncode != 0 and f"GDBus.Error:{DENIED}" in out.stderr, out.stderr
    assert busctl(a, "get-property", BUS_NAME, job, JOB_IFACE, "State")["data"] == "running"
    busctl(a, "call", BUS_NAME, job, JOB_IFACE, "Cancel")  # root may
    wait_until(lambda: not _exists(a, job), "the cancelled job's object to go", timeout=30)

    # the owner's own VM: MigrateNumaNode and Cancel pass the owner rule (the starter's job)
    def created() -> bool:  # creating needs polkit's yes for org.kvmnuma1.manage
        r = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                  "--method", f"{MANAGER_IFACE}.CreateVM", "theirs", "1", str(1024 * MiB),
                  "{'numa_nodes': <uint32 1>, 'prealloc': <true>}")
        return r.returncode == 0 or "AlreadyExists" in r.stderr

    with polkitd.grant(u.group, "org.kvmnuma1.manage", probe=created):
        pass
    theirs = "/org/kvmnuma1/vm/theirs"
    out = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", theirs,
                "--method", f"{VM_IFACE}.MigrateNumaNode", "0", "0")
    assert out.returncode == 0, out.stderr
    mine = re.search(r"'(/org/kvmnuma1/job/\d+)'", out.stdout)
    assert mine, out.stdout
    assert busctl(a, "get-property", BUS_NAME, mine.group(1), JOB_IFACE, "Starter")["data"] == u.uid
    out = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", mine.group(1),
                "--method", f"{JOB_IFACE}.Cancel")
    assert out.returncode == 0, out.stderr
    wait_until(lambda: not _exists(a, mine.group(1)), "the user's cancelled job to go", timeout=30)
