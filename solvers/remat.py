"""`solve_remat`: every remat solver behind one entry point (formats.md section 2).

Solvers (CLI names in `REMAT_SOLVERS`):
* ``cpsat``: exact CP-SAT on any graph (`_remat_cpsat`), warm-started from ``greedy``; returns the
  best schedule found and CP-SAT's proven bound (anytime).
* ``chain-dp``: only for chain graphs. Up to `EXACT_CHAIN_LAYERS` layers the exact DP over
  resident sets (`_remat_chain_exact`: optimal, or a proof of infeasibility); longer chains get
  the Rotor DP (`_remat_chain_dp`), optimal over persistent-checkpoint schedules only, so its
  schedule is "feasible" with the no-remat bound.
* ``checkpoint-all``, ``sqrt-n``, ``chen-greedy``: the baselines (`_remat_heuristics`).
* ``greedy``: the cheapest schedule of all heuristics: the baselines, the budget-aware eviction
  greedy on two orders, and the chain DP on chains (on VGG16/VGG19 the Rotor DP's schedule is
  already optimal, so CP-SAT starts from it and only has to prove it).

Every returned schedule goes through `validate_remat`. Lower bounds (`_remat_bounds`): the
no-remat cost always, CP-SAT's bound when its model is exact. Status "infeasible" when the
budget is below `smallest_peak`, the exact CP-SAT model has no solution, or (when a solver finds no
schedule) the exhaustive search of `exhaustively_feasible` finds none; "unknown" when a solver finds
no schedule and no proof.

Time: every solver stops trying candidates (and the DPs their tables) once `time_limit` has passed;
CP-SAT's model building counts. Ctrl-C returns the best schedule so far (or "unknown" with the
no-remat bound), with `interrupted` set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from pipesched.solvers import _remat_heuristics as heuristics
from pipesched.solvers._interrupt import Deadline
from pipesched.solvers._remat_bounds import copy_caps, exhaustively_feasible, proven_infeasible
from pipesched.solvers._remat_chain_dp import (
    MAX_TABLE_ENTRIES,
    chain_computes,
    chain_tables,
    discretise,
)
from pipesched.solvers._remat_chain_exact import EXACT_CHAIN_LAYERS, exact_chain
from pipesched.solvers._remat_cpsat import solve_cpsat
from pipesched.solvers._remat_steps import Step, computes_of, steps_from_computes
from pipesched.solvers._names import REMAT_SOLVERS
from pipesched.solvers._result import Result

from pipesched._common import FormatError, approx_eq, approx_le, approx_lt
from pipesched.remat import (
    ChainLayout,
    RematInstance,
    RematSchedule,
    chain_layout,
    evaluate_steps,
    validate_remat,
)

GREEDY_CHAIN_LAYERS = 200  # `greedy` includes the chain DP up to this many layers
MAX_COPIES = 64  # per node in the CP-SAT model; above it the model is clipped (not exact)
WARM_SHARE = 0.5  # most of the time the `greedy` warm start may take
REORDER_SHARE = 0.25  # share of the time for a first no-remat model (one copy per node): a new order
SEARCH_COPIES = 2  # copies per node in a search-only round (the proven caps are too large)
SEARCH_SHARE = 0.3  # share of the time left for a search-only round (its better cost shrinks the caps)
MAX_READ_LITERALS = 200_000  # size guard for the CP-SAT model


def solve_remat(instance: RematInstance, solver: str = "cpsat", time_limit: float = 60.0, *,
                workers: int = 2, seed: int = 0, progress: bool = False) -> Result:
    """Solve `instance` with `solver` (one of `REMAT_SOLVERS`) within `time_limit` seconds."""
    if solver not in REMAT_SOLVERS:
        raise ValueError(f"unknown remat solver {solver!r}: choose one of {', '.join(REMAT_SOLVERS)}")
    started = time.perf_counter()
    deadline = Deadline(time_limit, started)
    if proven_infeasible(instance):
        return _finish(instance, [], instance.total_cost, "infeasible", solver, started)
    if solver == "chain-dp":
        return _chain_dp(instance, deadline, started)
    if solver == "cpsat":
        return _cpsat(instance, time_limit, deadline, workers, seed, progress, started)
    candidates = _greedy(instance, deadline) if solver == "greedy" else HEURISTICS[solver](instance)
    best, interrupted = _cheapest(instance, candidates, deadline)
    return _heuristic_result(instance, best, solver, started, interrupted)


# --------------------------------------------------------------------------------------------
# Heuristics


def _checkpoint_all(instance: RematInstance) -> Iterator[list[int]]:
    yield heuristics.checkpoint_all(instance)


def _sqrt_n(instance: RematInstance) -> Iterator[list[int]]:
    for candidates in heuristics.candidate_sets(instance):
        yield heuristics.checkpointed(instance, heuristics.sqrt_n_checkpoints(candidates))


def _chen_greedy(instance: RematInstance) -> Iterator[list[int]]:
    for candidates in heuristics.candidate_sets(instance):
        seen = set()
        for threshold in heuristics.chen_thresholds(instance):
            checkpoints = tuple(heuristics.chen_greedy_checkpoints(instance, candidates, threshold))
            if checkpoints not in seen:
                seen.add(checkpoints)
                yield heuristics.checkpointed(instance, checkpoints)


def _greedy(instance: RematInstance, deadline: Deadline) -> Iterator[list[int]]:
    """Every heuristic's candidates, the budget-aware ones first (they fit where the baselines do
    not, so a deadline that cuts this short still tends to leave a schedule)."""
    yield from _checkpoint_all(instance)
    orders = (None, heuristics.memory_aware_order(instance))
    for order in orders:
        for score in heuristics.EVICTION_SCORES:
            computes = heuristics.eviction_greedy(instance, score, order)
            if computes is not None:
                yield computes
    layout = chain_layout(instance)
    if layout is not None and layout.chain.length <= GREEDY_CHAIN_LAYERS:
        computes = _chain_dp_computes(instance, layout, deadline)
        if computes is not None:
            yield computes
    yield from _sqrt_n(instance)
    yield from _chen_greedy(instance)


HEURISTICS: dict[str, Callable[[RematInstance], Iterator[list[int]]]] = {  # ("greedy": `_greedy`)
    "checkpoint-all": _checkpoint_all, "sqrt-n": _sqrt_n, "chen-greedy": _chen_greedy,
}


def _cheapest(instance: RematInstance, candidates: Iterator[list[int]], deadline: Deadline
              ) -> tuple[tuple[list[Step], float] | None, bool]:
    """(the cheapest candidate that fits the budget as (steps, cost), interrupted), over the
    candidates produced until `deadline` (at least one) or a Ctrl-C."""
    best = None
    try:
        for computes in candidates:
            best = _better(instance, best, computes)
            if deadline.passed():
                break
    except KeyboardInterrupt:
        return best, True
    return best, False


def _heuristic_result(instance: RematInstance, best: tuple[list[Step], float] | None, solver: str,
                      started: float, interrupted: bool) -> Result:
    lower = instance.total_cost
    if best is None:
        return _no_schedule(instance, lower, solver, started, interrupted)
    return _finish(instance, best[0], lower, "optimal" if approx_eq(best[1], lower) else "feasible",
                   solver, started, interrupted)


# --------------------------------------------------------------------------------------------
# Exact solvers


def _chain_dp(instance: RematInstance, deadline: Deadline, started: float) -> Result:
    layout = chain_layout(instance)
    if layout is None:
        raise FormatError(f"{instance.name}: chain-dp needs a chain graph (pipesched.remat.chain_instance); "
                          "use --solver cpsat for other graphs")
    if layout.chain.length <= EXACT_CHAIN_LAYERS:
        exact = exact_chain(layout, instance.budget)
        if exact.cost is None:
            return _finish(instance, [], instance.total_cost, "infeasible", "chain-dp", started)
        return _proven(instance, steps_from_computes(instance, exact.computes), exact.cost, "chain-dp", started)
    try:
        computes = _chain_dp_computes(instance, layout, deadline)
    except KeyboardInterrupt:
        return _finish(instance, [], instance.total_cost, "unknown", "chain-dp", started, interrupted=True)
    if computes is None:
        return _no_schedule(instance, instance.total_cost, "chain-dp", started, False)
    return _proven(instance, steps_from_computes(instance, computes), instance.total_cost, "chain-dp", started)


def _chain_dp_computes(instance: RematInstance, layout: ChainLayout, deadline: Deadline) -> list[int] | None:
    """The Rotor DP's schedule; None when it has none or its tables outlast `deadline`."""
    chain, n = layout.chain, layout.chain.length
    grid = discretise(chain.output_size, chain.gradient_size, instance.budget,
                      max(1, min(4096, MAX_TABLE_ENTRIES // (n * n) - 1)))
    tables = chain_tables(chain.forward_cost, chain.backward_cost, grid.x, grid.g, grid.budget, deadline=deadline)
    return None if tables is None or tables.optimum == float("inf") else chain_computes(tables, layout)


def _cpsat(instance: RematInstance, time_limit: float, deadline: Deadline, workers: int, seed: int,
           progress: bool, started: float) -> Result:
    """Warm start from `greedy` (for at most WARM_SHARE of the time). Unless that already costs the
    no-remat bound, first look for an order that needs no recomputation (one copy per node; found
    = optimal). The proven copy caps shrink as the best known cost falls, so while they are too
    large for an exact model (clipped), spend part of the time looking for a cheaper schedule;
    then solve the exact model with all the time left (stopping an exact solve to restart with the
    tighter caps of a better cost was slower on VGG19_b80 and fcn_8_vgg_b80). Every exact round's
    bound is a proof, and so is its infeasibility; the best is kept. Every round ends by
    `deadline`, model building included; Ctrl-C keeps the best schedule and bound so far."""
    best, interrupted = _cheapest(instance, _greedy(instance, Deadline(time_limit * WARM_SHARE, started)), deadline)
    bound, stalled = instance.total_cost, False
    try:
        if not interrupted and (best is None or not approx_eq(best[1], bound)):  # an order with no remat?
            reorder = solve_cpsat(instance, [1] * len(instance.nodes), None,
                                  deadline=Deadline(min(deadline.left(), time_limit * REORDER_SHARE)),
                                  workers=workers, seed=seed, progress=progress, caps_exact=False)
            best, interrupted = _better(instance, best, reorder.computes), reorder.interrupted
        while not interrupted and not deadline.passed() and not approx_eq(best[1] if best else -1, bound):
            caps = copy_caps(instance, None if best is None else best[1])
            hint = None if best is None else computes_of(instance, best[0])
            clipped = _clip(instance, caps)
            exact = clipped == caps
            if not exact:  # a search-only round: a small model finds cheaper schedules fast
                used = [0] * len(caps) if hint is None else [hint.count(v) for v in range(len(caps))]
                clipped = [min(c, max(SEARCH_COPIES, k)) for c, k in zip(caps, used)]
            share = 1.0 if exact or stalled else SEARCH_SHARE
            outcome = solve_cpsat(instance, clipped, hint, deadline=Deadline(deadline.left() * share),
                                  workers=workers, seed=seed, progress=progress, caps_exact=exact)
            if outcome.proven_infeasible:
                return _finish(instance, [], instance.total_cost, "infeasible", "cpsat", started)
            if outcome.exact:
                bound = max(bound, outcome.bound)
            previous = best
            best, interrupted = _better(instance, best, outcome.computes), outcome.interrupted
            if outcome.proven_optimal or exact or (stalled and not exact):
                break
            stalled = best is previous
    except KeyboardInterrupt:  # (outside a CP-SAT search: greedy, model building, read back)
        interrupted = True
    if best is None:
        return _no_schedule(instance, bound, "cpsat", started, interrupted)
    return _proven(instance, best[0], bound, "cpsat", started, interrupted)


def _better(instance: RematInstance, best: tuple[list[Step], float] | None, computes: list[int] | None
            ) -> tuple[list[Step], float] | None:
    """`best` or the schedule of `computes`, whichever fits and costs less."""
    if computes is None:
        return best
    steps = steps_from_computes(instance, computes)
    cost, peak = evaluate_steps(instance, steps, enforce_budget=False)
    return (steps, cost) if approx_le(peak, instance.budget) and (best is None or cost < best[1]) else best


def _clip(instance: RematInstance, caps: list[int]) -> list[int]:
    """`caps` clipped to MAX_COPIES and to what keeps the model within MAX_READ_LITERALS."""
    limit = MAX_COPIES
    while limit > 2 and _read_literals(instance, [min(c, limit) for c in caps]) > MAX_READ_LITERALS:
        limit //= 2
    return [min(c, limit) for c in caps]


def _read_literals(instance: RematInstance, caps: list[int]) -> int:
    return sum(caps[v] * caps[u] for v, deps in enumerate(instance.dep_indices) for u in deps if caps[u] > 1)


def _proven(instance: RematInstance, steps: list[Step], bound: float, solver: str, started: float,
            interrupted: bool = False) -> Result:
    """A schedule with a proven bound: "optimal" when the bound meets its cost."""
    cost = evaluate_steps(instance, steps).cost
    if approx_lt(cost, bound):
        raise RuntimeError(f"{instance.name}: {solver} found cost {cost} below its proven bound {bound}; "
                           "this is a bug, please report it with the instance")
    if approx_eq(bound, cost):
        return _finish(instance, steps, cost, "optimal", solver, started, interrupted)
    return _finish(instance, steps, bound, "feasible", solver, started, interrupted)


def _no_schedule(instance: RematInstance, bound: float, solver: str, started: float, interrupted: bool) -> Result:
    """No schedule found: "infeasible" when the exhaustive search proves that none exists (not
    tried after a Ctrl-C), else "unknown" with `bound`."""
    if not interrupted and exhaustively_feasible(instance) is False:
        return _finish(instance, [], instance.total_cost, "infeasible", solver, started)
    return _finish(instance, [], bound, "unknown", solver, started, interrupted)


def _finish(instance: RematInstance, steps: list[Step], lower_bound: float, status: str, solver: str,
            started: float, interrupted: bool = False) -> Result:
    """Build the result file object and check it with the project's validator."""
    elapsed = time.perf_counter() - started
    if steps:
        schedule = RematSchedule.from_steps(instance, steps, lower_bound=lower_bound, status=status,
                                            solver=solver, solve_time_s=elapsed)
    else:
        schedule = RematSchedule.empty(instance, status=status, lower_bound=lower_bound, solver=solver,
                                       solve_time_s=elapsed)
    validate_remat(schedule)
    return Result.of(schedule, interrupted)
