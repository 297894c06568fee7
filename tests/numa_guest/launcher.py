"""Boot a throw-away multi-NUMA Linux guest and run the ``numa`` tests in it.

The host has one NUMA node, so placement can only be proven in a guest whose
kernel really has several (see shared/numa-guest.md for the recipe and its
gotchas, which the comments below refer to by number).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar

from tests.stop import raise_on

from .topology import TOPOLOGIES, Topology

REPO = Path(__file__).resolve().parents[2]
GUEST_SCRIPT = Path(__file__).resolve().with_name("guest-run.sh")
# udev: the guest's /dev/kvm and the cpu uevent tests depend on a running udevd.
APT_PACKAGES = ("qemu-system-x86", "linux-image-amd64", "numactl", "busybox-static", "udev")
# A guest run is 400-650 s on a quiet machine (2node the longest), 690 s for 4node beside two
# stress-ng (2026-12-02), more with --storm-cycles 200; a frozen guest is caught by its silence or its
# lockup report long before this, so the deadline only has to be above a slow run's time.
DEFAULT_TIMEOUT = 1500.0
# The guest prints a heartbeat every HEARTBEAT_S (guest-run.sh); this long without
# any output means the guest is frozen, not slow: kill it now, not at the timeout.
SILENCE_LIMIT = 60.0
# After a kernel lockup report: this long without a line from the tests (not the heartbeat,
# not the kernel's, bar the storm's progress) and the guest is frozen.  The longest test
# step without output is the migration job's (some 75 s on a loaded host).
LOCKUP_GRACE = 150.0
BOOT_SILENCE_LIMIT = 150.0  # before the boot mark: a loaded host boots a TCG guest in up to ~40 s
CONSOLE_DIR = REPO / ".numa-guest"  # each guest's whole console, kept after the run
KILL_GRACE = 5.0
EXIT_TIMEOUT = 124
EXIT_NO_TESTS = 5  # pytest's "no tests collected": an empty NUMA run proves nothing

_BOOT_MARK = "numa-guest: booted"
_HEARTBEAT = "numa-guest: heartbeat"
_STATUS_RE = re.compile(r"numa-guest: pytest exit status (\d+)")
_SUMMARY_RE = re.compile(r"^=+ (.*\d+ \w+.*) in [\d.]+s\b.*=+$")
_COUNT_RE = re.compile(r"(\d+) (\w+)")
_FAILED_RE = re.compile(r"^(?:FAILED|ERROR) (\S+)")  # pytest's short summary: "FAILED tests/x.py::t - why"
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_KERNEL_RE = re.compile(r"^\[\s*\d+\.\d+\]")  # a printk line: "[   12.345678] ..."
# kernel lines that also go to our output, not only to the kept console file
# The kernel's own report that the guest may be stuck.  A soft lockup has been seen
# with the heartbeat still coming (one CPU stuck in kvm_swap_active_memslots,
# the others in int3 text patching), so silence alone would wait for the whole
# timeout.  But a report is not a verdict under TCG: a task blocked 30 s in a page
# migration of a slow guest is reported too (hung_task_timeout_secs=30, guest-run.sh).
# So after a report the tests must show progress (LOCKUP_GRACE); a guest that
# makes none is frozen, one that goes on finishes its run, the report kept.
_LOCKUP_RE = re.compile(r"BUG: soft lockup|watchdog: BUG|hard LOCKUP|blocked for more than \d+ seconds|"
                        r"rcu_\w+ (self-)?detected (stalls?|expedited stalls)")
_KERNEL_ALARM_RE = re.compile(r"BUG:|soft lockup|hard LOCKUP|blocked for more than|hung_task|Call Trace|"
                              r"RIP:|Kernel panic|\bOops\b|WARNING:|rcu.*stall|Out of memory|\bkvm|"
                              r"numa-storm:")


class GuestUnavailable(RuntimeError):
    """The guest cannot be had: the NUMA suite must fail, never skip."""


def _say(msg: str) -> None:
    print(f"[numa-guest] {msg}", flush=True)


def _dpkg_installed(package: str) -> bool:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    ).stdout
    return "install ok installed" in out


def ensure_host_tools(venv: Path) -> None:
    """Install qemu, a kernel and virtme-ng when missing, as `make test` must work on a fresh machine."""
    if shutil.which("dpkg-query") and shutil.which("apt-get"):
        missing = [p for p in APT_PACKAGES if not _dpkg_installed(p)]
        if missing:
            _say(f"apt: installing {' '.join(missing)}")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            try:
                subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
                subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env)
            except (subprocess.CalledProcessError, OSError) as e:
                raise GuestUnavailable(f"apt-get could not install {' '.join(missing)}: {e}") from e
    if not (venv / "bin" / "vng").exists():
        _say(f"pip: installing virtme-ng into {venv}")
        try:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "virtme-ng"], check=True)
        except (subprocess.CalledProcessError, OSError) as e:
            raise GuestUnavailable(f"pip could not install virtme-ng: {e}") from e
    for tool in ("qemu-system-x86_64", "numactl", "busybox"):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} not found (Debian packages: {' '.join(APT_PACKAGES)})")
    if not (venv / "bin" / "vng").exists():
        raise GuestUnavailable(f"vng not found in {venv}/bin after installing virtme-ng")
    newest_kernel()


def _version_key(path: Path) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def newest_kernel() -> Path:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=_version_key)
    if not kernels:
        raise GuestUnavailable("no /boot/vmlinuz-* (Debian package linux-image-amd64)")
    return kernels[-1]


REBOOTS = 2  # more boots of a guest that froze, timed out or died (both launchers' default)
RERUN_LIMIT = 2  # a guest with at most this many failed tests runs them once more, alone, on a new boot


@dataclass(frozen=True)
class Accel:
    """How QEMU emulates the guest, and the guest kernel's command line.

    The freezes (README, "Why the TCG guest froze"): a static key flipped
    while more than one guest CPU is online hangs this multi-threaded TCG
    guest now and then.  text_poke_bp writes int3 into code other CPUs run
    and waits for an IPI answer from each of them; in the hung consoles CPU 0
    waits in smp_call_function_many_cond while the others loop in exc_int3
    at the patched site.  flip_cost.py reproduces it at the first flips, and
    before the workaround the tests flipped keys at every VM and cpuset
    boundary.  Hence ``maxcpus=1``: guest-run.sh flips the keys once with
    only CPU 0 online and holds them (key_holder.py), then brings the other
    CPUs up.  ``tcg_thread`` and ``--append`` stay as knobs for measuring
    other candidates (single-threaded TCG was not tried against it).
    """

    tcg_thread: str = "multi"  # QEMU 7.2's default for an x86 guest on an x86 host
    # One CPU at boot: guest-run.sh flips the tests' static keys before the others come up (key_holder.py).
    # No rep-string page clearing: beside two host stress-ng, the adopt tests' move_pages stalled the
    # guest kernel (RCU stalls, soft lockups of 45-71 s) on 3 of 3 loaded boots of 2026-12-02, every
    # sampled stack in clear_page_erms (its rep stosb) under get_page_from_freelist, once in a plain
    # page fault of taskset.  Under TCG a rep stosb zeroes 14-23 us a page against 2-3 us for a store
    # loop, even unstalled (move_cost.py).  init_on_alloc=0 drops the zeroing of migration targets
    # (Debian's kernel zeroes every allocation), clearcpuid= makes clear_page and copy_page plain loops.
    kernel_args: tuple[str, ...] = ("maxcpus=1", "clearcpuid=erms,rep_good", "init_on_alloc=0")

    def vng_args(self) -> list[str]:
        args = [f"--qemu-opts=-accel tcg,thread={self.tcg_thread}"]  # the "=" form: numa-guest.md
        for arg in self.kernel_args:
            args.append(f"--append={arg}")
        return args


def vng_command(topology: Topology, venv: Path, kernel: Path, pytest_args: list[str], *,
                accel: Accel | None = None, target: Path | None = None) -> list[str]:
    python = str(venv / "bin" / "python")
    target = target or REPO / "tests" / "numa"
    guest_cmd = shlex.join(["/bin/sh", str(GUEST_SCRIPT), topology.name, python, str(target), *pytest_args])
    return [
        str(venv / "bin" / "vng"),
        "--disable-kvm",  # QEMU with KVM hangs early on this nested host; TCG works
        "--run", str(kernel),
        "--name", f"numa-{topology.name}",
        *topology.vng_args(),
        *(accel or Accel()).vng_args(),
        "--force-9p",
        "--verbose",  # the kernel's console (lockup reports, stacks) on our pipe; without it: /dev/null
        "--rwdir", str(REPO),  # gotcha 1: only rwdirs reach the host
        "--exec", guest_cmd,
    ]  # fmt: skip


@dataclass
class GuestBoot:
    """One boot of a test guest as its console told it; both launchers' runs are one."""

    BOOT_MARK: ClassVar[str]
    STATUS_RE: ClassVar[re.Pattern[str]]

    returncode: int
    boot_s: float | None = None
    total_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    problem: str | None = None
    note: str | None = None
    console: Path | None = None
    died: bool = False  # gone without reporting pytest's status, not frozen: QEMU or its kernel
    failures: list[str] = field(default_factory=list)  # node ids: CI keeps only the output's tail

    @property
    def label(self) -> str:
        raise NotImplementedError

    def fold(self, plain: str, elapsed: float) -> int | None:
        """Fold one console line (ANSI-free) in; the guest's pytest status when this line carries it."""
        if self.boot_s is None and plain.startswith(self.BOOT_MARK):
            self.boot_s = elapsed
        if m := _FAILED_RE.match(plain):
            self.failures.append(m.group(1))
        if m := _SUMMARY_RE.match(plain):
            self.counts = {k: int(n) for n, k in _COUNT_RE.findall(m.group(1))}
        if m := self.STATUS_RE.search(plain):
            return int(m.group(1))
        return None

    def summary(self) -> str:
        failed = self.counts.get("failed", 0)
        parts = [f"{self.counts.get('passed', 0)} passed", f"{failed} failed"]
        parts += [
            f"{n} {k}"
            for k, n in self.counts.items()
            if k not in ("passed", "failed", "deselected", "warning", "warnings")
        ]
        boot = f"{self.boot_s:.1f} s" if self.boot_s is not None else "none"
        line = f"{self.label}: {', '.join(parts)} (boot {boot}, total {self.total_s:.0f} s)"
        if self.problem:
            line += f" -- FAILED: {self.problem}"
        if self.failures:
            line += f" -- failed tests: {' '.join(self.failures)}"
        if self.note:
            line += f" -- NOTE: {self.note}"
        if self.returncode != 0 and self.console is not None:
            line += f" -- console: {self.console}"
        return line


@dataclass
class GuestRun(GuestBoot):
    BOOT_MARK = _BOOT_MARK
    STATUS_RE = _STATUS_RE

    topology: str = ""

    @property
    def label(self) -> str:
        return f"numa-guest {self.topology}"


def reboot_note(lost: Sequence[GuestBoot]) -> str:
    """The summary's note on a run that needed more boots: which boot this is, and why each went."""
    return f"boot {len(lost) + 1}: " + "; ".join(
        f"boot {i + 1} {r.problem} (console: {r.console})" for i, r in enumerate(lost))


def rerunnable(run: GuestRun, limit: int) -> bool:
    """A guest whose tests ran to the end with a few failures, each a single
    test: a race in a test under TCG's timing (stop 20's CI lost a whole
    submission to one) is told from a real failure by running it alone.  A
    module that failed to import (no "::"), a frozen or dead guest, or more
    than ``limit`` failures are not retried: those are not one flaky test."""
    return (run.returncode == 1 and not run.died and 0 < len(run.failures) <= limit
            and all("::" in f for f in run.failures))


def rerun_verdict(first: GuestRun, again: GuestRun) -> GuestRun:
    """The guest's result after its failed tests ran alone on a new boot: a
    pass there turns the first boot's failures into "flaky" (counted, named and
    never silent); a failure there stands, with the first boot's counts."""
    if again.returncode == 0 and again.counts.get("passed", 0) == len(first.failures):
        counts = dict(first.counts)
        counts["flaky"] = counts.pop("failed", 0)
        return replace(first, returncode=0, problem=None, counts=counts, failures=[],
                       total_s=first.total_s + again.total_s,
                       note=f"flaky, failed on boot 1 (console: {first.console}) and passed alone on boot 2: "
                            f"{' '.join(first.failures)}")
    return replace(first, returncode=again.returncode or first.returncode,
                   total_s=first.total_s + again.total_s,
                   note=f"failed again alone on boot 2 (console: {again.console})")


def console_tail(console: Path | None, prefix: str, lines: int = 40) -> str:
    """The unfiltered end of a dead guest's console: CI keeps only the output,
    not the console file, and the filter hides the kernel's last words."""
    if console is None or not console.exists():
        return ""
    tail = console.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    head = f"{prefix}--- the console's last {len(tail)} lines ({console}) ---\n"
    return head + "".join(f"{prefix}| {_ANSI_RE.sub('', t)}\n" for t in tail)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


class GuestProcess:
    """One boot's processes as one group, started, watched, killed and reaped
    together, whatever happens: both launchers' guests (gotcha 3: vng -> sh ->
    virtme-run -> qemu; only a process group takes them all)."""

    def __init__(self, cmd: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.start = time.monotonic()
        self.last_output = self.start
        self.exited = threading.Event()
        # Killers run on other threads; the lock keeps them off a reaped (reusable) pgid.
        self._lock = threading.Lock()
        self._reaped = False
        # Gotcha 2: vng truncates its stdout, so it writes to our pipe, never to a file.
        self._proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, sig: signal.Signals) -> None:
        with self._lock:
            if not self._reaped:
                _kill_group(self._proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if the group's leader is still there KILL_GRACE later."""
        self.kill(signal.SIGTERM)
        if not self.exited.wait(KILL_GRACE):
            self.kill(signal.SIGKILL)

    def guard(self, overdue: Callable[[float], bool], every: float = 2.0) -> None:
        """From a thread of its own, ask ``overdue(now)`` every ``every`` s
        until the guest exits; the first True stops it."""

        def loop() -> None:
            while not self.exited.wait(every):
                if overdue(time.monotonic()):
                    self.stop()
                    return

        threading.Thread(target=loop, daemon=True).start()

    def lines(self) -> Iterator[str]:
        """Its output, line by line, as it comes; ``last_output`` is when the last one came."""
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            self.last_output = time.monotonic()
            yield raw.decode("utf-8", "replace").rstrip("\r\n")

    @property
    def returncode(self) -> int:
        rc = self._proc.returncode
        assert rc is not None, "read after the guest was reaped"
        return rc

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.kill(signal.SIGTERM)
        escalate = threading.Timer(KILL_GRACE, self.kill, (signal.SIGKILL,))
        escalate.daemon = True
        escalate.start()
        # Wait without reaping: while the leader is a zombie its pgid cannot be
        # reused, so the SIGKILL below reaches only what is left of this guest.
        os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOWAIT)
        self.exited.set()
        escalate.cancel()
        with self._lock:
            _kill_group(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            self._reaped = True


def run_guest(topology: Topology, timeout: float, pytest_args: list[str], out: IO[str], *,
              accel: Accel | None = None, target: Path | None = None) -> GuestRun:
    """Boot one guest and stream its output; a freeze, a lockup report the tests
    do not get past, or the deadline stops it."""
    venv = Path(sys.prefix)
    cmd = vng_command(topology, venv, newest_kernel(), pytest_args, accel=accel, target=target)
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")  # gotcha 4
    prefix = f"[numa-guest {topology.name}] "
    run = GuestRun(1, topology=topology.name)
    guest_rc: int | None = None
    timed_out = threading.Event()
    silent = threading.Event()
    locked_up: list[str] = []  # the kernel line that reported a lockup or a blocked task
    frozen_after_report = threading.Event()  # ... and the tests made no progress after it
    CONSOLE_DIR.mkdir(exist_ok=True)
    run.console = CONSOLE_DIR / f"{topology.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    out.write(f"{prefix}{shlex.join(cmd)}\n{prefix}console: {run.console}\n")
    out.flush()
    last_progress = [0.0]  # the tests' own output (see LOCKUP_GRACE)

    def overdue(now: float) -> bool:
        """A frozen guest prints nothing, not even its heartbeat; after a kernel
        lockup report, one whose tests print nothing for LOCKUP_GRACE."""
        limit = SILENCE_LIMIT if run.boot_s is not None else BOOT_SILENCE_LIMIT
        quiet = now - guest.last_output
        stalled = now - last_progress[0] if locked_up else 0.0
        if now - guest.start > timeout:
            pass
        elif quiet > limit:
            silent.set()
            out.write(f"{prefix}no output for {quiet:.0f} s (heartbeat every 10 s): frozen\n")
        elif stalled > LOCKUP_GRACE:
            frozen_after_report.set()
            out.write(f"{prefix}no progress of the tests for {stalled:.0f} s after the kernel's "
                      "lockup report: frozen\n")
        else:
            return False
        timed_out.set()
        out.flush()
        return True

    with run.console.open("w", encoding="utf-8") as console, \
            GuestProcess(cmd, cwd=REPO, env=env) as guest:
        console.write(shlex.join(cmd) + "\n")
        last_progress[0] = guest.start
        guest.guard(overdue)
        for line in guest.lines():
            console.write(line + "\n")
            console.flush()
            plain = _ANSI_RE.sub("", line).strip()
            kernel = bool(_KERNEL_RE.match(plain))
            if (not kernel or "numa-storm:" in plain) and not plain.startswith(_HEARTBEAT):
                last_progress[0] = guest.last_output
            if kernel and not _KERNEL_ALARM_RE.search(plain):
                continue  # boot chatter: in the console file only
            out.write(f"{prefix}{line}\n")
            out.flush()
            booted = run.boot_s is not None
            if (rc := run.fold(plain, guest.last_output - guest.start)) is not None:
                guest_rc = rc
            if not booted and run.boot_s is not None:
                out.write(f"{prefix}boot took {run.boot_s:.1f} s\n")
            if not locked_up and _LOCKUP_RE.search(plain):
                locked_up.append(plain)
                last_progress[0] = guest.last_output
                out.write(f"{prefix}the guest kernel reports a lockup: frozen unless the tests go on "
                          f"within {LOCKUP_GRACE:.0f} s\n")
                out.flush()
    run.total_s = time.monotonic() - guest.start

    vng_rc = guest.returncode
    if locked_up and (frozen_after_report.is_set() or silent.is_set()):
        run.returncode = EXIT_TIMEOUT
        run.problem = f"frozen (kernel: {locked_up[0][:160]}), qemu killed"
    elif silent.is_set():
        run.returncode = EXIT_TIMEOUT
        run.problem = f"frozen (no output for {SILENCE_LIMIT:.0f} s), qemu killed"
    elif timed_out.is_set():
        run.returncode, run.problem = EXIT_TIMEOUT, f"timed out after {timeout:.0f} s, qemu killed"
    elif guest_rc is None:
        run.returncode, run.died = vng_rc or 1, True
        run.problem = f"the guest never reported pytest's exit status (vng exit {vng_rc})"
        out.write(console_tail(run.console, prefix))
    else:
        run.returncode = guest_rc
        if locked_up:  # not a freeze: the tests went on and finished; the report stays in the console
            out.write(f"{prefix}note: the kernel reported {locked_up[0][:120]!r} and the tests went on\n")
        if guest_rc == EXIT_NO_TESTS:
            run.problem = "no numa tests collected"
        elif guest_rc != 0:
            run.problem = f"pytest exit status {guest_rc}"
        if vng_rc != guest_rc:
            out.write(f"{prefix}warning: vng exit {vng_rc} differs from the guest's pytest exit {guest_rc}\n")
    return run


def split_at_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
    """The launcher's own arguments, and those after ``--``, which go to pytest inside the guest."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def _parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, pytest_args = split_at_dashes(argv)
    p = argparse.ArgumentParser(
        prog="python -m tests.numa_guest",
        description="Run the numa-marked tests inside a multi-NUMA QEMU guest (one boot per topology).",
        epilog="Arguments after -- go to pytest inside the guest.",
    )
    p.add_argument(
        "--topology", action="append", required=True, metavar="NAME",
        help=f"one of {', '.join(TOPOLOGIES)} or all; repeat or comma-separate to boot several in turn",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per guest (default {DEFAULT_TIMEOUT:.0f})")
    p.add_argument(
        "--keep-going", action="store_true", help="with several topologies, boot the rest after a failure"
    )
    p.add_argument("--reboots", type=int, default=REBOOTS, metavar="N",
                   help=f"boot a guest that froze, timed out or died up to N more times (default {REBOOTS})")
    p.add_argument("--rerun-failed", type=int, default=RERUN_LIMIT, metavar="N",
                   help="run a guest's failed tests once more on a new boot when at most N failed; a pass "
                        f"there counts as flaky, said in the summary (default {RERUN_LIMIT}, 0: never)")
    p.add_argument("--tcg-thread", choices=("single", "multi"), default=Accel.tcg_thread,
                   help=f"QEMU's TCG threading (default {Accel.tcg_thread}, see Accel)")
    p.add_argument("--append", action="append", default=[], metavar="ARG",
                   help="an extra guest kernel command-line option (repeatable), for measuring mitigations")
    p.add_argument("--repro", type=float, metavar="SECONDS",
                   help="run freeze_repro.py for SECONDS instead of the tests (measuring freeze fixes)")
    p.add_argument("--flip-cost", type=int, metavar="N",
                   help="run flip_cost.py with N iterations instead of the tests (key_holder.py)")
    p.add_argument("--state-cycles", type=int, metavar="N",
                   help="run state_cycles.py with N park/run and save/restore cycles instead of the tests")
    p.add_argument("--move-cost", type=int, metavar="N",
                   help="run move_cost.py: N rounds of moving a nested QEMU's memory, instead of the tests")
    args = p.parse_args(argv)
    names: list[str] = []
    for item in args.topology:
        for name in item.split(","):
            for n in TOPOLOGIES if name == "all" else [name]:
                if n not in TOPOLOGIES:
                    p.error(f"unknown topology {n!r}; choose from {', '.join(TOPOLOGIES)} or all")
                names.append(n)
    args.topology = names
    return args, pytest_args


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = _parse_args(sys.argv[1:] if argv is None else argv)
    color = "--color=yes" if sys.stdout.isatty() else "--color=no"
    raise_on(signal.SIGTERM, signal.SIGHUP)  # so that GuestProcess takes qemu down with it
    runs: list[GuestRun] = []
    accel = Accel(args.tcg_thread, (*Accel.kernel_args, *args.append))
    freezes = flaky = 0
    for script, arg in (("freeze_repro.py", args.repro), ("flip_cost.py", args.flip_cost),
                        ("state_cycles.py", args.state_cycles), ("move_cost.py", args.move_cost)):
        if arg is not None:
            run = run_guest(TOPOLOGIES[args.topology[0]], args.timeout, [str(arg), *pytest_args], sys.stdout,
                            accel=accel, target=Path(__file__).resolve().with_name(script))
            print(run.summary(), flush=True)
            return run.returncode
    try:
        ensure_host_tools(Path(sys.prefix))
        for name in args.topology:
            run = run_guest(TOPOLOGIES[name], args.timeout, [color, *pytest_args], sys.stdout, accel=accel)
            lost: list[GuestRun] = []
            while (run.returncode == EXIT_TIMEOUT or run.died) and len(lost) < args.reboots:
                # A whole TCG guest has been seen to freeze (no output, no
                # heartbeat), with nested vCPUs running and their memory being
                # migrated, and to vanish mid-run (QEMU gone, no exit status): on
                # 2026-12-01 5 of 9 boots of quiet fresh-clone runs froze so.  A
                # fresh boot, said out loud, up to --reboots times; then a freeze,
                # timeout or death fails the run like any other failure.  Each
                # console stays in CONSOLE_DIR for the post-mortem.
                freezes += 1
                lost.append(run)
                print(f"numa-guest {name}: guest {run.problem}, booting it once more", flush=True)
                print(run.summary(), flush=True)
                run = run_guest(TOPOLOGIES[name], args.timeout, [color, *pytest_args], sys.stdout,
                                accel=accel)
                run.note = reboot_note(lost)
            freezes += run.returncode == EXIT_TIMEOUT or run.died
            if rerunnable(run, args.rerun_failed):
                print(f"numa-guest {name}: {len(run.failures)} test(s) failed; a new boot runs them alone",
                      flush=True)
                print(run.summary(), flush=True)
                first, *rest = (REPO / f for f in run.failures)  # node ids, the repo their root
                again = run_guest(TOPOLOGIES[name], args.timeout, [color, *pytest_args, *map(str, rest)],
                                  sys.stdout, accel=accel, target=first)
                print(again.summary(), flush=True)
                freezes += again.returncode == EXIT_TIMEOUT or again.died  # a lost rerun boot counts too
                run = rerun_verdict(run, again)
                flaky += run.counts.get("flaky", 0)
            runs.append(run)
            print(run.summary(), flush=True)
            if run.returncode != 0 and not args.keep_going:
                break
    except GuestUnavailable as e:
        print(f"\n*** numa-guest: CANNOT BOOT THE MULTI-NUMA GUEST: {e}", file=sys.stderr)
        print("*** The numa tests did NOT run; this is a failure, not a skip.\n", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nnuma-guest: interrupted ({e or 'SIGINT'}), guest killed", file=sys.stderr, flush=True)
        return 130
    if len(runs) > 1:
        print("\n".join(["numa-guest summary:", *(f"  {r.summary()}" for r in runs)]), flush=True)
    # the plain closing line CI reads: every guest's tests together
    passed = sum(r.counts.get("passed", 0) for r in runs)
    failed = sum(r.counts.get("failed", 0) + r.counts.get("error", 0) + r.counts.get("errors", 0)
                 for r in runs)
    failed += sum(1 for r in runs if r.returncode != 0 and not r.counts.get("failed"))  # a dead guest
    if freezes:
        print(f"numa-guest: {freezes} guest(s) froze, timed out or died in this run", flush=True)
    if flaky:
        print(f"numa-guest: {flaky} FLAKY test(s): failed, then passed alone on a new boot (see NOTE)",
              flush=True)
    print(f"numa-guests: {passed} passed, {failed} failed", flush=True)
    return next((r.returncode for r in runs if r.returncode != 0), 0)
