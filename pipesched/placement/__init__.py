"""Mixture-of-Experts expert placement: formats.md section 3."""

from pipesched.placement._model import (
    INSTANCE_FORMAT,
    PLACEMENT_FORMAT,
    Placement,
    PlacementInstance,
    batch_loads,
    check_devices,
    hosting_matrix,
    placement_cost,
    validate_placement,
)
from pipesched.placement._traces import expert_clusters, layer_trace, synthetic_traces, zipf_popularity

__all__ = [
    "INSTANCE_FORMAT", "PLACEMENT_FORMAT", "Placement", "PlacementInstance", "batch_loads",
    "check_devices", "expert_clusters", "hosting_matrix", "layer_trace", "placement_cost", "synthetic_traces",
    "validate_placement", "zipf_popularity",
]
