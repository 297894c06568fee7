"""The shipped XML (dbus/org.kvmnuma1.*.xml) is the contract, whole: the code
has exactly its members with its signatures, and what clients introspect
(busctl, gdbus: annotations, DocStrings, argument names included) is exactly
the file.  The XML is what qdbusxml2cpp, D-Feet and GLib users read, so a
member added to the code only, a signature changed on one side, or a
const-ness the events contradict fails here, not in a user's client.
"""

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.service import ServiceInterface, method

from kvmnumad.bus.access import read_only
from kvmnumad.bus.introspection import (
    CHECKOUT_DIR,
    INSTALLED_DIR,
    contract_file,
    differences,
    parse_contract,
)
from kvmnumad.bus.job_object import JobObject, job_props
from kvmnumad.bus.manager_object import ManagerObject
from kvmnumad.bus.properties import (
    ASPECT_PROPERTIES,
    MANAGER_PROPERTIES,
    TOPOLOGY_PROPERTIES,
    TOPOLOGY_VM_PROPERTIES,
    VM_CONSTANT,
    VM_PROPERTIES,
)
from kvmnumad.bus.service import BUS_NAME
from kvmnumad.bus.vm_object import VmObject
from kvmnumad.model import JobState, JobStatus
from tests.busfixtures import (
    MANAGER_IFACE,
    MANAGER_PATH,
    VM_IFACE,
    BusClient,
    MiB,
    RunningService,
    busctl,
    options,
)
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures"]
ROOT = Path(__file__).resolve().parent.parent
JOB_IFACE = "org.kvmnuma1.Job"
IFACES = [MANAGER_IFACE, VM_IFACE, JOB_IFACE]
# What a job object never changes after export (bus/job_object.py publishes the rest)
JOB_CONSTANT = {"Id", "VM", "VMName", "GuestNode", "Slot", "HostNode", "Starter", "Origin"}
DOC = "org.freedesktop.DBus.DocString"
EMITS = "org.freedesktop.DBus.Property.EmitsChangedSignal"
QT = "org.qtproject.QtDBus.QtTypeName"
# Qt's names of the D-Bus basic types (QDBusMetaType), for QList<...> of them.
QT_BASIC = {"y": "uchar", "b": "bool", "n": "short", "q": "ushort", "i": "int", "u": "uint", "x": "qlonglong",
            "t": "qulonglong", "d": "double", "s": "QString", "o": "QDBusObjectPath", "g": "QDBusSignature",
            "h": "QDBusUnixFileDescriptor"}
QT_KNOWN = {"as": "QStringList", "ay": "QByteArray", "av": "QVariantList", "a{sv}": "QVariantMap",
            "v": "QDBusVariant"}


def shipped(iface: str) -> ET.Element:
    return parse_contract(CHECKOUT_DIR / f"{iface}.xml", iface)


def code_side(iface: str) -> Any:
    """dbus-fast's own introspection of the class (what the decorators say)."""
    if iface == JOB_IFACE:
        return ServiceInterface.introspect(JobObject.template())
    obj = ManagerObject(None, {}) if iface == MANAGER_IFACE else VmObject.template()  # type: ignore[arg-type]
    return ServiceInterface.introspect(obj)


def members(element: ET.Element) -> Iterator[ET.Element]:
    return (m for m in element if m.tag in ("method", "signal", "property"))


def annotations(element: ET.Element) -> dict[str, str]:
    return {a.get("name", ""): a.get("value", "") for a in element.findall("annotation")}


def canon(e: ET.Element, in_signal: bool = False) -> Any:
    """An element as a comparable value: members and annotations in any order,
    arguments in theirs; a method arg's direction defaults to in, a signal
    arg has none (gdbus writes none)."""
    attrs = dict(e.attrib)
    if e.tag == "arg":
        if in_signal:
            attrs.pop("direction", None)
        else:
            attrs.setdefault("direction", "in")
    kids = [canon(c, e.tag == "signal") for c in e]
    args = [k for k, c in zip(kids, e, strict=True) if c.tag == "arg"]
    rest = sorted((k for k, c in zip(kids, e, strict=True) if c.tag != "arg"), key=repr)
    return (e.tag, tuple(sorted(attrs.items())), tuple(args), tuple(rest))


def interface_of(xml: str, iface: str) -> ET.Element:
    found = [i for i in ET.fromstring(xml).iter("interface") if i.get("name") == iface]
    assert len(found) == 1, f"{iface} in {xml[:200]}"
    return found[0]


# ------------------------------------------------------ code against contract
@pytest.mark.parametrize("iface", IFACES)
def test_code_has_exactly_the_contracts_members(iface: str) -> None:
    """Names, in/out types, in-argument names, property types and access."""
    assert differences(code_side(iface), shipped(iface)) == []


class _Extended(VmObject):
    """A member the contract does not have, and one it types differently."""

    @method()
    @read_only
    async def GetSecret(self) -> "s":  # type: ignore[name-defined]  # noqa: F821
        return ""

    @method()
    @read_only
    async def GetVcpuAffinity(self, vcpu: "t") -> "au":  # type: ignore[override,name-defined]  # noqa: F821
        return []


def test_a_member_the_contract_lacks_is_a_difference_and_served_bare() -> None:
    obj = _Extended.__new__(_Extended)
    ServiceInterface.__init__(obj, VM_IFACE)
    found = differences(ServiceInterface.introspect(obj), shipped(VM_IFACE))
    assert any("method GetSecret is in the code, not in the contract" in d for d in found), found
    assert any("method GetVcpuAffinity is" in d and "'t'" in d for d in found), found
    served = {m.get("name"): m for m in members(obj.introspect().to_xml())}
    assert served["GetSecret"].find("annotation") is None  # what the code says, and no more
    assert [a.get("type") for a in served["GetVcpuAffinity"].findall("arg")] == ["t", "au"]
    assert DOC in annotations(served["GetVcpuNumaNode"])  # the agreeing ones keep their docs


@pytest.mark.parametrize("iface", IFACES)
def test_every_member_documented(iface: str) -> None:
    for m in members(shipped(iface)):
        assert annotations(m).get(DOC), f"{m.get('name')} has no DocString"
        for arg in m.findall("arg"):
            assert arg.get("name"), f"{m.get('name')}: an argument without a name (clients show arg_N)"


def test_const_properties_are_those_no_event_changes() -> None:
    """EmitsChangedSignal: const exactly on what bus/properties.py never
    re-reads after export; every other property emits (the default, true)."""
    vm_changing = frozenset().union(*ASPECT_PROPERTIES.values(), TOPOLOGY_VM_PROPERTIES)
    # DefaultPolicy: service.py publishes it on DefaultPolicyChanged.
    manager_changing = TOPOLOGY_PROPERTIES | {"DefaultPolicy"}
    expected = {VM_IFACE: set(VM_PROPERTIES) - vm_changing,
                MANAGER_IFACE: set(MANAGER_PROPERTIES) - manager_changing, JOB_IFACE: JOB_CONSTANT}
    assert expected[VM_IFACE] == set(VM_CONSTANT)
    for iface in IFACES:
        props = [m for m in members(shipped(iface)) if m.tag == "property"]
        emits = {p.get("name"): annotations(p).get(EMITS, "true") for p in props}
        assert set(emits.values()) <= {"true", "const"}, emits  # nothing changes silently
        assert {n for n, v in emits.items() if v == "const"} == expected[iface]
    assert {"Version", "MaxVcpus"} <= expected[MANAGER_IFACE] and {"Name", "Owner"} <= expected[VM_IFACE]


def test_a_job_objects_values_are_its_contracts_properties() -> None:
    """job_props fills every property of org.kvmnuma1.Job, and no other."""
    status = JobStatus(1, "vm", 0, None, 1, 0, JobState.RUNNING, 0, 0)
    props = {p.get("name") for p in members(shipped(JOB_IFACE)) if p.tag == "property"}
    assert set(job_props(status)) == props


def _qt_names(iface: str) -> Iterator[tuple[str, str, str | None]]:
    """(where, D-Bus type, its QtTypeName annotation) of every argument and property."""
    for m in members(shipped(iface)):
        notes, name = annotations(m), m.get("name")
        if m.tag == "property":
            yield f"{name}", m.get("type", ""), notes.get(QT)
            continue
        count = {"In": 0, "Out": 0}
        for arg in m.findall("arg"):
            d = "In" if m.tag == "method" and arg.get("direction", "in") == "in" else "Out"
            yield f"{name} {d}{count[d]}", arg.get("type", ""), notes.get(f"{QT}.{d}{count[d]}")
            count[d] += 1


def test_qt_type_names_on_every_compound_type() -> None:
    """What qdbusxml2cpp needs (it refuses au, a(...) without), one C++ name per
    struct signature across both files, Qt's own names for the rest."""
    structs: dict[str, str] = {}
    for iface in IFACES:
        for where, sig, qt in _qt_names(iface):
            if sig in QT_BASIC:
                assert qt is None, f"{iface} {where}: a basic type needs no QtTypeName"
                continue
            assert qt, f"{iface} {where} ({sig}) has no {QT} annotation"
            if sig in QT_KNOWN:
                assert qt == QT_KNOWN[sig], (where, qt)
            elif sig[0] == "a" and sig[1:] in QT_BASIC:
                assert qt == f"QList<{QT_BASIC[sig[1:]]}>", (where, qt)
            else:
                m = re.fullmatch(r"QList<(Kvmnuma\w+)>", qt) if sig.startswith("a(") else re.fullmatch(
                    r"Kvmnuma\w+", qt)
                assert m, f"{iface} {where}: {sig} named {qt!r} (QList<KvmnumaX> or KvmnumaX)"
                struct, name = (sig[1:], m.group(1)) if sig.startswith("a(") else (sig, qt)
                assert structs.setdefault(name, struct) == struct, f"{name} is {structs[name]} and {struct}"


def test_packages_install_the_xml_where_the_daemon_looks() -> None:
    install = (ROOT / "packaging" / "debian" / "install").read_text().splitlines()
    spec = (ROOT / "packaging" / "rpm" / "kvmnumad.spec").read_text()
    for iface in IFACES:
        assert f"dbus/{iface}.xml usr/share/dbus-1/interfaces/" in install
        assert f"%{{_datadir}}/dbus-1/interfaces/{iface}.xml" in spec
    assert Path("/usr/share/dbus-1/interfaces") == INSTALLED_DIR


def test_lookup_falls_back_to_the_installed_dir(tmp_path: Path) -> None:
    empty, installed = tmp_path / "checkout", tmp_path / "usr-share"
    empty.mkdir()
    installed.mkdir()
    (installed / f"{VM_IFACE}.xml").write_bytes((CHECKOUT_DIR / f"{VM_IFACE}.xml").read_bytes())
    assert contract_file(VM_IFACE, (empty, installed)) == installed / f"{VM_IFACE}.xml"
    assert contract_file(VM_IFACE, (CHECKOUT_DIR, installed)) == CHECKOUT_DIR / f"{VM_IFACE}.xml"
    assert contract_file(MANAGER_IFACE, (empty,)) is None


# --------------------------------------------------------- what clients see
def _vm(client: BusClient, name: str) -> str:
    (path,) = client.manager("CreateVM", "suta{sv}", name, 1, 2 * MiB, options())
    return str(path)


def _gdbus(address: str, path: str, *extra: str) -> str:
    return subprocess.run(["gdbus", "introspect", "--address", address, "--dest", BUS_NAME, "--object-path",
                           path, *extra], capture_output=True, text=True, timeout=30, check=True).stdout


def assert_live_equals_shipped(address: str, vm_path: str) -> None:
    for iface, path in ((MANAGER_IFACE, MANAGER_PATH), (VM_IFACE, vm_path)):
        expected = canon(shipped(iface))
        raw = busctl(address, "introspect", "--xml-interface", BUS_NAME, path, json_=False).stdout
        assert canon(interface_of(raw, iface)) == expected, f"busctl: {iface}"
        assert canon(interface_of(_gdbus(address, path, "--xml"), iface)) == expected, f"gdbus: {iface}"


def test_busctl_and_gdbus_see_the_shipped_xml(service: RunningService, client: BusClient) -> None:
    assert_live_equals_shipped(service.address, _vm(client, "contract"))


def test_busctl_shows_const_and_gdbus_the_argument_names(service: RunningService, client: BusClient) -> None:
    path = _vm(client, "flags")
    for iface, obj, const in ((MANAGER_IFACE, MANAGER_PATH, {"Version", "MaxVcpus"}),
                              (VM_IFACE, path, set(VM_CONSTANT))):
        out = busctl(service.address, "introspect", BUS_NAME, obj, iface, json_=False).stdout
        flags = {ln.split()[0][1:]: ln.split()[-1] for ln in out.splitlines() if " property " in ln}
        assert {n for n, f in flags.items() if f == "const"} == const, out
        assert {f for n, f in flags.items() if n not in const} <= {"emits-change", "writable"}, out
        assert {"Version", "Name", "Owner"} & set(flags) <= const
    vm_text = _gdbus(service.address, path)
    manager_text = _gdbus(service.address, MANAGER_PATH)
    assert "arg_" not in vm_text + manager_text
    assert re.search(r"GetVcpuAffinity\(in\s+u vcpu,\s+out au cpus\)", vm_text), vm_text
    assert re.search(r"VcpuRepinned\(s vm,\s+u vcpu,\s+au cpus,\s+s reason\)", manager_text), manager_text
    assert re.search(r"ListVMs\(out a\(sso\) vms\)", manager_text), manager_text
    assert "@org.freedesktop.DBus.Property.EmitsChangedSignal(\"const\")" in vm_text


def test_debian_python_and_dbus_fast_serve_the_same(tmp_path: Path) -> None:
    """The package runs on Debian's python3-dbus-fast 1.84, whose introspection
    classes know no annotations: the override must not depend on them."""
    version = "import dbus_fast.__version__ as v; print(v.__version__)"
    probe = subprocess.run(["/usr/bin/python3", "-c", version], capture_output=True, text=True, check=True,
                           cwd="/")
    address_file = tmp_path / "address"
    with (tmp_path / "log").open("w") as log_file:
        proc = subprocess.Popen(
            ["/usr/bin/python3", "-m", "kvmnumad", "--bus", "private", "--demo",
             "--address-file", str(address_file), "--log-target", "stderr"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        wait_until(lambda: proc.poll() is not None or address_file.is_file(), "the daemon's address",
                   timeout=60)
        assert proc.poll() is None, (tmp_path / "log").read_text()
        address = address_file.read_text().strip()
        assert_live_equals_shipped(address, "/org/kvmnuma1/vm/demo")
    finally:
        proc.terminate()
        proc.wait(30)
    log = (tmp_path / "log").read_text()
    assert "introspection:" not in log, log
    assert probe.stdout.startswith("1."), probe.stdout
