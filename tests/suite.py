"""``make test`` after lint: every part of the suite, the systemd guest beside the host's.

One after the other the parts took 34.4 min from a fresh clone on these
2-CPU machines (2026-12-02), over rule 5's 30.  The systemd guest is
single-threaded TCG (its launcher's TCG_THREAD), one host CPU, and it shares
nothing with the host suite but the CPUs: its own disk image, systemd, bus
and journald, a staging dir outside the checkout.  So it boots first, its
output into a log file (dumped when it ends), while the host suite and
bench-quick run in the foreground.  The numa guests (multi-threaded TCG, both
CPUs) start when all three are done, one at a time: beside a second guest and
two stress-ng a 4node guest's tests made no progress for 150 s in a
move_pages (the launcher called it frozen), so they get the machine alone.

Every part runs even when one fails (CI keeps only the tail, so the closing
lines give each part's verdict and one count of them all), and the exit
status is the first failure's.  What the parts install on a fresh machine
(the guests' kernel, qemu, virtme-ng and image) is done first, alone: two
apt-gets at once fail on dpkg's lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.numa_guest.launcher import _ANSI_RE, _COUNT_RE, _SUMMARY_RE  # the guests' own parse of pytest
from tests.stop import raise_on, reaped

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
LOG_DIR = REPO / ".make-test"  # the output of each part run in the background, kept
# The launchers' closing lines: "systemd-guest: 17 passed, 0 failed (...", "numa-guests: 83 passed, 0 failed"
_LAUNCHER_SUMMARY_RE = re.compile(r"^(systemd-guest|numa-guests): \d+ passed, \d+ failed")


@dataclass
class Part:
    name: str
    returncode: int
    seconds: float
    closing: str | None  # the part's own summary line, None if it printed none

    def counts(self) -> tuple[int, int]:
        """(passed, failed): a part that failed without a summary counts as one failure."""
        found = {k: int(n) for n, k in _COUNT_RE.findall(self.closing or "")}
        failed = found.get("failed", 0) + found.get("error", 0) + found.get("errors", 0)
        if self.returncode != 0 and not failed:
            failed = 1
        return found.get("passed", 0), failed


def _summary(lines: Sequence[str]) -> str | None:
    """The last pytest or launcher summary line (ANSI colour stripped)."""
    plain = [_ANSI_RE.sub("", ln).strip() for ln in lines]
    found = (ln for ln in reversed(plain) if _SUMMARY_RE.match(ln) or _LAUNCHER_SUMMARY_RE.match(ln))
    return next(found, None)


def _run(name: str, cmd: Sequence[str]) -> Part:
    """``cmd`` in the foreground, its output streamed through and its summary line kept."""
    print(f"\n=== make test: {name}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    tail: deque[str] = deque(maxlen=200)
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    assert proc.stdout is not None
    with reaped(proc):
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
        rc = proc.wait()
    return Part(name, rc, time.monotonic() - start, _summary(tail))


@contextlib.contextmanager
def _beside(name: str, cmd: Sequence[str], log: Path) -> Iterator[list[Part]]:
    """``cmd`` in the background with its output in ``log``; the Part is there after the block."""
    print(f"\n=== make test: {name} in the background (output: {log}): {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    done: list[Part] = []
    with reaped(proc):
        yield done
        rc = proc.wait()
    text = log.read_text(encoding="utf-8", errors="replace")
    print(f"\n=== make test: {name}'s output ({log})", flush=True)
    sys.stdout.write(text)
    done.append(Part(name, rc, time.monotonic() - start, _summary(text.splitlines())))


def _log(name: str) -> Path:
    LOG_DIR.mkdir(exist_ok=True)
    return LOG_DIR / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"


def main(argv: list[str] | None = None) -> int:
    del argv
    raise_on(signal.SIGTERM)
    parts: list[Part] = []
    # Installs and the image (cached by its recipe's hash) first, alone: see the module's docstring.
    prepare = _run("systemd guest's tools and image", [PY, "-m", "tests.systemd_guest", "--build-image"])
    if prepare.returncode != 0:
        parts.append(prepare)
    try:
        with _beside("systemd guest", [PY, "-m", "tests.systemd_guest"], _log("systemd")) as systemd:
            parts.append(_run("host suite", [PY, "-m", "pytest", "-m", "not numa", "tests"]))
            parts.append(_run("bench-quick", [PY, "-m", "bench", "--quick"]))
            print("\n=== make test: waiting for the systemd guest before the numa guests", flush=True)
        parts += systemd
        parts.append(_run("numa guests", [PY, "-m", "tests.numa_guest", "--topology", "2node,4node,memonly",
                                          "--keep-going"]))
    except KeyboardInterrupt as e:
        print(f"\nmake test: interrupted ({e})", file=sys.stderr, flush=True)
        return 130
    print("\n=== make test: verdicts", flush=True)
    for part in parts:
        verdict = "passed" if part.returncode == 0 else f"FAILED (exit {part.returncode})"
        print(f"make test: {part.name}: {verdict} in {part.seconds:.0f} s"
              f"{f' -- {part.closing}' if part.closing else ''}", flush=True)
    passed = sum(p.counts()[0] for p in parts)
    failed = sum(p.counts()[1] for p in parts)
    # the plain closing line CI reads: every part's tests together
    print(f"make test: {passed} passed, {failed} failed", flush=True)
    return next((p.returncode for p in parts if p.returncode != 0), 0)

if __name__ == "__main__":
    sys.exit(main())
