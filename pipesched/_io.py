"""Read any formats.md file by its `format` key, and validate whatever it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from pipesched._common import FormatError, as_mapping, in_file, read_json, show
from pipesched.pipeline import PipelineInstance, PipelineSchedule, validate_pipeline
from pipesched.placement import Placement, PlacementInstance, validate_placement
from pipesched.remat import RematInstance, RematSchedule, validate_remat

KINDS = {
    "pipesched.pipeline-instance/1": PipelineInstance,
    "pipesched.pipeline-schedule/1": PipelineSchedule,
    "pipesched.remat-instance/1": RematInstance,
    "pipesched.remat-schedule/1": RematSchedule,
    "pipesched.placement-instance/1": PlacementInstance,
    "pipesched.placement/1": Placement,
}


def from_dict(obj: Any) -> Any:
    obj = as_mapping(obj, "<root>")
    kind = obj.get("format")
    if not isinstance(kind, str) or kind not in KINDS:
        raise FormatError(f"format: expected one of {', '.join(KINDS)}; got {show(kind)}")
    return KINDS[kind].from_dict(obj)


def load(path: str | Path) -> Any:
    """Load any pipesched file; raises FormatError('file: key: problem') on bad input."""
    return in_file(path, lambda: from_dict(read_json(path)))


def save(obj: Any, path: str | Path) -> None:
    obj.save(path)


class Check(NamedTuple):
    kind: str
    summary: str


def validate(obj: Any) -> Check:
    """Validate an instance (construction already did) or a result; ValidationError if invalid."""
    if isinstance(obj, PipelineSchedule):
        report = validate_pipeline(obj)
        peaks = ", ".join(f"{p:g}" for p in report.peak_memory)
        return Check("pipeline schedule", f"makespan {report.makespan:g}, lower bound {obj.lower_bound}, "
                     f"{obj.status}, peak memory per device [{peaks}]")
    if isinstance(obj, RematSchedule):
        cost, peak = validate_remat(obj)
        return Check("remat schedule", f"cost {cost:g}, peak memory {peak:g}, lower bound {obj.lower_bound}, "
                     f"{obj.status}")
    if isinstance(obj, Placement):
        cost = validate_placement(obj)
        return Check("placement", f"cost {cost:g}, lower bound {obj.lower_bound}, {obj.status}")
    if isinstance(obj, PipelineInstance):
        return Check("pipeline instance", f"P={obj.num_devices} M={obj.num_microbatches} S={obj.num_stages}")
    if isinstance(obj, RematInstance):
        return Check("remat instance", f"{len(obj.nodes)} nodes, budget {obj.budget:g}")
    if isinstance(obj, PlacementInstance):
        return Check("placement instance", f"E={obj.num_experts} G={obj.num_devices} C={obj.slots_per_device} "
                     f"b={obj.batch_size}, {len(obj.trace)} tokens")
    raise TypeError(f"not a pipesched object: {type(obj).__name__}")
