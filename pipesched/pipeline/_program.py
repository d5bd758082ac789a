"""Per-device programs in PyTorch pipelining's compact notation, and the earliest-start simulator.

An *action* is `{stage}{op}{microbatch}`: `2F0` is the forward of stage 2 on microbatch 0; ops are
F, B (the whole backward, or its input-gradient part when the backward is split), W (weight
gradient), R (recompute; `0R2:1` uses remat option 1 of formats.md 1.4) and RW (backward-pass
recompute, `1RW3`). `I` is read as B, as PyTorch writes the split input gradient.
A *program* gives, per device, the order in which it runs its actions.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from pipesched._common import FormatError, PipeschedError, approx_le, in_file, read_text, show
from pipesched.pipeline._model import Op, PipelineInstance, PipelineSchedule
from pipesched.pipeline._validate import MemoryTimeline, memory_timeline

_ACTION = re.compile(r"^([0-9]{1,12})(RW|[FBWRI])([0-9]{1,12})(?::([0-9]{1,6}))?$")


class Action(NamedTuple):
    stage: int
    op: str
    microbatch: int
    option: int = 0  # the remat option of an R action

    def __str__(self) -> str:
        return f"{self.stage}{self.op}{self.microbatch}" + (f":{self.option}" if self.option else "")

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.op, self.stage, self.microbatch)

    @classmethod
    def parse(cls, text: str) -> Action:
        match = _ACTION.match(text.strip())
        if not match:
            raise FormatError(f"{show(text)}: not an action; write {{stage}}{{op}}{{microbatch}} "
                              "such as 2F0, 1B3, 0W1, 0R2, 0R2:1 (remat option 1), 1RW3")
        stage, op, mb, option = match.groups()
        if option is not None and op != "R":
            raise FormatError(f"{show(text)}: only R actions take a remat option (:k)")
        return cls(int(stage), "B" if op == "I" else op, int(mb), int(option or 0))


Program = tuple[tuple[Action, ...], ...]


def make_program(rows: Iterable[Iterable[Action | str]]) -> Program:
    return tuple(tuple(a if isinstance(a, Action) else Action.parse(a) for a in row) for row in rows)


def parse_program_csv(text: str) -> Program:
    """One CSV row per device (rank 0 first), one action per cell; empty cells are skipped."""
    rows = []
    reader = csv.reader(io.StringIO(text))
    try:
        for r, row in enumerate(reader):
            actions = []
            for c, cell in enumerate(row):
                if cell.strip():
                    try:
                        actions.append(Action.parse(cell))
                    except FormatError as e:
                        raise FormatError(f"row {r} column {c}: {e}") from None
            rows.append(tuple(actions))
    except csv.Error as e:
        raise FormatError(f"row {reader.line_num - 1}: not a CSV row ({e})") from None
    return tuple(rows)


def load_program(path: str | Path) -> Program:
    return in_file(path, lambda: parse_program_csv(read_text(path)))


def format_program_csv(program: Program) -> str:
    return "".join(",".join(str(a) for a in row) + "\n" for row in program)


def program_of(schedule: PipelineSchedule) -> Program:
    """The per-device order of a timed schedule (start time, then end, stage, microbatch)."""
    return tuple(tuple(Action(op.stage, op.op, op.microbatch, op.option) for op in schedule.ops_of_device(d))
                 for d in range(schedule.instance.num_devices))


def predecessors(instance: PipelineInstance, action: Action, rematerialized: bool,
                 backward_recomputed: bool = False) -> list[tuple[tuple[str, int, int], float]]:
    """The ops `action` waits for, each with the delay after its end (formats.md 1.2 rule 3, 1.4)."""
    s, op, m = action.stage, action.op, action.microbatch
    last = instance.num_stages - 1
    if op == "F":
        return [(("F", s - 1, m), instance.comm_after(s - 1))] if s > 0 else []
    if op == "B":
        deps = [(("F", s, m), 0)] if s == last else [(("B", s + 1, m), instance.comm_after(s))]
        return deps + ([(("R", s, m), 0)] if rematerialized else [])
    if op == "R":
        return [(("F", s, m), 0)]
    if op == "W" and backward_recomputed:
        return [(("B", s, m), 0), (("RW", s, m), 0)]
    return [(("B", s, m), 0)]  # W, RW


def check_program(instance: PipelineInstance, program: Program) -> None:
    """Every required action exactly once, each on the device holding its stage."""
    if len(program) != instance.num_devices:
        raise FormatError(f"program: expected {instance.num_devices} device rows, got {len(program)}")
    seen: dict[tuple[str, int, int], int] = {}
    for d, row in enumerate(program):
        for i, a in enumerate(row):
            where = f"program[{d}][{i}] {a}"
            if not 0 <= a.stage < instance.num_stages:
                raise FormatError(f"{where}: stage must be < {instance.num_stages}")
            if not 0 <= a.microbatch < instance.num_microbatches:
                raise FormatError(f"{where}: microbatch must be < {instance.num_microbatches}")
            if instance.stages[a.stage].device != d:
                raise FormatError(f"{where}: stage {a.stage} runs on device {instance.stages[a.stage].device}")
            if a.op == "W" and not instance.split_backward:
                raise FormatError(f"{where}: W needs split_backward")
            if a.op == "R" and not instance.allow_remat:
                raise FormatError(f"{where}: R needs allow_remat")
            if a.op == "R" and not 0 <= a.option < len(instance.stages[a.stage].options):
                raise FormatError(f"{where}: stage {a.stage} has {len(instance.stages[a.stage].options)} "
                                  "remat option(s)")
            if a.op == "RW" and not instance.may_recompute_backward(a.stage):
                raise FormatError(f"{where}: RW needs allow_remat, split_backward and stages[{a.stage}].RW")
            if a.key in seen:
                raise FormatError(f"{where}: duplicate action (also on device {seen[a.key]})")
            seen[a.key] = d
    for s in range(instance.num_stages):
        for m in range(instance.num_microbatches):
            for op in ("F", *instance.backward_ops):
                if (op, s, m) not in seen:
                    raise FormatError(f"program: action {s}{op}{m} is missing")


class BlockedAction(NamedTuple):
    device: int
    action: Action
    waiting_for: tuple[str, ...]


class DeadlockError(PipeschedError):
    """The program cannot run: every unfinished device waits on an action that never comes."""

    exit_code = 1

    def __init__(self, blocked: Sequence[BlockedAction]):
        self.blocked = tuple(blocked)
        parts = [f"device {b.device} at {b.action} waits for {', '.join(b.waiting_for)}" for b in blocked]
        super().__init__("deadlock: " + "; ".join(parts))


class Simulation(NamedTuple):
    schedule: PipelineSchedule
    memory: MemoryTimeline
    fits_memory: bool


def simulate(instance: PipelineInstance, program: Program | Iterable[Iterable[Action | str]], *,
             solver: str = "program") -> Simulation:
    """Run each device's actions in program order, each as early as its device and its inputs
    allow (earliest-start schedule). Raises DeadlockError naming the blocked actions."""
    t0 = time.perf_counter()
    program = make_program(program)
    check_program(instance, program)
    remat = {(a.stage, a.microbatch) for row in program for a in row if a.op == "R"}
    rw = {(a.stage, a.microbatch) for row in program for a in row if a.op == "RW"}
    done: dict[tuple[str, int, int], Op] = {}
    waiters: dict[tuple[str, int, int], list[int]] = {}
    pointer = [0] * instance.num_devices
    free_at = [0.0] * instance.num_devices
    queue = list(range(instance.num_devices))
    while queue:
        d = queue.pop()
        row = program[d]
        while pointer[d] < len(row):
            action = row[pointer[d]]
            pair = (action.stage, action.microbatch)
            deps = predecessors(instance, action, pair in remat, pair in rw)
            missing = next((key for key, _ in deps if key not in done), None)
            if missing is not None:
                waiters.setdefault(missing, []).append(d)
                break
            start = max([free_at[d]] + [done[key].end + delay for key, delay in deps])
            op = Op(start, start + instance.duration(action.op, action.stage, action.option), action.op,
                    action.stage, action.microbatch, action.option)
            done[action.key] = op
            free_at[d] = op.end
            pointer[d] += 1
            queue.extend(waiters.pop(action.key, ()))
    blocked = [_blocked(instance, d, program[d][pointer[d]], remat, rw, done)
               for d in range(instance.num_devices) if pointer[d] < len(program[d])]
    if blocked:
        raise DeadlockError(blocked)
    return simulation_of(instance, list(done.values()), solver, time.perf_counter() - t0)


def simulation_of(instance: PipelineInstance, ops: Iterable[Op], solver: str, solve_time_s: float = 0.0
                  ) -> Simulation:
    """Timed ops as a "feasible" schedule, with their memory and whether it fits the limits."""
    schedule = PipelineSchedule.from_ops(instance, list(ops), lower_bound=None, status="feasible",
                                         solver=solver, solve_time_s=solve_time_s)
    timeline = memory_timeline(instance, schedule.ops)
    fits = all(instance.limit(d) is None or approx_le(peak, instance.limit(d))
               for d, peak in enumerate(timeline.peaks))
    return Simulation(schedule, timeline, fits)


def _blocked(instance: PipelineInstance, device: int, action: Action, remat: set[tuple[int, int]],
             rw: set[tuple[int, int]], done: dict[tuple[str, int, int], Op]) -> BlockedAction:
    pair = (action.stage, action.microbatch)
    deps = predecessors(instance, action, pair in remat, pair in rw)
    waiting = tuple(f"{s}{op}{m}" for (op, s, m), _ in deps if (op, s, m) not in done)
    return BlockedAction(device, action, waiting)
