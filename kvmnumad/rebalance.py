"""The acting edge of automatic balancing: measure, ask the pure rules
(optimizer/balance.py), apply the moves, say so.

One pass at a time (a lock), run by the balancing timer off the event loop,
by an event trigger, or by a caller (Manager.rebalance); the dry run
(``plan``) measures and decides the same way and changes nothing.  A pass
measures only the VMs with AutoBalance on, with its own Sampler (so its busy
fractions and vCPU figures cover the interval since the previous pass, and
numa_maps is read every time: pages someone else moved must be seen).  With
no such VM it answers None and the timer sleeps.

A guest node's memory moves as a migration job (vm/migration.py), started
through Manager.start_migration with kind REBALANCE (the Job object's Origin
says ``rebalance``), and the pass returns at once: it never waits for the
job, so neither the event loop nor a worker of the pool (where the job's
chunks run) is held by it.  The guest node's vCPU moves of the same pass
follow when the job is done (``_job_ended``, on the job's last pool task),
not before: the guest node arrives as one, and a job that fails or is
cancelled leaves nothing to undo (its vCPUs never left); such an end is
logged and recorded as a decision.  While a job (the balancer's or a
caller's) moves a guest node, no pass plans that guest node.  A guest node
with only vCPU moves has them applied in the pass.

Each move ends in a Rebalanced event (a memory move's names its job), a
journal entry (``rebalance``, KVMNUMA_JOB for a memory move) with the
reason, and a decision (``kvmnumactl explain``).  A guest node whose move
fails is logged and left for the next pass; the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from kvmnumad import cpulist, errors
from kvmnumad.events import Event, JobRemoved, Rebalanced
from kvmnumad.journal import log_event
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.model import JobState, JobStatus
from kvmnumad.optimizer import balance, explain
from kvmnumad.optimizer.model import Sample
from kvmnumad.optimizer.sample import Sampler

if TYPE_CHECKING:
    from kvmnumad.manager import Manager
    from kvmnumad.vm import Vm

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (VM name, guest node)


class _Seen(NamedTuple):
    at: float  # time.monotonic()
    cpu_ns: int
    delay_ns: int


@dataclass
class _Job:
    """A memory move of the balancer in flight, and the vCPU moves that wait for it."""

    memory: balance.Move
    vcpus: tuple[balance.Move, ...]
    announced: bool = False  # its start is logged and signalled: its end may be told after it
    ended: JobStatus | None = None  # an end that came before the announcement (a job with nothing to move)


class Rebalancer:
    def __init__(self, manager: Manager, thresholds: balance.Thresholds | None = None) -> None:
        self._manager = manager
        self.thresholds = thresholds or balance.Thresholds()
        # The rules.  A test on a one-node host, where no rule can ask for a
        # memory move, gives its own to drive the acting edge (tests/test_balance_jobs.py).
        self.planner = balance.plan
        self._lock = threading.Lock()  # one pass at a time
        # _last_moved and _jobs, from passes and from jobs' pool threads; held
        # only to read or write them, never across a call out
        self._state = threading.Lock()
        self._sampler = Sampler(residency_every=1)
        self._seen: dict[int, _Seen] = {}
        self._measured_at: float | None = None
        self._last_moved: dict[Key, float] = {}  # (vm, guest node) -> time.monotonic()
        self._jobs: dict[Key, _Job] = {}
        self.passes = 0
        manager.subscribe(self._on_event)

    def balanced(self) -> list[Vm]:
        """Adopted VMs too: their memory moves as a job on the VMM's pid (adopt/vm.py)."""
        return [vm for vm in self._manager.list_vms() if vm.auto_balance]

    def forget(self, vm: str) -> None:
        with self._state:
            for key in [k for k in self._last_moved if k[0] == vm]:
                del self._last_moved[key]
            for key in [k for k in self._jobs if k[0] == vm]:
                del self._jobs[key]

    def run(self) -> list[balance.Move] | None:
        """One pass; None when no VM has AutoBalance on (the timer then sleeps).
        A memory move in the answer is a job started; its guest node's vCPU
        moves (also in the answer) follow when it is done."""
        return self._pass(apply=True)

    def plan(self) -> list[balance.Move]:
        return self._pass(apply=False) or []

    def _pass(self, *, apply: bool) -> list[balance.Move] | None:
        with self._lock:
            vms = self.balanced()
            if not vms:
                return None
            self.passes += 1
            topo = self._manager.topology()
            s = self._sampler.take(vms, topo)
            load = self._load(s)
            by_name = {vm.name: vm for vm in vms}
            facts = [balance.VmFacts(s.vms[vm.name], vm.policy, frozenset(vm.explicit_vcpus()),
                                     frozenset(vm.explicit_nodes), PAGE_SIZE, frozenset(vm.allowed_nodes))
                     for vm in vms if vm.name in s.vms]
            with self._state:
                last_moved = dict(self._last_moved)
                moving = set(self._jobs)
            moving |= {(j.vm, j.guest_node) for j in self._manager.jobs}
            moves = self.planner(facts, load, topo, now=time.monotonic(), last_moved=last_moved,
                                 thresholds=self.thresholds, moving=frozenset(moving))
            if not apply:
                return moves
            done: list[balance.Move] = []
            groups: dict[Key, list[balance.Move]] = {}
            for m in moves:
                groups.setdefault((m.vm, m.guest_node), []).append(m)
            for (name, g), group in groups.items():
                try:
                    self._apply(by_name[name], g, group)
                except errors.Busy as e:  # a caller's job began since the plan: theirs, left alone
                    log.debug("rebalance of VM %s guest node %d left: %s", name, g, e)
                    continue
                except errors.KvmnumaError as e:
                    log.warning("rebalance of VM %s guest node %d not made: %s", name, g, e)
                    continue
                except OSError as e:
                    log.warning("rebalance of VM %s guest node %d failed: %s", name, g, e)
                    continue
                done.extend(group)
            return done

    def _apply(self, vm: Vm, g: int, moves: Sequence[balance.Move]) -> None:
        memory = [m for m in moves if m.kind == balance.MEMORY]
        vcpus = tuple(m for m in moves if m.kind != balance.MEMORY)
        if memory:
            (m,) = memory  # the rules move a guest node's memory to one node
            self._start_job(vm, g, m, vcpus)
            return
        self._move_vcpus(vm, g, vcpus)
        with self._state:
            self._last_moved[(vm.name, g)] = time.monotonic()

    def _start_job(self, vm: Vm, g: int, m: balance.Move, vcpus: tuple[balance.Move, ...]) -> None:
        """Start the job and say so; its end comes to _job_ended, on the
        job's own pool task (or here, when it ended before it was announced)."""
        key = (vm.name, g)
        job = _Job(m, vcpus)
        with self._state:
            self._jobs[key] = job  # before the start: a pass must not plan it, however fast it ends

        def on_progress(status: JobStatus) -> None:  # off the loop, on the job's pool thread
            if status.state == JobState.RUNNING:
                return
            with self._state:
                if not job.announced:
                    job.ended = status
                    return
            self._job_ended(vm, g, job, status)

        try:
            started = self._manager.start_migration(vm.name, g, m.to_node, on_progress=on_progress,
                                                    kind=explain.Kind.REBALANCE, rule=m.rule, why=m.reason)
        except BaseException:
            with self._state:
                self._jobs.pop(key, None)
            raise
        try:
            self._log(vm, m, f"memory of guest node {g}", None, None, job=started.id)
            self._manager.emit_event(Rebalanced(vm.name, m.kind, g, m.from_node, m.to_node, m.gain, m.reason,
                                                job=started.id))
        finally:
            with self._state:
                job.announced = True
                early = job.ended
            if early is not None:
                self._job_ended(vm, g, job, early)

    def _job_ended(self, vm: Vm, g: int, job: _Job, status: JobStatus) -> None:
        """Done: the guest node's vCPUs follow (the manager recorded the
        memory's decision).  Cancelled or failed: logged and recorded; the
        vCPUs stay where they are, with the memory the job left.

        The dwell counts from here, the job's end, not from its start: it is
        the time a guest node stays where it arrived, and it arrives when the
        job is done; a copy under load can last longer than the dwell, and
        counted from the start the next pass could move it again the moment
        it arrived.  Cancelled and failed jobs start a dwell too, so a move
        that keeps failing is tried once per dwell, not once per period."""
        try:
            if status.state == JobState.DONE:
                self._move_vcpus(vm, g, job.vcpus)
            else:
                self._job_not_done(vm, g, job, status)
        except (errors.KvmnumaError, OSError) as e:  # the VM went meanwhile, say
            log.warning("rebalance of VM %s guest node %d after migration job %d: %s", vm.name, g,
                        status.id, e)
        except Exception:  # a bug: logged; the job still ends, and so does its hold on the guest node
            log.exception("rebalance of VM %s guest node %d after migration job %d", vm.name, g, status.id)
        finally:
            with self._state:
                if self._jobs.get((vm.name, g)) is job:
                    del self._jobs[(vm.name, g)]
                    self._last_moved[(vm.name, g)] = time.monotonic()

    def _job_not_done(self, vm: Vm, g: int, job: _Job, status: JobStatus) -> None:
        m = job.memory
        where = vm.node_map[g] if g < len(vm.node_map) else m.from_node
        what = (f"migration job {status.id} moving guest node {g}'s memory from host node {m.from_node} to "
                f"{m.to_node} {status.state} after {status.pages_moved} of {status.pages_total} pages"
                + (f": {status.error}" if status.error else ""))
        stays = (f"the guest node stays mapped to host node {where}"
                 + (", the moved pages stay moved" if status.state == JobState.CANCELLED else "")
                 + (f"; its vCPUs stay where they are (not moved to host node {m.to_node})"
                    if job.vcpus else ""))
        level = logging.WARNING if status.state == JobState.FAILED else logging.INFO
        log_event("rebalance", f"VM {vm.name}: {what}; {stays}", vm=vm.name, node=where,
                  from_node=m.from_node, to_node=m.to_node, reason=f"job-{status.state}", rule=m.rule,
                  level=level, job=status.id)
        self._manager.decisions.record(explain.Decision(
            vm.name, explain.node_subject(g), explain.Kind.REBALANCE, m.rule, f"host node {where}",
            f"{m.reason}; {what}: {stays}", node=where))

    def _move_vcpus(self, vm: Vm, g: int, moves: Sequence[balance.Move]) -> None:
        for m in moves:
            topo = self._manager.topology()
            cpus = vm.numa.host_cpus(g, topo)
            explicit = set(vm.explicit_vcpus())
            for index in [i for i, _tid in vm.vcpu_threads()
                          if vm.guest_node_of_vcpu(i) == g and i not in explicit]:
                vm.apply_declared(index, cpus, g)
                self._record(vm, m, explain.vcpu_subject(index), f"CPUs {cpulist.describe(cpus)}", index)
                self._log(vm, m, f"vCPU {index} of guest node {g}", index, cpus)
            self._manager.emit_event(Rebalanced(vm.name, m.kind, g, m.from_node, m.to_node, m.gain, m.reason))

    def _on_event(self, event: Event) -> None:
        """A caller's job that ended holds its guest node for a dwell, as a
        balancer's move would: the caller's map (done) or cancel is theirs, not
        a drift to repair at the next pass."""
        if isinstance(event, JobRemoved) and event.status.origin != explain.Kind.REBALANCE:
            with self._state:
                self._last_moved[(event.status.vm, event.status.guest_node)] = time.monotonic()

    def _load(self, s: Sample) -> balance.Load:
        """Busy fractions from the sample; per vCPU thread its CPU use and run
        delay since the previous pass (none at the first: nothing to diff)."""
        now = time.monotonic()
        seen: dict[int, _Seen] = {}
        busy: dict[int, float] = {}
        delay: dict[int, float] = {}
        for vm in s.vms.values():
            for v in vm.vcpus:
                seen[v.tid] = _Seen(now, v.cpu_time_ns, v.run_delay_ns)
                last = self._seen.get(v.tid)
                if last is not None and now > last.at:
                    span = (now - last.at) * 1e9
                    busy[v.tid] = max(0.0, (v.cpu_time_ns - last.cpu_ns) / span)
                    delay[v.tid] = max(0.0, (v.run_delay_ns - last.delay_ns) / span)
        interval = now - self._measured_at if self._measured_at is not None else 0.0
        self._seen, self._measured_at = seen, now
        return balance.Load({n.node: n for n in s.nodes}, busy, delay, interval)

    @staticmethod
    def _log(vm: Vm, m: balance.Move, what: str, vcpu: int | None, cpus: frozenset[int] | None, *,
             job: int | None = None) -> None:
        """One journal entry per moved thing: a guest node's memory (as its
        job starts, KVMNUMA_JOB), or one vCPU (KVMNUMA_VCPU)."""
        to = f"CPUs {cpulist.describe(cpus)} of host node {m.to_node}" if cpus is not None else \
            f"host node {m.to_node}"
        how = "moved" if job is None else f"moving (migration job {job})"
        log_event("rebalance", f"VM {vm.name}: {what} {how} from host node {m.from_node} to {to}, expected "
                  f"gain {m.gain:.2f}: {m.reason}", vm=vm.name, vcpu=vcpu, cpus=cpus, node=m.to_node,
                  from_node=m.from_node, to_node=m.to_node, reason="rebalance", rule=m.rule, job=job)

    def _record(self, vm: Vm, m: balance.Move, subject: str, placement: str, vcpu: int | None) -> None:
        self._manager.decisions.record(explain.Decision(
            vm.name, subject, explain.Kind.REBALANCE, m.rule, placement, m.reason, vcpu=vcpu, node=m.to_node))
