"""Independent validator of pipeline schedules: every numbered rule of formats.md 1.2, with the
rules section 1.4 adds (remat options, backward-pass recompute RW).

It depends on the model only (never on a solver or the simulator), so that it can check them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

from pipesched._common import ValidationError, approx_eq, approx_le, approx_lt, check_result_claims, tol
from pipesched.pipeline._model import Op, PipelineInstance, PipelineSchedule


class PipelineReport(NamedTuple):
    """Figures recomputed from a valid schedule."""

    makespan: float
    peak_memory: tuple[float, ...]  # per device


class MemoryTimeline(NamedTuple):
    """Per device: the times at which memory changes and the level from each time on."""

    times: tuple[tuple[float, ...], ...]
    levels: tuple[tuple[float, ...], ...]

    @property
    def peaks(self) -> tuple[float, ...]:
        return tuple(max(lv, default=0.0) for lv in self.levels)


def _rule(n: int) -> str:
    return f"1.2 rule {n}"


def memory_deltas(instance: PipelineInstance, ops: Iterable[Op]) -> list[list[tuple[float, float]]]:
    """Per device, the (time, change) events of formats.md 1.2 rule 5 and 1.4."""
    ops = list(ops)
    option = {(op.stage, op.microbatch): op.option for op in ops if op.op == "R"}
    backward_recomputed = {(op.stage, op.microbatch) for op in ops if op.op == "RW"}
    events: list[list[tuple[float, float]]] = [[] for _ in range(instance.num_devices)]
    for op in ops:
        st = instance.stages[op.stage]
        dev = events[st.device]
        pair = (op.stage, op.microbatch)
        if op.op == "F":
            dev.append((op.start, st.activation))
            if pair in option:
                dev.append((op.end, -(st.activation - st.options[option[pair]].checkpoint)))
        elif op.op == "R":
            dev.append((op.start, st.activation - st.options[op.option].checkpoint))
        elif op.op == "B":
            if pair in backward_recomputed:
                dev.append((op.end, -(st.activation - st.wgrad_checkpoint)))
            else:
                dev.append((op.end, -instance.freed_by_B(op.stage)))
        elif op.op == "RW":
            dev.append((op.start, st.wgrad_stash - st.wgrad_checkpoint))
        elif op.op == "W" and instance.split_backward:
            dev.append((op.end, -st.wgrad_stash))
    return events


def memory_timeline(instance: PipelineInstance, ops: Iterable[Op]) -> MemoryTimeline:
    """Memory per device as a step function; at equal times (within tolerance) all decreases
    apply before increases, so the level after each group of equal times is the peak there."""
    all_times, all_levels = [], []
    for events in memory_deltas(instance, ops):
        events.sort()
        times: list[float] = []
        levels: list[float] = []
        level, i = 0.0, 0
        while i < len(events):
            t0, j, change = events[i][0], i, 0.0
            while j < len(events) and approx_eq(events[j][0], t0):
                change += events[j][1]
                j += 1
            level += change
            times.append(t0)
            levels.append(level)
            i = j
        all_times.append(tuple(times))
        all_levels.append(tuple(levels))
    return MemoryTimeline(tuple(all_times), tuple(all_levels))


def check_op_set(instance: PipelineInstance, ops: Iterable[Op]) -> None:
    """Rule 1: exactly one F and B per (s, m), one W iff split, at most one R (only with remat) and
    at most one RW (1.4: only with remat, split backward and the stage's RW duration)."""
    counts = Counter(op.key for op in ops)
    for (kind, s, m), n in counts.items():
        name = f"{s}{kind}{m}"
        if kind == "W" and not instance.split_backward:
            raise ValidationError(_rule(1), f"{name}: W ops only exist when split_backward is true", name)
        if kind == "R" and not instance.allow_remat:
            raise ValidationError(_rule(1), f"{name}: R ops need allow_remat", name)
        if kind == "RW" and not instance.may_recompute_backward(s):
            raise ValidationError("1.4", f"{name}: RW ops need allow_remat, split_backward and stages[{s}].RW",
                                  name)
        if n > 1:
            raise ValidationError(_rule(1), f"{name} appears {n} times", name)
    for s in range(instance.num_stages):
        for m in range(instance.num_microbatches):
            for kind in ("F", *instance.backward_ops):
                if (kind, s, m) not in counts:
                    raise ValidationError(_rule(1), f"{s}{kind}{m} is missing", f"{s}{kind}{m}")


def check_durations(instance: PipelineInstance, ops: Iterable[Op]) -> None:
    """Rule 2: end - start equals the op's duration; start >= 0."""
    for op in ops:
        want = instance.duration(op.op, op.stage, op.option)
        if not approx_eq(op.end - op.start, want):
            raise ValidationError(_rule(2), f"{op.name} lasts {op.end - op.start}, its duration is {want}", op.name)
        if approx_lt(op.start, 0):
            raise ValidationError(_rule(2), f"{op.name} starts at {op.start} < 0", op.name)


def check_dependencies(instance: PipelineInstance, ops: Iterable[Op]) -> None:
    """Rule 3: data dependencies with communication delays (and 1.4's for RW)."""
    by_key = {op.key: op for op in ops}
    S = instance.num_stages

    def need(later: Op, earlier_key: tuple[str, int, int], delay: float) -> None:
        earlier = by_key[earlier_key]
        if approx_lt(later.start, earlier.end + delay):
            extra = f" + comm {delay}" if delay else ""
            raise ValidationError(
                _rule(3), f"{later.name} starts at {later.start} before {earlier.name} ends "
                f"({earlier.end}{extra})", later.name)

    for op in by_key.values():
        s, m = op.stage, op.microbatch
        if op.op == "F" and s > 0:
            need(op, ("F", s - 1, m), instance.comm_after(s - 1))
        elif op.op == "B":
            if s == S - 1:
                need(op, ("F", s, m), 0)
            else:
                need(op, ("B", s + 1, m), instance.comm_after(s))
            if ("R", s, m) in by_key:
                need(op, ("R", s, m), 0)
        elif op.op == "R":
            need(op, ("F", s, m), 0)
        elif op.op == "W":
            need(op, ("B", s, m), 0)
            if ("RW", s, m) in by_key:
                need(op, ("RW", s, m), 0)
        elif op.op == "RW":
            need(op, ("B", s, m), 0)


def check_no_overlap(schedule: PipelineSchedule) -> None:
    """Rule 4: one compute stream per device."""
    for d in range(schedule.instance.num_devices):
        frontier: Op | None = None
        for op in schedule.ops_of_device(d):
            if frontier is not None and op.start < frontier.end - tol(op.start, frontier.end):
                raise ValidationError(
                    _rule(4), f"device {d}: {op.name} [{op.start}, {op.end}] overlaps {frontier.name} "
                    f"[{frontier.start}, {frontier.end}]", op.name)
            if frontier is None or op.end > frontier.end:
                frontier = op


def check_memory(instance: PipelineInstance, ops: Iterable[Op]) -> tuple[float, ...]:
    """Rule 5: the per-device memory step function stays within the limit. Returns the peaks."""
    timeline = memory_timeline(instance, ops)
    for d, (times, levels) in enumerate(zip(timeline.times, timeline.levels)):
        limit = instance.limit(d)
        if limit is None:
            continue
        for t, level in zip(times, levels):
            if not approx_le(level, limit):
                raise ValidationError(_rule(5), f"device {d}: memory {level} at time {t} exceeds limit {limit}")
    return timeline.peaks


def validate_pipeline(schedule: PipelineSchedule) -> PipelineReport:
    """Check rules 1-6 of formats.md 1.2 in order; raise ValidationError naming the first broken
    rule and op. Returns the recomputed makespan and per-device peak memory."""
    instance, ops = schedule.instance, schedule.ops
    empty = not ops
    peaks: tuple[float, ...] = (0.0,) * instance.num_devices
    if not empty:
        check_op_set(instance, ops)
        check_durations(instance, ops)
        check_dependencies(instance, ops)
        check_no_overlap(schedule)
        peaks = check_memory(instance, ops)
    makespan = max((op.end for op in ops), default=0.0)
    check_result_claims(_rule(6), "makespan", schedule.makespan, makespan, schedule.lower_bound,
                        schedule.status, empty)
    return PipelineReport(makespan, peaks)
