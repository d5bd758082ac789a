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
              batch cost, from its `batch_lower_bounds` up)
  constraints 1 <= replicas[e] <= R (R = 1: q = x, exactly one host); sum_e x[e, d] <= C;
              M[u] >= sum_e c[u, e] q[e, d] for every d;
              symmetry (devices are identical): without spare slots expert e sits on a device
              d <= e (relabel devices by their smallest expert); with replicas device 0 hosts
              expert 0 (relabel one of its hosts as 0). `canonical` puts the warm start in this form.
  objective   minimise sum_u m[u] M[u] (+ migration_weight * transfers, scaled likewise)
The proven bound is CP-SAT's best objective bound over S * (number of batches); it is a bound on
the pure 3.2 cost only when migration_weight = 0. (This share encoding proved EPLB's README
example about twice as fast as enumerating replica counts with one boolean per (e, d, r).)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from ortools.sat.python import cp_model
from pipesched.solvers._placement_common import Batches, Devices, batch_lower_bounds, canonical, max_replicas
from tqdm.auto import tqdm

from pipesched.placement import PlacementInstance


class CpsatOutcome(NamedTuple):
    devices: Devices | None  # None when CP-SAT found no solution in time
    bound: float | None  # proven lower bound on the 3.2 cost (None with a migration term)
    optimal: bool  # the objective is proven minimal


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
    # data
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
    M = [model.new_int_var(int(lows[u]), int(counts[u].sum()) * S, f"M[{u}]") for u in range(len(counts))]

    # constraints
    for d in range(G):
        model.add(sum(x[e, d] for e in range(E)) <= C)
    for e in range(E):
        if R == 1:
            model.add_exactly_one(x[e, d] for d in range(G))
            continue
        model.add(replicas[e] == sum(x[e, d] for d in range(G)))
        model.add_element(replicas[e], [0, *shares], share[e])
        for d in range(G):
            model.add(q[e, d] == share[e]).only_enforce_if(x[e, d])
            model.add(q[e, d] == 0).only_enforce_if(~x[e, d])
    if R == 1:
        for e in range(E):
            for d in range(e + 1, G):
                model.add(x[e, d] == 0)
    else:
        model.add(x[0, 0] == 1)
    for u, row in enumerate(counts):
        used = np.flatnonzero(row)
        for d in range(G):
            model.add(sum(int(row[e]) * q[e, d] for e in used) <= M[u])

    # objective
    objective = sum(int(m) * M[u] for u, m in enumerate(batches.multiplicity))
    if migration_weight > 0 and current is not None:
        was = {(e, d) for d, experts in enumerate(current) for e in experts}
        price = migration_weight * S * num_batches
        objective += sum(price * x[e, d] for e in range(E) for d in range(G) if (e, d) not in was)
    model.minimize(objective)

    _add_hint(model, canonical(hint), x, replicas, share, q, M, counts, S)

    # solve
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit, 0.01)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    with tqdm(desc="cpsat", disable=not progress, leave=False) as bar:
        status = solver.solve(model, _Bar(bar, S * num_batches))
    bound = None if migration_weight > 0 else solver.best_objective_bound / (S * num_batches)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpsatOutcome(None, bound, False)
    devices = [[e for e in range(E) if solver.boolean_value(x[e, d])] for d in range(G)]
    return CpsatOutcome(devices, bound, status == cp_model.OPTIMAL and migration_weight == 0)


def _add_hint(model: cp_model.CpModel, devices: Devices, x, replicas, share, q, M, counts: np.ndarray,
              S: int) -> None:
    """Warm start: the full assignment of a known placement (already in canonical form)."""
    E, G = counts.shape[1], len(devices)
    copies = np.zeros(E, dtype=int)
    for experts in devices:
        copies[experts] += 1
    scaled = np.zeros((E, G), dtype=np.int64)
    for d, experts in enumerate(devices):
        scaled[experts, d] = S // copies[experts]
    for e in range(E):
        if replicas:
            model.add_hint(replicas[e], int(copies[e]))
            model.add_hint(share[e], S // int(copies[e]))
        for d in range(G):
            model.add_hint(x[e, d], bool(scaled[e, d]))
            if replicas:
                model.add_hint(q[e, d], int(scaled[e, d]))
    for u, var in enumerate(M):
        model.add_hint(var, int((counts[u] @ scaled).max()))
