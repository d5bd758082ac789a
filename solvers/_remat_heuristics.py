"""Remat heuristics and baselines. Each returns a compute sequence (node indices) or None.

* `checkpoint_all`: the default order, no recomputation (peak = reference peak).
* `checkpointed`: the Chen et al. (2016) execution of a checkpoint set: in the default order, a
  value that is neither a checkpoint nor a backward value is dropped once its next reader lies
  beyond the next checkpoint; a missing value is recomputed from what is resident (recursively)
  and then kept until its last reader, so the backward pass recomputes each segment once.
* `sqrt_n`: checkpoints every round(sqrt(k))-th of the k candidates (Chen's sqrt(n) strategy).
* `chen_greedy`: Chen's greedy segmentation (accumulate output sizes, checkpoint a candidate once
  the running size exceeds b), swept over a grid of b.
  Candidates are the articulation points of the forward graph in the default order (no forward
  edge jumps over them) or, "linearized", every forward node (Checkmate's two variants).
* `eviction_greedy`: budget-aware (in the spirit of DTR, Kirisame et al. 2021): run the default
  order; when a computation would exceed the budget, evict the resident value with the smallest
  cost / (memory x distance to its next use); recompute evicted values on demand.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

from pipesched._common import approx_le
from pipesched.remat import RematInstance

Computes = list[int]


def checkpoint_all(instance: RematInstance) -> Computes:
    return list(range(len(instance.nodes)))


# --------------------------------------------------------------------------------------------
# Checkpoint sets (Chen et al.)


def forward_nodes(instance: RematInstance) -> list[int]:
    return [i for i, node in enumerate(instance.nodes) if not node.backward]


def articulation_points(instance: RematInstance) -> list[int]:
    """Forward nodes that no forward-to-forward edge jumps over in the default order."""
    forward = forward_nodes(instance)
    is_forward = {i: True for i in forward}
    reach = -1  # furthest forward reader of any earlier forward node
    points = []
    for v in forward:
        if reach <= v:
            points.append(v)
        reach = max([reach] + [w for w in instance.users[v] if w in is_forward])
    return points


def checkpointed(instance: RematInstance, checkpoints: Sequence[int]) -> Computes:
    """Chen's execution of a checkpoint set (module docstring)."""
    nodes, deps, users = instance.nodes, instance.dep_indices, instance.users
    keep = set(checkpoints) | {i for i, node in enumerate(nodes) if node.backward}
    boundaries = sorted(checkpoints)
    resident: set[int] = set()
    computes: Computes = []

    def materialize(v: int) -> None:
        stack = [v]
        while stack:
            x = stack[-1]
            missing = [u for u in deps[x] if u not in resident]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            if x not in resident:
                computes.append(x)
                resident.add(x)

    for p in range(len(nodes)):
        materialize(p)
        b = bisect.bisect_right(boundaries, p)
        next_boundary = boundaries[b] if b < len(boundaries) else math.inf
        for x in list(resident):
            later = [w for w in users[x] if w > p]
            if not later or (x not in keep and min(later) > next_boundary):
                resident.discard(x)
    return computes


def sqrt_n_checkpoints(candidates: Sequence[int]) -> list[int]:
    step = max(1, round(math.sqrt(len(candidates))))
    return list(candidates[step - 1::step])


def chen_greedy_checkpoints(instance: RematInstance, candidates: Sequence[int], threshold: float) -> list[int]:
    is_candidate = set(candidates)
    running, chosen = 0.0, []
    for v in forward_nodes(instance):
        running += instance.nodes[v].memory
        if v in is_candidate and running > threshold:
            chosen.append(v)
            running = 0.0
    return chosen


def candidate_sets(instance: RematInstance) -> list[list[int]]:
    sets = [articulation_points(instance), forward_nodes(instance)]
    return [s for i, s in enumerate(sets) if s and s not in sets[:i]]


def chen_thresholds(instance: RematInstance, count: int = 24) -> list[float]:
    sizes = [instance.nodes[v].memory for v in forward_nodes(instance)]
    lo, hi = max(min(sizes), 1e-9), max(sum(sizes), 1e-9)
    return [lo * (hi / lo) ** (k / (count - 1)) for k in range(count)]


# --------------------------------------------------------------------------------------------
# Budget-aware eviction


def eviction_greedy(instance: RematInstance, score: Callable[[float, float, int], float],
                    order: Sequence[int] | None = None, max_computes: int | None = None) -> Computes | None:
    """`order` (default: the instance's) with evictions when the budget is hit (module docstring);
    None if stuck.

    Only the deps of the value being computed are pinned; deps of pending recomputations are
    merely "wanted" (evicted last), so a long chain of recomputations does not pin memory."""
    nodes, deps, users = instance.nodes, instance.dep_indices, instance.users
    n, budget = len(nodes), instance.budget
    mem, cost = [node.memory for node in nodes], [node.cost for node in nodes]
    order = list(range(n)) if order is None else list(order)
    position = {v: p for p, v in enumerate(order)}
    reads = [sorted(position[w] for w in u) for u in users]
    max_computes = max_computes or 4 * n + 50
    resident = [False] * n
    pinned = [False] * n
    wanted = [0] * n
    level = 0.0
    computes: Computes = []

    def next_read(x: int, p: int) -> int | None:
        k = bisect.bisect_right(reads[x], p)
        return reads[x][k] if k < len(reads[x]) else None

    def victim_key(x: int, p: int) -> tuple:
        recompute = cost[x] + sum(cost[u] for u in deps[x] if not resident[u])
        return (wanted[x] > 0, any(not resident[u] for u in deps[x]),
                score(recompute, mem[x], (next_read(x, p) or n + 1) - p))

    def make_room(need: float, p: int) -> bool:
        nonlocal level
        while not approx_le(level + need, budget):
            victims = [x for x in range(n) if resident[x] and not pinned[x] and mem[x] > 0]
            if not victims:
                return False
            victim = min(victims, key=lambda x: victim_key(x, p))
            resident[victim] = False
            level -= mem[victim]
        return True

    def materialize(v: int, p: int) -> bool:
        nonlocal level
        frames = [v]
        for u in deps[v]:
            wanted[u] += 1
        while frames:
            x = frames[-1]
            missing = next((u for u in deps[x] if not resident[u]), None)
            if missing is not None and not resident[x]:
                frames.append(missing)
                for u in deps[missing]:
                    wanted[u] += 1
                continue
            if not resident[x]:
                if len(computes) >= max_computes:
                    return False
                for u in deps[x]:
                    pinned[u] = True
                fits = make_room(mem[x], p)
                for u in deps[x]:
                    pinned[u] = False
                if not fits:
                    return False
                computes.append(x)
                resident[x] = True
                level += mem[x]
            frames.pop()
            for u in deps[x]:
                wanted[u] -= 1
        return True

    for p, v in enumerate(order):
        if resident[v] or not materialize(v, p):
            return None
        for x in range(n):
            if resident[x] and next_read(x, p) is None:
                resident[x] = False
                level -= mem[x]
    return computes


def memory_aware_order(instance: RematInstance) -> list[int]:
    """A topological order built greedily: next, the ready node that grows resident memory least
    (its output minus the deps it is the last reader of); ties by the instance's order."""
    deps, users, mem = instance.dep_indices, instance.users, [node.memory for node in instance.nodes]
    waiting = [len(d) for d in deps]
    readers_left = [len(u) for u in users]
    ready = {v for v, w in enumerate(waiting) if w == 0}
    order = []
    while ready:
        def growth(v: int) -> tuple[float, int]:
            freed = sum(mem[u] for u in set(deps[v]) if readers_left[u] == 1)
            return (mem[v] if users[v] else 0.0) - freed, v
        v = min(ready, key=growth)
        ready.remove(v)
        order.append(v)
        for u in deps[v]:
            readers_left[u] -= 1
        for w in users[v]:
            waiting[w] -= 1
            if waiting[w] == 0:
                ready.add(w)
    return order


def recompute_per_byte_distance(cost: float, memory: float, distance: int) -> float:
    return cost / (memory * distance)


def recompute_per_byte(cost: float, memory: float, distance: int) -> float:
    return cost / memory


EVICTION_SCORES = (recompute_per_byte_distance, recompute_per_byte)
