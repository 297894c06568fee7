"""Issue 11, seen only from outside the daemon: what busctl --json, gdbus,
dbus-send, busctl monitor and an unprivileged busctl get from the service.

- every read method and every property renders with ``busctl --json=short``
  and with gdbus;
- one InterfacesAdded and one InterfacesRemoved per VM on the whole bus, from
  /org/kvmnuma1; ObjectManager there only; a path without an object answers
  UnknownObject for every method;
- no value an unprivileged user can read equals an address of the daemon's
  mappings (/proc/PID/maps);
- the dirty-page figure is one running total: readers agree, and it only grows;
- MaxVcpus is what CreateVM accepts;
- dbus-send and gdbus (int32 options) create and plan VMs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmnumad.bus.paths import vm_path
from kvmnumad.bus.service import BUS_NAME
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
)
from tests.observe import BusMonitor
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.sysfixtures import User

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]  # bus_daemon, service, client; unpriv_user
ROOT = Path(__file__).resolve().parent.parent
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PAGE = 4096


def create(client: BusClient, name: str, vcpus: int = 1, memory: int = 4 * MiB, **opts: Any) -> str:
    (path,) = client.manager("CreateVM", "suta{sv}", name, vcpus, memory, options(**opts))
    return str(path)


def gdbus(address: str, path: str, method: str, *args: str,
          user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["gdbus", "call", "--address", address, "--dest", BUS_NAME, "--object-path", path,
           "--method", method, *args]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def dbus_send(address: str, path: str, method: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["dbus-send", f"--bus={address}", "--print-reply", f"--dest={BUS_NAME}", path, method, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def _xml_members(xml_file: str, tag: str) -> list[ET.Element]:
    iface = ET.parse(ROOT / "dbus" / xml_file).getroot().find("interface")
    assert iface is not None
    return iface.findall(tag)


def halted(client: BusClient, path: str, passes: int = 1) -> bool:
    """Every vCPU of the built-in payload has reported its passes (the last
    thing it does before its final HLT), per GetStats' progress."""
    _exits, vcpus, _pages, _dirty = client.vm(path, "GetStats")
    return all(v[5] >= passes for v in vcpus)


# ------------------------------------------------------------ item 1: renders
# Read methods with arguments a caller would give: (busctl words, gdbus GVariant text)
READS: dict[str, tuple[list[str], list[str]]] = {
    "GetVM": (["s", "seen"], ["'seen'"]),
    "ListVMs": ([], []),
    "GetTopology": ([], []),
    "GetReport": ([], []),
    "GetSuggestions": ([], []),
    "PlanVM": (["uta{sv}", "2", str(8 * MiB), "1", "numa_nodes", "u", "1"], ["2", str(8 * MiB),
                                                                             "{'numa_nodes': <uint32 1>}"]),
    "PlanVMSimple": (["utus", "2", str(8 * MiB), "1", ""], ["2", str(8 * MiB), "1", "''"]),
    "GetVcpuAffinity": (["u", "0"], ["0"]),
    "GetVcpuNumaNode": (["u", "0"], ["0"]),
    "GetStats": ([], []),
}


def test_every_read_method_and_property_renders_with_busctl_json_and_gdbus(
    service: RunningService, client: BusClient
) -> None:
    a = service.address
    path = create(client, "seen", 2, 4 * MiB, numa_nodes=1, passes=1, start=True)
    wait_until(lambda: halted(client, path), "the payload to finish its pass")
    rendered = []
    for xml_file, obj, iface in (("org.kvmnuma1.Manager.xml", MANAGER_PATH, MANAGER_IFACE),
                                 ("org.kvmnuma1.VM.xml", path, VM_IFACE)):
        for m in _xml_members(xml_file, "method"):
            name = m.get("name", "")
            if name not in READS:
                continue
            words, gvariants = READS[name]
            out = busctl(a, "call", BUS_NAME, obj, iface, name, *words, check=False)
            assert out.returncode == 0 and out.stdout.strip(), (name, out.stderr)
            parsed = json.loads(out.stdout)
            assert parsed["type"] == "".join(arg.get("type", "") for arg in m.findall("arg")
                                             if arg.get("direction") == "out"), name
            g = gdbus(a, obj, f"{iface}.{name}", *gvariants)
            assert g.returncode == 0 and g.stdout.startswith("("), (name, g.stderr)
            rendered.append(name)
        for p in _xml_members(xml_file, "property"):
            name = p.get("name", "")
            out = busctl(a, "get-property", BUS_NAME, obj, iface, name, check=False)
            assert out.returncode == 0, (name, out.stderr)
            assert json.loads(out.stdout)["type"] == p.get("type"), name
            g = gdbus(a, obj, f"{PROPS_IFACE}.Get", iface, name)
            assert g.returncode == 0, (name, g.stderr)
            rendered.append(name)
        every = busctl(a, "call", BUS_NAME, obj, PROPS_IFACE, "GetAll", "s", iface)
        assert set(every["data"][0]) == {p.get("name") for p in _xml_members(xml_file, "property")}
    assert set(READS) <= set(rendered)
    managed = busctl(a, "call", BUS_NAME, MANAGER_PATH, OM_IFACE, "GetManagedObjects")
    assert set(managed["data"][0]) == {path}


# -------------------------------------------- item 2: one announcement per VM
def test_one_interfaces_added_and_removed_per_vm_on_the_whole_bus(
    service: RunningService, client: BusClient
) -> None:
    """Counted by busctl monitor (everything to or from org.kvmnuma1) and by a
    dbus-fast match rule with no path in it: neither filters by path."""
    with BusMonitor(service.address, BUS_NAME) as monitor:
        path = create(client, "once")
        client.vm(path, "Destroy")
        monitor.sync()
        for member, body_path in (("InterfacesAdded", path), ("InterfacesRemoved", path)):
            seen = monitor.signals(member)
            assert [(s["path"], s["payload"]["data"][0]) for s in seen] == [(MANAGER_PATH, body_path)], seen
    wait_until(lambda: any(m.member == "InterfacesRemoved" for m in client.signals), "InterfacesRemoved")
    om = [(m.member, m.path) for m in client.signals if m.interface == OM_IFACE]
    assert om == [("InterfacesAdded", MANAGER_PATH), ("InterfacesRemoved", MANAGER_PATH)]


def test_object_manager_only_on_the_manager(service: RunningService, client: BusClient) -> None:
    path = create(client, "om")
    name, _ = client.error(BUS_NAME, path, OM_IFACE, "GetManagedObjects")
    assert name == "org.freedesktop.DBus.Error.UnknownInterface"
    (vm_xml,) = client.ok(BUS_NAME, path, INTROSPECTABLE, "Introspect")
    (manager_xml,) = client.ok(BUS_NAME, MANAGER_PATH, INTROSPECTABLE, "Introspect")
    interfaces = {x: {i.get("name") for i in ET.fromstring(x).findall("interface")}
                  for x in (vm_xml, manager_xml)}
    assert OM_IFACE not in interfaces[vm_xml] and VM_IFACE in interfaces[vm_xml]
    assert OM_IFACE in interfaces[manager_xml]
    # the paths that only lead to objects still list them: busctl tree walks down
    tree = busctl(service.address, "tree", "--list", BUS_NAME, check=False)
    assert tree.returncode == 0 and set(tree.stdout.split()) >= {"/", MANAGER_PATH, path}


def test_a_path_without_an_object_answers_unknown_object_for_every_method(
    service: RunningService, client: BusClient
) -> None:
    gone = create(client, "gone")
    client.manager("DestroyVM", "s", "gone")
    calls: list[tuple[str | None, str, str, list[Any]]] = [
        (INTROSPECTABLE, "Introspect", "", []),
        (None, "Introspect", "", []),
        (PROPS_IFACE, "Get", "ss", [VM_IFACE, "Name"]),
        (PROPS_IFACE, "GetAll", "s", [VM_IFACE]),
        (OM_IFACE, "GetManagedObjects", "", []),
        (MANAGER_IFACE, "ListVMs", "", []),
        (VM_IFACE, "Start", "", []),
        (VM_IFACE, "GetStats", "", []),
        (None, "GetVcpuAffinity", "u", [0]),
        ("org.example.Nothing", "Anything", "", []),
    ]
    for path in ("/nonexistent", "/org/kvmnuma1/vm/nope", gone, "/org/kvmnuma1/vm/gone/deeper"):
        for iface, member, sig, body in calls:
            name, text = client.error(BUS_NAME, path, iface, member, sig, body)
            assert (name, path in text) == (UNKNOWN_OBJECT, True), (path, iface, member, text)
        g = gdbus(service.address, path, f"{INTROSPECTABLE}.Introspect")
        assert g.returncode != 0 and UNKNOWN_OBJECT in g.stderr, g.stderr
    # a VM named as an argument is NoSuchVM, from GetVM and DestroyVM alike
    for member in ("GetVM", "DestroyVM"):
        assert client.error(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member, "s", ["gone"])[0] == (
            "org.kvmnuma1.Error.NoSuchVM")


# ----------------------------------------------------- item 3: no addresses
def _integers(value: Any) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_integers(v) for v in value.values()), *(_integers(k) for k in value))
    if isinstance(value, list):
        return set().union(*(_integers(v) for v in value))
    return set()


def _mapping_addresses(pid: int) -> set[int]:
    found: set[int] = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        start, end = line.split()[0].split("-")
        found |= {int(start, 16), int(end, 16)}
    return found


def test_no_readable_value_is_a_mapping_address(
    service: RunningService, client: BusClient, unpriv_user: User
) -> None:
    """Everything an unprivileged user reads (every property of the Manager and
    of a VM with memory, GetManagedObjects, the read methods) holds no start or
    end address of the daemon's mappings.  The service runs in this process."""
    a, user = service.address, unpriv_user.name
    path = create(client, "aslr", 1, 8 * MiB, numa_nodes=1, passes=1, start=True)
    (slot,) = client.vm(path, "SetupNumaMemory", "utt", 0, 2 * MiB, 0x10000000)
    assert len(client.get(path, VM_IFACE, "MemoryRegions")) == 2
    values: list[Any] = []
    for obj, iface in ((MANAGER_PATH, MANAGER_IFACE), (path, VM_IFACE)):
        got = busctl(a, "call", BUS_NAME, obj, PROPS_IFACE, "GetAll", "s", iface, user=user)
        assert got["data"][0], iface
        values.append(got)
    values.append(busctl(a, "call", BUS_NAME, MANAGER_PATH, OM_IFACE, "GetManagedObjects", user=user))
    for member, (words, _g) in READS.items():
        obj, iface = (path, VM_IFACE) if member in ("GetVcpuAffinity", "GetVcpuNumaNode", "GetStats") else (
            MANAGER_PATH, MANAGER_IFACE)
        args = ["s", "aslr"] if member == "GetVM" else words
        values.append(busctl(a, "call", BUS_NAME, obj, iface, member, *args, user=user))
    published = _integers(values)
    regions = re.compile(r"memfd:kvmnumad-aslr-node0-slot")
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    assert len(regions.findall(maps)) >= 2, "the guest memory is mapped here"
    assert slot in published  # the reads did reach the VM's regions
    assert published & _mapping_addresses(os.getpid()) == set()


# -------------------------------------------- item 4: counters are not consumed
def dirty_by_busctl(address: str, path: str) -> int:
    return int(busctl(address, "call", BUS_NAME, path, VM_IFACE, "GetStats")["data"][3])


def test_dirty_pages_is_one_running_total_for_every_reader(
    service: RunningService, client: BusClient
) -> None:
    a = service.address
    path = create(client, "dirty", 1, 4 * MiB, numa_nodes=1, passes=1)
    assert client.vm(path, "GetStats")[3] == 0 == dirty_by_busctl(a, path)
    client.vm(path, "Start")
    readings = []
    deadline = time.monotonic() + 30
    while not halted(client, path):  # readers take turns while the guest writes
        readings += [dirty_by_busctl(a, path), client.vm(path, "GetStats")[3]]
        assert time.monotonic() < deadline, f"the payload did not finish its pass; read {readings}"
    final = [dirty_by_busctl(a, path), client.vm(path, "GetStats")[3], dirty_by_busctl(a, path)]
    readings += final
    assert readings == sorted(readings), "a later read is never below an earlier one"
    assert final == [4 * MiB // PAGE] * 3, "the payload touched every page once; no read consumed it"


# -------------------------------------- item 5: MaxVcpus is what CreateVM takes
def test_max_vcpus_is_what_create_vm_accepts(service: RunningService, client: BusClient) -> None:
    most = busctl(service.address, "get-property", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "MaxVcpus")["data"]
    assert 1 <= most <= 256
    name, text = client.error(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "CreateVM", "suta{sv}",
                              ["over", most + 1, 0, {}])
    assert name == "org.kvmnuma1.Error.InvalidArgument" and f"vcpus {most + 1} out of range 1..{most}" in text
    path = create(client, "most", most, 0)
    assert busctl(service.address, "get-property", BUS_NAME, path, VM_IFACE, "Vcpus")["data"] == most
    client.vm(path, "Destroy")


# ------------------------------- items 6 and 7: clients that cannot type a{sv}
def test_dbus_send_creates_and_plans_with_plain_arguments(service: RunningService) -> None:
    a = service.address
    out = dbus_send(a, MANAGER_PATH, f"{MANAGER_IFACE}.CreateVMSimple", "string:plain", "uint32:2",
                    f"uint64:{4 * MiB}", "uint32:1", "string:local-first", "boolean:true")
    assert out.returncode == 0, out.stderr
    assert f'object path "{vm_path("plain")}"' in out.stdout
    props = busctl(a, "call", BUS_NAME, vm_path("plain"), PROPS_IFACE, "GetAll", "s", VM_IFACE)["data"][0]
    assert (props["NumaNodes"]["data"], props["Policy"]["data"]) == (1, "local-first")
    assert props["State"]["data"] == "running" and props["MemoryBytes"]["data"] == 4 * MiB

    out = dbus_send(a, MANAGER_PATH, f"{MANAGER_IFACE}.PlanVMSimple", "uint32:2", f"uint64:{8 * MiB}",
                    "uint32:1", "string:")
    assert out.returncode == 0, out.stderr
    assert 'string "manual"' in out.stdout and 'string "bind"' in out.stdout  # DefaultPolicy, typed

    out = dbus_send(a, MANAGER_PATH, f"{MANAGER_IFACE}.CreateVMSimple", "string:p2", "uint32:1", "uint64:0",
                    "uint32:0", "string:best", "boolean:false")
    assert out.returncode != 0 and "org.kvmnuma1.Error.InvalidArgument" in out.stderr
    assert "'best'" in out.stderr
    listed = busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs")["data"][0]
    assert [vm[0] for vm in listed] == ["plain"]


def test_gdbus_plain_integers_are_accepted_as_options(service: RunningService) -> None:
    """gdbus sends ``<1>`` in an a{sv} as int32, as GLib programs do."""
    a = service.address
    out = gdbus(a, MANAGER_PATH, f"{MANAGER_IFACE}.CreateVM", "'g1'", "1", str(2 * MiB),
                "{'numa_nodes': <1>, 'passes': <int64 2>, 'host_nodes': <[0]>}")
    assert out.returncode == 0, out.stderr
    assert busctl(a, "get-property", BUS_NAME, vm_path("g1"), VM_IFACE, "NumaNodes")["data"] == 1
    out = gdbus(a, MANAGER_PATH, f"{MANAGER_IFACE}.CreateVM", "'g2'", "1", str(2 * MiB),
                "{'numa_nodes': <-1>}")
    assert out.returncode != 0 and "org.kvmnuma1.Error.InvalidArgument" in out.stderr
    assert "-1" in out.stderr
