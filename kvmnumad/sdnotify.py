"""sd_notify(3) without libsystemd, and a watchdog driven by the event loop.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent to
the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract address
written with a leading ``@``).  Writing it here keeps the daemon free of a C
dependency for three lines of socket code, and lets a test play the manager.

The watchdog pings from a ``call_later`` chain on the asyncio loop on purpose:
if the loop hangs (a blocking call slipped onto it), the pings stop and
systemd restarts the service, which is the whole point of ``WatchdogSec=``.
A thread would keep pinging a dead daemon.

Example::

    notify("READY=1", "STATUS=serving 0 VMs")
    dog = Watchdog()        # reads WATCHDOG_USEC / WATCHDOG_PID
    dog.start()             # inside the running loop
    ...
    notify("STOPPING=1"); dog.stop()
"""

from __future__ import annotations

import array
import logging
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the module is on the restore path, which runs before asyncio is imported
    import asyncio

log = logging.getLogger(__name__)


def _address(raw: str) -> str | None:
    """Map ``$NOTIFY_SOCKET`` to a sendto() address; None for kinds we don't speak (vsock)."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def notify(*lines: str) -> bool:
    """Send one notification; True if a manager socket was there and took it.

    Never raises: a daemon must keep running when nobody listens (started by
    hand, or the manager went away), so failures are only logged.
    """
    return notify_with_fds(lines, [])


def notify_with_fds(lines: tuple[str, ...] | list[str], fds: list[int]) -> bool:
    """sd_pid_notify_with_fds(3): one datagram with ``fds`` as SCM_RIGHTS,
    for FDSTORE=1 (systemd keeps a dup of each until FDSTOREREMOVE=1 or the
    unit is stopped for good).  Never raises, like notify()."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    addr = _address(raw)
    if addr is None:
        log.warning("NOTIFY_SOCKET=%s: unsupported address kind", raw)
        return False
    payload = "\n".join(lines).encode()
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendmsg([payload], rights, 0, addr)
    except OSError as e:
        log.warning("sd_notify%s to %s failed: %s", f" with {len(fds)} fd(s)" if fds else "", raw, e)
        return False
    return True


def watchdog_usec(environ: dict[str, str] | None = None) -> int | None:
    """The watchdog period the manager asked of this process, as sd_watchdog_enabled(3) reads it.

    WATCHDOG_PID, when set, names the process the period is meant for: a
    child that inherited the environment must not ping in its parent's name.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    return usec


class Watchdog:
    """Sends WATCHDOG=1 every half period from the event loop it was started in."""

    def __init__(self, usec: int | None = None) -> None:
        self._usec = watchdog_usec() if usec is None else usec
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def interval(self) -> float | None:
        """Seconds between pings: half the period, as systemd.service(5) recommends."""
        return None if not self._usec else self._usec / 2_000_000

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> bool:
        """Begin pinging (first ping at once); False when no watchdog was requested."""
        if self.interval is None:
            return False
        if self._handle is None:
            import asyncio  # noqa: PLC0415 -- see the TYPE_CHECKING import

            self._loop = asyncio.get_running_loop()
            self._ping()
        return True

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _ping(self) -> None:
        assert self._loop is not None and self.interval is not None
        notify("WATCHDOG=1")
        self._handle = self._loop.call_later(self.interval, self._ping)
