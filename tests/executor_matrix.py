"""The executor's acceptance matrix: every zoo schedule on every instance shape it supports, and
greedy and CP-SAT schedules that use split backward and remat, on P in {2, 4, 8} devices.

Shared by tests/test_executor_matrix.py and experiments/check_executor_matrix.py. A *shape* is a
stage placement and whether the backward is split; a zoo schedule that refuses a shape (zoo
`supports` is False) becomes a `Refusal` carrying the zoo's own reason, so it is listed, not dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

from pipesched.solvers import solve_pipeline

from pipesched._common import FormatError
from pipesched.pipeline import PipelineInstance, PipelineSchedule, Stage
from pipesched.pipeline.zoo import (
    ZOO,
    interleaved_placement,
    linear_placement,
    supports,
    uniform_instance,
    v_placement,
    zoo_schedule,
)

DEVICES = (2, 4, 8)
SOLVERS = ("greedy", "cpsat")
SOLVER_TIME_LIMIT = 2.0  # seconds; CP-SAT returns its best schedule so far, proven or not


class Shape(NamedTuple):
    placement: Callable[[int], tuple[int, ...]]
    split_backward: bool


SHAPES = {
    "linear": Shape(linear_placement, False),
    "linear-split": Shape(linear_placement, True),
    "interleaved": Shape(lambda P: interleaved_placement(P, 2), False),
    "interleaved-split": Shape(lambda P: interleaved_placement(P, 2), True),
    "v-split": Shape(v_placement, True),
}
"""Instance shapes: the stage placement for P devices (interleaved: 2 stages per device) and split backward."""

SOLVER_SHAPES = ("linear-split", "interleaved", "v-split")
"""The shapes the solvers run on, with a memory limit that calls for remat: fused and split backward,
one and two stages per device."""


class Case(NamedTuple):
    """One schedule to compile and hold against the single-device reference."""

    source: str  # zoo name, or "greedy" / "cpsat"
    shape: str
    num_devices: int
    build: Callable[[], PipelineSchedule]

    @property
    def id(self) -> str:
        return f"{self.source}-{self.shape}-P{self.num_devices}"


class Refusal(NamedTuple):
    """A zoo schedule that cannot be built for a shape, and the zoo's reason."""

    name: str
    shape: str
    num_devices: int
    reason: str

    @property
    def id(self) -> str:
        return f"{self.name}-{self.shape}-P{self.num_devices}"


def zoo_instance(shape: str, P: int) -> PipelineInstance:
    """Uniform stages (F 4, B 8, W 4 when split), M = 2P microbatches: every schedule reaches its steady state."""
    placement, split = SHAPES[shape]
    return uniform_instance(P, 2 * P, 4, 8, 4 * split, placement=placement(P), split_backward=split,
                            wgrad_stash=0.5 * split)


def solver_instance(shape: str, P: int) -> PipelineInstance:
    """Stages of activation 4 and checkpoint 1, M = max(4, P), memory limit 6 per device: a device
    holding two stages must rematerialize (one microbatch keeps 8 without R), and one holding a
    single stage runs one microbatch at a time unless it does."""
    placement, split = SHAPES[shape]
    stages = tuple(Stage(d, 4, 8, 4 * split, 4, wgrad_stash=2 * split, checkpoint=1) for d in placement(P))
    return PipelineInstance(P, max(4, P), stages, memory_limit=6, split_backward=split, allow_remat=True)


def refusal_reason(name: str, instance: PipelineInstance) -> str | None:
    """The zoo's reason for refusing `instance` (None when `supports` holds)."""
    if supports(name, instance):
        return None
    try:
        ZOO[name](instance)
    except FormatError as error:
        return str(error)
    raise AssertionError(f"supports({name!r}) is False but the zoo builds the schedule")


def zoo_matrix(devices: tuple[int, ...] = DEVICES) -> tuple[list[Case], list[Refusal]]:
    """Every (zoo name, shape, P): a Case when the zoo supports it, else a Refusal with its reason."""
    cases, refusals = [], []
    for name in ZOO:
        for shape in SHAPES:
            for P in devices:
                instance = zoo_instance(shape, P)
                reason = refusal_reason(name, instance)
                if reason is None:
                    cases.append(Case(name, shape, P, functools.partial(_zoo_schedule, instance, name)))
                else:
                    refusals.append(Refusal(name, shape, P, reason))
    return cases, refusals


def solver_matrix(devices: tuple[int, ...] = DEVICES) -> list[Case]:
    """Greedy and CP-SAT (SOLVER_TIME_LIMIT) on every solver shape and P."""
    return [Case(solver, shape, P, functools.partial(_solved, solver_instance(shape, P), solver))
            for solver in SOLVERS for shape in SOLVER_SHAPES for P in devices]


def _zoo_schedule(instance: PipelineInstance, name: str) -> PipelineSchedule:
    return zoo_schedule(instance, name).schedule


def _solved(instance: PipelineInstance, solver: str) -> PipelineSchedule:
    return solve_pipeline(instance, solver, time_limit=SOLVER_TIME_LIMIT).schedule


def ops_used(schedule: PipelineSchedule) -> str:
    """The op kinds the schedule runs, in F B W R order (e.g. "FBWR")."""
    kinds = {op.op for op in schedule.ops}
    return "".join(k for k in "FBWR" if k in kinds)
