"""A pytest plugin of tests/test_fuzz.py: the count of fuzzed calls in the terminal summary."""

from __future__ import annotations

import pytest

LINES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in LINES:
        terminalreporter.write_line(line)
