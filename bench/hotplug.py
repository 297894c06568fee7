"""Figure 3: hotplug reaction, in a multi-node guest (never on the host: its CPUs are shared).

8 VMs x 4 vCPUs, policy local-first, bound to the node of the last CPU, in
the real daemon over a private bus.  Each round offlines that CPU and polls
every vCPU thread's ``/proc/PID/task/TID/status`` (Cpus_allowed_list, by
pread on fds opened once) in a tight loop until all have left it and none
changed for SETTLE s: the re-pin time is the last change of any thread.
Then the CPU comes back and the daemon's re-pin back is awaited the same way.

Floor, same guest, same rounds: a bare pyudev monitor (source ``kernel``,
subsystem ``cpu``) in this process, timed to its receipt of the offline
uevent.  Both are timed from the start of the offline write; the goal is
from its return.  numad (Debian ``numad``), when installed: a plain process
with 32 threads pinned to that CPU, numad running, the CPU offlined; the
row says how many threads numad re-pinned within the window.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyudev
from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from bench.daemonproc import MANAGER, Daemon, call, ok
from bench.report import Row, median, percentile
from tests.observe import parse_cpulist

VMS = 8
VCPUS = 4
SETTLE = 0.3  # s without any change: the re-pin is over
CPU_SYSFS = Path("/sys/devices/system/cpu")


def _set_online(cpu: int, online: bool) -> tuple[int, int]:
    """(start, end) of the sysfs write, perf_counter ns."""
    t0 = time.perf_counter_ns()
    (CPU_SYSFS / f"cpu{cpu}" / "online").write_text("1" if online else "0")
    return t0, time.perf_counter_ns()


class _Poller:
    """Cpus_allowed_list of many threads, read by pread on fds opened once."""

    def __init__(self, pid: int, tids: list[int]) -> None:
        self.fds = [os.open(f"/proc/{pid}/task/{t}/status", os.O_RDONLY) for t in tids]

    def read(self) -> list[frozenset[int]]:
        out = []
        for fd in self.fds:
            text = os.pread(fd, 4096, 0)
            i = text.index(b"Cpus_allowed_list:")
            out.append(frozenset(parse_cpulist(text[i + 18:text.index(b"\n", i)].decode())))
        return out

    def last_change(self, done: frozenset[int] | None, away: int | None, timeout: float = 20.0) -> int:
        """perf_counter ns of the last change of any thread, once every mask satisfies the
        condition (== ``done``, or without CPU ``away``) and nothing changed for SETTLE s."""
        last = self.read()
        t_last = time.perf_counter_ns()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.read()
            t = time.perf_counter_ns()
            if now != last:
                last, t_last = now, t
            ok_ = all(m == done for m in now) if done is not None else all(away not in m for m in now)
            if ok_ and (t - t_last) > SETTLE * 1e9:
                return t_last
        raise TimeoutError(f"vCPU threads not re-pinned within {timeout} s: {sorted(map(sorted, last))}")

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class _UdevFloor:
    """A bare pyudev monitor (source kernel, subsystem cpu) on its own thread."""

    def __init__(self) -> None:
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self.monitor.filter_by("cpu")
        self.monitor.start()
        self.seen: list[tuple[int, str]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            dev = self.monitor.poll(timeout=0.2)
            if dev is not None:
                self.seen.append((time.perf_counter_ns(), dev.action or ""))

    def first_after(self, t0: int, action: str, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, a in self.seen:
                if t >= t0 and a == action:
                    return t
            time.sleep(0.001)
        raise TimeoutError(f"no {action} uevent")

    def close(self) -> None:
        self._stop = True
        self._thread.join()


async def _setup(address: str, node: int) -> MessageBus:
    bus = await MessageBus(bus_address=address).connect()
    opts = {"numa_nodes": Variant("u", 1), "host_nodes": Variant("au", [node]),
            "policy": Variant("s", "local-first"), "passes": Variant("u", 1), "start": Variant("b", True)}
    for i in range(VMS):
        await ok(bus, call(MANAGER, "CreateVM", "suta{sv}", [f"hp{i}", VCPUS, 4 << 20, opts])())
    return bus


def _node_of(cpu: int) -> int:
    return int(next((CPU_SYSFS / f"cpu{cpu}").glob("node[0-9]*")).name[4:])


def _helper(cpu: int) -> tuple[subprocess.Popen[str], list[int]]:
    """A plain process with VMS x VCPUS blocked threads pinned to ``cpu``."""
    helper = subprocess.Popen(
        [sys.executable, "-c", "import os, threading\n"
         f"os.sched_setaffinity(0, {{{cpu}}})\nev = threading.Event()\n"
         f"ts = [threading.Thread(target=ev.wait) for _ in range({VMS * VCPUS})]\n"
         "[t.start() for t in ts]\nprint(' '.join(str(t.native_id) for t in ts), flush=True)\n"
         "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert helper.stdout is not None
    return helper, [int(t) for t in helper.stdout.readline().split()]


def _off_cpu(cpu: int, numad: str | None, window: float) -> tuple[int, float, str]:
    """Offline ``cpu`` under the helper (numad running when given): (threads off it within
    ``window``, ms from the write's start to the last of them moving or -1, the masks seen)."""
    helper, tids = _helper(cpu)
    started = False
    masks: list[frozenset[int]] = []
    try:
        if numad is not None:
            # numad daemonizes; -i 1:1: scan every second, -p: the helper is on its list; -i 0 stops it
            subprocess.run([numad, "-i", "1:1", "-l", "3", "-p", str(helper.pid)], check=True)
            started = True
            time.sleep(3)
        poller = _Poller(helper.pid, tids)
        w0, _ = _set_online(cpu, False)
        moved, when = 0, -1.0
        try:
            deadline = time.monotonic() + window
            while time.monotonic() < deadline:
                masks = poller.read()
                now = sum(cpu not in m for m in masks)
                if now != moved:
                    moved, when = now, (time.perf_counter_ns() - w0) / 1e6
                if moved == len(tids):
                    break
                time.sleep(0.02)
        finally:
            _set_online(cpu, True)
            poller.close()
        seen = ", ".join(sorted({",".join(map(str, sorted(m))) for m in masks}))
        return moved, when, seen
    finally:
        if started and numad is not None:
            subprocess.run([numad, "-i", "0"], check=False)
        helper.kill()
        helper.wait()


def _numad(cpu: int, window: float) -> list[Row]:
    kernel, k_ms, k_seen = _off_cpu(cpu, None, window)
    rows = [Row("  kernel alone, plain process: threads off the CPU", kernel, VMS * VCPUS, "threads",
                f"{VMS * VCPUS} blocked threads of a plain process pinned to cpu{cpu}, cpu{cpu} offlined, "
                f"no daemon: {kernel} moved by the kernel within {window:.0f} s (last at {k_ms:.0f} ms after "
                f"the write's start) to CPUs {{{k_seen}}}", higher_is_better=True)]
    exe = shutil.which("numad")
    if exe is None:
        return [*rows, Row("  numad, threads re-pinned", None, VMS * VCPUS, "threads",
                           "numad not installed (apt numad: make bench installs it)")]
    moved, ms, seen = _off_cpu(cpu, exe, window)
    rows.append(Row("  with numad running, threads off the CPU", moved, VMS * VCPUS, "threads",
                    f"the same with `numad -i 1:1 -p PID` running: {moved} off cpu{cpu} within "
                    f"{window:.0f} s (last at {ms:.0f} ms) to CPUs {{{seen}}}; numad's own share is the "
                    "difference to the row above", higher_is_better=True))
    return rows


def hotplug(rounds: int, numad_window: float) -> list[Row]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) < 2:
        return [Row("hotplug re-pin (8 VMs x 4 vCPUs)", None, None, "ms",
                    "needs a multi-node guest: run `python -m bench.guest` (boots the 4-node QEMU guest)")]
    cpu = cpus[-1]
    node = _node_of(cpu)
    k_start: list[float] = []
    k_end: list[float] = []
    floor: list[float] = []
    writes: list[float] = []
    back: list[float] = []
    udev = _UdevFloor()
    try:
        with Daemon() as daemon:
            loop = asyncio.new_event_loop()
            bus = loop.run_until_complete(_setup(daemon.address, node))
            tids = [int(t) for t in os.listdir(f"/proc/{daemon.pid}/task")
                    if Path(f"/proc/{daemon.pid}/task/{t}/comm").read_text().startswith("vcpu")]
            poller = _Poller(daemon.pid, tids)
            pinned = poller.read()
            if len(tids) != VMS * VCPUS or any(m != pinned[0] for m in pinned) or cpu not in pinned[0]:
                raise RuntimeError(f"vCPUs not all pinned to node {node}: {sorted(map(sorted, set(pinned)))}")
            try:
                for _ in range(rounds):
                    w0, w1 = _set_online(cpu, False)
                    done = poller.last_change(None, cpu)
                    floor.append((udev.first_after(w0, "offline") - w0) / 1e6)
                    k_start.append((done - w0) / 1e6)
                    k_end.append((done - w1) / 1e6)
                    writes.append((w1 - w0) / 1e6)
                    o0, _ = _set_online(cpu, True)
                    back.append((poller.last_change(pinned[0], None) - o0) / 1e6)
            finally:
                if (CPU_SYSFS / f"cpu{cpu}" / "online").read_text().strip() != "1":
                    _set_online(cpu, True)
                poller.close()
                bus.disconnect()
                loop.close()
        numad_rows = _numad(cpu, numad_window)
    finally:
        udev.close()
    shape = f"{VMS} VMs x {VCPUS} vCPUs local-first on node {node}, cpu{cpu} offlined"
    return [
        Row(f"hotplug re-pin ({shape}), p50", median(k_start), median(floor), "ms",
            f"{rounds} rounds; from the start of the offline write to the last vCPU thread's change in "
            "/proc/PID/task/TID/status, vs a bare pyudev monitor (source kernel) receiving the offline "
            f"uevent; the write itself takes {median(writes):.1f} ms (p50)"),
        Row("  same, p99", percentile(k_start, 99), percentile(floor, 99), "ms", "same rounds"),
        Row("  from the write's return, p99", percentile(k_end, 99), None, "ms",
            f"p50 {median(k_end):.1f} ms; goal p99 <= 5 ms"),
        Row("  re-pin back after online, p50", median(back), None, "ms",
            "from the start of the online write until every thread is on its node again"),
        *numad_rows,
    ]
