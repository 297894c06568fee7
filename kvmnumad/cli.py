"""kvmnumactl: the command-line client of org.kvmnuma1.

A pure D-Bus client: it knows the bus API and nothing of the core, so it works
against any daemon that speaks the contract (and shows what a third-party tool
would have to do).  Only long-standing dbus-fast API is used (Message, bus.call,
add_message_handler, Variant), because the Debian package runs on dbus-fast 1.84.

Exit codes: 0 success, 1 the bus or the service refused (the error's D-Bus name
is printed without its prefix), 2 the command line itself is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

from dbus_fast import BusType, Message, MessageFlag, MessageType, SignatureTree, Variant
from dbus_fast.aio import MessageBus

from kvmnumad import __version__

PROG = "kvmnumactl"
SERVICE = "org.kvmnuma1"
MANAGER_PATH = "/org/kvmnuma1"
MANAGER_IFACE = "org.kvmnuma1.Manager"
VM_IFACE = "org.kvmnuma1.VM"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DEFAULT_TIMEOUT = 25.0  # seconds; what sd-bus and libdbus use when the caller says nothing
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
POLICIES = ("manual", "local-first", "load-balanced", "interleave", "preferred")


class UsageError(Exception):
    """The command line is wrong; nothing was sent."""


class BusError(Exception):
    """The bus or the service said no; ``name`` is the D-Bus error name (or ours)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


# ---------------------------------------------------------------- parsing

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtpe]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``64M``, ``1G``, ``2GiB`` or ``0x100000``: binary units,
    as `qemu -m` and numactl read them."""
    if text.lower().startswith("0x"):
        try:
            value = int(text, 16)
        except ValueError:
            raise UsageError(f"invalid size {text!r}") from None
    else:
        m = _SIZE_RE.match(text)
        if m is None:
            raise UsageError(f"invalid size {text!r} (use bytes or a K/M/G/T suffix, e.g. 64M)")
        value = int(m.group(1)) << (10 * _UNITS[m.group(2).lower()])
    if value > U64_MAX:
        raise UsageError(f"size {text!r} does not fit in 64 bits")
    return value


def parse_cpulist(text: str) -> list[int]:
    """Sorted indexes from a kernel-style list such as ``0-2,5`` (also node lists)."""
    out: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise UsageError(f"invalid list {text!r} (expected e.g. 0-2,5)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"invalid range {part!r} in {text!r}")
        if hi > U32_MAX:
            raise UsageError(f"index {hi} in {text!r} does not fit in 32 bits")
        out.update(range(lo, hi + 1))
    return sorted(out)


def format_cpulist(values: Sequence[int]) -> str:
    """The inverse of parse_cpulist: ``0-2,5``, as the kernel and taskset print it."""
    runs: list[str] = []
    items = sorted(set(values))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        runs.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(runs)


def parse_u32(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0 <= value <= U32_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range 0..{U32_MAX}")
    return value


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn our UsageError into argparse's error, so bad values read like any other."""

    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = parse.__name__
    return wrapped


def parse_bus(text: str) -> tuple[BusType | None, str | None]:
    """``system``, ``session``, a D-Bus address, or a socket path as a shorthand."""
    if text == "system":
        return BusType.SYSTEM, None
    if text == "session":
        return BusType.SESSION, None
    if text.startswith("/"):
        return None, f"unix:path={text}"
    if all(re.match(r"^[a-z][a-z0-9-]*:", part) for part in text.split(";") if part) and text.strip(";"):
        return None, text
    raise UsageError(f"invalid bus {text!r} (expected system, session, a D-Bus address or a socket path)")


# ---------------------------------------------------------------- the bus


class Client:
    """One connection to the bus, with calls that raise BusError on error replies."""

    def __init__(self, bus: MessageBus, interactive: bool, timeout: float | None) -> None:
        self.bus = bus
        self.flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE
        self.timeout = timeout

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        *,
        signature: str = "",
        body: Sequence[Any] = (),
        destination: str = SERVICE,
    ) -> list[Any]:
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            flags=self.flags,
        )
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), self.timeout)
        except TimeoutError:
            raise BusError("Timeout", f"no reply to {member} within {self.timeout:g} s") from None
        if reply is None:
            raise BusError("Disconnected", f"the bus connection closed during {member}")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            name = reply.error_name or "Failed"
            if name.endswith(".ServiceUnknown"):
                text = f"{text} (is kvmnumad running on this bus?)".strip()
            raise BusError(name, text)
        return list(reply.body)

    async def manager(self, member: str, signature: str = "", *args: Any) -> list[Any]:
        return await self.call(MANAGER_PATH, MANAGER_IFACE, member, signature=signature, body=args)

    async def vm_path(self, name: str) -> str:
        (path,) = await self.manager("GetVM", "s", name)
        return str(path)

    async def vm(self, name: str, member: str, signature: str = "", *args: Any) -> list[Any]:
        return await self.call(await self.vm_path(name), VM_IFACE, member, signature=signature, body=args)

    async def properties(self, path: str, interface: str) -> dict[str, Variant]:
        (props,) = await self.call(path, PROPERTIES_IFACE, "GetAll", signature="s", body=[interface])
        return dict(props)


async def connect(bus_spec: str) -> MessageBus:
    bus_type, address = parse_bus(bus_spec)
    try:
        if address is not None:
            bus = MessageBus(bus_address=address)
        else:
            assert bus_type is not None
            bus = MessageBus(bus_type=bus_type)
        return await bus.connect()
    except Exception as e:  # the library raises OSError, AuthError, InvalidAddressError, ...
        raise BusError("ConnectFailed", f"cannot connect to the {bus_spec} bus: {e}") from None


# ---------------------------------------------------------------- output


def plain(value: Any) -> Any:
    """Variants unwrapped all the way down, so json.dumps takes the result."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return list(value)
    return value


def print_json(value: Any) -> None:
    print(json.dumps(plain(value)), flush=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], legend: str | None = None) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if legend is not None:
        print(f"\n{legend}")


def human_bytes(n: int) -> str:
    """Binary units with one decimal, as machinectl and free -h print sizes."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("K", "M", "G", "T", "P"):
        value /= 1024
        if value < 1024 or unit == "P":
            break
    return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"


def format_value(signature: str, value: Any, name: str = "") -> str:
    """One D-Bus value as a line of text, driven by its signature: structs join with
    ':', arrays with ' ', CPU sets print as cpulists."""
    return _fmt(SignatureTree(signature).types[0], plain(value), name)


def _fmt(t: Any, value: Any, name: str) -> str:
    token = t.token
    if token == "b":
        return "yes" if value else "no"
    if token == "v":
        return json.dumps(value)
    if token == "(":
        return ":".join(_fmt_in_struct(c, v) for c, v in zip(t.children, value, strict=False))
    if token == "a":
        child = t.children[0]
        if child.token == "{":
            return " ".join(f"{k}={_fmt(child.children[1], v, str(k))}" for k, v in value.items())
        if child.token in "uiqnyt" and "cpu" in name.lower():
            return format_cpulist(value)
        return " ".join(_fmt(child, v, name) for v in value)
    return str(value)


def _fmt_in_struct(t: Any, value: Any) -> str:
    # an array of numbers inside a struct is a CPU set in this API (VcpuAffinity, topology)
    if t.token == "a" and t.children[0].token in "uiqnyt":
        return format_cpulist(value) if value else "-"
    return _fmt(t, value, "")


def format_property(name: str, variant: Variant) -> str:
    value = plain(variant)
    if name == "MemoryRegions":
        return "; ".join(
            f"slot {slot} gpa={gpa:#x} size={human_bytes(size)} guest-node={gn} host-node={hn} hva={hva:#x}"
            for slot, gpa, size, gn, hn, hva in value
        )
    if name == "VcpuNodes":
        return " ".join(f"{v}:{node}{'(bound)' if bound else ''}" for v, bound, node in value)
    return format_value(variant.signature, value, name)


def flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    """Nested stats (a{sv} of a{sv} ...) as dotted keys, one value per line."""
    value = value.value if isinstance(value, Variant) else value
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict | Variant) for v in value):
        out = []
        for i, v in enumerate(value):
            out += flatten(f"{prefix}.{i}", v)
        return out
    if isinstance(value, list):
        return [(prefix, " ".join(str(plain(v)) for v in value))]
    if isinstance(value, bool):
        return [(prefix, "yes" if value else "no")]
    return [(prefix, str(value))]


# ---------------------------------------------------------------- commands

Command = Callable[[Client, argparse.Namespace], Awaitable[None]]


def create_options(args: argparse.Namespace, *, plan: bool) -> dict[str, Variant]:
    opts: dict[str, Variant] = {}
    if args.numa_nodes is not None:
        opts["numa_nodes"] = Variant("u", args.numa_nodes)
    if args.policy is not None:
        opts["policy"] = Variant("s", args.policy)
    if args.host_nodes is not None:
        opts["host_nodes"] = Variant("au", args.host_nodes)
    if args.payload is not None:
        opts["payload"] = Variant("s", os.path.abspath(args.payload))
    if args.prealloc:
        opts["prealloc"] = Variant("b", True)
    if args.allow_split:
        opts["allow_split"] = Variant("b", True)
    if args.passes is not None:
        opts["passes"] = Variant("u", args.passes)
    if args.start and not plan:
        opts["start"] = Variant("b", True)
    return opts


async def cmd_topology(c: Client, args: argparse.Namespace) -> None:
    (nodes,) = await c.manager("GetTopology")
    if args.json:
        keys = ("node", "cpus", "total_bytes", "free_bytes", "distances")
        print_json([dict(zip(keys, n, strict=True)) for n in nodes])
        return
    rows = [
        [str(n), format_cpulist(cpus) or "-", human_bytes(total), human_bytes(free), " ".join(map(str, dist))]
        for n, cpus, total, free, dist in nodes
    ]
    print_table(["NODE", "CPUS", "MEMORY", "FREE", "DISTANCES"], rows)


async def cmd_create(c: Client, args: argparse.Namespace) -> None:
    (path,) = await c.manager(
        "CreateVM", "suta{sv}", args.name, args.vcpus, args.memory, create_options(args, plan=False)
    )
    if args.json:
        print_json({"name": args.name, "path": path})
    else:
        print(path)


async def cmd_plan(c: Client, args: argparse.Namespace) -> None:
    (plan,) = await c.manager("PlanVM", "uta{sv}", args.vcpus, args.memory, create_options(args, plan=True))
    try:
        parsed = json.loads(plan)
    except ValueError:
        print(plan)
        return
    print(json.dumps(parsed) if args.json else json.dumps(parsed, indent=2))


async def cmd_list(c: Client, args: argparse.Namespace) -> None:
    (vms,) = await c.manager("ListVMs")
    vms = sorted(vms, key=lambda v: v[0])
    if args.json:
        print_json([{"name": n, "state": s, "path": p} for n, s, p in vms])
        return
    legend = f"{len(vms)} VM{'' if len(vms) == 1 else 's'} listed."
    print_table(["NAME", "STATE", "PATH"], [[n, s, p] for n, s, p in vms], legend)


async def cmd_show(c: Client, args: argparse.Namespace) -> None:
    props = await c.properties(await c.vm_path(args.name), VM_IFACE)
    if args.json:
        print_json(props)
        return
    for name, variant in props.items():
        print(f"{name}={format_property(name, variant)}")


def _vm_call(member: str, signature: str = "", *fields: str) -> Command:
    async def run(c: Client, args: argparse.Namespace) -> None:
        await c.vm(args.name, member, signature, *(getattr(args, f) for f in fields))

    return run


async def cmd_destroy(c: Client, args: argparse.Namespace) -> None:
    await c.manager("DestroyVM", "s", args.name)


async def cmd_numa(c: Client, args: argparse.Namespace) -> None:
    if args.action == "disable":
        await c.vm(args.name, "DisableNuma")
        return
    await c.vm(args.name, "EnableNuma", "u", args.nodes)


async def cmd_memory(c: Client, args: argparse.Namespace) -> None:
    (slot,) = await c.vm(args.name, "SetupNumaMemory", "utt", args.node, args.size, args.gpa)
    if args.json:
        print_json({"slot": slot})
    else:
        print(slot)


async def cmd_stats(c: Client, args: argparse.Namespace) -> None:
    (stats,) = await c.vm(args.name, "GetStats")
    if args.json:
        print_json(stats)
        return
    # vcpu_* maps keyed by vCPU index become one table row per vCPU; the rest key=value lines
    per_vcpu = {
        k.removeprefix("vcpu_"): plain(v)
        for k, v in stats.items()
        if k.startswith("vcpu_") and isinstance(plain(v), dict)
    }
    rest = {k: v for k, v in stats.items() if not (k.startswith("vcpu_") and k[5:] in per_vcpu)}
    for key, value in flatten("", rest):
        print(f"{key}={value}")
    if not per_vcpu:
        return
    vcpus = sorted({int(i) for column in per_vcpu.values() for i in column})

    def cell(value: Any) -> str:
        if isinstance(value, dict):
            return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
        return "-" if value is None else str(value)

    rows = [[str(i), *(cell(col.get(str(i))) for col in per_vcpu.values())] for i in vcpus]
    print()
    print_table(["VCPU", *(k.upper() for k in per_vcpu)], rows)


async def cmd_report(c: Client, args: argparse.Namespace) -> None:
    (report,) = await c.manager("GetReport")
    if not args.json:
        print(report.rstrip("\n"))
        return
    try:
        print(json.dumps(json.loads(report)))
    except ValueError:
        print_json({"report": report})


async def cmd_suggestions(c: Client, args: argparse.Namespace) -> None:
    (items,) = await c.manager("GetSuggestions")
    if args.json:
        print_json([{"vm": vm, "action": action, "reason": reason} for vm, action, reason in items])
        return
    legend = f"{len(items)} suggestion{'' if len(items) == 1 else 's'}."
    print_table(["VM", "ACTION", "REASON"], [list(i) for i in items], legend)


# ---------------------------------------------------------------- monitor

_SIGNALS = {
    (MANAGER_IFACE, "TopologyChanged"): ("online_cpus",),
    (MANAGER_IFACE, "VcpuRepinned"): ("vm", "vcpu", "cpus", "reason"),
    (PROPERTIES_IFACE, "PropertiesChanged"): ("interface", "changed", "invalidated"),
    (OBJECT_MANAGER_IFACE, "InterfacesAdded"): ("path", "interfaces"),
    (OBJECT_MANAGER_IFACE, "InterfacesRemoved"): ("path", "interfaces"),
}


class Monitor:
    """Prints the service's signals one line each.  Knows VM names by path from
    ListVMs and InterfacesAdded, so PropertiesChanged lines say which VM."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.names: dict[str, str] = {}
        self.lost = asyncio.Event()

    def handle(self, msg: Message) -> None:
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
        if msg.member == "PropertiesChanged" and "Name" in args["changed"]:
            self.names[path] = plain(args["changed"]["Name"])
        vm = self.names.get(args.get("path", path), "")
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
            return f"online-cpus={format_cpulist(a['online_cpus'])}"
        if member == "VcpuRepinned":
            cpus = format_cpulist(a["cpus"]) or "-"
            return f"vm={a['vm']} vcpu={a['vcpu']} cpus={cpus} reason={a['reason']}"
        if member == "PropertiesChanged":
            changed = " ".join(f"{k}={format_property(k, v)}" for k, v in a["changed"].items())
            gone = " ".join(f"{k}=?" for k in a["invalidated"])
            return f"{where} {changed} {gone}".rstrip()
        if member == "InterfacesAdded":
            return f"{where} {a['path']} {' '.join(sorted(a['interfaces']))}"
        if member == "InterfacesRemoved":
            return f"{where} {a['path']} {' '.join(a['interfaces'])}"
        if member == "ServiceOwnerChanged":
            return f"{SERVICE} {'appeared' if a['new'] else 'vanished'} {a['new'] or a['old']}"
        return where


async def cmd_monitor(c: Client, args: argparse.Namespace) -> None:
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


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: UsageError: {message} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(2)


def add_common(p: argparse.ArgumentParser, *, top: bool) -> None:
    """Global options, accepted before and after the command.  Each parser gets
    its own actions (argparse shares them through ``parents``); below the top
    they default to SUPPRESS so they don't overwrite what came before the command."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    p.add_argument(
        "--bus",
        metavar="system|session|ADDRESS",
        default=default(os.environ.get("KVMNUMAD_BUS") or "system"),
        help="bus to use: system, session, a D-Bus address or a socket path "
        "(default: $KVMNUMAD_BUS, else system)",
    )
    p.add_argument("--json", action="store_true", default=default(False), help="print JSON, not tables")
    ask = p.add_mutually_exclusive_group()
    ask.add_argument(
        "--no-ask-password",
        dest="interactive",
        action="store_false",
        default=default(None),
        help="never let polkit ask for a password (default when stdin is not a terminal)",
    )
    ask.add_argument(
        "--ask-password",
        dest="interactive",
        action="store_true",
        default=default(None),
        help="allow polkit to ask for a password (default when stdin is a terminal)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT),
        help=f"give up waiting for a reply after this long (0: wait forever; default {DEFAULT_TIMEOUT:g})",
    )


def check_numa(args: argparse.Namespace) -> None:
    if args.action == "disable" and args.nodes is not None:
        raise UsageError("numa disable takes no node count")
    if args.action == "enable" and args.nodes is None:
        raise UsageError("numa enable needs a node count, e.g. 'numa NAME enable 2'")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Control kvmnumad, the NUMA-aware KVM daemon, over D-Bus (org.kvmnuma1).",
    )
    add_common(parser, top=True)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_common(p, top=False)
        p.set_defaults(func=func, check=None)
        return p

    def vm_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="NAME")

    def sizing(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vcpus", type=parse_u32, required=True, metavar="N")
        p.add_argument(
            "--memory", type=_arg(parse_size), required=True, metavar="SIZE", help="e.g. 64M, 1G, 4096"
        )
        p.add_argument("--numa-nodes", type=parse_u32, metavar="N", help="guest NUMA nodes (0: NUMA off)")
        p.add_argument("--policy", choices=POLICIES)
        p.add_argument(
            "--host-nodes", type=_arg(parse_cpulist), metavar="LIST", help="allowed host nodes, e.g. 0,1"
        )
        p.add_argument("--payload", metavar="PATH", help="flat binary to run (default: built-in payload)")
        p.add_argument("--prealloc", action="store_true", help="fault all guest memory in at creation")
        p.add_argument("--allow-split", action="store_true", help="local-first may split a guest node")
        p.add_argument("--passes", type=parse_u32, metavar="N", help="built-in payload: passes before HLT")
        p.add_argument("--start", action="store_true", help="start the VM once created")

    add("topology", cmd_topology, "host NUMA nodes: CPUs, memory, distances")
    p = add("create", cmd_create, "create a VM and print its object path")
    vm_arg(p)
    sizing(p)
    p = add("plan", cmd_plan, "print the placement a create would get, creating nothing")
    p.add_argument("name", metavar="NAME", nargs="?", help="ignored: lets a create line be dry-run")
    sizing(p)
    add("list", cmd_list, "list VMs")
    vm_arg(add("show", cmd_show, "all properties of a VM"))
    vm_arg(add("start", _vm_call("Start"), "start a VM"))
    vm_arg(add("stop", _vm_call("Stop"), "stop a VM"))
    vm_arg(add("destroy", cmd_destroy, "destroy a VM"))
    p = add("pin", _vm_call("SetVcpuAffinity", "uau", "vcpu", "cpus"), "pin a vCPU to host CPUs")
    vm_arg(p)
    p.add_argument("vcpu", type=parse_u32, metavar="VCPU")
    p.add_argument("cpus", type=_arg(parse_cpulist), metavar="CPULIST", help="e.g. 0-2,5")
    p = add("bind", _vm_call("BindVcpuToNumaNode", "uu", "vcpu", "node"), "bind a vCPU to a guest NUMA node")
    vm_arg(p)
    p.add_argument("vcpu", type=parse_u32, metavar="VCPU")
    p.add_argument("node", type=parse_u32, metavar="NODE")
    p = add("numa", cmd_numa, "turn guest NUMA on with N nodes, or off")
    p.set_defaults(check=check_numa)
    vm_arg(p)
    p.add_argument("action", choices=("enable", "disable"))
    p.add_argument("nodes", type=parse_u32, nargs="?", metavar="N")
    p = add("map", _vm_call("MapNumaNode", "uu", "node", "host_node"), "map a guest node to a host node")
    vm_arg(p)
    p.add_argument("node", type=parse_u32, metavar="NODE")
    p.add_argument("host_node", type=parse_u32, metavar="HOST_NODE")
    p = add("memory", cmd_memory, "add a memory region to a guest node; prints its slot")
    vm_arg(p)
    p.add_argument("node", type=parse_u32, metavar="NODE")
    p.add_argument("size", type=_arg(parse_size), metavar="SIZE")
    p.add_argument(
        "gpa", type=_arg(parse_size), metavar="GPA", help="guest-physical address, e.g. 0x4000000 or 64M"
    )
    vm_arg(add("stats", cmd_stats, "exits, vCPU times and CPUs, pages per host node, dirty pages"))
    add("report", cmd_report, "the daemon's placement report")
    add("suggestions", cmd_suggestions, "the daemon's placement suggestions")
    add("monitor", cmd_monitor, "print the service's signals as they come, until Ctrl-C")
    return parser


async def run(args: argparse.Namespace) -> None:
    interactive = sys.stdin.isatty() if args.interactive is None else args.interactive
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    bus = await connect(args.bus)
    try:
        await args.func(Client(bus, interactive, timeout), args)
    finally:
        bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        parse_bus(args.bus)
        if args.check is not None:
            args.check(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except UsageError as e:
        print(f"{PROG}: UsageError: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(args))
    except UsageError as e:
        print(f"{PROG}: UsageError: {e}", file=sys.stderr)
        return 2
    except BusError as e:
        print(f"{PROG}: {e.name.rsplit('.', 1)[-1]}: {e.message}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `kvmnumactl list | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
