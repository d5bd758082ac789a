"""The one result type every solver entry point returns (PyJobShop-style)."""

from __future__ import annotations

from typing import Any, NamedTuple


class Result(NamedTuple):
    """What `solve_*` returns. `schedule` is the formats.md result object (PipelineSchedule,
    RematSchedule or Placement); the other fields repeat its headline figures. `interrupted`:
    Ctrl-C stopped the solver early and this is the best result it had (`_interrupt`).
    `order_lower_bound`: for a pipeline solved with a fixed order, the bound for that order."""

    schedule: Any
    objective: float
    lower_bound: float | None
    status: str
    solve_time: float
    interrupted: bool = False
    order_lower_bound: float | None = None

    @classmethod
    def of(cls, schedule: Any, interrupted: bool = False) -> Result:
        objective = getattr(schedule, "makespan", None)
        if objective is None:
            objective = schedule.cost
        return cls(schedule, objective, schedule.lower_bound, schedule.status, schedule.solve_time_s,
                   interrupted, getattr(schedule, "order_lower_bound", None))
