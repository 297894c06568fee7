"""The one bounded wait of the test suite.

A test that needs something to happen polls the real condition (a thread's
affinity, a name on the bus, a line in the journal) with ``wait_until``; it
never sleeps a fixed time hoping it happened.  The daemon itself never polls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], what: str, *, timeout: float = 10.0, interval: float = 0.02) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    ``what`` names the awaited condition: after ``timeout`` seconds the
    AssertionError says what did not happen, and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            last = repr(value)
            last = last if len(last) <= 300 else last[:300] + "..."
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last value: {last})")
        time.sleep(interval)
