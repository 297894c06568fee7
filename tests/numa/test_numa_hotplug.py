"""CPU hotplug through the running daemon, on a real multi-node kernel.

The daemon runs as its own process on a private bus; the CPU goes offline
through sysfs; the test watches what an admin would: taskset on the vCPU
thread, the signals on the bus (busctl monitor) and the journal
(journalctl -o json with the KVMNUMA_* fields).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.busfixtures import busctl
from tests.numa.conftest import Daemon
from tests.numa_guest.hotplug import CpuHotplug
from tests.observe import BusMonitor, node_cpus, online_cpus, taskset_affinity
from tests.sysfixtures import Journal
from tests.waiting import wait_until

pytestmark = pytest.mark.numa

ROOT = Path(__file__).resolve().parents[2]
REPIN_ID = "98a5b04b200e47faac4bff9ab6350209"
TOPOLOGY_ID = "c52c477987f24cd5bceb6a08d0ad144c"
MIGRATE_ID = "72eb4c393c9a41f5a246177ae2c3a65c"
PIN_ID = "a3cdb94f7a1749019c1e75937f824b8f"
BIND_ID = "2517a41608564c1b96dbd0ebae87f628"


@pytest.fixture(scope="module")
def daemon(numa_daemon: Daemon) -> str:
    """The session's kvmnumad process (conftest), by its bus address."""
    return numa_daemon.address


def _nearest_online(node: int) -> set[int]:
    """Online CPUs of the nearest node (by the kernel's distances) that has any."""
    distances = [int(d) for d in Path(f"/sys/devices/system/node/node{node}/distance").read_text().split()]
    for candidate in sorted(range(len(distances)), key=lambda n: (distances[n], n)):
        exists = Path(f"/sys/devices/system/node/node{candidate}").exists()
        cpus = node_cpus(candidate) & online_cpus() if exists else set()
        if cpus:
            return cpus
    raise AssertionError("no online CPU")


def _call(address: str, path: str, iface: str, method: str, sig: str, *args: str) -> Any:
    return busctl(address, "call", "org.kvmnuma1", path, iface, method, sig, *args)


def test_offline_cpu_repins_vcpu_and_online_restores_it(daemon: str, journald: Journal,
                                                        cpu_offline: CpuHotplug) -> None:
    nodes = sorted(n for n in range(8) if os.path.exists(f"/sys/devices/system/node/node{n}"))
    last = max(n for n in nodes if node_cpus(n))  # a memory-only node has no CPU to take away
    victim = max(node_cpus(last))
    vm = "/org/kvmnuma1/vm/hp"
    _call(daemon, "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM", "suta{sv}",
          "hp", "2", "0", "1", "numa_nodes", "u", str(len(nodes)))
    _call(daemon, vm, "org.kvmnuma1.VM", "SetVcpuAffinity", "uau", "1", "1", str(victim))
    _call(daemon, vm, "org.kvmnuma1.VM", "BindVcpuToNumaNode", "uu", "0", "0")
    threads = busctl(daemon, "get-property", "org.kvmnuma1", vm, "org.kvmnuma1.VM", "VcpuThreads")
    tid = dict(threads["data"])[1]
    assert taskset_affinity(tid) == {victim}
    monitor = BusMonitor(daemon, "org.kvmnuma1")  # returns once the monitor shows a Ping it was sent
    try:
        t0 = time.monotonic()
        cpu_offline.offline(victim)
        expected = _nearest_online(last)
        wait_until(lambda: taskset_affinity(tid) == expected, f"vCPU 1 re-pinned to {sorted(expected)}",
                   timeout=60)
        moved = taskset_affinity(tid)
        reaction = time.monotonic() - t0
        def repins_of_vcpu1() -> list[list[Any]]:
            return [m["payload"]["data"] for m in monitor.signals("VcpuRepinned")
                    if m["payload"]["data"][:2] == ["hp", 1]]

        wait_until(repins_of_vcpu1, "a VcpuRepinned signal for hp vCPU 1", timeout=60)
        sig = repins_of_vcpu1()[0]
        assert sorted(sig[2]) == sorted(moved)
        assert "offline" in sig[3]
        wait_until(lambda: monitor.signals("TopologyChanged"), "a TopologyChanged signal", timeout=60)
        assert victim not in monitor.signals("TopologyChanged")[-1]["payload"]["data"][0]

        cpu_offline.online(victim)
        wait_until(lambda: taskset_affinity(tid) == {victim}, f"vCPU 1 back on CPU {victim}",
                   timeout=60)  # declared pinning returns
        declared = busctl(daemon, "get-property", "org.kvmnuma1", vm, "org.kvmnuma1.VM",
                          "DeclaredVcpuAffinity")
        assert [1, [victim]] in declared["data"]
        wait_until(lambda: len(repins_of_vcpu1()) >= 2, "a second VcpuRepinned signal for hp vCPU 1",
                   timeout=60)
    finally:
        monitor.close()
    repins = journald.entries("KVMNUMA_VM=hp", f"MESSAGE_ID={REPIN_ID}", wait_for=2, timeout=60)
    assert {e["KVMNUMA_VCPU"] for e in repins} == {"1"}
    assert {e["KVMNUMA_REASON"].split()[-1] for e in repins} >= {"offline", "online"}
    assert journald.entries(f"MESSAGE_ID={TOPOLOGY_ID}", wait_for=2, timeout=30)
    pin = journald.entries("KVMNUMA_VM=hp", f"MESSAGE_ID={PIN_ID}", timeout=30)[0]
    assert pin["KVMNUMA_VCPU"] == "1" and pin["KVMNUMA_CPUS"] == str(victim)
    bind = journald.entries("KVMNUMA_VM=hp", f"MESSAGE_ID={BIND_ID}", timeout=30)[0]
    assert bind["KVMNUMA_NODE"] == "0"
    print(f"hotplug re-pin seen from outside {reaction:.2f} s after the offline write")
    _call(daemon, "/org/kvmnuma1", "org.kvmnuma1.Manager", "DestroyVM", "s", "hp")


def test_migration_is_journaled(daemon: str, journald: Journal) -> None:
    vm = "/org/kvmnuma1/vm/mig"
    _call(daemon, "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM", "suta{sv}",
          "mig", "1", str(8 << 20), "2", "numa_nodes", "u", "1", "prealloc", "b", "true")
    _call(daemon, vm, "org.kvmnuma1.VM", "MapNumaNode", "uu", "0", "1")
    entry = journald.entries("KVMNUMA_VM=mig", f"MESSAGE_ID={MIGRATE_ID}", timeout=30)[0]
    assert (entry["KVMNUMA_FROM_NODE"], entry["KVMNUMA_TO_NODE"]) == ("0", "1")
    regions = busctl(daemon, "get-property", "org.kvmnuma1", vm, "org.kvmnuma1.VM", "MemoryRegions")["data"]
    assert [r[4] for r in regions] == [1]
    _call(daemon, "/org/kvmnuma1", "org.kvmnuma1.Manager", "DestroyVM", "s", "mig")
