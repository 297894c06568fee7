"""The clients org.kvmnuma1's users have, built from the shipped XML, against
the real service: a Qt program (qdbusxml2cpp proxies of both interfaces,
compiled with g++ against QtDBus) and a GLib program (python3-gi,
Gio.DBusObjectManagerClient).  Each reads every property of a VM, which must
equal what busctl reads, in the XML's types, and receives the
PropertiesChanged of a pin made by busctl.

The tools come from Debian (qtbase5-dev-tools, qtbase5-dev, g++, python3-gi,
gir1.2-glib-2.0; ``make deps`` installs them): a missing one fails the test,
it does not skip it.  The Qt build takes about 20 s, once per module.
"""

import json
import queue
import shutil
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvmnumad.bus.service import BUS_NAME
from tests.busfixtures import VM_IFACE, BusClient, MiB, RunningService, busctl, options
from tests.clients.qt_types import header

pytest_plugins = ["tests.busfixtures"]
ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "tests" / "clients"
XML = {"manager": ROOT / "dbus" / "org.kvmnuma1.Manager.xml", "vm": ROOT / "dbus" / "org.kvmnuma1.VM.xml"}
DEBIAN_PYTHON = "/usr/bin/python3"


def run(*cmd: str, cwd: Path) -> None:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def qt_bin(tool: str) -> str:
    bins = subprocess.run(["pkg-config", "--variable=host_bins", "Qt5Core"], capture_output=True, text=True,
                          check=False).stdout.strip()
    path = Path(bins or "/usr/lib/qt5/bin") / tool
    assert path.is_file(), f"{path} missing: apt install qtbase5-dev-tools qtbase5-dev (make deps does)"
    return str(path)


@pytest.fixture(scope="module")
def qt_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qdbusxml2cpp proxies of both shipped interfaces, the struct header the
    XML's QtTypeName annotations call for, moc, and g++ with Qt5DBus."""
    assert shutil.which("g++"), "g++ missing: apt install g++ (make deps does)"
    build = tmp_path_factory.mktemp("qt")
    (build / "kvmnuma_types.h").write_text(header(list(XML.values())))
    for name, xml in XML.items():
        run(qt_bin("qdbusxml2cpp"), "-i", "kvmnuma_types.h", "-p", f"{name}_proxy", str(xml), cwd=build)
        run(qt_bin("moc"), f"{name}_proxy.h", "-o", f"moc_{name}_proxy.cpp", cwd=build)
    shutil.copy(CLIENTS / "qt_client.cpp", build)
    run(qt_bin("moc"), "qt_client.cpp", "-o", "qt_client.moc", cwd=build)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "Qt5DBus"], capture_output=True, text=True,
                           check=True).stdout.split()
    sources = ["qt_client.cpp", *(f"{n}_proxy.cpp" for n in XML), *(f"moc_{n}_proxy.cpp" for n in XML)]
    run("g++", "-std=c++17", "-fPIC", "-O0", "-Wall", "-o", "qt_client", *sources, *flags, cwd=build)
    return build / "qt_client"


@dataclass
class ClientProcess:
    """A client subprocess whose stdout is one JSON object per line."""

    proc: subprocess.Popen[str]
    lines: "queue.Queue[str]"

    def next(self, timeout: float = 30) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s; stderr: {self.stderr()}") from None
        assert line, f"the client ended (rc {self.proc.wait(5)}); stderr: {self.stderr()}"
        event: dict[str, Any] = json.loads(line)
        return event

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@pytest.fixture
def spawn() -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(*cmd: str) -> ClientProcess:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/")
        procs.append(proc)
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put("")

        threading.Thread(target=pump, daemon=True).start()
        return ClientProcess(proc, lines)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def vm_properties() -> dict[str, str]:
    """Name -> D-Bus type of every property the shipped VM.xml declares."""
    iface = ET.parse(XML["vm"]).getroot().find("interface")
    assert iface is not None
    return {p.get("name", ""): p.get("type", "") for p in iface.findall("property")}


def busctl_values(address: str, path: str) -> dict[str, Any]:
    out = {}
    for name, sig in vm_properties().items():
        got = busctl(address, "get-property", BUS_NAME, path, VM_IFACE, name)
        assert got["type"] == sig
        out[name] = got["data"]
    return out


def as_json(value: Any) -> Any:
    """Tuples (GLib structs) as lists, the way busctl --json prints them."""
    result: Any = json.loads(json.dumps(value))
    return result


def create_vm(client: BusClient, name: str) -> str:
    (path,) = client.manager("CreateVM", "suta{sv}", name, 2, 4 * MiB, options(numa_nodes=1))
    return str(path)


def pin(address: str, path: str, values: dict[str, Any]) -> list[int]:
    """Pin vCPU 0 to one CPU other than all it has now (so its effective
    affinity changes too); the declared one changes in any case."""
    current = dict((v, cpus) for v, cpus in values["VcpuAffinity"])[0]
    online = sorted({c for _v, cpus in values["VcpuAffinity"] for c in cpus})
    target = [online[-1]] if current == [online[0]] else [online[0]]
    busctl(address, "call", BUS_NAME, path, VM_IFACE, "SetVcpuAffinity", "uau", "0", "1", str(target[0]))
    return target


def test_qt_client_reads_every_property_and_sees_a_pin(
    service: RunningService, client: BusClient, qt_client: Path, spawn: Any
) -> None:
    path = create_vm(client, "qt")
    qt = spawn(str(qt_client), service.address, path)
    first = qt.next()
    assert first["event"] == "properties"
    props = vm_properties()
    # Through the generated proxy: every property, decoded into the C++ type
    # the XML names, and that type maps back to the XML's D-Bus type.
    assert set(first["typed"]) == set(props)
    for name, entry in first["typed"].items():
        assert entry["valid"] and "error" not in entry, (name, entry)
        assert entry["decoded_as"] == entry["cpp"], (name, entry)
        assert entry["signature"] == props[name], (name, entry)
        if "count" in entry:
            assert entry["count"] == len(first["values"][name]), name
    # The values, generically, equal busctl's.
    assert first["values"] == busctl_values(service.address, path)
    listed = busctl(service.address, "call", BUS_NAME, "/org/kvmnuma1", "org.kvmnuma1.Manager", "ListVMs")
    assert first["vms"] == listed["data"][0]
    bound = busctl(service.address, "call", BUS_NAME, path, VM_IFACE, "GetVcpuNumaNode", "u", "0")
    assert first["binding"] == bound["data"][0]

    target = pin(service.address, path, first["values"])
    event = qt.next()
    assert event["event"] == "PropertiesChanged" and event["interface"] == VM_IFACE
    assert event["signature"] == "sa{sv}as"
    assert [0, target] in event["changed"]["DeclaredVcpuAffinity"]
    assert [0, target] in event["changed"]["VcpuAffinity"]
    assert qt.proc.wait(15) == 0, qt.stderr()


def test_glib_object_manager_client_reads_every_property_and_sees_a_pin(
    service: RunningService, client: BusClient, spawn: Any
) -> None:
    assert Path(DEBIAN_PYTHON).is_file()
    path = create_vm(client, "glib")
    glib = spawn(DEBIAN_PYTHON, str(CLIENTS / "glib_client.py"), service.address, path, str(XML["vm"]))
    first = glib.next()
    assert first["event"] == "properties"
    assert path in first["objects"]  # found through GetManagedObjects
    props = vm_properties()
    assert first["types"] == props  # GDBus checked each against the XML's interface info
    assert sorted(props) == first["cached"]
    assert as_json(first["values"]) == busctl_values(service.address, path)

    target = pin(service.address, path, as_json(first["values"]))
    event = as_json(glib.next())
    assert event["event"] == "g-properties-changed" and event["invalidated"] == []
    assert [0, target] in event["changed"]["DeclaredVcpuAffinity"]
    assert [0, target] in event["changed"]["VcpuAffinity"]
    assert glib.proc.wait(15) == 0
    stderr = glib.stderr()
    assert "WARNING" not in stderr and "CRITICAL" not in stderr, stderr
