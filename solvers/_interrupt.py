"""Deadlines and Ctrl-C for every solver: stop, keep the best result so far, say so.

Each `solve_*` catches KeyboardInterrupt around its long phases and returns the best result found
before it, with `Result.interrupted` set; the CLI writes it and exits 130.

CP-SAT needs care (OR-Tools 9.15). By default (`catch_sigint_signal`) `CpSolver.solve` installs
its own C++ SIGINT handler, which stops the search and returns the incumbent, but Python never
learns that an interrupt happened (the status is FEASIBLE, as after a time limit), and on return
the handler is reset to SIG_DFL, so a later Ctrl-C kills the process without a KeyboardInterrupt
(measured: exit 130, no traceback, no result written). So `solve_interruptibly` turns it off and
runs the solve in a worker thread while the main thread waits on an event: Python's own handler
raises KeyboardInterrupt there, and the main thread calls `stop_search` (repeatedly, until the
solve returns: a stop that lands before the search has started is lost), which keeps the
incumbent and the proven bound. After a stop CP-SAT's OPTIMAL and INFEASIBLE are not trusted
(google/or-tools#4430: OPTIMAL reported after stop_search): callers get FEASIBLE / UNKNOWN.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ortools.sat.python import cp_model

_POLL_S = 0.05  # how often the waiting main thread re-sends stop_search after an interrupt


class Deadline:
    """The end of a time limit that started at `started` (a `time.perf_counter()` value)."""

    def __init__(self, time_limit: float, started: float | None = None):
        self.at = (time.perf_counter() if started is None else started) + time_limit

    def left(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.at - time.perf_counter())

    def passed(self) -> bool:
        return time.perf_counter() >= self.at


def solve_interruptibly(solver: cp_model.CpSolver, model: cp_model.CpModel,
                        callback: cp_model.CpSolverSolutionCallback | None = None) -> tuple[Any, bool]:
    """`solver.solve(model, callback)` that Ctrl-C stops (module docstring): (status, interrupted).
    An interrupted OPTIMAL becomes FEASIBLE and an interrupted INFEASIBLE becomes UNKNOWN."""
    solver.parameters.catch_sigint_signal = False
    done, out = threading.Event(), {}

    def run() -> None:
        try:
            out["status"] = solver.solve(model, callback)
        except BaseException as error:  # re-raised in the caller's thread
            out["error"] = error
        finally:
            done.set()

    threading.Thread(target=run, name="cpsat", daemon=True).start()
    interrupted = False
    while not done.is_set():
        try:
            if interrupted:
                solver.stop_search()
            done.wait(_POLL_S if interrupted else 0.25)
        except KeyboardInterrupt:
            interrupted = True
    if "error" in out:
        raise out["error"]
    status = out["status"]
    if interrupted and status == cp_model.OPTIMAL:
        status = cp_model.FEASIBLE
    elif interrupted and status == cp_model.INFEASIBLE:
        status = cp_model.UNKNOWN
    return status, interrupted


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a phase that had already found `best` (a KeyboardInterrupt still, for
    callers that do not look for it)."""

    def __init__(self, best: Any):
        super().__init__()
        self.best = best
