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

OPS = ("F", "Fr", "B", "W", "R")  # Fr: forward of a rematerialized microbatch (keeps only its input)
IDLE = 0
BRANCH, LOCAL, MICROBATCH, IN, RES, STASH, OUT = range(7)  # table columns; then one per shift


def branch_index(kind: int, op: str) -> int:
    """Index of the (kind, op) branch in the program's lax.switch (0 is idle)."""
    return 1 + kind * len(OPS) + OPS.index(op)


def stage_kinds(num_stages: int) -> tuple[tuple[bool, bool], ...]:
    """Per stage (is first, is last); stages of one kind share their structure."""
    return tuple((s == 0, s == num_stages - 1) for s in range(num_stages))


class Plan(NamedTuple):
    """Everything the compiler needs, all shapes static."""

    num_devices: int
    num_microbatches: int
    split_backward: bool
    kinds: tuple[tuple[bool, bool], ...]  # distinct kinds, in order of first stage
    kind_of: tuple[int, ...]  # per stage: index into kinds
    local: tuple[tuple[tuple[int, ...], ...], ...]  # [kind][device] -> the stages it holds, in order
    shifts: tuple[int, ...]  # device shifts (receiver - sender mod P) that carry values
    table: np.ndarray  # int32 [P, ticks, 7 + len(shifts)]
    hidden_slots: int  # slot `hidden_slots` is the trash slot
    residual_slots: tuple[int, ...]  # per device: peak live microbatches with residuals
    stash_slots: tuple[int, ...]  # per device: peak microbatches waiting for W (split backward)
    executed: PipelineSchedule  # the executed form, timed with the instance's durations

    @property
    def ticks(self) -> int:
        return self.table.shape[1]

    def local_count(self, kind: int) -> int:
        return max(1, max(len(stages) for stages in self.local[kind]))


def unit_instance(instance: PipelineInstance) -> PipelineInstance:
    """The instance with every op lasting one tick and no communication delay."""
    stages = tuple(dataclasses.replace(st, F=1, B=1, W=1, R=1) for st in instance.stages)
    return instance.replace(stages=stages, comm=0, memory_limit=None)


def tick_schedule(schedule: PipelineSchedule) -> dict[tuple[str, int, int], int]:
    """Tick of every action of the schedule's per-device order."""
    ticks = simulate(unit_instance(schedule.instance), program_of(schedule)).schedule
    return {op.key: round(op.start) for op in ticks.ops}


def executed_form(instance: PipelineInstance, tick_of: dict[tuple[str, int, int], int],
                  solver: str) -> PipelineSchedule:
    """Time the ticks: each lasts its longest action, then its longest transfer."""
    num_ticks = max(tick_of.values()) + 1
    compute, comm = np.zeros(num_ticks), np.zeros(num_ticks)
    for (op, s, _), t in tick_of.items():
        compute[t] = max(compute[t], instance.duration(op, s))
        comm[t] = max(comm[t], _transfer_delay(instance, op, s))
    length = compute + comm
    start = np.concatenate([[0.0], np.cumsum(length)])
    ops = [Op(float(start[t]), float(start[t]) + instance.duration(op, s), op, s, m)
           for (op, s, m), t in tick_of.items()]
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


def make_plan(schedule: PipelineSchedule) -> Plan:
    """Validate the schedule and derive the lock-step tables of its executed form."""
    if not schedule.ops:
        raise ValueError(f"schedule has no ops (status {schedule.status!r}): solve the instance first")
    validate_pipeline(schedule)
    inst = schedule.instance
    P, S, M = inst.num_devices, inst.num_stages, inst.num_microbatches
    tick_of = tick_schedule(schedule)
    remat = schedule.rematerialized
    per_stage = stage_kinds(S)
    kinds = tuple(dict.fromkeys(per_stage))
    kind_of = tuple(kinds.index(k) for k in per_stage)
    local = tuple(tuple(tuple(s for s in inst.stages_of_device[d] if kind_of[s] == c) for d in range(P))
                  for c in range(len(kinds)))
    device = [st.device for st in inst.stages]

    hidden, residual, stash = [], [], []
    for s in range(S):
        for m in range(M):
            f, b = tick_of[("F", s, m)], tick_of[("B", s, m)]
            keeper = tick_of[("R", s, m)] if (s, m) in remat else f
            residual.append(_Item(device[s], keeper, b, (s, m)))
            if inst.split_backward:
                stash.append(_Item(device[s], keeper, tick_of[("W", s, m)], (s, m)))
            if s > 0:  # the stage input, from its arrival to F (or to R when rematerialized)
                hidden.append(_Item(device[s], tick_of[("F", s - 1, m)], keeper, ("x", s, m)))
            if s < S - 1:  # the output gradient, from its arrival to B
                hidden.append(_Item(device[s], tick_of[("B", s + 1, m)], b, ("g", s, m)))
    hidden_slot, hidden_slots = _allocate(hidden, P)
    residual_slot, residual_slots = _allocate(residual, P)
    stash_slot, stash_slots = _allocate(stash, P)

    trash = max(hidden_slots)
    shifts = sorted({(device[s2] - device[s]) % P for s in range(S) for s2 in (s - 1, s + 1)
                     if 0 <= s2 < S and device[s2] != device[s]})
    table = np.zeros((P, max(tick_of.values()) + 1, 7 + len(shifts)), np.int32)
    table[:, :, OUT:] = trash
    for (op, s, m), t in tick_of.items():
        d, row = device[s], table[device[s], t]
        c = kind_of[s]
        row[BRANCH] = branch_index(c, "Fr" if op == "F" and (s, m) in remat else op)
        row[LOCAL] = local[c][d].index(s)
        row[MICROBATCH] = m
        row[RES] = residual_slot[(s, m)]
        row[STASH] = stash_slot.get((s, m), 0)
        if op in ("F", "R"):
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
            table[device[target], t, 7 + shifts.index(shift)] = hidden_slot[key]
    executed = executed_form(inst, tick_of, schedule.solver)
    validate_pipeline(executed)
    return Plan(P, M, inst.split_backward, kinds, kind_of, local, tuple(shifts), table, trash, residual_slots,
                stash_slots, executed)
