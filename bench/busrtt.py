"""Figure 4: D-Bus round trips to the real daemon vs the bus driver's own, same client, same run.

The daemon is ``python -m kvmnumad`` in its own process on a private
dbus-daemon this module starts and kills (by pid).  A call to a service
crosses the bus twice each way; a call to the bus driver once.  Peer.Ping to
org.kvmnuma1 (answered by dbus-fast, no kvmnumad code) shows that floor.
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
from dataclasses import dataclass
from pathlib import Path

import psutil
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from bench.report import Row, median

MiB = 1 << 20
DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus")
SERVICE = "org.kvmnuma1"
VM_PATH = "/org/kvmnuma1/vm/bench"


@dataclass
class Kind:
    label: str
    make: Callable[[], Message]


def _kinds() -> dict[str, Kind]:
    def call(dest: str, path: str, iface: str, member: str, *args: object) -> Callable[[], Message]:
        sig, body = (str(args[0]), list(args[1:])) if args else ("", [])
        return lambda: Message(destination=dest, path=path, interface=iface, member=member,
                               signature=sig, body=body)

    return {
        "getid": Kind("bus driver GetId", call(*DBUS, "org.freedesktop.DBus", "GetId")),
        "busping": Kind("bus driver Peer.Ping", call(*DBUS, "org.freedesktop.DBus.Peer", "Ping")),
        "ping": Kind("Peer.Ping to org.kvmnuma1", call(SERVICE, "/org/kvmnuma1", "org.freedesktop.DBus.Peer",
                                                        "Ping")),
        "method": Kind("GetVcpuAffinity(0)", call(SERVICE, VM_PATH, "org.kvmnuma1.VM", "GetVcpuAffinity",
                                                  "u", 0)),
        "prop": Kind("Properties.Get(VcpuAffinity)", call(SERVICE, VM_PATH, "org.freedesktop.DBus.Properties",
                                                          "Get", "ss", "org.kvmnuma1.VM", "VcpuAffinity")),
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


async def _call(bus: MessageBus, msg: Message) -> Message:
    reply = await bus.call(msg)
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        what = f"{reply.error_name} {reply.body}" if reply is not None else "no reply"
        raise RuntimeError(f"{msg.member} failed: {what}")
    return reply


async def _measure(address: str, daemon: psutil.Process, rounds: int, calls: int,
                   ) -> dict[str, tuple[list[float], list[float], float]]:
    """Per kind: calls/s of each round, every latency (us), daemon CPU us per call."""
    kinds = _kinds()
    bus = await MessageBus(bus_address=address).connect()
    try:
        await _call(bus, Message(destination=SERVICE, path="/org/kvmnuma1", interface="org.kvmnuma1.Manager",
                                 member="CreateVM", signature="suta{sv}",
                                 body=["bench", 4, 16 * MiB, {"numa_nodes": Variant("u", 2)}]))
        reply = await _call(bus, kinds["method"].make())
        if sorted(reply.body[0]) != sorted(os.sched_getaffinity(0)):
            raise RuntimeError(f"GetVcpuAffinity answered {reply.body[0]}")
        results: dict[str, tuple[list[float], list[float], float]] = {k: ([], [], 0.0) for k in kinds}
        for _ in range(rounds):
            for key, kind in kinds.items():
                for _ in range(calls // 10):  # warm-up
                    await _call(bus, kind.make())
                lat = results[key][1]
                c0 = sum(daemon.cpu_times()[:2])
                t0 = time.perf_counter_ns()
                for _ in range(calls):
                    t = time.perf_counter_ns()
                    await _call(bus, kind.make())
                    lat.append((time.perf_counter_ns() - t) / 1000)
                elapsed = (time.perf_counter_ns() - t0) / 1e9
                cpu = (sum(daemon.cpu_times()[:2]) - c0) * 1e6 / calls
                rates, lats, cpu_sum = results[key]
                rates.append(calls / elapsed)
                results[key] = (rates, lats, cpu_sum + cpu / rounds)
        await _call(bus, Message(destination=SERVICE, path="/org/kvmnuma1", interface="org.kvmnuma1.Manager",
                                 member="DestroyVM", signature="s", body=["bench"]))
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
    kinds = _kinds()
    base = "getid"
    b_rate, b_lat, _ = res[base]
    rows: list[Row] = []
    for key in ("method", "prop", "ping"):
        rate, lat, cpu = res[key]
        rows.append(Row(f"D-Bus {kinds[key].label}, sequential calls/s", median(rate), median(b_rate),
                        "calls/s",
                        f"vs {kinds[base].label}; median of {rounds} rounds x {calls} calls; "
                        f"kvmnumad CPU {cpu:.0f} us/call", higher_is_better=True))
        rows.append(Row(f"D-Bus {kinds[key].label}, p50 latency", median(lat), median(b_lat), "us",
                        f"vs {kinds[base].label}"))
    ping_rate = median(res["busping"][0])
    rows[0] = Row(rows[0].figure, rows[0].kvmnumad, rows[0].baseline, rows[0].unit,
                  rows[0].notes + f" (bus driver Peer.Ping: {ping_rate:,.0f} calls/s)", True)
    return rows
