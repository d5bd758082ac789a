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
left, which is sometimes cheaper (tests/test_remat_solvers.py keeps a 5-layer example: 27 against
the DP's 31). So `solve_remat` uses this DP only for chains too long for the exact DP over
resident sets (`_remat_chain_exact`), and reports its schedule "feasible", never "optimal" by
itself.

Revolve (Griewank & Walther 2000) in this model: reversing l steps x_0 -> x_l with s snapshots is
the chain of l + 1 unit layers (f_i = x_i, f_0 computes the input x_0), unit output and gradient
sizes, forward cost 1 and backward cost 0, under budget s + 3 (the s snapshots, plus the output
of the layer being reversed, which is the value Revolve's reverse step re-tapes, and the incoming
and outgoing gradients). The DP's cost is then Revolve's minimal number of forward steps,
t*l - C(s+t, s+1), plus 2: the computation of x_0, which Revolve is given, and one forward step
Revolve performs inside a reverse step (tests/test_remat_solvers.py checks the identity for every
l <= 30, s <= 5).

Memory is counted in integer units, vectorised over the memory axis with numpy in cache-sized
blocks (`chain_tables`): O(n^3 M) time, O(n^2 M) space. When every size and the budget are
integers the unit is their gcd (exact); otherwise sizes are rounded up and the budget down, which
keeps the schedule valid.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from pipesched.remat import ChainLayout
from pipesched.solvers._interrupt import Deadline

MAX_TABLE_ENTRIES = 30_000_000  # 3 float32 arrays of (M+1) x n x n: at most 360 MB
CACHE_FLOATS = 1 << 18  # float32 temporaries of about 1 MB per length stay in a core's L2 cache


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
    """left[m, s, j] = F(s, s+j) + C1(s, s+j, m); e0/e1[m, t, n-1-d] = C0/C1(t-d, t, m - x_{t-d-1}).
    The memory axis comes first and the segment length last (reversed in e0/e1) so that, for one
    length, the candidates over the checkpoint are contiguous slices."""

    x: np.ndarray
    g: np.ndarray
    first: np.ndarray  # `_first_wide_pairs`
    left: np.ndarray
    e0: np.ndarray
    e1: np.ndarray

    @property
    def optimum(self) -> float:
        return float(self.e0[-1, len(self.x) - 1, 0])


def _shift(values: np.ndarray, by: np.ndarray) -> np.ndarray:
    """out[m, i] = values[m - by[i], i] (inf where m < by[i])."""
    idx = np.arange(values.shape[0])[:, None] - by[None, :]
    return np.where(idx >= 0, np.take_along_axis(values, np.maximum(idx, 0), axis=0), np.inf)


def _first_wide_pairs(x: np.ndarray, width: int) -> np.ndarray:
    """first[r, i]: the first k >= max(i, 1) with x_{k-1} + x_k > r (n if none), for r < width."""
    n = len(x)
    pairs = np.concatenate([[0], x[1:] + x[:-1]])
    idx = np.where(pairs[None, :] > np.arange(width)[:, None], np.arange(n)[None, :], n)
    return np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]


def _allowed(x: np.ndarray, g_next: np.ndarray, first: np.ndarray, s: np.ndarray, d: int, mode: int,
             ms: np.ndarray) -> np.ndarray:
    """allowed[m, s]: checkpoints k = s .. s+allowed-1 of C_mode(s, s+d, m) fit in memory m.

    k fits when g_{t+1} (+ x_t in mode 1) + P(s, k) <= m, with P(s, k) the forward peak from
    f_{s-1}: max(x_s, x_{i-1} + x_i for s < i <= k). P grows with k, so the allowed k are a prefix."""
    t = s + d
    room = ms[:, None] - (g_next[t] + (x[t] if mode else 0))[None, :]
    reach = first[np.clip(room, 0, None), s[None, :] + 1] - s[None, :]
    return np.where(room >= x[s][None, :], np.minimum(reach, d), 0)


def _memory_blocks(lowest: int, width: int, n: int) -> list[range]:
    """Memory values lowest .. width-1 in blocks whose per-length temporaries (at most n^2/4 entries
    per value) fit in a core's L2 cache."""
    size = max(1, CACHE_FLOATS // max(1, n * n // 4))
    return [range(lo, min(lo + size, width)) for lo in range(lowest, width, size)]


def _prefix_min(total: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """min of total[..., :allowed] over the last axis (inf for an empty prefix); total is clobbered.
    Only the memory values (first axis) where some prefix is short are masked."""
    length = total.shape[-1]
    for m in np.flatnonzero((allowed < length).any(axis=-1)):
        np.copyto(total[m], np.inf, where=np.arange(length)[None, :] >= allowed[m][:, None])
    return total.min(axis=-1)


def chain_tables(uf, ub, x, g, budget: int, *, deadline: Deadline | None = None) -> ChainTables | None:
    """Fill the DP tables for integer sizes `x`, `g` and integer memory `budget` (float32: the
    schedule's cost is recomputed exactly afterwards); None once `deadline` passes (checked
    before each segment length).

    C(s, t, m) reads only shorter segments at memory <= m, so the memory axis is cut into
    cache-sized blocks, taken in increasing order, each filled for every length in turn: the same
    values as one pass over all memories, with the temporaries kept in cache. Memories below the
    smallest single-layer need min_t (g_{t+1} + x_t + g_t) are skipped: every recursion ends in
    single layers at memory <= m, so those entries are all infinite."""
    uf, ub = np.asarray(uf, dtype=np.float32), np.asarray(ub, dtype=np.float32)
    x, g = np.asarray(x, dtype=np.int64), np.asarray(g, dtype=np.int64)
    n, width = len(x), budget + 1
    if n * n * width > MAX_TABLE_ENTRIES:
        raise ValueError(f"chain DP tables too large ({n} layers x {width} memory slots): "
                         "pass a smaller max_slots")
    ms = np.arange(width)
    x_prev, g_next = np.concatenate([[0], x[:-1]]), np.concatenate([g[1:], [0]])
    cum_f = np.concatenate([[0], np.cumsum(uf, dtype=np.float64)]).astype(np.float32)
    left, e0, e1 = (np.full((width, n, n), np.inf, dtype=np.float32) for _ in range(3))
    single = g_next + x + g
    fits = ms[:, None] >= single[None, :]
    c0, c1 = np.where(fits, (uf + ub)[None, :], np.inf), np.where(fits, ub[None, :], np.inf)
    left[:, :, 0] = (cum_f[1:] - cum_f[:-1])[None, :] + c1
    e0[:, :, n - 1], e1[:, :, n - 1] = _shift(c0, x_prev), _shift(c1, x_prev)
    first = _first_wide_pairs(x, width)
    scratch = np.empty(max(CACHE_FLOATS, n * n // 4 + n), dtype=np.float32)
    for block in _memory_blocks(int(single.min()), width, n):
        lo, hi = block.start, block.stop
        for d in range(1, n):
            if deadline is not None and deadline.passed():
                return None
            s = np.arange(n - d)
            total = scratch[: len(block) * (n - d) * d].reshape(len(block), n - d, d)
            best = []
            for mode, table in ((0, e0), (1, e1)):
                allowed = _allowed(x, g_next, first, s, d, mode, ms[lo:hi])
                np.add(left[lo:hi, : n - d, :d], table[lo:hi, d:, n - d:], out=total)
                best.append(_prefix_min(total, allowed))
            c0, c1 = best[0], np.minimum(best[0], best[1])
            left[lo:hi, : n - d, d] = (cum_f[s + d + 1] - cum_f[s])[None, :] + c1
            rows = ms[lo:hi, None] + x_prev[s][None, :]
            keep = rows < width
            t = np.broadcast_to(s + d, rows.shape)[keep]
            e0[rows[keep], t, n - 1 - d], e1[rows[keep], t, n - 1 - d] = c0[keep], c1[keep]
    return ChainTables(x, g, first, left, e0, e1)


def _candidates(tables: ChainTables, mode: int, s: int, t: int, m: int) -> np.ndarray:
    """The costs of C_mode(s, t, m) for each checkpoint k = s .. t-1 (same arithmetic as the tables)."""
    n, d, x = len(tables.x), t - s, tables.x
    g_next = np.concatenate([tables.g[1:], [0]])
    table = tables.e1 if mode else tables.e0
    cand = tables.left[m, s, :d] + table[m, t, n - d:]
    allowed = _allowed(x, g_next, tables.first, np.array([s]), d, mode, np.array([m]))
    cand[int(allowed[0, 0]):] = np.inf
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
            layer = ([layout.forward[t]] if mode == 0 else []) + [layout.backward[t]]
            computes.extend(v for v in layer if v is not None)  # b_0 may be absent (`chain_layout`)
            continue
        k = _choice(tables, mode, s, t, m)
        if k is None:
            todo.append((0, s, t, m))
            continue
        computes.extend(layout.forward[s:k + 1])
        todo.append((1, s, k, m))
        todo.append((mode, k + 1, t, m - int(tables.x[k])))
    return computes
