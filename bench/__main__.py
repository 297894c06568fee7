"""``python -m bench [--only NAME ...] [--quick] [--no-guest] [--out FILE]``: run, print, write the table.

On a host with fewer than 2 NUMA nodes the guest figures (hotplug,
placement, migrate) run in the 4-node QEMU guest (``bench.guest``), booted
once, and their rows join the same table; ``--quick`` (CI) and ``--no-guest``
skip that boot and say so in those rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import bench.adopt
from bench import (
    affinity,
    busrtt,
    hotplug,
    idle,
    lifecycle,
    migrate,
    migratejob,
    placement,
    rawkvm,
    repair,
    sampling,
    scale,
    vmcreate,
)
from bench import handover as handover_bench
from bench.report import Row, table
from kvmnumad.kvm.runner import install_kick_signal
from kvmnumad.manager import Manager

HERE = Path(__file__).resolve().parent
NAMES = ("idle", "lifecycle", "stop", "affinity", "dbus", "create", "scale", "hotplug", "placement",
         "migrate", "sampling", "handover", "adopt", "migrate-job")
# Only when asked (--only), each measured in its own guest boot: adopt-repair about 5 min (numad's
# 60 s wait per run); repair some 9 min in the 2-node guest, its figures in bench/results-repair.md
# (`python -m bench.guest --topology 2node --only repair`; the 4-node guest's 1-CPU nodes do not fit it).
EXTRA = ("adopt-repair", "repair")
# need 2+ host nodes (4 for placement)
GUEST = ("hotplug", "placement", "migrate", "adopt-repair", "migrate-job", "repair")


def _host() -> str:
    nodes = sorted(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
    return (f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs, "
            f"{len(nodes)} NUMA node(s), Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--only", action="append", choices=NAMES + EXTRA, help="run only these (repeatable)")
    p.add_argument("--quick", action="store_true", help="fewer runs and short idle windows (a smoke run)")
    p.add_argument("--no-guest", action="store_true", help="do not boot the multi-node guest")
    p.add_argument("--scale", type=int, default=1024, help="VMs of the scale figure (default 1024)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="write cProfiles of the daemon (dbus, create, scale) into DIR")
    p.add_argument("--rows-json", type=Path, default=None, help=argparse.SUPPRESS)  # the guest's rows
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file to write (default bench/results.md for a full run, none with --only)")
    args = p.parse_args(argv)
    only = set(args.only or NAMES)
    q = args.quick
    out = args.out if args.out is not None else (None if args.only or q else HERE / "results.md")
    prof = args.profile

    def profile(name: str) -> Path | None:
        return prof / f"{name}.cprof" if prof is not None else None

    install_kick_signal()
    rawkvm.install_kick_handler()
    manager = Manager()  # as the daemon runs it: with cpusets where a cgroup is writable
    plain = Manager(cpusets=False)
    kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    multi = len(manager.host_nodes()) >= 2
    boot = not multi and not (q or args.no_guest)
    guest_rows: list[Row] | None = None
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        # idle first: the process is quietest before the other benchmarks ran
        ("idle", lambda: idle.idle_cost(manager, kvm_fd, 2 if q else 10, 1 if q else 5)),
        ("lifecycle", lambda: lifecycle.create_destroy(manager, plain, kvm_fd, 10 if q else 50)),
        ("stop", lambda: lifecycle.stop_latency(kvm_fd, 20 if q else 200)
         + lifecycle.destroy_latency(manager, kvm_fd, 5 if q else 30)),
        ("affinity", lambda: affinity.affinity(manager, plain, 200 if q else 2000)),
        ("dbus", lambda: busrtt.bus_round_trips(2 if q else 5, 200 if q else 1000, profile("dbus"))),
        ("create", lambda: vmcreate.vm_creation(3 if q else 20)),
        ("scale", lambda: scale.scale(32 if q else args.scale, 2 if q else 30, 10 if q else 100,
                                      profile=profile("scale")) + scale.task_limit()),
        ("hotplug", lambda: hotplug.hotplug(3 if q else 20, 5 if q else 30)),
        ("placement", lambda: placement.placement(manager, kvm_fd, 3 if q else 15)),
        ("migrate", lambda: migrate.migrate(manager, 1 if q else 3)),
        ("sampling", lambda: sampling.sampling(manager, 10 if q else 50)),
        ("handover", lambda: handover_bench.handover(1 if q else 7, 1 if q else 3)),
        ("adopt", lambda: bench.adopt.adopt_to_pinned(3 if q else 20)),
        ("adopt-repair", lambda: bench.adopt.repair_vs_numad(1 if q else 3)),
        ("migrate-job", lambda: migratejob.migrate_job(manager, 1 if q else 3)),
        ("repair", lambda: repair.repair(1 if q else 3)),
    ]
    rows: list[Row] = []
    started = time.monotonic()
    load = os.getloadavg()
    try:
        for name, run in steps:
            if name not in only:
                continue
            if name in GUEST and not multi:
                if boot and guest_rows is None:  # one boot for all the guest figures, after the host's
                    guest_rows = _guest(sorted(only & set(GUEST)))
                rows += [r for r in guest_rows if r.bench == name] if guest_rows is not None else [
                    Row(f"{name}: in the 4-node guest", None, None, "-",
                        "skipped (--quick/--no-guest): `python -m bench.guest` boots the 4-node QEMU guest")]
                continue
            t0 = time.monotonic()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                rows += [dataclasses.replace(r, bench=name) for r in run()]
            except Exception as e:  # one broken figure must not lose the others (nor a guest boot)
                traceback.print_exc()
                why = f"{type(e).__name__}: {e}"[:300]
                rows.append(Row(f"{name}: FAILED", None, None, "-", why, bench=name))
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
        + ("\nRows of hotplug, placement and migrate come from the 4-node QEMU (TCG) guest booted by "
           "`python -m bench.guest` in the same run: its times are emulated, only the ratios mean "
           "anything.\n" if guest_rows else "")
    )
    print(text)
    if args.rows_json is not None:
        args.rows_json.write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
    if out is not None:
        out.write_text("# kvmnumad benchmarks (`python -m bench`)\n\n" + text)
        print(f"bench: wrote {out}", file=sys.stderr)
    return 0


def _guest(names: list[str]) -> list[Row]:
    """Boot the 4-node guest once for ``names``; its rows (or one row saying it failed)."""
    from bench import guest  # noqa: PLC0415 (imports the NUMA test harness, only when needed)

    print(f"bench: booting the 4-node guest for {', '.join(names)} ...", file=sys.stderr, flush=True)
    rows_file = HERE / ".guest-rows.json"
    rows_file.unlink(missing_ok=True)
    status = guest.main(["--topology", "4node", *(a for n in names for a in ("--only", n)),
                         "--rows-json", str(rows_file)])
    if status != 0 or not rows_file.exists():
        return [Row(f"{n}: in the 4-node guest", None, None, "-", f"the guest run failed (status {status})",
                    bench=n) for n in names]
    rows = [Row(**r) for r in json.loads(rows_file.read_text())]
    rows_file.unlink()
    return rows


if __name__ == "__main__":
    sys.exit(main())
