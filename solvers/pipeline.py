"""`solve_pipeline`: one entry point for named schedules, the greedy list scheduler and CP-SAT.

Every result goes through the project's validator before it is returned, carries the best proven
lower bound (combinatorial bounds of `pipesched.pipeline.bounds`, and CP-SAT's bound when its
model is exact), and says "optimal" only when the makespan meets that bound.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from pipesched.solvers._interrupt import Deadline
from pipesched.solvers._pipeline_cpsat import solve_cpsat
from pipesched.solvers._pipeline_fixed_order import (
    Order,
    order_candidates,
    order_infeasibility,
    resolve_order,
    strip_remat,
)
from pipesched.solvers._pipeline_greedy import (
    REMAT_MODES,
    least_memory_option,
    list_schedule,
    make_rules,
    option_choices,
)
from pipesched.solvers._pipeline_periodic import paced_candidates
from pipesched.solvers._names import PIPELINE_SOLVERS
from pipesched.solvers._result import Result
from tqdm import tqdm

from pipesched._common import FormatError, PipeschedError, approx_le
from pipesched.pipeline import (
    Action,
    PipelineInstance,
    PipelineSchedule,
    Program,
    Simulation,
    simulate,
    validate_pipeline,
    zoo,
)
from pipesched.pipeline.bounds import infeasible_devices, lower_bound

CPSAT_MAX_OPS = 20_000  # above this many ops the model is too large to pay off; greedy answers
LARGE_OPS = 20_000  # above this many ops greedy tries only its two strongest rules


class MemoryLimitError(PipeschedError):
    """A named schedule that does not fit the instance's memory limit."""

    exit_code = 1


def infeasibility_proof(instance: PipelineInstance) -> str | None:
    """Why no valid schedule exists (None when one does); see bounds.min_memory_need."""
    bad = infeasible_devices(instance)
    if not bad:
        return None
    return "; ".join(f"device {d} needs at least {need:g} memory (one microbatch's activations"
                     f"{' with every stage rematerialized' if instance.allow_remat else ''}) > limit {limit:g}"
                     for d, need, limit in bad)


def order_infeasibility_proof(instance: PipelineInstance, order: Order) -> str | None:
    """Why no schedule keeping `order` (as in `solve_pipeline(..., order=)`) fits the memory
    limit, or None when that is not proven (`_pipeline_fixed_order.order_memory_needs`)."""
    program, label = resolve_order(instance, order)
    return order_infeasibility(instance, program, label)


def sequential_program(instance: PipelineInstance) -> Program:
    """One microbatch at a time through every stage (rematerializing everything but the last
    stage when allowed, with its least-memory option): the least-memory schedule, feasible
    whenever any schedule is."""
    rows: list[list[Action]] = [[] for _ in range(instance.num_devices)]
    S = instance.num_stages
    for m in range(instance.num_microbatches):
        order = [Action(s, "F", m) for s in range(S)]
        for s in reversed(range(S)):
            if instance.allow_remat and s < S - 1:
                order.append(Action(s, "R", m, least_memory_option(instance, s)))
            order.append(Action(s, "B", m))
            if instance.split_backward:
                order.append(Action(s, "W", m))
        for a in order:
            rows[instance.stages[a.stage].device].append(a)
    return tuple(tuple(r) for r in rows)


def _num_ops(instance: PipelineInstance) -> int:
    per_pair = 1 + len(instance.backward_ops)
    if instance.allow_remat:
        per_pair += sum(len(st.options) for st in instance.stages) / instance.num_stages
        per_pair += sum(map(instance.may_recompute_backward, range(instance.num_stages))) / instance.num_stages
    return round(instance.num_stages * instance.num_microbatches * per_pair)


def greedy_candidates(instance: PipelineInstance, deadline: Deadline | None = None) -> Iterator[Simulation]:
    """Every priority rule x remat mode (x remat option choice x backward-pass recompute or not,
    formats.md 1.4) of the list scheduler, simulated, then the paced schedules of
    `_pipeline_periodic` (below LARGE_OPS ops, until `deadline`); the ones that fit."""
    variants = [("never", None, False)]
    if instance.allow_remat:
        with_rw = (False, True) if any(map(instance.may_recompute_backward, range(instance.num_stages))) else (False,)
        variants = [(mode, options, rw) for rw in with_rw for mode in REMAT_MODES
                    for options in (option_choices(instance) if mode != "never" else [None])]
    rules = make_rules(instance)
    large = _num_ops(instance) > LARGE_OPS
    if large:  # the two strongest rules, the one that is more often optimal first
        strongest = ("zero-bubble", "backward-first") if instance.split_backward else ("backward-first", "zero-bubble")
        rules = sorted((r for r in rules if r.name in strongest), key=lambda r: strongest.index(r.name))
    for rule in rules:
        for mode, options, rw in variants:
            program = list_schedule(instance, rule, remat=mode, options=options, backward_recompute=rw)
            if program is not None:
                result = simulate(instance, program, solver="greedy")
                if result.fits_memory:
                    yield result
    if not large:
        yield from paced_candidates(instance, deadline)


def zoo_candidates(instance: PipelineInstance) -> Iterator[Simulation]:
    """Every named schedule that supports the instance and fits its memory limit; with remat
    allowed, also every named order made to fit by the heuristics of `_pipeline_fixed_order`."""
    for name in zoo.ZOO:
        if zoo.supports(name, instance):
            result = zoo.zoo_schedule(instance, name)
            if result.fits_memory:
                yield result
            elif instance.allow_remat:
                yield from order_candidates(instance, zoo.ZOO[name](instance), name)


def _collect(candidates: Iterable[Simulation], into: list[Simulation], deadline: Deadline,
             bound: float | None = None) -> bool:
    """Append candidates to `into` until they run out, the deadline passes or one meets `bound`
    (then it is optimal: returns True). Each candidate is kept as soon as it is complete, so a
    Ctrl-C that ends this loop loses none."""
    for candidate in candidates:
        into.append(candidate)
        if bound is not None and approx_le(candidate.schedule.makespan, bound):
            return True
        if deadline.passed():
            return False
    return False


def _unknown(instance: PipelineInstance, bound: float, solver: str, t0: float, interrupted: bool = False,
             order_bound: float | None = None) -> Result:
    """No schedule found (yet): status "unknown", no ops, with the bounds proven so far."""
    return Result.of(PipelineSchedule.empty(instance, status="unknown", lower_bound=bound, solver=solver,
                                            solve_time_s=time.perf_counter() - t0, order_lower_bound=order_bound),
                     interrupted=interrupted)


def _finish(schedule: PipelineSchedule, solver: str, bound: float, t0: float, interrupted: bool = False,
            order_bound: float | None = None) -> Result:
    status = "optimal" if approx_le(schedule.makespan, bound) else "feasible"
    if order_bound is not None:
        order_bound = min(max(order_bound, bound), schedule.makespan)
    final = PipelineSchedule(schedule.instance, schedule.ops, schedule.makespan,
                             min(bound, schedule.makespan) if status == "optimal" else bound, status, solver,
                             time.perf_counter() - t0, order_bound)
    validate_pipeline(final)
    return Result.of(final, interrupted)


def solve_pipeline(instance: PipelineInstance, solver: str = "cpsat", *, time_limit: float = 30.0,
                   workers: int = 2, seed: int = 0, progress: bool = False, order: Order | None = None) -> Result:
    """Schedule `instance` with `solver` (one of PIPELINE_SOLVERS).

    - a zoo name: that named schedule, timed by the simulator; raises MemoryLimitError if it does
      not fit the memory limit and FormatError if it does not support the placement;
    - "greedy": the best of every list-scheduling rule and remat mode, and of the paced schedules;
    - "cpsat": CP-SAT warm-started from the best greedy or zoo schedule (never worse than any of
      them), for at most `time_limit` seconds in all.
    "greedy" and "cpsat" stop trying candidates once `time_limit` has passed (at least one is
    tried) or once one meets the lower bound (it is optimal). Ctrl-C returns the best schedule
    so far (or "unknown" before any), with its proven bound, as a Result with `interrupted` set.
    An instance whose memory limits no schedule can meet returns status "infeasible" (no ops;
    `infeasibility_proof` says why).
    `order` (solver "cpsat" or "greedy"): keep this per-device F/B/W order — a zoo name, a program
    CSV or schedule JSON path, a Program or a PipelineSchedule — and choose only the remat
    (options, RW) and the timing: greedy takes the best heuristic, CP-SAT the optimum. The result
    then also carries `order_lower_bound`, proven for that order only (`lower_bound` stays the
    instance's); "unknown" (no ops) when no schedule keeps the order within the memory limit
    (at once when `order_infeasibility_proof` proves it).
    """
    t0 = time.perf_counter()
    if solver not in PIPELINE_SOLVERS:
        raise FormatError(f"solver: unknown pipeline solver {solver!r}; choose one of {', '.join(PIPELINE_SOLVERS)}")
    if infeasibility_proof(instance) is not None:
        return Result.of(PipelineSchedule.empty(instance, status="infeasible", lower_bound=None, solver=solver,
                                                solve_time_s=time.perf_counter() - t0))
    bound = lower_bound(instance)
    if order is not None:
        if solver not in ("cpsat", "greedy"):
            raise FormatError(f"solver: a fixed order is solved by cpsat or greedy, not {solver!r}")
        return _solve_fixed_order(instance, order, solver, bound, time_limit, workers, seed, progress, t0)
    if solver in zoo.ZOO:
        result = zoo.zoo_schedule(instance, solver)
        if not result.fits_memory:
            worst = max(range(instance.num_devices), key=lambda d: result.memory.peaks[d] - (instance.limit(d) or 0))
            hint = "; --fix-order " + solver + " --solver cpsat makes it fit by remat" if instance.allow_remat else ""
            raise MemoryLimitError(f"{solver} does not fit the memory limit: peak {result.memory.peaks[worst]:g} "
                                   f"> limit {instance.limit(worst):g} on device {worst}{hint}")
        return _finish(result.schedule, solver, bound, t0)
    deadline = Deadline(time_limit, t0)
    candidates: list[Simulation] = []
    try:
        optimal = _collect(greedy_candidates(instance, deadline), candidates, deadline, bound)
        if not candidates:
            candidates.append(simulate(instance, sequential_program(instance), solver="greedy"))
        if solver == "cpsat" and not optimal and not deadline.passed():
            _collect(zoo_candidates(instance), candidates, deadline, bound)
    except KeyboardInterrupt:
        if not candidates:
            return _unknown(instance, bound, solver, t0, interrupted=True)
        return _finish(min(candidates, key=lambda r: r.schedule.makespan).schedule, solver, bound, t0, True)
    best = min(candidates, key=lambda r: r.schedule.makespan).schedule
    if solver == "greedy" or approx_le(best.makespan, bound) or _num_ops(instance) > CPSAT_MAX_OPS \
            or deadline.passed():
        return _finish(best, solver, bound, t0)
    return _improve_with_cpsat(instance, best, bound, deadline, workers, seed, progress, t0)


def _solve_fixed_order(instance: PipelineInstance, order: Order, solver: str, bound: float, time_limit: float,
                       workers: int, seed: int, progress: bool, t0: float) -> Result:
    """`solve_pipeline(..., order=...)`: heuristics that keep the order, then CP-SAT with it fixed."""
    program, label = resolve_order(instance, order)
    name = f"{solver}:order={label}"
    if order_infeasibility(instance, program, label) is not None:
        return _unknown(instance, bound, name, t0)
    deadline = Deadline(time_limit, t0)
    candidates: list[Simulation] = []
    try:
        _collect(order_candidates(instance, program, name), candidates, deadline)
    except KeyboardInterrupt:
        if candidates:
            return _finish(min(candidates, key=lambda r: r.schedule.makespan).schedule, name, bound, t0, True, bound)
        return _unknown(instance, bound, name, t0, interrupted=True)
    best = min(candidates, key=lambda r: r.schedule.makespan).schedule if candidates else None
    if solver == "greedy" or deadline.passed() or _num_ops(instance) > CPSAT_MAX_OPS:
        if best is None:
            return _unknown(instance, bound, name, t0)
        return _finish(best, name, bound, t0, order_bound=bound)
    return _improve_with_cpsat(instance, best, bound, deadline, workers, seed, progress, t0,
                               order=strip_remat(program), name=name)


def _improve_with_cpsat(instance: PipelineInstance, best: PipelineSchedule | None, bound: float, deadline: Deadline,
                        workers: int, seed: int, progress: bool, t0: float, *, order: Program | None = None,
                        name: str = "cpsat") -> Result:
    """CP-SAT warm-started from `best` until `deadline` (model building included); Ctrl-C keeps
    `best` or CP-SAT's incumbent, whichever is shorter, and the bound proven so far. With `order`
    CP-SAT's bound holds for that order only and becomes the result's `order_lower_bound`."""
    order_bound = bound if order is not None else None
    with tqdm(total=None, desc="cpsat", unit=" solutions", disable=not progress, leave=False) as bar:
        def on_solution(objective: float, proven: float) -> None:
            bar.set_postfix(makespan=f"{objective:g}", bound=f"{max(proven, bound):g}")
            bar.update()

        try:
            outcome = solve_cpsat(instance, hint=best, lower_bound=bound, deadline=deadline,
                                  workers=workers, seed=seed, on_solution=on_solution, order=order)
        except KeyboardInterrupt:  # (while building the model)
            outcome = None
    if outcome is not None and outcome.bound is not None:
        if order is None:
            bound = max(bound, outcome.bound)
        else:
            order_bound = max(bound, outcome.bound)
    if outcome is not None and outcome.program is not None:
        found = simulate(instance, outcome.program, solver=name)
        if found.fits_memory and (best is None or found.schedule.makespan < best.makespan):
            best = found.schedule
    interrupted = outcome is None or outcome.interrupted
    if best is None:
        return _unknown(instance, bound, name, t0, interrupted, order_bound)
    return _finish(best, name, bound, t0, interrupted, order_bound)
