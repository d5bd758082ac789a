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
* Feasibility, on small graphs (`exhaustively_feasible`): a valid schedule is a walk through
  states (resident set R, set C of nodes computed at least once), from (empty, empty) by two moves:
  free a resident value, or compute a value v not resident whose deps are resident and with
  memory(R) + memory(v) <= budget (formats.md 2.2). A schedule exists iff a state with C = every
  node is reachable, so visiting every reachable state decides it exactly. R is a subset of C, so
  there are at most 3^n states; the search is only tried up to `EXHAUSTIVE_NODES` nodes and gives
  up (None) beyond `EXHAUSTIVE_STATES` states.
"""

from __future__ import annotations

import math

from pipesched._common import approx_le, approx_lt
from pipesched.remat import RematInstance


def smallest_peak(instance: RematInstance) -> float:
    mem = [node.memory for node in instance.nodes]
    return max(mem[v] + sum(mem[u] for u in deps) for v, deps in enumerate(instance.dep_indices))


def proven_infeasible(instance: RematInstance) -> bool:
    return approx_lt(instance.budget, smallest_peak(instance))


EXHAUSTIVE_NODES = 12  # each state costs O(n): larger graphs are not tried
EXHAUSTIVE_STATES = 20_000  # 3^9: every graph of up to 9 nodes, in well under a second


def exhaustively_feasible(instance: RematInstance, max_states: int = EXHAUSTIVE_STATES) -> bool | None:
    """Whether any valid schedule exists, by depth-first search over every reachable (resident,
    computed) state (module docstring); None when there are more than `max_states`."""
    n, budget = len(instance.nodes), instance.budget
    if n > EXHAUSTIVE_NODES:
        return None
    mem = [node.memory for node in instance.nodes]
    need = [sum(1 << u for u in deps) for deps in instance.dep_indices]
    everything = (1 << n) - 1
    seen, todo = {(0, 0)}, [(0, 0)]
    while todo:
        resident, computed = todo.pop()
        if computed == everything:
            return True
        level = sum(mem[v] for v in range(n) if resident >> v & 1)
        for v in range(n):
            bit = 1 << v
            if resident & bit:
                nxt = (resident & ~bit, computed)
            elif resident & need[v] == need[v] and approx_le(level + mem[v], budget):
                nxt = (resident | bit, computed | bit)
            else:
                continue
            if nxt not in seen:
                if len(seen) >= max_states:
                    return None
                seen.add(nxt)
                todo.append(nxt)
    return False


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
