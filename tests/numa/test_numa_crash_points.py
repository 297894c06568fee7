"""SIGKILL in the middle of MapNumaNode, on a real multi-node kernel (issue 12, item 3).

The host's crash points (tests/test_crash_points.py) with the one change that
needs two host nodes: a guest node's memory has moved to the other host node
when the daemon is killed.  Before its definition is saved (migrate.moved) the
next daemon brings the VM back on the old node; after (persist.saved), on the
new one.  Both checked from outside as on the host: numa_maps binding and pages,
taskset of the bound vCPU, the state files, cgroups and memfds.  Run in the
2-node guest only: three daemon starts under TCG took 150 s there (load 15).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.busfixtures import options, start_bus_daemon
from tests.observe import host_nodes, node_cpus
from tests.test_crash_points import Daemons, Spec, _check, _vm_path

pytestmark = pytest.mark.numa

MiB = 1 << 20


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    with start_bus_daemon() as bus:
        d = Daemons(bus, tmp_path)
        try:
            yield d
        finally:
            d.close()


def test_a_kill_during_map_numa_node_leaves_the_last_committed_node(daemons: Daemons,
                                                                   topology_name: str | None) -> None:
    if topology_name not in (None, "2node"):
        # three daemon starts under TCG: 150 s in a loaded 2-node guest; once is enough
        pytest.skip("MapNumaNode's crash points run in the 2-node guest (and on a real multi-node host)")
    d = daemons
    d.start()
    assert d.client is not None
    spec = Spec(1, 8 * MiB)
    reply = d.client.call("org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM", "suta{sv}",
                          ["mig", 1, 8 * MiB, options(numa_nodes=1, policy="local-first", start=True,
                                                      passes=1)])
    assert reply.error_name is None, reply.body
    props = d.client.get_all(_vm_path(d.client, "mig"), "org.kvmnuma1.VM")
    (spec.host_node,) = props["NodeMap"]
    spec.declared = {0: node_cpus(spec.host_node)}
    model = {"mig": spec}
    _check(d, model, None)
    with_cpus = [n for n in sorted(host_nodes()) if node_cpus(n)]  # a bound vCPU follows to the node's CPUs
    assert len(with_cpus) > 1, with_cpus

    for point, committed in (("migrate.moved", False), ("persist.saved", True)):
        target = next(n for n in with_cpus if n != spec.host_node)
        d.arm(point)
        vm = _vm_path(d.client, "mig")
        reply = d.client.call("org.kvmnuma1", vm, "org.kvmnuma1.VM", "MapNumaNode", "uu", [0, target])
        assert reply.error_name == "org.freedesktop.DBus.Error.NoReply", (point, reply.error_name, reply.body)
        if committed:
            spec.host_node, spec.declared = target, {0: node_cpus(target)}
        dead = d.pid
        d.died_by_sigkill()
        d.start()
        _check(d, model, dead)
        props = d.client.get_all(_vm_path(d.client, "mig"), "org.kvmnuma1.VM")
        assert list(props["NodeMap"]) == [spec.host_node], (point, props["NodeMap"])

