"""AdoptProcess and ReleaseVM under the real system-like bus and a real
polkitd with dbus/org.kvmnuma1.policy: org.kvmnuma1.adopt is admin only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from kvmnumad.bus.service import BUS_NAME
from kvmnumad.manager import Manager
from tests.busfixtures import MANAGER_IFACE, MANAGER_PATH, VM_IFACE, RunningService, busctl, run_service
from tests.observe import taskset_affinity
from tests.test_adopt import qemu, vcpu_tids

if TYPE_CHECKING:
    from tests.sysfixtures import Polkitd, SystemBus, User

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]

DENIED = "org.freedesktop.DBus.Error.AccessDenied"


@pytest.fixture
def system_service(system_bus: SystemBus, polkitd: Polkitd, manager: Manager) -> Iterator[RunningService]:
    with run_service(system_bus.address, manager, polkit=True) as running:
        yield running


def test_unprivileged_caller_is_denied_adoption(system_service: RunningService, polkitd: Polkitd,
                                                unpriv_user: User) -> None:
    a, u = system_service.address, unpriv_user
    list_vms = ("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "ListVMs")
    with qemu("pk", smp=2) as q:
        adopt = ("--method", f"{MANAGER_IFACE}.AdoptProcess", str(q.pid), "{}")
        out = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                    *adopt)
        assert out.returncode != 0 and f"GDBus.Error:{DENIED}" in out.stderr, out.stderr
        assert busctl(a, *list_vms)["data"] == [[]]
        # the place and manage actions do not open adoption: it has an action of its own
        with polkitd.grant(u.group, "org.kvmnuma1.place", "org.kvmnuma1.manage"):
            out = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                        *adopt)
            assert out.returncode != 0 and f"GDBus.Error:{DENIED}" in out.stderr, out.stderr
        assert busctl(a, *list_vms)["data"] == [[]]

        # root adopts; the unprivileged user may read but neither pin nor release it
        path = busctl(a, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "AdoptProcess", "ua{sv}", str(q.pid),
                      "0")["data"][0]
        tid = vcpu_tids(q.pid)[1]
        before = taskset_affinity(tid)
        assert busctl(a, "get-property", BUS_NAME, path, VM_IFACE, "Vmm", user=u.name)["data"] == "qemu"
        pin = ("call", BUS_NAME, path, VM_IFACE, "SetVcpuAffinity", "uau", "1", "1", "0")
        assert busctl(a, *pin, user=u.name, check=False).returncode != 0
        assert taskset_affinity(tid) == before
        out = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                    "--method", f"{MANAGER_IFACE}.ReleaseVM", "pk")
        assert out.returncode != 0 and f"GDBus.Error:{DENIED}" in out.stderr, out.stderr
        assert busctl(a, *list_vms)["data"] == [[["pk", "running", path]]]

        # a rule granting org.kvmnuma1.adopt to the user's group lets it release
        with polkitd.grant(u.group, "org.kvmnuma1.adopt"):
            out = u.run("gdbus", "call", "--address", a, "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                        "--method", f"{MANAGER_IFACE}.ReleaseVM", "pk")
            assert out.returncode == 0, out.stderr
        assert busctl(a, *list_vms)["data"] == [[]]
