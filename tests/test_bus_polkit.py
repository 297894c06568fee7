"""End to end with the real parts of a system install: the service on a
system-like dbus-daemon (distribution system.conf + dbus/org.kvmnuma1.conf),
the authorizer the daemon builds (make_authorizer with the real
PolkitChecker), a real polkitd with dbus/org.kvmnuma1.policy, and an
unprivileged user calling through busctl and gdbus.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from kvmnumad.bus.service import BUS_NAME
from kvmnumad.manager import Manager
from tests.busfixtures import MANAGER_IFACE, MANAGER_PATH, VM_IFACE, MiB, RunningService, busctl, run_service

if TYPE_CHECKING:
    from tests.sysfixtures import Polkitd, SystemBus, User

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]

DENIED = "org.freedesktop.DBus.Error.AccessDenied"


@pytest.fixture
def system_service(system_bus: SystemBus, polkitd: Polkitd, manager: Manager) -> Iterator[RunningService]:
    with run_service(system_bus.address, manager, polkit=True) as running:
        yield running


def test_polkit_decides_for_unprivileged_callers(
    system_service: RunningService, polkitd: Polkitd, unpriv_user: User
) -> None:
    a, u = system_service.address, unpriv_user
    list_vms = ("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs")  # busctl as root, an outside reader
    # root passes without polkit
    out = busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "CreateVM", "suta{sv}", "pk", "1",
                 str(2 * MiB), "0")
    path = out["data"][0]
    declared = busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "DeclaredVcpuAffinity")["data"]
    # reads pass the bus policy and need no polkit
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "State", user=u.name)["data"] == "created"

    # polkitd says no (no active session): AccessDenied, by name, and nothing changes
    out = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                "--method", f"{MANAGER_IFACE}.CreateVM", "theirs", "1", str(2 * MiB), "{}")
    assert out.returncode != 0 and f"GDBus.Error:{DENIED}" in out.stderr, out.stderr
    set_pin = ("call", BUS_NAME, path, VM_IFACE, "SetVcpuAffinity", "uau", "0", "1", "0")
    assert busctl(a, *set_pin, user=u.name, check=False).returncode != 0
    assert busctl(a, *list_vms)["data"] == [[["pk", "created", path]]]
    assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "DeclaredVcpuAffinity")["data"] == declared

    # a rules file grants org.kvmnuma1.place to the user's group: placement works, manage still not
    def pinned() -> bool:
        return bool(busctl(a, *set_pin, user=u.name, check=False).returncode == 0)

    with polkitd.grant(u.group, "org.kvmnuma1.place", probe=pinned):
        pins = busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "DeclaredVcpuAffinity")["data"]
        assert pins == [[0, [0]]]
        out = busctl(a, "call", BUS_NAME, path, VM_IFACE, "Stop", user=u.name, check=False)
        assert out.returncode != 0 and "Access denied" in out.stderr
        out = busctl(a, "call", BUS_NAME, path, VM_IFACE, "Destroy", user=u.name, check=False)
        assert out.returncode != 0
    assert busctl(a, *list_vms)["data"] == [[["pk", "created", path]]]
