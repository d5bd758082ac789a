"""pipesched: certified schedules for pipeline parallelism, rematerialization and MoE placement."""

from pipesched._common import FormatError, PipeschedError, ValidationError
from pipesched._io import from_dict, load, save, validate
from pipesched.pipeline import PipelineInstance, PipelineSchedule, Stage
from pipesched.placement import Placement, PlacementInstance
from pipesched.remat import RematInstance, RematSchedule

__all__ = [
    "FormatError", "PipeschedError", "PipelineInstance", "PipelineSchedule", "Placement",
    "PlacementInstance", "RematInstance", "RematSchedule", "Stage", "ValidationError", "from_dict",
    "load", "save", "validate",
]
