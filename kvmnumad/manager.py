"""The Manager: owns every VM, the host topology and the event stream.

It is the one place that turns a request into kernel objects: it validates,
asks the planner for a placement, creates the Vm, applies the plan and rolls
everything back when any step fails.  Front ends (D-Bus, tests, the demo) only
call it; it knows nothing of them.  Thread-safe and synchronous: front ends
call blocking methods off their event loop and get Events through
subscribe() (callbacks may run on any thread).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from kvmnumad import __version__, errors, placement
from kvmnumad.cgroups import CpusetBackend
from kvmnumad.events import (
    DefaultPolicyChanged,
    Event,
    TopologyChanged,
    VcpuRepinned,
    VmAdded,
    VmChanged,
    VmRemoved,
)
from kvmnumad.journal import log_event
from kvmnumad.kvm import payload as kvm_payload
from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.ioctls import Cap
from kvmnumad.kvm.system import Kvm
from kvmnumad.memory import PAGE_SIZE
from kvmnumad.model import NAME_RE, CreateOptions, Policy, VmState
from kvmnumad.numa.memory import MemPolicy, pages_per_node
from kvmnumad.numa.topology import HostTopology, format_cpulist, read_topology
from kvmnumad.state import StateStore
from kvmnumad.vm import BOOT_SIZE, ENTRY, GUEST_RAM_BASE, Vm

log = logging.getLogger(__name__)

MAX_MEMORY = 1 << 40


class Manager:
    """Owns VMs by name; see the module docstring."""

    def __init__(
        self,
        kvm_path: str = "/dev/kvm",
        *,
        topology_reader: Callable[[], HostTopology] = read_topology,
        state_dir: Path | None = None,
        cpusets: bool = True,
    ) -> None:
        self.version = __version__
        self._kvm_path = kvm_path
        self._kvm: Kvm | None = None
        self._read_topology = topology_reader
        self._topo = topology_reader()
        self._topo_lock = threading.Lock()
        self._lock = threading.RLock()
        self._vms: dict[str, Vm] = {}
        self._creating: set[str] = set()
        self._subscribers: list[Callable[[Event], None]] = []
        self._default_policy = Policy.MANUAL
        self._state_dir = state_dir
        self._store: Any = None
        self.cpusets = CpusetBackend.detect() if cpusets else None
        if cpusets and self.cpusets is None:
            log.warning("no writable cpuset cgroup (v1 or v2): VMs run without cpusets")
        if state_dir is not None:
            self._store = StateStore(state_dir)

    # ------------------------------------------------------------------ events
    def subscribe(self, callback: Callable[[Event], None]) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[Event], None]) -> None:
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def _emit(self, event: Event) -> None:
        for cb in list(self._subscribers):
            try:
                cb(event)
            except Exception:  # a broken subscriber must not break the core
                log.exception("event subscriber failed on %s", event)
        if isinstance(event, VmChanged):
            self._persist(event.vm)

    # ------------------------------------------------------------------ host
    def _kvm_handle(self) -> Kvm:
        with self._lock:
            if self._kvm is None:
                try:
                    self._kvm = Kvm(self._kvm_path)
                except (KvmError, OSError) as e:
                    raise errors.KvmUnavailable(f"{self._kvm_path}: {e.strerror or e}") from e
            return self._kvm

    @property
    def default_policy(self) -> Policy:
        return self._default_policy

    def set_default_policy(self, policy: Policy) -> None:
        if self._default_policy == policy:
            return
        self._default_policy = Policy(policy)
        self._emit(DefaultPolicyChanged(self._default_policy))

    def topology(self) -> HostTopology:
        with self._topo_lock:
            return self._topo

    def refresh_topology(self) -> HostTopology:
        topo = self._read_topology()
        with self._topo_lock:
            self._topo = topo
        return topo

    def host_nodes(self) -> list[int]:
        return sorted(self.topology().nodes)

    def online_cpus(self) -> list[int]:
        return sorted(self.topology().online_cpus())

    def max_vcpus(self) -> int:
        try:
            kvm = self._kvm_handle()
        except errors.KvmUnavailable:
            return 0
        return kvm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.NR_VCPUS) or 4

    # ------------------------------------------------------------------ VMs
    def get_vm(self, name: str) -> Vm:
        with self._lock:
            try:
                return self._vms[name]
            except KeyError:
                raise errors.NoSuchVM(f"no VM named {name!r}") from None

    def list_vms(self) -> list[Vm]:
        with self._lock:
            return list(self._vms.values())

    def _validate_request(self, name: str | None, vcpus: int, memory_bytes: int,
                          options: CreateOptions) -> None:
        if name is not None and (not NAME_RE.fullmatch(name) or name.startswith(".")):
            # a leading dot would make "." and ".." (and hidden files) of the
            # state and cgroup directories named after VMs
            raise errors.InvalidArgument(
                f"VM name {name!r} must be 1-64 characters of [A-Za-z0-9_.-], not starting with '.'"
            )
        limit = self.max_vcpus() or 1024
        if not 1 <= vcpus <= min(limit, 256):
            raise errors.InvalidArgument(f"vcpus {vcpus} out of range 1..{min(limit, 256)}")
        if memory_bytes < 0 or memory_bytes > MAX_MEMORY:
            raise errors.InvalidArgument(f"memory_bytes {memory_bytes} out of range 0..{MAX_MEMORY}")
        parts = max(options.numa_nodes, 1)
        if memory_bytes and memory_bytes % (parts * PAGE_SIZE):
            raise errors.InvalidArgument(
                f"memory_bytes {memory_bytes} must split into {parts} page-aligned parts "
                f"(a multiple of {parts * PAGE_SIZE})"
            )
        if options.numa_nodes > 64:
            raise errors.InvalidArgument(f"numa_nodes {options.numa_nodes} out of range 0..64")
        topo = self.topology()
        for h in options.host_nodes:
            if h not in topo.nodes:
                raise errors.NodeOutOfRange(
                    f"host node {h} does not exist (host nodes: {sorted(topo.nodes)})"
                )
        if options.passes < 0:
            raise errors.InvalidArgument(f"passes {options.passes} must be >= 0")

    def _load(self) -> placement.Load:
        """What existing VMs already hold, so new placements go elsewhere first."""
        topo = self.topology()
        node_vcpus: dict[int, int] = {}
        node_bytes: dict[int, int] = {}
        for vm in self.list_vms():
            for _vcpu, cpus in vm.vcpu_affinity():
                nodes = {topo.cpus[c].node for c in cpus if c in topo.cpus}
                if len(nodes) == 1:
                    (n,) = nodes
                    node_vcpus[n] = node_vcpus.get(n, 0) + 1
            for r in vm.memory_regions():
                # MemFree already excludes what is resident: count only the rest
                resident = sum(pages_per_node(r.hva, r.size).values()) * PAGE_SIZE
                node_bytes[r.host_node] = node_bytes.get(r.host_node, 0) + r.size - resident
        # busy fraction per CPU since the previous plan (psutil keeps the last
        # sample; the very first call has none and reads as idle)
        busy = psutil.cpu_percent(percpu=True, interval=None)
        cpu = {i: p / 100.0 for i, p in enumerate(busy)}
        return placement.Load(cpu=cpu, node_vcpus=node_vcpus, node_bytes=node_bytes)

    def _plan(self, vcpus: int, memory_bytes: int, options: CreateOptions) -> placement.Plan:
        req = placement.PlacementRequest(
            vcpus=vcpus,
            memory_bytes=memory_bytes,
            guest_nodes=options.numa_nodes,
            policy=options.policy or self._default_policy,
            host_nodes=options.host_nodes,
            allow_split=options.allow_split,
        )
        return placement.plan(self.topology(), self._load(), req)

    def plan_vm(self, vcpus: int, memory_bytes: int, options: CreateOptions) -> str:
        self._validate_request(None, vcpus, memory_bytes, options)
        return self._plan(vcpus, memory_bytes, options).to_json()

    def create_vm(self, name: str, vcpus: int, memory_bytes: int, options: CreateOptions,
                  owner: int = 0) -> Vm:
        self._validate_request(name, vcpus, memory_bytes, options)
        payload = None
        if options.payload:
            try:
                payload = kvm_payload.load_flat_binary(options.payload, max_size=BOOT_SIZE - ENTRY)
            except (OSError, ValueError) as e:
                raise errors.InvalidArgument(f"payload {options.payload!r}: {e}") from e
        with self._lock:
            if name in self._vms or name in self._creating:
                raise errors.AlreadyExists(f"a VM named {name!r} exists already")
            self._creating.add(name)
        try:
            plan = self._plan(vcpus, memory_bytes, options)
            kvm = self._kvm_handle()
            cpuset = self.cpusets.vm_cpuset(name) if self.cpusets is not None else None
            try:
                vm = Vm(
                    name, kvm, vcpus, self.topology, self._emit_quiet(name),
                    owner=owner, policy=options.policy or self._default_policy, payload=payload,
                    passes=options.passes, max_slots=kvm.check_extension(Cap.NR_MEMSLOTS) or 32,
                cpuset=cpuset,
                )
            except BaseException:
                if cpuset is not None:
                    cpuset.remove()
                raise
            try:
                self._apply_plan(vm, plan, memory_bytes, options)
                if options.start:
                    vm.start()
            except BaseException:
                vm.destroy()
                raise
            with self._lock:
                self._vms[name] = vm
        finally:
            with self._lock:
                self._creating.discard(name)
        vm._emit = self._emit  # from now on its changes are public
        log_event("vm-created", f"VM {name} created: {vcpus} vCPUs, {memory_bytes} bytes, "
                  f"{options.numa_nodes} guest nodes, policy {vm.policy}", vm=name, reason="api")
        self._emit(VmAdded(name))
        self._persist(name)
        return vm

    def _emit_quiet(self, name: str) -> Callable[[Event], None]:
        """A VM under construction is not public yet: its events wait until it is."""
        return lambda event: None

    def _apply_plan(self, vm: Vm, plan: placement.Plan, memory_bytes: int, options: CreateOptions) -> None:
        guest_nodes = options.numa_nodes
        if guest_nodes:
            vm.enable_numa(guest_nodes, plan.node_map)
        if memory_bytes:
            gpa = GUEST_RAM_BASE
            for n in plan.nodes:
                # Without guest NUMA the one region still gets a real host policy.
                add = vm.setup_numa_memory if guest_nodes else vm.add_memory
                add(n.guest_node, n.bytes, gpa, policy=n.mempolicy, host_nodes=frozenset(n.host_nodes),
                    prealloc=options.prealloc)
                gpa += n.bytes
        if plan.policy == Policy.MANUAL:
            return  # manual: nothing is pinned until the caller says so
        for v in plan.vcpus:
            host = plan.nodes[v.guest_node].host_nodes[0]
            bound = v.guest_node if guest_nodes and v.cpus == self.topology().cpus_of_node(host) else None
            vm.apply_declared(v.vcpu, frozenset(v.cpus), bound)

    def destroy_vm(self, name: str) -> None:
        with self._lock:
            vm = self.get_vm(name)
            del self._vms[name]
        vm.destroy()
        log_event("vm-destroyed", f"VM {name} destroyed", vm=name, reason="api")
        if self._store is not None:
            self._store.remove(name)
        self._emit(VmRemoved(name))

    # ------------------------------------------------------------------ hotplug
    def on_topology_changed(self, reason: str) -> list[tuple[str, int, list[int]]]:
        """Re-read the topology and re-pin every vCPU whose CPUs changed."""
        old = self.topology()
        topo = self.refresh_topology()
        moves: list[tuple[str, int, list[int]]] = []
        for vm in self.list_vms():
            for vcpu, _old, new in vm.repin(topo):
                moves.append((vm.name, vcpu, sorted(new)))
                log_event("repin", f"vCPU {vcpu} of VM {vm.name} re-pinned from CPUs {_fmt(_old)} to "
                          f"{_fmt(new)} ({reason})", vm=vm.name, vcpu=vcpu, cpus=new, reason=reason)
                self._emit(VcpuRepinned(vm.name, vcpu, _old, new, reason))
        if old.online_cpus() != topo.online_cpus() or reason:
            log_event("topology-changed", f"host topology changed ({reason}): online CPUs "
                      f"{_fmt(topo.online_cpus())}", cpus=topo.online_cpus(), reason=reason)
            self._emit(TopologyChanged(topo.online_cpus(), reason))
        return moves

    # ------------------------------------------------------------------ reports
    def report(self) -> str:
        topo = self.topology()
        lines = [
            f"kvmnumad {self.version}",
            f"host nodes: {len(topo.nodes)}",
            "cpusets: " + (self.cpusets.describe() if self.cpusets
                           else "not available (no writable cpuset cgroup)"),
        ]
        for nid in sorted(topo.nodes):
            n = topo.nodes[nid]
            lines.append(
                f"  node {nid}: cpus {_fmt(n.cpus)} online {_fmt(topo.cpus_of_node(nid, online_only=True))} "
                f"mem {n.mem_total >> 20} MiB free {n.mem_free >> 20} MiB"
            )
        vms = self.list_vms()
        lines.append(f"VMs: {len(vms)}")
        for vm in vms:
            lines.append(f"  {vm.name}: {vm.state} vcpus {vm.vcpu_count} policy {vm.policy} "
                         f"numa {vm.numa_nodes} map {vm.node_map}")
            for vcpu, cpus in vm.vcpu_affinity():
                lines.append(f"    vcpu {vcpu}: cpus {_fmt(cpus)}")
            for r in vm.memory_regions():
                lines.append(f"    slot {r.slot}: {r.size >> 20} MiB guest node {r.guest_node} "
                             f"-> host node {r.host_node}")
        return "\n".join(lines) + "\n"

    def suggestions(self) -> list[tuple[str, str, str]]:
        """(vm, kind, text): placements whose vCPUs and memory sit on different nodes."""
        out: list[tuple[str, str, str]] = []
        topo = self.topology()
        for vm in self.list_vms():
            if vm.state == VmState.RUNNING and not vm.memory_regions():
                out.append((vm.name, "no-memory", "VM runs without guest memory regions"))
            regions = vm.memory_regions()
            for vcpu, cpus in vm.vcpu_affinity():
                nodes = {topo.cpus[c].node for c in cpus if c in topo.cpus}
                if not regions or not vm.numa_enabled:
                    continue
                gnode = vm.guest_node_of_vcpu(vcpu)
                mem_nodes = {r.host_node for r in regions if r.guest_node == gnode}
                if mem_nodes and not nodes <= mem_nodes and len(topo.nodes) > 1:
                    out.append((vm.name, "remote-memory",
                                f"vCPU {vcpu} may run on node(s) {_fmt(nodes)} but its guest node {gnode} "
                                f"memory is on {_fmt(mem_nodes)}: bind it with BindVcpuToNumaNode"))
        return out

    # ------------------------------------------------------------------ persistence
    def _persist(self, name: str) -> None:
        if self._store is None:
            return
        with self._lock:
            vm = self._vms.get(name)
        if vm is not None:
            try:
                self._store.save(name, vm.definition())
            except OSError:
                log.exception("could not save the definition of VM %s", name)

    def restore(self) -> list[str]:
        """Recreate the VMs saved in the state directory, with their declared placement."""
        if self._store is None:
            return []
        restored: list[str] = []
        for d in self._store.load_all():
            try:
                self._restore_one(d)
                restored.append(str(d["name"]))
            except Exception:
                log.exception("could not restore VM definition %r", d.get("name"))
        return restored

    def _restore_one(self, d: dict[str, Any]) -> None:
        name = str(d["name"])
        vm = self.create_vm(name, int(d["vcpus"]), 0,
                            CreateOptions(policy=Policy(d.get("policy", "manual")),
                                          passes=int(d.get("passes", 0))),
                            owner=int(d.get("owner", 0)))
        if d.get("numa_nodes"):
            vm.enable_numa(int(d["numa_nodes"]), [int(x) for x in d["node_map"]])
        for r in d.get("regions", []):
            vm.setup_numa_memory(int(r["node"]), int(r["size"]), int(r["gpa"]),
                                 policy=MemPolicy(int(r["policy"])),
                                 host_nodes=frozenset(int(x) for x in r["host_nodes"]))
        topo = self.topology()
        for p in d.get("vcpu_placement", []):
            declared = p.get("declared")
            cpus = frozenset(int(c) for c in declared) if declared else None
            if cpus is not None and not cpus & topo.online_cpus():
                cpus = None
            elif cpus is not None:
                cpus = cpus & topo.online_cpus()
            vm.apply_declared(int(p["vcpu"]), cpus, p.get("bound_node"))
        if d.get("running"):
            vm.start()

    def shutdown(self) -> None:
        """Stop and release every VM (their definitions stay saved)."""
        store, self._store = self._store, None  # destroying for shutdown is not "removing"
        try:
            for vm in self.list_vms():
                with self._lock:
                    self._vms.pop(vm.name, None)
                try:
                    vm.destroy()
                except Exception:
                    log.exception("destroying VM %s on shutdown", vm.name)
        finally:
            self._store = store
        if self._kvm is not None:
            self._kvm.close()
            self._kvm = None
        if self.cpusets is not None:
            self.cpusets.close()

    def describe(self) -> str:
        return json.dumps({"vms": [vm.definition() for vm in self.list_vms()]}, indent=2, default=str)


def _fmt(cpus: Iterable[int]) -> str:
    return format_cpulist(cpus) or "-"


__all__ = ["Manager", "asdict"]
