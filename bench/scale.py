"""Figure 4: many VMs x 4 vCPUs (halted) in one daemon, under the systemd unit's own limits.

The daemon runs as the unit would: systemd's default LimitNOFILE=1024:524288
and a pids cgroup of DefaultTasksMax (15 % of min(pid_max, threads-max)).
Baselines from the same run: creation and destruction against the bare
ioctl sequence of the same VM (rawkvm, measured a few times and scaled by
the count), RssAnon and idle CPU against the same daemon before any VM
existed, the Manager calls' p99 against the bus driver's GetId interleaved
with them.  With ``limit_hunt`` creation goes on past the count until the
daemon refuses, and the row says which error and after how many VMs.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from bench import rawkvm
from bench.daemonproc import (
    DRIVER,
    MANAGER,
    OBJECT_MANAGER,
    Daemon,
    call,
    ok,
    status_kib,
    unit_limits,
)
from bench.report import Row, median, percentile

VCPUS = 4
OPTS = {"passes": Variant("u", 1), "start": Variant("b", True)}  # OUT, OUT, HLT for good: halted


@dataclass
class Scale:
    count: int
    created: int = 0
    create_s: float = 0.0
    create_ms: list[float] = field(default_factory=list)
    destroy_s: float = 0.0
    rss0_kib: int = 0
    rss_kib: int = 0
    cpu0: float = 0.0
    cpu: float = 0.0
    calls: dict[str, list[float]] = field(default_factory=dict)
    gmo_bytes: int = 0
    refused: str = ""  # the first refusal, with how many VMs existed
    extra: int = 0  # VMs made past ``count`` while hunting for the limit
    fds: int = 0
    tasks: int = 0


def _usage(daemon: Daemon) -> str:
    """What the daemon holds of the limits that could break."""
    pid = daemon.pid
    with open(f"/proc/{pid}/maps", "rb") as f:
        maps = sum(1 for _ in f)
    cgroup = daemon.pids_cgroup()
    pids = (cgroup / "pids.current").read_text().strip() if cgroup is not None else "?"
    max_maps = Path("/proc/sys/vm/max_map_count").read_text().strip()
    return (f"{len(os.listdir(f'/proc/{pid}/task'))} threads, pids.current {pids}, "
            f"{len(os.listdir(f'/proc/{pid}/fd'))} fds, {maps} mappings of vm.max_map_count {max_maps}, "
            f"RssAnon {status_kib(pid, 'RssAnon') // 1024} MiB")


def _cpu_percent(daemon: Daemon, window: float) -> float:
    proc = daemon.process()
    c0 = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(window)
    c1 = proc.cpu_times()
    return float(100 * (c1.user + c1.system - c0.user - c0.system) / (time.monotonic() - t0))


async def _queries(bus: MessageBus, s: Scale, rounds: int) -> None:
    kinds = {
        "GetId": call(DRIVER, "GetId"),
        "ListVMs": call(MANAGER, "ListVMs"),
        "GetTopology": call(MANAGER, "GetTopology"),
        "GetManagedObjects": call(OBJECT_MANAGER, "GetManagedObjects"),
    }
    s.calls = {k: [] for k in kinds}
    for i in range(rounds + 1):
        for key, make in kinds.items():
            t = time.perf_counter_ns()
            reply = await ok(bus, make())
            if i:
                s.calls[key].append((time.perf_counter_ns() - t) / 1e6)
            if key == "GetManagedObjects" and not s.gmo_bytes:
                s.gmo_bytes = len(reply._marshall(False))  # the bytes it took on the wire


async def _run(daemon: Daemon, s: Scale, window: float, rounds: int, *, limit_hunt: int) -> None:
    bus = await MessageBus(bus_address=daemon.address).connect()
    try:
        s.rss0_kib = status_kib(daemon.pid, "RssAnon")
        s.cpu0 = await asyncio.to_thread(_cpu_percent, daemon, window)
        t0 = time.monotonic()
        target = s.count + limit_hunt
        for i in range(target):
            t = time.perf_counter_ns()
            reply = await bus.call(call(MANAGER, "CreateVM", "suta{sv}", [f"s{i:04d}", VCPUS, 0, OPTS])())
            if reply is None or reply.error_name:
                body = reply.body if reply is not None else "no reply"
                s.refused = (f"{reply.error_name if reply else '?'} after {i} VMs "
                             f"({time.monotonic() - t0:.1f} s; {_usage(daemon)}): {body}")
                break
            s.create_ms.append((time.perf_counter_ns() - t) / 1e6)
            s.created = i + 1
            if i + 1 == s.count:
                s.create_s = time.monotonic() - t0
                await asyncio.sleep(2)  # the last vCPUs reach their HLT
                s.rss_kib = status_kib(daemon.pid, "RssAnon")
                s.fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
                s.tasks = len(os.listdir(f"/proc/{daemon.pid}/task"))
                s.cpu = await asyncio.to_thread(_cpu_percent, daemon, window)
                await _queries(bus, s, rounds)
        if s.created < s.count:
            s.create_s = time.monotonic() - t0
        s.extra = max(0, s.created - s.count)
        t1 = time.monotonic()
        for i in range(s.created):
            await ok(bus, call(MANAGER, "DestroyVM", "s", [f"s{i:04d}"])())
        s.destroy_s = time.monotonic() - t1
    finally:
        bus.disconnect()


def _raw_floor(samples: int) -> tuple[float, float]:
    """Median ms to create and to close one bare VM of the same shape (4 vCPUs, 1 MiB boot slot)."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    create: list[float] = []
    close: list[float] = []
    try:
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            raw = rawkvm.RawVm.create(kvm, VCPUS, 0, [], boot=b"\xf4")
            t1 = time.perf_counter_ns()
            raw.close()
            create.append((t1 - t0) / 1e6)
            close.append((time.perf_counter_ns() - t1) / 1e6)
    finally:
        os.close(kvm)
    return median(create), median(close)


def scale(count: int, window: float, rounds: int, *, limit_hunt: int = 0,
          profile: Path | None = None) -> list[Row]:
    nofile, tasks_max = unit_limits()
    raw_create, raw_close = _raw_floor(20)
    s = Scale(count)
    with Daemon(nofile=nofile, tasks_max=tasks_max, profile=profile) as daemon:
        asyncio.run(_run(daemon, s, window, rounds, limit_hunt=limit_hunt))
        log = daemon.log_tail(600)
    n = s.created if s.created < count else count
    unit = (f"the unit's LimitNOFILE={nofile[0]}:{nofile[1]} (hard capped at ours) and TasksMax={tasks_max} "
            "(a pids cgroup)")
    shape = f"{count} VMs x {VCPUS} vCPUs halted"
    if s.created < count:
        return [Row(f"scale: {shape}, created", s.created, count, "VMs",
                    f"under {unit}: stopped at {s.refused or 'an error'}; daemon log: {log[-300:]!r}",
                    higher_is_better=True)]
    tick = 100 * 0.01 / window
    rows = [
        Row(f"scale: {shape}, create all", s.create_s, n * raw_create / 1000, "s",
            f"sequential CreateVM over D-Bus under {unit}; baseline: {n} x the bare ioctl sequence "
            f"({raw_create:.2f} ms each, same run); per call p50 {median(s.create_ms[:n]):.1f} ms, "
            f"first 10 {median(s.create_ms[:10]):.1f} ms, last 10 {median(s.create_ms[n - 10:n]):.1f} ms; "
            f"goal <= 60 s"),
        Row("  daemon private memory (RssAnon)", s.rss_kib / 1024, s.rss0_kib / 1024, "MiB",
            f"with the VMs vs the same daemon before the first; {s.fds} fds, {s.tasks} threads; "
            "goal <= 150 MiB"),
        Row("  daemon CPU while idle", s.cpu, s.cpu0 if s.cpu0 >= tick else None, "% of 1 CPU",
            f"utime+stime (10 ms ticks: resolution {tick:.3f} %) over {window:.0f} s, vs the same daemon "
            f"with no VM ({s.cpu0:.3f} %); goal <= 1 %"),
    ]
    base = s.calls["GetId"]
    for key in ("ListVMs", "GetTopology", "GetManagedObjects"):
        extra = f"; reply {s.gmo_bytes / 1024:,.0f} KiB" if key == "GetManagedObjects" else ""
        rows.append(Row(f"  {key} p99", percentile(s.calls[key], 99), percentile(base, 99), "ms",
                        f"{rounds} calls interleaved with GetId (the baseline's p99); median "
                        f"{median(s.calls[key]):.2f} ms{extra}; goal <= 20 ms"))
    rows.append(Row("  destroy all", s.destroy_s, n * raw_close / 1000 if not s.extra else None, "s",
                    f"sequential DestroyVM of {s.created} VMs; baseline: {n} x closing the bare VM "
                    f"({raw_close:.2f} ms each)"))
    if limit_hunt:
        what = s.refused or f"no refusal within {limit_hunt} more VMs"
        rows.append(Row("  first limit", s.created, count, "VMs", f"creation went on past {count}: {what}",
                        higher_is_better=True))
    return rows


async def _until_refused(address: str, cap: int) -> tuple[int, str, int]:
    """Create VMs until the daemon refuses: (VMs made, error name and message, VMs ListVMs sees after)."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        made, refusal = 0, "no refusal"
        for i in range(cap):
            reply = await bus.call(call(MANAGER, "CreateVM", "suta{sv}", [f"t{i:04d}", VCPUS, 0, OPTS])())
            if reply is None or reply.error_name:
                refusal = f"{reply.error_name}: {reply.body[0]}" if reply is not None else "no reply"
                break
            made += 1
        listed = len((await ok(bus, call(MANAGER, "ListVMs")())).body[0])
        for i in range(made):
            await ok(bus, call(MANAGER, "DestroyVM", "s", [f"t{i:04d}"])())
        return made, refusal, listed
    finally:
        bus.disconnect()


def task_limit(tasks_max: int = 200) -> list[Row]:
    """The first limit that breaks, made small: a daemon under TasksMax=``tasks_max`` is filled
    until it refuses; it must refuse with a typed error and go on serving."""
    nofile, unit_tasks = unit_limits()
    with Daemon(nofile=nofile, tasks_max=tasks_max) as daemon:
        made, refusal, listed = asyncio.run(_until_refused(daemon.address, 10 * tasks_max))
        log = daemon.log_tail(4000)
    expected = (tasks_max - 16 - 8) // (VCPUS + 1)  # RESERVE, about 8 tasks of the daemon's own
    clean = "Traceback" not in log and listed == made
    at_unit = ((unit_tasks or 0) - 16 - 8) // (VCPUS + 1)
    return [Row(f"  first limit: tasks (TasksMax={tasks_max} to find it fast)", made, expected, "VMs",
                f"refused with {refusal[:220]}; ListVMs afterwards answers {listed} VMs, "
                f"{'no traceback in the daemon log' if clean else 'NOT clean: see the daemon log'}; a VM is "
                f"{VCPUS} vCPU threads + KVM's worker task, so the unit's TasksMax={unit_tasks} refuses at "
                f"about {at_unit} VMs (fds at 2 per vCPU + 2 per VM reach LimitNOFILE's 524288 much later)",
                higher_is_better=True)]
