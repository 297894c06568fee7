# D-Bus signatures are string annotations, as dbus-fast reads them; the type
# checkers see names, not types, in them:
# mypy: disable-error-code="name-defined,valid-type"
# ruff: noqa: F821, F722
"""``/org/kvmnuma1/vm/<escaped name>``: interface org.kvmnuma1.VM.

Property values are the service's mirror of the VM (bus/properties.py),
updated from the core's events only; a mutating method replies once the
events of its change are published.
"""

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dbus_fast import PropertyAccess, Variant
from dbus_fast.service import dbus_property, method

from kvmnumad.bus.args import check_cpus
from kvmnumad.bus.auth import ACTION_MANAGE, ACTION_MIGRATE, ACTION_PLACE
from kvmnumad.bus.dispatch import BusObject, current_call
from kvmnumad.bus.paths import VM_INTERFACE, vm_path
from kvmnumad.model import VmStats
from kvmnumad.vm import Vm

if TYPE_CHECKING:
    from kvmnumad.bus.service import BusService

def stats_dict(s: VmStats) -> dict[str, Variant]:
    """GetStats as flat maps keyed by vCPU or node, so busctl and jq read it
    without knowing a struct layout."""
    return {
        "exits": Variant("a{st}", dict(s.exits)),
        "vcpu_tid": Variant("a{uu}", {v.vcpu: v.tid for v in s.vcpus}),
        "vcpu_cpu_time_ns": Variant("a{ut}", {v.vcpu: v.cpu_time_ns for v in s.vcpus}),
        "vcpu_current_cpu": Variant("a{ui}", {v.vcpu: v.current_cpu for v in s.vcpus}),
        "vcpu_exits": Variant("a{ua{st}}", {v.vcpu: dict(v.exits) for v in s.vcpus}),
        "vcpu_progress": Variant("a{ut}", {v.vcpu: v.progress for v in s.vcpus}),
        "pages_per_host_node": Variant("a{ut}", dict(s.pages_per_host_node)),
        "dirty_pages": Variant("t", s.dirty_pages),
    }


class VmObject(BusObject):
    def __init__(self, service: "BusService", vm: Vm, props: dict[str, Any]) -> None:
        super().__init__(VM_INTERFACE, props)
        self.vm = vm
        self.vm_name = vm.name  # (self.name is the interface name, ServiceInterface's)
        self.path = vm_path(vm.name)
        self._service = service

    @classmethod
    def template(cls) -> "VmObject":
        """An instance for its members only (never exported, never called)."""
        obj = cls.__new__(cls)
        BusObject.__init__(obj, VM_INTERFACE, {})
        return obj

    # ------------------------------------------------------------ plumbing
    async def _authorize(self, action: str, verb: str, **details: str) -> None:
        call = current_call()
        details = {"vm": self.vm_name, "verb": verb, **details}
        await self._service.authorizer.authorize(
            call.sender, action, details, call.interactive, owner=self.vm.owner
        )

    async def _act(self, action: str, verb: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Authorize, run the core call off the loop; return once the core's
        events about it are published (so the reply follows them)."""
        await self._authorize(action, verb)
        async with self._service.settled(self.path):
            return await asyncio.to_thread(fn, *args)

    async def destroy(self) -> None:
        """The one implementation behind VM.Destroy and Manager.DestroyVM."""
        await self._act(ACTION_MANAGE, "destroy", self._service.manager.destroy_vm, self.vm_name)

    # ------------------------------------------------------------- methods
    @method()
    async def Start(self) -> None:
        await self._act(ACTION_MANAGE, "start", self.vm.start)

    @method()
    async def Stop(self) -> None:
        await self._act(ACTION_MANAGE, "stop", self.vm.stop)

    @method()
    async def Destroy(self) -> None:
        await self.destroy()

    @method()
    async def EnableNuma(self, nodes: "u") -> None:
        await self._act(ACTION_PLACE, "enable-numa", self.vm.enable_numa, nodes)

    @method()
    async def DisableNuma(self) -> None:
        await self._act(ACTION_PLACE, "disable-numa", self.vm.disable_numa)

    @method()
    async def SetupNumaMemory(self, node: "u", size: "t", gpa: "t") -> "u":
        setup = self.vm.setup_numa_memory
        slot: int = await self._act(ACTION_PLACE, "setup-numa-memory", setup, node, size, gpa)
        return slot

    @method()
    async def SetVcpuAffinity(self, vcpu: "u", cpus: "au") -> None:
        cpus = check_cpus(cpus)
        await self._act(ACTION_PLACE, "set-vcpu-affinity", self.vm.set_vcpu_affinity, vcpu, cpus)

    @method()
    async def GetVcpuAffinity(self, vcpu: "u") -> "au":
        cpus = await asyncio.to_thread(self.vm.get_vcpu_affinity, vcpu)
        return list(cpus)

    @method()
    async def BindVcpuToNumaNode(self, vcpu: "u", node: "u") -> None:
        await self._act(ACTION_PLACE, "bind-vcpu", self.vm.bind_vcpu_to_numa_node, vcpu, node)

    @method()
    async def GetVcpuNumaNode(self, vcpu: "u") -> "(bu)":
        bound, node = await asyncio.to_thread(self.vm.get_vcpu_numa_node, vcpu)
        return [bound, node]

    @method()
    async def MapNumaNode(self, node: "u", host_node: "u") -> None:
        # One action whatever the node holds: which memory moves is read
        # under the VM's lock, after authorization, so the action cannot
        # depend on it (it once did: a check of state read before asking).
        await self._act(ACTION_MIGRATE, "map-numa-node", self.vm.map_numa_node, node, host_node)

    @method()
    async def GetStats(self) -> "a{sv}":
        return stats_dict(await asyncio.to_thread(self.vm.stats))

    # ---------------------------------------------------------- properties
    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self._props["Name"]

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self._props["State"]

    @dbus_property(access=PropertyAccess.READ)
    def Vcpus(self) -> "u":
        return self._props["Vcpus"]

    @dbus_property(access=PropertyAccess.READ)
    def MemoryBytes(self) -> "t":
        return self._props["MemoryBytes"]

    @dbus_property(access=PropertyAccess.READ)
    def NumaEnabled(self) -> "b":
        return self._props["NumaEnabled"]

    @dbus_property(access=PropertyAccess.READ)
    def NumaNodes(self) -> "u":
        return self._props["NumaNodes"]

    @dbus_property(access=PropertyAccess.READ)
    def NodeMap(self) -> "au":
        return self._props["NodeMap"]

    @dbus_property(access=PropertyAccess.READ)
    def Policy(self) -> "s":
        return self._props["Policy"]

    @dbus_property(access=PropertyAccess.READ)
    def VcpuThreads(self) -> "a(uu)":
        return self._props["VcpuThreads"]

    @dbus_property(access=PropertyAccess.READ)
    def VcpuAffinity(self) -> "a(uau)":
        return self._props["VcpuAffinity"]

    @dbus_property(access=PropertyAccess.READ)
    def DeclaredVcpuAffinity(self) -> "a(uau)":
        return self._props["DeclaredVcpuAffinity"]

    @dbus_property(access=PropertyAccess.READ)
    def VcpuNodes(self) -> "a(ubu)":
        return self._props["VcpuNodes"]

    @dbus_property(access=PropertyAccess.READ)
    def MemoryRegions(self) -> "a(uttuut)":
        return self._props["MemoryRegions"]

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        return self._props["Owner"]
