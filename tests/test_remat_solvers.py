"""Remat solvers: bounds, exactness against brute force and Revolve, public instances."""

import heapq
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipesched.solvers import REMAT_SOLVERS, solve_remat
from pipesched.solvers._remat_bounds import smallest_peak
from pipesched.solvers._remat_chain_dp import chain_tables
from pipesched.solvers._remat_chain_exact import EXACT_CHAIN_LAYERS

from pipesched._common import approx_eq, approx_le
from pipesched.remat import (
    Chain,
    RematInstance,
    RematNode,
    RematSchedule,
    chain_instance,
    chain_layout,
    validate_remat,
)

HEURISTICS = ("checkpoint-all", "sqrt-n", "chen-greedy", "greedy")
INFEASIBLE = {"VGG16_b80", "VGG16_b70", "VGG16_b60", "VGG19_b70", "VGG19_b60", "fcn_8_vgg_b60"}


def brute_force_optimum(instance: RematInstance) -> float | None:
    """The minimal cost over all schedules (Dijkstra over resident/computed sets), None if none."""
    n = len(instance.nodes)
    mem = [node.memory for node in instance.nodes]
    cost = [node.cost for node in instance.nodes]
    need = [sum(1 << u for u in deps) for deps in instance.dep_indices]
    everything = (1 << n) - 1
    best = {(0, 0): 0.0}
    heap = [(0.0, 0, 0)]
    while heap:
        spent, resident, computed = heapq.heappop(heap)
        if computed == everything:
            return spent
        if spent > best[resident, computed]:
            continue
        level = sum(mem[v] for v in range(n) if resident >> v & 1)
        moves = [(spent, resident & ~(1 << v), computed) for v in range(n) if resident >> v & 1]
        moves += [(spent + cost[v], resident | 1 << v, computed | 1 << v) for v in range(n)
                  if not resident >> v & 1 and resident & need[v] == need[v]
                  and approx_le(level + mem[v], instance.budget)]
        for move in moves:
            if move[0] < best.get(move[1:], math.inf):
                best[move[1:]] = move[0]
                heapq.heappush(heap, move)
    return None


@st.composite
def random_dags(draw, max_nodes: int = 8) -> RematInstance:
    n = draw(st.integers(3, max_nodes))
    nodes = []
    for i in range(n):
        skips = draw(st.lists(st.integers(0, i - 2), max_size=2, unique=True)) if i > 1 else []
        deps = sorted(set(skips) | ({i - 1} if i else set()))  # a backbone with skip connections
        nodes.append(RematNode(f"v{i}", draw(st.integers(0, 6)), draw(st.integers(1, 8)),
                               tuple(f"v{d}" for d in deps)))
    return with_some_budget(draw, RematInstance("random", tuple(nodes), 0))


@st.composite
def training_graphs(draw, max_layers: int = 4) -> RematInstance:
    """Forward layers with skips, then backward nodes reading the gradient and forward values."""
    k = draw(st.integers(2, max_layers))
    def node(name, deps):
        return RematNode(name, draw(st.integers(0, 6)), draw(st.integers(1, 8)),
                                            tuple(deps))
    nodes = [node(f"f{i}", [f"f{j}" for j in draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=2,
                                                                   unique=True))] if i else [])
             for i in range(k)]
    for i in reversed(range(k)):
        reads = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=2, unique=True))
        nodes.append(node(f"b{i}", ([f"b{i + 1}"] if i < k - 1 else []) + [f"f{j}" for j in sorted(reads)]))
    return with_some_budget(draw, RematInstance("training", tuple(nodes), 0))


def with_some_budget(draw, instance: RematInstance) -> RematInstance:
    """A budget from just below the smallest possible peak up to the reference peak."""
    lo, hi = int(smallest_peak(instance)), int(instance.reference_peak)
    extra = draw(st.sampled_from([1, 2, 3, 0, -1, hi - lo, (hi - lo) // 2]))  # where remat pays off
    return instance.with_budget(min(lo + extra, hi))


@st.composite
def random_chains(draw, max_layers: int) -> RematInstance:
    n = draw(st.integers(1, max_layers))
    def numbers(lo, hi):
        return draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    chain = Chain(tuple(numbers(0, 5)), tuple(numbers(0, 5)), tuple(numbers(1, 4)), tuple(numbers(0, 3)))
    instance = chain_instance(chain, 0)
    if n > 1 and draw(st.booleans()):  # no gradient for the network input, as in Checkmate's VGG graphs
        instance = RematInstance("chain_without_b0", tuple(v for v in instance.nodes if v.id != "b0"), 0)
    return with_some_budget(draw, instance)


def distinct_optima(graph: RematInstance) -> dict[float, float | None]:
    """budget -> brute-force optimum, for the smallest budget of each distinct optimum (and one
    infeasible budget when there is one) between the smallest possible peak - 1 and the reference peak."""
    found: dict[float | None, float] = {}
    for budget in range(int(smallest_peak(graph)) - 1, int(graph.reference_peak) + 1):
        found.setdefault(brute_force_optimum(graph.with_budget(budget)), budget)
    return {budget: optimum for optimum, budget in found.items()}


@given(st.one_of(random_dags(), training_graphs(), random_chains(max_layers=4)))
def test_cpsat_is_exact_and_bounds_every_heuristic(graph):
    for budget, optimum in distinct_optima(graph).items():
        instance = graph.with_budget(budget)
        exact = solve_remat(instance, "cpsat", time_limit=20)
        if optimum is None:
            assert exact.status in ("infeasible", "unknown")
            continue
        assert exact.status == "optimal"
        assert approx_eq(exact.objective, optimum)
        for solver in HEURISTICS:
            result = solve_remat(instance, solver)
            assert approx_le(result.lower_bound, optimum)
            if result.status in ("optimal", "feasible"):
                assert approx_le(exact.objective, result.objective)


def revolve_forward_steps(steps: int, snapshots: int) -> int:
    """Griewank & Walther (2000): t*l - C(s+t, s+1), t the smallest with C(s+t, s) >= l."""
    t = 0
    while math.comb(snapshots + t, snapshots) < steps:
        t += 1
    return t * steps - math.comb(snapshots + t, snapshots + 1)


def revolve_chain(steps: int, snapshots: int) -> RematInstance:
    """Revolve's setting as a chain (see `_remat_chain_dp`): l+1 unit layers, free backward,
    budget s+3."""
    chain = Chain.homogeneous(steps + 1, backward_cost=0)
    return chain_instance(chain, snapshots + 3, name=f"revolve_l{steps}_s{snapshots}")


def test_chain_dp_reproduces_revolve():
    for steps in range(1, 31):
        for snapshots in range(1, 6):
            result = solve_remat(revolve_chain(steps, snapshots), "chain-dp")
            assert result.status in ("optimal", "feasible")
            assert result.objective == revolve_forward_steps(steps, snapshots) + 2, (steps, snapshots)


@given(random_chains(max_layers=4))
def test_chain_dp_equals_brute_force_on_short_chains(instance):
    optimum = brute_force_optimum(instance)
    result = solve_remat(instance, "chain-dp")
    if optimum is None:
        assert result.status in ("infeasible", "unknown")
    else:
        assert approx_eq(result.objective, optimum)
        assert approx_le(result.lower_bound, optimum)


@settings(max_examples=12)
@given(random_chains(max_layers=8))
def test_chain_dp_equals_cpsat_on_random_chains(instance):
    """Same optimum; CP-SAT's bound never above it. (On tight chains CP-SAT may find the optimum
    without proving it in the time: e.g. 92 with bound 68 after 200 s, where the DP proves 92.)"""
    dp = solve_remat(instance, "chain-dp")
    exact = solve_remat(instance, "cpsat", time_limit=10)
    if dp.status == "infeasible":
        assert exact.status == "infeasible"
        return
    assert dp.status == "optimal" and approx_eq(dp.lower_bound, dp.objective)
    assert approx_eq(exact.objective, dp.objective) and approx_le(exact.lower_bound, dp.objective)


def test_rotor_dp_misses_a_moved_checkpoint_that_the_exact_dp_finds():
    """Releasing checkpoint f1 after computing f2 and recomputing f0, f1 later beats every
    persistent schedule: the Rotor DP finds 31, the optimum is 27."""
    chain = Chain((2, 2, 1, 2, 4), (1, 3, 5, 1, 1), (1, 1, 3, 3, 4), (2, 1, 1, 3, 2))
    instance = chain_instance(chain, 11)
    rotor = chain_tables(chain.forward_cost, chain.backward_cost, chain.output_size, chain.gradient_size, 11)
    assert rotor.optimum == 31
    dp, exact = solve_remat(instance, "chain-dp"), solve_remat(instance, "cpsat", time_limit=30)
    assert (dp.objective, dp.status) == (27, "optimal")
    assert (exact.objective, exact.status) == (27, "optimal")


def test_long_chains_use_the_rotor_dp_and_claim_no_optimum():
    chain = Chain.homogeneous(EXACT_CHAIN_LAYERS + 6)
    instance = chain_instance(chain, 0).with_budget(8)
    result = solve_remat(instance, "chain-dp")
    assert result.status == "feasible" and result.lower_bound == instance.total_cost
    assert result.objective > instance.total_cost


def test_chain_builder_round_trip():
    chain = Chain((1, 2, 3), (2, 4, 6), (10, 20, 30), (5, 10, 20))
    instance = chain_instance(chain, 100)
    assert chain_layout(instance).chain == chain
    assert chain_layout(RematInstance.from_dict(instance.to_dict())).chain == chain
    assert instance.total_cost == 18


def test_checkmate_vgg_graphs_are_chains_and_the_dp_meets_the_cpsat_optimum(instances_dir):
    instance = RematInstance.load(instances_dir / "remat" / "VGG16_b90.json")
    layout = chain_layout(instance)
    assert layout.chain.length == 23 and layout.backward[0] is None and instance.nodes[layout.forward[-1]].id == "Loss"
    dp, exact = solve_remat(instance, "chain-dp"), solve_remat(instance, "cpsat", time_limit=30)
    assert exact.status == "optimal" and approx_eq(dp.objective, exact.objective)


def test_chain_dp_rejects_other_graphs(instances_dir):
    instance = RematInstance.load(instances_dir / "remat" / "fcn_8_vgg_b90.json")
    with pytest.raises(ValueError, match="chain-dp needs a chain"):
        solve_remat(instance, "chain-dp")


def public_instances(instances_dir, pattern="*.json"):
    return sorted((instances_dir / "remat").glob(pattern))


def test_public_instances_every_solver_validates(instances_dir):
    for path in public_instances(instances_dir):
        instance = RematInstance.load(path)
        for solver in REMAT_SOLVERS:
            if solver == "chain-dp" and chain_layout(instance) is None:
                continue
            result = solve_remat(instance, solver, time_limit=1)
            again = RematSchedule.from_dict(result.schedule.to_dict())
            validate_remat(again)
            assert approx_le(result.lower_bound, result.objective) or result.status in ("infeasible", "unknown")
            assert (result.status == "infeasible") == (path.stem in INFEASIBLE), (path.stem, solver)


def test_cpsat_proves_small_public_optimum(instances_dir):
    instance = RematInstance.load(instances_dir / "remat" / "VGG16_b90.json")
    result = solve_remat(instance, "cpsat", time_limit=30)
    assert result.status == "optimal"
    assert result.objective < solve_remat(instance, "sqrt-n").objective


def feasibility_threshold(graph: RematInstance) -> int:
    """The smallest integer budget with a valid schedule (brute force; the reference peak has one)."""
    budget = int(smallest_peak(graph))
    while brute_force_optimum(graph.with_budget(budget)) is None:
        budget += 1
    return budget


@settings(max_examples=25)
@given(st.one_of(random_dags(), training_graphs()), st.sampled_from([-2, -1, 0, 1]))
def test_cpsat_reports_infeasible_exactly_when_brute_force_finds_no_schedule(graph, offset):
    """Budgets around the feasibility threshold of tiny graphs: "infeasible" iff no schedule
    exists (CP-SAT's proof on its exact model, or the exhaustive check), the optimum otherwise;
    every other solver says "infeasible" only when that is true."""
    instance = graph.with_budget(max(0, feasibility_threshold(graph) + offset))
    optimum = brute_force_optimum(instance)
    exact = solve_remat(instance, "cpsat", time_limit=20)
    assert (exact.status == "infeasible") == (optimum is None), (exact.status, optimum)
    if exact.status == "optimal":
        assert approx_eq(exact.objective, optimum)
    for solver in HEURISTICS:
        result = solve_remat(instance, solver)
        assert (result.status == "infeasible") == (optimum is None), (solver, result.status, optimum)


def test_every_solver_honours_the_time_limit():
    """A 1000-node training graph (forward skips, backward reads) that no solver finishes in 1 s;
    the chain solver on a 200-layer chain with a fine memory grid."""
    k = 500
    nodes = [RematNode(f"f{i}", 1 + i % 3, 2 + i % 5, tuple(f"f{j}" for j in (i - 1, i - 3) if j >= 0))
             for i in range(k)]
    nodes += [RematNode(f"b{i}", 2, 2 + i % 5, (*([f"b{i + 1}"] if i < k - 1 else []), f"f{i}",
                                                  *([f"f{i - 1}"] if i else [])), backward=True)
              for i in reversed(range(k))]
    graph = RematInstance("training500", tuple(nodes), 0)
    chain = chain_instance(Chain(tuple(range(1, 201)), tuple(range(1, 201)), tuple(range(200, 0, -1)),
                                 tuple(range(1, 201))), 0)
    for instance in (graph, chain):
        instance = instance.with_budget(int(instance.reference_peak * 0.5))
        for solver in REMAT_SOLVERS:
            if solver == "chain-dp" and chain_layout(instance) is None:
                continue
            started = time.perf_counter()
            solve_remat(instance, solver, time_limit=1)
            assert time.perf_counter() - started <= 2, (instance.name, solver)
