"""One path per change: a SetVcpuAffinity over D-Bus touches the disk and the
cgroup tree only when something it keeps there changed.

Observed from outside with strace on every thread of the real daemon: the
syscalls that write a state file (openat in the state directory, rename,
fsync) or a cgroup file (openat under /sys/fs/cgroup) are counted while a
client pins a vCPU.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.busfixtures import BusDaemon, busctl
from tests.observe import taskset_affinity
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
VM = "/org/kvmnuma1/vm/pin"


def _owned(address: str) -> bool:
    return "org.kvmnuma1" in busctl(address, "list", "--acquired", json_=False, check=False).stdout


def _pin(address: str, vcpu: int, *cpus: int) -> None:
    busctl(address, "call", "org.kvmnuma1", VM, "org.kvmnuma1.VM", "SetVcpuAffinity", "uau",
           str(vcpu), str(len(cpus)), *map(str, cpus))


def _traced(pid: int, tmp: Path, action: object) -> list[str]:
    """The file syscalls of every daemon thread while ``action()`` runs."""
    log = tmp / f"strace-{os.urandom(4).hex()}"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=openat,rename,renameat,renameat2,fsync",
                               "-o", str(log), "-p", str(pid)], stderr=subprocess.PIPE, text=True)
    try:
        # attached once the tracer shows in every thread's TracerPid
        def attached() -> bool:
            tids = os.listdir(f"/proc/{pid}/task")
            return all(f"TracerPid:\t{tracer.pid}" in Path(f"/proc/{pid}/task/{t}/status").read_text()
                       for t in tids)

        wait_until(attached, "strace attached to every daemon thread", timeout=20)
        action()  # type: ignore[operator]
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=20)
    return log.read_text().splitlines()


def test_an_unchanged_pin_writes_no_state_and_no_cgroup(bus_daemon: BusDaemon, tmp_path: Path) -> None:
    address = bus_daemon.address
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "kvmnumad", "--log-target", "stderr", "--bus", address,
                             "--state-dir", str(state)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _owned(address), "kvmnumad to own org.kvmnuma1", timeout=20)
        busctl(address, "call", "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM",
               "suta{sv}", "pin", "2", "0", "0")
        tids = dict(busctl(address, "get-property", "org.kvmnuma1", VM, "org.kvmnuma1.VM",
                           "VcpuThreads")["data"])
        _pin(address, 0, 0)
        assert taskset_affinity(tids[0]) == {0}

        def writes(lines: list[str]) -> tuple[list[str], list[str]]:
            state_io = [x for x in lines if str(state) in x or re.search(r"\b(rename\w*|fsync)\(", x)]
            cgroup_io = [x for x in lines if "/sys/fs/cgroup" in x]
            return state_io, cgroup_io

        same = writes(_traced(proc.pid, tmp_path, lambda: _pin(address, 0, 0)))
        assert same == ([], []), same
        assert taskset_affinity(tids[0]) == {0}

        # the observer does see writes when the pin changes something
        changed = writes(_traced(proc.pid, tmp_path, lambda: _pin(address, 0, 1)))
        assert changed[0] and changed[1], changed
        assert taskset_affinity(tids[0]) == {1}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out[-3000:]
