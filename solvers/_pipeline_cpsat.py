"""CP-SAT model of pipeline scheduling under memory limits (formats.md 1.2, exactly).

data -> variables -> constraints -> objective -> solve -> status, then an independent check: the
solution's per-device order is re-timed by the simulator and validated by the project's validator.

Variables: one fixed-size interval per F, B, W op. When remat is allowed: per (s, m) and remat
option k (formats.md 1.4) an optional interval R_k with presence r[s, m, k] (at most one k), and,
when the stage may recompute in the backward pass, an optional interval RW with presence w[s, m].
Constraints: the dependencies of rule 3 and 1.4 with comm delays (R and RW ones only when
present); one no-overlap per device (rule 4); one cumulative per device with a memory limit
(rule 5), whose half-open intervals [start, end) reproduce "at equal times, decreases before
increases". With c0 the least checkpoint of the stage (a without remat), the profile of (s, m)
is the sum of: c0 on [F.start, B.end); a - c0 on [F.start, B.end) iff no option is chosen; for
option k: c_k - c0 on [F.start, B.end), a - c_k on [F.start, F.end) and on [R_k.start, B.end),
all iff r[s, m, k]. After B (split backward), with g = wgrad_checkpoint when RW is possible
(else the stash): g on [B.end, W.end), stash - g on [B.end, W.end) iff not w, and stash - g on
[RW.start, W.end) iff w. That is exactly 1.2 rule 5 with 1.4's replacements.
Fixed order (`order`): the per-device order of the F, B and W ops is given (precedences between
consecutive ones); R and RW ops stay free to go anywhere the no-overlap allows, so the model
chooses which pairs to rematerialize, with which option, and the timing. Its proven bound is then
a bound for that order only.
Objective: the makespan, at least the combinatorial lower bound (free order only).
Symmetry breaking (lossless, free order only): microbatches are identical (same durations and
memory), so any schedule relabelled by the start order of F(0, .) is valid with the same makespan;
hence F(0, m).start <= F(0, m+1).start loses no optimum.

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
                deadline: Deadline, workers: int = 2, seed: int = 0, on_solution=None,
                order: Program | None = None) -> CpsatOutcome:
    """Build and solve the model (module docstring) by `deadline`: building counts, and a model
    whose building outlasts it is not solved (status "NOT_SOLVED"). With `order`, the F/B/W order
    of every device is fixed (its R and RW actions, if any, are ignored)."""
    # ---- data ------------------------------------------------------------------------------
    S, M = instance.num_stages, instance.num_microbatches
    stages = instance.stages
    remat = instance.allow_remat
    split = instance.split_backward
    options = [st.options if remat else () for st in stages]
    rw_ok = [instance.may_recompute_backward(s) for s in range(S)]
    times = [getattr(st, op) for st in stages for op in ("F", "B", "W")]
    times += [o.R for opts in options for o in opts] + [st.RW for s, st in enumerate(stages) if rw_ok[s]]
    times += [instance.comm_after(s) for s in range(S - 1)]
    memory = [v for st in stages for v in (st.activation, st.wgrad_stash, st.wgrad_checkpoint)]
    memory += [o.checkpoint for opts in options for o in opts]
    memory += [instance.limit(d) for d in range(instance.num_devices) if instance.limit(d) is not None]
    kt, km = integer_scale(times), integer_scale(memory)
    exact = kt is not None and km is not None

    def dur(op: str, s: int, k: int = 0) -> int:
        return _scaled(instance.duration(op, s, k), kt, up=True)

    def mem(value: float) -> int:
        return _scaled(value, km, up=True)

    def comm(s: int) -> int:
        return _scaled(instance.comm_after(s), kt, up=True)

    per_pair = [sum(dur(op, s) for op in ("F", "B", "W")) + max((dur("R", s, k) for k in range(len(options[s]))),
                                                                 default=0) + (dur("RW", s) if rw_ok[s] else 0)
                for s in range(S)]
    horizon = (_scaled(hint.makespan, kt, up=True) if hint is not None and exact else
               M * sum(per_pair) + 2 * M * sum(comm(s) for s in range(S - 1)))
    ops = ["F", *instance.backward_ops]
    most_memory = M * sum(mem(st.activation) for st in stages)
    if max(horizon, most_memory) > MAX_SCALED:  # CP-SAT's int64 arithmetic could overflow: greedy answers
        return CpsatOutcome(None, None, False, "TOO_LARGE")

    # ---- variables -------------------------------------------------------------------------
    model = cp_model.CpModel()
    start, end, interval = {}, {}, {}
    chosen: dict[tuple[int, int, int], cp_model.IntVar] = {}  # (s, m, k): R with option k
    rw: dict[tuple[int, int], cp_model.IntVar] = {}

    def optional_op(key: tuple, size: int, literal, name: str) -> None:
        start[key] = model.NewIntVar(0, horizon, f"start_{name}")
        end[key] = start[key] + size
        interval[key] = model.NewOptionalFixedSizeIntervalVar(start[key], size, literal, name)

    for s in range(S):
        for m in range(M):
            for op in ops:
                k = (op, s, m)
                start[k] = model.NewIntVar(0, horizon, f"start_{s}{op}{m}")
                end[k] = start[k] + dur(op, s)
                interval[k] = model.NewFixedSizeIntervalVar(start[k], dur(op, s), f"{s}{op}{m}")
            for k in range(len(options[s])):
                chosen[s, m, k] = model.NewBoolVar(f"remat_{s}_{m}_{k}")
                optional_op(("R", s, m, k), dur("R", s, k), chosen[s, m, k], f"{s}R{m}:{k}")
            if rw_ok[s]:
                rw[s, m] = model.NewBoolVar(f"rw_{s}_{m}")
                optional_op(("RW", s, m), dur("RW", s), rw[s, m], f"{s}RW{m}")
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
            if options[s]:
                model.AddAtMostOne(chosen[s, m, k] for k in range(len(options[s])))
            for k in range(len(options[s])):
                r, lit = ("R", s, m, k), chosen[s, m, k]
                model.Add(start[r] >= end["F", s, m]).OnlyEnforceIf(lit)
                model.Add(start["B", s, m] >= end[r]).OnlyEnforceIf(lit)
                model.Add(start[r] == start["F", s, m]).OnlyEnforceIf(lit.Not())
            if rw_ok[s]:
                model.Add(start["RW", s, m] >= end["B", s, m]).OnlyEnforceIf(rw[s, m])
                model.Add(start["W", s, m] >= end["RW", s, m]).OnlyEnforceIf(rw[s, m])
                model.Add(start["RW", s, m] == end["B", s, m]).OnlyEnforceIf(rw[s, m].Not())
            for op in ops:
                model.Add(makespan >= end[op, s, m])
    if order is not None:
        for row in order:
            row = [a for a in row if a.op in ops]
            for before, after in zip(row, row[1:]):
                model.Add(start[after.op, after.stage, after.microbatch] >= end[before.op, before.stage, before.microbatch])
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
            a = mem(stages[s].activation)
            kept = [mem(o.checkpoint) for o in options[s]]
            c0 = min([a, *kept])
            stash = mem(stages[s].wgrad_stash) if split else 0
            g = mem(stages[s].wgrad_checkpoint) if rw_ok[s] else stash
            for m in range(M):
                f_s, f_e, b_e = start["F", s, m], end["F", s, m], end["B", s, m]
                hold(f_s, b_e, c0, f"keep_{s}_{m}")
                if options[s]:
                    literals = [chosen[s, m, k] for k in range(len(options[s]))]
                    plain = model.NewBoolVar(f"plain_{s}_{m}")
                    model.Add(sum(literals) + plain == 1)
                    hold(f_s, b_e, a - c0, f"full_{s}_{m}", plain)
                    for k, c in enumerate(kept):
                        hold(f_s, b_e, c - c0, f"kept_{s}_{m}_{k}", literals[k])
                        hold(f_s, f_e, a - c, f"fwd_{s}_{m}_{k}", literals[k])
                        hold(start["R", s, m, k], b_e, a - c, f"recompute_{s}_{m}_{k}", literals[k])
                if split:
                    w_e = end["W", s, m]
                    hold(b_e, w_e, g, f"stash_{s}_{m}")
                    if rw_ok[s]:
                        hold(b_e, w_e, stash - g, f"fullstash_{s}_{m}", rw[s, m].Not())
                        hold(start["RW", s, m], w_e, stash - g, f"rwstash_{s}_{m}", rw[s, m])
        model.AddCumulative(intervals, demands, _scaled(limit, km, up=False))
    if order is None:
        for m in range(M - 1):
            model.Add(start["F", 0, m] <= start["F", 0, m + 1])
    if deadline.passed():
        return out_of_time

    # ---- objective -------------------------------------------------------------------------
    if exact:
        model.Add(makespan >= math.ceil(lower_bound * kt - 1e-6))
    model.Minimize(makespan)
    if hint is not None:
        _add_hint(model, hint, start, chosen, rw, kt)

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
    for key, var in start.items():
        op, s, m = key[:3]
        option = key[3] if op == "R" else 0
        if op == "R" and not solver.Value(chosen[s, m, option]) or op == "RW" and not solver.Value(rw[s, m]):
            continue
        t = solver.Value(var)
        rows[stages[s].device].append((t, t + dur(op, s, option), Action(s, op, m, option)))
    program = tuple(tuple(a for _, _, a in sorted(row, key=lambda r: (r[0], r[1], _depth(r[2], S), r[2].microbatch)))
                    for row in rows)
    return CpsatOutcome(program, bound, exact and status == cp_model.OPTIMAL, name, interrupted)


def _depth(action: Action, S: int) -> float:
    """Rank of an action in its microbatch's dependency chain (F(0) .. F(S-1), then R, B, RW, W
    from stage S-1 down): orders ops that tie in time, e.g. zero-length ones."""
    if action.op == "F":
        return action.stage
    return 2 * S - action.stage + {"R": -0.5, "B": 0.0, "RW": 0.25, "W": 0.5}[action.op]


def _add_hint(model: cp_model.CpModel, hint: PipelineSchedule, start, chosen, rw, kt: int | None) -> None:
    if kt is None:
        return
    done = set()
    for op in hint.ops:
        key = ("R", op.stage, op.microbatch, op.option) if op.op == "R" else (op.op, op.stage, op.microbatch)
        if key in start:
            model.AddHint(start[key], round(op.start * kt))
            done.add(key)
    for (s, m, k), literal in chosen.items():
        model.AddHint(literal, ("R", s, m, k) in done)
    for (s, m), literal in rw.items():
        model.AddHint(literal, ("RW", s, m) in done)
