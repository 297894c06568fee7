"""kvmnumactl's entry point: parse, run one command, turn failures into exit codes.

Exit codes: 0 success, 1 the bus or the service refused (the error's D-Bus name
is printed without its prefix), 2 the command line itself is wrong.  Scripts
tell "you asked wrong" from "you were refused" by the code alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from kvmnumad.cli.client import BusChoice, BusError, Client, connect, parse_bus
from kvmnumad.cli.parser import PROG, build_parser
from kvmnumad.cli.values import UsageError


async def run(args: argparse.Namespace, choice: BusChoice) -> None:
    interactive = sys.stdin.isatty() if args.interactive is None else args.interactive
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    bus = await connect(choice)
    try:
        await args.func(Client(bus, interactive, timeout), args)
    finally:
        bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        choice = parse_bus(args.bus)
        if args.check is not None:
            args.check(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except UsageError as e:
        print(f"{PROG}: UsageError: {e}", file=sys.stderr)
        return 2
    # every usage error is found above: from here on, a failure is the bus's or the service's
    try:
        asyncio.run(run(args, choice))
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
