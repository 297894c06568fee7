"""``python -m bench [--only NAME ...] [--quick] [--out FILE]``: run, print, write the table."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import affinity, busrtt, idle, lifecycle, migrate, rawkvm
from bench.report import Row, table
from kvmnumad.kvm.runner import install_kick_signal
from kvmnumad.manager import Manager

HERE = Path(__file__).resolve().parent
NAMES = ("lifecycle", "stop", "idle", "dbus", "affinity", "migrate")


def _host() -> str:
    nodes = sorted(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
    return (f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs, "
            f"{len(nodes)} NUMA node(s), Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", action="append", choices=NAMES, help="run only these (repeatable)")
    p.add_argument("--quick", action="store_true", help="fewer runs and short idle windows (a smoke run)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file to write (default bench/results.md for a full run, none with --only)")
    args = p.parse_args(argv)
    only = set(args.only or NAMES)
    q = args.quick
    out = args.out if args.out is not None else (None if args.only or q else HERE / "results.md")

    install_kick_signal()
    rawkvm.install_kick_handler()
    manager = Manager()  # as the daemon runs it: with cpusets where a cgroup is writable
    plain = Manager(cpusets=False)
    kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        # idle first: the process is quietest before the other benchmarks ran
        ("idle", lambda: idle.idle_cost(manager, kvm_fd, 2 if q else 10, 1 if q else 5)),
        ("lifecycle", lambda: lifecycle.create_destroy(manager, plain, kvm_fd, 10 if q else 50)),
        ("stop", lambda: lifecycle.stop_latency(kvm_fd, 20 if q else 200)
         + lifecycle.destroy_latency(manager, kvm_fd, 5 if q else 30)),
        ("affinity", lambda: affinity.affinity(manager, plain, 200 if q else 2000)),
        ("dbus", lambda: busrtt.bus_round_trips(2 if q else 5, 200 if q else 1000)),
        ("migrate", lambda: migrate.migrate(manager, 1 if q else 3)),
    ]
    rows: list[Row] = []
    started = time.monotonic()
    load = os.getloadavg()
    try:
        for name, run in steps:
            if name not in only:
                continue
            t0 = time.monotonic()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            rows += run()
            print(f"bench: {name} done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        manager.shutdown()
        plain.shutdown()
        os.close(kvm_fd)
    text = (
        f"Run {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} on {_host()}; "
        f"{time.monotonic() - started:.0f} s; load average before/after "
        f"{load[0]:.1f}/{os.getloadavg()[0]:.1f} (a shared machine: compare ratios, not absolutes).\n\n"
        "ratio = kvmnumad's cost / the baseline's cost, measured in the same run "
        "(time per operation; for calls/s the inverse): > 1 means slower than by hand.\n\n"
        + table(rows)
        + ("\nThe migration figure needs 2 host nodes: see `results-numa-2node.md` "
           "(`python -m bench.guest`).\n" if "migrate" in only and len(manager.host_nodes()) < 2 else "")
    )
    print(text)
    if out is not None:
        out.write_text("# kvmnumad benchmarks (`python -m bench`)\n\n" + text)
        print(f"bench: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
