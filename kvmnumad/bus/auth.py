"""Who may do what: the caller's uid first, polkit only when that is not enough.

Rules (issue 7 item 3), checked in this order:
1. uid 0 may do everything, without asking polkit;
2. a VM's owner (the uid that created it) may, without polkit, do to that VM
   what ``OWNER_MAY`` lists: place it (``org.kvmnuma1.place``), move its
   memory between host nodes (``org.kvmnuma1.migrate-memory``: MapNumaNode),
   and start or stop it (``org.kvmnuma1.manage`` with verb ``start`` or
   ``stop``); destroying it goes through polkit like any other request;
3. everyone else, and the owner for anything else, is asked about through
   polkit with the caller's unique name as subject; without a polkit checker
   (or when polkit fails) non-root callers are denied: fail closed.

Which action a member needs is declared on the member (bus/access.py), and
the Dispatcher asks here before it runs it.

Nothing is cached: unique names are not reused on a bus, but a denied call
must never pass because an earlier one did.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Protocol

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from kvmnumad.errors import AccessDenied, Internal
from kvmnumad.vm import Vm

log = logging.getLogger(__name__)

ACTION_MANAGE = "org.kvmnuma1.manage"  # create, destroy, start, stop
ACTION_PLACE = "org.kvmnuma1.place"  # affinity, binding, guest NUMA, NUMA memory, DefaultPolicy
ACTION_MIGRATE = "org.kvmnuma1.migrate-memory"  # MapNumaNode (it moves the node's memory, if any)
ACTION_ADOPT = "org.kvmnuma1.adopt"  # AdoptProcess, ReleaseVM: another process's guest (admin only)

# What the owner of a VM may do to it without polkit: action -> verbs (None: all)
OWNER_MAY: dict[str, frozenset[str] | None] = {
    ACTION_PLACE: None,
    ACTION_MIGRATE: None,  # the owner's memory, moved between nodes
    ACTION_MANAGE: frozenset({"start", "stop"}),
}


class VmDetails(NamedTuple):
    """What a polkit rule may ask of the VM a call is about."""

    owner: int
    vcpus: int
    memory_bytes: int

    @classmethod
    def of(cls, vm: Vm) -> VmDetails:
        """Blocking (memory_bytes takes the VM's lock): run off the loop."""
        return cls(vm.owner, vm.vcpu_count, vm.memory_bytes)


class PolkitChecker(Protocol):
    """Asks polkit (org.freedesktop.PolicyKit1.Authority.CheckAuthorization)
    with subject ``system-bus-name`` = sender; implemented in bus/polkit.py."""

    async def check(
        self, sender: str, action_id: str, details: dict[str, str], interactive: bool
    ) -> bool: ...


class Authorizer(Protocol):
    """What the bus objects need: the caller's uid (it becomes a VM's owner)
    and a yes-or-AccessDenied for one request."""

    async def caller_uid(self, sender: str) -> int: ...

    async def authorize(
        self,
        sender: str,
        action_id: str,
        details: dict[str, str],
        interactive: bool,
        owner: int | None = None,
        *,
        uid: int | None = None,
        vm: VmDetails | None = None,
    ) -> None:
        """Return if allowed, raise kvmnumad.errors.AccessDenied if not.
        ``owner`` is the uid owning the VM concerned (None: no VM yet);
        ``uid`` the caller's, when the caller knows it already (None: asked);
        ``vm`` the facts of the VM concerned, as the caller read them when it
        looked the VM up (None: no VM yet)."""


def owner_may(action_id: str, verb: str | None) -> bool:
    if action_id not in OWNER_MAY:
        return False
    verbs = OWNER_MAY[action_id]
    return verbs is None or verb in verbs


class BusAuthorizer:
    """The Authorizer of the daemon: uid from the bus daemon, then polkit."""

    def __init__(self, bus: MessageBus, checker: PolkitChecker | None = None) -> None:
        self._bus = bus
        self._checker = checker

    async def caller_uid(self, sender: str) -> int:
        reply = await self._bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetConnectionUnixUser",
                signature="s",
                body=[sender],
            )
        )
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            detail = reply.body if reply is not None else "no reply"
            raise Internal(f"GetConnectionUnixUser({sender}) failed: {detail}")
        uid: int = reply.body[0]
        return uid

    async def authorize(
        self,
        sender: str,
        action_id: str,
        details: dict[str, str],
        interactive: bool,
        owner: int | None = None,
        *,
        uid: int | None = None,
        vm: VmDetails | None = None,
    ) -> None:
        if uid is None:
            uid = await self.caller_uid(sender)
        if uid == 0:
            return
        verb = details.get("verb")
        if owner is not None and uid == owner and owner_may(action_id, verb):
            return
        what = f"{action_id} ({', '.join(f'{k}={v}' for k, v in sorted(details.items()))})"
        if self._checker is None:
            raise AccessDenied(f"uid {uid} may not {what}: only root may, no polkit checker is configured")
        try:
            allowed = await self._checker.check(sender, action_id, details, interactive)
        except Exception as e:
            log.error("polkit check of %s for %s failed", what, sender, exc_info=e)
            raise AccessDenied(f"uid {uid} may not {what}: polkit could not be asked") from e
        if not allowed:
            raise AccessDenied(f"uid {uid} is not authorized for {what}")


class WithVmDetails:
    """An Authorizer that gives polkit what a rule about a VM needs, then asks ``inner``.

    polkit details are strings (a{ss}).  For every call about a VM (detail
    ``vm``), on top of the Dispatcher's ``verb`` and ``vm``:
    ``owner`` (uid owning the VM; for CreateVM the caller, who will own it),
    ``vcpus`` and ``memory_bytes`` (the VM's now; for CreateVM what is asked,
    declared on the method).  A rule can then say "only your own VMs" or "at
    most 4 GiB" (dbus/org.kvmnuma1.policy lists them).  The VM's figures come
    with the call (``vm``), read when the Dispatcher looked the VM up: a second
    lookup here would cost a worker thread per call and could find another VM
    made under the same name meanwhile."""

    def __init__(self, inner: Authorizer) -> None:
        self._inner = inner

    async def caller_uid(self, sender: str) -> int:
        return await self._inner.caller_uid(sender)

    async def authorize(
        self,
        sender: str,
        action_id: str,
        details: dict[str, str],
        interactive: bool,
        owner: int | None = None,
        *,
        uid: int | None = None,
        vm: VmDetails | None = None,
    ) -> None:
        if details.get("vm") is not None:
            details = dict(details)
            if owner is None:  # a VM to be made: its owner-to-be and the figures asked for
                known = uid if uid is not None else await self._inner.caller_uid(sender)
                details.setdefault("owner", str(known))
            else:
                details["owner"] = str(owner)
                if vm is not None:
                    details.setdefault("vcpus", str(vm.vcpus))
                    details.setdefault("memory_bytes", str(vm.memory_bytes))
        await self._inner.authorize(sender, action_id, details, interactive, owner=owner, uid=uid, vm=vm)


async def make_authorizer(bus: MessageBus, use_polkit: bool) -> BusAuthorizer:
    """The daemon's Authorizer: with polkit (kvmnumad.bus.polkit.PolkitChecker)
    on the system bus, root-only elsewhere."""
    checker: PolkitChecker | None = None
    if use_polkit:
        # Imported here: only the system bus has a polkitd to ask.
        from kvmnumad.bus.polkit import PolkitChecker as RealChecker  # noqa: PLC0415

        checker = RealChecker(bus)
    return BusAuthorizer(bus, checker)
