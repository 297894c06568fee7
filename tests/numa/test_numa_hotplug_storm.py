"""A CPU hotplug storm under running VMs (issue 12, item 5).

Offline/online cycles (30 in `make test`, on the 2- and 4-node guests; the issue's 200 are
`make test-numa-storm`, which also takes STORM_CYCLES=N) over random CPUs while
8 VMs run (started, each vCPU through one pass of its payload and then in its
final HLT: a vCPU that looped would make every nested KVM_RUN exit cost the
TCG guest, and the storm would measure that instead).  After each settle
every vCPU thread's Cpus_allowed_list, read from /proc by this process (not
asked of the daemon), must hold online CPUs only: the declared ones that are
online, else the nearest node's.  When a CPU comes
back, so does every placement declared on it.  The daemon's journal and
stderr must show no exception.

Settling is the daemon's own TopologyChanged signal, watched with busctl
monitor: it is sent after the re-pins of the topology it names, so once one
naming the online CPUs sysfs shows has arrived, the placements must already
be right (no sleep, no retry loop on the affinities).  Its wait is bounded.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.busfixtures import busctl
from tests.numa.conftest import Daemon
from tests.numa_guest.hotplug import CPU_SYSFS, CpuHotplug
from tests.observe import BusMonitor, node_cpus, online_cpus, taskset_affinity, thread_affinity
from tests.sysfixtures import Journal
from tests.waiting import wait_until

pytestmark = pytest.mark.numa

ROOT = Path(__file__).resolve().parents[2]
VMS = 8
SEED = 12  # a fixed seed: a failing sequence can be replayed
SETTLE_TIMEOUT = 60.0  # one re-pin of 16 vCPUs takes well under a second even under TCG


DEFAULT_CYCLES = 30
"""What `make test` runs: about 1.25 s and 0.8 s a cycle on the 2- and 4-node guests
of a quiet machine of this kind.  The issue's 200 (some 4 and 3 min) are
``make test-numa-storm``; they kept `make test` over its 30 minutes.  60 took 98 s of a
quiet 2node guest, and 30 took 82 s of a slower one (the 8 VMs' setup is most of it):
the cut shortened `make test` without bringing it under 30 minutes (34 min, 2026-12-02)."""


def _nodes() -> list[int]:
    return sorted(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*"))


def _distances(node: int) -> list[int]:
    return [int(d) for d in Path(f"/sys/devices/system/node/node{node}/distance").read_text().split()]


def _expected(declared: set[int], online: set[int], home: dict[int, int]) -> set[int]:
    """What the kernel must show for a vCPU declared on ``declared``, from sysfs alone:
    its online declared CPUs, else the online CPUs of the node nearest to them.
    ``home`` maps every CPU to its node, read while all were online (a node's
    cpulist in sysfs drops its offline CPUs)."""
    if declared & online:
        return declared & online
    near = _distances(home[min(declared)])
    for node in sorted(_nodes(), key=lambda n: (near[n], n)):
        if cpus := node_cpus(node) & online:
            return cpus
    raise AssertionError("no online CPU")


def _hotpluggable() -> list[int]:
    return sorted(int(p.parent.name[3:]) for p in CPU_SYSFS.glob("cpu[0-9]*/online"))


def _progress(text: str) -> None:
    """To the guest kernel's log, which the launcher keeps (pytest holds our stdout
    until the test ends): where a slow or stuck storm got to."""
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"<4>numa-storm: {text}\n")
    except OSError:
        pass


class _TopologyMonitor(BusMonitor):
    """busctl monitor shown only TopologyChanged (and the Pings its sync needs).

    The plain monitor keeps every VcpuRepinned and PropertiesChanged too, some
    10,000 messages over a storm, and each poll walks them all: under TCG that
    slowed the settles from 0.5 s to over 1 s by cycle 190.
    """

    def __init__(self, address: str, name: str, *, timeout: float = 30) -> None:
        self.address, self.name = address, name
        self.proc = subprocess.Popen(
            ["busctl", f"--address={address}", "--json=short", "monitor",
             "--match=type='signal',interface='org.kvmnuma1.Manager',member='TopologyChanged'",
             "--match=type='method_call',interface='org.freedesktop.DBus.Peer',member='Ping'"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._buf = b""
        self.seen = []
        try:
            self.sync(timeout=timeout, what="busctl monitor (TopologyChanged) to attach")
        except BaseException:
            self.close()
            raise


def _call(address: str, path: str, iface: str, method: str, sig: str, *args: str) -> Any:
    return busctl(address, "call", "org.kvmnuma1", path, iface, method, sig, *args)


def test_hotplug_storm_keeps_vcpus_off_offline_cpus(numa_daemon: Daemon, journald: Journal,
                                                    cpu_offline: CpuHotplug,
                                                    pytestconfig: pytest.Config) -> None:
    cycles = int(pytestconfig.getoption("--storm-cycles") or DEFAULT_CYCLES)
    address, pid = numa_daemon.address, numa_daemon.pid
    _progress("daemon up, creating the VMs")
    cpus = sorted(online_cpus())
    cpu_nodes = [n for n in _nodes() if node_cpus(n)]
    home = {cpu: n for n in cpu_nodes for cpu in node_cpus(n)}
    assert set(home) == set(cpus)
    # Each VM: vCPU 0 pinned to one CPU, vCPU 1 bound to a node; spread so that
    # every CPU and every node with CPUs carries declared placements.
    declared: dict[int, set[int]] = {}  # tid -> declared CPUs
    for i in range(VMS):
        name, path = f"storm{i}", f"/org/kvmnuma1/vm/storm{i}"
        _call(address, "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM", "suta{sv}",
              name, "2", str(2 << 20), "3", "numa_nodes", "u", str(len(cpu_nodes)), "start", "b", "true",
              "passes", "u", "1")
        pin, node = cpus[i % len(cpus)], cpu_nodes[i % len(cpu_nodes)]
        _call(address, path, "org.kvmnuma1.VM", "SetVcpuAffinity", "uau", "0", "1", str(pin))
        _call(address, path, "org.kvmnuma1.VM", "BindVcpuToNumaNode", "uu", "1", str(node))
        tids = dict(busctl(address, "get-property", "org.kvmnuma1", path, "org.kvmnuma1.VM",
                           "VcpuThreads")["data"])
        # a guest node's CPUs are those of the host node the daemon mapped it to:
        # taken from the kernel, and checked to be one whole node of sysfs
        declared[tids[0]], declared[tids[1]] = {pin}, taskset_affinity(tids[1])
        assert declared[tids[1]] in [node_cpus(n) for n in cpu_nodes], f"{name} vCPU 1 bound to a node"
        assert busctl(address, "get-property", "org.kvmnuma1", path, "org.kvmnuma1.VM",
                      "State")["data"] == "running"
    for tid, want in declared.items():
        assert taskset_affinity(tid) == want, f"vCPU thread {tid} before the storm"

    def check(online: set[int], when: str) -> None:
        for tid, want in declared.items():
            allowed = thread_affinity(pid, tid)
            assert allowed <= online, f"{when}: vCPU thread {tid} allowed on offline {allowed - online}"
            assert allowed == _expected(want, online, home), f"{when}: vCPU thread {tid} declared {want}"

    _progress(f"{VMS} VMs running, {len(declared)} vCPUs placed")
    rng = random.Random(SEED)
    candidates = _hotpluggable()
    assert candidates, "no CPU can be taken offline"
    monitor = _TopologyMonitor(address, "org.kvmnuma1")
    settles: list[float] = []
    writes: list[float] = []
    start = time.monotonic()

    def settle(when: str, seen: int) -> None:
        """Until a TopologyChanged sent after ``when``'s write names the online CPUs sysfs shows."""
        online = online_cpus()
        t0 = time.monotonic()
        wait_until(lambda: any(set(m["payload"]["data"][0]) == online
                               for m in monitor.signals("TopologyChanged")[seen:]),
                   f"{when}: TopologyChanged naming CPUs {sorted(online)}",
                   timeout=SETTLE_TIMEOUT, interval=0.05)
        settles.append(time.monotonic() - t0)
        check(online, when)

    try:
        for cycle in range(cycles):
            if cycle % 10 == 0:
                _progress(f"cycle {cycle}/{cycles}, {time.monotonic() - start:.0f} s, "
                          f"settle median {sorted(settles)[len(settles) // 2] if settles else 0:.2f} s")
            # one CPU, or now and then two at once; never the last online CPU of the guest
            count = 2 if len(candidates) > 1 and rng.random() < 0.25 else 1
            offline_now = sorted(rng.sample(candidates, count))
            for online, phase in ((False, "offline"), (True, "online")):
                seen = len(monitor.signals("TopologyChanged"))
                for cpu in offline_now:
                    t0 = time.monotonic()
                    (cpu_offline.online if online else cpu_offline.offline)(cpu)
                    writes.append(time.monotonic() - t0)
                settle(f"cycle {cycle}: cpu{','.join(map(str, offline_now))} {phase}", seen)
        storm_s = time.monotonic() - start
    finally:
        monitor.close()
    # every declared placement is back, seen by taskset too
    for tid, want in declared.items():
        assert taskset_affinity(tid) == want, f"vCPU thread {tid} after the storm"
    for i in range(VMS):
        path = f"/org/kvmnuma1/vm/storm{i}"
        assert busctl(address, "get-property", "org.kvmnuma1", path, "org.kvmnuma1.VM",
                      "State")["data"] == "running", f"storm{i} stopped during the storm"
    # no exception anywhere the daemon writes
    errors = [e["MESSAGE"] for e in journald.entries(f"_PID={pid}", wait_for=0)
              if int(e.get("PRIORITY", 6)) <= 3 or "Traceback" in str(e.get("MESSAGE", ""))]
    assert not errors, f"the daemon logged errors: {errors[:3]}"
    stderr = numa_daemon.stderr.read_text(errors="replace")
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr[-2000:]
    settles.sort()
    writes.sort()
    print(f"hotplug storm: {cycles} cycles, {len(settles)} settles in {storm_s:.0f} s; "
          f"settle median {settles[len(settles) // 2]:.2f} s, max {settles[-1]:.2f} s; "
          f"sysfs write median {writes[len(writes) // 2]:.2f} s, max {writes[-1]:.2f} s")
    for i in range(VMS):
        _call(address, "/org/kvmnuma1", "org.kvmnuma1.Manager", "DestroyVM", "s", f"storm{i}")
