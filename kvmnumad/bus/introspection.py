"""The shipped contract (dbus/org.kvmnuma1.*.xml) as the live introspection.

dbus-fast builds ``Introspect`` from its decorators alone: no annotations
(DocString, EmitsChangedSignal, Qt's QtTypeName), no out-argument or signal
argument names, so gdbus and D-Feet show ``arg_0``, busctl shows no
``const`` and qdbusxml2cpp cannot be fed the live XML.  Writing all that
twice (in decorators and in the XML) would let the two drift, and dbus-fast
1.84 (Debian's, the package's dependency) has no annotations at all.

So the XML stays the one place where names, docs and annotations are
written, and the code stays the one place that says what exists and with
which signature.  ``served(code)`` merges them: every member the code has is
rendered as the XML writes it, *if* the XML has it with the same signature
(and in-argument names, the ones dbus-fast's Python parameters give); a
member the code has and the XML lacks or types differently is rendered as
the code has it, bare, and logged.  Members only the XML has are not served:
the introspection never promises what the code cannot answer.
``differences`` names each disagreement; the contract test requires none.

The files are looked up in the source checkout (``dbus/``) and where the
packages install them (``/usr/share/dbus-1/interfaces/``, the freedesktop
location for interface descriptions).
"""

from __future__ import annotations

import copy
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dbus_fast import introspection as intr

log = logging.getLogger(__name__)

CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "dbus"
INSTALLED_DIR = Path("/usr/share/dbus-1/interfaces")
INTERFACE_DIRS: tuple[Path, ...] = (CHECKOUT_DIR, INSTALLED_DIR)

MEMBER_TAGS = ("method", "signal", "property")

Key = tuple[str, str]  # (tag, member name)


def contract_file(interface: str, dirs: Iterable[Path] = INTERFACE_DIRS) -> Path | None:
    """The first ``<interface>.xml`` in ``dirs`` (a checkout before an
    install: a developer's tree describes the code that runs from it)."""
    for d in dirs:
        path = d / f"{interface}.xml"
        if path.is_file():
            return path
    return None


def parse_contract(path: Path, interface: str) -> ET.Element:
    """The ``<interface name=...>`` element of ``path``, its whitespace
    stripped (dbus-fast indents what it serves)."""
    found = [i for i in ET.parse(path).getroot().iter("interface") if i.get("name") == interface]
    if len(found) != 1:
        raise ValueError(f"{path} describes interface {interface} {len(found)} times, not once")
    element = copy.deepcopy(found[0])
    for e in element.iter():
        e.text = e.tail = None
    return element


_CONTRACTS: dict[str, ET.Element | None] = {}


def contract(interface: str) -> ET.Element | None:
    """The shipped description of ``interface``, parsed once; None (logged)
    when no file describes it."""
    if interface not in _CONTRACTS:
        path = contract_file(interface)
        if path is None:
            log.error("no %s.xml in %s: introspection has no documentation or annotations",
                      interface, ", ".join(map(str, INTERFACE_DIRS)))
            _CONTRACTS[interface] = None
        else:
            _CONTRACTS[interface] = parse_contract(path, interface)
    return _CONTRACTS[interface]


# ------------------------------------------------------------- comparison
def _element_spec(e: ET.Element) -> Any:
    """What must agree between code and contract: types, directions, in-argument
    names (dbus-fast's, from the Python parameters) and property access."""
    if e.tag == "property":
        return (e.get("type"), e.get("access"))
    args = e.findall("arg")
    if e.tag == "signal":
        return tuple(a.get("type") for a in args)
    return tuple(
        (a.get("direction", "in"), a.get("type"), a.get("name") if a.get("direction", "in") == "in" else None)
        for a in args
    )


def _code_elements(code: intr.Interface) -> dict[Key, ET.Element]:
    members: list[Any] = [*code.methods, *code.signals, *code.properties]
    elements = (m.to_xml() for m in members)
    return {(e.tag, e.get("name", "")): e for e in elements}


def contract_members(element: ET.Element) -> dict[Key, ET.Element]:
    return {(e.tag, e.get("name", "")): e for e in element if e.tag in MEMBER_TAGS}


def differences(code: intr.Interface, element: ET.Element | None) -> list[str]:
    """Every way the code's members and the contract's disagree, one line each."""
    if element is None:
        return [f"{code.name}: no contract file"]
    ours, theirs = _code_elements(code), contract_members(element)
    out = [f"{code.name}: {tag} {name} is in the code, not in the contract"
           for tag, name in sorted(ours.keys() - theirs.keys())]
    out += [f"{code.name}: {tag} {name} is in the contract, not in the code"
            for tag, name in sorted(theirs.keys() - ours.keys())]
    for key in sorted(ours.keys() & theirs.keys()):
        a, b = _element_spec(ours[key]), _element_spec(theirs[key])
        if a != b:
            out.append(f"{code.name}: {key[0]} {key[1]} is {a} in the code, {b} in the contract")
    return out


# ---------------------------------------------------------------- serving
class ContractInterface(intr.Interface):
    """The code's interface (its members, as the Dispatcher and
    GetManagedObjects read them) rendered as the contract writes it."""

    def __init__(self, code: intr.Interface, element: ET.Element) -> None:
        super().__init__(code.name, methods=code.methods, signals=code.signals, properties=code.properties)
        self._element = element

    def to_xml(self) -> ET.Element:
        return copy.deepcopy(self._element)


def served(code: intr.Interface) -> intr.Interface:
    """What Introspect shows of ``code`` (module doc), disagreements logged."""
    element = contract(code.name)
    problems = differences(code, element)
    for line in problems:
        log.error("introspection: %s", line)
    if element is None:
        return code
    ours, theirs = _code_elements(code), contract_members(element)
    agreed = {k for k in ours.keys() & theirs.keys() if _element_spec(ours[k]) == _element_spec(theirs[k])}
    out = ET.Element("interface", dict(element.attrib))
    for child in element:
        key = (child.tag, child.get("name", ""))
        if child.tag not in MEMBER_TAGS:
            out.append(copy.deepcopy(child))  # the interface's own annotations
        elif key in agreed:
            out.append(copy.deepcopy(child))
        elif key in ours:
            out.append(ours[key])
    out.extend(e for k, e in ours.items() if k not in theirs)
    return ContractInterface(code, out)
