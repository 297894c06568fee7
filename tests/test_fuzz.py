"""Fuzzing the bus API with hypothesis against a real kvmnumad process (issue 12, "What to build" 3).

The daemon is ``python -m kvmnumad`` on the module's dbus-daemon (daemon_process),
so /proc/PID/fd is the daemon's alone.  Calls come from a dbus-fast client as root
and, one call in ten, from ``unpriv_user`` (tests/fuzzing/unpriv_proxy.py under
/usr/bin/python3): every method and property of dbus/org.kvmnuma1.*.xml with
valid, boundary and hostile arguments, fds of FIFOs and devices as payload, and
raw calls with a signature that is not the member's own (tests/fuzzing/strategies.py).
After every call, tests/fuzzing/harness.py checks that the daemon answers, that a
refusal is a name the contract allows (never Failed, NoReply, Internal, a
traceback), that a refused call changed nothing (ListVMs, every GetAll, the fd
count) and that each vCPU thread's affinity as the kernel has it is its
VcpuAffinity (taskset itself after the last call of each example and each step).

``VmMachine`` is a RuleBasedStateMachine over create/start/pin/bind/map/stop/destroy
against a model of the VMs, their states and declared affinities.

Reproducible: derandomized, no example database.  ``KVMNUMAD_FUZZ_EXAMPLES``
sets the examples of the stateless test (CI: 400, about 1,500 calls; the state
machine runs a sixth as many programs of 20 steps, about 1,300 calls).  ``make fuzz``
sets 3,000 (over 20,000 calls).  Every run prints its count of calls.
A bug fuzzing found (issue 12) is kept below as a regression test.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from kvmnumad.bus.paths import vm_path
from tests.busfixtures import BusClient, BusDaemon, DaemonProcess, daemon_process, options, start_bus_daemon
from tests.fuzzing import report
from tests.fuzzing import strategies as fs
from tests.fuzzing.harness import Harness, UnprivClient, Violation
from tests.fuzzing.strategies import ERR, METHOD_ERRORS, Call, Host
from tests.sysfixtures import User
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures", "tests.fuzzing.report"]

# hypothesis warns of the repr of strategies holding 70,000-element arrays; they are meant
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

MiB = 1 << 20
EXAMPLES = int(os.environ.get("KVMNUMAD_FUZZ_EXAMPLES") or 400)
MACHINE_EXAMPLES = max(EXAMPLES // 6, 10)
MACHINE_STEPS = 20
MIN_CALLS = 2000 if EXAMPLES >= 400 else 0

SETTINGS: dict[str, Any] = {
    "deadline": None, "derandomize": True, "database": None, "print_blob": False,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
if os.environ.get("KVMNUMAD_FUZZ_SHRINK") == "0":  # a first look at a failure, without minutes of shrinking
    SETTINGS["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]

# VMs every stateless example may call into; put back as they were after each example.
FIXTURES: dict[str, tuple[int, int, dict[str, Variant]]] = {
    "fz-numa": (2, 16 * MiB, options(numa_nodes=1, policy="local-first", start=True, passes=1)),
    "fz-flat": (1, 0, options()),
    "fz-two": (2, 8 * MiB, options(numa_nodes=2, policy="manual")),
}
FIXTURE_PATHS = tuple(vm_path(n) for n in FIXTURES)
VOLATILE = ("VcpuThreads",)  # differs after a re-creation


@dataclass
class Fuzz:
    harness: Harness
    host: Host
    topology: dict[int, set[int]]  # host node -> online CPUs
    default_policy: str
    pristine: dict[str, dict[str, Any]] = field(default_factory=dict)
    ran: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)

    @property
    def client(self) -> BusClient:
        return self.harness.client

    def create_fixture(self, name: str) -> None:
        vcpus, memory, opts = FIXTURES[name]
        (path,) = self.client.manager("CreateVM", "suta{sv}", name, vcpus, memory, opts)
        self.pristine[name] = self._comparable(path)

    def _comparable(self, path: str) -> dict[str, Any]:
        props = self.client.get_all(path, fs.VM_IFACE)
        return {k: v for k, v in props.items() if k not in VOLATILE}

    def reconcile(self) -> None:
        """Back to the fixture VMs as made, nothing else, and the default policy."""
        for name, _state, path in self.client.manager("ListVMs")[0]:
            if name not in FIXTURES or self._comparable(path) != self.pristine.get(name):
                self.client.manager("DestroyVM", "s", name)
        present = {n for n, _s, _p in self.client.manager("ListVMs")[0]}
        for name in FIXTURES:
            if name not in present:
                self.create_fixture(name)
        self.client.ok("org.kvmnuma1", fs.MANAGER_PATH, fs.PROPS_IFACE, "Set", "ssv",
                       [fs.MANAGER_IFACE, "DefaultPolicy", Variant("s", self.default_policy)])
        self.harness.forget()
        self.harness.check(taskset=True)


@pytest.fixture(scope="module")
def daemon(bus_daemon: BusDaemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "config").mkdir()
    args = ("--bus", bus_daemon.address, "--config-dir", str(tmp / "config"))
    with daemon_process("kvmnumad", tmp, *args) as d:
        yield d


@pytest.fixture(scope="module")
def fuzz(daemon: DaemonProcess, unpriv_user: User) -> Iterator[Fuzz]:
    client = BusClient(daemon.address)
    harness = Harness(client, daemon.pid, daemon.log, UnprivClient(unpriv_user, daemon.address))
    mgr = client.get_all(fs.MANAGER_PATH, fs.MANAGER_IFACE)
    topo = {node: set(cpus) for node, cpus, *_ in client.manager("GetTopology")[0]}
    possible = Path("/sys/devices/system/cpu/possible").read_text().strip().split("-")[-1]
    host = Host(cpus=int(possible) + 1, nodes=len(mgr["HostNodes"]), max_vcpus=mgr["MaxVcpus"])
    f = Fuzz(harness, host, topo, mgr["DefaultPolicy"])
    try:
        f.reconcile()
        yield f
    finally:
        elapsed = time.monotonic() - f.started
        top = sorted(harness.refusals.items(), key=lambda kv: -kv[1])
        refused = ", ".join(f"{k.rsplit('.', 1)[-1]} {v}" for k, v in top)
        rate = harness.calls / max(elapsed, 1e-9)
        line = f"fuzz: {harness.calls} calls in {elapsed:.1f} s ({rate:.0f}/s); refusals: {refused}"
        report.LINES.append(line)
        print(line)
        for name, *_ in client.manager("ListVMs")[0]:
            client.manager("DestroyVM", "s", name)
        harness.close()
        client.close()
        if {"stateless", "machine"} <= f.ran:
            assert harness.calls >= MIN_CALLS, line


# ------------------------------------------------------------ every method, every argument kind
@settings(max_examples=EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_every_method_with_valid_boundary_and_hostile_arguments(fuzz: Fuzz, data: st.DataObject) -> None:
    fuzz.ran.add("stateless")
    one = fs.any_call(fuzz.host, tuple(FIXTURES), FIXTURE_PATHS)
    calls = data.draw(st.lists(one, min_size=1, max_size=8))
    try:
        for i, call in enumerate(calls):
            fuzz.harness.send(call, taskset=i == len(calls) - 1)
    finally:
        fuzz.reconcile()


# ------------------------------------------------------------ the state machine
POOL = ("m0", "m1", "m2")
SM_POLICIES = ("manual", "local-first", "load-balanced", "interleave", "preferred")


@dataclass
class VmModel:
    vcpus: int
    numa_nodes: int
    state: str
    node_map: list[int]
    declared: dict[int, set[int]]
    bound: dict[int, int] = field(default_factory=dict)

    def node_errors(self, node: int, host_node: int = 0, host_nodes: int = 1) -> set[str | None]:
        """What naming guest node ``node`` (mapped to ``host_node`` of ``host_nodes``) earns, for
        BindVcpuToNumaNode and MapNumaNode alike: NumaDisabled first, then NodeOutOfRange."""
        if self.numa_nodes == 0:
            return {ERR + "NumaDisabled"}
        if node >= self.numa_nodes or host_node >= host_nodes:
            return {ERR + "NodeOutOfRange"}
        return set()


class VmMachine(RuleBasedStateMachine):
    """create/start/pin/bind/map/stop/destroy (and refused unprivileged calls) against a model."""

    fuzz: Fuzz  # set before the run

    def __init__(self) -> None:
        super().__init__()
        self.vms: dict[str, VmModel] = {}

    @property
    def h(self) -> Harness:
        return self.fuzz.harness

    @initialize()
    def clean(self) -> None:
        for name, *_ in self.fuzz.client.manager("ListVMs")[0]:
            if name in POOL:
                self.fuzz.client.manager("DestroyVM", "s", name)
        self.h.forget()

    def teardown(self) -> None:
        for name in list(self.vms):
            self.fuzz.client.manager("DestroyVM", "s", name)
        self.h.forget()

    def send(self, call: Call, expected: set[str | None]) -> Any:
        out = self.h.send(call, taskset=True)
        if out.error not in expected:
            raise Violation(f"model expected {sorted(map(str, expected))}: {call!r} -> {out}")
        return out

    def cpus_of(self, host_node: int) -> set[int]:
        return self.fuzz.topology[host_node]

    # -- rules
    @rule(name=st.sampled_from(POOL), vcpus=st.integers(1, 3), memory=st.sampled_from([0, 8 * MiB]),
          numa=st.integers(0, 2), policy=st.sampled_from(SM_POLICIES), start=st.booleans())
    def create(self, name: str, vcpus: int, memory: int, numa: int, policy: str,  # noqa: PLR0917
               start: bool) -> None:
        opts = options(numa_nodes=numa, policy=policy, start=start, passes=1)
        call = Call(fs.MANAGER_PATH, fs.MANAGER_IFACE, "CreateVM", "suta{sv}", (name, vcpus, memory, opts),
                    METHOD_ERRORS)
        if name in self.vms:
            self.send(call, {ERR + "AlreadyExists"})
            return
        self.send(call, {None})
        props = self.fuzz.client.get_all(vm_path(name), fs.VM_IFACE)
        self.vms[name] = VmModel(vcpus, numa, "running" if start else "created", list(props["NodeMap"]),
                                 {v: set(c) for v, c in props["DeclaredVcpuAffinity"] if c})  # []: unpinned

    def _vm_call(self, name: str, member: str, sig: str = "", *body: Any) -> Call:
        return Call(vm_path(name), fs.VM_IFACE, member, sig, tuple(body), METHOD_ERRORS)

    @rule(name=st.sampled_from(POOL))
    def start(self, name: str) -> None:
        vm = self.vms.get(name)
        self.send(self._vm_call(name, "Start"), {fs.UNKNOWN_OBJECT} if vm is None else {None})
        if vm is not None:
            vm.state = "running"

    @rule(name=st.sampled_from(POOL))
    def stop(self, name: str) -> None:
        vm = self.vms.get(name)
        self.send(self._vm_call(name, "Stop"), {fs.UNKNOWN_OBJECT} if vm is None else {None})
        if vm is not None and vm.state == "running":
            vm.state = "stopped"

    @rule(name=st.sampled_from(POOL), vcpu=st.integers(0, 3),
          cpus=st.lists(st.integers(0, 2), max_size=3))
    def pin(self, name: str, vcpu: int, cpus: list[int]) -> None:
        vm = self.vms.get(name)
        call = self._vm_call(name, "SetVcpuAffinity", "uau", vcpu, cpus)
        if vm is None:
            self.send(call, {fs.UNKNOWN_OBJECT})
            return
        wrong: set[str | None] = set()
        if vcpu >= vm.vcpus:
            wrong.add(ERR + "NoSuchVcpu")
        if not cpus or len(set(cpus)) != len(cpus) or max(cpus) >= self.fuzz.host.cpus:
            wrong.add(ERR + "InvalidArgument")
        self.send(call, wrong or {None})
        if not wrong:
            vm.declared[vcpu] = set(cpus)
            vm.bound.pop(vcpu, None)

    @rule(name=st.sampled_from(POOL), vcpu=st.integers(0, 3), node=st.integers(0, 2))
    def bind(self, name: str, vcpu: int, node: int) -> None:
        vm = self.vms.get(name)
        call = self._vm_call(name, "BindVcpuToNumaNode", "uu", vcpu, node)
        if vm is None:
            self.send(call, {fs.UNKNOWN_OBJECT})
            return
        wrong = vm.node_errors(node)
        if vcpu >= vm.vcpus:
            wrong.add(ERR + "NoSuchVcpu")
        self.send(call, wrong or {None})
        if not wrong:
            vm.declared[vcpu] = self.cpus_of(vm.node_map[node])
            vm.bound[vcpu] = node

    @rule(name=st.sampled_from(POOL), node=st.integers(0, 2), host_node=st.integers(0, 1))
    def map(self, name: str, node: int, host_node: int) -> None:
        vm = self.vms.get(name)
        call = self._vm_call(name, "MapNumaNode", "uu", node, host_node)
        if vm is None:
            self.send(call, {fs.UNKNOWN_OBJECT})
            return
        wrong = vm.node_errors(node, host_node, self.fuzz.host.nodes)
        self.send(call, wrong or {None})
        if not wrong:
            vm.node_map[node] = host_node
            for v, n in vm.bound.items():
                if n == node:
                    vm.declared[v] = self.cpus_of(host_node)

    @rule(name=st.sampled_from(POOL), via_manager=st.booleans())
    def destroy(self, name: str, via_manager: bool) -> None:
        vm = self.vms.pop(name, None)
        if via_manager:
            call = Call(fs.MANAGER_PATH, fs.MANAGER_IFACE, "DestroyVM", "s", (name,), METHOD_ERRORS)
            self.send(call, {ERR + "NoSuchVM"} if vm is None else {None})
        else:
            self.send(self._vm_call(name, "Destroy"), {fs.UNKNOWN_OBJECT} if vm is None else {None})

    @rule(data=st.data())
    def unprivileged_mutation(self, data: st.DataObject) -> None:
        # drawn from POOL, not from the model: what is drawn must not depend on the daemon's answers
        name = data.draw(st.sampled_from(POOL))
        member, sig, body = data.draw(st.sampled_from([
            ("Start", "", ()), ("Stop", "", ()), ("Destroy", "", ()), ("SetVcpuAffinity", "uau", (0, [0])),
            ("BindVcpuToNumaNode", "uu", (0, 0)), ("MapNumaNode", "uu", (0, 0)), ("EnableNuma", "u", (1,)),
            ("DisableNuma", "", ()), ("SetupNumaMemory", "utt", (0, 4096, 1 << 30))]))
        call = fs.unprivileged(Call(vm_path(name), fs.VM_IFACE, member, sig, body, METHOD_ERRORS))
        self.send(call, {fs.ACCESS_DENIED} if name in self.vms else {fs.UNKNOWN_OBJECT})

    # -- the model against the daemon
    @invariant()
    def matches_the_model(self) -> None:
        snap = self.h.state()
        listed = {n: s for n, s, _p in snap.vms if n in POOL}
        want = {n: vm.state for n, vm in self.vms.items()}
        assert listed == want, f"ListVMs {listed} != model {want}"
        for name, vm in self.vms.items():
            props = snap.props[vm_path(name)]
            assert props["Vcpus"] == vm.vcpus and props["NumaNodes"] == vm.numa_nodes, (name, props)
            assert props["NodeMap"] == vm.node_map, (name, props["NodeMap"], vm.node_map)
            declared = {v: set(c) for v, c in props["DeclaredVcpuAffinity"]}
            effective = {v: set(c) for v, c in props["VcpuAffinity"]}
            for v, cpus in vm.declared.items():
                assert declared.get(v) == cpus, f"{name} vCPU {v}: declared {declared.get(v)} != model {cpus}"
                assert effective.get(v) == cpus, f"{name} vCPU {v}: effective {effective.get(v)} != {cpus}"


def test_state_machine_over_the_vm_lifecycle(fuzz: Fuzz) -> None:
    fuzz.ran.add("machine")
    VmMachine.fuzz = fuzz
    try:
        run_state_machine_as_test(VmMachine, settings=settings(
            max_examples=MACHINE_EXAMPLES, stateful_step_count=MACHINE_STEPS, **SETTINGS))
    finally:
        fuzz.reconcile()


# ------------------------------------------------------------ bugs fuzzing found, kept as regression tests
def test_a_non_ascii_name_does_not_cut_the_packaged_daemon_off_the_bus(tmp_path: Path) -> None:
    """Found by the unprivileged proxy (it runs on Debian's dbus-fast too): its own
    non-ASCII strings got it disconnected.  Fixed by escaping error texts to ASCII
    (bus/errors.py): with 1.84 a reply holding a non-ASCII string is marshalled with
    a wrong length and the bus drops the daemon.  The daemon runs here as the .deb runs it,
    on /usr/bin/python3 and Debian's python3-dbus-fast, not on the .venv's dbus-fast 5.x.
    GetVM needs no authorization and its error quotes the name: InvalidArgument
    must come back and the daemon must stay on the bus."""
    with start_bus_daemon() as bus_daemon:  # its own bus: the fuzzed daemon owns the name on the module's
        _non_ascii_name_on(bus_daemon, tmp_path)


def _non_ascii_name_on(bus_daemon: BusDaemon, tmp_path: Path) -> None:
    address_file, log = tmp_path / "address", tmp_path / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["/usr/bin/python3", "-m", "kvmnumad", "--bus", bus_daemon.address, "--address-file",
             str(address_file), "--log-target", "stderr", "--config-dir", str(tmp_path)],
            cwd=Path(__file__).resolve().parent.parent, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    client = None
    try:
        wait_until(lambda: proc.poll() is not None or address_file.is_file(), "kvmnumad on Debian's python3",
                   timeout=60)
        assert proc.poll() is None, log.read_text()
        client = BusClient(bus_daemon.address)
        ascii_name = client.error("org.kvmnuma1", fs.MANAGER_PATH, fs.MANAGER_IFACE, "GetVM", "s", ["a/b"])
        assert ascii_name[0] == ERR + "InvalidArgument"
        name, text = client.error("org.kvmnuma1", fs.MANAGER_PATH, fs.MANAGER_IFACE, "GetVM", "s", ["\u00e4"],
                                  timeout=10)
        assert name == ERR + "InvalidArgument", (name, text, log.read_text()[-800:])
        time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-800:]
        ping = client.call("org.kvmnuma1", "/", "org.freedesktop.DBus.Peer", "Ping", timeout=10)
        assert ping.error_name is None, ping.error_name
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_recreating_a_destroyed_running_vm_pins_its_vcpus(daemon: DaemonProcess) -> None:
    """Found by VmMachine (create m0 running, destroy, create m0 load-balanced).  Every
    create must succeed: CPUs 0 and 1 are online and nothing else holds them.  It failed
    1 time in 3 (issue 12): KVM's per-VM worker (kvm-nx-lpage-recovery) sits in the cgroup
    of the vCPU that ran first until the VM fd is closed, so removing the cgroup before
    that left vm-eb/vcpuN with the old CPUs, and v1 refused to narrow vm-eb below it."""
    client = BusClient(daemon.address)
    failures: list[str] = []
    try:
        for _ in range(100):  # p(no failure) ~ (8/9)^100, under 1e-5
            client.manager("CreateVM", "suta{sv}", "eb", 2, 8 * MiB,
                           options(numa_nodes=1, policy="local-first", start=True, passes=1))
            client.manager("DestroyVM", "s", "eb")
            reply = client.call("org.kvmnuma1", fs.MANAGER_PATH, fs.MANAGER_IFACE, "CreateVM", "suta{sv}",
                                ["eb", 2, 0, options(policy="load-balanced", passes=1)])
            if reply.error_name is not None:
                failures.append(f"{reply.error_name}: {reply.body[0]}")
            else:
                client.manager("DestroyVM", "s", "eb")
    finally:
        client.close()
    assert not failures, f"{len(failures)} of 100 creates refused, e.g. {failures[0]}"
