"""The bus layer's pure parts: path escaping, argument parsing, the error table, which
properties a change touches.

Escaping is checked against sd-bus's rules as busctl applies them: busctl
itself is the observer in test_bus_api (it reaches the escaped path).
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from dbus_fast import DBusError, Variant

from kvmnumad import errors
from kvmnumad.bus import auth
from kvmnumad.bus.args import (
    INTEGER_TYPES,
    check_cpus,
    check_name,
    check_signature,
    parse_options,
    parse_policy,
)
from kvmnumad.bus.auth import ACTION_MANAGE, ACTION_MIGRATE, ACTION_PLACE, OWNER_MAY, owner_may
from kvmnumad.bus.errors import DBUS_NAMES, PUBLISHED_NAMES, to_dbus_error
from kvmnumad.bus.fds import PassedFd
from kvmnumad.bus.manager_object import ManagerObject
from kvmnumad.bus.paths import escape_label, unescape_label, vm_path
from kvmnumad.bus.properties import (
    ASPECT_PROPERTIES,
    MANAGER_PROPERTIES,
    SAMPLED_MANAGER_PROPERTIES,
    SAMPLED_VM_PROPERTIES,
    TOPOLOGY_PROPERTIES,
    TOPOLOGY_VM_PROPERTIES,
    VM_CONSTANT,
    VM_PROPERTIES,
    touched,
)
from kvmnumad.bus.vm_object import VmObject
from kvmnumad.events import Aspect
from kvmnumad.model import CreateOptions, Policy

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ escaping
@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("web", "web"),
        ("Web01", "Web01"),
        ("", "_"),
        ("_", "_5f"),
        ("a-b.c_d", "a_2db_2ec_5fd"),
        ("1vm", "_31vm"),  # sd-bus escapes a leading digit too
        ("v1", "v1"),
        ("a/b", "a_2fb"),
        ("é", "_c3_a9"),  # bytes of the UTF-8 encoding, lowercase hex
    ],
)
def test_escape_label_follows_sd_bus(name: str, escaped: str) -> None:
    assert escape_label(name) == escaped
    assert unescape_label(escaped) == name


def test_unescape_keeps_a_lone_underscore_as_sd_bus_does() -> None:
    assert unescape_label("a_zz") == "a_zz"
    assert unescape_label("a_2") == "a_2"
    assert unescape_label("_2D") == "-"  # upper-case hex is accepted


def test_vm_path() -> None:
    assert vm_path("my-vm.1") == "/org/kvmnuma1/vm/my_2dvm_2e1"


# ----------------------------------------------------------------- arguments
def test_check_signature_names_both() -> None:
    check_signature("CreateVM", "suta{sv}", "suta{sv}")
    with pytest.raises(errors.InvalidArgument, match=r"CreateVM takes arguments \(suta\{sv\}\), got \(sii\)"):
        check_signature("CreateVM", "suta{sv}", "sii")


@pytest.mark.parametrize("name", ["a", "A-b_c.9", "x" * 64])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "ä", "a\n"])
def test_bad_names_are_named(name: str) -> None:
    with pytest.raises(errors.InvalidArgument) as e:
        check_name(name)
    assert repr(name) in str(e.value)


def test_policies() -> None:
    assert parse_policy("local-first") is Policy.LOCAL_FIRST
    with pytest.raises(errors.InvalidArgument, match="'fastest'"):
        parse_policy("fastest")


def test_cpu_lists() -> None:
    assert check_cpus([1, 0]) == [1, 0]
    with pytest.raises(errors.InvalidArgument, match="empty"):
        check_cpus([])
    with pytest.raises(errors.InvalidArgument, match="twice"):
        check_cpus([0, 0])


def test_options_parse_into_create_options() -> None:
    payload = PassedFd(os.open("/dev/null", os.O_RDONLY))  # what bus/fds.py makes of an 'h'
    opts = parse_options(
        {
            "numa_nodes": Variant("u", 2),
            "policy": Variant("s", "interleave"),
            "host_nodes": Variant("au", [0, 1]),
            "payload": Variant("h", payload, verify=False),
            "prealloc": Variant("b", True),
            "start": Variant("b", True),
            "allow_split": Variant("b", True),
            "passes": Variant("u", 3),
        }
    )
    assert opts == CreateOptions(
        numa_nodes=2, policy=Policy.INTERLEAVE, host_nodes=(0, 1), payload=payload,
        prealloc=True, start=True, allow_split=True, passes=3,
    )
    payload.close()
    assert parse_options({}) == CreateOptions()


@pytest.mark.parametrize("signature", sorted(INTEGER_TYPES))
def test_integer_options_take_any_integer_type_that_fits(signature: str) -> None:
    """gdbus and GLib send a plain 2 as int32, Qt as int, busctl what was typed."""
    nodes = bytes([0, 1]) if signature == "y" else [0, 1]  # dbus-fast gives 'ay' as bytes
    opts = parse_options({"numa_nodes": Variant(signature, 2), "passes": Variant(signature, 3),
                          "host_nodes": Variant(f"a{signature}", nodes)})
    assert (opts.numa_nodes, opts.passes, opts.host_nodes) == (2, 3, (0, 1))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"numa_node": Variant("u", 2)}, "unknown option 'numa_node'"),
        ({"numa_nodes": Variant("i", -1)}, r"option 'numa_nodes': -1 does not fit its type 'u'"),
        ({"passes": Variant("x", 1 << 32)}, r"option 'passes': 4294967296 does not fit"),
        ({"passes": Variant("t", (1 << 64) - 1)}, r"option 'passes': 18446744073709551615 does not fit"),
        ({"numa_nodes": Variant("s", "2")}, r"option 'numa_nodes' must be an integer .* got 's'"),
        ({"numa_nodes": Variant("d", 2.0)}, r"option 'numa_nodes' must be an integer .* got 'd'"),
        ({"start": Variant("u", 1)}, "option 'start' must be of type 'b'"),
        ({"host_nodes": Variant("as", ["0"])}, r"'host_nodes' must be an array of integers .* got 'as'"),
        ({"host_nodes": Variant("ai", [0, -2])}, r"option 'host_nodes': -2 does not fit"),
        ({"host_nodes": Variant("au", [0, 0])}, "names a node twice"),
        ({"policy": Variant("s", "fast")}, "unknown policy 'fast'"),
        ({"payload": Variant("s", "/etc/shadow")}, r"takes a file descriptor \(type 'h'\) .* not a path"),
        ({"payload": Variant("h", 0)}, "carries no file descriptor"),  # an index, no fd sent
        ({"payload": Variant("u", 3)}, "must be of type 'h'"),
    ],
)
def test_bad_options_are_named(options: dict[str, Variant], match: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        parse_options(options)


# -------------------------------------------------------------------- errors
def test_every_core_error_has_a_name() -> None:
    assert set(DBUS_NAMES) == set(errors.ERROR_TYPES)
    for cls, name in DBUS_NAMES.items():
        if cls is errors.AccessDenied:
            assert name == "org.freedesktop.DBus.Error.AccessDenied"
        else:
            assert name == f"org.kvmnuma1.Error.{cls.__name__}"


def test_translation_keeps_message_and_subclasses() -> None:
    class Narrower(errors.CpuOffline):
        pass

    e = to_dbus_error(errors.NoSuchVM("no VM named 'x'"))
    assert (e.type, e.text) == ("org.kvmnuma1.Error.NoSuchVM", "no VM named 'x'")
    assert to_dbus_error(Narrower("cpu 9")).type == "org.kvmnuma1.Error.CpuOffline"
    assert to_dbus_error(errors.AccessDenied("no")).type == "org.freedesktop.DBus.Error.AccessDenied"


def test_unexpected_errors_become_internal_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="kvmnumad.bus.errors"):
        try:
            raise KeyError("secret/path/in/traceback")
        except KeyError as exc:
            e = to_dbus_error(exc, "Test.Call")
    assert e.type == "org.kvmnuma1.Error.Internal"
    assert "secret" not in e.text and "KeyError" in e.text
    assert "Test.Call" in caplog.text and "secret/path/in/traceback" in caplog.text  # traceback in the log
    # A foreign DBusError (e.g. Failed from a library) never passes through.
    foreign = DBusError("org.freedesktop.DBus.Error.Failed", "x")
    assert to_dbus_error(foreign).type == "org.kvmnuma1.Error.Internal"


# ------------------------------------------------------------- owner rules
def test_owner_may_place_migrate_and_start_stop_only() -> None:
    assert owner_may(ACTION_PLACE, "set-vcpu-affinity")
    assert owner_may(ACTION_MIGRATE, "map-numa-node")  # their own VM's memory
    assert owner_may(ACTION_MANAGE, "start") and owner_may(ACTION_MANAGE, "stop")
    assert not owner_may(ACTION_MANAGE, "destroy")
    assert not owner_may(ACTION_MANAGE, "create")


# ------------------------------------------------------- what changes touch
def test_every_vm_property_is_constant_or_touched_by_an_aspect() -> None:
    # The sampled ones (Residency, VcpuUsage) change with the sampling timer, not with an aspect.
    served = {p.name for p in VmObject.template().introspect().properties} - SAMPLED_VM_PROPERTIES
    assert set(VM_PROPERTIES) == served
    touched_by_some = frozenset().union(*ASPECT_PROPERTIES.values())
    assert set(ASPECT_PROPERTIES) == set(Aspect)
    assert touched_by_some | VM_CONSTANT == served and not touched_by_some & VM_CONSTANT
    assert touched([Aspect.STATE]) == {"State"}
    assert touched([Aspect.MEMORY, Aspect.STATE]) == {"State", "MemoryBytes", "MemoryRegions"}
    assert touched_by_some >= TOPOLOGY_VM_PROPERTIES


def test_every_manager_property_has_a_reader() -> None:
    served = {p.name for p in ManagerObject(None, {}).introspect().properties}  # type: ignore[arg-type]
    served -= SAMPLED_MANAGER_PROPERTIES  # HostNodeUsage: the sampling timer's
    assert set(MANAGER_PROPERTIES) == served and served >= TOPOLOGY_PROPERTIES


# ------------------------------------------------ the docs say what the code does
def test_the_contract_files_and_docstrings_agree_with_the_code() -> None:
    iface = ET.parse(ROOT / "dbus" / "org.kvmnuma1.VM.xml").getroot().find("interface")
    assert iface is not None
    emits = "org.freedesktop.DBus.Property.EmitsChangedSignal"
    const = {
        p.get("name") for p in iface.findall("property")
        if any(a.get("name") == emits and a.get("value") == "const" for a in p.findall("annotation"))
    }
    assert const == VM_CONSTANT
    manager_doc = (ROOT / "dbus" / "org.kvmnuma1.Manager.xml").read_text()
    named = [c.__name__ for c in errors.ERROR_TYPES if c is not errors.AccessDenied]
    assert [name for name in named if name not in manager_doc] == []
    # every name the bus answers is in the contract's error list, written out
    # (org.kvmnuma1.Error.{A, B} lists ours; the standard ones appear whole)
    listed = set(re.findall(r"org\.freedesktop\.DBus\.Error\.\w+", manager_doc))
    braces = re.search(r"org\.kvmnuma1\.Error\.\{([^}]*)\}", manager_doc)
    assert braces is not None
    listed |= {"org.kvmnuma1.Error." + re.split(r"[\s(]", n.strip())[0] for n in braces.group(1).split(",")}
    assert set(PUBLISHED_NAMES) - listed == set()
    assert auth.__doc__ is not None
    assert all(f"``{action}``" in auth.__doc__ for action in OWNER_MAY)
