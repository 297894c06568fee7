"""sd_notify and the watchdog, observed by a test that plays systemd's notify socket."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmnumad import sdnotify
from tests.waiting import wait_until


class NotifySocket:
    """A datagram socket like PID 1's, recording (arrival time, lines) from a reader thread."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if not address.startswith("@") else "\0" + address[1:])
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode().split("\n")))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def messages(self) -> list[list[str]]:
        return [lines for _, lines in self.received]

    def wait(self, count: int, timeout: float = 2.0) -> None:
        wait_until(lambda: len(self.received) >= count, f"{count} datagrams on the notify socket",
                   timeout=timeout)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    address = str(tmp_path / "notify") if request.param == "path" else f"@kvmnuma-test-{os.getpid()}"
    sock = NotifySocket(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield sock
    sock.close()


def test_notify_ready_status_stopping(notify_socket: NotifySocket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=serving 0 VMs")
    assert sdnotify.notify("STOPPING=1")
    notify_socket.wait(2)
    assert notify_socket.messages() == [["READY=1", "STATUS=serving 0 VMs"], ["STOPPING=1"]]


def test_notify_without_manager(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False  # logged, not raised
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_usec() == 200000
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.Watchdog().interval == 0.1
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_usec() is None
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert sdnotify.watchdog_usec() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.Watchdog().interval is None


def test_watchdog_pings_at_half_period_and_stops_with_a_hung_loop(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s period: ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def main() -> tuple[float, float]:
        dog = sdnotify.Watchdog()
        assert dog.start()
        await asyncio.sleep(1.0)
        hung_from = time.monotonic()
        time.sleep(0.6)  # the loop is blocked: no pings may arrive meanwhile
        hung_to = time.monotonic()
        await asyncio.sleep(0.35)
        dog.stop()
        return hung_from, hung_to

    hung_from, hung_to = asyncio.run(main())
    stopped = time.monotonic()
    time.sleep(0.3)
    assert all(lines == ["WATCHDOG=1"] for lines in notify_socket.messages())
    times = [t for t, _ in notify_socket.received]
    healthy = [t for t in times if t < hung_from]
    # First ping at start, then one per 0.1 s for 1 s: 11, give or take a loaded machine.
    assert 8 <= len(healthy) <= 12, healthy
    gaps = [b - a for a, b in itertools.pairwise(healthy)]
    assert all(0.08 <= g <= 0.3 for g in gaps), gaps
    assert not [t for t in times if hung_from + 0.05 < t < hung_to], "pinged while the loop hung"
    assert [t for t in times if hung_to <= t < stopped], "no ping after the loop recovered"
    assert not [t for t in times if t > stopped + 0.05], "pinged after stop()"


def test_watchdog_disabled_without_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)

    async def main() -> bool:
        return sdnotify.Watchdog().start()

    assert asyncio.run(main()) is False
