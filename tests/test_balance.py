"""The balancing rules (kvmnumad/optimizer/balance.py): pure functions over
hand-made samples, so each rule, threshold and guard is checked exactly.
The rules on a real kernel are tests/numa/test_numa_balance.py."""

from __future__ import annotations

from kvmnumad.model import Policy
from kvmnumad.numa.topology import HostTopology, synthetic
from kvmnumad.optimizer import balance
from kvmnumad.optimizer.balance import MEMORY, VCPUS, Load, Thresholds, VmFacts, plan
from kvmnumad.optimizer.model import HostNodeSample, Residency, VcpuSample, VmSample

TOPO = synthetic({0: [0, 1], 1: [2, 3]})
TH = Thresholds(dwell_s=30.0)


def vm(pages: dict[int, int], cpus: frozenset[int], *, mapped: int = 0, name: str = "web") -> VmSample:
    """One guest node (0) with two vCPUs allowed on ``cpus``."""
    node = TOPO.cpus[min(cpus)].node
    vcpus = tuple(VcpuSample(i, 100 + i, 0, 0, 0, min(cpus), node, 0, cpus) for i in range(2))
    return VmSample(name, True, (mapped,), (Residency(0, mapped, pages),), vcpus)


def load(busy: dict[int, float], free: int = 1 << 30, *, topo: HostTopology = TOPO, interval: float = 2.0,
         vcpu_busy: dict[int, float] | None = None, delay: dict[int, float] | None = None) -> Load:
    """vCPU threads 100 and 101 measured (idle) unless ``vcpu_busy`` says otherwise."""
    nodes = {n: HostNodeSample(n, frozenset(topo.cpus_of_node(n)), b, free, 0, 0, {})
             for n, b in busy.items()}
    measured = {100: 0.0, 101: 0.0} if vcpu_busy is None else vcpu_busy
    return Load(nodes, measured, delay or {}, interval)


def run(facts: list[VmFacts], ld: Load, *, now: float = 100.0,
        last: dict[tuple[str, int], float] | None = None, topo: HostTopology = TOPO) -> list[balance.Move]:
    return plan(facts, ld, topo, now=now, last_moved=last or {}, thresholds=TH)


NODE0, NODE1 = frozenset({0, 1}), frozenset({2, 3})
QUIET = {0: 0.05, 1: 0.05}


def test_drifted_memory_is_followed_without_a_copy() -> None:
    moves = run([VmFacts(vm({0: 180, 1: 820}, NODE0), Policy.LOCAL_FIRST)], load(QUIET))
    assert [(m.kind, m.from_node, m.to_node) for m in moves] == [(MEMORY, 0, 1), (VCPUS, 0, 1)]
    assert all(m.rule == "follow-memory" for m in moves)
    assert abs(moves[0].gain - 0.64) < 1e-9
    assert "82% of its 1000 resident pages on host node 1" in moves[0].reason
    assert "18% on node 0" in moves[0].reason and "no copy" in moves[0].reason


def test_local_enough_is_left_alone_hysteresis() -> None:
    # 75 % local: a move could gain at most 25 %, below the 30 % threshold
    assert run([VmFacts(vm({0: 750, 1: 250}, NODE0), Policy.LOCAL_FIRST)], load(QUIET)) == []
    assert run([VmFacts(vm({0: 1000}, NODE0), Policy.LOAD_BALANCED)], load(QUIET)) == []


def test_after_a_move_the_same_figures_ask_for_nothing() -> None:
    """No oscillation: once followed, the memory and the vCPUs agree."""
    assert run([VmFacts(vm({0: 180, 1: 820}, NODE1, mapped=1), Policy.LOCAL_FIRST)], load(QUIET)) == []


def test_dwell_time_holds_a_recent_move() -> None:
    facts = [VmFacts(vm({1: 1000}, NODE0), Policy.LOCAL_FIRST)]
    assert run(facts, load(QUIET), now=100.0, last={("web", 0): 80.0}) == []  # 20 s < 30 s
    assert run(facts, load(QUIET), now=100.0, last={("web", 0): 69.0})  # 31 s: free to move
    assert run(facts, load(QUIET), now=100.0, last={("other", 0): 99.0})  # another VM's move


def test_busy_memory_node_brings_the_memory_back_instead() -> None:
    moves = run([VmFacts(vm({1: 1000}, NODE0), Policy.LOCAL_FIRST)], load({0: 0.1, 1: 0.9}))
    assert [(m.kind, m.from_node, m.to_node, m.rule) for m in moves] == [(MEMORY, 1, 0, "memory-to-vcpus")]
    assert "busy 0.90 >= 0.60" in moves[0].reason


def test_no_room_no_copy() -> None:
    facts = [VmFacts(vm({1: 1000}, NODE0), Policy.LOCAL_FIRST)]
    assert run(facts, load({0: 0.1, 1: 0.9}, free=1 << 20)) == []


def test_caller_pinned_vcpus_stay_and_the_memory_comes_to_them() -> None:
    moves = run([VmFacts(vm({0: 1000}, NODE1), Policy.LOCAL_FIRST, explicit_vcpus=frozenset({0}))],
                load(QUIET))
    assert [(m.kind, m.to_node) for m in moves] == [(MEMORY, 1)]
    assert "pinned by a caller" in moves[0].reason


def test_caller_mapped_memory_stays_and_the_vcpus_come_to_it() -> None:
    moves = run([VmFacts(vm({0: 1000}, NODE1), Policy.LOCAL_FIRST, explicit_nodes=frozenset({0}))],
                load(QUIET))
    assert [(m.kind, m.to_node, m.rule) for m in moves] == [(VCPUS, 0, "follow-caller-map")]


def test_both_explicit_nothing_moves() -> None:
    facts = VmFacts(vm({0: 1000}, NODE1), Policy.LOAD_BALANCED, explicit_vcpus=frozenset({0, 1}),
                    explicit_nodes=frozenset({0}))
    assert run([facts], load({0: 0.0, 1: 1.0})) == []


def test_unpinned_or_spread_vcpus_are_left_alone() -> None:
    assert run([VmFacts(vm({1: 1000}, frozenset({0, 1, 2, 3})), Policy.LOCAL_FIRST)], load(QUIET)) == []
    no_numa = VmSample("flat", False, (), (Residency(0, 0, {1: 1000}),),
                       (VcpuSample(0, 1, 0, 0, 0, 0, 0, 0, NODE0),))
    assert run([VmFacts(no_numa, Policy.LOCAL_FIRST)], load(QUIET)) == []


def test_untouched_memory_asks_for_nothing() -> None:
    assert run([VmFacts(vm({}, NODE0), Policy.LOCAL_FIRST)], load(QUIET)) == []


def test_a_hog_moves_a_load_balanced_guest_node_away() -> None:
    moves = run([VmFacts(vm({0: 1000}, NODE0), Policy.LOAD_BALANCED)], load({0: 0.97, 1: 0.1}))
    assert [(m.kind, m.from_node, m.to_node, m.rule) for m in moves] == [(MEMORY, 0, 1, "node-load"),
                                                                        (VCPUS, 0, 1, "node-load")]
    assert abs(moves[0].gain - 0.87) < 1e-9
    assert "contended 0.97 >= 0.60" in moves[0].reason


def test_load_rule_is_load_balanced_only_and_not_on_a_first_measure() -> None:
    assert run([VmFacts(vm({0: 1000}, NODE0), Policy.LOCAL_FIRST)], load({0: 0.97, 1: 0.1})) == []
    facts = [VmFacts(vm({0: 1000}, NODE0), Policy.LOAD_BALANCED)]
    assert run(facts, load({0: 0.97, 1: 0.1}, interval=0)) == []
    assert run(facts, load({0: 0.97, 1: 0.1}, vcpu_busy={100: 0.0})) == []  # vCPU 1 new: not measured yet


def test_own_vcpus_do_not_count_as_load() -> None:
    """A node busy with this guest node's own vCPUs is not contended: else it would chase itself."""
    ld = load({0: 0.95, 1: 0.1}, vcpu_busy={100: 0.95, 101: 0.95})
    assert run([VmFacts(vm({0: 1000}, NODE0), Policy.LOAD_BALANCED)], ld) == []


def test_run_delay_counts_a_cpu_bound_vcpu_sharing_with_a_hog() -> None:
    # node 0 busy 1.0, half of it our vCPUs (1 CPU's worth of 2): others 0.5, plus waiting 0.5
    ld = load({0: 1.0, 1: 0.1}, vcpu_busy={100: 0.5, 101: 0.5}, delay={100: 0.5, 101: 0.5})
    moves = run([VmFacts(vm({0: 1000}, NODE0), Policy.LOAD_BALANCED)], ld)
    assert [m.to_node for m in moves] == [1, 1]


def test_load_gain_must_beat_the_threshold() -> None:
    assert run([VmFacts(vm({0: 1000}, NODE0), Policy.LOAD_BALANCED)], load({0: 0.8, 1: 0.5})) == []
    assert run([VmFacts(vm({0: 1000}, NODE0), Policy.LOAD_BALANCED)], load({0: 0.97, 1: 0.1},
                                                                          free=1 << 20)) == []


def test_least_busy_then_nearest_node_is_chosen() -> None:
    topo = synthetic({0: [0], 1: [1], 2: [2], 3: [3]}, distances={(0, 1): 15, (0, 2): 30, (0, 3): 30})
    one = frozenset({0})
    sample = VmSample("web", True, (0,), (Residency(0, 0, {0: 100}),),
                      (VcpuSample(0, 100, 0, 0, 0, 0, 0, 0, one),))
    moves = plan([VmFacts(sample, Policy.LOAD_BALANCED)], load({0: 1.0, 1: 0.2, 2: 0.2, 3: 0.1}, topo=topo),
                 topo, now=0.0, last_moved={}, thresholds=TH)
    assert {m.to_node for m in moves} == {3}
    moves = plan([VmFacts(sample, Policy.LOAD_BALANCED)], load({0: 1.0, 1: 0.2, 2: 0.2, 3: 0.2}, topo=topo),
                 topo, now=0.0, last_moved={}, thresholds=TH)
    assert {m.to_node for m in moves} == {1}


def test_memory_only_node_counts_as_local_to_its_nearest_cpus() -> None:
    topo = synthetic({0: [0, 1], 1: [2, 3], 2: []}, distances={(0, 2): 15, (1, 2): 30})
    sample = VmSample("web", True, (2,), (Residency(0, 2, {2: 1000}),),
                      tuple(VcpuSample(i, 100 + i, 0, 0, 0, 0, 0, 0, NODE0) for i in range(2)))
    assert plan([VmFacts(sample, Policy.LOCAL_FIRST)], load(QUIET, topo=topo), topo, now=0.0,
                last_moved={}, thresholds=TH) == []


def test_defaults() -> None:
    assert balance.default_auto_balance(Policy.LOCAL_FIRST)
    assert balance.default_auto_balance(Policy.LOAD_BALANCED)
    assert not balance.default_auto_balance(Policy.MANUAL)


def test_the_requests_allowed_nodes_bound_every_move() -> None:
    only0 = frozenset({0})
    moves = run([VmFacts(vm({0: 180, 1: 820}, NODE0), Policy.LOCAL_FIRST, allowed_nodes=only0)], load(QUIET))
    assert [(m.kind, m.to_node, m.rule) for m in moves] == [(MEMORY, 0, "memory-to-vcpus")]
    assert run([VmFacts(vm({0: 1000}, NODE0), Policy.LOAD_BALANCED, allowed_nodes=only0)],
               load({0: 0.97, 1: 0.1})) == []


def test_a_guest_node_a_job_moves_is_not_planned() -> None:
    """Whoever's job it is: a second move would only be refused Busy."""
    facts = [VmFacts(vm({1: 1000}, NODE0), Policy.LOCAL_FIRST)]
    assert plan(facts, load(QUIET), TOPO, now=100.0, last_moved={}, thresholds=TH, moving={("web", 0)}) == []
    assert plan(facts, load(QUIET), TOPO, now=100.0, last_moved={}, thresholds=TH, moving={("web", 1)})
