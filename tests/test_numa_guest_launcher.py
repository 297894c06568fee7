"""The numa guest launcher's verdicts, the parts that need no guest: which
failed guests get their failed tests run alone on a new boot, and what the
second boot's result makes of the first (the guests run in `make test-numa`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.numa_guest.launcher import EXIT_TIMEOUT, GuestRun, rerun_verdict, rerunnable

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
