"""The optimizer on a real multi-node kernel (issue 14 acceptance: a misplaced VM).

kvmnumad runs as its own process on a private bus with a short sampling
period.  A VM's memory is bound to host node A and its vCPUs are pinned by a
caller to node B; nothing rebalances.  What the daemon reports is checked
against /proc/PID/numa_maps and taskset; the suggestion it makes is applied
exactly as it says (its method and arguments, through busctl), and the
result is checked the same way: locality >= 99 % by numa_maps, the vCPUs on
node A's CPUs by taskset, and a decision recorded for every pin and binding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvmnumad import cpulist
from tests.busfixtures import busctl
from tests.observe import host_nodes, node_cpus, numa_maps_of_slot, taskset_affinity
from tests.waiting import wait_until

pytestmark = pytest.mark.numa

ROOT = Path(__file__).resolve().parents[2]
BUS, MGR, MGR_IFACE, VM_IFACE = "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "org.kvmnuma1.VM"
MiB = 1 << 20


@pytest.fixture
def daemon_pid_address(sampling_daemon: tuple[int, str]) -> tuple[int, str]:
    return sampling_daemon


def call(address: str, path: str, iface: str, method: str, sig: str = "", *args: str) -> Any:
    reply = busctl(address, "call", BUS, path, iface, method, *([sig, *args] if sig else []))
    return None if reply is None else reply["data"]


def prop(address: str, path: str, name: str) -> Any:
    return busctl(address, "get-property", BUS, path, VM_IFACE, name)["data"]


def pages_of(pid: int, name: str, address: str, path: str) -> dict[int, int]:
    pages: dict[int, int] = {}
    for slot, *_ in prop(address, path, "MemoryRegions"):
        for node, n in numa_maps_of_slot(name, slot, pid).pages_per_node.items():
            pages[node] = pages.get(node, 0) + n
    return pages


def test_misplaced_vm_is_reported_suggested_and_fixed(daemon_pid_address: tuple[int, str]) -> None:
    pid, address = daemon_pid_address
    with_cpus = [n for n in sorted(host_nodes()) if node_cpus(n)]
    mem_node, cpu_node = with_cpus[0], with_cpus[1]
    name = "misplaced"
    path = call(address, MGR, MGR_IFACE, "CreateVM", "suta{sv}", name, "2", str(32 * MiB), "4",
                "numa_nodes", "u", "1", "policy", "s", "manual", "host_nodes", "au", "1", str(mem_node),
                "prealloc", "b", "true")[0]
    try:
        call(address, path, VM_IFACE, "Start")
        far = sorted(node_cpus(cpu_node))
        for vcpu in (0, 1):
            call(address, path, VM_IFACE, "SetVcpuAffinity", "uau", str(vcpu), str(len(far)), *map(str, far))
        threads = dict(prop(address, path, "VcpuThreads"))
        assert all(taskset_affinity(t) == set(far) for t in threads.values())

        # Residency as numa_maps has it (memory all on its bound node: locality 1 by the map).
        observed = pages_of(pid, name, address, path)
        total = sum(observed.values())
        assert total == 32 * MiB // 4096 and observed.get(mem_node, 0) == total
        assert prop(address, path, "Residency") == [[0, mem_node, total, 0, 1.0]]
        usage = prop(address, path, "VcpuUsage")
        wait_until(lambda: all(row[4] == cpu_node for row in prop(address, path, "VcpuUsage")),
                   "VcpuUsage to show both vCPUs on their pinned node", timeout=60)
        assert len(usage) == 2

        # One suggestion per vCPU, naming the fix and the exact call.
        actions = [a for a in call(address, MGR, MGR_IFACE, "GetSuggestedActions")[0] if a[0] == name]
        assert len(actions) == 2, actions
        for _vm, kind, text, obj, method, args, now, expected in actions:
            assert (kind, obj, method) == ("remote-memory", path, "BindVcpuToNumaNode")
            assert [a["data"] for a in args][1] == 0 and now == 0.0 and expected == 1.0
            assert f"call BindVcpuToNumaNode({args[0]['data']}, 0)" in text
            assert f"host node {mem_node}" in text
            # Applied exactly as suggested.
            sig = "".join(a["type"] for a in args)
            call(address, obj, VM_IFACE, method, sig, *(str(a["data"]) for a in args))

        near = node_cpus(mem_node)
        for vcpu, tid in threads.items():
            assert taskset_affinity(tid) <= near, vcpu
        observed = pages_of(pid, name, address, path)
        assert observed.get(mem_node, 0) / sum(observed.values()) >= 0.99
        assert not [a for a in call(address, MGR, MGR_IFACE, "GetSuggestedActions")[0] if a[0] == name]

        # Every pin and binding in force has its decision, naming its rule.
        decisions = {row[0]: row for row in call(address, path, VM_IFACE, "GetDecisions")[0]}
        assert decisions["guest node 0"][2] == "manual"
        assert decisions["guest node 0"][3] == f"host node(s) {mem_node} (bind)"
        for vcpu, cpus in prop(address, path, "DeclaredVcpuAffinity"):
            want = ["caller", "caller-bind", f"CPUs {cpulist.describe(cpus)}"]
            assert decisions[f"vcpu {vcpu}"][1:4] == want
            assert f"host node {mem_node}" in decisions[f"vcpu {vcpu}"][4]
        wait_until(lambda: all(row[4] == mem_node for row in prop(address, path, "VcpuUsage")),
                   "VcpuUsage to follow the vCPUs to the memory's node", timeout=60)
    finally:
        call(address, MGR, MGR_IFACE, "DestroyVM", "s", name)

