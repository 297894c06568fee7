"""The names of org.kvmnuma1 on the bus: bus name, interfaces, object paths.

A VM's object path element is its name escaped as sd-bus escapes it
(sd_bus_path_encode), so that busctl, gdbus and systemd's own tools name the
same object we do; escaping is its own rule, written once here.
"""

from __future__ import annotations

BUS_NAME = "org.kvmnuma1"
MANAGER_INTERFACE = "org.kvmnuma1.Manager"
MANAGER_PATH = "/org/kvmnuma1"
VM_INTERFACE = "org.kvmnuma1.VM"
VM_PATH_PREFIX = "/org/kvmnuma1/vm"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"

_HEX = frozenset("0123456789abcdefABCDEF")


def escape_label(label: str) -> str:
    """One object path element from any string, as sd-bus does: every byte
    outside [A-Za-z0-9], and a leading digit, becomes ``_xx`` (lowercase
    hex); the empty string becomes ``_``."""
    if not label:
        return "_"
    out = []
    for i, byte in enumerate(label.encode()):
        c = chr(byte)
        if c.isascii() and (c.isalpha() or (i > 0 and c.isdigit())):
            out.append(c)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def unescape_label(element: str) -> str:
    """Inverse of escape_label (sd-bus keeps a ``_`` not followed by two hex
    digits as it is, and so do we)."""
    if element == "_":
        return ""
    data = bytearray()
    i = 0
    while i < len(element):
        hexpair = element[i + 1 : i + 3]
        if element[i] == "_" and len(hexpair) == 2 and set(hexpair) <= _HEX:
            data.append(int(hexpair, 16))
            i += 3
        else:
            data.extend(element[i].encode())
            i += 1
    return data.decode(errors="surrogateescape")


def vm_path(name: str) -> str:
    return f"{VM_PATH_PREFIX}/{escape_label(name)}"


JOB_INTERFACE = "org.kvmnuma1.Job"
JOB_PATH_PREFIX = "/org/kvmnuma1/job"


def job_path(job_id: int) -> str:
    return f"{JOB_PATH_PREFIX}/{job_id}"
