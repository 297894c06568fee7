"""Automatic balancing on the bus, on this one-node host (the moves themselves
need several host nodes: tests/numa/test_numa_balance.py).  AutoBalance's
default per policy, its write (PropertiesChanged, the state file, a restart),
refusals that change nothing, and Rebalance/PlanRebalance's typed replies as
busctl --json=short prints them.  Observers: busctl, the bus's signals, the
state file's bytes."""

from __future__ import annotations

import json
import os
import time
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
    daemon_process,
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


def _daemon_cpu_s(pid: int, skip: set[int]) -> float:
    """CPU seconds of the daemon (ended threads included) less its vCPU threads', from /proc."""

    def ticks(stat: Path) -> int:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)

    total = ticks(Path(f"/proc/{pid}/stat")) - sum(ticks(Path(f"/proc/{pid}/task/{t}/stat")) for t in skip)
    return total / os.sysconf("SC_CLK_TCK")


def test_no_balancing_work_while_no_vm_has_auto_balance_on(tmp_path: Path) -> None:
    """A pass every 50 ms would cost the daemon far more than 0.1 s of CPU in 4 s;
    with AutoBalance off on its only VM the balancing timer sleeps: nothing runs."""
    (tmp_path / "config").mkdir()
    with daemon_process("kvmnumad", tmp_path, "--bus", "private", "--config-dir", str(tmp_path / "config"),
                        "--sample-interval", "3600", "--balance-interval", "0.05") as d:
        path = busctl(d.address, "call", BUS, MANAGER_PATH, MANAGER_IFACE, "CreateVMSimple", "sutusb", "idle",
                      "1", str(2 * MiB), "1", "manual", "true")["data"][0]
        vcpus = {tid for _v, tid in busctl(d.address, "get-property", BUS, path, VM_IFACE,
                                            "VcpuThreads")["data"]}
        time.sleep(1)
        before = _daemon_cpu_s(d.pid, vcpus)
        time.sleep(4)
        idle = _daemon_cpu_s(d.pid, vcpus) - before
        busctl(d.address, "set-property", BUS, path, VM_IFACE, "AutoBalance", "b", "true")
        before = _daemon_cpu_s(d.pid, vcpus)
        time.sleep(4)
        balancing = _daemon_cpu_s(d.pid, vcpus) - before
    print(f"daemon CPU over 4 s: {idle:.2f} s with AutoBalance off, {balancing:.2f} s on (20 passes/s)")
    assert idle <= 0.1
    assert balancing > idle  # the figure above can see the timer's work


def test_balance_options_from_the_command_line_and_the_config_file(tmp_path: Path) -> None:
    from kvmnumad.daemon import apply_config_file, parse_args  # noqa: PLC0415 -- the daemon's own parser

    args = parse_args(["--config-dir", str(tmp_path)])
    apply_config_file(args)
    assert (args.balance_interval, args.balance_dwell) == (10.0, 60.0)
    (tmp_path / "kvmnumad.conf").write_text("[kvmnumad]\nbalance-interval = 3\nbalance-dwell = 30\n")
    args = parse_args(["--config-dir", str(tmp_path)])
    apply_config_file(args)
    assert (args.balance_interval, args.balance_dwell) == (3.0, 30.0)
    args = parse_args(["--config-dir", str(tmp_path), "--balance-interval", "2"])
    apply_config_file(args)
    assert (args.balance_interval, args.balance_dwell) == (2.0, 30.0)  # the command line wins
    for bad in ("balance-interval = 0", "balance-interval = soon", "balance-dwell = -1"):
        (tmp_path / "kvmnumad.conf").write_text(f"[kvmnumad]\n{bad}\n")
        with pytest.raises(SystemExit):
            apply_config_file(parse_args(["--config-dir", str(tmp_path)]))
