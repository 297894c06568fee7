"""Who may call what: two real callers of different uids (root through
dbus-fast, an unprivileged user created for the session through gdbus and
busctl under runuser) against the real service on a real dbus-daemon.

The polkit side is played by ``TableChecker``, a stand-in for polkitd that
answers from a table and records each question: what is tested here is what
the bus layer asks and when (the real PolkitChecker against a real polkitd is
test_system_policy's subject, and test_bus_polkit's end to end).
"""

from __future__ import annotations

import asyncio
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from dbus_fast.aio import MessageBus

from kvmnumad.bus.auth import (
    ACTION_ADOPT,
    ACTION_MANAGE,
    ACTION_MIGRATE,
    ACTION_PLACE,
    BusAuthorizer,
    PolkitChecker,
)
from kvmnumad.bus.service import BUS_NAME
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
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.sysfixtures import User

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]  # bus_daemon, service, client; unpriv_user

DENIED = "org.freedesktop.DBus.Error.AccessDenied"


@dataclass
class TableChecker:
    """Polkit stand-in: allows the (action, verb) pairs in ``allow``; records
    (uid of the sender as the bus daemon tells it, action, details, interactive)."""

    allow: set[tuple[str, str]] = field(default_factory=set)
    delay: float = 0.0
    bus: MessageBus | None = None
    asked: list[tuple[int, str, dict[str, str], bool]] = field(default_factory=list)

    async def check(
        self, sender: str, action_id: str, details: dict[str, str], interactive: bool
    ) -> bool:
        assert self.bus is not None
        uid = await BusAuthorizer(self.bus).caller_uid(sender)  # the sender is the live caller
        self.asked.append((uid, action_id, dict(details), interactive))
        await asyncio.sleep(self.delay)
        return (action_id, details.get("verb", "")) in self.allow


@pytest.fixture
def service_checker() -> PolkitChecker:
    return TableChecker(allow={(ACTION_MANAGE, "create")})


@pytest.fixture
def checker(service_checker: TableChecker, service: RunningService) -> TableChecker:
    service_checker.bus = service.bus
    return service_checker


def gdbus(user: User, address: str, path: str, method: str, *args: str,
          interactive: bool = False) -> subprocess.CompletedProcess[str]:
    """gdbus prints the error *name* ("GDBus.Error:NAME: text"), busctl only the text."""
    cmd = ["gdbus", "call", "--address", address, "--dest", BUS_NAME, "--object-path", path,
           "--method", method, *(["--interactive"] if interactive else []), *args]
    return user.run(*cmd)


def denied(out: subprocess.CompletedProcess[str]) -> bool:
    return out.returncode != 0 and f"GDBus.Error:{DENIED}" in out.stderr


def test_unprivileged_reads_work_and_writes_are_denied(
    service: RunningService, client: BusClient, checker: TableChecker, unpriv_user: User
) -> None:
    a, u = service.address, unpriv_user
    (path,) = client.manager("CreateVM", "suta{sv}", "rootvm", 1, 2 * MiB, {})
    assert checker.asked == []  # root never reaches polkit

    # reads: anyone
    out = busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs", user=u.name)
    assert out["data"] == [[["rootvm", "created", path]]]
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "Owner", user=u.name)["data"] == 0
    out = busctl(a, "call", BUS_NAME, path, VM_IFACE, "GetVcpuAffinity", "u", "0", user=u.name)
    assert out["type"] == "au"

    # writes on root's VM: asked, denied, nothing changed
    for method, args in (("Start", ()), ("Destroy", ()), ("SetVcpuAffinity", ("0", "[0]"))):
        out = gdbus(u, a, path, f"{VM_IFACE}.{method}", *args)
        assert denied(out), (method, out.stderr)
    out = gdbus(u, a, MANAGER_PATH, f"{MANAGER_IFACE}.DestroyVM", "rootvm")
    assert denied(out), out.stderr
    assert [(uid, action, d["verb"]) for uid, action, d, _ in checker.asked] == [
        (u.uid, ACTION_MANAGE, "start"),
        (u.uid, ACTION_MANAGE, "destroy"),
        (u.uid, ACTION_PLACE, "set-vcpu-affinity"),
        (u.uid, ACTION_MANAGE, "destroy"),
    ]
    assert all(d["vm"] == "rootvm" for _, _, d, _ in checker.asked)
    assert client.get(path, VM_IFACE, "State") == "created"
    assert list_vms(a) == [["rootvm", "created", path]]
    out = busctl(a, "set-property", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "DefaultPolicy", "s", "interleave",
                 user=u.name, check=False)
    assert out.returncode != 0 and "Access denied" in out.stderr  # busctl's text for AccessDenied
    assert checker.asked[-1][1:3] == (ACTION_PLACE, {"verb": "set-default-policy", "policy": "interleave"})
    policy = busctl(a, "get-property", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "DefaultPolicy")["data"]
    assert policy != "interleave"


def test_owner_may_place_and_start_stop_but_not_destroy(
    service: RunningService, client: BusClient, checker: TableChecker, unpriv_user: User
) -> None:
    a, u = service.address, unpriv_user
    out = gdbus(u, a, MANAGER_PATH, f"{MANAGER_IFACE}.CreateVM", "mine", "1", str(2 * MiB), "{}")
    assert out.returncode == 0, out.stderr
    path = "/org/kvmnuma1/vm/mine"
    # polkit sees what a rule needs: the owner to be and the figures asked for
    assert checker.asked == [(u.uid, ACTION_MANAGE, {"vm": "mine", "verb": "create", "owner": str(u.uid),
                                                     "vcpus": "1", "memory_bytes": str(2 * MiB)}, False)]
    assert client.get(path, VM_IFACE, "Owner") == u.uid

    for method, args in (("Start", ()), ("SetVcpuAffinity", ("0", "[0]")), ("Stop", ())):
        out = gdbus(u, a, path, f"{VM_IFACE}.{method}", *args)
        assert out.returncode == 0, (method, out.stderr)
    assert len(checker.asked) == 1  # the owner rule answered, not polkit
    assert client.get(path, VM_IFACE, "State") == "stopped"
    assert client.get(path, VM_IFACE, "DeclaredVcpuAffinity") == [[0, [0]]]

    out = gdbus(u, a, path, f"{VM_IFACE}.Destroy", interactive=True)
    assert denied(out), out.stderr
    assert checker.asked[-1] == (u.uid, ACTION_MANAGE, {"vm": "mine", "verb": "destroy", "owner": str(u.uid),
                                                        "vcpus": "1", "memory_bytes": str(2 * MiB)}, True)
    assert list_vms(a) == [["mine", "stopped", path]]
    client.vm(path, "Destroy")  # root may


def test_map_numa_node_asks_migrate_memory_whatever_the_node_holds(
    service: RunningService, client: BusClient, checker: TableChecker, unpriv_user: User
) -> None:
    """The action is declared on the method, not chosen from state read
    before authorizing: a guest node without memory asks the same action as
    one with memory, and the owner rule covers it for the owner."""
    a, u = service.address, unpriv_user
    (empty,) = client.manager("CreateVM", "suta{sv}", "empty", 1, 0, options(numa_nodes=1))
    (full,) = client.manager("CreateVM", "suta{sv}", "full", 1, 2 * MiB, options(numa_nodes=1))
    for path in (empty, full):
        out = gdbus(u, a, path, f"{VM_IFACE}.MapNumaNode", "0", "0")
        assert denied(out), out.stderr
    assert [(action, d["vm"], d["verb"]) for _, action, d, _ in checker.asked] == [
        (ACTION_MIGRATE, "empty", "map-numa-node"),
        (ACTION_MIGRATE, "full", "map-numa-node"),
    ]

    out = gdbus(u, a, MANAGER_PATH, f"{MANAGER_IFACE}.CreateVM", "mine", "1", str(2 * MiB),
                "{'numa_nodes': <uint32 1>}")
    assert out.returncode == 0, out.stderr
    asked = len(checker.asked)
    out = gdbus(u, a, "/org/kvmnuma1/vm/mine", f"{VM_IFACE}.MapNumaNode", "0", "0")
    assert out.returncode == 0, out.stderr
    assert len(checker.asked) == asked  # the owner rule answered, not polkit


# The contract, member by member: the action and verb a caller who is neither
# root nor the owner is asked about; None: a read, nobody is asked.
CONTRACT: dict[str, tuple[str, str] | None] = {
    "CreateVM": (ACTION_MANAGE, "create"),
    "CreateVMSimple": (ACTION_MANAGE, "create"),
    "DestroyVM": (ACTION_MANAGE, "destroy"),
    "GetVM": None, "ListVMs": None, "GetTopology": None, "GetReport": None, "GetSuggestions": None,
    "PlanVM": None, "PlanVMSimple": None,
    "Reexec": (ACTION_MANAGE, "reexec"),  # and then root only, whatever polkit said
    "Start": (ACTION_MANAGE, "start"),
    "Stop": (ACTION_MANAGE, "stop"),
    "Destroy": (ACTION_MANAGE, "destroy"),
    "EnableNuma": (ACTION_PLACE, "enable-numa"),
    "DisableNuma": (ACTION_PLACE, "disable-numa"),
    "SetupNumaMemory": (ACTION_PLACE, "setup-numa-memory"),
    "SetVcpuAffinity": (ACTION_PLACE, "set-vcpu-affinity"),
    "BindVcpuToNumaNode": (ACTION_PLACE, "bind-vcpu"),
    "MapNumaNode": (ACTION_MIGRATE, "map-numa-node"),
    "GetVcpuAffinity": None, "GetVcpuNumaNode": None, "GetStats": None,
    "GetDecisions": None, "GetSuggestedActions": None,
    "AdoptProcess": (ACTION_ADOPT, "adopt"),  # about a process, not a VM: no vm detail
    "ReleaseVM": (ACTION_ADOPT, "release"),
    "MigrateNumaNode": (ACTION_MIGRATE, "migrate-numa-node"),
    "MigrateNumaSlot": (ACTION_MIGRATE, "migrate-numa-node"),
    "ListJobs": None,
    "Rebalance": (ACTION_MIGRATE, "rebalance"),  # every VM with AutoBalance on: no vm detail
    "PlanRebalance": None,
    "ClearExplicitPlacement": (ACTION_PLACE, "clear-explicit-placement"),
}
NO_VM = {"Reexec", "AdoptProcess", "Rebalance"}  # about the daemon, or a process: not a VM
BUSCTL_ARGS = {"s": ["target"], "u": ["0"], "t": ["0"], "b": ["false"], "au": ["1", "0"], "a{sv}": ["0"]}
# a policy argument is checked before authorization: empty (DefaultPolicy) gets that far
MEMBER_ARGS = {"CreateVMSimple": ["target", "1", "0", "0", "", "false"], "PlanVMSimple": ["1", "0", "0", ""]}


def test_every_live_member_asks_what_the_contract_says(
    service: RunningService, client: BusClient, checker: TableChecker, unpriv_user: User
) -> None:
    """Each method the service introspects, called by a user who is neither
    root nor the VM's owner: a mutation asks its action once and is denied
    before it runs, a read asks nobody."""
    a, u = service.address, unpriv_user
    checker.allow.clear()
    (path,) = client.manager("CreateVM", "suta{sv}", "target", 1, 2 * MiB, options(numa_nodes=1))
    seen = []
    for obj, iface in ((MANAGER_PATH, MANAGER_IFACE), (path, VM_IFACE)):
        (xml,) = client.ok(BUS_NAME, obj, "org.freedesktop.DBus.Introspectable", "Introspect")
        (node,) = [i for i in ET.fromstring(xml).findall("interface") if i.get("name") == iface]
        for m in node.findall("method"):
            member = m.get("name", "")
            types = [arg.get("type", "") for arg in m.findall("arg") if arg.get("direction", "in") == "in"]
            args = MEMBER_ARGS.get(member) or [word for t in types for word in BUSCTL_ARGS[t]]
            asked = len(checker.asked)
            out = busctl(a, "call", BUS_NAME, obj, iface, member, *(["".join(types), *args] if types else []),
                         user=u.name, check=False)
            expected = CONTRACT[member]
            got = [(action, d["verb"], d.get("vm")) for _, action, d, _ in checker.asked[asked:]]
            if expected is None:
                assert got == [], member
            else:
                assert got == [(*expected, None if member in NO_VM else "target")], member
                assert out.returncode != 0 and "Access denied" in out.stderr, (member, out.stderr)
            seen.append(member)
    assert sorted(seen) == sorted(CONTRACT)
    assert client.manager("ListVMs") == [[["target", "created", path]]]  # nothing ran
    assert client.get(path, VM_IFACE, "DeclaredVcpuAffinity") == [[0, []]]


def test_interactive_flag_reaches_the_checker(
    service: RunningService, client: BusClient, checker: TableChecker, unpriv_user: User
) -> None:
    (path,) = client.manager("CreateVM", "suta{sv}", "flag", 1, 2 * MiB, {})
    for flag in ("yes", "no"):
        busctl(service.address, f"--allow-interactive-authorization={flag}", "call", BUS_NAME, path, VM_IFACE,
               "Stop", user=unpriv_user.name, check=False)
    assert [i for *_, i in checker.asked] == [True, False]


def test_concurrent_callers_keep_their_identity(
    service: RunningService, client: BusClient, checker: TableChecker, unpriv_user: User
) -> None:
    """While the user's call waits on polkit, root's calls run and finish: each
    call is judged by its own sender (the caller context is per task)."""
    (path,) = client.manager("CreateVM", "suta{sv}", "both", 1, 2 * MiB, {})
    checker.delay = 1.0
    cmd = ["runuser", "-u", unpriv_user.name, "--", "gdbus", "call", "--address", service.address, "--dest",
           BUS_NAME, "--object-path", path, "--method", f"{VM_IFACE}.Start"]
    slow = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(checker.asked) == 1, "the user's Start to reach the checker", timeout=10)
        client.vm(path, "Start")
        client.vm(path, "Stop")
        assert slow.poll() is None  # the user's call is still with "polkit"
        _, err = slow.communicate(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert f"GDBus.Error:{DENIED}" in err
    assert [(uid, d["verb"]) for uid, _, d, _ in checker.asked] == [(unpriv_user.uid, "start")]
    assert client.get(path, VM_IFACE, "State") == "stopped"


def list_vms(address: str) -> list[list[str]]:
    """ListVMs as busctl, an outside caller, reads it: [[name, state, path], ...]."""
    return list(busctl(address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs")["data"][0])


@pytest.fixture
def no_polkit_service(bus_daemon: Any, manager: Any) -> Iterator[RunningService]:
    from tests.busfixtures import run_service  # noqa: PLC0415

    with run_service(bus_daemon.address, manager, None) as running:
        yield running


def test_without_a_checker_only_root_may_act(
    no_polkit_service: RunningService, client: BusClient, unpriv_user: User
) -> None:
    a = no_polkit_service.address
    out = gdbus(unpriv_user, a, MANAGER_PATH, f"{MANAGER_IFACE}.CreateVM", "x", "1", str(2 * MiB), "{}")
    assert denied(out) and "no polkit checker" in out.stderr
    assert list_vms(a) == []
    client.manager("CreateVM", "suta{sv}", "x", 1, 2 * MiB, {})
