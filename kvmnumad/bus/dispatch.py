"""Our own dispatch of method calls, ahead of dbus-fast's: identity, checks, authorization.

dbus-fast's ``@method`` handlers are not told who called (dbus-next issues 93
and 129), and its dispatch answers ``UnknownMethod`` when the signature is
wrong.  Both matter here: polkit needs the caller's unique name, and a client
that sends ``u`` where ``t`` is due deserves an InvalidArgument that says so.

So a message handler (``bus.add_message_handler``, which runs before any
export lookup in both dbus-fast 1.84 and 5.x) takes every call addressed to
one of our interfaces and serves it in a task of its own whose context holds
the ``Call`` (sender, interactive flag); since each task has its own context
copy, concurrent callers never see each other's identity.  Serving is, in
this order: the signature; the member's declaration (bus/access.py) --
none means AccessDenied, logged; the declared argument checks; for a
mutating member the Authorizer with polkit details (verb, vm, declared
details) and the VM's owner; the call itself; and, for a mutating member,
the event barrier, so that the reply follows the PropertiesChanged the
change caused.  Errors are translated in one place (``bus/errors.py``).

Properties.Get/GetAll and Peer stay with dbus-fast; GetManagedObjects is
ours, from each object's property mirror in one pass; Properties.Set of a
writable property is ours too, because setting one is a mutation like any
other. So is what dbus-fast gets wrong about objects: a path with no object
of ours answers UnknownObject for every method, Introspect and Properties
included (dbus-fast would introspect an empty node and list an empty
GetManagedObjects there); ObjectManager is only where ``export(...,
object_manager=True)`` put it (dbus-fast claims it on every object);
Introspect of a path that only leads to objects lists its children, so that
``busctl tree`` still walks down. Peer answers on any path, as the spec has
it (it is about the connection, not an object).

Limits (issue 12 findings 4 and 8): a unique name has at most
``PER_SENDER`` calls in flight and a non-root uid at most ``PER_UID``; one
more is answered ``org.kvmnuma1.Error.LimitReached`` at once, before any
task or thread exists for it; so is a non-root uid's call beyond ``RATE``
calls per second (``BURST`` at once), since even calls served from memory
cost the one event loop everyone shares (a 5,000 calls/s flood took a whole
CPU and root's ListVMs p99 went to 90 ms).  The blocking work of calls runs in
kvmnumad.workers' pool (installed as the loop's default executor), filed
under the caller's uid and unique name, so a uid that floods or blocks
threads waits behind itself only.  A read-only call that took longer than
``COSTLY_READ`` seconds (GetStats or PlanVM walking a large VM's pages) is
answered to non-root callers from its last result for nine times as long
as it took, and identical reads in flight share one run: what an
unprivileged reader can make the daemon do costs at most a tenth of its
time, whatever the rate.  Root always reads fresh.  A call whose body is over
64 KiB never gets here: bus/framing.py skips it unread and answers LimitReached.

dbus-fast internals used: ``ServiceInterface._get_methods`` and the
``_Method`` fields ``name``, ``in_signature``, ``out_signature``, ``fn``,
``disabled`` -- unchanged since dbus-next 0.1 through dbus-fast 5.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from dbus_fast import Message, MessageFlag, MessageType, PropertyAccess, Variant
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface
from dbus_fast.signature import get_signature_tree

from kvmnumad.bus.access import Access, access_of, declarations, parameters, setters
from kvmnumad.bus.args import check_signature
from kvmnumad.bus.auth import VmDetails
from kvmnumad.bus.context import BusContext
from kvmnumad.bus.errors import DBUS_NAMES, UNKNOWN_INTERFACE, UNKNOWN_OBJECT, to_dbus_error
from kvmnumad.bus.introspection import served
from kvmnumad.bus.paths import OBJECT_MANAGER, vm_path
from kvmnumad.errors import AccessDenied, Internal, InvalidArgument, LimitReached
from kvmnumad.vm import Vm
from kvmnumad.workers import CALLER, Caller, WorkerPool

log = logging.getLogger(__name__)

PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PEER = "org.freedesktop.DBus.Peer"

PER_SENDER = 128  # calls in flight per unique name (dbus-daemon's own default per connection)
PER_UID = 256  # calls in flight per non-root uid, over all its connections
RATE = 500.0  # calls per second a non-root uid may make, sustained ...
BURST = 1000.0  # ... and in one burst (token bucket): the loop is shared, and a flood costs it CPU
UID_CACHE = 4096  # unique name -> uid entries kept (unique names are never reused)
COSTLY_READ = 0.005  # seconds: a read that took longer is shared with non-root callers for 9x as long
READ_CACHE = 256  # costly read results kept
LIMIT_REACHED = DBUS_NAMES[LimitReached]


@dataclass(frozen=True)
class Call:
    """The caller of the method being served."""

    sender: str  # unique bus name, the polkit subject
    interactive: bool  # ALLOW_INTERACTIVE_AUTHORIZATION was set on the message
    member: str


@dataclass(frozen=True)
class Subject:
    """What a mutating call is about: polkit's ``vm`` detail (None: the
    host), the owner the owner rule compares with, and the object path whose
    publishing the reply waits for."""

    vm: str | None
    owner: int | None
    path: str
    target: Vm | None = None  # the VM itself, if the object has it: its figures go to polkit


_CURRENT: contextvars.ContextVar[Call] = contextvars.ContextVar("kvmnumad_bus_call")


def current_call() -> Call:
    try:
        return _CURRENT.get()
    except LookupError:
        raise Internal("no D-Bus call is being served in this context") from None


_INTROSPECTION: dict[type, intr.Interface] = {}
_SIGNATURES: dict[type, dict[str, str]] = {}  # property -> its signature, per BusObject class


class BusObject(ServiceInterface):
    """A ServiceInterface the Dispatcher serves: members declared with
    bus/access.py, property values mirrored from the core in ``_props``
    (served by dbus-fast's getters, updated by ``publish``)."""

    def __init__(self, name: str, props: dict[str, Any]) -> None:
        super().__init__(name)
        self._props = props

    def subject(self) -> Subject:
        """What a call on this object is about, unless its declaration names a VM argument."""
        raise NotImplementedError

    def introspect(self) -> intr.Interface:
        """dbus-fast's introspection of the code, rendered with the shipped
        XML's names, docs and annotations (bus/introspection.py); built once
        per class, since every object of a class has the same members."""
        cls = type(self)
        if cls not in _INTROSPECTION:
            _INTROSPECTION[cls] = served(super().introspect())
        return _INTROSPECTION[cls]

    def variants(self) -> dict[str, Variant]:
        """Every property as a Variant (InterfacesAdded, GetManagedObjects)."""
        cls = type(self)
        if cls not in _SIGNATURES:
            _SIGNATURES[cls] = {p.name: p.signature for p in self.introspect().properties}
        sigs = _SIGNATURES[cls]
        return {name: Variant(sigs[name], value) for name, value in self._props.items()}

    def publish(self, values: dict[str, Any]) -> None:
        """Take the new ``values``; one PropertiesChanged with those that differ, none if none do."""
        changed = {k: v for k, v in values.items() if self._props.get(k) != v}
        self._props.update(values)
        if changed:
            self.emit_properties_changed(changed)


@dataclass(frozen=True)
class _Member:
    name: str
    in_signature: str
    out_signature: str
    fn: Callable[..., Awaitable[Any]]
    params: tuple[str, ...]
    access: Access | None


@dataclass(frozen=True)
class _Table:
    """What the Dispatcher knows of one BusObject class, built when its first object is exported."""

    members: dict[str, _Member]
    setters: dict[str, _Member]  # writable property -> its setter (in_signature: the property's)
    writable: frozenset[str]  # what introspection calls writable, declared or not


_TABLES: dict[type, _Table] = {}


def _members(iface: ServiceInterface) -> dict[str, _Member]:
    return {
        m.name: _Member(m.name, m.in_signature, m.out_signature, m.fn, parameters(m.fn), access_of(m.fn))
        for m in ServiceInterface._get_methods(iface)
        if not m.disabled
    }


def _table(iface: BusObject) -> _Table:
    cls = type(iface)
    if cls in _TABLES:
        return _TABLES[cls]
    props = iface.introspect().properties
    sigs = {p.name: p.signature for p in props}
    found = {
        prop: _Member(prop, sigs[prop], "", fn, parameters(fn), access_of(fn))
        for prop, fn in setters(cls).items()
        if prop in sigs
    }
    writes = (PropertyAccess.READWRITE, PropertyAccess.WRITE)
    writable = frozenset(p.name for p in props if p.access in writes)
    undeclared = [name for name, access in declarations(cls).items() if access is None]
    undeclared += [p for p in writable if p not in found or found[p].access is None]
    if undeclared:
        log.error("%s declares no access for %s: every call of them will be refused",
                  cls.__qualname__, ", ".join(sorted(undeclared)))
    table = _TABLES[cls] = _Table(_members(iface), found, writable)
    return table


class Dispatcher:
    """Exports our objects and serves their method calls (see module doc)."""

    def __init__(self, bus: MessageBus, context: BusContext) -> None:
        self._bus = bus
        self._context = context
        self._objects: dict[str, dict[str, tuple[BusObject, _Table]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._installed = False
        self.pool = WorkerPool()
        self._per_sender: dict[str, int] = {}
        self._per_uid: dict[int, int] = {}
        self._uids: OrderedDict[str, asyncio.Task[int]] = OrderedDict()
        self._buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, when)
        # costly reads: key -> (expiry, result); key -> the run in flight
        self._reads: OrderedDict[tuple[Any, ...], tuple[float, Any, BusObject]] = OrderedDict()
        self._reading: dict[tuple[Any, ...], asyncio.Future[Any]] = {}
        self._object_managers: set[str] = set()

    def install(self) -> None:
        """Serve calls; the loop's ``to_thread`` work goes to our pool from now on."""
        if not self._installed:
            asyncio.get_running_loop().set_default_executor(self.pool)
            self._bus.add_message_handler(self._on_message)
            self._installed = True

    def in_flight(self) -> dict[str, int]:
        """Calls being served per unique name, tasks of the dispatcher, cached uids (tests)."""
        return {"calls": sum(self._per_sender.values()), "senders": len(self._per_sender),
                "tasks": len(self._tasks), "uids_cached": len(self._uids), "reads_cached": len(self._reads)}

    def close(self) -> None:
        """Stop serving: remove the handler, unexport, cancel calls in flight."""
        if self._installed:
            self._bus.remove_message_handler(self._on_message)
            self._installed = False
        for path in list(self._objects):
            self.unexport(path)
        for task in list(self._tasks):
            task.cancel()

    def export(self, path: str, iface: BusObject, *, object_manager: bool = False) -> None:
        """Serve ``iface`` at ``path``; with ``object_manager``, the path also
        implements org.freedesktop.DBus.ObjectManager (no other path does).
        The bus must come from ``bus.service.connect``: dbus-fast's own
        export would also send InterfacesAdded from ``path`` itself."""
        self._bus.export(path, iface)
        self._objects.setdefault(path, {})[iface.name] = (iface, _table(iface))
        if object_manager:
            self._object_managers.add(path)

    def unexport(self, path: str) -> None:
        if self._objects.pop(path, None) is not None:
            self._bus.unexport(path)
            self._object_managers.discard(path)

    # -------------------------------------------------------------- routing
    def _on_message(self, msg: Message) -> bool:
        """Runs on the loop for every message: must not raise or block."""
        if msg.message_type != MessageType.METHOD_CALL or msg.interface == PEER:
            return False  # dbus-fast answers Ping/GetMachineId, on any path
        path = msg.path or "/"
        introspect = (msg.interface in (None, INTROSPECTABLE) and msg.member == "Introspect"
                      and not msg.signature)
        if path not in self._objects:
            if introspect and self._children(path):
                self._answer(msg, Message.new_method_return(msg, "s", [self._introspect(path)]))
            else:
                self._answer(msg, Message.new_error(msg, UNKNOWN_OBJECT, f"no object at {path}"))
            return True
        ifaces = self._objects[path]
        if introspect and msg.interface == INTROSPECTABLE:
            self._answer(msg, Message.new_method_return(msg, "s", [self._introspect(path)]))
            return True
        if msg.interface == OBJECT_MANAGER and path not in self._object_managers:
            managers = ", ".join(sorted(self._object_managers))
            self._answer(msg, Message.new_error(msg, UNKNOWN_INTERFACE, f"{path} is not an ObjectManager "
                                                f"({managers} is)"))
            return True
        if msg.interface == OBJECT_MANAGER and msg.member == "GetManagedObjects" and not msg.signature:
            self._answer(msg, Message.new_method_return(msg, "a{oa{sa{sv}}}", [self._managed_objects(path)]))
            return True
        if msg.interface == PROPERTIES:
            return self._on_set_property(msg, ifaces)
        for name, (obj, table) in ifaces.items():
            if msg.interface in (None, name) and msg.member in table.members:
                m = table.members[msg.member]
                run = functools.partial(self._invoke, obj, m, msg.signature, msg.body)
                self._spawn(msg, m.out_signature, run)
                return True
        if introspect:  # Introspect with no interface named, and no member of ours of that name
            self._answer(msg, Message.new_method_return(msg, "s", [self._introspect(path)]))
            return True
        return False  # not ours: dbus-fast answers (UnknownMethod/UnknownInterface)

    def _answer(self, msg: Message, reply: Message) -> None:
        if not MessageFlag(msg.flags) & MessageFlag.NO_REPLY_EXPECTED:
            self._bus.send(reply)

    def _children(self, path: str) -> list[str]:
        """The next path element of every object below ``path``."""
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix):].split("/")[0] for p in self._objects if p.startswith(prefix)})

    def _introspect(self, path: str) -> str:
        """The node at ``path``: the standard interfaces it really has (no
        ObjectManager unless it is one), its own interfaces, its children."""
        if path in self._objects:
            node = intr.Node.default(path)
            if path not in self._object_managers:
                node.interfaces = [i for i in node.interfaces if i.name != OBJECT_MANAGER]
            node.interfaces += [obj.introspect() for obj, _table in self._objects[path].values()]
        else:
            node = intr.Node(path)
        node.nodes = [intr.Node(child) for child in self._children(path)]
        return str(node.tostring())

    def _managed_objects(self, path: str) -> dict[str, dict[str, dict[str, Variant]]]:
        """Every object below ``path`` with each interface's properties, read
        from the mirror each object keeps (one pass, one dict per interface).
        dbus-fast's own handler asks every property getter through callbacks
        and re-checks the whole reply for completeness after each interface:
        quadratic in the number of VMs."""
        prefix = path.rstrip("/") + "/"
        return {p: {name: obj.variants() for name, (obj, _table) in ifaces.items()}
                for p, ifaces in self._objects.items() if p.startswith(prefix)}

    def _on_set_property(self, msg: Message, ifaces: dict[str, tuple[BusObject, _Table]]) -> bool:
        if msg.member != "Set" or msg.signature != "ssv" or msg.body[0] not in ifaces:
            return False
        obj, table = ifaces[msg.body[0]]
        prop: str = msg.body[1]
        if prop not in table.writable:
            return False  # dbus-fast answers UnknownProperty / PropertyReadOnly
        setter = table.setters.get(prop)
        value: Variant = msg.body[2]

        async def set_() -> None:
            if setter is None:
                self._refuse(f"{obj.name}.{prop}", "has no @setter")
            if value.signature != setter.in_signature:
                raise InvalidArgument(
                    f"property {prop} is of type {setter.in_signature!r}, got {value.signature!r}"
                )
            await self._invoke(obj, setter, value.signature, [value.value])

        self._spawn(msg, "", set_)
        return True

    # -------------------------------------------------------------- serving
    async def _invoke(self, obj: BusObject, m: _Member, signature: str, body: list[Any]) -> Any:
        """Signature, declaration, checks, authorization, call, barrier (module doc)."""
        check_signature(m.name, m.in_signature, signature)
        access = m.access
        if access is None:
            self._refuse(f"{obj.name}.{m.name}", "declares neither an action nor @read_only")
        args = dict(zip(m.params, body, strict=True))
        for name in m.params:
            if name in access.checks:
                args[name] = access.checks[name](args[name])
        if access.action is None:
            return await self._read(obj, m, list(args.values()))
        subject, facts = await self._subject(obj, access, args)
        details = {"verb": access.verb, **{d: str(args[d]) for d in access.details}}
        if subject.vm is not None:
            details["vm"] = subject.vm
        call = current_call()
        caller = CALLER.get()  # its uid is known already (_uid_of): no second round trip to the bus
        await self._context.authorizer.authorize(
            call.sender, access.action, details, call.interactive, owner=subject.owner,
            uid=caller.uid if caller is not None else None, vm=facts,
        )
        async with self._context.settled(subject.path):
            return await m.fn(obj, *args.values())

    async def _subject(self, obj: BusObject, access: Access,
                       args: dict[str, Any]) -> tuple[Subject, VmDetails | None]:
        """What the call is about and, if a VM, its figures for polkit: one
        lookup of the VM, off the loop (WithVmDetails asks for none of its own)."""
        if access.vm is not None:
            name: str = args[access.vm]
            facts = await asyncio.to_thread(self._facts, name)  # NoSuchVM before polkit
            return Subject(name, facts.owner, vm_path(name)), facts
        if access.new_vm is not None:
            name = args[access.new_vm]
            return Subject(name, None, vm_path(name)), None
        subject = obj.subject()
        if subject.target is None:
            return subject, None
        return subject, await asyncio.to_thread(VmDetails.of, subject.target)

    def _facts(self, name: str) -> VmDetails:
        return VmDetails.of(self._context.manager.get_vm(name))

    def _refuse(self, what: str, why: str) -> NoReturn:
        call = current_call()
        log.error("refused %s from %s: it %s (default deny)", what, call.sender, why)
        raise AccessDenied(f"{what} {why}: refused")

    def _spawn(self, msg: Message, out_sig: str, run: Callable[[], Awaitable[Any]]) -> None:
        sender = msg.sender or ""
        if self._per_sender.get(sender, 0) >= PER_SENDER:
            # Refused here, synchronously: no task, no thread, the body dropped at once.
            self._answer(msg, Message.new_error(
                msg, LIMIT_REACHED, f"{sender} has {PER_SENDER} calls in flight already; try again later"))
            return
        known = self._uids.get(sender)
        if known is not None and known.done() and not known.cancelled() and known.exception() is None:
            uid = known.result()
            if uid != 0 and not self._take_token(uid):
                self._answer(msg, Message.new_error(
                    msg, LIMIT_REACHED, f"uid {uid} makes more than {RATE:.0f} calls/s; try again later"))
                return
        self._per_sender[sender] = self._per_sender.get(sender, 0) + 1
        task = asyncio.get_running_loop().create_task(self._serve(msg, out_sig, run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, msg: Message, out_sig: str, run: Callable[[], Awaitable[Any]]) -> None:
        flags = MessageFlag(msg.flags)
        call = Call(
            sender=msg.sender or "",
            interactive=bool(flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION),
            member=f"{msg.interface or ''}.{msg.member}",
        )
        _CURRENT.set(call)  # this task's own context: no reset needed
        uid: int | None = None
        try:
            try:
                uid = await self._uid_of(call.sender)
            except Exception as e:  # the caller left before we knew it: nobody to answer
                log.debug("%s from %s: uid unknown (%s), not served", call.member, call.sender, e)
                return
            reply = await self._serve_as(msg, out_sig, run, call, uid)
        finally:
            self._release(call.sender, uid)
        if not flags & MessageFlag.NO_REPLY_EXPECTED:
            self._bus.send(reply)

    async def _serve_as(self, msg: Message, out_sig: str, run: Callable[[], Awaitable[Any]],
                        call: Call, uid: int) -> Message:
        if uid != 0 and self._per_uid.get(uid, 0) >= PER_UID:
            return Message.new_error(msg, LIMIT_REACHED,
                                     f"uid {uid} has {PER_UID} calls in flight already; try again later")
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        CALLER.set(Caller(uid, call.sender))  # whose work the pool runs (kvmnumad.workers)
        try:
            result = await run()
            return Message.new_method_return(msg, out_sig, _reply_body(out_sig, result))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            err = to_dbus_error(e, f"{call.member} from {call.sender}")
            return Message.new_error(msg, err.type, err.text)

    def _take_token(self, uid: int) -> bool:
        """One call of ``uid``'s budget (RATE per second, BURST at most), if any is left."""
        now = time.monotonic()
        tokens, when = self._buckets.get(uid, (BURST, now))
        tokens = min(BURST, tokens + (now - when) * RATE)
        if tokens < 1:
            self._buckets[uid] = (tokens, now)
            return False
        self._buckets[uid] = (tokens - 1, now)
        if len(self._buckets) > 1024:  # forget the uids whose bucket is full again
            for k, (t, w) in list(self._buckets.items()):
                if t + (now - w) * RATE >= BURST:
                    del self._buckets[k]
        return True

    def _release(self, sender: str, uid: int | None) -> None:
        left = self._per_sender.get(sender, 0) - 1
        if left > 0:
            self._per_sender[sender] = left
        else:
            self._per_sender.pop(sender, None)
        if uid is not None and uid in self._per_uid:
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]

    async def _uid_of(self, sender: str) -> int:
        """The uid of a unique name, asked of the bus once (a name's uid never
        changes and names are never reused); concurrent calls share the ask."""
        task = self._uids.get(sender)
        if task is None:
            task = asyncio.ensure_future(self._context.authorizer.caller_uid(sender))
            self._uids[sender] = task
            while len(self._uids) > UID_CACHE:
                self._uids.popitem(last=False)
        else:
            self._uids.move_to_end(sender)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._uids.get(sender) is task:
                del self._uids[sender]
            raise

    async def _read(self, obj: BusObject, m: _Member, args: list[Any]) -> Any:
        """A read-only member's result; costly ones shared with non-root callers (module doc)."""
        call = CALLER.get()
        if call is not None and call.uid == 0:
            return await m.fn(obj, *args)
        key = (id(obj), m.name, repr(args))
        now = time.monotonic()
        cached = self._reads.get(key)
        if cached is not None and cached[2] is obj and now < cached[0]:
            return cached[1]
        running = self._reading.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._reading[key] = future
        try:
            result = await m.fn(obj, *args)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning without sharers
            raise
        finally:
            del self._reading[key]
        future.set_result(result)
        took = time.monotonic() - now
        if took >= COSTLY_READ:
            end = time.monotonic()
            for k in [k for k, v in self._reads.items() if v[0] <= end]:
                del self._reads[k]
            self._reads[key] = (end + 9 * took, result, obj)
            while len(self._reads) > READ_CACHE:
                self._reads.popitem(last=False)
        return result


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
