"""Our own dispatch of method calls, ahead of dbus-fast's.

dbus-fast's ``@method`` handlers are not told who called (dbus-next issues 93
and 129), and its dispatch answers ``UnknownMethod`` when the signature is
wrong.  Both matter here: polkit needs the caller's unique name, and a client
that sends ``u`` where ``t`` is due deserves an InvalidArgument that says so.

So a message handler (``bus.add_message_handler``, which runs before any
export lookup in both dbus-fast 1.84 and 5.x) takes every call addressed to
one of our interfaces, checks its signature, and runs the ``@method``
implementation in a task of its own whose context holds the ``Call``
(sender, interactive flag).  A handler reads it with ``current_call()``;
since each task has its own context copy, concurrent callers never see each
other's identity.  Errors are translated in one place (``bus/errors.py``).

Everything else (Introspect, Properties.Get/GetAll, ObjectManager, Peer)
stays with dbus-fast; Properties.Set of a property we declare writable is
ours too, because setting one is a mutation that must be authorized.

dbus-fast internals used: ``ServiceInterface._get_methods`` and the
``_Method`` fields ``name``, ``in_signature``, ``out_signature``, ``fn``,
``disabled`` -- unchanged since dbus-next 0.1 through dbus-fast 5.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface
from dbus_fast.signature import get_signature_tree

from kvmnumad.bus.args import check_signature
from kvmnumad.bus.errors import to_dbus_error
from kvmnumad.errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

PROPERTIES = "org.freedesktop.DBus.Properties"


@dataclass(frozen=True)
class Call:
    """The caller of the method being served."""

    sender: str  # unique bus name, the polkit subject
    interactive: bool  # ALLOW_INTERACTIVE_AUTHORIZATION was set on the message
    member: str


_CURRENT: contextvars.ContextVar[Call] = contextvars.ContextVar("kvmnumad_bus_call")


def current_call() -> Call:
    try:
        return _CURRENT.get()
    except LookupError:
        raise Internal("no D-Bus call is being served in this context") from None


class BusObject(ServiceInterface):
    """A ServiceInterface whose writable properties are set through
    ``set_property`` (authorized, validated, off the loop), never through
    dbus-fast's synchronous setter.  Property values are mirrored from the
    core in ``_props`` (served by dbus-fast's getters, updated by ``publish``)."""

    writable: dict[str, str] = {}  # property name -> signature

    def __init__(self, name: str, props: dict[str, Any]) -> None:
        super().__init__(name)
        self._props = props

    def variants(self) -> dict[str, Variant]:
        """Every property as a Variant (InterfacesAdded)."""
        sigs = {p.name: p.signature for p in self.introspect().properties}
        return {name: Variant(sigs[name], value) for name, value in self._props.items()}

    def publish(self, values: dict[str, Any]) -> None:
        """Take the new ``values``; one PropertiesChanged with those that differ, none if none do."""
        changed = {k: v for k, v in values.items() if self._props.get(k) != v}
        self._props.update(values)
        if changed:
            self.emit_properties_changed(changed)

    async def set_property(self, name: str, value: Any) -> None:
        raise InvalidArgument(f"property {name!r} is read-only")


@dataclass(frozen=True)
class _Member:
    in_signature: str
    out_signature: str
    fn: Callable[..., Awaitable[Any]]


def _members(iface: ServiceInterface) -> dict[str, _Member]:
    return {
        m.name: _Member(m.in_signature, m.out_signature, m.fn)
        for m in ServiceInterface._get_methods(iface)
        if not m.disabled
    }


class Dispatcher:
    """Exports our objects and serves their method calls (see module doc)."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._objects: dict[str, dict[str, tuple[ServiceInterface, dict[str, _Member]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._installed = False
        # path prefix -> (interface, its members, error for a path nobody exports)
        self._fallbacks: dict[str, tuple[str, dict[str, _Member], Callable[[str], Exception]]] = {}

    def install(self) -> None:
        if not self._installed:
            self._bus.add_message_handler(self._on_message)
            self._installed = True

    def close(self) -> None:
        """Stop serving: remove the handler, unexport, cancel calls in flight."""
        if self._installed:
            self._bus.remove_message_handler(self._on_message)
            self._installed = False
        for path in list(self._objects):
            self.unexport(path)
        for task in list(self._tasks):
            task.cancel()

    def export(self, path: str, iface: ServiceInterface) -> None:
        self._bus.export(path, iface)
        self._objects.setdefault(path, {})[iface.name] = (iface, _members(iface))

    def unexport(self, path: str) -> None:
        if self._objects.pop(path, None) is not None:
            self._bus.unexport(path)

    def is_exported(self, path: str) -> bool:
        return path in self._objects

    def add_fallback(
        self, prefix: str, template: ServiceInterface, error: Callable[[str], Exception]
    ) -> None:
        """Calls of ``template``'s methods on ``prefix/<element>`` paths that
        nobody exports (a VM destroyed meanwhile) answer ``error(element)``
        (NoSuchVM naming it) instead of dbus-fast's UnknownMethod."""
        self._fallbacks[prefix] = (template.name, _members(template), error)

    # -------------------------------------------------------------- dispatch
    def _on_message(self, msg: Message) -> bool:
        """Runs on the loop for every message: must not raise or block."""
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        if msg.path not in self._objects:
            return self._on_missing(msg)
        ifaces = self._objects[msg.path]
        if msg.interface == PROPERTIES:
            return self._on_set_property(msg, ifaces)
        for name, (iface, members) in ifaces.items():
            if msg.interface in (None, name) and msg.member in members:
                m = members[msg.member]
                self._spawn(msg, m.in_signature, m.out_signature, functools.partial(m.fn, iface))
                return True
        return False  # not ours: dbus-fast answers (UnknownMethod/UnknownInterface)

    def _on_missing(self, msg: Message) -> bool:
        prefix, _, element = (msg.path or "").rpartition("/")
        if prefix not in self._fallbacks or not element:
            return False
        iface_name, members, error = self._fallbacks[prefix]
        if msg.interface not in (None, iface_name) or msg.member not in members:
            return False
        m = members[msg.member]

        async def missing(*args: Any) -> None:
            raise error(element)

        self._spawn(msg, m.in_signature, m.out_signature, missing)
        return True

    def _on_set_property(self, msg: Message, ifaces: dict[str, tuple[ServiceInterface, Any]]) -> bool:
        if msg.member != "Set" or msg.signature != "ssv":
            return False
        entry = ifaces.get(msg.body[0])
        if entry is None or not isinstance(entry[0], BusObject) or msg.body[1] not in entry[0].writable:
            return False  # dbus-fast answers UnknownProperty / PropertyReadOnly
        obj: BusObject = entry[0]
        prop: str = msg.body[1]

        async def set_(iface_name: str, name: str, value: Variant) -> None:
            expected = obj.writable[prop]
            if value.signature != expected:
                raise InvalidArgument(f"property {prop} is of type {expected!r}, got {value.signature!r}")
            await obj.set_property(prop, value.value)

        self._spawn(msg, "ssv", "", set_)
        return True

    def _spawn(self, msg: Message, in_sig: str, out_sig: str, fn: Callable[..., Awaitable[Any]]) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(msg, in_sig, out_sig, fn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, msg: Message, in_sig: str, out_sig: str, fn: Callable[..., Awaitable[Any]]
    ) -> None:
        flags = MessageFlag(msg.flags)
        call = Call(
            sender=msg.sender or "",
            interactive=bool(flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION),
            member=f"{msg.interface or ''}.{msg.member}",
        )
        _CURRENT.set(call)  # this task's own context: no reset needed
        try:
            check_signature(msg.member or "", in_sig, msg.signature)
            result = await fn(*msg.body)
            body = _reply_body(out_sig, result)
            reply = Message.new_method_return(msg, out_sig, body)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            err = to_dbus_error(e, f"{call.member} from {call.sender}")
            reply = Message.new_error(msg, err.type, err.text)
        if not flags & MessageFlag.NO_REPLY_EXPECTED:
            self._bus.send(reply)


def _reply_body(signature: str, result: Any) -> list[Any]:
    """The reply body checked against the signature before it is sent, so a
    core value the signature cannot carry (a negative 'u') becomes an Internal
    error here instead of a broken message or a silent disconnect."""
    tree = get_signature_tree(signature)
    if not tree.types:
        body: list[Any] = []
    elif len(tree.types) == 1:
        body = [result]
    else:
        body = list(result)
    tree.verify(body)
    return body
