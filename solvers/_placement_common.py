"""What every placement solver shares: aggregated batches, the 3.2 cost, lower bounds, migration.

A placement is handled as `devices`: a list of G lists of expert ids (formats.md 3.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from pipesched.placement import PlacementInstance, hosting_matrix

Devices = list[list[int]]


class Batches(NamedTuple):
    """The distinct rows of `instance.batch_counts` (identical batches have identical costs under
    every placement, so they are merged); `weights` = multiplicity / number of batches, so the
    3.2 cost is ``weights @ max_d loads``."""

    counts: np.ndarray
    multiplicity: np.ndarray
    weights: np.ndarray


def aggregate(instance: PlacementInstance) -> Batches:
    counts, multiplicity = np.unique(instance.batch_counts, axis=0, return_counts=True)
    return Batches(counts, multiplicity, multiplicity / multiplicity.sum())


def max_replicas(instance: PlacementInstance) -> int:
    """The most devices an expert can occupy: one per device, and 1 + the C*G - E spare slots."""
    return min(instance.num_devices, instance.num_slots - instance.num_experts + 1)


def cost_of_loads(batches: Batches, loads: np.ndarray) -> float:
    """The 3.2 cost from the (U, G) per-batch device loads."""
    return float(batches.weights @ loads.max(axis=1))


def cost(instance: PlacementInstance, batches: Batches, devices: Sequence[Sequence[int]]) -> float:
    return cost_of_loads(batches, batches.counts @ hosting_matrix(instance, devices))


def batch_lower_bounds(instance: PlacementInstance, batches: Batches) -> np.ndarray:
    """A proven lower bound on each distinct batch's cost, valid for every placement.

    In a batch with counts c_e, every routed (token, expert) pair adds 1/r(e) to each of the r(e)
    hosts of e, so the device loads sum to T = sum_e c_e and the most loaded device carries at
    least T / G (averaging). Each host of e alone carries c_e / r(e) >= c_e / R, R = `max_replicas`.
    Without spare slots (R = 1, C*G = E) every load is an integer, so the max is at least
    ceil(T / G) (for one token of k experts: ceil(k / G) >= k / min(k, G)); and every device is
    full, so the host of the heaviest expert also holds C - 1 others, at least the C - 1 smallest.
    """
    G, C, R = instance.num_devices, instance.slots_per_device, max_replicas(instance)
    counts = batches.counts
    bound = np.maximum(counts.sum(axis=1) / G, counts.max(axis=1) / R)
    if R == 1 and G > 1:
        ascending = np.sort(counts, axis=1)
        full = ascending[:, -1] + ascending[:, :C - 1].sum(axis=1)
        bound = np.maximum(np.ceil(bound - 1e-9), full)
    return bound


def lower_bound(instance: PlacementInstance, batches: Batches | None = None) -> float:
    """A proven lower bound on the 3.2 cost of every placement: the cost is the batch-weighted
    mean of per-batch maxima, each at least its `batch_lower_bounds` entry; at b = 1, at least
    `single_token_bound` too."""
    batches = aggregate(instance) if batches is None else batches
    per_batch = batch_lower_bounds(instance, batches)
    bound = float(batches.weights @ per_batch)
    if instance.batch_size == 1:
        bound = max(bound, single_token_bound(instance, batches, per_batch))
    return bound


def single_token_bound(instance: PlacementInstance, batches: Batches, per_batch: np.ndarray) -> float:
    """At b = 1 each batch is one token t (the aggregated rows are distinct expert sets). If an
    expert of t has one replica, its host carries a full 1, so cost_t >= max(1, lb_t). Replicated
    experts each take a spare slot, so at most S = C*G - E experts are replicated, and the tokens
    whose experts are all replicated are distinct subsets of those S experts: at most
    sum_j comb(S, j) over the token sizes j present. Granting the cheaper lb_t to the tokens where
    it saves most bounds the cost of every placement from below."""
    spare = instance.num_slots - instance.num_experts
    sizes = {int(j) for j in batches.counts.sum(axis=1)}
    cheap_tokens = sum(math.comb(spare, j) for j in sizes)
    unreplicated = np.maximum(per_batch, 1.0)
    savings = np.sort(batches.weights * (unreplicated - per_batch))[::-1]
    return float(batches.weights @ unreplicated - savings[:cheap_tokens].sum())


def transfers(current: Sequence[Sequence[int]] | None, devices: Sequence[Sequence[int]]) -> int:
    """Expert weights to copy when moving from `current` to `devices`: the (expert, device) pairs
    that `devices` hosts and `current` does not (dropping a replica costs nothing)."""
    if current is None:
        return 0
    return sum(len(set(new) - set(old)) for old, new in zip(current, devices, strict=True))


def replica_counts(weights: np.ndarray, num_slots: int, cap: int) -> np.ndarray:
    """EPLB's replication rule: give each spare slot, one at a time, to the expert with the most
    load per replica (ties to the lowest id), never beyond `cap` replicas."""
    counts = np.ones(len(weights), dtype=np.int64)
    for _ in range(num_slots - len(weights)):
        per_replica = np.where(counts < cap, weights / counts, -np.inf)
        best = int(np.argmax(per_replica))
        if per_replica[best] == -np.inf:
            break
        counts[best] += 1
    return counts


def canonical(devices: Sequence[Sequence[int]]) -> Devices:
    """Experts sorted on each device, devices ordered by their smallest expert (empty ones last).

    Devices are identical, so this relabelling keeps the cost; it is the form CP-SAT's symmetry
    breaking expects (see `_placement_cpsat`).
    """
    lists = [sorted(int(e) for e in d) for d in devices]
    return sorted(lists, key=lambda d: (not d, d[0] if d else math.inf))
