"""The optimizer's figures in their D-Bus shape: arrays of structs (lists,
as dbus-fast 1.84 wants them), never maps keyed by number, never text to
parse -- so that busctl --json=short, gdbus and qdbus read every one."""

from __future__ import annotations

from typing import Any

from dbus_fast import Variant

from kvmnumad.bus.paths import vm_path
from kvmnumad.optimizer.balance import Move
from kvmnumad.optimizer.explain import Decision
from kvmnumad.optimizer.model import HostNodeSample, VmSample
from kvmnumad.optimizer.suggest import Suggestion


def residency_rows(s: VmSample) -> list[list[Any]]:
    """Residency a(uuttd): guest node, mapped host node, pages there, pages elsewhere, locality."""
    return [[r.guest_node, r.host_node, r.pages_there, r.pages_elsewhere, float(r.locality)]
            for r in s.residency]


def vcpu_usage_rows(s: VmSample) -> list[list[Any]]:
    """VcpuUsage a(uttiit): vcpu, CPU time ns, run delay ns, CPU, its node, migrations."""
    return [[v.vcpu, v.cpu_time_ns, v.run_delay_ns, v.cpu, v.node, v.migrations] for v in s.vcpus]


def host_node_rows(nodes: tuple[HostNodeSample, ...]) -> list[list[Any]]:
    """HostNodeUsage a(uaudttua(st)): node, online CPUs, busy 0..1, free bytes,
    our VMs' resident pages there, our vCPUs that last ran there, numastat."""
    return [[n.node, sorted(n.online_cpus), float(n.busy), n.mem_free, n.vm_pages, n.vm_vcpus,
             [[k, v] for k, v in sorted(n.numastat.items())]] for n in nodes]


def decision_rows(decisions: list[Decision]) -> list[list[Any]]:
    """GetDecisions a(ssssst): subject, kind, rule, placement, reason, time (µs since the epoch)."""
    return [[d.subject, str(d.kind), d.rule, d.placement, d.reason, int(d.time * 1e6)] for d in decisions]


def action_rows(actions: list[Suggestion]) -> list[list[Any]]:
    """GetSuggestedActions a(sssosavdd): vm, kind, text, object, method, its
    arguments, locality now, locality expected once applied."""
    return [[a.vm, a.kind, a.text(), vm_path(a.vm), a.method, [Variant(sig, v) for sig, v in a.args],
             float(a.locality_now), float(a.locality_expected)] for a in actions]


def move_rows(moves: list[Move]) -> list[list[Any]]:
    """Rebalance/PlanRebalance a(ssuuuds): vm, kind (vcpus, memory), guest node,
    from host node, to host node, expected gain 0..1, reason (rule and numbers)."""
    return [[m.vm, m.kind, m.guest_node, m.from_node, m.to_node, float(m.gain), f"{m.rule}: {m.reason}"]
            for m in moves]
