"""CP-SAT model of expert placement, exact on the formats.md 3.2 cost (replicas included).

Exactness with replicas. An expert with r replicas puts 1/r of its tokens on each host. With
R = `max_replicas` the possible r are 1..R; scaling every load by S = lcm(1, ..., R) makes each
share S/r an integer, so all loads, per-batch maxima and the objective are integers and CP-SAT
optimises the 3.2 cost times S * (number of batches) with no rounding: replicas[e] = sum_d x[e, d],
share[e] = S / replicas[e] (an element constraint over the table S/1, ..., S/R) and
q[e, d] = share[e] if x[e, d] else 0 (two half-reified equalities).

Model (OR-Tools sample structure):
  data        distinct batches u with counts c[u, e] and multiplicity m[u] (`aggregate`: identical
              batches merged; large b just has few rows of per-expert counts)
  variables   x[e, d] bool (e hosted on d), replicas, share, q as above, M[u] integer (scaled
              batch cost, from its `batch_lower_bounds` value lows[u] up; with replicas and small
              loads only over the loads a device can carry, `_cost_domains`). With a spread token
              (below) and no batch able to cost more than lows[u] + _SMALL_EXCESS (b = 1, k <= G),
              M[u] = lows[u] + over[u] + above[u] with a boolean over[u] ("above its bound") and
              above[u] > 0 only if over[u]
  search      with 2 workers, two full bound-proving searches (CP-SAT's default would run one
              and give the other thread to neighbourhood search, which the local-search warm
              start makes redundant): the LP-based search, or core-based search (MaxSAT style: it
              raises the bound core by core) where batch costs move in coarse steps (the split
              M[u] above, few cost values and no batch pinned by dominance as at b <= 8, or
              replica cost domains whose first step is at least one share S/R); beside it
              objective lower-bound search (it tries to reach the current bound and raises it
              when it cannot), which raised the bound most at b = 1 with k = G
  constraints 1 <= replicas[e] <= R (R = 1: q = x, exactly one host); sum_e x[e, d] <= C (= C
              without spare slots); M[u] >= sum_e c[u, e] q[e, d] for every d (and, stated so that
              it propagates, <= lows[u] when over[u] is false);
              redundant, for the LP: sum_d q[e, d] = S, sum_e replicas[e] <= C*G and
              M[u] >= c[u, e] share[e] (the replica-count relaxation of `replica_bound`);
              dominance: M[u] = lows[u] for the batches too heavy to exceed their bound in any
              placement better than the warm start (`dominant_batches`);
              symmetry (devices are identical): without spare slots, if a dominant token must have
              its experts on distinct devices, its i-th expert is on device i and the other devices
              are ordered by their smallest expert (`_spread_token`), else expert e sits on a device
              d <= e (relabel devices by their smallest expert); with replicas the devices'
              smallest experts are non-decreasing, empty devices last (sort devices by them: a
              shared smallest expert only leaves ties). `canonical` puts the warm start in this form.
              None with a migration term: transfers depend on the device labels.
  objective   minimise sum_u m[u] M[u] (+ migration_weight * transfers, scaled likewise)
The proven bound is CP-SAT's best objective bound over S * (number of batches), capped by the warm
start's cost when dominance constraints are present; it is a bound on the pure 3.2 cost only when
migration_weight = 0. (This share encoding proved EPLB's README example about twice as fast as
enumerating replica counts with one boolean per (e, d, r).)
Two relaxations prove bounds fast where this model's own bound is weak: `replica_bound` (spare
slots) and `colocation_bound` (no spare slot).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from ortools.sat.python import cp_model
from pipesched.solvers._interrupt import Deadline, solve_interruptibly
from pipesched.solvers._placement_common import Batches, Devices, batch_lower_bounds, canonical, max_replicas
from tqdm.auto import tqdm

from pipesched.placement import PlacementInstance


class CpsatOutcome(NamedTuple):
    devices: Devices | None  # None when CP-SAT found no solution in time
    bound: float | None  # proven lower bound on the 3.2 cost (None with a migration term)
    optimal: bool  # the objective is proven minimal
    interrupted: bool = False  # Ctrl-C stopped the search (`_interrupt.solve_interruptibly`)


class _Bar(cp_model.CpSolverSolutionCallback):
    def __init__(self, bar: tqdm, scale: float):
        super().__init__()
        self.bar, self.scale = bar, scale

    def on_solution_callback(self) -> None:
        self.bar.update(1)
        self.bar.set_postfix(objective=f"{self.objective_value / self.scale:.4f}",
                             bound=f"{self.best_objective_bound / self.scale:.4f}")


def solve_cpsat(
    instance: PlacementInstance,
    batches: Batches,
    hint: Sequence[Sequence[int]],
    *,
    time_limit: float,
    workers: int = 2,
    seed: int = 0,
    current: Sequence[Sequence[int]] | None = None,
    migration_weight: float = 0.0,
    progress: bool = False,
) -> CpsatOutcome:
    """The model (module docstring) solved within `time_limit` seconds, model building included
    (a model whose building outlasts it is not solved: no placement, no bound)."""
    # data
    deadline = Deadline(time_limit)
    E, G, C = instance.num_experts, instance.num_devices, instance.slots_per_device
    R = max_replicas(instance)
    S = math.lcm(*range(1, R + 1))
    counts = batches.counts
    num_batches = int(batches.multiplicity.sum())
    model = cp_model.CpModel()

    # variables
    x = {(e, d): model.new_bool_var(f"x[{e},{d}]") for e in range(E) for d in range(G)}
    shares = [S // r for r in range(1, R + 1)]
    if R == 1:  # no spare slot: every expert has one replica, q = x
        replicas, share, q = [], [], x
    else:
        replicas = [model.new_int_var(1, R, f"replicas[{e}]") for e in range(E)]
        share = [model.new_int_var_from_domain(cp_model.Domain.from_values(shares), f"share[{e}]") for e in range(E)]
        q = {(e, d): model.new_int_var_from_domain(cp_model.Domain.from_values([0, *shares]), f"q[{e},{d}]")
             for e in range(E) for d in range(G)}
    lows = np.ceil(batch_lower_bounds(instance, batches) * S - 1e-6).astype(int)
    highs = counts.sum(axis=1) * S
    labelled = migration_weight > 0 and current is not None  # transfers depend on device labels
    hint = [sorted(d) for d in hint] if labelled else canonical(hint)
    domains = _cost_domains(instance, counts, lows, R, S) if R > 1 and highs.max() <= _DOMAIN_MAX_LOAD else None
    if domains is not None:  # the smallest load a device can carry at or above the bound
        lows = np.array([values[0] for values in domains])
    warm_costs = (counts @ _scaled_hosting(hint, E, S)).max(axis=1)
    hard = [] if labelled else dominant_batches(batches, lows, warm_costs)
    spread = _spread_token(counts, lows, hard) if R == 1 else None
    if domains is not None:  # core-based search when every step up a batch cost is at least S / R
        core = all(len(values) == 1 or values[1] - values[0] >= S // R for values in domains)
    else:  # ... or batch costs have few values (e.g. b <= 8) and no batch is pinned without a spread token
        core = (spread is not None or not hard) and bool(np.all(highs - lows <= _SMALL_EXCESS))
    split = core and spread is not None  # M[u] = lows[u] + over[u] + above[u]
    over = {u: model.new_bool_var(f"over[{u}]") for u in range(len(counts)) if split and highs[u] > lows[u]}
    above = {u: model.new_int_var(0, int(highs[u] - lows[u] - 1), f"above[{u}]") for u in over}
    if domains is not None:
        M = [model.new_int_var_from_domain(cp_model.Domain.from_values(values), f"M[{u}]")
             for u, values in enumerate(domains)]
    else:
        M = [int(lows[u]) + over[u] + above[u] if u in over else
             model.new_int_var(int(lows[u]), int(highs[u]), f"M[{u}]") for u in range(len(counts))]

    # constraints
    for d in range(G):  # (without spare slots every device is full)
        model.add(sum(x[e, d] for e in range(E)) == C if instance.num_slots == E else
                  sum(x[e, d] for e in range(E)) <= C)
    for u, v in over.items():  # M[u] = lows[u] + over[u] + above[u], above[u] > 0 only if over[u]
        model.add(above[u] == 0).only_enforce_if(~v)
    for e in range(E):
        if R == 1:
            model.add_exactly_one(x[e, d] for d in range(G))
            continue
        model.add(replicas[e] == sum(x[e, d] for d in range(G)))
        model.add_element(replicas[e], [0, *shares], share[e])
        for d in range(G):
            model.add(q[e, d] == share[e]).only_enforce_if(x[e, d])
            model.add(q[e, d] == 0).only_enforce_if(~x[e, d])
        model.add(sum(q[e, d] for d in range(G)) == S)  # redundant: r hosts carry S / r each
    if R > 1:  # redundant: the replica-count relaxation (`replica_bound`) inside the model
        model.add(sum(replicas) <= instance.num_slots)
        for u, row in enumerate(counts):
            for e in np.flatnonzero(row):
                model.add(M[u] >= int(row[e]) * share[e])
    for u in hard:
        model.add(M[u] <= int(lows[u]))
    if spread is not None:  # its experts sit on distinct devices: name the devices after them
        for d, e in enumerate(spread):
            model.add(x[e, d] == 1)
        rest = [e for e in range(E) if e not in set(spread)]
        for rank, e in enumerate(rest):
            for d in range(len(spread) + rank + 1, G):
                model.add(x[e, d] == 0)
    elif R == 1 and not labelled:
        for e in range(E):
            for d in range(e + 1, G):
                model.add(x[e, d] == 0)
    elif not labelled:
        for d in range(G - 1):  # e on d + 1: d hosts an expert <= e
            if deadline.passed():
                return CpsatOutcome(None, None, False)
            column = [x[f, d] for f in range(E)]
            for e in range(E):
                model.add(cp_model.LinearExpr.sum(column[:e + 1]) >= x[e, d + 1])
    for u, row in enumerate(counts):
        if deadline.passed():
            return CpsatOutcome(None, None, False)
        used = np.flatnonzero(row)
        weights = [int(row[e]) for e in used]
        for d in range(G):
            load = cp_model.LinearExpr.weighted_sum([q[e, d] for e in used], weights)
            model.add(load <= M[u])
            if u in over:  # the same when over[u] is false, stated so that it propagates
                model.add(load <= int(lows[u])).only_enforce_if(~over[u])

    # objective
    objective = sum(int(m) * M[u] for u, m in enumerate(batches.multiplicity))
    if migration_weight > 0 and current is not None:
        was = {(e, d) for d, experts in enumerate(current) for e in experts}
        price = migration_weight * S * num_batches
        objective += sum(price * x[e, d] for e in range(E) for d in range(G) if (e, d) not in was)
    model.minimize(objective)

    if spread is not None:
        hint = _name_devices_after(hint, spread)
    if hint is not None:
        _add_hint(model, hint, E, x, replicas, share, q, S)
        for u, var in enumerate(M):
            if isinstance(var, cp_model.IntVar):  # (costs split into over/above: hinted below)
                model.add_hint(var, int(warm_costs[u]))
        for u, v in over.items():
            model.add_hint(v, warm_costs[u] > lows[u])
            model.add_hint(above[u], max(0, warm_costs[u] - lows[u] - 1))

    # solve
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(deadline.left(), 0.01)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    if workers == 2:  # two full bound-proving searches (see the module docstring)
        solver.parameters.subsolvers.extend(["core" if core else "default_lp", "objective_lb_search"])
        solver.parameters.num_full_subsolvers = 2
    with tqdm(desc="cpsat", disable=not progress, leave=False) as bar:
        status, interrupted = solve_interruptibly(solver, model, _Bar(bar, S * num_batches))
    scale = S * num_batches
    warm_cost = float(batches.multiplicity @ warm_costs) / scale
    if migration_weight > 0:
        bound = None
    elif status == cp_model.INFEASIBLE and hard:  # every placement violates a dominant batch
        return CpsatOutcome(None, warm_cost, True, interrupted)
    else:  # the optimum is the warm start's or one obeying `hard`
        bound = min(solver.best_objective_bound / scale, warm_cost) if hard else solver.best_objective_bound / scale
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpsatOutcome(None, bound, False, interrupted)
    devices = [[e for e in range(E) if solver.boolean_value(x[e, d])] for d in range(G)]
    return CpsatOutcome(devices, bound, status == cp_model.OPTIMAL and migration_weight == 0, interrupted)


def dominant_batches(batches: Batches, lows: np.ndarray, warm: np.ndarray) -> list[int]:
    """Batches that no placement better than the warm start can push above their scaled bound.

    Scaled costs are integers and every batch costs at least lows[u], so a placement with
    M[u] > lows[u] has objective >= sum_v m[v] lows[v] + m[u]. When m[u] is at least the warm
    start's excess sum_v m[v] (warm[v] - lows[v]), that is no better than the warm start: the
    optimum is the warm start or a placement with M[u] = lows[u] for all these batches, so adding
    that constraint keeps min(warm start, constrained optimum) = the optimum, and
    min(warm cost, constrained bound) is a proven bound. Without any placement meeting them, the
    warm start is optimal.
    """
    excess = int(batches.multiplicity @ (warm - lows))
    return [u for u, m in enumerate(batches.multiplicity) if excess > 0 and m >= excess]


def _cost_domains(instance: PlacementInstance, counts: np.ndarray, lows: np.ndarray, R: int,
                  S: int) -> list[list[int]]:
    """With replicas: for each batch, the scaled loads one device can carry that are >= lows[u].

    A device's scaled load in batch u is sum_e c[u, e] * S / r(e) over the batch's experts it
    hosts, where 1 <= r(e) <= R and sum_e (r(e) - 1) <= C*G - E (every extra replica takes a
    spare slot, so the experts of one device use at most all of them). The batch cost is one such
    load (the largest) and at least lows[u], so M[u] ranges over these values only: the smallest
    is a per-batch bound at least lows[u], and the gap to the next is the least step up.
    Batches with the same expert counts share the values (computed once, a reachability table
    over (spare slots used, load)).
    """
    spare = instance.num_slots - instance.num_experts
    cache: dict[tuple[int, ...], np.ndarray] = {}
    domains = []
    for u, row in enumerate(counts):
        key = tuple(sorted(int(c) for c in row if c))
        if key not in cache:
            reach = np.zeros((spare + 1, sum(key) * S + 1), dtype=bool)  # [spare slots used, load]
            reach[0, 0] = True
            for c in key:
                grown = reach.copy()
                for r in range(1, min(R, spare + 1) + 1):
                    step = c * S // r
                    grown[r - 1:, step:] |= reach[:spare + 2 - r, :reach.shape[1] - step]
                reach = grown
            cache[key] = np.flatnonzero(reach.any(axis=0))
        values = cache[key]
        domains.append([int(v) for v in values[values >= lows[u]]])
    return domains


def _scaled_hosting(devices: Devices, num_experts: int, S: int) -> np.ndarray:
    """(E, G): S / r(e) where device d hosts expert e (r(e) = its number of hosts), else 0."""
    copies = np.zeros(num_experts, dtype=int)
    for experts in devices:
        copies[experts] += 1
    scaled = np.zeros((num_experts, len(devices)), dtype=np.int64)
    for d, experts in enumerate(devices):
        scaled[experts, d] = S // copies[experts]
    return scaled


def _spread_token(counts: np.ndarray, lows: np.ndarray, hard: list[int]) -> list[int] | None:
    """Without spare slots, a constrained batch with M[u] = lows[u] = 1 has its experts on distinct
    devices (each counts >= 1): the largest such batch's experts, to fix on devices 0, 1, ...
    (devices are identical, so they may be named after them; see `solve_cpsat`)."""
    spread = [u for u in hard if lows[u] == 1]
    if not spread:
        return None
    u = max(spread, key=lambda v: np.count_nonzero(counts[v]))
    return [int(e) for e in np.flatnonzero(counts[u])]


def _name_devices_after(devices: Devices, spread: list[int]) -> Devices | None:
    """`devices` relabelled to the form `solve_cpsat` fixes: the host of spread[i] is device i, the
    other devices by their smallest expert; None if two spread experts share a device."""
    host = {e: d for d, experts in enumerate(devices) for e in experts}
    first = [host[e] for e in spread]
    if len(set(first)) < len(first):
        return None
    others = sorted((d for d in range(len(devices)) if d not in set(first)), key=lambda d: min(devices[d]))
    return [sorted(devices[d]) for d in first + others]


def replica_bound(instance: PlacementInstance, batches: Batches, *, time_limit: float, workers: int = 2,
                  seed: int = 0) -> float:
    """A proven lower bound on the 3.2 cost with spare slots: the replica-count relaxation.

    Every placement has replica counts r with 1 <= r(e) <= R (`max_replicas`) and
    sum_e (r(e) - 1) <= C*G - E (each replica takes a spare slot). For such an r, every batch u
    costs at least c[u, e] / r(e) for each expert (each host of e carries that), at least
    T_u / G (the loads sum to T_u = sum_e c[u, e]) and at least its `batch_lower_bounds` entry.
    Scaled by S = lcm(1, ..., R) every load is an integer, so the scaled cost is at least the
    ceiling of each of these. Minimising the weighted sum of these per-batch maxima over all
    feasible r (forgetting which devices host what) is a relaxation, so CP-SAT's proven objective
    bound on it (the optimum when solved) bounds every placement's cost from below. Unlike the
    per-batch bounds it knows that only C*G - E spare slots exist: at b = 1 a token costs less
    than 1 only when all its experts are replicated.
    """
    # data
    deadline = Deadline(time_limit)  # (model building included)
    E, G, spare = instance.num_experts, instance.num_devices, instance.num_slots - instance.num_experts
    R = max_replicas(instance)
    S = math.lcm(*range(1, R + 1))
    counts = batches.counts
    lows = np.ceil(np.maximum(batch_lower_bounds(instance, batches), counts.sum(axis=1) / G) * S - 1e-6)
    model = cp_model.CpModel()

    # variables: y[e, r] = expert e has r replicas; M[u] = scaled cost of batch u
    y = {(e, r): model.new_bool_var(f"y[{e},{r}]") for e in range(E) for r in range(1, R + 1)}
    M = [model.new_int_var(int(lows[u]), int(row.sum()) * S, f"M[{u}]") for u, row in enumerate(counts)]

    # constraints
    for e in range(E):
        model.add_exactly_one(y[e, r] for r in range(1, R + 1))
    model.add(sum((r - 1) * y[e, r] for e in range(E) for r in range(2, R + 1)) <= spare)
    shares = [S // r for r in range(1, R + 1)]
    trivial = float(batches.multiplicity @ lows)
    for u, row in enumerate(counts):
        if deadline.passed():  # building outlasted the time limit: the per-batch bounds only
            return trivial / (S * int(batches.multiplicity.sum()))
        for e in np.flatnonzero(row):
            model.add(M[u] >= cp_model.LinearExpr.weighted_sum([y[e, r] for r in range(1, R + 1)],
                                                                [int(row[e]) * share for share in shares]))

    # objective
    model.minimize(cp_model.LinearExpr.weighted_sum(M, [int(m) for m in batches.multiplicity]))

    # solve: any proven objective bound is valid, optimal or not
    relaxed = max(trivial, _proven_bound(model, deadline.left(), workers, seed))
    return relaxed / (S * int(batches.multiplicity.sum()))


# batches whose cost can exceed their bound by at most this (scaled) count as having few cost
# values (core-based search; with a spread token, a boolean "above its bound" each)
_SMALL_EXCESS = 16

# with replicas, batch costs range over `_cost_domains` up to this scaled load (b = 1: k * S)
_DOMAIN_MAX_LOAD = 16384

# transitivity clauses (3 per expert triple) are added up to this many experts
TRANSITIVE_MAX_EXPERTS = 32


def colocation_bound(instance: PlacementInstance, batches: Batches, *, time_limit: float, workers: int = 2,
                     seed: int = 0) -> float:
    """A proven lower bound on the 3.2 cost without spare slots: the co-location relaxation.

    Without spare slots (C*G = E) every device holds exactly C experts, one copy each, so
    "a and b share a device" is an equivalence relation whose classes have exactly C members:
    s[a, b] booleans, each expert related to exactly C - 1 others, and (for E <= 32) transitive.
    A batch whose experts a, b share a device costs at least c[u, a] + c[u, b], and at least its
    `batch_lower_bounds` entry. Devices are unlabelled here (no symmetry), so CP-SAT proves this
    relaxation far faster than the placement model: at b = 1 it decides which tokens can have all
    experts on distinct devices (cost 1) and which must pay 2. Its proven objective bound bounds
    every placement's cost from below (dropping transitivity for large E only weakens it).
    """
    # data
    deadline = Deadline(time_limit)  # (model building included)
    E, C = instance.num_experts, instance.slots_per_device
    if instance.num_slots != E:
        raise ValueError(f"colocation_bound needs C*G = E (no spare slot), got {instance.num_slots} slots for {E} "
                         "experts; use replica_bound")
    counts = batches.counts
    lows = np.ceil(batch_lower_bounds(instance, batches) - 1e-9).astype(int)  # loads are integers
    model = cp_model.CpModel()

    # variables: s[a, b] (a < b) = a and b share a device; M[u] = cost of batch u
    s = {pair: model.new_bool_var(f"s[{pair[0]},{pair[1]}]") for pair in itertools.combinations(range(E), 2)}
    M = [model.new_int_var(int(lows[u]), int(row.sum()), f"M[{u}]") for u, row in enumerate(counts)]

    # constraints
    for a in range(E):
        model.add(sum(s[min(a, b), max(a, b)] for b in range(E) if b != a) == C - 1)
    if E <= TRANSITIVE_MAX_EXPERTS:
        for a, b, c in itertools.combinations(range(E), 3):
            for x, y, z in ((s[a, b], s[b, c], s[a, c]), (s[a, b], s[a, c], s[b, c]), (s[a, c], s[b, c], s[a, b])):
                model.add_bool_or([~x, ~y, z])
    for u, row in enumerate(counts):
        for a, b in itertools.combinations(np.flatnonzero(row), 2):
            if row[a] + row[b] > lows[u]:
                model.add(M[u] >= int(row[a] + row[b])).only_enforce_if(s[a, b])

    # objective
    model.minimize(sum(int(m) * M[u] for u, m in enumerate(batches.multiplicity)))

    # solve: any proven objective bound is valid, optimal or not
    relaxed = max(float(batches.multiplicity @ lows), _proven_bound(model, deadline.left(), workers, seed))
    return relaxed / int(batches.multiplicity.sum())


def _add_hint(model: cp_model.CpModel, devices: Devices, E: int, x, replicas, share, q, S: int) -> None:
    """Warm start: the hosting variables of a known placement (in the form the model's symmetry
    breaking expects); the caller hints the batch costs."""
    G = len(devices)
    scaled = _scaled_hosting(devices, E, S)
    for e in range(E):
        if replicas:
            copies = int(np.count_nonzero(scaled[e]))
            model.add_hint(replicas[e], copies)
            model.add_hint(share[e], S // copies)
        for d in range(G):
            model.add_hint(x[e, d], bool(scaled[e, d]))
            if replicas:
                model.add_hint(q[e, d], int(scaled[e, d]))


def _proven_bound(model: cp_model.CpModel, time_limit: float, workers: int, seed: int) -> float:
    """CP-SAT's proven objective bound of `model` after at most `time_limit` seconds. It may be NaN
    when the search stopped before any bound: callers write max(own_bound, this), own bound first,
    since max(x, nan) is x. Ctrl-C raises KeyboardInterrupt once the search has stopped."""
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit, 0.01)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    if solve_interruptibly(solver, model)[1]:
        raise KeyboardInterrupt
    return float(solver.best_objective_bound)
