"""From a placement (which device hosts which experts) to the slot tables the MoE layer runs on.

Replicas. formats.md 3.2 charges a device 1/r(e) of every token routed to an expert e it hosts
with r(e) replicas. We make that charge *exact* rather than expected: an expert is a sum over its
h hidden units, so replica j of e holds the j-th of r(e) equal slices of e's hidden units, every
token of e goes to all r(e) replicas, each computes its slice (exactly 1/r(e) of the expert's
FLOPs) and the partial outputs are summed when combining. The per-device work of a batch is then
exactly the 3.2 load, token by token, on every batch — not only on average, as random or
round-robin choice of one replica would give (round-robin is off by up to one token per expert and
batch, so the max over devices and thus the cost is not reproduced). The price is r(e) copies of
each of e's tokens in the dispatch, which is the communication a tensor-parallel replica pays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pipesched.placement import Placement


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertPlan:
    """Slot tables of a placement: G devices of C slots, slot ``d * C + c`` is slot c of device d.

    ``slot_expert[s]`` is the expert in slot s (-1: empty); it computes hidden units
    ``[slot_start[s], slot_start[s] + slot_width[s])`` of that expert. ``replica_slots[e]`` lists
    the slots holding e (padded with -1).
    """

    num_devices: int
    slots_per_device: int
    hidden_dim: int
    slot_expert: np.ndarray
    slot_start: np.ndarray
    slot_width: np.ndarray
    replica_slots: np.ndarray

    @classmethod
    def from_devices(cls, devices: Sequence[Sequence[int]], num_experts: int, slots_per_device: int,
                     hidden_dim: int) -> ExpertPlan:
        """Slot tables for `devices` (formats.md 3.2 ``devices``); hidden_dim must split evenly."""
        replicas: list[list[int]] = [[] for _ in range(num_experts)]
        for d, experts in enumerate(devices):
            if len(experts) > slots_per_device:
                raise ValueError(f"device {d} hosts {len(experts)} experts but has {slots_per_device} slots")
            for c, e in enumerate(experts):
                replicas[e].append(d * slots_per_device + c)
        unhosted = [e for e, slots in enumerate(replicas) if not slots]
        if unhosted:
            raise ValueError(f"experts {unhosted} are on no device: every expert needs a slot")
        uneven = sorted({len(s) for s in replicas if hidden_dim % len(s)})
        if uneven:
            raise ValueError(f"hidden_dim {hidden_dim} must be divisible by every replica count; "
                             f"counts {uneven} are not divisors (choose a hidden size that is)")
        num_slots = len(devices) * slots_per_device
        slot_expert = np.full(num_slots, -1, np.int32)
        slot_start = np.zeros(num_slots, np.int32)
        slot_width = np.zeros(num_slots, np.int32)
        replica_slots = np.full((num_experts, max(map(len, replicas))), -1, np.int32)
        for e, slots in enumerate(replicas):
            width = hidden_dim // len(slots)
            for j, s in enumerate(slots):
                slot_expert[s], slot_start[s], slot_width[s] = e, j * width, width
                replica_slots[e, j] = s
        return cls(len(devices), slots_per_device, hidden_dim, slot_expert, slot_start, slot_width,
                   replica_slots)

    @classmethod
    def from_placement(cls, placement: Placement, hidden_dim: int) -> ExpertPlan:
        instance = placement.instance
        if not placement.devices:
            raise ValueError(f"placement has status {placement.status!r} and no devices: solve it first")
        return cls.from_devices(placement.devices, instance.num_experts, instance.slots_per_device, hidden_dim)

    @property
    def num_experts(self) -> int:
        return self.replica_slots.shape[0]

    @property
    def max_width(self) -> int:
        return int(self.slot_width.max())

    def hidden_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, max_width) hidden-unit indices of each slot and the mask of the used ones."""
        offsets = np.arange(self.max_width)
        mask = offsets[None, :] < self.slot_width[:, None]
        return np.where(mask, self.slot_start[:, None] + offsets[None, :], 0), mask
