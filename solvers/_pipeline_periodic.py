"""Paced schedules: microbatch m enters the pipeline no earlier than m * p, for a period p.

List schedulers decide locally and, under tight memory on multi-wave placements (V-shape,
interleaved), admit microbatches in bursts that then wait for memory. The periodic schedules of
"Mind the Bubbles and Memory" (Beaumont et al.) avoid that by pacing: microbatch m is released at
m * p and runs its forward/backward chain as early as its devices allow (ops fill the earliest gap
of their device, microbatch after microbatch). Small p packs the pipeline, large p keeps memory
low; the scan below tries periods from the per-device work of one microbatch upward and keeps
every paced schedule that fits the memory limit, plus its earliest-start compaction.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator

from pipesched.solvers._interrupt import Deadline

from pipesched.pipeline import (
    Action,
    DeadlockError,
    Op,
    PipelineInstance,
    PipelineSchedule,
    Simulation,
    simulate,
    simulation_of,
)

GRID = 16  # periods tried between the work bound and one microbatch's full chain
REFINE = 6  # bisection steps between the last period that did not fit and the first that did
MAX_GROUP = 4  # most microbatches released together


class _Device:
    """Busy intervals of one device, sorted; `earliest(t, d)`: first start >= t with d free."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def earliest(self, t: float, duration: float) -> float:
        i = bisect.bisect_right(self.ends, t)  # intervals ending after t (ends are sorted too)
        while i < len(self.starts) and self.starts[i] < t + duration and t < self.ends[i]:
            t = self.ends[i]
            i += 1
        return t

    def take(self, start: float, end: float) -> None:
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)


def paced_ops(instance: PipelineInstance, period: float, inline_w: bool, group: int = 1) -> list[Op]:
    """Microbatch after microbatch, each op of its chain at the earliest free time of its device
    after its inputs (and F(0, m) after (m // group) * period: `group` microbatches enter
    together). W ops follow their B at once (`inline_w`) or are placed after every F and B, in the
    order of their B's end."""
    S, stages = instance.num_stages, instance.stages
    devices = [_Device() for _ in range(instance.num_devices)]
    ops: list[Op] = []

    def place(op: str, s: int, m: int, ready: float) -> Op:
        duration = instance.duration(op, s)
        device = devices[stages[s].device]
        start = device.earliest(ready, duration)
        device.take(start, start + duration)
        ops.append(Op(start, start + duration, op, s, m))
        return ops[-1]

    backwards: list[Op] = []
    for m in range(instance.num_microbatches):
        ready = m // group * period
        for s in range(S):
            ready = place("F", s, m, ready).end + (instance.comm_after(s) if s < S - 1 else 0)
        for s in reversed(range(S)):
            b = place("B", s, m, ready)
            ready = b.end + (instance.comm_after(s - 1) if s > 0 else 0)
            if instance.split_backward:
                if inline_w:
                    place("W", s, m, b.end)
                else:
                    backwards.append(b)
    for b in sorted(backwards, key=lambda o: (o.end, -o.stage)):
        place("W", b.stage, b.microbatch, b.end)
    return ops


def _compacted(instance: PipelineInstance, schedule: PipelineSchedule, solver: str) -> Simulation | None:
    """The same per-device order timed earliest-start (None when that no longer fits)."""
    rows: list[list[Action]] = [[] for _ in range(instance.num_devices)]
    for op in schedule.ops:  # sorted by start
        rows[instance.stages[op.stage].device].append(Action(op.stage, op.op, op.microbatch))
    try:
        result = simulate(instance, rows, solver=solver)
    except DeadlockError:
        return None
    return result if result.fits_memory else None


def periods(instance: PipelineInstance) -> tuple[float, float]:
    """(least, most) period worth trying: the busiest device's work per microbatch, and one
    microbatch's whole chain (then microbatches never overlap)."""
    work = [sum(instance.duration(op, s) for s in stages for op in ("F", *instance.backward_ops))
            for stages in instance.stages_of_device]
    chain = sum(st.F + st.B + (st.W if instance.split_backward else 0) for st in instance.stages)
    chain += 2 * sum(instance.comm_after(s) for s in range(instance.num_stages - 1))
    return max(work), max(chain, max(work))


def group_sizes(instance: PipelineInstance) -> range:
    """1 up to how many microbatches' activations every device can hold at once (at most 4; only
    1 without a memory limit, where pacing is not what matters)."""
    fits = [math.floor(instance.limit(d) / held + 1e-9)
            for d, held in enumerate(sum(instance.stages[s].activation for s in on_device)
                                     for on_device in instance.stages_of_device)
            if instance.limit(d) is not None and held > 0]
    return range(1, max(1, min(fits + [MAX_GROUP])) + 1) if fits else range(1, 2)


def paced_candidates(instance: PipelineInstance, deadline: Deadline | None = None,
                     solver: str = "greedy") -> Iterator[Simulation]:
    """Paced schedules over a scan of periods, for each group size and (when split) both W
    placements: the shortest that fits the memory limit and its earliest-start compaction when
    that fits too. The scan stops at `deadline`, keeping what it found."""
    lo, hi = periods(instance)
    if instance.num_microbatches < 2 or hi <= 0:
        return
    for group in group_sizes(instance):
        for inline_w in (False, True) if instance.split_backward else (False,):
            yield from _scan(instance, lo * group, hi * group, inline_w, group, deadline, solver)
            if deadline is not None and deadline.passed():
                return


def _scan(instance: PipelineInstance, lo: float, hi: float, inline_w: bool, group: int,
          deadline: Deadline | None, solver: str) -> Iterator[Simulation]:
    """Periods on a geometric grid from lo to hi, then bisection below the first that fits."""
    fits: dict[float, Simulation] = {}

    def attempt(p: float) -> bool:
        if deadline is not None and deadline.passed():
            raise TimeoutError
        result = simulation_of(instance, paced_ops(instance, p, inline_w, group), solver)
        if result.fits_memory:
            fits[p] = result
        return result.fits_memory

    grid = [lo * (hi / lo) ** (i / GRID) for i in range(GRID + 1)] if lo > 0 else [hi]
    try:
        first = next((i for i, p in enumerate(grid) if attempt(p)), None)
        if first is not None:
            below, above = (grid[first - 1], grid[first]) if first > 0 else (grid[0], grid[0])
            for _ in range(REFINE if first > 0 else 0):
                middle = (below + above) / 2
                below, above = (below, middle) if attempt(middle) else (middle, above)
            for p in grid[first + 1:first + 3]:
                attempt(p)
    except TimeoutError:
        pass
    if fits:
        best = min(fits.values(), key=lambda r: r.schedule.makespan)
        yield best
        compact = None if deadline is not None and deadline.passed() else _compacted(instance, best.schedule, solver)
        if compact is not None:
            yield compact
