"""The optimizer's first half (issue 14) against the real daemon, from outside.

kvmnumad runs as its own process on its own private bus, sampling every
0.5 s.  What it reports is checked against what the kernel says to someone
else: residency against /proc/PID/numa_maps, vCPU figures against
/proc/PID/task/TID/schedstat, affinity against taskset, decisions against
journalctl -o json, the metrics endpoint by an HTTP scrape and psutil's view
of the daemon's sockets.  Every read goes through busctl --json=short.  The
misplaced-VM acceptance needs two nodes: tests/numa/test_numa_optimizer.py.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from kvmnumad import cpulist, placement
from kvmnumad.model import Policy
from kvmnumad.numa.topology import synthetic
from kvmnumad.optimizer import suggest
from kvmnumad.optimizer.model import Residency, VcpuSample, VmSample
from kvmnumad.optimizer.sample import busy_fractions
from tests.busfixtures import DaemonProcess, busctl, daemon_process
from tests.observe import BusMonitor, numa_maps_of_slot, online_cpus, taskset_affinity
from tests.sysfixtures import Journal
from tests.waiting import wait_until

pytest_plugins = ["tests.sysfixtures"]

ROOT = Path(__file__).resolve().parent.parent
BUS = "org.kvmnuma1"
MGR, MGR_IFACE, VM_IFACE = "/org/kvmnuma1", "org.kvmnuma1.Manager", "org.kvmnuma1.VM"
PERIOD = 0.5
MiB = 1 << 20
DECISION_ID = "8bf6b4d99a53451088e33cb752e8230a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, journald: Journal, port: int) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("optimizer")
    (tmp / "config").mkdir()
    with daemon_process("kvmnumad", tmp, "--bus", "private", "--config-dir", str(tmp / "config"),
                        "--sample-interval", str(PERIOD), "--metrics-address", f"127.0.0.1:{port}",
                        "--metrics-textfile", str(tmp / "kvmnumad.prom"), "--log-target", "journal") as d:
        yield d


@pytest.fixture
def vm(daemon: DaemonProcess) -> Iterator[tuple[str, str]]:
    """A running VM, all memory faulted in (prealloc), local-first; (name, path)."""
    name = f"opt{int(time.time() * 1000) % 10**9}"
    path = call(daemon, MGR, MGR_IFACE, "CreateVM", "suta{sv}", name, "2", str(64 * MiB), "3",
                "numa_nodes", "u", "1", "policy", "s", "local-first", "prealloc", "b", "true")[0]
    call(daemon, path, VM_IFACE, "Start", "")
    try:
        yield name, path
    finally:
        call(daemon, MGR, MGR_IFACE, "DestroyVM", "s", name)


def call(d: DaemonProcess, path: str, iface: str, method: str, sig: str, *args: str) -> Any:
    reply = busctl(d.address, "call", BUS, path, iface, method, *([sig, *args] if sig else []))
    return None if reply is None else reply["data"]


def prop(d: DaemonProcess, path: str, iface: str, name: str) -> Any:
    return busctl(d.address, "get-property", BUS, path, iface, name)["data"]


def schedstat(pid: int, tid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    return int(fields[0]), int(fields[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def slot_pages(d: DaemonProcess, name: str, path: str) -> dict[int, int]:
    pages: dict[int, int] = {}
    for slot, *_ in prop(d, path, VM_IFACE, "MemoryRegions"):
        for node, n in numa_maps_of_slot(name, slot, d.pid).pages_per_node.items():
            pages[node] = pages.get(node, 0) + n
    return pages


# ------------------------------------------------------------------ measurements


def test_residency_matches_numa_maps(daemon: DaemonProcess, vm: tuple[str, str]) -> None:
    name, path = vm
    observed = slot_pages(daemon, name, path)
    assert sum(observed.values()) == 64 * MiB // 4096  # prealloc: every page resident
    (home,) = prop(daemon, path, VM_IFACE, "NodeMap")
    rows = prop(daemon, path, VM_IFACE, "Residency")
    there = observed.get(home, 0)
    total = sum(observed.values())
    assert rows == [[0, home, there, total - there, pytest.approx(there / total)]]
    nodes = {row[0]: row for row in prop(daemon, MGR, MGR_IFACE, "HostNodeUsage")}
    assert set(nodes[home][1]) <= online_cpus()
    assert nodes[home][4] >= there  # our VMs' pages on the node: this one's at least
    assert 0.0 <= nodes[home][2] <= 1.0


def test_vcpu_usage_matches_schedstat_and_stat(daemon: DaemonProcess, vm: tuple[str, str]) -> None:
    _name, path = vm
    time.sleep(3 * PERIOD)  # a sample after the start
    threads = dict(prop(daemon, path, VM_IFACE, "VcpuThreads"))
    rows = prop(daemon, path, VM_IFACE, "VcpuUsage")
    assert [r[0] for r in rows] == sorted(threads)
    for vcpu, cpu_ns, delay_ns, cpu, node, migrations in rows:
        now_ns, now_delay = schedstat(daemon.pid, threads[vcpu])
        assert 0 < cpu_ns <= now_ns and 0 <= delay_ns <= now_delay  # counters only grow, sampled earlier
        assert cpu in online_cpus() and node == 0
        sched = Path(f"/proc/{daemon.pid}/task/{threads[vcpu]}/sched").read_text()
        assert migrations <= int(re.search(r"se\.nr_migrations\s*:\s*(\d+)", sched).group(1))  # type: ignore[union-attr]


def test_properties_change_at_most_once_per_period_and_only_what_changed(
        daemon: DaemonProcess, vm: tuple[str, str]) -> None:
    _name, path = vm
    with BusMonitor(daemon.address, BUS) as mon:
        time.sleep(8 * PERIOD)
        mon.sync()
        changes = [m for m in mon.signals("PropertiesChanged") if m.get("path") == path]
    assert changes, "a running VM's CPU time moves: VcpuUsage must change"
    assert len(changes) <= 8 + 2
    for m in changes:
        changed = m["payload"]["data"][1]
        assert set(changed) <= {"VcpuUsage", "Residency"}, changed
        assert "Residency" not in changed  # all pages were resident before the first sample: unchanged


def test_every_read_renders_with_busctl_json(daemon: DaemonProcess, vm: tuple[str, str]) -> None:
    _name, path = vm
    for method in ("GetStats", "GetDecisions"):
        assert busctl(daemon.address, "call", BUS, path, VM_IFACE, method)["data"]
    for method in ("GetSuggestedActions", "GetSuggestions", "GetReport", "GetTopology"):
        assert busctl(daemon.address, "call", BUS, MGR, MGR_IFACE, method) is not None
    for p, iface in ((path, VM_IFACE), (MGR, MGR_IFACE)):
        out = subprocess.run(["busctl", f"--address={daemon.address}", "--json=short", "introspect", BUS, p,
                              iface], capture_output=True, text=True, check=True)
        assert out.stdout
    stats = busctl(daemon.address, "call", BUS, path, VM_IFACE, "GetStats")
    assert stats["type"] == "a(st)a(uutia(st)t)a(ut)t"


def test_report_has_residency_and_run_delay(daemon: DaemonProcess, vm: tuple[str, str]) -> None:
    name, _path = vm
    (text,) = call(daemon, MGR, MGR_IFACE, "GetReport", "")
    assert re.search(r"residency guest node 0: 16384 pages on host node \d+, 0 elsewhere, "
                     r"locality 100\.0%", text)
    assert re.search(r"vcpu 0: cpus [\d,-]+ on cpu \d+ \(node \d+\), cpu time [\d.]+ s, "
                     r"run delay [\d.]+ s", text)
    assert name in text


# ------------------------------------------------------------------ explanations


def test_every_pin_and_binding_has_a_decision_naming_its_rule(
        daemon: DaemonProcess, vm: tuple[str, str], journald: Journal) -> None:
    name, path = vm
    target = sorted(online_cpus())[-1]
    call(daemon, path, VM_IFACE, "SetVcpuAffinity", "uau", "0", "1", str(target))
    decisions = {row[0]: row for row in call(daemon, path, VM_IFACE, "GetDecisions", "")[0]}
    declared = dict(prop(daemon, path, VM_IFACE, "DeclaredVcpuAffinity"))
    for vcpu, cpus in declared.items():
        assert cpus, "local-first pins every vCPU"
        placement_ = decisions[f"vcpu {vcpu}"][3]
        assert placement_ == f"CPUs {cpulist.describe(cpus)}"
        assert set(cpus) == taskset_affinity(dict(prop(daemon, path, VM_IFACE, "VcpuThreads"))[vcpu])
    assert decisions["vcpu 0"][1:3] == ["caller", "caller-pin"]
    assert decisions["vcpu 1"][1:3] == ["policy", "local-first"]
    assert "follows guest node 0" in decisions["vcpu 1"][4]
    (home,) = prop(daemon, path, VM_IFACE, "NodeMap")
    g0 = decisions["guest node 0"]
    assert g0[2] == "local-first" and g0[3].startswith(f"host node(s) {home}")
    assert re.search(r"host node \d+: [\d.]+ (GiB|MiB) free >= 64 MiB needed", g0[4]), g0[4]

    entries = journald.entries(f"MESSAGE_ID={DECISION_ID}", f"KVMNUMA_VM={name}", wait_for=4)
    rules = {(e.get("KVMNUMA_VCPU"), e["KVMNUMA_RULE"]) for e in entries}
    assert {("0", "caller-pin"), ("1", "local-first"), (None, "local-first")} <= rules
    assert all(e["KVMNUMA_EVENT"] == "decision" for e in entries)

    out = subprocess.run([sys.executable, "-m", "kvmnumad.cli", "--bus", daemon.address, "explain", name],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=True).stdout
    assert "caller-pin" in out and "local-first" in out and "guest node 0" in out and "vcpu 1" in out
    missing = subprocess.run([sys.executable, "-m", "kvmnumad.cli", "--bus", daemon.address, "explain",
                              "nope"], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert missing.returncode == 1 and "nope" in missing.stderr


# ------------------------------------------------------------------ metrics


def test_metrics_scrape_agrees_with_numa_maps_and_taskset(
        daemon: DaemonProcess, vm: tuple[str, str], port: int,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    name, path = vm
    threads = dict(prop(daemon, path, VM_IFACE, "VcpuThreads"))
    call(daemon, path, VM_IFACE, "SetVcpuAffinity", "uau", "1", "1", str(sorted(online_cpus())[0]))
    observed = slot_pages(daemon, name, path)

    def agrees() -> bool:
        m = scrape(port)
        resident = {int(k.split('node="')[2].split('"')[0]): v for k, v in m.items()
                    if k.startswith("kvmnumad_vm_resident_bytes{") and f'vm="{name}"' in k}
        allowed: dict[int, set[int]] = {}
        for k in m:
            if k.startswith("kvmnumad_vcpu_allowed_cpu_info{") and f'vm="{name}"' in k:
                cpu, vcpu = re.search(r'cpu="(\d+)",vcpu="(\d+)"', k).groups()  # type: ignore[union-attr]
                allowed.setdefault(int(vcpu), set()).add(int(cpu))
        return (resident == {n: p * 4096.0 for n, p in observed.items()}
                and allowed == {v: taskset_affinity(t) for v, t in threads.items()})

    wait_until(agrees, "a scrape that agrees with numa_maps and taskset", timeout=10)
    m = scrape(port)
    assert m["kvmnumad_samples_total"] >= 1
    assert any(k.startswith("kvmnumad_vcpu_cpu_seconds_total{") for k in m)
    assert any(k.startswith('kvmnumad_node_memory_free_bytes{node="0"}') for k in m)
    textfiles = list(Path(tmp_path_factory.getbasetemp()).glob("optimizer*/kvmnumad.prom"))
    assert textfiles and "kvmnumad_vm_resident_bytes" in textfiles[0].read_text()


def test_no_metrics_endpoint_unless_configured(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with daemon_process("kvmnumad", tmp_path / "a", "--bus", "private", "--config-dir", str(config)) as d:
        inet = psutil.Process(d.pid).net_connections(kind="inet")
        assert inet == [], inet
    (config / "kvmnumad.conf").write_text(f"[kvmnumad]\nmetrics-address = 127.0.0.1:{_free_port()}\n")
    with daemon_process("kvmnumad", tmp_path / "b", "--bus", "private", "--config-dir", str(config)) as d:
        listening = [c for c in psutil.Process(d.pid).net_connections(kind="inet") if c.status == "LISTEN"]
        assert len(listening) == 1 and listening[0].laddr.ip == "127.0.0.1"


def test_no_sampling_without_a_vm(daemon: DaemonProcess, port: int) -> None:
    for name, _state, _path in call(daemon, MGR, MGR_IFACE, "ListVMs", "")[0]:
        call(daemon, MGR, MGR_IFACE, "DestroyVM", "s", name)
    time.sleep(2 * PERIOD)
    before = scrape(port)["kvmnumad_samples_total"]
    time.sleep(6 * PERIOD)
    assert scrape(port)["kvmnumad_samples_total"] == before


# ------------------------------------------------------------------ pure rules


def test_suggestion_moves_a_remote_vcpu_to_its_memory() -> None:
    topo = synthetic({0: [0, 1], 1: [2, 3]})
    res = Residency(0, 0, {0: 990, 1: 10})
    far = VcpuSample(0, 100, 0, 1, 0, 2, 1, 0, frozenset({2, 3}))
    near = VcpuSample(1, 101, 0, 1, 0, 0, 0, 0, frozenset({0, 1}))
    vm = VmSample("web", True, (0,), (res,), (far, near))
    (s,) = suggest.suggest([vm], topo)
    assert (s.method, s.args) == ("BindVcpuToNumaNode", (("u", 0), ("u", 0)))
    assert s.locality_now == pytest.approx(0.01) and s.locality_expected == pytest.approx(0.99)
    assert "BindVcpuToNumaNode(0, 0)" in s.text() and "1% -> 99%" in s.text()
    # Guest NUMA off (or the guest node mapped elsewhere): pin to the memory's node instead.
    (s,) = suggest.suggest([VmSample("web", False, (), (Residency(0, 1, {0: 5}),), (far,))], topo)
    assert (s.method, s.args) == ("SetVcpuAffinity", (("u", 0), ("au", [0, 1])))
    assert suggest.suggest([VmSample("web", True, (0,), (res,), (near,))], topo) == []


def test_busy_fractions_from_cpu_times() -> None:
    class T(tuple[float, float, float]):  # user, idle, iowait
        idle = property(lambda self: self[1])
        iowait = property(lambda self: self[2])

    assert busy_fractions([T((10.0, 10.0, 0.0))], [T((13.0, 11.0, 0.0))]) == {0: pytest.approx(0.75)}
    assert busy_fractions(None, [T((1.0, 3.0, 0.0))]) == {0: pytest.approx(0.25)}
    assert busy_fractions([T((1.0, 1.0, 0.0))], [T((1.0, 1.0, 0.0))]) == {0: 0.0}


def test_plan_says_why_with_its_numbers() -> None:
    topo = synthetic({0: [0, 1], 1: [2, 3]}, mem_free={0: 4 << 30, 1: 3 << 30})
    load = placement.Load(cpu={0: 0.93, 1: 0.93})
    p = placement.plan(topo, load, placement.PlacementRequest(2, 1 << 30, 1, Policy.LOCAL_FIRST))
    (node,) = p.nodes
    assert node.host_nodes == (1,)
    assert node.why.startswith("host node 1: 3.0 GiB free >= 1.0 GiB needed")
    assert "node 0: 4.0 GiB free, busy 0.93, pressure 0.93" in node.why
    assert all(v.why == "follows guest node 0 to host node 1: its CPUs 2-3" for v in p.vcpus)


def test_hotplug_repins_record_their_rule_and_the_declared_pin_returns() -> None:
    """A CPU going offline as the topology reader says (the real one needs the
    multi-node guest: tests/numa/test_numa_hotplug.py); the re-pin is real
    (taskset), and so must be its decision."""
    from kvmnumad.manager import Manager  # noqa: PLC0415
    from kvmnumad.model import CreateOptions  # noqa: PLC0415

    shapes = {"up": synthetic({0: [0, 1]}), "down": synthetic({0: [0, 1]}, offline={1})}
    now = ["up"]
    m = Manager(topology_reader=lambda: shapes[now[0]])
    try:
        vm = m.create_vm("hot", 1, 0, CreateOptions(policy=Policy.MANUAL))
        vm.set_vcpu_affinity(0, [1])
        (tid,) = (t for _, t in vm.vcpu_threads())
        assert [(d.subject, d.rule) for d in m.explain("hot")] == [("vcpu 0", "caller-pin")]
        now[0] = "down"
        m.on_topology_changed("test: cpu1 offline")
        (d,) = m.explain("hot")
        assert (d.kind, d.rule, d.placement) == ("hotplug", "hotplug-nearest-node", "CPUs 0")
        assert "declared CPUs 1" in d.reason and "cpu1 offline" in d.reason
        assert taskset_affinity(tid) == {0}
        now[0] = "up"
        m.on_topology_changed("test: cpu1 online")
        (d,) = m.explain("hot")
        assert (d.rule, d.placement) == ("hotplug-declared-online", "CPUs 1")
        assert taskset_affinity(tid) == {1}
        m.destroy_vm("hot")
        assert m.decisions.of_vm("hot") == []
    finally:
        m.shutdown()
