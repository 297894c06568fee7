"""Figure 4: D-Bus calls to the real daemon vs the bus driver's GetId, same client, same run.

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
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from bench.report import Row, median

MiB = 1 << 20
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


def _start_bus() -> tuple[str, int]:
    out = subprocess.run(["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=2"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0], int(out.stderr.strip().splitlines()[-1])


def _start_daemon(address: str, workdir: Path) -> subprocess.Popen[bytes]:
    ready = workdir / "address"
    log = (workdir / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmnumad", "--bus", address, "--log-target", "stderr",
         "--log-level", "warning", "--address-file", str(ready)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"kvmnumad did not come up: {(workdir / 'daemon.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


async def _ok(bus: MessageBus, msg: Message) -> Message:
    reply = await bus.call(msg)
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        what = f"{reply.error_name} {reply.body}" if reply is not None else "no reply"
        raise RuntimeError(f"{msg.member} failed: {what}")
    return reply


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
            await _ok(self.bus, kind.make())
        changed0 = self.counter.count
        c0 = sum(self.daemon.cpu_times()[:2])
        t0 = time.perf_counter_ns()
        for _ in range(self.calls):
            t = time.perf_counter_ns()
            await _ok(self.bus, kind.make())
            result.latencies_us.append((time.perf_counter_ns() - t) / 1000)
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        result.rates.append(self.calls / elapsed)
        per_round = self.calls * self.rounds
        result.cpu_us_per_call += (sum(self.daemon.cpu_times()[:2]) - c0) * 1e6 / per_round
        result.changed_per_call += (self.counter.count - changed0) / per_round


async def _measure(address: str, daemon: psutil.Process, rounds: int, calls: int) -> dict[str, Result]:
    online = sorted(os.sched_getaffinity(0))
    kinds = _kinds(online)
    bus = await MessageBus(bus_address=address).connect()
    counter = _ChangedCounter()
    bus.add_message_handler(counter)
    try:
        await _ok(bus, _call(DRIVER, "AddMatch", "s",
                             [f"type='signal',path='{VM_PATH}',member='PropertiesChanged'"])())
        await _ok(bus, _call(MANAGER, "CreateVM", "suta{sv}",
                             ["bench", 4, 16 * MiB, {"numa_nodes": Variant("u", 2)}])())
        reply = await _ok(bus, kinds["getaff"].make())
        if sorted(reply.body[0]) != online:
            raise RuntimeError(f"GetVcpuAffinity answered {reply.body[0]}")
        bench = _Bench(bus, daemon, counter, rounds, calls)
        results = {key: Result() for key in kinds}
        for _ in range(rounds):
            for key, kind in kinds.items():
                await bench.round(kind, results[key])
        await _ok(bus, _call(MANAGER, "DestroyVM", "s", ["bench"])())
        return results
    finally:
        bus.disconnect()
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


def bus_round_trips(rounds: int, calls: int) -> list[Row]:
    address, bus_pid = _start_bus()
    proc: subprocess.Popen[bytes] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-bus-") as tmp:
            proc = _start_daemon(address, Path(tmp))
            res = asyncio.run(_measure(address, psutil.Process(proc.pid), rounds, calls))
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(bus_pid, signal.SIGTERM)
    kinds = _kinds(sorted(os.sched_getaffinity(0)))
    base = res[BASE]
    rows: list[Row] = []
    for key in ("getaff", "prop", "setalt", "setsame", "ping"):
        r = res[key]
        notes = (f"vs {kinds[BASE].label} ({median(base.rates):,.0f} calls/s); {rounds} rounds x {calls} "
                 f"sequential calls; {median(r.rates):,.0f} calls/s; "
                 f"kvmnumad CPU {r.cpu_us_per_call:.0f} us/call")
        if key.startswith("set"):
            notes += f"; {r.changed_per_call:.2f} PropertiesChanged per call before its reply"
        rows.append(Row(f"D-Bus {kinds[key].label}, p50 latency", median(r.latencies_us),
                        median(base.latencies_us), "us", notes))
    return rows
