"""Client faults against a real daemon (issue 12 finding 4, "What to build" 4).

A client that floods without reading, one that disconnects mid-call, one
that holds hundreds of connections, and an unprivileged uid that floods
GetStats on a large VM: meanwhile a second client's ListVMs stays fast, and
afterwards what the dead clients held is freed.  Everything is observed from
outside the daemon: a second dbus-fast client's latency, /proc/PID/status
(VmRSS, Threads) and /proc/PID/fd of the daemon process.  The hostile
clients are tests/clients/rawdbus.py (a socket, no library), the
unprivileged one run as ``unpriv_user`` under /usr/bin/python3.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions
from tests.busfixtures import (
    MANAGER_IFACE,
    MANAGER_PATH,
    BusClient,
    BusDaemon,
    DaemonProcess,
    MiB,
    RunningService,
    daemon_process,
    options,
    run_service,
    start_bus_daemon,
)
from tests.clients.rawdbus import RawClient
from tests.sysfixtures import User
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]

ROOT = Path(__file__).resolve().parent.parent
RAWDBUS = ROOT / "tests" / "clients" / "rawdbus.py"
BIG = "/org/kvmnuma1/vm/big"
VCPU0 = (0).to_bytes(4, "little")  # GetVcpuAffinity's body: vCPU 0
BIG_MIB = 512  # resident: GetStats walks 131,072 pages (~57 ms here) behind the VM's lock


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB), Threads and open fds of a process, read from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Probe:
    """A second client timing sequential ListVMs calls, in a process of its own
    (rawdbus.py probe): a thread of this process would share the GIL with the
    flood it is measuring and time this process's own waits."""

    def __init__(self, address: str) -> None:
        self.samples: list[float] = []  # seconds
        self._proc = subprocess.Popen([sys.executable, str(RAWDBUS), address, "probe"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> Probe:
        assert self._proc.stdout is not None
        assert self._proc.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate(timeout=60)  # closes its stdin: the probe stops and reports
        self.samples = [float(x) / 1000 for x in out.split()]

    def p99_ms(self) -> float:
        return 1000 * statistics.quantiles(self.samples, n=100)[98]


@pytest.fixture(scope="module")
def daemon(bus_daemon: BusDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """kvmnumad as a real process on the module's bus (root-only mutations,
    reads for anyone), with a VM of BIG_MIB resident MiB.  Its stop must exit 0
    in time (daemon_process), stuck or flooded workers notwithstanding."""
    with daemon_process("kvmnumad", tmp_path_factory.mktemp("faults"), "--bus", bus_daemon.address) as d:
        c = BusClient(d.address)
        try:
            c.manager("CreateVM", "suta{sv}", "big", 1, BIG_MIB * MiB, options(prealloc=True))
        finally:
            c.close()
        yield d


def settle(pid: int, base: dict[str, int]) -> dict[str, int]:
    """The daemon's figures once its idle workers have ended (2 s idle) and fds are back."""
    def back() -> bool:
        now = proc_status(pid)
        return now["fds"] <= base["fds"] and now["threads"] <= base["threads"] + 1
    with contextlib.suppress(AssertionError):
        wait_until(back, "the daemon's threads and fds back at the baseline", timeout=20)
    return proc_status(pid)


def test_an_unprivileged_getstats_flood_does_not_starve_root(daemon: DaemonProcess,
                                                             unpriv_user: User) -> None:
    """Finding 4: reads an unauthenticated caller repeats walked every guest
    page holding the VM's lock, on a pool of 6 threads everyone shared:
    ListVMs for root waited behind them.  Now the uid holds 4 threads at most
    and a costly read is shared for 9x its duration with non-root callers."""
    root = BusClient(daemon.address)
    try:
        t = time.perf_counter()
        root.vm(BIG, "GetStats")
        walk_ms = 1000 * (time.perf_counter() - t)
    finally:
        root.close()
    base = proc_status(daemon.pid)
    with Probe(daemon.address) as probe:
        flood = unpriv_user.run("/usr/bin/python3", str(RAWDBUS), daemon.address, "flood-stats", BIG,
                                "4", "8", timeout=60)
    assert flood.returncode == 0, flood.stderr
    after = settle(daemon.pid, base)
    p99 = probe.p99_ms()
    print(f"\nGetStats of {BIG_MIB} MiB resident (root, fresh): {walk_ms:.1f} ms; unprivileged flood: "
          f"{flood.stdout.strip()} GetStats from 8 connections in 4 s; root ListVMs meanwhile: "
          f"{len(probe.samples)} calls, p50 {1000 * statistics.median(probe.samples):.2f} ms, "
          f"p99 {p99:.2f} ms, "
          f"max {1000 * max(probe.samples):.1f} ms; daemon before {base}, after {after}")
    # Generous: the flooder, dbus-daemon and the daemon share 2 CPUs (p99 28-90 ms seen; before: 6
    # ListVMs in 4 s, up to 0.8 s each)
    assert p99 < 250, f"root's ListVMs p99 {p99:.1f} ms under an unprivileged GetStats flood"
    assert after["fds"] <= base["fds"]
    assert after["rss_kib"] < base["rss_kib"] + 32 * 1024


def test_flood_without_reading_disconnects_mid_call_and_500_connections(daemon: DaemonProcess) -> None:
    """10,000 calls never read, 50 clients gone while their GetStats runs, 500
    connections (as many as the bus lets one uid have): a second client's
    p99 stays low, and afterwards the daemon's fds, threads and memory are
    back near where they were."""
    base = proc_status(daemon.pid)
    with Probe(daemon.address) as probe:
        flooder = RawClient(daemon.address)
        for _ in range(10_000):
            flooder.call("org.kvmnuma1", BIG, "org.kvmnuma1.VM", "GetVcpuAffinity", "u", VCPU0)
        time.sleep(1)
        flooder.close()
        for _ in range(50):
            c = RawClient(daemon.address)
            c.call("org.kvmnuma1", BIG, "org.kvmnuma1.VM", "GetStats")
            c.close()
        conns: list[RawClient] = []
        with contextlib.suppress(OSError, ConnectionError):
            for _ in range(500):
                c = RawClient(daemon.address)
                c.call("org.kvmnuma1", MANAGER_PATH, MANAGER_IFACE, "ListVMs")
                conns.append(c)
        time.sleep(1)
        during = proc_status(daemon.pid)
        for c in conns:
            c.close()
    after = settle(daemon.pid, base)
    p99 = probe.p99_ms()
    print(f"\n10,000 unread calls, 50 disconnects mid-GetStats, {len(conns)} connections held; "
          f"second client's ListVMs: {len(probe.samples)} calls, p99 {p99:.2f} ms, "
          f"max {1000 * max(probe.samples):.1f} ms; daemon before {base}, during {during}, after {after}")
    assert len(conns) >= 200  # the bus's max_connections_per_user (256) is the limit, not the daemon
    # before: the second client got fewer than 2 replies in the whole flood
    assert p99 < 250, f"second client's p99 {p99:.1f} ms"
    assert after["fds"] <= base["fds"]
    assert after["threads"] <= base["threads"] + 1
    assert after["rss_kib"] < base["rss_kib"] + 32 * 1024
    # and it still answers
    client = BusClient(daemon.address)
    try:
        assert [row[0] for row in client.manager("ListVMs")[0]] == ["big"]
    finally:
        client.close()


def test_a_dead_flooders_calls_leave_no_task_in_the_dispatcher(manager: Manager) -> None:
    """The same floods against an in-process service, whose Dispatcher can be
    asked: once the clients are gone, no call, task or worker is left, and
    the calls past the per-connection limit were answered LimitReached at once.
    A bus of its own: the module's daemon owns org.kvmnuma1 on the other."""
    with start_bus_daemon() as bus, run_service(bus.address, manager) as service:
        _dead_flooders(service)


def _dead_flooders(service: RunningService) -> None:
    d = service.service.dispatcher
    vm = service.loop.run(_create(service))
    flooder = RawClient(service.address)
    for _ in range(10_000):
        flooder.call("org.kvmnuma1", vm, "org.kvmnuma1.VM", "GetVcpuAffinity", "u", VCPU0)
    time.sleep(0.5)
    got = flooder.drain(timeout=0.5)
    flooder.close()
    for _ in range(20):
        c = RawClient(service.address)
        c.call("org.kvmnuma1", vm, "org.kvmnuma1.VM", "GetStats")
        c.close()
    wait_until(lambda: d.in_flight()["tasks"] == 0 and d.in_flight()["calls"] == 0,
               "no call left in the dispatcher", timeout=20)
    assert d.pool.wait_idle(10)
    print(f"\n{got} bytes of replies to 10,000 calls; dispatcher after: {d.in_flight()}; "
          f"pool: {d.pool.stats()}")
    assert d.in_flight()["senders"] == 0
    assert d.pool.stats()["queued"] == 0


async def _create(service: RunningService) -> str:
    import asyncio  # noqa: PLC0415

    await asyncio.to_thread(service.manager.create_vm, "small", 1, 4 * MiB, CreateOptions())
    return await service.service.exported_path("small")


if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", __file__]))
