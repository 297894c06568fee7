"""The private bus of ``make run`` and of the fixtures: the project's policy, and no more.

Checked from outside against a real dbus-daemon, with the real daemon (root,
``kvmnumad --bus private`` as make run starts it) serving org.kvmnuma1 on it:
busctl under runuser as the unprivileged user the policy is about, and
dbus-monitor and an eavesdropping client as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType

from kvmnumad.privatebus import PrivateBus, bus_config
from tests.busfixtures import PROJECT_POLICY, BusClient, DaemonProcess, daemon_process, start_bus_daemon
from tests.sysfixtures import User
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]  # unpriv_user

ROOT = Path(__file__).resolve().parent.parent
NAME = "org.kvmnuma1"
DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")


Daemon = DaemonProcess


@pytest.fixture(scope="module")
def private_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """``kvmnumad --bus private`` without the demo VM (the bus is what is tested here)."""
    with daemon_process("kvmnumad", tmp_path_factory.mktemp("privatebus"), "--bus", "private") as daemon:
        yield daemon


def busctl(address: str, *args: str, user: User | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["busctl", f"--address={address}", *args]
    if user is not None:
        return user.run(*cmd)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def request_name(address: str, name: str, user: User | None = None) -> subprocess.CompletedProcess[str]:
    """RequestName with DO_NOT_QUEUE (4): granted is ``u 1``, a taken name ``u 3``."""
    return busctl(address, "call", *DBUS, "RequestName", "su", name, "4", user=user)


def name_owner_pid(address: str, name: str) -> int:
    out = busctl(address, "call", *DBUS, "GetConnectionUnixProcessID", "s", name)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[1])


def test_others_may_call_but_not_own_the_name_while_the_daemon_serves(
    private_daemon: Daemon, unpriv_user: User
) -> None:
    a, u = private_daemon.address, unpriv_user
    listed = busctl(a, "call", NAME, "/org/kvmnuma1", "org.kvmnuma1.Manager", "ListVMs", user=u)
    assert listed.returncode == 0 and listed.stdout.startswith("a("), listed.stderr
    for name in (NAME, "org.kvmnuma1.Squatter", "org.example.Anything"):
        taken = request_name(a, name, user=u)
        assert taken.returncode != 0 and "Access denied" in taken.stderr, (name, taken.stdout, taken.stderr)
    assert name_owner_pid(a, NAME) == private_daemon.pid  # root's daemon still has it


@contextlib.contextmanager
def _fresh_private_bus() -> Iterator[str]:
    with PrivateBus() as bus:
        yield bus.address


@contextlib.contextmanager
def _fixture_bus() -> Iterator[str]:
    with start_bus_daemon() as bus:
        yield bus.address


@pytest.mark.parametrize("bus", [_fresh_private_bus, _fixture_bus], ids=["make-run", "fixtures"])
def test_only_root_may_own_the_name_before_the_daemon_starts(
    bus: Callable[[], contextlib.AbstractContextManager[str]], unpriv_user: User
) -> None:
    """The window a squatter would use: the bus is up, nobody owns the name yet."""
    with bus() as address:
        taken = request_name(address, NAME, user=unpriv_user)
        assert taken.returncode != 0 and "Access denied" in taken.stderr, (taken.stdout, taken.stderr)
        assert request_name(address, NAME).stdout.strip() == "u 1"  # root, as the policy says
        other = request_name(address, "org.example.Anything")  # and no other name, root or not
        assert other.returncode != 0 and "Access denied" in other.stderr, other.stdout


class MonitorOutput:
    """A dbus-monitor process writing to a file, read as it grows."""

    def __init__(self, address: str, path: Path) -> None:
        self.path = path
        with path.open("w") as out:
            self.proc = subprocess.Popen(["dbus-monitor", "--address", address], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.path.read_text()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _probe(address: str, monitor: MonitorOutput, marker: str) -> None:
    """Return once the monitor shows a broadcast signal carrying ``marker``:
    whatever the bus routed before that signal, the monitor has shown."""

    def seen() -> bool:
        subprocess.run(["dbus-send", f"--bus={address}", "--type=signal", "/org/example/Probe",
                        "org.example.Probe.Mark", f"string:{marker}"], check=True, timeout=30)
        return marker in monitor.text()

    wait_until(seen, f"dbus-monitor to show probe {marker}", timeout=30, interval=0.1)


def test_nobody_may_eavesdrop_root_may_monitor(
    private_daemon: Daemon, unpriv_user: User, tmp_path: Path
) -> None:
    """Both ways of watching other peers' traffic, each by whom it could be tried.

    dbus-daemon 1.14 itself refuses eavesdrop match rules (and BecomeMonitor)
    to connections that are neither root nor the bus's own uid, whatever the
    config says: the unprivileged checks hold by that.  Which eavesdropped
    messages a privileged connection gets is the config's to say, and it
    says none: root's eavesdropper is what fails when an ``allow eavesdrop``
    comes back.  Root's BecomeMonitor (busctl monitor) is the one way left.
    """
    a = private_daemon.address
    become = busctl(a, "monitor", user=unpriv_user)
    assert become.returncode != 0 and "BecomeMonitor" in become.stderr and "Access denied" in become.stderr
    spy_match = busctl(a, "call", *DBUS, "AddMatch", "s", "eavesdrop='true'", user=unpriv_user)
    assert spy_match.returncode != 0, spy_match.stdout

    eavesdropper = BusClient(a)  # root: the bus accepts its eavesdrop match rule
    overheard: list[str] = []

    def overhear(msg: Message) -> bool:
        if msg.message_type == MessageType.METHOD_CALL and msg.destination != eavesdropper.bus.unique_name:
            overheard.append(f"{msg.destination} {msg.member}")
            return True  # handled: never answer another peer's call
        return False

    eavesdropper.bus.add_message_handler(overhear)
    eavesdropper.ok(*DBUS, "AddMatch", "s", ["eavesdrop='true',type='method_call'"])
    monitor = MonitorOutput(a, tmp_path / "monitor.txt")
    try:
        _probe(a, monitor, "before")
        call = busctl(a, "call", NAME, "/org/kvmnuma1", "org.kvmnuma1.Manager", "ListVMs")
        assert call.returncode == 0, call.stderr
        _probe(a, monitor, "after")
        eavesdropper.ok(*DBUS, "GetId")  # a round trip: whatever was routed to it before has arrived
    finally:
        monitor.close()
        eavesdropper.close()
    assert "member=ListVMs" in monitor.text(), monitor.text()  # root's monitor sees every call
    assert overheard == [], overheard  # an eavesdropper, even root's, sees none


def test_a_bus_started_by_another_user_is_that_users_own(unpriv_user: User) -> None:
    """kvmnumad --bus private run by a non-root user (e.g. of the kvm group)
    must still own the name on the bus it started."""
    directory = Path(tempfile.mkdtemp(prefix="kvmnuma-userbus-"))
    try:
        os.chown(directory, unpriv_user.uid, unpriv_user.gid)
        directory.chmod(0o755)
        config = directory / "bus.conf"
        config.write_text(bus_config(directory / "sock", PROJECT_POLICY, owner_uid=unpriv_user.uid))
        out = unpriv_user.run("dbus-daemon", f"--config-file={config}", "--fork", "--print-address=1",
                              "--print-pid=2", check=True)
        address, pid = out.stdout.splitlines()[0].strip(), int(out.stderr.split()[-1])
        try:
            assert request_name(address, NAME, user=unpriv_user).stdout.strip() == "u 1"
            other = request_name(address, "org.example.Anything", user=unpriv_user)
            assert other.returncode != 0 and "Access denied" in other.stderr, other.stdout
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
