"""formats.md 2.2 and 3.2: each rule broken on its own in an otherwise valid result."""

import dataclasses

import pytest

from pipesched import ValidationError
from pipesched.placement import Placement, PlacementInstance, placement_cost, validate_placement
from pipesched.remat import RematInstance, RematNode, RematSchedule, validate_remat

# ---------------------------------------------------------------------------------------------
# Remat: a 3-layer chain f0 -> f1 -> f2 with backward nodes; memory 1 each, cost 1 each.


@pytest.fixture
def chain() -> RematInstance:
    nodes = [RematNode("f0", 1, 1), RematNode("f1", 1, 1, ("f0",)), RematNode("f2", 1, 1, ("f1",)),
             RematNode("b2", 1, 1, ("f2", "f1")), RematNode("b1", 1, 1, ("b2", "f1", "f0")),
             RematNode("b0", 1, 1, ("b1", "f0"))]
    return RematInstance("chain3", tuple(nodes), budget=4)


def remat_steps() -> list[tuple[str, str]]:
    """Free f1 early, recompute it before b1: cost 7, peak 4."""
    c, f = "compute", "free"
    return [(c, "f0"), (c, "f1"), (c, "f2"), (c, "b2"), (f, "f2"), (f, "f1"), (c, "f1"), (c, "b1"),
            (f, "b2"), (f, "f1"), (c, "b0")]


def remat_expect(schedule: RematSchedule, rule: int) -> None:
    with pytest.raises(ValidationError) as info:
        validate_remat(schedule)
    assert info.value.rule == f"2.2 rule {rule}", str(info.value)


def test_remat_valid_schedule(chain):
    schedule = RematSchedule.from_steps(chain, remat_steps(), lower_bound=6, status="feasible", solver="t",
                                        solve_time_s=0)
    assert (schedule.cost, schedule.peak_memory) == (7, 4)
    assert validate_remat(schedule) == (7, 4)


def test_remat_reference_peak_and_default_order(chain):
    assert chain.reference_peak == 4  # computing b2 (f0, f1, f2 + b2) and b1 (f0, f1, b2 + b1)
    schedule = RematSchedule.from_steps(chain, chain.default_steps(), lower_bound=6,
                                        status="optimal", solver="t", solve_time_s=0)
    assert validate_remat(schedule).cost == 6


@pytest.mark.parametrize("rule, edit", [
    (1, lambda s: [x for x in s if x != ("compute", "f1")][:6] + [("compute", "b1")]),  # dep f1 missing
    (2, lambda s: s[:2] + [("compute", "f1")] + s[2:]),  # f1 computed while resident
    (3, lambda s: [("compute", "f0"), ("compute", "f1"), ("compute", "f2"), ("compute", "b2"),
                   ("compute", "b1")] + s[8:]),  # never frees: 5 > 4 while computing b1
    (4, lambda s: s + [("free", "f2")]),  # f2 not resident any more
    (5, lambda s: s[:4]),  # backward never finished
])
def test_remat_rules(chain, rule, edit):
    schedule = RematSchedule(chain, tuple(edit(remat_steps())), 7, 4, 6, "feasible", "t", 0)
    remat_expect(schedule, rule)


@pytest.mark.parametrize("changes", [{"cost": 8}, {"peak_memory": 3}, {"lower_bound": 8},
                                     {"status": "optimal"}, {"status": "infeasible"}])
def test_remat_rule6_result_claims(chain, changes):
    schedule = RematSchedule.from_steps(chain, remat_steps(), lower_bound=6, status="feasible", solver="t",
                                        solve_time_s=0)
    remat_expect(dataclasses.replace(schedule, **changes), 6)


def test_remat_infeasible_result_is_valid(chain):
    empty = RematSchedule.empty(chain.with_budget(1), status="infeasible", lower_bound=None, solver="t",
                                solve_time_s=0)
    assert validate_remat(empty) == (0, 0)


# ---------------------------------------------------------------------------------------------
# Placement: 4 experts, 2 devices x 3 slots, top-2 trace.


@pytest.fixture
def moe() -> PlacementInstance:
    trace = [(0, 1), (0, 2), (1, 3), (0, 1), (2, 3), (0, 3)]
    return PlacementInstance(num_experts=4, num_devices=2, slots_per_device=3, batch_size=2, trace=tuple(trace))


def test_placement_cost_matches_hand_computation(moe):
    devices = ((0, 3, 1), (1, 2))  # expert 1 replicated: each device serves half of its tokens
    # batch 0: tokens (0,1),(0,2): dev0 = 1 + 0.5 + 1 = 2.5, dev1 = 0.5 + 1 = 1.5 -> 2.5
    # batch 1: (1,3),(0,1): dev0 = 0.5 + 1 + 1 + 0.5 = 3, dev1 = 0.5 + 0.5 = 1 -> 3
    # batch 2: (2,3),(0,3): dev0 = 1 + 1 + 1 = 3, dev1 = 1 -> 3
    assert placement_cost(moe, devices) == pytest.approx((2.5 + 3 + 3) / 3)
    assert placement_cost(moe.with_batch_size(100), devices) == pytest.approx(8.5)  # one batch of all 6 tokens
    assert placement_cost(moe.with_batch_size(4), devices) == pytest.approx(5.5)  # 6 // 4 = 1 batch of 4


def placement_expect(placement: Placement, rule: int) -> None:
    with pytest.raises(ValidationError) as info:
        validate_placement(placement)
    assert info.value.rule == f"3.2 rule {rule}", str(info.value)


@pytest.mark.parametrize("rule, devices", [
    (1, ((0, 1), (2, 3), ())),
    (2, ((0, 1, 2, 3), ())),
    (3, ((0, 0, 1), (2, 3))),
    (4, ((0, 1), (2,))),
])
def test_placement_rules(moe, rule, devices):
    placement_expect(Placement(moe, devices, 1.0, None, "feasible", "t", 0), rule)


@pytest.mark.parametrize("changes", [{"cost": 0.5}, {"lower_bound": 99}, {"status": "optimal"},
                                     {"status": "unknown"}])
def test_placement_rule5_result_claims(moe, changes):
    placement = Placement.from_devices(moe, ((0, 1), (2, 3)), lower_bound=1.0, status="feasible", solver="t",
                                       solve_time_s=0)
    validate_placement(placement)
    placement_expect(dataclasses.replace(placement, **changes), 5)
