"""CP-SAT model of pipeline scheduling under memory limits (formats.md 1.2, exactly).

data -> variables -> constraints -> objective -> solve -> status, then an independent check: the
solution's per-device order is re-timed by the simulator and validated by the project's validator.

Variables: one fixed-size interval per F, B, W op; one optional interval per R op when remat is
allowed (presence literal r[s, m] = "(s, m) is rematerialized").
Constraints: the dependencies of rule 3 with comm delays (R ones only when present); one
no-overlap per device (rule 4); one cumulative per device with a memory limit (rule 5), whose
half-open intervals [start, end) reproduce "at equal times, decreases before increases": the
profile of (s, m) - activation a on [F.start, B.end), or a on [F.start, F.end), checkpoint c on
[F.end, R.start) and a on [R.start, B.end) when rematerialized, then wgrad_stash on [B.end, W.end)
- is the sum of fixed demand c on [F.start, B.end), a - c on [F.start, B.end) iff not r, a - c on
[F.start, F.end) iff r, a - c on [R.start, B.end) iff r, and stash on [B.end, W.end).
Objective: the makespan, at least the combinatorial lower bound.
Symmetry breaking (lossless): microbatches are identical (same durations and memory), so any
schedule relabelled by the start order of F(0, .) is valid with the same makespan; hence
F(0, m).start <= F(0, m+1).start loses no optimum.

Integer scaling: times are multiplied by the smallest k in SCALES making every duration and comm
delay an integer (memory likewise, separately); then the model is exact and its proven bound / k
is a valid lower bound. When no such k exists, durations and activations are rounded up and limits
down: every model solution is still valid (and re-timed with the true durations), but the model's
bound is not a bound of the true problem and is discarded (`exact=False`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

from ortools.sat.python import cp_model

from pipesched.pipeline import Action, PipelineInstance, PipelineSchedule, Program
from pipesched.solvers._interrupt import Deadline, solve_interruptibly

SCALES = (1, 2, 4, 5, 8, 10, 20, 25, 50, 100, 1000, 10_000, 100_000, 1_000_000)
MAX_SCALED = 2**56  # largest scaled horizon or memory total the model takes (sums stay inside int64)


class CpsatOutcome(NamedTuple):
    program: Program | None  # the best solution's per-device order (None: none found)
    bound: float | None  # proven lower bound on the makespan, in instance units (None: not exact)
    proven_optimal: bool
    status: str  # CP-SAT's status name
    interrupted: bool = False  # Ctrl-C stopped the search (`_interrupt.solve_interruptibly`)


def integer_scale(values: Iterable[float]) -> int | None:
    """Smallest k in SCALES with every value * k an integer (None if there is none)."""
    values = [float(v) for v in values]
    for k in SCALES:
        if all(abs(v * k - round(v * k)) <= 1e-9 * max(1.0, abs(v * k)) for v in values):
            return k
    return None


def _scaled(value: float, k: int | None, up: bool) -> int:
    if k is not None:
        return round(value * k)
    return math.ceil(value * SCALES[-1] - 1e-9) if up else math.floor(value * SCALES[-1] + 1e-9)


class _Progress(cp_model.CpSolverSolutionCallback):
    """Feeds each improving solution (objective, bound) to a callback."""

    def __init__(self, report):
        super().__init__()
        self.report = report

    def on_solution_callback(self) -> None:
        self.report(self.ObjectiveValue(), self.BestObjectiveBound())


def solve_cpsat(instance: PipelineInstance, *, hint: PipelineSchedule | None, lower_bound: float,
                deadline: Deadline, workers: int = 2, seed: int = 0, on_solution=None) -> CpsatOutcome:
    """Build and solve the model (module docstring) by `deadline`: building counts, and a model
    whose building outlasts it is not solved (status "NOT_SOLVED")."""
    # ---- data ------------------------------------------------------------------------------
    S, M = instance.num_stages, instance.num_microbatches
    stages = instance.stages
    remat = instance.allow_remat
    split = instance.split_backward
    times = [getattr(st, op) for st in stages for op in ("F", "B", "W", "R")]
    times += [instance.comm_after(s) for s in range(S - 1)]
    memory = [v for st in stages for v in (st.activation, st.checkpoint, st.wgrad_stash)]
    memory += [instance.limit(d) for d in range(instance.num_devices) if instance.limit(d) is not None]
    kt, km = integer_scale(times), integer_scale(memory)
    exact = kt is not None and km is not None

    def dur(op: str, s: int) -> int:
        return _scaled(instance.duration(op, s), kt, up=True)

    def comm(s: int) -> int:
        return _scaled(instance.comm_after(s), kt, up=True)

    horizon = (_scaled(hint.makespan, kt, up=True) if hint is not None and exact else
               sum(M * dur(op, s) for s in range(S) for op in ("F", "B", "W", "R"))
               + 2 * M * sum(comm(s) for s in range(S - 1)))
    ops = ["F", *instance.backward_ops]
    most_memory = M * sum(_scaled(st.activation, km, up=True) for st in stages)
    if max(horizon, most_memory) > MAX_SCALED:  # CP-SAT's int64 arithmetic could overflow: greedy answers
        return CpsatOutcome(None, None, False, "TOO_LARGE")

    # ---- variables -------------------------------------------------------------------------
    model = cp_model.CpModel()
    start, end, interval = {}, {}, {}
    present: dict[tuple[int, int], cp_model.IntVar] = {}
    for s in range(S):
        for m in range(M):
            for op in ops:
                k = (op, s, m)
                start[k] = model.NewIntVar(0, horizon, f"start_{s}{op}{m}")
                end[k] = start[k] + dur(op, s)
                interval[k] = model.NewFixedSizeIntervalVar(start[k], dur(op, s), f"{s}{op}{m}")
            if remat:
                k = ("R", s, m)
                present[s, m] = model.NewBoolVar(f"remat_{s}_{m}")
                start[k] = model.NewIntVar(0, horizon, f"start_{s}R{m}")
                end[k] = start[k] + dur("R", s)
                interval[k] = model.NewOptionalFixedSizeIntervalVar(start[k], dur("R", s), present[s, m], f"{s}R{m}")
    makespan = model.NewIntVar(0, horizon, "makespan")

    out_of_time = CpsatOutcome(None, None, False, "NOT_SOLVED")
    if deadline.passed():
        return out_of_time

    # ---- constraints -----------------------------------------------------------------------
    for s in range(S):
        for m in range(M):
            if s > 0:
                model.Add(start["F", s, m] >= end["F", s - 1, m] + comm(s - 1))
            if s == S - 1:
                model.Add(start["B", s, m] >= end["F", s, m])
            else:
                model.Add(start["B", s, m] >= end["B", s + 1, m] + comm(s))
            if split:
                model.Add(start["W", s, m] >= end["B", s, m])
            if remat:
                model.Add(start["R", s, m] >= end["F", s, m]).OnlyEnforceIf(present[s, m])
                model.Add(start["B", s, m] >= end["R", s, m]).OnlyEnforceIf(present[s, m])
                model.Add(start["R", s, m] == start["F", s, m]).OnlyEnforceIf(present[s, m].Not())
            for op in ops:
                model.Add(makespan >= end[op, s, m])
    for d, on_device in enumerate(instance.stages_of_device):
        keys = [k for k in interval if k[1] in on_device]
        model.AddNoOverlap([interval[k] for k in keys])
        limit = instance.limit(d)
        if limit is None or not on_device:
            continue
        intervals, demands = [], []

        def hold(begin, finish, demand: int, name: str, literal=None) -> None:
            if demand <= 0:
                return
            size = model.NewIntVar(0, horizon, f"size_{name}")
            if literal is None:
                intervals.append(model.NewIntervalVar(begin, size, finish, name))
            else:
                intervals.append(model.NewOptionalIntervalVar(begin, size, finish, literal, name))
            demands.append(demand)

        for s in on_device:
            a = _scaled(stages[s].activation, km, up=True)
            c = _scaled(stages[s].checkpoint, km, up=True) if remat else a
            stash = _scaled(stages[s].wgrad_stash, km, up=True) if split else 0
            for m in range(M):
                f_s, f_e, b_e = start["F", s, m], end["F", s, m], end["B", s, m]
                hold(f_s, b_e, c, f"keep_{s}_{m}")
                if remat:
                    hold(f_s, b_e, a - c, f"full_{s}_{m}", present[s, m].Not())
                    hold(f_s, f_e, a - c, f"fwd_{s}_{m}", present[s, m])
                    hold(start["R", s, m], b_e, a - c, f"recompute_{s}_{m}", present[s, m])
                if split:
                    hold(b_e, end["W", s, m], stash, f"stash_{s}_{m}")
        model.AddCumulative(intervals, demands, _scaled(limit, km, up=False))
    for m in range(M - 1):
        model.Add(start["F", 0, m] <= start["F", 0, m + 1])
    if deadline.passed():
        return out_of_time

    # ---- objective -------------------------------------------------------------------------
    if exact:
        model.Add(makespan >= math.ceil(lower_bound * kt - 1e-6))
    model.Minimize(makespan)
    if hint is not None:
        _add_hint(model, hint, start, present, kt)

    # ---- solve -----------------------------------------------------------------------------
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.01, deadline.left())
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    scale = kt or SCALES[-1]
    callback = _Progress(lambda obj, bound: on_solution(obj / scale, bound / scale)) if on_solution else None
    status, interrupted = solve_interruptibly(solver, model, callback)
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return CpsatOutcome(None, None, False, name, interrupted)
    bound = solver.BestObjectiveBound() / kt if exact else None

    # ---- independent check: the order, re-timed by the simulator -------------------------
    rows: list[list[tuple[int, int, Action]]] = [[] for _ in range(instance.num_devices)]
    for (op, s, m), var in start.items():
        if op == "R" and not solver.Value(present[s, m]):
            continue
        t = solver.Value(var)
        rows[stages[s].device].append((t, t + dur(op, s), Action(s, op, m)))
    program = tuple(tuple(a for _, _, a in sorted(row, key=lambda r: (r[0], r[1], r[2].stage, r[2].microbatch)))
                    for row in rows)
    return CpsatOutcome(program, bound, exact and status == cp_model.OPTIMAL, name, interrupted)


def _add_hint(model: cp_model.CpModel, hint: PipelineSchedule, start, present, kt: int | None) -> None:
    if kt is None:
        return
    done = set()
    for op in hint.ops:
        key = (op.op, op.stage, op.microbatch)
        if key in start:
            model.AddHint(start[key], round(op.start * kt))
            done.add(key)
    for (s, m), literal in present.items():
        model.AddHint(literal, ("R", s, m) in done)
