"""V-Half and V-Min: the memory-lean V-shape schedules of Qi et al. 2024, "Pipeline Parallelism
with Controllable Memory" (arXiv 2405.15362), built as in their reference code
(sail-sg/zero-bubble-pipeline-parallelism, zbv_greedy.py).

Each device d holds chunk 0 (stage d) and chunk 1 (stage 2P-1-d). Time is cut into unit slots;
a device's work has six kinds: F0, F1, B1, B0 and the weight gradients W1, W0. The *stable
pattern* gives each kind an offset within a period of 6 slots (microbatch m at offset + 6m),
chosen so that each microbatch lives for about 1/2 (V-Half) or 1/3 (V-Min) of 1F1B's
lifespan. Then, in slot order, the warm-up and cool-down ops are *squeezed* into the earliest
free slot their inputs allow without raising the device's peak memory, W ops are put into the
remaining idle slots, and each device runs its ops in slot order.
"""

from __future__ import annotations

from typing import Literal

_F0, _F1, _B1, _B0, _W = 0, 1, 2, 3, 4  # kinds; with split W lists, 4 = W1 and 5 = W0
_MEMORY = (1, 1, 0, 0, -1)  # per kind, in the reference model: F holds, W frees
_PERIOD = 6

Slots = list[list[list[int]]]  # slots[device][kind][microbatch]


def stable_pattern(num_devices: int, kind: Literal["half", "min"]) -> list[tuple[int, int, int, int]]:
    """Per device, the slot offsets of F0, F1, B1, B0 in the steady state."""
    P = num_devices
    if kind == "min":
        gap = 2 if P % 3 == 0 else 0
        return [(d, 2 * P - 1 - d, 2 * P + gap + d, 4 * P + gap - 1 - d) for d in range(P)]
    gap = 3 if P % 2 == 0 else 0
    return [(2 * d, 3 * P - 2 - d, 3 * P + gap + 2 * d - 1, 6 * P + gap - 2 - d) for d in range(P)]


def device_orders(num_devices: int, num_microbatches: int, kind: Literal["half", "min"]
                  ) -> list[list[tuple[int, int]]]:
    """Per device, its (kind, microbatch) ops in execution order; kinds 4 = W1, 5 = W0."""
    slots = [[list(range(offset, offset + _PERIOD * num_microbatches, _PERIOD)) for offset in device]
             for device in stable_pattern(num_devices, kind)]
    slots = [device[:4] for device in _squeeze(slots, with_w=True)]
    slots = [_put_w(device[:4], split=True) for device in _squeeze(slots, with_w=False)]
    return [[(k, m) for _, k, m in sorted((t, k, m) for k, times in enumerate(device) for m, t in enumerate(times))]
            for device in slots]


def _put_w(device: list[list[int]], *, split: bool) -> list[list[int]]:
    """Add W lists: each B frees one W, run in the next idle slot (W1 before W0 when split)."""
    busy = {t: k for k, times in enumerate(device) for t in times}
    end = max(times[-1] for times in device)
    w_lists: list[list[int]] = [[], []] if split else [[]]
    pending = [0] * len(w_lists)
    for t in range(end + 1):
        if t in busy:
            if busy[t] in (_B1, _B0):
                pending[busy[t] - _B1 if split else 0] += 1
            continue
        for i, n in enumerate(pending):
            if n:
                w_lists[i].append(t)
                pending[i] -= 1
                break
    t = end
    for i in range(len(w_lists)):
        for _ in range(pending[i]):
            t += 1
            w_lists[i].append(t)
    return [list(times) for times in device] + w_lists


def _peak(device: list[list[int]]) -> int:
    """Peak memory in the reference model; without W lists, each B frees one W that runs in
    the next idle slot."""
    busy = {t: k for k, times in enumerate(device) for t in times}
    has_w = len(device) > 4
    level = peak = pending = 0
    for t in range(max(busy) + 1):
        if t in busy:
            level += _MEMORY[busy[t]]
            pending += busy[t] in (_B1, _B0)
        elif not has_w and pending:
            level += _MEMORY[_W]
            pending -= 1
        peak = max(peak, level)
    return peak


def _squeeze(slots: Slots, *, with_w: bool) -> Slots:
    """Move warm-up (only `with_w`) and cool-down ops to earlier free slots their inputs
    allow, without raising the peak memory; then add the W (when not there yet) and compact
    every op to its earliest slot."""
    if with_w:
        slots = [_put_w(device, split=False) for device in slots]
    P, M = len(slots), len(slots[0][0])
    budget = max(_peak(device) for device in slots)
    occupied: list[set[int]] = [set() for _ in range(P)]
    phase = 0  # 0: warm-up, 1: steady (kept), 2: cool-down
    order = sorted((t, d, k, m) for d, device in enumerate(slots) for k, times in enumerate(device)
                   for m, t in enumerate(times))
    for t, d, k, m in order:
        if phase == 0 and k == _B0 and d == 0:
            phase = 1
        if phase == 1 or (phase == 0 and not with_w):
            if phase == 1 and k == _F0 and m == M - 1:
                phase = 2
            occupied[d].add(t)
            continue
        ready = _ready_slot(slots, d, k, m)
        device = slots[d]
        for candidate in range(ready, t):
            if candidate not in occupied[d]:
                device[k][m] = candidate
                if _peak(device) <= budget:
                    break
        else:
            device[k][m] = t
        occupied[d].add(device[k][m])
    if not with_w:
        slots = [_put_w(device, split=False) for device in slots]
    return _compact(slots)


def _ready_slot(slots: Slots, d: int, k: int, m: int) -> int:
    """The first slot after the op's inputs (unit ops, no communication delay)."""
    P = len(slots)
    ready = -1
    if k in (_F0, _B1) and d > 0:
        ready = max(ready, slots[d - 1][k][m])
    if k in (_F1, _B0) and d + 1 < P:
        ready = max(ready, slots[d + 1][k][m])
    if 0 < k < _W:
        ready = max(ready, slots[d][k - 1][m])
    if k == _W:
        ready = max(ready, sorted(slots[d][_B1] + slots[d][_B0])[m])
    if m > 0:
        ready = max(ready, slots[d][k][m - 1])
    return ready + 1


def _compact(slots: Slots) -> Slots:
    """Run every op as early as its inputs, its predecessor of the same kind and the previous
    op of its device allow, in slot order, with unit durations (the reference's "squeeze")."""
    P = len(slots)
    order = sorted((t, d, k, m) for d, device in enumerate(slots) for k, times in enumerate(device)
                   for m, t in enumerate(times))
    start: dict[tuple[int, int, int], int] = {}
    device_free = [0] * P
    for _, d, k, m in order:
        inputs = []
        if k in (_F0, _B1) and d > 0:
            inputs.append((d - 1, k, m))
        if k in (_F1, _B0) and d + 1 < P:
            inputs.append((d + 1, k, m))
        if 0 < k < _W:
            inputs.append((d, k - 1, m))
        if m > 0:
            inputs.append((d, k, m - 1))
        begin = max([device_free[d]] + [start[key] + 1 for key in inputs])
        start[(d, k, m)] = begin
        device_free[d] = begin + 1
    return [[[start[(d, k, m)] for m in range(len(times))] for k, times in enumerate(device)]
            for d, device in enumerate(slots)]
