"""``kvmnumactl monitor``: the service's signals, one line each, until stopped.

Unlike busctl monitor it needs no eavesdropping rights: it adds ordinary
match rules for what the service broadcasts, so any user may run it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any

from dbus_fast import Message, MessageType

from kvmnumad import cpulist
from kvmnumad.cli.client import (
    DBUS_NAME,
    DBUS_PATH,
    MANAGER_IFACE,
    OBJECT_MANAGER_IFACE,
    PROPERTIES_IFACE,
    SERVICE,
    VM_IFACE,
    BusError,
    Client,
)
from kvmnumad.cli.output import format_property, plain

# the argument names of each signal we print, as the bus API names them
_SIGNALS = {
    (MANAGER_IFACE, "TopologyChanged"): ("online_cpus",),
    (MANAGER_IFACE, "VcpuRepinned"): ("vm", "vcpu", "cpus", "reason"),
    (PROPERTIES_IFACE, "PropertiesChanged"): ("interface", "changed", "invalidated"),
    (OBJECT_MANAGER_IFACE, "InterfacesAdded"): ("path", "interfaces"),
    (OBJECT_MANAGER_IFACE, "InterfacesRemoved"): ("path", "interfaces"),
    (MANAGER_IFACE, "JobNew"): ("id", "job", "vm"),
    (MANAGER_IFACE, "JobRemoved"): ("id", "job", "vm", "result"),
}


def member_is_job(msg: Message) -> bool:
    return msg.interface == MANAGER_IFACE and msg.member in ("JobNew", "JobRemoved")


class Monitor:
    """Knows VM names by path, from ListVMs and InterfacesAdded, so that a
    PropertiesChanged line says which VM and not only an escaped path.  Name is
    const on the bus, so those two sources are all there is."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.names: dict[str, str] = {}

    def handle(self, msg: Message) -> None:
        # the handler sees every message on the connection, method replies included
        if msg.message_type != MessageType.SIGNAL:
            return
        if (msg.interface, msg.member) == (DBUS_NAME, "NameOwnerChanged"):
            if msg.body[0] == SERVICE:
                self.emit("ServiceOwnerChanged", msg.path or "", {"old": msg.body[1], "new": msg.body[2]}, "")
            return
        fields = _SIGNALS.get((msg.interface or "", msg.member or ""))
        if fields is None:
            return
        args = dict(zip(fields, msg.body, strict=False))
        path = msg.path or ""
        if msg.member == "InterfacesAdded":
            props = args["interfaces"].get(VM_IFACE, {})
            if "Name" in props:
                self.names[args["path"]] = plain(props["Name"])
        # the object a signal is about: an added or removed one, a job's VM, else the sender's
        vm = self.names.get(args.get("path", args["vm"] if member_is_job(msg) else path), "")
        self.emit(msg.member or "", path, args, vm)
        if msg.member == "InterfacesRemoved":
            self.names.pop(args["path"], None)

    def emit(self, member: str, path: str, args: dict[str, Any], vm: str) -> None:
        stamp = time.time()
        if self.as_json:
            line: dict[str, Any] = {"time": round(stamp, 6), "signal": member, "path": path}
            if vm:
                line["vm"] = vm
            line["args"] = plain(args)
            print(json.dumps(line), flush=True)
            return
        clock = time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}"
        print(f"{clock} {member} {self.describe(member, path, args, vm)}".rstrip(), flush=True)

    def describe(self, member: str, path: str, a: dict[str, Any], vm: str) -> str:
        where = f"vm={vm}" if vm else path
        if member == "TopologyChanged":
            return f"online-cpus={cpulist.format(a['online_cpus'])}"
        if member == "VcpuRepinned":
            cpus = cpulist.format(a["cpus"]) or "-"
            return f"vm={a['vm']} vcpu={a['vcpu']} cpus={cpus} reason={a['reason']}"
        if member == "PropertiesChanged":
            changed = " ".join(f"{k}={format_property(k, v)}" for k, v in a["changed"].items())
            gone = " ".join(f"{k}=?" for k in a["invalidated"])
            return f"{where} {changed} {gone}".rstrip()
        if member == "InterfacesAdded":
            return f"{where} {a['path']} {' '.join(sorted(a['interfaces']))}"
        if member == "InterfacesRemoved":
            return f"{where} {a['path']} {' '.join(a['interfaces'])}"
        if member in ("JobNew", "JobRemoved"):
            result = f" result={a['result']}" if "result" in a else ""
            return f"job={a['id']} {where if vm else 'vm=' + a['vm']} {a['job']}{result}"
        if member == "ServiceOwnerChanged":
            return f"{SERVICE} {'appeared' if a['new'] else 'vanished'} {a['new'] or a['old']}"
        return where


async def cmd_monitor(c: Client, args: argparse.Namespace) -> None:
    """Runs on an empty bus too: it reports the service when it appears."""
    mon = Monitor(args.json)
    rules = [
        f"type='signal',sender='{SERVICE}'",
        f"type='signal',sender='{DBUS_NAME}',member='NameOwnerChanged',arg0='{SERVICE}'",
    ]
    c.bus.add_message_handler(mon.handle)
    for rule in rules:
        await c.call(DBUS_PATH, DBUS_NAME, "AddMatch", signature="s", body=[rule], destination=DBUS_NAME)
    try:
        for name, _state, path in (await c.manager("ListVMs"))[0]:
            mon.names[path] = name
    except BusError as e:
        if not e.name.endswith(".ServiceUnknown"):
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # only now: scripts and tests take this line as "matches are in, signals handled"
    print(f"Monitoring {SERVICE} signals; Ctrl-C to stop.", file=sys.stderr, flush=True)
    done = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(c.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    await asyncio.wait([done, lost], return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        done.cancel()
        raise BusError("Disconnected", "the bus connection closed")
    lost.cancel()
