"""Fixtures for tests that need a real multi-NUMA kernel.

Everything under tests/numa/ is marked ``numa``. Such a test on a one-node
host would prove nothing, and a skip would hide that: it fails and says how to
run it (``python -m tests.numa_guest``). ``-m "not numa"`` deselects them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import observe
from tests.numa_guest import TOPOLOGIES, Topology
from tests.numa_guest.hotplug import CpuHotplug

HERE = Path(__file__).resolve().parent


def _under_here(item: pytest.Item) -> bool:
    return HERE in item.path.resolve().parents


# tryfirst: the marker must be there before -m deselects by it.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's.
    for item in items:
        if _under_here(item):
            item.add_marker(pytest.mark.numa)
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
