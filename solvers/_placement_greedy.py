"""Constructive placements: round-robin, random, EPLB-style, co-activation-aware greedy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pipesched.solvers._placement_common import Batches, Devices, replica_counts

from pipesched.placement import PlacementInstance


def round_robin(instance: PlacementInstance) -> Devices:
    """Expert e on device e mod G, no replicas."""
    G = instance.num_devices
    return [[e for e in range(instance.num_experts) if e % G == d] for d in range(G)]


def random_placement(instance: PlacementInstance, seed: int) -> Devices:
    """A seeded random permutation of the experts dealt round-robin onto the devices, no replicas."""
    G = instance.num_devices
    order = np.random.default_rng(seed).permutation(instance.num_experts)
    return [sorted(int(e) for e in order[d::G]) for d in range(G)]


# --------------------------------------------------------------------------------------------
# EPLB (DeepSeek, github.com/deepseek-ai/EPLB): replicate by load per replica, then balanced packing.


def balanced_packing(weights: Sequence[float], num_packs: int) -> list[list[int]]:
    """EPLB's packing: items by decreasing weight (stable), each into the lightest pack that still
    has room; every pack receives exactly len(weights) / num_packs items. Returns item indices."""
    if len(weights) % num_packs:
        raise ValueError(f"{len(weights)} items do not split evenly into {num_packs} packs")
    per_pack = len(weights) // num_packs
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    load = [0.0] * num_packs
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):
        pack = min((p for p in range(num_packs) if len(packs[p]) < per_pack), key=load.__getitem__)
        packs[pack].append(item)
        load[pack] += weights[item]
    return packs


def eplb(instance: PlacementInstance, weights: np.ndarray, *, num_nodes: int = 1, num_groups: int = 1) -> Devices:
    """EPLB's `rebalance_experts`, re-implemented; num_nodes = num_groups = 1 is its global policy.

    Hierarchical policy: the E experts form `num_groups` groups of consecutive ids; groups are
    balanced-packed onto the nodes (G / num_nodes devices each); within a node the spare slots go
    to the experts with the most load per replica, and the replicas are balanced-packed onto the
    node's devices. Adaptations to formats.md 3.2: an expert gets at most one replica per device of
    its node, and two replicas that the packing puts on one device are merged into one (the
    freed slot stays empty; the device's load is unchanged when they are all of the expert's
    replicas, which is the case in EPLB's README example).
    """
    E, G, C = instance.num_experts, instance.num_devices, instance.slots_per_device
    if E % num_groups or num_groups % num_nodes or G % num_nodes:
        raise ValueError(f"hierarchical EPLB needs num_groups | E ({num_groups} | {E}), num_nodes | num_groups "
                         f"and num_nodes | G ({num_nodes} | {G}); use num_nodes = num_groups = 1 otherwise")
    group_size, gpus_per_node = E // num_groups, G // num_nodes
    groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(num_groups)]
    node_groups = balanced_packing([float(weights[g].sum()) for g in groups], num_nodes)
    devices: Devices = []
    for group_ids in node_groups:
        experts = [e for g in group_ids for e in groups[g]]
        local = np.asarray(weights, dtype=float)[experts]
        copies = replica_counts(local, C * gpus_per_node, cap=gpus_per_node)
        replicas = list(range(len(experts))) + [i for i, n in enumerate(copies) for _ in range(n - 1)]
        packs = balanced_packing([local[i] / copies[i] for i in replicas], gpus_per_node)
        devices += [sorted({experts[replicas[j]] for j in pack}) for pack in packs]
    return devices


# --------------------------------------------------------------------------------------------
# Co-activation-aware greedy (Beaumont & Bourgouin 2025, generalised to the 3.2 cost).


def coactivation_greedy(instance: PlacementInstance, batches: Batches) -> Devices:
    """Replica counts by EPLB's rule, then replicas by decreasing load, each onto the device with a
    free slot that raises the 3.2 cost of the partial placement least (ties: the least loaded
    device, then the lowest id).

    The partial cost is exact: every batch's max load over the experts placed so far. At b = 1 it
    counts the tokens whose already-placed experts share the device, so frequently co-selected
    experts land on distinct devices; at large b it is load balancing.
    """
    E, G, C = instance.num_experts, instance.num_devices, instance.slots_per_device
    counts, w = batches.counts, batches.weights
    expected = w @ counts
    copies = replica_counts(expected, instance.num_slots, cap=G)
    loads = np.zeros((len(w), G))
    hosts: Devices = [[] for _ in range(G)]
    for e in sorted(range(E), key=lambda e: (-expected[e] / copies[e], e)):
        free = [d for d in range(G) if len(hosts[d]) < C]
        share = 1.0 / min(copies[e], len(free))
        for _ in range(min(copies[e], len(free))):
            open_ = np.array([len(hosts[d]) < C and e not in hosts[d] for d in range(G)])
            added = loads + share * counts[:, e:e + 1]
            score = w @ np.maximum(loads.max(axis=1, keepdims=True), added)
            order = np.lexsort((np.arange(G), w @ loads, np.round(score, 12)))
            d = int(next(d for d in order if open_[d]))
            hosts[d].append(e)
            loads[:, d] = added[:, d]
    return [sorted(h) for h in hosts]
