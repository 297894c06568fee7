"""``python -m bench.guest [--topology 4node] [--only NAME ...]``: the figures that need host nodes.

The host has one node, so hotplug, placement and migrate run inside a
throw-away QEMU (TCG) guest booted with virtme-ng from the topology table of
the NUMA test harness (see shared/numa-guest.md); it writes
bench/results-numa-<name>.md (and, for ``python -m bench``, its rows as
JSON) through the read-write repository mount.  The guest's process group
is killed on timeout, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.numa_guest.launcher import newest_kernel
from tests.numa_guest.topology import TOPOLOGIES

REPO = Path(__file__).resolve().parents[1]
GUEST_FIGURES = ("hotplug", "placement", "migrate")
EXTRA_FIGURES = ("adopt-repair",)  # only with --only

# udev loads kvm_amd from the CPU's modalias in the guest: wait for it rather than race it.
GUEST_SCRIPT = """exec 2>&1
[ -e /dev/kvm ] || {{ modprobe kvm_amd 2>/dev/null || modprobe kvm_intel 2>/dev/null
  udevadm settle --timeout=30; }}
grep -q ' /sys/fs/cgroup ' /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup
numactl -H
cd {repo} && PYTHONUNBUFFERED=1 {python} -m bench {args} --out {out}
echo "bench-guest: exit status $?"
"""


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.guest", description=__doc__)
    p.add_argument("--topology", default="4node", choices=sorted(TOPOLOGIES))
    p.add_argument("--only", action="append", choices=GUEST_FIGURES + EXTRA_FIGURES,
                   help="the figures to run (repeatable; default all three)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows-json", type=Path, default=None, help="also write the rows here, as JSON")
    p.add_argument("--timeout", type=float, default=1500.0)
    args = p.parse_args(argv)
    topo = TOPOLOGIES[args.topology]
    venv = Path(sys.prefix)
    out = REPO / "bench" / f"results-numa-{topo.name}.md"
    python = venv / "bin" / "python"
    bench_args = [a for n in args.only or GUEST_FIGURES for a in ("--only", n)]
    bench_args += ["--quick"] if args.quick else []
    bench_args += ["--rows-json", str(args.rows_json)] if args.rows_json else []
    script = GUEST_SCRIPT.format(repo=shlex.quote(str(REPO)), python=shlex.quote(str(python)),
                                 out=shlex.quote(str(out)), args=shlex.join(bench_args))
    cmd = [str(venv / "bin" / "vng"), "--disable-kvm", "--run", str(newest_kernel()), *topo.vng_args(),
           "--force-9p", "--rwdir", str(REPO), "--exec", script]
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    # vng truncates a file on stdout: let it write to a pipe, and own the whole process group.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    status = None
    # Killing vng alone would leave qemu running: the timer kills the group, which ends the read loop.
    timer = threading.Timer(args.timeout, _kill_group, (proc.pid,))
    timer.start()
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            print(f"[guest {topo.name}] {line}", flush=True)
            if line.startswith("bench-guest: exit status "):
                status = int(line.rsplit(" ", 1)[1])
    except BaseException:
        _kill_group(proc.pid)
        raise
    finally:
        timer.cancel()
        # Not reaped yet, so the pgid cannot have been reused: this only hits what is left of the guest.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        _kill_group(proc.pid)
        proc.wait()
    if status is None:
        print("bench-guest: the guest never reported the benchmark's exit status", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
