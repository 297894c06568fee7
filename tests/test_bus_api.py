"""org.kvmnuma1 through a real dbus-daemon: every method and property, by
dbus-fast and at least once by busctl, each effect read back by an observer
other than kvmnumad (taskset, /proc numa_maps, busctl, the signals on the bus).

The service runs in this process (its own loop thread) with a real Manager on
/dev/kvm; the host has one NUMA node, so guest nodes all map to host node 0.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, Variant

import kvmnumad
from kvmnumad.bus.paths import vm_path
from kvmnumad.bus.service import BUS_NAME, NameUnavailable
from tests.busfixtures import (
    MANAGER_IFACE,
    MANAGER_PATH,
    OM_IFACE,
    PROPS_IFACE,
    VM_IFACE,
    BusClient,
    MiB,
    RunningService,
    busctl,
    options,
    plain,
    run_service,
)
from tests.observe import (
    NumaMapsEntry,
    host_nodes,
    node_cpus,
    numa_maps,
    online_cpus,
    taskset_affinity,
    thread_affinity,
)
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures"]  # bus_daemon, service, client
ROOT = Path(__file__).resolve().parent.parent


def region_entry(vm: str, slot: int) -> NumaMapsEntry:
    """The numa_maps line of a VM's memory slot in this process (the service
    runs here), found by its memfd's name: the bus does not say where the
    daemon maps guest memory."""
    name = re.compile(rf"memfd:kvmnumad-{re.escape(vm)}-node\d+-slot{slot}(?!\d)")
    (entry,) = [e for e in numa_maps() if e.file and name.search(e.file)]
    return entry


def create(client: BusClient, name: str, vcpus: int = 2, memory: int = 4 * MiB, **opts: Any) -> str:
    (path,) = client.manager("CreateVM", "suta{sv}", name, vcpus, memory, options(**opts))
    return str(path)


def is_signal(path: str, iface: str, member: str) -> Any:
    return lambda m: m.path == path and m.interface == iface and m.member == member


def changed(path: str, prop: str, value: Any = None) -> Any:
    """A PropertiesChanged of VM ``path`` carrying ``prop`` (with ``value``)."""

    def match(m: Message) -> bool:
        if m.path != path or m.member != "PropertiesChanged" or m.body[0] != VM_IFACE:
            return False
        props = m.body[1]
        return prop in props and (value is None or plain(props[prop]) == value)

    return match


# ------------------------------------------------------------------- manager
def test_manager_properties_and_topology(service: RunningService, client: BusClient) -> None:
    props = client.get_all(MANAGER_PATH, MANAGER_IFACE)
    assert props["Version"] == kvmnumad.__version__
    assert props["HostNodes"] == sorted(host_nodes())
    assert props["OnlineCPUs"] == sorted(online_cpus())
    assert props["MaxVcpus"] >= 1
    assert props["DefaultPolicy"] in ("manual", "local-first", "load-balanced", "interleave", "preferred")

    (rows,) = client.manager("GetTopology")
    assert [r[0] for r in rows] == sorted(host_nodes())
    for i, (node, cpus, total, free, distances) in enumerate(rows):
        assert set(cpus) == node_cpus(node) & online_cpus()
        assert 0 < free <= total
        assert len(distances) == len(rows) and distances[i] == 10

    # the same through busctl
    a = service.address
    out = busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "GetTopology")
    assert out["type"] == "a(uauttau)" and [r[:2] for r in out["data"][0]] == [r[:2] for r in rows]
    for prop in ("Version", "OnlineCPUs", "HostNodes", "MaxVcpus", "DefaultPolicy"):
        assert busctl(a, "get-property", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, prop)["data"] == props[prop]


def test_default_policy_is_read_write(service: RunningService, client: BusClient) -> None:
    a = service.address
    busctl(a, "set-property", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "DefaultPolicy", "s", "interleave")
    got = busctl(a, "get-property", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "DefaultPolicy")
    assert got["data"] == "interleave"
    # a second reader, GetAll, agrees with Get
    got_all = busctl(a, "call", BUS_NAME, MANAGER_PATH, PROPS_IFACE, "GetAll", "s", MANAGER_IFACE)
    assert got_all["data"][0]["DefaultPolicy"]["data"] == "interleave"
    client.wait_signal(
        lambda m: m.path == MANAGER_PATH and m.member == "PropertiesChanged"
        and m.body[1].get("DefaultPolicy", Variant("s", "")).value == "interleave"
    )
    # a VM created without a policy gets it
    path = create(client, "dp", 1, 2 * MiB)
    assert client.get(path, VM_IFACE, "Policy") == "interleave"

    set_ = (BUS_NAME, MANAGER_PATH, PROPS_IFACE, "Set", "ssv")
    name, text = client.error(*set_, [MANAGER_IFACE, "DefaultPolicy", Variant("s", "fastest")])
    assert name == "org.kvmnuma1.Error.InvalidArgument" and "'fastest'" in text
    name, text = client.error(*set_, [MANAGER_IFACE, "DefaultPolicy", Variant("u", 1)])
    assert name == "org.kvmnuma1.Error.InvalidArgument" and "'s'" in text
    assert client.get(MANAGER_PATH, MANAGER_IFACE, "DefaultPolicy") == "interleave"


def test_plan_report_suggestions(service: RunningService, client: BusClient) -> None:
    policy, nodes, vcpus = client.manager("PlanVM", "uta{sv}", 2, 8 * MiB,
                                          options(numa_nodes=1, policy="local-first"))
    assert policy == "local-first"
    ((guest_node, hosts, mempolicy, size, per_host),) = nodes
    assert (guest_node, mempolicy, size) == (0, "bind", 8 * MiB) and hosts[0] in host_nodes()
    assert sum(b for _h, b in per_host) == 8 * MiB
    assert [v[:2] for v in vcpus] == [[0, 0], [1, 0]] and all(set(v[2]) <= online_cpus() for v in vcpus)
    (report,) = client.manager("GetReport")
    assert isinstance(report, str) and report
    (suggestions,) = client.manager("GetSuggestions")
    assert isinstance(suggestions, list)
    assert client.manager("ListVMs") == [[]]  # a plan creates nothing

    a = service.address
    out = busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "PlanVM", "uta{sv}", "2", str(8 * MiB),
                 "2", "numa_nodes", "u", "1", "policy", "s", "local-first")
    assert out == {"type": "sa(uausta(ut))a(uuau)", "data": [policy, nodes, vcpus]}
    assert busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "GetReport")["type"] == "s"
    assert busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "GetSuggestions")["type"] == "a(sss)"


# ------------------------------------------------------- VM objects lifecycle
def test_create_list_get_destroy_with_object_manager(service: RunningService, client: BusClient) -> None:
    a = service.address
    path = create(client, "web-1.a", 2, 4 * MiB, numa_nodes=1, passes=1)
    assert path == "/org/kvmnuma1/vm/web_2d1_2ea"
    added = client.wait_signal(is_signal(MANAGER_PATH, OM_IFACE, "InterfacesAdded"))
    assert added.body[0] == path and added.body[1][VM_IFACE]["Name"].value == "web-1.a"

    assert client.manager("ListVMs") == [[["web-1.a", "created", path]]]
    assert client.manager("GetVM", "s", "web-1.a") == [path]
    (objects,) = client.ok(BUS_NAME, MANAGER_PATH, OM_IFACE, "GetManagedObjects")
    assert set(objects) == {path}
    props = objects[path][VM_IFACE]
    assert props["Name"] == "web-1.a" and props["Vcpus"] == 2 and props["MemoryBytes"] == 4 * MiB
    assert props["NumaEnabled"] is True and props["NumaNodes"] == 1 and props["NodeMap"] == [0]
    assert props["Owner"] == os.getuid() and props["State"] == "created"

    # busctl sees the same tree, the escaped path and the properties
    tree = busctl(a, "tree", "--list", BUS_NAME, check=False).stdout.split()
    assert path in tree
    listed = busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs")
    assert listed["data"] == [[["web-1.a", "created", path]]]
    assert busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", "web-1.a")["data"] == [path]
    managed = busctl(a, "call", BUS_NAME, MANAGER_PATH, OM_IFACE, "GetManagedObjects")
    assert managed["data"][0][path][VM_IFACE]["Name"]["data"] == "web-1.a"
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "Vcpus")["data"] == 2

    # a second VM by busctl, destroyed by busctl through its own object
    out = busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "CreateVM", "suta{sv}", "b1", "1",
                 str(2 * MiB), "2", "numa_nodes", "u", "1", "passes", "u", "1")
    assert out["data"] == [vm_path("b1")]
    busctl(a, "call", BUS_NAME, vm_path("b1"), VM_IFACE, "Destroy")
    client.wait_signal(lambda m: m.member == "InterfacesRemoved" and m.path == MANAGER_PATH
                       and m.body[0] == vm_path("b1"))

    client.manager("DestroyVM", "s", "web-1.a")
    removed = client.wait_signal(lambda m: m.member == "InterfacesRemoved" and m.path == MANAGER_PATH
                                 and m.body[0] == path)
    assert removed.body[1] == [VM_IFACE]
    assert client.manager("ListVMs") == [[]]
    assert client.ok(BUS_NAME, MANAGER_PATH, OM_IFACE, "GetManagedObjects") == [{}]
    assert client.error(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "GetVM", "s", ["web-1.a"])[0] == (
        "org.kvmnuma1.Error.NoSuchVM"
    )
    busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "CreateVM", "suta{sv}", "c1", "1", str(2 * MiB),
           "0")
    busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "DestroyVM", "s", "c1")
    assert busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs")["data"] == [[]]
    assert busctl(a, "call", BUS_NAME, MANAGER_PATH, OM_IFACE, "GetManagedObjects")["data"] == [{}]


def test_start_stop_with_properties_changed(service: RunningService, client: BusClient) -> None:
    path = create(client, "run", 1, 2 * MiB)
    client.vm(path, "Start")
    client.wait_signal(changed(path, "State", "running"))
    assert client.get(path, VM_IFACE, "State") == "running"
    assert busctl(service.address, "get-property", BUS_NAME, path, VM_IFACE, "State")["data"] == "running"
    listed = busctl(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs")["data"]
    assert listed == [[["run", "running", path]]]
    busctl(service.address, "call", BUS_NAME, path, VM_IFACE, "Stop")
    client.wait_signal(changed(path, "State", "stopped"))
    assert busctl(service.address, "get-property", BUS_NAME, path, VM_IFACE, "State")["data"] == "stopped"
    busctl(service.address, "call", BUS_NAME, path, VM_IFACE, "Start")
    client.wait_signal(changed(path, "State", "running"))


def test_vcpu_affinity_agrees_with_taskset(service: RunningService, client: BusClient) -> None:
    path = create(client, "pin", 2, 2 * MiB, numa_nodes=1, start=True)
    threads = dict(client.get(path, VM_IFACE, "VcpuThreads"))
    assert set(threads) == {0, 1} and all(tid > 0 for tid in threads.values())
    last = max(online_cpus())

    client.vm(path, "SetVcpuAffinity", "uau", 0, [last])
    client.wait_signal(changed(path, "VcpuAffinity"))
    assert client.vm(path, "GetVcpuAffinity", "u", 0) == [[last]]
    assert taskset_affinity(threads[0]) == {last}
    assert thread_affinity(os.getpid(), threads[0]) == {last}
    assert dict(client.get(path, VM_IFACE, "VcpuAffinity"))[0] == [last]
    assert dict(client.get(path, VM_IFACE, "DeclaredVcpuAffinity"))[0] == [last]

    # and through busctl, the other way round
    a = service.address
    busctl(a, "call", BUS_NAME, path, VM_IFACE, "SetVcpuAffinity", "uau", "1", "1", "0")
    assert busctl(a, "call", BUS_NAME, path, VM_IFACE, "GetVcpuAffinity", "u", "1")["data"] == [[0]]
    assert taskset_affinity(threads[1]) == {0}
    got = busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "VcpuAffinity")["data"]
    assert sorted(map(tuple, [[v, tuple(c)] for v, c in got])) == [(0, (last,)), (1, (0,))]
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "VcpuThreads")["data"] == [
        [v, threads[v]] for v in sorted(threads)
    ]


def test_numa_memory_and_binding(service: RunningService, client: BusClient) -> None:
    a = service.address
    path = create(client, "mem", 2, 0)
    busctl(a, "call", BUS_NAME, path, VM_IFACE, "EnableNuma", "u", "1")
    assert client.get(path, VM_IFACE, "NumaEnabled") is True
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "NumaNodes")["data"] == 1
    client.vm(path, "MapNumaNode", "uu", 0, 0)  # no memory yet: allowed
    busctl(a, "call", BUS_NAME, path, VM_IFACE, "MapNumaNode", "uu", "0", "0")
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "NodeMap")["data"] == [0]

    (slot,) = client.vm(path, "SetupNumaMemory", "utt", 0, 4 * MiB, 0x100000)
    client.wait_signal(changed(path, "MemoryRegions"))
    out = busctl(a, "call", BUS_NAME, path, VM_IFACE, "SetupNumaMemory", "utt", "0", str(2 * MiB),
                 str(0x800000))
    assert out["type"] == "u" and out["data"][0] != slot
    regions = client.get(path, VM_IFACE, "MemoryRegions")
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "MemoryRegions")["data"] == regions
    assert {r[0] for r in regions} == {slot, out["data"][0]}
    assert client.get(path, VM_IFACE, "MemoryBytes") == 6 * MiB

    client.vm(path, "BindVcpuToNumaNode", "uu", 0, 0)
    busctl(a, "call", BUS_NAME, path, VM_IFACE, "BindVcpuToNumaNode", "uu", "1", "0")
    assert client.vm(path, "GetVcpuNumaNode", "u", 0) == [[True, 0]]
    assert busctl(a, "call", BUS_NAME, path, VM_IFACE, "GetVcpuNumaNode", "u", "1")["data"] == [[True, 0]]
    assert sorted(client.get(path, VM_IFACE, "VcpuNodes")) == [[0, True, 0], [1, True, 0]]

    # run the guest so that it touches its memory, then ask the kernel where it is
    client.vm(path, "Start")
    busctl(a, "call", BUS_NAME, path, VM_IFACE, "Stop")
    for slot, _gpa, size, guest_node, host_node in regions:
        entry = region_entry("mem", slot)
        assert guest_node == 0
        assert set(entry.pages_per_node) <= {host_node}, entry.raw
        assert entry.total_pages <= size // 4096


def test_disable_numa_and_stats(service: RunningService, client: BusClient) -> None:
    a = service.address
    path = create(client, "nn", 1, 0, numa_nodes=1)
    client.vm(path, "DisableNuma")
    assert client.get(path, VM_IFACE, "NumaEnabled") is False
    busctl(a, "call", BUS_NAME, path, VM_IFACE, "EnableNuma", "u", "1")
    busctl(a, "call", BUS_NAME, path, VM_IFACE, "DisableNuma")
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "NumaEnabled")["data"] is False

    path = create(client, "st", 2, 4 * MiB, numa_nodes=1, passes=1, start=True)
    threads = dict(client.get(path, VM_IFACE, "VcpuThreads"))
    wait_until(lambda: "io" in dict(client.vm(path, "GetStats")[0]), "the payload's first I/O exit")
    exits, vcpus, pages, dirty = client.vm(path, "GetStats")
    assert all(n > 0 for _r, n in exits)
    assert {v[0]: v[1] for v in vcpus} == threads
    for _vcpu, _tid, cpu_time, current, vcpu_exits, _progress in vcpus:
        assert cpu_time >= 0 and current in online_cpus() | {-1}
        assert all(isinstance(r, str) and n >= 0 for r, n in vcpu_exits)
    assert {node for node, _n in pages} <= set(host_nodes())
    assert dirty >= 0
    # busctl --json prints it (it failed, silently, on the integer-keyed maps of before)
    out = busctl(a, "call", BUS_NAME, path, VM_IFACE, "GetStats")
    assert out["type"] == "a(st)a(uutia(st)t)a(ut)t"
    assert {v[0]: v[1] for v in out["data"][1]} == threads


def test_name_taken_fails_clearly(service: RunningService) -> None:
    with pytest.raises(NameUnavailable, match="already owned"), run_service(service.address, service.manager):
        pass
    # the first service still serves, and the loser left nothing behind on the bus
    assert busctl(service.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs")["data"] == [[]]
    owner = busctl(service.address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus", "GetNameOwner", "s", BUS_NAME)["data"][0]
    assert owner == service.unique_name


# --------------------------------------------------------------- signals
def test_topology_changed_signal(service: RunningService, client: BusClient) -> None:
    """The core re-reads the topology (as on a udev cpu event); the bus says so."""
    service.manager.on_topology_changed("test")
    sig = client.wait_signal(is_signal(MANAGER_PATH, MANAGER_IFACE, "TopologyChanged"))
    assert sig.signature == "au" and set(sig.body[0]) == online_cpus()


# --------------------------------------------------------- introspection
def _members(iface: ET.Element) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    for m in iface:
        if m.tag == "method":
            args = [(a.get("direction", "in"), a.get("type")) for a in m.findall("arg")]
            in_names = [a.get("name") for a in m.findall("arg") if a.get("direction", "in") == "in"]
            out[("method", m.get("name", ""))] = (args, in_names)
        elif m.tag == "signal":
            out[("signal", m.get("name", ""))] = [a.get("type") for a in m.findall("arg")]
        elif m.tag == "property":
            out[("property", m.get("name", ""))] = (m.get("type"), m.get("access"))
    return out


def _interface(xml: str, name: str) -> ET.Element:
    found = [i for i in ET.fromstring(xml).findall("interface") if i.get("name") == name]
    assert len(found) == 1, f"{name} not in introspection"
    return found[0]


@pytest.mark.parametrize(("iface", "xml_file"), [(MANAGER_IFACE, "org.kvmnuma1.Manager.xml"),
                                                 (VM_IFACE, "org.kvmnuma1.VM.xml")])
def test_introspection_xml_equals_live(service: RunningService, client: BusClient, iface: str,
                                       xml_file: str) -> None:
    path = MANAGER_PATH if iface == MANAGER_IFACE else create(client, "intro", 1, 2 * MiB)
    (live,) = client.ok(BUS_NAME, path, "org.freedesktop.DBus.Introspectable", "Introspect")
    documented = _interface((ROOT / "dbus" / xml_file).read_text(), iface)
    assert _members(_interface(live, iface)) == _members(documented)
    # every member of the file is documented
    for m in documented:
        if m.tag in ("method", "signal", "property"):
            docs = [a for a in m.findall("annotation") if a.get("name") == "org.freedesktop.DBus.DocString"]
            assert docs and docs[0].get("value"), f"{m.get('name')} has no DocString"
    # ObjectManager on the manager only
    assert ("org.freedesktop.DBus.ObjectManager" in live) == (iface == MANAGER_IFACE)

    # busctl's view of the same object: every member with its signature
    out = busctl(service.address, "introspect", BUS_NAME, path, iface, check=False)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.startswith(".")}
    for (kind, name), spec in _members(documented).items():
        row = rows[f".{name}"]
        assert row[1] == kind
        if kind == "property":
            assert row[2] == spec[0]
        elif kind == "method":
            assert row[2] == ("".join(t for d, t in spec[0] if d == "in") or "-")
