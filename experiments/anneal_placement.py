"""How far is local search from better placements? Long simulated annealing from its result.

    python experiments/anneal_placement.py [--cases 64:8:9:8 64:8:8:8 16:8:3:8] [--steps 4000000]

A measurement for the benchmark's hardest b = 1 rows (k = G = 8), not a solver: each case E:G:C:k
is `bench_placement.synthetic`'s trace (spare slots when C*G > E), started from `solve_placement(...,
"local-search")` and annealed for `--steps` random moves. The moves keep a placement valid: swap
two hosted copies between devices, turn a replica's copy into a copy of another expert, shift a
copy to a device with a free slot, add a copy there, drop a replica's copy. A move is accepted
when it lowers the cost, else with probability exp(-increase / temperature); the temperature falls
geometrically from `--hot` to `--cold`, in units of one batch's cost (one token at b = 1). Only
the batches holding a moved expert are re-evaluated. Each row holds the annealed cost against the
benchmark's proven bound, and the cost that a 5% gap would need at that bound.
Writes experiments/results/anneal_placement.json after every case (so an interrupted run keeps the
cases it finished; a new run starts over) and prints each row.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from bench_placement import synthetic
from pipesched.solvers import solve_placement
from pipesched.solvers._placement_common import aggregate

from pipesched._common import write_json
from pipesched.placement import PlacementInstance, placement_cost

RESULTS = Path(__file__).resolve().parent / "results"


def _shares(hosted: np.ndarray) -> np.ndarray:
    return hosted / hosted.sum(axis=1, keepdims=True)


def _replica_copy(hosted: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """A random copy (expert, device) of a replicated expert, or None when nothing is replicated."""
    replicated = np.flatnonzero(hosted.sum(axis=1) > 1)
    if not len(replicated):
        return None
    e = rng.choice(replicated)
    return e, rng.choice(np.flatnonzero(hosted[e]))


def _propose(hosted: np.ndarray, capacity: int, rng: np.random.Generator) -> np.ndarray | None:
    """A random valid neighbour of the (E, G) hosting matrix, or None when the draw is not a move."""
    E, G = hosted.shape
    new = hosted.copy()
    kind = rng.random()
    if kind < 0.6:  # swap: e on d and f on d' trade devices
        e, f = rng.choice(E, 2, replace=False)
        d, d2 = rng.choice(np.flatnonzero(hosted[e])), rng.choice(np.flatnonzero(hosted[f]))
        if d == d2 or hosted[e, d2] or hosted[f, d]:
            return None
        new[e, d], new[e, d2], new[f, d2], new[f, d] = False, True, False, True
    elif kind < 0.8:  # retarget: a replica's copy on d becomes a copy of another expert f
        copy = _replica_copy(hosted, rng)
        if copy is None:
            return None
        f = rng.integers(E)
        if hosted[f, copy[1]]:
            return None
        new[copy], new[f, copy[1]] = False, True
    elif kind < 0.95:  # shift a copy, or (one time in three) add one, to a device with a free slot
        e, d2 = rng.integers(E), rng.integers(G)
        if hosted[e, d2] or hosted[:, d2].sum() >= capacity:
            return None
        new[e, d2] = True
        if kind < 0.9:
            new[e, rng.choice(np.flatnonzero(hosted[e]))] = False
    else:  # drop a replica's copy
        copy = _replica_copy(hosted, rng)
        if copy is None:
            return None
        new[copy] = False
    return new


def anneal(instance: PlacementInstance, devices: list[list[int]], steps: int, *, hot: float = 1.5,
           cold: float = 0.05, seed: int = 0) -> tuple[list[list[int]], float]:
    """The best placement seen in `steps` annealing moves from `devices`, and its 3.2 cost."""
    batches = aggregate(instance)
    counts, weight = batches.counts.astype(float), batches.multiplicity.astype(float)
    E, G = instance.num_experts, instance.num_devices
    hosted = np.zeros((E, G), bool)
    for d, experts in enumerate(devices):
        hosted[list(experts), d] = True
    batches_of = [np.flatnonzero(counts[:, e]) for e in range(E)]
    loads = counts @ _shares(hosted)
    total = best = float(weight @ loads.max(axis=1))
    best_hosted = hosted
    rng = np.random.default_rng(seed)
    for step in range(steps):
        new = _propose(hosted, instance.slots_per_device, rng)
        if new is None:
            continue
        moved = np.flatnonzero((new != hosted).any(axis=1))
        rows = np.unique(np.concatenate([batches_of[e] for e in moved]))
        new_loads = counts[rows] @ _shares(new)
        increase = float(weight[rows] @ (new_loads.max(axis=1) - loads[rows].max(axis=1)))
        temperature = hot * (cold / hot) ** (step / steps)
        if increase <= 0 or rng.random() < math.exp(-increase / temperature):
            hosted, total = new, total + increase
            loads[rows] = new_loads
            if total < best - 1e-9:
                best, best_hosted = total, hosted
    found = [np.flatnonzero(best_hosted[:, d]).tolist() for d in range(G)]
    value = placement_cost(instance, found)
    if not math.isclose(value, best / weight.sum(), rel_tol=1e-9):  # the incremental loads drifted
        raise RuntimeError(f"annealing tracked cost {best / weight.sum()}, the placement costs {value}")
    return found, value


def proven_bound(E: int, G: int, C: int, k: int, bench: Path) -> float | None:
    """The benchmark's best proven b = 1 bound for the case, if its results are there."""
    if not bench.exists():
        return None
    bounds = [r["lower_bound"] for r in json.loads(bench.read_text())
              if r["source"] == "synthetic" and (r["E"], r["G"], r["C"], r["k"], r["b"]) == (E, G, C, k, 1)]
    return max(bounds, default=None)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["64:8:9:8", "64:8:8:8", "16:8:3:8"], help="E:G:C:k")
    parser.add_argument("--steps", type=int, default=4_000_000)
    parser.add_argument("--hot", type=float, default=1.5)
    parser.add_argument("--cold", type=float, default=0.05)
    parser.add_argument("--search-limit", type=float, default=10.0, help="local-search seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench", type=Path, default=RESULTS / "bench_placement.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "anneal_placement.json")
    args = parser.parse_args(argv)

    rows = []
    for case in args.cases:
        E, G, C, k = map(int, case.split(":"))
        instance = synthetic(E, G, k, C - -(-E // G), 1024, 0).with_batch_size(1)
        start = solve_placement(instance, "local-search", time_limit=args.search_limit, seed=args.seed)
        began = time.perf_counter()
        _, annealed = anneal(instance, start.schedule.devices, args.steps, hot=args.hot, cold=args.cold,
                             seed=args.seed)
        bound = proven_bound(E, G, C, k, args.bench)
        rows.append({
            "case": f"synthetic E{E} G{G} C{C} k{k}, b = 1", "steps": args.steps, "seed": args.seed,
            "local_search_cost": start.objective, "annealed_cost": annealed,
            "anneal_time_s": time.perf_counter() - began, "proven_bound": bound,
            "gap_at_proven_bound": None if bound is None else annealed / bound - 1,
            "cost_for_5pct_gap": None if bound is None else 1.05 * bound,
        })
        print(json.dumps(rows[-1]))
        write_json(rows, args.out)  # after every case, so an interrupted run keeps the cases it finished
    return rows


if __name__ == "__main__":
    main()
