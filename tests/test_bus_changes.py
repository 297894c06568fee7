"""One path per change, seen from a client: a change becomes exactly one
PropertiesChanged carrying only the values that changed, it arrives before
the reply of the call that made it, and a call that changes nothing visible
publishes nothing.

The observer is a dbus-fast connection of its own that records every message
it receives, signals and replies alike, in the order the bus delivered them.
The event pump's failure path is exercised on a real loop with a handler
that really fails (the kernel cannot be made to fail a snapshot on demand).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant

from kvmnumad.bus.paths import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, VM_INTERFACE
from kvmnumad.bus.pump import EventPump
from kvmnumad.bus.service import connect
from kvmnumad.errors import Internal, NoSuchVM
from kvmnumad.events import DefaultPolicyChanged, Event, VmAdded
from kvmnumad.model import Policy
from tests.busfixtures import BusDaemon, LoopThread, MiB, RunningService, options, plain
from tests.observe import online_cpus

pytest_plugins = ["tests.busfixtures"]  # bus_daemon, service

PROPS = "org.freedesktop.DBus.Properties"


class Recorder:
    """A client that keeps every incoming message, in delivery order."""

    def __init__(self, address: str) -> None:
        self._loop = LoopThread("bus-recorder")
        self.bus = self._loop.run(connect(address))
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self.bus.add_message_handler(self._keep)
        self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                  [f"type='signal',sender='{BUS_NAME}'"])

    def _keep(self, msg: Message) -> bool:
        with self._lock:
            self.messages.append(msg)
        return False

    def close(self) -> None:
        self.bus.disconnect()
        self._loop.close()

    def call(self, dest: str, path: str, iface: str, member: str, signature: str = "",  # noqa: PLR0917
             body: list[Any] | None = None) -> Message:
        return self.exchange(Message(destination=dest, path=path, interface=iface, member=member,
                                     signature=signature, body=body or []))

    def exchange(self, msg: Message) -> Message:
        """Send ``msg`` (its serial is set then) and return its successful reply."""
        reply = self._loop.run(self.bus.call(msg))
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply
        return reply

    def vm(self, path: str, member: str, signature: str = "", *args: Any) -> Message:
        return self.call(BUS_NAME, path, VM_INTERFACE, member, signature, list(args))

    def mark(self) -> int:
        with self._lock:
            return len(self.messages)

    def since(self, mark: int) -> list[Message]:
        with self._lock:
            return self.messages[mark:]


@pytest.fixture
def recorder(bus_daemon: BusDaemon) -> Iterator[Recorder]:
    r = Recorder(bus_daemon.address)
    try:
        yield r
    finally:
        r.close()


def changes(messages: list[Message], path: str, iface: str) -> list[dict[str, Any]]:
    return [
        {k: plain(v) for k, v in m.body[1].items()}
        for m in messages
        if m.message_type == MessageType.SIGNAL and m.path == path and m.member == "PropertiesChanged"
        and m.body[0] == iface
    ]


def reply_index(messages: list[Message], call: Message) -> int:
    return next(i for i, m in enumerate(messages) if m.reply_serial == call.serial)


def get_all(r: Recorder, path: str, iface: str) -> dict[str, Any]:
    return {k: plain(v) for k, v in r.call(BUS_NAME, path, PROPS, "GetAll", "s", [iface]).body[0].items()}


def test_one_set_vcpu_affinity_is_one_properties_changed_before_its_reply(
    service: RunningService, recorder: Recorder
) -> None:
    reply = recorder.call(BUS_NAME, MANAGER_PATH, MANAGER_INTERFACE, "CreateVM", "suta{sv}",
                          ["pc", 2, 2 * MiB, options(numa_nodes=1)])
    path = reply.body[0]
    before = get_all(recorder, path, VM_INTERFACE)
    last = max(online_cpus())
    assert before["DeclaredVcpuAffinity"] == [[0, []], [1, []]]  # manual policy: nothing pinned yet

    mark = recorder.mark()
    call = Message(destination=BUS_NAME, path=path, interface=VM_INTERFACE, member="SetVcpuAffinity",
                   signature="uau", body=[0, [last]])
    recorder.exchange(call)
    # The same set again: no visible change.  Its reply also comes after
    # everything the first call caused, so nothing of the first is missed below.
    same = Message(destination=BUS_NAME, path=path, interface=VM_INTERFACE, member="SetVcpuAffinity",
                   signature="uau", body=[0, [last]])
    recorder.exchange(same)
    seen = recorder.since(mark)

    published = changes(seen, path, VM_INTERFACE)
    assert len(published) == 1, published
    (changed,) = published
    after = get_all(recorder, path, VM_INTERFACE)
    assert changed == {k: v for k, v in after.items() if before[k] != v}  # all that changed, nothing else
    assert changed["DeclaredVcpuAffinity"] == [[0, [last]], [1, []]]
    assert dict(changed["VcpuAffinity"])[0] == [last]
    first_change = next(i for i, m in enumerate(seen) if m.member == "PropertiesChanged")
    assert first_change < reply_index(seen, call) < reply_index(seen, same)
    assert not [m for m in seen if m.message_type == MessageType.SIGNAL and m.path == MANAGER_PATH]


def test_default_policy_set_is_one_properties_changed_and_the_same_value_none(
    service: RunningService, recorder: Recorder
) -> None:
    current = get_all(recorder, MANAGER_PATH, MANAGER_INTERFACE)["DefaultPolicy"]
    other = "interleave" if current != "interleave" else "manual"
    mark = recorder.mark()
    for value in (other, other):
        recorder.call(BUS_NAME, MANAGER_PATH, PROPS, "Set", "ssv",
                      [MANAGER_INTERFACE, "DefaultPolicy", Variant("s", value)])
    seen = recorder.since(mark)
    assert changes(seen, MANAGER_PATH, MANAGER_INTERFACE) == [{"DefaultPolicy": other}]
    signal_at = next(i for i, m in enumerate(seen) if m.member == "PropertiesChanged")
    assert signal_at < next(i for i, m in enumerate(seen) if m.message_type == MessageType.METHOD_RETURN)


def test_calls_that_change_nothing_publish_nothing(service: RunningService, recorder: Recorder) -> None:
    path = recorder.call(BUS_NAME, MANAGER_PATH, MANAGER_INTERFACE, "CreateVM", "suta{sv}",
                         ["idle", 1, 2 * MiB, options(numa_nodes=1)]).body[0]
    recorder.vm(path, "Start")
    mark = recorder.mark()
    recorder.vm(path, "Start")  # running already
    recorder.vm(path, "MapNumaNode", "uu", 0, 0)  # mapped there already
    recorder.vm(path, "GetVcpuAffinity", "u", 0)
    recorder.vm(path, "Stop")  # this one changes State, and its reply comes after all of the above
    published = changes(recorder.since(mark), path, VM_INTERFACE)
    assert published == [{"State": "stopped"}]


# ------------------------------------------------------------- the pump
def _run_pump(handle_error: BaseException | None, events: list[Event], path: str) -> tuple[list[Event], Any]:
    """Feed ``events`` through a pump whose handler raises ``handle_error`` for
    VmAdded; returns what was handled and the outcome of a settled(path) block."""

    async def main() -> tuple[list[Event], Any]:
        handled: list[Event] = []

        async def handle(event: Event) -> None:
            await asyncio.sleep(0)
            handled.append(event)
            if isinstance(event, VmAdded) and handle_error is not None:
                raise handle_error

        pump = EventPump(handle, lambda e: f"/vm/{e.vm}" if isinstance(e, VmAdded) else "/")
        pump.start()
        try:
            async with pump.settled(path):
                for event in events:  # as the core does, from a thread of its own
                    await asyncio.to_thread(pump.submit, event)
            outcome: Any = None
        except Exception as e:
            outcome = e
        finally:
            pump.close()
        return handled, outcome

    return asyncio.run(main())


def test_settled_returns_after_the_events_queued_before_it() -> None:
    events: list[Event] = [VmAdded("a"), DefaultPolicyChanged(Policy.INTERLEAVE), VmAdded("b")]
    handled, outcome = _run_pump(None, events, "/vm/a")
    assert handled == events and outcome is None


def test_a_failed_publication_is_logged_and_reaches_the_caller_of_that_object(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="kvmnumad.bus.pump"):
        _, outcome = _run_pump(RuntimeError("marshalling broke"), [VmAdded("a")], "/vm/a")
    assert isinstance(outcome, Internal) and isinstance(outcome.__cause__, RuntimeError)
    (record,) = [r for r in caplog.records if r.name == "kvmnumad.bus.pump"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    # a caller about another object is not told of it (but it is logged all the same)
    _, outcome = _run_pump(RuntimeError("marshalling broke"), [VmAdded("a")], "/vm/b")
    assert outcome is None


def test_a_vm_gone_meanwhile_is_no_failure(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kvmnumad.bus.pump"):
        _, outcome = _run_pump(NoSuchVM("no VM named 'a'"), [VmAdded("a")], "/vm/a")
    assert outcome is None
    assert [r.levelno for r in caplog.records if r.name == "kvmnumad.bus.pump"] == [logging.DEBUG]


def test_settled_does_not_hang_once_the_pump_is_closed() -> None:
    async def main() -> float:
        async def handle(event: Event) -> None:
            pass

        pump = EventPump(handle, lambda e: "/")
        pump.start()
        pump.close()
        t0 = time.monotonic()
        async with pump.settled("/"):
            pass
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1
