"""`make test`'s driver (tests/suite.py): the closing count it reads from each part's own summary."""

from __future__ import annotations

from tests.suite import Part, _summary


def test_each_parts_summary_line_is_found_and_counted() -> None:
    host = ["x\n", "\x1b[32m===== 412 passed, 3 skipped, 1 failed in 303.12s (0:05:03) =====\x1b[0m\n", "y\n"]
    systemd = ["systemd-guest: 17 passed, 0 failed (boot 31.0 s, total 475 s)", "other"]
    numa = ["numa-guest 2node: 44 passed, 0 failed (boot 20.1 s, total 571 s)",
            "numa-guests: 83 passed, 0 failed"]
    parts = [Part("host", 1, 1.0, _summary(host)), Part("systemd", 0, 1.0, _summary(systemd)),
             Part("numa", 0, 1.0, _summary(numa))]
    assert parts[0].closing is not None and parts[0].closing.startswith("=====")
    assert [p.counts() for p in parts] == [(412, 1), (17, 0), (83, 0)]


def test_a_failed_part_without_a_summary_is_one_failure() -> None:
    assert Part("bench-quick", 2, 1.0, _summary(["Traceback ...", "boom"])).counts() == (0, 1)
    assert Part("bench-quick", 0, 1.0, None).counts() == (0, 0)
