"""What automatic balancing may move of a VM: AutoBalance, and what a caller
made explicit (a pin, a bind, a map), which rebalance.py never changes.

One home for a VM of kvmnumad's own (vm.Vm) and an adopted one
(adopt/vm.py): the balancer's contract is the same for both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from kvmnumad.events import Aspect, Event, VmChanged
from kvmnumad.vm.numa import GuestNuma


class FlaggedVcpu(Protocol):
    index: int
    explicit: bool


class ExplicitPlacement:
    """Mixed into Vm and AdoptedVm, which provide these parts; it also holds
    what else the two do alike (their change events, their guest NUMA read)."""

    name: str
    auto_balance: bool
    explicit_nodes: set[int]  # guest nodes a caller mapped
    numa: GuestNuma
    _lock: threading.RLock
    _emit: Callable[[Event], None]

    def _alive(self) -> None:
        raise NotImplementedError

    def publish(self, emit: Callable[[Event], None]) -> None:
        """From now on changes are public (a VM under construction is not)."""
        self._emit = emit

    def _changed(self, *aspects: Aspect) -> None:
        self._emit(VmChanged(self.name, frozenset(aspects)))

    @property
    def numa_enabled(self) -> bool:
        return self.numa.enabled

    @property
    def numa_nodes(self) -> int:
        return self.numa.nodes

    @property
    def node_map(self) -> list[int]:
        with self._lock:
            return list(self.numa.node_map)

    def _vcpu_list(self) -> Iterable[FlaggedVcpu]:
        raise NotImplementedError

    def _vcpu_at(self, index: int) -> FlaggedVcpu:
        """The vCPU, else NoSuchVcpu."""
        raise NotImplementedError

    def explicit_vcpus(self) -> tuple[int, ...]:
        return tuple(v.index for v in self._vcpu_list() if v.explicit)

    def set_auto_balance(self, on: bool) -> bool:
        """True if it changed."""
        with self._lock:
            self._alive()
            if self.auto_balance == on:
                return False
            self.auto_balance = on
        self._changed(Aspect.BALANCING)
        return True

    def clear_explicit(self, vcpus: Sequence[int], nodes: Sequence[int]) -> None:
        """Hand these vCPUs and guest nodes back to the policy and the balancer:
        they stay where they are until a balancing pass finds a reason to move them."""
        with self._lock:
            self._alive()
            chosen = [self._vcpu_at(i) for i in vcpus]  # NoSuchVcpu before anything changes
            for n in nodes:
                self.numa.require(n)
            changed = any(v.explicit for v in chosen) or bool(self.explicit_nodes & set(nodes))
            for v in chosen:
                v.explicit = False
            self.explicit_nodes -= set(nodes)
        if changed:
            self._changed(Aspect.BALANCING)

    def restore_explicit(self, vcpus: Sequence[int], nodes: Sequence[int]) -> None:
        """The explicit placements a saved definition or adoption record names (restore)."""
        wanted = set(vcpus)
        with self._lock:
            for v in self._vcpu_list():
                if v.index in wanted:
                    v.explicit = True
            self.explicit_nodes |= {n for n in nodes if 0 <= n < self.numa.nodes}
