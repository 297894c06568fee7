"""The acting edge of automatic balancing: measure, ask the pure rules
(optimizer/balance.py), apply the moves, say so.

One pass at a time (a lock), run by the balancing timer off the event loop,
by an event trigger, or by a caller (Manager.rebalance); the dry run
(``plan``) measures and decides the same way and changes nothing.  A pass
measures only the VMs with AutoBalance on, with its own Sampler (so its busy
fractions and vCPU figures cover the interval since the previous pass, and
numa_maps is read every time: pages someone else moved must be seen).  With
no such VM it answers None and the timer sleeps.

Each guest node's moves are applied together (memory first, then vCPUs) and
end in a Rebalanced event per move, a journal entry (``rebalance``) with the
reason, and a decision (``kvmnumactl explain``).  A guest node whose move
fails is logged and left for the next pass; the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from kvmnumad import cpulist, errors
from kvmnumad.events import Rebalanced
from kvmnumad.journal import log_event
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.optimizer import balance, explain
from kvmnumad.optimizer.model import Sample
from kvmnumad.optimizer.sample import Sampler

if TYPE_CHECKING:
    from kvmnumad.manager import Manager
    from kvmnumad.vm import Vm

log = logging.getLogger(__name__)


class _Seen(NamedTuple):
    at: float  # time.monotonic()
    cpu_ns: int
    delay_ns: int


def move_memory(vm: Vm, guest_node: int, host_node: int) -> None:
    """The one place the balancer moves memory.  Today the synchronous path
    MapNumaNode has taken (mbind MPOL_MF_MOVE); the migration job replaces it here."""
    vm.map_numa_node(guest_node, host_node, explicit=False)


class Rebalancer:
    def __init__(self, manager: Manager, thresholds: balance.Thresholds | None = None) -> None:
        self._manager = manager
        self.thresholds = thresholds or balance.Thresholds()
        self._lock = threading.Lock()
        self._sampler = Sampler(residency_every=1)
        self._seen: dict[int, _Seen] = {}
        self._measured_at: float | None = None
        self._last_moved: dict[tuple[str, int], float] = {}  # (vm, guest node) -> time.monotonic()
        self.passes = 0

    def balanced(self) -> list[Vm]:
        return [vm for vm in self._manager.list_vms()
                if getattr(vm, "auto_balance", False) and not getattr(vm, "adopted", False)]

    def forget(self, vm: str) -> None:
        with self._lock:
            for key in [k for k in self._last_moved if k[0] == vm]:
                del self._last_moved[key]

    def run(self) -> list[balance.Move] | None:
        """One pass; None when no VM has AutoBalance on (the timer then sleeps)."""
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
            now = time.monotonic()
            moves = balance.plan(facts, load, topo, now=now, last_moved=self._last_moved,
                                 thresholds=self.thresholds)
            if not apply:
                return moves
            done: list[balance.Move] = []
            groups: dict[tuple[str, int], list[balance.Move]] = {}
            for m in moves:
                groups.setdefault((m.vm, m.guest_node), []).append(m)
            for (name, g), group in groups.items():
                try:
                    self._apply(by_name[name], g, group)
                except errors.KvmnumaError as e:
                    log.warning("rebalance of VM %s guest node %d not made: %s", name, g, e)
                    continue
                except OSError as e:
                    log.warning("rebalance of VM %s guest node %d failed: %s", name, g, e)
                    continue
                # From the move's end: a copy under load can take seconds, and the
                # dwell is the time the guest node stays where it arrived.
                self._last_moved[(name, g)] = time.monotonic()
                done.extend(group)
            return done

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

    def _apply(self, vm: Vm, g: int, moves: Sequence[balance.Move]) -> None:
        for m in sorted(moves, key=lambda m: m.kind != balance.MEMORY):  # memory first: the vCPUs bind to it
            if m.kind == balance.MEMORY:
                move_memory(vm, g, m.to_node)
                self._record(vm, m, explain.node_subject(g), f"host node {m.to_node}", None)
                self._log(vm, m, f"memory of guest node {g}", None, None)
            else:
                topo = self._manager.topology()
                cpus = vm.numa.host_cpus(g, topo)
                explicit = set(vm.explicit_vcpus())
                for index in [i for i, _tid in vm.vcpu_threads()
                              if vm.guest_node_of_vcpu(i) == g and i not in explicit]:
                    vm.apply_declared(index, cpus, g)
                    self._record(vm, m, explain.vcpu_subject(index), f"CPUs {cpulist.describe(cpus)}", index)
                    self._log(vm, m, f"vCPU {index} of guest node {g}", index, cpus)
            self._manager.emit_event(Rebalanced(vm.name, m.kind, g, m.from_node, m.to_node, m.gain, m.reason))

    @staticmethod
    def _log(vm: Vm, m: balance.Move, what: str, vcpu: int | None, cpus: frozenset[int] | None) -> None:
        """One journal entry per moved thing: a guest node's memory, or one vCPU (KVMNUMA_VCPU)."""
        to = f"CPUs {cpulist.describe(cpus)} of host node {m.to_node}" if cpus is not None else \
            f"host node {m.to_node}"
        log_event("rebalance", f"VM {vm.name}: {what} moved from host node {m.from_node} to {to}, expected "
                  f"gain {m.gain:.2f}: {m.reason}", vm=vm.name, vcpu=vcpu, cpus=cpus, node=m.to_node,
                  from_node=m.from_node, to_node=m.to_node, reason="rebalance", rule=m.rule)

    def _record(self, vm: Vm, m: balance.Move, subject: str, placement: str, vcpu: int | None) -> None:
        self._manager.decisions.record(explain.Decision(
            vm.name, subject, explain.Kind.REBALANCE, m.rule, placement, m.reason, vcpu=vcpu, node=m.to_node))
