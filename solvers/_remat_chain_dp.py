"""Optimal remat of a chain (`pipesched.remat.chain_instance`) by dynamic programming.

The recursion of Beaumont et al. (2019, "Optimal checkpointing for heterogeneous chains") written
for our chain graph, where layer i's saved tape is its output f_i (x-bar_i = x_i). A segment
[s, t] starts with f_{s-1} resident (its left checkpoint, held by the caller and not counted in the
segment's memory m), the incoming gradient b_{t+1} resident, and, in mode 1, f_t resident (left
over from the segment to its right); it ends with b_s resident and everything else of the
segment freed. With F(s, k) the forward costs of layers s..k and P(s, k) the peak of running
them from f_{s-1} keeping only the last value:

    C0(t, t, m) = uf_t + ub_t,   C1(t, t, m) = ub_t          if g_{t+1} + x_t + g_t <= m
    C0(s, t, m) = min_k F(s, k) + C0(k+1, t, m - x_k) + C1(s, k, m)   over s <= k < t
                  with g_{t+1} + P(s, k) <= m
    C1(s, t, m) = min(C0(s, t, m),   [free f_t now, recompute it later]
                      min_k F(s, k) + C1(k+1, t, m - x_k) + C1(s, k, m)  with g_{t+1} + x_t + P(s, k) <= m)

and the answer is C0(0, n-1, budget) (x_{-1} = g_n = 0).

What it is optimal over: dropping useless computations (`_remat_steps`) never hurts, after which
each b_i is computed once, in order. The recursion then covers every schedule in which a segment
holds its left checkpoint until the segment's last backward step (Rotor's and Revolve's
"persistent" checkpoints), including dropping and recomputing the value at its right end (mode 0).
The graph model also allows releasing a checkpoint early and recomputing it later from further
left, which is sometimes cheaper (tests/test_remat_solvers.py keeps a 5-layer example where CP-SAT
finds 27 and the DP 31). So the DP's schedule is reported "feasible", never "optimal" by itself:
proofs come from CP-SAT.

Revolve (Griewank & Walther 2000) in this model: reversing l steps x_0 -> x_l with s snapshots is
the chain of l + 1 unit layers (f_i = x_i, f_0 computes the input x_0), unit output and gradient
sizes, forward cost 1 and backward cost 0, under budget s + 3 (the s snapshots, plus the output
of the layer being reversed, which is the value Revolve's reverse step re-tapes, and the incoming
and outgoing gradients). The DP's cost is then Revolve's minimal number of forward steps,
t*l - C(s+t, s+1), plus 2: the computation of x_0, which Revolve is given, and one forward step
Revolve performs inside a reverse step (tests/test_remat_solvers.py checks the identity for every
l <= 30, s <= 5).

Memory is counted in integer units, vectorised over the memory axis with numpy: O(n^3 M) time,
O(n^2 M) space. When every size and the budget are integers the unit is their gcd (exact);
otherwise sizes are rounded up and the budget down, which keeps the schedule valid.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from pipesched.remat import ChainLayout

MAX_TABLE_ENTRIES = 30_000_000  # 5 float32 arrays of (M+1) x n x n: at most 600 MB


class Discretisation(NamedTuple):
    """Sizes x, g and the budget in integer units (rounded so that schedules stay valid)."""

    x: np.ndarray
    g: np.ndarray
    budget: int


def discretise(x: tuple[float, ...], g: tuple[float, ...], budget: float, max_slots: int) -> Discretisation:
    sizes = list(x) + list(g)
    if all(float(v).is_integer() for v in sizes) and float(budget).is_integer():
        unit = math.gcd(*(int(v) for v in sizes)) or 1
        if budget // unit <= max_slots:
            return Discretisation(np.array(x, dtype=np.int64) // unit, np.array(g, dtype=np.int64) // unit,
                                  int(budget // unit))
    unit = max(budget, 1e-300) / max_slots
    def up(v):
        return np.ceil(np.array(v, dtype=float) / unit).astype(np.int64)
    return Discretisation(up(x), up(g), max_slots)


class ChainTables(NamedTuple):
    """s1[m, s, d] = C1(s, s+d, m); e0/e1[m, t, n-1-d] = C0/C1(t-d, t, m - x_{t-d-1}). The memory axis
    comes first and the segment length last (reversed in e0/e1) so that, for one length, the
    candidates over the checkpoint are contiguous slices."""

    uf: np.ndarray
    ub: np.ndarray
    x: np.ndarray
    g: np.ndarray
    s1: np.ndarray
    e0: np.ndarray
    e1: np.ndarray

    @property
    def optimum(self) -> float:
        return float(self.e0[-1, len(self.x) - 1, 0])


def _shift(values: np.ndarray, by: np.ndarray) -> np.ndarray:
    """out[m, i] = values[m - by[i], i] (inf where m < by[i])."""
    idx = np.arange(values.shape[0])[:, None] - by[None, :]
    return np.where(idx >= 0, np.take_along_axis(values, np.maximum(idx, 0), axis=0), np.inf)


def _forward_peaks(x: np.ndarray, s: np.ndarray, d: int) -> np.ndarray:
    """P(s, s+j) for j < d: max over the run of (input + output), the first input held outside."""
    k = s[:, None] + np.arange(d)[None, :]
    pairs = x[k] + np.where(k > s[:, None], x[np.maximum(k - 1, 0)], 0)
    return np.maximum.accumulate(pairs, axis=1)


def _masked_min(left: np.ndarray, right: np.ndarray, unfit: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """min over the last axis of left + right, skipping entries where `unfit`."""
    total = scratch[:, : left.shape[1], : left.shape[2]]
    np.add(left, right, out=total)
    np.copyto(total, np.inf, where=unfit)
    return total.min(axis=2)


def chain_tables(uf, ub, x, g, budget: int) -> ChainTables:
    """Fill the DP tables for integer sizes `x`, `g` and integer memory `budget` (float32: the
    schedule's cost is recomputed exactly afterwards)."""
    uf, ub = np.asarray(uf, dtype=np.float32), np.asarray(ub, dtype=np.float32)
    x, g = np.asarray(x, dtype=np.int64), np.asarray(g, dtype=np.int64)
    n, width = len(x), budget + 1
    if n * n * width > MAX_TABLE_ENTRIES:
        raise ValueError(f"chain DP tables too large ({n} layers x {width} memory slots): "
                         "pass a smaller max_slots")
    ms = np.arange(width)
    x_prev, g_next = np.concatenate([[0], x[:-1]]), np.concatenate([g[1:], [0]])
    cum_f = np.concatenate([[0], np.cumsum(uf, dtype=np.float64)]).astype(np.float32)
    s1, e0, e1, forward_left, cand = (np.full((width, n, n), np.inf, dtype=np.float32) for _ in range(5))
    fits = ms[:, None] >= (g_next + x + g)[None, :]
    c0, c1 = np.where(fits, (uf + ub)[None, :], np.inf), np.where(fits, ub[None, :], np.inf)
    s1[:, :, 0], e0[:, :, n - 1], e1[:, :, n - 1] = c1, _shift(c0, x_prev), _shift(c1, x_prev)
    for d in range(1, n):
        s = np.arange(n - d)
        t = s + d
        k = s[:, None] + np.arange(d)[None, :]
        left = forward_left[:, : n - d, :d]
        np.add((cum_f[k + 1] - cum_f[s][:, None])[None], s1[:, : n - d, :d], out=left)
        peak0 = g_next[t][:, None] + _forward_peaks(x, s, d)
        c0 = _masked_min(left, e0[:, d:, n - d:], peak0[None] > ms[:, None, None], cand)
        c1 = _masked_min(left, e1[:, d:, n - d:], (peak0 + x[t][:, None])[None] > ms[:, None, None], cand)
        np.minimum(c0, c1, out=c1)
        s1[:, : n - d, d] = c1
        e0[:, d:, n - 1 - d], e1[:, d:, n - 1 - d] = _shift(c0, x_prev[s]), _shift(c1, x_prev[s])
    return ChainTables(uf, ub, x, g, s1, e0, e1)


def _candidates(tables: ChainTables, mode: int, s: int, t: int, m: int) -> np.ndarray:
    """The costs of C_mode(s, t, m) for each checkpoint k = s .. t-1 (same arithmetic as the tables)."""
    n, d = len(tables.x), t - s
    j = np.arange(d)
    forward_left = (np.cumsum(tables.uf[s:t]) + tables.s1[m, s, j])
    peak = _forward_peaks(tables.x, np.array([s]), d)[0] + (tables.g[t + 1] if t + 1 < n else 0)
    table = tables.e1 if mode else tables.e0
    cand = forward_left + table[m, t, n - d + j]
    cand[peak + (tables.x[t] if mode else 0) > m] = np.inf
    return cand


def _choice(tables: ChainTables, mode: int, s: int, t: int, m: int) -> int | None:
    """The checkpoint k achieving C_mode(s, t, m), or None for "drop f_t first" (mode 1)."""
    cand = _candidates(tables, mode, s, t, m)
    best = int(np.argmin(cand))
    if mode and _candidates(tables, 0, s, t, m).min() <= cand[best]:
        return None
    return s + best


def chain_computes(tables: ChainTables, layout: ChainLayout) -> list[int]:
    """The compute sequence (node indices) of the optimal schedule in `tables`."""
    n = len(tables.x)
    budget = tables.e0.shape[0] - 1
    computes: list[int] = []
    todo: list[tuple[int, int, int, int]] = [(0, 0, n - 1, budget)]  # (mode, s, t, m), last first
    while todo:
        mode, s, t, m = todo.pop()
        if s == t:
            computes.extend(([layout.forward[t]] if mode == 0 else []) + [layout.backward[t]])
            continue
        k = _choice(tables, mode, s, t, m)
        if k is None:
            todo.append((0, s, t, m))
            continue
        computes.extend(layout.forward[s:k + 1])
        todo.append((1, s, k, m))
        todo.append((mode, k + 1, t, m - int(tables.x[k])))
    return computes
