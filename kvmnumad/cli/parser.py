"""kvmnumactl's command line: every command, its arguments and their checks.

Values are checked here, before the bus is touched, so that a typo costs no
connection, no polkit prompt and no half-done change, and exits 2 as a usage
error rather than 1 as a refusal.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, NoReturn

from kvmnumad import __version__
from kvmnumad.cli.client import DEFAULT_TIMEOUT
from kvmnumad.cli.commands import (
    Command,
    cmd_create,
    cmd_destroy,
    cmd_explain,
    cmd_list,
    cmd_memory,
    cmd_numa,
    cmd_plan,
    cmd_reexec,
    cmd_report,
    cmd_show,
    cmd_stats,
    cmd_suggestions,
    cmd_topology,
    vm_call,
)
from kvmnumad.cli.jobs import cmd_job_cancel, cmd_jobs, cmd_migrate, job_path
from kvmnumad.cli.monitor import cmd_monitor
from kvmnumad.cli.values import UsageError, argtype, parse_cpulist, parse_size, parse_u32

PROG = "kvmnumactl"
POLICIES = ("manual", "local-first", "load-balanced", "interleave", "preferred")


class _Parser(argparse.ArgumentParser):
    """argparse's errors as our UsageError: every usage error, argparse's or
    ours, then reaches the one place that prints it (as a line, or as JSON with
    --json) and exits 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {PROG} --help)")


def wants_json(argv: list[str]) -> bool:
    """Whether --json was asked for, read from the raw arguments: a usage error
    happens before argparse has said so, and must still come out as JSON.
    Prefixes count because argparse accepts them (``--js``)."""
    for arg in argv:
        if arg == "--":
            return False
        if len(arg) > 2 and "--json".startswith(arg):
            return True
    return False


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
    """argparse cannot say "N only with enable", so it is checked after parsing."""
    if args.action == "disable" and args.nodes is not None:
        raise UsageError("numa disable takes no node count")
    if args.action == "enable" and args.nodes is None:
        raise UsageError("numa enable needs a node count, e.g. 'numa NAME enable 2'")


def _vm_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")


def _sizing(p: argparse.ArgumentParser) -> None:
    """create and plan take the same sizing, so a create line can be dry-run."""
    p.add_argument("--vcpus", type=parse_u32, required=True, metavar="N")
    p.add_argument(
        "--memory", type=argtype(parse_size), required=True, metavar="SIZE", help="e.g. 64M, 1G, 4096"
    )
    p.add_argument("--numa-nodes", type=parse_u32, metavar="N", help="guest NUMA nodes (0: NUMA off)")
    p.add_argument("--policy", choices=POLICIES)
    p.add_argument(
        "--host-nodes", type=argtype(parse_cpulist), metavar="LIST", help="allowed host nodes, e.g. 0,1"
    )
    p.add_argument("--payload", metavar="PATH", help="flat binary to run (default: built-in payload)")
    p.add_argument("--prealloc", action="store_true", help="fault all guest memory in at creation")
    p.add_argument("--allow-split", action="store_true", help="local-first may split a guest node")
    p.add_argument("--passes", type=parse_u32, metavar="N", help="built-in payload: passes before HLT")
    p.add_argument("--start", action="store_true", help="start the VM once created")


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

    add("topology", cmd_topology, "host NUMA nodes: CPUs, memory, distances")
    p = add("create", cmd_create, "create a VM and print its object path")
    _vm_arg(p)
    _sizing(p)
    p = add("plan", cmd_plan, "print the placement a create would get, creating nothing")
    p.add_argument("name", metavar="NAME", nargs="?", help="ignored: lets a create line be dry-run")
    _sizing(p)
    add("list", cmd_list, "list VMs")
    _vm_arg(add("show", cmd_show, "all properties of a VM"))
    _vm_arg(add("start", vm_call("Start", state="running"), "start a VM"))
    _vm_arg(add("stop", vm_call("Stop", state="stopped"), "stop a VM"))
    _vm_arg(add("destroy", cmd_destroy, "destroy a VM"))
    p = add("pin", vm_call("SetVcpuAffinity", "uau", "vcpu", "cpus"), "pin a vCPU to host CPUs")
    _vm_arg(p)
    p.add_argument("vcpu", type=parse_u32, metavar="VCPU")
    p.add_argument("cpus", type=argtype(parse_cpulist), metavar="CPULIST", help="e.g. 0-2,5")
    p = add("bind", vm_call("BindVcpuToNumaNode", "uu", "vcpu", "node"), "bind a vCPU to a guest NUMA node")
    _vm_arg(p)
    p.add_argument("vcpu", type=parse_u32, metavar="VCPU")
    p.add_argument("node", type=parse_u32, metavar="NODE")
    p = add("numa", cmd_numa, "turn guest NUMA on with N nodes, or off")
    p.set_defaults(check=check_numa)
    _vm_arg(p)
    p.add_argument("action", choices=("enable", "disable"))
    p.add_argument("nodes", type=parse_u32, nargs="?", metavar="N")
    p = add("map", vm_call("MapNumaNode", "uu", "node", "host_node"), "map a guest node to a host node")
    _vm_arg(p)
    p.add_argument("node", type=parse_u32, metavar="NODE")
    p.add_argument("host_node", type=parse_u32, metavar="HOST_NODE")
    p = add("memory", cmd_memory, "add a memory region to a guest node; prints its slot")
    _vm_arg(p)
    p.add_argument("node", type=parse_u32, metavar="NODE")
    p.add_argument("size", type=argtype(parse_size), metavar="SIZE")
    p.add_argument(
        "gpa", type=argtype(parse_size), metavar="GPA", help="guest-physical address, e.g. 0x4000000 or 64M"
    )
    _vm_arg(add("stats", cmd_stats, "exits, vCPU times and CPUs, pages per host node, dirty pages"))
    add("report", cmd_report, "the daemon's placement report")
    add("suggestions", cmd_suggestions, "the daemon's placement suggestions")
    add("monitor", cmd_monitor, "print the service's signals as they come, until Ctrl-C")
    _vm_arg(add("explain", cmd_explain, "why each pin and memory binding of a VM is what it is"))
    p = add("reexec", cmd_reexec, "restart the daemon in place keeping every VM (root only)")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="return after the reply, before the name is owned again")
    p.add_argument("--wait-timeout", type=float, default=60.0, metavar="SECONDS", help=argparse.SUPPRESS)
    p = add("migrate", cmd_migrate,
            "move a guest node's memory to a host node as a job, live, and follow it to its end")
    _vm_arg(p)
    p.add_argument("node", type=parse_u32, metavar="GUEST_NODE")
    p.add_argument("host_node", type=parse_u32, metavar="HOST_NODE")
    p.add_argument("--slot", type=parse_u32, metavar="N", help="move only this memory slot of the guest node")
    p.add_argument("--no-wait", dest="wait", action="store_false",
                   help="print the job's path and return; the job runs on")
    add("jobs", cmd_jobs, "list the running memory migration jobs")
    p = add("job-cancel", cmd_job_cancel, "cancel a memory migration job (what moved stays moved)")
    p.add_argument("job", type=argtype(job_path), metavar="JOB",
                   help="its number, as 'jobs' lists it, or its path")
    return parser
