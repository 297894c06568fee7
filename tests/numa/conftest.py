"""Fixtures for tests that need a real multi-NUMA kernel.

Everything under tests/numa/ is marked ``numa``. Such a test on a one-node
host would prove nothing, and a skip would hide that: it fails and says how to
run it (``python -m tests.numa_guest``). ``-m "not numa"`` deselects them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from tests import observe
from tests.busfixtures import BusDaemon, busctl, start_bus_daemon
from tests.numa_guest import TOPOLOGIES, Topology
from tests.numa_guest.hotplug import CpuHotplug
from tests.sysfixtures import Journal
from tests.waiting import wait_until

HERE = Path(__file__).resolve().parent

# Modules the memory-only-node guest does not run: each proves a feature whose home is
# the 2- and 4-node guests (rule 3; the optimizer's issue names them), and with one CPU
# node memonly would rerun it with less to place, at some 8 min of `make test`.  What
# memonly is for (policies and their admission, MapNumaNode to and from a node without
# CPUs, numa_maps placement, re-pins when the one CPU node loses CPUs) runs there in full.
NOT_ON_MEMONLY = {
    "test_numa_balance.py": "balancing moves vCPUs between CPU nodes; memonly has one",
    "test_numa_hotplug_storm.py": "the storm runs on 2 and 4 nodes; memonly's hotplug test re-pins there",
    "test_numa_adopt.py": "adoption's placement is proven on 2 and 4 nodes",
    "test_numa_handover.py": "the restart handover is proven on 2 and 4 nodes",
    "test_numa_jobs.py": "migration jobs are proven on 2 and 4 nodes (MapNumaNode runs one here)",
    "test_numa_optimizer.py": "the misplaced-VM acceptance is on 2 and 4 nodes",
}


def _under_here(item: pytest.Item) -> bool:
    return HERE in item.path.resolve().parents


# tryfirst: the marker must be there before -m deselects by it.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's.
    memonly = os.environ.get("KVMNUMAD_TOPOLOGY") == "memonly"
    for item in items:
        if _under_here(item):
            item.add_marker(pytest.mark.numa)
            if memonly and (why := NOT_ON_MEMONLY.get(item.path.name)):
                item.add_marker(pytest.mark.skip(reason=f"not on memonly: {why}"))
    # Tests that take a CPU offline run last.  Twice a TCG guest froze whole
    # when nested vCPUs started after a CPU had been offlined and brought back
    # (always in a later test, never in the hotplug test itself): keeping the
    # hotplug tests at the end keeps every other test off that path.
    items.sort(key=lambda item: "cpu_offline" in getattr(item, "fixturenames", ()))


def pytest_runtest_setup(item: pytest.Item) -> None:
    nodes = observe.host_nodes()
    if len(nodes) < 2:
        pytest.fail(
            f"{item.nodeid} needs more than one NUMA node and this machine has {len(nodes)}: "
            "run it in the multi-NUMA guest: python -m tests.numa_guest --topology 2node "
            '(or deselect with -m "not numa")',
            pytrace=False,
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    # the guest does not inherit the host's environment, so a knob is a pytest option
    parser.addoption("--storm-cycles", type=int, default=0,
                     help="offline/online cycles of the hotplug storm "
                          "(default 30; 200: make test-numa-storm)")


@pytest.fixture(scope="session")
def topology_name() -> str | None:
    """Which guest we run in (set by tests/numa_guest); None on a real multi-node host."""
    return os.environ.get("KVMNUMAD_TOPOLOGY") or None


@pytest.fixture(scope="session")
def topology(topology_name: str | None) -> Topology:
    """The shape the launcher asked QEMU for: what the kernel must show."""
    if topology_name is None:
        pytest.skip("KVMNUMAD_TOPOLOGY unset: not in a numa-guest, the expected shape is unknown")
    return TOPOLOGIES[topology_name]


@pytest.fixture
def node_cpus() -> dict[int, set[int]]:
    """Online nodes and their online CPUs now, from sysfs (a memory-only node maps to an empty set)."""
    return {node: observe.node_cpus(node) for node in sorted(observe.host_nodes())}


@pytest.fixture
def cpu_offline() -> Iterator[CpuHotplug]:
    """``with cpu_offline(3): ...``; anything left offline is restored at teardown."""
    hotplug = CpuHotplug()
    try:
        yield hotplug
    finally:
        hotplug.restore()


@contextlib.contextmanager
def daemon_process(address: str, *args: str, stderr: IO[bytes] | int = subprocess.DEVNULL,
                   timeout: float = 180) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m kvmnumad --bus ADDRESS ARGS`` as its own process, returned
    once it owns org.kvmnuma1 (an exit before that fails at once), and stopped
    with SIGTERM (SIGKILL after 60 s) whatever happens."""
    proc = subprocess.Popen([sys.executable, "-m", "kvmnumad", "--bus", address, *args], cwd=HERE.parents[1],
                            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: proc.poll() is not None or "org.kvmnuma1" in busctl(
            address, "list", "--acquired", json_=False, check=False).stdout,
                   "kvmnumad to own org.kvmnuma1", timeout=timeout)
        assert proc.poll() is None, f"kvmnumad exited with {proc.returncode}"
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Daemon:
    address: str
    pid: int
    stderr: Path  # what the daemon wrote outside the journal (a traceback would land here)


@pytest.fixture(scope="session")
def numa_daemon_bus() -> Iterator[BusDaemon]:
    with start_bus_daemon() as bus:
        yield bus


@pytest.fixture(scope="session")
def numa_daemon(numa_daemon_bus: BusDaemon, journald: Journal,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """kvmnumad as its own process, logging to the journal; one for the session,
    because under TCG a daemon start costs a minute or more on a loaded host."""
    stderr = tmp_path_factory.mktemp("daemon") / "kvmnumad.stderr"
    with stderr.open("wb") as err, daemon_process(numa_daemon_bus.address, "--log-target", "journal",
                                                  stderr=err, timeout=300) as proc:
        yield Daemon(numa_daemon_bus.address, proc.pid, stderr)


# The balancer's times in the balancing and adoption tests: issue 14's acceptance counts in
# periods, so the periods are short (test_numa_balance.py says why these).
BALANCE_PERIOD = 1.0
BALANCE_DWELL = 8.0
BALANCE_SAMPLE_INTERVAL = 30.0


@pytest.fixture(scope="session")
def balancing_daemon(journald: Journal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """kvmnumad balancing every BALANCE_PERIOD, on a bus of its own, logging to the journal.

    One for the balancing and the adoption tests: each module had its own, and
    pytest started the adoption module's twice (its CPU-offline test runs last,
    after other modules), at some 30 s a start under TCG."""
    stderr = tmp_path_factory.mktemp("balancing-daemon") / "kvmnumad.stderr"
    with start_bus_daemon() as bus, stderr.open("wb") as err, daemon_process(
            bus.address, "--log-target", "journal", "--log-level", "info",
            "--sample-interval", str(BALANCE_SAMPLE_INTERVAL), "--balance-interval", str(BALANCE_PERIOD),
            "--balance-dwell", str(BALANCE_DWELL), stderr=err, timeout=300) as proc:
        yield Daemon(bus.address, proc.pid, stderr)


JOB_CHUNK_PAGES = 128  # --migration-chunk-pages: 512 chunks for a 256 MiB node, a job long enough to watch


@pytest.fixture(scope="session")
def sampling_daemon() -> Iterator[tuple[int, str]]:
    """kvmnumad sampling every second, its jobs moving small chunks: (pid, address).

    The optimizer and migration-job tests share it (each used to start its own):
    under TCG a daemon start costs some 40 s of the guest's minutes.  Its own bus
    keeps its signals out of the session daemon's tests."""
    with start_bus_daemon() as bus, daemon_process(
            bus.address, "--log-target", "stderr", "--log-level", "warning", "--sample-interval", "1",
            "--migration-chunk-pages", str(JOB_CHUNK_PAGES), timeout=180) as proc:
        yield proc.pid, bus.address
