"""A GLib client of org.kvmnuma1, as a GNOME program would be: Gio's
DBusObjectManagerClient on /org/kvmnuma1, the VM's proxy typed by the
shipped XML (so GDBus itself checks every value against the contract and
drops what does not match, with a warning on stderr).

Run with Debian's /usr/bin/python3 (python3-gi; the venv has no gi):

    /usr/bin/python3 tests/clients/glib_client.py ADDRESS VM_PATH VM_XML

Prints one JSON line per event on stdout:
    {"event": "properties", "objects": [...], "values": {...}, "types": {...}}
      every property the XML declares, read from the proxy's cache (filled
      by the object manager's GetManagedObjects), and its GVariant type
    {"event": "g-properties-changed", "changed": {...}, "invalidated": [...]}
and exits 0 after the first g-properties-changed of the VM (3 after 30 s).
"""

import json
import sys
from typing import Any

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

BUS_NAME = "org.kvmnuma1"
VM_IFACE = "org.kvmnuma1.VM"


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def main(address: str, vm_path: str, xml_path: str) -> int:
    with open(xml_path, encoding="utf-8") as f:
        info = Gio.DBusNodeInfo.new_for_xml(f.read()).lookup_interface(VM_IFACE)
    flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
    conn = Gio.DBusConnection.new_for_address_sync(address, flags, None, None)
    manager = Gio.DBusObjectManagerClient.new_sync(
        conn, Gio.DBusObjectManagerClientFlags.NONE, BUS_NAME, "/org/kvmnuma1", None, None, None)
    objects = sorted(o.get_object_path() for o in manager.get_objects())
    obj = manager.get_object(vm_path)
    if obj is None:
        print(f"{vm_path} is not among the managed objects {objects}", file=sys.stderr)
        return 1
    proxy = obj.get_interface(VM_IFACE)
    proxy.set_interface_info(info)  # from here on GDBus checks types against the XML

    loop = GLib.MainLoop()
    result = {"rc": 3}

    def on_changed(_proxy: Gio.DBusProxy, changed: GLib.Variant, invalidated: list[str]) -> None:
        emit({"event": "g-properties-changed", "changed": changed.unpack(), "invalidated": list(invalidated)})
        result["rc"] = 0
        loop.quit()

    proxy.connect("g-properties-changed", on_changed)
    values: dict[str, Any] = {}
    types: dict[str, str] = {}
    for prop in info.properties:
        value = proxy.get_cached_property(prop.name)
        values[prop.name] = None if value is None else value.unpack()
        types[prop.name] = "" if value is None else value.get_type_string()
    emit({"event": "properties", "objects": objects, "values": values, "types": types,
          "cached": sorted(proxy.get_cached_property_names() or [])})

    def timeout() -> bool:
        loop.quit()
        return False

    GLib.timeout_add_seconds(30, timeout)
    loop.run()
    return result["rc"]


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
