"""Pipeline-parallel training schedules: formats.md section 1."""

from pipesched.pipeline._model import (
    INSTANCE_FORMAT,
    OP_KINDS,
    SCHEDULE_FORMAT,
    Op,
    PipelineInstance,
    PipelineSchedule,
    RematOption,
    Stage,
)
from pipesched.pipeline._program import (
    Action,
    BlockedAction,
    DeadlockError,
    Program,
    Simulation,
    check_program,
    format_program_csv,
    load_program,
    make_program,
    parse_program_csv,
    predecessors,
    program_of,
    simulate,
    simulation_of,
)
from pipesched.pipeline._validate import MemoryTimeline, PipelineReport, memory_timeline, validate_pipeline
from pipesched.pipeline._view import chrome_trace, format_grid, gantt, save_chrome_trace, torch_csv

__all__ = [
    "INSTANCE_FORMAT", "OP_KINDS", "SCHEDULE_FORMAT", "Action", "BlockedAction", "DeadlockError",
    "MemoryTimeline", "Op", "PipelineInstance", "PipelineReport", "PipelineSchedule", "Program",
    "RematOption", "Simulation", "Stage", "check_program", "chrome_trace", "format_grid", "format_program_csv", "gantt",
    "load_program", "make_program", "memory_timeline", "parse_program_csv", "predecessors", "program_of",
    "bounds", "save_chrome_trace", "simulate", "simulation_of", "torch_csv", "validate_pipeline", "zoo",
]

from pipesched.pipeline import bounds, zoo  # noqa: E402  (submodules that build on the above)
