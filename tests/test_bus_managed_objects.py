"""GetManagedObjects, served by the Dispatcher from each object's property
mirror in one pass (dbus-fast's handler is quadratic in the objects), must
say what every object's GetAll says.  Observed through busctl on a real
dbus-daemon; no daemon state read back."""

from __future__ import annotations

from kvmnumad.bus.service import BUS_NAME
from tests.busfixtures import (
    MANAGER_PATH,
    VM_IFACE,
    BusClient,
    MiB,
    RunningService,
    busctl,
    options,
)

pytest_plugins = ["tests.busfixtures"]

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPS = "org.freedesktop.DBus.Properties"


def test_get_managed_objects_is_every_vms_get_all(service: RunningService, client: BusClient) -> None:
    client.manager("CreateVM", "suta{sv}", "gmo-a", 2, 4 * MiB, options(numa_nodes=1, policy="local-first"))
    client.manager("CreateVM", "suta{sv}", "gmo-b", 1, 0, options())
    (tree,) = busctl(service.address, "call", BUS_NAME, MANAGER_PATH, OBJECT_MANAGER,
                     "GetManagedObjects")["data"]
    paths = [p for _n, _s, p in client.manager("ListVMs")[0]]
    assert sorted(tree) == sorted(paths)
    for path in paths:
        assert list(tree[path]) == [VM_IFACE]
        (each,) = busctl(service.address, "call", BUS_NAME, path, PROPS, "GetAll", "s", VM_IFACE)["data"]
        assert tree[path][VM_IFACE] == each, path
    assert busctl(service.address, "call", BUS_NAME, paths[0], OBJECT_MANAGER, "GetManagedObjects",
                  check=False).returncode != 0  # only the manager is an ObjectManager
