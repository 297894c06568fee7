"""The one-shot commands: one or two calls each, then the answer printed.

A command gets the parsed arguments and a Client and nothing else, so that
it stays a plain translation from the command line to the bus API.

With ``--json`` every command prints exactly one JSON object, so that
``kvmnumactl ... --json | jq`` always has something to read: lists are
wrapped under a key (``{"vms": [...]}``), and a command that changes something
prints the VM's name under ``"vm"`` with what it applied, in the bus API's
argument names and units (``{"vm": "web", "vcpu": 1, "cpus": [2, 3]}``).
The man page lists every shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import Variant

from kvmnumad import cpulist
from kvmnumad.cli.client import MANAGER_IFACE, MANAGER_PATH, VM_IFACE, BusError, Client
from kvmnumad.cli.output import flatten, format_property, human_bytes, plain, print_json, print_table
from kvmnumad.cli.replies import plan_object, stats_object

Command = Callable[[Client, argparse.Namespace], Awaitable[None]]


def done(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """A changing command's answer: printed with --json only, because the
    table form has always been silent on success and scripts rely on that."""
    if args.json:
        print_json(result)


def create_options(args: argparse.Namespace, *, plan: bool) -> dict[str, Variant]:
    """Only the options given: an absent key lets the daemon apply its default
    (its DefaultPolicy, for one), which a value sent here would override."""
    opts: dict[str, Variant] = {}
    if args.numa_nodes is not None:
        opts["numa_nodes"] = Variant("u", args.numa_nodes)
    if args.policy is not None:
        opts["policy"] = Variant("s", args.policy)
    if args.host_nodes is not None:
        opts["host_nodes"] = Variant("au", args.host_nodes)
    if args.payload is not None and not plan:
        # An fd we opened, with our own rights: index 0 of the message's fds (cmd_create sends it)
        opts["payload"] = Variant("h", 0)
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
        print_json({"nodes": [dict(zip(keys, n, strict=True)) for n in nodes]})
        return
    rows = [
        [str(n), cpulist.format(cpus) or "-", human_bytes(total), human_bytes(free), " ".join(map(str, dist))]
        for n, cpus, total, free, dist in nodes
    ]
    print_table(["NODE", "CPUS", "MEMORY", "FREE", "DISTANCES"], rows)


async def cmd_create(c: Client, args: argparse.Namespace) -> None:
    fds: list[int] = []
    if args.payload is not None:
        try:
            fds.append(os.open(args.payload, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            raise BusError("PayloadUnreadable", f"--payload {args.payload}: {e.strerror}") from None
    try:
        (path,) = await c.call(MANAGER_PATH, MANAGER_IFACE, "CreateVM", signature="suta{sv}",
                               body=[args.name, args.vcpus, args.memory, create_options(args, plan=False)],
                               unix_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)
    if args.json:
        print_json({"vm": args.name, "path": path})
    else:
        print(path)


async def cmd_plan(c: Client, args: argparse.Namespace) -> None:
    reply = await c.manager("PlanVM", "uta{sv}", args.vcpus, args.memory, create_options(args, plan=True))
    plan = plan_object(reply)
    # indented for people, one line for scripts
    print(json.dumps(plan) if args.json else json.dumps(plan, indent=2), flush=True)


async def cmd_list(c: Client, args: argparse.Namespace) -> None:
    (vms,) = await c.manager("ListVMs")
    vms = sorted(vms, key=lambda v: v[0])
    if args.json:
        print_json({"vms": [{"name": n, "state": s, "path": p} for n, s, p in vms]})
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


def vm_call(member: str, signature: str = "", *fields: str, **extra: Any) -> Command:
    """A command that is one VM method whose arguments are ``fields`` of the
    command line, in order, and whose reply is nothing.  Its JSON answer is
    those fields as sent (the service applies them exactly or refuses) and
    ``extra``, what the call is known to have made true (the State a Start
    leaves)."""

    async def run(c: Client, args: argparse.Namespace) -> None:
        values = {f: getattr(args, f) for f in fields}
        await c.vm(args.name, member, signature, *values.values())
        done(args, {"vm": args.name, **values, **extra})

    return run


async def cmd_destroy(c: Client, args: argparse.Namespace) -> None:
    # the Manager's method, not VM.Destroy: one call instead of GetVM and Destroy
    await c.manager("DestroyVM", "s", args.name)
    done(args, {"vm": args.name, "state": "destroyed"})


async def cmd_numa(c: Client, args: argparse.Namespace) -> None:
    # the answer names the VM properties the call sets, so that it reads like `show --json`
    if args.action == "disable":
        await c.vm(args.name, "DisableNuma")
        done(args, {"vm": args.name, "numa_enabled": False})
        return
    await c.vm(args.name, "EnableNuma", "u", args.nodes)
    done(args, {"vm": args.name, "numa_enabled": True, "numa_nodes": args.nodes})


async def cmd_memory(c: Client, args: argparse.Namespace) -> None:
    (slot,) = await c.vm(args.name, "SetupNumaMemory", "utt", args.node, args.size, args.gpa)
    if args.json:
        print_json({"vm": args.name, "node": args.node, "size": args.size, "gpa": args.gpa, "slot": slot})
    else:
        print(slot)


async def cmd_stats(c: Client, args: argparse.Namespace) -> None:
    stats = stats_object(await c.vm(args.name, "GetStats"))
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
    # older daemons may send the report as JSON text; --json always prints one object
    try:
        parsed = json.loads(report)
    except ValueError:
        parsed = None
    print_json(parsed if isinstance(parsed, dict) else {"report": report})


async def cmd_suggestions(c: Client, args: argparse.Namespace) -> None:
    (items,) = await c.manager("GetSuggestions")
    if args.json:
        rows = [{"vm": vm, "action": action, "reason": reason} for vm, action, reason in items]
        print_json({"suggestions": rows})
        return
    legend = f"{len(items)} suggestion{'' if len(items) == 1 else 's'}."
    print_table(["VM", "ACTION", "REASON"], [list(i) for i in items], legend)


async def cmd_explain(c: Client, args: argparse.Namespace) -> None:
    """Why each placement of the VM is what it is: the daemon's recorded decisions."""
    (rows,) = await c.vm(args.name, "GetDecisions")
    items = [{"subject": subject, "kind": kind, "rule": rule, "placement": placement, "reason": reason,
              "time": t / 1e6} for subject, kind, rule, placement, reason, t in rows]
    if args.json:
        print_json({"vm": args.name, "decisions": items})
        return
    legend = f"{len(items)} decision{'' if len(items) == 1 else 's'} in force."
    print_table(["WHAT", "WHERE", "RULE", "BY", "WHY"],
                [[i["subject"], i["placement"], i["rule"], i["kind"], i["reason"]] for i in items], legend)


async def cmd_reexec(c: Client, args: argparse.Namespace) -> None:
    """Manager.Reexec, then (unless --no-wait) wait until org.kvmnuma1 has an
    owner again: the same PID on a new connection, with every VM back."""
    old = await _name_owner(c)
    await c.manager("Reexec")
    owner = None
    if args.wait:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.wait_timeout
        while owner is None:
            now = await _name_owner(c)
            if now is not None and now != old:
                owner = now
            elif loop.time() > deadline:
                raise BusError("Timeout", f"org.kvmnuma1 not owned again within {args.wait_timeout:g} s")
            else:
                await asyncio.sleep(0.05)
    done(args, {"reexec": True, "owner": owner})


async def _name_owner(c: Client) -> str | None:
    """The unique name owning org.kvmnuma1, None while nobody does."""
    try:
        (owner,) = await c.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner",
                                signature="s", body=["org.kvmnuma1"], destination="org.freedesktop.DBus")
    except BusError as e:
        if e.name.endswith(".NameHasNoOwner"):
            return None
        raise
    return str(owner)
