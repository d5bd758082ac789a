"""Proven lower bounds on the makespan of every valid schedule of a pipeline instance.

Notation: S stages, M microbatches, c(s) the comm delay across boundary s|s+1 (0 on one device),
stash(s) = wgrad_stash(s) when the backward is split, else 0. Every bound below holds for every
schedule that satisfies formats.md 1.2 and 1.4 (remat options and backward-pass recompute included
when allowed: R and RW ops are optional, so only `remat_memory_bound` counts them, as the price of
fitting more microbatches). `lower_bound(instance)` is the max of all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from pipesched.pipeline._model import PipelineInstance


class Bounds(NamedTuple):
    device_load: float
    critical_path: float
    memory: float
    memory_energy: float
    remat_memory: float

    @property
    def best(self) -> float:
        return max(self)

    @property
    def binding(self) -> str:
        """The name of the bound that gives `best` (the first one on ties)."""
        return self._fields[self.index(self.best)]


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
    return max(device_loads(instance), default=0.0)


def device_loads(instance: PipelineInstance) -> list[float]:
    """Per device, the bound of `device_load_bound` (0 for a device without stages)."""
    M = instance.num_microbatches
    out = []
    for stages in instance.stages_of_device:
        ops = [(op, s) for s in stages for op in ("F", *instance.backward_ops)]
        load = M * sum(instance.duration(op, s) for op, s in ops)
        heads_tails = [op_head_tail(instance, op, s) for op, s in ops]
        out.append(min(h for h, _ in heads_tails) + load + min(t for _, t in heads_tails) if ops else 0.0)
    return out


def critical_path_bound(instance: PipelineInstance) -> float:
    """The dependency chain of one microbatch: F of every stage, B of every stage back down, W(0)
    when split, with every comm. Every microbatch runs this chain, so the makespan is at least it."""
    return round_trip(instance, 0) + backward_tail(instance, 0)


def least_checkpoint(instance: PipelineInstance, s: int) -> float:
    """Least memory a microbatch of stage s can keep between its F and its backward: the smallest
    checkpoint of its remat options when remat is allowed, else its whole activation."""
    st = instance.stages[s]
    return min(o.checkpoint for o in st.options) if instance.allow_remat else st.activation


def least_recompute(instance: PipelineInstance, s: int) -> float:
    """Least duration of an R op of stage s (over its remat options)."""
    return min(o.R for o in instance.stages[s].options)


def min_memory_need(instance: PipelineInstance, device: int) -> float:
    """Least peak memory any schedule needs on `device` (0 without stages).

    Proof: when F(s, m) starts, every stage s' < s on the same device has run F(s', m) and not yet
    B(s', m) (B(s', m) waits for B(s, m), which waits for F(s, m)), so it holds activation(s'), or
    only a checkpoint of one of its remat options when rematerialized; F(s, m) itself adds
    activation(s). Hence the peak is at least max over s on the device of activation(s) +
    sum_{s' < s on it} least_checkpoint(s'). Running microbatches one after another
    (rematerializing every stage with its least-checkpoint option when allowed) reaches exactly
    this peak, so the instance is feasible iff this need fits every device's limit.
    """
    need, kept = 0.0, 0.0
    for s in instance.stages_of_device[device]:
        need = max(need, kept + instance.stages[s].activation)
        kept += least_checkpoint(instance, s)
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


def _concurrent(instance: PipelineInstance, s: int, outer: int, others_keep: float | None = None) -> int | None:
    """How many microbatches may be inside [F(outer, m).start, B(outer, m).end] while one more is
    inside [F(s, m).start, B(s, m).end] (outer <= s on one device), or None if unbounded.

    That one holds activation(s) and at least least_checkpoint(s') of every stage s' < s of the
    device (nested: F(s', m) has started, B(s', m) has not ended); each other one holds at least
    `others_keep` (default: activation(outer), or least_checkpoint(outer) if remat is allowed
    and outer < s)."""
    st = instance.stages[s]
    limit = instance.limit(st.device)
    if others_keep is None:
        others_keep = instance.stages[outer].activation if not instance.allow_remat or outer == s else \
            least_checkpoint(instance, outer)
    if limit is None or others_keep <= 0:
        return None
    held = st.activation + sum(least_checkpoint(instance, j) for j in instance.stages_of_device[st.device] if j < s)
    return max(0, math.floor((limit - held) / others_keep + 1e-9))


def memory_bound(instance: PipelineInstance) -> float:
    """Memory-limited bound for one or several stages per device (after Beaumont et al., "Mind
    the Bubbles and Memory", Inria 2025); without remat (see `remat_memory_bound` with it).

    Pick stages o <= s on one device d. The core of microbatch m is C(m) = [F(s, m).start,
    B(s, m).end] (length >= round_trip(s)), its hold E(m) = [F(o, m).start, B(o, m).end] contains
    C(m) extended by pre = the forward chain o..s-1 before it and post = the backward chain
    s-1..o after it. During C(m) at most q = `_concurrent(s, o)` other holds E(m') fit beside m.
    Sort the cores by start c_1 <= ... <= c_M. If c_{i+q+1} < c_i + round_trip(s) + post, then at
    c_{i+q+1} the holds of m_i..m_{i+q} (each covers [c_l - pre, c_l + round_trip(s) + post],
    c_i <= c_l) all contain it, q + 1 holds beside a core; if c_{i+q+1} - pre < c_i +
    round_trip(s), the holds of m_{i+1}..m_{i+q+1} all meet the end of C(m_i): both impossible. So
    consecutive groups of q + 1 cores start >= D = round_trip(s) + max(pre, post) apart, and
    makespan >= head(F(s)) + floor((M - 1) / (q + 1)) * D + round_trip(s) + tail(B(s)).
    With o = s (pre = post = 0) this is the interval-chain bound head + ceil(M / K) * round_trip +
    tail, K = q + 1 (K = 1: the paper's M * round_trip); on multi-wave placements o < s
    (interleaved: s = o + P, V: s = 2P - 1 - o) accounts for the microbatch that must reach the
    device's later stage before another may enter. Remat breaks the nesting (a rematerialized
    pair keeps only a checkpoint): with remat allowed this bound is 0.
    """
    if instance.allow_remat or instance.memory_limit is None:
        return 0.0
    M, stages = instance.num_microbatches, instance.stages
    best = 0.0
    for on_device in instance.stages_of_device:
        for s in on_device:
            rt = round_trip(instance, s)
            for o in (j for j in on_device if j <= s):
                q = _concurrent(instance, s, o)
                if q is None or q + 1 >= M:
                    continue
                pre = forward_head(instance, s) - forward_head(instance, o)
                post = sum(instance.comm_after(j) + stages[j].B for j in range(o, s))
                span = (forward_head(instance, s) + (M - 1) // (q + 1) * (rt + max(pre, post)) + rt
                        + backward_tail(instance, s))
                best = max(best, span)
    return best


def memory_energy_bound(instance: PipelineInstance) -> float:
    """Energetic memory bound for devices holding several stages; without remat.

    Microbatch m holds activation(s) during [F(s, m).start, B(s, m).end], of length >=
    round_trip(s), inside [h, makespan - t] where h, t are the least head of F and least tail of B
    over the device's stages; memory never exceeds the limit L there, so L * (makespan - h - t) >=
    M * sum_s activation(s) * round_trip(s). With a split backward, m also holds wgrad_stash(s)
    from B(s, m).end until W(s, m).end (>= W(s) later, after RW too), inside [h, makespan], so
    also L * (makespan - h) >= that energy plus M * sum_s wgrad_stash(s) * W(s).
    """
    if instance.allow_remat or instance.memory_limit is None:
        return 0.0
    M, best = instance.num_microbatches, 0.0
    for d, on_device in enumerate(instance.stages_of_device):
        limit = instance.limit(d)
        if not on_device or limit is None or limit <= 0:
            continue
        head = min(forward_head(instance, s) for s in on_device)
        tail = min(backward_tail(instance, s) for s in on_device)
        held = M * sum(instance.stages[s].activation * round_trip(instance, s) for s in on_device)
        best = max(best, head + tail + held / limit)
        if instance.split_backward:
            stash = M * sum(instance.stages[s].wgrad_stash * instance.stages[s].W for s in on_device)
            best = max(best, head + (held + stash) / limit)
    return best


def _least_max(load: float, per_remat: float, memory: Callable[[int], float], M: int) -> float:
    """min over x in 0..M of max(load + x * per_remat, memory(x)), memory non-increasing in x."""
    lo, hi = 0, M  # bisect the first x where the load side reaches the memory side
    while lo < hi:
        x = (lo + hi) // 2
        if load + x * per_remat >= memory(x):
            hi = x
        else:
            lo = x + 1
    candidates = [lo] + ([lo - 1] if lo > 0 else [])
    return min(max(load + x * per_remat, memory(x)) for x in candidates)


def remat_memory_bound(instance: PipelineInstance) -> float:
    """Memory-limited bound that stays valid with remat (formats.md 1.4 options and RW included).

    Remat lets more microbatches be in flight at a recompute price. For a stage s on device d, let
    x be the number of its microbatches a schedule rematerializes. A microbatch holds all of
    activation(s) during its "full" intervals: [F(s, m).start, B(s, m).end] (length >=
    round_trip(s)) when not rematerialized, else [F.start, F.end] and [R.start, B.end] (lengths
    >= F(s) and least_recompute(s) + B(s)). While one is full, it also keeps least_checkpoint of
    the device's earlier stages, so at most K = 1 + `_concurrent(s, s)` full intervals overlap;
    they lie within [head(F(s)), makespan - tail(B(s))]. Interval graphs are perfect: they form
    K chains of disjoint intervals, one of which holds >= ceil((M - x) / K) long ones, and the
    total length is <= K times the window. So makespan >= head + tail + max(ceil((M - x) / K) *
    round_trip(s), ((M - x) * round_trip(s) + x * (F + least_recompute + B)) / K) = memory(x).
    Device d also runs x extra R ops, so makespan >= (device-load bound of d) + x *
    least_recompute(s) = load(x). The schedule's own x satisfies both, hence makespan >= min_x
    max(load(x), memory(x)). RW ops only act after B, so they change none of this.
    Besides, every microbatch holds at least least_checkpoint(s) over its whole [F(s, m).start,
    B(s, m).end], rematerialized or not; the most such intervals overlap at some interval's start,
    an F(s) start, where that F adds activation(s): so at most K' = 1 + floor((limit - activation(s)
    - earlier stages' least checkpoints) / least_checkpoint(s)) overlap, and makespan >= head +
    ceil(M / K') * round_trip(s) + tail (the interval-chain argument of `memory_bound`).
    """
    if not instance.allow_remat or instance.memory_limit is None:
        return 0.0
    M, best = instance.num_microbatches, 0.0
    loads = device_loads(instance)
    for s, st in enumerate(instance.stages):
        rt, head, tail = round_trip(instance, s), forward_head(instance, s), backward_tail(instance, s)
        q = _concurrent(instance, s, s, others_keep=least_checkpoint(instance, s))
        if q is not None and q + 1 < M:  # hold intervals, however rematerialized
            best = max(best, head + math.ceil(M / (q + 1)) * rt + tail)
        q = _concurrent(instance, s, s)
        if q is None or q + 1 >= M:
            continue
        K = q + 1
        short = st.F + least_recompute(instance, s) + st.B

        def memory(x: int) -> float:
            return head + tail + max(math.ceil((M - x) / K) * rt, ((M - x) * rt + x * short) / K)

        best = max(best, _least_max(loads[st.device], least_recompute(instance, s), memory, M))
    return best


def bounds(instance: PipelineInstance) -> Bounds:
    return Bounds(device_load_bound(instance), critical_path_bound(instance), memory_bound(instance),
                  memory_energy_bound(instance), remat_memory_bound(instance))


def lower_bound(instance: PipelineInstance) -> float:
    """The best of all bounds above (valid whenever the instance is feasible)."""
    return bounds(instance).best
