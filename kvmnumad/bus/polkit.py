"""Asks polkitd whether a D-Bus caller may perform an action.

The subject is the caller's unique bus name ("system-bus-name"), not a PID:
polkitd then reads the caller's credentials from the bus itself, which cannot
be raced by a PID being reused.  Every call asks anew and nothing is cached
across callers: polkit's own ``auth_admin_keep`` already remembers a
successful authentication for the right subject, and a cache here could only
get that wrong.

Any failure to get an answer (polkitd absent, an error reply, a timeout) is
"not authorized", logged: a broken polkit must close the door, not open it.
"""

from __future__ import annotations

import asyncio
import logging

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

log = logging.getLogger(__name__)

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 0x1


class PolkitChecker:
    """CheckAuthorization against polkitd on ``bus`` (a connection to the system bus).

    ``timeout`` bounds one answer; an interactive check waits for a human at
    an authentication agent, so it gets ``interactive_timeout`` instead.
    """

    def __init__(self, bus: MessageBus, *, timeout: float = 25.0, interactive_timeout: float = 300.0) -> None:
        self._bus = bus
        self._timeout = timeout
        self._interactive_timeout = interactive_timeout

    async def check(self, sender: str, action_id: str, details: dict[str, str], interactive: bool) -> bool:
        """True only if polkitd answers is_authorized for ``sender`` (a unique name like ``:1.42``)."""
        message = Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_INTERFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[
                ["system-bus-name", {"name": Variant("s", sender)}],
                action_id,
                details,
                ALLOW_USER_INTERACTION if interactive else 0,
                "",  # cancellation id: none, a caller cannot cancel another's check
            ],
        )
        timeout = self._interactive_timeout if interactive else self._timeout
        try:
            reply = await asyncio.wait_for(self._bus.call(message), timeout)
        except Exception as e:  # disconnected, timed out, ...: fail closed
            log.error("polkit check %s for %s failed: %r", action_id, sender, e)
            return False
        if reply is None or reply.message_type == MessageType.ERROR:
            error = None if reply is None else (reply.error_name, reply.body)
            log.error("polkit check %s for %s: error reply %s", action_id, sender, error)
            return False
        authorized, challenge, _details = reply.body[0]
        log.debug("polkit %s for %s: authorized=%s challenge=%s", action_id, sender, authorized, challenge)
        return bool(authorized)
