"""Consecutive numa-guest runs beside a CPU load: the freeze acceptance (issue 12, item 8).

``python -m tests.numa_guest.soak --runs 20 --load 2`` starts ``stress-ng --cpu 1``
LOAD times, then boots the guest RUNS times in a row, rotating the topologies,
each run exactly as ``make test-numa`` boots it.  A run counts as a hang when
the launcher saw the guest freeze (silence, a lockup report or the timeout),
even if its second boot passed.  One line per run and a summary go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

from tests.stop import raise_on, reaped

from .topology import TOPOLOGIES

_FROZE_RE = re.compile(r"froze or timed out|booting it once more")
_CLOSING_RE = re.compile(r"numa-guests: (\d+) passed, (\d+) failed")


@contextlib.contextmanager
def cpu_load(workers: int) -> Iterator[None]:
    if not workers:
        yield
        return
    if shutil.which("stress-ng") is None:
        raise SystemExit("stress-ng not found (Debian package stress-ng)")
    procs = [subprocess.Popen(["stress-ng", "--cpu", "1", "--quiet"], stdin=subprocess.DEVNULL,
                              start_new_session=True) for _ in range(workers)]
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)  # stress-ng passes it to its workers
        for p in procs:
            p.wait()


def _run_launcher(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """One launcher run; a stop of the soak is a SIGTERM to it (``reaped``), on which it takes
    its guest down, as make test's parts do."""
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child, reaped(child):
        out, err = child.communicate()
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def _soak(runs: int, load: int, names: list[str], launcher_args: list[str],
          results: list[tuple[str, int, float, bool, str]]) -> None:
    """The runs, each appended to ``results`` as it ends (a stop keeps the finished ones)."""
    with cpu_load(load):
        for i in range(runs):
            name = names[i % len(names)]
            t0 = time.monotonic()
            cmd = [sys.executable, "-m", "tests.numa_guest", "--topology", name, *launcher_args]
            proc = _run_launcher(cmd)
            took = time.monotonic() - t0
            froze = bool(_FROZE_RE.search(proc.stdout))
            closing = _CLOSING_RE.findall(proc.stdout)
            verdict = f"{closing[-1][0]} passed, {closing[-1][1]} failed" if closing else "no closing line"
            summary = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"numa-guest {name}:")]
            results.append((name, proc.returncode, took, froze, verdict))
            print(f"soak run {i + 1}/{runs} {name}: exit {proc.returncode}, {took:.0f} s, {verdict}"
                  f"{', FROZE' if froze else ''} | {summary[-1] if summary else ''}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.numa_guest.soak", description=__doc__)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--load", type=int, default=2, help="stress-ng --cpu 1 instances beside the guest")
    p.add_argument("--topology", default="2node,4node,memonly", help="comma-separated, rotated")
    args, launcher_args = p.parse_known_args(argv)
    names = args.topology.split(",")
    for name in names:
        if name not in TOPOLOGIES:
            p.error(f"unknown topology {name!r}")
    results: list[tuple[str, int, float, bool, str]] = []
    raise_on(signal.SIGTERM, signal.SIGHUP)
    stopped = False
    try:
        _soak(args.runs, args.load, names, launcher_args, results)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM and SIGHUP through raise_on
        stopped = True
        print(f"soak: stopped by {e or 'SIGINT'} during run {len(results) + 1}", flush=True)
    if not results:
        return 1
    hangs = sum(r[3] for r in results)
    failed = sum(r[1] != 0 for r in results)
    times = sorted(r[2] for r in results)
    print(f"soak: {len(results)} runs beside {args.load} x stress-ng --cpu 1: {hangs} hang(s), "
          f"{failed} failed; "
          f"run time min {times[0]:.0f} s, median {times[len(times) // 2]:.0f} s, max {times[-1]:.0f} s, "
          f"total {sum(times) / 60:.1f} min", flush=True)
    return 1 if hangs or failed or stopped else 0


if __name__ == "__main__":
    sys.exit(main())
