"""From a schedule to lock-step tables: which action each device runs at each tick, which buffer
slot every value lives in, and the time this executed form takes (pure Python, no JAX).

The compiled program advances all devices in lock step: in tick t each device runs at most one
action of its per-device order, then every device sends its output to its neighbours (one
`ppermute` per device shift in use). An action runs at the first tick after its inputs were
produced and after the device's previous action: the earliest-start schedule of the same order
with unit durations and no communication delay. A tick lasts as long as its longest action plus
the communication it starts, so the executed form can take longer than the schedule itself.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import NamedTuple

import numpy as np

from pipesched.pipeline import Op, PipelineInstance, PipelineSchedule, program_of, simulate, validate_pipeline
from pipesched.pipeline._model import RematOption

OPS = ("F", "Fr", "B", "W", "R")  # Fr, R: of remat option 0 (Fr keeps only the stage input)
IDLE = 0
BRANCH, LOCAL, MICROBATCH, IN, RES, STASH, GRADS, CHECKPOINT, OUT = range(9)  # table columns; then one per shift


def plan_ops(num_options: int, backward_recompute: bool) -> tuple[str, ...]:
    """The branches of every stage kind: OPS, RW when the instance allows it, then `Fr:k` and
    `R:k` (forward keeping a checkpoint, recompute from it) of every remat option k > 0."""
    return OPS + ("RW",) * backward_recompute + tuple(f"{op}:{k}" for k in range(1, num_options) for op in ("Fr", "R"))


def branch_index(ops: tuple[str, ...], kind: int, op: str) -> int:
    """Index of the (kind, op) branch in the program's lax.switch (0 is idle)."""
    return 1 + kind * len(ops) + ops.index(op)


def op_option(op: str) -> tuple[str, int]:
    """(op kind, remat option) of a branch name: `R:1` -> ("R", 1), `F` -> ("F", 0)."""
    kind, _, option = op.partition(":")
    return kind, int(option or 0)


def stage_kinds(num_stages: int) -> tuple[tuple[bool, bool], ...]:
    """Per stage (is first, is last); stages of one kind share their structure."""
    return tuple((s == 0, s == num_stages - 1) for s in range(num_stages))


class Plan(NamedTuple):
    """Everything the compiler needs, all shapes static."""

    num_devices: int
    num_microbatches: int
    split_backward: bool
    ops: tuple[str, ...]  # the branches of each stage kind (`plan_ops`)
    kinds: tuple[tuple[bool, bool], ...]  # distinct kinds, in order of first stage
    kind_of: tuple[int, ...]  # per stage: index into kinds
    local: tuple[tuple[tuple[int, ...], ...], ...]  # [kind][device] -> the stages it holds, in order
    shifts: tuple[int, ...]  # device shifts (receiver - sender mod P) that carry values
    table: np.ndarray  # int32 [P, ticks, OUT + 1 + len(shifts)]
    hidden_slots: int  # slot `hidden_slots` is the trash slot
    residual_slots: tuple[int, ...]  # per device: peak live microbatches with residuals
    stash_slots: tuple[int, ...]  # per device: peak op inputs kept for W (split backward)
    grad_slots: tuple[int, ...]  # per device: peak op output gradients kept for W (split backward)
    checkpoint_slots: tuple[int, ...]  # per device: peak checkpoints of remat options k > 0
    executed: PipelineSchedule  # the executed form, timed with the instance's durations

    @property
    def ticks(self) -> int:
        return self.table.shape[1]

    def branch_index(self, kind: int, op: str) -> int:
        return branch_index(self.ops, kind, op)

    def local_count(self, kind: int) -> int:
        return max(1, max(len(stages) for stages in self.local[kind]))


def _unit_stage(st):
    """The stage with every op (of every remat option) lasting one tick."""
    options = None if st.remat_options is None else tuple(RematOption(o.checkpoint, 1) for o in st.remat_options)
    return dataclasses.replace(st, F=1, B=1, W=1, R=1, remat_options=options, RW=None if st.RW is None else 1)


def unit_instance(instance: PipelineInstance) -> PipelineInstance:
    """The instance with every op lasting one tick and no communication delay."""
    return instance.replace(stages=tuple(_unit_stage(st) for st in instance.stages), comm=0, memory_limit=None)


def tick_schedule(schedule: PipelineSchedule) -> dict[tuple[str, int, int], int]:
    """Tick of every action of the schedule's per-device order."""
    ticks = simulate(unit_instance(schedule.instance), program_of(schedule)).schedule
    return {op.key: round(op.start) for op in ticks.ops}


def remat_options(schedule: PipelineSchedule) -> dict[tuple[int, int], int]:
    """The remat option of every rematerialized (stage, microbatch)."""
    return {(op.stage, op.microbatch): op.option for op in schedule.ops if op.op == "R"}


def executed_form(instance: PipelineInstance, tick_of: dict[tuple[str, int, int], int], solver: str,
                  options: dict[tuple[int, int], int]) -> PipelineSchedule:
    """Time the ticks: each lasts its longest action, then its longest transfer; `options` gives
    the remat option of each R (`remat_options`)."""
    num_ticks = max(tick_of.values()) + 1
    compute, comm = np.zeros(num_ticks), np.zeros(num_ticks)

    def duration(op: str, s: int, m: int) -> float:
        return instance.duration(op, s, options.get((s, m), 0) if op == "R" else 0)
    for (op, s, m), t in tick_of.items():
        compute[t] = max(compute[t], duration(op, s, m))
        comm[t] = max(comm[t], _transfer_delay(instance, op, s))
    length = compute + comm
    start = np.concatenate([[0.0], np.cumsum(length)])
    ops = [Op(float(start[t]), float(start[t]) + duration(op, s, m), op, s, m,
              options.get((s, m), 0) if op == "R" else 0) for (op, s, m), t in tick_of.items()]
    return PipelineSchedule.from_ops(instance, ops, lower_bound=None, status="feasible",
                                     solver=f"executed:{solver}", solve_time_s=0.0)


def _transfer_delay(instance: PipelineInstance, op: str, s: int) -> float:
    """Delay of the value `op` of stage s sends to another device (0 when none or local)."""
    if op == "F" and s < instance.num_stages - 1:
        return instance.comm_after(s)
    if op == "B" and s > 0:
        return instance.comm_after(s - 1)
    return 0.0


class _Item(NamedTuple):
    device: int
    written: int  # tick whose end writes the value
    read: int  # last tick that reads it
    key: tuple  # what the slot holds


def _allocate(items: list[_Item], num_devices: int) -> tuple[dict[tuple, int], tuple[int, ...]]:
    """Interval colouring per device (greedy by write tick is optimal): a slot read at tick t may
    be written again from tick t on, since each tick reads before it writes. Returns the slot of
    every item and the number of slots per device."""
    slot_of: dict[tuple, int] = {}
    most = [0] * num_devices
    by_device: dict[int, list[_Item]] = {}
    for item in items:
        by_device.setdefault(item.device, []).append(item)
    for device, device_items in by_device.items():
        busy: list[tuple[int, int]] = []  # (read tick, slot)
        free: list[int] = []
        count = 0
        for item in sorted(device_items, key=lambda i: (i.written, i.read)):
            while busy and busy[0][0] <= item.written:
                heapq.heappush(free, heapq.heappop(busy)[1])
            slot = heapq.heappop(free) if free else count
            count = max(count, slot + 1)
            slot_of[item.key] = slot
            heapq.heappush(busy, (item.read, slot))
        most[device] = count
    return slot_of, tuple(most)


class _Items(NamedTuple):
    """What every pool holds, and when (`_pair_items`)."""

    hidden: list[_Item]
    residual: list[_Item]
    checkpoint: list[_Item]
    stash: list[_Item]
    grads: list[_Item]


def _pair_items(inst: PipelineInstance, tick_of: dict, options: dict, items: _Items, s: int, m: int) -> None:
    """The slots of (s, m), after formats.md 1.2 rule 5 and 1.4. Keeper: the op leaving the
    residuals (R when rematerialized, else F). Option k > 0 keeps a checkpoint from Fr to R,
    option 0 the stage input (its hidden slot, until R). Split: the op inputs from the keeper to W
    and the output gradients from the keeper to W; with RW the op inputs only until B, and again
    from RW to W, the stage input staying in its hidden slot until RW."""
    device, option = inst.stages[s].device, options.get((s, m))
    f, b = tick_of[("F", s, m)], tick_of[("B", s, m)]
    keeper = f if option is None else tick_of[("R", s, m)]
    items.residual.append(_Item(device, keeper, b, (s, m)))
    if option:
        items.checkpoint.append(_Item(device, f, keeper, (s, m)))
    rw = tick_of.get(("RW", s, m))
    if inst.split_backward:
        w = tick_of[("W", s, m)]
        items.stash.append(_Item(device, keeper, w if rw is None else b, ("F", s, m)))
        if rw is not None:
            items.stash.append(_Item(device, rw, w, ("RW", s, m)))
        items.grads.append(_Item(device, keeper, w, (s, m)))
    if s > 0:  # the stage input, from its arrival to its last reader
        readers = [keeper if option == 0 else f] + ([] if rw is None else [rw])
        items.hidden.append(_Item(device, tick_of[("F", s - 1, m)], max(readers), ("x", s, m)))
    if s < inst.num_stages - 1:  # the output gradient, from its arrival to B
        items.hidden.append(_Item(device, tick_of[("B", s + 1, m)], b, ("g", s, m)))


def _branch_name(op: str, option: int | None) -> str:
    """The branch running `op` of a pair with remat option `option` (None: not rematerialized)."""
    if op == "F" and option is not None:
        return "Fr" if option == 0 else f"Fr:{option}"
    return f"R:{option}" if op == "R" and option else op


def make_plan(schedule: PipelineSchedule) -> Plan:
    """Validate the schedule and derive the lock-step tables of its executed form."""
    if not schedule.ops:
        raise ValueError(f"schedule has no ops (status {schedule.status!r}): solve the instance first")
    validate_pipeline(schedule)
    inst = schedule.instance
    P, S, M = inst.num_devices, inst.num_stages, inst.num_microbatches
    tick_of = tick_schedule(schedule)
    options = remat_options(schedule)
    ops = plan_ops(max(len(st.options) for st in inst.stages) if inst.allow_remat else 1,
                   any(inst.may_recompute_backward(s) for s in range(S)))
    per_stage = stage_kinds(S)
    kinds = tuple(dict.fromkeys(per_stage))
    kind_of = tuple(kinds.index(k) for k in per_stage)
    local = tuple(tuple(tuple(s for s in inst.stages_of_device[d] if kind_of[s] == c) for d in range(P))
                  for c in range(len(kinds)))
    device = [st.device for st in inst.stages]

    items = _Items([], [], [], [], [])
    for s in range(S):
        for m in range(M):
            _pair_items(inst, tick_of, options, items, s, m)
    hidden_slot, hidden_slots = _allocate(items.hidden, P)
    residual_slot, residual_slots = _allocate(items.residual, P)
    checkpoint_slot, checkpoint_slots = _allocate(items.checkpoint, P)
    stash_slot, stash_slots = _allocate(items.stash, P)
    grad_slot, grad_slots = _allocate(items.grads, P)

    trash = max(hidden_slots)
    shifts = sorted({(device[s2] - device[s]) % P for s in range(S) for s2 in (s - 1, s + 1)
                     if 0 <= s2 < S and device[s2] != device[s]})
    table = np.zeros((P, max(tick_of.values()) + 1, OUT + 1 + len(shifts)), np.int32)
    table[:, :, OUT:] = trash
    for (op, s, m), t in tick_of.items():
        d, row = device[s], table[device[s], t]
        c = kind_of[s]
        row[BRANCH] = branch_index(ops, c, _branch_name(op, options.get((s, m))))
        row[LOCAL] = local[c][d].index(s)
        row[MICROBATCH] = m
        row[RES] = residual_slot[(s, m)]
        row[STASH] = stash_slot.get(("RW" if op in ("RW", "W") and ("RW", s, m) in tick_of else "F", s, m), 0)
        row[GRADS] = grad_slot.get((s, m), 0)
        row[CHECKPOINT] = checkpoint_slot.get((s, m), 0)
        if op in ("F", "R", "RW"):
            row[IN] = hidden_slot.get(("x", s, m), trash)
        elif op == "B":
            row[IN] = hidden_slot.get(("g", s, m), trash)
        target = s + 1 if op == "F" else s - 1 if op == "B" else None
        if target is None or not 0 <= target < S:
            continue
        key = ("x", target, m) if op == "F" else ("g", target, m)
        if device[target] == d:
            row[OUT] = hidden_slot[key]
        else:
            shift = (device[target] - d) % P
            table[device[target], t, OUT + 1 + shifts.index(shift)] = hidden_slot[key]
    executed = executed_form(inst, tick_of, schedule.solver, options)
    validate_pipeline(executed)
    return Plan(P, M, inst.split_backward, ops, kinds, kind_of, local, tuple(shifts), table, trash, residual_slots,
                stash_slots, grad_slots, checkpoint_slots, executed)
