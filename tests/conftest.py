"""Fixtures shared by the host suite and the multi-NUMA guest suite."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from kvmnumad.kvm.runner import install_kick_signal
from kvmnumad.manager import Manager

pytest_plugins = ["tests.sysfixtures", "tests.busfixtures"]


@pytest.fixture(scope="session", autouse=True)
def _kick_signal() -> None:
    """vCPU threads are kicked with a signal whose handler only the main
    thread may install; pytest runs tests in the main thread."""
    if threading.current_thread() is threading.main_thread():
        install_kick_signal()


@pytest.fixture
def manager() -> Iterator[Manager]:
    m = Manager()
    try:
        yield m
    finally:
        m.shutdown()

