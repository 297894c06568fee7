"""The Manager: owns every VM, the host topology and the event stream.

It is the one place that turns a request into kernel objects: it validates
(request.py), asks the planner for a placement, creates the Vm, applies the
plan and rolls everything back when any step fails.  Front ends (D-Bus,
tests, the demo) only call it; it knows nothing of them, nor of persistence,
which subscribes to its events like any front end.  Thread-safe and
synchronous: front ends call blocking methods off their event loop and get
events through subscribe() (callbacks run on the thread that made the change).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor

import psutil

from kvmnumad import __version__, cpulist, crashpoints, errors, headroom, placement, report
from kvmnumad.adopt import discovery
from kvmnumad.adopt.vm import AdoptedVm, adoption_of, is_adopted
from kvmnumad.cgroups import CpusetBackend
from kvmnumad.events import (
    DefaultPolicyChanged,
    Event,
    JobAdded,
    JobChanged,
    JobRemoved,
    TopologyChanged,
    VcpuRepinned,
    VmAdded,
    VmRemoved,
)
from kvmnumad.journal import log_event
from kvmnumad.kvm import payload as kvm_payload
from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.ioctls import Cap
from kvmnumad.kvm.system import Kvm
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.model import CreateOptions, JobState, JobStatus, Policy
from kvmnumad.numa.memory import pages_per_node
from kvmnumad.numa.topology import HostTopology, read_free_memory, read_topology, with_free_memory
from kvmnumad.optimizer import explain, sample, suggest
from kvmnumad.optimizer.balance import Move, default_auto_balance
from kvmnumad.optimizer.explain import Kind as DecisionKind
from kvmnumad.optimizer.model import HostNodeSample, Sample
from kvmnumad.quotas import MAX_JOBS, MAX_JOBS_PER_UID, Quotas, Usage
from kvmnumad.rebalance import Rebalancer
from kvmnumad.request import Limits, check_vm_name, validate_request
from kvmnumad.vm import Vm
from kvmnumad.vm.definition import VmDefinition
from kvmnumad.vm.layout import GUEST_RAM_BASE, MAX_PAYLOAD
from kvmnumad.vm.migration import CHUNK_PAGES, MigrationJob
from kvmnumad.vm.saved import Recovery, Resume
from kvmnumad.workers import WorkerPool

log = logging.getLogger(__name__)

VCPU_CAP = 256  # per VM, whatever KVM allows: each vCPU is a host thread and 2 fds (3 once sampled)


class Manager:
    """Owns VMs by name; see the module docstring."""

    def __init__(
        self,
        kvm_path: str = "/dev/kvm",
        *,
        topology_reader: Callable[[], HostTopology] = read_topology,
        memory_reader: Callable[[], dict[int, int]] | None = None,
        cpusets: bool = True,
    ) -> None:
        """``memory_reader``: free bytes per host node now, read at every
        admission; by default the kernel's (read_free_memory) when the
        topology is the host's, else the topology's own figures."""
        self.version = __version__
        self._kvm_path = kvm_path
        self._kvm: Kvm | None = None
        self._read_topology = topology_reader
        if memory_reader is None and topology_reader is read_topology:
            memory_reader = read_free_memory
        self._read_free_memory = memory_reader
        self._topo = topology_reader()
        self._lock = threading.RLock()
        self._vms: dict[str, Vm] = {}
        self._creating: set[str] = set()
        # name -> [lock, holders]: create, restore and destroy of one name run one
        # at a time, each through to its event (which persistence turns into the
        # state file), so no two of them interleave their files (finding 7)
        self._names: dict[str, tuple[threading.Lock, list[int]]] = {}
        self._subscribers: list[Callable[[Event], None]] = []
        self._default_policy = Policy.MANUAL
        self._quotas = Quotas()
        self._quota_lock = threading.Lock()
        self._reserved: dict[int, Usage] = {}  # uid -> what creations and additions in flight will add
        self.cpusets = CpusetBackend.detect() if cpusets else None
        self.decisions = explain.DecisionLog()  # why each VM's placements are what they are
        self._sampler = sample.Sampler(keep_open=True)  # the timer's: its files stay open between samples
        self._jobs: dict[int, MigrationJob] = {}  # running memory migration jobs by id
        self._jobs_lock = threading.Lock()  # taken before a VM's lock, never under it
        self._job_ids = itertools.count(1)
        # Where jobs run their chunks: the daemon sets its WorkerPool; else one of our own, made when needed
        self.executor: Executor | None = None
        self.migration_chunk_pages = CHUNK_PAGES
        self.balancer = Rebalancer(self)  # automatic balancing (issue 14 item 5)
        if cpusets and self.cpusets is None:
            log.warning("no writable cpuset cgroup (v1 or v2): VMs run without cpusets")

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
        return self._topo  # replaced whole, never mutated: reading the reference is atomic

    def host_nodes(self) -> list[int]:
        return self.topology().node_ids()

    def online_cpus(self) -> list[int]:
        return sorted(self.topology().online_cpus())

    def max_vcpus(self) -> int:
        """The most vCPUs one VM may have here: what KVM allows, capped at
        VCPU_CAP -- the figure create_vm accepts, so the bus's MaxVcpus
        cannot promise more than creation grants.  0: /dev/kvm is unusable."""
        try:
            kvm = self._kvm_handle()
        except errors.KvmUnavailable:
            return 0
        kvm_max = kvm.check_extension(Cap.MAX_VCPUS) or kvm.check_extension(Cap.NR_VCPUS) or 4
        return min(kvm_max, VCPU_CAP)

    def limits(self) -> Limits:
        # Without /dev/kvm the request is still checked (at the cap) before
        # creation answers KvmUnavailable.
        return Limits(max_vcpus=self.max_vcpus() or VCPU_CAP)

    # ------------------------------------------------------------------ quotas
    @property
    def quotas(self) -> Quotas:
        return self._quotas

    def set_quotas(self, quotas: Quotas) -> None:
        """New limits for what comes next; what exists already stays (a
        lowered quota refuses the next creation, it destroys nothing)."""
        self._quotas = quotas  # replaced whole: reading the reference is atomic

    def usage(self, uid: int) -> Usage:
        """What ``uid``'s VMs hold now, counted from the VMs themselves (no
        counter to drift), plus what its calls in flight will add."""
        used = self._reserved.get(uid, Usage())
        for vm in self.list_vms():
            if vm.owner == uid:
                # Unlocked reads of the VM's region list: taking each VM's lock
                # under _quota_lock could deadlock with a VM adding memory.
                regions = list(vm.memory.regions)
                used += Usage(1, vm.vcpu_count, sum(r.size for r in regions), len(regions))
        return used

    @contextlib.contextmanager
    def _admit(self, uid: int, wanted: Usage) -> Iterator[None]:
        """Refuse with QuotaExceeded, or hold ``wanted`` as reserved for the
        block: two calls of one uid in flight cannot both take the last slot."""
        quota = self._quotas.for_uid(uid)
        with self._quota_lock:
            used = self.usage(uid)
            exceeded = quota.first_exceeded(used, wanted)
            if exceeded is not None:
                limit, maximum, current = exceeded
                unit = " bytes" if limit == "memory" else ""
                raise errors.QuotaExceeded(
                    f"uid {uid} is at its {limit} quota: {current}{unit} used of {maximum}{unit}, "
                    f"this request needs {getattr(wanted, limit)}{unit} more ({self._quotas.source})",
                    limit=limit, maximum=maximum, used=current, requested=getattr(wanted, limit), uid=uid)
            self._reserved[uid] = self._reserved.get(uid, Usage()) + wanted
        try:
            yield
        finally:
            with self._quota_lock:
                left = self._reserved[uid] - wanted
                if left == Usage():
                    del self._reserved[uid]
                else:
                    self._reserved[uid] = left

    def admit_memory(self, uid: int, size: int) -> contextlib.AbstractContextManager[None]:
        """For a VM adding a region after creation (SetupNumaMemory)."""
        headroom.check_memory(f"a region of {size} bytes", size, self._untouched_bytes())
        return self._admit(uid, Usage(memory=size, regions=1))

    def _untouched_bytes(self) -> int:
        """Guest memory promised to VMs and not resident yet.  Read without the
        VMs' locks, as usage() does: the caller holds one VM's lock already."""
        total = 0
        for vm in self.list_vms():
            for r in list(vm.memory.regions):
                total += r.size - sum(pages_per_node(r.mem.hva, r.size).values()) * PAGE_SIZE
        return total

    # ------------------------------------------------------------------ VMs
    def get_vm(self, name: str) -> Vm:
        with self._lock:
            try:
                return self._vms[name]
            except KeyError:
                raise errors.NoSuchVM(f"no VM named {name!r}", vm=name) from None

    def list_vms(self) -> list[Vm]:
        with self._lock:
            return list(self._vms.values())

    def _plan(self, vcpus: int, memory_bytes: int, options: CreateOptions) -> placement.Plan:
        req = placement.PlacementRequest(
            vcpus=vcpus, memory_bytes=memory_bytes, guest_nodes=options.numa_nodes,
            policy=options.policy or self._default_policy, host_nodes=options.host_nodes,
            allow_split=options.allow_split,
        )
        topo = self.topology()
        if self._read_free_memory is not None:
            # What the kernel says is free now (not at start), less what
            # existing VMs were promised and have not touched yet (measure_load).
            topo = with_free_memory(topo, self._read_free_memory())
        busy = psutil.cpu_percent(percpu=True, interval=None)  # since the previous plan; idle at first
        load = report.measure_load(topo, self.list_vms(), busy)
        # the daemon's memory cgroup (MemoryMax=) may be tighter than the nodes
        headroom.check_memory(f"a VM of {memory_bytes} bytes", memory_bytes, sum(load.node_bytes.values()))
        return placement.plan(topo, load, req)

    def plan_vm(self, vcpus: int, memory_bytes: int, options: CreateOptions) -> placement.Plan:
        """What create_vm would do with the same request, making nothing."""
        validate_request(self.topology(), self.limits(), name=None, vcpus=vcpus, memory_bytes=memory_bytes,
                         options=options)
        return self._plan(vcpus, memory_bytes, options)

    def create_vm(self, name: str, vcpus: int, memory_bytes: int, options: CreateOptions,
                  owner: int = 0) -> Vm:
        """Validate, check the owner's quotas, plan, then build: every refusal
        comes before any kernel object (or payload read) exists."""
        validate_request(self.topology(), self.limits(), name=name, vcpus=vcpus, memory_bytes=memory_bytes,
                         options=options)
        regions = max(options.numa_nodes, 1) if memory_bytes else 0
        with self._admit(owner, Usage(1, vcpus, memory_bytes, regions)), self._name_held(name):
            return self._create(name, vcpus, memory_bytes, options, owner)

    @contextlib.contextmanager
    def _name_held(self, name: str) -> Iterator[None]:
        """The one lifecycle call of ``name`` in progress; others of the same
        name wait for it (at most as long as it takes), other names do not."""
        with self._lock:
            lock, holders = self._names.setdefault(name, (threading.Lock(), [0]))
            holders[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                holders[0] -= 1
                if not holders[0]:
                    del self._names[name]  # bounded by the calls in flight

    def _create(self, name: str, vcpus: int, memory_bytes: int, options: CreateOptions, owner: int) -> Vm:
        payload = None
        if options.payload is not None:
            try:
                payload = kvm_payload.read_flat_binary(options.payload.fileno(), max_size=MAX_PAYLOAD)
            except (OSError, ValueError) as e:
                # No path and no errno detail beyond the caller's own fd: nothing to learn about other files
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise errors.InvalidArgument(f"payload: {why}") from e
        policy = options.policy or self._default_policy
        plan = self._plan(vcpus, memory_bytes, options)  # refused here, before any kernel object exists
        crashpoints.reached("create.planned")

        def build(vm: Vm) -> None:
            vm.allowed_nodes = frozenset(options.host_nodes)
            self._apply_plan(vm, plan, memory_bytes, options)
            if options.start:
                vm.start()

        vm = self._build(name, vcpus, owner=owner, policy=policy, passes=options.passes, payload=payload,
                         setup=build)
        log_event("vm-created", f"VM {name} created: {vcpus} vCPUs, {memory_bytes} bytes, "
                  f"{options.numa_nodes} guest nodes, policy {policy}", vm=name, reason="api")
        self._record_plan(name, plan)  # once it exists: a refused or failed build decided nothing
        self._emit(VmAdded(name))
        return vm

    def _build(self, name: str, vcpus: int, *, owner: int, policy: Policy, passes: int,
               payload: bytes | None, setup: Callable[[Vm], None], resume: Resume | None = None) -> Vm:
        """Make, set up and register a VM, all or nothing: a failure anywhere
        releases every kernel object and cgroup made for it."""
        with self._lock:
            if name in self._vms or name in self._creating:
                raise errors.AlreadyExists(f"a VM named {name!r} exists already", vm=name)
            self._creating.add(name)
        try:
            kvm = self._kvm_handle()
            try:
                cpuset = self.cpusets.vm_cpuset(name) if self.cpusets is not None else None
            except OSError as e:
                raise errors.Busy(f"VM {name!r}: its cpuset cgroup cannot be made: {e}", vm=name) from e
            try:
                vm = Vm(name, kvm, vcpus, self.topology, lambda event: None, owner=owner, policy=policy,
                        payload=payload, passes=passes, max_slots=kvm.check_extension(Cap.NR_MEMSLOTS) or 32,
                        cpuset=cpuset, adopt=resume.memfds if resume is not None else None)
            except BaseException:
                if cpuset is not None:
                    cpuset.remove()
                raise
            vm.auto_balance = default_auto_balance(policy)  # a restore's setup may say otherwise
            try:
                setup(vm)
            except BaseException:
                vm.destroy()
                raise
            crashpoints.reached("create.built")
            with self._lock:
                self._vms[name] = vm
        finally:
            with self._lock:
                self._creating.discard(name)
        vm.limit_memory(lambda size: self.admit_memory(owner, size))  # its creation was admitted whole
        vm.on_decision = self.decisions.record
        vm.publish(self._emit)
        return vm

    def _apply_plan(self, vm: Vm, plan: placement.Plan, memory_bytes: int, options: CreateOptions) -> None:
        guest_nodes = options.numa_nodes
        if guest_nodes:
            vm.enable_numa(guest_nodes, plan.node_map)
        if memory_bytes:
            gpa = GUEST_RAM_BASE
            for n in plan.nodes:
                vm.add_memory(n.guest_node, n.bytes, gpa, policy=n.mempolicy,
                              host_nodes=frozenset(n.host_nodes), prealloc=options.prealloc)
                gpa += n.bytes
        if plan.policy == Policy.MANUAL:
            return  # manual: nothing is pinned until the caller says so
        for v in plan.vcpus:
            host = plan.nodes[v.guest_node].host_nodes[0]
            bound = v.guest_node if guest_nodes and v.cpus == self.topology().cpus_of_node(host) else None
            vm.apply_declared(v.vcpu, frozenset(v.cpus), bound)

    def restore_vm(self, d: VmDefinition, payload: bytes | None = None, resume: Resume | None = None) -> Vm:
        """Recreate a saved VM with its layout, regions and declared placement,
        all or nothing, held to the same rules as a new request.  ``payload``:
        the VM's own flat binary as saved; it must be the one the definition
        names (its SHA-256), else the VM is not restored rather than run with
        other code than it had.  ``resume``: the memfds (and vCPU states) of
        the same VM in an earlier process of the daemon (vm/saved.py)."""
        recovery = resume.recovery if resume is not None else Recovery.NONE
        memory = sum(r.size for r in d.regions)
        validate_request(self.topology(), self.limits(), name=d.name, vcpus=d.vcpus, memory_bytes=0,
                         options=CreateOptions(policy=d.policy, passes=d.passes))
        if d.payload_sha256 is None:
            payload = None
        elif payload is None or hashlib.sha256(payload).hexdigest() != d.payload_sha256:
            raise errors.InvalidArgument(f"VM {d.name!r}: its saved payload is missing or not the one its "
                                         "definition names", vm=d.name)
        elif not 0 < len(payload) <= MAX_PAYLOAD:
            raise errors.InvalidArgument(f"VM {d.name!r}: saved payload of {len(payload)} bytes, "
                                         f"more than {MAX_PAYLOAD}", vm=d.name)

        def setup(vm: Vm) -> None:
            if d.numa_nodes:
                vm.enable_numa(d.numa_nodes, list(d.node_map))
            for r in d.regions:
                vm.add_memory(r.node, r.size, r.gpa, policy=r.policy, host_nodes=frozenset(r.host_nodes))
            online = self.topology().online_cpus()
            for p in d.vcpu_placement:
                cpus = frozenset(p.declared or ()) & online or None  # what is left online; None: unpinned
                vm.apply_declared(p.vcpu, cpus, p.bound_node)
            if d.auto_balance is not None:
                vm.auto_balance = d.auto_balance
            vm.restore_explicit(d.explicit_vcpus, d.explicit_nodes)
            vm.allowed_nodes = frozenset(d.allowed_nodes)
            if resume is not None:
                vm.resume_vcpus(resume.vcpus or [], recovery)
            if d.running:
                vm.start()

        with self._name_held(d.name):  # through to VmAdded, which persistence may turn into a file
            vm = self._build(d.name, d.vcpus, owner=d.owner, policy=d.policy, passes=d.passes,
                             payload=payload, setup=setup, resume=resume)
            log_event("vm-created", f"VM {d.name} restored: {d.vcpus} vCPUs, {memory} bytes, "
                      f"{d.numa_nodes} guest nodes, policy {d.policy}"
                      + (f", {recovery}" if recovery else ""), vm=d.name, reason="restore")
            self._record_restore(vm)
            self._emit(VmAdded(d.name))
            return vm

    def destroy_vm(self, name: str) -> None:
        """Off the API, released, and announced (persistence removes the
        definition) as one step of this name: a release that fails half-way
        still ends in VmRemoved, so a VM gone from the API never comes back
        after a restart; the failure is then reported as Internal."""
        with self._name_held(name):
            self._end_jobs(name)  # before the VM is off the API, so none of them acts on a released VM
            with self._lock:
                vm = self.get_vm(name)
                if is_adopted(vm):
                    vm.refuse_destroy()  # type: ignore[attr-defined]  # (raises Busy: not ours to destroy)
                del self._vms[name]
            crashpoints.reached("destroy.unlisted")
            failure: Exception | None = None
            try:
                vm.destroy()
                crashpoints.reached("destroy.released")
            except Exception as e:  # everything else was released (Vm.destroy); say what was not
                log.exception("releasing VM %s", name)
                failure = e
            self.decisions.forget(name)
            self.balancer.forget(name)
            self._sampler.forget(name)
            failed = f", its release failed: {failure}" if failure is not None else ""
            log_event("vm-destroyed", f"VM {name} destroyed{failed}", vm=name, reason="api")
            self._emit(VmRemoved(name))
        if failure is not None:
            raise errors.Internal(f"VM {name!r} is destroyed and its definition removed, but its release "
                                  f"failed: {failure}", vm=name) from failure

    # ------------------------------------------------------------------ hotplug
    def on_topology_changed(self, reason: str) -> list[tuple[str, int, list[int]]]:
        """Re-read the topology and re-pin every vCPU whose CPUs changed.
        Not reentrant: the caller serializes calls (hotplug.RepinQueue)."""
        topo = self._topo = self._read_topology()
        moves: list[tuple[str, int, list[int]]] = []
        for vm in self.list_vms():
            for vcpu, old, new in vm.repin(topo):
                moves.append((vm.name, vcpu, sorted(new)))
                log_event("repin", f"vCPU {vcpu} of VM {vm.name} re-pinned from CPUs {cpulist.describe(old)} "
                          f"to {cpulist.describe(new)} ({reason})", vm=vm.name, vcpu=vcpu, cpus=new,
                          reason=reason)
                self._record_repin(vm, topo, vcpu, new, reason)
                self._emit(VcpuRepinned(vm.name, vcpu, old, new, reason))
        log_event("topology-changed", f"host topology changed ({reason}): online CPUs "
                  f"{cpulist.describe(topo.online_cpus())}", cpus=topo.online_cpus(), reason=reason)
        self._emit(TopologyChanged(topo.online_cpus(), reason))
        return moves

    # ------------------------------------------------------------------ reports
    def report(self) -> str:
        cpusets = self.cpusets.describe() if self.cpusets else "not available (no writable cpuset cgroup)"
        return report.report(self.version, self.topology(), cpusets, self.list_vms(), self.measure_now())

    def suggestions(self) -> list[tuple[str, str, str]]:
        return report.suggestions(self.topology(), self.list_vms(), self.suggested_actions())

    def shutdown(self) -> None:
        """Stop and release every VM without announcing removals: their
        definitions stay saved for the next start."""
        for vm in self.list_vms():
            self._end_jobs(vm.name)
            with self._lock:
                self._vms.pop(vm.name, None)
            try:
                vm.destroy()
            except Exception:
                log.exception("destroying VM %s on shutdown", vm.name)
        if self._kvm is not None:
            self._kvm.close()
            self._kvm = None
        if self.cpusets is not None:
            self.cpusets.close()
        self._sampler.close()

    # ------------------------------------------------------------------ adopted processes
    def adopt_process(self, pid: int, options: discovery.AdoptOptions, owner: int = 0,
                      declared: Callable[[AdoptedVm], None] | None = None) -> AdoptedVm:
        """Adopt a running VMM process as a VM (kvmnumad/adopt/).  The pidfd
        is opened first, so the pid cannot be reused under the discovery;
        every refusal comes before anything of the process was changed, and
        a placement that fails half-way restores the affinities it found.
        ``declared``: a placement to apply instead of the policy's (restore)."""
        discovery.check_adoptable(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise errors.InvalidArgument(f"no process {pid}", pid=pid) from None
        name: str | None = None  # set once reserved in _creating
        try:
            found = discovery.discover(pid, options)
            wanted = check_vm_name(options.name or discovery.default_name(found))
            with self._lock:
                for other in self._vms.values():
                    if isinstance(other, AdoptedVm) and (other.pid, other.start_time) == (
                            pid, found.start_time):
                        raise errors.AlreadyExists(f"process {pid} is adopted already, as VM {other.name!r}",
                                                   vm=other.name, pid=pid)
                if wanted in self._vms or wanted in self._creating:
                    raise errors.AlreadyExists(f"a VM named {wanted!r} exists already", vm=wanted)
                self._creating.add(wanted)
                name = wanted
            policy = options.policy or Policy.MANUAL
            # Held to the owner's quotas like a VM of its own (it counts in usage() from then on)
            size = sum(r.size for r in found.regions)
            with self._admit(owner, Usage(1, len(found.vcpus), size, len(found.regions))):
                vm = AdoptedVm(name, found, pidfd, self.topology, owner=owner, policy=policy, options=options)
                vm.auto_balance = (default_auto_balance(policy) if options.auto_balance is None
                                   else options.auto_balance)
                before = vm.vcpu_affinity()
                try:
                    if declared is not None:
                        declared(vm)
                    elif policy != Policy.MANUAL:
                        vm.bind_all()
                except BaseException:
                    for (_i, cpus), v in zip(before, vm.vcpus, strict=True):
                        with contextlib.suppress(OSError):
                            os.sched_setaffinity(v.tid, cpus)
                    raise
                with self._lock:
                    self._vms[name] = vm  # type: ignore[assignment]  # an AdoptedVm answers as a Vm does
        except BaseException:
            os.close(pidfd)
            raise
        finally:
            if name is not None:
                with self._lock:
                    self._creating.discard(name)
        vm.publish(self._emit)
        log_event("vm-created", f"VM {name} adopted: {found.vmm or 'VMM'} process {pid} ({found.comm}), "
                  f"{len(found.vcpus)} vCPUs, {vm.memory_bytes} bytes in {len(found.regions)} mapping(s), "
                  f"{found.numa_nodes} guest nodes (layout from {found.source}), policy {policy}",
                  vm=name, reason="adopt")
        self._emit(VmAdded(name))
        return vm

    def release_vm(self, name: str, reason: str = "api") -> None:
        """Let an adopted VM go, leaving its threads and memory where they are."""
        with self._lock:
            vm = self.get_vm(name)
            if not isinstance(vm, AdoptedVm):
                raise errors.InvalidArgument(f"VM {name!r} is kvmnumad's own, not adopted: DestroyVM ends it",
                                             vm=name)
        self._end_jobs(name)  # a job moving its pages ends first (one chunk at most): none acts on it after
        with self._lock:
            if self._vms.get(name) is not vm:
                raise errors.NoSuchVM(f"VM {name!r} has been released", vm=name)
            del self._vms[name]
        vm.release()
        self.decisions.forget(name)
        self.balancer.forget(name)
        self._sampler.forget(name)
        log_event("vm-destroyed", f"adopted VM {name} released ({reason}): {vm.vmm or 'VMM'} process "
                  f"{vm.pid}", vm=name, reason=reason)
        self._emit(VmRemoved(name))

    # ------------------------------------------------------------------ optimizer
    def take_sample(self) -> Sample | None:
        """One sample of every VM and host node (the sampling timer's, off the
        loop: it reads /proc and /sys); None when there is no VM to sample."""
        vms = self.list_vms()
        if not vms:
            return None
        return self._sampler.take(vms, self.topology())

    def measure_now(self) -> Sample:
        """Every VM and host node now, for a reader (the report): the timer's Sampler keeps its state."""
        return sample.Sampler().take(self.list_vms(), self.topology())

    def measure_host_nodes(self) -> tuple[HostNodeSample, ...]:
        """The host nodes now, busy fractions since boot (no previous sample to diff)."""
        return sample.Sampler().take(self.list_vms(), self.topology()).nodes

    def suggested_actions(self) -> list[suggest.Suggestion]:
        """Read now, not from the last sample: a caller who applied one sees it gone."""
        topo = self.topology()
        return suggest.suggest(list(self.measure_now().vms.values()), topo)

    def explain(self, name: str) -> list[explain.Decision]:
        self.get_vm(name)
        return self.decisions.of_vm(name)

    def _record_plan(self, name: str, plan: placement.Plan) -> None:
        rule = str(plan.policy)
        for n in plan.nodes:
            if not n.bytes:
                continue  # no memory, nothing bound
            self.decisions.record(explain.Decision(
                name, explain.node_subject(n.guest_node), explain.Kind.POLICY, rule,
                f"host node(s) {cpulist.describe(n.host_nodes)} ({n.mempolicy.name.lower()})", n.why,
                node=n.host_nodes[0]))
        if plan.policy == Policy.MANUAL:
            return  # nothing pinned: nothing to explain
        for v in plan.vcpus:
            self.decisions.record(explain.Decision(
                name, explain.vcpu_subject(v.vcpu), explain.Kind.POLICY, rule,
                f"CPUs {cpulist.describe(v.cpus)}", v.why, vcpu=v.vcpu))

    def _record_restore(self, vm: Vm) -> None:
        for g, host in enumerate(vm.node_map if vm.numa_enabled else []):
            self.decisions.record(explain.Decision(
                vm.name, explain.node_subject(g), explain.Kind.RESTORE, "restore", f"host node {host}",
                "the placement saved before the daemon stopped", node=host))
        for vcpu, cpus in vm.declared_vcpu_affinity():
            if cpus:
                self.decisions.record(explain.Decision(
                    vm.name, explain.vcpu_subject(vcpu), explain.Kind.RESTORE, "restore",
                    f"CPUs {cpulist.describe(cpus)}", "the declared CPUs saved before the daemon stopped, "
                    "those online", vcpu=vcpu))

    def _record_repin(self, vm: Vm, topo: HostTopology, vcpu: int, new: frozenset[int], reason: str) -> None:
        declared = frozenset(dict(vm.declared_vcpu_affinity()).get(vcpu, ()))
        online = topo.online_cpus()
        if declared & online:
            rule, why = "hotplug-declared-online", (
                f"its declared CPUs {cpulist.describe(declared)} that are online ({reason})")
        else:
            lost = {topo.cpus[c].node for c in declared if c in topo.cpus}
            to = {topo.cpus[c].node for c in new if c in topo.cpus}
            rule, why = "hotplug-nearest-node", (
                f"all its declared CPUs {cpulist.describe(declared)} (host node(s) {cpulist.describe(lost)}) "
                f"are offline; host node(s) {cpulist.describe(to)} nearest by distance with online CPUs "
                f"({reason})")
        self.decisions.record(explain.Decision(
            vm.name, explain.vcpu_subject(vcpu), explain.Kind.HOTPLUG, rule, f"CPUs {cpulist.describe(new)}",
            why, vcpu=vcpu))

    # ------------------------------------------------------------------ memory migration jobs
    @property
    def jobs(self) -> list[MigrationJob]:
        """The jobs running now, oldest first (an ended job is gone from here)."""
        with self._jobs_lock:
            return sorted(self._jobs.values(), key=lambda j: j.id)

    def get_job(self, job_id: int) -> MigrationJob:
        with self._jobs_lock:
            try:
                return self._jobs[job_id]
            except KeyError:
                raise errors.InvalidArgument(f"no migration job {job_id} is running", job=job_id) from None

    def start_migration(self, vm: str, guest_node: int, host_node: int, slot: int | None = None, *,
                        starter: int = 0, on_progress: Callable[[JobStatus], None] | None = None,
                        kind: DecisionKind = DecisionKind.CALLER, rule: str = "caller-migrate",
                        why: str = "") -> MigrationJob:
        """Start moving guest node ``guest_node`` of ``vm`` (or only its
        ``slot``) to ``host_node`` and return the job at once
        (vm/migration.py).  Refused before anything changes: a bad node or
        slot (NodeOutOfRange, InvalidArgument), a guest node with no memory
        (InvalidArgument), a job on the same guest node running (Busy), too
        many jobs (LimitReached).  ``on_progress`` is called off the loop,
        at most every PROGRESS_INTERVAL and once at the end; ``kind``,
        ``rule`` and ``why`` are what the decision recorded for a finished
        job says (the balancer passes its own)."""
        v = self.get_vm(vm)
        with self._jobs_lock:  # held across begin_migration: two starts cannot both pass the Busy check
            for j in self._jobs.values():
                if j.vm == vm and j.guest_node == guest_node:
                    raise errors.Busy(f"guest node {guest_node} of VM {vm!r} is being moved by job {j.id} "
                                      f"(to host node {j.host_node})", job=j.id, vm=vm, node=guest_node)
            mine = sum(1 for j in self._jobs.values() if j.starter == starter)
            if len(self._jobs) >= MAX_JOBS or (starter != 0 and mine >= MAX_JOBS_PER_UID):
                raise errors.LimitReached(f"{len(self._jobs)} migration jobs running, {mine} of them uid "
                                          f"{starter}'s (at most {MAX_JOBS}, {MAX_JOBS_PER_UID} per uid)",
                                          jobs=len(self._jobs), uid=starter)
            regions = v.begin_migration(guest_node, host_node, slot)  # the policy points there from now on
            job_id = next(self._job_ids)
            old = v.node_map[guest_node]

            def finish(state: JobState, moved: int) -> None:
                if state == JobState.DONE and kind == DecisionKind.CALLER:
                    v.explicit_nodes.add(guest_node)  # a caller's map: the balancer keeps it (rebalance.py)
                before, followers, cpus = v.end_migration(guest_node, host_node, regions, state, moved)
                if state == JobState.DONE:
                    self._record_migration(vm, guest_node, host_node, before=before, moved=moved,
                                           followers=followers, cpus=cpus, kind=kind, rule=rule, why=why)

            def progress(status: JobStatus) -> None:
                if on_progress is not None:
                    on_progress(status)
                self._emit(JobChanged(status))

            job = MigrationJob(job_id, vm, guest_node, slot=slot, host_node=host_node, from_node=old,
                               starter=starter,
                               regions=regions, executor=self._job_executor(), finish=finish,
                               on_progress=progress, on_end=self._job_ended,
                               chunk_pages=self.migration_chunk_pages, origin=str(kind),
                               pid=adoption_of(v)[1])  # an adopted VM's pages are its VMM's
            self._jobs[job_id] = job
        log_event("migrate", f"VM {vm} guest node {guest_node}"
                  + (f" slot {slot}" if slot is not None else "")
                  + f": migration job {job_id} from host node {old} to {host_node} started",
                  vm=vm, node=host_node, from_node=old, to_node=host_node, reason="job-started")
        self._emit(JobAdded(job.status()))
        job.start()
        return job

    def cancel_job(self, job_id: int) -> None:
        """Stop a job between two chunks (vm/migration.py says what it leaves)."""
        self.get_job(job_id).cancel()

    def map_numa_node(self, vm: str, node: int, host_node: int, starter: int = 0) -> None:
        """MapNumaNode: as a migration job, waited for, when the guest node has
        memory to move (an adopted VM's too: move_pages on its VMM); else (no
        memory, the node mapped there already) the VM's own synchronous remap.
        The errors are a synchronous move's: the job's, typed, when it failed."""
        v = self.get_vm(vm)
        v.numa.require(node)
        if not v.memory.of_guest_node(node) or v.node_map[node] == host_node:
            v.map_numa_node(node, host_node)  # nothing to move: the map alone, checked as ever
            return
        job = self.start_migration(vm, node, host_node, starter=starter, rule="caller-map",
                                   why="a caller mapped it with MapNumaNode")
        status = job.wait()
        if status.state == JobState.FAILED:
            raise job.error or errors.Internal(f"migration job {job.id} failed")
        if status.state == JobState.CANCELLED:
            raise errors.Busy(f"migration job {job.id} of guest node {node} was cancelled after "
                              f"{status.pages_moved} of {status.pages_total} pages; the node stays mapped to "
                              f"host node {v.node_map[node]}", job=job.id)

    def _job_executor(self) -> Executor:
        if self.executor is None:
            self.executor = WorkerPool(name="kvmnumad-jobs")  # no daemon gave its pool (tests, benches)
        return self.executor

    def _job_ended(self, job: MigrationJob) -> None:
        with self._jobs_lock:
            self._jobs.pop(job.id, None)
        status = job.status()
        failed = sum(n for _, n in status.failed)
        log_event("migrate", f"VM {job.vm} guest node {job.guest_node}: migration job {job.id} "
                  f"{status.state}, {status.pages_moved} of {status.pages_total} pages moved to host node "
                  f"{job.host_node}" + (f", {failed} failed" if failed else "")
                  + (f": {status.error}" if status.error else ""), vm=job.vm, node=job.host_node,
                  from_node=job.from_node, to_node=job.host_node, reason=f"job-{status.state}")
        self._emit(JobRemoved(status))

    def _end_jobs(self, vm: str) -> None:
        """Cancel the VM's jobs and wait for each to end (one chunk at most)."""
        for job in [j for j in self.jobs if j.vm == vm]:
            job.cancel()
            if job.wait(60).state == JobState.RUNNING:
                log.error("migration job %d of VM %s did not end within 60 s of its cancel", job.id, vm)

    def _record_migration(self, vm: str, node: int, host_node: int, *, before: int, moved: int,
                          followers: list[int], cpus: frozenset[int], kind: DecisionKind, rule: str,
                          why: str) -> None:
        reason = (f"{why}; " if why else "") + f"a migration job moved it from host node {before} to " \
                 f"{host_node}: {moved} pages moved"
        self.decisions.record(explain.Decision(vm, explain.node_subject(node), kind, rule,
                                               f"host node {host_node}", reason, node=host_node))
        for index in followers:
            self.decisions.record(explain.Decision(
                vm, explain.vcpu_subject(index), kind, "follows-guest-node", f"CPUs {cpulist.describe(cpus)}",
                f"bound to guest node {node}, which a migration job moved to host node {host_node}: its CPUs",
                vcpu=index, node=host_node))
    # ------------------------------------------------------------------ balancing (issue 14 item 5)
    def emit_event(self, event: Event) -> None:
        """For the balancer (rebalance.py), which moves things as the core does."""
        self._emit(event)

    def set_auto_balance(self, name: str, on: bool) -> None:
        self.get_vm(name).set_auto_balance(on)

    def rebalance(self) -> list[Move]:
        """One balancing pass now: the moves made."""
        return self.balancer.run() or []

    def plan_rebalance(self) -> list[Move]:
        """What a pass would do now, changing nothing."""
        return self.balancer.plan()
