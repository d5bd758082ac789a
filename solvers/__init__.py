"""Solvers: one `solve_*` entry point per problem, each returning a `Result`.

The solver names load without any solver; the entry points (and OR-Tools) load on first use, so
that commands which only read files start fast.
"""

from pipesched._common import lazy_module_attributes
from pipesched.solvers._names import PIPELINE_SOLVERS, PLACEMENT_SOLVERS, REMAT_SOLVERS
from pipesched.solvers._result import Result

_MODULE_OF = {
    "MemoryLimitError": "pipesched.solvers.pipeline", "infeasibility_proof": "pipesched.solvers.pipeline",
    "solve_pipeline": "pipesched.solvers.pipeline", "order_infeasibility_proof": "pipesched.solvers.pipeline",
    "solve_placement": "pipesched.solvers.placement", "transfers": "pipesched.solvers.placement",
    "solve_remat": "pipesched.solvers.remat",
}

__all__ = ["PIPELINE_SOLVERS", "PLACEMENT_SOLVERS", "REMAT_SOLVERS", "Result", *_MODULE_OF]

__getattr__, __dir__ = lazy_module_attributes(globals(), _MODULE_OF)
