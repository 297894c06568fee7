"""The bus policy (dbus/org.kvmnuma1.conf), the polkit actions and PolkitChecker, with the real parts.

A system-like dbus-daemon enforces the policy, a real polkitd answers, an
unprivileged user created for the session calls with busctl.  The service on
org.kvmnuma1 is a small recording service written here (the daemon is not the
subject): it answers every call that the bus lets through, and for mutating
verbs asks polkit through PolkitChecker with the caller's unique name, as the
bus layer does.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from kvmnumad.bus.polkit import PolkitChecker
from tests.observe import BusMonitor

if TYPE_CHECKING:
    from tests.sysfixtures import Polkitd, SystemBus, User

pytest_plugins = ["tests.sysfixtures"]

ACTIONS = {
    "CreateVM": "org.kvmnuma1.manage",
    "Stop": "org.kvmnuma1.manage",
    "SetVcpuAffinity": "org.kvmnuma1.place",
    "MigrateMemory": "org.kvmnuma1.migrate-memory",
}
DENIED = "org.freedesktop.DBus.Error.AccessDenied"


class RecordingService:
    """Owns org.kvmnuma1 as root on ``address`` from its own thread and event loop."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: list[tuple[str, str, str]] = []  # (interface, member, sender)
        self.loop = asyncio.new_event_loop()
        self.bus: MessageBus | None = None
        self.checker: PolkitChecker | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> RecordingService:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bus is not None:
            self.run(self._disconnect(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def run(self, coro: object, timeout: float = 30) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    async def _disconnect(self) -> None:
        """Close the connection and return once dbus_fast has seen it closed."""
        assert self.bus is not None
        self.bus.disconnect()
        await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]  # dbus-fast leaves it unannotated

    async def _connect(self) -> None:
        self.bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
        self.checker = PolkitChecker(self.bus, timeout=10)
        self.bus.add_message_handler(self._handle)
        await self.bus.request_name("org.kvmnuma1")

    def _handle(self, msg: Message) -> bool:
        if msg.message_type != MessageType.METHOD_CALL or msg.destination != "org.kvmnuma1":
            return False
        self.calls.append((msg.interface or "", msg.member or "", msg.sender or ""))
        action = ACTIONS.get(msg.member or "")
        if action is None:
            self._reply(msg, "s", ["reached"])
        else:
            task = asyncio.ensure_future(self._authorize(msg, action))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _authorize(self, msg: Message, action: str) -> None:
        assert self.checker is not None and msg.sender is not None
        ok = await self.checker.check(msg.sender, action, {"verb": msg.member or "", "vm": "web"}, False)
        self._reply(msg, "b", [ok])

    def _reply(self, msg: Message, signature: str, body: list[object]) -> None:
        assert self.bus is not None
        self.bus.send(Message.new_method_return(msg, signature, body))


@pytest.fixture
def service(system_bus: SystemBus) -> Iterator[RecordingService]:
    with RecordingService(system_bus.address) as svc:
        yield svc


def call(bus: SystemBus, user: User | None, path: str, interface: str, member: str,
         *args: str) -> subprocess.CompletedProcess[str]:
    return bus.busctl("call", "org.kvmnuma1", path, interface, member, *args, user=user, timeout=30)


READS_AND_LET_THROUGH = [
    ("/org/kvmnuma1", "org.kvmnuma1.Manager", "ListVMs"),
    ("/org/kvmnuma1", "org.kvmnuma1.Manager", "GetTopology"),
    ("/org/kvmnuma1", "org.kvmnuma1.Manager", "GetVM", "s", "web"),
    ("/org/kvmnuma1", "org.kvmnuma1.Manager", "PlanVM", "suta{sv}", "web", "2", "0", "0"),
    ("/org/kvmnuma1", "org.kvmnuma1.Manager", "DestroyVM", "s", "web"),  # mutating: daemon asks polkit
    ("/org/kvmnuma1/vm/web", "org.kvmnuma1.VM", "GetVcpuAffinity", "u", "0"),
    ("/org/kvmnuma1/vm/web", "org.kvmnuma1.VM", "GetStats"),
    ("/org/kvmnuma1/vm/web", "org.kvmnuma1.VM", "Start"),  # mutating: daemon asks polkit
    ("/org/kvmnuma1", "org.freedesktop.DBus.Introspectable", "Introspect"),
    ("/org/kvmnuma1", "org.freedesktop.DBus.Peer", "Ping"),
    ("/org/kvmnuma1", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
    ("/org/kvmnuma1", "org.freedesktop.DBus.Properties", "Get", "ss", "org.kvmnuma1.Manager", "Version"),
    ("/org/kvmnuma1", "org.freedesktop.DBus.Properties", "GetAll", "s", "org.kvmnuma1.Manager"),
    ("/org/kvmnuma1", "org.freedesktop.DBus.Properties", "Set", "ssv", "org.kvmnuma1.Manager",
     "DefaultPolicy", "s", "interleave"),
]

DENIED_BY_BUS = [
    ("/org/kvmnuma1", "org.kvmnuma1.Debug", "Crash"),
    ("/org/kvmnuma1", "org.freedesktop.DBus.Monitoring", "BecomeMonitor", "asu", "0", "0"),
]


def test_unprivileged_reads_and_mutations_reach_the_daemon(system_bus: SystemBus, unpriv_user: User,
                                                            service: RecordingService) -> None:
    for path, interface, member, *args in READS_AND_LET_THROUGH:
        out = call(system_bus, unpriv_user, path, interface, member, *args)
        assert out.returncode == 0 and out.stdout.split()[0] in ("s", "b"), (member, out.stderr)
        assert service.calls[-1][:2] == (interface, member)
    senders = {sender for *_, sender in service.calls}
    assert len(senders) == len(READS_AND_LET_THROUGH)  # one busctl connection each


def test_bus_denies_other_interfaces(system_bus: SystemBus, unpriv_user: User,
                                     service: RecordingService) -> None:
    for path, interface, member, *args in DENIED_BY_BUS:
        out = call(system_bus, unpriv_user, path, interface, member, *args)
        assert out.returncode != 0 and "Access denied" in out.stderr, (member, out.stdout, out.stderr)
    assert service.calls == []
    # root passes the bus policy for anything (the service, not the bus, answers)
    out = call(system_bus, None, "/org/kvmnuma1", "org.kvmnuma1.Debug", "Crash")
    assert out.returncode == 0, out.stderr


def test_only_root_owns_the_name(system_bus: SystemBus, unpriv_user: User) -> None:
    request = ("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
               "RequestName", "su", "org.kvmnuma1", "4")
    out = system_bus.busctl(*request, user=unpriv_user)
    assert out.returncode != 0 and "Access denied" in out.stderr, out.stderr
    out = system_bus.busctl(*request)
    assert out.returncode == 0 and out.stdout.split()[0] == "u", out.stderr  # 1 primary owner / 2 queued
    # Through GDBus too (a different client library, the system-bus address from the environment).
    gdbus = unpriv_user.run("gdbus", "call", "--system", "--dest", "org.freedesktop.DBus", "--object-path",
                            "/org/freedesktop/DBus", "--method", "org.freedesktop.DBus.RequestName",
                            "org.kvmnuma1", "4", env={"DBUS_SYSTEM_BUS_ADDRESS": system_bus.address})
    assert gdbus.returncode != 0 and f"{DENIED}: Connection" in gdbus.stderr, gdbus.stderr
    assert "is not allowed to own the service \"org.kvmnuma1\"" in gdbus.stderr, gdbus.stderr


def test_pkaction_shows_the_installed_actions(polkitd: Polkitd) -> None:
    out = subprocess.run(["pkaction", "--action-id", "org.kvmnuma1.place", "--verbose"],
                         env=polkitd.bus.env(), capture_output=True, text=True, check=True, timeout=30)
    text = " ".join(out.stdout.split())
    for expected in ("implicit any: no", "implicit inactive: no", "implicit active: auth_admin_keep"):
        assert expected in text, out.stdout
    listed = subprocess.run(["pkaction"], env=polkitd.bus.env(), capture_output=True, text=True,
                            check=True, timeout=30).stdout.split()
    assert {"org.kvmnuma1.manage", "org.kvmnuma1.place", "org.kvmnuma1.migrate-memory"} <= set(listed)


def polkit_answers(bus: SystemBus, user: User | None) -> dict[str, bool]:
    answers = {}
    for member, path, interface, args in (
        ("CreateVM", "/org/kvmnuma1", "org.kvmnuma1.Manager", ("suta{sv}", "web", "2", "0", "0")),
        ("Stop", "/org/kvmnuma1/vm/web", "org.kvmnuma1.VM", ()),
        ("SetVcpuAffinity", "/org/kvmnuma1/vm/web", "org.kvmnuma1.VM", ("uau", "0", "1", "0")),
        ("MigrateMemory", "/org/kvmnuma1/vm/web", "org.kvmnuma1.VM", ()),
    ):
        out = call(bus, user, path, interface, member, *args)
        assert out.returncode == 0, out.stderr
        answers[ACTIONS[member]] = out.stdout.strip() == "b true"
    return answers


def test_polkit_denies_then_grants_place_to_the_group(system_bus: SystemBus, polkitd: Polkitd,
                                                      unpriv_user: User, service: RecordingService) -> None:
    nothing = dict.fromkeys(set(ACTIONS.values()), False)
    assert polkit_answers(system_bus, unpriv_user) == nothing

    def place_granted() -> bool:
        return polkit_answers(system_bus, unpriv_user)["org.kvmnuma1.place"]

    with polkitd.grant(unpriv_user.group, "org.kvmnuma1.place", probe=place_granted):
        assert polkit_answers(system_bus, unpriv_user) == {**nothing, "org.kvmnuma1.place": True}
    assert polkit_answers(system_bus, unpriv_user) == nothing  # the rule is gone again
    # polkit itself authorizes uid 0 (the daemon does not even ask for root).
    assert all(polkit_answers(system_bus, None).values())


def test_polkit_failures_are_no(system_bus: SystemBus, polkitd: Polkitd, service: RecordingService,
                                caplog: pytest.LogCaptureFixture) -> None:
    assert service.checker is not None and service.bus is not None
    own = service.bus.unique_name
    assert own is not None
    with caplog.at_level(logging.ERROR, logger="kvmnumad.bus.polkit"):
        # An action polkit does not know: an error reply, logged, no.
        assert service.run(service.checker.check(own, "org.kvmnuma1.no-such-action", {}, False)) is False
        # A sender that is not on the bus.
        assert service.run(service.checker.check(":1.999999", "org.kvmnuma1.place", {}, True)) is False
    assert len([r for r in caplog.records if r.name == "kvmnumad.bus.polkit"]) == 2


def test_no_polkitd_on_the_bus_is_no(fresh_system_bus: SystemBus, caplog: pytest.LogCaptureFixture) -> None:
    async def ask(address: str) -> bool:
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        try:
            assert bus.unique_name is not None
            return await PolkitChecker(bus).check(bus.unique_name, "org.kvmnuma1.place", {}, False)
        finally:
            bus.disconnect()

    with caplog.at_level(logging.ERROR, logger="kvmnumad.bus.polkit"):
        started = time.monotonic()
        assert asyncio.run(ask(fresh_system_bus.address)) is False
        assert time.monotonic() - started < 5  # no activation, no hang
    assert "ServiceUnknown" in caplog.text or "PolicyKit1" in caplog.text


def test_check_sends_subject_flags_and_details(system_bus: SystemBus, polkitd: Polkitd,
                                              service: RecordingService) -> None:
    """The CheckAuthorization calls on the wire, seen by ``busctl monitor`` (root may monitor)."""
    assert service.checker is not None and service.bus is not None
    with BusMonitor(system_bus.address, "org.freedesktop.PolicyKit1") as monitor:  # returns attached
        subject = service.bus.unique_name
        assert subject is not None
        # Interactive or not, nobody runs an authentication agent here: root's own name is allowed.
        assert service.run(service.checker.check(subject, "org.kvmnuma1.place", {"vm": "web"}, True))
        assert service.run(service.checker.check(subject, "org.kvmnuma1.manage", {"vm": "db"}, False))
        monitor.sync()  # both calls were answered: the monitor has them once a later Ping shows
        calls = monitor.calls("CheckAuthorization")
    assert len(calls) == 2, monitor.seen
    bodies = [c["payload"]["data"] for c in calls]
    assert calls[0]["payload"]["type"] == "(sa{sv})sa{ss}us"
    assert bodies[0][0] == ["system-bus-name", {"name": {"type": "s", "data": subject}}]
    assert bodies[0][1:] == ["org.kvmnuma1.place", {"vm": "web"}, 1, ""]
    assert bodies[1][1:] == ["org.kvmnuma1.manage", {"vm": "db"}, 0, ""]
