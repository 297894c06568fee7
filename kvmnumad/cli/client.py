"""The D-Bus side of kvmnumactl: which bus, and calls that fail as BusError.

Only long-standing dbus-fast API is used (Message, bus.call,
add_message_handler, Variant), because the Debian package runs on dbus-fast
1.84: the high-level proxy API changed between the versions we support.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from kvmnumad.cli.values import UsageError

SERVICE = "org.kvmnuma1"
MANAGER_PATH = "/org/kvmnuma1"
MANAGER_IFACE = "org.kvmnuma1.Manager"
VM_IFACE = "org.kvmnuma1.VM"
JOB_IFACE = "org.kvmnuma1.Job"
JOB_PATH_PREFIX = "/org/kvmnuma1/job/"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DEFAULT_TIMEOUT = 25.0  # seconds; what sd-bus and libdbus use when the caller says nothing


class BusError(Exception):
    """The bus or the service said no; ``name`` is the D-Bus error name (or ours).
    Kept apart from the message so that the exit line can drop the prefix."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class Interrupted(Exception):
    """Ctrl-C, after what it stopped was put right (a migration job cancelled):
    exit status 130 as for any Ctrl-C, with ``message`` saying what was left."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BusChoice(NamedTuple):
    """A parsed ``--bus``: parsed once, before anything is sent, so that a bad
    value is a usage error and not a connection failure."""

    spec: str  # as the user wrote it, for messages
    bus_type: BusType | None
    address: str | None


def parse_bus(text: str) -> BusChoice:
    """``system``, ``session``, a D-Bus address, or a socket path as a shorthand."""
    if text == "system":
        return BusChoice(text, BusType.SYSTEM, None)
    if text == "session":
        return BusChoice(text, BusType.SESSION, None)
    if text.startswith("/"):
        return BusChoice(text, None, f"unix:path={text}")
    if all(re.match(r"^[a-z][a-z0-9-]*:", part) for part in text.split(";") if part) and text.strip(";"):
        return BusChoice(text, None, text)
    raise UsageError(f"invalid bus {text!r} (expected system, session, a D-Bus address or a socket path)")


async def connect(choice: BusChoice) -> MessageBus:
    try:
        if choice.address is not None:
            bus = MessageBus(bus_address=choice.address, negotiate_unix_fd=True)
        else:
            assert choice.bus_type is not None  # parse_bus gives one or the other
            bus = MessageBus(bus_type=choice.bus_type, negotiate_unix_fd=True)  # create --payload sends an fd
        return await bus.connect()
    except Exception as e:  # the library raises OSError, AuthError, InvalidAddressError, ...
        raise BusError("ConnectFailed", f"cannot connect to the {choice.spec} bus: {e}") from None


class Client:
    """One connection to the bus, with calls that raise BusError on error replies,
    so that commands read as the happy path."""

    def __init__(self, bus: MessageBus, interactive: bool, timeout: float | None) -> None:
        self.bus = bus
        self.flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE
        self.timeout = timeout

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        *,
        signature: str = "",
        body: Sequence[Any] = (),
        destination: str = SERVICE,
        unix_fds: Sequence[int] = (),
    ) -> list[Any]:
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            flags=self.flags,
            unix_fds=list(unix_fds),
        )
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), self.timeout)
        except TimeoutError:
            raise BusError("Timeout", f"no reply to {member} within {self.timeout:g} s") from None
        # the library answers None, not an error, when the connection closes cleanly under a call
        if reply is None:
            raise BusError("Disconnected", f"the bus connection closed during {member}")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            name = reply.error_name or "Failed"
            if name.endswith(".ServiceUnknown"):
                text = f"{text} (is kvmnumad running on this bus?)".strip()
            raise BusError(name, text)
        return list(reply.body)

    async def manager(self, member: str, signature: str = "", *args: Any) -> list[Any]:
        return await self.call(MANAGER_PATH, MANAGER_IFACE, member, signature=signature, body=args)

    async def vm_path(self, name: str) -> str:
        """Asks the service rather than escaping the name here: the path's
        escaping is the service's business, and GetVM answers NoSuchVM."""
        (path,) = await self.manager("GetVM", "s", name)
        return str(path)

    async def vm(self, name: str, member: str, signature: str = "", *args: Any) -> list[Any]:
        return await self.call(await self.vm_path(name), VM_IFACE, member, signature=signature, body=args)

    async def properties(self, path: str, interface: str) -> dict[str, Variant]:
        (props,) = await self.call(path, PROPERTIES_IFACE, "GetAll", signature="s", body=[interface])
        return dict(props)
