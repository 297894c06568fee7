# D-Bus signatures are string annotations, as dbus-fast reads them:
# mypy: disable-error-code="name-defined,valid-type"
# ruff: noqa: F821
"""Default deny: every member the bus shows declares its access, and one that
does not is refused, to root too.

The list of members is what the running service answers to Introspect (read
by gdbus), not the classes' own view; each is looked up in the declarations
the Dispatcher enforces, and every action must be one that
dbus/org.kvmnuma1.policy installs.  What the Dispatcher asks for each
declared member is test_bus_auth's subject (an unprivileged caller, polkit
played by a table).
"""

import logging
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast.service import dbus_property, method

from kvmnumad.bus.access import access_of, declarations, read_only, requires, setter, setters
from kvmnumad.bus.auth import ACTION_PLACE
from kvmnumad.bus.dispatch import BusObject, Subject
from kvmnumad.bus.manager_object import ManagerObject
from kvmnumad.bus.paths import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, VM_INTERFACE
from kvmnumad.bus.vm_object import VmObject
from tests.busfixtures import PROPS_IFACE, BusClient, MiB, RunningService

pytest_plugins = ["tests.busfixtures"]  # bus_daemon, service, client
ROOT = Path(__file__).resolve().parent.parent
CLASSES: dict[str, type[BusObject]] = {MANAGER_INTERFACE: ManagerObject, VM_INTERFACE: VmObject}
DENIED = "org.freedesktop.DBus.Error.AccessDenied"


def policy_actions() -> set[str]:
    root = ET.parse(ROOT / "dbus" / "org.kvmnuma1.policy").getroot()
    return {a.get("id", "") for a in root.findall("action")}


def live_interfaces(address: str, path: str) -> list[ET.Element]:
    out = subprocess.run(["gdbus", "introspect", "--address", address, "--dest", BUS_NAME, "--object-path",
                          path, "--xml"], capture_output=True, text=True, timeout=30, check=True).stdout
    ifaces = ET.fromstring(out).findall("interface")
    return [i for i in ifaces if i.get("name", "").startswith("org.kvmnuma1.")]


def test_every_live_method_and_writable_property_is_read_only_or_has_an_action(
    service: RunningService, client: BusClient
) -> None:
    (vm,) = client.manager("CreateVM", "suta{sv}", "decl", 1, 2 * MiB, {})
    actions = policy_actions()
    seen: dict[str, list[str]] = {}
    for path in (MANAGER_PATH, vm):
        for iface in live_interfaces(service.address, path):
            name = iface.get("name", "")
            declared = declarations(CLASSES[name])
            for m in iface.findall("method"):
                member = m.get("name", "")
                access = declared.get(member)
                assert access is not None, f"{name}.{member} declares neither an action nor @read_only"
                assert access.read_only or access.action in actions, (member, access.action, actions)
                assert access.read_only or access.verb, f"{name}.{member} has an action but no verb"
                seen.setdefault(name, []).append(member)
            for p in iface.findall("property"):
                if p.get("access") in ("readwrite", "write"):
                    prop = p.get("name", "")
                    fn = setters(CLASSES[name]).get(prop)
                    access = access_of(fn) if fn is not None else None
                    assert access is not None and access.action in actions, f"{name}.{prop} is writable"
                    seen.setdefault(name, []).append(prop)
    assert set(seen) == {MANAGER_INTERFACE, VM_INTERFACE}
    assert "DefaultPolicy" in seen[MANAGER_INTERFACE] and "SetVcpuAffinity" in seen[VM_INTERFACE]


# ----------------------------------------------- a member nobody declared
class Careless(BusObject):
    """What a new method looks like when its author forgot the declaration."""

    def __init__(self) -> None:
        super().__init__("org.kvmnuma1.Careless", {"Colour": "blue"})
        self.wiped = False

    def subject(self) -> Subject:
        return Subject(None, None, "/org/kvmnuma1/careless")

    @method()
    async def Wipe(self) -> None:
        self.wiped = True

    @method()
    @read_only
    async def Look(self) -> "b":
        return self.wiped

    @dbus_property()
    def Colour(self) -> "s":
        return str(self._props["Colour"])

    @Colour.setter  # type: ignore[no-redef]
    def Colour(self, value: "s") -> None:
        self._props["Colour"] = value


CARELESS = "/org/kvmnuma1/careless"


@pytest.fixture
def careless(service: RunningService) -> Careless:
    obj = Careless()

    async def export() -> None:
        service.service.dispatcher.export(CARELESS, obj)

    service.loop.run(export())
    return obj


def test_a_method_without_a_declaration_is_refused_even_for_root(
    service: RunningService, client: BusClient, careless: Careless, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="kvmnumad.bus.dispatch"):
        name, text = client.error(BUS_NAME, CARELESS, "org.kvmnuma1.Careless", "Wipe")
    assert (name, careless.wiped) == (DENIED, False)
    assert "Wipe declares neither an action nor @read_only" in text
    refused = [r.getMessage() for r in caplog.records if "default deny" in r.getMessage()]
    assert len(refused) == 1 and "org.kvmnuma1.Careless.Wipe" in refused[0]
    # a declared read on the same object runs
    assert client.ok(BUS_NAME, CARELESS, "org.kvmnuma1.Careless", "Look") == [False]


def test_a_writable_property_without_a_setter_is_refused_even_for_root(
    service: RunningService, client: BusClient, careless: Careless
) -> None:
    name, text = client.error(BUS_NAME, CARELESS, PROPS_IFACE, "Set", "ssv",
                              ["org.kvmnuma1.Careless", "Colour", Variant("s", "red")])
    assert name == DENIED and "Colour has no @setter" in text
    assert client.get(CARELESS, "org.kvmnuma1.Careless", "Colour") == "blue"


# ----------------------------------------------------- the declarations
def test_a_declaration_must_name_real_arguments() -> None:
    with pytest.raises(TypeError, match="has no argument cpu"):
        class Typo(BusObject):
            @method()
            @requires(ACTION_PLACE, verb="pin", checks={"cpu": list})
            async def Pin(self, cpus: "au") -> None: ...


def test_a_member_declares_once() -> None:
    with pytest.raises(TypeError, match="declares its access twice"):
        class Twice(BusObject):
            @method()
            @read_only
            @requires(ACTION_PLACE, verb="pin")
            async def Pin(self, cpus: "au") -> None: ...


def test_the_declaration_may_sit_above_or_below_method() -> None:
    class Both(BusObject):
        @method()
        @requires(ACTION_PLACE, verb="below")
        async def Below(self) -> None: ...

        @requires(ACTION_PLACE, verb="above")
        @method()
        async def Above(self) -> None: ...

        @setter("Thing")
        @requires(ACTION_PLACE, verb="thing")
        async def set_thing(self, value: Any) -> None: ...

    declared = declarations(Both)
    verbs = {name: a.verb for name, a in declared.items() if a is not None}
    assert verbs == {"Below": "below", "Above": "above"}
    assert access_of(setters(Both)["Thing"]) is not None
