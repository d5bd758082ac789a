"""CP-SAT for the remat of any graph: retention intervals (MOCCASIN, Bartan et al. 2023), exact.

Why retention intervals rather than Checkmate's stage formulation: Checkmate's MILP has O(n^2)
binaries (compute / keep per stage and node, plus free variables per edge and stage), about 10^6
for 1000 nodes, and it fixes the order of first computations to the instance's topological order,
so its optimum is not the optimum over all schedules. Retention intervals need one interval per
computation: with k_v allowed computations of node v the model has sum_v k_v intervals, a
NoOverlap (one computation per position), and a Cumulative (resident memory <= budget), which
CP-SAT propagates well and which scales to 1000-node graphs.

MOCCASIN caps computations per node by a constant, which loses optimality. Here the caps are the
proven `_remat_bounds.copy_caps` (from the users' caps and from the best known cost), so some
optimal schedule lies inside the model and CP-SAT's bound is a lower bound on every valid
schedule. When a cap must be clipped to keep the model small (`max_copies`) that guarantee is lost:
the model then only searches, and the reported bound falls back to the no-remat cost.

Model, for node v and copy c < k_v: presence p (copy 0 always present, p[c] => p[c-1]), compute
position s in [0, H) with H = sum k_v, last-use position e >= s; copies of v in order and disjoint
(s[c] > e[c-1]). Position s holds one computation (NoOverlap of [s, s+1)); v occupies memory(v)
over [s, e] (Cumulative <= budget; at position s this is "resident + memory(v)" of formats.md).
Computing copy c of v needs, for each dep u, a present copy c' of u with s[u,c'] < s[v,c] <= e[u,c'].
Objective: sum of cost(v) over present copies.

Numbers: memory must be integers; when every size and the budget are integers they are divided by
their gcd (exact). Otherwise sizes are rounded up and the budget down (every solution stays valid)
and the model is not exact. Costs are scaled to integers and rounded down, so CP-SAT's bound,
scaled back, stays a lower bound; when all costs are integers the objective is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import NamedTuple

from ortools.sat.python import cp_model

from pipesched.remat import RematInstance
from pipesched.solvers._interrupt import Deadline, solve_interruptibly

COST_RESOLUTION = 2**40  # largest scaled total cost when costs are not all integers


class CpsatOutcome(NamedTuple):
    computes: list[int] | None  # node indices in order, None when no solution
    bound: float  # proven lower bound on the cost (valid only if exact)
    exact: bool  # the caps held and memory was exact: bound and infeasibility are proofs
    proven_infeasible: bool
    proven_optimal: bool
    interrupted: bool = False  # Ctrl-C stopped the search (`_interrupt.solve_interruptibly`)


class Scaled(NamedTuple):
    memory: list[int]
    budget: int
    memory_exact: bool
    cost: list[int]
    cost_scale: float


def scale(instance: RematInstance) -> Scaled:
    mem = [node.memory for node in instance.nodes]
    budget = instance.budget
    if all(float(m).is_integer() for m in mem) and float(budget).is_integer():
        unit = math.gcd(*(int(m) for m in mem)) or 1
        memory, cap, exact = [int(m) // unit for m in mem], int(budget) // unit, True
    else:
        unit = max(budget, max(mem), 1e-300) / 2**40
        memory = [math.ceil(m / unit) for m in mem]
        cap, exact = math.floor(budget / unit), False
    costs = [node.cost for node in instance.nodes]
    total = sum(costs)
    if all(float(c).is_integer() for c in costs) and total < 2**53:
        cost_scale = 1.0
    else:
        cost_scale = COST_RESOLUTION / max(total, 1e-300)
    return Scaled(memory, cap, exact, [math.floor(c * cost_scale) for c in costs], cost_scale)


class _Progress(cp_model.CpSolverSolutionCallback):
    def __init__(self, bar, scale_back: float):
        super().__init__()
        self.bar, self.scale_back, self.start = bar, scale_back, time.perf_counter()

    def on_solution_callback(self) -> None:
        self.bar.set_postfix(cost=self.ObjectiveValue() / self.scale_back,
                             bound=self.BestObjectiveBound() / self.scale_back)
        self.bar.n = min(self.bar.total, round(time.perf_counter() - self.start, 1))
        self.bar.refresh()


def solve_cpsat(instance: RematInstance, caps: Sequence[int], hint: Sequence[int] | None, *,
                deadline: Deadline, workers: int = 2, seed: int = 0, progress: bool = False,
                caps_exact: bool = True) -> CpsatOutcome:
    """Solve the retention-interval model (module docstring) with copy caps `caps`, hinted with
    the compute sequence `hint` (which must respect the caps), by `deadline`: model building
    counts, and a model whose building outlasts it is not solved (no solution, no proof)."""
    # data
    n = len(instance.nodes)
    deps, users = instance.dep_indices, instance.users
    scaled = scale(instance)
    horizon = sum(caps)
    exact = caps_exact and scaled.memory_exact
    out_of_time = CpsatOutcome(None, instance.total_cost, exact, False, False)

    # variables
    model = cp_model.CpModel()
    present, start, end, retain, slot = [], [], [], [], []
    reads: dict[tuple[int, int, int], list] = {}  # (v, c, u) -> which copy of u copy c of v reads
    for v in range(n):
        if deadline.passed():
            return out_of_time
        pv, sv, ev, rv, cv = [], [], [], [], []
        for c in range(caps[v]):
            p = model.NewConstant(1) if c == 0 else model.NewBoolVar(f"p{v}_{c}")
            s = model.NewIntVar(0, horizon - 1, f"s{v}_{c}")
            e = model.NewIntVar(0, horizon - 1, f"e{v}_{c}")
            size = model.NewIntVar(1, horizon, f"len{v}_{c}")
            end_excl = model.NewIntVar(1, horizon, f"x{v}_{c}")
            model.Add(end_excl == e + 1)
            rv.append(model.NewOptionalIntervalVar(s, size, end_excl, p, f"keep{v}_{c}"))
            cv.append(model.NewOptionalFixedSizeIntervalVar(s, 1, p, f"run{v}_{c}"))
            pv.append(p), sv.append(s), ev.append(e)
            if c:
                model.AddImplication(p, pv[c - 1])
                model.Add(s > ev[c - 1]).OnlyEnforceIf(p)
                model.Add(s == 0).OnlyEnforceIf(p.Not())
                model.Add(e == 0).OnlyEnforceIf(p.Not())
        present.append(pv), start.append(sv), end.append(ev), retain.append(rv), slot.append(cv)

    # constraints
    computations = model.NewIntVar(n, horizon, "computations")
    model.Add(computations == sum(p for pv in present for p in pv))
    for v in range(n):  # no idle position before the last computation (removes symmetric gaps)
        for c in range(caps[v]):
            model.Add(start[v][c] < computations).OnlyEnforceIf(present[v][c])
            model.Add(end[v][c] < computations)
    model.AddNoOverlap([iv for cv in slot for iv in cv])
    model.AddCumulative([iv for rv in retain for iv in rv],
                        [scaled.memory[v] for v in range(n) for _ in range(caps[v])], scaled.budget)
    for v in range(n):
        if deadline.passed():
            return out_of_time
        if not users[v]:
            model.Add(end[v][0] == start[v][0])
        for u in deps[v]:
            model.Add(start[u][0] < start[v][0])  # the first computation of u comes first
            for c in range(caps[v]):
                if caps[u] == 1:
                    model.Add(start[u][0] < start[v][c]).OnlyEnforceIf(present[v][c])
                    model.Add(end[u][0] >= start[v][c]).OnlyEnforceIf(present[v][c])
                    continue
                which = reads[v, c, u] = [model.NewBoolVar(f"r{v}_{c}_{u}_{k}") for k in range(caps[u])]
                model.AddBoolOr(which).OnlyEnforceIf(present[v][c])
                for k, r in enumerate(which):
                    model.AddImplication(r, present[u][k])
                    model.Add(start[u][k] < start[v][c]).OnlyEnforceIf(r)
                    model.Add(end[u][k] >= start[v][c]).OnlyEnforceIf(r)

    _add_peak_cuts(model, instance, scaled, caps, present)

    # objective
    model.Minimize(sum(scaled.cost[v] * (1 if c == 0 else present[v][c])
                       for v in range(n) for c in range(caps[v])))

    if hint is not None:
        _add_hint(model, instance, hint, caps, present, start, end, reads)

    # solve
    solver = cp_model.CpSolver()
    if deadline.passed():
        return out_of_time
    solver.parameters.max_time_in_seconds = max(deadline.left(), 0.01)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    solver.parameters.max_presolve_iterations = 1  # a second probing pass costs much, gains little
    callback = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=round(deadline.left(), 1), desc=f"cpsat {instance.name}", unit="s")
        callback = _Progress(bar, scaled.cost_scale)
    status, interrupted = solve_interruptibly(solver, model, callback)
    if progress:
        bar.close()

    # read back
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        placed = sorted((solver.Value(start[v][c]), v) for v in range(n) for c in range(caps[v])
                        if solver.BooleanValue(present[v][c]))
        computes = [v for _, v in placed]
        bound = solver.BestObjectiveBound() / scaled.cost_scale
    else:
        computes, bound = None, instance.total_cost
    return CpsatOutcome(computes, bound, exact, exact and status == cp_model.INFEASIBLE,
                        exact and status == cp_model.OPTIMAL, interrupted)


def straddling(instance: RematInstance) -> list[list[int]]:
    """Per node L: the values f, neither L nor its deps, computed before L (ancestors) and read
    after it (by a descendant of L). At L's first computation each is resident or is computed
    again later."""
    n, deps = len(instance.nodes), instance.dep_indices
    ancestors, descendants = [0] * n, [0] * n
    for v in range(n):
        for u in deps[v]:
            ancestors[v] |= ancestors[u] | (1 << u)
    for v in reversed(range(n)):
        for w in instance.users[v]:
            descendants[v] |= descendants[w] | (1 << w)
    readers = [sum(1 << w for w in users) for users in instance.users]
    result = []
    for v in range(n):
        own = set(deps[v])
        result.append([f for f in range(v) if ancestors[v] >> f & 1 and f not in own
                       and readers[f] & descendants[v]])
    return result


def _add_peak_cuts(model, instance: RematInstance, scaled: Scaled, caps, present) -> None:
    """Redundant knapsack cuts that give the LP a memory argument: at L's first computation,
    memory(L) + memory(deps) + the straddling values still resident <= budget, and each dropped
    straddling value costs a second computation (so its copy 1 is present)."""
    memory, deps = scaled.memory, instance.dep_indices
    for v, values in enumerate(straddling(instance)):
        room = scaled.budget - memory[v] - sum(memory[u] for u in deps[v])
        fixed = sum(memory[f] for f in values if caps[f] == 1)
        optional = [f for f in values if caps[f] > 1 and memory[f] > 0]
        if fixed + sum(memory[f] for f in optional) <= room:
            continue
        kept = {f: model.NewBoolVar(f"kept{f}_at{v}") for f in optional}
        model.Add(sum(memory[f] * kept[f] for f in optional) <= room - fixed)
        for f, b in kept.items():
            model.AddBoolOr([b, present[f][1]])


def _add_hint(model, instance: RematInstance, hint: Sequence[int], caps, present, start, end, reads
              ) -> None:
    """Hint every variable from a compute sequence (already free of useless computations)."""
    deps = instance.dep_indices
    copies: list[list[list[int]]] = [[] for _ in instance.nodes]  # per node: [start, last use]
    for pos, v in enumerate(hint):
        for u in deps[v]:
            copies[u][-1][1] = pos
            for k, r in enumerate(reads.get((v, len(copies[v]), u), ())):
                model.AddHint(r, k == len(copies[u]) - 1)
        copies[v].append([pos, pos])
    for v, spans in enumerate(copies):
        for c in range(caps[v]):
            s, e = spans[c] if c < len(spans) else (0, 0)
            if c:
                model.AddHint(present[v][c], c < len(spans))
            model.AddHint(start[v][c], s)
            model.AddHint(end[v][c], e)
