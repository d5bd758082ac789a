"""Rematerialization (activation checkpointing) of a training graph: formats.md section 2."""

from pipesched.remat._chain import Chain, ChainLayout, chain_instance, chain_layout, make_chain
from pipesched.remat._jax_apply import (
    APPLY_MODES,
    CompiledMemory,
    MemoryReport,
    apply,
    compiled_memory,
    memory_report,
)
from pipesched.remat._jax_graph import (
    GRANULARITIES,
    JAX_POLICIES,
    TracedLoss,
    equation_flops,
    kept_names,
    policy_kept,
    policy_schedule,
    realized_steps,
    remat_instance_from_jax,
    trace_loss,
)
from pipesched.remat._model import (
    INSTANCE_FORMAT,
    SCHEDULE_FORMAT,
    RematEvaluation,
    RematInstance,
    RematNode,
    RematSchedule,
    evaluate_steps,
    validate_remat,
)
from pipesched.remat._models import GPT, MLP, GPTConfig, LossProblem, gpt_problem, mlp_problem

__all__ = [
    "Chain", "ChainLayout", "chain_instance", "chain_layout", "make_chain",
    "INSTANCE_FORMAT", "SCHEDULE_FORMAT", "RematEvaluation", "RematInstance", "RematNode",
    "RematSchedule", "evaluate_steps", "validate_remat",
    # graphs traced from JAX, and schedules applied back to JAX
    "APPLY_MODES", "CompiledMemory", "GRANULARITIES", "JAX_POLICIES", "MemoryReport", "TracedLoss",
    "apply", "compiled_memory", "equation_flops", "kept_names", "memory_report", "policy_kept",
    "policy_schedule", "realized_steps", "remat_instance_from_jax", "trace_loss",
    # tiny flax NNX models with named activations
    "GPT", "GPTConfig", "LossProblem", "MLP", "gpt_problem", "mlp_problem",
]
