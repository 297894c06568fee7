"""kvmnumactl's entry point: parse, run one command, turn failures into exit codes.

Exit codes: 0 success, 1 the bus or the service refused (the error's D-Bus name
is printed without its prefix), 2 the command line itself is wrong.  Scripts
tell "you asked wrong" from "you were refused" by the code alone.

With --json a failure is one JSON object on stderr instead of the line,
``{"error": NAME, "message": TEXT}``: NAME is the full D-Bus error name (a
script matches ``org.kvmnuma1.Error.NoSuchVM`` exactly, not a shortened form
that could collide), ``usage`` for a wrong command line, ``interrupted`` for
Ctrl-C, or one of kvmnumactl's own names (ConnectFailed, Timeout,
Disconnected).  The exit codes are the same either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from kvmnumad.cli.client import BusChoice, BusError, Client, Interrupted, connect, parse_bus
from kvmnumad.cli.parser import PROG, build_parser, wants_json
from kvmnumad.cli.values import UsageError


async def run(args: argparse.Namespace, choice: BusChoice) -> None:
    interactive = sys.stdin.isatty() if args.interactive is None else args.interactive
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    bus = await connect(choice)
    try:
        await args.func(Client(bus, interactive, timeout), args)
    finally:
        bus.disconnect()


def fail(as_json: bool, name: str, message: str, line: str) -> None:
    """One failure on stderr: ``line`` for people, the object for scripts."""
    if as_json:
        print(json.dumps({"error": name, "message": message}), file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(raw)
        choice = parse_bus(args.bus)
        if args.check is not None:
            args.check(args)
    except SystemExit as e:  # --help and --version: their text, as asked, even with --json
        return e.code if isinstance(e.code, int) else 2
    except UsageError as e:
        fail(wants_json(raw), "usage", str(e), f"{PROG}: UsageError: {e}")
        return 2
    # every usage error is found above: from here on, a failure is the bus's or the service's
    try:
        asyncio.run(run(args, choice))
    except BusError as e:
        short = e.name.rsplit(".", 1)[-1]
        fail(args.json, e.name, e.message, f"{PROG}: {short}: {e.message}".rstrip(": "))
        return 1
    except Interrupted as e:
        fail(args.json, "interrupted", e.message, f"{PROG}: {e.message}")
        return 130
    except KeyboardInterrupt:
        if args.json:
            fail(True, "interrupted", "interrupted by SIGINT", "")
        return 130
    except BrokenPipeError:
        # `kvmnumactl list | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
