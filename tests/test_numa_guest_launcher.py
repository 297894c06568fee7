"""The numa guest launcher's verdicts, the parts that need no guest: which
failed guests get their failed tests run alone on a new boot, and what the
second boot's result makes of the first (the guests run in `make test-numa`);
and how both launchers take a boot's whole process group down, shown on real
processes standing in for vng, virtme-run and qemu."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.numa_guest import launcher
from tests.numa_guest.launcher import EXIT_TIMEOUT, GuestProcess, GuestRun, rerun_verdict, rerunnable

ONE = "tests/numa/test_numa_policies.py::test_split"


def run4(rc: int, **fields: Any) -> GuestRun:
    return GuestRun(rc, topology="4node", **fields)


def failed(*failures: str, rc: int = 1) -> GuestRun:
    return run4(rc, boot_s=25.0, counts={"failed": len(failures), "passed": 41, "skipped": 1},
                    problem="pytest exit status 1", console=Path("/c/first.log"), failures=list(failures))


@pytest.mark.parametrize(("run", "again"), [
    (failed(ONE), True),
    (failed(ONE, ONE + "2"), True),
    (failed(ONE, ONE + "2", ONE + "3"), False),  # more than a flake: a real breakage
    (failed("tests/numa/test_numa_policies.py"), False),  # a module that did not import
    (failed(ONE, rc=EXIT_TIMEOUT), False),  # frozen: the reboot rule, not this one
    (run4(1, died=True), False),
    (run4(0, counts={"passed": 42}), False),
])
def test_only_a_few_failed_tests_are_run_again(run: GuestRun, again: bool) -> None:
    assert rerunnable(run, 2) is again
    assert not rerunnable(run, 0)  # --rerun-failed 0: never


def test_a_pass_alone_makes_the_failure_flaky_and_says_so() -> None:
    verdict = rerun_verdict(failed(ONE), run4(0, counts={"passed": 1}, console=Path("/c/2.log")))
    assert verdict.returncode == 0 and verdict.problem is None
    assert verdict.counts == {"flaky": 1, "passed": 41, "skipped": 1}
    line = verdict.summary()
    assert "1 flaky" in line and ONE in line and "/c/first.log" in line and "0 failed" in line


def test_a_second_failure_stands() -> None:
    verdict = rerun_verdict(failed(ONE), run4(1, counts={"failed": 1}, console=Path("/c/2.log")))
    assert verdict.returncode == 1 and verdict.counts["failed"] == 1
    assert "failed again" in verdict.summary() and "/c/2.log" in verdict.summary()


def test_a_second_boot_that_ran_nothing_is_no_pass() -> None:
    verdict = rerun_verdict(failed(ONE), run4(0, counts={}))  # e.g. the id matched no test
    assert verdict.returncode == 1


# A leader with a child in the background that also holds the output pipe, as
# vng's sh holds virtme-run and qemu: the output ends only when the whole group is gone.
GROUP = ["sh", "-c", "sleep 300 & echo up; sleep 300"]


def group_of(pgid: int) -> list[int]:
    """Its members now, from /proc (zombies left out: they are only waiting to be reaped)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except ProcessLookupError:
            pass
    return members


def gone(pgid: int) -> bool:
    """SIGKILL is sent to the group at once, and each member dies a moment later."""
    deadline = time.monotonic() + 5
    while group_of(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return group_of(pgid) == []


def test_a_guard_that_finds_the_guest_overdue_takes_its_whole_group_down() -> None:
    t0 = time.monotonic()
    with GuestProcess(GROUP, cwd=Path("/"), env=dict(os.environ)) as guest:
        lines = guest.lines()
        assert next(lines) == "up"
        pgid = os.getpgid(guest._proc.pid)
        assert len(group_of(pgid)) >= 2  # the leader, the background sleep
        guest.guard(lambda now: now - guest.start > 1.0, every=0.2)
        assert list(lines) == []  # the output ends: every writer is gone
    assert time.monotonic() - t0 < 10
    assert gone(pgid)
    assert guest.returncode == -15  # SIGTERM sufficed


def test_an_exception_while_reading_takes_the_group_down() -> None:
    with pytest.raises(KeyboardInterrupt), GuestProcess(GROUP, cwd=Path("/"), env=dict(os.environ)) as guest:
        pgid = os.getpgid(guest._proc.pid)
        next(guest.lines())
        raise KeyboardInterrupt
    assert gone(pgid)


def test_a_group_that_ignores_sigterm_gets_sigkill(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "KILL_GRACE", 0.5)
    stubborn = ["sh", "-c", "trap '' TERM; sleep 300 & echo up; sleep 300"]  # ignored signals are inherited
    with GuestProcess(stubborn, cwd=Path("/"), env=dict(os.environ)) as guest:
        pgid = os.getpgid(guest._proc.pid)
        next(guest.lines())
        guest.guard(lambda _now: True, every=0.1)
        assert list(guest.lines()) == []
    assert gone(pgid)
    assert guest.returncode == -9
