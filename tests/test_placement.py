"""The placement planner, one test per rule, on hand-made topologies (pure code:
the real-guest checks of the same rules are in tests/numa/)."""

from __future__ import annotations

import pytest

from kvmnumad.errors import InsufficientMemory, InvalidArgument, NodeOutOfRange
from kvmnumad.model import Policy
from kvmnumad.numa.memory import MemPolicy
from kvmnumad.numa.topology import HostTopology, synthetic
from kvmnumad.placement import Load, PlacementRequest, Plan, guest_node_of_vcpu, plan, wrap_node_map

MiB = 1 << 20
GiB = 1 << 30
IDLE = Load()


def two_by_two(free: int | dict[int, int] = GiB) -> HostTopology:
    return synthetic({0: [0, 1], 1: [2, 3]}, mem_free=free)


def four_by_one() -> HostTopology:
    return synthetic(
        {n: [n] for n in range(4)},
        mem_free=512 * MiB,
        distances={(0, 1): 15, (2, 3): 15, (0, 2): 30, (0, 3): 30},
    )


def with_memory_only_node() -> HostTopology:
    return synthetic({0: [0, 1], 1: [2, 3], 2: []}, mem_free=GiB, distances={(0, 2): 17, (1, 2): 28})


def req(
    policy: Policy, vcpus: int = 4, memory: int = 256 * MiB, guest_nodes: int = 2, **kw: object
) -> PlacementRequest:
    return PlacementRequest(vcpus, memory, guest_nodes, policy, **kw)  # type: ignore[arg-type]


def cpus(p: Plan) -> list[set[int]]:
    return [set(v.cpus) for v in p.vcpus]


# --- shared rules ---

def test_wrap_node_map_identity_then_wrapped() -> None:
    assert wrap_node_map(2, (0, 1, 2, 3)) == [0, 1]
    assert wrap_node_map(4, (0, 1)) == [0, 1, 0, 1]
    assert wrap_node_map(3, (2,)) == [2, 2, 2]
    with pytest.raises(InvalidArgument):
        wrap_node_map(2, ())


def test_vcpus_in_contiguous_blocks_per_guest_node() -> None:
    assert [guest_node_of_vcpu(v, 4, 2) for v in range(4)] == [0, 0, 1, 1]
    assert [guest_node_of_vcpu(v, 5, 2) for v in range(5)] == [0, 0, 0, 1, 1]
    p = plan(two_by_two(), IDLE, req(Policy.LOCAL_FIRST, vcpus=6, guest_nodes=3, memory=12 * MiB))
    assert [v.guest_node for v in p.vcpus] == [0, 0, 1, 1, 2, 2]


def test_memory_split_in_whole_pages() -> None:
    p = plan(two_by_two(), IDLE, req(Policy.MANUAL, memory=10 * 4096, guest_nodes=3))
    assert [n.bytes for n in p.nodes] == [4 * 4096, 3 * 4096, 3 * 4096]


def test_no_memory_places_vcpus_only() -> None:
    p = plan(two_by_two(free=0), IDLE, req(Policy.LOCAL_FIRST, memory=0))
    assert [n.bytes for n in p.nodes] == [0, 0] and all(n.per_host == {} for n in p.nodes)
    assert cpus(p) == [{0, 1}, {0, 1}, {2, 3}, {2, 3}]


def test_no_numa_plans_one_guest_node() -> None:
    p = plan(two_by_two(), IDLE, req(Policy.LOCAL_FIRST, guest_nodes=0))
    assert len(p.nodes) == 1 and p.nodes[0].bytes == 256 * MiB


@pytest.mark.parametrize(
    ("kw", "error", "text"),
    [
        ({"vcpus": 0}, InvalidArgument, "vcpus must be at least 1, got 0"),
        ({"memory": 4097}, InvalidArgument, "4097"),
        ({"memory": -4096}, InvalidArgument, "-4096"),
        ({"guest_nodes": -1}, InvalidArgument, "-1"),
        ({"memory": 4096, "guest_nodes": 2}, InvalidArgument, "under a page"),
        ({"host_nodes": (0, 7)}, NodeOutOfRange, "host node 7"),
        ({"policy": "fastest"}, InvalidArgument, "fastest"),
    ],
)
def test_invalid_requests(kw: dict[str, object], error: type[Exception], text: str) -> None:
    args: dict[str, object] = {"policy": Policy.MANUAL, **kw}
    with pytest.raises(error, match=text):
        plan(two_by_two(), IDLE, req(**args))  # type: ignore[arg-type]


def test_zero_memory_places_only_vcpus() -> None:
    """CreateVM with memory_bytes 0: regions come later through SetupNumaMemory."""
    p = plan(two_by_two(), IDLE, req(memory=0, guest_nodes=2, policy=Policy.LOCAL_FIRST))
    assert [n.bytes for n in p.nodes] == [0, 0]
    assert len(p.vcpus) == 4


def test_committed_memory_counts_against_free() -> None:
    topo = two_by_two(free=GiB)
    load = Load(node_bytes={0: 900 * MiB, 1: 900 * MiB})
    with pytest.raises(InsufficientMemory, match="most: 130023424 bytes"):
        plan(topo, load, req(Policy.LOCAL_FIRST, memory=512 * MiB, guest_nodes=1))


def test_plan_is_deterministic() -> None:
    r = req(Policy.LOAD_BALANCED)
    a, b = plan(four_by_one(), IDLE, r), plan(four_by_one(), IDLE, r)
    assert a == b
    assert a.policy == Policy.LOAD_BALANCED
    node = a.nodes[0]
    assert (node.guest_node, node.mempolicy, node.bytes) == (0, MemPolicy.BIND, 128 * MiB)
    assert sum(node.per_host.values()) == 128 * MiB


# --- manual ---

def test_manual_binds_guest_nodes_to_allowed_nodes_wrapped() -> None:
    p = plan(four_by_one(), IDLE, req(Policy.MANUAL, guest_nodes=3, memory=3 * MiB, host_nodes=(3, 1)))
    assert p.node_map == [3, 1, 3]
    assert all(n.mempolicy == MemPolicy.BIND and len(n.host_nodes) == 1 for n in p.nodes)
    assert cpus(p) == [{1, 3}] * 4  # vCPUs may run on every allowed CPU


def test_manual_refuses_what_a_node_cannot_hold() -> None:
    with pytest.raises(InsufficientMemory, match=r"guest node 2 needs .* on node 0"):
        # guest nodes 0 and 2 both wrap onto node 0 (512 MiB): 2 x 300 MiB do not fit
        plan(four_by_one(), IDLE, req(Policy.MANUAL, guest_nodes=3, memory=900 * MiB, host_nodes=(0, 1)))


# --- local-first ---

def test_local_first_packs_each_guest_node_on_one_host_node() -> None:
    p = plan(two_by_two(), IDLE, req(Policy.LOCAL_FIRST))
    assert p.node_map == [0, 1]
    assert [(n.mempolicy, n.host_nodes) for n in p.nodes] == [(MemPolicy.BIND, (0,)), (MemPolicy.BIND, (1,))]
    assert cpus(p) == [{0, 1}, {0, 1}, {2, 3}, {2, 3}]


def test_local_first_least_loaded_node_first() -> None:
    busy_node0 = Load(cpu={0: 0.9, 1: 0.8})
    assert plan(two_by_two(), busy_node0, req(Policy.LOCAL_FIRST, guest_nodes=1)).node_map == [1]
    committed_on_1 = Load(node_vcpus={1: 4})
    assert plan(two_by_two(), committed_on_1, req(Policy.LOCAL_FIRST, guest_nodes=1)).node_map == [0]


def test_local_first_most_free_when_equally_loaded() -> None:
    topo = two_by_two(free={0: GiB, 1: 2 * GiB})
    assert plan(topo, IDLE, req(Policy.LOCAL_FIRST, guest_nodes=1)).node_map == [1]


def test_local_first_prefers_a_node_that_fits_over_a_less_loaded_one() -> None:
    topo = two_by_two(free={0: 2 * GiB, 1: 256 * MiB})
    p = plan(topo, Load(cpu={0: 1.0, 1: 1.0}), req(Policy.LOCAL_FIRST, guest_nodes=1, memory=GiB))
    assert p.node_map == [0]


def test_local_first_refuses_a_guest_node_larger_than_any_host_node() -> None:
    with pytest.raises(InsufficientMemory) as exc:
        plan(two_by_two(), IDLE, req(Policy.LOCAL_FIRST, guest_nodes=1, memory=1536 * MiB))
    assert "guest node 0 needs 1610612736 bytes" in str(exc.value)
    assert "most: 1073741824 bytes on node 0" in str(exc.value)


def test_local_first_allow_split_spills_to_the_nearest_node() -> None:
    topo = synthetic({0: [0], 1: [1], 2: [2]}, mem_free=GiB, distances={(0, 1): 30, (0, 2): 15, (1, 2): 30})
    p = plan(topo, IDLE, req(Policy.LOCAL_FIRST, vcpus=1, guest_nodes=1, memory=1536 * MiB, allow_split=True))
    (node,) = p.nodes
    assert node.mempolicy == MemPolicy.BIND and node.host_nodes == (0, 2)
    assert node.per_host == {0: GiB, 2: 512 * MiB}
    assert cpus(p) == [{0}]


def test_local_first_split_still_refuses_more_than_all_free_memory() -> None:
    with pytest.raises(InsufficientMemory, match="needs 3221225472 bytes"):
        plan(two_by_two(), IDLE, req(Policy.LOCAL_FIRST, guest_nodes=1, memory=3 * GiB, allow_split=True))


def test_local_first_puts_vcpus_only_on_nodes_with_cpus() -> None:
    p = plan(with_memory_only_node(), IDLE, req(Policy.LOCAL_FIRST, guest_nodes=3, memory=3 * MiB, vcpus=3))
    assert 2 not in p.node_map
    with pytest.raises(InvalidArgument, match="no online CPU"):
        plan(with_memory_only_node(), IDLE, req(Policy.LOCAL_FIRST, host_nodes=(2,)))


def test_local_first_ignores_offline_cpus() -> None:
    topo = synthetic({0: [0, 1], 1: [2, 3]}, offline={3})
    p = plan(topo, IDLE, req(Policy.LOCAL_FIRST))
    assert cpus(p)[2:] == [{2}, {2}]


# --- load-balanced ---

def test_load_balanced_one_vcpu_per_cpu() -> None:
    p = plan(four_by_one(), IDLE, req(Policy.LOAD_BALANCED))
    assert sorted(min(c) for c in cpus(p)) == [0, 1, 2, 3]
    assert all(len(c) == 1 for c in cpus(p))


def test_load_balanced_memory_follows_the_vcpus() -> None:
    p = plan(four_by_one(), IDLE, req(Policy.LOAD_BALANCED))
    for node in p.nodes:
        vcpu_nodes = {min(v.cpus) for v in p.vcpus if v.guest_node == node.guest_node}  # CPU n is on node n
        assert node.mempolicy == MemPolicy.BIND and set(node.host_nodes) == vcpu_nodes


def test_load_balanced_busy_cpus_last() -> None:
    load = Load(cpu={0: 0.95, 2: 0.5})
    p = plan(four_by_one(), load, req(Policy.LOAD_BALANCED, vcpus=2, guest_nodes=1))
    assert {min(c) for c in cpus(p)} == {1, 3}


def test_load_balanced_spreads_over_nodes() -> None:
    p = plan(two_by_two(), IDLE, req(Policy.LOAD_BALANCED, vcpus=2, guest_nodes=1))
    assert {min(c) // 2 for c in cpus(p)} == {0, 1}
    assert set(p.nodes[0].host_nodes) == {0, 1}


def test_load_balanced_smt_siblings_last() -> None:
    topo = synthetic({0: [0, 1, 2, 3]}, smt=[[0, 1], [2, 3]])
    p = plan(topo, IDLE, req(Policy.LOAD_BALANCED, vcpus=3, guest_nodes=1))
    first_two = {min(c) for c in cpus(p)[:2]}
    assert first_two == {0, 2}  # one per core before any sibling
    assert min(cpus(p)[2]) in {1, 3}


def test_load_balanced_overcommit_doubles_up_evenly() -> None:
    p = plan(two_by_two(), IDLE, req(Policy.LOAD_BALANCED, vcpus=8, guest_nodes=2))
    per_cpu = [sum(1 for c in cpus(p) if cpu in c) for cpu in range(4)]
    assert per_cpu == [2, 2, 2, 2]


# --- interleave ---

def test_interleave_memory_over_all_allowed_nodes() -> None:
    p = plan(with_memory_only_node(), IDLE, req(Policy.INTERLEAVE, memory=300 * MiB))
    for node in p.nodes:
        assert node.mempolicy == MemPolicy.INTERLEAVE and node.host_nodes == (0, 1, 2)
        assert sum(node.per_host.values()) <= node.bytes
    assert cpus(p) == [{0, 1, 2, 3}] * 4


def test_interleave_restricted_to_allowed_nodes() -> None:
    p = plan(four_by_one(), IDLE, req(Policy.INTERLEAVE, host_nodes=(1, 2)))
    assert {n.host_nodes for n in p.nodes} == {(1, 2)}
    assert cpus(p) == [{1, 2}] * 4


def test_interleave_refuses_more_than_the_allowed_nodes_hold() -> None:
    with pytest.raises(InsufficientMemory, match="1073741824 bytes free"):
        plan(four_by_one(), IDLE, req(Policy.INTERLEAVE, memory=2 * GiB, host_nodes=(0, 1)))


# --- preferred ---

def test_preferred_names_one_node_per_guest_node() -> None:
    p = plan(two_by_two(), IDLE, req(Policy.PREFERRED))
    assert [(n.mempolicy, n.host_nodes) for n in p.nodes] == [
        (MemPolicy.PREFERRED, (0,)),
        (MemPolicy.PREFERRED, (1,)),
    ]
    assert cpus(p) == [{0, 1}, {0, 1}, {2, 3}, {2, 3}]


def test_preferred_falls_back_when_full() -> None:
    """Unlike local-first, a guest node larger than any host node is accepted: the kernel spills."""
    p = plan(two_by_two(), IDLE, req(Policy.PREFERRED, guest_nodes=1, memory=1536 * MiB))
    assert p.nodes[0].per_host == {0: GiB, 1: 512 * MiB}
    with pytest.raises(InsufficientMemory):
        plan(two_by_two(), IDLE, req(Policy.PREFERRED, guest_nodes=1, memory=3 * GiB))


def test_memory_only_allowed_nodes_run_vcpus_on_the_nearest_cpus() -> None:
    p = plan(with_memory_only_node(), IDLE, req(Policy.MANUAL, host_nodes=(2,)))
    assert p.node_map == [2, 2]
    assert cpus(p) == [{0, 1}] * 4  # node 0 is nearer to node 2 (17) than node 1 (28)
