"""Exact remat of a short chain (`pipesched.remat.chain_instance`): a DP over resident sets.

The Rotor recursion (`_remat_chain_dp`) is optimal only over persistent-checkpoint schedules. This
one is optimal over every valid schedule of the graph model, at a cost exponential in the length,
by the following reductions (each keeps a schedule valid and never raises its cost or peak):

* drop useless computations (`_remat_steps`): then each b_t is computed once, in the order
  b_{n-1}, ..., b_0 (b_t is read only by b_{t-1}, and b_0 is the single kept sink);
* free b_{t+1} and f_t right after b_t (nothing computed later reads them), and never compute f_j
  with j > t once b_{t+1} is done (its readers f_{j+1}, b_j, b_{j+1} are all done).

So between backward steps the state is (t, the set of resident forward values among f_0..f_t),
with b_{t+1} resident. Moves: compute f_j (f_{j-1} resident, cost uf_j), free f_j (cost 0), or,
with f_t and f_{t-1} resident, compute b_t (cost ub_t) and go to (t-1, set minus f_t). Memory
while computing v is b_{t+1}'s size + the resident set + v's size. Dijkstra's shortest path from
(n-1, {}) to past b_0 (past b_1 when the chain has no b_0, `chain_layout`) is the optimum; no path
means no valid schedule (a proof of infeasibility).
There are at most 2^(n+1) states, so `EXACT_CHAIN_LAYERS` bounds the length it is used for.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import NamedTuple

from pipesched._common import approx_le
from pipesched.remat import Chain, ChainLayout

EXACT_CHAIN_LAYERS = 14  # at most 2^15 states: well under a second
State = tuple[int, int]  # (next backward layer t, bitmask of resident forward values)
Move = tuple[str, int] | None  # ("f" or "b", layer) computed, or None for a free


class ExactChain(NamedTuple):
    """The optimum and its compute sequence (node indices), or cost None when no schedule fits."""

    cost: float | None
    computes: list[int]


def exact_chain(layout: ChainLayout, budget: float) -> ExactChain:
    """The cheapest valid schedule of the chain `layout` under `budget` (module docstring)."""
    chain: Chain = layout.chain
    n, x, g = chain.length, chain.output_size, chain.gradient_size
    done = 0 if layout.backward[0] is not None else 1  # without b_0 the schedule ends after b_1
    start = (n - 1, 0)
    best = {start: 0.0}
    parent: dict[State, tuple[State, Move]] = {}
    heap = [(0.0, start)]
    while heap:
        cost, state = heapq.heappop(heap)
        if cost > best[state]:
            continue
        t, resident = state
        if t < done:
            return ExactChain(cost, _computes(parent, state, layout))
        held = (g[t + 1] if t + 1 < n else 0) + sum(x[j] for j in range(t + 1) if resident >> j & 1)
        for move, nxt, step in _moves(chain, t, resident, held, budget):
            if cost + step < best.get(nxt, float("inf")):
                best[nxt] = cost + step
                parent[nxt] = (state, move)
                heapq.heappush(heap, (cost + step, nxt))
    return ExactChain(None, [])


def _moves(chain: Chain, t: int, resident: int, held: float, budget: float
           ) -> Iterator[tuple[Move, State, float]]:
    """(move, next state, cost) from state (t, resident), `held` its resident bytes."""
    needed = (1 << t) | ((1 << (t - 1)) if t else 0)
    if resident & needed == needed and approx_le(held + chain.gradient_size[t], budget):
        yield ("b", t), (t - 1, resident & ~(1 << t)), chain.backward_cost[t]
    for j in range(t + 1):
        if resident >> j & 1:
            yield None, (t, resident & ~(1 << j)), 0.0
        elif (j == 0 or resident >> (j - 1) & 1) and approx_le(held + chain.output_size[j], budget):
            yield ("f", j), (t, resident | (1 << j)), chain.forward_cost[j]


def _computes(parent: dict[State, tuple[State, Move]], state: State, layout: ChainLayout) -> list[int]:
    computes = []
    while state in parent:
        state, move = parent[state]
        if move is not None:
            kind, layer = move
            computes.append((layout.forward if kind == "f" else layout.backward)[layer])
    return computes[::-1]
