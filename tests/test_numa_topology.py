"""Host topology: kvmnumad.numa.topology against numactl -H, lscpu, libnuma and psutil.

The real machine has one node; the shapes it cannot have (offline CPUs,
memory-only nodes, no NUMA in the kernel) are checked twice: here on a copy
of this host's own sysfs files edited into that shape (a fake, because the
host's CPUs must not go offline), and for real in tests/numa/ inside the
multi-NUMA guest.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from kvmnumad.errors import InvalidArgument, NodeOutOfRange, NumaDisabled
from kvmnumad.numa import libnuma
from kvmnumad.numa.topology import (
    UNKNOWN,
    HostTopology,
    format_cpulist,
    parse_cpulist,
    read_topology,
    synthetic,
)
from tests import observe

MiB = 1 << 20


@dataclass
class NumactlHardware:
    """What ``numactl -H`` prints: cpus, size and free (MB) per node, the distance table."""

    cpus: dict[int, set[int]] = field(default_factory=dict)
    size_mb: dict[int, int] = field(default_factory=dict)
    free_mb: dict[int, int] = field(default_factory=dict)
    distances: dict[int, dict[int, int]] = field(default_factory=dict)


def numactl_hardware() -> NumactlHardware:
    out = subprocess.run(["numactl", "-H"], check=True, capture_output=True, text=True).stdout
    hw = NumactlHardware()
    header: list[int] = []
    for line in map(str.rstrip, out.splitlines()):
        if m := re.match(r"node (\d+) cpus:(.*)$", line):
            hw.cpus[int(m.group(1))] = {int(c) for c in m.group(2).split()}
        elif m := re.match(r"node (\d+) size: (\d+) MB", line):
            hw.size_mb[int(m.group(1))] = int(m.group(2))
        elif m := re.match(r"node (\d+) free: (\d+) MB", line):
            hw.free_mb[int(m.group(1))] = int(m.group(2))
        elif m := re.match(r"node\s+((?:\d+\s*)+)$", line):
            header = [int(x) for x in m.group(1).split()]
        elif header and (m := re.match(r"\s*(\d+):((?:\s+\d+)+)$", line)):
            hw.distances[int(m.group(1))] = dict(zip(header, map(int, m.group(2).split()), strict=True))
    return hw


def lscpu_rows() -> list[dict[str, str]]:
    out = subprocess.run(
        ["lscpu", "-p=CPU,Core,Socket,Node,Online", "-a"], check=True, capture_output=True, text=True
    ).stdout
    keys = ["cpu", "core", "socket", "node", "online"]
    return [dict(zip(keys, line.split(","), strict=True)) for line in out.splitlines() if line[0] != "#"]


def groups(mapping: dict[int, object]) -> set[frozenset[int]]:
    """The partition of CPUs a labelling induces (lscpu numbers cores logically, sysfs physically)."""
    by_label: dict[object, set[int]] = {}
    for cpu, label in mapping.items():
        by_label.setdefault(label, set()).add(cpu)
    return {frozenset(s) for s in by_label.values()}


def check_against_numactl(topo: HostTopology) -> None:
    """Nodes, CPUs, distances as numactl -H shows them; sizes too when there are
    several nodes (with one, read_topology takes the system figures of psutil)."""
    hw = numactl_hardware()
    assert set(hw.cpus) == set(topo.node_ids())
    for node in topo.nodes.values():
        assert hw.cpus[node.id] == node.online_cpus, node.id
        if len(topo.nodes) > 1:
            assert hw.size_mb[node.id] == node.mem_total // MiB, node.id
            assert abs(hw.free_mb[node.id] - node.mem_free // MiB) < 64, node.id  # free memory moves
        assert hw.distances[node.id] == node.distances


def test_matches_numactl() -> None:
    check_against_numactl(read_topology())


def test_matches_lscpu() -> None:
    topo = read_topology()
    rows = lscpu_rows()
    assert {int(r["cpu"]) for r in rows} == set(topo.cpus)
    online = [r for r in rows if r["online"] == "Y"]
    assert {int(r["cpu"]) for r in online} == topo.online_cpus() == observe.online_cpus()
    siblings = {topo.cpus[int(r["cpu"])].siblings for r in online}
    assert groups({int(r["cpu"]): r["core"] for r in online}) == siblings
    assert groups({int(r["cpu"]): r["socket"] for r in online}) == groups(
        {int(r["cpu"]): topo.cpus[int(r["cpu"])].package for r in online}
    )
    assert all(topo.node_of_cpu(int(r["cpu"])) == int(r["node"]) for r in online)


def test_matches_libnuma_and_psutil() -> None:
    topo = read_topology()
    assert libnuma.available()
    assert libnuma.max_node() == max(topo.node_ids())
    for cpu in topo.online_cpus():
        assert libnuma.node_of_cpu(cpu) == topo.node_of_cpu(cpu)
    for a in topo.node_ids():
        if len(topo.nodes) > 1:
            assert libnuma.node_size64(a)[0] == topo.nodes[a].mem_total
        for b in topo.node_ids():
            assert libnuma.distance(a, b) == topo.distance(a, b)
    assert len(topo.online_cpus()) == psutil.cpu_count()
    total = sum(n.mem_total for n in topo.nodes.values())
    assert abs(total - psutil.virtual_memory().total) < total // 100


def test_queries_and_typed_errors() -> None:
    topo = read_topology()
    assert topo.node_ids() == sorted(observe.host_nodes())
    for node in topo.node_ids():
        assert topo.cpus_of_node(node) == observe.node_cpus(node)
        assert topo.nearest_nodes(node)[0] == node
    assert topo.smt_siblings(0) >= {0}
    with pytest.raises(NodeOutOfRange, match="host node 77"):
        topo.cpus_of_node(77)
    with pytest.raises(InvalidArgument, match="host CPU 4096"):
        topo.node_of_cpu(4096)


def test_libnuma_errors() -> None:
    with pytest.raises(OSError) as exc:
        libnuma.node_of_cpu(100_000)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        libnuma.distance(0, 999)
    with pytest.raises(OSError):
        libnuma.node_size64(999)


def test_libnuma_missing_is_a_clear_error() -> None:
    with pytest.raises(libnuma.LibnumaMissing, match=r"libnuma-none\.so\.7") as exc:
        libnuma.load("libnuma-none.so.7")
    assert isinstance(exc.value, NumaDisabled)


def test_libnuma_calls_release_the_gil() -> None:
    """CDLL (not PyDLL) functions drop the GIL around the call."""
    func = libnuma.lib().move_pages
    assert not func._flags_ & 2  # ctypes._FUNCFLAG_PYTHONAPI (PyDLL keeps the GIL)
    assert func._flags_ & 8  # ctypes._FUNCFLAG_USE_ERRNO


def test_cpulist_round_trip() -> None:
    for text in ["0", "0-3", "0-1,4,6-7", ""]:
        assert format_cpulist(parse_cpulist(text)) == text
    assert parse_cpulist("0-2,5\n") == observe.parse_cpulist("0-2,5\n")


# --- Shapes this host cannot take: a copy of its sysfs, edited (a fake, see the module docstring) ---

def copy_sysfs(dst: Path) -> Path:
    """Copy the files read_topology reads from /sys into ``dst`` (node/cpu links become files)."""
    for rel in ["devices/system/cpu", "devices/system/node"]:
        src = Path("/sys") / rel
        for f in ["online", "present", "possible"]:
            if (src / f).exists():
                (dst / rel).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / f, dst / rel / f)
    for cpu in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*")):
        for f in ["core_id", "physical_package_id", "thread_siblings_list"]:
            (dst / "devices/system/cpu" / cpu.name / "topology").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cpu / "topology" / f, dst / "devices/system/cpu" / cpu.name / "topology" / f)
    for node in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        out = dst / "devices/system/node" / node.name
        out.mkdir(parents=True)
        for f in ["cpulist", "distance", "meminfo"]:
            shutil.copyfile(node / f, out / f)
        for link in node.glob("cpu[0-9]*"):
            (out / link.name).touch()
    return dst


def test_one_node_takes_the_system_memory_figures() -> None:
    """This host's kernel (lazily initialised memory) under-reports node0's meminfo
    (numactl -H: 5978 MB of 24 GiB); with one node all memory is that node's."""
    topo = read_topology()
    if len(topo.nodes) > 1:
        pytest.skip("one-node rule")
    (node,) = topo.nodes.values()
    vm = psutil.virtual_memory()
    assert node.mem_total == vm.total
    assert abs(node.mem_free - vm.free) < 64 * MiB
    assert node.mem_total >= numactl_hardware().size_mb[node.id] * MiB


def test_fake_sysfs_copy_reads_like_the_real_one(tmp_path: Path) -> None:
    real, copy = read_topology(), read_topology(copy_sysfs(tmp_path))
    assert copy.cpus == real.cpus
    assert {n: (v.cpus, v.distances, v.mem_total) for n, v in copy.nodes.items()} == {
        n: (v.cpus, v.distances, v.mem_total) for n, v in real.nodes.items()
    }


def test_offline_cpu_without_topology_dir(tmp_path: Path) -> None:
    """As the kernel shows CPU 1 offline: no topology/, gone from node cpulist, link kept."""
    root = copy_sysfs(tmp_path)
    shutil.rmtree(root / "devices/system/cpu/cpu1/topology")
    (root / "devices/system/cpu/online").write_text("0\n")
    (root / "devices/system/node/node0/cpulist").write_text("0\n")
    topo = read_topology(root)
    cpu1 = topo.cpus[1]
    assert (cpu1.online, cpu1.node, cpu1.core, cpu1.siblings) == (False, 0, UNKNOWN, frozenset({1}))
    assert topo.online_cpus() == {0}
    assert topo.cpus_of_node(0) == {0}
    assert topo.cpus_of_node(0, online_only=False) == {0, 1}


def test_memory_only_node(tmp_path: Path) -> None:
    """A second node without CPUs (CXL memory, or QEMU's -numa without cpus=)."""
    root = copy_sysfs(tmp_path)
    nodes = root / "devices/system/node"
    shutil.copytree(nodes / "node0", nodes / "node1")
    for link in (nodes / "node1").glob("cpu[0-9]*"):
        link.unlink()
    (nodes / "node1/cpulist").write_text("\n")
    (nodes / "node1/meminfo").write_text("Node 1 MemTotal:  1048576 kB\nNode 1 MemFree:  1000000 kB\n")
    (nodes / "node0/distance").write_text("10 30\n")
    (nodes / "node1/distance").write_text("30 10\n")
    (nodes / "online").write_text("0-1\n")
    topo = read_topology(root)
    assert topo.node_ids() == [0, 1]
    assert topo.cpu_less_nodes() == {1}
    assert topo.nodes[1].cpus == frozenset()
    assert (topo.nodes[1].mem_total, topo.nodes[1].mem_free) == (1 << 30, 1000000 * 1024)
    assert topo.distance(0, 1) == topo.distance(1, 0) == 30
    assert topo.nearest_nodes(1) == [1, 0]
    assert all(c.node == 0 for c in topo.cpus.values())


def test_kernel_without_numa(tmp_path: Path) -> None:
    """No /sys/devices/system/node: one node 0 with every CPU, memory from psutil."""
    root = copy_sysfs(tmp_path)
    shutil.rmtree(root / "devices/system/node")
    topo = read_topology(root)
    assert topo.node_ids() == [0]
    assert topo.cpus_of_node(0) == topo.online_cpus() == observe.online_cpus()
    assert topo.nodes[0].mem_total == psutil.virtual_memory().total
    assert topo.distance(0, 0) == 10


def test_synthetic_topology() -> None:
    topo = synthetic({0: [0, 1], 1: [2, 3], 2: []}, distances={(0, 1): 21}, smt=[[0, 1]], offline={3})
    assert topo.distance(1, 0) == 21 and topo.distance(0, 2) == 20
    assert topo.smt_siblings(0) == {0, 1} and topo.smt_siblings(2) == {2}
    assert topo.cpus_of_node(1) == {2} and topo.cpu_less_nodes() == {2}
    assert topo.nearest_nodes(0) == [0, 2, 1]
