"""Issue 13: how long a guest is paused when the daemon restarts under it.

Two figures, each against a baseline measured in the same run:

- the mechanism, per VM (4 vCPUs, 2 guest nodes, 64 MiB / 256 MiB / 1 GiB,
  every page resident): pause the vCPUs and save their state, tear the old VM
  down as the old process does before exec (its fds, threads, cpusets; its
  guest mapping left in place, for the holder of the old address space to
  unmap after the resume: kvmnumad/holder.py), make it anew on the same
  memfds, restore the vCPUs, re-apply placement and resume: from the first
  vCPU stopped to the VM running again.  The deferred unmap is timed too,
  after the resume, as the holder's exit does it.  Baseline: creating the
  same VM from scratch (create_vm + start), which is what a restart without
  handover costs and which loses the guest's memory besides.
- the whole re-exec of the real daemon (``Reexec()``, 4 vCPUs, 256 MiB): the
  pause as the new process reports it (CLOCK_MONOTONIC from pause to resume,
  the same clock on both sides of exec), split by the log's timestamps into
  the exec with Python's start-up and the restore.  Baseline: a restart
  without handover, from exec of a new daemon until the same VM runs again
  (name owned, CreateVM answered).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.report import Row, median, percentile
from kvmnumad import libc
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions
from kvmnumad.vm import Vm, region
from kvmnumad.vm.saved import Resume

MiB = 1 << 20
VCPUS = 4
SIZES = (64 * MiB, 256 * MiB, 1024 * MiB)
ROOT = Path(__file__).resolve().parents[1]


def _options() -> CreateOptions:
    return CreateOptions(numa_nodes=2, start=True)


def _wait(predicate: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("the guest did not make progress")
        time.sleep(0.02)


def _one_pause(manager: Manager, name: str, size: int) -> tuple[float, float, float, float, float]:
    """(pause, save, teardown, rebuild, deferred unmap) in ms for one handover
    of a running VM.  One Manager plays both processes (two in one process
    would share its cpuset directory): the old VM is torn down as the old
    process's shutdown before Reexec's exec does it (mapping kept), then made
    anew on the memfds; the old mapping goes after the resume."""
    vm = manager.create_vm(name, VCPUS, size, _options())
    _wait(lambda: min(vm.progress()) >= 1)  # every page resident: a pass touched each one
    t0 = time.perf_counter_ns()
    definition = vm.definition()
    saved = vm.pause_for_handover()
    memfds = {slot: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0) for slot, fd in vm.memory.memfds()}
    t1 = time.perf_counter_ns()
    region.defer_unmaps()  # what handover.keep_address_space() does before the shutdown
    try:
        manager.destroy_vm(name)  # threads joined, vCPU and VM fds closed, cpusets gone; mappings kept
    finally:
        kept = region.take_deferred()
    t2 = time.perf_counter_ns()
    back: Vm = manager.restore_vm(definition, None, Resume(memfds, saved))
    t3 = time.perf_counter_ns()
    for hva, length in kept:  # the holder's exit, off the pause
        libc.munmap(hva, length)
    t4 = time.perf_counter_ns()
    _wait(lambda: min(back.progress()) > min(s.progress for s in saved if s is not None))
    manager.destroy_vm(name)
    return (t3 - t0) / 1e6, (t1 - t0) / 1e6, (t2 - t1) / 1e6, (t3 - t2) / 1e6, (t4 - t3) / 1e6


def _one_create(manager: Manager, name: str, size: int) -> float:
    t0 = time.perf_counter_ns()
    manager.create_vm(name, VCPUS, size, _options())
    t1 = time.perf_counter_ns()
    manager.destroy_vm(name)
    return (t1 - t0) / 1e6


def mechanism(runs: int) -> list[Row]:
    rows: list[Row] = []
    manager = Manager()
    try:
        rows = _mechanism(manager, runs)
    finally:
        manager.shutdown()
    return rows


def _mechanism(manager: Manager, runs: int) -> list[Row]:
    rows: list[Row] = []
    for size in SIZES:
        pauses: list[float] = []
        parts: list[tuple[float, float, float, float]] = []
        creates: list[float] = []
        for i in range(runs):  # alternating, so both sides see the same load
            p, s, t, r, u = _one_pause(manager, f"bench-ho-{i}", size)
            pauses.append(p)
            parts.append((s, t, r, u))
            creates.append(_one_create(manager, f"bench-new-{i}", size))
        label = f"{size // MiB} MiB" if size < 1024 * MiB else f"{size // (1024 * MiB)} GiB"
        rows.append(Row(
            f"handover pause per VM, {VCPUS} vCPUs, {label}, median", median(pauses), median(creates), "ms",
            f"{runs} runs; pause = save {median([x[0] for x in parts]):.1f} + teardown "
            f"{median([x[1] for x in parts]):.1f} + rebuild on the same memfds and resume "
            f"{median([x[2] for x in parts]):.1f} ms (medians); after it, off the pause, the old mapping's "
            f"unmap {median([x[3] for x in parts]):.1f} ms; every page resident; baseline: create "
            f"the same VM from scratch (create_vm + start, memory lost); goal < 50 ms, flat in size"))
        rows.append(Row("  same, p99", percentile(pauses, 99), percentile(creates, 99), "ms", "same samples"))
    return rows


# ------------------------------------------------------------------ the whole daemon

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _stamp(line: str) -> float:
    m = _STAMP.match(line)
    if m is None:
        raise ValueError(f"no timestamp in {line!r}")
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _busctl(address: str, *args: str) -> object:
    out = subprocess.run(["busctl", f"--address={address}", "--json=short", *args], capture_output=True,
                         text=True, check=True, timeout=60)
    return json.loads(out.stdout)["data"] if out.stdout.strip() else None


def _owner(address: str) -> str | None:
    out = subprocess.run(["busctl", f"--address={address}", "--json=short", "call", "org.freedesktop.DBus",
                          "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner", "s",
                          "org.kvmnuma1"], capture_output=True, text=True, check=False, timeout=60)
    return str(json.loads(out.stdout)["data"][0]) if out.returncode == 0 else None


_CREATE = ("call", "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM", "suta{sv}", "e2e",
           str(VCPUS), str(256 * MiB), "2", "numa_nodes", "u", "2", "start", "b", "true")


def _start(tmp: Path, log: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    """A new daemon on its own private bus: (process, address, seconds from exec to the name owned)."""
    address_file = tmp / "address"
    address_file.unlink(missing_ok=True)
    t0 = time.monotonic()
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvmnumad", "--address-file", str(address_file),
                                 "--log-target", "stderr"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    _wait(lambda: proc.poll() is not None or address_file.is_file(), 60)
    if proc.poll() is not None:
        raise RuntimeError(f"the daemon ended: {log.read_text()[-2000:]}")
    return proc, address_file.read_text().strip(), time.monotonic() - t0


def whole_daemon(runs: int) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-handover-") as d:
        tmp = Path(d)
        log = tmp / "daemon.log"
        pauses: list[float] = []
        execs: list[float] = []
        restores: list[float] = []
        cold: list[float] = []
        for _ in range(runs):
            # baseline: a restart without handover, exec until the VM runs again
            t0 = time.monotonic()
            proc, address, _ = _start(tmp, log)
            _busctl(address, *_CREATE)
            cold.append((time.monotonic() - t0) * 1000)
            try:
                old = _owner(address)
                mark = len(log.read_text().splitlines())
                _busctl(address, "call", "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "Reexec")
                _wait(lambda a=address, o=old: _owner(a) not in (None, o), 60)
                lines = log.read_text().splitlines()[mark:]
                paused = next(ln for ln in lines if "paused for handover" in ln)
                inherited = next(ln for ln in lines if "inherited" in ln and "fd(s)" in ln)
                resumed = next(ln for ln in lines if "resumed after a daemon restart" in ln)
                m = re.search(r"paused ([\d.]+) ms", resumed)
                assert m is not None
                pauses.append(float(m.group(1)))
                execs.append((_stamp(inherited) - _stamp(paused)) * 1000)
                restores.append((_stamp(resumed) - _stamp(inherited)) * 1000)
            finally:
                proc.terminate()
                proc.wait(30)
        return [Row(
            f"daemon Reexec(), pause of a VM ({VCPUS} vCPUs, 256 MiB), median", median(pauses), median(cold),
            "ms", f"{runs} runs; pause as the new process reports it (CLOCK_MONOTONIC, pause to resume); "
            f"of it: exec + Python start-up + imports {median(execs):.0f} ms, restore "
            f"{median(restores):.0f} ms "
            f"(log timestamps, 1 ms resolution); baseline: a restart without handover, exec of a new daemon "
            f"until the same VM runs again (name owned + CreateVM), its memory lost")]


def handover(runs: int, daemon_runs: int) -> list[Row]:
    return mechanism(runs) + whole_daemon(daemon_runs)


if __name__ == "__main__":
    from bench.report import table
    from kvmnumad.kvm.runner import install_kick_signal

    install_kick_signal()
    quick = "--quick" in sys.argv
    print(table(handover(2 if quick else 7, 1 if quick else 3)))
    os._exit(0)
