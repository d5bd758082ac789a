"""The solver names of each problem, importable without loading any solver (the CLI's help)."""

from pipesched.pipeline import zoo

PIPELINE_SOLVERS = ("cpsat", "greedy", *zoo.ZOO)
REMAT_SOLVERS = ("cpsat", "chain-dp", "checkpoint-all", "sqrt-n", "chen-greedy", "greedy")
PLACEMENT_SOLVERS = ("round-robin", "random", "eplb", "coactivation", "local-search", "cpsat", "greedy")
