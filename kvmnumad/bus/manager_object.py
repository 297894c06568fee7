# D-Bus signatures are string annotations, as dbus-fast reads them; the type
# checkers see names, not types, in them:
# mypy: disable-error-code="name-defined,valid-type"
# ruff: noqa: F821, F722
"""``/org/kvmnuma1``: interface org.kvmnuma1.Manager.

VM-level verbs (DestroyVM) name their VM by an argument, declared as such,
so the owner rule and polkit see the same VM as VM.Destroy does; both are
one core call.  Properties are the service's mirror, like the VM objects'.
org.freedesktop.DBus.ObjectManager is on this path only: dbus-fast's
GetManagedObjects plus the InterfacesAdded/Removed signals that BusService
emits from here (and only from here).  Each method taking an a{sv} has a
``...Simple`` twin with plain arguments, for clients that cannot build one.
"""

import asyncio
from typing import Any

from dbus_fast import PropertyAccess
from dbus_fast.service import dbus_property, method, signal

from kvmnumad.bus.access import read_only, requires, setter
from kvmnumad.bus.adopt_args import parse_adopt_options
from kvmnumad.bus.args import check_name, optional_policy, parse_options, parse_policy, simple_options
from kvmnumad.bus.auth import ACTION_ADOPT, ACTION_MANAGE, ACTION_MIGRATE, ACTION_PLACE
from kvmnumad.bus.context import BusContext
from kvmnumad.bus.dispatch import BusObject, Subject, current_call
from kvmnumad.bus.fds import PassedFd
from kvmnumad.bus.job_object import job_row
from kvmnumad.bus.paths import MANAGER_INTERFACE, MANAGER_PATH, vm_path
from kvmnumad.bus.samples import action_rows, move_rows
from kvmnumad.errors import AccessDenied
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from kvmnumad.placement import Plan


def topology_rows(manager: Manager) -> list[list[Any]]:
    """GetTopology's a(uauttau): id, CPUs (online), total, free, distance to
    every node in id order."""
    topo = manager.topology()
    ids = topo.node_ids()
    return [
        [n.id, sorted(n.online_cpus), n.mem_total, n.mem_free, [n.distances.get(o, 255) for o in ids]]
        for n in (topo.nodes[i] for i in ids)
    ]


def plan_body(plan: Plan) -> list[Any]:
    """PlanVM's three out-args, typed: the policy; per guest node (guest
    node, host nodes of its memory policy, primary first, mempolicy, bytes,
    expected bytes per host node); per vCPU (vcpu, guest node, CPUs)."""
    return [
        str(plan.policy),
        [[n.guest_node, list(n.host_nodes), n.mempolicy.name.lower(), n.bytes,
          [[h, b] for h, b in sorted(n.per_host.items())]] for n in plan.nodes],
        [[v.vcpu, v.guest_node, sorted(v.cpus)] for v in plan.vcpus],
    ]


class ManagerObject(BusObject):
    def __init__(self, context: BusContext, props: dict[str, Any]) -> None:
        super().__init__(MANAGER_INTERFACE, props)
        self._context = context

    def subject(self) -> Subject:
        return Subject(None, None, MANAGER_PATH)

    @setter("DefaultPolicy")
    @requires(ACTION_PLACE, verb="set-default-policy", checks={"policy": parse_policy}, details=("policy",))
    async def set_default_policy(self, policy: Policy) -> None:
        await asyncio.to_thread(self._context.manager.set_default_policy, policy)

    # ------------------------------------------------------------- methods
    @method()
    @requires(ACTION_MANAGE, verb="create", new_vm="name",
              checks={"name": check_name, "options": parse_options}, details=("vcpus", "memory_bytes"))
    async def CreateVM(self, name: "s", vcpus: "u", memory_bytes: "t", options: "a{sv}") -> "o":
        opts: CreateOptions = options  # (parse_options made it, as declared)
        try:
            owner = await self._context.authorizer.caller_uid(current_call().sender)
            await asyncio.to_thread(self._context.manager.create_vm, name, vcpus, memory_bytes, opts, owner)
        finally:
            if isinstance(opts.payload, PassedFd):
                opts.payload.close()  # read (or refused): the caller's fd is not kept open
        return vm_path(name)

    @method()
    @requires(ACTION_MANAGE, verb="create", new_vm="name",
              checks={"name": check_name, "policy": optional_policy}, details=("vcpus", "memory_bytes"))
    async def CreateVMSimple(  # noqa: PLR0917 -- D-Bus arguments are positional
        self, name: "s", vcpus: "u", memory_bytes: "t", numa_nodes: "u", policy: "s", start: "b"
    ) -> "o":
        # CreateVM for clients that cannot build an a{sv} (dbus-send, qdbus):
        # the same core call, the same action and checks.
        opts = simple_options(numa_nodes, policy, start)  # (optional_policy made it a Policy | None)
        owner = await self._context.authorizer.caller_uid(current_call().sender)
        await asyncio.to_thread(self._context.manager.create_vm, name, vcpus, memory_bytes, opts, owner)
        return vm_path(name)

    @method()
    @requires(ACTION_MANAGE, verb="destroy", vm="name", checks={"name": check_name})
    async def DestroyVM(self, name: "s") -> None:
        await asyncio.to_thread(self._context.manager.destroy_vm, name)

    @method()
    @read_only
    async def GetVM(self, name: "s") -> "o":
        return await self._context.exported_path(check_name(name))

    @method()
    @read_only
    async def ListVMs(self) -> "a(sso)":
        def rows() -> list[list[str]]:
            return [[vm.name, str(vm.state), vm_path(vm.name)] for vm in self._context.manager.list_vms()]

        return await asyncio.to_thread(rows)

    @method()
    @read_only
    async def GetTopology(self) -> "a(uauttau)":
        return await asyncio.to_thread(topology_rows, self._context.manager)

    @method()
    @read_only
    async def GetReport(self) -> "s":
        return await asyncio.to_thread(self._context.manager.report)

    @method()
    @read_only
    async def GetSuggestions(self) -> "a(sss)":
        items = await asyncio.to_thread(self._context.manager.suggestions)
        return [list(i) for i in items]

    @method()
    @read_only
    async def PlanVM(self, vcpus: "u", memory_bytes: "t", options: "a{sv}") -> "sa(uausta(ut))a(uuau)":
        opts = parse_options(options)
        return plan_body(await asyncio.to_thread(self._context.manager.plan_vm, vcpus, memory_bytes, opts))

    @method()
    @read_only
    async def PlanVMSimple(self, vcpus: "u", memory_bytes: "t", numa_nodes: "u",
                           policy: "s") -> "sa(uausta(ut))a(uuau)":
        opts = simple_options(numa_nodes, optional_policy(policy))
        return plan_body(await asyncio.to_thread(self._context.manager.plan_vm, vcpus, memory_bytes, opts))

    @method()
    @requires(ACTION_MANAGE, verb="reexec")
    async def Reexec(self) -> None:
        # Root only: the new process runs whatever program is installed now,
        # so no polkit rule may hand this to anyone else.
        uid = await self._context.authorizer.caller_uid(current_call().sender)
        if uid != 0:
            raise AccessDenied(f"Reexec is for root only, not uid {uid}", uid=uid)
        self._context.request_reexec()

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
        # Never reached from the bus: the Dispatcher routes Set to the
        # @setter above (checked, authorized, off the loop).  dbus-fast
        # wants a setter to call the property writable.
        raise RuntimeError("DefaultPolicy is set through set_default_policy")  # pragma: no cover

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

    # ------------------------------------------------------- adopted VMs
    @method()
    @requires(ACTION_ADOPT, verb="adopt", checks={"options": parse_adopt_options}, details=("pid",))
    async def AdoptProcess(self, pid: "u", options: "a{sv}") -> "o":
        owner = await self._context.authorizer.caller_uid(current_call().sender)
        vm = await asyncio.to_thread(self._context.manager.adopt_process, pid, options, owner)
        return vm_path(vm.name)

    @method()
    @requires(ACTION_ADOPT, verb="release", vm="name", checks={"name": check_name})
    async def ReleaseVM(self, name: "s") -> None:
        await asyncio.to_thread(self._context.manager.release_vm, name)

    # ------------------------------------------------- optimizer (issue 14)
    @method()
    @read_only
    async def GetSuggestedActions(self) -> "a(sssosavdd)":
        return action_rows(await asyncio.to_thread(self._context.manager.suggested_actions))

    @dbus_property(access=PropertyAccess.READ)
    def HostNodeUsage(self) -> "a(uaudttua(st))":
        return self._props["HostNodeUsage"]

    # ------------------------------------------- migration jobs (issue 14 item 6)
    @method()
    @read_only
    async def ListJobs(self) -> "a(uoouus)":
        jobs = await asyncio.to_thread(lambda: [j.status() for j in self._context.manager.jobs])
        return [job_row(s) for s in jobs]

    @signal()
    def JobNew(self, job_id: int, job: str, vm: str) -> "uoo":
        return [job_id, job, vm]

    @signal()
    def JobRemoved(self, job_id: int, job: str, vm: str, result: str) -> "uoos":
        return [job_id, job, vm, result]

    # ------------------------------------------- automatic balancing (issue 14)
    @method()
    @requires(ACTION_MIGRATE, verb="rebalance")
    async def Rebalance(self) -> "a(ssuuuds)":
        return move_rows(await asyncio.to_thread(self._context.manager.rebalance))

    @method()
    @read_only
    async def PlanRebalance(self) -> "a(ssuuuds)":
        return move_rows(await asyncio.to_thread(self._context.manager.plan_rebalance))

    @signal()
    def Moved(  # noqa: PLR0917 -- D-Bus arguments are positional
        self, vm: str, kind: str, guest_node: int, from_node: int, to_node: int, gain: float,
        reason: str, job: str,
    ) -> "ssuuudso":
        return [vm, kind, guest_node, from_node, to_node, gain, reason, job]
