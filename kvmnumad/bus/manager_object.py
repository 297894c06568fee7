# D-Bus signatures are string annotations, as dbus-fast reads them; the type
# checkers see names, not types, in them:
# mypy: disable-error-code="name-defined,valid-type"
# ruff: noqa: F821, F722
"""``/org/kvmnuma1``: interface org.kvmnuma1.Manager.

VM-level verbs (DestroyVM) forward to the VM object's implementation, as
systemd-machined does; properties are the service's mirror, like the VM
objects'.  org.freedesktop.DBus.ObjectManager on this path
is dbus-fast's GetManagedObjects plus the InterfacesAdded/Removed signals
that BusService emits from here.
"""

import asyncio
from typing import TYPE_CHECKING, Any

from dbus_fast import PropertyAccess
from dbus_fast.service import dbus_property, method, signal

from kvmnumad.bus.args import check_name, parse_options, parse_policy
from kvmnumad.bus.auth import ACTION_MANAGE, ACTION_PLACE
from kvmnumad.bus.dispatch import BusObject, current_call
from kvmnumad.bus.paths import MANAGER_INTERFACE, MANAGER_PATH, vm_path
from kvmnumad.manager import Manager

if TYPE_CHECKING:
    from kvmnumad.bus.service import BusService

def topology_rows(manager: Manager) -> list[list[Any]]:
    """GetTopology's a(uauttau): id, CPUs (online), total, free, distance to
    every node in id order."""
    topo = manager.topology()
    ids = topo.node_ids()
    return [
        [n.id, sorted(n.online_cpus), n.mem_total, n.mem_free, [n.distances.get(o, 255) for o in ids]]
        for n in (topo.nodes[i] for i in ids)
    ]


class ManagerObject(BusObject):
    writable = {"DefaultPolicy": "s"}

    def __init__(self, service: "BusService", props: dict[str, Any]) -> None:
        super().__init__(MANAGER_INTERFACE, props)
        self._service = service

    async def set_property(self, name: str, value: Any) -> None:
        # Only DefaultPolicy is writable (see ``writable``).
        policy = parse_policy(value)
        call = current_call()
        await self._service.authorizer.authorize(
            call.sender, ACTION_PLACE, {"verb": "set-default-policy", "policy": str(policy)}, call.interactive
        )
        async with self._service.settled(MANAGER_PATH):
            await asyncio.to_thread(self._service.manager.set_default_policy, policy)

    # ------------------------------------------------------------- methods
    @method()
    async def CreateVM(self, name: "s", vcpus: "u", memory_bytes: "t", options: "a{sv}") -> "o":
        check_name(name)
        opts = parse_options(options)
        call = current_call()
        auth = self._service.authorizer
        await auth.authorize(call.sender, ACTION_MANAGE, {"vm": name, "verb": "create"}, call.interactive)
        owner = await auth.caller_uid(call.sender)
        manager = self._service.manager
        async with self._service.settled(vm_path(name)):
            await asyncio.to_thread(manager.create_vm, name, vcpus, memory_bytes, opts, owner)
        return vm_path(name)

    @method()
    async def DestroyVM(self, name: "s") -> None:
        await (await self._service.vm_object(check_name(name))).destroy()

    @method()
    async def GetVM(self, name: "s") -> "o":
        return (await self._service.vm_object(check_name(name))).path

    @method()
    async def ListVMs(self) -> "a(sso)":
        def rows() -> list[list[str]]:
            return [[vm.name, str(vm.state), vm_path(vm.name)] for vm in self._service.manager.list_vms()]

        return await asyncio.to_thread(rows)

    @method()
    async def GetTopology(self) -> "a(uauttau)":
        return await asyncio.to_thread(topology_rows, self._service.manager)

    @method()
    async def GetReport(self) -> "s":
        return await asyncio.to_thread(self._service.manager.report)

    @method()
    async def GetSuggestions(self) -> "a(sss)":
        items = await asyncio.to_thread(self._service.manager.suggestions)
        return [list(i) for i in items]

    @method()
    async def PlanVM(self, vcpus: "u", memory_bytes: "t", options: "a{sv}") -> "s":
        opts = parse_options(options)
        return await asyncio.to_thread(self._service.manager.plan_vm, vcpus, memory_bytes, opts)

    # ---------------------------------------------------------- properties
    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return self._props["Version"]

    @dbus_property(access=PropertyAccess.READ)
    def HostNodes(self) -> "au":
        return self._props["HostNodes"]

    @dbus_property(access=PropertyAccess.READ)
    def OnlineCPUs(self) -> "au":
        return self._props["OnlineCPUs"]

    @dbus_property()
    def DefaultPolicy(self) -> "s":
        return self._props["DefaultPolicy"]

    @DefaultPolicy.setter  # type: ignore[no-redef]
    def DefaultPolicy(self, value: "s") -> None:
        # Never reached from the bus: the Dispatcher routes Set to
        # set_property (authorized, off the loop).  dbus-fast wants a setter.
        raise RuntimeError("DefaultPolicy is set through BusObject.set_property")  # pragma: no cover

    @dbus_property(access=PropertyAccess.READ)
    def MaxVcpus(self) -> "u":
        return self._props["MaxVcpus"]

    # ------------------------------------------------------------- signals
    @signal()
    def TopologyChanged(self, online_cpus: list[int]) -> "au":
        return online_cpus

    @signal()
    def VcpuRepinned(self, vm: str, vcpu: int, cpus: list[int], reason: str) -> "suaus":
        return [vm, vcpu, cpus, reason]
