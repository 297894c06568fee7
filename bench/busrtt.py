"""Figure 1: D-Bus calls to the real daemon vs the bus driver's GetId, same client, same run.

The daemon is ``python -m kvmnumad`` in its own process on a private
dbus-daemon this module starts and kills (by pid).  A call to a service
crosses the bus twice each way; a call to the bus driver once.  Peer.Ping to
org.kvmnuma1 (answered by dbus-fast, no kvmnumad code) shows that floor.

SetVcpuAffinity is measured twice: alternating two CPU sets, so that every
call changes the placement (and must publish one PropertiesChanged before
its reply), and repeating one set, which changes nothing visible (and must
publish nothing).  The client counts the VM's PropertiesChanged signals that
arrived before each reply: the figure's notes say how many per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from bench.daemonproc import Daemon, ok
from bench.report import Row, median, percentile

MiB = 1 << 20
IN_FLIGHT = 64
DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus")
SERVICE = "org.kvmnuma1"
VM_PATH = "/org/kvmnuma1/vm/bench"
VM_IFACE = "org.kvmnuma1.VM"
BASE = "getid"
DRIVER = (*DBUS, "org.freedesktop.DBus")
MANAGER = (SERVICE, "/org/kvmnuma1", "org.kvmnuma1.Manager")
VM = (SERVICE, VM_PATH, VM_IFACE)


@dataclass
class Kind:
    label: str
    make: Callable[[], Message]


@dataclass
class Result:
    latencies_us: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    parallel_rates: list[float] = field(default_factory=list)  # calls/s with IN_FLIGHT outstanding
    cpu_us_per_call: float = 0.0
    changed_per_call: float = 0.0  # PropertiesChanged of the VM seen before each reply


def _call(target: tuple[str, str, str], member: str, sig: str = "",
          body: list[object] | None = None) -> Callable[[], Message]:
    """``target``: (destination, path, interface)."""
    dest, path, iface = target
    return lambda: Message(destination=dest, path=path, interface=iface, member=member, signature=sig,
                           body=list(body or []))


def _alternating(sets: list[list[int]]) -> Callable[[], Message]:
    """SetVcpuAffinity(0, ...) cycling through ``sets``: every call changes the mask."""
    state = {"i": 0}

    def make() -> Message:
        state["i"] += 1
        return _call(VM, "SetVcpuAffinity", "uau", [0, sets[state["i"] % 2]])()

    return make


def _kinds(online: list[int]) -> dict[str, Kind]:
    first = online[:1]
    return {
        BASE: Kind("bus driver GetId", _call(DRIVER, "GetId")),
        "ping": Kind("Peer.Ping to org.kvmnuma1",
                     _call((SERVICE, "/org/kvmnuma1", "org.freedesktop.DBus.Peer"), "Ping")),
        "getaff": Kind("GetVcpuAffinity(0)", _call(VM, "GetVcpuAffinity", "u", [0])),
        "prop": Kind("Properties.Get(VcpuAffinity)",
                     _call((SERVICE, VM_PATH, "org.freedesktop.DBus.Properties"), "Get", "ss",
                           [VM_IFACE, "VcpuAffinity"])),
        "setalt": Kind(f"SetVcpuAffinity(0) alternating {first}/{online}", _alternating([first, online])),
        "setsame": Kind(f"SetVcpuAffinity(0) repeating {first}",
                        _call(VM, "SetVcpuAffinity", "uau", [0, first])),
    }


class _ChangedCounter:
    """Counts PropertiesChanged of the bench VM as the client reads them:
    dbus-fast handles messages in arrival order, so when a call's reply is
    delivered every signal the daemon sent before it has been counted."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL and msg.path == VM_PATH:
            self.count += msg.member == "PropertiesChanged"
        return False


@dataclass
class _Bench:
    bus: MessageBus
    daemon: psutil.Process
    counter: _ChangedCounter
    rounds: int
    calls: int

    async def round(self, kind: Kind, result: Result) -> None:
        """One round of sequential calls of ``kind``, added to ``result``."""
        for _ in range(self.calls // 10):  # warm-up
            await ok(self.bus, kind.make())
        changed0 = self.counter.count
        c0 = sum(self.daemon.cpu_times()[:2])
        t0 = time.perf_counter_ns()
        for _ in range(self.calls):
            t = time.perf_counter_ns()
            await ok(self.bus, kind.make())
            result.latencies_us.append((time.perf_counter_ns() - t) / 1000)
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        result.rates.append(self.calls / elapsed)
        per_round = self.calls * self.rounds
        result.cpu_us_per_call += (sum(self.daemon.cpu_times()[:2]) - c0) * 1e6 / per_round
        result.changed_per_call += (self.counter.count - changed0) / per_round

    async def parallel(self, kind: Kind, result: Result) -> None:
        """``calls`` calls of ``kind`` with IN_FLIGHT outstanding at any time: calls/s."""
        left = self.calls

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await ok(self.bus, kind.make())

        t0 = time.perf_counter_ns()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        result.parallel_rates.append(self.calls / ((time.perf_counter_ns() - t0) / 1e9))


async def _measure(address: str, daemon: psutil.Process, rounds: int, calls: int) -> dict[str, Result]:
    online = sorted(os.sched_getaffinity(0))
    kinds = _kinds(online)
    bus = await MessageBus(bus_address=address).connect()
    counter = _ChangedCounter()
    bus.add_message_handler(counter)
    try:
        await ok(bus, _call(DRIVER, "AddMatch", "s",
                             [f"type='signal',path='{VM_PATH}',member='PropertiesChanged'"])())
        await ok(bus, _call(MANAGER, "CreateVM", "suta{sv}",
                             ["bench", 4, 16 * MiB, {"numa_nodes": Variant("u", 2)}])())
        reply = await ok(bus, kinds["getaff"].make())
        if sorted(reply.body[0]) != online:
            raise RuntimeError(f"GetVcpuAffinity answered {reply.body[0]}")
        bench = _Bench(bus, daemon, counter, rounds, calls)
        results = {key: Result() for key in kinds}
        for _ in range(rounds):
            for key, kind in kinds.items():
                await bench.round(kind, results[key])
            for key in (BASE, "getaff", "setalt"):
                await bench.parallel(kinds[key], results[key])
        await ok(bus, _call(MANAGER, "DestroyVM", "s", ["bench"])())
        return results
    finally:
        bus.disconnect()
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


def bus_round_trips(rounds: int, calls: int, profile: Path | None = None) -> list[Row]:
    """``profile``: also write a cProfile of the daemon (its main thread: the event loop) there."""
    with Daemon(profile=profile) as daemon:
        res = asyncio.run(_measure(daemon.address, daemon.process(), rounds, calls))
    kinds = _kinds(sorted(os.sched_getaffinity(0)))
    base = res[BASE]
    rows: list[Row] = []
    how = f"{rounds} rounds x {calls} sequential calls"
    for key in ("setalt", "getaff", "prop", "setsame", "ping"):
        r = res[key]
        notes = (f"vs {kinds[BASE].label} ({median(base.rates):,.0f} calls/s); {how}; "
                 f"{median(r.rates):,.0f} calls/s; kvmnumad CPU {r.cpu_us_per_call:.0f} us/call")
        if key.startswith("set"):
            notes += f"; {r.changed_per_call:.2f} PropertiesChanged per call before its reply"
        if key == "setalt":
            notes += "; goal p50 <= 1.5x"
        rows.append(Row(f"D-Bus {kinds[key].label}, p50 latency", median(r.latencies_us),
                        median(base.latencies_us), "us", notes))
        if key in ("setalt", "getaff"):
            rows.append(Row("  same, p99 latency", percentile(r.latencies_us, 99),
                            percentile(base.latencies_us, 99), "us", f"same samples ({len(r.latencies_us)})"))
            goal = "; goal >= 0.5x GetId's throughput (ratio <= 2)" if key == "setalt" else ""
            rows.append(Row(f"  same, {IN_FLIGHT} in flight, calls/s", median(r.parallel_rates),
                            median(base.parallel_rates), "calls/s",
                            f"{rounds} rounds x {calls} calls, {IN_FLIGHT} outstanding, vs GetId likewise "
                            f"(median of rounds){goal}", higher_is_better=True))
    return rows
