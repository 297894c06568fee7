"""Restore: a saved VM comes back as it was defined, and a restore never rewrites a definition.

A VM without guest NUMA used to come back with 0 bytes (restore refused its
region), and a restore failing half-way rewrote the good definition it had
read.  Checked from outside the Manager: the state file's bytes and the
process's /proc/self/numa_maps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvmnumad import persist
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions
from kvmnumad.state import StateStore


def _memfd_mappings(name: str) -> list[str]:
    """numa_maps lines of the VM's guest memory (memfd names carry the VM name)."""
    with open(f"/proc/{os.getpid()}/numa_maps") as f:
        return [line for line in f if f"memfd:kvmnumad-{name}-node" in line]


def test_a_vm_without_guest_numa_comes_back_with_its_memory(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first = Manager(cpusets=False)
    first.subscribe(persist.Persister(first, store, {}))
    try:
        first.create_vm("plain", 1, 8 << 20, CreateOptions(start=True, passes=1))
    finally:
        first.shutdown()
    saved = (tmp_path / "plain.json").read_bytes()
    assert json.loads(saved)["regions"][0]["size"] == 8 << 20
    assert _memfd_mappings("plain") == []  # released with the first Manager

    second = Manager(cpusets=False)
    try:
        known = persist.restore(second, store)
        assert set(known) == {"plain"}
        (line,) = _memfd_mappings("plain")
        assert "kvmnumad-plain-node0-slot1" in line, line
        vm = second.get_vm("plain")
        assert str(vm.state) == "running"
    finally:
        second.shutdown()
    assert (tmp_path / "plain.json").read_bytes() == saved  # restore wrote nothing


def test_a_failed_restore_leaves_the_definition_as_it_was(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    definition = {
        "name": "far", "owner": 0, "vcpus": 2, "policy": "manual", "passes": 0, "numa_nodes": 2,
        "node_map": [0, 0], "running": True,
        "regions": [
            {"node": 0, "size": 4 << 20, "gpa": 1 << 20, "policy": 2, "host_nodes": [0]},
            {"node": 1, "size": 4 << 20, "gpa": 5 << 20, "policy": 2, "host_nodes": [63]},  # no such node
        ],
        "vcpu_placement": [{"vcpu": 0, "declared": [0], "bound_node": None}],
    }
    store.save("far", definition)
    saved = (tmp_path / "far.json").read_bytes()
    manager = Manager(cpusets=False)
    try:
        known = persist.restore(manager, store)
        assert set(known) == {"far"} and manager.list_vms() == []
        assert _memfd_mappings("far") == []  # the first region was released again
    finally:
        manager.shutdown()
    assert (tmp_path / "far.json").read_bytes() == saved


def test_a_definition_with_bad_fields_is_moved_aside_and_the_others_restored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save("bad", {"name": "bad", "vcpus": "four", "regions": []})
    store.save("good", {"name": "good", "vcpus": 1, "policy": "manual"})
    manager = Manager(cpusets=False)
    try:
        known = persist.restore(manager, store)
        assert set(known) == {"good"}
        assert [vm.name for vm in manager.list_vms()] == ["good"]
    finally:
        manager.shutdown()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "bad.json" not in names and any(n.startswith("bad.corrupt-") for n in names), names
