"""SIGKILL at the edges of every change's commit, and what the next start finds (issue 12, item 3).

One real daemon after another on one real bus and one state directory: each
scenario arms a crash point (kvmnumad/crashpoints.py: the daemon kills itself
with SIGKILL there), makes the call that passes it, sees the daemon die, and
starts the next daemon.  That one is then checked from outside:

* every file in the state directory parses (no torn definition, nothing moved aside);
* no cgroup is left of the killed process, and the new one has exactly one per VM;
* the new process holds a memfd for each region of its VMs and none else (/proc/PID/fd);
* the VMs are exactly the last committed ones: names, vCPUs, state and declared
  placement over the bus (dbus-fast client), each vCPU thread's affinity by
  taskset, each memory slot in /proc/PID/numa_maps.

The scenarios run in a random order (the seed is printed; KVMNUMAD_CRASH_SEED
repeats one).  MapNumaNode moves memory only between two host nodes: its point
runs where the host has two (the multi-NUMA guests), and is skipped here otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dbus_fast import Message

from kvmnumad.cgroups import vm_dirname
from kvmnumad.crashpoints import ENV, POINTS
from kvmnumad.vm.definition import VmDefinition
from tests.busfixtures import BusClient, BusDaemon, options
from tests.observe import numa_maps_of_slot, online_cpus, taskset_affinity
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures"]

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
# kvmnumad's cpuset tree: cgroup v1 (this host), or v2 at the root (the numa guests)
CPUSET_TOPS = (Path("/sys/fs/cgroup/cpuset/kvmnumad"), Path("/sys/fs/cgroup/kvmnumad"))
MEMFD = re.compile(r"^/memfd:kvmnumad-(.+?)-(?:boot|node\d+-slot\d+) \(deleted\)$")


@dataclass
class Spec:
    """A VM as last committed (what its state file says, and so what a restart must bring back)."""

    vcpus: int
    memory: int
    running: bool = True
    declared: dict[int, set[int]] = field(default_factory=dict)  # vCPU -> CPUs; absent: unpinned
    host_node: int = 0  # where its memory is bound


class Daemons:
    """kvmnumad processes, one at a time, on one bus and one state directory."""

    def __init__(self, bus: BusDaemon, tmp: Path) -> None:
        self.bus = bus
        self.state = tmp / "state"
        self.config = tmp / "config"
        self.config.mkdir()
        self.trigger = tmp / "crash-at"
        self.log = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: BusClient | None = None

    def start(self, *, expect_death: bool = False) -> None:
        address = self.state.parent / "address"
        address.unlink(missing_ok=True)
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvmnumad", "--bus", self.bus.address, "--state-dir", str(self.state),
                 "--config-dir", str(self.config), "--address-file", str(address), "--log-target", "stderr"],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, ENV: str(self.trigger)})
        proc = self.proc
        if expect_death:
            proc.wait(180)
            return
        wait_until(lambda: proc.poll() is not None or address.is_file(), "kvmnumad to serve", timeout=180)
        assert proc.poll() is None, self.log.read_text()[-2000:]
        if self.client is None:
            self.client = BusClient(self.bus.address)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def arm(self, point: str) -> None:
        assert point in POINTS, point
        self.trigger.write_text(point)

    def died_by_sigkill(self) -> None:
        assert self.proc is not None
        assert self.proc.wait(30) == -signal.SIGKILL, self.log.read_text()[-2000:]
        assert not self.trigger.exists()  # the point was reached, and disarmed itself

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        if self.client is not None:
            self.client.close()


@pytest.fixture
def daemons(bus_daemon: BusDaemon, tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(bus_daemon, tmp_path)
    try:
        yield d
    finally:
        d.close()


def _vm_path(client: BusClient, name: str) -> str:
    (path,) = client.manager("GetVM", "s", name)
    return str(path)


def _check(d: Daemons, model: dict[str, Spec], dead_pid: int | None) -> None:
    """What the started daemon holds equals ``model``, seen from outside it."""
    assert d.client is not None
    # state files: each parses, nothing torn or moved aside
    names = sorted(p.name for p in d.state.iterdir())
    assert not [n for n in names if ".corrupt-" in n or n.endswith(".tmp")], names
    for p in d.state.glob("*.json"):
        VmDefinition.from_dict(json.loads(p.read_bytes()))
    assert {p.stem for p in d.state.glob("*.json")} == set(model), names
    # cgroups: none of the killed process, one per VM of the new one
    top = next((t for t in CPUSET_TOPS if (t / str(d.pid)).is_dir()), None)
    assert top is not None or not model, f"no cpuset directory of pid {d.pid} in {CPUSET_TOPS}"
    if top is not None:
        if dead_pid is not None:
            assert not (top / str(dead_pid)).exists(), sorted(os.listdir(top / str(dead_pid)))
        mine = top / str(d.pid)
        assert {c.name for c in mine.iterdir() if c.is_dir()} == {vm_dirname(n) for n in model}
    # the bus: exactly these VMs, as committed; the kernel: their threads and memory
    listed = {name for name, _state, _path in d.client.manager("ListVMs")[0]}
    assert listed == set(model), (listed, set(model))
    memfds: dict[str, int] = {}  # VM -> memfds its daemon holds
    for fd in os.listdir(f"/proc/{d.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            m = MEMFD.match(os.readlink(f"/proc/{d.pid}/fd/{fd}"))
            if m:
                memfds[m.group(1)] = memfds.get(m.group(1), 0) + 1
    expected_memfds: dict[str, int] = {}
    for name, spec in model.items():
        props = d.client.get_all(_vm_path(d.client, name), "org.kvmnuma1.VM")
        assert props["Vcpus"] == spec.vcpus and props["MemoryBytes"] == spec.memory, (name, props)
        assert (props["State"] == "running") == spec.running, (name, props["State"])
        declared = {v: set(c) for v, c in props["DeclaredVcpuAffinity"] if c}
        assert declared == spec.declared, (name, declared, spec.declared)
        for vcpu, tid in props["VcpuThreads"]:
            if vcpu in spec.declared:
                assert taskset_affinity(tid) == spec.declared[vcpu], (name, vcpu)
        for slot, _gpa, size, *_ in props["MemoryRegions"]:
            entry = numa_maps_of_slot(name, slot, d.pid)
            assert entry.policy == f"bind:{spec.host_node}", entry.raw
            assert set(entry.pages_per_node) <= {spec.host_node}, entry.raw
            assert size == spec.memory, (name, props["MemoryRegions"])
        expected_memfds[name] = 1 + len(props["MemoryRegions"])  # the boot slot and each region
    assert memfds == expected_memfds


def _create(client: BusClient, name: str, spec: Spec) -> Message:
    return client.call("org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM", "suta{sv}",
                       [name, spec.vcpus, spec.memory, options(policy="local-first", start=spec.running,
                                                               passes=1)])


def test_a_kill_at_any_point_leaves_what_was_last_committed(daemons: Daemons) -> None:
    d = daemons
    host_cpus = online_cpus()
    pinned = {v: host_cpus for v in range(2)}  # local-first on this host's one node
    model: dict[str, Spec] = {"keep": Spec(1, 8 * MiB, declared={0: host_cpus})}
    d.start()
    assert d.client is not None
    assert _create(d.client, "keep", model["keep"]).error_name is None
    _check(d, model, None)

    def restart() -> None:
        dead = d.pid
        d.died_by_sigkill()
        d.start()
        _check(d, model, dead)

    def create_at(point: str, committed: bool) -> Callable[[int], None]:
        def run(i: int) -> None:
            spec = Spec(2, 8 * MiB, declared=dict(pinned))
            d.arm(point)
            assert d.client is not None
            reply = _create(d.client, f"c{i}", spec)
            assert reply.error_name == "org.freedesktop.DBus.Error.NoReply", reply.error_name
            if committed:
                model[f"c{i}"] = spec
            restart()
        return run

    def destroy_at(point: str, committed: bool) -> Callable[[int], None]:
        def run(i: int) -> None:
            assert d.client is not None
            spec = Spec(1, 8 * MiB, declared={0: host_cpus})
            assert _create(d.client, f"d{i}", spec).error_name is None
            model[f"d{i}"] = spec
            d.arm(point)
            reply = d.client.call("org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "DestroyVM", "s",
                                  [f"d{i}"])
            assert reply.error_name == "org.freedesktop.DBus.Error.NoReply", reply.error_name
            if committed:
                del model[f"d{i}"]
            restart()
        return run

    def pin_at(point: str, committed: bool) -> Callable[[int], None]:
        def run(i: int) -> None:
            assert d.client is not None
            target = {i % len(host_cpus)} if len(host_cpus) > 1 else host_cpus
            if model["keep"].declared[0] == target:
                target = host_cpus
            d.arm(point)
            reply = d.client.call("org.kvmnuma1", _vm_path(d.client, "keep"), "org.kvmnuma1.VM",
                                  "SetVcpuAffinity", "uau", [0, sorted(target)])
            assert reply.error_name == "org.freedesktop.DBus.Error.NoReply", reply.error_name
            if committed:
                model["keep"].declared[0] = target
            restart()
        return run

    def restore_at(i: int) -> None:
        d.arm("restore.restored")
        stopped = d.pid
        d.stop()  # an orderly stop: the definitions stay
        d.start(expect_death=True)  # killed after the first VM is back, before the others
        assert d.proc is not None and d.proc.returncode == -signal.SIGKILL, d.log.read_text()[-2000:]
        dead = d.pid
        d.start()
        _check(d, model, dead)
        assert not any((t / str(stopped)).exists() for t in CPUSET_TOPS)

    scenarios: dict[str, Callable[[int], None]] = {
        "create.planned": create_at("create.planned", False),
        "create.built": create_at("create.built", False),
        "create saved": create_at("persist.saved", True),
        "destroy.unlisted": destroy_at("destroy.unlisted", False),
        "destroy.released": destroy_at("destroy.released", False),
        "destroy removed": destroy_at("persist.removed", True),
        "pin, new file not renamed": pin_at("state.written", False),
        "pin saved": pin_at("persist.saved", True),
        "restore.restored": restore_at,
    }
    seed = int(os.environ.get("KVMNUMAD_CRASH_SEED") or random.randrange(1 << 32))
    order = list(scenarios)
    random.Random(seed).shuffle(order)
    print(f"crash points in the order of seed {seed}: {', '.join(order)}")
    for i, key in enumerate(order):
        try:
            scenarios[key](i)
        except AssertionError as e:
            raise AssertionError(f"scenario {key!r} (seed {seed}, step {i}): {e}") from e
