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
from pipesched.solvers._pipeline_greedy import REMAT_MODES, list_schedule, make_rules
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


def sequential_program(instance: PipelineInstance) -> Program:
    """One microbatch at a time through every stage (rematerializing everything but the last
    stage when allowed): the least-memory schedule, feasible whenever any schedule is."""
    rows: list[list[Action]] = [[] for _ in range(instance.num_devices)]
    S = instance.num_stages
    for m in range(instance.num_microbatches):
        order = [Action(s, "F", m) for s in range(S)]
        for s in reversed(range(S)):
            if instance.allow_remat and s < S - 1:
                order.append(Action(s, "R", m))
            order.append(Action(s, "B", m))
            if instance.split_backward:
                order.append(Action(s, "W", m))
        for a in order:
            rows[instance.stages[a.stage].device].append(a)
    return tuple(tuple(r) for r in rows)


def _num_ops(instance: PipelineInstance) -> int:
    return instance.num_stages * instance.num_microbatches * (1 + len(instance.backward_ops) + instance.allow_remat)


def greedy_candidates(instance: PipelineInstance) -> Iterator[Simulation]:
    """Every priority rule x remat mode of the list scheduler, simulated; the ones that fit."""
    modes = REMAT_MODES if instance.allow_remat else ("never",)
    rules = make_rules(instance)
    if _num_ops(instance) > LARGE_OPS:
        rules = [r for r in rules if r.name in ("zero-bubble", "backward-first")]
    for rule in rules:
        for mode in modes:
            program = list_schedule(instance, rule, remat=mode)
            if program is not None:
                result = simulate(instance, program, solver="greedy")
                if result.fits_memory:
                    yield result


def zoo_candidates(instance: PipelineInstance) -> Iterator[Simulation]:
    """Every named schedule that supports the instance and fits its memory limit."""
    for name in zoo.ZOO:
        if zoo.supports(name, instance):
            result = zoo.zoo_schedule(instance, name)
            if result.fits_memory:
                yield result


def _collect(candidates: Iterable[Simulation], into: list[Simulation], deadline: Deadline) -> None:
    """Append candidates to `into` until they run out or the deadline passes (each candidate
    is kept as soon as it is complete, so a Ctrl-C that ends this loop loses none)."""
    for candidate in candidates:
        into.append(candidate)
        if deadline.passed():
            return


def _finish(schedule: PipelineSchedule, solver: str, bound: float, t0: float, interrupted: bool = False) -> Result:
    status = "optimal" if approx_le(schedule.makespan, bound) else "feasible"
    final = PipelineSchedule(schedule.instance, schedule.ops, schedule.makespan,
                             min(bound, schedule.makespan) if status == "optimal" else bound, status, solver,
                             time.perf_counter() - t0)
    validate_pipeline(final)
    return Result.of(final, interrupted)


def solve_pipeline(instance: PipelineInstance, solver: str = "cpsat", *, time_limit: float = 30.0,
                   workers: int = 2, seed: int = 0, progress: bool = False) -> Result:
    """Schedule `instance` with `solver` (one of PIPELINE_SOLVERS).

    - a zoo name: that named schedule, timed by the simulator; raises MemoryLimitError if it does
      not fit the memory limit and FormatError if it does not support the placement;
    - "greedy": the best of every list-scheduling rule and remat mode;
    - "cpsat": CP-SAT warm-started from the best greedy or zoo schedule (never worse than any of
      them), for at most `time_limit` seconds in all.
    "greedy" and "cpsat" stop trying candidates once `time_limit` has passed (at least one is
    tried). Ctrl-C returns the best schedule so far (or "unknown" before any), with its proven
    bound, as a Result with `interrupted` set.
    An instance whose memory limits no schedule can meet returns status "infeasible" (no ops;
    `infeasibility_proof` says why).
    """
    t0 = time.perf_counter()
    if solver not in PIPELINE_SOLVERS:
        raise FormatError(f"solver: unknown pipeline solver {solver!r}; choose one of {', '.join(PIPELINE_SOLVERS)}")
    if infeasibility_proof(instance) is not None:
        return Result.of(PipelineSchedule.empty(instance, status="infeasible", lower_bound=None, solver=solver,
                                                solve_time_s=time.perf_counter() - t0))
    bound = lower_bound(instance)
    if solver in zoo.ZOO:
        result = zoo.zoo_schedule(instance, solver)
        if not result.fits_memory:
            worst = max(range(instance.num_devices), key=lambda d: result.memory.peaks[d] - (instance.limit(d) or 0))
            raise MemoryLimitError(f"{solver} does not fit the memory limit: peak {result.memory.peaks[worst]:g} "
                                   f"> limit {instance.limit(worst):g} on device {worst}")
        return _finish(result.schedule, solver, bound, t0)
    deadline = Deadline(time_limit, t0)
    candidates: list[Simulation] = []
    try:
        _collect(greedy_candidates(instance), candidates, deadline)
        if not candidates:
            candidates.append(simulate(instance, sequential_program(instance), solver="greedy"))
        if solver == "cpsat" and not deadline.passed():
            _collect(zoo_candidates(instance), candidates, deadline)
    except KeyboardInterrupt:
        if not candidates:
            return Result.of(PipelineSchedule.empty(instance, status="unknown", lower_bound=bound, solver=solver,
                                                    solve_time_s=time.perf_counter() - t0), interrupted=True)
        return _finish(min(candidates, key=lambda r: r.schedule.makespan).schedule, solver, bound, t0, True)
    best = min(candidates, key=lambda r: r.schedule.makespan).schedule
    if solver == "greedy" or approx_le(best.makespan, bound) or _num_ops(instance) > CPSAT_MAX_OPS \
            or deadline.passed():
        return _finish(best, solver, bound, t0)
    return _improve_with_cpsat(instance, best, bound, deadline, workers, seed, progress, t0)


def _improve_with_cpsat(instance: PipelineInstance, best: PipelineSchedule, bound: float, deadline: Deadline,
                        workers: int, seed: int, progress: bool, t0: float) -> Result:
    """CP-SAT warm-started from `best` until `deadline` (model building included); Ctrl-C keeps
    `best` or CP-SAT's incumbent, whichever is shorter, and the bound proven so far."""
    with tqdm(total=None, desc="cpsat", unit=" solutions", disable=not progress, leave=False) as bar:
        def on_solution(objective: float, proven: float) -> None:
            bar.set_postfix(makespan=f"{objective:g}", bound=f"{max(proven, bound):g}")
            bar.update()

        try:
            outcome = solve_cpsat(instance, hint=best, lower_bound=bound, deadline=deadline,
                                  workers=workers, seed=seed, on_solution=on_solution)
        except KeyboardInterrupt:  # (while building the model)
            return _finish(best, "cpsat", bound, t0, True)
    if outcome.bound is not None:
        bound = max(bound, outcome.bound)
    if outcome.program is not None:
        found = simulate(instance, outcome.program, solver="cpsat")
        if found.fits_memory and found.schedule.makespan < best.makespan:
            best = found.schedule
    return _finish(best, "cpsat", bound, t0, outcome.interrupted)

