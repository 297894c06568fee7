"""Why each placement is what it is: one recorded decision per placed thing.

A decision names what was placed (a vCPU, a guest node's memory), where it
went, the rule that chose it and the numbers behind it, e.g. "host node 1:
3.2 GiB free >= 1.0 GiB needed; pressure 0.50 < node 0's 0.93".  The log
keeps the *current* decision of every subject of every VM (a later decision
on the same subject replaces the earlier one), so what it holds is bounded
by the VMs' vCPUs and guest nodes, and every pin and binding in force can
be explained.  Each decision is also logged to the journal (MESSAGE_ID of
``decision``, KVMNUMA_RULE and the usual KVMNUMA_* fields).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

from kvmnumad.journal import log_event


class Kind(enum.StrEnum):
    """What made the decision."""

    POLICY = "policy"  # the VM's placement policy, at creation
    RESTORE = "restore"  # the saved declared placement, after a daemon restart
    CALLER = "caller"  # a caller's pin, binding or map
    HOTPLUG = "hotplug"  # a re-pin after CPUs went or came
    REBALANCE = "rebalance"  # the optimizer moved it


@dataclass(frozen=True)
class Decision:
    vm: str
    subject: str  # "vcpu 3", "guest node 1"
    kind: Kind
    rule: str  # the rule that chose it: "local-first", "caller", "hotplug-nearest-node", ...
    placement: str  # where it went: "CPUs 2-3", "host node 1"
    reason: str  # the numbers behind it
    time: float = 0.0  # time.time() of the decision
    vcpu: int | None = None
    node: int | None = None  # host node it went to, if one

    def text(self) -> str:
        return f"{self.subject} -> {self.placement}: {self.rule} ({self.kind}): {self.reason}"


def vcpu_subject(vcpu: int) -> str:
    return f"vcpu {vcpu}"


def node_subject(guest_node: int) -> str:
    return f"guest node {guest_node}"


class DecisionLog:
    """Thread-safe; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, dict[str, Decision]] = {}

    def record(self, d: Decision) -> Decision:
        if not d.time:
            d = Decision(d.vm, d.subject, d.kind, d.rule, d.placement, d.reason, time.time(), d.vcpu, d.node)
        with self._lock:
            self._current.setdefault(d.vm, {})[d.subject] = d
        log_event("decision", f"VM {d.vm} {d.text()}", vm=d.vm, vcpu=d.vcpu, node=d.node, reason=str(d.kind),
                  rule=d.rule)
        return d

    def of_vm(self, vm: str) -> list[Decision]:
        """Guest nodes first, then vCPUs, each by number."""
        with self._lock:
            decisions = list(self._current.get(vm, {}).values())
        return sorted(decisions, key=_order)

    def forget(self, vm: str) -> None:
        with self._lock:
            self._current.pop(vm, None)


def _order(d: Decision) -> tuple[int, int, str]:
    kind, _, number = d.subject.rpartition(" ")
    return (0 if kind == "guest node" else 1, int(number) if number.isdigit() else 0, d.subject)
