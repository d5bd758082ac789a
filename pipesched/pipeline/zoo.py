"""Named pipeline schedules (the zoo) as program generators, and instance builders.

Each generator maps a :class:`PipelineInstance` to a :data:`Program` (per-device action order);
:func:`simulate` times it (earliest start), so the schedules adapt to heterogeneous stages and
communication delays while keeping their published order. Zoo schedules ignore the memory limit
when ordering (``zoo_schedule(...).fits_memory`` tells whether they fit) and never recompute.

Units in the docstrings: F, B, W are one *device's* forward / input-gradient / weight-gradient
time per microbatch (so a stage of a device holding v chunks takes F/v), and memory is counted in
activations of one such device-slice (a chunk holds 1/v of it). ``P`` devices, ``M`` microbatches.
When the backward is not split, "B" is the whole backward. A device's *bubble* is its idle time
between its first and last op (the papers' measure); "zero bubble" schedules still pay the
forward ramp in the makespan. ``tests/test_zoo.py`` checks the published figures on uniform instances.

Instance builders: :func:`uniform_instance`, :func:`heterogeneous_instance`; canonical
placements: :func:`linear_placement`, :func:`interleaved_placement`, :func:`v_placement`,
:func:`wave_placement`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Literal

from pipesched._common import FormatError
from pipesched.pipeline._model import PipelineInstance, Stage
from pipesched.pipeline._program import Action, Program, Simulation, simulate
from pipesched.pipeline._zoo_hanayo import device_order as hanayo_order
from pipesched.pipeline._zoo_vshape import device_orders

Generator = Callable[[PipelineInstance], Program]


# --------------------------------------------------------------------------------------------
# Placements and instance builders


def linear_placement(num_devices: int) -> tuple[int, ...]:
    """Stage s on device s: one stage per device."""
    return tuple(range(num_devices))


def interleaved_placement(num_devices: int, chunks: int) -> tuple[int, ...]:
    """Megatron's interleaved (looped) placement: chunks*P stages, stage s on device s mod P."""
    return tuple(s % num_devices for s in range(chunks * num_devices))


def v_placement(num_devices: int) -> tuple[int, ...]:
    """V-shape placement: 2P stages, stage s on device s for s < P and on 2P-1-s after."""
    return tuple(range(num_devices)) + tuple(reversed(range(num_devices)))


def wave_placement(num_devices: int, waves: int) -> tuple[int, ...]:
    """Hanayo's wave placement: 2·waves·P stages going down devices 0..P-1 and back up, `waves`
    times (a zig-zag of V's); wave_placement(P, 1) is v_placement(P)."""
    return v_placement(num_devices) * waves


def uniform_instance(num_devices: int, num_microbatches: int, F: float, B: float, W: float = 0,
                     activation: float = 1, *, split_backward: bool = False,
                     placement: Sequence[int] | None = None, memory_limit: float | None = None,
                     comm: float = 0, wgrad_stash: float = 0, allow_remat: bool = False,
                     name: str | None = None) -> PipelineInstance:
    """An instance whose devices all hold the same share of the model.

    ``F, B, W, activation, wgrad_stash`` are per device; a device holding c stages (chunks)
    gives each c-th of them, so every placement runs the same model. ``placement`` lists the
    device of each stage (default :func:`linear_placement`).
    """
    placement = linear_placement(num_devices) if placement is None else tuple(placement)
    chunks = [placement.count(d) for d in range(num_devices)]
    if min(chunks) == 0 or len(set(chunks)) != 1:
        raise FormatError(f"placement: every device must hold the same number of stages, got {chunks}")

    def part(x: float) -> float:
        return x // chunks[0] if x % chunks[0] == 0 else x / chunks[0]

    stages = tuple(Stage(device=d, F=part(F), B=part(B), W=part(W), activation=part(activation),
                         wgrad_stash=part(wgrad_stash)) for d in placement)
    return PipelineInstance(num_devices, num_microbatches, stages, comm=comm, memory_limit=memory_limit,
                            split_backward=split_backward, allow_remat=allow_remat, name=name)


def heterogeneous_instance(num_devices: int, num_microbatches: int, *, seed: int = 0, spread: float = 0.5,
                           scale: int = 10, split_backward: bool = False,
                           placement: Sequence[int] | None = None, memory_limit: float | None = None,
                           comm: float = 0, allow_remat: bool = False, name: str | None = None
                           ) -> PipelineInstance:
    """An instance with random integer stage costs, reproducible from `seed`.

    Each stage's F, B, W and activation are drawn uniformly from
    [round(scale·(1-spread)), round(scale·(1+spread))] (at least 1); W is 0 unless the backward
    is split. ``placement`` as in :func:`uniform_instance`.
    """
    rng = random.Random(seed)
    lo, hi = max(1, round(scale * (1 - spread))), max(1, round(scale * (1 + spread)))
    placement = linear_placement(num_devices) if placement is None else tuple(placement)

    def draw() -> int:
        return rng.randint(lo, hi)

    stages = tuple(Stage(device=d, F=draw(), B=draw(), W=draw() if split_backward else 0, activation=draw())
                   for d in placement)
    return PipelineInstance(num_devices, num_microbatches, stages, comm=comm, memory_limit=memory_limit,
                            split_backward=split_backward, allow_remat=allow_remat, name=name)


# --------------------------------------------------------------------------------------------
# Shared pieces


def _need(condition: bool, name: str, what: str, instance: PipelineInstance) -> None:
    if not condition:
        placement = [st.device for st in instance.stages]
        raise FormatError(f"{name}: needs {what}; got P={instance.num_devices}, "
                          f"placement {placement}, split_backward={instance.split_backward}")


def _check_linear(instance: PipelineInstance, name: str) -> None:
    _need(instance.num_stages == instance.num_devices
          and all(len(ss) == 1 for ss in instance.stages_of_device),
          name, "one stage per device (e.g. linear_placement(P))", instance)


def _backward(instance: PipelineInstance, s: int, m: int) -> list[Action]:
    """The whole backward of (s, m): B, then W right away when the backward is split."""
    return [Action(s, "B", m)] + ([Action(s, "W", m)] if instance.split_backward else [])


# --------------------------------------------------------------------------------------------
# One stage per device


def gpipe(instance: PipelineInstance) -> Program:
    """GPipe (Huang et al. 2019): all M forwards, then all M backwards (B then W when split).

    One stage per device, any M. Bubble (P-1)(F+B): makespan (M+P-1)(F+B), or
    M(F+B+W) + (P-1)(F+B) when split (W is off the critical path); peak activation memory M
    on every device.
    """
    _check_linear(instance, "gpipe")
    M = instance.num_microbatches
    rows = []
    for stages in instance.stages_of_device:
        s = stages[0]
        rows.append(tuple([Action(s, "F", m) for m in range(M)]
                          + [a for m in range(M) for a in _backward(instance, s, m)]))
    return tuple(rows)


def one_f_one_b(instance: PipelineInstance) -> Program:
    """1F1B, PipeDream-Flush (Narayanan et al. 2021): stage s runs min(S-1-s, M) warm-up
    forwards, then alternates one forward and one backward, then drains the backwards.

    One stage per device, any M. Bubble (P-1)(F+B), makespan (M+P-1)(F+B); the published
    (P-1)(F+B+W) of the zero-bubble papers is this with B the whole backward. When split, W
    runs right after its B, off the critical path: makespan M(F+B+W) + (P-1)(F+B). Peak
    activation memory min(S-s, M) on the device of stage s, so min(P, M) on the first.
    """
    _check_linear(instance, "1f1b")
    M, S = instance.num_microbatches, instance.num_stages
    rows = []
    for stages in instance.stages_of_device:
        s = stages[0]
        warmup = min(S - 1 - s, M)
        row = [Action(s, "F", m) for m in range(warmup)]
        for m in range(M - warmup):
            row += [Action(s, "F", warmup + m), *_backward(instance, s, m)]
        for m in range(M - warmup, M):
            row += _backward(instance, s, m)
        rows.append(tuple(row))
    return tuple(rows)


def zb_h1(instance: PipelineInstance) -> Program:
    """ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", section 2.1; PyTorch's
    ScheduleInterleavedZeroBubble with one stage per device): 1F1B's warm-up and F/B order, with
    the W of device i run i microbatches late, so that W fills the cool-down bubble.

    One stage per device, split backward, any M. Bubble (P-1)(F+B-W) (a third of 1F1B's
    (P-1)(F+B+W) when F=B=W); peak activation memory that of 1F1B, min(P, M) on device 0.
    """
    _check_linear(instance, "zb-h1")
    _need(instance.split_backward, "zb-h1", "split_backward (B and W)", instance)
    P = instance.num_devices
    return _one_stage_zero_bubble(instance, warmup=lambda i: P - 1 - i, deferred_w=lambda i: i,
                                  backward_first=False)


def zb_h2(instance: PipelineInstance) -> Program:
    """ZB-H2 (Qi et al. 2024, section 2.2): 2P-1-2i warm-up forwards on device i fill the bubble
    before the first B; in steady state B, F, W; device i leaves its last 2i W to the tail, which
    turns the schedule into a parallelogram.

    One stage per device, split backward, any M (the warm-up is cut at M). Bubble (idle time
    between a device's first and last op) (P-1)(F+B-2W) on device 0 when M >= 2P-1 and
    F+B >= 2W: zero when F=B=W, every device then busy from its first op to its last and the
    makespan M(F+B+W) + (P-1)F. Peak activation memory 2P-1 on device 0.
    """
    _check_linear(instance, "zb-h2")
    _need(instance.split_backward, "zb-h2", "split_backward (B and W)", instance)
    P = instance.num_devices
    return _one_stage_zero_bubble(instance, warmup=lambda i: 2 * P - 1 - 2 * i, deferred_w=lambda i: 2 * i,
                                  backward_first=True)


def _one_stage_zero_bubble(instance: PipelineInstance, *, warmup: Callable[[int], int],
                           deferred_w: Callable[[int], int], backward_first: bool) -> Program:
    """Warm-up forwards, then one B and one F per step (in the given order) followed by the
    oldest pending W once more than `deferred_w` are pending; the deferred W close the row."""
    M = instance.num_microbatches
    rows = []
    for stages in instance.stages_of_device:
        s = stages[0]
        k = min(warmup(s), M)
        row = [Action(s, "F", m) for m in range(k)]
        pending: list[int] = []
        for m in range(M):
            forward = [Action(s, "F", k + m)] if k + m < M else []
            backward = [Action(s, "B", m)]
            row += backward + forward if backward_first else forward + backward
            pending.append(m)
            if len(pending) > deferred_w(s):
                row.append(Action(s, "W", pending.pop(0)))
        row += [Action(s, "W", m) for m in pending]
        rows.append(tuple(row))
    return tuple(rows)


# --------------------------------------------------------------------------------------------
# Several stages per device


class _Row:
    """One device's program under construction; hands out microbatches in order per (stage, op)."""

    def __init__(self, instance: PipelineInstance):
        self.instance = instance
        self.actions: list[Action] = []
        self.issued: dict[tuple[int, str], int] = {}
        self.deferred_w: list[tuple[int, int]] = []

    def add(self, stage: int, op: str) -> int:
        m = self.issued.get((stage, op), 0)
        self.issued[(stage, op)] = m + 1
        self.actions.append(Action(stage, op, m))
        return m

    def add_backward(self, stage: int, *, defer_w: bool = False) -> None:
        """The whole backward: B, then W right away when the backward is split, unless `defer_w`
        queues that W for :meth:`add_deferred_w`."""
        m = self.add(stage, "B")
        if defer_w:
            self.deferred_w.append((stage, m))
        elif self.instance.split_backward:
            self.actions.append(Action(stage, "W", m))

    def add_deferred_w(self, stage: int | None = None) -> None:
        """The oldest deferred W (of `stage` when given), if any."""
        for i, (s, m) in enumerate(self.deferred_w):
            if stage is None or s == stage:
                del self.deferred_w[i]
                self.actions.append(Action(s, "W", m))
                return


def _check_interleaved(instance: PipelineInstance, name: str) -> int:
    """The chunks per device v of an interleaved placement (stage s on device s mod P)."""
    P, S = instance.num_devices, instance.num_stages
    _need(S % P == 0 and all(st.device == s % P for s, st in enumerate(instance.stages)), name,
          "the interleaved placement, stage s on device s mod P (interleaved_placement(P, v))", instance)
    return S // P


def _check_v(instance: PipelineInstance, name: str) -> None:
    _need([st.device for st in instance.stages] == list(v_placement(instance.num_devices))
          and instance.split_backward, name,
          "the V placement (v_placement(P): stage s on device s, then 2P-1-s) and split_backward", instance)


def _check_wave(instance: PipelineInstance, name: str) -> int:
    """The waves W of a wave placement (2W·P stages zig-zagging over the devices)."""
    P, S = instance.num_devices, instance.num_stages
    waves = S // (2 * P)
    _need(waves >= 1 and [st.device for st in instance.stages] == list(wave_placement(P, waves)), name,
          "the wave placement, 2W·P stages down devices 0..P-1 and back up, W times (wave_placement(P, W))",
          instance)
    return waves


def _within(program: Program, num_microbatches: int) -> Program:
    """Drop the actions of padding microbatches >= num_microbatches. A suborder of a runnable
    program is runnable (its ops keep their times), so this never creates a deadlock."""
    return tuple(tuple(a for a in row if a.microbatch < num_microbatches) for row in program)


def interleaved_one_f_one_b(instance: PipelineInstance) -> Program:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM virtual pipeline; PyTorch's
    ScheduleInterleaved1F1B): v chunks per device, microbatches in rounds of P running depth
    first through the chunks; (v-1)·P + 2(P-1-d) warm-up forwards on device d, then 1F1B.

    Interleaved placement (stage s on device s mod P). M must be a multiple of
    max(1, M // P) (PyTorch's rounds): any M <= P, any multiple of P, and a few more.
    Bubble (P-1)(F+B)/v for M a multiple of P; peak activation memory about
    P + (P-1)/v on device 0 (v·P + P - 1 chunk activations of 1/v each, capped at M).
    """
    v = _check_interleaved(instance, "interleaved-1f1b")
    P, M = instance.num_devices, instance.num_microbatches
    rounds = max(1, M // P)
    _need(M % rounds == 0, "interleaved-1f1b", f"M a multiple of max(1, M // P) = {rounds} "
          f"(M <= P or M a multiple of P), got M={M}", instance)
    per_round = M // rounds
    return tuple(_interleaved_row(instance, d, v, per_round) for d in range(P))


def _interleaved_row(instance: PipelineInstance, d: int, v: int, per_round: int) -> tuple[Action, ...]:
    P, total = instance.num_devices, v * instance.num_microbatches
    warmup = min((v - 1) * per_round + 2 * (P - 1 - d), total)
    row = _Row(instance)
    for step in range(total + warmup):
        if step < total:
            row.add((step // per_round) % v * P + d, "F")
        if step >= warmup:
            row.add_backward((v - 1 - (step - warmup) // per_round % v) * P + d)
    return tuple(row.actions)


def looped_bfs(instance: PipelineInstance) -> Program:
    """Looped BFS, breadth-first pipeline parallelism (Lamy-Poirier 2023; PyTorch's
    ScheduleLoopedBFS): each device runs all M forwards of its first chunk, then of the next,
    and the backwards in reverse (last chunk first, last microbatch first).

    Interleaved placement (stage s on device s mod P), any v >= 1 and M. Bubble (P-1)(F+B)/v
    for M >= P; peak activation memory M (every chunk keeps all M microbatches, as GPipe).
    """
    v = _check_interleaved(instance, "looped-bfs")
    P, M = instance.num_devices, instance.num_microbatches
    rows = []
    for d in range(P):
        chunks = [c * P + d for c in range(v)]
        row = [Action(s, "F", m) for s in chunks for m in range(M)]
        row += [a for s in reversed(chunks) for m in reversed(range(M)) for a in _backward(instance, s, m)]
        rows.append(tuple(row))
    return tuple(rows)


def zb_v(instance: PipelineInstance) -> Program:
    """ZB-V (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", section 6; PyTorch's
    ScheduleZBVZeroBubble): two chunks per device in a V, so the first and last stages share
    device 0; warm-up 2(P-d)-1 forwards of chunk 0, d pairs (chunk 1, chunk 0), then
    F-B-W of both chunks in turn, W deferred in the cool-down.

    V placement, split backward, any M (built for max(M, 2P-1) microbatches, the extra ones
    dropped). Zero bubble in steady state when F=B=W (M >= 2P-1); peak activation memory P
    (2P chunk activations of one half each), the same as 1F1B.
    """
    _check_v(instance, "zb-v")
    P, M = instance.num_devices, instance.num_microbatches
    return _within(tuple(_zb_v_row(instance, d, max(2 * P - 1, M)) for d in range(P)), M)


def _zb_v_row(instance: PipelineInstance, d: int, n: int) -> tuple[Action, ...]:
    """Device d's ZB-V actions for n >= 2P-1 microbatches."""
    P = instance.num_devices
    first, second = d, 2 * P - 1 - d
    row = _Row(instance)
    for _ in range(2 * (P - d) - 1):
        row.add(first, "F")
    for _ in range(d):
        row.add(second, "F")
        row.add(first, "F")
    for _ in range(P - d):
        row.add(second, "F")
        row.add_backward(second)
    while row.issued[(second, "F")] < row.issued[(first, "F")] or row.issued[(first, "F")] < n:
        if row.issued[(first, "F")] < n:
            row.add(first, "F")
        row.add_backward(first)
        row.add(second, "F")
        row.add_backward(second)
    for _ in range(d):
        row.add_backward(first, defer_w=True)
        row.add_backward(second, defer_w=True)
    for _ in range(P - d):
        row.add_backward(first, defer_w=True)
        row.add_deferred_w(first)
    for stage in (second, first):
        while any(s == stage for s, _ in row.deferred_w):
            row.add_deferred_w(stage)
    return tuple(row.actions)


def dualpipe_v(instance: PipelineInstance) -> Program:
    """DualPipe-V, DeepSeek's DualPipe "cut in half" (DeepSeek-AI 2024, DeepSeek-V3 report;
    github.com/deepseek-ai/DualPipe; PyTorch's ScheduleDualPipeV): V placement; the steady
    state pairs a forward of one chunk with a backward of the other (DualPipe overlaps their
    computation and communication; here one compute stream runs the forward, then the
    backward), and some backwards split B and W to fill the ramps.

    V placement, split backward, any M (built for max(M, 2P) microbatches, the extra ones
    dropped; PyTorch requires M >= 2P). Published (DualPipe README, PP = 2P stages, F, B, W of
    one chunk, B the full backward): bubble (PP/2-1)(F&B + B - 3W), F&B being an overlapped
    forward+backward pair, and peak activation PP+1 chunks = P + 1/2 device activations.
    Measured here with F=B=W (no overlap): per-device idle at most (P-1)F/2, below the
    published value, and peak memory P + 1/2 for M >= 2P.
    """
    _check_v(instance, "dualpipe-v")
    P, M = instance.num_devices, instance.num_microbatches
    n = max(M, 2 * P)
    return _within(tuple(_dualpipe_v_row(instance, d, n) for d in range(P)), M)


def _dualpipe_v_row(instance: PipelineInstance, d: int, n: int) -> tuple[Action, ...]:
    """Device d's DualPipe-V actions for n microbatches (steps 1-8 of PyTorch's version)."""
    P = instance.num_devices
    first, second = d, 2 * P - 1 - d
    row = _Row(instance)
    for _ in range(2 * (P - d - 1)):
        row.add(first, "F")
    for _ in range(d + 1):
        row.add(first, "F")
        row.add(second, "F")
    for _ in range(P - d - 1):
        row.add_backward(second, defer_w=True)
        row.add_deferred_w()
        row.add(second, "F")
    for _ in range(n - 2 * P + d + 1):
        row.add(first, "F")
        row.add_backward(second)
        row.add(second, "F")
        row.add_backward(first)
    for _ in range(P - d - 1):
        row.add_backward(second)
        row.add(second, "F")
        row.add_backward(first)
    split = False  # the second half of the cool-down defers W
    for i in range(d + 1):
        for stage, parity in ((second, 1), (first, 0)):
            split = split or (i == (d + 1) // 2 and d % 2 == parity)
            row.add_backward(stage, defer_w=split)
    for _ in range(P - d - 1):
        row.add_deferred_w()
        row.add_backward(first, defer_w=split)
    while row.deferred_w:
        row.add_deferred_w()
    return tuple(row.actions)


def v_half(instance: PipelineInstance) -> Program:
    """V-Half (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory", arXiv
    2405.15362): a V-shape schedule whose building block gives each microbatch half of 1F1B's
    lifespan, squeezed at the ramps without raising memory (see `_zoo_vshape`).

    V placement, split backward, any M. Published: about half of 1F1B's activation memory
    and a smaller bubble than 1F1B, zero in steady state when F=B=W. Measured with F=B=W:
    peak memory P/2 + 1 device activations (P even), no bubble in steady state, a constant
    ramp cost (8.5F against 1F1B's 14F at P=8).
    """
    _check_v(instance, "v-half")
    return _v_program(instance, "half")


def v_min(instance: PipelineInstance) -> Program:
    """V-Min (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"): the V-shape
    schedule with the least memory of the family, about a third of 1F1B's lifespan per
    microbatch.

    V placement, split backward, any M. Published: about a third of 1F1B's activation memory,
    zero bubble in steady state when F=B=W, and ramps about as long as 1F1B's bubble (longer
    when F, B, W differ). Measured with F=B=W: peak memory at most ceil(P/3) + 1 device
    activations, no bubble in steady state, a ramp cost of 13.5F against 1F1B's 14F at P=8.
    """
    _check_v(instance, "v-min")
    return _v_program(instance, "min")


def _v_program(instance: PipelineInstance, kind: Literal["half", "min"]) -> Program:
    P = instance.num_devices
    rows = []
    for d, order in enumerate(device_orders(P, instance.num_microbatches, kind)):
        first, second = d, 2 * P - 1 - d
        actions = ((first, "F"), (second, "F"), (second, "B"), (first, "B"), (second, "W"), (first, "W"))
        rows.append(tuple(Action(actions[k][0], actions[k][1], m) for k, m in order))
    return tuple(rows)


def hanayo(instance: PipelineInstance) -> Program:
    """Hanayo (Liu et al. 2023, "Hanayo: Harnessing Wave-like Pipeline Parallelism for Enhanced
    Large Model Training Efficiency", SC'23): W waves of V's, no model replicas; each device runs
    its forwards as they arrive up to the last half wave, then 1F1B (see `_zoo_hanayo`).

    Wave placement wave_placement(P, W), W = S / 2P waves, any M; when split, each weight
    gradient runs right after its B, off the critical path (it adds M times its time). Bubble
    (P-1)(F+B)/2W, 1F1B's divided by 2W: bubble ratio (P-1)/(P-1 + 2WM), makespan
    (M + (P-1)/2W)(F+B). Reached (measured) for M >= 2P-1 when B/F is between 1/3 and 3, and no
    schedule does better (device P-1 waits (P-1)F/2W for its first input, and its last output
    needs (P-1)B/2W more). Peak activation memory ((2W-1)M + 2d + 1)/2W on device d, capped at
    M: near GPipe's M for large M.
    """
    waves = _check_wave(instance, "hanayo")
    P, M = instance.num_devices, instance.num_microbatches
    return tuple(tuple(action for op, s, m in hanayo_order(P, waves, M, d)
                       for action in ([Action(s, "F", m)] if op == "F" else _backward(instance, s, m)))
                 for d in range(P))


# --------------------------------------------------------------------------------------------
# Registry


ZOO: dict[str, Generator] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_one_f_one_b,
    "looped-bfs": looped_bfs,
    "zb-h1": zb_h1,
    "zb-h2": zb_h2,
    "zb-v": zb_v,
    "v-half": v_half,
    "v-min": v_min,
    "dualpipe-v": dualpipe_v,
    "hanayo": hanayo,
}
"""The named schedules by CLI name."""


def supports(name: str, instance: PipelineInstance) -> bool:
    """Whether zoo schedule `name` can be built for `instance` (its placement and op kinds)."""
    try:
        ZOO[_known(name)](instance)
    except FormatError:
        return False
    return True


def zoo_schedule(instance: PipelineInstance, name: str) -> Simulation:
    """Build zoo schedule `name` for `instance` and time it; the schedule's solver is `name`."""
    return simulate(instance, ZOO[_known(name)](instance), solver=name)


def _known(name: str) -> str:
    if name not in ZOO:
        raise FormatError(f"solver: unknown zoo schedule {name!r}; choose one of {', '.join(ZOO)}")
    return name
