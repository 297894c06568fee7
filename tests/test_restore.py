"""Restore: a saved VM comes back as it was defined, and a restore never rewrites a definition.

A VM without guest NUMA used to come back with 0 bytes (restore refused its
region), and a restore failing half-way rewrote the good definition it had
read.  Checked from outside the Manager: the state file's bytes and the
process's /proc/self/numa_maps.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvmnumad import errors, persist
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from kvmnumad.state import StateStore
from kvmnumad.vm.vcpus import Vcpus


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


# ---------------------------------------------------------------- issue 12 finding 7
# Destroy and create of one name are atomic with respect to the state files: after
# either call returns (or fails), a VM is on the API exactly when its file is on disk,
# and a restart (a second Manager restoring the directory) brings back exactly those.

def _persisted(manager: Manager, store: StateStore) -> None:
    manager.subscribe(persist.Persister(manager, store, {}))


def _restored_names(store: StateStore) -> set[str]:
    again = Manager(cpusets=False)
    try:
        persist.restore(again, store)
        return {vm.name for vm in again.list_vms()}
    finally:
        again.shutdown()


def test_a_destroy_whose_release_fails_removes_the_definition_too(tmp_path: Path, monkeypatch: Any) -> None:
    """A fake fault, because a vCPU thread that will not end cannot be made on purpose:
    Vcpus.close ends every thread as it does, then raises as its join timeout does."""
    store = StateStore(tmp_path)
    manager = Manager(cpusets=False)
    _persisted(manager, store)
    real_close = Vcpus.close

    def failing_close(self: Vcpus) -> None:
        real_close(self)
        raise TimeoutError("vCPU 0 thread did not end within 1.0 s (injected)")

    try:
        manager.create_vm("rel", 1, 4 << 20, CreateOptions(start=True, passes=1))
        assert (tmp_path / "rel.json").is_file()
        monkeypatch.setattr(Vcpus, "close", failing_close)
        with pytest.raises(Exception) as raised:
            manager.destroy_vm("rel")
        monkeypatch.undo()
        on_api = "rel" in {vm.name for vm in manager.list_vms()}
        on_disk = (tmp_path / "rel.json").exists()
        assert on_api == on_disk, f"on the API: {on_api}, state file: {on_disk} ({raised.value!r})"
        assert isinstance(raised.value, errors.KvmnumaError), repr(raised.value)  # typed, not a TimeoutError
    finally:
        manager.shutdown()
    assert _restored_names(store) == set()
    assert _memfd_mappings("rel") == []


def test_a_create_racing_a_destroy_of_its_name_keeps_its_definition(tmp_path: Path, monkeypatch: Any) -> None:
    """The old VM's release is held open (a real one, only slowed) while a create of the
    same name runs on another thread: whatever the order, the VM on the API is the one
    whose definition is on disk."""
    store = StateStore(tmp_path)
    manager = Manager(cpusets=False)
    _persisted(manager, store)
    releasing, created = threading.Event(), threading.Event()
    real_close = Vcpus.close

    def slow_close(self: Vcpus) -> None:
        real_close(self)
        releasing.set()
        created.wait(5)

    outcome: dict[str, BaseException | None] = {}

    def run(key: str, call: Callable[[], object]) -> None:
        try:
            call()
            outcome[key] = None
        except BaseException as e:
            outcome[key] = e

    try:
        manager.create_vm("race", 1, 4 << 20, CreateOptions(start=True, passes=1))
        monkeypatch.setattr(Vcpus, "close", slow_close)
        destroyer = threading.Thread(target=run, args=("destroy", lambda: manager.destroy_vm("race")))
        destroyer.start()
        assert releasing.wait(10)
        monkeypatch.undo()
        creator = threading.Thread(target=run, args=(
            "create", lambda: manager.create_vm("race", 2, 4 << 20, CreateOptions(start=True, passes=1))))
        creator.start()
        creator.join(1)  # done at once (old code), or waiting for the destroy to finish
        created.set()
        destroyer.join(10)
        creator.join(10)
        assert outcome == {"destroy": None, "create": None}, outcome
        vm = manager.get_vm("race")
        assert vm.vcpu_count == 2
        saved = json.loads((tmp_path / "race.json").read_bytes())
        assert saved["vcpus"] == 2, saved
    finally:
        created.set()
        manager.shutdown()
    assert _restored_names(store) == {"race"}


def test_a_destroy_whose_cgroup_stays_busy_still_removes_the_vm_and_its_definition(tmp_path: Path) -> None:
    """A real release failure: a foreign process (sleep) joins the VM's vcpu0 cpuset, so the
    kernel refuses to remove it.  The destroy answers Internal with the VM gone from the
    API and from disk; a create of the name is refused (Busy) while the old cgroup is held,
    leaving nothing, and succeeds once the process is gone."""
    store = StateStore(tmp_path)
    manager = Manager()
    if manager.cpusets is None or manager.cpusets.version != 1:
        manager.shutdown()
        pytest.skip("needs a cgroup v1 cpuset hierarchy (a foreign process cannot join a v2 threaded cgroup)")
    _persisted(manager, store)
    pinned = CreateOptions(policy=Policy.LOCAL_FIRST, start=True, passes=1)  # vCPU 0 gets its cgroup
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        vm = manager.create_vm("held", 1, 4 << 20, pinned)
        assert vm.cpuset is not None
        vcpu0 = vm.cpuset.path / "vcpu0"
        (vcpu0 / "tasks").write_text(str(sleeper.pid))
        with pytest.raises(errors.Internal, match="release failed"):
            manager.destroy_vm("held")
        assert manager.list_vms() == [] and not (tmp_path / "held.json").exists()
        assert vcpu0.is_dir()  # the cgroup the kernel would not remove
        with pytest.raises(errors.Busy):
            manager.create_vm("held", 1, 4 << 20, pinned)
        assert manager.list_vms() == [] and not (tmp_path / "held.json").exists()
        assert _memfd_mappings("held") == []
        sleeper.kill()
        sleeper.wait()
        manager.create_vm("held", 1, 4 << 20, pinned)
        assert (tmp_path / "held.json").is_file()
        manager.destroy_vm("held")
        assert not vcpu0.parent.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        manager.shutdown()


def test_a_change_saved_while_its_vm_is_destroyed_does_not_bring_the_file_back(tmp_path: Path,
                                                                                monkeypatch: Any) -> None:
    """A pin's event reads the VM's definition; the VM is destroyed (file removed) before the
    Persister writes it.  The real definition() is only held back until the destroy is done."""
    store = StateStore(tmp_path)
    manager = Manager(cpusets=False)
    _persisted(manager, store)
    read, destroyed = threading.Event(), threading.Event()
    try:
        vm = manager.create_vm("late", 1, 4 << 20, CreateOptions(start=True, passes=1))
        real_definition = vm.definition

        def held_definition() -> Any:
            d = real_definition()
            read.set()
            destroyed.wait(5)
            return d

        monkeypatch.setattr(vm, "definition", held_definition)
        pinner = threading.Thread(target=vm.set_vcpu_affinity, args=(0, [0]))
        pinner.start()
        assert read.wait(10)
        manager.destroy_vm("late")
        assert not (tmp_path / "late.json").exists()
        destroyed.set()
        pinner.join(10)
        assert not (tmp_path / "late.json").exists()
    finally:
        destroyed.set()
        manager.shutdown()
    assert _restored_names(store) == set()
