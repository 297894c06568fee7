"""Fixtures of the bus suite: a real dbus-daemon, the real service on it, clients.

Load them as a plugin from a test module: ``pytest_plugins = ["tests.busfixtures"]``.
(PYTEST_DONT_REWRITE: test modules import helpers from here before the plugin loads.)

``bus_daemon`` (module): ``dbus-daemon --fork --print-address=1 --print-pid=2``
    with the config ``make run``'s private bus has (kvmnumad.privatebus.bus_config):
    any uid may connect (so tests can call as an unprivileged user), the
    system bus's deny-by-default, and the project's dbus/org.kvmnuma1.conf.
    Killed by pid at teardown.
``service`` (function): a real Manager and start_service() on a connection
    of its own, run by an asyncio loop on a thread of its own (the service is
    async; the tests are not).  Authorizer: BusAuthorizer without polkit,
    unless the module overrides ``service_checker`` (see test_bus_auth);
    ``run_service(..., polkit=True)`` wires the daemon's make_authorizer.
``client`` (function): a dbus-fast client on its own loop thread with
    blocking helpers (call/ok/error/get/wait_signal).
``busctl(address, *args)``: busctl --address=... --json=short, output parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from kvmnumad.bus.auth import BusAuthorizer, PolkitChecker, make_authorizer
from kvmnumad.bus.service import BUS_NAME, BusService, connect, start_service
from kvmnumad.manager import Manager
from kvmnumad.privatebus import bus_config
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
PROJECT_POLICY = ROOT / "dbus" / "org.kvmnuma1.conf"
MANAGER_PATH = "/org/kvmnuma1"
MANAGER_IFACE = "org.kvmnuma1.Manager"
VM_IFACE = "org.kvmnuma1.VM"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
OM_IFACE = "org.freedesktop.DBus.ObjectManager"
MiB = 1 << 20

T = TypeVar("T")

# ----------------------------------------------------------------- loop thread
class LoopThread:
    """An asyncio loop running on a daemon thread; ``run`` blocks the caller."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.loop.shutdown_default_executor(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# ------------------------------------------------------------------ dbus-daemon
@dataclass
class BusDaemon:
    address: str
    pid: int
    directory: Path


@contextlib.contextmanager
def start_bus_daemon(include_policy: bool = True) -> Iterator[BusDaemon]:
    directory = Path(tempfile.mkdtemp(prefix="kvmnuma-testbus-"))
    directory.chmod(0o755)  # unprivileged callers reach the socket
    config = directory / "bus.conf"
    # make run's config, nothing added: the tests run as root (the policy's owner of
    # org.kvmnuma1), own no other name, and busctl monitor uses root's BecomeMonitor
    # rule of the template; no test needs eavesdropping or anyone else owning names.
    # The checkout's policy, never an installed one: the tests are of this tree.
    config.write_text(bus_config(directory / "sock", PROJECT_POLICY if include_policy else None))
    out = subprocess.run(
        ["dbus-daemon", f"--config-file={config}", "--fork", "--print-address=1", "--print-pid=2"],
        check=True, capture_output=True, text=True, timeout=30,
    )
    pid = int(out.stderr.split()[-1])
    try:
        yield BusDaemon(out.stdout.splitlines()[0].strip(), pid, directory)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def bus_daemon() -> Iterator[BusDaemon]:
    with start_bus_daemon() as daemon:
        yield daemon


# ---------------------------------------------------------------- the service
@dataclass
class DaemonProcess:
    address: str
    pid: int
    log: Path


@contextlib.contextmanager
def daemon_process(module: str, tmp: Path, *args: str, stop: int = signal.SIGTERM) -> Iterator[DaemonProcess]:
    """``python -m MODULE`` as a real process on its own private bus, known
    ready by the address file it writes once the name is owned; stopped by
    ``stop`` (SIGINT is make run's Ctrl-C) and required to exit 0."""
    address_file, log = tmp / "address", tmp / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--address-file", str(address_file), "--log-target", "stderr",
             *args],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        # the daemon renames the file into place whole; the newline check also covers an old one
        wait_until(lambda: proc.poll() is not None
                   or (address_file.is_file() and address_file.read_text().endswith("\n")),
                   f"{module}'s bus address", timeout=60)
        assert proc.poll() is None, log.read_text()
        yield DaemonProcess(address_file.read_text().strip(), proc.pid, log)
    finally:
        proc.send_signal(stop)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()


@dataclass
class RunningService:
    address: str
    manager: Manager
    service: BusService
    bus: MessageBus
    loop: LoopThread

    @property
    def unique_name(self) -> str:
        assert self.bus.unique_name is not None
        return self.bus.unique_name


@contextlib.contextmanager
def run_service(
    address: str, manager: Manager, checker: PolkitChecker | None = None, *, polkit: bool = False
) -> Iterator[RunningService]:
    """With ``polkit``, the authorizer the daemon builds (the real PolkitChecker)."""
    loop = LoopThread("bus-service")
    try:

        async def start() -> tuple[MessageBus, BusService]:
            bus = await connect(address)
            auth = await make_authorizer(bus, use_polkit=True) if polkit else BusAuthorizer(bus, checker)
            return bus, await start_service(manager, bus, auth)

        bus, service = loop.run(start())
        try:
            yield RunningService(address, manager, service, bus, loop)
        finally:

            async def stop() -> None:
                await service.stop()
                bus.disconnect()

            loop.run(stop())
    finally:
        loop.close()


@pytest.fixture
def service_checker() -> PolkitChecker | None:
    """Override in a module to give the service a polkit checker."""
    return None


@pytest.fixture
def service(
    bus_daemon: BusDaemon, manager: Manager, service_checker: PolkitChecker | None
) -> Iterator[RunningService]:
    with run_service(bus_daemon.address, manager, service_checker) as running:
        yield running


# ------------------------------------------------------------------ clients
def plain(value: Any) -> Any:
    """Structs as lists, whichever dbus-fast unmarshalled them (5.x: tuples,
    1.84: lists), Variants unwrapped: values compare with JSON from busctl."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class CallFailed(AssertionError):
    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.name = name
        self.text = text


class BusClient:
    """A dbus-fast client for sync tests; records every signal it receives."""

    def __init__(self, address: str) -> None:
        self._loop = LoopThread("bus-client")
        self.bus: MessageBus = self._loop.run(connect(address))
        self.signals: list[Message] = []
        self._cond = threading.Condition()
        self.bus.add_message_handler(self._on_message)
        self.ok("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch",
                "s", [f"type='signal',sender='{BUS_NAME}'"])

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL:
            with self._cond:
                self.signals.append(msg)
                self._cond.notify_all()
        return False

    def close(self) -> None:
        self.bus.disconnect()
        self._loop.close()

    def send(self, msg: Message) -> None:
        """Send without waiting for a reply (from the client's own loop)."""
        self._loop.loop.call_soon_threadsafe(self.bus.send, msg)

    def call(self, dest: str, path: str, iface: str | None, member: str, signature: str = "",  # noqa: PLR0917
             body: list[Any] | None = None, flags: MessageFlag = MessageFlag.NONE,
             timeout: float = 30) -> Message:
        msg = Message(destination=dest, path=path, interface=iface, member=member,
                      signature=signature, body=body or [], flags=flags)
        reply = self._loop.run(self.bus.call(msg), timeout)
        assert reply is not None
        return reply

    def ok(self, dest: str, path: str, iface: str | None, member: str, signature: str = "",  # noqa: PLR0917
           body: list[Any] | None = None, **kw: Any) -> list[Any]:
        reply = self.call(dest, path, iface, member, signature, body, **kw)
        if reply.message_type == MessageType.ERROR:
            raise CallFailed(reply.error_name or "", str(reply.body[0] if reply.body else ""))
        return [plain(v) for v in reply.body]

    def error(self, dest: str, path: str, iface: str | None, member: str, signature: str = "",  # noqa: PLR0917
              body: list[Any] | None = None, **kw: Any) -> tuple[str, str]:
        """(error name, message) of a call that must fail."""
        reply = self.call(dest, path, iface, member, signature, body, **kw)
        assert reply.message_type == MessageType.ERROR, f"{member} succeeded: {reply.body}"
        return reply.error_name or "", str(reply.body[0] if reply.body else "")

    # the service's own objects
    def manager(self, member: str, signature: str = "", *args: Any) -> list[Any]:
        return self.ok(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member, signature, list(args))

    def vm(self, path: str, member: str, signature: str = "", *args: Any) -> list[Any]:
        return self.ok(BUS_NAME, path, VM_IFACE, member, signature, list(args))

    def get(self, path: str, iface: str, prop: str) -> Any:
        (value,) = self.ok(BUS_NAME, path, PROPS_IFACE, "Get", "ss", [iface, prop])
        return value

    def get_all(self, path: str, iface: str) -> dict[str, Any]:
        (props,) = self.ok(BUS_NAME, path, PROPS_IFACE, "GetAll", "s", [iface])
        return dict(props)

    def wait_signal(self, predicate: Callable[[Message], bool], timeout: float = 10) -> Message:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.signals:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.path, m.interface, m.member) for m in self.signals]
                    raise AssertionError(f"no matching signal within {timeout} s; seen: {seen}")
                self._cond.wait(left)


@pytest.fixture
def client(bus_daemon: BusDaemon) -> Iterator[BusClient]:
    c = BusClient(bus_daemon.address)
    try:
        yield c
    finally:
        c.close()


def options(**kw: Any) -> dict[str, Variant]:
    """CreateVM/PlanVM options with the signatures the contract gives them."""
    sigs = {"numa_nodes": "u", "policy": "s", "host_nodes": "au", "payload": "h", "prealloc": "b",
            "start": "b", "allow_split": "b", "passes": "u"}
    return {k: Variant(sigs[k], v) for k, v in kw.items()}


# -------------------------------------------------------------------- busctl
# busctl's own call timeout.  In the multi-NUMA TCG guest (KVMNUMAD_TOPOLOGY set) a loaded host
# slows every call: a CreateVM with prealloc took more than busctl's default 25 s in a soak run
# beside two stress-ng, with nothing hung.  Each caller's own --timeout comes after it and wins.
BUSCTL_TIMEOUT = 120 if os.environ.get("KVMNUMAD_TOPOLOGY") else 25


def busctl(address: str, *args: str, check: bool = True, user: str | None = None, json_: bool = True) -> Any:
    """``busctl --address=ADDRESS --json=short ARGS``, its JSON parsed (None
    when it printed nothing); with ``check=False`` the CompletedProcess.
    With ``user``, run through runuser; ``json_=False``: plain output."""
    json_args = ["--json=short"] if json_ else []
    cmd = ["busctl", f"--address={address}", f"--timeout={BUSCTL_TIMEOUT}", *json_args, *args]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=BUSCTL_TIMEOUT + 15, check=False)
    if check and out.returncode != 0:
        raise CallFailed("busctl", f"{' '.join(args)}: {out.stderr.strip()}")
    if not check or not json_:
        return out
    return json.loads(out.stdout) if out.stdout.strip() else None
