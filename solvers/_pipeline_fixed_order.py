"""Remat for a given per-device order (the ILP of "Optimized Forward-Backward Rematerialization",
solved with CP-SAT): which pairs to recompute, with which option (R) and in the backward pass (RW).

An *order* is the per-device sequence of F, B and W actions (a named schedule, a program CSV or a
schedule file; R and RW actions in it are only a starting point). This module turns it into
heuristic programs that fit memory — the order with no remat, with every pair rematerialized, and a
Belady-style repair that rematerializes, at each memory overflow, the pair in flight whose backward
is furthest away — and `solve_cpsat(order=...)` then chooses the remat and the timing optimally.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipesched.solvers._pipeline_greedy import least_memory_option, option_choices

from pipesched._common import FormatError, approx_le
from pipesched.pipeline import (
    Action,
    DeadlockError,
    PipelineInstance,
    PipelineSchedule,
    Program,
    Simulation,
    check_program,
    load_program,
    make_program,
    program_of,
    simulate,
    zoo,
)
from pipesched.pipeline.bounds import least_checkpoint

Order = str | Path | Program | PipelineSchedule


def resolve_order(instance: PipelineInstance, order: Order) -> tuple[Program, str]:
    """(the order's program, a label): a zoo name, a program CSV or schedule JSON path, a Program,
    or a PipelineSchedule. Raises FormatError when it does not cover the instance."""
    if isinstance(order, PipelineSchedule):
        program, label = program_of(order), order.solver
    elif isinstance(order, (str, Path)) and str(order) in zoo.ZOO:
        if not zoo.supports(str(order), instance):
            raise FormatError(f"fix-order: {order} does not support this instance's placement or backward")
        program, label = zoo.ZOO[str(order)](instance), str(order)
    elif isinstance(order, (str, Path)):
        path = Path(order)
        if path.suffix == ".json":
            program, label = program_of(PipelineSchedule.load(path)), path.name
        else:
            program, label = load_program(path), path.name
    else:
        program, label = make_program(order), "program"
    if not instance.allow_remat:
        program = strip_remat(program)
    try:
        check_program(instance, program)
    except FormatError as err:
        raise FormatError(f"fix-order {label}: {err}") from None
    return program, label


def order_memory_needs(instance: PipelineInstance, program: Program) -> list[float]:
    """Per device, the least peak memory of any schedule that keeps `program`'s F/B/W order.

    On one device the order is the time order. Between F(s, m) and B(s, m) a pair holds at least
    least_checkpoint(s), and between B(s, m) and W(s, m) at least its wgrad_checkpoint when it
    may recompute in the backward pass (else its wgrad_stash). F(s, m) starts by adding
    activation(s), B(s, m) starts with all of it back (an R restores it), W(s, m) with all of
    wgrad_stash(s) (an RW restores it): the level at each such start is at least what the pairs
    before it in the order, and not yet released in it, still hold.
    """
    needs = []
    for row in strip_remat(program):
        held, need = 0.0, 0.0
        for a in row:
            st = instance.stages[a.stage]
            kept = least_checkpoint(instance, a.stage)
            stash = st.wgrad_checkpoint if instance.may_recompute_backward(a.stage) else st.wgrad_stash
            stash = stash if instance.split_backward else 0.0
            if a.op == "F":
                need = max(need, held + st.activation)
                held += kept
            elif a.op == "B":
                need = max(need, held - kept + st.activation)
                held += stash - kept
            else:
                need = max(need, held - stash + st.wgrad_stash)
                held -= stash
        needs.append(need)
    return needs


def order_infeasibility(instance: PipelineInstance, program: Program, label: str) -> str | None:
    """Why no schedule keeping the order fits the memory limit (None when that is not proven)."""
    out = [f"device {d}: order {label} needs at least {need:g} memory (every pair rematerialized with its "
           f"least checkpoint) > limit {instance.limit(d):g}"
           for d, need in enumerate(order_memory_needs(instance, program))
           if instance.limit(d) is not None and not approx_le(need, instance.limit(d))]
    return "; ".join(out) or None


def strip_remat(program: Program) -> Program:
    """The F/B/W part of a program."""
    return tuple(tuple(a for a in row if a.op in ("F", "B", "W")) for row in program)


def with_remat(instance: PipelineInstance, base: Program, remat: dict[tuple[int, int], int],
               backward: set[tuple[int, int]]) -> Program:
    """`base` with R(s, m) of option remat[s, m] just before B(s, m), and RW(s, m) just before W."""
    rows = []
    for row in base:
        out: list[Action] = []
        for a in row:
            pair = (a.stage, a.microbatch)
            if a.op == "B" and pair in remat:
                out.append(Action(a.stage, "R", a.microbatch, remat[pair]))
            if a.op == "W" and pair in backward:
                out.append(Action(a.stage, "RW", a.microbatch))
            out.append(a)
        rows.append(tuple(out))
    return tuple(rows)


def order_candidates(instance: PipelineInstance, program: Program, label: str) -> Iterator[Simulation]:
    """Heuristic schedules keeping the order of `program` that fit memory (module docstring)."""
    base = strip_remat(program)
    tried = {base}
    programs = [program, base]
    if instance.allow_remat:
        S, M = instance.num_stages, instance.num_microbatches
        rw = {(s, m) for s in range(S) if instance.may_recompute_backward(s) for m in range(M)}
        for options in option_choices(instance):
            every = {(s, m): options[s] for s in range(S) for m in range(M)}
            programs += [with_remat(instance, base, every, set()), with_remat(instance, base, every, rw)]
        programs.append(with_remat(instance, base, {}, rw))
    for candidate in programs:
        if candidate in tried and candidate is not base:
            continue
        tried.add(candidate)
        result = _simulate(instance, candidate, label)
        if result is not None and result.fits_memory:
            yield result
    if instance.allow_remat:
        repaired = repair(instance, base, label)
        if repaired is not None:
            yield repaired


def _simulate(instance: PipelineInstance, program: Program, label: str) -> Simulation | None:
    try:
        return simulate(instance, program, solver=label)
    except DeadlockError:
        return None


def repair(instance: PipelineInstance, base: Program, label: str, passes: int = 20) -> Simulation | None:
    """Belady-style: simulate; wherever a device exceeds its limit, rematerialize (least-memory
    option) the pairs holding their full activation there whose B starts last, or else let the
    pairs holding their stash whose W starts last recompute in the backward pass, until the
    level there fits; re-simulate (the recomputes move the timing) and repeat."""
    remat: dict[tuple[int, int], int] = {}
    backward: set[tuple[int, int]] = set()
    for _ in range(passes):
        result = _simulate(instance, with_remat(instance, base, remat, backward), label)
        if result is None:
            return None
        if result.fits_memory:
            return result
        added = 0
        by_key = {op.key: op for op in result.schedule.ops}
        for d, (times, levels) in enumerate(zip(result.memory.times, result.memory.levels)):
            if instance.limit(d) is not None:
                added += _relieve(instance, d, times, levels, by_key, remat, backward)
        if not added:
            return None
    return None


def _relieve(instance: PipelineInstance, d: int, times, levels, by_key, remat: dict, backward: set) -> int:
    """Choose pairs of device d to rematerialize / recompute in the backward pass so that every
    level above the limit, less what the choices save (assuming R just before B and RW just
    before W), fits. Returns how many were added."""
    limit, M = instance.limit(d), instance.num_microbatches
    windows = []  # (release time, start, end, saving, kind, pair): where a choice lowers the level
    for s in instance.stages_of_device[d]:
        st = instance.stages[s]
        option = least_memory_option(instance, s)
        for m in range(M):
            if (s, m) not in remat and st.options[option].checkpoint < st.activation:
                b = by_key["B", s, m].start
                windows.append((b, by_key["F", s, m].end, b - st.options[option].R,
                                st.activation - st.options[option].checkpoint, "R", (s, m, option)))
            if instance.may_recompute_backward(s) and (s, m) not in backward and st.wgrad_checkpoint < st.wgrad_stash:
                w = by_key["W", s, m].start
                windows.append((w, by_key["B", s, m].end, w - st.RW, st.wgrad_stash - st.wgrad_checkpoint,
                                "RW", (s, m)))
    chosen: list[tuple] = []
    for t, level in zip(times, levels):
        level -= sum(w[3] for w in chosen if w[1] <= t < w[2])
        if approx_le(level, limit):
            continue
        usable = sorted((w for w in windows if w[1] <= t < w[2] and w not in chosen), key=lambda w: (w[4] != "R", -w[0]))
        for w in usable:
            chosen.append(w)
            level -= w[3]
            if approx_le(level, limit):
                break
    for *_, kind, pair in chosen:
        if kind == "R":
            remat[pair[:2]] = pair[2]
        else:
            backward.add(pair)
    return len(chosen)
