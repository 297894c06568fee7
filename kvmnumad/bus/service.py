"""The org.kvmnuma1 service: exports, name ownership and core events.

The bus objects mirror the core.  Every core event becomes, in the order the
core emitted it, at most one PropertiesChanged (or signal, or
InterfacesAdded/Removed) carrying only what changed (bus/pump.py,
bus/properties.py).  ``reconcile(name)`` makes the exported VM object match
what the Manager has *now* (export, re-export after a destroy-and-recreate,
unexport); events and GetVM, arriving in any order, converge on it.
BusService is the BusContext of the objects and the Dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from dbus_fast import BusType, Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus

from kvmnumad.bus.auth import Authorizer, WithVmDetails
from kvmnumad.bus.dispatch import Dispatcher
from kvmnumad.bus.errors import DBUS_NAMES
from kvmnumad.bus.fds import take_fds
from kvmnumad.bus.framing import LARGEST_CALL, BoundedSocket, RefusalLog, Refused
from kvmnumad.bus.job_object import JobObject, job_props
from kvmnumad.bus.manager_object import ManagerObject
from kvmnumad.bus.paths import (
    BUS_NAME,
    JOB_INTERFACE,
    MANAGER_PATH,
    OBJECT_MANAGER,
    VM_INTERFACE,
    job_path,
    vm_path,
)
from kvmnumad.bus.properties import (
    TOPOLOGY_PROPERTIES,
    TOPOLOGY_VM_PROPERTIES,
    manager_snapshot,
    sampled_manager_values,
    sampled_vm_values,
    touched,
    vm_snapshot,
)
from kvmnumad.bus.pump import EventPump
from kvmnumad.bus.vm_object import VmObject
from kvmnumad.errors import Busy, LimitReached, NoSuchVM
from kvmnumad.events import (
    DefaultPolicyChanged,
    Event,
    JobAdded,
    JobChanged,
    JobRemoved,
    Rebalanced,
    TopologyChanged,
    VcpuRepinned,
    VmAdded,
    VmChanged,
    VmRemoved,
)
from kvmnumad.manager import Manager
from kvmnumad.optimizer.model import Sample
from kvmnumad.vm import Vm

log = logging.getLogger(__name__)

__all__ = ["BUS_NAME", "BusService", "NameUnavailable", "ServiceBus", "connect", "start_service"]


class NameUnavailable(RuntimeError):
    """org.kvmnuma1 is owned by another connection, or the bus policy forbids us."""


def _path_of(event: Event) -> str:
    if isinstance(event, (VmAdded, VmRemoved, VmChanged, VcpuRepinned, Rebalanced)):
        return vm_path(event.vm)
    if isinstance(event, (JobAdded, JobChanged, JobRemoved)):
        return job_path(event.status.id)
    return MANAGER_PATH


class PatientSocket:
    """The writer's socket, with a full send buffer meaning "wait", not "the bus is gone".

    dbus-fast's writer (1.84 and 5.x alike) calls ``send`` on the
    non-blocking socket and treats any exception as the end of the
    connection: when dbus-daemon falls behind reading from us (a client
    flooding calls and not reading their replies, on a loaded host) a send
    that can write nothing raises BlockingIOError, the bus finalizes, and
    the daemon exits as if its bus had died (tests/test_client_faults.py).
    Returning 0 instead makes the writer do what it does for a short write:
    keep the rest and wait for the socket to become writable.  ``sendmsg``
    (fds) is left alone: the writer drops the fds after one call whatever it
    returns, and this service sends no fds.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return int(self._sock.send(data))
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class ServiceBus(MessageBus):
    """dbus-fast's MessageBus without the InterfacesAdded/Removed that its
    export() and unexport() send from the exported object's own path.

    Those announce every VM a second time, from a path that is no
    ObjectManager (issue 11: ``kvmnumactl monitor`` printed each twice);
    BusService sends the one the spec wants, from /org/kvmnuma1.  dbus-fast
    has no option for this, in 5.x or in Debian's 1.84, and both call these
    two Python-level methods from export/unexport, so overriding them here
    is all it takes (test_bus_objects counts the signals on the bus).
    """

    def _emit_interface_added(self, path: str, interface: Any) -> None:
        pass

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        pass

    async def _authenticate(self) -> None:
        """The handshake, then the read side framed by BoundedSocket: both
        dbus-fast versions build their reader on ``self._sock`` right after
        this returns (bus/framing.py), so no message is read unframed."""
        await super()._authenticate()
        self._refusal_log = RefusalLog()
        assert self._sock is not None
        self.framing = BoundedSocket(self._sock, self._refused)
        self._sock = self.framing  # type: ignore[assignment]  # a socket to the reader (framing.py)
        writer = getattr(self, "_writer", None)
        if writer is not None and not isinstance(writer.sock, PatientSocket):
            writer.sock = PatientSocket(writer.sock)

    def _refused(self, refused: Refused) -> None:
        """A message over framing's bound was skipped unread: a call is answered LimitReached."""
        self._refusal_log(refused, "over the size bound" + (", answered LimitReached" if refused.wants_reply
                                                           else ", dropped"))
        if refused.wants_reply:
            self.send(Message(
                message_type=MessageType.ERROR, destination=refused.fields["sender"],
                reply_serial=refused.serial, error_name=DBUS_NAMES[LimitReached], signature="s",
                body=[f"a message body of {refused.body_length} bytes is over this service's bound of "
                      f"{self.framing.max_body} bytes (its largest call, a CPU list naming every CPU, "
                      f"takes {LARGEST_CALL}): not read"]))


class BusService:
    """What start_service() returns; ``await stop()`` undoes it."""

    def __init__(self, manager: Manager, bus: MessageBus, authorizer: Authorizer) -> None:
        self.manager = manager
        self.bus = bus
        # polkit rules see each VM's owner, vCPUs and memory (bus/auth.py)
        self.authorizer: Authorizer = WithVmDetails(authorizer)
        self.dispatcher = Dispatcher(bus, self)
        self.manager_object: ManagerObject | None = None
        self._vms: dict[str, VmObject] = {}
        self._jobs: dict[int, JobObject] = {}
        self._reconcile_lock = asyncio.Lock()
        self._pump = EventPump(self._handle, _path_of)
        self._stopped = False
        self.owns_name = False
        # Set by the daemon: what Manager.Reexec() asks for (None: not offered).
        self.on_reexec: Callable[[], None] | None = None

    # ------------------------------------------------------------ lifecycle
    async def _start(self) -> None:
        props = await asyncio.to_thread(manager_snapshot, self.manager)
        self.manager_object = ManagerObject(self, props)
        self.dispatcher.export(MANAGER_PATH, self.manager_object, object_manager=True)
        # Ahead of the Dispatcher: every fd a message carries is owned (or closed) first.
        self.bus.add_message_handler(take_fds)
        self.dispatcher.install()
        # Subscribe before listing, so no VM falls between the two.
        self.manager.subscribe(self._pump.submit)
        self.manager.executor = self.dispatcher.pool  # migration jobs' chunks run in the bounded pool
        self._pump.start()
        for vm in await asyncio.to_thread(self.manager.list_vms):
            try:
                await self.reconcile(vm.name)
            except Exception as e:  # one VM that cannot be read must not keep the others off the bus
                log.error("exporting VM %s failed (GetVM tries again)", vm.name, exc_info=e)
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
        self.manager.unsubscribe(self._pump.submit)
        self._pump.close()
        if self.owns_name and self.bus.connected:
            try:
                await self.bus.release_name(BUS_NAME)
            except Exception as e:
                log.warning("releasing %s failed: %s", BUS_NAME, e)
            self.owns_name = False
        self.dispatcher.close()
        self.bus.remove_message_handler(take_fds)
        self._vms.clear()
        self._jobs.clear()

    # ------------------------------------------------- BusContext of objects
    def request_reexec(self) -> None:
        if self.on_reexec is None:
            raise Busy("this daemon cannot re-execute itself (started without its main loop)")
        self.on_reexec()

    async def exported_path(self, name: str) -> str:
        if await self.reconcile(name) is None:
            raise NoSuchVM(f"no VM named {name!r}")
        return vm_path(name)

    def settled(self, path: str) -> AbstractAsyncContextManager[None]:
        return self._pump.settled(path)

    # ---------------------------------------------------------- VM objects
    async def reconcile(self, name: str, touched_props: frozenset[str] = frozenset()) -> VmObject | None:
        """Make the exported object of ``name`` match the core's VM; of an
        object that stays, publish ``touched_props`` (re-read, diffed).
        NoSuchVM from a VM destroyed meanwhile means None; other failures
        raise, for the caller (or the event pump) to report."""
        async with self._reconcile_lock:
            obj = self._vms.get(name)
            if obj is not None and touched_props:
                try:
                    obj.publish(await asyncio.to_thread(vm_snapshot, self.manager, obj.vm, touched_props))
                    return obj
                except NoSuchVM:
                    pass  # destroyed or made anew: exported afresh, or not at all, below
            current = obj.vm if obj is not None else None
            try:
                vm, props = await asyncio.to_thread(self._lookup, name, current)
            except NoSuchVM:
                vm, props = None, {}
            if obj is not None and obj.vm is not vm:
                self._drop(obj)
                obj = None
            if vm is None or self._stopped:
                return None
            if obj is None:
                obj = VmObject(self, vm, props)
                self.dispatcher.export(obj.path, obj)
                self._vms[name] = obj
                added = [obj.path, {VM_INTERFACE: obj.variants()}]
                self._object_manager_signal("InterfacesAdded", "oa{sa{sv}}", added)
            return obj

    def _lookup(self, name: str, exported: Vm | None) -> tuple[Vm, dict[str, Any]]:
        """The Manager's VM of that name and, unless it is ``exported``
        already, all its properties.  Blocking."""
        vm = self.manager.get_vm(name)
        return vm, ({} if vm is exported else vm_snapshot(self.manager, vm))

    def _drop(self, obj: VmObject) -> None:
        self._vms.pop(obj.vm_name, None)
        self.dispatcher.unexport(obj.path)
        self._object_manager_signal("InterfacesRemoved", "oas", [obj.path, [VM_INTERFACE]])

    def _object_manager_signal(self, member: str, signature: str, body: list[Any]) -> None:
        # From the manager's path, as the ObjectManager spec wants, and from
        # nowhere else: ServiceBus keeps dbus-fast's export from sending its own.
        self.bus.send(Message.new_signal(MANAGER_PATH, OBJECT_MANAGER, member, signature, body))

    # --------------------------------------------------------------- events
    async def _handle(self, event: Event) -> None:
        """What one core event means on the bus (bus/properties.py says which properties)."""
        mo = self.manager_object
        assert mo is not None
        if isinstance(event, (VmAdded, VmRemoved)):
            await self.reconcile(event.vm)
        elif isinstance(event, VmChanged):
            await self.reconcile(event.vm, touched(event.aspects))
        elif isinstance(event, VcpuRepinned):
            # Its properties came with the VmChanged the re-pin emitted first.
            mo.VcpuRepinned(event.vm, event.vcpu, sorted(event.new), event.reason)
        elif isinstance(event, TopologyChanged):
            mo.TopologyChanged(sorted(event.online_cpus))
            mo.publish(await asyncio.to_thread(manager_snapshot, self.manager, TOPOLOGY_PROPERTIES))
            for name in list(self._vms):
                await self.reconcile(name, TOPOLOGY_VM_PROPERTIES)
        elif isinstance(event, DefaultPolicyChanged):
            mo.publish({"DefaultPolicy": str(event.policy)})
        elif isinstance(event, (JobAdded, JobChanged, JobRemoved)):
            self._job_event(mo, event)
        elif isinstance(event, Rebalanced):
            # Its properties came with the VmChanged the move emitted first.
            mo.Moved(event.vm, event.kind, event.guest_node, event.from_node, event.to_node, event.gain,
                     event.reason, job_path(event.job) if event.job is not None else "/")

    def _job_event(self, mo: ManagerObject, event: JobAdded | JobChanged | JobRemoved) -> None:
        """A job object exists from JobAdded to JobRemoved, like systemd's: JobNew
        after its InterfacesAdded, JobRemoved (with the outcome) before its InterfacesRemoved."""
        s = event.status
        obj = self._jobs.get(s.id)
        if isinstance(event, JobAdded):
            if obj is None and not self._stopped:
                obj = JobObject(self, s)
                self.dispatcher.export(obj.path, obj)
                self._jobs[s.id] = obj
                self._object_manager_signal("InterfacesAdded", "oa{sa{sv}}",
                                            [obj.path, {JOB_INTERFACE: obj.variants()}])
                mo.JobNew(s.id, obj.path, vm_path(s.vm))
            return
        if obj is None:
            return
        obj.publish(job_props(s))
        if isinstance(event, JobRemoved):
            mo.JobRemoved(s.id, obj.path, vm_path(s.vm), str(s.state))
            self._jobs.pop(s.id, None)
            self.dispatcher.unexport(obj.path)
            self._object_manager_signal("InterfacesRemoved", "oas", [obj.path, [JOB_INTERFACE]])


    # ------------------------------------------------------------- samples
    def publish_sample(self, sample: Sample) -> None:
        """On the loop, once per sampling period (optimizer/timer.py): each
        object's sampled properties, one PropertiesChanged with those that differ."""
        if self._stopped or self.manager_object is None:
            return
        self.manager_object.publish(sampled_manager_values(sample.nodes))
        for name, obj in list(self._vms.items()):
            measured = sample.vms.get(name)
            if measured is not None:
                obj.publish(sampled_vm_values(measured))


async def start_service(manager: Manager, bus: MessageBus, authorizer: Authorizer) -> BusService:
    """Export the Manager and every VM, follow the core's events, then own
    org.kvmnuma1 (DO_NOT_QUEUE): raises NameUnavailable if someone else has it,
    leaving nothing exported."""
    if not isinstance(bus, ServiceBus):
        raise TypeError("start_service needs a bus from connect() (a ServiceBus)")
    service = BusService(manager, bus, authorizer)
    try:
        await service._start()
    except BaseException:
        await service.stop()
        raise
    return service


async def connect(bus_spec: str) -> MessageBus:
    """``system``, ``session`` or a D-Bus address (``unix:path=...``).
    Unix fd passing is negotiated: CreateVM's payload comes as an fd the
    caller opened (bus/fds.py owns every fd received)."""
    if bus_spec == "system":
        bus = ServiceBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
    elif bus_spec == "session":
        bus = ServiceBus(bus_type=BusType.SESSION, negotiate_unix_fd=True)
    else:
        bus = ServiceBus(bus_address=bus_spec, negotiate_unix_fd=True)
    return await bus.connect()
