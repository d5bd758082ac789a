"""Proven facts about every valid remat schedule of an instance (formats.md 2.2).

* Cost: every node is computed at least once, so the no-remat cost `instance.total_cost` is a
  lower bound.
* Memory: computing v needs its deps resident and counts v itself, so every valid schedule has
  peak >= max_v memory(v) + sum of memory(deps of v) (`smallest_peak`); a budget below it is
  infeasible.
* Copies: some optimal schedule computes each node v at most `copy_caps(...)[v]` times. Take an
  optimal schedule and drop useless computations (`_remat_steps`): cost and memory do not grow.
  Then (a) a node nobody reads is computed once; (b) each computation of v is read by a
  computation of a user of v, and one user computation reads one copy, so
  copies(v) <= sum over users w of copies(w); (c) its cost is <= any known schedule's cost `upper`,
  so for cost(v) > 0, (copies(v) - 1) * cost(v) <= upper - total_cost.
"""

from __future__ import annotations

import math

from pipesched._common import approx_lt
from pipesched.remat import RematInstance


def smallest_peak(instance: RematInstance) -> float:
    mem = [node.memory for node in instance.nodes]
    return max(mem[v] + sum(mem[u] for u in deps) for v, deps in enumerate(instance.dep_indices))


def proven_infeasible(instance: RematInstance) -> bool:
    return approx_lt(instance.budget, smallest_peak(instance))


def copy_caps(instance: RematInstance, upper: float | None) -> list[int]:
    """Per node, the most computations some optimal schedule needs (module docstring)."""
    slack = None if upper is None else max(upper - instance.total_cost, 0.0)
    caps = [0] * len(instance.nodes)
    for v in reversed(range(len(instance.nodes))):
        users = instance.users[v]
        cap = sum(caps[w] for w in users) if users else 1
        cost = instance.nodes[v].cost
        if slack is not None and cost > 0:
            cap = min(cap, 1 + math.floor(slack / cost * (1 + 1e-9)))
        caps[v] = max(cap, 1)
    return caps
