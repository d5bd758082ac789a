"""Solvers: one `solve_*` entry point per problem, each returning a `Result`."""

from pipesched.solvers._result import Result
from pipesched.solvers.pipeline import PIPELINE_SOLVERS, MemoryLimitError, infeasibility_proof, solve_pipeline
from pipesched.solvers.placement import PLACEMENT_SOLVERS, solve_placement, transfers
from pipesched.solvers.remat import REMAT_SOLVERS, solve_remat

__all__ = [
    "PIPELINE_SOLVERS", "PLACEMENT_SOLVERS", "REMAT_SOLVERS", "MemoryLimitError", "Result",
    "infeasibility_proof", "solve_pipeline", "solve_placement", "solve_remat", "transfers",
]
