"""Hanayo's per-device op order (Liu et al. 2023, "Hanayo: Harnessing Wave-like Pipeline Parallelism
for Enhanced Large Model Training Efficiency", SC'23).

With W waves the model is cut into S = 2W·P stages that zig-zag over the devices: chunk c of
device d (c = 0 .. 2W-1) is stage c·P + d on the way down (c even) and c·P + P-1-d on the way up
(c odd), so the last stage sits on device 0, next to the first. Each device runs its forwards in
the order a full pipeline delivers them (microbatch m reaches stage s at step m + s, the deeper
stage first on a tie) and its backwards likewise (step m + S-1-s). It first runs (2W-1)·M
forwards, as many as its chunks before the last half wave hold, plus the 2d that cover the
round trip of its last chunk to device 0 and back; then it alternates one forward and one
backward (1F1B) and drains the backwards.
"""

from __future__ import annotations

OpKey = tuple[str, int, int]  # ("F" or "B", stage, microbatch), as Action.key


def chunk_stages(num_devices: int, waves: int, device: int) -> list[int]:
    """The stages of `device`, one per half wave, in forward order."""
    P = num_devices
    return [c * P + (device if c % 2 == 0 else P - 1 - device) for c in range(2 * waves)]


def forward_order(stages: list[int], num_microbatches: int) -> list[tuple[int, int]]:
    """(stage, microbatch) forwards by the step they reach the device, deeper stage first."""
    pairs = [(s, m) for s in stages for m in range(num_microbatches)]
    return sorted(pairs, key=lambda sm: (sm[0] + sm[1], -sm[0]))


def backward_order(stages: list[int], num_microbatches: int, num_stages: int) -> list[tuple[int, int]]:
    """(stage, microbatch) backwards by the step they reach the device, the one nearer stage 0 first."""
    pairs = [(s, m) for s in stages for m in range(num_microbatches)]
    return sorted(pairs, key=lambda sm: (num_stages - 1 - sm[0] + sm[1], sm[0]))


def device_order(num_devices: int, waves: int, num_microbatches: int, device: int) -> list[OpKey]:
    """Device `device`'s forwards and backwards in Hanayo's order."""
    stages = chunk_stages(num_devices, waves, device)
    forwards = [("F", s, m) for s, m in forward_order(stages, num_microbatches)]
    backwards = [("B", s, m) for s, m in backward_order(stages, num_microbatches, 2 * waves * num_devices)]
    warmup = min((2 * waves - 1) * num_microbatches + 2 * device, len(forwards))
    order = forwards[:warmup]
    for i, backward in enumerate(backwards):
        order += forwards[warmup + i:warmup + i + 1] + [backward]
    return order
