"""Proven lower bounds on the makespan of every valid schedule of a pipeline instance.

Notation: S stages, M microbatches, c(s) the comm delay across boundary s|s+1 (0 on one device),
stash(s) = wgrad_stash(s) when the backward is split, else 0. Every bound below holds for every
schedule that satisfies formats.md 1.2 (remat included when allowed: R ops are optional, so no
bound counts them as work). `lower_bound(instance)` is the max of all of them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from pipesched.pipeline._model import PipelineInstance


class Bounds(NamedTuple):
    device_load: float
    critical_path: float
    memory: float

    @property
    def best(self) -> float:
        return max(self)


def forward_head(instance: PipelineInstance, s: int) -> float:
    """Earliest possible start of any F(s, m): the forward chain of stages 0..s-1 with comms."""
    return sum(instance.stages[j].F + instance.comm_after(j) for j in range(s))


def backward_tail(instance: PipelineInstance, s: int) -> float:
    """Least time any schedule still needs after B(s, m) ends: the backward chain down to stage 0
    (then W(0, m) when split), or W(s, m) itself, whichever is longer."""
    chain = sum(instance.comm_after(j) + instance.stages[j].B for j in range(s))
    if not instance.split_backward:
        return chain
    return max(instance.stages[s].W, chain + instance.stages[0].W if s > 0 else instance.stages[0].W)


def round_trip(instance: PipelineInstance, s: int) -> float:
    """Least time from F(s, m) start to B(s, m) end: forwards of stages s..S-1, then backwards of
    S-1..s, with the comms in both directions."""
    S = instance.num_stages
    stages = instance.stages
    return (sum(stages[j].F + stages[j].B for j in range(s, S))
            + 2 * sum(instance.comm_after(j) for j in range(s, S - 1)))


def op_head_tail(instance: PipelineInstance, op: str, s: int) -> tuple[float, float]:
    """(earliest start, least remaining time after the end) of op (op, s, m), for any m."""
    st = instance.stages[s]
    if op == "F":
        return forward_head(instance, s), round_trip(instance, s) - st.F + backward_tail(instance, s)
    b_head = forward_head(instance, s) + round_trip(instance, s) - st.B
    if op == "B":
        return b_head, backward_tail(instance, s)
    return b_head + st.B, 0.0  # W: nothing waits for it


def device_load_bound(instance: PipelineInstance) -> float:
    """Per device d: makespan >= min head + total work + min tail over the ops of d.

    Proof: d runs its ops one at a time, so from its first start to its last end it is busy for
    at least the total duration of its mandatory ops (F and B, and W when split, for every
    microbatch of every stage on d). Its first op starts no earlier than the least earliest-start
    of its ops, and after its last op ends the schedule still needs at least the least tail of
    its ops. For one stage per device and uniform stages this is the textbook (M+P-1)(F+B) on the
    last device.
    """
    M = instance.num_microbatches
    best = 0.0
    for stages in instance.stages_of_device:
        if not stages:
            continue
        ops = [(op, s) for s in stages for op in ("F", *instance.backward_ops)]
        load = M * sum(instance.duration(op, s) for op, s in ops)
        heads_tails = [op_head_tail(instance, op, s) for op, s in ops]
        best = max(best, min(h for h, _ in heads_tails) + load + min(t for _, t in heads_tails))
    return best


def critical_path_bound(instance: PipelineInstance) -> float:
    """The dependency chain of one microbatch: F of every stage, B of every stage back down, W(0)
    when split, with every comm. Every microbatch runs this chain, so the makespan is at least it."""
    return round_trip(instance, 0) + backward_tail(instance, 0)


def min_memory_need(instance: PipelineInstance, device: int) -> float:
    """Least peak memory any schedule needs on `device` (0 without stages).

    Proof: when F(s, m) starts, every stage s' < s on the same device has run F(s', m) and not yet
    B(s', m) (B(s', m) waits for B(s, m), which waits for F(s, m)), so it holds activation(s'), or
    only checkpoint(s') when rematerialized; F(s, m) itself adds activation(s). Hence the peak is
    at least max over s on the device of activation(s) + sum_{s' < s on it} kept(s'), with kept =
    checkpoint when remat is allowed, else activation. Running microbatches one after another
    (rematerializing every stage when allowed) reaches exactly this peak, so the instance is
    feasible iff this need fits every device's limit.
    """
    need, kept = 0.0, 0.0
    for s in instance.stages_of_device[device]:
        st = instance.stages[s]
        need = max(need, kept + st.activation)
        kept += st.checkpoint if instance.allow_remat else st.activation
    return need


def infeasible_devices(instance: PipelineInstance) -> list[tuple[int, float, float]]:
    """(device, least memory need, limit) of every device whose limit is below its least need."""
    out = []
    for d in range(instance.num_devices):
        limit = instance.limit(d)
        need = min_memory_need(instance, d)
        if limit is not None and need > limit + 1e-6 * (1 + max(abs(need), abs(limit))):
            out.append((d, need, limit))
    return out


def memory_bound(instance: PipelineInstance) -> float:
    """Memory-limited bound (after Beaumont et al., "Mind the Bubbles and Memory", Inria 2025).

    Without remat, microbatch m holds at least activation(s) on the device of stage s during
    [F(s, m).start, B(s, m).end], an interval of length >= round_trip(s). If the device's limit
    allows at most K = floor(limit / activation(s)) such intervals at once, the M intervals form an
    interval graph of clique number <= K, hence (interval graphs are perfect) split into K chains
    of pairwise disjoint intervals; one chain holds >= ceil(M / K) intervals, so
    makespan >= head(F(s)) + ceil(M / K) * round_trip(s) + tail(B(s)).
    K = 1 gives the exact M * round_trip of the paper; K >= M gives the critical path. With remat
    allowed the held amount is only checkpoint(s) outside F and [R, B], and this bound is skipped.
    """
    if instance.allow_remat or instance.memory_limit is None:
        return 0.0
    M = instance.num_microbatches
    best = 0.0
    for s, st in enumerate(instance.stages):
        limit = instance.limit(st.device)
        if limit is None or st.activation <= 0:
            continue
        k = max(1, math.floor(limit / st.activation + 1e-9))
        if k >= M:
            continue
        span = forward_head(instance, s) + math.ceil(M / k) * round_trip(instance, s) + backward_tail(instance, s)
        best = max(best, span)
    return best


def bounds(instance: PipelineInstance) -> Bounds:
    return Bounds(device_load_bound(instance), critical_path_bound(instance), memory_bound(instance))


def lower_bound(instance: PipelineInstance) -> float:
    """The best of all bounds above (valid whenever the instance is feasible)."""
    return bounds(instance).best
