# D-Bus signatures are string annotations, as dbus-fast reads them; the type
# checkers see names, not types, in them:
# mypy: disable-error-code="name-defined,valid-type"
# ruff: noqa: F821, F722
"""``/org/kvmnuma1/vm/<escaped name>``: interface org.kvmnuma1.VM.

Each method declares what it may do (bus/access.py) and is one core call off
the loop: the Dispatcher has validated and authorized it before, and waits
for the core's events to be published after, so no method here reads state
back.  Property values are the service's mirror of the VM (bus/properties.py).
"""

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from dbus_fast import PropertyAccess
from dbus_fast.service import dbus_property, method

from kvmnumad.bus.access import read_only, requires, setter
from kvmnumad.bus.args import check_cpus
from kvmnumad.bus.auth import ACTION_MANAGE, ACTION_MIGRATE, ACTION_PLACE
from kvmnumad.bus.context import BusContext
from kvmnumad.bus.dispatch import BusObject, Subject
from kvmnumad.bus.errors import unknown_object
from kvmnumad.bus.paths import VM_INTERFACE, job_path, vm_path
from kvmnumad.bus.samples import decision_rows
from kvmnumad.errors import NoSuchVM
from kvmnumad.model import VmStats
from kvmnumad.vm import Vm
from kvmnumad.workers import CALLER

T = TypeVar("T")


def stats_body(s: VmStats) -> list[Any]:
    """GetStats' four out-args: arrays of structs, never maps keyed by number
    (busctl --json cannot print those, nor qdbus), never text.  A vCPU is
    (vcpu, tid, cpu_time_ns, current_cpu, exits, progress)."""
    return [
        [[reason, n] for reason, n in sorted(s.exits.items())],
        [[v.vcpu, v.tid, v.cpu_time_ns, v.current_cpu, [[r, n] for r, n in sorted(v.exits.items())],
          v.progress] for v in s.vcpus],
        [[node, pages] for node, pages in sorted(s.pages_per_host_node.items())],
        s.dirty_pages,
    ]


class VmObject(BusObject):
    def __init__(self, context: BusContext, vm: Vm, props: dict[str, Any]) -> None:
        super().__init__(VM_INTERFACE, props)
        self.vm = vm
        self.vm_name = vm.name  # (self.name is the interface name, ServiceInterface's)
        self.path = vm_path(vm.name)
        self._context = context

    @classmethod
    def template(cls) -> "VmObject":
        """An instance for its members only (never exported, never called)."""
        obj = cls.__new__(cls)
        BusObject.__init__(obj, VM_INTERFACE, {})
        return obj

    def subject(self) -> Subject:
        return Subject(self.vm_name, self.vm.owner, self.path, self.vm)

    async def _core(self, fn: Callable[..., T], *args: Any) -> T:
        """One core call off the loop.  The VM gone under it (destroyed, or
        replaced under its name) means this object is gone: UnknownObject, the
        one answer of a path without an object, whatever the method."""
        try:
            return await asyncio.to_thread(fn, *args)
        except NoSuchVM:
            raise unknown_object(self.path) from None

    def _destroy(self) -> None:
        # This object's VM, not one made anew under the same name meanwhile.
        manager = self._context.manager
        if manager.get_vm(self.vm_name) is not self.vm:
            raise NoSuchVM(f"VM {self.vm_name!r} has been destroyed")
        manager.destroy_vm(self.vm_name)

    # ------------------------------------------------------------- methods
    @method()
    @requires(ACTION_MANAGE, verb="start")
    async def Start(self) -> None:
        await self._core(self.vm.start)

    @method()
    @requires(ACTION_MANAGE, verb="stop")
    async def Stop(self) -> None:
        await self._core(self.vm.stop)

    @method()
    @requires(ACTION_MANAGE, verb="destroy")
    async def Destroy(self) -> None:
        await self._core(self._destroy)

    @method()
    @requires(ACTION_PLACE, verb="enable-numa")
    async def EnableNuma(self, nodes: "u") -> None:
        await self._core(self.vm.enable_numa, nodes)

    @method()
    @requires(ACTION_PLACE, verb="disable-numa")
    async def DisableNuma(self) -> None:
        await self._core(self.vm.disable_numa)

    @method()
    @requires(ACTION_PLACE, verb="setup-numa-memory", details=("size",))
    async def SetupNumaMemory(self, node: "u", size: "t", gpa: "t") -> "u":
        slot: int = await self._core(self.vm.setup_numa_memory, node, size, gpa)
        return slot

    @method()
    @requires(ACTION_PLACE, verb="set-vcpu-affinity", checks={"cpus": check_cpus})
    async def SetVcpuAffinity(self, vcpu: "u", cpus: "au") -> None:
        await self._core(self.vm.set_vcpu_affinity, vcpu, cpus)

    @method()
    @read_only
    async def GetVcpuAffinity(self, vcpu: "u") -> "au":
        cpus = await self._core(self.vm.get_vcpu_affinity, vcpu)
        return list(cpus)

    @method()
    @requires(ACTION_PLACE, verb="bind-vcpu")
    async def BindVcpuToNumaNode(self, vcpu: "u", node: "u") -> None:
        await self._core(self.vm.bind_vcpu_to_numa_node, vcpu, node)

    @method()
    @read_only
    async def GetVcpuNumaNode(self, vcpu: "u") -> "(bu)":
        bound, node = await self._core(self.vm.get_vcpu_numa_node, vcpu)
        return [bound, node]

    @method()
    @requires(ACTION_MIGRATE, verb="map-numa-node")
    async def MapNumaNode(self, node: "u", host_node: "u") -> None:
        # One action whatever the node holds: the memory it moves is read
        # under the VM's lock, after authorization, so the action cannot
        # depend on it (it did once: a check of stale state).
        caller = CALLER.get()
        await self._core(partial(self._context.manager.map_numa_node, self.vm_name, node, host_node,
                                 caller.uid if caller is not None else 0))

    @method()
    @read_only
    async def GetStats(self) -> "a(st)a(uutia(st)t)a(ut)t":
        return stats_body(await self._core(self.vm.stats))

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
    def MemoryRegions(self) -> "a(uttuu)":
        return self._props["MemoryRegions"]

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        return self._props["Owner"]

    @dbus_property(access=PropertyAccess.READ)
    def Recovery(self) -> "s":
        return self._props["Recovery"]

    @dbus_property(access=PropertyAccess.READ)
    def Adopted(self) -> "b":
        return self._props["Adopted"]

    @dbus_property(access=PropertyAccess.READ)
    def Vmm(self) -> "s":
        return self._props["Vmm"]

    @dbus_property(access=PropertyAccess.READ)
    def ProcessId(self) -> "u":
        return self._props["ProcessId"]

    # ------------------------------------------------- optimizer (issue 14)
    @method()
    @read_only
    async def GetDecisions(self) -> "a(ssssst)":
        decisions = await self._core(self._context.manager.explain, self.vm_name)
        return decision_rows(decisions)

    @dbus_property(access=PropertyAccess.READ)
    def Residency(self) -> "a(uuttd)":
        return self._props["Residency"]

    @dbus_property(access=PropertyAccess.READ)
    def VcpuUsage(self) -> "a(uttiit)":
        return self._props["VcpuUsage"]

    # ------------------------------------------- migration jobs (issue 14 item 6)
    @method()
    @requires(ACTION_MIGRATE, verb="migrate-numa-node")
    async def MigrateNumaNode(self, node: "u", host_node: "u") -> "o":
        return await self._start_job(node, None, host_node)

    @method()
    @requires(ACTION_MIGRATE, verb="migrate-numa-node")
    async def MigrateNumaSlot(self, node: "u", slot: "u", host_node: "u") -> "o":
        return await self._start_job(node, slot, host_node)

    async def _start_job(self, node: int, slot: int | None, host_node: int) -> str:
        caller = CALLER.get()
        starter = caller.uid if caller is not None else 0
        job = await self._core(partial(self._context.manager.start_migration, self.vm_name, node, host_node,
                                       slot, starter=starter))
        return job_path(job.id)  # exported before this reply goes: its JobAdded is ahead of the barrier

    # ------------------------------------------- automatic balancing (issue 14)
    @setter("AutoBalance")
    @requires(ACTION_PLACE, verb="set-auto-balance")
    async def set_auto_balance(self, on: bool) -> None:
        await self._core(self._context.manager.set_auto_balance, self.vm_name, on)

    @dbus_property()
    def AutoBalance(self) -> "b":
        return self._props["AutoBalance"]

    @AutoBalance.setter  # type: ignore[no-redef]
    def AutoBalance(self, value: "b") -> None:
        # Never reached from the bus: the Dispatcher routes Set to the @setter above.
        raise RuntimeError("AutoBalance is set through set_auto_balance")  # pragma: no cover

    @method()
    @requires(ACTION_PLACE, verb="clear-explicit-placement")
    async def ClearExplicitPlacement(self, vcpus: "au", guest_nodes: "au") -> None:
        await self._core(self.vm.clear_explicit, vcpus, guest_nodes)
