"""Adoptions kept across a daemon restart, as a subscriber of the core's events.

An adoption is kept in its own directory (``adopted/`` under the state
directory, in the same atomic files as VM definitions) because it is not a
VM kvmnumad can make: restore re-adopts it, and only when the process is
the one adopted, by pid *and* start time (a pid reused by another process
has another start time).  A record whose process is gone, or that can no
longer be adopted, is dropped and logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmnumad import errors
from kvmnumad.adopt import procfs
from kvmnumad.adopt.discovery import AdoptOptions
from kvmnumad.adopt.vm import AdoptedVm
from kvmnumad.events import Event, VmAdded, VmChanged, VmRemoved
from kvmnumad.manager import Manager
from kvmnumad.model import Policy
from kvmnumad.state import StateStore

log = logging.getLogger(__name__)

SUBDIR = "adopted"


def record_of(vm: AdoptedVm) -> dict[str, Any]:
    node_map, vcpus = vm.placement()
    o = vm.options
    return {
        "name": vm.name, "pid": vm.pid, "start_time": vm.start_time, "vmm": vm.vmm, "owner": vm.owner,
        "policy": str(vm.policy), "qmp": o.qmp,
        "vcpu_nodes": None if o.vcpu_nodes is None else list(o.vcpu_nodes),
        "memory_nodes": None if o.memory_nodes is None else list(o.memory_nodes),
        "node_map": node_map, "vcpus": [list(v) for v in vcpus],
        "auto_balance": vm.auto_balance, "explicit_vcpus": list(vm.explicit_vcpus()),
        "explicit_nodes": sorted(vm.explicit_nodes),
    }


def _restorer(node_map: list[int], vcpus: list[tuple[int, list[int] | None, int | None]],
              explicit_vcpus: list[int], explicit_nodes: list[int]) -> Callable[[AdoptedVm], None]:
    def restore(vm: AdoptedVm) -> None:
        vm.restore_placement(node_map, vcpus)
        vm.restore_explicit(explicit_vcpus, explicit_nodes)

    return restore


class AdoptionRecords:
    def __init__(self, manager: Manager, state_dir: Path) -> None:
        self._manager = manager
        self.store = StateStore(state_dir / SUBDIR)
        self._written: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if isinstance(event, (VmAdded, VmChanged)):
            try:
                vm: object = self._manager.get_vm(event.vm)
            except errors.NoSuchVM:
                return
            if isinstance(vm, AdoptedVm):
                self._save(vm)
        elif isinstance(event, VmRemoved):
            with self._lock:
                if self._written.pop(event.vm, None) is not None:
                    self.store.remove(event.vm)

    def _save(self, vm: AdoptedVm) -> None:
        record = record_of(vm)
        with self._lock:
            if self._written.get(vm.name) == record:
                return
            try:
                self.store.save(vm.name, record)
            except OSError:
                log.exception("could not save the adoption of %s", vm.name)
                return
            self._written[vm.name] = record

    def reattach(self) -> list[str]:
        """Re-adopt every recorded process that is still the one adopted."""
        back = []
        for raw in self.store.load_all():
            name = str(raw.get("name"))
            try:
                pid, began = int(raw["pid"]), int(raw["start_time"])
                try:
                    same = procfs.start_time(pid) == began
                except ProcessLookupError:
                    same = False
                if not same:
                    log.info("adopted VM %s not re-attached: process %d is gone (or its pid was reused)",
                             name, pid)
                    self.store.remove(name)
                    continue
                options = AdoptOptions(
                    name=name, policy=Policy(raw["policy"]), qmp=raw.get("qmp"),
                    vcpu_nodes=None if raw.get("vcpu_nodes") is None else tuple(raw["vcpu_nodes"]),
                    memory_nodes=None if raw.get("memory_nodes") is None else tuple(raw["memory_nodes"]),
                    auto_balance=None if raw.get("auto_balance") is None else bool(raw["auto_balance"]))
                node_map = [int(n) for n in raw["node_map"]]
                vcpus = [(int(i), None if c is None else [int(x) for x in c], None if b is None else int(b))
                         for i, c, b in raw["vcpus"]]
                explicit = ([int(i) for i in raw.get("explicit_vcpus", [])],
                            [int(n) for n in raw.get("explicit_nodes", [])])
                self._manager.adopt_process(pid, options, int(raw["owner"]),
                                            declared=_restorer(node_map, vcpus, *explicit))
                self._written[name] = raw
                back.append(name)
            except (errors.KvmnumaError, KeyError, TypeError, ValueError) as e:
                log.warning("adopted VM %s not re-attached: %s", name, e)
                self.store.remove(name)
        return back
