"""Mixture-of-Experts expert placement (formats.md section 3): instance, placement, cost, validator."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipesched._common import (
    EMPTY_STATUSES,
    FormatError,
    JsonFile,
    ValidationError,
    as_int,
    as_list,
    as_mapping,
    as_str,
    check_format,
    check_result_claims,
    need,
    read_result_fields,
)

INSTANCE_FORMAT = "pipesched.placement-instance/1"
PLACEMENT_FORMAT = "pipesched.placement/1"
RULE = "3.2"
MAX_EXPERTS = MAX_DEVICES = 4096
MAX_BATCH_COUNTS = 2**25  # batches x experts of the per-batch token counts (README "Bad input")


@dataclasses.dataclass(frozen=True)
class PlacementInstance(JsonFile):
    """E experts, G devices with C slots each, a routing trace and the batch size b."""

    num_experts: int
    num_devices: int
    slots_per_device: int
    batch_size: int
    trace: tuple[tuple[int, ...], ...]
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "trace", tuple(tuple(t) for t in self.trace))
        E = as_int(self.num_experts, "num_experts", lo=1, hi=MAX_EXPERTS + 1)
        G = as_int(self.num_devices, "num_devices", lo=1, hi=MAX_DEVICES + 1)
        C = as_int(self.slots_per_device, "slots_per_device", lo=1, hi=MAX_EXPERTS + 1)
        b = as_int(self.batch_size, "batch_size", lo=1)
        if C * G < E:
            raise FormatError(f"slots_per_device: C*G = {C}*{G} = {C * G} < num_experts {E}")
        as_list(self.trace, "trace", nonempty=True)
        batches = max(1, len(self.trace) // b)
        if batches * E > MAX_BATCH_COUNTS:
            raise FormatError(f"trace: {batches} batches x {E} experts = {batches * E} token counts, more than "
                              f"the {MAX_BATCH_COUNTS} pipesched holds; use a larger batch_size or a shorter trace")
        for t, token in enumerate(self.trace):
            for j, e in enumerate(token):
                as_int(e, f"trace[{t}][{j}]", lo=0, hi=E)
            if len(set(token)) != len(token):
                raise FormatError(f"trace[{t}]: expert ids of a token must be distinct, got {list(token)}")

    @property
    def num_slots(self) -> int:
        return self.num_devices * self.slots_per_device

    @functools.cached_property
    def batch_counts(self) -> np.ndarray:
        """(num_batches, E) array: how many tokens of each batch route to each expert."""
        T, b = len(self.trace), self.batch_size
        batches = 1 if T < b else T // b
        used = T if T < b else batches * b
        counts = np.zeros((batches, self.num_experts), dtype=np.int64)
        for t, token in enumerate(self.trace[:used]):
            counts[t // b if T >= b else 0, list(token)] += 1
        return counts

    def with_batch_size(self, batch_size: int) -> PlacementInstance:
        return dataclasses.replace(self, batch_size=batch_size)

    @classmethod
    def from_dict(cls, obj: Any, *, embedded: bool = False) -> PlacementInstance:
        obj = as_mapping(obj, "instance" if embedded else "<root>")
        check_format(obj, INSTANCE_FORMAT, required=not embedded)
        trace = as_list(need(obj, "trace", ""), "trace", nonempty=True)
        name = obj.get("name")
        return cls(
            num_experts=need(obj, "num_experts", ""),
            num_devices=need(obj, "num_devices", ""),
            slots_per_device=need(obj, "slots_per_device", ""),
            batch_size=need(obj, "batch_size", ""),
            trace=tuple(tuple(as_list(t, f"trace[{i}]")) for i, t in enumerate(trace)),
            name=None if name is None else as_str(name, "name"),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": INSTANCE_FORMAT}
        if self.name is not None:
            d["name"] = self.name
        d.update(num_experts=self.num_experts, num_devices=self.num_devices,
                 slots_per_device=self.slots_per_device, batch_size=self.batch_size,
                 trace=[list(t) for t in self.trace])
        return d


def hosting_matrix(instance: PlacementInstance, devices: Sequence[Sequence[int]]) -> np.ndarray:
    """(E, G) array: share of expert e's tokens that device d serves, 1/r(e) where hosted."""
    host = np.zeros((instance.num_experts, instance.num_devices))
    for d, experts in enumerate(devices):
        host[list(experts), d] = 1.0
    replicas = host.sum(axis=1, keepdims=True)
    return np.divide(host, replicas, out=np.zeros_like(host), where=replicas > 0)


def batch_loads(instance: PlacementInstance, devices: Sequence[Sequence[int]]) -> np.ndarray:
    """(num_batches, G) array of device loads (formats.md 3.2)."""
    return instance.batch_counts @ hosting_matrix(instance, devices)


def placement_cost(instance: PlacementInstance, devices: Sequence[Sequence[int]]) -> float:
    """Mean over batches of the most loaded device's load (formats.md 3.2)."""
    return float(batch_loads(instance, devices).max(axis=1).mean())


def check_devices(instance: PlacementInstance, devices: Sequence[Sequence[int]]) -> None:
    """The structural rules of formats.md 3.2, numbered in the order stated there:

    1. one list per device (G lists);  2. at most C experts per device;
    3. an expert at most once per device;  4. every expert on at least one device.
    """
    if len(devices) != instance.num_devices:
        raise ValidationError(f"{RULE} rule 1", f"expected {instance.num_devices} device lists, got {len(devices)}")
    for d, experts in enumerate(devices):
        if len(experts) > instance.slots_per_device:
            raise ValidationError(
                f"{RULE} rule 2", f"devices[{d}] holds {len(experts)} experts > {instance.slots_per_device} slots")
        if len(set(experts)) != len(experts):
            raise ValidationError(f"{RULE} rule 3", f"devices[{d}] holds an expert twice: {list(experts)}")
    hosted = {e for experts in devices for e in experts}
    missing = sorted(set(range(instance.num_experts)) - hosted)
    if missing:
        raise ValidationError(f"{RULE} rule 4", f"experts on no device: {missing[:10]}")


@dataclasses.dataclass(frozen=True)
class Placement(JsonFile):
    """A placement result file (formats.md 3.2)."""

    instance: PlacementInstance
    devices: tuple[tuple[int, ...], ...]
    cost: float
    lower_bound: float | None
    status: str
    solver: str
    solve_time_s: float

    def __post_init__(self) -> None:
        for d, experts in enumerate(self.devices):
            for j, e in enumerate(experts):
                as_int(int(e) if isinstance(e, np.integer) else e, f"devices[{d}][{j}]",
                       lo=0, hi=self.instance.num_experts)
        object.__setattr__(self, "devices", tuple(tuple(int(e) for e in d) for d in self.devices))

    @classmethod
    def from_devices(cls, instance: PlacementInstance, devices: Sequence[Sequence[int]], *,
                     lower_bound: float | None, status: str, solver: str, solve_time_s: float) -> Placement:
        """Build a result from a device assignment, computing its cost (raises if invalid)."""
        check_devices(instance, devices)
        return cls(instance, tuple(tuple(d) for d in devices), placement_cost(instance, devices),
                   lower_bound, status, solver, solve_time_s)

    @classmethod
    def empty(cls, instance: PlacementInstance, *, status: str, lower_bound: float | None, solver: str,
              solve_time_s: float) -> Placement:
        assert status in EMPTY_STATUSES
        return cls(instance, (), 0, lower_bound, status, solver, solve_time_s)

    @classmethod
    def from_dict(cls, obj: Any) -> Placement:
        obj = as_mapping(obj, "<root>")
        check_format(obj, PLACEMENT_FORMAT)
        instance = PlacementInstance.from_dict(need(obj, "instance", ""), embedded=True)
        devices = tuple(tuple(as_list(d, f"devices[{i}]"))
                        for i, d in enumerate(as_list(need(obj, "devices", ""), "devices")))
        return cls(instance=instance, devices=devices, **read_result_fields(obj, "cost"))

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLACEMENT_FORMAT, "instance": self.instance.to_dict(),
                "devices": [list(d) for d in self.devices], "cost": self.cost,
                "lower_bound": self.lower_bound, "status": self.status, "solver": self.solver,
                "solve_time_s": self.solve_time_s}


def validate_placement(placement: Placement) -> float:
    """Check rules 1-4 (see `check_devices`) and 5: the result-file rules (cost recomputed,
    lower_bound <= cost, "optimal" only when equal). Returns the recomputed cost."""
    empty = not placement.devices
    if not empty:
        check_devices(placement.instance, placement.devices)
    recomputed = 0.0 if empty else placement_cost(placement.instance, placement.devices)
    check_result_claims(f"{RULE} rule 5", "cost", placement.cost, recomputed,
                        placement.lower_bound, placement.status, empty)
    return recomputed
