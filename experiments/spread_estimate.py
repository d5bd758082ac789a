"""How many uncorrelated tokens can one placement spread at b = 1? An estimate, not a bound.

    python experiments/spread_estimate.py [--experts 64] [--devices 8] [--samples 200000] [--seed 0]

The benchmark's synthetic trace with k = G and no spare slot (`bench_placement.synthetic(E, G, G,
0, 1024, 0)`): correlated tokens select a whole cluster of G experts, the others G experts drawn
by popularity. A token costs 1 only when its experts sit on distinct devices ("spread"); in a
placement where every cluster is spread, each cluster is a permutation of the devices, so such
placements carry (E/G - 1) log2(G!) bits of freedom (device labels fixed by the first cluster).
Spreading one uncorrelated token u costs -log2 p_u bits, p_u = the probability that a uniformly
random placement of that kind spreads u (sampled). Counting bits, at most about the number of
cheapest tokens whose bits sum to the freedom can be spread at once: a first-moment estimate for
random traces, not a proof for this one. It is held against what local search reaches.
Writes experiments/results/spread_estimate.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from bench_placement import synthetic
from pipesched.solvers import solve_placement

from pipesched._common import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def clusters_and_loners(trace: list[tuple[int, ...]], num_experts: int) -> tuple[list[tuple[int, ...]], list]:
    """The clusters (tokens seen more than once, which must partition the experts) and the other
    tokens."""
    seen = Counter(tuple(sorted(t)) for t in trace)
    clusters = [t for t, n in seen.items() if n > 1]
    if sorted(e for c in clusters for e in c) != list(range(num_experts)):
        raise ValueError("the repeated tokens do not partition the experts: not a k = G cluster trace")
    return clusters, [t for t, n in seen.items() if n == 1]


def spread_bits(clusters: list[tuple[int, ...]], loners: list, num_devices: int, samples: int,
                rng: np.random.Generator) -> np.ndarray:
    """-log2 of the sampled probability that a random cluster-spread placement spreads each token."""
    cluster_of, rank = {}, {}
    for c, experts in enumerate(clusters):
        for i, e in enumerate(experts):
            cluster_of[e], rank[e] = c, i
    # device[s, c, i]: device of the i-th expert of cluster c in sample s
    device = np.argsort(rng.random((samples, len(clusters), num_devices)), axis=2)
    bits = []
    for token in loners:
        hosts = np.sort(device[:, [cluster_of[e] for e in token], [rank[e] for e in token]], axis=1)
        spread = np.mean(np.all(np.diff(hosts, axis=1) > 0, axis=1))
        bits.append(-math.log2(spread) if spread > 0 else math.inf)
    return np.sort(np.array(bits))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--search-limit", type=float, default=10.0, help="local-search seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "spread_estimate.json")
    args = parser.parse_args(argv)

    E, G = args.experts, args.devices
    instance = synthetic(E, G, G, 0, 1024, 0).with_batch_size(1)
    clusters, loners = clusters_and_loners(instance.trace, E)
    bits = spread_bits(clusters, loners, G, args.samples, np.random.default_rng(args.seed))
    freedom = (len(clusters) - 1) * math.log2(math.factorial(G))
    result = solve_placement(instance, "local-search", time_limit=args.search_limit, seed=args.seed)
    host = {e: d for d, experts in enumerate(result.schedule.devices) for e in experts}
    report = {
        "instance": f"synthetic E{E} G{G} C{E // G} k{G}, b = 1", "clusters": len(clusters),
        "uncorrelated_tokens": len(loners), "freedom_bits": freedom, "samples": args.samples,
        "bits_per_token_min_median_max": [float(bits[0]), float(np.median(bits)), float(bits[-1])],
        "expected_spread_at_random": float(np.sum(2.0 ** -bits)),
        "estimated_max_spread": int(np.searchsorted(np.cumsum(bits), freedom, side="right")),
        "local_search_spread": sum(len({host[e] for e in t}) == len(t) for t in loners),
        "local_search_cost": result.objective, "lower_bound": result.lower_bound,
    }
    write_json(report, args.out)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
