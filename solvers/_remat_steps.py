"""From a sequence of computations to formats.md 2.2 steps: drop useless computations, free asap.

A remat schedule is determined by its compute sequence: the cheapest way to free is to drop each
value right after the last computation that reads that copy (before the value's next computation),
which only lowers memory. A computation whose copy nobody reads is useless (except the single
computation of a value nobody reads) and removing it lowers cost and memory. Every solver emits its
computations through `steps_from_computes`, so these two facts hold for every returned schedule
and give the copy bound of `_remat_bounds.copy_caps`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipesched.remat import RematInstance

Step = tuple[str, str]


def useful_computes(instance: RematInstance, computes: Sequence[int]) -> list[int]:
    """`computes` (node indices) without useless computations (module docstring)."""
    deps, users = instance.dep_indices, instance.users
    needed = [False] * len(instance.nodes)
    kept_sink = [False] * len(instance.nodes)
    keep = [False] * len(computes)
    for p in reversed(range(len(computes))):
        v = computes[p]
        if needed[v] or (not users[v] and not kept_sink[v]):
            keep[p] = True
            needed[v] = False
            kept_sink[v] = True
            for u in deps[v]:
                needed[u] = True
    return [v for v, k in zip(computes, keep) if k]


def steps_from_computes(instance: RematInstance, computes: Sequence[int]) -> list[Step]:
    """Steps computing `computes` (after `useful_computes`), each copy freed after its last reader."""
    computes = useful_computes(instance, computes)
    deps, ids = instance.dep_indices, [node.id for node in instance.nodes]
    last_read = list(range(len(computes)))  # per position: last position reading that copy
    current: dict[int, int] = {}  # node -> position of its resident copy
    for p, v in enumerate(computes):
        for u in deps[v]:
            last_read[current[u]] = p
        current[v] = p
    frees_after: dict[int, list[int]] = {}
    for p, q in enumerate(last_read):
        frees_after.setdefault(q, []).append(computes[p])
    steps: list[Step] = []
    for p, v in enumerate(computes):
        steps.append(("compute", ids[v]))
        steps.extend(("free", ids[u]) for u in frees_after.get(p, ()))
    return steps


def computes_of(instance: RematInstance, steps: Sequence[Step]) -> list[int]:
    index = instance.index
    return [index[node_id] for kind, node_id in steps if kind == "compute"]
