"""Seeded synthetic MoE routing traces: Zipf-skewed popularity, correlated co-activation, top-k.

Each layer draws its own popularity (a Zipf law over a random ranking of the experts, with the
layer's exponent) and its own clusters (a random partition of the experts into groups of
`cluster_size`). A token is *correlated* with probability `correlation`: it picks a cluster
(with probability proportional to the cluster's popularity) and routes to the `top_k` most likely
of a popularity-weighted draw inside it; otherwise it routes to `top_k` distinct experts drawn by
popularity alone. With `cluster_size == top_k` a correlated token selects its whole cluster, the
recurring expert subsets that Beaumont & Bourgouin (2025) observe in Mixtral's router.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipesched.placement._model import PlacementInstance


def zipf_popularity(num_experts: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities p_e proportional to 1 / rank(e)^exponent over a random ranking of the experts."""
    ranks = rng.permutation(num_experts) + 1
    weights = 1.0 / ranks.astype(float) ** exponent
    return weights / weights.sum()


def expert_clusters(num_experts: int, cluster_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random partition of the experts into groups of `cluster_size`; a short last group is
    topped up with distinct experts from the others so that every cluster has `cluster_size`."""
    order = rng.permutation(num_experts)
    clusters = [order[i:i + cluster_size] for i in range(0, num_experts, cluster_size)]
    short = clusters[-1]
    if len(short) < cluster_size:
        others = np.setdiff1d(order, short)
        fill = rng.choice(others, cluster_size - len(short), replace=False)
        clusters[-1] = np.concatenate([short, fill])
    return clusters


def _draw(experts: np.ndarray, popularity: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    p = popularity[experts] / popularity[experts].sum()
    return sorted(int(e) for e in rng.choice(experts, size=k, replace=False, p=p))


def layer_trace(num_experts: int, top_k: int, num_tokens: int, *, exponent: float, correlation: float,
                cluster_size: int, rng: np.random.Generator) -> list[list[int]]:
    """One layer's routed tokens (each a sorted list of `top_k` distinct expert ids)."""
    popularity = zipf_popularity(num_experts, exponent, rng)
    clusters = expert_clusters(num_experts, cluster_size, rng)
    cluster_p = np.array([popularity[c].sum() for c in clusters])
    cluster_p /= cluster_p.sum()
    everyone = np.arange(num_experts)
    trace = []
    for _ in range(num_tokens):
        if rng.random() < correlation:
            cluster = clusters[rng.choice(len(clusters), p=cluster_p)]
            trace.append(_draw(cluster, popularity, top_k, rng))
        else:
            trace.append(_draw(everyone, popularity, top_k, rng))
    return trace


def synthetic_traces(
    num_experts: int,
    num_devices: int,
    slots_per_device: int,
    top_k: int,
    num_tokens: int,
    *,
    exponents: Sequence[float] = (0.6, 1.0, 1.4),
    correlation: float = 0.9,
    cluster_size: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    name: str = "synthetic",
) -> list[PlacementInstance]:
    """One PlacementInstance per layer, layer l with Zipf exponent `exponents[l]`.

    `cluster_size` defaults to `top_k` (a correlated token selects a whole cluster).
    Same arguments and seed give the same traces.
    """
    cluster_size = top_k if cluster_size is None else cluster_size
    if not 1 <= top_k <= cluster_size <= num_experts:
        raise ValueError(f"need 1 <= top_k ({top_k}) <= cluster_size ({cluster_size}) <= num_experts "
                         f"({num_experts}); lower top_k or cluster_size")
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}")
    rng = np.random.default_rng(seed)
    return [
        PlacementInstance(
            num_experts=num_experts, num_devices=num_devices, slots_per_device=slots_per_device,
            batch_size=batch_size, name=f"{name}_E{num_experts}_G{num_devices}_C{slots_per_device}"
                                        f"_k{top_k}_layer{layer}",
            trace=tuple(map(tuple, layer_trace(num_experts, top_k, num_tokens, exponent=exponent,
                                               correlation=correlation, cluster_size=cluster_size,
                                               rng=rng))),
        )
        for layer, exponent in enumerate(exponents)
    ]
