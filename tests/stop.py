"""How the test drivers stop: make test's (tests/suite.py), both guest launchers and the soak.

A driver killed by SIGTERM or SIGHUP had left its launcher and QEMU running.
So those signals become a KeyboardInterrupt, and a stop takes the one path
Ctrl-C already takes: every ``finally`` on the way out (GuestProcess's kill,
``reaped``) takes its children down.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from types import FrameType
from typing import Any


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)  # str(e) names the signal; Ctrl-C's is ""


def raise_on(*signals: signal.Signals) -> None:
    for sig in signals:
        signal.signal(sig, _raise)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[Any]) -> Iterator[None]:
    """A child still running when the block is left (an interrupt) gets SIGTERM and is waited
    for: each launcher takes its guest down on SIGTERM, and Popen's own exit does not kill."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
