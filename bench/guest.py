"""``python -m bench.guest [--topology 4node] [--only NAME ...]``: the figures that need host nodes.

The host has one node, so hotplug, placement and migrate run inside a
throw-away QEMU (TCG) guest booted by the NUMA test harness's launcher
(tests/numa_guest/launcher.py, see shared/numa-guest.md), with its
heartbeat, its lockup and silence watch and its console file; a guest that
freezes or vanishes is booted once more, said out loud, as for the tests.
The guest writes bench/results-numa-<name>.md (and, for ``python -m bench``,
its rows as JSON) through the read-write repository mount.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.numa_guest.launcher import EXIT_TIMEOUT, run_guest
from tests.numa_guest.topology import TOPOLOGIES

REPO = Path(__file__).resolve().parents[1]
GUEST_FIGURES = ("hotplug", "placement", "migrate", "migrate-job", "repair")
EXTRA_FIGURES = ("adopt-repair",)  # only with --only
IN_GUEST = Path(__file__).resolve().parent / "in_guest" / "run_bench.py"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.guest", description=__doc__)
    p.add_argument("--topology", default="4node", choices=sorted(TOPOLOGIES))
    p.add_argument("--only", action="append", choices=GUEST_FIGURES + EXTRA_FIGURES,
                   help="the figures to run (repeatable; default all of GUEST_FIGURES)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows-json", type=Path, default=None, help="also write the rows here, as JSON")
    p.add_argument("--timeout", type=float, default=1500.0)
    p.add_argument("--out", type=Path, default=None,
                   help="the markdown file the guest writes (default bench/results-numa-TOPOLOGY.md); "
                        "inside the repository, the guest's only read-write mount")
    args = p.parse_args(argv)
    topo = TOPOLOGIES[args.topology]
    out = (args.out or REPO / "bench" / f"results-numa-{topo.name}.md").resolve()
    if not out.is_relative_to(REPO):
        p.error(f"--out {out}: the guest writes only inside {REPO}")
    bench_args = [a for n in args.only or GUEST_FIGURES for a in ("--only", n)]
    bench_args += ["--quick"] if args.quick else []
    bench_args += ["--rows-json", str(args.rows_json)] if args.rows_json else []
    bench_args += ["--out", str(out)]
    run = run_guest(topo, args.timeout, bench_args, sys.stdout, target=IN_GUEST)
    if run.returncode == EXIT_TIMEOUT or run.died:
        print(f"bench-guest: the guest {run.problem}, booting it once more", flush=True)
        first = run
        run = run_guest(topo, args.timeout, bench_args, sys.stdout, target=IN_GUEST)
        run.note = f"second boot: the first guest {first.problem} (console: {first.console})"
    if run.returncode != 0:
        print(f"bench-guest: {run.problem} (console: {run.console})", file=sys.stderr, flush=True)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
