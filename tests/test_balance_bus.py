"""Automatic balancing on the bus, on this one-node host (the moves themselves
need several host nodes: tests/numa/test_numa_balance.py).  AutoBalance's
default per policy, its write (PropertiesChanged, the state file, a restart),
refusals that change nothing, and Rebalance/PlanRebalance's typed replies as
busctl --json=short prints them.  Observers: busctl, the bus's signals, the
state file's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dbus_fast import Variant

from kvmnumad import persist
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from kvmnumad.state import StateStore
from tests.busfixtures import (
    MANAGER_IFACE,
    MANAGER_PATH,
    PROPS_IFACE,
    VM_IFACE,
    BusClient,
    MiB,
    RunningService,
    busctl,
    options,
)
from tests.sysfixtures import User

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]
BUS = "org.kvmnuma1"


def auto(address: str, path: str) -> bool:
    value: bool = busctl(address, "get-property", BUS, path, VM_IFACE, "AutoBalance")["data"]
    return value


@pytest.mark.parametrize(("policy", "default"), [("local-first", True), ("load-balanced", True),
                                                 ("manual", False), ("interleave", False)])
def test_auto_balance_defaults_by_policy(service: RunningService, client: BusClient, policy: str,
                                         default: bool) -> None:
    (path,) = client.manager("CreateVM", "suta{sv}", "b", 1, 2 * MiB, options(numa_nodes=1, policy=policy))
    assert auto(service.address, path) is default


def test_auto_balance_write_is_published_and_refusals_change_nothing(
        service: RunningService, client: BusClient, unpriv_user: User) -> None:
    a = service.address
    (path,) = client.manager("CreateVM", "suta{sv}", "w", 1, 2 * MiB, options(numa_nodes=1, policy="manual"))
    busctl(a, "set-property", BUS, path, VM_IFACE, "AutoBalance", "b", "true")
    msg = client.wait_signal(lambda m: m.path == path and m.member == "PropertiesChanged"
                             and "AutoBalance" in m.body[1])
    assert msg.body[1]["AutoBalance"].value is True and list(msg.body[1]) == ["AutoBalance"]
    assert auto(a, path) is True
    # wrong type, wrong user: typed refusals, nothing changed
    name, _ = client.error(BUS, path, PROPS_IFACE, "Set", "ssv",
                           [VM_IFACE, "AutoBalance", Variant("s", "no")])
    assert name == "org.kvmnuma1.Error.InvalidArgument"
    out = busctl(a, "set-property", BUS, path, VM_IFACE, "AutoBalance", "b", "false", user=unpriv_user.name,
                 check=False)
    assert out.returncode != 0 and "Access denied" in out.stderr
    out = busctl(a, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "Rebalance", user=unpriv_user.name, check=False)
    assert out.returncode != 0 and "Access denied" in out.stderr
    assert auto(a, path) is True
    # the same value again: no signal
    before = len(client.signals)
    busctl(a, "set-property", BUS, path, VM_IFACE, "AutoBalance", "b", "true")
    busctl(a, "get-property", BUS, path, VM_IFACE, "AutoBalance")  # a round trip after the write
    assert not [m for m in client.signals[before:] if m.member == "PropertiesChanged" and m.path == path]


def test_rebalance_and_its_dry_run_render_typed(service: RunningService, client: BusClient) -> None:
    """One host node: nothing to move, and the replies are typed arrays busctl prints."""
    a = service.address
    client.manager("CreateVM", "suta{sv}", "r", 2, 4 * MiB, options(numa_nodes=1, policy="local-first",
                                                                    start=True))
    for method in ("PlanRebalance", "Rebalance"):
        out = busctl(a, "call", BUS, MANAGER_PATH, MANAGER_IFACE, method)
        assert out == {"type": "a(ssuuuds)", "data": [[]]}


def test_clear_explicit_placement_refuses_what_does_not_exist(service: RunningService,
                                                              client: BusClient) -> None:
    (path,) = client.manager("CreateVM", "suta{sv}", "c", 2, 2 * MiB, options(numa_nodes=1))
    name, _ = client.error(BUS, path, VM_IFACE, "ClearExplicitPlacement", "auau", [[0, 7], []])
    assert name == "org.kvmnuma1.Error.NoSuchVcpu"
    name, _ = client.error(BUS, path, VM_IFACE, "ClearExplicitPlacement", "auau", [[], [3]])
    assert name == "org.kvmnuma1.Error.NodeOutOfRange"
    client.vm(path, "SetVcpuAffinity", "uau", 0, [0])
    client.vm(path, "ClearExplicitPlacement", "auau", [0], [0])


def test_auto_balance_and_explicit_pins_survive_a_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first = Manager(cpusets=False)
    first.subscribe(persist.Persister(first, store, {}))
    try:
        vm = first.create_vm("keep", 2, 4 * MiB, CreateOptions(numa_nodes=1, policy=Policy.LOCAL_FIRST))
        vm.set_vcpu_affinity(1, [0])
        first.set_auto_balance("keep", False)
    finally:
        first.shutdown()
    saved = json.loads((tmp_path / "keep.json").read_bytes())
    assert (saved["auto_balance"], saved["explicit_vcpus"], saved["explicit_nodes"]) == (False, [1], [])
    second = Manager(cpusets=False)
    try:
        persist.restore(second, store)
        vm = second.get_vm("keep")
        assert (vm.auto_balance, vm.explicit_vcpus()) == (False, (1,))
    finally:
        second.shutdown()
    # a definition from before balancing existed: the policy's default
    del saved["auto_balance"], saved["explicit_vcpus"], saved["explicit_nodes"]
    (tmp_path / "keep.json").write_text(json.dumps(saved))
    third = Manager(cpusets=False)
    try:
        persist.restore(third, store)
        assert third.get_vm("keep").auto_balance is True
    finally:
        third.shutdown()
