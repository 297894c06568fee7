"""The org.kvmnuma1 service: exports, name ownership and core events.

The bus objects mirror the core: ``reconcile(name)`` makes the exported VM
object match what the Manager has *now* (export, re-export after a
destroy-and-recreate, unexport), so method replies and core events, which
arrive in any order and from any thread, converge on the same state.  Core
events are marshalled onto the loop and handled one at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from dbus_fast import BusType, Message, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus

from kvmnumad.bus.auth import Authorizer
from kvmnumad.bus.dispatch import Dispatcher
from kvmnumad.bus.manager_object import ManagerObject
from kvmnumad.bus.manager_object import snapshot as manager_snapshot
from kvmnumad.bus.paths import (
    BUS_NAME,
    MANAGER_PATH,
    OBJECT_MANAGER,
    VM_INTERFACE,
    VM_PATH_PREFIX,
    unescape_label,
)
from kvmnumad.bus.vm_object import VmObject, snapshot
from kvmnumad.errors import NoSuchVM
from kvmnumad.events import (
    DefaultPolicyChanged,
    Event,
    TopologyChanged,
    VcpuRepinned,
    VmAdded,
    VmChanged,
    VmRemoved,
)
from kvmnumad.manager import Manager
from kvmnumad.vm import Vm

log = logging.getLogger(__name__)

__all__ = ["BUS_NAME", "BusService", "NameUnavailable", "connect", "start_service"]


class NameUnavailable(RuntimeError):
    """org.kvmnuma1 is owned by another connection, or the bus policy forbids us."""


class BusService:
    """What start_service() returns; ``await stop()`` undoes it."""

    def __init__(self, manager: Manager, bus: MessageBus, authorizer: Authorizer) -> None:
        self.manager = manager
        self.bus = bus
        self.authorizer = authorizer
        self.dispatcher = Dispatcher(bus)
        self.manager_object: ManagerObject | None = None
        self._vms: dict[str, VmObject] = {}
        self._reconcile_lock = asyncio.Lock()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._pump: asyncio.Task[None] | None = None
        self._stopped = False
        self.owns_name = False

    # ------------------------------------------------------------ lifecycle
    async def _start(self) -> None:
        props = await asyncio.to_thread(manager_snapshot, self.manager)
        self.manager_object = ManagerObject(self, props)
        self.dispatcher.export(MANAGER_PATH, self.manager_object)
        self.dispatcher.add_fallback(VM_PATH_PREFIX, VmObject.template(), _no_such_vm)
        self.dispatcher.install()
        # Subscribe before listing, so no VM falls between the two.
        self.manager.subscribe(self._on_core_event)
        self._pump = self._loop.create_task(self._pump_events())
        for vm in await asyncio.to_thread(self.manager.list_vms):
            await self.reconcile(vm.name)
        try:
            reply = await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except Exception as e:  # AccessDenied from the bus policy
            raise NameUnavailable(f"cannot own {BUS_NAME}: {e}") from e
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise NameUnavailable(f"{BUS_NAME} is already owned by another connection ({reply.name})")
        self.owns_name = True

    async def stop(self) -> None:
        """Release the name first (no new callers), then unexport everything."""
        if self._stopped:
            return
        self._stopped = True
        if self._pump is not None:
            self._pump.cancel()
        if self.owns_name and self.bus.connected:
            try:
                await self.bus.release_name(BUS_NAME)
            except Exception as e:
                log.warning("releasing %s failed: %s", BUS_NAME, e)
            self.owns_name = False
        self.dispatcher.close()
        self._vms.clear()

    # ---------------------------------------------------------- VM objects
    async def vm_object(self, name: str) -> VmObject:
        obj = await self.reconcile(name)
        if obj is None:
            raise NoSuchVM(f"no VM named {name!r}")
        return obj

    async def reconcile(self, name: str, refresh: bool = False) -> VmObject | None:
        """Make the exported object of ``name`` match the core's VM."""
        async with self._reconcile_lock:
            vm = await asyncio.to_thread(self._lookup, name)
            obj = self._vms.get(name)
            if obj is not None and obj.vm is not vm:
                self._drop(obj)
                obj = None
            if vm is None or self._stopped:
                return None
            if obj is None:
                try:
                    props = await asyncio.to_thread(snapshot, vm)
                except Exception as e:  # destroyed between lookup and snapshot
                    log.debug("VM %s vanished while being exported: %s", name, e)
                    return None
                obj = VmObject(self, vm, props)
                self.dispatcher.export(obj.path, obj)
                self._vms[name] = obj
                added = [obj.path, {VM_INTERFACE: obj.variants()}]
                self._object_manager_signal("InterfacesAdded", "oa{sa{sv}}", added)
            elif refresh:
                await obj.refresh()
            return obj

    def _lookup(self, name: str) -> Vm | None:
        try:
            return self.manager.get_vm(name)
        except NoSuchVM:
            return None

    def _drop(self, obj: VmObject) -> None:
        self._vms.pop(obj.vm_name, None)
        self.dispatcher.unexport(obj.path)
        self._object_manager_signal("InterfacesRemoved", "oas", [obj.path, [VM_INTERFACE]])

    def _object_manager_signal(self, member: str, signature: str, body: list[Any]) -> None:
        # From the manager's path, as the ObjectManager spec wants.  (dbus-fast
        # also sends one from the object's own path on export; clients that
        # follow the spec ignore that one.)
        self.bus.send(Message.new_signal(MANAGER_PATH, OBJECT_MANAGER, member, signature, body))

    # --------------------------------------------------------------- events
    def _on_core_event(self, event: Event) -> None:
        """Called by the core on any thread: hand over to the loop, nothing more."""
        if self._stopped:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the service is gone
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def _pump_events(self) -> None:
        while True:
            event = await self._events.get()
            try:
                await self._handle(event)
            except Exception:
                log.exception("publishing core event %s failed", event)

    async def _handle(self, event: Event) -> None:
        mo = self.manager_object
        assert mo is not None
        if isinstance(event, (VmAdded, VmRemoved)):
            await self.reconcile(event.vm)
        elif isinstance(event, VmChanged):
            await self.reconcile(event.vm, refresh=True)
        elif isinstance(event, VcpuRepinned):
            mo.VcpuRepinned(event.vm, event.vcpu, sorted(event.new), event.reason)
            await self.reconcile(event.vm, refresh=True)
        elif isinstance(event, TopologyChanged):
            mo.TopologyChanged(sorted(event.online_cpus))
            await mo.refresh()
        elif isinstance(event, DefaultPolicyChanged):
            await mo.refresh()


def _no_such_vm(element: str) -> Exception:
    return NoSuchVM(f"no VM named {unescape_label(element)!r}")


async def start_service(manager: Manager, bus: MessageBus, authorizer: Authorizer) -> BusService:
    """Export the Manager and every VM, follow the core's events, then own
    org.kvmnuma1 (DO_NOT_QUEUE): raises NameUnavailable if someone else has it,
    leaving nothing exported."""
    service = BusService(manager, bus, authorizer)
    try:
        await service._start()
    except BaseException:
        await service.stop()
        raise
    return service


async def connect(bus_spec: str) -> MessageBus:
    """``system``, ``session`` or a D-Bus address (``unix:path=...``)."""
    if bus_spec == "system":
        bus = MessageBus(bus_type=BusType.SYSTEM)
    elif bus_spec == "session":
        bus = MessageBus(bus_type=BusType.SESSION)
    else:
        bus = MessageBus(bus_address=bus_spec)
    return await bus.connect()
