"""CP-SAT model of expert placement, exact on the formats.md 3.2 cost (replicas included).

Exactness with replicas. An expert with r replicas puts 1/r of its tokens on each host. With
R = `max_replicas` the possible r are 1..R; scaling every load by S = lcm(1, ..., R) makes each
share S/r an integer, so all loads, per-batch maxima and the objective are integers and CP-SAT
optimises the 3.2 cost times S * (number of batches) with no rounding. The replica count is
enumerated: y[e, r] = "e has exactly r replicas" (one per expert, r = sum_d x[e, d]) and
z[e, d, r] = x[e, d] AND y[e, r], so the scaled share q[e, d] = sum_r (S / r) z[e, d, r] is linear.

Model (OR-Tools sample structure):
  data        distinct batches u with counts c[u, e] and multiplicity m[u] (`aggregate`: identical
              batches merged; large b just has few rows of per-expert counts)
  variables   x[e, d] bool (e hosted on d), y, z, q as above, M[u] integer (scaled batch cost)
  constraints sum_d x[e, d] = sum_r r y[e, r] >= 1; sum_e x[e, d] <= C;
              M[u] >= sum_e c[u, e] q[e, d] for every device d;
              symmetry (devices are identical): without spare slots expert e sits on a device
              d <= e (relabel devices by their smallest expert); with replicas device 0 hosts
              expert 0 (relabel one of its hosts as 0). `canonical` puts the warm start in this form.
  objective   minimise sum_u m[u] M[u] (+ migration_weight * transfers, scaled likewise)
The proven bound is CP-SAT's best objective bound over S * (number of batches); it is a bound on
the pure 3.2 cost only when migration_weight = 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from ortools.sat.python import cp_model
from tqdm.auto import tqdm

from pipesched.placement import PlacementInstance
from pipesched.solvers._placement_common import Batches, Devices, batch_lower_bounds, canonical, max_replicas


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
    if R == 1:
        q = {key: var for key, var in x.items()}
        y, z = {}, {}
    else:
        y = {(e, r): model.new_bool_var(f"y[{e},{r}]") for e in range(E) for r in range(1, R + 1)}
        z = {(e, d, r): model.new_bool_var(f"z[{e},{d},{r}]")
             for e in range(E) for d in range(G) for r in range(1, R + 1)}
        q = {(e, d): model.new_int_var_from_domain(cp_model.Domain.from_values([0] + [S // r for r in range(1, R + 1)]),
                                                   f"q[{e},{d}]")
             for e in range(E) for d in range(G)}
    lows = np.ceil(batch_lower_bounds(instance, batches) * S - 1e-6).astype(int)
    M = [model.new_int_var(int(lows[u]), int(counts[u].sum()) * S, f"M[{u}]") for u in range(len(counts))]

    # constraints
    for d in range(G):
        model.add(sum(x[e, d] for e in range(E)) <= C)
    for e in range(E):
        hosts = sum(x[e, d] for d in range(G))
        if R == 1:
            model.add(hosts == 1)
            continue
        model.add_exactly_one(y[e, r] for r in range(1, R + 1))
        model.add(hosts == sum(r * y[e, r] for r in range(1, R + 1)))
        for d in range(G):
            model.add(sum(z[e, d, r] for r in range(1, R + 1)) == x[e, d])
            for r in range(1, R + 1):
                model.add_implication(z[e, d, r], y[e, r])
            model.add(q[e, d] == sum((S // r) * z[e, d, r] for r in range(1, R + 1)))
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

    _add_hint(model, canonical(hint), x, y, z, q, M, counts, S)

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


def _add_hint(model: cp_model.CpModel, devices: Devices, x, y, z, q, M, counts: np.ndarray, S: int) -> None:
    """Warm start: the full assignment of a known placement (already in canonical form)."""
    E, G = counts.shape[1], len(devices)
    copies = np.zeros(E, dtype=int)
    for experts in devices:
        copies[experts] += 1
    share = np.zeros((E, G), dtype=np.int64)
    for d, experts in enumerate(devices):
        share[experts, d] = S // copies[experts]
    for (e, d), var in x.items():
        model.add_hint(var, bool(share[e, d]))
    for (e, r), var in y.items():
        model.add_hint(var, bool(copies[e] == r))
    for (e, d, r), var in z.items():
        model.add_hint(var, bool(share[e, d]) and bool(copies[e] == r))
    if y:
        for (e, d), var in q.items():
            model.add_hint(var, int(share[e, d]))
    for u, var in enumerate(M):
        model.add_hint(var, int((counts[u] @ share).max()))

