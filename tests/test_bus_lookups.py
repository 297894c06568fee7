"""One VM lookup per mutating call (issue 12 follow-up): polkit's VM details
come from the Dispatcher's own lookup, not from a second ``get_vm`` in bus/auth.py.

A real service on a real dbus-daemon, an unprivileged caller through gdbus
(so that polkit is asked), and polkit played by ``Counting``: a stand-in
that denies and records, at the moment it is asked, how many times the
Manager's ``get_vm`` had run for this call.  The count comes from a wrapper
around the real Manager's method (it still does the lookup); the details
polkit gets are what it records.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from kvmnumad.bus.auth import PolkitChecker
from kvmnumad.bus.service import BUS_NAME
from kvmnumad.vm import Vm
from tests.busfixtures import MANAGER_IFACE, MANAGER_PATH, VM_IFACE, BusClient, MiB, RunningService

if TYPE_CHECKING:
    from tests.sysfixtures import User

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]

DENIED = "GDBus.Error:org.freedesktop.DBus.Error.AccessDenied"


@dataclass
class Counting:
    """Polkit stand-in: says no, and records (details, get_vm calls so far)."""

    lookups: Callable[[], int] = lambda: 0
    asked: list[tuple[dict[str, str], int]] = field(default_factory=list)

    async def check(self, sender: str, action_id: str, details: dict[str, str], interactive: bool) -> bool:
        self.asked.append((dict(details), self.lookups()))
        return False


@pytest.fixture
def service_checker() -> PolkitChecker:
    return Counting()


def count_lookups(service: RunningService, checker: Counting) -> list[str]:
    """Wrap the service's Manager.get_vm; the list grows by one name per lookup."""
    names: list[str] = []
    real = service.manager.get_vm

    def get_vm(name: str) -> Vm:
        names.append(name)
        return real(name)

    service.manager.get_vm = get_vm  # type: ignore[method-assign]
    checker.lookups = lambda: len(names)
    return names


def gdbus(user: User, address: str, path: str, method: str, *args: str) -> subprocess.CompletedProcess[str]:
    return user.run("gdbus", "call", "--address", address, "--dest", BUS_NAME, "--object-path", path,
                    "--method", method, *args)


@pytest.mark.parametrize("case", [
    (MANAGER_PATH, f"{MANAGER_IFACE}.DestroyVM", ("rootvm",), 1),  # by name: the Dispatcher's lookup
    ("/org/kvmnuma1/vm/rootvm", f"{VM_IFACE}.Destroy", (), 0),  # on its object: the object has the VM
    ("/org/kvmnuma1/vm/rootvm", f"{VM_IFACE}.SetVcpuAffinity", ("0", "[0]"), 0),
])
def test_polkit_gets_the_vm_details_from_the_one_lookup(
    service: RunningService, client: BusClient, service_checker: Any, unpriv_user: User,
    case: tuple[str, str, tuple[str, ...], int],
) -> None:
    """Before, WithVmDetails looked the VM up again: two get_vm for DestroyVM, one for Destroy."""
    path, method, args, lookups = case
    checker: Counting = service_checker
    client.manager("CreateVM", "suta{sv}", "rootvm", 2, 4 * MiB, {})
    names = count_lookups(service, checker)
    out = gdbus(unpriv_user, service.address, path, method, *args)
    assert out.returncode != 0 and DENIED in out.stderr, out.stderr
    assert len(checker.asked) == 1
    details, before_polkit = checker.asked[0]
    assert details["vm"] == "rootvm" and details["owner"] == "0"
    assert details["vcpus"] == "2" and details["memory_bytes"] == str(4 * MiB)
    assert before_polkit == lookups, names
    assert client.get("/org/kvmnuma1/vm/rootvm", VM_IFACE, "State") == "created"  # denied: unchanged
